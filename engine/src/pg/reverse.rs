//! The reverse direction's record: `reshard.reverse` on the source, one row per shard whose
//! writes stream back to the source after its cutover. The one reader and writer of that
//! table, and the one place that names what the reverse direction creates (the slot and the
//! publication on the shard, the progress row and the replication origin on the source).
//!
//! In: a connection to the source. Out: [`ReverseRow`]s. `reshard cutover --fence` writes a row
//! ([`ReverseState::Starting`], then [`ReverseState::Streaming`] once the slot exists),
//! `reshard rollback` moves it to [`ReverseState::Draining`] and [`ReverseState::RolledBack`];
//! the daemon reads the rows and runs one reverse stream per row that is streaming or
//! draining. Each new cutover of a shard after a rollback is a new `epoch`, with a new slot and
//! a new progress row, so nothing of an earlier reverse stream is ever resumed by mistake.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::pg::conn::quote_ident;
use crate::pg::sql::TableName;

/// DDL of the reverse table (on the source).
pub const REVERSE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS reshard; \
CREATE TABLE IF NOT EXISTS reshard.reverse (\
 shard text PRIMARY KEY,\
 epoch int4 NOT NULL,\
 slot text NOT NULL,\
 publication text NOT NULL,\
 shard_system_id text NOT NULL,\
 start_lsn pg_lsn,\
 state text NOT NULL,\
 drain_lsn pg_lsn,\
 updated_at timestamptz NOT NULL DEFAULT now()); \
ALTER TABLE reshard.reverse ADD COLUMN IF NOT EXISTS sequence_floors jsonb";

/// Every replication origin reshard applies under starts with this. The forward ingest drops
/// the transactions of such origins: they were applied to the source by the reverse stream
/// and came from a shard, which must not get them back.
pub const ORIGIN_PREFIX: &str = "reshard_";

/// Where a shard's reverse stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseState {
    /// `cutover` is creating the slot and publication on the shard (nothing streams yet).
    Starting,
    /// The shard is authoritative for its accounts; its writes stream back to the source.
    Streaming,
    /// `rollback` fenced the shard and waits for the stream to reach `drain_lsn`.
    Draining,
    /// The source holds every write the shard took; the stream is over (its slot dropped).
    RolledBack,
}

impl ReverseState {
    /// snake_case label (what the table stores).
    pub fn as_str(self) -> &'static str {
        match self {
            ReverseState::Starting => "starting",
            ReverseState::Streaming => "streaming",
            ReverseState::Draining => "draining",
            ReverseState::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Option<ReverseState> {
        Some(match s {
            "starting" => ReverseState::Starting,
            "streaming" => ReverseState::Streaming,
            "draining" => ReverseState::Draining,
            "rolled_back" => ReverseState::RolledBack,
            _ => return None,
        })
    }

    /// Whether the daemon runs a reverse stream in this state.
    pub fn streams(self) -> bool {
        matches!(self, ReverseState::Streaming | ReverseState::Draining)
    }
}

/// One shard's reverse direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseRow {
    /// The shard (its name in the config).
    pub shard: String,
    /// 1 for the first cutover of the shard, +1 for each cutover after a rollback.
    pub epoch: i32,
    /// The logical slot on the shard.
    pub slot: String,
    /// The publication on the shard.
    pub publication: String,
    /// The shard's `system_identifier` (its progress rows on the source carry it).
    pub shard_system_id: String,
    /// The slot's consistent point: the shard's writes from here on stream back.
    pub start_lsn: Option<Lsn>,
    /// Where it is.
    pub state: ReverseState,
    /// With `Draining`/`RolledBack`: the shard LSN the source had to reach.
    pub drain_lsn: Option<Lsn>,
    /// The shard's sequences (of its sharded tables) as the cutover left them, before the
    /// shard handed out any id: `schema.sequence` → `last_value`. The source collides with the
    /// shard's ids once its own value passes one ([`sequence_headroom`]).
    pub sequence_floors: BTreeMap<String, i64>,
}

impl ReverseRow {
    /// The progress row's shard name on the source (`reverse:<shard>`).
    pub fn progress_shard(&self) -> String {
        progress_shard(&self.shard)
    }

    /// The replication origin the source applies this shard's writes under.
    pub fn origin(&self) -> String {
        origin_name(&self.shard)
    }

