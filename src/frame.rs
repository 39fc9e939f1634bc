//! Frames: the protocol header, method / content-header / body / heartbeat
//! frames, an incremental parser over a byte buffer, and encoders that
//! append frames to an outbound buffer.
//!
//! ```
//! use pika::frame::{encode_method, parse_frame, Frame, FRAME_MIN_SIZE};
//! use pika::spec::{basic, Method};
//!
//! let mut out = Vec::new();
//! encode_method(&mut out, 1, &basic::Ack { delivery_tag: 7, multiple: false }.into(), FRAME_MIN_SIZE).unwrap();
//! // A partial frame is "need more"...
//! assert!(parse_frame(&out[..5], FRAME_MIN_SIZE).unwrap().is_none());
//! // ...and a whole one comes out with the number of bytes it used.
//! let (frame, used) = parse_frame(&out, FRAME_MIN_SIZE).unwrap().unwrap();
//! assert_eq!(used, out.len());
//! match frame {
//!     Frame::Method { channel: 1, method: Method::BasicAck(ack) } => assert_eq!(ack.delivery_tag, 7),
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

use crate::error::CodecError;
use crate::spec::{BasicProperties, Method, PropertiesError};
use crate::wire::{Reader, Writer};

/// Frame type of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// The smallest frame_max a peer may negotiate, and the limit in force
/// before Connection.Tune.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// Bytes a frame adds around its payload: 7 of header, 1 frame-end octet.
pub const FRAME_OVERHEAD: usize = 8;
/// The header a client sends first: `AMQP\x00\x00\x09\x01`.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

const HEADER_SIZE: usize = 7;

/// The payload of a content header frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    /// The class whose method this content follows (60, Basic).
    pub class_id: u16,
    /// Total body size in bytes, over all body frames.
    pub body_size: u64,
    /// The message properties (those that decoded, see
    /// `properties_error`).
    pub properties: BasicProperties,
    /// Set when some properties did not decode (their bytes were skipped).
    /// (Boxed: it is rare, and keeps [`Frame`] small.)
    pub properties_error: Option<Box<PropertiesError>>,
}

/// One decoded frame. A body frame borrows its payload from the buffer it
/// was parsed from, so the body is copied only once, by whoever keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<'a> {
    /// A method frame.
    Method {
        /// The channel (0 for connection methods).
        channel: u16,
        /// The decoded method.
        method: Method,
    },
    /// A content header frame.
    Header {
        /// The channel.
        channel: u16,
        /// The decoded header.
        header: ContentHeader,
    },
    /// A content body frame.
    Body {
        /// The channel.
        channel: u16,
        /// The body bytes in this frame.
        payload: &'a [u8],
    },
    /// A heartbeat (always channel 0).
    Heartbeat,
}

impl Frame<'_> {
    /// The frame's channel number.
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }
}

/// Parses one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame ("need more":
/// read more bytes and call again with the same start), or the frame and
/// the number of bytes it used. `frame_max` is the negotiated maximum frame
/// size including the 8 bytes of framing (0 means no limit, as in
/// Connection.Tune); a frame declaring more is refused as soon as its 7-byte
/// header is in, before its payload is waited for, so a hostile size never
/// makes the caller buffer or allocate more than `frame_max`.
///
/// # Errors
/// A frame over `frame_max`, a wrong frame-end octet, an unknown frame
/// type, a heartbeat off channel 0, an AMQP protocol header in place of a
/// frame, or a payload that does not decode; see
/// [`CodecError::reply_code`] for the code to close with.
pub fn parse_frame(buf: &[u8], frame_max: u32) -> Result<Option<(Frame<'_>, usize)>, CodecError> {
    if buf.first() == Some(&b'A') {
        return parse_protocol_header(buf).map(|_| None);
    }
    if buf.len() < HEADER_SIZE {
        return Ok(None);
    }
    let frame_type = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    // The type first: bytes of a peer that does not speak AMQP (a TLS
    // alert, an HTTP answer) read as a huge size, and "unknown frame type"
    // says better what went wrong.
    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(CodecError::UnknownFrameType {
            frame_type,
            channel,
        });
    }
    let total = size as u64 + FRAME_OVERHEAD as u64;
    if frame_max != 0 && total > u64::from(frame_max) {
        return Err(CodecError::FrameTooLarge {
            size: total,
            frame_max,
        });
    }
    if frame_type == FRAME_HEARTBEAT && (channel != 0 || size != 0) {
        return Err(CodecError::BadHeartbeat { channel, size });
    }
    let total = total as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(CodecError::BadFrameEnd {
            found: end,
            frame_type,
            channel,
        });
    }
    let payload = &buf[HEADER_SIZE..total - 1];
    let frame = match frame_type {
        FRAME_METHOD => Frame::Method {
            channel,
            method: Method::decode(payload)?,
        },
        FRAME_HEADER => Frame::Header {
            channel,
            header: decode_content_header(payload)?,
        },
        FRAME_BODY => Frame::Body { channel, payload },
        _ => Frame::Heartbeat,
    };
    Ok(Some((frame, total)))
}

