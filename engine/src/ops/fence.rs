//! Write fencing: refuse the application's writes to one shard's accounts on one database,
//! without a proxy (`reshard fence|unfence`, `reshard cutover --fence`, and rollback).
//!
//! In: a [`FenceSpec`] (which shard, on which side, which tables) and a SQL connection to the
//! database to fence. Out: triggers in that database that raise SQLSTATE [`FENCE_SQLSTATE`]
//! for every row write the fence covers, and the fence's record ([`Fence`]).
//!
//! Two sides:
//! - [`FenceSide::Source`]: on the source, refuse writes of rows that route to the shard. The
//!   decision is routing's own: for `hash = "postgres"`, `satisfies_hash_partition` against a
//!   hash-partitioned helper table of the key column's exact type in the `reshard` schema,
//!   with `MODULUS` the number of shards and `REMAINDER` the shard's index (the function the
//!   router reproduces, see [`crate::route::hash`]); for `hash = "map"`, the account map as it
//!   was when the fence was installed, copied into `reshard.fence_map` (a map refreshed later is
//!   not seen: run `reshard fence` again to refresh it). Broadcast tables are never fenced.
//! - [`FenceSide::Shard`]: on a shard's database, refuse every write to its sharded tables
//!   (rollback: the shard stops taking writes while the reverse stream drains), or only the
//!   rows of a list of accounts ([`FenceRule::Accounts`], an account move: the list is written
//!   into the trigger function, `key::text IN (…)`).
//!
//! Invariants kept here:
//! - **The fence is a record, the triggers are derived from it.** `reshard.fence` holds one row
//!   per fenced shard; install and remove change that row and regenerate every per-table
//!   trigger function from all rows, in ONE transaction: the triggers never disagree with the
//!   record, and a crash leaves either the old state or the new one.
//! - **No write routed before the fence commits lands after it.** Installing takes
//!   `SHARE ROW EXCLUSIVE` locks on every fenced table (under `lock_timeout`, so a long
//!   transaction makes the install fail with its name instead of queueing the application
//!   behind it): a transaction that wrote a fenced table before the fence has committed
//!   before the fence does, so its WAL lies below any LSN read after the install.
//! - **Idempotent.** Installing an installed fence refreshes its tables and rule and keeps its
//!   `installed_at`; removing a fence that is not there is not an error.
//! - **Never lifted silently.** Only [`remove`] deletes a fence; every install, step and
//!   removal is logged in `reshard.fence_log`.
//!
//! The hot path: a `BEFORE INSERT OR UPDATE OR DELETE … FOR EACH ROW` trigger per fenced table,
//! a generated PL/pgSQL function with the fenced remainders written into it (one
//! `satisfies_hash_partition` call per fenced shard, on the helper's OID: no catalog lookup, no
//! table read). The refusal path, [`FENCE_REFUSE_FN`], bumps the fence's counter sequence
//! (`nextval` is not transactional, so the count survives the aborted write; a server crash
//! can move it forward by up to 32, never back) and raises. A `BEFORE TRUNCATE` trigger refuses
//! truncating a fenced table. Triggers are ordinary (`ENABLE` origin), so sessions with
//! `session_replication_role = replica` (reshard's own apply, by default) are not refused;
//! `SET reshard.fence_bypass = on` lets any other session through (rollback's reverse apply
//! without the replica role). The triggers are named `zz_reshard_fence*` so that they fire
//! after the table's own BEFORE triggers (alphabetical order) and judge the final row.
//! PostgreSQL 12 allows no BEFORE row trigger on a partitioned table: there the fence of a
//! partitioned table is an `AFTER … FOR EACH ROW` trigger (cloned onto every partition), whose
//! error aborts the statement all the same; it costs a little more per row (the after-trigger
//! queue).
//!
//! Docs relied on: trigger behaviour
//! <https://www.postgresql.org/docs/current/trigger-definition.html>, lock modes
//! <https://www.postgresql.org/docs/current/explicit-locking.html>, sequences not rolled back
//! <https://www.postgresql.org/docs/current/functions-sequence.html>,
//! `session_replication_role`
//! <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-SESSION-REPLICATION-ROLE>.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::{Client, GenericClient, Transaction};

use crate::config::{Config, HashKind, TableMode};
use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::pg::conn::{error_text, quote_ident, quote_literal};
use crate::pg::fence::{fence_table_exists, read_fences};
use crate::pg::sql::TableName;
use crate::route::AccountMap;

pub use crate::status::{Fence, FenceSide};

/// The SQLSTATE of a refused write (a reshard-specific code: class `RS`, "reshard").
pub const FENCE_SQLSTATE: &str = "RSF01";
/// The session setting that lets a session write through every fence on the database.
pub const FENCE_BYPASS_SETTING: &str = "reshard.fence_bypass";
/// The refusal function (bumps the counter, raises).
pub const FENCE_REFUSE_FN: &str = "reshard.fence_refuse";
/// Name of the row trigger on each fenced table.
pub const ROW_TRIGGER: &str = "zz_reshard_fence";
/// Name of the TRUNCATE trigger on each fenced table.
pub const TRUNCATE_TRIGGER: &str = "zz_reshard_fence_truncate";

