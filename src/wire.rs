//! Primitive readers and writers for the AMQP 0-9-1 wire types (octets,
//! shorts, longs, strings, packed bits) over a bounded byte slice.

use crate::error::CodecError;

/// Reads wire values from a slice that is one frame's payload (or part of
/// one). Nothing read can run past the slice: a field that claims more bytes
/// than remain is [`CodecError::Truncated`], and nothing is allocated from a
/// length before those bytes are known to be present.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The octet holding packed bits being read, and how many of its bits
    /// have been used (8 means a new octet is needed for the next bit).
    bit_octet: u8,
    bits_used: u8,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            bit_octet: 0,
            bits_used: 8,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        self.bits_used = 8;
        if self.remaining() < n {
            return Err(CodecError::Truncated {
                what,
                needed: n,
                available: self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A short string: one length octet, then that many bytes of UTF-8.
    pub(crate) fn short_str(&mut self, what: &'static str) -> Result<String, CodecError> {
        let len = self.u8(what)? as usize;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::InvalidUtf8 { what })
    }

    /// A long string's bytes: a u32 length, then that many bytes.
    pub(crate) fn long_bytes(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    /// One packed bit. Consecutive bits share octets, eight to an octet,
    /// least significant bit first.
    pub(crate) fn bit(&mut self, what: &'static str) -> Result<bool, CodecError> {
        if self.bits_used == 8 {
            self.bit_octet = self.u8(what)?;
            self.bits_used = 0;
        }
        let value = self.bit_octet & (1 << self.bits_used) != 0;
        self.bits_used += 1;
        Ok(value)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(CodecError::TrailingBytes { what, count }),
        }
    }
}

/// Appends wire values to an output buffer, packing consecutive bits.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
    /// Index in `out` of the octet receiving packed bits, and how many of
    /// its bits are used.
    bit_index: usize,
    bits_used: u8,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer {
            out,
            bit_index: 0,
            bits_used: 8,
        }
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.bits_used = 8;
        self.out.extend_from_slice(bytes);
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.bits_used = 8;
        self.out.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }

    pub(crate) fn short_str(&mut self, s: &str, what: &'static str) -> Result<(), CodecError> {
        let len = u8::try_from(s.len()).map_err(|_| CodecError::TooLong {
            what,
            len: s.len(),
            max: 255,
        })?;
        self.u8(len);
        self.bytes(s.as_bytes());
        Ok(())
    }

    pub(crate) fn long_bytes(&mut self, b: &[u8], what: &'static str) -> Result<(), CodecError> {
        let len = u32::try_from(b.len()).map_err(|_| CodecError::TooLong {
            what,
            len: b.len(),
            max: u32::MAX as usize,
        })?;
        self.u32(len);
        self.bytes(b);
        Ok(())
    }

    pub(crate) fn bit(&mut self, v: bool) {
        if self.bits_used == 8 {
            self.out.push(0);
            self.bit_index = self.out.len() - 1;
            self.bits_used = 0;
        }
        if v {
            self.out[self.bit_index] |= 1 << self.bits_used;
        }
        self.bits_used += 1;
    }

    /// Reserves a u32 length slot; [`Writer::end_length`] fills it with the
    /// number of bytes written after it.
    pub(crate) fn begin_length(&mut self) -> usize {
        self.u32(0);
        self.out.len()
    }

    pub(crate) fn end_length(
        &mut self,
        start: usize,
        what: &'static str,
    ) -> Result<(), CodecError> {
        self.bits_used = 8;
        let len = self.out.len() - start;
        let len32 = u32::try_from(len).map_err(|_| CodecError::TooLong {
            what,
            len,
            max: u32::MAX as usize,
        })?;
        self.out[start - 4..start].copy_from_slice(&len32.to_be_bytes());
        Ok(())
    }
}

/// A value with one AMQP wire type, as used in method fields.
pub(crate) trait WireField: Sized {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError>;
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError>;
    /// Reads the field where bad contents need not spoil what follows (a
    /// message's properties): the outer `Err` when the field's own length
    /// overruns the input, so the next field cannot be found; `Ok(Err(_))`
    /// when the field was skipped over but its contents do not decode.
    fn read_skippable(r: &mut Reader<'_>) -> Result<Result<Self, CodecError>, CodecError> {
        Self::read(r).map(Ok)
    }
}

impl WireField for u8 {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.u8(*self);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.u8("octet")
    }
}

impl WireField for u16 {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.u16(*self);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.u16("short")
    }
}

impl WireField for u32 {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.u32(*self);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.u32("long")
    }
}

impl WireField for u64 {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.u64(*self);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.u64("longlong")
    }
}

impl WireField for bool {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.bit(*self);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.bit("bit")
    }
}

/// Short strings.
impl WireField for String {
    fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        w.short_str(self, "shortstr")
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.short_str("shortstr")
    }
    fn read_skippable(r: &mut Reader<'_>) -> Result<Result<Self, CodecError>, CodecError> {
        let len = r.u8("shortstr")? as usize;
        let bytes = r.take(len, "shortstr")?;
        Ok(std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::InvalidUtf8 { what: "shortstr" }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_pack_eight_to_an_octet_lsb_first() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        for i in 0..10 {
            w.bit(i % 3 == 0);
        }
        w.u8(0xAA);
        w.bit(true);
        assert_eq!(out, vec![0b0100_1001, 0b0000_0010, 0xAA, 0b1]);

        let mut r = Reader::new(&out);
        for i in 0..10 {
            assert_eq!(r.bit("b").unwrap(), i % 3 == 0);
        }
        assert_eq!(r.u8("o").unwrap(), 0xAA);
        assert!(r.bit("b").unwrap());
        r.finish("test").unwrap();
    }

    #[test]
    fn short_string_over_255_bytes_is_refused_at_encode() {
        let mut out = Vec::new();
        let err = Writer::new(&mut out)
            .short_str(&"x".repeat(256), "queue")
            .unwrap_err();
        assert_eq!(
            err,
            CodecError::TooLong {
                what: "queue",
                len: 256,
                max: 255
            }
        );
    }

    #[test]
    fn reading_past_the_end_is_truncated_not_a_panic() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1, 2]);
        let err = r.long_bytes("x").unwrap_err();
        assert!(matches!(
            err,
            CodecError::Truncated {
                needed: 9,
                available: 2,
                ..
            }
        ));
    }

    #[test]
    fn short_string_must_be_utf8() {
        let mut r = Reader::new(&[2, 0xff, 0xfe]);
        assert_eq!(
            r.short_str("reply_text").unwrap_err(),
            CodecError::InvalidUtf8 { what: "reply_text" }
        );
    }
}
