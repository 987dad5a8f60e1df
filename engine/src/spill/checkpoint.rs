//! The durable checkpoint: the single fact that makes the spill log's contents safe to
//! acknowledge to the source.
//!
//! In: after every group commit, the new `durable_lsn` and, per shard, the end of that
//! shard's log at that point. Out: at open, the last checkpoint that was completely written.
//!
//! The file `checkpoint` is append-only: each record is `len:u32 crc32c:u32 payload`, made
//! durable with `sync_data` before `flush` returns. A torn last record (a crash while
//! appending) is ignored and cut off; a bad record followed by more data is corruption and an
//! error. When the file grows past [`ROTATE_BYTES`] it is replaced atomically (write a
//! temporary file, `sync_data`, rename, fsync the directory).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{io_err, Pos, Shared, SpillError};
use crate::localfs::{private_file, replace_file};
use crate::lsn::Lsn;

const FILE_NAME: &str = "checkpoint";
const TMP_NAME: &str = "checkpoint.tmp";
const VERSION: u8 = 1;
/// Size past which the checkpoint file is rewritten with just its last record.
const ROTATE_BYTES: u64 = 1 << 20;

/// One shard's part of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardCheckpoint {
    /// End of the shard's log at the durable LSN: everything before it is durable, everything
    /// after it is discarded at open.
    pub end: Pos,
    /// Records with commit LSN at or below this may have been deleted by retention.
    pub deleted_through: Lsn,
}

