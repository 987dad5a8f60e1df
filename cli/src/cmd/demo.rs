//! `reshard demo`: a newcomer's first run, end to end, on one machine.
//!
//! In: PostgreSQL's server binaries (found by `reshard-harness`, as the tests find them) and
//! nothing else. Out: a short report on stdout, exit 0 only when every shard verified and the
//! cutover of `shard0` was safe.
//!
//! Steps: throwaway clusters (one source, three shards; the source at `synchronous_commit = on`,
//! see [`SOURCE_SETTINGS`]) → the multi-tenant schema of
//! `fixtures/schema/multitenant.sql` on all four → skewed data on the source → a `reshard.toml`
//! in a temporary directory → the daemon in-process ([`runtime::start`], the same wiring as
//! `reshard run`) → full load with per-table progress → a live write mix while streaming with
//! per-shard lag each second → wait until every shard applied a marker written after the last
//! live transaction → `verify` of every shard → `cutover` of `shard0` → report → clean shutdown.
//! The clusters are stopped when they are dropped; `--keep` leaves everything running until
//! Ctrl-C and prints how to connect.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use reshard_engine::config::Config;
use reshard_engine::lsn::Lsn;
use reshard_engine::ops::cutover::{cutover, CutoverOptions, CutoverReport};
use reshard_engine::ops::verify::{verify, VerifyOptions, VerifyReport};
use reshard_engine::runtime::{self, RunOptions, RunSummary, Running};
use reshard_engine::status::{Phase, ShardState, StatusSnapshot};
use reshard_harness::workload::{self, FillSpec, LiveSpec, LiveStats};
use reshard_harness::PgCluster;
use tokio_postgres::NoTls;

use crate::output::{CmdResult, Failure};
use crate::DemoArgs;

/// Names of the demo's shards, in remainder order.
const SHARDS: [&str; 3] = ["shard0", "shard1", "shard2"];
/// The shard that is cut over.
const CUTOVER_SHARD: &str = "shard0";
/// Database created on every cluster.
const DB: &str = "app";
/// Longest wait for each phase (full load, catch-up, verify, cutover).
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Settings of the source cluster over the harness's defaults. A walsender sends a commit only
/// once its WAL is flushed; with the harness's `synchronous_commit = off` the WAL writer
/// flushes every `wal_writer_delay` (200 ms), and that delay, not reshard, would be most of
/// the latency the report shows. The shards keep `off` (reshard's apply is what is measured).
/// See <https://www.postgresql.org/docs/current/wal-async-commit.html>.
const SOURCE_SETTINGS: &[(&str, &str)] = &[("synchronous_commit", "on")];

/// Runs `reshard demo`.
pub async fn run(args: DemoArgs) -> CmdResult {
    let started = Instant::now();
    // Listening from here on: Ctrl-C while the clusters start is kept and acted on once they
    // are up (so they are cleaned up, not left running).
    let mut signals = runtime::Signals::new();
    let env = Env::start(&args).await.map_err(Failure::failed)?;
    println!(
        "config:  {}  (the daemon runs in this process)",
        env.config_path.display()
    );
    let running = runtime::start(env.config.clone(), RunOptions::default())
        .await
        .context("the reshard daemon could not start")
        .map_err(Failure::failed)?;
    let Running {
        admin,
        shutdown,
        mut done,
    } = running;

    let mut daemon_ended = false;
    let outcome = tokio::select! {
        r = drive(&env, &admin.status, &args, started) => r,
        sig = signals.recv() => Err(Failure::problem(anyhow!("interrupted by {sig}"))),
        // The daemon runs until told to stop: finishing now is an error.
        r = &mut done => {
            let why = match r {
                Ok(Ok(_)) => "it stopped unexpectedly".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("it crashed: {e}"),
            };
            daemon_ended = true;
            Err(Failure::failed(anyhow!("the reshard daemon stopped: {why}")))
        }
    };
    if daemon_ended {
        // Nothing to shut down (and `done` must not be polled again).
        return finish_cleanup(env, outcome).await;
    }
    if let Err(f) = &outcome {
        eprintln!("error: {:#}", f.error);
    }

    if args.keep {
        print_keep(&env);
        let sig = signals.recv().await;
        println!("{sig}: stopping the daemon and the clusters");
    }

    // Clean shutdown: the daemon finishes or rolls back its batches and confirms to the slot.
    shutdown.shutdown();
    let stopped = match tokio::time::timeout(Duration::from_secs(60), done).await {
        Ok(Ok(Ok(summary))) => Ok(summary),
        Ok(Ok(Err(e))) => Err(anyhow!("the daemon stopped with an error: {e:#}")),
        Ok(Err(e)) => Err(anyhow!("the daemon crashed: {e}")),
        Err(_) => Err(anyhow!("the daemon did not stop within 60 s")),
    };
    let result = match (outcome, stopped) {
        (Ok(()), Ok(summary)) => {
            print_shutdown(&summary);
            println!("total time: {:.1}s", started.elapsed().as_secs_f64());
            Ok(())
        }
        // Already printed above; the code and message stay.
        (Err(f), _) => Err(Failure {
            code: f.code,
            error: anyhow!(""),
        }),
        (Ok(()), Err(e)) => Err(Failure::failed(e)),
    };
    finish_cleanup(env, result).await
}

