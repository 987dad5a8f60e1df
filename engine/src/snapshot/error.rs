//! The full load's error type: every variant names the shard, table, chunk and SQLSTATE it is
//! about and says what to do.

use crate::error::{class_of_pg, Classify, ErrorClass};

/// A boxed error from a caller-supplied connector.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the full load failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A connection could not be opened.
    #[error("cannot connect to {target}: {source}; check that it is up and the connection settings are right")]
    Connect {
        /// `source` or the shard's name.
        target: String,
        /// What the connector reported.
        source: BoxError,
    },
    /// A statement on the source failed.
    #[error("source: {context}: {}; {fix}", pg_message(.source))]
    Source {
        /// What was being done (`reading table public.events chunk 3`).
        context: String,
        /// What to do about it.
        fix: &'static str,
        /// The error.
        source: tokio_postgres::Error,
    },
    /// A statement on a shard failed.
    #[error("{shard}: {context}: {}; {fix}", pg_message(.source))]
    Shard {
        /// The shard's name.
        shard: String,
        /// What was being done (`copying table public.events chunk 3`).
        context: String,
        /// What to do about it.
        fix: &'static str,
        /// The error.
        source: tokio_postgres::Error,
    },
    /// `SET TRANSACTION SNAPSHOT` was refused: the exported snapshot no longer exists.
    #[error("source: cannot import snapshot {name}: {}; the snapshot lives only while the connection that exported it stays idle — restart the load with a new snapshot", pg_message(.source))]
    SnapshotImport {
        /// The snapshot name.
        name: String,
        /// The error.
        source: tokio_postgres::Error,
    },
    /// The source tables or target tables are not ready; one line per problem.
    #[error("the full load cannot start:\n  {}", .problems.join("\n  "))]
    Targets {
        /// Readable lines, each naming the shard (or `source`) and the table.
        problems: Vec<String>,
    },
    /// A sharded table has a row whose shard key is NULL.
    #[error("source table {table} chunk {chunk}: shard key column {column} is NULL in row [{row}]; every row of a sharded table needs a key — fix the row or configure the table as broadcast")]
    NullKey {
        /// Source table.
        table: String,
        /// Chunk number.
        chunk: u32,
        /// Key column.
        column: String,
        /// The start of the row.
        row: String,
    },
    /// The router refused a key.
    #[error("source table {table} chunk {chunk}: cannot route key {key:?}: {message}")]
    Route {
        /// Source table.
        table: String,
        /// Chunk number.
        chunk: u32,
        /// The key's text.
        key: String,
        /// What the router said.
        message: String,
    },
    /// The COPY stream from the source was not what text format promises.
    #[error("source table {table} chunk {chunk}: malformed COPY data: {detail}; this is a bug in reshard or the server, please report it")]
    Malformed {
        /// Source table.
        table: String,
        /// Chunk number.
        chunk: u32,
        /// What was wrong.
        detail: String,
    },
    /// A table being loaded in watermark chunks no longer exists on the source.
    #[error("source table {table} was dropped or renamed during the full load (before its chunk {chunk}): {}; remove it from the publication and the config's [[tables]] (or recreate it), then run again: the other tables resume after their last chunk", pg_message(.source))]
    TableGone {
        /// Source table.
        table: String,
        /// The chunk that found it gone.
        chunk: u32,
        /// The error (`42P01`).
        source: tokio_postgres::Error,
    },
    /// A bad setting.
    #[error("[snapshot] {key}: {message}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// An internal task failed (a bug).
    #[error("{what} failed: {message}; this is a bug in reshard, please report it")]
    Task {
        /// Which task.
        what: String,
        /// What happened.
        message: String,
    },
    /// Tables must be copied but no snapshot was supplied.
    #[error("tables {tables} must be copied but no exported snapshot was supplied; create one (a replication slot with EXPORT_SNAPSHOT) and pass it")]
    NoSnapshot {
        /// The tables, comma-separated.
        tables: String,
    },
    /// The watermark chunks recorded for a table cannot be handed to CDC.
    #[error("table {table}: watermark load: {message}")]
    Watermark {
        /// Source table.
        table: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Classify for SnapshotError {
    fn class(&self) -> ErrorClass {
        match self {
            SnapshotError::Connect { .. } => ErrorClass::Transient,
            SnapshotError::Source { source, .. } | SnapshotError::Shard { source, .. } => {
                class_of_pg(source)
            }
            // The whole load must restart with a new snapshot: retrying the same one is futile,
            // but a restart with a fresh one is routine.
            SnapshotError::SnapshotImport { .. } => ErrorClass::Transient,
            SnapshotError::Targets { .. }
            | SnapshotError::NullKey { .. }
            | SnapshotError::Route { .. }
            | SnapshotError::Malformed { .. }
            | SnapshotError::Config { .. }
            | SnapshotError::TableGone { .. }
            | SnapshotError::Task { .. }
            | SnapshotError::NoSnapshot { .. }
            | SnapshotError::Watermark { .. } => ErrorClass::Definite,
        }
    }
}

/// `SQLSTATE xxxxx: message (detail)` for a server error, the plain text otherwise.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("SQLSTATE {}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(w) = db.where_() {
                s.push_str(&format!(" [{w}]"));
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(inner) => format!("{e}: {inner}"),
            None => e.to_string(),
        },
    }
}

/// The fix to suggest for a failed statement, by SQLSTATE class.
pub(crate) fn fix_for(e: &tokio_postgres::Error) -> &'static str {
    match e.code().map(|c| c.code()) {
        None => "the connection was lost; the load can be restarted and resumes from the finished tables",
        Some(c) if c.starts_with("08") || c.starts_with("57") => {
            "the server went away; the load can be restarted and resumes from the finished tables"
        }
        Some("23503") => {
            "a foreign key on the target refused a row: tables and chunks load in parallel, in no particular order; add the target's foreign keys after the full load"
        }
        Some("0A000") => {
            "the server refused the operation; if TRUNCATE was refused because another target table references this one, include that table in the load or drop the foreign key until the load is done"
        }
        Some(c) if c.starts_with("22") => {
            "a value did not fit the target column; make the target column type equal to the source's"
        }
        Some(c) if c.starts_with("23") => {
            "a target constraint refused a row; empty the target table (or set truncate_targets = true) and check that its constraints match the source's"
        }
        Some(c) if c.starts_with("42") => {
            "the schema or privileges differ from what the check saw; rerun `reshard check`"
        }
        Some(_) => "see the server log of that database",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_problems_are_listed_one_per_line() {
        let e = SnapshotError::Targets {
            problems: vec![
                "shard1: table public.events is missing".into(),
                "shard2: table public.plans is not empty".into(),
            ],
        };
        let s = e.to_string();
        assert!(s.contains("\n  shard1: table public.events is missing\n  shard2"));
        assert_eq!(e.class(), ErrorClass::Definite);
    }
}
