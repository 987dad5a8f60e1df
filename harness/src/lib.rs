//! Throwaway PostgreSQL clusters started from the system's binaries.
//!
//! Used by the integration tests, `reshard demo` and the benchmark harness. A cluster is a data
//! directory in a temporary directory, a `postgres` postmaster on a free loopback port with its
//! unix socket in that directory, and a log file that receives everything the server prints
//! (never the caller's pipe: a full pipe would hang the server).
//!
//! Guarantees:
//! - `initdb` runs once per machine and major (as the `postgres` user when we are root, because
//!   `initdb` refuses root); every cluster after that is a copy of that template, so several
//!   clusters per test are cheap, and a test process leaves no template behind.
//! - No orphan server: the postmaster is stopped on `Drop` (also while unwinding from a panic),
//!   and it is spawned by one long-lived thread with `PR_SET_PDEATHSIG`, so even a test process
//!   killed with SIGKILL takes its servers with it.
//!
//! Binaries are found through `PG_BIN`, then `pg_config --bindir`, then the newest
//! `/usr/lib/postgresql/*/bin`. A cluster of another major ([`Builder::major`]) runs the server
//! binaries of that major: the system's when they are that major, else
//! `/usr/lib/postgresql/<major>/bin`, else the cache that `scripts/fetch-postgres <major>` fills
//! ([`pg_cache_dir`]). `psql` is always the system's: it talks to every server 12..18.

pub mod workload;

use std::fmt;
use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How clients authenticate over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// No password (the default for tests).
    Trust,
    /// SCRAM-SHA-256 with the configured password.
    Scram,
    /// md5 with the configured password.
    Md5,
}

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct Builder {
    settings: Vec<(String, String)>,
    password: Option<String>,
    auth: Auth,
    major: Option<u32>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            settings: vec![
                ("wal_level".into(), "logical".into()),
                ("max_replication_slots".into(), "20".into()),
                ("max_wal_senders".into(), "20".into()),
                ("max_connections".into(), "100".into()),
                ("fsync".into(), "off".into()),
                ("synchronous_commit".into(), "off".into()),
                ("full_page_writes".into(), "off".into()),
                ("shared_buffers".into(), "64MB".into()),
                ("max_worker_processes".into(), "16".into()),
                ("max_logical_replication_workers".into(), "8".into()),
                ("max_sync_workers_per_subscription".into(), "2".into()),
                ("log_min_messages".into(), "warning".into()),
                ("max_prepared_transactions".into(), "10".into()),
            ],
            password: None,
            auth: Auth::Trust,
            major: None,
        }
    }
}

impl Builder {
    /// Sets a server setting (`-c name=value`), replacing a default of the same name.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Requires a password over TCP for the `postgres` superuser.
    pub fn password(mut self, password: &str, auth: Auth) -> Self {
        self.password = Some(password.to_owned());
        self.auth = auth;
        self
    }

    /// Runs the server binaries of PostgreSQL `major` (12..18) instead of the system's default
    /// (see [`server_bindir`]).
    pub fn major(mut self, major: u32) -> Self {
        self.major = Some(major);
        self
    }

    /// Starts the cluster.
    pub fn start(self) -> Result<PgCluster, HarnessError> {
        PgCluster::start_with(self)
    }
}

/// Why a cluster could not be provided.
#[derive(Debug)]
pub struct HarnessError(String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn err(msg: impl Into<String>) -> HarnessError {
    HarnessError(msg.into())
}

impl From<io::Error> for HarnessError {
    fn from(e: io::Error) -> Self {
        HarnessError(e.to_string())
    }
}

/// A running throwaway cluster. Stopped (immediate shutdown) on drop.
pub struct PgCluster {
    // Field order matters: the server is stopped in Drop before the directory goes.
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    builder: Builder,
    dir: tempfile::TempDir,
}

impl fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("data", &self.data)
            .finish()
    }
}

