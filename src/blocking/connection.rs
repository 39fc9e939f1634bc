//! [`BlockingConnection`]: opening (the connect workflow, each attempt
//! waited for), channels, closing, the dispatch of callbacks in
//! `process_data_events`, timers, and the connection's getters.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channel::BlockingChannel;
use super::engine::{ChannelFace, ConnCallback, Dispatch, Engine, Timer};
use super::handle::BlockingConnectionHandle;
use crate::error::Error;
use crate::parameters::{ConnectionParameters, UrlParameters};
use crate::protocol::{self, Config, Reply};
use crate::spec::connection;
use crate::table::FieldTable;
use crate::transport::workflow::{Step, Workflow};
use crate::transport::{Stream, socket};

/// What [`BlockingConnection::new`] connects to: one parameter set (a
/// [`ConnectionParameters`] or an [`UrlParameters`]) or a list, tried as
/// the callback face's `create` tries them.
pub trait IntoParameterSets {
    /// The sets, in order.
    fn into_parameter_sets(self) -> Vec<ConnectionParameters>;
}

impl IntoParameterSets for ConnectionParameters {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        vec![self]
    }
}

impl IntoParameterSets for UrlParameters {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        vec![self.into()]
    }
}

impl<T: Into<ConnectionParameters>> IntoParameterSets for Vec<T> {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        self.into_iter().map(Into::into).collect()
    }
}

impl<T: Into<ConnectionParameters> + Clone> IntoParameterSets for &[T] {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        self.iter().cloned().map(Into::into).collect()
    }
}

impl<T: Into<ConnectionParameters> + Clone> IntoParameterSets for &Vec<T> {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        self.as_slice().into_parameter_sets()
    }
}

impl<T: Into<ConnectionParameters>, const N: usize> IntoParameterSets for [T; N] {
    fn into_parameter_sets(self) -> Vec<ConnectionParameters> {
        self.into_iter().map(Into::into).collect()
    }
}

/// A timer of [`BlockingConnection::call_later`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

/// pika's `BlockingConnection`: an AMQP connection whose every call returns
/// when done. `Send` (open it in one thread, use it in another), not
/// `Sync`. Dropping it closes it (pika's `with` block), bounded by the
/// close bound (`socket_timeout`, 10 s when unset).
///
/// See the [module docs](super) for callbacks, heartbeats and writes.
pub struct BlockingConnection {
    pub(super) engine: Arc<Engine>,
    params: ConnectionParameters,
    /// Dropping an owning handle closes the connection; the handles
    /// callbacks get do not own it.
    owned: bool,
    _not_sync: PhantomData<Cell<()>>,
}

impl fmt::Debug for BlockingConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingConnection")
            .field("params", &self.params)
            .field("open", &self.is_open())
            .finish()
    }
}

impl BlockingConnection {
    /// Connects and returns once the connection is open: to one parameter
    /// set, or to a list tried in passes (the last set's
    /// `connection_attempts` and `retry_delay` apply, as in pika).
    ///
    /// # Errors
    /// The open error, from pika's connection family: a connect error
    /// naming the address, [`Error::ProbableAuthenticationError`],
    /// [`Error::ProbableAccessDeniedError`], [`Error::IncompatibleProtocol`],
    /// a TLS error, a timeout; for several attempts,
    /// [`Error::ConnectionWorkflowFailed`] listing each.
    pub fn new(parameters: impl IntoParameterSets) -> Result<BlockingConnection, Error> {
        let mut workflow = Workflow::new(parameters.into_parameter_sets())?;
        loop {
            match workflow.next_step() {
                Step::Resolve { set } => {
                    let p = workflow.set(set);
                    let result = socket::resolve(p.host(), p.port());
                    workflow.resolved(result);
                }
                Step::Connect { set, address } => {
                    let params = workflow.set(set).clone();
                    match attempt(&params, address) {
                        Ok(engine) => {
                            for s in workflow.sets_mut() {
                                s.erase_credentials_if_asked();
                            }
                            let params = engine.lock().core.params().clone();
                            return Ok(BlockingConnection {
                                engine,
                                params,
                                owned: true,
                                _not_sync: PhantomData,
                            });
                        }
                        Err((error, credentials_sent)) => {
                            if credentials_sent {
                                for s in workflow.sets_mut() {
                                    s.erase_credentials_if_asked();
                                }
                            }
                            if let Some(fatal) = workflow.failed(error) {
                                return Err(fatal);
                            }
                        }
                    }
                }
                Step::Wait(delay) => {
                    log::info!("connect: all endpoints failed; retrying in {delay:?}");
                    std::thread::sleep(delay);
                }
                Step::Fail(error) => return Err(error),
            }
        }
    }

