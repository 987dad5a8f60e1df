//! The first minutes of a run, in their order: gather what the start-up proof needs, prove
//! the start, then create the slot (or take a temporary one's snapshot), start the full load
//! under its exported snapshot and only then start streaming from the slot.
//!
//! In: the source's replication connection (after `IDENTIFY_SYSTEM`), the opened spill log, the
//! shards' connections and the full load (not yet prepared). Out: a [`Proof`] (the migration id
//! and where the log starts, from [`startup::plan`]), then the first replication stream
//! ([`Started`]) and a [`LoadWatch`] that says when the full load is done or failed.
//!
//! Invariant (DESIGN.md "Things that bite"): the copy connections import the slot's exported
//! snapshot before `START_REPLICATION` runs on the connection that created the slot; a copy
//! that resumes under a new snapshot takes it from a temporary slot, so its LSN is known. A
//! start that fails after the load was spawned aborts the load (a retry starts its own).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::config::{Config, SourceConfig};
use crate::lsn::Lsn;
use crate::pg::catalog::SourceTable;
use crate::runtime::ingest::{start_streaming, IngestOptions, Started};
use crate::runtime::startup;
use crate::runtime::RuntimeError;
use crate::snapshot::handoff::Handoff;
use crate::snapshot::{
    self, FullLoad, FullLoadProgress, FullLoadReport, PreparedLoad, SnapshotError, TableState,
};
use crate::source::slot::{CreatedSlot, SlotError};
use crate::source::{list_slots, ConnConfig, ReplicationClient, SlotOptions, SnapshotAction};
use crate::spill::{OpenReport, SpillWriter};

/// The start-up proof's verdict, with what the rest of the start needs from it.
pub struct Proof {
    /// The migration this run belongs to.
    pub migration_id: String,
    /// Where the log starts (`0/0` until a new slot's consistent point is recorded).
    pub log_start: Lsn,
    /// Whether the slot exists already.
    pub slot_exists: bool,
    /// The full load's plan (`None` with `--skip-full-load`).
    pub prepared: Option<PreparedLoad>,
}

/// Gathers the slot, the spill log's and the shards' states, prepares the full load (read
/// only: which tables earlier runs copied, and under which snapshots) and proves that the
/// spill log covers every shard ([`startup::plan`]).
#[allow(clippy::result_large_err, clippy::too_many_arguments)]
pub async fn prove(
    cfg: &Config,
    sql: &tokio_postgres::Client,
    shard_conns: &[ConnConfig],
    system_id: &str,
    writer: &mut SpillWriter,
    spill: &OpenReport,
    full_load: Option<FullLoad>,
) -> Result<Proof, RuntimeError> {
    let slot_row = list_slots(sql)
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
    let prepared = match full_load {
        Some(load) => Some(load.prepare().await?),
        None => None,
    };
    let shard_states = shard_states(cfg, shard_conns, system_id, prepared.as_ref()).await?;
    let plan = startup::plan(
        &cfg.source.slot,
        slot_state,
        &startup::LogState {
            dir: cfg.spill.dir.clone(),
            migration_id: spill.migration_id.clone(),
            start_lsn: spill.start_lsn,
            durable_lsn: spill.durable_lsn,
        },
        &shard_states,
        || startup::new_migration_id(system_id),
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
    Ok(Proof {
        migration_id,
        log_start,
        slot_exists,
        prepared,
    })
}

/// Every shard's progress row (and what earlier full loads copied), for the start-up proof.
async fn shard_states(
    cfg: &Config,
    conns: &[ConnConfig],
    system_id: &str,
    prepared: Option<&PreparedLoad>,
) -> Result<Vec<startup::ShardState>, RuntimeError> {
    // Every shard at once: each is a connection and two round trips.
    futures_util::future::try_join_all(cfg.shards.iter().zip(conns).map(|(s, c)| async move {
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
        let other_slots = crate::pg::progress::other_slots(&client, &cfg.source.slot, &s.name)
            .await
            .map_err(|e| unreadable(&e))?;
        Ok(startup::ShardState {
            name: s.name.clone(),
            progress: row.as_ref().map(|r| r.commit_lsn),
            migration_id: row.and_then(|r| r.migration_id),
            has_load_records: prepared.is_some_and(|p| p.has_records()),
            other_slots,
            oldest_copy_lsn: prepared.and_then(|p| p.oldest_finished_as_of()),
        })
    }))
    .await
}

/// What the shards skip of the log because the full load copied it (`snapshot::handoff`);
/// `None` while the full load runs.
pub type LoadDone = Option<Arc<Handoff>>;

/// The source's SQL connection and its replicated tables (what the publication publishes).
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// An SQL connection to the source.
    pub sql: &'a tokio_postgres::Client,
    /// The replicated tables.
    pub tables: &'a [SourceTable],
}

/// Creates `[source] slot` (with `[source] publication`).
async fn create_slot(
    source: Source<'_>,
    repl: &mut ReplicationClient,
    cfg: &SourceConfig,
    snapshot: SnapshotAction,
) -> Result<CreatedSlot, SlotError> {
    crate::source::slot::create_slot(
        source.sql,
        repl,
        &cfg.publication,
        source.tables,
        &cfg.slot,
        snapshot,
    )
    .await
}

/// What the running full load tells the rest of the daemon.
pub struct LoadWatch {
    /// Set once the load finished (at once with no load to run).
    pub done: watch::Receiver<LoadDone>,
    /// Receives the load's error, if it fails.
    pub failed: oneshot::Receiver<SnapshotError>,
    /// The load's progress (`None` with `--skip-full-load`).
    pub progress: Option<watch::Receiver<FullLoadProgress>>,
}

