//! Reverse replication and rollback (issue #15): after a fenced cutover of a shard, the writes
//! the application makes there stream back to the source (exactly once, never looping back to
//! the shard), and `reshard rollback` makes the source authoritative again.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reshard_engine::config::Config;
use reshard_engine::ops::fence::{self, FenceSide, FENCE_SQLSTATE};
use reshard_harness::workload::FillSpec;

use crate::common::{http_get, port_of, sample, sqlstate, TableCheck, Topology};
use crate::ops::{connect, shard_of, topology_with_data};

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

/// `reshard rollback --shard shard1 --json --timeout <timeout>` with the topology's config.
fn rollback_of_shard1(t: &Topology, timeout: &str) -> (i32, String, String) {
    let cfg = t.config_path();
    t.reshard(&[
        "rollback",
        "-c",
        cfg.to_str().unwrap(),
        "--shard",
        "shard1",
        "--json",
        "--timeout",
        timeout,
    ])
}

/// `reshard cutover -c <config> --shard shard1 --fence --json --timeout <timeout>`: exit code,
/// stdout, stderr.
fn fenced_cutover_of_shard1(t: &Topology, timeout: &str) -> (i32, String, String) {
    let cfg = t.config_path();
    t.reshard(&[
        "cutover",
        "-c",
        cfg.to_str().unwrap(),
        "--shard",
        "shard1",
        "--fence",
        "--json",
        "--timeout",
        timeout,
    ])
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
    let (code, out, err) = fenced_cutover_of_shard1(&t, "60");
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

    let (code, out, err) = rollback_of_shard1(&t, "60");
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
    // The console says the truth about the rolled-back stream: no longer running, and where
    // it ended (the source's progress row `reverse:shard1`), nothing behind; not 0/0.
    let admin = port_of(&std::fs::read_to_string(t.config_path()).unwrap(), "listen");
    let mut row = None;
    for _ in 0..60 {
        let rows = console_rows(admin, "SHOW REVERSE").await;
        if let Some(r) = rows.into_iter().find(|r| r["state"] == "rolled_back") {
            row = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = row.expect("SHOW REVERSE never showed shard1 rolled back");
    let end =
        t.source_sql("SELECT commit_lsn FROM reshard.progress WHERE shard = 'reverse:shard1'");
    assert_ne!(end, "0/0");
    assert_eq!(r["shard"], "shard1", "{r:?}");
    assert_eq!(r["stream"], "", "{r:?}");
    assert_eq!(r["applied_lsn"], end, "{r:?}");
    assert_eq!(r["received_lsn"], end, "{r:?}");
    assert_eq!(r["lag_bytes"], "0", "{r:?}");
    assert!(
        r["rows_inserted"].parse::<usize>().unwrap() >= mine.len(),
        "the stream's figures of this run: {r:?}"
    );
    // A rerun converges to the same state.
    let (code, out, err) = rollback_of_shard1(&t, "60");
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
        let (code, out, err) = fenced_cutover_of_shard1(&t, "60");
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

/// Where the application sends a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source = 0,
    Shard = 1,
}

/// The cycle's phases, as the application's flag and the test see them.
const BEFORE: usize = 0;
/// `reshard cutover --fence` runs; the flag still sends S's accounts to the source.
const CUTTING_OVER: usize = 1;
/// The flag flipped: S's accounts are written on S.
const ON_SHARD: usize = 2;
/// `reshard rollback` runs; the flag still sends S's accounts to S.
const ROLLING_BACK: usize = 3;
/// The flag flipped back: S's accounts are written on the source again.
const BACK: usize = 4;
const PHASE_NAMES: [&str; 5] = ["before", "cutting_over", "on_shard", "rolling_back", "back"];

/// An application that follows a per-shard flag: writes (inserts, updates, deletes) for the
/// accounts of the cut-over shard go to the source in phases `BEFORE`/`CUTTING_OVER`/`BACK`
/// and to the shard in `ON_SHARD`/`ROLLING_BACK`; every other account is written on the
/// source throughout. It counts what went through and what the fence refused, per phase and
/// side; anything else (another error, a refusal of another shard's account) is a violation.
struct App {
    phase: Arc<AtomicUsize>,
    /// The phase the writer last read (every statement of an older phase has ended).
    seen: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// `[phase * 2 + side]`.
    written: Arc<Vec<AtomicU64>>,
    refused: Arc<Vec<AtomicU64>>,
    violations: Arc<Mutex<Vec<String>>>,
    handle: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(source_url: String, shard_url: String, accounts: i64, mine: Vec<i64>) -> App {
        let cells = || Arc::new((0..10).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let phase = Arc::new(AtomicUsize::new(BEFORE));
        let seen = Arc::new(AtomicUsize::new(BEFORE));
        let stop = Arc::new(AtomicBool::new(false));
        let (written, refused) = (cells(), cells());
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (p, sn, st, w, r, v) = (
            phase.clone(),
            seen.clone(),
            stop.clone(),
            written.clone(),
            refused.clone(),
            violations.clone(),
        );
        let handle = tokio::spawn(async move {
            let src = connect(&source_url).await;
            let shard = connect(&shard_url).await;
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) {
                n += 1;
                let acct = (n % accounts as u64) as i64 + 1;
                let ph = p.load(Ordering::SeqCst);
                sn.store(ph, Ordering::SeqCst);
                let is_mine = mine.contains(&acct);
                let side = if is_mine && (ph == ON_SHARD || ph == ROLLING_BACK) {
                    Side::Shard
                } else {
                    Side::Source
                };
                let client = if side == Side::Shard { &shard } else { &src };
                let kind = format!("p{ph}");
                let res = match n % 10 {
                    3 | 7 => {
                        client
                            .execute(
                                "UPDATE customers SET name = $2 WHERE account_id = $1 \
                                 AND id = (SELECT min(id) FROM customers WHERE account_id = $1)",
                                &[&acct, &format!("{kind} #{n}")],
                            )
                            .await
                    }
                    9 => {
                        client
                            .execute(
                                "DELETE FROM events WHERE account_id = $1 \
                                 AND id = (SELECT min(id) FROM events WHERE account_id = $1)",
                                &[&acct],
                            )
                            .await
                    }
                    _ => {
                        client
                            .execute(
                                "INSERT INTO events (account_id, kind) VALUES ($1, $2)",
                                &[&acct, &kind],
                            )
                            .await
                    }
                };
                let cell = ph * 2 + side as usize;
                match res {
                    Ok(_) => {
                        w[cell].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if sqlstate(&e) == FENCE_SQLSTATE && is_mine => {
                        r[cell].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => v.lock().unwrap().push(format!(
                        "phase {}, {side:?}, account {acct} (shard1's: {is_mine}): {e:?}",
                        PHASE_NAMES[ph]
                    )),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        App {
            phase,
            seen,
            stop,
            written,
            refused,
            violations,
            handle,
        }
    }

    /// Stops the writer and returns its violations.
    async fn stop(&mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        (&mut self.handle).await.expect("the writer task");
        self.violations.lock().unwrap().clone()
    }

    /// Flips the flag and waits until the writer follows it (no statement of the old phase is
    /// still running).
    fn set_phase(&self, t: &Topology, ph: usize) {
        self.phase.store(ph, Ordering::SeqCst);
        t.wait(
            "the writer to follow the flag",
            Duration::from_secs(30),
            || (self.seen.load(Ordering::SeqCst) == ph).then_some(()),
        );
    }

    fn written(&self, ph: usize, side: Side) -> u64 {
        self.written[ph * 2 + side as usize].load(Ordering::SeqCst)
    }

    fn refused(&self, ph: usize, side: Side) -> u64 {
        self.refused[ph * 2 + side as usize].load(Ordering::SeqCst)
    }

    /// Waits for `more` writes that went through in phase `ph` on `side`.
    fn wait_written(&self, t: &Topology, ph: usize, side: Side, more: u64) {
        let from = self.written(ph, side);
        t.wait(
            &format!("{more} writes in phase {} on the {side:?}", PHASE_NAMES[ph]),
            Duration::from_secs(60),
            || (self.written(ph, side) >= from + more).then_some(()),
        );
    }

    fn table(&self) -> String {
        (0..PHASE_NAMES.len())
            .map(|ph| {
                format!(
                    "{:>12}: source {} written / {} refused, shard {} written / {} refused",
                    PHASE_NAMES[ph],
                    self.written(ph, Side::Source),
                    self.refused(ph, Side::Source),
                    self.written(ph, Side::Shard),
                    self.refused(ph, Side::Shard)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Writes one row of `account` on `client` and returns the SQLSTATE it failed with (`None`:
/// written).
async fn probe(client: &tokio_postgres::Client, account: i64) -> Option<String> {
    client
        .execute(
            "INSERT INTO events (account_id, kind) VALUES ($1, 'probe')",
            &[&account],
        )
        .await
        .err()
        .map(|e| sqlstate(&e))
}

/// The value of `series` in the daemon's `/metrics`, `None` when the series is absent.
fn metric(port: u16, series: &str) -> Option<u64> {
    let (_, body) = http_get(port, "/metrics");
    body.contains(&format!("{series} "))
        .then(|| sample(&body, series))
}

/// See: issue #15 (Must show). The whole cycle under a live application that follows a
/// per-shard flag: fence → cutover → flip → writes on S → reverse stream → rollback → flip
/// back → writes on the source (the forward stream carries them to S again), with a kill -9 of
/// the daemon while S takes writes. At the end the source and every shard hold their share;
/// the fence refused the application's writes only while it pointed at the fenced side and
/// only for S's accounts, the source's count and the daemon's metric agree with the
/// application's, and at no moment were S's accounts writable on both sides (the side the flag
/// left is refused, probed after each flip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cycle_under_a_live_writer_fences_each_side_only_while_the_other_takes_writes() {
    let mut t = topology_with_data(3, SPEC).await;
    let config_text = {
        t.write_config("");
        std::fs::read_to_string(t.config_path()).unwrap()
    };
    let metrics = port_of(&config_text, "metrics");
    let d = t.spawn_run(&[]);
    tokio::task::block_in_place(|| t.wait_converged(TABLES, Duration::from_secs(90)));
    let accounts = SPEC.accounts as i64;
    let mine: Vec<i64> = (1..=accounts).filter(|a| shard_of(&t, *a) == 1).collect();
    assert!(mine.len() >= 3, "{mine:?}");
    let src = connect(&t.source.url("app")).await;
    let s1 = connect(&t.shards[1].url("app")).await;

    let mut app = App::start(
        t.source.url("app"),
        t.shards[1].url("app"),
        accounts,
        mine.clone(),
    );
    tokio::task::block_in_place(|| app.wait_written(&t, BEFORE, Side::Source, 100));

    // Fence and cut over while the application still writes shard1's accounts on the source.
    tokio::task::block_in_place(|| app.set_phase(&t, CUTTING_OVER));
    let (code, out, err) = tokio::task::block_in_place(|| fenced_cutover_of_shard1(&t, "120s"));
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["fence"]["step"], "safe", "{r:#}");
    assert!(r["reverse_slot"].is_string(), "{r:#}");

    // The flag flips: shard1's accounts are written on shard1. The source refuses them.
    tokio::task::block_in_place(|| app.set_phase(&t, ON_SHARD));
    let mut source_probes = 0;
    for a in &mine {
        assert_eq!(
            probe(&src, *a).await.as_deref(),
            Some(FENCE_SQLSTATE),
            "account {a} is writable on the source while shard1 takes its writes"
        );
        source_probes += 1;
    }
    tokio::task::block_in_place(|| app.wait_written(&t, ON_SHARD, Side::Shard, 100));
    // The source's count of refusals is final now: it is the application's (+ the probes), and
    // the daemon's metric says the same.
    let refused_on_source = app.refused(CUTTING_OVER, Side::Source) + source_probes;
    assert!(
        app.refused(CUTTING_OVER, Side::Source) > 0,
        "the application never hit the fence during the cutover:\n{}",
        app.table()
    );
    let fences = fence::status(&src, FenceSide::Source).await.unwrap();
    assert_eq!(fences.len(), 1, "{fences:?}");
    assert_eq!(
        fences[0].refused as u64,
        refused_on_source,
        "{}",
        app.table()
    );
    let series = "reshard_fence_refused_writes_total{shard=\"shard1\"}";
    tokio::task::block_in_place(|| {
        t.wait(
            "the daemon's metric to count the source's refusals",
            Duration::from_secs(15),
            || (metric(metrics, series) == Some(refused_on_source)).then_some(()),
        )
    });
    // The reverse stream brings shard1's writes to the source while the application writes.
    tokio::task::block_in_place(|| {
        t.wait(
            "the reverse stream to apply shard1's writes to the source",
            Duration::from_secs(60),
            || {
                let s = t.status_json()?;
                let r = reverse_of(&s, "shard1")?;
                (r["stream"] == "running" && r["rows_inserted_total"].as_u64()? > 0).then_some(())
            },
        )
    });
    // kill -9 of the daemon while the application writes on both sides; the writes made while
    // nothing streams arrive after the restart, each once (the digests at the end).
    t.kill9(d);
    tokio::task::block_in_place(|| app.wait_written(&t, ON_SHARD, Side::Shard, 50));
    let d = t.spawn_run(&[]);

    // Roll back while the application still writes shard1's accounts on shard1.
    tokio::task::block_in_place(|| app.set_phase(&t, ROLLING_BACK));
    let (code, out, err) = tokio::task::block_in_place(|| rollback_of_shard1(&t, "120s"));
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");

    // The flag flips back: shard1's accounts are written on the source; shard1 refuses them.
    tokio::task::block_in_place(|| app.set_phase(&t, BACK));
    let mut shard_probes = 0;
    for a in &mine {
        assert_eq!(
            probe(&s1, *a).await.as_deref(),
            Some(FENCE_SQLSTATE),
            "account {a} is writable on shard1 while the source takes its writes again"
        );
        shard_probes += 1;
    }
    tokio::task::block_in_place(|| app.wait_written(&t, BACK, Side::Source, 150));
    let violations = app.stop().await;
    assert!(violations.is_empty(), "{violations:#?}\n{}", app.table());
    let table = app.table();

    // Refusals only while fenced, only on the side the flag was leaving: the source during the
    // cutover, shard1 during the rollback (only shard1's accounts: see the violations).
    for (ph, name) in PHASE_NAMES.iter().enumerate() {
        for side in [Side::Source, Side::Shard] {
            let allowed = matches!(
                (ph, side),
                (CUTTING_OVER, Side::Source) | (ROLLING_BACK, Side::Shard)
            );
            if !allowed {
                assert_eq!(
                    app.refused(ph, side),
                    0,
                    "refused in phase {name} on the {side:?}:\n{table}"
                );
            }
        }
    }
    // shard1's fence (it stays after the rollback) counted what the application saw there.
    let on_shard = fence::status(&s1, FenceSide::Shard).await.unwrap();
    assert_eq!(on_shard.len(), 1, "{on_shard:?}");
    assert_eq!(
        on_shard[0].refused as u64,
        app.refused(ROLLING_BACK, Side::Shard) + shard_probes,
        "{table}"
    );
    // The source's fence is gone, and so is its series.
    assert!(fence::status(&src, FenceSide::Source)
        .await
        .unwrap()
        .is_empty());
    tokio::task::block_in_place(|| {
        t.wait(
            "the metric of the lifted fence to go",
            Duration::from_secs(15),
            || metric(metrics, series).is_none().then_some(()),
        )
    });

    // The source and every shard hold their share: what shard1 took came back to the source,
    // what the source took after the rollback went forward to shard1.
    tokio::task::block_in_place(|| t.wait_converged(TABLES, Duration::from_secs(120)));
    let list = mine
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for kind in ["p2", "p4"] {
        let q =
            format!("SELECT count(*) FROM events WHERE kind = '{kind}' AND account_id IN ({list})");
        let (on_source, on_shard) = (t.source_sql(&q), t.shards[1].psql("app", &q).unwrap());
        assert_eq!(on_source, on_shard, "{kind}");
        assert_ne!(
            on_source, "0",
            "no {kind} rows of shard1's accounts:\n{table}"
        );
    }
    eprintln!("{table}");
    t.stop_cleanly(d);
}

/// The console's rows of `sql` (simple protocol), as column -> value maps.
async fn console_rows(port: u16, sql: &str) -> Vec<std::collections::HashMap<String, String>> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=reshard dbname=reshard"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("the admin console");
    tokio::spawn(conn);
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn lsn_of(v: &serde_json::Value) -> reshard_engine::Lsn {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an LSN: {v}"))
}

/// See: issue #15. The reverse direction shows wherever the forward one does: `reshard lag`
/// and `reshard status` (live from the daemon, and offline from `reshard.reverse`, the source's
/// progress row `reverse:<S>` and the shard's present), the console's `SHOW REVERSE`, and the
/// metrics `reshard_reverse_applied_lsn` / `_lag_bytes` / `_lag_seconds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reverse_direction_shows_in_lag_status_console_and_metrics_live_and_offline() {
    let mut t = topology_with_data(2, SPEC).await;
    t.write_config("");
    let config_text = std::fs::read_to_string(t.config_path()).unwrap();
    let (admin, metrics) = (
        port_of(&config_text, "listen"),
        port_of(&config_text, "metrics"),
    );
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    tokio::task::block_in_place(|| t.wait_converged(TABLES, Duration::from_secs(90)));
    let (code, out, err) = tokio::task::block_in_place(|| fenced_cutover_of_shard1(&t, "60"));
    assert_eq!(code, 0, "{out}\n{err}");
    tokio::task::block_in_place(|| {
        t.wait(
            "the reverse stream of shard1 to run",
            Duration::from_secs(60),
            || {
                let s = t.status_json()?;
                (reverse_of(&s, "shard1")?["stream"] == "running").then_some(())
            },
        )
    });
    let shard_lsn = |t: &Topology| -> reshard_engine::Lsn {
        t.shards[1]
            .psql("app", "SELECT pg_current_wal_insert_lsn()")
            .unwrap()
            .parse()
            .unwrap()
    };
    let before_writes = shard_lsn(&t);
    let mine = accounts_on(&t, 1);
    t.shards[1]
        .psql(
            "app",
            &format!(
                "SELECT setval('events_id_seq', 1000000); \
                 INSERT INTO events (account_id, kind) SELECT {}, 'on-shard' FROM generate_series(1, 500)",
                mine[0]
            ),
        )
        .unwrap();
    tokio::task::block_in_place(|| t.wait_converged(TABLES, Duration::from_secs(90)));

    // Live: `reshard lag` shows the reverse stream past the writes and caught up. (The
    // digests above do not wait for the source: it may take the writes a moment later.)
    let lag = tokio::task::block_in_place(|| {
        t.wait(
            "reshard lag to show the reverse stream past the writes on shard1",
            Duration::from_secs(60),
            || {
                let (code, out, _) = t.reshard(&["lag", "-c", &c, "--json"]);
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                let applied: reshard_engine::Lsn =
                    v["reverse"][0]["applied_lsn"].as_str()?.parse().ok()?;
                (code == 0 && applied > before_writes).then_some(v)
            },
        )
    });
    assert_eq!(lag["source"], "daemon", "{lag:#}");
    let rev = &lag["reverse"][0];
    assert_eq!(rev["shard"], "shard1", "{lag:#}");
    assert_eq!(rev["state"], "streaming", "{lag:#}");
    tokio::task::block_in_place(|| {
        t.wait("the reverse lag to be 0", Duration::from_secs(30), || {
            let (_, out, _) = t.reshard(&["lag", "-c", &c, "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["reverse"][0]["lag_bytes"] == 0).then_some(())
        })
    });
    let (code, out, _) = t.reshard(&["lag", "-c", &c]);
    assert_eq!(code, 0);
    assert!(
        out.contains("reverse (shard -> source") && out.contains("reshard_rev_shard1_1"),
        "{out}"
    );
    let (code, out, _) = t.reshard(&["status", "-c", &c]);
    assert_eq!(code, 0);
    assert!(
        out.contains("reverse streams") && out.contains("reshard_rev_shard1_1"),
        "{out}"
    );
    // The console.
    let rows = console_rows(admin, "SHOW REVERSE").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r["shard"], "shard1");
    assert_eq!(r["state"], "streaming");
    assert_eq!(r["stream"], "running");
    assert!(
        r["applied_lsn"].parse::<reshard_engine::Lsn>().unwrap() > before_writes,
        "{r:?}"
    );
    assert!(r["rows_inserted"].parse::<u64>().unwrap() >= 500, "{r:?}");
    // The metrics.
    let (_, body) = http_get(metrics, "/metrics");
    assert!(
        sample(&body, "reshard_reverse_applied_lsn{shard=\"shard1\"}") > before_writes.as_u64(),
        "{body}"
    );
    for series in [
        "reshard_reverse_lag_bytes{shard=\"shard1\"}",
        "reshard_reverse_lag_seconds{shard=\"shard1\"}",
        "reshard_reverse_up{shard=\"shard1\"}",
    ] {
        assert!(body.contains(series), "{series} missing:\n{body}");
    }
    assert!(
        sample(
            &body,
            "reshard_reverse_rows_applied_total{shard=\"shard1\",kind=\"insert\"}"
        ) >= 500
    );

    // Offline: the daemon is down; the shard takes more writes. The reverse stream's position
    // is the source's progress row, its lag the shard's WAL since.
    t.stop_cleanly(d);
    let applied: reshard_engine::Lsn = t
        .source_sql("SELECT commit_lsn FROM reshard.progress WHERE shard = 'reverse:shard1'")
        .parse()
        .unwrap();
    assert!(applied > before_writes);
    t.shards[1]
        .psql(
            "app",
            &format!(
                "INSERT INTO events (account_id, kind) SELECT {}, 'while-down' FROM generate_series(1, 200)",
                mine[1]
            ),
        )
        .unwrap();
    let (code, out, err) = t.reshard(&["status", "-c", &c, "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["phase"], "stopped", "{st:#}");
    let rev = reverse_of(&st, "shard1").unwrap_or_else(|| panic!("{st:#}"));
    assert_eq!(rev["state"], "streaming", "{st:#}");
    assert_eq!(rev["stream"], "", "{st:#}");
    assert_eq!(rev["slot"], "reshard_rev_shard1_1", "{st:#}");
    assert_eq!(lsn_of(&rev["applied_lsn"]), applied, "{st:#}");
    let behind = shard_lsn(&t).bytes_since(applied);
    let lag_bytes = rev["lag_bytes"].as_u64().unwrap();
    assert!(
        lag_bytes > 0 && lag_bytes <= behind,
        "{lag_bytes} vs {behind}: {st:#}"
    );
    assert!(rev["lag_seconds"].as_f64().unwrap() > 0.0, "{st:#}");
    let (code, out, err) = t.reshard(&["lag", "-c", &c, "--json"]);
    assert_eq!(code, 0, "{err}");
    let lag: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(lag["source"], "offline", "{lag:#}");
    assert_eq!(
        lsn_of(&lag["reverse"][0]["applied_lsn"]),
        applied,
        "{lag:#}"
    );
    assert!(
        lag["reverse"][0]["lag_bytes"].as_u64().unwrap() > 0,
        "{lag:#}"
    );
    let (code, out, _) = t.reshard(&["status", "-c", &c]);
    assert_eq!(code, 0);
    assert!(out.contains("reshard_rev_shard1_1"), "{out}");

    // Up again: the writes made while it was down come back.
    let d = t.spawn_run(&[]);
    tokio::task::block_in_place(|| t.wait_converged(TABLES, Duration::from_secs(90)));
    t.stop_cleanly(d);
}

/// A partitioned sharded table: the shard's writes to it stream back to the source too. Found
/// by an outside-user run (round four): the reverse publication on the shard published the
/// partitions under their own names (no `publish_via_partition_root`), which the reverse router
/// does not know and skipped, so the shard's writes to a partitioned table never reached the
/// source and a rollback reported ROLLED BACK without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_shards_writes_to_a_partitioned_table_stream_back_to_the_source() {
    let mut t = topology_with_data(2, SPEC).await;
    let ddl = "CREATE TABLE pevents (account_id bigint NOT NULL, id bigint NOT NULL, payload text, \
               PRIMARY KEY (account_id, id)) PARTITION BY HASH (account_id); \
               CREATE TABLE pevents_p0 PARTITION OF pevents FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
               CREATE TABLE pevents_p1 PARTITION OF pevents FOR VALUES WITH (MODULUS 2, REMAINDER 1)";
    t.source_sql(ddl);
    for s in &t.shards {
        s.psql("app", ddl).unwrap();
    }
    t.source_sql(
        "INSERT INTO pevents SELECT account_id, 1, 'source' FROM accounts; \
         INSERT INTO pevents SELECT account_id, 2, 'source' FROM accounts",
    );
    let tables: Vec<TableCheck<'static>> = TABLES
        .iter()
        .copied()
        .chain([("pevents", Some(("account_id", "bigint")), "account_id, id")])
        .collect();
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_converged(&tables, Duration::from_secs(90));
    let config = Config::load(&t.config_path()).unwrap();
    reshard_engine::ops::reverse::begin(&config, "shard1")
        .await
        .unwrap();
    t.wait(
        "the reverse stream of shard1 to run",
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            (reverse_of(&s, "shard1")?["stream"] == "running").then_some(())
        },
    );
    let mine = accounts_on(&t, 1);
    assert!(mine.len() >= 2, "{mine:?}");
    // Inserts, an update and a delete on the shard, across both of its partitions.
    for a in &mine {
        t.shards[1]
            .psql(
                "app",
                &format!("INSERT INTO pevents VALUES ({a}, 3, 'on-shard'); UPDATE pevents SET payload = 'updated on shard' WHERE account_id = {a} AND id = 1; DELETE FROM pevents WHERE account_id = {a} AND id = 2"),
            )
            .unwrap();
    }
    t.wait(
        "the shard's writes to the partitioned table on the source",
        Duration::from_secs(60),
        || {
            let got = t.source_sql(&format!(
                "SELECT count(*) FROM pevents WHERE account_id IN ({}) AND payload IN ('on-shard', 'updated on shard')",
                mine.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
            ));
            let deleted = t.source_sql(&format!(
                "SELECT count(*) = 0 FROM pevents WHERE id = 2 AND account_id IN ({})",
                mine.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
            ));
            (got.trim() == (2 * mine.len()).to_string() && deleted.trim() == "t").then_some(())
        },
    );
    t.wait_converged(&tables, Duration::from_secs(60));
    t.stop_cleanly(d);
}

/// `orders`: one `bigserial` id for every account (the shape R3-1 found), sharded by
/// `account_id`. The source keys its replica identity by `(id, account_id)` (what `check --fix`
/// builds); the shards keep the primary key `id` as theirs, as shards made from the
/// application's schema do.
const ORDERS_SOURCE: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, account_id bigint NOT NULL, amount int NOT NULL); \
     CREATE UNIQUE INDEX orders_id_account ON orders (id, account_id); \
     ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_id_account; \
     INSERT INTO orders (account_id, amount) SELECT account_id, 1 FROM accounts, generate_series(1, 2)";
const ORDERS_SHARD: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, account_id bigint NOT NULL, amount int NOT NULL)";

/// The source's `orders` row `id`: `account_id|amount`, or empty.
fn source_order(t: &Topology, id: i64) -> String {
    t.source_sql(&format!(
        "SELECT account_id || '|' || amount FROM orders WHERE id = {id}"
    ))
}

/// Changes the source's row `id` as the reverse stream's overwrite left it (R3-1), under a
/// `reshard_` origin so the forward stream does not carry it to the shards.
fn diverge_on_source(t: &Topology, id: i64, account: i64) {
    let sql = format!(
        "SELECT pg_replication_origin_create('reshard_test_diverge') \
           WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'reshard_test_diverge'); \
         SELECT pg_replication_origin_session_setup('reshard_test_diverge'); \
         SET session_replication_role = replica; \
         UPDATE orders SET account_id = {account} WHERE id = {id}"
    );
    // A session holds the origin until its backend has exited: the previous call's may still
    // be on its way out ("replication origin with ID n is already active for PID m").
    t.wait(
        "the test's replication origin to be free",
        Duration::from_secs(30),
        || match t.source.psql("app", &sql) {
            Ok(_) => Some(()),
            Err(e) if e.to_string().contains("is already active") => None,
            Err(e) => panic!("source SQL failed: {e}"),
        },
    );
}

/// Waits until shard1's reverse stream reports an error containing `needle`; panics at once if
/// `overwritten` says the source's row was changed instead.
fn wait_reverse_error(
    t: &Topology,
    needle: &str,
    overwritten: impl Fn() -> Option<String>,
) -> String {
    t.wait(
        &format!("the reverse stream of shard1 to halt on {needle}"),
        Duration::from_secs(60),
        || {
            if let Some(what) = overwritten() {
                panic!("the reverse stream changed another account's row on the source: {what}");
            }
            let s = t.status_json()?;
            let e = reverse_of(&s, "shard1")?["last_error"].as_str()?.to_owned();
            e.contains(needle).then_some(e)
        },
    )
}

/// See: R3-1 (found by an outside-user run). A cut-over shard and the source draw ids from
/// their own copies of one sequence; once the source has used up `[cutover] sequence_gap`,
/// they hand out the same ids to different accounts. The reverse stream must never replace,
/// update or delete the source's row of another account: it halts, loudly (status, SHOW
/// REVERSE, logs; rollback refuses), with nothing lost, and resumes by itself once the operator
/// has renumbered the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_cut_over_shard_shares_with_the_source_never_overwrite_another_accounts_row() {
    let mut t = topology_with_data(2, SPEC).await;
    t.source_sql(ORDERS_SOURCE);
    t.shards_sql(ORDERS_SHARD);
    let mut tables = TABLES.to_vec();
    tables.push(("orders", Some(("account_id", "bigint")), "id"));
    t.write_config("[cutover]\nsequence_gap = 10\n");
    let d = t.spawn_run(&[]);
    t.wait_converged(&tables, Duration::from_secs(90));
    let cfg = t.config_path();
    let c = cfg.to_str().unwrap().to_owned();
    let (code, out, err) = fenced_cutover_of_shard1(&t, "60");
    assert_eq!(code, 0, "{out}\n{err}");
    t.wait(
        "the reverse stream of shard1 to run",
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            (reverse_of(&s, "shard1")?["stream"] == "running").then_some(())
        },
    );
    let (mine, other) = (accounts_on(&t, 1), accounts_on(&t, 0));
    // The ids the source can still hand out before it reaches shard1's: the gap.
    let headroom = |want: i64| {
        t.wait(
            &format!("shard1's sequence headroom to be {want}"),
            Duration::from_secs(30),
            || {
                let s = t.status_json()?;
                let r = reverse_of(&s, "shard1")?.clone();
                (r["sequence_headroom"].as_i64()? == want).then_some(r)
            },
        )
    };
    let r = headroom(10);
    assert!(r["sequence_warning"].is_null(), "{r:#}");

    // The source goes on numbering shard0's orders past the gap …
    t.source_sql(&format!(
        "INSERT INTO orders (account_id, amount) SELECT {}, 1 FROM generate_series(1, 30)",
        other[0]
    ));
    // … which status, SHOW REVERSE and the log warn about.
    let r = headroom(-20);
    assert_eq!(r["sequence_headroom_of"], "public.orders_id_seq", "{r:#}");
    let w = r["sequence_warning"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:#}"));
    assert!(w.contains("sequence_gap = 10"), "{w}");
    let (code, out, _) = t.reshard(&["status", "-c", &c]);
    assert_eq!(code, 0);
    assert!(
        out.contains("-20 LOW") && out.contains("WARN sequence public.orders_id_seq"),
        "{out}"
    );
    t.wait(
        "the daemon to log the low headroom",
        Duration::from_secs(30),
        || {
            t.all_logs()
                .contains("ids from those shard shard1 hands out")
                .then_some(())
        },
    );
    // … and shard1 numbers its account's order from its copy of the sequence: an id the
    // source has given to shard0's account.
    let x: i64 = t.shards[1]
        .psql(
            "app",
            &format!(
                "INSERT INTO orders (account_id, amount) VALUES ({}, 777) RETURNING id",
                mine[0]
            ),
        )
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let theirs = format!("{}|1", other[0]);
    assert_eq!(source_order(&t, x), theirs, "id {x} is not a collision");
    let e = wait_reverse_error(&t, &format!("(id)=({x})"), || {
        let now = source_order(&t, x);
        (now != theirs).then_some(format!("id {x} is now {now}"))
    });
    eprintln!("the reverse stream's error: {e}");
    for want in [
        "public.orders",
        &format!("account_id {}", other[0]),
        &format!("account_id {}", mine[0]),
        "sequence_gap",
    ] {
        assert!(e.contains(want), "{want:?} missing from: {e}");
    }
    // Still not applied, still the source's row, and the shard keeps its own.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(source_order(&t, x), theirs);
    // SHOW REVERSE and the daemon's log say it too.
    let st = status(&t);
    assert_eq!(
        reverse_of(&st, "shard1").unwrap()["stream"],
        "halted",
        "{st:#}"
    );
    let config_text = std::fs::read_to_string(t.config_path()).unwrap();
    let rows = console_rows(port_of(&config_text, "listen"), "SHOW REVERSE").await;
    let row = rows.iter().find(|r| r["shard"] == "shard1").unwrap();
    assert_eq!(row["stream"], "halted", "{row:?}");
    assert_eq!(row["sequence_headroom"], "-20", "{row:?}");
    assert!(
        row["last_error"].contains(&format!("(id)=({x})")),
        "{row:?}"
    );
    assert!(t.all_logs().contains("halted"), "{}", t.all_logs());
    // The operator's way out (the error's advice): renumber the source's row (the forward
    // stream carries that to shard0) and move shard1's sequence far past the source's.
    t.source_sql(&format!(
        "UPDATE orders SET id = nextval('orders_id_seq') + 100000 WHERE id = {x}"
    ));
    t.shards[1]
        .psql("app", "SELECT setval('orders_id_seq', 1000000)")
        .unwrap();
    t.wait(
        "the reverse stream to resume and apply shard1's order",
        Duration::from_secs(60),
        || (source_order(&t, x) == format!("{}|777", mine[0])).then_some(()),
    );
    t.wait_converged(&tables, Duration::from_secs(90));

    // UPDATE and DELETE of shard1's rows whose id the source holds for another account (as
    // the overwrite left them) are refused the same way.
    let ids: Vec<i64> = t.shards[1]
        .psql(
            "app",
            &format!(
                "INSERT INTO orders (account_id, amount) VALUES ({a}, 2), ({a}, 3) RETURNING id",
                a = mine[0]
            ),
        )
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let (u, del) = (ids[0], ids[1]);
    t.wait(
        "shard1's orders on the source",
        Duration::from_secs(60),
        || (source_order(&t, del) == format!("{}|3", mine[0])).then_some(()),
    );
    diverge_on_source(&t, u, other[0]);
    diverge_on_source(&t, del, other[0]);
    t.shards[1]
        .psql(
            "app",
            &format!("UPDATE orders SET amount = 20 WHERE id = {u}"),
        )
        .unwrap();
    let theirs_u = format!("{}|2", other[0]);
    wait_reverse_error(&t, &format!("(id)=({u})"), || {
        let now = source_order(&t, u);
        (now != theirs_u).then_some(format!("id {u} is now {now}"))
    });
    diverge_on_source(&t, u, mine[0]);
    t.wait("the update to apply", Duration::from_secs(60), || {
        (source_order(&t, u) == format!("{}|20", mine[0])).then_some(())
    });
    t.shards[1]
        .psql("app", &format!("DELETE FROM orders WHERE id = {del}"))
        .unwrap();
    let theirs_d = format!("{}|3", other[0]);
    wait_reverse_error(&t, &format!("(id)=({del})"), || {
        let now = source_order(&t, del);
        (now != theirs_d).then_some(format!("id {del} is now {now:?}"))
    });
    // Rollback refuses instead of waiting out its timeout: the source lacks the delete.
    let (code, out, err) = rollback_of_shard1(&t, "30");
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("halted") && err.contains(&format!("(id)=({del})")),
        "{err}"
    );
    eprintln!("rollback: {err}");
    assert_eq!(source_order(&t, del), theirs_d);
    diverge_on_source(&t, del, mine[0]);
    t.wait("the delete to apply", Duration::from_secs(60), || {
        source_order(&t, del).is_empty().then_some(())
    });

    let (code, out, err) = rollback_of_shard1(&t, "60");
    assert_eq!(code, 0, "{out}\n{err}");
    t.wait_converged(&tables, Duration::from_secs(90));
    t.stop_cleanly(d);
}
