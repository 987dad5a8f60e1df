//! Framed pgoutput message files: the on-disk form of buffered streamed / prepared
//! transactions, and of the captured fixtures in `fixtures/pgoutput/*.bin`.
//!
//! In: `(Lsn, message bytes)` pairs. Out: the same pairs, read back one at a time (memory stays
//! bounded by the largest single message, whatever the file size).
//!
//! Format, repeated until end of file: `u64` big-endian LSN, `u32` big-endian length, then that
//! many bytes of one pgoutput message. A file that ends inside a frame is reported as
//! truncated, never silently shortened.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};

use crate::lsn::Lsn;

/// Bytes of a frame header (LSN + length).
pub const FRAME_HEADER_LEN: usize = 12;

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, lsn: Lsn, msg: &[u8]) -> io::Result<()> {
    let len = u32::try_from(msg.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "pgoutput message of {} bytes is too large to frame",
                msg.len()
            ),
        )
    })?;
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..8].copy_from_slice(&lsn.as_u64().to_be_bytes());
    header[8..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&header)?;
    w.write_all(msg)
}

/// Reads frames one at a time from a [`Read`].
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> FrameReader<R> {
    /// Reads from `inner` (wrap a file in a `BufReader`).
    pub fn new(inner: R) -> Self {
        FrameReader { inner, offset: 0 }
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, `None` at a clean end of file. A partial frame is an
    /// `UnexpectedEof` error naming the offset.
    pub fn next_frame(&mut self) -> io::Result<Option<(Lsn, Bytes)>> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let mut got = 0;
        while got < FRAME_HEADER_LEN {
            let n = match self.inner.read(&mut header[got..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(self.truncated());
            }
            got += n;
        }
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&header[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..]);
        let len = u32::from_be_bytes(len) as usize;
        let mut buf = BytesMut::zeroed(len);
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.truncated()
            } else {
                e
            }
        })?;
        self.offset += (FRAME_HEADER_LEN + len) as u64;
        Ok(Some((Lsn::from_u64(u64::from_be_bytes(lsn)), buf.freeze())))
    }

    fn truncated(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "framed pgoutput file ends inside the frame at byte {}",
                self.offset
            ),
        )
    }
}

impl<R: Read> Iterator for FrameReader<R> {
    type Item = io::Result<(Lsn, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame().transpose()
    }
}

/// Splits a whole framed file held in memory (fixtures, benches) into frames, zero-copy.
pub fn split_frames(data: &Bytes) -> io::Result<Vec<(Lsn, Bytes)>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let header = data.get(pos..pos + FRAME_HEADER_LEN).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("framed pgoutput data ends inside the frame header at byte {pos}"),
            )
        })?;
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&header[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..]);
        let start = pos + FRAME_HEADER_LEN;
        let end = start + u32::from_be_bytes(len) as usize;
        if end > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("framed pgoutput data ends inside the frame at byte {pos}"),
            ));
        }
        out.push((
            Lsn::from_u64(u64::from_be_bytes(lsn)),
            data.slice(start..end),
        ));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_truncation_is_reported() {
        let mut file = Vec::new();
        write_frame(&mut file, Lsn::from_u64(0x10), b"abc").unwrap();
        write_frame(&mut file, Lsn::from_u64(0x20), b"").unwrap();
        let frames: Vec<_> = FrameReader::new(&file[..])
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(
            frames,
            vec![
                (Lsn::from_u64(0x10), Bytes::from_static(b"abc")),
                (Lsn::from_u64(0x20), Bytes::new())
            ]
        );
        assert_eq!(split_frames(&Bytes::from(file.clone())).unwrap(), frames);
        for cut in 1..file.len() {
            if cut == 15 {
                continue; // a clean frame boundary
            }
            let mut r = FrameReader::new(&file[..cut]);
            let all: io::Result<Vec<_>> = r.by_ref().collect();
            assert!(all.is_err(), "cut at {cut} must be an error");
            assert!(split_frames(&Bytes::copy_from_slice(&file[..cut])).is_err());
        }
    }
}
