//! The blocking face's driver: one protocol core, its socket, a poller of
//! its own and the face's bookkeeping, behind one mutex, driven by
//! whichever thread is waiting for something.
//!
//! Design notes (not API):
//! * Every blocking call is "queue a command, then wait until a condition
//!   holds": [`Engine::wait`] polls the socket (with the lock released),
//!   hands each frame to the core, and routes the core's events — replies
//!   to a map by request id, deliveries and other callbacks to a dispatch
//!   queue that only `process_data_events` (and so `sleep`,
//!   `start_consuming`) empties. No user code runs under the lock.
//! * One thread drives at a time (`driving`); another thread that has to
//!   wait sleeps on a condition variable and re-checks after each turn, so
//!   handles moved to other threads stay correct.
//! * Writes are coalesced. A command (publish, ack, …) appends to the
//!   core's buffer. When nothing was written for [`FLUSH_DELAY`], the
//!   calling thread writes at once (a trickle of messages leaves one by
//!   one, as pika's would). Within a burst it writes when the buffer is
//!   full ([`FLUSH_AT`]) or its oldest byte has waited [`FLUSH_DELAY`]
//!   (looked at every [`CHECK_EVERY`] commands), and before every wait. A
//!   flusher thread covers an application that goes quiet with bytes
//!   queued: it ticks while commands keep coming, writing what has waited
//!   [`FLUSH_DELAY`] — every [`FLUSH_TICK`] after it wrote something,
//!   backing off to [`FLUSH_TICK_MAX`] while the application's own calls
//!   do the writing — and sleeps on a condition variable after
//!   [`FLUSH_IDLE_AFTER`] with nothing queued. So a burst costs one write
//!   per [`FLUSH_DELAY`] or [`FLUSH_AT`], the flusher a few hundred
//!   wake-ups a second at most however many messages go by, and the last
//!   publish of a burst leaves within `FLUSH_DELAY + FLUSH_TICK_MAX`
//!   without another call.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use polling::{Event as PollEvent, PollMode, Poller};

use crate::error::Error;
use crate::message::{Delivery, ReturnedMessage};
use crate::protocol::{self, ChannelKey, ConsumerId, Event, Reply, RequestId};
use crate::spec::{basic, connection};
use crate::transport::{Stream, tls_failure};

/// The poller key of the connection's socket.
const SOCKET_KEY: usize = 0;
/// How much one read asks for.
const READ_CHUNK: usize = 64 * 1024;
/// How many reads one turn may do before the deadlines get their turn.
const READS_PER_TURN: usize = 16;
/// Queued bytes are written once the oldest has waited this long.
pub(super) const FLUSH_DELAY: Duration = Duration::from_millis(1);
/// The flusher's shortest period, after it had something to write.
pub(super) const FLUSH_TICK: Duration = Duration::from_micros(500);
/// The flusher's longest period: it doubles up to this while the
/// application writes for itself (it keeps calling in).
pub(super) const FLUSH_TICK_MAX: Duration = Duration::from_millis(8);
/// Within a burst, the age of the oldest unwritten byte is checked every
/// this many commands (the flusher covers the rest).
const CHECK_EVERY: u32 = 8;
/// With nothing queued this long, the flusher sleeps until the next
/// command wakes it.
pub(super) const FLUSH_IDLE_AFTER: Duration = Duration::from_millis(50);
/// An outbound buffer this full is written at once.
pub(super) const FLUSH_AT: usize = 64 * 1024;

/// A callback for other threads' closures and timers.
pub(super) type ConnCallback = Box<dyn FnOnce(&super::BlockingConnection) + Send>;
/// A consumer's callback.
pub(super) type OnMessage = Box<dyn FnMut(&super::BlockingChannel, Delivery) + Send>;
/// A broker-cancel callback.
pub(super) type OnCancel = Box<dyn FnMut(&super::BlockingChannel, &basic::Cancel) + Send>;
/// A return callback.
pub(super) type OnReturn = Box<dyn FnMut(&super::BlockingChannel, &ReturnedMessage) + Send>;
/// A blocked callback.
pub(super) type OnBlocked = Box<dyn FnMut(&super::BlockingConnection, &connection::Blocked) + Send>;
/// An unblocked callback.
pub(super) type OnUnblocked =
    Box<dyn FnMut(&super::BlockingConnection, &connection::Unblocked) + Send>;

