//! An in-memory [`ShardLog`] for tests and benchmarks (not for production: it keeps every
//! event it was given, so that a reader can be reopened at any position).
//!
//! In: [`ShardEvent`]s sent per shard with [`MemLog::send`], which waits (like a bounded
//! channel) while a shard has `capacity` events its reader has not taken yet. Out: readers that
//! deliver a shard's events in order, starting after a given commit LSN; the last
//! [`ShardLog::applied`] LSN per shard. Invariant: a reader never skips or repeats an event
//! (its `next` is cancel-safe), and a reopened reader starts exactly after `after` — unless the
//! log was built with [`MemLog::replay_everything`], which delivers already-applied
//! transactions again to test the applier's own defence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::error::{Classify, ErrorClass};
use crate::event::{ShardEvent, ShardId, ShardLog, ShardReader};
use crate::lsn::Lsn;

/// The in-memory log's error (it has none in practice; the type exists for the traits).
#[derive(Debug, thiserror::Error)]
pub enum MemLogError {
    /// A lock was poisoned by a panicking test thread.
    #[error("in-memory shard log lock poisoned")]
    Poisoned,
}

impl Classify for MemLogError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

#[derive(Default)]
struct ShardBuf {
    events: Mutex<Vec<ShardEvent>>,
    /// Woken when an event is added.
    added: Notify,
    /// Woken when a reader takes an event.
    taken: Notify,
    /// Position of the most recent reader.
    read_pos: AtomicUsize,
}

/// An in-memory, replayable shard log.
pub struct MemLog {
    shards: Mutex<HashMap<ShardId, Arc<ShardBuf>>>,
    applied: Mutex<HashMap<ShardId, Lsn>>,
    capacity: usize,
    replay_everything: bool,
}

impl MemLog {
    /// A log where `send` waits while a shard has `capacity` unread events.
    pub fn new(capacity: usize) -> MemLog {
        MemLog {
            shards: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            replay_everything: false,
        }
    }

    /// Readers start at the very beginning whatever `after` they are opened with.
    pub fn replay_everything(mut self) -> MemLog {
        self.replay_everything = true;
        self
    }

    fn buf(&self, shard: ShardId) -> Result<Arc<ShardBuf>, MemLogError> {
        let mut m = self.shards.lock().map_err(|_| MemLogError::Poisoned)?;
        Ok(m.entry(shard).or_default().clone())
    }

    /// Appends `ev` to `shard`'s log, waiting while it has `capacity` unread events.
    pub async fn send(&self, shard: ShardId, ev: ShardEvent) -> Result<(), MemLogError> {
        let buf = self.buf(shard)?;
        loop {
            let taken = buf.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let mut evs = buf.events.lock().map_err(|_| MemLogError::Poisoned)?;
                let unread = evs
                    .len()
                    .saturating_sub(buf.read_pos.load(Ordering::Acquire));
                if unread < self.capacity {
                    evs.push(ev);
                    buf.added.notify_waiters();
                    return Ok(());
                }
            }
            taken.await;
        }
    }

    /// The last LSN the applier reported as applied for `shard`.
    pub fn applied_lsn(&self, shard: ShardId) -> Option<Lsn> {
        self.applied.lock().ok()?.get(&shard).copied()
    }

    /// Number of events sent to `shard`.
    pub fn len(&self, shard: ShardId) -> usize {
        self.buf(shard)
            .ok()
            .and_then(|b| b.events.lock().ok().map(|e| e.len()))
            .unwrap_or(0)
    }

    /// Number of events of `shard` its latest reader has not taken yet.
    pub fn unread(&self, shard: ShardId) -> usize {
        self.buf(shard)
            .ok()
            .and_then(|b| {
                let len = b.events.lock().ok()?.len();
                Some(len.saturating_sub(b.read_pos.load(Ordering::Acquire)))
            })
            .unwrap_or(0)
    }

    /// Whether nothing was sent to `shard`.
    pub fn is_empty(&self, shard: ShardId) -> bool {
        self.len(shard) == 0
    }
}

impl ShardLog for MemLog {
    type Reader = MemReader;
    type Error = MemLogError;

    fn open_reader(&self, shard: ShardId, after: Lsn) -> Result<MemReader, MemLogError> {
        let buf = self.buf(shard)?;
        buf.read_pos.store(0, Ordering::Release);
        buf.taken.notify_waiters();
        Ok(MemReader {
            buf,
            pos: 0,
            after: if self.replay_everything {
                Lsn::ZERO
            } else {
                after
            },
            skipping: false,
        })
    }

    fn applied(&self, shard: ShardId, commit_lsn: Lsn) {
        if let Ok(mut m) = self.applied.lock() {
            m.insert(shard, commit_lsn);
        }
    }
}

/// A cursor over one shard of a [`MemLog`].
pub struct MemReader {
    buf: Arc<ShardBuf>,
    pos: usize,
    after: Lsn,
    skipping: bool,
}

impl MemReader {
    /// The next event at or after `pos` that is not filtered out, without waiting.
    fn take(&mut self) -> Result<Option<ShardEvent>, MemLogError> {
        let evs = self.buf.events.lock().map_err(|_| MemLogError::Poisoned)?;
        while let Some(ev) = evs.get(self.pos) {
            self.pos += 1;
            self.buf.read_pos.store(self.pos, Ordering::Release);
            self.buf.taken.notify_waiters();
            let keep = match ev {
                ShardEvent::Begin(b) => {
                    self.skipping = b.commit_lsn <= self.after;
                    !self.skipping
                }
                ShardEvent::Change(_) => !self.skipping,
                ShardEvent::Commit(_) => {
                    let keep = !self.skipping;
                    self.skipping = false;
                    keep
                }
                ShardEvent::Heartbeat(l) => *l > self.after,
            };
            if keep {
                return Ok(Some(ev.clone()));
            }
        }
        Ok(None)
    }
}

impl ShardReader for MemReader {
    type Error = MemLogError;

    async fn next(&mut self) -> Result<ShardEvent, MemLogError> {
        let buf = self.buf.clone();
        loop {
            let added = buf.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            // Cancel-safe: `take` is synchronous, so an event is either returned or untouched.
            if let Some(ev) = self.take()? {
                return Ok(ev);
            }
            added.await;
        }
    }
}
