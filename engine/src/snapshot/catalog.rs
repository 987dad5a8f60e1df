//! The load's plan: what the source tables look like, whether every shard's target can take
//! them, what an earlier run already finished, and how each table is cut into chunks.
//!
//! In: the configured [`TableSpec`]s and connections to the source and the shards. Out: a
//! [`Plan`] (copy columns, key position, chunks, per-table status) or one
//! [`SnapshotError::Targets`] listing every problem found.
//!
//! Chunking uses ctid page ranges (`WHERE ctid >= '(p,0)' AND ctid < '(q,0)'`), computed from
//! `pg_relation_size` and the `pg_class` row density. Why not primary-key percentiles: they need
//! a sort or full index scan of the table just to plan, require a usable single-column key, and
//! gain nothing for restart because an unfinished table is copied again as a whole anyway
//! (finished chunks of an unfinished table are consistent at the old snapshot, the rest would be
//! at the new one). Page ranges cost nothing to plan, work for every table, and since PostgreSQL
//! 14 each range is read with a TID range scan
//! (<https://www.postgresql.org/docs/14/release-14.html>, "TID range scan"). Under one snapshot
//! the ranges are exact: the chunks cover pages `[0, ∞)` (the last one is open-ended), so every
//! visible tuple is in exactly one chunk wherever it lies. Before 14 a ctid range would be a
//! sequential scan per chunk, so such servers get one chunk per relation. A partitioned source
//! table is chunked per leaf partition, each read with `SELECT … FROM ONLY leaf`.
//!
//! With `[snapshot] mode = "watermark"`, a table whose row identity is an integer key is loaded
//! in key-ordered chunks without a long-held snapshot instead (`watermark`); the page ranges
//! then only estimate its chunk count for the progress. A table without such a key falls back
//! to the exported snapshot, with a log line saying why. A table keeps the mode its records on
//! the shards were written in, whatever the config says now.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::error::{fix_for, SnapshotError};
use super::rows::CopyFormat;
use super::watermark::{self, WatermarkPlan};
use super::{Connect, ShardTarget, TableMode, TableName, TableSpec};
use crate::config::SnapshotMode;
use crate::event::Oid;
use crate::lsn::Lsn;

/// Rows per 8 KiB page assumed when the table has never been analyzed.
const DEFAULT_ROWS_PER_PAGE: f64 = 60.0;

/// reshard's bookkeeping on every shard. `fullload_chunks` gets one row per chunk, written in
/// the same transaction as the chunk's rows (`watermark_chunks` likewise for a watermark load:
/// the chunk's key range `(key_after, key_last]`, NULL meaning unbounded, the snapshot it was
/// read under and its low and high watermarks); `deferred_indexes` holds the definitions of
/// secondary indexes dropped for the load until they are rebuilt.
pub(crate) const STATE_DDL: &str = "\
CREATE SCHEMA IF NOT EXISTS reshard;
CREATE TABLE IF NOT EXISTS reshard.fullload_chunks (
    source_table text NOT NULL,
    chunk_id integer NOT NULL,
    chunks_total integer NOT NULL,
    snapshot_lsn pg_lsn NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, chunk_id)
);
CREATE TABLE IF NOT EXISTS reshard.deferred_indexes (
    target_table text NOT NULL,
    index_name text NOT NULL,
    indexdef text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_table, index_name)
);
CREATE TABLE IF NOT EXISTS reshard.watermark_chunks (
    source_table text NOT NULL,
    chunk_id integer NOT NULL,
    key_after bigint[],
    key_last bigint[],
    snapshot text NOT NULL,
    low_lsn pg_lsn NOT NULL,
    high_lsn pg_lsn NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, chunk_id)
);";

/// What an earlier run left for a table.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum TableStatus {
    /// Nothing recorded on any shard.
    Fresh,
    /// Some chunks recorded somewhere, but not all on all shards: empty it and copy again.
    Partial,
    /// Every chunk on every shard, all under the snapshot at `as_of`.
    Finished { as_of: Lsn, chunks: u32 },
}

