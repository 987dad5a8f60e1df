//! The comparison: PostgreSQL's native logical replication fanned out to N shards.
//!
//! In: a [`Topology`], the source database, a name prefix. Out: N row-filtered publications on
//! the source (`<prefix>_<k>`: every sharded table `WHERE satisfies_hash_partition(…, N, k,
//! account_id)`, broadcast tables whole) and N subscriptions (one per shard) with their own
//! slots — so N walsenders each decode the whole WAL and drop other shards' rows — plus the
//! waits that tell when they are done. This is what an operator builds without reshard.
//! See <https://www.postgresql.org/docs/15/logical-replication-row-filter.html>.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reshard_engine::Lsn;

use crate::servers::Topology;
use crate::setup::{shard_db, shard_filter, BROADCAST, SHARDED};

/// Creates the N row-filtered publications `<prefix>_<k>` on source database `src_db`.
pub async fn create_publications(topo: &Topology, src_db: &str, prefix: &str) -> Result<()> {
    let n = topo.n();
    let src = topo.source.connect(src_db).await?;
    for k in 0..n {
        let mut tables: Vec<String> = SHARDED
            .iter()
            .map(|t| format!("{t} WHERE ({})", shard_filter(n, k)))
            .collect();
        tables.extend(BROADCAST.iter().map(|t| (*t).to_owned()));
        src.batch_execute(&format!(
            "CREATE PUBLICATION {prefix}_{k} FOR TABLE {}",
            tables.join(", ")
        ))
        .await
        .with_context(|| format!("creating publication {prefix}_{k}"))?;
    }
    Ok(())
}

/// Options of the subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct SubOptions {
    /// Initial table copy (the full load) or not.
    pub copy_data: bool,
    /// Start applying at once.
    pub enabled: bool,
}

/// Creates subscription `<prefix>_<k>` (slot `<prefix>_<k>`, created now) on every shard's
/// database `rb_<what>_s<k>`. `streaming = on` as reshard asks for large transactions.
pub async fn create_subscriptions(
    topo: &Topology,
    src_db: &str,
    what: &str,
    prefix: &str,
    opts: SubOptions,
) -> Result<()> {
    let conninfo = topo.source.conninfo(src_db).replace('\'', "''");
    for (k, s) in topo.shards.iter().enumerate() {
        let c = s.connect(&shard_db(what, k)).await?;
        c.batch_execute(&format!(
            "CREATE SUBSCRIPTION {prefix}_{k} CONNECTION '{conninfo}' PUBLICATION {prefix}_{k} \
             WITH (copy_data = {}, enabled = {}, create_slot = true, slot_name = '{prefix}_{k}', \
             streaming = on)",
            opts.copy_data, opts.enabled
        ))
        .await
        .with_context(|| format!("creating subscription {prefix}_{k} on {}", s.name))?;
    }
    Ok(())
}

/// Enables every subscription `<prefix>_<k>` (as close to simultaneously as one client can).
pub async fn enable(topo: &Topology, what: &str, prefix: &str) -> Result<()> {
    let mut clients = Vec::new();
    for (k, s) in topo.shards.iter().enumerate() {
        clients.push((k, s.connect(&shard_db(what, k)).await?));
    }
    for (k, c) in &clients {
        c.batch_execute(&format!("ALTER SUBSCRIPTION {prefix}_{k} ENABLE"))
            .await
            .with_context(|| format!("enabling subscription {prefix}_{k}"))?;
    }
    Ok(())
}

/// Waits until every slot `<prefix>_%` on the source has `confirmed_flush_lsn >= target`
/// (the subscriber confirms only what it has applied and flushed). Returns when that was seen.
pub async fn wait_confirmed(
    topo: &Topology,
    src_db: &str,
    prefix: &str,
    target: Lsn,
    timeout: Duration,
) -> Result<Instant> {
    let src = topo.source.connect(src_db).await?;
    let deadline = Instant::now() + timeout;
    let n = topo.n() as i64;
    loop {
        let r = src
            .query_one(
                "SELECT count(*) FILTER (WHERE confirmed_flush_lsn >= $1::text::pg_lsn), count(*) \
                 FROM pg_replication_slots WHERE slot_name LIKE $2",
                &[&target.to_string(), &format!("{prefix}\\_%")],
            )
            .await
            .context("reading pg_replication_slots")?;
        let (done, all): (i64, i64) = (r.get(0), r.get(1));
        if all == n && done == n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "native replication: only {done} of {n} slots {prefix}_* confirmed {target} \
                 within {timeout:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every table of every subscription is synchronized
/// (`pg_subscription_rel.srsubstate = 'r'` for all tables on all shards).
pub async fn wait_synced(topo: &Topology, what: &str, timeout: Duration) -> Result<Instant> {
    let mut clients = Vec::new();
    for (k, s) in topo.shards.iter().enumerate() {
        clients.push(s.connect(&shard_db(what, k)).await?);
    }
    let tables = (SHARDED.len() + BROADCAST.len()) as i64;
    let deadline = Instant::now() + timeout;
    loop {
        let mut all_ready = true;
        let mut states = Vec::new();
        for c in &clients {
            let r = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE srsubstate = 'r'), count(*) \
                     FROM pg_subscription_rel",
                    &[],
                )
                .await
                .context("reading pg_subscription_rel")?;
            let (ready, all): (i64, i64) = (r.get(0), r.get(1));
            states.push(format!("{ready}/{all}"));
            if ready != tables || all != tables {
                all_ready = false;
            }
        }
        if all_ready {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "native initial sync not done within {timeout:?}: tables ready per shard {}",
                states.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops the subscriptions (and with them their slots on the source) and the publications.
/// Errors are ignored: this is cleanup.
pub async fn drop_all(topo: &Topology, src_db: &str, what: &str, prefix: &str) {
    for (k, s) in topo.shards.iter().enumerate() {
        if let Ok(c) = s.connect(&shard_db(what, k)).await {
            let _ = c
                .batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {prefix}_{k}"))
                .await;
        }
    }
    if let Ok(src) = topo.source.connect(src_db).await {
        for k in 0..topo.n() {
            let _ = src
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {prefix}_{k}"))
                .await;
        }
        let _ = src
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name LIKE $1 AND NOT active",
                &[&format!("{prefix}\\_%")],
            )
            .await;
    }
}
