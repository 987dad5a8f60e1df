//! The source's tables and the publication that carries them: the ONE place that decides
//! which tables reshard replicates. `run` (and `slot create`, `peek`), `check`, `verify`,
//! `cutover` and `status` all ask [`resolve`] / [`discover`]; none lists tables itself.
//!
//! In: the config's `[[tables]]` (or nothing) and a SQL connection to the source. Out: the list
//! of replicated tables with their mode (sharded by a key column, broadcast, skipped) and a
//! publication that contains exactly the replicated tables, with
//! `publish_via_partition_root = true` so that changes to a partition arrive as its root
//! (<https://www.postgresql.org/docs/current/sql-createpublication.html>).
//!
//! Without `[[tables]]`, every ordinary or partitioned (root) table of the source database
//! outside the system schemas and reshard's own `reshard` schema is replicated: sharded if it
//! has the key column, broadcast otherwise. UNLOGGED tables are left out (logical decoding never
//! sees their rows, and a publication refuses them); [`TableSet::unlogged`] names them so that
//! `check` can say so. With `[[tables]]`, only the listed tables are replicated, and a listed
//! table that is missing, lacks its key or is UNLOGGED is a refusal naming the fix; unless every
//! entry is `mode = "skip"`: then those tables are left out of the set found as without
//! `[[tables]]` (the way each refusal's fix leaves one table out).

use tokio_postgres::Client;

use crate::config::{Config, TableMode, TableRule};
use crate::event::quote_ident;
use crate::pg::sql::TableName;

/// Errors of catalog discovery and publication management.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A configured table does not exist on the source.
    #[error("table {table} (from [[tables]] in the config) does not exist on the source; fix the name or create it")]
    MissingTable {
        /// The table.
        table: TableName,
    },
    /// A sharded table lacks its key column.
    #[error("table {table} is configured as sharded by {key}, but has no column {key}; set `key` or `mode = \"broadcast\"` for it in [[tables]]")]
    MissingKey {
        /// The table.
        table: TableName,
        /// Key column.
        key: String,
    },
    /// The existing publication lacks replicated tables.
    #[error("publication {publication} exists but does not publish {missing} (a table created on the source after the publication was, e.g. while `reshard run` streamed: its rows were never loaded onto the shards); leave it out with [[tables]] name = \"…\" mode = \"skip\" (the tables not listed are still replicated), or create it on every shard, run on the source: ALTER PUBLICATION {publication} ADD TABLE {missing}, and load the rows it held before onto the shards")]
    PublicationIncomplete {
        /// Publication name.
        publication: String,
        /// Comma-separated missing tables.
        missing: String,
    },
    /// The existing publication does not publish via the partition root but a table is
    /// partitioned.
    #[error("publication {publication} publishes partitioned table {table} without publish_via_partition_root; run on the source: ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)")]
    NotViaRoot {
        /// Publication name.
        publication: String,
        /// The partitioned table.
        table: TableName,
    },
    /// A configured table is UNLOGGED.
    #[error("table {table} (from [[tables]] in the config) is UNLOGGED: logical decoding never sees its rows; run on the source: ALTER TABLE {table} SET LOGGED, or set mode = \"skip\" for it")]
    Unlogged {
        /// The table.
        table: TableName,
    },
    /// Nothing to replicate.
    #[error("no tables to replicate: the source database has no user tables (or every table is listed with mode = \"skip\")")]
    Empty,
    /// A query failed.
    #[error("source query failed ({what}): {source}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: tokio_postgres::Error,
    },
}

impl crate::error::Classify for CatalogError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            CatalogError::Query { source, .. } => crate::error::class_of_pg(source),
            _ => crate::error::ErrorClass::Definite,
        }
    }
}

/// A replicated source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    /// The rule: source/target names, mode, key.
    pub rule: TableRule,
    /// Relation OID on the source.
    pub oid: u32,
    /// Partitioned (`relkind = 'p'`).
    pub partitioned: bool,
    /// Estimated rows (`reltuples`, summed over partitions).
    pub estimated_rows: i64,
    /// The table has its rule's key column (always true for `sharded` tables that
    /// [`discover`] returns).
    pub has_key: bool,
}

