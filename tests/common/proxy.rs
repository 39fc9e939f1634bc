//! PX, the fault-injecting TCP proxy of RELIABILITY.md.
//!
//! A [`Proxy`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to an upstream (the real RabbitMQ of `AMQP_URL`, or a fake
//! broker), byte for byte and without delay, while it can:
//!
//! - cut every open connection with a FIN ([`Proxy::cut_fin`]) or a RST
//!   ([`Proxy::cut_rst`]);
//! - stall one direction with the sockets kept open ([`Proxy::stall`],
//!   [`Proxy::resume`]);
//! - flip bits at a stream offset ([`Proxy::corrupt`]) or splice bytes in at
//!   the next frame boundary ([`Proxy::inject`]);
//! - report what passed: the frames of each direction ([`Proxy::frames`],
//!   [`Proxy::wait_for_frame`]), the longest silence ([`Proxy::max_gap`]),
//!   byte counts and connection counts.
//!
//! Threads only: one acceptor, and per connection one pump thread per
//! direction. A pump reads what arrives and writes it on at once; the frame
//! parsing that feeds the observations works on a copy and never changes
//! what is forwarded. Dropping the proxy closes every socket and ends every
//! thread (joined with a bound; a thread that overstays is left detached,
//! which never keeps the test binary alive).
//!
//! Offsets are positions in the byte stream one side *sent* on one
//! connection, counted from 0 at the connection's first byte (the client's
//! protocol header is bytes 0..8 of `ClientToBroker`). Injected bytes do not
//! count towards them.
//!
//! `cut_rst` needs `SO_LINGER` = 0, which std cannot set: it uses `socket2`
//! (a dependency of `pika`, and so available to its integration tests).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pika::frame::{FRAME_END, Frame, parse_frame};
use pika::spec::Method;

/// How long a blocked proxy thread waits before looking again at the stop
/// and cut flags and at pending injections. Forwarding never waits for it:
/// a read returns as soon as bytes arrive.
const POLL: Duration = Duration::from_millis(20);
/// How long dropping the proxy or cutting a connection waits for threads.
const JOIN_BOUND: Duration = Duration::from_secs(3);
/// How long the proxy tries to reach the upstream for each accepted client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The size of one read.
const CHUNK: usize = 64 * 1024;
/// A frame declaring more than this is not buffered for observation; the
/// direction is reported as [`FrameKind::Garbage`] from there on.
const OBSERVE_LIMIT: u64 = 64 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// What the client sends, on its way to the upstream.
    ClientToBroker,
    /// What the upstream sends, on its way to the client.
    BrokerToClient,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::ClientToBroker, Direction::BrokerToClient];

    fn index(self) -> usize {
        match self {
            Direction::ClientToBroker => 0,
            Direction::BrokerToClient => 1,
        }
    }
}

/// What one observed unit of a stream was.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameKind {
    /// The 8-byte protocol header at the very start of a stream (the
    /// client's, or a broker's answer to a wrong one).
    ProtocolHeader([u8; 8]),
    /// A method frame, decoded.
    Method(Method),
    /// A content header frame.
    Header {
        /// Its class id (60, Basic).
        class_id: u16,
        /// The body size it announces.
        body_size: u64,
    },
    /// A content body frame.
    Body,
    /// A heartbeat frame.
    Heartbeat,
    /// Bytes spliced in by [`Proxy::inject`] (these bytes).
    Injected(Vec<u8>),
    /// A well-delimited frame (size field and frame-end octet in place)
    /// that the codec refuses: unknown frame type or method, bad payload.
    /// Observation goes on with the next frame.
    Undecodable {
        /// The frame-type octet.
        frame_type: u8,
        /// The codec's error.
        error: String,
    },
    /// The stream stopped being frames (bad frame-end octet, a frame too
    /// large to observe, a bad protocol header). Nothing more of this
    /// direction of this connection is observed; forwarding goes on.
    Garbage(String),
}

