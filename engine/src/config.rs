//! Configuration: the `reshard.toml` file.
//!
//! In: TOML text (plus environment overrides for secrets). Out: a validated [`Config`] whose
//! values have their defaults applied and their units in their names. Unknown keys are an error
//! naming the key and the line (serde's `deny_unknown_fields` + toml's spans); so are missing
//! required keys and out-of-range values.
//!
//! Environment: `${NAME}` inside any `url` is replaced by that variable's value (so secrets stay
//! out of the file); `RESHARD_SOURCE_URL` replaces `[source] url`, and
//! `RESHARD_SHARD_<NAME>_URL` (name upper-cased, non-alphanumerics as `_`) replaces a shard's
//! `url`. Passwords may also come from `PGPASSWORD` or `~/.pgpass`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pg::sql::TableName;

/// A configuration problem, naming the file, key and line where known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a wrongly typed value.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message (it names the line, column and key).
        message: String,
    },
    /// A value is present but not acceptable.
    #[error("{path}: {key}{}: {message}", .line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: String,
        /// The key, e.g. `shards[2].name`.
        key: String,
        /// The line the key is on in the file, where it is there (not for a default or an
        /// environment override).
        line: Option<usize>,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl crate::error::Classify for ConfigError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Definite
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[source]`: the database being moved.
    pub source: SourceConfig,
    /// `[routing]`: how a row's shard is chosen.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[[shards]]`: the targets, in hash-remainder order 0..N-1.
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    /// `[[new_shards]]`: shards that join the layout when it grows (`reshard plan --shards M`,
    /// `reshard rebalance --shards M`), in remainder order N..M-1 after `[[shards]]`. Every
    /// other command ignores them. Default: none.
    #[serde(default)]
    pub new_shards: Vec<ShardConfig>,
    /// `[[tables]]`: optional per-table rules; without it every table of the source database
    /// that has the key column is sharded and every other one is broadcast.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// `[apply]`: batching and retries of the per-shard apply.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// `[spill]`: the local durable log.
    #[serde(default)]
    pub spill: SpillConfig,
    /// `[snapshot]`: the full load.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// `[admin]`: admin console and metrics endpoints.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[cutover]`: cutover helpers.
    #[serde(default)]
    pub cutover: CutoverConfig,
    /// `[group]`: this file is one group of a migration split by `reshard plan --groups K`
    /// (default: none, the file is the whole migration).
    #[serde(default)]
    pub group: Option<GroupConfig>,
}

/// `[source]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq URL or key=value string (required). `${VAR}` is expanded.
    pub url: String,
    /// Logical replication slot name. Default `reshard`.
    #[serde(default = "default_reshard")]
    pub slot: String,
    /// Publication name. Default `reshard`; created for the chosen tables if missing.
    #[serde(default = "default_reshard")]
    pub publication: String,
    /// Ask the server to stream large in-progress transactions (pgoutput `streaming`). Default
    /// true.
    #[serde(default = "default_true")]
    pub streaming: bool,
    /// Interval between standby status updates, in milliseconds. Default 10000.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Read coalescing, milliseconds (default 2; 0 = off): when bursts of transactions from the
    /// source end less than this apart (a busy source, or a backlog being caught up), the
    /// ingest waits this long before reading again, so each hand-off to the shards carries a
    /// batch instead of a transaction or two. A quiet source is read at once.
    #[serde(default = "default_coalesce_ms")]
    pub coalesce_ms: u64,
    /// No effect (default: unset); accepted so that older files still parse, and `run` warns
    /// when it is set. It bounded a reader → router channel that no longer exists: ingest
    /// reads, decodes, routes and spills on one thread (see `ingest.rs`).
    #[serde(default)]
    pub channel_capacity: Option<usize>,
}

