//! The scenarios: catch-up of three write mixes (and the cost figures taken during them), full
//! load, steady state, light load.
//!
//! In: a [`Topology`], [`Settings`], a [`Report`] to add figures to. Out: figures for reshard
//! (a subprocess, see [`crate::daemon`]) and its comparisons: native logical replication fanned
//! out over N row-filtered slots ([`crate::native`]), the raw COPY limit ([`crate::raw_copy`]) and
//! the one-slot read ceiling ([`crate::ceiling`]). Every contestant gets its own shard databases
//! (`rb_<scenario>_<contestant>_s<k>`) holding the same data, and reads the same source WAL
//! through its own slot created before the backlog, so no contestant sees another's work. After
//! each contestant the shards' row counts are checked against PostgreSQL's own hash
//! partitioning of the source: a fast wrong answer is reported as wrong, not as fast.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use reshard_engine::Lsn;
use reshard_harness::workload::{self, FillSpec};
use tokio_postgres::Client;

use crate::procstat::{Sampler, Samples, Watch};
use crate::report::{Goal, Report};
use crate::servers::Topology;
use crate::setup::Counts;
use crate::setup::{self, count_mismatches, expected_counts, shard_db};
use crate::{ceiling, daemon, native, raw_copy};

/// Everything a run is parameterized by.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// Reduced sizes.
    pub quick: bool,
    /// Number of shards.
    pub shards: usize,
    /// Drive reshard (false: only the comparisons run).
    pub with_reshard: bool,
    /// The reshard binary.
    pub reshard_bin: PathBuf,
    /// TOML merged key by key over every generated reshard config (`--reshard-config FILE`),
    /// e.g. an `[apply]` section, to compare settings of one binary. Empty by default.
    pub reshard_config: String,
    /// Row changes in each catch-up backlog.
    pub backlog_changes: u64,
    /// Share of large (100-299 row) transactions in the mixed write mix (`catchup`, `steady`),
    /// percent; the rest are single-row.
    pub large_percent: u32,
    /// Rows per transaction of the `catchup-5row` backlog.
    pub small_txn_rows: u32,
    /// Accounts of the fills and the write mix.
    pub accounts: u32,
    /// Base data under the catch-up, steady and light scenarios (`customers`, `events` of the
    /// largest account).
    pub base_customers: u32,
    /// See `base_customers`.
    pub base_events: u32,
    /// Full-load data (`customers`, `events` of the largest account; about 1/N each after).
    pub fullload_customers: u32,
    /// See `fullload_customers`.
    pub fullload_events: u32,
    /// One event in this many gets a 4 kB TOASTed body in the full-load data.
    pub toast_every: u32,
    /// Steady-state duration, seconds.
    pub steady_secs: u64,
    /// Steady write rate, row changes per second (`None`: half of the measured catch-up rate).
    pub steady_rate: Option<u64>,
    /// Fallback steady rate when no catch-up rate was measured.
    pub steady_fallback_rate: u64,
    /// Interval between latency probes, milliseconds.
    pub probe_interval_ms: u64,
    /// Light load: single-row transactions per second.
    pub light_rate: u64,
    /// Light-load duration, seconds.
    pub light_secs: u64,
    /// Give up on one contestant after this long, seconds.
    pub timeout_secs: u64,
    /// Working directory (configs, spill, daemon logs).
    pub work_dir: PathBuf,
}

impl Settings {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn base_fill(&self) -> FillSpec {
        FillSpec {
            accounts: self.accounts,
            customers: self.base_customers,
            events: self.base_events,
            body_bytes: 64,
        }
    }
}

/// The write mix of one catch-up backlog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// Scenario name in the report and on the command line.
    pub scenario: &'static str,
    /// Where its cost figures go in the report.
    pub cost: &'static str,
    /// Short tag for slot and publication names.
    tag: &'static str,
    /// Share of large transactions, percent (`None`: `--large-percent`).
    large_percent: Option<u32>,
    /// Whether single-row statements are grouped into `small_txn_rows`-row transactions.
    grouped: bool,
}

/// The harness's mixed workload: `--large-percent` (2) % large transactions, about 80 % of
/// the changes in them, the rest single-row transactions.
pub const MIXED: Mix = Mix {
    scenario: "catchup",
    cost: "cost",
    tag: "cu",
    large_percent: None,
    grouped: false,
};

/// Single-row transactions only.
pub const ONE_ROW: Mix = Mix {
    scenario: "catchup-1row",
    cost: "cost-1row",
    tag: "c1",
    large_percent: Some(0),
    grouped: false,
};

/// Transactions of `small_txn_rows` (5) single-row statements on one account.
pub const FIVE_ROW: Mix = Mix {
    scenario: "catchup-5row",
    cost: "cost-5row",
    tag: "c5",
    large_percent: Some(0),
    grouped: true,
};

/// Every catch-up mix, in the order they run.
pub const MIXES: [Mix; 3] = [MIXED, ONE_ROW, FIVE_ROW];

impl Mix {
    fn large_percent(&self, set: &Settings) -> u32 {
        self.large_percent.unwrap_or(set.large_percent)
    }

    fn txn_rows(&self, set: &Settings) -> u32 {
        if self.grouped {
            set.small_txn_rows.max(1)
        } else {
            1
        }
    }

    /// `catchup-1row` → `catchup_1row`, for database names.
    fn db_part(&self) -> String {
        self.scenario.replace('-', "_")
    }
}

/// Peak RSS of the reshard process allowed in every scenario (issue #14).
pub const RSS_LIMIT_MIB: f64 = 256.0;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-6)
}

/// Connections to a contestant's shard databases, for sampling their applying backends;
/// empty unless every shard runs on this machine (its `/proc` must be readable).
async fn shard_clients(topo: &Topology, what: &str) -> Result<Vec<Client>> {
    if !topo.shards.iter().all(|s| s.is_local()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, s) in topo.shards.iter().enumerate() {
        out.push(s.connect(&shard_db(what, k)).await?);
    }
    Ok(out)
}

