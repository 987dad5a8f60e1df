//! Copy workers: each owns one source connection inside a transaction that imported the
//! snapshot, and one connection per shard; it takes chunks from a shared queue and copies each
//! one, reading it once and writing each row to the shard(s) it belongs to. [`copy_rows`], the
//! read-route-write of one chunk, is shared with the watermark load (`watermark`).
//!
//! In: chunks (`COPY (SELECT cols FROM ONLY heap WHERE ctid range) TO STDOUT`, in the table's
//! [`CopyFormat`]: binary where its types allow, text otherwise). Out: per shard, one transaction
//! per chunk holding the chunk's rows for that shard (via `COPY target (cols) FROM STDIN` in the
//! same format) and the chunk's `reshard.fullload_chunks` row.
//!
//! Invariants: the source rows of a chunk are read exactly once whatever the number of shards;
//! rows are forwarded byte for byte (the same format out and in, same column types on both
//! sides; a binary COPY into a shard gets the binary header first and the trailer last);
//! memory per worker is one batch buffer per shard plus one partial row, because a batch is only
//! handed to a shard's `CopyInSink` when that sink is ready (backpressure from the slowest
//! shard pauses the source read). Each shard's throttle and copy-slot semaphore are shared by
//! all workers; slots are always taken in shard order, so workers cannot deadlock on them.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_postgres::{Client, CopyInSink};
use tracing::Instrument;

use super::catalog::{connect, shard_err, source_err, KeyColumn, Plan};
use super::error::SnapshotError;
use super::progress::{FullLoadProgress, TableState};
use super::rows::{
    binary_field, field, is_null, preview_row, unescape, CopyFormat, FeedError, Splitter,
    BINARY_HEADER, BINARY_TRAILER,
};
use super::throttle::Throttle;
use super::window::{parse_key_binary, Key};
use super::{ExportedSnapshot, FullLoadOptions, RouteFn, ShardTarget};
use crate::event::{Oid, ShardId};
use crate::lsn::Lsn;

/// Per table (plan index): chunks copied, source rows, source bytes.
pub(crate) type CopiedStats = HashMap<usize, (u32, u64, u64)>;

struct CopyTable {
    source_display: String,
    copy_in_sql: String,
    key: Option<KeyColumn>,
    chunks_total: u32,
    format: CopyFormat,
    column_types: Vec<Oid>,
}

struct ChunkJob {
    table: usize,
    id: u32,
    copy_out_sql: String,
}

/// What the workers share.
pub(crate) struct CopyContext {
    tables: HashMap<usize, CopyTable>,
    shards: Vec<ShardTarget>,
    shard_names: Vec<String>,
    route: RouteFn,
    throttles: Vec<Arc<Throttle>>,
    copy_slots: Vec<Arc<Semaphore>>,
    queue: Mutex<VecDeque<ChunkJob>>,
    progress: Arc<watch::Sender<FullLoadProgress>>,
    snapshot_lsn: String,
    batch_bytes: usize,
}

