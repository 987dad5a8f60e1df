//! Shard-key values: which column types can be keys, and how a key's text (or binary) form
//! becomes the value PostgreSQL hashes.
//!
//! In: a key's type OID and its bytes as pgoutput or `COPY … TO STDOUT` (text format) sends
//! them. Out: a [`Key`] that borrows the input (no allocation on the hot path, except to undo
//! COPY backslash escapes when a text key contains them), and its PostgreSQL partition hash.
//!
//! Invariant kept here: a key parses to the value PostgreSQL's input function would produce
//! (`int2in`/`int4in`/`int8in`, `uuid_in`, text as-is, `bpchar` without trailing spaces), or it
//! is rejected with an error naming the value; it never silently hashes something else.

use crate::event::Oid;

use super::error::KeyError;
use super::hash;

/// A column type reshard can route on.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// `smallint` (`int2`, OID 21).
    Int2,
    /// `integer` (`int4`, OID 23).
    Int4,
    /// `bigint` (`int8`, OID 20).
    Int8,
    /// `text` (OID 25).
    Text,
    /// `character varying` (OID 1043); hashes like text.
    Varchar,
    /// `character(n)` (`bpchar`, OID 1042); trailing spaces are insignificant.
    Bpchar,
    /// `uuid` (OID 2950).
    Uuid,
}

/// Names of the supported key types, for error messages.
pub const SUPPORTED_KEY_TYPES: &str =
    "smallint, integer, bigint, text, character varying, character(n), uuid";

impl KeyType {
    /// The key type of a `pg_type` OID, if routing supports it.
    pub fn from_oid(oid: Oid) -> Option<KeyType> {
        Some(match oid {
            21 => KeyType::Int2,
            23 => KeyType::Int4,
            20 => KeyType::Int8,
            25 => KeyType::Text,
            1043 => KeyType::Varchar,
            1042 => KeyType::Bpchar,
            2950 => KeyType::Uuid,
            _ => return None,
        })
    }

    /// The `pg_type` OID.
    pub fn oid(self) -> Oid {
        match self {
            KeyType::Int2 => 21,
            KeyType::Int4 => 23,
            KeyType::Int8 => 20,
            KeyType::Text => 25,
            KeyType::Varchar => 1043,
            KeyType::Bpchar => 1042,
            KeyType::Uuid => 2950,
        }
    }

    /// The SQL name (`format_type`).
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int2 => "smallint",
            KeyType::Int4 => "integer",
            KeyType::Int8 => "bigint",
            KeyType::Text => "text",
            KeyType::Varchar => "character varying",
            KeyType::Bpchar => "character",
            KeyType::Uuid => "uuid",
        }
    }

    /// Whether COPY text fields of this type can contain backslash escapes (only strings can).
    pub fn needs_copy_unescape(self) -> bool {
        matches!(self, KeyType::Text | KeyType::Varchar | KeyType::Bpchar)
    }

    /// Parses a key from its text form (pgoutput `t` values; `COPY` text fields after
    /// [`unescape_copy_field`]).
    pub fn parse_text(self, text: &[u8]) -> Result<Key<'_>, KeyError> {
        match self {
            KeyType::Int2 => parse_int(text, i64::from(i16::MIN), i64::from(i16::MAX), self),
            KeyType::Int4 => parse_int(text, i64::from(i32::MIN), i64::from(i32::MAX), self),
            KeyType::Int8 => parse_int(text, i64::MIN, i64::MAX, self),
            KeyType::Text | KeyType::Varchar => Ok(Key::Bytes(text)),
            KeyType::Bpchar => Ok(Key::Bytes(hash::bpchar_significant(text))),
            KeyType::Uuid => parse_uuid(text).map(Key::Uuid).ok_or_else(|| {
                KeyError::unparsable(
                    self,
                    text,
                    "a uuid such as a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                )
            }),
        }
    }

    /// Parses a key from its binary send form (pgoutput `b` values with `binary = true`):
    /// big-endian integers, the 16 uuid bytes, the string bytes.
    pub fn parse_binary(self, bytes: &[u8]) -> Result<Key<'_>, KeyError> {
        let bad = |expected| KeyError::unparsable(self, bytes, expected);
        match self {
            KeyType::Int2 => <[u8; 2]>::try_from(bytes)
                .map(|b| Key::Int(i64::from(i16::from_be_bytes(b))))
                .map_err(|_| bad("2 bytes (binary smallint)")),
            KeyType::Int4 => <[u8; 4]>::try_from(bytes)
                .map(|b| Key::Int(i64::from(i32::from_be_bytes(b))))
                .map_err(|_| bad("4 bytes (binary integer)")),
            KeyType::Int8 => <[u8; 8]>::try_from(bytes)
                .map(|b| Key::Int(i64::from_be_bytes(b)))
                .map_err(|_| bad("8 bytes (binary bigint)")),
            KeyType::Uuid => <[u8; 16]>::try_from(bytes)
                .map(Key::Uuid)
                .map_err(|_| bad("16 bytes (binary uuid)")),
            KeyType::Text | KeyType::Varchar => Ok(Key::Bytes(bytes)),
            KeyType::Bpchar => Ok(Key::Bytes(hash::bpchar_significant(bytes))),
        }
    }
}

