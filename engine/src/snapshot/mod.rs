//! Full load: copies every configured table's existing rows into the shards, consistently,
//! under the replication slot's exported snapshot, before CDC starts at the slot's consistent
//! point.
//!
//! In: the table list (source, target, sharded-by-key or broadcast), a connector for the source
//! and for each shard, a row router over the key's text form, and an exported snapshot (its name
//! and the LSN it is consistent at). Out: every shard holds exactly the source rows, as of the
//! snapshot, that route to it (all rows for broadcast tables); a [`FullLoadReport`] says, per
//! table, the LSN its copy is consistent at, so CDC can skip what the copy already contains
//! ([`FullLoadReport::skip_until`]); progress goes out on a `watch` channel.
//!
//! Invariants kept here:
//! - **Consistent:** every source read runs in a `REPEATABLE READ READ ONLY` transaction that
//!   imported the snapshot (`SET TRANSACTION SNAPSHOT`,
//!   <https://www.postgresql.org/docs/current/sql-set-transaction.html>), so rows committed after
//!   the snapshot never appear.
//! - **Read once:** each chunk is one `COPY (SELECT …) TO STDOUT`; its rows are split on row
//!   boundaries, routed by the key field and appended to the right shard's `COPY … FROM STDIN`.
//! - **Atomic per chunk and shard:** a chunk's rows go into each shard in one transaction that
//!   also records the chunk in `reshard.fullload_chunks`; after a crash a chunk is either whole
//!   on a shard or absent. A table finished on every shard is never copied again; a table left
//!   unfinished is emptied and copied again under the new snapshot, and its new LSN is reported
//!   for CDC to skip up to.
//! - **Bounded memory:** per worker, one ~`batch_bytes` buffer per shard plus one partial row;
//!   a slow shard's `COPY` sink applies backpressure to the source read.
//!
//! How the runtime drives it:
//! 1. [`FullLoad::new`] then [`FullLoad::prepare`]: reads the source and shard catalogs and
//!    reshard's records; nothing is copied yet, so target problems surface before any slot is
//!    made.
//! 2. If [`PreparedLoad::needs_snapshot`]: on a first run, create the main slot with
//!    `EXPORT_SNAPSHOT`; when the main slot already exists (a resumed load), create a temporary
//!    slot with `EXPORT_SNAPSHOT` instead. Either gives an [`ExportedSnapshot`].
//! 3. [`PreparedLoad::run`], keeping the exporting replication connection idle until `imported`
//!    fires. Then start CDC at the main slot's consistent point and skip, per table, the
//!    changes committed below [`FullLoadReport::skip_until`]. The report is rebuilt from the
//!    shards' records on every run, so it survives restarts.
//!
//! With `[snapshot] mode = "watermark"` ([`SnapshotMode::Watermark`]), tables with an integer
//! key are copied in key-ordered chunks, each under its own short snapshot, and need no
//! exported snapshot at all (`watermark`); the report then carries their chunk windows and
//! [`FullLoadReport::handoff`] hands them to CDC (`handoff`, `window`). Only tables left in
//! exported mode make [`PreparedLoad::needs_snapshot`] true.
//!
//! See `catalog` for the checks and how tables are chunked, `copy` for the worker loop,
//! `indexes` for `defer_indexes`, `throttle` for the per-shard token buckets and `health` for
//! the adaptive throttle (a health watcher per shard steering its bucket's row rate).

mod catalog;
mod copy;
mod error;
pub mod handoff;
mod health;
mod indexes;
mod progress;
mod rows;
mod throttle;
mod watermark;
pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::num::{NonZeroU64, NonZeroUsize};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::Client;

use crate::config::SnapshotConfig;
pub use crate::config::SnapshotMode;
use crate::event::{Oid, ShardId};
use crate::lsn::Lsn;

pub use error::{BoxError, SnapshotError};
pub use health::{Aimd, HealthBounds, HealthSample};
pub use progress::{
    render_line, render_throttle_line, FullLoadProgress, TableProgress, TableState,
};
pub use rows::CopyFormat;
pub use throttle::{Throttle, ThrottleStats};

/// A future that opens a SQL connection (its driver task already spawned).
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<Client, BoxError>> + Send>>;

/// Opens a new SQL connection to one database. The full load calls it once per copy worker
/// (and per index rebuild); the runtime wires in `ConnConfig::connect_sql`, whose sessions no
/// timeout of the role cuts short (a COPY, an idle snapshot transaction).
pub type Connect = Arc<dyn Fn() -> ConnectFuture + Send + Sync>;