/// Stops the clusters (blocking: `pg_ctl stop`) off the async threads.
async fn finish_cleanup(env: Env, result: CmdResult) -> CmdResult {
    let _ = tokio::task::spawn_blocking(move || drop(env)).await;
    result
}

/// The throwaway world: clusters, the config and its directory.
struct Env {
    source: PgCluster,
    shards: Vec<PgCluster>,
    /// Holds `reshard.toml` and the spill directory; removed on drop.
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    admin_port: u16,
    metrics_port: u16,
    rows_filled: u64,
    /// The source's `synchronous_commit`, read back from the server.
    source_synchronous_commit: String,
}

impl Env {
    async fn start(args: &DemoArgs) -> anyhow::Result<Env> {
        let t = Instant::now();
        let bindir = reshard_harness::bindir().map_err(|e| {
            anyhow!(
                "{e}; reshard demo needs PostgreSQL's server binaries (initdb, pg_ctl, postgres)"
            )
        })?;
        println!(
            "starting throwaway PostgreSQL clusters from {}: a source and {} shards",
            bindir.display(),
            SHARDS.len()
        );
        let (source, shards) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
            let start = |settings: &[(&str, &str)]| -> anyhow::Result<PgCluster> {
                let b = settings
                    .iter()
                    .fold(PgCluster::builder(), |b, (k, v)| b.setting(k, v));
                let c = b.start().map_err(|e| anyhow!("starting a cluster: {e}"))?;
                c.create_database(DB)
                    .map_err(|e| anyhow!("creating database {DB}: {e}"))?;
                Ok(c)
            };
            let source = start(SOURCE_SETTINGS)?;
            let shards = SHARDS
                .iter()
                .map(|_| start(&[]))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((source, shards))
        })
        .await
        .map_err(|e| anyhow!("starting the clusters: {e}"))??;
        println!(
            "  source  port {}\n{}",
            source.port(),
            shards
                .iter()
                .zip(SHARDS)
                .map(|(c, n)| format!("  {n}  port {}", c.port()))
                .collect::<Vec<_>>()
                .join("\n")
        );

        // Schema everywhere, data on the source only.
        for (name, c) in std::iter::once(("source", &source)).chain(SHARDS.into_iter().zip(&shards))
        {
            let client = connect(&c.url(DB)).await.with_context(|| name.to_owned())?;
            workload::create_schema(&client)
                .await
                .with_context(|| format!("creating the multi-tenant schema on {name}"))?;
        }
        let spec = fill_spec(args.accounts);
        let client = connect(&source.url(DB)).await.context("source")?;
        let source_synchronous_commit: String = client
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .await
            .context("reading synchronous_commit on the source")?
            .get(0);
        println!(
            "source synchronous_commit: {source_synchronous_commit} (a commit reaches the \
             walsender when it is flushed, not up to 200 ms later: the latency shown is reshard's)"
        );
        let rows_filled = workload::fill(&client, spec)
            .await
            .context("filling the source")?;
        // Fresh statistics: the full load's progress shows estimates from them.
        client
            .batch_execute("ANALYZE")
            .await
            .context("ANALYZE on the source")?;
        println!(
            "schema fixtures/schema/multitenant.sql on all four; source filled with {rows_filled} rows \
             for {} accounts (skewed: account a has ~1/a of account 1's rows) in {:.1}s",
            args.accounts,
            t.elapsed().as_secs_f64()
        );

        let dir = tempfile::Builder::new()
            .prefix("reshard-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        let admin_port = free_port()?;
        let metrics_port = free_port()?;
        let mut toml = format!(
            "# Written by `reshard demo`.\n[source]\nurl = \"{}\"\n\n[spill]\ndir = \"{}\"\n\n\
             [apply]\nbatch_max_delay_ms = 20\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\n",
            source.url(DB),
            dir.path().join("spill").display()
        );
        for (n, c) in SHARDS.iter().zip(&shards) {
            toml.push_str(&format!(
                "[[shards]]\nname = \"{n}\"\nurl = \"{}\"\n\n",
                c.url(DB)
            ));
        }
        let config_path = dir.path().join("reshard.toml");
        std::fs::write(&config_path, toml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config = Config::load(&config_path)
            .with_context(|| format!("loading {}", config_path.display()))?;
        Ok(Env {
            source,
            shards,
            dir,
            config_path,
            config,
            admin_port,
            metrics_port,
            rows_filled,
            source_synchronous_commit,
        })
    }
}