/// Everything [`resolve`] found, problems included (what `check` reports one by one and
/// [`discover`] refuses).
#[derive(Debug, Clone, Default)]
pub struct TableSet {
    /// The replicated tables found on the source, in name order (`[[tables]]` order with
    /// `[[tables]]`).
    pub tables: Vec<SourceTable>,
    /// `[[tables]]` entries (not `skip`) whose table does not exist on the source.
    pub missing: Vec<TableRule>,
    /// UNLOGGED tables: left out without `[[tables]]`, a refusal when listed.
    pub unlogged: Vec<TableRule>,
    /// Whether the set comes from `[[tables]]` (else: every table of the database but those
    /// `[[tables]]` skips).
    pub configured: bool,
}

impl TableSet {
    /// The replicated tables, or the first reason not to replicate: a missing configured
    /// table, a sharded table without its key column, a listed UNLOGGED table, nothing at all.
    pub fn into_replicated(self) -> Result<Vec<SourceTable>, CatalogError> {
        if let Some(rule) = self.missing.into_iter().next() {
            return Err(CatalogError::MissingTable { table: rule.source });
        }
        if self.configured {
            if let Some(rule) = self.unlogged.into_iter().next() {
                return Err(CatalogError::Unlogged { table: rule.source });
            }
        }
        if let Some(t) = self
            .tables
            .iter()
            .find(|t| t.rule.mode == TableMode::Sharded && !t.has_key)
        {
            return Err(CatalogError::MissingKey {
                table: t.rule.source.clone(),
                key: t.rule.key.clone(),
            });
        }
        if self.tables.is_empty() {
            return Err(CatalogError::Empty);
        }
        Ok(self.tables)
    }
}

const TABLES_SQL: &str = "
SELECT n.nspname, c.relname, c.oid, c.relkind = 'p', c.relpersistence = 'u',
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = $1 AND a.attnum > 0 AND NOT a.attisdropped),
       GREATEST(c.reltuples, 0)::bigint
         + COALESCE((SELECT sum(GREATEST(p.reltuples, 0))::bigint FROM pg_partition_tree(c.oid) t
                     JOIN pg_class p ON p.oid = t.relid WHERE t.relid <> c.oid), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('information_schema', 'reshard') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2";

const HAS_COLUMN_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1 \
     AND attname = $2 AND attnum > 0 AND NOT attisdropped)";

/// The table of a row whose first two columns are its schema and name (as `text`).
pub fn table_of(row: &tokio_postgres::Row) -> TableName {
    TableName::new(row.get::<_, String>(0), row.get::<_, String>(1))
}

/// The table set with every problem listed, never refused (for `check` and `status`); only a
/// failed query is an error. `run`, `verify` and `cutover` use [`discover`].
pub async fn resolve(client: &Client, cfg: &Config) -> Result<TableSet, CatalogError> {
    let q = |what| move |source| CatalogError::Query { what, source };
    let rows = client
        .query(TABLES_SQL, &[&cfg.routing.key])
        .await
        .map_err(q("listing tables"))?;
    let rules = cfg.table_rules();
    // Only `skip` entries leave those tables out of the discovered set: every other table is
    // still found without being listed (the way every refusal's fix says to leave one out).
    let configured = rules.iter().any(|r| r.mode != TableMode::Skip);
    let candidates: Vec<TableRule> = if configured {
        rules
            .into_iter()
            .filter(|r| r.mode != TableMode::Skip)
            .collect()
    } else {
        rows.iter()
            .map(table_of)
            .filter(|name| !rules.iter().any(|r| r.source == *name))
            .map(|name| TableRule {
                source: name.clone(),
                target: name,
                mode: TableMode::Sharded,
                key: cfg.routing.key.clone(),
                key_immutable: cfg.routing.key_immutable,
            })
            .collect()
    };
    let mut set = TableSet {
        configured,
        ..TableSet::default()
    };
    for mut rule in candidates {
        let found = rows.iter().find(|r| table_of(r) == rule.source);
        let Some(r) = found else {
            set.missing.push(rule);
            continue;
        };
        if r.get::<_, bool>(4) {
            set.unlogged.push(rule);
            continue;
        }
        let oid: u32 = r.get(2);
        let has_key: bool = if rule.key == cfg.routing.key {
            r.get(5)
        } else {
            client
                .query_one(HAS_COLUMN_SQL, &[&oid, &rule.key])
                .await
                .map_err(q("checking key column"))?
                .get(0)
        };
        // The default rule: sharded when the table has the key column, broadcast otherwise.
        if !configured && !has_key {
            rule.mode = TableMode::Broadcast;
        }
        set.tables.push(SourceTable {
            rule,
            oid,
            partitioned: r.get(3),
            estimated_rows: r.get(6),
            has_key,
        });
    }
    Ok(set)
}

