//! A small parser for the Python-literal (and JSON) dicts that pika's
//! `URLParameters` accepts in `client_properties`, `tcp_options` and
//! `ssl_options`, turning them into [`FieldValue`]s the way pika encodes
//! Python values.
//!
//! The grammar is the subset of Python's `ast.literal_eval` that can become
//! an AMQP field value, plus JSON's spellings:
//!
//! * dicts `{k: v, ...}` (keys must be strings) → [`FieldValue::Table`];
//!   a repeated key keeps the last value, as in Python;
//! * lists `[...]` and tuples `(...)` → [`FieldValue::Array`];
//! * strings in single or double quotes, with an optional `u`, `r` (raw) or
//!   `b` (bytes) prefix → [`FieldValue::LongString`] or
//!   [`FieldValue::ByteArray`];
//! * integers (decimal, `0x`, `0o`, `0b`, with `_` between digits and one
//!   optional sign) → [`FieldValue::I32`] when they fit, else
//!   [`FieldValue::I64`]; larger ones are errors;
//! * floats → [`FieldValue::F64`];
//! * `True`/`true`, `False`/`false` → [`FieldValue::Bool`], `None`/`null` →
//!   [`FieldValue::Void`].
//!
//! Containers may nest at most [`MAX_TABLE_DEPTH`] levels below the top,
//! the same bound the field-table codec enforces, so hostile input cannot
//! exhaust the stack. Every error gives the byte offset where it was found.

use std::fmt;

use crate::table::{FieldTable, FieldValue, LongString, MAX_TABLE_DEPTH};

/// Why a literal did not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LiteralError {
    /// Byte offset into the parsed text.
    offset: usize,
    /// What was wrong.
    message: String,
}

impl LiteralError {
    /// The byte offset into the parsed text where the error was found.
    pub(super) fn offset(&self) -> usize {
        self.offset
    }
}

impl fmt::Display for LiteralError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

/// Parses one literal that must span all of `text` (surrounding whitespace
/// allowed).
fn parse(text: &str) -> Result<FieldValue, LiteralError> {
    let mut p = Parser {
        src: text.as_bytes(),
        pos: 0,
    };
    p.skip_ws();
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos < p.src.len() {
        return Err(p.error_here(format!(
            "unexpected {} after the value",
            describe(p.src, p.pos)
        )));
    }
    Ok(value)
}

/// Parses a literal that must be a dict (or `None`/`null`, giving `None`).
pub(super) fn parse_dict(text: &str) -> Result<Option<FieldTable>, LiteralError> {
    match parse(text)? {
        FieldValue::Table(t) => Ok(Some(t)),
        FieldValue::Void => Ok(None),
        other => Err(LiteralError {
            offset: text.len() - text.trim_start().len(),
            message: format!("expected a dict, found {}", kind(&other)),
        }),
    }
}

/// A short name of a value's Python type, for error messages.
pub(super) fn kind(value: &FieldValue) -> &'static str {
    match value {
        FieldValue::Bool(_) => "a bool",
        FieldValue::I8(_)
        | FieldValue::U8(_)
        | FieldValue::I16(_)
        | FieldValue::U16(_)
        | FieldValue::I32(_)
        | FieldValue::U32(_)
        | FieldValue::I64(_)
        | FieldValue::Timestamp(_) => "an int",
        FieldValue::F32(_) | FieldValue::F64(_) | FieldValue::Decimal(_) => "a float",
        FieldValue::LongString(_) => "a string",
        FieldValue::ByteArray(_) => "a bytes value",
        FieldValue::Array(_) => "a list",
        FieldValue::Table(_) => "a dict",
        FieldValue::Void => "None",
    }
}

