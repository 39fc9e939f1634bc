//! FS, the scripted fake broker of RELIABILITY.md, for what a real broker
//! will not do.
//!
//! [`FakeBroker::start`] listens on `127.0.0.1:0`, accepts one connection
//! and runs a script on it in a thread; [`FakeBroker::start_many`] does the
//! same for `n` connections, one script thread each. The listener closes
//! once all are accepted (later connection attempts are refused). A script
//! drives its [`FakeConn`] with blocking helpers that panic with a clear
//! message on anything unexpected; [`FakeBroker::join`] turns a script's
//! panic into the test's failure and gives up on a stuck script after a
//! timeout.
//!
//! When a script returns, its connection is closed (FIN). To keep it open
//! until the client closes it, end the script with
//! [`FakeConn::read_until_eof`]; to keep it open until the broker is
//! dropped, with [`FakeConn::stall_forever`] (and do not `join`).
//!
//! Dropping the broker stops everything: the listener, and every script
//! (its socket is shut down; a script blocked in a helper ends quietly).
//! Dropping never fails the test: call `join` to see the scripts' failures.

#![allow(dead_code)]

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pika::frame::{
    ContentHeader, FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER, encode_heartbeat, encode_message,
    encode_method, parse_frame,
};
use pika::spec::{Method, MethodDef, connection};
use pika::{BasicProperties, FieldTable, LongString};

/// How long a [`FakeConn`] read waits for the client by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`FakeBroker::join`] waits for the scripts.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a sleeping or stalled script looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long dropping the broker waits for its threads.
const JOIN_BOUND: Duration = Duration::from_secs(3);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An owned frame, as a script reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedFrame {
    /// A method frame: channel, method.
    Method(u16, Method),
    /// A content header frame: channel, header.
    Header(u16, ContentHeader),
    /// A content body frame: channel, payload.
    Body(u16, Vec<u8>),
    /// A heartbeat frame.
    Heartbeat,
}

impl OwnedFrame {
    /// Copies a parsed frame out of its buffer.
    pub fn from_frame(frame: Frame<'_>) -> OwnedFrame {
        match frame {
            Frame::Method { channel, method } => OwnedFrame::Method(channel, method),
            Frame::Header { channel, header } => OwnedFrame::Header(channel, header),
            Frame::Body { channel, payload } => OwnedFrame::Body(channel, payload.to_vec()),
            Frame::Heartbeat => OwnedFrame::Heartbeat,
        }
    }
}

/// Decodes `bytes` (frames only, no protocol header) into frames, with no
/// frame_max; panics on a codec error or a trailing partial frame. For
/// what [`FakeConn::read_until_eof`] returns.
pub fn decode_frames(bytes: &[u8]) -> Vec<OwnedFrame> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match parse_frame(rest, 0) {
            Ok(Some((frame, used))) => {
                frames.push(OwnedFrame::from_frame(frame));
                rest = &rest[used..];
            }
            Ok(None) => panic!(
                "decode_frames: {} trailing bytes are no whole frame: {rest:02x?} (after {frames:?})",
                rest.len()
            ),
            Err(e) => panic!(
                "decode_frames: {e} at byte {} (after {frames:?})",
                bytes.len() - rest.len()
            ),
        }
    }
    frames
}

/// A Connection.Start like RabbitMQ 3.10's: its server properties (product
/// `RabbitMQ`, version, platform, the capabilities table with
/// publisher_confirms, exchange_exchange_bindings, basic.nack,
/// consumer_cancel_notify, connection.blocked, consumer_priorities,
/// authentication_failure_close, per_consumer_qos, direct_reply_to all
/// true), mechanisms `PLAIN AMQPLAIN`, locales `en_US`.
pub fn rabbitmq_start() -> connection::Start {
    let mut capabilities = FieldTable::new();
    for capability in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        capabilities.insert(capability, true);
    }
    let mut props = FieldTable::new();
    props.insert("capabilities", capabilities);
    props.insert("cluster_name", "rabbit@fake-broker");
    props.insert(
        "copyright",
        "Copyright (c) 2007-2022 VMware, Inc. or its affiliates.",
    );
    props.insert(
        "information",
        "Licensed under the MPL 2.0. Website: https://rabbitmq.com",
    );
    props.insert("platform", "Erlang/OTP 24.3.4");
    props.insert("product", "RabbitMQ");
    props.insert("version", "3.10.0");
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: LongString::from("PLAIN AMQPLAIN"),
        locales: LongString::from("en_US"),
    }
}

