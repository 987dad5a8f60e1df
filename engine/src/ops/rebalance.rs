//! `reshard rebalance --shards M`: grows a `hash = "postgres"` layout from N to M shards under
//! live writers, as a series of hash-range moves, or balances a `hash = "map"` layout onto M
//! shards as a series of account moves (issue #17, "N → M").
//!
//! In: the config (its N `[[shards]]` and at least M − N `[[new_shards]]`), M, the concurrency
//! and the per-target ceiling. Out: a [`RebalanceReport`]; afterwards old shard i holds only the
//! rows with hash mod M = i, new shard j (the (j − N)-th `[[new_shards]]`) the rows with hash
//! mod M = j, and the layout is plain hash partitioning with MODULUS M over the shards in the
//! order the report's `config` lists.
//!
//! The plan is [`crate::ops::grow::plan_growth`]'s: new shard j takes its rows from old shard
//! j mod N. Each is one move of [`crate::ops::moves`] with
//! [`Selector::HashRemainder`]: copied from a snapshot, streamed, fenced
//! ([`crate::ops::fence::FenceRule::Hash`] on the old shard), verified, flipped, deleted. The
//! range covers accounts created during the rebalance too (a key is in it by its hash).
//!
//! What the application routes by while it runs: the table `reshard.layout` on the first
//! `[[shards]]` entry (the "directory shard"): one row `(modulus M, remainder j, shard)` per
//! flipped new shard. A key goes to the shard of the row `(M, hash mod M)` if there is one,
//! else to old shard `hash mod N`. A flip happens after the old shard fences the range
//! (SQLSTATE `RSF01`), so a writer that routed by a stale layout is refused and re-reads it.
//!
//! State: `reshard.rebalance` on the directory shard (one row per rebalance: moves done and
//! total, rows planned and done, `running` / `done`), which `reshard status` reads
//! ([`read_state`]) and a human can with psql. The console and metrics are the daemon's, which
//! never runs beside a rebalance. Every move records its own steps on its target (`reshard.move`), so
//! running the same `reshard rebalance` again after a crash at any point re-runs the moves that
//! are not done and skips those that are.
//!
//! Concurrency: at most `--parallel` targets at once, and the moves of one target one after the
//! other, so two moves never write one target at once and a move's `--max-rows-per-sec` is its
//! target's ceiling (a hash growth has exactly one move per new shard).
//!
//! `hash = "map"`: the plan is [`crate::ops::balance::plan_map`]'s balanced map for M of the
//! config's shards, one account move ([`Selector::Accounts`]) per (from, to) pair of its
//! batches; each move flips the account map itself, so the application routes by the map as
//! during any `reshard move`. The plan is kept in `reshard.rebalance.plan` (row
//! `rebalance_map_to_<M>`) until every move is done: a resumed run finishes the kept plan
//! instead of measuring again (the accounts already moved would give another one).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use crate::config::{Config, HashKind};
use crate::ops::grow::{self, GrowError, GrowPlan};
use crate::ops::moves::{run_move, MoveError, MoveOptions, MoveReport, Selector, Step};
use crate::ops::EndpointError;
use crate::pg::conn::{connect_plain, error_text};

/// How often a running rebalance logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

