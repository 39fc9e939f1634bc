//! The dispatch of the core's events to the user's closures — the only
//! place user code is called. Every closure is taken out of the state, the
//! borrow released, then called, and (for repeating ones) put back unless
//! its owner went away meanwhile, so a user closure may call any public
//! method.

use super::{Channel, ChannelRecord, ConnectionState, SelectConnection, State};
use crate::error::Error;
use crate::protocol::{self, Event, Phase};

impl SelectConnection {
    /// Hands every queued event of the live core to the user's closures,
    /// in order.
    pub(super) fn dispatch(&self) {
        if self.shared.dispatching.replace(true) {
            return;
        }
        struct Dispatching<'a>(&'a SelectConnection);
        impl Drop for Dispatching<'_> {
            fn drop(&mut self) {
                self.0.shared.dispatching.set(false);
                if std::thread::panicking() {
                    // A user callback panicked: the panic leaves the loop
                    // (the application may start it again). What this
                    // pass would have done after the dispatch — the rest
                    // of the events, the bytes not read yet, the writes
                    // the callbacks queued, the timer — runs on the loop's
                    // next pass.
                    self.0.queue_recovery();
                }
            }
        }
        let _guard = Dispatching(self);
        loop {
            let event = {
                let mut st = self.shared.state.borrow_mut();
                match st.core_mut().and_then(protocol::Connection::poll_event) {
                    Some(e) => e,
                    None => return,
                }
            };
            self.handle_event(event);
        }
    }

    fn handle_event(&self, event: Event) {
        match event {
            Event::Opened => {
                let callbacks = {
                    let mut st = self.shared.state.borrow_mut();
                    st.callbacks.on_open_error.clear();
                    std::mem::take(&mut st.callbacks.on_open)
                };
                log::info!("connection open");
                for cb in callbacks {
                    cb(self);
                }
            }
            Event::Blocked(blocked) => {
                self.run_connection_callbacks(|c| &mut c.on_blocked, |cb, conn| cb(conn, &blocked))
            }
            Event::Unblocked(unblocked) => self
                .run_connection_callbacks(|c| &mut c.on_unblocked, |cb, conn| cb(conn, &unblocked)),
            Event::Reply {
                request,
                channel: None,
                result,
                ..
            } => {
                let cb = {
                    let mut st = self.shared.state.borrow_mut();
                    let queue = &mut st.callbacks.update_secret;
                    queue
                        .iter()
                        .position(|(id, _)| *id == request)
                        .and_then(|i| queue.remove(i))
                };
                if let Some((_, cb)) = cb {
                    cb(self, result.map(|_| ()));
                }
            }
            Event::Reply {
                request,
                channel: Some(key),
                result,
                ..
            } => self.channel_reply(key, request, result),
            Event::Delivery {
                channel,
                consumer,
                delivery,
            } => self.deliver(channel, consumer, delivery),
            Event::DeliveryAfterCancel {
                channel, delivery, ..
            } => {
                // pika's select channel drops these too (they are auto-acked).
                log::warn!(
                    "{channel}: auto-acked delivery {} for a consumer being cancelled dropped",
                    delivery.method.delivery_tag
                );
            }
            Event::Returned {
                channel, message, ..
            } => {
                let ch = self.channel_handle(channel);
                let none = self.run_channel_callbacks(
                    channel,
                    |r| &mut r.on_return,
                    |cb| cb(&ch, &message),
                );
                if none {
                    log::warn!(
                        "{channel}: message returned ({} {}) with no return callback",
                        message.method.reply_code,
                        message.method.reply_text
                    );
                }
            }
            Event::Confirm {
                channel,
                confirmation,
            } => {
                let cb = self
                    .shared
                    .state
                    .borrow_mut()
                    .record_mut(channel)
                    .and_then(|r| r.on_ack_nack.take());
                if let Some(cb) = cb {
                    let ch = self.channel_handle(channel);
                    call_then_restore(
                        cb,
                        |cb| cb(&ch, confirmation),
                        |cb| {
                            let Ok(mut st) = self.shared.state.try_borrow_mut() else {
                                return;
                            };
                            if let Some(r) = st.record_mut(channel) {
                                if r.on_ack_nack.is_none() {
                                    r.on_ack_nack = Some(cb);
                                    return;
                                }
                            }
                            // Replaced or gone meanwhile: dropped with no
                            // borrow held.
                            drop(st);
                            drop(cb);
                        },
                    );
                }
            }
            Event::ConsumerEnded {
                channel,
                consumer,
                by_broker,
            } => {
                let entry = {
                    let mut st = self.shared.state.borrow_mut();
                    st.record_mut(channel).and_then(|r| {
                        let i = r.consumers.iter().position(|c| c.id == consumer)?;
                        Some(r.consumers.remove(i))
                    })
                };
                // The consumer's closure goes with no borrow held.
                drop(entry);
                if let Some(cancel) = by_broker {
                    let ch = self.channel_handle(channel);
                    self.run_channel_callbacks(
                        channel,
                        |r| &mut r.on_cancel,
                        |cb| cb(&ch, &cancel),
                    );
                }
            }
            Event::Flow { channel, active } => {
                let ch = self.channel_handle(channel);
                self.run_channel_callbacks(channel, |r| &mut r.on_flow, |cb| cb(&ch, active));
            }
            Event::Watched { channel, method } => self.run_generic(channel, &method),
            Event::ChannelClosed { channel, error } => {
                self.shared.door.channel_closed(channel);
                if self.shared.state.borrow().shutting_down {
                    // Its deliveries are settled now (the broker requeues
                    // them): the shutdown may be complete.
                    self.queue_shutdown_check();
                }
                let record = {
                    let mut st = self.shared.state.borrow_mut();
                    match st.channels.get_mut(channel.number as usize) {
                        Some(slot) if slot.as_ref().is_some_and(|(k, _)| *k == channel) => {
                            slot.take().map(|(_, r)| r)
                        }
                        _ => None,
                    }
                };
                if let Some(mut record) = record {
                    let on_close = std::mem::take(&mut record.on_close);
                    // Everything else the channel kept goes first.
                    drop(record);
                    let ch = self.channel_handle(channel);
                    for cb in on_close {
                        cb(&ch, error.clone());
                    }
                }
            }
            Event::Closed { error, opened } => self.session_ended(error, opened),
        }
    }

    fn channel_handle(&self, key: protocol::ChannelKey) -> Channel {
        Channel::new(std::rc::Rc::downgrade(&self.shared), key)
    }

    fn channel_reply(
        &self,
        key: protocol::ChannelKey,
        request: protocol::RequestId,
        result: Result<protocol::Reply, Error>,
    ) {
        enum Found {
            Open(super::OnChannelOpen),
            Request(super::RpcCallback),
            Nothing,
        }
        let found = {
            let mut st = self.shared.state.borrow_mut();
            match st.record_mut(key) {
                None => Found::Nothing,
                Some(r) => match r.on_open.take() {
                    Some((id, cb)) if id == request => Found::Open(cb),
                    other => {
                        r.on_open = other;
                        match r.requests.iter().position(|(id, _)| *id == request) {
                            Some(i) => r
                                .requests
                                .remove(i)
                                .map_or(Found::Nothing, |(_, cb)| Found::Request(cb)),
                            None => Found::Nothing,
                        }
                    }
                },
            }
        };
        let ch = self.channel_handle(key);
        match found {
            Found::Open(cb) => {
                if result.is_ok() {
                    self.shared.door.channel_opened(key);
                }
                cb(result.map(|_| ch))
            }
            Found::Request(cb) => cb(&ch, result),
            Found::Nothing => {}
        }
    }

    fn deliver(
        &self,
        key: protocol::ChannelKey,
        consumer: protocol::ConsumerId,
        delivery: crate::message::Delivery,
    ) {
        let cb = {
            let mut st = self.shared.state.borrow_mut();
            st.record_mut(key).and_then(|r| {
                r.consumers
                    .iter_mut()
                    .find(|c| c.id == consumer)
                    .and_then(|c| c.on_message.take())
            })
        };
        let Some(cb) = cb else { return };
        let ch = self.channel_handle(key);
        call_then_restore(
            cb,
            |cb| cb(&ch, delivery),
            |cb| {
                let Ok(mut st) = self.shared.state.try_borrow_mut() else {
                    return;
                };
                if let Some(entry) = st
                    .record_mut(key)
                    .and_then(|r| r.consumers.iter_mut().find(|c| c.id == consumer))
                {
                    if entry.on_message.is_none() {
                        entry.on_message = Some(cb);
                        return;
                    }
                }
                drop(st);
                // The consumer went while its callback ran: the closure
                // goes now, with no borrow held.
                drop(cb);
            },
        );
    }

    /// Calls every callback of a repeating connection-level list with no
    /// borrow held, then puts the list back ahead of any added meanwhile —
    /// unless the connection closed meanwhile.
    pub(super) fn run_connection_callbacks<T: ?Sized>(
        &self,
        list: fn(&mut super::Callbacks) -> &mut Vec<Box<T>>,
        mut call: impl FnMut(&mut Box<T>, &SelectConnection),
    ) {
        let callbacks = std::mem::take(list(&mut self.shared.state.borrow_mut().callbacks));
        call_then_restore(
            callbacks,
            |callbacks| {
                for cb in callbacks.iter_mut() {
                    call(cb, self);
                }
            },
            |mut callbacks| {
                let Ok(mut st) = self.shared.state.try_borrow_mut() else {
                    return;
                };
                if !st.closed {
                    let added = list(&mut st.callbacks);
                    callbacks.append(added);
                    *added = callbacks;
                }
            },
        );
    }

    /// The same for a channel's lists; returns whether the list was empty.
    fn run_channel_callbacks<T: ?Sized>(
        &self,
        key: protocol::ChannelKey,
        list: fn(&mut ChannelRecord) -> &mut Vec<Box<T>>,
        mut call: impl FnMut(&mut Box<T>),
    ) -> bool {
        let callbacks = match self.shared.state.borrow_mut().record_mut(key) {
            Some(r) => std::mem::take(list(r)),
            None => return true,
        };
        let empty = callbacks.is_empty();
        call_then_restore(
            callbacks,
            |callbacks| {
                for cb in callbacks.iter_mut() {
                    call(cb);
                }
            },
            |mut callbacks| {
                let Ok(mut st) = self.shared.state.try_borrow_mut() else {
                    return;
                };
                if let Some(r) = st.record_mut(key) {
                    let added = list(r);
                    callbacks.append(added);
                    *added = callbacks;
                }
            },
        );
        empty
    }

    /// pika's generic callbacks for a watched method: one-shot ones are
    /// removed first, and the core told what is still watched.
    fn run_generic(&self, key: protocol::ChannelKey, method: &crate::spec::Method) {
        let id = method.id();
        let hits: Vec<(usize, bool, Option<super::OnMethod>)> = {
            let mut st = self.shared.state.borrow_mut();
            let Some(r) = st.record_mut(key) else { return };
            r.generic
                .iter_mut()
                .enumerate()
                .filter(|(_, g)| g.replies.contains(&id))
                .map(|(i, g)| (i, g.one_shot, g.callback.take()))
                .collect()
        };
        let ch = self.channel_handle(key);
        call_then_restore(
            hits,
            |hits| {
                for (_, one_shot, cb) in hits.iter_mut() {
                    if let Some(f) = cb {
                        f(&ch, method);
                    }
                    if *one_shot {
                        // Gone once called (also if it panicked).
                        *cb = None;
                    }
                }
            },
            |hits| self.restore_generic(key, hits),
        );
    }

    /// Puts the repeating generic callbacks back after their call, drops
    /// the one-shot ones and tells the core what is still watched.
    fn restore_generic(
        &self,
        key: protocol::ChannelKey,
        hits: Vec<(usize, bool, Option<super::OnMethod>)>,
    ) {
        let keep = hits
            .into_iter()
            .filter_map(|(i, one_shot, cb)| Some((i, cb.filter(|_| !one_shot)?)));
        let Ok(mut st) = self.shared.state.try_borrow_mut() else {
            return;
        };
        let st = &mut *st;
        let Some(r) = st.record_mut(key) else { return };
        for (i, cb) in keep {
            if let Some(g) = r.generic.get_mut(i) {
                if g.callback.is_none() {
                    g.callback = Some(cb);
                }
            }
        }
        r.generic.retain(|g| g.callback.is_some());
        let watched: Vec<_> = r
            .generic
            .iter()
            .flat_map(|g| g.replies.iter().copied())
            .collect();
        if let Some(core) = st.core_mut() {
            core.watch_methods(key, watched);
        }
    }

    /// The face's connection state.
    pub(super) fn face_state(st: &State) -> ConnectionState {
        if st.closed {
            return ConnectionState::Closed;
        }
        match st.core() {
            None => ConnectionState::Connecting,
            Some(core) => match core.phase() {
                Phase::Protocol => ConnectionState::Protocol,
                Phase::Start => ConnectionState::Start,
                Phase::Tune => ConnectionState::Tune,
                Phase::Open => ConnectionState::Open,
                Phase::Closing => ConnectionState::Closing,
                // An open connection's core ended: closed, also while its
                // channels' close callbacks run. An attempt's core that
                // never opened: the workflow decides what comes next.
                Phase::Closed if core.opened() => ConnectionState::Closed,
                Phase::Closed => ConnectionState::Connecting,
            },
        }
    }
}

/// Calls `call` with `value`, then hands `value` to `restore` — also when
/// `call` unwinds: a panicking user callback must not take a repeating
/// callback with it (pika keeps its consumers and callbacks after an
/// exception escapes the loop). `restore` runs while unwinding too, so it
/// must not panic: it uses `try_borrow_mut`.
fn call_then_restore<T>(value: T, call: impl FnOnce(&mut T), restore: impl FnOnce(T)) {
    struct Restore<T, R: FnOnce(T)>(Option<(T, R)>);
    impl<T, R: FnOnce(T)> Drop for Restore<T, R> {
        fn drop(&mut self) {
            if let Some((value, restore)) = self.0.take() {
                restore(value);
            }
        }
    }
    let mut guard = Restore(Some((value, restore)));
    if let Some((value, _)) = guard.0.as_mut() {
        call(value);
    }
}
