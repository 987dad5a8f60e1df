//! The writing side of the spill log: append, group commit, cut-back and recovery at open.
//!
//! In: per-shard events of committed source transactions from the ingest. Out: frames in
//! segment files, the in-memory tail for readers, and the durable LSN.
//!
//! Per shard the writer keeps one open block buffer and a *mark*: the buffer length and file
//! position at the last [`SpillWriter::end_txn`]. A frame never straddles a mark (when the
//! buffer fills, the complete prefix is sealed as its own frame first), so cutting back an
//! incomplete transaction ([`SpillWriter::abort_incomplete`]) is a file truncation, and the
//! checkpoint's per-shard end positions always fall on frame boundaries.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::block::{self, BlockHeader, FrameError};
use super::checkpoint::{Checkpoint, CheckpointFile, ShardCheckpoint};
use super::codec::Encoder;
use super::reader::SpillLog;
use super::retained::{self, Retained};
use super::{
    io_err, sync_dir, Counters, Pos, SegMeta, ShardShared, Shared, SpillError, SpillIdentity,
    SpillOptions, SpillStats, State, TailBlock, CREATE_DIR,
};
use crate::event::{ShardEvent, ShardId};
use crate::localfs::{create_private_dir_all, private_file, replace_file};
use crate::lsn::Lsn;

const IDENTITY_FILE: &str = "identity";

/// What [`SpillWriter::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// End LSN of the last transaction durable in the log: ask the source to resume here.
    pub durable_lsn: Lsn,
    /// The directory was empty and has just been initialised.
    pub created: bool,
    /// The migration the directory belongs to, if recorded ([`SpillWriter::record_lineage`]).
    pub migration_id: Option<String>,
    /// The log holds every transaction with commit LSN at or after this (up to
    /// `durable_lsn`), if recorded.
    pub start_lsn: Option<Lsn>,
    /// Per shard, in shard order.
    pub shards: Vec<ShardOpenReport>,
}

/// One shard's part of [`OpenReport`]. With the shard's progress in its target, the runtime
/// detects lost spill data: progress below `deleted_through` is fine only if nothing was
/// deleted; progress below `oldest_retained_lsn` while the log claims data up to
/// `durable_lsn` means the log lost data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOpenReport {
    /// First commit LSN on disk for the shard, if any data is retained.
    pub oldest_retained_lsn: Option<Lsn>,
    /// Records with commit LSN at or below this were deleted after being applied.
    pub deleted_through: Lsn,
    /// Bytes cut off after the durable checkpoint (torn or not yet durable data).
    pub discarded_bytes: u64,
    /// Segments retained.
    pub segments: usize,
}

struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    bytes: u64,
}

struct ShardWriter {
    dir: PathBuf,
    active: Option<Active>,
    next_seq: u64,
    /// End of the last frame written.
    written: Pos,
    buf: Vec<u8>,
    buf_records: u32,
    buf_first: Lsn,
    buf_last: Lsn,
    /// Buffer prefix that belongs to complete transactions (as of the last `end_txn`).
    mark_buf: usize,
    mark_records: u32,
    mark_last: Lsn,
    /// `written` at the last `end_txn` (or at the last seal of the complete prefix).
    mark_written: Pos,
    /// Commit LSN of the source transaction appended to this shard since the last `end_txn`.
    txn_commit: Option<Lsn>,
    /// Between this shard's Begin and Commit.
    open: bool,
    /// Frames written since the last sync.
    dirty: bool,
    /// Segment files created since the last directory sync.
    dir_dirty: bool,
}

/// The writer of the spill log. Synchronous: call it from one dedicated thread or from
/// `spawn_blocking`. See the module docs of [`spill`](super) for the protocol.
pub struct SpillWriter {
    shared: Arc<Shared>,
    shards: Vec<ShardWriter>,
    enc: Encoder,
    cctx: zstd::bulk::Compressor<'static>,
    /// One frame (header and payload) as it is written: reused, at most a block's size.
    frame_buf: Vec<u8>,
    syncer: Option<Syncer>,
    /// End LSN of the last complete transaction (`end_txn`).
    last_end: Lsn,
    /// Commit LSN of the last complete transaction that touched any shard.
    last_commit: Lsn,
    /// End LSN included in the last group commit started.
    committed: Lsn,
    txns_since_flush: u64,
    bytes_since_commit: u64,
    appended_unpublished: u64,
    last_commit_start: Instant,
    last_deleted_through: Vec<Lsn>,
    failed: bool,
    /// The identity file's content.
    lineage: IdentityFile,
    /// Holds the directory's exclusive `flock` for as long as the writer lives.
    _lock: File,
}

