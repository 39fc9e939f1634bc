//! [`Channel`]: one AMQP channel of a [`SelectConnection`] — every
//! operation of pika's `Channel` with its completion closure, the
//! per-channel RPC queue, consumers, publisher confirms, returns, content
//! assembly, and the channel's states (OPENING, OPEN, CLOSING, CLOSED).
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
//! reordered with those. Methods the broker sends on its own (Deliver,
//! Return, Cancel, Ack/Nack, Flow, Close) reach the callbacks in wire order
//! with the replies.
//!
//! # Every closure fires once
//!
//! A completion closure accepted by a call runs exactly once: with the
//! reply, or with the error that closed the channel (the broker's
//! Channel.Close, our close, or the connection's end). Errors the call can
//! know at once (wrong state, a name over 255 bytes) are returned by the
//! call, and then the closure is dropped uncalled.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::rc::{Rc, Weak};

use crate::connection::{Deferred, SelectConnection, Shared as ConnectionShared};
use crate::error::Error;
use crate::frame::ContentHeader;
use crate::spec::{
    BasicProperties, Method, MethodDef, MethodId, PropertiesError, basic, channel, confirm,
    exchange, queue, tx,
};
use crate::table::FieldTable;

pub use crate::message::{Confirmation, Delivery, GetMessage, ReturnedMessage};
pub use crate::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use crate::options::{
    exchange_bind, exchange_declare, exchange_delete, exchange_unbind, queue_bind, queue_declare,
    queue_delete,
};

/// The states of a channel, as pika names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Channel.Open sent, OpenOk not yet received.
    Opening,
    /// Open: operations are accepted.
    Open,
    /// Closing: consumers being cancelled, or Channel.Close sent and its
    /// CloseOk not yet received.
    Closing,
    /// Closed; the channel object can no longer be used.
    Closed,
}

/// A reply to a synchronous request, with content for Basic.GetOk.
pub(crate) struct RpcReply {
    method: Method,
    content: Option<(BasicProperties, Vec<u8>, Option<PropertiesError>)>,
}

/// A completion closure of a synchronous channel method, given the reply.
pub(crate) type RpcCallback = Box<dyn FnOnce(&Channel, Result<RpcReply, Error>)>;
type OnChannelOpen = Box<dyn FnOnce(Result<Channel, Error>)>;

/// How many nowait-cancelled consumer tags a channel remembers.
const RECENTLY_CANCELLED: usize = 64;
type OnChannelClose = Box<dyn FnOnce(&Channel, Error)>;
type OnMessage = Rc<RefCell<dyn FnMut(&Channel, Delivery)>>;
type OnAckNack = Rc<RefCell<dyn FnMut(&Channel, Confirmation)>>;
type OnCancel = Box<dyn FnMut(&Channel, &basic::Cancel)>;
type OnReturn = Box<dyn FnMut(&Channel, &ReturnedMessage)>;
type OnFlow = Box<dyn FnMut(&Channel, bool)>;
type OnMethod = Box<dyn FnMut(&Channel, &Method)>;

/// A request queued on the channel: an encoded method frame, and what
/// answers it (nothing, for nowait and asynchronous methods).
struct PendingRpc {
    frame: Vec<u8>,
    name: &'static str,
    replies: &'static [MethodId],
    callback: Option<RpcCallback>,
    sent: bool,
    /// An asynchronous method (ack, nack, reject, publish): it may go out
    /// while a request waits for its reply. Requests, nowait ones too, wait
    /// for the request in flight, as in pika (RabbitMQ itself misbehaves on
    /// a nowait Basic.Cancel sent before the ConsumeOk of its consumer).
    asynchronous: bool,
}

struct Consumer {
    on_message: OnMessage,
    no_ack: bool,
    /// Basic.Cancel sent; deliveries until CancelOk are rejected (requeued)
    /// unless auto-acked.
    cancelled: bool,
}

struct ConfirmState {
    next_tag: u64,
    /// Unconfirmed delivery tags, ascending (tags only grow).
    unconfirmed: VecDeque<u64>,
    on_ack_nack: OnAckNack,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ContentKind {
    Deliver,
    Return,
    GetOk,
}

/// A content-carrying method whose header and body are arriving.
struct PendingContent {
    method: Method,
    kind: ContentKind,
    header: Option<(BasicProperties, u64)>,
    properties_error: Option<PropertiesError>,
    body: Vec<u8>,
}

struct GenericCallback {
    replies: Vec<MethodId>,
    one_shot: bool,
    callback: RefCell<Option<OnMethod>>,
}

pub(crate) struct ChannelInner {
    pub(crate) state: ChannelState,
    on_open: Option<OnChannelOpen>,
    on_close: Vec<OnChannelClose>,
    on_cancel: Vec<OnCancel>,
    on_return: Vec<OnReturn>,
    on_flow: Vec<OnFlow>,
    generic: Vec<Rc<GenericCallback>>,
    rpcs: VecDeque<PendingRpc>,
    consumers: HashMap<String, Consumer>,
    /// Consumers cancelled with nowait, with their `no_ack`: deliveries
    /// that crossed the cancel are rejected (requeued) unless auto-acked.
    recently_cancelled: VecDeque<(String, bool)>,
    confirm: Option<ConfirmState>,
    content: Option<PendingContent>,
    get_pending: bool,
    /// Why the channel is closing or closed (our close's code and text).
    close_reason: Option<Error>,
    /// Our Channel.Close has been sent.
    close_sent: bool,
    /// Set when the broker closed the channel while our own Channel.Close
    /// was waiting for its CloseOk: the number stays reserved until then.
    broker_close: Option<Error>,
}

/// Shared state behind [`Channel`] handles.
pub(crate) struct ChannelShared {
    number: u16,
    connection: Weak<ConnectionShared>,
    pub(crate) inner: RefCell<ChannelInner>,
}

/// An AMQP channel: a cheap `Clone` handle, `!Send`, used from the loop's
/// thread. Obtained from [`SelectConnection::channel`].
#[derive(Clone)]
pub struct Channel {
    shared: Rc<ChannelShared>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("number", &self.shared.number)
            .field("state", &self.shared.inner.borrow().state)
            .finish()
    }
}

