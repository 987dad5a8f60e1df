//! The shard key and the replica identity: how UPDATEs and DELETEs of a sharded table are routed.
//!
//! In: a source table's description ([`TableInfo`]) and its rule (key column, `key_immutable`).
//! Out: its [`KeyStrategy`], or a [`KeyOutsideIdentity`] naming the table and the SQL that fixes
//! it. `reshard check` and `reshard run` both ask [`key_strategy`], so `run` refuses before
//! anything is copied exactly the tables `check` FAILs; [`fix_replica_identity`] is
//! `reshard check --fix`.
//!
//! pgoutput's old row of an UPDATE or DELETE carries only the replica identity's columns
//! (<https://www.postgresql.org/docs/current/sql-altertable.html#SQL-ALTERTABLE-REPLICA-IDENTITY>).
//! With a surrogate primary key `id` and the shard key a plain column (the Rails/Django shape),
//! the shard that holds the old row is unknown. Three strategies:
//! 1. a replica identity index that includes the key (`UNIQUE (id, account_id)` +
//!    `REPLICA IDENTITY USING INDEX`): exact, key moves are detected, cheap;
//! 2. `key_immutable = true`: an UPDATE routes by its new row's key, a DELETE by primary key
//!    goes to every shard, and `verify` reports a row left on the wrong shard;
//! 3. `REPLICA IDENTITY FULL`: exact, but every UPDATE/DELETE logs the whole old row.

use std::time::Instant;

use tokio_postgres::Client;

use crate::config::{Config, TableMode, TableRule};
use crate::pg::conn::{connect_plain, error_text, quote_ident};
use crate::pg::sql::TableName;
use crate::pg::table::{describe_table, TableInfo};

/// How a sharded table's UPDATEs and DELETEs find their shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStrategy {
    /// The key is a column of the replica identity (primary key or `REPLICA IDENTITY USING
    /// INDEX`): old rows carry it, key moves are detected.
    InIdentity,
    /// `REPLICA IDENTITY FULL`: old rows are whole.
    Full,
    /// The key is outside the identity and the table is `key_immutable`.
    Immutable,
    /// No usable identity at all: the source itself refuses UPDATE/DELETE of a published table
    /// (the `replica_identity` check reports it).
    NoIdentity,
}

/// A sharded table whose replica identity lacks the shard key, without a strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOutsideIdentity {
    /// Source table.
    pub table: TableName,
    /// The shard-key column.
    pub key: String,
    /// The replica identity's columns (primary key or identity index).
    pub identity: Vec<String>,
    /// The key column may be NULL (an identity index needs NOT NULL columns).
    pub key_nullable: bool,
    /// A partitioned table (`CREATE INDEX CONCURRENTLY` does not work on one).
    pub partitioned: bool,
}

impl std::fmt::Display for KeyOutsideIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; fix:\n{}", self.detail(), self.fix_sql())
    }
}

impl std::error::Error for KeyOutsideIdentity {}

impl KeyOutsideIdentity {
    /// What is wrong (without the fix).
    pub fn detail(&self) -> String {
        format!(
            "{}: shard key {} is not part of the replica identity ({}), so an UPDATE or DELETE does not say which shard holds the row; choose a strategy: a replica identity index with the key, key_immutable = true, or REPLICA IDENTITY FULL",
            self.table,
            self.key,
            self.identity.join(", ")
        )
    }

    /// The name of the replica identity index `--fix` builds: `<table>_<key>_reshard_ri`,
    /// cut to PostgreSQL's 63-byte identifier limit.
    pub fn index_name(&self) -> String {
        let table = self.table.name.clone();
        let suffix = format!("_{}_reshard_ri", self.key);
        let mut base = table;
        while base.len() + suffix.len() > 63 && !base.is_empty() {
            base.pop();
        }
        let mut name = base + &suffix;
        while name.len() > 63 {
            name.pop();
        }
        name
    }

    /// The index columns: the identity's, then the key.
    pub fn index_columns(&self) -> Vec<String> {
        let mut cols = self.identity.clone();
        cols.push(self.key.clone());
        cols
    }

