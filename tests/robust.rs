//! Daemon-level robustness of the real `reshard run` binary: kill -9 under load (mid-stream,
//! mid-spill-append, mid-copy), a shard stopped for a long stretch, the spill log's cap, a
//! SIGTERM's final LSNs, and (ignored, slow) one source transaction of more than 1 GB.
//!
//! Correctness is judged by PostgreSQL's own hash partitioning (`satisfies_hash_partition`),
//! never by reshard's routing code. Random choices print their seed; rerun one with
//! `RESHARD_SEED=<seed>`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{dir_bytes, Tmpfs, Topology};

/// `items` has a primary key and no TOASTed column (key moves are allowed); `audit` has no
/// primary key and REPLICA IDENTITY FULL, and every row carries a unique `n`, so a
/// double-applied insert shows as an extra row; `plans` is broadcast.
pub(crate) const SCHEMA: &str = "
CREATE TABLE items (account_id bigint NOT NULL, id bigint NOT NULL, name text, n int,
                    PRIMARY KEY (account_id, id));
CREATE TABLE audit (account_id bigint NOT NULL, msg text, n bigint);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TABLE plans (id bigint PRIMARY KEY, name text NOT NULL);
";

pub(crate) const TABLES: &[crate::common::TableCheck<'static>] = &[
    ("items", Some(("account_id", "bigint")), "account_id, id"),
    (
        "audit",
        Some(("account_id", "bigint")),
        "account_id, n, msg",
    ),
    ("plans", None, "id"),
];

pub(crate) fn seed() -> u64 {
    let seed = std::env::var("RESHARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed = {seed} (rerun with RESHARD_SEED={seed})");
    seed
}

/// A thread committing a random mix of changes to the source until stopped.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

/// Ids handed out by the writer start here so that they never clash with preloaded rows.
const WRITER_ID_BASE: i64 = 1_000_000;

impl Writer {
    /// Starts writing to `url`. With `big`, 100-row and 5000-row transactions are mixed in.
    pub(crate) fn start(url: String, seed: u64, big: bool) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), commits.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(write_loop(url, seed, big, s, c))
        });
        Writer {
            stop,
            commits,
            handle: Some(handle),
        }
    }

    /// Stops the writer; panics with its error if a statement failed.
    pub(crate) fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("the writer failed: {e}"),
                Err(_) => panic!("the writer panicked"),
            }
        }
        self.commits.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn write_loop(
    url: String,
    seed: u64,
    big: bool,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("writer connect: {e}"))?;
    tokio::spawn(conn);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut next: i64 = WRITER_ID_BASE;
    while !stop.load(Ordering::SeqCst) {
        let mut sql = String::from("BEGIN;");
        let statements = if rng.gen_range(0..10) == 0 {
            rng.gen_range(2..6)
        } else {
            1
        };
        for _ in 0..statements {
            let lo = (next - 300).max(WRITER_ID_BASE);
            let pick = if next > lo {
                rng.gen_range(lo..next)
            } else {
                lo
            };
            let acct: i64 = rng.gen_range(1..200);
            let r = rng.gen_range(0..if big { 100 } else { 90 });
            let stmt = match r {
                0..=29 => {
                    next += 1;
                    format!(
                        "INSERT INTO items VALUES ({acct}, {next}, 'i{next}', 0);\
                         INSERT INTO audit VALUES ({acct}, 'ins', {next});"
                    )
                }
                30..=44 => {
                    format!("UPDATE items SET n = n + 1, name = 'u{next}' WHERE id = {pick};")
                }
                45..=54 => format!("DELETE FROM items WHERE id = {pick};"),
                // A key move: the row changes account, hence (mostly) shard.
                55..=64 => format!(
                    "UPDATE items SET account_id = account_id + {} WHERE id = {pick};",
                    rng.gen_range(1..50)
                ),
                65..=67 => {
                    next += 1;
                    format!("INSERT INTO plans VALUES ({next}, 'p{next}');")
                }
                68..=70 => format!("UPDATE plans SET name = name || 'x' WHERE id = {pick};"),
                71..=72 => format!("DELETE FROM plans WHERE id = {pick};"),
                73..=79 => format!("UPDATE audit SET msg = msg || 'u' WHERE n = {pick};"),
                80..=89 => format!("DELETE FROM audit WHERE n = {pick};"),
                90..=97 => {
                    let from = next + 1;
                    next += 100;
                    format!(
                        "INSERT INTO items SELECT g % 199 + 1, g, 'b' || g, 0 FROM generate_series({from}, {next}) g;\
                         INSERT INTO audit SELECT g % 197 + 1, repeat('a', 50), g FROM generate_series({from}, {next}) g;"
                    )
                }
                _ => {
                    let from = next + 1;
                    next += 5000;
                    format!(
                        "INSERT INTO audit SELECT g % 197 + 1, md5(g::text), g FROM generate_series({from}, {next}) g;"
                    )
                }
            };
            sql.push_str(&stmt);
        }
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("writer: {e}\n{sql}"))?;
        commits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..4))).await;
    }
    Ok(())
}

/// Preloads a few rows so that the full load has something to copy.
pub(crate) fn preload(t: &Topology) {
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 20) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, 2000) g",
    );
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 2000) g");
}

/// `SCHEMA` on every cluster, the config written (`spill`: lines for its `[spill]` section)
/// and a daemon that streams, with every shard converged: on the preloaded rows (copied by the
/// full load), or (`preloaded = false`) on one streamed row. Returns the daemon.
fn streaming(t: &mut Topology, spill: &str, preloaded: bool) -> usize {
    t.ddl_everywhere(SCHEMA);
    if preloaded {
        preload(t);
    }
    t.write_config_spill(spill, "");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    if !preloaded {
        t.source_sql("INSERT INTO plans VALUES (1, 'one')");
    }
    t.wait_converged(TABLES, Duration::from_secs(60));
    d
}

/// Shard1 stopped, then `mb` transactions of about 1 MB of hardly compressible text each
/// (1000 rows of `audit`): a backlog only the spill log holds.
fn stop_shard1_and_write_megabytes(t: &mut Topology, mb: u64) {
    t.shards[1].stop().unwrap();
    for k in 0..mb {
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, \
             (SELECT string_agg(md5(random()::text || x || g), '') FROM generate_series(1, 30) x), g \
             FROM generate_series({0} * 1000, {0} * 1000 + 999) g",
            k
        ));
    }
}

/// Shard1's applied position (`commit_lsn` of its `reshard.progress` row).
fn shard1_progress(t: &Topology) -> String {
    t.shards[1]
        .psql("app", "SELECT commit_lsn FROM reshard.progress")
        .unwrap()
}

/// Shard1 falls behind what only the spill log holds: both shards apply a streamed
/// transaction (so shard1's progress is a real position), shard1 stops while five batches are
/// written and confirmed to the slot, daemon `d` is SIGKILLed and shard1 comes back. Returns
/// shard1's progress, which a refusal must leave where it is.
fn lagging_shard1_then_kill9(t: &mut Topology, d: usize) -> String {
    t.source_sql("INSERT INTO audit SELECT g % 101 + 1, 'streamed', g FROM generate_series(400000, 400999) g");
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.shards[1].stop().unwrap();
    for k in 0..5 {
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, 'while shard1 is down', g \
             FROM generate_series({0} * 1000 + 500000, {0} * 1000 + 500999) g",
            k
        ));
    }
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    t.wait(
        &format!("confirmed_flush_lsn to pass {written} while shard1 is down"),
        Duration::from_secs(60),
        || lsn_at_least(t, &written).then_some(()),
    );
    t.kill9(d);
    t.shards[1].restart().unwrap();
    shard1_progress(t)
}

