//! Reverse replication and rollback (issue #15): after a fenced cutover of a shard, the writes
//! the application makes there stream back to the source (exactly once, never looping back to
//! the shard), and `reshard rollback` makes the source authoritative again.

use std::time::Duration;

use reshard_engine::config::Config;
use reshard_harness::workload::FillSpec;

use crate::common::{TableCheck, Topology};
use crate::ops::topology_with_data;

const SPEC: FillSpec = FillSpec {
    accounts: 24,
    customers: 4,
    events: 6,
    body_bytes: 16,
};

/// Every table of the fixture, sharded ones by `account_id`.
const TABLES: &[TableCheck<'static>] = &[
    ("plans", None, "id"),
    ("accounts", Some(("account_id", "bigint")), "account_id"),
    (
        "customers",
        Some(("account_id", "bigint")),
        "account_id, id",
    ),
    (
        "subscriptions",
        Some(("account_id", "bigint")),
        "account_id, id",
    ),
    ("invoices", Some(("account_id", "bigint")), "account_id, id"),
    ("events", Some(("account_id", "bigint")), "account_id, id"),
];

fn status(t: &Topology) -> serde_json::Value {
    t.wait("the daemon's status", Duration::from_secs(30), || {
        t.status_json()
    })
}

fn reverse_of<'a>(s: &'a serde_json::Value, shard: &str) -> Option<&'a serde_json::Value> {
    s["reverse"]
        .as_array()?
        .iter()
        .find(|r| r["shard"] == shard)
}

