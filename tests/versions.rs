//! Sources and targets of different PostgreSQL majors (12..18), through the real `reshard run`
//! daemon: full load, live changes, a transaction larger than every in-memory limit, a key move
//! and a cutover, every shard compared with its share of the source by PostgreSQL's own hash
//! partitioning.
//!
//! The servers come from `scripts/fetch-postgres <major>...` (the harness names the script when
//! a major is missing). CI fetches 13, 16, 17 and 18 and runs the CI-sized subset (13 -> 17,
//! 18 -> 16); the rest of the matrix is `#[ignore]`d:
//! `scripts/fetch-postgres all && cargo test -p reshard-cli --test integration versions -- --include-ignored`.
//!
//! See: issue #12, "PostgreSQL 12 to 18".

use std::time::Duration;

use reshard_harness::PgCluster;

use crate::common::{wait_for, Topology};

/// Written everywhere; `total` is a stored generated column (published by PostgreSQL 18 with
/// `publish_generated_columns = stored`, computed by every target, never written by reshard).
const SCHEMA: &str = "
CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE events (
    account_id bigint NOT NULL,
    id bigint NOT NULL,
    kind text,
    amount numeric,
    doc jsonb,
    total numeric GENERATED ALWAYS AS (amount * 2) STORED,
    PRIMARY KEY (account_id, id)
);
CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL);
";

const TABLES: &[crate::common::TableCheck<'static>] = &[
    ("accounts", Some(("account_id", "bigint")), "account_id"),
    ("events", Some(("account_id", "bigint")), "account_id, id"),
    ("plans", None, "id"),
];

/// Rows of the large transaction: about 6 MB of change data, far above the spill log's memory
/// tail (64 KiB here) and the source's `logical_decoding_work_mem` (64 kB: PostgreSQL 14+
/// streams it in progress, 12/13 send it whole at commit).
const LARGE_TXN_ROWS: u32 = 40_000;

fn major_of(c: &PgCluster) -> u32 {
    c.server_version_num().expect("server_version_num") / 10000
}

