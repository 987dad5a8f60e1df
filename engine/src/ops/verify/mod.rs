//! Verification: prove each shard holds exactly the source rows that route to it.
//!
//! In: the config, [`VerifyOptions`] (tables, shards, accounts, sample size, timeout) and for
//! `hash = "map"` a [`KeyRouter`]. Out: a [`VerifyReport`]: per table × shard the row counts,
//! accounts compared, accounts that differ, and the differing row keys (`missing`, `extra`,
//! `different`), capped at [`MAX_DIFFS`] listed keys per table and shard.
//!
//! How (everything heavy runs inside PostgreSQL, reshard holds one row per stream):
//! 1. Source: a `REPEATABLE READ` transaction whose snapshot is taken together with
//!    `pg_current_wal_insert_lsn()` = L. Every commit it sees has a commit record below L.
//! 2. Each shard is read only after its progress row (`reshard.progress.commit_lsn`) reaches
//!    L, so it holds at least what the source snapshot holds (shards without a progress row
//!    — loaded by other means — are read as they are). While waiting, verify says what for;
//!    when no `reshard run` is up to move a shard's progress (no admin console, no walsender
//!    on the slot, progress standing still), that shard is compared as it is and the report
//!    says so ([`VerifyReport::not_applying`]): a match is still proof, a difference may be
//!    changes not applied yet.
//! 3. Per account: `count(*)` and the sum of 64-bit row hashes, streamed `ORDER BY account`
//!    from the source (with the account's shard computed there by PostgreSQL's own
//!    `satisfies_hash_partition` on a temporary hash-partitioned helper of the key's type,
//!    or by the router for `hash = "map"`) and from every shard, merge-joined in one pass.
//!    An account on a shard it does not route to is a mismatch there.
//! 4. Accounts that differ while the shards are being fed are re-checked with fresh
//!    snapshots (a live system converges; a real divergence persists), then drilled down row
//!    by row (md5 per primary key) to name the keys.
//!
//! 5. For a `key_immutable` table, a row left on a shard although the source now holds its
//!    primary key under a key that routes elsewhere (the promise was broken) is named with the
//!    shard it belongs to (`belongs_to`), so the violated assumption is reported, not hidden.
//!
//! Broadcast tables: whole-table count and hash sum on every shard, drilled down by primary
//! key on a mismatch. `--sample N` additionally compares N random accounts row by row.

pub mod cursor;
pub mod merge;
pub mod sql;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, HashKind, TableMode, TableRule};
use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::ops::observe::find_daemon;
use crate::pg::conn::{
    connect_plain, current_insert_lsn, emit_marker, error_text, normalize_session, quote_ident,
    quote_literal,
};
use crate::pg::progress::{read_progress, source_system_id};
use crate::pg::sql::TableName;
use crate::pg::table::{describe_table, TableInfo};
use crate::route::refresh::MapSource;

use cursor::{Cursor, Peeked, RowSource, TextRow};
use merge::{merge_accounts, merge_rows, DiffKind, MergeError, ShardTally, Suspect};
use sql::HashRoute;

/// Listed differing keys per table and shard (the rest are counted).
pub const MAX_DIFFS: usize = 100;
/// Accounts per drill-down query.
const DRILL_BATCH: usize = 200;
/// Re-check rounds for accounts that differ while the shards are being fed.
const RECHECK_ROUNDS: usize = 3;
/// Longest poll interval of progress rows.
const POLL: Duration = Duration::from_millis(200);
/// First poll interval of progress rows (doubling up to [`POLL`]): a caught-up shard passes a
/// fresh marker within milliseconds, and the look is one primary-key read.
const POLL_FIRST: Duration = Duration::from_millis(5);

/// Maps a shard-key value (its type OID and text form) to a shard index (`hash = "map"`).
pub type KeyRouter = dyn Fn(u32, &str) -> Result<usize, String> + Send + Sync;

/// What to verify.
#[derive(Clone, Default)]
pub struct VerifyOptions {
    /// Only these tables (source or target name, `schema.` optional); empty = all.
    pub tables: Vec<String>,
    /// Only these shards (names); empty = all.
    pub shards: Vec<String>,
    /// Only these accounts (key text); empty = all.
    pub accounts: Vec<String>,
    /// Additionally compare this many random accounts per sharded table row by row.
    pub sample: Option<u64>,
    /// Longest wait for a shard's progress to reach the source snapshot's LSN.
    pub timeout: Duration,
    /// Router for `hash = "map"` (unused with `hash = "postgres"`, which is computed in SQL).
    pub router: Option<Arc<KeyRouter>>,
}

/// Verification could not complete (a mismatch is not an error: see [`VerifyReport::ok`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A shard name given with `--shard` is not in the config.
    #[error("unknown shard {name:?}; the config's shards are {known:?}")]
    UnknownShard {
        /// The name given.
        name: String,
        /// Configured names.
        known: Vec<String>,
    },
    /// A table given with `--table` is not replicated.
    #[error("table {name:?} is not among the replicated tables ({known})")]
    UnknownTable {
        /// The name given.
        name: String,
        /// Replicated tables.
        known: String,
    },
    /// Could not connect.
    #[error("cannot connect to {endpoint}: {error}")]
    Connect {
        /// `source` or the shard name.
        endpoint: String,
        /// Why.
        error: Box<crate::source::SourceError>,
    },
    /// A query failed.
    #[error("query on {endpoint} failed{}: {}", table.as_ref().map(|t| format!(" (table {t})")).unwrap_or_default(), error_text(error))]
    Query {
        /// `source` or the shard name.
        endpoint: String,
        /// Table, if the query was about one.
        table: Option<String>,
        /// Driver error.
        error: tokio_postgres::Error,
    },
    /// A shard did not reach the source snapshot's LSN in time.
    #[error("shard {shard} did not reach source LSN {target} within {waited_secs:.0}s (its progress is at {reached}; {daemon}); check `reshard status`, or raise --timeout")]
    Timeout {
        /// Shard.
        shard: String,
        /// Source LSN waited for.
        target: Lsn,
        /// Progress reached.
        reached: Lsn,
        /// Seconds waited.
        waited_secs: f64,
        /// What the daemon was doing (see [`crate::ops::observe::Daemon::describe`]).
        daemon: String,
    },
    /// Routing of an account failed (`hash = "map"`).
    #[error("table {table}: cannot route account {account}: {message}")]
    Route {
        /// Table.
        table: String,
        /// Account.
        account: String,
        /// Router's message.
        message: String,
    },
    /// The replicated tables could not be resolved (see [`crate::pg::catalog`]).
    #[error(transparent)]
    Tables(crate::pg::catalog::CatalogError),
    /// `hash = "map"` without a router, or another config problem.
    #[error("{0}")]
    Config(String),
    /// A result row did not have the expected shape.
    #[error("unexpected result while verifying {table}: {message}")]
    Malformed {
        /// Table.
        table: String,
        /// What.
        message: String,
    },
}