impl SpillWriter {
    /// Opens (or creates) the spill directory: checks its identity, reads the checkpoint,
    /// cuts every shard log back to it (a torn tail, or frames written after the last group
    /// commit) and verifies the frames of each log's last segment. Returns the writer and
    /// what it found; resume the source at [`OpenReport::durable_lsn`].
    pub fn open(
        opts: SpillOptions,
        identity: SpillIdentity,
    ) -> Result<(SpillWriter, OpenReport), SpillError> {
        opts.validate()?;
        if identity.shards.is_empty() || identity.shards.len() > usize::from(u16::MAX) {
            return Err(SpillError::Config {
                key: "[[shards]]",
                msg: format!(
                    "the spill log needs 1..=65535 shards, got {}",
                    identity.shards.len()
                ),
            });
        }
        let floor = (identity.shards.len() as u64 + 1).saturating_mul(opts.segment_bytes);
        if opts.max_bytes < floor {
            // Retention never deletes a shard's newest segment, so less than this could leave
            // the cap reached with every shard fully applied.
            return Err(SpillError::Config {
                key: "[spill] max_bytes",
                msg: format!(
                    "{} is below (shards + 1) x [spill] segment_bytes = {floor}; raise it or lower segment_bytes",
                    opts.max_bytes
                ),
            });
        }
        create_private_dir_all(&opts.dir).map_err(|e| io_err(CREATE_DIR, &opts.dir, e))?;
        let lock = lock_dir(&opts.dir)?;
        let (created, lineage) = check_identity(&opts.dir, &identity)?;
        let (checkpoint, cp) = CheckpointFile::open(&opts.dir)?;
        let n = identity.shards.len();
        if let Some(cp) = &cp {
            if cp.shards.len() != n {
                return Err(SpillError::Corrupt {
                    path: opts.dir.join("checkpoint"),
                    offset: 0,
                    reason: format!(
                        "the checkpoint lists {} shards but the identity file {}",
                        cp.shards.len(),
                        n
                    ),
                });
            }
        }
        let durable = cp.as_ref().map_or(Lsn::ZERO, |c| c.durable);
        let mut shared_shards = Vec::with_capacity(n);
        let mut writers = Vec::with_capacity(n);
        let mut reports = Vec::with_capacity(n);
        for i in 0..n {
            let scp = cp.as_ref().and_then(|c| c.shards.get(i).copied());
            let (sh, w, rep) = recover_shard(&opts, i, scp)?;
            shared_shards.push(sh);
            writers.push(w);
            reports.push(rep);
        }
        let bytes_on_disk = shared_shards
            .iter()
            .flat_map(|s: &ShardShared| s.segments.values())
            .map(|m| m.bytes)
            .sum();
        let last_deleted_through = shared_shards.iter().map(|s| s.deleted_through).collect();
        let cctx = zstd::bulk::Compressor::new(opts.zstd_level)
            .map_err(|e| io_err("initialise zstd for", &opts.dir, e))?;
        let shared = Arc::new(Shared {
            identity,
            state: Mutex::new(State {
                durable,
                shards: shared_shards,
                bytes_on_disk,
                backpressure: false,
                counters: Counters::default(),
                sync_in_flight: false,
                sync_error: None,
                disk_full: false,
                full_disk_log: Default::default(),
            }),
            data: (0..n).map(|_| tokio::sync::Notify::new()).collect(),
            space: tokio::sync::Notify::new(),
            synced: std::sync::Condvar::new(),
            durable_tx: tokio::sync::watch::Sender::new(durable),
            epochs: (0..n).map(|_| AtomicU64::new(0)).collect(),
            retention: (0..n).map(|_| Mutex::new(())).collect(),
            reserve: Mutex::new(()),
            stop: std::sync::OnceLock::new(),
            opts,
        });
        if let Err(e) = shared.make_reserve() {
            tracing::debug!(error = %e, "could not create the spill directory's reserve file");
        }
        tracing::info!(
            dir = %shared.opts.dir.display(),
            durable_lsn = %durable,
            bytes_on_disk,
            created,
            "spill log opened"
        );
        let syncer = Syncer::start(Arc::clone(&shared), checkpoint)?;
        let report = OpenReport {
            durable_lsn: durable,
            created,
            migration_id: lineage.migration_id.clone(),
            start_lsn: lineage.start_lsn,
            shards: reports,
        };
        Ok((
            SpillWriter {
                shared,
                shards: writers,
                enc: Encoder::new(),
                cctx,
                frame_buf: Vec::new(),
                syncer: Some(syncer),
                committed: durable,
                last_end: durable,
                last_commit: Lsn::ZERO,
                txns_since_flush: 0,
                bytes_since_commit: 0,
                appended_unpublished: 0,
                last_commit_start: Instant::now(),
                last_deleted_through,
                failed: false,
                lineage,
                _lock: lock,
            },
            report,
        ))
    }

    /// Records the migration this directory belongs to and the LSN from which it holds every
    /// transaction (the slot's consistent point for a new slot, the position the stream resumes
    /// at for an empty directory). A no-op when both are already recorded as given.
    pub fn record_lineage(&mut self, migration_id: &str, start_lsn: Lsn) -> Result<(), SpillError> {
        if self.lineage.migration_id.as_deref() == Some(migration_id)
            && self.lineage.start_lsn == Some(start_lsn)
        {
            return Ok(());
        }
        let mut next = self.lineage.clone();
        next.migration_id = Some(migration_id.to_owned());
        next.start_lsn = Some(start_lsn);
        write_identity(&self.shared.opts.dir, &next)?;
        self.lineage = next;
        Ok(())
    }

    /// The readable side, for the shards' apply pipelines (cheap to clone).
    pub fn log(&self) -> SpillLog {
        SpillLog::new(Arc::clone(&self.shared))
    }

    /// Appends one event of the current source transaction to `shard`'s log. Per shard the
    /// events must be `Begin`, `Change`*, `Commit` of one transaction between two
    /// [`end_txn`](Self::end_txn) calls; heartbeats are made by readers, not appended.
    pub fn append(&mut self, shard: ShardId, ev: &ShardEvent) -> Result<(), SpillError> {
        self.check_failed()?;
        let block_bytes = self.shared.opts.block_bytes;
        let last_end = self.last_end;
        let last_commit = self.last_commit;
        let w = self
            .shards
            .get_mut(shard.index())
            .ok_or(SpillError::UnknownShard {
                shard,
                count: self.shared.shard_count(),
            })?;
        let protocol = |msg: String| Err(SpillError::Protocol { shard, msg });
        match ev {
            ShardEvent::Begin(b) => {
                if w.open || w.txn_commit.is_some() {
                    return protocol(format!(
                        "Begin of commit LSN {} while this shard already has a transaction since the last end_txn",
                        b.commit_lsn
                    ));
                }
                if b.commit_lsn < last_end || b.commit_lsn <= last_commit {
                    return protocol(format!(
                        "Begin of commit LSN {} is not after the previous transaction (commit LSN {last_commit}, end LSN {last_end}): transactions must arrive in commit order, once",
                        b.commit_lsn
                    ));
                }
                w.open = true;
                w.txn_commit = Some(b.commit_lsn);
            }
            ShardEvent::Change(_) if !w.open => {
                return protocol("Change outside Begin/Commit".into());
            }
            ShardEvent::Change(_) => {}
            ShardEvent::Commit(c) => {
                if !w.open || w.txn_commit != Some(c.commit_lsn) {
                    return protocol(format!(
                        "Commit of commit LSN {} does not match an open Begin",
                        c.commit_lsn
                    ));
                }
                w.open = false;
            }
            ShardEvent::Heartbeat(l) => {
                return protocol(format!(
                    "Heartbeat({l}) appended: heartbeats are generated by readers"
                ));
            }
        }
        let commit = w.txn_commit.unwrap_or(Lsn::ZERO);
        if w.buf.is_empty() {
            w.buf_first = commit;
        }
        let before = w.buf.len();
        self.enc.encode(ev, &mut w.buf);
        let added = (w.buf.len() - before) as u64;
        w.buf_records += 1;
        w.buf_last = commit;
        self.appended_unpublished += added;
        self.bytes_since_commit += added;
        if w.buf.len() >= block_bytes {
            let i = shard.index();
            self.seal_full(i)?;
        }
        Ok(())
    }