/// Waits until the daemon streams from the slot; panics with its log if it exits first.
fn wait_streaming(t: &mut Topology, d: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let active = t.source_sql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard' AND active",
        );
        if active == "1" {
            return;
        }
        assert!(
            t.is_running(d),
            "daemon exited before streaming:\n{}",
            t.all_logs()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the slot is not streaming after 120 s:\n{}",
            t.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The scenario every pair of majors runs.
fn migrate(source: u32, targets: &[u32]) {
    let mut t = Topology::start_majors(source, targets, |major| match major {
        // logical_decoding_work_mem is PostgreSQL 13+ (12 holds 4096 changes per transaction).
        12 => PgCluster::builder(),
        _ => PgCluster::builder().setting("logical_decoding_work_mem", "64kB"),
    });
    assert_eq!(major_of(&t.source), source);
    for (s, m) in t.shards.iter().zip(targets) {
        assert_eq!(major_of(s), *m);
    }
    t.ddl_everywhere(SCHEMA);
    if source >= 18 {
        // An operator's publication that publishes stored generated columns: reshard uses it
        // as it is and must still never write `total` on a target.
        t.source_sql(
            "CREATE PUBLICATION reshard FOR TABLE accounts, events, plans \
             WITH (publish_via_partition_root = true, publish_generated_columns = stored)",
        );
    }
    // Full load.
    t.source_sql("INSERT INTO plans VALUES (1, 'free'), (2, 'pro')");
    t.source_sql("INSERT INTO accounts SELECT a, 'acct ' || a FROM generate_series(1, 60) a");
    t.source_sql(
        "INSERT INTO events SELECT a, i, 'load', i * 1.25, jsonb_build_object('a', a, 'i', i) \
         FROM generate_series(1, 60) a, generate_series(1, 50) i",
    );
    t.write_config_spill(
        "memory_tail_bytes = 65536\nsegment_bytes = 1048576\n",
        "[[tables]]\nname = \"public.accounts\"\n\n[[tables]]\nname = \"public.events\"\n\n\
         [[tables]]\nname = \"public.plans\"\nmode = \"broadcast\"\n",
    );
    // Preflight speaks every major's catalog.
    let cfg = t.config_path();
    let (code, out, err) = t.reshard(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "check on PostgreSQL {source} -> {targets:?}:\n{out}\n{err}"
    );
    let d = t.spawn_run(&[]);
    wait_streaming(&mut t, d);
    t.wait_converged(TABLES, Duration::from_secs(120));

    // Live changes.
    t.source_sql(
        "INSERT INTO events SELECT a, 100 + i, 'live', i, '{\"live\":true}' \
         FROM generate_series(1, 60) a, generate_series(1, 5) i",
    );
    t.source_sql("UPDATE events SET amount = amount + 1, kind = 'upd' WHERE id % 7 = 0");
    t.source_sql("DELETE FROM events WHERE id % 11 = 0");
    t.source_sql("UPDATE accounts SET name = name || ' (renamed)' WHERE account_id % 5 = 0");
    t.source_sql(
        "INSERT INTO plans VALUES (3, 'enterprise'); UPDATE plans SET name = 'Free' WHERE id = 1",
    );
    // Key moves: rows change account, hence (mostly) shard.
    t.source_sql(
        "UPDATE events SET account_id = account_id + 1000 WHERE id = 3 AND account_id <= 20",
    );
    t.source_sql(
        "UPDATE accounts SET account_id = account_id + 1000 WHERE account_id IN (7, 8, 9)",
    );
    // One large transaction.
    t.source_sql(&format!(
        "INSERT INTO events SELECT 1 + (i % 60), 1000000 + i, 'bulk', i, \
         jsonb_build_object('pad', repeat('x', 100)) FROM generate_series(1, {LARGE_TXN_ROWS}) i"
    ));
    t.wait_converged(TABLES, Duration::from_secs(180));

    // Nothing generated was written: the targets computed `total` themselves.
    for (i, s) in t.shards.iter().enumerate() {
        let wrong = s
            .psql(
                "app",
                "SELECT count(*) FROM events WHERE total IS DISTINCT FROM amount * 2",
            )
            .unwrap();
        assert_eq!(wrong, "0", "shard{i}: generated column out of step");
    }

    // Heartbeats: the source writes only to a table outside the publication; every shard's
    // progress still reaches that position (on 12/13 pgoutput sends no logical message, so the
    // position comes from the walsender's keepalives).
    t.source_sql(
        "CREATE TABLE unpublished (x int); INSERT INTO unpublished SELECT generate_series(1, 1000)",
    );
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    t.wait(
        &format!("every shard's progress to pass {written} by heartbeats"),
        Duration::from_secs(60),
        || {
            t.shards
                .iter()
                .all(|s| {
                    s.psql(
                        "app",
                        &format!("SELECT coalesce(bool_and(end_lsn >= '{written}'::pg_lsn), false) FROM reshard.progress"),
                    )
                    .is_ok_and(|v| v == "t")
                })
                .then_some(())
        },
    );

    // Cutover of shard0 while the daemon runs.
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        cfg.to_str().unwrap(),
        "--shard",
        "shard0",
        "--timeout",
        "120",
        "--json",
    ]);
    assert_eq!(
        code,
        0,
        "cutover on a PostgreSQL {source} source:\n{out}\n{err}\n{}",
        t.all_logs()
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("cutover --json");
    assert_eq!(report["ok"], true, "{out}");

    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    let code = t.terminate(d, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "SIGTERM must be a clean exit:\n{}",
        t.all_logs()
    );
    // The slot can be dropped: nothing left behind.
    wait_for("the slot to be inactive", Duration::from_secs(30), || {
        let active = t.source_sql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard' AND active",
        );
        (active == "0").then_some(())
    });
}

/// The upgrade people move off old servers with: PostgreSQL 13 (pgoutput protocol 1: no
/// logical messages, no streaming) into 17. Runs in CI.
#[test]
fn pg13_source_to_pg17_shards() {
    migrate(13, &[17, 17]);
}

