//! Ingest: the one slot → decode → transaction assembly → route → spill log.
//!
//! In: a [`ReplicationStream`] on the slot. Out: every committed source transaction appended,
//! split per shard, to the spill log, and the slot's confirmed flush LSN advanced to what the
//! spill log has made durable (group commit), whatever the shards are doing.
//!
//! Invariants kept here:
//! - **The source is protected**: the flush position given to the server is only ever the
//!   spill log's durable LSN (or, when nothing is in flight, the server's own reported end,
//!   made durable as an empty transaction first) — never more.
//! - **No duplicate after a reconnect**: the server resends from the confirmed position, which
//!   can be behind what the log already holds; transactions whose commit LSN is at or below
//!   the last one appended are skipped, and a transaction cut in the middle by the disconnect
//!   is removed from the log ([`SpillWriter::abort_incomplete`]).
//! - **Bounded memory**: nothing here holds a transaction; changes go to the spill log as they
//!   arrive, streamed transactions are spooled to disk by the assembler, and at the spill cap
//!   (log plus spool) reading stops between transactions (the connection is kept alive with
//!   status updates); the log may exceed the cap by the transaction being read.
//!
//! Latency: the transactions read are handed to the shards' readers at the end of each burst
//! from the source (between transactions, when nothing more has arrived), so a caught-up shard
//! gets a transaction as soon as it is read; the group commit that makes them durable runs
//! every `flush_interval` (or sooner once 8 blocks wait), not per burst, so a stream of small
//! transactions costs one fsync per interval, not one per burst. What the shards apply early
//! is confirmed to the source only once durable here.
//!
//! It runs on its own OS thread (decoding and file writes are CPU and disk work that must not
//! stall the apply tasks) with a current-thread tokio runtime.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};

use crate::config::OnUnroutable;
use crate::decode::{remove_leftover_spools, AssembleError, Assembler, AssemblerOptions};
use crate::error::{Classify, ErrorClass};
use crate::event::{Begin, ShardEvent, ShardId, TxnEvent};
use crate::lsn::Lsn;
use crate::pg::reverse::ORIGIN_PREFIX;
use crate::quarantine::{Quarantine, QuarantineError, HELD_REASON, TRUNCATE_REASON};
use crate::route::refresh::MapHandle;
use crate::route::{KeyError, RouteError, Router, Unrouted};
use crate::shutdown::ShutdownRx;
use crate::source::{
    max_proto_version, ConnConfig, PgOutputOptions, ReplicationClient, ReplicationStream,
    SourceError,
};
use crate::spill::{SpillError, SpillWriter};

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The source connection or a replication command failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A pgoutput message could not be decoded or assembled.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// A change could not be routed (e.g. a NULL shard key).
    #[error("{0}; reading from the source stopped here so nothing is skipped: fix the row or the routing config, then restart (or set [routing] on_unroutable = \"quarantine\" to keep such changes aside and go on)")]
    Route(#[from] RouteError),
    /// The quarantine could not be written.
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
    /// The spill log failed.
    #[error(transparent)]
    Spill(#[from] SpillError),
}

impl Classify for IngestError {
    fn class(&self) -> ErrorClass {
        match self {
            IngestError::Source(e) => e.class(),
            IngestError::Assemble(_) => ErrorClass::Definite,
            IngestError::Route(_) | IngestError::Quarantine(_) => ErrorClass::Definite,
            IngestError::Spill(e) => e.class(),
        }
    }
}

/// Counters shared with the status task (atomics: read without locking the ingest).
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// XLogData payload bytes received.
    pub bytes_received: AtomicU64,
    /// Source transactions appended.
    pub txns: AtomicU64,
    /// Row changes received (before routing).
    pub changes: AtomicU64,
    /// End of the last message received (as u64 LSN).
    pub received_lsn: AtomicU64,
    /// What was last confirmed to the slot (as u64 LSN).
    pub confirmed_lsn: AtomicU64,
    /// Connected and streaming.
    pub connected: AtomicBool,
    /// Reading paused by the spill cap.
    pub backpressure: AtomicBool,
    /// Reading paused by an operator.
    pub paused: AtomicBool,
    /// Reconnects after transient errors.
    pub reconnects: AtomicU64,
}

