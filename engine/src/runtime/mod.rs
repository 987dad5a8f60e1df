//! Wiring: the one place where reshard's stages are created, connected and started.
//!
//! [`start`] builds every stage from the validated config, creates the bounded channels and
//! `watch`es between them, spawns them (ingest on its own OS thread, one apply task per shard,
//! the full load, status, control, admin console and metrics), and returns a [`Running`]
//! handle. Like Materialize's storage wiring, it holds no logic of its own: what each stage
//! does lives in its module (`source`, `decode`, `route`, `spill`, `apply`, `snapshot`,
//! `handoff`, `status`).
//!
//! Start-up order matters for consistency (see DESIGN.md "Things that bite"): the slot is
//! created with an exported snapshot; the full load's connections import it; only then does
//! `START_REPLICATION` run on the connection that created the slot. Changes read while the copy
//! runs go to the spill log; the shards' apply starts when the copy is done, from the slot's
//! consistent point, skipping tables whose copy is newer (`snapshot::handoff`).
//!
//! - [`startup`]: the start-up proof (the spill log covers what the shards still need).
//! - [`ingest`]: slot → decode → route → spill, on one OS thread.

pub mod ingest;
pub mod startup;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::apply::{ApplyOptions, ApplyState, ShardApplier, ShardStatus, SourceConnect};
use crate::config::{Config, HashKind, TableMode as CfgMode};
use crate::error::{Classify, ErrorClass};
use crate::event::{pg_now, ShardId};
use crate::lsn::Lsn;
use crate::pg::catalog::{self, CatalogError, SourceTable};
use crate::pg::conn::SOURCE_PRESENT_LSN;
use crate::pg::identity;
use crate::quarantine::{Quarantine, QuarantineError, QuarantineStats};
use crate::route::refresh::{MapRefresher, MapSource, MapStatus};
use crate::route::{self, AccountMap, RouteError, RouteSpec, Router};
use crate::snapshot::handoff::{Handoff, SkipLog};
use crate::snapshot::{
    self, FullLoad, FullLoadProgress, FullLoadReport, SnapshotError, TableState,
};
use crate::source::{
    list_slots, ConnConfig, ReplicationClient, SlotOptions, SnapshotAction, SourceError,
};
use crate::spill::{SpillError, SpillIdentity, SpillLog, SpillOptions, SpillWriter};
use crate::status::{
    AdminHandle, ControlCommand, ControlRequest, Phase, ShardState, ShardView, SourceStatus,
    SpillView, StatusSnapshot, TableView,
};
use ingest::{
    start_streaming, Ingest, IngestCounters, IngestError, IngestOptions, Started,
    UnroutableHandling,
};
use startup::StartupError;

