//! Routing: account_id → shard.
//!
//! In: committed row changes ([`Change`]) in source commit order, one at a time, from
//! transaction assembly; and, for the full load, raw `COPY` text fields of the key column.
//! Out: `(ShardId, Change)` pairs for the per-shard logs, in the order they must be applied.
//!
//! Invariants kept here:
//! - **Routing is total and stable.** The shard of a row is a pure function of its shard-key
//!   value: with `hash = "postgres"` it is the remainder PostgreSQL's own
//!   `PARTITION BY HASH (key)` with `MODULUS <number of shards>` gives the row (see [`hash`]),
//!   so `satisfies_hash_partition` can check any shard with plain SQL; with `hash = "map"` it is
//!   the [`AccountMap`] entry. Every row of a sharded table goes to exactly one shard; broadcast
//!   tables go to every shard; skipped tables go nowhere.
//! - **A key move is a delete plus an insert.** An UPDATE whose old and new keys live on
//!   different shards becomes DELETE (old row) on the old shard, then INSERT (full new row) on
//!   the new shard, in that order.
//! - **Nothing is guessed.** When the old shard of an UPDATE/DELETE cannot be known (the shard
//!   key is not in the replica identity), when a moved row lacks an unchanged TOAST column, or
//!   when a key is NULL or unparsable, routing fails with a definite [`RouteError`] naming the
//!   table, column, value and the fix. [`Router::route`] emits nothing for a change it fails
//!   on, so no shard sees half of it.
//!
//! Logical decoding messages (`pg_logical_emit_message`) are dropped: they describe the
//! source, not rows of any shard. The one exception is the cutover marker
//! ([`CUTOVER_MESSAGE_PREFIX`]), sent to every shard: it writes nothing there, but its
//! transaction moves each shard's progress past the marker at once.
//!
//! Text keys hash the bytes as received, which equal the source's bytes only when the
//! replication connection's `client_encoding` is the database encoding (reshard connects with
//! UTF8; a non-UTF8 source database with non-ASCII text keys would hash differently), and only
//! under a deterministic collation (the default).
//!
//! Docs relied on: hash partitioning
//! <https://www.postgresql.org/docs/current/ddl-partitioning.html>, replica identity
//! <https://www.postgresql.org/docs/current/sql-altertable.html#SQL-ALTERTABLE-REPLICA-IDENTITY>,
//! pgoutput tuple data
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.

pub mod error;
pub mod hash;
pub mod key;
pub mod map;
pub mod refresh;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU64;
use std::sync::Arc;

use crate::event::{
    Change, Oid, OldRow, Relation, ReplicaIdentity, Row, ShardId, TableId, Value,
    CUTOVER_MESSAGE_PREFIX,
};
use crate::pg::sql::TableName;

pub use error::{KeyError, RouteError};
pub use key::{Key, KeyType};
pub use map::AccountMap;

/// How a configured table is routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableMode {
    /// Each row goes to the shard of its `key` column's value.
    Sharded {
        /// The shard-key column.
        key: String,
        /// The key of a row never changes (`key_immutable`): when the replica identity lacks
        /// the key, an UPDATE routes by its new row and a DELETE goes to every shard.
        key_immutable: bool,
    },
    /// Every row goes to every shard (reference tables).
    Broadcast,
    /// The table is not replicated.
    Skip,
}

/// The routing rule of one source table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRule {
    /// Sharded, broadcast or skipped.
    pub mode: TableMode,
    /// The table's name on the shards, when it differs from the source's (the router does not
    /// use it; apply does).
    pub target: Option<TableName>,
}

/// Where the shard of a key comes from.
#[derive(Clone, Debug)]
pub enum HashKind {
    /// PostgreSQL's hash partitioning: shard = remainder of the row hash modulo the number of
    /// shards.
    Postgres,
    /// An explicit account → shard map.
    Map(Arc<AccountMap>),
}

/// What happens to a table the config does not list.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Unlisted {
    /// Sharded by the default key column when the table has it, else broadcast. The natural
    /// choice when the config lists no tables.
    #[default]
    Auto,
    /// Not replicated: only listed tables are.
    Skip,
}

