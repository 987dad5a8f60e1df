//! "Run it like a service", end to end: the real `reshard run` daemon over a real source and
//! three shards, observed with the real `psql` on its admin console and raw HTTP on its metrics
//! endpoint. Every value checked is produced by the daemon from real data (row counts decided
//! by PostgreSQL's own hash partitioning, LSNs read back and compared), nothing is stubbed.

use std::collections::HashMap;
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reshard_engine::lsn::Lsn;
use reshard_harness::workload::SCHEMA_SQL;

use crate::common::{http_get, port_of, sample, wait_for, Topology};

/// A table compared between source and shards: (table, shard key and its type, order).
type Compared = (
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static str,
);

/// Tables compared between source and shards.
const TABLES: &[Compared] = &[
    ("accounts", Some(("account_id", "bigint")), "account_id"),
    (
        "customers",
        Some(("account_id", "bigint")),
        "account_id, id",
    ),
    ("plans", None, "id"),
];

/// `psql -h 127.0.0.1 -p PORT -U reshard reshard -c SQL`: unaligned, `|`-separated, headers.
pub(crate) fn psql(port: u16, sql: &str) -> Output {
    let bin = reshard_harness::bindir()
        .expect("PostgreSQL bindir")
        .join("psql");
    Command::new(bin)
        .args(["-X", "-w", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "reshard"])
        .args(["-c", sql, "reshard"])
        .env_remove("PGSERVICE")
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGPASSFILE", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

/// Rows of a `SHOW` as maps column → value; panics with psql's stderr on failure.
fn show(port: u16, sql: &str) -> Vec<HashMap<String, String>> {
    let o = psql(port, sql);
    assert!(
        o.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = out.lines().filter(|l| !l.is_empty());
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_owned)
        .collect();
    lines
        .filter(|l| !(l.starts_with('(') && l.ends_with(')')))
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split('|').map(str::to_owned))
                .collect()
        })
        .collect()
}

/// Waits until the console's `SHOW STATUS` says the daemon streams and is ready.
fn wait_streaming(admin: u16) {
    wait_for(
        "SHOW STATUS to say streaming and ready",
        Duration::from_secs(60),
        || {
            let o = psql(admin, "SHOW STATUS");
            let s = String::from_utf8_lossy(&o.stdout);
            (o.status.success() && s.contains("phase|streaming") && s.contains("ready|true"))
                .then_some(())
        },
    );
}

/// `SHOW STATUS` as key → value.
fn status(port: u16) -> HashMap<String, String> {
    show(port, "SHOW STATUS")
        .into_iter()
        .map(|r| (r["key"].clone(), r["value"].clone()))
        .collect()
}

/// `SHOW SHARDS` keyed by shard name.
fn shards(port: u16) -> HashMap<String, HashMap<String, String>> {
    show(port, "SHOW SHARDS")
        .into_iter()
        .map(|r| (r["name"].clone(), r))
        .collect()
}

fn applied(port: u16, shard: &str) -> Lsn {
    shards(port)[shard]["applied_lsn"]
        .parse()
        .expect("applied_lsn is an LSN")
}

const SHARD0_INSERTS: &str = "reshard_shard_rows_applied_total{shard=\"shard0\",kind=\"insert\"}";
const SOURCE_CHANGES: &str = "reshard_source_changes_total";

/// Source rows of `customers` named `wave` that PostgreSQL's hash partitioning puts on `shard`.
fn wave_rows_for(t: &Topology, helper: &str, wave: &str, shard: usize) -> u64 {
    t.source_sql(&format!(
        "SELECT count(*) FROM customers WHERE name = '{wave}' \
         AND satisfies_hash_partition('{helper}'::regclass, 3, {shard}, account_id)"
    ))
    .parse()
    .expect("a count")
}

