//! [`Channel`]: one AMQP channel of a [`SelectConnection`] — every
//! operation of pika's `Channel` with its completion closure. The
//! channel's state, its request queue, consumers and confirms are the
//! protocol core's ([`crate::protocol`]); a `Channel` is a small key to
//! them, and the face keeps the closures.
//!
//! ```no_run
//! use pika::{BasicProperties, ConnectionParameters, FieldTable, QueueDeclareOptions, SelectConnection};
//!
//! let conn = SelectConnection::new(
//!     ConnectionParameters::default(),
//!     |conn| {
//!         conn.channel(None, |result| {
//!             let channel = result.expect("channel opened");
//!             channel
//!                 .queue_declare("hello", QueueDeclareOptions::default(), FieldTable::new(), |ch, ok| {
//!                     let ok = ok.expect("declared");
//!                     ch.basic_publish("", &ok.queue, b"Hello World!", &BasicProperties::default(), false)
//!                         .expect("published");
//!                     ch.close(200, "done").expect("open");
//!                 })
//!                 .expect("channel is open");
//!         })
//!         .expect("connection is open");
//!     },
//!     |_conn, err| eprintln!("could not connect: {err}"),
//!     |conn, reason| {
//!         eprintln!("closed: {reason}");
//!         conn.ioloop().stop();
//!     },
//! )?;
//! conn.ioloop().start()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Ordering and serialisation
//!
//! As in pika, a channel has at most one synchronous request (declare,
//! bind, consume, get, …) in flight; later ones — their `nowait` forms too —
//! wait in a queue and go out in the order they were called, each when the
//! previous one has its reply. Asynchronous methods (publish, ack, nack,
//! reject) never wait for a reply: they go out at once, or right behind the
//! requests called before them that are not yet sent, so they are never
//! reordered with those. Channel.Close is queued like a request: what was
//! called before it completes first. Methods the broker sends on its own
//! (Deliver, Return, Cancel, Ack/Nack, Flow, Close) reach the callbacks in
//! wire order with the replies.
//!
//! # Every closure fires once
//!
//! A completion closure accepted by a call runs exactly once: with the
//! reply, or with the error that closed the channel (the broker's
//! Channel.Close, our close, or the connection's end). Errors the call can
//! know at once (wrong state, a name over 255 bytes) are returned by the
//! call, and then the closure is dropped uncalled.

use std::fmt;

use super::{
    ConsumerEntry, GenericCallback, RpcCallback, SelectConnection, State, WeakShared, upgrade,
};
use crate::ack::AckHandle;
use crate::error::Error;
use crate::message::{Confirmation, Delivery, GetMessage, ReturnedMessage};
use crate::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
    exchange_bind, exchange_declare, exchange_delete, exchange_unbind, queue_bind, queue_declare,
    queue_delete,
};
use crate::protocol::{self, ChannelKey, ChannelState, Reply, RequestId};
use crate::spec::{
    BasicProperties, Method, MethodId, basic, channel, confirm, exchange, queue, tx,
};
use crate::table::FieldTable;

/// An AMQP channel: a cheap `Clone` handle, `!Send`, used from the loop's
/// thread. Obtained from [`SelectConnection::channel`]. It names its
/// channel by number and generation, so a handle to a closed channel never
/// reaches a later channel with the same number.
#[derive(Clone)]
pub struct Channel {
    conn: WeakShared,
    key: ChannelKey,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("number", &self.key.number)
            .field("state", &self.state())
            .finish()
    }
}

/// The live core of a connection's state, for a channel command.
fn core_of<'a>(
    st: &'a mut State,
    key: ChannelKey,
    what: &str,
) -> Result<&'a mut protocol::Connection, Error> {
    st.core_mut().ok_or_else(|| Error::ChannelWrongState {
        detail: format!("channel {} is Closed, cannot {what}", key.number),
    })
}

/// Keeps a request's completion closure until its reply.
fn push_request(st: &mut State, key: ChannelKey, request: RequestId, callback: RpcCallback) {
    if let Some(record) = st.record_mut(key) {
        record.requests.push_back((request, callback));
    }
}

/// A completion closure of a request whose reply is the method `T`.
fn typed_callback<T: TryFrom<Method, Error = Method> + 'static>(
    callback: impl FnOnce(&Channel, Result<T, Error>) + 'static,
) -> RpcCallback {
    Box::new(move |ch, reply| {
        callback(
            ch,
            reply.and_then(|r| match r {
                Reply::Method(m) => typed(m),
                Reply::Get(_) => Err(Error::UnexpectedFrame {
                    detail: "Basic.GetOk is not the reply this request expects".into(),
                }),
            }),
        )
    })
}

