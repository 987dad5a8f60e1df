//! `reshard-bench`: the end-to-end benchmark. One command starts a source and N shards (or
//! uses given servers), runs the scenarios, prints a markdown table and writes
//! `benches/results/<timestamp>.json` and `benches/results/latest.md`.
//!
//! Exit status: 0 when every selected scenario ran (goals met or not: that is in the report),
//! 1 when a scenario could not run, 2 on bad arguments.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use reshard_benches::report::{Machine, Report};
use reshard_benches::scenarios::{self, Settings};
use reshard_benches::servers::Topology;

/// End-to-end benchmark of reshard against native logical replication, raw COPY and the
/// one-slot read ceiling.
#[derive(Parser, Debug)]
#[command(name = "reshard-bench", version)]
struct Args {
    /// Reduced sizes (about 50 000 changes and rows, 10 s of steady state): under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Number of shards.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Scenarios to run, comma-separated: catchup (the mixed workload), catchup-1row,
    /// catchup-5row, fullload, steady, light, cost (cost is measured during the catch-ups;
    /// alone it means catchup).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "catchup,catchup-1row,catchup-5row,fullload,steady,light,cost"
    )]
    scenario: Vec<String>,
    /// Use this source server (libpq URL; the benchmark creates and drops rb_* databases on
    /// it) instead of starting local clusters. Needs --shard.
    #[arg(long)]
    source: Option<String>,
    /// A shard server (repeat, in hash-remainder order). With --source.
    #[arg(long)]
    shard: Vec<String>,
    /// The reshard binary (default: `reshard` next to this executable).
    #[arg(long)]
    reshard_bin: Option<PathBuf>,
    /// A TOML fragment merged key by key over every reshard config the benchmark generates
    /// (e.g. `[apply]` with `catchup_batch_ms = 0`, `[source]` with `coalesce_ms = 0`), to
    /// compare settings of one binary.
    #[arg(long, value_name = "FILE")]
    reshard_config: Option<PathBuf>,
    /// Run only the comparisons (native, raw COPY, ceiling), not reshard.
    #[arg(long)]
    without_reshard: bool,
    /// Row changes in each catch-up backlog (default 1 000 000; quick 50 000).
    #[arg(long)]
    changes: Option<u64>,
    /// Share of large (100-299 row) transactions in the mixed write mix (catchup, steady),
    /// percent (the rest are single-row). At 2, about 80 % of the changes arrive in large
    /// transactions.
    #[arg(long, default_value_t = 2)]
    large_percent: u32,
    /// Rows per transaction of the catchup-5row backlog.
    #[arg(long, default_value_t = 5)]
    small_txn_rows: u32,
    /// Scale of the full-load data as a fraction of the default (about 1 000 000 rows; quick
    /// about 50 000).
    #[arg(long)]
    fullload_scale: Option<f64>,
    /// Steady-state duration in seconds (default 30; quick 10).
    #[arg(long)]
    steady_secs: Option<u64>,
    /// Steady write rate in changes/s (default: half of reshard's measured catch-up rate, or
    /// native's without reshard; quick: 2000).
    #[arg(long)]
    steady_rate: Option<u64>,
    /// Light load: single-row transactions per second, the source at synchronous_commit = on.
    #[arg(long, default_value_t = 150)]
    light_rate: u64,
    /// Light-load duration in seconds (default 30; quick 10).
    #[arg(long)]
    light_secs: Option<u64>,
    /// Where to write `<timestamp>.json` and `latest.md`.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
    /// Give up on one contestant after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

