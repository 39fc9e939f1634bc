//! Unix signals delivered as loop callbacks (the `signals` feature):
//! [`IoLoop::add_signal_handler`] and [`IoLoop::remove_signal_handler`].
//!
//! Nothing here runs user code in a signal handler. Every handler registration is a self-pipe
//! watched by the loop: a non-blocking Unix socket pair whose read end is an ordinary fd
//! handler of the loop. For each of its signals it registers two [`signal_hook`] actions, in
//! this order: set that signal's "arrived" flag, then write one byte to the write end (the
//! byte only wakes the loop; the flags say which signals arrived). When the read end is
//! readable, the loop drains it, then takes the flags and calls the callback once per signal
//! whose flag was set — drain before take, as signal-hook's self-pipe notes advise, so that no
//! arrival is lost, at the cost of an occasional wake-up with nothing to report.
//!
//! The signal-hook actions live as long as the handler's fd source: that source's `Drop`
//! unregisters them, and the loop drops it in [`IoLoop::remove_signal_handler`] and when it is
//! closed or dropped. signal-hook never uninstalls its process-wide handler (unregistering the
//! last action leaves the signal caught and ignored), so this module brings the default
//! action back itself: see [`Slot`].

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use signal_hook::SigId;

use crate::{HandlerId, Interest, IoLoop, closed_error};

/// Hang-up of the controlling terminal, or a daemon's "reload" request.
pub const SIGHUP: i32 = signal_hook::consts::SIGHUP;
/// Interrupt from the terminal: what Ctrl-C sends.
pub const SIGINT: i32 = signal_hook::consts::SIGINT;
/// Quit from the terminal (Ctrl-\\).
pub const SIGQUIT: i32 = signal_hook::consts::SIGQUIT;
/// A polite request to terminate: what `kill`, systemd and container runtimes send first.
pub const SIGTERM: i32 = signal_hook::consts::SIGTERM;
/// User-defined signal 1.
pub const SIGUSR1: i32 = signal_hook::consts::SIGUSR1;
/// User-defined signal 2.
pub const SIGUSR2: i32 = signal_hook::consts::SIGUSR2;

/// Identifies a signal handler added with [`IoLoop::add_signal_handler`].
///
/// Like a [`HandlerId`], never reused by its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignalHandlerId(HandlerId);