/// Everything the router needs from the config.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    /// Shard names; the index is the [`ShardId`] and the hash remainder.
    pub shards: Vec<String>,
    /// Rules by source table.
    pub tables: Vec<(TableName, TableRule)>,
    /// The key column of sharded tables without an explicit key (e.g. `account_id`).
    pub default_key: String,
    /// Hash partitioning or an account map.
    pub hash: HashKind,
    /// Tables the config does not list.
    pub unlisted: Unlisted,
}

/// How the router places one relation (resolved once per relation and cached).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Placement {
    Sharded {
        /// Position of the key column in the relation's tuples.
        col: usize,
        /// The key's type, or `None` for an account map over a type routed by its raw text.
        key_type: Option<KeyType>,
        /// Whether UPDATE/DELETE old tuples carry the key (replica identity FULL, or the key
        /// column is part of the identity).
        key_in_identity: bool,
        /// The table is configured `key_immutable`.
        key_immutable: bool,
    },
    Broadcast,
    Skip,
}

struct Plan {
    rel: Arc<Relation>,
    placement: Placement,
}

/// A hasher for `TableId` (a `u32` OID): one multiply, no SipHash on the hot path.
#[derive(Default)]
struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (u64::from(n) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PlanCache = HashMap<TableId, Plan, BuildHasherDefault<OidHasher>>;

/// Routes changes to shards. Owns a per-relation cache of resolved rules; cloning it (e.g. one
/// per full-load worker) is cheap.
pub struct Router {
    shards: Vec<String>,
    modulus: NonZeroU64,
    rules: HashMap<TableName, TableRule>,
    default_key: String,
    hash: HashKind,
    unlisted: Unlisted,
    cache: PlanCache,
}

impl Clone for Router {
    fn clone(&self) -> Self {
        Router {
            shards: self.shards.clone(),
            modulus: self.modulus,
            rules: self.rules.clone(),
            default_key: self.default_key.clone(),
            hash: self.hash.clone(),
            unlisted: self.unlisted,
            cache: PlanCache::default(),
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("shards", &self.shards)
            .field("default_key", &self.default_key)
            .field("hash", &self.hash)
            .field("unlisted", &self.unlisted)
            .field("tables", &self.rules.len())
            .finish()
    }
}

/// A change that could not be routed, handed back whole (so that the caller can keep it in the
/// quarantine instead of losing it).
#[derive(Debug)]
pub struct Unrouted {
    /// Why it could not be routed.
    pub error: RouteError,
    /// The change, as it came in (an UPDATE that moves the row may have had unchanged TOAST
    /// values filled from its old row).
    pub change: Change,
}

/// How the full load routes the rows of one table (from [`Router::table_route`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableRoute {
    /// Each row goes to the shard of its key field.
    Sharded(ShardedKey),
    /// Every row goes to every shard.
    Broadcast,
    /// The table is not copied.
    Skip,
}

/// The key column of a sharded table, for routing raw `COPY` rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardedKey {
    /// `schema.table` quoted where needed, for messages.
    pub table: String,
    /// The key column's name.
    pub column: String,
    /// Position of the key column among the relation's columns (and so among the fields of a
    /// `COPY (SELECT <columns in relation order> …)` row).
    pub column_index: usize,
    key_type: Option<KeyType>,
}

/// `" (row id=5, region=eu)"` from the replica-identity columns of `row`, or `""`.
fn describe_row(rel: &Relation, row: &Row) -> String {
    let mut parts = Vec::new();
    for i in rel.key_indexes() {
        let (Some(c), Some(v)) = (rel.columns.get(i), row.get(i)) else {
            continue;
        };
        let v = match v {
            Value::Null => "NULL".to_owned(),
            Value::UnchangedToast => "(unchanged toast)".to_owned(),
            Value::Text(b) => key::display_value(b),
            Value::Binary(b) => format!("(binary, {} bytes)", b.len()),
        };
        parts.push(format!("{}={v}", c.name));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (row {})", parts.join(", "))
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "NULL".to_owned(),
        Value::UnchangedToast => "(unchanged toast)".to_owned(),
        Value::Text(b) => key::display_value(b),
        Value::Binary(b) => format!("(binary, {} bytes)", b.len()),
    }
}