/// Something for `process_data_events` to hand to a callback, in the order
/// it arrived.
pub(super) enum Dispatch {
    Delivery {
        channel: ChannelKey,
        consumer: ConsumerId,
        delivery: Delivery,
    },
    Returned {
        channel: ChannelKey,
        message: ReturnedMessage,
    },
    Cancelled {
        channel: ChannelKey,
        cancel: basic::Cancel,
    },
    Blocked(connection::Blocked),
    Unblocked(connection::Unblocked),
}

/// How [`Engine::wait_dispatchable`] ended.
pub(super) enum Waited<T> {
    /// The caller's own condition gave this.
    Own(T),
    /// There is something to dispatch.
    Dispatch,
    /// The time limit passed.
    TimedOut,
}

/// A consumer with a callback.
pub(super) struct ConsumerFace {
    pub(super) id: ConsumerId,
    pub(super) tag: String,
    pub(super) no_ack: bool,
    /// Taken out while it runs.
    pub(super) callback: Option<OnMessage>,
    /// The application cancelled it: its queued deliveries are rejected
    /// (or, auto-acked, kept for `basic_cancel`'s answer).
    pub(super) cancelled: bool,
    /// The broker confirmed its end (CancelOk, or its own Cancel). Kept
    /// until what arrived before that end is dispatched: the deliveries
    /// queued ahead of a broker's Cancel still reach the callback (pika).
    pub(super) ended: bool,
}

/// The consumer of [`super::BlockingChannel::consume`].
pub(super) struct Generator {
    pub(super) queue: String,
    pub(super) auto_ack: bool,
    pub(super) exclusive: bool,
    pub(super) id: ConsumerId,
    pub(super) tag: String,
    pub(super) buffer: VecDeque<Delivery>,
    /// Cancelled (by the application or the broker): iteration ends once
    /// the buffer is drained.
    pub(super) ended: bool,
}

/// What became of a publish in confirm mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ack,
    Nack,
    Failed,
}

/// The face's side of one channel.
pub(super) struct ChannelFace {
    pub(super) key: ChannelKey,
    /// Why it closed (kept as it was: see [`ChannelFace::closed_error`]).
    pub(super) closed: Option<Error>,
    /// A call has reported `closed`: later calls get the wrong state.
    pub(super) close_reported: bool,
    pub(super) consumers: Vec<ConsumerFace>,
    pub(super) on_cancel: Vec<OnCancel>,
    pub(super) on_return: Vec<OnReturn>,
    pub(super) confirm_mode: bool,
    /// Confirm outcomes not yet collected, by delivery tag.
    pub(super) outcomes: HashMap<u64, Outcome>,
    /// Publishes in confirm mode whose outcome is not collected yet.
    pub(super) unconfirmed: usize,
    /// Messages returned in confirm mode, not yet collected, with the
    /// delivery tag of the publish each returns.
    pub(super) returned: Vec<(u64, ReturnedMessage)>,
    /// Auto-acked messages that crossed a cancel of ours.
    pub(super) after_cancel: Vec<Delivery>,
    pub(super) generator: Option<Generator>,
}

impl ChannelFace {
    /// The error of a call (`what`) refused because the channel closed:
    /// why it closed for the first call that observes it, then the wrong
    /// state, naming each call. `None` while open.
    pub(super) fn closed_error(&mut self, what: &str) -> Option<Error> {
        let why = self.closed.as_ref()?;
        if std::mem::replace(&mut self.close_reported, true) {
            Some(Error::ChannelWrongState {
                detail: format!("channel {} is Closed, cannot {what}", self.key.number),
            })
        } else {
            Some(why.clone())
        }
    }