/// A heap the copy reads from: the table itself, or one leaf partition of it.
#[derive(Clone, Debug)]
pub(crate) struct SourceRelation {
    /// `schema.table`, quoted.
    pub name: String,
    /// Pages now (`pg_relation_size / block_size`).
    pub pages: u64,
    /// `pg_class.relpages` at the last ANALYZE/VACUUM.
    pub relpages: i64,
    /// `pg_class.reltuples` at the last ANALYZE/VACUUM (-1: never).
    pub reltuples: f64,
}

/// One chunk of a table: a page range of one relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChunkRange {
    /// Index into [`PlannedTable::relations`].
    pub relation: usize,
    /// First page (inclusive).
    pub from_page: u64,
    /// End page (exclusive); `None` = to the end of the relation.
    pub to_page: Option<u64>,
}

impl ChunkRange {
    /// The `WHERE` condition selecting this chunk, if any.
    pub fn predicate(&self) -> Option<String> {
        match (self.from_page, self.to_page) {
            (0, None) => None,
            (f, None) => Some(format!("ctid >= '({f},0)'::tid")),
            (0, Some(t)) => Some(format!("ctid < '({t},0)'::tid")),
            (f, Some(t)) => Some(format!("ctid >= '({f},0)'::tid AND ctid < '({t},0)'::tid")),
        }
    }
}

/// The shard key of a sharded table.
#[derive(Clone, Debug)]
pub(crate) struct KeyColumn {
    /// Position among the copied columns.
    pub index: usize,
    /// Column name.
    pub name: String,
    /// Type OID on the source.
    pub type_oid: Oid,
}

/// A table as the load will copy it.
#[derive(Clone, Debug)]
pub(crate) struct PlannedTable {
    /// Source table.
    pub source: TableName,
    /// Source table, quoted `schema.table`.
    pub source_display: String,
    /// Target table, quoted `schema.table`.
    pub target_display: String,
    /// Columns copied, in source order, quoted.
    pub columns: Vec<String>,
    /// Their type OIDs on the source (to show a binary row in a message).
    pub column_types: Vec<Oid>,
    /// `None` for broadcast tables.
    pub key: Option<KeyColumn>,
    /// Heaps to read.
    pub relations: Vec<SourceRelation>,
    /// The chunks, in order; chunk id = position.
    pub chunks: Vec<ChunkRange>,
    /// What an earlier run left.
    pub status: TableStatus,
    /// Loaded in watermark chunks (`None`: under the exported snapshot).
    pub watermark: Option<WatermarkPlan>,
    /// Every copied column can travel in binary COPY format on the source and on every shard,
    /// and the key (if any) is an integer.
    pub binary_ok: bool,
}

impl PlannedTable {
    /// The format the table's rows travel in: binary where it can (and `binary_copy` allows),
    /// text otherwise.
    pub fn format(&self, binary_copy: bool) -> CopyFormat {
        if binary_copy && self.binary_ok {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        }
    }

    pub fn chunks_total(&self) -> u32 {
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }
}

/// The load's plan.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub tables: Vec<PlannedTable>,
}

#[derive(Clone, Debug)]
struct ColumnInfo {
    name: String,
    type_name: String,
    type_oid: Oid,
    generated: bool,
    required: bool,
    /// Its values can travel in binary COPY format (see `COLUMNS_SQL`).
    binary: bool,
}

pub(crate) async fn connect(target: &str, c: &Connect) -> Result<Client, SnapshotError> {
    c().await.map_err(|source| SnapshotError::Connect {
        target: target.to_owned(),
        source,
    })
}

pub(crate) fn source_err(context: String) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    move |source| SnapshotError::Source {
        context,
        fix: fix_for(&source),
        source,
    }
}

