//! Spill log: the local, durable, compressed buffer between route and apply.
//!
//! In: committed source transactions, already routed: the ingest calls
//! [`SpillWriter::append`] for each `(shard, event)` of a transaction (Begin, Change*, Commit
//! per touched shard), then [`SpillWriter::end_txn`], and every few milliseconds
//! [`SpillWriter::commit`] (group commit). Out: per shard, a [`SpillReader`] (through the
//! [`ShardLog`](crate::event::ShardLog) trait implemented by [`SpillLog`]) delivering that
//! shard's events in commit order, plus [`ShardEvent::Heartbeat`](crate::event::ShardEvent)
//! when the shard is idle; and the durable LSN the ingest may confirm to the slot.
//!
//! Invariants kept here:
//! - **Durable before acknowledged.** A group commit ([`SpillWriter::commit`], or
//!   [`SpillWriter::flush`] which also waits) seals the open blocks, `sync_data`s every shard
//!   log written since the last one, and only then appends the new durable LSN to the
//!   checkpoint file (and syncs it). The fsyncs run on a syncer thread, one group commit in
//!   flight at a time, so appends continue while the disk works and the next group is
//!   whatever arrived meanwhile. At open, everything after the checkpoint is cut off, since
//!   the source re-sends it.
//! - **Nothing unapplied is deleted.** A segment is removed only when its shard has applied
//!   everything in it ([`ShardLog::applied`](crate::event::ShardLog::applied)); at the size
//!   cap the writer reports [`SpillWriter::over_cap`] and the ingest pauses instead.
//! - **Bounded memory.** Records stream into blocks of `block_bytes`; a transaction of any
//!   size never sits whole in memory, on either side. The in-memory tail that serves
//!   caught-up readers is capped at `memory_tail_bytes`.
//! - **No silent skip.** A torn tail is cut off at open; a bad frame followed by good data, or
//!   a missing segment, is a [`SpillError::Corrupt`] / [`SpillError::MissingSegment`] naming
//!   the file and offset. Retention records the first segment it keeps before deleting any in
//!   front of it, so segments missing at the front of a log that retention did not release
//!   are [`SpillError::FrontSegmentsMissing`].
//!
//! How the ingest drives the writer (on its blocking thread):
//!
//! ```text
//! let (mut w, report) = SpillWriter::open(opts, identity)?;  // resume the slot at report.durable_lsn
//! let log = w.log();                                          // one clone per shard's apply task
//! for each committed source transaction:
//!     if w.over_cap(spool) { pause reading }                 // between transactions only
//!     per touched shard: append(Begin), append(Change)*, append(Commit)
//!     w.end_txn(commit.end_lsn)
//!     if w.flush_due() { w.commit()? }                        // group commit, not waiting
//! meanwhile: confirm log.durable_watch() values to the slot as flush_lsn
//! source dropped mid-transaction: w.abort_incomplete()        // readers past it get CutBack
//! ```
//!
//! Heartbeats: a reader that has delivered every frame and is outside a transaction yields
//! `Heartbeat(durable_lsn - 1)` once that is past the last LSN it reported. Not
//! `durable_lsn` itself: the durable LSN is the *end* of the last durable commit record, and
//! the next transaction's commit record may start exactly there, so only LSNs strictly below
//! it are known to hold nothing more for the shard (a progress row at `durable_lsn` could make
//! a restarted reader skip that transaction).
//!
//! The directory (0700, files 0600) records the migration it belongs to and the LSN from which
//! it holds every transaction ([`SpillWriter::record_lineage`]); the runtime's start-up proof
//! (`startup`) compares them with the slot and every shard's progress row before streaming.
//!
//! Layout of `[spill] dir`:
//!
//! ```text
//! lock                              flock'ed by the one writer process
//! identity                          source system id, slot, shard names, migration id, start LSN (JSON)
//! checkpoint                        append-only CRC-framed durable checkpoints
//! shard-0000/<first commit LSN>-<seq>.seg   segments of shard 0: frames, zstd or stored (see `block`)
//! shard-0000/retained               first segment retention keeps (JSON, see `retained`)
//! shard-0001/…
//! ```
//!
//! Threading: [`SpillWriter`] is synchronous (plain files, explicit `sync_data`): run it on a
//! dedicated thread or inside `spawn_blocking`. It owns one helper thread, `spill-sync`, for
//! group commits. [`SpillWriter::wait_for_space`] and
//! [`SpillReader::next`](crate::event::ShardReader::next) are async and never hold a lock
//! across an `.await`. Readers read sealed frames with positioned reads (`pread`) of at most
//! one block.

mod block;
mod checkpoint;
pub mod codec;
mod reader;
mod retained;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::config::SpillConfig;
use crate::error::{Classify, ErrorClass};
use crate::event::ShardId;
use crate::lsn::Lsn;

