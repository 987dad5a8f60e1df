//! The scenarios: catch-up (and the cost figures taken during it), full load, steady state.
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

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use reshard_harness::workload::{self, FillSpec};

use crate::procstat::{Sampler, Watch};
use crate::report::Report;
use crate::servers::Topology;
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
    /// Row changes in the catch-up backlog.
    pub backlog_changes: u64,
    /// Share of large (100-299 row) transactions in the write mix, percent; the rest are
    /// single-row.
    pub large_percent: u32,
    /// Accounts of the fills and the write mix.
    pub accounts: u32,
    /// Base data under the catch-up and steady scenarios (`customers`, `events` of the
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

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-6)
}

/// Records the CPU figures of a consumer's run.
fn record_cpu(
    rep: &mut Report,
    scenario: &str,
    who: &str,
    s: &crate::procstat::Samples,
    changes: u64,
    local: bool,
) {
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
            "cost",
            who,
            "walsender_cpu_s_per_1M_changes",
            ws * per_m,
            "s",
        );
    } else {
        rep.missing(
            "cost",
            who,
            "walsender_cpu_s_per_1M_changes",
            "the source's walsenders are not readable in /proc on this machine",
        );
    }
    if let Some(c) = s.process_cpu {
        rep.add("cost", who, "process_cpu_s_per_1M_changes", c * per_m, "s");
    }
    if let Some(h) = s.process_hwm_kib {
        rep.add("cost", who, "peak_rss_mib", h as f64 / 1024.0, "MiB");
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

/// Catch-up: a backlog written while nothing consumes, then the time until every shard has
/// applied it, for the one-slot ceiling, native fan-out and reshard. Also records the cost
/// figures (CPU of walsenders and of reshard, reshard's peak RSS).
pub async fn catchup(topo: &Topology, set: &Settings, rep: &mut Report) -> Result<()> {
    const SC: &str = "catchup";
    let src_db = "rb_catchup";
    let n = topo.n();
    let local = topo.source.is_local();
    eprintln!("[catchup] preparing the source and the shards' base data");
    setup::prepare_source(&topo.source, src_db, set.base_fill(), 0).await?;
    let src = topo.source.connect(src_db).await?;
    setup::prepare_shards(topo, "catchup_native").await?;
    raw_copy::copy_shares(topo, src_db, "catchup_native").await?;
    let mut reshard = None;
    if set.with_reshard {
        setup::prepare_shards(topo, "catchup_reshard").await?;
        raw_copy::copy_shares(topo, src_db, "catchup_reshard").await?;
        let s = daemon::write_config(
            &set.reshard_bin,
            &set.work_dir,
            topo,
            src_db,
            "catchup_reshard",
            "rb_reshard_cu",
        )?;
        match s.create_slot() {
            Ok(()) => reshard = Some(s),
            Err(e) => {
                rep.missing(SC, "reshard", "changes_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("catchup/reshard not run: {e:#}"));
            }
        }
    }

    eprintln!("[catchup] creating the slots (before the backlog)");
    let all = setup::all_tables().collect::<Vec<_>>().join(", ");
    src.batch_execute(&format!("CREATE PUBLICATION rb_ceiling FOR TABLE {all}"))
        .await
        .context("creating publication rb_ceiling")?;
    let url = topo.source.url(src_db);
    let start = ceiling::create_slot(&url, "rb_ceiling").await?;
    native::create_publications(topo, src_db, "rb_native_cu").await?;
    native::create_subscriptions(
        topo,
        src_db,
        "catchup_native",
        "rb_native_cu",
        native::SubOptions {
            copy_data: false,
            enabled: false,
        },
    )
    .await?;

    eprintln!(
        "[catchup] writing a backlog of {} changes",
        set.backlog_changes
    );
    let t = Instant::now();
    let written = workload::write_mix(
        &src,
        set.backlog_changes,
        set.accounts,
        set.large_percent,
        0.42,
    )
    .await
    .context("writing the backlog")?;
    let wrote_in = t.elapsed();
    // Every shard receives the fence last: applied fence = applied backlog.
    let target = setup::fence(&src).await?;
    rep.add(SC, "backlog", "changes", written as f64, "rows");
    rep.add(
        SC,
        "backlog",
        "write_changes_per_sec",
        written as f64 / secs(wrote_in),
        "changes/s",
    );
    rep.add(
        SC,
        "backlog",
        "wal_mib",
        target.bytes_since(start) as f64 / 1048576.0,
        "MiB",
    );
    let expected = expected_counts(&src, n).await?;

    eprintln!("[catchup] ceiling: one slot read by reshard's replication client");
    let sampler = Sampler::start(
        local.then_some(topo.source.connect(src_db).await?),
        Watch {
            slot_like: Some("rb_ceiling".into()),
            ..Default::default()
        },
    );
    let run = ceiling::read_backlog(
        &url,
        "rb_ceiling",
        "rb_ceiling",
        start,
        written,
        set.timeout(),
    )
    .await;
    let samples = sampler.finish().await;
    daemon::drop_slot(topo, src_db, "rb_ceiling").await;
    match run {
        Ok(run) => {
            rep.add(SC, "ceiling", "seconds", secs(run.elapsed), "s");
            rep.add(
                SC,
                "ceiling",
                "changes_per_sec",
                run.changes as f64 / secs(run.elapsed),
                "changes/s",
            );
            rep.add(SC, "ceiling", "txns", run.txns as f64, "txns");
            record_cpu(rep, SC, "ceiling", &samples, written, local);
        }
        Err(e) => rep.missing(SC, "ceiling", "changes_per_sec", &format!("{e:#}")),
    }

    eprintln!("[catchup] native: {n} row-filtered subscriptions enabled at once");
    let sampler = Sampler::start(
        local.then_some(topo.source.connect(src_db).await?),
        Watch {
            slot_like: Some("rb\\_native\\_cu\\_%".into()),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    let res = async {
        native::enable(topo, "catchup_native", "rb_native_cu").await?;
        native::wait_confirmed(topo, src_db, "rb_native_cu", target, set.timeout()).await
    }
    .await;
    let samples = sampler.finish().await;
    match res {
        Ok(done) => {
            let el = done - t0;
            rep.add(SC, "native", "seconds", secs(el), "s");
            rep.add(
                SC,
                "native",
                "changes_per_sec",
                written as f64 / secs(el),
                "changes/s",
            );
            record_cpu(rep, SC, "native", &samples, written, local);
            check_counts(rep, topo, SC, "native", "catchup_native", &expected).await?;
        }
        Err(e) => rep.missing(SC, "native", "changes_per_sec", &format!("{e:#}")),
    }
    native::drop_all(topo, src_db, "catchup_native", "rb_native_cu").await;

    if let Some(s) = reshard {
        eprintln!("[catchup] reshard run --skip-full-load");
        let res = run_reshard_catchup(topo, &s, target, set).await;
        daemon::drop_slot(topo, src_db, &s.slot).await;
        match res {
            Ok((el, samples)) => {
                rep.add(SC, "reshard", "seconds", secs(el), "s");
                rep.add(
                    SC,
                    "reshard",
                    "changes_per_sec",
                    written as f64 / secs(el),
                    "changes/s",
                );
                record_cpu(rep, SC, "reshard", &samples, written, local);
                check_counts(rep, topo, SC, "reshard", "catchup_reshard", &expected).await?;
            }
            Err(e) => {
                rep.missing(SC, "reshard", "changes_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("catchup/reshard failed: {e:#}"));
            }
        }
    }
    drop_dbs(topo, src_db, &["catchup_native", "catchup_reshard"]).await;
    Ok(())
}

async fn run_reshard_catchup(
    topo: &Topology,
    s: &daemon::Setup,
    target: reshard_engine::Lsn,
    set: &Settings,
) -> Result<(Duration, crate::procstat::Samples)> {
    let local = topo.source.is_local();
    let t0 = Instant::now();
    let mut d = s.spawn(true)?;
    let sampler = Sampler::start(
        if local {
            Some(topo.source.connect("postgres").await?)
        } else {
            None
        },
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
/// pipes, by native initial sync and by `reshard run`.
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
    let mib: i64 = src
        .query_one(
            "SELECT (sum(pg_total_relation_size(c.oid)) / 1048576)::bigint FROM pg_class c \
             JOIN pg_namespace s ON s.oid = c.relnamespace \
             WHERE s.nspname = 'public' AND c.relkind = 'r'",
            &[],
        )
        .await?
        .get(0);
    rep.add(SC, "source", "rows", src_rows as f64, "rows");
    rep.add(SC, "source", "size_mib", mib as f64, "MiB");

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
            check_counts(rep, topo, SC, "native", "fullload_native", &expected).await?;
        }
        Err(e) => rep.missing(SC, "native", "rows_per_sec", &format!("{e:#}")),
    }
    native::drop_all(topo, src_db, "fullload_native", "rb_native_fl").await;
    drop_shard_dbs(topo, "fullload_native").await;

    if set.with_reshard {
        eprintln!("[fullload] reshard run (full load)");
        setup::prepare_shards(topo, "fullload_reshard").await?;
        let res = async {
            let s = daemon::write_config(
                &set.reshard_bin,
                &set.work_dir,
                topo,
                src_db,
                "fullload_reshard",
                "rb_reshard_fl",
            )?;
            let t = Instant::now();
            let mut d = s.spawn(false)?;
            let sampler = Sampler::start(
                None,
                Watch {
                    pid: Some(d.pid()),
                    ..Default::default()
                },
            );
            let res = daemon::wait_counts(topo, &s, &mut d, &expected, set.timeout()).await;
            let samples = sampler.finish().await;
            d.stop(Duration::from_secs(20));
            daemon::drop_slot(topo, src_db, &s.slot).await;
            Ok::<_, anyhow::Error>((res? - t, samples))
        }
        .await;
        match res {
            Ok((el, samples)) => {
                rep.add(SC, "reshard", "seconds", secs(el), "s");
                rep.add(
                    SC,
                    "reshard",
                    "rows_per_sec",
                    src_rows as f64 / secs(el),
                    "rows/s",
                );
                if let Some(c) = samples.process_cpu {
                    rep.add(SC, "reshard", "process_cpu_s", c, "s");
                }
                if let Some(h) = samples.process_hwm_kib {
                    rep.add(SC, "reshard", "peak_rss_mib", h as f64 / 1024.0, "MiB");
                }
            }
            Err(e) => {
                rep.missing(SC, "reshard", "rows_per_sec", &format!("{e:#}"));
                rep.notes.push(format!("fullload/reshard failed: {e:#}"));
            }
        }
        drop_shard_dbs(topo, "fullload_reshard").await;
    }
    let _ = topo.source.drop_db(src_db).await;
    Ok(())
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

    // Start the pipeline and wait until it streams.
    let mut d = None;
    let mut rs = None;
    if who == "native" {
        native::create_publications(topo, &src_db, &prefix).await?;
        native::create_subscriptions(
            topo,
            &src_db,
            &what,
            &prefix,
            native::SubOptions {
                copy_data: false,
                enabled: true,
            },
        )
        .await?;
        let now = setup::fence(&src).await?;
        native::wait_confirmed(topo, &src_db, &prefix, now, set.timeout()).await?;
    } else {
        let s = daemon::write_config(
            &set.reshard_bin,
            &set.work_dir,
            topo,
            &src_db,
            &what,
            &prefix,
        )?;
        s.create_slot()?;
        let mut daemon = s.spawn(true)?;
        let now = setup::fence(&src).await?;
        daemon::wait_progress(topo, &s, &mut daemon, now, set.timeout()).await?;
        d = Some(daemon);
        rs = Some(s);
    }
    // Warm-up (not measured): the first writes to each table make every contestant resolve
    // relations, and reshard introspect target tables and create its staging tables. Only
    // probes written after the warm-up is applied count.
    let mut warm = set.clone();
    warm.steady_secs = 2;
    write_steady(topo, &src_db, &warm, rate).await?;
    let warm_end = setup::fence(&src).await?;
    if let (Some(daemon), Some(s)) = (d.as_mut(), rs.as_ref()) {
        daemon::wait_progress(topo, s, daemon, warm_end, set.timeout()).await?;
    } else {
        native::wait_confirmed(topo, &src_db, &prefix, warm_end, set.timeout()).await?;
    }
    let measure_from: String = src
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .context("reading the source clock")?
        .get(0);
    let sampler = Sampler::start(
        None,
        Watch {
            pid: d.as_ref().map(daemon::Daemon::pid),
            spill_dir: rs.as_ref().map(|s| s.spill_dir.clone()),
            ..Default::default()
        },
    );

    eprintln!(
        "[steady] {who}: writing {rate} changes/s for {} s",
        set.steady_secs
    );
    let (written, probes, el) = write_steady(topo, &src_db, set, rate).await?;
    let end = setup::fence(&src).await?;
    let drained = if let (Some(daemon), Some(s)) = (d.as_mut(), rs.as_ref()) {
        daemon::wait_progress(topo, s, daemon, end, set.timeout()).await
    } else {
        native::wait_confirmed(topo, &src_db, &prefix, end, set.timeout()).await
    };
    let samples = sampler.finish().await;
    if let Some(daemon) = d {
        daemon.stop(Duration::from_secs(20));
    }
    let achieved = written as f64 / secs(el);
    rep.add(SC, who, "achieved_changes_per_sec", achieved, "changes/s");
    if achieved < 0.9 * rate as f64 {
        rep.notes.push(format!(
            "steady/{who}: the writer reached only {achieved:.0} of {rate} changes/s on this \
             machine (it shares the CPUs with the servers and the consumer); latency is for \
             the achieved rate"
        ));
    }
    rep.add(SC, who, "probes", probes as f64, "rows");
    if let Some(b) = samples.spill_max_bytes {
        rep.add(SC, who, "spill_high_water_mib", b as f64 / 1048576.0, "MiB");
    }
    let res = match drained {
        Ok(_) => latency(topo, &what, rep, who, &measure_from).await,
        Err(e) => Err(e),
    };
    if who == "native" {
        native::drop_all(topo, &src_db, &what, &prefix).await;
    } else {
        daemon::drop_slot(topo, &src_db, &prefix).await;
    }
    drop_dbs(topo, &src_db, &[&what]).await;
    res
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
    let accounts = set.accounts as i64;
    let probe_iv = Duration::from_millis(set.probe_interval_ms.max(1));
    let probes = tokio::spawn(async move {
        let stmt = prober
            .prepare("INSERT INTO bench_latency (account_id) VALUES ($1)")
            .await?;
        let mut iv = tokio::time::interval(probe_iv);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let t0 = Instant::now();
        let mut k = 0i64;
        while t0.elapsed() < dur {
            iv.tick().await;
            prober.execute(&stmt, &[&(1 + k % accounts)]).await?;
            k += 1;
        }
        anyhow::Ok(k as u64)
    });
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

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits. (A histogram made
/// with `Histogram::new` only grows on `record`; `saturating_record` would clamp to its
/// initial range.)
fn hist() -> Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("creating a histogram")
}

/// Per-shard and overall commit-to-apply latency of the probes.
async fn latency(
    topo: &Topology,
    what: &str,
    rep: &mut Report,
    who: &str,
    measure_from: &str,
) -> Result<()> {
    const SC: &str = "steady";
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
                SC,
                who,
                &format!("p99_ms shard{k}"),
                "no probe reached this shard",
            );
            continue;
        }
        rep.add(
            SC,
            who,
            &format!("p50_ms shard{k}"),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            "ms",
        );
        rep.add(
            SC,
            who,
            &format!("p99_ms shard{k}"),
            h.value_at_quantile(0.99) as f64 / 1000.0,
            "ms",
        );
        rep.add(
            SC,
            who,
            &format!("max_ms shard{k}"),
            h.max() as f64 / 1000.0,
            "ms",
        );
    }
    if !all.is_empty() {
        rep.add(
            SC,
            who,
            "p50_ms",
            all.value_at_quantile(0.5) as f64 / 1000.0,
            "ms",
        );
        rep.add(
            SC,
            who,
            "p99_ms",
            all.value_at_quantile(0.99) as f64 / 1000.0,
            "ms",
        );
        rep.add(SC, who, "max_ms", all.max() as f64 / 1000.0, "ms");
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

/// The goals, from the recorded figures.
pub fn compare(rep: &mut Report, n: usize) {
    let g = |r: &Report, s: &str, c: &str, m: &str| r.get(s, c, m);
    let (a, b) = (
        g(rep, "catchup", "reshard", "changes_per_sec"),
        g(rep, "catchup", "native", "changes_per_sec"),
    );
    rep.compare(
        "catchup",
        "catch-up rate vs native fan-out",
        a,
        b,
        "changes/s",
        "ratio >= 1.0",
        |a, b| a >= b,
    );
    let c = g(rep, "catchup", "ceiling", "changes_per_sec");
    rep.compare(
        "catchup",
        "catch-up rate vs one-slot read ceiling",
        a,
        c,
        "changes/s",
        "ratio >= 0.9",
        |a, b| a >= 0.9 * b,
    );
    let (a, b) = (
        g(rep, "fullload", "reshard", "rows_per_sec"),
        g(rep, "fullload", "raw-copy", "rows_per_sec"),
    );
    rep.compare(
        "fullload",
        "full-load rate vs raw filtered COPY",
        a,
        b,
        "rows/s",
        "ratio >= 0.9",
        |a, b| a >= 0.9 * b,
    );
    let c = g(rep, "fullload", "native", "rows_per_sec");
    rep.compare(
        "fullload",
        "full-load rate vs native initial sync",
        a,
        c,
        "rows/s",
        "ratio >= 1.0",
        |a, b| a >= b,
    );
    let (a, b) = (
        g(rep, "steady", "reshard", "p99_ms"),
        g(rep, "steady", "native", "p99_ms"),
    );
    rep.compare(
        "steady",
        "p99 commit-to-apply latency vs native",
        a,
        b,
        "ms",
        "reshard p99 < 250 ms",
        |a, _| a < 250.0,
    );
    let (a, b) = (
        g(rep, "cost", "reshard", "walsender_cpu_s_per_1M_changes"),
        g(rep, "cost", "native", "walsender_cpu_s_per_1M_changes"),
    );
    let goal = format!("ratio <= 1/{n}");
    rep.compare(
        "cost",
        "source walsender CPU per change vs native fan-out",
        a,
        b,
        "s per 1M changes",
        &goal,
        move |a, b| a <= b / n as f64 * 1.0001,
    );
}
