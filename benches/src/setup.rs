//! Databases of a scenario: the source with the multi-tenant schema and data, empty shard
//! databases with the same schema, and what each shard must end up holding.
//!
//! In: a [`Topology`], database names and a [`FillSpec`]. Out: prepared databases, the
//! per-shard expected row counts (computed by PostgreSQL's own hash partitioning, never by
//! reshard's code), and the current WAL position. Invariant: the shard of an account is
//! `satisfies_hash_partition('bench.route'::regclass, N, k, account_id)` everywhere in the
//! benchmark (COPY filters, publication row filters, expected counts), which is
//! `PARTITION BY HASH (account_id)` with `MODULUS N` — reshard's `hash = "postgres"`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use reshard_engine::Lsn;
use reshard_harness::workload::{self, FillSpec};
use tokio_postgres::Client;

use crate::servers::{Server, Topology};

/// Tables sharded by `account_id` (the workload's, plus the latency probes).
pub const SHARDED: &[&str] = &[
    "accounts",
    "customers",
    "subscriptions",
    "invoices",
    "events",
    "bench_latency",
];

/// Tables copied to every shard.
pub const BROADCAST: &[&str] = &["plans"];

/// Every replicated table.
pub fn all_tables() -> impl Iterator<Item = &'static str> {
    SHARDED.iter().chain(BROADCAST.iter()).copied()
}

/// The row filter selecting shard `k` of `n`.
pub fn shard_filter(n: usize, k: usize) -> String {
    format!("satisfies_hash_partition('bench.route'::regclass, {n}, {k}, account_id)")
}

/// Name of shard `k`'s database for a scenario/contestant (`rb_<what>_s<k>`), distinct per
/// shard so that several shards may live on one server.
pub fn shard_db(what: &str, k: usize) -> String {
    format!("rb_{what}_s{k}")
}

/// Creates the source database `db` afresh with the schema, fills it, and gives one event in
/// `toast_every` a 4 kB body (stored out of line: `STORAGE EXTERNAL`). Returns the rows.
pub async fn prepare_source(
    server: &Server,
    db: &str,
    spec: FillSpec,
    toast_every: u32,
) -> Result<u64> {
    server.recreate_db(db).await?;
    let c = server.connect(db).await?;
    workload::create_schema(&c)
        .await
        .context("creating the multi-tenant schema on the source")?;
    c.batch_execute(workload::BENCH_SQL)
        .await
        .context("creating the bench additions on the source")?;
    let rows = workload::fill(&c, spec)
        .await
        .context("filling the source")?;
    if toast_every > 0 {
        c.execute(
            &format!(
                "UPDATE events SET body = repeat(md5(id::text), 125) WHERE id % {toast_every} = 0"
            ),
            &[],
        )
        .await
        .context("TOASTing event bodies")?;
    }
    c.batch_execute("VACUUM ANALYZE")
        .await
        .context("VACUUM ANALYZE on the source")?;
    Ok(rows)
}

/// Creates shard database `db` afresh with the schema and no rows; `bench_latency` gets the
/// target-only column `applied_at timestamptz DEFAULT clock_timestamp()`.
pub async fn prepare_shard(server: &Server, db: &str) -> Result<()> {
    server.recreate_db(db).await?;
    let c = server.connect(db).await?;
    workload::create_schema(&c)
        .await
        .with_context(|| format!("creating the schema on {} {db}", server.name))?;
    c.batch_execute(workload::BENCH_SQL)
        .await
        .with_context(|| format!("creating the bench additions on {} {db}", server.name))?;
    c.batch_execute(
        "ALTER TABLE bench_latency ADD COLUMN applied_at timestamptz DEFAULT clock_timestamp()",
    )
    .await
    .with_context(|| format!("adding bench_latency.applied_at on {} {db}", server.name))?;
    Ok(())
}

/// Prepares shard databases `rb_<what>_s<k>` on every shard.
pub async fn prepare_shards(topo: &Topology, what: &str) -> Result<()> {
    for (k, s) in topo.shards.iter().enumerate() {
        prepare_shard(s, &shard_db(what, k)).await?;
    }
    Ok(())
}

