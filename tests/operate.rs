//! The operator's commands against a RUNNING daemon: `status`, `lag`, `verify`, `cutover`
//! while `reshard run` streams a live write load.

use std::time::Duration;

use crate::common::{wait_for, Topology};

const SCHEMA: &str = "
CREATE TABLE orders (account_id bigint NOT NULL, id bigserial, amount numeric, note text,
                     PRIMARY KEY (account_id, id));
CREATE TABLE currencies (code text PRIMARY KEY, name text);
CREATE SEQUENCE invoice_no;
";

const TABLES: &[crate::common::TableCheck<'static>] = &[
    ("orders", Some(("account_id", "bigint")), "account_id, id"),
    ("currencies", None, "code"),
];

/// Two shards with [`SCHEMA`], the currencies and `orders` rows of accounts 0..40 loaded, the
/// daemon streaming and converged: (topology, config path, daemon).
fn migrated_two_shards(orders: u32) -> (Topology, String, usize) {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO currencies VALUES ('EUR', 'Euro'), ('USD', 'Dollar')");
    t.source_sql(&format!("INSERT INTO orders (account_id, amount, note) SELECT a % 40, a, 'n' || a FROM generate_series(1, {orders}) a"));
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    (t, cfg, d)
}

#[test]
fn status_verify_and_cutover_work_against_the_running_daemon() {
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO currencies VALUES ('EUR', 'Euro'), ('USD', 'Dollar')");
    t.source_sql("INSERT INTO orders (account_id, amount, note) SELECT a % 40, a * 1.25, 'n' || a FROM generate_series(1, 2000) a");
    t.source_sql("SELECT setval('invoice_no', 5000)");
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));

    // status asks the daemon: streaming, three shards, the tables.
    let (code, out, err) = t.reshard(&["status", "-c", &cfg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(st["phase"], "streaming", "{out}");
    assert_eq!(st["shards"].as_array().map(|a| a.len()), Some(3), "{out}");
    assert!(
        st["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "public.orders"),
        "{out}"
    );
    let (code, out, err) = t.reshard(&["lag", "-c", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shard0") && out.contains("shard2"), "{out}");

    // A live writer while verify and cutover run.
    let url = t.source.url("app");
    let writer = std::thread::spawn(move || {
        let mut n = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(6);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            while std::time::Instant::now() < deadline {
                c.batch_execute(
                    "INSERT INTO orders (account_id, amount, note) VALUES ((random() * 40)::int, 1, 'live'); \
                     UPDATE orders SET amount = amount + 1 WHERE id = (SELECT max(id) FROM orders)",
                )
                .await
                .unwrap();
                n += 1;
            }
        });
        n
    });
    let (code, out, err) = t.reshard(&["verify", "-c", &cfg, "--timeout", "120"]);
    assert_eq!(
        code,
        0,
        "verify of a live, correct migration must pass:\n{out}\n{err}\n{}",
        t.all_logs()
    );
    let written = writer.join().unwrap();
    assert!(written > 0);

    // The latest write, then cutover: it returns only once shard1 holds it.
    t.source_sql("INSERT INTO orders (account_id, amount, note) SELECT a, 99, 'last' FROM generate_series(1, 40) a");
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard1",
        "--timeout",
        "2m",
        "--json",
    ]);
    assert_eq!(code, 0, "cutover:\n{out}\n{err}\n{}", t.all_logs());
    let (src, dst) = t.digests(
        "orders",
        Some(("account_id", "bigint")),
        "account_id, id",
        1,
    );
    assert_eq!(
        src, dst,
        "cutover returned before shard1 held the latest write"
    );
    let seq = t.shards[1]
        .psql("app", "SELECT last_value FROM invoice_no")
        .unwrap();
    assert!(
        seq.parse::<i64>().unwrap() >= 5000 + 1000,
        "sequence not synced: {seq}"
    );
    let owned = t.shards[1]
        .psql("app", "SELECT last_value FROM orders_id_seq")
        .unwrap();
    let src_owned = t.source_sql("SELECT last_value FROM orders_id_seq");
    assert!(
        owned.parse::<i64>().unwrap() >= src_owned.parse::<i64>().unwrap(),
        "{owned} < {src_owned}"
    );

    // A shard that diverges is caught by verify (exit 1) with the key.
    wait_for(
        "convergence before tampering",
        Duration::from_secs(60),
        || {
            let (a, b) = t.digests(
                "orders",
                Some(("account_id", "bigint")),
                "account_id, id",
                2,
            );
            (a == b).then_some(())
        },
    );
    t.shards[2]
        .psql(
            "app",
            "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders)",
        )
        .unwrap();
    let (code, out, _) = t.reshard(&[
        "verify",
        "-c",
        &cfg,
        "--shard",
        "shard2",
        "--json",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");

    t.stop_cleanly(d);
    // status works with the daemon down, from the databases and the spill directory.
    let (code, out, err) = t.reshard(&["status", "-c", &cfg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["phase"], "stopped", "{out}");
}

// See: issue #11 item 10.
/// `cutover` started while the daemon is still in its full load (no progress row anywhere
/// yet) waits for the load and the shard's progress, saying what it waits for, and succeeds.
#[test]
fn cutover_started_during_the_full_load_waits_for_it_and_succeeds() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO currencies VALUES ('EUR', 'Euro')");
    t.source_sql("INSERT INTO orders (account_id, amount, note) SELECT a % 40, a, 'n' || a FROM generate_series(1, 24000) a");
    // About 6 s of full load per shard.
    let cfg =
        t.write_config("[snapshot]\nparallel = 1\nchunk_rows = 1000\nmax_rows_per_sec = 2000\n");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    t.wait(
        "the daemon to be in its full load",
        Duration::from_secs(60),
        || {
            t.status_json()
                .filter(|s| s["phase"] == "full_load")
                .map(|_| ())
        },
    );
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard0",
        "--timeout",
        "120",
        "--json",
    ]);
    assert_eq!(code, 0, "cutover:\n{out}\n{err}\n{}", t.all_logs());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["verify"]["ok"], true, "{r:#}");
    assert!(
        err.contains("waiting up to") && err.contains("no progress row yet"),
        "cutover must say what it waits for:\n{err}"
    );
    let (src, dst) = t.digests(
        "orders",
        Some(("account_id", "bigint")),
        "account_id, id",
        0,
    );
    assert_eq!(src, dst);
    t.stop_cleanly(d);
}