impl CopyContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plan: &Plan,
        to_copy: &[usize],
        shards: &[ShardTarget],
        route: RouteFn,
        throttles: Vec<Arc<Throttle>>,
        options: &FullLoadOptions,
        snapshot_lsn: Lsn,
        progress: Arc<watch::Sender<FullLoadProgress>>,
    ) -> CopyContext {
        let mut tables = HashMap::new();
        // Smallest tables first, each table's chunks together: chunks are bounded in size, so
        // the order barely changes the total time, but finishing whole tables early means a
        // crash loses less (an unfinished table is copied again as a whole).
        let mut order: Vec<usize> = to_copy.to_vec();
        order.sort_by_key(|&i| {
            plan.tables
                .get(i)
                .map_or(0, |t| t.relations.iter().map(|r| r.pages).sum::<u64>())
        });
        let mut queue = VecDeque::new();
        for i in order {
            let Some(t) = plan.tables.get(i) else {
                continue;
            };
            let cols = t.columns.join(", ");
            let format = t.format(options.binary_copy);
            let opts = format.options();
            tables.insert(
                i,
                CopyTable {
                    source_display: t.source_display.clone(),
                    copy_in_sql: format!("COPY {} ({cols}) FROM STDIN{opts}", t.target_display),
                    key: t.key.clone(),
                    chunks_total: t.chunks_total(),
                    format,
                    column_types: t.column_types.clone(),
                },
            );
            // A watermark table is read by key, not by these page ranges (see `watermark`).
            let chunks = if t.watermark.is_some() {
                &[][..]
            } else {
                t.chunks.as_slice()
            };
            for (id, chunk) in chunks.iter().enumerate() {
                let Some(rel) = t.relations.get(chunk.relation) else {
                    continue;
                };
                let filter = chunk
                    .predicate()
                    .map(|p| format!(" WHERE {p}"))
                    .unwrap_or_default();
                queue.push_back(ChunkJob {
                    table: i,
                    id: u32::try_from(id).unwrap_or(u32::MAX),
                    copy_out_sql: format!(
                        "COPY (SELECT {cols} FROM ONLY {}{filter}) TO STDOUT{opts}",
                        rel.name
                    ),
                });
            }
        }
        progress.send_modify(|p| {
            for (&i, t) in &tables {
                if let Some(tp) = p.tables.get_mut(i) {
                    tp.state = if t.chunks_total == 0 {
                        TableState::Done
                    } else {
                        TableState::Pending
                    };
                    tp.chunks_total = t.chunks_total;
                    tp.chunks_done = 0;
                    if let Some(wm) = plan.tables.get(i).and_then(|p| p.watermark.as_ref()) {
                        tp.chunks_done = u32::try_from(wm.agreed.chunks).unwrap_or(0);
                        tp.chunks_total = tp.chunks_total.max(tp.chunks_done + 1);
                        tp.state = TableState::Pending;
                    }
                }
            }
        });
        let slots = options.max_concurrent_copies_per_shard.get();
        CopyContext {
            tables,
            shards: shards.to_vec(),
            shard_names: shards.iter().map(|s| s.name.clone()).collect(),
            route,
            throttles,
            copy_slots: shards
                .iter()
                .map(|_| Arc::new(Semaphore::new(slots)))
                .collect(),
            queue: Mutex::new(queue),
            progress,
            snapshot_lsn: snapshot_lsn.to_string(),
            batch_bytes: options.batch_bytes.get(),
        }
    }

    fn next_job(&self) -> Option<ChunkJob> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    fn jobs(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every shard's copy slot, taken in shard order (so workers cannot deadlock on them).
    pub(crate) async fn take_slots(&self) -> Result<Vec<OwnedSemaphorePermit>, SnapshotError> {
        let mut permits = Vec::with_capacity(self.copy_slots.len());
        for slot in &self.copy_slots {
            let permit = slot
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| SnapshotError::Task {
                    what: "copy slot".into(),
                    message: e.to_string(),
                })?;
            permits.push(permit);
        }
        Ok(permits)
    }

    /// The COPY format of table `table` (plan index).
    pub(crate) fn format(&self, table: usize) -> CopyFormat {
        self.tables
            .get(&table)
            .map_or(CopyFormat::Text, |t| t.format)
    }

    /// The name of shard `s`, for messages.
    pub(crate) fn shard_name(&self, s: usize) -> &str {
        self.shard_names.get(s).map_or("shard", String::as_str)
    }

    /// Records a chunk committed on every shard in the progress. `last`: `Some(true)` for a
    /// watermark table's last chunk, `Some(false)` for another of its chunks (the total is an
    /// estimate), `None` for a planned chunk.
    pub(crate) fn chunk_committed(&self, table: usize, copied: &Copied, last: Option<bool>) {
        self.progress.send_modify(|p| {
            if let Some(t) = p.tables.get_mut(table) {
                t.add(copied.report_rows, copied.report_bytes);
                t.chunks_done += 1;
                match last {
                    Some(true) => t.chunks_total = t.chunks_done,
                    Some(false) => t.chunks_total = t.chunks_total.max(t.chunks_done + 1),
                    None => {}
                }
                if t.chunks_done >= t.chunks_total {
                    t.state = TableState::Done;
                }
            }
        });
    }
}

/// One connection per shard, for copying (no timeout of the role applies:
/// [`crate::pg::conn::NO_SESSION_TIMEOUTS_SQL`]), opened concurrently.
pub(crate) async fn shard_clients(ctx: &CopyContext) -> Result<Vec<Client>, SnapshotError> {
    futures_util::future::try_join_all(
        ctx.shards
            .iter()
            .map(|shard| connect(&shard.name, &shard.connect)),
    )
    .await
}

