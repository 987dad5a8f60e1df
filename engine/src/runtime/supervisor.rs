//! The supervisor: watches the stages of a running daemon, publishes its status, serves the
//! admin console's control commands, and stops everything on shutdown or when nothing can go
//! on.
//!
//! In: the stages' handles (the ingest thread's result, each shard's apply task and status,
//! the full load's [`LoadWatch`]), the control channel and the shutdown signal. Out: a
//! [`StatusSnapshot`] every 250 ms (built in [`super::status`]) and the [`RunSummary`] once
//! every stage stopped. Once a second it also polls the source (its WAL position and the
//! slot) and, when the stream is idle, emits a heartbeat message so idle shards' progress
//! reaches the source's present.
//!
//! A shard whose apply stopped with a definite error stays stopped (its error says how to bring
//! it back) until SIGHUP or `RESUME <shard>` starts its apply again from its durable progress.
//!
//! Invariant: on the way out every stage is asked to stop and joined (ingest flushes and
//! confirms, each apply finishes or rolls back its batch) before the summary is returned.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::apply::{
    ApplyOptions, ApplyState, LatencyHistogram, ShardApplier, ShardStatus, SourceConnect,
};
use crate::config::Config;
use crate::lsn::Lsn;
use crate::pg::catalog::SourceTable;
use crate::pg::conn::SOURCE_PRESENT_LSN;
use crate::quarantine::QuarantineStats;
use crate::route::refresh::MapStatus;
use crate::runtime::begin::{LoadDone, LoadWatch};
use crate::runtime::ingest::{IngestCounters, IngestError};
use crate::runtime::status::Rates;
use crate::runtime::{RunSummary, RuntimeError};
use crate::shutdown::{ShutdownRx, ShutdownTx};
use crate::snapshot::handoff::SkipLog;
use crate::source::{ConnConfig, SourceError};
use crate::spill::SpillLog;
use crate::status::{ControlCommand, ControlRequest, SourceStatus, StatusSnapshot};

/// The latency histogram of the shard's current applier: empty until it exists (after the full
/// load), replaced when a stopped shard starts again (SIGHUP, `RESUME`), so that what `lag`,
/// `SHOW LAG` and the metrics show is the running applier's, never a dead one's.
pub type LatencySlot = Arc<Mutex<Option<LatencyHistogram>>>;

/// The histogram in `slot`, if an applier set one.
pub fn current_latency(slot: &LatencySlot) -> Option<LatencyHistogram> {
    slot.lock().ok().and_then(|g| g.clone())
}

/// Puts `h` (or nothing) in `slot`.
fn set_latency(slot: &LatencySlot, h: Option<LatencyHistogram>) {
    if let Ok(mut g) = slot.lock() {
        *g = h;
    }
}

/// How long `PAUSE` waits for its effect before it answers that it is still waiting: within
/// the admin console's wait for an answer ([`crate::admin::CONTROL_TIMEOUT`]).
const PAUSE_ANSWER_WITHIN: Duration =
    Duration::from_secs(crate::admin::CONTROL_TIMEOUT.as_secs() - 2);

/// A control command's answer: at once, or once its effect is visible (`PAUSE`: the shard's
/// applier, or the ingest, says it is paused), waited for outside the supervisor's loop.
enum Answer {
    Now(Result<String, String>),
    Once(std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>),
}

/// One shard's apply task, as the supervisor sees it.
pub struct ShardHandle {
    /// Shard name.
    pub name: String,
    /// What the applier reports.
    pub status: watch::Receiver<ShardStatus>,
    /// `true` pauses the shard (`PAUSE <shard>`).
    pub pause: watch::Sender<bool>,
    /// The apply's latency histogram.
    pub latency: LatencySlot,
    /// The task (`None` once joined).
    pub task: Option<JoinHandle<Result<(), crate::apply::ApplyError>>>,
    /// Why it stopped, once it did with an error.
    pub error: Option<String>,
    /// Starts the apply task again (a new task and its status), for a shard stopped by an
    /// error: `RESUME <shard>` on the admin console, or SIGHUP for every stopped shard.
    start: Box<dyn Fn() -> ApplyTask + Send + Sync>,
}