/// Hash kind of `[routing] hash`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HashKind {
    /// PostgreSQL's own `PARTITION BY HASH (key)` with `MODULUS N` (default).
    #[default]
    Postgres,
    /// An explicit account → shard map.
    Map,
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Default shard-key column. Default `account_id`.
    #[serde(default = "default_key")]
    pub key: String,
    /// `postgres` (default) or `map`.
    #[serde(default)]
    pub hash: HashKind,
    /// With `hash = "map"`: CSV file of `account_id,shard_name` lines (relative to the config
    /// file's directory).
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// With `hash = "map"`: a query on the source returning `(account_id, shard_name)`.
    #[serde(default)]
    pub map_query: Option<String>,
    /// With `map_query`: the statement `reshard move` runs on the source to flip its accounts
    /// in the account directory the query reads, with `$1` the accounts (`text[]`) and `$2` the
    /// target shard's name (`text`), e.g. `UPDATE account_shards SET shard = $2 WHERE account_id
    /// = ANY($1::bigint[])`. Default: none (a move with `map_query` is refused before it starts).
    #[serde(default)]
    pub map_update: Option<String>,
    /// With `hash = "map"`: shard for accounts missing from the map (default: none, an error).
    #[serde(default)]
    pub default_shard: Option<String>,
    /// With `hash = "map"`: re-read the map (the CSV file or `map_query`) every this many
    /// seconds, seconds. Default 60; 0 turns the timer off (the map is still re-read on SIGHUP,
    /// when the CSV file changes, and once when an unknown account shows up).
    #[serde(default = "default_map_refresh_secs")]
    pub map_refresh_secs: u64,
    /// What happens to a change that cannot be routed (a NULL shard key, an account missing
    /// from the map after a re-lookup): `quarantine` (default: kept in a durable per-table
    /// quarantine under the spill dir, every other change goes on; see `reshard quarantine`)
    /// or `stop` (reading from the source stops at that change).
    #[serde(default)]
    pub on_unroutable: OnUnroutable,
    /// The shard key of a row never changes (default false). For a sharded table whose replica
    /// identity does not contain the key (a surrogate `id` primary key): an UPDATE routes by
    /// its new row's key and a DELETE, which carries only the primary key, goes to every shard.
    /// `verify` reports rows left on the wrong shard if the assumption is violated. Per table:
    /// `[[tables]] key_immutable`.
    #[serde(default)]
    pub key_immutable: bool,
}

/// `[routing] on_unroutable`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnroutable {
    /// Keep the change in the durable quarantine; every other change goes on (default).
    #[default]
    Quarantine,
    /// Stop reading from the source at the change.
    Stop,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            key: default_key(),
            hash: HashKind::Postgres,
            map: None,
            map_query: None,
            map_update: None,
            default_shard: None,
            map_refresh_secs: default_map_refresh_secs(),
            on_unroutable: OnUnroutable::default(),
            key_immutable: false,
        }
    }
}

/// `[[shards]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Unique shard name (required).
    pub name: String,
    /// libpq URL or key=value string (required). `${VAR}` is expanded.
    pub url: String,
    /// The shard's read replicas (libpq URLs or key=value strings; `${VAR}` is expanded): with
    /// `[snapshot] max_replica_lag_ms`, the full load slows down while their replay lag is
    /// over the bound. Default: none.
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// `mode` of a `[[tables]]` entry, as written: no key column (that is `key` or `[routing] key`).
///
/// The stages take it resolved, each in its own type (a stage imports no other stage, see
/// `lib.rs`), converted once in `runtime::options`: `route::TableMode` carries the key and
/// `key_immutable` and keeps `Skip` (the router drops a skipped table's changes);
/// `snapshot::TableMode` carries the key only and has no `Skip` (a skipped table is not in the
/// load). `TableRule` pairs this mode with the resolved key for the operator's commands.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableMode {
    /// Rows go to the shard of their key (default when the table has the key column).
    #[default]
    Sharded,
    /// Every row goes to every shard (reference tables).
    Broadcast,
    /// Not replicated.
    Skip,
}

/// `[[tables]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Source table, `schema.table` (`public.` assumed when no schema is given). Without quotes
    /// a part is taken as PostgreSQL stores it (case kept, trimmed); a part in SQL double quotes
    /// is taken exactly (`"sales.eu".orders`, `public." padded "`). See
    /// [`TableName::parse`].
    pub name: String,
    /// Target table on every shard, spelled as `name`. Default: same as `name`.
    #[serde(default)]
    pub target: Option<String>,
    /// Shard-key column. Default `[routing] key`.
    #[serde(default)]
    pub key: Option<String>,
    /// `sharded` (default), `broadcast` or `skip`.
    #[serde(default)]
    pub mode: Option<TableMode>,
    /// The shard key of a row never changes (see `[routing] key_immutable`). Default: `[routing]
    /// key_immutable`.
    #[serde(default)]
    pub key_immutable: Option<bool>,
}

/// `[apply]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Most rows in one target transaction. Default 10000.
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// Most bytes of row data in one target transaction. Default 16 MiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// A group is committed as soon as the shard's log has nothing more to read (a caught-up
    /// shard does not wait), and at the latest this long after its first transaction, ms.
    /// Default 10 (under load groups fill by rows/bytes long before it).
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// A shard that is catching up (the newest source transaction it read committed on the
    /// source at least this long ago) holds its group open up to this long for more
    /// transactions instead of committing whenever its log is momentarily empty: fewer, larger
    /// target transactions while a backlog drains. A caught-up shard never waits. ms; 0 = off.
    /// Default 20.
    #[serde(default = "default_catchup_batch_ms")]
    pub catchup_batch_ms: u64,
    /// Run the target session with `session_replication_role = replica` (triggers and FK
    /// checks behave as in native logical replication). Default true.
    #[serde(default = "default_true")]
    pub session_replication_role_replica: bool,
    /// First retry delay after a transient error, ms. Default 500.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay, ms. Default 30000.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// What a shard does when the source's table gains a column its shard table lacks
    /// (`ALTER TABLE … ADD COLUMN` on the source mid-migration) or widens a column's type
    /// (`ALTER COLUMN … TYPE`, e.g. `integer` → `bigint`). Default `propagate`.
    #[serde(default)]
    pub ddl: DdlMode,
}

