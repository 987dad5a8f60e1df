//! `reshard check`, `verify`, `cutover`, `status` and `lag` against real clusters (a source and
//! three shards), driving the real `reshard` binary with a generated `reshard.toml`.
//!
//! The shards are loaded without reshard: every row is copied (`psql \copy` piped into
//! `psql \copy`) to the shard PostgreSQL's own hash partitioning picks
//! (`satisfies_hash_partition` on a temporary hash-partitioned helper table, MODULUS 3), so
//! that verify is judged against PostgreSQL, not against reshard's router.

pub(crate) use crate::common;

mod check;
mod config_keys;
mod cutover;
mod fence;
mod groups;
mod grow;
mod status;
mod table_set;
mod verify;

use std::process::{Command, Stdio};

use common::Topology;
use reshard_harness::workload::{self, FillSpec};
use reshard_harness::PgCluster;

/// The sharded tables of the multi-tenant fixture with their key.
pub const SHARDED: &[&str] = &[
    "accounts",
    "customers",
    "subscriptions",
    "invoices",
    "events",
];

/// Connects to a database.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// A topology with the multi-tenant schema everywhere and `spec` data on the source.
pub async fn topology_with_data(shards: usize, spec: FillSpec) -> Topology {
    let t = Topology::start(shards);
    let src = connect(&t.source.url("app")).await;
    workload::create_schema(&src)
        .await
        .expect("schema on source");
    for s in &t.shards {
        let c = connect(&s.url("app")).await;
        workload::create_schema(&c).await.expect("schema on shard");
    }
    workload::fill(&src, spec).await.expect("fill");
    t
}

/// Copies `query`'s rows from the source into `table` on a shard, through two psql processes
/// (never holding the rows in the test). `setup` runs first in the source session.
pub fn pipe_copy(source: &PgCluster, setup: &str, query: &str, shard: &PgCluster, table: &str) {
    let bin = reshard_harness::bindir().expect("bindir");
    let mut out = Command::new(bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(source.url("app"))
        .args(["-c", setup, "-c"])
        .arg(format!("\\copy ({query}) TO STDOUT"))
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("psql out");
    let stdout = out.stdout.take().expect("stdout");
    let into = Command::new(bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(shard.url("app"))
        .args(["-c"])
        .arg(format!("\\copy {table} FROM STDIN"))
        .stdin(Stdio::from(stdout))
        .output()
        .expect("psql in");
    let st = out.wait().expect("wait psql out");
    assert!(st.success(), "copy out of {table} failed");
    assert!(
        into.status.success(),
        "copy into {table}: {}",
        String::from_utf8_lossy(&into.stderr)
    );
}

/// Loads every shard with exactly the rows PostgreSQL's hash partitioning (MODULUS = number of
/// shards) assigns to it; broadcast tables go everywhere.
pub fn load_shards(t: &Topology) {
    let n = t.shards.len();
    let setup = "CREATE TEMP TABLE route_helper (k bigint) PARTITION BY HASH (k)";
    for (r, shard) in t.shards.iter().enumerate() {
        for table in SHARDED {
            pipe_copy(
                &t.source,
                setup,
                &format!(
                    "SELECT * FROM {table} WHERE satisfies_hash_partition('route_helper'::regclass, {n}, {r}, account_id)"
                ),
                shard,
                table,
            );
        }
        pipe_copy(
            &t.source,
            "SET client_min_messages = warning",
            "SELECT * FROM plans",
            shard,
            "plans",
        );
    }
}

/// The shard PostgreSQL's hash partitioning assigns to `account`.
pub fn shard_of(t: &Topology, account: i64) -> usize {
    let n = t.shards.len();
    let out = t.source_sql(&format!(
        "CREATE TEMP TABLE route_helper (k bigint) PARTITION BY HASH (k); \
         SELECT r FROM generate_series(0, {}) r WHERE satisfies_hash_partition('route_helper'::regclass, {n}, r, {account}::bigint)",
        n - 1
    ));
    out.trim().parse().expect("remainder")
}

/// Parses stdout as JSON (panics with the output).
pub fn json(stdout: &str, stderr: &str) -> serde_json::Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"))
}