pub(crate) fn shard_err(
    shard: &str,
    context: String,
) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let shard = shard.to_owned();
    move |source| SnapshotError::Shard {
        shard,
        context,
        fix: fix_for(&source),
        source,
    }
}

/// Per column: name, type, type OID, generated, required, and whether its values can travel in
/// binary COPY format between two databases that both have the type under this name: a
/// built-in type (its OID and send/receive format are the same everywhere, arrays included),
/// an enum (sent as its label) or a domain over a built-in type (sent as the base type). Not a
/// user-defined base, composite, range or array type: their binary form carries OIDs that
/// differ between databases, or comes from an extension.
const COLUMNS_SQL: &str = "\
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8,
       a.attgenerated::text <> '', a.attnotnull AND NOT a.atthasdef AND a.attidentity::text = '',
       t.typsend::oid <> 0 AND t.typreceive::oid <> 0
         AND (t.oid < 16384 OR t.typtype = 'e' OR (t.typtype = 'd' AND t.typbasetype < 16384))
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

const RELATION_SQL: &str = "\
SELECT c.oid::int8, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2";

const HEAPS_SQL: &str = "\
SELECT format('%I.%I', n.nspname, c.relname), c.relpages::int8, c.reltuples::float8,
       (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND (c.oid = $1::int8::oid
       OR c.oid IN (SELECT relid FROM pg_partition_tree($1::int8::oid::regclass) WHERE isleaf))
ORDER BY 1";

async fn columns(client: &Client, oid: i64) -> Result<Vec<ColumnInfo>, tokio_postgres::Error> {
    let rows = client.query(COLUMNS_SQL, &[&oid]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(ColumnInfo {
            name: r.try_get(0)?,
            type_name: r.try_get(1)?,
            type_oid: u32::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
            generated: r.try_get(3)?,
            required: r.try_get(4)?,
            binary: r.try_get(5)?,
        });
    }
    Ok(out)
}

async fn relation(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<(i64, String)>, tokio_postgres::Error> {
    let row = client.query_opt(RELATION_SQL, &[&schema, &name]).await?;
    match row {
        Some(r) => Ok(Some((r.try_get(0)?, r.try_get(1)?))),
        None => Ok(None),
    }
}

/// Creates reshard's state tables on a shard if they are missing. Two processes racing on
/// `CREATE … IF NOT EXISTS` can collide on the catalog's unique index; one retry settles it.
pub(crate) async fn ensure_state(shard: &str, client: &Client) -> Result<(), SnapshotError> {
    match client.batch_execute(STATE_DDL).await {
        Ok(()) => Ok(()),
        Err(e)
            if e.code()
                .is_some_and(|c| c.code() == "23505" || c.code() == "42P07") =>
        {
            client
                .batch_execute(STATE_DDL)
                .await
                .map_err(shard_err(shard, "creating reshard's state tables".into()))
        }
        Err(e) => Err(shard_err(shard, "creating reshard's state tables".into())(
            e,
        )),
    }
}

/// Cuts one relation of `pages` pages into page ranges of about `chunk_rows` rows.
pub(crate) fn page_ranges(
    pages: u64,
    relpages: i64,
    reltuples: f64,
    chunk_rows: u64,
    tid_range_scan: bool,
) -> Vec<(u64, Option<u64>)> {
    let density = if relpages > 0 && reltuples > 0.0 {
        reltuples / relpages as f64
    } else {
        DEFAULT_ROWS_PER_PAGE
    };
    let estimate = density * pages as f64;
    let wanted = (estimate / chunk_rows.max(1) as f64).ceil() as u64;
    let n = if tid_range_scan {
        wanted.clamp(1, pages.max(1))
    } else {
        1
    };
    if n == 1 {
        return vec![(0, None)];
    }
    let per = pages.div_ceil(n);
    let mut out = Vec::new();
    let mut from = 0;
    while from + per < pages {
        out.push((from, Some(from + per)));
        from += per;
    }
    out.push((from, None));
    out
}

/// Per shard, per source table: chunk ids recorded, their totals and snapshot LSNs.
type Records = HashMap<String, Vec<(i32, i32, String)>>;

async fn read_records(shard: &str, client: &Client) -> Result<Records, SnapshotError> {
    let rows = client
        .query(
            "SELECT source_table, chunk_id, chunks_total, snapshot_lsn::text
             FROM reshard.fullload_chunks",
            &[],
        )
        .await
        .map_err(shard_err(shard, "reading reshard.fullload_chunks".into()))?;
    let mut out: Records = HashMap::new();
    for r in rows {
        let get = || -> Result<(String, i32, i32, String), tokio_postgres::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
        };
        let (t, id, total, lsn) =
            get().map_err(shard_err(shard, "reading reshard.fullload_chunks".into()))?;
        out.entry(t).or_default().push((id, total, lsn));
    }
    Ok(out)
}

/// Combines every shard's records for one table.
fn status_of(table: &str, per_shard: &[Records]) -> TableStatus {
    let mut any = false;
    let mut finished: Option<(String, i32)> = None;
    let mut all_finished = true;
    for records in per_shard {
        let Some(recs) = records.get(table) else {
            all_finished = false;
            continue;
        };
        any |= !recs.is_empty();
        let Some((_, total, lsn)) = recs.first() else {
            all_finished = false;
            continue;
        };
        let mut ids: Vec<i32> = recs.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let complete = recs.iter().all(|r| r.1 == *total && r.2 == *lsn)
            && ids.len() == usize::try_from(*total).unwrap_or(usize::MAX)
            && ids.iter().all(|&i| i >= 0 && i < *total);
        match (&finished, complete) {
            (_, false) => all_finished = false,
            (None, true) => finished = Some((lsn.clone(), *total)),
            (Some(f), true) if f.0 == *lsn && f.1 == *total => {}
            (Some(_), true) => all_finished = false,
        }
    }
    match finished {
        Some((lsn, total)) if all_finished => match lsn.parse::<Lsn>() {
            Ok(as_of) => TableStatus::Finished {
                as_of,
                chunks: u32::try_from(total).unwrap_or(0),
            },
            Err(_) => TableStatus::Partial,
        },
        _ if any => TableStatus::Partial,
        _ => TableStatus::Fresh,
    }
}

/// One shard's side of the plan: reshard's records there and, per table, its columns and
/// whether it holds rows.
struct ShardSide {
    records: Records,
    wm_records: watermark::Records,
    columns: Vec<Option<Vec<ColumnInfo>>>,
    nonempty: Vec<bool>,
    problems: Vec<String>,
}

async fn shard_side(shard: &ShardTarget, specs: &[TableSpec]) -> Result<ShardSide, SnapshotError> {
    let client = connect(&shard.name, &shard.connect).await?;
    ensure_state(&shard.name, &client).await?;
    let mut side = ShardSide {
        records: read_records(&shard.name, &client).await?,
        wm_records: watermark::read_records(&shard.name, &client).await?,
        columns: Vec::new(),
        nonempty: Vec::new(),
        problems: Vec::new(),
    };
    for spec in specs {
        let name = spec.target.to_string();
        let ctx = || format!("inspecting table {name}");
        match relation(&client, &spec.target.schema, &spec.target.name)
            .await
            .map_err(shard_err(&shard.name, ctx()))?
        {
            None => {
                side.problems.push(format!(
                    "{}: table {name} is missing (create it with the source's DDL)",
                    shard.name
                ));
                side.columns.push(None);
                side.nonempty.push(false);
            }
            Some((oid, _)) => {
                side.columns.push(Some(
                    columns(&client, oid)
                        .await
                        .map_err(shard_err(&shard.name, ctx()))?,
                ));
                let has_rows: bool = client
                    .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), &[])
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(shard_err(&shard.name, ctx()))?;
                side.nonempty.push(has_rows);
            }
        }
    }
    Ok(side)
}

