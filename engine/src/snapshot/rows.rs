//! COPY rows in text and binary format: splitting a `COPY … TO STDOUT` byte stream into rows,
//! picking out one field, and decoding a text field's escapes.
//!
//! In: the `Bytes` chunks that `copy_out` yields, whose boundaries need not align with rows.
//! Out: complete rows, byte for byte as the server sent them (a text row with its `\n`, a binary
//! tuple with its field count), and the shard-key field.
//!
//! Invariant: a row is never altered. In text format a data newline is always escaped as `\n`
//! and a data tab as `\t`, so a raw 0x0A byte always ends a row and a raw 0x09 byte always ends
//! a field (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2>). In binary
//! format a tuple is a 16-bit field count, then per field a 32-bit length (-1: NULL) and that
//! many bytes; the stream opens with a header and closes with a -1 field count
//! (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).

use bytes::{Bytes, BytesMut};

use super::window::parse_key_binary;
use crate::event::Oid;

/// How a table's rows travel from the source to the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    /// COPY's text format: works for every type.
    Text,
    /// COPY's binary format: no output or input functions' text on either side; only for
    /// tables whose every copied column has the same built-in type (or enum, or domain over a
    /// built-in type) on both sides and whose key is an integer.
    Binary,
}

impl CopyFormat {
    /// The `COPY` option clause for this format (empty for text, the default).
    pub(crate) fn options(self) -> &'static str {
        match self {
            CopyFormat::Text => "",
            CopyFormat::Binary => " (FORMAT binary)",
        }
    }

    /// `text` or `binary`, for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            CopyFormat::Text => "text",
            CopyFormat::Binary => "binary",
        }
    }
}

/// Binary COPY's file header with no flags and no extension: what each shard's binary `COPY …
/// FROM STDIN` is sent first.
pub(crate) const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Binary COPY's file trailer (a field count of -1): what each shard's binary COPY is sent last.
pub(crate) const BINARY_TRAILER: &[u8] = b"\xff\xff";

/// The binary header's fixed part: signature, flags, extension length.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Why splitting failed: the row callback's error, or a stream that is not what the format
/// promises (a readable detail).
#[derive(Debug)]
pub(crate) enum FeedError<E> {
    /// The row callback failed.
    Row(E),
    /// The stream is malformed.
    Malformed(String),
}

/// Splits a COPY stream of either format into rows.
#[derive(Debug)]
pub(crate) enum Splitter {
    /// Text rows.
    Text(RowSplitter),
    /// Binary tuples.
    Binary(BinarySplitter),
}

impl Splitter {
    /// A splitter for `format`.
    pub(crate) fn new(format: CopyFormat) -> Splitter {
        match format {
            CopyFormat::Text => Splitter::Text(RowSplitter::default()),
            CopyFormat::Binary => Splitter::Binary(BinarySplitter::default()),
        }
    }

    /// Feeds one chunk; `on_row` receives every row completed by it.
    pub(crate) fn feed<E>(
        &mut self,
        chunk: &Bytes,
        on_row: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        match self {
            Splitter::Text(s) => s.feed(chunk, on_row).map_err(FeedError::Row),
            Splitter::Binary(s) => s.feed(chunk, on_row),
        }
    }

    /// After the last chunk: what is wrong with how the stream ended, if anything.
    pub(crate) fn finish(&self) -> Result<(), String> {
        match self {
            Splitter::Text(s) => match s.leftover() {
                Some(left) => Err(format!(
                    "the stream ended inside a row: [{}]",
                    preview(left)
                )),
                None => Ok(()),
            },
            Splitter::Binary(s) => s.finish(),
        }
    }
}

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

/// Splits a binary COPY stream into tuples (each starting with its field count), skipping the
/// header and stopping at the trailer. Memory: at most one partial tuple is held.
#[derive(Debug, Default)]
pub(crate) struct BinarySplitter {
    carry: BytesMut,
    header_seen: bool,
    trailer_seen: bool,
}

/// What the front of a binary stream holds.
enum Next {
    /// Not enough bytes yet.
    Incomplete,
    /// A tuple of this many bytes.
    Tuple(usize),
    /// The trailer (2 bytes).
    Trailer,
}