/// One frame (or protocol header, or injection) that passed the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSummary {
    /// The connection, numbered from 0 in the order accepted.
    pub conn: usize,
    /// What it was.
    pub kind: FrameKind,
    /// Its channel (0 for protocol headers, injections and garbage).
    pub channel: u16,
    /// Its payload size (the frame's size field); 8 for a protocol header,
    /// the byte count for an injection.
    pub size: usize,
    /// Where it starts in the sender's stream (for an injection: the
    /// offset before which it was spliced in).
    pub offset: u64,
    /// When its last byte was forwarded.
    pub at: Instant,
}

impl FrameSummary {
    /// A short name: the method's (`Connection.Start`), or one of
    /// `protocol-header`, `header`, `body`, `heartbeat`, `injected`,
    /// `undecodable`, `garbage`.
    pub fn name(&self) -> &'static str {
        match &self.kind {
            FrameKind::ProtocolHeader(_) => "protocol-header",
            FrameKind::Method(method) => method.name(),
            FrameKind::Header { .. } => "header",
            FrameKind::Body => "body",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::Injected(_) => "injected",
            FrameKind::Undecodable { .. } => "undecodable",
            FrameKind::Garbage(_) => "garbage",
        }
    }

    /// The decoded method, for a method frame.
    pub fn method(&self) -> Option<&Method> {
        match &self.kind {
            FrameKind::Method(method) => Some(method),
            _ => None,
        }
    }
}

/// The fault-injecting proxy; see the module docs.
pub struct Proxy {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    addr: SocketAddr,
    upstream: SocketAddr,
    stop: AtomicBool,
    accepted: AtomicUsize,
    ctl: Mutex<Ctl>,
    /// Signalled on resume, cut and stop.
    ctl_changed: Condvar,
    obs: Mutex<Obs>,
    /// Signalled when bytes or frames were observed.
    obs_changed: Condvar,
}

#[derive(Default)]
struct Ctl {
    stalled: [bool; 2],
    conns: Vec<Arc<Conn>>,
    /// Faults armed while no connection was open, for the next one.
    next: [Faults; 2],
}

#[derive(Default)]
struct Faults {
    /// (stream offset, xor mask), not yet reached.
    corrupt: Vec<(u64, u8)>,
    /// Byte strings waiting for a frame boundary.
    inject: VecDeque<Vec<u8>>,
    /// How many bytes of the sender's stream the pump has handled.
    passed: u64,
}

struct Conn {
    id: usize,
    /// Set by a cut, by the proxy's drop and by a pump that ends the
    /// connection: the pumps stop at once.
    cut: AtomicBool,
    /// Whether each direction's pump still runs.
    running: [AtomicBool; 2],
    /// The client-side and upstream-side sockets, until closed.
    sockets: Mutex<Option<[Arc<TcpStream>; 2]>>,
    faults: [Mutex<Faults>; 2],
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Default)]
struct Obs {
    frames: [Vec<FrameSummary>; 2],
    bytes: [u64; 2],
    /// Indexed by connection id.
    gaps: Vec<[Gap; 2]>,
}

#[derive(Clone, Copy)]
struct Gap {
    last: Instant,
    max: Duration,
    ended: Option<Instant>,
}