/// Options of `reshard run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The targets were loaded another way: copy nothing, stream from the slot's creation.
    pub skip_full_load: bool,
    /// How long a start that failed transiently (a shard or the source restarting, a connection
    /// dropped) is retried once the source has been reached. Zero: the first failure is
    /// returned. Errors before the source answers (a wrong URL) are always returned at once.
    pub start_retry: Duration,
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The source connection or a replication command.
    #[error("source: {0}")]
    Source(#[from] SourceError),
    /// Tables or publication.
    #[error("source: {0}")]
    Catalog(#[from] CatalogError),
    /// Routing set-up.
    #[error("routing: {0}")]
    Route(#[from] RouteError),
    /// Sharded tables whose UPDATEs and DELETEs could not be routed (nothing was started).
    #[error("{} sharded table(s) have the shard key outside the replica identity and no strategy; nothing was created or copied. Run `reshard check --fix` (builds the replica identity indexes concurrently), or apply one fix per table, then run again:\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    KeyOutsideIdentity(Vec<identity::KeyOutsideIdentity>),
    /// The spill log.
    #[error("{0}")]
    Spill(#[from] SpillError),
    /// The quarantine of unroutable changes.
    #[error("{0}")]
    Quarantine(#[from] QuarantineError),
    /// The full load.
    #[error("full load: {0}")]
    Snapshot(#[from] SnapshotError),
    /// Reading from the source stopped.
    #[error("ingest: {0}")]
    Ingest(#[from] IngestError),
    /// A shard's connection string.
    #[error("shard {shard}: {source}")]
    ShardConfig {
        /// The shard.
        shard: String,
        /// The parse error.
        source: Box<SourceError>,
    },
    /// Every shard stopped with a definite error.
    #[error("every shard stopped:\n{0}")]
    AllShardsStopped(String),
    /// Inconsistent local state.
    #[error("{0}")]
    State(String),
    /// A shard's progress row could not be read for the start-up proof (retried: the shard
    /// may be restarting).
    #[error("shard {shard}: cannot read its progress row, which is needed to prove that the spill log covers it before streaming: {message}; waiting for the shard to be reachable")]
    ShardUnreadable {
        /// The shard.
        shard: String,
        /// The error.
        message: String,
    },
    /// The spill log, the slot and the shards' progress do not prove a lossless start.
    #[error("refusing to start: {0}")]
    Startup(StartupError),
    /// The admin console's settings are refused (exposed without a password, bad TLS files).
    #[error("{0}")]
    Admin(#[from] crate::admin::AdminError),
    /// A task panicked or could not be joined.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StartupError> for RuntimeError {
    // Not `#[from]`: the message already holds the cause; a `source` would print it twice.
    fn from(e: StartupError) -> RuntimeError {
        RuntimeError::Startup(e)
    }
}

impl Classify for RuntimeError {
    fn class(&self) -> ErrorClass {
        match self {
            RuntimeError::Source(e) => e.class(),
            RuntimeError::Catalog(e) => e.class(),
            RuntimeError::Spill(e) => e.class(),
            RuntimeError::Snapshot(e) => e.class(),
            RuntimeError::Ingest(e) => e.class(),
            RuntimeError::ShardUnreadable { .. } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}

/// How the daemon ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The slot's confirmed flush position at exit.
    pub confirmed_flush_lsn: Lsn,
    /// Per shard: name, applied LSN, state.
    pub shards: Vec<(String, Lsn, ShardState)>,
}

/// A running daemon.
pub struct Running {
    /// Status and control (what the admin console serves).
    pub admin: AdminHandle,
    /// Set to `true` to shut down cleanly.
    pub shutdown: watch::Sender<bool>,
    /// Completes when the daemon has stopped.
    pub done: JoinHandle<Result<RunSummary, RuntimeError>>,
}

/// Starts the daemon. Returns once the source is streaming (the full load, if any, runs in the
/// background); errors before that are returned directly.
// Start-up errors are built once per run; their size does not matter.
#[allow(clippy::result_large_err)]
pub async fn start(cfg: Config, opts: RunOptions) -> Result<Running, RuntimeError> {
    let deadline = Instant::now() + opts.start_retry;
    let mut backoff = Duration::from_millis(cfg.apply.retry_initial_ms.max(1));
    let max = Duration::from_millis(cfg.apply.retry_max_ms.max(1));
    loop {
        let mut reached = false;
        match start_once(cfg.clone(), &opts, &mut reached).await {
            Err(e)
                if reached
                    && e.class() == ErrorClass::Transient
                    && Instant::now() + backoff < deadline =>
            {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    gives_up_in_s = deadline.saturating_duration_since(Instant::now()).as_secs(),
                    "could not start yet: a server is unreachable or restarting; retrying (reshard run --start-retry-secs sets how long)"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
            }
            r => return r,
        }
    }
}

/// One attempt of [`start`]; sets `reached` once the source answered `IDENTIFY_SYSTEM`.
#[allow(clippy::result_large_err)]
async fn start_once(
    cfg: Config,
    opts: &RunOptions,
    reached: &mut bool,
) -> Result<Running, RuntimeError> {
    let started = Instant::now();
    let names = cfg.shard_names();
    if let Some(n) = cfg.source.channel_capacity {
        tracing::warn!(channel_capacity = n, "[source] channel_capacity has no effect (ingest reads, routes and spills on one thread); remove it from the config");
    }
    // The admin console's settings are checked before anything touches the source.
    let admin_auth = crate::admin::AdminAuth::from_config(&cfg.admin)?;
    if !cfg.admin.listen.is_empty() {
        admin_auth.check_exposure(&cfg.admin.listen)?;
    }
    let conn = ConnConfig::parse(&cfg.source.url)?;
    let sql = conn.connect_sql().await?;
    let tables = catalog::discover(&sql, &cfg).await?;
    // Before anything is created or copied: every sharded table's UPDATEs and DELETEs must be
    // routable (the same verdict as `reshard check`), never a stop minutes into the stream.
    let unroutable = identity::tables_without_strategy(&sql, tables.iter().map(|t| &t.rule))
        .await
        .map_err(|source| CatalogError::Query {
            what: "reading replica identities",
            source,
        })?;
    if !unroutable.is_empty() {
        return Err(RuntimeError::KeyOutsideIdentity(unroutable));
    }
    let created = catalog::ensure_publication(&sql, &cfg.source.publication, &tables).await?;
    if created {
        tracing::info!(publication = %cfg.source.publication, tables = tables.len(), "created the publication");
    }
    let map_source = MapSource::from_config(&cfg)?;
    let initial_map = match &map_source {
        Some(src) => Some(Arc::new(src.load(&mut None).await?)),
        None => None,
    };
    let router = Router::new(route_spec(&cfg, &tables, initial_map.clone()))?;
    let shard_conns = cfg
        .shards
        .iter()
        .map(|s| {
            ConnConfig::parse(&s.url).map_err(|source| RuntimeError::ShardConfig {
                shard: s.name.clone(),
                source: Box::new(source),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut repl = ReplicationClient::connect(&conn).await?;
    let system = repl.identify_system().await?;
    tracing::info!(system_id = %system.system_id, slot = %cfg.source.slot, shards = names.len(), "starting");
    *reached = true;

    let spill_opts = spill_options(&cfg);
    let identity = SpillIdentity {
        system_id: system.system_id.clone(),
        slot: cfg.source.slot.clone(),
        shards: names.clone(),
    };
    let (mut writer, spill_report) =
        tokio::task::spawn_blocking(move || SpillWriter::open(spill_opts, identity))
            .await
            .map_err(|e| RuntimeError::Internal(format!("opening the spill log: {e}")))??;
    let log: Arc<SpillLog> = Arc::new(writer.log());

    let slot_row = list_slots(&sql)
        .await?
        .into_iter()
        .find(|s| s.slot_name == cfg.source.slot);
    let slot_exists = slot_row.is_some();
    let slot_state = match &slot_row {
        None => startup::SlotState::Missing,
        Some(s) => startup::SlotState::Exists {
            confirmed_flush_lsn: s.confirmed_flush_lsn.unwrap_or_default(),
        },
    };
    // The full load's plan (read-only) says which tables earlier runs copied, and under which
    // snapshots: part of what the start-up proof needs.
    let prepared = if opts.skip_full_load {
        None
    } else {
        let full_load = FullLoad::new(
            sql_connect(conn.clone()),
            cfg.shards
                .iter()
                .zip(&shard_conns)
                .map(|(s, c)| snapshot::ShardTarget {
                    name: s.name.clone(),
                    connect: sql_connect(c.clone()),
                })
                .collect(),
            table_specs(&tables),
            route_fn(&router),
            snapshot_options(&cfg)?,
        );
        Some(full_load.prepare().await?)
    };
    let shard_states =
        shard_states(&cfg, &shard_conns, &system.system_id, prepared.as_ref()).await?;
    let plan = startup::plan(
        &cfg.source.slot,
        slot_state,
        &startup::LogState {
            dir: cfg.spill.dir.clone(),
            migration_id: spill_report.migration_id.clone(),
            start_lsn: spill_report.start_lsn,
            durable_lsn: spill_report.durable_lsn,
        },
        &shard_states,
        || startup::new_migration_id(&system.system_id),
    )?;
    let migration_id = plan.migration_id().to_owned();
    // Where the log starts: everything committed from here on is in the log or still comes
    // from the slot. A new slot's consistent point, recorded once the slot exists.
    let log_start = match &plan {
        startup::Plan::Resume { log_start, .. } => {
            writer.record_lineage(&migration_id, *log_start)?;
            *log_start
        }
        startup::Plan::Create { .. } => Lsn::ZERO,
    };
    tracing::info!(migration = %migration_id, log_start = %log_start, slot_exists, "start-up proof: the spill log covers every shard");

    // Full load and the first replication stream.
    let ingest_opts = IngestOptions {
        conn: conn.clone(),
        slot: cfg.source.slot.clone(),
        publication: cfg.source.publication.clone(),
        streaming: cfg.source.streaming,
        status_interval: Duration::from_millis(cfg.source.status_interval_ms),
        flush_interval: Duration::from_millis(cfg.spill.flush_interval_ms),
        stream_dir: cfg.spill.dir.join("streams"),
        retry_initial: Duration::from_millis(cfg.apply.retry_initial_ms),
        retry_max: Duration::from_millis(cfg.apply.retry_max_ms),
    };
    let (load_tx, load_rx) = watch::channel::<Option<Arc<Handoff>>>(None);
    let (load_err_tx, load_err_rx) = oneshot::channel::<SnapshotError>();
    let mut load_progress: Option<watch::Receiver<FullLoadProgress>> = None;
    let first: Started;
    if opts.skip_full_load {
        let start_at = if slot_exists {
            spill_report.durable_lsn
        } else {
            let info = repl
                .create_slot(
                    &cfg.source.slot,
                    SlotOptions {
                        snapshot: SnapshotAction::NoExport,
                        ..Default::default()
                    },
                )
                .await?;
            tracing::info!(slot = %info.name, consistent_point = %info.consistent_point, "created the slot (no full load)");
            writer.record_lineage(&migration_id, info.consistent_point)?;
            info.consistent_point
        };
        first = start_streaming(repl, &ingest_opts, start_at).await?;
        let _ = load_tx.send(Some(Arc::new(Handoff::default())));
    } else {
        let prepared = prepared
            .ok_or_else(|| RuntimeError::Internal("the full load was not prepared".into()))?;
        load_progress = Some(prepared.progress());
        log_load_progress(
            prepared.progress(),
            Duration::from_secs(cfg.snapshot.progress_interval_secs),
        );
        let (imported_tx, imported_rx) = oneshot::channel();
        let (snapshot, start_at, consistent_point, exporter) = if !slot_exists {
            let info = repl
                .create_slot(
                    &cfg.source.slot,
                    SlotOptions {
                        snapshot: SnapshotAction::Export,
                        ..Default::default()
                    },
                )
                .await?;
            tracing::info!(slot = %info.name, consistent_point = %info.consistent_point, "created the slot with an exported snapshot");
            writer.record_lineage(&migration_id, info.consistent_point)?;
            let snap = info.snapshot_name.map(|name| snapshot::ExportedSnapshot {
                name,
                lsn: info.consistent_point,
            });
            (snap, info.consistent_point, info.consistent_point, None)
        } else if prepared.needs_snapshot() {
            // Resuming an interrupted load: a temporary slot's snapshot has a known LSN.
            let mut tmp = ReplicationClient::connect(&conn).await?;
            let name = format!("{}_load_{}", cfg.source.slot, std::process::id());
            let info = tmp
                .create_slot(
                    &name,
                    SlotOptions {
                        temporary: true,
                        snapshot: SnapshotAction::Export,
                        ..Default::default()
                    },
                )
                .await?;
            tracing::info!(tables = ?prepared.tables_to_copy(), snapshot_lsn = %info.consistent_point, "resuming the full load under a new snapshot");
            let snap = info.snapshot_name.map(|name| snapshot::ExportedSnapshot {
                name,
                lsn: info.consistent_point,
            });
            (snap, spill_report.durable_lsn, log_start, Some(tmp))
        } else {
            (None, spill_report.durable_lsn, log_start, None)
        };
        let needs = prepared.needs_snapshot();
        let load = tokio::spawn(prepared.run(snapshot, Some(imported_tx)));
        let mut load = Some(load);
        if needs {
            // Keep the exporting connection idle until every copy connection imported the
            // snapshot; an error of the load before that is an error of the start.
            tokio::select! {
                r = imported_rx => {
                    if r.is_err() {
                        if let Some(l) = load.take() {
                            match l.await {
                                Ok(Err(e)) => return Err(e.into()),
                                Ok(Ok(_)) => {}
                                Err(e) => return Err(RuntimeError::Internal(format!("full load task: {e}"))),
                            }
                        }
                    }
                }
            }
        }
        if let Some(tmp) = exporter {
            tmp.close().await;
        }
        first = match start_streaming(repl, &ingest_opts, start_at).await {
            Ok(f) => f,
            Err(e) => {
                // No copy may outlive a failed start: a retry starts its own.
                if let Some(l) = load.take() {
                    l.abort();
                }
                return Err(e.into());
            }
        };
        if let Some(load) = load {
            tokio::spawn(async move {
                match load.await {
                    Ok(Ok(report)) => {
                        log_load_report(&report);
                        let _ = load_tx.send(Some(Arc::new(report.handoff(consistent_point))));
                    }
                    Ok(Err(e)) => {
                        let _ = load_err_tx.send(e);
                    }
                    Err(e) => {
                        let _ = load_err_tx.send(SnapshotError::Task {
                            what: "full load".into(),
                            message: e.to_string(),
                        });
                    }
                }
            });
        }
    }

    // Ingest on its own thread.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (pause_source_tx, pause_source_rx) = watch::channel(false);
    let counters = Arc::new(IngestCounters::default());
    let quarantine = Quarantine::open(&cfg.spill.dir, spill_report.durable_lsn)?;
    let quarantine_stats = quarantine.stats();
    let (map, map_status) = match (map_source, initial_map) {
        (Some(src), Some(initial)) => {
            let every = (cfg.routing.map_refresh_secs > 0)
                .then(|| Duration::from_secs(cfg.routing.map_refresh_secs));
            let (refresher, handle) = MapRefresher::new(src, initial, every);
            let status = refresher.status();
            tokio::spawn(refresher.run(shutdown_rx.clone()));
            (Some(handle), Some(status))
        }
        _ => (None, None),
    };
    let ingest = Ingest::new(
        ingest_opts,
        router,
        writer,
        counters.clone(),
        spill_report.durable_lsn,
        UnroutableHandling {
            policy: cfg.routing.on_unroutable,
            quarantine,
            map,
        },
    );
    let (ingest_done_tx, ingest_done_rx) = oneshot::channel::<Result<Lsn, IngestError>>();
    {
        let shutdown = shutdown_rx.clone();
        std::thread::Builder::new()
            .name("reshard-ingest".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ingest_done_tx.send(Err(IngestError::Spill(SpillError::Io {
                            op: "start the ingest runtime for",
                            path: PathBuf::from("(ingest thread)"),
                            source: e,
                        })));
                        return;
                    }
                };
                let span = tracing::info_span!("ingest");
                let _g = span.enter();
                let r = rt.block_on(ingest.run(Some(first), shutdown, pause_source_rx));
                let _ = ingest_done_tx.send(r);
            })
            .map_err(|e| RuntimeError::Internal(format!("spawning the ingest thread: {e}")))?;
    }

    // One apply task per shard. Each reads the source catalog (when a source table's columns
    // change mid-stream) on a connection of its own, opened only then.
    let source_catalog: SourceConnect = {
        let conn = conn.clone();
        Arc::new(move || {
            let conn = conn.clone();
            Box::pin(async move { conn.connect_sql().await.map_err(|e| e.to_string()) })
        })
    };
    let mut shards = Vec::new();
    for (i, (s, c)) in cfg.shards.iter().zip(&shard_conns).enumerate() {
        let (status_tx, status_rx) = watch::channel(ShardStatus {
            shard: s.name.clone(),
            ..Default::default()
        });
        let (pause_tx, pause_rx) = watch::channel(false);
        let apply_opts = ApplyOptions {
            shard: ShardId(i as u16),
            shard_name: s.name.clone(),
            source_system_id: system.system_id.clone(),
            slot: cfg.source.slot.clone(),
            migration_id: Some(migration_id.clone()),
            table_map: tables
                .iter()
                .filter(|t| t.rule.target != t.rule.source)
                .map(|t| (t.rule.source.clone(), t.rule.target.clone()))
                .collect(),
            ..ApplyOptions::from_config(&cfg.apply)
        };
        let conn = c.clone();
        let connect = move || {
            let conn = conn.clone();
            async move { conn.connect_sql().await }
        };
        let mut load_rx = load_rx.clone();
        let log = log.clone();
        let mut shutdown = shutdown_rx.clone();
        let latency: LatencySlot = Arc::new(OnceLock::new());
        let latency_slot = latency.clone();
        let name = s.name.clone();
        let source_catalog = source_catalog.clone();
        let task = tokio::spawn(async move {
            // Wait for the full load (or shutdown).
            let skip = loop {
                if let Some(skip) = load_rx.borrow().clone() {
                    break skip;
                }
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => if *shutdown.borrow() { return Ok(()) },
                    r = load_rx.changed() => if r.is_err() { return Ok(()) },
                }
            };
            let skip_log = Arc::new(SkipLog::new(log, skip));
            let applier = ShardApplier::new(apply_opts, connect, skip_log)
                .with_pause(pause_rx)
                .with_source_catalog(source_catalog);
            let _ = latency_slot.set(applier.latency_histogram());
            tracing::info!(shard = %name, "apply starting");
            applier.run(shutdown, status_tx).await
        });
        shards.push(ShardHandle {
            name: s.name.clone(),
            status: status_rx,
            pause: pause_tx,
            latency,
            task: Some(task),
            error: None,
        });
    }

    // Status, control, admin console, metrics.
    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let (control_tx, control_rx) = mpsc::channel::<ControlRequest>(16);
    let admin = AdminHandle {
        status: status_rx.clone(),
        control: control_tx,
    };
    if !cfg.admin.listen.is_empty() {
        let auth = admin_auth;
        let (listen, handle, shutdown) =
            (cfg.admin.listen.clone(), admin.clone(), shutdown_rx.clone());
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
            RuntimeError::State(format!("[admin] listen = {listen:?}: cannot listen there: {e}; pick a free address or set listen = \"\" to turn the admin console off"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_on(listener, auth, handle, shutdown).await {
                tracing::error!(error = %e, "admin console stopped");
            }
        });
    }
    if !cfg.admin.metrics.is_empty() {
        let (listen, status, shutdown) = (
            cfg.admin.metrics.clone(),
            status_rx.clone(),
            shutdown_rx.clone(),
        );
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
            RuntimeError::State(format!("[admin] metrics = {listen:?}: cannot listen there: {e}; pick a free address or set metrics = \"\" to turn the endpoint off"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_metrics_on(listener, status, shutdown).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    let supervisor = Supervisor {
        cfg,
        system_id: system.system_id.clone(),
        started,
        sql,
        counters,
        log,
        shards,
        tables,
        quarantine: quarantine_stats,
        map_status,
        load_progress,
        load_rx,
        status_tx,
        control_rx,
        pause_source: pause_source_tx,
        shutdown_tx: shutdown_tx.clone(),
        shutdown_rx,
        ingest_done: ingest_done_rx,
        load_err: load_err_rx,
    };
    let done = tokio::spawn(supervisor.run());
    Ok(Running {
        admin,
        shutdown: shutdown_tx,
        done,
    })
}

/// The apply's latency histogram, set once the shard's applier exists (after the full load).
type LatencySlot = Arc<OnceLock<Arc<Mutex<Histogram<u64>>>>>;

struct ShardHandle {
    name: String,
    status: watch::Receiver<ShardStatus>,
    pause: watch::Sender<bool>,
    latency: LatencySlot,
    task: Option<JoinHandle<Result<(), crate::apply::ApplyError>>>,
    error: Option<String>,
}

/// Watches the stages, publishes the status, serves control commands, and stops everything
/// on shutdown or when nothing can go on.
struct Supervisor {
    cfg: Config,
    /// The source's `IDENTIFY_SYSTEM` id, shown in the status.
    system_id: String,
    started: Instant,
    sql: tokio_postgres::Client,
    counters: Arc<IngestCounters>,
    log: Arc<SpillLog>,
    shards: Vec<ShardHandle>,
    tables: Vec<SourceTable>,
    quarantine: Arc<QuarantineStats>,
    map_status: Option<Arc<Mutex<MapStatus>>>,
    load_progress: Option<watch::Receiver<FullLoadProgress>>,
    load_rx: watch::Receiver<Option<Arc<Handoff>>>,
    status_tx: watch::Sender<StatusSnapshot>,
    control_rx: mpsc::Receiver<ControlRequest>,
    pause_source: watch::Sender<bool>,
    shutdown_tx: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
    ingest_done: oneshot::Receiver<Result<Lsn, IngestError>>,
    load_err: oneshot::Receiver<SnapshotError>,
}

impl Supervisor {
    async fn run(mut self) -> Result<RunSummary, RuntimeError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut source_poll = Instant::now() - Duration::from_secs(60);
        let mut source_info = SourceStatus::default();
        let mut heartbeat = Heartbeat::default();
        let mut rates = Rates::default();
        let mut failure: Option<RuntimeError> = None;
        let mut ingest_result: Option<Result<Lsn, IngestError>> = None;
        let mut load_watch_done = false;
        loop {
            tokio::select! {
                biased;
                // This is cancellation-safe.
                _ = self.shutdown_rx.changed() => {
                    if *self.shutdown_rx.borrow() { break; }
                }
                // This is cancellation-safe (a oneshot receiver).
                r = &mut self.ingest_done, if ingest_result.is_none() => {
                    let r = r.unwrap_or_else(|_| Err(IngestError::Source(SourceError::protocol("ingest thread ended"))));
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "reading from the source stopped");
                        failure = Some(RuntimeError::Internal(String::new()));
                    }
                    ingest_result = Some(r);
                    break;
                }
                // This is cancellation-safe (a oneshot receiver).
                r = &mut self.load_err, if !load_watch_done => {
                    load_watch_done = true;
                    if let Ok(e) = r {
                        tracing::error!(error = %e, "the full load failed; restart to resume it (finished tables are not copied again)");
                        failure = Some(e.into());
                        break;
                    }
                }
                // This is cancellation-safe.
                Some((cmd, reply)) = self.control_rx.recv() => {
                    let answer = self.control(cmd);
                    let _ = reply.send(answer);
                }
                // This is cancellation-safe.
                _ = tick.tick() => {
                    if source_poll.elapsed() >= Duration::from_secs(1) {
                        source_poll = Instant::now();
                        self.poll_source(&mut source_info).await;
                        self.heartbeat(&source_info, &mut heartbeat).await;
                    }
                    let snap = self.snapshot(&source_info, &mut rates);
                    self.status_tx.send_replace(snap);
                    if !*self.shutdown_rx.borrow() && self.all_shards_stopped() {
                        let errors: Vec<String> = self.shards.iter().map(|s| format!("  {}: {}", s.name, s.error.clone().unwrap_or_default())).collect();
                        failure = Some(RuntimeError::AllShardsStopped(errors.join("\n")));
                        break;
                    }
                }
            }
        }
        // Shut everything down: ingest flushes and confirms, applies finish or roll back.
        let _ = self.shutdown_tx.send(true);
        let ingest_result = match ingest_result {
            Some(r) => r,
            None => (&mut self.ingest_done).await.unwrap_or_else(|_| {
                Err(IngestError::Source(SourceError::protocol(
                    "ingest thread ended",
                )))
            }),
        };
        for s in &mut self.shards {
            if let Some(t) = s.task.take() {
                match tokio::time::timeout(Duration::from_secs(60), t).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => s.error = Some(e.to_string()),
                    Ok(Err(e)) => s.error = Some(format!("apply task failed: {e}")),
                    Err(_) => s.error = Some("apply did not stop within 60 s".into()),
                }
            }
        }
        let final_snap = self.snapshot(&SourceStatus::default(), &mut Rates::default());
        let summary = RunSummary {
            confirmed_flush_lsn: self.counters.confirmed(),
            shards: final_snap
                .shards
                .iter()
                .map(|s| (s.name.clone(), s.applied_lsn, s.state))
                .collect(),
        };
        for (name, lsn, state) in &summary.shards {
            tracing::info!(shard = %name, applied_lsn = %lsn, state = state.as_str(), "shard stopped");
        }
        tracing::info!(slot = %self.cfg.source.slot, confirmed_flush_lsn = %summary.confirmed_flush_lsn, "reshard stopped");
        if let Err(e) = ingest_result {
            return Err(e.into());
        }
        match failure {
            Some(RuntimeError::Internal(m)) if m.is_empty() => Ok(summary),
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    /// Whether every shard's apply task ended with an error. A shard waiting for DDL (a schema
    /// change on the source) is not among them: its applier retries on the backoff and resumes
    /// by itself, so the daemon keeps running.
    fn all_shards_stopped(&mut self) -> bool {
        for s in &mut self.shards {
            if let Some(t) = &s.task {
                if t.is_finished() {
                    if let Some(t) = s.task.take() {
                        // Finished: collect the error without waiting.
                        let name = s.name.clone();
                        match futures_util::FutureExt::now_or_never(t) {
                            Some(Ok(Err(e))) => {
                                tracing::error!(shard = %name, error = %e, "shard stopped");
                                s.error = Some(e.to_string());
                            }
                            Some(Err(e)) => s.error = Some(format!("apply task failed: {e}")),
                            // A clean stop (shutdown) is not a failure.
                            Some(Ok(Ok(()))) => {}
                            None => s.error = Some("stopped".into()),
                        }
                    }
                }
            }
        }
        !self.shards.is_empty()
            && self
                .shards
                .iter()
                .all(|s| s.task.is_none() && s.error.is_some())
    }

    fn control(&mut self, cmd: ControlCommand) -> Result<String, String> {
        let find = |shards: &[ShardHandle], name: &str| {
            shards.iter().position(|s| s.name == name).ok_or_else(|| {
                format!(
                    "unknown shard {name:?}; shards are: {}",
                    shards
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        };
        match cmd {
            ControlCommand::Pause(Some(name)) => {
                let i = find(&self.shards, &name)?;
                self.shards[i].pause.send_replace(true);
                tracing::info!(shard = %name, "shard paused by operator");
                Ok(format!("PAUSE {name}"))
            }
            ControlCommand::Resume(Some(name)) => {
                let i = find(&self.shards, &name)?;
                self.shards[i].pause.send_replace(false);
                tracing::info!(shard = %name, "shard resumed by operator");
                Ok(format!("RESUME {name}"))
            }
            ControlCommand::Pause(None) => {
                self.pause_source.send_replace(true);
                tracing::info!("reading from the source paused by operator");
                Ok("PAUSE".into())
            }
            ControlCommand::Resume(None) => {
                self.pause_source.send_replace(false);
                tracing::info!("reading from the source resumed by operator");
                Ok("RESUME".into())
            }
            ControlCommand::Shutdown => {
                tracing::info!("shutdown requested on the admin console");
                let _ = self.shutdown_tx.send(true);
                Ok("SHUTDOWN".into())
            }
        }
    }

    async fn poll_source(&self, out: &mut SourceStatus) {
        let q = format!(
            "SELECT {SOURCE_PRESENT_LSN}::text, \
             (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
             (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1)"
        );
        match self.sql.query_one(&q, &[&self.cfg.source.slot]).await {
            Ok(row) => {
                let lsn = |i: usize| {
                    row.get::<_, Option<String>>(i)
                        .and_then(|s| s.parse::<Lsn>().ok())
                        .unwrap_or_default()
                };
                out.current_wal_lsn = lsn(0);
                out.confirmed_flush_lsn = lsn(1);
                out.retained_wal_bytes = row.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64;
                out.last_error = None;
            }
            Err(e) => out.last_error = Some(format!("polling the source: {e}")),
        }
    }

    /// When the source wrote WAL that reshard was not sent (writes to unpublished tables, or
    /// nothing at all since the last transaction) and the stream is idle, a non-transactional
    /// logical message makes the walsender send a position; the ingest records it as durable,
    /// so idle shards' progress (and lag, `verify`, `cutover`) reach the source's present.
    async fn heartbeat(&self, src: &SourceStatus, hb: &mut Heartbeat) {
        let received = self.counters.received();
        let idle = received == hb.last_received;
        hb.last_received = received;
        if hb.disabled
            || !idle
            || src.current_wal_lsn.is_zero()
            || src.current_wal_lsn <= self.counters.confirmed()
            || src.current_wal_lsn == hb.after_emit
        {
            return;
        }
        match self
            .sql
            .query_one(
                &format!("SELECT pg_logical_emit_message(false, 'reshard.heartbeat', '')::text, {SOURCE_PRESENT_LSN}::text"),
                &[],
            )
            .await
        {
            Ok(row) => {
                hb.after_emit = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()).unwrap_or_default();
            }
            Err(e) => {
                tracing::info!(error = %e, "cannot emit heartbeat messages on the source (pg_logical_emit_message); idle shards' progress advances only with the source's own traffic");
                hb.disabled = true;
            }
        }
    }

    fn snapshot(&self, src: &SourceStatus, rates: &mut Rates) -> StatusSnapshot {
        let c = &self.counters;
        let received = c.received().max(c.confirmed());
        let spill = self.log.stats();
        let now = pg_now();
        let loading = self.load_rx.borrow().is_none();
        let backpressure = c.backpressure.load(Ordering::Relaxed);
        let phase = if *self.shutdown_rx.borrow() {
            Phase::Stopping
        } else if loading {
            Phase::FullLoad
        } else if backpressure || c.paused.load(Ordering::Relaxed) {
            Phase::Paused
        } else {
            Phase::Streaming
        };
        let changes = c.changes.load(Ordering::Relaxed);
        let mut shards = Vec::with_capacity(self.shards.len());
        for (i, s) in self.shards.iter().enumerate() {
            let st = s.status.borrow().clone();
            let state = if s.error.is_some() {
                ShardState::Stopped
            } else if loading {
                ShardState::Waiting
            } else {
                match st.state {
                    ApplyState::Starting => ShardState::Waiting,
                    ApplyState::Running => ShardState::Running,
                    ApplyState::Retrying => ShardState::Retrying,
                    ApplyState::WaitingForDdl => ShardState::WaitingForDdl,
                    ApplyState::Paused => ShardState::Paused,
                    ApplyState::Stopped => ShardState::Stopped,
                }
            };
            let applied = st.applied_commit_lsn;
            // An idle shard's heartbeat stops just below `durable_lsn` (see `spill`): that is
            // caught up, not one byte (and ever more seconds) behind.
            let caught_up = applied.covers(spill.durable_lsn);
            let lag_bytes = if caught_up {
                0
            } else {
                received.bytes_since(applied)
            };
            let lag_seconds = match st.last_commit_time {
                Some(t) if !caught_up => ((now - t).max(0) as f64) / 1e6,
                None if !caught_up && lag_bytes > 0 => self.started.elapsed().as_secs_f64(),
                _ => 0.0,
            };
            let (p50, p99, max) = s
                .latency
                .get()
                .and_then(|h| {
                    h.lock().ok().map(|h| {
                        (
                            h.value_at_quantile(0.5) as f64 / 1e3,
                            h.value_at_quantile(0.99) as f64 / 1e3,
                            h.max() as f64 / 1e3,
                        )
                    })
                })
                .unwrap_or((0.0, 0.0, 0.0));
            let rows = st.rows_inserted + st.rows_updated + st.rows_deleted;
            let rps = rates.shard_rate(i, rows);
            shards.push(ShardView {
                name: s.name.clone(),
                state,
                applied_lsn: applied,
                last_commit_time: st.last_commit_time,
                lag_bytes,
                lag_seconds,
                txns_applied_total: st.txns_applied,
                rows_inserted_total: st.rows_inserted,
                rows_updated_total: st.rows_updated,
                rows_deleted_total: st.rows_deleted,
                batches_total: st.batches,
                replays_total: st.replays,
                transient_errors_total: st.retries,
                definite_errors_total: u64::from(s.error.is_some()),
                rows_per_sec: rps,
                avg_batch_txns: if st.batches > 0 {
                    st.txns_applied as f64 / st.batches as f64
                } else {
                    0.0
                },
                latency_p50_ms: p50,
                latency_p99_ms: p99,
                latency_max_ms: max,
                last_error: s.error.clone().or(st.last_error),
            });
        }
        let progress = self.load_progress.as_ref().map(|p| p.borrow().clone());
        let tables = self
            .tables
            .iter()
            .map(|t| {
                let p = progress.as_ref().and_then(|p| {
                    p.tables.iter().find(|x| {
                        let n = x.table.replace('"', "");
                        n == t.rule.source
                    })
                });
                TableView {
                    name: t.rule.source.clone(),
                    target: t.rule.target.clone(),
                    mode: t.rule.mode.to_string(),
                    state: p.map(|p| p.state.as_str().to_owned()).unwrap_or_else(|| {
                        if loading {
                            "pending".into()
                        } else {
                            "streaming".into()
                        }
                    }),
                    rows_copied: p.map(|p| p.rows_copied).unwrap_or(0),
                    rows_estimated: t.estimated_rows.max(0) as u64,
                    bytes_copied: p.map(|p| p.bytes).unwrap_or(0),
                }
            })
            .collect();
        rates.high_water = rates.high_water.max(spill.bytes_on_disk);
        StatusSnapshot {
            phase,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            source: SourceStatus {
                slot: self.cfg.source.slot.clone(),
                publication: self.cfg.source.publication.clone(),
                system_id: self.system_id.clone(),
                confirmed_flush_lsn: src.confirmed_flush_lsn.max(c.confirmed()),
                current_wal_lsn: src.current_wal_lsn,
                retained_wal_bytes: src.retained_wal_bytes,
                received_lsn: c.received(),
                bytes_received_total: c.bytes_received.load(Ordering::Relaxed),
                txns_received_total: c.txns.load(Ordering::Relaxed),
                changes_received_total: changes,
                changes_per_sec: rates.source_rate(changes),
                backpressure,
                connected: c.connected.load(Ordering::Relaxed),
                last_error: src.last_error.clone(),
            },
            shards,
            tables,
            spill: SpillView {
                dir: self.cfg.spill.dir.display().to_string(),
                bytes: spill.bytes_on_disk,
                max_bytes: self.cfg.spill.max_bytes,
                segments: spill.segments,
                durable_lsn: spill.durable_lsn,
                oldest_unapplied_lsn: spill
                    .shards
                    .iter()
                    .filter_map(|s| s.oldest_unapplied_lsn)
                    .min(),
                backpressure_active: spill.backpressure_active,
                fsyncs_total: spill.fsyncs_total,
                txns_per_fsync: spill.txns_per_fsync_avg,
                high_water_bytes: rates.high_water,
            },
            quarantine: self.quarantine.tables(),
            account_map: self
                .map_status
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        }
    }
}

/// State of the idle heartbeat.
#[derive(Default)]
struct Heartbeat {
    last_received: Lsn,
    after_emit: Lsn,
    disabled: bool,
}

/// Recent rates from cumulative counters (an exponentially smoothed per-second rate).
#[derive(Default)]
struct Rates {
    last: Option<Instant>,
    source: (u64, f64),
    shards: Vec<(u64, f64)>,
    high_water: u64,
}

impl Rates {
    fn rate(prev: &mut (u64, f64), now_total: u64, dt: f64) -> f64 {
        if dt > 0.0 {
            let r = now_total.saturating_sub(prev.0) as f64 / dt;
            prev.1 = if prev.1 == 0.0 {
                r
            } else {
                0.7 * prev.1 + 0.3 * r
            };
        }
        prev.0 = now_total;
        prev.1
    }

    fn dt(&self) -> f64 {
        self.last.map(|l| l.elapsed().as_secs_f64()).unwrap_or(0.0)
    }

    fn source_rate(&mut self, total: u64) -> f64 {
        let dt = self.dt();
        let r = Self::rate(&mut self.source, total, dt);
        self.last = Some(Instant::now());
        r
    }

    fn shard_rate(&mut self, i: usize, total: u64) -> f64 {
        let dt = self.dt();
        if self.shards.len() <= i {
            self.shards.resize(i + 1, (0, 0.0));
        }
        Self::rate(&mut self.shards[i], total, dt)
    }
}

/// Every shard's progress row (and what earlier full loads copied), for the start-up proof.
async fn shard_states(
    cfg: &Config,
    conns: &[ConnConfig],
    system_id: &str,
    prepared: Option<&snapshot::PreparedLoad>,
) -> Result<Vec<startup::ShardState>, RuntimeError> {
    let mut out = Vec::with_capacity(conns.len());
    for (s, c) in cfg.shards.iter().zip(conns) {
        let unreadable = |e: &dyn std::fmt::Display| RuntimeError::ShardUnreadable {
            shard: s.name.clone(),
            message: e.to_string(),
        };
        let client = c.connect_sql().await.map_err(|e| unreadable(&e))?;
        let row =
            crate::pg::progress::read_progress(&client, &cfg.source.slot, &s.name, Some(system_id))
                .await
                .map_err(|e| match e {
                    e @ crate::pg::progress::ProgressError::Invalid { .. } => {
                        RuntimeError::State(e.to_string())
                    }
                    e => unreadable(&e),
                })?;
        out.push(startup::ShardState {
            name: s.name.clone(),
            progress: row.as_ref().map(|r| r.commit_lsn),
            migration_id: row.and_then(|r| r.migration_id),
            has_load_records: prepared.is_some_and(|p| p.has_records()),
            oldest_copy_lsn: prepared.and_then(|p| p.oldest_finished_as_of()),
        });
    }
    Ok(out)
}

/// `[snapshot] progress_interval_secs`: every interval, one log line per table being copied,
/// until the load is finished (or dropped). 0 turns the lines off.
fn log_load_progress(mut progress: watch::Receiver<FullLoadProgress>, every: Duration) {
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: nothing is copied yet
        loop {
            tick.tick().await;
            if progress.has_changed().is_err() {
                return; // the load is over (its sender is gone)
            }
            let p = progress.borrow_and_update().clone();
            if p.finished() {
                return;
            }
            for t in p.tables.iter().filter(|t| t.state == TableState::Copying) {
                tracing::info!(table = %t.table, "full load progress: {}", snapshot::render_line(t));
            }
        }
    });
}

fn log_load_report(report: &FullLoadReport) {
    for t in &report.tables {
        tracing::info!(table = %t.table, rows = t.rows, bytes = t.bytes, chunks = t.chunks_copied, as_of = %t.as_of, recopied = t.recopied, "table loaded");
    }
    tracing::info!(
        indexes_rebuilt = report.indexes_rebuilt,
        "full load done; shards start applying changes"
    );
}

fn spill_options(cfg: &Config) -> SpillOptions {
    SpillOptions::from(&cfg.spill)
}

fn snapshot_options(cfg: &Config) -> Result<snapshot::FullLoadOptions, SnapshotError> {
    snapshot::FullLoadOptions::from_config(&cfg.snapshot)
}

fn sql_connect(conn: ConnConfig) -> snapshot::Connect {
    Arc::new(move || {
        let conn = conn.clone();
        Box::pin(async move {
            conn.connect_sql()
                .await
                .map_err(|e| Box::new(e) as snapshot::BoxError)
        })
    })
}

fn split(name: &str) -> snapshot::TableName {
    match name.split_once('.') {
        Some((s, t)) => snapshot::TableName::new(s, t),
        None => snapshot::TableName::new("public", name),
    }
}

fn table_specs(tables: &[SourceTable]) -> Vec<snapshot::TableSpec> {
    tables
        .iter()
        .filter(|t| t.rule.mode != CfgMode::Skip)
        .map(|t| snapshot::TableSpec {
            source: split(&t.rule.source),
            target: split(&t.rule.target),
            mode: match t.rule.mode {
                CfgMode::Broadcast => snapshot::TableMode::Broadcast,
                _ => snapshot::TableMode::Sharded {
                    key: t.rule.key.clone(),
                },
            },
        })
        .collect()
}

fn route_fn(router: &Router) -> snapshot::RouteFn {
    let r = Arc::new(router.clone());
    Arc::new(move |oid, text| r.shard_of_text(oid, text).map_err(|e| e.to_string()))
}

/// The router's spec from the config, the discovered tables and the account map (with
/// `hash = "map"`).
pub fn route_spec(cfg: &Config, tables: &[SourceTable], map: Option<Arc<AccountMap>>) -> RouteSpec {
    let shards = cfg.shard_names();
    let hash = match (cfg.routing.hash, map) {
        (HashKind::Map, Some(m)) => route::HashKind::Map(m),
        (HashKind::Map, None) => route::HashKind::Map(Arc::new(AccountMap::new(&shards))),
        (HashKind::Postgres, _) => route::HashKind::Postgres,
    };
    RouteSpec {
        shards,
        tables: tables
            .iter()
            .map(|t| {
                let mode = match t.rule.mode {
                    CfgMode::Sharded => route::TableMode::Sharded {
                        key: t.rule.key.clone(),
                        key_immutable: t.rule.key_immutable,
                    },
                    CfgMode::Broadcast => route::TableMode::Broadcast,
                    CfgMode::Skip => route::TableMode::Skip,
                };
                let target = (t.rule.target != t.rule.source).then(|| t.rule.target.clone());
                (t.rule.source.clone(), route::TableRule { mode, target })
            })
            .collect(),
        default_key: cfg.routing.key.clone(),
        hash,
        unlisted: route::Unlisted::Skip,
    }
}

/// The router `reshard run` would use now: the source's replicated tables and the account map
/// as read now (for `reshard quarantine replay`).
pub async fn current_router(cfg: &Config) -> Result<(Router, Vec<SourceTable>), RuntimeError> {
    let conn = ConnConfig::parse(&cfg.source.url)?;
    let sql = conn.connect_sql().await?;
    let tables = catalog::discover(&sql, cfg).await?;
    let map = match MapSource::from_config(cfg)? {
        Some(src) => Some(Arc::new(src.load(&mut None).await?)),
        None => None,
    };
    let router = Router::new(route_spec(cfg, &tables, map))?;
    Ok((router, tables))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