/// Every SHOW command answers over the real `psql` with the daemon's real state; `/metrics`
/// counters move with the data; `PAUSE shard1` holds back exactly shard1 while the others keep
/// applying; `RESUME shard1` catches it up; `SHUTDOWN` stops the daemon with exit 0.
#[test]
fn console_and_metrics_follow_the_real_daemon() {
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA_SQL);
    t.source_sql(
        "INSERT INTO plans (id, name, price_cents) SELECT p, 'plan ' || p, p * 100 FROM generate_series(1, 3) p; \
         INSERT INTO accounts (account_id, name, plan_id) SELECT a, 'Account ' || a, 1 + a % 3 FROM generate_series(1, 60) a; \
         INSERT INTO customers (account_id, email, name) SELECT a, 'c@a' || a || '.example', 'wave0' FROM generate_series(1, 60) a",
    );
    let config = std::fs::read_to_string(t.write_config("")).expect("config");
    let (admin, metrics) = (port_of(&config, "listen"), port_of(&config, "metrics"));
    let d = t.spawn_run(&[]);

    // Streaming, as SHOW STATUS tells it.
    wait_streaming(admin);
    t.wait_converged(TABLES, Duration::from_secs(60));
    let helper = t.create_route_helper("bigint");

    let st = status(admin);
    assert_eq!(st["slot"], "reshard");
    assert_eq!(st["publication"], "reshard");
    assert_eq!(st["shards"], "3");
    assert_eq!(st["shards_running"], "3");
    assert_eq!(
        st["tables"], "6",
        "the six tables of the multi-tenant schema: {st:?}"
    );
    assert_eq!(st["source_connected"], "true");
    assert_eq!(
        st["system_id"],
        t.source_sql("SELECT system_identifier FROM pg_control_system()"),
        "SHOW STATUS names the source's system id"
    );
    let confirmed: Lsn = st["confirmed_flush_lsn"].parse().expect("an LSN");
    assert!(confirmed > Lsn::ZERO, "{st:?}");

    let tables: HashMap<String, HashMap<String, String>> = show(admin, "SHOW TABLES")
        .into_iter()
        .map(|r| (r["name"].clone(), r))
        .collect();
    assert_eq!(tables.len(), 6, "{tables:?}");
    let accounts = &tables["public.accounts"];
    assert_eq!(accounts["mode"], "sharded");
    assert_eq!(accounts["state"], "done");
    assert_eq!(
        accounts["rows_copied"], "60",
        "the full load copied every account: {accounts:?}"
    );
    assert_eq!(tables["public.customers"]["rows_copied"], "60");
    assert_eq!(tables["public.plans"]["mode"], "broadcast");
    assert_eq!(tables["public.plans"]["state"], "done");

    let sh = shards(admin);
    let mut names: Vec<&String> = sh.keys().collect();
    names.sort();
    assert_eq!(names, ["shard0", "shard1", "shard2"]);
    for (name, row) in &sh {
        assert_eq!(row["state"], "running", "{name}: {row:?}");
    }

    let lag = show(admin, "SHOW LAG");
    assert_eq!(
        lag.iter().map(|r| r["shard"].as_str()).collect::<Vec<_>>(),
        ["shard0", "shard1", "shard2"]
    );
    for r in &lag {
        let _: Lsn = r["applied_lsn"].parse().expect("an LSN");
        let _: f64 = r["p99_ms"].parse().expect("a latency");
    }

    let spill = show(admin, "SHOW SPILL");
    assert_eq!(spill.len(), 1);
    assert_eq!(spill[0]["dir"], t.spill_dir().display().to_string());
    let durable: Lsn = spill[0]["durable_lsn"].parse().expect("an LSN");
    assert!(durable > Lsn::ZERO, "{spill:?}");

    let json = show(admin, "SHOW STATUS JSON");
    assert_eq!(json.len(), 1, "one JSON value: {json:?}");
    let value = json[0].values().next().expect("a column");
    let v: serde_json::Value = serde_json::from_str(value).expect("SHOW STATUS JSON is JSON");
    assert_eq!(v["phase"], "streaming");
    let json_shards: Vec<&str> = v["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(json_shards, ["shard0", "shard1", "shard2"]);
    assert_eq!(v["tables"].as_array().map(Vec::len), Some(6));

    // Health and readiness.
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200, "ready while streaming");

    // Wave 1: counters and applied LSNs move with the data.
    let (code, m) = http_get(metrics, "/metrics");
    assert_eq!(code, 200);
    let (ins0, changes0) = (sample(&m, SHARD0_INSERTS), sample(&m, SOURCE_CHANGES));
    let before: Vec<Lsn> = ["shard0", "shard1", "shard2"]
        .iter()
        .map(|s| applied(admin, s))
        .collect();
    t.source_sql(
        "INSERT INTO customers (account_id, email, name) \
         SELECT a, 'w1@a' || a || '.example', 'wave1' FROM generate_series(1, 90) a",
    );
    let to_shard0 = wave_rows_for(&t, &helper, "wave1", 0);
    assert!(to_shard0 > 0);
    t.wait_converged(TABLES, Duration::from_secs(60));
    wait_for(
        "the metrics to count wave 1",
        Duration::from_secs(15),
        || {
            let m = http_get(metrics, "/metrics").1;
            let (ins, changes) = (sample(&m, SHARD0_INSERTS), sample(&m, SOURCE_CHANGES));
            (ins == ins0 + to_shard0 && changes == changes0 + 90).then_some(())
        },
    );
    for (i, s) in ["shard0", "shard1", "shard2"].iter().enumerate() {
        let after = applied(admin, s);
        assert!(
            after > before[i],
            "{s}: applied LSN did not move ({} → {after})",
            before[i]
        );
    }

    // PAUSE shard1: the others keep applying, shard1 stands still.
    let o = psql(admin, "PAUSE shard1");
    assert!(
        o.status.success(),
        "PAUSE: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for("shard1 to be paused", Duration::from_secs(15), || {
        (shards(admin)["shard1"]["state"] == "paused").then_some(())
    });
    let paused_at = applied(admin, "shard1");
    let shard1_rows = t.shards[1]
        .psql("app", "SELECT count(*) FROM customers")
        .expect("count");
    t.source_sql(
        "INSERT INTO customers (account_id, email, name) \
         SELECT a, 'w2@a' || a || '.example', 'wave2' FROM generate_series(1, 90) a; \
         UPDATE accounts SET name = name || ' (renamed)'",
    );
    assert!(
        wave_rows_for(&t, &helper, "wave2", 1) > 0,
        "wave 2 has rows for shard1"
    );
    wait_for(
        "shards 0 and 2 to apply wave 2 while shard1 is paused",
        Duration::from_secs(60),
        || {
            [0usize, 2]
                .iter()
                .all(|&s| {
                    TABLES.iter().all(|(tb, key, ord)| {
                        let (a, b) = t.digests(tb, *key, ord, s);
                        a == b
                    })
                })
                .then_some(())
        },
    );
    // Give shard1 time it would use if it were not paused.
    std::thread::sleep(Duration::from_secs(1));
    let sh = shards(admin);
    assert_eq!(sh["shard1"]["state"], "paused");
    assert_eq!(
        applied(admin, "shard1"),
        paused_at,
        "a paused shard applies nothing"
    );
    assert_eq!(
        t.shards[1]
            .psql("app", "SELECT count(*) FROM customers")
            .expect("count"),
        shard1_rows,
        "shard1's data does not change while paused"
    );
    let (src, dst) = t.digests(
        "customers",
        Some(("account_id", "bigint")),
        "account_id, id",
        1,
    );
    assert_ne!(src, dst, "shard1 is behind the source while paused");
    let lag1 = show(admin, "SHOW LAG")
        .into_iter()
        .find(|r| r["shard"] == "shard1")
        .expect("shard1");
    assert!(
        lag1["lag_bytes"].parse::<u64>().expect("bytes") > 0,
        "{lag1:?}"
    );
    assert_eq!(lag1["state"], "paused");

    // RESUME shard1: it catches up.
    let o = psql(admin, "RESUME shard1");
    assert!(
        o.status.success(),
        "RESUME: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.wait_converged(TABLES, Duration::from_secs(60));
    wait_for(
        "shard1 to run again past its paused position",
        Duration::from_secs(15),
        || {
            let sh = shards(admin);
            let lsn: Lsn = sh["shard1"]["applied_lsn"].parse().ok()?;
            (sh["shard1"]["state"] == "running" && lsn > paused_at).then_some(())
        },
    );
    // Idle and caught up: no lag, in bytes or seconds, on any shard.
    wait_for(
        "an idle, caught-up daemon to report zero lag",
        Duration::from_secs(20),
        || {
            show(admin, "SHOW LAG")
                .iter()
                .all(|r| r["lag_bytes"] == "0" && r["lag_seconds"] == "0.000")
                .then_some(())
        },
    );
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());

    // SHUTDOWN on the console: a clean exit 0, and the console is gone.
    let _ = psql(admin, "SHUTDOWN");
    let code = t.wait_exit(d, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "SHUTDOWN must be a clean exit 0:\n{}",
        t.all_logs()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", admin)).is_err(),
        "the admin console still listens after SHUTDOWN"
    );
}

