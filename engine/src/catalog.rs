//! The source's tables and the publication that carries them.
//!
//! In: the config's `[[tables]]` (or nothing) and a SQL connection to the source. Out: the list
//! of replicated tables with their mode (sharded by a key column, broadcast, skipped) and a
//! publication that contains exactly the replicated tables, with
//! `publish_via_partition_root = true` so that changes to a partition arrive as its root
//! (<https://www.postgresql.org/docs/current/sql-createpublication.html>).
//!
//! Without `[[tables]]`, every ordinary or partitioned (root) table of the source database that
//! has the key column is sharded and every other one is broadcast; with it, only the listed
//! tables are replicated.

use tokio_postgres::Client;

use crate::config::{qualify, Config, TableMode, TableRule};
use crate::event::quote_ident;

/// Errors of catalog discovery and publication management.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A configured table does not exist on the source.
    #[error("table {table} (from [[tables]] in the config) does not exist on the source; fix the name or create it")]
    MissingTable {
        /// `schema.table`.
        table: String,
    },
    /// A sharded table lacks its key column.
    #[error("table {table} is configured as sharded by {key}, but has no column {key}; set `key` or `mode = \"broadcast\"` for it in [[tables]]")]
    MissingKey {
        /// `schema.table`.
        table: String,
        /// Key column.
        key: String,
    },
    /// The existing publication lacks replicated tables.
    #[error("publication {publication} exists but does not publish {missing}; run on the source: ALTER PUBLICATION {publication} ADD TABLE {missing}")]
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
        table: String,
    },
    /// Nothing to replicate.
    #[error("no tables to replicate: the source database has no user tables (or every configured table is mode = \"skip\")")]
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
}

const TABLES_SQL: &str = "
SELECT n.nspname, c.relname, c.oid, c.relkind = 'p',
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = $1 AND a.attnum > 0 AND NOT a.attisdropped),
       GREATEST(c.reltuples, 0)::bigint
         + COALESCE((SELECT sum(GREATEST(p.reltuples, 0))::bigint FROM pg_partition_tree(c.oid) t
                     JOIN pg_class p ON p.oid = t.relid WHERE t.relid <> c.oid), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'reshard')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1, 2";

/// The replicated tables of the source (skipped ones left out), in name order.
pub async fn discover(client: &Client, cfg: &Config) -> Result<Vec<SourceTable>, CatalogError> {
    let default_key = &cfg.routing.key;
    let rows = client
        .query(TABLES_SQL, &[default_key])
        .await
        .map_err(|source| CatalogError::Query {
            what: "listing tables",
            source,
        })?;
    let rules = cfg.table_rules();
    let mut out = Vec::new();
    if rules.is_empty() {
        for r in &rows {
            let name = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            let has_key: bool = r.get(4);
            out.push(SourceTable {
                rule: TableRule {
                    source: name.clone(),
                    target: name,
                    mode: if has_key {
                        TableMode::Sharded
                    } else {
                        TableMode::Broadcast
                    },
                    key: default_key.clone(),
                },
                oid: r.get(2),
                partitioned: r.get(3),
                estimated_rows: r.get(5),
            });
        }
    } else {
        for rule in rules {
            if rule.mode == TableMode::Skip {
                continue;
            }
            let found = rows.iter().find(|r| {
                format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)) == rule.source
            });
            let Some(r) = found else {
                return Err(CatalogError::MissingTable { table: rule.source });
            };
            if rule.mode == TableMode::Sharded {
                let has: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1 \
                         AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
                        &[&r.get::<_, u32>(2), &rule.key],
                    )
                    .await
                    .map_err(|source| CatalogError::Query {
                        what: "checking key column",
                        source,
                    })?
                    .get(0);
                if !has {
                    return Err(CatalogError::MissingKey {
                        table: rule.source,
                        key: rule.key,
                    });
                }
            }
            out.push(SourceTable {
                rule,
                oid: r.get(2),
                partitioned: r.get(3),
                estimated_rows: r.get(5),
            });
        }
    }
    if out.is_empty() {
        return Err(CatalogError::Empty);
    }
    Ok(out)
}

/// `schema.table` quoted for SQL.
pub fn quote_qualified(name: &str) -> String {
    let q = qualify(name);
    match q.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(&q),
    }
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
    let existing = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(q("reading pg_publication"))?;
    match existing {
        None => {
            let list: Vec<String> = tables
                .iter()
                .map(|t| quote_qualified(&t.rule.source))
                .collect();
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote_ident(publication),
                list.join(", ")
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
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(q("reading pg_publication_tables"))?;
            let published: Vec<String> = published.iter().map(|r| r.get(0)).collect();
            let missing: Vec<String> = tables
                .iter()
                .filter(|t| !published.contains(&t.rule.source))
                .map(|t| quote_qualified(&t.rule.source))
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
