//! Progress of the full load, published through a `tokio::sync::watch` channel.
//!
//! In: the copy workers update a table's counters after each batch and each chunk. Out: a
//! [`FullLoadProgress`] snapshot that the CLI renders (bars on a TTY, [`render_line`] log lines
//! otherwise). Nothing here blocks a worker: `watch` keeps only the latest value.

use tokio::time::Instant;

use crate::status::ThrottleView;

/// Where a table is in the load.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TableState {
    /// Waiting for a copy worker.
    Pending,
    /// At least one chunk is being copied.
    Copying,
    /// Every chunk is on every shard.
    Done,
    /// Finished by an earlier run; not copied again.
    AlreadyDone,
}

impl TableState {
    /// Lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Pending => "pending",
            TableState::Copying => "copying",
            TableState::Done => "done",
            TableState::AlreadyDone => "already done",
        }
    }
}

/// One table's progress.
#[derive(Clone, Debug, PartialEq)]
pub struct TableProgress {
    /// Source table, `schema.table`.
    pub table: String,
    /// State.
    pub state: TableState,
    /// Source rows read and written to their shard(s) in this run.
    pub rows_copied: u64,
    /// COPY text bytes read from the source in this run.
    pub bytes: u64,
    /// Chunks committed on every shard (in this run, or by an earlier run for
    /// [`TableState::AlreadyDone`]).
    pub chunks_done: u32,
    /// Chunks in the plan.
    pub chunks_total: u32,
    /// Average rows per second since the table's first chunk started.
    pub rows_per_sec: f64,
    /// When the first chunk started (not serialized; for the rate).
    pub started: Option<Instant>,
}

impl TableProgress {
    pub(crate) fn new(table: String, chunks_total: u32) -> TableProgress {
        TableProgress {
            table,
            state: TableState::Pending,
            rows_copied: 0,
            bytes: 0,
            chunks_done: 0,
            chunks_total,
            rows_per_sec: 0.0,
            started: None,
        }
    }

    pub(crate) fn add(&mut self, rows: u64, bytes: u64) {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        if self.state == TableState::Pending {
            self.state = TableState::Copying;
        }
        self.rows_copied += rows;
        self.bytes += bytes;
        let secs = now.saturating_duration_since(started).as_secs_f64();
        if secs > 0.0 {
            self.rows_per_sec = self.rows_copied as f64 / secs;
        }
    }
}

/// Progress of every table of the load, in plan order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FullLoadProgress {
    /// One entry per configured table.
    pub tables: Vec<TableProgress>,
    /// Secondary indexes still to rebuild (with `defer_indexes`).
    pub indexes_pending: usize,
    /// Per shard (in shard order), its throttle: the rate in force and, when it adapts, the
    /// last health sample.
    pub throttle: Vec<ThrottleView>,
}

impl FullLoadProgress {
    /// Whether every table is done.
    pub fn finished(&self) -> bool {
        self.tables
            .iter()
            .all(|t| matches!(t.state, TableState::Done | TableState::AlreadyDone))
    }

    /// The entry for `table`.
    pub fn table(&self, table: &str) -> Option<&TableProgress> {
        self.tables.iter().find(|t| t.table == table)
    }
}

/// One log line for a table:
/// `public.events: copying 3/10 chunks, 61234 rows, 5.2 MiB, 41000 rows/s`.
pub fn render_line(t: &TableProgress) -> String {
    let mib = t.bytes as f64 / (1024.0 * 1024.0);
    format!(
        "{}: {} {}/{} chunks, {} rows, {:.1} MiB, {:.0} rows/s",
        t.table,
        t.state.as_str(),
        t.chunks_done,
        t.chunks_total,
        t.rows_copied,
        mib,
        t.rows_per_sec
    )
}

/// One log line for a shard's throttle:
/// `shard0: 4500 rows/s (floor 1000, ceiling unlimited), 12034 rows, 3 backoffs; probe 12.3 ms,
/// 4 active backends; holding back: probe latency 12.3 ms > max_probe_latency_ms 10`.
pub fn render_throttle_line(t: &ThrottleView) -> String {
    let rate = |r: Option<f64>| r.map_or("unlimited".to_owned(), |r| format!("{r:.0} rows/s"));
    let mut line = format!("{}: {}", t.shard, rate(t.rows_per_sec));
    if t.adaptive {
        line.push_str(&format!(
            " (floor {}, ceiling {}), {} rows, {} backoffs",
            t.min_rows_per_sec,
            rate(t.max_rows_per_sec.map(|c| c as f64)),
            t.rows_total,
            t.backoffs_total
        ));
        let mut signals = vec![];
        if let Some(l) = t.probe_latency_ms {
            signals.push(format!("probe {l:.1} ms"));
        }
        if let Some(n) = t.active_backends {
            signals.push(format!("{n} active backends"));
        }
        if let Some(l) = t.replica_lag_ms {
            signals.push(format!("replica lag {l:.0} ms"));
        }
        if !signals.is_empty() {
            line.push_str("; ");
            line.push_str(&signals.join(", "));
        }
        match &t.holding_back {
            Some(why) => line.push_str(&format!("; holding back: {why}")),
            None => line.push_str("; within bounds"),
        }
    } else {
        line.push_str(&format!(" (fixed), {} rows", t.rows_total));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_table_and_counts() {
        let mut t = TableProgress::new("public.events".into(), 10);
        t.add(1000, 2 * 1024 * 1024);
        t.chunks_done = 3;
        let line = render_line(&t);
        assert!(line.starts_with("public.events: copying 3/10 chunks, 1000 rows, 2.0 MiB"));
    }

    #[test]
    fn a_throttle_line_names_the_rate_the_signals_and_why() {
        let t = ThrottleView {
            shard: "shard0".into(),
            adaptive: true,
            rows_per_sec: Some(4500.0),
            max_rows_per_sec: None,
            min_rows_per_sec: 1000,
            rows_total: 12034,
            backoffs_total: 3,
            probe_latency_ms: Some(12.34),
            active_backends: Some(4),
            replica_lag_ms: None,
            holding_back: Some("probe latency 12.3 ms > max_probe_latency_ms 10".into()),
        };
        assert_eq!(
            render_throttle_line(&t),
            "shard0: 4500 rows/s (floor 1000, ceiling unlimited), 12034 rows, 3 backoffs; \
             probe 12.3 ms, 4 active backends; holding back: probe latency 12.3 ms > \
             max_probe_latency_ms 10"
        );
        let fixed = ThrottleView {
            shard: "shard1".into(),
            rows_per_sec: Some(5000.0),
            rows_total: 7,
            ..ThrottleView::default()
        };
        assert_eq!(
            render_throttle_line(&fixed),
            "shard1: 5000 rows/s (fixed), 7 rows"
        );
    }

    #[test]
    fn finished_needs_every_table_done() {
        let mut p = FullLoadProgress::default();
        p.tables.push(TableProgress::new("a".into(), 1));
        assert!(!p.finished());
        p.tables[0].state = TableState::AlreadyDone;
        assert!(p.finished());
        assert!(p.table("a").is_some());
    }
}