pub use codec::CodecError;
pub use reader::{SpillLog, SpillReader};
pub use writer::{
    lock_spill_dir, read_identity, DirLock, OpenReport, ShardOpenReport, SpillWriter,
};

/// Uncompressed size of a block (512 KiB): a tuning constant, not a config key.
pub const DEFAULT_BLOCK_BYTES: usize = 512 << 10;

/// The spill log's settings: `[spill]` ([`SpillConfig`]) plus the block size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillOptions {
    /// Directory of the spill log. Must be on a local disk that honours fsync; it belongs to
    /// one source and slot (see the `identity` file).
    pub dir: PathBuf,
    /// Size at which a shard's segment file is sealed and a new one started. Retention deletes
    /// whole segments.
    pub segment_bytes: u64,
    /// Cap on the bytes of all segments together. At the cap the ingest stops reading from the
    /// source until shards drain.
    pub max_bytes: u64,
    /// Uncompressed size at which a block of records is compressed and written. Default
    /// [`DEFAULT_BLOCK_BYTES`]. Bounds the writer's and each reader's memory.
    pub block_bytes: usize,
    /// zstd level of the blocks, 1..=9.
    pub zstd_level: i32,
    /// Bytes of recent uncompressed blocks kept in memory (all shards together) so caught-up
    /// readers do not read files; 0 disables the tail.
    pub memory_tail_bytes: u64,
    /// How often the ingest should group-commit ([`SpillWriter::flush_due`]).
    pub flush_interval_ms: u64,
}

impl From<&SpillConfig> for SpillOptions {
    /// The one place `[spill]` becomes the spill log's options.
    fn from(c: &SpillConfig) -> SpillOptions {
        SpillOptions {
            dir: c.dir.clone(),
            segment_bytes: c.segment_bytes,
            max_bytes: c.max_bytes,
            block_bytes: DEFAULT_BLOCK_BYTES,
            zstd_level: c.zstd_level,
            memory_tail_bytes: c.memory_tail_bytes,
            flush_interval_ms: c.flush_interval_ms,
        }
    }
}

impl Default for SpillOptions {
    /// The `[spill]` defaults ([`SpillConfig::default`]).
    fn default() -> SpillOptions {
        SpillOptions::from(&SpillConfig::default())
    }
}

impl SpillOptions {
    /// Checks the ranges; the error names the config key.
    pub fn validate(&self) -> Result<(), SpillError> {
        let bad = |key: &'static str, msg: String| Err(SpillError::Config { key, msg });
        if !(4096..=(64 << 20)).contains(&self.block_bytes) {
            return bad(
                "[spill] block_bytes",
                format!("{} is outside 4096..=67108864", self.block_bytes),
            );
        }
        if self.segment_bytes < 2 * self.block_bytes as u64 {
            return bad(
                "[spill] segment_bytes",
                format!(
                    "{} must be at least twice [spill] block_bytes ({})",
                    self.segment_bytes, self.block_bytes
                ),
            );
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return bad(
                "[spill] max_bytes",
                format!(
                    "{} must be at least twice [spill] segment_bytes ({})",
                    self.max_bytes, self.segment_bytes
                ),
            );
        }
        if !(1..=9).contains(&self.zstd_level) {
            return bad(
                "[spill] zstd_level",
                format!("{} is outside 1..=9", self.zstd_level),
            );
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 10_000 {
            return bad(
                "[spill] flush_interval_ms",
                format!("{} is outside 1..=10000", self.flush_interval_ms),
            );
        }
        Ok(())
    }
}

/// Whose data a spill directory holds. Stored in `<dir>/identity` when the directory is
/// created and checked at every open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpillIdentity {
    /// The source's system identifier (`IDENTIFY_SYSTEM`'s `systemid`).
    pub system_id: String,
    /// The replication slot name.
    pub slot: String,
    /// The shard names, in shard order (the index is the [`ShardId`]).
    pub shards: Vec<String>,
}

