//! `ioloop`: a single-threaded, callback-driven I/O loop in the style of pika's `IOLoop` —
//! the loop itself: start/stop/close, the dispatch pass, fd handlers and the public types.
//!
//! An [`IoLoop`] runs timers ([`call_later`](IoLoop::call_later)), deferred callbacks
//! ([`call_soon`](IoLoop::call_soon)) and file-descriptor handlers
//! ([`add_handler`](IoLoop::add_handler)) on the thread that calls [`start`](IoLoop::start),
//! until [`stop`](IoLoop::stop); an application that drives the loop from its own code calls
//! [`run_once`](IoLoop::run_once) instead, one pass at a time. Other threads reach it only
//! through an [`IoLoopWaker`]. It knows nothing about any protocol. The poller is the
//! [`polling`] crate (epoll on Linux), used level-triggered. Unix only.
//!
//! ```
//! use std::cell::Cell;
//! use std::rc::Rc;
//! use std::time::Duration;
//! use ioloop::IoLoop;
//!
//! let lp = IoLoop::new()?;
//! let fired = Rc::new(Cell::new(0));
//!
//! let f = fired.clone();
//! lp.call_later(Duration::from_millis(20), move || f.set(f.get() + 1));
//! let (f, handle) = (fired.clone(), lp.clone());
//! lp.call_later(Duration::from_millis(30), move || {
//!     f.set(f.get() + 10);
//!     handle.stop();
//! });
//!
//! lp.start()?; // returns once the second timer called stop()
//! assert_eq!(fired.get(), 11);
//! lp.close();
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # How a pass runs
//!
//! `start()` repeats passes until a stop is requested; `run_once(timeout)` runs exactly one,
//! whose wait is also bounded by `timeout`, and leaves any stop request for the next
//! `start()`. Each pass:
//!
//! 1. waits in the poller: not at all if callbacks or due timers are pending, else until a
//!    descriptor is ready, an [`IoLoopWaker`] wakes it, or the next timer deadline passes —
//!    indefinitely if there are no timers (an idle loop uses no CPU) — and, in `run_once`,
//!    no longer than its `timeout`;
//! 2. takes its snapshot — the ready descriptors, the timers now due, the `call_soon`
//!    callbacks queued so far and one batch of thread-safe callbacks;
//! 3. calls the handlers of the ready descriptors, then the due timers in deadline order
//!    (equal deadlines in the order they were added), then the queued callbacks in FIFO order.
//!
//! Anything added while a pass dispatches runs on a later pass, so a callback that re-adds
//! itself with `call_soon` cannot starve I/O or timers. A stop requested during a pass takes
//! effect when the pass ends.
//!
//! # Callbacks
//!
//! Every callback may call every `IoLoop` method: add and remove timers and handlers
//! (including itself), stop or close the loop. Only a nested `start()` or `run_once()` is
//! refused. No internal borrow is held while user code runs, including while callbacks are
//! dropped.
//!
//! A panic in a callback propagates out of `start()` (or `run_once()`) and leaves the loop
//! usable: it is no longer running, the callback that panicked is gone (a timer or queued
//! callback) or still registered (a handler), and everything else still pending runs when
//! `start()` or `run_once()` is called again. Remaining events of the interrupted pass are
//! reported again by the level-triggered poller if still ready.
//!
//! # Handlers are level-triggered
//!
//! A handler is called on every pass in which its descriptor is ready for what it is
//! interested in — a handler that does not drain its socket is called again on the next pass,
//! and one interested in writability is called on every pass while the socket can be written.
//! Set its interest to what it currently needs (see [`IoLoop::update_handler`]). Hang-up and
//! error conditions are reported whenever the interest is not [`Interest::NONE`], and a
//! hang-up is also reported as readable, so that the handler reads the end of file; a handler
//! that neither removes itself nor changes its interest after a hang-up is called again on
//! every pass.
//!
//! # Signals (feature `signals`)
//!
//! With the cargo feature `signals` (off by default),
//! [`IoLoop::add_signal_handler`][add_signal_handler] turns Unix signals into loop
//! callbacks: when SIGINT (Ctrl-C) or SIGTERM arrives, a callback runs on the loop's thread,
//! as any other callback, never inside the signal handler — so it may close an AMQP
//! connection gracefully and let the connection's close callback stop the loop. The signal
//! handling itself (async-signal-safe registration, the self-pipe) is the
//! [`signal-hook`](https://docs.rs/signal-hook) crate's. Once no loop has a handler for a
//! signal any more (removed, or its loop closed), the signal's default action is back.
//!
//! The Ctrl-C pattern (run with `--features signals`):
//!
#![cfg_attr(
    feature = "signals",
    doc = "[add_signal_handler]: IoLoop::add_signal_handler"
)]
// Without the feature, the method is not documented: the link points to this section.
#![cfg_attr(
    not(feature = "signals"),
    doc = "[add_signal_handler]: #signals-feature-signals"
)]
//!
#![cfg_attr(feature = "signals", doc = "```")]
#![cfg_attr(not(feature = "signals"), doc = "```ignore")]
//! use ioloop::{IoLoop, SIGINT, SIGTERM};
//!
//! let lp = IoLoop::new()?;
//! // ... the application's connections, handlers and timers ...
//! let handle = lp.clone();
//! lp.add_signal_handler(&[SIGINT, SIGTERM], move |signal| {
//!     // On the loop's thread. A pika application closes its connection here,
//!     // `conn.close(200, "interrupted")`, and stops the loop from its on_close callback;
//!     // this example has no connection and stops the loop at once.
//!     eprintln!("signal {signal}: shutting down");
//!     handle.stop();
//! })?;
//! # // What pressing Ctrl-C does; delivered once the loop runs.
//! # signal_hook::low_level::raise(SIGINT)?;
//! lp.start()?; // returns after Ctrl-C (or `kill <pid>`)
//! lp.close(); // unregisters the handler: Ctrl-C terminates the process again
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Dropping and closing
//!
//! [`IoLoop::close`] (or dropping the last handle) releases the poller and drops every pending
//! callback, handler and source. Callbacks often capture a clone of the `IoLoop`; such a
//! callback keeps the loop alive (an `Rc` cycle) until it runs, is removed, or `close()` drops
//! it — call `close()` when done with a loop.