    pub(super) fn new(key: ChannelKey) -> ChannelFace {
        ChannelFace {
            key,
            closed: None,
            close_reported: false,
            consumers: Vec::new(),
            on_cancel: Vec::new(),
            on_return: Vec::new(),
            confirm_mode: false,
            outcomes: HashMap::new(),
            unconfirmed: 0,
            returned: Vec::new(),
            after_cancel: Vec::new(),
            generator: None,
        }
    }
}

/// A timer of [`super::BlockingConnection::call_later`].
pub(super) struct Timer {
    pub(super) id: u64,
    /// `None`: never (a delay too long for the clock, e.g.
    /// `Duration::MAX`).
    pub(super) due: Option<Instant>,
    pub(super) callback: ConnCallback,
}

/// Everything behind the lock.
pub(super) struct State {
    pub(super) core: protocol::Connection,
    stream: Option<Stream>,
    inbound: Vec<u8>,
    inbound_start: usize,
    inbound_end: usize,
    write_interest: bool,
    /// A thread is waiting in the poller (with the lock released).
    driving: bool,
    /// How the connection ended (set once the core's Closed is routed).
    pub(super) terminal: Option<Error>,
    pub(super) opened: bool,
    pub(super) replies: HashMap<RequestId, Result<Reply, Error>>,
    pub(super) dispatch: VecDeque<Dispatch>,
    pub(super) channels: Faces,
    pub(super) timers: Vec<Timer>,
    pub(super) next_timer: u64,
    pub(super) on_blocked: Vec<OnBlocked>,
    pub(super) on_unblocked: Vec<OnUnblocked>,
    /// The thread dispatching callbacks, if one is: only one at a time
    /// does (so one consumer's callback never runs twice at once), and on
    /// that thread `start_consuming` is refused as reentrant.
    pub(super) dispatcher: Option<std::thread::ThreadId>,
    /// Frames handed to the core so far (so a wait can end at the next).
    pub(super) frames_in: u64,
    /// When the oldest byte not yet written was queued.
    unflushed_since: Option<Instant>,
    /// Commands since the age of `unflushed_since` was last looked at.
    unchecked_commands: u32,
    /// When bytes were last written.
    last_write: Instant,
    /// The flusher sleeps until a command wakes it.
    flusher_idle: bool,
    pub(super) high_water: usize,
    pub(super) low_water: usize,
}

impl State {
    /// Whether the calling thread is the one dispatching callbacks (so is
    /// inside one of them).
    pub(super) fn in_callback(&self) -> bool {
        self.dispatcher == Some(std::thread::current().id())
    }

    /// Whether this thread may dispatch now: no thread (this one included,
    /// from inside a callback) is dispatching.
    pub(super) fn may_dispatch(&self) -> bool {
        self.dispatcher.is_none()
    }

    /// The local address of the socket, while it is open.
    pub(super) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.as_ref().and_then(Stream::local_addr)
    }

    /// The broker's address, while the socket is open.
    pub(super) fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.as_ref().map(Stream::peer)
    }

    /// The face of channel `key`, when it is this key's.
    pub(super) fn face(&mut self, key: ChannelKey) -> Option<&mut ChannelFace> {
        self.channels.get_mut(key.number).filter(|f| f.key == key)
    }

    /// Whether there is something for `process_data_events` to dispatch
    /// at `now`.
    pub(super) fn has_dispatch(&self, now: Instant) -> bool {
        !self.dispatch.is_empty() || self.timers.iter().any(|t| t.due.is_some_and(|d| d <= now))
    }
}

/// The channels' faces by channel number (a vector: looked up on every
/// publish and ack, and numbers are small and dense).
#[derive(Default)]
pub(super) struct Faces(Vec<Option<ChannelFace>>);

impl Faces {
    pub(super) fn get(&self, number: u16) -> Option<&ChannelFace> {
        self.0.get(usize::from(number))?.as_ref()
    }

    pub(super) fn get_mut(&mut self, number: u16) -> Option<&mut ChannelFace> {
        self.0.get_mut(usize::from(number))?.as_mut()
    }