    /// `CREATE UNIQUE INDEX CONCURRENTLY … (id, account_id)`.
    pub fn create_index_sql(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})",
            quote_ident(&self.index_name()),
            self.table.quoted(),
            self.index_columns()
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// `ALTER TABLE … REPLICA IDENTITY USING INDEX …`.
    pub fn replica_identity_sql(&self) -> String {
        format!(
            "ALTER TABLE {} REPLICA IDENTITY USING INDEX {}",
            self.table.quoted(),
            quote_ident(&self.index_name())
        )
    }

    /// The three strategies as SQL (and config), the preferred one first.
    pub fn fix_sql(&self) -> String {
        let qtable = self.table.quoted();
        let mut s = String::new();
        if self.partitioned {
            s.push_str(&format!(
                "-- 1. (partitioned table: build a UNIQUE index on ({}) and set REPLICA IDENTITY USING INDEX on every partition; CONCURRENTLY does not work on the parent)\n",
                self.index_columns().join(", ")
            ));
        } else {
            s.push_str(
                "-- 1. replica identity index (cheap, exact; `reshard check --fix` runs this):\n",
            );
            if self.key_nullable {
                s.push_str(&format!(
                    "ALTER TABLE {qtable} ALTER COLUMN {} SET NOT NULL;  -- an identity index needs NOT NULL columns (scans the table under an exclusive lock; --fix does not do this)\n",
                    quote_ident(&self.key)
                ));
            }
            s.push_str(&format!(
                "{};\n{};\n",
                self.create_index_sql(),
                self.replica_identity_sql()
            ));
        }
        s.push_str(&format!(
            "-- 2. or, if a row's {} never changes, in reshard.toml: [[tables]] name = {} key_immutable = true  (or [routing] key_immutable = true)\n",
            self.key,
            self.table.toml_value()
        ));
        s.push_str(&format!(
            "-- 3. or (exact, logs every old row whole): ALTER TABLE {qtable} REPLICA IDENTITY FULL;"
        ));
        s
    }
}

/// The strategy of a sharded table with key column `key`, or why it has none.
pub fn key_strategy(
    info: &TableInfo,
    key: &str,
    key_immutable: bool,
) -> Result<KeyStrategy, KeyOutsideIdentity> {
    if info.replica_identity == 'f' {
        return Ok(KeyStrategy::Full);
    }
    let Some(identity) = info.identity_columns() else {
        return Ok(KeyStrategy::NoIdentity);
    };
    if identity.iter().any(|c| c == key) {
        return Ok(KeyStrategy::InIdentity);
    }
    if key_immutable {
        return Ok(KeyStrategy::Immutable);
    }
    Err(KeyOutsideIdentity {
        table: info.name.clone(),
        key: key.to_owned(),
        identity: identity.to_vec(),
        key_nullable: info.column(key).is_none_or(|c| !c.not_null),
        partitioned: info.partitioned,
    })
}

/// Every sharded table among `rules` whose UPDATEs and DELETEs could not be routed (what
/// `reshard run` refuses to start with). Tables missing on the source are left to the caller.
pub async fn tables_without_strategy<'a>(
    client: &Client,
    rules: impl IntoIterator<Item = &'a TableRule>,
) -> Result<Vec<KeyOutsideIdentity>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for rule in rules {
        if rule.mode != TableMode::Sharded {
            continue;
        }
        if let Some(info) = describe_table(client, &rule.source).await? {
            if info.column(&rule.key).is_none() {
                continue;
            }
            if let Err(e) = key_strategy(&info, &rule.key, rule.key_immutable) {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// A replicated table without a row identity (no primary key and REPLICA IDENTITY DEFAULT,
/// or REPLICA IDENTITY NOTHING): once a publication publishes it, the source itself refuses
/// its UPDATEs and DELETEs ("cannot update table … because it does not have a replica
/// identity and publishes updates"), so the application's writes would fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRowIdentity {
    /// Source table.
    pub table: TableName,
    /// `relreplident`: `d` or `n`.
    pub replica_identity: char,
    /// Whether it has a primary key (then REPLICA IDENTITY DEFAULT is the fix).
    pub has_primary_key: bool,
}

impl std::fmt::Display for NoRowIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let qtable = self.table.quoted();
        if self.replica_identity == 'n' && self.has_primary_key {
            write!(
                f,
                "{}: REPLICA IDENTITY NOTHING; fix: ALTER TABLE {qtable} REPLICA IDENTITY DEFAULT;",
                self.table
            )
        } else {
            write!(f, "{}: no primary key and REPLICA IDENTITY {}; fix: ALTER TABLE {qtable} ADD PRIMARY KEY (<columns>); or ALTER TABLE {qtable} REPLICA IDENTITY FULL; or leave it out ([[tables]] mode = \"skip\")",
                self.table, if self.replica_identity == 'n' { "NOTHING" } else { "DEFAULT" })
        }
    }
}

