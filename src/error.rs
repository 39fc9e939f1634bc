//! The client's errors: [`enum@Error`], named after pika's exceptions and sorted
//! into pika's connection and channel families, and [`CodecError`], what
//! was wrong with a frame, a method, a field table or a value to encode,
//! with the AMQP reply code a peer must close with.

use thiserror::Error;

/// AMQP reply code 501: the peer sent a malformed frame.
pub const FRAME_ERROR: u16 = 501;
/// AMQP reply code 502: a frame's payload could not be decoded.
pub const SYNTAX_ERROR: u16 = 502;
/// AMQP reply code 503: a valid frame carried something that is not allowed.
pub const COMMAND_INVALID: u16 = 503;
/// AMQP reply code 505: a frame arrived that was not expected in this state.
pub const UNEXPECTED_FRAME: u16 = 505;

/// A failure to decode bytes from the wire or to encode a value for it.
///
/// Every variant names what was wrong; [`CodecError::reply_code`] gives the
/// AMQP reply code the connection must be closed with when the error came
/// from the peer.
///
/// ```
/// use pika::frame::{parse_frame, FRAME_MIN_SIZE};
///
/// // A method frame on channel 0 whose frame-end octet is 0x00, not 0xCE.
/// let bytes = [1, 0, 0, 0, 0, 0, 4, 0, 10, 0, 51, 0x00];
/// let err = parse_frame(&bytes, FRAME_MIN_SIZE).unwrap_err();
/// assert_eq!(err.reply_code(), 501);
/// assert!(err.to_string().contains("frame-end"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A field, table or payload claims more bytes than its frame holds.
    #[error("truncated {what}: needs {needed} bytes but only {available} remain")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes it needed.
        needed: usize,
        /// How many bytes were left.
        available: usize,
    },
    /// A frame's declared size is over the negotiated frame_max.
    #[error("frame of {size} bytes exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// The frame's full size (7-byte header + payload + frame-end octet).
        size: u64,
        /// The negotiated limit.
        frame_max: u32,
    },
    /// A frame did not end with the frame-end octet 0xCE.
    #[error(
        "bad frame-end octet 0x{found:02X} (expected 0xCE) after a type {frame_type} frame on channel {channel}"
    )]
    BadFrameEnd {
        /// The octet found where 0xCE belongs.
        found: u8,
        /// The frame's type octet.
        frame_type: u8,
        /// The frame's channel.
        channel: u16,
    },
    /// A frame type other than method (1), header (2), body (3) or heartbeat (8).
    #[error(
        "unknown frame type {frame_type} on channel {channel}{}",
        unknown_frame_hint(*.frame_type)
    )]
    UnknownFrameType {
        /// The frame's type octet.
        frame_type: u8,
        /// The frame's channel.
        channel: u16,
    },
    /// A heartbeat frame on a channel other than 0 or with a payload.
    #[error(
        "invalid heartbeat frame: channel {channel}, payload of {size} bytes (must be channel 0, empty)"
    )]
    BadHeartbeat {
        /// The frame's channel.
        channel: u16,
        /// The payload size.
        size: u32,
    },
    /// The peer sent an AMQP protocol header instead of a frame: it speaks
    /// another protocol version (or refuses ours).
    #[error(
        "peer answered with protocol header AMQP {protocol_id}-{major}-{minor}-{revision}, not a frame (we speak 0-9-1)"
    )]
    ProtocolHeader {
        /// The protocol id octet (0 for AMQP 0-9-1; 1 or 3 in other headers).
        protocol_id: u8,
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
        /// Revision.
        revision: u8,
    },
    /// A method frame named a class and method this codec does not know.
    #[error("unknown method: class {class_id}, method {method_id}")]
    UnknownMethod {
        /// The class id.
        class_id: u16,
        /// The method id.
        method_id: u16,
    },
    /// A content header for a class that carries no content.
    #[error("content header for class {class_id}, which has no content properties")]
    UnknownContentClass {
        /// The class id in the header.
        class_id: u16,
    },
    /// Bytes were left over after the last field of a method or header.
    #[error("{count} unexpected trailing bytes after {what}")]
    TrailingBytes {
        /// What had been decoded.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A short string (or a field-table key) was not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// What was being read.
        what: &'static str,
    },
    /// A field table or array held a value of an unknown type tag.
    #[error("unknown field value type {}", describe_tag(*tag))]
    UnknownFieldType {
        /// The type tag octet.
        tag: u8,
    },
    /// Field tables and arrays nested deeper than the decoder allows.
    #[error("field tables nested deeper than {limit} levels")]
    TableTooDeep {
        /// The nesting limit.
        limit: usize,
    },
    /// A content header's property flags named properties this class lacks
    /// (or used the continuation bit, which no Basic property needs).
    #[error("content header property flags 0x{flags:04X} set bits with no property")]
    BadPropertyFlags {
        /// The flags word as received.
        flags: u16,
    },
    /// A content header's weight field was not zero.
    #[error("content header weight is {weight}, must be 0")]
    NonZeroWeight {
        /// The weight received.
        weight: u16,
    },
    /// A value too long for its wire type (a short string over 255 bytes,
    /// a long string or table over 4 GiB).
    #[error("{what} is {len} bytes, longer than the {max} its wire type allows")]
    TooLong {
        /// What was being encoded.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame to send would be larger than the negotiated frame_max.
    #[error("{what} frame of {size} bytes would exceed frame_max {frame_max}")]
    EncodedFrameTooLarge {
        /// What kind of frame.
        what: &'static str,
        /// Its encoded size.
        size: usize,
        /// The negotiated limit.
        frame_max: u32,
    },
    /// A method that carries no content was given a body to send.
    #[error("{method} carries no content; only Basic.Publish, Return, Deliver and GetOk do")]
    NotContentMethod {
        /// The method's name.
        method: &'static str,
    },
    /// An error inside one field of a method, naming the method and field.
    #[error("{method} field '{field}': {source}")]
    InField {
        /// The method's AMQP name, e.g. `queue.declare`.
        method: &'static str,
        /// The field's name, e.g. `arguments`.
        field: &'static str,
        /// What was wrong.
        source: Box<CodecError>,
    },
}