/// Errors of the spill log.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// A file operation failed.
    #[error("spill log: cannot {op} {path}: {source}; check that the disk is mounted, writable and not full")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process (or another writer in this one) has the directory open.
    #[error("spill directory {dir} is in use by another reshard process (its lock file is held): stop that process, or point [spill] dir elsewhere")]
    Locked {
        /// The spill directory.
        dir: PathBuf,
    },
    /// The directory belongs to another source or slot.
    #[error("spill directory {dir} belongs to source {found_system_id} slot {found_slot}, not {system_id}/{slot}: point [spill] dir elsewhere or remove it after checking nothing unapplied is in it")]
    IdentityMismatch {
        /// The spill directory.
        dir: PathBuf,
        /// System id recorded in the directory.
        found_system_id: String,
        /// Slot recorded in the directory.
        found_slot: String,
        /// System id of this run.
        system_id: String,
        /// Slot of this run.
        slot: String,
    },
    /// The directory was written for another list of shards.
    #[error("spill directory {dir} was written for shards {found:?}, but the config lists {expected:?}: shard logs are per shard index, so the shard list cannot change while data is spilled; restore the old [[shards]] list until every shard has applied its log, or point [spill] dir elsewhere")]
    ShardsMismatch {
        /// The spill directory.
        dir: PathBuf,
        /// Shards recorded in the directory.
        found: Vec<String>,
        /// Shards of this run.
        expected: Vec<String>,
    },
    /// A file of the spill log holds bytes that cannot be what the writer wrote.
    #[error("spill file {path} is corrupt at offset {offset}: {reason}. This data was already confirmed to the source and cannot be re-read from it: restore the file from a backup, or re-copy the affected shard; reshard never skips it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the bad frame or record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment between two existing ones is missing.
    #[error("spill log of shard {shard} is missing segment {seq} (in {dir}), while later segments exist: the log has a hole; restore the file, or re-copy the shard; reshard never skips it")]
    MissingSegment {
        /// The shard.
        shard: ShardId,
        /// Sequence number of the missing segment.
        seq: u64,
        /// The shard's directory.
        dir: PathBuf,
    },
    /// A shard's newest segment, which the durable checkpoint says holds data, is gone (with
    /// every earlier one): the segment files were removed by hand.
    #[error("spill log of shard {shard} has lost its newest segment {seq} (in {dir}): the durable checkpoint says it holds transactions already confirmed to the source, which sends them no more, and retention never deletes a shard's newest segment, so its files were removed; reshard never skips them. Restore the files; or, if the shard may have applied everything, remove the whole spill directory: the next start proves from the shards' progress whether anything is missing")]
    NewestSegmentMissing {
        /// The shard.
        shard: ShardId,
        /// Sequence number of the missing segment.
        seq: u64,
        /// The shard's directory.
        dir: PathBuf,
    },
    /// Segments at the front of a shard's log are gone although retention never released
    /// them (its record says so): files were removed by hand.
    #[error("spill log of shard {shard} has lost segments {first_missing}..={last_missing} at the front of its log (in {dir}): retention deleted only the transactions through {after}, so the ones committed after {after} and before {before}, already confirmed to the source (which sends them no more), are not on disk; the files were removed by hand and reshard never skips them. Restore the files; or, if the shard may have applied everything, remove the whole spill directory: the next start proves from the shards' progress whether anything is missing")]
    FrontSegmentsMissing {
        /// The shard.
        shard: ShardId,
        /// The shard's directory.
        dir: PathBuf,
        /// Sequence number of the first missing segment.
        first_missing: u64,
        /// Sequence number of the last missing segment.
        last_missing: u64,
        /// Retention deleted the records with commit LSN at or below this.
        after: Lsn,
        /// First commit LSN of the oldest segment still present.
        before: Lsn,
    },
    /// A shard log is shorter than the durable checkpoint says.
    #[error("spill segment {path} has {have} bytes but the durable checkpoint says {need}: data confirmed to the source is lost (disk or filesystem lost synced writes); re-copy the shard, or restore the spill directory from a backup")]
    DurableDataLost {
        /// The segment file.
        path: PathBuf,
        /// Its valid length.
        have: u64,
        /// What the checkpoint recorded.
        need: u64,
    },
    /// A reader asked for data that retention already deleted.
    #[error("shard {shard} asks for transactions after {after}, but the spill log already deleted everything up to {deleted_through} once the shard had applied it: the shard's progress went backwards (target restored from a backup?); re-copy the shard")]
    Discarded {
        /// The shard.
        shard: ShardId,
        /// Where the reader wanted to start.
        after: Lsn,
        /// What retention had deleted.
        deleted_through: Lsn,
    },
    /// The log was cut back to the last complete transaction after the reader had read past
    /// it (the source connection dropped in the middle of a transaction).
    #[error("spill log of shard {shard} was cut back to the last complete transaction (source reconnected in the middle of a transaction) after this reader had read past it: roll back and reopen the reader after the shard's durable progress")]
    CutBack {
        /// The shard.
        shard: ShardId,
    },
    /// A shard index outside the configured shards.
    #[error("shard {shard} does not exist: the spill log has {count} shards")]
    UnknownShard {
        /// The shard asked for.
        shard: ShardId,
        /// How many shards the log has.
        count: usize,
    },
    /// The ingest called the writer out of protocol (a bug in the caller).
    #[error("spill writer misuse on shard {shard}: {msg}")]
    Protocol {
        /// The shard.
        shard: ShardId,
        /// What was wrong.
        msg: String,
    },
    /// A previous write failed half-way; the writer must be reopened (which recovers from the
    /// last durable checkpoint).
    #[error(
        "spill writer stopped: {reason}; reopen it (recovery resumes from durable LSN {durable})"
    )]
    WriterFailed {
        /// The durable LSN to resume from.
        durable: Lsn,
        /// What failed.
        reason: String,
    },
    /// A `[spill]` setting is out of range.
    #[error("invalid {key}: {msg}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// The `op` of a [`SpillError::Io`] creating the spill directory (or a shard's directory in it).