/// SIGKILLs the daemon `kills` times at random moments while `writer` runs, restarting it
/// each time; then stops the writer and waits for every shard to match the source.
fn kill_repeatedly(t: &mut Topology, writer: Writer, kills: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    for k in 0..kills {
        let after = Duration::from_millis(rng.gen_range(300..3500));
        std::thread::sleep(after);
        assert!(
            t.is_running(d),
            "daemon exited on its own before kill {k}:\n{}",
            t.all_logs()
        );
        println!("kill -9 #{} after {after:?}", k + 1);
        t.kill9(d);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        d = t.spawn_run(&[]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let commits = writer.finish();
    let logs: String = (1..=kills + 1).map(|k| t.run_log(k)).collect();
    println!(
        "writer committed {commits} transactions; restarts that cut a torn spill append back: {}",
        logs.matches("spill log cut back").count()
    );
    assert!(
        commits > 50,
        "the writer made too little progress ({commits} commits)"
    );
    t.wait_converged(TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: issue "Route and apply" (kill -9 repeatedly mid-stream under a concurrent write load).
/// Five SIGKILLs at random moments under inserts, updates, deletes, key moves, a broadcast
/// table and a table without a primary key: every shard ends with exactly its share.
#[test]
fn kill9_mid_stream_under_write_load_loses_and_duplicates_nothing() {
    let seed = seed();
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.write_config("");
    let writer = Writer::start(t.source.url("app"), seed, false);
    kill_repeatedly(&mut t, writer, 5, seed);
}

// See: issue "Spill log" (kill -9 in the middle of spill writes, repeatedly, under load).
/// Like the above with 100-row and 5000-row transactions mixed in, so that kills land while a
/// transaction is being appended to the spill log.
#[test]
fn kill9_mid_spill_append_of_large_transactions_loses_and_duplicates_nothing() {
    let seed = seed();
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.write_config("");
    let writer = Writer::start(t.source.url("app"), seed, true);
    kill_repeatedly(&mut t, writer, 5, seed);
}

fn lsn_at_least(t: &Topology, lsn: &str) -> bool {
    t.source_sql(&format!(
        "SELECT coalesce(confirmed_flush_lsn >= '{lsn}'::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = 'reshard'"
    )) == "t"
}

// See: issue "Spill log" (a shard stopped for a long stretch while the source keeps writing).
/// While a shard is down the slot's `confirmed_flush_lsn` still passes the writes made after
/// it stopped (the source keeps no WAL for it), the spill directory grows, and the shard drains
/// its backlog after it returns. A SIGTERM then exits 0 and logs the final LSNs.
#[test]
fn a_stopped_shard_keeps_the_slot_advancing_and_drains_from_the_spill_log() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);

    t.shards[1].stop().unwrap();
    let before = dir_bytes(&t.spill_dir());
    for k in 0..10 {
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, md5(g::text) || md5((g * 7)::text), g \
             FROM generate_series({0} * 1000 + 10000, {0} * 1000 + 10999) g",
            k
        ));
        t.source_sql(&format!("UPDATE items SET n = n + 1 WHERE id % 10 = {k}"));
    }
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    t.wait(
        &format!("confirmed_flush_lsn to pass {written} while shard1 is down"),
        Duration::from_secs(60),
        || lsn_at_least(&t, &written).then_some(()),
    );
    let after = dir_bytes(&t.spill_dir());
    assert!(
        after > before + 100_000,
        "the spill directory should grow while shard1 is down: {before} -> {after} bytes"
    );
    // The live shard keeps up.
    t.wait(
        "shard0 to apply while shard1 is down",
        Duration::from_secs(60),
        || {
            TABLES
                .iter()
                .all(|(tb, key, ord)| {
                    let (a, b) = t.digests(tb, *key, ord, 0);
                    a == b
                })
                .then_some(())
        },
    );
    assert!(
        t.is_running(d),
        "daemon exited while shard1 was down:\n{}",
        t.all_logs()
    );

    std::thread::sleep(Duration::from_secs(3));
    t.shards[1].restart().unwrap();
    t.wait_converged(TABLES, Duration::from_secs(90));

    // See: a SIGTERM during streaming exits 0 and logs the final LSNs.
    t.source_sql("INSERT INTO plans VALUES (999, 'last')");
    t.wait_converged(TABLES, Duration::from_secs(30));
    t.stop_cleanly(d);
    let log = t.last_log();
    for s in ["shard0", "shard1"] {
        assert!(
            log.lines().any(|l| l.contains("shard stopped")
                && l.contains(s)
                && l.contains("applied_lsn=")),
            "the log must name {s}'s final applied LSN:\n{}",
            t.all_logs()
        );
    }
    let final_line = log
        .lines()
        .find(|l| l.contains("reshard stopped") && l.contains("confirmed_flush_lsn="))
        .unwrap_or_else(|| panic!("no final confirmed_flush_lsn line:\n{}", t.all_logs()));
    let logged = final_line
        .split("confirmed_flush_lsn=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    let slot = t.confirmed_flush_lsn();
    assert_eq!(
        logged, slot,
        "the logged final LSN must be the slot's confirmed_flush_lsn:\n{final_line}"
    );
}

/// The DBA rotates the shard's password; reshard's sessions there end (28P01 on the next).
fn rotate_password(shard: &reshard_harness::PgCluster) {
    shard
        .psql(
            "postgres",
            "ALTER USER postgres PASSWORD 'rotated'; SELECT count(pg_terminate_backend(pid)) \
             FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()",
        )
        .expect("rotate the password");
}

/// Shard1's password rotated and a row written (`plans` id `row`): shard1 stops on 28P01.
/// Returns its error once the status shows it stopped.
fn stop_shard1(t: &Topology, row: i64) -> String {
    rotate_password(&t.shards[1]);
    t.source_sql(&format!(
        "INSERT INTO plans VALUES ({row}, 'while stopped')"
    ));
    t.wait(
        "shard1 to stop on the rotated password",
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            let sh = &s["shards"][1];
            // Until the note is there (the applier reports its error a moment before the
            // supervisor joins the task); without one this times out.
            let err = sh["last_error"].as_str().unwrap_or_default();
            (sh["state"] == "stopped" && err.contains("shard shard1 stays stopped until"))
                .then(|| err.to_owned())
        },
    )
}

