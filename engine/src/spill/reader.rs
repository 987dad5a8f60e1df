//! The reading side of the spill log: per-shard cursors and retention.
//!
//! In: frames the writer sealed (from the in-memory tail when the reader is caught up, from
//! the segment files when it is behind) and the shards' `applied` reports. Out: each shard's
//! [`ShardEvent`]s in commit order, heartbeats for idle shards, and deleted segments.
//!
//! Invariants kept here: a reader never delivers an event of a transaction with
//! `commit_lsn <= after`; it never skips a frame it cannot read (an error names file and
//! offset); if the writer cuts back frames the reader has already read, the reader fails with
//! [`SpillError::CutBack`] instead of silently continuing; a segment is deleted only when its
//! shard has applied all of it and a later segment exists.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::block::{self, FrameError};
use super::codec::{CodecError, Decoder};
use super::retained::Retained;
use super::{io_err, Pos, Shared, SpillError, SpillStats, TailBlock};
use crate::event::{ShardEvent, ShardId, ShardLog, ShardReader};
use crate::lsn::Lsn;

/// The readable side of the spill log, shared by every shard's apply pipeline. Cheap to
/// clone. Implements [`ShardLog`].
#[derive(Clone)]
pub struct SpillLog {
    shared: Arc<Shared>,
}

impl SpillLog {
    pub(crate) fn new(shared: Arc<Shared>) -> SpillLog {
        SpillLog { shared }
    }

    /// Stats snapshot.
    pub fn stats(&self) -> SpillStats {
        self.shared.stats()
    }

    /// End LSN of the last transaction durable in every shard log.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.lock().durable
    }

    /// The durable LSN as it moves (after every group commit): what the ingest confirms to
    /// the slot as `flush_lsn`.
    pub fn durable_watch(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.shared.durable_tx.subscribe()
    }

    /// Whether the ingest is paused at the `max_bytes` cap.
    pub fn backpressure_active(&self) -> bool {
        self.shared.lock().backpressure
    }

    /// Whether the log is at its cap (logs once when backpressure starts).
    pub fn over_cap(&self) -> bool {
        self.shared.over_cap(0)
    }

    /// Resolves once the log is below its cap. Cancel-safe.
    pub async fn wait_for_space(&self) {
        self.shared.wait_for_space().await
    }
}

impl ShardLog for SpillLog {
    type Reader = SpillReader;
    type Error = SpillError;

    fn open_reader(&self, shard: ShardId, after: Lsn) -> Result<SpillReader, SpillError> {
        let st = self.shared.lock();
        let sh = st
            .shards
            .get(shard.index())
            .ok_or(SpillError::UnknownShard {
                shard,
                count: self.shared.shard_count(),
            })?;
        if after < sh.deleted_through {
            return Err(SpillError::Discarded {
                shard,
                after,
                deleted_through: sh.deleted_through,
            });
        }
        // The last segment starting at or before `after` holds the first transaction after
        // it (every earlier segment ends at or before this one's first commit LSN).
        let start = sh
            .segments
            .iter()
            .rev()
            .find(|(_, m)| m.first_commit <= after)
            .or_else(|| sh.segments.iter().next())
            .map(|(seq, _)| Pos {
                seq: *seq,
                offset: 0,
            })
            .unwrap_or(sh.end);
        let epoch = sh.epoch;
        drop(st);
        let dctx = zstd::bulk::Decompressor::new()
            .map_err(|e| io_err("initialise zstd for", &self.shared.opts.dir, e))?;
        Ok(SpillReader {
            shared: Arc::clone(&self.shared),
            shard,
            after,
            pos: start,
            epoch,
            cur: None,
            dec: Decoder::new(),
            dctx,
            file: None,
            in_txn: false,
            skip: false,
            progress: after,
        })
    }