pub(crate) const CREATE_DIR: &str = "create the directory";

impl Classify for SpillError {
    fn class(&self) -> ErrorClass {
        match self {
            // No retry fixes a path that is a file or a directory reshard may not write: a
            // start-up would wait for `--start-retry-secs` (as if a server were restarting)
            // before saying so.
            SpillError::Io { op, source, .. }
                if *op == CREATE_DIR
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::AlreadyExists
                            | std::io::ErrorKind::NotADirectory
                            | std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
            {
                ErrorClass::Definite
            }
            SpillError::Io { .. }
            | SpillError::CutBack { .. }
            | SpillError::WriterFailed { .. } => ErrorClass::Transient,
            SpillError::Locked { .. }
            | SpillError::IdentityMismatch { .. }
            | SpillError::ShardsMismatch { .. }
            | SpillError::Corrupt { .. }
            | SpillError::MissingSegment { .. }
            | SpillError::NewestSegmentMissing { .. }
            | SpillError::FrontSegmentsMissing { .. }
            | SpillError::DurableDataLost { .. }
            | SpillError::Discarded { .. }
            | SpillError::UnknownShard { .. }
            | SpillError::Protocol { .. }
            | SpillError::Config { .. } => ErrorClass::Definite,
        }
    }
}

/// What the status page and `/metrics` show about the spill log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpillStats {
    /// Bytes of all segment files.
    pub bytes_on_disk: u64,
    /// Number of segment files.
    pub segments: u64,
    /// End LSN of the last transaction durable in every shard log.
    pub durable_lsn: Lsn,
    /// The ingest is paused because `bytes_on_disk >= max_bytes`, or because the filesystem
    /// is full ([`SpillStats::disk_full`]).
    pub backpressure_active: bool,
    /// The ingest is paused because a write found the spill filesystem full (ENOSPC or
    /// EDQUOT): it waits until shards apply and retention frees segments.
    pub disk_full: bool,
    /// Group commits that synced something.
    pub fsyncs_total: u64,
    /// `sync_data` calls on files (segments and checkpoint) over all group commits.
    pub file_syncs_total: u64,
    /// Transactions made durable.
    pub txns_total: u64,
    /// `txns_total / fsyncs_total`: the group-commit group size.
    pub txns_per_fsync_avg: f64,
    /// Uncompressed record bytes appended.
    pub appended_bytes_total: u64,
    /// Frame bytes written (headers and payloads, compressed or stored).
    pub written_bytes_total: u64,
    /// Frames (blocks) written.
    pub blocks_total: u64,
    /// Of those, frames stored uncompressed because their shard's reader was taking them from
    /// the memory tail.
    pub stored_blocks_total: u64,
    /// Per shard, in shard order.
    pub shards: Vec<ShardSpillStats>,
}

/// One shard's part of [`SpillStats`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardSpillStats {
    /// Shard name.
    pub name: String,
    /// Bytes of this shard's segments.
    pub bytes: u64,
    /// Number of this shard's segments.
    pub segments: u64,
    /// Highest commit LSN the shard reported applied.
    pub applied_lsn: Lsn,
    /// First commit LSN still on disk for this shard (start of its oldest segment), if any.
    pub oldest_retained_lsn: Option<Lsn>,
    /// Where the shard's backlog starts, if it has one: the first commit LSN of its oldest
    /// segment not fully applied, or its applied LSN when that segment is partly applied.
    pub oldest_unapplied_lsn: Option<Lsn>,
    /// Newest commit LSN written for this shard, if known.
    pub newest_lsn: Option<Lsn>,
    /// Records with commit LSN at or below this were deleted after being applied.
    pub deleted_through: Lsn,
    /// Blocks readers read from segment files.
    pub file_block_reads: u64,
    /// Blocks readers took from the in-memory tail.
    pub memory_block_reads: u64,
}

/// A position in one shard's log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub seq: u64,
    pub offset: u64,
}

/// What the shared state knows about one segment file.
#[derive(Debug, Clone)]
pub(crate) struct SegMeta {
    /// Commit LSN of its first record (also in its file name).
    pub first_commit: Lsn,
    /// Commit LSN of its last record, when known (written in this process or scanned).
    pub last_commit: Option<Lsn>,
    /// Valid bytes (frames completely written).
    pub bytes: u64,
    /// No more frames will be appended.
    pub sealed: bool,
}

/// A block the writer sealed recently, kept uncompressed for caught-up readers.
#[derive(Debug)]
pub(crate) struct TailBlock {
    pub pos: Pos,
    pub next: Pos,
    pub first_commit: Lsn,
    pub last_commit: Lsn,
    pub raw: Bytes,
}

