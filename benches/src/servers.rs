//! Where the benchmark runs: one source server and N shard servers.
//!
//! In: either nothing (the harness starts throwaway local clusters with `reshard-harness`) or
//! connection URLs given on the command line. Out: a [`Topology`] whose servers hand out URLs,
//! libpq key=value strings and SQL clients for any database, and can (re)create the per-scenario
//! databases. Invariant: the benchmark only ever drops and creates databases whose names start
//! with `rb_` ([`Server::recreate_db`] refuses any other name), so pointing it at a real server
//! never touches that server's own databases.

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use reshard_harness::PgCluster;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

/// One PostgreSQL server (a cluster), local or given by URL.
pub struct Server {
    /// `source`, `shard0`, ...
    pub name: String,
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    /// The cluster when the harness started it (stopped on drop).
    local: Option<PgCluster>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.name, self.host, self.port)
    }
}

impl Server {
    /// Starts a throwaway local cluster (`fsync=off`, `synchronous_commit=off`, see
    /// `reshard-harness`).
    pub fn start_local(name: &str) -> Result<Server> {
        let c = PgCluster::start().with_context(|| format!("starting local cluster {name}"))?;
        Ok(Server {
            name: name.to_owned(),
            host: "127.0.0.1".into(),
            port: c.port(),
            user: "postgres".into(),
            password: None,
            local: Some(c),
        })
    }

    /// A server given by a libpq URL or key=value string; its database part is ignored.
    pub fn external(name: &str, url: &str) -> Result<Server> {
        let cfg = tokio_postgres::Config::from_str(url)
            .with_context(|| format!("{name}: invalid connection string"))?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("PGUSER").ok())
            .unwrap_or_else(|| "postgres".into());
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok(Server {
            name: name.to_owned(),
            host,
            port,
            user,
            password,
            local: None,
        })
    }

    /// Whether the harness started this server (so its processes are on this machine and
    /// their `/proc` entries readable).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// libpq key=value string for `db` (password included if any).
    pub fn conninfo(&self, db: &str) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            q(&self.host),
            self.port,
            q(&self.user),
            q(db)
        );
        if let Some(pw) = &self.password {
            s.push_str(&format!(" password={}", q(pw)));
        }
        s
    }

    /// libpq URL for `db` (user and password percent-encoded).
    pub fn url(&self, db: &str) -> String {
        let auth = match &self.password {
            Some(pw) => format!("{}:{}", pct(&self.user), pct(pw)),
            None => pct(&self.user),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("postgres://{auth}@{host}:{}/{}", self.port, pct(db))
    }

    /// An SQL connection to `db` (its connection task runs on the current runtime).
    pub async fn connect(&self, db: &str) -> Result<Client> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(db), NoTls)
            .await
            .with_context(|| format!("connecting to {} database {db}", self.name))?;
        tokio::spawn(async move {
            // The error surfaces on the client's next query.
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Drops (terminating its sessions) and creates database `db`; `db` must start with `rb_`.
    pub async fn recreate_db(&self, db: &str) -> Result<()> {
        if !db.starts_with("rb_") {
            bail!(
                "refusing to drop database {db} on {}: the benchmark only manages rb_* databases",
                self.name
            );
        }
        let c = self.connect("postgres").await?;
        // Two round trips: DROP/CREATE DATABASE refuse to run in a (multi-statement) block.
        for sql in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db}"),
        ] {
            c.batch_execute(&sql)
                .await
                .with_context(|| format!("recreating database {db} on {}", self.name))?;
        }
        Ok(())
    }

    /// Drops database `db` (an `rb_*` one) if it exists.
    pub async fn drop_db(&self, db: &str) -> Result<()> {
        if !db.starts_with("rb_") {
            bail!("refusing to drop database {db} on {}", self.name);
        }
        let c = self.connect("postgres").await?;
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping database {db} on {}", self.name))?;
        Ok(())
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The source and the shards, in hash-remainder order.
#[derive(Debug)]
pub struct Topology {
    /// The source server.
    pub source: Server,
    /// The shard servers; shard k gets the accounts with hash remainder k.
    pub shards: Vec<Server>,
}

impl Topology {
    /// Starts a local source and `n` local shards.
    pub fn start_local(n: usize) -> Result<Topology> {
        let source = Server::start_local("source")?;
        let shards = (0..n)
            .map(|k| Server::start_local(&format!("shard{k}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Topology { source, shards })
    }

    /// Servers given by URL.
    pub fn external(source: &str, shards: &[String]) -> Result<Topology> {
        if shards.is_empty() {
            bail!("--source needs at least one --shard URL");
        }
        Ok(Topology {
            source: Server::external("source", source)?,
            shards: shards
                .iter()
                .enumerate()
                .map(|(k, u)| Server::external(&format!("shard{k}"), u))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// Number of shards.
    pub fn n(&self) -> usize {
        self.shards.len()
    }

    /// Whether every server is local.
    pub fn all_local(&self) -> bool {
        self.source.is_local() && self.shards.iter().all(Server::is_local)
    }
}