fn describe_tag(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}' (0x{tag:02X})", tag as char)
    } else {
        format!("0x{tag:02X}")
    }
}

impl CodecError {
    /// The AMQP reply code a connection must be closed with when the peer
    /// sent what caused this error: 501 for frame-level faults, 502 for
    /// payloads that do not decode, 503 for unknown methods.
    pub fn reply_code(&self) -> u16 {
        match self {
            CodecError::FrameTooLarge { .. }
            | CodecError::BadFrameEnd { .. }
            | CodecError::UnknownFrameType { .. }
            | CodecError::BadHeartbeat { .. }
            | CodecError::ProtocolHeader { .. }
            | CodecError::EncodedFrameTooLarge { .. } => FRAME_ERROR,
            CodecError::UnknownMethod { .. }
            | CodecError::UnknownContentClass { .. }
            | CodecError::NotContentMethod { .. } => COMMAND_INVALID,
            CodecError::InField { source, .. } => source.reply_code(),
            CodecError::Truncated { .. }
            | CodecError::TrailingBytes { .. }
            | CodecError::InvalidUtf8 { .. }
            | CodecError::UnknownFieldType { .. }
            | CodecError::TableTooDeep { .. }
            | CodecError::BadPropertyFlags { .. }
            | CodecError::NonZeroWeight { .. }
            | CodecError::TooLong { .. } => SYNTAX_ERROR,
        }
    }

