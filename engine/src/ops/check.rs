//! Preflight checks (`reshard check`).
//!
//! In: the validated [`Config`]. Out: a [`CheckReport`]: one [`CheckResult`] per check, each
//! PASS / WARN / FAIL with the target it concerns (`source` or a shard name), a detail naming
//! the table, column, role or setting, and for failures the SQL that fixes it. Nothing is
//! written anywhere: every check reads catalogs and settings only (`reshard check --fix` runs
//! [`crate::pg::identity::fix_replica_identity`] first).
//!
//! What must hold before `reshard run` (each has a check here):
//! - logical decoding is possible: `wal_level = logical`, a free replication slot and WAL
//!   sender (<https://www.postgresql.org/docs/current/logical-replication-config.html>);
//! - the role may stream and read: `REPLICATION` (or superuser), `SELECT` on every table, and
//!   CREATE on the database plus table ownership if the publication must be created
//!   (<https://www.postgresql.org/docs/current/logical-replication-security.html>);
//! - every UPDATE/DELETE can be routed: a usable replica identity that contains the shard key,
//!   or `key_immutable` (see [`crate::pg::identity`]; `reshard run` refuses the same tables)
//!   (<https://www.postgresql.org/docs/current/sql-altertable.html#SQL-ALTERTABLE-REPLICA-IDENTITY>);
//! - every shard has the tables with the same column types and lets the role write them and
//!   create the `reshard` schema;
//! - publication and slot are in a state `reshard run` can use (not in use by someone else).

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, TableMode, TableRule};
use crate::pg::catalog::{setting, CatalogError, TableSet};
use crate::pg::conn::{connect_plain, quote_ident, quote_literal};
use crate::pg::identity::KeyStrategy;
use crate::pg::sql::TableName;
use crate::pg::table::{describe_table, TableInfo, SUPPORTED_KEY_TYPES};

/// How long one endpoint may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Fine.
    Pass,
    /// Works, but an operator should know.
    Warn,
    /// `reshard run` would fail or lose data.
    Fail,
}

impl CheckStatus {
    /// `PASS` / `WARN` / `FAIL`.
    pub fn label(self) -> &'static str {
        match self {
            CheckStatus::Pass => "PASS",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// PASS / WARN / FAIL.
    pub status: CheckStatus,
    /// Stable check name, e.g. `wal_level`, `replica_identity`.
    pub check: String,
    /// `source` or the shard name.
    pub target: String,
    /// What was found (names the table/column/role/setting).
    pub detail: String,
    /// SQL (or config change, as an SQL comment) that fixes a FAIL or WARN.
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// No FAIL.
    pub ok: bool,
    /// Some endpoint could not be reached (its checks could not run).
    pub unreachable: bool,
    /// Every check, in the order run.
    pub checks: Vec<CheckResult>,
    /// What `check --fix` did before checking (empty without `--fix`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fixed: Vec<crate::pg::identity::FixAction>,
}

impl CheckReport {
    fn push(
        &mut self,
        status: CheckStatus,
        check: &str,
        target: &str,
        detail: String,
        fix: Option<String>,
    ) {
        self.checks.push(CheckResult {
            status,
            check: check.to_owned(),
            target: target.to_owned(),
            detail,
            fix,
        });
    }
    fn pass(&mut self, check: &str, target: &str, detail: String) {
        self.push(CheckStatus::Pass, check, target, detail, None);
    }
    fn warn(&mut self, check: &str, target: &str, detail: String, fix: Option<String>) {
        self.push(CheckStatus::Warn, check, target, detail, fix);
    }
    fn fail(&mut self, check: &str, target: &str, detail: String, fix: Option<String>) {
        self.push(CheckStatus::Fail, check, target, detail, fix);
    }

