//! Moving accounts between two live shards (`reshard move --accounts A,B --from S --to T`,
//! `hash = "map"` topologies).
//!
//! In: the config, the accounts, the shard that holds them and the shard that gets them. Out: a
//! [`MoveReport`]; afterwards T holds the accounts' rows, S none of them, the map sends them to
//! T, and S refuses their writes.
//!
//! Steps, each recorded in `reshard.move` on T (one row per move, [`Step`]) before the next
//! starts:
//! 1. `started`: the accounts are checked against the map (each on S) and T (no rows of them).
//! 2. `copied`: a publication on S for the sharded tables, row-filtered to the accounts
//!    (PostgreSQL 15+), and a logical slot with an exported snapshot; the accounts' rows are
//!    copied from that snapshot into T in ONE transaction on T that also records the step, so
//!    a crash leaves either no copy or the whole copy (a slot left without a copy is dropped
//!    and created again).
//! 3. `caught_up`: the slot streams the accounts' later changes into T through a side stream
//!    ([`crate::runtime::side`]: spill log, batched apply, its progress row `move:<id>` on T in
//!    the same transaction, so exactly once); the accounts are fenced on S
//!    ([`fence::FenceRule::Accounts`], SQLSTATE `RSF01`); a marker
//!    (`pg_logical_emit_message`) gives S's present; once T applied up to it, the stream stops.
//! 4. `verified`: per table and account, S and T hold the same rows (count and row-hash sum,
//!    the verify's digest). A difference stops here (exit 1), the accounts stay fenced.
//! 5. `flipped`: a fence an earlier move of the accounts away from T left there stops
//!    refusing them; the map file sends the accounts to T (rewritten atomically, read back),
//!    or, for a map read with `map_query`, `[routing] map_update` flips them in the directory
//!    on the source (the query is read back; a new move without `map_update` is refused).
//! 6. `deleted`: once `--delete-grace` has passed since the flip (the application's readers
//!    have the new map: until then a stale UPDATE or DELETE on S matches rows and the fence
//!    refuses it; after the delete it would match nothing), the accounts' rows are deleted
//!    from S in batches of [`DELETE_BATCH_ROWS`] (one transaction each, through the fence with
//!    `session_replication_role = replica`).
//! 7. `done`: the slot and the publication on S are dropped, the local spill log removed.
//!
//! Why the record lives on T: T holds the copy and the stream's progress row; the copy and the
//! step that says it happened commit together there, and T is what the move builds. A lost
//! local disk costs only the stream's spill log (the start-up proof then refuses, naming it).
//!
//! The fence stays on S after the move, as after a fenced cutover: a writer that still has the
//! old map gets `RSF01` instead of writing rows S no longer owns (the fence is named after the
//! move, in `reshard.fence` on S).
//!
//! Every step is idempotent: `reshard move` run again with the same accounts, after a crash at
//! any point, finds the row and resumes at its step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, HashKind, TableMode};
use crate::error::{Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::ops::fence::{self, FenceError, FenceSide, FenceSpec};
use crate::ops::verify::sql::{account_aggregates, key_in};
use crate::ops::{connect, EndpointError};
use crate::pg::catalog::CatalogError;
use crate::pg::conn::quote_ident;
use crate::pg::reverse::ORIGIN_PREFIX;
use crate::pg::sql::TableName;
use crate::pg::table::describe_table;
use crate::route::map::csv_with_accounts_on;
use crate::route::refresh::{MapOrigin, MapSource};
use crate::route::{self, AccountMap, RouteError, RouteSpec};
use crate::runtime::side::{SideError, SideSpec, SideStream};
use crate::source::{ConnConfig, ReplicationClient, SlotOptions, SnapshotAction, SourceError};

/// Rows deleted from the old shard per transaction.
pub const DELETE_BATCH_ROWS: i64 = 5000;
/// How often the wait for the target looks at the stream.
const POLL: Duration = Duration::from_millis(100);
/// How often a wait says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Where a move stands (`reshard.move.step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Recorded; nothing copied yet.
    Started,
    /// The accounts' rows are on the target as of the slot's snapshot.
    Copied,
    /// Fenced on the old shard; the target applied every change up to the marker.
    CaughtUp,
    /// Both shards hold the same rows of the accounts.
    Verified,
    /// The map sends the accounts to the target.
    Flipped,
    /// The old shard holds no row of the accounts.
    Deleted,
    /// Slot and publication dropped.
    Done,
}

impl Step {
    /// snake_case label (what the table stores).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Copied => "copied",
            Step::CaughtUp => "caught_up",
            Step::Verified => "verified",
            Step::Flipped => "flipped",
            Step::Deleted => "deleted",
            Step::Done => "done",
        }
    }

    fn parse(s: &str) -> Option<Step> {
        Some(match s {
            "started" => Step::Started,
            "copied" => Step::Copied,
            "caught_up" => Step::CaughtUp,
            "verified" => Step::Verified,
            "flipped" => Step::Flipped,
            "deleted" => Step::Deleted,
            "done" => Step::Done,
            _ => return None,
        })
    }
}

/// Which rows a move takes from the old shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The rows of these accounts (their key's text form; `hash = "map"`).
    Accounts(Vec<String>),
    /// The rows whose key satisfies `satisfies_hash_partition(…, modulus, remainder, key)`
    /// (`hash = "postgres"`, `reshard rebalance`): every account of that hash range, including
    /// accounts created while the move runs.
    HashRemainder {
        /// The new shard count (M).
        modulus: u32,
        /// The new shard's index.
        remainder: u32,
    },
}

impl Selector {
    /// What the move takes, for messages (`accounts 2,3` / `hash remainder 2 of modulus 4`).
    pub fn describe(&self) -> String {
        match self {
            Selector::Accounts(a) => format!("accounts {}", a.join(",")),
            Selector::HashRemainder { modulus, remainder } => {
                format!("hash remainder {remainder} of modulus {modulus}")
            }
        }
    }
}

/// What to move.
#[derive(Clone, Debug)]
pub struct MoveOptions {
    /// The rows to move.
    pub selector: Selector,
    /// The shard that holds them.
    pub from: String,
    /// The shard that gets them.
    pub to: String,
    /// Longest wait for the target to catch up.
    pub timeout: Duration,
    /// How long after the map flip the old shard's rows are deleted: longer than the
    /// application keeps an old map. A stale UPDATE or DELETE that reaches the old shard before
    /// the delete is refused by the fence (it matches rows); after it, it matches nothing and
    /// changes nothing there, silently.
    pub delete_grace: Duration,
    /// Ceiling of the copy's rows per second into the target (`None`: unthrottled). A
    /// rebalance runs one move per target at a time, so this is the per-target ceiling.
    pub max_rows_per_sec: Option<u64>,
}