/// Which rows of a fenced table are refused.
#[derive(Clone, Debug)]
pub enum FenceRule {
    /// Rows whose key satisfies `satisfies_hash_partition(helper, modulus, remainder, key)`.
    Hash {
        /// The number of shards.
        modulus: u32,
        /// The shard's index.
        remainder: u32,
    },
    /// Rows whose account the map sends to the shard.
    Map(std::sync::Arc<AccountMap>),
    /// Rows of these accounts (their key's text form): an account move fences only the
    /// accounts it moves.
    Accounts(Vec<String>),
    /// Every row.
    All,
}

impl FenceRule {
    fn kind(&self) -> &'static str {
        match self {
            FenceRule::Hash { .. } => "hash",
            FenceRule::Map(_) => "map",
            FenceRule::Accounts(_) => "accounts",
            FenceRule::All => "all",
        }
    }
}

/// A table to fence and its shard-key column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencedTable {
    /// The table on the fenced database (`reshard.fence.tables` holds its
    /// [`Display`](std::fmt::Display) form, which [`TableName::parse`] reads back).
    pub table: TableName,
    /// The shard-key column.
    pub key: String,
}

/// Everything [`install`] needs.
#[derive(Clone, Debug)]
pub struct FenceSpec {
    /// The shard whose writes are refused.
    pub shard: String,
    /// Source or shard.
    pub side: FenceSide,
    /// What the fence is for, named in every refusal (`cutover`, `rollback`, `reshard fence`).
    pub reason: String,
    /// Which rows.
    pub rule: FenceRule,
    /// The sharded tables (broadcast tables are never fenced).
    pub tables: Vec<FencedTable>,
    /// Longest wait for each table lock.
    pub lock_timeout: Duration,
}

impl FenceSpec {
    /// The fence of `shard`'s accounts on the source: every sharded table of the config,
    /// decided by the config's routing. `map` is the account map for `hash = "map"` (see
    /// [`crate::ops::verify::load_account_map`]); ignored for `hash = "postgres"`.
    pub async fn for_source(
        config: &Config,
        src: &Client,
        shard: &str,
        reason: &str,
        map: Option<std::sync::Arc<AccountMap>>,
    ) -> Result<FenceSpec, FenceError> {
        let index = shard_index(config, shard)?;
        let rule = match config.routing.hash {
            HashKind::Postgres => FenceRule::Hash {
                modulus: u32::try_from(config.shards.len()).unwrap_or(u32::MAX),
                remainder: index,
            },
            HashKind::Map => FenceRule::Map(map.ok_or_else(|| {
                FenceError::Config(
                    "routing.hash = \"map\": the fence needs the account map (routing.map or routing.map_query)".into(),
                )
            })?),
        };
        let tables = sharded_tables(config, src, |r| r.source.clone()).await?;
        Ok(FenceSpec {
            shard: shard.to_owned(),
            side: FenceSide::Source,
            reason: reason.to_owned(),
            rule,
            tables,
            lock_timeout: Duration::from_millis(config.cutover.fence_lock_timeout_ms),
        })
    }

    /// The fence of every write to `shard`'s sharded tables on the shard's own database (the
    /// table list comes from the source's catalog; the names are the shards' target names).
    pub async fn for_shard(
        config: &Config,
        src: &Client,
        shard: &str,
        reason: &str,
    ) -> Result<FenceSpec, FenceError> {
        Self::on_shard_db(config, src, shard, shard, reason, FenceRule::All).await
    }

    /// The fence of `accounts`' writes on `shard`'s own database (an account move): every
    /// sharded table (its name on the shards, listed by the source's catalog), refusing only
    /// rows of those accounts. `name` is the fence's name (the move), `reason` says what it is.
    pub async fn for_accounts(
        config: &Config,
        src: &Client,
        shard: &str,
        name: &str,
        reason: &str,
        accounts: &[String],
    ) -> Result<FenceSpec, FenceError> {
        let rule = FenceRule::Accounts(accounts.to_vec());
        Self::on_shard_db(config, src, shard, name, reason, rule).await
    }

    /// A fence named `name` on `shard`'s own database: every sharded table (its name on the
    /// shards, listed by the source's catalog), refusing the rows `rule` selects.
    async fn on_shard_db(
        config: &Config,
        src: &Client,
        shard: &str,
        name: &str,
        reason: &str,
        rule: FenceRule,
    ) -> Result<FenceSpec, FenceError> {
        shard_index(config, shard)?;
        let tables = sharded_tables(config, src, |r| r.target.clone()).await?;
        Ok(FenceSpec {
            shard: name.to_owned(),
            side: FenceSide::Shard,
            reason: reason.to_owned(),
            rule,
            tables,
            lock_timeout: Duration::from_millis(config.cutover.fence_lock_timeout_ms),
        })
    }
}

