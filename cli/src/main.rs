//! The `reshard` command: move a live PostgreSQL database into N hash-sharded PostgreSQL
//! targets with zero downtime.
//!
//! Exit codes (documented in the README):
//! - 0: success (for `check`/`verify`/`cutover`: everything passed);
//! - 1: the command ran and found a problem (a FAIL check, a verify mismatch, a cutover that is
//!   not safe or timed out);
//! - 2: bad invocation or configuration (unknown flag, unknown config key, missing file);
//! - 3: could not complete (source or shard unreachable, every shard stopped, internal error).

mod cmd;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Move a live PostgreSQL database into N hash-sharded PostgreSQL targets.
#[derive(Parser, Debug)]
#[command(name = "reshard", version, about, long_about = None)]
pub struct Cli {
    /// Log format of the daemon and long-running commands.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "RESHARD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `reshard_engine=debug`.
    #[arg(long, global = true, default_value = "info", env = "RESHARD_LOG")]
    pub log_level: String,
    /// Worker threads of the async runtime that runs the shards' apply, the console and the
    /// other tasks (default: one fewer than the CPUs, at least 1: `reshard run` reads, routes
    /// and spills on a thread of its own, and a worker per remaining CPU avoids the wake-ups
    /// of more threads than cores).
    #[arg(long, global = true, env = "RESHARD_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the migration daemon: create slot and publication, full load, then stream changes
    /// into every shard until stopped.
    Run(RunArgs),
    /// Preflight checks of source and shards; prints the SQL that fixes each failure.
    Check(CheckArgs),
    /// Split the migration into K groups that share nothing (own slot, publication, spill
    /// directory, tables), balanced by table size: write one config per group and the Helm
    /// values of deploy/helm/reshard, print the plan. With --shards M instead: print, read-only,
    /// what growing the hash layout from N to M shards moves (rows, bytes, time per new shard).
    Plan(PlanArgs),
    /// One screen: phase, tables, shards, slot, spill log.
    Status(StatusArgs),
    /// Per-shard lag (bytes, seconds, p50/p99 commit-to-apply latency).
    Lag(LagArgs),
    /// Prove each shard holds exactly the source rows that route to it.
    Verify(VerifyArgs),
    /// Wait until a shard has applied everything up to the source's current LSN, sync
    /// sequences, verify, report.
    Cutover(CutoverArgs),
    /// Inspect and manage the replication slot.
    Slot(SlotArgs),
    /// Stream a slot and print decoded changes as JSON lines.
    Peek(PeekArgs),
    /// Refuse the application's writes to one shard's accounts: on the source (rows that route
    /// to the shard) or on the shard itself (every write to its sharded tables).
    Fence(FenceArgs),
    /// Lift a fence installed by `fence` or `cutover --fence`; with `--on shard`, list the
    /// account moves' fences on the shard, and lift one (`--fence NAME`) or all (`--all`).
    Unfence(FenceArgs),
    /// After a fenced cutover: fence the shard on itself, wait until the source holds every
    /// write it took (the reverse stream), move its sequences onto the source, unfence the
    /// source. The application then sends the shard's accounts to the source again.
    Rollback(RollbackArgs),
    /// Move accounts between two live shards (hash = "map"): copy from a snapshot of the old
    /// shard, stream their changes, fence them there, wait, verify, flip the map, delete them
    /// from the old shard. Resumable: run it again after a crash.
    Move(MoveArgs),
    /// Grow a hash = "postgres" layout from N to M shards under live writers: one move per new
    /// shard (the rows of hash remainder j of MODULUS M, from old shard j mod N to the
    /// config's `[[new_shards]]`), each copied, streamed, fenced, verified, flipped in
    /// reshard.layout and deleted. With hash = "map": the moves of `reshard plan --shards M`'s
    /// balanced map, each a `reshard move` (the plan is kept until they are done). Resumable:
    /// run it again after a crash.
    Rebalance(RebalanceArgs),
    /// Changes that could not be routed (NULL shard key, unknown account): list them, replay
    /// them with the current account map, or drop them.
    Quarantine(QuarantineArgs),
    /// Start throwaway local clusters (a source and three shards), migrate a live multi-tenant
    /// workload, verify, cut over one shard, report.
    Demo(DemoArgs),
}

/// `-c reshard.toml`.
#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "reshard.toml",
        env = "RESHARD_CONFIG"
    )]
    pub config: PathBuf,
}

