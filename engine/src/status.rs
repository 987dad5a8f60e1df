//! The one status model every observer reads.
//!
//! In: the runtime publishes a [`StatusSnapshot`] (a `watch` channel, refreshed a few times a
//! second) built from the stages' own counters. Out: the admin console (`SHOW …`), the
//! Prometheus endpoint, `reshard status` / `reshard lag` (over the admin console, or rebuilt from
//! the source, the shards' progress rows and the spill directory when the daemon is not up).
//! Operators' commands ([`ControlCommand`]) travel the other way.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::lsn::Lsn;

/// What the daemon is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting, creating slot and publication.
    #[default]
    Starting,
    /// Copying existing data (CDC is being spilled meanwhile).
    FullLoad,
    /// Streaming changes.
    Streaming,
    /// Reading from the source is paused (spill cap reached or operator PAUSE).
    Paused,
    /// Shutting down.
    Stopping,
    /// Not running (status rebuilt offline).
    Stopped,
}

impl Phase {
    /// snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::FullLoad => "full_load",
            Phase::Streaming => "streaming",
            Phase::Paused => "paused",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// State of one shard's apply pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Not started yet / waiting for the full load.
    #[default]
    Waiting,
    /// Applying.
    Running,
    /// Retrying after a transient error.
    Retrying,
    /// Paused by an operator.
    Paused,
    /// Stopped by a definite error (see `last_error`).
    Stopped,
    /// Paused until the shard table matches its source table (a schema change on the source:
    /// `last_error` says "waiting for DDL: …" with the table, columns and fix); retried on the
    /// backoff, resumes by itself.
    WaitingForDdl,
}

impl ShardState {
    /// snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Waiting => "waiting",
            ShardState::Running => "running",
            ShardState::Retrying => "retrying",
            ShardState::Paused => "paused",
            ShardState::Stopped => "stopped",
            ShardState::WaitingForDdl => "waiting_for_ddl",
        }
    }
}

/// The source side.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SourceStatus {
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// `IDENTIFY_SYSTEM` system id.
    pub system_id: String,
    /// The slot's `confirmed_flush_lsn` (what reshard has confirmed).
    pub confirmed_flush_lsn: Lsn,
    /// The source's current WAL insert position (last known; `pg_current_wal_insert_lsn()`), never
    /// below `confirmed_flush_lsn` (the two are read at one moment, or the older raised).
    pub current_wal_lsn: Lsn,
    /// WAL the slot makes the source keep (`pg_current_wal_lsn() - restart_lsn`), bytes.
    pub retained_wal_bytes: u64,
    /// End of the last message received.
    pub received_lsn: Lsn,
    /// XLogData bytes received.
    pub bytes_received_total: u64,
    /// Source transactions received.
    pub txns_received_total: u64,
    /// Row changes received.
    pub changes_received_total: u64,
    /// Changes per second received (recent).
    pub changes_per_sec: f64,
    /// Whether reading is paused by the spill log: its cap, or its filesystem full.
    pub backpressure: bool,
    /// Why reading from the source is paused (`None` while it reads): the spill cap
    /// (`[spill] max_bytes`), the spill filesystem full, or an operator's PAUSE.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Connected to the source right now.
    pub connected: bool,
    /// Last source error.
    pub last_error: Option<String>,
    /// The write fences installed on the source (`reshard fence`, `cutover --fence`).
    #[serde(default)]
    pub fences: Vec<Fence>,
}

/// Where a fence is installed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FenceSide {
    /// On the source: refuse rows that route to the shard.
    #[default]
    Source,
    /// On the shard's own database: refuse every write to its sharded tables.
    Shard,
}

impl std::fmt::Display for FenceSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FenceSide::Source => "source",
            FenceSide::Shard => "shard",
        })
    }
}