const STATE_SQL: &str = "
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS reshard;
CREATE TABLE IF NOT EXISTS reshard.layout (
    modulus int NOT NULL,
    remainder int NOT NULL,
    shard text NOT NULL,
    flipped_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (modulus, remainder)
);
CREATE TABLE IF NOT EXISTS reshard.rebalance (
    id text PRIMARY KEY,
    from_shards int NOT NULL,
    to_shards int NOT NULL,
    state text NOT NULL,
    moves_total int NOT NULL,
    moves_done int NOT NULL DEFAULT 0,
    rows_planned bigint NOT NULL DEFAULT 0,
    bytes_planned bigint NOT NULL DEFAULT 0,
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE reshard.rebalance ADD COLUMN IF NOT EXISTS plan text;
RESET client_min_messages";

/// What to run.
#[derive(Clone, Debug)]
pub struct RebalanceOptions {
    /// The new shard count (M).
    pub to: usize,
    /// Moves at once (at least 1).
    pub parallel: usize,
    /// Longest wait of each move for its target to catch up.
    pub timeout: Duration,
    /// Each move's `--delete-grace`.
    pub delete_grace: Duration,
    /// Rows per second per target (the copy), `None`: unthrottled.
    pub max_rows_per_sec: Option<u64>,
    /// `hash = "map"`: the balance the plan aims at, ±percent of the mean bytes
    /// ([`crate::ops::balance::plan_map`]).
    pub tolerance_pct: u32,
}

/// One move of the rebalance.
#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    /// `hash = "postgres"`: the new shard's index (the hash remainder for MODULUS M);
    /// `hash = "map"`: the move's index in the plan.
    pub remainder: usize,
    /// What the move takes (`hash remainder 2 of modulus 4` / `accounts 5,8`).
    pub what: String,
    /// `hash = "map"`: the accounts it moves (empty for a hash range).
    pub accounts: Vec<String>,
    /// The old shard.
    pub from: String,
    /// The new shard.
    pub to: String,
    /// Rows the plan counted for it.
    pub rows_planned: i64,
    /// Their bytes.
    pub bytes_planned: i64,
    /// The move's report, once it ran.
    pub report: Option<MoveReport>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a rebalance did.
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceReport {
    /// `rebalance_<N>_to_<M>`.
    pub id: String,
    /// N.
    pub from_shards: usize,
    /// M.
    pub to_shards: usize,
    /// Moves that reached `done` (this run or an earlier one).
    pub moves_done: usize,
    /// Moves of the plan (M − N).
    pub moves_total: usize,
    /// Rows the plan moves.
    pub rows_to_move: i64,
    /// Their bytes.
    pub bytes_to_move: i64,
    /// Rows the moves copied (from their snapshots).
    pub rows_copied: i64,
    /// Changes the moves streamed in this run.
    pub rows_streamed: u64,
    /// Rows deleted from the old shards.
    pub rows_deleted: i64,
    /// Seconds this run took.
    pub secs: f64,
    /// Where the application reads the layout while the rebalance runs (`hash = "postgres"`:
    /// `reshard.layout`; `hash = "map"`: the account map).
    pub layout: String,
    /// `hash = "map"`: the account map sends each moved account to its new shard (nothing
    /// to change in the config afterwards).
    pub map: bool,
    /// The shards in remainder order for MODULUS M (the final layout).
    pub shards: Vec<String>,
    /// The `[[shards]]` section of the final layout (old shards, then the new ones).
    pub config: String,
    /// Per move.
    pub moves: Vec<PartReport>,
}

/// A rebalance could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    /// Bad arguments or config (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The plan.
    #[error(transparent)]
    Plan(#[from] GrowError),
    /// The directory shard (layout and state).
    #[error(
        "shard {shard} (the directory shard: reshard.layout, reshard.rebalance): {what}: {message}"
    )]
    Directory {
        /// Its name.
        shard: String,
        /// What was being done.
        what: String,
        /// Why.
        message: String,
    },
    /// A move failed (the others that were running finished; run the same command again), or
    /// was refused before it began (fix what it names first). The cause is part of the message,
    /// not an error `source`: printed as a chain it appeared twice on the line.
    #[error("the move of {what} from shard {from} to shard {to} {}: {cause}; {done}/{total} moves are done; {}", verdict(.cause), next_step(.cause))]
    Move {
        /// What it moves ([`Selector::describe`]).
        what: String,
        /// Old shard.
        from: String,
        /// New shard.
        to: String,
        /// Moves done.
        done: usize,
        /// Moves planned.
        total: usize,
        /// Why.
        cause: Box<MoveError>,
        /// What was done before it failed.
        report: Box<RebalanceReport>,
    },
}

