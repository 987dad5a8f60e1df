//! Per-shard apply: one [`ShardApplier`] per target shard, on its own connection, at its own
//! pace.
//!
//! In: that shard's [`ShardEvent`](crate::event::ShardEvent)s, read from a
//! [`ShardLog`](crate::event::ShardLog) (the spill log) after the shard's durable progress.
//! Out: the source transactions applied to the shard, grouped into target transactions bounded
//! by rows, bytes and time (and committed as soon as the log has nothing more to read: a
//! caught-up shard batches only what is already queued), with the shard's progress row (`reshard.progress`) written in the
//! same target transaction; [`ShardStatus`] updates; `ShardLog::applied` after each durable
//! commit.
//!
//! Invariant: every source transaction routed to the shard is applied exactly once, in source
//! commit order. On (re)start the applier reads its progress row and skips every transaction
//! with `commit_lsn <=` it, even if the log delivers it again.
//!
//! Inside a target transaction, changes are buffered (bounded by `batch_max_rows` /
//! `batch_max_bytes`), folded per key ([`fold`]) and written set-based through a COPY-filled
//! staging table ([`batch`]); the rows of keys new to the flush of a primary-key table go
//! straight into the target table (COPY or a plain `INSERT`, see
//! [`TargetTable::takes_direct_inserts`](schema::TargetTable::takes_direct_inserts)). A large
//! source transaction is flushed in pieces into the still open target transaction, and
//! committed once, at its Commit. If a set-based flush hits a constraint or data error that
//! source order might not (unique values swapped between rows, a new key already on the
//! shard), the target transaction is rolled back and the log re-read and replayed change by
//! change in source order. Under load, a full group's last request (merge statements,
//! progress row, COMMIT) stays in flight while the next group is read and folded; its answer
//! is checked before anything else is sent.
//!
//! ```text
//!   ShardReader ──► buffer (≤ rows/bytes) ──► fold per table/key ──► COPY staging ──► DELETE/INSERT/UPDATE
//!                        │                                                          │
//!                        └─ Commit of source txn: group done? ──► UPDATE reshard.progress; COMMIT
//! ```

mod applier;
pub mod batch;
pub mod ddl;
mod error;
pub mod fold;
#[cfg(any(test, feature = "test-utils"))]
pub mod memlog;
pub mod schema;
pub mod text;

use std::collections::HashMap;
use std::future::Future;

use tokio_postgres::Client;

pub use applier::{LatencyHistogram, ShardApplier};
pub use ddl::{DdlWait, SourceConnect};
pub use error::{ApplyError, ForeignRow};

use crate::config::{ApplyConfig, DdlMode};
use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::event::{PgTimestamp, ShardId};
use crate::lsn::Lsn;
use crate::pg::conn::drive_connection;

