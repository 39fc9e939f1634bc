//! [`SelectConnection`]: an AMQP connection on an [`IoLoop`], in pika's
//! continuation-passing style — the connect workflow, the handshake, the
//! heartbeats, blocked/unblocked, the close handshake, channel numbers, and
//! the one outbound buffer.
//!
//! ```no_run
//! use pika::{ConnectionParameters, SelectConnection};
//!
//! let conn = SelectConnection::new(
//!     ConnectionParameters::default(),
//!     |conn| {
//!         println!("connected");
//!         conn.close(200, "bye").expect("open");
//!     },
//!     |conn, err| {
//!         eprintln!("could not connect: {err}");
//!         conn.ioloop().stop();
//!     },
//!     |conn, reason| {
//!         println!("closed: {reason}");
//!         conn.ioloop().stop();
//!     },
//! )?;
//! conn.ioloop().start()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Behaviour, where pika 1.1.0 leaves it open or departs from the spec
//!
//! * **Connect workflow.** Parameter sets are tried in rounds: in each round
//!   every set whose `connection_attempts` is not used up is tried, each at
//!   every address its host resolves to (IPv4 and IPv6, in the resolver's
//!   order). Rounds are separated by the first set's `retry_delay`. Each TCP
//!   connect is bounded by `socket_timeout`; TCP connect plus the AMQP
//!   handshake by `stack_timeout`. A refused login or virtual host
//!   (403/530) ends the workflow at once: retrying cannot fix credentials.
//!   When more than one attempt was made and all failed, the error is
//!   [`Error::ConnectionWorkflowFailed`] listing each.
//! * **Name resolution** runs on the loop's thread (`getaddrinfo` through
//!   std): other connections on the same loop wait for the resolver call,
//!   no longer. IP literals skip the resolver.
//! * **Negotiation** (Connection.Tune): `channel_max` and `frame_max` take
//!   the smaller of ours and the broker's, where 0 from either side means
//!   "no limit" (so the other side's value wins; a channel_max of 0 on both
//!   sides becomes 65535). The heartbeat is the broker's proposal for
//!   [`Heartbeat::ServerDefault`], 0 for `Disabled`, our value for
//!   `Timeout`, and whatever the closure returns for `Negotiate`.
//! * **Heartbeats.** With a heartbeat timeout `t`, a heartbeat frame is sent
//!   whenever nothing was sent for `t/2`, and the broker is declared dead
//!   when nothing at all was received for `2t`
//!   ([`Error::AmqpHeartbeatTimeout`]; the socket is closed without a Close
//!   handshake). pika 1.1.0 checks only every `t + 5 s`; we follow the spec.
//! * **Broker Connection.Close** is always answered with Close-Ok, during
//!   the handshake too (pika 1.1.0 drops the socket instead).
//! * **Malformed frames** from the broker are answered with Connection.Close
//!   carrying the spec's reply code (501, 502, 503, 505), then the socket
//!   is closed without waiting, and the error reaches the user.
//! * **A broker Close wins over a transport error.** When a write or read
//!   fails, every byte still readable is read and handled first (over TLS,
//!   every record received and the plaintext rustls holds): a
//!   Connection.Close the broker sent before the stream broke ends the
//!   connection as [`Error::ConnectionClosedByBroker`] with its reply code
//!   and text, not as [`Error::StreamLost`].
//! * **Our close** closes open channels first, then sends Connection.Close;
//!   the whole handshake is bounded by `socket_timeout` (10 s when unset):
//!   a broker that never answers does not keep `close()` from finishing.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ioloop::{HandlerId, Interest, IoLoop, IoLoopWaker, Readiness, TimeoutId};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::channel::{Channel, ChannelState};
use crate::error::{CodecError, Error};
use crate::frame::{self, FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER};
use crate::parameters::{ConnectionParameters, Heartbeat};
use crate::spec::{Method, connection};
use crate::table::{FieldTable, FieldValue, LongString};

/// A user callback deferred until no borrow of connection or channel state
/// is held.
pub(crate) type Deferred = Box<dyn FnOnce(&SelectConnection)>;

#[cfg(target_os = "linux")]
const EINPROGRESS: i32 = 115;
#[cfg(not(target_os = "linux"))]
const EINPROGRESS: i32 = 36;

/// How many reads one readiness event may do before letting timers run.
const READS_PER_EVENT: usize = 16;
const READ_CHUNK: usize = 64 * 1024;
/// The close handshake's bound when `socket_timeout` is unset.
const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Resolving and connecting TCP (or waiting to retry).
    Connecting,
    /// Protocol header sent; waiting for Connection.Start.
    Protocol,
    /// StartOk sent; waiting for Connection.Tune (or Secure).
    Start,
    /// TuneOk and Open sent; waiting for Connection.OpenOk.
    Tune,
    /// Open.
    Open,
    /// Our Connection.Close is under way.
    Closing,
    /// Closed; terminal.
    Closed,
}

impl ConnectionState {
    fn is_opening(self) -> bool {
        matches!(
            self,
            ConnectionState::Connecting
                | ConnectionState::Protocol
                | ConnectionState::Start
                | ConnectionState::Tune
        )
    }
}

/// One TCP connection attempt and everything that lives and dies with it.
struct Session {
    /// Tells this attempt's session from a later one's.
    generation: u64,
    stream: Rc<TcpStream>,
    /// The TLS session when the connection uses TLS: plaintext frames go
    /// through it on their way to and from `stream`.
    tls: Option<rustls::ClientConnection>,
    handler: Option<HandlerId>,
    address: SocketAddr,
    connected: bool,
    /// The read buffer: bytes `inbound_start..inbound_end` are received and
    /// not yet parsed. Its length is its allocated size, zeroed once, so a
    /// read does not clear memory first.
    inbound: Vec<u8>,
    inbound_start: usize,
    inbound_end: usize,
    outbound: Vec<u8>,
    write_interest: bool,
    last_sent: Instant,
    last_received: Instant,
    socket_timer: Option<TimeoutId>,
    stack_timer: Option<TimeoutId>,
    heartbeat_send_timer: Option<TimeoutId>,
    heartbeat_recv_timer: Option<TimeoutId>,
}

/// A TLS failure carried inside an `io::Error` through the transport.
#[derive(Debug)]
struct TlsFailure(rustls::Error);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for TlsFailure {}