/// Inspects the source and the shards; see the module docs.
pub(crate) async fn inspect(
    source: &Connect,
    shards: &[ShardTarget],
    specs: &[TableSpec],
    truncate_targets: bool,
    chunk_rows: u64,
    mode: SnapshotMode,
) -> Result<Plan, SnapshotError> {
    // The source's side and every shard's side, all at once: each is a series of round trips.
    let source_side = async {
        let mut problems: Vec<String> = Vec::new();
        let src = connect("source", source).await?;
        let version: i32 = src
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(source_err("reading server_version_num".into()))?;
        let tid_range_scan = version >= 140_000;

        // The source side of every table.
        let mut sources: Vec<Option<(Vec<ColumnInfo>, Vec<SourceRelation>)>> = Vec::new();
        for spec in specs {
            let name = spec.source.to_string();
            let ctx = || format!("inspecting table {name}");
            let Some((oid, kind)) = relation(&src, &spec.source.schema, &spec.source.name)
                .await
                .map_err(source_err(ctx()))?
            else {
                problems.push(format!("source: table {name} does not exist"));
                sources.push(None);
                continue;
            };
            if kind != "r" && kind != "p" {
                problems.push(format!(
                    "source: {name} is not a table (relkind {kind}); only tables and partitioned \
                     tables can be copied"
                ));
                sources.push(None);
                continue;
            }
            let cols = columns(&src, oid).await.map_err(source_err(ctx()))?;
            let mut heaps = Vec::new();
            for r in src
                .query(HEAPS_SQL, &[&oid])
                .await
                .map_err(source_err(ctx()))?
            {
                let get = || -> Result<SourceRelation, tokio_postgres::Error> {
                    Ok(SourceRelation {
                        name: r.try_get(0)?,
                        relpages: r.try_get(1)?,
                        reltuples: r.try_get(2)?,
                        pages: u64::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
                    })
                };
                heaps.push(get().map_err(source_err(ctx()))?);
            }
            if let TableMode::Sharded { key } = &spec.mode {
                if !cols.iter().any(|c| &c.name == key) {
                    problems.push(format!(
                        "source: table {name} has no column {key} (its configured shard key); fix \
                         the key in the config or make the table broadcast"
                    ));
                }
            }
            sources.push(Some((cols, heaps)));
        }
        Ok::<_, SnapshotError>((src, tid_range_scan, sources, problems))
    };
    let shard_sides =
        futures_util::future::try_join_all(shards.iter().map(|shard| shard_side(shard, specs)));
    let ((src, tid_range_scan, sources, mut problems), shard_sides) =
        futures_util::future::try_join(source_side, shard_sides).await?;

    let mut targets: Vec<Vec<Option<Vec<ColumnInfo>>>> = Vec::new();
    let mut records: Vec<Records> = Vec::new();
    let mut wm_records: Vec<watermark::Records> = Vec::new();
    let mut nonempty: Vec<Vec<bool>> = Vec::new();
    for side in shard_sides {
        problems.extend(side.problems);
        records.push(side.records);
        wm_records.push(side.wm_records);
        targets.push(side.columns);
        nonempty.push(side.nonempty);
    }

    let mut tables = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let source_display = spec.source.to_string();
        let target_display = spec.target.to_string();
        let exported_status = status_of(&source_display, &records);
        let agreed = watermark::agreed(&source_display, &wm_records);
        let Some(Some((src_cols, heaps))) = sources.get(i) else {
            continue;
        };
        // Copy the source's stored columns that every shard has as a stored column.
        let mut copy: Vec<&ColumnInfo> = Vec::new();
        let mut binary_ok = true;
        // A shard column of another type than the source's, or a source column some shards
        // lack: a problem for a table still to be copied. A loaded table's rows reach the
        // shard through the stream, whose apply adds the column (`ddl = "propagate"`: other
        // shards may have had their first change of the table already) or waits for the shard
        // DDL, naming it: the daemon starts.
        let mut retyped: Vec<(String, String)> = Vec::new();
        for col in src_cols.iter().filter(|c| !c.generated) {
            let mut on = Vec::new();
            let mut off = Vec::new();
            for (s, shard) in shards.iter().enumerate() {
                let Some(Some(tcols)) = targets.get(s).and_then(|t| t.get(i)) else {
                    continue;
                };
                match tcols.iter().find(|t| t.name == col.name && !t.generated) {
                    Some(t) => on.push((shard, t)),
                    None => off.push(shard),
                }
            }
            if on.is_empty() {
                tracing::warn!(table = %source_display, column = %col.name,
                    "column is on the source but on no target; it is not copied");
                continue;
            }
            for shard in off {
                retyped.push((
                    shard.name.clone(),
                    format!(
                        "{}: table {target_display} has no stored column {} ({} on the source, \
                         present on other shards); add it so all shards match",
                        shard.name, col.name, col.type_name
                    ),
                ));
            }
            for (shard, t) in on {
                binary_ok &= t.binary;
                if t.type_name != col.type_name {
                    retyped.push((
                        shard.name.clone(),
                        format!(
                            "{}: column {target_display}.{} is {} but {} on the source; \
                             ALTER it to the source's type",
                            shard.name, col.name, t.type_name, col.type_name
                        ),
                    ));
                }
            }
            binary_ok &= col.binary;
            copy.push(col);
        }
        // The load's mode: a table keeps the mode its records were written in; a fresh one
        // takes the config's, if its key allows.
        let wants_watermark = agreed.any
            || (exported_status == TableStatus::Fresh && mode == SnapshotMode::Watermark);
        let watermark = if wants_watermark {
            let names: Vec<String> = copy.iter().map(|c| c.name.clone()).collect();
            match watermark::chunk_key(&src, spec, &names)
                .await
                .map_err(source_err(format!("reading the key of {source_display}")))?
            {
                Ok((key, partitioned)) => Some(WatermarkPlan {
                    key,
                    partitioned,
                    agreed: agreed.clone(),
                }),
                Err(why) if agreed.any => {
                    problems.push(format!(
                        "table {source_display}: its load was started in watermark chunks \
                         (reshard.watermark_chunks) but {why}; restore the key, or empty the \
                         table on every shard and delete its rows from \
                         reshard.watermark_chunks to load it under an exported snapshot"
                    ));
                    None
                }
                Err(why) => {
                    tracing::warn!(table = %source_display, reason = %why,
                        "[snapshot] mode = \"watermark\": this table has no integer primary key \
                         (or replica identity index) to cut chunks on; it falls back to the \
                         exported snapshot, held while it is copied");
                    None
                }
            }
        } else {
            None
        };
        let status = match &watermark {
            None => exported_status,
            Some(wm) if wm.agreed.finished => TableStatus::Finished {
                as_of: wm.agreed.first_low.unwrap_or(Lsn::ZERO),
                chunks: u32::try_from(wm.agreed.chunks).unwrap_or(u32::MAX),
            },
            Some(wm) if wm.agreed.any => TableStatus::Partial,
            Some(_) => TableStatus::Fresh,
        };
        if matches!(status, TableStatus::Finished { .. }) {
            for (shard, problem) in retyped {
                tracing::warn!(shard = %shard, table = %target_display, problem = %problem,
                    "the table is loaded; its changes wait on the shard until its columns match the source's (or are added to it, ddl = \"propagate\")");
            }
        } else {
            problems.extend(retyped.into_iter().map(|(_, p)| p));
        }
        // Target columns that COPY would leave NULL but that may not be.
        for (s, shard) in shards.iter().enumerate() {
            let Some(Some(tcols)) = targets.get(s).and_then(|t| t.get(i)) else {
                continue;
            };
            for t in tcols.iter().filter(|t| t.required && !t.generated) {
                if !copy.iter().any(|c| c.name == t.name) {
                    problems.push(format!(
                        "{}: column {target_display}.{} is NOT NULL without a default and has \
                         no source column to copy from; add a default or drop the constraint",
                        shard.name, t.name
                    ));
                }
            }
            let has_rows = nonempty.get(s).and_then(|n| n.get(i)).copied() == Some(true);
            if has_rows && status == TableStatus::Fresh && !truncate_targets {
                problems.push(format!(
                    "{}: table {target_display} is not empty; empty it (TRUNCATE \
                     {target_display}) or set truncate_targets = true",
                    shard.name
                ));
            }
        }
        let key = match &spec.mode {
            TableMode::Broadcast => None,
            TableMode::Sharded { key } => match copy.iter().position(|c| &c.name == key) {
                Some(index) => copy.get(index).map(|c| KeyColumn {
                    index,
                    name: key.clone(),
                    type_oid: c.type_oid,
                }),
                None => {
                    if src_cols.iter().any(|c| &c.name == key) {
                        problems.push(format!(
                            "table {source_display}: shard key {key} is not a stored column on \
                             both the source and the targets; it must be copied to route rows"
                        ));
                    }
                    None
                }
            },
        };
        // Binary rows are routed by an integer key only (see `copy::route_row`).
        let binary_ok = binary_ok
            && key
                .as_ref()
                .is_none_or(|k| watermark::KEY_TYPES.contains(&k.type_oid));
        let mut chunks = Vec::new();
        for (r, heap) in heaps.iter().enumerate() {
            for (from_page, to_page) in page_ranges(
                heap.pages,
                heap.relpages,
                heap.reltuples,
                chunk_rows,
                tid_range_scan,
            ) {
                chunks.push(ChunkRange {
                    relation: r,
                    from_page,
                    to_page,
                });
            }
        }
        tables.push(PlannedTable {
            source: spec.source.clone(),
            source_display,
            target_display,
            columns: copy
                .iter()
                .map(|c| crate::event::quote_ident(&c.name))
                .collect(),
            column_types: copy.iter().map(|c| c.type_oid).collect(),
            key,
            relations: heaps.clone(),
            chunks,
            status,
            watermark,
            binary_ok,
        });
    }
    if !problems.is_empty() {
        return Err(SnapshotError::Targets { problems });
    }
    Ok(Plan { tables })
}

