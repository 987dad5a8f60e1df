//! `reshard plan --groups K` (issue #16, "Beyond one process"): the groups it writes run as
//! ordinary daemons against one source and converge on every shard; `check` and `run` refuse
//! group configs that overlap.
// See: issue #16.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reshard_harness::workload::{self, FillSpec, LiveSpec};

use super::common::{TableCheck, Topology};
use super::{connect, json, topology_with_data};

const SPEC: FillSpec = FillSpec {
    accounts: 40,
    customers: 20,
    events: 60,
    body_bytes: 48,
};

/// Every table of the multi-tenant fixture, sharded by `account_id` or broadcast (`plans`).
const TABLES: &[TableCheck<'static>] = &[
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
    ("plans", None, "id"),
];

/// A base config whose admin console and metrics ports `p` have `p + 1` free too (group k
/// listens on base + k), below the kernel's ephemeral range, where no connection takes `p + 1`
/// between the plan and the daemon's start.
fn write_base_config(t: &Topology) -> PathBuf {
    let pair = |from: u16| {
        (from..from + 2000)
            .step_by(2)
            .find(|p| {
                let bind = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
                bind(*p) && bind(p + 1)
            })
            .expect("two free ports")
    };
    // Apart per process and per call, so concurrent tests do not pick the same pair.
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
    let seed = u16::try_from(std::process::id() % 200).unwrap_or(0) * 20 + call * 2;
    let admin = pair(20000 + seed);
    let metrics = pair(26000 + seed);
    t.write_config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n"
    ))
}

