//! `[snapshot] mode = "watermark"` through the real `reshard run` daemon: a full load in
//! key-ordered chunks, each under its own short snapshot, while a live writer changes the
//! tables being copied. See: issue #16 ("Watermark chunks (no long-held snapshot)").
//!
//! Correctness is judged by PostgreSQL's own hash partitioning (`satisfies_hash_partition`),
//! never by reshard's routing code.

use std::time::Duration;

use crate::common::Topology;
use crate::robust::{seed, Writer, SCHEMA, TABLES};

/// Chunk records of `table` on shard `s`: `chunk_id|snapshot|last?` lines in chunk order.
pub(crate) fn chunks(t: &Topology, s: usize, table: &str) -> Vec<String> {
    let out = t.shards[s]
        .psql(
            "app",
            &format!(
                "SELECT chunk_id || '|' || snapshot || '|' || (key_last IS NULL) \
                 FROM reshard.watermark_chunks WHERE source_table = '{table}' ORDER BY chunk_id"
            ),
        )
        .unwrap_or_default();
    out.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(crate) fn finished(t: &Topology, table: &str) -> bool {
    (0..t.shards.len()).all(|s| {
        chunks(t, s, table)
            .last()
            .is_some_and(|l| l.ends_with("|true"))
    })
}

fn int(t: &Topology, sql: &str) -> i64 {
    let v = t.source_sql(sql);
    v.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {v:?}: {e}"))
}

/// A load of 90k rows under a live writer: the source's `backend_xmin` and the slot's
/// `catalog_xmin` pass a transaction committed mid-load, a VACUUM mid-load removes every dead
/// row it made, a kill -9 mid-load resumes after the last chunk every shard holds, and every
/// shard ends equal to its share. The table without a primary key (`audit`) falls back to the
/// exported snapshot, with a message.
#[test]
fn a_watermark_load_holds_no_snapshot_and_resumes_after_its_last_chunk() {
    let seed = seed();
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 3000) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 197 + 1, g, 'pre' || g, 0 FROM generate_series(1, 90000) g",
    );
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 2000) g");
    // Not replicated (UNLOGGED): only its dead rows matter.
    t.source_sql(
        "CREATE UNLOGGED TABLE churn (id int PRIMARY KEY, n int); \
         INSERT INTO churn SELECT g, 0 FROM generate_series(1, 1000) g",
    );
    t.source_sql("VACUUM ANALYZE");
    // ~30k rows per shard at 2000 rows/s: the load takes about 15 s.
    t.write_config(
        "[snapshot]\nmode = \"watermark\"\nparallel = 2\nchunk_rows = 1000\nmax_rows_per_sec = 2000\n",
    );
    let writer = Writer::start(t.source.url("app"), seed, false);
    let d = t.spawn_run(&[]);
    t.wait(
        "3 chunks of items on every shard",
        Duration::from_secs(60),
        || {
            (0..3)
                .all(|s| chunks(&t, s, "public.items").len() >= 3)
                .then_some(())
        },
    );
    assert!(
        !finished(&t, "public.items"),
        "the load finished too early to observe it:\n{}",
        t.all_logs()
    );
    // Changes to preloaded rows in chunks already copied and still to come: updates, deletes
    // and primary-key moves (account_id is part of the key).
    t.source_sql(
        "UPDATE items SET n = n + 1, name = name || 'm' WHERE id % 50 = 0 AND id < 1000000",
    );
    t.source_sql("DELETE FROM items WHERE id % 97 = 0 AND id < 1000000");
    t.source_sql(
        "UPDATE items SET account_id = account_id + 7 WHERE id % 113 = 0 AND id < 1000000",
    );
    t.source_sql(
        "UPDATE plans SET name = name || 'm' WHERE id % 7 = 0; DELETE FROM plans WHERE id % 11 = 0",
    );

    // The horizon: a transaction committed now is below every backend's xmin and the slot's
    // catalog_xmin a little later, while chunks are still being copied.
    let mark = int(&t, "SELECT txid_current() % 4294967296");
    t.source_sql("UPDATE churn SET n = n + 1");
    t.wait(
        "the xmin horizon to pass a mid-load commit",
        Duration::from_secs(30),
        || {
            // A checkpoint logs the running transactions, from which the slot's catalog_xmin moves.
            t.source_sql("CHECKPOINT");
            let held = int(
                &t,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
                 AND backend_xmin IS NOT NULL AND backend_xmin::text::bigint <= {mark}"
                ),
            );
            let catalog = int(
                &t,
                "SELECT coalesce(catalog_xmin::text::bigint, 0) FROM pg_replication_slots \
             WHERE slot_name = 'reshard'",
            );
            (held == 0 && catalog > mark).then_some(())
        },
    );
    // VACUUM removes the dead rows of the UPDATE above.
    t.wait(
        "VACUUM to remove the mid-load dead rows",
        Duration::from_secs(30),
        || {
            t.source_sql("VACUUM churn");
            let dead = int(
                &t,
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'churn'",
            );
            (dead == 0).then_some(())
        },
    );
    assert!(
        !finished(&t, "public.items"),
        "the horizon and VACUUM were only checked after the load:\n{}",
        t.all_logs()
    );
    let log = t.last_log();
    assert!(
        log.contains("falls back to the exported snapshot") && log.contains("audit"),
        "no fallback message for audit (no primary key):\n{log}"
    );

    // kill -9 mid-load; the next run resumes after the chunks every shard holds.
    t.kill9(d);
    let before: Vec<Vec<String>> = (0..3).map(|s| chunks(&t, s, "public.items")).collect();
    assert!(
        !finished(&t, "public.items"),
        "killed after the load:\n{}",
        t.all_logs()
    );
    let agreed = before.iter().map(Vec::len).min().unwrap_or(0);
    assert!(agreed >= 3, "{before:?}");
    let d = t.spawn_run(&[]);
    t.wait(
        "the resumed load to finish",
        Duration::from_secs(90),
        || t.last_log().contains("full load done").then_some(()),
    );
    let log = t.last_log();
    assert!(
        log.contains("resuming the watermark load"),
        "the second run did not resume:\n{log}"
    );
    for (s, old) in before.iter().enumerate() {
        let now = chunks(&t, s, "public.items");
        assert_eq!(
            now[..agreed],
            old[..agreed],
            "shard{s}: chunks every shard held before the kill were copied again"
        );
        assert!(now.len() > agreed, "shard{s}: {now:?}");
    }
    assert!(finished(&t, "public.items") && finished(&t, "public.plans"));

    let commits = writer.finish();
    assert!(
        commits > 100,
        "the writer made too little progress ({commits} commits)"
    );
    t.wait_converged(TABLES, Duration::from_secs(120));
    t.stop_cleanly(d);
}