/// A parsed shard-key value.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key<'a> {
    /// Any integer type (`int2`/`int4` values hash exactly like the same `int8`).
    Int(i64),
    /// A string's significant bytes (for `bpchar`: without trailing spaces).
    Bytes(&'a [u8]),
    /// A uuid's 16 bytes.
    Uuid([u8; 16]),
}

impl Key<'_> {
    /// The type's extended hash with [`hash::HASH_PARTITION_SEED`], as PostgreSQL computes it
    /// for hash partitioning.
    #[inline]
    pub fn partition_hash(&self) -> u64 {
        let seed = hash::HASH_PARTITION_SEED;
        match self {
            Key::Int(v) => hash::hashint8extended(*v, seed),
            Key::Bytes(b) => hash::hashtextextended(b, seed),
            Key::Uuid(u) => hash::uuid_hash_extended(u, seed),
        }
    }

    /// The row hash of a table partitioned by this one key column.
    #[inline]
    pub fn row_hash(&self) -> u64 {
        hash::row_hash(self.partition_hash())
    }
}

/// Parses a decimal integer like PostgreSQL's `int8in` (optional surrounding whitespace and
/// sign, ASCII digits), within `[min, max]`.
fn parse_int(text: &[u8], min: i64, max: i64, ty: KeyType) -> Result<Key<'static>, KeyError> {
    let bad = || KeyError::unparsable(ty, text, "a decimal integer in range");
    let t = text.trim_ascii();
    let (neg, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, t),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    // Accumulate negatively so that i64::MIN parses without overflow.
    let mut acc: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_sub(i64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    let v = if neg {
        acc
    } else {
        acc.checked_neg().ok_or_else(bad)?
    };
    if v < min || v > max {
        return Err(bad());
    }
    Ok(Key::Int(v))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses a uuid the way PostgreSQL's `uuid_in` does: 32 hex digits (either case), optionally
/// inside `{}`, with an optional hyphen after any group of four digits (so the canonical
/// `8-4-4-4-12` form, no hyphens, and `a0ee-bc99-…` are all accepted). No whitespace.
pub fn parse_uuid(text: &[u8]) -> Option<[u8; 16]> {
    // Fast path: the canonical form PostgreSQL prints (and pgoutput/COPY send).
    if let Ok(t) = <&[u8; 36]>::try_from(text) {
        if t[8] == b'-' && t[13] == b'-' && t[18] == b'-' && t[23] == b'-' {
            const HEX_AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
            let mut out = [0u8; 16];
            for (byte, &i) in out.iter_mut().zip(HEX_AT.iter()) {
                *byte = (hex_val(t[i])? << 4) | hex_val(t[i + 1])?;
            }
            return Some(out);
        }
    }
    let (braced, mut rest) = match text {
        [b'{', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        let [h, l, tail @ ..] = rest else {
            return None;
        };
        *byte = (hex_val(*h)? << 4) | hex_val(*l)?;
        rest = tail;
        if i % 2 == 1 && i < 15 {
            if let [b'-', tail @ ..] = rest {
                rest = tail;
            }
        }
    }
    if braced {
        let [b'}', tail @ ..] = rest else {
            return None;
        };
        rest = tail;
    }
    rest.is_empty().then_some(out)
}

/// Formats a uuid in PostgreSQL's canonical lower-case `8-4-4-4-12` form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

// COPY text's escapes: one decoder, in the `pg` toolkit (these names are the route stage's).
pub use crate::pg::copy_text::{is_null as is_copy_null, unescape as unescape_copy_field};

/// A key's text for messages: lossy UTF-8, at most 200 characters.
pub(crate) fn display_value(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.chars().count() > 200 {
        let mut t: String = s.chars().take(200).collect();
        t.push('…');
        t
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn ints_parse_full_range_and_reject_overflow() {
        fn p(t: KeyType, s: &str) -> Result<Key<'_>, KeyError> {
            t.parse_text(s.as_bytes())
        }
        assert_eq!(
            p(KeyType::Int8, "-9223372036854775808").unwrap(),
            Key::Int(i64::MIN)
        );
        assert_eq!(
            p(KeyType::Int8, "9223372036854775807").unwrap(),
            Key::Int(i64::MAX)
        );
        assert!(p(KeyType::Int8, "9223372036854775808").is_err());
        assert!(p(KeyType::Int8, "-9223372036854775809").is_err());
        assert_eq!(p(KeyType::Int4, " +42 ").unwrap(), Key::Int(42));
        assert_eq!(
            p(KeyType::Int4, "-2147483648").unwrap(),
            Key::Int(-2147483648)
        );
        assert!(p(KeyType::Int4, "2147483648").is_err());
        assert_eq!(p(KeyType::Int2, "-32768").unwrap(), Key::Int(-32768));
        assert!(p(KeyType::Int2, "32768").is_err());
        assert_eq!(p(KeyType::Int2, "-0").unwrap(), Key::Int(0));
        for bad in ["", "-", "+", "1.5", "0x1F", "1_000", "12a", "--1"] {
            assert!(p(KeyType::Int8, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn binary_ints_and_uuids() {
        assert_eq!(
            KeyType::Int8.parse_binary(&(-5i64).to_be_bytes()).unwrap(),
            Key::Int(-5)
        );
        assert_eq!(
            KeyType::Int2.parse_binary(&[0x80, 0x00]).unwrap(),
            Key::Int(-32768)
        );
        assert!(KeyType::Int4.parse_binary(&[0, 0, 1]).is_err());
        assert_eq!(
            KeyType::Uuid.parse_binary(&[7; 16]).unwrap(),
            Key::Uuid([7; 16])
        );
    }

    #[test]
    fn uuid_accepts_the_forms_uuid_in_accepts() {
        // Forms PostgreSQL 15 accepted (each printed back as the canonical form) or refused.
        let canonical = parse_uuid(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        for ok in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(parse_uuid(ok.as_bytes()), Some(canonical), "{ok}");
        }
        for bad in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
            "a0eebc99+9c0b-4ef8-bb6d-6bb9bd380a11",
            "",
        ] {
            assert_eq!(parse_uuid(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(
            format_uuid(&canonical),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
    }

    #[test]
    fn copy_escapes_are_undone() {
        assert!(matches!(unescape_copy_field(b"plain"), Cow::Borrowed(_)));
        assert_eq!(&*unescape_copy_field(br"a\\b\tc\nd"), b"a\\b\tc\nd");
        assert_eq!(&*unescape_copy_field(br"\101\x42\q"), b"ABq");
        assert_eq!(&*unescape_copy_field(br"\r\b\f\v"), b"\r\x08\x0c\x0b");
        assert!(is_copy_null(br"\N"));
        assert!(!is_copy_null(br"\\N"));
    }

    #[test]
    fn bpchar_key_drops_trailing_spaces() {
        assert_eq!(
            KeyType::Bpchar.parse_text(b"ab  ").unwrap(),
            Key::Bytes(b"ab")
        );
        assert_eq!(
            KeyType::Text.parse_text(b"ab  ").unwrap(),
            Key::Bytes(b"ab  ")
        );
    }
}
