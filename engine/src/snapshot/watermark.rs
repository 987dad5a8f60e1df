//! Watermark full load (`[snapshot] mode = "watermark"`): no snapshot held across chunks.
//!
//! In: tables whose row identity is an integer key (the primary key, or the replica identity
//! index's columns, all `smallint`/`integer`/`bigint`), the copy context shared with the
//! exported load (shards, router, throttles, copy slots), and, for a resumed load, what the
//! shards recorded. Out: every chunk on every shard in one transaction with its
//! `reshard.watermark_chunks` row; the chunk windows the handoff needs
//! ([`super::window::TableWindows`]).
//!
//! Each table is read in primary-key order, one chunk at a time, in the style of Netflix's
//! DBLog and Debezium's incremental snapshots while CDC streams into the spill log from the
//! start:
//! 1. low watermark: `pg_current_wal_insert_lsn()`;
//! 2. `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, `LOCK TABLE … IN ACCESS SHARE MODE`,
//!    then in one statement the chunk's snapshot (`pg_current_snapshot()`;
//!    `txid_current_snapshot()` before PostgreSQL 13) and the high watermark
//!    (`pg_current_wal_insert_lsn()` read under it);
//! 3. `COPY (SELECT … WHERE (key) > (last key of the previous chunk) ORDER BY key LIMIT
//!    chunk_rows) TO STDOUT`, rows routed and written into each shard's open transaction;
//! 4. `COMMIT` on the source (the snapshot is released), then per shard the chunk's record
//!    (key range, snapshot, watermarks) and `COMMIT`.
//!
//! The watermarks are positions read from the source, not rows or messages written to it:
//! with the snapshot itself recorded, the handoff knows exactly which streamed transactions a
//! chunk contains (see `window`), so nothing needs to travel through the stream, the source
//! gets no writes and no `reshard` table, and pgoutput protocol 1 (PostgreSQL 12/13) works the
//! same as 4. A snapshot lives for one chunk's read, so the source's `backend_xmin` (and, as
//! the spill log acknowledges, the slot's `catalog_xmin`) advances during the load and VACUUM
//! keeps cleaning.
//!
//! The lock comes before the snapshot. A table rewrite (`ALTER TABLE … TYPE`, `VACUUM FULL`,
//! `CLUSTER`) or a `TRUNCATE` swaps the table's file under `ACCESS EXCLUSIVE`; a snapshot
//! taken before it committed reads the new file as empty or partly invisible ("not
//! MVCC-safe", <https://www.postgresql.org/docs/current/mvcc-caveats.html>), and such a chunk
//! would end the table's load there. With `ACCESS SHARE` held before the snapshot exists
//! (`LOCK` takes none: <https://www.postgresql.org/docs/current/sql-lock.html>), a rewrite
//! either committed before the snapshot, which then sees it, or waits until the chunk is read.
//! A table dropped meanwhile fails the `LOCK`, naming the table.
//!
//! Resume: the chunks a table has on every shard with the same snapshot form its agreed
//! prefix; a restarted load deletes, per shard in one transaction, the rows past the prefix's
//! last key and the records past the prefix, and continues from there. Memory per worker: the
//! copy's per-shard batches plus the chunk's last row; no key set is held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;
use tokio_postgres::Client;
use tracing::Instrument;

use super::catalog::{connect, shard_err, source_err, Plan};
use super::copy::{self, CopiedStats, CopyContext};
use super::error::SnapshotError;
use super::rows::{binary_field, field, unescape, CopyFormat};
use super::window::{
    parse_key_binary, parse_key_text, ChunkWindow, Key, TableWindows, XidSnapshot,
};
use super::{Connect, ShardTarget, TableSpec};
use crate::event::quote_ident;
use crate::lsn::Lsn;

/// Key column types a watermark chunk can be cut on, and that a binary COPY routes on (their
/// send form is read by `window::parse_key_binary`): `smallint`, `integer`, `bigint`.
pub(crate) const KEY_TYPES: &[u32] = &[21, 23, 20];

/// A chunk that waited this long for its table's lock says so (once), then goes on waiting.
const LOCK_NOTICE: std::time::Duration = std::time::Duration::from_secs(10);

/// The load may not span more transaction ids than this: a 32-bit xid from the stream is
/// widened relative to each chunk's snapshot (see `window`).
const MAX_XID_SPAN: u64 = 1 << 31;

