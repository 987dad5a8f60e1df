//! The running daemon's status: one [`StatusSnapshot`] built from the stages' counters, the
//! shards' reports, the spill log and the full load's progress (what `SHOW STATUS`, the
//! metrics endpoint and `reshard status` show).
//!
//! In: the [`Supervisor`]'s view of the stages. Out: a [`StatusSnapshot`], with per-shard lag
//! and smoothed rates ([`Rates`]). Invariant: an idle shard whose progress covers the spill
//! log's durable position (its heartbeat stops one byte below, see `spill`) is caught up, not
//! one byte behind.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::apply::ApplyState;
use crate::event::pg_now;
use crate::runtime::supervisor::Supervisor;
use crate::status::{
    Phase, ShardState, ShardView, SourceStatus, SpillView, StatusSnapshot, TableView,
};

impl Supervisor {
    /// The status now; `rates` carries the previous counters between calls.
    pub(super) fn snapshot(&self, src: &SourceStatus, rates: &mut Rates) -> StatusSnapshot {
        let c = &self.counters;
        let received = c.received().max(c.confirmed());
        let spill = self.log.stats();
        let now = pg_now();
        let loading = self.load.done.borrow().is_none();
        let at_cap = c.backpressure.load(Ordering::Relaxed);
        let operator = c.paused.load(Ordering::Relaxed);
        // The writer waiting for space is blocked inside a write: the ingest's own flag
        // cannot say so, the spill log's can.
        let backpressure = at_cap || spill.disk_full;
        let pause_reason = if spill.disk_full {
            Some(format!(
                "the spill filesystem is full ({}): waiting for shards to apply and retention to free segments",
                self.cfg.spill.dir.display()
            ))
        } else if at_cap {
            Some(format!(
                "the spill log reached [spill] max_bytes ({} bytes): waiting for shards to apply their backlog",
                self.cfg.spill.max_bytes
            ))
        } else if operator {
            Some("paused by the operator (RESUME on the admin console)".to_owned())
        } else {
            None
        };
        let phase = if self.shutdown_rx.is_requested() {
            Phase::Stopping
        } else if loading {
            Phase::FullLoad
        } else if backpressure || operator {
            Phase::Paused
        } else {
            Phase::Streaming
        };
        let changes = c.changes.load(Ordering::Relaxed);
        let mut shards = Vec::with_capacity(self.shards.len());
        for (i, s) in self.shards.iter().enumerate() {
            let st = s.status.borrow().clone();
            let state = if s.error.is_some() {
                ShardState::Stopped
            } else if loading {
                ShardState::Waiting
            } else {
                match st.state {
                    ApplyState::Starting => ShardState::Waiting,
                    ApplyState::Running => ShardState::Running,
                    // Halted: only side streams guard rows of other owners.
                    ApplyState::Retrying | ApplyState::Halted => ShardState::Retrying,
                    ApplyState::WaitingForDdl => ShardState::WaitingForDdl,
                    ApplyState::Paused => ShardState::Paused,
                    ApplyState::Stopped => ShardState::Stopped,
                }
            };
            let applied = st.applied_commit_lsn;
            // An idle shard's heartbeat stops just below `durable_lsn` (see `spill`): that is
            // caught up, not one byte (and ever more seconds) behind.
            let caught_up = applied.max(st.quiet_through).covers(spill.durable_lsn);
            let lag_bytes = if caught_up {
                0
            } else {
                received.bytes_since(applied)
            };
            let lag_seconds = match st.last_commit_time {
                Some(t) if !caught_up => ((now - t).max(0) as f64) / 1e6,
                None if !caught_up && lag_bytes > 0 => self.started.elapsed().as_secs_f64(),
                _ => 0.0,
            };
            let (p50, p99, max) = super::supervisor::current_latency(&s.latency)
                .and_then(|h| {
                    h.lock().ok().map(|h| {
                        (
                            h.value_at_quantile(0.5) as f64 / 1e3,
                            h.value_at_quantile(0.99) as f64 / 1e3,
                            h.max() as f64 / 1e3,
                        )
                    })
                })
                .unwrap_or((0.0, 0.0, 0.0));
            let rows = st.rows_inserted + st.rows_updated + st.rows_deleted;
            let rps = rates.shard_rate(i, rows);
            shards.push(ShardView {
                name: s.name.clone(),
                state,
                applied_lsn: applied,
                last_commit_time: st.last_commit_time,
                lag_bytes,
                lag_seconds,
                txns_applied_total: st.txns_applied,
                rows_inserted_total: st.rows_inserted,
                rows_updated_total: st.rows_updated,
                rows_deleted_total: st.rows_deleted,
                batches_total: st.batches,
                replays_total: st.replays,
                transient_errors_total: st.retries,
                definite_errors_total: u64::from(s.error.is_some()),
                rows_per_sec: rps,
                avg_batch_txns: if st.batches > 0 {
                    st.txns_applied as f64 / st.batches as f64
                } else {
                    0.0
                },
                latency_p50_ms: p50,
                latency_p99_ms: p99,
                latency_max_ms: max,
                last_error: s.error.clone().or(st.last_error),
                stopped_by_last_run: false,
            });
        }
        let progress = self.load.progress.as_ref().map(|p| p.borrow().clone());
        let tables = self
            .tables
            .iter()
            .map(|t| {
                let p = progress.as_ref().and_then(|p| {
                    p.tables
                        .iter()
                        .find(|x| x.table == t.rule.source.to_string())
                });
                TableView {
                    name: t.rule.source.to_string(),
                    target: t.rule.target.to_string(),
                    mode: t.rule.mode.to_string(),
                    state: p.map(|p| p.state.as_str().to_owned()).unwrap_or_else(|| {
                        if loading {
                            "pending".into()
                        } else {
                            "streaming".into()
                        }
                    }),
                    rows_copied: p.map(|p| p.rows_copied).unwrap_or(0),
                    rows_estimated: t.estimated_rows.max(0) as u64,
                    bytes_copied: p.map(|p| p.bytes).unwrap_or(0),
                }
            })
            .collect();
        rates.high_water = rates.high_water.max(spill.bytes_on_disk);
        let confirmed = src.confirmed_flush_lsn.max(c.confirmed());
        StatusSnapshot {
            phase,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            source: SourceStatus {
                slot: self.cfg.source.slot.clone(),
                publication: self.cfg.source.publication.clone(),
                system_id: self.system_id.clone(),
                confirmed_flush_lsn: confirmed,
                // Sampled by the supervisor every few seconds, while `confirmed` is this
                // instant's: the source's WAL is at least where the slot is confirmed, so an
                // older sample below it is raised to it (never "current below confirmed").
                current_wal_lsn: src.current_wal_lsn.max(confirmed),
                retained_wal_bytes: src.retained_wal_bytes,
                received_lsn: c.received(),
                bytes_received_total: c.bytes_received.load(Ordering::Relaxed),
                txns_received_total: c.txns.load(Ordering::Relaxed),
                changes_received_total: changes,
                changes_per_sec: rates.source_rate(changes),
                backpressure,
                pause_reason,
                connected: c.connected.load(Ordering::Relaxed),
                last_error: src.last_error.clone(),
                fences: src.fences.clone(),
            },
            shards,
            tables,
            spill: SpillView {
                dir: self.cfg.spill.dir.display().to_string(),
                bytes: spill.bytes_on_disk,
                max_bytes: self.cfg.spill.max_bytes,
                segments: spill.segments,
                durable_lsn: spill.durable_lsn,
                oldest_unapplied_lsn: spill
                    .shards
                    .iter()
                    .filter_map(|s| s.oldest_unapplied_lsn)
                    .min(),
                backpressure_active: spill.backpressure_active,
                disk_full: spill.disk_full,
                fsyncs_total: spill.fsyncs_total,
                txns_per_fsync: spill.txns_per_fsync_avg,
                high_water_bytes: rates.high_water,
            },
            quarantine: self.quarantine.tables(),
            account_map: self
                .map_status
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            reverse: self.reverse.views.borrow().clone(),
            // The full load's throttles, while it runs (afterwards they hold nothing back).
            throttle: match (&progress, loading) {
                (Some(p), true) => p.throttle.clone(),
                _ => vec![],
            },
            // A rebalance never runs beside the daemon (its moves refuse while it streams):
            // the offline status reads it from reshard.rebalance.
            rebalance: Vec::new(),
        }
    }
}