    /// Number of checks with this status.
    pub fn count(&self, status: CheckStatus) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

const SOURCE: &str = "source";

/// Runs every check against the source and every shard. Never fails: an unreachable endpoint
/// or a failing query is itself a FAIL line.
pub async fn run_checks(config: &Config) -> CheckReport {
    let mut report = CheckReport::default();
    let mut system_id = None;
    let tables = match connect(&config.source.url).await {
        Ok(client) => {
            report.pass("connect", SOURCE, "source is reachable".into());
            system_id = crate::pg::progress::source_system_id(&client).await;
            if config.group.is_some() {
                check_group(config, &client, &mut report).await;
            }
            match check_source(config, &client, &mut report).await {
                Ok(t) => t,
                Err(e) => {
                    report.fail(
                        "source_query",
                        SOURCE,
                        format!(
                            "a catalog query failed: {}",
                            crate::pg::conn::error_text(&e)
                        ),
                        None,
                    );
                    Vec::new()
                }
            }
        }
        Err(e) => {
            report.unreachable = true;
            report.fail(
                "connect",
                SOURCE,
                format!("cannot connect to the source ([source] url): {e}"),
                None,
            );
            Vec::new()
        }
    };
    for shard in &config.shards {
        match connect(&shard.url).await {
            Ok(client) => {
                report.pass("connect", &shard.name, "shard is reachable".into());
                if let Err(e) =
                    check_shard(config, &shard.name, &client, &tables, &mut report).await
                {
                    report.fail(
                        "shard_query",
                        &shard.name,
                        format!(
                            "a catalog query failed: {}",
                            crate::pg::conn::error_text(&e)
                        ),
                        None,
                    );
                }
            }
            Err(e) => {
                report.unreachable = true;
                report.fail(
                    "connect",
                    &shard.name,
                    format!(
                        "cannot connect to shard {} ([[shards]] url): {e}",
                        shard.name
                    ),
                    None,
                );
            }
        }
    }
    check_distinct_shards(config, system_id.as_deref(), &mut report).await;
    check_spill_dir(config, &mut report);
    check_spill_space(config, &mut report);
    report.ok = report.count(CheckStatus::Fail) == 0;
    report
}

/// The check name of the FAIL that `run_checks` reports: a mistake in the config's urls, which
/// `reshard check` exits 2 for.
pub const DISTINCT_SHARDS: &str = "distinct_shards";

/// FAIL [`DISTINCT_SHARDS`] when two `[[shards]]` urls name one database, or when a shard's
/// database holds another shard's progress of `[source] slot` and none of its own (urls
/// swapped): the verdict `run` refuses to start on ([`crate::pg::distinct::prove`]). Skipped
/// when a shard was unreachable (its connect line already FAILs).
async fn check_distinct_shards(config: &Config, system_id: Option<&str>, report: &mut CheckReport) {
    use crate::pg::distinct::{entries, prove, DistinctError};
    if report.unreachable {
        return;
    }
    match prove(&entries(config, 0), Some((&config.source.slot, system_id))).await {
        Ok(()) => report.pass(
            DISTINCT_SHARDS,
            SOURCE,
            "every [[shards]] url names its own database, holding no other shard's progress".into(),
        ),
        Err(e @ (DistinctError::Unreachable { .. } | DistinctError::Refused { .. })) => {
            report.fail("shard_query", SOURCE, e.to_string(), None)
        }
        Err(e) => report.fail(DISTINCT_SHARDS, SOURCE, e.to_string(), None),
    }
}

/// FAIL `spill_dir` when `[spill] dir` cannot be created or written (a file, a path under a
/// file, a directory reshard may not write): `reshard run` refuses to start on it. Nothing is
/// left behind: directories created to prove it are removed again.
fn check_spill_dir(config: &Config, report: &mut CheckReport) {
    match crate::spill::probe_dir(&config.spill.dir, false) {
        Ok(()) => report.pass(
            "spill_dir",
            "spill",
            format!(
                "[spill] dir {} can be created and written",
                config.spill.dir.display()
            ),
        ),
        Err(e) => report.fail(
            "spill_dir",
            "spill",
            e.detail(),
            Some(crate::spill::UnusableDir::FIX.to_owned()),
        ),
    }
}

/// WARN `spill_space` when the filesystem of `[spill] dir` (or of its nearest existing
/// parent, before the first run) cannot hold `[spill] max_bytes`: the spill log would hit a
/// full disk before its cap (reading then pauses until retention frees space, see README).
/// What the spill log already holds counts as usable.
fn check_spill_space(config: &Config, report: &mut CheckReport) {
    let dir = &config.spill.dir;
    let Some(existing) = dir.ancestors().find(|d| d.is_dir()) else {
        return;
    };
    let Some(free) = crate::spill::free_bytes(existing) else {
        return;
    };
    let held = crate::ops::observe::spill_view(config).bytes;
    let usable = free.saturating_add(held);
    let max = config.spill.max_bytes;
    if usable < max {
        report.warn(
            "spill_space",
            "spill",
            format!(
                "the filesystem of [spill] dir {} has {free} bytes free (plus {held} the spill log holds), less than [spill] max_bytes = {max}: a shard that falls behind fills the disk before the cap, and reading from the source pauses until retention frees space",
                dir.display()
            ),
            Some(format!(
                "free space there, move [spill] dir to a larger disk, or set [spill] max_bytes = {} (below the usable space)",
                usable / 10 * 9
            )),
        );
    } else {
        report.pass(
            "spill_space",
            "spill",
            format!(
                "the filesystem of [spill] dir {} can hold [spill] max_bytes = {max} ({free} bytes free)",
                dir.display()
            ),
        );
    }
}

/// A group's config (`[group]`, from `reshard plan --groups K`) against its peers: a FAIL
/// `group_overlap` line per table, slot, publication or spill directory it shares with one (see
/// [`crate::ops::plan::peer_overlaps`]), else one PASS `group_peers` line.
async fn check_group(config: &Config, client: &Client, report: &mut CheckReport) {
    let Some(group) = &config.group else {
        return;
    };
    let me = format!("group {}", group.name);
    if group.peers.is_empty() {
        report.warn(
            "group_peers",
            &me,
            format!("{me} lists no peers, so nothing proves it disjoint from the other groups"),
            Some("-- in [group]: peers = [\"<the other groups' config files>\"] (reshard plan writes them)".into()),
        );
        return;
    }
    match crate::ops::plan::peer_overlaps(client, config, &me).await {
        Err(e) => report.fail("group_peers", &me, e.to_string(), None),
        Ok(found) => {
            let fatal = found.iter().filter(|o| o.fatal).count();
            for o in found {
                let fix = Some(format!(
                    "-- re-plan the groups from the base config (reshard plan --groups K), or fix {} or {}",
                    me, o.peer
                ));
                if o.fatal {
                    report.fail("group_overlap", &o.peer, o.detail, fix);
                } else {
                    report.warn("group_overlap", &o.peer, o.detail, None);
                }
            }
            if fatal == 0 {
                report.pass(
                    "group_peers",
                    &me,
                    format!(
                        "{me} shares no table, slot, publication or spill directory with its {} peer(s)",
                        group.peers.len()
                    ),
                );
            }
        }
    }
}

async fn connect(url: &str) -> Result<Client, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_plain(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())),
    }
}