    /// A handle that does not close the connection when dropped (the one
    /// callbacks and channels hand out).
    pub(super) fn borrowed(engine: Arc<Engine>) -> BlockingConnection {
        let params = engine.lock().core.params().clone();
        BlockingConnection {
            engine,
            params,
            owned: false,
            _not_sync: PhantomData,
        }
    }

    /// The parameter set that connected.
    pub fn params(&self) -> &ConnectionParameters {
        &self.params
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        let st = self.engine.lock();
        st.terminal.is_none() && st.core.phase() == protocol::Phase::Open
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.engine.lock().terminal.is_some()
    }

    /// The broker's `server_properties` from Connection.Start.
    pub fn server_properties(&self) -> FieldTable {
        self.engine.lock().core.server_properties().clone()
    }

    /// The negotiated channel_max.
    pub fn channel_max(&self) -> u16 {
        self.engine.lock().core.channel_max()
    }

    /// The negotiated frame_max.
    pub fn frame_max(&self) -> u32 {
        self.engine.lock().core.frame_max()
    }

    /// The negotiated heartbeat timeout in seconds (0: off).
    pub fn heartbeat(&self) -> u16 {
        self.engine.lock().core.heartbeat()
    }

    fn capability(&self, name: &str) -> bool {
        self.engine.lock().core.capability(name)
    }

    /// Whether the broker supports Basic.Nack.
    pub fn basic_nack_supported(&self) -> bool {
        self.capability("basic.nack")
    }

    /// Whether the broker sends Basic.Cancel when a consumer's queue goes.
    pub fn consumer_cancel_notify_supported(&self) -> bool {
        self.capability("consumer_cancel_notify")
    }

    /// Whether the broker supports exchange-to-exchange bindings.
    pub fn exchange_exchange_bindings_supported(&self) -> bool {
        self.capability("exchange_exchange_bindings")
    }

    /// Whether the broker supports publisher confirms.
    pub fn publisher_confirms_supported(&self) -> bool {
        self.capability("publisher_confirms")
    }

    /// pika's legacy name of [`BlockingConnection::basic_nack_supported`].
    pub fn basic_nack(&self) -> bool {
        self.basic_nack_supported()
    }

    /// pika's legacy name of
    /// [`BlockingConnection::consumer_cancel_notify_supported`].
    pub fn consumer_cancel_notify(&self) -> bool {
        self.consumer_cancel_notify_supported()
    }

    /// pika's legacy name of
    /// [`BlockingConnection::exchange_exchange_bindings_supported`].
    pub fn exchange_exchange_bindings(&self) -> bool {
        self.exchange_exchange_bindings_supported()
    }

    /// pika's legacy name of
    /// [`BlockingConnection::publisher_confirms_supported`].
    pub fn publisher_confirms(&self) -> bool {
        self.publisher_confirms_supported()
    }

    /// The local address of the socket, while it is open (to find this
    /// connection in `rabbitmqctl list_connections peer_port`).
    pub fn local_address(&self) -> Option<SocketAddr> {
        self.engine.lock().local_addr()
    }