fn forward_rows(s: &serde_json::Value) -> Vec<(u64, u64, u64)> {
    s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["rows_inserted_total"].as_u64().unwrap(),
                x["rows_updated_total"].as_u64().unwrap(),
                x["rows_deleted_total"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The accounts shard `i` holds.
fn accounts_on(t: &Topology, i: usize) -> Vec<i64> {
    t.shards[i]
        .psql("app", "SELECT account_id FROM accounts ORDER BY 1")
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Waits until the forward stream has read the source past its present (so a transaction it
/// would send back to a shard has been seen).
fn wait_forward_read_past_now(t: &Topology) {
    let now: reshard_engine::Lsn = t
        .source_sql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    t.wait(
        "the forward stream to read past the source's present",
        Duration::from_secs(30),
        || {
            let s = t.status_json()?;
            let c: reshard_engine::Lsn =
                s["source"]["confirmed_flush_lsn"].as_str()?.parse().ok()?;
            c.covers(now).then_some(())
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_shards_writes_stream_back_to_the_source_exactly_once() {
    let mut t = topology_with_data(2, SPEC).await;
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    let config = Config::load(&t.config_path()).unwrap();

    let row = reshard_engine::ops::reverse::begin(&config, "shard1")
        .await
        .unwrap();
    assert_eq!(row.epoch, 1);
    // Idempotent: a second call (a cutover rerun) keeps the same stream.
    let again = reshard_engine::ops::reverse::begin(&config, "shard1")
        .await
        .unwrap();
    assert_eq!(again, row);
    t.wait(
        "the reverse stream of shard1 to run",
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            (reverse_of(&s, "shard1")?["stream"] == "running").then_some(())
        },
    );
    wait_forward_read_past_now(&t);
    let before = status(&t);
    let changes_before = before["source"]["changes_received_total"].as_u64().unwrap();

    // The cutover moved the shard's sequences past the source's; the test does the same.
    t.shards[1]
        .psql(
            "app",
            "SELECT setval('events_id_seq', 1000000); SELECT setval('customers_id_seq', 1000000)",
        )
        .unwrap();
    // The application writes shard1's accounts on shard1: single rows, a large transaction,
    // updates (the customers' names) and deletes.
    let mine = accounts_on(&t, 1);
    assert!(mine.len() >= 3, "{mine:?}");
    let list = mine
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for a in &mine {
        t.shards[1]
            .psql(
                "app",
                &format!("INSERT INTO events (account_id, kind, payload) VALUES ({a}, 'on-shard', '{{\"n\": 1}}')"),
            )
            .unwrap();
    }
    t.shards[1]
        .psql(
            "app",
            &format!(
                "INSERT INTO events (account_id, kind, body) SELECT {}, 'bulk', repeat('x', 100) FROM generate_series(1, 2000)",
                mine[0]
            ),
        )
        .unwrap();
    t.shards[1]
        .psql(
            "app",
            &format!("UPDATE customers SET name = name || ' (shard)' WHERE account_id IN ({list})"),
        )
        .unwrap();
    t.shards[1]
        .psql(
            "app",
            &format!(
                "DELETE FROM events WHERE account_id = {} AND kind <> 'bulk'",
                mine[1]
            ),
        )
        .unwrap();
    let on_shard: i64 = t.shards[1]
        .psql("app", "SELECT count(*) FROM events WHERE kind = 'bulk'")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(on_shard, 2000);
    t.wait_converged(TABLES, Duration::from_secs(90));

    // No loop: the forward stream received none of the rows the reverse stream wrote on the
    // source, so no shard got them (again).
    wait_forward_read_past_now(&t);
    let after = status(&t);
    assert_eq!(
        after["source"]["changes_received_total"].as_u64().unwrap(),
        changes_before,
        "the forward stream decoded the reverse stream's writes: {after:#}"
    );
    assert_eq!(forward_rows(&after), forward_rows(&before), "{after:#}");
    // The reverse stream's own counters (published with the status, a moment later).
    let want = 2000 + mine.len() as u64;
    let rev = t.wait(
        "the reverse stream's counters",
        Duration::from_secs(10),
        || {
            let s = t.status_json()?;
            let r = reverse_of(&s, "shard1")?.clone();
            (r["rows_inserted_total"].as_u64()? >= want
                && r["rows_updated_total"].as_u64()? >= 1
                && r["rows_deleted_total"].as_u64()? >= 1)
                .then_some(r)
        },
    );
    assert_eq!(rev["state"], "streaming", "{rev:#}");
    assert!(reverse_of(&after, "shard0").is_none(), "{after:#}");

    // kill -9, more writes on the shard while nothing streams, restart: exactly once.
    t.kill9(d);
    t.shards[1]
        .psql(
            "app",
            &format!("UPDATE events SET kind = 'after-crash' WHERE account_id = {} AND kind = 'bulk' AND id % 7 = 0", mine[0]),
        )
        .unwrap();
    t.shards[1]
        .psql(
            "app",
            &format!(
                "INSERT INTO customers (account_id, name) VALUES ({}, 'new while down')",
                mine[2]
            ),
        )
        .unwrap();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    let progress =
        t.source_sql("SELECT count(*) FROM reshard.progress WHERE shard = 'reverse:shard1'");
    assert_eq!(progress, "1");
    t.stop_cleanly(d);
}

/// See: issue #15. The whole way back: a fenced cutover starts the reverse stream, the shard
/// takes writes, `reshard rollback` fences the shard, waits until the source holds them,
/// moves the sequences and unfences the source; the forward stream then carries the source's
/// new writes to the shard. A rerun of the rollback converges to the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_hands_the_shards_accounts_back_to_the_source_with_every_write() {
    let mut t = topology_with_data(2, SPEC).await;
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        c,
        "--shard",
        "shard1",
        "--fence",
        "--json",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["reverse_slot"], "reshard_rev_shard1_1", "{r:#}");
    let mine = accounts_on(&t, 1);
    let insert = |a: i64, kind: &str| {
        format!("INSERT INTO events (account_id, kind) VALUES ({a}, '{kind}')")
    };
    // The source refuses shard1's accounts now; the shard takes them.
    assert!(t.source.psql("app", &insert(mine[0], "refused")).is_err());
    t.wait(
        "the reverse stream of shard1 to run",
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            (reverse_of(&s, "shard1")?["stream"] == "running").then_some(())
        },
    );
    for a in &mine {
        t.shards[1].psql("app", &insert(*a, "on-shard")).unwrap();
    }
    t.shards[1]
        .psql(
            "app",
            &format!(
                "UPDATE customers SET name = 'renamed on the shard' WHERE account_id = {}",
                mine[1]
            ),
        )
        .unwrap();
    let on_shard_max: i64 = t.shards[1]
        .psql("app", "SELECT max(id) FROM events")
        .unwrap()
        .parse()
        .unwrap();

    let (code, out, err) = t.reshard(&[
        "rollback",
        "-c",
        c,
        "--shard",
        "shard1",
        "--json",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["resumed"], false, "{r:#}");
    // Every write the shard took is on the source.
    let on_source: i64 = t
        .source_sql("SELECT count(*) FROM events WHERE kind = 'on-shard'")
        .parse()
        .unwrap();
    assert_eq!(on_source, mine.len() as i64);
    // The shard refuses writes now; the source takes shard1's accounts again, with ids past
    // the shard's (the sequences moved).
    assert!(t.shards[1]
        .psql("app", &insert(mine[0], "refused"))
        .is_err());
    t.source_sql(&insert(mine[0], "back-on-source"));
    let id: i64 = t
        .source_sql("SELECT id FROM events WHERE kind = 'back-on-source'")
        .parse()
        .unwrap();
    assert!(
        id > on_shard_max,
        "source id {id} <= shard's {on_shard_max}"
    );
    // The forward stream carries it to the shard.
    t.wait_converged(TABLES, Duration::from_secs(90));
    assert_eq!(
        t.shards[1]
            .psql(
                "app",
                "SELECT count(*) FROM events WHERE kind = 'back-on-source'"
            )
            .unwrap(),
        "1"
    );
    t.wait(
        "the reverse slot to be dropped",
        Duration::from_secs(30),
        || {
            (t.shards[1]
                .psql("app", "SELECT count(*) FROM pg_replication_slots")
                .ok()?
                == "0")
                .then_some(())
        },
    );
    // A rerun converges to the same state.
    let (code, out, err) = t.reshard(&[
        "rollback",
        "-c",
        c,
        "--shard",
        "shard1",
        "--json",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["resumed"], true, "{r:#}");
    t.source_sql(&insert(mine[1], "still-on-source"));
    t.stop_cleanly(d);
}

/// See: issue #15. A rollback killed right after each of its steps (`RESHARD_CRASH_AT`, test
/// builds only: the process aborts there like a kill -9), then run again, converges: the
/// source holds every write the shard took, the source is unfenced, the shard fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_killed_at_each_step_converges_when_run_again() {
    let mut t = topology_with_data(2, SPEC).await;
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap();
    let mine = accounts_on(&t, 1);
    for (epoch, step) in [
        "rollback:fenced",
        "rollback:draining",
        "rollback:drained",
        "rollback:rolled_back",
        "rollback:unfenced",
    ]
    .iter()
    .enumerate()
    {
        let (code, out, err) = t.reshard(&[
            "cutover",
            "-c",
            c,
            "--shard",
            "shard1",
            "--fence",
            "--json",
            "--timeout",
            "60",
        ]);
        assert_eq!(code, 0, "{step}: {out}\n{err}");
        // The shard was fenced on itself by the previous rollback: the application lifts it
        // as it sends the accounts there again.
        let _ = t.reshard(&["unfence", "-c", c, "--shard", "shard1", "--on", "shard"]);
        t.wait("the reverse stream to run", Duration::from_secs(60), || {
            let s = t.status_json()?;
            let r = reverse_of(&s, "shard1")?;
            (r["stream"] == "running" && r["epoch"] == epoch as i64 + 1).then_some(())
        });
        t.shards[1]
            .psql(
                "app",
                &format!(
                    "INSERT INTO customers (account_id, name) VALUES ({}, '{step}')",
                    mine[0]
                ),
            )
            .unwrap();
        let crashed = std::process::Command::new(crate::common::reshard_bin())
            .args(["rollback", "-c", c, "--shard", "shard1", "--timeout", "60"])
            .env("RESHARD_CRASH_AT", step)
            .output()
            .unwrap();
        assert_eq!(
            crashed.status.code(),
            None,
            "{step}: not aborted: {crashed:?}"
        );
        let (code, out, err) =
            t.reshard(&["rollback", "-c", c, "--shard", "shard1", "--timeout", "60"]);
        assert_eq!(code, 0, "{step}: {out}\n{err}");
        assert_eq!(
            t.source_sql(&format!(
                "SELECT count(*) FROM customers WHERE name = '{step}'"
            )),
            "1",
            "{step}"
        );
        t.source_sql(&format!(
            "INSERT INTO customers (account_id, name) VALUES ({}, 'source after {step}')",
            mine[0]
        ));
        assert!(t.shards[1]
            .psql(
                "app",
                &format!(
                    "INSERT INTO customers (account_id, name) VALUES ({}, 'x')",
                    mine[0]
                )
            )
            .is_err());
    }
    t.wait_converged(TABLES, Duration::from_secs(90));
    t.stop_cleanly(d);
}