async fn setting_i64(client: &Client, name: &str) -> Result<i64, tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = $1",
            &[&name],
        )
        .await?;
    r.try_get(0)
}

/// A source table together with its rule.
type Resolved = Vec<(TableRule, Option<TableInfo>)>;

async fn check_source(
    config: &Config,
    client: &Client,
    report: &mut CheckReport,
) -> Result<Resolved, tokio_postgres::Error> {
    let slot = &config.source.slot;
    let publication = &config.source.publication;

    // wal_level
    let wal_level = setting(client, "wal_level").await?;
    if wal_level == "logical" {
        report.pass("wal_level", SOURCE, "wal_level = logical".into());
    } else {
        report.fail(
            "wal_level",
            SOURCE,
            format!("wal_level = {wal_level}; logical decoding needs wal_level = logical (takes a restart)"),
            Some("ALTER SYSTEM SET wal_level = logical;  -- then restart PostgreSQL".into()),
        );
    }

    // Slot state (also decides whether a new slot is needed).
    let slot_row = client
        .query_opt(
            "SELECT coalesce(plugin, ''), slot_type, coalesce(database::text, ''), active, \
                    active_pid, coalesce(confirmed_flush_lsn::text, ''), \
                    coalesce(to_jsonb(s) ->> 'wal_status', ''), current_database() \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[slot],
        )
        .await?;
    let slot_exists = slot_row.is_some();

    // Slot and sender headroom.
    let max_slots = setting_i64(client, "max_replication_slots").await?;
    let used_slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .try_get(0)?;
    let need = if slot_exists { 0 } else { 1 };
    if max_slots - used_slots >= need {
        report.pass(
            "replication_slots",
            SOURCE,
            format!("{used_slots} of max_replication_slots = {max_slots} in use; reshard needs {need} more"),
        );
    } else {
        report.fail(
            "replication_slots",
            SOURCE,
            format!(
                "all {max_slots} replication slots are in use (max_replication_slots = {max_slots}, {used_slots} slots exist); reshard needs one for slot {slot}"
            ),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {};  -- then restart PostgreSQL; or drop an unused slot: SELECT pg_drop_replication_slot('<name>');",
                used_slots + need + 2
            )),
        );
    }
    let max_senders = setting_i64(client, "max_wal_senders").await?;
    let used_senders: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await?
        .try_get(0)?;
    if max_senders - used_senders >= 1 {
        report.pass(
            "wal_senders",
            SOURCE,
            format!("{used_senders} of max_wal_senders = {max_senders} in use"),
        );
    } else {
        report.fail(
            "wal_senders",
            SOURCE,
            format!("all {max_senders} WAL senders are in use (max_wal_senders = {max_senders}); reshard needs one replication connection"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {};  -- then restart PostgreSQL",
                used_senders + 3
            )),
        );
    }

    // max_slot_wal_keep_size (MB, -1 = unlimited; PostgreSQL 13+)
    let server_version = setting_i64(client, "server_version_num").await?;
    let keep_mb = if server_version >= 130000 {
        setting_i64(client, "max_slot_wal_keep_size").await?
    } else {
        0
    };
    if server_version < 130000 {
        report.warn(
            "max_slot_wal_keep_size",
            SOURCE,
            "PostgreSQL 12 cannot cap the WAL a slot keeps (max_slot_wal_keep_size is 13+): \
             while reshard is stopped the slot keeps every WAL segment; watch the source's disk"
                .into(),
            None,
        );
    } else if keep_mb < 0 {
        report.warn(
            "max_slot_wal_keep_size",
            SOURCE,
            "max_slot_wal_keep_size = -1 (unlimited): while reshard is stopped the slot keeps \
             every WAL segment, and the source's disk can fill up; cap it at what the disk can \
             hold for your longest planned outage (if the cap is reached the slot is \
             invalidated and the migration must start over, but the source stays up)"
                .into(),
            Some(
                "ALTER SYSTEM SET max_slot_wal_keep_size = '100GB'; SELECT pg_reload_conf();"
                    .into(),
            ),
        );
    } else if keep_mb < 1024 {
        report.warn(
            "max_slot_wal_keep_size",
            SOURCE,
            format!(
                "max_slot_wal_keep_size = {keep_mb}MB is small: if reshard stops while the source writes more than that, the slot is invalidated and the migration must start over"
            ),
            Some("ALTER SYSTEM SET max_slot_wal_keep_size = '100GB'; SELECT pg_reload_conf();".into()),
        );
    } else {
        report.pass(
            "max_slot_wal_keep_size",
            SOURCE,
            format!("max_slot_wal_keep_size = {keep_mb}MB"),
        );
    }

    // PostgreSQL 18 invalidates a slot that stays inactive longer than
    // idle_replication_slot_timeout (at the next checkpoint): a reshard stopped for maintenance
    // longer than that loses its slot and the migration starts over.
    // https://www.postgresql.org/docs/18/runtime-config-replication.html#GUC-IDLE-REPLICATION-SLOT-TIMEOUT
    if server_version >= 180000 {
        let idle = setting_i64(client, "idle_replication_slot_timeout").await?;
        let shown = setting(client, "idle_replication_slot_timeout").await?;
        if idle > 0 {
            report.warn(
                "idle_replication_slot_timeout",
                SOURCE,
                format!(
                    "idle_replication_slot_timeout = {shown}: if reshard is stopped longer than                      that, PostgreSQL invalidates slot {slot} at the next checkpoint and the                      migration must start over"
                ),
                Some(
                    "ALTER SYSTEM SET idle_replication_slot_timeout = 0; SELECT pg_reload_conf();"
                        .into(),
                ),
            );
        } else {
            report.pass(
                "idle_replication_slot_timeout",
                SOURCE,
                "idle_replication_slot_timeout = 0 (an idle slot is never invalidated)".into(),
            );
        }
    }

    // Role attributes.
    let role = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication, current_database()::text \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let user: String = role.try_get(0)?;
    let superuser: bool = role.try_get(1)?;
    let replication: bool = role.try_get(2)?;
    let database: String = role.try_get(3)?;
    if superuser || replication {
        report.pass(
            "replication_privilege",
            SOURCE,
            format!(
                "role {user} has {}",
                if superuser {
                    "SUPERUSER"
                } else {
                    "REPLICATION"
                }
            ),
        );
    } else {
        report.fail(
            "replication_privilege",
            SOURCE,
            format!("role {user} has neither REPLICATION nor SUPERUSER; it cannot open a replication connection"),
            Some(format!("ALTER ROLE {} REPLICATION;", quote_ident(&user))),
        );
    }

    // Tables: the one resolver `run` uses, with every problem reported here.
    let set = match crate::pg::catalog::resolve(client, config).await {
        Ok(set) => set,
        Err(CatalogError::Query { source, .. }) => return Err(source),
        Err(e) => {
            report.fail("tables", SOURCE, e.to_string(), None);
            TableSet::default()
        }
    };
    if !set.configured {
        let sharded = set
            .tables
            .iter()
            .filter(|t| t.rule.mode == TableMode::Sharded)
            .count();
        report.pass(
            "tables",
            SOURCE,
            format!(
                "no [[tables]] in the config: {} tables found on the source, {sharded} sharded (have column {}), {} broadcast",
                set.tables.len(),
                config.routing.key,
                set.tables.len() - sharded
            ),
        );
    }
    for rule in &set.unlogged {
        let fix = Some(format!("ALTER TABLE {} SET LOGGED;", rule.source.quoted()));
        if set.configured {
            report.fail(
                "table_logged",
                SOURCE,
                format!(
                    "{} ([[tables]] name) is UNLOGGED: logical decoding never sees its rows",
                    rule.source
                ),
                fix,
            );
        } else {
            report.warn(
                "table_logged",
                SOURCE,
                format!(
                    "{} is UNLOGGED and is not replicated (logical decoding never sees its rows)",
                    rule.source
                ),
                fix,
            );
        }
    }
    if set.tables.is_empty() && set.missing.is_empty() {
        report.fail(
            "tables",
            SOURCE,
            "no table to replicate".into(),
            Some("-- add [[tables]] to reshard.toml, or create the tables on the source".into()),
        );
    }
    let mut resolved = Vec::with_capacity(set.tables.len() + set.missing.len());
    for t in set.tables {
        let info = describe_table(client, &t.rule.source).await?;
        match &info {
            None => report.fail(
                "table_exists",
                SOURCE,
                format!("table {} was dropped while check ran", t.rule.source),
                None,
            ),
            Some(i) => check_source_table(client, &t.rule, i, &user, report).await?,
        }
        resolved.push((t.rule, info));
    }
    for rule in set.missing {
        report.fail(
            "table_exists",
            SOURCE,
            format!(
                "table {} ([[tables]] name) does not exist on the source",
                rule.source
            ),
            Some(format!(
                "-- fix the name in reshard.toml or remove the [[tables]] entry for {}",
                rule.source
            )),
        );
        resolved.push((rule, None));
    }

    check_publication(
        client,
        publication,
        &user,
        &database,
        superuser,
        &resolved,
        report,
    )
    .await?;

    if config.routing.hash == crate::config::HashKind::Map {
        match crate::ops::verify::map_router(config).await {
            Ok(_) => report.pass(
                "routing_map",
                SOURCE,
                "the account map ([routing] map / map_query) loads and names only configured shards".into(),
            ),
            Err(e) => report.fail(
                "routing_map",
                SOURCE,
                format!("the account map cannot be used: {e}"),
                Some("-- fix [routing] map / map_query / default_shard in reshard.toml".into()),
            ),
        }
    }

    // Slot in use?
    match slot_row {
        None => report.pass(
            "slot",
            SOURCE,
            format!("slot {slot} does not exist; reshard run creates it (pgoutput)"),
        ),
        Some(r) => {
            let plugin: String = r.try_get(0)?;
            let slot_type: String = r.try_get(1)?;
            let db: String = r.try_get(2)?;
            let active: bool = r.try_get(3)?;
            let pid: Option<i32> = r.try_get(4)?;
            let flush: String = r.try_get(5)?;
            let wal_status: String = r.try_get(6)?;
            let current_db: String = r.try_get(7)?;
            let drop_fix = Some(format!(
                "SELECT pg_drop_replication_slot({});  -- or set [source] slot to another name",
                quote_literal(slot)
            ));
            if slot_type != "logical" || plugin != "pgoutput" {
                report.fail(
                    "slot",
                    SOURCE,
                    format!("slot {slot} exists but is a {slot_type} slot with plugin {plugin:?}; reshard needs a logical pgoutput slot"),
                    drop_fix,
                );
            } else if db != current_db {
                report.fail(
                    "slot",
                    SOURCE,
                    format!("slot {slot} belongs to database {db}, not {current_db}"),
                    drop_fix,
                );
            } else if wal_status == "lost" {
                report.fail(
                    "slot",
                    SOURCE,
                    format!("slot {slot} was invalidated (wal_status = lost: max_slot_wal_keep_size exceeded); the migration must start over with a new slot"),
                    drop_fix,
                );
            } else if active {
                let pid = pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
                report.fail(
                    "slot",
                    SOURCE,
                    format!("slot {slot} is in use by another connection (active_pid = {pid}); is another reshard (or pg_recvlogical) running?"),
                    Some(format!(
                        "SELECT pg_terminate_backend({pid});  -- only if that process is a stale consumer of slot {slot}"
                    )),
                );
            } else {
                report.pass(
                    "slot",
                    SOURCE,
                    format!("slot {slot} exists and is inactive; reshard run resumes it from confirmed_flush_lsn {flush}"),
                );
            }
        }
    }
    Ok(resolved)
}

