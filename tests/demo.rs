//! `reshard demo`, the README's first command, run end to end through the real binary: it must
//! start its own clusters, migrate a live workload, verify, cut over, report and clean up.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::reshard_bin;

/// The number after `label` on the first line that starts with it.
fn number_after(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in:\n{out}"))
}

/// A newcomer's first experience: `reshard demo` (smaller than the default, same steps) exits 0
/// with verify passed and shard0 cut over, every live transaction applied, every full-load row
/// accounted for, and leaves no PostgreSQL server behind.
#[test]
fn demo_migrates_verifies_cuts_over_and_cleans_up() {
    let started = Instant::now();
    let mut child = Command::new(reshard_bin())
        .args(["demo", "--accounts", "40", "--live-secs", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reshard demo");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("reshard demo ran over 180 s:\n{out}\n{err}"));
    assert_eq!(
        status.code(),
        Some(0),
        "reshard demo failed:\n{out}\nstderr:\n{err}"
    );

    for needle in [
        "full load done:",
        "verify PASSED",
        "cutover done: shard0 (verified)",
        "verify:                      PASSED",
        "cutover shard0:              DONE at LSN",
        "daemon stopped cleanly",
        // The latency report means something: the source flushes at commit (issue #14).
        "source synchronous_commit: on ",
        "source commit to shard apply, source synchronous_commit=on",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let filled = number_after(&out, "rows filled on the source:");
    let loaded = number_after(&out, "rows loaded (full load):");
    assert!(filled > 0);
    assert_eq!(loaded, filled, "the full load copies every row:\n{out}");
    assert!(
        number_after(&out, "live transactions written:") > 0,
        "{out}"
    );
    // The report's per-shard rows are the live changes, so every shard took some.
    for shard in ["shard0", "shard1", "shard2"] {
        let line = out
            .lines()
            .rfind(|l| l.starts_with(shard))
            .unwrap_or_else(|| panic!("no report line for {shard}:\n{out}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let rows: u64 = cols.get(3).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(rows > 0, "{shard} applied no live rows: {line}\n{out}");
    }
    // No mismatch anywhere in the verify table.
    assert!(!out.contains("MISMATCH"), "{out}");

    // The clusters were stopped: nothing listens on their ports any more.
    let ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.trim_start().split_once("  port "))
        .filter_map(|(_, p)| p.trim().parse().ok())
        .collect();
    assert_eq!(ports.len(), 4, "a source and three shards:\n{out}");
    for p in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "a demo cluster still listens on port {p} after exit"
        );
    }
    eprintln!(
        "reshard demo (40 accounts, 3 s live) took {:?}",
        started.elapsed()
    );
}
