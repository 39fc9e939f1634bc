//! [`BasicProperties`]: the 14 message properties of the Basic class, their
//! flag bits, and their wire form inside a content header.

use crate::error::CodecError;
use crate::table::FieldTable;
use crate::wire::{Reader, WireField, Writer};

macro_rules! basic_properties {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty, $flag_const:ident = $flag:literal, $with:ident, $wire:literal; )*) => {
        /// The properties of a message (pika's `pika.spec.BasicProperties`).
        ///
        /// Every property is optional; unset ones are not encoded. pika's
        /// `type` property is `kind` here (`type` is a Rust keyword).
        ///
        /// ```
        /// use pika::BasicProperties;
        /// let props = BasicProperties::default()
        ///     .with_content_type("application/json")
        ///     .with_delivery_mode(2);
        /// assert_eq!(props.content_type.as_deref(), Some("application/json"));
        /// assert_eq!(props.flags(), BasicProperties::FLAG_CONTENT_TYPE | BasicProperties::FLAG_DELIVERY_MODE);
        /// ```
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct BasicProperties {
            $( $(#[doc = $doc])* pub $field: Option<$ty>, )*
        }

        impl BasicProperties {
            $(
                #[doc = concat!("Flag bit of `", stringify!($field), "` in the property flags word.")]
                pub const $flag_const: u16 = $flag;
            )*

            $(
                #[doc = concat!("Sets `", stringify!($field), "`.")]
                pub fn $with(mut self, value: impl Into<$ty>) -> Self {
                    self.$field = Some(value.into());
                    self
                }
            )*

            /// The property flags word: one bit per property that is set.
            pub fn flags(&self) -> u16 {
                let mut flags = 0;
                $( if self.$field.is_some() { flags |= $flag; } )*
                flags
            }

            pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
                w.u16(self.flags());
                $(
                    if let Some(value) = &self.$field {
                        WireField::write(value, w)
                            .map_err(|e| e.in_field("BasicProperties", stringify!($field)))?;
                    }
                )*
                Ok(())
            }

            /// Reads the flags word and the properties it names. A property
            /// whose own length fits the input but whose contents do not
            /// decode (a table with an unknown type tag, a short string that
            /// is not UTF-8) is left unset and reported as the second value
            /// (the first such error); the properties after it are still
            /// read. Only input whose structure is lost — bad flags, a
            /// length overrunning the input — is an `Err`.
            pub(crate) fn read(r: &mut Reader<'_>) -> Result<(Self, Option<CodecError>), CodecError> {
                let flags = r.u16("property flags")?;
                // Bit 0 is the continuation flag (another flags word
                // follows); bits 1 and 0 name no Basic property.
                if flags & 0b11 != 0 {
                    return Err(CodecError::BadPropertyFlags { flags });
                }
                let mut props = BasicProperties::default();
                let mut unreadable = None;
                $(
                    if flags & $flag != 0 {
                        let in_field = |e: CodecError| e.in_field("BasicProperties", stringify!($field));
                        match WireField::read_skippable(r).map_err(in_field)? {
                            Ok(value) => props.$field = Some(value),
                            Err(e) => {
                                unreadable.get_or_insert(in_field(e));
                            }
                        }
                    }
                )*
                Ok((props, unreadable))
            }

            #[cfg(test)]
            pub(crate) const WIRE_TYPES: &'static [(&'static str, &'static str)] =
                &[$( (stringify!($field), $wire) ),*];
        }
    };
}

