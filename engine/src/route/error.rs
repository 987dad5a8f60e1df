//! Routing errors.
//!
//! Every message names the table, the key column, the value and the fix. All routing errors are
//! definite: the same change routes the same way on every retry, so retrying cannot help; the
//! operator must fix the config, the account map or the source table.

use crate::error::{Classify, ErrorClass};
use crate::event::Oid;

use super::key::{display_value, KeyType, SUPPORTED_KEY_TYPES};

/// Why one key value could not be turned into a shard (no table context; [`RouteError::Key`]
/// adds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is NULL.
    #[error("the shard key is NULL")]
    Null,
    /// The key is an unchanged TOAST value that was not sent.
    #[error("the shard key was not sent (unchanged TOAST value)")]
    UnchangedToast,
    /// The bytes are not a value of the key's type.
    #[error("{value:?} is not a valid {type_name} (expected {expected})")]
    Unparsable {
        /// SQL name of the key type.
        type_name: &'static str,
        /// The value as received (lossy UTF-8, shortened).
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The key column's type cannot be hashed like PostgreSQL does.
    #[error(
        "type OID {type_oid} cannot be hashed like PostgreSQL's PARTITION BY HASH; supported key \
         types: {SUPPORTED_KEY_TYPES}; use hash = \"map\" or route this table by another column"
    )]
    UnsupportedType {
        /// `pg_type` OID of the key column.
        type_oid: Oid,
    },
    /// The account map has no entry for the key and no default shard.
    #[error(
        "account {account:?} is not in the account map; add it to the map or configure a \
         default shard for unmapped accounts"
    )]
    UnknownAccount {
        /// The key value.
        account: String,
    },
    /// A binary key cannot be looked up in the account map for this column type.
    #[error(
        "binary values of type OID {type_oid} cannot be looked up in the account map; \
         replicate with binary = false"
    )]
    BinaryMapLookup {
        /// `pg_type` OID of the key column.
        type_oid: Oid,
    },
}

impl KeyError {
    pub(crate) fn unparsable(ty: KeyType, value: &[u8], expected: &'static str) -> KeyError {
        KeyError::Unparsable {
            type_name: ty.name(),
            value: display_value(value),
            expected,
        }
    }
}

impl Classify for KeyError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

/// Why a change could not be routed, or a routing spec or account map is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// One key value could not be routed.
    #[error(transparent)]
    Key(Box<KeyFailure>),
    /// A sharded table does not have its key column.
    #[error(
        "table {table} has no column {column} to route by; set its key in the config \
         ([tables.\"{table}\"] key = \"…\"), or mark it mode = \"broadcast\" or \"skip\""
    )]
    MissingKeyColumn {
        /// `schema.table`.
        table: String,
        /// The configured key column.
        column: String,
    },
    /// UPDATE/DELETE cannot be routed because the old row does not carry the shard key.
    #[error(
        "table {table}: {op} cannot be routed because shard key column {column} is not part of \
         the replica identity, so the old row's shard is unknown{row}; run: ALTER TABLE {table} \
         REPLICA IDENTITY FULL (or include {column} in the primary key)"
    )]
    KeyNotInReplicaIdentity {
        /// `schema.table`.
        table: String,
        /// Key column.
        column: String,
        /// `update` or `delete`, or `update/delete` at start-up.
        op: &'static str,
        /// `" (row id=5)"` or empty.
        row: String,
    },
    /// A row moves to another shard but its new image lacks an unchanged TOAST column.
    #[error(transparent)]
    UnchangedToastOnMove(Box<ToastMove>),
    /// A row has a different number of values than its relation has columns.
    #[error(
        "table {table}: a {op} carries {got} values but the relation has {want} columns \
         (decoder and relation cache disagree)"
    )]
    RowShape {
        /// `schema.table`.
        table: String,
        /// Change kind.
        op: &'static str,
        /// Values in the row.
        got: usize,
        /// Columns in the relation.
        want: usize,
    },
    /// The routing spec is invalid.
    #[error("routing config: {0}")]
    Config(String),
    /// A line of the account map file is invalid.
    #[error("account map {source_name} {unit} {line}: {message}")]
    MapLine {
        /// File path, or `query`.
        source_name: String,
        /// `line` (file) or `row` (query).
        unit: &'static str,
        /// 1-based line or row number.
        line: u64,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A refreshed account map moves an account to another shard.
    #[error(
        "the refreshed account map moves account {account:?} from shard {from} to shard {to}; \
         a refresh never moves an account between live shards (its rows are on shard {from}; \
         account moves are a separate feature, issue 17): the refresh is refused and the \
         previous map stays in use; map the account to shard {from} again"
    )]
    MapMove {
        /// The account.
        account: String,
        /// Its shard in the map in use.
        from: String,
        /// Its shard in the refreshed map.
        to: String,
    },
    /// `[routing] map_query` failed.
    #[error("[routing] map_query {query:?} failed on the source: {message}")]
    MapQuery {
        /// The query.
        query: String,
        /// The error.
        message: String,
    },
    /// The account map file cannot be read.
    #[error("account map {path}: {message}")]
    MapFile {
        /// File path.
        path: String,
        /// The I/O or CSV error.
        message: String,
    },
}

impl Classify for RouteError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

/// [`RouteError::Key`]: a key value that could not be routed, with its table context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table {table}, shard key column {column}{row}: {source}")]
pub struct KeyFailure {
    /// `schema.table`.
    pub table: String,
    /// Key column.
    pub column: String,
    /// `" (row id=5, …)"`: the row's replica-identity values, when known; else empty.
    pub row: String,
    /// What is wrong with the value.
    pub source: KeyError,
}

/// [`RouteError::UnchangedToastOnMove`]: a row moving between shards lacks a TOAST value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "table {table}: an UPDATE changes {column_key} from {old_key} to {new_key}, moving the \
         row{row} from shard {from} to shard {to}, but column {column} is an unchanged TOAST \
         value that was not sent, so the row cannot be inserted on shard {to}; run: ALTER TABLE \
         {table} REPLICA IDENTITY FULL"
)]
pub struct ToastMove {
    /// `schema.table`.
    pub table: String,
    /// Shard key column.
    pub column_key: String,
    /// Old key value.
    pub old_key: String,
    /// New key value.
    pub new_key: String,
    /// `" (id=5)"`: the row's replica-identity values, or empty.
    pub row: String,
    /// The column that was not sent.
    pub column: String,
    /// Old shard name.
    pub from: String,
    /// New shard name.
    pub to: String,
}

impl RouteError {
    /// A key failure of `table`.`column`.
    pub fn key(table: String, column: String, row: String, source: KeyError) -> RouteError {
        RouteError::Key(Box::new(KeyFailure {
            table,
            column,
            row,
            source,
        }))
    }
}
