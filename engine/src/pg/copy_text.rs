//! COPY's text format, read side: one decoder of a field's backslash escapes, for every reader
//! of `COPY … TO STDOUT` text (the full load's row router, the route stage's key parser).
//!
//! In: one field of a row (the bytes between two tabs). Out: the value's text form, or whether
//! the field is the NULL marker `\N`. Borrows when there is nothing to decode. See
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2>.

use std::borrow::Cow;

/// Whether an escaped field is the NULL marker `\N`.
pub fn is_null(field: &[u8]) -> bool {
    field == b"\\N"
}

/// Undoes the backslash escapes of a text-format field (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`,
/// `\v`, octal `\NNN`, hex `\xHH`; any other escaped character stands for itself, and a
/// trailing lone backslash is kept). The caller has already recognised `\N` ([`is_null`]).
pub fn unescape(field: &[u8]) -> Cow<'_, [u8]> {
    if !field.contains(&b'\\') {
        return Cow::Borrowed(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&c) = field.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = field.get(i) else {
            // A trailing lone backslash: keep it (COPY never prints one).
            out.push(b'\\');
            break;
        };
        i += 1;
        match e {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let mut v: Option<u8> = None;
                for _ in 0..2 {
                    match field.get(i).and_then(|&d| (d as char).to_digit(16)) {
                        Some(d) => {
                            v = Some(v.unwrap_or(0) * 16 + d as u8);
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v.unwrap_or(b'x'));
            }
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_undone() {
        assert!(matches!(unescape(b"plain"), Cow::Borrowed(_)));
        assert_eq!(&*unescape(b"a\\tb\\nc\\\\d"), b"a\tb\nc\\d");
        assert_eq!(&*unescape(b"\\101\\x42\\7"), b"AB\x07");
        assert_eq!(&*unescape(b"\\b\\f\\r\\v\\q"), b"\x08\x0c\r\x0bq");
        assert_eq!(&*unescape(b"\\x"), b"x");
        assert_eq!(&*unescape(b"\\xg"), b"xg");
        assert_eq!(&*unescape(b"\\x4"), b"\x04");
        assert_eq!(&*unescape(b"end\\"), b"end\\");
        assert!(is_null(b"\\N"));
        assert!(!is_null(b"\\\\N"));
    }
}