/// The directory with `initdb`, `postgres`, `psql`.
pub fn bindir() -> Result<PathBuf, HarnessError> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PG_BIN") {
            let p = PathBuf::from(p);
            if p.join("initdb").exists() {
                return Ok(p);
            }
            return Err(format!("PG_BIN={} has no initdb", p.display()));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if p.join("initdb").exists() {
                    return Ok(p);
                }
            }
        }
        let mut found: Vec<(u32, PathBuf)> = Vec::new();
        if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
            for e in rd.flatten() {
                let bin = e.path().join("bin");
                if let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    if bin.join("initdb").exists() {
                        found.push((v, bin));
                    }
                }
            }
        }
        found.sort();
        found.pop().map(|(_, p)| p).ok_or_else(|| {
            "no PostgreSQL binaries found: set PG_BIN, put pg_config on PATH, or run \
             `apt-get install -y postgresql`"
                .to_owned()
        })
    })
    .clone()
    .map_err(err)
}

/// The major version of the server binaries in `bin` (`postgres --version`).
fn bindir_major(bin: &Path) -> Option<u32> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    // "postgres (PostgreSQL) 15.4 (Debian 15.4-1)"
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2)?;
    version.split(['.', 'b', 'r']).next()?.parse().ok()
}

/// Where `scripts/fetch-postgres` caches server binaries, one directory per major:
/// `$RESHARD_PG_CACHE`, else `/var/cache/reshard/pg` as root (the `postgres` user that runs
/// the servers cannot enter root's home), else `~/.cache/reshard/pg`.
pub fn pg_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("RESHARD_PG_CACHE") {
        return PathBuf::from(p);
    }
    if is_root() {
        return PathBuf::from("/var/cache/reshard/pg");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/reshard/pg")
}

/// The directory with `initdb` and `postgres` of PostgreSQL `major` (`None`: the system's
/// default, [`bindir`]). A missing major is an error that names the script that fetches it.
pub fn server_bindir(major: Option<u32>) -> Result<PathBuf, HarnessError> {
    static FOUND: OnceLock<Mutex<Vec<(u32, PathBuf)>>> = OnceLock::new();
    let Some(major) = major else {
        return bindir();
    };
    let found = FOUND.get_or_init(|| Mutex::new(Vec::new()));
    let mut found = found.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = found.iter().find(|(m, _)| *m == major) {
        return Ok(p.clone());
    }
    let cache = pg_cache_dir().join(major.to_string()).join("bin");
    let mut candidates = Vec::new();
    if let Ok(system) = bindir() {
        candidates.push(system);
    }
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    candidates.push(cache.clone());
    for bin in candidates {
        if bin.join("initdb").exists() && bindir_major(&bin) == Some(major) {
            found.push((major, bin.clone()));
            return Ok(bin);
        }
    }
    Err(err(format!(
        "PostgreSQL {major} server binaries not found (looked in the system's bin dir,          /usr/lib/postgresql/{major}/bin and {}); fetch them with: scripts/fetch-postgres {major}",
        cache.display()
    )))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid/gid of the `postgres` account, when we run as root.
fn postgres_ids() -> Result<Option<(u32, u32)>, HarnessError> {
    if !is_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            let uid = f[2].parse().map_err(|_| err("bad /etc/passwd"))?;
            let gid = f[3].parse().map_err(|_| err("bad /etc/passwd"))?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(err(
        "running as root but there is no `postgres` user to run initdb/postgres as \
         (apt-get install -y postgresql creates it)",
    ))
}

fn chown(path: &Path, ids: Option<(u32, u32)>) -> Result<(), HarnessError> {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn as_postgres(cmd: &mut Command) -> Result<&mut Command, HarnessError> {
    if let Some((uid, gid)) = postgres_ids()? {
        cmd.uid(uid).gid(gid);
        // HOME of root is not readable by postgres; some tools look at it.
        cmd.env("HOME", "/tmp");
    }
    Ok(cmd)
}

/// A directory readable by the postgres user under which clusters live.
fn base_dir() -> Result<PathBuf, HarnessError> {
    let base = std::env::temp_dir().join("reshard-harness");
    fs::create_dir_all(&base)?;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755))?;
    Ok(base)
}

/// How the template clusters are made (initdb's arguments below): part of a template's name, so
/// that a change here never reuses a template made the old way.
const TEMPLATE_FORMAT: u32 = 1;

