//! The apply stage's error: what failed, where (shard, table, key, source commit LSN), the
//! SQLSTATE, and whether to retry.

use super::batch::EncodeError;
use super::ddl::DdlWait;
use super::fold::FoldError;
use super::schema::SchemaError;
use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::lsn::Lsn;

/// Why a shard's apply stopped (definite) or must reconnect (transient).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A statement on the shard failed.
    #[error("shard {shard}: {context}: SQLSTATE {sqlstate}: {message}")]
    Pg {
        /// Shard name.
        shard: String,
        /// What was being done: table, key and source commit LSN where known.
        context: String,
        /// The SQLSTATE, or `none` when the connection itself failed.
        sqlstate: String,
        /// The server's message with its detail, or the connection error.
        message: String,
        /// Transient or definite.
        class: ErrorClass,
    },
    /// Connecting to the shard failed.
    #[error("shard {shard}: cannot connect: {message}")]
    Connect {
        /// Shard name.
        shard: String,
        /// The error.
        message: String,
        /// Transient or definite.
        class: ErrorClass,
    },
    /// The shard log failed.
    #[error("shard {shard}: reading the shard log failed: {message}")]
    Log {
        /// Shard name.
        shard: String,
        /// The error.
        message: String,
        /// Transient or definite.
        class: ErrorClass,
    },
    /// A source table cannot be written to its target table.
    #[error("shard {shard}: {source}")]
    Schema {
        /// Shard name.
        shard: String,
        /// The mismatch.
        #[source]
        source: SchemaError,
    },
    /// The shard table must change before this source table's changes can be written (a
    /// schema change on the source, a missing table or column): transient, the shard retries
    /// on the backoff and resumes by itself once the shard table matches.
    #[error("shard {shard}: {wait}{}", .at.map(|l| format!(" (held before source commit {l})")).unwrap_or_default())]
    WaitingForDdl {
        /// Shard name.
        shard: String,
        /// What is waited for and the fix.
        wait: DdlWait,
        /// The source commit LSN of the first transaction that waits, once known.
        at: Option<Lsn>,
    },
    /// A change cannot be folded (no key, key unknown).
    #[error("shard {shard}: table {table}, source commit {commit_lsn}: {source}")]
    Fold {
        /// Shard name.
        shard: String,
        /// Source table.
        table: String,
        /// Source commit LSN of the change.
        commit_lsn: Lsn,
        /// The problem.
        #[source]
        source: FoldError,
    },
    /// A value cannot be written.
    #[error("shard {shard}: table {table}, source commit {commit_lsn}: {source}")]
    Encode {
        /// Shard name.
        shard: String,
        /// Target table.
        table: String,
        /// Source commit LSN of the change.
        commit_lsn: Lsn,
        /// The problem.
        #[source]
        source: EncodeError,
    },
    /// The shard's event stream broke its contract (a change outside a transaction, …).
    #[error("shard {shard}: the shard log broke event order: {message}")]
    Order {
        /// Shard name.
        shard: String,
        /// What was wrong.
        message: String,
    },
    /// A set-based flush hit a constraint or data error that source order may not hit; the
    /// applier rolls back and re-reads the log from its progress, applying up to `up_to` change
    /// by change. Handled inside the applier; it only escapes `run` during shutdown, as a
    /// transient error.
    #[error("shard {shard}: set-based apply failed, replaying up to source commit {up_to} change by change: {cause}")]
    ReplayFromLog {
        /// Shard name.
        shard: String,
        /// Last source commit LSN of the failed flush.
        up_to: Lsn,
        /// The error of the set-based statement.
        cause: String,
    },
    /// A change would replace, update or delete a target row whose shard key belongs to
    /// another owner (see [`super::RowOwner`]). Nothing of its source transaction is applied;
    /// the applier retries it on the backoff.
    #[error("{0}")]
    ForeignRow(Box<ForeignRow>),
    /// The progress row moved under this applier.
    #[error("shard {shard}: progress row is at {found} but this applier has applied up to {expected}: another reshard process is applying to this shard with the same source and slot; stop it")]
    ProgressConflict {
        /// Shard name.
        shard: String,
        /// What this applier committed last.
        expected: Lsn,
        /// What the row says.
        found: String,
    },
}

impl ApplyError {
    /// Wraps a `tokio_postgres` error with what was being done.
    pub(crate) fn pg(shard: &str, context: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        let (sqlstate, message) = match e.as_db_error() {
            Some(db) => {
                let mut m = db.message().to_owned();
                if let Some(d) = db.detail() {
                    m.push_str(" (");
                    m.push_str(d);
                    m.push(')');
                }
                if let Some(t) = db.table() {
                    m.push_str(&format!(" [table {t}"));
                    if let Some(c) = db.constraint() {
                        m.push_str(&format!(", constraint {c}"));
                    }
                    m.push(']');
                }
                (db.code().code().to_owned(), m)
            }
            None => {
                let mut m = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    m.push_str(": ");
                    m.push_str(&s.to_string());
                    src = s.source();
                }
                ("none".to_owned(), m)
            }
        };
        ApplyError::Pg {
            shard: shard.to_owned(),
            context: context.into(),
            sqlstate,
            message,
            class: class_of_pg(e),
        }
    }

    /// The SQLSTATE, for errors from the shard.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Pg { sqlstate, .. } => Some(sqlstate),
            ApplyError::Schema {
                source: SchemaError::MissingTable { .. },
                ..
            } => Some("42P01"),
            ApplyError::Schema {
                source: SchemaError::MissingColumn { .. },
                ..
            } => Some("42703"),
            _ => None,
        }
    }
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Pg { class, .. }
            | ApplyError::Connect { class, .. }
            | ApplyError::Log { class, .. } => *class,
            ApplyError::ReplayFromLog { .. }
            | ApplyError::WaitingForDdl { .. }
            | ApplyError::ForeignRow(_) => ErrorClass::Transient,
            ApplyError::Schema { .. }
            | ApplyError::Fold { .. }
            | ApplyError::Encode { .. }
            | ApplyError::Order { .. }
            | ApplyError::ProgressConflict { .. } => ErrorClass::Definite,
        }
    }
}

/// A change that would overwrite a row of another owner ([`ApplyError::ForeignRow`]).
#[derive(Debug, thiserror::Error)]
#[error("{shard}: halted before shard {owner}'s commit {commit_lsn}: the {op} of {table} {key} by shard {owner} ({column} {change_value}) would {verb} the target's row {key} of {column} {row_value}, which is not shard {owner}'s: the shard and the target handed out the same key to different accounts. Nothing of that transaction is applied (no row is lost: the shard keeps its row, the target keeps the other); it is retried every few seconds. {advice}")]
pub struct ForeignRow {
    /// Shard name (the applier's).
    pub shard: String,
    /// The owner (the shard whose writes are applied).
    pub owner: String,
    /// Target table.
    pub table: String,
    /// The match key, `(id)=(4405)`.
    pub key: String,
    /// `INSERT`, `UPDATE` or `DELETE`.
    pub op: &'static str,
    /// What the change would do to the row.
    pub verb: &'static str,
    /// The shard-key column.
    pub column: String,
    /// The target row's shard key.
    pub row_value: String,
    /// The change's shard key (`unknown` when the change does not carry it).
    pub change_value: String,
    /// The source commit LSN (the first of the flush).
    pub commit_lsn: Lsn,
    /// What to do.
    pub advice: String,
}
