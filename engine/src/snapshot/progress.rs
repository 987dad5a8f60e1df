//! Progress of the full load, published through a `tokio::sync::watch` channel.
//!
//! In: the copy workers update a table's counters after each batch and each chunk. Out: a
//! [`FullLoadProgress`] snapshot that the CLI renders (bars on a TTY, [`render_line`] log lines
//! otherwise). Nothing here blocks a worker: `watch` keeps only the latest value.

use tokio::time::Instant;

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
    fn finished_needs_every_table_done() {
        let mut p = FullLoadProgress::default();
        p.tables.push(TableProgress::new("a".into(), 1));
        assert!(!p.finished());
        p.tables[0].state = TableState::AlreadyDone;
        assert!(p.finished());
        assert!(p.table("a").is_some());
    }
}