/// One account's rows in one table, on both shards.
#[derive(Clone, Debug, Serialize)]
pub struct AccountCheck {
    /// Table (its name on the shards).
    pub table: String,
    /// Account.
    pub account: String,
    /// Rows on the old shard.
    pub from_rows: i64,
    /// Rows on the target.
    pub to_rows: i64,
    /// Same rows (count and row-hash sum).
    pub equal: bool,
}

/// What a move did.
#[derive(Clone, Debug, Serialize)]
pub struct MoveReport {
    /// The move's id (also its slot, publication and fence name).
    pub id: String,
    /// Old shard.
    pub from: String,
    /// Target.
    pub to: String,
    /// The accounts (empty for a hash-range move).
    pub accounts: Vec<String>,
    /// What the move takes (`accounts …` or `hash remainder j of modulus M`).
    pub selector: String,
    /// The step it was at when this run started (`None`: a new move, recorded by this run).
    pub resumed_at: Option<Step>,
    /// The step it reached.
    pub step: Step,
    /// Rows copied from the snapshot.
    pub rows_copied: i64,
    /// Seconds the copy took in this run (publication, slot, copy, commit); `None` when an
    /// earlier run copied.
    pub copy_secs: Option<f64>,
    /// Changes the stream applied in this run (inserted + updated + deleted rows).
    pub rows_streamed: u64,
    /// The old shard's marker the target reached.
    pub fence_lsn: Option<Lsn>,
    /// Rows deleted from the old shard.
    pub rows_deleted: i64,
    /// Per table and account.
    pub checks: Vec<AccountCheck>,
    /// Writes of the accounts the fence refused on the old shard so far.
    pub refused: i64,
    /// Seconds this run took.
    pub secs: f64,
}

/// A move could not be done.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Bad arguments or config (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An endpoint could not be reached, or a query on it failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The table set.
    #[error(transparent)]
    Tables(CatalogError),
    /// The map.
    #[error("{0}")]
    Map(#[from] RouteError),
    /// The fence.
    #[error("fencing the accounts on shard {shard}: {source}")]
    Fence {
        /// The old shard.
        shard: String,
        /// Why.
        source: FenceError,
    },
    /// The stream.
    #[error("streaming the accounts' changes from shard {shard}: {source}")]
    Stream {
        /// The old shard.
        shard: String,
        /// Why.
        source: Box<SideError>,
    },
    /// A replication command.
    #[error("on shard {shard}: {source}")]
    Replication {
        /// The old shard.
        shard: String,
        /// Why.
        source: Box<SourceError>,
    },
    /// The target did not catch up in time (exit 1; run it again).
    #[error("shard {to} did not apply shard {from}'s changes up to {target} within {waited_secs:.0}s (it is at {reached}); the accounts stay fenced on {from}; run the same `reshard move` again to resume")]
    Timeout {
        /// Old shard.
        from: String,
        /// Target.
        to: String,
        /// Marker.
        target: Lsn,
        /// Reached.
        reached: Lsn,
        /// Waited.
        waited_secs: f64,
    },
    /// The shards disagree (exit 1).
    #[error("the accounts' rows differ between shard {from} and shard {to}: {detail}; the accounts stay fenced on {from} and the map is unchanged; find the cause, then run the same `reshard move` again (it verifies again)")]
    Mismatch {
        /// Old shard.
        from: String,
        /// Target.
        to: String,
        /// Which table and account.
        detail: String,
    },
    /// Local files.
    #[error("{0}")]
    Io(String),
}