impl IngestCounters {
    fn set_lsn(cell: &AtomicU64, lsn: Lsn) {
        cell.fetch_max(lsn.as_u64(), Ordering::Relaxed);
    }

    /// What was last confirmed to the slot.
    pub fn confirmed(&self) -> Lsn {
        Lsn::from_u64(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// End of the last message received.
    pub fn received(&self) -> Lsn {
        Lsn::from_u64(self.received_lsn.load(Ordering::Relaxed))
    }
}

/// Settings of the ingest stage.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Source connection.
    pub conn: ConnConfig,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Ask for streamed in-progress transactions.
    pub streaming: bool,
    /// Standby status interval.
    pub status_interval: Duration,
    /// Group-commit interval of the spill log.
    pub flush_interval: Duration,
    /// Read coalescing (`[source] coalesce_ms`): when bursts end less than this apart, wait
    /// this long before reading again. Zero: read at once.
    pub coalesce: Duration,
    /// Where the assembler spools streamed transactions.
    pub stream_dir: PathBuf,
    /// First and longest reconnect delay.
    pub retry_initial: Duration,
    /// Longest reconnect delay.
    pub retry_max: Duration,
}

/// What the ingest does with a change it cannot route.
pub struct UnroutableHandling {
    /// `[routing] on_unroutable`.
    pub policy: OnUnroutable,
    /// The quarantine (also holds later changes of quarantined rows, whatever the policy).
    pub quarantine: Quarantine,
    /// The account map's refresher, with `hash = "map"`.
    pub map: Option<MapHandle>,
}

/// Most accounts remembered as unknown after a re-lookup (not asked again until the map
/// changes).
const UNKNOWN_CACHE_MAX: usize = 10_000;

/// The ingest stage: owns the router and the spill writer.
pub struct Ingest {
    opts: IngestOptions,
    router: Router,
    spill: SpillWriter,
    counters: Arc<IngestCounters>,
    /// Commit LSN of the last transaction appended to the spill log by this process.
    last_appended_commit: Lsn,
    /// The spill log's durable LSN at open: transactions committed before it are in the log.
    resume_from: Lsn,
    /// The transaction being appended: its Begin and which shards got it.
    current: Option<(Begin, Vec<bool>)>,
    /// The current transaction was already in the log (resent after a reconnect): skip it.
    skipping: bool,
    routed: Vec<(ShardId, crate::event::Change)>,
    /// End LSN last given to [`SpillWriter::end_txn`].
    last_end: Lsn,
    unroutable: UnroutableHandling,
    /// Accounts still unknown after a re-lookup with the current map.
    unknown: std::collections::HashSet<String>,
    /// With the stage trace on ([`crate::trace`]): commit times of the transactions appended
    /// but not yet handed to the readers, and of those handed but not yet confirmed (with
    /// their end LSN). Each holds at most [`TRACE_PENDING_MAX`].
    trace_unpublished: Vec<(Lsn, crate::event::PgTimestamp)>,
    trace_unconfirmed: std::collections::VecDeque<(Lsn, crate::event::PgTimestamp)>,
    /// The server's send time of the message being decoded (for the stage trace).
    trace_sent_at: crate::event::PgTimestamp,
}

/// Most transactions the stage trace keeps waiting for one stage (more are not traced).
const TRACE_PENDING_MAX: usize = 100_000;

enum Stop {
    Shutdown,
}

impl Ingest {
    /// A new ingest stage. `resume_after` is the spill log's durable LSN at open: the end LSN
    /// of its last transaction, or a later server WAL end recorded while idle.
    pub fn new(
        opts: IngestOptions,
        router: Router,
        spill: SpillWriter,
        counters: Arc<IngestCounters>,
        resume_after: Lsn,
        unroutable: UnroutableHandling,
    ) -> Ingest {
        Ingest {
            opts,
            router,
            spill,
            counters,
            last_appended_commit: Lsn::ZERO,
            resume_from: resume_after,
            current: None,
            skipping: false,
            routed: Vec::new(),
            last_end: resume_after,
            unroutable,
            unknown: std::collections::HashSet::new(),
            trace_unpublished: Vec::new(),
            trace_unconfirmed: std::collections::VecDeque::new(),
            trace_sent_at: 0,
        }
    }