/// `[apply] ddl`: how additive schema changes on the source (ADD COLUMN, a widening ALTER
/// COLUMN … TYPE) reach the shards. Other changes (DROP / RENAME / an ALTER TYPE that is no
/// widening) always pause the shard's apply until the shard table matches, in both modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlMode {
    /// reshard adds the column on every shard itself, in stream order (before the first change
    /// that carries it), with the source's type, nullability and default; and widens a
    /// column's type as the source did (`integer` → `bigint`, `varchar(n)` → `text`,
    /// `numeric(p,s)` → `numeric`: conversions that keep every value's text). The default.
    #[default]
    Propagate,
    /// The shard pauses with an error naming table and column (state `waiting_for_ddl`),
    /// retries on the backoff, and resumes by itself once the operator added the column (or
    /// changed its type).
    Wait,
}

impl DdlMode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            DdlMode::Propagate => "propagate",
            DdlMode::Wait => "wait",
        }
    }
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_max_rows: default_batch_max_rows(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_max_delay_ms: default_batch_max_delay_ms(),
            catchup_batch_ms: default_catchup_batch_ms(),
            session_replication_role_replica: true,
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            ddl: DdlMode::default(),
        }
    }
}

/// `[spill]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpillConfig {
    /// Directory of the spill log; a relative path is relative to the config file's directory
    /// (not the working directory, so every command finds the same log). Default
    /// `./reshard-data`.
    #[serde(default = "default_spill_dir")]
    pub dir: PathBuf,
    /// Cap on the log's size on disk (at least twice `segment_bytes`); at the cap reading from
    /// the source pauses. Default 10 GiB.
    #[serde(default = "default_spill_max_bytes")]
    pub max_bytes: u64,
    /// Size of one segment file (at least 1 MiB: twice the spill's block size). Default 64 MiB.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Group-commit interval: how often appended data is fsynced and confirmed to the source,
    /// ms. Default 20 (the fsyncs of a group overlap the next group's appends; the shards get
    /// the data at the end of each burst without waiting for it, so this paces only the disk
    /// and the source's confirmed position).
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Recent data kept in memory for caught-up shards. Default 64 MiB.
    #[serde(default = "default_memory_tail_bytes")]
    pub memory_tail_bytes: u64,
    /// zstd level of the blocks, 1..=9. Default 1.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

impl Default for SpillConfig {
    fn default() -> Self {
        SpillConfig {
            dir: default_spill_dir(),
            max_bytes: default_spill_max_bytes(),
            segment_bytes: default_segment_bytes(),
            flush_interval_ms: default_flush_interval_ms(),
            memory_tail_bytes: default_memory_tail_bytes(),
            zstd_level: default_zstd_level(),
        }
    }
}

/// How the full load reads the source: `[snapshot] mode`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Every table under the slot's exported snapshot, held until the load ends (default).
    #[default]
    Exported,
    /// Tables with an integer primary key in key-ordered chunks, each under its own short
    /// snapshot (no snapshot held across chunks); other tables fall back to `Exported`.
    Watermark,
}