/// What a checkpoint record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// End LSN of the last transaction that is completely durable in every shard log.
    pub durable: Lsn,
    /// Per shard, in shard order.
    pub shards: Vec<ShardCheckpoint>,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(11 + self.shards.len() * 24);
        p.push(VERSION);
        p.extend_from_slice(&self.durable.as_u64().to_le_bytes());
        p.extend_from_slice(&(self.shards.len() as u16).to_le_bytes());
        for s in &self.shards {
            p.extend_from_slice(&s.end.seq.to_le_bytes());
            p.extend_from_slice(&s.end.offset.to_le_bytes());
            p.extend_from_slice(&s.deleted_through.as_u64().to_le_bytes());
        }
        let mut rec = Vec::with_capacity(8 + p.len());
        rec.extend_from_slice(&(p.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
        rec.extend_from_slice(&p);
        rec
    }

    fn decode(p: &[u8]) -> Option<Checkpoint> {
        let u64_at = |i: usize| -> Option<u64> {
            let s = p.get(i..i + 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Some(u64::from_le_bytes(a))
        };
        if *p.first()? != VERSION {
            return None;
        }
        let durable = Lsn::from_u64(u64_at(1)?);
        let n = u16::from_le_bytes([*p.get(9)?, *p.get(10)?]) as usize;
        if p.len() != 11 + n * 24 {
            return None;
        }
        let shards = (0..n)
            .map(|i| {
                let b = 11 + i * 24;
                Some(ShardCheckpoint {
                    end: Pos {
                        seq: u64_at(b)?,
                        offset: u64_at(b + 8)?,
                    },
                    deleted_through: Lsn::from_u64(u64_at(b + 16)?),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Checkpoint { durable, shards })
    }
}

/// The open checkpoint file.
pub(crate) struct CheckpointFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    rotate_bytes: u64,
}

impl CheckpointFile {
    /// Opens (creating if missing) the checkpoint file in `dir` and returns the last complete
    /// checkpoint, cutting off a torn last record.
    pub(crate) fn open(dir: &Path) -> Result<(CheckpointFile, Option<Checkpoint>), SpillError> {
        let path = dir.join(FILE_NAME);
        let file = private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        let data = std::fs::read(&path).map_err(|e| io_err("read", &path, e))?;
        let mut off = 0usize;
        let mut last = None;
        while off < data.len() {
            let rest = &data[off..];
            let Some(len) = rest
                .get(0..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            else {
                break; // torn length
            };
            let Some(crc) = rest
                .get(4..8)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            else {
                break;
            };
            let Some(payload) = rest.get(8..8 + len) else {
                break; // torn payload
            };
            let end = off + 8 + len;
            let good = crc32c::crc32c(payload) == crc;
            match (good, Checkpoint::decode(payload)) {
                (true, Some(cp)) => last = Some(cp),
                _ if end == data.len() => break, // the last record is torn
                _ => {
                    return Err(SpillError::Corrupt {
                        path,
                        offset: off as u64,
                        reason: "checkpoint record fails its CRC32C but more records follow".into(),
                    })
                }
            }
            off = end;
        }
        if off < data.len() {
            tracing::warn!(
                path = %path.display(),
                offset = off,
                torn_bytes = data.len() - off,
                "cutting off a torn checkpoint record (crash while writing it)"
            );
            file.set_len(off as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("truncate", &path, e))?;
        }
        Ok((
            CheckpointFile {
                dir: dir.to_path_buf(),
                path,
                file,
                len: off as u64,
                rotate_bytes: ROTATE_BYTES,
            },
            last,
        ))
    }

    /// Appends `cp` and makes it durable. With `shared`, a write that finds the filesystem
    /// full waits for space ([`Shared::until_space`]).
    pub(crate) fn append(
        &mut self,
        cp: &Checkpoint,
        shared: Option<&Shared>,
    ) -> Result<(), SpillError> {
        let rec = cp.encode();
        if self.len + rec.len() as u64 > self.rotate_bytes {
            return self.rotate(&rec, shared);
        }
        let (file, len) = (&self.file, self.len);
        let write = || file.write_all_at(&rec, len);
        match shared {
            Some(s) => s.until_space("write", &self.path, rec.len() as u64, write)?,
            None => write().map_err(|e| io_err("write", &self.path, e))?,
        }
        self.file
            .sync_data()
            .map_err(|e| io_err("sync_data", &self.path, e))?;
        self.len += rec.len() as u64;
        Ok(())
    }

    fn rotate(&mut self, rec: &[u8], shared: Option<&Shared>) -> Result<(), SpillError> {
        let tmp = self.dir.join(TMP_NAME);
        self.file = match shared {
            // Safe to repeat: the temporary file is truncated and written whole each time.
            Some(s) => s.until_space("replace", &self.path, rec.len() as u64, || {
                replace_file(&self.path, &tmp, rec).map_err(|e| e.source)
            })?,
            None => replace_file(&self.path, &tmp, rec)?,
        };
        self.len = rec.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(durable: u64) -> Checkpoint {
        Checkpoint {
            durable: Lsn::from_u64(durable),
            shards: vec![
                ShardCheckpoint {
                    end: Pos {
                        seq: 1,
                        offset: durable * 10,
                    },
                    deleted_through: Lsn::ZERO,
                };
                3
            ],
        }
    }

    #[test]
    fn torn_last_record_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, none) = CheckpointFile::open(dir.path()).unwrap();
        assert!(none.is_none());
        f.append(&cp(1), None).unwrap();
        let one = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        f.append(&cp(2), None).unwrap();
        drop(f);
        let full = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        for cut in one..full.len() as u64 {
            std::fs::write(dir.path().join(FILE_NAME), &full[..cut as usize]).unwrap();
            let (_, got) = CheckpointFile::open(dir.path()).unwrap();
            assert_eq!(got, Some(cp(1)), "cut at {cut}");
            assert_eq!(
                std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
                one
            );
        }
    }

    #[test]
    fn bad_record_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = CheckpointFile::open(dir.path()).unwrap();
        f.append(&cp(1), None).unwrap();
        f.append(&cp(2), None).unwrap();
        drop(f);
        let mut data = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        data[10] ^= 0xff;
        std::fs::write(dir.path().join(FILE_NAME), &data).unwrap();
        let err = CheckpointFile::open(dir.path()).err().unwrap();
        assert!(
            matches!(err, SpillError::Corrupt { offset: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn rotation_keeps_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = CheckpointFile::open(dir.path()).unwrap();
        f.rotate_bytes = 500;
        for i in 0..40 {
            f.append(&cp(i), None).unwrap();
        }
        drop(f);
        assert!(std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len() <= 500);
        assert!(!dir.path().join(TMP_NAME).exists());
        let (_, got) = CheckpointFile::open(dir.path()).unwrap();
        assert_eq!(got, Some(cp(39)));
    }
}