    pub(super) fn insert(&mut self, number: u16, face: ChannelFace) {
        let i = usize::from(number);
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(face);
    }
}

/// Closures other threads hand over (`add_callback_threadsafe`).
#[derive(Default)]
pub(super) struct Jobs {
    pub(super) closed: bool,
    pub(super) callbacks: VecDeque<ConnCallback>,
}

/// The flusher thread's mailbox.
#[derive(Default)]
struct FlushSignal {
    requested: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
}

/// One connection's driver, shared by the connection, its channels, its
/// thread-safe handle and ack handles.
pub(super) struct Engine {
    poller: Poller,
    events: Mutex<polling::Events>,
    state: Mutex<State>,
    /// Signalled after each turn of the driving thread.
    turn: Condvar,
    pub(super) jobs: Mutex<Jobs>,
    flush: Arc<FlushSignal>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// An engine over a connected (or connecting) stream and a new core.
    pub(super) fn new(stream: Stream, core: protocol::Connection) -> io::Result<Arc<Engine>> {
        let poller = Poller::new()?;
        // SAFETY: the socket stays open while registered: the stream owns
        // it, and `drop_stream` deletes it from the poller before dropping
        // the stream; the engine's Drop does too.
        unsafe {
            poller.add_with_mode(
                &**stream.socket(),
                PollEvent::all(SOCKET_KEY),
                PollMode::Level,
            )?;
        }
        let engine = Arc::new(Engine {
            poller,
            events: Mutex::new(polling::Events::new()),
            state: Mutex::new(State {
                core,
                stream: Some(stream),
                inbound: vec![0; READ_CHUNK],
                inbound_start: 0,
                inbound_end: 0,
                write_interest: true,
                driving: false,
                terminal: None,
                opened: false,
                replies: HashMap::new(),
                dispatch: VecDeque::new(),
                channels: Faces::default(),
                timers: Vec::new(),
                next_timer: 1,
                on_blocked: Vec::new(),
                on_unblocked: Vec::new(),
                dispatcher: None,
                frames_in: 0,
                unflushed_since: None,
                unchecked_commands: 0,
                last_write: Instant::now(),
                flusher_idle: true,
                high_water: 16 * 1024 * 1024,
                low_water: 4 * 1024 * 1024,
            }),
            turn: Condvar::new(),
            jobs: Mutex::new(Jobs::default()),
            flush: Arc::new(FlushSignal::default()),
        });
        spawn_flusher(Arc::downgrade(&engine), engine.flush.clone());
        Ok(engine)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Wakes a thread waiting in the poller (for bytes or closures queued
    /// by another thread).
    pub(super) fn notify(&self) {
        let _ = self.poller.notify();
    }

    /// After a command queued bytes: written by the flusher shortly, at
    /// once when the buffer is full, and the caller blocks while it is over
    /// the high-water mark. Other threads' drivers are woken.
    pub(super) fn after_command(&self, mut st: MutexGuard<'_, State>) -> Result<(), Error> {
        if st.driving {
            drop(st);
            self.notify();
            return Ok(());
        }
        let queued = st.core.outbound().len();
        if queued >= st.high_water {
            let low = st.low_water;
            drop(st);
            // Blocks (driving I/O, heartbeats included) until the broker
            // took enough.
            self.wait(None, |st| (st.core.outbound().len() < low).then_some(()))?;
            return Ok(());
        }
        if queued == 0 {
            return Ok(());
        }
        // While the last write found the socket full, only the poller can
        // say when it takes more (a send per command until then would be a
        // busy loop): the high-water wait above drives it.
        let writable = !st.write_interest;
        match st.unflushed_since {
            _ if queued >= FLUSH_AT && writable => self.flush_locked(&mut st),
            Some(since) => {
                // The clock is read every few commands only.
                st.unchecked_commands += 1;
                if st.unchecked_commands >= CHECK_EVERY {
                    st.unchecked_commands = 0;
                    let now = Instant::now();
                    if writable && now.duration_since(since) >= FLUSH_DELAY {
                        self.flush_locked(&mut st);
                    }
                    return self.keep_deadlines(st, now);
                }
            }
            None => {
                let now = Instant::now();
                if writable && now.duration_since(st.last_write) >= FLUSH_DELAY {
                    // Nothing written lately: no burst to coalesce with,
                    // so this one goes at once (as pika's would).
                    self.flush_locked(&mut st);
                    if st.core.outbound().is_empty() {
                        return self.keep_deadlines(st, now);
                    }
                }
                st.unflushed_since = Some(now);
                st.unchecked_commands = 0;
                if std::mem::replace(&mut st.flusher_idle, false) {
                    *lock(&self.flush.requested) = true;
                    self.flush.cv.notify_one();
                }
                return self.keep_deadlines(st, now);
            }
        }
        Ok(())
    }

    /// A caller that only writes (a publisher without confirms) still
    /// keeps the connection's deadlines: once one is due — a heartbeat to
    /// send, the broker's silence to judge, a close or blocked bound — a
    /// turn that does not wait reads what arrived and acts on it. The
    /// connection's end (e.g. [`Error::AmqpHeartbeatTimeout`] on a stalled
    /// network) is then this command's error.
    fn keep_deadlines(&self, st: MutexGuard<'_, State>, now: Instant) -> Result<(), Error> {
        if st.driving || st.core.poll_timeout().is_none_or(|due| now < due) {
            return Ok(());
        }
        let st = self.turn_once(st, Some(now));
        match &st.terminal {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Waits until `ready` gives a value, driving I/O meanwhile; `None`
    /// when `deadline` passed first. The connection's end is an `Err`
    /// (unless `ready` takes it first).
    pub(super) fn wait<T>(
        &self,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<Option<T>, Error> {
        let mut st = self.lock();
        loop {
            if let Some(value) = ready(&mut st) {
                return Ok(Some(value));
            }
            if let Some(e) = &st.terminal {
                return Err(e.clone());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if st.driving {
                // Another thread sleeps in the poller. What this thread
                // queued (the request it waits for the answer to) is its
                // to write: without write interest nothing wakes it but a
                // read — the next heartbeat, or never with heartbeats off.
                // (With write interest, writability wakes it; a notify
                // then would only make it spin while the socket is full.)
                if !st.core.outbound().is_empty() && !st.write_interest {
                    self.notify();
                }
                let bound = deadline
                    .map_or(Duration::from_millis(50), |d| d - now)
                    .min(Duration::from_millis(50));
                st = self
                    .turn
                    .wait_timeout(st, bound)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            st = self.turn_once(st, deadline);
        }
    }

    /// Waits (driving I/O) until there is something for
    /// `process_data_events` to dispatch — a queued event, a due timer, a
    /// closure from another thread — or `own` gives a value, or `limit`
    /// passes. The wait ends at the earliest timer's due time, and again
    /// when another thread adds an earlier one.
    ///
    /// # Errors
    /// The connection's end (unless `own` takes it first).
    pub(super) fn wait_dispatchable<T>(
        &self,
        limit: Option<Instant>,
        mut own: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<Waited<T>, Error> {
        loop {
            let next_timer = self.lock().timers.iter().filter_map(|t| t.due).min();
            let deadline = [limit, next_timer].into_iter().flatten().min();
            let found = self.wait(deadline, |st| {
                if let Some(value) = own(st) {
                    return Some(Some(Waited::Own(value)));
                }
                if st.has_dispatch(Instant::now()) || !lock(&self.jobs).callbacks.is_empty() {
                    return Some(Some(Waited::Dispatch));
                }
                // A timer added meanwhile: wait again, until the new earliest.
                let earliest = st.timers.iter().filter_map(|t| t.due).min();
                (earliest != next_timer).then_some(None)
            })?;
            match found {
                Some(Some(waited)) => return Ok(waited),
                Some(None) => {}
                None if limit.is_some_and(|l| Instant::now() >= l) => return Ok(Waited::TimedOut),
                // The earliest timer came due: the next look finds it.
                None => {}
            }
        }
    }

    /// One turn that does not wait (pika's `process_data_events(0)`).
    ///
    /// # Errors
    /// The connection's end.
    pub(super) fn poll_once(&self) -> Result<(), Error> {
        let st = self.lock();
        if let Some(e) = &st.terminal {
            return Err(e.clone());
        }
        if st.driving {
            return Ok(());
        }
        drop(self.turn_once(st, Some(Instant::now())));
        Ok(())
    }

    /// One turn: write, wait in the poller (lock released) until readable,
    /// a deadline or a notification, then read, hand frames to the core,
    /// and act on due deadlines.
    fn turn_once<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        let queued = st.core.outbound().len();
        self.flush_locked(&mut st);
        if st.terminal.is_some() || st.stream.is_none() {
            return st;
        }
        let now = Instant::now();
        let next = [deadline, st.core.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        // When that write moved bytes, what the caller waits for may be
        // that very write (the high-water wait): look without sleeping, so
        // that it checks again. Otherwise the poller, with no write
        // interest left, would sleep until a read or a deadline — for a
        // publisher, which reads nothing, until the heartbeat, or forever.
        let timeout = if st.core.outbound().len() != queued {
            Some(Duration::ZERO)
        } else {
            next.map(|d| d.saturating_duration_since(now))
        };
        st.driving = true;
        drop(st);
        let readable = {
            let mut events = lock(&self.events);
            events.clear();
            match self.poller.wait(&mut events, timeout) {
                Ok(_) => events
                    .iter()
                    .any(|e| e.readable || e.is_err().unwrap_or(false)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                // polling's poll(2) backend may report a racing notify as
                // EAGAIN: a wake-up, not a failure.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) => {
                    log::warn!("blocking connection: poller failed: {e}");
                    false
                }
            }
        };
        let mut st = self.lock();
        st.driving = false;
        if readable {
            self.read_some(&mut st);
        }
        st.core.handle_timeout(Instant::now());
        self.route(&mut st);
        self.flush_locked(&mut st);
        self.turn.notify_all();
        st
    }

    /// Reads what is there (bounded), handing each frame to the core.
    fn read_some(&self, st: &mut State) {
        for _ in 0..READS_PER_TURN {
            match self.read_once(st) {
                Some(Ok(0)) => {
                    self.stream_ended(st, None);
                    return;
                }
                Some(Ok(n)) => {
                    self.process_inbound(st);
                    if n < READ_CHUNK {
                        return;
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Some(Err(e)) => {
                    self.stream_ended(st, Some(e));
                    return;
                }
                None => return,
            }
        }
    }

    fn read_once(&self, st: &mut State) -> Option<io::Result<usize>> {
        let stream = st.stream.as_mut()?;
        if st.inbound.len() - st.inbound_end < READ_CHUNK {
            st.inbound.copy_within(st.inbound_start..st.inbound_end, 0);
            st.inbound_end -= st.inbound_start;
            st.inbound_start = 0;
            if st.inbound.len() - st.inbound_end < READ_CHUNK {
                let grown = st.inbound_end + READ_CHUNK;
                st.inbound.resize(grown, 0);
            }
        }
        let result = stream.read(&mut st.inbound[st.inbound_end..]);
        if let Ok(n) = result {
            st.inbound_end += n;
        }
        Some(result)
    }

    /// Hands every whole frame received to the core, routing the events of
    /// each (no user code runs here: they are queued).
    fn process_inbound(&self, st: &mut State) {
        let now = Instant::now();
        while st.inbound_start < st.inbound_end {
            let used = st
                .core
                .handle_input(&st.inbound[st.inbound_start..st.inbound_end], now);
            st.inbound_start += used;
            st.frames_in += u64::from(used > 0);
            if st.inbound_start == st.inbound_end {
                st.inbound_start = 0;
                st.inbound_end = 0;
            }
            self.route(st);
            if used == 0 || st.terminal.is_some() {
                return;
            }
        }
    }

    fn stream_ended(&self, st: &mut State, error: Option<io::Error>) {
        match error.as_ref().and_then(tls_failure) {
            Some(tls) => st.core.fail(tls),
            None => st.core.handle_stream_end(error),
        }
        self.route(st);
    }

    /// Writes what the core queued, as far as the socket takes it, and
    /// keeps write interest in step. A failed write first reads what is
    /// still readable: a broker Close received before the stream broke
    /// wins over the write error.
    pub(super) fn flush_locked(&self, st: &mut State) {
        let Some(stream) = st.stream.as_mut() else {
            return;
        };
        let result = match stream.write(st.core.outbound()) {
            Ok(n) => {
                let now = Instant::now();
                st.core.advance_outbound(n, now);
                if n > 0 {
                    st.last_write = now;
                }
                if st.core.outbound().is_empty() {
                    st.unflushed_since = None;
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            if let Some(tls) = tls_failure(&e) {
                st.core.fail(tls);
                self.route(st);
                return;
            }
            loop {
                match self.read_once(st) {
                    Some(Ok(n)) if n > 0 => self.process_inbound(st),
                    Some(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                    _ => break,
                }
                if st.terminal.is_some() {
                    return;
                }
            }
            self.stream_ended(st, Some(e));
            return;
        }
        let want = st.core.wants_write() || st.stream.as_ref().is_some_and(Stream::wants_write);
        if want != st.write_interest {
            st.write_interest = want;
            if let Some(stream) = st.stream.as_ref() {
                let event = if want {
                    PollEvent::all(SOCKET_KEY)
                } else {
                    PollEvent::readable(SOCKET_KEY)
                };
                if let Err(e) =
                    self.poller
                        .modify_with_mode(&**stream.socket(), event, PollMode::Level)
                {
                    log::warn!("blocking connection: cannot update socket interest: {e}");
                }
            }
        }
    }

    /// Routes every event the core queued.
    fn route(&self, st: &mut State) {
        while let Some(event) = st.core.poll_event() {
            route_event(st, event);
            if st.terminal.is_some() {
                // What the core queued last (a CloseOk, a Close with a
                // reply code) goes out once, best effort, then the socket.
                if let Some(stream) = st.stream.as_mut() {
                    if let Ok(n) = stream.write(st.core.outbound()) {
                        st.core.advance_outbound(n, Instant::now());
                    }
                }
                self.drop_stream(st);
            }
        }
    }

    fn drop_stream(&self, st: &mut State) {
        if let Some(mut stream) = st.stream.take() {
            let _ = self.poller.delete(&**stream.socket());
            stream.shutdown();
        }
        lock(&self.jobs).closed = true;
        self.flush.stop.store(true, Ordering::Release);
        self.flush.cv.notify_one();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(mut stream) = st.stream.take() {
            let _ = self.poller.delete(&**stream.socket());
            stream.shutdown();
        }
        self.flush.stop.store(true, Ordering::Release);
        self.flush.cv.notify_one();
    }
}

/// Files one core event where the face picks it up.
fn route_event(st: &mut State, event: Event) {
    match event {
        Event::Opened => st.opened = true,
        Event::Blocked(b) => st.dispatch.push_back(Dispatch::Blocked(b)),
        Event::Unblocked(u) => st.dispatch.push_back(Dispatch::Unblocked(u)),
        Event::Reply {
            request, result, ..
        } => {
            st.replies.insert(request, result);
        }
        Event::Delivery {
            channel,
            consumer,
            delivery,
        } => {
            if let Some(face) = st.face(channel) {
                if let Some(g) = face.generator.as_mut().filter(|g| g.id == consumer) {
                    g.buffer.push_back(delivery);
                    return;
                }
            }
            st.dispatch.push_back(Dispatch::Delivery {
                channel,
                consumer,
                delivery,
            });
        }
        Event::DeliveryAfterCancel {
            channel, delivery, ..
        } => {
            if let Some(face) = st.face(channel) {
                face.after_cancel.push(delivery);
            }
        }
        Event::Returned {
            channel,
            message,
            delivery_tag,
        } => match (st.face(channel), delivery_tag) {
            // In confirm mode: for the publish it returns (its
            // basic_publish, or wait_for_confirms with its outcome).
            (Some(face), Some(tag)) => face.returned.push((tag, message)),
            _ => st
                .dispatch
                .push_back(Dispatch::Returned { channel, message }),
        },
        Event::Confirm {
            channel,
            confirmation,
        } => {
            if let Some(face) = st.face(channel) {
                let outcome = if confirmation.is_ack() {
                    Outcome::Ack
                } else if confirmation.is_nack() {
                    Outcome::Nack
                } else {
                    Outcome::Failed
                };
                for &tag in confirmation.settled() {
                    face.outcomes.insert(tag, outcome);
                }
            }
        }
        Event::ConsumerEnded {
            channel,
            consumer,
            by_broker,
        } => {
            if let Some(face) = st.face(channel) {
                match face.generator.as_mut().filter(|g| g.id == consumer) {
                    Some(g) => g.ended = true,
                    None => {
                        if let Some(c) = face.consumers.iter_mut().find(|c| c.id == consumer) {
                            c.ended = true;
                        }
                    }
                }
            }
            if let Some(cancel) = by_broker {
                st.dispatch
                    .push_back(Dispatch::Cancelled { channel, cancel });
            }
        }
        Event::Flow { channel, active } => {
            log::info!("{channel}: the broker asked for flow active={active}");
        }
        Event::Watched { .. } => {}
        Event::ChannelClosed { channel, error } => {
            if let Some(face) = st.face(channel) {
                face.closed = Some(error);
                face.consumers.clear();
                if let Some(g) = face.generator.as_mut() {
                    g.ended = true;
                }
            }
        }
        Event::Closed { error, .. } => {
            log::info!("connection closed: {error}");
            st.terminal = Some(error);
        }
    }
}

/// The flusher: woken by the first command after a quiet spell, it ticks,
/// writing what has waited [`FLUSH_DELAY`] (unless a thread is driving the
/// connection, or holds the lock: those write for themselves), and goes
/// back to sleep after [`FLUSH_IDLE_AFTER`] with nothing queued. See the
/// module docs for the periods.
fn spawn_flusher(engine: Weak<Engine>, signal: Arc<FlushSignal>) {
    let spawned = std::thread::Builder::new()
        .name("pika-blocking-flush".into())
        .spawn(move || {
            loop {
                {
                    let mut requested = lock(&signal.requested);
                    while !*requested && !signal.stop.load(Ordering::Acquire) {
                        requested = signal.cv.wait(requested).unwrap_or_else(|p| p.into_inner());
                    }
                    *requested = false;
                }
                let mut pause = FLUSH_DELAY;
                let mut quiet = Duration::ZERO;
                loop {
                    if signal.stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(pause);
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    let slept = pause;
                    pause = (pause * 2).min(FLUSH_TICK_MAX);
                    // A thread holding the lock is inside a call: it writes.
                    let mut st = match engine.state.try_lock() {
                        Ok(st) => st,
                        Err(TryLockError::Poisoned(p)) => p.into_inner(),
                        Err(TryLockError::WouldBlock) => {
                            quiet = Duration::ZERO;
                            continue;
                        }
                    };
                    match st.unflushed_since {
                        Some(since) => {
                            quiet = Duration::ZERO;
                            if !st.driving && since.elapsed() >= FLUSH_DELAY {
                                engine.flush_locked(&mut st);
                                pause = FLUSH_TICK;
                            }
                        }
                        None => quiet += slept,
                    }
                    if quiet >= FLUSH_IDLE_AFTER {
                        // Under the state lock: the next command sees it
                        // and wakes this thread.
                        st.flusher_idle = true;
                        break;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("blocking connection: no flusher thread ({e}); writes wait for the next call");
    }
}