impl Classify for MoveError {
    fn class(&self) -> ErrorClass {
        match self {
            MoveError::Endpoint(e) => e.class(),
            MoveError::Fence { source, .. } => source.class(),
            MoveError::Stream { source, .. } => source.class(),
            MoveError::Timeout { .. } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}

fn qerr(endpoint: &str, what: &str) -> impl Fn(tokio_postgres::Error) -> MoveError {
    let query = EndpointError::query(endpoint, what);
    move |error| MoveError::Endpoint(query(error))
}

const RECORD_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS reshard;
CREATE TABLE IF NOT EXISTS reshard.move (
    id text PRIMARY KEY,
    from_shard text NOT NULL,
    to_shard text NOT NULL,
    accounts text[] NOT NULL,
    from_system_id text,
    step text NOT NULL,
    consistent_lsn pg_lsn,
    fence_lsn pg_lsn,
    rows_copied bigint NOT NULL DEFAULT 0,
    rows_deleted bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    step_at timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// A move's row in `reshard.move`.
#[derive(Clone, Debug)]
struct Record {
    step: Step,
    from_system_id: Option<String>,
    fence_lsn: Option<Lsn>,
    rows_copied: i64,
    rows_deleted: i64,
}

/// The move's id: `move_<from>_<to>_<crc32c of the sorted accounts>`, a valid slot name.
pub fn move_id(from: &str, to: &str, accounts: &[String]) -> String {
    let part = |s: &str| -> String {
        s.chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .take(20)
            .collect()
    };
    let crc = crc32c::crc32c(accounts.join("\n").as_bytes());
    format!("move_{}_{}_{crc:08x}", part(from), part(to))
}

/// The accounts as given: trimmed, sorted, each once.
pub fn normalize_accounts(accounts: &[String]) -> Vec<String> {
    let mut v: Vec<String> = accounts
        .iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// One sharded table: its name on the shards and its key.
#[derive(Clone, Debug)]
struct MovedTable {
    name: TableName,
    key: String,
    key_type: String,
    key_oid: u32,
    columns: Vec<String>,
}

struct Ctx<'a> {
    config: &'a Config,
    opts: &'a MoveOptions,
    id: String,
    accounts: Vec<String>,
    /// `Some((modulus, remainder))` for a hash-range move.
    hash: Option<(u32, u32)>,
    tables: Vec<MovedTable>,
    src: Client,
    from: Client,
    to: Client,
    from_ep: String,
    to_ep: String,
}

/// Runs (or resumes) a move; see the module doc.
/// A move flips the account map under a `reshard run` that still streams from the source; the
/// daemon keeps its map (a refresh never moves an account) and would go on writing the moved
/// accounts' new source rows to the old shard. Refused while its console answers or its slot
/// has a walsender. A source that no longer answers (retired after the cutover) is no daemon.
async fn refuse_while_the_daemon_streams(config: &Config) -> Result<(), MoveError> {
    let src = match ConnConfig::parse(&config.source.url) {
        Ok(c) => tokio::time::timeout(Duration::from_secs(10), c.connect_sql())
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    let daemon = match &src {
        Some(src) => Some(crate::ops::observe::find_daemon(config, src).await),
        None => None,
    };
    if let Some(d) = daemon.filter(|d| d.is_up()) {
        let what = match d {
            crate::ops::observe::Daemon::Answering(_) => "its admin console answers".to_owned(),
            _ => format!("slot {} on the source has a walsender", config.source.slot),
        };
        return Err(MoveError::Usage(format!(
            "reshard run is still streaming from the source ({what}): it would keep routing the \
             moved accounts' new rows to their old shard. Cut every shard over and stop \
             reshard run first, then move"
        )));
    }
    Ok(())
}

pub async fn run_move(config: &Config, opts: &MoveOptions) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let (accounts, hash) = match &opts.selector {
        Selector::Accounts(a) => {
            if config.routing.hash != HashKind::Map {
                return Err(MoveError::Usage(
                    "reshard move needs [routing] hash = \"map\": with hash = \"postgres\" an account's shard is fixed by its hash (grow the layout with reshard rebalance --shards M)".into(),
                ));
            }
            let accounts = normalize_accounts(a);
            if accounts.is_empty() {
                return Err(MoveError::Usage(
                    "no accounts to move: give --accounts 42,77 or --accounts-file".into(),
                ));
            }
            (accounts, None)
        }
        Selector::HashRemainder { modulus, remainder } => {
            if config.routing.hash != HashKind::Postgres || remainder >= modulus {
                return Err(MoveError::Usage(format!(
                    "a hash-range move (remainder {remainder} of modulus {modulus}) needs [routing] hash = \"postgres\" and a remainder below the modulus"
                )));
            }
            (Vec::new(), Some((*modulus, *remainder)))
        }
    };
    let shard_url = |name: &str| {
        config
            .any_shard_url(name)
            .map(str::to_owned)
            .ok_or_else(|| {
                MoveError::Usage(format!(
                    "unknown shard {name:?}; the config's shards are {:?}",
                    config.shard_names()
                ))
            })
    };
    let from_url = shard_url(&opts.from)?;
    let to_url = shard_url(&opts.to)?;
    if opts.from == opts.to {
        return Err(MoveError::Usage(format!(
            "--from and --to are both {}: nothing to move",
            opts.from
        )));
    }
    refuse_while_the_daemon_streams(config).await?;
    let from_ep = format!("shard {}", opts.from);
    let to_ep = format!("shard {}", opts.to);
    let src = connect("source", &config.source.url).await?;
    let from = connect(&from_ep, &from_url).await?;
    let to = connect(&to_ep, &to_url).await?;
    crate::pg::conn::normalize_session(&from)
        .await
        .map_err(qerr(&from_ep, "setting the session"))?;
    crate::pg::conn::normalize_session(&to)
        .await
        .map_err(qerr(&to_ep, "setting the session"))?;
    let id = match hash {
        Some((m, r)) => move_id(&opts.from, &opts.to, &[format!("hash:{m}:{r}")]),
        None => move_id(&opts.from, &opts.to, &accounts),
    };
    let mut ctx = Ctx {
        config,
        opts,
        id,
        accounts,
        hash,
        tables: Vec::new(),
        src,
        from,
        to,
        from_ep,
        to_ep,
    };
    ctx.tables = ctx.moved_tables().await?;
    if ctx.hash.is_some() {
        ctx.ensure_hash_helpers().await?;
    }

    ctx.to
        .batch_execute(&format!(
            "SET client_min_messages = warning; {RECORD_SQL}; RESET client_min_messages"
        ))
        .await
        .map_err(qerr(&ctx.to_ep, "creating reshard.move"))?;
    let existing = ctx.read_record().await?;
    let resumed_at = existing.as_ref().map(|r| r.step);
    let mut record = match existing {
        Some(r) => {
            tracing::info!(id = %ctx.id, step = r.step.as_str(), "move: resuming");
            r
        }
        None => {
            if config.routing.map_query.is_some() && config.routing.map_update.is_none() {
                return Err(MoveError::Usage(format!(
                    "the account map is read with [routing] map_query, and a move must flip the accounts {} to shard {} in the directory that query reads: set [routing] map_update to the statement that does it ($1 = the accounts as text[], $2 = the target shard), e.g. map_update = \"UPDATE account_shards SET shard = $2 WHERE account_id = ANY($1::bigint[])\". Nothing was copied or fenced",
                    ctx.accounts.join(","),
                    opts.to
                )));
            }
            ctx.check_new().await?;
            ctx.to
                .execute(
                    "INSERT INTO reshard.move (id, from_shard, to_shard, accounts, step) VALUES ($1, $2, $3, $4, 'started')",
                    &[&ctx.id, &opts.from, &opts.to, &ctx.accounts],
                )
                .await
                .map_err(qerr(&ctx.to_ep, "recording the move in reshard.move"))?;
            tracing::info!(id = %ctx.id, from = %opts.from, to = %opts.to, rows = %opts.selector.describe(), "move: started");
            Record {
                step: Step::Started,
                from_system_id: None,
                fence_lsn: None,
                rows_copied: 0,
                rows_deleted: 0,
            }
        }
    };
    let mut report = MoveReport {
        id: ctx.id.clone(),
        from: opts.from.clone(),
        to: opts.to.clone(),
        accounts: ctx.accounts.clone(),
        selector: opts.selector.describe(),
        resumed_at,
        step: record.step,
        rows_copied: 0,
        copy_secs: None,
        rows_streamed: 0,
        fence_lsn: None,
        rows_deleted: 0,
        checks: Vec::new(),
        refused: 0,
        secs: 0.0,
    };

    if record.step == Step::Started {
        let copy_started = Instant::now();
        ctx.copy().await?;
        report.copy_secs = Some(copy_started.elapsed().as_secs_f64());
        crash_point("copied");
        record = ctx.must_record().await?;
    }
    if record.step == Step::Copied {
        let (lsn, streamed) = ctx.stream_fence_wait(&record).await?;
        report.rows_streamed = streamed;
        ctx.set_step(Step::CaughtUp, Some(lsn)).await?;
        crash_point("caught_up");
        record = ctx.must_record().await?;
    }
    if record.step == Step::CaughtUp {
        // The fence stands (it is only lifted by `reshard unfence`): make sure, since the
        // comparison is only proof while nothing writes the accounts on the old shard.
        ctx.fence().await?;
        report.checks = ctx.compare().await?;
        ctx.set_step(Step::Verified, None).await?;
        crash_point("verified");
        record = ctx.must_record().await?;
    }
    if record.step == Step::Verified {
        ctx.unfence_on_target().await?;
        ctx.flip_map().await?;
        ctx.set_step(Step::Flipped, None).await?;
        crash_point("flipped");
        record = ctx.must_record().await?;
    }
    if record.step == Step::Flipped {
        ctx.grace().await?;
        ctx.delete_from_old().await?;
        ctx.set_step(Step::Deleted, None).await?;
        crash_point("deleted");
        record = ctx.must_record().await?;
    }
    if record.step == Step::Deleted {
        ctx.drop_slot().await?;
        crash_point("slot_dropped");
        ctx.set_step(Step::Done, None).await?;
        record = ctx.must_record().await?;
    }
    report.step = record.step;
    report.rows_copied = record.rows_copied;
    report.rows_deleted = record.rows_deleted;
    report.fence_lsn = record.fence_lsn;
    report.refused = fence::status(&ctx.from, FenceSide::Shard)
        .await
        .map_err(|source| MoveError::Fence {
            shard: opts.from.clone(),
            source,
        })?
        .iter()
        .find(|f| f.shard == ctx.id)
        .map_or(0, |f| f.refused);
    report.secs = started.elapsed().as_secs_f64();
    tracing::info!(id = %ctx.id, secs = report.secs, "move: done");
    Ok(report)
}

impl Ctx<'_> {
    /// The sharded tables (the source's catalog decides, as for every command), described on
    /// the old shard (their names there).
    async fn moved_tables(&self) -> Result<Vec<MovedTable>, MoveError> {
        let set = crate::pg::catalog::discover(&self.src, self.config)
            .await
            .map_err(MoveError::Tables)?;
        let mut out = Vec::new();
        for t in set
            .into_iter()
            .filter(|t| t.rule.mode == TableMode::Sharded)
        {
            let name = t.rule.target.clone();
            let info = describe_table(&self.from, &name)
                .await
                .map_err(qerr(&self.from_ep, "describing a table"))?
                .ok_or_else(|| {
                    MoveError::Usage(crate::pg::catalog::missing_on_shard(&name, &self.opts.from))
                })?;
            let key = info.column(&t.rule.key).ok_or_else(|| {
                MoveError::Usage(format!(
                    "table {name} on shard {} has no column {} (its shard key)",
                    self.opts.from, t.rule.key
                ))
            })?;
            out.push(MovedTable {
                key: t.rule.key.clone(),
                key_type: key.type_name.clone(),
                key_oid: key.type_oid,
                columns: info
                    .columns
                    .iter()
                    .filter(|c| !c.generated)
                    .map(|c| c.name.clone())
                    .collect(),
                name,
            });
        }
        if out.is_empty() {
            return Err(MoveError::Usage(
                "the config has no sharded table: nothing to move".into(),
            ));
        }
        Ok(out)
    }

    /// The moved rows of `t`, as an SQL condition (the same text on both shards: a hash
    /// range names its helper by regclass, created on both by [`Ctx::ensure_hash_helpers`]).
    fn filter(&self, t: &MovedTable) -> String {
        match self.hash {
            None => key_in(&t.key, &t.key_type, &self.accounts),
            Some((m, r)) => {
                let k = quote_ident(&t.key);
                format!(
                    "{k} IS NOT NULL AND satisfies_hash_partition({}::regclass, {m}, {r}, {k})",
                    crate::pg::conn::quote_literal(&fence::hash_helper_name(t.key_oid))
                )
            }
        }
    }

    /// A hash-range move: the hash-partitioned helper of each key type (the fence's own, see
    /// [`fence::hash_helper_name`]) on both shards, so the filter reads the same on both.
    async fn ensure_hash_helpers(&self) -> Result<(), MoveError> {
        for (c, ep) in [(&self.from, &self.from_ep), (&self.to, &self.to_ep)] {
            for t in &self.tables {
                c.batch_execute(&format!(
                    "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS reshard; \
                     CREATE TABLE IF NOT EXISTS {} (k {}) PARTITION BY HASH (k); RESET client_min_messages",
                    fence::hash_helper_name(t.key_oid),
                    t.key_type
                ))
                .await
                .map_err(qerr(ep, "creating the hash routing helper"))?;
            }
        }
        Ok(())
    }

    async fn read_record(&self) -> Result<Option<Record>, MoveError> {
        let row = self
            .to
            .query_opt(
                "SELECT step, from_system_id, fence_lsn::text, rows_copied, rows_deleted FROM reshard.move WHERE id = $1",
                &[&self.id],
            )
            .await
            .map_err(qerr(&self.to_ep, "reading reshard.move"))?;
        let Some(r) = row else {
            return Ok(None);
        };
        let step: String = r.get(0);
        let fence_lsn: Option<String> = r.get(2);
        Ok(Some(Record {
            step: Step::parse(&step).ok_or_else(|| {
                MoveError::Usage(format!(
                    "reshard.move on shard {} has step {step:?} for move {}, which this reshard does not know",
                    self.opts.to, self.id
                ))
            })?,
            from_system_id: r.get(1),
            fence_lsn: fence_lsn.and_then(|l| l.parse().ok()),
            rows_copied: r.get(3),
            rows_deleted: r.get(4),
        }))
    }

    async fn must_record(&self) -> Result<Record, MoveError> {
        self.read_record().await?.ok_or_else(|| {
            MoveError::Usage(format!(
                "the row of move {} in reshard.move on shard {} vanished",
                self.id, self.opts.to
            ))
        })
    }

    async fn set_step(&self, step: Step, fence_lsn: Option<Lsn>) -> Result<(), MoveError> {
        let lsn = fence_lsn.map(|l| l.to_string());
        self.to
            .execute(
                "UPDATE reshard.move SET step = $2, step_at = clock_timestamp(), \
                   fence_lsn = COALESCE($3::text::pg_lsn, fence_lsn) WHERE id = $1",
                &[&self.id, &step.as_str(), &lsn],
            )
            .await
            .map_err(qerr(&self.to_ep, "recording the move's step"))?;
        tracing::info!(id = %self.id, step = step.as_str(), "move: step done");
        Ok(())
    }

    /// A new move: every account is on `--from` by the map, and the target has none of its rows.
    async fn check_new(&self) -> Result<(), MoveError> {
        let map = if self.hash.is_none() {
            Some(self.load_map().await?)
        } else {
            None
        };
        let key_oid = self.tables.first().map_or(25, |t| t.key_oid);
        for (a, map) in self
            .accounts
            .iter()
            .filter_map(|a| Some((a, map.as_ref()?)))
        {
            let shard = match map.shard_of_text(key_oid, a.as_bytes()) {
                Ok(s) => map.shards()[s.0 as usize].clone(),
                Err(_) if map.default_shard().is_some() => {
                    map.default_shard().unwrap_or_default().to_owned()
                }
                Err(e) => {
                    return Err(MoveError::Usage(format!(
                        "account {a} is not in the account map ({e}); check the account id"
                    )))
                }
            };
            if shard != self.opts.from {
                return Err(MoveError::Usage(format!(
                    "account {a} is on shard {shard} by the account map, not on --from {}",
                    self.opts.from
                )));
            }
        }
        for t in &self.tables {
            let n: i64 = self
                .to
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} WHERE {}",
                        t.name.quoted(),
                        self.filter(t)
                    ),
                    &[],
                )
                .await
                .map_err(qerr(&self.to_ep, "looking for the accounts' rows"))?
                .get(0);
            if n > 0 {
                return Err(MoveError::Usage(format!(
                    "shard {} already holds {n} rows of the accounts in {}; a move copies into a shard that has none of them (delete them there first, or move other accounts)",
                    self.opts.to, t.name
                )));
            }
        }
        Ok(())
    }

    async fn load_map(&self) -> Result<AccountMap, MoveError> {
        let source =
            MapSource::from_config(self.config)?.ok_or_else(route::refresh::no_map_configured)?;
        Ok(source.load(&mut None).await?)
    }

    /// Step 2: publication + slot on the old shard, the copy from its snapshot into the target.
    async fn copy(&self) -> Result<(), MoveError> {
        let from_conn = ConnConfig::parse(&self.shard_url(&self.opts.from))
            .map_err(|e| EndpointError::connect(&self.from_ep, e))?;
        let mut repl = ReplicationClient::connect(&from_conn)
            .await
            .map_err(|source| self.repl_err(source))?;
        if repl.server_version_num() < 150_000 {
            return Err(MoveError::Usage(format!(
                "shard {} runs PostgreSQL {}: a move needs row-filtered publications (PostgreSQL 15 or later) on the shard it moves from",
                self.opts.from,
                repl.server_version_num() / 10_000
            )));
        }
        let system = repl
            .identify_system()
            .await
            .map_err(|source| self.repl_err(source))?;
        // A row filter on a publication of UPDATEs and DELETEs must use replica identity
        // columns: published without the key in the identity, the shard itself would refuse
        // the application's UPDATEs and DELETEs on the table. Checked before anything exists.
        for t in &self.tables {
            let info = crate::pg::table::describe_table(&self.from, &t.name)
                .await
                .map_err(qerr(&self.from_ep, "reading the table's replica identity"))?;
            let Some(info) = info else { continue };
            match crate::pg::identity::key_strategy(&info, &t.key, false) {
                Ok(crate::pg::identity::KeyStrategy::InIdentity)
                | Ok(crate::pg::identity::KeyStrategy::Full) => {}
                Ok(_) => {
                    return Err(MoveError::Usage(format!(
                        "table {} on shard {} has no replica identity: a publication would make the shard refuse its UPDATEs and DELETEs; give it a primary key (or REPLICA IDENTITY FULL) first",
                        t.name, self.opts.from
                    )))
                }
                Err(e) => {
                    return Err(MoveError::Usage(format!(
                        "on shard {} (the move's row filter needs the key in the replica identity, else the shard would refuse the application's UPDATEs and DELETEs of the table): {e}",
                        self.opts.from
                    )))
                }
            }
        }
        // A slot left by a run that crashed before its copy committed: nothing used it.
        self.drop_slot().await?;
        let list: Vec<String> = self
            .tables
            .iter()
            .map(|t| format!("{} WHERE ({})", t.name.quoted(), self.filter(t)))
            .collect();
        // publish_via_partition_root: a row filter on a partitioned table needs it (S is 15+),
        // and the changes then carry the table's own name, as the copy does.
        self.from
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete', publish_via_partition_root = true)",
                quote_ident(&self.id),
                list.join(", ")
            ))
            .await
            .map_err(qerr(
                &self.from_ep,
                "creating the move's row-filtered publication",
            ))?;
        let info = repl
            .create_slot(
                &self.id,
                SlotOptions {
                    snapshot: SnapshotAction::Export,
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| self.repl_err(source))?;
        crash_point("slot_created");
        let snapshot = info.snapshot_name.clone().unwrap_or_default();
        tracing::info!(id = %self.id, slot = %self.id, consistent_point = %info.consistent_point, "move: slot created on shard {}", self.opts.from);

        // The copy connection imports the snapshot before anything else runs on `repl`.
        let reader = connect(&self.from_ep, &self.shard_url(&self.opts.from)).await?;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::pg::conn::quote_literal(&snapshot)
            ))
            .await
            .map_err(qerr(&self.from_ep, "importing the slot's snapshot"))?;
        let writer = connect(&self.to_ep, &self.shard_url(&self.opts.to)).await?;
        let role = if self.config.apply.session_replication_role_replica {
            "SET LOCAL session_replication_role = replica"
        } else {
            "SELECT 1"
        };
        writer
            .batch_execute(&format!("BEGIN; {role}"))
            .await
            .map_err(qerr(&self.to_ep, "starting the copy transaction"))?;
        let mut rows = 0i64;
        let throttle = self
            .opts
            .max_rows_per_sec
            .map(|r| crate::snapshot::Throttle::new(Some(r), None));
        for t in &self.tables {
            let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
            let cols = cols.join(", ");
            let out = reader
                .copy_out(&format!(
                    "COPY (SELECT {cols} FROM {} WHERE {}) TO STDOUT",
                    t.name.quoted(),
                    self.filter(t)
                ))
                .await
                .map_err(qerr(&self.from_ep, "reading the accounts' rows"))?;
            let sink = writer
                .copy_in::<_, Bytes>(&format!("COPY {} ({cols}) FROM STDIN", t.name.quoted()))
                .await
                .map_err(qerr(&self.to_ep, "copying the accounts' rows"))?;
            let mut out = std::pin::pin!(out);
            let mut sink = std::pin::pin!(sink);
            while let Some(part) = out.next().await {
                let part = part.map_err(qerr(&self.from_ep, "reading the accounts' rows"))?;
                // One COPY data message is one row.
                if let Some(t) = &throttle {
                    t.acquire(1, part.len() as u64).await;
                }
                // `feed`, not `send`: no flush (a round trip) per row; `finish` flushes.
                sink.feed(part)
                    .await
                    .map_err(qerr(&self.to_ep, "copying the accounts' rows"))?;
            }
            let n = sink
                .finish()
                .await
                .map_err(qerr(&self.to_ep, "copying the accounts' rows"))?;
            rows += i64::try_from(n).unwrap_or(i64::MAX);
            tracing::info!(id = %self.id, table = %t.name, rows = n, "move: copied");
        }
        let lsn = info.consistent_point.to_string();
        writer
            .execute(
                "UPDATE reshard.move SET step = 'copied', step_at = clock_timestamp(), \
                   consistent_lsn = $2::text::pg_lsn, from_system_id = $3, rows_copied = $4 WHERE id = $1",
                &[&self.id, &lsn, &system.system_id, &rows],
            )
            .await
            .map_err(qerr(&self.to_ep, "recording the copy"))?;
        writer
            .batch_execute("COMMIT")
            .await
            .map_err(qerr(&self.to_ep, "committing the copy"))?;
        reader
            .batch_execute("COMMIT")
            .await
            .map_err(qerr(&self.from_ep, "ending the snapshot"))?;
        drop(repl);
        tracing::info!(id = %self.id, rows, "move: the accounts' rows are on shard {} as of {}", self.opts.to, info.consistent_point);
        Ok(())
    }

    fn shard_url(&self, name: &str) -> String {
        self.config
            .any_shard_url(name)
            .map(str::to_owned)
            .unwrap_or_default()
    }

    fn repl_err(&self, source: SourceError) -> MoveError {
        MoveError::Replication {
            shard: self.opts.from.clone(),
            source: Box::new(source),
        }
    }

    fn dir(&self) -> PathBuf {
        self.config.spill.dir.join("move").join(&self.id)
    }

    async fn fence(&self) -> Result<(), MoveError> {
        let ferr = |source| MoveError::Fence {
            shard: self.opts.from.clone(),
            source,
        };
        let reason = format!(
            "move of {} from {} to {}",
            self.opts.selector.describe(),
            self.opts.from,
            self.opts.to
        );
        let spec = match self.hash {
            None => FenceSpec::for_accounts(
                self.config,
                &self.src,
                &self.opts.from,
                &self.id,
                &reason,
                &self.accounts,
            )
            .await
            .map_err(ferr)?,
            Some((modulus, remainder)) => FenceSpec::for_hash_range(
                self.config,
                &self.src,
                &self.opts.from,
                &self.id,
                &reason,
                modulus,
                remainder,
            )
            .await
            .map_err(ferr)?,
        };
        let mut c = connect(&self.from_ep, &self.shard_url(&self.opts.from)).await?;
        fence::install(&mut c, &spec).await.map_err(ferr)?;
        Ok(())
    }

    /// Step 3: stream, fence, marker, wait, stop. Returns the marker and the rows streamed.
    async fn stream_fence_wait(&self, record: &Record) -> Result<(Lsn, u64), MoveError> {
        let serr = |e: SideError| MoveError::Stream {
            shard: self.opts.from.clone(),
            source: Box::new(e),
        };
        let conn = |name: &str, ep: &str| {
            ConnConfig::parse(&self.shard_url(name))
                .map_err(|e| MoveError::from(EndpointError::connect(ep, e)))
        };
        let spec = SideSpec {
            shard: self.opts.from.clone(),
            shard_conn: conn(&self.opts.from, &self.from_ep)?,
            shard_system_id: record.from_system_id.clone().unwrap_or_default(),
            slot: self.id.clone(),
            publication: self.id.clone(),
            slot_missing_advice: format!(
                "the accounts' changes since the copy can no longer reach shard {}; delete the accounts' rows on {} (nothing else holds them there), DELETE FROM reshard.move WHERE id = '{}' on {}, and run the move again",
                self.opts.to, self.opts.to, self.id, self.opts.to
            ),
            dir: self.dir(),
            target_conn: conn(&self.opts.to, &self.to_ep)?,
            progress_shard: format!("move:{}", self.id),
            route: RouteSpec {
                shards: vec![self.opts.to.clone()],
                tables: self
                    .tables
                    .iter()
                    .map(|t| {
                        (
                            t.name.clone(),
                            route::TableRule {
                                mode: route::TableMode::Broadcast,
                                target: None,
                            },
                        )
                    })
                    .collect(),
                default_key: self.config.routing.key.clone(),
                hash: route::HashKind::Postgres,
                unlisted: route::Unlisted::Skip,
            },
            table_map: Default::default(),
            origin: format!("{ORIGIN_PREFIX}{}", self.id),
            kind: "move",
            row_owner: None,
        };
        let stream = SideStream::start(self.config, spec).await.map_err(serr)?;
        let r = self.fence_and_wait(&stream).await;
        let status = stream.status();
        let stopped = stream.stop().await.map_err(serr);
        let lsn = r?;
        stopped?;
        Ok((
            lsn,
            status.rows_inserted + status.rows_updated + status.rows_deleted,
        ))
    }

    async fn fence_and_wait(&self, stream: &SideStream) -> Result<Lsn, MoveError> {
        self.fence().await?;
        tracing::info!(id = %self.id, "move: the accounts are fenced on shard {}: their writes are refused there from now on", self.opts.from);
        crash_point("fenced");
        let marker: String = self
            .from
            .query_one(
                "SELECT pg_logical_emit_message(true, 'reshard.move', $1)::text",
                &[&self.id],
            )
            .await
            .map_err(qerr(&self.from_ep, "writing the move's marker"))?
            .get(0);
        let target: Lsn = marker.parse().map_err(|e: crate::lsn::ParseLsnError| {
            MoveError::Usage(format!("the marker's LSN {marker:?}: {e}"))
        })?;
        let started = Instant::now();
        let mut next_report = started;
        loop {
            let st = stream.status();
            if st.applied_commit_lsn.covers(target) {
                tracing::info!(id = %self.id, reached = %st.applied_commit_lsn, target = %target, secs = started.elapsed().as_secs_f64(), "move: shard {} caught up", self.opts.to);
                return Ok(target);
            }
            if stream.is_finished() {
                // The stream's own error is returned by its stop.
                return Err(MoveError::Usage(format!(
                    "the move's stream from shard {} stopped before shard {} reached {target}: {}",
                    self.opts.from,
                    self.opts.to,
                    st.last_error.unwrap_or_else(|| "see the log".into())
                )));
            }
            if started.elapsed() >= self.opts.timeout {
                return Err(MoveError::Timeout {
                    from: self.opts.from.clone(),
                    to: self.opts.to.clone(),
                    target,
                    reached: st.applied_commit_lsn,
                    waited_secs: started.elapsed().as_secs_f64(),
                });
            }
            if Instant::now() >= next_report {
                tracing::info!(id = %self.id, "move: waiting up to {}s for shard {} to apply shard {}'s changes of the accounts up to {target}: it is at {}{}",
                    self.opts.timeout.saturating_sub(started.elapsed()).as_secs(), self.opts.to, self.opts.from, st.applied_commit_lsn,
                    st.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default());
                next_report = Instant::now() + REPORT_EVERY;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Step 4: per table and account, the same count and row-hash sum on both shards.
    async fn compare(&self) -> Result<Vec<AccountCheck>, MoveError> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for t in &self.tables {
            let filter = self.filter(t);
            let sql = account_aggregates(&t.name, &t.key, &t.columns, Some(&filter), None);
            let a = digests(&self.from, &self.from_ep, &sql).await?;
            let b = digests(&self.to, &self.to_ep, &sql).await?;
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let (fa, fb) = (a.get(k), b.get(k));
                let equal = fa == fb;
                let check = AccountCheck {
                    table: t.name.to_string(),
                    account: k.clone(),
                    from_rows: fa.map_or(0, |x| x.0),
                    to_rows: fb.map_or(0, |x| x.0),
                    equal,
                };
                if !equal {
                    bad.push(format!(
                        "{} account {}: {} rows on {}, {} on {}{}",
                        t.name,
                        k,
                        check.from_rows,
                        self.opts.from,
                        check.to_rows,
                        self.opts.to,
                        if check.from_rows == check.to_rows {
                            " (same count, different values)"
                        } else {
                            ""
                        }
                    ));
                }
                out.push(check);
            }
        }
        if !bad.is_empty() {
            return Err(MoveError::Mismatch {
                from: self.opts.from.clone(),
                to: self.opts.to.clone(),
                detail: bad.join("; "),
            });
        }
        tracing::info!(id = %self.id, checks = out.len(), "move: verified: both shards hold the same rows of the accounts");
        Ok(out)
    }

    /// Before the flip: an earlier move of these accounts away from the target left a fence
    /// there that refuses them; the target owns them again, so they leave that fence (which is
    /// removed once it refuses no account).
    async fn unfence_on_target(&self) -> Result<(), MoveError> {
        if self.hash.is_some() {
            // A new shard of a rebalance: no earlier move fenced anything there.
            return Ok(());
        }
        let ferr = |source| MoveError::Fence {
            shard: self.opts.to.clone(),
            source,
        };
        let fences = crate::pg::fence::account_fences_of(&self.to, &self.accounts)
            .await
            .map_err(qerr(&self.to_ep, "reading reshard.fence"))?;
        if fences.is_empty() {
            return Ok(());
        }
        let mut c = connect(&self.to_ep, &self.shard_url(&self.opts.to)).await?;
        for f in fences {
            let left: Vec<String> = f
                .accounts
                .iter()
                .filter(|a| !self.accounts.contains(a))
                .cloned()
                .collect();
            if left.is_empty() {
                fence::remove(
                    &mut c,
                    FenceSide::Shard,
                    &f.name,
                    Duration::from_millis(self.config.cutover.fence_lock_timeout_ms),
                )
                .await
                .map_err(ferr)?;
            } else {
                let spec = FenceSpec::for_accounts(
                    self.config,
                    &self.src,
                    &self.opts.to,
                    &f.name,
                    &f.reason,
                    &left,
                )
                .await
                .map_err(ferr)?;
                fence::install(&mut c, &spec).await.map_err(ferr)?;
            }
            tracing::info!(id = %self.id, fence = %f.name, "move: shard {} takes the accounts' writes again (an earlier move's fence no longer refuses them)", self.opts.to);
        }
        Ok(())
    }

    /// Step 5: the map file (or, with `map_query`, the directory through `map_update`) sends
    /// the accounts to the target; read back.
    async fn flip_map(&self) -> Result<(), MoveError> {
        if let Some((modulus, remainder)) = self.hash {
            return crate::ops::rebalance::flip_layout(
                self.config,
                modulus,
                remainder,
                &self.opts.to,
            )
            .await;
        }
        let source =
            MapSource::from_config(self.config)?.ok_or_else(route::refresh::no_map_configured)?;
        if let (MapOrigin::Query { .. }, Some(update)) =
            (&source.origin, &self.config.routing.map_update)
        {
            return self.flip_directory(update).await;
        }
        let MapOrigin::Csv(path) = &source.origin else {
            return Err(MoveError::Usage(format!(
                "the account map is read with [routing] map_query; reshard move flips a map file ([routing] map). Point the accounts {} at shard {} in the account directory yourself, then run the same `reshard move` again after setting reshard.move.step = 'flipped' for move {} on shard {}",
                self.accounts.join(","),
                self.opts.to,
                self.id,
                self.opts.to
            )));
        };
        let key_oid = self.tables.first().map_or(25, |t| t.key_oid);
        let current = self.load_map().await?;
        let on_target = |m: &AccountMap| {
            self.accounts.iter().all(|a| {
                m.shard_of_text(key_oid, a.as_bytes())
                    .ok()
                    .map(|s| m.shards()[s.0 as usize].as_str())
                    == Some(self.opts.to.as_str())
            })
        };
        if !on_target(&current) {
            // Moves of one process (`reshard rebalance --parallel`) rewrite the file one at a
            // time: each reads the map the last one wrote.
            static MAP_FILE: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one_writer = MAP_FILE.lock().unwrap_or_else(|e| e.into_inner());
            let text = std::fs::read_to_string(path).map_err(|e| {
                MoveError::Io(format!("reading the account map {}: {e}", path.display()))
            })?;
            let shards = self.config.shard_names();
            let same = |a: &str, b: &str| {
                let one = AccountMap::from_pairs(&shards, [(a.to_owned(), shards[0].clone())]);
                match one {
                    Ok(m) => m.shard_of_text(key_oid, b.as_bytes()).is_ok(),
                    Err(_) => a == b,
                }
            };
            let new = csv_with_accounts_on(&text, &self.accounts, &self.opts.to, same);
            let tmp = path.with_extension("reshard-move.tmp");
            crate::localfs::replace_file(path, &tmp, new.as_bytes()).map_err(|e| {
                MoveError::Io(format!(
                    "writing the account map {}: {} {}: {}",
                    path.display(),
                    e.op,
                    e.path.display(),
                    e.source
                ))
            })?;
            tracing::info!(id = %self.id, map = %path.display(), "move: the account map sends the accounts to shard {}", self.opts.to);
        }
        let after = self.load_map().await?;
        if !on_target(&after) {
            return Err(MoveError::Io(format!(
                "the account map {} does not send every account of the move to shard {} after the flip",
                path.display(),
                self.opts.to
            )));
        }
        Ok(())
    }

    /// Step 5 with `map_query`: `[routing] map_update` on the source, in one transaction, with
    /// the accounts and the target; then the query must send every account to the target.
    async fn flip_directory(&self, update: &str) -> Result<(), MoveError> {
        use tokio_postgres::types::Type;
        let what = "flipping the accounts in the account directory ([routing] map_update)";
        let stmt = self
            .src
            .prepare_typed(update, &[Type::TEXT_ARRAY, Type::TEXT])
            .await
            .map_err(qerr("source", what))?;
        let n = self
            .src
            .execute(&stmt, &[&self.accounts, &self.opts.to])
            .await
            .map_err(qerr("source", what))?;
        tracing::info!(id = %self.id, rows = n, "move: [routing] map_update sends the accounts to shard {}", self.opts.to);
        let key_oid = self.tables.first().map_or(25, |t| t.key_oid);
        let after = self.load_map().await?;
        let wrong: Vec<&String> = self
            .accounts
            .iter()
            .filter(|a| {
                after
                    .shard_of_text(key_oid, a.as_bytes())
                    .ok()
                    .map(|s| after.shards()[s.index()].as_str())
                    != Some(self.opts.to.as_str())
            })
            .collect();
        if !wrong.is_empty() {
            return Err(MoveError::Usage(format!(
                "after [routing] map_update ({n} rows changed), [routing] map_query does not send accounts {} to shard {}: the statement must update the rows the query reads; fix map_update and run the same `reshard move` again (the accounts stay fenced on {} until then)",
                wrong.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                self.opts.to,
                self.opts.from
            )));
        }
        Ok(())
    }

    /// Waits until `delete_grace` has passed since the flip (recorded on the target, so a
    /// resumed move waits only the rest).
    async fn grace(&self) -> Result<(), MoveError> {
        let since: f64 = self
            .to
            .query_one(
                "SELECT extract(epoch FROM clock_timestamp() - step_at)::float8 FROM reshard.move WHERE id = $1",
                &[&self.id],
            )
            .await
            .map_err(qerr(&self.to_ep, "reading the flip's time"))?
            .get(0);
        let left = self.opts.delete_grace.as_secs_f64() - since.max(0.0);
        if left > 0.0 {
            tracing::info!(id = %self.id, "move: waiting {left:.1}s (--delete-grace) for the application to read the new map before deleting the accounts' rows from shard {}", self.opts.from);
            tokio::time::sleep(Duration::from_secs_f64(left)).await;
        }
        Ok(())
    }

    /// Step 6: delete the accounts' rows on the old shard, in bounded transactions.
    async fn delete_from_old(&self) -> Result<(), MoveError> {
        // The deletes carry the move's replication origin (`reshard_…`), which every reshard
        // ingest drops: a reverse stream from this shard (cut over with --fence) must not
        // carry them back to the source, where these accounts' rows stay.
        let o = crate::pg::conn::quote_literal(&format!("{ORIGIN_PREFIX}{}", self.id));
        self.from
            .batch_execute(&format!(
                "SET session_replication_role = replica; \
                 SELECT pg_replication_origin_create({o}) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {o}); \
                 SELECT pg_replication_origin_session_setup({o})"
            ))
            .await
            .map_err(qerr(
                &self.from_ep,
                "setting session_replication_role and the move's replication origin (needs a superuser, or \
                 EXECUTE on pg_replication_origin_create and pg_replication_origin_session_setup)",
            ))?;
        let mut total = 0i64;
        for t in &self.tables {
            let q = t.name.quoted();
            // The filter again on the deleted rows: a ctid is unique only within one relation,
            // and a partitioned table's partitions share ctids (without it, rows of accounts
            // that stay on S were deleted with the moved ones).
            let sql = format!(
                "DELETE FROM {q} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {q} WHERE {f} LIMIT {DELETE_BATCH_ROWS})) AND ({f})",
                f = self.filter(t)
            );
            loop {
                let n = self
                    .from
                    .execute(sql.as_str(), &[])
                    .await
                    .map_err(qerr(&self.from_ep, "deleting the moved rows"))?;
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                if n == 0 {
                    break;
                }
                total += n;
                self.to
                    .execute(
                        "UPDATE reshard.move SET rows_deleted = rows_deleted + $2 WHERE id = $1",
                        &[&self.id, &n],
                    )
                    .await
                    .map_err(qerr(&self.to_ep, "recording the deletion"))?;
                crash_point("delete_batch");
            }
        }
        self.from
            .batch_execute(&format!(
                "RESET session_replication_role; SELECT pg_replication_origin_session_reset(); \
                 SELECT pg_replication_origin_drop({o})"
            ))
            .await
            .map_err(qerr(&self.from_ep, "resetting session_replication_role"))?;
        tracing::info!(id = %self.id, rows = total, "move: the accounts' rows are deleted from shard {}", self.opts.from);
        Ok(())
    }

    /// The move's slot and publication on the old shard, and its local spill log, removed.
    async fn drop_slot(&self) -> Result<(), MoveError> {
        self.from
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.id],
            )
            .await
            .map_err(qerr(&self.from_ep, "dropping the move's slot"))?;
        self.from
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&self.id)
            ))
            .await
            .map_err(qerr(&self.from_ep, "dropping the move's publication"))?;
        match std::fs::remove_dir_all(self.dir()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(MoveError::Io(format!(
                "removing the move's spill log {}: {e}",
                self.dir().display()
            ))),
        }
    }
}