impl FenceSpec {
    /// The fence of one hash range's writes on `shard`'s own database (a move of
    /// `reshard rebalance`): every sharded table (its name on the shards), refusing the rows
    /// whose key satisfies `satisfies_hash_partition(helper, modulus, remainder, key)`. `name`
    /// is the fence's name (the move).
    pub async fn for_hash_range(
        config: &Config,
        src: &Client,
        shard: &str,
        name: &str,
        reason: &str,
        modulus: u32,
        remainder: u32,
    ) -> Result<FenceSpec, FenceError> {
        let rule = FenceRule::Hash { modulus, remainder };
        Self::on_shard_db(config, src, shard, name, reason, rule).await
    }
}

/// The hash-partitioned helper table (in the `reshard` schema) whose partition key has the
/// type of OID `type_oid`: the first argument of every `satisfies_hash_partition` reshard
/// writes (fences, hash-range moves).
pub fn hash_helper_name(type_oid: u32) -> String {
    format!("reshard.fence_route_{type_oid}")
}

fn shard_index(config: &Config, shard: &str) -> Result<u32, FenceError> {
    config
        .shards
        .iter()
        .position(|s| s.name == shard)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| FenceError::UnknownShard {
            name: shard.to_owned(),
            known: config.shard_names(),
        })
}

async fn sharded_tables(
    config: &Config,
    src: &Client,
    name: impl Fn(&crate::config::TableRule) -> TableName,
) -> Result<Vec<FencedTable>, FenceError> {
    Ok(crate::pg::catalog::discover(src, config)
        .await
        .map_err(FenceError::Tables)?
        .into_iter()
        .filter(|t| t.rule.mode == TableMode::Sharded)
        .map(|t| FencedTable {
            table: name(&t.rule),
            key: t.rule.key.clone(),
        })
        .collect())
}

/// Fencing failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// `--shard` names no configured shard.
    #[error("unknown shard {name:?}; the config's shards are {known:?}")]
    UnknownShard {
        /// Name given.
        name: String,
        /// Configured names.
        known: Vec<String>,
    },
    /// The config cannot describe the fence.
    #[error("{0}")]
    Config(String),
    /// The replicated tables could not be resolved.
    #[error(transparent)]
    Tables(crate::pg::catalog::CatalogError),
    /// A fenced table does not exist or lacks its key column on the fenced database.
    #[error("cannot fence table {table} on the {side}: {problem}")]
    Table {
        /// Table.
        table: String,
        /// Source or shard.
        side: FenceSide,
        /// What is wrong.
        problem: String,
    },
    /// A table lock was not granted within the lock timeout.
    #[error("could not lock {tables} on the {side} within {timeout_ms} ms to change the fence of shard {shard}: a long transaction holds one of them (see pg_stat_activity on that database); retry, or raise [cutover] fence_lock_timeout_ms")]
    LockTimeout {
        /// Shard.
        shard: String,
        /// Source or shard.
        side: FenceSide,
        /// The tables being locked.
        tables: String,
        /// The timeout.
        timeout_ms: u128,
    },
    /// A query failed.
    #[error("{what} on the {side} failed: {}", error_text(error))]
    Query {
        /// Source or shard.
        side: FenceSide,
        /// What was being done.
        what: String,
        /// Driver error.
        error: tokio_postgres::Error,
    },
}

impl Classify for FenceError {
    fn class(&self) -> ErrorClass {
        match self {
            FenceError::Query { error, .. } => class_of_pg(error),
            FenceError::Tables(e) => e.class(),
            FenceError::LockTimeout { .. } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}

fn qerr(side: FenceSide, what: &str) -> impl Fn(tokio_postgres::Error) -> FenceError + '_ {
    move |error| FenceError::Query {
        side,
        what: what.to_owned(),
        error,
    }
}

/// Whether `e` is a write refused by a fence (SQLSTATE [`FENCE_SQLSTATE`]).
pub fn is_refusal(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == FENCE_SQLSTATE)
}

const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS reshard;
CREATE TABLE IF NOT EXISTS reshard.fence (
    id bigint GENERATED ALWAYS AS IDENTITY,
    shard text PRIMARY KEY,
    side text NOT NULL,
    reason text NOT NULL,
    rule text NOT NULL,
    modulus int,
    remainder int,
    default_shard text,
    tables text[] NOT NULL,
    keys text[] NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    step text NOT NULL DEFAULT 'fenced',
    step_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lsn pg_lsn,
    accounts text[]
);
-- A reshard.fence made before the accounts rule. Only then: ALTER TABLE takes an ACCESS
-- EXCLUSIVE lock, which deadlocks with a writer whose fence trigger reads the table.
DO $reshard_fence$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'reshard.fence'::regclass
                   AND attname = 'accounts' AND NOT attisdropped) THEN
        ALTER TABLE reshard.fence ADD COLUMN accounts text[];
    END IF;