    /// Streams until `shutdown` (returns the final durable LSN, confirmed to the slot) or a
    /// definite error. Transient source errors reconnect with backoff from the spill log's
    /// durable position. `stream` is an already started stream (the first one, whose
    /// connection exported the full load's snapshot), or `None` to connect.
    pub async fn run(
        mut self,
        mut stream: Option<Started>,
        mut shutdown: ShutdownRx,
        mut pause: watch::Receiver<bool>,
    ) -> Result<Lsn, IngestError> {
        // Spool directories of a killed process: nothing else uses them (this process holds
        // the spill directory's lock and has no assembler yet).
        self.spill.stop_waiting_on(shutdown.clone());
        let removed = remove_leftover_spools(&self.opts.stream_dir)?;
        if removed > 0 {
            tracing::info!(dir = %self.opts.stream_dir.display(), removed, "removed spool directories left by a previous process");
        }
        let mut delay = self.opts.retry_initial;
        loop {
            let s = match stream.take() {
                Some(s) => s,
                None => {
                    if shutdown.is_requested() {
                        return Ok(self.spill.durable_lsn());
                    }
                    match self.start_stream().await {
                        Ok(s) => s,
                        Err(e) if e.class() == ErrorClass::Transient => {
                            tracing::warn!(slot = %self.opts.slot, error = %e, retry_in = ?delay, "cannot start streaming; retrying");
                            if sleep_or_shutdown(delay, &mut shutdown).await {
                                return Ok(self.spill.durable_lsn());
                            }
                            delay = (delay * 2).min(self.opts.retry_max);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            self.counters.connected.store(true, Ordering::Relaxed);
            let Started {
                stream: mut s,
                proto_version,
            } = s;
            let r = self
                .stream(&mut s, proto_version, &mut shutdown, &mut pause)
                .await;
            self.counters.connected.store(false, Ordering::Relaxed);
            match r {
                Ok(Stop::Shutdown) => {
                    let durable = self.close_txn_and_flush(&mut s)?;
                    if let Err(e) = s.shutdown().await {
                        tracing::warn!(error = %e, "closing the replication connection");
                    }
                    tracing::info!(slot = %self.opts.slot, confirmed_flush_lsn = %durable, "ingest stopped");
                    crate::trace::write();
                    return Ok(durable);
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    tracing::warn!(slot = %self.opts.slot, error = %e, "source connection lost; resuming from the spill log's durable position");
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.spill.abort_incomplete()?;
                    self.unroutable.quarantine.abort_txn()?;
                    self.current = None;
                    self.skipping = false;
                    if sleep_or_shutdown(delay, &mut shutdown).await {
                        return Ok(self.spill.durable_lsn());
                    }
                    delay = (delay * 2).min(self.opts.retry_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs [`Ingest::run`] on a new OS thread named `name` (decoding and file writes must not
    /// stall the async tasks), with a current-thread runtime, inside `span`. The receiver gets
    /// its result.
    pub fn spawn_thread(
        self,
        name: String,
        span: tracing::Span,
        first: Option<Started>,
        shutdown: ShutdownRx,
        pause: watch::Receiver<bool>,
    ) -> std::io::Result<oneshot::Receiver<Result<Lsn, IngestError>>> {
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new().name(name).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = done_tx.send(Err(IngestError::Spill(SpillError::Io {
                        op: "start the ingest runtime for",
                        path: PathBuf::from("(ingest thread)"),
                        source: e,
                    })));
                    return;
                }
            };
            let _g = span.enter();
            let r = rt.block_on(self.run(first, shutdown, pause));
            let _ = done_tx.send(r);
        })?;
        Ok(done_rx)
    }

    async fn start_stream(&mut self) -> Result<Started, IngestError> {
        let client = ReplicationClient::connect(&self.opts.conn).await?;
        let start = self.spill.durable_lsn();
        let s = start_streaming(client, &self.opts, start).await?;
        tracing::info!(slot = %self.opts.slot, start_lsn = %start, "streaming from the source");
        Ok(s)
    }

    async fn stream(
        &mut self,
        s: &mut ReplicationStream,
        proto_version: u32,
        shutdown: &mut ShutdownRx,
        pause: &mut watch::Receiver<bool>,
    ) -> Result<Stop, IngestError> {
        let mut assembler = Assembler::new(AssemblerOptions {
            stream_dir: self.opts.stream_dir.clone(),
            proto_version,
        })?;
        // What reshard's reverse stream applied here came from a shard: never send it back.
        assembler.skip_origins(ORIGIN_PREFIX);
        let mut tick = tokio::time::interval(self.opts.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_flush = Instant::now();
        let coalesce = self.opts.coalesce;
        // Read coalescing: when the last burst ended less than `coalesce` ago, the source is
        // busy; reading again at once would hand the shards a transaction or two per burst
        // (each a system call, a frame, a wake-up of every reader). Instead the next read
        // waits out `coalesce`, and what arrived meanwhile goes on as one burst.
        let mut last_burst_end = Instant::now();
        let mut hold_until: Option<tokio::time::Instant> = None;
        loop {
            // The cap is checked only between transactions: a shard cannot apply (and free) a
            // transaction it has not wholly received, so pausing inside one larger than the
            // cap would never end (issue #11 item 7). The spool of buffered streamed
            // transactions counts toward the cap.
            let between_txns = self.current.is_none() && assembler.is_idle();
            let over_cap = between_txns && self.spill.over_cap(assembler.spool_bytes());
            let paused = *pause.borrow();
            self.counters
                .backpressure
                .store(over_cap, Ordering::Relaxed);
            self.counters.paused.store(paused, Ordering::Relaxed);
            // `over_cap` itself logs the start and end of backpressure, once each, with the
            // spill log's size and cap.
            let holding = hold_until.is_some();
            let reading = !over_cap && !paused && !holding;
            tokio::select! {
                biased;
                // This is cancellation-safe.
                _ = shutdown.requested() => return Ok(Stop::Shutdown),
                // This is cancellation-safe.
                _ = pause.changed() => {}
                // This is cancellation-safe.
                _ = tick.tick() => {
                    self.group_commit(s, &assembler)?;
                    last_flush = Instant::now();
                }
                // Cancellation-safe: a sleep holds no state.
                _ = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if holding => {
                    hold_until = None;
                }
                // Cancellation-safe: `next` keeps partial frames in the stream's buffer, and
                // `keepalive_while_paused` (while paused: status updates without reading, so
                // the server does not time the connection out) loses nothing either.
                msg = read_or_keepalive(s, reading) => {
                    let mut msg = msg;
                    loop {
                        let Some(x) = msg? else {
                            return Err(SourceError::ConnectionLost {
                                last_lsn: self.counters.received(),
                                reason: "the server ended the replication stream".into(),
                            }.into());
                        };
                        self.counters.bytes_received.fetch_add(x.data.len() as u64, Ordering::Relaxed);
                        IngestCounters::set_lsn(&self.counters.received_lsn, x.wal_start);
                        self.trace_sent_at = x.server_time;
                        assembler.push(x.wal_start, x.data, &mut |_lsn, ev| self.on_event(ev))?;
                        if self.spill.flush_due() || last_flush.elapsed() >= self.opts.flush_interval {
                            self.group_commit(s, &assembler)?;
                            last_flush = Instant::now();
                        }
                        // Between transactions, with transactions the shards have not got yet:
                        // take what the server has already sent (a keepalive, the next
                        // transaction); when nothing is there the burst is over, and they are
                        // handed to the shards now rather than at the next tick, so a caught-up
                        // shard applies them at once.
                        let handoff = self.current.is_none()
                            && assembler.is_idle()
                            && self.spill.has_unpublished();
                        if !handoff || *pause.borrow() || self.spill.over_cap(assembler.spool_bytes()) {
                            break;
                        }
                        // Cancellation-safe like the arm (`next` loses nothing); polled once.
                        match s.next().now_or_never() {
                            Some(m) => msg = m,
                            None => {
                                // Readers get them now; the disk is synced (and the source
                                // told) only when a group commit is due, so a burst of small
                                // transactions costs no fsync of its own.
                                if self.spill.flush_due() {
                                    self.group_commit(s, &assembler)?;
                                    last_flush = Instant::now();
                                } else {
                                    self.spill.publish()?;
                                }
                                let now = Instant::now();
                                if now.duration_since(last_burst_end) < coalesce {
                                    hold_until = Some(tokio::time::Instant::from_std(now + coalesce));
                                }
                                last_burst_end = now;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Group commit: start making the log durable, and confirm exactly what is durable to the
    /// slot. When no
    /// transaction is in flight, the server's reported end of sent WAL is recorded as an empty
    /// transaction first, so an idle slot retains no WAL and idle shards get heartbeats.
    fn group_commit(
        &mut self,
        s: &mut ReplicationStream,
        asm: &Assembler,
    ) -> Result<(), IngestError> {
        if self.current.is_none() && asm.is_idle() {
            let end = s.server_wal_end();
            if end > self.spill_last_end() {
                self.spill.end_txn(end)?;
                self.last_end = end;
            }
        }
        // Start the group commit without waiting for the disk (the syncer thread fsyncs while
        // reading goes on), and confirm what the last finished one made durable.
        self.spill.commit()?;
        let durable = self.spill.durable_lsn();
        // Quarantined changes of the transactions confirmed now must be on disk first.
        self.unroutable.quarantine.sync()?;
        s.set_flushed(durable);
        self.counters
            .confirmed_lsn
            .fetch_max(durable.as_u64(), Ordering::Relaxed);
        self.trace_group_commit(durable);
        Ok(())
    }

    /// The stage trace's part of a group commit: what was appended is now with the readers,
    /// and what ends at or before `durable` is confirmed.
    fn trace_group_commit(&mut self, durable: Lsn) {
        if !crate::trace::enabled() {
            return;
        }
        let published: Vec<_> = self.trace_unpublished.iter().map(|(_, t)| *t).collect();
        crate::trace::record(crate::trace::Stage::Published, &published);
        self.trace_unconfirmed
            .extend(self.trace_unpublished.drain(..));
        let n = self
            .trace_unconfirmed
            .iter()
            .take_while(|(end, _)| *end <= durable)
            .count();
        let done: Vec<_> = self.trace_unconfirmed.drain(..n).map(|(_, t)| t).collect();
        crate::trace::record(crate::trace::Stage::Confirmed, &done);
        self.trace_unconfirmed.truncate(TRACE_PENDING_MAX);
        crate::trace::maybe_write();
    }

    fn close_txn_and_flush(&mut self, s: &mut ReplicationStream) -> Result<Lsn, IngestError> {
        if self.current.is_some() {
            // A transaction cut by shutdown: the source resends it from its start.
            self.spill.abort_incomplete()?;
            self.unroutable.quarantine.abort_txn()?;
            self.current = None;
        }
        let durable = self.spill.flush()?;
        self.unroutable.quarantine.sync()?;
        s.set_flushed(durable);
        self.counters
            .confirmed_lsn
            .fetch_max(durable.as_u64(), Ordering::Relaxed);
        Ok(durable)
    }

    fn spill_last_end(&self) -> Lsn {
        self.last_end
    }

    fn on_event(&mut self, ev: TxnEvent) -> Result<(), IngestError> {
        match ev {
            TxnEvent::Begin(b) => {
                // A refreshed account map applies from a transaction boundary on.
                if let Some(m) = self.unroutable.map.as_mut().and_then(MapHandle::changed) {
                    self.router.set_map(m);
                    self.unknown.clear();
                }
                self.skipping =
                    already_appended(b.commit_lsn, self.last_appended_commit, self.resume_from);
                if crate::trace::enabled() {
                    let at = self.trace_sent_at;
                    crate::trace::record_at(
                        crate::trace::Stage::WalSenderSent,
                        at,
                        &[b.commit_time],
                    );
                    crate::trace::record(crate::trace::Stage::BeginReceived, &[b.commit_time]);
                }
                self.current = Some((b, vec![false; self.router.shard_names().len()]));
            }
            TxnEvent::Change(c) => {
                if self.skipping {
                    return Ok(());
                }
                let Some((begin, _)) = self.current.as_ref() else {
                    return Ok(());
                };
                self.counters.changes.fetch_add(1, Ordering::Relaxed);
                let begin = *begin;
                self.route_change(&begin, c)?;
                let Some((begin, touched)) = self.current.as_mut() else {
                    return Ok(());
                };
                for (shard, change) in self.routed.drain(..) {
                    let i = shard.index();
                    if !touched[i] {
                        touched[i] = true;
                        self.spill.append(shard, &ShardEvent::Begin(*begin))?;
                    }
                    self.spill.append(shard, &ShardEvent::Change(change))?;
                }
            }
            TxnEvent::Commit(c) => {
                let Some((_, touched)) = self.current.take() else {
                    return Ok(());
                };
                if self.skipping {
                    self.skipping = false;
                    return Ok(());
                }
                self.unroutable.quarantine.commit_txn();
                for (i, t) in touched.iter().enumerate() {
                    if *t {
                        self.spill
                            .append(ShardId(i as u16), &ShardEvent::Commit(c))?;
                    }
                }
                if c.end_lsn > self.last_end {
                    self.spill.end_txn(c.end_lsn)?;
                    self.last_end = c.end_lsn;
                }
                self.last_appended_commit = c.commit_lsn;
                self.counters.txns.fetch_add(1, Ordering::Relaxed);
                if crate::trace::enabled() {
                    crate::trace::record(crate::trace::Stage::Appended, &[c.commit_time]);
                    if self.trace_unpublished.len() < TRACE_PENDING_MAX {
                        self.trace_unpublished.push((c.end_lsn, c.commit_time));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Ingest {
    /// Routes `c` into `self.routed`, or keeps it in the quarantine: a later change of a
    /// quarantined row, or one that cannot be routed (after one re-read of the account map for
    /// an unknown account) under `on_unroutable = "quarantine"`.
    fn route_change(&mut self, begin: &Begin, c: crate::event::Change) -> Result<(), IngestError> {
        let q = &mut self.unroutable.quarantine;
        if q.holds(&c) {
            return Ok(q.append(begin, c, HELD_REASON.to_owned())?);
        }
        if let crate::event::Change::Truncate { rels, .. } = &c {
            // The quarantined changes before a TRUNCATE are obsolete: a marker says so.
            let held: Vec<_> = rels
                .iter()
                .filter(|r| q.holds_table(r.id))
                .cloned()
                .collect();
            for rel in held {
                let marker = crate::event::Change::Truncate {
                    rels: vec![rel],
                    cascade: false,
                    restart_identity: false,
                };
                q.append(begin, marker, TRUNCATE_REASON.to_owned())?;
            }
        }
        let Err(u) = self.router.route_into_or_return(c, &mut self.routed) else {
            return Ok(());
        };
        let u = match unknown_account(&u).map(str::to_owned) {
            Some(account) if !self.unknown.contains(&account) => {
                let relooked = self
                    .unroutable
                    .map
                    .as_mut()
                    .and_then(MapHandle::relookup_blocking);
                let u = match relooked {
                    Some(m) => {
                        self.router.set_map(m);
                        self.unknown.clear();
                        match self.router.route_into_or_return(u.change, &mut self.routed) {
                            Ok(()) => return Ok(()),
                            Err(u) => u,
                        }
                    }
                    None => u,
                };
                if unknown_account(&u).is_some() && self.unknown.len() < UNKNOWN_CACHE_MAX {
                    self.unknown.insert(account);
                }
                u
            }
            _ => u,
        };
        let quarantinable = matches!(u.error, RouteError::Key(_));
        if self.unroutable.policy == OnUnroutable::Stop || !quarantinable {
            return Err(IngestError::Route(u.error));
        }
        tracing::warn!(commit_lsn = %begin.commit_lsn, error = %u.error, "quarantined an unroutable change (see `reshard quarantine list`)");
        let reason = u.error.to_string();
        Ok(self.unroutable.quarantine.append(begin, u.change, reason)?)
    }
}

/// The account of an unknown-account routing failure.
fn unknown_account(u: &Unrouted) -> Option<&str> {
    match &u.error {
        RouteError::Key(k) => match &k.source {
            KeyError::UnknownAccount { account } => Some(account),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a transaction committed at `commit_lsn` is already in the spill log: appended by
/// this process (a resend after a reconnect), or committed before `resume_from`, the log's
/// durable LSN at open.
///
/// A transaction in the log has `commit_lsn < end_lsn <= resume_from`, so one whose commit
/// record starts exactly at `resume_from` is new: the durable LSN may be a server WAL end
/// recorded while idle (the end of the last decoded record), and the next commit record can
/// start right there. The walsender sends it, since it skips only commits before the start
/// position (`SnapBuildXactNeedsSkip`); skipping it here would lose it.
fn already_appended(commit_lsn: Lsn, last_appended_commit: Lsn, resume_from: Lsn) -> bool {
    commit_lsn <= last_appended_commit || commit_lsn < resume_from
}

/// `START_REPLICATION` on `client` with reshard's pgoutput options.
pub async fn start_streaming(
    client: ReplicationClient,
    opts: &IngestOptions,
    start: Lsn,
) -> Result<Started, SourceError> {
    let proto_version = max_proto_version(client.server_version_num());
    let pg = PgOutputOptions {
        proto_version: None,
        publication_names: vec![opts.publication.clone()],
        messages: true,
        streaming: opts.streaming,
        binary: false,
        two_phase: false,
    };
    let stream = client
        .start_replication(&opts.slot, start, pg)
        .await?
        .with_status_interval(opts.status_interval);
    Ok(Started {
        stream,
        proto_version,
    })
}

/// A started replication stream and the pgoutput protocol version it speaks.
pub struct Started {
    /// The stream.
    pub stream: ReplicationStream,
    /// Negotiated `proto_version`.
    pub proto_version: u32,
}

/// The next message when reading; otherwise keeps the connection alive until it fails.
async fn read_or_keepalive(
    s: &mut ReplicationStream,
    reading: bool,
) -> Result<Option<crate::source::XLogData>, SourceError> {
    if reading {
        s.next().await
    } else {
        Err(s.keepalive_while_paused().await)
    }
}

/// Sleeps; returns `true` if shutdown was requested meanwhile.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut ShutdownRx) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => shutdown.is_requested(),
        _ = shutdown.requested() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::from_u64(v)
    }

    /// See: the spill log's durable LSN can be a server WAL end recorded while idle; the next
    /// commit record may start exactly there and must not be taken for an old one.
    #[test]
    fn a_commit_at_the_durable_lsn_after_a_restart_is_new() {
        // Fresh process, log durable at 0x100: a commit at 0x100 is new, one before is old.
        assert!(!already_appended(lsn(0x100), Lsn::ZERO, lsn(0x100)));
        assert!(!already_appended(lsn(0x180), Lsn::ZERO, lsn(0x100)));
        assert!(already_appended(lsn(0xF8), Lsn::ZERO, lsn(0x100)));
        // After appending a commit at 0x200, its resend (reconnect) and anything older is old.
        assert!(already_appended(lsn(0x200), lsn(0x200), lsn(0x100)));
        assert!(already_appended(lsn(0x1F0), lsn(0x200), lsn(0x100)));
        assert!(!already_appended(lsn(0x208), lsn(0x200), lsn(0x100)));
    }
}
