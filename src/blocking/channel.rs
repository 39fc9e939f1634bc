//! [`BlockingChannel`]: pika's `BlockingChannel` — every request returns
//! the broker's reply; publishing (confirmed one at a time, or in a window
//! with [`BlockingChannel::wait_for_confirms`]); consumers with callbacks
//! and `start_consuming`; `basic_get`; acks.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use super::connection::BlockingConnection;
use super::engine::{ConsumerFace, Dispatch, Engine, State};
use crate::ack::AckHandle;
use crate::error::Error;
use crate::message::{Delivery, GetMessage, ReturnedMessage};
use crate::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
    exchange_bind, exchange_declare, exchange_delete, exchange_unbind, queue_bind, queue_declare,
    queue_delete,
};
use crate::protocol::{self, ChannelKey, ChannelState, Reply, RequestId};
use crate::spec::{Method, basic, channel, confirm, exchange, queue, tx};
use crate::table::FieldTable;

/// pika's `BlockingChannel`: a channel of a [`BlockingConnection`] whose
/// every request returns the broker's reply. `Send`, not `Sync`, not
/// `Clone`. Dropping it closes it if still open (pika's `with channel:`),
/// bounded by the connection's close bound.
///
/// # Errors
///
/// A broker's Channel.Close is [`Error::ChannelClosedByBroker`] from the
/// call that observed it (or, when it came between calls, from the next
/// call on the channel), and [`Error::ChannelWrongState`] from every later
/// call; the connection's end (`StreamLost`, `ConnectionClosedByBroker`,
/// `AmqpHeartbeatTimeout`, …) is that error from every call.
pub struct BlockingChannel {
    engine: Arc<Engine>,
    key: ChannelKey,
    /// Dropping an owning handle closes the channel; the handles callbacks
    /// get do not own it.
    owned: bool,
    _not_sync: PhantomData<Cell<()>>,
}

impl fmt::Debug for BlockingChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingChannel")
            .field("number", &self.key.number)
            .field("open", &self.is_open())
            .finish()
    }
}

/// Converts a reply to the method type its request expects.
fn typed<T: TryFrom<Method, Error = Method>>(reply: Reply) -> Result<T, Error> {
    match reply {
        Reply::Method(m) => T::try_from(m).map_err(|other| Error::UnexpectedFrame {
            detail: format!("{} is not the reply this request expects", other.name()),
        }),
        Reply::Get(_) => Err(Error::UnexpectedFrame {
            detail: "Basic.GetOk is not the reply this request expects".into(),
        }),
    }
}

impl BlockingChannel {
    pub(super) fn new(engine: Arc<Engine>, key: ChannelKey, owned: bool) -> BlockingChannel {
        BlockingChannel {
            engine,
            key,
            owned,
            _not_sync: PhantomData,
        }
    }

    /// The channel's number.
    pub fn channel_number(&self) -> u16 {
        self.key.number
    }

    /// The channel's state.
    pub fn state(&self) -> ChannelState {
        let st = self.engine.lock();
        if st.terminal.is_some() {
            return ChannelState::Closed;
        }
        st.core.channel_phase(self.key)
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.state() == ChannelState::Open
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.state() == ChannelState::Closed
    }

    /// The connection, as a handle that does not close it when dropped.
    pub fn connection(&self) -> BlockingConnection {
        BlockingConnection::borrowed(self.engine.clone())
    }

    /// The tags of this channel's active consumers (callback consumers and
    /// the `consume()` one).
    pub fn consumer_tags(&self) -> Vec<String> {
        self.engine.lock().core.consumer_tags(self.key)
    }

    /// A `Send` handle that acks, nacks or rejects `delivery` from any
    /// thread (the same door as the callback face's
    /// [`crate::Channel::ack_handle`]): the settle is sent by the thread
    /// that next drives this connection, at once if none does.
    pub fn ack_handle(&self, delivery: &Delivery) -> AckHandle {
        AckHandle::new(
            super::handle::door(&self.engine),
            self.key,
            delivery.epoch,
            delivery.method.delivery_tag,
        )
    }

