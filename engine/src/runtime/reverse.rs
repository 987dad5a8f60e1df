//! Reverse replication: after a fenced cutover of shard S, the writes the application makes on
//! S stream back to the source, so the source stays a complete fallback until `reshard
//! rollback` (or for as long as S serves its accounts).
//!
//! Wiring only: a [side stream](crate::runtime::side) from S's slot and publication (created
//! by the cutover, recorded in `reshard.reverse`, see [`crate::pg::reverse`]) into the source:
//! decode, transaction assembly, a router with one target (the source), a spill log of its own
//! (`<[spill] dir>/reverse/<slot>`, confirmed to S's slot once durable), one applier writing the
//! source, batched, its progress row `reverse:<S>` (keyed by S's system id and slot) in the
//! same source transaction, so exactly once across restarts; the start-up proof guards the
//! reverse log like the forward one.
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
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::apply::RowOwner;
use crate::config::{Config, TableMode as CfgMode};
use crate::event::ShardId;
use crate::pg::catalog::SourceTable;
use crate::pg::reverse::{self as record, ReverseRow, ReverseState};
use crate::route::{self, RouteSpec, Router};
use crate::runtime::options::{load_map, route_spec};
use crate::runtime::side::{SideSpec, SideStream};
use crate::shutdown::ShutdownRx;
use crate::source::{ConnConfig, SqlSession};
use crate::status::ReverseView;

/// How often the watcher reads `reshard.reverse`.
const POLL: Duration = Duration::from_secs(1);
/// How often the watcher publishes the streams' state (the daemon's status refresh).
const PUBLISH: Duration = Duration::from_millis(250);
/// How often the watcher reads the sequence headroom of the streaming shards.
const HEADROOM_EVERY: Duration = Duration::from_secs(5);
/// How often a low sequence headroom is logged (per shard).
const HEADROOM_WARN_EVERY: Duration = Duration::from_secs(60);

/// Why a reverse stream could not start or stopped (a side stream's error).
pub use super::side::SideError as ReverseError;

/// The one target of a reverse stream (the spill log's only "shard").
const SOURCE_TARGET: &str = "source";