const SCENARIOS: &[&str] = &[
    "catchup",
    "catchup-1row",
    "catchup-5row",
    "fullload",
    "steady",
    "light",
    "cost",
];

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reshard-bench: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("reshard-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    for s in &args.scenario {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!(
                "unknown scenario {s:?}; choose from {}",
                SCENARIOS.join(", ")
            );
        }
    }
    if args.shards == 0 || args.shards > 64 {
        bail!("--shards must be 1..=64");
    }
    let has = |s: &str| args.scenario.iter().any(|x| x == s);
    let quick = args.quick;
    let work = tempfile::Builder::new()
        .prefix("reshard-bench-")
        .tempdir()
        .context("creating a working directory")?;
    let scale = args.fullload_scale.unwrap_or(1.0).max(0.001);
    let set = Settings {
        quick,
        shards: args.shards,
        with_reshard: !args.without_reshard,
        reshard_bin: args
            .reshard_bin
            .clone()
            .unwrap_or_else(reshard_benches::daemon::default_bin),
        reshard_config: match &args.reshard_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --reshard-config {}", p.display()))?;
                text.parse::<toml::Table>().with_context(|| {
                    format!("--reshard-config {} is not valid TOML", p.display())
                })?;
                text
            }
            None => String::new(),
        },
        backlog_changes: args
            .changes
            .unwrap_or(if quick { 50_000 } else { 1_000_000 }),
        large_percent: args.large_percent.min(100),
        small_txn_rows: args.small_txn_rows.max(1),
        accounts: if quick { 200 } else { 1000 },
        base_customers: if quick { 100 } else { 1000 },
        base_events: if quick { 1000 } else { 15_000 },
        fullload_customers: ((if quick { 500.0 } else { 9000.0 }) * scale) as u32,
        fullload_events: ((if quick { 7000.0 } else { 107_000.0 }) * scale) as u32,
        toast_every: 50,
        steady_secs: args.steady_secs.unwrap_or(if quick { 10 } else { 30 }),
        steady_rate: args.steady_rate,
        steady_fallback_rate: 2000,
        probe_interval_ms: 5,
        light_rate: args.light_rate.max(1),
        light_secs: args.light_secs.unwrap_or(if quick { 10 } else { 30 }),
        timeout_secs: args.timeout_secs,
        work_dir: work.path().to_owned(),
    };

    let t0 = Instant::now();
    eprintln!("reshard-bench: starting servers");
    let topo = match &args.source {
        Some(src) => Topology::external(src, &args.shard)?,
        None => {
            if !args.shard.is_empty() {
                bail!("--shard needs --source");
            }
            Topology::start_local(args.shards)?
        }
    };
    let mut rep = Report {
        machine: Machine::probe(),
        settings: serde_json::to_value(&set).context("settings")?,
        ..Default::default()
    };
    rep.machine.local_clusters = topo.all_local();
    {
        let c = topo.source.connect("postgres").await?;
        let row = c
            .query_one(
                "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD\"T\"HH24MISS\"Z\"'), \
                 current_setting('server_version')",
                &[],
            )
            .await
            .context("asking the source for its clock and version")?;
        rep.started_at = row.get(0);
        rep.machine.postgres_version = Some(row.get(1));
        for k in [
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
        ] {
            let v: String = c
                .query_one(&format!("SELECT current_setting('{k}')"), &[])
                .await?
                .get(0);
            rep.machine.source_settings.push((k.into(), v));
        }
    }
    if rep.machine.local_clusters {
        rep.notes.push(
            "Local clusters run with fsync=off, synchronous_commit=off, full_page_writes=off \
             (reshard-harness defaults) on every side: fine for comparisons, not absolute \
             production figures."
                .into(),
        );
    }
    if rep.machine.cores <= 2 {
        rep.notes.push(format!(
            "This machine has {} cores shared by the source, {} shards, the consumers and the \
             harness: contestants that spread work over more processes (native fan-out) cannot \
             use more CPU than exists; figures are comparable only within one run.",
            rep.machine.cores, args.shards
        ));
    }
    if set.with_reshard && !set.reshard_bin.exists() {
        rep.notes.push(format!(
            "reshard binary {} not found: reshard's figures are missing (build it with cargo \
             build --release -p reshard-cli, or pass --reshard-bin)",
            set.reshard_bin.display()
        ));
    }

    let mut ok = true;
    if has("fullload") {
        if let Err(e) = scenarios::fullload(&topo, &set, &mut rep).await {
            ok = false;
            rep.notes.push(format!("fullload could not run: {e:#}"));
        }
    }
    for mix in scenarios::MIXES {
        let wanted = has(mix.scenario) || (mix == scenarios::MIXED && has("cost"));
        if !wanted {
            continue;
        }
        if let Err(e) = scenarios::catchup(&topo, &set, &mut rep, mix).await {
            ok = false;
            rep.notes
                .push(format!("{} could not run: {e:#}", mix.scenario));
        }
    }
    if has("steady") {
        let measured = rep
            .get("catchup", "reshard", "changes_per_sec")
            .or_else(|| rep.get("catchup", "native", "changes_per_sec"));
        let rate = match (args.steady_rate, measured, quick) {
            (Some(r), _, _) => r,
            (None, Some(m), false) => (m / 2.0) as u64,
            _ => set.steady_fallback_rate,
        };
        if let Err(e) = scenarios::steady(&topo, &set, &mut rep, rate.max(1)).await {
            ok = false;
            rep.notes.push(format!("steady could not run: {e:#}"));
        }
    }
    if has("light") {
        if let Err(e) = scenarios::light(&topo, &set, &mut rep).await {
            ok = false;
            rep.notes.push(format!("light could not run: {e:#}"));
        }
    }
    scenarios::compare(&mut rep, args.shards);
    rep.elapsed_secs = t0.elapsed().as_secs_f64();
    println!("{}", rep.markdown());
    let json = rep.write(&args.results_dir)?;
    eprintln!(
        "reshard-bench: wrote {} and {}",
        json.display(),
        args.results_dir.join("latest.md").display()
    );
    drop(topo);
    Ok(ok)
}