impl Router {
    /// Validates the spec and builds the router.
    pub fn new(spec: RouteSpec) -> Result<Router, RouteError> {
        let cfg = |m: String| Err(RouteError::Config(m));
        if spec.shards.is_empty() {
            return cfg("no shards configured; list at least one [[shards]]".into());
        }
        if spec.shards.len() > usize::from(u16::MAX) + 1 {
            return cfg(format!(
                "{} shards configured; at most 65536 are supported",
                spec.shards.len()
            ));
        }
        for (i, s) in spec.shards.iter().enumerate() {
            if s.is_empty() {
                return cfg(format!("shard {i} has an empty name"));
            }
            if spec.shards.get(..i).is_some_and(|prev| prev.contains(s)) {
                return cfg(format!(
                    "shard name {s:?} is used twice; shard names must be unique"
                ));
            }
        }
        if spec.default_key.is_empty() {
            return cfg("the default shard key column is empty; set key = \"account_id\"".into());
        }
        if let HashKind::Map(m) = &spec.hash {
            if m.shards() != spec.shards.as_slice() {
                return cfg(format!(
                    "the account map was loaded for shards [{}] but the config has [{}]",
                    m.shards().join(", "),
                    spec.shards.join(", ")
                ));
            }
        }
        let mut rules = HashMap::with_capacity(spec.tables.len());
        for (name, rule) in spec.tables {
            if let TableMode::Sharded { key, .. } = &rule.mode {
                if key.is_empty() {
                    return cfg(format!("table {name}: empty shard key column"));
                }
            }
            if rules.contains_key(&name) {
                return cfg(format!("table {name} is configured twice"));
            }
            rules.insert(name, rule);
        }
        let modulus = NonZeroU64::new(spec.shards.len() as u64)
            .ok_or_else(|| RouteError::Config("no shards configured".into()))?;
        Ok(Router {
            shards: spec.shards,
            modulus,
            rules,
            default_key: spec.default_key,
            hash: spec.hash,
            unlisted: spec.unlisted,
            cache: PlanCache::default(),
        })
    }

    /// The shard names (index = [`ShardId`]).
    pub fn shard_names(&self) -> &[String] {
        &self.shards
    }

    /// The name of a shard (`"?"` for an id out of range).
    pub fn shard_name(&self, id: ShardId) -> &str {
        self.shards.get(id.index()).map_or("?", String::as_str)
    }

    /// The account map in use (`None` with `hash = "postgres"`).
    pub fn account_map(&self) -> Option<&Arc<AccountMap>> {
        match &self.hash {
            HashKind::Map(m) => Some(m),
            HashKind::Postgres => None,
        }
    }

    /// Routes by `map` from now on (a refreshed account map). With `hash = "postgres"` this
    /// does nothing.
    pub fn set_map(&mut self, map: Arc<AccountMap>) {
        if let HashKind::Map(m) = &mut self.hash {
            *m = map;
        }
    }

    /// The configured rule of a source table, if listed.
    pub fn rule(&self, schema: &str, table: &str) -> Option<&TableRule> {
        self.rules.get(&TableName::new(schema, table))
    }

    fn last_shard(&self) -> u16 {
        // Router::new caps the count at 65536; ids run 0..=65535.
        (self.modulus.get() - 1) as u16
    }

