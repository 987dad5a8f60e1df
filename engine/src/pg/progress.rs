//! Progress rows: how far each shard has applied the source's commits. The one reader and
//! writer of `reshard.progress`.
//!
//! In: a connection to a shard. Out: the table (created or migrated in place,
//! [`ensure_progress_table`]), the SQL the apply stage writes it with ([`ProgressKey`]), and the
//! row read back ([`read_progress`] → [`ProgressRow`]). The apply stage writes the row in the
//! same target transaction as the data it applied, so the row is exactly as durable as the
//! data: `commit_lsn` means "every source commit at or below this LSN is applied on this
//! shard" (idle shards get heartbeats so it keeps moving). The start-up proof, `verify` and
//! `cutover` read it; `status` reports it when the daemon is not running.

use tokio_postgres::Client;

use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::event::{PgTimestamp, PG_EPOCH_OFFSET_MICROS};
use crate::lsn::Lsn;
use crate::pg::conn::quote_literal;

/// DDL of the progress table. `IF NOT EXISTS` is not atomic against a concurrent creator, see
/// [`ensure_progress_table`]. `migration_id` (the migration that wrote the row, shared with the
/// spill directory) was added later: tables of older versions get it in place.
pub const PROGRESS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS reshard; \
CREATE TABLE IF NOT EXISTS reshard.progress (\
 source_system_id text NOT NULL,\
 slot text NOT NULL,\
 shard text NOT NULL,\
 commit_lsn pg_lsn NOT NULL,\
 end_lsn pg_lsn NOT NULL,\
 commit_time timestamptz,\
 updated_at timestamptz NOT NULL DEFAULT now(),\
 migration_id text,\
 PRIMARY KEY (source_system_id, slot, shard)); \
ALTER TABLE reshard.progress ADD COLUMN IF NOT EXISTS migration_id text";

/// Who a progress row belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressKey {
    /// The source's `system_identifier`.
    pub source_system_id: String,
    /// The slot name.
    pub slot: String,
    /// The shard name.
    pub shard: String,
    /// The migration writing the row (recorded, not part of the key); `None` leaves it as is.
    pub migration_id: Option<String>,
}

impl ProgressKey {
    fn where_sql(&self) -> String {
        format!(
            "source_system_id = {} AND slot = {} AND shard = {}",
            quote_literal(&self.source_system_id),
            quote_literal(&self.slot),
            quote_literal(&self.shard)
        )
    }

    fn values_sql(&self) -> String {
        format!(
            "{}, {}, {}",
            quote_literal(&self.source_system_id),
            quote_literal(&self.slot),
            quote_literal(&self.shard)
        )
    }

    /// `INSERT … ON CONFLICT DO NOTHING` of a `0/0` row, so that the row can be locked.
    pub fn init_sql(&self) -> String {
        format!(
            "INSERT INTO reshard.progress (source_system_id, slot, shard, commit_lsn, end_lsn, migration_id) \
             VALUES ({}, '0/0', '0/0', {}) ON CONFLICT DO NOTHING",
            self.values_sql(),
            self.migration_sql()
        )
    }

    /// The migration id as an SQL expression (`migration_id`, i.e. unchanged, when unset).
    fn migration_sql(&self) -> String {
        match &self.migration_id {
            Some(m) => quote_literal(m),
            None => "NULL".to_owned(),
        }
    }

    /// `SELECT commit_lsn … FOR UPDATE`: run first in every apply transaction, it serializes
    /// two appliers of the same shard and lets the second see that the first moved on.
    pub fn lock_sql(&self) -> String {
        format!(
            "SELECT commit_lsn::text FROM reshard.progress WHERE {} FOR UPDATE",
            self.where_sql()
        )
    }

    /// `UPDATE` of the row to `commit_lsn`/`end_lsn` (and `commit_time` when known).
    pub fn update_sql(
        &self,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: Option<PgTimestamp>,
    ) -> String {
        let time = match commit_time {
            Some(t) => timestamptz_sql(t),
            None => "commit_time".to_owned(),
        };
        format!(
            "UPDATE reshard.progress SET commit_lsn = '{commit_lsn}', end_lsn = '{end_lsn}', \
             commit_time = {time}, migration_id = coalesce({}, migration_id), updated_at = now() \
             WHERE {}",
            self.migration_sql(),
            self.where_sql()
        )
    }
}