/// Rows of `customers` on shard `i`.
fn shard_rows(t: &Topology, i: usize) -> u64 {
    t.shards[i]
        .psql("app", "SELECT count(*) FROM customers")
        .expect("count")
        .parse()
        .expect("a count")
}

/// `PAUSE shard1` answers only once shard1 is paused: with a writer keeping every shard busy,
/// `SHOW SHARDS` says `paused` as soon as the answer is in, and from then on shard1 commits
/// nothing (its applied LSN and rows stand still while the others go on applying). `PAUSE`
/// (reading from the source) likewise answers once the ingest stopped reading.
#[test]
fn pause_answers_once_the_shard_is_paused() {
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA_SQL);
    t.source_sql(
        "INSERT INTO plans (id, name, price_cents) SELECT p, 'plan ' || p, p * 100 FROM generate_series(1, 3) p; \
         INSERT INTO accounts (account_id, name, plan_id) SELECT a, 'Account ' || a, 1 + a % 3 FROM generate_series(1, 60) a",
    );
    let config = std::fs::read_to_string(t.write_config("")).expect("config");
    let admin = port_of(&config, "listen");
    let _d = t.spawn_run(&[]);
    wait_streaming(admin);
    t.wait_converged(TABLES, Duration::from_secs(60));

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let source = &t.source;
        let stop = &stop;
        scope.spawn(move || {
            // One transaction after another, each with rows for every shard.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                source
                    .psql(
                        "app",
                        "INSERT INTO customers (account_id, email, name) \
                         SELECT 1 + g % 60, 'busy' || g || '@a.example', 'busy' FROM generate_series(1, 300) g",
                    )
                    .expect("the writer's insert");
            }
        });
        // The writer stops when this ends, also on a failed assertion.
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(stop);
        let t = &t;
        // shard1 is applying the writer's transactions.
        let start = shard_rows(t, 1);
        wait_for(
            "shard1 to apply the writer's rows",
            Duration::from_secs(60),
            || (shard_rows(t, 1) > start + 600).then_some(()),
        );

        let o = psql(admin, "PAUSE shard1");
        assert!(
            o.status.success(),
            "PAUSE shard1: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Answered: shard1 is paused already, and commits nothing from here on.
        let sh = shards(admin);
        assert_eq!(
            sh["shard1"]["state"],
            "paused",
            "SHOW SHARDS right after PAUSE shard1 answered: {:?}; NOTICE: {}",
            sh["shard1"],
            String::from_utf8_lossy(&o.stderr)
        );
        let paused_lsn: Lsn = sh["shard1"]["applied_lsn"].parse().expect("an LSN");
        let paused_rows = shard_rows(t, 1);
        // shard0 applies several more of the writer's transactions meanwhile.
        let shard0 = shard_rows(t, 0);
        wait_for(
            "shard0 to go on applying while shard1 is paused",
            Duration::from_secs(60),
            || (shard_rows(t, 0) > shard0 + 600).then_some(()),
        );
        assert_eq!(
            shard_rows(t, 1),
            paused_rows,
            "shard1 committed rows after PAUSE shard1 answered"
        );
        assert_eq!(
            applied(admin, "shard1"),
            paused_lsn,
            "shard1's applied LSN moved after PAUSE shard1 answered"
        );

        // PAUSE (the source): answered once the ingest stopped reading.
        let o = psql(admin, "PAUSE");
        assert!(
            o.status.success(),
            "PAUSE: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let st = status(admin);
        assert_eq!(
            st["phase"], "paused",
            "SHOW STATUS right after PAUSE answered: {st:?}"
        );
    });
    for cmd in ["RESUME", "RESUME shard1"] {
        let o = psql(admin, cmd);
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    t.wait_converged(TABLES, Duration::from_secs(120));
}