impl IoLoop {
    /// Calls `callback` on the loop's thread, with the signal's number, when one of `signals`
    /// arrives (feature `signals`; Unix signals, process-wide).
    ///
    /// The callback is a loop callback like any other, never run inside the signal handler:
    /// it runs in the I/O step of a pass (see the [crate documentation](crate#how-a-pass-runs))
    /// and may call anything, for instance close an AMQP connection gracefully, stop or close
    /// the loop, or remove this very handler. The signal handler itself only sets a flag and
    /// writes one byte to a non-blocking socket, through [`signal_hook`].
    ///
    /// # Delivery
    ///
    /// - Arrivals of one signal are coalesced: however often a signal arrives before the
    ///   callback gets to it, it is reported once (the kernel coalesces pending signals the
    ///   same way). Distinct signals are each reported, in the order of `signals` — not
    ///   necessarily the order they arrived in.
    /// - A signal that arrives while the loop is not running is reported on the next pass
    ///   of [`start`](IoLoop::start) or [`run_once`](IoLoop::run_once). Until then the
    ///   signal is *handled* — it does not terminate the process — so a program blocked
    ///   elsewhere does not react to Ctrl-C until it runs its loop again.
    /// - Signals are process-wide and may be delivered to any thread; the callback still
    ///   runs on the loop's thread. Every handler registered for a signal is called — several
    ///   on one loop, on several loops, and any other signal-hook action of the process.
    /// - `signals` may repeat a number (it counts once).
    ///
    /// # Removal, and the default action
    ///
    /// [`remove_signal_handler`](IoLoop::remove_signal_handler),
    /// [`close`](IoLoop::close) or dropping the loop unregisters the handler's signal-hook
    /// actions. Once no `IoLoop` handler of the process is left for a signal, the signal
    /// behaves as before the first one was added: a signal whose disposition was the default
    /// (for SIGINT and SIGTERM: terminate) gets its default action back, an ignored one stays
    /// ignored, and a handler installed before (by other code) was called throughout and
    /// still is. (Real-time signals are the exception: signal-hook does not know their
    /// default action, so they stay ignored.)
    ///
    /// signal-hook keeps its process-wide signal handler installed for good (its
    /// `unregister` alone would leave the signal caught and ignored), so the default action
    /// is emulated from there: for a terminating signal, by restoring the default
    /// disposition and raising the signal again. One consequence: if other code registers
    /// the same signal through signal-hook *after* the first `add_signal_handler` for it,
    /// that emulated default still runs once no `IoLoop` handler is left; keep a loop handler
    /// registered for as long as such code expects to handle the signal alone.
    ///
    /// Each handler uses a Unix socket pair plus one duplicated descriptor per signal.
    ///
    /// # Errors
    ///
    /// - kind [`InvalidInput`](io::ErrorKind::InvalidInput) if `signals` is empty or holds
    ///   one of signal-hook's forbidden signals (`SIGKILL`, `SIGSTOP`, `SIGILL`, `SIGFPE`,
    ///   `SIGSEGV`), which cannot or must not be handled this way;
    /// - what the system reports, for instance `EINVAL` (kind
    ///   [`InvalidInput`](io::ErrorKind::InvalidInput)) for a number that is no signal, or
    ///   running out of descriptors;
    /// - [`Closed`](crate::Closed) (kind [`Other`](io::ErrorKind::Other)) if the loop has been
    ///   closed.
    ///
    /// On error nothing stays registered, and `callback` is dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use std::cell::Cell;
    /// use std::rc::Rc;
    /// use ioloop::{IoLoop, SIGUSR1, SIGUSR2};
    ///
    /// let lp = IoLoop::new()?;
    /// let seen = Rc::new(Cell::new(0));
    /// let (s, handle) = (seen.clone(), lp.clone());
    /// let id = lp.add_signal_handler(&[SIGUSR1, SIGUSR2], move |signal| {
    ///     assert_eq!(signal, SIGUSR1);
    ///     s.set(s.get() + 1);
    ///     handle.stop();
    /// })?;
    /// // Another process would send it with `kill -USR1 <pid>`; this one sends it to itself.
    /// signal_hook::low_level::raise(SIGUSR1)?;
    /// lp.start()?;
    /// assert_eq!(seen.get(), 1);
    /// assert!(lp.remove_signal_handler(id));
    /// lp.close();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn add_signal_handler<F>(&self, signals: &[i32], callback: F) -> io::Result<SignalHandlerId>
    where
        F: FnMut(i32) + 'static,
    {
        if self.is_closed() {
            // Checked first: a closed loop must not touch the process's signal dispositions.
            return Err(closed_error());
        }
        let mut unique: Vec<i32> = Vec::with_capacity(signals.len());
        for &signal in signals {
            if signal_hook::consts::FORBIDDEN.contains(&signal) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("signal {signal} cannot be handled by an IoLoop"),
                ));
            }
            if !unique.contains(&signal) {
                unique.push(signal);
            }
        }
        if unique.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "add_signal_handler: no signal given",
            ));
        }

        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let read = Rc::new(read);
        let active = Rc::new(Cell::new(true));
        let mut source = SignalSource {
            read: read.clone(),
            active: active.clone(),
            actions: Vec::with_capacity(2 * unique.len()),
            claimed: Vec::with_capacity(unique.len()),
        };
        let mut pending = Vec::with_capacity(unique.len());
        for signal in unique {
            let arrived = Arc::new(AtomicBool::new(false));
            // On error, `source` drops and undoes what was registered so far.
            source.register(signal, &arrived, &write)?;
            pending.push((signal, arrived));
        }
        let mut dispatch = Dispatch {
            read,
            rearm: write,
            pending,
            active,
            callback,
        };
        let id = self.add_handler(source, Interest::READABLE, move |_| dispatch.on_readable())?;
        log::debug!("ioloop: added signal handler {id:?}");
        Ok(SignalHandlerId(id))
    }

    /// Removes a signal handler: its callback is not called again (not even for a signal
    /// that already arrived), and its signal-hook actions are unregistered at once; once no
    /// `IoLoop` handler of the process is left for a signal, its default action is back (see
    /// [`add_signal_handler`](IoLoop::add_signal_handler)). The callback is dropped after it
    /// returns, if it is the one running.
    ///
    /// Returns whether the handler was registered; removing an unknown or already removed
    /// handler is a harmless `false`. Closing or dropping the loop removes its signal
    /// handlers too.
    pub fn remove_signal_handler(&self, id: SignalHandlerId) -> bool {
        self.remove_handler(id.0)
    }
}