#![warn(missing_docs, missing_debug_implementations)]

mod poller;
#[cfg(feature = "signals")]
mod signals;
mod timers;
mod waker;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::poller::{Events, Poller};
use crate::timers::{Callback, Timers};
use crate::waker::{SendCallback, Shared};

#[cfg(feature = "signals")]
pub use crate::signals::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SignalHandlerId};
pub use crate::timers::TimeoutId;
pub use crate::waker::{Closed, IoLoopWaker};

/// What a handler wants to be told about its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interest {
    readable: bool,
    writable: bool,
}

impl Interest {
    /// Nothing: the descriptor stays registered with the loop but is not watched, and its
    /// handler is not called.
    pub const NONE: Interest = Interest::new(false, false);
    /// Readable (or hung up, or in error).
    pub const READABLE: Interest = Interest::new(true, false);
    /// Writable (or hung up, or in error).
    pub const WRITABLE: Interest = Interest::new(false, true);
    /// Readable and writable.
    pub const BOTH: Interest = Interest::new(true, true);

    /// An interest in readability and/or writability.
    pub const fn new(readable: bool, writable: bool) -> Interest {
        Interest { readable, writable }
    }

    /// Whether readability is of interest.
    pub const fn is_readable(self) -> bool {
        self.readable
    }

    /// Whether writability is of interest.
    pub const fn is_writable(self) -> bool {
        self.writable
    }

    /// Whether nothing is of interest.
    pub const fn is_none(self) -> bool {
        !self.readable && !self.writable
    }
}

/// What a handler is told about its descriptor when it is called.
///
/// At least one of the four is set. The flags are distinct: a hang-up is reported as
/// [`is_hangup`](Readiness::is_hangup) *and* [`is_readable`](Readiness::is_readable); an error
/// condition (for instance a TCP connection reset or refused) as
/// [`is_error`](Readiness::is_error), usually along with readable and/or writable, so that the
/// next read or write returns the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Readiness {
    readable: bool,
    writable: bool,
    error: bool,
    hangup: bool,
}

impl Readiness {
    /// A read would not block (data, end of file, or an error to collect).
    pub const fn is_readable(self) -> bool {
        self.readable
    }

