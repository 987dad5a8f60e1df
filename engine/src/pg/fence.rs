//! The write fences' record, `reshard.fence`: the ONE reader, for `ops::fence` (install, remove,
//! cutover), `status` and the daemon's source poll.
//!
//! In: a SQL connection to a database reshard may have fenced (the source, or a shard). Out:
//! its [`Fence`]s with their refusal counters; none when reshard never fenced anything there.

use tokio_postgres::Client;

use crate::status::{Fence, FenceSide};

/// Whether `reshard.fence` exists on this database.
pub async fn fence_table_exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one("SELECT to_regclass('reshard.fence') IS NOT NULL", &[])
        .await
        .map(|r| r.get(0))
}

/// An `accounts` fence (an account move's, on the shard the accounts left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountFence {
    /// The fence's name (the move's id).
    pub name: String,
    /// What it is for.
    pub reason: String,
    /// The accounts it refuses.
    pub accounts: Vec<String>,
}

/// The `accounts` fences on this database that refuse any of `accounts`.
pub async fn account_fences_of(
    client: &Client,
    accounts: &[String],
) -> Result<Vec<AccountFence>, tokio_postgres::Error> {
    if !fence_table_exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT shard, reason, coalesce(accounts, '{}') FROM reshard.fence \
             WHERE rule = 'accounts' AND accounts && $1::text[] ORDER BY shard",
            &[&accounts],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(AccountFence {
                name: r.try_get(0)?,
                reason: r.try_get(1)?,
                accounts: r.try_get(2)?,
            })
        })
        .collect()
}

/// The fences recorded on this database, by shard name.
pub async fn read_fences(client: &Client) -> Result<Vec<Fence>, tokio_postgres::Error> {
    if !fence_table_exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT id, shard, side, reason, rule, tables, \
                    to_char(installed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                    extract(epoch FROM clock_timestamp() - installed_at)::float8, step, \
                    to_char(step_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), lsn::text \
             FROM reshard.fence ORDER BY shard",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: i64 = r.try_get(0)?;
        // `nextval` is not transactional: the counter holds every refusal, committed or not.
        let refused = client
            .query_one(
                &format!(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM reshard.fence_refused_{id}"
                ),
                &[],
            )
            .await?
            .try_get(0)?;
        let side: String = r.try_get(2)?;
        let lsn: Option<String> = r.try_get(10)?;
        out.push(Fence {
            shard: r.try_get(1)?,
            side: if side == "shard" {
                FenceSide::Shard
            } else {
                FenceSide::Source
            },
            reason: r.try_get(3)?,
            rule: r.try_get(4)?,
            tables: r.try_get(5)?,
            installed_at: r.try_get(6)?,
            fenced_secs: r.try_get(7)?,
            step: r.try_get(8)?,
            step_at: r.try_get(9)?,
            lsn: lsn.and_then(|s| s.parse().ok()),
            refused,
        });
    }
    Ok(out)
}