/// A shard's sequence headroom (the sequence with the least room and that room), and when it
/// was last logged as low.
type Headroom = (Option<(String, i64)>, Option<Instant>);

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
        sql: SqlSession::new(source, None),
        streams: HashMap::new(),
        rows: Vec::new(),
        cleaned: HashSet::new(),
        finals: HashMap::new(),
        failures: HashMap::new(),
        views_tx,
        table_error: None,
        headroom: HashMap::new(),
        last_headroom: None,
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
    sql: SqlSession,
    streams: HashMap<String, Stream>,
    rows: Vec<ReverseRow>,
    /// `(shard, epoch)` whose slot, publication and log were removed after their rollback.
    cleaned: HashSet<(String, i32)>,
    /// `(shard, epoch)` rolled back: the stream's final figures (see [`Watcher::finish`]).
    finals: HashMap<(String, i32), ReverseView>,
    failures: HashMap<String, Failure>,
    views_tx: watch::Sender<Vec<ReverseView>>,
    table_error: Option<String>,
    /// Per streaming shard: the sequence headroom read last (see
    /// [`ReverseView::sequence_headroom`]) and when it was last logged as low.
    headroom: HashMap<String, Headroom>,
    last_headroom: Option<Instant>,
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
                self.sql.reset();
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
                // Its counters for this run, before they go with it.
                let mut last = s.row.view();
                s.fill(&mut last);
                self.finals.insert((shard.clone(), s.row.epoch), last);
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
                        self.cleaned.insert(key.clone());
                    }
                    if self
                        .finals
                        .get(&key)
                        .is_none_or(|v| v.state != row.state.as_str())
                    {
                        self.finish(row).await;
                    }
                }
                ReverseState::Starting => {}
            }
        }
        if self
            .last_headroom
            .is_none_or(|t| t.elapsed() >= HEADROOM_EVERY)
        {
            self.last_headroom = Some(Instant::now());
            self.read_headroom(&rows).await;
        }
        self.publish(&rows);
    }

    /// Reads each streaming shard's sequence headroom on the source, and logs a WARN (at most
    /// once per [`HEADROOM_WARN_EVERY`] per shard) while it is low.
    async fn read_headroom(&mut self, rows: &[ReverseRow]) {
        let gap = self.cfg.cutover.sequence_gap;
        let Ok(sql) = self.sql.client().await else {
            return;
        };
        let mut next = HashMap::new();
        for row in rows.iter().filter(|r| r.state.streams()) {
            let h = match record::sequence_headroom(sql, row).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(shard = %row.shard, error = %e, "cannot read the sequence headroom");
                    continue;
                }
            };
            let mut warned = self.headroom.get(&row.shard).and_then(|(_, w)| *w);
            let mut v = row.view();
            v.set_sequence_headroom(h.clone(), gap);
            if let Some(w) = &v.sequence_warning {
                if warned.is_none_or(|t| t.elapsed() >= HEADROOM_WARN_EVERY) {
                    tracing::warn!(shard = %row.shard, headroom = v.sequence_headroom, "{w}");
                    warned = Some(Instant::now());
                }
            } else {
                warned = None;
            }
            next.insert(row.shard.clone(), (h, warned));
        }
        self.headroom = next;
    }

    async fn read_rows(&mut self) -> Result<Vec<ReverseRow>, String> {
        let sql = self.sql.client().await?;
        record::read_all(sql).await.map_err(|e| e.to_string())
    }

    async fn ensure_running(&mut self, row: &ReverseRow) {
        if let Some(s) = self.streams.get_mut(&row.shard) {
            s.row.state = row.state;
            s.row.drain_lsn = row.drain_lsn;
            if !s.side.is_finished() {
                return;
            }
            let Some(s) = self.streams.remove(&row.shard) else {
                return;
            };
            let e = match s.side.stop().await {
                Ok(()) => "stopped".to_owned(),
                Err(e) => e.to_string(),
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

    /// The final figures of a rolled-back reverse stream: where the source's progress row
    /// `reverse:<shard>` ended (everything received was applied: the rollback drained it),
    /// nothing behind, no stream, and the counters of this run's stream if it ran here. Kept
    /// in [`Watcher::finals`] once read; until then the row shows as [`ReverseRow::view`].
    async fn finish(&mut self, row: &ReverseRow) {
        let key = (row.shard.clone(), row.epoch);
        let Ok(sql) = self.sql.client().await else {
            return;
        };
        let end = match crate::pg::progress::read_progress(
            sql,
            &row.slot,
            &row.progress_shard(),
            Some(&row.shard_system_id),
        )
        .await
        {
            Ok(p) => p.map(|p| p.commit_lsn).unwrap_or_default(),
            Err(e) => {
                tracing::debug!(shard = %row.shard, error = %e, "cannot read the rolled-back reverse stream's progress yet");
                return;
            }
        };
        let mut v = self.finals.remove(&key).unwrap_or_else(|| row.view());
        v.state = row.state.as_str().to_owned();
        v.drain_lsn = row.drain_lsn;
        v.stream = String::new();
        v.connected = false;
        v.applied_lsn = end;
        v.received_lsn = end;
        v.lag_bytes = 0;
        v.lag_seconds = 0.0;
        v.last_error = None;
        self.finals.insert(key, v);
    }

    fn publish(&self, rows: &[ReverseRow]) {
        let views = rows
            .iter()
            .map(|row| {
                if row.state == ReverseState::RolledBack {
                    if let Some(v) = self.finals.get(&(row.shard.clone(), row.epoch)) {
                        if v.state == row.state.as_str() {
                            return v.clone();
                        }
                    }
                }
                let mut v = row.view();
                if let Some(s) = self.streams.get(&row.shard) {
                    s.fill(&mut v);
                }
                if let Some((h, _)) = self.headroom.get(&row.shard) {
                    v.set_sequence_headroom(h.clone(), self.cfg.cutover.sequence_gap);
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
    side: SideStream,
}

impl Stream {
    /// Starts the side stream from the shard's reverse slot into the source.
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
        let spec = SideSpec {
            shard: row.shard.clone(),
            shard_conn: ConnConfig::parse(&shard_cfg.url)?,
            shard_system_id: row.shard_system_id.clone(),
            slot: row.slot.clone(),
            publication: row.publication.clone(),
            slot_missing_advice: format!(
                "the writes the shard took since its cutover can no longer stream back. If they are on the source already, run `reshard rollback --shard {}`; otherwise recreate nothing, and copy them by hand",
                row.shard
            ),
            dir: reverse_dir(cfg, row),
            target_conn: ConnConfig::parse(&cfg.source.url)?,
            progress_shard: row.progress_shard(),
            route: reverse_route_spec(cfg, tables),
            table_map: tables
                .iter()
                .filter(|t| t.rule.mode == CfgMode::Sharded && t.rule.target != t.rule.source)
                .map(|t| (t.rule.target.clone(), t.rule.source.clone()))
                .collect(),
            origin: row.origin(),
            kind: "reverse",
            row_owner: Some(row_owner(cfg, tables, &row.shard).await?),
        };
        Ok(Stream {
            row: row.clone(),
            side: SideStream::start(cfg, spec).await?,
        })
    }

    async fn stop(self) -> Result<(), ReverseError> {
        self.side.stop().await
    }

    fn fill(&self, v: &mut ReverseView) {
        self.side.fill(v);
    }
}

/// The source's rows the reverse stream of `shard` may change: those whose shard key routes
/// to `shard` (the forward direction's routing, with the account map as it is now). A cut-over
/// shard and the source draw ids from copies of one sequence; once the source has used up
/// `[cutover] sequence_gap`, they hand out the same id to different accounts, and the reverse
/// upsert would replace the source's row of another shard's account (R3-1). The apply halts on
/// such a change instead, with this advice.
async fn row_owner(
    cfg: &Config,
    tables: &[SourceTable],
    shard: &str,
) -> Result<RowOwner, ReverseError> {
    let index = cfg
        .shards
        .iter()
        .position(|s| s.name == shard)
        .ok_or_else(|| ReverseError::UnknownShard {
            shard: shard.to_owned(),
        })?;
    let map = load_map(cfg).await?.map(|m| m.map);
    let router = Arc::new(Router::new(route_spec(cfg, tables, map)?)?);
    let owner = ShardId(index as u16);
    let keys = tables
        .iter()
        .filter(|t| t.rule.mode == CfgMode::Sharded)
        .map(|t| (t.rule.source.clone(), t.rule.key.clone()))
        .collect();
    Ok(RowOwner {
        keys,
        owner: shard.to_owned(),
        owns: Arc::new(move |type_oid, text| router.shard_of_text(type_oid, text) == Ok(owner)),
        advice: format!(
            "To go on, give one of the two rows another key, on the source the other account's \
             (e.g. UPDATE <table> SET id = nextval('<its sequence>') WHERE id = <id> AND <key> = \
             <its account>; the forward stream carries it to that account's shard; rows that \
             reference it must follow), and move shard {shard}'s sequences past every id the \
             source will hand out while it stays cut over (SELECT setval(…) on {shard}) so that \
             no later row collides; the stream then resumes by itself (`reshard rollback --shard \
             {shard}` refuses until it has). Next time raise [cutover] sequence_gap (now {gap}) \
             above the ids the source hands out while a shard is cut over, or give each shard \
             its own id range.",
            gap = cfg.cutover.sequence_gap
        ),
    })
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