impl BinarySplitter {
    /// Feeds one chunk; `on_row` receives every tuple completed by it.
    pub(crate) fn feed<E>(
        &mut self,
        chunk: &Bytes,
        mut on_row: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        let joined;
        let data: &[u8] = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(chunk);
            joined = self.carry.split();
            &joined
        };
        let mut pos = 0;
        if !self.header_seen {
            match binary_header_len(data).map_err(FeedError::Malformed)? {
                Some(n) => {
                    pos = n;
                    self.header_seen = true;
                }
                None => {
                    self.carry.extend_from_slice(data);
                    return Ok(());
                }
            }
        }
        while let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) {
            if self.trailer_seen {
                return Err(FeedError::Malformed(format!(
                    "{} bytes after the binary trailer",
                    rest.len()
                )));
            }
            match next_tuple(rest).map_err(FeedError::Malformed)? {
                Next::Incomplete => break,
                Next::Trailer => {
                    self.trailer_seen = true;
                    pos += 2;
                }
                Next::Tuple(n) => {
                    on_row(&rest[..n]).map_err(FeedError::Row)?;
                    pos += n;
                }
            }
        }
        if let Some(rest) = data.get(pos..) {
            self.carry.extend_from_slice(rest);
        }
        Ok(())
    }

    /// After the last chunk: the stream must have ended with the trailer, between tuples.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if !self.carry.is_empty() {
            return Err(format!(
                "the binary stream ended inside a tuple ({} bytes held)",
                self.carry.len()
            ));
        }
        if !self.trailer_seen {
            return Err("the binary stream ended without its trailer".into());
        }
        Ok(())
    }
}

/// The length of the binary header at the front of `data` (`None`: not all there yet).
fn binary_header_len(data: &[u8]) -> Result<Option<usize>, String> {
    let fixed = BINARY_SIGNATURE.len() + 8;
    let sig = data.len().min(BINARY_SIGNATURE.len());
    if data.get(..sig) != BINARY_SIGNATURE.get(..sig) {
        return Err(format!(
            "the binary stream does not start with the PGCOPY signature: [{}]",
            preview(&data[..data.len().min(fixed)])
        ));
    }
    let Some(head) = data.get(..fixed) else {
        return Ok(None);
    };
    let word = |at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&head[at..at + 4]);
        u32::from_be_bytes(w)
    };
    let flags = word(BINARY_SIGNATURE.len());
    if flags & (1 << 16) != 0 {
        return Err("the binary stream carries OIDs".into());
    }
    let ext = word(BINARY_SIGNATURE.len() + 4) as usize;
    Ok((data.len() >= fixed + ext).then_some(fixed + ext))
}

/// The tuple (or trailer) at the front of `data`.
fn next_tuple(data: &[u8]) -> Result<Next, String> {
    let Some(&[a, b]) = data.get(..2) else {
        return Ok(Next::Incomplete);
    };
    let count = i16::from_be_bytes([a, b]);
    if count == -1 {
        return Ok(Next::Trailer);
    }
    if count < 0 {
        return Err(format!("a binary tuple has field count {count}"));
    }
    let mut pos = 2usize;
    for _ in 0..count {
        let Some(&[a, b, c, d]) = data.get(pos..pos + 4) else {
            return Ok(Next::Incomplete);
        };
        let len = i32::from_be_bytes([a, b, c, d]);
        pos += 4;
        if len == -1 {
            continue;
        }
        let Ok(len) = usize::try_from(len) else {
            return Err(format!("a binary field has length {len}"));
        };
        pos += len;
        if data.len() < pos {
            return Ok(Next::Incomplete);
        }
    }
    Ok(Next::Tuple(pos))
}

/// Field `index` (0-based) of a binary tuple: `Some(None)` for NULL, `None` when the tuple has
/// fewer fields.
pub(crate) fn binary_field(row: &[u8], index: usize) -> Option<Option<&[u8]>> {
    let &[a, b] = row.get(..2)? else {
        return None;
    };
    let count = usize::try_from(i16::from_be_bytes([a, b])).ok()?;
    if index >= count {
        return None;
    }
    let mut pos = 2usize;
    for i in 0..=index {
        let &[a, b, c, d] = row.get(pos..pos + 4)? else {
            return None;
        };
        let len = i32::from_be_bytes([a, b, c, d]);
        pos += 4;
        let value = match usize::try_from(len) {
            Ok(n) => {
                let v = row.get(pos..pos + n)?;
                pos += n;
                Some(v)
            }
            Err(_) => None,
        };
        if i == index {
            return Some(value);
        }
    }
    None
}