    /// What `status`, `lag`, the console and the metrics show of this row before anything
    /// about the running stream (its position, lag and counters) is filled in.
    pub fn view(&self) -> crate::status::ReverseView {
        crate::status::ReverseView {
            shard: self.shard.clone(),
            slot: self.slot.clone(),
            epoch: self.epoch,
            state: self.state.as_str().to_owned(),
            start_lsn: self.start_lsn.unwrap_or_default(),
            drain_lsn: self.drain_lsn,
            ..Default::default()
        }
    }
}

/// The progress row's shard name on the source for the reverse stream of `shard`.
pub fn progress_shard(shard: &str) -> String {
    format!("reverse:{shard}")
}

/// The replication origin of `shard`'s reverse stream ([`ORIGIN_PREFIX`] + the shard).
pub fn origin_name(shard: &str) -> String {
    format!("{ORIGIN_PREFIX}reverse_{}", name_part(shard, 40))
}

/// The slot on `shard` for reverse epoch `epoch`: `<slot>_rev_<shard>_<epoch>`, within
/// PostgreSQL's 63 bytes and its alphabet (lower case letters, digits, `_`).
pub fn slot_name(forward_slot: &str, shard: &str, epoch: i32) -> String {
    let tail = format!("_{epoch}");
    let base = format!(
        "{}_rev_{}",
        name_part(forward_slot, 24),
        name_part(shard, 23)
    );
    format!("{base}{tail}")
}

/// The publication on a shard that carries its writes back: `<publication>_reverse`.
pub fn publication_name(forward_publication: &str) -> String {
    format!("{forward_publication}_reverse")
}

/// `s` in slot-name alphabet, at most `max` bytes.
fn name_part(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .take(max)
        .collect()
}

/// Reading or writing `reshard.reverse` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReverseTableError {
    /// A query failed.
    #[error("{what} failed: {}", crate::pg::conn::error_text(error))]
    Query {
        /// What was being done.
        what: &'static str,
        /// The driver error.
        error: tokio_postgres::Error,
    },
    /// A value did not parse.
    #[error("reshard.reverse on the source holds an invalid value: {0}; fix or delete that row")]
    Invalid(String),
}

impl Classify for ReverseTableError {
    fn class(&self) -> ErrorClass {
        match self {
            ReverseTableError::Query { error, .. } => class_of_pg(error),
            ReverseTableError::Invalid(_) => ErrorClass::Definite,
        }
    }
}

