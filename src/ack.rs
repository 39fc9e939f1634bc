//! The threaded-ack door: [`AckHandle`], a `Send` handle a worker thread
//! uses to ack, nack or reject one delivery on the connection it came from
//! (pika's `add_callback_threadsafe(functools.partial(channel.basic_ack,
//! delivery_tag=…))` in one line). Every face has a door behind it.
//!
//! A handle names the delivery's channel by key (number and generation)
//! and its connection instance by epoch, so a delivery of a channel that
//! closed, or of a connection that was replaced, is never acked by
//! mistake on its successor: the call says so instead.

use std::fmt;
use std::sync::Arc;

use crate::error::Error;
use crate::protocol::ChannelKey;
pub use crate::protocol::Settle;

/// Epochs are unique in the process: a delivery's epoch names the one
/// connection instance (face and attempt) it came from.
static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The epoch for a new protocol core instance.
pub(crate) fn next_epoch() -> u64 {
    NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A face's way from any thread back to its connection's thread.
pub(crate) trait Door: Send + Sync {
    /// Settles `delivery_tag` on `channel` of connection instance `epoch`,
    /// on the connection's thread; refuses at once what it can tell is
    /// gone.
    fn settle(
        &self,
        channel: ChannelKey,
        epoch: u64,
        delivery_tag: u64,
        how: Settle,
    ) -> Result<(), Error>;
}

/// Settles one delivery from any thread: `Send + Sync + Clone`.
///
/// Get one from the channel the delivery came from
/// ([`Channel::ack_handle`](crate::Channel::ack_handle)), move it to a
/// worker thread, and call [`AckHandle::ack`] (or `nack`, `reject`) when
/// the work is done: the ack is sent on the connection's own thread.
///
/// # Errors
/// Each call returns [`Error::ConnectionWrongState`] when the connection
/// is closed, and [`Error::ChannelWrongState`] when the delivery's channel
/// closed or the connection was replaced since (its delivery tags mean
/// nothing on the new one) — the ack is not sent then. When the channel
/// closes between the call and the connection's thread taking the ack, the
/// ack is dropped there, and logged.
///
/// ```no_run
/// # fn demo(channel: &pika::Channel, delivery: pika::Delivery) {
/// let ack = channel.ack_handle(&delivery);
/// std::thread::spawn(move || {
///     // ... work on delivery.body ...
///     if let Err(e) = ack.ack() {
///         eprintln!("not acked: {e}");
///     }
/// });
/// # }
/// ```
#[derive(Clone)]
pub struct AckHandle {
    door: Arc<dyn Door>,
    channel: ChannelKey,
    epoch: u64,
    delivery_tag: u64,
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("channel", &self.channel.number)
            .field("epoch", &self.epoch)
            .field("delivery_tag", &self.delivery_tag)
            .finish()
    }
}

impl AckHandle {
    pub(crate) fn new(
        door: Arc<dyn Door>,
        channel: ChannelKey,
        epoch: u64,
        delivery_tag: u64,
    ) -> AckHandle {
        AckHandle {
            door,
            channel,
            epoch,
            delivery_tag,
        }
    }

    /// The delivery tag it settles.
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// The number of the channel the delivery came from.
    pub fn channel_number(&self) -> u16 {
        self.channel.number
    }

    /// Acknowledges the delivery.
    ///
    /// # Errors
    /// See [`AckHandle`].
    pub fn ack(&self) -> Result<(), Error> {
        self.settle(Settle::Ack { multiple: false })
    }

    /// Rejects the delivery with Basic.Nack, back to the queue or not.
    ///
    /// # Errors
    /// See [`AckHandle`].
    pub fn nack(&self, requeue: bool) -> Result<(), Error> {
        self.settle(Settle::Nack {
            multiple: false,
            requeue,
        })
    }

    /// Rejects the delivery with Basic.Reject, back to the queue or not.
    ///
    /// # Errors
    /// See [`AckHandle`].
    pub fn reject(&self, requeue: bool) -> Result<(), Error> {
        self.settle(Settle::Reject { requeue })
    }

    /// Settles the delivery as `how` says (with `multiple`, every earlier
    /// unsettled delivery of the channel too).
    ///
    /// # Errors
    /// See [`AckHandle`].
    pub fn settle(&self, how: Settle) -> Result<(), Error> {
        self.door
            .settle(self.channel, self.epoch, self.delivery_tag, how)
    }
}

/// The door of a connection that no longer exists: refuses everything.
pub(crate) struct ClosedDoor;

impl Door for ClosedDoor {
    fn settle(&self, _: ChannelKey, _: u64, delivery_tag: u64, _: Settle) -> Result<(), Error> {
        Err(Error::ConnectionWrongState {
            detail: format!("delivery {delivery_tag} not settled: its connection is gone"),
        })
    }
}