/// Checks what a peer sent where a frame belongs but which starts with `A`:
/// `Ok(())` while it may still be the start of `AMQP`, otherwise the error
/// saying which protocol header arrived (or that the bytes are no frame).
fn parse_protocol_header(buf: &[u8]) -> Result<(), CodecError> {
    let n = buf.len().min(4);
    if buf[..n] != b"AMQP"[..n] {
        let channel = match buf {
            [_, a, b, ..] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        };
        return Err(CodecError::UnknownFrameType {
            frame_type: b'A',
            channel,
        });
    }
    if buf.len() < PROTOCOL_HEADER.len() {
        return Ok(());
    }
    Err(CodecError::ProtocolHeader {
        protocol_id: buf[4],
        major: buf[5],
        minor: buf[6],
        revision: buf[7],
    })
}

/// Decodes a content header frame's payload.
///
/// A property whose contents do not decode but whose length fits the frame
/// (a headers table with an unknown type tag, a short string that is not
/// UTF-8) does not fail the header: it is left unset and reported in
/// [`ContentHeader::properties_error`] with the raw property bytes.
///
/// # Errors
/// A class other than Basic (503), a non-zero weight, property flags naming
/// no property, a property whose length overruns the frame, or left-over
/// bytes (502).
pub fn decode_content_header(payload: &[u8]) -> Result<ContentHeader, CodecError> {
    let mut r = Reader::new(payload);
    let class_id = r.u16("content header class id")?;
    let weight = r.u16("content header weight")?;
    let body_size = r.u64("content header body size")?;
    if class_id != crate::spec::basic::CLASS_ID {
        return Err(CodecError::UnknownContentClass { class_id });
    }
    if weight != 0 {
        return Err(CodecError::NonZeroWeight { weight });
    }
    let properties_start = r.position();
    let (properties, unreadable) = BasicProperties::read(&mut r)?;
    r.finish("content header")?;
    let properties_error = unreadable.map(|error| {
        Box::new(PropertiesError {
            error,
            raw_properties: payload[properties_start..].to_vec(),
        })
    });
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
        properties_error,
    })
}

/// Runs `write` to append one frame's payload after a frame header, then
/// fills in the size and the frame-end octet. On error (or a frame over
/// `frame_max`) `out` is restored to its length before the call.
fn write_frame(
    out: &mut Vec<u8>,
    frame_type: u8,
    channel: u16,
    frame_max: u32,
    what: &'static str,
    write: impl FnOnce(&mut Writer<'_>) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    let result = write(&mut Writer::new(out));
    if let Err(e) = result {
        out.truncate(start);
        return Err(e);
    }
    let size = out.len() - start - HEADER_SIZE;
    let total = size + FRAME_OVERHEAD;
    if (frame_max != 0 && total > frame_max as usize) || size > u32::MAX as usize {
        out.truncate(start);
        return Err(CodecError::EncodedFrameTooLarge {
            what,
            size: total,
            frame_max,
        });
    }
    out[start + 3..start + 7].copy_from_slice(&(size as u32).to_be_bytes());
    out.push(FRAME_END);
    Ok(())
}

/// Appends a method frame to `out`.
///
/// # Errors
/// A field too long for its wire type, or a frame over `frame_max` (0: no
/// limit). On error `out` is left as it was.
pub fn encode_method(
    out: &mut Vec<u8>,
    channel: u16,
    method: &Method,
    frame_max: u32,
) -> Result<(), CodecError> {
    write_frame(out, FRAME_METHOD, channel, frame_max, "method", |w| {
        method.write(w)
    })
}

/// Appends a content header frame to `out`.
///
/// # Errors
/// A property too long for its wire type, or a frame over `frame_max`. On
/// error `out` is left as it was.
pub fn encode_content_header(
    out: &mut Vec<u8>,
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &BasicProperties,
    frame_max: u32,
) -> Result<(), CodecError> {
    write_frame(
        out,
        FRAME_HEADER,
        channel,
        frame_max,
        "content header",
        |w| {
            w.u16(class_id);
            w.u16(0);
            w.u64(body_size);
            properties.write(w)
        },
    )
}

/// The largest body payload one frame may carry under `frame_max`.
pub fn max_body_payload(frame_max: u32) -> usize {
    if frame_max == 0 {
        u32::MAX as usize - FRAME_OVERHEAD
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    }
}

/// Appends `body` as body frames of at most `frame_max` bytes each (payload
/// `frame_max − 8`). An empty body adds no frame.
pub fn encode_body(out: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = max_body_payload(frame_max);
    let frames = body.len().div_ceil(chunk);
    out.reserve(body.len() + frames * FRAME_OVERHEAD);
    for piece in body.chunks(chunk) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        out.extend_from_slice(piece);
        out.push(FRAME_END);
    }
}

