//! AMQP 0-9-1 as RabbitMQ speaks it: every class and method as a typed
//! struct with pika's field names and defaults, the [`Method`] enum over all
//! of them, [`BasicProperties`], and the protocol's constants.
//!
//! The table below is the one description every method is generated from;
//! a unit test checks it against RabbitMQ's extended spec XML
//! (`amqp0-9-1.extended.xml`). Methods the XML lacks — `access.request`,
//! `connection.blocked`/`unblocked` and `connection.update-secret` — are the
//! marked supplement at the end of their classes.
//!
//! ```
//! use pika::spec::{basic, Method, MethodDef};
//! let publish = basic::Publish { routing_key: "jobs".into(), ..Default::default() };
//! assert_eq!(basic::Publish::NAME, "Basic.Publish");
//! assert!(basic::Publish::HAS_CONTENT);
//! assert_eq!(Method::from(publish).id().class_id, 60);
//! ```

#[macro_use]
mod macros;
mod properties;

use std::fmt;

use crate::error::CodecError;
use crate::wire::{Reader, Writer};

pub use properties::{BasicProperties, DeliveryMode, PropertiesError};

/// AMQP protocol version this crate speaks: 0-9-1.
pub const PROTOCOL_VERSION: (u8, u8, u8) = (0, 9, 1);

/// Default AMQP port without TLS.
pub const PORT: u16 = 5672;

/// Default AMQP port with TLS.
pub const TLS_PORT: u16 = 5671;

/// Reply code 200: a normal close.
pub const REPLY_SUCCESS: u16 = 200;
/// Reply code 311: content too large (channel).
pub const CONTENT_TOO_LARGE: u16 = 311;
/// Reply code 312: no route for a mandatory message.
pub const NO_ROUTE: u16 = 312;
/// Reply code 313: no consumers for an immediate message.
pub const NO_CONSUMERS: u16 = 313;
/// Reply code 320: the broker forced the connection closed.
pub const CONNECTION_FORCED: u16 = 320;
/// Reply code 402: invalid virtual host path.
pub const INVALID_PATH: u16 = 402;
/// Reply code 403: access refused (channel).
pub const ACCESS_REFUSED: u16 = 403;
/// Reply code 404: not found (channel).
pub const NOT_FOUND: u16 = 404;
/// Reply code 405: resource locked, e.g. another connection's exclusive queue.
pub const RESOURCE_LOCKED: u16 = 405;
/// Reply code 406: precondition failed (channel).
pub const PRECONDITION_FAILED: u16 = 406;
pub use crate::error::{COMMAND_INVALID, FRAME_ERROR, SYNTAX_ERROR, UNEXPECTED_FRAME};
/// Reply code 504: channel error (connection).
pub const CHANNEL_ERROR: u16 = 504;
/// Reply code 506: the broker lacks resources (connection).
pub const RESOURCE_ERROR: u16 = 506;
/// Reply code 530: not allowed, e.g. an unknown virtual host (connection).
pub const NOT_ALLOWED: u16 = 530;
/// Reply code 540: not implemented (connection).
pub const NOT_IMPLEMENTED: u16 = 540;
/// Reply code 541: internal error (connection).
pub const INTERNAL_ERROR: u16 = 541;

/// A method's class id and method id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodId {
    /// The class id, e.g. 60 for Basic.
    pub class_id: u16,
    /// The method id within its class, e.g. 40 for Basic.Publish.
    pub method_id: u16,
}

impl MethodId {
    /// A method id from its two parts.
    pub const fn new(class_id: u16, method_id: u16) -> Self {
        MethodId {
            class_id,
            method_id,
        }
    }

    /// pika's `INDEX`: class id in the high 16 bits, method id in the low.
    pub const fn index(self) -> u32 {
        ((self.class_id as u32) << 16) | self.method_id as u32
    }
}

impl fmt::Display for MethodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.class_id, self.method_id)
    }
}