    fn applied(&self, shard: ShardId, commit_lsn: Lsn) {
        // One retention step of a shard at a time: its record must only move forward and be
        // on disk before the files it releases are deleted. Held across file I/O, never across
        // an `.await`; only this shard's retention waits on it.
        let Some(step) = self.shared.retention.get(shard.index()) else {
            tracing::warn!(shard = %shard, "applied() for a shard the spill log does not have");
            return;
        };
        let _step = step.lock().unwrap_or_else(|e| e.into_inner());
        let mut remove: Vec<PathBuf> = Vec::new();
        let mut record = None;
        {
            let mut st = self.shared.lock();
            let Some(sh) = st.shards.get_mut(shard.index()) else {
                tracing::warn!(shard = %shard, "applied() for a shard the spill log does not have");
                return;
            };
            if commit_lsn <= sh.applied {
                return;
            }
            sh.applied = commit_lsn;
            let mut freed = 0u64;
            loop {
                let mut it = sh.segments.iter();
                let (Some((&seq, m)), Some((_, next))) = (it.next(), it.next()) else {
                    break; // never delete the last segment
                };
                let last = m.last_commit.unwrap_or(next.first_commit);
                if !m.sealed || last > commit_lsn {
                    break;
                }
                remove.push(self.shared.segment_path(shard.index(), seq, m.first_commit));
                freed += m.bytes;
                sh.deleted_through = sh.deleted_through.max(last);
                sh.segments.remove(&seq);
                record = Some((
                    sh.dir.clone(),
                    Retained {
                        retained_from: seq + 1,
                        deleted_through: sh.deleted_through.as_u64(),
                    },
                ));
                while sh.tail.front().is_some_and(|b| b.pos.seq <= seq) {
                    if let Some(b) = sh.tail.pop_front() {
                        sh.tail_bytes -= b.raw.len() as u64;
                    }
                }
            }
            if freed > 0 {
                st.bytes_on_disk = st.bytes_on_disk.saturating_sub(freed);
                self.shared.release_space(&mut st);
            }
        }
        // The record first: a segment missing at open at or after `retained_from` was not
        // deleted here (SpillError::FrontSegmentsMissing). Then the files, oldest first, each
        // removal made durable before the next, so a crash can never leave a hole (a missing
        // segment between two present ones) behind.
        // Held until the removals are done: the room the reserve makes is retention's.
        let _reserve = self
            .shared
            .reserve
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((dir, rec)) = record {
            let mut written = rec.write(&dir);
            // On a full filesystem the reserve file makes room for the record, so that the
            // segments the full disk waits for can go (the writer makes a new reserve before
            // writing resumes).
            if matches!(&written, Err(e) if super::spill_out_of_space(e))
                && self.shared.free_reserve()
            {
                written = rec.write(&dir);
            }
            if let Err(e) = written {
                tracing::warn!(shard = %shard, error = %e, "could not record what retention releases; its spill segments stay on disk until the next start");
                return;
            }
        }
        for p in remove {
            let removed = std::fs::remove_file(&p)
                .map_err(|e| io_err("remove", &p, e))
                .and_then(|()| match p.parent() {
                    Some(dir) => super::sync_dir(dir),
                    None => Ok(()),
                });
            match removed {
                Ok(()) => {
                    tracing::debug!(shard = %shard, file = %p.display(), "deleted applied spill segment")
                }
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "could not delete an applied spill segment");
                    break;
                }
            }
        }
    }
}

/// The block a reader is decoding.
struct Cur {
    raw: Bytes,
    pos: usize,
    first_commit: Lsn,
    /// Where it came from, for error messages (a memory block's name is made only then).
    origin: Origin,
    origin_offset: u64,
}

/// Where the block a reader decodes came from.
enum Origin {
    /// The memory tail, copy of the frame in segment `seq`.
    Memory { seq: u64 },
    /// A segment file.
    File(PathBuf),
}

impl Origin {
    fn path(&self, shared: &Shared, shard: ShardId) -> PathBuf {
        match self {
            Origin::Memory { seq } => shared
                .segment_path(shard.index(), *seq, Lsn::ZERO)
                .with_file_name(format!("<memory tail of segment {seq}>")),
            Origin::File(p) => p.clone(),
        }
    }
}

/// One shard's cursor. Implements [`ShardReader`]; see [`ShardReader::next`] for the
/// contract (cancel-safe, transient errors mean "reopen after your progress").
pub struct SpillReader {
    shared: Arc<Shared>,
    shard: ShardId,
    after: Lsn,
    /// Position after the last frame taken (the one in `cur`, if any).
    pos: Pos,
    epoch: u64,
    cur: Option<Cur>,
    dec: Decoder,
    dctx: zstd::bulk::Decompressor<'static>,
    file: Option<(u64, File)>,
    in_txn: bool,
    /// The current transaction is at or before `after`.
    skip: bool,
    /// Highest LSN reported (commit or heartbeat): everything at or below it was delivered.
    progress: Lsn,
}

enum Step {
    Memory(Arc<TailBlock>),
    File {
        seq: u64,
        offset: u64,
        path: PathBuf,
        limit: u64,
    },
    Heartbeat(Lsn),
    Wait,
}

