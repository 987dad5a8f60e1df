//! Full load (`reshard_engine::snapshot`) against real clusters: one source and three shards.
//!
//! Routing here is `account_id mod 3` (a test closure; the runtime wires the real hash router),
//! so each shard's expected rows are plain SQL on the source: `((account_id % 3) + 3) % 3 = r`.
//! Snapshots are exported with `pg_export_snapshot()` from a REPEATABLE READ transaction kept
//! open for the load, and the expected contents are computed inside that same transaction, so
//! the comparison is exactly "the source as of the snapshot".

use std::sync::Arc;
use std::time::Duration;

use reshard_engine::config::SnapshotConfig;
use reshard_engine::snapshot::{
    render_line, Connect, ExportedSnapshot, FullLoad, FullLoadOptions, FullLoadReport, RouteFn,
    ShardTarget, SnapshotError, TableMode, TableName, TableSpec, TableState,
};
use reshard_engine::{Lsn, ShardId};
use reshard_harness::PgCluster;
use tokio_postgres::{Client, NoTls};

const SHARDS: usize = 3;

pub(crate) const SOURCE_DDL: &str = "
CREATE TABLE events (
    id bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    payload text,
    created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    marker boolean NOT NULL DEFAULT false,
    doubled bigint GENERATED ALWAYS AS (account_id * 2) STORED
);
CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, price numeric);
CREATE TABLE weird (
    id bigint PRIMARY KEY, account_id bigint NOT NULL, doc jsonb, amount numeric, note text,
    tags text[], raw bytea
);
CREATE TABLE orders (
    id bigint NOT NULL, account_id bigint NOT NULL, region text NOT NULL, total numeric(12,2),
    PRIMARY KEY (id, region)
) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
CREATE TABLE orders_other PARTITION OF orders DEFAULT;
";

pub(crate) const TARGET_DDL: &str = "
CREATE TABLE events (
    id bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    payload text,
    created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    marker boolean NOT NULL DEFAULT false,
    doubled bigint GENERATED ALWAYS AS (account_id * 2) STORED
);
CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, price numeric);
CREATE TABLE weird (
    id bigint PRIMARY KEY, account_id bigint NOT NULL, doc jsonb, amount numeric, note text,
    tags text[], raw bytea
);
CREATE TABLE orders (
    id bigint NOT NULL, account_id bigint NOT NULL, region text NOT NULL, total numeric(12,2),
    PRIMARY KEY (id, region)
);
";

fn seed_sql(events: u64) -> String {
    r#"
INSERT INTO events (id, account_id, payload)
  SELECT g, g % 1000, 'payload ' || g || repeat('x', (g % 50)::int)
  FROM generate_series(1, EVENTS) g;
INSERT INTO plans SELECT g, 'plan ' || g, g * 1.5 FROM generate_series(1, 20) g;
INSERT INTO weird VALUES
  (1, 5, '{"a": "tab\there", "b": [1, 2]}', 1.000000000000000000001,
   E'tab\there\nnewline\\backslash', '{"x y","a\"b",NULL}', '\x00ff0a09'),
  (2, 6, NULL, NULL, NULL, NULL, NULL),
  (3, 7, 'null', 'NaN', E'\r\n\t', '{}', ''),
  (4, -3, '{}', -0.5, 'ünïcödé ☃', NULL, '\x5c'),
  (5, 1000000000001, '["\\N"]', 0, E'\\N', '{"\\N"}', '\x5c4e');
INSERT INTO orders SELECT g, g % 97, (ARRAY['eu','us','apac'])[1 + g % 3], g * 0.01
  FROM generate_series(1, 3000) g;
ANALYZE;
"#
    .replace("EVENTS", &events.to_string())
}

/// Columns compared per table (the generated column is computed by each side).
const TABLES: &[(&str, &str, bool)] = &[
    (
        "events",
        "id, account_id, payload, created, marker, doubled",
        true,
    ),
    ("plans", "id, name, price", false),
    (
        "weird",
        "id, account_id, doc, amount, note, tags, raw",
        true,
    ),
    ("orders", "id, account_id, region, total", true),
];

struct Env {
    source: PgCluster,
    shards: Vec<PgCluster>,
}

impl Env {
    fn start(events: u64) -> Env {
        let source = PgCluster::start().expect("source cluster");
        source.psql("postgres", SOURCE_DDL).expect("source DDL");
        source.psql("postgres", &seed_sql(events)).expect("seed");
        let shards: Vec<PgCluster> = (0..SHARDS)
            .map(|_| {
                let c = PgCluster::start().expect("shard cluster");
                c.psql("postgres", TARGET_DDL).expect("target DDL");
                c
            })
            .collect();
        Env { source, shards }
    }