impl Session {
    /// Whether bytes wait to go out (frames, or TLS records).
    fn wants_write(&self) -> bool {
        !self.outbound.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much of the outbound buffer as the socket takes, through
    /// TLS when on. Returns whether anything reached the socket.
    fn write_out(&mut self) -> io::Result<bool> {
        let mut consumed = 0;
        let mut wrote = false;
        let result = loop {
            match &mut self.tls {
                None => {
                    if consumed == self.outbound.len() {
                        break Ok(());
                    }
                    match (&*self.stream).write(&self.outbound[consumed..]) {
                        Ok(0) => {
                            break Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "socket took 0 bytes",
                            ));
                        }
                        Ok(n) => {
                            consumed += n;
                            wrote = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Some(tls) => {
                    if consumed < self.outbound.len() {
                        match tls.writer().write(&self.outbound[consumed..]) {
                            Ok(n) => consumed += n,
                            Err(e) => break Err(e),
                        }
                    }
                    if !tls.wants_write() {
                        break Ok(());
                    }
                    match tls.write_tls(&mut &*self.stream) {
                        Ok(0) => {
                            break Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "socket took 0 bytes",
                            ));
                        }
                        Ok(_) => wrote = true,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        if consumed > 0 {
            self.outbound.drain(..consumed);
        }
        if wrote {
            self.last_sent = Instant::now();
        }
        result.map(|()| wrote)
    }

    /// Reads received bytes (decrypted, with TLS) into the read buffer
    /// after `inbound_end`. `Ok(0)` is the end of the stream.
    fn read_in(&mut self) -> io::Result<usize> {
        let end = self.inbound_end;
        let n = match &mut self.tls {
            None => (&*self.stream).read(&mut self.inbound[end..])?,
            Some(tls) => loop {
                match tls.reader().read(&mut self.inbound[end..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: the end.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break 0,
                    Err(e) => return Err(e),
                }
                match tls.read_tls(&mut &*self.stream) {
                    Ok(0) => break 0,
                    Ok(_) => {
                        self.last_received = Instant::now();
                        if let Err(e) = tls.process_new_packets() {
                            // Let the alert that says why reach the peer.
                            let _ = tls.write_tls(&mut &*self.stream);
                            return Err(io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e)));
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
        };
        self.inbound_end += n;
        if n > 0 {
            self.last_received = Instant::now();
        }
        Ok(n)
    }
}

/// The TLS error inside an I/O error from the transport, if it is one.
fn tls_failure(e: &io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsFailure>())
        .map(|t| t.0.to_string())
}

/// When bytes may be queued for sending.
#[derive(Clone, Copy)]
enum SendWhen {
    /// Whenever a socket exists (the handshake's own methods).
    Connected,
    /// Open, or closing (channel methods, close handshakes).
    OpenOrClosing,
    /// Open only (publishing).
    Open,
}

/// Which set, address and round the connect workflow is at.
struct Workflow {
    sets: Vec<ConnectionParameters>,
    round: u32,
    /// The set being tried in this round (`None` before the first).
    set_index: Option<usize>,
    addresses: Vec<SocketAddr>,
    address_index: usize,
    errors: Vec<Error>,
    retry_timer: Option<TimeoutId>,
}

type OnOpen = Box<dyn FnOnce(&SelectConnection)>;
type OnError = Box<dyn FnOnce(&SelectConnection, Error)>;
type OnBlocked = Box<dyn FnMut(&SelectConnection, &str)>;
type OnEvent = Box<dyn FnMut(&SelectConnection)>;
type OnSecretUpdated = Box<dyn FnOnce(&SelectConnection, Result<(), Error>)>;
type ThreadsafeCallback = Box<dyn FnOnce(&SelectConnection) + Send>;

#[derive(Default)]
struct Callbacks {
    on_open: Vec<OnOpen>,
    on_open_error: Vec<OnError>,
    on_close: Vec<OnError>,
    on_blocked: Vec<OnBlocked>,
    on_unblocked: Vec<OnEvent>,
    on_drained: Vec<OnEvent>,
    update_secret: VecDeque<OnSecretUpdated>,
}

struct State {
    phase: ConnectionState,
    params: ConnectionParameters,
    workflow: Workflow,
    session: Option<Session>,
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
    server_properties: FieldTable,
    /// Indexed by channel number; `None` where free.
    channels: Vec<Option<Channel>>,
    callbacks: Callbacks,
    /// Our close reason while Closing.
    close_reason: Option<Error>,
    close_timer: Option<TimeoutId>,
    /// Our Connection.Close has been sent.
    close_sent: bool,
    blocked: Option<String>,
    blocked_timer: Option<TimeoutId>,
    high_water: usize,
    low_water: usize,
    above_high_water: bool,
    sessions_started: u64,
    consumer_tags_issued: u64,
}

/// Shared state behind [`SelectConnection`] handles.
pub(crate) struct Shared {
    id: u64,
    ioloop: IoLoop,
    /// A socket event is being handled (see `on_socket_event`).
    in_socket_event: Cell<bool>,
    state: RefCell<State>,
    threadsafe: Arc<Mutex<ThreadsafeQueue>>,
}

struct ThreadsafeQueue {
    closed: bool,
    callbacks: VecDeque<ThreadsafeCallback>,
}

thread_local! {
    /// Connections of this thread by id, so that a closure sent from another
    /// thread can find its connection without the connection being `Send`.
    static REGISTRY: RefCell<HashMap<u64, Weak<Shared>>> = RefCell::new(HashMap::new());
    static NEXT_ID: Cell<u64> = const { Cell::new(1) };
}

/// An AMQP 0-9-1 connection driven by an [`IoLoop`] (pika's
/// `SelectConnection`). A cheap `Clone` handle, `!Send`; other threads use
/// [`SelectConnection::threadsafe_handle`].
///
/// Every operation that has a reply takes a completion closure; exactly one
/// terminal callback runs per connection — `on_open_error` when it never
/// opened, `on_close` when it did — after every channel's close callback.
#[derive(Clone)]
pub struct SelectConnection {
    shared: Rc<Shared>,
}

impl fmt::Debug for SelectConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.state.borrow();
        f.debug_struct("SelectConnection")
            .field("state", &st.phase)
            .field("params", &st.params)
            .finish()
    }
}

/// A `Send + Sync + Clone` handle that reaches a [`SelectConnection`] from
/// other threads.
#[derive(Clone)]
pub struct ConnectionHandle {
    waker: IoLoopWaker,
    id: u64,
    queue: Arc<Mutex<ThreadsafeQueue>>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl ConnectionHandle {
    /// Runs `callback` on the connection's loop thread, with the connection
    /// (pika's `add_callback_threadsafe`). Callbacks from one thread run in
    /// the order they were added.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is closed or its
    /// loop is gone; the callback is dropped.
    pub fn add_callback_threadsafe(
        &self,
        callback: impl FnOnce(&SelectConnection) + Send + 'static,
    ) -> Result<(), Error> {
        let closed = || Error::ConnectionWrongState {
            detail: "the connection is closed; add_callback_threadsafe refused".into(),
        };
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.closed {
                return Err(closed());
            }
            q.callbacks.push_back(Box::new(callback));
        }
        let id = self.id;
        let queue = self.queue.clone();
        self.waker
            .add_callback_threadsafe(move || drain_threadsafe(id, &queue))
            .map_err(|_| closed())
    }
}

fn drain_threadsafe(id: u64, queue: &Mutex<ThreadsafeQueue>) {
    let Some(shared) = REGISTRY.with(|r| r.borrow().get(&id).and_then(Weak::upgrade)) else {
        return;
    };
    let conn = SelectConnection { shared };
    // One closure per wake-up: each add_callback_threadsafe queued one.
    let next = queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .callbacks
        .pop_front();
    if let Some(cb) = next {
        cb(&conn);
    }
}

fn negotiate(ours: u32, theirs: u32) -> u32 {
    if ours == 0 || theirs == 0 {
        ours.max(theirs)
    } else {
        ours.min(theirs)
    }
}

impl SelectConnection {
    /// Creates a connection and starts connecting on a new [`IoLoop`]
    /// (reachable through [`SelectConnection::ioloop`]); run
    /// `conn.ioloop().start()` to drive it.
    ///
    /// `on_open` runs when the connection is open; `on_open_error` when it
    /// could not be opened; `on_close` when an open connection closes.
    /// Exactly one of `on_open_error` and `on_close` runs.
    ///
    /// # Errors
    /// [`Error::IoLoop`] when no event loop can be created.
    pub fn new(
        parameters: impl Into<ConnectionParameters>,
        on_open: impl FnOnce(&SelectConnection) + 'static,
        on_open_error: impl FnOnce(&SelectConnection, Error) + 'static,
        on_close: impl FnOnce(&SelectConnection, Error) + 'static,
    ) -> Result<SelectConnection, Error> {
        Self::create(
            vec![parameters.into()],
            on_open,
            on_open_error,
            on_close,
            None,
        )
    }

    /// Creates a connection that tries several parameter sets in order
    /// (pika's `create_connection`), optionally on an existing loop (pika's
    /// `custom_ioloop`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an empty list; [`Error::IoLoop`] when
    /// no event loop can be created.
    pub fn create(
        parameter_sets: Vec<ConnectionParameters>,
        on_open: impl FnOnce(&SelectConnection) + 'static,
        on_open_error: impl FnOnce(&SelectConnection, Error) + 'static,
        on_close: impl FnOnce(&SelectConnection, Error) + 'static,
        custom_ioloop: Option<IoLoop>,
    ) -> Result<SelectConnection, Error> {
        let Some(first) = parameter_sets.first().cloned() else {
            return Err(Error::invalid(
                "parameters",
                "at least one set of connection parameters is needed",
            ));
        };
        let ioloop = match custom_ioloop {
            Some(l) => l,
            None => IoLoop::new().map_err(|e| Error::IoLoop(Arc::new(e)))?,
        };
        let id = NEXT_ID.with(|n| {
            let id = n.get();
            n.set(id + 1);
            id
        });
        let callbacks = Callbacks {
            on_open: vec![Box::new(on_open)],
            on_open_error: vec![Box::new(on_open_error)],
            on_close: vec![Box::new(on_close)],
            ..Default::default()
        };
        let shared = Rc::new(Shared {
            id,
            ioloop: ioloop.clone(),
            in_socket_event: Cell::new(false),
            state: RefCell::new(State {
                phase: ConnectionState::Connecting,
                params: first,
                workflow: Workflow {
                    sets: parameter_sets,
                    round: 0,
                    set_index: None,
                    addresses: Vec::new(),
                    address_index: 0,
                    errors: Vec::new(),
                    retry_timer: None,
                },
                session: None,
                channel_max: 0,
                frame_max: FRAME_MIN_SIZE,
                heartbeat: 0,
                server_properties: FieldTable::new(),
                channels: Vec::new(),
                callbacks,
                close_reason: None,
                close_timer: None,
                close_sent: false,
                blocked: None,
                blocked_timer: None,
                high_water: 16 * 1024 * 1024,
                low_water: 4 * 1024 * 1024,
                above_high_water: false,
                sessions_started: 0,
                consumer_tags_issued: 0,
            }),
            threadsafe: Arc::new(Mutex::new(ThreadsafeQueue {
                closed: false,
                callbacks: VecDeque::new(),
            })),
        });
        REGISTRY.with(|r| r.borrow_mut().insert(id, Rc::downgrade(&shared)));
        let conn = SelectConnection { shared };
        // Start on the loop, so that close() right after new() aborts cleanly
        // and no callback runs inside new(). The closure keeps the
        // connection alive until the workflow owns it.
        let starter = conn.clone();
        ioloop.call_soon(move || starter.next_attempt());
        Ok(conn)
    }

    pub(crate) fn from_shared(shared: Rc<Shared>) -> SelectConnection {
        SelectConnection { shared }
    }

    fn weak(&self) -> Weak<Shared> {
        Rc::downgrade(&self.shared)
    }

    /// The event loop this connection runs on.
    pub fn ioloop(&self) -> &IoLoop {
        &self.shared.ioloop
    }

    /// The connection's state.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().phase
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        self.state() == ConnectionState::Open
    }

    /// Whether our close handshake is under way.
    pub fn is_closing(&self) -> bool {
        self.state() == ConnectionState::Closing
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.state() == ConnectionState::Closed
    }

    /// The parameter set in use (the one that connected, or being tried).
    pub fn params(&self) -> ConnectionParameters {
        self.shared.state.borrow().params.clone()
    }

    /// The negotiated channel_max (0 before Connection.Tune).
    pub fn channel_max(&self) -> u16 {
        self.shared.state.borrow().channel_max
    }

    /// The negotiated frame_max (4096 before Connection.Tune).
    pub fn frame_max(&self) -> u32 {
        self.shared.state.borrow().frame_max
    }

    /// The negotiated heartbeat timeout in seconds (0: off).
    pub fn heartbeat(&self) -> u16 {
        self.shared.state.borrow().heartbeat
    }

    /// The broker's `server_properties` from Connection.Start.
    pub fn server_properties(&self) -> FieldTable {
        self.shared.state.borrow().server_properties.clone()
    }

    /// The address connected to, while a socket exists.
    pub fn peer_address(&self) -> Option<SocketAddr> {
        self.shared
            .state
            .borrow()
            .session
            .as_ref()
            .map(|s| s.address)
    }

    /// The local address of the socket, while one exists (useful to find
    /// this connection in `rabbitmqctl list_connections peer_port`).
    pub fn local_address(&self) -> Option<SocketAddr> {
        self.shared
            .state
            .borrow()
            .session
            .as_ref()
            .and_then(|s| s.stream.local_addr().ok())
    }

    fn capability(&self, name: &str) -> bool {
        self.shared
            .state
            .borrow()
            .server_properties
            .get("capabilities")
            .and_then(FieldValue::as_table)
            .and_then(|caps| caps.get(name))
            .and_then(FieldValue::as_bool)
            .unwrap_or(false)
    }

    /// Whether the broker supports publisher confirms.
    pub fn publisher_confirms(&self) -> bool {
        self.capability("publisher_confirms")
    }

    /// Whether the broker supports Basic.Nack.
    pub fn basic_nack(&self) -> bool {
        self.capability("basic.nack")
    }

    /// Whether the broker sends Basic.Cancel when a consumer's queue goes.
    pub fn consumer_cancel_notify(&self) -> bool {
        self.capability("consumer_cancel_notify")
    }

    /// Whether the broker supports exchange-to-exchange bindings.
    pub fn exchange_exchange_bindings(&self) -> bool {
        self.capability("exchange_exchange_bindings")
    }

    /// Adds a callback run when the connection opens.
    pub fn add_on_open_callback(&self, callback: impl FnOnce(&SelectConnection) + 'static) {
        let mut st = self.shared.state.borrow_mut();
        if st.phase.is_opening() {
            st.callbacks.on_open.push(Box::new(callback));
        }
    }

    /// Adds a callback run when the connection cannot be opened.
    pub fn add_on_open_error_callback(
        &self,
        callback: impl FnOnce(&SelectConnection, Error) + 'static,
    ) {
        let mut st = self.shared.state.borrow_mut();
        if st.phase.is_opening() {
            st.callbacks.on_open_error.push(Box::new(callback));
        }
    }

    /// Adds a callback run when the open connection closes, with the
    /// reason.
    pub fn add_on_close_callback(&self, callback: impl FnOnce(&SelectConnection, Error) + 'static) {
        let mut st = self.shared.state.borrow_mut();
        if st.phase != ConnectionState::Closed {
            st.callbacks.on_close.push(Box::new(callback));
        }
    }

    /// Adds a callback run each time the broker blocks the connection
    /// (Connection.Blocked), with the broker's reason.
    pub fn add_on_connection_blocked_callback(
        &self,
        callback: impl FnMut(&SelectConnection, &str) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_blocked
            .push(Box::new(callback));
    }

    /// Adds a callback run each time the broker unblocks the connection.
    pub fn add_on_connection_unblocked_callback(
        &self,
        callback: impl FnMut(&SelectConnection) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_unblocked
            .push(Box::new(callback));
    }

    /// Whether the broker has blocked the connection, and why.
    pub fn blocked_reason(&self) -> Option<String> {
        self.shared.state.borrow().blocked.clone()
    }

    /// A handle other threads use to run closures on this connection's
    /// loop thread.
    pub fn threadsafe_handle(&self) -> ConnectionHandle {
        ConnectionHandle {
            waker: self.shared.ioloop.waker(),
            id: self.shared.id,
            queue: self.shared.threadsafe.clone(),
        }
    }

    /// Bytes waiting in the outbound buffer.
    pub fn outbound_buffer_size(&self) -> usize {
        self.shared
            .state
            .borrow()
            .session
            .as_ref()
            .map_or(0, |s| s.outbound.len())
    }

    /// Sets the outbound buffer's high- and low-water marks (default 16 MiB
    /// and 4 MiB): once the buffer has grown past `high`, the drained
    /// callbacks run when it falls below `low`.
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
        let mut st = self.shared.state.borrow_mut();
        st.high_water = high;
        st.low_water = low;
        Ok(())
    }

    /// Adds a callback run each time the outbound buffer, having passed the
    /// high-water mark, drains below the low-water mark: a publisher can
    /// pause at the high mark and resume here.
    pub fn add_on_outbound_drained_callback(
        &self,
        callback: impl FnMut(&SelectConnection) + 'static,
    ) {
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .on_drained
            .push(Box::new(callback));
    }

    /// Whether the outbound buffer is past its high-water mark (and not yet
    /// back under the low one).
    pub fn is_outbound_above_high_water(&self) -> bool {
        self.shared.state.borrow().above_high_water
    }

    // ------------------------------------------------------------------
    // Connect workflow
    // ------------------------------------------------------------------

    fn next_attempt(&self) {
        loop {
            enum Step {
                Try(SocketAddr, ConnectionParameters),
                Resolve(ConnectionParameters),
                Retry(Duration),
                Fail,
                Stop,
            }
            let step = {
                let mut st = self.shared.state.borrow_mut();
                if st.phase != ConnectionState::Connecting {
                    Step::Stop
                } else {
                    let wf = &mut st.workflow;
                    if wf.address_index < wf.addresses.len() {
                        let addr = wf.addresses[wf.address_index];
                        wf.address_index += 1;
                        let params = wf.sets[wf.set_index.unwrap_or(0)].clone();
                        Step::Try(addr, params)
                    } else {
                        let round = wf.round;
                        let start = wf.set_index.map_or(0, |i| i + 1);
                        let next_set = (start..wf.sets.len())
                            .find(|&i| wf.sets[i].connection_attempts() > round);
                        match next_set {
                            Some(i) => {
                                wf.set_index = Some(i);
                                wf.addresses.clear();
                                wf.address_index = 0;
                                Step::Resolve(wf.sets[i].clone())
                            }
                            None => {
                                wf.round += 1;
                                wf.set_index = None;
                                let more =
                                    wf.sets.iter().any(|s| s.connection_attempts() > wf.round);
                                if more {
                                    Step::Retry(wf.sets[0].retry_delay())
                                } else {
                                    Step::Fail
                                }
                            }
                        }
                    }
                }
            };
            match step {
                Step::Stop => return,
                Step::Try(addr, params) => {
                    if self.start_tcp(addr, params) {
                        return;
                    }
                }
                Step::Resolve(params) => match resolve(params.host(), params.port()) {
                    Ok(addresses) => {
                        let mut st = self.shared.state.borrow_mut();
                        st.workflow.addresses = addresses;
                        st.params = params;
                    }
                    Err(e) => self.shared.state.borrow_mut().workflow.errors.push(e),
                },
                Step::Retry(delay) => {
                    log::info!("connect: all endpoints failed; retrying in {delay:?}");
                    let me = self.clone();
                    let timer = self
                        .shared
                        .ioloop
                        .call_later(delay, move || me.next_attempt());
                    self.shared.state.borrow_mut().workflow.retry_timer = Some(timer);
                    return;
                }
                Step::Fail => {
                    let error = {
                        let mut st = self.shared.state.borrow_mut();
                        let mut errors = std::mem::take(&mut st.workflow.errors);
                        if errors.len() == 1 {
                            errors.pop().unwrap_or(Error::ConnectionOpenAborted)
                        } else {
                            Error::ConnectionWorkflowFailed {
                                attempts: Arc::new(errors),
                            }
                        }
                    };
                    self.terminate(error);
                    return;
                }
            }
        }
    }

    /// Starts a non-blocking TCP connect; false when it failed at once (the
    /// error is recorded).
    fn start_tcp(&self, addr: SocketAddr, params: ConnectionParameters) -> bool {
        log::debug!("connect: trying {addr}");
        let socket = match open_socket(addr, &params) {
            Ok(s) => s,
            Err(e) => {
                self.attempt_failed(Error::Connect {
                    address: addr.to_string(),
                    source: Arc::new(e),
                });
                return false;
            }
        };
        let stream = Rc::new(TcpStream::from(socket));
        let me = self.clone();
        let handler = match self.shared.ioloop.add_handler(
            stream.clone(),
            Interest::WRITABLE,
            move |readiness| me.on_socket_event(readiness),
        ) {
            Ok(h) => h,
            Err(e) => {
                self.attempt_failed(Error::IoLoop(Arc::new(e)));
                return false;
            }
        };
        let now = Instant::now();
        let socket_timer = params.socket_timeout().map(|t| {
            let weak = self.weak();
            self.shared.ioloop.call_later(t, move || {
                if let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) {
                    conn.on_socket_timeout(addr, t);
                }
            })
        });
        let stack_timer = params.stack_timeout().map(|t| {
            let weak = self.weak();
            self.shared.ioloop.call_later(t, move || {
                if let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) {
                    conn.on_stack_timeout(addr, t);
                }
            })
        });
        let mut st = self.shared.state.borrow_mut();
        st.params = params;
        st.frame_max = FRAME_MIN_SIZE;
        st.sessions_started += 1;
        let generation = st.sessions_started;
        st.session = Some(Session {
            generation,
            stream,
            tls: None,
            handler: Some(handler),
            address: addr,
            connected: false,
            inbound: vec![0; READ_CHUNK],
            inbound_start: 0,
            inbound_end: 0,
            outbound: Vec::new(),
            write_interest: true,
            last_sent: now,
            last_received: now,
            socket_timer,
            stack_timer,
            heartbeat_send_timer: None,
            heartbeat_recv_timer: None,
        });
        true
    }

