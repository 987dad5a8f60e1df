//! The retention record: per shard, the first segment retention keeps, written durably BEFORE
//! retention deletes anything in front of it.
//!
//! In: from retention ([`ShardLog::applied`](crate::event::ShardLog::applied)), the sequence
//! number of the shard's oldest segment it keeps and the commit LSN through which it deleted.
//! Out: at open, what retention may have deleted, so that a segment missing at or after
//! `retained_from` (a file removed by hand from the front of a lagging shard's log) is refused
//! instead of being taken for retention.
//!
//! The file `shard-NNNN/retained` is JSON, replaced atomically (temporary file, `sync_data`,
//! rename, directory fsync). A spill directory written by a reshard older than this file has
//! none: its front cannot be checked until the first open writes one. An older reshard that runs retention on a directory that
//! has one leaves it behind; the checkpoint's `deleted_through` then passes the record's, which
//! tells that case apart from a removal by hand.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SpillError;
use crate::localfs::replace_file;
use crate::lsn::Lsn;

/// File name, inside a shard's directory.
const FILE_NAME: &str = "retained";
const TMP_NAME: &str = "retained.tmp";

/// Whether `name` (in a shard's directory) is the record or its temporary file.
pub(crate) fn is_record_file(name: &str) -> bool {
    name == FILE_NAME || name == TMP_NAME
}

/// What retention has released in one shard's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Retained {
    /// Every segment with a lower sequence number may have been deleted by retention; this one
    /// and every later one up to the checkpoint's end must be present.
    pub retained_from: u64,
    /// Commit LSN through which retention deleted records (raw, to stay a plain number).
    pub deleted_through: u64,
}

impl Retained {
    /// The commit LSN through which retention deleted records.
    pub(crate) fn deleted_through(&self) -> Lsn {
        Lsn::from_u64(self.deleted_through)
    }

    /// Reads the record of the shard directory `dir`; `None` when there is none.
    pub(crate) fn read(dir: &Path) -> Result<Option<Retained>, SpillError> {
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(super::io_err("read", &path, e)),
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| SpillError::Corrupt {
                path,
                offset: 0,
                reason: format!("the retention record is not valid ({e}); it is replaced atomically, so this file was edited: restore it, or remove the whole spill directory (the next start proves from the shards' progress whether anything is missing)"),
            })
    }

    /// Durably replaces the record of the shard directory `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), SpillError> {
        let json = serde_json::to_vec(self).map_err(|e| SpillError::Io {
            op: "serialise the retention record for",
            path: dir.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        replace_file(&dir.join(FILE_NAME), &dir.join(TMP_NAME), &json)?;
        Ok(())
    }
}
