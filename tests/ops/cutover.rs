//! `reshard cutover` returns only once the shard holds the source's latest write, then moves
//! its sequences past the source's (never backwards) and verifies it.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reshard_engine::pg::progress::PROGRESS_DDL;
use reshard_engine::Lsn;
use reshard_harness::workload::FillSpec;

use super::common::{reshard_bin, Topology};
use super::{json, load_shards, shard_of, topology_with_data};

/// The entry of sequence `name` in a cutover report's `sequences`.
fn sequence(r: &serde_json::Value, name: &str) -> serde_json::Value {
    r["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no sequence {name} in {r:#}"))
}

/// `reshard cutover -c <config> --shard <shard> <extra…>`: (exit code, stdout, stderr).
fn cutover(t: &Topology, shard: &str, extra: &[&str]) -> (i32, String, String) {
    let cfg = t.config_path();
    let mut args = vec!["cutover", "-c", cfg.to_str().unwrap(), "--shard", shard];
    args.extend_from_slice(extra);
    t.reshard(&args)
}

const SPEC: FillSpec = FillSpec {
    accounts: 30,
    customers: 10,
    events: 20,
    body_bytes: 16,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_waits_for_the_latest_write_then_sets_sequences() {
    let t = topology_with_data(3, SPEC).await;
    load_shards(&t);
    t.write_config("");
    let cfg = t.config_path();
    let shard = 1usize;
    let sysid = t.source_sql("SELECT system_identifier FROM pg_control_system()");
    // The shard is fed by "reshard" (the test plays the apply stage): progress is old.
    t.shards[shard].psql("app", PROGRESS_DDL).unwrap();
    t.shards[shard]
        .psql(
            "app",
            &format!(
                "INSERT INTO reshard.progress (source_system_id, slot, shard, commit_lsn, end_lsn, commit_time) \
                 VALUES ('{sysid}', 'reshard', 'shard{shard}', '0/1', '0/1', now())"
            ),
        )
        .unwrap();
    // Standalone sequence: the source is at 5000; the shard is already far ahead (must stay).
    t.source_sql("SELECT setval('invoice_number_seq', 5000)");
    t.shards[shard]
        .psql("app", "SELECT setval('invoice_number_seq', 1000000)")
        .unwrap();
    // Owned sequence of events.id: the shard has never used it.
    let src_events_seq: i64 = t
        .source_sql("SELECT last_value FROM events_id_seq")
        .parse()
        .unwrap();

    // The source's latest write, for an account of this shard.
    let acct = (1..=30).find(|a| shard_of(&t, *a) == shard).unwrap();
    t.source_sql(&format!(
        "INSERT INTO events (account_id, id, kind, occurred_at) VALUES ({acct}, 777777, 'latest', '2024-01-01 00:00:00+00')"
    ));

    let started = Instant::now();
    let mut child = Command::new(reshard_bin())
        .args([
            "cutover",
            "-c",
            cfg.to_str().unwrap(),
            "--shard",
            "shard1",
            "--json",
            "--timeout",
            "60s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "cutover returned before the shard applied the latest write"
    );
    // Apply: the row and the progress row in one transaction, at the source's current LSN;
    // then keep the progress row moving like the apply stage's heartbeats of an idle shard
    // (the verify inside cutover waits for the source's LSN at its own snapshot).
    let lsn = t.source_sql("SELECT pg_current_wal_lsn()");
    t.shards[shard]
        .psql(
            "app",
            &format!(
                "BEGIN; INSERT INTO events (account_id, id, kind, occurred_at) VALUES ({acct}, 777777, 'latest', '2024-01-01 00:00:00+00'); \
                 UPDATE reshard.progress SET commit_lsn = '{lsn}', end_lsn = '{lsn}', commit_time = now(); COMMIT"
            ),
        )
        .unwrap();
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let now = t.source_sql("SELECT pg_current_wal_lsn()");
                t.shards[shard]
                    .psql(
                        "app",
                        &format!(
                            "UPDATE reshard.progress SET commit_lsn = '{now}', end_lsn = '{now}'"
                        ),
                    )
                    .unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let out = child.wait_with_output().unwrap();
        stop.store(true, Ordering::Relaxed);
        out
    });
    let waited = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(waited >= Duration::from_secs(2));
    let r = json(&stdout, &stderr);
    assert_eq!(r["ok"], true);
    assert_eq!(r["marker"], "logical_message");
    assert!(r["waited_secs"].as_f64().unwrap() >= 1.5, "{r:#}");
    let lsn_of = |v: &serde_json::Value| -> Lsn { v.as_str().unwrap().parse().unwrap() };
    assert!(
        lsn_of(&r["reached_lsn"]) >= lsn_of(&r["target_lsn"]),
        "{r:#}"
    );
    assert!(
        lsn_of(&r["target_lsn"]) <= lsn.parse::<Lsn>().unwrap(),
        "{r:#}"
    );
    assert_eq!(r["verify"]["ok"], true, "{r:#}");

    let seq = |name: &str| sequence(&r, name);
    let inv = seq("public.invoice_number_seq");
    assert_eq!(inv["source_value"], 5000);
    assert_eq!(inv["action"], "unchanged");
    assert_eq!(inv["shard_after"], 1000000);
    let ev = seq("public.events_id_seq");
    assert_eq!(ev["action"], "set");
    assert_eq!(ev["shard_after"], src_events_seq + 1000);
    // What the shard really holds.
    assert_eq!(
        t.shards[shard]
            .psql("app", "SELECT last_value FROM invoice_number_seq")
            .unwrap(),
        "1000000"
    );
    assert_eq!(
        t.shards[shard]
            .psql("app", "SELECT nextval('events_id_seq')")
            .unwrap(),
        (src_events_seq + 1001).to_string()
    );
    // Another shard's sequences were not touched.
    assert_eq!(
        t.shards[0]
            .psql("app", "SELECT is_called FROM events_id_seq")
            .unwrap(),
        "f"
    );
    let events_rows = r["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["table"] == "public.events")
        .unwrap()["rows"]
        .as_u64()
        .unwrap();
    let expected: u64 = t.shards[shard]
        .psql("app", "SELECT count(*) FROM events")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(events_rows, expected);

    // Running it again never moves a sequence backwards.
    let (code, out, err) = cutover(&t, "shard1", &["--json", "--no-verify", "--timeout", "5"]);
    assert_eq!(
        code, 1,
        "the second cutover has a new marker the shard has not reached: {out}{err}"
    );
    assert!(err.contains("behind"), "{err}");
    assert_eq!(
        t.shards[shard]
            .psql("app", "SELECT last_value FROM events_id_seq")
            .unwrap(),
        (src_events_seq + 1001).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_waits_for_a_shard_reshard_never_fed_and_times_out_when_behind() {
    let t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.write_config("");
    // No progress table at all and no daemon: exit 3 once the timeout passes, saying what it
    // waited for and that nothing runs.
    let (code, _, err) = cutover(&t, "shard0", &["--timeout", "1s"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("has no progress row after waiting"), "{err}");
    assert!(err.contains("no reshard run is up"), "{err}");
    // Unknown shard: exit 2.
    let (code, _, err) = cutover(&t, "nope", &[]);
    assert_eq!(code, 2, "{err}");
    // Behind: exit 1 after the timeout, saying how far behind.
    let sysid = t.source_sql("SELECT system_identifier FROM pg_control_system()");
    t.shards[0].psql("app", PROGRESS_DDL).unwrap();
    t.shards[0]
        .psql(
            "app",
            &format!("INSERT INTO reshard.progress VALUES ('{sysid}', 'reshard', 'shard0', '0/10', '0/10', now())"),
        )
        .unwrap();
    let started = Instant::now();
    let (code, out, err) = cutover(&t, "shard0", &["--timeout", "1s", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        err.contains("bytes behind") && err.contains("0/10"),
        "{err}"
    );
    let r = json(&out, &err);
    assert_eq!(r["ok"], false);

    // Caught up (a progress row past every LSN): the sequences that are behind are set in one
    // statement; one that cannot be set (its MAXVALUE is below the source's value + the gap)
    // makes that statement fail, and then each is set on its own: the failure is named on its
    // sequence, the others are set all the same, and the shard is not SAFE.
    t.shards[0]
        .psql(
            "app",
            "UPDATE reshard.progress SET commit_lsn = 'FFFFFFFF/FFFFFFFF', end_lsn = 'FFFFFFFF/FFFFFFFF'",
        )
        .unwrap();
    let seqs =
        "CREATE SEQUENCE seq_a; CREATE SEQUENCE seq_bounded MAXVALUE 100; CREATE SEQUENCE seq_z";
    t.source_sql(seqs);
    t.shards[0].psql("app", seqs).unwrap();
    t.source_sql("SELECT setval('seq_a', 50), setval('seq_bounded', 50), setval('seq_z', 70)");
    let (code, out, err) = cutover(&t, "shard0", &["--no-verify", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let r = json(&out, &err);
    assert_eq!(r["ok"], false, "{r:#}");
    let seq = |name: &str| sequence(&r, name);
    assert_eq!(seq("public.seq_a")["action"], "set", "{r:#}");
    assert_eq!(seq("public.seq_a")["shard_after"], 1050, "{r:#}");
    assert_eq!(seq("public.seq_z")["action"], "set", "{r:#}");
    assert_eq!(seq("public.seq_z")["shard_after"], 1070, "{r:#}");
    let bounded = seq("public.seq_bounded");
    let action = bounded["action"].as_str().unwrap();
    assert!(
        action.starts_with("error") && action.contains("seq_bounded"),
        "{r:#}"
    );
    assert_eq!(
        t.shards[0]
            .psql("app", "SELECT last_value FROM seq_z")
            .unwrap(),
        "1070"
    );
    // The report says where the time went, step by step.
    let steps: Vec<&str> = r["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "connect",
            "fence",
            "marker",
            "wait",
            "record caught_up",
            "sequences",
            "count",
            "record verdict"
        ],
        "{r:#}"
    );
}

/// Sequences whose names need quoting (a dot inside the name, upper case, quotes, spaces at
/// either end) are set under their own names: cutover read `schema || '.' || name` and split
/// that text again, which trimmed the spaces (and would cut a dotted schema at its dot), so such
/// a sequence failed to be set and the shard would hand out ids the source already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_sets_sequences_whose_names_need_quoting() {
    let t = Topology::start(2);
    t.ddl_everywhere(
        r#"CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text);
           CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Orders" (account_id bigint, id bigint, PRIMARY KEY (account_id, id));
           CREATE SEQUENCE "order.id_seq";
           CREATE SEQUENCE " padded seq ";
           CREATE SEQUENCE "Sales"."Invoice ""No"" Seq";
           CREATE SEQUENCE "Sales"."ledger.id_seq""#,
    );
    t.write_config("");
    let sysid = t.source_sql("SELECT system_identifier FROM pg_control_system()");
    t.shards[0].psql("app", PROGRESS_DDL).unwrap();
    t.shards[0]
        .psql(
            "app",
            &format!("INSERT INTO reshard.progress VALUES ('{sysid}', 'reshard', 'shard0', 'FFFFFFFF/FFFFFFFF', 'FFFFFFFF/FFFFFFFF', now())"),
        )
        .unwrap();
    // (the name as SQL and the report spell it, the source's value)
    let seqs = [
        (r#"public."order.id_seq""#, 40),
        (r#"public." padded seq ""#, 80),
        (r#""Sales"."Invoice ""No"" Seq""#, 60),
        (r#""Sales"."ledger.id_seq""#, 70),
    ];
    for (name, value) in seqs {
        t.source_sql(&format!("SELECT setval('{name}', {value})"));
    }
    let (code, out, err) = cutover(&t, "shard0", &["--no-verify", "--json"]);
    let r = json(&out, &err);
    // What the shard really holds: every sequence past the source's value + the gap.
    for (name, value) in seqs {
        let on_shard: i64 = t.shards[0]
            .psql("app", &format!("SELECT last_value FROM {name}"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            on_shard >= value + 1000,
            "{name} is at {on_shard} on the shard, below the source's {value} + 1000: {r:#}"
        );
    }
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(r["ok"], true, "{r:#}");
    for (name, value) in seqs {
        let s = sequence(&r, name);
        assert_eq!(s["action"], "set", "{name}: {r:#}");
        assert_eq!(s["source_value"], value, "{name}: {r:#}");
        assert_eq!(s["shard_after"], value + 1000, "{name}: {r:#}");
    }
}