/// A move refused before it began (a config or schema problem): running again changes nothing
/// until the operator fixes what it names.
fn refused(e: &MoveError) -> bool {
    matches!(e, MoveError::Usage(_))
}

/// `was refused` or `failed`.
fn verdict(e: &MoveError) -> &'static str {
    if refused(e) {
        "was refused"
    } else {
        "failed"
    }
}

/// What the operator does after a failed move.
fn next_step(e: &MoveError) -> &'static str {
    if refused(e) {
        "fix what the refusal names, then run the same `reshard rebalance` to resume (run as is, it is refused again)"
    } else {
        "run the same `reshard rebalance` again to resume"
    }
}

/// The directory shard: the first `[[shards]]` entry.
fn directory(config: &Config) -> Result<(&str, &str), RebalanceError> {
    config
        .shards
        .first()
        .map(|s| (s.name.as_str(), s.url.as_str()))
        .ok_or_else(|| RebalanceError::Usage("no [[shards]] given".into()))
}

async fn directory_client(config: &Config) -> Result<tokio_postgres::Client, RebalanceError> {
    let (name, url) = directory(config)?;
    let c = connect_plain(url)
        .await
        .map_err(|e| RebalanceError::Directory {
            shard: name.to_owned(),
            what: "connecting".into(),
            message: e.to_string(),
        })?;
    c.batch_execute(STATE_SQL)
        .await
        .map_err(|e| RebalanceError::Directory {
            shard: name.to_owned(),
            what: "creating reshard.layout and reshard.rebalance".into(),
            message: error_text(&e),
        })?;
    Ok(c)
}

/// A move's flip: the application's layout sends hash remainder `remainder` of `modulus` to
/// `shard` (`reshard.layout` on the directory shard; idempotent).
pub async fn flip_layout(
    config: &Config,
    modulus: u32,
    remainder: u32,
    shard: &str,
) -> Result<(), MoveError> {
    let (name, _) = directory(config).map_err(|e| MoveError::Usage(e.to_string()))?;
    let ep = format!("shard {name} (reshard.layout)");
    let c = directory_client(config)
        .await
        .map_err(|e| MoveError::Io(e.to_string()))?;
    let (m, r) = (
        i32::try_from(modulus).unwrap_or(i32::MAX),
        i32::try_from(remainder).unwrap_or(i32::MAX),
    );
    c.execute(
        "INSERT INTO reshard.layout (modulus, remainder, shard) VALUES ($1, $2, $3) \
         ON CONFLICT (modulus, remainder) DO UPDATE SET shard = EXCLUDED.shard, flipped_at = clock_timestamp()",
        &[&m, &r, &shard],
    )
    .await
    .map_err(EndpointError::query(&ep, "recording the flip in reshard.layout"))?;
    tracing::info!(
        modulus,
        remainder,
        shard,
        "rebalance: reshard.layout on shard {name} sends hash remainder {remainder} of modulus {modulus} to shard {shard}"
    );
    Ok(())
}

/// Every rebalance recorded in `reshard.rebalance` on the directory shard (for `reshard
/// status`); none when the table does not exist.
pub async fn read_state(
    config: &Config,
) -> Result<Vec<crate::status::RebalanceView>, RebalanceError> {
    let (name, url) = directory(config)?;
    let derr = |what: &str, message: String| RebalanceError::Directory {
        shard: name.to_owned(),
        what: what.to_owned(),
        message,
    };
    let c = connect_plain(url)
        .await
        .map_err(|e| derr("connecting", e.to_string()))?;
    let rows = c
        .query(
            "SELECT id, from_shards, to_shards, state, moves_done, moves_total, rows_planned, \
               rows_done, bytes_planned, extract(epoch FROM clock_timestamp() - updated_at)::float8 \
             FROM reshard.rebalance ORDER BY started_at",
            &[],
        )
        .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(derr("reading reshard.rebalance", error_text(&e))),
    };
    Ok(rows
        .iter()
        .map(|r| crate::status::RebalanceView {
            id: r.get(0),
            from_shards: r.get(1),
            to_shards: r.get(2),
            state: r.get(3),
            moves_done: r.get(4),
            moves_total: r.get(5),
            rows_planned: r.get(6),
            rows_done: r.get(7),
            bytes_planned: r.get(8),
            idle_secs: r.get(9),
        })
        .collect())
}