/// Source selection for `slot` and `peek`: a config file or explicit flags.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Configuration file (its `[source]` section is used).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Source connection string (libpq URL or key=value), instead of a config file.
    #[arg(long)]
    pub source: Option<String>,
    /// Slot name (default: the config's, else `reshard`).
    #[arg(long)]
    pub slot: Option<String>,
    /// Publication name (default: the config's, else `reshard`).
    #[arg(long)]
    pub publication: Option<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Targets were loaded another way: start CDC from the slot's creation, copy nothing.
    #[arg(long)]
    pub skip_full_load: bool,
    /// Once the source answers, how long to keep retrying a start that fails because a shard
    /// or the source is unreachable or restarting (each attempt is logged); then exit 3.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub start_retry_secs: u64,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// First fix what can be fixed safely on the source: for every sharded table whose replica
    /// identity lacks the shard key (and no key_immutable), build a unique index (identity
    /// columns, key) CONCURRENTLY and make it the replica identity. Idempotent.
    #[arg(long)]
    pub fix: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Number of groups: 2 or more, at most the number of replicated tables.
    #[arg(long, value_parser = clap::value_parser!(u16).range(2..), required_unless_present = "shards", conflicts_with = "shards")]
    pub groups: Option<u16>,
    /// New shard count M. hash = "postgres" (M a multiple of the current N): print, writing
    /// nothing, which old shard each new shard's rows come from, the rows and bytes to move and
    /// the time at --rate. hash = "map": a balanced account map for M of the config's shards
    /// (those holding accounts, then the empty ones), moving as few bytes as it can: the map
    /// diff, bytes per shard before and after, the time at --rate; --out FILE writes the new map.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub shards: Option<u16>,
    /// The copy rate (rows per second) the --shards time estimate assumes.
    #[arg(long, default_value_t = reshard_engine::ops::grow::DEFAULT_RATE_ROWS_PER_SEC)]
    pub rate: u64,
    /// With --shards M and hash = "map": the balance aimed at, every shard within ±this percent
    /// of the mean bytes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100), default_value_t = reshard_engine::ops::balance::DEFAULT_TOLERANCE_PCT)]
    pub tolerance: u32,
    /// --groups: directory for the group configs (`<config stem>-g<k>.toml`) and the Helm
    /// values, created if missing (default: the current directory). --shards with hash =
    /// "map": the file the new account map is written to (never the live map).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite files that exist in --out.
    #[arg(long)]
    pub force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LagArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Refresh until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval with --watch, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Only these tables (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub table: Vec<String>,
    /// Only these shards (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub shard: Vec<String>,
    /// Only these accounts (comma-separated key values).
    #[arg(long, value_delimiter = ',')]
    pub accounts: Vec<String>,
    /// Check N random accounts fully (row by row) in addition to the aggregates.
    #[arg(long)]
    pub sample: Option<u64>,
    /// Longest wait for shards to reach the source's LSN, seconds or a duration (`10m`).
    #[arg(long, default_value = "300")]
    pub timeout: String,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The accounts to move, comma-separated (their shard-key values).
    #[arg(long, value_delimiter = ',', required_unless_present = "accounts_file")]
    pub accounts: Vec<String>,
    /// A file with the accounts to move, one per line (`#` comments and blank lines skipped).
    #[arg(long, conflicts_with = "accounts")]
    pub accounts_file: Option<PathBuf>,
    /// The shard that holds the accounts.
    #[arg(long)]
    pub from: String,
    /// The shard that gets them.
    #[arg(long)]
    pub to: String,
    /// Longest wait for the target to apply the old shard's changes, seconds or a duration.
    #[arg(long, default_value = "600")]
    pub timeout: String,
    /// How long after the map flip the accounts' rows are deleted from the old shard: longer
    /// than the application keeps an old map (seconds or a duration).
    #[arg(long, default_value = "10s")]
    pub delete_grace: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The new shard count M. hash = "postgres": a multiple of the current N, the config
    /// lists M − N `[[new_shards]]`. hash = "map": M of the config's `[[shards]]` (those
    /// holding accounts, then the empty ones), balanced as `reshard plan --shards M` plans.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub shards: u16,
    /// hash = "map": the balance aimed at, every shard within ±this percent of the mean bytes
    /// (as `reshard plan --tolerance`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100), default_value_t = reshard_engine::ops::balance::DEFAULT_TOLERANCE_PCT)]
    pub tolerance: u32,
    /// Moves at once (each has its own target, so never two onto one shard).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: u16,
    /// Ceiling of each move's copy, rows per second into its target (default: unthrottled).
    #[arg(long)]
    pub max_rows_per_sec: Option<u64>,
    /// Longest wait of each move for its target to apply the old shard's changes, seconds or
    /// a duration.
    #[arg(long, default_value = "600")]
    pub timeout: String,
    /// How long after a flip the moved rows are deleted from the old shard: longer than the
    /// application keeps an old reshard.layout (seconds or a duration).
    #[arg(long, default_value = "10s")]
    pub delete_grace: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The shard to roll back.
    #[arg(long)]
    pub shard: String,
    /// Longest wait for the reverse stream to drain, seconds or a duration such as `10m`.
    #[arg(long, default_value = "600")]
    pub timeout: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The shard to cut over.
    #[arg(long)]
    pub shard: String,
    /// Longest wait, seconds or a duration such as `10m`.
    #[arg(long, default_value = "600")]
    pub timeout: String,
    /// Skip the verification of the shard.
    #[arg(long)]
    pub no_verify: bool,
    /// First fence the shard's accounts on the source (their writes are refused there from
    /// then on; the fence stays until `reshard unfence`).
    #[arg(long)]
    pub fence: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FenceArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The shard whose writes are refused.
    #[arg(long)]
    pub shard: String,
    /// Where: `source` (rows that route to the shard) or `shard` (every write to the shard's
    /// sharded tables, on the shard).
    #[arg(long, value_enum, default_value_t = FenceOn::Source)]
    pub on: FenceOn,
    /// unfence only: lift the fence called NAME on that database instead of the shard's own
    /// (an account move's fence on the shard its accounts left is named after the move,
    /// `move_<from>_<to>_<crc>`: `reshard unfence --shard S --on shard` lists them).
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    pub fence: Option<String>,
    /// unfence only, with --on shard: lift every fence on the shard's database, its own and
    /// every account move's.
    #[arg(long)]
    pub all: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Where a fence goes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FenceOn {
    /// The source.
    Source,
    /// The shard's own database.
    Shard,
}

#[derive(Args, Debug)]
pub struct SlotArgs {
    #[command(subcommand)]
    pub action: SlotAction,
}

#[derive(Subcommand, Debug)]
pub enum SlotAction {
    /// List the source's replication slots with their lag and retained WAL.
    List {
        #[command(flatten)]
        source: SourceArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create the logical slot (pgoutput) and, if missing, the publication.
    Create {
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Drop the slot.
    Drop {
        #[command(flatten)]
        source: SourceArgs,
        /// Also drop the publication and the `reshard` schema on every shard (needs -c).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Args, Debug)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    pub action: QuarantineAction,
}

#[derive(Subcommand, Debug)]
pub enum QuarantineAction {
    /// Per table: quarantined changes, first and last LSN, reason, a sample row.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Route the quarantined changes with the account map as it is now and apply those that
    /// route to their shards, in source order (stop `reshard run` first). Exit 1 if some stay.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete quarantined changes for good (stop `reshard run` first; needs --yes).
    Drop {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this table (default: every table).
        #[arg(long)]
        table: Option<String>,
        /// Confirm: the changes are deleted and their rows reach no shard.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
pub struct PeekArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Stop after N changes.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Do not confirm anything to the slot (peeking consumes nothing).
    #[arg(long)]
    pub no_ack: bool,
    /// Create the slot (and publication for all tables) if missing.
    #[arg(long)]
    pub create: bool,
    /// Stop after this many seconds without a new message.
    #[arg(long)]
    pub idle_timeout: Option<f64>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the clusters and the daemon running and print their connection strings.
    #[arg(long)]
    pub keep: bool,
    /// Accounts in the generated workload (200 make about 47k rows; the run takes ~25 s).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub accounts: u32,
    /// Seconds of live writes while streaming.
    #[arg(long, default_value_t = 10)]
    pub live_secs: u64,
    /// Target live transactions per second (0 = as fast as one connection can commit).
    #[arg(long, default_value_t = 200)]
    pub live_tps: u32,
}

/// `--worker-threads`, or one fewer than the CPUs (at least 1). On 2 cores one worker beside
/// the ingest thread ran a 1-row catch-up at 1.10x native with 10.9 CPU-s per 1M changes,
/// against 0.96x and 14.3 with two workers (futex calls 16k -> 3.9k per 300k changes).
fn worker_threads(asked: Option<u16>) -> usize {
    asked.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1))
            .unwrap_or(1)
            .max(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress on stdout; the in-process daemon's routine info lines
    // would drown it, so unless a level was asked for it logs warnings and errors only.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Demo(_), "info") if std::env::var_os("RESHARD_LOG").is_none() => "warn",
        (_, l) => l,
    };
    output::init_logging(cli.log_format, level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(cli.worker_threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = rt.block_on(cmd::dispatch(cli.command));
    // Don't wait for detached tasks (e.g. connections) to finish.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