/// Routes a sharded row by its key: `(key column type OID, key text form)` → shard. The text is
/// already de-escaped from COPY text format. The runtime wires in `Router::shard_of_text`.
pub type RouteFn = Arc<dyn Fn(Oid, &[u8]) -> Result<ShardId, String> + Send + Sync>;

// One table-name type for the toolkit and the stages.
pub use crate::pg::sql::TableName;

/// How a table's rows are distributed: `[[tables]] mode` ([`crate::config::TableMode`])
/// resolved with its key column. Not `route::TableMode` (a stage imports no other stage): the
/// load never sees a skipped table and has no use for `key_immutable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableMode {
    /// Each row goes to the shard its key column routes to.
    Sharded {
        /// The shard-key column (e.g. `account_id`).
        key: String,
    },
    /// Every row goes to every shard (reference tables).
    Broadcast,
}

/// One table to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    /// The table on the source (a plain or a partitioned table).
    pub source: TableName,
    /// The table on every shard.
    pub target: TableName,
    /// Sharded or broadcast.
    pub mode: TableMode,
}

/// One shard to load into.
#[derive(Clone)]
pub struct ShardTarget {
    /// Name used in messages (`shard1`).
    pub name: String,
    /// Opens a connection to the shard's database.
    pub connect: Connect,
    /// Open connections to the shard's read replicas (`[[shards]] replicas`), whose replay lag
    /// the adaptive throttle watches.
    pub replicas: Vec<Connect>,
}

impl fmt::Debug for ShardTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardTarget")
            .field("name", &self.name)
            .finish()
    }
}

/// A snapshot exported by the source and the LSN it is consistent at: the `snapshot_name` and
/// `consistent_point` of `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` (the main slot for the first
/// run; a temporary slot when resuming).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedSnapshot {
    /// The name to pass to `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// Changes committed before this LSN are visible in the snapshot; later ones are not.
    pub lsn: Lsn,
}

/// Bytes buffered per shard before a COPY write (a tuning constant, not a config key).
pub const BATCH_BYTES: usize = 64 * 1024;

/// Validated full-load options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullLoadOptions {
    /// Concurrent chunk copies.
    pub parallel: NonZeroUsize,
    /// Target rows per chunk.
    pub chunk_rows: NonZeroU64,
    /// Per-shard row rate limit.
    pub max_rows_per_sec: Option<NonZeroU64>,
    /// Per-shard byte rate limit.
    pub max_bytes_per_sec: Option<NonZeroU64>,
    /// Concurrent COPYs into one shard.
    pub max_concurrent_copies_per_shard: NonZeroUsize,
    /// TRUNCATE non-empty targets first.
    pub truncate_targets: bool,
    /// Drop and rebuild secondary indexes.
    pub defer_indexes: bool,
    /// Copy in binary format where the table's types allow.
    pub binary_copy: bool,
    /// Bytes buffered per shard before a write.
    pub batch_bytes: NonZeroUsize,
    /// How tables are read: under one exported snapshot, or in watermark chunks.
    pub mode: SnapshotMode,
    /// The adaptive throttle's bounds (none set: the throttle is the fixed one).
    pub health: HealthBounds,
    /// The adaptive throttle's floor and additive step, rows per second.
    pub min_rows_per_sec: NonZeroU64,
    /// How often each shard's health is sampled.
    pub health_interval: Duration,
}

