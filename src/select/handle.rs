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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ioloop::IoLoopWaker;

use super::{SelectConnection, Shared, ThreadsafeQueue};
use crate::ack::{Door, Settle};
use crate::error::Error;
use crate::protocol::ChannelKey;

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

/// What other threads may know of a connection without reaching its
/// thread: whether it is closed, its current epoch, and its open channels
/// (number → generation). The loop thread keeps it up to date; the door
/// reads it to refuse at once an ack that cannot be right.
#[derive(Debug, Default)]
pub(super) struct DoorState {
    closed: AtomicBool,
    epoch: AtomicU64,
    channels: Mutex<HashMap<u16, u32>>,
}

impl DoorState {
    pub(super) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    pub(super) fn channel_opened(&self, key: ChannelKey) {
        lock(&self.channels).insert(key.number, key.generation);
    }

    pub(super) fn channel_closed(&self, key: ChannelKey) {
        let mut channels = lock(&self.channels);
        if channels.get(&key.number) == Some(&key.generation) {
            channels.remove(&key.number);
        }
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.channels).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The select face's door: settles on the loop thread through the
/// connection's thread-safe queue.
pub(super) struct SelectDoor {
    pub(super) handle: ConnectionHandle,
    pub(super) state: Arc<DoorState>,
}

impl Door for SelectDoor {
    fn settle(
        &self,
        channel: ChannelKey,
        epoch: u64,
        delivery_tag: u64,
        how: Settle,
    ) -> Result<(), Error> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::ConnectionWrongState {
                detail: format!("delivery {delivery_tag} not settled: its connection is closed"),
            });
        }
        let current = self.state.epoch.load(Ordering::Acquire);
        if current != epoch {
            return Err(Error::ChannelWrongState {
                detail: format!(
                    "delivery {delivery_tag} not settled: it came from connection instance \
                     {epoch}, the connection is now instance {current}"
                ),
            });
        }
        if lock(&self.state.channels).get(&channel.number) != Some(&channel.generation) {
            return Err(Error::ChannelWrongState {
                detail: format!(
                    "delivery {delivery_tag} not settled: its channel {} is closed or closing",
                    channel.number
                ),
            });
        }
        self.handle.add_callback_threadsafe(move |conn| {
            conn.settle_on_loop(channel, epoch, delivery_tag, how)
        })
    }
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