/// State of one shard log shared by the writer and its readers.
pub(crate) struct ShardShared {
    pub dir: PathBuf,
    pub segments: BTreeMap<u64, SegMeta>,
    /// End of the last frame written.
    pub end: Pos,
    pub tail: VecDeque<Arc<TailBlock>>,
    pub tail_bytes: u64,
    pub applied: Lsn,
    pub deleted_through: Lsn,
    /// Incremented by every cut-back; readers compare it with theirs.
    pub epoch: u64,
    /// Recent cut-backs: (epoch after the cut, position cut back to).
    pub cuts: VecDeque<(u64, Pos)>,
    pub file_block_reads: u64,
    pub memory_block_reads: u64,
    /// Where this shard's furthest reader will take its next frame (set when it looks for
    /// one): how far behind the writer the reader is decides whether a new block is worth
    /// compressing (see `SpillWriter::write_block`).
    pub read_pos: Option<Pos>,
}

impl ShardShared {
    /// Bytes of frames written after `read_pos`; `None` if no reader has looked yet.
    pub(crate) fn reader_lag(&self) -> Option<u64> {
        let r = self.read_pos?;
        if r.seq == self.end.seq {
            return Some(self.end.offset.saturating_sub(r.offset));
        }
        let bytes: u64 = self
            .segments
            .range(r.seq..=self.end.seq)
            .map(|(_, m)| m.bytes)
            .sum();
        Some(bytes.saturating_sub(r.offset))
    }

    /// Newest commit LSN in this shard's segments, if known.
    pub(crate) fn newest_commit(&self) -> Option<Lsn> {
        self.segments
            .values()
            .next_back()
            .and_then(|m| m.last_commit.or(Some(m.first_commit)))
    }

    /// Whether the log holds something this shard has not applied yet.
    pub(crate) fn has_unapplied(&self) -> bool {
        self.newest_commit().is_some_and(|n| n > self.applied)
    }
}

/// Counters of the writer.
#[derive(Default)]
pub(crate) struct Counters {
    pub fsyncs_total: u64,
    pub file_syncs_total: u64,
    pub txns_total: u64,
    pub appended_bytes_total: u64,
    pub written_bytes_total: u64,
    pub blocks_total: u64,
    pub stored_blocks_total: u64,
}

/// Everything the writer shares with readers and the retention side.
pub(crate) struct State {
    pub durable: Lsn,
    pub shards: Vec<ShardShared>,
    pub bytes_on_disk: u64,
    pub backpressure: bool,
    pub counters: Counters,
    /// A group commit is with the syncer thread.
    pub sync_in_flight: bool,
    /// The syncer failed; the writer must be reopened.
    pub sync_error: Option<String>,
    /// A write found the filesystem full (ENOSPC, EDQUOT) and waits for space: reading from
    /// the source is paused meanwhile.
    pub disk_full: bool,
    /// What the full-disk waits logged ([`Shared::until_space`]).
    pub full_disk_log: FullDiskLog,
}

/// Least time between two WARNs about a full spill filesystem: the first of a wait, then a
/// reminder while it lasts; a wait that starts sooner after the last WARN (the disk at the
/// edge) is not announced again.
pub(crate) const FULL_DISK_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The full-disk log's memory, across the writes that wait ([`Shared::until_space`]).
#[derive(Debug, Default)]
pub(crate) struct FullDiskLog {
    /// When the last WARN was logged.
    pub warned_at: Option<std::time::Instant>,
    /// A WARN announced the current (or last) wait and no INFO said it ended yet.
    pub announced: bool,
}

