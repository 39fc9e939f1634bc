//! Errors of the wire codec: what was wrong with a frame, a method, a field
//! table or a value to encode, and the AMQP reply code a peer must close with.

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
    #[error("unknown frame type {frame_type} on channel {channel}")]
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