    /// A write would not block.
    pub const fn is_writable(self) -> bool {
        self.writable
    }

    /// The descriptor has an error condition pending (`EPOLLERR` / `POLLERR`).
    pub const fn is_error(self) -> bool {
        self.error
    }

    /// The descriptor was hung up (`EPOLLHUP` / `POLLHUP`): for a socket, both directions are
    /// shut down, for instance because the peer of a Unix socket pair closed it.
    pub const fn is_hangup(self) -> bool {
        self.hangup
    }

    /// The poller's report, restricted to the handler's current interest. `None` if nothing is
    /// left to report.
    fn restrict_to(self, interest: Interest) -> Option<Readiness> {
        if interest.is_none() {
            return None;
        }
        let r = Readiness {
            readable: (self.readable && interest.readable) || self.hangup,
            writable: self.writable && interest.writable,
            error: self.error,
            hangup: self.hangup,
        };
        (r.readable || r.writable || r.error).then_some(r)
    }
}

/// Identifies a handler added with [`IoLoop::add_handler`].
///
/// Ids are never reused by a loop: once its handler was removed, an id refers to nothing,
/// even if the handler's internal slot now holds another handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId {
    key: usize,
    generation: u64,
}

type HandlerFn = Box<dyn FnMut(Readiness)>;

struct Handler {
    generation: u64,
    /// The descriptor as registered; `source` keeps it open.
    fd: RawFd,
    interest: Interest,
    /// Whether `fd` is in the poller: it is taken out while the interest is `NONE`, because
    /// epoll and poll(2) report hang-ups and errors even without interest.
    in_poller: bool,
    /// `None` while the callback runs.
    callback: Option<HandlerFn>,
    /// Never read: held so that the descriptor stays open while registered.
    _source: Box<dyn AsFd>,
}

impl Handler {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `self.fd` is the descriptor `self.source` gave at registration, and
        // `self.source` is alive as long as `self` is; `AsFd` promises (I/O safety) that the
        // descriptor it hands out stays open while the value lives.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// The loop's mutable state. Borrowed only between user-code calls, never across one.
struct State {
    /// `None` once closed.
    poller: Option<Arc<Poller>>,
    events: Events,
    timers: Timers,
    ready: VecDeque<Callback>,
    handlers: Slab<Handler>,
    next_generation: u64,
    /// Reused buffers for the pass snapshot.
    io_batch: Vec<(usize, u64, Readiness)>,
    remote_batch: Vec<SendCallback>,
}

struct Inner {
    state: RefCell<State>,
    shared: Arc<Shared>,
    running: Cell<bool>,
    closed: Cell<bool>,
}

/// A single-threaded event loop: timers, deferred callbacks and descriptor handlers.
///
/// A cheap, cloneable handle (`Rc` inside, not `Send`): clones refer to the same loop. See
/// the [crate documentation](crate) for the dispatch order and the callback rules.
///
/// Other threads use an [`IoLoopWaker`] instead; the loop itself cannot be sent:
///
/// ```compile_fail
/// fn assert_send<T: Send>() {}
/// assert_send::<ioloop::IoLoop>();
/// ```
#[derive(Clone)]
pub struct IoLoop {
    inner: Rc<Inner>,
}

impl fmt::Debug for IoLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("IoLoop");
        d.field("backend", &poller::BACKEND)
            .field("running", &self.inner.running.get())
            .field("closed", &self.inner.closed.get());
        if let Ok(st) = self.inner.state.try_borrow() {
            d.field("timers", &st.timers.len())
                .field("ready", &st.ready.len())
                .field("handlers", &st.handlers.len());
        }
        d.finish_non_exhaustive()
    }
}

/// What a [`Running`] guard does with the stop request when it drops.
#[derive(Clone, Copy)]
enum StopRequest {
    /// Clear it: `start()` returned, which is what the request asked for.
    Consume,
    /// Leave it for the next `start()`: `run_once()` does not look at it.
    Keep,
}

/// Marks the loop running while `start()` or `run_once()` runs: resets
/// [`Inner::running`] when dropped, unwinding included, and with [`StopRequest::Consume`]
/// clears the stop request.
struct Running<'a> {
    inner: &'a Inner,
    stop_request: StopRequest,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.inner.running.set(false);
        if let StopRequest::Consume = self.stop_request {
            self.inner.shared.set_stop(false);
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::other(Closed)
}