/// The template data directory of the binaries in `bin`, made by `initdb` once for every process
/// of the machine: it lives under [`base_dir`] as `template-v<format>-<bin path>` and is reused
/// by every later test process (one per major, not one per test binary run: a per-process
/// template could never be removed, since statics are not dropped at exit, and each left
/// about 40 MB behind).
fn template(bin: &Path) -> Result<PathBuf, HarnessError> {
    type Templates = Vec<(PathBuf, Result<PathBuf, String>)>;
    static TEMPLATES: OnceLock<Mutex<Templates>> = OnceLock::new();
    // Held while initdb runs: a second cluster of the same major waits for the first template.
    let mut templates = TEMPLATES
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = templates.iter().find(|(b, _)| b == bin) {
        return r.clone().map_err(err);
    }
    let r = shared_template(bin).map_err(|e| e.0);
    templates.push((bin.to_owned(), r.clone()));
    r.map_err(err)
}

/// The machine-wide template of `bin` (see [`template`]): made in a temporary directory and
/// renamed into place once complete, so a process never sees half a template, and two
/// processes racing to make it both end up using the one that was renamed first.
fn shared_template(bin: &Path) -> Result<PathBuf, HarnessError> {
    let name: String = bin
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = base_dir()?.join(format!("template-v{TEMPLATE_FORMAT}-{name}"));
    let data = dir.join("data");
    if data.join("PG_VERSION").is_file() {
        return Ok(data);
    }
    let ids = postgres_ids()?;
    let tmp = tempfile::Builder::new()
        .prefix("making-template-")
        .tempdir_in(base_dir()?)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
    chown(tmp.path(), ids)?;
    let log = tmp.path().join("initdb.log");
    let logf = fs::File::create(&log)?;
    chown(&log, ids)?;
    let status = as_postgres(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(tmp.path().join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf),
    )?
    .status()?;
    if !status.success() {
        let out = fs::read_to_string(&log).unwrap_or_default();
        return Err(err(format!(
            "initdb ({}) failed ({status}):\n{out}",
            bin.display()
        )));
    }
    match fs::rename(tmp.path(), &dir) {
        // Renamed: the directory is the template now, not a temporary one to remove.
        Ok(()) => {
            let _ = tmp.keep();
            Ok(data)
        }
        // Another process renamed its template first: use that one (ours is removed on drop).
        Err(_) if data.join("PG_VERSION").is_file() => Ok(data),
        Err(e) => Err(err(format!(
            "cannot move the template cluster made by {} into {}: {e}",
            bin.display(),
            dir.display()
        ))),
    }
}

/// Every postmaster is spawned by this one thread, which lives as long as the process, so that
/// `PR_SET_PDEATHSIG` (which fires when the *spawning thread* exits) only fires when the
/// process itself dies.
type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-harness-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl is async-signal-safe; it runs in the forked child.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn harness thread");
        Mutex::new(tx)
    })
}

