//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use ioloop::{IoLoop, TimeoutId};

/// Generous upper bound for a test's loop run: liveness only, never a timing assertion.
pub const WATCHDOG: Duration = Duration::from_secs(20);

/// Makes `start()` fail loudly (by panicking out of it) if the loop is still running after
/// [`WATCHDOG`].
pub fn watchdog(lp: &IoLoop) -> TimeoutId {
    lp.call_later(WATCHDOG, || {
        panic!("watchdog: the loop did not stop in time")
    })
}

/// Counts how many of its clones were dropped.
#[derive(Debug)]
pub struct DropCounter(pub Rc<Cell<usize>>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

/// A shared log of events, for asserting order.
pub type Log<T> = Rc<RefCell<Vec<T>>>;

pub fn log<T>() -> Log<T> {
    Rc::new(RefCell::new(Vec::new()))
}

/// A callback that appends `value` to `log`.
pub fn push<T: 'static>(log: &Log<T>, value: T) -> impl FnOnce() + 'static {
    let log = log.clone();
    move || log.borrow_mut().push(value)
}