impl Gap {
    fn longest(&self, now: Instant) -> Duration {
        let trailing = self
            .ended
            .unwrap_or(now)
            .saturating_duration_since(self.last);
        self.max.max(trailing)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Close {
    Fin,
    Rst,
    Stop,
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` to `upstream` (a `SocketAddr`, or
    /// `"host:port"`). Panics when the upstream does not resolve; an
    /// upstream that refuses makes the proxy close each client it accepts.
    pub fn start(upstream: impl ToSocketAddrs) -> Proxy {
        let upstream = upstream
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("proxy: cannot resolve the upstream address: {e}"))
            .next()
            .unwrap_or_else(|| panic!("proxy: the upstream address resolves to nothing"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: listener address");
        let shared = Arc::new(Shared {
            addr,
            upstream,
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            ctl: Mutex::new(Ctl::default()),
            ctl_changed: Condvar::new(),
            obs: Mutex::new(Obs::default()),
            obs_changed: Condvar::new(),
        });
        let acceptor = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || accept_loop(&shared, listener)
            })
            .expect("proxy: spawn the acceptor");
        Proxy {
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The upstream address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Cuts every open connection cleanly: shutdown(Write) on both sockets
    /// (the client and the upstream see EOF), then close. Returns once the
    /// sockets are closed. New connections are still accepted.
    pub fn cut_fin(&self) {
        self.cut(Close::Fin);
    }

    /// Cuts every open connection with a reset: SO_LINGER 0, then close
    /// (the client and the upstream see ECONNRESET, not EOF). Returns once
    /// the sockets are closed. New connections are still accepted.
    pub fn cut_rst(&self) {
        self.cut(Close::Rst);
    }

    /// Stops forwarding `dir` on every connection, open now or accepted
    /// later, until [`Proxy::resume`]: the proxy stops reading that side
    /// (bytes queue in the kernel, then the sender blocks), and holds what
    /// it already read. Sockets stay open; the other direction flows.
    pub fn stall(&self, dir: Direction) {
        lock(&self.shared.ctl).stalled[dir.index()] = true;
    }

    /// Forwards `dir` again, what was held first.
    pub fn resume(&self, dir: Direction) {
        lock(&self.shared.ctl).stalled[dir.index()] = false;
        self.shared.ctl_changed.notify_all();
    }

    /// XORs the byte at `offset` of the sender's `dir` stream with
    /// `xor_mask` as it passes, once. It applies to the newest connection
    /// whose `dir` is still flowing, or, when there is none, to the next
    /// connection accepted. Panics when that connection already forwarded
    /// the offset (arm it before connecting, or further ahead).
    pub fn corrupt(&self, dir: Direction, offset: u64, xor_mask: u8) {
        self.arm(dir, |faults, conn| {
            if offset < faults.passed {
                Err(format!(
                    "proxy: cannot corrupt offset {offset} of connection #{conn:?} {dir:?}: \
                     {} bytes already passed; arm corrupt() before connecting or further ahead",
                    faults.passed
                ))
            } else {
                faults.corrupt.push((offset, xor_mask));
                Ok(())
            }
        });
    }

    /// Sends `bytes` in `dir` at the next frame boundary of the sender's
    /// stream (right away, within a poll interval of 20 ms, when the
    /// stream is between frames; at offset 0 a stream counts as between
    /// frames, and a client's protocol header counts as one unit). Goes to
    /// the newest connection whose `dir` still flows, or, when there is
    /// none, to the next connection accepted. Held while `dir` is stalled.
    /// Once a direction has turned to garbage, goes out after the next
    /// chunk. Appears in [`Proxy::frames`] as [`FrameKind::Injected`].
    pub fn inject(&self, dir: Direction, bytes: impl Into<Vec<u8>>) {
        let bytes = bytes.into();
        self.arm(dir, move |faults, _| {
            faults.inject.push_back(bytes);
            Ok(())
        });
    }

    /// Everything observed passing in `dir` so far, over all connections,
    /// in order (per connection): the frames as the sender sent them
    /// (a [`Proxy::corrupt`] is not reflected), with injections in place.
    pub fn frames(&self, dir: Direction) -> Vec<FrameSummary> {
        lock(&self.shared.obs).frames[dir.index()].clone()
    }

    /// The first frame observed in `dir` (since the proxy started) that
    /// matches `pred`, waiting up to `timeout` for one; panics naming what
    /// passed when none comes.
    pub fn wait_for_frame(
        &self,
        dir: Direction,
        timeout: Duration,
        pred: impl Fn(&FrameSummary) -> bool,
    ) -> FrameSummary {
        let deadline = Instant::now() + timeout;
        let mut obs = lock(&self.shared.obs);
        loop {
            if let Some(found) = obs.frames[dir.index()].iter().find(|f| pred(f)) {
                return found.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                let names: Vec<_> = obs.frames[dir.index()].iter().map(|f| f.name()).collect();
                drop(obs);
                panic!("proxy: no matching {dir:?} frame within {timeout:?}; passed: {names:?}");
            }
            obs = self
                .shared
                .obs_changed
                .wait_timeout(obs, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The longest time between consecutive bytes passing in `dir`, over
    /// every connection: from its accept to its first byte, between chunks,
    /// and from its last byte to now (or to when that direction ended).
    pub fn max_gap(&self, dir: Direction) -> Duration {
        let now = Instant::now();
        lock(&self.shared.obs)
            .gaps
            .iter()
            .map(|gaps| gaps[dir.index()].longest(now))
            .max()
            .unwrap_or_default()
    }

    /// Bytes of the senders' streams forwarded in `dir` over all
    /// connections (injections not counted).
    pub fn bytes(&self, dir: Direction) -> u64 {
        lock(&self.shared.obs).bytes[dir.index()]
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(SeqCst)
    }

    /// Connections with at least one direction still flowing.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.ctl)
            .conns
            .iter()
            .filter(|c| c.running.iter().any(|r| r.load(SeqCst)))
            .count()
    }

    fn cut(&self, how: Close) {
        let conns = lock(&self.shared.ctl).conns.clone();
        for conn in conns {
            close_conn(&self.shared, &conn, how);
        }
    }

    /// Runs `arm` on the faults of the newest connection still flowing in
    /// `dir`, or on those kept for the next connection; panics with its
    /// error (after the locks are released).
    fn arm(
        &self,
        dir: Direction,
        arm: impl FnOnce(&mut Faults, Option<usize>) -> Result<(), String>,
    ) {
        let d = dir.index();
        let result = {
            let mut ctl = lock(&self.shared.ctl);
            let newest = ctl
                .conns
                .iter()
                .rev()
                .find(|c| c.running[d].load(SeqCst) && !c.cut.load(SeqCst))
                .cloned();
            match newest {
                Some(conn) => arm(&mut lock(&conn.faults[d]), Some(conn.id)),
                None => arm(&mut ctl.next[d], None),
            }
        };
        if let Err(message) = result {
            panic!("{message}");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.ctl_changed.notify_all();
        // Wake the acceptor out of accept().
        let _ = TcpStream::connect_timeout(&self.shared.addr, Duration::from_secs(1));
        let conns = std::mem::take(&mut lock(&self.shared.ctl).conns);
        for conn in conns {
            close_conn(&self.shared, &conn, Close::Stop);
        }
        join_bounded(
            self.acceptor.take().into_iter().collect(),
            Instant::now() + JOIN_BOUND,
        );
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(SeqCst) {
            return;
        }
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        let id = shared.accepted.fetch_add(1, SeqCst);
        let started = Instant::now();
        let upstream = match TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT)
        {
            Ok(upstream) => upstream,
            Err(_) => {
                // As if the broker were unreachable: the client's connection
                // is closed.
                let ended = Gap {
                    last: started,
                    max: Duration::ZERO,
                    ended: Some(started),
                };
                lock(&shared.obs).gaps.push([ended; 2]);
                drop(client);
                continue;
            }
        };
        for socket in [&client, &upstream] {
            let _ = socket.set_nodelay(true);
            let _ = socket.set_read_timeout(Some(POLL));
            let _ = socket.set_write_timeout(Some(POLL));
        }
        let client = Arc::new(client);
        let upstream = Arc::new(upstream);
        let open = Gap {
            last: started,
            max: Duration::ZERO,
            ended: None,
        };
        lock(&shared.obs).gaps.push([open; 2]);
        let conn = Arc::new(Conn {
            id,
            cut: AtomicBool::new(false),
            running: [AtomicBool::new(true), AtomicBool::new(true)],
            sockets: Mutex::new(Some([Arc::clone(&client), Arc::clone(&upstream)])),
            faults: Default::default(),
            pumps: Mutex::new(Vec::new()),
        });
        // Under the control lock, so that faults armed meanwhile land
        // either in `next` (moved here) or on this connection.
        let mut ctl = lock(&shared.ctl);
        for dir in Direction::BOTH {
            let d = dir.index();
            *lock(&conn.faults[d]) = std::mem::take(&mut ctl.next[d]);
            let (from, to) = match dir {
                Direction::ClientToBroker => (Arc::clone(&client), Arc::clone(&upstream)),
                Direction::BrokerToClient => (Arc::clone(&upstream), Arc::clone(&client)),
            };
            let pump = Pump {
                shared: Arc::clone(shared),
                conn: Arc::clone(&conn),
                dir,
                from,
                to,
                parser: Parser::default(),
                offset: 0,
            };
            let handle = thread::Builder::new()
                .name(format!("proxy-{id}-{dir:?}"))
                .spawn(move || pump.run())
                .expect("proxy: spawn a pump thread");
            lock(&conn.pumps).push(handle);
        }
        ctl.conns.push(Arc::clone(&conn));
        drop(ctl);
        if shared.stop.load(SeqCst) {
            // The proxy was dropped while this connection was being set up.
            close_conn(shared, &conn, Close::Stop);
            return;
        }
    }
}

/// Closes one connection's sockets the way `how` says, waits (bounded) for
/// its pumps to end, and drops the last references to the sockets.
fn close_conn(shared: &Shared, conn: &Conn, how: Close) {
    let Some(sockets) = lock(&conn.sockets).take() else {
        return;
    };
    conn.cut.store(true, SeqCst);
    for socket in &sockets {
        match how {
            Close::Fin => {
                let _ = socket.shutdown(Shutdown::Write);
            }
            Close::Rst => {
                let _ = set_linger_zero(socket);
            }
            Close::Stop => {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        // Sends nothing to the peer; wakes a pump blocked reading.
        let _ = socket.shutdown(Shutdown::Read);
    }
    shared.ctl_changed.notify_all();
    let pumps = std::mem::take(&mut *lock(&conn.pumps));
    join_bounded(pumps, Instant::now() + JOIN_BOUND);
    if how == Close::Fin {
        // Closing with unread bytes would send a RST after the FIN.
        for socket in &sockets {
            drain(socket);
        }
    }
    drop(sockets);
}

/// SO_LINGER 0: the next close sends a RST.
fn set_linger_zero(socket: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO))
}

fn drain(socket: &TcpStream) {
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    while let Ok(1..) = (&*socket).read(&mut sink) {}
}

/// Joins each thread that ends before `deadline`; the others are left
/// detached.
fn join_bounded(handles: Vec<JoinHandle<()>>, deadline: Instant) {
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// One direction of one connection.
struct Pump {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    dir: Direction,
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    parser: Parser,
    /// Bytes of the sender's stream read so far.
    offset: u64,
}

enum End {
    Halted,
    Eof,
    ReadFailed,
    WriteFailed,
}

impl Pump {
    fn halted(&self) -> bool {
        self.shared.stop.load(SeqCst) || self.conn.cut.load(SeqCst)
    }

    fn run(mut self) {
        let mut buf = vec![0u8; CHUNK];
        let end = loop {
            if !self.wait_unstalled() {
                break End::Halted;
            }
            if !self.flush_idle_injections() {
                break End::WriteFailed;
            }
            match (&*self.from).read(&mut buf) {
                Ok(0) => break End::Eof,
                Ok(n) => {
                    if !self.wait_unstalled() {
                        break End::Halted;
                    }
                    if !self.forward(&mut buf[..n]) {
                        break End::WriteFailed;
                    }
                }
                Err(e) if is_transient(&e) => {}
                Err(_) => break End::ReadFailed,
            }
        };
        // A cut wakes the pumps with EOFs and errors of its own making.
        let end = if self.halted() { End::Halted } else { end };
        self.finish(end);
    }

    fn finish(self, end: End) {
        match end {
            End::Halted => {}
            End::Eof => {
                // Pass the half-close on; the other direction goes on.
                let _ = self.to.shutdown(Shutdown::Write);
            }
            End::ReadFailed => {
                // The sender reset: reset the receiver too.
                let _ = set_linger_zero(&self.to);
                self.conn.cut.store(true, SeqCst);
                let _ = self.to.shutdown(Shutdown::Read);
                self.shared.ctl_changed.notify_all();
            }
            End::WriteFailed => {
                self.conn.cut.store(true, SeqCst);
                let _ = self.from.shutdown(Shutdown::Both);
                let _ = self.to.shutdown(Shutdown::Both);
                self.shared.ctl_changed.notify_all();
            }
        }
        {
            let mut obs = lock(&self.shared.obs);
            obs.gaps[self.conn.id][self.dir.index()].ended = Some(Instant::now());
        }
        self.shared.obs_changed.notify_all();
        self.conn.running[self.dir.index()].store(false, SeqCst);
        if !self.conn.running.iter().any(|r| r.load(SeqCst)) {
            // The last pump out closes the sockets (unless a cut holds them).
            drop(lock(&self.conn.sockets).take());
        }
    }

    /// Waits while this direction is stalled; false when halted.
    fn wait_unstalled(&self) -> bool {
        let mut ctl = lock(&self.shared.ctl);
        while ctl.stalled[self.dir.index()] && !self.halted() {
            ctl = self
                .shared
                .ctl_changed
                .wait_timeout(ctl, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !self.halted()
    }

    /// Writes pending injections while the stream stands between frames.
    /// False when writing failed.
    fn flush_idle_injections(&mut self) -> bool {
        if !self.parser.at_boundary() && !self.parser.broken {
            return true;
        }
        let pending: Vec<Vec<u8>> = lock(&self.conn.faults[self.dir.index()])
            .inject
            .drain(..)
            .collect();
        if pending.is_empty() {
            return true;
        }
        let summaries = pending
            .iter()
            .map(|bytes| self.injected(bytes.clone(), self.offset))
            .collect();
        self.observe(0, summaries);
        pending.iter().all(|bytes| self.write(bytes))
    }

    /// Forwards one chunk read from the sender, with the faults due in it.
    /// False when writing failed.
    fn forward(&mut self, chunk: &mut [u8]) -> bool {
        let start = self.offset;
        let end = start + chunk.len() as u64;
        let was_boundary = self.parser.at_boundary();
        let seen = self.parser.feed(chunk, start);
        self.offset = end;
        let (injections, split) = {
            let mut faults = lock(&self.conn.faults[self.dir.index()]);
            faults.corrupt.retain(|&(at, mask)| {
                if (start..end).contains(&at) {
                    chunk[(at - start) as usize] ^= mask;
                    false
                } else {
                    true
                }
            });
            faults.passed = end;
            let split = if faults.inject.is_empty() {
                None
            } else if was_boundary {
                Some(0)
            } else if let Some(first) = seen
                .iter()
                .find(|s| !matches!(s.kind, FrameKind::Garbage(_)))
            {
                // The first unit completed in this chunk ends in it.
                Some((first.end.max(start) - start) as usize)
            } else if self.parser.broken {
                Some(chunk.len())
            } else {
                None
            };
            let injections: Vec<Vec<u8>> = match split {
                Some(_) => faults.inject.drain(..).collect(),
                None => Vec::new(),
            };
            (injections, split.unwrap_or(chunk.len()))
        };
        let split_offset = start + split as u64;
        let mut summaries = Vec::with_capacity(seen.len() + injections.len());
        let mut seen = seen.into_iter().peekable();
        while let Some(s) = seen.next_if(|s| s.end <= split_offset) {
            summaries.push(self.summary(s));
        }
        for bytes in &injections {
            summaries.push(self.injected(bytes.clone(), split_offset));
        }
        summaries.extend(seen.map(|s| self.summary(s)));
        // Recorded before they are passed on: a peer's answer to these
        // frames can reach the test no earlier than the record.
        self.observe(chunk.len() as u64, summaries);
        if !self.write(&chunk[..split]) {
            return false;
        }
        for bytes in &injections {
            if !self.write(bytes) {
                return false;
            }
        }
        self.write(&chunk[split..])
    }

    /// Writes all of `data` to the receiver; false when that fails or the
    /// connection was halted meanwhile.
    fn write(&self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.halted() {
                return false;
            }
            match (&*self.to).write(data) {
                Ok(0) => return false,
                Ok(n) => data = &data[n..],
                Err(e) if is_transient(&e) => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn summary(&self, seen: Seen) -> FrameSummary {
        FrameSummary {
            conn: self.conn.id,
            kind: seen.kind,
            channel: seen.channel,
            size: seen.size,
            offset: seen.offset,
            at: Instant::now(),
        }
    }

    fn injected(&self, bytes: Vec<u8>, offset: u64) -> FrameSummary {
        FrameSummary {
            conn: self.conn.id,
            size: bytes.len(),
            kind: FrameKind::Injected(bytes),
            channel: 0,
            offset,
            at: Instant::now(),
        }
    }

    /// Records bytes that just passed and the frames they completed.
    fn observe(&self, source_bytes: u64, summaries: Vec<FrameSummary>) {
        let now = Instant::now();
        let d = self.dir.index();
        {
            let mut obs = lock(&self.shared.obs);
            obs.bytes[d] += source_bytes;
            let gap = &mut obs.gaps[self.conn.id][d];
            gap.max = gap.max.max(now.saturating_duration_since(gap.last));
            gap.last = now;
            obs.frames[d].extend(summaries);
        }
        self.shared.obs_changed.notify_all();
    }
}

/// A frame (or header) the parser completed, before it is timed.
struct Seen {
    offset: u64,
    end: u64,
    kind: FrameKind,
    channel: u16,
    size: usize,
}

/// Splits a copy of one sender's stream into frames, for observation and to
/// find frame boundaries.
#[derive(Default)]
struct Parser {
    /// Bytes of an incomplete frame.
    buf: Vec<u8>,
    /// The stream offset of `buf[0]`.
    base: u64,
    /// The stream stopped being frames.
    broken: bool,
}

impl Parser {
    fn at_boundary(&self) -> bool {
        !self.broken && self.buf.is_empty()
    }

    /// Appends `chunk` (which starts at stream offset `start`) and returns
    /// the units it completed.
    fn feed(&mut self, chunk: &[u8], start: u64) -> Vec<Seen> {
        let mut seen = Vec::new();
        if self.broken {
            return seen;
        }
        debug_assert_eq!(self.base + self.buf.len() as u64, start);
        self.buf.extend_from_slice(chunk);
        let mut pos = 0usize;
        while pos < self.buf.len() {
            let offset = self.base + pos as u64;
            let rest = &self.buf[pos..];
            if offset == 0 && rest[0] == b'A' {
                let n = rest.len().min(4);
                if rest[..n] != b"AMQP"[..n] {
                    self.broken = true;
                    seen.push(garbage(
                        offset,
                        "starts with 'A' but is no AMQP header".into(),
                    ));
                    break;
                }
                if rest.len() < 8 {
                    break;
                }
                let mut header = [0u8; 8];
                header.copy_from_slice(&rest[..8]);
                seen.push(Seen {
                    offset,
                    end: offset + 8,
                    kind: FrameKind::ProtocolHeader(header),
                    channel: 0,
                    size: 8,
                });
                pos += 8;
                continue;
            }
            if rest.len() < 7 {
                break;
            }
            let frame_type = rest[0];
            let channel = u16::from_be_bytes([rest[1], rest[2]]);
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]);
            let total = u64::from(size) + 8;
            if total > OBSERVE_LIMIT {
                self.broken = true;
                seen.push(garbage(
                    offset,
                    format!("a frame of {total} bytes (type {frame_type}) is too large to observe"),
                ));
                break;
            }
            let total = total as usize;
            if rest.len() < total {
                break;
            }
            if rest[total - 1] != FRAME_END {
                self.broken = true;
                seen.push(garbage(
                    offset,
                    format!(
                        "frame-end octet 0x{:02x} of a type-{frame_type} frame of {total} bytes",
                        rest[total - 1]
                    ),
                ));
                break;
            }
            let kind = match parse_frame(&rest[..total], 0) {
                Ok(Some((Frame::Method { method, .. }, _))) => FrameKind::Method(method),
                Ok(Some((Frame::Header { header, .. }, _))) => FrameKind::Header {
                    class_id: header.class_id,
                    body_size: header.body_size,
                },
                Ok(Some((Frame::Body { .. }, _))) => FrameKind::Body,
                Ok(Some((Frame::Heartbeat, _))) => FrameKind::Heartbeat,
                Ok(None) => FrameKind::Undecodable {
                    frame_type,
                    error: "the codec wants more bytes than the frame has".into(),
                },
                Err(e) => FrameKind::Undecodable {
                    frame_type,
                    error: e.to_string(),
                },
            };
            seen.push(Seen {
                offset,
                end: offset + total as u64,
                kind,
                channel,
                size: size as usize,
            });
            pos += total;
        }
        if self.broken {
            self.buf = Vec::new();
        } else {
            self.buf.drain(..pos);
            self.base += pos as u64;
        }
        seen
    }
}

fn garbage(offset: u64, why: String) -> Seen {
    Seen {
        offset,
        end: offset,
        kind: FrameKind::Garbage(why),
        channel: 0,
        size: 0,
    }
}