/// The replicated tables of the source (skipped ones left out), or the refusal that names
/// what to fix (see [`TableSet::into_replicated`]).
/// The one wording (`check`, `verify`, `cutover`, `move`) of a replicated table missing on a
/// shard: what it means for the migration and the ways on.
pub fn missing_on_shard(table: &TableName, shard: &str) -> String {
    format!(
        "table {table} does not exist on shard {shard}, so reshard does not replicate it there \
         (a table created on the source after `reshard run` started is not in its publication): \
         leave it out with [[tables]] name = {} mode = \"skip\", or create it on every \
         shard from the source's definition, add it to the publication ([source] publication) \
         and load its rows",
        table.toml_value()
    )
}

pub async fn discover(client: &Client, cfg: &Config) -> Result<Vec<SourceTable>, CatalogError> {
    resolve(client, cfg).await?.into_replicated()
}

/// The server's `server_version_num` (e.g. 150004).
pub async fn server_version_num(client: &Client) -> Result<i32, CatalogError> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|source| CatalogError::Query {
            what: "reading server_version_num",
            source,
        })?
        .get(0))
}

/// The server's current value of setting `name` (`current_setting`).
pub async fn setting(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?
        .try_get(0)
}

/// Creates the publication for `tables` if it does not exist (returns `true` if created);
/// if it exists, checks that it publishes every table and publishes partitioned tables via
/// their root.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<bool, CatalogError> {
    let q = |what| move |source| CatalogError::Query { what, source };
    // `pubviaroot` and `publish_via_partition_root` are PostgreSQL 13+; 12 cannot publish a
    // partitioned table at all (CREATE PUBLICATION names the table then).
    let existing = client
        .query_opt(
            "SELECT coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false) \
             FROM pg_publication p WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(q("reading pg_publication"))?;
    match existing {
        None => {
            let list: Vec<String> = tables.iter().map(|t| t.rule.source.to_string()).collect();
            let has_via_root = server_version_num(client).await? >= 130_000;
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}{}",
                quote_ident(publication),
                list.join(", "),
                if has_via_root {
                    " WITH (publish_via_partition_root = true)"
                } else {
                    ""
                }
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(q("creating the publication"))?;
            Ok(true)
        }
        Some(row) => {
            let via_root: bool = row.get(0);
            let published = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(q("reading pg_publication_tables"))?;
            let published: Vec<TableName> = published.iter().map(table_of).collect();
            let missing: Vec<String> = tables
                .iter()
                .filter(|t| !published.contains(&t.rule.source))
                .map(|t| t.rule.source.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(CatalogError::PublicationIncomplete {
                    publication: publication.to_owned(),
                    missing: missing.join(", "),
                });
            }
            if let Some(t) = tables.iter().find(|t| t.partitioned) {
                if !via_root {
                    return Err(CatalogError::NotViaRoot {
                        publication: publication.to_owned(),
                        table: t.rule.source.clone(),
                    });
                }
            }
            Ok(false)
        }
    }
}