    fn on_socket_timeout(&self, addr: SocketAddr, timeout: Duration) {
        let connecting = {
            let st = self.shared.state.borrow();
            st.phase == ConnectionState::Connecting
                && st.session.as_ref().is_some_and(|s| !s.connected)
        };
        if connecting {
            self.attempt_failed(Error::SocketTimeout {
                address: addr.to_string(),
                timeout,
            });
            self.next_attempt();
        }
    }

    fn on_stack_timeout(&self, addr: SocketAddr, timeout: Duration) {
        if self.state().is_opening() {
            self.attempt_failed(Error::StackTimeout {
                address: addr.to_string(),
                timeout,
            });
            self.next_attempt();
        }
    }

    /// Records a failed attempt and drops its session; the workflow goes on
    /// unless the error says retrying cannot help.
    fn attempt_failed(&self, error: Error) {
        log::warn!("connect: {error}");
        let session = {
            let mut st = self.shared.state.borrow_mut();
            st.phase = ConnectionState::Connecting;
            st.workflow.errors.push(error);
            st.session.take()
        };
        if let Some(s) = session {
            self.drop_session(s);
        }
    }

    fn drop_session(&self, mut session: Session) {
        let lp = &self.shared.ioloop;
        if let Some(h) = session.handler.take() {
            lp.remove_handler(h);
        }
        for t in [
            session.socket_timer.take(),
            session.stack_timer.take(),
            session.heartbeat_send_timer.take(),
            session.heartbeat_recv_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            lp.remove_timeout(t);
        }
        if let Some(tls) = session.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut &*session.stream);
        }
        let _ = session.stream.shutdown(std::net::Shutdown::Both);
    }

    // ------------------------------------------------------------------
    // Socket events
    // ------------------------------------------------------------------

    fn on_socket_event(&self, readiness: Readiness) {
        let connected = {
            let st = self.shared.state.borrow();
            match &st.session {
                Some(s) => s.connected,
                None => return,
            }
        };
        if !connected {
            self.on_connect_ready();
            return;
        }
        // While this event is handled, frames the callbacks send are only
        // buffered; they are written once at the end, and write interest is
        // registered only if the socket would block (one write and no
        // epoll_ctl per turn in the common case).
        struct Dispatching<'a>(&'a Cell<bool>);
        impl Drop for Dispatching<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let guard = Dispatching(&self.shared.in_socket_event);
        guard.0.set(true);
        if readiness.is_writable() {
            self.flush();
        }
        if readiness.is_readable() || readiness.is_error() {
            self.read_some();
        }
        drop(guard);
        let pending = self
            .shared
            .state
            .borrow()
            .session
            .as_ref()
            .is_some_and(|s| s.connected && s.wants_write());
        if pending {
            self.flush();
        }
    }

    fn on_connect_ready(&self) {
        let result = {
            let st = self.shared.state.borrow();
            let Some(s) = &st.session else { return };
            match s.stream.take_error() {
                Ok(Some(e)) | Err(e) => Err((s.address, e)),
                Ok(None) => match s.stream.peer_addr() {
                    Ok(_) => Ok(()),
                    Err(e) => Err((s.address, e)),
                },
            }
        };
        match result {
            Err((addr, e)) => {
                self.attempt_failed(Error::Connect {
                    address: addr.to_string(),
                    source: Arc::new(e),
                });
                self.next_attempt();
            }
            Ok(()) => {
                let tls = {
                    let st = self.shared.state.borrow();
                    st.params
                        .ssl_options()
                        .map(|opts| opts.session(st.params.host()))
                        .transpose()
                };
                let tls = match tls {
                    Ok(tls) => tls,
                    Err(e) => {
                        self.attempt_failed(e);
                        self.next_attempt();
                        return;
                    }
                };
                {
                    let mut st = self.shared.state.borrow_mut();
                    st.phase = ConnectionState::Protocol;
                    let lp = self.shared.ioloop.clone();
                    if let Some(s) = st.session.as_mut() {
                        s.connected = true;
                        s.tls = tls;
                        if let Some(t) = s.socket_timer.take() {
                            lp.remove_timeout(t);
                        }
                        s.outbound.extend_from_slice(&PROTOCOL_HEADER);
                        log::debug!("connect: TCP connected to {}", s.address);
                    }
                }
                self.set_interest();
                self.flush();
            }
        }
    }

    /// Registers write interest exactly while the outbound buffer is
    /// non-empty.
    fn set_interest(&self) {
        let mut st = self.shared.state.borrow_mut();
        let Some(s) = st.session.as_mut() else { return };
        let Some(h) = s.handler else { return };
        let want = s.wants_write();
        if want && s.connected && self.shared.in_socket_event.get() {
            return; // written at the end of the socket event
        }
        if want != s.write_interest || !s.connected {
            s.write_interest = want;
            let interest = if want {
                Interest::BOTH
            } else {
                Interest::READABLE
            };
            if let Err(e) = self.shared.ioloop.update_handler(h, interest) {
                log::warn!("cannot update socket interest: {e}");
            }
        }
    }

    fn read_some(&self) {
        for _ in 0..READS_PER_EVENT {
            match self.read_once() {
                None => return,
                Some(Ok(0)) => {
                    self.on_stream_end(None);
                    return;
                }
                Some(Ok(n)) => {
                    self.process_inbound();
                    if n < READ_CHUNK {
                        return;
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Some(Err(e)) => {
                    match tls_failure(&e) {
                        Some(reason) => self.tls_failed(reason),
                        None => self.on_stream_end(Some(e)),
                    }
                    return;
                }
            }
        }
    }

    /// One read into the read buffer (made room for first); `None` when
    /// there is no session.
    fn read_once(&self) -> Option<io::Result<usize>> {
        let mut st = self.shared.state.borrow_mut();
        let s = st.session.as_mut()?;
        if s.inbound.len() - s.inbound_end < READ_CHUNK {
            // Move the unparsed tail to the front, then grow if a frame
            // larger than the buffer is arriving.
            s.inbound.copy_within(s.inbound_start..s.inbound_end, 0);
            s.inbound_end -= s.inbound_start;
            s.inbound_start = 0;
            if s.inbound.len() - s.inbound_end < READ_CHUNK {
                let grown = s.inbound_end + READ_CHUNK;
                s.inbound.resize(grown, 0);
            }
        }
        Some(s.read_in())
    }

    /// A write failed: before the failure decides how the connection ends,
    /// reads and handles every byte still readable (over TLS, every record
    /// and the plaintext rustls holds), so that what the broker sent before
    /// the stream broke — its Connection.Close above all — is heard. A
    /// broker Close received before the end of the stream always wins over
    /// the transport error. Returns whether the connection is still
    /// undecided (then the caller reports `error`).
    fn drain_before_failing(&self) -> bool {
        let generation = self.session_generation();
        loop {
            match self.read_once() {
                Some(Ok(n)) if n > 0 => self.process_inbound(),
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The end, an error, or nothing more to read: decided below.
                _ => break,
            }
            if self.session_generation() != generation || self.state() == ConnectionState::Closed {
                return false;
            }
        }
        self.session_generation() == generation && self.state() != ConnectionState::Closed
    }

    fn session_generation(&self) -> Option<u64> {
        self.shared
            .state
            .borrow()
            .session
            .as_ref()
            .map(|s| s.generation)
    }

    /// Parses and handles every whole frame in the inbound buffer, one at a
    /// time, running each frame's callbacks before the next is parsed.
    ///
    /// The read buffer is moved out of the session while a frame is
    /// handled: a body frame borrows its payload from it (the body is
    /// copied once, into the message being assembled), and no borrow of the
    /// connection's state is held while user callbacks run.
    fn process_inbound(&self) {
        loop {
            let (inbound, start, end, frame_max, generation) = {
                let mut st = self.shared.state.borrow_mut();
                let frame_max = st.frame_max;
                let Some(s) = st.session.as_mut() else { return };
                (
                    std::mem::take(&mut s.inbound),
                    s.inbound_start,
                    s.inbound_end,
                    frame_max,
                    s.generation,
                )
            };
            match frame::parse_frame(&inbound[start..end], frame_max) {
                Ok(None) => {
                    self.restore_inbound(inbound, start, end, generation);
                    return;
                }
                Ok(Some((frame, used))) => {
                    self.handle_frame(frame);
                    if !self.restore_inbound(inbound, start + used, end, generation) {
                        return;
                    }
                }
                Err(e) => {
                    self.restore_inbound(inbound, start, end, generation);
                    self.protocol_failure(e);
                    return;
                }
            }
        }
    }

    /// Puts the read buffer back into its session, unless that session is
    /// gone (closed, or replaced by a later attempt's) — then false.
    fn restore_inbound(&self, inbound: Vec<u8>, start: usize, end: usize, generation: u64) -> bool {
        let mut st = self.shared.state.borrow_mut();
        let Some(s) = st.session.as_mut().filter(|s| s.generation == generation) else {
            return false;
        };
        s.inbound = inbound;
        if start == end {
            s.inbound_start = 0;
            s.inbound_end = 0;
        } else {
            s.inbound_start = start;
            s.inbound_end = end;
        }
        true
    }

    fn on_stream_end(&self, error: Option<io::Error>) {
        let phase = self.state();
        let detail = match &error {
            Some(e) => format!("socket error: {e}"),
            None => "the broker closed the connection (end of file)".to_string(),
        };
        match phase {
            ConnectionState::Connecting => {}
            ConnectionState::Protocol => {
                self.attempt_failed(Error::IncompatibleProtocol {
                    detail: format!("{detail} right after our AMQP 0-9-1 protocol header"),
                });
                self.next_attempt();
            }
            ConnectionState::Start => {
                self.handshake_refused(Error::ProbableAuthenticationError {
                    reply_code: 0,
                    reply_text: format!("{detail} after Connection.StartOk"),
                });
            }
            ConnectionState::Tune => {
                self.handshake_refused(Error::ProbableAccessDeniedError {
                    reply_code: 0,
                    reply_text: format!("{detail} after Connection.Open"),
                });
            }
            ConnectionState::Open => self.terminate(Error::stream_lost(detail, error)),
            ConnectionState::Closing => {
                let reason = self.shared.state.borrow().close_reason.clone();
                self.terminate(reason.unwrap_or_else(|| Error::stream_lost(detail, error)));
            }
            ConnectionState::Closed => {}
        }
    }

    /// TLS failed (a refused certificate, an alert from the peer, a peer
    /// that does not speak TLS): the attempt fails while opening; an open
    /// connection ends with the error.
    fn tls_failed(&self, reason: String) {
        let error = Error::Tls { reason };
        if self.state().is_opening() {
            self.attempt_failed(error);
            self.next_attempt();
        } else {
            self.terminate(error);
        }
    }

    /// A handshake failure that retrying cannot fix: ends the workflow.
    fn handshake_refused(&self, error: Error) {
        log::warn!("connect: {error}");
        self.terminate(error);
    }

    /// The broker sent something our codec refuses: answer with
    /// Connection.Close carrying the reply code (only once open), then drop
    /// the socket.
    fn protocol_failure(&self, e: CodecError) {
        let phase = self.state();
        // A protocol header is the broker's answer to ours only while
        // opening; once open it is malformed input like any other (501).
        if let (CodecError::ProtocolHeader { .. }, true) = (&e, phase.is_opening()) {
            self.attempt_failed(Error::IncompatibleProtocol {
                detail: e.to_string(),
            });
            self.next_attempt();
            return;
        }
        let close_sent = self.shared.state.borrow().close_sent;
        if (phase == ConnectionState::Open || phase == ConnectionState::Closing) && !close_sent {
            let close = connection::Close {
                reply_code: e.reply_code(),
                reply_text: truncate_short(&e.to_string()),
                class_id: 0,
                method_id: 0,
            };
            self.send_now(&close.into());
        }
        let error = Error::Protocol(e);
        if phase.is_opening() {
            self.attempt_failed(error);
            self.next_attempt();
        } else {
            self.terminate(error);
        }
    }

    fn unexpected(&self, detail: String) {
        let phase = self.state();
        if phase.is_opening() {
            self.attempt_failed(Error::UnexpectedFrame { detail });
            self.next_attempt();
            return;
        }
        if !self.shared.state.borrow().close_sent {
            let close = connection::Close {
                reply_code: crate::error::UNEXPECTED_FRAME,
                reply_text: truncate_short(&detail),
                class_id: 0,
                method_id: 0,
            };
            self.send_now(&close.into());
        }
        self.terminate(Error::UnexpectedFrame { detail });
    }

    // ------------------------------------------------------------------
    // Frames
    // ------------------------------------------------------------------

    fn handle_frame(&self, frame: Frame<'_>) {
        let phase = self.state();
        let number = frame.channel();
        if number != 0 && phase != ConnectionState::Open && phase != ConnectionState::Closing {
            self.unexpected(format!(
                "a frame on channel {number} before the connection is open"
            ));
            return;
        }
        let result = match frame {
            Frame::Heartbeat => return,
            Frame::Method { channel: 0, method } => {
                self.handle_connection_method(phase, method);
                return;
            }
            Frame::Header { channel: 0, .. } | Frame::Body { channel: 0, .. } => {
                self.unexpected("content frame on channel 0".into());
                return;
            }
            Frame::Method { method, .. } => match self.channel_by_number(number) {
                Some(ch) => ch.handle_method(method),
                None => Err(Error::UnexpectedFrame {
                    detail: format!("{} on channel {number}, which is not open", method.name()),
                }),
            },
            Frame::Header { header, .. } => match self.channel_by_number(number) {
                Some(ch) => ch.handle_header(header),
                None => Err(Error::UnexpectedFrame {
                    detail: format!("content header on channel {number}, which is not open"),
                }),
            },
            Frame::Body { payload, .. } => match self.channel_by_number(number) {
                Some(ch) => ch.handle_body(payload),
                None => Err(Error::UnexpectedFrame {
                    detail: format!("body frame on channel {number}, which is not open"),
                }),
            },
        };
        match result {
            Ok(deferred) => {
                self.run(deferred);
                if self.state() == ConnectionState::Closing {
                    self.maybe_send_connection_close();
                }
            }
            Err(Error::UnexpectedFrame { detail }) => self.unexpected(detail),
            Err(other) => self.unexpected(other.to_string()),
        }
    }

    fn channel_by_number(&self, number: u16) -> Option<Channel> {
        self.shared
            .state
            .borrow()
            .channels
            .get(number as usize)
            .and_then(Clone::clone)
    }

    fn handle_connection_method(&self, phase: ConnectionState, method: Method) {
        match (phase, method) {
            (_, Method::ConnectionClose(close)) => self.on_broker_close(phase, close),
            (ConnectionState::Protocol, Method::ConnectionStart(start)) => self.on_start(start),
            (ConnectionState::Start, Method::ConnectionSecure(_)) => {
                let response = {
                    let st = self.shared.state.borrow();
                    let offered = st
                        .server_properties
                        .get("mechanisms")
                        .and_then(FieldValue::as_str)
                        .unwrap_or("PLAIN")
                        .to_string();
                    st.params
                        .credentials()
                        .response_for(&offered)
                        .map(|(_, r)| r)
                        .unwrap_or_default()
                };
                self.send(&connection::SecureOk { response }.into());
            }
            (ConnectionState::Start, Method::ConnectionTune(tune)) => self.on_tune(tune),
            (ConnectionState::Tune, Method::ConnectionOpenOk(_)) => self.on_open_ok(),
            (ConnectionState::Open, Method::ConnectionBlocked(b)) => self.on_blocked(b.reason),
            (ConnectionState::Closing, Method::ConnectionBlocked(b)) => {
                self.shared.state.borrow_mut().blocked = Some(b.reason);
            }
            (ConnectionState::Open | ConnectionState::Closing, Method::ConnectionUnblocked(_)) => {
                self.on_unblocked()
            }
            (
                ConnectionState::Open | ConnectionState::Closing,
                Method::ConnectionUpdateSecretOk(_),
            ) => {
                let cb = self
                    .shared
                    .state
                    .borrow_mut()
                    .callbacks
                    .update_secret
                    .pop_front();
                if let Some(cb) = cb {
                    cb(self, Ok(()));
                }
            }
            (ConnectionState::Closing, Method::ConnectionCloseOk(_)) => {
                let reason = self.shared.state.borrow().close_reason.clone();
                self.terminate(reason.unwrap_or(Error::ConnectionClosedByClient {
                    reply_code: 200,
                    reply_text: "Normal shutdown".into(),
                }));
            }
            (ConnectionState::Closing, method) if self.shared.state.borrow().close_sent => {
                // Once our Close is out, only Close and CloseOk matter.
                log::debug!("discarding {} while closing", method.name());
            }
            (phase, method) => {
                self.unexpected(format!("{} on channel 0 while {phase:?}", method.name()))
            }
        }
    }

    fn on_start(&self, start: connection::Start) {
        if (start.version_major, start.version_minor) != (0, 9) {
            self.attempt_failed(Error::IncompatibleProtocol {
                detail: format!(
                    "the broker speaks AMQP {}-{}, we speak 0-9-1",
                    start.version_major, start.version_minor
                ),
            });
            self.next_attempt();
            return;
        }
        let offered = start.mechanisms.to_string_lossy().into_owned();
        let start_ok = {
            let mut st = self.shared.state.borrow_mut();
            let mut server_properties = start.server_properties;
            server_properties.insert("mechanisms", offered.as_str());
            st.server_properties = server_properties;
            match st.params.credentials().response_for(&offered) {
                Ok((mechanism, response)) => {
                    let ok = connection::StartOk {
                        client_properties: st.params.effective_client_properties(),
                        mechanism: mechanism.to_string(),
                        response,
                        locale: st.params.locale().to_string(),
                    };
                    st.phase = ConnectionState::Start;
                    Ok(ok)
                }
                Err(e) => Err(e),
            }
        };
        match start_ok {
            Ok(ok) => {
                self.send(&ok.into());
                // erase_on_connect: the password goes from the parameters in
                // use and from every set the workflow keeps.
                let mut st = self.shared.state.borrow_mut();
                st.params.erase_credentials_if_asked();
                for set in st.workflow.sets.iter_mut() {
                    set.erase_credentials_if_asked();
                }
            }
            Err(e) => self.handshake_refused(e),
        }
    }

    fn on_tune(&self, tune: connection::Tune) {
        // The spec's minimum frame_max is 4096 (0 means "no limit"): a
        // broker proposing less does not speak AMQP 0-9-1, and agreeing
        // would leave us a frame_max below the spec's floor.
        if tune.frame_max != 0 && tune.frame_max < FRAME_MIN_SIZE {
            self.attempt_failed(Error::IncompatibleProtocol {
                detail: format!(
                    "the broker's Connection.Tune proposes frame_max {}, below AMQP 0-9-1's \
                     minimum of {FRAME_MIN_SIZE}",
                    tune.frame_max
                ),
            });
            self.next_attempt();
            return;
        }
        let tune_ok = {
            let mut st = self.shared.state.borrow_mut();
            let mut channel_max = negotiate(
                u32::from(st.params.channel_max()),
                u32::from(tune.channel_max),
            ) as u16;
            if channel_max == 0 {
                channel_max = u16::MAX;
            }
            let frame_max = negotiate(st.params.frame_max(), tune.frame_max);
            let heartbeat = match st.params.heartbeat() {
                Heartbeat::ServerDefault => tune.heartbeat,
                Heartbeat::Disabled => 0,
                Heartbeat::Timeout(t) => *t,
                Heartbeat::Negotiate(decide) => decide(tune.heartbeat),
            };
            st.channel_max = channel_max;
            st.frame_max = frame_max;
            st.heartbeat = heartbeat;
            st.phase = ConnectionState::Tune;
            connection::TuneOk {
                channel_max,
                frame_max,
                heartbeat,
            }
        };
        let heartbeat = tune_ok.heartbeat;
        let open = connection::Open {
            virtual_host: self.shared.state.borrow().params.virtual_host().to_string(),
            ..Default::default()
        };
        self.send(&tune_ok.into());
        self.send(&open.into());
        if heartbeat > 0 {
            self.schedule_heartbeat_send();
            self.schedule_heartbeat_check();
        }
    }

    fn on_open_ok(&self) {
        let callbacks = {
            let mut st = self.shared.state.borrow_mut();
            st.phase = ConnectionState::Open;
            st.workflow.errors.clear();
            let lp = self.shared.ioloop.clone();
            if let Some(t) = st.session.as_mut().and_then(|s| s.stack_timer.take()) {
                lp.remove_timeout(t);
            }
            st.callbacks.on_open_error.clear();
            std::mem::take(&mut st.callbacks.on_open)
        };
        log::info!("connection open");
        for cb in callbacks {
            cb(self);
        }
    }

    fn on_broker_close(&self, phase: ConnectionState, close: connection::Close) {
        // Always answer, during the handshake too.
        self.send_now(&connection::CloseOk {}.into());
        let (code, text) = (close.reply_code, close.reply_text);
        let error = match phase {
            ConnectionState::Start if code == crate::spec::ACCESS_REFUSED => {
                Error::ProbableAuthenticationError {
                    reply_code: code,
                    reply_text: text,
                }
            }
            ConnectionState::Tune if code == crate::spec::NOT_ALLOWED => {
                Error::ProbableAccessDeniedError {
                    reply_code: code,
                    reply_text: text,
                }
            }
            ConnectionState::Start if code == crate::spec::NOT_ALLOWED => {
                Error::ProbableAccessDeniedError {
                    reply_code: code,
                    reply_text: text,
                }
            }
            _ => Error::ConnectionClosedByBroker {
                reply_code: code,
                reply_text: text,
            },
        };
        self.terminate(error);
    }

    fn on_blocked(&self, reason: String) {
        let timeout = {
            let mut st = self.shared.state.borrow_mut();
            st.blocked = Some(reason.clone());
            st.params.blocked_connection_timeout()
        };
        if let Some(t) = timeout {
            let already = self.shared.state.borrow().blocked_timer.is_some();
            if !already {
                let weak = self.weak();
                let timer = self.shared.ioloop.call_later(t, move || {
                    if let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) {
                        conn.shared.state.borrow_mut().blocked_timer = None;
                        if conn.shared.state.borrow().blocked.is_some() {
                            conn.terminate(Error::ConnectionBlockedTimeout { timeout: t });
                        }
                    }
                });
                self.shared.state.borrow_mut().blocked_timer = Some(timer);
            }
        }
        self.run_callbacks(|c| &mut c.on_blocked, |cb| cb(self, &reason));
    }

    fn on_unblocked(&self) {
        let timer = {
            let mut st = self.shared.state.borrow_mut();
            st.blocked = None;
            st.blocked_timer.take()
        };
        if let Some(t) = timer {
            self.shared.ioloop.remove_timeout(t);
        }
        self.run_callbacks(|c| &mut c.on_unblocked, |cb| cb(self));
    }

    /// Calls every callback of a repeating list with no borrow held, then
    /// puts the list back ahead of any added meanwhile — unless the
    /// connection closed meanwhile: then they are dropped.
    fn run_callbacks<T: ?Sized>(
        &self,
        list: fn(&mut Callbacks) -> &mut Vec<Box<T>>,
        mut call: impl FnMut(&mut Box<T>),
    ) {
        let mut callbacks = std::mem::take(list(&mut self.shared.state.borrow_mut().callbacks));
        for cb in callbacks.iter_mut() {
            call(cb);
        }
        let mut st = self.shared.state.borrow_mut();
        if st.phase != ConnectionState::Closed {
            let added = list(&mut st.callbacks);
            callbacks.append(added);
            *added = callbacks;
        }
    }

    // ------------------------------------------------------------------
    // Heartbeats
    // ------------------------------------------------------------------

    fn heartbeat_timeout(&self) -> Option<Duration> {
        let hb = self.shared.state.borrow().heartbeat;
        (hb > 0).then(|| Duration::from_secs(u64::from(hb)))
    }

    fn schedule_heartbeat_send(&self) {
        let Some(timeout) = self.heartbeat_timeout() else {
            return;
        };
        let interval = timeout / 2;
        let due = {
            let st = self.shared.state.borrow();
            let Some(s) = &st.session else { return };
            (s.last_sent + interval).saturating_duration_since(Instant::now())
        };
        let weak = self.weak();
        let timer = self.shared.ioloop.call_later(due, move || {
            let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) else {
                return;
            };
            let idle = {
                let mut st = conn.shared.state.borrow_mut();
                let Some(s) = st.session.as_mut() else { return };
                s.heartbeat_send_timer = None;
                s.last_sent.elapsed() >= interval
            };
            if idle {
                {
                    let mut st = conn.shared.state.borrow_mut();
                    if let Some(s) = st.session.as_mut() {
                        frame::encode_heartbeat(&mut s.outbound);
                    }
                }
                conn.set_interest();
                conn.flush();
            }
            conn.schedule_heartbeat_send();
        });
        if let Some(s) = self.shared.state.borrow_mut().session.as_mut() {
            s.heartbeat_send_timer = Some(timer);
        }
    }

    fn schedule_heartbeat_check(&self) {
        let Some(timeout) = self.heartbeat_timeout() else {
            return;
        };
        let limit = timeout * 2;
        let due = {
            let st = self.shared.state.borrow();
            let Some(s) = &st.session else { return };
            (s.last_received + limit).saturating_duration_since(Instant::now())
        };
        let weak = self.weak();
        let timer = self.shared.ioloop.call_later(due, move || {
            let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) else {
                return;
            };
            let silence = {
                let mut st = conn.shared.state.borrow_mut();
                let Some(s) = st.session.as_mut() else { return };
                s.heartbeat_recv_timer = None;
                s.last_received.elapsed()
            };
            if silence >= limit {
                log::warn!("no data from the broker for {silence:?}: heartbeat timeout");
                conn.terminate(Error::AmqpHeartbeatTimeout { timeout, silence });
            } else {
                conn.schedule_heartbeat_check();
            }
        });
        if let Some(s) = self.shared.state.borrow_mut().session.as_mut() {
            s.heartbeat_recv_timer = Some(timer);
        }
    }

    // ------------------------------------------------------------------
    // Outbound
    // ------------------------------------------------------------------

    /// Encodes a method onto the outbound buffer and arranges the write.
    fn send(&self, method: &Method) {
        if let Err(e) = self.send_on(0, method) {
            log::warn!("cannot send {}: {e}", method.name());
        }
    }

    fn send_on(&self, channel: u16, method: &Method) -> Result<(), Error> {
        self.append_outbound(SendWhen::Connected, method.name(), |out, frame_max| {
            frame::encode_method(out, channel, method, frame_max)
        })
    }

    /// Runs `encode` on the outbound buffer when the connection's state
    /// allows `when`, then arranges the write. The one way bytes are queued.
    fn append_outbound(
        &self,
        when: SendWhen,
        what: &str,
        encode: impl FnOnce(&mut Vec<u8>, u32) -> Result<(), CodecError>,
    ) -> Result<(), Error> {
        {
            let mut st = self.shared.state.borrow_mut();
            let allowed = match when {
                SendWhen::Connected => true,
                SendWhen::OpenOrClosing => {
                    matches!(st.phase, ConnectionState::Open | ConnectionState::Closing)
                }
                SendWhen::Open => st.phase == ConnectionState::Open,
            };
            if !allowed {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {:?}, cannot send {what}", st.phase),
                });
            }
            let frame_max = st.frame_max;
            let Some(s) = st.session.as_mut() else {
                return Err(Error::ConnectionWrongState {
                    detail: "the connection has no socket".into(),
                });
            };
            encode(&mut s.outbound, frame_max)?;
            if s.outbound.len() > st.high_water {
                st.above_high_water = true;
            }
        }
        self.set_interest();
        Ok(())
    }

    /// Sends a method on a channel (used by [`Channel`]).
    pub(crate) fn send_on_channel(&self, channel: u16, method: &Method) -> Result<(), Error> {
        self.append_outbound(SendWhen::OpenOrClosing, method.name(), |out, frame_max| {
            frame::encode_method(out, channel, method, frame_max)
        })
    }

    /// Encodes a Basic.Publish message straight from borrowed names (the
    /// publish hot path; used by [`Channel::basic_publish`]).
    pub(crate) fn send_publish_on_channel(
        &self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &crate::spec::BasicProperties,
        body: &[u8],
    ) -> Result<(), Error> {
        self.append_outbound(SendWhen::Open, "Basic.Publish", |out, frame_max| {
            frame::encode_publish(
                out,
                channel,
                exchange,
                routing_key,
                mandatory,
                properties,
                body,
                frame_max,
            )
        })
    }

    /// Encodes one method frame for `channel` under the negotiated
    /// frame_max (used by [`Channel`] to validate a request at the call and
    /// send it later, in turn).
    pub(crate) fn encode_frame(&self, channel: u16, method: &Method) -> Result<Vec<u8>, Error> {
        let frame_max = self.shared.state.borrow().frame_max;
        let mut out = Vec::new();
        frame::encode_method(&mut out, channel, method, frame_max)?;
        Ok(out)
    }

    /// Appends already encoded frames to the outbound buffer.
    pub(crate) fn send_frame_bytes(&self, bytes: &[u8]) -> Result<(), Error> {
        self.append_outbound(SendWhen::OpenOrClosing, "frames", |out, _| {
            out.extend_from_slice(bytes);
            Ok(())
        })
    }

    /// A consumer tag unique on this connection: `ctag<channel>.<n>`.
    pub(crate) fn next_consumer_tag(&self, channel: u16) -> String {
        let mut st = self.shared.state.borrow_mut();
        st.consumer_tags_issued += 1;
        format!("ctag{channel}.{}", st.consumer_tags_issued)
    }

    /// Encodes and writes at once, best effort, right before the socket is
    /// dropped: a write error here changes nothing (the caller is already
    /// ending the connection with its own reason).
    fn send_now(&self, method: &Method) {
        if self.send_on(0, method).is_err() {
            return;
        }
        let mut st = self.shared.state.borrow_mut();
        if let Some(s) = st.session.as_mut().filter(|s| s.connected) {
            let _ = s.write_out();
        }
    }

    /// Writes as much of the outbound buffer as the socket takes.
    fn flush(&self) {
        let (result, drained) = {
            let mut st = self.shared.state.borrow_mut();
            let low = st.low_water;
            let Some(s) = st.session.as_mut() else { return };
            if !s.connected {
                return;
            }
            let result = s.write_out().map(|_| ());
            let remaining = s.outbound.len();
            let drained = st.above_high_water && remaining < low;
            if drained {
                st.above_high_water = false;
            }
            (result, drained)
        };
        self.set_interest();
        if let Err(e) = result {
            if let Some(reason) = tls_failure(&e) {
                self.tls_failed(reason);
                return;
            }
            if !self.drain_before_failing() {
                return;
            }
            let phase = self.state();
            if phase.is_opening() {
                self.attempt_failed(Error::stream_lost(format!("write failed: {e}"), Some(e)));
                self.next_attempt();
            } else {
                self.on_stream_end(Some(e));
            }
            return;
        }
        if drained {
            self.run_callbacks(|c| &mut c.on_drained, |cb| cb(self));
        }
    }

    // ------------------------------------------------------------------
    // Channels
    // ------------------------------------------------------------------

    /// Opens a channel: the lowest free number when `channel_number` is
    /// `None`. Returns the channel at once, in state OPENING (as pika's
    /// `connection.channel()` does: it can be closed before it opens);
    /// `on_open` receives it once open, or the error that prevented it
    /// (exactly once).
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open,
    /// [`Error::NoFreeChannels`] when every number up to channel_max is
    /// taken, [`Error::InvalidChannelNumber`] for 0, a number above
    /// channel_max, or one in use. Nothing is sent then and `on_open` is
    /// dropped uncalled.
    pub fn channel(
        &self,
        channel_number: Option<u16>,
        on_open: impl FnOnce(Result<Channel, Error>) + 'static,
    ) -> Result<Channel, Error> {
        let channel = {
            let mut st = self.shared.state.borrow_mut();
            if st.phase != ConnectionState::Open {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {:?}, cannot open a channel", st.phase),
                });
            }
            let max = st.channel_max;
            let number = match channel_number {
                Some(0) => {
                    return Err(Error::InvalidChannelNumber {
                        number: 0,
                        reason: "channel 0 is the connection's",
                    });
                }
                Some(n) if n > max => {
                    return Err(Error::InvalidChannelNumber {
                        number: n,
                        reason: "above the negotiated channel_max",
                    });
                }
                Some(n) => {
                    if st.channels.get(n as usize).is_some_and(Option::is_some) {
                        return Err(Error::InvalidChannelNumber {
                            number: n,
                            reason: "in use",
                        });
                    }
                    n
                }
                None => (1..=max)
                    .find(|&n| !st.channels.get(n as usize).is_some_and(Option::is_some))
                    .ok_or(Error::NoFreeChannels { channel_max: max })?,
            };
            let channel = Channel::new_opening(number, self.weak(), Box::new(on_open));
            if st.channels.len() <= number as usize {
                st.channels.resize(number as usize + 1, None);
            }
            st.channels[number as usize] = Some(channel.clone());
            channel
        };
        let sent = self.send_on(
            channel.channel_number(),
            &crate::spec::channel::Open::default().into(),
        );
        if let Err(e) = sent {
            // The call reports the error: its closure is dropped uncalled.
            channel.forget_open_callback();
            let deferred = channel.finish_close(e.clone());
            self.run(deferred);
            return Err(e);
        }
        Ok(channel)
    }

    /// Frees a channel number (after its CloseOk, or when the broker's
    /// Close was answered).
    pub(crate) fn release_channel(&self, number: u16) {
        let mut st = self.shared.state.borrow_mut();
        if let Some(slot) = st.channels.get_mut(number as usize) {
            *slot = None;
        }
        while st.channels.last().is_some_and(Option::is_none) {
            st.channels.pop();
        }
    }

    fn open_channels(&self) -> Vec<Channel> {
        self.shared
            .state
            .borrow()
            .channels
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub(crate) fn run(&self, deferred: Vec<Deferred>) {
        for cb in deferred {
            cb(self);
        }
    }

    // ------------------------------------------------------------------
    // Close
    // ------------------------------------------------------------------

    /// Closes the connection: open channels are closed first, then
    /// Connection.Close is sent and its CloseOk awaited (bounded by
    /// `socket_timeout`); `on_close` then gets
    /// [`Error::ConnectionClosedByClient`]. While the connection is still
    /// opening, the attempt is aborted and `on_open_error` gets
    /// [`Error::ConnectionOpenAborted`].
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when already closing or closed.
    pub fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), Error> {
        let phase = self.state();
        match phase {
            ConnectionState::Closing | ConnectionState::Closed => {
                return Err(Error::ConnectionWrongState {
                    detail: format!("connection is {phase:?}, cannot close it"),
                });
            }
            p if p.is_opening() => {
                // Never a Close handshake before the connection is open.
                let me = self.clone();
                {
                    let mut st = self.shared.state.borrow_mut();
                    st.phase = ConnectionState::Closed;
                }
                self.teardown();
                self.shared.ioloop.call_soon(move || {
                    me.fire_terminal(Error::ConnectionOpenAborted, true);
                });
                return Ok(());
            }
            _ => {}
        }
        let timeout = {
            let mut st = self.shared.state.borrow_mut();
            st.phase = ConnectionState::Closing;
            st.close_reason = Some(Error::ConnectionClosedByClient {
                reply_code,
                reply_text: reply_text.to_string(),
            });
            st.params.socket_timeout().unwrap_or(DEFAULT_CLOSE_TIMEOUT)
        };
        let weak = self.weak();
        let timer = self.shared.ioloop.call_later(timeout, move || {
            if let Some(conn) = weak.upgrade().map(SelectConnection::from_shared) {
                conn.shared.state.borrow_mut().close_timer = None;
                if conn.state() == ConnectionState::Closing {
                    log::warn!(
                        "close handshake not answered within {timeout:?} ({}); dropping the socket",
                        conn.close_progress()
                    );
                    let reason = conn.shared.state.borrow().close_reason.clone();
                    conn.terminate(reason.unwrap_or(Error::ConnectionOpenAborted));
                }
            }
        });
        self.shared.state.borrow_mut().close_timer = Some(timer);
        for ch in self.open_channels() {
            match ch.state() {
                ChannelState::Opening | ChannelState::Open => {
                    if let Err(e) = ch.close(reply_code, reply_text) {
                        log::debug!("channel {} not closed: {e}", ch.channel_number());
                    }
                }
                ChannelState::Closing | ChannelState::Closed => {}
            }
        }
        self.maybe_send_connection_close();
        Ok(())
    }

    /// What our close handshake has sent and what it has not, for the log
    /// when its bound expires.
    fn close_progress(&self) -> String {
        let close_sent = self.shared.state.borrow().close_sent;
        let mut parts: Vec<String> = self
            .open_channels()
            .iter()
            .map(Channel::close_progress)
            .collect();
        parts.push(if close_sent {
            "Connection.Close sent, no Connection.CloseOk".to_string()
        } else {
            "Connection.Close not sent: waiting for the channels to close".to_string()
        });
        parts.join("; ")
    }

    /// Sends our Connection.Close, once, when no channel is left closing.
    fn maybe_send_connection_close(&self) {
        let close = {
            let mut st = self.shared.state.borrow_mut();
            if st.phase != ConnectionState::Closing
                || st.close_sent
                || st.channels.iter().flatten().next().is_some()
            {
                return;
            }
            st.close_sent = true;
            let (reply_code, reply_text) = match &st.close_reason {
                Some(Error::ConnectionClosedByClient {
                    reply_code,
                    reply_text,
                }) => (*reply_code, truncate_short(reply_text)),
                _ => (crate::spec::REPLY_SUCCESS, "Normal shutdown".to_string()),
            };
            connection::Close {
                reply_code,
                reply_text,
                class_id: 0,
                method_id: 0,
            }
        };
        self.send(&close.into());
    }

    /// Ends the connection with `error`: drops the socket and timers, closes
    /// every channel (their close callbacks first), then runs the terminal
    /// callback. Idempotent.
    fn terminate(&self, error: Error) {
        let was_opening = {
            let mut st = self.shared.state.borrow_mut();
            if st.phase == ConnectionState::Closed {
                return;
            }
            let was_opening = st.phase.is_opening();
            st.phase = ConnectionState::Closed;
            was_opening
        };
        log::info!("connection closed: {error}");
        let channels = self.open_channels();
        self.teardown();
        for ch in channels {
            let deferred = ch.finish_close(error.clone());
            self.run(deferred);
        }
        self.fire_terminal(error, was_opening);
    }

    /// Releases the socket, timers and channel table; no user code runs.
    fn teardown(&self) {
        let (session, timers) = {
            let mut st = self.shared.state.borrow_mut();
            let timers = [
                st.close_timer.take(),
                st.blocked_timer.take(),
                st.workflow.retry_timer.take(),
            ];
            (st.session.take(), timers)
        };
        for t in timers.into_iter().flatten() {
            self.shared.ioloop.remove_timeout(t);
        }
        if let Some(s) = session {
            self.drop_session(s);
        }
        let pending = {
            let mut q = self
                .shared
                .threadsafe
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.closed = true;
            std::mem::take(&mut q.callbacks)
        };
        // Closures other threads queued but that never ran: dropped here,
        // on the loop thread, outside the lock.
        drop(pending);
    }

    fn fire_terminal(&self, error: Error, was_opening: bool) {
        let (open_error, close, secrets, channels) = {
            let mut st = self.shared.state.borrow_mut();
            let cbs = std::mem::take(&mut st.callbacks);
            (
                cbs.on_open_error,
                cbs.on_close,
                cbs.update_secret,
                std::mem::take(&mut st.channels),
            )
        };
        drop(channels);
        for cb in secrets {
            cb(self, Err(error.clone()));
        }
        if was_opening {
            for cb in open_error {
                cb(self, error.clone());
            }
        } else {
            for cb in close {
                cb(self, error.clone());
            }
        }
        REGISTRY.with(|r| r.borrow_mut().remove(&self.shared.id));
    }

    /// Replaces the connection's secret (e.g. an expiring OAuth token) with
    /// RabbitMQ's Connection.UpdateSecret; `callback` gets `Ok(())` on
    /// UpdateSecretOk, or the error that closed the connection.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is not open.
    pub fn update_secret(
        &self,
        new_secret: &str,
        reason: &str,
        callback: impl FnOnce(&SelectConnection, Result<(), Error>) + 'static,
    ) -> Result<(), Error> {
        if !self.is_open() {
            return Err(Error::ConnectionWrongState {
                detail: format!("connection is {:?}, cannot update its secret", self.state()),
            });
        }
        let method = connection::UpdateSecret {
            new_secret: LongString::from(new_secret),
            reason: reason.to_string(),
        };
        self.send_on(0, &method.into())?;
        self.shared
            .state
            .borrow_mut()
            .callbacks
            .update_secret
            .push_back(Box::new(callback));
        Ok(())
    }
}

/// Cuts a reply text to the 255 bytes a short string holds.
pub(crate) fn truncate_short(text: &str) -> String {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                Err(Error::Resolve {
                    host: host.to_string(),
                    reason: "no addresses".into(),
                })
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(Error::Resolve {
            host: host.to_string(),
            reason: e.to_string(),
        }),
    }
}

fn open_socket(addr: SocketAddr, params: &ConnectionParameters) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(opts) = params.tcp_options() {
        apply_tcp_options(&SockRef::from(&socket), opts)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock =>
        {
            Ok(socket)
        }
        Err(e) => Err(e),
    }
}

fn apply_tcp_options(socket: &SockRef<'_>, opts: &crate::parameters::TcpOptions) -> io::Result<()> {
    if opts.keepalive {
        let mut ka = TcpKeepalive::new();
        if let Some(idle) = opts.keepalive_idle {
            ka = ka.with_time(idle);
        }
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
        {
            if let Some(interval) = opts.keepalive_interval {
                ka = ka.with_interval(interval);
            }
            if let Some(count) = opts.keepalive_count {
                ka = ka.with_retries(count);
            }
        }
        socket.set_tcp_keepalive(&ka)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(t) = opts.user_timeout {
        socket.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}
