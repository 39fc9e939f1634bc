//! What the protocol core tells its face: [`Event`], and the small keys
//! events and commands use — [`RequestId`], [`ChannelKey`], [`ConsumerId`].

use std::fmt;

use crate::error::Error;
use crate::message::{Confirmation, Delivery, GetMessage, ReturnedMessage};
use crate::spec::{Method, basic, connection};

/// Names one accepted request (an RPC with a reply, opening a channel,
/// update-secret): exactly one [`Event::Reply`] carries it.
///
/// Ids come from a counter the face seeds ([`super::Config::first_request_id`]),
/// so they never repeat within one face, even across core instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request #{}", self.0)
    }
}

/// A channel as the application knows it: its number and a generation
/// that changes only when the number is given to a different channel (so
/// a stale handle to a closed channel never reaches its successor).
/// Reopening a channel on a new core instance ([`super::Connection::reopen_channel`])
/// keeps its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The channel number, 1 to the negotiated channel_max.
    pub number: u16,
    /// Which use of that number this is.
    pub generation: u32,
}

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "channel {}", self.number)
    }
}

/// A consumer, unique on its connection: deliveries name it, so a face can
/// find the consumer's callback without hashing the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerId(pub u64);

/// The answer a request got.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The broker's reply method (Queue.DeclareOk, Channel.OpenOk, …).
    Method(Method),
    /// Basic.Get's answer: the message, or `None` for Basic.GetEmpty.
    Get(Option<Box<GetMessage>>),
}

/// Something the face must act on, in the order it happened. Drained with
/// [`super::Connection::poll_event`].
#[derive(Debug)]
pub enum Event {
    /// The handshake finished: the connection is open.
    Opened,
    /// The broker blocked the connection (Connection.Blocked).
    Blocked(connection::Blocked),
    /// The broker unblocked the connection.
    Unblocked(connection::Unblocked),
    /// A request's one terminal event: its reply, or the error that ended
    /// it (the channel or the connection closed first).
    Reply {
        /// The request.
        request: RequestId,
        /// Its channel (`None` for connection-level requests).
        channel: Option<ChannelKey>,
        /// The method the request sent, as given to the command (a layer
        /// above can record what was declared).
        method: Method,
        /// The reply, or why there is none.
        result: Result<Reply, Error>,
    },
    /// A message for a consumer.
    Delivery {
        /// The channel.
        channel: ChannelKey,
        /// The consumer.
        consumer: ConsumerId,
        /// The message.
        delivery: Delivery,
    },
    /// An auto-acked message for a consumer being cancelled (it crossed
    /// the Basic.Cancel on the wire). The broker has let go of it; the face
    /// decides what becomes of it.
    DeliveryAfterCancel {
        /// The channel.
        channel: ChannelKey,
        /// The consumer, cancelled.
        consumer: ConsumerId,
        /// The message.
        delivery: Delivery,
    },
    /// The broker returned a mandatory message it could not route.
    Returned {
        /// The channel.
        channel: ChannelKey,
        /// The message.
        message: ReturnedMessage,
        /// In confirm mode, the delivery tag of the publish it returns (a
        /// Basic.Return carries none): the oldest unconfirmed mandatory
        /// publish with the same exchange and routing key not yet returned
        /// — RabbitMQ handles a channel's publishes in order and returns a
        /// message before it acks it. `None` outside confirm mode (or for
        /// a Return that matches no such publish).
        delivery_tag: Option<u64>,
    },
    /// Publisher confirms settled one or more delivery tags.
    Confirm {
        /// The channel.
        channel: ChannelKey,
        /// What happened.
        confirmation: Confirmation,
    },
    /// A consumer is gone: its CancelOk arrived (a cancel of the
    /// application's or of a channel close), it was cancelled with
    /// `nowait`, or the broker cancelled it (`by_broker`). Consumers that
    /// go with their channel have no event of their own.
    ConsumerEnded {
        /// The channel.
        channel: ChannelKey,
        /// The consumer.
        consumer: ConsumerId,
        /// The broker's Basic.Cancel when the broker cancelled it.
        by_broker: Option<basic::Cancel>,
    },
    /// The broker asked to pause or resume deliveries (Channel.Flow); the
    /// FlowOk has been queued.
    Flow {
        /// The channel.
        channel: ChannelKey,
        /// Whether deliveries may flow.
        active: bool,
    },
    /// A method the face asked to see ([`super::Connection::watch_methods`])
    /// arrived, before its normal handling.
    Watched {
        /// The channel.
        channel: ChannelKey,
        /// The method.
        method: Method,
    },
    /// The channel closed: after its requests' replies and confirm
    /// failures, and before the connection's terminal event. Its number
    /// is free again.
    ChannelClosed {
        /// The channel.
        channel: ChannelKey,
        /// Why.
        error: Error,
    },
    /// The connection ended: the last event. `opened` says whether
    /// [`Event::Opened`] came before it (an open error when not).
    Closed {
        /// Why.
        error: Error,
        /// Whether the connection had opened.
        opened: bool,
    },
}