/// The step of move `id`, looked up in `reshard.move` on every configured shard (the record
/// lives on the move's target): `(target, step)`, or `None` when no shard records that move.
/// For `reshard unfence`: a move's fence may only be lifted once the move is past its delete.
pub async fn move_step(config: &Config, id: &str) -> Result<Option<(String, Step)>, MoveError> {
    for shard in &config.shards {
        let ep = format!("shard {}", shard.name);
        let c = connect(&ep, &shard.url).await?;
        let exists: bool = c
            .query_one("SELECT to_regclass('reshard.move') IS NOT NULL", &[])
            .await
            .map_err(qerr(&ep, "looking for reshard.move"))?
            .get(0);
        if !exists {
            continue;
        }
        let row = c
            .query_opt("SELECT step FROM reshard.move WHERE id = $1", &[&id])
            .await
            .map_err(qerr(&ep, "reading reshard.move"))?;
        if let Some(r) = row {
            let step: String = r.get(0);
            let step = Step::parse(&step).ok_or_else(|| {
                MoveError::Usage(format!(
                    "reshard.move on shard {} has step {step:?} for move {id}, which this reshard does not know",
                    shard.name
                ))
            })?;
            return Ok(Some((shard.name.clone(), step)));
        }
    }
    Ok(None)
}

