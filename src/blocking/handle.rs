//! [`BlockingConnectionHandle`], how other threads reach a
//! [`BlockingConnection`], and the blocking face's ack door.

use std::fmt;
use std::sync::{Arc, Weak};

use super::connection::BlockingConnection;
use super::engine::Engine;
use crate::ack::{Door, Settle};
use crate::error::Error;
use crate::protocol::ChannelKey;

/// A `Send + Sync + Clone` handle that hands closures to a
/// [`BlockingConnection`] from other threads (pika's
/// `add_callback_threadsafe`): they run inside its next
/// `process_data_events` (or `sleep`, `start_consuming`), on the thread
/// that calls it.
#[derive(Clone)]
pub struct BlockingConnectionHandle {
    engine: Weak<Engine>,
}

impl fmt::Debug for BlockingConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingConnectionHandle")
            .field("alive", &(self.engine.strong_count() > 0))
            .finish()
    }
}

impl BlockingConnectionHandle {
    pub(super) fn new(engine: &Arc<Engine>) -> BlockingConnectionHandle {
        BlockingConnectionHandle {
            engine: Arc::downgrade(engine),
        }
    }

    /// Queues `callback` for the connection's next `process_data_events`
    /// and wakes it if it is waiting.
    ///
    /// # Errors
    /// [`Error::ConnectionWrongState`] when the connection is closed or
    /// gone; the callback is dropped.
    pub fn add_callback_threadsafe(
        &self,
        callback: impl FnOnce(&BlockingConnection) + Send + 'static,
    ) -> Result<(), Error> {
        let closed = || Error::ConnectionWrongState {
            detail: "the connection is closed; add_callback_threadsafe refused".into(),
        };
        let engine = self.engine.upgrade().ok_or_else(closed)?;
        {
            let mut jobs = engine.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if jobs.closed {
                return Err(closed());
            }
            jobs.callbacks.push_back(Box::new(callback));
        }
        engine.notify();
        Ok(())
    }
}

/// The blocking face's ack door: settles under the connection's lock from
/// the calling thread; the bytes go out with the next write (the flusher's
/// or a waiting thread's).
struct BlockingDoor {
    engine: Weak<Engine>,
}

impl Door for BlockingDoor {
    fn settle(
        &self,
        channel: ChannelKey,
        epoch: u64,
        delivery_tag: u64,
        how: Settle,
    ) -> Result<(), Error> {
        let gone = || Error::ConnectionWrongState {
            detail: format!("delivery {delivery_tag} not settled: its connection is closed"),
        };
        let engine = self.engine.upgrade().ok_or_else(gone)?;
        let mut st = engine.lock();
        if st.terminal.is_some() {
            return Err(gone());
        }
        st.core
            .settle(channel, delivery_tag, how, Some(epoch))
            .map_err(|e| match e {
                Error::ChannelWrongState { .. } => Error::ChannelWrongState {
                    detail: format!(
                        "delivery {delivery_tag} not settled: its channel {} is closed or \
                         closing ({e})",
                        channel.number
                    ),
                },
                other => other,
            })?;
        engine.after_command(st)
    }
}

/// The door ack handles of this connection go through.
pub(super) fn door(engine: &Arc<Engine>) -> Arc<dyn Door> {
    Arc::new(BlockingDoor {
        engine: Arc::downgrade(engine),
    })
}