    /// The address of the broker connected to (with a list of hosts, the
    /// one that answered), while the socket is open.
    pub fn peer_address(&self) -> Option<SocketAddr> {
        self.engine.lock().peer_addr()
    }

    /// Opens a channel (the lowest free number when `channel_number` is
    /// `None`) and returns it once open.
    ///
    /// # Errors
    /// The connection's end; [`Error::NoFreeChannels`],
    /// [`Error::InvalidChannelNumber`].
    pub fn channel(&self, channel_number: Option<u16>) -> Result<BlockingChannel, Error> {
        let (key, request) = {
            let mut st = self.engine.lock();
            if let Some(e) = &st.terminal {
                return Err(e.clone());
            }
            let (key, request) = st.core.open_channel(channel_number)?;
            st.channels.insert(key.number, ChannelFace::new(key));
            (key, request)
        };
        self.engine.notify();
        let reply = self
            .engine
            .wait(None, |st| st.replies.remove(&request))?
            .unwrap_or(Err(Error::ConnectionOpenAborted));
        reply?;
        Ok(BlockingChannel::new(self.engine.clone(), key, true))
    }

    /// The channel with this number, as a handle that does not close it
    /// when dropped — e.g. from a closure another thread handed over with
    /// [`BlockingConnectionHandle::add_callback_threadsafe`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when no channel has that number.
    pub fn channel_by_number(&self, number: u16) -> Result<BlockingChannel, Error> {
        let key = self
            .engine
            .lock()
            .channels
            .get(number)
            .filter(|f| f.closed.is_none())
            .map(|f| f.key);
        match key {
            Some(key) => Ok(BlockingChannel::new(self.engine.clone(), key, false)),
            None => Err(Error::ChannelWrongState {
                detail: format!("no open channel {number} on this connection"),
            }),
        }
    }

