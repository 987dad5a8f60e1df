//! The raw full-load limit: N parallel filtered COPY pipes, source → shard, in-process.
//!
//! In: a [`Topology`], the source database and the shard databases. Out: every shard holds its
//! share of every table (sharded tables filtered by [`shard_filter`], broadcast tables whole),
//! and the number of rows written. Each pipe is `COPY (SELECT … WHERE <filter>) TO STDOUT
//! (FORMAT binary)` streamed chunk by chunk into `COPY … FROM STDIN (FORMAT binary)`: nothing
//! is parsed and no more than a few chunks per pipe are held in memory, so this is the fastest a
//! full load can move rows between these servers. It also loads the base data of the catch-up
//! and steady scenarios.

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;

use crate::servers::Topology;
use crate::setup::{all_tables, shard_db, shard_filter, BROADCAST};

/// Copies each shard's share from source database `src_db` into `rb_<what>_s<k>`: one pipe
/// per (shard, table), all at once (native initial sync also copies tables in parallel).
/// Returns the rows written.
pub async fn copy_shares(topo: &Topology, src_db: &str, what: &str) -> Result<u64> {
    let n = topo.n();
    let mut set = JoinSet::new();
    for (k, shard) in topo.shards.iter().enumerate() {
        for t in all_tables() {
            let src = topo.source.connect(src_db).await?;
            let dst = shard.connect(&shard_db(what, k)).await?;
            let name = shard.name.clone();
            let filter = if BROADCAST.contains(&t) {
                String::new()
            } else {
                format!(" WHERE {}", shard_filter(n, k))
            };
            set.spawn(async move { pipe(&src, &dst, t, &filter, &name).await });
        }
    }
    let mut rows = 0;
    while let Some(r) = set.join_next().await {
        rows += r.context("a COPY pipe panicked")??;
    }
    Ok(rows)
}

/// One pipe: `COPY (SELECT <cols> FROM t <filter>) TO STDOUT` → `COPY t (<cols>) FROM STDIN`,
/// binary, chunk by chunk.
async fn pipe(
    src: &tokio_postgres::Client,
    dst: &tokio_postgres::Client,
    t: &str,
    filter: &str,
    shard: &str,
) -> Result<u64> {
    let cols: Vec<String> = src
        .query(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[&t],
        )
        .await
        .with_context(|| format!("columns of {t}"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let cols = cols.join(", ");
    let out = src
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {t}{filter}) TO STDOUT (FORMAT binary)"
        ))
        .await
        .with_context(|| format!("COPY {t} TO STDOUT for {shard}"))?;
    let sink = dst
        .copy_in::<_, bytes::Bytes>(&format!("COPY {t} ({cols}) FROM STDIN (FORMAT binary)"))
        .await
        .with_context(|| format!("COPY {t} FROM STDIN on {shard}"))?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    while let Some(chunk) = out.next().await {
        let chunk = chunk.with_context(|| format!("reading {t} for {shard}"))?;
        // Buffered by the sink (flushed in 4 kB batches), not a round trip per row.
        sink.feed(chunk)
            .await
            .with_context(|| format!("writing {t} to {shard}"))?;
    }
    sink.finish()
        .await
        .with_context(|| format!("finishing COPY {t} on {shard}"))
}
