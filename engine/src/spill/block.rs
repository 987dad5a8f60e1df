//! Block frames and segment files of one shard's spill log.
//!
//! In: uncompressed record payloads (a run of [`codec`](super::codec) records) from the
//! writer. Out: CRC-checked frames appended to segment files, and the same payloads read back.
//! A frame's payload is zstd-compressed, or stored as it is ([`FLAG_STORED`]) when the writer
//! knows its shard's reader takes it from the in-memory tail (compressing it would be work
//! only a later file read could use; see the writer's `write_block`).
//!
//! A segment file is a sequence of frames; a frame is a 40-byte header and the compressed
//! payload:
//!
//! ```text
//! 0  magic            u32  "RSB1"
//! 4  crc32c           u32  over bytes 8.. of the header and the whole payload
//! 8  payload_len      u32  payload bytes that follow the header
//! 12 raw_len          u32  uncompressed bytes
//! 16 records          u32  records in the payload
//! 20 flags            u32  0: zstd payload; FLAG_STORED (1): payload is the raw bytes
//! 24 first_commit_lsn u64  commit LSN of the transaction of the first record
//! 32 last_commit_lsn  u64  commit LSN of the transaction of the last record
//! ```
//!
//! Invariant kept here: a frame is accepted only if its magic, length and CRC are right; a
//! frame that does not fit in the valid length of its file is "short" (a torn tail), never
//! read past.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::lsn::Lsn;

/// Frame magic, `RSB1` read as little-endian bytes.
pub(crate) const MAGIC: u32 = u32::from_le_bytes(*b"RSB1");
/// Header bytes of a frame.
pub(crate) const HEADER_LEN: u64 = 40;
/// Frame flag: the payload is stored uncompressed (`payload_len == raw_len`).
pub(crate) const FLAG_STORED: u32 = 1;
/// Largest uncompressed payload accepted when reading (a single record can exceed the
/// configured block size: PostgreSQL values reach 1 GB).
pub(crate) const MAX_RAW_LEN: u32 = 1536 << 20;

/// The parsed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockHeader {
    pub crc: u32,
    pub payload_len: u32,
    pub raw_len: u32,
    pub records: u32,
    /// The payload is the raw bytes, not zstd ([`FLAG_STORED`]).
    pub stored: bool,
    pub first_commit: Lsn,
    pub last_commit: Lsn,
}

impl BlockHeader {
    /// Total frame bytes.
    pub(crate) fn frame_len(&self) -> u64 {
        HEADER_LEN + u64::from(self.payload_len)
    }

    /// Header bytes with the CRC over the header fields and `payload` filled in.
    pub(crate) fn encode(&self, payload: &[u8]) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.records.to_le_bytes());
        let flags = if self.stored { FLAG_STORED } else { 0 };
        h[20..24].copy_from_slice(&flags.to_le_bytes());
        h[24..32].copy_from_slice(&self.first_commit.as_u64().to_le_bytes());
        h[32..40].copy_from_slice(&self.last_commit.as_u64().to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), payload);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses a header; `None` if the magic or a field is impossible.
    pub(crate) fn parse(h: &[u8; HEADER_LEN as usize]) -> Option<BlockHeader> {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let flags = u32_at(20);
        if u32_at(0) != MAGIC || flags & !FLAG_STORED != 0 {
            return None;
        }
        let hdr = BlockHeader {
            crc: u32_at(4),
            payload_len: u32_at(8),
            raw_len: u32_at(12),
            records: u32_at(16),
            stored: flags & FLAG_STORED != 0,
            first_commit: Lsn::from_u64(u64_at(24)),
            last_commit: Lsn::from_u64(u64_at(32)),
        };
        if hdr.raw_len > MAX_RAW_LEN
            || hdr.first_commit > hdr.last_commit
            || (hdr.stored && hdr.payload_len != hdr.raw_len)
        {
            return None;
        }
        Some(hdr)
    }

    fn crc_ok(&self, h: &[u8; HEADER_LEN as usize], payload: &[u8]) -> bool {
        crc32c::crc32c_append(crc32c::crc32c(&h[8..]), payload) == self.crc
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The frame does not fit in the valid length of the file (a torn write).
    Short,
    /// Bad magic, an impossible field, a CRC mismatch or a payload zstd cannot decompress.
    Bad(String),
    /// The read itself failed.
    Io(std::io::Error),
}

/// A frame read from a file: its header and compressed payload.
pub(crate) struct RawFrame {
    pub header: BlockHeader,
    pub payload: Vec<u8>,
}

/// A frame's header as read from a file: its bytes (the CRC covers them) and their parse.
pub(crate) struct HeaderAt {
    bytes: [u8; HEADER_LEN as usize],
    pub header: BlockHeader,
}

/// Reads and CRC-checks the frame at `offset`; `limit` is the valid length of the file.
pub(crate) fn read_frame(file: &File, offset: u64, limit: u64) -> Result<RawFrame, FrameError> {
    let h = read_header(file, offset, limit)?;
    read_payload(file, offset, h)
}