/// One column of a table's chunk key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyPart {
    /// Column name, unquoted.
    pub name: String,
    /// Position among the copied columns.
    pub index: usize,
}

/// What the shards recorded for one table, agreed by all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// Chunks `0..chunks` are on every shard, read under the same snapshots.
    pub chunks: usize,
    /// The last agreed chunk is the table's last: the table is loaded.
    pub finished: bool,
    /// Some shard recorded some chunk of the table.
    pub any: bool,
    /// The last key of the agreed prefix (where the load resumes).
    pub after: Option<Key>,
    /// The low watermark of chunk 0.
    pub first_low: Option<Lsn>,
}

/// A table loaded in watermark chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WatermarkPlan {
    /// The chunk key, in key order.
    pub key: Vec<KeyPart>,
    /// Read with `FROM ONLY` (a plain table) or not (a partitioned one).
    pub partitioned: bool,
    /// What earlier runs left.
    pub agreed: Agreed,
}

/// One `reshard.watermark_chunks` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    id: i32,
    key_last: Option<Key>,
    snapshot: String,
    low: Lsn,
    high: Lsn,
}

/// Per source table (`schema.table`, quoted as in the plan), its records in chunk order.
pub(crate) type Records = HashMap<String, Vec<Record>>;

/// Reads a shard's watermark records.
pub(crate) async fn read_records(shard: &str, client: &Client) -> Result<Records, SnapshotError> {
    let what = || "reading reshard.watermark_chunks".to_owned();
    let rows = client
        .query(
            "SELECT source_table, chunk_id, key_last, snapshot, low_lsn::text, high_lsn::text
             FROM reshard.watermark_chunks ORDER BY source_table, chunk_id",
            &[],
        )
        .await
        .map_err(shard_err(shard, what()))?;
    let mut out: Records = HashMap::new();
    for r in rows {
        let get = || -> Result<(String, Record), tokio_postgres::Error> {
            let low: String = r.try_get(4)?;
            let high: String = r.try_get(5)?;
            Ok((
                r.try_get(0)?,
                Record {
                    id: r.try_get(1)?,
                    key_last: r.try_get(2)?,
                    snapshot: r.try_get(3)?,
                    low: low.parse().unwrap_or(Lsn::ZERO),
                    high: high.parse().unwrap_or(Lsn::ZERO),
                },
            ))
        };
        let (table, rec) = get().map_err(shard_err(shard, what()))?;
        out.entry(table).or_default().push(rec);
    }
    Ok(out)
}

/// The chunks of `table` that every shard holds, read under the same snapshots.
pub(crate) fn agreed(table: &str, per_shard: &[Records]) -> Agreed {
    let lists: Vec<&[Record]> = per_shard
        .iter()
        .map(|r| r.get(table).map_or(&[][..], Vec::as_slice))
        .collect();
    let any = lists.iter().any(|l| !l.is_empty());
    let Some(first) = lists.first() else {
        return Agreed::default();
    };
    let mut n = 0;
    while let Some(rec) = first.get(n) {
        let same = |l: &&[Record]| {
            l.get(n).is_some_and(|r| {
                r.id == rec.id && r.key_last == rec.key_last && r.snapshot == rec.snapshot
            })
        };
        if usize::try_from(rec.id).ok() != Some(n) || !lists.iter().all(same) {
            break;
        }
        n += 1;
        if rec.key_last.is_none() {
            break;
        }
    }
    let last = n.checked_sub(1).and_then(|i| first.get(i));
    Agreed {
        chunks: n,
        finished: last.is_some_and(|r| r.key_last.is_none()),
        any,
        after: last.and_then(|r| r.key_last.clone()),
        first_low: first.first().filter(|_| n > 0).map(|r| r.low),
    }
}

/// The chunk key of a table: its row identity as the stream carries it (the primary key for
/// `REPLICA IDENTITY DEFAULT` or `FULL`, the index's columns for `USING INDEX`), every column
/// an integer and copied. `Err` says why the table cannot be loaded in watermark chunks.
pub(crate) async fn chunk_key(
    src: &Client,
    spec: &TableSpec,
    copied: &[String],
) -> Result<Result<(Vec<KeyPart>, bool), String>, tokio_postgres::Error> {
    let Some(info) = crate::pg::table::describe_table(src, &spec.source).await? else {
        return Ok(Err("the table does not exist".into()));
    };
    let cols = match info.replica_identity {
        'd' | 'f' => &info.primary_key,
        'i' => &info.replica_identity_index,
        _ => return Ok(Err("its replica identity is NOTHING".into())),
    };
    if cols.is_empty() {
        return Ok(Err("it has no primary key".into()));
    }
    let mut key = Vec::with_capacity(cols.len());
    for c in cols {
        let ty = info.column(c).map_or(0, |c| c.type_oid);
        if !KEY_TYPES.contains(&ty) {
            return Ok(Err(format!(
                "key column {c} is not smallint, integer or bigint"
            )));
        }
        let Some(index) = copied.iter().position(|n| n == c) else {
            return Ok(Err(format!("key column {c} is not copied")));
        };
        key.push(KeyPart {
            name: c.clone(),
            index,
        });
    }
    Ok(Ok((key, info.partitioned)))
}

