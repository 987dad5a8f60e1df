//! Wiring: the one place where reshard's stages are created, connected and started.
//!
//! [`start`] builds every stage from the validated config, creates the bounded channels and
//! `watch`es between them, spawns them (ingest on its own OS thread, one apply task per shard,
//! the full load, status, control, admin console and metrics), and returns a [`Running`]
//! handle. Like Materialize's storage wiring, it holds no logic of its own: what each stage
//! does lives in its module (`source`, `decode`, `route`, `spill`, `apply`, `snapshot`,
//! `handoff`, `status`), and the run's own steps live in the modules below.
//!
//! Start-up order matters for consistency (see DESIGN.md "Things that bite"): the slot is
//! created with an exported snapshot; the full load's connections import it; only then does
//! `START_REPLICATION` run on the connection that created the slot. Changes read while the copy
//! runs go to the spill log; the shards' apply starts when the copy is done, from the slot's
//! consistent point, skipping tables whose copy is newer (`snapshot::handoff`).
//!
//! - [`options`]: the config turned into each stage's options, once; the account map.
//! - [`startup`]: the start-up proof (the spill log covers what the shards still need).
//! - [`begin`]: the start in its order: the proof's inputs, the slot, the full load, the
//!   first stream.
//! - [`ingest`]: slot → decode → route → spill, on one OS thread.
//! - [`supervisor`]: watches the stages, serves control commands, emits heartbeats, stops.
//! - [`status`]: the running daemon's status snapshot (lag, rates).
//! - [`reverse`]: after a fenced cutover, a shard's writes streaming back to the source.
//! - [`stopnote`]: why a shard stopped, in `[spill] dir` for `reshard status` with the daemon down.

pub mod begin;
pub mod ingest;
pub mod options;
pub mod reverse;
pub mod side;
pub mod startup;
pub mod status;
pub mod stopnote;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::apply::{ApplyOptions, SourceConnect};
use crate::config::Config;
use crate::error::{Classify, ErrorClass};
use crate::event::ShardId;
use crate::lsn::Lsn;
use crate::pg::catalog::{self, CatalogError, SourceTable};
use crate::pg::identity;
use crate::quarantine::{Quarantine, QuarantineError};
use crate::route::refresh::MapRefresher;
use crate::route::{RouteError, Router};
use crate::runtime::begin::Proof;
use crate::runtime::ingest::{Ingest, IngestCounters, IngestError, UnroutableHandling};
use crate::runtime::startup::StartupError;
use crate::runtime::supervisor::{ShardHandle, Supervisor};
use crate::shutdown::{self, ShutdownTx};
use crate::snapshot::SnapshotError;
use crate::source::slot::SlotError;
use crate::source::{ConnConfig, ReplicationClient, SourceError};
use crate::spill::{SpillError, SpillIdentity, SpillLog, SpillOptions, SpillWriter};
use crate::status::{AdminHandle, ControlRequest, ShardState, StatusSnapshot};

