//! Shared pieces of the end-to-end tests: a source and N shards started by the harness, a
//! generated `reshard.toml`, the real `reshard` binary as a child process, and checks that use
//! PostgreSQL's own hash partitioning (never reshard's code) to decide which rows belong where.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reshard_harness::PgCluster;

/// A table to compare: `(name, Some((key column, key type)) for sharded or None for broadcast,
/// ORDER BY columns)`.
pub type TableCheck<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str);

/// The `reshard` binary under test.
pub fn reshard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_reshard"))
}

/// Runs a reshard command to completion with extra environment variables: (exit code, stdout,
/// stderr).
pub fn run_reshard(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(reshard_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run reshard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A source cluster (database `app`) and `n` shard clusters (database `app` each).
pub struct Topology {
    /// The source.
    pub source: PgCluster,
    /// The shards, in remainder order.
    pub shards: Vec<PgCluster>,
    /// Working directory: config, spill dir, logs.
    pub dir: tempfile::TempDir,
    /// Running daemons (killed on drop).
    daemons: Vec<Child>,
    runs: usize,
}

impl Topology {
    /// Starts the clusters and creates database `app` on each.
    pub fn start(n: usize) -> Topology {
        Self::start_with(n, PgCluster::builder)
    }

    /// A source of PostgreSQL `source` and one shard per entry of `shards` (their majors), each
    /// cluster with the settings of `builder(major)` and database `app`. A major that is not installed
    /// fails with the script that fetches it (`scripts/fetch-postgres <major>`).
    pub fn start_majors(
        source: u32,
        shards: &[u32],
        builder: impl Fn(u32) -> reshard_harness::Builder,
    ) -> Topology {
        let start = |major: u32, what: &str| {
            let c = builder(major)
                .major(major)
                .start()
                .unwrap_or_else(|e| panic!("start {what} (PostgreSQL {major}): {e}"));
            c.create_database("app").expect("create db");
            c
        };
        let source = start(source, "source");
        let shards = shards
            .iter()
            .enumerate()
            .map(|(i, m)| start(*m, &format!("shard{i}")))
            .collect();
        Topology {
            source,
            shards,
            dir: tempfile::tempdir().expect("tempdir"),
            daemons: vec![],
            runs: 0,
        }
    }

    /// Like [`Topology::start`] with a custom builder for every cluster.
    pub fn start_with(n: usize, builder: impl Fn() -> reshard_harness::Builder) -> Topology {
        let source = builder().start().expect("start source");
        source.create_database("app").expect("create db");
        let shards: Vec<PgCluster> = (0..n)
            .map(|_| {
                let c = builder().start().expect("start shard");
                c.create_database("app").expect("create db");
                c
            })
            .collect();
        Topology {
            source,
            shards,
            dir: tempfile::tempdir().expect("tempdir"),
            daemons: vec![],
            runs: 0,
        }
    }

    /// Runs SQL on the source database.
    pub fn source_sql(&self, sql: &str) -> String {
        self.source
            .psql("app", sql)
            .unwrap_or_else(|e| panic!("source SQL failed: {e}"))
    }

    /// Runs SQL on every shard.
    pub fn shards_sql(&self, sql: &str) {
        for (i, s) in self.shards.iter().enumerate() {
            s.psql("app", sql)
                .unwrap_or_else(|e| panic!("shard{i} SQL failed: {e}"));
        }
    }

    /// Runs the same DDL on the source and every shard.
    pub fn ddl_everywhere(&self, sql: &str) {
        self.source_sql(sql);
        self.shards_sql(sql);
    }

    /// Path of the generated config.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("reshard.toml")
    }

    /// Path of the spill directory.
    pub fn spill_dir(&self) -> PathBuf {
        self.dir.path().join("spill")
    }

    /// Writes `reshard.toml` with the clusters' URLs plus `extra` TOML (tables, options).
    /// The admin console and metrics listen on free ports (see the returned config text).
    pub fn write_config(&self, extra: &str) -> PathBuf {
        self.write_config_spill("", extra)
    }

    /// Like [`Topology::write_config`], with `spill` lines (e.g. `max_bytes = 3145728`) added
    /// to the generated `[spill]` section.
    pub fn write_config_spill(&self, spill: &str, extra: &str) -> PathBuf {
        self.write_config_sections(spill, "", extra)
    }

    /// Like [`Topology::write_config`], with `apply` lines (e.g. `ddl = "wait"`) added to the
    /// generated `[apply]` section.
    pub fn write_config_apply(&self, apply: &str, extra: &str) -> PathBuf {
        self.write_config_sections("", apply, extra)
    }

    fn write_config_sections(&self, spill: &str, apply: &str, extra: &str) -> PathBuf {
        let mut s = format!(
            "[source]\nurl = \"{}\"\n\n[spill]\ndir = \"{}\"\nflush_interval_ms = 10\n{spill}\n[apply]\nbatch_max_delay_ms = 20\nretry_initial_ms = 100\nretry_max_ms = 1000\n{apply}\n",
            self.source.url("app"),
            self.spill_dir().display()
        );
        if !extra.contains("[admin]") {
            s.push_str(&format!(
                "[admin]\nlisten = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{}\"\n\n",
                free_port(),
                free_port()
            ));
        }
        for (i, c) in self.shards.iter().enumerate() {
            s.push_str(&format!(
                "[[shards]]\nname = \"shard{i}\"\nurl = \"{}\"\n\n",
                c.url("app")
            ));
        }
        s.push_str(extra);
        let p = self.config_path();
        fs::write(&p, s).expect("write config");
        p
    }

    /// Starts `reshard run -c reshard.toml <args>`; output goes to `run-<k>.log` in the
    /// working directory.
    pub fn spawn_run(&mut self, args: &[&str]) -> usize {
        let config = self.config_path();
        self.spawn_run_config(&config, args)
    }

    /// Starts `reshard run -c <config> <args>` (e.g. one group's config written by `reshard
    /// plan`); output goes to `run-<k>.log` in the working directory.
    pub fn spawn_run_config(&mut self, config: &Path, args: &[&str]) -> usize {
        self.runs += 1;
        let log = self.dir.path().join(format!("run-{}.log", self.runs));
        let f = fs::File::create(&log).expect("log file");
        let child = Command::new(reshard_bin())
            .arg("run")
            .arg("-c")
            .arg(config)
            .args(args)
            .args(["--log-level", "info,reshard_engine=debug"])
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn reshard");
        self.daemons.push(child);
        self.daemons.len() - 1
    }

    /// The log of the most recent run.
    pub fn last_log(&self) -> String {
        fs::read_to_string(self.dir.path().join(format!("run-{}.log", self.runs)))
            .unwrap_or_default()
    }

    /// All run logs, concatenated (for failure messages).
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        for k in 1..=self.runs {
            let text = fs::read_to_string(self.dir.path().join(format!("run-{k}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("admin session"))
                .collect();
            s.push_str(&format!("--- run-{k}.log (last 60 lines) ---\n"));
            s.push_str(&lines[lines.len().saturating_sub(60)..].join("\n"));
            s.push('\n');
        }
        s
    }

    /// SIGKILLs daemon `i`.
    pub fn kill9(&mut self, i: usize) {
        let c = &mut self.daemons[i];
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERMs daemon `i` and waits for its exit code.
    pub fn terminate(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.daemons[i].id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait_exit(i, timeout)
    }

    /// SIGTERMs daemon `i` and asserts the clean exit 0 (panics with the daemon logs).
    pub fn stop_cleanly(&mut self, i: usize) {
        let code = self.terminate(i, Duration::from_secs(30));
        assert_eq!(
            code,
            Some(0),
            "SIGTERM must be a clean exit 0:\n{}",
            self.all_logs()
        );
    }

    /// The process id of daemon `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.daemons[i].id()
    }

    /// The log of run `k` (1-based, in spawn order).
    pub fn run_log(&self, k: usize) -> String {
        fs::read_to_string(self.dir.path().join(format!("run-{k}.log"))).unwrap_or_default()
    }

    /// The slot's `confirmed_flush_lsn` as text (`X/X`), or an empty string without a slot.
    pub fn confirmed_flush_lsn(&self) -> String {
        self.source_sql(
            "SELECT coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots WHERE slot_name = 'reshard'",
        )
    }

    /// Waits until the slot `reshard` exists and a walsender streams from it.
    pub fn wait_slot_active(&self, timeout: Duration) {
        wait_for("the slot to be streaming", timeout, || {
            let active = self.source_sql(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard' AND active",
            );
            (active == "1").then_some(())
        });
    }

    /// `reshard status --json` against the running daemon, parsed.
    pub fn status_json(&self) -> Option<serde_json::Value> {
        let cfg = self.config_path();
        let (code, out, _) = self.reshard(&["status", "-c", cfg.to_str()?, "--json"]);
        if code != 0 {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// Waits for daemon `i` to exit on its own and returns its exit code (`None`: still
    /// running after `timeout`, then killed).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let c = &mut self.daemons[i];
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`wait_for`], but the panic after `timeout` carries the daemon logs.
    pub fn wait<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether daemon `i` is still running.
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(self.daemons[i].try_wait(), Ok(None))
    }

    /// Runs a reshard command to completion: (exit code, stdout, stderr).
    pub fn reshard(&self, args: &[&str]) -> (i32, String, String) {
        run_reshard(args, &[])
    }

    /// Creates `reshard.route_<type>` on the source: an empty hash-partitioned table whose
    /// partition key has the key's type, so that `satisfies_hash_partition` can tell which
    /// remainder PostgreSQL itself assigns to a key.
    pub fn create_route_helper(&self, key_type: &str) -> String {
        // In schema `reshard`, which reshard itself never replicates or verifies.
        let name = format!("reshard.route_{}", key_type.replace(' ', "_"));
        self.source_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS reshard; CREATE TABLE IF NOT EXISTS {name} (k {key_type}) PARTITION BY HASH (k)"
        ));
        name
    }

    /// For a sharded table: a digest of the source rows that PostgreSQL's hash partitioning
    /// (MODULUS = shard count) puts on `shard`, and of the rows the shard holds. For a
    /// broadcast table pass `key = None`: every row belongs everywhere.
    pub fn digests(
        &self,
        table: &str,
        key: Option<(&str, &str)>,
        order_by: &str,
        shard: usize,
    ) -> (String, String) {
        let n = self.shards.len();
        let filter = match key {
            Some((col, ty)) => {
                let helper = self.create_route_helper(ty);
                format!("WHERE satisfies_hash_partition('{helper}'::regclass, {n}, {shard}, {col})")
            }
            None => String::new(),
        };
        let q = |f: &str| {
            format!(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY {order_by})), '-') FROM {table} t {f}"
            )
        };
        let src = self.source_sql(&q(&filter));
        let dst = self.shards[shard]
            .psql("app", &q(""))
            .unwrap_or_else(|e| panic!("shard{shard}: {e}"));
        (src, dst)
    }

    /// Waits until every shard matches the source for every `(table, key, order_by)`; panics
    /// with the differences and the daemon logs after `timeout`.
    pub fn wait_converged(&self, tables: &[TableCheck<'_>], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut diffs = Vec::new();
            for (t, key, ord) in tables {
                for s in 0..self.shards.len() {
                    let (a, b) = self.digests(t, *key, ord, s);
                    if a != b {
                        diffs.push(format!("{t} on shard{s}: source {a} vs shard {b}"));
                    }
                }
            }
            if diffs.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "shards did not converge within {timeout:?}:\n{}\n{}",
                    diffs.join("\n"),
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Total size of the regular files under `dir` (recursively), in bytes.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The SQLSTATE of a failed statement (`""` for a non-database error).
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// Reads a file if it exists.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// A raw `GET` over TCP: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read the response");
    let (head, body) = buf.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, body.to_owned())
}

