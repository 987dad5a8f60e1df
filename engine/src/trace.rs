//! The per-stage latency trace of the forward path: a debug facility, off unless the
//! environment variable [`ENV`] names a file.
//!
//! For every source transaction it records, at each stage, the time since the source commit
//! (the commit timestamp pgoutput carries in Begin and Commit): when ingest received its Begin
//! and appended its Commit to the spill log (decoded and routed on the way), when the log
//! handed it to the shards' readers, when it was durable and confirmed to the source, and per
//! shard when the applier read its Commit, sent its target COMMIT and had it answered. Each
//! stage is a histogram; [`maybe_write()`] (called by ingest's group commit, at most every
//! [`WRITE_EVERY`]) and [`write()`] (at shutdown) rewrite the file with a table of the quantiles
//! since start, so the figures of a run are there after the process is gone.
//!
//! The clocks are the source's and this host's: on one machine (the benchmark's) they agree;
//! across hosts the figures include the clock offset.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::event::{pg_now, PgTimestamp};

/// The environment variable naming the trace's output file.
pub const ENV: &str = "RESHARD_STAGE_TRACE";

/// Shortest interval between two rewrites of the file by [`maybe_write()`].
pub const WRITE_EVERY: Duration = Duration::from_secs(2);

/// A point of a transaction's way from the source commit to its target commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The walsender sent the message carrying the transaction's Begin (its clock, from the
    /// XLogData header).
    WalSenderSent,
    /// Ingest received the transaction's Begin.
    BeginReceived,
    /// Ingest decoded, routed and appended the transaction up to its Commit.
    Appended,
    /// The spill log sealed it and handed it to the shards' readers.
    Published,
    /// It is durable in the spill log and confirmed to the source.
    Confirmed,
    /// A shard's applier read its Commit (and had folded its changes).
    Read,
    /// A shard's applier sent the target COMMIT of the group holding it.
    Sent,
    /// A shard's target COMMIT holding it was answered.
    Committed,
}

const STAGES: [Stage; 8] = [
    Stage::WalSenderSent,
    Stage::BeginReceived,
    Stage::Appended,
    Stage::Published,
    Stage::Confirmed,
    Stage::Read,
    Stage::Sent,
    Stage::Committed,
];

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::WalSenderSent => "begin sent by the walsender",
            Stage::BeginReceived => "begin received",
            Stage::Appended => "appended (decoded, routed)",
            Stage::Published => "published to readers",
            Stage::Confirmed => "durable, confirmed",
            Stage::Read => "read by the applier",
            Stage::Sent => "target COMMIT sent",
            Stage::Committed => "target COMMIT answered",
        }
    }
}

struct Trace {
    path: PathBuf,
    started: Instant,
    hists: Vec<Mutex<Histogram<u64>>>,
    last_write: Mutex<Instant>,
}

fn trace() -> Option<&'static Trace> {
    static TRACE: OnceLock<Option<Trace>> = OnceLock::new();
    TRACE
        .get_or_init(|| {
            let path = std::env::var_os(ENV).filter(|p| !p.is_empty())?;
            let hists = STAGES
                .iter()
                .map(|_| {
                    Histogram::new_with_bounds(1, 3_600_000_000, 2)
                        .ok()
                        .map(Mutex::new)
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Trace {
                path: PathBuf::from(path),
                started: Instant::now(),
                hists,
                last_write: Mutex::new(Instant::now()),
            })
        })
        .as_ref()
}

/// Whether the trace is on (checked once: [`ENV`] names a file).
pub fn enabled() -> bool {
    trace().is_some()
}

/// Records, for each of `commit_times`, the time from it to now at `stage`.
pub fn record(stage: Stage, commit_times: &[PgTimestamp]) {
    if enabled() {
        record_at(stage, pg_now(), commit_times);
    }
}

/// Records, for each of `commit_times`, the time from it to `now` at `stage`.
pub fn record_at(stage: Stage, now: PgTimestamp, commit_times: &[PgTimestamp]) {
    let Some(t) = trace() else {
        return;
    };
    let i = STAGES.iter().position(|s| *s == stage).unwrap_or(0);
    if let Ok(mut h) = t.hists[i].lock() {
        for c in commit_times {
            h.saturating_record(now.saturating_sub(*c).max(0) as u64);
        }
    }
}

/// [`write()`] if the last write is [`WRITE_EVERY`] old.
pub fn maybe_write() {
    let Some(t) = trace() else {
        return;
    };
    let due = t
        .last_write
        .lock()
        .map(|mut l| {
            let due = l.elapsed() >= WRITE_EVERY;
            if due {
                *l = Instant::now();
            }
            due
        })
        .unwrap_or(false);
    if due {
        write();
    }
}

/// Rewrites the trace file with every stage's quantiles since start (a failure is logged).
pub fn write() {
    let Some(t) = trace() else {
        return;
    };
    let mut out = format!(
        "# reshard stage latency, ms from source commit, over {:.1} s\n\
         | stage | txns | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n",
        t.started.elapsed().as_secs_f64()
    );
    for (s, h) in STAGES.iter().zip(&t.hists) {
        let Ok(h) = h.lock() else {
            continue;
        };
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            s.name(),
            h.len(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            h.max() as f64 / 1000.0
        ));
    }
    if let Err(e) = std::fs::write(&t.path, out) {
        tracing::warn!(file = %t.path.display(), env = ENV, error = %e, "cannot write the stage latency trace");
    }
}