    // ------------------------------------------------------------------
    // The plumbing of a call
    // ------------------------------------------------------------------

    /// Whether the channel can take a command: the connection's end, or
    /// this channel's close (reported once as itself, then as wrong
    /// state).
    pub(super) fn usable(&self, st: &mut State, what: &str) -> Result<(), Error> {
        if let Some(e) = &st.terminal {
            return Err(e.clone());
        }
        let Some(face) = st.face(self.key) else {
            return Err(Error::ChannelWrongState {
                detail: format!("channel {} is Closed, cannot {what}", self.key.number),
            });
        };
        match face.closed_error(what) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs a command that makes a request, then waits for its reply.
    fn call(
        &self,
        what: &str,
        command: impl FnOnce(&mut protocol::Connection) -> Result<RequestId, Error>,
    ) -> Result<Reply, Error> {
        let request = {
            let mut st = self.engine.lock();
            self.usable(&mut st, what)?;
            command(&mut st.core)?
        };
        self.wait_reply(request)
    }

    fn wait_reply(&self, request: RequestId) -> Result<Reply, Error> {
        let key = self.key;
        let reply = self
            .engine
            .wait(None, |st| st.replies.remove(&request))?
            .unwrap_or(Err(Error::ConnectionOpenAborted));
        if reply.is_err() {
            // The close this call observed is reported; later calls get the
            // wrong state.
            let mut st = self.engine.lock();
            if let Some(face) = st.face(key) {
                face.close_reported |= face.closed.is_some();
            }
        }
        reply
    }

    fn rpc<T: TryFrom<Method, Error = Method>>(&self, method: Method) -> Result<T, Error> {
        let key = self.key;
        let name = method.name();
        self.call(name, |core| core.rpc(key, method))
            .and_then(typed)
    }

    /// A command that waits for nothing (nowait forms, acks).
    fn command(
        &self,
        what: &str,
        command: impl FnOnce(&mut protocol::Connection) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut st = self.engine.lock();
        self.usable(&mut st, what)?;
        command(&mut st.core)?;
        self.engine.after_command(st)
    }

    fn nowait(&self, method: Method) -> Result<(), Error> {
        let key = self.key;
        let name = method.name();
        self.command(name, |core| core.nowait(key, method))
    }

    // ------------------------------------------------------------------
    // Exchanges and queues
    // ------------------------------------------------------------------

    /// Declares an exchange.
    ///
    /// # Errors
    /// See [`BlockingChannel`]; e.g. 404 for a passive declare of a missing
    /// exchange, 406 for a redeclare with other options.
    pub fn exchange_declare(
        &self,
        exchange: &str,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<exchange::DeclareOk, Error> {
        self.rpc(exchange_declare(exchange, options, arguments, false))
    }

    /// Deletes an exchange.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn exchange_delete(
        &self,
        exchange: &str,
        if_unused: bool,
    ) -> Result<exchange::DeleteOk, Error> {
        self.rpc(exchange_delete(exchange, if_unused, false))
    }

    /// Binds exchange `destination` to exchange `source`.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<exchange::BindOk, Error> {
        self.rpc(exchange_bind(
            destination,
            source,
            routing_key,
            arguments,
            false,
        ))
    }

