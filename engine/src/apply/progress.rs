//! The progress row of a shard: how far the shard has applied the source, kept on the shard.
//!
//! In: a target client and the identity (source system id, slot, shard). Out: the
//! `reshard.progress` table (created if missing), the row read back as [`Progress`], and the
//! SQL that writes it. Invariant: the row is written in the same target transaction as the
//! data it covers, so after any crash the row says exactly which source transactions the shard
//! holds (every one with `commit_lsn <=` the recorded one, none after).

use tokio_postgres::{Client, SimpleQueryMessage};

use super::text::sql_literal;
use crate::event::{PgTimestamp, PG_EPOCH_OFFSET_MICROS};
use crate::lsn::Lsn;

/// DDL of the progress table. `IF NOT EXISTS` is not atomic against a concurrent creator, see
/// [`ensure_progress_table`].
pub const PROGRESS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS reshard; \
CREATE TABLE IF NOT EXISTS reshard.progress (\
 source_system_id text NOT NULL,\
 slot text NOT NULL,\
 shard text NOT NULL,\
 commit_lsn pg_lsn NOT NULL,\
 end_lsn pg_lsn NOT NULL,\
 commit_time timestamptz,\
 updated_at timestamptz NOT NULL DEFAULT now(),\
 PRIMARY KEY (source_system_id, slot, shard))";

/// A shard's durable position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Every source transaction with `commit_lsn <=` this is applied.
    pub commit_lsn: Lsn,
    /// End of that transaction's commit record.
    pub end_lsn: Lsn,
    /// Its commit time, if it was a transaction (not a heartbeat) that set it.
    pub commit_time: Option<String>,
    /// When the row was last written (target clock), as text.
    pub updated_at: String,
}

/// Who a progress row belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressKey {
    /// The source's `system_identifier`.
    pub source_system_id: String,
    /// The slot name.
    pub slot: String,
    /// The shard name.
    pub shard: String,
}

impl ProgressKey {
    fn where_sql(&self) -> Result<String, std::str::Utf8Error> {
        Ok(format!(
            "source_system_id = {} AND slot = {} AND shard = {}",
            sql_literal(self.source_system_id.as_bytes())?,
            sql_literal(self.slot.as_bytes())?,
            sql_literal(self.shard.as_bytes())?
        ))
    }

    fn values_sql(&self) -> String {
        // Rust strings are UTF-8, so the literal conversion cannot fail.
        let lit = |s: &str| sql_literal(s.as_bytes()).unwrap_or_else(|_| "''".to_owned());
        format!(
            "{}, {}, {}",
            lit(&self.source_system_id),
            lit(&self.slot),
            lit(&self.shard)
        )
    }

    /// `INSERT … ON CONFLICT DO NOTHING` of a `0/0` row, so that the row can be locked.
    pub fn init_sql(&self) -> String {
        format!(
            "INSERT INTO reshard.progress (source_system_id, slot, shard, commit_lsn, end_lsn) \
             VALUES ({}, '0/0', '0/0') ON CONFLICT DO NOTHING",
            self.values_sql()
        )
    }

    /// `SELECT commit_lsn … FOR UPDATE`: run first in every apply transaction, it serializes
    /// two appliers of the same shard and lets the second see that the first moved on.
    pub fn lock_sql(&self) -> String {
        format!(
            "SELECT commit_lsn::text FROM reshard.progress WHERE {} FOR UPDATE",
            self.where_sql().unwrap_or_default()
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
             commit_time = {time}, updated_at = now() WHERE {}",
            self.where_sql().unwrap_or_default()
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
    let mut attempt = 0;
    loop {
        match client.batch_execute(PROGRESS_DDL).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 5
                    && e.code().is_some_and(|c| {
                        matches!(c.code(), "23505" | "42P06" | "42P07" | "40P01")
                    }) =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the progress row of (`system_id`, `slot`, `shard`); `None` if there is none (or the
/// table does not exist yet). For the status and cutover stages.
pub async fn read_progress(
    client: &Client,
    system_id: &str,
    slot: &str,
    shard: &str,
) -> Result<Option<Progress>, tokio_postgres::Error> {
    let key = ProgressKey {
        source_system_id: system_id.to_owned(),
        slot: slot.to_owned(),
        shard: shard.to_owned(),
    };
    let sql = format!(
        "SELECT commit_lsn::text, end_lsn::text, commit_time::text, updated_at::text \
         FROM reshard.progress WHERE {}",
        key.where_sql().unwrap_or_default()
    );
    let msgs = match client.simple_query(&sql).await {
        Ok(m) => m,
        Err(e)
            if e.code()
                .is_some_and(|c| c.code() == "42P01" || c.code() == "3F000") =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            let lsn = |i: usize| {
                r.get(i)
                    .and_then(|s| s.parse::<Lsn>().ok())
                    .unwrap_or(Lsn::ZERO)
            };
            return Ok(Some(Progress {
                commit_lsn: lsn(0),
                end_lsn: lsn(1),
                commit_time: r.get(2).map(str::to_owned),
                updated_at: r.get(3).unwrap_or_default().to_owned(),
            }));
        }
    }
    Ok(None)
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
        };
        assert!(k.lock_sql().contains("slot = 's''x'"));
    }
}