/// Appends a whole message — a content-carrying method (Basic.Publish),
/// its content header and its body frames — to `out`.
///
/// ```
/// use pika::frame::{encode_message, FRAME_MIN_SIZE};
/// use pika::spec::basic;
/// use pika::BasicProperties;
///
/// let mut out = Vec::new();
/// let publish = basic::Publish { routing_key: "jobs".into(), ..Default::default() };
/// encode_message(&mut out, 1, &publish.into(), &BasicProperties::default(), &[7; 10_000], FRAME_MIN_SIZE).unwrap();
/// // method frame + header frame + 3 body frames of at most 4088 bytes each
/// assert_eq!(out.iter().filter(|&&b| b == 0xCE).count() >= 5, true);
/// ```
///
/// # Errors
/// A method that carries no content, a field too long for its wire type,
/// or a method or header frame over `frame_max`. On error `out` is left as
/// it was.
pub fn encode_message(
    out: &mut Vec<u8>,
    channel: u16,
    method: &Method,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), CodecError> {
    if !method.has_content() {
        return Err(CodecError::NotContentMethod {
            method: method.name(),
        });
    }
    let start = out.len();
    encode_method(out, channel, method, frame_max)?;
    if let Err(e) = encode_content_header(
        out,
        channel,
        method.id().class_id,
        body.len() as u64,
        properties,
        frame_max,
    ) {
        out.truncate(start);
        return Err(e);
    }
    encode_body(out, channel, body, frame_max);
    Ok(())
}

/// Appends a whole Basic.Publish message — method, content header and body
/// frames — to `out`, straight from borrowed names: the same bytes as
/// [`encode_message`] with a [`basic::Publish`](crate::spec::basic::Publish),
/// without building the method value first (the publish hot path).
///
/// # Errors
/// A name over 255 bytes, or a method or header frame over `frame_max`. On
/// error `out` is left as it was.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    out: &mut Vec<u8>,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), CodecError> {
    let start = out.len();
    let method = write_frame(out, FRAME_METHOD, channel, frame_max, "method", |w| {
        w.u16(crate::spec::basic::CLASS_ID);
        w.u16(40);
        w.u16(0); // ticket
        w.short_str(exchange, "exchange")
            .map_err(|e| e.in_field("Basic.Publish", "exchange"))?;
        w.short_str(routing_key, "routing_key")
            .map_err(|e| e.in_field("Basic.Publish", "routing_key"))?;
        w.bit(mandatory);
        w.bit(false); // immediate: RabbitMQ does not implement it
        Ok(())
    });
    method?;
    if let Err(e) = encode_content_header(
        out,
        channel,
        crate::spec::basic::CLASS_ID,
        body.len() as u64,
        properties,
        frame_max,
    ) {
        out.truncate(start);
        return Err(e);
    }
    encode_body(out, channel, body, frame_max);
    Ok(())
}

/// Appends a heartbeat frame to `out`.
pub fn encode_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests;
