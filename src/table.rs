//! AMQP field tables and arrays ([`FieldTable`], [`FieldValue`]), long
//! strings ([`LongString`]) and decimals, with their wire form.
//!
//! Every field type RabbitMQ sends or accepts is supported, tags
//! `t b B s u I i l f d D S x A T F V`, and `L` on decode: pika 1.3.0–1.3.2
//! write it for integers below −2³¹; like RabbitMQ, it is read as a signed
//! 64-bit integer ([`FieldValue::I64`]) and written back as `l`. (Those pika
//! versions also write integers in [2⁶³, 2⁶⁴) as `l` with unsigned packing:
//! they read back negative here, as they do in RabbitMQ.) Keys keep the order they were
//! inserted or received in. The decoder follows the AMQP 0-9-1 spec and
//! RabbitMQ's reading of it, not pika 1.1.0's decoder (which read `B` as
//! signed, `l` as unsigned and truncated floats).

use std::fmt;

use crate::error::CodecError;
use crate::wire::{Reader, WireField, Writer};

/// How deep tables and arrays may nest, on decode and on encode. Deeper
/// input is [`CodecError::TableTooDeep`], so hostile input cannot exhaust
/// the stack.
pub const MAX_TABLE_DEPTH: usize = 32;

/// An AMQP long string: up to 4 GiB of bytes, not necessarily UTF-8.
///
/// ```
/// use pika::LongString;
/// let s = LongString::from("en_US");
/// assert_eq!(s.as_str(), Some("en_US"));
/// assert_eq!(LongString::from(vec![0xff]).as_str(), None);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LongString(Vec<u8>);

impl LongString {
    /// An empty long string.
    pub const fn new() -> Self {
        LongString(Vec::new())
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The bytes as `&str` when they are valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
    /// The bytes as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
    /// Consumes the string, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for LongString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => fmt::Debug::fmt(s, f),
            None => write!(f, "b\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl fmt::Display for LongString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_string_lossy(), f)
    }
}

impl From<&str> for LongString {
    fn from(s: &str) -> Self {
        LongString(s.as_bytes().to_vec())
    }
}
impl From<String> for LongString {
    fn from(s: String) -> Self {
        LongString(s.into_bytes())
    }
}
impl From<Vec<u8>> for LongString {
    fn from(b: Vec<u8>) -> Self {
        LongString(b)
    }
}
impl From<&[u8]> for LongString {
    fn from(b: &[u8]) -> Self {
        LongString(b.to_vec())
    }
}

impl WireField for LongString {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.long_bytes(&self.0, "longstr")
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(LongString(r.long_bytes("longstr")?.to_vec()))
    }
}

/// An AMQP decimal: `value × 10^-scale`.
///
/// The spec calls the value a long-uint; pika, RabbitMQ's other clients and
/// this crate read it as signed (two's complement), so negative decimals
/// survive a round trip. The bits on the wire are the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decimal {
    /// Number of decimal digits after the point.
    pub scale: u8,
    /// The unscaled value.
    pub value: i32,
}

/// One value in a field table or array, tagged with its AMQP type.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FieldValue {
    /// `t`: boolean.
    Bool(bool),
    /// `b`: signed 8-bit integer.
    I8(i8),
    /// `B`: unsigned 8-bit integer.
    U8(u8),
    /// `s`: signed 16-bit integer.
    I16(i16),
    /// `u`: unsigned 16-bit integer.
    U16(u16),
    /// `I`: signed 32-bit integer.
    I32(i32),
    /// `i`: unsigned 32-bit integer.
    U32(u32),
    /// `l`: signed 64-bit integer (also read from `L`, see the module docs).
    I64(i64),
    /// `f`: 32-bit IEEE float.
    F32(f32),
    /// `d`: 64-bit IEEE float.
    F64(f64),
    /// `D`: decimal.
    Decimal(Decimal),
    /// `S`: long string (bytes, usually UTF-8).
    LongString(LongString),
    /// `x`: byte array.
    ByteArray(Vec<u8>),
    /// `A`: array of values.
    Array(Vec<FieldValue>),
    /// `T`: timestamp, seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`: nested table.
    Table(FieldTable),
    /// `V`: no value.
    Void,
}