/// A write fence as recorded in `reshard.fence` on the database it guards, with its counter
/// (installed and removed by `ops::fence`, read by [`crate::pg::fence::read_fences`]).
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq)]
pub struct Fence {
    /// The fenced shard.
    pub shard: String,
    /// Source or shard.
    pub side: FenceSide,
    /// What it is for.
    pub reason: String,
    /// `hash`, `map` or `all`.
    pub rule: String,
    /// Fenced tables.
    pub tables: Vec<String>,
    /// When it was first installed (UTC, ISO 8601).
    pub installed_at: String,
    /// Seconds since then: how long writes to the shard's accounts have been refused.
    pub fenced_secs: f64,
    /// The last step recorded by the command that uses the fence (`fenced`, `caught_up`, …).
    pub step: String,
    /// When that step was recorded.
    pub step_at: String,
    /// The LSN the step is about (the cutover's target), if any.
    pub lsn: Option<Lsn>,
    /// Writes refused so far (statements; counted by a sequence, so the count survives the
    /// aborted writes).
    pub refused: i64,
}

/// One shard.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ShardView {
    /// Shard name.
    pub name: String,
    /// Pipeline state.
    pub state: ShardState,
    /// Every source commit at or below this is applied.
    pub applied_lsn: Lsn,
    /// Commit time of the last applied source transaction (µs since 2000-01-01), if any.
    pub last_commit_time: Option<i64>,
    /// Bytes of source WAL between what this shard has applied and what was received.
    pub lag_bytes: u64,
    /// Seconds between now and the commit time of the oldest source transaction not yet applied
    /// here (0 when caught up).
    pub lag_seconds: f64,
    /// Source transactions applied.
    pub txns_applied_total: u64,
    /// Rows inserted.
    pub rows_inserted_total: u64,
    /// Rows updated.
    pub rows_updated_total: u64,
    /// Rows deleted.
    pub rows_deleted_total: u64,
    /// Target transactions (batches) committed.
    pub batches_total: u64,
    /// Batches replayed change by change after a set-based conflict.
    pub replays_total: u64,
    /// Errors by class.
    pub transient_errors_total: u64,
    /// Definite errors.
    pub definite_errors_total: u64,
    /// Rows applied per second (recent).
    pub rows_per_sec: f64,
    /// Average source transactions per target transaction.
    pub avg_batch_txns: f64,
    /// Commit-to-apply latency percentiles, milliseconds.
    pub latency_p50_ms: f64,
    /// p99.
    pub latency_p99_ms: f64,
    /// max.
    pub latency_max_ms: f64,
    /// Last error message (names table, key, LSN, SQLSTATE).
    pub last_error: Option<String>,
    /// Offline status only: `last_error` is why the last daemon run stopped this shard (its
    /// note in `[spill] dir`), not a failure to read the shard now (its lag is known).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_by_last_run: bool,
}

/// One table of the full load.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TableView {
    /// Source `schema.table`.
    pub name: String,
    /// Target `schema.table`.
    pub target: String,
    /// `sharded` / `broadcast` / `skip`.
    pub mode: String,
    /// `pending` / `copying` / `done` / `failed`.
    pub state: String,
    /// Rows copied so far.
    pub rows_copied: u64,
    /// Estimated rows.
    pub rows_estimated: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
}

/// One shard's full-load throttle (`snapshot::health`): the rate the copy into the shard is
/// held to now and the health sample that chose it. Shown by `status`, `SHOW THROTTLE`, the
/// metrics and the full load's progress lines.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ThrottleView {
    /// Shard name.
    pub shard: String,
    /// Whether the rate adapts to the shard's health (some `[snapshot] max_probe_latency_ms`,
    /// `max_active_backends` or `max_replica_lag_ms` is set).
    pub adaptive: bool,
    /// The row rate the copy into the shard is held to now; `None`: unlimited.
    pub rows_per_sec: Option<f64>,
    /// The fixed ceiling (`[snapshot] max_rows_per_sec`); `None`: none.
    pub max_rows_per_sec: Option<u64>,
    /// The floor (`[snapshot] min_rows_per_sec`): the rate never goes below it.
    pub min_rows_per_sec: u64,
    /// Rows granted to the copy so far (this run).
    pub rows_total: u64,
    /// Times the rate was cut because a health signal was over its bound.
    pub backoffs_total: u64,
    /// Latency of the last probe query on the shard, milliseconds.
    pub probe_latency_ms: Option<f64>,
    /// Active client backends on the shard at the last probe, reshard's own excluded.
    pub active_backends: Option<u64>,
    /// Largest replay lag of the shard's replicas at the last probe, milliseconds (`None`
    /// without `[[shards]] replicas`).
    pub replica_lag_ms: Option<f64>,
    /// Why the rate is held down (the signal over its bound, or the probe's error); `None`
    /// when every signal is within its bound.
    pub holding_back: Option<String>,
}

