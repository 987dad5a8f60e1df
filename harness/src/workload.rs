//! The multi-tenant workload of `fixtures/schema/multitenant.sql`: schema, skewed initial data
//! and a live write mix. Used by `reshard demo`, the benchmark harness and end-to-end tests.
//!
//! Account sizes are skewed (account `a` gets about `1/a` of the largest account's rows, so a
//! few accounts are large and many are small); live transactions mix single-row and 100-row
//! transactions, inserts, updates (some leaving a TOASTed column unchanged, some moving a row
//! to another account), and deletes.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

/// The schema, as SQL.
pub const SCHEMA_SQL: &str = include_str!("../../fixtures/schema/multitenant.sql");

/// Benchmark additions (`fixtures/schema/bench.sql`), applied after [`SCHEMA_SQL`]: the
/// `bench_latency` probe table, the `bench.route` hash helper and the server-side write mix
/// `bench.write_mix` (see [`write_mix`]).
pub const BENCH_SQL: &str = include_str!("../../fixtures/schema/bench.sql");

/// Tables of the schema keyed by `account_id` (sharded).
pub const SHARDED_TABLES: &[&str] = &[
    "accounts",
    "customers",
    "subscriptions",
    "invoices",
    "events",
];

/// Reference tables (broadcast).
pub const BROADCAST_TABLES: &[&str] = &["plans"];

/// Creates the schema.
pub async fn create_schema(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA_SQL).await
}

/// Size of the initial data.
#[derive(Debug, Clone, Copy)]
pub struct FillSpec {
    /// Number of accounts (ids 1..=accounts).
    pub accounts: u32,
    /// Customers of the largest account; account `a` gets `max(1, customers / a)`.
    pub customers: u32,
    /// Events of the largest account; account `a` gets `max(1, events / a)`.
    pub events: u32,
    /// Bytes of each event's `body` (TOASTed when above ~2 kB).
    pub body_bytes: u32,
}

impl Default for FillSpec {
    fn default() -> Self {
        FillSpec {
            accounts: 200,
            customers: 200,
            events: 1000,
            body_bytes: 64,
        }
    }
}

/// Fills the schema with skewed data, server-side (`INSERT … SELECT generate_series`).
/// Returns the total number of rows written.
pub async fn fill(client: &Client, spec: FillSpec) -> Result<u64, tokio_postgres::Error> {
    let mut rows = 0u64;
    rows += client
        .execute(
            "INSERT INTO plans (id, name, price_cents, features) \
             SELECT p, 'plan ' || p, p * 1000, jsonb_build_object('seats', p * 5, 'sso', p > 2) \
             FROM generate_series(1, 5) p ON CONFLICT DO NOTHING",
            &[],
        )
        .await?;
    let n = spec.accounts as i64;
    rows += client
        .execute(
            "INSERT INTO accounts (account_id, name, plan_id, region) \
             SELECT a, 'Account ' || a, 1 + a % 5, (ARRAY['eu','us','ap'])[1 + a % 3] \
             FROM generate_series(1, $1::bigint) a",
            &[&n],
        )
        .await?;
    let c = spec.customers as i64;
    rows += client
        .execute(
            "INSERT INTO customers (account_id, email, name, tags, attrs) \
             SELECT a, 'c' || i || '@a' || a || '.example', 'Customer ' || i, \
                    ARRAY['t' || (i % 3), 'x\ty'], jsonb_build_object('i', i, 'vip', i % 7 = 0) \
             FROM generate_series(1, $1::bigint) a, \
                  LATERAL generate_series(1, GREATEST(1, $2::bigint / a)) i",
            &[&n, &c],
        )
        .await?;
    rows += client
        .execute(
            "INSERT INTO subscriptions (account_id, customer_id, plan_id, status, mrr, period) \
             SELECT account_id, id, 1 + id % 5, 'active', (id % 97) * 1.5, \
                    tstzrange('2024-01-01', '2025-01-01') \
             FROM customers",
            &[],
        )
        .await?;
    rows += client
        .execute(
            "INSERT INTO invoices (account_id, customer_id, number, amount, status, lines, pdf, issued_at) \
             SELECT account_id, id, nextval('invoice_number_seq'), (id % 1000) + 0.99, 'open', \
                    jsonb_build_array(jsonb_build_object('sku', 'A' || id, 'qty', 1)), \
                    '\\x00ff10'::bytea, now() \
             FROM customers",
            &[],
        )
        .await?;
    let e = spec.events as i64;
    let body = spec.body_bytes as i32;
    rows += client
        .execute(
            "INSERT INTO events (account_id, kind, payload, body) \
             SELECT a, (ARRAY['login','click','invoice.paid','note'])[1 + i % 4], \
                    jsonb_build_object('n', i, 'amount', i * 0.01), \
                    left(repeat(md5(a::text || ':' || i::text), ($3::int / 32) + 1), $3::int) \
             FROM generate_series(1, $1::bigint) a, \
                  LATERAL generate_series(1, GREATEST(1, $2::bigint / a)) i",
            &[&n, &e, &body],
        )
        .await?;
    Ok(rows)
}

