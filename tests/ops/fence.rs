//! Write fencing (`reshard fence`, `unfence`, `cutover --fence`) against real clusters: the
//! fence refuses exactly the writes that PostgreSQL's own hash partitioning routes to the
//! fenced shard, counts them, and a cutover killed at any step converges when run again.
//! See: issue #15.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reshard_engine::ops::fence::{self, FenceSide, FENCE_SQLSTATE};
use reshard_harness::workload::FillSpec;

use super::common::{http_get, port_of, reshard_bin, sample, sqlstate, wait_for, Topology};
use super::{connect, json, load_shards, shard_of, topology_with_data, SHARDED};

const SPEC: FillSpec = FillSpec {
    accounts: 30,
    customers: 4,
    events: 8,
    body_bytes: 16,
};

fn fence_triggers(t: &Topology) -> usize {
    t.source_sql("SELECT count(*) FROM pg_trigger WHERE tgname = 'zz_reshard_fence'")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_refuses_the_fenced_shards_writes_only_and_counts_them() {
    let t = topology_with_data(3, SPEC).await;
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", "shard1", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let first = json(&out, &err);
    assert_eq!(first["shard"], "shard1");
    assert_eq!(first["side"], "source");
    // Idempotent: a second install keeps the first one's time and adds no trigger.
    let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", "shard1", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(json(&out, &err)["installed_at"], first["installed_at"]);
    assert_eq!(
        fence_triggers(&t),
        SHARDED.len(),
        "one trigger per sharded table, none on plans"
    );

    let app = connect(&t.source.url("app")).await;
    let mut refused = 0i64;
    let mut allowed = 0;
    for acct in 1..=30i64 {
        let fenced = shard_of(&t, acct) == 1;
        let writes = [
            format!("INSERT INTO events (account_id, kind) VALUES ({acct}, 'fenced?')"),
            format!("UPDATE customers SET name = name || '!' WHERE account_id = {acct}"),
            format!("DELETE FROM events WHERE account_id = {acct} AND id IN (SELECT min(id) FROM events WHERE account_id = {acct})"),
        ];
        for sql in &writes {
            match app.execute(sql.as_str(), &[]).await {
                Ok(_) => {
                    assert!(
                        !fenced,
                        "account {acct} routes to shard1 but `{sql}` went through"
                    );
                    allowed += 1;
                }
                Err(e) => {
                    assert!(
                        fenced,
                        "account {acct} does not route to shard1 but `{sql}` failed: {e:?}"
                    );
                    assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "{e:?}");
                    let msg = e.as_db_error().unwrap().message().to_owned();
                    assert!(
                        msg.contains("shard shard1") && msg.contains(&format!("account_id={acct}")),
                        "{msg}"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(
        refused > 0 && allowed > 0,
        "refused {refused}, allowed {allowed}"
    );
    // Moving a row of another shard's account into shard1's accounts is a write to shard1.
    let a0 = (1..=30).find(|a| shard_of(&t, *a) == 0).unwrap();
    let a1 = (1..=30).find(|a| shard_of(&t, *a) == 1).unwrap();
    let e = app
        .execute(
            &format!("UPDATE events SET account_id = {a1} WHERE account_id = {a0}"),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "{e:?}");
    refused += 1;
    // TRUNCATE would remove shard1's rows too.
    let e = app.execute("TRUNCATE events", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "{e:?}");
    refused += 1;
    // Broadcast tables are untouched.
    app.execute("UPDATE plans SET name = name || '!'", &[])
        .await
        .expect("broadcast writes are never fenced");
    // reshard's own apply (session_replication_role = replica) and an explicit bypass write.
    app.batch_execute(&format!(
        "SET session_replication_role = replica; INSERT INTO events (account_id, kind) VALUES ({a1}, 'replica'); \
         RESET session_replication_role; SET {} = on; INSERT INTO events (account_id, kind) VALUES ({a1}, 'bypass'); RESET {}",
        fence::FENCE_BYPASS_SETTING,
        fence::FENCE_BYPASS_SETTING
    ))
    .await
    .expect("replica-role and bypass sessions write through the fence");

    // The counter survived every aborted write.
    let fences = fence::status(&app, FenceSide::Source).await.unwrap();
    assert_eq!(fences.len(), 1);
    assert_eq!(fences[0].refused, refused, "{fences:?}");

    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard1", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let removed = json(&out, &err);
    assert_eq!(removed["removed"]["refused"], refused, "{removed:#}");
    assert_eq!(fence_triggers(&t), 0);
    app.execute(
        &format!("INSERT INTO events (account_id, kind) VALUES ({a1}, 'after')"),
        &[],
    )
    .await
    .expect("unfenced: shard1's accounts are writable again");
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard1", "--json"]);
    assert_eq!(code, 0, "unfence is idempotent: {out}\n{err}");
    assert_eq!(json(&out, &err)["removed"], serde_json::Value::Null);

    // Unknown shard: exit 2, naming the configured ones.
    let (code, _, err) = t.reshard(&["fence", "-c", cfg, "--shard", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope") && err.contains("shard0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_on_a_shard_refuses_every_write_of_its_sharded_tables() {
    let t = topology_with_data(2, SPEC).await;
    load_shards(&t);
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", "shard1", "--on", "shard"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s1 = connect(&t.shards[1].url("app")).await;
    let a1 = (1..=30).find(|a| shard_of(&t, *a) == 1).unwrap();
    let e = s1
        .execute(
            &format!("INSERT INTO events (account_id, id, kind) VALUES ({a1}, 999999, 'x')"),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "{e:?}");
    s1.execute("UPDATE plans SET name = name", &[])
        .await
        .expect("broadcast tables are not fenced");
    // The source and the other shard are not fenced.
    let s0 = connect(&t.shards[0].url("app")).await;
    s0.execute(
        "INSERT INTO events (account_id, id, kind) VALUES (1, 999999, 'x')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(fence_triggers(&t), 0);
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard1", "--on", "shard"]);
    assert_eq!(code, 0, "{out}\n{err}");
    s1.execute(
        &format!("INSERT INTO events (account_id, id, kind) VALUES ({a1}, 999999, 'x')"),
        &[],
    )
    .await
    .expect("unfenced");
}

/// Digest of `events` rows: the source's rows that PostgreSQL routes to `shard`, and the
/// shard's rows (those the application wrote there directly after the flip, `kind = 'direct'`,
/// stream back to the source: reverse replication, issue #15).
fn events_digests(t: &Topology, shard: usize) -> (String, String) {
    let helper = t.create_route_helper("bigint");
    let n = t.shards.len();
    let q = |f: &str| {
        format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(e::text, '|' ORDER BY account_id, id)), '-') FROM events e {f}"
        )
    };
    let src = t.source_sql(&q(&format!(
        "WHERE satisfies_hash_partition('{helper}'::regclass, {n}, {shard}, account_id)"
    )));
    let dst = t.shards[shard].psql("app", &q("")).unwrap();
    (src, dst)
}

/// An application that follows a per-shard flag: writes for shard1's accounts go to the
/// source until the flag flips, then to shard1. Counts what the fence refused.
struct Writer {
    stop: Arc<AtomicBool>,
    flipped: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<()>,
}

fn start_writer(t: &Topology, fenced: Vec<i64>) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let flipped = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let (src_url, shard_url) = (t.source.url("app"), t.shards[1].url("app"));
    let (s, f, r, w) = (
        stop.clone(),
        flipped.clone(),
        refused.clone(),
        written.clone(),
    );
    let handle = tokio::spawn(async move {
        let src = connect(&src_url).await;
        let shard = connect(&shard_url).await;
        let mut acct = 0i64;
        while !s.load(Ordering::Relaxed) {
            acct = acct % 30 + 1;
            let on_shard = fenced.contains(&acct) && f.load(Ordering::Relaxed);
            let (client, kind) = if on_shard {
                (&shard, "direct")
            } else {
                (&src, "live")
            };
            match client
                .execute(
                    "INSERT INTO events (account_id, kind) VALUES ($1, $2)",
                    &[&acct, &kind],
                )
                .await
            {
                Ok(_) => {
                    w.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "account {acct}: {e:?}");
                    assert!(
                        fenced.contains(&acct),
                        "account {acct} is not shard1's but was refused: {e:?}"
                    );
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    Writer {
        stop,
        flipped,
        refused,
        written,
        handle,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_cutover_under_a_live_writer_refuses_only_the_shards_accounts() {
    let mut t = topology_with_data(3, SPEC).await;
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    let fenced: Vec<i64> = (1..=30).filter(|a| shard_of(&t, *a) == 1).collect();
    let w = start_writer(&t, fenced.clone());
    wait_for("the writer's first rows", Duration::from_secs(30), || {
        (w.written.load(Ordering::Relaxed) > 50).then_some(())
    });

    let (code, out, err) = tokio::task::block_in_place(|| {
        t.reshard(&[
            "cutover",
            "-c",
            &cfg,
            "--shard",
            "shard1",
            "--fence",
            "--json",
            "--timeout",
            "120s",
        ])
    });
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    let r = json(&out, &err);
    assert_eq!(r["ok"], true, "{r:#}");
    let f = &r["fence"];
    assert_eq!(f["step"], "safe", "{r:#}");
    assert!(f["fenced_secs"].as_f64().unwrap() > 0.0, "{r:#}");
    // The application flips its flag for shard1's accounts.
    w.flipped.store(true, Ordering::Relaxed);
    let at_flip = w.written.load(Ordering::Relaxed);
    wait_for("writes after the flip", Duration::from_secs(30), || {
        (w.written.load(Ordering::Relaxed) > at_flip + 100).then_some(())
    });
    w.stop.store(true, Ordering::Relaxed);
    w.handle.await.unwrap();
    let refused = w.refused.load(Ordering::Relaxed);
    assert!(
        refused > 0,
        "the writer never hit the fence during the cutover"
    );

    // What the source counted is what the application saw.
    let src = connect(&t.source.url("app")).await;
    let fences = fence::status(&src, FenceSide::Source).await.unwrap();
    assert_eq!(fences.len(), 1, "{fences:?}");
    assert_eq!(fences[0].refused as u64, refused);
    // Every shard holds exactly its share of the source (the rows written to shard1 directly
    // after the flip came back to the source by reverse replication), and the source took no
    // write of its own for shard1's accounts.
    tokio::task::block_in_place(|| {
        wait_for(
            "every shard to hold its share",
            Duration::from_secs(60),
            || {
                (0..3)
                    .all(|s| {
                        let (a, b) = events_digests(&t, s);
                        a == b
                    })
                    .then_some(())
            },
        )
    });
    let direct: i64 = t.shards[1]
        .psql("app", "SELECT count(*) FROM events WHERE kind = 'direct'")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(direct > 0);
    // No write of shard1's accounts reached the source once the fence was in place
    // (`installed_at` is cut to the millisecond).
    let fenced_list = fenced
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let since = f["installed_at"].as_str().unwrap();
    assert_eq!(
        t.source_sql(&format!(
            "SELECT coalesce(string_agg(e::text, E'\\n'), '') FROM events e WHERE kind <> 'direct' AND account_id IN ({fenced_list}) \
             AND occurred_at >= '{since}'::timestamptz + interval '1 millisecond'"
        ))
        .trim(),
        "",
        "rows of shard1's accounts written on the source after the fence at {since}"
    );

    // The running daemon shows the fence: status, console, metrics (it polls the source every
    // second).
    let config_text = std::fs::read_to_string(t.config_path()).unwrap();
    let (admin, metrics) = (
        port_of(&config_text, "listen"),
        port_of(&config_text, "metrics"),
    );
    let series = "reshard_fence_refused_writes_total{shard=\"shard1\"}";
    tokio::task::block_in_place(|| {
        wait_for(
            "the metrics to count the refusals",
            Duration::from_secs(15),
            || {
                let (_, body) = http_get(metrics, "/metrics");
                (body.contains(series) && sample(&body, series) == refused).then_some(())
            },
        )
    });
    let (code, out, err) = t.reshard(&["status", "-c", &cfg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let st = json(&out, &err);
    let sf = &st["source"]["fences"][0];
    assert_eq!(sf["shard"], "shard1", "{st:#}");
    assert_eq!(sf["step"], "safe", "{st:#}");
    assert_eq!(sf["refused"].as_u64(), Some(refused), "{st:#}");
    let (console, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={admin} user=reshard dbname=reshard"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let rows: Vec<_> = console
        .simple_query("SHOW FENCES")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get("shard"), Some("shard1"));
    assert_eq!(rows[0].get("refused"), Some(refused.to_string().as_str()));
    t.stop_cleanly(d);
}

fn spawn_cutover(cfg: &str) -> Child {
    Command::new(reshard_bin())
        .args([
            "cutover",
            "-c",
            cfg,
            "--shard",
            "shard1",
            "--fence",
            "--json",
            "--timeout",
            "120s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cutover")
}

/// The fence's `(step, installed_at)` on the source, if there is one.
fn fence_row(t: &Topology) -> Option<(String, String)> {
    if t.source_sql("SELECT to_regclass('reshard.fence') IS NULL")
        .trim()
        == "t"
    {
        return None;
    }
    let out = t.source_sql(
        "SELECT coalesce(max(step || '|' || installed_at::text), '') FROM reshard.fence WHERE shard = 'shard1'",
    );
    let out = out.trim();
    out.split_once('|')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
}

fn lock_waiters(c: &reshard_harness::PgCluster) -> usize {
    c.psql(
        "app",
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'reshard'",
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_cutover_killed_at_each_step_converges_when_run_again() {
    let mut t = topology_with_data(3, SPEC).await;
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap().to_owned();
    let mut d = t.spawn_run(&[]);
    tokio::task::block_in_place(|| {
        t.wait_converged(
            &[("events", Some(("account_id", "bigint")), "account_id, id")],
            Duration::from_secs(60),
        )
    });
    let a1 = (1..=30).find(|a| shard_of(&t, *a) == 1).unwrap();
    let write_a1 = |t: &Topology| {
        t.source
            .psql(
                "app",
                &format!("INSERT INTO events (account_id, kind) VALUES ({a1}, 'probe')"),
            )
            .map_err(|e| e.to_string())
    };

    // 1. Killed while installing the fence (a transaction holds a fenced table).
    let holder = connect(&t.source.url("app")).await;
    holder
        .batch_execute("BEGIN; INSERT INTO events (account_id, kind) VALUES (1, 'holder')")
        .await
        .unwrap();
    let mut c = spawn_cutover(&cfg);
    wait_for(
        "the fence install to wait for the table lock",
        Duration::from_secs(30),
        || (lock_waiters(&t.source) > 0).then_some(()),
    );
    c.kill().unwrap();
    c.wait().unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    wait_for(
        "the killed install to roll back",
        Duration::from_secs(10),
        || (lock_waiters(&t.source) == 0).then_some(()),
    );
    assert_eq!(fence_row(&t), None, "a killed install left a fence");
    assert_eq!(fence_triggers(&t), 0);
    write_a1(&t).expect("no fence: shard1's accounts are writable");

    // 2. Killed while waiting for the shard (the daemon is down): the fence stays.
    t.stop_cleanly(d);
    let mut c = spawn_cutover(&cfg);
    let (step, installed_at) = wait_for("step fenced", Duration::from_secs(30), || fence_row(&t));
    assert_eq!(step, "fenced");
    std::thread::sleep(Duration::from_millis(500));
    c.kill().unwrap();
    c.wait().unwrap();
    assert_eq!(fence_row(&t).map(|r| r.0).as_deref(), Some("fenced"));
    let e = write_a1(&t).unwrap_err();
    assert!(e.contains(FENCE_SQLSTATE) || e.contains("fenced"), "{e}");
    d = t.spawn_run(&[]);

    // 3. Killed while syncing sequences (a transaction holds a shard sequence).
    let s1 = connect(&t.shards[1].url("app")).await;
    s1.batch_execute("BEGIN; ALTER SEQUENCE events_id_seq INCREMENT BY 1")
        .await
        .unwrap();
    let mut c = spawn_cutover(&cfg);
    wait_for("the sequence step to wait", Duration::from_secs(60), || {
        (fence_row(&t).is_some_and(|r| r.0 == "caught_up") && lock_waiters(&t.shards[1]) > 0)
            .then_some(())
    });
    c.kill().unwrap();
    c.wait().unwrap();
    s1.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        fence_row(&t),
        Some(("caught_up".to_owned(), installed_at.clone()))
    );

    // 4. Killed while verifying (a transaction holds a shard table).
    s1.batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut c = spawn_cutover(&cfg);
    wait_for("the verify step to wait", Duration::from_secs(60), || {
        (fence_row(&t).is_some_and(|r| r.0 == "sequences_synced") && lock_waiters(&t.shards[1]) > 0)
            .then_some(())
    });
    c.kill().unwrap();
    c.wait().unwrap();
    s1.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        fence_row(&t),
        Some(("sequences_synced".to_owned(), installed_at.clone()))
    );

    // Run again: it converges, with the first fence's time.
    let (code, out, err) = tokio::task::block_in_place(|| {
        t.reshard(&[
            "cutover",
            "-c",
            &cfg,
            "--shard",
            "shard1",
            "--fence",
            "--json",
            "--timeout",
            "120s",
        ])
    });
    assert_eq!(code, 0, "{out}\n{err}\n{}", t.all_logs());
    let r = json(&out, &err);
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(fence_row(&t), Some(("safe".to_owned(), installed_at)));
    assert!(write_a1(&t).is_err(), "the fence outlives the cutover");
    let log = t.source_sql(
        "SELECT string_agg(event, ',' ORDER BY at) FROM reshard.fence_log WHERE shard = 'shard1'",
    );
    for step in [
        "installed",
        "fenced",
        "caught_up",
        "sequences_synced",
        "safe",
    ] {
        assert!(log.contains(step), "{step} not logged: {log}");
    }
    let (code, out, err) = t.reshard(&["unfence", "-c", &cfg, "--shard", "shard1"]);
    assert_eq!(code, 0, "{out}\n{err}");
    write_a1(&t).expect("unfenced");
    t.stop_cleanly(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_fence_refuses_the_accounts_the_map_and_its_default_send_to_the_shard() {
    let t = topology_with_data(3, SPEC).await;
    // Accounts 1..=29 by the map (account % 3), 30 and anything unlisted by default_shard.
    let csv: String = (1..=29)
        .map(|a| format!("{a:03},shard{}\n", a % 3))
        .collect();
    std::fs::write(
        t.dir.path().join("accounts.csv"),
        format!("account_id,shard\n{csv}"),
    )
    .unwrap();
    t.write_config(
        "[routing]\nhash = \"map\"\nmap = \"accounts.csv\"\ndefault_shard = \"shard1\"\n",
    );
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", "shard1"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let app = connect(&t.source.url("app")).await;
    for acct in 1..=31i64 {
        let fenced = acct >= 30 || acct % 3 == 1;
        let r = app
            .execute(
                "INSERT INTO events (account_id, kind) VALUES ($1, 'map')",
                &[&acct],
            )
            .await;
        match r {
            Ok(_) => assert!(!fenced, "account {acct} maps to shard1 but was written"),
            Err(e) => {
                assert!(fenced, "account {acct} does not map to shard1: {e:?}");
                assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "{e:?}");
            }
        }
    }
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard1"]);
    assert_eq!(code, 0, "{out}\n{err}");
    app.execute(
        "INSERT INTO events (account_id, kind) VALUES (1, 'map')",
        &[],
    )
    .await
    .expect("unfenced");
}

/// A partitioned sharded table on the source: PostgreSQL clones the fence's row trigger onto
/// each partition. Every fence change after the first one (the same fence again, as a resumed
/// `cutover --fence` does; a second shard's fence) used to try to drop those clones as
/// "stale" and failed with 2BP01 (exit 3: no second shard could be fenced). Found by an
/// outside-user run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_of_two_shards_and_a_repeated_fence_keep_a_partitioned_tables_trigger() {
    let t = topology_with_data(2, SPEC).await;
    // Partitions that sort before their parent, so no drop order can hide a clone.
    t.source_sql(
        "CREATE TABLE zparted (account_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (account_id, id)) \
           PARTITION BY HASH (account_id); \
         CREATE TABLE aparted_p0 PARTITION OF zparted FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE aparted_p1 PARTITION OF zparted FOR VALUES WITH (MODULUS 2, REMAINDER 1); \
         INSERT INTO zparted SELECT a, 1 FROM generate_series(1, 30) a",
    );
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    for shard in ["shard1", "shard1", "shard0", "shard1"] {
        let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", shard]);
        assert_eq!(code, 0, "fence {shard}: {out}\n{err}");
    }
    let app = connect(&t.source.url("app")).await;
    for acct in [
        (1..=30).find(|a| shard_of(&t, *a) == 0).unwrap(),
        (1..=30).find(|a| shard_of(&t, *a) == 1).unwrap(),
    ] {
        let e = app
            .execute(&format!("INSERT INTO zparted VALUES ({acct}, 2)"), &[])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), FENCE_SQLSTATE, "account {acct}: {e:?}");
    }
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard0"]);
    assert_eq!(code, 0, "unfence shard0: {out}\n{err}");
    let a0 = (1..=30).find(|a| shard_of(&t, *a) == 0).unwrap();
    app.execute(&format!("INSERT INTO zparted VALUES ({a0}, 3)"), &[])
        .await
        .expect("shard0 unfenced: its accounts are writable");
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard1"]);
    assert_eq!(code, 0, "unfence shard1: {out}\n{err}");
    assert_eq!(
        fence_triggers(&t),
        0,
        "no fence trigger left, on no partition"
    );
}

/// A fenced table moved while fenced into a schema whose name needs quoting (a dot, spaces at
/// the end) still loses its trigger on unfence: the fence read its triggered tables as
/// `schema || '.' || name` and split that text again, at the first dot and trimmed, so it named
/// a table that does not exist and unfence failed, leaving the table refusing writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfence_drops_the_trigger_of_a_table_moved_to_a_schema_with_a_dot() {
    let t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE events (account_id bigint, id bigint, PRIMARY KEY (account_id, id))",
    );
    t.write_config("");
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["fence", "-c", cfg, "--shard", "shard0", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(fence_triggers(&t), 1);
    t.source_sql(r#"CREATE SCHEMA "archive.2026 "; ALTER TABLE events SET SCHEMA "archive.2026 ""#);
    let (code, out, err) = t.reshard(&["unfence", "-c", cfg, "--shard", "shard0", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(fence_triggers(&t), 0, "{out}\n{err}");
    // Every account is writable again.
    t.source_sql(r#"INSERT INTO "archive.2026 ".events SELECT a, 1 FROM generate_series(1, 20) a"#);
}