/// RabbitMQ's default Connection.Tune: channel_max 2047, frame_max 131072,
/// heartbeat 60.
pub fn rabbitmq_tune() -> connection::Tune {
    connection::Tune {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
    }
}

/// The scripted fake broker; see the module docs.
pub struct FakeBroker {
    addr: SocketAddr,
    expected: usize,
    shared: Arc<BrokerShared>,
    results: Receiver<(usize, Outcome)>,
    acceptor: Option<JoinHandle<()>>,
}

struct BrokerShared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    /// A clone of each script's socket still open, by connection index, to
    /// shut it down when the broker is dropped.
    streams: Mutex<HashMap<usize, TcpStream>>,
    scripts: Mutex<Vec<JoinHandle<()>>>,
}

enum Outcome {
    Done,
    Failed(String),
    Stopped,
}

/// The unwind payload that ends a script quietly once the broker is
/// dropped (`resume_unwind` runs no panic hook).
struct Stopped;

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

impl FakeBroker {
    /// Listens on `127.0.0.1:0` and runs `script` on the first connection.
    pub fn start(script: impl FnOnce(FakeConn) + Send + 'static) -> FakeBroker {
        let script = Mutex::new(Some(script));
        FakeBroker::launch(1, move |conn| {
            let script = lock(&script).take();
            if let Some(script) = script {
                script(conn);
            }
        })
    }

    /// Listens on `127.0.0.1:0` and runs `script` on each of the first `n`
    /// connections, concurrently ([`FakeConn::index`] tells them apart).
    pub fn start_many(n: usize, script: impl Fn(FakeConn) + Send + Sync + 'static) -> FakeBroker {
        FakeBroker::launch(n, script)
    }