/// About 50k rows for 200 accounts: customers, subscriptions and invoices ~6k each, events ~30k.
fn fill_spec(accounts: u32) -> FillSpec {
    FillSpec {
        accounts,
        customers: 1000,
        events: 5000,
        body_bytes: 200,
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "demo connection ended");
        }
    });
    Ok(client)
}

fn free_port() -> anyhow::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("finding a free loopback port")
}

/// The demo proper, with the daemon running. Prints as it goes; `Err` carries the exit code.
async fn drive(
    env: &Env,
    status: &tokio::sync::watch::Receiver<StatusSnapshot>,
    args: &DemoArgs,
    started: Instant,
) -> CmdResult {
    let tty = std::io::stdout().is_terminal();

    // 1. Full load.
    println!("\n== full load (rows copied per table) ==");
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = status.borrow().clone();
        let done = s.phase != Phase::Starting && s.phase != Phase::FullLoad;
        line(
            tty,
            &format!("{:>4.0}s  {}", t.elapsed().as_secs_f64(), tables_line(&s)),
            done,
        );
        if done {
            break;
        }
        if t.elapsed() > PHASE_TIMEOUT {
            return Err(Failure::failed(anyhow!(
                "the full load did not finish within {PHASE_TIMEOUT:?}"
            )));
        }
    }
    let loaded: u64 = status.borrow().tables.iter().map(|t| t.rows_copied).sum();
    println!(
        "full load done: {loaded} rows in {:.1}s; streaming changes",
        t.elapsed().as_secs_f64()
    );

    // 2. Live writes while streaming.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    println!(
        "\n== live writes for {}s (target {} txn/s, seed {seed}) while streaming: per-shard applied LSN, lag, rows/s ==",
        args.live_secs,
        if args.live_tps == 0 { "max".to_owned() } else { args.live_tps.to_string() }
    );
    let mut writer_client = connect(&env.source.url(DB))
        .await
        .context("source")
        .map_err(Failure::failed)?;
    let spec = LiveSpec {
        accounts: args.accounts,
        max_duration: Duration::from_secs(args.live_secs),
        txns_per_sec: args.live_tps,
        seed,
        ..LiveSpec::default()
    };
    let mut writer = tokio::spawn(async move { workload::live(&mut writer_client, spec).await });
    let t = Instant::now();
    let live: LiveStats = loop {
        tokio::select! {
            // This is cancellation-safe (a JoinHandle).
            r = &mut writer => {
                break r
                    .map_err(|e| Failure::failed(anyhow!("the live writer crashed: {e}")))?
                    .context("the live writer failed on the source")
                    .map_err(Failure::failed)?;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let s = status.borrow().clone();
                check_shards(&s)?;
                println!("{:>4.0}s  {}", t.elapsed().as_secs_f64(), shards_line(&s));
            }
        }
    };
    println!(
        "writer stopped: {} transactions, {} rows",
        live.txns, live.rows
    );

    // 3. Catch up: a marker after the last live commit; every shard's applied LSN passes it.
    let source = connect(&env.source.url(DB))
        .await
        .context("source")
        .map_err(Failure::failed)?;
    let marker: String = source
        .query_one(
            "SELECT pg_logical_emit_message(true, 'reshard.demo', 'caught up')::text",
            &[],
        )
        .await
        .context("writing the catch-up marker on the source")
        .map_err(Failure::failed)?
        .get(0);
    let target: Lsn = marker
        .parse()
        .map_err(|e| Failure::failed(anyhow!("the source returned LSN {marker:?}: {e}")))?;
    println!("\n== waiting for every shard to apply everything up to {target} ==");
    let t = Instant::now();
    loop {
        let s = status.borrow().clone();
        check_shards(&s)?;
        let done =
            s.shards.len() == SHARDS.len() && s.shards.iter().all(|x| x.applied_lsn >= target);
        if done {
            println!("{:>4.1}s  {}", t.elapsed().as_secs_f64(), shards_line(&s));
            break;
        }
        if t.elapsed() > PHASE_TIMEOUT {
            return Err(Failure::problem(anyhow!(
                "shards did not catch up to {target} within {PHASE_TIMEOUT:?}: {}",
                shards_line(&s)
            )));
        }
        println!("{:>4.1}s  {}", t.elapsed().as_secs_f64(), shards_line(&s));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let caught_up = status.borrow().clone();

    // 3b. Verify and cut over.
    let (report, cut) = verify_and_cut_over(env).await?;

    // 4. Report.
    println!("\n== report ==");
    println!("rows filled on the source:   {}", env.rows_filled);
    println!("rows loaded (full load):     {loaded}");
    println!(
        "live transactions written:   {} ({} rows) in {}s",
        live.txns, live.rows, args.live_secs
    );
    let mut rows = vec![[
        "SHARD",
        "APPLIED LSN",
        "TXNS",
        "ROWS APPLIED",
        "P50 MS",
        "P99 MS",
    ]
    .map(String::from)];
    for s in &caught_up.shards {
        rows.push([
            s.name.clone(),
            s.applied_lsn.to_string(),
            s.txns_applied_total.to_string(),
            (s.rows_inserted_total + s.rows_updated_total + s.rows_deleted_total).to_string(),
            format!("{:.1}", s.latency_p50_ms),
            format!("{:.1}", s.latency_p99_ms),
        ]);
    }
    print!("{}", super::check::table(&rows));
    println!(
        "latency:                     source commit to shard apply, source synchronous_commit={}",
        env.source_synchronous_commit
    );
    println!(
        "verify:                      {}",
        if report.ok { "PASSED" } else { "FAILED" }
    );
    println!(
        "cutover {CUTOVER_SHARD}:              {} at LSN {} ({} sequences synced, waited {:.1}s)",
        if cut.ok { "DONE" } else { "NOT SAFE" },
        cut.reached_lsn,
        cut.sequences.len(),
        cut.waited_secs
    );
    println!(
        "elapsed:                     {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if !report.ok {
        return Err(Failure::problem(anyhow!(
            "verify FAILED: some shard does not hold exactly the source rows that route to it (see above)"
        )));
    }
    if !cut.ok {
        return Err(Failure::problem(anyhow!(
            "cutover of {CUTOVER_SHARD} is NOT safe (see above)"
        )));
    }
    Ok(())
}

