//! [`ConnectionHandle`]: how other threads reach a [`SelectConnection`]
//! (pika's `add_callback_threadsafe`).
//!
//! A connection is `!Send`, so a closure sent from another thread cannot
//! carry it: the handle carries the connection's id, and the loop thread
//! finds the connection in a thread-local registry when the closure's turn
//! comes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};

use ioloop::IoLoopWaker;

use super::{SelectConnection, Shared, ThreadsafeQueue};
use crate::error::Error;

thread_local! {
    /// Connections of this thread by id.
    static REGISTRY: RefCell<HashMap<u64, Weak<Shared>>> = RefCell::new(HashMap::new());
}

pub(super) fn register(id: u64, shared: &Rc<Shared>) {
    REGISTRY.with(|r| r.borrow_mut().insert(id, Rc::downgrade(shared)));
}

pub(super) fn unregister(id: u64) {
    REGISTRY.with(|r| r.borrow_mut().remove(&id));
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
    pub(super) fn new(shared: &Rc<Shared>) -> ConnectionHandle {
        ConnectionHandle {
            waker: shared.ioloop.waker(),
            id: shared.id,
            queue: shared.threadsafe.clone(),
        }
    }

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
            .add_callback_threadsafe(move || drain(id, &queue))
            .map_err(|_| closed())
    }
}

/// Runs one queued closure (each `add_callback_threadsafe` queued one
/// wake-up), with no lock held.
fn drain(id: u64, queue: &Mutex<ThreadsafeQueue>) {
    let Some(shared) = REGISTRY.with(|r| r.borrow().get(&id).and_then(Weak::upgrade)) else {
        return;
    };
    let conn = SelectConnection::from_shared(shared);
    let next = queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .callbacks
        .pop_front();
    if let Some(cb) = next {
        cb(&conn);
    }
}