    /// Resolves how `rel` is routed (no caching).
    fn resolve(&self, rel: &Relation) -> Result<Placement, RouteError> {
        let (key, key_immutable) = match self.rule(&rel.namespace, &rel.name) {
            Some(TableRule {
                mode: TableMode::Sharded { key, key_immutable },
                ..
            }) => (key.as_str(), *key_immutable),
            Some(TableRule {
                mode: TableMode::Broadcast,
                ..
            }) => return Ok(Placement::Broadcast),
            Some(TableRule {
                mode: TableMode::Skip,
                ..
            }) => return Ok(Placement::Skip),
            None => match self.unlisted {
                Unlisted::Skip => return Ok(Placement::Skip),
                Unlisted::Auto if rel.column_index(&self.default_key).is_none() => {
                    return Ok(Placement::Broadcast)
                }
                // Unlisted tables make no immutability promise.
                Unlisted::Auto => (self.default_key.as_str(), false),
            },
        };
        let table = || rel.qualified_name();
        let (col, column) = rel
            .columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == key)
            .ok_or_else(|| RouteError::MissingKeyColumn {
                table: table(),
                column: key.to_owned(),
            })?;
        let key_type = match (KeyType::from_oid(column.type_oid), &self.hash) {
            (Some(t), _) => Some(t),
            (None, HashKind::Map(_)) => None,
            (None, HashKind::Postgres) => {
                return Err(RouteError::key(
                    table(),
                    column.name.clone(),
                    String::new(),
                    KeyError::UnsupportedType {
                        type_oid: column.type_oid,
                    },
                ))
            }
        };
        Ok(Placement::Sharded {
            col,
            key_type,
            key_in_identity: column.is_key || rel.replica_identity == ReplicaIdentity::Full,
            key_immutable,
        })
    }

    /// The cached placement of `rel`, resolving it on first sight or when the relation changed.
    fn placement(&mut self, rel: &Arc<Relation>) -> Result<Placement, RouteError> {
        if let Some(plan) = self.cache.get_mut(&rel.id) {
            if Arc::ptr_eq(&plan.rel, rel) {
                return Ok(plan.placement);
            }
            if *plan.rel == **rel {
                plan.rel = Arc::clone(rel);
                return Ok(plan.placement);
            }
        }
        let placement = self.resolve(rel)?;
        self.cache.insert(
            rel.id,
            Plan {
                rel: Arc::clone(rel),
                placement,
            },
        );
        Ok(placement)
    }

    /// Start-up check of one published relation: its rule resolves, its key column exists and
    /// has a supported type, and its replica identity carries the key (or the table is
    /// `key_immutable`), so UPDATE and DELETE can be routed. A
    /// [`RouteError::KeyNotInReplicaIdentity`] may be ignored for a publication that publishes
    /// neither updates nor deletes.
    pub fn validate_relation(&self, rel: &Relation) -> Result<(), RouteError> {
        match self.resolve(rel)? {
            Placement::Sharded {
                col,
                key_in_identity: false,
                key_immutable: false,
                ..
            } => Err(RouteError::KeyNotInReplicaIdentity {
                table: rel.qualified_name(),
                column: rel
                    .columns
                    .get(col)
                    .map_or_else(String::new, |c| c.name.clone()),
                op: "update/delete",
                row: String::new(),
            }),
            _ => Ok(()),
        }
    }

    /// How the full load routes the rows of `rel`.
    pub fn table_route(&self, rel: &Relation) -> Result<TableRoute, RouteError> {
        Ok(match self.resolve(rel)? {
            Placement::Sharded { col, key_type, .. } => TableRoute::Sharded(ShardedKey {
                table: rel.qualified_name(),
                column: rel
                    .columns
                    .get(col)
                    .map_or_else(String::new, |c| c.name.clone()),
                column_index: col,
                key_type,
            }),
            Placement::Broadcast => TableRoute::Broadcast,
            Placement::Skip => TableRoute::Skip,
        })
    }

    /// The shard of one raw `COPY … TO STDOUT` (text format) key field of a sharded table:
    /// `\N` is NULL (an error), backslash escapes of string keys are undone.
    pub fn shard_of_copy_field(
        &self,
        key: &ShardedKey,
        field: &[u8],
    ) -> Result<ShardId, RouteError> {
        let res = if key::is_copy_null(field) {
            Err(KeyError::Null)
        } else {
            match key.key_type {
                Some(t) if !t.needs_copy_unescape() => {
                    t.parse_text(field).and_then(|k| self.shard_of_key(&k))
                }
                t => {
                    let text = key::unescape_copy_field(field);
                    match t {
                        Some(t) => t.parse_text(&text),
                        None => Ok(Key::Bytes(&text)),
                    }
                    .and_then(|k| self.shard_of_key(&k))
                }
            }
        };
        res.map_err(|source| {
            RouteError::key(key.table.clone(), key.column.clone(), String::new(), source)
        })
    }

    /// The shard of a key given as its text form (pgoutput's text, or a COPY field without
    /// escapes), for a column of type `type_oid`. With an account map, a type that is not a
    /// supported key type is looked up by its exact text.
    pub fn shard_of_text(&self, type_oid: Oid, text: &[u8]) -> Result<ShardId, KeyError> {
        match &self.hash {
            HashKind::Map(m) => m.shard_of_text(type_oid, text),
            HashKind::Postgres => match KeyType::from_oid(type_oid) {
                Some(t) => self.shard_of_key(&t.parse_text(text)?),
                None => Err(KeyError::UnsupportedType { type_oid }),
            },
        }
    }

    /// The shard of a parsed key.
    #[inline]
    pub fn shard_of_key(&self, key: &Key<'_>) -> Result<ShardId, KeyError> {
        match &self.hash {
            HashKind::Postgres => {
                // The remainder is below the shard count, itself at most 65536.
                Ok(ShardId((key.row_hash() % self.modulus) as u16))
            }
            HashKind::Map(m) => m.lookup(key),
        }
    }

    #[inline]
    fn shard_of_value(&self, key_type: Option<KeyType>, v: &Value) -> Result<ShardId, KeyError> {
        match (v, key_type) {
            (Value::Null, _) => Err(KeyError::Null),
            (Value::UnchangedToast, _) => Err(KeyError::UnchangedToast),
            (Value::Text(b), Some(t)) => self.shard_of_key(&t.parse_text(b)?),
            (Value::Text(b), None) => self.shard_of_key(&Key::Bytes(b)),
            (Value::Binary(b), Some(t)) => self.shard_of_key(&t.parse_binary(b)?),
            (Value::Binary(_), None) => Err(KeyError::BinaryMapLookup { type_oid: 0 }),
        }
    }

    /// The shard of `row`'s key, with errors naming the table and the row.
    fn shard_of_row(
        &self,
        rel: &Relation,
        row: &Row,
        col: usize,
        key_type: Option<KeyType>,
        op: &'static str,
    ) -> Result<ShardId, RouteError> {
        let v = row_value(rel, row, col, op)?;
        self.shard_of_value(key_type, v)
            .map_err(|e| key_error(rel, row, col, e))
    }

    /// Emits `change` to every shard (the last one gets the original, the others clones).
    fn to_all(&self, change: Change, out: &mut impl FnMut(ShardId, Change)) {
        let last = self.last_shard();
        for i in 0..last {
            out(ShardId(i), change.clone());
        }
        out(ShardId(last), change);
    }

    /// Routes one change: calls `out` once per `(shard, change)` it becomes, in apply order.
    /// On error nothing has been emitted for this change.
    pub fn route(
        &mut self,
        change: Change,
        out: &mut impl FnMut(ShardId, Change),
    ) -> Result<(), RouteError> {
        self.route_or_return(change, out).map_err(|u| u.error)
    }

    /// Like [`Router::route`], but a change that cannot be routed is handed back with the
    /// error (nothing has been emitted for it).
    pub fn route_or_return(
        &mut self,
        change: Change,
        out: &mut impl FnMut(ShardId, Change),
    ) -> Result<(), Box<Unrouted>> {
        let back = |error: RouteError, change: Change| Box::new(Unrouted { error, change });
        let placement = match &change {
            Change::Insert { rel, .. }
            | Change::Update { rel, .. }
            | Change::Delete { rel, .. }
            | Change::DeleteRange { rel, .. } => match self.placement(rel) {
                Ok(p) => p,
                Err(e) => return Err(back(e, change)),
            },
            Change::Truncate { .. } => {
                self.route_truncate(change, out);
                return Ok(());
            }
            Change::Message { prefix, .. } if prefix == CUTOVER_MESSAGE_PREFIX => {
                self.to_all(change, out);
                return Ok(());
            }
            Change::Message { .. } => return Ok(()),
        };
        let (col, key_type, key_in_identity, key_immutable) = match placement {
            Placement::Skip => return Ok(()),
            Placement::Broadcast => {
                self.to_all(change, out);
                return Ok(());
            }
            Placement::Sharded {
                col,
                key_type,
                key_in_identity,
                key_immutable,
            } => (col, key_type, key_in_identity, key_immutable),
        };
        match change {
            Change::Insert { rel, new } => {
                match self.shard_of_row(&rel, &new, col, key_type, "insert") {
                    Ok(shard) => out(shard, Change::Insert { rel, new }),
                    Err(e) => return Err(back(e, Change::Insert { rel, new })),
                }
            }
            Change::Delete { rel, old } => {
                let shard = match old_key(&old, col, key_in_identity) {
                    Some(_) => self.shard_of_row(&rel, old.row(), col, key_type, "delete"),
                    None if key_immutable => {
                        // Only the primary key is known, and exactly one shard holds it (the
                        // source's key is unique): delete it by key everywhere.
                        self.to_all(Change::Delete { rel, old }, out);
                        return Ok(());
                    }
                    None => Err(RouteError::KeyNotInReplicaIdentity {
                        table: rel.qualified_name(),
                        column: column_name(&rel, col),
                        op: "delete",
                        row: describe_row(&rel, old.row()),
                    }),
                };
                match shard {
                    Ok(shard) => out(shard, Change::Delete { rel, old }),
                    Err(e) => return Err(back(e, Change::Delete { rel, old })),
                }
            }
            Change::Update { rel, old, new } if !key_in_identity && key_immutable => {
                // The old row carries no key, but the key never changes: the new row's key
                // is the old one's.
                match self.shard_of_row(&rel, &new, col, key_type, "update") {
                    Ok(shard) => out(shard, Change::Update { rel, old, new }),
                    Err(e) => return Err(back(e, Change::Update { rel, old, new })),
                }
            }
            Change::Update { rel, old, new } => {
                self.route_update(rel, old, new, col, key_type, key_in_identity, out)?;
            }
            // A range of keys is on every shard.
            c @ Change::DeleteRange { .. } => self.to_all(c, out),
            Change::Truncate { .. } | Change::Message { .. } => {}
        }
        Ok(())
    }

    /// [`Router::route_into`] that hands an unroutable change back
    /// ([`Router::route_or_return`]).
    pub fn route_into_or_return(
        &mut self,
        change: Change,
        out: &mut Vec<(ShardId, Change)>,
    ) -> Result<(), Box<Unrouted>> {
        self.route_or_return(change, &mut |s, c| out.push((s, c)))
    }

    /// Convenience for fallible sinks: appends the routed changes to `out` (reuse the vector
    /// to stay allocation-free), then the caller drains it.
    pub fn route_into(
        &mut self,
        change: Change,
        out: &mut Vec<(ShardId, Change)>,
    ) -> Result<(), RouteError> {
        self.route(change, &mut |s, c| out.push((s, c)))
    }

    #[allow(clippy::too_many_arguments)]
    fn route_update(
        &self,
        rel: Arc<Relation>,
        old: Option<OldRow>,
        mut new: Row,
        col: usize,
        key_type: Option<KeyType>,
        key_in_identity: bool,
        out: &mut impl FnMut(ShardId, Change),
    ) -> Result<(), Box<Unrouted>> {
        match self.update_shards(&rel, old.as_ref(), &mut new, col, key_type, key_in_identity) {
            Ok((old_shard, new_shard)) if old_shard == new_shard => {
                out(new_shard, Change::Update { rel, old, new });
                Ok(())
            }
            Ok((old_shard, new_shard)) => {
                // The key moved to another shard: delete there, insert the full new row here.
                // `update_shards` returns different shards only when it read them from `old`.
                let Some(old) = old else {
                    return Err(Box::new(Unrouted {
                        error: RouteError::KeyNotInReplicaIdentity {
                            table: rel.qualified_name(),
                            column: column_name(&rel, col),
                            op: "update",
                            row: describe_row(&rel, &new),
                        },
                        change: Change::Update {
                            rel,
                            old: None,
                            new,
                        },
                    }));
                };
                out(
                    old_shard,
                    Change::Delete {
                        rel: Arc::clone(&rel),
                        old,
                    },
                );
                out(new_shard, Change::Insert { rel, new });
                Ok(())
            }
            Err(error) => Err(Box::new(Unrouted {
                error,
                change: Change::Update { rel, old, new },
            })),
        }
    }

    /// The old and new shard of an UPDATE; when they differ, fills `new`'s unchanged TOAST
    /// values from the old row (a moving row is inserted whole).
    fn update_shards(
        &self,
        rel: &Arc<Relation>,
        old: Option<&OldRow>,
        new: &mut Row,
        col: usize,
        key_type: Option<KeyType>,
        key_in_identity: bool,
    ) -> Result<(ShardId, ShardId), RouteError> {
        let rel = &**rel;
        let new_v = row_value(rel, new, col, "update")?;
        // The old side: from the old tuple when it carries the key; when no old tuple was sent
        // and the key is part of the replica identity, the identity (so the key) is unchanged.
        let old_shard = match old {
            Some(o) => match old_key(o, col, key_in_identity) {
                Some(v) if !matches!(v, Value::UnchangedToast) => {
                    Some(self.shard_of_row(rel, o.row(), col, key_type, "update")?)
                }
                _ => {
                    return Err(RouteError::KeyNotInReplicaIdentity {
                        table: rel.qualified_name(),
                        column: column_name(rel, col),
                        op: "update",
                        row: describe_row(rel, o.row()),
                    })
                }
            },
            None if key_in_identity => None,
            None => {
                return Err(RouteError::KeyNotInReplicaIdentity {
                    table: rel.qualified_name(),
                    column: column_name(rel, col),
                    op: "update",
                    row: describe_row(rel, new),
                })
            }
        };
        let new_shard = match (new_v, old_shard) {
            // The key itself was not sent because it did not change.
            (Value::UnchangedToast, Some(s)) => s,
            _ => self.shard_of_row(rel, new, col, key_type, "update")?,
        };
        let old_shard = old_shard.unwrap_or(new_shard);
        if old_shard != new_shard {
            if let Some(o) = old {
                self.fill_unchanged_toast(rel, o, new, col, old_shard, new_shard)?;
            }
        }
        Ok((old_shard, new_shard))
    }

    /// Replaces unchanged-TOAST placeholders of a moving row's new image with the old values,
    /// which only a REPLICA IDENTITY FULL old row carries.
    fn fill_unchanged_toast(
        &self,
        rel: &Relation,
        old: &OldRow,
        new: &mut Row,
        col: usize,
        from: ShardId,
        to: ShardId,
    ) -> Result<(), RouteError> {
        for (i, v) in new.iter_mut().enumerate() {
            if !matches!(v, Value::UnchangedToast) {
                continue;
            }
            match old {
                OldRow::Full(o) => match o.get(i) {
                    Some(ov) if !matches!(ov, Value::UnchangedToast) => {
                        *v = ov.clone();
                        continue;
                    }
                    _ => {}
                },
                OldRow::Key(_) => {}
            }
            return Err(RouteError::UnchangedToastOnMove(Box::new(
                error::ToastMove {
                    table: rel.qualified_name(),
                    column_key: column_name(rel, col),
                    old_key: old.row().get(col).map_or_else(String::new, value_text),
                    new_key: new.get(col).map_or_else(String::new, value_text),
                    row: describe_row(rel, old.row()),
                    column: column_name(rel, i),
                    from: self.shard_name(from).to_owned(),
                    to: self.shard_name(to).to_owned(),
                },
            )));
        }
        Ok(())
    }

    fn route_truncate(&mut self, change: Change, out: &mut impl FnMut(ShardId, Change)) {
        let Change::Truncate {
            rels,
            cascade,
            restart_identity,
        } = change
        else {
            return;
        };
        // Sharded and broadcast tables live on every shard; only skipped tables are left out.
        let skipped = |r: &Relation| match self.rule(&r.namespace, &r.name) {
            Some(rule) => rule.mode == TableMode::Skip,
            None => self.unlisted == Unlisted::Skip,
        };
        let rels = if rels.iter().any(|r| skipped(r)) {
            rels.into_iter().filter(|r| !skipped(r)).collect()
        } else {
            rels
        };
        if !rels.is_empty() {
            self.to_all(
                Change::Truncate {
                    rels,
                    cascade,
                    restart_identity,
                },
                out,
            );
        }
    }
}

