//! Status for `reshard status` / `reshard lag`, with or without a running daemon.
//!
//! In: the config. Out: a [`StatusSnapshot`] — from the daemon's admin console
//! (`SHOW STATUS JSON` on `[admin] listen`) when it answers, otherwise rebuilt offline from
//! what is durable: the source's slot (`pg_replication_slots`), each shard's progress row, the
//! reverse streams (`reshard.reverse` and their progress rows `reverse:<shard>` on the source,
//! against each such shard's present), and the spill directory on disk. The offline snapshot has phase `stopped` and no rates or
//! latencies (those live only in the daemon).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::event::pg_now;
use crate::lsn::Lsn;
use crate::pg::conn::connect_plain;
use crate::pg::progress::{read_progress, source_system_id, ProgressRow};
use crate::status::{
    Phase, ReverseView, ShardState, ShardView, SpillView, StatusSnapshot, TableView,
};

/// How long the admin console and each database get to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOrigin {
    /// The running daemon's admin console.
    Daemon,
    /// Rebuilt from the source, the shards and the spill directory.
    Offline,
}

/// Whether a shard's lag in `s` is known. Offline, without the source's WAL position every
/// lag is unknown; without a shard's progress row (unreachable, unreadable, none yet) that
/// shard's is. `status` and `lag` show an unknown lag as `-` (JSON `null`), never as 0.
pub fn lag_known(s: &StatusSnapshot, origin: StatusOrigin, sh: &crate::status::ShardView) -> bool {
    origin == StatusOrigin::Daemon
        || (s.source.connected
            && !s.source.current_wal_lsn.is_zero()
            && (sh.last_error.is_none() || sh.stopped_by_last_run))
}

/// Why a shard's lag in `s` is not known, naming the shard (its own error, or the source's when
/// the source's WAL position could not be read); `None` when [`lag_known`]. `status --json` and
/// `lag --json` give it as `lag_error` beside a `null` `lag_bytes` and `lag_seconds`.
pub fn lag_unknown(
    s: &StatusSnapshot,
    origin: StatusOrigin,
    sh: &crate::status::ShardView,
) -> Option<String> {
    if lag_known(s, origin, sh) {
        return None;
    }
    let why = match &sh.last_error {
        Some(e) => e.clone(),
        None => s
            .source
            .last_error
            .clone()
            .unwrap_or_else(|| "the source's WAL position could not be read".into()),
    };
    Some(format!("the lag of shard {} is not known: {why}", sh.name))
}

/// What could not be read offline (the source, or a shard other than one with no progress
/// row yet): `None` when everything was.
pub fn unreadable(s: &StatusSnapshot, origin: StatusOrigin) -> Option<String> {
    if origin == StatusOrigin::Daemon {
        return None;
    }
    let mut what: Vec<String> = Vec::new();
    if !s.source.connected || s.source.current_wal_lsn.is_zero() {
        what.push(
            s.source
                .last_error
                .clone()
                .unwrap_or_else(|| "the source's WAL position could not be read".into()),
        );
    }
    what.extend(
        s.shards
            .iter()
            .filter(|sh| sh.state != crate::status::ShardState::Waiting && !sh.stopped_by_last_run)
            .filter_map(|sh| sh.last_error.clone()),
    );
    (!what.is_empty()).then(|| what.join("; "))
}