impl FullLoadOptions {
    /// Checks the `[snapshot]` section and converts it: the one place the config becomes
    /// full-load options (0 means "no limit" / "`parallel`" in the file).
    pub fn from_config(c: &SnapshotConfig) -> Result<FullLoadOptions, SnapshotError> {
        for (key, v) in [
            ("parallel", c.parallel as u64),
            ("chunk_rows", c.chunk_rows),
            ("min_rows_per_sec", c.min_rows_per_sec),
            ("health_interval_ms", c.health_interval_ms),
        ] {
            if v == 0 {
                return Err(SnapshotError::Config {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        let adaptive =
            c.max_probe_latency_ms > 0 || c.max_active_backends > 0 || c.max_replica_lag_ms > 0;
        if adaptive && c.max_rows_per_sec > 0 && c.min_rows_per_sec > c.max_rows_per_sec {
            return Err(SnapshotError::Config {
                key: "min_rows_per_sec",
                message: format!(
                    "{} is above max_rows_per_sec {}: the adaptive throttle's floor must be under \
                     its ceiling; lower min_rows_per_sec or raise max_rows_per_sec",
                    c.min_rows_per_sec, c.max_rows_per_sec
                ),
            });
        }
        Ok(Self::convert(c))
    }

    fn convert(c: &SnapshotConfig) -> FullLoadOptions {
        let parallel = NonZeroUsize::new(c.parallel).unwrap_or(NonZeroUsize::MIN);
        FullLoadOptions {
            parallel,
            chunk_rows: NonZeroU64::new(c.chunk_rows).unwrap_or(NonZeroU64::MIN),
            max_rows_per_sec: NonZeroU64::new(c.max_rows_per_sec),
            max_bytes_per_sec: NonZeroU64::new(c.max_bytes_per_sec),
            max_concurrent_copies_per_shard: NonZeroUsize::new(c.max_concurrent_copies_per_shard)
                .unwrap_or(parallel),
            truncate_targets: c.truncate_targets,
            defer_indexes: c.defer_indexes,
            binary_copy: c.binary_copy,
            batch_bytes: NonZeroUsize::new(BATCH_BYTES).unwrap_or(NonZeroUsize::MIN),
            mode: c.mode,
            health: HealthBounds {
                probe_latency: (c.max_probe_latency_ms > 0)
                    .then(|| Duration::from_millis(c.max_probe_latency_ms)),
                active_backends: (c.max_active_backends > 0).then_some(c.max_active_backends),
                replica_lag: (c.max_replica_lag_ms > 0)
                    .then(|| Duration::from_millis(c.max_replica_lag_ms)),
            },
            min_rows_per_sec: NonZeroU64::new(c.min_rows_per_sec).unwrap_or(NonZeroU64::MIN),
            health_interval: Duration::from_millis(c.health_interval_ms.max(1)),
        }
    }
}

impl Default for FullLoadOptions {
    /// The options of the `[snapshot]` defaults ([`SnapshotConfig::default`]).
    fn default() -> Self {
        Self::convert(&SnapshotConfig::default())
    }
}

/// What one table's load came to.
#[derive(Clone, Debug, PartialEq)]
pub struct TableReport {
    /// Source table, quoted where needed (for messages and the report).
    pub table: String,
    /// Source table.
    pub source: crate::pg::sql::TableName,
    /// The LSN the table's copy on the shards is consistent at.
    pub as_of: Lsn,
    /// Chunks copied in this run (0 for a table finished earlier).
    pub chunks_copied: u32,
    /// Chunks in the table's plan.
    pub chunks_total: u32,
    /// Source rows copied in this run.
    pub rows: u64,
    /// COPY bytes read from the source in this run.
    pub bytes: u64,
    /// The table was partly loaded by an earlier run and was emptied and copied again (for a
    /// watermark table: resumed after its last chunk on every shard).
    pub recopied: bool,
    /// Loaded in watermark chunks: `as_of` is its first chunk's low watermark, and the
    /// handoff uses its chunk windows, not `as_of`.
    pub watermark: bool,
    /// The COPY format its rows travel in (`[snapshot] binary_copy`).
    pub format: CopyFormat,
}

/// The outcome of a full load.
#[derive(Clone, Debug, PartialEq)]
pub struct FullLoadReport {
    /// One entry per configured table, in config order.
    pub tables: Vec<TableReport>,
    /// Per shard (in shard order), what its throttle let through in this run.
    pub throttle: Vec<ThrottleStats>,
    /// Deferred secondary indexes rebuilt in this run.
    pub indexes_rebuilt: usize,
    /// The chunk windows of the tables loaded in watermark chunks.
    pub windows: HashMap<crate::pg::sql::TableName, Arc<window::TableWindows>>,
}

impl FullLoadReport {
    /// Tables whose copy is consistent at a later LSN than where the log starts (the slot's
    /// consistent point on a first run), with that LSN: CDC must skip those tables' changes
    /// from transactions whose commit record starts below it (the copy already contains
    /// them; see `handoff`).
    pub fn skip_until(&self, log_start: Lsn) -> HashMap<crate::pg::sql::TableName, Lsn> {
        self.tables
            .iter()
            .filter(|t| !t.watermark && t.as_of > log_start)
            .map(|t| (t.source.clone(), t.as_of))
            .collect()
    }

    /// What CDC must drop because the copy holds it: [`FullLoadReport::skip_until`] for the
    /// tables copied under an exported snapshot, the chunk windows for the others.
    pub fn handoff(&self, log_start: Lsn) -> handoff::Handoff {
        handoff::Handoff {
            skip_until: self.skip_until(log_start),
            windows: self.windows.clone(),
        }
    }

    /// The table's entry.
    pub fn table(&self, table: &str) -> Option<&TableReport> {
        self.tables.iter().find(|t| t.table == table)
    }
}

/// A full load, configured but not started.
pub struct FullLoad {
    source: Connect,
    shards: Vec<ShardTarget>,
    tables: Vec<TableSpec>,
    route: RouteFn,
    options: FullLoadOptions,
    progress: Arc<watch::Sender<FullLoadProgress>>,
}

impl FullLoad {
    /// A load of `tables` from `source` into `shards` (in shard order: `ShardId(i)` is
    /// `shards[i]`).
    pub fn new(
        source: Connect,
        shards: Vec<ShardTarget>,
        tables: Vec<TableSpec>,
        route: RouteFn,
        options: FullLoadOptions,
    ) -> FullLoad {
        let (tx, _) = watch::channel(FullLoadProgress::default());
        FullLoad {
            source,
            shards,
            tables,
            route,
            options,
            progress: Arc::new(tx),
        }
    }

    /// Receives progress updates.
    pub fn progress(&self) -> watch::Receiver<FullLoadProgress> {
        self.progress.subscribe()
    }

    /// Inspects the source and every shard without changing anything: the tables exist with
    /// compatible columns, the targets are empty (or `truncate_targets`), and which tables an
    /// earlier run already finished. All problems come back at once as
    /// [`SnapshotError::Targets`].
    pub async fn prepare(self) -> Result<PreparedLoad, SnapshotError> {
        if self.shards.is_empty() {
            return Err(SnapshotError::Config {
                key: "shards",
                message: "no shards configured".into(),
            });
        }
        let plan = catalog::inspect(
            &self.source,
            &self.shards,
            &self.tables,
            self.options.truncate_targets,
            self.options.chunk_rows.get(),
            self.options.mode,
        )
        .await?;
        let progress = FullLoadProgress {
            tables: plan
                .tables
                .iter()
                .map(|t| {
                    let mut p = TableProgress::new(t.source_display.clone(), t.chunks_total());
                    if let catalog::TableStatus::Finished { chunks, .. } = t.status {
                        p.state = TableState::AlreadyDone;
                        p.chunks_done = chunks;
                        p.chunks_total = chunks;
                    }
                    p
                })
                .collect(),
            indexes_pending: 0,
            throttle: vec![],
        };
        self.progress.send_replace(progress);
        Ok(PreparedLoad { load: self, plan })
    }
}

/// Starts, per shard, the task that keeps the shard's [`crate::status::ThrottleView`] in the
/// progress: with bounds set (`max_probe_latency_ms`, …), the health watcher that steers the
/// shard's throttle (`health`); without, a refresh of the fixed throttle's counters.
fn watch_shards(load: &FullLoad, throttles: &[Arc<Throttle>]) -> tokio::task::JoinSet<()> {
    let o = &load.options;
    let adaptive = o.health.any();
    let floor = o.min_rows_per_sec.get();
    load.progress.send_modify(|p| {
        p.throttle = load
            .shards
            .iter()
            .zip(throttles)
            .map(|(s, t)| health::fixed_view(&s.name, t, adaptive, floor))
            .collect();
    });
    let mut set = tokio::task::JoinSet::new();
    for (index, (shard, throttle)) in load.shards.iter().zip(throttles).enumerate() {
        if adaptive {
            let w = health::Watcher {
                index,
                shard: shard.name.clone(),
                bounds: o.health.clone(),
                interval: o.health_interval,
                floor,
                ceiling: o.max_rows_per_sec.map(NonZeroU64::get),
                throttle: throttle.clone(),
                progress: load.progress.clone(),
            };
            let probe = health::ShardProbe::new(
                shard.name.clone(),
                shard.connect.clone(),
                shard.replicas.clone(),
                o.health_interval,
            );
            set.spawn(w.run(probe));
        } else {
            let (name, throttle, progress) =
                (shard.name.clone(), throttle.clone(), load.progress.clone());
            let every = o.health_interval;
            set.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let v = health::fixed_view(&name, &throttle, false, floor);
                    progress.send_modify(|p| {
                        if let Some(slot) = p.throttle.get_mut(index) {
                            *slot = v;
                        }
                    });
                }
            });
        }
    }
    set
}

/// A checked load, ready to run.
pub struct PreparedLoad {
    load: FullLoad,
    plan: catalog::Plan,
}

impl PreparedLoad {
    /// Source tables that this run will copy (empty when an earlier run finished them all).
    pub fn tables_to_copy(&self) -> Vec<String> {
        self.plan
            .tables
            .iter()
            .filter(|t| !matches!(t.status, catalog::TableStatus::Finished { .. }))
            .map(|t| t.source_display.clone())
            .collect()
    }