/// An SQL expression for a [`PgTimestamp`], exact to the microsecond.
pub fn timestamptz_sql(t: PgTimestamp) -> String {
    let unix = t.saturating_add(PG_EPOCH_OFFSET_MICROS);
    let secs = unix.div_euclid(1_000_000);
    let micros = unix.rem_euclid(1_000_000);
    format!("(to_timestamp({secs}) + interval '{micros} microseconds')")
}

/// Creates schema `reshard` and table `reshard.progress` if missing. Two creators racing can
/// make `IF NOT EXISTS` fail with a unique violation on the catalog (23505) or "already
/// exists" (42P06, 42P07); then the other one won, and trying again succeeds.
pub async fn ensure_progress_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    create_if_missing(client, PROGRESS_DDL).await
}

/// Runs `IF NOT EXISTS` DDL of reshard's own tables, retrying when a concurrent creator won
/// the race (see [`ensure_progress_table`]).
pub async fn create_if_missing(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    let mut attempt = 0;
    loop {
        match client.batch_execute(ddl).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 5
                    && e.code().is_some_and(|c| {
                        matches!(c.code(), "23505" | "42P06" | "42P07" | "42701" | "40P01")
                    }) =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reading a progress row failed.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The query failed.
    #[error(
        "reading reshard.progress on shard {shard}: {}",
        crate::pg::conn::error_text(error)
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
    /// The migration that wrote the row (shared with the spill directory); `None` for rows
    /// of older versions.
    pub migration_id: Option<String>,
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

/// The other slots (not `slot`) that have progress rows on `shard`, sorted: the migrations
/// whose bookkeeping (progress, full-load records) the shard holds. Empty without the table.
pub async fn other_slots(
    client: &tokio_postgres::Client,
    slot: &str,
    shard: &str,
) -> Result<Vec<String>, ProgressError> {
    progress_names(
        client,
        shard,
        "SELECT DISTINCT slot FROM reshard.progress WHERE slot <> $1 ORDER BY 1",
        &[&slot],
    )
    .await
}

/// The shard names with a progress row of `slot` (of the source `system_id`, when given) in
/// the database `client` is connected to, sorted: normally only the shard configured there;
/// another configured shard's name means its url points at the wrong database. Empty without
/// the table. `shard` names the database in errors.
pub async fn shards_of_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    system_id: Option<&str>,
    shard: &str,
) -> Result<Vec<String>, ProgressError> {
    progress_names(
        client,
        shard,
        "SELECT DISTINCT shard FROM reshard.progress \
         WHERE slot = $1 AND ($2::text IS NULL OR source_system_id = $2) ORDER BY 1",
        &[&slot, &system_id],
    )
    .await
}

/// The text column that `query` (one column) reads from the progress table on `shard`; empty
/// without the table.
async fn progress_names(
    client: &tokio_postgres::Client,
    shard: &str,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<String>, ProgressError> {
    if !progress_table_exists(client, shard).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(query, params)
        .await
        .map_err(|error| ProgressError::Query {
            shard: shard.to_owned(),
            error,
        })?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
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
                    (extract(epoch FROM updated_at) * 1000000)::int8, \
                    to_jsonb(p) ->> 'migration_id' \
             FROM reshard.progress p \
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
        migration_id: r.try_get(7).map_err(q)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_exact() {
        assert_eq!(
            timestamptz_sql(0),
            "(to_timestamp(946684800) + interval '0 microseconds')"
        );
        assert_eq!(
            timestamptz_sql(-1),
            "(to_timestamp(946684799) + interval '999999 microseconds')"
        );
    }

    #[test]
    fn identity_is_quoted() {
        let k = ProgressKey {
            source_system_id: "1".into(),
            slot: "s'x".into(),
            shard: "a".into(),
            migration_id: Some("m'1".into()),
        };
        assert!(k.init_sql().contains("'m''1'"));
        assert!(k
            .update_sql(Lsn::ZERO, Lsn::ZERO, None)
            .contains("coalesce('m''1', migration_id)"));
        assert!(k.lock_sql().contains("slot = 's''x'"));
    }
}