/// Records the CPU and memory figures of a consumer's catch-up run: in the mix's scenario
/// and, per 1 000 000 changes, in its cost scenario.
fn record_cpu(rep: &mut Report, mix: Mix, who: &str, s: &Samples, changes: u64, local: bool) {
    let scenario = mix.scenario;
    let per_m = 1_000_000.0 / changes.max(1) as f64;
    if local && !s.walsender_cpu.is_empty() {
        let ws = s.walsender_cpu_total();
        rep.add(scenario, who, "walsender_cpu_s", ws, "s");
        rep.add(
            scenario,
            who,
            "walsenders",
            s.walsender_cpu.len() as f64,
            "processes",
        );
        rep.add(
            mix.cost,
            who,
            "walsender_cpu_s_per_1M_changes",
            ws * per_m,
            "s",
        );
    } else {
        rep.missing(
            mix.cost,
            who,
            "walsender_cpu_s_per_1M_changes",
            "the source's walsenders are not readable in /proc on this machine",
        );
    }
    if who != "ceiling" {
        if s.shard_backends_sampled {
            let c = s.shard_backend_cpu_total();
            rep.add(scenario, who, "shard_backend_cpu_s", c, "s");
            rep.add(
                scenario,
                who,
                "shard_backends",
                s.shard_backend_cpu.len() as f64,
                "processes",
            );
            rep.add_noted(
                mix.cost,
                who,
                "shard_cpu_s_per_1M_changes",
                c * per_m,
                "s",
                "CPU of the shard servers' backends that apply (native: logical replication \
                 workers; reshard: its connections)",
            );
        } else {
            rep.missing(
                mix.cost,
                who,
                "shard_cpu_s_per_1M_changes",
                "the shard servers' backends are not readable in /proc on this machine",
            );
        }
    }
    if let Some(c) = s.process_cpu {
        rep.add(
            mix.cost,
            who,
            "process_cpu_s_per_1M_changes",
            c * per_m,
            "s",
        );
    }
    if let Some(h) = s.process_hwm_kib {
        rep.add(mix.cost, who, "peak_rss_mib", h as f64 / 1024.0, "MiB");
    }
    if let Some(b) = s.spill_max_bytes {
        rep.add(
            scenario,
            who,
            "spill_high_water_mib",
            b as f64 / 1048576.0,
            "MiB",
        );
    }
}

async fn check_counts(
    rep: &mut Report,
    topo: &Topology,
    scenario: &str,
    who: &str,
    what: &str,
    expected: &setup::Counts,
) -> Result<()> {
    let diffs = count_mismatches(topo, what, expected).await?;
    if diffs.is_empty() {
        rep.add(scenario, who, "rows_match_source", 1.0, "bool");
    } else {
        rep.add(scenario, who, "rows_match_source", 0.0, "bool");
        rep.notes.push(format!(
            "{scenario}/{who}: shards do NOT hold what the source says they must: {}",
            diffs.join("; ")
        ));
    }
    Ok(())
}