    /// Whether an earlier run recorded chunks of any table on any shard.
    pub fn has_records(&self) -> bool {
        self.plan
            .tables
            .iter()
            .any(|t| t.status != catalog::TableStatus::Fresh)
    }

    /// The earliest snapshot an earlier run finished a table under: the shards need that
    /// table's changes committed from there on.
    pub fn oldest_finished_as_of(&self) -> Option<Lsn> {
        self.plan
            .tables
            .iter()
            .filter_map(|t| match t.status {
                catalog::TableStatus::Finished { as_of, .. } => Some(as_of),
                _ => None,
            })
            .min()
    }

    /// Whether [`PreparedLoad::run`] needs an exported snapshot (some table must be copied
    /// under one; a watermark table needs none).
    pub fn needs_snapshot(&self) -> bool {
        self.plan.tables.iter().any(|t| {
            t.watermark.is_none() && !matches!(t.status, catalog::TableStatus::Finished { .. })
        })
    }

    /// Receives progress updates.
    pub fn progress(&self) -> watch::Receiver<FullLoadProgress> {
        self.load.progress.subscribe()
    }

    /// Runs the load: empties what must be emptied, defers indexes, imports `snapshot` on every
    /// copy connection (then fires `imported`, after which the exporting connection may run
    /// other commands such as `START_REPLICATION`), copies every unfinished table, and rebuilds
    /// deferred indexes. Dropping the future aborts the load; uncommitted chunks roll back.
    pub async fn run(
        self,
        snapshot: Option<ExportedSnapshot>,
        imported: Option<oneshot::Sender<()>>,
    ) -> Result<FullLoadReport, SnapshotError> {
        let PreparedLoad { load, plan } = self;
        let to_copy: Vec<usize> = plan
            .tables
            .iter()
            .enumerate()
            .filter(|(_, t)| !matches!(t.status, catalog::TableStatus::Finished { .. }))
            .map(|(i, _)| i)
            .collect();
        let throttles: Vec<Arc<Throttle>> = load
            .shards
            .iter()
            .map(|_| {
                Arc::new(Throttle::new(
                    load.options.max_rows_per_sec.map(NonZeroU64::get),
                    load.options.max_bytes_per_sec.map(NonZeroU64::get),
                ))
            })
            .collect();
        // Dropped with this future: the watchers stop when the load ends or is aborted.
        let _watchers = watch_shards(&load, &throttles);
        let mut as_of: BTreeMap<usize, Lsn> = BTreeMap::new();
        for (i, t) in plan.tables.iter().enumerate() {
            if let catalog::TableStatus::Finished { as_of: lsn, .. } = t.status {
                as_of.insert(i, lsn);
            }
        }
        let exported: Vec<usize> = to_copy
            .iter()
            .copied()
            .filter(|&i| plan.tables.get(i).is_some_and(|t| t.watermark.is_none()))
            .collect();
        let chunked: Vec<usize> = to_copy
            .iter()
            .copied()
            .filter(|&i| plan.tables.get(i).is_some_and(|t| t.watermark.is_some()))
            .collect();
        let mut copied: HashMap<usize, (u32, u64, u64)> = HashMap::new();
        let mut ctx = None;
        if !to_copy.is_empty() {
            if load.options.defer_indexes {
                indexes::defer(&load.shards, &plan, &to_copy).await?;
            }
            ctx = Some(Arc::new(copy::CopyContext::new(
                &plan,
                &to_copy,
                &load.shards,
                load.route.clone(),
                throttles.clone(),
                &load.options,
                snapshot.as_ref().map_or(Lsn::ZERO, |s| s.lsn),
                load.progress.clone(),
            )));
        }
        if let (false, Some(ctx)) = (exported.is_empty(), &ctx) {
            let snapshot = snapshot.ok_or_else(|| SnapshotError::NoSnapshot {
                tables: exported
                    .iter()
                    .filter_map(|&i| plan.tables.get(i))
                    .map(|t| t.source_display.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            catalog::reset_targets(
                &load.shards,
                &plan,
                &exported,
                load.options.truncate_targets,
            )
            .await?;
            let stats = copy::run_workers(
                ctx.clone(),
                &load.source,
                &snapshot,
                load.options.parallel.get(),
                imported,
            )
            .await?;
            for &i in &exported {
                as_of.insert(i, snapshot.lsn);
            }
            copied = stats;
        } else if let Some(tx) = imported {
            let _ = tx.send(());
        }
        if let (false, Some(ctx)) = (chunked.is_empty(), ctx) {
            watermark::reset(&load.shards, &plan, &chunked, load.options.truncate_targets).await?;
            let stats = watermark::run(
                ctx,
                &plan,
                &chunked,
                &load.source,
                load.options.parallel.get(),
                load.options.chunk_rows.get(),
            )
            .await?;
            copied.extend(stats);
        }
        let windows = match load.shards.first() {
            Some(first) => watermark::windows(first, &plan).await?,
            None => HashMap::new(),
        };
        let indexes_rebuilt =
            indexes::rebuild(&load.shards, load.options.parallel.get(), &load.progress).await?;
        let tables = plan
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (chunks_copied, rows, bytes) = copied.get(&i).copied().unwrap_or_default();
                TableReport {
                    table: t.source_display.clone(),
                    source: t.source.clone(),
                    as_of: as_of.get(&i).copied().unwrap_or(Lsn::ZERO),
                    chunks_copied,
                    chunks_total: match t.status {
                        catalog::TableStatus::Finished { chunks, .. } => chunks,
                        _ => t.chunks_total(),
                    },
                    rows,
                    bytes,
                    recopied: matches!(t.status, catalog::TableStatus::Partial),
                    watermark: t.watermark.is_some(),
                    format: t.format(load.options.binary_copy),
                }
            })
            .collect();
        Ok(FullLoadReport {
            tables,
            throttle: throttles.iter().map(|t| t.stats()).collect(),
            indexes_rebuilt,
            windows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_config_section() {
        let o = FullLoadOptions::from_config(&SnapshotConfig::default()).unwrap();
        assert_eq!(o, FullLoadOptions::default());
        assert_eq!(o.max_concurrent_copies_per_shard, o.parallel);
        assert_eq!(o.max_rows_per_sec, None);
        assert_eq!(o.batch_bytes.get(), BATCH_BYTES);

        let c = SnapshotConfig {
            parallel: 0,
            ..SnapshotConfig::default()
        };
        let e = FullLoadOptions::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("[snapshot] parallel"), "{e}");

        // The adaptive throttle's floor must be under its ceiling, once it adapts.
        let c = SnapshotConfig {
            max_rows_per_sec: 500,
            ..SnapshotConfig::default()
        };
        assert!(!FullLoadOptions::from_config(&c).unwrap().health.any());
        let c = SnapshotConfig {
            max_probe_latency_ms: 20,
            ..c
        };
        let e = FullLoadOptions::from_config(&c).unwrap_err().to_string();
        assert!(
            e.contains("[snapshot] min_rows_per_sec: 1000 is above max_rows_per_sec 500"),
            "{e}"
        );
        let o = FullLoadOptions::from_config(&SnapshotConfig {
            min_rows_per_sec: 100,
            ..c
        })
        .unwrap();
        assert_eq!(o.health.probe_latency, Some(Duration::from_millis(20)));
        assert_eq!(o.min_rows_per_sec.get(), 100);
    }

    #[test]
    fn skip_until_lists_only_tables_copied_after_the_slot() {
        let t = |name: &str, lsn: u64| TableReport {
            table: name.into(),
            source: crate::pg::sql::TableName::new("public", name),
            as_of: Lsn::from_u64(lsn),
            chunks_copied: 0,
            chunks_total: 0,
            rows: 0,
            bytes: 0,
            recopied: false,
            watermark: false,
            format: CopyFormat::Text,
        };
        let r = FullLoadReport {
            tables: vec![t("a", 100), t("b", 200)],
            throttle: vec![],
            indexes_rebuilt: 0,
            windows: HashMap::new(),
        };
        let s = r.skip_until(Lsn::from_u64(100));
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.get(&crate::pg::sql::TableName::new("public", "b")),
            Some(&Lsn::from_u64(200))
        );
    }

    #[test]
    fn table_names_are_quoted() {
        assert_eq!(
            TableName::new("public", "events").to_string(),
            "public.events"
        );
        assert_eq!(TableName::new("Sales", "q1").to_string(), "\"Sales\".q1");
    }
}
