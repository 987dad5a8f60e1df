//! A side stream: one logical slot on a shard, streamed into ONE other database through the
//! forward direction's stages. Reverse replication (a cut-over shard back to the source,
//! [`super::reverse`]) and account moves (the moved accounts from one shard to another,
//! `ops::moves`) are both this, pointed at different ends.
//!
//! In: a [`SideSpec`] (the slot and publication on the shard that is read, its system id, a
//! local spill directory, the database written, the progress row's name, the router, the
//! replication origin). Out: a running [`SideStream`]: [`Ingest`] (decode, transaction
//! assembly, the router, a spill log of its own, confirmed to the slot once durable) → one
//! [`ShardApplier`] writing the target, batched, with its progress row (keyed by the read
//! shard's system id and the slot) in the same target transaction: exactly once across
//! restarts. The start-up proof ([`startup::plan`]) guards the side log like the forward one.
//!
//! The target applies with `session_replication_role = replica` (through any fence, without
//! firing its triggers a second time) and under a replication origin named
//! [`ORIGIN_PREFIX`](crate::pg::reverse::ORIGIN_PREFIX)`…`, which every ingest drops: what a
//! side stream wrote never streams on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::apply::{ApplyError, ApplyOptions, ApplyState, RowOwner, ShardApplier, ShardStatus};
use crate::config::Config;
use crate::error::{Classify, ErrorClass};
use crate::event::{pg_now, ShardId};
use crate::lsn::Lsn;
use crate::pg::progress::{read_progress, ProgressError};
use crate::pg::reverse::ReverseTableError;
use crate::quarantine::{Quarantine, QuarantineError};
use crate::route::{RouteError, RouteSpec, Router};
use crate::runtime::ingest::{
    start_streaming, Ingest, IngestCounters, IngestError, IngestOptions, UnroutableHandling,
};
use crate::runtime::startup::{self, StartupError};
use crate::shutdown::{self, ShutdownRx, ShutdownTx};
use crate::source::{list_slots, ConnConfig, ReplicationClient, SourceError};
use crate::spill::{SpillError, SpillIdentity, SpillLog, SpillOptions, SpillWriter};
use crate::status::ReverseView;