/// Recent rates from cumulative counters (an exponentially smoothed per-second rate).
#[derive(Clone, Default)]
pub struct Rates {
    last: Option<Instant>,
    source: (u64, f64),
    shards: Vec<(u64, f64)>,
    high_water: u64,
}

impl Rates {
    fn rate(prev: &mut (u64, f64), now_total: u64, dt: f64) -> f64 {
        if dt > 0.0 {
            let r = now_total.saturating_sub(prev.0) as f64 / dt;
            prev.1 = if prev.1 == 0.0 {
                r
            } else {
                0.7 * prev.1 + 0.3 * r
            };
        }
        prev.0 = now_total;
        prev.1
    }

    fn dt(&self) -> f64 {
        self.last.map(|l| l.elapsed().as_secs_f64()).unwrap_or(0.0)
    }

    fn source_rate(&mut self, total: u64) -> f64 {
        let dt = self.dt();
        let r = Self::rate(&mut self.source, total, dt);
        self.last = Some(Instant::now());
        r
    }

    fn shard_rate(&mut self, i: usize, total: u64) -> f64 {
        let dt = self.dt();
        if self.shards.len() <= i {
            self.shards.resize(i + 1, (0, 0.0));
        }
        Self::rate(&mut self.shards[i], total, dt)
    }
}