/// A short, printable rendering of a binary tuple for error messages, given its columns' type
/// OIDs: integers and booleans decoded, other printable values as text, the rest in hex, NULL
/// as `\\N`.
pub(crate) fn preview_binary(row: &[u8], types: &[Oid]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(f) = binary_field(row, i) {
        let ty = types.get(i).copied().unwrap_or(0);
        out.push(match f {
            None => "\\N".to_owned(),
            Some(b) => match (ty, parse_key_binary(b), b) {
                (20 | 21 | 23, Some(v), _) => v.to_string(),
                (16, _, [v]) => if *v == 0 { "f" } else { "t" }.to_owned(),
                _ => match std::str::from_utf8(b) {
                    Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
                    _ => format!(
                        "\\x{}",
                        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                    ),
                },
            },
        });
        i += 1;
    }
    let s = out.join(" | ");
    match s.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// A short, printable rendering of a row of either format for error messages (`types`: the
/// columns' type OIDs, for binary rows).
pub(crate) fn preview_row(format: CopyFormat, types: &[Oid], row: &[u8]) -> String {
    match format {
        CopyFormat::Text => preview(row),
        CopyFormat::Binary => preview_binary(row, types),
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
pub(crate) mod tests {
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

    /// A binary tuple of `fields` (`None`: NULL).
    pub(crate) fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut t = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => t.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    t.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    t.extend_from_slice(b);
                }
            }
        }
        t
    }

    fn split_binary(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Result<(), String>) {
        let mut s = Splitter::new(CopyFormat::Binary);
        let mut rows = Vec::new();
        for c in chunks {
            if let Err(e) = s.feed(&Bytes::copy_from_slice(c), |r| {
                rows.push(r.to_vec());
                Ok::<(), ()>(())
            }) {
                return (
                    rows,
                    Err(match e {
                        FeedError::Malformed(m) => m,
                        FeedError::Row(()) => "row".into(),
                    }),
                );
            }
        }
        (rows, s.finish())
    }

    #[test]
    fn binary_tuples_split_at_every_cut_and_fields_are_found() {
        let t1 = tuple(&[Some(&7i64.to_be_bytes()), None, Some(b"x\ty\n")]);
        let t2 = tuple(&[Some(&(-3i64).to_be_bytes()), Some(b""), Some(&[0xff, 0x00])]);
        let t3 = tuple(&[]);
        // A header with a 3-byte extension area, as a later server might send.
        let mut data = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\x03abc".to_vec();
        for t in [&t1, &t2, &t3] {
            data.extend_from_slice(t);
        }
        data.extend_from_slice(BINARY_TRAILER);
        for cut in 0..=data.len() {
            for cut2 in [cut, (cut + 5).min(data.len()), data.len()] {
                let (rows, end) = split_binary(&[&data[..cut], &data[cut..cut2], &data[cut2..]]);
                assert_eq!(
                    rows,
                    vec![t1.clone(), t2.clone(), t3.clone()],
                    "cut at {cut}/{cut2}"
                );
                assert_eq!(end, Ok(()), "cut at {cut}/{cut2}");
            }
        }
        assert_eq!(binary_field(&t1, 0), Some(Some(&7i64.to_be_bytes()[..])));
        assert_eq!(binary_field(&t1, 1), Some(None));
        assert_eq!(binary_field(&t1, 2), Some(Some(&b"x\ty\n"[..])));
        assert_eq!(binary_field(&t1, 3), None);
        assert_eq!(binary_field(&t3, 0), None);
        assert_eq!(
            preview_binary(&t1, &[25]),
            "\\x0000000000000007 | \\N | \\x7809790a"
        );
        assert_eq!(
            preview_binary(&tuple(&[Some(b"abc"), None]), &[]),
            "abc | \\N"
        );
    }

    #[test]
    fn malformed_binary_streams_are_reported() {
        let t1 = tuple(&[Some(b"1")]);
        let mut ok = BINARY_HEADER.to_vec();
        ok.extend_from_slice(&t1);
        // Ends inside a tuple.
        let (_, end) = split_binary(&[&ok[..ok.len() - 1]]);
        assert!(end.unwrap_err().contains("inside a tuple"));
        // No trailer.
        let (rows, end) = split_binary(&[&ok]);
        assert_eq!(rows.len(), 1);
        assert!(end.unwrap_err().contains("without its trailer"));
        // Not a binary stream at all.
        let (_, end) = split_binary(&[b"1\tabc\n2\tdef\n3\tghi\n"]);
        assert!(end.unwrap_err().contains("PGCOPY signature"));
        // Bytes after the trailer.
        let mut after = ok.clone();
        after.extend_from_slice(BINARY_TRAILER);
        after.extend_from_slice(&t1);
        let (_, end) = split_binary(&[&after]);
        assert!(end.unwrap_err().contains("after the binary trailer"));
        // A negative field length other than -1.
        let mut bad = BINARY_HEADER.to_vec();
        bad.extend_from_slice(&1i16.to_be_bytes());
        bad.extend_from_slice(&(-2i32).to_be_bytes());
        let (_, end) = split_binary(&[&bad]);
        assert!(end.unwrap_err().contains("length -2"));
    }

    #[test]
    fn text_streams_report_an_unterminated_row() {
        let mut s = Splitter::new(CopyFormat::Text);
        s.feed(&Bytes::from_static(b"1\ta\n2\tb"), |_| Ok::<(), ()>(()))
            .unwrap();
        assert!(s.finish().unwrap_err().contains("[2 | b]"));
    }

    #[test]
    fn binary_previews_decode_integers_and_booleans() {
        let t = tuple(&[
            Some(&77i64.to_be_bytes()),
            None,
            Some(&(-5i32).to_be_bytes()),
            Some(&[1]),
            Some(b"note"),
        ]);
        assert_eq!(
            preview_binary(&t, &[20, 20, 23, 16, 25]),
            "77 | \\N | -5 | t | note"
        );
        assert_eq!(
            preview_row(CopyFormat::Binary, &[20, 20, 23, 16, 25], &t),
            "77 | \\N | -5 | t | note"
        );
    }
}