pub use options::route_spec;

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
    /// Replicated tables without a row identity (nothing was started).
    #[error("{} replicated table(s) have no row identity: publishing them would make the source refuse their UPDATEs and DELETEs (\"cannot update table … because it does not have a replica identity and publishes updates\"), so the application's writes would fail; nothing was created or copied. Fix each, then run again:\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    NoRowIdentity(Vec<identity::NoRowIdentity>),
    /// Partitioned tables on a PostgreSQL 12 source (nothing was started).
    #[error("the source runs PostgreSQL 12, which cannot publish partitioned tables; nothing was created or copied. For each of {}: leave it out ([[tables]] name = \"…\" mode = \"skip\") and move it another way, or upgrade the source to PostgreSQL 13 or later, then run again", .0.join(", "))]
    PartitionedOnPg12(Vec<String>),
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
    /// Two `[[shards]]` urls name one database, or a shard's database holds another shard's
    /// progress (urls swapped); or the shards could not be asked (retried).
    #[error("{0}")]
    Shards(#[from] crate::pg::distinct::DistinctError),
    /// The spill log, the slot and the shards' progress do not prove a lossless start.
    #[error("refusing to start: {0}")]
    Startup(StartupError),
    /// The admin console's settings are refused (exposed without a password, bad TLS files).
    #[error("{0}")]
    Admin(#[from] crate::admin::AdminError),
    /// The reverse direction could not be set up.
    #[error("reverse replication: {0}")]
    Reverse(#[from] reverse::ReverseError),
    /// A task panicked or could not be joined.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<SlotError> for RuntimeError {
    // The publication's and the slot's errors are the source's own.
    fn from(e: SlotError) -> RuntimeError {
        match e {
            SlotError::Publication(e) => RuntimeError::Catalog(e),
            SlotError::Slot(e) => RuntimeError::Source(e),
        }
    }
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
            RuntimeError::Shards(e) if !e.is_mistake() => ErrorClass::Transient,
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
    /// Asks the daemon to shut down cleanly.
    pub shutdown: ShutdownTx,
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
            // Retried until the deadline: the last wait is cut to what is left, and one last
            // attempt is made at the deadline.
            Err(e)
                if reached && e.class() == ErrorClass::Transient && Instant::now() < deadline =>
            {
                let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    gives_up_in_s = deadline.saturating_duration_since(Instant::now()).as_secs(),
                    "could not start yet: a server is unreachable or restarting; retrying (reshard run --start-retry-secs sets how long)"
                );
                tokio::time::sleep(wait).await;
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
    // Before anything is created: without wal_level = logical the slot cannot be created, and
    // the publication and spill log made first would be left behind by a start that fails.
    let wal_level = catalog::setting(&sql, "wal_level")
        .await
        .map_err(|source| CatalogError::Query {
            what: "reading wal_level",
            source,
        })?;
    if wal_level != "logical" {
        return Err(RuntimeError::Source(SourceError::WalLevel {
            message: format!(
                "the source has wal_level = {wal_level}; logical decoding requires wal_level = logical"
            ),
        }));
    }
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
    // Publishing a table without a row identity makes the source refuse its UPDATEs and
    // DELETEs: the application's writes would fail.
    let no_identity = identity::tables_without_row_identity(&sql, tables.iter().map(|t| &t.rule))
        .await
        .map_err(|source| CatalogError::Query {
            what: "reading replica identities",
            source,
        })?;
    if !no_identity.is_empty() {
        return Err(RuntimeError::NoRowIdentity(no_identity));
    }
    // PostgreSQL 12 cannot publish a partitioned table (CREATE PUBLICATION fails on it).
    let partitioned: Vec<String> = tables
        .iter()
        .filter(|t| t.partitioned)
        .map(|t| t.rule.source.to_string())
        .collect();
    if !partitioned.is_empty() && catalog::server_version_num(&sql).await? < 130_000 {
        return Err(RuntimeError::PartitionedOnPg12(partitioned));
    }
    let created = catalog::ensure_publication(&sql, &cfg.source.publication, &tables).await?;
    if created {
        tracing::info!(publication = %cfg.source.publication, tables = tables.len(), "created the publication");
    }
    let map = options::load_map(&cfg).await?;
    let router = Router::new(route_spec(
        &cfg,
        &tables,
        map.as_ref().map(|m| m.map.clone()),
    )?)?;
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
    // The async runtime's workers (`reshard --worker-threads`), beside the ingest's own thread.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(system_id = %system.system_id, slot = %cfg.source.slot, shards = names.len(), workers, "starting");
    *reached = true;
    // Every shard is its own database and holds its own progress (urls swapped between runs
    // would stream each shard's changes into the other's database), before anything is
    // written on a shard. An unreachable shard is retried like any start-up failure.
    crate::pg::distinct::prove(
        &crate::pg::distinct::entries(&cfg, 0),
        Some((&cfg.source.slot, Some(system.system_id.as_str()))),
    )
    .await?;

    let spill_opts = SpillOptions::from(&cfg.spill);
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

    // The start-up proof, then the slot, the full load and the first replication stream.
    let full_load = if opts.skip_full_load {
        None
    } else {
        Some(options::full_load(
            &cfg,
            &conn,
            &shard_conns,
            &tables,
            &router,
        )?)
    };
    let proof: Proof = begin::prove(
        &cfg,
        &sql,
        &shard_conns,
        &system.system_id,
        &mut writer,
        &spill_report,
        full_load,
    )
    .await?;
    let migration_id = proof.migration_id.clone();
    let ingest_opts = options::ingest_options(&cfg, &conn);
    let source = begin::Source {
        sql: &sql,
        tables: &tables,
    };
    let (first, load) = begin::begin(
        &cfg,
        &conn,
        source,
        repl,
        &mut writer,
        spill_report.durable_lsn,
        proof,
        &ingest_opts,
    )
    .await?;

    // Ingest on its own thread.
    let (shutdown_tx, shutdown_rx) = shutdown::channel();
    let (pause_source_tx, pause_source_rx) = watch::channel(false);
    let counters = Arc::new(IngestCounters::default());
    let quarantine = Quarantine::open(&cfg.spill.dir, spill_report.durable_lsn)?;
    let quarantine_stats = quarantine.stats();
    let (map, map_status) = match map {
        Some(m) => {
            let every = (cfg.routing.map_refresh_secs > 0)
                .then(|| Duration::from_secs(cfg.routing.map_refresh_secs));
            let (refresher, handle) = MapRefresher::new(m.source, m.map, every);
            let status = refresher.status();
            tokio::spawn(refresher.run(shutdown_rx.clone()));
            (Some(handle), Some(status))
        }
        None => (None, None),
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
    let ingest_done = ingest
        .spawn_thread(
            "reshard-ingest".into(),
            tracing::info_span!("ingest"),
            Some(first),
            shutdown_rx.clone(),
            pause_source_rx,
        )
        .map_err(|e| RuntimeError::Internal(format!("spawning the ingest thread: {e}")))?;

    // One apply task per shard.
    let source_catalog: SourceConnect = {
        let conn = conn.clone();
        Arc::new(move || {
            let conn = conn.clone();
            Box::pin(async move { conn.connect_sql().await.map_err(|e| e.to_string()) })
        })
    };
    let table_map = options::renamed_tables(&tables);
    let shards = cfg
        .shards
        .iter()
        .zip(&shard_conns)
        .enumerate()
        .map(|(i, (s, c))| {
            let apply_opts = ApplyOptions {
                shard: ShardId(i as u16),
                shard_name: s.name.clone(),
                source_system_id: system.system_id.clone(),
                slot: cfg.source.slot.clone(),
                migration_id: Some(migration_id.clone()),
                table_map: table_map.clone(),
                ..ApplyOptions::from_config(&cfg.apply)
            };
            ShardHandle::spawn(
                apply_opts,
                c.clone(),
                log.clone(),
                load.done.clone(),
                source_catalog.clone(),
                shutdown_rx.clone(),
            )
        })
        .collect();

    // Status, control, admin console, metrics.
    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let (control_tx, control_rx) = mpsc::channel::<ControlRequest>(16);
    let admin = AdminHandle {
        status: status_rx.clone(),
        control: control_tx,
    };
    if !cfg.admin.listen.is_empty() {
        let listener = bind(&cfg.admin.listen, "listen", "the admin console").await?;
        let (handle, shutdown) = (admin.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_on(listener, admin_auth, handle, shutdown).await {
                tracing::error!(error = %e, "admin console stopped");
            }
        });
    }
    if !cfg.admin.metrics.is_empty() {
        let listener = bind(&cfg.admin.metrics, "metrics", "the endpoint").await?;
        let (status, shutdown) = (status_rx.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_metrics_on(listener, status, shutdown).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    // After a fenced cutover, shards' writes stream back to the source.
    let reverse = reverse::spawn(cfg.clone(), tables.clone(), shutdown_rx.clone())?;
    let supervisor = Supervisor {
        reverse,
        cfg,
        system_id: system.system_id.clone(),
        started,
        sql: crate::source::SqlSession::new(conn.clone(), Some(sql)),
        counters,
        log,
        shards,
        tables,
        quarantine: quarantine_stats,
        map_status,
        load,
        status_tx,
        control_rx,
        pause_source: pause_source_tx,
        shutdown_tx: shutdown_tx.clone(),
        shutdown_rx,
        ingest_done,
    };
    let done = tokio::spawn(supervisor.run());
    Ok(Running {
        admin,
        shutdown: shutdown_tx,
        done,
    })
}

/// Binds `[admin] <key> = addr` (the admin console or the metrics endpoint).
#[allow(clippy::result_large_err)]
async fn bind(addr: &str, key: &str, what: &str) -> Result<tokio::net::TcpListener, RuntimeError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        RuntimeError::State(format!("[admin] {key} = {addr:?}: cannot listen there: {e}; pick a free address or set {key} = \"\" to turn {what} off"))
    })
}

/// The router `reshard run` would use now: the source's replicated tables and the account map
/// as read now (for `reshard quarantine replay`).
pub async fn current_router(cfg: &Config) -> Result<(Router, Vec<SourceTable>), RuntimeError> {
    let conn = ConnConfig::parse(&cfg.source.url)?;
    let sql = conn.connect_sql().await?;
    let tables = catalog::discover(&sql, cfg).await?;
    let map = options::load_map(cfg).await?.map(|m| m.map);
    let router = Router::new(route_spec(cfg, &tables, map)?)?;
    Ok((router, tables))
}

/// SIGTERM and SIGINT, listened to from the moment this is made until it is dropped.
///
/// Make it once, at a command's start, and keep it: a signal that arrives while the command
/// is busy elsewhere (between two `recv` calls) is kept for the next `recv`. A fresh listener
/// per wait would lose it: once tokio has installed its handler the default action (exit) no
/// longer applies, so a lost signal is an ignored Ctrl-C or an ignored `systemctl stop`.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening. A signal that cannot be listened to (no signal driver) keeps its
    /// default action.
    pub fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves on the next SIGTERM or SIGINT (at once if one came since the last call).
    /// Cancel-safe: a dropped call loses no signal.
    pub async fn recv(&mut self) -> &'static str {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => "SIGTERM",
            _ = next(&mut self.int) => "SIGINT",
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Signals::new()
    }
}
