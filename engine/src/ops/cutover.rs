//! Cutover of one shard (`reshard cutover --shard S [--fence]`).
//!
//! In: the config, the shard's name, a timeout. Out: a [`CutoverReport`] saying whether the
//! application may now send that shard's accounts to it.
//!
//! Steps, in order (each one is a precondition of the next):
//! 0. With `--fence`: fence the shard's accounts on the source ([`crate::ops::fence`]): from the
//!    fence's commit on, the source refuses every write that routes to the shard, so the
//!    marker of step 1 is the last source position the shard ever needs; the race between the
//!    wait and the application's flag flip is closed. The fence stays after the cutover (the
//!    application sends those accounts to the shard now); only `reshard unfence` or a rollback
//!    lifts it.
//! 1. Mark the source's present: `pg_logical_emit_message(true, 'reshard.cutover', S)`
//!    returns the LSN M of a WAL record written after every transaction that committed
//!    before the cutover started (<https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-REPLICATION>).
//! 2. Wait until the shard's progress row says `commit_lsn >= M - 1`: every source commit below M
//!    is then applied there (polled every 5 ms at first, backing off to 200 ms, up to the
//!    timeout). The marker's own transaction is routed to every shard, so a caught-up shard
//!    commits past M at once. A shard without a progress
//!    row yet (the daemon is still in its full load, or just starting) is waited for too; what
//!    the wait is for, and what the daemon is doing, is logged once the wait has lasted 250 ms,
//!    and every 10 s.
//! 3. Sequences: every sequence of the replicated schemas is set on the shard to at least the
//!    source's `last_value` + `[cutover] sequence_gap`, never moved backwards
//!    (`setval(seq, GREATEST(shard's value, source's + gap))`).
//! 4. Verify that shard (unless `--no-verify`) and count its rows.
//!
//! When the shard is fenced on the source (by `--fence` or an earlier `reshard fence`), every
//! step is recorded in the fence's row (`reshard.fence.step`: `fenced`, `caught_up`,
//! `sequences_synced`, `safe` or `not_safe`) and in `reshard.fence_log`, so `status` shows where
//! a cutover stands. Every step is idempotent (the fence install keeps its first
//! `installed_at`, the wait takes a fresh marker, sequences only move forward, verify reads),
//! so a cutover killed at any step is resumed by running the same command again; `unfence`
//! undoes the fence at any point.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, HashKind};
use crate::error::{Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::ops::fence::{self, Fence, FenceError, FenceSide, FenceSpec};
use crate::ops::verify::{
    self, load_account_map, KeyRouter, ProgressWait, VerifyError, VerifyOptions, VerifyReport,
    Waited,
};
use crate::ops::{connect, EndpointError};
use crate::pg::conn::{current_insert_lsn, emit_marker, error_text, quote_literal};
use crate::pg::progress::source_system_id;
use crate::pg::sql::TableName;

/// What to cut over.
#[derive(Clone)]
pub struct CutoverOptions {
    /// Shard name.
    pub shard: String,
    /// Longest wait for the shard to catch up.
    pub timeout: Duration,
    /// Run `verify` on the shard after syncing sequences.
    pub verify: bool,
    /// Router for `hash = "map"`.
    pub router: Option<std::sync::Arc<KeyRouter>>,
    /// Fence the shard's accounts on the source first (step 0).
    pub fence: bool,
}

/// Cutover could not be done.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    /// `--shard` names no configured shard.
    #[error("unknown shard {name:?}; the config's shards are {known:?}")]
    UnknownShard {
        /// Name given.
        name: String,
        /// Configured names.
        known: Vec<String>,
    },
    /// An endpoint could not be reached, or a query on it failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A value read back did not parse.
    #[error("{endpoint} returned an invalid value: {message}")]
    Invalid {
        /// `source` or the shard.
        endpoint: String,
        /// What.
        message: String,
    },
    /// The shard has no progress row: reshard run has applied nothing to it within the timeout.
    #[error("shard {shard} has no progress row after waiting {waited_secs:.0}s: reshard run has not applied anything to it yet ({daemon}); start reshard run, or let its full load finish, and retry with a longer --timeout")]
    NoProgress {
        /// Shard.
        shard: String,
        /// Seconds waited.
        waited_secs: f64,
        /// What the daemon was doing.
        daemon: String,
    },
    /// The shard did not catch up in time.
    #[error("shard {shard} did not reach the cutover LSN {target} within {waited_secs:.1}s: it is at {reached}, {behind_bytes} bytes behind; check `reshard lag` and retry with a longer --timeout")]
    Timeout {
        /// Shard.
        shard: String,
        /// LSN waited for.
        target: Lsn,
        /// Progress reached.
        reached: Lsn,
        /// `target - reached`.
        behind_bytes: u64,
        /// Seconds waited.
        waited_secs: f64,
    },
    /// No `reshard run` is up to apply the shard's changes, and its progress stands still:
    /// waiting out the timeout would change nothing (with `--fence`, the application's writes
    /// of its accounts would be refused all that time).
    #[error("shard {shard} {position}, short of the cutover marker {target}, and nothing applies its changes: {daemon} (looked for {waited_secs:.0}s); start reshard run (or fix what stopped the shard, see `reshard status`) and run the cutover again: it resumes where it stopped{fence}")]
    NothingApplying {
        /// Shard.
        shard: String,
        /// LSN waited for.
        target: Lsn,
        /// Where its progress stands (`is at 0/1A2B3C`, or that it has no progress row).
        position: String,
        /// Seconds waited.
        waited_secs: f64,
        /// What was looked for.
        daemon: String,
        /// What to do about the fence, if the shard is fenced.
        fence: String,
    },
    /// A replicated table is missing on the shard ([`crate::pg::catalog::missing_on_shard`]).
    #[error("{message}")]
    TableMissing {
        /// The shared wording, with the ways on.
        message: String,
    },
    /// The replicated tables could not be resolved (see [`crate::pg::catalog`]).
    #[error(transparent)]
    Tables(crate::pg::catalog::CatalogError),
    /// The verification could not complete.
    #[error("verify of shard {shard}: {source}")]
    Verify {
        /// Shard.
        shard: String,
        /// Why.
        source: VerifyError,
    },
    /// The reverse slot and publication could not be created on the shard.
    #[error("shard {shard}: cannot set up reverse replication (its writes streaming back to the source): {message}; the shard stays fenced on the source; fix it and run cutover again")]
    Reverse {
        /// The shard.
        shard: String,
        /// Why.
        message: String,
    },
    /// The fence could not be installed or recorded (the cutover did not start, or stopped at
    /// the step named; run it again).
    #[error("fence of shard {shard}: {source}")]
    Fence {
        /// Shard.
        shard: String,
        /// Why.
        source: FenceError,
    },
}