/// Catch-up: a backlog of `mix` written while nothing consumes, then the time until every
/// shard has applied it, for the one-slot ceiling, native fan-out and reshard. Also records the
/// cost figures (CPU of walsenders, of the shards' applying backends and of reshard, reshard's
/// peak RSS).
pub async fn catchup(topo: &Topology, set: &Settings, rep: &mut Report, mix: Mix) -> Result<()> {
    let sc = mix.scenario;
    let src_db = format!("rb_{}", mix.db_part());
    let src_db = src_db.as_str();
    let what_native = format!("{}_native", mix.db_part());
    let what_reshard = format!("{}_reshard", mix.db_part());
    let (ceiling_slot, native_prefix, reshard_slot) = (
        format!("rb_ceiling_{}", mix.tag),
        format!("rb_native_{}", mix.tag),
        format!("rb_reshard_{}", mix.tag),
    );
    let n = topo.n();
    let local = topo.source.is_local();
    eprintln!("[{sc}] preparing the source and the shards' base data");
    setup::prepare_source(&topo.source, src_db, set.base_fill(), 0).await?;
    let src = topo.source.connect(src_db).await?;
    setup::prepare_shards(topo, &what_native).await?;
    raw_copy::copy_shares(topo, src_db, &what_native).await?;
    let mut reshard = None;
    if set.with_reshard {
        setup::prepare_shards(topo, &what_reshard).await?;
        raw_copy::copy_shares(topo, src_db, &what_reshard).await?;
        let s = daemon::write_config(set, topo, src_db, &what_reshard, &reshard_slot)?;
        match s.create_slot() {
            Ok(()) => reshard = Some(s),
            Err(e) => {
                rep.missing(sc, "reshard", "changes_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("{sc}/reshard not run: {e:#}"));
            }
        }
    }

    eprintln!("[{sc}] creating the slots (before the backlog)");
    let all = setup::all_tables().collect::<Vec<_>>().join(", ");
    src.batch_execute(&format!(
        "CREATE PUBLICATION {ceiling_slot} FOR TABLE {all}"
    ))
    .await
    .with_context(|| format!("creating publication {ceiling_slot}"))?;
    let url = topo.source.url(src_db);
    let start = ceiling::create_slot(&url, &ceiling_slot).await?;
    native::create_publications(topo, src_db, &native_prefix).await?;
    native::create_subscriptions(
        topo,
        src_db,
        &what_native,
        &native_prefix,
        native::SubOptions {
            copy_data: false,
            enabled: false,
        },
    )
    .await?;

    let (large, txn_rows) = (mix.large_percent(set), mix.txn_rows(set));
    eprintln!(
        "[{sc}] writing a backlog of {} changes ({large} % large transactions, single-row \
         statements {txn_rows} rows per transaction)",
        set.backlog_changes
    );
    let t = Instant::now();
    let written = workload::write_mix_txns(
        &src,
        set.backlog_changes,
        set.accounts,
        large,
        txn_rows,
        0.42,
    )
    .await
    .context("writing the backlog")?;
    let wrote_in = t.elapsed();
    // Every shard receives the fence last: applied fence = applied backlog.
    let target = setup::fence(&src).await?;
    rep.add(sc, "backlog", "changes", written as f64, "rows");
    rep.add(
        sc,
        "backlog",
        "write_changes_per_sec",
        written as f64 / secs(wrote_in),
        "changes/s",
    );
    rep.add(
        sc,
        "backlog",
        "wal_mib",
        target.bytes_since(start) as f64 / 1048576.0,
        "MiB",
    );
    let expected = expected_counts(&src, n).await?;

    eprintln!("[{sc}] ceiling: one slot read by reshard's replication client");
    let sampler = Sampler::start(
        local.then_some(topo.source.connect(src_db).await?),
        Vec::new(),
        Watch {
            slot_like: Some(ceiling_slot.clone()),
            ..Default::default()
        },
    );
    let run = ceiling::read_backlog(
        &url,
        &ceiling_slot,
        &ceiling_slot,
        start,
        written,
        set.timeout(),
    )
    .await;
    let samples = sampler.finish().await;
    daemon::drop_slot(topo, src_db, &ceiling_slot).await;
    match run {
        Ok(run) => {
            rep.add(sc, "ceiling", "seconds", secs(run.elapsed), "s");
            rep.add(
                sc,
                "ceiling",
                "changes_per_sec",
                run.changes as f64 / secs(run.elapsed),
                "changes/s",
            );
            rep.add(sc, "ceiling", "txns", run.txns as f64, "txns");
            record_cpu(rep, mix, "ceiling", &samples, written, local);
        }
        Err(e) => rep.missing(sc, "ceiling", "changes_per_sec", &format!("{e:#}")),
    }

    eprintln!("[{sc}] native: {n} row-filtered subscriptions enabled at once");
    let sampler = Sampler::start(
        local.then_some(topo.source.connect(src_db).await?),
        shard_clients(topo, &what_native).await?,
        Watch {
            slot_like: Some(format!("{}\\_%", native_prefix.replace('_', "\\_"))),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    let res = async {
        native::enable(topo, &what_native, &native_prefix).await?;
        native::wait_confirmed(topo, src_db, &native_prefix, target, set.timeout()).await
    }
    .await;
    let samples = sampler.finish().await;
    match res {
        Ok(done) => {
            let el = done - t0;
            rep.add(sc, "native", "seconds", secs(el), "s");
            rep.add(
                sc,
                "native",
                "changes_per_sec",
                written as f64 / secs(el),
                "changes/s",
            );
            record_cpu(rep, mix, "native", &samples, written, local);
            check_counts(rep, topo, sc, "native", &what_native, &expected).await?;
        }
        Err(e) => rep.missing(sc, "native", "changes_per_sec", &format!("{e:#}")),
    }
    native::drop_all(topo, src_db, &what_native, &native_prefix).await;

    if let Some(s) = reshard {
        eprintln!("[{sc}] reshard run --skip-full-load");
        let res = run_reshard_catchup(topo, &s, target, set).await;
        daemon::drop_slot(topo, src_db, &s.slot).await;
        match res {
            Ok((el, samples)) => {
                rep.add(sc, "reshard", "seconds", secs(el), "s");
                rep.add(
                    sc,
                    "reshard",
                    "changes_per_sec",
                    written as f64 / secs(el),
                    "changes/s",
                );
                record_cpu(rep, mix, "reshard", &samples, written, local);
                check_counts(rep, topo, sc, "reshard", &what_reshard, &expected).await?;
            }
            Err(e) => {
                rep.missing(sc, "reshard", "changes_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("{sc}/reshard failed: {e:#}"));
            }
        }
    }
    drop_dbs(topo, src_db, &[&what_native, &what_reshard]).await;
    Ok(())
}

async fn run_reshard_catchup(
    topo: &Topology,
    s: &daemon::Setup,
    target: Lsn,
    set: &Settings,
) -> Result<(Duration, Samples)> {
    let local = topo.source.is_local();
    let shards = shard_clients(topo, &s.what).await?;
    let t0 = Instant::now();
    let mut d = s.spawn(true)?;
    let sampler = Sampler::start(
        if local {
            Some(topo.source.connect("postgres").await?)
        } else {
            None
        },
        shards,
        Watch {
            slot_like: Some(s.slot.clone()),
            pid: Some(d.pid()),
            spill_dir: Some(s.spill_dir.clone()),
        },
    );
    let res = daemon::wait_progress(topo, s, &mut d, target, set.timeout()).await;
    let samples = sampler.finish().await;
    d.stop(Duration::from_secs(20));
    let done = res?;
    Ok((done - t0, samples))
}

/// Full load: about a million rows (quick: about 50 000) into N empty shards, by the raw COPY
/// pipes, by native initial sync and by `reshard run` (exported snapshot, then watermark chunks).
pub async fn fullload(topo: &Topology, set: &Settings, rep: &mut Report) -> Result<()> {
    const SC: &str = "fullload";
    let src_db = "rb_fullload";
    let n = topo.n();
    eprintln!("[fullload] filling the source");
    setup::prepare_source(
        &topo.source,
        src_db,
        FillSpec {
            accounts: set.accounts,
            customers: set.fullload_customers,
            events: set.fullload_events,
            body_bytes: 64,
        },
        set.toast_every,
    )
    .await?;
    let src = topo.source.connect(src_db).await?;
    let expected = expected_counts(&src, n).await?;
    let src_rows: i64 = {
        let mut t = 0;
        for table in setup::all_tables() {
            let c: i64 = src
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
            t += c;
        }
        t
    };
    let bytes: i64 = src
        .query_one(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
             JOIN pg_namespace s ON s.oid = c.relnamespace \
             WHERE s.nspname = 'public' AND c.relkind = 'r'",
            &[],
        )
        .await?
        .get(0);
    let mib = bytes as f64 / 1048576.0;
    rep.add(SC, "source", "rows", src_rows as f64, "rows");
    rep.add_noted(
        SC,
        "source",
        "size_mib",
        mib,
        "MiB",
        "pg_total_relation_size of the source's tables (heap, TOAST, indexes)",
    );

    eprintln!("[fullload] raw: {n} parallel filtered COPY pipes");
    setup::prepare_shards(topo, "fullload_raw").await?;
    let t = Instant::now();
    match raw_copy::copy_shares(topo, src_db, "fullload_raw").await {
        Ok(_) => {
            let el = t.elapsed();
            rep.add(SC, "raw-copy", "seconds", secs(el), "s");
            rep.add(
                SC,
                "raw-copy",
                "rows_per_sec",
                src_rows as f64 / secs(el),
                "rows/s",
            );
            rep.add(SC, "raw-copy", "mib_per_sec", mib / secs(el), "MiB/s");
            check_counts(rep, topo, SC, "raw-copy", "fullload_raw", &expected).await?;
        }
        Err(e) => rep.missing(SC, "raw-copy", "rows_per_sec", &format!("{e:#}")),
    }
    drop_shard_dbs(topo, "fullload_raw").await;

    eprintln!("[fullload] native: {n} subscriptions with copy_data = true");
    setup::prepare_shards(topo, "fullload_native").await?;
    native::create_publications(topo, src_db, "rb_native_fl").await?;
    let t = Instant::now();
    let res = async {
        native::create_subscriptions(
            topo,
            src_db,
            "fullload_native",
            "rb_native_fl",
            native::SubOptions {
                copy_data: true,
                enabled: true,
            },
        )
        .await?;
        native::wait_synced(topo, "fullload_native", set.timeout()).await
    }
    .await;
    match res {
        Ok(done) => {
            let el = done - t;
            rep.add(SC, "native", "seconds", secs(el), "s");
            rep.add(
                SC,
                "native",
                "rows_per_sec",
                src_rows as f64 / secs(el),
                "rows/s",
            );
            rep.add(SC, "native", "mib_per_sec", mib / secs(el), "MiB/s");
            check_counts(rep, topo, SC, "native", "fullload_native", &expected).await?;
        }
        Err(e) => rep.missing(SC, "native", "rows_per_sec", &format!("{e:#}")),
    }
    native::drop_all(topo, src_db, "fullload_native", "rb_native_fl").await;
    drop_shard_dbs(topo, "fullload_native").await;

    if set.with_reshard {
        let run = FullLoadRun {
            topo,
            set,
            src_db,
            expected: &expected,
            rows: src_rows,
            mib,
        };
        // The exported snapshot (default), then the watermark chunks, on the same data.
        run.reshard(rep, "reshard", "fullload_reshard", "rb_reshard_fl", "")
            .await;
        run.reshard(
            rep,
            "reshard-watermark",
            "fullload_watermark",
            "rb_reshard_flw",
            "[snapshot]\nmode = \"watermark\"\n",
        )
        .await;
    }
    let _ = topo.source.drop_db(src_db).await;
    Ok(())
}

/// One `reshard run` full load of the `fullload` scenario's source.
struct FullLoadRun<'a> {
    topo: &'a Topology,
    set: &'a Settings,
    src_db: &'a str,
    expected: &'a Counts,
    rows: i64,
    mib: f64,
}

impl FullLoadRun<'_> {
    /// Loads the source into fresh shard databases `what` with `reshard run` (config plus
    /// `extra`) and records the rate as contestant `who`: from the daemon's start until every
    /// shard holds exactly its share.
    async fn reshard(&self, rep: &mut Report, who: &str, what: &str, slot: &str, extra: &str) {
        const SC: &str = "fullload";
        let (topo, set) = (self.topo, self.set);
        eprintln!("[fullload] {who}: reshard run (full load)");
        if let Err(e) = setup::prepare_shards(topo, what).await {
            rep.missing(SC, who, "rows_per_sec", &format!("{e:#}"));
            return;
        }
        let res = async {
            let s = daemon::write_config_with(set, topo, self.src_db, what, slot, extra)?;
            let t = Instant::now();
            let mut d = s.spawn(false)?;
            let sampler = Sampler::start(
                None,
                Vec::new(),
                Watch {
                    pid: Some(d.pid()),
                    ..Default::default()
                },
            );
            let res = daemon::wait_counts(topo, &s, &mut d, self.expected, set.timeout()).await;
            let samples = sampler.finish().await;
            d.stop(Duration::from_secs(20));
            daemon::drop_slot(topo, self.src_db, &s.slot).await;
            Ok::<_, anyhow::Error>((res? - t, samples))
        }
        .await;
        match res {
            Ok((el, samples)) => {
                rep.add(SC, who, "seconds", secs(el), "s");
                rep.add(
                    SC,
                    who,
                    "rows_per_sec",
                    self.rows as f64 / secs(el),
                    "rows/s",
                );
                rep.add(SC, who, "mib_per_sec", self.mib / secs(el), "MiB/s");
                if let Some(c) = samples.process_cpu {
                    rep.add(SC, who, "process_cpu_s", c, "s");
                }
                if let Some(h) = samples.process_hwm_kib {
                    rep.add(SC, who, "peak_rss_mib", h as f64 / 1024.0, "MiB");
                }
            }
            Err(e) => {
                rep.missing(SC, who, "rows_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("fullload/{who} failed: {e:#}"));
            }
        }
        drop_shard_dbs(topo, what).await;
    }
}

/// Which commit setting a latency figure was measured under (the report says it next to every
/// latency figure: it decides how long a walsender waits before it may send a commit).
const STEADY_SETTING: &str = "source writers: synchronous_commit=on (SET per session); shards: \
                              synchronous_commit=off (harness default)";
const LIGHT_SETTING: &str = "source: synchronous_commit=on (ALTER DATABASE, every session); \
                             shards: synchronous_commit=off (harness default)";

/// A consumer streaming one source database into its shard databases during a steady or
/// light scenario: native subscriptions or a reshard daemon.
enum Consumer {
    Native {
        prefix: String,
    },
    Reshard {
        setup: daemon::Setup,
        daemon: daemon::Daemon,
    },
}

impl Consumer {
    /// Starts `who` (`native` or `reshard`) on `src_db` → shard databases `what`, and waits
    /// until it streams (it has applied a fence written after it started).
    async fn start(
        topo: &Topology,
        set: &Settings,
        src: &Client,
        src_db: &str,
        what: &str,
        prefix: &str,
        who: &str,
    ) -> Result<Consumer> {
        let mut c = if who == "native" {
            native::create_publications(topo, src_db, prefix).await?;
            native::create_subscriptions(
                topo,
                src_db,
                what,
                prefix,
                native::SubOptions {
                    copy_data: false,
                    enabled: true,
                },
            )
            .await?;
            Consumer::Native {
                prefix: prefix.to_owned(),
            }
        } else {
            let s = daemon::write_config(set, topo, src_db, what, prefix)?;
            s.create_slot()?;
            let d = s.spawn(true)?;
            Consumer::Reshard {
                setup: s,
                daemon: d,
            }
        };
        let now = setup::fence(src).await?;
        c.wait(topo, src_db, now, set.timeout()).await?;
        Ok(c)
    }

    /// Waits until every shard has applied `lsn` (a fence's); returns when that was seen.
    async fn wait(
        &mut self,
        topo: &Topology,
        src_db: &str,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<Instant> {
        match self {
            Consumer::Native { prefix } => {
                native::wait_confirmed(topo, src_db, prefix, lsn, timeout).await
            }
            Consumer::Reshard { setup, daemon } => {
                daemon::wait_progress(topo, setup, daemon, lsn, timeout).await
            }
        }
    }

    fn watch(&self) -> Watch {
        match self {
            Consumer::Native { .. } => Watch::default(),
            Consumer::Reshard { setup, daemon } => Watch {
                pid: Some(daemon.pid()),
                spill_dir: Some(setup.spill_dir.clone()),
                ..Default::default()
            },
        }
    }

    /// Stops the consumer and drops its slot(s) and publication(s).
    async fn stop(self, topo: &Topology, src_db: &str, what: &str) {
        match self {
            Consumer::Native { prefix } => native::drop_all(topo, src_db, what, &prefix).await,
            Consumer::Reshard { setup, daemon } => {
                daemon.stop(Duration::from_secs(20));
                daemon::drop_slot(topo, src_db, &setup.slot).await;
            }
        }
    }
}

/// Steady state: a constant write rate for a fixed time, latency probes every
/// `probe_interval_ms`; per shard p50/p99/max of `applied_at - written_at`. Returns nothing;
/// figures go to the report.
pub async fn steady(topo: &Topology, set: &Settings, rep: &mut Report, rate: u64) -> Result<()> {
    const SC: &str = "steady";
    rep.add(
        SC,
        "writer",
        "target_changes_per_sec",
        rate as f64,
        "changes/s",
    );
    steady_one(topo, set, rep, rate, "native").await?;
    if set.with_reshard {
        if let Err(e) = steady_one(topo, set, rep, rate, "reshard").await {
            rep.missing(SC, "reshard", "p99_ms", &format!("{e:#}"));
            rep.notes.push(format!("steady/reshard failed: {e:#}"));
        }
    }
    Ok(())
}

async fn steady_one(
    topo: &Topology,
    set: &Settings,
    rep: &mut Report,
    rate: u64,
    who: &str,
) -> Result<()> {
    const SC: &str = "steady";
    let src_db = format!("rb_steady_{who}");
    let what = format!("steady_{who}");
    let prefix = format!("rb_{who}_st");
    eprintln!("[steady] {who}: preparing");
    setup::prepare_source(&topo.source, &src_db, set.base_fill(), 0).await?;
    let src = topo.source.connect(&src_db).await?;
    setup::prepare_shards(topo, &what).await?;
    raw_copy::copy_shares(topo, &src_db, &what).await?;

    let mut c = Consumer::start(topo, set, &src, &src_db, &what, &prefix, who).await?;
    let res = async {
        // Warm-up (not measured): the first writes to each table make every contestant resolve
        // relations, and reshard introspect target tables and create its staging tables. Only
        // probes written after the warm-up is applied count.
        let mut warm = set.clone();
        warm.steady_secs = 2;
        write_steady(topo, &src_db, &warm, rate).await?;
        let warm_end = setup::fence(&src).await?;
        c.wait(topo, &src_db, warm_end, set.timeout()).await?;
        let measure_from = source_clock(&src).await?;
        let sampler = Sampler::start(None, Vec::new(), c.watch());

        eprintln!(
            "[steady] {who}: writing {rate} changes/s for {} s",
            set.steady_secs
        );
        let (written, probes, el) = write_steady(topo, &src_db, set, rate).await?;
        let end = setup::fence(&src).await?;
        let fenced_at = Instant::now();
        let drained = c.wait(topo, &src_db, end, set.timeout()).await;
        let samples = sampler.finish().await;
        // The load this contestant was actually offered: the writer shares the CPUs with the
        // servers and the consumer, so it may not reach the target rate, and each contestant
        // is offered what the writer reached while it ran.
        let offered = written as f64 / secs(el);
        rep.add(SC, who, "offered_changes_per_sec", offered, "changes/s");
        if offered < 0.9 * rate as f64 {
            rep.notes.push(format!(
                "steady/{who}: the writer reached only {offered:.0} of {rate} changes/s on \
                 this machine (it shares the CPUs with the servers and the consumer); latency \
                 is for the offered rate"
            ));
        }
        rep.add(SC, who, "probes", probes as f64, "rows");
        record_memory(rep, SC, who, &samples);
        let drained = drained?;
        // Whether the contestant kept up: a consumer that kept up holds only what is in flight
        // when the writer stops and applies the fence within about one latency; one that fell
        // behind drains its backlog first, and its latency figures then measure that queue.
        let drain = secs(drained.saturating_duration_since(fenced_at));
        rep.add(SC, who, "drain_s", drain, "s");
        // What it applied over the writer's run and its drain.
        rep.add(
            SC,
            who,
            "applied_changes_per_sec",
            written as f64 / (secs(el) + drain),
            "changes/s",
        );
        let kept_up = drain <= STEADY_KEPT_UP_SECS;
        rep.add(SC, who, "kept_up", f64::from(u8::from(kept_up)), "bool");
        if !kept_up {
            rep.notes.push(format!(
                "steady/{who}: fell behind the offered {offered:.0} changes/s: it applied the \
                 fence written when the writer stopped {drain:.1} s later (kept up means within \
                 {STEADY_KEPT_UP_SECS} s); its latency figures measure the backlog it queued"
            ));
        }
        latency(topo, &what, rep, SC, who, &measure_from, STEADY_SETTING).await
    }
    .await;
    c.stop(topo, &src_db, &what).await;
    drop_dbs(topo, &src_db, &[&what]).await;
    res
}

/// Most seconds between the writer's stop (the fence) and its apply for a steady-state
/// contestant to count as having kept up with the offered load.
pub const STEADY_KEPT_UP_SECS: f64 = 1.0;

/// The source's `clock_timestamp()`, as text: probes written from then on count.
async fn source_clock(src: &Client) -> Result<String> {
    Ok(src
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .context("reading the source clock")?
        .get(0))
}

/// Records reshard's peak RSS and spill high-water mark of a scenario.
fn record_memory(rep: &mut Report, sc: &str, who: &str, samples: &Samples) {
    if let Some(h) = samples.process_hwm_kib {
        rep.add(sc, who, "peak_rss_mib", h as f64 / 1024.0, "MiB");
    }
    if let Some(b) = samples.spill_max_bytes {
        rep.add(sc, who, "spill_high_water_mib", b as f64 / 1048576.0, "MiB");
    }
}

/// Writes the mix at `rate` changes/s and a latency probe every `probe_interval_ms` for
/// `steady_secs`. Returns (changes, probes, elapsed).
async fn write_steady(
    topo: &Topology,
    src_db: &str,
    set: &Settings,
    rate: u64,
) -> Result<(u64, u64, Duration)> {
    let mixer = topo.source.connect(src_db).await?;
    let prober = topo.source.connect(src_db).await?;
    // A walsender sends only WAL that is flushed; with the harness's synchronous_commit=off the
    // WAL writer flushes every wal_writer_delay (200 ms), which would dominate the latency of
    // every contestant alike. The writers commit synchronously (cheap with fsync=off).
    for c in [&mixer, &prober] {
        c.batch_execute("SET synchronous_commit = on")
            .await
            .context("SET synchronous_commit = on for the steady writers")?;
    }
    let dur = Duration::from_secs(set.steady_secs);
    let probes = tokio::spawn(write_probes(
        prober,
        set.accounts,
        Duration::from_millis(set.probe_interval_ms.max(1)),
        dur,
    ));
    let t0 = Instant::now();
    let mut written = 0u64;
    let mut tick = 0u64;
    while t0.elapsed() < dur {
        let due = (rate as f64 * t0.elapsed().as_secs_f64()) as u64;
        if due > written {
            let seed = ((tick % 2000) as f64 / 1000.0) - 1.0;
            written +=
                workload::write_mix(&mixer, due - written, set.accounts, set.large_percent, seed)
                    .await
                    .context("steady write mix")?;
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let el = t0.elapsed();
    let probes = probes.await.context("probe writer panicked")??;
    Ok((written, probes, el))
}

/// Inserts one latency probe row (a single-row transaction) every `every` for `dur`, over
/// accounts `1..=accounts` in turn. Returns how many it wrote.
async fn write_probes(
    prober: Client,
    accounts: u32,
    every: Duration,
    dur: Duration,
) -> Result<u64> {
    let stmt = prober
        .prepare("INSERT INTO bench_latency (account_id) VALUES ($1)")
        .await
        .context("preparing the probe INSERT")?;
    let mut iv = tokio::time::interval(every);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    let mut k = 0i64;
    while t0.elapsed() < dur {
        iv.tick().await;
        prober
            .execute(&stmt, &[&(1 + k % accounts.max(1) as i64)])
            .await
            .context("inserting a latency probe")?;
        k += 1;
    }
    Ok(k as u64)
}

/// Light load: `light_rate` single-row transactions per second (each one a latency probe) for
/// `light_secs`, with the source database at `synchronous_commit = on`, for native and
/// reshard; then, with reshard caught up and idle, `reshard cutover` of every shard.
pub async fn light(topo: &Topology, set: &Settings, rep: &mut Report) -> Result<()> {
    const SC: &str = "light";
    rep.add_noted(
        SC,
        "writer",
        "target_txns_per_sec",
        set.light_rate as f64,
        "txn/s",
        LIGHT_SETTING,
    );
    light_one(topo, set, rep, "native").await?;
    if set.with_reshard {
        if let Err(e) = light_one(topo, set, rep, "reshard").await {
            rep.missing(SC, "reshard", "p99_ms", &format!("{e:#}"));
            rep.notes.push(format!("light/reshard failed: {e:#}"));
        }
    }
    Ok(())
}

async fn light_one(topo: &Topology, set: &Settings, rep: &mut Report, who: &str) -> Result<()> {
    const SC: &str = "light";
    let src_db = format!("rb_light_{who}");
    let what = format!("light_{who}");
    let prefix = format!("rb_{who}_lt");
    eprintln!("[light] {who}: preparing");
    setup::prepare_source(&topo.source, &src_db, set.base_fill(), 0).await?;
    // Every session on the source database commits synchronously from now on: the probes, the
    // fences, and the walsenders' view of what is flushed.
    topo.source
        .connect("postgres")
        .await?
        .batch_execute(&format!(
            "ALTER DATABASE {src_db} SET synchronous_commit = on"
        ))
        .await
        .with_context(|| format!("ALTER DATABASE {src_db} SET synchronous_commit = on"))?;
    let src = topo.source.connect(&src_db).await?;
    let sc_setting: String = src
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .context("reading synchronous_commit on the source")?
        .get(0);
    if sc_setting != "on" {
        bail!("the light-load source database runs synchronous_commit={sc_setting}, not on");
    }
    setup::prepare_shards(topo, &what).await?;
    raw_copy::copy_shares(topo, &src_db, &what).await?;

    let mut c = Consumer::start(topo, set, &src, &src_db, &what, &prefix, who).await?;
    let every = Duration::from_secs_f64(1.0 / set.light_rate.max(1) as f64);
    let res = async {
        // Warm-up, as in steady.
        write_probes(
            topo.source.connect(&src_db).await?,
            set.accounts,
            every,
            Duration::from_secs(2),
        )
        .await?;
        let warm_end = setup::fence(&src).await?;
        c.wait(topo, &src_db, warm_end, set.timeout()).await?;
        let measure_from = source_clock(&src).await?;
        let sampler = Sampler::start(None, Vec::new(), c.watch());
        eprintln!(
            "[light] {who}: {} single-row txn/s for {} s",
            set.light_rate, set.light_secs
        );
        let t0 = Instant::now();
        let probes = write_probes(
            topo.source.connect(&src_db).await?,
            set.accounts,
            every,
            Duration::from_secs(set.light_secs),
        )
        .await?;
        let el = t0.elapsed();
        let end = setup::fence(&src).await?;
        let drained = c.wait(topo, &src_db, end, set.timeout()).await;
        let samples = sampler.finish().await;
        rep.add(
            SC,
            who,
            "achieved_txns_per_sec",
            probes as f64 / secs(el),
            "txn/s",
        );
        rep.add(SC, who, "probes", probes as f64, "rows");
        record_memory(rep, SC, who, &samples);
        drained?;
        latency(topo, &what, rep, SC, who, &measure_from, LIGHT_SETTING).await?;
        if let Consumer::Reshard { setup, .. } = &c {
            cutovers(topo, set, rep, setup);
        }
        anyhow::Ok(())
    }
    .await;
    c.stop(topo, &src_db, &what).await;
    drop_dbs(topo, &src_db, &[&what]).await;
    res
}

/// `reshard cutover --shard S` of every shard, one after the other, with reshard running and
/// caught up (the light load has ended): wall-clock seconds of the command, as an operator
/// waits on it (process start, the marker, the wait for the shard, sequences, verify). Then
/// the same for shard 0 with `--no-verify`.
fn cutovers(topo: &Topology, set: &Settings, rep: &mut Report, s: &daemon::Setup) {
    const SC: &str = "cutover";
    let mut worst: Option<f64> = None;
    // Per step, the slowest shard's seconds (steps in the order the first cutover gave them).
    let mut steps: Vec<(String, f64)> = Vec::new();
    for k in 0..topo.n() {
        let shard = format!("shard{k}");
        match s.cutover(&shard, true, set.timeout()) {
            Ok((el, timings)) => {
                let el = secs(el);
                rep.add(SC, "reshard", &format!("seconds {shard}"), el, "s");
                worst = Some(worst.map_or(el, |w: f64| w.max(el)));
                for (step, t) in timings {
                    match steps.iter_mut().find(|(s, _)| *s == step) {
                        Some((_, w)) => *w = w.max(t),
                        None => steps.push((step, t)),
                    }
                }
            }
            Err(e) => {
                rep.missing(
                    SC,
                    "reshard",
                    &format!("seconds {shard}"),
                    &format!("{e:#}"),
                );
                rep.notes.push(format!("cutover of {shard} failed: {e:#}"));
                return;
            }
        }
    }
    if let Some(w) = worst {
        rep.add_noted(
            SC,
            "reshard",
            "max_seconds",
            w,
            "s",
            "slowest shard; cutover with verify (the default), reshard caught up and idle",
        );
    }
    for (step, t) in steps {
        rep.add_noted(
            SC,
            "reshard",
            &format!("step {step}"),
            t,
            "s",
            "slowest shard's seconds in this step (`reshard cutover --json`'s timings); the steps add up to less than the wall clock, which also counts process start and config loading",
        );
    }
    match s.cutover("shard0", false, set.timeout()) {
        Ok((el, _)) => rep.add(SC, "reshard", "seconds shard0 --no-verify", secs(el), "s"),
        Err(e) => rep.missing(
            SC,
            "reshard",
            "seconds shard0 --no-verify",
            &format!("{e:#}"),
        ),
    }
}

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits. (A histogram made
/// with `Histogram::new` only grows on `record`; `saturating_record` would clamp to its
/// initial range.)
fn hist() -> Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("creating a histogram")
}

/// Per-shard and overall commit-to-apply latency of the probes written since `measure_from`;
/// `setting` says which commit settings they were measured under (noted on the overall
/// figures).
async fn latency(
    topo: &Topology,
    what: &str,
    rep: &mut Report,
    sc: &str,
    who: &str,
    measure_from: &str,
    setting: &str,
) -> Result<()> {
    let mut all = hist()?;
    for (k, s) in topo.shards.iter().enumerate() {
        let c = s.connect(&shard_db(what, k)).await?;
        let rows = c
            .query(
                "SELECT greatest(0, (extract(epoch FROM applied_at - written_at) * 1e6))::bigint \
                 FROM bench_latency WHERE written_at >= $1::text::timestamptz",
                &[&measure_from],
            )
            .await
            .context("reading bench_latency")?;
        let mut h = hist()?;
        for r in rows {
            let us: i64 = r.get(0);
            h.saturating_record(us.max(0) as u64);
            all.saturating_record(us.max(0) as u64);
        }
        if h.is_empty() {
            rep.missing(
                sc,
                who,
                &format!("p99_ms shard{k}"),
                "no probe reached this shard",
            );
            continue;
        }
        for (m, v) in [
            ("p50_ms", h.value_at_quantile(0.5)),
            ("p99_ms", h.value_at_quantile(0.99)),
            ("max_ms", h.max()),
        ] {
            rep.add(sc, who, &format!("{m} shard{k}"), v as f64 / 1000.0, "ms");
        }
    }
    if !all.is_empty() {
        for (m, v) in [
            ("p50_ms", all.value_at_quantile(0.5)),
            ("p99_ms", all.value_at_quantile(0.99)),
            ("max_ms", all.max()),
        ] {
            rep.add_noted(sc, who, m, v as f64 / 1000.0, "ms", setting);
        }
    }
    Ok(())
}

async fn drop_shard_dbs(topo: &Topology, what: &str) {
    for (k, s) in topo.shards.iter().enumerate() {
        let _ = s.drop_db(&shard_db(what, k)).await;
    }
}

async fn drop_dbs(topo: &Topology, src_db: &str, whats: &[&str]) {
    for w in whats {
        drop_shard_dbs(topo, w).await;
    }
    let _ = topo.source.drop_db(src_db).await;
}

/// A goal row of reshard's `metric` in scenario `sc` against native's.
fn vs_native(rep: &mut Report, sc: &str, what: &str, metric: &str, unit: &str, goal: Goal) {
    let (a, b) = (
        rep.get(sc, "reshard", metric),
        rep.get(sc, "native", metric),
    );
    rep.compare(sc, what, a, b, unit, goal);
}

/// The goal row of reshard's peak RSS in scenario `sc` (at most [`RSS_LIMIT_MIB`]).
fn peak_rss(rep: &mut Report, sc: &str) {
    let a = rep.get(sc, "reshard", "peak_rss_mib");
    rep.compare(
        sc,
        "reshard peak RSS",
        a,
        None,
        "MiB",
        Goal::AtMost(RSS_LIMIT_MIB),
    );
}

/// The goals of issue #14, from the recorded figures. A scenario that did not run adds no
/// rows; a figure that is missing makes its goal "not measured".
pub fn compare(rep: &mut Report, n: usize) {
    let g = |r: &Report, s: &str, c: &str, m: &str| r.get(s, c, m);
    for mix in MIXES {
        let sc = mix.scenario;
        if !rep.has_scenario(sc) {
            continue;
        }
        let a = g(rep, sc, "reshard", "changes_per_sec");
        let b = g(rep, sc, "native", "changes_per_sec");
        let c = g(rep, sc, "ceiling", "changes_per_sec");
        rep.compare(
            sc,
            "catch-up rate vs native fan-out",
            a,
            b,
            "changes/s",
            Goal::RatioAtLeast(1.5),
        );
        rep.compare(
            sc,
            "catch-up rate vs one-slot read ceiling",
            a,
            c,
            "changes/s",
            if mix == MIXED {
                Goal::RatioAtLeast(0.9)
            } else {
                Goal::Info
            },
        );
        let cost = mix.cost;
        rep.compare(
            cost,
            "reshard process CPU per 1M changes",
            g(rep, cost, "reshard", "process_cpu_s_per_1M_changes"),
            None,
            "CPU-s",
            Goal::AtMost(3.0),
        );
        vs_native(
            rep,
            cost,
            "shard-side CPU per 1M changes vs native's apply workers",
            "shard_cpu_s_per_1M_changes",
            "CPU-s",
            Goal::RatioBelow(1.0),
        );
        vs_native(
            rep,
            cost,
            "source walsender CPU per 1M changes vs native fan-out",
            "walsender_cpu_s_per_1M_changes",
            "CPU-s",
            Goal::RatioAtMost(1.0 / n.max(1) as f64),
        );
        rep.compare(
            sc,
            "reshard peak RSS",
            g(rep, cost, "reshard", "peak_rss_mib"),
            None,
            "MiB",
            Goal::AtMost(RSS_LIMIT_MIB),
        );
    }
    if rep.has_scenario("fullload") {
        let a = g(rep, "fullload", "reshard", "rows_per_sec");
        rep.compare(
            "fullload",
            "full-load rate vs raw filtered COPY",
            a,
            g(rep, "fullload", "raw-copy", "rows_per_sec"),
            "rows/s",
            Goal::RatioAtLeast(1.0),
        );
        rep.compare(
            "fullload",
            "full-load rate vs native initial sync",
            a,
            g(rep, "fullload", "native", "rows_per_sec"),
            "rows/s",
            Goal::RatioAtLeast(1.0),
        );
        let w = g(rep, "fullload", "reshard-watermark", "rows_per_sec");
        rep.compare(
            "fullload",
            "watermark full-load rate vs raw filtered COPY",
            w,
            g(rep, "fullload", "raw-copy", "rows_per_sec"),
            "rows/s",
            Goal::Info,
        );
        rep.compare(
            "fullload",
            "watermark full-load rate vs exported snapshot",
            w,
            a,
            "rows/s",
            Goal::Info,
        );
        rep.compare(
            "fullload",
            "watermark full-load MiB/s vs raw filtered COPY",
            g(rep, "fullload", "reshard-watermark", "mib_per_sec"),
            g(rep, "fullload", "raw-copy", "mib_per_sec"),
            "MiB/s",
            Goal::Info,
        );
        vs_native(
            rep,
            "fullload",
            "full-load MiB/s vs native initial sync",
            "mib_per_sec",
            "MiB/s",
            Goal::Info,
        );
        peak_rss(rep, "fullload");
    }
    for (sc, p50, p99) in [("steady", 20.0, 100.0), ("light", 5.0, 15.0)] {
        if !rep.has_scenario(sc) {
            continue;
        }
        for (m, limit) in [("p50_ms", p50), ("p99_ms", p99)] {
            vs_native(
                rep,
                sc,
                &format!("{} commit-to-apply latency (vs native)", &m[..3]),
                m,
                "ms",
                Goal::AtMost(limit),
            );
        }
        peak_rss(rep, sc);
    }
    if rep.has_scenario("steady") {
        vs_native(
            rep,
            "steady",
            "offered write rate (vs native's)",
            "offered_changes_per_sec",
            "changes/s",
            Goal::Info,
        );
        vs_native(
            rep,
            "steady",
            "drain after the writer stopped (vs native)",
            "drain_s",
            "s",
            Goal::Info,
        );
    }
    if rep.has_scenario("light") {
        rep.compare(
            "cutover",
            "cutover of a caught-up shard, slowest shard",
            g(rep, "cutover", "reshard", "max_seconds"),
            None,
            "s",
            Goal::AtMost(CUTOVER_LIMIT_SECS),
        );
    }
}

/// "Well under a second" (issue #14), made a number.
pub const CUTOVER_LIMIT_SECS: f64 = 0.5;