/// The `[[shards]]` section of the layout after growing to `to` shards.
fn final_config(config: &Config, to: usize) -> (Vec<String>, String) {
    let all: Vec<_> = config
        .shards
        .iter()
        .chain(&config.new_shards)
        .take(to)
        .collect();
    let names = all.iter().map(|s| s.name.clone()).collect();
    let text = all
        .iter()
        .map(|s| format!("[[shards]]\nname = {:?}\nurl = {:?}\n", s.name, s.url))
        .collect::<Vec<_>>()
        .join("\n");
    (names, text)
}

/// Checks the config can grow to `to` shards: for `hash = "postgres"`, M a multiple of N and
/// enough `[[new_shards]]` (a map's plan checks M against the config's shards itself).
pub fn check(config: &Config, to: usize) -> Result<(), RebalanceError> {
    if config.routing.hash == HashKind::Map {
        return Ok(());
    }
    grow::check_shards(config, to).map_err(|e| RebalanceError::Usage(e.to_string()))
}

/// Every sharded table exists on every new shard (a move copies into them), and so does every
/// broadcast table, with rows when the first old shard has some (the rebalance moves sharded
/// rows only: an empty broadcast table on a new shard would answer the application's joins
/// with nothing once accounts are routed there). Refused before anything is written otherwise.
async fn check_new_shards(config: &Config, to: usize) -> Result<(), RebalanceError> {
    let targets = |rules: Vec<crate::config::TableRule>| -> Vec<crate::pg::sql::TableName> {
        rules.into_iter().map(|t| t.target).collect()
    };
    let sharded = targets(grow::sharded_tables(config).await?);
    let broadcast =
        targets(grow::tables_in_mode(config, crate::config::TableMode::Broadcast).await?);
    // The broadcast tables that have rows on the first old shard (read once).
    let mut filled = Vec::new();
    if let (Some(o), false) = (config.shards.first(), broadcast.is_empty()) {
        let oc = grow::connect_shard(o).await?;
        for t in &broadcast {
            let has = oc
                .query_one(has_rows_sql(t).as_str(), &[])
                .await
                .map_err(|e| GrowError::Shard {
                    shard: o.name.clone(),
                    what: format!("reading broadcast table {t}"),
                    message: error_text(&e),
                })?
                .get::<_, bool>(0);
            if has {
                filled.push((t, &o.name));
            }
        }
    }
    for s in config.new_shards.iter().take(to - config.shards.len()) {
        let c = connect_plain(&s.url).await.map_err(|e| {
            RebalanceError::Usage(format!(
                "cannot connect to new shard {} ([[new_shards]] url): {e}",
                s.name
            ))
        })?;
        for t in sharded.iter().chain(&broadcast) {
            let found: bool = c
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted()])
                .await
                .map_err(|e| {
                    RebalanceError::Usage(format!("new shard {}: {}", s.name, error_text(&e)))
                })?
                .get(0);
            if !found {
                return Err(RebalanceError::Usage(format!(
                    "table {t} does not exist on new shard {}: create the schema there first (e.g. pg_dump --schema-only of an old shard, restored into it)",
                    s.name
                )));
            }
        }
        for (t, old) in &filled {
            let on_new: bool = c
                .query_one(has_rows_sql(t).as_str(), &[])
                .await
                .map_err(|e| {
                    RebalanceError::Usage(format!(
                        "new shard {}: reading {t}: {}",
                        s.name,
                        error_text(&e)
                    ))
                })?
                .get(0);
            if !on_new {
                return Err(RebalanceError::Usage(format!(
                    "broadcast table {t} is empty on new shard {new} but has rows on shard {old}: the rebalance moves sharded rows only; copy it first (e.g. pg_dump --data-only --table={t} of shard {old}, restored into {new}), then run the same command again",
                    new = s.name
                )));
            }
        }
    }
    Ok(())
}