/// One copy worker's connections: its source connection inside a transaction that imported
/// `snapshot`, and one connection per shard.
async fn open_worker(
    ctx: &CopyContext,
    id: usize,
    source: &super::Connect,
    snapshot: &ExportedSnapshot,
) -> Result<Worker, SnapshotError> {
    let open_source = async {
        let src = connect("source", source).await?;
        // A chunk's COPY may run long, and between chunks a worker may wait for a shard's copy
        // slot while its source transaction sits idle: neither is cut short by a timeout of the
        // role (the connection cleared them, `pg::conn::NO_SESSION_TIMEOUTS_SQL`).
        src.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(source_err("starting a copy transaction".into()))?;
        src.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            crate::pg::conn::quote_literal(&snapshot.name)
        ))
        .await
        .map_err(|source| SnapshotError::SnapshotImport {
            name: snapshot.name.clone(),
            source,
        })?;
        Ok::<_, SnapshotError>(src)
    };
    let (src, targets) = futures_util::future::try_join(open_source, shard_clients(ctx)).await?;
    Ok(Worker {
        id,
        source: src,
        shards: targets,
    })
}

/// Opens the worker connections, imports the snapshot on each source connection, signals
/// `imported`, then runs the workers to completion. The first error aborts every worker
/// (dropping their connections rolls back their open chunk transactions).
pub(crate) async fn run_workers(
    ctx: Arc<CopyContext>,
    source: &super::Connect,
    snapshot: &ExportedSnapshot,
    parallel: usize,
    imported: Option<oneshot::Sender<()>>,
) -> Result<CopiedStats, SnapshotError> {
    let n_workers = parallel.min(ctx.jobs()).max(1);
    // Every worker's connections at once: each is a round trip and a backend start.
    let workers = futures_util::future::try_join_all(
        (0..n_workers).map(|id| open_worker(&ctx, id, source, snapshot)),
    )
    .await?;
    if let Some(tx) = imported {
        // The caller may have stopped waiting; that is fine.
        let _ = tx.send(());
    }
    tracing::info!(workers = n_workers, chunks = ctx.jobs(), snapshot = %snapshot.name,
        lsn = %snapshot.lsn, "full load copying");
    let mut set = JoinSet::new();
    for w in workers {
        let span = tracing::info_span!("fullload_worker", worker = w.id, snapshot = %snapshot.name);
        set.spawn(w.run(ctx.clone()).instrument(span));
    }
    let mut total: CopiedStats = HashMap::new();
    while let Some(res) = set.join_next().await {
        let stats = match res {
            Ok(r) => r?,
            Err(join) => {
                return Err(SnapshotError::Task {
                    what: "copy worker".into(),
                    message: join.to_string(),
                })
            }
        };
        for (t, (c, r, b)) in stats {
            let e = total.entry(t).or_default();
            e.0 += c;
            e.1 += r;
            e.2 += b;
        }
    }
    Ok(total)
}

/// One shard's pending batch.
#[derive(Default)]
struct Batch {
    buf: BytesMut,
    rows: u64,
}

struct Worker {
    id: usize,
    source: Client,
    shards: Vec<Client>,
}

type Sink = Pin<Box<CopyInSink<Bytes>>>;

impl Worker {
    async fn run(self, ctx: Arc<CopyContext>) -> Result<CopiedStats, SnapshotError> {
        let mut stats: CopiedStats = HashMap::new();
        while let Some(job) = ctx.next_job() {
            let (rows, bytes) = self.copy_chunk(&ctx, &job).await?;
            let e = stats.entry(job.table).or_default();
            e.0 += 1;
            e.1 += rows;
            e.2 += bytes;
        }
        // Read-only: nothing to keep, but end it cleanly.
        self.source
            .batch_execute("COMMIT")
            .await
            .map_err(source_err("ending a copy transaction".into()))?;
        tracing::debug!(worker = self.id, "copy worker finished");
        Ok(stats)
    }