/// Asks the running daemon (`SHOW STATUS JSON` on `[admin] listen`).
pub async fn query_admin(config: &Config) -> Result<StatusSnapshot, String> {
    let listen = config.admin.listen.trim();
    if listen.is_empty() {
        return Err("the admin console is off ([admin] listen = \"\")".into());
    }
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| format!("[admin] listen = {listen:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("[admin] listen = {listen:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() || host == "0.0.0.0" {
        "127.0.0.1"
    } else if host == "::" {
        "::1"
    } else {
        host
    };
    let mut pg = tokio_postgres::Config::new();
    pg.host(host)
        .port(port)
        .user(&config.admin.user)
        .dbname("reshard")
        .application_name("reshard status")
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(pw) = &config.admin.password {
        pg.password(pw);
    }
    let fut = async {
        let (client, conn) = pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("admin console at {listen}: {e}"))?;
        let target = format!("admin console at {listen}");
        tokio::spawn(async move {
            let _ = crate::pg::conn::drive_connection(conn, target).await;
        });
        let msgs = client
            .simple_query("SHOW STATUS JSON")
            .await
            .map_err(|e| format!("SHOW STATUS JSON: {e}"))?;
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let text = r.get(0).ok_or("SHOW STATUS JSON returned NULL")?;
                return serde_json::from_str::<StatusSnapshot>(text)
                    .map_err(|e| format!("SHOW STATUS JSON: not a status snapshot: {e}"));
            }
        }
        Err("SHOW STATUS JSON returned no row".to_owned())
    };
    tokio::time::timeout(CONNECT_TIMEOUT * 2, fut)
        .await
        .map_err(|_| format!("admin console at {listen} did not answer"))?
}

/// The daemon's status if it answers, else the offline one.
pub async fn current_status(config: &Config) -> (StatusSnapshot, StatusOrigin) {
    match query_admin(config).await {
        Ok(s) => (s, StatusOrigin::Daemon),
        Err(e) => {
            tracing::debug!(error = %e, "daemon not answering; rebuilding status offline");
            (offline_status(config).await, StatusOrigin::Offline)
        }
    }
}

/// Whether a `reshard run` for this config is up, and what it says it is doing.
#[derive(Debug, Clone)]
pub enum Daemon {
    /// Its admin console answered.
    Answering(Box<StatusSnapshot>),
    /// The admin console did not answer, but a walsender streams the slot.
    SlotActive,
    /// Nothing is up: why the console did not answer; the slot has no walsender.
    Absent(String),
}

impl Daemon {
    /// Whether something is running that can move `shard`'s progress.
    pub fn is_up(&self) -> bool {
        !matches!(self, Daemon::Absent(_))
    }

    /// One clause for a waiting message: what the daemon is doing about `shard`.
    pub fn describe(&self, config: &Config, shard: &str) -> String {
        match self {
            Daemon::Answering(s) => {
                let mut out = format!("reshard run is {}", s.phase.as_str());
                if s.phase == Phase::FullLoad && !s.tables.is_empty() {
                    let done = s.tables.iter().filter(|t| t.state.contains("done")).count();
                    out.push_str(&format!(
                        " ({done} of {} tables loaded; shards apply once it finishes)",
                        s.tables.len()
                    ));
                }
                if let Some(v) = s.shards.iter().find(|v| v.name == shard) {
                    out.push_str(&format!(", shard {shard} is {}", v.state.as_str()));
                    if let Some(e) = &v.last_error {
                        out.push_str(&format!(" (last error: {e})"));
                    }
                }
                out
            }
            Daemon::SlotActive => format!(
                "slot {} is being streamed (the admin console does not answer)",
                config.source.slot
            ),
            Daemon::Absent(why) => format!(
                "no reshard run is up: {why}, and slot {} has no walsender",
                config.source.slot
            ),
        }
    }
}