/// Whether `table` has a row.
fn has_rows_sql(table: &crate::pg::sql::TableName) -> String {
    format!("SELECT EXISTS (SELECT 1 FROM {})", table.quoted())
}

/// Shared progress of the running moves.
#[derive(Default)]
struct Progress {
    done: usize,
    rows_done: i64,
    bytes_done: i64,
}

/// One planned move and what it takes.
struct Part {
    report: PartReport,
    selector: Selector,
}

/// What a run executes: the plan of a hash growth or of a balanced map.
struct Planned {
    id: String,
    from_shards: usize,
    parts: Vec<Part>,
    rows_total: i64,
    bytes_total: i64,
    layout: String,
    shards: Vec<String>,
    config: String,
    map: bool,
}

/// A hash growth: one hash-range move per new shard ([`grow::plan_growth`]).
async fn plan_hash(config: &Config, to: usize, dir_name: &str) -> Result<Planned, RebalanceError> {
    check_new_shards(config, to).await?;
    let plan: GrowPlan = grow::plan_growth(config, to, grow::DEFAULT_RATE_ROWS_PER_SEC).await?;
    let n = config.shards.len();
    let modulus = u32::try_from(to).unwrap_or(u32::MAX);
    let parts = plan
        .shards
        .iter()
        .filter(|s| !s.stays)
        .map(|s| {
            let selector = Selector::HashRemainder {
                modulus,
                remainder: u32::try_from(s.index).unwrap_or(u32::MAX),
            };
            Part {
                report: PartReport {
                    remainder: s.index,
                    what: selector.describe(),
                    accounts: Vec::new(),
                    from: s.from.clone(),
                    to: s.name.clone(),
                    rows_planned: s.rows,
                    bytes_planned: s.bytes,
                    report: None,
                    error: None,
                },
                selector,
            }
        })
        .collect();
    let (shards, text) = final_config(config, to);
    Ok(Planned {
        id: format!("rebalance_{n}_to_{to}"),
        from_shards: n,
        parts,
        rows_total: plan.rows_to_move,
        bytes_total: plan.bytes_to_move,
        layout: format!("reshard.layout on shard {dir_name}"),
        shards,
        config: text,
        map: false,
    })
}