pub(crate) struct Shared {
    pub opts: SpillOptions,
    pub identity: SpillIdentity,
    pub state: Mutex<State>,
    /// Per shard: woken when frames of that shard are written or its log is cut back; every
    /// one when the durable LSN moves ([`Shared::wake_readers`]).
    pub data: Vec<tokio::sync::Notify>,
    /// Woken when retention frees space.
    pub space: tokio::sync::Notify,
    /// Signalled (with `state`) when a group commit finishes.
    pub synced: std::sync::Condvar,
    /// The durable LSN, for the ingest to confirm to the slot.
    pub durable_tx: tokio::sync::watch::Sender<Lsn>,
    /// Per shard: the cut-back epoch, readable without the lock.
    pub epochs: Vec<AtomicU64>,
    /// Per shard: held for one retention step (record, then file deletions).
    pub retention: Vec<Mutex<()>>,
    /// While set, a write waiting for space gives up (the daemon is stopping).
    pub stop: std::sync::OnceLock<crate::shutdown::ShutdownRx>,
    /// Held to make the reserve file, and by retention from freeing it to the end of the
    /// removals it made room for: no writer takes that room back in between.
    pub reserve: Mutex<()>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping would; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the readers of every shard (the durable LSN moved: idle readers may yield a
    /// heartbeat).
    pub(crate) fn wake_readers(&self) {
        for n in &self.data {
            n.notify_waiters();
        }
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.identity.shards.len()
    }

    /// Memory-tail budget of one shard.
    pub(crate) fn tail_budget(&self) -> u64 {
        self.opts.memory_tail_bytes / self.shard_count().max(1) as u64
    }

    pub(crate) fn segment_path(&self, shard: usize, seq: u64, first_commit: Lsn) -> PathBuf {
        block::shard_dir(&self.opts.dir, shard).join(block::segment_name(first_commit, seq))
    }

    /// Stats snapshot.
    pub(crate) fn stats(&self) -> SpillStats {
        let st = self.lock();
        let c = &st.counters;
        let shards: Vec<ShardSpillStats> = st
            .shards
            .iter()
            .zip(&self.identity.shards)
            .map(|(s, name)| {
                let newest = s.newest_commit();
                let oldest = s.segments.values().next().map(|m| m.first_commit);
                let oldest_unapplied = s
                    .segments
                    .values()
                    .find(|m| m.last_commit.is_none_or(|l| l > s.applied))
                    .map(|m| m.first_commit.max(s.applied))
                    .filter(|_| newest.is_some_and(|n| n > s.applied));
                ShardSpillStats {
                    name: name.clone(),
                    bytes: s.segments.values().map(|m| m.bytes).sum(),
                    segments: s.segments.len() as u64,
                    applied_lsn: s.applied,
                    oldest_retained_lsn: oldest,
                    oldest_unapplied_lsn: oldest_unapplied,
                    newest_lsn: newest,
                    deleted_through: s.deleted_through,
                    file_block_reads: s.file_block_reads,
                    memory_block_reads: s.memory_block_reads,
                }
            })
            .collect();
        SpillStats {
            bytes_on_disk: st.bytes_on_disk,
            segments: shards.iter().map(|s| s.segments).sum(),
            durable_lsn: st.durable,
            backpressure_active: st.backpressure || st.disk_full,
            disk_full: st.disk_full,
            fsyncs_total: c.fsyncs_total,
            file_syncs_total: c.file_syncs_total,
            txns_total: c.txns_total,
            txns_per_fsync_avg: if c.fsyncs_total == 0 {
                0.0
            } else {
                c.txns_total as f64 / c.fsyncs_total as f64
            },
            appended_bytes_total: c.appended_bytes_total,
            written_bytes_total: c.written_bytes_total,
            blocks_total: c.blocks_total,
            stored_blocks_total: c.stored_blocks_total,
            shards,
        }
    }

    /// Whether reading should pause at the cap: the log plus `extra` bytes (the ingest's
    /// spool of streamed transactions) reach `max_bytes`, and some shard has not applied
    /// everything in the log, so that applying can free space. When every shard has applied
    /// everything, pausing could free nothing (the last segment of each shard stays, and a
    /// spool only shrinks by reading on) and would never end: reading goes on over the cap.
    /// Logs once when backpressure starts and once when it ends.
    pub(crate) fn over_cap(&self, extra: u64) -> bool {
        let mut st = self.lock();
        let bytes = st.bytes_on_disk + extra;
        let over = bytes >= self.opts.max_bytes && st.shards.iter().any(|s| s.has_unapplied());
        if over && !st.backpressure {
            st.backpressure = true;
            tracing::warn!(
                bytes_on_disk = st.bytes_on_disk,
                spool_bytes = extra,
                max_bytes = self.opts.max_bytes,
                dir = %self.opts.dir.display(),
                "spill log reached [spill] max_bytes: pausing reads from the source until shards apply their backlog"
            );
        } else if !over && st.backpressure {
            st.backpressure = false;
            tracing::info!(
                bytes_on_disk = st.bytes_on_disk,
                spool_bytes = extra,
                max_bytes = self.opts.max_bytes,
                "spill log below [spill] max_bytes again (or nothing left to apply): resuming reads from the source"
            );
        }
        over
    }

    /// Wakes waiters after retention freed space.
    pub(crate) fn release_space(&self, _st: &mut State) {
        self.space.notify_waiters();
    }

    /// Resolves once reading may go on ([`Shared::over_cap`] with no spool). Cancel-safe.
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.over_cap(0) {
                return;
            }
            notified.await;
        }
    }
}

