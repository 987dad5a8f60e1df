//! Progress rows: how far each shard has applied the source's commits.
//!
//! In: a connection to a shard. Out: its `reshard.progress` row for a slot ([`ProgressRow`]).
//! The apply stage writes the row in the same target transaction as the data it applied, so
//! the row is exactly as durable as the data: `commit_lsn` means "every source commit at or
//! below this LSN is applied on this shard" (idle shards get heartbeats so it keeps moving).
//! `verify` and `cutover` wait on it; `status` reports it when the daemon is not running.

use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::event::{PgTimestamp, PG_EPOCH_OFFSET_MICROS};
use crate::lsn::Lsn;

/// The progress table (defined once, by the apply stage that writes it): one row per
/// (source system, slot, shard).
pub use crate::apply::progress::PROGRESS_DDL;

/// Reading a progress row failed.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The query failed.
    #[error(
        "reading reshard.progress on shard {shard}: {}",
        crate::pgconn::error_text(error)
    )]
    Query {
        /// Shard name.
        shard: String,
        /// The driver error.
        error: tokio_postgres::Error,
    },
    /// A value did not parse.
    #[error("reshard.progress on shard {shard} holds an invalid value: {message}")]
    Invalid {
        /// Shard name.
        shard: String,
        /// What.
        message: String,
    },
}

impl Classify for ProgressError {
    fn class(&self) -> ErrorClass {
        match self {
            ProgressError::Query { error, .. } => class_of_pg(error),
            ProgressError::Invalid { .. } => ErrorClass::Definite,
        }
    }
}

/// One shard's progress for one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressRow {
    /// The source's `system_identifier`.
    pub source_system_id: String,
    /// Slot name.
    pub slot: String,
    /// Shard name.
    pub shard: String,
    /// Every source commit at or below this is applied here.
    pub commit_lsn: Lsn,
    /// End of the last applied commit record.
    pub end_lsn: Lsn,
    /// Commit time of the last applied source transaction.
    pub commit_time: Option<PgTimestamp>,
    /// When the row was last written (by the target's clock).
    pub updated_at: PgTimestamp,
}

/// Whether the shard has a `reshard.progress` table at all.
pub async fn progress_table_exists(
    client: &tokio_postgres::Client,
    shard: &str,
) -> Result<bool, ProgressError> {
    let row = client
        .query_one("SELECT to_regclass('reshard.progress') IS NOT NULL", &[])
        .await
        .map_err(|error| ProgressError::Query {
            shard: shard.to_owned(),
            error,
        })?;
    Ok(row.get(0))
}

/// Reads the progress row of `slot` on `shard` (optionally only for one source system).
/// `None` when the table or the row does not exist yet. With several rows (several source
/// systems under the same slot name and no filter) the most recently updated one is returned.
pub async fn read_progress(
    client: &tokio_postgres::Client,
    slot: &str,
    shard: &str,
    system_id: Option<&str>,
) -> Result<Option<ProgressRow>, ProgressError> {
    if !progress_table_exists(client, shard).await? {
        return Ok(None);
    }
    let q = |error| ProgressError::Query {
        shard: shard.to_owned(),
        error,
    };
    let rows = client
        .query(
            "SELECT source_system_id, slot, shard, commit_lsn::text, end_lsn::text, \
                    (extract(epoch FROM commit_time) * 1000000)::int8, \
                    (extract(epoch FROM updated_at) * 1000000)::int8 \
             FROM reshard.progress \
             WHERE slot = $1 AND shard = $2 AND ($3::text IS NULL OR source_system_id = $3) \
             ORDER BY updated_at DESC LIMIT 1",
            &[&slot, &shard, &system_id],
        )
        .await
        .map_err(q)?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    let lsn = |i: usize| -> Result<Lsn, ProgressError> {
        let s: String = r.try_get(i).map_err(q)?;
        s.parse()
            .map_err(|e: crate::lsn::ParseLsnError| ProgressError::Invalid {
                shard: shard.to_owned(),
                message: e.to_string(),
            })
    };
    let unix: Option<i64> = r.try_get(5).map_err(q)?;
    let updated: Option<i64> = r.try_get(6).map_err(q)?;
    Ok(Some(ProgressRow {
        source_system_id: r.try_get(0).map_err(q)?,
        slot: r.try_get(1).map_err(q)?,
        shard: r.try_get(2).map_err(q)?,
        commit_lsn: lsn(3)?,
        end_lsn: lsn(4)?,
        commit_time: unix.map(|u| u - PG_EPOCH_OFFSET_MICROS),
        updated_at: updated.unwrap_or(0) - PG_EPOCH_OFFSET_MICROS,
    }))
}

/// The source's `system_identifier` (needs no privilege beyond connecting on PostgreSQL 15;
/// `None` if the server refuses it).
pub async fn source_system_id(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get(0).ok())
}