/// Describes the character at `pos` (or the end of input) for messages.
fn describe(src: &[u8], pos: usize) -> String {
    match std::str::from_utf8(&src[pos..])
        .ok()
        .and_then(|s| s.chars().next())
    {
        Some(c) => format!("{c:?}"),
        None if pos >= src.len() => "end of input".to_owned(),
        None => format!("byte 0x{:02X}", src[pos]),
    }
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error_at(&self, offset: usize, message: impl Into<String>) -> LiteralError {
        LiteralError {
            offset,
            message: message.into(),
        }
    }

    fn error_here(&self, message: impl Into<String>) -> LiteralError {
        self.error_at(self.pos, message)
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<FieldValue, LiteralError> {
        let start = self.pos;
        match self.peek() {
            None => Err(self.error_here("expected a value, found end of input")),
            Some(b'{') => self.dict(depth),
            Some(b'[') => self.sequence(depth, b']').map(FieldValue::Array),
            Some(b'(') => self.tuple(depth),
            Some(b'\'' | b'"') => self.string(false, false),
            Some(b'+' | b'-' | b'.' | b'0'..=b'9') => self.number(),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == b'_' {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let word = &self.src[start..self.pos];
                if let Some(b'\'' | b'"') = self.peek() {
                    return self.prefixed_string(start, word);
                }
                match word {
                    b"True" | b"true" => Ok(FieldValue::Bool(true)),
                    b"False" | b"false" => Ok(FieldValue::Bool(false)),
                    b"None" | b"null" => Ok(FieldValue::Void),
                    _ => Err(self.error_at(
                        start,
                        format!(
                            "unknown name '{}' (expected True, False, None, true, false or null)",
                            String::from_utf8_lossy(word)
                        ),
                    )),
                }
            }
            Some(_) => Err(self.error_here(format!(
                "expected a value, found {}",
                describe(self.src, self.pos)
            ))),
        }
    }

    /// Opens a container at `depth` (0 for the outermost), returning the
    /// depth of its items. Like the codec, containers may sit at depths
    /// 0 to [`MAX_TABLE_DEPTH`].
    fn enter(&self, depth: usize) -> Result<usize, LiteralError> {
        if depth > MAX_TABLE_DEPTH {
            Err(self.error_here(format!(
                "dicts and lists nested deeper than {MAX_TABLE_DEPTH} levels"
            )))
        } else {
            Ok(depth + 1)
        }
    }

    /// After an item: skips whitespace and consumes a `,` (returning true)
    /// or sees the closing bracket (returning false, not consuming it).
    fn separator(&mut self, close: u8) -> Result<bool, LiteralError> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.skip_ws();
                Ok(true)
            }
            Some(c) if c == close => Ok(false),
            _ => Err(self.error_here(format!(
                "expected ',' or '{}', found {}",
                close as char,
                describe(self.src, self.pos)
            ))),
        }
    }

    fn dict(&mut self, depth: usize) -> Result<FieldValue, LiteralError> {
        let inner = self.enter(depth)?;
        self.pos += 1; // '{'
        self.skip_ws();
        let mut table = FieldTable::new();
        while self.peek() != Some(b'}') {
            let key_at = self.pos;
            let key = match self.value(inner)? {
                FieldValue::LongString(s) => match s.as_str() {
                    Some(k) if k.len() <= 255 => k.to_owned(),
                    Some(k) => {
                        return Err(self.error_at(
                            key_at,
                            format!("dict key is {} bytes; keys may be at most 255", k.len()),
                        ));
                    }
                    None => return Err(self.error_at(key_at, "dict key is not valid UTF-8")),
                },
                other => {
                    return Err(self.error_at(
                        key_at,
                        format!("dict keys must be strings, found {}", kind(&other)),
                    ));
                }
            };
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error_here(format!(
                    "expected ':' after a dict key, found {}",
                    describe(self.src, self.pos)
                )));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value(inner)?;
            table.insert(key, value);
            if !self.separator(b'}')? {
                break;
            }
        }
        self.pos += 1; // '}'
        Ok(FieldValue::Table(table))
    }

    /// Items up to `close`, after the opening bracket.
    fn sequence(&mut self, depth: usize, close: u8) -> Result<Vec<FieldValue>, LiteralError> {
        Ok(self.items(depth, close)?.0)
    }

    /// Items up to `close`, and whether a comma followed the last one.
    fn items(&mut self, depth: usize, close: u8) -> Result<(Vec<FieldValue>, bool), LiteralError> {
        let inner = self.enter(depth)?;
        self.pos += 1; // '[' or '('
        self.skip_ws();
        let mut items = Vec::new();
        let mut trailing_comma = false;
        while self.peek() != Some(close) {
            items.push(self.value(inner)?);
            trailing_comma = self.separator(close)?;
            if !trailing_comma {
                break;
            }
        }
        self.pos += 1;
        Ok((items, trailing_comma))
    }

    fn tuple(&mut self, depth: usize) -> Result<FieldValue, LiteralError> {
        let (mut items, trailing_comma) = self.items(depth, b')')?;
        // `(x)` is just a parenthesised `x`; `(x,)` is a one-item tuple.
        if items.len() == 1 && !trailing_comma {
            Ok(items.remove(0))
        } else {
            Ok(FieldValue::Array(items))
        }
    }

    fn prefixed_string(&mut self, start: usize, prefix: &[u8]) -> Result<FieldValue, LiteralError> {
        let lower = prefix.to_ascii_lowercase();
        let (raw, bytes) = match lower.as_slice() {
            b"u" => (false, false),
            b"r" => (true, false),
            b"b" => (false, true),
            b"rb" | b"br" => (true, true),
            _ => {
                return Err(self.error_at(
                    start,
                    format!(
                        "unknown string prefix '{}'",
                        String::from_utf8_lossy(prefix)
                    ),
                ));
            }
        };
        self.string(raw, bytes)
    }

    fn string(&mut self, raw: bool, bytes: bool) -> Result<FieldValue, LiteralError> {
        let open_at = self.pos;
        let quote = self.src[self.pos];
        if self.src[self.pos..].starts_with(&[quote; 3]) {
            return Err(self.error_here("triple-quoted strings are not supported"));
        }
        self.pos += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error_at(open_at, "unterminated string"));
            };
            if c == quote {
                self.pos += 1;
                break;
            }
            if c == b'\n' || c == b'\r' {
                return Err(self.error_at(open_at, "unterminated string (line break inside)"));
            }
            if bytes && !c.is_ascii() {
                return Err(self.error_here("bytes literals may hold only ASCII characters"));
            }
            if c != b'\\' {
                out.push(c);
                self.pos += 1;
                continue;
            }
            let escape_at = self.pos;
            self.pos += 1;
            let Some(e) = self.peek() else {
                return Err(self.error_at(open_at, "unterminated string"));
            };
            if raw {
                // A raw string keeps the backslash; it only stops a quote
                // from ending the string.
                out.push(b'\\');
                if e != b'\n' && e != b'\r' {
                    out.push(e);
                    self.pos += 1;
                }
                continue;
            }
            self.pos += 1;
            match e {
                b'\\' | b'\'' | b'"' => out.push(e),
                b'/' => out.push(b'/'), // JSON's escape; Python keeps "\/"
                b'a' => out.push(0x07),
                b'b' => out.push(0x08),
                b'f' => out.push(0x0C),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(0x0B),
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    for _ in 0..2 {
                        match self.peek() {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                self.pos += 1;
                            }
                            _ => break,
                        }
                    }
                    if bytes {
                        out.push((v & 0xFF) as u8);
                    } else {
                        push_char(&mut out, v, escape_at, self)?;
                    }
                }
                b'x' => {
                    let v = self.hex_digits(2, escape_at)?;
                    if bytes {
                        out.push(v as u8);
                    } else {
                        push_char(&mut out, v, escape_at, self)?;
                    }
                }
                b'u' if !bytes => {
                    let mut v = self.hex_digits(4, escape_at)?;
                    if (0xD800..0xDC00).contains(&v) && self.src[self.pos..].starts_with(b"\\u") {
                        // A JSON surrogate pair.
                        let save = self.pos;
                        self.pos += 2;
                        let low = self.hex_digits(4, save)?;
                        if (0xDC00..0xE000).contains(&low) {
                            v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00);
                        } else {
                            self.pos = save;
                        }
                    }
                    push_char(&mut out, v, escape_at, self)?;
                }
                b'U' if !bytes => {
                    let v = self.hex_digits(8, escape_at)?;
                    push_char(&mut out, v, escape_at, self)?;
                }
                b'N' if !bytes => {
                    return Err(self.error_at(escape_at, "\\N{...} escapes are not supported"));
                }
                b'\n' => {} // line continuation
                _ => {
                    // Python keeps an unknown escape as it is.
                    out.push(b'\\');
                    self.pos -= 1;
                }
            }
        }
        if bytes {
            Ok(FieldValue::ByteArray(out))
        } else {
            // The input is &str and escapes push whole characters, so the
            // bytes are UTF-8.
            Ok(FieldValue::LongString(LongString::from(out)))
        }
    }

    fn hex_digits(&mut self, count: usize, escape_at: usize) -> Result<u32, LiteralError> {
        let mut v = 0u32;
        for _ in 0..count {
            match self.peek().and_then(|d| (d as char).to_digit(16)) {
                Some(d) => {
                    v = v * 16 + d;
                    self.pos += 1;
                }
                None => {
                    return Err(
                        self.error_at(escape_at, format!("escape needs {count} hex digits"))
                    );
                }
            }
        }
        Ok(v)
    }

    fn number(&mut self) -> Result<FieldValue, LiteralError> {
        let start = self.pos;
        let negative = match self.peek() {
            Some(b'-') => {
                self.pos += 1;
                true
            }
            Some(b'+') => {
                self.pos += 1;
                false
            }
            _ => false,
        };
        self.skip_ws();
        let body_at = self.pos;
        let radix = match self.src.get(self.pos..self.pos + 2) {
            Some(b"0x" | b"0X") => 16,
            Some(b"0o" | b"0O") => 8,
            Some(b"0b" | b"0B") => 2,
            _ => 10,
        };
        if radix != 10 {
            self.pos += 2;
            let digits = self.digits(radix, true)?;
            if digits.is_empty() {
                return Err(self.error_at(body_at, "expected digits after the base prefix"));
            }
            let magnitude = u128::from_str_radix(&digits, radix)
                .map_err(|_| self.error_at(start, "integer too large"))?;
            return self.integer(magnitude, negative, start);
        }

        let int_part = self.digits(10, false)?;
        let mut is_float = false;
        let mut text = int_part.clone();
        if self.peek() == Some(b'.') {
            is_float = true;
            self.pos += 1;
            text.push('.');
            if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                text.push_str(&self.digits(10, false)?);
            }
        }
        if int_part.is_empty() && text.len() <= 1 {
            return Err(self.error_at(start, "expected a number"));
        }
        if let Some(b'e' | b'E') = self.peek() {
            is_float = true;
            self.pos += 1;
            text.push('e');
            if let Some(s @ (b'+' | b'-')) = self.peek() {
                text.push(s as char);
                self.pos += 1;
            }
            let exp = self.digits(10, false)?;
            if exp.is_empty() {
                return Err(self.error_here("expected digits in the exponent"));
            }
            text.push_str(&exp);
        }
        if self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            return Err(self.error_here(format!(
                "unexpected {} in a number",
                describe(self.src, self.pos)
            )));
        }
        if is_float {
            let v: f64 = text
                .parse()
                .map_err(|_| self.error_at(start, "malformed float"))?;
            return Ok(FieldValue::F64(if negative { -v } else { v }));
        }
        if int_part.len() > 1 && int_part.starts_with('0') && int_part.bytes().any(|b| b != b'0') {
            return Err(self.error_at(
                body_at,
                "leading zeros in a decimal integer are not allowed (use 0o for octal)",
            ));
        }
        let magnitude: u128 = int_part
            .parse()
            .map_err(|_| self.error_at(start, "integer too large"))?;
        self.integer(magnitude, negative, start)
    }

    /// Digits of `radix`, with single `_` allowed between them (Python's
    /// rule); `after_prefix` also allows one `_` right after `0x` etc.
    fn digits(&mut self, radix: u32, after_prefix: bool) -> Result<String, LiteralError> {
        let mut out = String::new();
        let mut last_underscore = false;
        while let Some(c) = self.peek() {
            if (c as char).is_digit(radix) {
                out.push(c as char);
                last_underscore = false;
            } else if c == b'_' && !last_underscore && (!out.is_empty() || after_prefix) {
                last_underscore = true;
            } else {
                break;
            }
            self.pos += 1;
        }
        if last_underscore {
            return Err(self.error_here("a number may not end with '_'"));
        }
        Ok(out)
    }

    fn integer(
        &self,
        magnitude: u128,
        negative: bool,
        start: usize,
    ) -> Result<FieldValue, LiteralError> {
        let value = if negative {
            i128::try_from(magnitude).map(|m| -m).ok()
        } else {
            i128::try_from(magnitude).ok()
        };
        match value.and_then(|v| i64::try_from(v).ok()) {
            Some(v) => Ok(match i32::try_from(v) {
                Ok(small) => FieldValue::I32(small),
                Err(_) => FieldValue::I64(v),
            }),
            None => Err(self.error_at(start, "integer does not fit in a signed 64-bit field")),
        }
    }
}

