//! Reverse replication: after a fenced cutover of shard S, the writes the application makes on
//! S stream back to the source, so the source stays a complete fallback until `reshard
//! rollback` (or for as long as S serves its accounts).
//!
//! Wiring only: the forward direction's stages, pointed the other way. S's slot and
//! publication (created by the cutover, recorded in `reshard.reverse`, see [`crate::pg::reverse`])
//! → [`Ingest`] (decode, transaction assembly, a router with one target, the source) → a spill
//! log of its own (`<[spill] dir>/reverse/<slot>`, confirmed to S's slot once durable) → one
//! [`ShardApplier`] writing the source: batched, its progress row `reverse:<S>` (keyed by S's
//! system id and slot) in the same source transaction, so exactly once across restarts. The
//! start-up proof ([`startup::plan`]) guards the reverse log like the forward one.
//!
//! - **No loop.** The source applies under the replication origin `reshard_reverse_<S>`
//!   (`pg_replication_origin_session_setup`), so pgoutput marks those transactions with an
//!   Origin message, and every ingest drops transactions of origins named
//!   [`ORIGIN_PREFIX`](crate::pg::reverse::ORIGIN_PREFIX)`…` ([`Assembler::skip_origins`](crate::decode::Assembler::skip_origins)):
//!   a row S sent back never returns to S. (PostgreSQL 16's `origin = none` would drop every
//!   origin, also the platform's own subscriptions; the prefix drops only reshard's.)
//! - **Through the fence.** The apply runs with `session_replication_role = replica`, so the
//!   source's fence on S's accounts (an ordinary trigger) does not refuse it, and neither do
//!   the source's own triggers fire twice.
//! - **Broadcast tables are not replicated back.** S's publication lists only the sharded
//!   tables (S's share), without TRUNCATE (on S it would mean "S's share", on the source
//!   "every shard's rows"). The source stays the only writer of broadcast tables; the forward
//!   stream keeps sending them to every shard, S included.
//! - **Several shards at once** merge into the one source: one stream, one origin and one
//!   progress row per shard; their rows never conflict (their accounts are disjoint).
//!
//! [`spawn`] starts the watcher: every second it reads `reshard.reverse` on the source, starts a
//! stream for each shard that is `streaming` or `draining`, stops the stream of a shard that is
//! `rolled_back` and drops its slot and publication on S and its local log.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::apply::{ApplyError, ApplyOptions, ApplyState, ShardApplier, ShardStatus};
use crate::config::{Config, TableMode as CfgMode};
use crate::error::{Classify, ErrorClass};
use crate::event::{pg_now, ShardId};
use crate::lsn::Lsn;
use crate::pg::catalog::SourceTable;
use crate::pg::progress::{read_progress, ProgressError};
use crate::pg::reverse::{self as record, ReverseRow, ReverseState, ReverseTableError};
use crate::quarantine::{Quarantine, QuarantineError};
use crate::route::{self, RouteError, RouteSpec, Router};
use crate::runtime::ingest::{
    start_streaming, Ingest, IngestCounters, IngestError, IngestOptions, UnroutableHandling,
};
use crate::runtime::startup::{self, StartupError};
use crate::shutdown::{self, ShutdownRx, ShutdownTx};
use crate::source::{list_slots, ConnConfig, ReplicationClient, SourceError};
use crate::spill::{SpillError, SpillIdentity, SpillLog, SpillOptions, SpillWriter};
use crate::status::ReverseView;

/// How often the watcher reads `reshard.reverse`.
const POLL: Duration = Duration::from_secs(1);
/// How often the watcher publishes the streams' state (the daemon's status refresh).
const PUBLISH: Duration = Duration::from_millis(250);
/// The one target of a reverse stream (the spill log's only "shard").
const SOURCE_TARGET: &str = "source";