fn q(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ReverseTableError {
    move |error| ReverseTableError::Query { what, error }
}

/// Creates `reshard.reverse` if missing.
pub async fn ensure_table(client: &Client) -> Result<(), ReverseTableError> {
    crate::pg::progress::create_if_missing(client, REVERSE_DDL)
        .await
        .map_err(q("creating reshard.reverse on the source"))
}

// `sequence_floors` through to_jsonb: NULL on a table an older reshard created without it.
const SELECT: &str = "SELECT shard, epoch, slot, publication, shard_system_id, start_lsn::text, \
     state, drain_lsn::text, (to_jsonb(r) -> 'sequence_floors')::text FROM reshard.reverse r";

/// Every row (none when the table does not exist: no shard was ever cut over with a fence).
pub async fn read_all(client: &Client) -> Result<Vec<ReverseRow>, ReverseTableError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('reshard.reverse') IS NOT NULL", &[])
        .await
        .map_err(q("looking for reshard.reverse on the source"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(&format!("{SELECT} ORDER BY shard"), &[])
        .await
        .map_err(q("reading reshard.reverse on the source"))?;
    rows.iter().map(parse_row).collect()
}

/// The row of `shard`, if any.
pub async fn read(client: &Client, shard: &str) -> Result<Option<ReverseRow>, ReverseTableError> {
    Ok(read_all(client)
        .await?
        .into_iter()
        .find(|r| r.shard == shard))
}

fn parse_row(r: &tokio_postgres::Row) -> Result<ReverseRow, ReverseTableError> {
    let get = |i: usize| -> Result<Option<String>, ReverseTableError> {
        r.try_get(i)
            .map_err(q("reading reshard.reverse on the source"))
    };
    let lsn = |i: usize| -> Result<Option<Lsn>, ReverseTableError> {
        get(i)?
            .map(|s| {
                s.parse::<Lsn>()
                    .map_err(|e| ReverseTableError::Invalid(e.to_string()))
            })
            .transpose()
    };
    let state = get(6)?.unwrap_or_default();
    Ok(ReverseRow {
        shard: get(0)?.unwrap_or_default(),
        epoch: r
            .try_get(1)
            .map_err(q("reading reshard.reverse on the source"))?,
        slot: get(2)?.unwrap_or_default(),
        publication: get(3)?.unwrap_or_default(),
        shard_system_id: get(4)?.unwrap_or_default(),
        start_lsn: lsn(5)?,
        state: ReverseState::parse(&state)
            .ok_or_else(|| ReverseTableError::Invalid(format!("state {state:?}")))?,
        drain_lsn: lsn(7)?,
        sequence_floors: match get(8)? {
            Some(t) if t != "null" => serde_json::from_str(&t)
                .map_err(|e| ReverseTableError::Invalid(format!("sequence_floors {t:?}: {e}")))?,
            _ => BTreeMap::new(),
        },
    })
}

/// Writes `row` (insert or replace the shard's row).
pub async fn write(client: &Client, row: &ReverseRow) -> Result<(), ReverseTableError> {
    let start = row.start_lsn.map(|l| l.to_string());
    let drain = row.drain_lsn.map(|l| l.to_string());
    let floors = serde_json::to_string(&row.sequence_floors)
        .map_err(|e| ReverseTableError::Invalid(format!("sequence_floors: {e}")))?;
    client
        .execute(
            "INSERT INTO reshard.reverse AS r \
               (shard, epoch, slot, publication, shard_system_id, start_lsn, state, drain_lsn, \
                sequence_floors, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6::text::pg_lsn, $7, $8::text::pg_lsn, $9::text::jsonb, now()) \
             ON CONFLICT (shard) DO UPDATE SET epoch = EXCLUDED.epoch, slot = EXCLUDED.slot, \
               publication = EXCLUDED.publication, shard_system_id = EXCLUDED.shard_system_id, \
               start_lsn = EXCLUDED.start_lsn, state = EXCLUDED.state, \
               drain_lsn = EXCLUDED.drain_lsn, sequence_floors = EXCLUDED.sequence_floors, \
               updated_at = now()",
            &[
                &row.shard,
                &row.epoch,
                &row.slot,
                &row.publication,
                &row.shard_system_id,
                &start,
                &row.state.as_str(),
                &drain,
                &floors,
            ],
        )
        .await
        .map_err(q("writing reshard.reverse on the source"))?;
    Ok(())
}

/// On the shard: the present `last_value` of each ascending sequence owned by a column of
/// `tables` (serial and identity columns), the floors of [`ReverseRow::sequence_floors`]. A
/// sequence never used there counts from its start.
pub async fn read_sequence_floors(
    client: &Client,
    tables: &[TableName],
) -> Result<BTreeMap<String, i64>, ReverseTableError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            "SELECT ps.schemaname || '.' || ps.sequencename, \
                    coalesce(ps.last_value, ps.start_value - ps.increment_by) \
               FROM pg_depend d \
               JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S' \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_sequences ps ON ps.schemaname = n.nspname AND ps.sequencename = c.relname \
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                AND d.deptype IN ('a', 'i') AND ps.increment_by > 0 \
                AND d.refobjid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t)",
            &[&names],
        )
        .await
        .map_err(q(
            "reading the sequences of the sharded tables on the shard",
        ))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)
                    .map_err(q("reading pg_sequences on the shard"))?,
                r.try_get(1)
                    .map_err(q("reading pg_sequences on the shard"))?,
            ))
        })
        .collect()
}