/// Appends the UTF-8 form of code point `v`, or fails on surrogates and
/// values past U+10FFFF.
fn push_char(out: &mut Vec<u8>, v: u32, at: usize, p: &Parser<'_>) -> Result<(), LiteralError> {
    match char::from_u32(v) {
        Some(c) => {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            Ok(())
        }
        None => Err(p.error_at(at, format!("escape U+{v:04X} is not a valid character"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
        let mut t = FieldTable::new();
        for (k, v) in pairs {
            t.insert(*k, v.clone());
        }
        t
    }

    fn s(text: &str) -> FieldValue {
        FieldValue::LongString(text.into())
    }

    #[test]
    fn python_dict_with_every_scalar_kind_becomes_a_table() {
        let v = parse(
            "{'connection_name': 'x', 'n': 1, 'flag': True, 'off': False, 'none': None, \
             'nested': {'a': [1, 2.5, 'b']}}",
        )
        .unwrap();
        let expected = table(&[
            ("connection_name", s("x")),
            ("n", FieldValue::I32(1)),
            ("flag", FieldValue::Bool(true)),
            ("off", FieldValue::Bool(false)),
            ("none", FieldValue::Void),
            (
                "nested",
                FieldValue::Table(table(&[(
                    "a",
                    FieldValue::Array(vec![FieldValue::I32(1), FieldValue::F64(2.5), s("b")]),
                )])),
            ),
        ]);
        assert_eq!(v, FieldValue::Table(expected));
    }

    #[test]
    fn json_object_parses_like_the_python_dict() {
        let json = parse(r#"{"a": true, "b": false, "c": null, "d": [1, -2e3], "e": {"f": "g"}}"#)
            .unwrap();
        let py =
            parse("{'a': True, 'b': False, 'c': None, 'd': [1, -2e3], 'e': {'f': 'g'}}").unwrap();
        assert_eq!(json, py);
        assert_eq!(
            json.as_table().unwrap().get("d"),
            Some(&FieldValue::Array(vec![
                FieldValue::I32(1),
                FieldValue::F64(-2000.0)
            ]))
        );
    }

    #[test]
    fn integers_are_i32_when_they_fit_else_i64() {
        assert_eq!(parse("2147483647").unwrap(), FieldValue::I32(i32::MAX));
        assert_eq!(parse("-2147483648").unwrap(), FieldValue::I32(i32::MIN));
        assert_eq!(parse("2147483648").unwrap(), FieldValue::I64(2_147_483_648));
        assert_eq!(
            parse("-9223372036854775808").unwrap(),
            FieldValue::I64(i64::MIN)
        );
        assert_eq!(parse("1_000").unwrap(), FieldValue::I32(1000));
        assert_eq!(parse("0x1F").unwrap(), FieldValue::I32(31));
        assert_eq!(parse("0o17").unwrap(), FieldValue::I32(15));
        assert_eq!(parse("-0b101").unwrap(), FieldValue::I32(-5));
        assert_eq!(parse("+7").unwrap(), FieldValue::I32(7));
        assert_eq!(parse("000").unwrap(), FieldValue::I32(0));
    }

    #[test]
    fn integers_beyond_64_bits_are_errors() {
        let e = parse("9223372036854775808").unwrap_err();
        assert!(e.message.contains("64-bit"), "{e}");
        assert!(parse("-9223372036854775809").is_err());
        assert!(parse("123456789012345678901234567890123456789012").is_err());
    }

    #[test]
    fn floats_parse_in_python_forms() {
        assert_eq!(parse("2.5").unwrap(), FieldValue::F64(2.5));
        assert_eq!(parse(".5").unwrap(), FieldValue::F64(0.5));
        assert_eq!(parse("5.").unwrap(), FieldValue::F64(5.0));
        assert_eq!(parse("1e3").unwrap(), FieldValue::F64(1000.0));
        assert_eq!(parse("-1.5E-1").unwrap(), FieldValue::F64(-0.15));
    }

    #[test]
    fn string_escapes_follow_python_and_json() {
        assert_eq!(parse(r"'a\'b'").unwrap(), s("a'b"));
        assert_eq!(parse(r#""a\"b""#).unwrap(), s("a\"b"));
        assert_eq!(parse(r"'\n\t\\'").unwrap(), s("\n\t\\"));
        assert_eq!(parse(r"'\x41\101\u00e9\U0001F600'").unwrap(), s("AAé😀"));
        assert_eq!(parse(r#""\ud83d\ude00""#).unwrap(), s("😀"));
        assert_eq!(parse(r#""a\/b""#).unwrap(), s("a/b"));
        assert_eq!(parse(r"'\d'").unwrap(), s("\\d"));
        assert_eq!(parse("'é'").unwrap(), s("é"));
        assert_eq!(parse(r"r'\n'").unwrap(), s("\\n"));
        assert_eq!(parse(r"u'x'").unwrap(), s("x"));
        assert_eq!(
            parse(r"b'\x00a'").unwrap(),
            FieldValue::ByteArray(vec![0, b'a'])
        );
    }

    #[test]
    fn lone_surrogate_escape_is_an_error() {
        let e = parse(r#""\ud800""#).unwrap_err();
        assert!(e.message.contains("U+D800"), "{e}");
    }

    #[test]
    fn tuples_become_arrays_and_parentheses_group() {
        assert_eq!(
            parse("(1, 'a')").unwrap(),
            FieldValue::Array(vec![FieldValue::I32(1), s("a")])
        );
        assert_eq!(
            parse("(1,)").unwrap(),
            FieldValue::Array(vec![FieldValue::I32(1)])
        );
        assert_eq!(parse("(1)").unwrap(), FieldValue::I32(1));
        assert_eq!(parse("()").unwrap(), FieldValue::Array(vec![]));
    }

    #[test]
    fn trailing_commas_and_whitespace_are_accepted() {
        let v = parse(" {\n 'a' : [ 1 , 2 , ] ,\t} ").unwrap();
        assert_eq!(
            v,
            FieldValue::Table(table(&[(
                "a",
                FieldValue::Array(vec![FieldValue::I32(1), FieldValue::I32(2)])
            )]))
        );
        assert_eq!(parse("{}").unwrap(), FieldValue::Table(FieldTable::new()));
    }

    #[test]
    fn repeated_dict_key_keeps_the_last_value() {
        let v = parse("{'a': 1, 'a': 2}").unwrap();
        assert_eq!(v, FieldValue::Table(table(&[("a", FieldValue::I32(2))])));
    }

    #[test]
    fn errors_give_the_byte_offset() {
        let e = parse("{'a': 1 'b': 2}").unwrap_err();
        assert_eq!(e.offset, 8);
        assert!(e.to_string().ends_with("at byte 8"), "{e}");
        assert!(e.message.contains("expected ',' or '}'"), "{e}");

        let e = parse("{'a': 1").unwrap_err();
        assert_eq!(e.offset, 7);
        assert!(e.message.contains("end of input"), "{e}");

        let e = parse("{1: 2}").unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(e.message.contains("keys must be strings"), "{e}");

        let e = parse("{'a': nope}").unwrap_err();
        assert_eq!(e.offset, 6);
        assert!(e.message.contains("unknown name 'nope'"), "{e}");

        let e = parse("'abc").unwrap_err();
        assert_eq!(e.offset, 0);
        assert!(e.message.contains("unterminated"), "{e}");

        let e = parse("{} x").unwrap_err();
        assert_eq!(e.offset, 3);
        assert!(e.message.contains("after the value"), "{e}");
    }

    #[test]
    fn malformed_numbers_are_errors() {
        for bad in [
            "01", "1__0", "1_", "0x", "1e", "1.2.3", "--1", "12abc", "-", ".",
        ] {
            assert!(parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn empty_input_and_triple_quotes_are_errors() {
        assert!(parse("").unwrap_err().message.contains("end of input"));
        assert!(parse("   ").is_err());
        assert!(parse("'''a'''").unwrap_err().message.contains("triple"));
        assert!(parse("x'a'").unwrap_err().message.contains("prefix"));
    }

    #[test]
    fn nesting_is_bounded_by_the_table_depth_limit() {
        // The outermost list is at depth 0, so MAX_TABLE_DEPTH + 1 fit.
        let ok = format!(
            "{}1{}",
            "[".repeat(MAX_TABLE_DEPTH + 1),
            "]".repeat(MAX_TABLE_DEPTH + 1)
        );
        assert!(parse(&ok).is_ok());
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_TABLE_DEPTH + 2),
            "]".repeat(MAX_TABLE_DEPTH + 2)
        );
        let e = parse(&deep).unwrap_err();
        assert!(e.message.contains("nested deeper"), "{e}");
        // Far deeper input fails the same way instead of overflowing the stack.
        let hostile = "{'a': ".repeat(100_000);
        assert!(
            parse(&hostile)
                .unwrap_err()
                .message
                .contains("nested deeper")
        );
    }

    #[test]
    fn nesting_allowed_here_encodes_as_a_field_table() {
        // A top-level dict plus MAX_TABLE_DEPTH nested levels is accepted by
        // the parser, and the codec accepts the same depth.
        let text = format!(
            "{{'k': {}1{}}}",
            "[".repeat(MAX_TABLE_DEPTH),
            "]".repeat(MAX_TABLE_DEPTH)
        );
        let table = parse_dict(&text).unwrap().unwrap();
        table.encode(&mut Vec::new()).unwrap();
        let deeper = format!(
            "{{'k': {}1{}}}",
            "[".repeat(MAX_TABLE_DEPTH + 1),
            "]".repeat(MAX_TABLE_DEPTH + 1)
        );
        assert!(parse_dict(&deeper).is_err());
    }

    #[test]
    fn parse_dict_rejects_non_dicts_and_maps_none_to_none() {
        assert_eq!(parse_dict("None").unwrap(), None);
        assert_eq!(parse_dict("null").unwrap(), None);
        let e = parse_dict(" [1]").unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(e.message.contains("expected a dict, found a list"), "{e}");
    }

    #[test]
    fn overlong_dict_key_is_an_error() {
        let text = format!("{{'{}': 1}}", "k".repeat(256));
        assert!(parse(&text).unwrap_err().message.contains("at most 255"));
        let text = format!("{{'{}': 1}}", "k".repeat(255));
        assert!(parse(&text).is_ok());
    }
}