    /// Removes an exchange-to-exchange binding.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn exchange_unbind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<exchange::UnbindOk, Error> {
        self.rpc(exchange_unbind(
            destination,
            source,
            routing_key,
            arguments,
            false,
        ))
    }

    /// Declares a queue; an empty name asks the broker to name it (the
    /// reply's `queue`, with its message and consumer counts).
    ///
    /// # Errors
    /// See [`BlockingChannel`]; e.g. 404 for a passive declare of a missing
    /// queue.
    pub fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<queue::DeclareOk, Error> {
        self.rpc(queue_declare(queue, options, arguments, false))
    }

    /// Binds a queue to an exchange (`None`: with the queue's name as the
    /// routing key, as pika does).
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: Option<&str>,
        arguments: FieldTable,
    ) -> Result<queue::BindOk, Error> {
        self.rpc(queue_bind(queue, exchange, routing_key, arguments, false))
    }

    /// Removes a queue binding (`None`: the queue's name).
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: Option<&str>,
        arguments: FieldTable,
    ) -> Result<queue::UnbindOk, Error> {
        self.rpc(
            queue::Unbind {
                queue: queue.into(),
                exchange: exchange.into(),
                routing_key: routing_key.unwrap_or(queue).into(),
                arguments,
                ..Default::default()
            }
            .into(),
        )
    }

    /// Removes every ready message of a queue; the reply counts them.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn queue_purge(&self, queue: &str) -> Result<queue::PurgeOk, Error> {
        self.rpc(
            queue::Purge {
                queue: queue.into(),
                ..Default::default()
            }
            .into(),
        )
    }

    /// Deletes a queue; the reply counts the messages deleted with it.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn queue_delete(
        &self,
        queue: &str,
        options: QueueDeleteOptions,
    ) -> Result<queue::DeleteOk, Error> {
        self.rpc(queue_delete(queue, options, false))
    }

    /// [`BlockingChannel::queue_declare`] without waiting for the reply.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn queue_declare_nowait(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(queue_declare(queue, options, arguments, true))
    }

    // ------------------------------------------------------------------
    // QoS, recover, transactions, flow, confirms
    // ------------------------------------------------------------------

    /// Sets the prefetch window. RabbitMQ closes the connection with 540
    /// for a non-zero `prefetch_size`.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_qos(
        &self,
        prefetch_size: u32,
        prefetch_count: u16,
        global_qos: bool,
    ) -> Result<basic::QosOk, Error> {
        self.rpc(
            basic::Qos {
                prefetch_size,
                prefetch_count,
                global_qos,
            }
            .into(),
        )
    }

    /// pika's `basic_qos(prefetch_count=n)`.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_prefetch(&self, prefetch_count: u16) -> Result<basic::QosOk, Error> {
        self.basic_qos(0, prefetch_count, false)
    }

    /// Asks the broker to redeliver every unacknowledged message. RabbitMQ
    /// implements only `requeue = true`: `false` makes it close the
    /// *connection* with 540 NOT_IMPLEMENTED.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_recover(&self, requeue: bool) -> Result<basic::RecoverOk, Error> {
        self.rpc(basic::Recover { requeue }.into())
    }

    /// Selects standard transactions.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn tx_select(&self) -> Result<tx::SelectOk, Error> {
        self.rpc(tx::Select {}.into())
    }

    /// Commits the transaction.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn tx_commit(&self) -> Result<tx::CommitOk, Error> {
        self.rpc(tx::Commit {}.into())
    }

    /// Rolls the transaction back.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn tx_rollback(&self) -> Result<tx::RollbackOk, Error> {
        self.rpc(tx::Rollback {}.into())
    }

    /// Asks the broker to pause (`false`) or resume (`true`) deliveries;
    /// returns the state it confirmed. RabbitMQ does not implement
    /// `flow(false)`: it closes the *connection* with 540.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn flow(&self, active: bool) -> Result<bool, Error> {
        self.rpc::<channel::FlowOk>(channel::Flow { active }.into())
            .map(|ok| ok.active)
    }

    /// Puts the channel in confirm mode: from now on
    /// [`BlockingChannel::basic_publish`] waits for the broker's answer to
    /// each message, and [`BlockingChannel::basic_publish_nowait`] with
    /// [`BlockingChannel::wait_for_confirms`] confirm in a window.
    ///
    /// # Errors
    /// See [`BlockingChannel`]; [`Error::InvalidParameter`] when already in
    /// confirm mode.
    pub fn confirm_delivery(&self) -> Result<(), Error> {
        let key = self.key;
        let reply = self.call("confirm_delivery", |core| core.confirm_select(key));
        let ok: confirm::SelectOk = reply.and_then(typed)?;
        let _ = ok;
        if let Some(face) = self.engine.lock().face(key) {
            face.confirm_mode = true;
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Getting, acking
    // ------------------------------------------------------------------

    /// Fetches one message, or `None` when the queue is empty.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_get(&self, queue: &str, auto_ack: bool) -> Result<Option<GetMessage>, Error> {
        let key = self.key;
        let get = basic::Get {
            queue: queue.into(),
            no_ack: auto_ack,
            ..Default::default()
        };
        match self.call("basic_get", |core| core.get(key, get))? {
            Reply::Get(message) => Ok(message.map(|m| *m)),
            Reply::Method(m) => Err(Error::UnexpectedFrame {
                detail: format!("{} is no answer to Basic.Get", m.name()),
            }),
        }
    }

    /// Acknowledges one delivery, or with `multiple` every one up to it.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), Error> {
        let key = self.key;
        self.command("basic_ack", |core| {
            core.ack(key, delivery_tag, multiple, None)
        })
    }

    /// Rejects one or more deliveries (RabbitMQ's Basic.Nack).
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), Error> {
        let key = self.key;
        self.command("basic_nack", |core| {
            core.nack(key, delivery_tag, multiple, requeue, None)
        })
    }

    /// Rejects one delivery.
    ///
    /// # Errors
    /// See [`BlockingChannel`].
    pub fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), Error> {
        let key = self.key;
        self.command("basic_reject", |core| {
            core.reject(key, delivery_tag, requeue, None)
        })
    }

    // ------------------------------------------------------------------
    // Consumers with callbacks
    // ------------------------------------------------------------------

    /// Starts a consumer whose `on_message` runs for each delivery inside
    /// [`BlockingConnection::process_data_events`] (and so inside
    /// [`BlockingChannel::start_consuming`]); returns its tag.
    ///
    /// # Errors
    /// See [`BlockingChannel`]; [`Error::DuplicateConsumerTag`].
    pub fn basic_consume(
        &self,
        queue: &str,
        on_message: impl FnMut(&BlockingChannel, Delivery) + Send + 'static,
        options: BasicConsumeOptions,
    ) -> Result<String, Error> {
        let key = self.key;
        let no_ack = options.auto_ack;
        let m = basic::Consume {
            queue: queue.into(),
            consumer_tag: options.consumer_tag.unwrap_or_default(),
            no_ack,
            exclusive: options.exclusive,
            arguments: options.arguments,
            ..Default::default()
        };
        let (request, tag) = {
            let mut st = self.engine.lock();
            self.usable(&mut st, "basic_consume")?;
            let (request, id, tag) = st.core.consume(key, m)?;
            if let Some(face) = st.face(key) {
                face.consumers.push(ConsumerFace {
                    id,
                    tag: tag.clone(),
                    no_ack,
                    callback: Some(Box::new(on_message)),
                    cancelled: false,
                    ended: false,
                });
            }
            (request, tag)
        };
        self.wait_reply(request)?;
        Ok(tag)
    }

    /// Cancels a consumer and returns once the broker confirmed it, with
    /// the auto-acked messages that arrived for it and were not dispatched
    /// (pika's return value); those needing an ack were rejected back to
    /// the queue.
    ///
    /// # Errors
    /// See [`BlockingChannel`]; [`Error::InvalidParameter`] for an unknown
    /// tag; [`Error::ConsumerCancelled`] when the broker cancelled it first.
    pub fn basic_cancel(&self, consumer_tag: &str) -> Result<Vec<Delivery>, Error> {
        let key = self.key;
        let request = {
            let mut st = self.engine.lock();
            self.usable(&mut st, "basic_cancel")?;
            let request = st.core.cancel(key, consumer_tag)?;
            if let Some(c) = st
                .face(key)
                .and_then(|f| f.consumers.iter_mut().find(|c| c.tag == consumer_tag))
            {
                c.cancelled = true;
            }
            request
        };
        self.wait_reply(request)?;
        Ok(self.take_after_cancel())
    }

    /// What the dispatch queue and the core hold for cancelled consumers:
    /// auto-acked messages handed back, the others rejected.
    fn take_after_cancel(&self) -> Vec<Delivery> {
        let key = self.key;
        let (mut kept, queued) = {
            let mut st = self.engine.lock();
            let cancelled: Vec<(protocol::ConsumerId, bool)> = st
                .face(key)
                .map(|f| {
                    f.consumers
                        .iter()
                        .filter(|c| c.cancelled)
                        .map(|c| (c.id, c.no_ack))
                        .collect()
                })
                .unwrap_or_default();
            let mut queued = Vec::new();
            st.dispatch.retain_mut(|d| match d {
                Dispatch::Delivery {
                    channel, consumer, ..
                } if *channel == key && cancelled.iter().any(|(id, _)| id == consumer) => {
                    queued.push((
                        cancelled.iter().find(|(id, _)| id == consumer).map(|c| c.1),
                        std::mem::replace(d, Dispatch::Unblocked(Default::default())),
                    ));
                    false
                }
                _ => true,
            });
            let kept = st
                .face(key)
                .map(|f| {
                    f.consumers.retain(|c| !(c.cancelled && c.ended));
                    std::mem::take(&mut f.after_cancel)
                })
                .unwrap_or_default();
            (kept, queued)
        };
        for (no_ack, item) in queued {
            if let Dispatch::Delivery { delivery, .. } = item {
                if no_ack == Some(true) {
                    kept.push(delivery);
                } else {
                    let _ = self.basic_reject(delivery.method.delivery_tag, true);
                }
            }
        }
        kept.sort_by_key(|d| d.method.delivery_tag);
        kept
    }

    /// A delivery whose consumer the application cancelled after it
    /// arrived: back to the queue when it needs an ack; kept for
    /// `basic_cancel` when auto-acked.
    pub(super) fn after_cancel(&self, delivery: Delivery, no_ack: bool) {
        if no_ack {
            if let Some(face) = self.engine.lock().face(self.key) {
                face.after_cancel.push(delivery);
            }
        } else if let Err(e) = self.basic_reject(delivery.method.delivery_tag, true) {
            log::debug!("channel {}: not rejected: {e}", self.key.number);
        }
    }

    /// Processes I/O and dispatches consumer callbacks (and timers, other
    /// threads' closures, …) until this channel has no consumer left —
    /// [`BlockingChannel::stop_consuming`], the broker cancelled them, or
    /// this client closed the channel or the connection (e.g. from a
    /// callback: `Ok`, as in pika, where the close leaves no consumer).
    ///
    /// # Errors
    /// [`Error::ReentrancyError`] from inside a callback; the channel's
    /// or the connection's state when either is not open at the call (as
    /// pika's `_raise_if_not_open`); the broker's close of the channel or
    /// the connection, or the connection's loss, during the loop.
    pub fn start_consuming(&self) -> Result<(), Error> {
        if self.engine.lock().in_callback() {
            return Err(Error::ReentrancyError {
                detail: "start_consuming from inside a callback".into(),
            });
        }
        self.check_usable("start_consuming")?;
        let conn = self.connection();
        loop {
            {
                let mut st = self.engine.lock();
                match &st.terminal {
                    // This client closed the connection (a callback did):
                    // no consumer is left.
                    Some(Error::ConnectionClosedByClient { .. }) => return Ok(()),
                    Some(e) => return Err(e.clone()),
                    None => {}
                }
                let Some(face) = st.face(self.key) else {
                    // Closed, and its number taken by a new channel.
                    return Err(Error::ChannelWrongState {
                        detail: format!(
                            "channel {} is Closed, cannot start_consuming",
                            self.key.number
                        ),
                    });
                };
                if let Some(Error::ChannelClosedByClient { .. }) = face.closed {
                    // Closed by this client (a callback did): no consumer
                    // is left. The close was close()'s to report.
                    return Ok(());
                }
                if let Some(e) = face.closed_error("start_consuming") {
                    return Err(e);
                }
                if !face.consumers.iter().any(|c| !c.cancelled) {
                    return Ok(());
                }
            }
            match conn.process_data_events(None) {
                Ok(()) | Err(Error::ConnectionClosedByClient { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Cancels one consumer (`Some(tag)`) or all of this channel's callback
    /// consumers (`None`), so that `start_consuming` returns. Works from
    /// inside a callback, and from another thread through
    /// [`super::BlockingConnectionHandle::add_callback_threadsafe`] with
    /// [`BlockingConnection::channel_by_number`].
    ///
    /// # Errors
    /// See [`BlockingChannel::basic_cancel`].
    pub fn stop_consuming(&self, consumer_tag: Option<&str>) -> Result<(), Error> {
        let tags: Vec<String> = match consumer_tag {
            Some(tag) => vec![tag.to_string()],
            None => self
                .engine
                .lock()
                .face(self.key)
                .map(|f| {
                    f.consumers
                        .iter()
                        .filter(|c| !c.cancelled && !c.ended)
                        .map(|c| c.tag.clone())
                        .collect()
                })
                .unwrap_or_default(),
        };
        for tag in tags {
            self.basic_cancel(&tag)?;
        }
        Ok(())
    }

    /// Adds a callback (run inside `process_data_events`) for each broker
    /// cancel of one of this channel's consumers.
    pub fn add_on_cancel_callback(
        &self,
        callback: impl FnMut(&BlockingChannel, &basic::Cancel) + Send + 'static,
    ) {
        if let Some(face) = self.engine.lock().face(self.key) {
            face.on_cancel.push(Box::new(callback));
        }
    }

    /// Adds a callback (run inside `process_data_events`) for each message
    /// the broker returns (outside confirm mode; in confirm mode a return
    /// comes back from its own publish as [`Error::UnroutableError`], or in
    /// [`super::Confirms::returned`] with its confirm).
    pub fn add_on_return_callback(
        &self,
        callback: impl FnMut(&BlockingChannel, &ReturnedMessage) + Send + 'static,
    ) {
        if let Some(face) = self.engine.lock().face(self.key) {
            face.on_return.push(Box::new(callback));
        }
    }

    // ------------------------------------------------------------------
    // Close
    // ------------------------------------------------------------------

    /// Closes the channel (its consumers cancelled first) and returns once
    /// closed.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when already closing or closed; the
    /// connection's end.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let key = self.key;
        {
            let mut st = self.engine.lock();
            self.usable(&mut st, "close it")?;
            st.core.close_channel(key, reply_code, reply_text)?;
        }
        self.engine.notify();
        let closed = self
            .engine
            .wait(None, |st| st.face(key).and_then(|f| f.closed.clone()))?;
        // This call reports the close, whoever closed it first.
        if let Some(face) = self.engine.lock().face(key) {
            face.close_reported = true;
        }
        match closed {
            Some(Error::ChannelClosedByClient { .. }) | None => Ok(()),
            Some(other) => Err(other),
        }
    }

    /// Where `consume()` keeps its state.
    pub(super) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub(super) fn key(&self) -> ChannelKey {
        self.key
    }

    /// Whether the channel can take a command (for `consume()`).
    pub(super) fn check_usable(&self, what: &str) -> Result<(), Error> {
        let mut st = self.engine.lock();
        self.usable(&mut st, what)
    }

    /// A deadline for waits, from an optional timeout; none for a timeout
    /// beyond the clock's range (`Duration::MAX`).
    pub(super) fn deadline(timeout: Option<std::time::Duration>) -> Option<Instant> {
        timeout.and_then(|t| Instant::now().checked_add(t))
    }
}

impl Drop for BlockingChannel {
    fn drop(&mut self) {
        if self.owned && self.is_open() {
            if let Err(e) = self.close(200, "Normal shutdown") {
                log::debug!("closing channel {} on drop: {e}", self.key.number);
            }
        }
    }
}