impl Classify for VerifyError {
    fn class(&self) -> ErrorClass {
        match self {
            VerifyError::Connect { error, .. } => error.class(),
            VerifyError::Query { error, .. } => class_of_pg(error),
            VerifyError::Timeout { .. } => ErrorClass::Transient,
            VerifyError::Tables(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// One differing row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// missing / extra / different.
    pub kind: DiffKind,
    /// The account (sharded tables).
    pub account: Option<String>,
    /// Row key values (text), in the order of [`TableShardResult::key_columns`].
    pub key: Vec<Option<String>>,
    /// For rows on a shard the source routes elsewhere: the shard they belong to (also for a
    /// `key_immutable` row whose key changed on the source: the new key's shard).
    pub belongs_to: Option<String>,
}

/// Result for one table on one shard.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TableShardResult {
    /// Source table.
    pub table: String,
    /// Target table.
    pub target: String,
    /// Shard name.
    pub shard: String,
    /// `sharded` / `broadcast`.
    pub mode: String,
    /// Everything matches.
    pub ok: bool,
    /// Source rows that belong on this shard.
    pub rows_source: u64,
    /// Rows on the shard.
    pub rows_shard: u64,
    /// Accounts compared (sharded tables).
    pub accounts_checked: u64,
    /// Accounts that differ (after re-checks and drill-down).
    pub accounts_mismatched: u64,
    /// Accounts compared row by row because of `--sample`.
    pub accounts_sampled: u64,
    /// Rows missing on the shard.
    pub missing: u64,
    /// Rows on the shard that should not be there.
    pub extra: u64,
    /// Rows whose values differ.
    pub different: u64,
    /// Columns of [`Difference::key`].
    pub key_columns: Vec<String>,
    /// Columns compared (source columns present on the target, generated ones left out).
    pub columns: Vec<String>,
    /// The first [`MAX_DIFFS`] differing rows.
    pub differences: Vec<Difference>,
    /// Differing rows not listed.
    pub differences_omitted: u64,
    /// Why this table could not be compared on this shard (missing table, …).
    pub error: Option<String>,
}

/// The whole verification.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// Everything matches.
    pub ok: bool,
    /// Source LSN of the first snapshot.
    pub source_lsn: Option<Lsn>,
    /// Per table × shard.
    pub results: Vec<TableShardResult>,
    /// Remarks (shards read without a progress row, columns left out, …).
    pub notes: Vec<String>,
    /// Source columns (`table.column`) missing on a verified shard, left out of the
    /// comparison: `cutover` does not call such a shard SAFE.
    pub missing_columns: Vec<String>,
    /// Shards compared as they were, behind the source, because nothing was applying to them.
    pub not_applying: Vec<NotApplying>,
    /// Seconds taken.
    pub elapsed_secs: f64,
}

/// A shard compared as it was, behind the source, because no `reshard run` was up to apply
/// the rest.
#[derive(Debug, Clone, Serialize)]
pub struct NotApplying {
    /// Shard.
    pub shard: String,
    /// Its progress.
    pub progress_lsn: Lsn,
    /// The source LSN it did not reach.
    pub source_lsn: Lsn,
    /// Why nothing is applying (see [`crate::ops::observe::Daemon::describe`]).
    pub daemon: String,
}

struct ShardConn {
    index: usize,
    name: String,
    client: Client,
    /// Its progress is waited for before its snapshot: it has a progress row, or a `reshard
    /// run` is up (loading it; the row comes once its full load is done).
    wait_progress: bool,
    /// Set once nothing was found applying to this shard: it is then read as it is.
    not_applying: std::sync::Mutex<Option<NotApplying>>,
}

struct Ctx<'a> {
    config: &'a Config,
    opts: &'a VerifyOptions,
    src: Client,
    /// A second source connection that writes a marker after each source snapshot (see
    /// [`begin_source`]); `None` when no shard is applying or the role may not.
    marker: std::sync::Mutex<Option<Client>>,
    shards: Vec<ShardConn>,
    system_id: Option<String>,
    live: bool,
    notes: Vec<String>,
    missing_columns: Vec<String>,
    /// Route helpers created on `src` in this session.
    helpers: BTreeSet<String>,
}

fn q(endpoint: &str, table: Option<&TableName>) -> impl Fn(tokio_postgres::Error) -> VerifyError {
    let endpoint = endpoint.to_owned();
    let table = table.map(TableName::to_string);
    move |error| VerifyError::Query {
        endpoint: endpoint.clone(),
        table: table.clone(),
        error,
    }
}

/// Runs a verification.
pub async fn verify(config: &Config, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let known = config.shard_names();
    for s in &opts.shards {
        if !known.contains(s) {
            return Err(VerifyError::UnknownShard {
                name: s.clone(),
                known,
            });
        }
    }
    let src = connect_plain(&config.source.url)
        .await
        .map_err(|error| VerifyError::Connect {
            endpoint: "source".into(),
            error: Box::new(error),
        })?;
    normalize_session(&src).await.map_err(q("source", None))?;
    let mut opts = opts.clone();
    if config.routing.hash == HashKind::Map && opts.router.is_none() {
        opts.router = Some(map_router(config).await?);
    }
    let opts = &opts;
    let rules = crate::pg::catalog::discover(&src, config)
        .await
        .map_err(VerifyError::Tables)?
        .into_iter()
        .map(|t| t.rule)
        .collect();
    let rules = select_tables(rules, &opts.tables)?;

    let mut shards = Vec::new();
    for (index, s) in config.shards.iter().enumerate() {
        if !opts.shards.is_empty() && !opts.shards.contains(&s.name) {
            continue;
        }
        let client = connect_plain(&s.url)
            .await
            .map_err(|error| VerifyError::Connect {
                endpoint: format!("shard {}", s.name),
                error: Box::new(error),
            })?;
        normalize_session(&client).await.map_err(q(&s.name, None))?;
        let wait_progress = read_progress(&client, &config.source.slot, &s.name, None)
            .await
            .ok()
            .flatten()
            .is_some();
        shards.push(ShardConn {
            index,
            name: s.name.clone(),
            client,
            wait_progress,
            not_applying: std::sync::Mutex::new(None),
        });
    }
    let system_id = source_system_id(&src).await;
    // A shard without a progress row while a `reshard run` is up is still in its full load:
    // its progress is waited for (up to --timeout) like any other's, never compared half
    // loaded and reported as a mismatch.
    if shards.iter().any(|s| !s.wait_progress) && find_daemon(config, &src).await.is_up() {
        for s in shards.iter_mut() {
            s.wait_progress = true;
        }
    }
    let live = shards.iter().any(|s| s.wait_progress);
    let mut notes = Vec::new();
    for s in shards.iter().filter(|s| !s.wait_progress) {
        notes.push(format!(
            "shard {} has no progress row for slot {}: compared as it is, without waiting for replication",
            s.name, config.source.slot
        ));
    }
    // Only worth a connection when some shard's progress is waited for.
    let marker = if live {
        connect_plain(&config.source.url).await.ok()
    } else {
        None
    };
    let mut ctx = Ctx {
        config,
        opts,
        src,
        marker: std::sync::Mutex::new(marker),
        shards,
        system_id,
        live,
        notes,
        missing_columns: Vec::new(),
        helpers: BTreeSet::new(),
    };
    let mut report = VerifyReport::default();
    // Plan every table first (its columns, key and route helper: catalog reads and a CREATE
    // TEMP TABLE, which a read-only snapshot does not allow), then compare them, the first
    // look at consecutive tables sharing snapshots ([`Held`]).
    let mut plans = Vec::with_capacity(rules.len());
    for rule in &rules {
        let t = Instant::now();
        plans.push(plan_table(&mut ctx, rule).await?);
        tracing::debug!(table = %rule.source, secs = t.elapsed().as_secs_f64(), "verify: planned");
    }
    refuse_unfit_accounts(&ctx.opts.accounts, plans.iter().map(|(p, _)| p))?;
    let mut held = Held::default();
    let compared = async {
        for (plan, results) in plans {
            let t = Instant::now();
            let results =
                compare_table(&ctx, &plan, results, &mut held, &mut report.source_lsn).await?;
            tracing::debug!(table = %plan.rule.source, secs = t.elapsed().as_secs_f64(), "verify: compared");
            report.results.extend(results);
        }
        Ok::<(), VerifyError>(())
    }
    .await;
    let closed = held.close(&ctx).await;
    compared?;
    closed?;
    report.ok = report.results.iter().all(|r| r.ok);
    for s in &ctx.shards {
        let stale = s.not_applying.lock().map(|g| g.clone()).unwrap_or(None);
        if let Some(n) = stale {
            ctx.notes.push(format!(
                "shard {}: nothing is applying to it ({}); its progress {} is behind the source's {}, \
                 so it was compared as it is: a match proves it holds the source's rows, a difference \
                 may be changes not applied yet (start reshard run and verify again)",
                n.shard, n.daemon, n.progress_lsn, n.source_lsn
            ));
            report.not_applying.push(n);
        }
    }
    report.notes = ctx.notes;
    report.missing_columns = ctx.missing_columns;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Refuses an `--accounts` value that no compared sharded table's key can hold (a typo such
/// as `12a` for a bigint key): it would select no row anywhere and pass as "ok".
fn refuse_unfit_accounts<'p>(
    accounts: &[String],
    plans: impl Iterator<Item = &'p Plan>,
) -> Result<(), VerifyError> {
    let sharded: Vec<&Plan> = plans
        .filter(|p| p.rule.mode == TableMode::Sharded)
        .collect();
    if sharded.is_empty() {
        return Ok(());
    }
    match accounts.iter().find(|a| {
        !sharded
            .iter()
            .any(|p| sql::account_fits_type(a, &p.key_type))
    }) {
        None => Ok(()),
        Some(a) => {
            let keys: Vec<String> = sharded
                .iter()
                .map(|p| format!("{}.{} ({})", p.rule.source, p.rule.key, p.key_type))
                .collect();
            Err(VerifyError::Config(format!(
                "--accounts: {a:?} is not a value of the shard key of any compared table ({}): no row could match it; give each account as its key's value",
                keys.join(", ")
            )))
        }
    }
}