/// Options of one shard's apply pipeline.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// The shard's index (what the log is keyed by).
    pub shard: ShardId,
    /// The shard's name (in the progress row, logs and messages). Default `"0"`.
    pub shard_name: String,
    /// The source's `system_identifier`, recorded in the progress row. Default empty.
    pub source_system_id: String,
    /// The slot name, recorded in the progress row. Default `"reshard"`.
    pub slot: String,
    /// The migration id (shared with the spill directory), recorded in the progress row.
    /// Default `None` (the row's is left as it is).
    pub migration_id: Option<String>,
    /// At most this many changes are buffered before they are written to the target, and a
    /// target transaction is committed at the first source Commit past this many. Default
    /// 10 000.
    pub batch_max_rows: usize,
    /// Same bound in bytes of value text. Default 16 MiB.
    pub batch_max_bytes: usize,
    /// A target transaction is committed when the log has nothing more to read right now, and
    /// at the latest this long after its first source transaction ended (or at that
    /// transaction's Commit, if it ends later). Default: `[apply]`'s.
    pub batch_max_delay_ms: u64,
    /// A shard whose newest read source transaction committed at least this long ago is
    /// catching up: its group stays open up to this long for more transactions (fewer, larger
    /// target transactions). 0 = never. Default: `[apply]`'s.
    pub catchup_batch_ms: u64,
    /// Run with `session_replication_role = replica` so that the target's ordinary triggers and
    /// foreign-key checks do not fire (the source already ran them); if the role lacks the
    /// permission, a warning is logged and apply runs without it. Default true.
    /// See <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-SESSION-REPLICATION-ROLE>.
    pub session_replication_role_replica: bool,
    /// Source table → target table. Tables not listed keep their
    /// name. Default empty (identity).
    pub table_map: HashMap<crate::pg::sql::TableName, crate::pg::sql::TableName>,
    /// First retry delay after a transient error. Default: `[apply]`'s.
    pub retry_initial_ms: u64,
    /// Largest retry delay (the delay doubles up to it). Default: `[apply]`'s.
    pub retry_max_ms: u64,
    /// An idle shard records heartbeat progress at most this often. Default 1 000 ms.
    pub heartbeat_interval_ms: u64,
    /// What to do when a source table gains a column its shard table lacks. Default:
    /// `[apply]`'s ([`DdlMode::Propagate`]).
    pub ddl: DdlMode,
    /// Apply under this replication origin (created if missing, then
    /// `pg_replication_origin_session_setup`), so that logical decoding on the target marks
    /// the applied transactions with it. The reverse stream applies a shard's writes to the
    /// source under one, and the forward stream drops them by it. Default `None`.
    /// See <https://www.postgresql.org/docs/current/replication-origins.html>.
    pub replication_origin: Option<String>,
    /// Reverse replication: the target rows the changes may touch are the shard's own (see
    /// [`RowOwner`]). Default `None`: every row.
    pub row_owner: Option<RowOwner>,
}

/// Whether a shard-key value (its type OID and text form) belongs to an owner.
pub type OwnsFn = std::sync::Arc<dyn Fn(u32, &[u8]) -> bool + Send + Sync>;

/// Which target rows a stream may change: a target row matched by primary key whose shard
/// key belongs to another owner is never replaced, updated or deleted. Reverse replication sets
/// it: a cut-over shard and the source may hand out the same id to different accounts (their
/// sequences are copies), and the source's row of an account another shard serves must
/// survive. Such a change stops the apply before its source transaction
/// ([`ApplyError::ForeignRow`], [`ApplyState::Halted`]); it is retried on the backoff and
/// goes through once the operator has renumbered one of the two rows.
#[derive(Clone)]
pub struct RowOwner {
    /// Target table → its shard-key column; tables not listed are not
    /// guarded.
    pub keys: HashMap<crate::pg::sql::TableName, String>,
    /// The owner, for messages (the cut-over shard).
    pub owner: String,
    /// Whether a shard-key value (its type OID and text form) belongs to the owner.
    pub owns: OwnsFn,
    /// What the operator does about a conflict: appended to the error.
    pub advice: String,
}

impl std::fmt::Debug for RowOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowOwner")
            .field("keys", &self.keys)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl ApplyOptions {
    /// The `[apply]` section's settings; the shard's identity fields keep their defaults.
    /// The one place the config becomes apply options.
    pub fn from_config(c: &ApplyConfig) -> ApplyOptions {
        ApplyOptions {
            shard: ShardId(0),
            shard_name: "0".to_owned(),
            source_system_id: String::new(),
            slot: "reshard".to_owned(),
            migration_id: None,
            batch_max_rows: c.batch_max_rows,
            batch_max_bytes: c.batch_max_bytes,
            batch_max_delay_ms: c.batch_max_delay_ms,
            catchup_batch_ms: c.catchup_batch_ms,
            session_replication_role_replica: c.session_replication_role_replica,
            table_map: HashMap::new(),
            retry_initial_ms: c.retry_initial_ms,
            retry_max_ms: c.retry_max_ms,
            heartbeat_interval_ms: 1_000,
            ddl: c.ddl,
            replication_origin: None,
            row_owner: None,
        }
    }
}

impl Default for ApplyOptions {
    /// The `[apply]` defaults ([`ApplyConfig::default`]).
    fn default() -> Self {
        ApplyOptions::from_config(&ApplyConfig::default())
    }
}