/// The watermark load from PostgreSQL 13 (pgoutput protocol 1, no logical messages: nothing
/// of the watermark travels through the stream) into 17, under a live writer.
#[test]
fn a_watermark_load_from_postgres_13_converges() {
    let mut t = Topology::start_majors(13, &[17, 17], |_| reshard_harness::PgCluster::builder());
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 500) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 197 + 1, g, 'pre' || g, 0 FROM generate_series(1, 20000) g",
    );
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 500) g");
    t.write_config(
        "[snapshot]\nmode = \"watermark\"\nchunk_rows = 1000\nmax_rows_per_sec = 5000\n",
    );
    let writer = Writer::start(t.source.url("app"), seed(), false);
    let d = t.spawn_run(&[]);
    t.wait("the load to finish", Duration::from_secs(90), || {
        t.last_log().contains("full load done").then_some(())
    });
    t.source_sql("UPDATE items SET n = n + 1 WHERE id % 10 = 0 AND id < 1000000");
    let commits = writer.finish();
    assert!(
        commits > 10,
        "the writer made too little progress ({commits} commits)"
    );
    assert!(finished(&t, "public.items") && chunks(&t, 0, "public.items").len() >= 20);
    t.wait_converged(TABLES, Duration::from_secs(120));
    t.stop_cleanly(d);
}