fn key_list(key: &[KeyPart]) -> String {
    key.iter()
        .map(|k| quote_ident(&k.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_values(k: &[i64]) -> String {
    k.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

/// Before loading `to_copy` (the watermark tables this run copies), per shard in one
/// transaction: a table with an agreed prefix loses the rows past its last key and the records
/// past it; a table without one is emptied (if it had records, or with `truncate_targets`).
pub(crate) async fn reset(
    shards: &[ShardTarget],
    plan: &Plan,
    to_copy: &[usize],
    truncate_targets: bool,
) -> Result<(), SnapshotError> {
    for shard in shards {
        let mut client = connect(&shard.name, &shard.connect).await?;
        let ctx = || "trimming partly loaded watermark tables".to_owned();
        let tx = client
            .transaction()
            .await
            .map_err(shard_err(&shard.name, ctx()))?;
        for t in to_copy.iter().filter_map(|&i| plan.tables.get(i)) {
            let Some(wm) = &t.watermark else { continue };
            match &wm.agreed.after {
                Some(after) if wm.agreed.chunks > 0 => {
                    tx.batch_execute(&format!(
                        "DELETE FROM {} WHERE ({}) > ({})",
                        t.target_display,
                        key_list(&wm.key),
                        key_values(after)
                    ))
                    .await
                    .map_err(shard_err(&shard.name, ctx()))?;
                }
                _ if truncate_targets || wm.agreed.any => {
                    tx.batch_execute(&format!("TRUNCATE {}", t.target_display))
                        .await
                        .map_err(shard_err(&shard.name, ctx()))?;
                }
                _ => {}
            }
            let keep = i32::try_from(wm.agreed.chunks).unwrap_or(i32::MAX);
            tx.execute(
                "DELETE FROM reshard.watermark_chunks WHERE source_table = $1 AND chunk_id >= $2",
                &[&t.source_display, &keep],
            )
            .await
            .map_err(shard_err(&shard.name, ctx()))?;
        }
        tx.commit().await.map_err(shard_err(&shard.name, ctx()))?;
    }
    Ok(())
}

/// One table's remaining chunks.
struct TableJob {
    table: usize,
    source_display: String,
    select: String,
    /// `LOCK TABLE … IN ACCESS SHARE MODE`, taken before the chunk's snapshot.
    lock: String,
    key: Vec<KeyPart>,
    next_id: u32,
    after: Option<Key>,
    /// The copied columns' type OIDs (for messages).
    column_types: Vec<crate::event::Oid>,
}

/// Loads the watermark tables of `to_copy`, `parallel` tables at a time, each table's chunks
/// in key order.
pub(crate) async fn run(
    ctx: Arc<CopyContext>,
    plan: &Plan,
    to_copy: &[usize],
    source: &Connect,
    parallel: usize,
    chunk_rows: u64,
) -> Result<CopiedStats, SnapshotError> {
    let mut jobs = VecDeque::new();
    for &i in to_copy {
        let Some(t) = plan.tables.get(i) else {
            continue;
        };
        let Some(wm) = &t.watermark else { continue };
        let only = if wm.partitioned { "" } else { "ONLY " };
        jobs.push_back(TableJob {
            table: i,
            source_display: t.source_display.clone(),
            select: format!(
                "SELECT {} FROM {only}{}",
                t.columns.join(", "),
                t.source_display
            ),
            lock: format!("LOCK TABLE {only}{} IN ACCESS SHARE MODE", t.source_display),
            key: wm.key.clone(),
            next_id: u32::try_from(wm.agreed.chunks).unwrap_or(u32::MAX),
            after: wm.agreed.after.clone(),
            column_types: t.column_types.clone(),
        });
    }
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let n_workers = parallel.min(jobs.len()).max(1);
    let queue = Arc::new(Mutex::new(jobs));
    let mut set = JoinSet::new();
    for id in 0..n_workers {
        let src = connect("source", source).await?;
        let version: i32 = src
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(source_err("reading server_version_num".into()))?;
        let targets = copy::shard_clients(&ctx).await?;
        let w = Worker {
            source: src,
            shards: targets,
            // pg_current_snapshot() is PostgreSQL 13's name for txid_current_snapshot().
            snapshot_fn: if version >= 130_000 {
                "pg_current_snapshot"
            } else {
                "txid_current_snapshot"
            },
            chunk_rows,
        };
        let (ctx, queue) = (ctx.clone(), queue.clone());
        let span = tracing::info_span!("watermark_worker", worker = id);
        set.spawn(
            async move {
                let mut stats: CopiedStats = HashMap::new();
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some(job) = job else { break };
                    let (chunks, rows, bytes) = w.load_table(&ctx, job).await?;
                    let _ = stats.insert(chunks.0, (chunks.1, rows, bytes));
                }
                Ok::<_, SnapshotError>(stats)
            }
            .instrument(span),
        );
    }
    let mut total: CopiedStats = HashMap::new();
    while let Some(res) = set.join_next().await {
        let stats = res.map_err(|e| SnapshotError::Task {
            what: "watermark copy worker".into(),
            message: e.to_string(),
        })??;
        total.extend(stats);
    }
    Ok(total)
}

struct Worker {
    source: Client,
    shards: Vec<Client>,
    snapshot_fn: &'static str,
    chunk_rows: u64,
}

impl Worker {
    /// Takes `ACCESS SHARE` on the chunk's table inside its open transaction, before any
    /// snapshot: a rewrite or TRUNCATE waiting for or holding `ACCESS EXCLUSIVE` finishes first
    /// and the snapshot sees it. Says what it waits for when that takes long.
    async fn lock(&self, job: &TableJob, chunk: u32) -> Result<(), SnapshotError> {
        let lock = self.source.batch_execute(&job.lock);
        tokio::pin!(lock);
        let res = match tokio::time::timeout(LOCK_NOTICE, &mut lock).await {
            Ok(res) => res,
            Err(_) => {
                tracing::warn!(table = %job.source_display, chunk,
                    waited_s = LOCK_NOTICE.as_secs(),
                    "the watermark chunk waits for ACCESS SHARE on its table: a session holds or \
                     waits for ACCESS EXCLUSIVE (ALTER TABLE, VACUUM FULL, CLUSTER, TRUNCATE, \
                     DROP; see pg_locks on the source); the load goes on when it is done");
                lock.await
            }
        };
        res.map_err(|source| {
            if source.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                SnapshotError::TableGone {
                    table: job.source_display.clone(),
                    chunk,
                    source,
                }
            } else {
                source_err(format!(
                    "locking table {} for chunk {chunk}",
                    job.source_display
                ))(source)
            }
        })
    }

    /// Copies a table's remaining chunks; returns `((table, chunks copied), rows, bytes)`.
    async fn load_table(
        &self,
        ctx: &CopyContext,
        mut job: TableJob,
    ) -> Result<((usize, u32), u64, u64), SnapshotError> {
        let keys = key_list(&job.key);
        if job.next_id > 0 {
            tracing::info!(table = %job.source_display, from_chunk = job.next_id,
                after_key = ?job.after, "resuming the watermark load after the last chunk every shard holds");
        }
        let (mut chunks, mut rows, mut bytes) = (0u32, 0u64, 0u64);
        loop {
            let id = job.next_id;
            let what = || format!("reading table {} chunk {id}", job.source_display);
            // The shards' copy slots first: no snapshot waits for them.
            let slots = ctx.take_slots().await?;
            let low: String = self
                .source
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(source_err(what()))?;
            self.source
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(source_err(what()))?;
            self.lock(&job, id).await?;
            // The snapshot is taken by this statement; the insert position is read under it,
            // so every transaction it sees committed below `high`.
            let row = self
                .source
                .query_one(
                    &format!(
                        "SELECT {}()::text, pg_current_wal_insert_lsn()::text",
                        self.snapshot_fn
                    ),
                    &[],
                )
                .await
                .map_err(source_err(what()))?;
            let snapshot: String = row.try_get(0).map_err(source_err(what()))?;
            let high: String = row.try_get(1).map_err(source_err(what()))?;
            let filter = job
                .after
                .as_ref()
                .map(|a| format!(" WHERE ({keys}) > ({})", key_values(a)))
                .unwrap_or_default();
            let format = ctx.format(job.table);
            let sql = format!(
                "COPY ({}{filter} ORDER BY {keys} LIMIT {}) TO STDOUT{}",
                job.select,
                self.chunk_rows,
                format.options()
            );
            let copied = copy::copy_rows(
                ctx,
                slots,
                &self.source,
                &self.shards,
                job.table,
                id,
                &sql,
                true,
            )
            .await?;
            self.source
                .batch_execute("COMMIT")
                .await
                .map_err(source_err(what()))?;
            let last = copied.rows < self.chunk_rows;
            let key_last = if last {
                None
            } else {
                Some(last_key(&job, id, format, copied.last_row.as_deref())?)
            };
            let record = copy::ChunkRecord::Watermark {
                key_after: &job.after,
                key_last: &key_last,
                snapshot: &snapshot,
                low_lsn: &low,
                high_lsn: &high,
            };
            copied
                .commit(ctx, &self.shards, &job.source_display, id, &record, what)
                .await?;
            ctx.chunk_committed(job.table, &copied, Some(last));
            tracing::debug!(table = %job.source_display, chunk = id, rows = copied.rows,
                %low, %high, snapshot = %snapshot, "watermark chunk copied");
            chunks += 1;
            rows += copied.rows;
            bytes += copied.bytes;
            drop(copied);
            if last {
                return Ok(((job.table, chunks), rows, bytes));
            }
            job.after = key_last;
            job.next_id = id.saturating_add(1);
        }
    }
}

/// The key of a full chunk's last row.
fn last_key(
    job: &TableJob,
    chunk: u32,
    format: CopyFormat,
    row: Option<&[u8]>,
) -> Result<Key, SnapshotError> {
    let malformed = |detail: String| SnapshotError::Malformed {
        table: job.source_display.clone(),
        chunk,
        detail,
    };
    let row = row.ok_or_else(|| malformed("a full chunk has no last row".into()))?;
    let mut key = Vec::with_capacity(job.key.len());
    for k in &job.key {
        let v = match format {
            CopyFormat::Text => field(row, k.index)
                .map(unescape)
                .and_then(|t| parse_key_text(&t)),
            CopyFormat::Binary => binary_field(row, k.index)
                .flatten()
                .and_then(parse_key_binary),
        }
        .ok_or_else(|| {
            malformed(format!(
                "key column {} of the chunk's last row is not an integer: [{}]",
                k.name,
                super::rows::preview_row(format, &job.column_types, row)
            ))
        })?;
        key.push(v);
    }
    Ok(key)
}

/// The handoff's windows of every watermark table in `plan`, from the records on `shard` (every
/// shard holds the same once the load is done). Refuses records that do not cover every key or
/// that span too many transaction ids for the stream's 32-bit xids.
pub(crate) async fn windows(
    shard: &ShardTarget,
    plan: &Plan,
) -> Result<HashMap<crate::pg::sql::TableName, Arc<TableWindows>>, SnapshotError> {
    let mut out = HashMap::new();
    if plan.tables.iter().all(|t| t.watermark.is_none()) {
        return Ok(out);
    }
    let client = connect(&shard.name, &shard.connect).await?;
    let records = read_records(&shard.name, &client).await?;
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for t in &plan.tables {
        let Some(wm) = &t.watermark else { continue };
        let bad = |message: String| SnapshotError::Watermark {
            table: t.source_display.clone(),
            message,
        };
        let recs = records
            .get(&t.source_display)
            .map_or(&[][..], Vec::as_slice);
        let mut chunks = Vec::with_capacity(recs.len());
        for r in recs {
            let snapshot = XidSnapshot::parse(&r.snapshot).ok_or_else(|| {
                bad(format!(
                    "chunk {} on {} has snapshot {:?}, not xmin:xmax:xip",
                    r.id, shard.name, r.snapshot
                ))
            })?;
            lo = lo.min(snapshot.xmin());
            hi = hi.max(snapshot.xmin());
            chunks.push(ChunkWindow {
                last: r.key_last.clone(),
                snapshot,
                high: r.high,
            });
        }
        let names = wm.key.iter().map(|k| k.name.clone()).collect();
        let w = TableWindows::new(names, chunks).ok_or_else(|| {
            bad(format!(
                "the chunks recorded on {} (reshard.watermark_chunks) do not cover every key; \
                 the load did not finish — run again to resume it",
                shard.name
            ))
        })?;
        out.insert(t.source.clone(), Arc::new(w));
    }
    if hi.saturating_sub(lo) >= MAX_XID_SPAN / 2 {
        return Err(SnapshotError::Watermark {
            table: "(all watermark tables)".into(),
            message: format!(
                "the chunks' snapshots span {} transaction ids, too many to match the stream's \
                 32-bit xids safely; load these tables in [snapshot] mode = \"exported\"",
                hi - lo
            ),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i32, last: Option<i64>, snap: &str) -> Record {
        Record {
            id,
            key_last: last.map(|l| vec![l]),
            snapshot: snap.into(),
            low: Lsn::from_u64(10 + id as u64),
            high: Lsn::from_u64(20 + id as u64),
        }
    }

    fn shard(recs: Vec<Record>) -> Records {
        let mut r = Records::new();
        r.insert("t".into(), recs);
        r
    }

    #[test]
    fn the_agreed_prefix_is_what_every_shard_holds_alike() {
        let a = shard(vec![rec(0, Some(5), "1:1:"), rec(1, Some(9), "2:2:")]);
        let b = shard(vec![rec(0, Some(5), "1:1:")]);
        let g = agreed("t", &[a.clone(), b]);
        assert_eq!((g.chunks, g.finished, g.any), (1, false, true));
        assert_eq!(g.after, Some(vec![5]));
        assert_eq!(g.first_low, Some(Lsn::from_u64(10)));

        // Chunk 1 read twice (once per run) under different snapshots: not agreed.
        let c = shard(vec![rec(0, Some(5), "1:1:"), rec(1, Some(9), "3:3:")]);
        assert_eq!(agreed("t", &[a.clone(), c]).chunks, 1);

        let done = shard(vec![rec(0, Some(5), "1:1:"), rec(1, None, "2:2:")]);
        let g = agreed("t", &[done.clone(), done]);
        assert_eq!((g.chunks, g.finished, g.after), (2, true, None));

        let g = agreed("t", &[Records::new(), a]);
        assert_eq!((g.chunks, g.any, g.first_low), (0, true, None));
        assert!(!agreed("t", &[Records::new()]).any);
        // A gap in the ids ends the prefix.
        let gap = shard(vec![rec(0, Some(5), "1:1:"), rec(2, None, "2:2:")]);
        assert_eq!(agreed("t", &[gap]).chunks, 1);
    }

    #[test]
    fn the_last_key_is_read_from_the_last_row() {
        let job = TableJob {
            table: 0,
            source_display: "public.t".into(),
            select: String::new(),
            lock: String::new(),
            key: vec![
                KeyPart {
                    name: "a".into(),
                    index: 2,
                },
                KeyPart {
                    name: "b".into(),
                    index: 0,
                },
            ],
            next_id: 0,
            after: None,
            column_types: vec![23, 25, 20],
        };
        let text = CopyFormat::Text;
        assert_eq!(
            last_key(&job, 3, text, Some(b"7\tx\t-12\n")).unwrap(),
            vec![-12, 7]
        );
        let e = last_key(&job, 3, text, Some(b"7\tx\ty\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("public.t chunk 3") && e.contains("key column a"),
            "{e}"
        );
        assert!(last_key(&job, 3, text, None).is_err());

        // The same row as a binary tuple: int4 7, text x, int8 -12.
        let mut row = 3i16.to_be_bytes().to_vec();
        for f in [&7i32.to_be_bytes()[..], b"x", &(-12i64).to_be_bytes()[..]] {
            row.extend_from_slice(&(f.len() as i32).to_be_bytes());
            row.extend_from_slice(f);
        }
        let binary = CopyFormat::Binary;
        assert_eq!(last_key(&job, 3, binary, Some(&row)).unwrap(), vec![-12, 7]);
        // A NULL key field is no key.
        let mut null = 3i16.to_be_bytes().to_vec();
        for f in [&7i32.to_be_bytes()[..], b"x"] {
            null.extend_from_slice(&(f.len() as i32).to_be_bytes());
            null.extend_from_slice(f);
        }
        null.extend_from_slice(&(-1i32).to_be_bytes());
        let e = last_key(&job, 3, binary, Some(&null))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key column a") && e.contains("[7 | x | \\N]"),
            "{e}"
        );
    }
}
