//! `reshard check` catches each misconfiguration, for the specific reason, and passes a good
//! setup.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reshard_harness::workload::FillSpec;
use reshard_harness::PgCluster;

use super::common::{wait_for, Tmpfs, Topology};
use super::{json, topology_with_data};

const SMALL: FillSpec = FillSpec {
    accounts: 20,
    customers: 5,
    events: 10,
    body_bytes: 16,
};

/// Runs `reshard check --json`; returns the exit code and the parsed report.
fn check(t: &Topology) -> (i32, serde_json::Value) {
    let cfg = t.config_path();
    let (code, out, err) = t.reshard(&["check", "-c", cfg.to_str().unwrap(), "--json"]);
    let mut report = json(&out, &err);
    report["stderr"] = serde_json::Value::String(err);
    (code, report)
}

/// The FAIL lines of a report as (check, target, detail).
fn fails(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| {
            (
                c["check"].as_str().unwrap_or_default().to_owned(),
                c["target"].as_str().unwrap_or_default().to_owned(),
                c["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Asserts exit 1 and a FAIL of `check` on `target` whose detail contains `needle`, and that
/// the line carries a fix.
fn assert_fails(case: &str, t: &Topology, check_name: &str, target: &str, needle: &str) {
    let (code, report) = check(t);
    let f = fails(&report);
    assert_eq!(code, 1, "{case}: exit code; fails: {f:#?}");
    assert_eq!(report["ok"], false, "{case}");
    let line = report["checks"].as_array().unwrap().iter().find(|c| {
        c["status"] == "fail"
            && c["check"] == check_name
            && c["target"] == target
            && c["detail"].as_str().unwrap_or_default().contains(needle)
    });
    let Some(line) = line else {
        panic!("{case}: no FAIL {check_name} on {target} containing {needle:?}; fails: {f:#?}");
    };
    assert!(
        line["fix"].as_str().is_some_and(|f| !f.is_empty()),
        "{case}: FAIL without a fix: {line}"
    );
}

fn assert_passes(case: &str, t: &Topology) {
    let (code, report) = check(t);
    assert_eq!(code, 0, "{case}: expected a pass: {report:#}");
    assert_eq!(report["ok"], true, "{case}");
}

/// Points `[source] url` at `user` instead of the superuser.
fn config_as(t: &Topology, user: &str, extra: &str) {
    t.write_config(extra);
    let p = t.config_path();
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replacen(
        &t.source.url("app"),
        &format!("postgres://{user}@127.0.0.1:{}/app", t.source.port()),
        1,
    );
    std::fs::write(&p, text).unwrap();
}

fn recvlogical(source: &PgCluster) -> Child {
    let bin = reshard_harness::bindir().unwrap();
    Command::new(bin.join("pg_recvlogical"))
        .arg("-d")
        .arg(source.conninfo("app"))
        .args(["-S", "reshard", "--start", "-o", "proto_version=1"])
        .args(["-o", "publication_names=reshard", "-f", "/dev/null", "-n"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pg_recvlogical")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_catches_each_misconfiguration_and_passes_a_good_setup() {
    let t = topology_with_data(3, SMALL).await;
    t.write_config("");
    assert_passes("good setup (tables derived from the source)", &t);
    {
        // Text output: aligned columns and a summary.
        let cfg = t.config_path();
        let (code, out, _) = t.reshard(&["check", "-c", cfg.to_str().unwrap()]);
        assert_eq!(code, 0);
        assert!(out.starts_with("STATUS  CHECK"), "{out}");
        assert!(out.contains("WARN    max_slot_wal_keep_size"), "{out}");
        assert!(out.contains("0 failed"), "{out}");
    }

    // A role without REPLICATION (but allowed to read everything).
    t.source_sql("CREATE ROLE norepl LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO norepl");
    config_as(&t, "norepl", "");
    assert_fails(
        "missing REPLICATION",
        &t,
        "replication_privilege",
        "source",
        "norepl",
    );

    // A replication role that may not read public.events.
    t.source_sql(
        "CREATE ROLE nosel LOGIN REPLICATION; GRANT SELECT ON ALL TABLES IN SCHEMA public TO nosel; \
         REVOKE SELECT ON events FROM nosel",
    );
    config_as(&t, "nosel", "");
    assert_fails(
        "missing SELECT",
        &t,
        "select_privilege",
        "source",
        "public.events",
    );
    t.write_config("");

    // A table missing on a shard.
    t.shards[1]
        .psql("app", "ALTER TABLE plans RENAME TO plans_old")
        .unwrap();
    assert_fails(
        "table missing on a shard",
        &t,
        "target_table",
        "shard1",
        "public.plans",
    );
    // See: explore-findings R2-1 (the fix line's pg_dump -t argument, unquoted): one shell word
    // that pg_dump reads as a literal, case-kept name.
    let (_, report) = check(&t);
    let fix = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "fail" && c["check"] == "target_table")
        .and_then(|c| c["fix"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        fix.contains(r#"pg_dump --schema-only -t '"public"."plans"' "#),
        "{fix}"
    );
    t.shards[1]
        .psql("app", "ALTER TABLE plans_old RENAME TO plans")
        .unwrap();

    // A column type mismatch on a shard.
    t.shards[2]
        .psql(
            "app",
            "ALTER TABLE events ALTER COLUMN kind TYPE varchar(20)",
        )
        .unwrap();
    assert_fails(
        "column type mismatch",
        &t,
        "target_columns",
        "shard2",
        "public.events.kind",
    );
    t.shards[2]
        .psql("app", "ALTER TABLE events ALTER COLUMN kind TYPE text")
        .unwrap();
    assert_passes("reverted", &t);

    // No primary key and REPLICA IDENTITY DEFAULT.
    t.ddl_everywhere("CREATE TABLE audit_log (account_id bigint NOT NULL, msg text)");
    assert_fails(
        "no PK, RI DEFAULT",
        &t,
        "replica_identity",
        "source",
        "public.audit_log",
    );
    t.ddl_everywhere("DROP TABLE audit_log");

    // Shard key missing: plans configured as sharded.
    t.write_config(
        "[[tables]]\nname = \"accounts\"\n\n[[tables]]\nname = \"plans\"\nmode = \"sharded\"\n",
    );
    assert_fails(
        "shard key missing",
        &t,
        "shard_key",
        "source",
        "public.plans has no shard key column account_id",
    );

    // Shard key not in the replica identity.
    t.write_config("");
    t.ddl_everywhere("CREATE TABLE orders (id bigint PRIMARY KEY, account_id bigint NOT NULL)");
    assert_fails(
        "shard key not in replica identity",
        &t,
        "shard_key",
        "source",
        "public.orders: shard key account_id is not part of the replica identity",
    );
    t.ddl_everywhere("DROP TABLE orders");
    assert_passes("reverted", &t);

    // See: issue #11 item 9. A nullable shard key: a NULL row cannot be routed.
    t.ddl_everywhere(
        "CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint, body text); \
         ALTER TABLE notes REPLICA IDENTITY FULL",
    );
    assert_fails(
        "nullable shard key",
        &t,
        "shard_key_not_null",
        "source",
        "public.notes.account_id is nullable",
    );
    let (_, report) = check(&t);
    let fix = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "shard_key_not_null" && c["status"] == "fail")
        .and_then(|c| c["fix"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        fix.contains("IS NULL")
            && fix
                .contains(r#"ALTER TABLE "public"."notes" ALTER COLUMN "account_id" SET NOT NULL"#),
        "{fix}"
    );
    t.ddl_everywhere("DROP TABLE notes");
    assert_passes("reverted", &t);

    // Publication missing a configured table.
    t.source_sql(
        "CREATE PUBLICATION reshard FOR TABLE accounts, customers, subscriptions, invoices, plans",
    );
    assert_fails(
        "publication missing a table",
        &t,
        "publication",
        "source",
        "does not publish public.events",
    );
    t.source_sql("ALTER PUBLICATION reshard ADD TABLE events");
    assert_passes("publication complete", &t);

    // Slot in use by another connection.
    t.source_sql("SELECT pg_create_logical_replication_slot('reshard', 'pgoutput')");
    let mut child = recvlogical(&t.source);
    wait_for(
        "pg_recvlogical to hold the slot",
        Duration::from_secs(20),
        || {
            let a =
                t.source_sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'reshard'");
            (a == "t").then_some(())
        },
    );
    let pid =
        t.source_sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'reshard'");
    assert_fails(
        "slot in use",
        &t,
        "slot",
        "source",
        &format!("active_pid = {pid}"),
    );
    let _ = child.kill();
    let _ = child.wait();
    wait_for("the slot to be released", Duration::from_secs(20), || {
        let a = t.source_sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'reshard'");
        (a == "f").then_some(())
    });
    let (code, report) = check(&t);
    assert_eq!(code, 0, "{:#?}", fails(&report));
    let slot_line = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "slot")
        .unwrap();
    assert!(
        slot_line["detail"].as_str().unwrap().contains("resumes"),
        "{slot_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_wal_level_is_replica() {
    let t = Topology::start_with(1, || PgCluster::builder().setting("wal_level", "replica"));
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.write_config("");
    assert_fails(
        "wal_level=replica",
        &t,
        "wal_level",
        "source",
        "wal_level = replica",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_without_a_free_replication_slot() {
    let t = Topology::start_with(1, || {
        PgCluster::builder().setting("max_replication_slots", "2")
    });
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.source_sql(
        "SELECT pg_create_physical_replication_slot('other1'); \
         SELECT pg_create_physical_replication_slot('other2')",
    );
    t.write_config("");
    assert_fails(
        "no slot headroom",
        &t,
        "replication_slots",
        "source",
        "all 2 replication slots are in use",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_unreachable_shard_and_exits_3() {
    let mut t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.write_config("");
    t.shards[1].stop().unwrap();
    let (code, report) = check(&t);
    assert_eq!(code, 3);
    let f = fails(&report);
    assert!(
        f.iter()
            .any(|(c, target, _)| c == "connect" && target == "shard1"),
        "{f:#?}"
    );
    // The reachable shard was still checked.
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["target"] == "shard0" && c["check"] == "target_table"),
        "{report:#}"
    );
}

// See: explore R3-6 (`check` could warn before the spill disk fills).
/// `check` WARNs (with the fix) when the spill directory's filesystem cannot hold
/// `[spill] max_bytes`, and passes that line when it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_the_spill_filesystem_is_smaller_than_max_bytes() {
    let t = Topology::start(1);
    let Some(_disk) = Tmpfs::mount_at(&t.spill_dir(), 8 << 20) else {
        println!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let line = |report: &serde_json::Value| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "spill_space")
            .cloned()
            .unwrap_or_else(|| panic!("no spill_space line: {report:#}"))
    };
    // The default cap (10 GiB) on an 8 MiB filesystem.
    t.write_config("");
    let (_, report) = check(&t);
    let l = line(&report);
    assert_eq!(l["status"], "warn", "{l:#}");
    let detail = l["detail"].as_str().unwrap();
    assert!(
        detail.contains(&t.spill_dir().display().to_string()) && detail.contains("max_bytes"),
        "{l:#}"
    );
    assert!(
        l["fix"].as_str().is_some_and(|f| f.contains("max_bytes")),
        "{l:#}"
    );
    // A cap the filesystem can hold.
    t.write_config_spill("segment_bytes = 1048576\nmax_bytes = 4194304\n", "");
    let (_, report) = check(&t);
    assert_eq!(line(&report)["status"], "pass", "{report:#}");
}
