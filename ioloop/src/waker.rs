//! The only thread-safe door into a loop: the queue of `Send` callbacks, the stop flag, and the
//! poller notification that wakes the loop thread, behind [`IoLoopWaker`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::poller::Poller;

/// A callback queued from another thread.
pub(crate) type SendCallback = Box<dyn FnOnce() + Send>;

/// The error returned when the loop a [`IoLoopWaker`] (or an [`IoLoop`](crate::IoLoop)
/// method) refers to has been closed or dropped.
///
/// [`IoLoop`](crate::IoLoop) methods that return [`std::io::Result`] wrap it in an
/// [`std::io::Error`] of kind [`Other`](std::io::ErrorKind::Other); recognise it with
/// `err.get_ref().is_some_and(|e| e.is::<Closed>())`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the I/O loop has been closed")
    }
}

impl std::error::Error for Closed {}

/// State shared between a loop and its wakers.
pub(crate) struct Shared {
    remote: Mutex<Remote>,
    /// Set by `stop()` from either side; consumed when `start()` returns.
    stop: AtomicBool,
}

struct Remote {
    queue: Vec<SendCallback>,
    closed: bool,
    /// `None` once the loop is closed, so a waker does not keep the poller's descriptors open.
    poller: Option<Arc<Poller>>,
}

impl Shared {
    pub(crate) fn new(poller: Arc<Poller>) -> Shared {
        Shared {
            remote: Mutex::new(Remote {
                queue: Vec::new(),
                closed: false,
                poller: Some(poller),
            }),
            stop: AtomicBool::new(false),
        }
    }

    /// No user code ever runs while this lock is held, so a poisoned lock cannot hold broken
    /// state; recover from poisoning instead of propagating it.
    fn lock(&self) -> MutexGuard<'_, Remote> {
        self.remote.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, callback: SendCallback) -> Result<(), (Closed, SendCallback)> {
        let poller = {
            let mut remote = self.lock();
            if remote.closed {
                // Hand the callback back so it is dropped after the lock is released.
                return Err((Closed, callback));
            }
            let was_empty = remote.queue.is_empty();
            remote.queue.push(callback);
            // A non-empty queue means a notification is already on its way: whoever made it
            // non-empty notifies after unlocking, and the loop empties the queue only after
            // waking. Skipping the redundant notify saves a syscall per call under load.
            if was_empty {
                remote.poller.clone()
            } else {
                None
            }
        };
        if let Some(poller) = poller {
            notify(&poller);
        }
        Ok(())
    }

    /// Requests a stop and wakes the loop. Called by the waker; the loop thread sets the
    /// flag directly.
    pub(crate) fn request_stop_and_wake(&self) -> Result<(), Closed> {
        let poller = {
            let remote = self.lock();
            if remote.closed {
                return Err(Closed);
            }
            remote.poller.clone()
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some(poller) = poller {
            notify(&poller);
        }
        Ok(())
    }

    pub(crate) fn set_stop(&self, value: bool) {
        self.stop.store(value, Ordering::SeqCst);
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Moves the queued callbacks into `batch` (which must be empty), keeping its capacity
    /// for the next pass.
    pub(crate) fn take_batch(&self, batch: &mut Vec<SendCallback>) {
        debug_assert!(batch.is_empty());
        std::mem::swap(&mut self.lock().queue, batch);
    }

    /// Marks the loop closed; returns what was queued and the poller, for the caller to drop
    /// after the lock is released.
    pub(crate) fn close(&self) -> (Vec<SendCallback>, Option<Arc<Poller>>) {
        let mut remote = self.lock();
        remote.closed = true;
        (std::mem::take(&mut remote.queue), remote.poller.take())
    }
}

fn notify(poller: &Poller) {
    if let Err(err) = poller.notify() {
        // The callback is queued regardless; it runs at the loop's next wake-up.
        log::error!("ioloop: failed to wake the poller: {err}");
    }
}

/// A `Send + Sync + Clone` handle for reaching a loop from other threads, made by
/// [`IoLoop::waker`](crate::IoLoop::waker).
///
/// It is the only thread-safe door into an [`IoLoop`](crate::IoLoop): it queues callbacks to
/// run on the loop thread and requests a stop, waking the loop's poller at once. Once the loop
/// has been closed, or every [`IoLoop`](crate::IoLoop) handle dropped, its calls return
/// [`Closed`]. A waker does not keep the loop alive.
#[derive(Clone)]
pub struct IoLoopWaker {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for IoLoopWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let remote = self.shared.lock();
        f.debug_struct("IoLoopWaker")
            .field("closed", &remote.closed)
            .field("queued", &remote.queue.len())
            .finish()
    }
}

impl IoLoopWaker {
    /// Queues `callback` to run once on the loop thread, and wakes the loop.
    ///
    /// Callbacks from one thread run in the order they were queued. A callback queued while
    /// the loop is dispatching runs on a later pass; the callbacks queued before a pass begins
    /// run in that pass, after its timers. A loop that is not running keeps them until
    /// [`start`](crate::IoLoop::start) or [`run_once`](crate::IoLoop::run_once) is called,
    /// and drops them if it is closed first.
    ///
    /// # Errors
    ///
    /// [`Closed`] if the loop has been closed or dropped; `callback` is then dropped unrun.
    pub fn add_callback_threadsafe<F>(&self, callback: F) -> Result<(), Closed>
    where
        F: FnOnce() + Send + 'static,
    {
        match self.shared.push(Box::new(callback)) {
            Ok(()) => Ok(()),
            Err((closed, callback)) => {
                drop(callback);
                Err(closed)
            }
        }
    }

    /// Asks the loop to stop, waking it at once: [`start`](crate::IoLoop::start) returns after
    /// the pass in progress. If the loop is not running, the request makes its next `start()`
    /// return immediately (as [`IoLoop::stop`](crate::IoLoop::stop) does). A
    /// [`run_once`](crate::IoLoop::run_once) waiting in the poller is woken and returns after
    /// its pass; the request stays for the next `start()`.
    ///
    /// # Errors
    ///
    /// [`Closed`] if the loop has been closed or dropped.
    pub fn stop(&self) -> Result<(), Closed> {
        self.shared.request_stop_and_wake()
    }

    /// Whether the loop has been closed or dropped. A `false` may be outdated by the time it
    /// is read; the other methods report it reliably.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}