/// The load's rate in watermark mode next to the exported mode and raw COPY pipes, on the same
/// clusters in the same run: 1M rows into 4 shards. The raw pipe per shard is `COPY (SELECT …
/// WHERE account_id % 4 = s) TO STDOUT` streamed into the shard's `COPY … FROM STDIN`, all four
/// at once (no routing, no chunking, no records). Run with
/// `cargo test --release -p reshard-cli --test integration watermark::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_watermark_load_against_exported_and_raw_copy() {
    use reshard_engine::config::{SnapshotConfig, SnapshotMode};
    use reshard_engine::snapshot::{FullLoad, FullLoadOptions, TableMode, TableName, TableSpec};
    use reshard_harness::PgCluster;

    use crate::snapshot::{
        client, connector, count, export, route_mod, shard_targets, SOURCE_DDL, TARGET_DDL,
    };

    const ROWS: i64 = 1_000_000;
    let source = PgCluster::start().unwrap();
    source.psql("postgres", SOURCE_DDL).unwrap();
    source
        .psql(
            "postgres",
            &format!(
                "INSERT INTO events (id, account_id, payload, created)
                   SELECT g, g % 10000, md5(g::text), '2024-01-01'::timestamptz + g * interval '1 s'
                   FROM generate_series(1, {ROWS}) g"
            ),
        )
        .unwrap();
    source.psql("postgres", "VACUUM ANALYZE events").unwrap();
    let shards: Vec<PgCluster> = (0..4)
        .map(|_| {
            let c = PgCluster::start().unwrap();
            c.psql("postgres", TARGET_DDL).unwrap();
            c
        })
        .collect();
    let reset = || {
        for s in &shards {
            s.psql(
                "postgres",
                "TRUNCATE events; DROP SCHEMA IF EXISTS reshard CASCADE; CHECKPOINT",
            )
            .unwrap();
        }
    };
    let cols = "id, account_id, payload, created, marker";
    let mut results = Vec::new();
    for (label, mode, chunk_rows) in [
        ("exported", SnapshotMode::Exported, 250_000),
        ("watermark", SnapshotMode::Watermark, 250_000),
        ("watermark, 20k-row chunks", SnapshotMode::Watermark, 20_000),
    ] {
        reset();
        let targets = shard_targets(&shards);
        let options = FullLoadOptions::from_config(&SnapshotConfig {
            mode,
            chunk_rows,
            ..SnapshotConfig::default()
        })
        .unwrap();
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
            options,
        );
        let exporter = client(&source).await;
        let started = std::time::Instant::now();
        let prepared = load.prepare().await.unwrap();
        let snap = if prepared.needs_snapshot() {
            Some(export(&exporter).await)
        } else {
            None
        };
        let report = prepared.run(snap, None).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(report.table("public.events").unwrap().rows, ROWS as u64);
        let total: i64 = shards
            .iter()
            .map(|s| count(s, "SELECT count(*) FROM events"))
            .sum();
        assert_eq!(total, ROWS, "{label}");
        results.push((label.to_owned(), secs));
    }

    // Raw COPY pipes, one per shard, concurrently: psql | psql.
    reset();
    let psql = reshard_harness::bindir().unwrap().join("psql");
    let started = std::time::Instant::now();
    let pipes: Vec<std::process::Child> = shards
        .iter()
        .enumerate()
        .map(|(s, shard)| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "set -e; '{p}' -X -q '{src}' -c 'COPY (SELECT {cols} FROM events WHERE account_id % 4 = {s}) TO STDOUT' \
                     | '{p}' -X -q '{dst}' -c 'COPY events ({cols}) FROM STDIN'",
                    p = psql.display(),
                    src = source.url("postgres"),
                    dst = shard.url("postgres"),
                ))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut p in pipes {
        assert!(p.wait().unwrap().success());
    }
    let secs = started.elapsed().as_secs_f64();
    let total: i64 = shards
        .iter()
        .map(|s| count(s, "SELECT count(*) FROM events"))
        .sum();
    assert_eq!(total, ROWS);
    results.push(("raw COPY pipes (psql | psql)".to_owned(), secs));

    let raw = results.last().map_or(1.0, |r| r.1);
    println!("full load of {ROWS} rows into 4 shards (same clusters, same run):");
    for (label, secs) in &results {
        println!(
            "  {label:<28} {secs:>7.2} s  {:>9.0} rows/s  {:.2} of raw COPY",
            ROWS as f64 / secs,
            raw / secs
        );
    }
}