/// The spill log.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SpillView {
    /// Directory.
    pub dir: String,
    /// Bytes on disk.
    pub bytes: u64,
    /// The cap.
    pub max_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Everything up to here is durable locally (and confirmed to the source).
    pub durable_lsn: Lsn,
    /// Oldest LSN some shard still needs.
    pub oldest_unapplied_lsn: Option<Lsn>,
    /// Reading is paused because the cap is reached or the filesystem is full.
    pub backpressure_active: bool,
    /// Reading is paused because a write found the spill filesystem full (ENOSPC, EDQUOT).
    #[serde(default)]
    pub disk_full: bool,
    /// fsyncs done.
    pub fsyncs_total: u64,
    /// Average source transactions per fsync (group commit).
    pub txns_per_fsync: f64,
    /// Highest `bytes` seen.
    pub high_water_bytes: u64,
}

/// Quarantined changes of one table (`quarantine`), for `reshard quarantine list`, the status
/// and the metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableSummary {
    /// `schema.table`.
    pub table: String,
    /// Quarantined changes (TRUNCATE markers not counted).
    pub changes: u64,
    /// Commit LSN of the first.
    pub first_lsn: Lsn,
    /// Commit LSN of the last.
    pub last_lsn: Lsn,
    /// The first change's reason.
    pub reason: String,
    /// The first change's row, e.g. `insert (id=5, account_id=NULL)`.
    pub sample: String,
}

/// What the status shows about the account map (`route::refresh`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MapStatus {
    /// Accounts in the map in use.
    pub accounts: u64,
    /// Accepted refreshes since start.
    pub refreshes_total: u64,
    /// Why the last refresh was refused or failed, if it was.
    pub last_error: Option<String>,
}

/// Everything, at one instant.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StatusSnapshot {
    /// Phase.
    pub phase: Phase,
    /// reshard version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    /// Source and slot.
    pub source: SourceStatus,
    /// Shards in remainder order.
    pub shards: Vec<ShardView>,
    /// Tables.
    pub tables: Vec<TableView>,
    /// Spill log.
    pub spill: SpillView,
    /// Quarantined (unroutable) changes, per table.
    #[serde(default)]
    pub quarantine: Vec<TableSummary>,
    /// The account map (`hash = "map"`).
    #[serde(default)]
    pub account_map: Option<MapStatus>,
    /// Shards whose writes stream back to the source (after a fenced cutover).
    #[serde(default)]
    pub reverse: Vec<ReverseView>,
    /// Per shard, the full load's throttle (empty when no full load runs in this process).
    #[serde(default)]
    pub throttle: Vec<ThrottleView>,
    /// Rebalances (`reshard rebalance`), read from `reshard.rebalance` on the directory shard
    /// (the first `[[shards]]` entry) by the offline status.
    #[serde(default)]
    pub rebalance: Vec<RebalanceView>,
}

/// One rebalance's progress, as `reshard.rebalance` on the directory shard records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RebalanceView {
    /// `rebalance_<N>_to_<M>`.
    pub id: String,
    /// N.
    pub from_shards: i32,
    /// M.
    pub to_shards: i32,
    /// `running` or `done`.
    pub state: String,
    /// Moves done.
    pub moves_done: i32,
    /// Moves planned.
    pub moves_total: i32,
    /// Rows the plan moves.
    pub rows_planned: i64,
    /// Rows of the finished moves (as planned).
    pub rows_done: i64,
    /// Bytes the plan moves.
    pub bytes_planned: i64,
    /// Seconds since the row last changed.
    pub idle_secs: f64,
}

impl StatusSnapshot {
    /// Ready = streaming and no shard stopped.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Streaming && self.shards.iter().all(|s| s.state != ShardState::Stopped)
    }
}