/// Whether `e` says the filesystem is full (ENOSPC) or the user's disk quota is used up
/// (EDQUOT): the write can succeed once something frees space.
pub(crate) fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// [`is_out_of_space`] of a spill I/O error.
pub(crate) fn spill_out_of_space(e: &SpillError) -> bool {
    matches!(e, SpillError::Io { source, .. } if is_out_of_space(source))
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir` (`statvfs`
/// `f_bavail * f_frsize`), `None` if it cannot be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Name of the reserve file in `[spill] dir`: a little space held back so that retention can
/// record what it releases (a small file) when the filesystem is full, and so free the
/// segments the full disk is waiting for.
const RESERVE_NAME: &str = "reserve";
const RESERVE_BYTES: usize = 256 << 10;

impl Shared {
    /// Runs `f` (a positional write of `bytes` bytes, or a file creation, safe to repeat) until
    /// it does not fail for lack of space. Meanwhile reading from the source is paused (the
    /// caller is the ingest's writer), the status shows it (`disk_full`), shards keep applying
    /// and retention frees their applied segments. Gives up (the I/O error) when the daemon
    /// stops. Never used for `sync_data`: after a failed fsync the kernel may have dropped the
    /// dirty pages, so repeating it could report durable what is not.
    ///
    /// The log ([`FullDiskLog`]): one WARN when a wait starts (the directory, the bytes the
    /// write needs, the free bytes, the fix), a reminder while it lasts, never two WARNs within
    /// [`FULL_DISK_WARN_EVERY`] (a disk at the edge lets one write through and stops the next:
    /// each such wait is not worth a line of its own), and one INFO when writing resumes after
    /// a wait that was announced.
    pub(crate) fn until_space<T>(
        &self,
        op: &'static str,
        path: &Path,
        bytes: u64,
        mut f: impl FnMut() -> std::io::Result<T>,
    ) -> Result<T, SpillError> {
        let mut since: Option<std::time::Instant> = None;
        let mut reserve_warned = false;
        loop {
            // After a full-disk wait, the reserve comes back before the write that resumes
            // reading: that write could take the space retention just freed, and without the
            // reserve the next full disk would leave retention unable to record what it
            // releases (its segments then stay, and reading stays paused for good).
            if since.is_some() {
                match self.make_reserve() {
                    Ok(()) => {}
                    Err(e) if spill_out_of_space(&e) => {
                        if self.stop.get().is_some_and(|s| s.is_requested()) {
                            return Err(e);
                        }
                        self.full_disk_note(since, op, path, bytes, &e.to_string());
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        continue;
                    }
                    Err(e) => {
                        if !reserve_warned {
                            reserve_warned = true;
                            tracing::warn!(error = %e, "cannot make the spill directory's reserve file: going on without it (a full disk may then need space freed by hand)");
                        }
                    }
                }
            }
            match f() {
                Ok(v) => {
                    if let Some(t) = since {
                        let announced = {
                            let mut st = self.lock();
                            st.disk_full = false;
                            std::mem::take(&mut st.full_disk_log.announced)
                        };
                        self.space.notify_waiters();
                        if announced {
                            tracing::info!(
                                dir = %self.opts.dir.display(),
                                waited_secs = t.elapsed().as_secs(),
                                free_bytes = free_bytes(&self.opts.dir),
                                "spill directory has space again: resuming reads from the source"
                            );
                        } else {
                            tracing::debug!(dir = %self.opts.dir.display(), waited_ms = t.elapsed().as_millis() as u64, "spill directory has space again (a short wait within the full-disk WARN's interval)");
                        }
                    }
                    return Ok(v);
                }
                Err(e) if is_out_of_space(&e) => {
                    if self.stop.get().is_some_and(|s| s.is_requested()) {
                        return Err(io_err(op, path, e));
                    }
                    if since.is_none() {
                        since = Some(std::time::Instant::now());
                        self.lock().disk_full = true;
                    }
                    self.full_disk_note(since, op, path, bytes, &e.to_string());
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => return Err(io_err(op, path, e)),
            }
        }
    }

    /// Logs a full-disk wait that started at `since`, as [`FullDiskLog`] allows: the first
    /// WARN of a wait, or a reminder, at most once per [`FULL_DISK_WARN_EVERY`].
    fn full_disk_note(
        &self,
        since: Option<std::time::Instant>,
        op: &'static str,
        path: &Path,
        bytes: u64,
        error: &str,
    ) {
        let now = std::time::Instant::now();
        let waited_secs = since.map_or(0, |t| now.duration_since(t).as_secs());
        let bytes_on_disk = {
            let mut st = self.lock();
            let log = &mut st.full_disk_log;
            if log
                .warned_at
                .is_some_and(|t| now.duration_since(t) < FULL_DISK_WARN_EVERY)
            {
                return;
            }
            log.warned_at = Some(now);
            log.announced = true;
            st.bytes_on_disk
        };
        const FIX: &str = "fix: free space on that filesystem, or set [spill] max_bytes below its free space, or move [spill] dir to a larger disk";
        if waited_secs == 0 {
            tracing::warn!(
                dir = %self.opts.dir.display(),
                op,
                path = %path.display(),
                error,
                needed_bytes = bytes,
                free_bytes = free_bytes(&self.opts.dir),
                bytes_on_disk,
                max_bytes = self.opts.max_bytes,
                "spill directory's filesystem is full: pausing reads from the source until shards apply their backlog and retention frees segments (nothing is lost; reading resumes by itself); {FIX}"
            );
        } else {
            tracing::warn!(
                dir = %self.opts.dir.display(),
                op,
                path = %path.display(),
                needed_bytes = bytes,
                free_bytes = free_bytes(&self.opts.dir),
                bytes_on_disk,
                waited_secs,
                "spill directory's filesystem is still full: reads from the source stay paused until shards apply their backlog and retention frees segments; {FIX}"
            );
        }
    }

    /// Creates the reserve file if it is missing (a full disk leaves it out: a full-disk wait
    /// then goes on until retention makes room for it).
    pub(crate) fn make_reserve(&self) -> Result<(), SpillError> {
        let _held = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.opts.dir.join(RESERVE_NAME);
        if path.exists() {
            return Ok(());
        }
        crate::localfs::replace_file(
            &path,
            &self.opts.dir.join("reserve.tmp"),
            &vec![0u8; RESERVE_BYTES],
        )
        .map(drop)
        .map_err(|e| {
            let _ = std::fs::remove_file(self.opts.dir.join("reserve.tmp"));
            SpillError::from(e)
        })
    }

    /// Removes the reserve file (the filesystem is full and retention needs room to record
    /// what it releases). Returns whether there was one.
    pub(crate) fn free_reserve(&self) -> bool {
        std::fs::remove_file(self.opts.dir.join(RESERVE_NAME)).is_ok()
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> SpillError {
    SpillError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl From<crate::localfs::FileError> for SpillError {
    fn from(e: crate::localfs::FileError) -> SpillError {
        SpillError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// fsyncs a directory so that created, renamed or removed entries are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpillError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// Why `[spill] dir` cannot be used at all: a path that is a file, lies under a file, cannot be
/// created (e.g. under `/proc`) or is a directory reshard may not write. An operator mistake
/// that no retry fixes (a full filesystem is not one: the spill log waits for space).
#[derive(Debug, thiserror::Error)]
#[error("{}; {}", self.detail(), UnusableDir::FIX)]
pub struct UnusableDir {
    /// The resolved `[spill] dir`.
    pub dir: PathBuf,
    /// The step that failed.
    pub op: &'static str,
    /// The path it failed on (the directory, a parent, or the probe file).
    pub path: PathBuf,
    /// The OS error (in the message, not a `source`: printed once).
    pub os_error: std::io::Error,
}

impl UnusableDir {
    /// What to do about it.
    pub const FIX: &'static str = "set [spill] dir to a directory reshard can create and write \
         (or make the path a directory the user reshard runs as may write)";

    /// What is wrong, without the fix.
    pub fn detail(&self) -> String {
        format!(
            "[spill] dir {} cannot be used: could not {} {}: {}",
            self.dir.display(),
            self.op,
            self.path.display(),
            self.os_error
        )
    }
}

/// Name of the file [`probe_dir`] writes and removes.
const PROBE_NAME: &str = ".reshard-probe";

/// Proves `dir` (the resolved `[spill] dir`) can be created and written: creates it (mode 0700,
/// see [`create_private_dir_all`](crate::localfs::create_private_dir_all)), writes and removes
/// a small file in it. With `keep = false` the directories it had to create are removed again
/// (`reshard check` leaves nothing behind). A full filesystem (ENOSPC, EDQUOT) passes: the
/// spill log waits for space, that is not a mistake in the path.
pub fn probe_dir(dir: &Path, keep: bool) -> Result<(), UnusableDir> {
    let fail = |op: &'static str, path: &Path, os_error: std::io::Error| {
        if is_out_of_space(&os_error) {
            Ok(())
        } else {
            Err(UnusableDir {
                dir: dir.to_path_buf(),
                op,
                path: path.to_path_buf(),
                os_error,
            })
        }
    };
    // The components that do not exist yet (deepest first), removed again unless `keep`.
    let created: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .collect();
    let result = (|| {
        if let Some(d) = dir
            .ancestors()
            .find(|d| std::fs::symlink_metadata(d).is_ok())
        {
            if !d.is_dir() {
                return fail(
                    CREATE_DIR,
                    d,
                    std::io::Error::from_raw_os_error(libc::ENOTDIR),
                );
            }
        }
        if let Err(e) = crate::localfs::create_private_dir_all(dir) {
            return fail(CREATE_DIR, dir, e);
        }
        let probe = dir.join(PROBE_NAME);
        let written = crate::localfs::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"reshard"));
        let removed = std::fs::remove_file(&probe);
        match (written, removed) {
            (Err(e), _) => fail("write a file in", &probe, e),
            (Ok(()), Err(e)) => fail("remove a file in", &probe, e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })();
    if !keep {
        for d in &created {
            let _ = std::fs::remove_dir(d);
        }
    }
    result
}