END $reshard_fence$;
CREATE TABLE IF NOT EXISTS reshard.fence_log (
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    shard text NOT NULL,
    side text NOT NULL,
    event text NOT NULL,
    detail text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS reshard.fence_map (
    account text PRIMARY KEY,
    shard text NOT NULL
);
GRANT USAGE ON SCHEMA reshard TO PUBLIC;
GRANT SELECT ON reshard.fence_map TO PUBLIC;
";

/// The refusal: bumps the fence's counter and raises. SECURITY DEFINER so that the
/// application's role needs no privilege on reshard's tables; only reached for a refused row.
fn refuse_fn_sql() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {FENCE_REFUSE_FN}(p_shard text, p_table text, p_key text) \
         RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $reshard_fence$
DECLARE f record;
BEGIN
    IF current_setting('{FENCE_BYPASS_SETTING}', true) = 'on' THEN RETURN; END IF;
    SELECT id, reason, side, installed_at INTO f FROM reshard.fence WHERE shard = p_shard;
    IF NOT FOUND THEN RETURN; END IF;
    PERFORM nextval(format('reshard.fence_refused_%s', f.id)::regclass);
    -- A move's fence is recorded under the move's id (moves::move_id: move_<from>_<to>_<crc>).
    IF p_shard LIKE 'move\\_%' THEN
        RAISE EXCEPTION USING
            ERRCODE = '{FENCE_SQLSTATE}',
            MESSAGE = format('reshard: move %s fenced this account on this database (%s, since %s): its writes are refused here (table %s, %s)',
                             p_shard, f.reason, f.installed_at, p_table, p_key),
            DETAIL = format('the move''s accounts (or hash range) belong to its target shard; this write was routed by the layout from before move %s', p_shard),
            HINT = format('route the write by the current account map (or reshard.layout) and retry it there; lift the fence only once no writer routes by the old layout: reshard unfence --shard <the move''s source shard> --on shard --fence %s', p_shard);
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = '{FENCE_SQLSTATE}',
        MESSAGE = format('reshard: shard %s is fenced (%s, since %s): writes to its accounts are refused on this database (table %s, %s)',
                         p_shard, f.reason, f.installed_at, p_table, p_key),
        DETAIL = format('reshard fenced shard %s on the %s; this write routes to it', p_shard, f.side),
        HINT = format('send this account''s writes to shard %s once its cutover reports SAFE, or lift the fence with: reshard unfence --shard %s', p_shard, p_shard);
END
$reshard_fence$;
CREATE OR REPLACE FUNCTION reshard.fence_truncate() RETURNS trigger LANGUAGE plpgsql AS $reshard_fence$
DECLARE s text;
BEGIN
    -- The trigger's argument is the table as reshard.fence.tables spells it (quoted where
    -- needed); triggers created before it had one match the plain `schema.table` text.
    SELECT shard INTO s FROM reshard.fence
     WHERE TG_ARGV[0] = ANY (tables) OR (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME) = ANY (tables)
     ORDER BY shard LIMIT 1;
    IF FOUND THEN PERFORM {FENCE_REFUSE_FN}(s, coalesce(TG_ARGV[0], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME), 'TRUNCATE'); END IF;
    RETURN NULL;
END
$reshard_fence$;
GRANT SELECT ON reshard.fence TO PUBLIC;
"
    )
}

/// One fence row as stored.
struct Stored {
    shard: String,
    rule: String,
    modulus: Option<i32>,
    remainder: Option<i32>,
    default_shard: Option<String>,
    tables: Vec<String>,
    keys: Vec<String>,
    accounts: Option<Vec<String>>,
}