    /// The innermost error, looking through [`CodecError::InField`] wrappers.
    pub fn root(&self) -> &CodecError {
        match self {
            CodecError::InField { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn in_field(self, method: &'static str, field: &'static str) -> CodecError {
        CodecError::InField {
            method,
            field,
            source: Box::new(self),
        }
    }
}

use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong in a connection or a channel, named after
/// pika's exceptions (`pika.exceptions`).
///
/// `Error` is `Clone + Send + Sync + 'static`: one connection loss reaches
/// every pending completion closure, so I/O errors are kept behind an
/// [`Arc`].
///
/// # pika's exceptions
///
/// pika's `except` clauses have one-line equivalents: a family predicate,
/// a variant, or a predicate for pika's intermediate classes.
///
/// | pika | here |
/// | --- | --- |
/// | `AMQPConnectionError` (and every child) | [`Error::is_connection_error`] |
/// | `AMQPChannelError` (and every child) | [`Error::is_channel_error`] |
/// | `ConnectionClosed` | [`Error::is_connection_closed`], with [`Error::reply_code`] / [`Error::reply_text`] |
/// | `ConnectionClosedByBroker` | [`Error::ConnectionClosedByBroker`] |
/// | `ConnectionClosedByClient` | [`Error::ConnectionClosedByClient`] |
/// | `ConnectionOpenAborted` | [`Error::ConnectionOpenAborted`] |
/// | `ConnectionWrongStateError` | [`Error::ConnectionWrongState`] |
/// | `ConnectionBlockedTimeout` | [`Error::ConnectionBlockedTimeout`] |
/// | `AMQPHeartbeatTimeout` | [`Error::AmqpHeartbeatTimeout`] |
/// | `StreamLostError` | [`Error::StreamLost`] |
/// | `IncompatibleProtocolError` | [`Error::IncompatibleProtocol`] |
/// | `AuthenticationError` | [`Error::AuthenticationError`] |
/// | `ProbableAuthenticationError` | [`Error::ProbableAuthenticationError`] |
/// | `ProbableAccessDeniedError` | [`Error::ProbableAccessDeniedError`] |
/// | `AMQPConnectionWorkflowFailed` | [`Error::ConnectionWorkflowFailed`] |
/// | `NoFreeChannels` | [`Error::NoFreeChannels`] |
/// | `ChannelClosed` | [`Error::is_channel_closed`], with [`Error::reply_code`] / [`Error::reply_text`] |
/// | `ChannelClosedByBroker` | [`Error::ChannelClosedByBroker`] |
/// | `ChannelClosedByClient` | [`Error::ChannelClosedByClient`] |
/// | `ChannelWrongStateError` | [`Error::ChannelWrongState`] |
/// | `DuplicateConsumerTag` | [`Error::DuplicateConsumerTag`] |
/// | `ConsumerCancelled` | [`Error::ConsumerCancelled`] |
/// | `DuplicateGetOkCallback` | [`Error::DuplicateGetOkCallback`] |
/// | `UnroutableError` | [`Error::UnroutableError`] |
/// | `NackError` | [`Error::NackError`] |
/// | `ReentrancyError` | [`Error::ReentrancyError`] |
/// | `MethodNotImplemented` | [`Error::is_method_not_implemented`] (RabbitMQ's 540) |
/// | `InvalidChannelNumber` | [`Error::InvalidChannelNumber`] |
/// | `ProtocolSyntaxError`, `InvalidFrameError`, `UnexpectedFrameError` | [`Error::Protocol`], [`Error::UnexpectedFrame`] |
/// | `ShortStringTooLong` | [`Error::Encode`] |
///
/// pika's recovery loop (its docs, usage example 2.3.5) reads:
///
/// ```
/// use pika::Error;
///
/// fn what_next(e: &Error) -> &'static str {
///     match e {
///         Error::ConnectionClosedByBroker { .. } => "recover",
///         e if e.is_channel_error() => "stop",
///         e if e.is_connection_error() => "retry",
///         _ => "stop",
///     }
/// }
/// let e = Error::ConnectionClosedByBroker { reply_code: 320, reply_text: "CONNECTION_FORCED".into() };
/// assert!(e.is_connection_error() && e.is_connection_closed());
/// assert_eq!(e.reply_code(), Some(320));
/// assert_eq!(e.to_string(), "connection closed by broker: (320) CONNECTION_FORCED");
/// assert_eq!(what_next(&e), "recover");
/// let e = Error::ChannelClosedByBroker { reply_code: 404, reply_text: "NOT_FOUND".into() };
/// assert!(e.is_channel_closed());
/// assert_eq!(what_next(&e), "stop");
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    // ---- connection family -------------------------------------------
    /// A TCP connection to one address could not be made (pika's
    /// `AMQPConnectionError`).
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why it failed.
        source: Arc<io::Error>,
    },
    /// A host name did not resolve to any address.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// The TCP connect did not finish within `socket_timeout`.
    #[error("TCP connect to {address} timed out after {timeout:?} (socket_timeout)")]
    SocketTimeout {
        /// The address tried.
        address: String,
        /// The bound.
        timeout: Duration,
    },
    /// TCP connect plus the AMQP handshake did not finish within
    /// `stack_timeout`.
    #[error("connection to {address} not open after {timeout:?} (stack_timeout)")]
    StackTimeout {
        /// The address tried.
        address: String,
        /// The bound.
        timeout: Duration,
    },
    /// Every parameter set, address and attempt failed; the errors in the
    /// order they happened (pika's `AMQPConnectionWorkflowFailed`).
    #[error("all {} connection attempts failed; last: {}", .attempts.len(),
        .attempts.last().map(|e| e.to_string()).unwrap_or_default())]
    ConnectionWorkflowFailed {
        /// Each attempt's error.
        attempts: Arc<Vec<Error>>,
    },
    /// The broker does not speak AMQP 0-9-1, or closed the socket right
    /// after our protocol header.
    #[error("incompatible protocol: {detail}")]
    IncompatibleProtocol {
        /// What the broker did.
        detail: String,
    },
    /// The broker offered no SASL mechanism our credentials support.
    #[error(
        "authentication error: broker offers mechanisms [{offered}], credentials need {wanted}"
    )]
    AuthenticationError {
        /// What the broker offered.
        offered: String,
        /// What the credentials support.
        wanted: &'static str,
    },
    /// The broker refused the login (403 ACCESS_REFUSED during the
    /// handshake, or the socket closed right after StartOk).
    #[error("probable authentication error: ({reply_code}) {reply_text}")]
    ProbableAuthenticationError {
        /// The broker's reply code (403), or 0 when it only closed the socket.
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// The broker refused the virtual host (530 NOT_ALLOWED at
    /// Connection.Open, or the socket closed right after it).
    #[error("probable access denied: ({reply_code}) {reply_text}")]
    ProbableAccessDeniedError {
        /// The broker's reply code (530), or 0 when it only closed the socket.
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// The broker closed the connection with Connection.Close.
    #[error("connection closed by broker: ({reply_code}) {reply_text}")]
    ConnectionClosedByBroker {
        /// The broker's reply code, e.g. 320.
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// The connection was closed by this client's `close()`.
    #[error("connection closed by client: ({reply_code}) {reply_text}")]
    ConnectionClosedByClient {
        /// The code given to `close()`.
        reply_code: u16,
        /// The text given to `close()`.
        reply_text: String,
    },
    /// `close()` was called before the connection finished opening.
    #[error("connection open aborted by close()")]
    ConnectionOpenAborted,
    /// The call is not valid in the connection's current state.
    #[error("connection in wrong state: {detail}")]
    ConnectionWrongState {
        /// The state and what was attempted.
        detail: String,
    },
    /// Nothing was received from the broker for twice the heartbeat timeout.
    #[error("no data from the broker for {silence:?} (heartbeat timeout {timeout:?})")]
    AmqpHeartbeatTimeout {
        /// The negotiated heartbeat timeout.
        timeout: Duration,
        /// How long the broker was silent.
        silence: Duration,
    },
    /// The broker kept the connection blocked longer than
    /// `blocked_connection_timeout`.
    #[error("connection blocked by the broker for longer than {timeout:?}")]
    ConnectionBlockedTimeout {
        /// The bound.
        timeout: Duration,
    },
    /// The socket failed or reached end of file unexpectedly.
    #[error("stream lost: {detail}")]
    StreamLost {
        /// What happened.
        detail: String,
        /// The I/O error, when there was one.
        source: Option<Arc<io::Error>>,
    },
    /// TLS failed: a certificate the client refused (unknown CA, expired,
    /// another name), a client certificate the broker refused or did not
    /// get, a peer that does not speak TLS, or TLS settings that cannot be
    /// loaded.
    #[error("TLS error: {reason}")]
    Tls {
        /// What went wrong.
        reason: String,
    },
    /// The broker sent bytes that are not valid AMQP (pika's
    /// `InvalidFrameError` / `ProtocolSyntaxError`); the connection is
    /// closed with [`CodecError::reply_code`].
    #[error("protocol error from the broker: {0}")]
    Protocol(CodecError),
    /// The broker sent a valid frame that is not allowed where it came.
    #[error("unexpected frame (505): {detail}")]
    UnexpectedFrame {
        /// What arrived, and where.
        detail: String,
    },
    /// All channel numbers up to the negotiated channel_max are in use.
    #[error("no free channels: all {channel_max} channel numbers are in use")]
    NoFreeChannels {
        /// The negotiated limit.
        channel_max: u16,
    },
    /// A requested channel number is 0, above channel_max, or in use.
    #[error("invalid channel number {number}: {reason}")]
    InvalidChannelNumber {
        /// The number asked for.
        number: u16,
        /// Why it cannot be used.
        reason: &'static str,
    },

    // ---- channel family ----------------------------------------------
    /// The broker closed the channel with Channel.Close.
    #[error("channel closed by broker: ({reply_code}) {reply_text}")]
    ChannelClosedByBroker {
        /// The broker's reply code, e.g. 404.
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// The channel was closed by this client.
    #[error("channel closed by client: ({reply_code}) {reply_text}")]
    ChannelClosedByClient {
        /// The code given to `close()`.
        reply_code: u16,
        /// The text given to `close()`.
        reply_text: String,
    },
    /// The call is not valid in the channel's current state.
    #[error("channel in wrong state: {detail}")]
    ChannelWrongState {
        /// The state and what was attempted.
        detail: String,
    },
    /// A consumer with this tag already exists on the channel.
    #[error("duplicate consumer tag {tag:?}")]
    DuplicateConsumerTag {
        /// The tag.
        tag: String,
    },
    /// A Basic.Get is already waiting for its reply on this channel.
    #[error("a basic_get is already in progress on this channel")]
    DuplicateGetOkCallback,
    /// The broker cancelled the consumer (e.g. its queue was deleted).
    #[error("consumer {tag:?} cancelled by the broker")]
    ConsumerCancelled {
        /// The consumer's tag.
        tag: String,
    },
    /// A mandatory message published in confirm mode could not be routed:
    /// the broker returned it (Basic.Return) before confirming it
    /// (pika's `UnroutableError`, from the blocking channel's publish).
    #[error("{} message(s) returned by the broker as unroutable", .messages.len())]
    UnroutableError {
        /// The returned messages.
        messages: std::sync::Arc<Vec<crate::message::ReturnedMessage>>,
    },
    /// The broker nacked a message published in confirm mode (pika's
    /// `NackError`, from the blocking channel's publish).
    #[error("the broker nacked delivery tag(s) {delivery_tags:?}")]
    NackError {
        /// The nacked delivery tags.
        delivery_tags: Vec<u64>,
    },
    /// A blocking call that may not be made from where it was made, e.g.
    /// `start_consuming` from inside a consumer callback (pika's
    /// `ReentrancyError`).
    #[error("reentrancy error: {detail}")]
    ReentrancyError {
        /// What was called, and from where.
        detail: String,
    },

    // ---- caller errors -----------------------------------------------
    /// A parameter value is out of range or malformed; names the parameter.
    #[error("invalid {name}: {reason}")]
    InvalidParameter {
        /// The parameter's name, e.g. `frame_max`.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A URL could not be parsed into connection parameters.
    #[error("invalid AMQP URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it (passwords redacted).
        reason: String,
    },
    /// A value given to a call could not be encoded (e.g. a 300-byte queue
    /// name), or a frame would exceed frame_max.
    #[error("cannot encode: {0}")]
    Encode(CodecError),
    /// The event loop failed (e.g. the poller could not register a socket).
    #[error("I/O loop error: {0}")]
    IoLoop(Arc<io::Error>),
}

impl Error {
    /// Whether this is one of pika's connection errors (the connection is,
    /// or was never, open).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Resolve { .. }
                | Error::SocketTimeout { .. }
                | Error::StackTimeout { .. }
                | Error::ConnectionWorkflowFailed { .. }
                | Error::IncompatibleProtocol { .. }
                | Error::AuthenticationError { .. }
                | Error::ProbableAuthenticationError { .. }
                | Error::ProbableAccessDeniedError { .. }
                | Error::ConnectionClosedByBroker { .. }
                | Error::ConnectionClosedByClient { .. }
                | Error::ConnectionOpenAborted
                | Error::ConnectionWrongState { .. }
                | Error::AmqpHeartbeatTimeout { .. }
                | Error::ConnectionBlockedTimeout { .. }
                | Error::StreamLost { .. }
                | Error::Tls { .. }
                | Error::Protocol(_)
                | Error::UnexpectedFrame { .. }
                | Error::NoFreeChannels { .. }
                | Error::InvalidChannelNumber { .. }
        )
    }

    /// Whether this is one of pika's channel errors.
    pub fn is_channel_error(&self) -> bool {
        matches!(
            self,
            Error::ChannelClosedByBroker { .. }
                | Error::ChannelClosedByClient { .. }
                | Error::ChannelWrongState { .. }
                | Error::DuplicateConsumerTag { .. }
                | Error::DuplicateGetOkCallback
                | Error::ConsumerCancelled { .. }
                | Error::UnroutableError { .. }
                | Error::NackError { .. }
        )
    }

    /// pika's `ConnectionClosed`: closed by the broker or by this client
    /// (with a reply code and text).
    pub fn is_connection_closed(&self) -> bool {
        matches!(
            self,
            Error::ConnectionClosedByBroker { .. } | Error::ConnectionClosedByClient { .. }
        )
    }

    /// pika's `ChannelClosed`: closed by the broker or by this client
    /// (with a reply code and text).
    pub fn is_channel_closed(&self) -> bool {
        matches!(
            self,
            Error::ChannelClosedByBroker { .. } | Error::ChannelClosedByClient { .. }
        )
    }

    /// pika's `MethodNotImplemented`: the broker closed with 540
    /// NOT_IMPLEMENTED (RabbitMQ does for `flow(false)`,
    /// `basic_recover(requeue=false)` and a non-zero `prefetch_size`).
    pub fn is_method_not_implemented(&self) -> bool {
        self.reply_code() == Some(crate::spec::NOT_IMPLEMENTED)
            && (self.is_connection_closed() || self.is_channel_closed())
    }

    /// The AMQP reply code the error carries, when it has one.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Error::ProbableAuthenticationError { reply_code, .. }
            | Error::ProbableAccessDeniedError { reply_code, .. }
            | Error::ConnectionClosedByBroker { reply_code, .. }
            | Error::ConnectionClosedByClient { reply_code, .. }
            | Error::ChannelClosedByBroker { reply_code, .. }
            | Error::ChannelClosedByClient { reply_code, .. } => Some(*reply_code),
            Error::Protocol(e) => Some(e.reply_code()),
            Error::UnexpectedFrame { .. } => Some(UNEXPECTED_FRAME),
            _ => None,
        }
    }

    /// The broker's or the closer's text, when the error carries one.
    pub fn reply_text(&self) -> Option<&str> {
        match self {
            Error::ProbableAuthenticationError { reply_text, .. }
            | Error::ProbableAccessDeniedError { reply_text, .. }
            | Error::ConnectionClosedByBroker { reply_text, .. }
            | Error::ConnectionClosedByClient { reply_text, .. }
            | Error::ChannelClosedByBroker { reply_text, .. }
            | Error::ChannelClosedByClient { reply_text, .. } => Some(reply_text),
            _ => None,
        }
    }

    pub(crate) fn stream_lost(detail: impl Into<String>, source: Option<io::Error>) -> Error {
        Error::StreamLost {
            detail: detail.into(),
            source: source.map(Arc::new),
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}

impl From<CodecError> for Error {
    /// A codec error from the caller's values ([`Error::Encode`]); decode
    /// errors from the wire are mapped to [`Error::Protocol`] where they
    /// happen.
    fn from(e: CodecError) -> Self {
        Error::Encode(e)
    }
}

/// What an unknown frame type suggests about the peer: a TLS record
/// (content types 20–23) or text such as an HTTP answer.
fn unknown_frame_hint(frame_type: u8) -> &'static str {
    match frame_type {
        0x14..=0x17 => " (the peer answered with TLS: is this a TLS port? use amqps://)",
        b'A'..=b'Z' | b'a'..=b'z' => " (the peer answered with text: is this an AMQP port?)",
        _ => "",
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    fn assert_traits<T: Clone + Send + Sync + 'static + std::error::Error>() {}

    #[test]
    fn error_is_clone_send_sync_static() {
        assert_traits::<Error>();
        let e = Error::stream_lost(
            "EOF",
            Some(io::Error::new(io::ErrorKind::ConnectionReset, "reset")),
        );
        let copy = e.clone();
        assert_eq!(copy.to_string(), "stream lost: EOF");
        assert!(copy.is_connection_error() && !copy.is_channel_error());
    }

    #[test]
    fn families_and_reply_codes() {
        let ch = Error::ChannelClosedByBroker {
            reply_code: 404,
            reply_text: "NOT_FOUND - no queue 'x'".into(),
        };
        assert!(ch.is_channel_error() && !ch.is_connection_error());
        assert_eq!(ch.reply_code(), Some(404));
        assert_eq!(ch.reply_text(), Some("NOT_FOUND - no queue 'x'"));
        let bad = Error::Protocol(CodecError::UnknownFrameType {
            frame_type: 9,
            channel: 0,
        });
        assert_eq!(bad.reply_code(), Some(FRAME_ERROR));
        let p = Error::invalid("frame_max", "must be at least 4096, got 100");
        assert_eq!(
            p.to_string(),
            "invalid frame_max: must be at least 4096, got 100"
        );
        assert!(!p.is_connection_error() && !p.is_channel_error());
    }
}