/// Looks for the daemon: its admin console, else a walsender on the slot (read with `src`).
pub async fn find_daemon(config: &Config, src: &tokio_postgres::Client) -> Daemon {
    let why = match query_admin(config).await {
        Ok(s) => return Daemon::Answering(Box::new(s)),
        Err(e) => e,
    };
    let active = src
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.source.slot],
        )
        .await;
    match active {
        Ok(Some(r)) if r.try_get::<_, bool>(0).unwrap_or(false) => Daemon::SlotActive,
        // A failing query is no evidence of a running daemon either.
        _ => Daemon::Absent(why),
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT * 3, connect_plain(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// Rebuilds a snapshot without the daemon. Unreachable endpoints are reported in the
/// `last_error` fields, never as a failure of the whole status.
pub async fn offline_status(config: &Config) -> StatusSnapshot {
    let mut snap = StatusSnapshot {
        phase: Phase::Stopped,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    snap.source.slot = config.source.slot.clone();
    snap.source.publication = config.source.publication.clone();
    let mut system_id = None;
    match connect(&config.source.url).await {
        Err(e) => snap.source.last_error = Some(format!("cannot connect to the source: {e}")),
        Ok(src) => {
            snap.source.connected = true;
            system_id = source_system_id(&src).await;
            snap.source.system_id = system_id.clone().unwrap_or_default();
            if let Err(e) = source_slot(&src, config, &mut snap).await {
                snap.source.last_error = Some(format!("reading the slot: {e}"));
            }
            match crate::ops::rebalance::read_state(config).await {
                Ok(r) => snap.rebalance = r,
                Err(e) => tracing::warn!("status: {e}"),
            }
            match offline_reverse(&src, config).await {
                Ok(r) => snap.reverse = r,
                Err(e) => {
                    snap.source.last_error = Some(format!(
                        "reading the reverse streams (reshard.reverse): {e}"
                    ))
                }
            }
            match crate::pg::fence::read_fences(&src).await {
                Ok(f) => snap.source.fences = f,
                Err(e) => {
                    snap.source.last_error = Some(format!(
                        "reading the write fences (reshard.fence): {}",
                        crate::pg::conn::error_text(&e)
                    ))
                }
            }
            if let Ok(set) = crate::pg::catalog::resolve(&src, config).await {
                snap.tables = set
                    .tables
                    .into_iter()
                    .map(|t| t.rule)
                    .map(|r| TableView {
                        name: r.source.to_string(),
                        target: r.target.to_string(),
                        mode: r.mode.to_string(),
                        state: "unknown".into(),
                        ..Default::default()
                    })
                    .collect();
            }
        }
    }
    let current = snap.source.current_wal_lsn;
    let mut loads: HashMap<String, TableLoad> = HashMap::new();
    let mut loads_seen = false;
    let stops = crate::runtime::stopnote::read(&config.spill.dir);
    for s in &config.shards {
        let mut v = ShardView {
            name: s.name.clone(),
            state: ShardState::Stopped,
            ..Default::default()
        };
        let client = connect(&s.url).await;
        if let Ok(c) = &client {
            match fullload_chunks(c).await {
                Ok(Some(tables)) => {
                    loads_seen = true;
                    for (table, chunks) in tables {
                        // The snapshot stage records names quoted where needed
                        // (`"Weird"."name"`), as the table list shows them.
                        let e = loads.entry(table).or_default();
                        e.rows += chunks.rows;
                        e.bytes += chunks.bytes;
                        e.any = true;
                        if chunks.done >= chunks.total {
                            e.complete_shards += 1;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(shard = %s.name, error = %e, "reading reshard.fullload_chunks")
                }
            }
        }
        match client {
            Err(e) => v.last_error = Some(format!("cannot connect to shard {}: {e}", s.name)),
            Ok(c) => match read_progress(&c, &config.source.slot, &s.name, system_id.as_deref())
                .await
            {
                Err(e) => v.last_error = Some(e.to_string()),
                Ok(None) => {
                    v.state = ShardState::Waiting;
                    v.last_error =
                        Some("no progress row yet: reshard has not applied anything here".into());
                }
                Ok(Some(p)) => {
                    v.applied_lsn = p.commit_lsn;
                    v.last_commit_time = p.commit_time;
                    (v.lag_bytes, v.lag_seconds) = offline_lag(current, &p);
                    // Why the last daemon run stopped it (the daemon ends when every shard
                    // did): otherwise only in that run's log.
                    if let Some(e) = stops.get(&s.name) {
                        v.last_error = Some(format!(
                            "the last `reshard run` stopped this shard: {e}; fix what this \
                             names and start `reshard run` again (the backlog waits in the \
                             spill log)"
                        ));
                        v.stopped_by_last_run = true;
                    }
                }
            },
        }
        if let (Some(e), Some(now), false) =
            (stops.get(&s.name), &mut v.last_error, v.stopped_by_last_run)
        {
            now.push_str(&format!("; the last `reshard run` stopped this shard: {e}"));
        }
        snap.shards.push(v);
    }
    if loads_seen {
        let shards = config.shards.len() as u64;
        for t in &mut snap.tables {
            let l = loads.get(&t.name).copied().unwrap_or_default();
            t.rows_copied = l.rows;
            t.bytes_copied = l.bytes;
            t.state = if l.complete_shards >= shards {
                "done"
            } else if l.any {
                "partial"
            } else {
                "pending"
            }
            .into();
        }
    }
    snap.spill = spill_view(config);
    snap
}

/// `(lag_bytes, lag_seconds)` of a progress row against the present of the database it
/// follows (`current`, zero when unknown). An idle stream's heartbeat stands just below the end
/// it covers (the same rule as the daemon's status): that is caught up, not 1 byte behind.
fn offline_lag(current: Lsn, p: &ProgressRow) -> (u64, f64) {
    if current.is_zero() || p.commit_lsn.covers(current) {
        return (0, 0.0);
    }
    let bytes = current.bytes_since(p.commit_lsn);
    let secs = match p.commit_time {
        Some(t) if bytes > 0 => ((pg_now() - t) as f64 / 1e6).max(0.0),
        _ => 0.0,
    };
    (bytes, secs)
}

/// The reverse direction without the daemon: each row of `reshard.reverse`, with the source's
/// progress row of its stream (`reverse:<shard>`) against the shard's present. An unreachable
/// shard is reported in the view's `last_error`.
async fn offline_reverse(
    src: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<ReverseView>, String> {
    let rows = crate::pg::reverse::read_all(src)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut v = row.view();
        if row.state.streams() {
            if let Ok(h) = crate::pg::reverse::sequence_headroom(src, &row).await {
                v.set_sequence_headroom(h, config.cutover.sequence_gap);
            }
        }
        match read_progress(
            src,
            &row.slot,
            &row.progress_shard(),
            Some(&row.shard_system_id),
        )
        .await
        {
            Err(e) => v.last_error = Some(e.to_string()),
            Ok(None) => {}
            Ok(Some(p)) => {
                v.applied_lsn = p.commit_lsn;
                if row.state.streams() {
                    let current = match config.shards.iter().find(|s| s.name == row.shard) {
                        None => {
                            v.last_error = Some(format!(
                                "shard {} is not in the config's [[shards]]",
                                row.shard
                            ));
                            Lsn::ZERO
                        }
                        Some(s) => match connect(&s.url).await {
                            Err(e) => {
                                v.last_error =
                                    Some(format!("cannot connect to shard {}: {e}", s.name));
                                Lsn::ZERO
                            }
                            Ok(c) => crate::pg::conn::current_insert_lsn(&c)
                                .await
                                .unwrap_or(Lsn::ZERO),
                        },
                    };
                    (v.lag_bytes, v.lag_seconds) = offline_lag(current, &p);
                }
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// Full-load progress of one table, summed over the shards.
#[derive(Debug, Clone, Copy, Default)]
struct TableLoad {
    rows: u64,
    bytes: u64,
    any: bool,
    complete_shards: u64,
}

/// One shard's record of one table's chunks.
struct Chunks {
    done: u64,
    total: u64,
    rows: u64,
    bytes: u64,
}

/// The full load's chunk records on a shard (`reshard.fullload_chunks`, written by the
/// snapshot stage in the same transaction as each chunk's rows); `None` if the table is absent.
async fn fullload_chunks(
    client: &tokio_postgres::Client,
) -> Result<Option<Vec<(String, Chunks)>>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('reshard.fullload_chunks') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT source_table, count(*)::int8, max(chunks_total)::int8, \
                    coalesce(sum(rows), 0)::int8, coalesce(sum(bytes), 0)::int8 \
             FROM reshard.fullload_chunks GROUP BY 1",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let n = |i: usize| -> Result<u64, tokio_postgres::Error> {
            Ok(r.try_get::<_, i64>(i)?.max(0) as u64)
        };
        out.push((
            r.try_get(0)?,
            Chunks {
                done: n(1)?,
                total: n(2)?,
                rows: n(3)?,
                bytes: n(4)?,
            },
        ));
    }
    Ok(Some(out))
}

async fn source_slot(
    src: &tokio_postgres::Client,
    config: &Config,
    snap: &mut StatusSnapshot,
) -> Result<(), String> {
    // One query, one moment: the source's present and the slot's position read apart could
    // show the present below the confirmed position.
    let row = src
        .query_one(
            &format!(
                "SELECT {}::text, coalesce(s.confirmed_flush_lsn::text, '0/0'), s.active, \
                        coalesce((pg_current_wal_lsn() - s.restart_lsn)::int8, 0), s.slot_name IS NOT NULL \
                 FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
                crate::pg::conn::SOURCE_PRESENT_LSN
            ),
            &[&config.source.slot],
        )
        .await
        .map_err(|e| crate::pg::conn::error_text(&e))?;
    let present: String = row
        .try_get(0)
        .map_err(|e| crate::pg::conn::error_text(&e))?;
    snap.source.current_wal_lsn = present.parse().unwrap_or(Lsn::ZERO);
    let exists: bool = row
        .try_get(4)
        .map_err(|e| crate::pg::conn::error_text(&e))?;
    match exists.then_some(row) {
        None => {
            snap.source.last_error = Some(format!(
                "slot {} does not exist on the source (reshard run creates it)",
                config.source.slot
            ))
        }
        Some(r) => {
            let flush: String = r.try_get(1).map_err(|e| crate::pg::conn::error_text(&e))?;
            snap.source.confirmed_flush_lsn = flush.parse().unwrap_or(Lsn::ZERO);
            let active: bool = r.try_get(2).map_err(|e| crate::pg::conn::error_text(&e))?;
            let retained: i64 = r.try_get(3).map_err(|e| crate::pg::conn::error_text(&e))?;
            snap.source.retained_wal_bytes = retained.max(0) as u64;
            if active {
                snap.source.last_error = Some(format!(
                    "slot {} is active: some process is streaming it, yet the admin console did not answer",
                    config.source.slot
                ));
            }
        }
    }
    Ok(())
}

/// Size of the spill directory: every regular file below it counts as bytes; files ending in
/// `.seg` count as segments (every file, if none does).
pub fn spill_view(config: &Config) -> SpillView {
    let mut bytes = 0u64;
    let mut files = 0u64;
    let mut segs = 0u64;
    walk(&config.spill.dir, &mut |p, len| {
        bytes += len;
        files += 1;
        if p.extension().is_some_and(|e| e == "seg") {
            segs += 1;
        }
    });
    SpillView {
        dir: config.spill.dir.display().to_string(),
        bytes,
        max_bytes: config.spill.max_bytes,
        segments: if segs > 0 { segs } else { files },
        high_water_bytes: bytes,
        ..Default::default()
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, u64)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let p = e.path();
        if ft.is_dir() {
            walk(&p, f);
        } else if ft.is_file() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            f(&p, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_dir_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shard0")).unwrap();
        std::fs::write(dir.path().join("shard0/000001.seg"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.path().join("000002.seg"), vec![0u8; 50]).unwrap();
        std::fs::write(dir.path().join("meta.json"), b"{}").unwrap();
        let cfg = Config {
            spill: crate::config::SpillConfig {
                dir: dir.path().to_owned(),
                ..Default::default()
            },
            ..Default::default()
        };
        let v = spill_view(&cfg);
        assert_eq!(v.bytes, 152);
        assert_eq!(v.segments, 2);
    }
}
