//! The per-shard apply loop: reads events, groups source transactions into target
//! transactions, writes them with the progress row, retries transient failures.
//!
//! In: [`ShardEvent`]s from a [`ShardReader`] opened after the shard's durable progress.
//! Out: committed target transactions (data + progress row), [`ShardStatus`] updates and
//! `ShardLog::applied` calls. Invariant: a target transaction only commits at a source Commit
//! boundary, with the progress row naming the last source transaction it contains; nothing
//! with `commit_lsn <=` the durable progress is applied again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, TryStreamExt};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryStream};
use tracing::{debug, info, warn, Instrument};

use super::batch::{
    change_sql, encode_table, encode_table_inline, key_text, op_kind, owner_sql_for_change,
    Prepared,
};
use super::ddl::{enum_columns, enum_columns_query, Ddl, EnumGap, SourceConnect, Verdict};
use super::fold::Fold;
use super::schema::{
    columns_query, exists_query, source_name, SchemaError, TargetColumn, TargetTable, OWNER_LOST,
    OWNER_ROW,
};
use super::text::sql_literal;
use super::{ApplyError, ApplyOptions, ApplyState, Connect, ShardStatus};
use crate::error::{Classify, ErrorClass};
use crate::event::{
    pg_now, quote_ident, Begin, Change, Commit, PgTimestamp, Relation, ShardEvent, ShardLog,
    ShardReader, TableId, Value,
};
use crate::lsn::Lsn;
use crate::pg::progress::{ensure_progress_table, read_progress, ProgressError, ProgressKey};
use crate::pg::sql::TableName;
use crate::shutdown::ShutdownRx;

/// A shard's commit-to-apply latencies (microseconds), shared with the status view.
pub type LatencyHistogram = Arc<Mutex<Histogram<u64>>>;
/// `DELETE FROM table WHERE (key) > (after) AND (key) <= (upto)`: a row comparison, which
/// orders like the key's `i64`s (<https://www.postgresql.org/docs/current/functions-comparisons.html#ROW-WISE-COMPARISON>).
fn delete_range_sql(
    table: &str,
    key: &[String],
    after: Option<&[i64]>,
    upto: Option<&[i64]>,
) -> String {
    let cols = key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let vals = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    let mut conds = Vec::new();
    if let Some(a) = after {
        conds.push(format!("({cols}) > ({})", vals(a)));
    }
    if let Some(u) = upto {
        conds.push(format!("({cols}) <= ({})", vals(u)));
    }
    if conds.is_empty() {
        format!("DELETE FROM {table}")
    } else {
        format!("DELETE FROM {table} WHERE {}", conds.join(" AND "))
    }
}

/// Fixed cost counted per buffered change on top of its value bytes.
const CHANGE_OVERHEAD_BYTES: usize = 64;
/// Largest piece of COPY data sent at once.
const COPY_CHUNK_BYTES: usize = 256 << 10;

/// Applies one shard. Build it with [`ShardApplier::new`], then [`run`](ShardApplier::run) it
/// on its own task.
pub struct ShardApplier<C: Connect, L: ShardLog> {
    opts: ApplyOptions,
    connect: C,
    log: Arc<L>,
    pause: Option<watch::Receiver<bool>>,
    latency: Arc<Mutex<Histogram<u64>>>,
    ddl: Ddl,
}

impl<C: Connect, L: ShardLog> ShardApplier<C, L> {
    /// An applier for `opts.shard`, connecting with `connect` and reading `log`.
    pub fn new(opts: ApplyOptions, connect: C, log: Arc<L>) -> Self {
        // Bounds 1 µs ..= 1 day with 3 significant digits: constants hdrhistogram accepts.
        #[allow(clippy::expect_used)]
        let hist = Histogram::new_with_bounds(1, 86_400_000_000, 3)
            .expect("constant histogram bounds are valid");
        ShardApplier {
            ddl: Ddl::new(opts.ddl, None),
            opts,
            connect,
            log,
            pause: None,
            latency: Arc::new(Mutex::new(hist)),
        }
    }

    /// Reads the source catalog through `source` when a source table's columns change (to
    /// propagate an added column with its type, nullability and default, and to name the fix
    /// of a change it will not propagate). Without it such a change waits for the operator.
    pub fn with_source_catalog(mut self, source: SourceConnect) -> Self {
        self.ddl = Ddl::new(self.opts.ddl, Some(source));
        self
    }

    /// Pauses the shard while the receiver holds `true`: reading and committing stop after the
    /// current source transaction (whose group is committed first).
    pub fn with_pause(mut self, pause: watch::Receiver<bool>) -> Self {
        self.pause = Some(pause);
        self
    }

    /// Commit-to-apply latency (µs, target commit time minus source commit time), one sample
    /// per applied source transaction. Lock it briefly; never hold it across an await.
    pub fn latency_histogram(&self) -> LatencyHistogram {
        self.latency.clone()
    }

    /// Runs until `shutdown` turns true (returns `Ok`) or a definite error (returned, after it
    /// is published in `status`). Transient errors roll back, reconnect with exponential
    /// backoff, and resume after the durable progress.
    pub async fn run(
        self,
        mut shutdown: ShutdownRx,
        status: watch::Sender<ShardStatus>,
    ) -> Result<(), ApplyError> {
        let span =
            tracing::info_span!("apply", shard = %self.opts.shard_name, slot = %self.opts.slot);
        self.run_inner(&mut shutdown, &status)
            .instrument(span)
            .await
    }

    async fn run_inner(
        mut self,
        shutdown: &mut ShutdownRx,
        status: &watch::Sender<ShardStatus>,
    ) -> Result<(), ApplyError> {
        status.send_modify(|s| {
            s.shard = self.opts.shard_name.clone();
            s.state = ApplyState::Starting;
        });
        let initial = Duration::from_millis(self.opts.retry_initial_ms.max(1));
        let max = Duration::from_millis(self.opts.retry_max_ms.max(self.opts.retry_initial_ms));
        let mut backoff = initial;
        loop {
            let mut session =
                Session::new(&self.opts, &self.log, &self.latency, status, &mut self.ddl);
            let result = session.run(shutdown, &mut self.pause, &self.connect).await;
            if session.committed_any {
                backoff = initial;
            }
            match result {
                Ok(()) => {
                    status.send_modify(|s| s.state = ApplyState::Stopped);
                    info!("apply stopped");
                    return Ok(());
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    let ddl = matches!(e, ApplyError::WaitingForDdl { .. });
                    let halted = matches!(e, ApplyError::ForeignRow(_));
                    if halted {
                        tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "apply halted: a change would overwrite a row of another owner");
                    } else if ddl {
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "apply paused until the shard table matches the source table");
                    } else {
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "transient apply error; reconnecting");
                    }
                    status.send_modify(|s| {
                        s.state = if ddl {
                            ApplyState::WaitingForDdl
                        } else if halted {
                            ApplyState::Halted
                        } else {
                            ApplyState::Retrying
                        };
                        s.retries += 1;
                        s.last_error = Some(e.to_string());
                    });
                    // Cancel-safe: both futures only wait.
                    tokio::select! {
                        biased;
                        _ = shutdown.requested() => {
                            status.send_modify(|s| s.state = ApplyState::Stopped);
                            return Ok(());
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
                Err(e) => {
                    tracing::error!(error = %e, "apply stopped by a definite error");
                    status.send_modify(|s| {
                        s.state = ApplyState::Stopped;
                        s.last_error = Some(e.to_string());
                    });
                    return Err(e);
                }
            }
        }
    }
}

/// A run of source transactions committed together on the target.
struct Group {
    /// When the first of them ended.
    first_at: Option<Instant>,
    /// The last complete source transaction in the group.
    last: Option<Commit>,
    /// A heartbeat past `last` (nothing for this shard up to it).
    heartbeat: Option<Lsn>,
    /// Commit times of the complete source transactions (for the latency histogram); bounded
    /// like the group (at most `batch_max_rows` entries).
    commit_times: Vec<PgTimestamp>,
    rows: usize,
    bytes: usize,
    inserted: u64,
    updated: u64,
    deleted: u64,
    truncates: u64,
    has_data: bool,
}

impl Group {
    fn new() -> Group {
        Group {
            first_at: None,
            last: None,
            heartbeat: None,
            commit_times: Vec::new(),
            rows: 0,
            bytes: 0,
            inserted: 0,
            updated: 0,
            deleted: 0,
            truncates: 0,
            has_data: false,
        }
    }