/// The fd source of a signal handler: the read end of its self-pipe, and its registrations.
/// The loop holds it until the handler is removed or the loop closed; dropping it
/// unregisters everything.
struct SignalSource {
    read: Rc<UnixStream>,
    /// Shared with the handler's [`Dispatch`]: cleared when this source drops, so that a
    /// dispatch in progress reports nothing more.
    active: Rc<Cell<bool>>,
    actions: Vec<SigId>,
    /// The signals counted in [`SLOTS`] for this source, to release when it drops.
    claimed: Vec<i32>,
}

impl SignalSource {
    /// Claims `signal` in the process-wide table, then registers its two actions: set
    /// `arrived`, then write a byte to (a duplicate of) `write`.
    fn register(
        &mut self,
        signal: i32,
        arrived: &Arc<AtomicBool>,
        write: &UnixStream,
    ) -> io::Result<()> {
        let wake = write.try_clone()?;
        claim(signal)?;
        self.claimed.push(signal);
        // signal-hook runs a signal's actions in the order they were registered, so the flag
        // is set before the byte that wakes the loop is written.
        self.actions
            .push(signal_hook::flag::register(signal, arrived.clone())?);
        self.actions
            .push(signal_hook::low_level::pipe::register(signal, wake)?);
        Ok(())
    }
}

impl AsFd for SignalSource {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl Drop for SignalSource {
    fn drop(&mut self) {
        self.active.set(false);
        // `unregister` returns once no signal handler can still be running the removed
        // actions; signal-hook then closes the write ends they owned.
        for id in self.actions.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        // Released only now, so that a signal arriving in between finds no action and no
        // default either (it is dropped) rather than terminating the process while a handler
        // is still being removed.
        for signal in self.claimed.drain(..) {
            release(signal);
        }
    }
}

/// The fd handler's state: reads the self-pipe and reports the signals that arrived.
struct Dispatch<F> {
    read: Rc<UnixStream>,
    /// A write end of our own, to re-arm the pipe if the callback panics. Also keeps the
    /// socket from ever reporting a hang-up (which would make the read end readable forever).
    rearm: UnixStream,
    /// Each signal, in the order given, with its "arrived" flag.
    pending: Vec<(i32, Arc<AtomicBool>)>,
    active: Rc<Cell<bool>>,
    callback: F,
}

impl<F: FnMut(i32)> Dispatch<F> {
    fn on_readable(&mut self) {
        drain(&self.read);
        let Dispatch {
            rearm,
            pending,
            active,
            callback,
            ..
        } = self;
        // If a callback panics, the signals not yet reported keep their flags; the guard
        // writes a byte so that the next pass reports them (the pipe was drained above).
        let _guard = RearmOnUnwind {
            rearm,
            pending,
            active,
        };
        for (signal, arrived) in pending.iter() {
            // Removed (or the loop closed) by an earlier call of this dispatch.
            if !active.get() {
                return;
            }
            if arrived.swap(false, Ordering::SeqCst) {
                log::debug!("ioloop: signal {signal} arrived");
                callback(*signal);
            }
        }
    }
}

struct RearmOnUnwind<'a> {
    rearm: &'a UnixStream,
    pending: &'a [(i32, Arc<AtomicBool>)],
    active: &'a Cell<bool>,
}