/// PostgreSQL 18 (publishes stored generated columns) into 16 (protocol 4 source, older
/// targets). Runs in CI.
#[test]
fn pg18_source_to_pg16_shards() {
    migrate(18, &[16, 16]);
}

/// 15 into 18 targets.
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg15_source_to_pg18_shards() {
    migrate(15, &[18, 18]);
}

/// The oldest source: PostgreSQL 12 into 16.
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg12_source_to_pg16_shards() {
    migrate(12, &[16, 16]);
}

/// 14 (protocol 2) into 15.
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg14_source_to_pg15_shards() {
    migrate(14, &[15, 15]);
}

/// A downgrade: 16 into 12 targets.
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg16_source_to_pg12_shards() {
    migrate(16, &[12, 12]);
}

/// 17 into 14, mixed with a 18 shard.
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg17_source_to_pg14_and_pg18_shards() {
    migrate(17, &[14, 18]);
}

/// `check` on a PostgreSQL 18 source WARNs that `idle_replication_slot_timeout` would
/// invalidate the slot of a stopped reshard, with the fix; after the fix it passes that line.
#[test]
fn check_warns_on_idle_replication_slot_timeout() {
    let t = Topology::start_majors(18, &[18], |_| PgCluster::builder());
    t.ddl_everywhere(SCHEMA);
    t.source_sql("ALTER SYSTEM SET idle_replication_slot_timeout = '1d'");
    t.source_sql("SELECT pg_reload_conf()");
    wait_for(
        "the setting to be reloaded",
        Duration::from_secs(10),
        || (t.source_sql("SHOW idle_replication_slot_timeout") == "1d").then_some(()),
    );
    t.write_config("");
    let cfg = t.config_path();
    let line = |t: &Topology| {
        let (_, out, err) = t.reshard(&["check", "-c", cfg.to_str().unwrap(), "--json"]);
        let report: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("check --json: {e}\n{out}\n{err}"));
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == "idle_replication_slot_timeout")
            .cloned()
            .unwrap_or_else(|| panic!("no idle_replication_slot_timeout line: {report:#}"))
    };
    let warn = line(&t);
    assert_eq!(warn["status"], "warn", "{warn}");
    assert!(warn["detail"].as_str().unwrap().contains("1d"), "{warn}");
    let fix = warn["fix"].as_str().expect("a fix");
    t.source_sql(fix.split(';').next().unwrap());
    t.source_sql("SELECT pg_reload_conf()");
    wait_for(
        "the setting to be reloaded",
        Duration::from_secs(10),
        || (t.source_sql("SHOW idle_replication_slot_timeout") == "0").then_some(()),
    );
    let pass = line(&t);
    assert_eq!(pass["status"], "pass", "{pass}");
}

