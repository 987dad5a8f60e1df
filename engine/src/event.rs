//! Types that cross stage boundaries, defined once.
//!
//! In: the decoder builds [`Relation`]s and [`Change`]s from pgoutput messages; transaction
//! assembly wraps them into [`TxnEvent`]s (Begin, Change*, Commit — contiguous per transaction,
//! in source commit order). Out: the router turns each change into `(ShardId, Change)` pairs;
//! the spill log stores them; each shard's apply consumes [`ShardEvent`]s.
//!
//! Invariant kept here: a value is carried exactly as PostgreSQL sent it ([`Value::Text`] holds
//! the text form byte for byte), so every value round-trips.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;

/// A PostgreSQL object identifier.
pub type Oid = u32;

/// A PostgreSQL transaction id.
pub type Xid = u32;

/// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's `TimestampTz` epoch).
pub type PgTimestamp = i64;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Prefix of the transactional logical message `reshard cutover` writes on the source as its
/// marker. Routing sends it to every shard, so a caught-up shard's progress passes the marker
/// with its next commit instead of its next idle heartbeat.
pub const CUTOVER_MESSAGE_PREFIX: &str = "reshard.cutover";

/// Now, as a [`PgTimestamp`].
pub fn pg_now() -> PgTimestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_micros() as i64 - PG_EPOCH_OFFSET_MICROS
}

/// Index of a target shard: its position in the config's `[[shards]]` list, which is also the
/// hash-partition remainder it holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ShardId(pub u16);

impl ShardId {
    /// As a vector index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A source table, by relation OID.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId(pub Oid);

/// `pg_class.relreplident`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing; updates and deletes cannot be replicated.
    Nothing,
    /// `f`: the whole old row.
    Full,
    /// `i`: the columns of a unique index.
    Index,
}

impl ReplicaIdentity {
    /// From the `relreplident` byte.
    pub fn from_byte(b: u8) -> Option<ReplicaIdentity> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    /// The `relreplident` byte.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// A column of a published relation, as the Relation message describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `pg_type` OID.
    pub type_oid: Oid,
    /// `atttypmod`.
    pub type_modifier: i32,
    /// Part of the replica identity (flag bit 1 of the Relation message).
    pub is_key: bool,
}

