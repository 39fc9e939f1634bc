//! The callback face: [`SelectConnection`] and [`Channel`] on an
//! [`IoLoop`], in pika's continuation-passing style, and
//! [`ConnectionHandle`] for other threads.
//!
//! The face owns the user's closures — keyed by request id, consumer id
//! and channel — and drives one [`protocol::Connection`] per attempt from
//! the loop: one socket handler, one timer at the core's next deadline,
//! one write per socket event. It is the only place user code is called,
//! always with no borrow held ("take, release, call"). It holds no
//! protocol logic: every AMQP decision is the core's.
//!
//! # Behaviour, where pika 1.1.0 leaves it open or departs from the spec
//!
//! * **Connect workflow** ([`crate::transport::workflow`]), as pika 1.1's:
//!   passes over the whole list of parameter sets, each set at every
//!   address its host resolves to; as many passes as the LAST set's
//!   `connection_attempts`, separated by the LAST set's `retry_delay`.
//!   Each TCP connect is bounded by `socket_timeout`; TCP connect plus TLS
//!   plus the AMQP handshake by `stack_timeout`. A refused login or virtual
//!   host (403/530) ends the workflow at once: retrying cannot fix
//!   credentials. When more than one attempt was made and all failed, the
//!   error is [`Error::ConnectionWorkflowFailed`] listing each.
//! * **Name resolution** runs on the loop's thread (`getaddrinfo` through
//!   std): other connections on the same loop wait for the resolver call,
//!   no longer. IP literals skip the resolver.
//! * **Negotiation, heartbeats, closes** are the core's
//!   ([`crate::protocol`]): `channel_max` and `frame_max` take the smaller
//!   of ours and the broker's (0 means no limit); a heartbeat goes out
//!   after `t/2` of silence and the broker is declared dead after `2t` of
//!   silence ([`Error::AmqpHeartbeatTimeout`], no Close handshake; pika
//!   1.1.0 checks only every `t + 5 s`).
//! * **Broker Connection.Close** is always answered with Close-Ok, during
//!   the handshake too (pika 1.1.0 drops the socket instead).
//! * **Malformed frames** from the broker are answered with
//!   Connection.Close carrying the spec's reply code (501, 502, 503, 505),
//!   then the socket is closed without waiting, and the error reaches the
//!   user.
//! * **A broker Close wins over a transport error.** When a write or read
//!   fails, every byte still readable is read and handled first (over TLS,
//!   every record received and the plaintext rustls holds): a
//!   Connection.Close the broker sent before the stream broke ends the
//!   connection as [`Error::ConnectionClosedByBroker`] with its reply code
//!   and text, not as [`Error::StreamLost`].
//! * **Our close** closes open channels first, then sends Connection.Close;
//!   the whole handshake is bounded by `socket_timeout` (10 s when unset):
//!   a broker that never answers does not keep `close()` from finishing.
//! * **A callback that blocks** (sleeps, waits for a lock, does long
//!   work) blocks the loop, as in pika: no heartbeat goes out and nothing
//!   is read meanwhile. If it blocks for longer than the heartbeat
//!   timeout, the broker drops the connection and `on_close` gets
//!   [`Error::StreamLost`] once the callback returns. Hand long work to a
//!   thread and come back with [`ConnectionHandle::add_callback_threadsafe`]
//!   or an [`crate::AckHandle`].
//! * **A panic in a callback** leaves `ioloop.start()`, as an exception
//!   leaves pika's. The connection stays usable: start the loop again and
//!   it carries on where it stopped — the rest of the events of that read
//!   are dispatched, queued requests are written, and repeating callbacks
//!   (consumers, confirm, return, cancel, flow, blocked callbacks) stay
//!   registered, including the one that panicked. A one-shot completion
//!   that panicked has run: it is gone.

mod channel;
mod connection;
mod dispatch;
mod driver;
mod handle;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ioloop::{HandlerId, IoLoop, TimeoutId};

pub use channel::Channel;
pub use connection::{ConnectionState, SelectConnection};
pub use handle::ConnectionHandle;

use crate::error::Error;
use crate::message::{Confirmation, Delivery, ReturnedMessage};
use crate::parameters::ConnectionParameters;
use crate::protocol::{self, ChannelKey, ConsumerId, Reply, RequestId};
use crate::spec::connection as connection_class;
use crate::spec::{Method, MethodId, basic};
use crate::transport::Stream;
use crate::transport::workflow::Workflow;

type OnOpen = Box<dyn FnOnce(&SelectConnection)>;
type OnError = Box<dyn FnOnce(&SelectConnection, Error)>;
type OnBlocked = Box<dyn FnMut(&SelectConnection, &connection_class::Blocked)>;
type OnUnblocked = Box<dyn FnMut(&SelectConnection, &connection_class::Unblocked)>;
type OnEvent = Box<dyn FnMut(&SelectConnection)>;
type OnSecretUpdated = Box<dyn FnOnce(&SelectConnection, Result<(), Error>)>;
type ThreadsafeCallback = Box<dyn FnOnce(&SelectConnection) + Send>;