    /// Closes the connection: its channels first, then Connection.Close
    /// and its CloseOk (bounded by `socket_timeout`, 10 s when unset).
    /// Returns once closed.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when already closed; the error that
    /// ended the connection instead, when the broker or the stream ended it
    /// first.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        {
            let mut st = self.engine.lock();
            if st.terminal.is_some() {
                return Err(Error::ConnectionWrongState {
                    detail: "the connection is already closed".into(),
                });
            }
            st.core.close(reply_code, reply_text, Instant::now())?;
        }
        self.engine.notify();
        let end = self.engine.wait(None, |st| st.terminal.clone());
        match end {
            Ok(Some(Error::ConnectionClosedByClient { .. })) => Ok(()),
            Ok(Some(other)) | Err(other) => Err(other),
            Ok(None) => Ok(()),
        }
    }

    /// Processes I/O and dispatches callbacks: consumer deliveries, due
    /// timers, closures from other threads, blocked/unblocked, broker
    /// cancels and returns. With `None` it waits until there is something
    /// to dispatch; with a limit it waits at most that long (zero: look
    /// once, without waiting; beyond the clock's range, e.g.
    /// `Duration::MAX`: as `None`). Called from inside a callback it processes
    /// I/O but dispatches nothing (as pika): for the whole time limit, or
    /// with `None` until the next frame arrives (a heartbeat at the latest).
    /// So does it on another thread while one is dispatching: one thread at
    /// a time runs callbacks.
    ///
    /// # Errors
    /// The connection's end.
    pub fn process_data_events(&self, time_limit: Option<Duration>) -> Result<(), Error> {
        let start = Instant::now();
        // A limit beyond the clock's range (`Duration::MAX`) is no limit.
        let limit = time_limit.and_then(|t| start.checked_add(t));
        // Inside a callback, or while another thread dispatches: I/O only.
        let inside_callback = !self.engine.lock().may_dispatch();
        if !inside_callback && self.has_dispatch() {
            self.dispatch_all();
            return self.ended();
        }
        if time_limit == Some(Duration::ZERO) {
            self.engine.poll_once()?;
        } else if inside_callback && time_limit.is_some() {
            // Nothing is dispatched inside a callback, so what is queued
            // (or arrives) cannot end the wait: drive I/O, heartbeats
            // included, for the whole time limit. (Waiting for "something
            // to dispatch" returned at once here, and `sleep` spun without
            // touching the socket.)
            self.engine.wait(limit, |_| None::<()>)?;
        } else if inside_callback {
            // Without a limit: until the next frame arrives (a heartbeat at
            // the latest), not until something is dispatchable (nothing
            // is, in here: a loop of these would spin without I/O), and
            // not forever (as pika, whose wait inside a callback has no
            // end but the connection's).
            let before = self.engine.lock().frames_in;
            self.engine
                .wait(None, |st| (st.frames_in != before).then_some(()))?;
        } else {
            self.engine.wait_dispatchable(limit, |_| None::<()>)?;
        }
        if !inside_callback {
            self.dispatch_all();
        }
        self.ended()
    }

    /// The connection's end, if it ended (after what it left to dispatch
    /// was dispatched).
    fn ended(&self) -> Result<(), Error> {
        match &self.engine.lock().terminal {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Waits `duration` while processing I/O and dispatching callbacks
    /// (heartbeats keep flowing), as pika's `sleep`. A duration beyond the
    /// clock's range (`Duration::MAX`) sleeps until the connection ends.
    ///
    /// # Errors
    /// The connection's end.
    pub fn sleep(&self, duration: Duration) -> Result<(), Error> {
        // Beyond the clock's range (`Duration::MAX`): for ever.
        let Some(deadline) = Instant::now().checked_add(duration) else {
            loop {
                self.process_data_events(None)?;
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.process_data_events(Some(left))?;
        }
    }

    /// Calls `callback` once, at least `delay` from now, from inside
    /// `process_data_events` (pika's `call_later`). A delay beyond the
    /// clock's range (`Duration::MAX`) never comes due.
    pub fn call_later(
        &self,
        delay: Duration,
        callback: impl FnOnce(&BlockingConnection) + Send + 'static,
    ) -> TimerId {
        let mut st = self.engine.lock();
        let id = st.next_timer;
        st.next_timer += 1;
        st.timers.push(Timer {
            id,
            due: Instant::now().checked_add(delay),
            callback: Box::new(callback),
        });
        drop(st);
        self.engine.notify();
        TimerId(id)
    }

    /// Cancels a timer that has not run; returns whether it was pending.
    pub fn remove_timeout(&self, timer: TimerId) -> bool {
        let mut st = self.engine.lock();
        let before = st.timers.len();
        st.timers.retain(|t| t.id != timer.0);
        st.timers.len() != before
    }

    /// A `Send + Sync + Clone` handle other threads use to run closures
    /// inside this connection's `process_data_events`.
    pub fn threadsafe_handle(&self) -> BlockingConnectionHandle {
        BlockingConnectionHandle::new(&self.engine)
    }

    /// pika's `add_callback_threadsafe`: queues `callback` for the next
    /// `process_data_events` (or `sleep`, `start_consuming`, a waiting
    /// `consume()`). A `BlockingConnection` is not `Sync`, so another
    /// thread cannot call this: it calls the same method on
    /// [`threadsafe_handle`](Self::threadsafe_handle), which it can hold.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is closed; the
    /// callback is dropped.
    pub fn add_callback_threadsafe(
        &self,
        callback: impl FnOnce(&BlockingConnection) + Send + 'static,
    ) -> Result<(), Error> {
        self.threadsafe_handle().add_callback_threadsafe(callback)
    }

    /// Adds a callback run (inside `process_data_events`) each time the
    /// broker blocks the connection, with its Connection.Blocked.
    pub fn add_on_connection_blocked_callback(
        &self,
        callback: impl FnMut(&BlockingConnection, &connection::Blocked) + Send + 'static,
    ) {
        self.engine.lock().on_blocked.push(Box::new(callback));
    }

    /// Adds a callback run (inside `process_data_events`) each time the
    /// broker unblocks the connection.
    pub fn add_on_connection_unblocked_callback(
        &self,
        callback: impl FnMut(&BlockingConnection, &connection::Unblocked) + Send + 'static,
    ) {
        self.engine.lock().on_unblocked.push(Box::new(callback));
    }

    /// Replaces the connection's secret (RabbitMQ's Connection.UpdateSecret)
    /// and returns once the broker accepted it.
    ///
    /// # Errors
    /// The connection's end, or [`Error::ConnectionWrongState`].
    pub fn update_secret(&self, new_secret: &str, reason: &str) -> Result<(), Error> {
        let request = {
            let mut st = self.engine.lock();
            if let Some(e) = &st.terminal {
                return Err(e.clone());
            }
            st.core.update_secret(new_secret, reason)?
        };
        self.engine.notify();
        self.engine
            .wait(None, |st| st.replies.remove(&request))?
            .unwrap_or(Err(Error::ConnectionOpenAborted))
            .map(|_: Reply| ())
    }

    /// Sets the outbound buffer's high- and low-water marks (default 16 MiB
    /// and 4 MiB): a publish that finds the buffer above `high` blocks until
    /// it is below `low`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `low > high`.
    pub fn set_outbound_watermarks(&self, high: usize, low: usize) -> Result<(), Error> {
        if low > high {
            return Err(Error::invalid(
                "outbound watermarks",
                format!("low ({low}) must not exceed high ({high})"),
            ));
        }
        let mut st = self.engine.lock();
        st.high_water = high;
        st.low_water = low;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Dispatch
    // ------------------------------------------------------------------

    fn has_dispatch(&self) -> bool {
        let now = Instant::now();
        self.engine.lock().has_dispatch(now)
            || !self
                .engine
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .callbacks
                .is_empty()
    }

    /// Runs every due timer, queued closure and queued channel event, each
    /// with no lock held.
    pub(super) fn dispatch_all(&self) {
        struct Release<'a>(&'a Engine);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.lock().dispatcher = None;
            }
        }
        {
            let mut st = self.engine.lock();
            if !st.may_dispatch() {
                return;
            }
            st.dispatcher = Some(std::thread::current().id());
        }
        // Released however this ends (a callback's panic passes through).
        let _release = Release(&self.engine);
        loop {
            let now = Instant::now();
            let timer = {
                let mut st = self.engine.lock();
                st.timers
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.due.is_some_and(|d| d <= now))
                    .min_by_key(|(_, t)| t.due)
                    .map(|(i, _)| i)
                    .map(|i| st.timers.remove(i))
            };
            if let Some(timer) = timer {
                resume(self.run_guarded(|| (timer.callback)(self)));
                continue;
            }
            let job: Option<ConnCallback> = self
                .engine
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .callbacks
                .pop_front();
            if let Some(job) = job {
                resume(self.run_guarded(|| job(self)));
                continue;
            }
            let item = self.engine.lock().dispatch.pop_front();
            match item {
                Some(item) => self.dispatch_one(item),
                None => return,
            }
        }
    }

    /// Runs a callback (on the dispatching thread: see
    /// [`BlockingConnection::dispatch_all`]). A panic in it is caught and
    /// returned, so that the caller can put the callbacks it took out back
    /// in place before passing the panic on with [`resume`].
    fn run_guarded(&self, f: impl FnOnce()) -> std::thread::Result<()> {
        // The closure runs no code of ours after it panics; what it
        // borrowed (a callback taken out of the state) is put back by the
        // caller, and the state behind the lock was never touched by it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
    }

    fn dispatch_one(&self, item: Dispatch) {
        match item {
            Dispatch::Delivery {
                channel,
                consumer,
                delivery,
            } => {
                let taken = {
                    let mut st = self.engine.lock();
                    let face = st.face(channel);
                    match face.and_then(|f| f.consumers.iter_mut().find(|c| c.id == consumer)) {
                        Some(c) if !c.cancelled => c.callback.take().map(Ok),
                        Some(c) => Some(Err(c.no_ack)),
                        None => None,
                    }
                };
                match taken {
                    Some(Ok(mut callback)) => {
                        let ch = BlockingChannel::new(self.engine.clone(), channel, false);
                        let ran = self.run_guarded(|| callback(&ch, delivery));
                        {
                            let mut st = self.engine.lock();
                            if let Some(c) = st
                                .face(channel)
                                .and_then(|f| f.consumers.iter_mut().find(|c| c.id == consumer))
                            {
                                if c.callback.is_none() {
                                    c.callback = Some(callback);
                                }
                            }
                        }
                        resume(ran);
                    }
                    // The consumer was cancelled after this arrived.
                    Some(Err(no_ack)) => BlockingChannel::new(self.engine.clone(), channel, false)
                        .after_cancel(delivery, no_ack),
                    None => log::debug!(
                        "{channel}: delivery {} for a consumer that is gone dropped",
                        delivery.method.delivery_tag
                    ),
                }
            }
            Dispatch::Returned { channel, message } => {
                let ch = BlockingChannel::new(self.engine.clone(), channel, false);
                let mut callbacks = self
                    .engine
                    .lock()
                    .face(channel)
                    .map(|f| std::mem::take(&mut f.on_return))
                    .unwrap_or_default();
                if callbacks.is_empty() {
                    log::warn!(
                        "{channel}: message returned ({} {}) with no return callback",
                        message.method.reply_code,
                        message.method.reply_text
                    );
                }
                let ran = self.run_guarded(|| {
                    for cb in callbacks.iter_mut() {
                        cb(&ch, &message);
                    }
                });
                if let Some(f) = self.engine.lock().face(channel) {
                    callbacks.append(&mut f.on_return);
                    f.on_return = callbacks;
                }
                resume(ran);
            }
            Dispatch::Cancelled { channel, cancel } => {
                let ch = BlockingChannel::new(self.engine.clone(), channel, false);
                let mut callbacks = self
                    .engine
                    .lock()
                    .face(channel)
                    .map(|f| std::mem::take(&mut f.on_cancel))
                    .unwrap_or_default();
                let ran = self.run_guarded(|| {
                    for cb in callbacks.iter_mut() {
                        cb(&ch, &cancel);
                    }
                });
                if let Some(f) = self.engine.lock().face(channel) {
                    callbacks.append(&mut f.on_cancel);
                    f.on_cancel = callbacks;
                    // Everything that arrived before the Cancel has been
                    // dispatched: the consumer is gone now.
                    f.consumers
                        .retain(|c| !(c.ended && c.tag == cancel.consumer_tag));
                }
                resume(ran);
            }
            Dispatch::Blocked(blocked) => {
                let mut callbacks = std::mem::take(&mut self.engine.lock().on_blocked);
                let ran = self.run_guarded(|| {
                    for cb in callbacks.iter_mut() {
                        cb(self, &blocked);
                    }
                });
                {
                    let mut st = self.engine.lock();
                    callbacks.append(&mut st.on_blocked);
                    st.on_blocked = callbacks;
                }
                resume(ran);
            }
            Dispatch::Unblocked(unblocked) => {
                let mut callbacks = std::mem::take(&mut self.engine.lock().on_unblocked);
                let ran = self.run_guarded(|| {
                    for cb in callbacks.iter_mut() {
                        cb(self, &unblocked);
                    }
                });
                {
                    let mut st = self.engine.lock();
                    callbacks.append(&mut st.on_unblocked);
                    st.on_unblocked = callbacks;
                }
                resume(ran);
            }
        }
    }
}