/// Converts a reply to the type its request expects. The core only hands
/// a request one of its declared replies, so the error is for a broken
/// invariant, reported rather than panicked on.
fn typed<T: TryFrom<Method, Error = Method>>(method: Method) -> Result<T, Error> {
    T::try_from(method).map_err(|other| Error::UnexpectedFrame {
        detail: format!("{} is not the reply this request expects", other.name()),
    })
}

impl Channel {
    pub(super) fn new(conn: WeakShared, key: ChannelKey) -> Channel {
        Channel { conn, key }
    }

    /// The channel's number, 1 to the negotiated channel_max.
    pub fn channel_number(&self) -> u16 {
        self.key.number
    }

    /// The channel's state.
    pub fn state(&self) -> ChannelState {
        self.conn
            .upgrade()
            .and_then(|shared| {
                shared
                    .state
                    .borrow()
                    .core()
                    .map(|c| c.channel_phase(self.key))
            })
            .unwrap_or(ChannelState::Closed)
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.state() == ChannelState::Open
    }

    /// Whether the channel is opening (Channel.Open sent, no OpenOk yet).
    pub fn is_opening(&self) -> bool {
        self.state() == ChannelState::Opening
    }

    /// Whether the channel is closing.
    pub fn is_closing(&self) -> bool {
        self.state() == ChannelState::Closing
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.state() == ChannelState::Closed
    }

    /// The connection this channel belongs to. A channel keeps only a weak
    /// link to it: once the connection is gone (its loop dropped it after
    /// closing), this is an error.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the connection no longer exists.
    pub fn connection(&self) -> Result<SelectConnection, Error> {
        upgrade(&self.conn).ok_or_else(|| Error::ChannelWrongState {
            detail: format!(
                "channel {} has no connection any more (it was dropped)",
                self.key.number
            ),
        })
    }

    /// A `Send` handle that acks, nacks or rejects `delivery` from any
    /// thread (pika's threaded-ack pattern, in one line): the settle is
    /// sent on the connection's loop thread, and refused with an error —
    /// never sent to the wrong place — when this channel or its connection
    /// is gone by then.
    ///
    /// ```no_run
    /// # fn demo(channel: &pika::Channel, delivery: pika::Delivery) {
    /// let ack = channel.ack_handle(&delivery);
    /// std::thread::spawn(move || {
    ///     // ... the work ...
    ///     if let Err(e) = ack.ack() {
    ///         eprintln!("not acked: {e}");
    ///     }
    /// });
    /// # }
    /// ```
    pub fn ack_handle(&self, delivery: &Delivery) -> AckHandle {
        let door: std::sync::Arc<dyn crate::ack::Door> = match upgrade(&self.conn) {
            Some(conn) => conn.door(),
            None => std::sync::Arc::new(crate::ack::ClosedDoor),
        };
        AckHandle::new(door, self.key, delivery.epoch, delivery.method.delivery_tag)
    }

    /// The tags of this channel's active consumers (pika's
    /// `consumer_tags`).
    pub fn consumer_tags(&self) -> Vec<String> {
        self.read(|core| core.consumer_tags(self.key))
            .unwrap_or_default()
    }

    /// Whether the channel is in confirm mode.
    pub fn is_confirm_mode(&self) -> bool {
        self.read(|core| core.is_confirm_mode(self.key))
            .unwrap_or(false)
    }

    /// The delivery tags published in confirm mode and not yet acked,
    /// nacked or failed, in order.
    pub fn unconfirmed_delivery_tags(&self) -> Vec<u64> {
        self.read(|core| core.unconfirmed_delivery_tags(self.key))
            .unwrap_or_default()
    }

    fn read<R>(&self, f: impl FnOnce(&protocol::Connection) -> R) -> Option<R> {
        let shared = self.conn.upgrade()?;
        let st = shared.state.borrow();
        st.core().map(f)
    }

    /// Runs a command on the connection's state (one borrow), then what the
    /// command needs from the driver.
    fn command<R>(&self, f: impl FnOnce(&mut State) -> Result<R, Error>) -> Result<R, Error> {
        let conn = upgrade(&self.conn).ok_or_else(|| Error::ChannelWrongState {
            detail: format!(
                "channel {} is Closed (its connection is gone)",
                self.key.number
            ),
        })?;
        let mut st = conn.shared.state.borrow_mut();
        let result = f(&mut st)?;
        conn.after_command_locked(&mut st);
        Ok(result)
    }