/// Shard1's commit-to-apply p50 latency as `reshard lag --json` shows it.
fn shard1_p50_ms(t: &Topology) -> f64 {
    let cfg = t.config_path();
    let (code, out, err) = t.reshard(&["lag", "-c", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "reshard lag:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("lag --json");
    v["shards"][1]["latency_p50_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no latency_p50_ms for shard1: {v}"))
}

/// After a stopped shard starts again (`RESUME`), `reshard lag` shows its new applier's
/// latency, not the stopped one's. The first applier's transactions wait out a 6 s `PAUSE`
/// (p50 at least 6 s); the one started by RESUME applies fresh single-row transactions at
/// once, and that is what `lag` shows.
#[test]
fn after_a_stopped_shard_resumes_lag_shows_the_new_appliers_latency() {
    let mut t = Topology::start_with(2, || {
        reshard_harness::PgCluster::builder().password("s3cret", reshard_harness::Auth::Scram)
    });
    let d = streaming(&mut t, "", false);
    let cfg = t.config_path();
    let port = crate::common::port_of(&std::fs::read_to_string(&cfg).unwrap(), "listen");
    let console = |sql: &str| {
        let out = crate::console::psql(port, sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    console("PAUSE shard1");
    for k in 0..10 {
        t.source_sql(&format!("INSERT INTO plans VALUES ({}, 'paused')", 100 + k));
    }
    std::thread::sleep(Duration::from_secs(6));
    console("RESUME shard1");
    t.wait_converged(TABLES, Duration::from_secs(60));
    // The rows are visible a moment before the applier records their commit: poll.
    let paused = t.wait(
        "shard1's lag p50 to show the paused transactions (>= 6000 ms)",
        Duration::from_secs(30),
        || Some(shard1_p50_ms(&t)).filter(|p| *p >= 6000.0),
    );

    stop_shard1(&t, 991);
    t.shards[1]
        .psql("postgres", "ALTER USER postgres PASSWORD 's3cret'")
        .expect("restore the password");
    console("RESUME shard1");
    for k in 0..20 {
        t.source_sql(&format!("INSERT INTO plans VALUES ({}, 'fresh')", 200 + k));
    }
    t.wait_converged(TABLES, Duration::from_secs(60));
    // Without the fix lag keeps showing the stopped applier's p50, and this times out.
    t.wait(
        &format!("shard1's lag p50 to show the new applier's latency (below {paused} / 2 ms)"),
        Duration::from_secs(30),
        || Some(shard1_p50_ms(&t)).filter(|f| *f < paused / 2.0),
    );
    t.stop_cleanly(d);
}

/// The only shard stops on a rotated password: the daemon ends ("every shard stopped"), so its
/// message says to start `reshard run` again, not to send SIGHUP or RESUME to a process that has
/// exited (as it said before).
#[test]
fn the_last_shard_stopping_ends_the_daemon_with_a_restart_hint_not_a_sighup_one() {
    let mut t = Topology::start_with(1, || {
        reshard_harness::PgCluster::builder().password("s3cret", reshard_harness::Auth::Scram)
    });
    let d = streaming(&mut t, "", false);
    rotate_password(&t.shards[0]);
    t.source_sql("INSERT INTO plans VALUES (2, 'while stopped')");
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_ne!(code, Some(0), "{log}");
    let msg = log
        .lines()
        .skip_while(|l| !l.contains("every shard stopped"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        msg.contains("password authentication failed")
            && msg.contains("start `reshard run` again")
            && !msg.contains("SIGHUP"),
        "{log}"
    );
}

/// The only shard stops on a definite error (a CHECK constraint only the shard has, 23514) and
/// the daemon exits "every shard stopped". `reshard status` with the daemon down then shows
/// why, in LAST ERROR and in `--json` `last_error` (before, `stopped` and `-`: the cause was
/// only in the daemon's log). Started again, the shard applies, and the note is gone.
#[test]
fn status_with_the_daemon_down_shows_why_every_shard_stopped() {
    let mut t = Topology::start(1);
    let d = streaming(&mut t, "", false);
    t.shards[0]
        .psql(
            "app",
            "ALTER TABLE plans ADD CONSTRAINT shard_only_check CHECK (name <> 'refused')",
        )
        .expect("add the shard's constraint");
    t.source_sql("INSERT INTO plans VALUES (2, 'refused')");
    let code = t.wait_exit(d, Duration::from_secs(60));
    assert_ne!(code, Some(0), "{}", t.last_log());

    let cfg = t.config_path();
    let (code, out, err) = t.reshard(&["status", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("shard0"))
        .unwrap_or_else(|| panic!("no shard0 row:\n{out}"));
    assert!(
        row.contains("stopped") && row.contains("shard_only_check") && row.contains("23514"),
        "status does not say why shard0 stopped:\n{out}\nlog:\n{}",
        t.last_log()
    );
    let s = t.status_json().expect("status --json");
    let e = s["shards"][0]["last_error"].as_str().unwrap_or_default();
    assert!(e.contains("shard_only_check") && e.contains("23514"), "{s}");
    // The progress row was read: the lag is known, not hidden behind the stop's error.
    assert!(s["shards"][0]["lag_bytes"].is_u64(), "{s}");

    // Fixed on the shard and started again: it applies, and the note is gone.
    t.shards[0]
        .psql("app", "ALTER TABLE plans DROP CONSTRAINT shard_only_check")
        .expect("drop the constraint");
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.stop_cleanly(d);
    let s = t.status_json().expect("status --json");
    assert!(s["shards"][0]["last_error"].is_null(), "{s}");
}

/// A shard whose password stops working mid-run (28P01 on its next connection) stops, says
/// what brings it back (the fix, then SIGHUP or RESUME; a url changed in the config needs a
/// restart), and the other shard goes on. After the fix on the shard's role, a SIGHUP starts it
/// again without a daemon restart and it catches up with the writes made while it was stopped;
/// then the same with RESUME on the admin console.
#[test]
fn a_shard_stopped_on_a_bad_password_resumes_on_sighup_or_resume_after_the_fix() {
    let mut t = Topology::start_with(2, || {
        reshard_harness::PgCluster::builder().password("s3cret", reshard_harness::Auth::Scram)
    });
    let d = streaming(&mut t, "", true);
    let err = stop_shard1(&t, 991);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        err.contains("send the daemon SIGHUP or run RESUME shard1")
            && err.contains("a url changed in the config needs `reshard run` started again"),
        "{err}"
    );
    let log = t.last_log();
    assert!(
        log.lines()
            .any(|l| l.contains("shard stopped") && l.contains("stays stopped until")),
        "{log}"
    );
    // The other shard goes on.
    t.source_sql("INSERT INTO items VALUES (2, 990001, 'on', 1), (3, 990002, 'on', 1)");
    assert!(t.is_running(d), "{}", t.all_logs());

    // The fix (the old password back) and SIGHUP: shard1 catches up, same daemon.
    t.shards[1]
        .psql("postgres", "ALTER USER postgres PASSWORD 's3cret'")
        .expect("restore the password");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(t.pid(d) as libc::pid_t, libc::SIGHUP);
    }
    t.wait_converged(TABLES, Duration::from_secs(90));
    assert!(t.is_running(d), "{}", t.all_logs());

    // Again, and RESUME shard1 on the admin console.
    stop_shard1(&t, 992);
    t.shards[1]
        .psql("postgres", "ALTER USER postgres PASSWORD 's3cret'")
        .expect("restore the password");
    let cfg = t.config_path();
    let port = crate::common::port_of(&std::fs::read_to_string(&cfg).unwrap(), "listen");
    let out = crate::console::psql(port, "RESUME shard1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.wait_converged(TABLES, Duration::from_secs(90));
    assert!(t.is_running(d), "{}", t.all_logs());
    t.stop_cleanly(d);
}

/// The lines a server logs when one of its timeouts ends a statement or a session.
const TIMEOUT_LINES: &[&str] = &[
    "due to statement timeout",
    "due to lock timeout",
    "due to idle-in-transaction timeout",
    "due to idle-session timeout",
];

/// Timeouts a DBA gave the role reshard logs in as, and its database, on every cluster (1 s
/// each: `statement_timeout`, `idle_in_transaction_session_timeout`, `lock_timeout`,
/// `idle_session_timeout`) cut no reshard session short: the full load, whose COPY into a
/// shard runs for seconds (a trigger, enabled ALWAYS so that it fires under
/// `session_replication_role = replica` too, sleeps 4 ms a row of `items`); the applier's merge
/// of a 2000-row transaction that takes as long; a verify started at once, whose source and
/// shard snapshots sit idle while it waits for the shards to apply that transaction; the
/// sessions that idle between transactions. No server logs a timeout, verify passes.
#[test]
fn the_roles_and_databases_timeouts_cut_no_session_short() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.shards_sql(
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql \
         AS $$ BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$; \
         CREATE TRIGGER slow BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow_row(); \
         ALTER TABLE items ENABLE ALWAYS TRIGGER slow",
    );
    for c in std::iter::once(&t.source).chain(&t.shards) {
        c.psql(
            "postgres",
            "ALTER ROLE postgres IN DATABASE app SET statement_timeout = '1s'; \
             ALTER ROLE postgres IN DATABASE app SET idle_in_transaction_session_timeout = '1s'; \
             ALTER ROLE postgres IN DATABASE app SET lock_timeout = '1s'; \
             ALTER DATABASE app SET idle_session_timeout = '1s'",
        )
        .expect("set the role's timeouts");
    }
    let cfg = t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.wait_converged(TABLES, Duration::from_secs(90));

    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'big', 1 FROM generate_series(3001, 5000) g",
    );
    let (code, out, err) = t.reshard(&["verify", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "verify:\n{out}\n{err}\n{}", t.all_logs());
    t.wait_converged(TABLES, Duration::from_secs(90));
    // Idle between transactions for a while.
    std::thread::sleep(Duration::from_millis(2500));
    t.source_sql("INSERT INTO plans VALUES (901, 'after an idle stretch')");
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.stop_cleanly(d);
    for (who, c) in std::iter::once(("source".to_owned(), &t.source)).chain(
        t.shards
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("shard{i}"), c)),
    ) {
        let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
        let hits: Vec<&str> = log
            .lines()
            .filter(|l| TIMEOUT_LINES.iter().any(|m| l.contains(m)))
            .collect();
        assert!(
            hits.is_empty(),
            "the {who} ended a reshard session on a timeout of its role or database:\n{}",
            hits.join("\n")
        );
    }
}

// See: issue "Spill log" (the cap).
/// With a tiny `[spill] max_bytes` and a stopped shard, the engine pauses reading (status says
/// so, the log says so once), stays up, and resumes after the shard returns.
#[test]
fn the_spill_cap_pauses_reading_and_resumes_after_the_shard_returns() {
    let mut t = Topology::start(2);
    let d = streaming(
        &mut t,
        "segment_bytes = 1048576\nmax_bytes = 3145728\nmemory_tail_bytes = 1048576\n",
        false,
    );
    stop_shard1_and_write_megabytes(&mut t, 20);
    let status = t.wait(
        "status to report backpressure",
        Duration::from_secs(60),
        || {
            let s = t.status_json();
            let hit = s
                .as_ref()
                .is_some_and(|s| s["source"]["backpressure"] == serde_json::Value::Bool(true));
            if !hit {
                println!(
                    "status source {} spill {}",
                    s.as_ref()
                        .map(|s| s["source"].to_string())
                        .unwrap_or_default(),
                    s.as_ref()
                        .map(|s| s["spill"].to_string())
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(900));
            }
            s.filter(|_| hit)
        },
    );
    println!(
        "status at the cap: phase {} spill {}",
        status["phase"], status["spill"]
    );
    let spill = dir_bytes(&t.spill_dir());
    assert!(
        spill < 3 * 3_145_728,
        "the spill log ({spill} bytes) overshoots its cap by far"
    );
    // It stays paused (and up) while the shard is down.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        t.is_running(d),
        "daemon exited at the cap:\n{}",
        t.all_logs()
    );
    let still = t.status_json().expect("status while paused");
    assert_eq!(
        still["source"]["backpressure"],
        serde_json::Value::Bool(true),
        "{still}"
    );
    assert!(
        !lsn_at_least(&t, &t.source_sql("SELECT pg_current_wal_lsn()")),
        "reading should be paused, yet the slot confirmed everything"
    );
    let log = t.last_log();
    let paused_lines = log
        .lines()
        .filter(|l| l.contains("max_bytes") && l.contains("paus"))
        .count();
    // Once per pause: the live shard may free its segments, ending a pause before the next.
    let resumed_lines = log
        .lines()
        .filter(|l| l.contains("max_bytes") && l.contains("resum"))
        .count();
    assert!(
        paused_lines >= 1 && paused_lines == resumed_lines + 1,
        "one log line per pause ({paused_lines} say paused, {resumed_lines} resumed):\n{}",
        t.all_logs()
    );

    t.shards[1].restart().unwrap();
    t.wait_converged(TABLES, Duration::from_secs(120));
    let status = t.wait(
        "status to clear backpressure",
        Duration::from_secs(30),
        || {
            t.status_json()
                .filter(|s| s["source"]["backpressure"] == serde_json::Value::Bool(false))
        },
    );
    assert_eq!(status["phase"], "streaming", "{status}");
    assert!(
        t.last_log().contains("resum"),
        "no log line says reading resumed:\n{}",
        t.all_logs()
    );
    t.stop_cleanly(d);
}