/// The account map of `[routing]` (`map` CSV file or `map_query` on the source), as a
/// [`KeyRouter`] that routes like the daemon's router
/// ([`crate::route::AccountMap::shard_of_text`]).
pub async fn map_router(config: &Config) -> Result<Arc<KeyRouter>, VerifyError> {
    let map = load_account_map(config).await?;
    Ok(Arc::new(move |type_oid: u32, text: &str| {
        map.shard_of_text(type_oid, text.as_bytes())
            .map(|s| s.index())
            .map_err(|e| e.to_string())
    }))
}

/// The account map of `[routing]` as it is now, read the way `reshard run` reads it
/// ([`MapSource`]: the `map` CSV file or `map_query` on the source, with `default_shard`).
pub async fn load_account_map(
    config: &Config,
) -> Result<Arc<crate::route::AccountMap>, VerifyError> {
    let config_error = |e: crate::route::RouteError| VerifyError::Config(e.to_string());
    let source = MapSource::from_config(config)
        .map_err(config_error)?
        .ok_or_else(|| {
            VerifyError::Config(
                "[routing] hash = \"postgres\": there is no account map to read".into(),
            )
        })?;
    Ok(Arc::new(
        source.load(&mut None).await.map_err(config_error)?,
    ))
}

fn select_tables(rules: Vec<TableRule>, wanted: &[String]) -> Result<Vec<TableRule>, VerifyError> {
    if wanted.is_empty() {
        return Ok(rules);
    }
    let mut out = Vec::new();
    for w in wanted {
        let qw = TableName::parse(w).map_err(|e| VerifyError::Config(format!("--table: {e}")))?;
        match rules.iter().find(|r| r.source == qw || r.target == qw) {
            Some(r) => out.push(r.clone()),
            None => {
                return Err(VerifyError::UnknownTable {
                    name: w.clone(),
                    known: rules
                        .iter()
                        .map(|r| r.source.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        }
    }
    Ok(out)
}

/// Everything one table's comparison needs.
struct Plan {
    rule: TableRule,
    columns: Vec<String>,
    key_type: String,
    key_type_oid: u32,
    /// Row key columns (account first for sharded tables).
    order: Vec<String>,
    route: Option<HashRoute>,
    /// Positions in `ctx.shards` where the target exists.
    shards: Vec<usize>,
}

/// What [`compare_table`] needs for `rule`: the compared columns, the row key, the route
/// helper on the source, and a result per shard (with the error of a shard lacking the table).
async fn plan_table(
    ctx: &mut Ctx<'_>,
    rule: &TableRule,
) -> Result<(Plan, Vec<TableShardResult>), VerifyError> {
    let name = &rule.source;
    let Some(info) = describe_table(&ctx.src, name)
        .await
        .map_err(q("source", Some(name)))?
    else {
        return Err(VerifyError::Config(format!(
            "table {name} does not exist on the source (run reshard check)"
        )));
    };
    let mut results: Vec<TableShardResult> = Vec::new();
    let mut targets: Vec<Option<TableInfo>> = Vec::new();
    for s in &ctx.shards {
        targets.push(
            describe_table(&s.client, &rule.target)
                .await
                .map_err(q(&s.name, Some(&rule.target)))?,
        );
    }
    // Compared columns: replicated on the source and present on every shard that has the table.
    let mut columns = Vec::new();
    for c in info.columns.iter().filter(|c| !c.generated) {
        let everywhere = targets
            .iter()
            .flatten()
            .all(|t| t.column(&c.name).is_some());
        if everywhere {
            columns.push(c.name.clone());
        } else {
            ctx.notes.push(format!(
                "{name}.{} is missing on some shard and is left out of the comparison (run reshard check)",
                c.name
            ));
            ctx.missing_columns.push(format!("{name}.{}", c.name));
        }
    }
    let sharded = rule.mode == TableMode::Sharded;
    let (key_type, key_type_oid) = if sharded {
        match info.column(&rule.key) {
            Some(c) => (c.type_name.clone(), c.type_oid),
            None => {
                return Err(VerifyError::Config(format!(
                    "table {name} has no shard key column {} (run reshard check)",
                    rule.key
                )))
            }
        }
    } else {
        (String::new(), 0)
    };
    let mut order = Vec::new();
    if sharded {
        order.push(rule.key.clone());
    }
    for k in info.row_key() {
        if !order.contains(&k) && columns.contains(&k) {
            order.push(k);
        }
    }
    let mut plan_shards = Vec::new();
    for (pos, t) in targets.iter().enumerate() {
        let Some(s) = ctx.shards.get(pos) else {
            continue;
        };
        let mut r = TableShardResult {
            table: rule.source.to_string(),
            target: rule.target.to_string(),
            shard: s.name.clone(),
            mode: rule.mode.to_string(),
            key_columns: order.clone(),
            columns: columns.clone(),
            ..Default::default()
        };
        if t.is_none() {
            r.error = Some(crate::pg::catalog::missing_on_shard(&rule.target, &s.name));
        } else {
            plan_shards.push(pos);
        }
        results.push(r);
    }
    let route = if sharded && ctx.config.routing.hash == HashKind::Postgres {
        let r = HashRoute {
            helper: format!("reshard_verify_route_{key_type_oid}"),
            shards: ctx.config.shards.len(),
        };
        if !ctx.helpers.contains(&r.helper) {
            ctx.src
                .batch_execute(&r.create_sql(&key_type))
                .await
                .map_err(q("source", Some(name)))?;
            ctx.helpers.insert(r.helper.clone());
        }
        Some(r)
    } else {
        None
    };
    let plan = Plan {
        rule: rule.clone(),
        columns,
        key_type,
        key_type_oid,
        order,
        route,
        shards: plan_shards,
    };
    Ok((plan, results))
}

/// Compares `plan`'s table on the source and the shards: a first look in the snapshots `held`
/// (opened or renewed as needed), and re-checks and drill-downs in fresh ones where that look
/// found differences.
async fn compare_table(
    ctx: &Ctx<'_>,
    plan: &Plan,
    mut results: Vec<TableShardResult>,
    held: &mut Held,
    first_lsn: &mut Option<Lsn>,
) -> Result<Vec<TableShardResult>, VerifyError> {
    let sharded = plan.rule.mode == TableMode::Sharded;
    if sharded {
        verify_sharded(ctx, plan, &mut results, held, first_lsn).await?;
    } else {
        verify_broadcast(ctx, plan, &mut results, held, first_lsn).await?;
    }
    for r in &mut results {
        r.ok = r.error.is_none()
            && r.accounts_mismatched == 0
            && r.missing == 0
            && r.extra == 0
            && r.different == 0
            && (sharded || r.rows_source == r.rows_shard);
    }
    Ok(results)
}

/// How long one source snapshot (and the shards' snapshots taken at its LSN) serves the first
/// look at further tables. Sharing them makes a caught-up shard wait for replication once per
/// verify instead of once per table; renewing them between tables bounds how long the source's
/// vacuum horizon is held back to this plus one table's comparison, as with a snapshot per table.
const SNAPSHOT_SPAN: Duration = Duration::from_secs(5);

/// The open source snapshot and the shards' snapshots begun at its LSN, shared by the first
/// look at consecutive tables (see [`SNAPSHOT_SPAN`]). Whatever begins fresh snapshots (a
/// re-check, a drill-down) closes it first: one connection holds one transaction.
#[derive(Default)]
struct Held {
    /// The source snapshot's LSN and when it began.
    source: Option<(Lsn, Instant)>,
    /// Shard positions whose snapshot is open.
    shards: Vec<usize>,
}

impl Held {
    /// The LSN of an open source snapshot, with a snapshot open on every shard of `positions`
    /// that covers it: the held ones while younger than [`SNAPSHOT_SPAN`], else new ones.
    async fn cover(
        &mut self,
        ctx: &Ctx<'_>,
        positions: &[usize],
        first_lsn: &mut Option<Lsn>,
    ) -> Result<Lsn, VerifyError> {
        if self
            .source
            .is_some_and(|(_, at)| at.elapsed() >= SNAPSHOT_SPAN)
        {
            self.close(ctx).await?;
        }
        let lsn = match self.source {
            Some((lsn, _)) => lsn,
            None => {
                let lsn = begin_source(ctx).await?;
                self.source = Some((lsn, Instant::now()));
                first_lsn.get_or_insert(lsn);
                lsn
            }
        };
        for &pos in positions {
            if !self.shards.contains(&pos) {
                begin_shard(ctx, pos, lsn).await?;
                self.shards.push(pos);
            }
        }
        Ok(lsn)
    }

    /// Ends the held snapshots (if any).
    async fn close(&mut self, ctx: &Ctx<'_>) -> Result<(), VerifyError> {
        if self.source.take().is_none() {
            return Ok(());
        }
        let shards = std::mem::take(&mut self.shards);
        commit_all(ctx, &shards).await
    }
}

/// Begins the source snapshot and returns its LSN.
async fn begin_source(ctx: &Ctx<'_>) -> Result<Lsn, VerifyError> {
    ctx.src
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(q("source", None))?;
    let lsn = current_insert_lsn(&ctx.src)
        .await
        .map_err(q("source", None))?;
    // A marker committed after the snapshot: a caught-up shard commits past it (and so past
    // the snapshot's LSN) at once, instead of at its next idle heartbeat.
    let marker = ctx.marker.lock().ok().and_then(|mut m| m.take());
    if let Some(m) = marker {
        match emit_marker(&m, "verify").await {
            Ok(_) => {
                if let Ok(mut slot) = ctx.marker.lock() {
                    *slot = Some(m);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "verify: no marker (pg_logical_emit_message refused); caught-up shards are waited for until their next heartbeat")
            }
        }
    }
    Ok(lsn)
}

/// Waits until the shard has applied everything up to `lsn`, then begins its snapshot.
async fn begin_shard(ctx: &Ctx<'_>, pos: usize, lsn: Lsn) -> Result<(), VerifyError> {
    let Some(s) = ctx.shards.get(pos) else {
        return Ok(());
    };
    let stale = s.not_applying.lock().map(|g| g.is_some()).unwrap_or(false);
    if s.wait_progress && !stale {
        let waited = ProgressWait {
            config: ctx.config,
            src: &ctx.src,
            shard_client: &s.client,
            shard: &s.name,
            system_id: ctx.system_id.as_deref(),
            target: lsn,
            timeout: ctx.opts.timeout,
            who: "verify",
            stop_when_nothing_applies: Some(Duration::ZERO),
        }
        .run()
        .await?;
        if let Waited::NothingApplying { reached, daemon } = waited {
            tracing::warn!(shard = %s.name, progress = %reached, source_lsn = %lsn, "verify: nothing is applying to this shard ({daemon}); comparing it as it is");
            if let Ok(mut g) = s.not_applying.lock() {
                *g = Some(NotApplying {
                    shard: s.name.clone(),
                    progress_lsn: reached,
                    source_lsn: lsn,
                    daemon,
                });
            }
        }
    }
    s.client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(q(&s.name, None))
}

/// How long a waiting message is repeated.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How often the daemon is looked for while waiting.
const DAEMON_EVERY: Duration = Duration::from_secs(2);
/// A wait shorter than this neither looks for the daemon nor says it waits: a caught-up shard
/// passes a fresh marker in milliseconds, and asking the daemon's console for its status (a
/// connection and `SHOW STATUS JSON`) would cost more than the wait itself.
const QUIET: Duration = Duration::from_millis(250);

/// A wait for one shard's progress row to cover a source LSN.
pub struct ProgressWait<'a> {
    /// The config (admin console, slot).
    pub config: &'a Config,
    /// The source (to look for a walsender on the slot).
    pub src: &'a Client,
    /// The shard.
    pub shard_client: &'a Client,
    /// The shard's name.
    pub shard: &'a str,
    /// The source's `system_identifier`, if known.
    pub system_id: Option<&'a str>,
    /// A WAL position no commit of interest is at or after (the insert position when a
    /// snapshot was taken, or a marker record's start).
    pub target: Lsn,
    /// Longest wait.
    pub timeout: Duration,
    /// Who waits (`verify`, `cutover`), for the messages.
    pub who: &'a str,
    /// Return [`Waited::NothingApplying`] once no daemon has been up for this long (looked for
    /// every 2 s, at least twice) while the progress stood still, instead of waiting for one
    /// until the timeout. `None`: wait out the timeout.
    pub stop_when_nothing_applies: Option<Duration>,
}

/// How a [`ProgressWait`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited {
    /// The progress covers the target; it is at this LSN.
    Reached(Lsn),
    /// Nothing is up to move the progress, which stands at `reached`.
    NothingApplying {
        /// Progress.
        reached: Lsn,
        /// Why (see [`crate::ops::observe::Daemon::describe`]).
        daemon: String,
    },
}

impl ProgressWait<'_> {
    /// Polls the shard's progress row until every source commit before `target` is applied
    /// (`Lsn::covers`: a commit record may start exactly at `target`, so it is not needed).
    /// Says what it waits for once the wait has lasted `QUIET` (250 ms) and then every
    /// `REPORT_EVERY` (10 s), with what the daemon is doing; a missing progress table or row is
    /// waited for too (the daemon creates them when its shards start applying, after the
    /// full load).
    pub async fn run(&self) -> Result<Waited, VerifyError> {
        let started = Instant::now();
        let mut first: Option<Lsn> = None;
        let mut next_report = started + QUIET;
        let mut next_daemon = started + QUIET;
        let mut daemon = String::new();
        let mut absent_checks = 0u32;
        let mut absent_since = started;
        let mut poll = POLL_FIRST;
        loop {
            let row = match read_progress(
                self.shard_client,
                &self.config.source.slot,
                self.shard,
                self.system_id,
            )
            .await
            {
                Ok(p) => p,
                Err(crate::pg::progress::ProgressError::Query { error, .. }) => {
                    return Err(q(self.shard, None)(error))
                }
                Err(e) => return Err(VerifyError::Config(e.to_string())),
            };
            let reached = row.as_ref().map(|p| p.commit_lsn).unwrap_or(Lsn::ZERO);
            // Every commit a snapshot taken at `target` sees starts below `target`; an idle
            // shard's heartbeat covers exactly that. Asking for `target` itself would make a
            // caught-up shard of an idle source wait for the source's next WAL record.
            if reached.covers(self.target) {
                return Ok(Waited::Reached(reached));
            }
            let standing_still = *first.get_or_insert(reached) == reached;
            let now = Instant::now();
            if now >= next_daemon {
                let d = find_daemon(self.config, self.src).await;
                daemon = d.describe(self.config, self.shard);
                if d.is_up() {
                    absent_checks = 0;
                } else {
                    if absent_checks == 0 {
                        absent_since = now;
                    }
                    absent_checks += 1;
                }
                next_daemon = now + DAEMON_EVERY;
            }
            if now >= next_report {
                let progress = match &row {
                    None => "it has no progress row yet".to_owned(),
                    Some(p) => format!(
                        "its progress is at {}, {} bytes behind",
                        p.commit_lsn,
                        self.target.bytes_since(p.commit_lsn)
                    ),
                };
                tracing::info!(
                    "{}: waiting up to {}s for shard {} to apply the source's commits up to {}: {progress}; {daemon}",
                    self.who,
                    self.timeout.saturating_sub(started.elapsed()).as_secs(),
                    self.shard,
                    self.target
                );
                next_report = now + REPORT_EVERY;
            }
            // Two looks for the daemon, DAEMON_EVERY apart (and for as long as asked), found
            // nothing, and the progress did not move meanwhile: nothing will move it.
            if self
                .stop_when_nothing_applies
                .is_some_and(|d| absent_checks >= 2 && now.duration_since(absent_since) >= d)
                && standing_still
            {
                return Ok(Waited::NothingApplying { reached, daemon });
            }
            if started.elapsed() >= self.timeout {
                // A timeout shorter than QUIET ends before the first look for the daemon.
                if daemon.is_empty() {
                    daemon = find_daemon(self.config, self.src)
                        .await
                        .describe(self.config, self.shard);
                }
                return Err(VerifyError::Timeout {
                    shard: self.shard.to_owned(),
                    target: self.target,
                    reached,
                    waited_secs: started.elapsed().as_secs_f64(),
                    daemon,
                });
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(POLL);
        }
    }
}

async fn commit_all(ctx: &Ctx<'_>, shard_positions: &[usize]) -> Result<(), VerifyError> {
    ctx.src
        .batch_execute("COMMIT")
        .await
        .map_err(q("source", None))?;
    for &pos in shard_positions {
        if let Some(s) = ctx.shards.get(pos) {
            s.client
                .batch_execute("COMMIT")
                .await
                .map_err(q(&s.name, None))?;
        }
    }
    Ok(())
}

fn merge_err(ctx: &Ctx<'_>, plan: &Plan, positions: &[usize], e: MergeError) -> VerifyError {
    match e {
        MergeError::Stream { shard_pos, source } => {
            let endpoint = match shard_pos
                .and_then(|p| positions.get(p))
                .and_then(|&p| ctx.shards.get(p))
            {
                Some(s) => s.name.clone(),
                None => "source".into(),
            };
            q(&endpoint, Some(&plan.rule.source))(source)
        }
        MergeError::Route { account, message } => VerifyError::Route {
            table: plan.rule.source.to_string(),
            account,
            message,
        },
        MergeError::Malformed(message) => VerifyError::Malformed {
            table: plan.rule.source.to_string(),
            message,
        },
    }
}

/// One pass of the per-account merge over `positions` (indices into `ctx.shards`), restricted
/// to `accounts` when given, in fresh snapshots.
async fn account_pass(
    ctx: &Ctx<'_>,
    plan: &Plan,
    positions: &[usize],
    accounts: Option<&[String]>,
    first_lsn: &mut Option<Lsn>,
) -> Result<Vec<ShardTally>, VerifyError> {
    let mut held = Held::default();
    let tallies = async {
        held.cover(ctx, positions, first_lsn).await?;
        account_tallies(ctx, plan, positions, accounts, false).await
    }
    .await;
    let closed = held.close(ctx).await;
    let tallies = tallies?;
    closed?;
    Ok(tallies)
}

/// The SQL condition of a source row routing to one of the shards at `positions`, when
/// PostgreSQL computes the route and they are not every shard (see [`account_tallies`]).
fn routed_to(ctx: &Ctx<'_>, plan: &Plan, positions: &[usize]) -> Option<String> {
    let route = plan.route.as_ref()?;
    let indices: Vec<usize> = positions
        .iter()
        .filter_map(|&p| ctx.shards.get(p).map(|s| s.index))
        .collect();
    (indices.len() < ctx.config.shards.len())
        .then(|| route.routes_to(&quote_ident(&plan.rule.key), &indices))
}

/// The per-account merge over `positions` (indices into `ctx.shards`), restricted to
/// `accounts` when given, in the snapshots open on the source and on those shards.
///
/// `routed_here`: the source reads only the rows that route to those shards, when PostgreSQL
/// computes the route (`hash = "postgres"`) and they are not every shard: verifying one shard
/// of N then hashes about 1/N of the source's rows instead of all of them. An account on a
/// shard that the source routes elsewhere is then a suspect of unknown shard; re-reading the
/// suspects without it names their shard.
async fn account_tallies(
    ctx: &Ctx<'_>,
    plan: &Plan,
    positions: &[usize],
    accounts: Option<&[String]>,
    routed_here: bool,
) -> Result<Vec<ShardTally>, VerifyError> {
    let name = &plan.rule.source;
    let filter = accounts.map(|a| sql::key_in(&plan.rule.key, &plan.key_type, a));
    let src_filter = routed_here
        .then(|| routed_to(ctx, plan, positions))
        .flatten()
        .map(|on| match &filter {
            Some(f) => format!("{f} AND {on}"),
            None => on,
        });
    let src_sql = sql::account_aggregates(
        name,
        &plan.rule.key,
        &plan.columns,
        src_filter.as_deref().or(filter.as_deref()),
        plan.route.as_ref(),
    );
    let shard_sql = sql::account_aggregates(
        &plan.rule.target,
        &plan.rule.key,
        &plan.columns,
        filter.as_deref(),
        None,
    );
    let mut tallies = vec![ShardTally::default(); positions.len()];
    let mut source = Peeked::new(
        Cursor::open(&ctx.src, "reshard_verify_src", &src_sql)
            .await
            .map_err(q("source", Some(name)))?,
    );
    let mut streams = Vec::with_capacity(positions.len());
    let mut ids = Vec::with_capacity(positions.len());
    let mut names = Vec::with_capacity(positions.len());
    for &pos in positions {
        let Some(s) = ctx.shards.get(pos) else {
            continue;
        };
        streams.push(Peeked::new(
            Cursor::open(&s.client, "reshard_verify_shard", &shard_sql)
                .await
                .map_err(q(&s.name, Some(&plan.rule.target)))?,
        ));
        ids.push(s.index);
        names.push(s.name.as_str());
    }
    let router = ctx.opts.router.clone();
    let type_oid = plan.key_type_oid;
    let route = move |account: &str, computed: Option<&str>| -> Result<usize, String> {
        match (computed, &router) {
            (Some(c), _) => c.parse().map_err(|_| format!("bad shard number {c:?}")),
            (None, Some(r)) => r(type_oid, account),
            (None, None) => Err("no router".into()),
        }
    };
    merge_accounts(&mut source, &mut streams, &ids, route, &mut tallies)
        .await
        .map_err(|e| merge_err(ctx, plan, positions, e))?;
    // Closed, not left to the commit: the snapshots may serve the next table, whose cursors
    // take the same names.
    source
        .into_inner()
        .close()
        .await
        .map_err(q("source", Some(name)))?;
    for (stream, shard) in streams.into_iter().zip(names) {
        stream
            .into_inner()
            .close()
            .await
            .map_err(q(shard, Some(&plan.rule.target)))?;
    }
    Ok(tallies)
}

async fn verify_sharded(
    ctx: &Ctx<'_>,
    plan: &Plan,
    results: &mut [TableShardResult],
    held: &mut Held,
    first_lsn: &mut Option<Lsn>,
) -> Result<(), VerifyError> {
    let accounts = (!ctx.opts.accounts.is_empty()).then_some(ctx.opts.accounts.as_slice());
    held.cover(ctx, &plan.shards, first_lsn).await?;
    let tallies = account_tallies(ctx, plan, &plan.shards, accounts, true).await?;
    // Suspects per shard position.
    let mut suspects: HashMap<usize, Vec<Suspect>> = HashMap::new();
    let mut overflow: HashMap<usize, u64> = HashMap::new();
    for (t, &pos) in tallies.iter().zip(&plan.shards) {
        if let Some(r) = results.get_mut(pos) {
            r.rows_source = t.rows_source;
            r.rows_shard = t.rows_shard;
            r.accounts_checked = t.accounts_checked;
        }
        if !t.suspects.is_empty() {
            suspects.insert(pos, t.suspects.clone());
        }
        overflow.insert(pos, t.suspects_total - t.suspects.len() as u64);
    }
    let sample = ctx.opts.sample.filter(|n| *n > 0);
    if !suspects.is_empty() || sample.is_some() {
        // Re-checks and drill-downs take fresh snapshots.
        held.close(ctx).await?;
    }
    // Re-check while replication may still be catching up. A first look that read only the
    // source rows routed to these shards is re-read at once, whole for the suspects: that
    // names the shard the source routes each of them to (a drill-down's `belongs_to`).
    let narrowed = routed_to(ctx, plan, &plan.shards).is_some();
    let rounds = usize::from(narrowed) + if ctx.live { RECHECK_ROUNDS } else { 0 };
    for round in 0..rounds {
        if suspects.is_empty() {
            break;
        }
        if round > 0 || !narrowed {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut next = HashMap::new();
        for (pos, list) in &suspects {
            let mut still = Vec::new();
            for chunk in list.chunks(DRILL_BATCH) {
                let accts: Vec<String> = chunk.iter().map(|s| s.account.clone()).collect();
                let t = account_pass(ctx, plan, &[*pos], Some(&accts), first_lsn).await?;
                if let Some(t) = t.first() {
                    still.extend(t.suspects.iter().cloned());
                }
            }
            if !still.is_empty() {
                next.insert(*pos, still);
            }
        }
        suspects = next;
    }
    // Random sample, compared row by row on the shard it routes to.
    let mut sampled: HashMap<usize, BTreeSet<String>> = HashMap::new();
    if let Some(n) = sample {
        let sql = sql::sample_accounts(&plan.rule.source, &plan.rule.key, n, plan.route.as_ref());
        let rows = ctx
            .src
            .simple_query(&sql)
            .await
            .map_err(q("source", Some(&plan.rule.source)))?;
        for m in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let Some(account) = r.get(0) else { continue };
                let shard = match (r.get(1), &ctx.opts.router) {
                    (Some(s), _) => s.parse::<usize>().ok(),
                    (None, Some(router)) => router(plan.key_type_oid, account).ok(),
                    (None, None) => None,
                };
                let Some(shard) = shard else { continue };
                if let Some(pos) = plan
                    .shards
                    .iter()
                    .copied()
                    .find(|&p| ctx.shards.get(p).is_some_and(|s| s.index == shard))
                {
                    sampled.entry(pos).or_default().insert(account.to_owned());
                }
            }
        }
    }
    for &pos in &plan.shards {
        let list = suspects.remove(&pos).unwrap_or_default();
        let sample = sampled.remove(&pos).unwrap_or_default();
        if let Some(r) = results.get_mut(pos) {
            r.accounts_sampled = sample.len() as u64;
            // Suspects beyond SUSPECT_CAP were neither re-checked nor drilled: they count.
            r.accounts_mismatched += overflow.get(&pos).copied().unwrap_or(0);
        }
        if list.is_empty() && sample.is_empty() {
            continue;
        }
        let mut drill: Vec<Suspect> = list;
        for a in sample {
            if !drill.iter().any(|s| s.account == a) {
                let index = ctx.shards.get(pos).map(|s| s.index);
                drill.push(Suspect {
                    account: a,
                    expected: index,
                });
            }
        }
        let Some(r) = results.get_mut(pos) else {
            continue;
        };
        drill_accounts(ctx, plan, pos, &drill, r, first_lsn).await?;
    }
    Ok(())
}

/// A row source that is either a cursor or nothing.
enum MaybeCursor<'a> {
    Open(Cursor<'a>),
    Empty,
}

impl RowSource for MaybeCursor<'_> {
    async fn next_row(&mut self) -> Result<Option<TextRow>, tokio_postgres::Error> {
        match self {
            MaybeCursor::Open(c) => c.next_row().await,
            MaybeCursor::Empty => Ok(None),
        }
    }
}

