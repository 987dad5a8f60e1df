//! The reverse direction, operator side: [`begin`] (at a fenced cutover: the slot and the
//! publication on the shard that carry its writes back to the source) and [`rollback`]
//! (`reshard rollback --shard S`: the source becomes authoritative for S's accounts again).
//!
//! The daemon runs the stream itself ([`crate::runtime::reverse`]); these functions only move
//! the shard's row in `reshard.reverse` ([`crate::pg::reverse`]) and the fences.
//!
//! Rollback, in order (each step idempotent, so a crash anywhere and a rerun converge):
//! 1. Fence S's accounts on S: from here on the application's writes there are refused (the
//!    fence waits for transactions already writing those tables to end).
//! 2. Mark S's present: `pg_logical_emit_message(true, 'reshard.rollback', S)` on S returns an
//!    LSN M after every write S took; the row becomes `draining` with M.
//! 3. Wait until the source's progress row `reverse:S` covers M: the source holds every write
//!    S took. A wait says what it waits for, every 10 s, with the stream's position.
//! 4. Sequences: every sequence of the replicated schemas is set on the source to at least S's
//!    value + `[cutover] sequence_gap` (never backwards), so ids drawn on the source after the
//!    rollback never collide with ids drawn on S.
//! 5. The row becomes `rolled_back`: the daemon stops the stream; the slot is dropped once no one
//!    reads it (here, or by the daemon).
//! 6. Unfence S's accounts on the source: the application writes them there again, and the
//!    forward stream (which never stopped) carries them to S from where the source now is.
//!
//! S stays fenced on S: it must take no writes until it is cut over again.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, TableMode};
use crate::error::{Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::ops::fence::{self, FenceError, FenceSide, FenceSpec};
use crate::ops::{connect, EndpointError};
use crate::pg::progress::{read_progress, source_system_id};
use crate::pg::reverse::{self as record, ReverseRow, ReverseState, ReverseTableError};

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(200);
/// How often a wait says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How often a wait asks the daemon whether the reverse stream is halted.
const HALT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The reverse direction could not be set up or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum ReverseOpError {
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
    /// `reshard.reverse`.
    #[error(transparent)]
    Table(#[from] ReverseTableError),
    /// The replicated tables could not be resolved.
    #[error(transparent)]
    Tables(crate::pg::catalog::CatalogError),
    /// Nothing to roll back.
    #[error("shard {shard} has no reverse stream: it was not cut over with `reshard cutover --shard {shard} --fence`, so the source never stopped being authoritative for its accounts; nothing to roll back")]
    NotCutOver {
        /// The shard.
        shard: String,
    },
    /// The cutover that creates the reverse stream did not finish.
    #[error("shard {shard}'s cutover did not finish creating its reverse slot: run `reshard cutover --shard {shard} --fence` again (it resumes), then roll back")]
    Unfinished {
        /// The shard.
        shard: String,
    },

    /// The source did not receive everything in time.
    #[error("the source did not receive shard {shard}'s writes up to {target} within {waited_secs:.1}s: the reverse stream is at {reached} ({behind_bytes} bytes behind); {hint}. Shard {shard} stays fenced; run rollback again to resume")]
    Timeout {
        /// The shard.
        shard: String,
        /// The shard LSN waited for.
        target: Lsn,
        /// The reverse progress reached.
        reached: Lsn,
        /// `target - reached`.
        behind_bytes: u64,
        /// Seconds waited.
        waited_secs: f64,
        /// What to check.
        hint: String,
    },
    /// The reverse stream is halted on a change that would overwrite another account's row
    /// on the source: it can never drain until the operator resolves it.
    #[error("shard {shard} cannot be rolled back now: its reverse stream is halted, so the source lacks the writes it took from {reached} on and waiting would not help. {error} Shard {shard} stays fenced; run rollback again once the stream runs (`reshard status` shows it)")]
    Halted {
        /// The shard.
        shard: String,
        /// The reverse progress on the source.
        reached: Lsn,
        /// The stream's error (the table, key, accounts and the fix).
        error: String,
    },
    /// A fence could not be installed or removed.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// The shard's sequences could not be moved onto the source.
    #[error("moving shard {shard}'s sequences onto the source: {message}")]
    Sequences {
        /// The shard.
        shard: String,
        /// Why.
        message: String,
    },
    /// The reverse stream's progress row on the source.
    #[error(transparent)]
    Progress(#[from] crate::pg::progress::ProgressError),
    /// The shard's `system_identifier` cannot be read.
    #[error("cannot read the system_identifier of shard {shard} (pg_control_system()); reshard needs it to key the reverse stream's progress: grant pg_read_all_settings or connect as a superuser")]
    NoSystemId {
        /// The shard.
        shard: String,
    },
}

impl Classify for ReverseOpError {
    fn class(&self) -> ErrorClass {
        match self {
            ReverseOpError::Endpoint(e) => e.class(),
            ReverseOpError::Table(e) => e.class(),
            ReverseOpError::Timeout { .. } => ErrorClass::Transient,
            ReverseOpError::Fence(e) => e.class(),
            ReverseOpError::Progress(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

fn qerr(endpoint: &str, what: &str) -> impl Fn(tokio_postgres::Error) -> ReverseOpError {
    let query = EndpointError::query(endpoint, what);
    move |error| ReverseOpError::Endpoint(query(error))
}

fn shard_url<'a>(config: &'a Config, shard: &str) -> Result<&'a str, ReverseOpError> {
    config
        .shards
        .iter()
        .find(|s| s.name == shard)
        .map(|s| s.url.as_str())
        .ok_or_else(|| ReverseOpError::UnknownShard {
            name: shard.to_owned(),
            known: config.shard_names(),
        })
}

/// At a fenced cutover of `shard`, once it holds the source's latest write and before the
/// application writes there: the publication (S's share of the sharded tables, no TRUNCATE)
/// and the logical slot on the shard, recorded as `streaming` in `reshard.reverse` on the
/// source. The running daemon starts streaming it within a second. Idempotent: a rerun after
/// a crash reuses what exists; a shard already streaming back is left as it is.
pub async fn begin(config: &Config, shard: &str) -> Result<ReverseRow, ReverseOpError> {
    let url = shard_url(config, shard)?;
    let src = connect("source", &config.source.url).await?;
    let sh = connect(&format!("shard {shard}"), url).await?;
    record::ensure_table(&src).await?;
    let existing = record::read(&src, shard).await?;
    let epoch = match &existing {
        Some(r) if r.state.streams() => return Ok(r.clone()),
        Some(r) if r.state == ReverseState::Starting => r.epoch,
        Some(r) => r.epoch.saturating_add(1),
        None => 1,
    };
    let shard_system_id =
        source_system_id(&sh)
            .await
            .ok_or_else(|| ReverseOpError::NoSystemId {
                shard: shard.to_owned(),
            })?;
    let mut row = ReverseRow {
        shard: shard.to_owned(),
        epoch,
        slot: record::slot_name(&config.source.slot, shard, epoch),
        publication: record::publication_name(&config.source.publication),
        shard_system_id,
        start_lsn: None,
        state: ReverseState::Starting,
        drain_lsn: None,
        sequence_floors: Default::default(),
    };
    // Recorded before anything exists on the shard, so a crash leaves a row a rerun resumes.
    record::write(&src, &row).await?;
    let targets: Vec<crate::pg::sql::TableName> = crate::pg::catalog::discover(&src, config)
        .await
        .map_err(ReverseOpError::Tables)?
        .into_iter()
        .filter(|t| t.rule.mode == TableMode::Sharded)
        .map(|t| t.rule.target)
        .collect();
    // The shard's sequences as the cutover set them, before the application writes there:
    // how far the source may go before it hands out the same ids (`status` shows the room).
    row.sequence_floors = record::read_sequence_floors(&sh, &targets).await?;
    row.start_lsn = Some(record::create_on_shard(&sh, &row, &targets).await?);
    row.state = ReverseState::Streaming;
    record::write(&src, &row).await?;
    tracing::info!(shard, slot = %row.slot, start_lsn = ?row.start_lsn, "reverse replication set up: the shard's writes from here on stream back to the source");
    Ok(row)
}
/// What to roll back.
#[derive(Debug, Clone)]
pub struct RollbackOptions {
    /// The shard.
    pub shard: String,
    /// Longest wait for the reverse stream to drain.
    pub timeout: Duration,
}

/// The outcome of a rollback.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// The shard.
    pub shard: String,
    /// The reverse epoch rolled back.
    pub epoch: i32,
    /// The shard LSN the source had to reach (every write S took is below it).
    pub drain_lsn: Option<Lsn>,
    /// The reverse progress on the source when it got there.
    pub reached_lsn: Lsn,
    /// Seconds spent waiting for the drain.
    pub waited_secs: f64,
    /// The shard's sequences, pushed onto the source.
    pub sequences: Vec<crate::ops::cutover::SequenceSync>,
    /// Whether the reverse slot on the shard is gone (else the daemon drops it).
    pub slot_dropped: bool,
    /// The rows the reverse stream applied to the source over its life (from the progress
    /// row's position, not counted here): the shard fenced on itself, unfenced on the source.
    pub shard_fenced: bool,
    /// Whether this run found the rollback already done up to the unfence (a rerun).
    pub resumed: bool,
}

/// `reshard rollback --shard S` (see the module doc for the steps).
pub async fn rollback(
    config: &Config,
    opts: &RollbackOptions,
) -> Result<RollbackReport, ReverseOpError> {
    let shard = opts.shard.as_str();
    let url = shard_url(config, shard)?;
    let endpoint = format!("shard {shard}");
    let mut src = connect("source", &config.source.url).await?;
    let mut sh = connect(&endpoint, url).await?;
    let mut row = match record::read(&src, shard).await? {
        None => {
            return Err(ReverseOpError::NotCutOver {
                shard: shard.to_owned(),
            })
        }
        Some(r) if r.state == ReverseState::Starting => {
            return Err(ReverseOpError::Unfinished {
                shard: shard.to_owned(),
            })
        }
        Some(r) => r,
    };
    let mut report = RollbackReport {
        shard: shard.to_owned(),
        epoch: row.epoch,
        drain_lsn: row.drain_lsn,
        reached_lsn: Lsn::ZERO,
        waited_secs: 0.0,
        sequences: Vec::new(),
        slot_dropped: false,
        shard_fenced: false,
        resumed: row.state == ReverseState::RolledBack,
    };

    // 1. Fence on the shard (again, on a rerun: idempotent).
    let spec = FenceSpec::for_shard(config, &src, shard, "rollback").await?;
    fence::install(&mut sh, &spec).await?;
    report.shard_fenced = true;
    crash_point("rollback:fenced");

    if row.state != ReverseState::RolledBack {
        // 2. The marker.
        let m: String = sh
            .query_one(
                "SELECT pg_logical_emit_message(true, 'reshard.rollback', $1)::text",
                &[&shard],
            )
            .await
            .map_err(qerr(
                &endpoint,
                "marking the drain position (pg_logical_emit_message)",
            ))?
            .get(0);
        let target: Lsn = m.parse().unwrap_or_default();
        row.state = ReverseState::Draining;
        row.drain_lsn = Some(target);
        record::write(&src, &row).await?;
        report.drain_lsn = Some(target);
        crash_point("rollback:draining");

        // 3. Wait for the source to hold it.
        let started = Instant::now();
        report.reached_lsn = wait_drained(config, &src, &row, target, opts.timeout).await?;
        report.waited_secs = started.elapsed().as_secs_f64();
        crash_point("rollback:drained");

        // 4. Sequences: the shard's onto the source.
        let rules: Vec<_> = crate::pg::catalog::discover(&src, config)
            .await
            .map_err(ReverseOpError::Tables)?
            .into_iter()
            .map(|t| t.rule)
            .collect();
        let mut schemas: Vec<String> = rules.iter().map(|r| r.source.schema.clone()).collect();
        schemas.sort();
        schemas.dedup();
        // `sync_sequences(from, to, …)`: here from the shard to the source.
        report.sequences = crate::ops::cutover::sync_sequences(
            &sh,
            &src,
            "source",
            &schemas,
            config.cutover.sequence_gap,
        )
        .await
        .map_err(|e| ReverseOpError::Sequences {
            shard: shard.to_owned(),
            message: e.to_string(),
        })?;

        // 5. Over.
        row.state = ReverseState::RolledBack;
        record::write(&src, &row).await?;
        crash_point("rollback:rolled_back");
    } else if let Ok(Some(p)) = read_progress(
        &src,
        &row.slot,
        &row.progress_shard(),
        Some(&row.shard_system_id),
    )
    .await
    {
        report.reached_lsn = p.commit_lsn;
    }
    report.slot_dropped = drop_slot_when_released(&sh, &row).await;

    // 6. The source takes S's accounts again.
    fence::remove(
        &mut src,
        FenceSide::Source,
        shard,
        Duration::from_millis(config.cutover.fence_lock_timeout_ms),
    )
    .await?;
    crash_point("rollback:unfenced");
    Ok(report)
}

/// Whether the daemon's reverse stream of `shard` is halted (a change that would overwrite
/// another account's row on the source): its error. `None` if it runs, or the daemon does not
/// answer (then the wait says what it waits for and times out).
async fn halted(config: &Config, shard: &str) -> Option<String> {
    let snap = crate::ops::observe::query_admin(config).await.ok()?;
    let v = snap.reverse.into_iter().find(|v| v.shard == shard)?;
    (v.stream == "halted").then(|| v.last_error.unwrap_or_default())
}

/// Waits until the source's progress row of the reverse stream covers `target`.
async fn wait_drained(
    config: &Config,
    src: &Client,
    row: &ReverseRow,
    target: Lsn,
    timeout: Duration,
) -> Result<Lsn, ReverseOpError> {
    let started = Instant::now();
    let mut next_report = started;
    let mut next_halt_check = started;
    let mut halt_seen: Option<(Lsn, String)> = None;
    let progress_shard = row.progress_shard();
    loop {
        let reached = read_progress(src, &row.slot, &progress_shard, Some(&row.shard_system_id))
            .await?
            .map(|p| p.commit_lsn)
            .unwrap_or(Lsn::ZERO);
        if reached.covers(target) {
            return Ok(reached);
        }
        let active: Option<bool> = None;
        let hint = daemon_hint(active);
        if Instant::now() >= next_halt_check {
            next_halt_check = Instant::now() + HALT_CHECK_EVERY;
            // Halted at two checks in a row with no progress in between: not a snapshot the
            // daemon took before the stream went on.
            let now = halted(config, &row.shard).await.map(|e| (reached, e));
            if let (Some((before, _)), Some((after, error))) = (&halt_seen, &now) {
                if before == after {
                    return Err(ReverseOpError::Halted {
                        shard: row.shard.clone(),
                        reached,
                        error: error.clone(),
                    });
                }
            }
            halt_seen = now;
        }
        if Instant::now() >= next_report {
            tracing::info!(
                shard = %row.shard,
                slot = %row.slot,
                "rollback: waiting up to {}s for the source to receive shard {}'s writes up to {target}: the reverse stream is at {reached}, {} bytes behind; {hint}",
                timeout.saturating_sub(started.elapsed()).as_secs(),
                row.shard,
                target.bytes_since(reached),
            );
            next_report = Instant::now() + REPORT_EVERY;
        }
        if started.elapsed() >= timeout {
            return Err(ReverseOpError::Timeout {
                shard: row.shard.clone(),
                target,
                reached,
                behind_bytes: target.bytes_since(reached),
                waited_secs: started.elapsed().as_secs_f64(),
                hint,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn daemon_hint(_active: Option<bool>) -> String {
    "the reverse stream runs inside `reshard run`: check that it is up (`reshard status` shows the reverse direction)".to_owned()
}

/// Drops the reverse slot once the daemon stopped reading it (it polls `reshard.reverse` every
/// second); after 10 s the daemon is left to drop it. Returns whether it is gone.
async fn drop_slot_when_released(sh: &Client, row: &ReverseRow) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match record::drop_on_shard(sh, row).await {
            Ok(true) => return true,
            Ok(false) | Err(_) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            r => {
                tracing::info!(shard = %row.shard, slot = %row.slot, reason = ?r.err().map(|e| e.to_string()), "the reverse slot is still read; the daemon drops it once its stream stopped");
                return false;
            }
        }
    }
}

fn crash_point(step: &str) {
    super::crash_point(step);
}