/// A completion closure of a channel request, given its reply.
pub(crate) type RpcCallback = Box<dyn FnOnce(&Channel, Result<Reply, Error>)>;
type OnChannelOpen = Box<dyn FnOnce(Result<Channel, Error>)>;
type OnChannelClose = Box<dyn FnOnce(&Channel, Error)>;
type OnMessage = Box<dyn FnMut(&Channel, Delivery)>;
type OnAckNack = Box<dyn FnMut(&Channel, Confirmation)>;
type OnCancel = Box<dyn FnMut(&Channel, &basic::Cancel)>;
type OnReturn = Box<dyn FnMut(&Channel, &ReturnedMessage)>;
type OnFlow = Box<dyn FnMut(&Channel, bool)>;
type OnMethod = Box<dyn FnMut(&Channel, &Method)>;

/// The connection's own callbacks.
#[derive(Default)]
struct Callbacks {
    on_open: Vec<OnOpen>,
    on_open_error: Vec<OnError>,
    on_close: Vec<OnError>,
    on_blocked: Vec<OnBlocked>,
    on_unblocked: Vec<OnUnblocked>,
    on_drained: Vec<OnEvent>,
    update_secret: VecDeque<(RequestId, OnSecretUpdated)>,
}

/// pika's generic per-method callback of [`Channel::add_callback`].
struct GenericCallback {
    replies: Vec<MethodId>,
    one_shot: bool,
    /// Taken out while it runs.
    callback: Option<OnMethod>,
}

/// A consumer's callback, by the core's consumer id.
struct ConsumerEntry {
    id: ConsumerId,
    /// Taken out while it runs.
    on_message: Option<OnMessage>,
}

/// One channel's closures, kept by the face; the channel's state is the
/// core's.
#[derive(Default)]
struct ChannelRecord {
    on_open: Option<(RequestId, OnChannelOpen)>,
    on_close: Vec<OnChannelClose>,
    on_cancel: Vec<OnCancel>,
    on_return: Vec<OnReturn>,
    on_flow: Vec<OnFlow>,
    generic: Vec<GenericCallback>,
    /// Completion closures of requests, in the order they were made.
    requests: VecDeque<(RequestId, RpcCallback)>,
    consumers: Vec<ConsumerEntry>,
    /// Taken out while it runs.
    on_ack_nack: Option<OnAckNack>,
}

/// One connection attempt: its socket and, once TCP is connected, its
/// protocol core. The core stays after the attempt ends, for the getters.
struct Session {
    address: SocketAddr,
    started: Instant,
    stream: Option<Stream>,
    handler: Option<HandlerId>,
    connected: bool,
    core: Option<protocol::Connection>,
    /// Bytes `inbound_start..inbound_end` are received and not yet
    /// handled. Its length is its allocated size, zeroed once.
    inbound: Vec<u8>,
    inbound_start: usize,
    inbound_end: usize,
    write_interest: bool,
    /// The one timer, and when it fires.
    timer: Option<(TimeoutId, Instant)>,
    /// The credentials of the workflow's sets were erased (once sent).
    erased: bool,
}

/// The face's state of one connection.
struct State {
    workflow: Workflow,
    /// The parameter set in use (or being tried).
    params: ConnectionParameters,
    retry_timer: Option<TimeoutId>,
    session: Option<Session>,
    /// The connection is over (terminal callback run or running).
    closed: bool,
    /// The next request id (carried from one core instance to the next).
    next_request: u64,
    callbacks: Callbacks,
    /// Indexed by channel number.
    channels: Vec<Option<(ChannelKey, ChannelRecord)>>,
    high_water: usize,
    low_water: usize,
    above_high_water: bool,
    /// A graceful shutdown is under way ([`SelectConnection::shutdown`]).
    shutting_down: bool,
}

impl State {
    fn core(&self) -> Option<&protocol::Connection> {
        self.session.as_ref().and_then(|s| s.core.as_ref())
    }

    fn core_mut(&mut self) -> Option<&mut protocol::Connection> {
        self.session.as_mut().and_then(|s| s.core.as_mut())
    }

    fn record_mut(&mut self, key: ChannelKey) -> Option<&mut ChannelRecord> {
        match self.channels.get_mut(key.number as usize) {
            Some(Some((k, record))) if *k == key => Some(record),
            _ => None,
        }
    }
}

/// Closures queued by other threads.
struct ThreadsafeQueue {
    closed: bool,
    callbacks: VecDeque<ThreadsafeCallback>,
}

/// Shared state behind [`SelectConnection`] handles.
pub(crate) struct Shared {
    id: u64,
    ioloop: IoLoop,
    state: RefCell<State>,
    threadsafe: Arc<Mutex<ThreadsafeQueue>>,
    /// Events are being dispatched (see `driver`).
    dispatching: Cell<bool>,
    /// A dispatch is queued on the loop.
    dispatch_queued: Cell<bool>,
    /// A socket event is being handled: writes wait for its end.
    in_socket_event: Cell<bool>,
    /// What other threads' ack handles check first.
    door: Arc<handle::DoorState>,
    /// The door ack handles go through (built once).
    door_handle: std::cell::OnceCell<Arc<dyn crate::ack::Door>>,
}

/// A weak link to a connection, as channels keep it.
type WeakShared = std::rc::Weak<Shared>;

fn upgrade(weak: &WeakShared) -> Option<SelectConnection> {
    weak.upgrade().map(SelectConnection::from_shared)
}