/// Creates the slot if the proof said so (with an exported snapshot when there is a load to
/// run), starts the full load under that snapshot (or a temporary slot's, when an interrupted
/// load resumes), and starts streaming once every copy connection imported the snapshot.
#[allow(clippy::result_large_err)]
#[allow(clippy::too_many_arguments)]
pub async fn begin(
    cfg: &Config,
    conn: &ConnConfig,
    source: Source<'_>,
    mut repl: ReplicationClient,
    writer: &mut SpillWriter,
    durable_lsn: Lsn,
    proof: Proof,
    ingest_opts: &IngestOptions,
) -> Result<(Started, LoadWatch), RuntimeError> {
    let Proof {
        migration_id,
        log_start,
        slot_exists,
        prepared,
    } = proof;
    let (load_tx, load_rx) = watch::channel::<LoadDone>(None);
    let (load_err_tx, load_err_rx) = oneshot::channel::<SnapshotError>();
    let Some(prepared) = prepared else {
        // No full load (`--skip-full-load`): stream from the slot's creation (or where the log
        // ends). Say what the operator takes on: nothing from before the slot is copied.
        let rows: i64 = source.tables.iter().map(|t| t.estimated_rows).sum();
        let tables = source.tables.len();
        let start_at = if slot_exists {
            tracing::warn!(slot = %cfg.source.slot, resume_at = %durable_lsn, tables,
                "--skip-full-load: no table is copied, streaming resumes at {durable_lsn}; a full \
                 load that did not finish stays unfinished (rows from before the slot's creation \
                 are on the shards only if they were loaded another way; `reshard verify` \
                 compares them with the source)");
            durable_lsn
        } else {
            let info = create_slot(source, &mut repl, &cfg.source, SnapshotAction::NoExport)
                .await?
                .info;
            writer.record_lineage(&migration_id, info.consistent_point)?;
            let lsn = info.consistent_point;
            let held = if rows > 0 {
                format!("about {rows} rows (pg_class estimate) in the {tables} replicated tables")
            } else {
                format!("the rows of the {tables} replicated tables")
            };
            tracing::warn!(slot = %cfg.source.slot, consistent_point = %lsn, tables,
                estimated_rows = rows,
                "--skip-full-load: slot created at {lsn} and NOT ONE ROW COPIED: the shards get \
                 only changes committed after {lsn}; {held} from before it must already be on \
                 the shards, each on the shard its key routes to, loaded another way (`reshard \
                 verify` compares them with the source). If they are not: stop, drop the slot \
                 (reshard slot drop) and run without --skip-full-load");
            lsn
        };
        let first = start_streaming(repl, ingest_opts, start_at).await?;
        let _ = load_tx.send(Some(Arc::new(Handoff::default())));
        let watch = LoadWatch {
            done: load_rx,
            failed: load_err_rx,
            progress: None,
        };
        return Ok((first, watch));
    };
    let progress = Some(prepared.progress());
    log_load_progress(
        prepared.progress(),
        Duration::from_secs(cfg.snapshot.progress_interval_secs),
    );
    let (imported_tx, imported_rx) = oneshot::channel();
    let (snapshot, start_at, consistent_point, exporter) = if !slot_exists {
        let info = create_slot(source, &mut repl, &cfg.source, SnapshotAction::Export)
            .await?
            .info;
        writer.record_lineage(&migration_id, info.consistent_point)?;
        let snap = info.snapshot_name.map(|name| snapshot::ExportedSnapshot {
            name,
            lsn: info.consistent_point,
        });
        (snap, info.consistent_point, info.consistent_point, None)
    } else if prepared.needs_snapshot() {
        // Resuming an interrupted load: a temporary slot's snapshot has a known LSN.
        let mut tmp = ReplicationClient::connect(conn).await?;
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
        (snap, durable_lsn, log_start, Some(tmp))
    } else {
        (None, durable_lsn, log_start, None)
    };
    let needs = prepared.needs_snapshot();
    let mut load = Some(tokio::spawn(prepared.run(snapshot, Some(imported_tx))));
    if needs {
        // Keep the exporting connection idle until every copy connection imported the
        // snapshot; an error of the load before that is an error of the start.
        if imported_rx.await.is_err() {
            if let Some(l) = load.take() {
                match l.await {
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(_)) => {}
                    Err(e) => return Err(RuntimeError::Internal(format!("full load task: {e}"))),
                }
            }
        }
    }
    if let Some(tmp) = exporter {
        tmp.close().await;
    }
    let first = match start_streaming(repl, ingest_opts, start_at).await {
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
    let watch = LoadWatch {
        done: load_rx,
        failed: load_err_rx,
        progress,
    };
    Ok((first, watch))
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
            // The rate each shard is held to, when a throttle is set (fixed or adaptive).
            for t in p
                .throttle
                .iter()
                .filter(|t| t.adaptive || t.rows_per_sec.is_some())
            {
                tracing::info!(shard = %t.shard, "full load throttle: {}", snapshot::render_throttle_line(t));
            }
        }
    });
}

fn log_load_report(report: &FullLoadReport) {
    for t in &report.tables {
        tracing::info!(table = %t.table, rows = t.rows, bytes = t.bytes, chunks = t.chunks_copied, as_of = %t.as_of, recopied = t.recopied, format = t.format.name(), "table loaded");
    }
    tracing::info!(
        indexes_rebuilt = report.indexes_rebuilt,
        "full load done; shards start applying changes"
    );
}