/// Reads only the header at `offset` and checks that the frame fits (no CRC check yet: a
/// reader skips frames it does not need without reading their payload; [`read_payload`]
/// reads and checks the rest).
pub(crate) fn read_header(file: &File, offset: u64, limit: u64) -> Result<HeaderAt, FrameError> {
    if offset + HEADER_LEN > limit {
        return Err(FrameError::Short);
    }
    let mut bytes = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut bytes, offset)
        .map_err(FrameError::Io)?;
    let header =
        BlockHeader::parse(&bytes).ok_or_else(|| FrameError::Bad("bad frame header".into()))?;
    if offset + header.frame_len() > limit {
        return Err(FrameError::Short);
    }
    Ok(HeaderAt { bytes, header })
}

/// Reads the payload of the frame at `offset` whose header `h` was read there, and checks the
/// frame's CRC.
pub(crate) fn read_payload(file: &File, offset: u64, h: HeaderAt) -> Result<RawFrame, FrameError> {
    let mut payload = vec![0u8; h.header.payload_len as usize];
    file.read_exact_at(&mut payload, offset + HEADER_LEN)
        .map_err(FrameError::Io)?;
    if !h.header.crc_ok(&h.bytes, &payload) {
        return Err(FrameError::Bad("CRC32C mismatch".into()));
    }
    Ok(RawFrame {
        header: h.header,
        payload,
    })
}

/// Decompresses a frame's payload (a stored payload is taken as it is).
pub(crate) fn decompress(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    frame: RawFrame,
) -> Result<Bytes, FrameError> {
    if frame.header.stored {
        return Ok(Bytes::from(frame.payload));
    }
    let raw = dctx
        .decompress(&frame.payload, frame.header.raw_len as usize)
        .map_err(|e| FrameError::Bad(format!("zstd payload does not decompress: {e}")))?;
    if raw.len() != frame.header.raw_len as usize {
        return Err(FrameError::Bad(format!(
            "payload decompresses to {} bytes, header says {}",
            raw.len(),
            frame.header.raw_len
        )));
    }
    Ok(Bytes::from(raw))
}

/// Name of the directory of shard `index`'s log.
pub(crate) fn shard_dir(root: &Path, index: usize) -> PathBuf {
    root.join(format!("shard-{index:04}"))
}

/// File name of a segment: its first commit LSN (16 hex digits, so names sort by LSN) and
/// its sequence number.
pub(crate) fn segment_name(first_commit: Lsn, seq: u64) -> String {
    format!("{:016X}-{seq:010}.seg", first_commit.as_u64())
}

/// Parses a segment file name into (first commit LSN, sequence number).
pub(crate) fn parse_segment_name(name: &str) -> Option<(Lsn, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (lsn, seq) = stem.split_once('-')?;
    if lsn.len() != 16 || seq.len() != 10 {
        return None;
    }
    let lsn = u64::from_str_radix(lsn, 16).ok()?;
    let seq = seq.parse().ok()?;
    Some((Lsn::from_u64(lsn), seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort_by_lsn() {
        let a = segment_name(Lsn::from_u64(0x16_B374_D848), 7);
        assert_eq!(a, "00000016B374D848-0000000007.seg");
        assert_eq!(
            parse_segment_name(&a),
            Some((Lsn::from_u64(0x16_B374_D848), 7))
        );
        assert!(segment_name(Lsn::from_u64(0xF), 1) < segment_name(Lsn::from_u64(0x10), 2));
        for bad in [
            "x.seg",
            "0000000000000000-1.seg",
            "000000000000000G-0000000001.seg",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let hdr = BlockHeader {
            crc: 0,
            payload_len: 10,
            raw_len: 20,
            records: 3,
            stored: false,
            first_commit: Lsn::from_u64(5),
            last_commit: Lsn::from_u64(9),
        };
        let payload = [1u8; 10];
        let bytes = hdr.encode(&payload);
        let parsed = BlockHeader::parse(&bytes).unwrap();
        assert!(parsed.crc_ok(&bytes, &payload));
        assert!(!parsed.crc_ok(&bytes, &[2u8; 10]));
        assert_eq!(parsed.records, 3);
        assert!(!parsed.stored);
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(BlockHeader::parse(&bad).is_none());
        // An unknown flag is refused, and so is a stored payload whose length is not raw_len.
        let mut bad = bytes;
        bad[20] = 2;
        assert!(BlockHeader::parse(&bad).is_none());
        let stored = BlockHeader {
            stored: true,
            ..hdr
        };
        assert!(BlockHeader::parse(&stored.encode(&payload)).is_none());
        let stored = BlockHeader {
            payload_len: 20,
            ..stored
        };
        let bytes = stored.encode(&[1u8; 20]);
        assert!(
            BlockHeader::parse(&bytes).is_some_and(|h| h.stored && h.crc_ok(&bytes, &[1u8; 20]))
        );
    }
}