// See: explore R3-6 (a full spill disk restarted the daemon in a loop, halting every shard).
/// A spill filesystem that fills up (a real 6 MiB tmpfs: ENOSPC) while a shard is down is
/// handled like the cap: reading pauses (status says why, one WARN names the directory), the
/// daemon never restarts, and once the shard returns and applies, retention frees space and
/// reading resumes by itself, with every row exactly once.
#[test]
fn a_full_spill_disk_pauses_reading_and_resumes_once_retention_frees_space() {
    let mut t = Topology::start(2);
    let Some(_disk) = Tmpfs::mount_at(&t.spill_dir(), 6 << 20) else {
        println!(
            "SKIPPED: cannot mount a tmpfs here (needs root); a full spill disk is not tested"
        );
        return;
    };
    // The cap (1 GiB) is far above the disk: the disk fills first.
    let d = streaming(
        &mut t,
        "segment_bytes = 1048576\nmax_bytes = 1073741824\nmemory_tail_bytes = 1048576\n",
        false,
    );
    stop_shard1_and_write_megabytes(&mut t, 30);
    let status = t.wait(
        "status to say the spill disk is full",
        Duration::from_secs(90),
        || {
            let s = t.status_json();
            let full = s.as_ref().is_some_and(|s| {
                s["source"]["pause_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("filesystem is full"))
            });
            if !full {
                std::thread::sleep(Duration::from_millis(500));
            }
            s.filter(|_| full)
        },
    );
    assert_eq!(status["source"]["backpressure"], true, "{status}");
    assert_eq!(status["spill"]["disk_full"], true, "{status}");
    assert_eq!(status["phase"], "paused", "{status}");
    // It stays paused and up while the shard is down; the live shard got its rows so far.
    std::thread::sleep(Duration::from_secs(3));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    let log = t.last_log();
    assert!(
        !log.contains("starting again"),
        "the full disk restarted the daemon:\n{}",
        t.all_logs()
    );
    // A WARN, and never two within 30 s (shard0 freeing its applied segments may let a write
    // through and the next one wait again); an INFO only after a WARN.
    let warns = full_disk_warns(&log);
    assert!(!warns.is_empty(), "no WARN:\n{log}");
    assert_apart_30s(&warns, &log);
    let resumed = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("has space again"))
        .count();
    assert!(
        resumed <= warns.len(),
        "{} WARN, {resumed} resumed:\n{log}",
        warns.len()
    );
    let spill = t.spill_dir().display().to_string();
    assert!(
        log.lines().any(|l| l.contains("filesystem is full")
            && l.contains(&spill)
            && l.contains("free_bytes")),
        "the WARN names the directory and its free bytes:\n{log}"
    );
    let live: u64 = t.shards[0]
        .psql("app", "SELECT count(*) FROM audit")
        .unwrap()
        .parse()
        .unwrap();
    assert!(live > 0, "shard0 applied nothing while shard1 was down");

    // The shard returns while the disk is still full: it applies, retention frees space,
    // reading resumes by itself.
    t.shards[1].restart().unwrap();
    t.wait_converged(TABLES, Duration::from_secs(180));
    let status = t.wait("status to clear the pause", Duration::from_secs(30), || {
        t.status_json()
            .filter(|s| s["source"]["pause_reason"].is_null())
    });
    assert_eq!(status["spill"]["disk_full"], false, "{status}");
    let log = t.last_log();
    assert!(
        log.contains("has space again"),
        "no log line says reading resumed:\n{log}"
    );
    assert!(!log.contains("starting again"), "{log}");
    t.stop_cleanly(d);
}

/// Seconds of the day of a text log line's RFC 3339 timestamp (`2026-12-03T19:26:10.123Z  WARN`).
fn log_secs(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut hms = time.split(':').map(|p| p.parse::<f64>().ok());
    Some(hms.next()?? * 3600.0 + hms.next()?? * 60.0 + hms.next()??)
}

/// The daemon's WARN lines about a full spill filesystem (the first of a wait, reminders).
fn full_disk_warns(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("spill directory's filesystem is"))
        .collect()
}

/// Panics unless each of `warns` is logged at least 30 s after the one before.
fn assert_apart_30s(warns: &[&str], log: &str) {
    for w in warns.windows(2) {
        let (a, b) = (log_secs(w[0]).unwrap(), log_secs(w[1]).unwrap());
        let apart = (b - a).rem_euclid(86_400.0);
        assert!(apart >= 29.9, "two WARNs {apart:.1} s apart:\n{log}");
    }
}

