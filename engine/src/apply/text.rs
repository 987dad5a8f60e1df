//! Text encodings of pgoutput values for the target: COPY text format rows and SQL literals.
//!
//! In: column values exactly as pgoutput sent them ([`Value::Text`](crate::event::Value::Text) holds the value's text
//! form). Out: bytes for `COPY … FROM STDIN` (text format) and quoted SQL literals for the
//! change-by-change replay path. Invariant: the target parses back exactly the bytes the source
//! sent, so every value round-trips byte-identical in its text form.
//!
//! COPY text format: a backslash, tab, newline or carriage return inside a value must be
//! written as `\\`, `\t`, `\n`, `\r`; NULL is `\N`; columns are separated by a tab and rows end
//! with a newline (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2>).

use bytes::{BufMut, BytesMut};

/// Appends `value` (a text form) to `out`, escaped for COPY text format.
pub fn push_copy_escaped(out: &mut BytesMut, value: &[u8]) {
    // Copy runs of plain bytes at once; escape only the four special ones.
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.put_slice(&value[start..i]);
        out.put_slice(esc);
        start = i + 1;
    }
    out.put_slice(&value[start..]);
}

/// The COPY text form of SQL NULL.
pub const COPY_NULL: &[u8] = b"\\N";

/// `value` as a standard-conforming SQL string literal (`'…'` with `'` doubled). The session
/// runs with `standard_conforming_strings = on`, so backslashes are taken literally
/// (<https://www.postgresql.org/docs/current/sql-syntax-lexical.html#SQL-SYNTAX-STRINGS>).
///
/// Fails if the bytes are not UTF-8 (the session's `client_encoding` is UTF8, the encoding
/// pgoutput values arrive in).
pub fn sql_literal(value: &[u8]) -> Result<String, std::str::Utf8Error> {
    let mut out = String::with_capacity(value.len() + 2);
    push_sql_literal(&mut out, value)?;
    Ok(out)
}

/// Appends `value` to `out` as [`sql_literal`] writes it; on error `out` is unchanged.
pub fn push_sql_literal(out: &mut String, value: &[u8]) -> Result<(), std::str::Utf8Error> {
    let s = std::str::from_utf8(value)?;
    out.reserve(s.len() + 2);
    out.push('\'');
    // Copy runs without a quote at once; double each quote.
    let mut rest = s;
    while let Some(i) = rest.find('\'') {
        out.push_str(&rest[..=i]);
        out.push('\'');
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('\'');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(v: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        push_copy_escaped(&mut b, v);
        b.to_vec()
    }

    /// Reverses COPY text escaping as PostgreSQL's `CopyReadAttributesText` does for the
    /// escapes we emit.
    fn unesc(v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut it = v.iter();
        while let Some(&b) = it.next() {
            if b == b'\\' {
                match it.next() {
                    Some(b't') => out.push(b'\t'),
                    Some(b'n') => out.push(b'\n'),
                    Some(b'r') => out.push(b'\r'),
                    Some(b'\\') => out.push(b'\\'),
                    other => panic!("unexpected escape {other:?}"),
                }
            } else {
                out.push(b);
            }
        }
        out
    }

    #[test]
    fn escapes_the_four_special_bytes() {
        assert_eq!(esc(b"plain"), b"plain");
        assert_eq!(esc(b"a\tb\nc\rd\\e"), b"a\\tb\\nc\\rd\\\\e");
        assert_eq!(esc(b"\\N"), b"\\\\N", "a literal \\N text is not NULL");
        assert_eq!(esc(b""), b"");
        assert_eq!(
            esc(b"\\x00ff"),
            b"\\\\x00ff",
            "bytea hex form keeps its backslash"
        );
    }

    #[test]
    fn escaped_output_has_no_raw_separators_and_round_trips() {
        let samples: &[&[u8]] = &[
            b"{1,2}",
            b"{\"a\": \"b\\tc\"}",
            "héllo\twörld\n".as_bytes(),
            b"\r\n\t\\\\",
            b"1.50000000000000000001",
        ];
        for s in samples {
            let e = esc(s);
            assert!(!e.contains(&b'\t') && !e.contains(&b'\n') && !e.contains(&b'\r'));
            assert_eq!(&unesc(&e), s);
        }
    }

    #[test]
    fn literals_double_quotes_and_keep_backslashes() {
        assert_eq!(sql_literal(b"it's").unwrap(), "'it''s'");
        assert_eq!(sql_literal(b"a\\b").unwrap(), "'a\\b'");
        assert_eq!(sql_literal(b"").unwrap(), "''");
        assert!(sql_literal(&[0xff, 0xfe]).is_err());
    }
}