fn wrong_state(number: u16, state: ChannelState, what: &str) -> Error {
    Error::ChannelWrongState {
        detail: format!("channel {number} is {state:?}, cannot {what}"),
    }
}

impl Channel {
    pub(crate) fn new_opening(
        number: u16,
        connection: Weak<ConnectionShared>,
        on_open: Box<dyn FnOnce(Result<Channel, Error>)>,
    ) -> Channel {
        Channel {
            shared: Rc::new(ChannelShared {
                number,
                connection,
                inner: RefCell::new(ChannelInner {
                    state: ChannelState::Opening,
                    on_open: Some(on_open),
                    on_close: Vec::new(),
                    on_cancel: Vec::new(),
                    on_return: Vec::new(),
                    on_flow: Vec::new(),
                    generic: Vec::new(),
                    rpcs: VecDeque::new(),
                    consumers: HashMap::new(),
                    recently_cancelled: VecDeque::new(),
                    confirm: None,
                    content: None,
                    get_pending: false,
                    close_reason: None,
                    close_sent: false,
                    broker_close: None,
                }),
            }),
        }
    }

    /// Drops the open callback uncalled (the call that opened the channel
    /// is reporting the error itself).
    pub(crate) fn forget_open_callback(&self) {
        self.shared.inner.borrow_mut().on_open = None;
    }

    /// The channel's number, 1 to the negotiated channel_max.
    pub fn channel_number(&self) -> u16 {
        self.shared.number
    }

    /// The channel's state.
    pub fn state(&self) -> ChannelState {
        self.shared.inner.borrow().state
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

    /// The connection this channel belongs to, while it exists.
    pub fn connection(&self) -> Option<SelectConnection> {
        self.shared
            .connection
            .upgrade()
            .map(SelectConnection::from_shared)
    }

    /// The tags of this channel's active consumers (pika's
    /// `consumer_tags`).
    pub fn consumer_tags(&self) -> Vec<String> {
        let inner = self.shared.inner.borrow();
        let mut tags: Vec<String> = inner
            .consumers
            .iter()
            .filter(|(_, c)| !c.cancelled)
            .map(|(t, _)| t.clone())
            .collect();
        tags.sort();
        tags
    }

    /// Whether the channel is in confirm mode.
    pub fn is_confirm_mode(&self) -> bool {
        self.shared.inner.borrow().confirm.is_some()
    }

    /// The delivery tags published in confirm mode and not yet acked,
    /// nacked or failed, in order.
    pub fn unconfirmed_delivery_tags(&self) -> Vec<u64> {
        self.shared
            .inner
            .borrow()
            .confirm
            .as_ref()
            .map(|c| c.unconfirmed.iter().copied().collect())
            .unwrap_or_default()
    }

    // ------------------------------------------------------------------
    // Callbacks
    // ------------------------------------------------------------------

    /// Adds a callback called once when the channel closes, with the reason:
    /// [`Error::ChannelClosedByBroker`], [`Error::ChannelClosedByClient`],
    /// or the connection's error when the connection went away. On a closed
    /// channel the callback is dropped uncalled.
    pub fn add_on_close_callback(&self, callback: impl FnOnce(&Channel, Error) + 'static) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.on_close.push(Box::new(callback));
        }
    }

