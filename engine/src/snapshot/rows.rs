//! COPY text-format rows: splitting a `COPY … TO STDOUT` byte stream into rows, picking out one
//! field, and decoding a field's escapes.
//!
//! In: the `Bytes` chunks that `copy_out` yields, whose boundaries need not align with rows.
//! Out: complete rows (each ending in `\n`), byte for byte as the server sent them, and the
//! de-escaped text of the shard-key field.
//!
//! Invariant: a row is never altered. In text format a data newline is always escaped as `\n`
//! and a data tab as `\t`, so a raw 0x0A byte always ends a row and a raw 0x09 byte always ends
//! a field (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2>).

use bytes::{Bytes, BytesMut};

/// Splits a stream of COPY chunks into whole rows, carrying a partial row over to the next chunk.
/// Memory: at most one partial row is held.
#[derive(Debug, Default)]
pub(crate) struct RowSplitter {
    carry: BytesMut,
}

impl RowSplitter {
    /// Feeds one chunk; `on_row` receives every row completed by it (with its trailing `\n`).
    pub(crate) fn feed<E>(
        &mut self,
        chunk: &Bytes,
        mut on_row: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest: &[u8] = chunk;
        if !self.carry.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.carry.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    let row = std::mem::take(&mut self.carry);
                    on_row(&row)?;
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return Ok(());
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', rest) {
            on_row(&rest[..=i])?;
            rest = &rest[i + 1..];
        }
        if !rest.is_empty() {
            self.carry.extend_from_slice(rest);
        }
        Ok(())
    }

    /// The bytes of an unterminated last row, if the stream ended inside one.
    pub(crate) fn leftover(&self) -> Option<&[u8]> {
        if self.carry.is_empty() {
            None
        } else {
            Some(&self.carry)
        }
    }
}

/// Field `index` (0-based) of a COPY text row, still escaped, without the row's newline.
/// `None` when the row has fewer fields.
pub(crate) fn field(row: &[u8], index: usize) -> Option<&[u8]> {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    row.split(|&b| b == b'\t').nth(index)
}

// COPY text's escapes: one decoder, in the `pg` toolkit.
pub(crate) use crate::pg::copy_text::{is_null, unescape};

/// A short, printable prefix of a row for error messages.
pub(crate) fn preview(row: &[u8]) -> String {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let cut = &row[..row.len().min(120)];
    let mut s = String::from_utf8_lossy(cut).replace('\t', " | ");
    if row.len() > cut.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
        let mut s = RowSplitter::default();
        let mut rows = Vec::new();
        for c in chunks {
            s.feed(&Bytes::copy_from_slice(c), |r| {
                rows.push(r.to_vec());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        (rows, s.leftover().map(<[u8]>::to_vec))
    }

    #[test]
    fn rows_split_across_chunks_are_rejoined() {
        let (rows, left) = split_all(&[b"1\ta\n2\tb", b"c\\nd", b"\n3\t\\N\n"]);
        assert_eq!(
            rows,
            vec![
                b"1\ta\n".to_vec(),
                b"2\tbc\\nd\n".to_vec(),
                b"3\t\\N\n".to_vec()
            ]
        );
        assert_eq!(left, None);
    }

    #[test]
    fn every_split_point_gives_the_same_rows() {
        let data: &[u8] = b"10\thello\\tworld\t\\N\n20\t\\\\x\t{\"a\": 1}\n30\t\t\n";
        let (expected, _) = split_all(&[data]);
        assert_eq!(expected.len(), 3);
        for cut in 0..=data.len() {
            let (rows, left) = split_all(&[&data[..cut], &data[cut..]]);
            assert_eq!(rows, expected, "cut at {cut}");
            assert_eq!(left, None);
        }
    }

    #[test]
    fn an_unterminated_row_is_reported() {
        let (rows, left) = split_all(&[b"1\ta\n2\tb"]);
        assert_eq!(rows.len(), 1);
        assert_eq!(left.as_deref(), Some(&b"2\tb"[..]));
    }

    #[test]
    fn fields_are_found_by_position() {
        let row = b"7\t\\N\tx\\ty\n";
        assert_eq!(field(row, 0), Some(&b"7"[..]));
        assert!(is_null(field(row, 1).unwrap()));
        assert_eq!(field(row, 2), Some(&b"x\\ty"[..]));
        assert_eq!(field(row, 3), None);
        assert_eq!(field(b"\n", 0), Some(&b""[..]));
    }

    #[test]
    fn previews_are_short_and_printable() {
        let long = vec![b'a'; 500];
        let p = preview(&long);
        assert!(p.chars().count() <= 121);
        assert_eq!(preview(b"1\tx\n"), "1 | x");
    }
}