fn record(r: &mut TableShardResult, d: Difference) {
    match d.kind {
        DiffKind::Missing => r.missing += 1,
        DiffKind::Extra => r.extra += 1,
        DiffKind::Different => r.different += 1,
    }
    if r.differences.len() < MAX_DIFFS {
        r.differences.push(d);
    } else {
        r.differences_omitted += 1;
    }
}

/// Which source rows [`diff_rows`] reads.
enum SourceRows<'a> {
    /// The whole table.
    All,
    /// The rows matching this SQL condition.
    Matching(&'a str),
    /// None (the shard's rows are all extra).
    Nothing,
}

/// Row-by-row comparison of `plan`'s table on the source and on shard position `pos`: md5 per
/// row key on each side (`sql::row_hashes`, the shard's rows restricted by `shard_filter`),
/// merged by [`merge_rows`], which calls `diff` for each key that is missing, extra or
/// different. The caller has begun the source snapshot at `lsn` ([`begin_source`]); this
/// begins the shard's ([`begin_shard`]) and commits both, also on an error.
async fn diff_rows(
    ctx: &Ctx<'_>,
    plan: &Plan,
    pos: usize,
    lsn: Lsn,
    src: SourceRows<'_>,
    shard_filter: Option<&str>,
    diff: impl FnMut(DiffKind, &[Option<String>]),
) -> Result<(), VerifyError> {
    let Some(shard) = ctx.shards.get(pos) else {
        return Ok(());
    };
    let mut began = Vec::with_capacity(1);
    let outcome = async {
        begin_shard(ctx, pos, lsn).await?;
        began.push(pos);
        let src_filter = match src {
            SourceRows::All => Some(None),
            SourceRows::Matching(f) => Some(Some(f)),
            SourceRows::Nothing => None,
        };
        let src = match src_filter {
            None => MaybeCursor::Empty,
            Some(filter) => MaybeCursor::Open(
                Cursor::open(
                    &ctx.src,
                    "reshard_verify_src",
                    &sql::row_hashes(&plan.rule.source, &plan.order, &plan.columns, filter),
                )
                .await
                .map_err(q("source", Some(&plan.rule.source)))?,
            ),
        };
        let sh = Cursor::open(
            &shard.client,
            "reshard_verify_shard",
            &sql::row_hashes(&plan.rule.target, &plan.order, &plan.columns, shard_filter),
        )
        .await
        .map_err(q(&shard.name, Some(&plan.rule.target)))?;
        merge_rows(
            &mut Peeked::new(src),
            &mut Peeked::new(sh),
            plan.order.len(),
            diff,
        )
        .await
        .map_err(|e| merge_err(ctx, plan, &[pos], e))
    }
    .await;
    let closed = commit_all(ctx, &began).await;
    outcome?;
    closed
}