/// Per account: `(count, row-hash sum)` from [`account_aggregates`].
async fn digests(
    c: &Client,
    ep: &str,
    sql: &str,
) -> Result<BTreeMap<String, (i64, String)>, MoveError> {
    let rows = c
        .query(sql, &[])
        .await
        .map_err(qerr(ep, "computing the accounts' digests"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let k: String = r.get(0);
            let n: i64 = r.get(1);
            let s: Option<String> = r.get(2);
            (k, (n, s.unwrap_or_default()))
        })
        .collect())
}

/// Test builds only: `RESHARD_CRASH_AT=<step>` aborts the process right after that step, as a
/// `kill -9` there would (the crash-and-rerun tests).
fn crash_point(step: &str) {
    super::crash_point(step);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_a_slot_name_and_ignores_order() {
        let a = move_id(
            "Shard-1",
            "shard4",
            &normalize_accounts(&["77".into(), " 42".into()]),
        );
        let b = move_id(
            "Shard-1",
            "shard4",
            &normalize_accounts(&["42".into(), "77".into(), "42".into()]),
        );
        assert_eq!(a, b);
        assert!(a.starts_with("move_shard_1_shard4_"), "{a}");
        assert!(a.len() <= 63);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn steps_round_trip_in_order() {
        for s in [
            Step::Started,
            Step::Copied,
            Step::CaughtUp,
            Step::Verified,
            Step::Flipped,
            Step::Deleted,
            Step::Done,
        ] {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
        assert!(Step::Copied < Step::CaughtUp);
    }
}