/// `[snapshot]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `"exported"` (one snapshot for the whole load) or `"watermark"` (key-ordered chunks,
    /// each under its own short snapshot, no snapshot held across chunks). Default
    /// `"exported"`.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Concurrent chunk copies. Default 4.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Rows per chunk of a large table. Default 250000.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: u64,
    /// Per-shard row rate limit (0 = unlimited). Default 0.
    #[serde(default)]
    pub max_rows_per_sec: u64,
    /// Per-shard byte rate limit (0 = unlimited). Default 0.
    #[serde(default)]
    pub max_bytes_per_sec: u64,
    /// At most this many concurrent copies into one shard (0 = `parallel`). Default 0.
    #[serde(default)]
    pub max_concurrent_copies_per_shard: usize,
    /// TRUNCATE target tables before loading instead of requiring them empty. Default false.
    #[serde(default)]
    pub truncate_targets: bool,
    /// Drop secondary indexes on the targets before the load and rebuild them after. Default
    /// false.
    #[serde(default)]
    pub defer_indexes: bool,
    /// Copy a table in PostgreSQL's binary COPY format when every copied column's type allows it
    /// (a built-in type, an enum, or a domain over a built-in type, the same on the source and
    /// the shards) and its shard key is an integer; other tables, and every table when false, are
    /// copied in text format. Binary saves the servers printing and parsing each value's text.
    /// Default true.
    #[serde(default = "default_true")]
    pub binary_copy: bool,
    /// During the full load, `run` logs a progress line per table being copied this often,
    /// seconds (0: none). Default 10.
    #[serde(default = "default_progress_interval_secs")]
    pub progress_interval_secs: u64,
    /// Adaptive throttle: the copy into a shard slows down (halves its row rate) while a probe
    /// query on the shard takes longer than this, milliseconds (0: not watched). Default 0.
    #[serde(default)]
    pub max_probe_latency_ms: u64,
    /// Adaptive throttle: … while the shard has more active client backends than this, reshard's
    /// own sessions not counted (0: not watched). Default 0.
    #[serde(default)]
    pub max_active_backends: u64,
    /// Adaptive throttle: … while a replica of the shard (`[[shards]] replicas`) replays more than
    /// this far behind the shard, milliseconds (0: not watched). Default 0.
    #[serde(default)]
    pub max_replica_lag_ms: u64,
    /// Adaptive throttle: the floor of a shard's row rate (the load always goes on at least this
    /// fast), and the step by which the rate grows back per `health_interval_ms` while every
    /// signal is within its bound, rows per second. Default 1000.
    #[serde(default = "default_min_rows_per_sec")]
    pub min_rows_per_sec: u64,
    /// Adaptive throttle: how often each shard's health is sampled, milliseconds. Default 500.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::default(),
            parallel: default_parallel(),
            chunk_rows: default_chunk_rows(),
            max_rows_per_sec: 0,
            max_bytes_per_sec: 0,
            max_concurrent_copies_per_shard: 0,
            truncate_targets: false,
            defer_indexes: false,
            binary_copy: true,
            progress_interval_secs: default_progress_interval_secs(),
            max_probe_latency_ms: 0,
            max_active_backends: 0,
            max_replica_lag_ms: 0,
            min_rows_per_sec: default_min_rows_per_sec(),
            health_interval_ms: default_health_interval_ms(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin console (PostgreSQL protocol) address; `""` turns it off. Default
    /// `127.0.0.1:6433`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Prometheus endpoint address (serves `/metrics`, `/healthz`, `/readyz`); `""` turns it
    /// off. Default `127.0.0.1:9187`.
    #[serde(default = "default_admin_metrics")]
    pub metrics: String,
    /// User name accepted by the admin console. Default `reshard`.
    #[serde(default = "default_reshard")]
    pub user: String,
    /// Password of the admin console, checked with SCRAM-SHA-256 (default: none, trust; then
    /// `listen` must be a loopback address). `${VAR}` is expanded; `RESHARD_ADMIN_PASSWORD`
    /// overrides it.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM certificate chain for TLS on the admin console (relative to the config file's
    /// directory). Default: none, no TLS. With it (and `tls_key`), clients must use TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (relative to the config file's directory).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            metrics: default_admin_metrics(),
            user: default_reshard(),
            password: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[group]`: one of the K groups of a migration (`reshard plan --groups K`), each with its own
/// slot, publication, spill directory and tables. `check` reports, and `run` refuses, any
/// table, slot, publication or spill directory it shares with a peer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's name (required in `[group]`); `reshard plan` writes `g0` … `g{K-1}`.
    pub name: String,
    /// The other groups' config files, relative to this file's directory. Default: none.
    #[serde(default)]
    pub peers: Vec<PathBuf>,
}

/// `[cutover]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverConfig {
    /// Sequences on the shard are set to at least the source's value plus this gap. Default
    /// 1000.
    #[serde(default = "default_sequence_gap")]
    pub sequence_gap: i64,
    /// Longest wait for each table lock when a fence is installed or removed
    /// (`lock_timeout`), milliseconds. Default 2000: a long transaction on a fenced table makes
    /// `fence`/`cutover --fence` fail with its name instead of queueing the application's writes
    /// behind the fence's lock.
    #[serde(default = "default_fence_lock_timeout_ms")]
    pub fence_lock_timeout_ms: u64,
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig {
            sequence_gap: default_sequence_gap(),
            fence_lock_timeout_ms: default_fence_lock_timeout_ms(),
        }
    }
}