/// The ids the source can still hand out before it hands out one the cut-over shard has:
/// for the sequence with the least room, its name and `floor − the source's last_value` (at
/// or below 0: the next id the source draws may collide). `None` without floors.
pub async fn sequence_headroom(
    src: &Client,
    row: &ReverseRow,
) -> Result<Option<(String, i64)>, ReverseTableError> {
    if row.sequence_floors.is_empty() {
        return Ok(None);
    }
    let names: Vec<&String> = row.sequence_floors.keys().collect();
    let rows = src
        .query(
            "SELECT schemaname || '.' || sequencename, \
                    coalesce(last_value, start_value - increment_by) \
               FROM pg_sequences WHERE schemaname || '.' || sequencename = ANY($1)",
            &[&names],
        )
        .await
        .map_err(q("reading pg_sequences on the source"))?;
    let mut least: Option<(String, i64)> = None;
    for r in &rows {
        let name: String = r
            .try_get(0)
            .map_err(q("reading pg_sequences on the source"))?;
        let value: i64 = r
            .try_get(1)
            .map_err(q("reading pg_sequences on the source"))?;
        if let Some(floor) = row.sequence_floors.get(&name) {
            let room = floor.saturating_sub(value);
            if least.as_ref().is_none_or(|(_, l)| room < *l) {
                least = Some((name, room));
            }
        }
    }
    Ok(least)
}

/// On the shard: the reverse publication (exactly `tables`, the shard's names of the sharded
/// tables; inserts, updates and deletes, never TRUNCATE), then the logical slot (if missing).
/// Returns the slot's consistent point (or, for an existing slot, its confirmed position).
/// Not [`crate::pg::catalog::ensure_publication`]: that one publishes the source's names with
/// every operation.
pub async fn create_on_shard(
    client: &Client,
    row: &ReverseRow,
    tables: &[TableName],
) -> Result<Lsn, ReverseTableError> {
    let list = tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&row.publication],
        )
        .await
        .map_err(q("reading pg_publication on the shard"))?
        .is_some();
    // A partitioned table's changes must arrive under its own name, the one the reverse router
    // knows (under a partition's name they would be skipped as unlisted): via the root, which
    // is PostgreSQL 13+ (12 cannot publish a partitioned table at all).
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q("reading the shard's server_version_num"))?
        .get(0);
    let via_root = if version >= 130_000 {
        ", publish_via_partition_root = true"
    } else {
        ""
    };
    let publication = quote_ident(&row.publication);
    let sql = if exists {
        let mut sql = format!("ALTER PUBLICATION {publication} SET TABLE {list}");
        if !via_root.is_empty() {
            sql.push_str(&format!(
                "; ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
            ));
        }
        sql
    } else {
        format!(
            "CREATE PUBLICATION {publication} FOR TABLE {list} WITH (publish = 'insert, update, delete'{via_root})"
        )
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(q("creating the reverse publication on the shard"))?;
    // The publication exists before the slot: pgoutput reads it as of each decoded change.
    let existing = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&row.slot],
        )
        .await
        .map_err(q("reading pg_replication_slots on the shard"))?;
    let lsn: Option<String> = match existing {
        Some(r) => r.get(0),
        None => client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&row.slot],
            )
            .await
            .map_err(q("creating the reverse slot on the shard"))?
            .get(0),
    };
    lsn.unwrap_or_default()
        .parse()
        .map_err(|e: crate::lsn::ParseLsnError| ReverseTableError::Invalid(e.to_string()))
}

/// On the shard: drops the reverse slot, unless something still reads it (then
/// `Ok(false)`), and the reverse publication. `Ok(true)` once both are gone.
pub async fn drop_on_shard(client: &Client, row: &ReverseRow) -> Result<bool, ReverseTableError> {
    let active: Option<bool> = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&row.slot],
        )
        .await
        .map_err(q("reading pg_replication_slots on the shard"))?
        .map(|r| r.get(0));
    match active {
        Some(true) => return Ok(false),
        Some(false) => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&row.slot])
                .await
                .map_err(q("dropping the reverse slot on the shard"))?;
        }
        None => {}
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(&row.publication)
        ))
        .await
        .map_err(q("dropping the reverse publication on the shard"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_identifiers() {
        let s = slot_name("reshard", "Shard-1", 3);
        assert_eq!(s, "reshard_rev_shard_1_3");
        let long = slot_name(&"x".repeat(80), &"Y".repeat(80), i32::MAX);
        assert!(long.len() <= 63, "{long}");
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert!(origin_name("s1").starts_with(ORIGIN_PREFIX));
        assert_eq!(progress_shard("s1"), "reverse:s1");
        for st in [
            ReverseState::Starting,
            ReverseState::Streaming,
            ReverseState::Draining,
            ReverseState::RolledBack,
        ] {
            assert_eq!(ReverseState::parse(st.as_str()), Some(st));
        }
    }
}