/// Every replicated (sharded or broadcast) table among `rules` without a row identity (what
/// `reshard run` refuses before it creates or extends the publication; `check` FAILs the same
/// tables as `replica_identity`).
pub async fn tables_without_row_identity<'a>(
    client: &Client,
    rules: impl IntoIterator<Item = &'a TableRule>,
) -> Result<Vec<NoRowIdentity>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for rule in rules {
        if rule.mode == TableMode::Skip {
            continue;
        }
        if let Some(info) = describe_table(client, &rule.source).await? {
            if !info.has_usable_identity() {
                out.push(NoRowIdentity {
                    table: info.name.clone(),
                    replica_identity: info.replica_identity,
                    has_primary_key: !info.primary_key.is_empty(),
                });
            }
        }
    }
    Ok(out)
}

/// What `--fix` did for one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FixAction {
    /// Source table.
    pub table: TableName,
    /// The statement run, or why nothing was run.
    pub action: String,
    /// Whether it succeeded (or was a deliberate skip: `false`).
    pub ok: bool,
}

/// `--fix` could not start.
#[derive(Debug, thiserror::Error)]
pub enum FixError {
    /// The source is unreachable.
    #[error("cannot connect to the source ([source] url): {0}")]
    Connect(#[from] crate::source::SourceError),
    /// A catalog query failed.
    #[error("reading the source's catalog failed: {}", error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    /// Resolving the table set failed.
    #[error("{0}")]
    Catalog(#[from] crate::pg::catalog::CatalogError),
}

/// `reshard check --fix`: for every sharded table without a strategy, builds the unique index
/// `(identity…, key)` with `CREATE UNIQUE INDEX CONCURRENTLY` and makes it the replica
/// identity. Each statement runs alone, outside any transaction block. Idempotent: a table
/// already fixed has a strategy and is left alone; an INVALID index of that name (left by an
/// interrupted concurrent build) is dropped concurrently and rebuilt. Never touches a table
/// without a usable unique key, a nullable key, or a partitioned table (the action says why).
pub async fn fix_replica_identity(config: &Config) -> Result<Vec<FixAction>, FixError> {
    let client = connect_plain(&config.source.url).await?;
    // A blocked ALTER TABLE would queue every writer of the table behind it: give up instead.
    client.batch_execute("SET lock_timeout = '10s'").await?;
    let set = crate::pg::catalog::resolve(&client, config).await?;
    let todo = tables_without_strategy(&client, set.tables.iter().map(|t| &t.rule)).await?;
    let mut actions = Vec::new();
    for t in todo {
        let mut act = |action: String, ok: bool| {
            actions.push(FixAction {
                table: t.table.clone(),
                action,
                ok,
            })
        };
        if t.partitioned {
            act(format!("skipped: {} is partitioned; CREATE INDEX CONCURRENTLY does not work on a partitioned table (see the check's fix)", t.table), false);
            continue;
        }
        if t.key_nullable {
            act(format!(
                "skipped: {} may be NULL, and a replica identity index needs NOT NULL columns; run ALTER TABLE {} ALTER COLUMN {} SET NOT NULL (scans the table under an exclusive lock), then --fix again",
                t.key,
                t.table.quoted(),
                quote_ident(&t.key)
            ), false);
            continue;
        }
        fix_one(&client, &t, &mut act).await?;
    }
    Ok(actions)
}

/// Builds (or rebuilds) the index of `t` and sets it as the replica identity.
async fn fix_one(
    client: &Client,
    t: &KeyOutsideIdentity,
    act: &mut impl FnMut(String, bool),
) -> Result<(), tokio_postgres::Error> {
    let schema = &t.table.schema;
    let name = t.index_name();
    let qindex = format!("{}.{}", quote_ident(schema), quote_ident(&name));
    let existing = client
        .query_opt(
            "SELECT i.indisvalid, i.indisunique AND i.indrelid = $3::text::regclass \
                    AND i.indpred IS NULL AND i.indexprs IS NULL \
                    AND (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                         FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = $4 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_index i ON i.indexrelid = c.oid \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[
                schema,
                &name,
                &t.table.quoted(),
                &t.index_columns(),
            ],
        )
        .await?;
    let mut build = true;
    if let Some(row) = existing {
        let valid: bool = row.try_get(0)?;
        let same: bool = row.try_get::<_, Option<bool>>(1)?.unwrap_or(false);
        if !valid {
            let sql = format!("DROP INDEX CONCURRENTLY {qindex}");
            if !run(client, &sql, act).await {
                return Ok(());
            }
            act(
                format!(
                    "dropped INVALID index {name} (left by an interrupted concurrent build): {sql}"
                ),
                true,
            );
        } else if same {
            build = false;
        } else {
            act(
                format!(
                    "skipped: an index named {name} exists with another definition; drop or rename it (DROP INDEX CONCURRENTLY {qindex}), then --fix again"
                ),
                false,
            );
            return Ok(());
        }
    }
    if build {
        let sql = t.create_index_sql();
        let started = Instant::now();
        if !run(client, &sql, act).await {
            return Ok(());
        }
        act(
            format!("{sql}  -- built in {:.1}s", started.elapsed().as_secs_f64()),
            true,
        );
    } else {
        act(format!("index {name} already exists and is valid"), true);
    }
    let sql = t.replica_identity_sql();
    if run(client, &sql, act).await {
        act(sql, true);
    }
    Ok(())
}

/// Runs one statement on its own (never in a transaction block); a failure becomes a failed
/// action naming the statement and the SQLSTATE.
async fn run(client: &Client, sql: &str, act: &mut impl FnMut(String, bool)) -> bool {
    match client.batch_execute(sql).await {
        Ok(()) => true,
        Err(e) => {
            act(format!("FAILED: {sql}: {}", error_text(&e)), false);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::table::ColumnInfo;

    fn col(name: &str, not_null: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            type_name: "bigint".into(),
            type_oid: 20,
            not_null,
            has_default: false,
            generated: false,
            identity: false,
        }
    }

    fn users() -> TableInfo {
        TableInfo {
            name: TableName::new("public", "users"),
            oid: 1,
            partitioned: false,
            replica_identity: 'd',
            columns: vec![col("id", true), col("account_id", true)],
            primary_key: vec!["id".into()],
            replica_identity_index: vec![],
        }
    }

    #[test]
    fn strategies() {
        let mut t = users();
        let e = key_strategy(&t, "account_id", false).unwrap_err();
        assert_eq!(e.index_columns(), ["id", "account_id"]);
        let fix = e.fix_sql();
        assert!(
            fix.contains(r#"CREATE UNIQUE INDEX CONCURRENTLY "users_account_id_reshard_ri" ON "public"."users" ("id", "account_id");"#),
            "{fix}"
        );
        assert!(
            fix.contains(r#"ALTER TABLE "public"."users" REPLICA IDENTITY USING INDEX "users_account_id_reshard_ri";"#),
            "{fix}"
        );
        assert!(fix.contains("key_immutable = true"), "{fix}");
        assert!(fix.contains("REPLICA IDENTITY FULL"), "{fix}");
        assert!(!fix.contains("SET NOT NULL"), "{fix}");
        assert_eq!(
            key_strategy(&t, "account_id", true),
            Ok(KeyStrategy::Immutable)
        );
        t.replica_identity = 'i';
        t.replica_identity_index = vec!["id".into(), "account_id".into()];
        assert_eq!(
            key_strategy(&t, "account_id", false),
            Ok(KeyStrategy::InIdentity)
        );
        t.replica_identity = 'f';
        assert_eq!(key_strategy(&t, "account_id", false), Ok(KeyStrategy::Full));
        t.replica_identity = 'n';
        assert_eq!(
            key_strategy(&t, "account_id", false),
            Ok(KeyStrategy::NoIdentity)
        );
    }

    #[test]
    fn nullable_key_and_long_names() {
        let mut t = users();
        t.columns[1].not_null = false;
        t.name = TableName::new("public", "x".repeat(70));
        let e = key_strategy(&t, "account_id", false).unwrap_err();
        assert!(e.fix_sql().contains("SET NOT NULL"));
        let name = e.index_name();
        assert_eq!(name.len(), 63, "{name}");
        assert!(name.ends_with("_account_id_reshard_ri"), "{name}");
    }
}