// See: issue #11 item 11.
/// Migrate, cut over every shard, stop the daemon (SIGTERM), then verify: the shards' progress
/// is behind the source's present and nothing will move it. verify notices that, compares the
/// shards as they are, says so, and returns MATCH instead of waiting for `--timeout`.
#[test]
fn verify_with_the_daemon_stopped_compares_as_is_and_says_so() {
    let (mut t, cfg, d) = migrated_two_shards(2000);
    t.source_sql("UPDATE orders SET note = 'cdc' WHERE id % 7 = 0");
    for shard in ["shard0", "shard1"] {
        let (code, out, err) =
            t.reshard(&["cutover", "-c", &cfg, "--shard", shard, "--timeout", "2m"]);
        assert_eq!(code, 0, "cutover {shard}:\n{out}\n{err}\n{}", t.all_logs());
    }
    t.stop_cleanly(d);
    // The source's WAL moves on past every shard's progress (nothing replicated changes).
    t.source_sql("SELECT pg_logical_emit_message(false, 'test', 'after the daemon stopped')");
    let (code, out, err) = t.reshard(&["verify", "-c", &cfg, "--json", "--timeout", "60"]);
    assert_eq!(code, 0, "verify with the daemon stopped:\n{out}\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["ok"], true, "{r:#}");
    let stale = r["not_applying"].as_array().cloned().unwrap_or_default();
    assert!(
        !stale.is_empty(),
        "the report must say which shards were compared as they were: {r:#}"
    );
    assert!(
        err.contains("waiting up to") && err.contains("no reshard run is up"),
        "verify must say what it waits for and why it stopped waiting:\n{err}"
    );
    // A real difference on such a shard is not called a match: exit 3 (may be unapplied).
    t.shards[1]
        .psql(
            "app",
            "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders)",
        )
        .unwrap();
    t.source_sql("SELECT pg_logical_emit_message(false, 'test', 'again')");
    let (code, out, err) =
        t.reshard(&["verify", "-c", &cfg, "--shard", "shard1", "--timeout", "60"]);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(err.contains("may be changes not applied yet"), "{err}");
    assert!(out.contains("missing"), "{out}");
}

// See: explore R3-5 (`cutover --no-verify` died on a raw 42P01 for such a table).
/// A table created on the source after `reshard run` started is not replicated: `cutover
/// --no-verify` says so with the ways on (exit 1, NOT SAFE), in the same words as `verify`.
#[test]
fn cutover_names_a_table_created_on_the_source_after_run_started() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    t.source_sql("CREATE TABLE unpub (x int); INSERT INTO unpub VALUES (1)");
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard1",
        "--no-verify",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 1, "{out}\n{err}\n{}", t.all_logs());
    let wanted = reshard_engine::pg::catalog::missing_on_shard(
        &reshard_engine::pg::sql::TableName::new("public", "unpub"),
        "shard1",
    );
    assert!(err.contains(&wanted), "{err}");
    assert!(
        err.contains("mode = \"skip\"") && !err.contains("42P01"),
        "{err}"
    );
    // verify says the same.
    let (code, out, err) =
        t.reshard(&["verify", "-c", &cfg, "--shard", "shard1", "--timeout", "60"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains(&wanted) || err.contains(&wanted),
        "verify words it differently:\n{out}\n{err}"
    );
    t.stop_cleanly(d);
}

// See: CI run of f1b133b (reverse::the_reverse_direction_shows_… timed out waiting for the
// reverse lag to be 0: each side's heartbeat moved the other's WAL once a second).
/// A shard with nothing to apply is caught up although its source's WAL keeps moving: `lag`
/// says 0 bytes and 0 s for it between heartbeats, not the WAL written since the last one.
#[test]
fn an_idle_shard_reads_caught_up_while_the_source_wal_moves_without_it() {
    let (mut t, cfg, d) = migrated_two_shards(200);
    // Transactions that change nothing replicated, four a second: the source's WAL (and the
    // slot's confirmed position) moves on, the shards have nothing to do.
    let url = t.source.url("app");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.batch_execute("SELECT txid_current()").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let (mut zero, mut samples) = (0, Vec::new());
    for _ in 0..30 {
        let (code, out, err) = t.reshard(&["lag", "-c", &cfg, "--json"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["source"], "daemon", "{v:#}");
        let lags: Vec<_> = v["shards"]
            .as_array()
            .unwrap_or_else(|| panic!("{v:#}"))
            .iter()
            .map(|s| (s["lag_bytes"].clone(), s["lag_seconds"].clone()))
            .collect();
        if lags.iter().all(|(b, s)| b == 0 && s.as_f64() == Some(0.0)) {
            zero += 1;
        }
        samples.push(lags);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // Between a WAL move and the shard hearing of it (a keepalive, a group commit: tens of
    // ms, more on a loaded machine) the lag is honestly a few bytes; most samples fall outside
    // that window (30 of 30 on a quiet machine). Before, none did (0 of 30): the lag counted
    // from the heartbeat written once a second.
    assert!(
        zero * 3 >= samples.len(),
        "only {zero} of {} samples showed the idle shards caught up: {samples:?}",
        samples.len()
    );
    t.stop_cleanly(d);
}

// See: helper report (operator-mistake sweep): `cutover --fence` with no `reshard run` up
// waited out the whole --timeout (600 s by default) while the source refused the shard's
// accounts' writes.
/// `cutover --fence` while no daemon runs: it says what it waits for, and once no `reshard run`
/// has been up for 20 s while the shard's progress stood still, it stops with exit 3 naming
/// that, the fence and how to lift it, instead of waiting out --timeout. Run again with the
/// daemon up, it resumes and reports SAFE.
#[test]
fn cutover_with_no_daemon_up_stops_instead_of_waiting_out_the_timeout() {
    let (mut t, cfg, d) = migrated_two_shards(400);
    t.stop_cleanly(d);
    // Writes while the daemon is down: every shard is behind.
    t.source_sql("INSERT INTO orders (account_id, amount, note) SELECT a % 40, a, 'down' FROM generate_series(1, 100) a");
    let started = std::time::Instant::now();
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard0",
        "--fence",
        "--timeout",
        "150s",
    ]);
    let took = started.elapsed();
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        took < Duration::from_secs(90),
        "cutover waited {took:?} for a shard nothing applies to:\n{err}"
    );
    for want in [
        "nothing applies its changes",
        "no reshard run is up",
        "reshard unfence --shard shard0",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
    // The fence stayed (as documented); with the daemon up again the same command finishes.
    let d = t.spawn_run(&[]);
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard0",
        "--fence",
        "--timeout",
        "120s",
    ]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    assert!(out.contains("SAFE"), "{out}");
    t.stop_cleanly(d);
}