    /// Stores a closure on the channel's record, unless the channel is
    /// closed (then it is dropped uncalled).
    fn on_record(&self, f: impl FnOnce(&mut super::ChannelRecord)) {
        if let Some(shared) = self.conn.upgrade() {
            if let Some(record) = shared.state.borrow_mut().record_mut(self.key) {
                f(record);
            }
        }
    }

    // ------------------------------------------------------------------
    // Callbacks
    // ------------------------------------------------------------------

    /// Adds a callback called once when the channel closes, with the reason:
    /// [`Error::ChannelClosedByBroker`], [`Error::ChannelClosedByClient`],
    /// or the connection's error when the connection went away. On a closed
    /// channel the callback is dropped uncalled.
    pub fn add_on_close_callback(&self, callback: impl FnOnce(&Channel, Error) + 'static) {
        self.on_record(|r| r.on_close.push(Box::new(callback)));
    }

    /// Adds a callback called when the broker cancels one of this
    /// channel's consumers (Basic.Cancel from the broker, e.g. because its
    /// queue was deleted). The consumer is forgotten before the call. On a
    /// closed channel the callback is dropped uncalled.
    pub fn add_on_cancel_callback(&self, callback: impl FnMut(&Channel, &basic::Cancel) + 'static) {
        self.on_record(|r| r.on_cancel.push(Box::new(callback)));
    }

    /// Adds a callback called with each message the broker returns
    /// (Basic.Return: a mandatory message with no route). In confirm mode
    /// the return arrives before the message's ack. On a closed channel the
    /// callback is dropped uncalled.
    pub fn add_on_return_callback(
        &self,
        callback: impl FnMut(&Channel, &ReturnedMessage) + 'static,
    ) {
        self.on_record(|r| r.on_return.push(Box::new(callback)));
    }

    /// Adds a callback called when the broker sends Channel.Flow (RabbitMQ
    /// does not: it uses TCP back-pressure and Connection.Blocked). On a
    /// closed channel the callback is dropped uncalled.
    pub fn add_on_flow_callback(&self, callback: impl FnMut(&Channel, bool) + 'static) {
        self.on_record(|r| r.on_flow.push(Box::new(callback)));
    }

    /// pika's generic hook: `callback` is called with each method in
    /// `replies` that arrives on this channel (once, with `one_shot`),
    /// before its normal handling.
    pub fn add_callback(
        &self,
        replies: &[MethodId],
        one_shot: bool,
        callback: impl FnMut(&Channel, &Method) + 'static,
    ) {
        let Some(shared) = self.conn.upgrade() else {
            return;
        };
        let mut st = shared.state.borrow_mut();
        let st = &mut *st;
        let Some(record) = st.record_mut(self.key) else {
            return;
        };
        record.generic.push(GenericCallback {
            replies: replies.to_vec(),
            one_shot,
            callback: Some(Box::new(callback)),
        });
        let watched: Vec<MethodId> = record
            .generic
            .iter()
            .flat_map(|g| g.replies.iter().copied())
            .collect();
        if let Some(core) = st.core_mut() {
            core.watch_methods(self.key, watched);
        }
    }

    // ------------------------------------------------------------------
    // Requests
    // ------------------------------------------------------------------