    async fn copy_chunk(
        &self,
        ctx: &CopyContext,
        job: &ChunkJob,
    ) -> Result<(u64, u64), SnapshotError> {
        let Some(table) = ctx.tables.get(&job.table) else {
            return Ok((0, 0));
        };
        let what = || format!("copying table {} chunk {}", table.source_display, job.id);
        let slots = ctx.take_slots().await?;
        let copied = copy_rows(
            ctx,
            slots,
            &self.source,
            &self.shards,
            job.table,
            job.id,
            &job.copy_out_sql,
            false,
        )
        .await?;
        let record = ChunkRecord::Planned {
            chunks_total: i32::try_from(table.chunks_total).unwrap_or(i32::MAX),
            snapshot_lsn: &ctx.snapshot_lsn,
        };
        copied
            .commit(
                ctx,
                &self.shards,
                &table.source_display,
                job.id,
                &record,
                what,
            )
            .await?;
        ctx.chunk_committed(job.table, &copied, None);
        tracing::debug!(table = %table.source_display, chunk = job.id, rows = copied.rows,
            bytes = copied.bytes, "chunk copied");
        Ok((copied.rows, copied.bytes))
    }
}

/// One chunk read from the source and written into one open transaction per shard.
pub(crate) struct Copied {
    /// Source rows read.
    pub rows: u64,
    /// COPY bytes read.
    pub bytes: u64,
    /// Per shard, rows written.
    pub shard_rows: Vec<i64>,
    /// Per shard, bytes written.
    pub shard_bytes: Vec<i64>,
    /// The chunk's last row (when asked for).
    pub last_row: Option<Vec<u8>>,
    report_rows: u64,
    report_bytes: u64,
    /// The shards' copy slots, held until the caller commits (dropped with this value).
    _permits: Vec<OwnedSemaphorePermit>,
}

/// A chunk's row in reshard's bookkeeping on a shard, written in the transaction that holds
/// the chunk's rows there: after a crash a shard holds a chunk whole with its record, or
/// neither. The two loads keep different records (one definition of each, here).
pub(crate) enum ChunkRecord<'a> {
    /// `reshard.fullload_chunks`: a planned chunk of the load under the exported snapshot.
    Planned {
        /// The table's planned chunks.
        chunks_total: i32,
        /// The exported snapshot's LSN (text form).
        snapshot_lsn: &'a str,
    },
    /// `reshard.watermark_chunks`: a chunk of the watermark load (see `window`).
    Watermark {
        /// The chunk's rows follow this key (`None`: the table's first chunk).
        key_after: &'a Option<Key>,
        /// The chunk's last key (`None`: the table's last chunk).
        key_last: &'a Option<Key>,
        /// The snapshot the chunk was read under (`pg_current_snapshot()`, text form).
        snapshot: &'a str,
        /// The insert position before the snapshot (text form).
        low_lsn: &'a str,
        /// The insert position read under the snapshot (text form).
        high_lsn: &'a str,
    },
}

impl Copied {
    /// Writes `record` of chunk `chunk` of `source_table` on every shard, with that shard's
    /// rows and bytes, into the transaction [`copy_rows`] left open there, and commits it.
    pub(crate) async fn commit(
        &self,
        ctx: &CopyContext,
        shards: &[Client],
        source_table: &str,
        chunk: u32,
        record: &ChunkRecord<'_>,
        what: impl Fn() -> String,
    ) -> Result<(), SnapshotError> {
        let chunk_id = i32::try_from(chunk).unwrap_or(i32::MAX);
        for (s, client) in shards.iter().enumerate() {
            let name = ctx.shard_name(s);
            let rows = self.shard_rows.get(s).copied().unwrap_or(0);
            let bytes = self.shard_bytes.get(s).copied().unwrap_or(0);
            let written = match record {
                ChunkRecord::Planned {
                    chunks_total,
                    snapshot_lsn,
                } => {
                    client
                        .execute(
                            "INSERT INTO reshard.fullload_chunks
                                (source_table, chunk_id, chunks_total, snapshot_lsn, rows, bytes)
                             VALUES ($1, $2, $3, $4::text::pg_lsn, $5, $6)",
                            &[
                                &source_table,
                                &chunk_id,
                                chunks_total,
                                snapshot_lsn,
                                &rows,
                                &bytes,
                            ],
                        )
                        .await
                }
                ChunkRecord::Watermark {
                    key_after,
                    key_last,
                    snapshot,
                    low_lsn,
                    high_lsn,
                } => {
                    client
                        .execute(
                            "INSERT INTO reshard.watermark_chunks
                                (source_table, chunk_id, key_after, key_last, snapshot, low_lsn,
                                 high_lsn, rows, bytes)
                             VALUES ($1, $2, $3, $4, $5, $6::text::pg_lsn, $7::text::pg_lsn,
                                     $8, $9)",
                            &[
                                &source_table,
                                &chunk_id,
                                key_after,
                                key_last,
                                snapshot,
                                low_lsn,
                                high_lsn,
                                &rows,
                                &bytes,
                            ],
                        )
                        .await
                }
            };
            written.map_err(shard_err(name, what()))?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(shard_err(name, what()))?;
        }
        Ok(())
    }
}