impl Classify for CutoverError {
    fn class(&self) -> ErrorClass {
        match self {
            CutoverError::Endpoint(e) => e.class(),
            CutoverError::Timeout { .. } => ErrorClass::Transient,
            CutoverError::Verify { source, .. } => source.class(),
            CutoverError::Tables(e) => e.class(),
            CutoverError::Fence { source, .. } => source.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// What happened to one sequence.
#[derive(Debug, Clone, Serialize)]
pub struct SequenceSync {
    /// `schema.sequence`, quoted where needed (`public.orders_id_seq`, `"Sales"."order.id"`).
    pub name: String,
    /// The source's `last_value` (`None`: never used on the source).
    pub source_value: Option<i64>,
    /// The shard's `last_value` before (`None`: never used there).
    pub shard_before: Option<i64>,
    /// The shard's `last_value` after.
    pub shard_after: Option<i64>,
    /// `set`, `unchanged` (already far enough), `unused` (never used on the source),
    /// `missing` (no such sequence on the shard), `descending` (left alone), `error: …`.
    pub action: String,
}

/// Rows of one table on the shard.
#[derive(Debug, Clone, Serialize)]
pub struct TableRows {
    /// Target table.
    pub table: String,
    /// Rows.
    pub rows: u64,
}

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    /// Safe to send the shard's accounts to it: caught up, sequences set, verified.
    pub ok: bool,
    /// Shard.
    pub shard: String,
    /// How the target LSN was taken: `logical_message` or `current_wal_lsn`.
    pub marker: String,
    /// The source LSN the shard had to reach.
    pub target_lsn: Lsn,
    /// The shard's progress when it got there.
    pub reached_lsn: Lsn,
    /// Seconds spent waiting.
    pub waited_secs: f64,
    /// Sequence gap applied.
    pub sequence_gap: i64,
    /// Sequences.
    pub sequences: Vec<SequenceSync>,
    /// Verification of the shard (absent with `--no-verify`).
    pub verify: Option<VerifyReport>,
    /// Rows on the shard per table.
    pub tables: Vec<TableRows>,
    /// The reverse slot on the shard that streams its writes back to the source (fenced
    /// cutovers only; see [`crate::ops::reverse`]).
    pub reverse_slot: Option<String>,
    /// The shard's fence on the source, as recorded at the end (absent: not fenced; the
    /// application's writes to the shard's accounts were not refused during the cutover).
    pub fence: Option<Fence>,
    /// Seconds each step took, in order (`connect`, `fence`, `marker`, `wait`,
    /// `record caught_up`, `sequences`, `verify` or `count`, `reverse`, `record verdict`):
    /// where the moment the application waits on goes.
    pub timings: Vec<StepTime>,
}

/// Seconds one step of a cutover took.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    /// The step.
    pub step: &'static str,
    /// Seconds.
    pub secs: f64,
}

/// Times the steps of one cutover, one after the other.
struct Steps {
    last: Instant,
    done: Vec<StepTime>,
}

impl Steps {
    fn start() -> Self {
        Steps {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// `step` ended now (it began when the previous one ended).
    fn end(&mut self, step: &'static str) {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        tracing::debug!(step, secs, "cutover: step took {secs:.3}s");
        self.done.push(StepTime { step, secs });
        self.last = now;
    }
}

/// How long the wait goes on while no `reshard run` is up and the shard's progress stands
/// still: long enough for a daemon being restarted, short of a 10-minute `--timeout` of
/// refused writes.
const NOTHING_APPLIES_FOR: Duration = Duration::from_secs(20);

fn qerr(endpoint: &str, what: &str) -> impl Fn(tokio_postgres::Error) -> CutoverError {
    let query = EndpointError::query(endpoint, what);
    move |error| CutoverError::Endpoint(query(error))
}

/// Runs the cutover of one shard.
pub async fn cutover(
    config: &Config,
    opts: &CutoverOptions,
) -> Result<CutoverReport, CutoverError> {
    let Some(shard_cfg) = config.shards.iter().find(|s| s.name == opts.shard) else {
        return Err(CutoverError::UnknownShard {
            name: opts.shard.clone(),
            known: config.shard_names(),
        });
    };
    let name = shard_cfg.name.as_str();
    let mut steps = Steps::start();
    let mut src = connect("source", &config.source.url).await?;
    let shard = connect(&format!("shard {name}"), &shard_cfg.url).await?;
    let system_id = source_system_id(&src).await;
    steps.end("connect");
    let ferr = |source| CutoverError::Fence {
        shard: name.to_owned(),
        source,
    };

    // 0. The fence (or the one an earlier `reshard fence` installed).
    let fenced = if opts.fence {
        let map = match config.routing.hash {
            HashKind::Map => {
                Some(
                    load_account_map(config)
                        .await
                        .map_err(|source| CutoverError::Verify {
                            shard: name.to_owned(),
                            source,
                        })?,
                )
            }
            HashKind::Postgres => None,
        };
        let spec = FenceSpec::for_source(config, &src, name, "cutover", map)
            .await
            .map_err(ferr)?;
        let f = fence::install(&mut src, &spec).await.map_err(ferr)?;
        fence::record_step(
            &src,
            FenceSide::Source,
            name,
            "fenced",
            None,
            "cutover started",
        )
        .await
        .map_err(ferr)?;
        tracing::info!(shard = name, installed_at = %f.installed_at, tables = f.tables.len(), "cutover: shard {name} is fenced on the source: its accounts' writes are refused from now on");
        true
    } else {
        fence::status(&src, FenceSide::Source)
            .await
            .map_err(ferr)?
            .iter()
            .any(|f| f.shard == name)
    };
    steps.end("fence");
    let step = |step: &'static str, lsn: Option<Lsn>, detail: String| {
        let src = &src;
        async move {
            if fenced {
                fence::record_step(src, FenceSide::Source, name, step, lsn, &detail)
                    .await
                    .map_err(|source| CutoverError::Fence {
                        shard: name.to_owned(),
                        source,
                    })?;
            }
            tracing::info!(shard = name, step, lsn = ?lsn, "cutover: {detail}");
            Ok::<(), CutoverError>(())
        }
    };

    // 1. The marker.
    let (marker, target) = match emit_marker(&src, name).await {
        Ok(lsn) => ("logical_message", lsn),
        Err(e) => {
            tracing::warn!(error = %e, "pg_logical_emit_message refused; using pg_current_wal_insert_lsn()");
            let lsn = current_insert_lsn(&src)
                .await
                .map_err(qerr("source", "reading pg_current_wal_insert_lsn()"))?;
            ("current_wal_lsn", lsn)
        }
    };
    steps.end("marker");

    // 2. Wait.
    let started = Instant::now();
    let waited = ProgressWait {
        config,
        src: &src,
        shard_client: &shard,
        shard: name,
        system_id: system_id.as_deref(),
        target,
        timeout: opts.timeout,
        who: "cutover",
        stop_when_nothing_applies: Some(NOTHING_APPLIES_FOR),
    }
    .run()
    .await;
    let reached = match waited {
        Ok(Waited::Reached(l)) => l,
        Ok(Waited::NothingApplying { reached, daemon }) => {
            return Err(CutoverError::NothingApplying {
                shard: name.to_owned(),
                target,
                position: if reached.is_zero() {
                    "has no progress row (reshard run has applied nothing to it)".to_owned()
                } else {
                    format!("is at {reached}")
                },
                waited_secs: started.elapsed().as_secs_f64(),
                daemon,
                fence: if fenced {
                    format!("; shard {name} stays fenced on the source meanwhile (`reshard unfence --shard {name}` lifts it)")
                } else {
                    String::new()
                },
            })
        }
        Err(VerifyError::Timeout {
            reached,
            waited_secs,
            daemon,
            ..
        }) if reached.is_zero() => {
            return Err(CutoverError::NoProgress {
                shard: name.to_owned(),
                waited_secs,
                daemon,
            })
        }
        Err(VerifyError::Timeout {
            reached,
            waited_secs,
            ..
        }) => {
            return Err(CutoverError::Timeout {
                shard: name.to_owned(),
                target,
                reached,
                behind_bytes: target.bytes_since(reached),
                waited_secs,
            })
        }
        Err(VerifyError::Query { error, .. }) => return Err(qerr(name, "reading progress")(error)),
        Err(e) => {
            return Err(CutoverError::Verify {
                shard: name.to_owned(),
                source: e,
            })
        }
    };
    let waited_secs = started.elapsed().as_secs_f64();
    steps.end("wait");
    step(
        "caught_up",
        Some(target),
        format!("shard {name} reached {reached} (target {target}) after {waited_secs:.1}s"),
    )
    .await?;
    steps.end("record caught_up");

    // 3. Sequences.
    let rules: Vec<_> = crate::pg::catalog::discover(&src, config)
        .await
        .map_err(CutoverError::Tables)?
        .into_iter()
        .map(|t| t.rule)
        .collect();
    let mut schemas: Vec<String> = rules.iter().map(|r| r.source.schema.clone()).collect();
    schemas.sort();
    schemas.dedup();
    let sequences =
        sync_sequences(&src, &shard, name, &schemas, config.cutover.sequence_gap).await?;
    step(
        "sequences_synced",
        None,
        format!(
            "{} sequences checked, {} set",
            sequences.len(),
            sequences.iter().filter(|s| s.action == "set").count()
        ),
    )
    .await?;
    steps.end("sequences");

    // 4. Verify and count.
    let mut report = CutoverReport {
        ok: false,
        shard: name.to_owned(),
        marker: marker.to_owned(),
        target_lsn: target,
        reached_lsn: reached,
        waited_secs,
        sequence_gap: config.cutover.sequence_gap,
        sequences,
        verify: None,
        tables: Vec::new(),
        fence: None,
        reverse_slot: None,
        timings: Vec::new(),
    };
    if opts.verify {
        let v = verify::verify(
            config,
            &VerifyOptions {
                shards: vec![name.to_owned()],
                timeout: opts.timeout,
                router: opts.router.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|source| CutoverError::Verify {
            shard: name.to_owned(),
            source,
        })?;
        for r in &v.results {
            report.tables.push(TableRows {
                table: r.target.to_string(),
                rows: r.rows_shard,
            });
        }
        report.verify = Some(v);
        steps.end("verify");
    } else {
        for r in &rules {
            let row = shard
                .query_one(&format!("SELECT count(*) FROM {}", r.target.quoted()), &[])
                .await
                .map_err(|e| {
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                        CutoverError::TableMissing {
                            message: crate::pg::catalog::missing_on_shard(&r.target, name),
                        }
                    } else {
                        qerr(name, &format!("counting rows of {}", r.target))(e)
                    }
                })?;
            let n: i64 = row.try_get(0).map_err(qerr(name, "counting rows"))?;
            report.tables.push(TableRows {
                table: r.target.to_string(),
                rows: n.max(0) as u64,
            });
        }
        steps.end("count");
    }
    // A shard without a column the source has (an ADD COLUMN not propagated yet: no change
    // of that table reached it) would break the application's reads and writes of it.
    report.ok = report
        .verify
        .as_ref()
        .is_none_or(|v| v.ok && v.missing_columns.is_empty())
        && report
            .sequences
            .iter()
            .all(|s| !s.action.starts_with("error"));
    // Reverse replication: from here on the shard's writes stream back to the source (the
    // slot exists before the application is told SAFE). Only behind a fence: without one the
    // source could still take the same accounts' writes.
    if fenced && report.ok {
        let row = crate::ops::reverse::begin(config, name)
            .await
            .map_err(|e| CutoverError::Reverse {
                shard: name.to_owned(),
                message: e.to_string(),
            })?;
        report.reverse_slot = Some(row.slot);
        steps.end("reverse");
    }
    let verdict = if report.ok { "safe" } else { "not_safe" };
    step(
        verdict,
        Some(target),
        format!(
            "shard {name} is {} at source LSN {target}",
            if report.ok { "SAFE" } else { "NOT SAFE" }
        ),
    )
    .await?;
    if fenced {
        report.fence = fence::status(&src, FenceSide::Source)
            .await
            .map_err(ferr)?
            .into_iter()
            .find(|f| f.shard == name);
    }
    steps.end("record verdict");
    report.timings = steps.done;
    Ok(report)
}

/// The expression setting `seq` to at least `want`: GREATEST with the shard's own value, so
/// never backwards, even if something used the sequence since it was read.
fn setval_expr(seq: &TableName, want: i64) -> String {
    let qseq = seq.quoted();
    format!(
        "setval({}::regclass, GREATEST({want}::int8, \
           (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {qseq})))",
        quote_literal(&qseq)
    )
}

/// Sequences set by one statement at most (PostgreSQL's SELECT list holds 1664 entries).
const SEQUENCES_PER_STATEMENT: usize = 1000;

/// Sets every sequence of `schemas` on the shard to at least the source's value + `gap`.
///
/// Three round trips for up to 1000 sequences: the source's values, the
/// shard's, and one statement setting every sequence that is behind (one per chunk beyond). If
/// such a statement fails, each of its sequences is set on its own, so the failure is named on
/// the sequence it belongs to.
pub async fn sync_sequences(
    src: &Client,
    shard: &Client,
    shard_name: &str,
    schemas: &[String],
    gap: i64,
) -> Result<Vec<SequenceSync>, CutoverError> {
    // Schema and name apart, as the catalog holds them: either may contain a dot or spaces,
    // so `schema || '.' || name` cannot be split back into the sequence it names.
    const SEQUENCES: &str = "SELECT schemaname, sequencename, last_value, increment_by \
         FROM pg_sequences WHERE schemaname = ANY($1) ORDER BY 1, 2";
    let name_of = |r: &tokio_postgres::Row| -> Result<TableName, tokio_postgres::Error> {
        Ok(TableName::new(
            r.try_get::<_, String>(0)?,
            r.try_get::<_, String>(1)?,
        ))
    };
    let rows = src
        .query(SEQUENCES, &[&schemas])
        .await
        .map_err(qerr("source", "reading pg_sequences"))?;
    let on_shard: std::collections::HashMap<TableName, Option<i64>> = shard
        .query(SEQUENCES, &[&schemas])
        .await
        .map_err(qerr(shard_name, "reading pg_sequences"))?
        .iter()
        .map(|r| Ok((name_of(r)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(qerr(shard_name, "reading pg_sequences"))?;
    let mut out = Vec::with_capacity(rows.len());
    // (position in `out`, the setval expression) of every sequence to move.
    let mut to_set: Vec<(usize, String)> = Vec::new();
    for r in rows {
        let seq = name_of(&r).map_err(qerr("source", "reading pg_sequences"))?;
        let source_value: Option<i64> = r
            .try_get(2)
            .map_err(qerr("source", "reading pg_sequences"))?;
        let increment: i64 = r
            .try_get(3)
            .map_err(qerr("source", "reading pg_sequences"))?;
        let mut s = SequenceSync {
            name: seq.to_string(),
            source_value,
            shard_before: None,
            shard_after: None,
            action: String::new(),
        };
        let Some(&shard_value) = on_shard.get(&seq) else {
            s.action = "missing".into();
            out.push(s);
            continue;
        };
        s.shard_before = shard_value;
        s.shard_after = shard_value;
        if increment < 0 {
            s.action = "descending".into();
        } else if let Some(v) = source_value {
            let want = v.saturating_add(gap);
            if s.shard_before.is_some_and(|b| b >= want) {
                s.action = "unchanged".into();
            } else {
                to_set.push((out.len(), setval_expr(&seq, want)));
            }
        } else {
            s.action = "unused".into();
        }
        out.push(s);
    }
    if to_set.is_empty() {
        return Ok(out);
    }
    // One statement per chunk (a SELECT list holds at most 1664 entries); setval is not
    // transactional, and GREATEST makes a repeat harmless, so a failed chunk is set one by one.
    for chunk in to_set.chunks(SEQUENCES_PER_STATEMENT) {
        let all = format!(
            "SELECT {}",
            chunk
                .iter()
                .map(|(_, e)| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let values: Result<Vec<Option<i64>>, tokio_postgres::Error> =
            match shard.query_one(&all, &[]).await {
                Ok(row) => (0..chunk.len()).map(|i| row.try_get(i)).collect(),
                Err(e) => Err(e),
            };
        match values {
            Ok(values) => {
                for ((i, _), v) in chunk.iter().zip(values) {
                    if let Some(s) = out.get_mut(*i) {
                        s.shard_after = v;
                        s.action = "set".into();
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %error_text(&e), shard = shard_name, "setting the sequences in one statement failed; setting them one by one");
                for (i, expr) in chunk {
                    let Some(s) = out.get_mut(*i) else { continue };
                    match shard.query_one(&format!("SELECT {expr}"), &[]).await {
                        Ok(row) => {
                            s.shard_after = row.try_get(0).ok();
                            s.action = "set".into();
                        }
                        Err(e) => s.action = format!("error: {}", error_text(&e)),
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setval_names_the_sequence_by_its_catalog_schema_and_name() {
        // A dot in the schema, spaces at either end, a dot and a quote in the name: each part
        // quoted as it is, nothing split or trimmed.
        let seq = TableName::new("app.v2", " order.id \"seq\" ");
        let q = r#""app.v2"." order.id ""seq"" ""#;
        assert_eq!(
            setval_expr(&seq, 1040),
            format!(
                "setval('{q}'::regclass, GREATEST(1040::int8, (SELECT CASE WHEN is_called \
                 THEN last_value ELSE last_value - 1 END FROM {q})))"
            )
        );
        assert_eq!(seq.to_string(), q);
        assert_eq!(
            TableName::new("public", "orders_id_seq").to_string(),
            "public.orders_id_seq"
        );
    }
}
