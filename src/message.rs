//! The messages a channel hands to the application — [`Delivery`] (to a
//! consumer), [`GetMessage`] (from `basic_get`), [`ReturnedMessage`] (a
//! mandatory message the broker could not route) — and [`Confirmation`],
//! what became of a message published in confirm mode. Shared by every
//! face of the client.

use crate::error::Error;
use crate::spec::{BasicProperties, PropertiesError, basic};

/// A message delivered to a consumer (pika's `on_message_callback`
/// arguments). The body is owned: move it to another thread if you like.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The Basic.Deliver method: consumer tag, delivery tag, redelivered,
    /// exchange, routing key.
    pub method: basic::Deliver,
    /// The message properties (those that decoded, see
    /// `properties_error`).
    pub properties: BasicProperties,
    /// The message body.
    pub body: Vec<u8>,
    /// Set when some properties did not decode (e.g. a header type this
    /// client does not know, a content type that is not UTF-8): the message
    /// is delivered anyway, with the raw property bytes, so it can be acked,
    /// rejected or dead-lettered.
    pub properties_error: Option<PropertiesError>,
    /// The connection instance that delivered it: each connection (each
    /// new socket, after a reconnect too) has its own epoch, and its
    /// delivery tags mean nothing on another. Acks that name an epoch are
    /// refused on a connection of another one, instead of acking the wrong
    /// message.
    pub epoch: u64,
}

/// A message fetched with [`Channel::basic_get`](crate::Channel::basic_get).
#[derive(Debug, Clone, PartialEq)]
pub struct GetMessage {
    /// The Basic.GetOk method: delivery tag, redelivered, exchange, routing
    /// key, message count.
    pub method: basic::GetOk,
    /// The message properties (those that decoded, see
    /// `properties_error`).
    pub properties: BasicProperties,
    /// The message body.
    pub body: Vec<u8>,
    /// Set when some properties did not decode (e.g. a header type this
    /// client does not know, a content type that is not UTF-8): the message
    /// is delivered anyway, with the raw property bytes, so it can be acked,
    /// rejected or dead-lettered.
    pub properties_error: Option<PropertiesError>,
}

/// A mandatory message the broker could not route, returned with
/// Basic.Return.
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnedMessage {
    /// The Basic.Return method: reply code and text, exchange, routing key.
    pub method: basic::Return,
    /// The message properties (those that decoded, see
    /// `properties_error`).
    pub properties: BasicProperties,
    /// The message body.
    pub body: Vec<u8>,
    /// Set when some properties did not decode (e.g. a header type this
    /// client does not know, a content type that is not UTF-8): the message
    /// is delivered anyway, with the raw property bytes, so it can be acked,
    /// rejected or dead-lettered.
    pub properties_error: Option<PropertiesError>,
}

/// What became of published messages in confirm mode, one call per
/// Basic.Ack or Basic.Nack from the broker (never one per tag): `settled`
/// holds every delivery tag it settled — with `multiple`, each unconfirmed
/// tag up to and including `delivery_tag` — in ascending order. When the
/// channel ends with publishes still unconfirmed, one
/// [`Confirmation::Failed`] lists them all.
///
/// ```
/// use pika::Confirmation;
///
/// let c = Confirmation::Ack { delivery_tag: 5, multiple: true, settled: vec![3, 4, 5] };
/// assert!(c.is_ack());
/// assert_eq!(c.settled(), [3, 4, 5]);
/// ```
#[derive(Debug, Clone)]
pub enum Confirmation {
    /// The broker took responsibility for the message (or, with
    /// `multiple`, for every message up to and including the tag).
    Ack {
        /// The delivery tag the broker named (one that
        /// [`Channel::basic_publish`](crate::Channel::basic_publish) returned).
        delivery_tag: u64,
        /// Whether it covers every earlier tag too.
        multiple: bool,
        /// The tags it settled, ascending.
        settled: Vec<u64>,
    },
    /// The broker could not take the message(s).
    Nack {
        /// The delivery tag the broker named.
        delivery_tag: u64,
        /// Whether it covers every earlier tag too.
        multiple: bool,
        /// The tags it settled, ascending.
        settled: Vec<u64>,
    },
    /// The channel or connection closed before the broker confirmed these
    /// messages: their fate is unknown.
    Failed {
        /// The tags still unconfirmed, ascending.
        settled: Vec<u64>,
        /// Why the channel closed.
        error: Error,
    },
}

impl Confirmation {
    /// Every delivery tag this confirmation settles, ascending.
    pub fn settled(&self) -> &[u64] {
        match self {
            Confirmation::Ack { settled, .. }
            | Confirmation::Nack { settled, .. }
            | Confirmation::Failed { settled, .. } => settled,
        }
    }

    /// Whether the broker acked.
    pub fn is_ack(&self) -> bool {
        matches!(self, Confirmation::Ack { .. })
    }

    /// Whether the broker nacked.
    pub fn is_nack(&self) -> bool {
        matches!(self, Confirmation::Nack { .. })
    }

    /// Whether the channel ended before the broker answered.
    pub fn is_failed(&self) -> bool {
        matches!(self, Confirmation::Failed { .. })
    }
}