/// The live write mix.
#[derive(Debug, Clone, Copy)]
pub struct LiveSpec {
    /// Number of accounts to write to (ids 1..=accounts, skewed towards small ids).
    pub accounts: u32,
    /// Stop after this many transactions.
    pub max_txns: u64,
    /// Stop after this long.
    pub max_duration: Duration,
    /// Target transactions per second (0 = as fast as possible).
    pub txns_per_sec: u32,
    /// Share of large (100-row) transactions, in percent.
    pub large_txn_percent: u32,
    /// Seed of the random choices (printed by callers so a run can be repeated).
    pub seed: u64,
}

impl Default for LiveSpec {
    fn default() -> Self {
        LiveSpec {
            accounts: 200,
            max_txns: u64::MAX,
            max_duration: Duration::from_secs(10),
            txns_per_sec: 0,
            large_txn_percent: 5,
            seed: 1,
        }
    }
}

/// What the live mix did.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveStats {
    /// Transactions committed.
    pub txns: u64,
    /// Rows inserted, updated, deleted (as the statements reported).
    pub rows: u64,
}

fn pick_account(rng: &mut StdRng, accounts: u32) -> i64 {
    // Skewed: square of a uniform number favours small ids (the large accounts).
    let u: f64 = rng.gen();
    1 + ((u * u) * accounts as f64) as i64 % accounts.max(1) as i64
}

/// Runs the live write mix until `max_txns` or `max_duration`.
pub async fn live(client: &mut Client, spec: LiveSpec) -> Result<LiveStats, tokio_postgres::Error> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut stats = LiveStats::default();
    let start = Instant::now();
    let interval = if spec.txns_per_sec > 0 {
        Some(Duration::from_secs_f64(1.0 / spec.txns_per_sec as f64))
    } else {
        None
    };
    while stats.txns < spec.max_txns && start.elapsed() < spec.max_duration {
        let a = pick_account(&mut rng, spec.accounts);
        let tx = client.transaction().await?;
        let large = rng.gen_range(0..100) < spec.large_txn_percent;
        let n = if large {
            tx.execute(
                "INSERT INTO events (account_id, kind, payload, body) \
                 SELECT $1, 'bulk', jsonb_build_object('i', i), md5(i::text) \
                 FROM generate_series(1, 100) i",
                &[&a],
            )
            .await?
        } else {
            match rng.gen_range(0..100) {
                0..=39 => {
                    tx.execute(
                        "INSERT INTO events (account_id, kind, payload, body) \
                         VALUES ($1, 'live', jsonb_build_object('t', now()), repeat(md5(random()::text), 100))",
                        &[&a],
                    )
                    .await?
                }
                40..=54 => {
                    tx.execute(
                        "INSERT INTO customers (account_id, email, name, tags, attrs) \
                         VALUES ($1, 'new@x.example', 'New ' || $1::bigint, ARRAY['new'], '{\"src\":\"live\"}')",
                        &[&a],
                    )
                    .await?
                }
                55..=69 => {
                    // Leaves the TOASTed body unchanged.
                    tx.execute(
                        "UPDATE events SET kind = 'seen', payload = payload || '{\"seen\":true}' \
                         WHERE account_id = $1 AND id = (SELECT min(id) FROM events WHERE account_id = $1 AND kind <> 'seen')",
                        &[&a],
                    )
                    .await?
                }
                70..=79 => {
                    tx.execute(
                        "UPDATE invoices SET status = 'paid', amount = amount + 1 \
                         WHERE account_id = $1 AND id = (SELECT max(id) FROM invoices WHERE account_id = $1)",
                        &[&a],
                    )
                    .await?
                }
                80..=89 => {
                    tx.execute(
                        "DELETE FROM events WHERE account_id = $1 \
                         AND id = (SELECT max(id) FROM events WHERE account_id = $1)",
                        &[&a],
                    )
                    .await?
                }
                90..=94 => {
                    tx.execute(
                        "UPDATE subscriptions SET mrr = mrr * 1.1, status = 'upgraded' \
                         WHERE account_id = $1",
                        &[&a],
                    )
                    .await?
                }
                _ => {
                    // A customer moves to another account: a key move between shards.
                    let b = pick_account(&mut rng, spec.accounts);
                    tx.execute(
                        "UPDATE customers SET account_id = $2 \
                         WHERE account_id = $1 AND id = (SELECT max(id) FROM customers WHERE account_id = $1)",
                        &[&a, &b],
                    )
                    .await?
                }
            }
        };
        tx.commit().await?;
        stats.txns += 1;
        stats.rows += n;
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(stats.txns as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
    }
    Ok(stats)
}