/// A spill filesystem at the edge (full, freed, full again at once, then for longer than the
/// reminder interval) logs one WARN when the first wait starts (directory, the bytes the write
/// needs, the fix), nothing for a wait that starts again within 30 s of it, a reminder once
/// 30 s passed, and one INFO per announced wait when reading resumes: never two WARNs within
/// 30 s (before, every wait logged its WARN, however many per minute).
#[test]
fn a_spill_disk_at_the_edge_warns_once_then_reminds_at_most_every_30_seconds() {
    let mut t = Topology::start(1);
    let Some(disk) = Tmpfs::mount_at(&t.spill_dir(), 24 << 20) else {
        println!(
            "SKIPPED: cannot mount a tmpfs here (needs root); a full spill disk is not tested"
        );
        return;
    };
    let d = streaming(&mut t, "", false);
    let disk_full = |t: &Topology, full: bool| {
        t.wait(
            &format!("status to say disk_full = {full}"),
            Duration::from_secs(60),
            || {
                let s = t.status_json()?;
                (s["spill"]["disk_full"] == full).then_some(())
            },
        )
    };
    // About 1 MB of hardly compressible text in one transaction.
    let write_megabyte = |t: &Topology, k: u64| {
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, \
             (SELECT string_agg(md5(random()::text || x || g), '') FROM generate_series(1, 30) x), g \
             FROM generate_series({0} * 1000, {0} * 1000 + 999) g",
            k
        ));
    };
    disk.fill();
    write_megabyte(&t, 1);
    disk_full(&t, true);
    disk.free();
    disk_full(&t, false);
    // At once again, and for longer.
    disk.fill();
    write_megabyte(&t, 2);
    disk_full(&t, true);
    t.wait(
        "a reminder that the spill disk is still full",
        Duration::from_secs(60),
        || t.last_log().contains("still full").then_some(()),
    );
    disk.free();
    disk_full(&t, false);
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.stop_cleanly(d);

    let log = t.last_log();
    let warns = full_disk_warns(&log);
    assert_eq!(warns.len(), 2, "one WARN, one reminder:\n{log}");
    let spill = t.spill_dir().display().to_string();
    assert!(
        warns[0].contains("filesystem is full")
            && warns[0].contains(&spill)
            && warns[0].contains("needed_bytes=")
            && warns[0].contains("fix:"),
        "the WARN names the directory, the bytes needed and the fix:\n{log}"
    );
    assert!(
        warns[1].contains("still full") && warns[1].contains("waited_secs="),
        "{log}"
    );
    assert_apart_30s(&warns, &log);
    let resumed = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("has space again"))
        .count();
    assert_eq!(resumed, 2, "one INFO per announced wait:\n{log}");
}

/// Source tables whose full load finished on every shard (every chunk recorded on each).
fn tables_loaded_everywhere(t: &Topology) -> Vec<String> {
    let mut common: Option<Vec<String>> = None;
    for s in &t.shards {
        let done = s
            .psql(
                "app",
                "SELECT source_table FROM reshard.fullload_chunks GROUP BY source_table, chunks_total \
                 HAVING count(*) = chunks_total ORDER BY 1",
            )
            .unwrap_or_default();
        let done: Vec<String> = done
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        common = Some(match common {
            None => done,
            Some(c) => c.into_iter().filter(|x| done.contains(x)).collect(),
        });
    }
    common.unwrap_or_default()
}