/// Reads one chunk with `copy_out_sql` on `source` (in whatever transaction the caller opened)
/// and writes each row into the shard(s) it belongs to, inside one transaction per shard that
/// is left open: the caller records the chunk in it and commits. `slots` are every shard's copy
/// slot ([`CopyContext::take_slots`]); they are released when the returned value is dropped.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy_rows(
    ctx: &CopyContext,
    slots: Vec<OwnedSemaphorePermit>,
    source: &Client,
    shards: &[Client],
    table_index: usize,
    chunk: u32,
    copy_out_sql: &str,
    keep_last_row: bool,
) -> Result<Copied, SnapshotError> {
    let Some(table) = ctx.tables.get(&table_index) else {
        return Err(SnapshotError::Task {
            what: "copy".into(),
            message: format!("table #{table_index} is not in the load"),
        });
    };
    let what = || format!("copying table {} chunk {chunk}", table.source_display);
    let n = shards.len();

    // One transaction + COPY per shard.
    let mut sinks: Vec<Sink> = Vec::with_capacity(n);
    for (s, client) in shards.iter().enumerate() {
        let name = ctx.shard_name(s);
        client
            .batch_execute("BEGIN")
            .await
            .map_err(shard_err(name, what()))?;
        let sink = client
            .copy_in::<_, Bytes>(table.copy_in_sql.as_str())
            .await
            .map_err(shard_err(name, what()))?;
        sinks.push(Box::pin(sink));
    }
    ctx.progress.send_modify(|p| {
        if let Some(t) = p.tables.get_mut(table_index) {
            t.add(0, 0);
        }
    });

    let stream = source
        .copy_out(copy_out_sql)
        .await
        .map_err(source_err(what()))?;
    let mut stream = std::pin::pin!(stream);
    let mut batches: Vec<Batch> = (0..n).map(|_| Batch::default()).collect();
    if table.format == CopyFormat::Binary {
        for b in &mut batches {
            b.buf.extend_from_slice(BINARY_HEADER);
        }
    }
    let mut shard_rows = vec![0i64; n];
    let mut shard_bytes = vec![0i64; n];
    let mut splitter = Splitter::new(table.format);
    let malformed = |detail: String| SnapshotError::Malformed {
        table: table.source_display.clone(),
        chunk,
        detail,
    };
    let mut last_row: Vec<u8> = Vec::new();
    let (mut rows, mut bytes) = (0u64, 0u64);
    let (mut report_rows, mut report_bytes) = (0u64, 0u64);
    // Reading the stream is cancel-safe: a dropped chunk rolls back on every shard.
    while let Some(part) = stream.next().await {
        let part = part.map_err(source_err(what()))?;
        bytes += part.len() as u64;
        report_bytes += part.len() as u64;
        let fed = splitter.feed(&part, |row| {
            rows += 1;
            report_rows += 1;
            if keep_last_row {
                last_row.clear();
                last_row.extend_from_slice(row);
            }
            match &table.key {
                None => {
                    for (s, b) in batches.iter_mut().enumerate() {
                        b.buf.extend_from_slice(row);
                        b.rows += 1;
                        if let (Some(r), Some(by)) = (shard_rows.get_mut(s), shard_bytes.get_mut(s))
                        {
                            *r += 1;
                            *by += row.len() as i64;
                        }
                    }
                }
                Some(key) => {
                    let s = route_row(&ctx.route, table, key, chunk, row, n)?;
                    if let Some(b) = batches.get_mut(s) {
                        b.buf.extend_from_slice(row);
                        b.rows += 1;
                    }
                    if let (Some(r), Some(by)) = (shard_rows.get_mut(s), shard_bytes.get_mut(s)) {
                        *r += 1;
                        *by += row.len() as i64;
                    }
                }
            }
            Ok::<(), SnapshotError>(())
        });
        match fed {
            Ok(()) => {}
            Err(FeedError::Row(e)) => return Err(e),
            Err(FeedError::Malformed(detail)) => return Err(malformed(detail)),
        }
        for (s, (batch, sink)) in batches.iter_mut().zip(sinks.iter_mut()).enumerate() {
            if batch.buf.len() >= ctx.batch_bytes {
                let throttle = ctx.throttles.get(s).map(Arc::as_ref);
                if let Err(e) = flush(sink, throttle, batch).await {
                    return Err(shard_err(ctx.shard_name(s), what())(e));
                }
            }
        }
        if report_bytes >= ctx.batch_bytes as u64 {
            ctx.progress.send_modify(|p| {
                if let Some(t) = p.tables.get_mut(table_index) {
                    t.add(report_rows, report_bytes);
                }
            });
            (report_rows, report_bytes) = (0, 0);
        }
    }
    splitter.finish().map_err(malformed)?;
    for (s, (batch, sink)) in batches.iter_mut().zip(sinks.iter_mut()).enumerate() {
        let name = ctx.shard_name(s);
        if table.format == CopyFormat::Binary {
            batch.buf.extend_from_slice(BINARY_TRAILER);
        }
        if !batch.buf.is_empty() {
            let throttle = ctx.throttles.get(s).map(Arc::as_ref);
            flush(sink, throttle, batch)
                .await
                .map_err(shard_err(name, what()))?;
        }
        sink.as_mut()
            .finish()
            .await
            .map_err(shard_err(name, what()))?;
    }
    Ok(Copied {
        rows,
        bytes,
        shard_rows,
        shard_bytes,
        last_row: (keep_last_row && rows > 0).then_some(last_row),
        report_rows,
        report_bytes,
        _permits: slots,
    })
}