/// Rows per table that shard `k` must hold: `result[k][table]`.
pub type Counts = Vec<BTreeMap<String, i64>>;

/// The rows each of `n` shards must hold, computed on the source.
pub async fn expected_counts(src: &Client, n: usize) -> Result<Counts> {
    let mut out: Counts = vec![BTreeMap::new(); n];
    for t in SHARDED {
        let rows = src
            .query(
                &format!(
                    "WITH c AS (SELECT account_id, count(*) AS n FROM {t} GROUP BY account_id) \
                     SELECT k, sum(c.n)::bigint FROM c, generate_series(0, {}) k \
                     WHERE satisfies_hash_partition('bench.route'::regclass, {n}, k, c.account_id) \
                     GROUP BY k",
                    n - 1
                ),
                &[],
            )
            .await
            .with_context(|| format!("counting {t} per shard on the source"))?;
        for m in out.iter_mut() {
            m.insert((*t).to_owned(), 0);
        }
        for r in rows {
            let k: i32 = r.get(0);
            let c: i64 = r.get(1);
            if let Some(m) = out.get_mut(k as usize) {
                m.insert((*t).to_owned(), c);
            }
        }
    }
    for t in BROADCAST {
        let c: i64 = src
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .with_context(|| format!("counting {t} on the source"))?
            .get(0);
        for m in out.iter_mut() {
            m.insert((*t).to_owned(), c);
        }
    }
    Ok(out)
}

/// The rows a shard database holds, per table.
pub async fn shard_counts(c: &Client) -> Result<BTreeMap<String, i64>> {
    let sql = all_tables()
        .map(|t| format!("SELECT '{t}', count(*) FROM {t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let mut m = BTreeMap::new();
    for r in c.query(&sql, &[]).await.context("counting shard rows")? {
        m.insert(r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    Ok(m)
}

/// Differences between what the shards hold and what they must hold (empty when equal).
pub async fn count_mismatches(
    topo: &Topology,
    what: &str,
    expected: &Counts,
) -> Result<Vec<String>> {
    let mut diffs = Vec::new();
    for (k, s) in topo.shards.iter().enumerate() {
        let c = s.connect(&shard_db(what, k)).await?;
        let have = shard_counts(&c).await?;
        if let Some(want) = expected.get(k) {
            for (t, w) in want {
                let h = have.get(t).copied().unwrap_or(-1);
                if h != *w {
                    diffs.push(format!("{} {t}: {h} rows, expected {w}", s.name));
                }
            }
        }
    }
    Ok(diffs)
}

/// `pg_current_wal_lsn()`.
pub async fn current_lsn(c: &Client) -> Result<Lsn> {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .context("reading pg_current_wal_lsn()")?
        .get(0);
    s.parse::<Lsn>()
        .map_err(|e| anyhow::anyhow!("pg_current_wal_lsn() = {s}: {e}"))
}

/// Writes a fence: one transaction updating a broadcast row (`plans` id 1, no value changes),
/// which every shard receives after everything committed before it. Returns an LSN inside
/// that transaction, below its commit record: a shard whose applied `commit_lsn` reaches it has
/// applied the fence, hence (applying in source commit order) everything before it. Needs no
/// heartbeat from the consumer and changes no row count.
pub async fn fence(c: &Client) -> Result<Lsn> {
    let rows = c
        .simple_query(
            "BEGIN; UPDATE plans SET name = name WHERE id = 1; \
             SELECT pg_current_wal_insert_lsn()::text; COMMIT",
        )
        .await
        .context("writing the fence transaction")?;
    let s = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .context("the fence returned no LSN")?;
    s.parse::<Lsn>()
        .map_err(|e| anyhow::anyhow!("fence LSN {s}: {e}"))
}

/// Total of a count map.
pub fn total(m: &BTreeMap<String, i64>) -> i64 {
    m.values().sum()
}