    fn shard_targets(&self) -> Vec<ShardTarget> {
        shard_targets(&self.shards)
    }

    fn load(&self, options: FullLoadOptions) -> FullLoad {
        FullLoad::new(
            connector(self.source.url("postgres")),
            self.shard_targets(),
            specs(),
            route_mod(SHARDS as i64),
            options,
        )
    }
}

fn specs() -> Vec<TableSpec> {
    TABLES
        .iter()
        .map(|(t, _, sharded)| TableSpec {
            source: TableName::new("public", *t),
            target: TableName::new("public", *t),
            mode: if *sharded {
                TableMode::Sharded {
                    key: "account_id".into(),
                }
            } else {
                TableMode::Broadcast
            },
        })
        .collect()
}

/// The full load's targets: `shard{i}` for each cluster's `postgres` database, in order.
pub(crate) fn shard_targets(shards: &[PgCluster]) -> Vec<ShardTarget> {
    shards
        .iter()
        .enumerate()
        .map(|(i, c)| ShardTarget {
            name: format!("shard{i}"),
            connect: connector(c.url("postgres")),
            replicas: vec![],
        })
        .collect()
}

pub(crate) fn connector(url: String) -> Connect {
    Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        })
    })
}

pub(crate) async fn client(c: &PgCluster) -> Client {
    let (client, conn) = tokio_postgres::connect(&c.url("postgres"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `account_id mod n`, the way the test's SQL computes it.
pub(crate) fn route_mod(n: i64) -> RouteFn {
    Arc::new(move |_oid, text: &[u8]| {
        let s = std::str::from_utf8(text).map_err(|e| e.to_string())?;
        let v: i64 = s
            .parse()
            .map_err(|e| format!("{s:?} is not a bigint: {e}"))?;
        Ok(ShardId(v.rem_euclid(n) as u16))
    })
}

fn options(f: impl FnOnce(&mut SnapshotConfig)) -> FullLoadOptions {
    let mut c = SnapshotConfig {
        chunk_rows: 20_000,
        ..SnapshotConfig::default()
    };
    f(&mut c);
    FullLoadOptions::from_config(&c).expect("valid options")
}

/// Exports a snapshot from a REPEATABLE READ transaction that stays open on `client`.
pub(crate) async fn export(client: &Client) -> ExportedSnapshot {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT pg_export_snapshot(), pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .unwrap();
    ExportedSnapshot {
        name: row.get(0),
        lsn: row.get::<_, String>(1).parse::<Lsn>().unwrap(),
    }
}

fn digest_sql(from: &str) -> String {
    format!(
        "SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') \
         FROM ({from}) x"
    )
}

async fn digest(client: &Client, from: &str) -> String {
    client
        .query_one(&digest_sql(from), &[])
        .await
        .unwrap_or_else(|e| panic!("{from}: {e}"))
        .get(0)
}

/// Per table, per shard: the digest of the rows that shard must hold, computed on `source`
/// (inside its snapshot transaction when one is open).
async fn expected(source: &Client) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (t, cols, sharded) in TABLES {
        let mut per = Vec::new();
        for r in 0..SHARDS {
            let filter = if *sharded {
                format!(" WHERE ((account_id % {SHARDS}) + {SHARDS}) % {SHARDS} = {r}")
            } else {
                String::new()
            };
            per.push(digest(source, &format!("SELECT {cols} FROM {t}{filter}")).await);
        }
        out.push(per);
    }
    out
}

async fn actual(env: &Env) -> Vec<Vec<String>> {
    let mut clients = Vec::new();
    for s in &env.shards {
        clients.push(client(s).await);
    }
    let mut out = Vec::new();
    for (t, cols, _) in TABLES {
        let mut per = Vec::new();
        for c in &clients {
            per.push(digest(c, &format!("SELECT {cols} FROM {t}")).await);
        }
        out.push(per);
    }
    out
}

pub(crate) fn count(c: &PgCluster, sql: &str) -> i64 {
    c.psql("postgres", sql).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_load_matches_the_source_as_of_the_snapshot_despite_concurrent_writes() {
    let env = Env::start(200_000);

    // A writer that keeps inserting marker rows, updating and deleting old rows.
    let writer_client = client(&env.source).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop.clone();
    let writer = tokio::spawn(async move {
        let mut i: i64 = 0;
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            writer_client
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO events (id, account_id, payload, marker)
                       VALUES ({}, {}, 'after', true);
                     UPDATE events SET payload = 'updated {i}' WHERE id = {};
                     DELETE FROM events WHERE id = {};
                     UPDATE plans SET price = price + 1 WHERE id = {};
                     COMMIT",
                    1_000_000 + i,
                    i % 1000,
                    1 + (i * 7919) % 200_000,
                    1 + (i * 104_729) % 200_000,
                    1 + i % 20
                ))
                .await
                .expect("writer");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        i
    });
    // Let the writer commit some transactions before the snapshot, so "before" is non-trivial.
    while count(&env.source, "SELECT count(*) FROM events WHERE marker") < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let exporter = client(&env.source).await;
    let snap = export(&exporter).await;
    let want = expected(&exporter).await;
    let markers_in_snapshot: i64 = exporter
        .query_one("SELECT count(*) FROM events WHERE marker", &[])
        .await
        .unwrap()
        .get(0);
    let rows_in_snapshot: i64 = exporter
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);

    let load = env.load(options(|_| {}));
    let mut progress = load.progress();
    let prepared = load.prepare().await.expect("prepare");
    assert_eq!(prepared.tables_to_copy().len(), TABLES.len());
    let (imported_tx, imported_rx) = tokio::sync::oneshot::channel();
    let report = prepared
        .run(Some(snap.clone()), Some(imported_tx))
        .await
        .expect("full load");
    assert!(imported_rx.await.is_ok(), "imported was signalled");
    exporter.batch_execute("COMMIT").await.unwrap();

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    let markers_now = count(&env.source, "SELECT count(*) FROM events WHERE marker");
    assert!(
        markers_now > markers_in_snapshot,
        "the writer must have committed after the snapshot ({writes} transactions, \
         {markers_now} markers now, {markers_in_snapshot} in the snapshot)"
    );

    assert_eq!(
        actual(&env).await,
        want,
        "shards differ from the source as of the snapshot"
    );
    let markers_on_shards: i64 = env
        .shards
        .iter()
        .map(|s| count(s, "SELECT count(*) FROM events WHERE marker"))
        .sum();
    assert_eq!(markers_on_shards, markers_in_snapshot);

    // Each source row was read once, whatever the number of shards.
    let events = report.table("public.events").unwrap();
    assert_eq!(events.rows, rows_in_snapshot as u64);
    assert!(
        events.chunks_copied >= 5,
        "200k rows in 20k-row chunks: {events:?}"
    );
    assert_eq!(events.chunks_copied, events.chunks_total);
    assert_eq!(report.table("public.plans").unwrap().rows, 20);
    // orders: one chunk per leaf partition at least.
    assert!(report.table("public.orders").unwrap().chunks_copied >= 3);
    assert!(report
        .tables
        .iter()
        .all(|t| t.as_of == snap.lsn && !t.recopied));
    assert!(report.skip_until(snap.lsn).is_empty());

    let p = progress.borrow_and_update().clone();
    assert!(p.finished(), "{p:?}");
    let ev = p.table("public.events").unwrap();
    assert_eq!(ev.rows_copied, rows_in_snapshot as u64);
    assert_eq!(ev.chunks_done, events.chunks_total);
    assert!(render_line(ev).starts_with("public.events: done "));

    // Chunk records: every chunk on every shard, rows adding up to the source's.
    let mut recorded = 0;
    for s in &env.shards {
        recorded += count(
            s,
            "SELECT coalesce(sum(rows), 0) FROM reshard.fullload_chunks \
             WHERE source_table = 'public.events'",
        );
        assert_eq!(
            count(
                s,
                "SELECT count(*) FROM reshard.fullload_chunks WHERE source_table = 'public.events'"
            ),
            i64::from(events.chunks_total)
        );
    }
    assert_eq!(recorded, rows_in_snapshot);

    // A second run finds everything finished and needs no snapshot.
    let again = env
        .load(options(|_| {}))
        .prepare()
        .await
        .expect("prepare again");
    assert!(!again.needs_snapshot());
    let report2 = again.run(None, None).await.expect("no-op run");
    assert!(report2
        .tables
        .iter()
        .all(|t| t.chunks_copied == 0 && t.as_of == snap.lsn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_keeps_each_shard_under_max_rows_per_sec() {
    let env = Env::start(30_000);
    let exporter = client(&env.source).await;
    let snap = export(&exporter).await;
    let load = env.load(FullLoadOptions {
        batch_bytes: std::num::NonZeroUsize::new(8 * 1024).unwrap(),
        ..options(|c| {
            c.parallel = 4;
            c.max_rows_per_sec = 5_000;
            c.max_concurrent_copies_per_shard = 1;
            c.chunk_rows = 5_000;
        })
    });
    let task = tokio::spawn(load.prepare().await.unwrap().run(Some(snap), None));
    // Four workers, but at most one COPY into a shard at any moment.
    let watcher = client(&env.shards[0]).await;
    let mut most = 0;
    let mut samples = 0;
    while !task.is_finished() {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND query LIKE 'COPY % FROM STDIN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        most = most.max(n);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        samples > 10,
        "the load was too short to watch ({samples} samples)"
    );
    assert_eq!(
        most, 1,
        "concurrent COPYs into shard0 with max_concurrent_copies_per_shard = 1"
    );
    let report: FullLoadReport = task.await.unwrap().unwrap();
    exporter.batch_execute("COMMIT").await.unwrap();
    assert_eq!(report.throttle.len(), SHARDS);
    for (s, stats) in report.throttle.iter().enumerate() {
        // The throttle saw exactly the rows the shard received (broadcast rows count on every
        // shard), and kept them under the limit by its own clock.
        let on_shard: i64 = TABLES
            .iter()
            .map(|(t, _, _)| count(&env.shards[s], &format!("SELECT count(*) FROM {t}")))
            .sum();
        assert_eq!(stats.rows, on_shard as u64, "shard{s}");
        assert_eq!(stats.max_rows_per_sec, Some(5_000));
        assert!(stats.within_limits(), "shard{s}: {stats:?}");
        assert!(
            stats.waited > Duration::ZERO,
            "shard{s} was never held back: {stats:?}"
        );
        let rate = stats.rows as f64 / stats.window.as_secs_f64();
        assert!(rate <= 5_000.0 * 1.2, "shard{s}: {rate} rows/s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_problems_are_reported_together_before_anything_is_written() {
    let env = Env::start(1_000);
    env.shards[1].psql("postgres", "DROP TABLE events").unwrap();
    env.shards[2]
        .psql("postgres", "INSERT INTO plans VALUES (999, 'foreign', 0)")
        .unwrap();
    env.shards[0]
        .psql(
            "postgres",
            "ALTER TABLE weird ALTER COLUMN amount TYPE numeric(10,2); \
             ALTER TABLE orders ADD COLUMN must_have int NOT NULL",
        )
        .unwrap();
    let err = env
        .load(options(|_| {}))
        .prepare()
        .await
        .err()
        .expect("prepare must refuse");
    let SnapshotError::Targets { problems } = &err else {
        panic!("expected Targets, got {err}");
    };
    let text = err.to_string();
    for needle in [
        "shard1: table public.events is missing (create it with the source's DDL)",
        "shard2: table public.plans is not empty",
        "shard0: column public.weird.amount is numeric(10,2) but numeric on the source",
        "shard0: column public.orders.must_have is NOT NULL without a default",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");
    // Nothing was written.
    assert_eq!(count(&env.shards[0], "SELECT count(*) FROM weird"), 0);

    // Fix the schemas; truncate_targets empties the foreign row and the load goes through.
    env.shards[1]
        .psql("postgres", TARGET_DDL.split(';').next().unwrap())
        .unwrap();
    env.shards[0]
        .psql(
            "postgres",
            "ALTER TABLE weird ALTER COLUMN amount TYPE numeric; \
             ALTER TABLE orders DROP COLUMN must_have",
        )
        .unwrap();
    let exporter = client(&env.source).await;
    let snap = export(&exporter).await;
    let want = expected(&exporter).await;
    env.load(options(|c| c.truncate_targets = true))
        .prepare()
        .await
        .expect("prepare with truncate_targets")
        .run(Some(snap), None)
        .await
        .expect("load");
    assert_eq!(actual(&env).await, want);
    assert_eq!(
        count(&env.shards[2], "SELECT count(*) FROM plans WHERE id = 999"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_shard_key_stops_the_load_naming_table_and_row() {
    let env = Env::start(100);
    env.source
        .psql(
            "postgres",
            "ALTER TABLE weird ALTER COLUMN account_id DROP NOT NULL; \
             INSERT INTO weird (id, account_id, note) VALUES (77, NULL, 'orphan')",
        )
        .unwrap();
    let exporter = client(&env.source).await;
    let snap = export(&exporter).await;
    let err = env
        .load(options(|_| {}))
        .prepare()
        .await
        .unwrap()
        .run(Some(snap), None)
        .await
        .expect_err("must fail");
    let text = err.to_string();
    assert!(matches!(err, SnapshotError::NullKey { .. }), "{text}");
    assert!(
        text.contains("public.weird") && text.contains("account_id"),
        "{text}"
    );
    assert!(text.contains("77 | \\N"), "row shown: {text}");
    // The failed chunk left nothing on any shard.
    for s in &env.shards {
        assert_eq!(count(s, "SELECT count(*) FROM weird"), 0);
    }
}

const INDEXES: &str = "
CREATE INDEX events_account_idx ON events (account_id, created DESC);
CREATE INDEX events_marked_idx ON events (id) WHERE marker;
CREATE INDEX events_lower_idx ON events (lower(payload));
CREATE UNIQUE INDEX plans_name_idx ON plans (name);
";

fn index_defs(c: &PgCluster) -> String {
    c.psql(
        "postgres",
        "SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes \
         WHERE schemaname = 'public'",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_indexes_are_dropped_for_the_load_and_rebuilt_identically() {
    let env = Env::start(60_000);
    let mut before = Vec::new();
    for s in &env.shards {
        s.psql("postgres", INDEXES).unwrap();
        before.push(index_defs(s));
    }
    assert!(before[0].contains("events_lower_idx"));
    // A crashed earlier run left one index dropped and recorded on shard2: it must come back.
    env.shards[2]
        .psql(
            "postgres",
            &format!(
                "{} INSERT INTO reshard.deferred_indexes (target_table, index_name, indexdef) \
                 SELECT 'public.events', 'public.events_marked_idx', indexdef FROM pg_indexes \
                 WHERE indexname = 'events_marked_idx'; DROP INDEX events_marked_idx;",
                "CREATE SCHEMA reshard; CREATE TABLE reshard.deferred_indexes (target_table text, \
                 index_name text, indexdef text, recorded_at timestamptz NOT NULL DEFAULT now(), \
                 PRIMARY KEY (target_table, index_name));"
            ),
        )
        .unwrap();

    let exporter = client(&env.source).await;
    let snap = export(&exporter).await;
    let want = expected(&exporter).await;
    let load = env.load(options(|c| {
        c.defer_indexes = true;
        c.max_rows_per_sec = 20_000;
        c.chunk_rows = 10_000;
    }));
    let mut progress = load.progress();
    let task = tokio::spawn(load.prepare().await.unwrap().run(Some(snap), None));
    // While the load runs, the secondary indexes are gone and recorded; the PK stays.
    loop {
        progress.changed().await.unwrap();
        let done = progress
            .borrow()
            .table("public.events")
            .is_some_and(|t| t.chunks_done >= 1);
        if done {
            break;
        }
    }
    let during = index_defs(&env.shards[0]);
    assert!(!during.contains("events_account_idx"), "{during}");
    assert!(!during.contains("plans_name_idx"), "{during}");
    assert!(during.contains("events_pkey"), "{during}");
    assert_eq!(
        count(
            &env.shards[0],
            "SELECT count(*) FROM reshard.deferred_indexes"
        ),
        4
    );
    let report = task.await.unwrap().expect("load");
    exporter.batch_execute("COMMIT").await.unwrap();
    assert_eq!(report.indexes_rebuilt, 4 * SHARDS);
    for (s, c) in env.shards.iter().enumerate() {
        assert_eq!(index_defs(c), before[s], "shard{s}");
        assert_eq!(count(c, "SELECT count(*) FROM reshard.deferred_indexes"), 0);
    }
    assert_eq!(actual(&env).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_load_resumes_without_recopying_finished_tables() {
    let env = Env::start(200_000);
    let exporter1 = client(&env.source).await;
    let snap1 = export(&exporter1).await;

    // Run 1, slowed down so it can be killed half-way through the big table.
    let load = env.load(options(|c| {
        c.parallel = 2;
        c.max_rows_per_sec = 30_000;
    }));
    let mut progress = load.progress();
    let task = tokio::spawn(load.prepare().await.unwrap().run(Some(snap1.clone()), None));
    let at_crash = loop {
        progress.changed().await.unwrap();
        let p = progress.borrow().clone();
        let ev = p.table("public.events").unwrap();
        let others_done = p
            .tables
            .iter()
            .filter(|t| t.table != "public.events" && t.state == TableState::Done)
            .count();
        if ev.chunks_done >= 2 && others_done >= 1 {
            assert!(ev.chunks_done < ev.chunks_total, "killed too late: {ev:?}");
            break p;
        }
    };
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    exporter1.batch_execute("COMMIT").await.unwrap();
    let done_in_run1: Vec<String> = at_crash
        .tables
        .iter()
        .filter(|t| t.state == TableState::Done)
        .map(|t| t.table.clone())
        .collect();

    // The crash left part of events on the shards (whole chunks only) and all of the tables
    // finished before it.
    let events_chunks: i64 = env
        .shards
        .iter()
        .map(|s| {
            count(
                s,
                "SELECT count(*) FROM reshard.fullload_chunks WHERE source_table = 'public.events'",
            )
        })
        .sum();
    assert!(
        events_chunks >= 2,
        "chunks of events recorded: {events_chunks}"
    );
    for s in &env.shards {
        assert_eq!(
            count(s, "SELECT count(*) FROM events"),
            count(
                s,
                "SELECT coalesce(sum(rows), 0) FROM reshard.fullload_chunks \
                 WHERE source_table = 'public.events'"
            ),
            "a shard holds exactly the rows of its committed chunks"
        );
    }

    // The source moves on; a new snapshot (as a temporary slot would give) is later.
    env.source
        .psql(
            "postgres",
            "INSERT INTO events (id, account_id, payload) VALUES (900001, 1, 'new'), (900002, 2, 'new');
             INSERT INTO plans VALUES (21, 'plan 21', 1)",
        )
        .unwrap();
    let exporter2 = client(&env.source).await;
    let snap2 = export(&exporter2).await;
    assert!(snap2.lsn > snap1.lsn);
    let want_events = {
        let (_, cols, _) = TABLES[0];
        let mut v = Vec::new();
        for r in 0..SHARDS {
            v.push(
                digest(
                    &exporter2,
                    &format!("SELECT {cols} FROM events WHERE ((account_id % 3) + 3) % 3 = {r}"),
                )
                .await,
            );
        }
        v
    };

    // Run 2.
    let load2 = env.load(options(|_| {}));
    let progress2 = load2.progress();
    let prepared = load2.prepare().await.expect("prepare run 2");
    for t in &done_in_run1 {
        let p = progress2.borrow().table(t).cloned().unwrap();
        assert_eq!(p.state, TableState::AlreadyDone, "{p:?}");
    }
    let to_copy = prepared.tables_to_copy();
    assert!(to_copy.contains(&"public.events".to_owned()));
    for t in &done_in_run1 {
        assert!(
            !to_copy.contains(t),
            "{t} was finished in run 1 but is copied again"
        );
    }
    let report = prepared
        .run(Some(snap2.clone()), None)
        .await
        .expect("run 2");
    exporter2.batch_execute("COMMIT").await.unwrap();
    for t in &report.tables {
        if done_in_run1.contains(&t.table) {
            assert_eq!(t.chunks_copied, 0, "{t:?}");
            assert_eq!(t.as_of, snap1.lsn, "{t:?}");
        }
    }
    let events = report.table("public.events").unwrap();
    assert!(events.recopied);
    assert_eq!(events.chunks_copied, events.chunks_total);
    assert_eq!(events.as_of, snap2.lsn);
    let skip = report.skip_until(snap1.lsn);
    let table = |t: &str| reshard_engine::pg::sql::TableName::parse(t).unwrap();
    assert_eq!(skip.get(&table("public.events")), Some(&snap2.lsn));
    for t in &done_in_run1 {
        assert!(!skip.contains_key(&table(t)));
    }

    // events: exactly the source as of snapshot 2, no duplicates from run 1.
    let got = actual(&env).await;
    assert_eq!(got[0], want_events);
    // plans finished in run 1: as of snapshot 1 (CDC brings plan 21).
    if done_in_run1.contains(&"public.plans".to_owned()) {
        for s in &env.shards {
            assert_eq!(count(s, "SELECT count(*) FROM plans"), 20);
        }
    }
    for s in &env.shards {
        assert_eq!(
            count(
                s,
                "SELECT count(*) FROM (SELECT id FROM events GROUP BY id HAVING count(*) > 1) d"
            ),
            0
        );
    }
}

/// Measures a 1M-row load into 4 shards once. Run with
/// `cargo test --release -p reshard-cli --test integration snapshot::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_one_million_rows_into_four_shards() {
    let source = PgCluster::start().unwrap();
    source.psql("postgres", SOURCE_DDL).unwrap();
    source
        .psql(
            "postgres",
            "INSERT INTO events (id, account_id, payload, created)
               SELECT g, g % 10000, md5(g::text), '2024-01-01'::timestamptz + g * interval '1 s'
               FROM generate_series(1, 1000000) g; ANALYZE events",
        )
        .unwrap();
    let shards: Vec<PgCluster> = (0..4)
        .map(|_| {
            let c = PgCluster::start().unwrap();
            c.psql("postgres", TARGET_DDL).unwrap();
            c
        })
        .collect();
    let targets = shard_targets(&shards);
    let exporter = client(&source).await;
    let snap = export(&exporter).await;
    let load = FullLoad::new(
        connector(source.url("postgres")),
        targets,
        vec![TableSpec {
            source: TableName::new("public", "events"),
            target: TableName::new("public", "events"),
            mode: TableMode::Sharded {
                key: "account_id".into(),
            },
        }],
        route_mod(4),
        FullLoadOptions::default(),
    );
    let started = std::time::Instant::now();
    let report = load
        .prepare()
        .await
        .unwrap()
        .run(Some(snap), None)
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let rows = report.table("public.events").unwrap().rows;
    assert_eq!(rows, 1_000_000);
    let total: i64 = shards
        .iter()
        .map(|s| count(s, "SELECT count(*) FROM events"))
        .sum();
    assert_eq!(total, 1_000_000);
    println!(
        "full load: {rows} rows into 4 shards in {secs:.2} s = {:.0} rows/s",
        rows as f64 / secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_outage_fails_the_load_naming_the_shard_and_a_rerun_completes() {
    use reshard_engine::error::{Classify, ErrorClass};

    let mut env = Env::start(100_000);
    let exporter1 = client(&env.source).await;
    let snap1 = export(&exporter1).await;
    let load = env.load(options(|c| {
        c.max_rows_per_sec = 30_000;
        c.chunk_rows = 10_000;
    }));
    let mut progress = load.progress();
    let task = tokio::spawn(load.prepare().await.unwrap().run(Some(snap1), None));
    loop {
        progress.changed().await.unwrap();
        if progress
            .borrow()
            .table("public.events")
            .is_some_and(|t| t.chunks_done >= 1)
        {
            break;
        }
    }
    env.shards[1].stop().unwrap();
    let err = task.await.unwrap().expect_err("the load must fail");
    exporter1.batch_execute("COMMIT").await.unwrap();
    let text = err.to_string();
    assert!(
        text.starts_with("shard1: ") || text.contains("cannot connect to shard1"),
        "{text}"
    );
    assert_eq!(err.class(), ErrorClass::Transient, "{text}");

    env.shards[1].restart().unwrap();
    let exporter2 = client(&env.source).await;
    let snap2 = export(&exporter2).await;
    let want = expected(&exporter2).await;
    let report = env
        .load(options(|_| {}))
        .prepare()
        .await
        .unwrap()
        .run(Some(snap2), None)
        .await
        .expect("rerun");
    exporter2.batch_execute("COMMIT").await.unwrap();
    assert!(report.table("public.events").unwrap().recopied);
    // Nothing was written to the source in between, so both snapshots see the same rows.
    assert_eq!(actual(&env).await, want);
}

/// Types that binary COPY may carry (built-ins, an enum, a domain over a built-in, a generated
/// and a dropped column) and types that keep a table in text format (an array of an enum, whose
/// binary form names the enum's OID; a text shard key).
const FORMATS_DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
CREATE TABLE bin (
    id bigint PRIMARY KEY, gone int, account_id int NOT NULL, m mood, p positive, doc jsonb,
    at timestamptz, tags text[], raw bytea, span tstzrange, note text, code char(3), u uuid,
    twice bigint GENERATED ALWAYS AS (id * 2) STORED
);
ALTER TABLE bin DROP COLUMN gone;
CREATE TABLE moods (id bigint PRIMARY KEY, account_id bigint NOT NULL, ms mood[], note text);
CREATE TABLE keyed (code text PRIMARY KEY, account_id text NOT NULL, n int);
";

const FORMATS_SEED: &str = r#"
INSERT INTO bin (id, account_id, m, p, doc, at, tags, raw, span, note, code, u)
  SELECT g, g % 101 - 50, (ARRAY['sad','ok','happy']::mood[])[1 + g % 3],
         CASE WHEN g % 7 = 0 THEN NULL ELSE g * 0.25 END,
         jsonb_build_object('g', g, 't', E'tab\there', 'n', NULL),
         '2024-01-01 00:00:00+00'::timestamptz + g * interval '37 s',
         ARRAY['a' || g, NULL, E'q"\\'], decode(md5(g::text), 'hex'),
         tstzrange('2024-01-01', '2024-01-01'::timestamptz + g * interval '1 h'),
         CASE WHEN g % 5 = 0 THEN NULL ELSE E'line\nnext\\N ☃ ' || g END,
         'c' || (g % 10), md5(g::text)::uuid
  FROM generate_series(1, 3000) g;
INSERT INTO moods SELECT g, g % 13, ARRAY['ok', 'happy']::mood[], E'x\ty' || g
  FROM generate_series(1, 500) g;
INSERT INTO keyed SELECT 'k' || g, (g % 17)::text, g FROM generate_series(1, 500) g;
ANALYZE;
"#;

/// Per table (with its columns): the shard digests.
async fn format_digests(c: &Client, shard: Option<usize>) -> Vec<String> {
    let mut out = Vec::new();
    for (t, cols) in [
        (
            "bin",
            "id, account_id, m, p, doc, at, tags, raw, span, note, code, u, twice",
        ),
        ("moods", "id, account_id, ms, note"),
        ("keyed", "code, account_id, n"),
    ] {
        let filter = shard
            .map(|r| {
                format!(" WHERE ((account_id::bigint % {SHARDS}) + {SHARDS}) % {SHARDS} = {r}")
            })
            .unwrap_or_default();
        out.push(digest(c, &format!("SELECT {cols} FROM {t}{filter}")).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_text_copies_load_the_same_rows() {
    use reshard_engine::snapshot::CopyFormat;
    let source = PgCluster::start().expect("source cluster");
    source.psql("postgres", FORMATS_DDL).expect("source DDL");
    source.psql("postgres", FORMATS_SEED).expect("seed");
    let shards: Vec<PgCluster> = (0..SHARDS)
        .map(|_| {
            let c = PgCluster::start().expect("shard cluster");
            c.psql("postgres", FORMATS_DDL).expect("target DDL");
            c
        })
        .collect();
    let specs: Vec<TableSpec> = ["bin", "moods", "keyed"]
        .iter()
        .map(|t| TableSpec {
            source: TableName::new("public", *t),
            target: TableName::new("public", *t),
            mode: TableMode::Sharded {
                key: "account_id".into(),
            },
        })
        .collect();
    let exporter = client(&source).await;
    let mut want = Vec::new();
    for r in 0..SHARDS {
        want.push(format_digests(&exporter, Some(r)).await);
    }
    // Text everywhere, then binary where the types allow, into emptied shards.
    for (binary_copy, bin_format) in [(false, CopyFormat::Text), (true, CopyFormat::Binary)] {
        for s in &shards {
            s.psql(
                "postgres",
                "TRUNCATE bin, moods, keyed; \
                 DO $$ BEGIN DELETE FROM reshard.fullload_chunks; \
                 EXCEPTION WHEN undefined_table THEN NULL; END $$",
            )
            .unwrap();
        }
        let snap = export(&exporter).await;
        let targets = shard_targets(&shards);
        let report = FullLoad::new(
            connector(source.url("postgres")),
            targets,
            specs.clone(),
            route_mod(SHARDS as i64),
            options(|c| {
                c.binary_copy = binary_copy;
                c.chunk_rows = 1000;
            }),
        )
        .prepare()
        .await
        .expect("prepare")
        .run(Some(snap), None)
        .await
        .expect("full load");
        exporter.batch_execute("COMMIT").await.unwrap();
        let formats: Vec<CopyFormat> = report.tables.iter().map(|t| t.format).collect();
        assert_eq!(
            formats,
            vec![bin_format, CopyFormat::Text, CopyFormat::Text],
            "binary_copy = {binary_copy}: {report:?}"
        );
        assert_eq!(report.table("public.bin").unwrap().rows, 3000);
        for (r, s) in shards.iter().enumerate() {
            assert_eq!(
                format_digests(&client(s).await, None).await,
                want[r],
                "shard{r} with binary_copy = {binary_copy}"
            );
        }
    }
}