    fn position(&self) -> Option<Lsn> {
        match (self.last.map(|c| c.commit_lsn), self.heartbeat) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Counters of the source transaction being read.
#[derive(Default)]
struct TxnCounts {
    rows: usize,
    bytes: usize,
    inserted: u64,
    updated: u64,
    deleted: u64,
    truncates: u64,
}

/// One connection's worth of applying; dropped (and its target transaction rolled back by the
/// server) on any error.
struct Session<'a, L: ShardLog> {
    opts: &'a ApplyOptions,
    log: &'a Arc<L>,
    latency: &'a Arc<Mutex<Histogram<u64>>>,
    status: &'a watch::Sender<ShardStatus>,
    ddl: &'a mut Ddl,
    key: ProgressKey,
    client: Option<Client>,
    tables: foldhash::HashMap<TableId, TargetTable>,
    /// The merge statements this connection has prepared.
    prepared: Prepared,
    staging_ready: HashMap<String, bool>,
    staging_seq: u32,
    /// Durable progress (what the progress row says).
    applied: Lsn,
    in_target_txn: bool,
    group: Option<Group>,
    /// The source transaction being read, and whether it is skipped (already applied).
    current: Option<(Begin, bool)>,
    txn: TxnCounts,
    /// Buffered changes with their source commit LSN, in source order.
    buffer: Vec<(Lsn, Change)>,
    buffer_bytes: usize,
    /// `buffer[..buffer_committed]` belongs to complete source transactions.
    buffer_committed: usize,
    /// Part of the current source transaction is already written into the target transaction.
    partial_flushed: bool,
    pending_heartbeat: Option<Lsn>,
    last_heartbeat_write: Instant,
    paused: bool,
    committed_any: bool,
    /// Flushes whose changes start at or below this LSN are applied change by change (set
    /// after a set-based flush failed with a constraint or data error).
    ordered_until: Option<Lsn>,
    /// Source commit LSN of the transaction whose change last waited for DDL (set by
    /// `resolve`'s callers).
    ddl_failed_at: Option<Lsn>,
    /// Apply stops before the source transaction with this commit LSN, commits what precedes
    /// it, and returns the wait.
    ddl_barrier: Option<(Lsn, ApplyError)>,
    /// The relation and source commit LSN of the change whose statement last failed with a
    /// data error (22P02) in the change-by-change path: perhaps an enum value the source added
    /// (see `after_value_error`).
    value_error_at: Option<(Arc<Relation>, Lsn)>,
    /// The source commit LSN of a transaction applied again once because its data error on a
    /// table with enum columns found no enum label missing (the operator may have added them
    /// between the error and the look).
    value_error_retried: Option<Lsn>,
    /// Tables whose new keys the flush being written inserts directly (see
    /// `TargetTable::takes_direct_inserts`).
    direct_in_flush: Vec<TableId>,
    /// Tables that merge their inserts for this many more flushes, because a direct insert
    /// met a row already there (a load or move overlapping the stream, or the application's
    /// writes): each such meeting costs a rollback and a replay, so they are not retried at
    /// once. Kept across replays (not across reconnects).
    merge_only: foldhash::HashMap<TableId, u32>,
    /// The last request of a committed group (its merge statements, progress row and COMMIT),
    /// sent and not yet answered: the next group is read and folded meanwhile. At most one;
    /// answered before anything else is sent on the connection.
    in_flight: Option<InFlight>,
}

/// A target transaction's last request, sent and not yet answered.
struct InFlight {
    answer: std::pin::Pin<Box<SimpleQueryStream>>,
    context: String,
    /// The set-based flush the request carries: replayed from the log up to this LSN if it
    /// hits a constraint or data error (see `replayable`).
    replay_up_to: Option<Lsn>,
    /// Tables the carried flush inserted into directly.
    direct: Vec<TableId>,
    /// What the commit makes durable.
    pos: Lsn,
    end: Lsn,
    time: Option<PgTimestamp>,
    group: Group,
}

/// Statements of a set-based flush held back to ride with the group's commit.
struct Held {
    sql: String,
    up_to: Lsn,
    direct: Vec<TableId>,
}

/// Flushes of a table that merge its inserts after a direct insert met an existing row.
const MERGE_FLUSHES_AFTER_CONFLICT: u32 = 1000;

impl<'a, L: ShardLog> Session<'a, L> {
    fn new(
        opts: &'a ApplyOptions,
        log: &'a Arc<L>,
        latency: &'a Arc<Mutex<Histogram<u64>>>,
        status: &'a watch::Sender<ShardStatus>,
        ddl: &'a mut Ddl,
    ) -> Self {
        Session {
            opts,
            log,
            latency,
            status,
            ddl,
            key: ProgressKey {
                source_system_id: opts.source_system_id.clone(),
                slot: opts.slot.clone(),
                shard: opts.shard_name.clone(),
                migration_id: opts.migration_id.clone(),
            },
            client: None,
            tables: foldhash::HashMap::default(),
            prepared: Prepared::new(),
            staging_ready: HashMap::new(),
            staging_seq: 0,
            applied: Lsn::ZERO,
            in_target_txn: false,
            group: None,
            current: None,
            txn: TxnCounts::default(),
            buffer: Vec::new(),
            buffer_bytes: 0,
            buffer_committed: 0,
            partial_flushed: false,
            pending_heartbeat: None,
            last_heartbeat_write: Instant::now(),
            paused: false,
            committed_any: false,
            ordered_until: None,
            ddl_failed_at: None,
            ddl_barrier: None,
            value_error_at: None,
            value_error_retried: None,
            direct_in_flush: Vec::new(),
            merge_only: foldhash::HashMap::default(),
            in_flight: None,
        }
    }

    fn shard(&self) -> &str {
        &self.opts.shard_name
    }

    /// A failure of the shard's log (opening or reading it).
    fn log_error<E: std::error::Error + Classify>(&self, e: &E) -> ApplyError {
        ApplyError::Log {
            shard: self.shard().to_owned(),
            message: e.to_string(),
            class: e.class(),
        }
    }

    fn client(&self) -> Result<&Client, ApplyError> {
        self.client.as_ref().ok_or_else(|| ApplyError::Connect {
            shard: self.opts.shard_name.clone(),
            message: "not connected".to_owned(),
            class: ErrorClass::Transient,
        })
    }

    /// Runs `sql` (after the answer of a request in flight: the connection answers in order,
    /// and what is sent next may depend on it).
    async fn sql(
        &mut self,
        sql: &str,
        context: &str,
    ) -> Result<Vec<SimpleQueryMessage>, ApplyError> {
        self.finish_commit().await?;
        self.client()?
            .simple_query(sql)
            .await
            .map_err(|e| ApplyError::pg(self.shard(), context, &e))
    }

    /// Connects, prepares the session, reads progress and applies until shutdown or error.
    async fn run<C: Connect>(
        &mut self,
        shutdown: &mut ShutdownRx,
        pause: &mut Option<watch::Receiver<bool>>,
        connect: &C,
    ) -> Result<(), ApplyError> {
        if shutdown.is_requested() {
            return Ok(());
        }
        let client = connect.connect().await.map_err(|e| ApplyError::Connect {
            shard: self.shard().to_owned(),
            message: e.to_string(),
            class: e.class(),
        })?;
        self.client = Some(client);
        self.prepare_session().await?;

        let mut reader = self.open_reader()?;
        info!(after = %self.applied, "applying");
        let applied = self.applied;
        self.status.send_modify(|s| {
            s.state = ApplyState::Running;
            s.applied_commit_lsn = s.applied_commit_lsn.max(applied);
        });
        self.paused = pause.as_ref().is_some_and(|p| *p.borrow());

        loop {
            if shutdown.is_requested() {
                return self.shut_down().await;
            }
            if self.paused && self.current.is_none() {
                let r = self.commit_group().await;
                self.after_step(r, &mut reader).await?;
                if self.group.is_none() {
                    self.status.send_modify(|s| s.state = ApplyState::Paused);
                }
            }
            if self.in_flight.is_some() {
                // A group's commit is in flight: go on reading what the log has right now
                // (the next group is folded while the target works); once it has nothing, or
                // the pause switch moved (seen by the wait below), wait for the answer.
                let reading = !(self.paused && self.current.is_none());
                let pause_moved = pause
                    .as_ref()
                    .is_some_and(|p| p.has_changed().unwrap_or(true));
                let ready = if reading && !pause_moved {
                    reader.next().now_or_never()
                } else {
                    None
                };
                // Cancel-safe by the `ShardReader::next` contract, as below.
                let step = match ready {
                    Some(Ok(ev)) => self.on_event(ev).await,
                    Some(Err(e)) => return Err(self.log_error(&e)),
                    None => self.finish_commit().await,
                };
                self.after_step(step, &mut reader).await?;
                continue;
            }
            if self.current.is_none()
                && self.group.as_ref().is_some_and(|g| g.last.is_some())
                && !self.holding_for_catchup()
            {
                // A group of complete source transactions waits to be committed. If the log has
                // more to read right now, take it into the group (batching under load);
                // otherwise the shard is caught up and nothing else is coming: commit now
                // instead of waiting out `batch_max_delay_ms`. (A shard still catching up
                // waits below for more, up to `catchup_batch_ms`.)
                // Cancel-safe by the `ShardReader::next` contract: a call dropped after one poll
                // loses nothing.
                let step = match reader.next().now_or_never() {
                    Some(Ok(ev)) => self.on_event(ev).await,
                    Some(Err(e)) => return Err(self.log_error(&e)),
                    None => self.commit_group().await,
                };
                self.after_step(step, &mut reader).await?;
                continue;
            }
            let reading = !(self.paused && self.current.is_none());
            let deadline = if self.current.is_none() {
                self.deadline()
            } else {
                None
            };
            let step = tokio::select! {
                biased;
                // Cancel-safe: `requested` only waits.
                _ = shutdown.requested() => return self.shut_down().await,
                // Cancel-safe: same.
                p = pause_changed(pause) => {
                    match p {
                        Some(v) => {
                            self.paused = v;
                            if !v {
                                self.status.send_modify(|s| s.state = ApplyState::Running);
                            }
                        }
                        None => { *pause = None; self.paused = false; }
                    }
                    Ok(())
                }
                // Cancel-safe: a sleep holds no state.
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.on_deadline().await
                }
                // Cancel-safe by the `ShardReader::next` contract: a dropped call loses nothing.
                ev = reader.next(), if reading => {
                    let ev = ev.map_err(|e| self.log_error(&e))?;
                    self.on_event(ev).await
                }
            };
            self.after_step(step, &mut reader).await?;
        }
    }