/// Passes on the panic of a callback [`BlockingConnection::run_guarded`]
/// caught, once its callbacks are back in place.
fn resume(ran: std::thread::Result<()>) {
    if let Err(payload) = ran {
        std::panic::resume_unwind(payload);
    }
}

impl Drop for BlockingConnection {
    fn drop(&mut self) {
        if self.owned && self.is_open() {
            if let Err(e) = self.close(200, "Normal shutdown") {
                log::debug!("closing on drop: {e}");
            }
        }
    }
}

/// One connection attempt: TCP (bounded by `socket_timeout` and
/// `stack_timeout`), TLS, then the AMQP handshake (bounded by
/// `stack_timeout` in the core). On failure, the error and whether the
/// credentials were sent (for `erase_on_connect`).
fn attempt(
    params: &ConnectionParameters,
    address: SocketAddr,
) -> Result<Arc<Engine>, (Error, bool)> {
    log::debug!("connect: trying {address}");
    let started = Instant::now();
    let connect_error = |e: std::io::Error| Error::Connect {
        address: address.to_string(),
        source: Arc::new(e),
    };
    let tcp = socket::start_connect(address, params).map_err(|e| (connect_error(e), false))?;
    wait_connected(&tcp, params, address, started).map_err(|e| (e, false))?;
    let stream =
        Stream::new(tcp, address, params.ssl_options(), params.host()).map_err(|e| (e, false))?;
    let config = Config {
        epoch: crate::ack::next_epoch(),
        first_request_id: 1,
        handshake_deadline: params
            .stack_timeout()
            .and_then(|t| Some((started.checked_add(t)?, t))),
        peer: address.to_string(),
    };
    let core = protocol::Connection::new(params.clone(), config, Instant::now());
    let engine = Engine::new(stream, core).map_err(|e| (Error::IoLoop(Arc::new(e)), false))?;
    let opened = engine.wait(None, |st| st.opened.then_some(()));
    match opened {
        Ok(_) => {
            log::info!("connection open to {address}");
            Ok(engine)
        }
        Err(e) => {
            let sent = engine.lock().core.phase() != protocol::Phase::Protocol;
            Err((e, sent))
        }
    }
}