    fn launch(n: usize, script: impl Fn(FakeConn) + Send + Sync + 'static) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake broker: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake broker: listener address");
        let shared = Arc::new(BrokerShared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            streams: Mutex::new(HashMap::new()),
            scripts: Mutex::new(Vec::new()),
        });
        let (results_tx, results) = mpsc::channel();
        let script = Arc::new(script);
        let acceptor = thread::Builder::new()
            .name("fake-broker-accept".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    for index in 0..n {
                        let stream = loop {
                            let accepted = listener.accept();
                            if shared.stop.load(SeqCst) {
                                return;
                            }
                            match accepted {
                                Ok((stream, _)) => break stream,
                                Err(_) => thread::sleep(POLL),
                            }
                        };
                        shared.accepted.fetch_add(1, SeqCst);
                        let conn = FakeConn::new(stream, index, Arc::clone(&shared));
                        let script = Arc::clone(&script);
                        let results_tx = results_tx.clone();
                        let handle = thread::Builder::new()
                            .name(format!("fake-broker-{index}"))
                            .spawn(move || {
                                let run = panic::catch_unwind(AssertUnwindSafe(|| (*script)(conn)));
                                let outcome = match run {
                                    Ok(()) => Outcome::Done,
                                    Err(payload) if payload.is::<Stopped>() => Outcome::Stopped,
                                    Err(payload) => Outcome::Failed(panic_message(&*payload)),
                                };
                                let _ = results_tx.send((index, outcome));
                            })
                            .expect("fake broker: spawn a script thread");
                        lock(&shared.scripts).push(handle);
                    }
                }
            })
            .expect("fake broker: spawn the acceptor");
        FakeBroker {
            addr,
            expected: n,
            shared,
            results,
            acceptor: Some(acceptor),
        }
    }

    /// The address the client connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(SeqCst)
    }

    /// Waits up to [`DEFAULT_JOIN_TIMEOUT`] for every script to finish;
    /// panics with a script's panic message, or when one is still running
    /// (or its connection never came).
    pub fn join(self) {
        self.join_timeout(DEFAULT_JOIN_TIMEOUT);
    }

    /// [`FakeBroker::join`] with a timeout of your choice.
    pub fn join_timeout(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut finished = 0;
        while finished < self.expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok((_, Outcome::Done)) => finished += 1,
                Ok((index, Outcome::Failed(message))) => {
                    panic!("fake broker: the script of connection #{index} failed: {message}")
                }
                Ok((index, Outcome::Stopped)) => {
                    panic!("fake broker: the script of connection #{index} was stopped")
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        if finished < self.expected {
            panic!(
                "fake broker: {finished} of {} scripts finished within {timeout:?}, with {} \
                 connections accepted: a script is stuck, or the client never connected",
                self.expected,
                self.accepted()
            );
        }
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        // Wake the acceptor if it still waits for a connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, stream) in lock(&self.shared.streams).drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + JOIN_BOUND;
        let mut handles: Vec<JoinHandle<()>> = self.acceptor.take().into_iter().collect();
        handles.append(&mut lock(&self.shared.scripts));
        for handle in handles {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

/// Waits until every byte written to `stream` has left its send queue (the
/// kernel's SIOCOUTQ is 0): it is in the peer's receive buffer, so a RST
/// sent now cannot discard it. Panics after `bound`.
pub fn wait_until_sent(stream: &TcpStream, bound: Duration) {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + bound;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (= SIOCOUTQ on Linux) writes one int through the
        // pointer, which points at a live c_int.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        if queued == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queued} bytes still unsent after {bound:?}"
        );
        std::thread::yield_now();
    }
}

/// The broker's side of one connection, for a script.
///
/// Reads panic with a clear message when the client sends nothing for
/// the timeout (default [`DEFAULT_TIMEOUT`]), closes the connection, or
/// sends what the codec refuses. Writes panic when the socket fails.
pub struct FakeConn {
    stream: TcpStream,
    index: usize,
    shared: Arc<BrokerShared>,
    buffer: Vec<u8>,
    timeout: Duration,
    reset_on_drop: bool,
    /// The largest frame accepted from the client, framing included (0: no
    /// limit): [`FRAME_MIN_SIZE`] until [`FakeConn::handshake`] sets the
    /// client's TuneOk value. Also splits bodies in
    /// [`FakeConn::send_message`]. What a script sends with
    /// [`FakeConn::send_method`] is never checked against it.
    pub frame_max: u32,
    /// The client's Connection.StartOk, once [`FakeConn::handshake`] read it.
    pub start_ok: Option<connection::StartOk>,
    /// The client's Connection.TuneOk, once [`FakeConn::handshake`] read it.
    pub tune_ok: Option<connection::TuneOk>,
    /// The client's Connection.Open, once [`FakeConn::handshake`] read it.
    pub open: Option<connection::Open>,
}

impl fmt::Debug for FakeConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConn")
            .field("index", &self.index)
            .field("peer", &self.stream.peer_addr().ok())
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

/// The end of the client's stream.
struct Eof;

impl FakeConn {
    fn new(stream: TcpStream, index: usize, shared: Arc<BrokerShared>) -> FakeConn {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(DEFAULT_TIMEOUT));
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.streams).insert(index, clone);
        }
        FakeConn {
            stream,
            index,
            shared,
            buffer: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            reset_on_drop: false,
            frame_max: FRAME_MIN_SIZE,
            start_ok: None,
            tune_ok: None,
            open: None,
        }
    }

    /// Which connection this is (0 for the first accepted).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.stream.peer_addr().expect("fake broker: peer address")
    }

    /// The socket, for anything the helpers do not cover.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// How long later reads wait for the client.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self.stream.set_read_timeout(Some(timeout));
    }

    /// Ends the script quietly when the broker was dropped.
    fn check_stopped(&self) {
        if self.shared.stop.load(SeqCst) {
            panic::resume_unwind(Box::new(Stopped));
        }
    }

    /// Reads once more into the buffer. `Err(Eof)` when the client closed
    /// (or reset) the connection; panics on a timeout or another error.
    fn fill(&mut self, what: &str) -> Result<(), Eof> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.check_stopped();
                    return Err(Eof);
                }
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.check_stopped();
                    panic!(
                        "fake broker #{}: the client sent nothing for {:?} while the script \
                         waited for {what}; {} bytes buffered: {:02x?}",
                        self.index,
                        self.timeout,
                        self.buffer.len(),
                        self.buffer
                    );
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    self.check_stopped();
                    return Err(Eof);
                }
                Err(e) => {
                    self.check_stopped();
                    panic!(
                        "fake broker #{}: reading from the client failed ({e}) while the \
                         script waited for {what}",
                        self.index
                    );
                }
            }
        }
    }

    fn closed_while(&self, what: &str) -> ! {
        panic!(
            "fake broker #{}: the client closed the connection while the script waited for \
             {what}; {} bytes buffered: {:02x?}",
            self.index,
            self.buffer.len(),
            self.buffer
        );
    }

    /// Reads the 8 bytes a client sends first (whatever they are).
    pub fn read_protocol_header(&mut self) -> [u8; 8] {
        const WHAT: &str = "the protocol header";
        while self.buffer.len() < 8 {
            if self.fill(WHAT).is_err() {
                self.closed_while(WHAT);
            }
        }
        let mut header = [0u8; 8];
        header.copy_from_slice(&self.buffer[..8]);
        self.buffer.drain(..8);
        header
    }

    /// The next frame, or `None` when the client closed the connection
    /// between frames.
    pub fn try_read_frame(&mut self) -> Option<OwnedFrame> {
        const WHAT: &str = "a frame";
        loop {
            match parse_frame(&self.buffer, self.frame_max) {
                Ok(Some((frame, used))) => {
                    let frame = OwnedFrame::from_frame(frame);
                    self.buffer.drain(..used);
                    return Some(frame);
                }
                Ok(None) => {}
                Err(e) => panic!(
                    "fake broker #{}: the client sent what the codec refuses: {e}; bytes: {:02x?}",
                    self.index,
                    &self.buffer[..self.buffer.len().min(64)]
                ),
            }
            if self.fill(WHAT).is_err() {
                if self.buffer.is_empty() {
                    return None;
                }
                self.closed_while("the rest of a frame");
            }
        }
    }

    /// The next frame, heartbeats included.
    pub fn read_frame(&mut self) -> OwnedFrame {
        self.try_read_frame()
            .unwrap_or_else(|| self.closed_while("a frame"))
    }

    /// The next method frame (heartbeats are passed over); panics on content
    /// frames.
    pub fn read_method(&mut self) -> (u16, Method) {
        loop {
            match self.read_frame() {
                OwnedFrame::Method(channel, method) => return (channel, method),
                OwnedFrame::Heartbeat => {}
                other => panic!(
                    "fake broker #{}: expected a method frame, got {other:?}",
                    self.index
                ),
            }
        }
    }

    /// The next method (heartbeats skipped), which must be a `T` on
    /// `channel`.
    pub fn expect<T>(&mut self, channel: u16) -> T
    where
        T: MethodDef + TryFrom<Method, Error = Method>,
    {
        let (got_channel, method) = self.read_method();
        match T::try_from(method) {
            Ok(wanted) if got_channel == channel => wanted,
            Ok(_) => panic!(
                "fake broker #{}: expected {} on channel {channel}, got it on channel {got_channel}",
                self.index,
                T::NAME
            ),
            Err(other) => panic!(
                "fake broker #{}: expected {} on channel {channel}, got {other:?} on channel \
                 {got_channel}",
                self.index,
                T::NAME
            ),
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send_raw(bytes) {
            self.check_stopped();
            panic!(
                "fake broker #{}: sending {} bytes to the client failed: {e}",
                self.index,
                bytes.len()
            );
        }
    }

    /// Sends raw bytes, returning the error (for a client that may be gone).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one method frame (encoded with no frame_max, so a script can
    /// send an oversized one on purpose).
    pub fn send_method(&mut self, channel: u16, method: impl Into<Method>) {
        let method = method.into();
        let mut out = Vec::new();
        encode_method(&mut out, channel, &method, 0)
            .unwrap_or_else(|e| panic!("fake broker: cannot encode {method:?}: {e}"));
        self.send_raw(&out);
    }

    /// Sends a content-carrying method (Basic.Deliver, Basic.Return,
    /// Basic.GetOk) with its header and body frames, split at `frame_max`.
    pub fn send_message(
        &mut self,
        channel: u16,
        method: impl Into<Method>,
        properties: &BasicProperties,
        body: &[u8],
    ) {
        let method = method.into();
        let mut out = Vec::new();
        encode_message(&mut out, channel, &method, properties, body, self.frame_max)
            .unwrap_or_else(|e| panic!("fake broker: cannot encode {method:?} with content: {e}"));
        self.send_raw(&out);
    }

    /// Sends a heartbeat frame.
    pub fn send_heartbeat(&mut self) {
        let mut out = Vec::new();
        encode_heartbeat(&mut out);
        self.send_raw(&out);
    }

    /// Sends [`rabbitmq_start`] on channel 0.
    pub fn start_default(&mut self) {
        self.send_method(0, rabbitmq_start());
    }

    /// The whole server side of the handshake: reads the protocol header
    /// (which must be AMQP 0-9-1's), sends [`rabbitmq_start`], reads
    /// StartOk, sends `tune`, reads TuneOk and Open, sends OpenOk. Keeps
    /// StartOk, TuneOk and Open in the public fields, sets `frame_max` to
    /// the client's TuneOk value, and returns the StartOk.
    pub fn handshake(&mut self, tune: connection::Tune) -> connection::StartOk {
        let header = self.read_protocol_header();
        assert_eq!(
            header, PROTOCOL_HEADER,
            "fake broker #{}: the client's protocol header is not AMQP 0-9-1's",
            self.index
        );
        self.start_default();
        let start_ok = self.expect::<connection::StartOk>(0);
        self.start_ok = Some(start_ok.clone());
        self.send_method(0, tune);
        let tune_ok = self.expect::<connection::TuneOk>(0);
        self.tune_ok = Some(tune_ok.clone());
        let open = self.expect::<connection::Open>(0);
        self.open = Some(open);
        self.send_method(0, connection::OpenOk::default());
        self.frame_max = tune_ok.frame_max;
        start_ok
    }

    /// Half-closes: the client reads EOF; the script can still read.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Closes the connection with a FIN (unread input discarded first, so
    /// no RST follows), as dropping the `FakeConn` does.
    pub fn close_socket(self) {
        drop(self);
    }

    /// Closes the connection with a RST (SO_LINGER 0): the client reads
    /// ECONNRESET.
    pub fn reset(mut self) {
        socket2::SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("fake broker: set SO_LINGER 0");
        self.reset_on_drop = true;
    }

    /// Waits until every byte sent so far is in the client's receive
    /// buffer (see [`wait_until_sent`]).
    pub fn wait_until_sent(&self, bound: Duration) {
        wait_until_sent(&self.stream, bound);
    }

    /// Makes the end of the script close the socket with the client's
    /// unread input still in it, as a broker does that closes on a client
    /// still writing: the kernel answers with a RST, and the client's next
    /// write fails (EPIPE or ECONNRESET) although what was sent before is
    /// in its receive buffer.
    pub fn close_with_unread_input(&mut self) {
        self.reset_on_drop = true;
    }

    /// Neither reads nor writes until the broker is dropped (then the
    /// script ends quietly). A script ending so must not be `join`ed.
    pub fn stall_forever(&self) -> ! {
        loop {
            self.check_stopped();
            thread::sleep(POLL);
        }
    }

    /// Sleeps for `duration` (ending the script quietly if the broker is
    /// dropped meanwhile).
    pub fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        loop {
            self.check_stopped();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(POLL));
        }
    }

    /// Everything the client sends until it closes the connection (a reset
    /// counts as closing), the bytes already buffered first; panics when it
    /// is still open after `timeout`. [`decode_frames`] decodes the result.
    pub fn read_until_eof(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.check_stopped();
                panic!(
                    "fake broker #{}: the client did not close the connection within \
                     {timeout:?}; it sent {} bytes: {:02x?}",
                    self.index,
                    self.buffer.len(),
                    &self.buffer[..self.buffer.len().min(256)]
                );
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    self.check_stopped();
                    panic!("fake broker #{}: reading until EOF failed: {e}", self.index);
                }
            }
        }
        self.check_stopped();
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        std::mem::take(&mut self.buffer)
    }
}

impl Drop for FakeConn {
    fn drop(&mut self) {
        // Drop the broker's clone so that closing this socket really closes
        // the connection.
        drop(lock(&self.shared.streams).remove(&self.index));
        if !self.reset_on_drop {
            // A FIN, and no RST after it for input left unread.
            let _ = self.stream.shutdown(Shutdown::Write);
            if self.stream.set_nonblocking(true).is_ok() {
                let mut sink = [0u8; 4096];
                while let Ok(1..) = (&self.stream).read(&mut sink) {}
            }
        }
    }
}