/// `verify` of every shard, then `cutover` of [`CUTOVER_SHARD`], printing both.
async fn verify_and_cut_over(env: &Env) -> Result<(VerifyReport, CutoverReport), Failure> {
    println!("\n== verify (every table on every shard, per-account checksums) ==");
    let report = verify(
        &env.config,
        &VerifyOptions {
            timeout: PHASE_TIMEOUT,
            ..VerifyOptions::default()
        },
    )
    .await
    .context("verify could not complete")
    .map_err(Failure::failed)?;
    print_verify(&report);

    // Cut over one shard.
    println!("\n== cutover {CUTOVER_SHARD} ==");
    let cut = cutover(
        &env.config,
        &CutoverOptions {
            shard: CUTOVER_SHARD.to_owned(),
            timeout: PHASE_TIMEOUT,
            verify: true,
            router: None,
            fence: false,
        },
    )
    .await
    .with_context(|| format!("cutover of {CUTOVER_SHARD} could not complete"))
    .map_err(Failure::failed)?;
    print_cutover(&cut);

    Ok((report, cut))
}

/// Fails when a shard stopped with a definite error (the demo cannot pass then).
fn check_shards(s: &StatusSnapshot) -> CmdResult {
    match s.shards.iter().find(|x| x.state == ShardState::Stopped) {
        Some(x) => Err(Failure::problem(anyhow!(
            "shard {} stopped: {}",
            x.name,
            x.last_error.as_deref().unwrap_or("(no message)")
        ))),
        None => Ok(()),
    }
}