impl SpillReader {
    /// The shard this reader reads.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    async fn next_event(&mut self) -> Result<ShardEvent, SpillError> {
        let shared = Arc::clone(&self.shared);
        loop {
            self.check_cut()?;
            if let Some(ev) = self.next_in_block()? {
                return Ok(ev);
            }
            let notified = shared.data[self.shard.index()].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.locate()? {
                Step::Memory(b) => self.take_memory(&b),
                Step::File {
                    seq,
                    offset,
                    path,
                    limit,
                } => self.take_file(seq, offset, path, limit)?,
                Step::Heartbeat(l) => return Ok(ShardEvent::Heartbeat(l)),
                // This is cancellation-safe: nothing was taken since the last event.
                Step::Wait => notified.await,
            }
        }
    }

    /// Fails if the writer cut back frames this reader already took.
    fn check_cut(&mut self) -> Result<(), SpillError> {
        let i = self.shard.index();
        if self.shared.epochs[i].load(Ordering::Acquire) == self.epoch {
            return Ok(());
        }
        let st = self.shared.lock();
        let sh = &st.shards[i];
        let covered = sh.cuts.front().is_some_and(|(e, _)| *e <= self.epoch + 1);
        let min_cut = sh
            .cuts
            .iter()
            .filter(|(e, _)| *e > self.epoch)
            .map(|(_, p)| *p)
            .min();
        if !covered || min_cut.is_some_and(|c| self.pos > c) {
            return Err(SpillError::CutBack { shard: self.shard });
        }
        self.epoch = sh.epoch;
        Ok(())
    }

    /// The next deliverable event of the current block, if any.
    fn next_in_block(&mut self) -> Result<Option<ShardEvent>, SpillError> {
        while let Some(cur) = self.cur.as_mut() {
            if cur.pos >= cur.raw.len() {
                self.cur = None;
                break;
            }
            let at = cur.pos;
            let (shared, shard) = (&*self.shared, self.shard);
            let corrupt = |cur: &Cur, e: CodecError| SpillError::Corrupt {
                path: cur.origin.path(shared, shard),
                offset: cur.origin_offset,
                reason: format!(
                    "record at offset {} of the uncompressed frame: {e}",
                    e.offset()
                ),
            };
            let ev = self
                .dec
                .decode(&cur.raw, &mut cur.pos)
                .map_err(|e| corrupt(cur, e))?;
            match &ev {
                ShardEvent::Begin(b) => {
                    if self.in_txn {
                        return Err(corrupt(
                            cur,
                            CodecError::Invalid {
                                offset: at,
                                what: "Begin inside a transaction",
                            },
                        ));
                    }
                    self.in_txn = true;
                    self.skip = b.commit_lsn <= self.after;
                }
                ShardEvent::Change(_) | ShardEvent::Commit(_) if !self.in_txn => {
                    // A frame that starts in the middle of a transaction: fine only if that
                    // transaction is one this reader skips.
                    if at != 0 || cur.first_commit > self.after {
                        return Err(corrupt(
                            cur,
                            CodecError::Invalid {
                                offset: at,
                                what: "record outside Begin/Commit (the transaction's Begin is not in the log)",
                            },
                        ));
                    }
                    self.in_txn = true;
                    self.skip = true;
                }
                ShardEvent::Change(_) | ShardEvent::Commit(_) => {}
                ShardEvent::Heartbeat(_) => {
                    return Err(corrupt(
                        cur,
                        CodecError::Invalid {
                            offset: at,
                            what: "stored heartbeat",
                        },
                    ))
                }
            }
            if let ShardEvent::Commit(c) = &ev {
                self.in_txn = false;
                if !self.skip {
                    self.progress = self.progress.max(c.commit_lsn);
                }
            }
            if !self.skip {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    }

    /// Decides where the next frame comes from, under the lock (never across an await).
    fn locate(&mut self) -> Result<Step, SpillError> {
        let i = self.shard.index();
        let mut st = self.shared.lock();
        let durable = st.durable;
        let sh = &mut st.shards[i];
        // `p` is where the next frame starts; `self.pos` stays at the end of the last frame
        // taken until a frame is taken, so cut-back checks compare consumed data only.
        let mut p = self.pos;
        loop {
            match sh.segments.get(&p.seq) {
                Some(m) if m.sealed && p.offset >= m.bytes => {
                    match sh.segments.range(p.seq + 1..).next() {
                        Some((next, _)) if *next == p.seq + 1 => {
                            p = Pos {
                                seq: *next,
                                offset: 0,
                            };
                        }
                        Some(_) => {
                            return Err(SpillError::MissingSegment {
                                shard: self.shard,
                                seq: p.seq + 1,
                                dir: sh.dir.clone(),
                            })
                        }
                        None => break,
                    }
                }
                Some(_) => break,
                None if p >= sh.end => break,
                // Retention deleted the segment this reader had just finished (its shard applied
                // it): every deleted record is at or below `deleted_through`, which the reader
                // has already delivered, so continue with the next retained segment.
                None if !self.in_txn && sh.deleted_through <= self.progress => {
                    match sh.segments.range(p.seq + 1..).next() {
                        Some((next, _)) => {
                            p = Pos {
                                seq: *next,
                                offset: 0,
                            }
                        }
                        None => break,
                    }
                }
                None => {
                    return Err(if sh.segments.keys().next().is_some_and(|f| *f > p.seq) {
                        SpillError::Discarded {
                            shard: self.shard,
                            after: self.progress,
                            deleted_through: sh.deleted_through,
                        }
                    } else {
                        SpillError::MissingSegment {
                            shard: self.shard,
                            seq: p.seq,
                            dir: sh.dir.clone(),
                        }
                    })
                }
            }
        }
        sh.read_pos = sh.read_pos.max(Some(p));
        if p >= sh.end {
            // Caught up. Every transaction with commit LSN below the durable LSN is in the log
            // (the next one's commit record starts at or after it), so nothing at or below
            // durable - 1 is missing for this shard.
            let hb = Lsn::covering(durable);
            if !self.in_txn && !durable.is_zero() && hb > self.progress {
                self.progress = hb;
                return Ok(Step::Heartbeat(hb));
            }
            return Ok(Step::Wait);
        }
        if let Ok(k) = sh.tail.binary_search_by(|b| b.pos.cmp(&p)) {
            if let Some(b) = sh.tail.get(k) {
                sh.memory_block_reads += 1;
                return Ok(Step::Memory(Arc::clone(b)));
            }
        }
        let Some(m) = sh.segments.get(&p.seq) else {
            return Ok(Step::Wait); // unreachable: normalised above
        };
        sh.file_block_reads += 1;
        Ok(Step::File {
            offset: p.offset,
            seq: p.seq,
            path: self.shared.segment_path(i, p.seq, m.first_commit),
            limit: m.bytes,
        })
    }

    fn take_memory(&mut self, b: &TailBlock) {
        self.pos = b.next;
        if b.last_commit <= self.after {
            self.in_txn = false;
            return;
        }
        self.cur = Some(Cur {
            raw: b.raw.clone(),
            pos: 0,
            first_commit: b.first_commit,
            origin: Origin::Memory { seq: b.pos.seq },
            origin_offset: b.pos.offset,
        });
    }

    fn take_file(
        &mut self,
        seq: u64,
        offset: u64,
        path: PathBuf,
        limit: u64,
    ) -> Result<(), SpillError> {
        if self.file.as_ref().is_none_or(|(s, _)| *s != seq) {
            let f = File::open(&path).map_err(|e| self.read_error(&path, e))?;
            self.file = Some((seq, f));
        }
        let Some((_, file)) = self.file.as_ref() else {
            return Ok(());
        };
        let fail = |this: &Self, e: FrameError| match e {
            FrameError::Io(e) => this.read_error(&path, e),
            FrameError::Short if this.was_cut() => SpillError::CutBack { shard: this.shard },
            FrameError::Bad(_) if this.was_cut() => SpillError::CutBack { shard: this.shard },
            FrameError::Short => SpillError::Corrupt {
                path: path.clone(),
                offset,
                reason: format!("frame runs past the valid end of the segment ({limit})"),
            },
            FrameError::Bad(reason) => SpillError::Corrupt {
                path: path.clone(),
                offset,
                reason,
            },
        };
        let h = block::read_header(file, offset, limit).map_err(|e| fail(self, e))?;
        let header = h.header;
        if header.last_commit <= self.after {
            // Nothing this reader wants: skip the frame without reading its payload.
            self.pos = Pos {
                seq,
                offset: offset + header.frame_len(),
            };
            self.in_txn = false;
            return Ok(());
        }
        let frame = block::read_payload(file, offset, h).map_err(|e| fail(self, e))?;
        let raw = block::decompress(&mut self.dctx, frame).map_err(|e| fail(self, e))?;
        self.pos = Pos {
            seq,
            offset: offset + header.frame_len(),
        };
        self.cur = Some(Cur {
            raw,
            pos: 0,
            first_commit: header.first_commit,
            origin: Origin::File(path),
            origin_offset: offset,
        });
        Ok(())
    }

    fn was_cut(&self) -> bool {
        self.shared.epochs[self.shard.index()].load(Ordering::Acquire) != self.epoch
    }

    fn read_error(&self, path: &std::path::Path, e: std::io::Error) -> SpillError {
        if self.was_cut() {
            SpillError::CutBack { shard: self.shard }
        } else {
            io_err("read", path, e)
        }
    }
}

impl ShardReader for SpillReader {
    type Error = SpillError;

    async fn next(&mut self) -> Result<ShardEvent, SpillError> {
        self.next_event().await
    }
}