/// Installs (or refreshes) a fence. Returns the fence as recorded.
pub async fn install(client: &mut Client, spec: &FenceSpec) -> Result<Fence, FenceError> {
    let side = spec.side;
    let tx = client
        .transaction()
        .await
        .map_err(qerr(side, "starting the fence transaction"))?;
    // Two reshard commands never change fences at once.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(qerr(side, "setting client_min_messages"))?;
    tx.batch_execute(SCHEMA_SQL)
        .await
        .map_err(qerr(side, "creating the reshard schema"))?;
    tx.batch_execute("LOCK TABLE reshard.fence IN EXCLUSIVE MODE")
        .await
        .map_err(qerr(side, "locking reshard.fence"))?;
    tx.batch_execute(&refuse_fn_sql())
        .await
        .map_err(qerr(side, "creating the fence functions"))?;
    for t in &spec.tables {
        check_table(&tx, side, t).await?;
    }
    let accounts: Option<Vec<String>> = match &spec.rule {
        FenceRule::Accounts(a) => Some(a.clone()),
        _ => None,
    };
    let (modulus, remainder, default_shard) = match &spec.rule {
        FenceRule::Hash { modulus, remainder } => (
            Some(i32::try_from(*modulus).unwrap_or(i32::MAX)),
            Some(i32::try_from(*remainder).unwrap_or(i32::MAX)),
            None,
        ),
        FenceRule::Map(m) => {
            write_map(&tx, side, m).await?;
            (None, None, m.default_shard().map(str::to_owned))
        }
        FenceRule::All | FenceRule::Accounts(_) => (None, None, None),
    };
    let tables: Vec<String> = spec.tables.iter().map(|t| t.table.to_string()).collect();
    let keys: Vec<String> = spec.tables.iter().map(|t| t.key.clone()).collect();
    let side_s = side.to_string();
    let row = tx
        .query_one(
            "INSERT INTO reshard.fence AS f (shard, side, reason, rule, modulus, remainder, default_shard, tables, keys, accounts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (shard) DO UPDATE SET side = EXCLUDED.side, reason = EXCLUDED.reason, \
               rule = EXCLUDED.rule, modulus = EXCLUDED.modulus, remainder = EXCLUDED.remainder, \
               default_shard = EXCLUDED.default_shard, tables = EXCLUDED.tables, keys = EXCLUDED.keys, \
               accounts = EXCLUDED.accounts \
             RETURNING id, (xmax = 0)",
            &[
                &spec.shard,
                &side_s,
                &spec.reason,
                &spec.rule.kind(),
                &modulus,
                &remainder,
                &default_shard,
                &tables,
                &keys,
                &accounts,
            ],
        )
        .await
        .map_err(qerr(side, "recording the fence in reshard.fence"))?;
    let id: i64 = row.get(0);
    let inserted: bool = row.get(1);
    tx.batch_execute(&format!(
        "CREATE SEQUENCE IF NOT EXISTS reshard.fence_refused_{id}"
    ))
    .await
    .map_err(qerr(side, "creating the fence's counter"))?;
    log(
        &tx,
        side,
        &spec.shard,
        if inserted { "installed" } else { "refreshed" },
        &format!(
            "{}; {} tables; {}",
            spec.reason,
            tables.len(),
            spec.rule.kind()
        ),
    )
    .await
    .map_err(qerr(side, "logging the fence"))?;
    regenerate(&tx, side, &spec.shard, spec.lock_timeout).await?;
    if inserted {
        // The fence takes effect now that every table lock is held (and for everyone at the
        // commit just below): a write that started after this instant is refused.
        tx.execute(
            "UPDATE reshard.fence SET installed_at = clock_timestamp(), step_at = clock_timestamp() WHERE shard = $1",
            &[&spec.shard],
        )
        .await
        .map_err(qerr(side, "recording the fence's time"))?;
    }
    tx.commit()
        .await
        .map_err(qerr(side, "committing the fence"))?;
    tracing::info!(shard = %spec.shard, side = %side, tables = tables.len(), rule = spec.rule.kind(), "fence {}", if inserted { "installed" } else { "refreshed" });
    let fences = status(client, side).await?;
    fences
        .into_iter()
        .find(|f| f.shard == spec.shard)
        .ok_or_else(|| {
            FenceError::Config(format!(
                "the fence of shard {} vanished right after it was installed",
                spec.shard
            ))
        })
}

/// Removes the fence of `shard` from this database; `None` if there was none.
pub async fn remove(
    client: &mut Client,
    side: FenceSide,
    shard: &str,
    lock_timeout: Duration,
) -> Result<Option<Fence>, FenceError> {
    if !fence_table_exists(client)
        .await
        .map_err(qerr(side, "looking for reshard.fence"))?
    {
        return Ok(None);
    }
    let before = status(client, side)
        .await?
        .into_iter()
        .find(|f| f.shard == shard);
    let Some(before) = before else {
        return Ok(None);
    };
    let tx = client
        .transaction()
        .await
        .map_err(qerr(side, "starting the unfence transaction"))?;
    tx.batch_execute("LOCK TABLE reshard.fence IN EXCLUSIVE MODE")
        .await
        .map_err(qerr(side, "locking reshard.fence"))?;
    let id: Option<i64> = tx
        .query_opt(
            "DELETE FROM reshard.fence WHERE shard = $1 RETURNING id",
            &[&shard],
        )
        .await
        .map_err(qerr(side, "deleting the fence"))?
        .map(|r| r.get(0));
    if let Some(id) = id {
        tx.batch_execute(&format!(
            "DROP SEQUENCE IF EXISTS reshard.fence_refused_{id}"
        ))
        .await
        .map_err(qerr(side, "dropping the fence's counter"))?;
    }
    log(
        &tx,
        side,
        shard,
        "removed",
        &format!(
            "after {:.1}s, {} writes refused",
            before.fenced_secs, before.refused
        ),
    )
    .await
    .map_err(qerr(side, "logging the fence"))?;
    regenerate(&tx, side, shard, lock_timeout).await?;
    tx.commit()
        .await
        .map_err(qerr(side, "committing the unfence"))?;
    tracing::info!(shard = %shard, side = %side, fenced_secs = before.fenced_secs, refused = before.refused, "fence removed");
    Ok(Some(before))
}

/// The fences installed on this database (none when reshard never fenced anything here).
pub async fn status(client: &Client, side: FenceSide) -> Result<Vec<Fence>, FenceError> {
    read_fences(client)
        .await
        .map_err(qerr(side, "reading reshard.fence"))
}

