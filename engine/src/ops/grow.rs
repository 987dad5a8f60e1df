//! `reshard plan --shards M`: what growing a `hash = "postgres"` layout from N to M shards
//! moves, read-only (issue #17, "N → M").
//!
//! In: the config (its N `[[shards]]`, the table set on the source) and M. Out: a
//! [`GrowPlan`]: for every new shard j (0..M), the old shard its rows come from (j mod N) and
//! the rows and bytes it takes, counted on the OLD shards by PostgreSQL itself
//! (`satisfies_hash_partition` with MODULUS M on a temporary helper of the key's type: the
//! routing expression of verify, [`HashRoute`]), and an estimate of the copy time at a
//! stated rate.
//!
//! Invariants: M must be a multiple of N. PostgreSQL's hash partitioning puts a row of hash h
//! on shard h mod N; with M = k·N the new shard j takes the rows with h mod M = j, all of which
//! are on old shard j mod N: no row moves between two old shards, and new shard j < N is old
//! shard j keeping a part of its rows. Any other M would move rows between old shards, which is
//! refused ([`GrowError::NotMultiple`]). Nothing is written anywhere: the helper is a
//! temporary table of the planning session, dropped when it ends.
//!
//! Bytes are `pg_column_size` of each row (the row's data as stored, without indexes or
//! page overhead): a lower bound of what a copy writes.

use serde::Serialize;

use crate::config::{Config, HashKind, TableMode, TableRule};
use crate::ops::verify::sql::HashRoute;
use crate::pg::catalog::{self, CatalogError};
use crate::pg::conn::connect_plain;
use crate::pg::sql::quote_ident;

/// The copy rate the estimate assumes when none is given (rows per second).
pub const DEFAULT_RATE_ROWS_PER_SEC: u64 = 50_000;