/// Facts every method struct knows about itself.
pub trait MethodDef: Sized + Into<Method> {
    /// Class and method ids.
    const ID: MethodId;
    /// pika's name, e.g. `Queue.Declare`.
    const NAME: &'static str;
    /// Whether the sender waits for one of [`MethodDef::REPLIES`].
    const SYNCHRONOUS: bool;
    /// Whether content (a header and body frames) follows.
    const HAS_CONTENT: bool;
    /// The methods that answer this one.
    const REPLIES: &'static [MethodId];
}

amqp_methods! {
    /// Connection: negotiation, authentication, tuning, open and close.
    class connection = 10 {
        /// The broker proposes the protocol, authentication and locale.
        ConnectionStart => Start = 10, "Connection.Start", synchronous: true, content: false, replies: [StartOk] {
            version_major: u8 = 0,
            version_minor: u8 = 9,
            server_properties: FieldTable,
            mechanisms: LongString = LongString::from("PLAIN"),
            locales: LongString = LongString::from("en_US"),
        }
        /// The client picks a mechanism and locale and answers the challenge.
        ConnectionStartOk => StartOk = 11, "Connection.StartOk", synchronous: false, content: false, replies: [] {
            client_properties: FieldTable,
            mechanism: String = "PLAIN".into(),
            response: LongString; secret,
            locale: String = "en_US".into(),
        }
        /// A further SASL challenge.
        ConnectionSecure => Secure = 20, "Connection.Secure", synchronous: true, content: false, replies: [SecureOk] {
            challenge: LongString,
        }
        /// The answer to a SASL challenge.
        ConnectionSecureOk => SecureOk = 21, "Connection.SecureOk", synchronous: false, content: false, replies: [] {
            response: LongString; secret,
        }
        /// The broker proposes channel_max, frame_max and heartbeat.
        ConnectionTune => Tune = 30, "Connection.Tune", synchronous: true, content: false, replies: [TuneOk] {
            channel_max: u16 = 0,
            frame_max: u32 = 0,
            heartbeat: u16 = 0,
        }
        /// The client's choice of channel_max, frame_max and heartbeat.
        ConnectionTuneOk => TuneOk = 31, "Connection.TuneOk", synchronous: false, content: false, replies: [] {
            channel_max: u16 = 0,
            frame_max: u32 = 0,
            heartbeat: u16 = 0,
        }
        /// Opens a virtual host.
        ConnectionOpen => Open = 40, "Connection.Open", synchronous: true, content: false, replies: [OpenOk] {
            virtual_host: String = "/".into(),
            capabilities: String,
            insist: bool = false,
        }
        /// The virtual host is open.
        ConnectionOpenOk => OpenOk = 41, "Connection.OpenOk", synchronous: false, content: false, replies: [] {
            known_hosts: String,
        }
        /// Either peer closes the connection, saying why.
        ConnectionClose => Close = 50, "Connection.Close", synchronous: true, content: false, replies: [CloseOk] {
            reply_code: u16 = 0,
            reply_text: String,
            class_id: u16 = 0,
            method_id: u16 = 0,
        }
        /// Confirms a close.
        ConnectionCloseOk => CloseOk = 51, "Connection.CloseOk", synchronous: false, content: false, replies: [] {}
        /// RabbitMQ extension (supplement): the broker blocked publishing on
        /// this connection.
        ConnectionBlocked => Blocked = 60, "Connection.Blocked", synchronous: false, content: false, replies: [] {
            reason: String,
        }
        /// RabbitMQ extension (supplement): the block is lifted.
        ConnectionUnblocked => Unblocked = 61, "Connection.Unblocked", synchronous: false, content: false, replies: [] {}
        /// RabbitMQ extension (supplement): replaces the credential (e.g. an
        /// OAuth token) of an open connection.
        ConnectionUpdateSecret => UpdateSecret = 70, "Connection.UpdateSecret", synchronous: true, content: false, replies: [UpdateSecretOk] {
            new_secret: LongString; secret,
            reason: String,
        }
        /// RabbitMQ extension (supplement): the new secret is accepted.
        ConnectionUpdateSecretOk => UpdateSecretOk = 71, "Connection.UpdateSecretOk", synchronous: false, content: false, replies: [] {}
    }

    /// Channel: open, flow control and close of one channel.
    class channel = 20 {
        /// Opens a channel.
        ChannelOpen => Open = 10, "Channel.Open", synchronous: true, content: false, replies: [OpenOk] {
            out_of_band: String,
        }
        /// The channel is open.
        ChannelOpenOk => OpenOk = 11, "Channel.OpenOk", synchronous: false, content: false, replies: [] {
            channel_id: LongString,
        }
        /// Asks the peer to pause or restart sending content.
        ChannelFlow => Flow = 20, "Channel.Flow", synchronous: true, content: false, replies: [FlowOk] {
            active: bool,
        }
        /// Confirms a flow request.
        ChannelFlowOk => FlowOk = 21, "Channel.FlowOk", synchronous: false, content: false, replies: [] {
            active: bool,
        }
        /// Either peer closes the channel, saying why.
        ChannelClose => Close = 40, "Channel.Close", synchronous: true, content: false, replies: [CloseOk] {
            reply_code: u16 = 0,
            reply_text: String,
            class_id: u16 = 0,
            method_id: u16 = 0,
        }
        /// Confirms a channel close.
        ChannelCloseOk => CloseOk = 41, "Channel.CloseOk", synchronous: false, content: false, replies: [] {}
    }

    /// Access: a deprecated ticket mechanism, kept for completeness
    /// (supplement: the extended XML lacks it; RabbitMQ answers it as a
    /// no-op).
    class access = 30 {
        /// Asks for an access ticket.
        AccessRequest => Request = 10, "Access.Request", synchronous: true, content: false, replies: [RequestOk] {
            realm: String = "/data".into(),
            exclusive: bool = false,
            passive: bool = true,
            active: bool = true,
            write: bool = true,
            read: bool = true,
        }
        /// Grants an access ticket.
        AccessRequestOk => RequestOk = 11, "Access.RequestOk", synchronous: false, content: false, replies: [] {
            ticket: u16 = 1,
        }
    }

    /// Exchange: declare, delete, bind and unbind exchanges.
    class exchange = 40 {
        /// Declares an exchange (or checks it exists, with `passive`).
        ExchangeDeclare => Declare = 10, "Exchange.Declare", synchronous: true, content: false, replies: [DeclareOk] {
            ticket: u16 = 0,
            exchange: String,
            exchange_type: String = "direct".into(),
            passive: bool = false,
            durable: bool = false,
            auto_delete: bool = false,
            internal: bool = false,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The exchange is declared.
        ExchangeDeclareOk => DeclareOk = 11, "Exchange.DeclareOk", synchronous: false, content: false, replies: [] {}
        /// Deletes an exchange.
        ExchangeDelete => Delete = 20, "Exchange.Delete", synchronous: true, content: false, replies: [DeleteOk] {
            ticket: u16 = 0,
            exchange: String,
            if_unused: bool = false,
            nowait: bool = false,
        }
        /// The exchange is deleted.
        ExchangeDeleteOk => DeleteOk = 21, "Exchange.DeleteOk", synchronous: false, content: false, replies: [] {}
        /// Binds an exchange to an exchange (RabbitMQ extension).
        ExchangeBind => Bind = 30, "Exchange.Bind", synchronous: true, content: false, replies: [BindOk] {
            ticket: u16 = 0,
            destination: String,
            source: String,
            routing_key: String,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The binding exists.
        ExchangeBindOk => BindOk = 31, "Exchange.BindOk", synchronous: false, content: false, replies: [] {}
        /// Removes an exchange-to-exchange binding.
        ExchangeUnbind => Unbind = 40, "Exchange.Unbind", synchronous: true, content: false, replies: [UnbindOk] {
            ticket: u16 = 0,
            destination: String,
            source: String,
            routing_key: String,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The binding is removed (method id 51, as RabbitMQ defines it).
        ExchangeUnbindOk => UnbindOk = 51, "Exchange.UnbindOk", synchronous: false, content: false, replies: [] {}
    }

    /// Queue: declare, bind, unbind, purge and delete queues.
    class queue = 50 {
        /// Declares a queue; an empty name asks the broker to name it.
        QueueDeclare => Declare = 10, "Queue.Declare", synchronous: true, content: false, replies: [DeclareOk] {
            ticket: u16 = 0,
            queue: String,
            passive: bool = false,
            durable: bool = false,
            exclusive: bool = false,
            auto_delete: bool = false,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The queue's name and counts.
        QueueDeclareOk => DeclareOk = 11, "Queue.DeclareOk", synchronous: false, content: false, replies: [] {
            queue: String,
            message_count: u32 = 0,
            consumer_count: u32 = 0,
        }
        /// Binds a queue to an exchange.
        QueueBind => Bind = 20, "Queue.Bind", synchronous: true, content: false, replies: [BindOk] {
            ticket: u16 = 0,
            queue: String,
            exchange: String,
            routing_key: String,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The binding exists.
        QueueBindOk => BindOk = 21, "Queue.BindOk", synchronous: false, content: false, replies: [] {}
        /// Removes all ready messages from a queue.
        QueuePurge => Purge = 30, "Queue.Purge", synchronous: true, content: false, replies: [PurgeOk] {
            ticket: u16 = 0,
            queue: String,
            nowait: bool = false,
        }
        /// How many messages were purged.
        QueuePurgeOk => PurgeOk = 31, "Queue.PurgeOk", synchronous: false, content: false, replies: [] {
            message_count: u32 = 0,
        }
        /// Deletes a queue.
        QueueDelete => Delete = 40, "Queue.Delete", synchronous: true, content: false, replies: [DeleteOk] {
            ticket: u16 = 0,
            queue: String,
            if_unused: bool = false,
            if_empty: bool = false,
            nowait: bool = false,
        }
        /// How many messages were deleted with the queue.
        QueueDeleteOk => DeleteOk = 41, "Queue.DeleteOk", synchronous: false, content: false, replies: [] {
            message_count: u32 = 0,
        }
        /// Removes a queue binding.
        QueueUnbind => Unbind = 50, "Queue.Unbind", synchronous: true, content: false, replies: [UnbindOk] {
            ticket: u16 = 0,
            queue: String,
            exchange: String,
            routing_key: String,
            arguments: FieldTable,
        }
        /// The binding is removed.
        QueueUnbindOk => UnbindOk = 51, "Queue.UnbindOk", synchronous: false, content: false, replies: [] {}
    }

    /// Basic: publishing, consuming, getting and acknowledging messages.
    class basic = 60 {
        /// Sets the prefetch window.
        BasicQos => Qos = 10, "Basic.Qos", synchronous: true, content: false, replies: [QosOk] {
            prefetch_size: u32 = 0,
            prefetch_count: u16 = 0,
            global_qos: bool = false,
        }
        /// The prefetch window is set.
        BasicQosOk => QosOk = 11, "Basic.QosOk", synchronous: false, content: false, replies: [] {}
        /// Starts a consumer.
        BasicConsume => Consume = 20, "Basic.Consume", synchronous: true, content: false, replies: [ConsumeOk] {
            ticket: u16 = 0,
            queue: String,
            consumer_tag: String,
            no_local: bool = false,
            no_ack: bool = false,
            exclusive: bool = false,
            nowait: bool = false,
            arguments: FieldTable,
        }
        /// The consumer is started, under this tag.
        BasicConsumeOk => ConsumeOk = 21, "Basic.ConsumeOk", synchronous: false, content: false, replies: [] {
            consumer_tag: String,
        }
        /// Cancels a consumer (sent by the broker too, when its queue goes).
        BasicCancel => Cancel = 30, "Basic.Cancel", synchronous: true, content: false, replies: [CancelOk] {
            consumer_tag: String,
            nowait: bool = false,
        }
        /// The consumer is cancelled.
        BasicCancelOk => CancelOk = 31, "Basic.CancelOk", synchronous: false, content: false, replies: [] {
            consumer_tag: String,
        }
        /// Publishes a message; content follows.
        BasicPublish => Publish = 40, "Basic.Publish", synchronous: false, content: true, replies: [] {
            ticket: u16 = 0,
            exchange: String,
            routing_key: String,
            mandatory: bool = false,
            immediate: bool = false,
        }
        /// Returns an unroutable mandatory message; content follows.
        BasicReturn => Return = 50, "Basic.Return", synchronous: false, content: true, replies: [] {
            reply_code: u16 = 0,
            reply_text: String,
            exchange: String,
            routing_key: String,
        }
        /// Delivers a message to a consumer; content follows.
        BasicDeliver => Deliver = 60, "Basic.Deliver", synchronous: false, content: true, replies: [] {
            consumer_tag: String,
            delivery_tag: u64 = 0,
            redelivered: bool = false,
            exchange: String,
            routing_key: String,
        }
        /// Fetches one message.
        BasicGet => Get = 70, "Basic.Get", synchronous: true, content: false, replies: [GetOk, GetEmpty] {
            ticket: u16 = 0,
            queue: String,
            no_ack: bool = false,
        }
        /// The fetched message; content follows.
        BasicGetOk => GetOk = 71, "Basic.GetOk", synchronous: false, content: true, replies: [] {
            delivery_tag: u64 = 0,
            redelivered: bool = false,
            exchange: String,
            routing_key: String,
            message_count: u32 = 0,
        }
        /// The queue had no message to get.
        BasicGetEmpty => GetEmpty = 72, "Basic.GetEmpty", synchronous: false, content: false, replies: [] {
            cluster_id: String,
        }
        /// Acknowledges one or more messages (sent by the broker too, in
        /// confirm mode).
        BasicAck => Ack = 80, "Basic.Ack", synchronous: false, content: false, replies: [] {
            delivery_tag: u64 = 0,
            multiple: bool = false,
        }
        /// Rejects one message.
        BasicReject => Reject = 90, "Basic.Reject", synchronous: false, content: false, replies: [] {
            delivery_tag: u64 = 0,
            requeue: bool = true,
        }
        /// Asks for unacknowledged messages again, without a reply
        /// (deprecated).
        BasicRecoverAsync => RecoverAsync = 100, "Basic.RecoverAsync", synchronous: false, content: false, replies: [] {
            requeue: bool = false,
        }
        /// Asks for unacknowledged messages again.
        BasicRecover => Recover = 110, "Basic.Recover", synchronous: true, content: false, replies: [RecoverOk] {
            requeue: bool = false,
        }
        /// The recover is done.
        BasicRecoverOk => RecoverOk = 111, "Basic.RecoverOk", synchronous: false, content: false, replies: [] {}
        /// Rejects one or more messages (RabbitMQ extension; sent by the
        /// broker too, in confirm mode).
        BasicNack => Nack = 120, "Basic.Nack", synchronous: false, content: false, replies: [] {
            delivery_tag: u64 = 0,
            multiple: bool = false,
            requeue: bool = true,
        }
    }

    /// Confirm: publisher confirms (RabbitMQ extension).
    class confirm = 85 {
        /// Puts the channel in confirm mode.
        ConfirmSelect => Select = 10, "Confirm.Select", synchronous: true, content: false, replies: [SelectOk] {
            nowait: bool = false,
        }
        /// The channel is in confirm mode.
        ConfirmSelectOk => SelectOk = 11, "Confirm.SelectOk", synchronous: false, content: false, replies: [] {}
    }

    /// Tx: standard transactions.
    class tx = 90 {
        /// Puts the channel in transaction mode.
        TxSelect => Select = 10, "Tx.Select", synchronous: true, content: false, replies: [SelectOk] {}
        /// The channel is in transaction mode.
        TxSelectOk => SelectOk = 11, "Tx.SelectOk", synchronous: false, content: false, replies: [] {}
        /// Commits the current transaction.
        TxCommit => Commit = 20, "Tx.Commit", synchronous: true, content: false, replies: [CommitOk] {}
        /// The transaction is committed.
        TxCommitOk => CommitOk = 21, "Tx.CommitOk", synchronous: false, content: false, replies: [] {}
        /// Rolls back the current transaction.
        TxRollback => Rollback = 30, "Tx.Rollback", synchronous: true, content: false, replies: [RollbackOk] {}
        /// The transaction is rolled back.
        TxRollbackOk => RollbackOk = 31, "Tx.RollbackOk", synchronous: false, content: false, replies: [] {}
    }
}

#[cfg(test)]
mod tests;
