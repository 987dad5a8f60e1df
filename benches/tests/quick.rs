//! The benchmark harness must not rot: `reshard-bench --quick` runs end to end for the
//! scenarios that do not need the reshard daemon (native fan-out, raw COPY, one-slot ceiling),
//! and every contestant's shards end up holding exactly what the source says they must.
//!
//! Runs as part of `cargo test --workspace` (scripts/test, CI): cargo builds `reshard-bench`
//! for this test. `reshard` is looked up next to it (`target/<profile>/reshard`, built by the
//! same `cargo test --workspace` for the CLI's integration tests); with the daemon in place,
//! drop `--without-reshard` below to run the full quick benchmark.
// See: issue "Benchmark harness".

use std::path::PathBuf;
use std::process::Command;

fn bench_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_reshard-bench"))
}

fn figure(
    report: &serde_json::Value,
    scenario: &str,
    contestant: &str,
    metric: &str,
) -> Option<f64> {
    report["figures"].as_array()?.iter().find_map(|f| {
        (f["scenario"] == scenario && f["contestant"] == contestant && f["metric"] == metric)
            .then(|| f["value"].as_f64())
            .flatten()
    })
}

#[test]
fn quick_run_without_reshard_measures_every_comparison() {
    let bin = bench_bin();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&bin)
        .args([
            "--quick",
            "--without-reshard",
            "--shards",
            "2",
            "--steady-secs",
            "3",
            "--light-secs",
            "3",
        ])
        .args(["--changes", "20000", "--fullload-scale", "0.4"])
        .arg("--results-dir")
        .arg(out_dir.path())
        .output()
        .expect("run reshard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "reshard-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("## Goals"), "{stdout}");
    assert!(out_dir.path().join("latest.md").exists());
    let json = std::fs::read_dir(out_dir.path())
        .expect("results dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a JSON report");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read JSON")).expect("JSON");
    assert!(
        report["machine"]["cores"].as_u64().is_some_and(|c| c >= 1),
        "{report}"
    );
    assert!(
        report["machine"]["postgres_version"].is_string(),
        "{report}"
    );

    let must = |s: &str, c: &str, m: &str| {
        figure(&report, s, c, m)
            .unwrap_or_else(|| panic!("no {s}/{c}/{m} in the report:\n{stdout}"))
    };
    let backlog = must("catchup", "backlog", "changes");
    assert!(backlog >= 20_000.0, "{backlog}");
    for (s, c, m) in [
        ("catchup", "ceiling", "changes_per_sec"),
        ("catchup", "native", "changes_per_sec"),
        ("catchup-1row", "ceiling", "changes_per_sec"),
        ("catchup-1row", "native", "changes_per_sec"),
        ("catchup-5row", "ceiling", "changes_per_sec"),
        ("catchup-5row", "native", "changes_per_sec"),
        ("fullload", "raw-copy", "rows_per_sec"),
        ("fullload", "native", "rows_per_sec"),
        ("fullload", "native", "mib_per_sec"),
        ("cost", "native", "walsender_cpu_s_per_1M_changes"),
        ("cost", "native", "shard_cpu_s_per_1M_changes"),
        ("cost-1row", "native", "shard_cpu_s_per_1M_changes"),
        ("cost-5row", "native", "shard_cpu_s_per_1M_changes"),
    ] {
        assert!(must(s, c, m) > 0.0, "{s}/{c}/{m}");
    }
    // The backlogs have the shapes they claim: one row per transaction, or five.
    for (s, rows_per_txn) in [("catchup-1row", 1.0), ("catchup-5row", 5.0)] {
        let changes = must(s, "backlog", "changes");
        let txns = must(s, "ceiling", "txns");
        let per = changes / txns;
        assert!(
            (rows_per_txn * 0.95..=rows_per_txn * 1.05).contains(&per),
            "{s}: {changes} changes in {txns} transactions"
        );
    }
    // Native's apply workers ran on both shards.
    assert_eq!(must("catchup-1row", "native", "shard_backends"), 2.0);
    // Two shards, two native walsenders.
    assert_eq!(must("catchup", "native", "walsenders"), 2.0);
    // Fast but wrong does not count: each contestant's shards hold exactly their share.
    for (s, c) in [
        ("catchup", "native"),
        ("catchup-1row", "native"),
        ("catchup-5row", "native"),
        ("fullload", "raw-copy"),
        ("fullload", "native"),
    ] {
        assert_eq!(must(s, c, "rows_match_source"), 1.0, "{s}/{c}:\n{stdout}");
    }
    let p50 = must("steady", "native", "p50_ms");
    let p99 = must("steady", "native", "p99_ms");
    assert!(p50 <= p99 && p99 > 0.0, "p50 {p50} p99 {p99}");
    assert!(must("steady", "native", "probes") > 100.0);
    // Light load: the probes are the load, at the asked rate, the source committing
    // synchronously (and the report says so next to the figure).
    let p50 = must("light", "native", "p50_ms");
    let p99 = must("light", "native", "p99_ms");
    assert!(p50 <= p99 && p99 > 0.0, "light p50 {p50} p99 {p99}");
    let rate = must("light", "native", "achieved_txns_per_sec");
    assert!((60.0..=160.0).contains(&rate), "light rate {rate}");
    let note = report["figures"]
        .as_array()
        .and_then(|fs| {
            fs.iter().find(|f| {
                f["scenario"] == "light" && f["contestant"] == "native" && f["metric"] == "p99_ms"
            })
        })
        .and_then(|f| f["note"].as_str())
        .unwrap_or_default();
    assert!(note.contains("synchronous_commit=on"), "{note}");
    // reshard was not asked for: its goals are reported as not measured, not invented.
    assert!(figure(&report, "catchup", "reshard", "changes_per_sec").is_none());
    assert!(stdout.contains("not measured"));
}