/// A shard's apply task and the status it publishes.
type ApplyTask = (
    JoinHandle<Result<(), crate::apply::ApplyError>>,
    watch::Receiver<ShardStatus>,
);

impl ShardHandle {
    /// Spawns one shard's apply task. It waits for the full load (or shutdown), then applies
    /// the spill log from the shard's progress, skipping each table's changes that its copy
    /// already holds (`snapshot::handoff`). The source catalog is read (when a source table's
    /// columns change mid-stream) on a connection of its own, opened only then.
    pub fn spawn(
        opts: ApplyOptions,
        conn: ConnConfig,
        log: Arc<SpillLog>,
        load_done: watch::Receiver<LoadDone>,
        source_catalog: SourceConnect,
        shutdown: ShutdownRx,
    ) -> ShardHandle {
        let name = opts.shard_name.clone();
        let (pause_tx, pause_rx) = watch::channel(false);
        let latency: LatencySlot = Arc::new(Mutex::new(None));
        let latency_slot = latency.clone();
        let start = move || -> ApplyTask {
            // A stopped applier's latencies are not the shard's any more.
            set_latency(&latency_slot, None);
            let shard = opts.shard_name.clone();
            let (status_tx, status_rx) = watch::channel(ShardStatus {
                shard: shard.clone(),
                ..Default::default()
            });
            let conn = conn.clone();
            let connect = move || {
                let conn = conn.clone();
                async move { conn.connect_sql().await }
            };
            let (opts, log, mut load_done, source_catalog, mut shutdown, pause_rx, latency_slot) = (
                opts.clone(),
                log.clone(),
                load_done.clone(),
                source_catalog.clone(),
                shutdown.clone(),
                pause_rx.clone(),
                latency_slot.clone(),
            );
            let task = tokio::spawn(async move {
                // Wait for the full load (or shutdown).
                let skip = loop {
                    if let Some(skip) = load_done.borrow().clone() {
                        break skip;
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.requested() => return Ok(()),
                        r = load_done.changed() => if r.is_err() { return Ok(()) },
                    }
                };
                let skip_log = Arc::new(SkipLog::new(log, skip));
                let applier = ShardApplier::new(opts, connect, skip_log)
                    .with_pause(pause_rx)
                    .with_source_catalog(source_catalog);
                set_latency(&latency_slot, Some(applier.latency_histogram()));
                tracing::info!(shard = %shard, "apply starting");
                applier.run(shutdown, status_tx).await
            });
            (task, status_rx)
        };
        let (task, status) = start();
        ShardHandle {
            name,
            status,
            pause: pause_tx,
            latency,
            task: Some(task),
            error: None,
            start: Box::new(start),
        }
    }

    /// Starts a shard that stopped with an error again (from its durable progress); `false`
    /// when it is not stopped by one.
    fn restart(&mut self, why: &str) -> bool {
        if self.task.is_some() || self.error.is_none() {
            return false;
        }
        let (task, status) = (self.start)();
        tracing::info!(shard = %self.name, previous_error = ?self.error, "restarting the shard's apply ({why})");
        self.task = Some(task);
        self.status = status;
        self.error = None;
        true
    }
}

/// Watches the stages, publishes the status, serves control commands, and stops everything
/// on shutdown or when nothing can go on.
pub struct Supervisor {
    /// The reverse streams' watcher (after fenced cutovers).
    pub(super) reverse: super::reverse::ReverseHandle,
    pub(super) cfg: Config,
    /// The source's `IDENTIFY_SYSTEM` id, shown in the status.
    pub(super) system_id: String,
    pub(super) started: Instant,
    /// The status poll's and idle heartbeat's connection (reconnects after a source restart).
    pub(super) sql: crate::source::SqlSession,
    pub(super) counters: Arc<IngestCounters>,
    pub(super) log: Arc<SpillLog>,
    pub(super) shards: Vec<ShardHandle>,
    pub(super) tables: Vec<SourceTable>,
    pub(super) quarantine: Arc<QuarantineStats>,
    pub(super) map_status: Option<Arc<Mutex<MapStatus>>>,
    pub(super) load: LoadWatch,
    pub(super) status_tx: watch::Sender<StatusSnapshot>,
    pub(super) control_rx: mpsc::Receiver<ControlRequest>,
    pub(super) pause_source: watch::Sender<bool>,
    pub(super) shutdown_tx: ShutdownTx,
    pub(super) shutdown_rx: ShutdownRx,
    pub(super) ingest_done: oneshot::Receiver<Result<Lsn, IngestError>>,
}