/// One shard's reverse direction (its writes streaming back to the source after a fenced
/// cutover), as the daemon runs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReverseView {
    /// The shard whose writes stream back.
    pub shard: String,
    /// Its reverse slot (on the shard).
    pub slot: String,
    /// 1 for the first cutover of the shard, +1 for each cutover after a rollback.
    pub epoch: i32,
    /// `streaming`, `draining` (a rollback waits for it) or `rolled_back` (see
    /// `reshard.reverse` on the source).
    pub state: String,
    /// The stream in this daemon: `starting`, `running`, `retrying`, `waiting_for_ddl`,
    /// `stopped`, or empty when it does not run here.
    pub stream: String,
    /// Connected to the shard's slot.
    pub connected: bool,
    /// The slot's consistent point (the shard's writes from here on come back).
    pub start_lsn: Lsn,
    /// With `draining`: the shard LSN the source must reach.
    pub drain_lsn: Option<Lsn>,
    /// End of the last message received from the shard.
    pub received_lsn: Lsn,
    /// Every shard commit at or below this is on the source (the source's progress row
    /// `reverse:<shard>`).
    pub applied_lsn: Lsn,
    /// Bytes of the shard's WAL received but not yet applied to the source.
    pub lag_bytes: u64,
    /// Seconds since the shard committed the oldest transaction not yet applied.
    pub lag_seconds: f64,
    /// Shard transactions applied to the source (this run).
    pub txns_applied_total: u64,
    /// Rows inserted on the source (this run).
    pub rows_inserted_total: u64,
    /// Rows updated on the source (this run).
    pub rows_updated_total: u64,
    /// Rows deleted on the source (this run).
    pub rows_deleted_total: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// The ids the source can still hand out before one equals an id the shard hands out
    /// (the shard's sequence as its cutover set it minus the source's present value, for the
    /// sequence with the least room; at or below 0 they collide and the stream halts on the
    /// first shared id). `None`: not known (no sequences, or not read yet).
    #[serde(default)]
    pub sequence_headroom: Option<i64>,
    /// The sequence of [`Self::sequence_headroom`].
    #[serde(default)]
    pub sequence_headroom_of: Option<String>,
    /// Set when the headroom is below a fifth of `[cutover] sequence_gap`: what to do.
    #[serde(default)]
    pub sequence_warning: Option<String>,
}

impl ReverseView {
    /// Fills the sequence headroom of the reverse stream (see [`Self::sequence_headroom`]) and
    /// its warning: below a fifth of `gap` (`[cutover] sequence_gap`) the source is close to
    /// handing out ids the shard has. The one rule for the daemon's and the offline status.
    pub fn set_sequence_headroom(&mut self, headroom: Option<(String, i64)>, gap: i64) {
        self.sequence_warning = None;
        let Some((name, room)) = headroom else {
            self.sequence_headroom = None;
            self.sequence_headroom_of = None;
            return;
        };
        if room < gap / 5 {
            self.sequence_warning = Some(format!(
                "sequence {name}: the source is {room} ids from those shard {shard} hands out \
                 (below a fifth of [cutover] sequence_gap = {gap}); once it reaches them the two \
                 hand out the same ids and the reverse stream halts on the first one it meets \
                 (see its error for the way out). Roll shard {shard} back before then, or cut \
                 over with a larger sequence_gap",
                shard = self.shard
            ));
        }
        self.sequence_headroom = Some(room);
        self.sequence_headroom_of = Some(name);
    }
}

/// An operator's command to the running daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlCommand {
    /// Pause one shard (by name) or, with `None`, reading from the source.
    Pause(Option<String>),
    /// Resume one shard or reading from the source.
    Resume(Option<String>),
    /// Shut down cleanly.
    Shutdown,
}

/// A command and where to send its answer (a human-readable confirmation or an error).
pub type ControlRequest = (ControlCommand, oneshot::Sender<Result<String, String>>);

/// What the admin console and metrics endpoint hold: the live status and a way to send
/// commands.
#[derive(Clone, Debug)]
pub struct AdminHandle {
    /// Live status.
    pub status: watch::Receiver<StatusSnapshot>,
    /// Commands to the runtime (bounded).
    pub control: mpsc::Sender<ControlRequest>,
}

impl AdminHandle {
    /// Sends a command and waits for its answer.
    pub async fn command(&self, cmd: ControlCommand) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send((cmd, tx))
            .await
            .map_err(|_| "reshard is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "reshard is shutting down".to_owned())?
    }
}