/// Why a side stream could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SideError {
    /// A record names a shard the config does not have.
    #[error("reshard.reverse on the source names shard {shard}, which the config does not list; add it back to [[shards]], or roll it back with the config that cut it over")]
    UnknownShard {
        /// The shard.
        shard: String,
    },
    /// The shard's connection or a replication command.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// The slot is gone.
    #[error("the slot {slot} on shard {shard} does not exist: {advice}")]
    SlotMissing {
        /// The shard.
        shard: String,
        /// The slot.
        slot: String,
        /// What it means and the way out.
        advice: String,
    },
    /// The shard's URL now leads to another server than the one the slot was created on.
    #[error("shard {shard} is now system {found}, but the slot {slot} was created on system {expected}: the config's url for it changed; point it back at the server the slot is on")]
    OtherSystem {
        /// The shard.
        shard: String,
        /// The slot.
        slot: String,
        /// Recorded when the slot was created.
        expected: String,
        /// Found now.
        found: String,
    },
    /// The side spill log.
    #[error("{0}")]
    Spill(#[from] SpillError),
    /// The side spill log, the slot and the target's progress row do not prove a lossless start.
    #[error("{0}")]
    Startup(StartupError),
    /// The target's progress row.
    #[error("{0}")]
    Progress(#[from] ProgressError),
    /// `reshard.reverse`.
    #[error("{0}")]
    Table(#[from] ReverseTableError),
    /// The quarantine (never written: every table of a side stream is routed to the target).
    #[error("{0}")]
    Quarantine(#[from] QuarantineError),
    /// Routing set-up.
    #[error("{0}")]
    Route(#[from] RouteError),
    /// Reading from the shard stopped.
    #[error("reading from the shard: {0}")]
    Ingest(Box<IngestError>),
    /// Applying to the target stopped.
    #[error("applying to the target: {0}")]
    Apply(Box<ApplyError>),
    /// A task could not be started or joined.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StartupError> for SideError {
    fn from(e: StartupError) -> SideError {
        SideError::Startup(e)
    }
}

impl From<IngestError> for SideError {
    fn from(e: IngestError) -> SideError {
        SideError::Ingest(Box::new(e))
    }
}

impl From<ApplyError> for SideError {
    fn from(e: ApplyError) -> SideError {
        SideError::Apply(Box::new(e))
    }
}

impl Classify for SideError {
    fn class(&self) -> ErrorClass {
        match self {
            SideError::Source(e) => e.class(),
            SideError::Spill(e) => e.class(),
            SideError::Progress(e) => e.class(),
            SideError::Table(e) => e.class(),
            SideError::Ingest(e) => e.class(),
            SideError::Apply(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// What a side stream reads and where it writes.
#[derive(Clone, Debug)]
pub struct SideSpec {
    /// The shard read (its name in the config, for messages and spans).
    pub shard: String,
    /// Its connection.
    pub shard_conn: ConnConfig,
    /// Its `system_identifier`, recorded when the slot was created.
    pub shard_system_id: String,
    /// The slot on it.
    pub slot: String,
    /// The publication on it.
    pub publication: String,
    /// What a missing slot means (named in [`SideError::SlotMissing`]).
    pub slot_missing_advice: String,
    /// The local spill directory of this stream.
    pub dir: PathBuf,
    /// The database written.
    pub target_conn: ConnConfig,
    /// The progress row's shard name on the target.
    pub progress_shard: String,
    /// The router: one shard (the target), every published table routed to it whole.
    pub route: RouteSpec,
    /// Table names on the read shard → names on the target, where they differ.
    pub table_map: HashMap<crate::pg::sql::TableName, crate::pg::sql::TableName>,
    /// The replication origin the target applies under.
    pub origin: String,
    /// The span's name (`reverse`, `move`).
    pub kind: &'static str,
    /// The target rows the stream may change (reverse replication: the shard's own; see
    /// [`RowOwner`]). `None`: every row.
    pub row_owner: Option<RowOwner>,
}

/// One running side stream.
pub struct SideStream {
    stop: ShutdownTx,
    status: watch::Receiver<ShardStatus>,
    counters: Arc<IngestCounters>,
    task: JoinHandle<Result<(), SideError>>,
}

impl SideStream {
    /// Proves the local log covers what the target still needs, starts streaming from the
    /// shard's slot, and spawns the ingest thread and the apply task.
    pub async fn start(cfg: &Config, spec: SideSpec) -> Result<SideStream, SideError> {
        let mut repl = ReplicationClient::connect(&spec.shard_conn).await?;
        let system = repl.identify_system().await?;
        if system.system_id != spec.shard_system_id {
            return Err(SideError::OtherSystem {
                shard: spec.shard.clone(),
                slot: spec.slot.clone(),
                expected: spec.shard_system_id.clone(),
                found: system.system_id,
            });
        }
        let shard_sql = spec.shard_conn.connect_sql().await?;
        let slot = list_slots(&shard_sql)
            .await?
            .into_iter()
            .find(|s| s.slot_name == spec.slot)
            .ok_or_else(|| SideError::SlotMissing {
                shard: spec.shard.clone(),
                slot: spec.slot.clone(),
                advice: spec.slot_missing_advice.clone(),
            })?;
        drop(shard_sql);

        let dir = spec.dir.clone();
        let spill_opts = SpillOptions {
            dir: dir.clone(),
            ..SpillOptions::from(&cfg.spill)
        };
        let identity = SpillIdentity {
            system_id: spec.shard_system_id.clone(),
            slot: spec.slot.clone(),
            shards: spec.route.shards.clone(),
        };
        let (mut writer, report) =
            tokio::task::spawn_blocking(move || SpillWriter::open(spill_opts, identity))
                .await
                .map_err(|e| SideError::Internal(format!("opening the side spill log: {e}")))??;
        let log: Arc<SpillLog> = Arc::new(writer.log());

        let target_sql = spec.target_conn.connect_sql().await?;
        let progress = read_progress(
            &target_sql,
            &spec.slot,
            &spec.progress_shard,
            Some(&spec.shard_system_id),
        )
        .await?;
        drop(target_sql);
        let plan = startup::plan(
            &spec.slot,
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
                name: spec.progress_shard.clone(),
                progress: progress.as_ref().map(|p| p.commit_lsn),
                migration_id: progress.and_then(|p| p.migration_id),
                has_load_records: false,
                other_slots: Vec::new(),
                oldest_copy_lsn: None,
            }],
            || startup::new_migration_id(&spec.shard_system_id),
        )?;
        let migration_id = plan.migration_id().to_owned();
        if let startup::Plan::Resume { log_start, .. } = &plan {
            writer.record_lineage(&migration_id, *log_start)?;
        }

        let ingest_opts = IngestOptions {
            conn: spec.shard_conn.clone(),
            slot: spec.slot.clone(),
            publication: spec.publication.clone(),
            streaming: cfg.source.streaming,
            status_interval: Duration::from_millis(cfg.source.status_interval_ms),
            coalesce: Duration::from_millis(cfg.source.coalesce_ms),
            flush_interval: Duration::from_millis(cfg.spill.flush_interval_ms),
            stream_dir: dir.join("streams"),
            retry_initial: Duration::from_millis(cfg.apply.retry_initial_ms),
            retry_max: Duration::from_millis(cfg.apply.retry_max_ms),
        };
        let first = start_streaming(repl, &ingest_opts, report.durable_lsn).await?;
        let router = Router::new(spec.route.clone())?;
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
            shard_name: spec.progress_shard.clone(),
            source_system_id: spec.shard_system_id.clone(),
            slot: spec.slot.clone(),
            migration_id: Some(migration_id),
            table_map: spec.table_map.clone(),
            // Through any fence on the target, without firing its triggers a second time.
            session_replication_role_replica: true,
            replication_origin: Some(spec.origin.clone()),
            row_owner: spec.row_owner.clone(),
            ..ApplyOptions::from_config(&cfg.apply)
        };
        let target_conn = spec.target_conn.clone();
        let connect = move || {
            let conn = target_conn.clone();
            async move { conn.connect_sql().await }
        };
        let applier = ShardApplier::new(apply_opts, connect, log);
        let (stop, stop_rx) = shutdown::channel();
        let (status_tx, status) = watch::channel(ShardStatus {
            shard: spec.progress_shard.clone(),
            ..Default::default()
        });
        let (inner_tx, inner_rx) = shutdown::channel();
        let (pause_tx, pause_rx) = watch::channel(false);
        let span =
            tracing::info_span!("side", kind = spec.kind, shard = %spec.shard, slot = %spec.slot);
        let ingest_done = ingest
            .spawn_thread(
                format!("reshard-{}", spec.kind),
                span.clone(),
                Some(first),
                inner_rx.clone(),
                pause_rx,
            )
            .map_err(|e| SideError::Internal(format!("spawning the side ingest thread: {e}")))?;
        let apply = tokio::spawn(tracing::Instrument::instrument(
            applier.run(inner_rx, status_tx),
            span,
        ));
        let task = tokio::spawn(supervise(stop_rx, inner_tx, pause_tx, ingest_done, apply));
        Ok(SideStream {
            stop,
            status,
            counters,
            task,
        })
    }

    /// Stops the stream and waits for it (an open batch is finished or rolled back).
    pub async fn stop(self) -> Result<(), SideError> {
        self.stop.shutdown();
        self.task
            .await
            .map_err(|e| SideError::Internal(format!("side stream task: {e}")))?
    }

    /// Whether the stream ended by itself (an error: see [`SideStream::stop`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The applier's state (applied LSN, counters, last error).
    pub fn status(&self) -> ShardStatus {
        self.status.borrow().clone()
    }

    /// Fills the stream's part of a status view.
    pub fn fill(&self, v: &mut ReverseView) {
        let st = self.status();
        let received = self.counters.received().max(self.counters.confirmed());
        v.stream = match st.state {
            ApplyState::Starting => "starting",
            ApplyState::Running => "running",
            ApplyState::Retrying => "retrying",
            ApplyState::WaitingForDdl => "waiting_for_ddl",
            ApplyState::Halted => "halted",
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
        let caught_up = st
            .applied_commit_lsn
            .max(st.quiet_through)
            .covers(self.counters.confirmed());
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
) -> Result<(), SideError> {
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
            "side ingest thread ended",
        )))
    });
    let apply = match apply_result {
        Some(r) => r,
        None => apply.await,
    }
    .map_err(|e| SideError::Internal(format!("side apply task: {e}")))?;
    ingest?;
    apply?;
    Ok(())
}