impl Supervisor {
    /// Runs until shutdown, or until the ingest, the full load or every shard stopped; then
    /// stops and joins every stage.
    pub(super) async fn run(mut self) -> Result<RunSummary, RuntimeError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut source_poll = Instant::now() - Duration::from_secs(60);
        let mut source_info = SourceStatus::default();
        let mut heartbeat = Heartbeat::default();
        let mut rates = Rates::default();
        let mut failure: Option<RuntimeError> = None;
        let mut ingest_result: Option<Result<Lsn, IngestError>> = None;
        let mut load_watch_done = false;
        // Answers of commands that wait for their effect (`PAUSE`), from their tasks.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(
            oneshot::Sender<Result<String, String>>,
            Result<String, String>,
        )>();
        // SIGHUP starts the shards stopped by an error again (see `ShardHandle::restart`).
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // Every shard starts applying: no earlier run's stop holds any more.
        super::stopnote::clear(&self.cfg.spill.dir, None);
        loop {
            tokio::select! {
                biased;
                // This is cancellation-safe.
                _ = self.shutdown_rx.requested() => break,
                // This is cancellation-safe (a signal stream).
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    let n = self.restart_stopped("SIGHUP");
                    tracing::info!(restarted = n, "SIGHUP: shards stopped by an error started again");
                }
                // This is cancellation-safe (a oneshot receiver).
                r = &mut self.ingest_done, if ingest_result.is_none() => {
                    let r = r.unwrap_or_else(|_| Err(IngestError::Source(SourceError::protocol("ingest thread ended"))));
                    // An error is returned from `ingest_result` once every stage stopped.
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "reading from the source stopped");
                    }
                    ingest_result = Some(r);
                    break;
                }
                // This is cancellation-safe (a oneshot receiver).
                r = &mut self.load.failed, if !load_watch_done => {
                    load_watch_done = true;
                    if let Ok(e) = r {
                        tracing::error!(error = %e, "the full load failed; restart to resume it (finished tables are not copied again)");
                        failure = Some(e.into());
                        break;
                    }
                }
                // This is cancellation-safe.
                Some((cmd, reply)) = self.control_rx.recv() => {
                    match self.control(cmd) {
                        Answer::Now(answer) => {
                            let _ = reply.send(answer);
                        }
                        // Waited for in a task of its own: the loop goes on serving status,
                        // signals and other commands meanwhile.
                        Answer::Once(wait) => {
                            let done = done_tx.clone();
                            tokio::spawn(async move {
                                let _ = done.send((reply, wait.await));
                            });
                        }
                    }
                }
                // This is cancellation-safe. A command answered once its effect is visible:
                // the status is published first, so `SHOW` right after the answer shows it.
                Some((reply, answer)) = done_rx.recv() => {
                    let snap = self.snapshot(&source_info, &mut rates.clone());
                    self.status_tx.send_replace(snap);
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
                    if !self.shutdown_rx.is_requested() && self.all_shards_stopped() {
                        // The daemon ends here: no SIGHUP or RESUME can reach it.
                        let errors: Vec<String> = self
                            .shards
                            .iter()
                            .map(|s| {
                                let e = s.error.clone().unwrap_or_default();
                                let hint = format!("; {}", restart_hint(&s.name));
                                let e = e.strip_suffix(&hint).unwrap_or(&e);
                                format!("  {}: {e}; fix what this names and start `reshard run` again (the backlog waits in the spill log)", s.name)
                            })
                            .collect();
                        failure = Some(RuntimeError::AllShardsStopped(errors.join("\n")));
                        break;
                    }
                }
            }
        }
        // Shut everything down: ingest flushes and confirms, applies finish or roll back.
        self.shutdown_tx.shutdown();
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
                    Ok(Ok(Err(e))) => {
                        let e = e.to_string();
                        super::stopnote::record(&self.cfg.spill.dir, &s.name, &e);
                        s.error = Some(e);
                    }
                    Ok(Err(e)) => s.error = Some(format!("apply task failed: {e}")),
                    Err(_) => s.error = Some("apply did not stop within 60 s".into()),
                }
            }
        }
        if tokio::time::timeout(Duration::from_secs(60), &mut self.reverse.task)
            .await
            .is_err()
        {
            tracing::warn!("the reverse streams did not stop within 60 s");
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
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    /// Whether every shard's apply task ended with an error. A shard waiting for DDL (a schema
    /// change on the source) is not among them: its applier retries on the backoff and resumes
    /// by itself, so the daemon keeps running.
    fn all_shards_stopped(&mut self) -> bool {
        self.collect_stopped();
        !self.shards.is_empty()
            && self
                .shards
                .iter()
                .all(|s| s.task.is_none() && s.error.is_some())
    }

    /// Joins the apply tasks that ended, keeping the error of each that ended with one.
    fn collect_stopped(&mut self) {
        for s in &mut self.shards {
            if let Some(t) = &s.task {
                if t.is_finished() {
                    if let Some(t) = s.task.take() {
                        // Finished: collect the error without waiting.
                        let name = s.name.clone();
                        match futures_util::FutureExt::now_or_never(t) {
                            Some(Ok(Err(e))) => {
                                // Nothing restarts a shard's apply by itself: say so, and
                                // what to do.
                                // The note outlives the daemon: its hint is given by
                                // `reshard status`, not SIGHUP's.
                                super::stopnote::record(&self.cfg.spill.dir, &name, &e.to_string());
                                let e = format!("{e}; {}", restart_hint(&name));
                                tracing::error!(shard = %name, error = %e, "shard stopped");
                                s.error = Some(e);
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
    }

    /// Starts again every shard stopped by an error (SIGHUP). Returns how many.
    fn restart_stopped(&mut self, why: &str) -> usize {
        self.collect_stopped();
        let mut n = 0;
        for s in &mut self.shards {
            if s.restart(why) {
                super::stopnote::clear(&self.cfg.spill.dir, Some(&s.name));
                n += 1;
            }
        }
        n
    }

    fn control(&mut self, cmd: ControlCommand) -> Answer {
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
                let i = match find(&self.shards, &name) {
                    Ok(i) => i,
                    Err(e) => return Answer::Now(Err(e)),
                };
                let s = &self.shards[i];
                s.pause.send_replace(true);
                tracing::info!(shard = %name, "shard paused by operator");
                if s.task.is_none() || s.task.as_ref().is_some_and(|t| t.is_finished()) {
                    return Answer::Now(Ok(format!(
                        "shard {name} paused: its apply is stopped (SHOW SHARDS says why); it starts paused when resumed by SIGHUP (RESUME {name} also lifts the pause)"
                    )));
                }
                let mut status = s.status.clone();
                Answer::Once(Box::pin(async move {
                    // Outside a session (waiting for the full load, between retries) the
                    // applier commits nothing, and reads the switch before its next commit.
                    // In one it commits its open group, then says `Paused`.
                    let waited = tokio::time::timeout(
                        PAUSE_ANSWER_WITHIN,
                        status.wait_for(|s| s.state != ApplyState::Running),
                    )
                    .await;
                    match waited {
                        Ok(Ok(st)) if st.state == ApplyState::Paused => Ok(format!(
                            "shard {name} paused: its current target transaction is committed and nothing more is until RESUME {name}"
                        )),
                        Ok(Ok(st)) => Ok(format!(
                            "shard {name} paused: its applier is not applying ({:?}), and starts paused",
                            st.state
                        )),
                        Ok(Err(_)) => Ok(format!(
                            "shard {name} paused: its apply task ended (SHOW SHARDS says why)"
                        )),
                        Err(_) => Err(format!(
                            "shard {name}: pause requested, but it is still committing its current target transaction after {}s; SHOW SHARDS shows state paused once it is (RESUME {name} cancels the pause)",
                            PAUSE_ANSWER_WITHIN.as_secs()
                        )),
                    }
                }))
            }
            ControlCommand::Resume(Some(name)) => {
                let i = match find(&self.shards, &name) {
                    Ok(i) => i,
                    Err(e) => return Answer::Now(Err(e)),
                };
                self.shards[i].pause.send_replace(false);
                // A shard stopped by an error starts again.
                self.collect_stopped();
                if self.shards[i].restart("RESUME on the admin console") {
                    super::stopnote::clear(&self.cfg.spill.dir, Some(&name));
                    return Answer::Now(Ok(format!("RESUME {name}")));
                }
                tracing::info!(shard = %name, "shard resumed by operator");
                Answer::Now(Ok(format!("RESUME {name}")))
            }
            ControlCommand::Pause(None) => {
                self.pause_source.send_replace(true);
                tracing::info!("reading from the source paused by operator");
                let counters = self.counters.clone();
                Answer::Once(Box::pin(async move {
                    // The ingest says so between two reads (`IngestCounters::paused`).
                    let paused = async {
                        while !counters.paused.load(std::sync::atomic::Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    match tokio::time::timeout(PAUSE_ANSWER_WITHIN, paused).await {
                        Ok(()) => Ok("reading from the source paused: nothing more is read until RESUME".into()),
                        Err(_) => Err(format!(
                            "reading from the source: pause requested, but the ingest has not stopped reading after {}s (it may be reconnecting to the source); SHOW STATUS shows phase paused once it has (RESUME cancels the pause)",
                            PAUSE_ANSWER_WITHIN.as_secs()
                        )),
                    }
                }))
            }
            ControlCommand::Resume(None) => {
                self.pause_source.send_replace(false);
                tracing::info!("reading from the source resumed by operator");
                Answer::Now(Ok("RESUME".into()))
            }
            ControlCommand::Shutdown => {
                tracing::info!("shutdown requested on the admin console");
                self.shutdown_tx.shutdown();
                Answer::Now(Ok("SHUTDOWN".into()))
            }
        }
    }

    async fn poll_source(&mut self, out: &mut SourceStatus) {
        let q = format!(
            "SELECT {SOURCE_PRESENT_LSN}::text, \
             (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
             (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1)"
        );
        let sql = match self.sql.client().await {
            Ok(c) => c,
            Err(e) => {
                out.last_error = Some(format!("polling the source: {e}"));
                return;
            }
        };
        match sql.query_one(&q, &[&self.cfg.source.slot]).await {
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
            Err(e) => {
                out.last_error = Some(format!("polling the source: {e}"));
                return;
            }
        }
        // The write fences (`reshard fence`, `cutover --fence`): shown in status, the console
        // and the metrics. Reading them is best effort; the last known list stays on an error.
        match crate::pg::fence::read_fences(sql).await {
            Ok(f) => out.fences = f,
            Err(e) => tracing::debug!(error = %e, "cannot read reshard.fence on the source"),
        }
    }

    /// When the source wrote WAL that reshard was not sent (writes to unpublished tables, or
    /// nothing at all since the last transaction) and the stream is idle, a non-transactional
    /// logical message makes the walsender send a position; the ingest records it as durable,
    /// so idle shards' progress (and lag, `verify`, `cutover`) reach the source's present.
    async fn heartbeat(&mut self, src: &SourceStatus, hb: &mut Heartbeat) {
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
        let Ok(sql) = self.sql.client().await else {
            return; // poll_source reports the source unreachable
        };
        match sql
            .query_one(
                &format!("SELECT pg_logical_emit_message(false, 'reshard.heartbeat', '')::text, {SOURCE_PRESENT_LSN}::text"),
                &[],
            )
            .await
        {
            Ok(row) => {
                hb.after_emit = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()).unwrap_or_default();
            }
            // The connection went away (a source restart): the next poll reconnects.
            Err(e) if e.code().is_none() => {
                tracing::debug!(error = %e, "heartbeat: the source connection failed");
            }
            Err(e) => {
                tracing::info!(error = %e, "cannot emit heartbeat messages on the source (pg_logical_emit_message); idle shards' progress advances only with the source's own traffic");
                hb.disabled = true;
            }
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

/// What a stopped shard's error says while the daemon runs: how it is started again.
fn restart_hint(name: &str) -> String {
    format!(
        "shard {name} stays stopped until it is restarted: fix what this names, then send the \
         daemon SIGHUP or run RESUME {name} on the admin console (it retries with the url it \
         started with: a password fixed on the shard's role works so; a url changed in the \
         config needs `reshard run` started again); its backlog waits in the spill log"
    )
}