    /// Passes errors through, except a set-based flush that must be replayed: then the target
    /// transaction is rolled back, the reader reopened after the durable progress, and every
    /// change up to the failing flush's last one is applied change by change in source order.
    ///
    /// A change that waits for DDL (its shard table does not match) pauses the shard exactly
    /// before its source transaction: the target transaction is rolled back, the log re-read
    /// from the durable progress, every source transaction before that one committed, and
    /// then the wait is returned. The operator's fix then meets the shard at the point of the
    /// source's schema change (the earlier changes still fit the old shard table).
    async fn after_step(
        &mut self,
        step: Result<(), ApplyError>,
        reader: &mut L::Reader,
    ) -> Result<(), ApplyError> {
        if step.is_err() {
            // What the failed request left prepared is unknown.
            self.prepared.reset();
        }
        let (up_to, cause) = match step {
            Err(ApplyError::ReplayFromLog { up_to, cause, .. }) => (up_to, cause),
            Err(e @ ApplyError::WaitingForDdl { .. }) => return self.wait_for_ddl(e, reader).await,
            Err(e) if is_value_error(&e) && self.value_error_at.is_some() => {
                return self.after_value_error(e, reader).await;
            }
            other => return other,
        };
        warn!(up_to = %up_to, cause = %cause, "set-based apply failed; rolling back and replaying change by change in source order");
        self.rewind(reader).await?;
        self.ordered_until = Some(up_to);
        self.status.send_modify(|s| s.replays += 1);
        Ok(())
    }

    /// [`Self::wait_for_ddl`] for a change at source commit `at` that waits for `wait`.
    async fn wait_for_ddl_at(
        &mut self,
        at: Lsn,
        shard: String,
        wait: super::ddl::DdlWait,
        reader: &mut L::Reader,
    ) -> Result<(), ApplyError> {
        self.ddl_failed_at = Some(at);
        self.wait_for_ddl(
            ApplyError::WaitingForDdl {
                shard,
                wait,
                at: None,
            },
            reader,
        )
        .await
    }

    /// A change waits for DDL (`e`, with `ddl_failed_at` its source commit LSN): the first
    /// time, rewind and commit every source transaction before it (`ddl_barrier`); then `e`.
    async fn wait_for_ddl(
        &mut self,
        e: ApplyError,
        reader: &mut L::Reader,
    ) -> Result<(), ApplyError> {
        let Some(at) = self.ddl_failed_at.take() else {
            return Err(e);
        };
        let e = match e {
            ApplyError::WaitingForDdl { shard, wait, .. } => ApplyError::WaitingForDdl {
                shard,
                wait,
                at: Some(at),
            },
            e => e,
        };
        if self.ddl_barrier.as_ref().is_some_and(|(b, _)| *b <= at) {
            return Err(e);
        }
        debug!(before = %at, error = %e, "a change waits for DDL; committing every source transaction before it first");
        self.rewind(reader).await?;
        self.ddl_barrier = Some((at, e));
        Ok(())
    }

