//! The seam to the operating system's poller: the `polling` crate, used level-triggered.
//!
//! Everything the loop knows about epoll / poll(2) goes through this file. `polling` picks
//! epoll on Linux, and its poll(2) backend when built with
//! `RUSTFLAGS="--cfg polling_test_poll_backend"`; both support [`polling::PollMode::Level`],
//! which is what the loop registers every descriptor with.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use polling::PollMode;

use crate::{Interest, Readiness};

/// The name of the backend `polling` was compiled with, for logs and diagnostics.
pub(crate) const BACKEND: &str = if cfg!(polling_test_poll_backend) {
    "poll"
} else if cfg!(any(target_os = "linux", target_os = "android")) {
    "epoll"
} else {
    "platform default"
};

/// A level-triggered poller. `Sync`: wakers on other threads call [`Poller::notify`].
#[derive(Debug)]
pub(crate) struct Poller {
    inner: polling::Poller,
}

/// A reusable buffer of readiness events filled by [`Poller::wait`].
#[derive(Debug)]
pub(crate) struct Events {
    inner: polling::Events,
}

impl Events {
    pub(crate) fn new() -> Events {
        Events {
            inner: polling::Events::new(),
        }
    }

    /// The events of the last wait, as `(key, readiness)`; the poller's own wake-up
    /// notifications are not included.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, Readiness)> + '_ {
        self.inner.iter().map(|ev| {
            let readiness = Readiness {
                readable: ev.readable,
                writable: ev.writable,
                error: ev.is_err().unwrap_or(false),
                hangup: ev.is_interrupt(),
            };
            (ev.key, readiness)
        })
    }
}

fn event(key: usize, interest: Interest) -> polling::Event {
    polling::Event::new(key, interest.is_readable(), interest.is_writable())
}

impl Poller {
    pub(crate) fn new() -> io::Result<Poller> {
        let inner = polling::Poller::new()?;
        if !inner.supports_level() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the platform poller does not support level-triggered mode",
            ));
        }
        log::debug!("ioloop: created {BACKEND} poller");
        Ok(Poller { inner })
    }

    /// Starts watching `fd` under `key`, level-triggered.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor, and must stay open until it has been passed to
    /// [`Poller::delete`] or this poller has been dropped.
    pub(crate) unsafe fn add(&self, fd: RawFd, key: usize, interest: Interest) -> io::Result<()> {
        // SAFETY: forwarded to our caller, see this function's contract above.
        unsafe {
            self.inner
                .add_with_mode(fd, event(key, interest), PollMode::Level)
        }
    }

    /// Changes the interest of a descriptor previously [`add`](Poller::add)ed.
    pub(crate) fn modify(
        &self,
        fd: BorrowedFd<'_>,
        key: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.inner
            .modify_with_mode(fd, event(key, interest), PollMode::Level)
    }

    /// Stops watching a descriptor.
    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.inner.delete(fd)
    }

    /// Blocks until a watched descriptor is ready, [`notify`](Poller::notify) is called, or
    /// `timeout` elapses (`None`: no timeout). `EINTR` is retried by `polling`.
    pub(crate) fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        events.inner.clear();
        log::trace!("ioloop: waiting, timeout {timeout:?}");
        match self.inner.wait(&mut events.inner, timeout) {
            Ok(_) => Ok(()),
            // polling 3.11's poll(2) backend sets its "notified" flag before writing the
            // wake-up byte to its pipe; a wait() that starts in between consumes the flag,
            // finds the pipe empty and fails with EAGAIN. That is a wake-up by notify(), not a
            // failure. But on that error path `polling::Poller::wait` also leaves its own
            // "notified" flag set, which would swallow every later notify() until a wait
            // returns normally. So: wait once more without blocking, which clears that flag
            // (and collects any events), and report that as the wake-up. epoll never fails
            // this way.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                log::trace!("ioloop: poller wait returned EAGAIN; treated as a notification");
                events.inner.clear();
                self.inner
                    .wait(&mut events.inner, Some(Duration::ZERO))
                    .map(drop)
            }
            Err(err) => Err(err),
        }
    }

    /// Wakes the current or next [`wait`](Poller::wait), from any thread.
    pub(crate) fn notify(&self) -> io::Result<()> {
        self.inner.notify()
    }
}