/// Prints a progress line; on a terminal, redraws it in place until `last`.
fn line(tty: bool, text: &str, last: bool) {
    let mut out = std::io::stdout().lock();
    if tty {
        let _ = write!(out, "\r\x1b[K{text}");
        if last {
            let _ = writeln!(out);
        }
    } else {
        let _ = writeln!(out, "{text}");
    }
    let _ = out.flush();
}

fn short(table: &str) -> &str {
    table.strip_prefix("public.").unwrap_or(table)
}

fn tables_line(s: &StatusSnapshot) -> String {
    if s.tables.is_empty() {
        return "starting…".to_owned();
    }
    s.tables
        .iter()
        .map(|t| {
            format!(
                "{} {}/{}{}",
                short(&t.name),
                t.rows_copied,
                t.rows_estimated,
                if t.state == "done" { " ✓" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("  ")
}

fn shards_line(s: &StatusSnapshot) -> String {
    s.shards
        .iter()
        .map(|x| {
            format!(
                "{} {} lag {} {:.2}s {:.0} rows/s{}",
                x.name,
                x.applied_lsn,
                super::slot::human_bytes(i64::try_from(x.lag_bytes).unwrap_or(i64::MAX)),
                x.lag_seconds,
                x.rows_per_sec,
                if x.state == ShardState::Running {
                    String::new()
                } else {
                    format!(" [{}]", x.state.as_str())
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn print_verify(r: &VerifyReport) {
    let mut rows =
        vec![["TABLE", "SHARD", "SOURCE ROWS", "SHARD ROWS", "RESULT"].map(String::from)];
    for x in &r.results {
        rows.push([
            short(&x.table).to_owned(),
            x.shard.clone(),
            x.rows_source.to_string(),
            x.rows_shard.to_string(),
            if x.ok {
                "ok".to_owned()
            } else {
                format!(
                    "MISMATCH (missing {}, extra {}, different {}){}",
                    x.missing,
                    x.extra,
                    x.different,
                    x.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            },
        ]);
    }
    print!("{}", super::check::table(&rows));
    for n in &r.notes {
        println!("note: {n}");
    }
    println!(
        "verify {} in {:.1}s{}",
        if r.ok { "PASSED" } else { "FAILED" },
        r.elapsed_secs,
        r.source_lsn
            .map(|l| format!(" (source snapshot at {l})"))
            .unwrap_or_default()
    );
}

fn print_cutover(r: &CutoverReport) {
    println!(
        "{}: reached source LSN {} (progress {}) after waiting {:.1}s ({})",
        r.shard, r.target_lsn, r.reached_lsn, r.waited_secs, r.marker
    );
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut rows = vec![["SEQUENCE", "SOURCE", "SHARD AFTER", "ACTION"].map(String::from)];
    for s in &r.sequences {
        rows.push([
            s.name.clone(),
            opt(s.source_value),
            opt(s.shard_after),
            s.action.clone(),
        ]);
    }
    print!("{}", super::check::table(&rows));
    let verified = match &r.verify {
        Some(v) if v.ok => "verified",
        Some(_) => "verify FAILED",
        None => "not verified",
    };
    println!(
        "cutover {}: {} ({verified})",
        if r.ok { "done" } else { "NOT SAFE" },
        r.shard
    );
}

fn print_keep(env: &Env) {
    println!("\n== --keep: everything stays up until Ctrl-C ==");
    println!("source:   {}", env.source.url(DB));
    for (n, c) in SHARDS.iter().zip(&env.shards) {
        println!("{n}:   {}", c.url(DB));
    }
    println!(
        "admin console: psql -h 127.0.0.1 -p {} -U reshard reshard   (SHOW STATUS, SHOW SHARDS, SHOW LAG, PAUSE shard1, …)",
        env.admin_port
    );
    println!("metrics:  http://127.0.0.1:{}/metrics", env.metrics_port);
    println!(
        "config:   {}   (reshard status -c …, reshard verify -c …)",
        env.config_path.display()
    );
    println!("spill:    {}", env.dir.path().join("spill").display());
    println!("press Ctrl-C to stop the daemon and remove the clusters");
}

fn print_shutdown(s: &RunSummary) {
    println!(
        "\ndaemon stopped cleanly; slot confirmed_flush_lsn {}",
        s.confirmed_flush_lsn
    );
}