/// A published relation (pgoutput `Relation` message). Shared by every change of it as
/// `Arc<Relation>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Relation {
    /// Relation OID on the source.
    pub id: TableId,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Columns in the order tuples carry them (dropped and generated columns are not sent).
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`, quoted where needed.
    pub fn qualified_name(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.namespace),
            quote_ident(&self.name)
        )
    }

    /// Position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Positions of the replica-identity columns.
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }
}

/// Quotes an SQL identifier if it is not a plain lower-case name.
pub fn quote_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain && !is_reserved(s) {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

fn is_reserved(s: &str) -> bool {
    // The reserved key words that can appear as plain column names in practice.
    const RESERVED: &[&str] = &[
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "asymmetric",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "current_catalog",
        "current_date",
        "current_role",
        "current_time",
        "current_timestamp",
        "current_user",
        "default",
        "deferrable",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "fetch",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "having",
        "in",
        "initially",
        "intersect",
        "into",
        "lateral",
        "leading",
        "limit",
        "localtime",
        "localtimestamp",
        "not",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "placing",
        "primary",
        "references",
        "returning",
        "select",
        "session_user",
        "some",
        "symmetric",
        "table",
        "then",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "variadic",
        "when",
        "where",
        "window",
        "with",
        "authorization",
        "binary",
        "collation",
        "concurrently",
        "cross",
        "current_schema",
        "freeze",
        "full",
        "ilike",
        "inner",
        "is",
        "isnull",
        "join",
        "left",
        "like",
        "natural",
        "notnull",
        "outer",
        "overlaps",
        "right",
        "similar",
        "tablesample",
        "verbose",
    ];
    RESERVED.contains(&s)
}

/// One column value of a tuple, as pgoutput sent it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: unchanged TOASTed value; not sent, must not be written.
    UnchangedToast,
    /// `t`: the value's text form, byte for byte.
    Text(Bytes),
    /// `b`: the value's binary send form (only with `binary = true`).
    Binary(Bytes),
}

/// A tuple: one [`Value`] per column of its [`Relation`], in relation order.
pub type Row = Vec<Value>;

/// The old side of an UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldRow {
    /// `K`: only the replica-identity columns are meaningful (others are NULL).
    Key(Row),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Row),
}

impl OldRow {
    /// The values, whichever kind.
    pub fn row(&self) -> &Row {
        match self {
            OldRow::Key(r) | OldRow::Full(r) => r,
        }
    }
}

/// One row-level (or table-level) change inside a source transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// INSERT.
    Insert {
        /// The table.
        rel: Arc<Relation>,
        /// The new row.
        new: Row,
    },
    /// UPDATE. `old` is present when the replica identity changed or the table has REPLICA
    /// IDENTITY FULL; otherwise the key is taken from `new`.
    Update {
        /// The table.
        rel: Arc<Relation>,
        /// Old key or old row, if sent.
        old: Option<OldRow>,
        /// The new row (may contain [`Value::UnchangedToast`]).
        new: Row,
    },
    /// DELETE.
    Delete {
        /// The table.
        rel: Arc<Relation>,
        /// Old key or old row.
        old: OldRow,
    },
    /// TRUNCATE of one or more tables.
    Truncate {
        /// The tables.
        rels: Vec<Arc<Relation>>,
        /// `CASCADE` was given.
        cascade: bool,
        /// `RESTART IDENTITY` was given.
        restart_identity: bool,
    },
    /// DELETE of every row whose integer key lies in a range: what a TRUNCATE of a table loaded
    /// in watermark chunks means for the rows of the chunks read before it (the chunks read
    /// after it hold rows written after it). Made by the full-load handoff, never decoded.
    DeleteRange {
        /// The table.
        rel: Arc<Relation>,
        /// The key columns (unquoted), in key order.
        key: Vec<String>,
        /// Rows whose key is above this one (exclusive); `None`: from the first row.
        after: Option<Vec<i64>>,
        /// Rows whose key is up to this one (inclusive); `None`: to the last row.
        upto: Option<Vec<i64>>,
    },
    /// A transactional logical decoding message (`pg_logical_emit_message(true, …)`).
    Message {
        /// The prefix.
        prefix: String,
        /// The content.
        content: Bytes,
    },
}

impl Change {
    /// The relation a row change belongs to (`None` for TRUNCATE and messages).
    pub fn relation(&self) -> Option<&Arc<Relation>> {
        match self {
            Change::Insert { rel, .. }
            | Change::Update { rel, .. }
            | Change::Delete { rel, .. }
            | Change::DeleteRange { rel, .. } => Some(rel),
            Change::Truncate { .. } | Change::Message { .. } => None,
        }
    }

    /// `insert`, `update`, `delete`, `delete_range`, `truncate` or `message`.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Insert { .. } => "insert",
            Change::Update { .. } => "update",
            Change::Delete { .. } => "delete",
            Change::DeleteRange { .. } => "delete_range",
            Change::Truncate { .. } => "truncate",
            Change::Message { .. } => "message",
        }
    }
}

/// Start of a committed source transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    /// Top-level transaction id.
    pub xid: Xid,
    /// LSN of the commit record (pgoutput's `final_lsn`): the transaction's position in commit
    /// order, and what a shard's progress records.
    pub commit_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// End of a committed source transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Top-level transaction id.
    pub xid: Xid,
    /// LSN of the commit record (same as [`Begin::commit_lsn`]).
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm to the slot once this transaction is
    /// safe.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// What transaction assembly emits: committed transactions, each contiguous
/// (`Begin`, `Change`*, `Commit`), in source commit order.
#[derive(Clone, Debug, PartialEq)]
pub enum TxnEvent {
    /// A transaction starts.
    Begin(Begin),
    /// One of its changes, in source order.
    Change(Change),
    /// It committed.
    Commit(Commit),
}

/// What one shard's apply pipeline consumes, in source commit order.
#[derive(Clone, Debug, PartialEq)]
pub enum ShardEvent {
    /// A source transaction with changes for this shard starts.
    Begin(Begin),
    /// One change for this shard.
    Change(Change),
    /// That transaction committed.
    Commit(Commit),
    /// Nothing for this shard up to and including this LSN: the shard may record progress
    /// there (so that an idle shard is not reported as lagging).
    Heartbeat(Lsn),
}

/// One shard's readable log, read by that shard's apply pipeline.
///
/// The spill log implements it (see `spill`); tests may use an in-memory one. A reader may
/// fail with a transient error at any time (for instance when the source connection dropped in
/// the middle of a transaction and the log was cut back to the last complete one): the apply
/// pipeline then rolls back its open target transaction and opens a new reader after its own
/// durable progress.
pub trait ShardLog: Send + Sync + 'static {
    /// The cursor type.
    type Reader: ShardReader;
    /// The error when opening fails.
    type Error: std::error::Error + crate::error::Classify + Send + Sync + 'static;

    /// A cursor for `shard` positioned after every transaction with `commit_lsn <= after`.
    fn open_reader(&self, shard: ShardId, after: Lsn) -> Result<Self::Reader, Self::Error>;

    /// Tells the log that `shard` has durably applied everything up to and including
    /// `commit_lsn`, so data at or below it may be discarded once every shard is past it.
    fn applied(&self, shard: ShardId, commit_lsn: Lsn);
}

/// A cursor over one shard's events, in source commit order.
pub trait ShardReader: Send + 'static {
    /// The error when reading fails.
    type Error: std::error::Error + crate::error::Classify + Send + Sync + 'static;

    /// The next event; waits until there is one. Cancel-safe: if the future is dropped before
    /// it completes, no event is lost (the next call returns it).
    fn next(&mut self)
        -> impl std::future::Future<Output = Result<ShardEvent, Self::Error>> + Send;
}