    /// A change's statement failed with a data error (`e`, SQLSTATE class 22) in the
    /// change-by-change path: a value the shard's column does not take.
    ///
    /// If a shard column's type differs from the source's as the change's relation carries it
    /// (`ALTER TABLE … ALTER COLUMN … TYPE` on the source that this process did not see as a
    /// new relation, e.g. after a restart), this is a schema change: a widening is run on the
    /// shard with `ddl = "propagate"` and the changes are applied again; otherwise the shard
    /// waits for DDL before the change's source transaction, naming the columns and the
    /// `ALTER TABLE` to run.
    ///
    /// If the source's enum types have labels the shard table's lack (`ALTER TYPE … ADD
    /// VALUE` on the source, which logical decoding does not send; 22P02), this is a schema
    /// change too: with `ddl = "propagate"` the labels are added on the shard (outside any
    /// transaction, as a new label cannot be used in the transaction that adds it) and the
    /// changes are applied again; with `"wait"` the shard waits for DDL before the change's
    /// source transaction. If none is missing (any more), the transaction is applied again
    /// once; then `e` stands.
    async fn after_value_error(
        &mut self,
        e: ApplyError,
        reader: &mut L::Reader,
    ) -> Result<(), ApplyError> {
        let Some((rel, at)) = self.value_error_at.take() else {
            return Err(e);
        };
        // The target transaction is aborted: roll it back before reading the shard's catalog.
        self.rewind(reader).await?;
        let target = self.target_name(&rel);
        let lit = sql_literal(target.to_string().as_bytes()).unwrap_or_default();
        let (target_sql, target) = (target.to_string(), target.to_string());
        let shard = self.opts.shard_name.clone();
        let cols = self
            .target_columns(
                &lit,
                &format!("reading the columns of target table {target}"),
            )
            .await?;
        match self
            .ddl
            .value_error_types(&shard, &rel, &target, &target_sql, &cols)
            .await
        {
            None | Some(Verdict::Ready) => {}
            Some(Verdict::Wait(wait)) => {
                return self.wait_for_ddl_at(at, shard, wait, reader).await;
            }
            Some(Verdict::Add { sql, retyped }) => {
                let ctx = format!("widening column(s) of {target} as the source did: {sql}");
                return match self.sql(&sql, &ctx).await {
                    Ok(_) => Ok(()),
                    Err(ApplyError::Pg {
                        sqlstate,
                        message,
                        class: ErrorClass::Definite,
                        ..
                    }) => {
                        let error = format!("SQLSTATE {sqlstate}: {message}");
                        let wait = super::ddl::DdlWait::retype_failed(
                            &shard, &rel, &target, &sql, &retyped, &error,
                        );
                        self.wait_for_ddl_at(at, shard, wait, reader).await
                    }
                    Err(e) => Err(e),
                };
            }
        }
        if e.sqlstate() != Some("22P02") {
            return Err(e);
        }
        let rows = self
            .sql(
                &enum_columns_query(&format!("to_regclass({lit})")),
                &format!("reading the enum columns of target table {target}"),
            )
            .await?;
        let shard_enums = enum_columns(rows.iter().filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(0)?.to_owned(),
                r.get(1)?.to_owned(),
                r.get(2)?.to_owned(),
            )),
            _ => None,
        }));
        if shard_enums.is_empty() {
            return Err(e);
        }
        match self
            .ddl
            .enum_gap(&shard, &rel, &target.to_string(), &shard_enums)
            .await
        {
            // The shard may have taken the values between the error and the look: apply the
            // transaction again, once.
            EnumGap::None if self.value_error_retried != Some(at) => {
                self.value_error_retried = Some(at);
                debug!(commit_lsn = %at, error = %e, "no enum value is missing now; applying the transaction again");
                Ok(())
            }
            EnumGap::None => Err(e),
            EnumGap::Add(statements) => {
                for sql in &statements {
                    let ctx = format!("adding the source's new enum value on the shard: {sql}");
                    self.sql(sql, &ctx).await?;
                }
                Ok(())
            }
            EnumGap::Wait(wait) => self.wait_for_ddl_at(at, shard, wait, reader).await,
        }
    }

    /// Rolls back the target transaction, forgets everything not durable, and reopens the
    /// reader after the durable progress.
    async fn rewind(&mut self, reader: &mut L::Reader) -> Result<(), ApplyError> {
        // A commit still in flight either lands (and the log is re-read after it) or fails
        // (and its transaction is rolled back below).
        if let Err(e) = self.finish_commit().await {
            debug!(error = %e, "the commit in flight failed too");
        }
        if self.in_target_txn {
            self.sql("ROLLBACK", "rolling back before a replay").await?;
            self.in_target_txn = false;
        }
        // Staging tables created in the rolled-back transaction are gone, and so is any column
        // propagated in it: resolve every table again.
        self.staging_ready.clear();
        self.tables.clear();
        self.group = None;
        self.current = None;
        self.txn = TxnCounts::default();
        self.buffer.clear();
        self.buffer_bytes = 0;
        self.buffer_committed = 0;
        self.partial_flushed = false;
        self.pending_heartbeat = None;
        *reader = self.open_reader()?;
        Ok(())
    }

    /// The shard's log, read from just after the durable progress.
    fn open_reader(&self) -> Result<L::Reader, ApplyError> {
        self.log
            .open_reader(self.opts.shard, self.applied)
            .map_err(|e| self.log_error(&e))
    }

    async fn prepare_session(&mut self) -> Result<(), ApplyError> {
        let client = self.client()?;
        if self.opts.session_replication_role_replica {
            if let Err(e) = client
                .batch_execute("SET session_replication_role = replica")
                .await
            {
                if e.code().map(|c| c.code()) == Some("42501") {
                    warn!(
                        "cannot SET session_replication_role = replica (needs superuser or, on PG 15+, GRANT SET ON PARAMETER): \
                         target triggers and foreign keys will fire during apply"
                    );
                } else {
                    return Err(ApplyError::pg(
                        self.shard(),
                        "setting session_replication_role",
                        &e,
                    ));
                }
            }
        }
        client
            .batch_execute(
                "SET standard_conforming_strings = on; SET client_min_messages = warning; \
                 SET plan_cache_mode = force_generic_plan",
            )
            .await
            .map_err(|e| ApplyError::pg(self.shard(), "preparing the session", &e))?;
        if let Some(origin) = &self.opts.replication_origin {
            let o = crate::pg::conn::quote_literal(origin);
            client
                .batch_execute(&format!(
                    "SELECT pg_replication_origin_create({o}) \
                     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {o}); \
                     SELECT pg_replication_origin_session_setup({o})"
                ))
                .await
                .map_err(|e| {
                    ApplyError::pg(
                        self.shard(),
                        format!(
                            "setting up the replication origin {origin} (needs a superuser, or EXECUTE on \
                             pg_replication_origin_create and pg_replication_origin_session_setup granted to the role: \
                             without it the forward stream could not tell these rows from the application's)"
                        ),
                        &e,
                    )
                })?;
        }
        ensure_progress_table(client)
            .await
            .map_err(|e| ApplyError::pg(self.shard(), "creating reshard.progress", &e))?;
        client
            .batch_execute(&self.key.init_sql())
            .await
            .map_err(|e| ApplyError::pg(self.shard(), "creating the progress row", &e))?;
        let p = read_progress(
            client,
            &self.key.slot,
            &self.key.shard,
            Some(&self.key.source_system_id),
        )
        .await
        .map_err(|e| match e {
            ProgressError::Query { error, .. } => {
                ApplyError::pg(self.shard(), "reading reshard.progress", &error)
            }
            e @ ProgressError::Invalid { .. } => ApplyError::Log {
                shard: self.shard().to_owned(),
                message: e.to_string(),
                class: ErrorClass::Definite,
            },
        })?;
        self.applied = p.map(|p| p.commit_lsn).unwrap_or(Lsn::ZERO);
        Ok(())
    }

    /// Where this session stands: durable progress, or the pending group's end.
    fn position(&self) -> Lsn {
        let g = self.group.as_ref().and_then(Group::position);
        let f = self.in_flight.as_ref().map(|f| f.pos);
        let p = self
            .applied
            .max(g.unwrap_or(Lsn::ZERO))
            .max(f.unwrap_or(Lsn::ZERO));
        p.max(self.pending_heartbeat.unwrap_or(Lsn::ZERO))
    }

    /// Whether the newest source transaction read committed on the source at least
    /// `catchup_batch_ms` ago: the shard is draining a backlog, and a larger group costs it
    /// less than committing whenever its log is momentarily empty. (The two clocks only shift
    /// this threshold; the hold itself is bounded by `catchup_batch_ms`.)
    fn catching_up(&self) -> bool {
        let hold = self.opts.catchup_batch_ms;
        hold > 0
            && !self.paused
            && self.ordered_until.is_none()
            && self.group.as_ref().and_then(|g| g.last).is_some_and(|c| {
                pg_now().saturating_sub(c.commit_time) >= (hold as i64).saturating_mul(1_000)
            })
    }

    /// How long a group may stay open after its first transaction: `batch_max_delay_ms`, or
    /// while the shard catches up, `catchup_batch_ms` if that is longer.
    fn group_delay(&self) -> Duration {
        let ms = if self.catching_up() {
            self.opts.batch_max_delay_ms.max(self.opts.catchup_batch_ms)
        } else {
            self.opts.batch_max_delay_ms
        };
        Duration::from_millis(ms)
    }

    /// A group of complete transactions is kept open although the log has nothing right now:
    /// the shard is catching up and the group is younger than `catchup_batch_ms`.
    fn holding_for_catchup(&self) -> bool {
        self.catching_up()
            && self
                .group
                .as_ref()
                .and_then(|g| g.first_at)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(self.opts.catchup_batch_ms))
    }

    fn deadline(&self) -> Option<Instant> {
        if let Some(g) = &self.group {
            let delay = if self.holding_for_catchup() {
                Duration::from_millis(self.opts.catchup_batch_ms)
            } else {
                Duration::from_millis(self.opts.batch_max_delay_ms)
            };
            return g.first_at.map(|t| t + delay);
        }
        // A paused shard records nothing, not even an idle heartbeat: its progress stands
        // still until the operator resumes it.
        if self.paused {
            return None;
        }
        self.pending_heartbeat.map(|_| {
            self.last_heartbeat_write + Duration::from_millis(self.opts.heartbeat_interval_ms)
        })
    }

    async fn on_deadline(&mut self) -> Result<(), ApplyError> {
        if self.group.is_some() {
            self.commit_group().await
        } else {
            self.write_heartbeat().await
        }
    }

    fn order_error(&self, message: String) -> ApplyError {
        ApplyError::Order {
            shard: self.shard().to_owned(),
            message,
        }
    }

    async fn on_event(&mut self, ev: ShardEvent) -> Result<(), ApplyError> {
        match ev {
            ShardEvent::Begin(b) => {
                if let Some((cur, _)) = self.current {
                    return Err(self.order_error(format!(
                        "Begin of {} while {} is open",
                        b.commit_lsn, cur.commit_lsn
                    )));
                }
                if self
                    .ddl_barrier
                    .as_ref()
                    .is_some_and(|(at, _)| b.commit_lsn >= *at)
                {
                    self.commit_group().await?;
                    if let Some((_, e)) = self.ddl_barrier.take() {
                        return Err(e);
                    }
                }
                let skip = b.commit_lsn <= self.position();
                if skip {
                    debug!(commit_lsn = %b.commit_lsn, applied = %self.position(), "skipping an already applied transaction");
                } else if self.group.is_none() {
                    self.group = Some(Group::new());
                }
                self.current = Some((b, skip));
                self.txn = TxnCounts::default();
            }
            ShardEvent::Change(c) => {
                let Some((b, skip)) = self.current else {
                    return Err(self.order_error(format!("{} outside a transaction", c.kind())));
                };
                if skip {
                    return Ok(());
                }
                self.on_change(b.commit_lsn, c).await?;
            }
            ShardEvent::Commit(c) => {
                let Some((b, skip)) = self.current.take() else {
                    return Err(
                        self.order_error(format!("Commit of {} without Begin", c.commit_lsn))
                    );
                };
                if b.commit_lsn != c.commit_lsn {
                    return Err(self.order_error(format!(
                        "Commit of {} closes transaction {}",
                        c.commit_lsn, b.commit_lsn
                    )));
                }
                if skip {
                    return Ok(());
                }
                self.on_commit(c).await?;
            }
            ShardEvent::Heartbeat(lsn) => {
                if self.current.is_some() || lsn <= self.position() {
                    return Ok(());
                }
                match &mut self.group {
                    Some(g) => g.heartbeat = Some(lsn),
                    None => {
                        self.pending_heartbeat = Some(lsn);
                        self.publish_quiet();
                        if self.last_heartbeat_write.elapsed()
                            >= Duration::from_millis(self.opts.heartbeat_interval_ms)
                        {
                            self.write_heartbeat().await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn on_change(&mut self, commit_lsn: Lsn, c: Change) -> Result<(), ApplyError> {
        match &c {
            Change::Message { .. } => return Ok(()),
            // `cascade` is not repeated on the shard: the source already lists every published
            // table its CASCADE reached, and a CASCADE here would also empty shard-only tables
            // that reference them (native logical replication's apply truncates exactly the
            // relations in the message, RESTRICT, too).
            Change::Truncate {
                rels,
                cascade: _,
                restart_identity,
            } => {
                self.flush().await?;
                self.begin_target_txn().await?;
                let names: Vec<String> = rels.iter().map(|r| self.target_sql_name(r)).collect();
                if !names.is_empty() {
                    let sql = format!(
                        "TRUNCATE {}{} RESTRICT",
                        names.join(", "),
                        if *restart_identity {
                            " RESTART IDENTITY"
                        } else {
                            ""
                        },
                    );
                    let ctx = format!(
                        "TRUNCATE {} at source commit {commit_lsn}",
                        names.join(", ")
                    );
                    if let Err(mut e) = self.sql(&sql, &ctx).await {
                        if let ApplyError::Pg {
                            sqlstate, message, ..
                        } = &mut e
                        {
                            // 0A000: a foreign key of a table only the shard has (the detail
                            // names it) refuses the TRUNCATE.
                            if sqlstate == "0A000" {
                                message.push_str(&format!(
                                    "; a table that only shard {} has references a table the \
                                     source truncated, and reshard does not cascade a TRUNCATE \
                                     onto tables the source did not truncate: empty or drop \
                                     that referencing table (or its foreign key) on shard {}, \
                                     then start the shard again",
                                    self.shard(),
                                    self.shard()
                                ));
                            }
                        }
                        return Err(e);
                    }
                }
                self.partial_flushed = true;
                self.txn.truncates += 1;
                self.txn.rows += 1;
                return Ok(());
            }
            Change::DeleteRange {
                rel,
                key,
                after,
                upto,
            } => {
                self.flush().await?;
                self.begin_target_txn().await?;
                let table = self.target_sql_name(rel);
                let sql = delete_range_sql(&table, key, after.as_deref(), upto.as_deref());
                let ctx = format!(
                    "deleting from {table} the rows of the watermark chunks read before the \
                     TRUNCATE at source commit {commit_lsn}"
                );
                self.sql(&sql, &ctx).await?;
                self.partial_flushed = true;
                self.txn.truncates += 1;
                self.txn.rows += 1;
                return Ok(());
            }
            Change::Insert { .. } => self.txn.inserted += 1,
            Change::Update { .. } => self.txn.updated += 1,
            Change::Delete { .. } => self.txn.deleted += 1,
        }
        let bytes = change_bytes(&c);
        self.txn.rows += 1;
        self.txn.bytes += bytes;
        self.buffer_bytes += bytes;
        self.buffer.push((commit_lsn, c));
        if self.buffer.len() >= self.opts.batch_max_rows.max(1)
            || self.buffer_bytes >= self.opts.batch_max_bytes
        {
            // The buffer is full in the middle of a source transaction (or just at its end):
            // write it into the open target transaction and go on; the commit waits for a
            // source Commit.
            self.flush().await?;
            if self.current.is_some() {
                self.partial_flushed = true;
            }
        }
        Ok(())
    }

    async fn on_commit(&mut self, c: Commit) -> Result<(), ApplyError> {
        crate::trace::record(crate::trace::Stage::Read, &[c.commit_time]);
        let txn = std::mem::take(&mut self.txn);
        let g = self.group.get_or_insert_with(Group::new);
        g.first_at.get_or_insert_with(Instant::now);
        g.last = Some(c);
        g.commit_times.push(c.commit_time);
        g.rows += txn.rows.max(1);
        g.bytes += txn.bytes;
        g.inserted += txn.inserted;
        g.updated += txn.updated;
        g.deleted += txn.deleted;
        g.truncates += txn.truncates;
        g.has_data |= txn.rows > 0;
        self.buffer_committed = self.buffer.len();
        self.partial_flushed = false;
        let (rows, bytes, first_at) = (g.rows, g.bytes, g.first_at);
        let full = rows >= self.opts.batch_max_rows.max(1)
            || bytes >= self.opts.batch_max_bytes
            || first_at.is_some_and(|t| t.elapsed() >= self.group_delay());
        // While replaying change by change, commit every source transaction on its own, so a
        // change that fails for good leaves the shard exactly before its transaction.
        if self.paused || self.ordered_until.is_some() {
            self.commit_group().await?;
        } else if full {
            // Under load: send the commit and read on; the answer is checked before anything
            // else is sent.
            self.commit_group_with(true).await?;
        }
        Ok(())
    }

    /// `BEGIN` and lock the progress row (checking nobody else moved it).
    async fn begin_target_txn(&mut self) -> Result<(), ApplyError> {
        if self.in_target_txn {
            return Ok(());
        }
        self.sql_in_target_txn("", "starting a target transaction")
            .await
            .map(drop)
    }

    /// Runs `sql` (statements that return no rows, or none) inside the target transaction. If
    /// none is open, `BEGIN` and the progress row's lock go first in the same simple query (one
    /// round trip): the lock's answer is checked before anything can commit, and a conflict
    /// leaves the transaction open, to be rolled back with the session.
    async fn sql_in_target_txn(
        &mut self,
        sql: &str,
        context: &str,
    ) -> Result<Vec<SimpleQueryMessage>, ApplyError> {
        if self.in_target_txn {
            if !sql.is_empty() {
                return self.sql(sql, context).await;
            }
            return Ok(Vec::new());
        }
        let batch = if sql.is_empty() {
            format!("BEGIN; {}", self.key.lock_sql())
        } else {
            format!("BEGIN; {};\n{sql}", self.key.lock_sql())
        };
        // Open even if a later statement fails: the server keeps the aborted transaction until
        // a ROLLBACK (a multi-statement simple query stops at the failing statement).
        self.in_target_txn = true;
        let msgs = self.sql(&batch, context).await?;
        let found = msgs.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_owned()),
            _ => None,
        });
        let ok = found
            .as_deref()
            .and_then(|s| s.parse::<Lsn>().ok())
            .is_some_and(|l| l == self.applied);
        if !ok {
            return Err(ApplyError::ProgressConflict {
                shard: self.shard().to_owned(),
                expected: self.applied,
                found: found.unwrap_or_else(|| "missing".to_owned()),
            });
        }
        Ok(msgs)
    }

    fn target_name(&self, rel: &Relation) -> TableName {
        let src = source_name(rel);
        self.opts.table_map.get(&src).cloned().unwrap_or(src)
    }

    fn target_sql_name(&self, rel: &Relation) -> String {
        self.target_name(rel).to_string()
    }

    /// The resolved target of `rel`, introspecting it if new or if the source relation
    /// changed, and creating its staging table if this session has none.
    async fn resolve(&mut self, rel: &Arc<Relation>, commit_lsn: Lsn) -> Result<(), ApplyError> {
        let r = self.resolve_inner(rel).await;
        if matches!(r, Err(ApplyError::WaitingForDdl { .. })) {
            self.ddl_failed_at = Some(commit_lsn);
        }
        r
    }

    async fn resolve_inner(&mut self, rel: &Arc<Relation>) -> Result<(), ApplyError> {
        let fresh = self
            .tables
            .get(&rel.id)
            .is_some_and(|t| Arc::ptr_eq(&t.source, rel) || *t.source == **rel);
        if !fresh {
            let target = self.target_name(rel);
            let lit = sql_literal(target.to_string().as_bytes()).unwrap_or_default();
            let ctx = format!("reading the columns of target table {target}");
            let exists = self.sql(&exists_query(&lit), &ctx).await?;
            let found = exists
                .iter()
                .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
            if !found {
                return Err(self.schema_wait(&SchemaError::MissingTable {
                    source_table: source_name(rel).to_string(),
                    target: target.to_string(),
                }));
            }
            let mut cols = self.target_columns(&lit, &ctx).await?;
            let target_sql = target.to_string();
            let shard = self.opts.shard_name.as_str();
            match self
                .ddl
                .check(shard, rel, &target.to_string(), &target_sql, &cols)
                .await
            {
                Verdict::Ready => {}
                Verdict::Wait(wait) => {
                    return Err(ApplyError::WaitingForDdl {
                        shard: self.shard().to_owned(),
                        wait,
                        at: None,
                    })
                }
                Verdict::Add { sql, retyped } => {
                    // In the target transaction of the first change that carries the column:
                    // it commits with that change and the progress row, or not at all.
                    self.begin_target_txn().await?;
                    let ctx = format!("adding the source's new column(s) to {target}: {sql}");
                    if let Err(e) = self.sql(&sql, &ctx).await {
                        // Something the column needs does not exist on the shard (its type,
                        // e.g. an enum created on the source after the shard's schema, or
                        // the type's schema, or a default's function): the operator creates
                        // it, then the column is propagated.
                        let ApplyError::Pg {
                            sqlstate, message, ..
                        } = &e
                        else {
                            return Err(e);
                        };
                        let error = format!("SQLSTATE {sqlstate}: {message}");
                        // A widening the shard refuses (a view or rule on the column, …): a
                        // shard error, not a lost connection.
                        if !retyped.is_empty()
                            && e.class() == ErrorClass::Definite
                            && !matches!(sqlstate.as_str(), "42704" | "42883" | "3F000")
                        {
                            let shard = self.opts.shard_name.clone();
                            let wait = super::ddl::DdlWait::retype_failed(
                                &shard,
                                rel,
                                &target.to_string(),
                                &sql,
                                &retyped,
                                &error,
                            );
                            return Err(ApplyError::WaitingForDdl {
                                shard,
                                wait,
                                at: None,
                            });
                        }
                        if !matches!(sqlstate.as_str(), "42704" | "42883" | "3F000") {
                            return Err(e);
                        }
                        let new_columns: Vec<String> = rel
                            .columns
                            .iter()
                            .filter(|c| !cols.iter().any(|t| t.name == c.name))
                            .map(|c| c.name.clone())
                            .collect();
                        let shard = self.opts.shard_name.clone();
                        let wait = self
                            .ddl
                            .missing_type_wait(
                                &shard,
                                rel,
                                &target.to_string(),
                                &sql,
                                &new_columns,
                                &error,
                            )
                            .await;
                        return Err(ApplyError::WaitingForDdl {
                            shard,
                            wait,
                            at: None,
                        });
                    }
                    cols = self.target_columns(&lit, &ctx).await?;
                }
            }
            self.staging_seq += 1;
            let staging = format!("reshard_stage_{}", self.staging_seq);
            let mut table = TargetTable::build(rel.clone(), &target, &cols, staging)
                .map_err(|e| self.schema_wait(&e))?;
            if let Some(key) = self
                .opts
                .row_owner
                .as_ref()
                .and_then(|o| o.keys.get(&target))
            {
                if table.guard_owner(key) {
                    debug!(table = %target, key = %key, "rows of other owners are guarded");
                }
            }
            self.ddl.matched(rel);
            debug!(table = %target, key = ?table.key_mode, "resolved target table");
            self.tables.insert(rel.id, table);
        }
        let Some(table) = self.tables.get(&rel.id) else {
            return Ok(());
        };
        if !self
            .staging_ready
            .get(&table.staging)
            .copied()
            .unwrap_or(false)
        {
            let (sql, name, target) = (
                table.create_staging_sql(),
                table.staging.clone(),
                table.target.clone(),
            );
            self.sql(&sql, &format!("creating the staging table for {target}"))
                .await?;
            self.staging_ready.insert(name, true);
        }
        Ok(())
    }

    /// A shard table that does not fit its source table waits for DDL on the shard.
    fn schema_wait(&self, e: &SchemaError) -> ApplyError {
        ApplyError::WaitingForDdl {
            shard: self.shard().to_owned(),
            wait: super::ddl::DdlWait::from_schema(e),
            at: None,
        }
    }

    /// The shard table's columns (`regclass_literal`: its quoted name as an SQL literal).
    async fn target_columns(
        &mut self,
        regclass_literal: &str,
        ctx: &str,
    ) -> Result<Vec<TargetColumn>, ApplyError> {
        let rows = self.sql(&columns_query(regclass_literal), ctx).await?;
        Ok(super::schema::target_columns(&rows))
    }

    /// Writes the buffer into the target transaction: set-based, or change by change when the
    /// fold says so or a set-based statement hits a constraint or data error.
    async fn flush(&mut self) -> Result<(), ApplyError> {
        self.flush_or_hold(false).await.map(drop)
    }

    /// [`Self::flush`]; with `hold`, the set-based flush's merge statements are returned
    /// instead of sent when the target transaction is already open (its progress-row lock
    /// already checked): the caller sends them with the commit, in one request.
    async fn flush_or_hold(&mut self, hold: bool) -> Result<Option<Held>, ApplyError> {
        if self.buffer.is_empty() {
            return Ok(None);
        }
        // The target transaction begins with the flush's first statements (see
        // `flush_set_based`) or in `flush_ordered`.
        let buffer = std::mem::take(&mut self.buffer);
        let first = buffer.first().map(|(l, _)| *l).unwrap_or_default();
        let last = buffer.last().map(|(l, _)| *l).unwrap_or_default();
        let ordered = self.ordered_until.is_some_and(|u| first <= u);
        if !ordered {
            self.ordered_until = None;
        }
        let outcome = if ordered {
            self.flush_ordered(&buffer, "replaying after a failed set-based flush")
                .await
                .map(|()| None)
        } else {
            match self.flush_set_based(&buffer, hold).await {
                Ok(Some(held)) => Ok(held),
                // Nothing was written: the same target transaction can take the changes one by
                // one.
                Ok(None) => self
                    .flush_ordered(&buffer, "a relation changed inside the flush")
                    .await
                    .map(|()| None),
                // The transaction is aborted and earlier flushes of it are no longer in memory:
                // roll back and re-read from the log (see `after_step`). A table that inserted
                // directly merges for a while: the conflict may be a load overlapping the
                // stream, which would meet the next flush too.
                Err(e) if replayable(&e) => {
                    for id in std::mem::take(&mut self.direct_in_flush) {
                        self.merge_only.insert(id, MERGE_FLUSHES_AFTER_CONFLICT);
                    }
                    Err(ApplyError::ReplayFromLog {
                        shard: self.shard().to_owned(),
                        up_to: last,
                        cause: e.to_string(),
                    })
                }
                Err(e) => Err(e),
            }
        };
        let held = outcome?;
        self.status.send_modify(|s| s.flushes += 1);
        self.buffer_bytes = 0;
        self.buffer_committed = 0;
        Ok(held)
    }

    /// Folds and writes `buffer` set-based; the changes of a table whose fold asks for the
    /// ordered path are written change by change. `Ok(None)` if a relation changed inside the
    /// buffer (nothing was written: the caller takes the ordered path for all of it);
    /// `Ok(Some(None))` when written; `Ok(Some(Some(held)))` when the merge statements are
    /// held back for the commit (see [`Self::flush_or_hold`]).
    async fn flush_set_based(
        &mut self,
        buffer: &[(Lsn, Change)],
        hold: bool,
    ) -> Result<Option<Option<Held>>, ApplyError> {
        // Per source table, in order of first appearance.
        let mut order: Vec<TableId> = Vec::new();
        let mut folds: foldhash::HashMap<TableId, Fold> = foldhash::HashMap::default();
        for (lsn, c) in buffer {
            let Some(rel) = c.relation() else { continue };
            if !order.contains(&rel.id) {
                self.resolve(rel, *lsn).await?;
                let fold = match self.tables.get(&rel.id) {
                    Some(t) if t.rows_may_repeat() => Fold::rows_may_repeat(t.key_idx.clone()),
                    Some(t) => Fold::new(t.key_idx.clone()),
                    None => Fold::new(Vec::new()),
                };
                folds.insert(rel.id, fold);
                order.push(rel.id);
            } else if !self
                .tables
                .get(&rel.id)
                .is_some_and(|t| Arc::ptr_eq(&t.source, rel) || *t.source == **rel)
            {
                // The relation changed inside this flush: take the safe path.
                return Ok(None);
            }
            if let Some(f) = folds.get_mut(&rel.id) {
                f.push(c).map_err(|e| ApplyError::Fold {
                    shard: self.shard().to_owned(),
                    table: source_name(rel).to_string(),
                    commit_lsn: *lsn,
                    source: e,
                })?;
            }
        }
        let mut folded = Vec::with_capacity(order.len());
        let mut ordered: Vec<TableId> = Vec::new();
        for id in &order {
            if let Some(f) = folds.remove(id) {
                let f = f.finish();
                if f.needs_ordered {
                    ordered.push(*id);
                } else {
                    folded.push((*id, f));
                }
            }
        }
        let first = buffer.first().map(|(l, _)| *l).unwrap_or_default();
        let last = buffer.last().map(|(l, _)| *l).unwrap_or_default();
        let mut statements = Vec::new();
        let mut copy = BytesMut::new();
        self.direct_in_flush.clear();
        for (id, f) in &folded {
            let Some(table) = self.tables.get(id) else {
                continue;
            };
            let direct = table.takes_direct_inserts() && !self.merge_only.contains_key(id);
            if !direct {
                if let Some(n) = self.merge_only.get_mut(id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.merge_only.remove(id);
                    }
                }
            }
            let shard = &self.opts.shard_name;
            let encode_error = |e| ApplyError::Encode {
                shard: shard.to_owned(),
                table: table.target.clone(),
                commit_lsn: last,
                source: e,
            };
            // A small flush carries its rows inside the merge statements: no COPY round trips,
            // no staging table to truncate.
            if let Some(tb) = encode_table_inline(table, f, direct, Some(&mut self.prepared))
                .map_err(encode_error)?
            {
                if tb.direct_rows > 0 {
                    self.direct_in_flush.push(*id);
                }
                statements.extend(tb.statements);
                continue;
            }
            copy.clear();
            let mut direct_buf = BytesMut::new();
            let tb = encode_table(table, f, &mut copy, direct.then_some(&mut direct_buf))
                .map_err(encode_error)?;
            let (copy_sql, copy_target_sql, target) = (
                table.copy_sql(),
                table.copy_target_sql(),
                table.target.clone(),
            );
            // COPY needs the target transaction open (else it would commit on its own).
            if tb.rows > 0 || tb.direct_rows > 0 {
                self.begin_target_txn().await?;
            }
            if tb.rows > 0 {
                let ctx = format!(
                    "copying {} rows of target table {target} for source commits {first}..{last}",
                    tb.rows
                );
                self.copy_in(&copy_sql, &mut copy, &ctx).await?;
                statements.extend(tb.statements);
            }
            if tb.direct_rows > 0 {
                // Before the merge statements: a unique value their deletes free for one of
                // these rows is a constraint error, replayed in source order.
                self.direct_in_flush.push(*id);
                let ctx = format!(
                    "copying {} new rows into target table {target} for source commits {first}..{last}",
                    tb.direct_rows
                );
                self.copy_in(&copy_target_sql, &mut direct_buf, &ctx)
                    .await?;
            }
        }
        if hold && self.in_target_txn && ordered.is_empty() {
            return Ok(Some(Some(Held {
                sql: statements.join(";\n"),
                up_to: last,
                direct: std::mem::take(&mut self.direct_in_flush),
            })));
        }
        if !statements.is_empty() {
            let tables: Vec<&str> = folded
                .iter()
                .filter_map(|(id, _)| self.tables.get(id).map(|t| t.target.as_str()))
                .collect();
            let ctx = format!(
                "applying {} changes to {} for source commits {first}..{last}",
                buffer.len(),
                tables.join(", ")
            );
            let msgs = self
                .sql_in_target_txn(&statements.join(";\n"), &ctx)
                .await?;
            self.check_owners(&msgs, first)?;
        }
        if !ordered.is_empty() {
            // Only the tables whose changes cannot be folded go change by change (in source
            // order, after the set-based tables): one REPLICA IDENTITY FULL table without a key
            // does not slow the others down. The order across tables does not matter to the
            // target; where it would (a foreign key checked without session_replication_role =
            // replica), the violation is replayable and the whole flush is replayed in source
            // order.
            let changes: Vec<(Lsn, Change)> = buffer
                .iter()
                .filter(|(_, c)| c.relation().is_some_and(|r| ordered.contains(&r.id)))
                .cloned()
                .collect();
            self.flush_ordered(&changes, "changes of a table that cannot be folded")
                .await?;
        }
        Ok(Some(None))
    }

    async fn copy_in(
        &mut self,
        sql: &str,
        data: &mut BytesMut,
        ctx: &str,
    ) -> Result<(), ApplyError> {
        self.finish_commit().await?;
        let client = self.client()?;
        let err = |e: tokio_postgres::Error| ApplyError::pg(self.shard(), ctx, &e);
        let sink = client.copy_in::<str, Bytes>(sql).await.map_err(err)?;
        let mut sink = std::pin::pin!(sink);
        while !data.is_empty() {
            let n = data.len().min(COPY_CHUNK_BYTES);
            let chunk = data.split_to(n).freeze();
            sink.as_mut().feed(chunk).await.map_err(err)?;
        }
        sink.as_mut().finish().await.map_err(err)?;
        Ok(())
    }

    /// Applies `buffer` one change at a time, in source order. An error here is about exactly
    /// one change, and says which.
    async fn flush_ordered(
        &mut self,
        buffer: &[(Lsn, Change)],
        why: &str,
    ) -> Result<(), ApplyError> {
        debug!(changes = buffer.len(), why, "applying change by change");
        self.begin_target_txn().await?;
        for (lsn, c) in buffer {
            let Some(rel) = c.relation() else { continue };
            self.resolve(rel, *lsn).await?;
            let Some(table) = self.tables.get(&rel.id) else {
                continue;
            };
            let sql = change_sql(table, c).map_err(|e| ApplyError::Encode {
                shard: self.shard().to_owned(),
                table: table.target.clone(),
                commit_lsn: *lsn,
                source: e,
            })?;
            let Some(sql) = sql else { continue };
            let (before, after) =
                owner_sql_for_change(table, c).map_err(|e| ApplyError::Encode {
                    shard: self.shard().to_owned(),
                    table: table.target.clone(),
                    commit_lsn: *lsn,
                    source: e,
                })?;
            let sql = [before, Some(sql), after]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(";\n");
            let ctx = format!(
                "{} on target table {} key {} at source commit {lsn}",
                c.kind(),
                table.target,
                key_text(table, c)
            );
            let msgs = match self.sql(&sql, &ctx).await {
                Ok(msgs) => msgs,
                Err(e) => {
                    if is_value_error(&e) {
                        self.value_error_at = Some((Arc::clone(rel), *lsn));
                    }
                    return Err(e);
                }
            };
            self.check_owners(&msgs, *lsn)?;
        }
        Ok(())
    }

    /// With [`ApplyOptions::row_owner`]: the rows of the owner checks in `msgs` (see
    /// [`TargetTable::owner_rows_sql`]): a row the changes touch that belongs to another
    /// owner, or an insert that did not land, stops the flush (its target transaction is
    /// rolled back with the session) before `commit_lsn`.
    fn check_owners(&self, msgs: &[SimpleQueryMessage], commit_lsn: Lsn) -> Result<(), ApplyError> {
        let Some(owner) = &self.opts.row_owner else {
            return Ok(());
        };
        for m in msgs {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let lost = match r.get(0) {
                Some(OWNER_LOST) => true,
                Some(OWNER_ROW) => false,
                _ => continue,
            };
            let op: u32 = r.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let table = r.get(2).unwrap_or_default().to_owned();
            let row_value = r.get(4);
            let column = self
                .tables
                .values()
                .find(|t| t.target == table)
                .and_then(|t| t.source.columns.get(t.owner()?.source_idx));
            let type_oid = column.map_or(0, |c| c.type_oid);
            let foreign = lost || row_value.is_none_or(|v| !(owner.owns)(type_oid, v.as_bytes()));
            if !foreign {
                continue;
            }
            let kind = op_kind(op);
            return Err(ApplyError::ForeignRow(Box::new(super::error::ForeignRow {
                shard: self.shard().to_owned(),
                owner: owner.owner.clone(),
                table,
                key: r.get(3).unwrap_or_default().to_owned(),
                op: kind,
                verb: match kind {
                    "INSERT" => "replace",
                    "UPDATE" => "update",
                    _ => "delete",
                },
                column: column.map_or_else(|| "shard key".to_owned(), |c| c.name.clone()),
                row_value: row_value.unwrap_or("NULL").to_owned(),
                change_value: r.get(5).unwrap_or("unknown").to_owned(),
                commit_lsn,
                advice: owner.advice.clone(),
            })));
        }
        Ok(())
    }

    /// Flushes and commits the group with its progress row.
    async fn commit_group(&mut self) -> Result<(), ApplyError> {
        self.commit_group_with(false).await
    }

    /// [`Self::commit_group`]; with `defer`, the last request (the held merge statements, the
    /// progress row and COMMIT) is left in flight, and answered before anything else is sent
    /// ([`Self::finish_commit`]).
    async fn commit_group_with(&mut self, defer: bool) -> Result<(), ApplyError> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        let Some(pos) = group.position() else {
            // Only skipped or still-open transactions: nothing to commit.
            if self.current.is_some_and(|(_, skip)| !skip) {
                self.group = Some(group);
            }
            return Ok(());
        };
        let held = self.flush_or_hold(true).await?;
        self.begin_target_txn().await?;
        let (end, time) = match group.last {
            Some(c) if c.commit_lsn >= pos => (c.end_lsn, Some(c.commit_time)),
            Some(c) => (pos, Some(c.commit_time)),
            None => (pos, None),
        };
        let commit = format!("{}; COMMIT", self.key.update_sql(pos, end, time));
        let (sql, replay_up_to, direct) = match held {
            Some(h) if h.sql.is_empty() => (commit, Some(h.up_to), h.direct),
            Some(h) => (format!("{};\n{commit}", h.sql), Some(h.up_to), h.direct),
            None => (commit, None, Vec::new()),
        };
        let context = format!("committing source transactions up to {pos}");
        // Queued on the connection when this returns (`simple_query_raw` sends, then hands
        // back the stream of answers).
        let answer = self
            .client()?
            .simple_query_raw(&sql)
            .await
            .map_err(|e| ApplyError::pg(self.shard(), &context, &e))?;
        self.in_target_txn = false;
        crate::trace::record(crate::trace::Stage::Sent, &group.commit_times);
        self.in_flight = Some(InFlight {
            answer: Box::pin(answer),
            context,
            replay_up_to,
            direct,
            pos,
            end,
            time,
            group,
        });
        if !defer {
            self.finish_commit().await?;
        }
        Ok(())
    }

    /// Waits for the answer of the commit in flight, if any, and records what it made durable.
    /// On an error the transaction is left to be rolled back (a multi-statement simple query
    /// stops at its failing statement); a replayable error of a carried flush asks for the
    /// replay from the log, as [`Self::flush`] does.
    async fn finish_commit(&mut self) -> Result<(), ApplyError> {
        let Some(f) = self.in_flight.as_mut() else {
            return Ok(());
        };
        // Cancel-safe: an answer taken from the stream is not needed (the request has no
        // rows); dropping this leaves the rest in the stream.
        let r = loop {
            match f.answer.try_next().await {
                Ok(Some(_)) => continue,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let Some(f) = self.in_flight.take() else {
            return Ok(());
        };
        if let Err(e) = r {
            self.in_target_txn = true;
            let e = ApplyError::pg(self.shard(), &f.context, &e);
            return match f.replay_up_to {
                Some(up_to) if replayable(&e) => {
                    for id in f.direct {
                        self.merge_only.insert(id, MERGE_FLUSHES_AFTER_CONFLICT);
                    }
                    Err(ApplyError::ReplayFromLog {
                        shard: self.shard().to_owned(),
                        up_to,
                        cause: e.to_string(),
                    })
                }
                _ => Err(e),
            };
        }
        let (pos, end, time, group) = (f.pos, f.end, f.time, f.group);
        self.applied = pos;
        if self.ordered_until.is_some_and(|u| pos >= u) {
            self.ordered_until = None;
        }
        self.committed_any = true;
        // A heartbeat read while the commit was in flight lies past it: kept.
        if self.pending_heartbeat.is_some_and(|h| h <= pos) {
            self.pending_heartbeat = None;
        }
        self.last_heartbeat_write = Instant::now();
        self.log.applied(self.opts.shard, pos);

        crate::trace::record(crate::trace::Stage::Committed, &group.commit_times);
        let now = pg_now();
        if let Ok(mut h) = self.latency.lock() {
            for t in &group.commit_times {
                h.saturating_record(now.saturating_sub(*t).max(0) as u64);
            }
        }
        let txns = group.commit_times.len() as u64;
        // Paused only once nothing more is committed: no open source transaction, and no
        // group folded in meanwhile (`PAUSE <shard>` answers on this state).
        let quiet = self.paused && self.current.is_none() && self.group.is_none();
        self.status.send_modify(|s| {
            s.state = if quiet {
                ApplyState::Paused
            } else {
                ApplyState::Running
            };
            s.applied_commit_lsn = pos;
            s.applied_end_lsn = end;
            s.quiet_through = s.quiet_through.max(pos);
            if time.is_some() {
                s.last_commit_time = time;
            }
            s.txns_applied += txns;
            s.rows_inserted += group.inserted;
            s.rows_updated += group.updated;
            s.rows_deleted += group.deleted;
            s.truncates += group.truncates;
            if group.has_data {
                s.batches += 1;
            }
            s.last_error = None;
        });
        debug!(commit_lsn = %pos, txns, "committed");
        self.publish_quiet();
        Ok(())
    }

    /// Publishes the pending heartbeat as [`ShardStatus::quiet_through`] when nothing is
    /// waiting to be applied below it: no open transaction, group or commit in flight.
    fn publish_quiet(&self) {
        let Some(h) = self.pending_heartbeat else {
            return;
        };
        if self.current.is_none() && self.group.is_none() && self.in_flight.is_none() {
            self.status.send_if_modified(|s| {
                let newer = h > s.quiet_through;
                s.quiet_through = s.quiet_through.max(h);
                newer
            });
        }
    }

    /// Records an idle shard's heartbeat position in its own small transaction.
    async fn write_heartbeat(&mut self) -> Result<(), ApplyError> {
        self.finish_commit().await?;
        let Some(lsn) = self.pending_heartbeat else {
            return Ok(());
        };
        if lsn <= self.applied || self.group.is_some() {
            self.pending_heartbeat = None;
            return Ok(());
        }
        if self.paused {
            // Kept: written once the shard is resumed.
            return Ok(());
        }
        let mut g = Group::new();
        g.heartbeat = Some(lsn);
        self.group = Some(g);
        self.commit_group().await
    }

    /// Shutdown: commit complete source transactions if the open one has not been written into
    /// the target transaction yet; otherwise roll everything back (it is re-read on restart).
    async fn shut_down(&mut self) -> Result<(), ApplyError> {
        self.finish_commit().await?;
        if self.current.is_some_and(|(_, skip)| !skip) {
            if self.partial_flushed {
                info!("shutdown inside a partly written source transaction: rolling back the open batch");
                if self.in_target_txn {
                    self.sql("ROLLBACK", "rolling back at shutdown").await?;
                    self.in_target_txn = false;
                }
                self.group = None;
                return Ok(());
            }
            self.buffer.truncate(self.buffer_committed);
            self.current = None;
        }
        self.current = None;
        self.commit_group().await?;
        if self.in_target_txn {
            self.sql("ROLLBACK", "rolling back at shutdown").await?;
            self.in_target_txn = false;
        }
        Ok(())
    }
}

/// A data error (SQLSTATE class 22) of a statement on the shard: a value its column's type does
/// not take (see `Session::after_value_error`).
fn is_value_error(e: &ApplyError) -> bool {
    e.class() == ErrorClass::Definite && e.sqlstate().is_some_and(|s| s.starts_with("22"))
}

/// Whether a failed set-based flush should be replayed change by change: a constraint (23) or
/// data (22) error that source order may not hit, or that replay will pin to one change.
fn replayable(e: &ApplyError) -> bool {
    e.class() == ErrorClass::Definite
        && e.sqlstate()
            .is_some_and(|s| s.starts_with("23") || s.starts_with("22") || s == "21000")
}

/// Estimated memory of a buffered change.
fn change_bytes(c: &Change) -> usize {
    let row_bytes = |r: &[Value]| -> usize {
        r.iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => b.len() + 8,
                _ => 8,
            })
            .sum()
    };
    CHANGE_OVERHEAD_BYTES
        + match c {
            Change::Insert { new, .. } => row_bytes(new),
            Change::Update { old, new, .. } => {
                row_bytes(new) + old.as_ref().map(|o| row_bytes(o.row())).unwrap_or(0)
            }
            Change::Delete { old, .. } => row_bytes(old.row()),
            Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => 0,
        }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next pause value; `None` if the sender is gone. Pending forever without a receiver.
async fn pause_changed(pause: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match pause {
        Some(p) => match p.changed().await {
            Ok(()) => Some(*p.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}