fn default_reshard() -> String {
    "reshard".into()
}
fn default_key() -> String {
    "account_id".into()
}
fn default_map_refresh_secs() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_status_interval_ms() -> u64 {
    10_000
}
fn default_coalesce_ms() -> u64 {
    2
}
fn default_batch_max_rows() -> usize {
    10_000
}
fn default_batch_max_bytes() -> usize {
    16 << 20
}
fn default_batch_max_delay_ms() -> u64 {
    10
}
fn default_catchup_batch_ms() -> u64 {
    20
}
fn default_retry_initial_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_spill_dir() -> PathBuf {
    PathBuf::from("./reshard-data")
}
fn default_spill_max_bytes() -> u64 {
    10 << 30
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_flush_interval_ms() -> u64 {
    20
}
fn default_memory_tail_bytes() -> u64 {
    64 << 20
}
fn default_zstd_level() -> i32 {
    1
}
fn default_parallel() -> usize {
    4
}
fn default_chunk_rows() -> u64 {
    250_000
}
fn default_progress_interval_secs() -> u64 {
    10
}
fn default_min_rows_per_sec() -> u64 {
    1000
}
fn default_health_interval_ms() -> u64 {
    500
}
fn default_admin_listen() -> String {
    "127.0.0.1:6433".into()
}
fn default_admin_metrics() -> String {
    "127.0.0.1:9187".into()
}
fn default_sequence_gap() -> i64 {
    1000
}
fn default_fence_lock_timeout_ms() -> u64 {
    2000
}

/// A table rule after defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    /// Source table.
    pub source: TableName,
    /// Target table.
    pub target: TableName,
    /// Mode.
    pub mode: TableMode,
    /// Shard-key column (meaningful for `sharded`).
    pub key: String,
    /// The key never changes (`key_immutable`; meaningful for `sharded`).
    pub key_immutable: bool,
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Config::parse(&text, &path.display().to_string())?;
        // Relative map files, spill directories and TLS files are relative to the config file (issue
        // #11 item 1: a cwd-relative spill dir silently became a fresh, empty log).
        if let Some(dir) = path.parent() {
            for p in cfg
                .routing
                .map
                .iter_mut()
                .chain([&mut cfg.spill.dir])
                .chain(cfg.admin.tls_cert.iter_mut())
                .chain(cfg.admin.tls_key.iter_mut())
                .chain(cfg.group.iter_mut().flat_map(|g| g.peers.iter_mut()))
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.apply_env(origin)
            .and_then(|()| cfg.validate(origin))
            .map_err(|e| match e {
                ConfigError::Invalid {
                    path,
                    key,
                    line: None,
                    message,
                } => ConfigError::Invalid {
                    line: line_of(text, &key),
                    path,
                    key,
                    message,
                },
                e => e,
            })?;
        Ok(cfg)
    }

    fn apply_env(&mut self, origin: &str) -> Result<(), ConfigError> {
        if let Ok(url) = std::env::var("RESHARD_SOURCE_URL") {
            self.source.url = url;
        }
        self.source.url = expand_env(&self.source.url, origin, "source.url")?;
        for (i, s) in self.shards.iter_mut().enumerate() {
            let var = format!("RESHARD_SHARD_{}_URL", env_name(&s.name));
            if let Ok(url) = std::env::var(&var) {
                s.url = url;
            }
            s.url = expand_env(&s.url, origin, &format!("shards[{i}].url"))?;
            for (j, r) in s.replicas.iter_mut().enumerate() {
                *r = expand_env(r, origin, &format!("shards[{i}].replicas[{j}]"))?;
            }
        }
        for (i, s) in self.new_shards.iter_mut().enumerate() {
            s.url = expand_env(&s.url, origin, &format!("new_shards[{i}].url"))?;
        }
        if let Ok(pw) = std::env::var("RESHARD_ADMIN_PASSWORD") {
            self.admin.password = Some(pw);
        }
        if let Some(pw) = self.admin.password.as_mut() {
            *pw = expand_env(pw, origin, "admin.password")?;
        }
        Ok(())
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            line: None,
            message,
        };
        if self.source.url.trim().is_empty() {
            return Err(invalid(
                "source.url",
                "is empty; give a libpq URL or key=value string".into(),
            ));
        }
        for (key, v) in [
            ("source.slot", &self.source.slot),
            ("source.publication", &self.source.publication),
        ] {
            if v.is_empty()
                || v.len() > 63
                || !v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(invalid(
                    key,
                    format!(
                        "{v:?} is not a valid name: use 1-63 lower-case letters, digits or '_'"
                    ),
                ));
            }
        }
        if self.source.coalesce_ms > 1000 {
            return Err(invalid(
                "source.coalesce_ms",
                format!(
                    "{} is outside 0..=1000 (milliseconds; it adds up to that much latency under load)",
                    self.source.coalesce_ms
                ),
            ));
        }
        if self.shards.is_empty() {
            return Err(invalid(
                "shards",
                "no [[shards]] given; add one [[shards]] table (name, url) per target".into(),
            ));
        }
        if self.shards.len() > u16::MAX as usize {
            return Err(invalid("shards", "too many shards".into()));
        }
        let mut names = HashSet::new();
        for (i, s) in self.shards.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(invalid(&format!("shards[{i}].name"), "is empty".into()));
            }
            if !names.insert(s.name.as_str()) {
                return Err(invalid(
                    &format!("shards[{i}].name"),
                    format!(
                        "shard name {:?} is used twice; shard names must be unique",
                        s.name
                    ),
                ));
            }
            if s.url.trim().is_empty() {
                return Err(invalid(&format!("shards[{i}].url"), "is empty".into()));
            }
            if let Some(j) = s.replicas.iter().position(|r| r.trim().is_empty()) {
                return Err(invalid(
                    &format!("shards[{i}].replicas[{j}]"),
                    "is empty".into(),
                ));
            }
        }
        for (i, s) in self.new_shards.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(invalid(&format!("new_shards[{i}].name"), "is empty".into()));
            }
            if !names.insert(s.name.as_str()) {
                return Err(invalid(
                    &format!("new_shards[{i}].name"),
                    format!(
                        "shard name {:?} is used twice ([[shards]] and [[new_shards]] names must be unique)",
                        s.name
                    ),
                ));
            }
            if s.url.trim().is_empty() {
                return Err(invalid(&format!("new_shards[{i}].url"), "is empty".into()));
            }
        }
        if self.snapshot.max_replica_lag_ms > 0 && self.shards.iter().all(|s| s.replicas.is_empty())
        {
            return Err(invalid(
                "snapshot.max_replica_lag_ms",
                "is set but no [[shards]] entry lists replicas; add replicas = [\"postgres://…\"] \
                 to the shards whose read replicas the full load must protect, or set it to 0"
                    .into(),
            ));
        }
        match self.routing.hash {
            HashKind::Postgres => {
                if self.routing.map.is_some() || self.routing.map_query.is_some() {
                    return Err(invalid(
                        "routing.map",
                        "map/map_query need hash = \"map\"".into(),
                    ));
                }
            }
            HashKind::Map => {
                if self.routing.map.is_some() == self.routing.map_query.is_some() {
                    return Err(invalid(
                        "routing.map",
                        "hash = \"map\" needs exactly one of map (a CSV file) or map_query".into(),
                    ));
                }
                if let Some(u) = &self.routing.map_update {
                    if self.routing.map_query.is_none() {
                        return Err(invalid(
                            "routing.map_update",
                            "flips an account directory read with map_query; with a map file (map) reshard move rewrites the file itself: remove map_update".into(),
                        ));
                    }
                    if !(u.contains("$1") && u.contains("$2")) {
                        return Err(invalid(
                            "routing.map_update",
                            "must use $1 (the accounts, text[]) and $2 (the target shard's name), e.g. UPDATE account_shards SET shard = $2 WHERE account_id = ANY($1::bigint[])".into(),
                        ));
                    }
                }
                if let Some(d) = &self.routing.default_shard {
                    if !names.contains(d.as_str()) {
                        return Err(invalid(
                            "routing.default_shard",
                            format!(
                                "{d:?} is not a shard name; shards are {:?}",
                                self.shard_names()
                            ),
                        ));
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            for (key, name) in [("name", Some(&t.name)), ("target", t.target.as_ref())] {
                if let Some(Err(e)) = name.map(|n| TableName::parse(n)) {
                    return Err(invalid(&format!("tables[{i}].{key}"), e.to_string()));
                }
            }
            let q = table_name(&t.name);
            if !seen.insert(q.clone()) {
                return Err(invalid(
                    &format!("tables[{i}].name"),
                    format!("table {q} is listed twice"),
                ));
            }
        }
        let a = &self.apply;
        if a.batch_max_rows == 0 || a.batch_max_bytes == 0 {
            return Err(invalid("apply.batch_max_rows", "must be at least 1".into()));
        }
        // The ranges of [spill] and [snapshot] are the stages' own (one definition each).
        if let Err(e) = crate::spill::SpillOptions::from(&self.spill).validate() {
            let (key, message) = match e {
                crate::spill::SpillError::Config { key, msg } => {
                    (key.replace("[spill] ", "spill."), msg)
                }
                e => ("spill".to_owned(), e.to_string()),
            };
            return Err(invalid(&key, message));
        }
        if let Err(e) = crate::snapshot::FullLoadOptions::from_config(&self.snapshot) {
            let (key, message) = match e {
                crate::snapshot::SnapshotError::Config { key, message } => {
                    (format!("snapshot.{key}"), message)
                }
                e => ("snapshot".to_owned(), e.to_string()),
            };
            return Err(invalid(&key, message));
        }
        if let Some(g) = &self.group {
            if g.name.trim().is_empty() {
                return Err(invalid(
                    "group.name",
                    "is empty; name the group (reshard plan writes g0, g1, ...)".into(),
                ));
            }
        }
        if self.admin.tls_cert.is_some() != self.admin.tls_key.is_some() {
            return Err(invalid(
                "admin.tls_cert",
                "admin.tls_cert and admin.tls_key go together: set both (PEM certificate chain \
                 and its private key) or neither"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Shard names in remainder order.
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }

    /// The URL of the shard called `name`, among `[[shards]]` and `[[new_shards]]`.
    pub fn any_shard_url(&self, name: &str) -> Option<&str> {
        self.shards
            .iter()
            .chain(&self.new_shards)
            .find(|s| s.name == name)
            .map(|s| s.url.as_str())
    }

    /// Index of the shard called `name`.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.name == name)
    }

    /// The explicit table rules with defaults applied.
    pub fn table_rules(&self) -> Vec<TableRule> {
        self.tables
            .iter()
            .map(|t| {
                let source = table_name(&t.name);
                TableRule {
                    target: t
                        .target
                        .as_deref()
                        .map(table_name)
                        .unwrap_or_else(|| source.clone()),
                    source,
                    mode: t.mode.unwrap_or_default(),
                    key: t.key.clone().unwrap_or_else(|| self.routing.key.clone()),
                    key_immutable: t.key_immutable.unwrap_or(self.routing.key_immutable),
                }
            })
            .collect()
    }
}

/// The table a validated `[[tables]]` name spells ([`TableName::parse`]; [`Config::parse`]
/// refuses a name it cannot read, naming the key and line, so the fallback, the whole text in
/// `public`, is only for a config built without it and matches no real table by accident).
fn table_name(text: &str) -> TableName {
    TableName::parse(text).unwrap_or_else(|_| TableName::new("public", text))
}

/// Whether an `[admin] listen` address (`host:port`) is a loopback address, reachable only
/// from this machine: an IP in 127.0.0.0/8 or `::1`, or the name `localhost`.
pub fn listen_is_loopback(listen: &str) -> bool {
    if let Ok(addr) = listen.trim().parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    match listen.trim().rsplit_once(':') {
        Some((host, _)) => host.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The line of `text` that a validation key (`tables[2].name`, `source.slot`) is on, if the
/// file has it.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    for part in key.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(b) => (&part[..b], &part[b..]),
            None => (part, ""),
        };
        item = item.get(name)?;
        for ix in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            item = item.get(ix.parse::<usize>().ok()?)?;
        }
    }
    let start = item.span()?.start;
    Some(text[..start].matches('\n').count() + 1)
}

/// Replaces `${NAME}` with the variable's value; a missing variable is an error naming it.
fn expand_env(s: &str, origin: &str, key: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                key: key.to_owned(),
                line: None,
                message: "unterminated ${ in value".into(),
            });
        };
        let var = &after[..end];
        match std::env::var(var) {
            Ok(v) => out.push_str(&v),
            Err(_) => {
                return Err(ConfigError::Invalid {
                    path: origin.to_owned(),
                    key: key.to_owned(),
                    line: None,
                    message: format!(
                        "environment variable {var} is not set (referenced as ${{{var}}})"
                    ),
                })
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl fmt::Display for TableMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableMode::Sharded => "sharded",
            TableMode::Broadcast => "broadcast",
            TableMode::Skip => "skip",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[source]
url = "postgres://u@127.0.0.1:5432/ingest"

[[shards]]
name = "shard0"
url = "postgres://u@127.0.0.1:5433/platform"

[[shards]]
name = "shard1"
url = "host=127.0.0.1 port=5434 dbname=platform"

[[tables]]
name = "events"
mode = "sharded"

[[tables]]
name = "public.plans"
mode = "broadcast"
"#;

    #[test]
    fn defaults_apply() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.source.slot, "reshard");
        assert_eq!(c.source.publication, "reshard");
        assert_eq!(c.routing.key, "account_id");
        assert_eq!(c.routing.hash, HashKind::Postgres);
        assert_eq!(c.spill.dir, PathBuf::from("./reshard-data"));
        assert_eq!(c.admin.listen, "127.0.0.1:6433");
        let rules = c.table_rules();
        assert_eq!(rules[0].source, TableName::new("public", "events"));
        assert_eq!(rules[0].target, TableName::new("public", "events"));
        assert_eq!(rules[0].key, "account_id");
        assert_eq!(rules[1].mode, TableMode::Broadcast);
        assert!(!rules[0].key_immutable);
    }

    #[test]
    fn coalesce_ms_defaults_to_2_and_is_bounded_with_its_key_and_line_named() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.source.coalesce_ms, 2);
        let text = GOOD.replace(
            "url = \"postgres://u@127.0.0.1:5432/ingest\"",
            "url = \"postgres://u@127.0.0.1:5432/ingest\"\ncoalesce_ms = 5000",
        );
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("coalesce_ms") && e.contains("0..=1000"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let off = text.replace("coalesce_ms = 5000", "coalesce_ms = 0");
        assert_eq!(Config::parse(&off, "t.toml").unwrap().source.coalesce_ms, 0);
    }

    #[test]
    fn key_immutable_is_global_with_a_per_table_override() {
        let text = GOOD.replace(
            "mode = \"broadcast\"",
            "mode = \"broadcast\"\nkey_immutable = false",
        );
        let c = Config::parse(
            &format!("{text}\n[routing]\nkey_immutable = true\n"),
            "t.toml",
        )
        .unwrap();
        let rules = c.table_rules();
        assert!(rules[0].key_immutable, "inherits [routing] key_immutable");
        assert!(!rules[1].key_immutable, "the table's own setting wins");
    }

    // See: issue #11 item 1 (the default ./reshard-data followed the working directory).
    #[test]
    fn a_relative_spill_dir_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let path = etc.join("reshard.toml");
        std::fs::write(&path, GOOD).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.spill.dir, etc.join("./reshard-data"));
        std::fs::write(
            &path,
            format!("{GOOD}\n[spill]\ndir = \"/var/lib/reshard/x\"\n"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.spill.dir, PathBuf::from("/var/lib/reshard/x"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace(
            "[[tables]]\nname = \"events\"",
            "[[tables]]\nname = \"events\"\nbogus = 1",
        );
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(e.contains("line 15"), "{e}");
    }

    #[test]
    fn table_names_in_sql_quotes_are_read_and_ambiguous_ones_refused_naming_key_and_line() {
        let with = |name: &str| {
            GOOD.replace(
                "[[tables]]\nname = \"events\"",
                &format!("[[tables]]\nname = {name}"),
            )
        };
        let c = Config::parse(&with(r#"'"sales.eu".orders'"#), "t.toml").unwrap();
        assert_eq!(
            c.table_rules()[0].source,
            TableName::new("sales.eu", "orders")
        );
        let c = Config::parse(&with(r#"'"Weird"."Ta ble"'"#), "t.toml").unwrap();
        assert_eq!(c.table_rules()[0].source, TableName::new("Weird", "Ta ble"));
        // The spelling without quotes keeps its meaning: case kept, `public` by default.
        let c = Config::parse(&with(r#"" Sales.Q1 ""#), "t.toml").unwrap();
        assert_eq!(c.table_rules()[0].source, TableName::new("Sales", "Q1"));
        let e = Config::parse(&with(r#""sales.eu.orders""#), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tables[0].name (line 14)"), "{e}");
        assert!(
            e.contains(r#"'"sales.eu".orders'"#) && e.contains(r#"'sales."eu.orders"'"#),
            "{e}"
        );
        let text = GOOD.replace(
            "[[tables]]\nname = \"events\"",
            "[[tables]]\nname = \"events\"\ntarget = '\"a.b\".T'",
        );
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("tables[0].target (line 15)"), "{e}");
        assert!(e.contains(r#"'"a.b"."T"'"#), "{e}");
        // The same table spelled twice is listed twice.
        let text = with(r#"'"sales.eu".orders'"#).replacen(
            "[[tables]]",
            "[[tables]]\nname = '\"sales.eu\".\"orders\"'\n\n[[tables]]",
            1,
        );
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn duplicate_shard_names_rejected() {
        let text = GOOD.replace("shard1", "shard0");
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("shards[1].name (line 10)"), "{e}");
    }

    #[test]
    fn map_needs_a_source() {
        let text = format!("{GOOD}\n[routing]\nhash = \"map\"\n");
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("routing.map"), "{e}");
    }

    #[test]
    fn map_update_needs_map_query_and_both_parameters() {
        let file = format!("{GOOD}\n[routing]\nhash = \"map\"\nmap = \"a.csv\"\nmap_update = \"UPDATE d SET s = $2 WHERE a = ANY($1)\"\n");
        let e = Config::parse(&file, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("routing.map_update") && e.contains("map_query"),
            "{e}"
        );
        let q = "[routing]\nhash = \"map\"\nmap_query = \"SELECT a, s FROM d\"\n";
        let e = Config::parse(
            &format!("{GOOD}\n{q}map_update = \"UPDATE d SET s = 'x'\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("routing.map_update") && e.contains("$1"), "{e}");
        let ok = format!(
            "{GOOD}\n{q}map_update = \"UPDATE d SET s = $2 WHERE a = ANY($1::bigint[])\"\n"
        );
        assert!(Config::parse(&ok, "t.toml")
            .unwrap()
            .routing
            .map_update
            .is_some());
    }

    #[test]
    fn loopback_listen_addresses() {
        for a in [
            "127.0.0.1:6433",
            "127.0.0.2:1",
            "[::1]:6433",
            "localhost:6433",
        ] {
            assert!(listen_is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:6433",
            "[::]:6433",
            "10.1.2.3:6433",
            "db.example:6433",
            "6433",
        ] {
            assert!(!listen_is_loopback(a), "{a}");
        }
    }

    #[test]
    fn env_expansion() {
        std::env::set_var("RESHARD_TEST_PW_X", "s3cret");
        assert_eq!(
            expand_env("a${RESHARD_TEST_PW_X}b", "o", "k").unwrap(),
            "as3cretb"
        );
        let e = expand_env("${RESHARD_TEST_MISSING_Y}", "o", "source.url")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RESHARD_TEST_MISSING_Y") && e.contains("source.url"),
            "{e}"
        );
    }
}