/// The shard index of a sharded row.
fn route_row(
    route: &RouteFn,
    table: &CopyTable,
    key: &KeyColumn,
    chunk: u32,
    row: &[u8],
    shards: usize,
) -> Result<usize, SnapshotError> {
    let malformed = |what: &str| SnapshotError::Malformed {
        table: table.source_display.clone(),
        chunk,
        detail: format!(
            "row {what} field {} (column {}): [{}]",
            key.index + 1,
            key.name,
            preview_row(table.format, &table.column_types, row)
        ),
    };
    let null = || SnapshotError::NullKey {
        table: table.source_display.clone(),
        chunk,
        column: key.name.clone(),
        row: preview_row(table.format, &table.column_types, row),
    };
    // A binary integer key is routed by its text form, as the router reads every key.
    let mut int_text = itoa::Buffer::new();
    let text = match table.format {
        CopyFormat::Text => {
            let raw = field(row, key.index).ok_or_else(|| malformed("has no"))?;
            if is_null(raw) {
                return Err(null());
            }
            unescape(raw)
        }
        CopyFormat::Binary => {
            let raw = binary_field(row, key.index)
                .ok_or_else(|| malformed("has no"))?
                .ok_or_else(null)?;
            let v = parse_key_binary(raw)
                .ok_or_else(|| malformed("has no 2-, 4- or 8-byte integer in its key"))?;
            std::borrow::Cow::Borrowed(int_text.format(v).as_bytes())
        }
    };
    let shard: ShardId = route(key.type_oid, &text).map_err(|message| SnapshotError::Route {
        table: table.source_display.clone(),
        chunk,
        key: String::from_utf8_lossy(&text).into_owned(),
        message,
    })?;
    if shard.index() >= shards {
        return Err(SnapshotError::Route {
            table: table.source_display.clone(),
            chunk,
            key: String::from_utf8_lossy(&text).into_owned(),
            message: format!(
                "the router chose shard {shard} but only {shards} shards are configured"
            ),
        });
    }
    Ok(shard.index())
}