/// Records a step of the command that uses the fence (`caught_up`, `sequences_synced`, …) in
/// the fence's row and log. A fence that is not there is an error: the step would be about a
/// write path that is open.
pub async fn record_step(
    client: &Client,
    side: FenceSide,
    shard: &str,
    step: &str,
    lsn: Option<Lsn>,
    detail: &str,
) -> Result<(), FenceError> {
    let lsn_text = lsn.map(|l| l.to_string());
    let n = client
        .execute(
            "UPDATE reshard.fence SET step = $2, step_at = clock_timestamp(), \
               lsn = COALESCE($3::text::pg_lsn, lsn) WHERE shard = $1",
            &[&shard, &step, &lsn_text],
        )
        .await
        .map_err(qerr(side, "recording a fence step"))?;
    if n == 0 {
        return Err(FenceError::Config(format!(
            "shard {shard} is no longer fenced on the {side} (someone ran reshard unfence); its writes are not refused: run the command again"
        )));
    }
    let tx_log = format!(
        "{step}{}",
        lsn.map(|l| format!(" at {l}")).unwrap_or_default()
    );
    log(client, side, shard, &tx_log, detail)
        .await
        .map_err(qerr(side, "logging a fence step"))?;
    Ok(())
}

/// Appends `event` of the fence of `shard` on `side` to `reshard.fence_log` (inside the
/// caller's transaction, if any).
async fn log(
    client: &impl GenericClient,
    side: FenceSide,
    shard: &str,
    event: &str,
    detail: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO reshard.fence_log (shard, side, event, detail) VALUES ($1, $2, $3, $4)",
            &[&shard, &side.to_string(), &event, &detail],
        )
        .await?;
    Ok(())
}

async fn check_table(
    tx: &Transaction<'_>,
    side: FenceSide,
    t: &FencedTable,
) -> Result<(), FenceError> {
    let found = tx
        .query_opt(
            "SELECT a.atttypid FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&t.table.quoted(), &t.key],
        )
        .await
        .map_err(qerr(side, "describing a fenced table"))?;
    if found.is_none() {
        return Err(FenceError::Table {
            table: t.table.to_string(),
            side,
            problem: format!(
                "no such table with a column {} (the config routes it by that column); create it or fix [[tables]]",
                t.key
            ),
        });
    }
    Ok(())
}

/// The map's accounts, under every spelling `key::text` can produce for them.
async fn write_map(
    tx: &Transaction<'_>,
    side: FenceSide,
    m: &AccountMap,
) -> Result<(), FenceError> {
    tx.batch_execute("TRUNCATE reshard.fence_map")
        .await
        .map_err(qerr(side, "clearing reshard.fence_map"))?;
    const CHUNK: usize = 10_000;
    let mut accounts = Vec::with_capacity(CHUNK);
    let mut shards = Vec::with_capacity(CHUNK);
    let flush = |accounts: Vec<String>, shards: Vec<String>| async move {
        tx.execute(
            "INSERT INTO reshard.fence_map (account, shard) SELECT * FROM unnest($1::text[], $2::text[]) \
             ON CONFLICT (account) DO NOTHING",
            &[&accounts, &shards],
        )
        .await
        .map_err(qerr(side, "writing reshard.fence_map"))
    };
    for (spelling, shard) in m.spellings() {
        accounts.push(spelling);
        shards.push(shard.to_owned());
        if accounts.len() == CHUNK {
            flush(std::mem::take(&mut accounts), std::mem::take(&mut shards)).await?;
        }
    }
    if !accounts.is_empty() {
        flush(accounts, shards).await?;
    }
    Ok(())
}