async fn check_source_table(
    client: &Client,
    rule: &TableRule,
    t: &TableInfo,
    user: &str,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let name = &rule.source;
    let qname = name.quoted();
    let can_select: bool = client
        .query_one("SELECT has_table_privilege($1::oid, 'SELECT')", &[&t.oid])
        .await?
        .try_get(0)?;
    if can_select {
        report.pass(
            "select_privilege",
            SOURCE,
            format!("{name}: SELECT granted"),
        );
    } else {
        report.fail(
            "select_privilege",
            SOURCE,
            format!("role {user} cannot SELECT from {name}; the full load reads it"),
            Some(format!("GRANT SELECT ON {qname} TO {};", quote_ident(user))),
        );
    }

    // Replica identity.
    let pk_fix = format!(
        "ALTER TABLE {qname} ADD PRIMARY KEY (<columns>);  -- or: ALTER TABLE {qname} REPLICA IDENTITY FULL;"
    );
    match t.replica_identity {
        'n' => report.fail(
            "replica_identity",
            SOURCE,
            format!("{name} has REPLICA IDENTITY NOTHING: its UPDATEs and DELETEs cannot be replicated"),
            Some(if t.primary_key.is_empty() {
                format!("ALTER TABLE {qname} REPLICA IDENTITY FULL;  -- or add a primary key and use REPLICA IDENTITY DEFAULT")
            } else {
                format!("ALTER TABLE {qname} REPLICA IDENTITY DEFAULT;")
            }),
        ),
        'd' if t.primary_key.is_empty() => report.fail(
            "replica_identity",
            SOURCE,
            format!("{name} has no primary key and REPLICA IDENTITY DEFAULT: its UPDATEs and DELETEs carry no row identity"),
            Some(pk_fix),
        ),
        'f' => report.pass(
            "replica_identity",
            SOURCE,
            format!("{name}: REPLICA IDENTITY FULL (UPDATE/DELETE log the whole old row)"),
        ),
        'i' => report.pass(
            "replica_identity",
            SOURCE,
            format!("{name}: REPLICA IDENTITY USING INDEX ({})", t.replica_identity_index.join(", ")),
        ),
        _ => report.pass(
            "replica_identity",
            SOURCE,
            format!("{name}: primary key ({})", t.primary_key.join(", ")),
        ),
    }

    if t.partitioned && setting_i64(client, "server_version_num").await? < 130_000 {
        report.fail(
            "publish_partitioned",
            SOURCE,
            format!("{name} is a partitioned table: PostgreSQL 12 cannot publish partitioned tables (reshard run refuses to start)"),
            Some(format!(
                "-- reshard.toml: [[tables]] name = {} mode = \"skip\" (and move it another way), or upgrade the source to PostgreSQL 13 or later",
                name.toml_value()
            )),
        );
    }

    if rule.mode == TableMode::Sharded {
        let key = &rule.key;
        match t.column(key) {
            None => report.fail(
                "shard_key",
                SOURCE,
                format!("{name} has no shard key column {key}"),
                Some(format!(
                    "-- reshard.toml: give {name} a [[tables]] entry with mode = \"broadcast\", or key = \"<its account column>\""
                )),
            ),
            Some(c) => {
                // issue #11 item 9: a NULL key routes nowhere (it is quarantined or stops
                // reading, per [routing] on_unroutable).
                if !c.not_null {
                    let qkey = quote_ident(key);
                    report.fail(
                        "shard_key_not_null",
                        SOURCE,
                        format!(
                            "{name}.{key} is nullable: a row with a NULL shard key belongs to no shard \
                             (it is quarantined or stops reading, per [routing] on_unroutable)"
                        ),
                        Some(format!(
                            "SELECT count(*) FROM {qname} WHERE {qkey} IS NULL;  -- must be 0; then: \
                             ALTER TABLE {qname} ALTER COLUMN {qkey} SET NOT NULL;"
                        )),
                    );
                }
                if !SUPPORTED_KEY_TYPES.iter().any(|(oid, _)| *oid == c.type_oid) {
                    let names: Vec<&str> = SUPPORTED_KEY_TYPES.iter().map(|(_, n)| *n).collect();
                    report.fail(
                        "shard_key",
                        SOURCE,
                        format!(
                            "{name}.{key} has type {}; shard keys must be one of {}",
                            c.type_name,
                            names.join(", ")
                        ),
                        Some(format!(
                            "ALTER TABLE {qname} ALTER COLUMN {} TYPE bigint;  -- or text, uuid",
                            quote_ident(key)
                        )),
                    );
                } else {
                    match crate::pg::identity::key_strategy(t, key, rule.key_immutable) {
                        Ok(KeyStrategy::InIdentity) => report.pass(
                            "shard_key",
                            SOURCE,
                            format!("{name}.{key} ({}) is in the replica identity", c.type_name),
                        ),
                        Ok(KeyStrategy::Full) => report.pass(
                            "shard_key",
                            SOURCE,
                            format!("{name}.{key} ({}): REPLICA IDENTITY FULL, old rows carry it", c.type_name),
                        ),
                        Ok(KeyStrategy::Immutable) => report.pass(
                            "shard_key",
                            SOURCE,
                            format!(
                                "{name}.{key} ({}) is outside the replica identity ({}); key_immutable = true: an UPDATE routes by its new row, a DELETE by primary key goes to every shard, verify reports rows on the wrong shard",
                                c.type_name,
                                t.identity_columns().map(|c| c.join(", ")).unwrap_or_default()
                            ),
                        ),
                        // The replica_identity check above FAILs this table.
                        Ok(KeyStrategy::NoIdentity) => {}
                        Err(e) => report.fail("shard_key", SOURCE, e.detail(), Some(e.fix_sql())),
                    }
                }
            }
        }
    }

    let generated: Vec<&str> = t
        .columns
        .iter()
        .filter(|c| c.generated)
        .map(|c| c.name.as_str())
        .collect();
    if !generated.is_empty() {
        report.pass(
            "generated_columns",
            SOURCE,
            format!(
                "{name}: generated columns {} are not replicated; the shards compute them",
                generated.join(", ")
            ),
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn check_publication(
    client: &Client,
    publication: &str,
    user: &str,
    database: &str,
    superuser: bool,
    tables: &Resolved,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let present: Vec<&(TableRule, Option<TableInfo>)> =
        tables.iter().filter(|(_, i)| i.is_some()).collect();
    let table_list = present
        .iter()
        .map(|(r, _)| r.source.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    let any_partitioned = present
        .iter()
        .any(|(_, i)| i.as_ref().is_some_and(|i| i.partitioned));
    let pubrow = client
        .query_opt(
            // pubviaroot is PostgreSQL 13+ (12 cannot publish partitioned tables).
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, \
                    coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false) \
             FROM pg_publication p WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let Some(p) = pubrow else {
        report.warn(
            "publication",
            SOURCE,
            format!(
                "publication {publication} does not exist; reshard run creates it for {} tables",
                present.len()
            ),
            None,
        );
        // Creating it needs CREATE on the database and ownership of every table.
        let can_create: bool = client
            .query_one(
                "SELECT has_database_privilege(current_database(), 'CREATE')",
                &[],
            )
            .await?
            .try_get(0)?;
        let mut not_owned = Vec::new();
        for (rule, info) in &present {
            if let Some(info) = info {
                let owns: bool = client
                    .query_one(
                        "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = $1",
                        &[&info.oid],
                    )
                    .await?
                    .try_get(0)?;
                if !owns {
                    not_owned.push(rule.source.clone());
                }
            }
        }
        let create_sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {table_list}{};",
            quote_ident(publication),
            if any_partitioned {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            }
        );
        if superuser || (can_create && not_owned.is_empty()) {
            report.pass(
                "publication_privilege",
                SOURCE,
                format!("role {user} can create publication {publication}"),
            );
        } else if !can_create {
            report.fail(
                "publication_privilege",
                SOURCE,
                format!("role {user} lacks CREATE on database {database}, so it cannot create publication {publication}"),
                Some(format!(
                    "GRANT CREATE ON DATABASE {} TO {};  -- or, as the tables' owner: {create_sql}",
                    quote_ident(database),
                    quote_ident(user)
                )),
            );
        } else {
            report.fail(
                "publication_privilege",
                SOURCE,
                format!(
                    "role {user} does not own {}, so it cannot create publication {publication}",
                    not_owned
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(format!(
                    "-- as the tables' owner or a superuser:\n{create_sql}"
                )),
            );
        }
        return Ok(());
    };
    let all_tables: bool = p.try_get(0)?;
    let ins: bool = p.try_get(1)?;
    let upd: bool = p.try_get(2)?;
    let del: bool = p.try_get(3)?;
    let trunc: bool = p.try_get(4)?;
    let via_root: bool = p.try_get(5)?;
    let qpub = quote_ident(publication);
    if !(ins && upd && del) {
        report.fail(
            "publication",
            SOURCE,
            format!("publication {publication} does not publish every INSERT, UPDATE and DELETE (insert={ins}, update={upd}, delete={del})"),
            Some(format!("ALTER PUBLICATION {qpub} SET (publish = 'insert, update, delete, truncate');")),
        );
    } else if !trunc {
        report.warn(
            "publication",
            SOURCE,
            format!("publication {publication} does not publish TRUNCATE; a TRUNCATE on the source would not reach the shards"),
            Some(format!("ALTER PUBLICATION {qpub} SET (publish = 'insert, update, delete, truncate');")),
        );
    }
    // Tables published: explicit members, tables of member schemas, or all tables.
    let published: HashSet<TableName> = if all_tables {
        HashSet::new()
    } else {
        client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 \
                 UNION SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
                   JOIN pg_publication p ON p.oid = pr.prpubid \
                   JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                   WHERE p.pubname = $1",
                &[&publication],
            )
            .await?
            .iter()
            .map(|r| Ok(TableName::new(r.try_get::<_, String>(0)?, r.try_get::<_, String>(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?
    };
    let mut missing = Vec::new();
    for (rule, _) in &present {
        if !all_tables && !published.contains(&rule.source) {
            missing.push(rule.source.clone());
        }
    }
    for m in &missing {
        report.fail(
            "publication",
            SOURCE,
            format!("publication {publication} does not publish {m}; its changes would never reach the shards"),
            Some(format!("ALTER PUBLICATION {qpub} ADD TABLE {};", m.quoted())),
        );
    }
    if any_partitioned && !via_root {
        report.fail(
            "publication",
            SOURCE,
            format!("publication {publication} has publish_via_partition_root = false, but partitioned tables are replicated: their changes would arrive under the partitions' names"),
            Some(format!("ALTER PUBLICATION {qpub} SET (publish_via_partition_root = true);")),
        );
    }
    if missing.is_empty() && (ins && upd && del) && (!any_partitioned || via_root) {
        report.pass(
            "publication",
            SOURCE,
            format!(
                "publication {publication} publishes {} the configured tables",
                if all_tables {
                    "all tables, including"
                } else {
                    "all"
                }
            ),
        );
    }
    Ok(())
}

async fn check_shard(
    config: &Config,
    shard: &str,
    client: &Client,
    tables: &Resolved,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let role = client
        .query_one(
            "SELECT current_user::text, current_database()::text, \
                    to_regnamespace('reshard') IS NOT NULL, \
                    has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await?;
    let user: String = role.try_get(0)?;
    let database: String = role.try_get(1)?;
    let schema_exists: bool = role.try_get(2)?;
    let db_create: bool = role.try_get(3)?;
    let quser = quote_ident(&user);
    if schema_exists {
        let ok: bool = client
            .query_one(
                "SELECT has_schema_privilege('reshard', 'USAGE') AND has_schema_privilege('reshard', 'CREATE')",
                &[],
            )
            .await?
            .try_get(0)?;
        if ok {
            report.pass(
                "create_privilege",
                shard,
                "schema reshard exists and is usable".into(),
            );
        } else {
            report.fail(
                "create_privilege",
                shard,
                format!("role {user} cannot use schema reshard (progress rows live there)"),
                Some(format!("GRANT USAGE, CREATE ON SCHEMA reshard TO {quser};")),
            );
        }
    } else if db_create {
        report.pass(
            "create_privilege",
            shard,
            format!("role {user} may create schema reshard in database {database}"),
        );
    } else {
        report.fail(
            "create_privilege",
            shard,
            format!("role {user} lacks CREATE on database {database}; reshard keeps its progress rows in schema reshard there"),
            Some(format!("GRANT CREATE ON DATABASE {} TO {quser};", quote_ident(&database))),
        );
    }
    let has_progress = crate::pg::progress::read_progress(client, &config.source.slot, shard, None)
        .await
        .ok()
        .flatten()
        .is_some();

    for (rule, source) in tables {
        let Some(source) = source else { continue };
        let target = &rule.target;
        let qtarget = target.quoted();
        let Some(t) = describe_table(client, target).await? else {
            report.fail(
                "target_table",
                shard,
                crate::pg::catalog::missing_on_shard(target, shard),
                Some(format!(
                    "-- create it with the source's definition, e.g.: pg_dump --schema-only -t {} <source> | psql <shard {shard}>",
                    pg_dump_table_arg(&rule.source)
                )),
            );
            continue;
        };
        let mut problems = 0;
        for sc in source.columns.iter().filter(|c| !c.generated) {
            let qcol = quote_ident(&sc.name);
            match t.column(&sc.name) {
                None => {
                    problems += 1;
                    report.fail(
                        "target_columns",
                        shard,
                        format!(
                            "{target} on shard {shard} has no column {} ({} on the source)",
                            sc.name, sc.type_name
                        ),
                        Some(format!(
                            "ALTER TABLE {qtarget} ADD COLUMN {qcol} {};",
                            sc.type_name
                        )),
                    );
                }
                Some(tc) if tc.type_name != sc.type_name => {
                    problems += 1;
                    report.fail(
                        "target_columns",
                        shard,
                        format!(
                            "{target}.{} is {} on shard {shard} but {} on the source; values must round-trip in their text form",
                            sc.name, tc.type_name, sc.type_name
                        ),
                        Some(format!(
                            "ALTER TABLE {qtarget} ALTER COLUMN {qcol} TYPE {} USING {qcol}::{};",
                            sc.type_name, sc.type_name
                        )),
                    );
                }
                Some(tc) if tc.generated => {
                    problems += 1;
                    report.fail(
                        "target_columns",
                        shard,
                        format!("{target}.{} is a generated column on shard {shard} but a plain column on the source: it cannot be written", sc.name),
                        Some(format!("ALTER TABLE {qtarget} ALTER COLUMN {qcol} DROP EXPRESSION;")),
                    );
                }
                Some(_) => {}
            }
        }
        for tc in &t.columns {
            let replicated = source.column(&tc.name).is_some_and(|c| !c.generated);
            if replicated || tc.generated || tc.identity || tc.has_default || !tc.not_null {
                if !replicated
                    && source.column(&tc.name).is_some_and(|c| c.generated)
                    && !tc.generated
                {
                    report.warn(
                        "target_columns",
                        shard,
                        format!("{target}.{} is generated on the source but a plain column on shard {shard}: it will hold its default, not the computed value", tc.name),
                        None,
                    );
                }
                continue;
            }
            problems += 1;
            report.fail(
                "target_columns",
                shard,
                format!("{target}.{} exists only on shard {shard}, is NOT NULL and has no default: every insert would fail", tc.name),
                Some(format!(
                    "ALTER TABLE {qtarget} ALTER COLUMN {} DROP NOT NULL;  -- or SET DEFAULT <value>",
                    quote_ident(&tc.name)
                )),
            );
        }
        if problems == 0 {
            report.pass(
                "target_table",
                shard,
                format!(
                    "{target}: {} columns compatible with {}",
                    t.columns.len(),
                    rule.source
                ),
            );
        }
        if t.primary_key.is_empty() && t.replica_identity_index.is_empty() {
            report.warn(
                "target_primary_key",
                shard,
                format!("{target} on shard {shard} has no primary key: updates and deletes must find rows by every column, and duplicates cannot be detected"),
                (!source.primary_key.is_empty()).then(|| {
                    format!(
                        "ALTER TABLE {qtarget} ADD PRIMARY KEY ({});",
                        source.primary_key.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
                    )
                }),
            );
        }
        let privs = client
            .query_one(
                "SELECT has_schema_privilege(c.relnamespace, 'USAGE'), \
                        has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'UPDATE'), \
                        has_table_privilege(c.oid, 'DELETE'), has_table_privilege(c.oid, 'TRUNCATE'), \
                        has_table_privilege(c.oid, 'SELECT') \
                 FROM pg_class c WHERE c.oid = $1",
                &[&t.oid],
            )
            .await?;
        let mut lacking = Vec::new();
        for (i, p) in ["USAGE", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "SELECT"]
            .iter()
            .enumerate()
        {
            let granted: bool = privs.try_get(i)?;
            if !granted {
                lacking.push(*p);
            }
        }
        if lacking.is_empty() {
            report.pass(
                "target_privileges",
                shard,
                format!("{target}: INSERT, UPDATE, DELETE, TRUNCATE granted"),
            );
        } else {
            let schema = &target.schema;
            let mut fix = Vec::new();
            if lacking.contains(&"USAGE") {
                fix.push(format!(
                    "GRANT USAGE ON SCHEMA {} TO {quser};",
                    quote_ident(schema)
                ));
            }
            let table_privs: Vec<&str> =
                lacking.iter().copied().filter(|p| *p != "USAGE").collect();
            if !table_privs.is_empty() {
                fix.push(format!(
                    "GRANT {} ON {qtarget} TO {quser};",
                    table_privs.join(", ")
                ));
            }
            report.fail(
                "target_privileges",
                shard,
                format!(
                    "role {user} lacks {} on {target} on shard {shard}",
                    lacking.join(", ")
                ),
                Some(fix.join(" ")),
            );
            continue;
        }
        if !has_progress && !config.snapshot.truncate_targets {
            let nonempty: bool = client
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {qtarget})"), &[])
                .await?
                .try_get(0)?;
            if nonempty {
                report.warn(
                    "target_empty",
                    shard,
                    format!("{target} on shard {shard} already has rows and reshard has not started here: the full load expects empty targets (set [snapshot] truncate_targets = true, or use run --skip-full-load if the shard was loaded another way)"),
                    Some(format!("TRUNCATE {qtarget};")),
                );
            }
        }
    }
    Ok(())
}

/// `schema.table` as one `pg_dump -t` argument for a shell: quoted as identifiers so that
/// pg_dump's pattern keeps case, spaces and dots literal (`"My App"."Weird Table"`), then
/// quoted for the shell so that it stays one word.
fn pg_dump_table_arg(name: &TableName) -> String {
    let pattern = name.quoted();
    // Only a NUL byte cannot be quoted, and no PostgreSQL name holds one.
    shlex::try_quote(&pattern).map_or(pattern.clone(), |q| q.into_owned())
}

#[cfg(test)]
mod tests {
    use crate::pg::sql::TableName;

    #[test]
    fn the_pg_dump_table_argument_is_one_shell_word_and_a_literal_pattern() {
        assert_eq!(
            super::pg_dump_table_arg(&TableName::new("My App", "Weird Table")),
            r#"'"My App"."Weird Table"'"#
        );
        // The shell gives pg_dump exactly the quoted pattern back, a quote or a dot in the name
        // too.
        for name in [
            TableName::new("My App", "Weird Table"),
            TableName::new("public", "it's"),
            TableName::new("s", "a\"b"),
            TableName::new("sales.eu", " order.items "),
        ] {
            let arg = super::pg_dump_table_arg(&name);
            let words = shlex::split(&arg).unwrap();
            assert_eq!(words, vec![name.quoted()], "{arg}");
        }
    }
}