// See: issue "Full load" (through the daemon under a concurrent writer; kill -9 mid-copy).
/// A throttled full load of three tables (one chunked, one broadcast, one without a primary
/// key) under a concurrent writer, SIGKILLed while a table is still being copied: the restart
/// does not copy the finished tables again, and after catch-up every shard holds its share.
#[test]
fn full_load_under_writes_survives_kill9_mid_copy_without_recopying_finished_tables() {
    let seed = seed();
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 50) g");
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 3000) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, 30000) g",
    );
    t.source_sql("ANALYZE");
    t.write_config("[snapshot]\nparallel = 1\nchunk_rows = 1000\nmax_rows_per_sec = 4000\n");
    let writer = Writer::start(t.source.url("app"), seed, false);
    let d = t.spawn_run(&[]);

    let started = Instant::now();
    let finished_before = t.wait(
        "a table to finish loading while another copies",
        Duration::from_secs(60),
        || {
            let done = tables_loaded_everywhere(&t);
            (!done.is_empty()).then_some(done)
        },
    );
    assert!(
        !t.last_log().contains("full load done"),
        "the throttled load finished too fast for a kill mid-copy ({:?}):\n{}",
        started.elapsed(),
        t.all_logs()
    );
    let chunks_before: String = t.shards[0]
        .psql("app", "SELECT count(*) FROM reshard.fullload_chunks")
        .unwrap();
    println!("kill -9 mid-copy; finished tables {finished_before:?}, chunks recorded on shard0: {chunks_before}");
    t.kill9(d);
    let d = t.spawn_run(&[]);
    t.wait(
        "the resumed full load to finish",
        Duration::from_secs(90),
        || t.last_log().contains("full load done").then_some(()),
    );
    let log = t.last_log();
    for table in &finished_before {
        let line = log
            .lines()
            .find(|l| l.contains("table loaded") && l.contains(&format!("table={table} ")))
            .unwrap_or_else(|| panic!("no 'table loaded' line for {table}:\n{}", t.all_logs()));
        assert!(
            line.contains(" chunks=0 ") && line.contains(" rows=0 "),
            "{table} was finished before the kill, yet the restart copied it again:\n{line}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("table loaded") && !l.contains(" chunks=0 ")),
        "the restart should have copied the unfinished table:\n{}",
        t.all_logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let commits = writer.finish();
    println!("writer committed {commits} transactions");
    t.wait_converged(TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

/// Peak resident set (VmHWM) of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// See: issue "Spill log" (a single source transaction of ≥ 1 GB replicates under 256 MB RSS).
/// One source transaction of about 1.1 GB of changes (1.1 M rows of ~1 KB) replicates to two
/// shards with the daemon's peak RSS under 256 MB. Slow: run it on purpose with
/// `cargo test -p reshard-cli --test integration robust::one_gigabyte -- --ignored --nocapture`.
#[test]
#[ignore]
fn one_gigabyte_transaction_replicates_under_256_mb_rss() {
    let mut t = Topology::start_with(2, || {
        reshard_harness::PgCluster::builder()
            .setting("logical_decoding_work_mem", "64kB")
            .setting("max_wal_size", "4GB")
    });
    t.ddl_everywhere("CREATE TABLE big (account_id bigint NOT NULL, id bigint NOT NULL, payload text, PRIMARY KEY (account_id, id))");
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    let started = Instant::now();
    t.source_sql(
        "INSERT INTO big SELECT g % 1000 + 1, g, repeat(md5(g::text), 30) FROM generate_series(1, 1100000) g",
    );
    let bytes = t.source_sql("SELECT pg_total_relation_size('big')");
    println!(
        "source transaction committed after {:?}; table size {bytes} bytes",
        started.elapsed()
    );
    let helper = t.create_route_helper("bigint");
    let n = t.shards.len();
    let want: Vec<String> = (0..n)
        .map(|s| {
            t.source_sql(&format!(
                "SELECT count(*) FROM big WHERE satisfies_hash_partition('{helper}'::regclass, {n}, {s}, account_id)"
            ))
        })
        .collect();
    t.wait(
        "every shard to hold its share of the big transaction",
        Duration::from_secs(3600),
        || {
            (0..n)
                .all(|s| {
                    t.shards[s]
                        .psql("app", "SELECT count(*) FROM big")
                        .unwrap_or_default()
                        == want[s]
                })
                .then_some(())
        },
    );
    let peak = vm_hwm_kib(t.pid(d)).expect("VmHWM");
    println!(
        "replicated {bytes} bytes in one transaction in {:?}; daemon peak RSS (VmHWM) {} MiB",
        started.elapsed(),
        peak / 1024
    );
    for s in 0..n {
        let q = "SELECT sum(hashtext(payload)::bigint) FROM big";
        let want = t.source_sql(&format!(
            "{q} WHERE satisfies_hash_partition('{helper}'::regclass, {n}, {s}, account_id)"
        ));
        let got = t.shards[s].psql("app", q).unwrap();
        assert_eq!(want, got, "shard{s} payload checksum");
    }
    assert!(
        peak < 256 * 1024,
        "peak RSS {} MiB is over 256 MiB:\n{}",
        peak / 1024,
        t.all_logs()
    );
    let code = t.terminate(d, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "SIGTERM must be a clean exit 0:\n{}",
        t.all_logs()
    );
}

/// A shard's applied position (`end_lsn` of `reshard.progress`) is at least `lsn`.
fn shard_progress_at_least(t: &Topology, shard: usize, lsn: &str) -> bool {
    t.shards[shard]
        .psql(
            "app",
            &format!("SELECT coalesce(bool_and(end_lsn >= '{lsn}'::pg_lsn), false) FROM reshard.progress"),
        )
        .map(|v| v == "t")
        .unwrap_or(false)
}

// See: heartbeats must reach shards that get no data (lag and cutover read their position).
/// A shard that receives none of the source's recent transactions still records progress past
/// them: its position (and so its lag and `cutover`) does not freeze while the source writes
/// only to other shards.
#[test]
fn an_idle_shard_advances_past_transactions_routed_elsewhere() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    let helper = t.create_route_helper("bigint");
    let account = t.source_sql(&format!(
        "SELECT a FROM generate_series(1, 100) a WHERE satisfies_hash_partition('{helper}'::regclass, 2, 0, a::bigint) LIMIT 1"
    ));
    for i in 0..5 {
        t.source_sql(&format!(
            "INSERT INTO items VALUES ({account}, {i}, 'only shard0', 0)"
        ));
    }
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    t.wait_converged(TABLES, Duration::from_secs(60));
    assert_eq!(
        t.shards[1]
            .psql("app", "SELECT count(*) FROM items")
            .unwrap(),
        "0",
        "shard1 must get none of account {account}'s rows"
    );
    t.wait(
        &format!("shard0's progress to pass {written}"),
        Duration::from_secs(30),
        || shard_progress_at_least(&t, 0, &written).then_some(()),
    );
    t.wait(
        &format!("idle shard1's progress to pass {written} by heartbeats"),
        Duration::from_secs(30),
        || shard_progress_at_least(&t, 1, &written).then_some(()),
    );
    t.stop_cleanly(d);
}

// See: explore R3-4 (after a source restart the status poll never reconnected).
/// After the source restarts, the daemon's status poll reconnects: the status clears its
/// error and shows the source's current WAL again, and the idle heartbeat still moves idle
/// shards' progress past WAL the source wrote to unpublished tables.
#[test]
fn after_a_source_restart_status_and_idle_heartbeats_recover() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", false);

    t.source.restart().unwrap();
    // WAL reshard is not sent: only the heartbeat moves the shards' progress past it.
    t.source_sql(
        "CREATE TABLE unpublished (x int); INSERT INTO unpublished SELECT generate_series(1, 1000)",
    );
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    let status = t.wait(
        &format!("status to show the source's WAL at {written} again, without an error"),
        Duration::from_secs(60),
        || {
            let s = t.status_json()?;
            let wal: reshard_engine::Lsn = s["source"]["current_wal_lsn"].as_str()?.parse().ok()?;
            let ok = s["source"]["last_error"].is_null()
                && wal >= written.parse::<reshard_engine::Lsn>().ok()?;
            if !ok {
                std::thread::sleep(Duration::from_millis(300));
            }
            ok.then_some(s)
        },
    );
    println!("status after the restart: {}", status["source"]);
    for shard in 0..2 {
        t.wait(
            &format!("shard{shard}'s progress to pass {written} by heartbeats"),
            Duration::from_secs(60),
            || shard_progress_at_least(&t, shard, &written).then_some(()),
        );
    }
    assert!(t.is_running(d), "{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: issue "Full load" (restart paths of `runtime::start`: slot exists, nothing loaded yet).
/// SIGKILLed right after it created the slot, before any chunk is on a shard, under a writer:
/// the restart loads every table under a new snapshot, streams from the slot, and every shard
/// converges.
#[test]
fn kill9_before_the_first_chunk_then_restart_converges() {
    let seed = seed();
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.write_config("[snapshot]\nparallel = 1\nchunk_rows = 500\nmax_rows_per_sec = 2000\n");
    let writer = Writer::start(t.source.url("app"), seed, false);
    let d = t.spawn_run(&[]);
    t.wait("the slot to exist", Duration::from_secs(60), || {
        (t.source_sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard'")
            == "1")
            .then_some(())
    });
    t.kill9(d);
    let chunks: usize = t
        .shards
        .iter()
        .map(|s| {
            s.psql("app", "SELECT count(*) FROM reshard.fullload_chunks")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .sum();
    println!("killed with {chunks} chunks recorded");
    std::thread::sleep(Duration::from_millis(500));
    let d = t.spawn_run(&[]);
    t.wait(
        "the resumed full load to finish",
        Duration::from_secs(90),
        || t.last_log().contains("full load done").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    writer.finish();
    t.wait_converged(TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: issue #11 (chaos soak: a shard restarting while the daemon restarts).
/// A shard that is down while the daemon starts is waited for: the start is retried (each
/// attempt logged, naming the shard), not a fatal exit, and the shard catches up once it is back.
#[test]
fn a_shard_down_while_the_daemon_starts_is_waited_for() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);
    t.stop_cleanly(d);

    t.shards[1].stop().unwrap();
    t.source_sql("INSERT INTO items SELECT g % 97 + 1, g, 'late' || g, 0 FROM generate_series(50000, 50999) g");
    let d = t.spawn_run(&[]);
    t.wait("the start to be retried", Duration::from_secs(60), || {
        t.last_log().contains("could not start yet").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        t.is_running(d),
        "the daemon gave up while shard1 was down:\n{}",
        t.all_logs()
    );
    let log = t.last_log();
    assert!(
        log.lines()
            .any(|l| l.contains("could not start yet") && l.contains("shard1")),
        "the retry must name the shard it waits for:\n{log}"
    );
    t.shards[1].restart().unwrap();
    t.wait_converged(TABLES, Duration::from_secs(120));
    t.stop_cleanly(d);
}

// See: issue #11 (chaos soak: a shard's backends terminated while the full load runs).
/// A transient failure of the full load after the start (a shard's copy connections cut) does
/// not end the daemon: it stops every stage, starts again by itself (as a restart would), resumes
/// the load without recopying finished tables, and converges.
#[test]
fn a_transient_full_load_failure_starts_the_daemon_again() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.source_sql(
        "INSERT INTO audit SELECT g % 89 + 1, repeat('x', 200), g FROM generate_series(10001, 400000) g",
    );
    t.write_config("[snapshot]\nchunk_rows = 10000\n");
    let d = t.spawn_run(&[]);
    // Once shard0 has committed a chunk of audit (the load is under way), cut its connections.
    t.wait("a first chunk on shard0", Duration::from_secs(120), || {
        let n: i64 = t.shards[0]
            .psql("app", "SELECT count(*) FROM audit")
            .ok()?
            .parse()
            .ok()?;
        (n > 0).then_some(())
    });
    t.shards[0]
        .psql(
            "app",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    t.wait_converged(TABLES, Duration::from_secs(300));
    assert!(
        t.is_running(d),
        "the daemon exited after a transient full-load failure:\n{}",
        t.all_logs()
    );
    let log = t.last_log();
    assert!(
        log.contains("the full load failed") && log.contains("starting again"),
        "the load must have failed under the cut and the daemon started again:\n{}",
        t.all_logs()
    );
    t.stop_cleanly(d);
}

/// Single-row inserts into `items` and `audit`, back to back, each transaction open for a
/// while before its commit: a slot's consistent point then often falls exactly on the start
/// of a commit record. Ids start at `base`.
fn spin_inserts(url: String, base: i64, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("spin_inserts connect");
            tokio::spawn(conn);
            let mut n = base;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let sql = if n % 2 == 0 {
                    format!(
                        "BEGIN; INSERT INTO items VALUES ({}, {n}, 's{n}', 0)",
                        n % 193 + 1
                    )
                } else {
                    format!(
                        "BEGIN; INSERT INTO audit VALUES ({}, 's', {n})",
                        n % 191 + 1
                    )
                };
                client
                    .batch_execute(&sql)
                    .await
                    .expect("spin_inserts insert");
                // Most of the time is spent inside the transaction, so the next WAL record
                // after a random point is most often a commit record.
                tokio::time::sleep(Duration::from_millis(2)).await;
                client
                    .batch_execute("COMMIT")
                    .await
                    .expect("spin_inserts commit");
            }
            (n - base) as u64
        })
    })
}

// See: issue #11 item 3 (the full-load/CDC boundary after a restart).
/// Several rounds, each from a fresh slot: a throttled full load under a mixed writer and two
/// back-to-back inserters, SIGKILLed and restarted while it copies; after the load every shard
/// holds exactly its share. A commit record that starts exactly at a snapshot's consistent
/// point is not in that snapshot and must come from CDC.
#[test]
fn restarts_during_the_full_load_under_writes_keep_every_commit_at_the_snapshot_boundary() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 50) g");
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 3000) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, 20000) g",
    );
    t.source_sql("ANALYZE");
    t.write_config("[snapshot]\nparallel = 1\nchunk_rows = 1000\nmax_rows_per_sec = 5000\n");
    for round in 0..3i64 {
        let stop = Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..3)
            .map(|k| {
                let base = 10_000_000 * (round + 1) + 1_000_000 * k;
                spin_inserts(t.source.url("app"), base, stop.clone())
            })
            .collect();
        let writer = Writer::start(t.source.url("app"), seed.wrapping_add(round as u64), false);
        let mut d = t.spawn_run(&[]);
        let mut kills = 0;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(1500..3500)));
            if t.last_log().contains("full load done") {
                break;
            }
            t.kill9(d);
            kills += 1;
            d = t.spawn_run(&[]);
        }
        t.wait("the full load to finish", Duration::from_secs(120), || {
            t.last_log().contains("full load done").then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        let spun: u64 = spinners
            .into_iter()
            .map(|h| h.join().expect("spinner"))
            .sum();
        let commits = writer.finish();
        println!("round {round}: {kills} kills during the load; {commits} mixed and {spun} single-row commits");
        t.wait_converged(TABLES, Duration::from_secs(120));
        assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
        assert_eq!(
            t.terminate(d, Duration::from_secs(30)),
            Some(0),
            "SIGTERM must be a clean exit 0:\n{}",
            t.all_logs()
        );
        // The next round starts over: new slot, empty shards and spill directory; the mixed
        // writer's ids are free again.
        t.source_sql("SELECT pg_drop_replication_slot('reshard')");
        t.source_sql(&format!(
            "DELETE FROM items WHERE id >= {WRITER_ID_BASE} AND id < 10000000; \
             DELETE FROM plans WHERE id >= {WRITER_ID_BASE}"
        ));
        t.shards_sql("DROP SCHEMA reshard CASCADE; TRUNCATE items, audit, plans");
        std::fs::remove_dir_all(t.spill_dir()).expect("remove the spill directory");
    }
}