/// The value of the sample `series` (`name{labels}`) in a `/metrics` body.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse::<f64>()
        .expect("a number") as u64
}

/// The `host:port` value of `key` in the generated config.
pub fn port_of(config: &str, key: &str) -> u16 {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"127.0.0.1:")))
        .and_then(|r| r.trim_end_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no {key} in config:\n{config}"))
}

/// A small tmpfs (a real full disk: ENOSPC) mounted while it lives; root only. Unmounted (lazily)
/// and its mount point removed on drop, so declare it before a [`Topology`] whose servers use it.
pub struct Tmpfs {
    mount: PathBuf,
}

impl Tmpfs {
    /// Mounts a `size`-byte tmpfs in the temporary directory; `None` where mounting is not
    /// allowed (not root).
    pub fn mount(name: &str, size: u64) -> Option<Tmpfs> {
        let mount = std::env::temp_dir().join(format!("reshard-{}-{name}", std::process::id()));
        Tmpfs::mount_at(&mount, size)
    }

    /// Mounts a `size`-byte tmpfs at `mount` (created if missing).
    pub fn mount_at(mount: &Path, size: u64) -> Option<Tmpfs> {
        fs::create_dir_all(mount).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(mount)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = fs::remove_dir(mount);
            return None;
        }
        Some(Tmpfs {
            mount: mount.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    fn ballast(&self) -> PathBuf {
        self.mount.join("ballast")
    }

    /// Fills the file system to the last byte.
    pub fn fill(&self) {
        let mut f = fs::File::create(self.ballast()).expect("create ballast");
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
    }

    /// Removes what [`Tmpfs::fill`] wrote.
    pub fn free(&self) {
        let _ = fs::remove_file(self.ballast());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = fs::remove_dir(&self.mount);
    }
}