    /// Marks the current source transaction, whose commit record ends at `end_lsn`, as
    /// completely appended to every shard it touches. Call it also for transactions that
    /// touch no shard, so the durable LSN (and idle shards' heartbeats) move on.
    pub fn end_txn(&mut self, end_lsn: Lsn) -> Result<(), SpillError> {
        self.check_failed()?;
        if let Some(i) = self.shards.iter().position(|w| w.open) {
            return Err(SpillError::Protocol {
                shard: ShardId(i as u16),
                msg: format!("end_txn({end_lsn}) while the shard's transaction has no Commit"),
            });
        }
        if end_lsn <= self.last_end {
            return Err(SpillError::Protocol {
                shard: ShardId(0),
                msg: format!(
                    "end_txn({end_lsn}) is not after the previous end LSN {}",
                    self.last_end
                ),
            });
        }
        for w in &mut self.shards {
            if let Some(c) = w.txn_commit.take() {
                w.mark_buf = w.buf.len();
                w.mark_records = w.buf_records;
                w.mark_last = c;
                w.mark_written = w.written;
                self.last_commit = self.last_commit.max(c);
            }
        }
        self.last_end = end_lsn;
        self.txns_since_flush += 1;
        Ok(())
    }

    /// Starts a group commit without waiting for the disk: seals every shard's complete
    /// records into frames and hands the files written since the last group commit to the
    /// syncer thread, which `sync_data`s them (in parallel), then durably appends the end LSN
    /// of the last complete transaction to the checkpoint and publishes it as the new durable
    /// LSN ([`durable_lsn`](Self::durable_lsn), [`SpillLog::durable_watch`]). Appends continue
    /// meanwhile, so the next group is whatever arrives while the disk is busy. Returns
    /// whether a group commit was started (not when one is still in flight, or nothing is
    /// new). Either way the complete transactions are sealed and visible to readers at once.
    pub fn commit(&mut self) -> Result<bool, SpillError> {
        self.check_failed()?;
        let r = self.commit_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Group commit, waiting for it: [`commit`](Self::commit) (after any group commit in
    /// flight) and wait until it is durable. Returns the durable LSN (unchanged, without any
    /// fsync, when no transaction completed since the last group commit).
    pub fn flush(&mut self) -> Result<Lsn, SpillError> {
        self.check_failed()?;
        self.wait_synced()?;
        self.commit()?;
        self.wait_synced()?;
        Ok(self.durable_lsn())
    }

    /// Hands every shard's complete transactions to the readers now, without starting a group
    /// commit: what they apply is confirmed to the source only once a later group commit made
    /// it durable. The cheap half of [`commit`](Self::commit), for the end of each burst from
    /// the source, so that a caught-up shard gets a transaction at once while the disk is
    /// synced at most every `flush_interval_ms`.
    pub fn publish(&mut self) -> Result<(), SpillError> {
        self.check_failed()?;
        let r = self.seal_complete();
        if r.is_err() {
            self.failed = true;
        }
        self.publish_counters();
        r
    }

    /// Seals every shard's complete records into frames (visible to readers at once).
    fn seal_complete(&mut self) -> Result<(), SpillError> {
        for i in 0..self.shards.len() {
            if self.shards[i].mark_buf > 0 {
                self.seal_prefix(i)?;
            }
        }
        Ok(())
    }

    /// Whether complete transactions are appended but not yet handed to readers (they are at
    /// the next [`publish`](Self::publish) or [`commit`](Self::commit)).
    pub fn has_unpublished(&self) -> bool {
        self.shards.iter().any(|w| w.mark_buf > 0)
    }

    /// Whether a group commit should start now: no group commit is in flight, a transaction
    /// completed since the last one, and `flush_interval_ms` passed or 8 blocks' worth of
    /// records are waiting.
    pub fn flush_due(&self) -> bool {
        self.last_end != self.committed
            && !self.shared.lock().sync_in_flight
            && (self.last_commit_start.elapsed()
                >= Duration::from_millis(self.shared.opts.flush_interval_ms)
                || self.bytes_since_commit >= 8 * self.shared.opts.block_bytes as u64)
    }

    fn commit_inner(&mut self) -> Result<bool, SpillError> {
        // Readers get the complete transactions at once, even while the previous group commit
        // is still with the disk (what they apply is confirmed to the source only once durable;
        // a crash before that cuts the log back and the source resends).
        self.seal_complete()?;
        let deleted: Vec<Lsn> = {
            let st = self.shared.lock();
            if st.sync_in_flight {
                return Ok(false);
            }
            st.shards.iter().map(|s| s.deleted_through).collect()
        };
        if self.last_end == self.committed && deleted == self.last_deleted_through {
            self.publish_counters();
            return Ok(false);
        }
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for w in &mut self.shards {
            if w.dirty {
                if let Some(a) = &w.active {
                    let f = a.file.try_clone().map_err(|e| io_err("dup", &a.path, e))?;
                    files.push((f, a.path.clone()));
                }
                w.dirty = false;
            }
            if w.dir_dirty {
                dirs.push(w.dir.clone());
                w.dir_dirty = false;
            }
        }
        let job = SyncJob {
            files,
            dirs,
            checkpoint: Checkpoint {
                durable: self.last_end,
                shards: self
                    .shards
                    .iter()
                    .zip(&deleted)
                    .map(|(w, d)| ShardCheckpoint {
                        end: w.mark_written,
                        deleted_through: *d,
                    })
                    .collect(),
            },
            txns: std::mem::take(&mut self.txns_since_flush),
        };
        self.shared.lock().sync_in_flight = true;
        let sent = self.syncer.as_ref().map(|s| s.tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            self.shared.lock().sync_in_flight = false;
            return Err(SpillError::WriterFailed {
                durable: self.durable_lsn(),
                reason: "the syncer thread is gone".into(),
            });
        }
        self.committed = self.last_end;
        self.last_deleted_through = deleted;
        self.bytes_since_commit = 0;
        self.last_commit_start = Instant::now();
        self.publish_counters();
        Ok(true)
    }

    /// Waits until no group commit is in flight; fails if the last one failed.
    fn wait_synced(&self) -> Result<(), SpillError> {
        let mut st = self.shared.lock();
        while st.sync_in_flight && st.sync_error.is_none() {
            st = self
                .shared
                .synced
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        match &st.sync_error {
            Some(reason) => Err(SpillError::WriterFailed {
                durable: st.durable,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Cuts every shard log back to the last complete transaction (call it when the source
    /// connection dropped in the middle of a transaction; the source re-sends it from the
    /// durable LSN). Readers that already read past the cut get [`SpillError::CutBack`].
    pub fn abort_incomplete(&mut self) -> Result<(), SpillError> {
        self.check_failed()?;
        let r = self.abort_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn abort_inner(&mut self) -> Result<(), SpillError> {
        for i in 0..self.shards.len() {
            let w = &mut self.shards[i];
            w.open = false;
            if w.txn_commit.take().is_none() {
                continue;
            }
            if w.written > w.mark_written {
                self.cut_files(i)?;
            }
            let w = &mut self.shards[i];
            w.buf.truncate(w.mark_buf);
            w.buf_records = w.mark_records;
            w.buf_last = w.mark_last;
        }
        Ok(())
    }

    /// Removes the frames of shard `i` written after its mark.
    fn cut_files(&mut self, i: usize) -> Result<(), SpillError> {
        let w = &mut self.shards[i];
        let mark = w.mark_written;
        let mut st = self.shared.lock();
        let sh = &mut st.shards[i];
        let later: Vec<u64> = sh.segments.range(mark.seq + 1..).map(|(s, _)| *s).collect();
        let mut freed = 0u64;
        let mut remove = Vec::new();
        for seq in later {
            if let Some(m) = sh.segments.remove(&seq) {
                freed += m.bytes;
                remove.push(self.shared.segment_path(i, seq, m.first_commit));
            }
        }
        if w.active.as_ref().is_some_and(|a| a.seq != mark.seq) {
            w.active = None; // its file is in `remove`
        }
        match sh.segments.get_mut(&mark.seq) {
            Some(m) if mark.offset > 0 => {
                freed += m.bytes.saturating_sub(mark.offset);
                m.bytes = mark.offset;
                m.sealed = false;
                m.last_commit = Some(w.mark_last);
                let path = self.shared.segment_path(i, mark.seq, m.first_commit);
                let file = match w.active.take() {
                    Some(a) => a.file,
                    None => private_file()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| io_err("open", &path, e))?,
                };
                file.set_len(mark.offset)
                    .map_err(|e| io_err("truncate", &path, e))?;
                w.active = Some(Active {
                    seq: mark.seq,
                    path,
                    file,
                    bytes: mark.offset,
                });
                w.next_seq = mark.seq + 1;
            }
            Some(_) => {
                if let Some(m) = sh.segments.remove(&mark.seq) {
                    freed += m.bytes;
                    remove.push(self.shared.segment_path(i, mark.seq, m.first_commit));
                }
                w.active = None;
                w.next_seq = mark.seq;
            }
            None => {
                w.active = None;
                w.next_seq = if mark.offset == 0 {
                    mark.seq
                } else {
                    mark.seq + 1
                };
            }
        }
        sh.tail.retain(|b| b.pos < mark);
        sh.tail_bytes = sh.tail.iter().map(|b| b.raw.len() as u64).sum();
        sh.end = mark;
        sh.epoch += 1;
        let epoch = sh.epoch;
        sh.cuts.push_back((epoch, mark));
        while sh.cuts.len() > 32 {
            sh.cuts.pop_front();
        }
        st.bytes_on_disk = st.bytes_on_disk.saturating_sub(freed);
        self.shared.epochs[i].store(epoch, Ordering::Release);
        drop(st);
        w.written = mark;
        w.dir_dirty = true;
        for p in &remove {
            std::fs::remove_file(p).map_err(|e| io_err("remove", p, e))?;
        }
        tracing::warn!(shard = i, cut_to = ?mark, removed_segments = remove.len(),
            "spill log cut back to the last complete transaction");
        self.shared.data[i].notify_waiters();
        Ok(())
    }

    /// End LSN of the last transaction that is durable in every shard log.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.lock().durable
    }

    /// Whether the spill log plus `spool_bytes` (the ingest's spool of streamed transactions)
    /// is at its `max_bytes` cap while some shard still has something to apply: the ingest
    /// should stop reading from the source until it is not. Logs when backpressure starts and
    /// ends. Check it only between transactions: a shard cannot apply (and free) a transaction
    /// it has not fully received, so pausing inside one larger than the cap would never
    /// resume. The log may therefore exceed the cap by the transaction being read.
    pub fn over_cap(&self, spool_bytes: u64) -> bool {
        self.shared.over_cap(spool_bytes)
    }

    /// Resolves once the log is below its cap (shards applied and retention freed segments).
    /// Cancel-safe.
    pub async fn wait_for_space(&self) {
        self.shared.wait_for_space().await
    }

    /// Stats snapshot.
    pub fn stats(&self) -> SpillStats {
        self.shared.stats()
    }

    /// A write that finds the filesystem full waits for space (see [`SpillStats::disk_full`])
    /// until `shutdown` is requested, then fails.
    pub fn stop_waiting_on(&self, shutdown: crate::shutdown::ShutdownRx) {
        let _ = self.shared.stop.set(shutdown);
    }

    fn check_failed(&self) -> Result<(), SpillError> {
        let st = self.shared.lock();
        if let Some(reason) = &st.sync_error {
            return Err(SpillError::WriterFailed {
                durable: st.durable,
                reason: reason.clone(),
            });
        }
        if self.failed {
            return Err(SpillError::WriterFailed {
                durable: st.durable,
                reason: "an earlier write failed".into(),
            });
        }
        Ok(())
    }

    fn publish_counters(&mut self) {
        if self.appended_unpublished > 0 {
            let mut st = self.shared.lock();
            st.counters.appended_bytes_total += self.appended_unpublished;
            self.appended_unpublished = 0;
        }
    }

    /// The buffer of shard `i` reached `block_bytes`: seal the complete prefix as its own
    /// frame, then the rest if it is still full.
    fn seal_full(&mut self, i: usize) -> Result<(), SpillError> {
        let block_bytes = self.shared.opts.block_bytes;
        if self.shards[i].mark_buf > 0 {
            self.seal_prefix(i)?;
        }
        let w = &mut self.shards[i];
        if w.buf.len() >= block_bytes {
            let (n, recs, first, last) = (w.buf.len(), w.buf_records, w.buf_first, w.buf_last);
            self.write_block(i, n, recs, first, last)?;
            let w = &mut self.shards[i];
            w.buf.clear();
            w.buf_records = 0;
        }
        Ok(())
    }

    /// Seals the complete prefix of shard `i`'s buffer as one frame.
    fn seal_prefix(&mut self, i: usize) -> Result<(), SpillError> {
        let w = &self.shards[i];
        let (n, recs, first, last) = (w.mark_buf, w.mark_records, w.buf_first, w.mark_last);
        self.write_block(i, n, recs, first, last)?;
        let w = &mut self.shards[i];
        w.buf.drain(..n);
        w.buf_records -= recs;
        w.mark_buf = 0;
        w.mark_records = 0;
        w.mark_written = w.written;
        if let Some(c) = w.txn_commit {
            w.buf_first = c;
        }
        Ok(())
    }

    /// Compresses `buf[..n]` of shard `i` and appends it as a frame, rolling to a new segment
    /// when the current one is full.
    fn write_block(
        &mut self,
        i: usize,
        n: usize,
        records: u32,
        first: Lsn,
        last: Lsn,
    ) -> Result<(), SpillError> {
        let r = self.write_block_inner(i, n, records, first, last);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn write_block_inner(
        &mut self,
        i: usize,
        n: usize,
        records: u32,
        first: Lsn,
        last: Lsn,
    ) -> Result<(), SpillError> {
        let segment_bytes = self.shared.opts.segment_bytes;
        let w = &mut self.shards[i];
        let raw = w.buf.get(..n).unwrap_or(&w.buf[..]);
        if raw.len() > block::MAX_RAW_LEN as usize {
            return Err(SpillError::Protocol {
                shard: ShardId(i as u16),
                msg: format!(
                    "one record of about {} bytes exceeds the largest spill frame ({} bytes); such a row cannot be spilled",
                    raw.len(),
                    block::MAX_RAW_LEN
                ),
            });
        }
        // A block the shard's reader will take from the memory tail is stored as it is:
        // compressing it would only help a file read that will not happen (the reader is
        // less than half the tail's budget behind). A reader further behind reads from the
        // files, and for it (and for the disk) the block is compressed.
        let budget = self.shared.tail_budget();
        let stored = budget > 0 && {
            let st = self.shared.lock();
            st.shards[i]
                .reader_lag()
                .is_some_and(|lag| lag.saturating_add(raw.len() as u64) <= budget / 2)
        };
        let compressed;
        let payload: &[u8] = if stored {
            raw
        } else {
            compressed = self
                .cctx
                .compress(raw)
                .map_err(|e| io_err("compress a block for", &w.dir, e))?;
            &compressed
        };
        let header = BlockHeader {
            crc: 0,
            payload_len: u32::try_from(payload.len()).map_err(|_| SpillError::Protocol {
                shard: ShardId(i as u16),
                msg: format!("a single block of {} bytes is too large", payload.len()),
            })?,
            raw_len: raw.len() as u32,
            records,
            stored,
            first_commit: first,
            last_commit: last,
        }
        .encode(payload);
        // Roll to a new segment when the current one is full.
        let mut sealed_seq = None;
        if let Some(a) = &w.active {
            if a.bytes >= segment_bytes {
                a.file
                    .sync_data()
                    .map_err(|e| io_err("sync_data", &a.path, e))?;
                sealed_seq = Some(a.seq);
                w.active = None;
                w.dirty = false;
            }
        }
        let mut created = None;
        if w.active.is_none() {
            let seq = w.next_seq;
            let path = w.dir.join(block::segment_name(first, seq));
            let file = self.shared.until_space("create", &path, 0, || {
                private_file()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
            })?;
            w.next_seq += 1;
            w.dir_dirty = true;
            created = Some(seq);
            w.active = Some(Active {
                seq,
                path,
                file,
                bytes: 0,
            });
        }
        let Some(a) = w.active.as_mut() else {
            return Ok(()); // unreachable: set just above
        };
        let pos = Pos {
            seq: a.seq,
            offset: a.bytes,
        };
        // One positional write per frame (header and payload copied together: a copy of a
        // block costs less than a second system call): after ENOSPC the same bytes go to the
        // same place again.
        let frame = block::HEADER_LEN + payload.len() as u64;
        let out = &mut self.frame_buf;
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        self.shared.until_space("write", &a.path, frame, || {
            a.file.write_all_at(out, a.bytes)
        })?;
        a.bytes += frame;
        let next = Pos {
            seq: a.seq,
            offset: a.bytes,
        };
        w.written = next;
        w.dirty = true;
        let tail = (budget > 0).then(|| {
            Arc::new(TailBlock {
                pos,
                next,
                first_commit: first,
                last_commit: last,
                raw: Bytes::copy_from_slice(raw),
            })
        });
        {
            let mut st = self.shared.lock();
            st.bytes_on_disk += frame;
            st.counters.written_bytes_total += frame;
            st.counters.stored_blocks_total += u64::from(stored);
            st.counters.blocks_total += 1;
            st.counters.appended_bytes_total += self.appended_unpublished;
            self.appended_unpublished = 0;
            if sealed_seq.is_some() {
                st.counters.file_syncs_total += 1;
            }
            let sh = &mut st.shards[i];
            if let Some(s) = sealed_seq.and_then(|s| sh.segments.get_mut(&s)) {
                s.sealed = true;
            }
            if let Some(seq) = created {
                sh.segments.insert(
                    seq,
                    SegMeta {
                        first_commit: first,
                        last_commit: None,
                        bytes: 0,
                        sealed: false,
                    },
                );
            }
            if let Some(m) = sh.segments.get_mut(&pos.seq) {
                m.bytes = next.offset;
                m.last_commit = Some(last);
            }
            sh.end = next;
            if let Some(t) = tail {
                sh.tail_bytes += t.raw.len() as u64;
                sh.tail.push_back(t);
                while sh.tail_bytes > budget && sh.tail.len() > 1 {
                    if let Some(old) = sh.tail.pop_front() {
                        sh.tail_bytes -= old.raw.len() as u64;
                    }
                }
            }
        }
        self.shared.data[i].notify_waiters();
        Ok(())
    }
}

/// One group commit for the syncer thread.
struct SyncJob {
    /// Segment files written since the last group commit (duplicated descriptors).
    files: Vec<(File, PathBuf)>,
    /// Shard directories with new segment files.
    dirs: Vec<PathBuf>,
    /// What to record once those are durable.
    checkpoint: Checkpoint,
    /// Transactions in this group.
    txns: u64,
}

/// The thread that makes group commits durable, one at a time, in order.
struct Syncer {
    tx: std::sync::mpsc::SyncSender<SyncJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(shared: Arc<Shared>, checkpoint: CheckpointFile) -> Result<Syncer, SpillError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<SyncJob>(1);
        let dir = shared.opts.dir.clone();
        let thread = std::thread::Builder::new()
            .name("spill-sync".into())
            .spawn(move || Syncer::run(&shared, &rx, checkpoint))
            .map_err(|e| io_err("start the syncer thread for", &dir, e))?;
        Ok(Syncer {
            tx,
            thread: Some(thread),
        })
    }

    fn run(
        shared: &Shared,
        rx: &std::sync::mpsc::Receiver<SyncJob>,
        mut checkpoint: CheckpointFile,
    ) {
        let mut pool = SyncPool::default();
        while let Ok(mut job) = rx.recv() {
            let syncs = (job.files.len() + job.dirs.len() + 1) as u64;
            let r = Syncer::sync(shared, &mut job, &mut checkpoint, &mut pool);
            {
                let mut st = shared.lock();
                st.sync_in_flight = false;
                match &r {
                    Ok(()) => {
                        st.durable = job.checkpoint.durable;
                        st.counters.fsyncs_total += 1;
                        st.counters.file_syncs_total += syncs;
                        st.counters.txns_total += job.txns;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "spill group commit failed; the writer must be reopened");
                        st.sync_error = Some(e.to_string());
                    }
                }
            }
            if r.is_ok() {
                shared.durable_tx.send_replace(job.checkpoint.durable);
            }
            shared.synced.notify_all();
            shared.wake_readers();
            if r.is_err() {
                return;
            }
        }
    }

    /// Segment files first (in parallel: each `sync_data` waits for the disk), then the
    /// directories, then the checkpoint that makes them count.
    fn sync(
        shared: &Shared,
        job: &mut SyncJob,
        checkpoint: &mut CheckpointFile,
        pool: &mut SyncPool,
    ) -> Result<(), SpillError> {
        let mut files = std::mem::take(&mut job.files);
        if let Some(first) = files.pop() {
            // The others go to the pool's threads; this thread syncs one itself meanwhile.
            let handed = pool.start(files)?;
            let mine = sync_file(&first);
            pool.wait(handed)?;
            mine?;
        }
        for d in &job.dirs {
            sync_dir(d)?;
        }
        checkpoint.append(&job.checkpoint, Some(shared))
    }
}

fn sync_file((f, p): &(File, PathBuf)) -> Result<(), SpillError> {
    f.sync_data().map_err(|e| io_err("sync_data", p, e))
}

/// Threads that `sync_data` segment files for the syncer, kept for the writer's life: a
/// group commit every few milliseconds must not create and join a thread per file (issue
/// #14). Grows to the most files a group commit has synced at once, minus one.
#[derive(Default)]
struct SyncPool {
    workers: Vec<SyncWorker>,
}

struct SyncWorker {
    tx: std::sync::mpsc::SyncSender<(File, PathBuf)>,
    done: std::sync::mpsc::Receiver<Result<(), SpillError>>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for SyncPool {
    /// Stops and joins the threads (each ends when its channel closes).
    fn drop(&mut self) {
        for w in self.workers.drain(..) {
            drop(w.tx);
            let _ = w.thread.join();
        }
    }
}

impl SyncPool {
    /// Hands one file to each worker (starting workers as needed); returns how many.
    fn start(&mut self, files: Vec<(File, PathBuf)>) -> Result<usize, SpillError> {
        let n = files.len();
        for (k, file) in files.into_iter().enumerate() {
            if k == self.workers.len() {
                let (tx, rx) = std::sync::mpsc::sync_channel::<(File, PathBuf)>(1);
                let (done_tx, done) = std::sync::mpsc::sync_channel(1);
                let thread = std::thread::Builder::new()
                    .name("spill-sync-file".into())
                    .spawn(move || {
                        while let Ok(f) = rx.recv() {
                            if done_tx.send(sync_file(&f)).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| io_err("start a sync thread for", &file.1, e))?;
                self.workers.push(SyncWorker { tx, done, thread });
            }
            let gone = || SpillError::WriterFailed {
                durable: Lsn::ZERO,
                reason: "a sync_data thread is gone".into(),
            };
            self.workers[k].tx.send(file).map_err(|_| gone())?;
        }
        Ok(n)
    }

    /// Waits for the first `n` workers' results; the first error wins.
    fn wait(&mut self, n: usize) -> Result<(), SpillError> {
        let mut first_err = None;
        for w in &self.workers[..n] {
            let r = w.done.recv().unwrap_or_else(|_| {
                Err(SpillError::WriterFailed {
                    durable: Lsn::ZERO,
                    reason: "a sync_data thread is gone".into(),
                })
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for SpillWriter {
    /// Finishes the group commit in flight (if any) and stops the syncer thread. Does not
    /// start a new one: call [`flush`](Self::flush) first for a clean shutdown.
    fn drop(&mut self) {
        if let Some(mut s) = self.syncer.take() {
            drop(s.tx);
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Takes an exclusive advisory lock on `<dir>/lock`, so two processes never write one log.
/// The spill directory's exclusive lock, held by an operator command that must not run beside
/// the daemon (released on drop).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the spill directory's lock ([`SpillError::Locked`] while `reshard run` holds it).
pub fn lock_spill_dir(dir: &Path) -> Result<DirLock, SpillError> {
    Ok(DirLock {
        _file: lock_dir(dir)?,
    })
}

/// The identity recorded in a spill directory (source system id, slot, shards), if any.
pub fn read_identity(dir: &Path) -> Option<SpillIdentity> {
    let data = std::fs::read(dir.join(IDENTITY_FILE)).ok()?;
    let file: IdentityFile = serde_json::from_slice(&data).ok()?;
    Some(SpillIdentity {
        system_id: file.system_id,
        slot: file.slot,
        shards: file.shards,
    })
}

fn lock_dir(dir: &Path) -> Result<File, SpillError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let f = private_file()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err("open", &path, e))?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SpillError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(io_err("lock", &path, e));
    }
    Ok(f)
}

/// The identity file: whose data the directory holds ([`SpillIdentity`]), which migration it
/// belongs to and from which LSN on it holds every transaction (both recorded by the runtime
/// once known, see [`SpillWriter::record_lineage`]; absent in directories of older versions).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    system_id: String,
    slot: String,
    shards: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    migration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_lsn: Option<Lsn>,
}

/// Checks (or, for a fresh directory, writes) the identity file. Returns whether the
/// directory was fresh, and its lineage (migration id, start LSN) if recorded.
fn check_identity(
    dir: &Path,
    identity: &SpillIdentity,
) -> Result<(bool, IdentityFile), SpillError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(data) => {
            let found: IdentityFile =
                serde_json::from_slice(&data).map_err(|e| SpillError::Corrupt {
                    path: path.clone(),
                    offset: e.column() as u64,
                    reason: format!("identity file is not valid: {e}"),
                })?;
            if found.system_id != identity.system_id || found.slot != identity.slot {
                return Err(SpillError::IdentityMismatch {
                    dir: dir.to_path_buf(),
                    found_system_id: found.system_id,
                    found_slot: found.slot,
                    system_id: identity.system_id.clone(),
                    slot: identity.slot.clone(),
                });
            }
            if found.shards != identity.shards {
                return Err(SpillError::ShardsMismatch {
                    dir: dir.to_path_buf(),
                    found: found.shards,
                    expected: identity.shards.clone(),
                });
            }
            Ok((false, found))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_data = std::fs::read_dir(dir)
                .map_err(|e| io_err("list", dir, e))?
                .filter_map(Result::ok)
                .any(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n == "checkpoint" || n.starts_with("shard-")
                });
            if has_data {
                return Err(SpillError::Corrupt {
                    path,
                    offset: 0,
                    reason: "the identity file is missing but the directory holds spill data, so it is unknown which source and slot it belongs to; move the directory away and start with an empty one".into(),
                });
            }
            let file = IdentityFile {
                system_id: identity.system_id.clone(),
                slot: identity.slot.clone(),
                shards: identity.shards.clone(),
                migration_id: None,
                start_lsn: None,
            };
            write_identity(dir, &file)?;
            Ok((true, file))
        }
        Err(e) => Err(io_err("read", &path, e)),
    }
}

/// Replaces the identity file atomically (temporary file, sync, rename, directory sync).
fn write_identity(dir: &Path, file: &IdentityFile) -> Result<(), SpillError> {
    let path = dir.join(IDENTITY_FILE);
    let tmp = dir.join("identity.tmp");
    let json = serde_json::to_vec_pretty(file).map_err(|e| SpillError::Io {
        op: "serialise identity for",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    replace_file(&path, &tmp, &json)?;
    Ok(())
}

/// Cuts shard `i`'s log back to its checkpointed end and verifies what remains of its last
/// segment.
fn recover_shard(
    opts: &SpillOptions,
    i: usize,
    cp: Option<ShardCheckpoint>,
) -> Result<(ShardShared, ShardWriter, ShardOpenReport), SpillError> {
    let shard = ShardId(i as u16);
    let dir = block::shard_dir(&opts.dir, i);
    create_private_dir_all(&dir).map_err(|e| io_err(CREATE_DIR, &dir, e))?;
    let cp = cp.unwrap_or(ShardCheckpoint {
        end: Pos { seq: 0, offset: 0 },
        deleted_through: Lsn::ZERO,
    });
    let retained = Retained::read(&dir)?;
    // Released by retention: every segment before this may be gone (None: a directory written
    // by a reshard without the retention record, which cannot tell).
    let released_before = retained.map(|r| r.retained_from);
    let mut found: BTreeMap<u64, (Lsn, PathBuf)> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| io_err("list", &dir, e))? {
        let entry = entry.map_err(|e| io_err("list", &dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if retained::is_record_file(&name) {
            continue;
        }
        match block::parse_segment_name(&name) {
            Some((lsn, seq)) => {
                if let Some((_, other)) = found.insert(seq, (lsn, entry.path())) {
                    return Err(SpillError::Corrupt {
                        path: entry.path(),
                        offset: 0,
                        reason: format!(
                            "two segments with sequence number {seq} (the other is {}); remove the one that does not belong",
                            other.display()
                        ),
                    });
                }
            }
            None => {
                tracing::warn!(file = %entry.path().display(), "ignoring a file that is not a spill segment")
            }
        }
    }
    // Everything after the checkpoint is not durable: the source re-sends it.
    let mut discarded = 0u64;
    let later: Vec<u64> = found.range(cp.end.seq + 1..).map(|(s, _)| *s).collect();
    for seq in &later {
        if let Some((_, path)) = found.remove(seq) {
            discarded += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        }
    }
    let mut last_known = None;
    if let Some((_, path)) = found.get(&cp.end.seq).cloned() {
        let file = private_file()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        if len < cp.end.offset {
            return Err(SpillError::DurableDataLost {
                path,
                have: len,
                need: cp.end.offset,
            });
        }
        last_known = verify_frames(&file, &path, cp.end.offset)?;
        if len > cp.end.offset {
            let torn = describe_tail(&file, cp.end.offset, len);
            tracing::warn!(shard = i, file = %path.display(), offset = cp.end.offset,
                bytes = len - cp.end.offset, tail = torn,
                "cutting the spill log back to the durable checkpoint");
            discarded += len - cp.end.offset;
        }
        if cp.end.offset == 0 {
            drop(file);
            std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
            found.remove(&cp.end.seq);
        } else if len > cp.end.offset {
            file.set_len(cp.end.offset)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("truncate", &path, e))?;
        }
    } else if released_before.is_some_and(|r| r > cp.end.seq) {
        // Retention released the checkpoint's segment (its shard applied it; a later segment,
        // not yet durable and cut off above, held the newer data): nothing is missing.
    } else if cp.end.offset > 0 && found.range(..cp.end.seq).next().is_some() {
        return Err(SpillError::MissingSegment {
            shard,
            seq: cp.end.seq,
            dir,
        });
    } else if cp.end.offset > 0 && later.is_empty() {
        // The checkpoint's segment held durable data and retention never deletes a shard's
        // newest segment (a later one existed, and was cut off above as not durable, only when
        // retention deleted this one after the shard applied it): the files were removed.
        return Err(SpillError::NewestSegmentMissing {
            shard,
            seq: cp.end.seq,
            dir,
        });
    }
    let mut deleted_through = cp.deleted_through;
    let mut released = false;
    if let Some(rec) = retained {
        deleted_through = deleted_through.max(rec.deleted_through());
        // Retention recorded these as released but stopped before deleting them.
        let stale: Vec<u64> = found.range(..rec.retained_from).map(|(s, _)| *s).collect();
        for seq in stale {
            if let Some((_, path)) = found.remove(&seq) {
                tracing::info!(shard = i, file = %path.display(), "deleting a spill segment retention had released");
                released = true;
                std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
            }
        }
        if let Some((&first, &(first_commit, _))) = found.iter().next() {
            if first > rec.retained_from {
                if cp.deleted_through > rec.deleted_through() {
                    // Retention of a reshard without this record ran after it was written.
                    tracing::warn!(shard = i, dir = %dir.display(), retained_from = rec.retained_from, first_segment = first,
                        "the spill log's retention record is older than its checkpoint (an older reshard ran on this directory): segments missing before the first one cannot be told from retention");
                } else {
                    return Err(SpillError::FrontSegmentsMissing {
                        shard,
                        dir,
                        first_missing: rec.retained_from,
                        last_missing: first - 1,
                        after: rec.deleted_through(),
                        before: first_commit,
                    });
                }
            }
        }
    }
    if !later.is_empty() || discarded > 0 || released {
        sync_dir(&dir)?;
    }
    let mut prev: Option<u64> = None;
    for seq in found.keys() {
        if let Some(p) = prev {
            if *seq != p + 1 {
                return Err(SpillError::MissingSegment {
                    shard,
                    seq: p + 1,
                    dir,
                });
            }
        }
        prev = Some(*seq);
    }
    let mut segments = BTreeMap::new();
    for (seq, (lsn, path)) in &found {
        let bytes = std::fs::metadata(path)
            .map_err(|e| io_err("stat", path, e))?
            .len();
        segments.insert(
            *seq,
            SegMeta {
                first_commit: *lsn,
                last_commit: if *seq == cp.end.seq { last_known } else { None },
                bytes,
                sealed: true,
            },
        );
    }
    let last_seq = found.keys().next_back().copied();
    let next_seq = last_seq.unwrap_or(cp.end.seq).max(cp.end.seq) + 1;
    let end = match last_seq {
        Some(s) => Pos {
            seq: s,
            offset: segments.get(&s).map_or(0, |m: &SegMeta| m.bytes),
        },
        None => Pos {
            seq: next_seq,
            offset: 0,
        },
    };
    // From here on a segment missing at or after the first one kept is refused.
    let record = Retained {
        retained_from: found.keys().next().copied().unwrap_or(next_seq),
        deleted_through: deleted_through.as_u64(),
    };
    if retained != Some(record) {
        record.write(&dir)?;
    }
    let report = ShardOpenReport {
        oldest_retained_lsn: segments.values().next().map(|m| m.first_commit),
        deleted_through,
        discarded_bytes: discarded,
        segments: segments.len(),
    };
    let shared = ShardShared {
        dir: dir.clone(),
        segments,
        end,
        tail: Default::default(),
        tail_bytes: 0,
        applied: Lsn::ZERO,
        deleted_through,
        epoch: 0,
        cuts: Default::default(),
        file_block_reads: 0,
        memory_block_reads: 0,
        read_pos: None,
    };
    let writer = ShardWriter {
        dir,
        active: None,
        next_seq,
        written: end,
        buf: Vec::with_capacity(opts.block_bytes + opts.block_bytes / 4),
        buf_records: 0,
        buf_first: Lsn::ZERO,
        buf_last: Lsn::ZERO,
        mark_buf: 0,
        mark_records: 0,
        mark_last: Lsn::ZERO,
        mark_written: end,
        txn_commit: None,
        open: false,
        dirty: false,
        dir_dirty: false,
    };
    Ok((shared, writer, report))
}

/// Checks every frame in `[0, end)` of a segment (CRC, and that the last one ends exactly at
/// `end`). Returns the last frame's last commit LSN.
fn verify_frames(file: &File, path: &Path, end: u64) -> Result<Option<Lsn>, SpillError> {
    let mut off = 0;
    let mut last = None;
    while off < end {
        match block::read_frame(file, off, end) {
            Ok(f) => {
                last = Some(f.header.last_commit);
                off += f.header.frame_len();
            }
            Err(FrameError::Io(e)) => return Err(io_err("read", path, e)),
            Err(FrameError::Short) => {
                return Err(SpillError::Corrupt {
                    path: path.to_path_buf(),
                    offset: off,
                    reason: format!(
                        "the frame here does not end at the durable end of the log ({end})"
                    ),
                })
            }
            Err(FrameError::Bad(reason)) => {
                return Err(SpillError::Corrupt {
                    path: path.to_path_buf(),
                    offset: off,
                    reason,
                })
            }
        }
    }
    Ok(last)
}

/// Describes the bytes after the durable end, for the log line.
fn describe_tail(file: &File, mut off: u64, len: u64) -> String {
    let mut frames = 0;
    loop {
        if off == len {
            return format!("{frames} complete frames not yet durable");
        }
        match block::read_frame(file, off, len) {
            Ok(f) => {
                frames += 1;
                off += f.header.frame_len();
            }
            Err(FrameError::Short) => {
                return format!("{frames} complete frames, then a torn frame at offset {off}")
            }
            Err(_) => return format!("{frames} complete frames, then a bad frame at offset {off}"),
        }
    }
}