/// A deadline for `delay` from now; a delay too large to represent becomes ~30 years.
fn deadline_after(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

impl IoLoop {
    /// Creates a loop with its own poller.
    ///
    /// # Errors
    ///
    /// If the poller cannot be created (for instance, out of file descriptors).
    pub fn new() -> io::Result<IoLoop> {
        let poller = Arc::new(Poller::new()?);
        let shared = Arc::new(Shared::new(poller.clone()));
        let state = State {
            poller: Some(poller),
            events: Events::new(),
            timers: Timers::new(),
            ready: VecDeque::new(),
            handlers: Slab::new(),
            next_generation: 0,
            io_batch: Vec::new(),
            remote_batch: Vec::new(),
        };
        Ok(IoLoop {
            inner: Rc::new(Inner {
                state: RefCell::new(state),
                shared,
                running: Cell::new(false),
                closed: Cell::new(false),
            }),
        })
    }

    /// Runs the loop on this thread until [`stop`](IoLoop::stop) is called (or the loop is
    /// closed from a callback). May be called again after it returns.
    ///
    /// A stop requested while the loop is not running is kept: the next `start()` then
    /// returns immediately, without a pass (as pika's does). Either way, a `start()` that
    /// returns consumes the stop request.
    ///
    /// A panic in a callback propagates out of `start()`; the loop stays usable (see the
    /// [crate documentation](crate#callbacks)).
    ///
    /// # Errors
    ///
    /// - kind [`ResourceBusy`](io::ErrorKind::ResourceBusy) if the loop is already running
    ///   (a nested `start()` from a callback, including one of
    ///   [`run_once`](IoLoop::run_once));
    /// - [`Closed`] (kind [`Other`](io::ErrorKind::Other)) if the loop has been closed;
    /// - an error from the poller's wait, which ends the run.
    pub fn start(&self) -> io::Result<()> {
        let inner = &*self.inner;
        // Resets `running` and consumes the stop request however start() ends, unwinding
        // included.
        let _running = self.enter("start", StopRequest::Consume)?;
        log::debug!("ioloop: starting");
        while !inner.closed.get() && !inner.shared.stop_requested() {
            self.run_pass(None)?;
        }
        log::debug!("ioloop: stopped");
        Ok(())
    }

    /// Runs one pass of the loop on this thread, waiting at most `timeout` for I/O, and
    /// returns: for an application that drives the loop from its own code (pika's
    /// `IOLoop.poll()` followed by `process_timeouts()`).
    ///
    /// The pass is the one [`start`](IoLoop::start) repeats (see the
    /// [crate documentation](crate#how-a-pass-runs)). It waits in the poller until a
    /// descriptor is ready, an [`IoLoopWaker`] wakes the loop, or the next timer deadline
    /// passes, but no longer than `timeout`: `None` sets no bound of its own, so with no
    /// timers it waits until I/O or a wake-up, forever if none comes; `Some(Duration::ZERO)`
    /// polls without waiting. It does not wait at all when callbacks are queued or timers
    /// are due. Then it calls the handlers of the ready descriptors, the timers due by then
    /// and the callbacks queued before the pass, exactly as a pass of `start()` does;
    /// whatever they add runs on a later pass (a later `run_once()` or `start()`). It does
    /// not wait again when the wait ended early, so a pass may find nothing to do.
    ///
    /// A stop request neither prevents the pass nor is consumed by it: a
    /// [`stop`](IoLoop::stop) made before or during `run_once()` stays pending, and the next
    /// `start()` returns at once, without a pass, consuming it. [`IoLoopWaker::stop`] still
    /// wakes a `run_once()` waiting in the poller, which then ends its pass and returns.
    ///
    /// While the pass runs, [`is_running`](IoLoop::is_running) is true, so callbacks can
    /// neither call `run_once()` nor `start()`. A panic in a callback propagates out of
    /// `run_once()` and leaves the loop usable, as with `start()` (see the
    /// [crate documentation](crate#callbacks)).
    ///
    /// # Errors
    ///
    /// - kind [`ResourceBusy`](io::ErrorKind::ResourceBusy) if the loop is already running
    ///   (`run_once()` called from a callback, during `start()` or another `run_once()`);
    /// - [`Closed`] (kind [`Other`](io::ErrorKind::Other)) if the loop has been closed;
    /// - an error from the poller's wait, in which case nothing is dispatched.
    ///
    /// # Example
    ///
    /// ```
    /// use std::cell::Cell;
    /// use std::rc::Rc;
    /// use std::time::Duration;
    /// use ioloop::IoLoop;
    ///
    /// let lp = IoLoop::new()?;
    /// let ran = Rc::new(Cell::new(false));
    /// let r = ran.clone();
    /// lp.call_soon(move || r.set(true));
    /// lp.run_once(Some(Duration::ZERO))?; // polls, then runs the queued callback
    /// assert!(ran.get());
    ///
    /// // The application's own loop: one pass at a time, with its own work in between.
    /// let fired = Rc::new(Cell::new(false));
    /// let f = fired.clone();
    /// lp.call_later(Duration::from_millis(10), move || f.set(true));
    /// while !fired.get() {
    ///     lp.run_once(Some(Duration::from_millis(100)))?;
    ///     // ... the application's own work ...
    /// }
    /// assert!(!lp.is_running());
    /// lp.close();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn run_once(&self, timeout: Option<Duration>) -> io::Result<()> {
        // Resets `running` however run_once() ends, unwinding included; leaves the stop
        // request alone.
        let _running = self.enter("run_once", StopRequest::Keep)?;
        self.run_pass(timeout)
    }

    /// Marks the loop running for `start()` or `run_once()` (named by `method` in the
    /// error), until the returned guard drops.
    ///
    /// # Errors
    ///
    /// [`Closed`] if the loop has been closed; kind
    /// [`ResourceBusy`](io::ErrorKind::ResourceBusy) if it is already running.
    fn enter(&self, method: &str, stop_request: StopRequest) -> io::Result<Running<'_>> {
        let inner = &*self.inner;
        if inner.closed.get() {
            return Err(closed_error());
        }
        if inner.running.replace(true) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("IoLoop::{method}: the loop is already running"),
            ));
        }
        Ok(Running {
            inner,
            stop_request,
        })
    }

    /// Asks the loop to stop: [`start`](IoLoop::start) returns when the pass in progress
    /// ends. If the loop is not running, its next `start()` returns immediately. From another
    /// thread, use [`IoLoopWaker::stop`].
    pub fn stop(&self) {
        self.inner.shared.set_stop(true);
    }

    /// Whether [`start`](IoLoop::start) or [`run_once`](IoLoop::run_once) is running.
    pub fn is_running(&self) -> bool {
        self.inner.running.get()
    }

    /// Whether [`close`](IoLoop::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.get()
    }

    /// Closes the loop: releases the poller, unregisters every handler, and drops every
    /// pending timer, callback, handler and source (thread-safe ones included), which breaks
    /// the `Rc` cycles of callbacks that hold a clone of the loop. Later calls are no-ops.
    ///
    /// Afterwards `start()` and `add_handler()` fail, `call_later()` and `call_soon()` drop
    /// their callback, and every [`IoLoopWaker`] returns [`Closed`]. If called from a callback,
    /// the running `start()` returns `Ok(())` when the pass ends.
    pub fn close(&self) {
        self.inner.close();
    }

    /// Returns a handle through which other threads can queue callbacks and stop the loop.
    pub fn waker(&self) -> IoLoopWaker {
        IoLoopWaker {
            shared: self.inner.shared.clone(),
        }
    }

    /// Calls `callback` once, on the first pass that starts at least `delay` from now.
    ///
    /// Timers fire in deadline order; timers with equal deadlines in the order they were
    /// added. A closed loop drops `callback` and returns an id that matches nothing.
    pub fn call_later<F>(&self, delay: Duration, callback: F) -> TimeoutId
    where
        F: FnOnce() + 'static,
    {
        if self.inner.closed.get() {
            return TimeoutId::DANGLING;
        }
        let deadline = deadline_after(delay);
        let boxed: Callback = Box::new(callback);
        self.inner.state.borrow_mut().timers.insert(deadline, boxed)
    }

    /// Calls `callback` once, on the next pass (after that pass's I/O handlers and timers).
    /// Callbacks run in the order they were queued. A closed loop drops `callback`.
    pub fn call_soon<F>(&self, callback: F)
    where
        F: FnOnce() + 'static,
    {
        if self.inner.closed.get() {
            return;
        }
        let boxed: Callback = Box::new(callback);
        self.inner.state.borrow_mut().ready.push_back(boxed);
    }

    /// Cancels a timer that has not been called yet — even one already due in the pass in
    /// progress — and drops its callback. Returns whether it was pending: `false`, and no
    /// effect, for a timer that already fired (or is firing), was removed, or belongs to a
    /// closed loop.
    pub fn remove_timeout(&self, id: TimeoutId) -> bool {
        let callback = self.inner.state.borrow_mut().timers.cancel(id);
        // Dropped here, after the borrow: the closure's captures may call back into the loop.
        callback.is_some()
    }

    /// Registers `source`'s descriptor and calls `callback` whenever it is ready for
    /// `interest` (level-triggered: see the [crate documentation](crate#handlers-are-level-triggered)).
    ///
    /// The loop holds `source` until the handler is removed or the loop closed, which keeps
    /// the descriptor open while the poller watches it; pass an owned value, or an `Rc` you
    /// keep a clone of, e.g. `Rc<TcpStream>`. Put the source in non-blocking mode yourself.
    /// With [`Interest::NONE`] the descriptor is kept out of the poller until the interest
    /// changes, but it is still checked now (added and removed again), so a descriptor the
    /// poller refuses fails here either way.
    ///
    /// # Errors
    ///
    /// - what the poller reports: for instance `EPERM` (kind
    ///   [`PermissionDenied`](io::ErrorKind::PermissionDenied)) for a regular file under epoll,
    ///   or kind [`AlreadyExists`](io::ErrorKind::AlreadyExists) for a descriptor already
    ///   registered with this loop;
    /// - [`Closed`] (kind [`Other`](io::ErrorKind::Other)) if the loop has been closed.
    ///
    /// On error, `source` and `callback` are dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::unix::net::UnixStream;
    /// use std::rc::Rc;
    /// use ioloop::{Interest, IoLoop};
    ///
    /// let lp = IoLoop::new()?;
    /// let (ours, mut peer) = UnixStream::pair()?;
    /// ours.set_nonblocking(true)?;
    /// let ours = Rc::new(ours);
    ///
    /// let (sock, handle) = (ours.clone(), lp.clone());
    /// let id = lp.add_handler(ours.clone(), Interest::READABLE, move |readiness| {
    ///     assert!(readiness.is_readable());
    ///     let mut buf = [0u8; 5];
    ///     (&*sock).read_exact(&mut buf).unwrap();
    ///     assert_eq!(&buf, b"hello");
    ///     handle.stop();
    /// })?;
    /// peer.write_all(b"hello")?;
    /// lp.start()?;
    /// assert!(lp.remove_handler(id));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn add_handler<S, F>(
        &self,
        source: S,
        interest: Interest,
        callback: F,
    ) -> io::Result<HandlerId>
    where
        S: AsFd + 'static,
        F: FnMut(Readiness) + 'static,
    {
        let fd = source.as_fd().as_raw_fd();
        let result = self.try_add_handler(fd, interest);
        // On error, `source` and `callback` drop here, after the borrow was released.
        let (id, in_poller) = result?;
        let handler = Handler {
            generation: id.generation,
            fd,
            interest,
            in_poller,
            callback: Some(Box::new(callback)),
            _source: Box::new(source),
        };
        let mut st = self.inner.state.borrow_mut();
        let key = st.handlers.insert(handler);
        debug_assert_eq!(key, id.key);
        Ok(id)
    }

    /// Registers `fd` with the poller under the key of the next free handler slot; returns
    /// the new id and whether `fd` stays in the poller.
    fn try_add_handler(&self, fd: RawFd, interest: Interest) -> io::Result<(HandlerId, bool)> {
        let mut st = self.inner.state.borrow_mut();
        let st = &mut *st;
        let poller = st.poller.as_ref().ok_or_else(closed_error)?;
        let key = st.handlers.vacant_key();
        // SAFETY: `fd` was just borrowed from the caller's `source`, which `add_handler`
        // moves into the handler slot right after this returns Ok (no user code runs in
        // between). From then on, the slot owns the source until the handler is removed or
        // the loop is closed, and both paths delete the descriptor from the poller (or drop
        // the poller) *before* dropping the source. Since `AsFd` guarantees the descriptor
        // stays open while the source lives, the poller never watches a closed (or reused)
        // descriptor. With interest NONE, the descriptor is deleted again below, before
        // returning.
        unsafe { poller.add(fd, key, interest)? };
        let mut in_poller = true;
        if interest.is_none() {
            // Registered only to check that the poller accepts the descriptor; NONE is kept
            // out of the poller (see `Handler::in_poller`).
            // SAFETY: the caller's `source` keeps `fd` open for the duration of this call.
            match poller.delete(unsafe { BorrowedFd::borrow_raw(fd) }) {
                Ok(()) => in_poller = false,
                // Still registered: keep it marked so, and deleted before the source drops.
                Err(err) => log::warn!("ioloop: failed to unregister fd {fd}: {err}"),
            }
        }
        let generation = st.next_generation;
        st.next_generation += 1;
        Ok((HandlerId { key, generation }, in_poller))
    }

    /// Changes what a handler is interested in. Takes effect for events not yet dispatched,
    /// including those of the pass in progress.
    ///
    /// # Errors
    ///
    /// Kind [`NotFound`](io::ErrorKind::NotFound) if the handler was removed (or the loop
    /// closed); otherwise what the poller reports, in which case the interest is unchanged —
    /// except when re-adding a descriptor after [`Interest::NONE`] fails, which leaves it at
    /// `NONE`.
    pub fn update_handler(&self, id: HandlerId, interest: Interest) -> io::Result<()> {
        let mut st = self.inner.state.borrow_mut();
        let st = &mut *st;
        let not_found = || io::Error::new(io::ErrorKind::NotFound, "no such handler");
        let handler = match st.handlers.get_mut(id.key) {
            Some(h) if h.generation == id.generation => h,
            _ => return Err(not_found()),
        };
        let poller = st.poller.as_ref().ok_or_else(not_found)?;
        if handler.interest == interest {
            return Ok(());
        }
        match (handler.in_poller, interest.is_none()) {
            (true, false) => poller.modify(handler.fd(), id.key, interest)?,
            (true, true) => {
                poller.delete(handler.fd())?;
                handler.in_poller = false;
            }
            (false, false) => {
                // SAFETY: as in `try_add_handler`: the slot owns the source, which keeps the
                // descriptor open, and is only dropped after the descriptor is deleted.
                unsafe { poller.add(handler.fd, id.key, interest)? };
                handler.in_poller = true;
            }
            (false, true) => {}
        }
        handler.interest = interest;
        Ok(())
    }

    /// Unregisters a handler and drops its callback (after it returns, if it is the one
    /// running) and its source. Events of the pass in progress are not delivered to it.
    ///
    /// Returns whether the handler was registered; removing an unknown or already removed
    /// handler is a harmless `false`.
    pub fn remove_handler(&self, id: HandlerId) -> bool {
        let removed = {
            let mut st = self.inner.state.borrow_mut();
            match st.handlers.get(id.key) {
                Some(h) if h.generation == id.generation => {
                    let handler = st.handlers.remove(id.key);
                    if let (true, Some(poller)) = (handler.in_poller, &st.poller) {
                        if let Err(err) = poller.delete(handler.fd()) {
                            log::warn!("ioloop: failed to unregister fd {}: {err}", handler.fd);
                        }
                    }
                    Some(handler)
                }
                _ => None,
            }
        };
        // The source (and callback) drop here, after the descriptor left the poller and the
        // borrow was released.
        removed.is_some()
    }

    /// One pass: wait (no longer than `max_wait`, `None` for no bound of the caller's own),
    /// snapshot, dispatch I/O, due timers, queued callbacks.
    fn run_pass(&self, max_wait: Option<Duration>) -> io::Result<()> {
        let inner = &*self.inner;
        let (mut io_batch, ready_count) = {
            let mut st = inner.state.borrow_mut();
            let st = &mut *st;
            let Some(poller) = st.poller.as_ref() else {
                return Ok(());
            };
            let timeout = if !st.ready.is_empty() || st.timers.has_due() {
                Some(Duration::ZERO)
            } else {
                let until_next_timer = st
                    .timers
                    .next_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()));
                match (until_next_timer, max_wait) {
                    (Some(timer), Some(max)) => Some(timer.min(max)),
                    (timer, max) => timer.or(max),
                }
            };
            poller.wait(&mut st.events, timeout)?;

            // The snapshot: taken before any callback of this pass runs.
            let mut io_batch = std::mem::take(&mut st.io_batch);
            io_batch.clear();
            for (key, readiness) in st.events.iter() {
                if let Some(h) = st.handlers.get(key) {
                    io_batch.push((key, h.generation, readiness));
                }
            }
            inner.shared.take_batch(&mut st.remote_batch);
            st.ready
                .extend(st.remote_batch.drain(..).map(|cb| -> Callback { cb }));
            st.timers.collect_due(Instant::now());
            (io_batch, st.ready.len())
        };

        for &(key, generation, readiness) in &io_batch {
            self.dispatch_io(key, generation, readiness);
        }
        io_batch.clear();
        if let Ok(mut st) = inner.state.try_borrow_mut() {
            st.io_batch = io_batch;
        }

        loop {
            let callback = inner.state.borrow_mut().timers.pop_due();
            match callback {
                Some(callback) => callback(),
                None => break,
            }
        }

        for _ in 0..ready_count {
            let callback = inner.state.borrow_mut().ready.pop_front();
            match callback {
                Some(callback) => callback(),
                None => break,
            }
        }
        Ok(())
    }

    fn dispatch_io(&self, key: usize, generation: u64, readiness: Readiness) {
        let (callback, readiness) = {
            let mut st = self.inner.state.borrow_mut();
            let Some(handler) = st.handlers.get_mut(key) else {
                return;
            };
            if handler.generation != generation {
                return;
            }
            let Some(readiness) = readiness.restrict_to(handler.interest) else {
                return;
            };
            let Some(callback) = handler.callback.take() else {
                return;
            };
            (callback, readiness)
        };
        // Puts the callback back into its slot when it returns or unwinds, unless the handler
        // was removed meanwhile (then the callback is dropped, after the borrow).
        struct PutBack<'a> {
            inner: &'a Inner,
            key: usize,
            generation: u64,
            callback: Option<HandlerFn>,
        }
        impl Drop for PutBack<'_> {
            fn drop(&mut self) {
                let leftover = match self.inner.state.try_borrow_mut() {
                    Ok(mut st) => match st.handlers.get_mut(self.key) {
                        Some(h) if h.generation == self.generation && h.callback.is_none() => {
                            h.callback = self.callback.take();
                            None
                        }
                        _ => self.callback.take(),
                    },
                    Err(_) => self.callback.take(),
                };
                drop(leftover);
            }
        }
        let mut guard = PutBack {
            inner: &self.inner,
            key,
            generation,
            callback: Some(callback),
        };
        if let Some(callback) = guard.callback.as_mut() {
            callback(readiness);
        }
    }
}

impl Inner {
    fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        log::debug!("ioloop: closing");
        let (handlers, timers, ready, poller) = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let poller = st.poller.take();
            let handlers: Vec<Handler> = st.handlers.drain().collect();
            if let Some(poller) = &poller {
                for h in handlers.iter().filter(|h| h.in_poller) {
                    if let Err(err) = poller.delete(h.fd()) {
                        log::warn!("ioloop: failed to unregister fd {}: {err}", h.fd);
                    }
                }
            }
            st.handlers = Slab::new();
            let timers = st.timers.drain();
            let ready = std::mem::take(&mut st.ready);
            st.io_batch = Vec::new();
            st.remote_batch = Vec::new();
            (handlers, timers, ready, poller)
        };
        let (remote, remote_poller) = self.shared.close();
        // Release the poller first: no descriptor is watched any more.
        drop(poller);
        drop(remote_poller);
        // User code may run from here on (the callbacks' and sources' destructors); the
        // loop is already closed, so whatever they call is a no-op.
        drop(handlers);
        drop(timers);
        drop(ready);
        drop(remote);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}