// See: issue #11 item 1 (a fresh spill directory while the slot exists and a shard lags).
/// A shard is down while rows are written and confirmed to the slot, the engine is SIGKILLed,
/// and it is restarted with an empty spill directory (a pod without its volume): it refuses
/// to stream, naming the shard, the missing LSN range, the directory and the ways out, and
/// leaves the shard's progress where it was. With the original directory back it resumes and
/// every shard converges.
#[test]
fn a_fresh_spill_directory_behind_a_lagging_shard_is_refused_naming_shard_and_range() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);
    let before = lagging_shard1_then_kill9(&mut t, d);
    let kept = t.dir.path().join("spill-volume");
    std::fs::rename(t.spill_dir(), &kept).unwrap();

    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(
        code,
        Some(3),
        "an empty spill directory behind a lagging shard must be refused:\n{}",
        t.all_logs()
    );
    let line = log
        .lines()
        .find(|l| l.contains("does not cover shard shard1"))
        .unwrap_or_else(|| panic!("no refusal naming shard1:\n{log}"));
    for part in [
        format!("committed after {before}, "),
        format!("transactions after {before} and before "),
        t.spill_dir().display().to_string(),
        "re-sync shard shard1".to_string(),
        "point [spill] dir".to_string(),
    ] {
        assert!(line.contains(&part), "{part:?} missing from:\n{line}");
    }
    assert_eq!(
        shard1_progress(&t),
        before,
        "nothing may move shard1's progress"
    );

    // The right directory back: it resumes and catches up.
    std::fs::remove_dir_all(t.spill_dir()).unwrap();
    std::fs::rename(&kept, t.spill_dir()).unwrap();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    t.stop_cleanly(d);
}

// Found by the outside-user acceptance runs (explore): an emptied shard log.
/// A shard is down while rows are written and confirmed to the slot, the engine is SIGKILLed,
/// and the segment files of that shard's log are deleted by hand (the `identity` and
/// `checkpoint` files stay): those rows exist nowhere else, so it refuses to stream, naming
/// the shard and the directory, and leaves the shard's progress where it was. With the files
/// back it resumes and every shard converges.
#[test]
fn a_shard_log_emptied_by_hand_behind_a_lagging_shard_is_refused() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);
    let before = lagging_shard1_then_kill9(&mut t, d);
    let shard_log = t.spill_dir().join("shard-0001");
    let kept = t.dir.path().join("shard-0001-segments");
    std::fs::create_dir(&kept).unwrap();
    let mut moved = 0;
    for e in std::fs::read_dir(&shard_log).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), kept.join(e.file_name())).unwrap();
        moved += 1;
    }
    assert!(moved > 0, "shard1's log holds no segment to remove");

    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(
        code,
        Some(3),
        "a shard log emptied behind a lagging shard must be refused:\n{}",
        t.all_logs()
    );
    assert!(
        log.contains("shard 1") && log.contains(&shard_log.display().to_string()),
        "the refusal must name the shard and its directory:\n{log}"
    );
    assert_eq!(
        shard1_progress(&t),
        before,
        "nothing may move shard1's progress"
    );

    // The files back: it resumes and catches up.
    for e in std::fs::read_dir(&kept).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), shard_log.join(e.file_name())).unwrap();
    }
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    t.stop_cleanly(d);
}

// See: explore-findings "Not fixed" (spill segments deleted from the front of a shard's log).
/// shard1 is down while the source writes several segments' worth of rows for it (after
/// retention already deleted segments of its log it had applied); the daemon is killed and the
/// OLDEST remaining segment of shard1's log is removed by hand, newer ones kept. Before, the
/// next start took the missing front for retention, streamed, and shard1 silently lacked those
/// rows. Now the start is refused (exit 3) naming shard 1, its directory and the LSN range;
/// with the file back it resumes and converges.
#[test]
fn a_segment_removed_by_hand_from_the_front_of_a_lagging_shard_log_is_refused() {
    let mut t = Topology::start(2);
    let d = streaming(
        &mut t,
        "segment_bytes = 1048576\nmemory_tail_bytes = 1048576\n",
        true,
    );
    // 512 hex digits of noise per row: zstd keeps about half, so each batch fills segments.
    let batch = |t: &Topology, from: u64, msg: &str| {
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, '{msg} ' || \
               (SELECT string_agg(md5(g::text || '.' || i), '') FROM generate_series(1, 16) i), g \
             FROM generate_series({from}, {from} + 9999) g"
        ));
    };
    for k in 0..2 {
        batch(&t, 600_000 + k * 10_000, "applied");
    }
    t.wait_converged(TABLES, Duration::from_secs(90));
    let shard_log = t.spill_dir().join("shard-0001");
    let seg_files = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    };
    t.wait(
        "retention to delete a segment of shard1's log",
        Duration::from_secs(30),
        || {
            seg_files(&shard_log)
                .first()
                .is_some_and(|n| !n.ends_with("-0000000001.seg"))
                .then_some(())
        },
    );

    t.shards[1].stop().unwrap();
    for k in 0..6 {
        batch(&t, 700_000 + k * 10_000, "while shard1 is down");
    }
    let written = t.source_sql("SELECT pg_current_wal_lsn()");
    t.wait(
        &format!("confirmed_flush_lsn to pass {written} while shard1 is down"),
        Duration::from_secs(90),
        || lsn_at_least(&t, &written).then_some(()),
    );
    t.kill9(d);
    t.shards[1].restart().unwrap();
    let before = shard1_progress(&t);
    let segs = seg_files(&shard_log);
    assert!(
        segs.len() >= 3,
        "shard1's backlog must span several segments to remove only the oldest: {segs:?}"
    );
    let oldest = shard_log.join(&segs[0]);
    let held = t.dir.path().join(&segs[0]);
    std::fs::rename(&oldest, &held).unwrap();

    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(
        code,
        Some(3),
        "a segment removed from the front of a lagging shard's log must be refused:\n{}",
        t.all_logs()
    );
    assert!(
        log.contains("shard 1")
            && log.contains(&shard_log.display().to_string())
            && log.contains("at the front of its log")
            && log.contains("Restore the files"),
        "the refusal must name the shard, its directory, the LSN range and the fix:\n{log}"
    );
    assert_eq!(
        shard1_progress(&t),
        before,
        "nothing may move shard1's progress"
    );

    // The file back: it resumes and converges.
    std::fs::rename(&held, &oldest).unwrap();
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(120));
    t.stop_cleanly(d);
}