    /// Callbacks added to a closed channel (this one and the ones below) are
    /// dropped uncalled.
    ///
    /// Adds a callback called when the broker cancels one of this
    /// channel's consumers (Basic.Cancel from the broker, e.g. because its
    /// queue was deleted). The consumer is forgotten before the call.
    pub fn add_on_cancel_callback(&self, callback: impl FnMut(&Channel, &basic::Cancel) + 'static) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.on_cancel.push(Box::new(callback));
        }
    }

    /// Adds a callback called with each message the broker returns
    /// (Basic.Return: a mandatory message with no route). In confirm mode
    /// the return arrives before the message's ack.
    pub fn add_on_return_callback(
        &self,
        callback: impl FnMut(&Channel, &ReturnedMessage) + 'static,
    ) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.on_return.push(Box::new(callback));
        }
    }

    /// Adds a callback called when the broker sends Channel.Flow (RabbitMQ
    /// does not: it uses TCP back-pressure and Connection.Blocked).
    pub fn add_on_flow_callback(&self, callback: impl FnMut(&Channel, bool) + 'static) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.on_flow.push(Box::new(callback));
        }
    }

    /// pika's generic hook: `callback` is called with each method in
    /// `replies` that arrives on this channel (once, with `one_shot`), in
    /// addition to the normal handling.
    pub fn add_callback(
        &self,
        replies: &[MethodId],
        one_shot: bool,
        callback: impl FnMut(&Channel, &Method) + 'static,
    ) {
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            inner.generic.push(Rc::new(GenericCallback {
                replies: replies.to_vec(),
                one_shot,
                callback: RefCell::new(Some(Box::new(callback))),
            }));
        }
    }

    // ------------------------------------------------------------------
    // Sending
    // ------------------------------------------------------------------

    fn connection_or_err(&self) -> Result<SelectConnection, Error> {
        self.connection().ok_or_else(|| Error::ChannelWrongState {
            detail: "the connection is gone".into(),
        })
    }

    fn ensure_open(&self, what: &str) -> Result<(), Error> {
        let state = self.state();
        if state == ChannelState::Open {
            Ok(())
        } else {
            Err(wrong_state(self.shared.number, state, what))
        }
    }

    /// Queues a request. With a callback it waits for one of the method's
    /// replies before the next request goes out; without (nowait and
    /// asynchronous methods) it goes out in turn and needs no reply.
    fn enqueue(
        &self,
        method: Method,
        callback: Option<RpcCallback>,
        allow_closing: bool,
    ) -> Result<(), Error> {
        self.enqueue_item(method, callback, allow_closing, false)
    }

    fn enqueue_item(
        &self,
        method: Method,
        callback: Option<RpcCallback>,
        allow_closing: bool,
        asynchronous: bool,
    ) -> Result<(), Error> {
        let state = self.state();
        let allowed =
            state == ChannelState::Open || (allow_closing && state == ChannelState::Closing);
        if !allowed {
            return Err(wrong_state(self.shared.number, state, method.name()));
        }
        let conn = self.connection_or_err()?;
        let frame = conn.encode_frame(self.shared.number, &method)?;
        let replies = if callback.is_some() {
            method.replies()
        } else {
            &[]
        };
        self.shared.inner.borrow_mut().rpcs.push_back(PendingRpc {
            frame,
            name: method.name(),
            replies,
            callback,
            sent: false,
            asynchronous,
        });
        self.pump_rpcs();
        Ok(())
    }

    /// Sends queued requests until one is waiting for its reply.
    fn pump_rpcs(&self) {
        loop {
            let (frame, name) = {
                let mut inner = self.shared.inner.borrow_mut();
                // At most one request is in flight, at the front. Behind it,
                // asynchronous items (acks, publishes) go out at once; the
                // next request, nowait or not, waits for the reply.
                let idx = match inner.rpcs.front() {
                    Some(front) if front.sent => 1,
                    Some(_) => 0,
                    None => return,
                };
                let Some(item) = inner.rpcs.get_mut(idx) else {
                    return;
                };
                let is_request = !item.replies.is_empty();
                if idx == 1 && !item.asynchronous {
                    return;
                }
                item.sent = true;
                let frame = std::mem::take(&mut item.frame);
                let name = item.name;
                if !is_request {
                    inner.rpcs.remove(idx);
                }
                if name == <channel::Close as MethodDef>::NAME {
                    // From here on only Close and CloseOk matter.
                    inner.close_sent = true;
                }
                (frame, name)
            };
            match self.connection() {
                Some(conn) => {
                    if let Err(e) = conn.send_frame_bytes(&frame) {
                        log::debug!("channel {}: {name} not sent: {e}", self.shared.number);
                        return;
                    }
                }
                None => return,
            }
        }
    }

    /// A synchronous request with a typed reply.
    fn rpc<T: TryFrom<Method, Error = Method> + 'static>(
        &self,
        method: Method,
        callback: impl FnOnce(&Channel, Result<T, Error>) + 'static,
    ) -> Result<(), Error> {
        self.enqueue(
            method,
            Some(Box::new(move |ch, reply| {
                callback(ch, reply.and_then(|r| typed(r.method)))
            })),
            false,
        )
    }

    /// A request sent with `nowait` (no reply, no closure).
    fn nowait(&self, method: Method) -> Result<(), Error> {
        self.enqueue(method, None, false)
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

    /// Binds a queue to an exchange.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
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
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.nowait(queue_bind(queue, exchange, routing_key, arguments, true))
    }

    /// Removes a queue binding (the protocol has no nowait form).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`], [`Error::Encode`].
    pub fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        callback: impl FnOnce(&Channel, Result<queue::UnbindOk, Error>) + 'static,
    ) -> Result<(), Error> {
        let m = queue::Unbind {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
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
        self.ensure_open("basic_consume")?;
        let conn = self.connection_or_err()?;
        let tag = match options.consumer_tag {
            Some(tag) => tag,
            None => conn.next_consumer_tag(self.shared.number),
        };
        if self.shared.inner.borrow().consumers.contains_key(&tag) {
            return Err(Error::DuplicateConsumerTag { tag });
        }
        let m = basic::Consume {
            queue: queue.into(),
            consumer_tag: tag.clone(),
            no_ack: options.auto_ack,
            exclusive: options.exclusive,
            arguments: options.arguments,
            ..Default::default()
        };
        self.shared.inner.borrow_mut().consumers.insert(
            tag.clone(),
            Consumer {
                on_message: Rc::new(RefCell::new(on_message)),
                no_ack: options.auto_ack,
                cancelled: false,
            },
        );
        let tag_for_reply = tag.clone();
        let sent = self.enqueue(
            m.into(),
            Some(Box::new(
                move |ch: &Channel, reply: Result<RpcReply, Error>| {
                    let reply = reply.and_then(|r| typed::<basic::ConsumeOk>(r.method));
                    if reply.is_err() {
                        ch.shared
                            .inner
                            .borrow_mut()
                            .consumers
                            .remove(&tag_for_reply);
                    }
                    callback(ch, reply);
                },
            )),
            false,
        );
        if let Err(e) = sent {
            self.shared.inner.borrow_mut().consumers.remove(&tag);
            return Err(e);
        }
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
        self.cancel_consumer(consumer_tag, false, Some(Box::new(callback)))
    }

    /// [`Channel::basic_cancel`] with `nowait`: the consumer is forgotten at
    /// once.
    ///
    /// # Errors
    /// As [`Channel::basic_cancel`].
    pub fn basic_cancel_nowait(&self, consumer_tag: &str) -> Result<(), Error> {
        self.cancel_consumer(consumer_tag, false, None)
    }

    #[allow(clippy::type_complexity)]
    fn cancel_consumer(
        &self,
        consumer_tag: &str,
        allow_closing: bool,
        callback: Option<Box<dyn FnOnce(&Channel, Result<basic::CancelOk, Error>)>>,
    ) -> Result<(), Error> {
        let state = self.state();
        if !(state == ChannelState::Open || allow_closing && state == ChannelState::Closing) {
            return Err(wrong_state(self.shared.number, state, "basic_cancel"));
        }
        {
            let mut inner = self.shared.inner.borrow_mut();
            match inner.consumers.get_mut(consumer_tag) {
                Some(c) if !c.cancelled => c.cancelled = true,
                _ => {
                    return Err(Error::InvalidParameter {
                        name: "consumer_tag",
                        reason: format!(
                            "no active consumer {consumer_tag:?} on channel {}",
                            self.shared.number
                        ),
                    });
                }
            }
        }
        let tag = consumer_tag.to_string();
        let result = match callback {
            Some(cb) => {
                let m = basic::Cancel {
                    consumer_tag: tag.clone(),
                    nowait: false,
                };
                self.enqueue(
                    m.into(),
                    Some(Box::new(
                        move |ch: &Channel, reply: Result<RpcReply, Error>| {
                            ch.shared.inner.borrow_mut().consumers.remove(&tag);
                            cb(ch, reply.and_then(|r| typed(r.method)));
                        },
                    )),
                    allow_closing,
                )
            }
            None => {
                let m = basic::Cancel {
                    consumer_tag: tag.clone(),
                    nowait: true,
                };
                let r = self.enqueue(m.into(), None, allow_closing);
                let mut inner = self.shared.inner.borrow_mut();
                if let Some(c) = inner.consumers.remove(&tag) {
                    // Deliveries already on their way are rejected back to
                    // the queue; the last few such tags are remembered.
                    if inner.recently_cancelled.len() == RECENTLY_CANCELLED {
                        inner.recently_cancelled.pop_front();
                    }
                    inner.recently_cancelled.push_back((tag, c.no_ack));
                }
                r
            }
        };
        if result.is_err() {
            if let Some(c) = self
                .shared
                .inner
                .borrow_mut()
                .consumers
                .get_mut(consumer_tag)
            {
                c.cancelled = false;
            }
        }
        result
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
        self.ensure_open("basic_get")?;
        if self.shared.inner.borrow().get_pending {
            return Err(Error::DuplicateGetOkCallback);
        }
        let m = basic::Get {
            queue: queue.into(),
            no_ack: auto_ack,
            ..Default::default()
        };
        self.shared.inner.borrow_mut().get_pending = true;
        let result = self.enqueue(
            m.into(),
            Some(Box::new(
                move |ch: &Channel, reply: Result<RpcReply, Error>| {
                    ch.shared.inner.borrow_mut().get_pending = false;
                    let result = reply.map(|r| match (r.method, r.content) {
                        (
                            Method::BasicGetOk(method),
                            Some((properties, body, properties_error)),
                        ) => Some(GetMessage {
                            method,
                            properties,
                            body,
                            properties_error,
                        }),
                        _ => None,
                    });
                    callback(ch, result);
                },
            )),
            false,
        );
        if result.is_err() {
            self.shared.inner.borrow_mut().get_pending = false;
        }
        result
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
        body: &[u8],
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<Option<u64>, Error> {
        self.ensure_open("basic_publish")?;
        let conn = self.connection_or_err()?;
        // Behind a request not yet sent (a declare waiting for the one in
        // flight, a Confirm.Select), the message waits its turn too: sent
        // now, it would overtake the request it may depend on, and the
        // broker would not count it as confirmable.
        let behind_unsent = self.shared.inner.borrow().rpcs.iter().any(|r| !r.sent);
        if behind_unsent {
            let mut frames = Vec::new();
            crate::frame::encode_publish(
                &mut frames,
                self.shared.number,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
                conn.frame_max(),
            )?;
            self.shared.inner.borrow_mut().rpcs.push_back(PendingRpc {
                frame: frames,
                name: "Basic.Publish",
                replies: &[],
                callback: None,
                sent: false,
                asynchronous: true,
            });
            self.pump_rpcs();
        } else {
            conn.send_publish_on_channel(
                self.shared.number,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
            )?;
        }
        let mut inner = self.shared.inner.borrow_mut();
        Ok(inner.confirm.as_mut().map(|c| {
            let tag = c.next_tag;
            c.next_tag += 1;
            c.unconfirmed.push_back(tag);
            tag
        }))
    }

    /// Sends an asynchronous method (ack, nack, reject): at once, unless
    /// requests not yet sent are queued, then in turn behind them. A
    /// request waiting for its reply never holds it back.
    fn send_async(&self, method: Method, what: &str) -> Result<(), Error> {
        self.ensure_open(what)?;
        let queued = self.shared.inner.borrow().rpcs.iter().any(|r| !r.sent);
        if queued {
            self.enqueue_item(method, None, false, true)
        } else {
            self.send_method(method)
        }
    }

    /// Acknowledges one message, or with `multiple` every message up to and
    /// including `delivery_tag`. An unknown tag makes the broker close the
    /// channel with 406.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open.
    pub fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), Error> {
        self.send_async(
            basic::Ack {
                delivery_tag,
                multiple,
            }
            .into(),
            "basic_ack",
        )
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
        self.send_async(
            basic::Nack {
                delivery_tag,
                multiple,
                requeue,
            }
            .into(),
            "basic_nack",
        )
    }

    /// Rejects one message, requeueing it unless `requeue` is false.
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is not open.
    pub fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), Error> {
        self.send_async(
            basic::Reject {
                delivery_tag,
                requeue,
            }
            .into(),
            "basic_reject",
        )
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
        self.ensure_open("confirm_delivery")?;
        if self.is_confirm_mode() {
            return Err(Error::InvalidParameter {
                name: "confirm_delivery",
                reason: format!("channel {} is already in confirm mode", self.shared.number),
            });
        }
        self.rpc(confirm::Select { nowait: false }.into(), callback)?;
        // The broker counts publishes from the Select on: so do we.
        self.shared.inner.borrow_mut().confirm = Some(ConfirmState {
            next_tag: 1,
            unconfirmed: VecDeque::new(),
            on_ack_nack: Rc::new(RefCell::new(on_ack_nack)),
        });
        Ok(())
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
    /// callback gets the close reason).
    ///
    /// # Errors
    /// [`Error::ChannelWrongState`] when the channel is already closing or
    /// closed; nothing is sent then.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let (tags, close) = {
            let mut inner = self.shared.inner.borrow_mut();
            match inner.state {
                ChannelState::Closing | ChannelState::Closed => {
                    return Err(wrong_state(self.shared.number, inner.state, "close it"));
                }
                ChannelState::Opening | ChannelState::Open => {}
            }
            let was_open = inner.state == ChannelState::Open;
            inner.state = ChannelState::Closing;
            // A reply text is a short string: longer text is cut at 255
            // bytes (at a character boundary) rather than refused.
            let reply_text = crate::connection::truncate_short(reply_text);
            inner.close_reason = Some(Error::ChannelClosedByClient {
                reply_code,
                reply_text: reply_text.clone(),
            });
            let tags: Vec<String> = if was_open {
                inner
                    .consumers
                    .iter()
                    .filter(|(_, c)| !c.cancelled)
                    .map(|(t, _)| t.clone())
                    .collect()
            } else {
                Vec::new()
            };
            let close = channel::Close {
                reply_code,
                reply_text,
                class_id: 0,
                method_id: 0,
            };
            (tags, close)
        };
        for tag in tags {
            if let Err(e) = self.cancel_consumer(&tag, true, Some(Box::new(|_: &Channel, _| {}))) {
                log::debug!(
                    "channel {}: consumer {tag} not cancelled: {e}",
                    self.shared.number
                );
            }
        }
        // As in pika, Channel.Close is a request queued behind the ones
        // already pending (a cancel the user issued, the cancels above, a
        // declare in flight): each gets its reply, then the Close goes out.
        let conn = self.connection_or_err()?;
        let frame = conn.encode_frame(self.shared.number, &close.into())?;
        self.shared.inner.borrow_mut().rpcs.push_back(PendingRpc {
            frame,
            name: <channel::Close as MethodDef>::NAME,
            replies: <channel::Close as MethodDef>::REPLIES,
            callback: None,
            sent: false,
            asynchronous: false,
        });
        self.pump_rpcs();
        Ok(())
    }

    /// What this channel's close has done so far, for the log when the
    /// connection's close bound expires.
    pub(crate) fn close_progress(&self) -> String {
        let inner = self.shared.inner.borrow();
        let number = self.shared.number;
        if inner.close_sent {
            return format!("channel {number}: Channel.Close sent, no Channel.CloseOk");
        }
        let waiting: Vec<&str> = inner
            .rpcs
            .iter()
            .take_while(|r| r.name != <channel::Close as MethodDef>::NAME)
            .filter(|r| !r.replies.is_empty())
            .map(|r| r.name)
            .collect();
        match inner.rpcs.front() {
            Some(front) if front.sent && !waiting.is_empty() => format!(
                "channel {number}: Channel.Close not sent, queued behind {} (in flight, no \
                 reply){}",
                front.name,
                if waiting.len() > 1 {
                    format!(" and {} more", waiting.len() - 1)
                } else {
                    String::new()
                }
            ),
            _ => format!("channel {number}: Channel.Close not sent"),
        }
    }

    /// Sends a method on this channel now.
    pub(crate) fn send_method(&self, method: Method) -> Result<(), Error> {
        self.connection_or_err()?
            .send_on_channel(self.shared.number, &method)
    }

    // ------------------------------------------------------------------
    // Incoming
    // ------------------------------------------------------------------

    /// Whether frames for this channel should be discarded (our Close is
    /// out: only Close and CloseOk matter now).
    fn discarding(&self) -> bool {
        let inner = self.shared.inner.borrow();
        inner.state == ChannelState::Closed
            || (inner.state == ChannelState::Closing && inner.close_sent)
    }

    /// Handles a method the broker sent on this channel; returns the user
    /// callbacks to run once no borrow is held, or a connection-level error
    /// (505) for a frame out of sequence.
    pub(crate) fn handle_method(&self, method: Method) -> Result<Vec<Deferred>, Error> {
        let mut deferred: Vec<Deferred> = Vec::new();
        let number = self.shared.number;
        if self.shared.inner.borrow().content.is_some() {
            return Err(Error::UnexpectedFrame {
                detail: format!(
                    "{} on channel {number} while a message's content was arriving",
                    method.name()
                ),
            });
        }
        self.run_generic_callbacks(&method, &mut deferred);
        let state = self.state();
        match method {
            Method::ChannelOpenOk(_) if state == ChannelState::Opening => {
                let on_open = {
                    let mut inner = self.shared.inner.borrow_mut();
                    inner.state = ChannelState::Open;
                    inner.on_open.take()
                };
                if let Some(cb) = on_open {
                    let ch = self.clone();
                    deferred.push(Box::new(move |_| cb(Ok(ch))));
                }
            }
            Method::ChannelCloseOk(_) if state == ChannelState::Closing => {
                let reason = {
                    let inner = self.shared.inner.borrow();
                    inner
                        .broker_close
                        .clone()
                        .or_else(|| inner.close_reason.clone())
                        .unwrap_or(Error::ChannelClosedByClient {
                            reply_code: 200,
                            reply_text: "Normal shutdown".into(),
                        })
                };
                deferred.extend(self.finish_close(reason));
            }
            Method::ChannelClose(close) => {
                let reason = Error::ChannelClosedByBroker {
                    reply_code: close.reply_code,
                    reply_text: close.reply_text,
                };
                // Always answer the broker's close.
                if let Err(e) = self.send_method(channel::CloseOk {}.into()) {
                    log::debug!("channel {number}: CloseOk not sent: {e}");
                }
                let ours_pending = {
                    let inner = self.shared.inner.borrow();
                    inner.state == ChannelState::Closing && inner.close_sent
                };
                if ours_pending {
                    // Our Close is waiting for its CloseOk: report the
                    // broker's reason then, keep the number until then.
                    self.shared.inner.borrow_mut().broker_close = Some(reason);
                } else {
                    deferred.extend(self.finish_close(reason));
                }
            }
            other if self.discarding() => {
                log::debug!(
                    "channel {number}: discarding {} while closing",
                    other.name()
                );
            }
            Method::ChannelFlow(flow) => {
                if let Err(e) = self.send_method(
                    channel::FlowOk {
                        active: flow.active,
                    }
                    .into(),
                ) {
                    log::debug!("channel {number}: FlowOk not sent: {e}");
                }
                let ch = self.clone();
                deferred.push(Box::new(move |_| {
                    ch.run_callbacks(|i| &mut i.on_flow, |cb| cb(&ch, flow.active))
                }));
            }
            m @ (Method::BasicDeliver(_) | Method::BasicReturn(_) | Method::BasicGetOk(_)) => {
                let kind = match &m {
                    Method::BasicDeliver(_) => ContentKind::Deliver,
                    Method::BasicReturn(_) => ContentKind::Return,
                    _ => ContentKind::GetOk,
                };
                self.shared.inner.borrow_mut().content = Some(PendingContent {
                    method: m,
                    kind,
                    header: None,
                    properties_error: None,
                    body: Vec::new(),
                });
            }
            Method::BasicAck(ack) => {
                self.on_confirm(ack.delivery_tag, ack.multiple, true, &mut deferred)
            }
            Method::BasicNack(nack) => {
                self.on_confirm(nack.delivery_tag, nack.multiple, false, &mut deferred)
            }
            Method::BasicCancel(cancel)
                if !self.rpc_expects(&Method::BasicCancel(cancel.clone())) =>
            {
                self.on_broker_cancel(cancel, &mut deferred)
            }
            other => {
                let id = other.id();
                let matched = {
                    let mut inner = self.shared.inner.borrow_mut();
                    match inner.rpcs.front() {
                        Some(rpc) if rpc.sent && rpc.replies.contains(&id) => inner
                            .rpcs
                            .pop_front()
                            .and_then(|mut rpc| rpc.callback.take()),
                        _ => None,
                    }
                };
                match matched {
                    Some(cb) => {
                        let ch = self.clone();
                        deferred.push(Box::new(move |_| {
                            cb(
                                &ch,
                                Ok(RpcReply {
                                    method: other,
                                    content: None,
                                }),
                            )
                        }));
                        self.pump_rpcs();
                    }
                    None => {
                        return Err(Error::UnexpectedFrame {
                            detail: format!(
                                "{} on channel {number}, which is no reply to a request in \
                                 flight",
                                other.name()
                            ),
                        });
                    }
                }
            }
        }
        Ok(deferred)
    }

    /// Whether the request in flight is answered by `method` (a broker's
    /// Basic.Cancel is never a reply).
    fn rpc_expects(&self, method: &Method) -> bool {
        let id = method.id();
        self.shared
            .inner
            .borrow()
            .rpcs
            .front()
            .is_some_and(|r| r.sent && r.replies.contains(&id))
    }

    fn run_generic_callbacks(&self, method: &Method, deferred: &mut Vec<Deferred>) {
        let id = method.id();
        let hits: Vec<Rc<GenericCallback>> = {
            let mut inner = self.shared.inner.borrow_mut();
            let hits: Vec<_> = inner
                .generic
                .iter()
                .filter(|g| g.replies.contains(&id))
                .cloned()
                .collect();
            inner
                .generic
                .retain(|g| !(g.one_shot && g.replies.contains(&id)));
            hits
        };
        for hit in hits {
            let (ch, m) = (self.clone(), method.clone());
            deferred.push(Box::new(move |_| {
                let cb = hit.callback.borrow_mut().take();
                if let Some(mut cb) = cb {
                    cb(&ch, &m);
                    if !hit.one_shot {
                        *hit.callback.borrow_mut() = Some(cb);
                    }
                }
            }));
        }
    }

    fn on_confirm(&self, tag: u64, multiple: bool, ack: bool, deferred: &mut Vec<Deferred>) {
        let on_ack_nack = {
            let mut inner = self.shared.inner.borrow_mut();
            let Some(confirm) = inner.confirm.as_mut() else {
                log::warn!(
                    "channel {}: Basic.{} outside confirm mode ignored",
                    self.shared.number,
                    if ack { "Ack" } else { "Nack" }
                );
                return;
            };
            if multiple {
                while confirm.unconfirmed.front().is_some_and(|&t| t <= tag) {
                    confirm.unconfirmed.pop_front();
                }
            } else {
                if confirm.unconfirmed.front() == Some(&tag) {
                    confirm.unconfirmed.pop_front();
                } else if let Ok(i) = confirm.unconfirmed.binary_search(&tag) {
                    confirm.unconfirmed.remove(i);
                }
            }
            confirm.on_ack_nack.clone()
        };
        let ch = self.clone();
        let confirmation = if ack {
            Confirmation::Ack {
                delivery_tag: tag,
                multiple,
            }
        } else {
            Confirmation::Nack {
                delivery_tag: tag,
                multiple,
            }
        };
        deferred.push(Box::new(move |_| {
            (on_ack_nack.borrow_mut())(&ch, confirmation)
        }));
    }

    fn on_broker_cancel(&self, cancel: basic::Cancel, deferred: &mut Vec<Deferred>) {
        self.shared
            .inner
            .borrow_mut()
            .consumers
            .remove(&cancel.consumer_tag);
        if !cancel.nowait {
            let ok = basic::CancelOk {
                consumer_tag: cancel.consumer_tag.clone(),
            };
            if let Err(e) = self.send_method(ok.into()) {
                log::debug!("channel {}: CancelOk not sent: {e}", self.shared.number);
            }
        }
        let ch = self.clone();
        deferred.push(Box::new(move |_| {
            ch.run_callbacks(|i| &mut i.on_cancel, |cb| cb(&ch, &cancel))
        }));
    }

    /// Calls every callback of a repeating list with no borrow held, then
    /// puts the list back ahead of any added meanwhile — unless the channel
    /// closed meanwhile: then they are dropped.
    fn run_callbacks<T: ?Sized>(
        &self,
        list: fn(&mut ChannelInner) -> &mut Vec<Box<T>>,
        mut call: impl FnMut(&mut Box<T>),
    ) {
        let mut callbacks = std::mem::take(list(&mut self.shared.inner.borrow_mut()));
        for cb in callbacks.iter_mut() {
            call(cb);
        }
        let mut inner = self.shared.inner.borrow_mut();
        if inner.state != ChannelState::Closed {
            let added = list(&mut inner);
            callbacks.append(added);
            *added = callbacks;
        }
    }

    /// Handles a content header for the message whose method arrived last.
    pub(crate) fn handle_header(&self, header: ContentHeader) -> Result<Vec<Deferred>, Error> {
        let number = self.shared.number;
        {
            let mut inner = self.shared.inner.borrow_mut();
            // Computed under this borrow: `discarding()` would borrow again.
            let discarding = self.discarding_locked(&inner);
            match inner.content.as_mut() {
                Some(content) if content.header.is_none() => {
                    content.header = Some((header.properties, header.body_size));
                    content.properties_error = header.properties_error.map(|e| *e);
                    // Reserve what the header announces, bounded: a lying
                    // body_size (2^63) must not allocate.
                    let reserve = header.body_size.min(1 << 20) as usize;
                    content.body.reserve_exact(reserve);
                }
                Some(_) => {
                    return Err(Error::UnexpectedFrame {
                        detail: format!("a second content header on channel {number}"),
                    });
                }
                None if discarding => return Ok(Vec::new()),
                None => {
                    return Err(Error::UnexpectedFrame {
                        detail: format!("content header on channel {number} without a method"),
                    });
                }
            }
        }
        self.complete_content_if_done()
    }

    /// Handles a body frame: appends it to the message being assembled.
    pub(crate) fn handle_body(&self, payload: &[u8]) -> Result<Vec<Deferred>, Error> {
        let number = self.shared.number;
        {
            let mut inner = self.shared.inner.borrow_mut();
            let discarding = self.discarding_locked(&inner);
            match inner.content.as_mut() {
                Some(PendingContent {
                    header: Some((_, size)),
                    body,
                    ..
                }) => {
                    let total = body.len() as u64 + payload.len() as u64;
                    if total > *size {
                        return Err(Error::UnexpectedFrame {
                            detail: format!(
                                "body on channel {number} longer than its header's {size} bytes"
                            ),
                        });
                    }
                    body.extend_from_slice(payload);
                }
                _ if discarding => return Ok(Vec::new()),
                _ => {
                    return Err(Error::UnexpectedFrame {
                        detail: format!("body frame on channel {number} without a content header"),
                    });
                }
            }
        }
        self.complete_content_if_done()
    }

    fn discarding_locked(&self, inner: &ChannelInner) -> bool {
        inner.state == ChannelState::Closed
            || (inner.state == ChannelState::Closing && inner.close_sent && inner.content.is_none())
    }

    fn complete_content_if_done(&self) -> Result<Vec<Deferred>, Error> {
        let done = {
            let mut inner = self.shared.inner.borrow_mut();
            let complete = matches!(
                &inner.content,
                Some(PendingContent { header: Some((_, size)), body, .. }) if body.len() as u64 == *size
            );
            if complete { inner.content.take() } else { None }
        };
        let Some(content) = done else {
            return Ok(Vec::new());
        };
        let (properties, _) = content.header.unwrap_or_default();
        let body = content.body;
        let properties_error = content.properties_error;
        let mut deferred: Vec<Deferred> = Vec::new();
        if self.discarding() {
            return Ok(deferred);
        }
        if let Some(problem) = &properties_error {
            log::warn!(
                "channel {}: {} with unreadable properties, delivered with the raw bytes: {}",
                self.shared.number,
                content.method.name(),
                problem.error
            );
        }
        match (content.kind, content.method) {
            (ContentKind::Deliver, Method::BasicDeliver(method)) => {
                self.dispatch_delivery(
                    Delivery {
                        method,
                        properties,
                        body,
                        properties_error,
                        epoch: 0,
                    },
                    &mut deferred,
                );
            }
            (ContentKind::Return, Method::BasicReturn(method)) => {
                let returned = ReturnedMessage {
                    method,
                    properties,
                    body,
                    properties_error,
                };
                if self.shared.inner.borrow().on_return.is_empty() {
                    log::warn!(
                        "channel {}: message returned ({} {}) with no return callback",
                        self.shared.number,
                        returned.method.reply_code,
                        returned.method.reply_text
                    );
                }
                let ch = self.clone();
                deferred.push(Box::new(move |_| {
                    ch.run_callbacks(|i| &mut i.on_return, |cb| cb(&ch, &returned))
                }));
            }
            (ContentKind::GetOk, method) => {
                let cb = {
                    let mut inner = self.shared.inner.borrow_mut();
                    match inner.rpcs.front() {
                        Some(rpc) if rpc.sent && rpc.replies.contains(&method.id()) => {
                            inner.rpcs.pop_front().and_then(|mut r| r.callback.take())
                        }
                        _ => None,
                    }
                };
                match cb {
                    Some(cb) => {
                        let ch = self.clone();
                        deferred.push(Box::new(move |_| {
                            cb(
                                &ch,
                                Ok(RpcReply {
                                    method,
                                    content: Some((properties, body, properties_error)),
                                }),
                            )
                        }));
                        self.pump_rpcs();
                    }
                    None => log::warn!(
                        "channel {}: Basic.GetOk with no get waiting",
                        self.shared.number
                    ),
                }
            }
            (kind, method) => log::warn!(
                "channel {}: {kind:?} content for {}",
                self.shared.number,
                method.name()
            ),
        }
        Ok(deferred)
    }

    fn dispatch_delivery(&self, delivery: Delivery, deferred: &mut Vec<Deferred>) {
        let consumer = {
            let inner = self.shared.inner.borrow();
            inner
                .consumers
                .get(&delivery.method.consumer_tag)
                .map(|c| (c.on_message.clone(), c.cancelled, c.no_ack))
        };
        match consumer {
            Some((on_message, false, _)) => {
                let ch = self.clone();
                deferred.push(Box::new(move |_| (on_message.borrow_mut())(&ch, delivery)));
            }
            Some((_, true, no_ack)) => {
                if !no_ack {
                    let _ = self.basic_reject_internal(delivery.method.delivery_tag);
                }
            }
            None => {
                let no_ack = self
                    .shared
                    .inner
                    .borrow()
                    .recently_cancelled
                    .iter()
                    .find(|(t, _)| *t == delivery.method.consumer_tag)
                    .map(|(_, no_ack)| *no_ack);
                match no_ack {
                    Some(false) => {
                        let _ = self.basic_reject_internal(delivery.method.delivery_tag);
                    }
                    Some(true) => {}
                    None => log::warn!(
                        "channel {}: delivery for unknown consumer {:?} dropped",
                        self.shared.number,
                        delivery.method.consumer_tag
                    ),
                }
            }
        }
    }

    fn basic_reject_internal(&self, delivery_tag: u64) -> Result<(), Error> {
        self.send_method(
            basic::Reject {
                delivery_tag,
                requeue: true,
            }
            .into(),
        )
    }

    /// Marks the channel closed with `reason`: fails its open callback, its
    /// pending requests and its unconfirmed publishes, releases its number,
    /// and returns the callbacks to run (close callbacks last). Stored
    /// closures are dropped.
    pub(crate) fn finish_close(&self, reason: Error) -> Vec<Deferred> {
        let (on_open, rpcs, on_close, confirm) = {
            let mut inner = self.shared.inner.borrow_mut();
            if inner.state == ChannelState::Closed {
                return Vec::new();
            }
            inner.state = ChannelState::Closed;
            inner.close_reason = Some(reason.clone());
            inner.consumers.clear();
            inner.recently_cancelled.clear();
            inner.content = None;
            inner.on_cancel.clear();
            inner.on_return.clear();
            inner.on_flow.clear();
            inner.generic.clear();
            (
                inner.on_open.take(),
                std::mem::take(&mut inner.rpcs),
                std::mem::take(&mut inner.on_close),
                inner.confirm.take(),
            )
        };
        if let Some(conn) = self.shared.connection.upgrade() {
            SelectConnection::from_shared(conn).release_channel(self.shared.number);
        }
        let mut deferred: Vec<Deferred> = Vec::new();
        if let Some(cb) = on_open {
            let r = reason.clone();
            deferred.push(Box::new(move |_| cb(Err(r))));
        }
        for mut rpc in rpcs {
            if let Some(cb) = rpc.callback.take() {
                let (ch, r) = (self.clone(), reason.clone());
                deferred.push(Box::new(move |_| cb(&ch, Err(r))));
            }
        }
        if let Some(confirm) = confirm {
            let ch = self.clone();
            let r = reason.clone();
            deferred.push(Box::new(move |_| {
                for delivery_tag in confirm.unconfirmed {
                    (confirm.on_ack_nack.borrow_mut())(
                        &ch,
                        Confirmation::Failed {
                            delivery_tag,
                            error: r.clone(),
                        },
                    );
                }
            }));
        }
        for cb in on_close {
            let (ch, r) = (self.clone(), reason.clone());
            deferred.push(Box::new(move |_| cb(&ch, r)));
        }
        deferred
    }
}

/// Converts a reply to the type its request expects. The RPC layer only
/// hands a request one of its declared replies, so the error is for a
/// broken invariant, reported rather than panicked on.
fn typed<T: TryFrom<Method, Error = Method>>(method: Method) -> Result<T, Error> {
    T::try_from(method).map_err(|other| Error::UnexpectedFrame {
        detail: format!("{} is not the reply this request expects", other.name()),
    })
}