impl Drop for RearmOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking()
            && self.active.get()
            && self.pending.iter().any(|(_, a)| a.load(Ordering::SeqCst))
        {
            // Non-blocking; a full pipe is readable already, which is all this is for.
            let _ = (&*self.rearm).write(&[0]);
        }
    }
}

/// Reads the self-pipe until it is empty.
fn drain(mut read: &UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match read.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) => {
                log::warn!("ioloop: reading a signal self-pipe failed: {err}");
                return;
            }
        }
    }
}

/// The process-wide record of one signal that some `IoLoop` handler has registered.
///
/// Why it exists: signal-hook's `unregister` removes an action but never puts back the
/// disposition the signal had before signal-hook's handler was installed; with no action
/// left, a signal whose default was "terminate" would be silently ignored from then on — a
/// program whose loop had a Ctrl-C handler could no longer be interrupted after closing it.
/// So when `IoLoop` is the first to hand a signal with the default disposition to
/// signal-hook, it also registers, for the life of the process,
/// [`signal_hook::flag::register_conditional_default`], which emulates the default action
/// while `unused` is set — that is, while no `IoLoop` handler has the signal.
struct Slot {
    signal: i32,
    /// How many `IoLoop` signal handlers (on any loop) have the signal.
    users: usize,
    /// Set while `users` is 0; `None` if the signal's disposition was not the default (an
    /// ignored signal stays ignored, a previous handler is chained by signal-hook) or
    /// signal-hook does not know its default action.
    unused: Option<Arc<AtomicBool>>,
}

/// Every signal that an `IoLoop` handler ever registered. Never touched by a signal handler.
static SLOTS: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

/// No code that can panic runs while this lock is held, so poisoning cannot leave the table
/// half-updated; recover from it rather than propagate it.
fn slots() -> MutexGuard<'static, Vec<Slot>> {
    SLOTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one more `IoLoop` handler for `signal`, and turns the emulated default off.
fn claim(signal: i32) -> io::Result<()> {
    let mut slots = slots();
    if let Some(slot) = slots.iter_mut().find(|s| s.signal == signal) {
        slot.users += 1;
        if let Some(unused) = &slot.unused {
            unused.store(false, Ordering::SeqCst);
        }
        return Ok(());
    }
    // The first time: this is where a default disposition must be seen, before signal-hook's
    // handler replaces it. Created "in use", since the caller registers its actions next.
    let unused = if has_default_disposition(signal)?
        && signal_hook::low_level::signal_name(signal).is_some()
    {
        let unused = Arc::new(AtomicBool::new(false));
        // The returned id is dropped on purpose: this action stays for the life of the process.
        signal_hook::flag::register_conditional_default(signal, unused.clone())?;
        Some(unused)
    } else {
        None
    };
    slots.push(Slot {
        signal,
        users: 1,
        unused,
    });
    Ok(())
}

/// Counts one `IoLoop` handler fewer for `signal`; with none left, turns the emulated default
/// back on.
fn release(signal: i32) {
    let mut slots = slots();
    if let Some(slot) = slots.iter_mut().find(|s| s.signal == signal) {
        slot.users -= 1;
        if slot.users == 0 {
            if let Some(unused) = &slot.unused {
                unused.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Whether `signal`'s current disposition is `SIG_DFL`.
fn has_default_disposition(signal: i32) -> io::Result<bool> {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::uninit();
    // SAFETY: with a null new action, sigaction(2) only writes the current action into
    // `current`, which points to writable memory of the right size and alignment; it is read
    // only if the call succeeded, and so was fully written.
    let current = unsafe {
        if libc::sigaction(signal, std::ptr::null(), current.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        current.assume_init()
    };
    Ok(current.sa_sigaction == libc::SIG_DFL)
}