/// `reshard plan --groups 2 --json` on a base config without `[[tables]]`: (plan, group config
/// paths).
fn plan_two(t: &Topology, base: &Path) -> (serde_json::Value, Vec<PathBuf>) {
    let out = t.dir.path().join("plan");
    let (code, stdout, stderr) = t.reshard(&[
        "plan",
        "--groups",
        "2",
        "-c",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "plan --groups 2:\n{stdout}\n{stderr}");
    let plan = json(&stdout, &stderr);
    let files = plan["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| out.join(g["file"].as_str().unwrap()))
        .collect();
    (plan, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_from_plan_run_as_two_daemons_and_converge_on_three_shards() {
    let mut t = topology_with_data(3, SPEC).await;
    t.source_sql("ANALYZE");
    let base = write_base_config(&t);
    let (plan, files) = plan_two(&t, &base);

    // Every table in exactly one group (the broadcast table too), no group empty.
    let groups = plan["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let mut owned: Vec<String> = Vec::new();
    for g in groups {
        let tables: Vec<String> = g["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["table"].as_str().unwrap().to_owned())
            .collect();
        assert!(!tables.is_empty(), "group {} has no table", g["name"]);
        assert!(
            g["bytes"].as_i64().unwrap() > 0,
            "group {} is balanced by sizes it did not read: {g}",
            g["name"]
        );
        owned.extend(tables);
    }
    owned.sort();
    let mut want: Vec<String> = TABLES
        .iter()
        .map(|(n, _, _)| format!("public.{n}"))
        .collect();
    want.sort();
    assert_eq!(owned, want, "each table in exactly one group");

    // check proves the two configs disjoint (and passes as a whole).
    for f in &files {
        let (code, out, err) = t.reshard(&["check", "-c", f.to_str().unwrap(), "--json"]);
        let report = json(&out, &err);
        assert_eq!(code, 0, "check -c {}:\n{out}\n{err}", f.display());
        let peers = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "group_peers")
            .unwrap_or_else(|| panic!("no group_peers line:\n{out}"));
        assert_eq!(peers["status"], "pass", "{peers}");
    }

    // Two ordinary daemons, one per group config, against the one source.
    let d0 = t.spawn_run_config(&files[0], &[]);
    let d1 = t.spawn_run_config(&files[1], &[]);
    let slots: Vec<String> = groups
        .iter()
        .map(|g| g["slot"].as_str().unwrap().to_owned())
        .collect();
    // Both walsenders attached, and both daemons still up (a daemon that died says why).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        for d in [d0, d1] {
            assert!(t.is_running(d), "a group daemon exited:\n{}", t.all_logs());
        }
        let active = t.source_sql(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name IN ('{}', '{}')",
            slots[0], slots[1]
        ));
        if active == "2" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both groups' slots not streaming after 120 s:\n{}",
            t.all_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Live writes: transactions that touch tables of both groups, inserts, updates that move
    // rows between accounts (shards), deletes.
    let mut src = connect(&t.source.url("app")).await;
    let stats = workload::live(
        &mut src,
        LiveSpec {
            accounts: SPEC.accounts,
            max_txns: 400,
            max_duration: Duration::from_secs(20),
            txns_per_sec: 0,
            large_txn_percent: 5,
            seed: 16,
        },
    )
    .await
    .expect("live writes");
    assert!(stats.txns > 0);
    for d in [d0, d1] {
        assert!(t.is_running(d), "a group daemon exited:\n{}", t.all_logs());
    }
    t.wait_converged(TABLES, Duration::from_secs(120));

    // Each group publishes exactly its tables, and each shard holds one progress row per group
    // (keyed by slot: the two groups never write the same row).
    for g in groups {
        let mut tables: Vec<&str> = g["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["table"].as_str().unwrap())
            .collect();
        tables.sort();
        let published = t.source_sql(&format!(
            "SELECT string_agg(schemaname || '.' || tablename, ',' ORDER BY schemaname, tablename) FROM pg_publication_tables WHERE pubname = '{}'",
            g["publication"].as_str().unwrap()
        ));
        assert_eq!(published, tables.join(","), "publication of {}", g["name"]);
    }
    for (i, s) in t.shards.iter().enumerate() {
        let rows = s
            .psql(
                "app",
                "SELECT string_agg(slot, ',' ORDER BY slot) FROM reshard.progress",
            )
            .unwrap();
        assert_eq!(rows, slots.join(","), "progress rows on shard{i}");
    }
    t.stop_cleanly(d0);
    t.stop_cleanly(d1);

    // A group's purge removes its own rows on the shards and leaves its peer's; the last
    // group's purge removes the schema.
    let purge = |f: &PathBuf| {
        let (code, out, err) = t.reshard(&["slot", "drop", "-c", f.to_str().unwrap(), "--purge"]);
        assert_eq!(
            code,
            0,
            "slot drop --purge -c {}:\n{out}\n{err}",
            f.display()
        );
    };
    purge(&files[0]);
    let g0_tables: Vec<String> = groups[0]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("'{}'", t["table"].as_str().unwrap()))
        .collect();
    for (i, s) in t.shards.iter().enumerate() {
        let rows = s
            .psql(
                "app",
                "SELECT string_agg(slot, ',' ORDER BY slot) FROM reshard.progress",
            )
            .unwrap();
        assert_eq!(rows, slots[1], "shard{i} after purging g0");
        let chunks = |tables: String| {
            s.psql(
                "app",
                &format!(
                    "SELECT count(*) FROM reshard.fullload_chunks WHERE source_table IN ({tables})"
                ),
            )
            .unwrap()
        };
        assert_eq!(
            chunks(g0_tables.join(",")),
            "0",
            "g0's load records on shard{i}"
        );
        assert_ne!(
            s.psql("app", "SELECT count(*) FROM reshard.fullload_chunks")
                .unwrap(),
            "0",
            "g1's load records on shard{i} must stay"
        );
    }
    purge(&files[1]);
    for s in &t.shards {
        assert_eq!(
            s.psql(
                "app",
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'reshard'"
            )
            .unwrap(),
            "0"
        );
    }
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_refuse_overlapping_group_configs() {
    let mut t = topology_with_data(2, SPEC).await;
    let base = write_base_config(&t);

    // More groups than tables: refused, naming the range.
    let (code, out, err) = t.reshard(&["plan", "--groups", "7", "-c", base.to_str().unwrap()]);
    assert_eq!(code, 2, "plan --groups 7 over 6 tables:\n{out}\n{err}");
    assert!(err.contains("--groups 2..=6"), "{err}");

    let (_, files) = plan_two(&t, &base);
    // The human plan: the groups, every table with its group, and what to run.
    let again = t.dir.path().join("again");
    let (code, out, err) = t.reshard(&[
        "plan",
        "--groups",
        "2",
        "-c",
        base.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    eprintln!("{out}");
    for want in [
        "GROUP",
        "public.plans",
        "broadcast",
        "reshard_g1",
        "reshard check -c",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // Files are never overwritten silently.
    let (code, out, err) = t.reshard(&[
        "plan",
        "--groups",
        "2",
        "-c",
        base.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("already exist") && err.contains("--force"),
        "{err}"
    );
    // A third config that is group g0 again under another name: same tables, slot,
    // publication and spill directory. Listed as a peer of g0.
    let g0 = std::fs::read_to_string(&files[0]).unwrap();
    let dir = files[0].parent().unwrap();
    std::fs::write(
        dir.join("copy.toml"),
        g0.replace("name = \"g0\"", "name = \"copy\""),
    )
    .unwrap();
    let peers = g0
        .lines()
        .find(|l| l.starts_with("peers = ["))
        .expect("a peers line")
        .to_owned();
    std::fs::write(
        &files[0],
        g0.replace(&peers, &peers.replace("]", ", \"copy.toml\"]")),
    )
    .unwrap();

    let (code, out, err) = t.reshard(&["check", "-c", files[0].to_str().unwrap(), "--json"]);
    assert_eq!(code, 1, "check of overlapping groups:\n{out}\n{err}");
    let report = json(&out, &err);
    let overlaps: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "group_overlap" && c["status"] == "fail")
        .map(|c| c["detail"].as_str().unwrap().to_owned())
        .collect();
    let all = overlaps.join("\n");
    let slot = g0
        .lines()
        .find_map(|l| l.strip_prefix("slot = \""))
        .map(|s| s.trim_end_matches('"').to_owned())
        .expect("the group's slot");
    for want in [
        "table public.".to_owned(),
        format!("slot {slot}"),
        format!("reshard.progress: slot {slot}, shards [shard0, shard1]"),
        "spill directory".to_owned(),
        "publication".to_owned(),
    ] {
        assert!(all.contains(&want), "no overlap naming {want:?}:\n{all}");
    }
    assert!(
        !all.contains("reshard-g1.toml"),
        "the real peer g1 overlaps nothing:\n{all}"
    );

    // run refuses too, before creating anything on the source.
    let d = t.spawn_run_config(&files[0], &[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(2),
        "run with an overlapping peer:\n{}",
        t.all_logs()
    );
    assert!(t.last_log().contains("public."), "{}", t.last_log());
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "run created a slot before refusing"
    );
}