/// Sends one batch to a shard once its throttle allows. Awaiting the sink is the backpressure.
async fn flush(
    sink: &mut Sink,
    throttle: Option<&Throttle>,
    batch: &mut Batch,
) -> Result<(), tokio_postgres::Error> {
    if let Some(t) = throttle {
        t.acquire(batch.rows, batch.buf.len() as u64).await;
    }
    batch.rows = 0;
    let data = batch.buf.split().freeze();
    sink.send(data).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::rows::tests::tuple;

    fn table() -> CopyTable {
        CopyTable {
            source_display: "public.events".into(),
            copy_in_sql: String::new(),
            key: None,
            chunks_total: 1,
            format: CopyFormat::Text,
            column_types: vec![20, 20, 25],
        }
    }

    fn key() -> KeyColumn {
        KeyColumn {
            index: 1,
            name: "account_id".into(),
            type_oid: 20,
        }
    }

    fn by_value() -> RouteFn {
        Arc::new(|oid, text: &[u8]| {
            assert_eq!(oid, 20);
            match text {
                b"boom" => Err("no such account".into()),
                b"9" => Ok(ShardId(9)),
                // Only the decoded form (a real tab) routes to 2; the escaped form would not.
                b"a\tb" => Ok(ShardId(2)),
                _ => Ok(ShardId(1)),
            }
        })
    }

    #[test]
    fn rows_route_by_their_decoded_key() {
        let r = by_value();
        assert_eq!(
            route_row(&r, &table(), &key(), 0, b"1\t42\tx\n", 3).unwrap(),
            1
        );
        assert_eq!(
            route_row(&r, &table(), &key(), 0, b"1\ta\\tb\tx\n", 3).unwrap(),
            2
        );
    }

    #[test]
    fn routing_problems_name_table_chunk_and_key() {
        let r = by_value();
        let e = route_row(&r, &table(), &key(), 4, b"1\t\\N\tx\n", 3).unwrap_err();
        assert!(matches!(e, SnapshotError::NullKey { chunk: 4, .. }), "{e}");
        let e = route_row(&r, &table(), &key(), 4, b"1\tboom\n", 3).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("public.events chunk 4")
                && s.contains("\"boom\"")
                && s.contains("no such account"),
            "{s}"
        );
        let e = route_row(&r, &table(), &key(), 4, b"1\t9\n", 3).unwrap_err();
        assert!(e.to_string().contains("only 3 shards"), "{e}");
        let e = route_row(&r, &table(), &key(), 4, b"1\n", 3).unwrap_err();
        assert!(matches!(e, SnapshotError::Malformed { .. }), "{e}");
    }

    #[test]
    fn binary_rows_route_by_their_integer_key() {
        let r = by_value();
        let t = CopyTable {
            format: CopyFormat::Binary,
            ..table()
        };
        let row = |k: &[u8]| tuple(&[Some(&1i64.to_be_bytes()), Some(k), Some(b"x")]);
        assert_eq!(
            route_row(&r, &t, &key(), 0, &row(&9i64.to_be_bytes()), 10).unwrap(),
            9
        );
        assert_eq!(
            route_row(&r, &t, &key(), 0, &row(&42i64.to_be_bytes()), 10).unwrap(),
            1
        );
        let e = route_row(&r, &t, &key(), 4, &row(&9i64.to_be_bytes()), 3).unwrap_err();
        assert!(e.to_string().contains("only 3 shards"), "{e}");
        let null = tuple(&[Some(&77i64.to_be_bytes()), None, Some(b"x")]);
        let e = route_row(&r, &t, &key(), 4, &null, 3).unwrap_err();
        assert!(matches!(e, SnapshotError::NullKey { chunk: 4, .. }), "{e}");
        assert!(e.to_string().contains("[77 | \\N | x]"), "{e}");
        let short = tuple(&[Some(&1i64.to_be_bytes())]);
        let e = route_row(&r, &t, &key(), 4, &short, 3).unwrap_err();
        assert!(matches!(e, SnapshotError::Malformed { .. }), "{e}");
        let e = route_row(&r, &t, &key(), 4, &row(b"abc"), 3).unwrap_err();
        assert!(e.to_string().contains("integer"), "{e}");
    }
}