/// A balanced map ([`crate::ops::balance::plan_map`]): one account move per (from, to) pair.
/// The plan is kept in `reshard.rebalance.plan` while the rebalance runs, so a resumed run
/// finishes the moves it started (measured again, the moved accounts would give another plan).
async fn plan_accounts(
    config: &Config,
    opts: &RebalanceOptions,
    dir: &tokio_postgres::Client,
    dir_name: &str,
) -> Result<Planned, RebalanceError> {
    use crate::ops::balance::{plan_map, MoveBatch};
    let id = format!("rebalance_map_to_{}", opts.to);
    let derr = |what: &str, e: tokio_postgres::Error| RebalanceError::Directory {
        shard: dir_name.to_owned(),
        what: what.to_owned(),
        message: error_text(&e),
    };
    let kept: Option<(i32, Option<String>)> = dir
        .query_opt(
            "SELECT from_shards, plan FROM reshard.rebalance WHERE id = $1 AND state <> 'done'",
            &[&id],
        )
        .await
        .map_err(|e| derr("reading reshard.rebalance", e))?
        .map(|r| (r.get(0), r.get(1)));
    let (from_shards, batches): (usize, Vec<MoveBatch>) = match kept {
        Some((from, Some(text))) => {
            let batches = serde_json::from_str(&text).map_err(|e| RebalanceError::Directory {
                shard: dir_name.to_owned(),
                what: format!("reading the kept plan of {id} in reshard.rebalance.plan"),
                message: format!(
                    "{e}: delete that row to plan again from the shards' present state"
                ),
            })?;
            tracing::info!(%id, "rebalance: resuming the plan kept in reshard.rebalance on shard {dir_name}");
            (usize::try_from(from).unwrap_or(0), batches)
        }
        _ => {
            let plan = plan_map(
                config,
                opts.to,
                grow::DEFAULT_RATE_ROWS_PER_SEC,
                opts.tolerance_pct,
            )
            .await?;
            (plan.from_shards, plan.batches())
        }
    };
    let text = serde_json::to_string(&batches).map_err(|e| RebalanceError::Directory {
        shard: dir_name.to_owned(),
        what: "encoding the plan".into(),
        message: e.to_string(),
    })?;
    dir.execute(
        "INSERT INTO reshard.rebalance (id, from_shards, to_shards, state, moves_total, plan) \
         VALUES ($1, $2, $3, 'running', $4, $5) \
         ON CONFLICT (id) DO UPDATE SET plan = EXCLUDED.plan, from_shards = EXCLUDED.from_shards, \
           moves_total = EXCLUDED.moves_total",
        &[
            &id,
            &i32::try_from(from_shards).unwrap_or(i32::MAX),
            &i32::try_from(opts.to).unwrap_or(i32::MAX),
            &i32::try_from(batches.len()).unwrap_or(i32::MAX),
            &text,
        ],
    )
    .await
    .map_err(|e| derr("keeping the plan in reshard.rebalance", e))?;
    let (rows_total, bytes_total) = batches
        .iter()
        .fold((0, 0), |(r, b), m| (r + m.rows, b + m.bytes));
    let parts = batches
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let selector = Selector::Accounts(b.accounts.clone());
            Part {
                report: PartReport {
                    remainder: i,
                    what: selector.describe(),
                    accounts: b.accounts,
                    from: b.from,
                    to: b.to,
                    rows_planned: b.rows,
                    bytes_planned: b.bytes,
                    report: None,
                    error: None,
                },
                selector,
            }
        })
        .collect();
    let layout = match &config.routing.map {
        Some(path) => format!("the account map {}", path.display()),
        None => "the account directory ([routing] map_query)".into(),
    };
    Ok(Planned {
        id,
        from_shards,
        parts,
        rows_total,
        bytes_total,
        layout,
        shards: config.shard_names().into_iter().take(opts.to).collect(),
        config: String::new(),
        map: true,
    })
}