/// A write fence on a partitioned source table (ChartMogul's shape): rows of the fenced shard's
/// accounts are refused in every partition, a row moved across partitions too, the others
/// written, and unfencing opens it again. PostgreSQL 12 has no BEFORE row triggers on
/// partitioned tables; the fence must still hold there.
async fn fence_on_a_partitioned_table(major: u32) {
    let t = Topology::start_majors(major, &[major, major], |_| PgCluster::builder());
    assert_eq!(major_of(&t.source), major);
    t.source_sql(
        "CREATE TABLE events (account_id bigint NOT NULL, id bigint NOT NULL, kind text, \
           PRIMARY KEY (account_id, id)) PARTITION BY RANGE (id); \
         CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (MINVALUE) TO (1000); \
         CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (1000) TO (MAXVALUE); \
         CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL)",
    );
    t.write_config(
        "[[tables]]\nname = \"public.events\"\n\n[[tables]]\nname = \"public.plans\"\nmode = \"broadcast\"\n",
    );
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["fence", "-c", c, "--shard", "shard1"]);
    assert_eq!(code, 0, "PostgreSQL {major}: {out}\n{err}");
    let app = crate::ops::connect(&t.source.url("app")).await;
    let (mut refused, mut written) = (0, 0);
    for acct in 1..=20i64 {
        let fenced = crate::ops::shard_of(&t, acct) == 1;
        for id in [acct, 1000 + acct] {
            let r = app
                .execute("INSERT INTO events VALUES ($1, $2, 'x')", &[&acct, &id])
                .await;
            match r {
                Ok(_) => {
                    assert!(!fenced, "PostgreSQL {major}: account {acct} (shard1) written into partition of id {id}");
                    written += 1;
                }
                Err(e) => {
                    assert!(fenced, "PostgreSQL {major}: account {acct}: {e:?}");
                    assert_eq!(crate::common::sqlstate(&e), "RSF01", "{e:?}");
                    refused += 1;
                }
            }
        }
    }
    assert!(
        refused > 0 && written > 0,
        "refused {refused}, written {written}"
    );
    // A row of another shard's account moved into shard1's accounts, across partitions.
    let a0 = (1..=20)
        .find(|a| crate::ops::shard_of(&t, *a) == 0)
        .unwrap();
    let a1 = (1..=20)
        .find(|a| crate::ops::shard_of(&t, *a) == 1)
        .unwrap();
    let e = app
        .execute(
            &format!("UPDATE events SET account_id = {a1}, id = 5000 WHERE account_id = {a0} AND id = {a0}"),
            &[],
        )
        .await
        .expect_err("a row moved into shard1's accounts");
    assert_eq!(crate::common::sqlstate(&e), "RSF01", "{e:?}");
    let e = app
        .execute("TRUNCATE events", &[])
        .await
        .expect_err("TRUNCATE removes shard1's rows too");
    assert_eq!(crate::common::sqlstate(&e), "RSF01", "{e:?}");
    app.execute("INSERT INTO plans VALUES (1, 'free')", &[])
        .await
        .expect("broadcast tables are not fenced");
    let (code, out, err) = t.reshard(&["unfence", "-c", c, "--shard", "shard1", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let removed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(removed["removed"]["refused"], refused + 2, "{removed:#}");
    app.execute("INSERT INTO events VALUES ($1, 2000, 'after')", &[&a1])
        .await
        .expect("unfenced");
}

/// See: issue #15. PostgreSQL 13 (CI): the fence's BEFORE row trigger on the partitioned parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_on_a_partitioned_table_pg13() {
    fence_on_a_partitioned_table(13).await;
}

/// See: issue #15. PostgreSQL 12: no BEFORE row triggers on partitioned tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
async fn fence_on_a_partitioned_table_pg12() {
    fence_on_a_partitioned_table(12).await;
}

/// A PostgreSQL 12 source cannot publish a partitioned table: `check` FAILs it by name with the
/// fix and `run` refuses before anything is created (exit 2), instead of passing the check and
/// then dying on CREATE PUBLICATION's raw error (found by an outside-user run).
#[test]
#[ignore = "full version matrix: scripts/fetch-postgres all, then --include-ignored"]
fn pg12_source_with_a_partitioned_table_is_refused_by_check_and_run() {
    let t = Topology::start_majors(12, &[15], |_| PgCluster::builder());
    t.source_sql(
        "CREATE TABLE events (account_id bigint NOT NULL, id bigint NOT NULL, kind text, \
           PRIMARY KEY (account_id, id)) PARTITION BY HASH (account_id); \
         CREATE TABLE events_0 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE events_1 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
    );
    t.shards_sql(
        "CREATE TABLE events (account_id bigint NOT NULL, id bigint NOT NULL, kind text, \
           PRIMARY KEY (account_id, id))",
    );
    t.write_config("");
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["check", "-c", c]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("public.events is a partitioned table: PostgreSQL 12 cannot publish"),
        "{out}"
    );
    let (code, _, err) = t.reshard(&["run", "-c", c]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot publish partitioned tables") && err.contains("public.events"),
        "{err}"
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots")
            .trim(),
        "0",
        "nothing was created"
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_publication").trim(),
        "0"
    );
}