/// The server-side write mix of `bench.write_mix` (needs [`BENCH_SQL`]): at least `changes`
/// row changes, each statement its own transaction, `large_percent` % of them large (100-299
/// rows), the rest single-row inserts, updates (TOAST unchanged, numeric, key moves) and
/// deletes, skewed over accounts `1..=accounts`. Deterministic for a `seed` in `[-1, 1]`.
/// Returns the number of rows changed (= row messages a publication of every table decodes).
///
/// Use it when a backlog of a million changes must be written in seconds; [`live`] is the
/// client-driven mix for tests.
pub async fn write_mix(
    client: &Client,
    changes: u64,
    accounts: u32,
    large_percent: u32,
    seed: f64,
) -> Result<u64, tokio_postgres::Error> {
    write_mix_txns(client, changes, accounts, large_percent, 1, seed).await
}

/// [`write_mix`] with its single-row statements grouped: each transaction holds single-row
/// statements on one account until it has at least `txn_rows` rows (1: every statement its
/// own transaction, as [`write_mix`]). Large statements still commit on their own.
pub async fn write_mix_txns(
    client: &Client,
    changes: u64,
    accounts: u32,
    large_percent: u32,
    txn_rows: u32,
    seed: f64,
) -> Result<u64, tokio_postgres::Error> {
    // Simple protocol: a procedure that COMMITs must not run inside an implicit transaction.
    let sql = format!(
        "CALL bench.write_mix({changes}, {accounts}, {large_percent}, {}, 0, {})",
        seed.clamp(-1.0, 1.0),
        txn_rows.max(1)
    );
    let mut written = 0u64;
    for m in client.simple_query(&sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            written = r.get(0).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgCluster;

    #[tokio::test]
    async fn schema_fill_and_live_mix_run() {
        let c = PgCluster::start().unwrap();
        c.create_database("app").unwrap();
        let (mut client, conn) = tokio_postgres::connect(&c.url("app"), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        create_schema(&client).await.unwrap();
        let spec = FillSpec {
            accounts: 20,
            customers: 10,
            events: 30,
            body_bytes: 3000,
        };
        let rows = fill(&client, spec).await.unwrap();
        assert!(rows > 100, "{rows}");
        let toasted: i64 = client
            .query_one("SELECT count(*) FROM events WHERE length(body) = 3000", &[])
            .await
            .unwrap()
            .get(0);
        assert!(toasted > 0);
        let live_spec = LiveSpec {
            accounts: 20,
            max_txns: 200,
            large_txn_percent: 10,
            ..Default::default()
        };
        let stats = live(&mut client, live_spec).await.unwrap();
        assert_eq!(stats.txns, 200);
        assert!(stats.rows > 0);
    }

    #[tokio::test]
    async fn write_mix_writes_at_least_the_asked_changes_in_many_transactions() {
        let c = PgCluster::start().unwrap();
        c.create_database("app").unwrap();
        let (client, conn) = tokio_postgres::connect(&c.url("app"), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        create_schema(&client).await.unwrap();
        client.batch_execute(BENCH_SQL).await.unwrap();
        fill(
            &client,
            FillSpec {
                accounts: 20,
                customers: 10,
                events: 50,
                body_bytes: 64,
            },
        )
        .await
        .unwrap();
        // Commits so far in database `app` (the statistics flushed first).
        async fn commits(client: &Client) -> i64 {
            client
                .execute("SELECT pg_stat_force_next_flush()", &[])
                .await
                .unwrap();
            client
                .query_one(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = 'app'",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        }
        let before = commits(&client).await;
        let written = write_mix(&client, 5_000, 20, 5, 0.25).await.unwrap();
        assert!((5_000..5_300).contains(&written), "{written}");
        let after = commits(&client).await;
        // 95 % of the transactions are single-row, 5 % carry 100-299 rows: about 460 commits
        // (far more than the 17-50 of only large ones, far fewer than 5000 single-row ones).
        let n = after - before;
        assert!((200..2_000).contains(&n), "{n} commits");
        // Grouped: single-row statements only, 5 rows per commit: about 400 commits.
        let written = write_mix_txns(&client, 2_000, 20, 0, 5, 0.5).await.unwrap();
        assert!((2_000..2_010).contains(&written), "{written}");
        let n = commits(&client).await - after;
        assert!((390..=420).contains(&n), "{n} commits of 5 rows");
        let moved: i64 = client
            .query_one(
                "SELECT count(*) FROM events WHERE kind IN ('bulk', 'seen', 'live')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(moved > 0);
    }
}