/// Why no growth plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// Two shards of the layout are one database ([`crate::pg::distinct`]).
    #[error(transparent)]
    Distinct(#[from] crate::pg::distinct::DistinctError),
    /// M is not a multiple of N.
    #[error("cannot plan {to} shards from {from}: with hash = \"postgres\" the new shard count must be a multiple of the current one ({from}), else a row would move between two old shards (a row of hash h is on shard h mod {from}); use --shards {}", .from * (.to / .from).max(2))]
    NotMultiple {
        /// Current shards (N).
        from: usize,
        /// Requested shards (M).
        to: usize,
    },
    /// M needs more shards than `[[shards]]` and `[[new_shards]]` list (hash = "postgres").
    #[error("growing {from} shards to {to} needs {} [[new_shards]] entries (name, url) in the config, for remainders {from}..{}; it lists {listed}: add the missing ones (config key new_shards)", .to - .from, .to - 1)]
    NewShardsMissing {
        /// Current shards (N).
        from: usize,
        /// Requested shards (M).
        to: usize,
        /// `[[new_shards]]` entries listed.
        listed: usize,
    },
    /// The layout is not `hash = "postgres"` ([`plan_growth`] plans hash layouts only; a map
    /// layout is planned by [`crate::ops::balance::plan_map`]).
    #[error("this plan is for [routing] hash = \"postgres\"; a hash = \"map\" layout is planned as a balanced account map (ops::balance::plan_map)")]
    NotHash,
    /// The layout is not `hash = "map"`.
    #[error("a balanced account map is planned for [routing] hash = \"map\" only")]
    NotMap,
    /// M is more than the config's shards (a map layout).
    #[error("cannot plan {to} shards for hash = \"map\": the config lists {listed} ([[shards]]); list the new shards in the config first (a shard that holds no account in the map is one the plan fills)")]
    MapTooMany {
        /// Requested shards (M).
        to: usize,
        /// Shards the config lists.
        listed: usize,
    },
    /// M is fewer than the shards that hold accounts (a map layout).
    #[error("cannot plan {to} shards for hash = \"map\": {holding} shards hold accounts now ({names}); a plan moves accounts onto shards and never empties one: give --shards {holding} or more")]
    MapTooFew {
        /// Requested shards (M).
        to: usize,
        /// Shards that hold accounts now.
        holding: usize,
        /// Their names.
        names: String,
    },
    /// The account map could not be read.
    #[error("reading the account map: {0}")]
    Map(crate::route::RouteError),
    /// The table set could not be read on the source.
    #[error("reading the table set on the source: {0}")]
    Catalog(#[from] CatalogError),
    /// A shard could not be reached or queried.
    #[error("shard {shard}: {what}: {message}")]
    Shard {
        /// The shard's name.
        shard: String,
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
}

/// One new shard of the plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NewShard {
    /// Its index (the hash remainder for MODULUS M).
    pub index: usize,
    /// The old shard its rows are on now (index j mod N).
    pub from_index: usize,
    /// That old shard's name.
    pub from: String,
    /// The new shard's name: the old shard's for j < N, else the (j − N)-th `[[new_shards]]`.
    pub name: String,
    /// The new shard is the old shard itself (j < N): its rows stay in place.
    pub stays: bool,
    /// Rows it takes, over every sharded table.
    pub rows: i64,
    /// Their bytes (`pg_column_size` of each row).
    pub bytes: i64,
    /// Rows per table (`schema.table` on the shards).
    pub tables: Vec<(String, i64)>,
}

/// `reshard plan --shards M` for `hash = "postgres"`.
#[derive(Debug, Clone, Serialize)]
pub struct GrowPlan {
    /// Current shards (N).
    pub from_shards: usize,
    /// New shards (M).
    pub to_shards: usize,
    /// Every new shard, in index order.
    pub shards: Vec<NewShard>,
    /// Rows that move (onto new shards j ≥ N).
    pub rows_to_move: i64,
    /// Their bytes.
    pub bytes_to_move: i64,
    /// Rows found on an old shard that PostgreSQL's hashing puts on another old shard (a
    /// layout that is already wrong: run `reshard verify`); not part of the plan.
    pub misplaced_rows: i64,
    /// The copy rate the estimate assumes (rows per second).
    pub rate_rows_per_sec: u64,
    /// The estimate: rows to move / rate (seconds).
    pub eta_secs: f64,
}

/// Checks M against N (before connecting to anything). For `hash = "map"`, M against the
/// config's shards only (which of them hold accounts needs the map:
/// [`crate::ops::balance::map_targets`]).
pub fn check_shards(config: &Config, to: usize) -> Result<(), GrowError> {
    if config.routing.hash == HashKind::Map {
        if to > config.shards.len() {
            return Err(GrowError::MapTooMany {
                to,
                listed: config.shards.len(),
            });
        }
        return Ok(());
    }
    let from = config.shards.len();
    if from == 0 || to <= from || to % from != 0 {
        return Err(GrowError::NotMultiple { from, to });
    }
    if config.new_shards.len() < to - from {
        return Err(GrowError::NewShardsMissing {
            from,
            to,
            listed: config.new_shards.len(),
        });
    }
    Ok(())
}

/// The sharded tables of the table set, read on the source (what a plan measures and a
/// rebalance moves).
pub async fn sharded_tables(config: &Config) -> Result<Vec<TableRule>, GrowError> {
    tables_in_mode(config, TableMode::Sharded).await
}

/// The table set's tables of one mode, read on the source.
pub async fn tables_in_mode(config: &Config, mode: TableMode) -> Result<Vec<TableRule>, GrowError> {
    let src = connect_plain(&config.source.url)
        .await
        .map_err(|e| GrowError::Shard {
            shard: "source".into(),
            what: "connecting ([source] url)".into(),
            message: e.to_string(),
        })?;
    Ok(catalog::discover(&src, config)
        .await?
        .into_iter()
        .filter(|t| t.rule.mode == mode)
        .map(|t| t.rule)
        .collect())
}

/// A SQL connection to one of the config's `[[shards]]`.
pub async fn connect_shard(
    shard: &crate::config::ShardConfig,
) -> Result<tokio_postgres::Client, GrowError> {
    connect_plain(&shard.url)
        .await
        .map_err(|e| GrowError::Shard {
            shard: shard.name.clone(),
            what: "connecting ([[shards]] url)".into(),
            message: e.to_string(),
        })
}

/// The type of `rule`'s shard key column on a shard: its OID and `format_type` text; a table
/// missing there, or without the column, is an error naming both.
pub async fn key_type(
    c: &tokio_postgres::Client,
    shard: &str,
    rule: &TableRule,
) -> Result<(tokio_postgres::types::Oid, String), GrowError> {
    let row = c
        .query_opt(
            "SELECT a.atttypid, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
            &[&rule.target.quoted(), &rule.key],
        )
        .await
        .map_err(|e| GrowError::Shard {
            shard: shard.to_owned(),
            what: format!("reading the key type of {}", rule.target),
            message: crate::pg::conn::error_text(&e),
        })?;
    row.map(|r| (r.get(0), r.get(1)))
        .ok_or_else(|| GrowError::Shard {
            shard: shard.to_owned(),
            what: format!("table {}", rule.target),
            message: format!(
                "missing, or without its shard key column {} (run reshard check)",
                rule.key
            ),
        })
}

/// Counts, on every old shard, the rows and bytes of each new shard and makes the plan.
pub async fn plan_growth(config: &Config, to: usize, rate: u64) -> Result<GrowPlan, GrowError> {
    if config.routing.hash != HashKind::Postgres {
        return Err(GrowError::NotHash);
    }
    check_shards(config, to)?;
    let from = config.shards.len();
    let tables = sharded_tables(config).await?;
    let mut shards: Vec<NewShard> = (0..to)
        .map(|j| NewShard {
            index: j,
            from_index: j % from,
            from: config.shards[j % from].name.clone(),
            name: config
                .shards
                .iter()
                .chain(&config.new_shards)
                .nth(j)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            stays: j < from,
            rows: 0,
            bytes: 0,
            tables: Vec::new(),
        })
        .collect();
    let mut misplaced_rows = 0i64;
    for (i, shard) in config.shards.iter().enumerate() {
        let err = |what: &str| {
            let shard = shard.name.clone();
            let what = what.to_owned();
            move |e: tokio_postgres::Error| GrowError::Shard {
                shard,
                what,
                message: crate::pg::conn::error_text(&e),
            }
        };
        let c = connect_shard(shard).await?;
        for rule in &tables {
            let (_, ty) = key_type(&c, &shard.name, rule).await?;
            let route = HashRoute {
                helper: format!(
                    "reshard_plan_route_{}",
                    ty.replace(|ch: char| !ch.is_ascii_alphanumeric(), "_")
                ),
                shards: to,
            };
            c.batch_execute(&route.create_sql(&ty))
                .await
                .map_err(err("creating the temporary routing helper"))?;
            let k = quote_ident(&rule.key);
            let sql = format!(
                "SELECT j, count(*), coalesce(sum(b), 0)::bigint FROM (\
                   SELECT {} AS j, pg_column_size(t.*) AS b FROM {} t WHERE {k} IS NOT NULL) x \
                 GROUP BY j ORDER BY j",
                route.shard_expr(&format!("t.{k}")),
                rule.target.quoted()
            );
            let rows = c.query(&sql, &[]).await.map_err(err(&format!(
                "counting the rows of {} per new shard",
                rule.target
            )))?;
            for r in rows {
                let j: i32 = r.get(0);
                let (n, b): (i64, i64) = (r.get(1), r.get(2));
                let Some(s) = usize::try_from(j).ok().and_then(|j| shards.get_mut(j)) else {
                    continue;
                };
                if s.from_index != i {
                    // A row of old shard i that hashes to another old shard for MODULUS N:
                    // misplaced already (verify names it); counted, not planned.
                    misplaced_rows += n;
                    continue;
                }
                s.rows += n;
                s.bytes += b;
                s.tables.push((rule.target.to_string(), n));
            }
        }
    }
    let rows_to_move: i64 = shards.iter().filter(|s| !s.stays).map(|s| s.rows).sum();
    let bytes_to_move: i64 = shards.iter().filter(|s| !s.stays).map(|s| s.bytes).sum();
    let rate = rate.max(1);
    Ok(GrowPlan {
        from_shards: from,
        to_shards: to,
        shards,
        rows_to_move,
        bytes_to_move,
        misplaced_rows,
        rate_rows_per_sec: rate,
        eta_secs: rows_to_move as f64 / rate as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hash: &str, n: usize) -> Config {
        let mut s = format!("[source]\nurl = \"host=x\"\n[routing]\nhash = \"{hash}\"\n");
        if hash == "map" {
            s.push_str("map = \"accounts.csv\"\n");
        }
        for i in 0..n {
            s.push_str(&format!("[[shards]]\nname = \"s{i}\"\nurl = \"host=y\"\n"));
        }
        for i in n..3 * n {
            s.push_str(&format!(
                "[[new_shards]]\nname = \"s{i}\"\nurl = \"host=y\"\n"
            ));
        }
        toml::from_str(&s).expect("config")
    }

    #[test]
    fn m_must_be_a_larger_multiple_of_n() {
        let c = config("postgres", 2);
        assert!(check_shards(&c, 4).is_ok());
        assert!(check_shards(&c, 6).is_ok());
        for m in [1, 2, 3, 5] {
            let e = check_shards(&c, m).unwrap_err();
            assert!(
                matches!(e, GrowError::NotMultiple { from: 2, to } if to == m),
                "{e}"
            );
            assert!(
                e.to_string().contains("multiple of the current one (2)"),
                "{e}"
            );
        }
        // 8 needs 6 new shards; the config lists 4: refused, naming the config key.
        let e = check_shards(&c, 8).unwrap_err();
        assert!(
            matches!(
                e,
                GrowError::NewShardsMissing {
                    from: 2,
                    to: 8,
                    listed: 4
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("needs 6 [[new_shards]]"), "{e}");
    }
}
