//! The `reshard` command line itself: `slot`, `peek`, config errors and exit codes.

use std::time::Duration;

use crate::common::Topology;

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// `peek --no-ack` consumes nothing; `peek` without it confirms what it printed.
#[test]
fn peek_prints_changes_as_json_lines_and_no_ack_consumes_nothing() {
    let t = Topology::start(1);
    t.source_sql("CREATE TABLE t (account_id bigint, id int PRIMARY KEY, note text)");
    let url = t.source.url("app");
    let base = [
        "peek",
        "--source",
        url.as_str(),
        "--slot",
        "peekslot",
        "--publication",
        "peekpub",
    ];
    // Create slot and publication, nothing to print yet.
    let (code, _, err) = t.reshard(&[&base[..], &["--create", "--idle-timeout", "2"]].concat());
    assert_eq!(code, 0, "{err}");
    t.source_sql("INSERT INTO t VALUES (1, 1, 'tab\there'), (2, 2, NULL); UPDATE t SET note = 'x' WHERE id = 2; DELETE FROM t WHERE id = 1");
    let args = [&base[..], &["--no-ack", "--idle-timeout", "3"]].concat();
    let (code, out, err) = t.reshard(&args);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        kinds,
        ["begin", "insert", "insert", "update", "delete", "commit"],
        "{out}"
    );
    assert_eq!(lines[1]["table"], "public.t");
    assert_eq!(lines[1]["new"]["note"], "tab\there");
    assert!(lines[2]["new"]["note"].is_null());
    assert!(lines[1]["commit_lsn"].as_str().unwrap().contains('/'));
    // Nothing was consumed: the same changes again.
    let (_, again, _) = t.reshard(&args);
    assert_eq!(
        json_lines(&again).len(),
        lines.len(),
        "--no-ack must not consume:\n{again}"
    );
    // --limit stops after N changes.
    let (_, limited, _) = t.reshard(
        &[
            &base[..],
            &["--no-ack", "--limit", "2", "--idle-timeout", "3"],
        ]
        .concat(),
    );
    let n = json_lines(&limited)
        .iter()
        .filter(|l| !matches!(l["kind"].as_str(), Some("begin" | "commit")))
        .count();
    assert_eq!(n, 2, "{limited}");
    // Without --no-ack the transaction is confirmed and not shown again.
    let (code, _, err) = t.reshard(&[&base[..], &["--idle-timeout", "3"]].concat());
    assert_eq!(code, 0, "{err}");
    let (_, after, _) = t.reshard(&args);
    assert!(
        json_lines(&after).is_empty(),
        "acknowledged changes came back:\n{after}"
    );
    // slot list shows it; slot drop removes it.
    let (code, out, err) = t.reshard(&["slot", "list", "--source", url.as_str(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let slots: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        slots
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["slot_name"] == "peekslot"),
        "{out}"
    );
    let (code, out, err) = t.reshard(&[
        "slot",
        "drop",
        "--source",
        url.as_str(),
        "--slot",
        "peekslot",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dropped"), "{out}");
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
}

/// `slot create` makes the slot and the publication; `slot drop --purge` leaves nothing behind.
#[test]
fn slot_create_and_drop_purge_leave_nothing_behind() {
    let t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE t (account_id bigint, id int, PRIMARY KEY (account_id, id))");
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["slot", "create", "-c", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created slot reshard"), "{out}");
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'reshard'"),
        "1"
    );
    t.shards_sql("CREATE SCHEMA reshard");
    let (code, out, err) = t.reshard(&["slot", "drop", "-c", cfg, "--purge"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(t.source_sql("SELECT count(*) FROM pg_publication"), "0");
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
}

/// Config mistakes are exit code 2 with the key and the line named.
#[test]
fn config_errors_name_the_key_and_line_and_exit_2() {
    let t = Topology::start(1);
    let cfg = t.write_config("[[tables]]\nname = \"t\"\nmod = \"sharded\"\n");
    let (code, _, err) = t.reshard(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `mod`"), "{err}");
    assert!(err.contains("line"), "{err}");
    let (code, _, err) = t.reshard(&["check", "-c", "/nonexistent/reshard.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/reshard.toml"), "{err}");
    // A wrapped error that already prints its cause is not followed by the cause again.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// `--worker-threads N` (env `RESHARD_WORKER_THREADS`) sets the daemon's async runtime
/// workers (its "starting" line says how many); the default is one fewer than the CPUs, at
/// least 1; 0 or a non-number is refused with exit 2, naming the flag.
#[test]
fn worker_threads_sets_the_runtime_workers_and_refuses_nonsense() {
    let missing = ["check", "-c", "/nonexistent/reshard.toml"];
    let (code, _, err) = crate::common::run_reshard(
        &[&["--worker-threads", "0"][..], &missing[..]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--worker-threads"), "{err}");
    let (code, _, err) =
        crate::common::run_reshard(&missing, &[("RESHARD_WORKER_THREADS", "many")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--worker-threads"), "{err}");

    let mut t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE t (account_id bigint, id int, PRIMARY KEY (account_id, id))");
    t.write_config("");
    let default = std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .max(1);
    for (args, want) in [(&["--worker-threads", "3"][..], 3), (&[][..], default)] {
        let d = t.spawn_run(args);
        let line = t.wait(
            "the daemon's starting line",
            Duration::from_secs(60),
            || {
                t.last_log()
                    .lines()
                    .find(|l| l.contains("starting") && l.contains("workers="))
                    .map(str::to_owned)
            },
        );
        assert!(
            line.contains(&format!("workers={want}")),
            "{args:?}: {line}"
        );
        t.stop_cleanly(d);
    }
}

/// A source that cannot be reached is exit code 3 with the host and port named, quickly.
#[test]
fn unreachable_source_is_exit_3_naming_it() {
    let t = Topology::start(1);
    let port = crate::common::free_port();
    let text = std::fs::read_to_string(t.write_config("")).unwrap();
    let text = text.replace(
        &t.source.url("app"),
        &format!("postgres://postgres@127.0.0.1:{port}/app?connect_timeout=3"),
    );
    std::fs::write(t.config_path(), text).unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = t.reshard(&["run", "-c", t.config_path().to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert_eq!(
        line.matches(&format!("127.0.0.1:{port}")).count(),
        1,
        "the cause is printed once:\n{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A `[spill] dir` that cannot be created or written (a file, a path under a file, a path
/// under `/proc`) is an operator mistake: `reshard run` refuses it at once with exit 2, naming
/// `[spill] dir`, the resolved directory, the OS error and the fix, instead of retrying it for
/// `--start-retry-secs` as "a server is unreachable or restarting" (found by outside-user
/// runs: the default retry kept it there 300 s, then exit 3). `reshard check` FAILs it too,
/// and leaves nothing behind.
#[test]
fn an_unusable_spill_dir_is_refused_at_once() {
    let t = Topology::start(1);
    let ddl = "CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)";
    t.source_sql(ddl);
    t.shards[0].psql("app", ddl).unwrap();
    let file = t.spill_dir().with_extension("file");
    std::fs::write(&file, "not a directory").unwrap();
    let original = std::fs::read_to_string(t.write_config("")).unwrap();
    let cases = [
        (file.clone(), "Not a directory"),
        (file.join("spill"), "Not a directory"),
        (
            std::path::PathBuf::from("/proc/reshard-spill"),
            "No such file or directory",
        ),
    ];
    for (dir, os_error) in cases {
        let text = original.replace(
            &format!("dir = \"{}\"", t.spill_dir().display()),
            &format!("dir = \"{}\"", dir.display()),
        );
        assert!(text.contains(&dir.display().to_string()), "{text}");
        std::fs::write(t.config_path(), text).unwrap();
        let started = std::time::Instant::now();
        let (code, _, err) = t.reshard(&[
            "run",
            "-c",
            t.config_path().to_str().unwrap(),
            "--start-retry-secs",
            "20",
        ]);
        assert_eq!(code, 2, "{}: {err}", dir.display());
        for want in [
            "[spill] dir",
            &dir.display().to_string(),
            os_error,
            "set [spill] dir to a directory",
        ] {
            assert!(
                err.contains(want),
                "{}: wants {want:?}: {err}",
                dir.display()
            );
        }
        assert!(!err.contains("unreachable or restarting"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "took {:?}: {err}",
            started.elapsed()
        );

        let (code, out, err) = t.reshard(&["check", "-c", t.config_path().to_str().unwrap()]);
        assert_ne!(code, 0, "{out}\n{err}");
        let line = out
            .lines()
            .find(|l| l.contains("spill_dir"))
            .unwrap_or_else(|| panic!("{}: no spill_dir line:\n{out}\n{err}", dir.display()));
        assert!(line.contains("FAIL"), "{line}\n{out}");
        assert!(out.contains(os_error), "{out}");
        assert!(out.contains("set [spill] dir to a directory"), "{out}");
    }
    // A usable directory passes `check`, which leaves no directory behind.
    let dir = t.spill_dir().with_extension("fresh").join("deep");
    let text = original.replace(
        &format!("dir = \"{}\"", t.spill_dir().display()),
        &format!("dir = \"{}\"", dir.display()),
    );
    std::fs::write(t.config_path(), text).unwrap();
    let (_, out, err) = t.reshard(&["check", "-c", t.config_path().to_str().unwrap()]);
    let line = out
        .lines()
        .find(|l| l.contains("spill_dir"))
        .unwrap_or_default();
    assert!(line.contains("PASS"), "{out}\n{err}");
    assert!(!t.spill_dir().with_extension("fresh").exists());
}

// See: issue #11 item 12.
/// `reshard run` refuses an admin console on a non-loopback address without a password:
/// exit 2 before connecting anywhere, naming the config keys.
#[test]
fn run_refuses_an_exposed_admin_console_without_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reshard.toml");
    let port = crate::common::free_port();
    std::fs::write(
        &cfg,
        format!(
            "[source]\nurl = \"postgres://postgres@127.0.0.1:{port}/app?connect_timeout=3\"\n\n\
             [spill]\ndir = \"{}\"\n\n[admin]\nlisten = \"0.0.0.0:{}\"\nmetrics = \"\"\n\n\
             [[shards]]\nname = \"shard0\"\nurl = \"postgres://postgres@127.0.0.1:{port}/app\"\n",
            dir.path().join("spill").display(),
            crate::common::free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(crate::common::reshard_bin())
        .args(["run", "-c", cfg.to_str().unwrap()])
        .env_remove("RESHARD_ADMIN_PASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("admin.listen") && err.contains("admin.password"),
        "{err}"
    );
}

/// Ctrl-C ends `reshard lag --watch` at once even while a refresh is waiting on a server that
/// does not answer (a silent listener stands in for a hung source). Before, the SIGINT was
/// either fatal (exit by signal, before the first wait had listened) or lost (between two
/// waits, once tokio's handler had replaced the default action).
#[test]
fn lag_watch_ends_on_ctrl_c_while_a_refresh_waits() {
    let t = Topology::start(1);
    // Accepts connections and never answers: the startup packet waits forever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let text = std::fs::read_to_string(t.write_config("")).unwrap();
    let text = text.replace(
        &t.source.url("app"),
        &format!("postgres://postgres@127.0.0.1:{port}/app"),
    );
    std::fs::write(t.config_path(), text).unwrap();
    for round in 0..2 {
        let mut child = std::process::Command::new(crate::common::reshard_bin())
            .args([
                "lag",
                "-c",
                t.config_path().to_str().unwrap(),
                "--watch",
                "--interval",
                "0.1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Round 0: inside the first refresh; round 1: later, inside another one (the offline
        // status waits several seconds on the silent source each time).
        std::thread::sleep(Duration::from_millis(if round == 0 {
            1500
        } else {
            11_000
        }));
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let sent = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if sent.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let status = status
            .unwrap_or_else(|| panic!("round {round}: lag --watch still running 5 s after SIGINT"));
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}");
    }
    drop(silent);
}

/// `reshard slot drop` while a daemon streams the slot fails at once (exit 3, naming the fix)
/// instead of waiting silently; the waiting drop used to remove the slot as soon as the daemon
/// stopped, so the next run had to start over.
#[test]
fn slot_drop_while_the_daemon_streams_fails_at_once_and_drops_nothing() {
    let mut t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE t (account_id bigint, id int, PRIMARY KEY (account_id, id))");
    t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    let mut child = std::process::Command::new(crate::common::reshard_bin())
        .args(["slot", "drop", "-c", t.config_path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("reshard slot drop still waiting after 20 s on a streamed slot");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("stop the daemon first"), "{err}");
    t.stop_cleanly(d);
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard'")
            .trim(),
        "1",
        "the slot outlives the refused drop"
    );
}

/// `[[shards]]` urls swapped between two runs (found by an outside-user run): streaming wrote a
/// bogus `0/0` progress row under each name into the other's database and stopped both shards
/// with "re-copy the shard", which would make an operator wipe a correct shard. `check` and
/// `run` refuse it (exit 2) naming the shard whose progress each database holds, and nothing
/// is written.
#[test]
fn swapped_shard_urls_are_refused_before_anything_is_written() {
    let mut t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.source_sql("INSERT INTO accounts SELECT a, 'n' || a FROM generate_series(1, 200) a");
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    for (i, s) in t.shards.iter().enumerate() {
        t.wait(&format!("shard{i}'s progress"), Duration::from_secs(90), || {
            s.psql(
                "app",
                &format!("SELECT 1 FROM reshard.progress WHERE shard = 'shard{i}' AND commit_lsn > '0/0'"),
            )
            .ok()
            .filter(|o| o.trim() == "1")
        });
    }
    t.stop_cleanly(d);
    let rows = |t: &Topology, i: usize| {
        t.shards[i]
            .psql("app", "SELECT string_agg(shard || ' ' || commit_lsn, ',' ORDER BY shard) FROM reshard.progress")
            .unwrap()
            .trim()
            .to_owned()
    };
    let before = [rows(&t, 0), rows(&t, 1)];
    let text = std::fs::read_to_string(&cfg).unwrap();
    let (u0, u1) = (t.shards[0].url("app"), t.shards[1].url("app"));
    let swapped = text
        .replace(&u0, "@U0@")
        .replace(&u1, &u0)
        .replace("@U0@", &u1);
    assert_ne!(swapped, text);
    std::fs::write(&cfg, swapped).unwrap();

    let (code, out, err) = t.reshard(&["check", "-c", &cfg]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        out.contains("[[shards]] shard0 (127.0.0.1:") && out.contains("holds shard1's progress"),
        "{out}"
    );
    assert!(out.contains("were the urls swapped?"), "{out}");

    // Spawned: a run that is not refused streams on (until killed after the timeout).
    let r = t.spawn_run(&["--start-retry-secs", "30"]);
    let code = t.wait_exit(r, Duration::from_secs(60));
    let err = t.last_log();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("holds shard1's progress") && err.contains("were the urls swapped?"),
        "{err}"
    );
    assert!(!err.contains("re-copy"), "{err}");
    assert_eq!(
        [rows(&t, 0), rows(&t, 1)],
        before,
        "a refused run wrote progress rows"
    );
}

/// Two `[[shards]]` urls naming one database, written differently (`localhost` and
/// `127.0.0.1`): `check`, `run` and `plan --shards` refuse (exit 2) naming both entries.
#[test]
fn two_shards_naming_one_database_are_refused() {
    let mut t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    // Two new shards, on the second cluster: its databases app and postgres are two databases.
    let cfg = t.write_config(&format!(
        "[routing]\nhash = \"postgres\"\n\n[[new_shards]]\nname = \"shard2\"\nurl = \"{}\"\n\n[[new_shards]]\nname = \"shard3\"\nurl = \"{}\"\n",
        t.shards[1].url("app"),
        t.shards[1].url("postgres")
    ));
    let cfg = cfg.to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let u0 = t.shards[0].url("app");
    let u1 = format!("url = \"{}\"\n\n[[new_shards]]", t.shards[1].url("app"));
    let text = text.replacen(
        &format!("url = \"{}\"", t.shards[1].url("app")),
        &format!("url = \"{}\"", u0.replace("127.0.0.1", "localhost")),
        1,
    );
    assert!(text.contains(&u1), "{text}");
    std::fs::write(&cfg, text).unwrap();
    let both = |s: &str| {
        s.contains("[[shards]] shard0 (127.0.0.1:")
            && s.contains("[[shards]] shard1 (localhost:")
            && s.contains("are the same database")
            && s.contains("fix the url of shard1")
    };
    let (code, out, err) = t.reshard(&["check", "-c", &cfg]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(both(&out), "{out}");
    let r = t.spawn_run(&["--start-retry-secs", "30"]);
    let code = t.wait_exit(r, Duration::from_secs(60));
    let err = t.last_log();
    assert_eq!(code, Some(2), "{err}");
    assert!(both(&err), "{err}");
    let (code, out, err) = t.reshard(&["plan", "-c", &cfg, "--shards", "4"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(both(&err), "{err}");
    // Nothing was created on the shard or the source.
    assert_eq!(
        t.shards[0]
            .psql("app", "SELECT to_regclass('reshard.progress') IS NULL")
            .unwrap()
            .trim(),
        "t"
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_replication_slots")
            .trim(),
        "0"
    );
}

/// `run --skip-full-load` says at WARN what the operator takes on: the slot's LSN, that not
/// one row from before it is copied, and the way back; the rows from before are indeed not on
/// the shards while a later row is. A restart with the flag says where streaming resumes and
/// that an unfinished load stays unfinished.
#[test]
fn skip_full_load_warns_that_rows_before_the_slot_are_not_copied() {
    use crate::robust::{preload, SCHEMA};
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    preload(&t);
    t.write_config("");
    let d = t.spawn_run(&["--skip-full-load"]);
    t.wait_slot_active(Duration::from_secs(60));
    t.source_sql("INSERT INTO plans VALUES (9001, 'after the slot')");
    let count = |s: usize, sql: &str| t.shards[s].psql("app", sql).unwrap_or_default();
    t.wait(
        "the row written after the slot",
        Duration::from_secs(60),
        || {
            (0..2)
                .all(|s| count(s, "SELECT count(*) FROM plans WHERE id = 9001") == "1")
                .then_some(())
        },
    );
    for s in 0..2 {
        assert_eq!(count(s, "SELECT count(*) FROM plans WHERE id < 9001"), "0");
    }
    let log = t.last_log();
    let line = log
        .lines()
        .find(|l| l.contains("--skip-full-load: slot created at"))
        .unwrap_or_else(|| panic!("no --skip-full-load warning:\n{log}"));
    assert!(
        line.contains("WARN")
            && line.contains("NOT ONE ROW COPIED")
            && line.contains("replicated tables from before it must already be on the shards")
            && line.contains("reshard slot drop"),
        "{line}"
    );
    t.stop_cleanly(d);

    let d = t.spawn_run(&["--skip-full-load"]);
    t.wait_slot_active(Duration::from_secs(60));
    let log = t.last_log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("--skip-full-load: no table is copied, streaming resumes at")
            && l.contains("stays unfinished")),
        "{log}"
    );
    t.stop_cleanly(d);
}

/// A `[[shards]]` url the server refuses (a wrong password, 28P01; a database that does not
/// exist, 3D000) is an operator mistake that no retry fixes: `reshard run` refuses it at once
/// with exit 2, naming the shard, the url's target and the server's answer. On main it was
/// retried for `--start-retry-secs` (default 300 s) as "a server is unreachable or
/// restarting", then exit 3.
#[test]
fn a_shard_url_the_server_refuses_is_refused_at_once_with_exit_2() {
    let t = Topology::start_with(2, || {
        reshard_harness::PgCluster::builder().password("s3cret", reshard_harness::Auth::Scram)
    });
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let original = std::fs::read_to_string(t.write_config("")).unwrap();
    let good = t.shards[1].url("app");
    let cases = [
        (
            good.replace(":s3cret@", ":wrong@"),
            "password authentication failed",
        ),
        (
            good.replace("/app", "/nosuchdb"),
            "\"nosuchdb\" does not exist",
        ),
    ];
    for (url, answer) in cases {
        assert_ne!(url, good);
        std::fs::write(t.config_path(), original.replace(&good, &url)).unwrap();
        let started = std::time::Instant::now();
        let (code, _, err) = t.reshard(&[
            "run",
            "-c",
            t.config_path().to_str().unwrap(),
            "--start-retry-secs",
            "60",
        ]);
        assert_eq!(code, 2, "{url}: {err}");
        for want in ["shard1", answer] {
            assert!(err.contains(want), "{url}: wants {want:?}: {err}");
        }
        assert!(!err.contains("unreachable or restarting"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}: {err}",
            started.elapsed()
        );
    }
}

/// `reshard run` on a source without `wal_level = logical` (the commonest setup slip) is
/// refused with exit 2 before anything is created on the source, the fix said once. On main it
/// created the publication and the spill log first, then exit 3 with the server's message
/// printed twice.
#[test]
fn run_on_a_source_without_wal_level_logical_is_refused_before_anything_is_written() {
    let t = Topology::start_with(1, || {
        reshard_harness::PgCluster::builder().setting("wal_level", "replica")
    });
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let cfg = t.write_config("");
    let (code, _, err) = t.reshard(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wal_level = replica"), "{err}");
    assert_eq!(
        err.matches("ALTER SYSTEM SET wal_level = logical").count(),
        1,
        "{err}"
    );
    assert_eq!(err.matches("requires wal_level").count(), 1, "{err}");
    assert_eq!(
        t.source_sql("SELECT count(*) FROM pg_publication").trim(),
        "0",
        "{err}"
    );
    assert!(!t.spill_dir().join("identity").exists(), "{err}");
}

/// A `[spill] dir` that holds another migration's log (another source or slot) is a mistake in
/// the config: exit 2, naming the directory and `[spill] dir`, and the log is left as it is.
/// On main: exit 3, as if a server could not be reached.
#[test]
fn a_spill_dir_of_another_migration_is_refused_with_exit_2() {
    let mut t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let cfg = t.write_config("");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.stop_cleanly(d);
    let identity = std::fs::read(t.spill_dir().join("identity")).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "[source]\n",
            "[source]\nslot = \"other\"\npublication = \"other\"\n",
        ),
    )
    .unwrap();
    let (code, _, err) = t.reshard(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let dir = t.spill_dir().display().to_string();
    for want in [dir.as_str(), "slot reshard", "[spill] dir"] {
        assert!(err.contains(want), "wants {want:?}: {err}");
    }
    assert_eq!(
        std::fs::read(t.spill_dir().join("identity")).unwrap(),
        identity
    );
}

/// `reshard verify` while `reshard run` is still in its full load waits for the load (up to
/// `--timeout`) and then compares, instead of comparing half-loaded shards "as they are" and
/// reporting a MISMATCH (exit 1) on a migration that is going fine, as it did on main.
#[test]
fn verify_during_the_full_load_waits_for_it_instead_of_reporting_a_mismatch() {
    let mut t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    t.source_sql("INSERT INTO accounts SELECT g, 'a' || g FROM generate_series(1, 12000) g");
    let cfg = t.write_config("[snapshot]\nmax_rows_per_sec = 1500\n");
    let d = t.spawn_run(&[]);
    t.wait("the full load to run", Duration::from_secs(60), || {
        let s = t.status_json()?;
        (s["phase"] == "full_load").then_some(())
    });
    let (code, out, err) = t.reshard(&["verify", "-c", cfg.to_str().unwrap(), "--timeout", "120"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("MATCH"), "{out}");
    assert!(!out.contains("compared as it is"), "{out}");
    t.stop_cleanly(d);
}

/// `verify --accounts` with a value no sharded table's key can hold (`12a` for a bigint key, a
/// stray empty item) is refused with exit 2, naming the value and the key's type. On main it
/// selected no row anywhere and every table passed as "ok".
#[test]
fn verify_refuses_an_account_that_is_not_a_value_of_the_shard_key() {
    let t = Topology::start(2);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap();
    for bad in ["3,12a", "3,"] {
        let (code, out, err) = t.reshard(&["verify", "-c", cfg, "--accounts", bad]);
        assert_eq!(code, 2, "{bad}: {out}\n{err}");
        assert!(err.contains("public.accounts.account_id (bigint)"), "{err}");
    }
    let (code, out, err) = t.reshard(&["verify", "-c", cfg, "--accounts", "12a"]);
    assert!(err.contains("\"12a\""), "{out}\n{err}");
    assert_eq!(code, 2);
    let (code, out, err) = t.reshard(&["verify", "-c", cfg, "--accounts", "3, 4"]);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// A shard url whose port accepts TCP but never answers PostgreSQL's startup (a port that is
/// not PostgreSQL's, a hung server) ends `verify` after the url's `connect_timeout` with exit 3
/// naming the host and port. On main the SQL connection had no bound past the TCP connect:
/// `verify` waited forever without a word.
#[test]
fn verify_against_a_shard_that_never_answers_ends_after_connect_timeout() {
    let t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let text = std::fs::read_to_string(t.write_config("")).unwrap();
    let text = text.replace(
        &t.shards[0].url("app"),
        &format!("postgres://postgres@127.0.0.1:{port}/app?connect_timeout=3"),
    );
    std::fs::write(t.config_path(), text).unwrap();
    let mut child = std::process::Command::new(crate::common::reshard_bin())
        .args(["verify", "-c", t.config_path().to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| panic!("verify still waiting after 30s: {err}"));
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("connect_timeout"), "{err}");
}

/// `cutover --timeout 0` (or any timeout shorter than the first look for the daemon) still says
/// what the daemon is doing. On main the clause was empty: "has not applied anything to it yet
/// ()".
#[test]
fn cutover_with_a_zero_timeout_still_says_whether_reshard_run_is_up() {
    let t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let cfg = t.write_config("");
    let (code, _, err) = t.reshard(&[
        "cutover",
        "-c",
        cfg.to_str().unwrap(),
        "--shard",
        "shard0",
        "--timeout",
        "0",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(!err.contains("()"), "{err}");
    assert!(err.contains("no reshard run is up"), "{err}");
}

/// `quarantine drop` with nothing quarantined (or a `--table` holding nothing) has nothing to
/// confirm: it says so and exits 0. On main it asked for `--yes` to delete "0 quarantined
/// change(s) ()" and exited 2.
#[test]
fn quarantine_drop_with_nothing_quarantined_says_so_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reshard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nurl = \"postgres://postgres@127.0.0.1:1/app\"\n\n[spill]\ndir = \"{}\"\n\n\
             [[shards]]\nname = \"shard0\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\n",
            dir.path().join("spill").display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    for args in [
        &["quarantine", "drop", "-c", cfg][..],
        &["quarantine", "drop", "-c", cfg, "--table", "public.orders"][..],
    ] {
        let (code, out, err) = crate::common::run_reshard(args, &[]);
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        assert!(out.contains("nothing to drop"), "{out}");
    }
}

/// A `[source] url` its server refuses (wrong password, no such database) is a mistake in the
/// config like a shard's: exit 2 at once (systemd's `RestartPreventExitStatus=2` then does not
/// restart it every 5 s for ever). On main: exit 3.
#[test]
fn a_source_url_the_server_refuses_is_exit_2() {
    let t = Topology::start_with(1, || {
        reshard_harness::PgCluster::builder().password("s3cret", reshard_harness::Auth::Scram)
    });
    let original = std::fs::read_to_string(t.write_config("")).unwrap();
    let good = t.source.url("app");
    for (url, answer) in [
        (
            good.replace(":s3cret@", ":wrong@"),
            "password authentication failed",
        ),
        (
            good.replace("/app", "/nosuchdb"),
            "\"nosuchdb\" does not exist",
        ),
    ] {
        std::fs::write(t.config_path(), original.replace(&good, &url)).unwrap();
        let (code, _, err) = t.reshard(&["run", "-c", t.config_path().to_str().unwrap()]);
        assert_eq!(code, 2, "{url}: {err}");
        assert!(err.contains(answer), "{url}: {err}");
        assert!(err.contains("[source] url"), "{url}: {err}");
    }
}

/// `--start-retry-secs S` retries an unreachable shard for S seconds, as it says: the last
/// wait is cut to what is left, and a last attempt is made at the deadline. On main it gave
/// up as soon as the next backoff would pass the deadline: with a first retry delay of 4 s and
/// S = 10 after 4 s.
#[test]
fn start_retry_secs_retries_for_the_whole_time_given() {
    let t = Topology::start(1);
    t.ddl_everywhere("CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text)");
    let text = std::fs::read_to_string(t.write_config("")).unwrap();
    let port = crate::common::free_port();
    let text = text
        .replace("retry_initial_ms = 100", "retry_initial_ms = 4000")
        .replace("retry_max_ms = 1000", "retry_max_ms = 30000")
        .replace(
            &t.shards[0].url("app"),
            &format!("postgres://postgres@127.0.0.1:{port}/app"),
        );
    std::fs::write(t.config_path(), text).unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = t.reshard(&[
        "run",
        "-c",
        t.config_path().to_str().unwrap(),
        "--start-retry-secs",
        "10",
    ]);
    let took = started.elapsed();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "gave up after {took:?}: {err}"
    );
}