/// Regenerates the trigger functions of every table some fence covers, drops the triggers
/// of tables none covers any more, and locks every table whose fence changed.
async fn regenerate(
    tx: &Transaction<'_>,
    side: FenceSide,
    shard: &str,
    lock_timeout: Duration,
) -> Result<(), FenceError> {
    let rows = tx
        .query(
            "SELECT shard, rule, modulus, remainder, default_shard, tables, keys, accounts FROM reshard.fence ORDER BY shard",
            &[],
        )
        .await
        .map_err(qerr(side, "reading reshard.fence"))?;
    let fences: Vec<Stored> = rows
        .iter()
        .map(|r| Stored {
            shard: r.get(0),
            rule: r.get(1),
            modulus: r.get(2),
            remainder: r.get(3),
            default_shard: r.get(4),
            tables: r.get(5),
            keys: r.get(6),
            accounts: r.get(7),
        })
        .collect();
    // table -> (key, fences covering it)
    let mut wanted: BTreeMap<TableName, (String, Vec<&Stored>)> = BTreeMap::new();
    for f in &fences {
        for (t, k) in f.tables.iter().zip(&f.keys) {
            let t = TableName::parse(t).map_err(|e| {
                FenceError::Config(format!(
                    "the fence of shard {} in reshard.fence on the {side} names a table that \
                     cannot be read back ({e}); lift it with: reshard unfence --shard {} --on \
                     {side}, then fence again",
                    f.shard, f.shard
                ))
            })?;
            wanted
                .entry(t)
                .or_insert_with(|| (k.clone(), Vec::new()))
                .1
                .push(f);
        }
    }
    // Tables that carry a fence trigger now, without the partitions of a fenced partitioned
    // table: PostgreSQL clones the parent's row trigger onto each of them, and only the
    // parent's can be dropped (dropping a clone fails with 2BP01, which made every fence
    // change after the first one fail on a source with a partitioned sharded table).
    // Schema and name apart, as the catalog holds them (either may contain a dot or spaces, so
    // `nspname || '.' || relname` cannot be split back into the table it names).
    let existing: Vec<TableName> = tx
        .query(
            "SELECT n.nspname, c.relname FROM pg_trigger g \
             JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE g.tgname = $1 AND NOT (c.relispartition AND EXISTS ( \
               SELECT 1 FROM pg_partition_ancestors(c.oid) a(relid) \
               JOIN pg_trigger p ON p.tgrelid = a.relid AND p.tgname = g.tgname \
               WHERE a.relid <> c.oid)) ORDER BY 1, 2",
            &[&ROW_TRIGGER],
        )
        .await
        .map_err(qerr(side, "listing fence triggers"))?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let stale: Vec<&TableName> = existing
        .iter()
        .filter(|t| !wanted.contains_key(*t))
        .collect();
    // (as messages name it, as SQL names it) of every table to lock.
    let lock: Vec<(String, String)> = wanted
        .keys()
        .map(|t| (t.to_string(), t.quoted()))
        .chain(stale.iter().map(|t| (t.to_string(), t.quoted())))
        .collect();
    if !lock.is_empty() {
        let list: Vec<&str> = lock.iter().map(|(_, q)| q.as_str()).collect();
        let list = list.join(", ");
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(qerr(side, "setting lock_timeout"))?;
        if let Err(e) = tx
            .batch_execute(&format!("LOCK TABLE {list} IN SHARE ROW EXCLUSIVE MODE"))
            .await
        {
            if e.code().is_some_and(|c| c.code() == "55P03") {
                return Err(FenceError::LockTimeout {
                    shard: shard.to_owned(),
                    side,
                    tables: lock
                        .iter()
                        .map(|(t, _)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    timeout_ms: lock_timeout.as_millis(),
                });
            }
            return Err(qerr(side, "locking the fenced tables")(e));
        }
    }
    for t in stale {
        let oid: u32 = tx
            .query_one("SELECT $1::text::regclass::oid", &[&t.quoted()])
            .await
            .map_err(qerr(side, "looking up a fenced table"))?
            .get(0);
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {ROW_TRIGGER} ON {q}; DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {q}; \
             DROP FUNCTION IF EXISTS reshard.fence_row_{oid}()",
            q = t.quoted()
        ))
        .await
        .map_err(qerr(side, "dropping a fence trigger"))?;
    }
    for (table, (key, covering)) in &wanted {
        let q = table.quoted();
        let display = table.to_string();
        let r = tx
            .query_one(
                "SELECT c.oid, a.atttypid, format_type(a.atttypid, NULL), \
                        c.relkind = 'p' AND current_setting('server_version_num')::int < 130000 \
                 FROM pg_class c \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped \
                 WHERE c.oid = $1::text::regclass",
                &[&q, key],
            )
            .await
            .map_err(qerr(side, &format!("describing {table}")))?;
        let oid: u32 = r.get(0);
        let type_oid: u32 = r.get(1);
        let type_name: String = r.get(2);
        // PostgreSQL 12 has no BEFORE row triggers on a partitioned table; an AFTER row trigger
        // (cloned onto every partition) refuses the same rows: its error aborts the statement.
        let timing = if r.get::<_, bool>(3) {
            "AFTER"
        } else {
            "BEFORE"
        };
        let helper = if covering.iter().any(|f| f.rule == "hash") {
            Some(ensure_helper(tx, side, type_oid, &type_name).await?)
        } else {
            None
        };
        let body = row_function_body(&display, key, helper, covering);
        tx.batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION reshard.fence_row_{oid}() RETURNS trigger LANGUAGE plpgsql AS $reshard_fence$\n{body}\n$reshard_fence$"
        ))
        .await
        .map_err(qerr(side, &format!("creating the fence function of {table}")))?;
        let has = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2)",
                &[&q, &ROW_TRIGGER],
            )
            .await
            .map_err(qerr(side, "looking for a fence trigger"))?
            .get::<_, bool>(0);
        if !has {
            tx.batch_execute(&format!(
                "CREATE TRIGGER {ROW_TRIGGER} {timing} INSERT OR UPDATE OR DELETE ON {q} \
                   FOR EACH ROW EXECUTE FUNCTION reshard.fence_row_{oid}(); \
                 CREATE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {q} \
                   FOR EACH STATEMENT EXECUTE FUNCTION reshard.fence_truncate({})",
                quote_literal(&display)
            ))
            .await
            .map_err(|e| FenceError::Table {
                table: display.clone(),
                side,
                problem: format!("CREATE TRIGGER failed: {}", error_text(&e)),
            })?;
        }
    }
    Ok(())
}

