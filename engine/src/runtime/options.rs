//! The config turned into each stage's options, once (the `LowArgs` → `HiArgs` step of
//! STYLE.md): the router's spec and the account map, the full load's table list, connections
//! and options, the ingest's options and the spill log's.
//!
//! In: the validated [`Config`], the source's replicated tables ([`SourceTable`], from
//! [`crate::pg::catalog`]) and the parsed connections. Out: the stages' own option types. No
//! stage reads the config itself; a default lives in the config section's `Default`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, HashKind, TableMode as CfgMode};
use crate::pg::catalog::SourceTable;
use crate::pg::sql::TableName;
use crate::route::refresh::{no_map_configured, MapSource};
use crate::route::{self, AccountMap, RouteError, RouteSpec, Router};
use crate::runtime::ingest::IngestOptions;
use crate::snapshot;
use crate::source::ConnConfig;

/// The account map of `[routing] hash = "map"`, read once at start: where it is re-read from,
/// and its first reading. `None` with `hash = "postgres"`.
pub struct LoadedMap {
    /// Where the map comes from (`[routing] map` or `map_query`).
    pub source: MapSource,
    /// The map as read now.
    pub map: Arc<AccountMap>,
}

/// Reads `[routing]`'s account map, if `hash = "map"`.
pub async fn load_map(cfg: &Config) -> Result<Option<LoadedMap>, RouteError> {
    match MapSource::from_config(cfg)? {
        Some(source) => {
            let map = Arc::new(source.load(&mut None).await?);
            Ok(Some(LoadedMap { source, map }))
        }
        None => Ok(None),
    }
}

/// The router's spec from the config, the discovered tables and the account map (`Some` with
/// `hash = "map"`, see [`load_map`]; without one nothing could be routed, so that is refused).
pub fn route_spec(
    cfg: &Config,
    tables: &[SourceTable],
    map: Option<Arc<AccountMap>>,
) -> Result<RouteSpec, RouteError> {
    let shards = cfg.shard_names();
    let hash = match (cfg.routing.hash, map) {
        (HashKind::Map, Some(m)) => route::HashKind::Map(m),
        (HashKind::Map, None) => return Err(no_map_configured()),
        (HashKind::Postgres, _) => route::HashKind::Postgres,
    };
    Ok(RouteSpec {
        shards,
        tables: tables
            .iter()
            .map(|t| {
                let mode = match t.rule.mode {
                    CfgMode::Sharded => route::TableMode::Sharded {
                        key: t.rule.key.clone(),
                        key_immutable: t.rule.key_immutable,
                    },
                    CfgMode::Broadcast => route::TableMode::Broadcast,
                    CfgMode::Skip => route::TableMode::Skip,
                };
                let target = (t.rule.target != t.rule.source).then(|| t.rule.target.clone());
                (t.rule.source.clone(), route::TableRule { mode, target })
            })
            .collect(),
        default_key: cfg.routing.key.clone(),
        hash,
        unlisted: route::Unlisted::Skip,
    })
}

/// The ingest stage's options.
pub fn ingest_options(cfg: &Config, conn: &ConnConfig) -> IngestOptions {
    IngestOptions {
        conn: conn.clone(),
        slot: cfg.source.slot.clone(),
        publication: cfg.source.publication.clone(),
        streaming: cfg.source.streaming,
        status_interval: Duration::from_millis(cfg.source.status_interval_ms),
        coalesce: Duration::from_millis(cfg.source.coalesce_ms),
        flush_interval: Duration::from_millis(cfg.spill.flush_interval_ms),
        stream_dir: cfg.spill.dir.join("streams"),
        retry_initial: Duration::from_millis(cfg.apply.retry_initial_ms),
        retry_max: Duration::from_millis(cfg.apply.retry_max_ms),
    }
}

/// The full load of `tables` onto `shard_conns` (one per `[[shards]]`, in order).
pub fn full_load(
    cfg: &Config,
    conn: &ConnConfig,
    shard_conns: &[ConnConfig],
    tables: &[SourceTable],
    router: &Router,
) -> Result<snapshot::FullLoad, snapshot::SnapshotError> {
    Ok(snapshot::FullLoad::new(
        sql_connect(conn.clone()),
        cfg.shards
            .iter()
            .zip(shard_conns)
            .map(|(s, c)| {
                let replicas = s
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(j, url)| {
                        ConnConfig::parse(url).map(sql_connect).map_err(|e| {
                            snapshot::SnapshotError::Connect {
                                target: format!("replica {} of shard {}", j + 1, s.name),
                                source: Box::new(e),
                            }
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(snapshot::ShardTarget {
                    name: s.name.clone(),
                    connect: sql_connect(c.clone()),
                    replicas,
                })
            })
            .collect::<Result<Vec<_>, snapshot::SnapshotError>>()?,
        table_specs(tables),
        route_fn(router),
        snapshot::FullLoadOptions::from_config(&cfg.snapshot)?,
    ))
}

fn sql_connect(conn: ConnConfig) -> snapshot::Connect {
    Arc::new(move || {
        let conn = conn.clone();
        Box::pin(async move {
            conn.connect_sql()
                .await
                .map_err(|e| Box::new(e) as snapshot::BoxError)
        })
    })
}

fn table_specs(tables: &[SourceTable]) -> Vec<snapshot::TableSpec> {
    tables
        .iter()
        .filter(|t| t.rule.mode != CfgMode::Skip)
        .map(|t| snapshot::TableSpec {
            source: t.rule.source.clone(),
            target: t.rule.target.clone(),
            mode: match t.rule.mode {
                CfgMode::Broadcast => snapshot::TableMode::Broadcast,
                _ => snapshot::TableMode::Sharded {
                    key: t.rule.key.clone(),
                },
            },
        })
        .collect()
}

fn route_fn(router: &Router) -> snapshot::RouteFn {
    let r = Arc::new(router.clone());
    Arc::new(move |oid, text| r.shard_of_text(oid, text).map_err(|e| e.to_string()))
}

/// The source tables whose target name differs (for the appliers).
pub fn renamed_tables(tables: &[SourceTable]) -> std::collections::HashMap<TableName, TableName> {
    tables
        .iter()
        .filter(|t| t.rule.target != t.rule.source)
        .map(|t| (t.rule.source.clone(), t.rule.target.clone()))
        .collect()
}