/// Runs (or resumes) a rebalance; see the module doc.
pub async fn run_rebalance(
    config: &Config,
    opts: &RebalanceOptions,
) -> Result<RebalanceReport, RebalanceError> {
    let started = Instant::now();
    check(config, opts.to)?;
    // Each shard of the grown layout is its own database (a typo in a new shard's url would
    // copy its range into an old shard's database), before anything is written.
    let new = opts.to.saturating_sub(config.shards.len());
    crate::pg::distinct::prove(&crate::pg::distinct::entries(config, new), None)
        .await
        .map_err(|e| RebalanceError::Plan(GrowError::Distinct(e)))?;
    let (dir_name, _) = directory(config)?;
    let dir_name = dir_name.to_owned();
    let dir = directory_client(config).await?;
    let planned = if config.routing.hash == HashKind::Map {
        plan_accounts(config, opts, &dir, &dir_name).await?
    } else {
        plan_hash(config, opts.to, &dir_name).await?
    };
    let Planned {
        id,
        from_shards: n,
        parts,
        rows_total,
        bytes_total,
        layout,
        shards,
        config: text,
        map,
    } = planned;
    let derr = |what: &'static str| {
        let shard = dir_name.clone();
        move |e: tokio_postgres::Error| RebalanceError::Directory {
            shard,
            what: what.into(),
            message: error_text(&e),
        }
    };
    let total = parts.len();
    let (from_i, to_i, total_i) = (
        i32::try_from(n).unwrap_or(i32::MAX),
        i32::try_from(opts.to).unwrap_or(i32::MAX),
        i32::try_from(total).unwrap_or(i32::MAX),
    );
    dir.execute(
        "INSERT INTO reshard.rebalance (id, from_shards, to_shards, state, moves_total, rows_planned, bytes_planned) \
         VALUES ($1, $2, $3, 'running', $4, $5, $6) \
         ON CONFLICT (id) DO UPDATE SET state = 'running', moves_done = 0, rows_done = 0, \
           moves_total = EXCLUDED.moves_total, \
           rows_planned = EXCLUDED.rows_planned, bytes_planned = EXCLUDED.bytes_planned, \
           updated_at = clock_timestamp()",
        &[&id, &from_i, &to_i, &total_i, &rows_total, &bytes_total],
    )
    .await
    .map_err(derr("recording the rebalance"))?;
    tracing::info!(%id, moves = total, rows = rows_total, bytes = bytes_total, parallel = opts.parallel, "rebalance: started ({n} shards to {}); the application routes by {layout}", opts.to);

    let progress = Arc::new(Mutex::new(Progress::default()));
    let ticker = {
        let progress = progress.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let (done, rows, bytes) = {
                    let p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    (p.done, p.rows_done, p.bytes_done)
                };
                let eta = if rows > 0 && rows < rows_total {
                    let secs =
                        t0.elapsed().as_secs_f64() * (rows_total - rows) as f64 / rows as f64;
                    format!("{secs:.0}s")
                } else {
                    "unknown".into()
                };
                tracing::info!(%id, "rebalance progress: {done}/{total} moves done, {rows}/{rows_total} rows, {bytes}/{bytes_total} bytes, ETA {eta}");
            }
        })
    };

    // Never two moves onto one target at once: the moves of one target run one after the
    // other (a hash growth has one per target), the targets `--parallel` at once.
    let mut by_target: Vec<Vec<Part>> = Vec::new();
    for part in parts {
        match by_target
            .iter_mut()
            .find(|c| c[0].report.to == part.report.to)
        {
            Some(chain) => chain.push(part),
            None => by_target.push(vec![part]),
        }
    }
    let one = |part: Part| {
        let progress = progress.clone();
        let dir = &dir;
        let id = &id;
        async move {
            let Part {
                report: part,
                selector,
            } = part;
            let mo = MoveOptions {
                selector,
                from: part.from.clone(),
                to: part.to.clone(),
                timeout: opts.timeout,
                delete_grace: opts.delete_grace,
                max_rows_per_sec: opts.max_rows_per_sec,
            };
            let r = run_move(config, &mo).await;
            if let Ok(rep) = &r {
                // Absolute values (this run's plan): a resumed rebalance counts again from 0.
                let (done, rows) = {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    if rep.step == Step::Done {
                        p.done += 1;
                        p.rows_done += part.rows_planned;
                        p.bytes_done += part.bytes_planned;
                    }
                    (i32::try_from(p.done).unwrap_or(i32::MAX), p.rows_done)
                };
                if let Err(e) = dir
                    .execute(
                        "UPDATE reshard.rebalance SET moves_done = $2, rows_done = $3, \
                         updated_at = clock_timestamp() WHERE id = $1",
                        &[id, &done, &rows],
                    )
                    .await
                {
                    tracing::warn!(%id, "rebalance: recording progress in reshard.rebalance: {}", error_text(&e));
                }
            }
            (part, r)
        }
    };
    let results: Vec<(PartReport, Result<MoveReport, MoveError>)> =
        futures_util::stream::iter(by_target.into_iter().map(|chain| {
            let one = &one;
            async move {
                let mut out = Vec::with_capacity(chain.len());
                for part in chain {
                    let (part, r) = one(part).await;
                    let failed = r.is_err();
                    out.push((part, r));
                    if failed {
                        // The target's later moves wait for this one: run the command again.
                        break;
                    }
                }
                out
            }
        }))
        .buffer_unordered(opts.parallel.max(1))
        .flat_map(futures_util::stream::iter)
        .collect()
        .await;
    ticker.abort();

    let mut report = RebalanceReport {
        id: id.clone(),
        from_shards: n,
        to_shards: opts.to,
        moves_done: 0,
        moves_total: total,
        rows_to_move: rows_total,
        bytes_to_move: bytes_total,
        rows_copied: 0,
        rows_streamed: 0,
        rows_deleted: 0,
        secs: 0.0,
        layout,
        map,
        shards,
        config: text,
        moves: Vec::new(),
    };
    let mut first_error = None;
    for (mut part, r) in results {
        match r {
            Ok(rep) => {
                report.moves_done += usize::from(rep.step == Step::Done);
                report.rows_copied += rep.rows_copied;
                report.rows_streamed += rep.rows_streamed;
                report.rows_deleted += rep.rows_deleted;
                part.report = Some(rep);
            }
            Err(e) => {
                part.error = Some(e.to_string());
                if first_error.is_none() {
                    first_error = Some((part.what.clone(), part.from.clone(), part.to.clone(), e));
                }
            }
        }
        report.moves.push(part);
    }
    report.moves.sort_by_key(|p| p.remainder);
    report.secs = started.elapsed().as_secs_f64();
    // A run that ends with a move not done is over: `status` says so (refused: a move was
    // refused before it began; failed: one stopped), not `running`. A later run resumes it.
    let end_state = match &first_error {
        Some((.., e)) if refused(e) => "refused",
        Some(_) => "failed",
        None => "running",
    };
    let done_i = i32::try_from(report.moves_done).unwrap_or(i32::MAX);
    let rows_done = progress.lock().unwrap_or_else(|e| e.into_inner()).rows_done;
    dir.execute(
        "UPDATE reshard.rebalance SET moves_done = $2, rows_done = $3, \
           state = CASE WHEN $2 = moves_total THEN 'done' ELSE $4 END, \
           updated_at = clock_timestamp() WHERE id = $1",
        &[&id, &done_i, &rows_done, &end_state],
    )
    .await
    .map_err(derr("recording the rebalance's end"))?;
    if let Some((what, from, to, e)) = first_error {
        return Err(RebalanceError::Move {
            what,
            from,
            to,
            done: report.moves_done,
            total,
            cause: Box::new(e),
            report: Box::new(report),
        });
    }
    tracing::info!(%id, secs = report.secs, "rebalance: done: {} shards", opts.to);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n: usize, new: usize) -> Config {
        let mut s = "[source]\nurl = \"host=x\"\n[routing]\nhash = \"postgres\"\n".to_owned();
        for i in 0..n {
            s.push_str(&format!(
                "[[shards]]\nname = \"s{i}\"\nurl = \"host=y{i}\"\n"
            ));
        }
        for i in n..n + new {
            s.push_str(&format!(
                "[[new_shards]]\nname = \"s{i}\"\nurl = \"host=y{i}\"\n"
            ));
        }
        toml::from_str(&s).expect("config")
    }

    #[test]
    fn growing_needs_the_new_shards_in_the_config() {
        let e = check(&config(2, 1), 4).unwrap_err();
        assert!(matches!(e, RebalanceError::Usage(_)), "{e}");
        assert!(e.to_string().contains("needs 2 [[new_shards]]"), "{e}");
        assert!(e.to_string().contains("new_shards"), "{e}");
        assert!(check(&config(2, 2), 4).is_ok());
        assert!(check(&config(2, 4), 3).is_err());
    }

    #[test]
    fn the_final_layout_lists_old_then_new_shards() {
        let (names, text) = final_config(&config(2, 3), 4);
        assert_eq!(names, ["s0", "s1", "s2", "s3"]);
        assert_eq!(text.matches("[[shards]]").count(), 4);
        assert!(text.contains("name = \"s3\"\nurl = \"host=y3\""), "{text}");
    }
}