/// What a shard's applier is doing.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyState {
    /// Connecting or not started.
    #[default]
    Starting,
    /// Applying.
    Running,
    /// Waiting to retry after a transient error (see `last_error`).
    Retrying,
    /// Waiting for the shard table to match the source table (a schema change; `last_error`
    /// says which table and columns, and the fix); retried on the backoff.
    WaitingForDdl,
    /// Paused by the operator: nothing is read or committed.
    Paused,
    /// A change would replace, update or delete a target row of another owner
    /// ([`RowOwner`]): nothing of its source transaction is applied; retried on the backoff
    /// until the operator resolves it (see `last_error`).
    Halted,
    /// Stopped: shut down, or a definite error (see `last_error`).
    Stopped,
}

/// A shard's apply status, published on a `watch` channel.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardStatus {
    /// The shard's name.
    pub shard: String,
    /// What it is doing.
    pub state: ApplyState,
    /// Durable progress: every source transaction with a commit LSN at or below is applied.
    pub applied_commit_lsn: Lsn,
    /// End of the commit record of that transaction.
    pub applied_end_lsn: Lsn,
    /// Every transaction the log handed this shard up to here is applied: past
    /// `applied_commit_lsn` the log held nothing for it, only a heartbeat not recorded yet
    /// (written every `heartbeat_interval_ms`). Lag is measured from the higher of the two, so
    /// an idle shard reads as caught up while the source's WAL moves on without it.
    pub quiet_through: Lsn,
    /// Source commit time of the last applied transaction.
    pub last_commit_time: Option<PgTimestamp>,
    /// Source transactions applied (this run).
    pub txns_applied: u64,
    /// Source INSERTs applied.
    pub rows_inserted: u64,
    /// Source UPDATEs applied.
    pub rows_updated: u64,
    /// Source DELETEs applied.
    pub rows_deleted: u64,
    /// Source TRUNCATEs applied.
    pub truncates: u64,
    /// Target transactions committed with data.
    pub batches: u64,
    /// Buffers written into a target transaction (several per batch for large transactions).
    pub flushes: u64,
    /// Flushes replayed change by change after a set-based statement failed.
    pub replays: u64,
    /// Transient errors retried.
    pub retries: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Opens a ready target connection. The runtime passes a closure over the shard's connection
/// config; tests use [`PgConnect`].
pub trait Connect: Send + Sync + 'static {
    /// Why connecting failed (transient: retried with backoff; definite: the shard stops).
    type Error: std::error::Error + Classify + Send + Sync + 'static;

    /// A new connection (its connection task already spawned).
    fn connect(&self) -> impl Future<Output = Result<Client, Self::Error>> + Send;
}

impl<F, Fut, E> Connect for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Client, E>> + Send,
    E: std::error::Error + Classify + Send + Sync + 'static,
{
    type Error = E;

    fn connect(&self) -> impl Future<Output = Result<Client, E>> + Send {
        self()
    }
}

/// Connects with a `tokio_postgres::Config` and no TLS.
#[derive(Clone, Debug)]
pub struct PgConnect(pub tokio_postgres::Config);

/// A `tokio_postgres` connection failure, classified.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PgConnectError(#[source] pub tokio_postgres::Error);

impl Classify for PgConnectError {
    fn class(&self) -> ErrorClass {
        match self.0.code().map(|c| c.code()) {
            // Wrong password, no such role or database, no pg_hba entry: retrying won't help.
            Some("28P01" | "28000" | "3D000") => ErrorClass::Definite,
            _ => class_of_pg(&self.0),
        }
    }
}

impl Connect for PgConnect {
    type Error = PgConnectError;

    fn connect(&self) -> impl Future<Output = Result<Client, PgConnectError>> + Send {
        let config = self.0.clone();
        async move {
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(PgConnectError)?;
            let target = format!(
                "{:?}/{}",
                config.get_hosts(),
                config.get_dbname().unwrap_or("")
            );
            tokio::spawn(async move {
                if let Err(e) = drive_connection(conn, target).await {
                    tracing::debug!(error = %e, "target connection closed");
                }
            });
            Ok(client)
        }
    }
}