/// Why a reverse stream could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    /// `reshard.reverse` names a shard the config does not have.
    #[error("reshard.reverse on the source names shard {shard}, which the config does not list; add it back to [[shards]], or roll it back with the config that cut it over")]
    UnknownShard {
        /// The shard.
        shard: String,
    },
    /// The shard's connection or a replication command.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// The slot the cutover created is gone.
    #[error("the reverse slot {slot} on shard {shard} does not exist: the writes S took since its cutover can no longer stream back. If they are on the source already, run `reshard rollback --shard {shard}`; otherwise recreate nothing, and copy them by hand")]
    SlotMissing {
        /// The shard.
        shard: String,
        /// The slot.
        slot: String,
    },
    /// The shard's URL now leads to another server than the one cut over.
    #[error("shard {shard} is now system {found}, but its reverse slot was created on system {expected}: the config's url for it changed; point it back at the server that was cut over")]
    OtherSystem {
        /// The shard.
        shard: String,
        /// Recorded at cutover.
        expected: String,
        /// Found now.
        found: String,
    },
    /// The reverse spill log.
    #[error("{0}")]
    Spill(#[from] SpillError),
    /// The reverse spill log, the slot and the source's progress row do not prove a lossless start.
    #[error("{0}")]
    Startup(StartupError),
    /// The source's progress row.
    #[error("{0}")]
    Progress(#[from] ProgressError),
    /// `reshard.reverse`.
    #[error("{0}")]
    Table(#[from] ReverseTableError),
    /// The quarantine (never written: every reverse table is routed to the source).
    #[error("{0}")]
    Quarantine(#[from] QuarantineError),
    /// Routing set-up.
    #[error("{0}")]
    Route(#[from] RouteError),
    /// Reading from the shard stopped.
    #[error("reading from the shard: {0}")]
    Ingest(Box<IngestError>),
    /// Applying to the source stopped.
    #[error("applying to the source: {0}")]
    Apply(Box<ApplyError>),
    /// A task could not be started or joined.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StartupError> for ReverseError {
    fn from(e: StartupError) -> ReverseError {
        ReverseError::Startup(e)
    }
}

impl From<IngestError> for ReverseError {
    fn from(e: IngestError) -> ReverseError {
        ReverseError::Ingest(Box::new(e))
    }
}

impl From<ApplyError> for ReverseError {
    fn from(e: ApplyError) -> ReverseError {
        ReverseError::Apply(Box::new(e))
    }
}

impl Classify for ReverseError {
    fn class(&self) -> ErrorClass {
        match self {
            ReverseError::Source(e) => e.class(),
            ReverseError::Spill(e) => e.class(),
            ReverseError::Progress(e) => e.class(),
            ReverseError::Table(e) => e.class(),
            ReverseError::Ingest(e) => e.class(),
            ReverseError::Apply(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// The running watcher.
pub struct ReverseHandle {
    /// One view per shard of `reshard.reverse` (what `status`, `lag`, the console and the
    /// metrics show).
    pub views: watch::Receiver<Vec<ReverseView>>,
    /// Ends after shutdown, once every stream stopped.
    pub task: JoinHandle<()>,
}

/// Starts the watcher of `reshard.reverse` (see the module doc). `tables` are the forward
/// direction's replicated tables.
pub fn spawn(
    cfg: Config,
    tables: Vec<SourceTable>,
    shutdown: ShutdownRx,
) -> Result<ReverseHandle, ReverseError> {
    let source = ConnConfig::parse(&cfg.source.url)?;
    let (views_tx, views) = watch::channel(Vec::new());
    let w = Watcher {
        cfg,
        tables,
        source,
        sql: None,
        streams: HashMap::new(),
        rows: Vec::new(),
        cleaned: HashSet::new(),
        failures: HashMap::new(),
        views_tx,
        table_error: None,
    };
    let task = tokio::spawn(w.run(shutdown));
    Ok(ReverseHandle { views, task })
}

/// A stream that failed to start or stopped: why, and when to try again.
struct Failure {
    message: String,
    retry_at: Instant,
    backoff: Duration,
}

struct Watcher {
    cfg: Config,
    tables: Vec<SourceTable>,
    source: ConnConfig,
    sql: Option<tokio_postgres::Client>,
    streams: HashMap<String, Stream>,
    rows: Vec<ReverseRow>,
    /// `(shard, epoch)` whose slot, publication and log were removed after their rollback.
    cleaned: HashSet<(String, i32)>,
    failures: HashMap<String, Failure>,
    views_tx: watch::Sender<Vec<ReverseView>>,
    table_error: Option<String>,
}

impl Watcher {
    async fn run(mut self, mut shutdown: ShutdownRx) {
        let mut tick = tokio::time::interval(PUBLISH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_poll: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                // This is cancellation-safe.
                _ = shutdown.requested() => break,
                // This is cancellation-safe.
                _ = tick.tick() => {
                    if last_poll.is_none_or(|t| t.elapsed() >= POLL) {
                        last_poll = Some(Instant::now());
                        self.step().await;
                    } else {
                        let rows = self.rows.clone();
                        self.publish(&rows);
                    }
                }
            }
        }
        for (shard, s) in self.streams.drain() {
            if let Err(e) = s.stop().await {
                tracing::warn!(shard = %shard, error = %e, "reverse stream stopped with an error");
            }
        }
    }

    async fn step(&mut self) {
        match self.read_rows().await {
            Ok(rows) => {
                if self.table_error.take().is_some() {
                    tracing::info!("reading reshard.reverse on the source again");
                }
                self.rows = rows;
            }
            Err(e) => {
                // Keep the streams as they are: the source may be restarting.
                if self.table_error.is_none() {
                    tracing::warn!(error = %e, "cannot read reshard.reverse on the source; reverse streams keep their state until it answers");
                }
                self.table_error = Some(e);
                self.sql = None;
            }
        }
        let rows = self.rows.clone();
        // Streams whose row is gone, rolled back, or of an older epoch.
        let stale: Vec<String> = self
            .streams
            .iter()
            .filter(|(shard, s)| {
                !rows
                    .iter()
                    .any(|r| &r.shard == *shard && r.epoch == s.row.epoch && r.state.streams())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for shard in stale {
            if let Some(s) = self.streams.remove(&shard) {
                tracing::info!(shard = %shard, slot = %s.row.slot, "stopping the reverse stream (rolled back)");
                if let Err(e) = s.stop().await {
                    tracing::warn!(shard = %shard, error = %e, "reverse stream stopped with an error");
                }
            }
        }
        for row in &rows {
            match row.state {
                ReverseState::Streaming | ReverseState::Draining => {
                    self.ensure_running(row).await;
                }
                ReverseState::RolledBack => {
                    let key = (row.shard.clone(), row.epoch);
                    if !self.cleaned.contains(&key) && self.clean_up(row).await {
                        self.cleaned.insert(key);
                    }
                }
                ReverseState::Starting => {}
            }
        }
        self.publish(&rows);
    }

    async fn read_rows(&mut self) -> Result<Vec<ReverseRow>, String> {
        if self.sql.is_none() {
            self.sql = Some(self.source.connect_sql().await.map_err(|e| e.to_string())?);
        }
        let Some(sql) = &self.sql else {
            return Ok(Vec::new());
        };
        record::read_all(sql).await.map_err(|e| e.to_string())
    }

    async fn ensure_running(&mut self, row: &ReverseRow) {
        if let Some(s) = self.streams.get_mut(&row.shard) {
            s.row.state = row.state;
            s.row.drain_lsn = row.drain_lsn;
            if !s.task.is_finished() {
                return;
            }
            let Some(s) = self.streams.remove(&row.shard) else {
                return;
            };
            let e = match s.task.await {
                Ok(Ok(())) => "stopped".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("task failed: {e}"),
            };
            tracing::error!(shard = %row.shard, error = %e, "reverse stream stopped; restarting it");
            self.failed(&row.shard, e);
            return;
        }
        if self
            .failures
            .get(&row.shard)
            .is_some_and(|f| Instant::now() < f.retry_at)
        {
            return;
        }
        match Stream::start(&self.cfg, &self.tables, row).await {
            Ok(s) => {
                tracing::info!(shard = %row.shard, slot = %row.slot, epoch = row.epoch, "reverse stream started: the shard's writes stream back to the source");
                self.failures.remove(&row.shard);
                self.streams.insert(row.shard.clone(), s);
            }
            Err(e) => {
                tracing::warn!(shard = %row.shard, slot = %row.slot, error = %e, "cannot start the reverse stream; retrying");
                self.failed(&row.shard, e.to_string());
            }
        }
    }

    fn failed(&mut self, shard: &str, message: String) {
        let initial = Duration::from_millis(self.cfg.apply.retry_initial_ms.max(1));
        let max = Duration::from_millis(self.cfg.apply.retry_max_ms.max(1));
        let backoff = self
            .failures
            .get(shard)
            .map_or(initial, |f| (f.backoff * 2).min(max));
        self.failures.insert(
            shard.to_owned(),
            Failure {
                message,
                retry_at: Instant::now() + backoff,
                backoff,
            },
        );
    }

    /// After a rollback: drops the slot (once no one reads it) and the publication on the
    /// shard, and the local log. Returns whether everything is gone.
    async fn clean_up(&self, row: &ReverseRow) -> bool {
        let dir = reverse_dir(&self.cfg, row);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the reverse spill log of a rolled-back shard");
                return false;
            }
        }
        let Some(shard) = self.cfg.shards.iter().find(|s| s.name == row.shard) else {
            return true;
        };
        let client = match ConnConfig::parse(&shard.url) {
            Ok(c) => c.connect_sql().await,
            Err(e) => Err(e),
        };
        let r = match client {
            Ok(c) => record::drop_on_shard(&c, row)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(true) => {
                tracing::info!(shard = %row.shard, slot = %row.slot, "rolled back: dropped the reverse slot and publication on the shard");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::debug!(shard = %row.shard, slot = %row.slot, error = %e, "cannot drop the reverse slot yet");
                false
            }
        }
    }

    fn publish(&self, rows: &[ReverseRow]) {
        let views = rows
            .iter()
            .map(|row| {
                let mut v = row.view();
                if let Some(s) = self.streams.get(&row.shard) {
                    s.fill(&mut v);
                }
                if let Some(f) = self.failures.get(&row.shard) {
                    v.last_error = Some(f.message.clone());
                    if !self.streams.contains_key(&row.shard) {
                        v.stream = "retrying".into();
                    }
                }
                v
            })
            .collect();
        self.views_tx.send_replace(views);
    }
}

/// The local directory of a reverse stream's spill log.
fn reverse_dir(cfg: &Config, row: &ReverseRow) -> PathBuf {
    cfg.spill.dir.join("reverse").join(&row.slot)
}

/// One shard's running reverse stream.
struct Stream {
    row: ReverseRow,
    stop: ShutdownTx,
    status: watch::Receiver<ShardStatus>,
    counters: Arc<IngestCounters>,
    task: JoinHandle<Result<(), ReverseError>>,
}

impl Stream {
    /// Proves the local log covers what the source still needs, starts streaming from the
    /// shard's slot, and spawns the ingest thread and the apply task.
    async fn start(
        cfg: &Config,
        tables: &[SourceTable],
        row: &ReverseRow,
    ) -> Result<Stream, ReverseError> {
        let shard_cfg = cfg
            .shards
            .iter()
            .find(|s| s.name == row.shard)
            .ok_or_else(|| ReverseError::UnknownShard {
                shard: row.shard.clone(),
            })?;
        let shard_conn = ConnConfig::parse(&shard_cfg.url)?;
        let source_conn = ConnConfig::parse(&cfg.source.url)?;
        let mut repl = ReplicationClient::connect(&shard_conn).await?;
        let system = repl.identify_system().await?;
        if system.system_id != row.shard_system_id {
            return Err(ReverseError::OtherSystem {
                shard: row.shard.clone(),
                expected: row.shard_system_id.clone(),
                found: system.system_id,
            });
        }
        let shard_sql = shard_conn.connect_sql().await?;
        let slot = list_slots(&shard_sql)
            .await?
            .into_iter()
            .find(|s| s.slot_name == row.slot)
            .ok_or_else(|| ReverseError::SlotMissing {
                shard: row.shard.clone(),
                slot: row.slot.clone(),
            })?;
        drop(shard_sql);

        let dir = reverse_dir(cfg, row);
        let spill_opts = SpillOptions {
            dir: dir.clone(),
            ..SpillOptions::from(&cfg.spill)
        };
        let identity = SpillIdentity {
            system_id: row.shard_system_id.clone(),
            slot: row.slot.clone(),
            shards: vec![SOURCE_TARGET.to_owned()],
        };
        let (mut writer, report) =
            tokio::task::spawn_blocking(move || SpillWriter::open(spill_opts, identity))
                .await
                .map_err(|e| {
                    ReverseError::Internal(format!("opening the reverse spill log: {e}"))
                })??;
        let log: Arc<SpillLog> = Arc::new(writer.log());

        let source_sql = source_conn.connect_sql().await?;
        let progress_shard = row.progress_shard();
        let progress = read_progress(
            &source_sql,
            &row.slot,
            &progress_shard,
            Some(&row.shard_system_id),
        )
        .await?;
        drop(source_sql);
        let plan = startup::plan(
            &row.slot,
            startup::SlotState::Exists {
                confirmed_flush_lsn: slot.confirmed_flush_lsn.unwrap_or_default(),
            },
            &startup::LogState {
                dir: dir.clone(),
                migration_id: report.migration_id.clone(),
                start_lsn: report.start_lsn,
                durable_lsn: report.durable_lsn,
            },
            &[startup::ShardState {
                name: progress_shard.clone(),
                progress: progress.as_ref().map(|p| p.commit_lsn),
                migration_id: progress.and_then(|p| p.migration_id),
                has_load_records: false,
                oldest_copy_lsn: None,
            }],
            || startup::new_migration_id(&row.shard_system_id),
        )?;
        let migration_id = plan.migration_id().to_owned();
        if let startup::Plan::Resume { log_start, .. } = &plan {
            writer.record_lineage(&migration_id, *log_start)?;
        }

        let ingest_opts = IngestOptions {
            conn: shard_conn,
            slot: row.slot.clone(),
            publication: row.publication.clone(),
            streaming: cfg.source.streaming,
            status_interval: Duration::from_millis(cfg.source.status_interval_ms),
            flush_interval: Duration::from_millis(cfg.spill.flush_interval_ms),
            stream_dir: dir.join("streams"),
            retry_initial: Duration::from_millis(cfg.apply.retry_initial_ms),
            retry_max: Duration::from_millis(cfg.apply.retry_max_ms),
        };
        let first = start_streaming(repl, &ingest_opts, report.durable_lsn).await?;
        let router = Router::new(reverse_route_spec(cfg, tables))?;
        let counters = Arc::new(IngestCounters::default());
        let ingest = Ingest::new(
            ingest_opts,
            router,
            writer,
            counters.clone(),
            report.durable_lsn,
            UnroutableHandling {
                policy: crate::config::OnUnroutable::Stop,
                quarantine: Quarantine::open(&dir, report.durable_lsn)?,
                map: None,
            },
        );

        let apply_opts = ApplyOptions {
            shard: ShardId(0),
            shard_name: progress_shard,
            source_system_id: row.shard_system_id.clone(),
            slot: row.slot.clone(),
            migration_id: Some(migration_id),
            table_map: tables
                .iter()
                .filter(|t| t.rule.mode == CfgMode::Sharded && t.rule.target != t.rule.source)
                .map(|t| (t.rule.target.clone(), t.rule.source.clone()))
                .collect(),
            // Through the source's fence, without firing its triggers a second time.
            session_replication_role_replica: true,
            replication_origin: Some(row.origin()),
            ..ApplyOptions::from_config(&cfg.apply)
        };
        let connect = move || {
            let conn = source_conn.clone();
            async move { conn.connect_sql().await }
        };
        let applier = ShardApplier::new(apply_opts, connect, log);
        let (stop, stop_rx) = shutdown::channel();
        let (status_tx, status) = watch::channel(ShardStatus {
            shard: row.progress_shard(),
            ..Default::default()
        });
        let (inner_tx, inner_rx) = shutdown::channel();
        let (pause_tx, pause_rx) = watch::channel(false);
        let span = tracing::info_span!("reverse", shard = %row.shard, slot = %row.slot);
        let ingest_done = ingest
            .spawn_thread(
                "reshard-reverse".into(),
                span.clone(),
                Some(first),
                inner_rx.clone(),
                pause_rx,
            )
            .map_err(|e| {
                ReverseError::Internal(format!("spawning the reverse ingest thread: {e}"))
            })?;
        let apply = tokio::spawn(tracing::Instrument::instrument(
            applier.run(inner_rx, status_tx),
            span,
        ));
        let task = tokio::spawn(supervise(stop_rx, inner_tx, pause_tx, ingest_done, apply));
        Ok(Stream {
            row: row.clone(),
            stop,
            status,
            counters,
            task,
        })
    }

    async fn stop(self) -> Result<(), ReverseError> {
        self.stop.shutdown();
        self.task
            .await
            .map_err(|e| ReverseError::Internal(format!("reverse stream task: {e}")))?
    }

    fn fill(&self, v: &mut ReverseView) {
        let st = self.status.borrow().clone();
        let received = self.counters.received().max(self.counters.confirmed());
        v.stream = match st.state {
            ApplyState::Starting => "starting",
            ApplyState::Running => "running",
            ApplyState::Retrying => "retrying",
            ApplyState::WaitingForDdl => "waiting_for_ddl",
            ApplyState::Paused => "paused",
            ApplyState::Stopped => "stopped",
        }
        .into();
        v.connected = self
            .counters
            .connected
            .load(std::sync::atomic::Ordering::Relaxed);
        v.received_lsn = received;
        v.applied_lsn = st.applied_commit_lsn;
        let caught_up = st.applied_commit_lsn.covers(self.counters.confirmed());
        v.lag_bytes = if caught_up {
            0
        } else {
            received.bytes_since(st.applied_commit_lsn)
        };
        v.lag_seconds = match st.last_commit_time {
            Some(t) if !caught_up => ((pg_now() - t).max(0) as f64) / 1e6,
            _ => 0.0,
        };
        v.txns_applied_total = st.txns_applied;
        v.rows_inserted_total = st.rows_inserted;
        v.rows_updated_total = st.rows_updated;
        v.rows_deleted_total = st.rows_deleted;
        v.last_error = st.last_error;
    }
}

/// Runs until `stop` (or until the ingest or the apply ends), then stops the other one.
async fn supervise(
    mut stop: ShutdownRx,
    inner: ShutdownTx,
    _pause: watch::Sender<bool>,
    mut ingest_done: oneshot::Receiver<Result<Lsn, IngestError>>,
    mut apply: JoinHandle<Result<(), ApplyError>>,
) -> Result<(), ReverseError> {
    let mut ingest_result = None;
    let mut apply_result = None;
    tokio::select! {
        biased;
        // This is cancellation-safe.
        _ = stop.requested() => {}
        // This is cancellation-safe (a oneshot receiver).
        r = &mut ingest_done => ingest_result = Some(r),
        // This is cancellation-safe (a join handle).
        r = &mut apply => apply_result = Some(r),
    }
    inner.shutdown();
    let ingest = match ingest_result {
        Some(r) => r,
        None => ingest_done.await,
    }
    .unwrap_or_else(|_| {
        Err(IngestError::Source(SourceError::protocol(
            "reverse ingest thread ended",
        )))
    });
    let apply = match apply_result {
        Some(r) => r,
        None => apply.await,
    }
    .map_err(|e| ReverseError::Internal(format!("reverse apply task: {e}")))?;
    ingest?;
    apply?;
    Ok(())
}

/// The reverse router: one target (the source); every table S publishes is S's share of a
/// sharded table (its name on the shard), and goes there whole.
fn reverse_route_spec(cfg: &Config, tables: &[SourceTable]) -> RouteSpec {
    RouteSpec {
        shards: vec![SOURCE_TARGET.to_owned()],
        tables: tables
            .iter()
            .filter(|t| t.rule.mode == CfgMode::Sharded)
            .map(|t| {
                (
                    t.rule.target.clone(),
                    route::TableRule {
                        mode: route::TableMode::Broadcast,
                        target: None,
                    },
                )
            })
            .collect(),
        default_key: cfg.routing.key.clone(),
        hash: route::HashKind::Postgres,
        unlisted: route::Unlisted::Skip,
    }
}