impl FieldValue {
    /// The AMQP type tag octet of this value.
    pub fn tag(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal(_) => b'D',
            FieldValue::LongString(_) => b'S',
            FieldValue::ByteArray(_) => b'x',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
        }
    }

    /// The value as text when it is a UTF-8 long string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(s) => s.as_str(),
            _ => None,
        }
    }

    /// The value when it is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an `i64` when it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            FieldValue::Timestamp(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The nested table, when it is one.
    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }

    /// The array's items, when it is one.
    pub fn as_array(&self) -> Option<&[FieldValue]> {
        match self {
            FieldValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn write(&self, w: &mut Writer<'_>, depth: usize) -> Result<(), CodecError> {
        w.u8(self.tag());
        match self {
            FieldValue::Bool(v) => w.u8(u8::from(*v)),
            FieldValue::I8(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::U8(v) => w.u8(*v),
            FieldValue::I16(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::U16(v) => w.u16(*v),
            FieldValue::I32(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::U32(v) => w.u32(*v),
            FieldValue::I64(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::F32(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::F64(v) => w.bytes(&v.to_be_bytes()),
            FieldValue::Decimal(d) => {
                w.u8(d.scale);
                w.bytes(&d.value.to_be_bytes());
            }
            FieldValue::LongString(s) => w.long_bytes(s.as_bytes(), "field-table long string")?,
            FieldValue::ByteArray(b) => w.long_bytes(b, "field-table byte array")?,
            FieldValue::Array(items) => write_array(items, w, depth + 1)?,
            FieldValue::Timestamp(t) => w.u64(*t),
            FieldValue::Table(t) => t.write(w, depth + 1)?,
            FieldValue::Void => {}
        }
        Ok(())
    }

    fn read(r: &mut Reader<'_>, depth: usize) -> Result<FieldValue, CodecError> {
        let tag = r.u8("field value type")?;
        Ok(match tag {
            b't' => FieldValue::Bool(r.u8("boolean field")? != 0),
            b'b' => FieldValue::I8(r.u8("i8 field")? as i8),
            b'B' => FieldValue::U8(r.u8("u8 field")?),
            b's' => FieldValue::I16(r.u16("i16 field")? as i16),
            b'u' => FieldValue::U16(r.u16("u16 field")?),
            b'I' => FieldValue::I32(r.u32("i32 field")? as i32),
            b'i' => FieldValue::U32(r.u32("u32 field")?),
            // `L` is what pika 1.3.0–1.3.2 write for ints below −2³¹;
            // RabbitMQ reads it as signed 64-bit too. Re-encoded as `l`.
            b'l' | b'L' => FieldValue::I64(r.u64("i64 field")? as i64),
            b'f' => FieldValue::F32(f32::from_bits(r.u32("f32 field")?)),
            b'd' => FieldValue::F64(f64::from_bits(r.u64("f64 field")?)),
            b'D' => {
                let scale = r.u8("decimal field")?;
                let value = r.u32("decimal field")? as i32;
                FieldValue::Decimal(Decimal { scale, value })
            }
            b'S' => FieldValue::LongString(LongString(
                r.long_bytes("field-table long string")?.to_vec(),
            )),
            b'x' => FieldValue::ByteArray(r.long_bytes("field-table byte array")?.to_vec()),
            b'A' => FieldValue::Array(read_array(r, depth + 1)?),
            b'T' => FieldValue::Timestamp(r.u64("timestamp field")?),
            b'F' => FieldValue::Table(FieldTable::read(r, depth + 1)?),
            b'V' => FieldValue::Void,
            other => return Err(CodecError::UnknownFieldType { tag: other }),
        })
    }
}

fn write_array(items: &[FieldValue], w: &mut Writer<'_>, depth: usize) -> Result<(), CodecError> {
    check_depth(depth)?;
    let start = w.begin_length();
    for item in items {
        item.write(w, depth)?;
    }
    w.end_length(start, "field array")
}

fn read_array(r: &mut Reader<'_>, depth: usize) -> Result<Vec<FieldValue>, CodecError> {
    check_depth(depth)?;
    let bytes = r.long_bytes("field array")?;
    let mut inner = Reader::new(bytes);
    // No capacity from the declared length: each item is at least one byte,
    // and the Vec grows only with items actually decoded.
    let mut items = Vec::new();
    while inner.remaining() > 0 {
        items.push(FieldValue::read(&mut inner, depth)?);
    }
    Ok(items)
}

fn check_depth(depth: usize) -> Result<(), CodecError> {
    if depth > MAX_TABLE_DEPTH {
        Err(CodecError::TableTooDeep {
            limit: MAX_TABLE_DEPTH,
        })
    } else {
        Ok(())
    }
}

macro_rules! field_value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {
        $(impl From<$t> for FieldValue {
            fn from(v: $t) -> Self {
                FieldValue::$variant(v.into())
            }
        })*
    };
}

field_value_from! {
    bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32,
    i64 => I64, f32 => F32, f64 => F64, Decimal => Decimal, LongString => LongString,
    &str => LongString, String => LongString, Vec<FieldValue> => Array, FieldTable => Table,
}

/// An AMQP field table: string keys (short strings, at most 255 bytes) to
/// [`FieldValue`]s, in insertion (or wire) order.
///
/// ```
/// use pika::{FieldTable, FieldValue};
/// let mut args = FieldTable::new();
/// args.insert("x-max-length", 10i32);
/// args.insert("x-overflow", "reject-publish");
/// assert_eq!(args.get("x-max-length"), Some(&FieldValue::I32(10)));
/// assert_eq!(args.keys().collect::<Vec<_>>(), ["x-max-length", "x-overflow"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldTable {
    entries: Vec<(String, FieldValue)>,
}

impl FieldTable {
    /// An empty table.
    pub const fn new() -> Self {
        FieldTable {
            entries: Vec::new(),
        }
    }

    /// Sets `key` to `value`, replacing an existing value in its place or
    /// appending a new key at the end. Returns the previous value.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Into<FieldValue>,
    ) -> Option<FieldValue> {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => Some(std::mem::replace(slot, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Encodes the table (its u32 length, then the entries) onto `out`.
    ///
    /// # Errors
    /// A key over 255 bytes, nesting deeper than [`MAX_TABLE_DEPTH`], or a
    /// table over 4 GiB. On error `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let len = out.len();
        let result = self.write(&mut Writer::new(out), 0);
        if result.is_err() {
            out.truncate(len);
        }
        result
    }

    /// Decodes one table (u32 length, then entries) from the front of
    /// `bytes`, returning it and the number of bytes it took.
    ///
    /// # Errors
    /// Truncated data, an unknown value type, a key that is not UTF-8, or
    /// nesting deeper than [`MAX_TABLE_DEPTH`].
    pub fn decode(bytes: &[u8]) -> Result<(FieldTable, usize), CodecError> {
        let mut r = Reader::new(bytes);
        let table = FieldTable::read(&mut r, 0)?;
        Ok((table, r.position()))
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>, depth: usize) -> Result<(), CodecError> {
        check_depth(depth)?;
        let start = w.begin_length();
        for (key, value) in &self.entries {
            w.short_str(key, "field-table key")?;
            value.write(w, depth)?;
        }
        w.end_length(start, "field table")
    }

    pub(crate) fn read(r: &mut Reader<'_>, depth: usize) -> Result<FieldTable, CodecError> {
        check_depth(depth)?;
        let bytes = r.long_bytes("field table")?;
        FieldTable::read_entries(bytes, depth)
    }

    /// Decodes the entries of a table whose length prefix was already
    /// read: `bytes` is exactly the table's content.
    fn read_entries(bytes: &[u8], depth: usize) -> Result<FieldTable, CodecError> {
        check_depth(depth)?;
        let mut inner = Reader::new(bytes);
        let mut entries = Vec::new();
        while inner.remaining() > 0 {
            let key = inner.short_str("field-table key")?;
            let value = FieldValue::read(&mut inner, depth)?;
            entries.push((key, value));
        }
        Ok(FieldTable { entries })
    }
}

impl WireField for FieldTable {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        FieldTable::write(self, w, 0)
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        FieldTable::read(r, 0)
    }
    fn read_skippable(r: &mut Reader<'_>) -> Result<Result<Self, CodecError>, CodecError> {
        // The table's own length says where the next field starts, so bad
        // contents spoil only this field.
        let bytes = r.long_bytes("field table")?;
        Ok(FieldTable::read_entries(bytes, 0))
    }
}

impl<K: Into<String>, V: Into<FieldValue>> FromIterator<(K, V)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut table = FieldTable::new();
        for (k, v) in iter {
            table.insert(k, v);
        }
        table
    }
}

impl<'a> IntoIterator for &'a FieldTable {
    type Item = (&'a str, &'a FieldValue);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a FieldValue)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_type() -> FieldTable {
        let mut nested = FieldTable::new();
        nested.insert("inner", "yes");
        let mut t = FieldTable::new();
        t.insert("t", true);
        t.insert("b", -5i8);
        t.insert("B", 250u8);
        t.insert("s", -300i16);
        t.insert("u", 65000u16);
        t.insert("I", -70000i32);
        t.insert("i", 4_000_000_000u32);
        t.insert("l", -(1i64 << 40));
        t.insert("f", 1.5f32);
        t.insert("d", -2.25f64);
        t.insert(
            "D",
            Decimal {
                scale: 2,
                value: -314,
            },
        );
        t.insert("S", LongString::from(vec![0xff, 0x00, b'a']));
        t.insert("x", FieldValue::ByteArray(vec![1, 2, 3]));
        t.insert(
            "A",
            vec![FieldValue::I32(1), FieldValue::Void, "two".into()],
        );
        t.insert("T", FieldValue::Timestamp(1_700_000_000));
        t.insert("F", nested);
        t.insert("V", FieldValue::Void);
        t
    }

    #[test]
    fn every_field_type_round_trips_in_order() {
        let table = every_type();
        let mut out = Vec::new();
        table.encode(&mut out).unwrap();
        let (back, used) = FieldTable::decode(&out).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(back, table);
        let tags: Vec<u8> = back.iter().map(|(_, v)| v.tag()).collect();
        assert_eq!(tags, b"tbBsuIilfdDSxATFV");
        assert_eq!(back.keys().collect::<String>(), "tbBsuIilfdDSxATFV");
    }

    #[test]
    fn unsigned_and_signed_types_are_read_per_the_spec() {
        // B is unsigned, b signed, l signed, floats keep their fraction.
        let bytes = [
            0, 0, 0, 26, 1, b'a', b'B', 0xff, 1, b'b', b'b', 0xff, 1, b'c', b'l', 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xfe, 1, b'd', b'f', 0x3f, 0xc0, 0, 0,
        ];
        let (t, _) = FieldTable::decode(&bytes).unwrap();
        assert_eq!(t.get("a"), Some(&FieldValue::U8(255)));
        assert_eq!(t.get("b"), Some(&FieldValue::I8(-1)));
        assert_eq!(t.get("c"), Some(&FieldValue::I64(-2)));
        assert_eq!(t.get("d"), Some(&FieldValue::F32(1.5)));
    }

    #[test]
    fn capital_l_reads_as_signed_64_bit_and_is_written_back_as_l() {
        // pika 1.3.0-1.3.2 write `L` for ints below -2^31.
        let mut bytes = vec![0, 0, 0, 11, 1, b'n', b'L'];
        bytes.extend_from_slice(&(-(1i64 << 40)).to_be_bytes());
        let (t, used) = FieldTable::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(t.get("n"), Some(&FieldValue::I64(-(1 << 40))));
        let mut out = Vec::new();
        t.encode(&mut out).unwrap();
        bytes[6] = b'l';
        assert_eq!(out, bytes);
    }

    #[test]
    fn insert_replaces_in_place() {
        let mut t = FieldTable::new();
        t.insert("a", 1i32);
        t.insert("b", 2i32);
        assert_eq!(t.insert("a", 3i32), Some(FieldValue::I32(1)));
        assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(t.get("a"), Some(&FieldValue::I32(3)));
        assert_eq!(t.remove("a"), Some(FieldValue::I32(3)));
        assert!(!t.contains_key("a"));
    }

    #[test]
    fn unknown_field_type_is_a_syntax_error() {
        let bytes = [0, 0, 0, 3, 1, b'k', b'Z'];
        let err = FieldTable::decode(&bytes).unwrap_err();
        assert_eq!(err, CodecError::UnknownFieldType { tag: b'Z' });
        assert_eq!(err.reply_code(), 502);
        assert!(err.to_string().contains("'Z'"));
    }

    #[test]
    fn huge_declared_lengths_are_truncated_errors_without_allocating() {
        // A table claiming 4 GiB, a long string claiming 4 GiB, a byte array
        // whose length is "negative" as an i32.
        for bytes in [
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            vec![0, 0, 0, 7, 1, b'k', b'S', 0xff, 0xff, 0xff, 0xff],
            vec![0, 0, 0, 7, 1, b'k', b'x', 0x80, 0, 0, 0],
        ] {
            let err = FieldTable::decode(&bytes).unwrap_err();
            assert!(matches!(err, CodecError::Truncated { .. }), "{err}");
        }
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused_both_ways() {
        let mut deep = FieldTable::new();
        for _ in 0..=MAX_TABLE_DEPTH {
            let mut outer = FieldTable::new();
            outer.insert("n", deep);
            deep = outer;
        }
        let mut out = Vec::new();
        assert_eq!(
            deep.encode(&mut out).unwrap_err(),
            CodecError::TableTooDeep {
                limit: MAX_TABLE_DEPTH
            }
        );
        assert!(
            out.is_empty(),
            "a failed encode leaves the buffer as it was"
        );

        // On the wire: exactly the limit decodes, one more level is refused.
        fn nested(levels: usize) -> Vec<u8> {
            let mut entries = Vec::new();
            if levels > 0 {
                entries.extend_from_slice(&[1, b'n', b'F']);
                entries.extend(nested(levels - 1));
            }
            let mut out = (entries.len() as u32).to_be_bytes().to_vec();
            out.extend(entries);
            out
        }
        assert!(FieldTable::decode(&nested(MAX_TABLE_DEPTH)).is_ok());
        assert_eq!(
            FieldTable::decode(&nested(MAX_TABLE_DEPTH + 1)).unwrap_err(),
            CodecError::TableTooDeep {
                limit: MAX_TABLE_DEPTH
            }
        );
    }

    #[test]
    fn long_strings_need_not_be_utf8() {
        let s = LongString::from(vec![0xc3, 0x28]);
        assert_eq!(s.as_str(), None);
        assert_eq!(s.to_string_lossy(), "\u{fffd}(");
        assert_eq!(format!("{s:?}"), "b\"\\xc3(\"");
    }
}