    /// A synchronous request with a typed reply.
    fn rpc<T: TryFrom<Method, Error = Method> + 'static>(
        &self,
        method: Method,
        callback: impl FnOnce(&Channel, Result<T, Error>) + 'static,
    ) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| {
            let request = core_of(st, key, method.name())?.rpc(key, method)?;
            push_request(st, key, request, typed_callback(callback));
            Ok(())
        })
    }

    /// A request sent with `nowait` (no reply, no closure).
    fn nowait(&self, method: Method) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| core_of(st, key, method.name())?.nowait(key, method))
    }

    // ------------------------------------------------------------------
    // Exchange
    // ------------------------------------------------------------------

    /// Declares an exchange (pika's `exchange_declare`); `callback` gets
    /// Exchange.DeclareOk, or the error that closed the channel (e.g. 404
    /// for a passive declare of a missing exchange, 406 for a redeclare
    /// with other options). An unknown exchange type is a connection error
    /// (503) from RabbitMQ.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open,
    /// [`Error::Encode`] for a name over 255 bytes; nothing is sent.
    pub fn exchange_declare(
        &self,
        exchange: &str,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<exchange::DeclareOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(
            exchange_declare(exchange, options, arguments, false),
            callback,
        )
    }

    /// [`Channel::exchange_declare`] with `nowait`: no reply is awaited.
    ///
    /// # Errors
    /// As [`Channel::exchange_declare`].
    pub fn exchange_declare_nowait(
        &self,
        exchange: &str,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(exchange_declare(exchange, options, arguments, true))
    }

    /// Deletes an exchange.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_delete(
        &self,
        exchange: &str,
        if_unused: bool,
        callback: impl FnOnce(&Channel, Result<exchange::DeleteOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(exchange_delete(exchange, if_unused, false), callback)
    }

    /// [`Channel::exchange_delete`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_delete_nowait(&self, exchange: &str, if_unused: bool) -> Result<(), Error> {
        self.nowait(exchange_delete(exchange, if_unused, true))
    }

    /// Binds exchange `destination` to exchange `source` (RabbitMQ
    /// extension).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<exchange::BindOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(
            exchange_bind(destination, source, routing_key, arguments, false),
            callback,
        )
    }

    /// [`Channel::exchange_bind`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_bind_nowait(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(exchange_bind(
            destination,
            source,
            routing_key,
            arguments,
            true,
        ))
    }

    /// Removes an exchange-to-exchange binding.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_unbind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<exchange::UnbindOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(
            exchange_unbind(destination, source, routing_key, arguments, false),
            callback,
        )
    }

    /// [`Channel::exchange_unbind`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn exchange_unbind_nowait(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(exchange_unbind(
            destination,
            source,
            routing_key,
            arguments,
            true,
        ))
    }

    // ------------------------------------------------------------------
    // Queue
    // ------------------------------------------------------------------

    /// Declares a queue; an empty name asks the broker to name it, and the
    /// name comes back in the reply's `queue`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<queue::DeclareOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(queue_declare(queue, options, arguments, false), callback)
    }

    /// [`Channel::queue_declare`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_declare_nowait(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(queue_declare(queue, options, arguments, true))
    }

    /// Binds a queue to an exchange. A `routing_key` of `None` binds with
    /// the queue's name, as pika does; `Some("")` binds with the empty key.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: Option<&str>,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<queue::BindOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(
            queue_bind(queue, exchange, routing_key, arguments, false),
            callback,
        )
    }

    /// [`Channel::queue_bind`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_bind_nowait(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: Option<&str>,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(queue_bind(queue, exchange, routing_key, arguments, true))
    }

    /// Removes a queue binding (the protocol has no nowait form). A
    /// `routing_key` of `None` is the queue's name, as in
    /// [`Channel::queue_bind`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: Option<&str>,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<queue::UnbindOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let m = queue::Unbind {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.unwrap_or(queue).into(),
            arguments,
            ..Default::default()
        };
        self.rpc(m.into(), callback)
    }

    /// Removes every ready message from a queue; the reply counts them.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_purge(
        &self,
        queue: &str,
        callback: impl FnOnce(&Channel, Result<queue::PurgeOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let m = queue::Purge {
            queue: queue.into(),
            ..Default::default()
        };
        self.rpc(m.into(), callback)
    }

    /// [`Channel::queue_purge`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_purge_nowait(&self, queue: &str) -> Result<(), Error> {
        let m = queue::Purge {
            queue: queue.into(),
            nowait: true,
            ..Default::default()
        };
        self.nowait(m.into())
    }

    /// Deletes a queue; the reply counts the messages deleted with it.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_delete(
        &self,
        queue: &str,
        options: QueueDeleteOptions,
        callback: impl FnOnce(&Channel, Result<queue::DeleteOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(queue_delete(queue, options, false), callback)
    }

    /// [`Channel::queue_delete`] with `nowait`.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_delete_nowait(
        &self,
        queue: &str,
        options: QueueDeleteOptions,
    ) -> Result<(), Error> {
        self.nowait(queue_delete(queue, options, true))
    }

    // ------------------------------------------------------------------
    // Basic
    // ------------------------------------------------------------------

    /// Sets the prefetch window.
    ///
    /// RabbitMQ does not implement `prefetch_size`: a non-zero value makes
    /// it close the *connection* with 540 NOT_IMPLEMENTED.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn basic_qos(
        &self,
        prefetch_size: u32,
        prefetch_count: u16,
        global_qos: bool,
        callback: impl FnOnce(&Channel, Result<basic::QosOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let m = basic::Qos {
            prefetch_size,
            prefetch_count,
            global_qos,
        };
        self.rpc(m.into(), callback)
    }

    /// pika's `basic_qos(prefetch_count=n)`: at most `prefetch_count`
    /// unacknowledged deliveries on this channel's consumers (0: no
    /// limit); `callback` gets Basic.QosOk.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn basic_prefetch(
        &self,
        prefetch_count: u16,
        callback: impl FnOnce(&Channel, Result<basic::QosOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.basic_qos(0, prefetch_count, false, callback)
    }

    /// Starts a consumer on `queue`; `on_message` is called with each
    /// delivery, in order. Returns the consumer tag (the given one, or one
    /// generated unique on the connection). `callback` gets Basic.ConsumeOk,
    /// or the error that closed the channel (e.g. 404 for a missing queue),
    /// in which case the consumer is forgotten.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::DuplicateConsumerTag`] when
    /// the tag is in use on this channel; [`Error::Encode`] for names over
    /// 255 bytes. Nothing is sent then.
    pub fn basic_consume(
        &self,
        queue: &str,
        on_message: impl FnMut(&Channel, Delivery) + 'static,
        options: BasicConsumeOptions,
        callback: impl FnOnce(&Channel, Result<basic::ConsumeOk, Error>) + 'static,
    ) -> Result<String, Error> {
        let m = basic::Consume {
            queue: queue.into(),
            consumer_tag: options.consumer_tag.unwrap_or_default(),
            no_ack: options.auto_ack,
            exclusive: options.exclusive,
            arguments: options.arguments,
            ..Default::default()
        };
        let key = self.key;
        let tag = self.command(|st| {
            let core = core_of(st, key, "basic_consume")?;
            let (request, consumer, tag) = core.consume(key, m)?;
            if let Some(record) = st.record_mut(key) {
                record.consumers.push(ConsumerEntry {
                    id: consumer,
                    on_message: Some(Box::new(on_message)),
                });
                record
                    .requests
                    .push_back((request, typed_callback(callback)));
            }
            Ok(tag)
        })?;
        Ok(tag)
    }

    /// Cancels a consumer; `callback` gets Basic.CancelOk. Deliveries that
    /// arrive for it before the CancelOk are rejected back to the queue
    /// (unless it auto-acks).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::InvalidParameter`] naming
    /// `consumer_tag` when no such consumer is active on this channel.
    pub fn basic_cancel(
        &self,
        consumer_tag: &str,
        callback: impl FnOnce(&Channel, Result<basic::CancelOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| {
            let request = core_of(st, key, "basic_cancel")?.cancel(key, consumer_tag)?;
            push_request(st, key, request, typed_callback(callback));
            Ok(())
        })
    }

    /// [`Channel::basic_cancel`] with `nowait`: the consumer is forgotten at
    /// once.
    ///
    /// # Errors
    /// As [`Channel::basic_cancel`].
    pub fn basic_cancel_nowait(&self, consumer_tag: &str) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| core_of(st, key, "basic_cancel")?.cancel_nowait(key, consumer_tag))
    }

    /// Fetches one message: `callback` gets `Some(message)`, or `None` when
    /// the queue was empty (Basic.GetEmpty).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::DuplicateGetOkCallback`] when
    /// a get is already waiting for its reply on this channel.
    pub fn basic_get(
        &self,
        queue: &str,
        auto_ack: bool,
        callback: impl FnOnce(&Channel, Result<Option<GetMessage>, Error>) + 'static,
    ) -> Result<(), Error> {
        let m = basic::Get {
            queue: queue.into(),
            no_ack: auto_ack,
            ..Default::default()
        };
        let key = self.key;
        self.command(|st| {
            let request = core_of(st, key, "basic_get")?.get(key, m)?;
            let cb: RpcCallback = Box::new(move |ch, reply| {
                callback(
                    ch,
                    reply.map(|r| match r {
                        Reply::Get(message) => message.map(|m| *m),
                        Reply::Method(_) => None,
                    }),
                )
            });
            push_request(st, key, request, cb);
            Ok(())
        })
    }

    /// Publishes a message: Basic.Publish, its content header and its body
    /// split into frames of at most frame_max. In confirm mode returns the
    /// message's delivery tag (counted from 1 on this channel); its fate
    /// reaches the `on_ack_nack` callback of [`Channel::confirm_delivery`].
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open;
    /// [`Error::Encode`] for a name over 255 bytes or a content header over
    /// frame_max. Nothing is sent then.
    pub fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl AsRef<[u8]>,
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<Option<u64>, Error> {
        let body = body.as_ref();
        let key = self.key;
        self.command(|st| {
            core_of(st, key, "basic_publish")?.publish(
                key,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
            )
        })
    }

    /// Acknowledges one message, or with `multiple` every message up to and
    /// including `delivery_tag`. An unknown tag makes the broker close the
    /// channel with 406.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open.
    pub fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| core_of(st, key, "basic_ack")?.ack(key, delivery_tag, multiple, None))
    }

    /// Rejects one or more messages (RabbitMQ extension), requeueing them
    /// unless `requeue` is false.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open.
    pub fn basic_nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| {
            core_of(st, key, "basic_nack")?.nack(key, delivery_tag, multiple, requeue, None)
        })
    }

    /// Rejects one message, requeueing it unless `requeue` is false.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open.
    pub fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| {
            core_of(st, key, "basic_reject")?.reject(key, delivery_tag, requeue, None)
        })
    }

    /// Asks the broker to redeliver every unacknowledged message.
    ///
    /// RabbitMQ implements only `requeue = true`; `false` makes it close
    /// the *connection* with 540 NOT_IMPLEMENTED.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn basic_recover(
        &self,
        requeue: bool,
        callback: impl FnOnce(&Channel, Result<basic::RecoverOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(basic::Recover { requeue }.into(), callback)
    }

    /// Puts the channel in confirm mode. Every later publish is confirmed
    /// through `on_ack_nack`: acked, nacked (each with `multiple` as the
    /// broker sent it), or [`Confirmation::Failed`] for each message still
    /// unconfirmed when the channel closes — before the close callbacks.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`]; [`Error::InvalidParameter`] when the
    /// channel is already in confirm mode.
    pub fn confirm_delivery(
        &self,
        on_ack_nack: impl FnMut(&Channel, Confirmation) + 'static,
        callback: impl FnOnce(&Channel, Result<confirm::SelectOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| {
            let request = core_of(st, key, "confirm_delivery")?.confirm_select(key)?;
            if let Some(record) = st.record_mut(key) {
                record.on_ack_nack = Some(Box::new(on_ack_nack));
            }
            push_request(st, key, request, typed_callback(callback));
            Ok(())
        })
    }

    /// Selects standard transactions on the channel.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn tx_select(
        &self,
        callback: impl FnOnce(&Channel, Result<tx::SelectOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(tx::Select {}.into(), callback)
    }

    /// Commits the current transaction.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn tx_commit(
        &self,
        callback: impl FnOnce(&Channel, Result<tx::CommitOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(tx::Commit {}.into(), callback)
    }

    /// Rolls back the current transaction.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn tx_rollback(
        &self,
        callback: impl FnOnce(&Channel, Result<tx::RollbackOk, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(tx::Rollback {}.into(), callback)
    }

    /// Asks the broker to pause (`false`) or resume (`true`) deliveries on
    /// this channel; `callback` gets the state the broker confirmed.
    ///
    /// RabbitMQ does not implement `flow(false)`: it closes the
    /// *connection* with 540 NOT_IMPLEMENTED. Use `basic_qos` instead.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`].
    pub fn flow(
        &self,
        active: bool,
        callback: impl FnOnce(&Channel, Result<bool, Error>) + 'static,
    ) -> Result<(), Error> {
        self.rpc(channel::Flow { active }.into(), move |ch, r| {
            callback(ch, r.map(|ok: channel::FlowOk| ok.active))
        })
    }

    // ------------------------------------------------------------------
    // Close
    // ------------------------------------------------------------------

    /// Closes the channel: cancels its consumers, then sends Channel.Close
    /// and, once the broker's CloseOk arrives, calls the close callbacks
    /// with [`Error::ChannelClosedByClient`]. As in pika, Channel.Close is
    /// queued behind the requests already pending on the channel (a cancel
    /// or a declare in flight, and those waiting behind it): each completes
    /// with its reply first, then the Close goes out at once. Closing while
    /// the channel is still opening suppresses its OpenOk (the open
    /// callback gets the close reason). A reply text over 255 bytes is cut
    /// at a character boundary.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is already closing or
    /// closed; nothing is sent then.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let key = self.key;
        self.command(|st| core_of(st, key, "close it")?.close_channel(key, reply_code, reply_text))
    }
}