// See: explore-findings "Not fixed" (a second migration under a new slot name).
/// A finished migration under slot `reshard`; then the config is pointed at a new slot and
/// publication (`r3`) and a fresh spill directory. The start is refused naming the slot the
/// shards' full-load records belong to (`reshard`), not the new one, and creates no slot.
#[test]
fn a_new_slot_on_shards_holding_another_migrations_records_names_that_slot() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);
    let cfg = t.config_path();
    assert_eq!(t.terminate(d, Duration::from_secs(30)), Some(0));

    let text = std::fs::read_to_string(&cfg).unwrap();
    let spill = t.spill_dir().display().to_string();
    let text = text
        .replacen(
            "[source]\n",
            "[source]\nslot = \"r3\"\npublication = \"r3\"\n",
            1,
        )
        .replace(&spill, &format!("{spill}-r3"));
    std::fs::write(&cfg, text).unwrap();
    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_ne!(code, Some(0), "{}", t.all_logs());
    assert!(
        log.contains("name slot reshard, not r3") && !log.contains("earlier run of slot r3"),
        "the refusal must name the slot the records belong to:\n{log}"
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'r3'"),
        "0",
        "no slot may be created"
    );
}

// See: issue #11 item 2 (the slot dropped by hand, old progress rows and chunk records).
/// After a migration ran, rows are written while the daemon is stopped, a DBA drops the slot
/// and the spill directory is gone: a restart would create a new slot past those rows and
/// never copy the finished tables again. It refuses instead, names a shard and the way to
/// start over, and creates no slot.
#[test]
fn a_slot_dropped_by_hand_with_old_progress_is_refused_not_recreated() {
    let mut t = Topology::start(2);
    let d = streaming(&mut t, "", true);
    assert_eq!(t.terminate(d, Duration::from_secs(30)), Some(0));

    t.source_sql(
        "INSERT INTO audit SELECT g % 89 + 1, 'gap', g FROM generate_series(900000, 900999) g",
    );
    t.source_sql("SELECT pg_drop_replication_slot('reshard')");
    std::fs::remove_dir_all(t.spill_dir()).unwrap();

    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(code, Some(3), "must refuse:\n{}", t.all_logs());
    assert!(
        log.contains("no longer exists on the source")
            && (log.contains("shard shard0 holds") || log.contains("shard shard1 holds"))
            && log.contains("reshard slot drop -c <config> --purge"),
        "the refusal must name the shard, its progress and the way out:\n{log}"
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "no slot may be created"
    );
}

// See: issue #11 item 7.
/// Without streaming (PG 12/13, or `streaming = false`) one source transaction larger than
/// `[spill] max_bytes` is read whole: the cap is checked between transactions, the shards
/// apply it, and the slot moves past it. Spool directories left by a killed process are
/// removed at start.
#[test]
fn a_transaction_larger_than_the_spill_cap_is_read_whole() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    let cfg = t.write_config_spill(
        "segment_bytes = 1048576\nmax_bytes = 3145728\nmemory_tail_bytes = 1048576\n",
        "",
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen("\n\n[spill]", "\nstreaming = false\n\n[spill]", 1),
    )
    .unwrap();
    let first = t.spawn_run(&[]);
    t.wait("the slot to be streaming", Duration::from_secs(60), || {
        (t.source_sql("SELECT count(*) FROM pg_replication_slots WHERE active") == "1")
            .then_some(())
    });
    t.source_sql("INSERT INTO plans VALUES (1, 'one')");
    t.wait_converged(TABLES, Duration::from_secs(60));
    // kill -9 leaves the spool directory of its assembler behind (made by hand here: a
    // killed process's directory has the same shape).
    t.kill9(first);
    let leftover = t.spill_dir().join("streams").join("assemble-killed");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("1.spool"), vec![7u8; 1 << 20]).unwrap();

    let d = t.spawn_run(&[]);
    t.wait("the slot to be streaming", Duration::from_secs(60), || {
        (t.source_sql("SELECT count(*) FROM pg_replication_slots WHERE active") == "1")
            .then_some(())
    });
    t.source_sql("INSERT INTO plans VALUES (3, 'three')");
    t.wait_converged(TABLES, Duration::from_secs(60));
    // Streaming (so the ingest runs): the leftover is gone.
    assert!(
        !leftover.exists(),
        "the spool directory of a killed process is still there:\n{}",
        t.all_logs()
    );

    // About 12 MB of hardly compressible text in ONE transaction: about twice the cap once
    // compressed.
    t.source_sql(
        "INSERT INTO audit SELECT g % 101 + 1, \
         (SELECT string_agg(md5(random()::text || x || g), '') FROM generate_series(1, 30) x), g \
         FROM generate_series(1, 12000) g",
    );
    t.source_sql("INSERT INTO plans VALUES (2, 'after the big one')");
    let end = t.source_sql("SELECT pg_current_wal_insert_lsn()");
    t.wait_converged(TABLES, Duration::from_secs(120));
    t.wait(
        "the slot to confirm past the big transaction",
        Duration::from_secs(60),
        || lsn_at_least(&t, &end).then_some(()),
    );
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    let code = t.terminate(d, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", t.all_logs());
}

/// A shard with `synchronous_commit = off` (common on migration targets, and the harness's
/// default) acknowledges a COMMIT before its WAL is written: a crash of that server loses
/// the last acknowledged transactions, among them reshard's group commit with its progress
/// row. The spill log must not have released what only such a commit holds (before, retention
/// deleted the segments once the COMMIT was answered, the shard's progress came back older
/// than the log's front, and the shard stopped for good with "re-copy the shard"; seen in the
/// chaos soak's shard crashes). Made deterministic by a 10 s WAL writer delay on the shard: the
/// commit's record stays in an unwritten WAL page until the server is killed.
#[test]
fn a_shard_crash_losing_acknowledged_commits_is_replayed_from_the_spill_log() {
    let mut t = Topology::start(1);
    t.ddl_everywhere(SCHEMA);
    t.shards[0]
        .psql("app", "ALTER SYSTEM SET wal_writer_delay = '10s'")
        .unwrap();
    t.shards[0].psql("app", "SELECT pg_reload_conf()").unwrap();
    t.write_config_spill("segment_bytes = 1048576\nmemory_tail_bytes = 1048576\n", "");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.wait_converged(TABLES, Duration::from_secs(60));
    for round in 0..3u64 {
        // About 3 MB of hardly compressible text in one transaction: it spans several 1 MiB
        // segments, so a single group commit covers segments that retention may delete.
        t.source_sql(&format!(
            "INSERT INTO audit SELECT g % 101 + 1, \
             (SELECT string_agg(md5(random()::text || x || g), '') FROM generate_series(1, 8) x), \
             {round} * 100000 + g FROM generate_series(1, 12000) g"
        ));
        t.wait_converged(TABLES, Duration::from_secs(90));
        // Acknowledged and visible on the shard: crash it before its WAL writer wakes.
        t.shards[0].kill();
        t.shards[0].restart().unwrap();
        t.wait_converged(TABLES, Duration::from_secs(90));
        assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    }
    let status = t.status_json().unwrap_or_default();
    assert!(
        !status.to_string().contains("went backwards"),
        "{status}\n{}",
        t.all_logs()
    );
    let code = t.terminate(d, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", t.all_logs());
}