basic_properties! {
    /// MIME content type, e.g. `application/json`.
    content_type: String, FLAG_CONTENT_TYPE = 0x8000, with_content_type, "shortstr";
    /// MIME content encoding, e.g. `gzip`.
    content_encoding: String, FLAG_CONTENT_ENCODING = 0x4000, with_content_encoding, "shortstr";
    /// Application headers.
    headers: FieldTable, FLAG_HEADERS = 0x2000, with_headers, "table";
    /// 1 for transient, 2 for persistent.
    delivery_mode: u8, FLAG_DELIVERY_MODE = 0x1000, with_delivery_mode, "octet";
    /// Priority, 0 to 9.
    priority: u8, FLAG_PRIORITY = 0x0800, with_priority, "octet";
    /// Correlates a reply with its request.
    correlation_id: String, FLAG_CORRELATION_ID = 0x0400, with_correlation_id, "shortstr";
    /// Where to send a reply.
    reply_to: String, FLAG_REPLY_TO = 0x0200, with_reply_to, "shortstr";
    /// Per-message TTL in milliseconds, as a decimal string.
    expiration: String, FLAG_EXPIRATION = 0x0100, with_expiration, "shortstr";
    /// Application message id.
    message_id: String, FLAG_MESSAGE_ID = 0x0080, with_message_id, "shortstr";
    /// Seconds since the Unix epoch.
    timestamp: u64, FLAG_TIMESTAMP = 0x0040, with_timestamp, "timestamp";
    /// Message type name (pika's `type`).
    kind: String, FLAG_TYPE = 0x0020, with_kind, "shortstr";
    /// The publishing user; RabbitMQ checks it against the connection's user.
    user_id: String, FLAG_USER_ID = 0x0010, with_user_id, "shortstr";
    /// The publishing application's id.
    app_id: String, FLAG_APP_ID = 0x0008, with_app_id, "shortstr";
    /// Deprecated cluster id.
    cluster_id: String, FLAG_CLUSTER_ID = 0x0004, with_cluster_id, "shortstr";
}

/// How the broker keeps a message (`delivery_mode`): in memory only, or
/// on disk in a durable queue (pika's `DeliveryMode`).
///
/// ```
/// use pika::{BasicProperties, DeliveryMode};
///
/// let props = BasicProperties::persistent().with_content_type("text/plain");
/// assert_eq!(props.delivery_mode, Some(2));
/// assert_eq!(props.persistence(), Some(DeliveryMode::Persistent));
/// let props = BasicProperties::default().with_delivery_mode(DeliveryMode::Transient);
/// assert_eq!(props.delivery_mode, Some(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// `delivery_mode` 1: not written to disk.
    Transient = 1,
    /// `delivery_mode` 2: written to disk when the queue is durable.
    Persistent = 2,
}

impl From<DeliveryMode> for u8 {
    fn from(mode: DeliveryMode) -> u8 {
        mode as u8
    }
}

impl BasicProperties {
    /// Properties of a persistent message (`delivery_mode` 2), the rest
    /// unset.
    pub fn persistent() -> BasicProperties {
        BasicProperties::default().with_delivery_mode(DeliveryMode::Persistent)
    }

    /// Properties of a transient message (`delivery_mode` 1), the rest
    /// unset.
    pub fn transient() -> BasicProperties {
        BasicProperties::default().with_delivery_mode(DeliveryMode::Transient)
    }

    /// The `delivery_mode` as a [`DeliveryMode`] (`None` when unset or
    /// another value).
    pub fn persistence(&self) -> Option<DeliveryMode> {
        match self.delivery_mode {
            Some(1) => Some(DeliveryMode::Transient),
            Some(2) => Some(DeliveryMode::Persistent),
            _ => None,
        }
    }
}

/// Message properties that did not all decode: a delivered, fetched or
/// returned message still reaches the application with the properties that
/// did (the others unset) and this, so it can be acked, rejected or
/// dead-lettered instead of killing the connection.
///
/// ```
/// use pika::frame::decode_content_header;
///
/// // class 60, weight 0, body size 4, flags: content_type; content_type is
/// // the single byte 0xFF, which is not UTF-8.
/// let payload = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0x80, 0, 1, 0xFF];
/// let header = decode_content_header(&payload).unwrap();
/// assert_eq!(header.properties.content_type, None);
/// let problem = header.properties_error.unwrap();
/// assert!(problem.error.to_string().contains("content_type"));
/// assert_eq!(problem.raw_properties, [0x80, 0, 1, 0xFF]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PropertiesError {
    /// What was wrong with the first property that did not decode (it names
    /// the property).
    pub error: CodecError,
    /// The property bytes as received: the flags word and every property.
    pub raw_properties: Vec<u8>,
}