/// Waits until the non-blocking connect finished, within `socket_timeout`
/// (and `stack_timeout`, which spans the whole attempt).
fn wait_connected(
    tcp: &TcpStream,
    params: &ConnectionParameters,
    address: SocketAddr,
    started: Instant,
) -> Result<(), Error> {
    let poller = polling::Poller::new().map_err(|e| Error::IoLoop(Arc::new(e)))?;
    // SAFETY: `tcp` outlives the registration: it is deleted below before
    // this function returns.
    unsafe {
        poller
            .add(tcp, polling::Event::writable(0))
            .map_err(|e| Error::IoLoop(Arc::new(e)))?;
    }
    // A bound beyond the clock's range (`Duration::MAX`) is no bound.
    let socket_deadline = params
        .socket_timeout()
        .and_then(|t| Some((started.checked_add(t)?, t, true)));
    let stack_deadline = params
        .stack_timeout()
        .and_then(|t| Some((started.checked_add(t)?, t, false)));
    let deadline = [socket_deadline, stack_deadline]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _, _)| *at);
    let mut events = polling::Events::new();
    let result = loop {
        let timeout = deadline.map(|(at, _, _)| at.saturating_duration_since(Instant::now()));
        events.clear();
        match poller.wait(&mut events, timeout) {
            Ok(0) => {
                if let Some((at, bound, socket)) = deadline {
                    if Instant::now() >= at {
                        let address = address.to_string();
                        break Err(if socket {
                            Error::SocketTimeout {
                                address,
                                timeout: bound,
                            }
                        } else {
                            Error::StackTimeout {
                                address,
                                timeout: bound,
                            }
                        });
                    }
                }
            }
            Ok(_) => {
                break socket::connect_result(tcp).map_err(|e| Error::Connect {
                    address: address.to_string(),
                    source: Arc::new(e),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Error::IoLoop(Arc::new(e))),
        }
    };
    let _ = poller.delete(tcp);
    result
}