/// The hash-partitioned helper of a key type (no partitions: only its partition key is used).
async fn ensure_helper(
    tx: &Transaction<'_>,
    side: FenceSide,
    type_oid: u32,
    type_name: &str,
) -> Result<u32, FenceError> {
    let name = hash_helper_name(type_oid);
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {name} (k {type_name}) PARTITION BY HASH (k)"
    ))
    .await
    .map_err(qerr(side, &format!("creating the routing helper {name}")))?;
    let oid: u32 = tx
        .query_one("SELECT $1::text::regclass::oid", &[&name])
        .await
        .map_err(qerr(side, "looking up the routing helper"))?
        .get(0);
    Ok(oid)
}

/// The PL/pgSQL body of a table's row trigger function: every fence that covers the table,
/// judged on NEW (INSERT, UPDATE) and OLD (UPDATE, DELETE).
fn row_function_body(table: &str, key: &str, helper: Option<u32>, covering: &[&Stored]) -> String {
    let checks = |row: &str| -> String {
        let k = format!("{row}.{}", quote_ident(key));
        let mut s = String::new();
        for f in covering {
            let refuse = format!(
                "PERFORM {FENCE_REFUSE_FN}({}, {}, {});",
                quote_literal(&f.shard),
                quote_literal(table),
                format_args!(
                    "{} || '=' || coalesce({k}::text, 'NULL')",
                    quote_literal(key)
                )
            );
            let cond = match (f.rule.as_str(), helper, f.modulus, f.remainder) {
                ("hash", Some(h), Some(m), Some(r)) => {
                    format!("{k} IS NOT NULL AND satisfies_hash_partition({h}::oid, {m}, {r}, {k})")
                }
                ("map", ..) => format!(
                    "{k} IS NOT NULL AND coalesce((SELECT m.shard FROM reshard.fence_map m WHERE m.account = {k}::text), {}) = {}",
                    f.default_shard
                        .as_deref()
                        .map_or_else(|| "NULL".to_owned(), quote_literal),
                    quote_literal(&f.shard)
                ),
                ("accounts", ..) => {
                    let list: Vec<String> = f
                        .accounts
                        .iter()
                        .flatten()
                        .map(|a| quote_literal(a))
                        .collect();
                    if list.is_empty() {
                        "false".to_owned()
                    } else {
                        format!("{k} IS NOT NULL AND {k}::text IN ({})", list.join(", "))
                    }
                }
                _ => "true".to_owned(),
            };
            s.push_str(&format!("        IF {cond} THEN {refuse} END IF;\n"));
        }
        s
    };
    format!(
        "BEGIN\n    IF TG_OP <> 'DELETE' THEN\n{}    END IF;\n    IF TG_OP <> 'INSERT' THEN\n{}    END IF;\n    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;\n    RETURN NEW;\nEND",
        checks("NEW"),
        checks("OLD")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(shard: &str, rule: &str, m: Option<i32>, r: Option<i32>) -> Stored {
        Stored {
            shard: shard.into(),
            rule: rule.into(),
            modulus: m,
            remainder: r,
            default_shard: None,
            tables: vec!["public.items".into()],
            keys: vec!["account_id".into()],
            accounts: None,
        }
    }

    #[test]
    fn accounts_fence_refuses_only_the_listed_accounts() {
        let mut f = stored("shard1->shard2", "accounts", None, None);
        f.accounts = Some(vec!["42".into(), "7'7".into()]);
        let body = row_function_body("public.items", "account_id", None, &[&f]);
        assert!(
            body.contains("NEW.\"account_id\"::text IN ('42', '7''7')"),
            "{body}"
        );
        assert!(
            body.contains("OLD.\"account_id\"::text IN ('42', '7''7')"),
            "{body}"
        );
    }

    #[test]
    fn hash_fence_checks_new_and_old_with_the_helper_oid() {
        let f = stored("s1", "hash", Some(4), Some(1));
        let body = row_function_body("public.items", "account_id", Some(777), &[&f]);
        assert!(
            body.contains("satisfies_hash_partition(777::oid, 4, 1, NEW.\"account_id\")"),
            "{body}"
        );
        assert!(
            body.contains("satisfies_hash_partition(777::oid, 4, 1, OLD.\"account_id\")"),
            "{body}"
        );
        assert!(
            body.contains("reshard.fence_refuse('s1', 'public.items'"),
            "{body}"
        );
        assert!(
            body.contains("IF TG_OP = 'DELETE' THEN RETURN OLD"),
            "{body}"
        );
    }

    #[test]
    fn all_fence_refuses_every_row() {
        let f = stored("s2", "all", None, None);
        let body = row_function_body("public.items", "account_id", None, &[&f]);
        assert!(
            body.contains("IF true THEN PERFORM reshard.fence_refuse('s2'"),
            "{body}"
        );
    }

    #[test]
    fn two_fences_on_one_table_are_both_checked() {
        let a = stored("s0", "hash", Some(3), Some(0));
        let b = stored("s2", "hash", Some(3), Some(2));
        let body = row_function_body("public.items", "account_id", Some(5), &[&a, &b]);
        assert!(body.contains("5::oid, 3, 0, NEW"), "{body}");
        assert!(body.contains("5::oid, 3, 2, NEW"), "{body}");
    }
}