fn spawn_postmaster(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("harness spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("harness spawner thread is gone"))?
}

fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl PgCluster {
    /// Starts a cluster with the default settings (`wal_level=logical`, trust auth).
    pub fn start() -> Result<PgCluster, HarnessError> {
        Builder::default().start()
    }

    /// Options for a cluster.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn start_with(builder: Builder) -> Result<PgCluster, HarnessError> {
        let ids = postgres_ids()?;
        let template = template(&server_bindir(builder.major)?)?;
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(base_dir()?)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        chown(dir.path(), ids)?;
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()?;
        if !status.success() {
            return Err(err(format!(
                "copying the template cluster to {} failed",
                data.display()
            )));
        }
        let c = PgCluster::launch_in(dir, data, builder, ids)?;
        if let Some(pw) = c.builder.password.clone() {
            let method = match c.builder.auth {
                Auth::Trust => "trust",
                Auth::Scram => "scram-sha-256",
                Auth::Md5 => "md5",
            };
            let enc = if c.builder.auth == Auth::Md5 {
                "md5"
            } else {
                "scram-sha-256"
            };
            c.psql(
                "postgres",
                &format!(
                    "SET password_encryption = '{enc}'; ALTER USER postgres PASSWORD '{}'",
                    pw.replace('\'', "''")
                ),
            )?;
            c.write_hba(&format!(
                "local all all trust\nhost all all 127.0.0.1/32 {method}\n\
                 host replication all 127.0.0.1/32 {method}\n"
            ))?;
        }
        Ok(c)
    }

    /// Replaces `pg_hba.conf` and reloads the server.
    pub fn write_hba(&self, contents: &str) -> Result<(), HarnessError> {
        fs::write(self.data.join("pg_hba.conf"), contents)?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        Ok(())
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let logf = fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut cmd = Command::new(server_bindir(self.builder.major)?.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"]);
        for (k, v) in &self.builder.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        as_postgres(&mut cmd)?;
        let child = spawn_postmaster(cmd)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(err(format!(
                        "postgres exited at start ({status}); log {}:\n{}",
                        self.log.display(),
                        self.log_tail()
                    )));
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.psql_raw("postgres", "SELECT 1").is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(err(format!(
                    "postgres did not become ready within 60s; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Path of the server log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The temporary directory holding the cluster (data, socket, log).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// libpq URL for `db` as the `postgres` superuser over TCP (password included if set).
    pub fn url(&self, db: &str) -> String {
        match &self.builder.password {
            Some(pw) => format!("postgres://postgres:{pw}@127.0.0.1:{}/{db}", self.port),
            None => format!("postgres://postgres@127.0.0.1:{}/{db}", self.port),
        }
    }

    /// libpq key=value connection string for `db` (no password).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// `server_version_num` of the running server (`130023` for 13.23).
    pub fn server_version_num(&self) -> Result<u32, HarnessError> {
        let v = self.psql("postgres", "SHOW server_version_num")?;
        v.parse()
            .map_err(|_| err(format!("server_version_num {v:?} on port {}", self.port)))
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> Result<(), HarnessError> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(())
    }

    fn psql_raw(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        let out = Command::new(bindir()?.join("psql"))
            .arg("-X")
            .arg("-q")
            .arg("-At")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "psql on port {} db {db}: {}\nSQL: {sql}",
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Runs SQL with `psql` over the unix socket (always trusted) and returns its unaligned,
    /// tuples-only output (`|`-separated columns, one row per line).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        self.psql_raw(db, sql)
    }

    /// Like [`PgCluster::psql`] but runs a script file with `-f`.
    pub fn psql_file(&self, db: &str, file: &Path) -> Result<String, HarnessError> {
        let out = Command::new(bindir()?.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-f"])
            .arg(file)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "psql -f {} on port {} db {db}: {}",
                file.display(),
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fast shutdown (SIGINT): disconnects clients, checkpoints, exits.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        self.signal_and_wait(libc::SIGINT, Duration::from_secs(60));
        Ok(())
    }

    /// Crash the server (SIGKILL the postmaster; its backends exit on postmaster death).
    pub fn kill(&mut self) {
        self.signal_and_wait(libc::SIGKILL, Duration::from_secs(30));
    }

    /// Starts the server again after [`PgCluster::stop`] or [`PgCluster::kill`], on the same
    /// port and data directory.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if self.is_running() {
            self.stop()?;
        }
        // After a kill the old backends may hold the port for a moment.
        let mut last = None;
        for _ in 0..50 {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            thread::sleep(Duration::from_millis(200));
        }
        Err(last.unwrap_or_else(|| err("restart failed")))
    }

    /// A physical standby of this cluster, streaming from it (`pg_basebackup -R -X stream`,
    /// hot standby): same binaries and settings, its own port and directory. Stopped on drop
    /// like any cluster.
    pub fn start_standby(&self) -> Result<PgCluster, HarnessError> {
        let ids = postgres_ids()?;
        let bin = server_bindir(self.builder.major)?;
        let dir = tempfile::Builder::new()
            .prefix("pg-standby-")
            .tempdir_in(base_dir()?)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        chown(dir.path(), ids)?;
        let data = dir.path().join("data");
        let mut cmd = Command::new(bin.join("pg_basebackup"));
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-R", "-X", "stream", "-c", "fast"])
            .stdin(Stdio::null());
        if let Some(pw) = &self.builder.password {
            cmd.env("PGPASSWORD", pw);
        }
        as_postgres(&mut cmd)?;
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(err(format!(
                "pg_basebackup from port {} failed: {}",
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        PgCluster::launch_in(dir, data, self.builder.clone(), ids)
    }

    /// Starts the server of the data directory `data` in `dir` (its socket directory and log
    /// file made there, owned by `ids`) on a free port, trying up to five ports.
    fn launch_in(
        dir: tempfile::TempDir,
        data: PathBuf,
        builder: Builder,
        ids: Option<(u32, u32)>,
    ) -> Result<PgCluster, HarnessError> {
        let socket_dir = dir.path().join("sock");
        fs::create_dir(&socket_dir)?;
        chown(&socket_dir, ids)?;
        let log = dir.path().join("server.log");
        fs::File::create(&log)?;
        chown(&log, ids)?;
        let mut c = PgCluster {
            child: None,
            port: 0,
            data,
            log,
            socket_dir,
            builder,
            dir,
        };
        let mut last = None;
        for _ in 0..5 {
            c.port = free_port()?;
            match c.launch() {
                Ok(()) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err("the server did not start")))
    }

    fn signal_and_wait(&mut self, sig: libc::c_int, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill with a pid we own.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Wait until no backend of this cluster holds the data directory any more
        // (postmaster.pid disappears on clean exit; on SIGKILL backends exit on their own).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Immediate shutdown: a throwaway cluster needs no checkpoint.
        self.signal_and_wait(libc::SIGQUIT, Duration::from_secs(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_queries_restarts_and_stops() {
        let mut c = PgCluster::start().unwrap();
        assert_eq!(c.psql("postgres", "SHOW wal_level").unwrap(), "logical");
        c.create_database("app").unwrap();
        c.psql("app", "CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
            .unwrap();
        c.stop().unwrap();
        assert!(!c.is_running());
        c.restart().unwrap();
        assert_eq!(c.psql("app", "SELECT count(*) FROM t").unwrap(), "1");
        let port = c.port();
        drop(c);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    /// The template is named by its binaries, not made anew by each process: a process that
    /// made its own left it behind (statics are not dropped), about 40 MB per test binary run.
    #[test]
    fn the_template_is_shared_by_every_process_of_the_machine() {
        let bin = server_bindir(None).unwrap();
        let a = template(&bin).unwrap();
        let b = shared_template(&bin).unwrap();
        assert_eq!(a, b);
        let dir = a.parent().unwrap();
        assert_eq!(dir.parent().unwrap(), base_dir().unwrap());
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("template-v{TEMPLATE_FORMAT}-")),
            "{name}"
        );
        assert!(a.join("PG_VERSION").is_file());
    }

    #[test]
    fn two_clusters_at_once() {
        let a = PgCluster::start().unwrap();
        let b = PgCluster::start().unwrap();
        assert_ne!(a.port(), b.port());
        assert_eq!(a.psql("postgres", "SELECT 1").unwrap(), "1");
        assert_eq!(b.psql("postgres", "SELECT 2").unwrap(), "2");
    }

    /// Needs `scripts/fetch-postgres 13` (CI runs it).
    #[test]
    fn a_cluster_of_another_major_runs_its_binaries() {
        let c = PgCluster::builder().major(13).start().unwrap();
        assert_eq!(c.server_version_num().unwrap() / 10000, 13);
        assert_eq!(c.psql("postgres", "SHOW wal_level").unwrap(), "logical");
    }

    #[test]
    fn a_missing_major_names_the_script_that_fetches_it() {
        let e = server_bindir(Some(11)).unwrap_err().to_string();
        assert!(e.contains("scripts/fetch-postgres 11"), "{e}");
    }

    #[test]
    fn password_auth_is_enforced() {
        let c = PgCluster::builder()
            .password("s3cret", Auth::Scram)
            .start()
            .unwrap();
        assert!(c.url("postgres").contains("s3cret"));
        let hba = fs::read_to_string(c.data_dir().join("pg_hba.conf")).unwrap();
        assert!(hba.contains("scram-sha-256"));
    }
}