/// Before copying `to_copy`, on every shard in one transaction: empties the partly loaded
/// tables (and, with `truncate_targets`, the others) and forgets their chunk records.
pub(crate) async fn reset_targets(
    shards: &[ShardTarget],
    plan: &Plan,
    to_copy: &[usize],
    truncate_targets: bool,
) -> Result<(), SnapshotError> {
    let truncate: Vec<&str> = to_copy
        .iter()
        .filter_map(|&i| plan.tables.get(i))
        .filter(|t| t.watermark.is_none())
        .filter(|t| truncate_targets || t.status == TableStatus::Partial)
        .map(|t| t.target_display.as_str())
        .collect();
    let forget: Vec<String> = to_copy
        .iter()
        .filter_map(|&i| plan.tables.get(i))
        .filter(|t| t.watermark.is_none())
        .map(|t| t.source_display.clone())
        .collect();
    // Every shard at once (each in its own transaction, as before).
    let (truncate, forget) = (&truncate, &forget);
    futures_util::future::try_join_all(shards.iter().map(|shard| async move {
        let mut client = connect(&shard.name, &shard.connect).await?;
        let ctx = || format!("emptying tables {}", truncate.join(", "));
        let tx = client
            .transaction()
            .await
            .map_err(shard_err(&shard.name, ctx()))?;
        if !truncate.is_empty() {
            tx.batch_execute(&format!("TRUNCATE {}", truncate.join(", ")))
                .await
                .map_err(shard_err(&shard.name, ctx()))?;
        }
        tx.execute(
            "DELETE FROM reshard.fullload_chunks WHERE source_table = ANY($1)",
            &[forget],
        )
        .await
        .map_err(shard_err(&shard.name, ctx()))?;
        tx.commit().await.map_err(shard_err(&shard.name, ctx()))
    }))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tables_are_one_chunk() {
        assert_eq!(page_ranges(0, 0, -1.0, 1000, true), vec![(0, None)]);
        assert_eq!(page_ranges(10, 10, 500.0, 1000, true), vec![(0, None)]);
    }

    #[test]
    fn large_tables_are_cut_into_covering_ranges() {
        // 1000 pages of 100 rows, 20k rows a chunk: 5 chunks of 200 pages.
        let r = page_ranges(1000, 1000, 100_000.0, 20_000, true);
        assert_eq!(
            r,
            vec![
                (0, Some(200)),
                (200, Some(400)),
                (400, Some(600)),
                (600, Some(800)),
                (800, None)
            ]
        );
        // Ranges are contiguous from page 0 and the last is open-ended, whatever the sizes.
        for pages in [1u64, 7, 99, 1001] {
            for rows in [1u64, 50, 3333] {
                let r = page_ranges(pages, pages as i64, pages as f64 * 100.0, rows, true);
                assert_eq!(r.first().map(|c| c.0), Some(0));
                assert_eq!(r.last().map(|c| c.1), Some(None));
                for w in r.windows(2) {
                    assert_eq!(w[0].1, Some(w[1].0));
                }
                assert!(r.len() as u64 <= pages);
            }
        }
    }

    #[test]
    fn no_tid_range_scan_means_one_chunk() {
        assert_eq!(page_ranges(1000, 1000, 1e6, 10, false), vec![(0, None)]);
    }

    #[test]
    fn unanalyzed_tables_use_a_default_density() {
        let r = page_ranges(1000, 0, -1.0, 6_000, true);
        assert_eq!(r.len(), 10);
    }

    #[test]
    fn predicates_are_page_ranges() {
        let c = |f, t| ChunkRange {
            relation: 0,
            from_page: f,
            to_page: t,
        };
        assert_eq!(c(0, None).predicate(), None);
        assert_eq!(
            c(0, Some(5)).predicate().as_deref(),
            Some("ctid < '(5,0)'::tid")
        );
        assert_eq!(
            c(5, Some(9)).predicate().as_deref(),
            Some("ctid >= '(5,0)'::tid AND ctid < '(9,0)'::tid")
        );
        assert_eq!(
            c(9, None).predicate().as_deref(),
            Some("ctid >= '(9,0)'::tid")
        );
    }

    fn recs(entries: &[(&str, i32, i32, &str)]) -> Records {
        let mut r: Records = HashMap::new();
        for (t, id, total, lsn) in entries {
            r.entry((*t).to_owned())
                .or_default()
                .push((*id, *total, (*lsn).to_owned()));
        }
        r
    }

    #[test]
    fn a_table_is_finished_only_when_every_shard_has_every_chunk() {
        let full = recs(&[("t", 0, 2, "0/10"), ("t", 1, 2, "0/10")]);
        let half = recs(&[("t", 0, 2, "0/10")]);
        let other_lsn = recs(&[("t", 0, 2, "0/20"), ("t", 1, 2, "0/20")]);
        assert_eq!(
            status_of("t", &[full.clone(), full.clone()]),
            TableStatus::Finished {
                as_of: Lsn::from_u64(0x10),
                chunks: 2
            }
        );
        assert_eq!(status_of("t", &[full.clone(), half]), TableStatus::Partial);
        assert_eq!(
            status_of("t", &[full.clone(), Records::new()]),
            TableStatus::Partial
        );
        assert_eq!(status_of("t", &[full, other_lsn]), TableStatus::Partial);
        assert_eq!(
            status_of("t", &[Records::new(), Records::new()]),
            TableStatus::Fresh
        );
    }
}