/// Row-by-row comparison of `accounts` on shard position `pos`.
async fn drill_accounts(
    ctx: &Ctx<'_>,
    plan: &Plan,
    pos: usize,
    accounts: &[Suspect],
    r: &mut TableShardResult,
    first_lsn: &mut Option<Lsn>,
) -> Result<(), VerifyError> {
    let Some(shard) = ctx.shards.get(pos) else {
        return Ok(());
    };
    let names = ctx.config.shard_names();
    let mut bad_accounts: BTreeSet<String> = BTreeSet::new();
    for chunk in accounts.chunks(DRILL_BATCH) {
        let routed_here: Vec<String> = chunk
            .iter()
            .filter(|s| s.expected == Some(shard.index))
            .map(|s| s.account.clone())
            .collect();
        let all: Vec<String> = chunk.iter().map(|s| s.account.clone()).collect();
        let belongs: HashMap<&str, Option<usize>> = chunk
            .iter()
            .map(|s| (s.account.as_str(), s.expected))
            .collect();
        // While the shards are being fed, a row written after the source side was read shows
        // up as a difference once; a real divergence shows up in every round. Only keys that
        // differ in every round are reported.
        let rounds = if ctx.live { RECHECK_ROUNDS + 1 } else { 1 };
        let mut persistent: Option<BTreeSet<Vec<Option<String>>>> = None;
        let mut diffs: Vec<Difference> = Vec::new();
        for round in 0..rounds {
            if round > 0 {
                if persistent.as_ref().is_some_and(|p| p.is_empty()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let lsn = begin_source(ctx).await?;
            first_lsn.get_or_insert(lsn);
            diffs.clear();
            let src_filter;
            let src = if routed_here.is_empty() {
                SourceRows::Nothing
            } else {
                src_filter = sql::key_in(&plan.rule.key, &plan.key_type, &routed_here);
                SourceRows::Matching(&src_filter)
            };
            let f = sql::key_in(&plan.rule.key, &plan.key_type, &all);
            diff_rows(ctx, plan, pos, lsn, src, Some(&f), |kind, key| {
                let account = key.first().cloned().flatten();
                let belongs_to = match (kind, account.as_deref().and_then(|a| belongs.get(a))) {
                    (DiffKind::Extra, Some(Some(e))) if *e != shard.index => names.get(*e).cloned(),
                    _ => None,
                };
                diffs.push(Difference {
                    kind,
                    account,
                    key: key.to_vec(),
                    belongs_to,
                });
            })
            .await?;
            let keys: BTreeSet<Vec<Option<String>>> = diffs.iter().map(|d| d.key.clone()).collect();
            persistent = Some(match persistent.take() {
                None => keys,
                Some(p) => p.intersection(&keys).cloned().collect(),
            });
        }
        let persistent = persistent.unwrap_or_default();
        diffs.retain(|d| persistent.contains(&d.key));
        if plan.rule.key_immutable {
            mark_moved_rows(ctx, plan, shard.index, &mut diffs).await?;
        }
        for d in diffs {
            if let Some(a) = &d.account {
                bad_accounts.insert(a.clone());
            }
            record(r, d);
        }
    }
    r.accounts_mismatched += bad_accounts.len() as u64;
    Ok(())
}

/// A `key_immutable` table whose promise was broken: a row left on this shard whose primary
/// key the source now holds under a key that routes elsewhere. Names that shard in
/// `belongs_to` (the row is on the wrong shard), so the violated assumption is reported as
/// such. Looked up by primary key on the source, one row per listed difference.
async fn mark_moved_rows(
    ctx: &Ctx<'_>,
    plan: &Plan,
    here: usize,
    diffs: &mut [Difference],
) -> Result<(), VerifyError> {
    let pk = plan.order.get(1..).unwrap_or_default();
    if pk.is_empty() {
        return Ok(());
    }
    let names = ctx.config.shard_names();
    let key = quote_ident(&plan.rule.key);
    let shard_sql = plan
        .route
        .as_ref()
        .map_or_else(|| "NULL::int4".to_owned(), |r| r.shard_expr(&key));
    let source = &plan.rule.source;
    for d in diffs
        .iter_mut()
        .filter(|d| d.kind == DiffKind::Extra && d.belongs_to.is_none())
        .take(MAX_DIFFS)
    {
        let Some(values) = d.key.get(1..).filter(|v| v.iter().all(Option::is_some)) else {
            continue;
        };
        let cond: Vec<String> = pk
            .iter()
            .zip(values)
            .map(|(c, v)| {
                format!(
                    "{} = {}",
                    quote_ident(c),
                    quote_literal(v.as_deref().unwrap_or_default())
                )
            })
            .collect();
        let sql = format!(
            "SELECT {key}::text, ({shard_sql})::int4 FROM {} WHERE {}",
            source.quoted(),
            cond.join(" AND ")
        );
        let Some(row) = ctx
            .src
            .query_opt(&sql, &[])
            .await
            .map_err(q("source", Some(source)))?
        else {
            continue;
        };
        let now: Option<String> = row.try_get(0).map_err(q("source", Some(source)))?;
        if now.is_none() || now == d.account {
            continue;
        }
        let shard = match (row.try_get::<_, Option<i32>>(1), &ctx.opts.router, &now) {
            (Ok(Some(s)), _, _) => usize::try_from(s).ok(),
            (_, Some(router), Some(a)) => router(plan.key_type_oid, a).ok(),
            _ => None,
        };
        if let Some(s) = shard.filter(|s| *s != here) {
            d.belongs_to = names.get(s).cloned();
        }
    }
    Ok(())
}

async fn verify_broadcast(
    ctx: &Ctx<'_>,
    plan: &Plan,
    results: &mut [TableShardResult],
    held: &mut Held,
    first_lsn: &mut Option<Lsn>,
) -> Result<(), VerifyError> {
    let agg = sql::table_aggregate(&plan.rule.source, &plan.columns);
    let agg_target = sql::table_aggregate(&plan.rule.target, &plan.columns);
    // The first look: every shard against one source aggregate, in the held snapshots.
    held.cover(ctx, &plan.shards, first_lsn).await?;
    let s = one_row(&ctx.src, &agg, "source", &plan.rule.source).await?;
    let mut pending = Vec::new();
    for &pos in &plan.shards {
        let Some(shard) = ctx.shards.get(pos) else {
            continue;
        };
        let t = one_row(&shard.client, &agg_target, &shard.name, &plan.rule.target).await?;
        if let Some(r) = results.get_mut(pos) {
            r.rows_source = s.0;
            r.rows_shard = t.0;
        }
        if s != t {
            pending.push(pos);
        }
    }
    if !pending.is_empty() {
        // Re-checks and drill-downs take fresh snapshots.
        held.close(ctx).await?;
    }
    let rounds = if ctx.live { RECHECK_ROUNDS } else { 0 };
    for _ in 0..rounds {
        if pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut still = Vec::new();
        for &pos in &pending {
            let lsn = begin_source(ctx).await?;
            first_lsn.get_or_insert(lsn);
            let mut began = Vec::with_capacity(1);
            let outcome = async {
                let s = one_row(&ctx.src, &agg, "source", &plan.rule.source).await?;
                begin_shard(ctx, pos, lsn).await?;
                began.push(pos);
                let Some(shard) = ctx.shards.get(pos) else {
                    return Ok((s.clone(), s));
                };
                let t = one_row(&shard.client, &agg_target, &shard.name, &plan.rule.target).await?;
                Ok::<_, VerifyError>((s, t))
            }
            .await;
            let closed = commit_all(ctx, &began).await;
            let (s, t) = outcome?;
            closed?;
            if let Some(r) = results.get_mut(pos) {
                r.rows_source = s.0;
                r.rows_shard = t.0;
            }
            if s != t {
                still.push(pos);
            }
        }
        pending = still;
    }
    for pos in pending {
        if ctx.shards.get(pos).is_none() {
            continue;
        }
        let Some(r) = results.get_mut(pos) else {
            continue;
        };
        let lsn = begin_source(ctx).await?;
        let mut diffs = Vec::new();
        diff_rows(ctx, plan, pos, lsn, SourceRows::All, None, |kind, key| {
            diffs.push(Difference {
                kind,
                account: None,
                key: key.to_vec(),
                belongs_to: None,
            })
        })
        .await?;
        for d in diffs {
            record(r, d);
        }
        if r.missing + r.extra + r.different == 0 && r.rows_source != r.rows_shard {
            // Only possible if the row key is not unique on one side.
            r.error = Some("row counts differ although every key matches (duplicate keys?)".into());
        }
    }
    Ok(())
}

/// `(count, sum)` of a whole-table aggregate.
async fn one_row(
    client: &Client,
    sql: &str,
    endpoint: &str,
    table: &TableName,
) -> Result<(u64, String), VerifyError> {
    let msgs = client
        .simple_query(sql)
        .await
        .map_err(q(endpoint, Some(table)))?;
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let n = r.get(0).and_then(|v| v.parse().ok()).unwrap_or(0);
            let s = r.get(1).unwrap_or("0").to_owned();
            return Ok((n, s));
        }
    }
    Err(VerifyError::Malformed {
        table: table.to_string(),
        message: "aggregate returned no row".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RoutingConfig, ShardConfig};
    use crate::route::Router;
    use crate::runtime::options::{load_map, route_spec};

    fn map_config(map: Option<std::path::PathBuf>) -> Config {
        Config {
            routing: RoutingConfig {
                hash: HashKind::Map,
                map,
                ..Default::default()
            },
            shards: ["a", "b"]
                .iter()
                .map(|n| ShardConfig {
                    name: (*n).into(),
                    url: format!("postgres://localhost/{n}"),
                    replicas: vec![],
                })
                .collect(),
            ..Default::default()
        }
    }

    /// See: issue #13 (account-map loading twice). `hash = "map"` with neither `map` nor
    /// `map_query` is refused by `run` (loading the map and building the router) and by
    /// `verify` alike, naming both keys; the router never runs with an empty map.
    #[tokio::test]
    async fn no_map_or_map_query_is_refused_by_run_and_verify_alike() {
        let cfg = map_config(None);
        let run = load_map(&cfg).await.err().expect("run refuses").to_string();
        let spec = route_spec(&cfg, &[], None)
            .expect_err("no router without a map")
            .to_string();
        let verify = map_router(&cfg)
            .await
            .err()
            .expect("verify refuses")
            .to_string();
        for e in [&run, &spec, &verify] {
            assert!(
                e.contains("[routing] map") && e.contains("map_query"),
                "names the keys: {e}"
            );
        }
        assert!(verify.contains(&run), "{verify} / {run}");
        assert_eq!(run, spec);
    }

    /// See: issue #13. `verify` routes a key exactly as the daemon's router does, including a
    /// key column whose type is not a parsed key type (looked up by its text).
    #[tokio::test]
    async fn verify_routes_keys_like_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.csv");
        std::fs::write(&path, "account_id,shard\n7,b\nacme,a\nzeta,b\n").unwrap();
        let cfg = map_config(Some(path));
        let map = load_map(&cfg).await.unwrap().expect("a map").map;
        let daemon = Router::new(route_spec(&cfg, &[], Some(map)).unwrap()).unwrap();
        let verify = map_router(&cfg).await.unwrap();
        // int8 `007`, text, and `name` (OID 19: not a parsed key type).
        for (oid, text) in [(20u32, "007"), (25, "acme"), (19, "zeta"), (19, "acme")] {
            let want = daemon
                .shard_of_text(oid, text.as_bytes())
                .map(|s| s.index())
                .map_err(|e| e.to_string());
            assert_eq!(verify(oid, text), want, "OID {oid} {text:?}");
            assert!(want.is_ok(), "OID {oid} {text:?}: {want:?}");
        }
    }
}