/// The old tuple's key value, if the old tuple carries it.
fn old_key(old: &OldRow, col: usize, key_in_identity: bool) -> Option<&Value> {
    match old {
        OldRow::Full(r) => r.get(col),
        OldRow::Key(r) if key_in_identity => r.get(col),
        OldRow::Key(_) => None,
    }
}

fn column_name(rel: &Relation, col: usize) -> String {
    rel.columns
        .get(col)
        .map_or_else(|| format!("#{col}"), |c| c.name.clone())
}

fn row_value<'r>(
    rel: &Relation,
    row: &'r Row,
    col: usize,
    op: &'static str,
) -> Result<&'r Value, RouteError> {
    match row.get(col) {
        Some(v) if row.len() == rel.columns.len() => Ok(v),
        _ => Err(RouteError::RowShape {
            table: rel.qualified_name(),
            op,
            got: row.len(),
            want: rel.columns.len(),
        }),
    }
}

fn key_error(rel: &Relation, row: &Row, col: usize, e: KeyError) -> RouteError {
    let e = match e {
        KeyError::BinaryMapLookup { .. } => KeyError::BinaryMapLookup {
            type_oid: rel.columns.get(col).map_or(0, |c| c.type_oid),
        },
        e => e,
    };
    RouteError::key(
        rel.qualified_name(),
        column_name(rel, col),
        describe_row(rel, row),
        e,
    )
}

#[cfg(test)]
mod tests;
