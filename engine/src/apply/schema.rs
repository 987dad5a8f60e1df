//! The target side of one source table: which target table, which columns, which key.
//!
//! In: a source [`Relation`] (as pgoutput describes it) and the target table's catalog rows
//! (`pg_attribute`, `pg_index`). Out: a [`TargetTable`]: source columns mapped BY NAME to
//! target columns, the match key, and the SQL of the set-based statements. Invariant: the
//! target column list never contains a stored generated column (PostgreSQL 18 may publish them,
//! `publish_generated_columns = stored`: the target computes its own, as the full load leaves
//! them to it), and a source column that the target lacks is a definite error naming shard,
//! table and column (never a silent drop).
//!
//! The match key is the target's primary key when every one of its columns is part of the
//! source's replica identity (so the old key of every UPDATE/DELETE is known); upserts then use
//! `INSERT … ON CONFLICT (pk) DO UPDATE`. Otherwise it is the source's replica identity columns
//! (`is_key`, or every column for REPLICA IDENTITY FULL), compared with `IS NOT DISTINCT FROM`,
//! and an upsert is a delete then an insert; under REPLICA IDENTITY FULL identical rows may
//! repeat, so each UPDATE/DELETE then changes exactly one of them, as PostgreSQL's own apply
//! does. A table without either only takes inserts.
//! See <https://www.postgresql.org/docs/current/logical-replication-publication.html> on
//! replica identity.

use std::sync::Arc;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::text::sql_literal;
use super::ApplyError;
use crate::event::{quote_ident, Relation, ReplicaIdentity};
use crate::pg::sql::TableName;

/// Introspects `target` on a shard and maps `rel` onto it ([`TargetTable::build`]), naming
/// `staging` as its staging table. Errors name the shard and the table.
pub async fn load_target_table(
    client: &Client,
    shard: &str,
    rel: &Arc<Relation>,
    target: &TableName,
    staging: String,
) -> Result<TargetTable, ApplyError> {
    let lit = sql_literal(target.to_string().as_bytes()).unwrap_or_default();
    let ctx = format!("reading the columns of target table {target}");
    let failed = |e: tokio_postgres::Error| ApplyError::pg(shard, ctx.clone(), &e);
    let exists = client
        .simple_query(&exists_query(&lit))
        .await
        .map_err(failed)?;
    let found = exists
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    if !found {
        return Err(ApplyError::Schema {
            shard: shard.to_owned(),
            source: SchemaError::MissingTable {
                source_table: source_name(rel).to_string(),
                target: target.to_string(),
            },
        });
    }
    let rows = client
        .simple_query(&columns_query(&lit))
        .await
        .map_err(failed)?;
    let cols = target_columns(&rows);
    TargetTable::build(rel.clone(), target, &cols, staging).map_err(|e| ApplyError::Schema {
        shard: shard.to_owned(),
        source: e,
    })
}

/// The target table's columns from the rows of [`columns_query`].
pub(crate) fn target_columns(rows: &[SimpleQueryMessage]) -> Vec<TargetColumn> {
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(TargetColumn {
                name: r.get(0).unwrap_or_default().to_owned(),
                type_sql: r.get(1).unwrap_or("text").to_owned(),
                cast_sql: r.get(7).or(r.get(1)).unwrap_or("text").to_owned(),
                not_null: r.get(2) == Some("t"),
                has_default: r.get(3) == Some("t"),
                identity_always: r.get(4) == Some("a"),
                identity_by_default: r.get(4) == Some("d"),
                generated: r.get(5) == Some("s"),
                in_primary_key: r.get(6) == Some("t"),
            }),
            _ => None,
        })
        .collect()
}

/// One column of the target table (a row of `pg_attribute`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    /// `attname`.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `character varying(10)`: the column's type as
    /// declared (compared with the source's).
    pub type_sql: String,
    /// `format_type(atttypid, -1)`, e.g. `character varying`: the type staged text is cast to.
    /// Without the modifier, so that storing the value applies the column's length or
    /// precision as an INSERT (or native replication) would: a value too long is an error
    /// (22001), never cut. An explicit cast to `varchar(n)`, `char(n)` or `bit(n)` cuts
    /// silently (<https://www.postgresql.org/docs/current/datatype-character.html>).
    pub cast_sql: String,
    /// `attnotnull`.
    pub not_null: bool,
    /// `atthasdef`.
    pub has_default: bool,
    /// `attidentity` is `a` (GENERATED ALWAYS AS IDENTITY): inserts need `OVERRIDING SYSTEM
    /// VALUE` and updates may not set it.
    pub identity_always: bool,
    /// `attidentity` is `d` (BY DEFAULT).
    pub identity_by_default: bool,
    /// `attgenerated = 's'`: computed by the target, never written.
    pub generated: bool,
    /// Part of the primary key.
    pub in_primary_key: bool,
}

/// How rows are matched on the target.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KeyMode {
    /// By the target's primary key, with `=`; upserts use `ON CONFLICT`.
    PrimaryKey,
    /// By the source's replica-identity columns, with `IS NOT DISTINCT FROM`; an upsert is a
    /// delete then an insert.
    ReplicaIdentity,
    /// By every column (REPLICA IDENTITY FULL, no usable target primary key), with `IS NOT
    /// DISTINCT FROM`. Rows may repeat: each UPDATE or DELETE changes exactly one matching row
    /// (picked by `tableoid`, `ctid`), as on the source.
    FullRow,
    /// No key: the table can only take inserts.
    None,
}

/// A source column and the target column it is written to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedColumn {
    /// Position in the source relation (and in every tuple of it).
    pub source_idx: usize,
    /// Quoted target column name.
    pub name_sql: String,
    /// Unquoted name, for messages.
    pub name: String,
    /// SQL type to cast staged text to.
    pub type_sql: String,
    /// Part of the match key.
    pub is_key: bool,
    /// May appear in an `UPDATE … SET` list (not a key column, not GENERATED ALWAYS identity).
    pub settable: bool,
}

/// Why a source table cannot be written to its target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The target table does not exist.
    #[error("target table {target} (for source table {source_table}) does not exist (SQLSTATE 42P01); create it on the shard, or map the source table elsewhere with table_map")]
    MissingTable {
        /// Source `schema.table`.
        source_table: String,
        /// Target `schema.table`.
        target: String,
    },
    /// A source column has no target column of that name.
    #[error("target table {target} has no column {column:?} that source table {source_table} sends (SQLSTATE 42703); add the column on the shard")]
    MissingColumn {
        /// Source `schema.table`.
        source_table: String,
        /// Target `schema.table`.
        target: String,
        /// The column.
        column: String,
    },
    /// The source sends a key column the target computes.
    #[error("column {column:?} of target table {target} is GENERATED ALWAYS AS … STORED but it is part of the key source table {source_table} matches rows by; make it a plain column on the shard")]
    GeneratedOnTarget {
        /// Source `schema.table`.
        source_table: String,
        /// Target `schema.table`.
        target: String,
        /// The column.
        column: String,
    },
    /// A target column the source does not send would have to be NULL but is NOT NULL
    /// without a default.
    #[error("column {column:?} of target table {target} is NOT NULL without a default and source table {source_table} does not send it; give it a default or drop NOT NULL on the shard")]
    ExtraColumnRequired {
        /// Source `schema.table`.
        source_table: String,
        /// Target `schema.table`.
        target: String,
        /// The column.
        column: String,
    },
}

/// A source table resolved against its target table.
#[derive(Clone, Debug)]
pub struct TargetTable {
    /// The source relation this was resolved for.
    pub source: Arc<Relation>,
    /// Target `schema.table`, quoted where needed, for messages.
    pub target: String,
    /// Target `schema.table`, quoted, for SQL.
    pub target_sql: String,
    /// Source columns in source order, with their target columns.
    pub columns: Vec<MappedColumn>,
    /// How rows are matched.
    pub key_mode: KeyMode,
    /// Positions (in the source relation) of the match key columns.
    pub key_idx: Vec<usize>,
    /// Whether inserts need `OVERRIDING SYSTEM VALUE`.
    pub overriding: bool,
    /// Name of this table's session staging table.
    pub staging: String,
    /// Position in [`Self::columns`] of the shard-key column whose owner is checked before a
    /// change touches a row (reverse replication, see [`Self::guard_owner`]); `None`: not
    /// checked.
    pub owner_col: Option<usize>,
}

/// Tag of a row of [`TargetTable::owner_rows_sql`].
pub const OWNER_ROW: &str = "reshard_owner_row";
/// Tag of a row of [`TargetTable::owner_lost_sql`].
pub const OWNER_LOST: &str = "reshard_owner_lost";

/// The source relation's table: the key of `table_map`.
pub fn source_name(rel: &Relation) -> TableName {
    TableName::new(rel.namespace.clone(), rel.name.clone())
}

impl TargetTable {
    /// Maps `source` onto a target table with `target_columns` (in `attnum` order), staging
    /// through the temp table `staging`.
    pub fn build(
        source: Arc<Relation>,
        target: &TableName,
        target_columns: &[TargetColumn],
        staging: String,
    ) -> Result<TargetTable, SchemaError> {
        let target_sql = target.to_string();
        let src_name = source_name(&source).to_string();
        let find = |n: &str| target_columns.iter().find(|c| c.name == n);

        let source_key: Vec<usize> = if source.replica_identity == ReplicaIdentity::Full {
            (0..source.columns.len()).collect()
        } else {
            source.key_indexes().collect()
        };

        // Every source column must land in a target column (a generated one computes it).
        if let Some(c) = source.columns.iter().find(|c| find(&c.name).is_none()) {
            return Err(SchemaError::MissingColumn {
                source_table: src_name,
                target: target.to_string(),
                column: c.name.clone(),
            });
        }
        // Every target column left out must be able to take its default (or NULL).
        for t in target_columns {
            let sent = source.columns.iter().any(|c| c.name == t.name);
            let fillable = t.generated
                || t.has_default
                || !t.not_null
                || t.identity_always
                || t.identity_by_default;
            if !sent && !fillable {
                return Err(SchemaError::ExtraColumnRequired {
                    source_table: src_name,
                    target: target.to_string(),
                    column: t.name.clone(),
                });
            }
        }

        // The match key.
        let pk: Vec<&TargetColumn> = target_columns.iter().filter(|c| c.in_primary_key).collect();
        let pk_src: Option<Vec<usize>> = if pk.is_empty() {
            None
        } else {
            pk.iter()
                .map(|p| {
                    source
                        .column_index(&p.name)
                        .filter(|i| source_key.contains(i))
                })
                .collect()
        };
        let (key_mode, key_idx) = match pk_src {
            Some(idx) => (KeyMode::PrimaryKey, idx),
            None if source.replica_identity == ReplicaIdentity::Full => {
                (KeyMode::FullRow, source_key)
            }
            None if !source_key.is_empty() => (KeyMode::ReplicaIdentity, source_key),
            None => (KeyMode::None, Vec::new()),
        };

        // A generated target column is never written; one the rows are matched by cannot be
        // left out.
        if let Some(c) = key_idx
            .iter()
            .map(|&i| &source.columns[i])
            .find(|c| find(&c.name).is_some_and(|t| t.generated))
        {
            return Err(SchemaError::GeneratedOnTarget {
                source_table: src_name,
                target: target.to_string(),
                column: c.name.clone(),
            });
        }

        let mut overriding = false;
        let columns = source
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let t = find(&c.name).filter(|t| !t.generated)?;
                overriding |= t.identity_always;
                let is_key = key_idx.contains(&i);
                Some(MappedColumn {
                    source_idx: i,
                    name_sql: quote_ident(&t.name),
                    name: t.name.clone(),
                    type_sql: t.cast_sql.clone(),
                    is_key,
                    settable: !is_key && !t.identity_always,
                })
            })
            .collect();

        Ok(TargetTable {
            source,
            target: target.to_string(),
            target_sql,
            columns,
            key_mode,
            key_idx,
            overriding,
            staging,
            owner_col: None,
        })
    }

    /// Whether the rows of keys new to a flush ([`NetChange::Insert`](super::fold::NetChange))
    /// may be written straight into the target table, by COPY or a plain `INSERT`, without a
    /// staging table and without `ON CONFLICT`: only in [`KeyMode::PrimaryKey`].
    ///
    /// Why that is exactly-once: such a row lands in the target transaction that also moves
    /// the progress row, like every other change. Its key is new to the batch, so the target
    /// only holds it if it is there for another reason: the full load's copy overlapping the
    /// stream, a watermark chunk, a load or move resumed after a crash, or the application
    /// writing to the shard. Then the primary key refuses it (SQLSTATE 23505), the flush is
    /// rolled back and replayed from the log change by change with `ON CONFLICT`, exactly what
    /// the merge would have done. Without a primary key nothing would refuse a second copy of
    /// a row, so those tables always merge. Nor does a table whose rows of other owners are
    /// guarded ([`Self::guard_owner`], reverse replication): its inserts need the guarded
    /// upsert and the check after it.
    pub fn takes_direct_inserts(&self) -> bool {
        self.key_mode == KeyMode::PrimaryKey && !self.columns.is_empty() && self.owner_col.is_none()
    }

    /// `COPY target (…) FROM STDIN`: the rows of [`Self::takes_direct_inserts`], no op code.
    pub fn copy_target_sql(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().map(|c| c.name_sql.as_str()).collect();
        format!("COPY {} ({}) FROM STDIN", self.target_sql, cols.join(", "))
    }

    /// Inserts every row read from `source` (see [`Self::insert_sql`]) with no `ON CONFLICT`:
    /// the inline form of [`Self::copy_target_sql`].
    pub fn insert_new_sql_from(&self, source: &str) -> String {
        format!("{} FROM {source}", self.insert_select())
    }

    /// Guards the rows of another owner (reverse replication: the source's rows of accounts
    /// other shards serve). Only where the match key can name another account's row: primary-key
    /// mode with `key` (the shard-key column) outside the primary key. Then an upsert never
    /// replaces a row of another `key` value (`ON CONFLICT … DO UPDATE … WHERE`), and
    /// [`Self::owner_rows_sql`] / [`Self::owner_lost_sql`] report the rows a flush would touch
    /// and the inserts that did not land, for the applier to judge. Returns whether it guards.
    pub fn guard_owner(&mut self, key: &str) -> bool {
        self.owner_col = if self.key_mode == KeyMode::PrimaryKey {
            self.columns.iter().position(|c| c.name == key && !c.is_key)
        } else {
            None
        };
        self.owner_col.is_some()
    }

    /// The guarded shard-key column ([`Self::guard_owner`]).
    pub fn owner(&self) -> Option<&MappedColumn> {
        self.owner_col.and_then(|i| self.columns.get(i))
    }

    /// Whether `c` is the guarded shard-key column (staged with a delete's key, so the check
    /// can name the account the change meant, when the old key carries it).
    pub fn is_owner(&self, c: &MappedColumn) -> bool {
        self.owner().is_some_and(|o| o.source_idx == c.source_idx)
    }

    /// The row of an owner check: a tag, the op code, the target table, the match key as text
    /// (`(id)=(4405)`), the target row's shard key and the change's, both as text.
    fn owner_select(&self, tag: &str, owner: &MappedColumn) -> String {
        let keys: Vec<&MappedColumn> = self.columns.iter().filter(|c| c.is_key).collect();
        let names: Vec<&str> = keys.iter().map(|c| c.name.as_str()).collect();
        let vals: Vec<String> = keys
            .iter()
            .map(|c| format!("coalesce(s.{}, 'NULL')", c.name_sql))
            .collect();
        let target = sql_literal(self.target.as_bytes()).unwrap_or_else(|_| "''".to_owned());
        let prefix = sql_literal(format!("({})=(", names.join(", ")).as_bytes())
            .unwrap_or_else(|_| "''".to_owned());
        format!(
            "SELECT '{tag}', s._reshard_op, {target}, {prefix} || concat_ws(', ', {}) || ')', t.{k}::text, s.{k}",
            vals.join(", "),
            k = owner.name_sql
        )
    }

    /// With [`Self::guard_owner`]: the target rows the changes with op codes `ops` read from
    /// `source` (see [`Self::staging_source`]) would update or delete, each with its shard key
    /// (rows tagged [`OWNER_ROW`]); the applier refuses the flush if one belongs to another
    /// owner. Run before the statements that change them.
    pub fn owner_rows_sql(&self, ops: &str, source: &str) -> Option<String> {
        let owner = self.owner()?;
        Some(format!(
            "{} FROM {} AS t, {source} WHERE s._reshard_op IN ({ops}) AND {}",
            self.owner_select(OWNER_ROW, owner),
            self.target_sql,
            self.key_match("t", "s")
        ))
    }

    /// With [`Self::guard_owner`]: the inserts with op codes `ops` read from `source` that did
    /// not land because the key holds a row of another shard-key value (rows tagged
    /// [`OWNER_LOST`]: always a conflict). Run after the insert.
    pub fn owner_lost_sql(&self, ops: &str, source: &str) -> Option<String> {
        let owner = self.owner()?;
        Some(format!(
            "{} FROM {} AS t, {source} WHERE s._reshard_op IN ({ops}) AND {} AND t.{k} IS DISTINCT FROM s.{k}::{ty}",
            self.owner_select(OWNER_LOST, owner),
            self.target_sql,
            self.key_match("t", "s"),
            k = owner.name_sql,
            ty = owner.type_sql
        ))
    }

    /// Whether several target rows may hold the same match key (see [`KeyMode::FullRow`]).
    pub fn rows_may_repeat(&self) -> bool {
        self.key_mode == KeyMode::FullRow
    }

    /// `CREATE TEMP TABLE IF NOT EXISTS` for the staging table: an op code and one `text`
    /// column per mapped column (values are cast to the target types when read, so a NULL in a
    /// column an operation does not use never meets a NOT NULL domain).
    pub fn create_staging_sql(&self) -> String {
        let mut s = format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} (_reshard_op int4",
            self.staging
        );
        for c in &self.columns {
            s.push_str(", ");
            s.push_str(&c.name_sql);
            s.push_str(" text");
        }
        s.push(')');
        s
    }

    /// `COPY staging (…) FROM STDIN`.
    pub fn copy_sql(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().map(|c| c.name_sql.as_str()).collect();
        format!(
            "COPY {} (_reshard_op, {}) FROM STDIN",
            self.staging,
            cols.join(", ")
        )
    }

    fn key_match(&self, target_alias: &str, staging_alias: &str) -> String {
        let op = match self.key_mode {
            KeyMode::PrimaryKey => "=",
            _ => "IS NOT DISTINCT FROM",
        };
        self.columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| {
                format!(
                    "{target_alias}.{n} {op} {staging_alias}.{n}::{ty}",
                    n = c.name_sql,
                    ty = c.type_sql
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The staging table as the row source `s` of the merge statements.
    pub fn staging_source(&self) -> String {
        format!("{} AS s", self.staging)
    }

    /// A `VALUES` list (`(op, 'v', NULL, …), …`, the staging table's columns in order: the op
    /// code, then every mapped column as text) as the row source `s` of the merge statements.
    /// Untyped literals in `VALUES` resolve to `text`, the staging table's column type, so the
    /// statements cast exactly as they do from the staging table
    /// (<https://www.postgresql.org/docs/current/typeconv-union-case.html>).
    pub fn values_source(&self, rows: &str) -> String {
        let cols: Vec<&str> = self.columns.iter().map(|c| c.name_sql.as_str()).collect();
        format!("(VALUES {rows}) AS s(_reshard_op, {})", cols.join(", "))
    }

    /// The parameters of a prepared merge statement as its row source `s`: `unnest($1, $2, …)
    /// AS s(_reshard_op, …)`, the op codes (`int4[]`) and one `text[]` per mapped column, zipped
    /// into the staging table's rows (<https://www.postgresql.org/docs/current/functions-array.html>).
    /// Text, as from the staging table: the statements cast exactly as they do there.
    pub fn unnest_source(&self) -> String {
        let params: Vec<String> = (1..=self.columns.len() + 1)
            .map(|i| format!("${i}"))
            .collect();
        let cols: Vec<&str> = std::iter::once("_reshard_op")
            .chain(self.columns.iter().map(|c| c.name_sql.as_str()))
            .collect();
        format!("unnest({}) AS s({})", params.join(", "), cols.join(", "))
    }

    /// The parameter types of [`Self::unnest_source`]: `int4[], text[], …`.
    pub fn unnest_types(&self) -> String {
        let mut s = String::from("int4[]");
        for _ in &self.columns {
            s.push_str(", text[]");
        }
        s
    }

    /// Deletes the keys staged with the given op codes.
    pub fn delete_sql(&self, ops: &str) -> String {
        self.delete_sql_from(ops, &self.staging_source())
    }

    /// Deletes the keys with the given op codes read from `source` (see [`Self::staging_source`]).
    pub fn delete_sql_from(&self, ops: &str, source: &str) -> String {
        format!(
            "DELETE FROM {} AS t USING {source} WHERE s._reshard_op IN ({ops}) AND {}",
            self.target_sql,
            self.key_match("t", "s")
        )
    }

    /// Inserts the rows staged with the given op codes (upserting by primary key when the
    /// target has one).
    pub fn insert_sql(&self, ops: &str) -> String {
        self.insert_sql_from(ops, &self.staging_source())
    }

    /// Inserts the rows with the given op codes read from `source` (see [`Self::insert_sql`]).
    pub fn insert_sql_from(&self, ops: &str, source: &str) -> String {
        format!(
            "{} FROM {source} WHERE s._reshard_op IN ({ops}){}",
            self.insert_select(),
            self.on_conflict()
        )
    }

    /// `INSERT INTO t (every column) SELECT s.c::type, …`: every column of a row read as `s`,
    /// cast to its target type; the caller adds the `FROM` and what follows it.
    fn insert_select(&self) -> String {
        let vals: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("s.{}::{}", c.name_sql, c.type_sql))
            .collect();
        format!("{} SELECT {}", self.insert_into(), vals.join(", "))
    }

    /// `INSERT INTO t (every column)`, with ` OVERRIDING SYSTEM VALUE` where the target needs
    /// it: the head of every insert into this table, whatever supplies the rows.
    pub fn insert_into(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().map(|c| c.name_sql.as_str()).collect();
        format!(
            "INSERT INTO {}{} ({}){}",
            self.target_sql,
            // The alias the owner guard of `on_conflict` names the existing row by.
            if self.owner_col.is_some() {
                " AS t"
            } else {
                ""
            },
            cols.join(", "),
            if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            }
        )
    }

    /// ` ON CONFLICT (pk) DO UPDATE SET …` in primary-key mode, else empty.
    pub fn on_conflict(&self) -> String {
        if self.key_mode != KeyMode::PrimaryKey {
            return String::new();
        }
        let keys: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name_sql.as_str())
            .collect();
        let sets: Vec<String> = self
            .columns
            .iter()
            .filter(|c| c.settable)
            .map(|c| format!("{n} = EXCLUDED.{n}", n = c.name_sql))
            .collect();
        if sets.is_empty() {
            format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", "))
        } else {
            // Never replace a row of another owner: the insert does not land, and
            // `owner_lost_sql` reports it.
            let guard = self
                .owner()
                .map(|o| {
                    format!(
                        " WHERE t.{n} IS NOT DISTINCT FROM EXCLUDED.{n}",
                        n = o.name_sql
                    )
                })
                .unwrap_or_default();
            format!(
                " ON CONFLICT ({}) DO UPDATE SET {}{guard}",
                keys.join(", "),
                sets.join(", ")
            )
        }
    }

    /// Updates the rows staged with op code `op`, setting the columns at source positions
    /// `carried` (those not settable are skipped). `None` when there is nothing to set.
    pub fn update_sql(&self, op: u32, carried: &[bool]) -> Option<String> {
        self.update_sql_from(op, carried, &self.staging_source())
    }

    /// Updates the rows with op code `op` read from `source` (see [`Self::update_sql`]).
    pub fn update_sql_from(&self, op: u32, carried: &[bool], source: &str) -> Option<String> {
        let sets: Vec<String> = self
            .columns
            .iter()
            .filter(|c| c.settable && carried.get(c.source_idx).copied().unwrap_or(false))
            .map(|c| format!("{n} = s.{n}::{ty}", n = c.name_sql, ty = c.type_sql))
            .collect();
        if sets.is_empty() {
            return None;
        }
        Some(format!(
            "UPDATE {} AS t SET {} FROM {source} WHERE s._reshard_op = {op} AND {}",
            self.target_sql,
            sets.join(", "),
            self.key_match("t", "s")
        ))
    }

    /// `TRUNCATE staging`.
    pub fn truncate_staging_sql(&self) -> String {
        format!("TRUNCATE {}", self.staging)
    }
}

/// The catalog query for a target table's columns, in `attnum` order; `regclass_literal` is
/// the quoted table name as an SQL literal. Columns: name, type, not null, has default,
/// identity, generated, in primary key, type without its modifier (to cast to).
pub fn columns_query(regclass_literal: &str) -> String {
    format!(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef, \
         a.attidentity, a.attgenerated, coalesce(a.attnum = ANY (i.indkey::int2[]), false), \
         format_type(a.atttypid, -1) \
         FROM pg_attribute a \
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = to_regclass({regclass_literal}) AND a.attnum > 0 \
         AND NOT a.attisdropped ORDER BY a.attnum"
    )
}

/// `SELECT to_regclass(…) IS NOT NULL`.
pub fn exists_query(regclass_literal: &str) -> String {
    format!("SELECT to_regclass({regclass_literal}) IS NOT NULL")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, TableId};

    fn col(n: &str, k: bool) -> Column {
        Column {
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: k,
        }
    }

    fn tcol(n: &str, pk: bool) -> TargetColumn {
        TargetColumn {
            name: n.into(),
            type_sql: "text".into(),
            cast_sql: "text".into(),
            not_null: pk,
            has_default: false,
            identity_always: false,
            identity_by_default: false,
            generated: false,
            in_primary_key: pk,
        }
    }

    fn rel(ri: ReplicaIdentity, cols: Vec<Column>) -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(7),
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ri,
            columns: cols,
        })
    }

    #[test]
    fn maps_by_name_and_uses_the_primary_key() {
        let r = rel(
            ReplicaIdentity::Default,
            vec![col("b", false), col("id", true)],
        );
        let t = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[tcol("id", true), tcol("b", false)],
            "s".into(),
        )
        .unwrap();
        assert_eq!(t.key_mode, KeyMode::PrimaryKey);
        assert_eq!(t.key_idx, vec![1]);
        assert_eq!(t.columns[0].name, "b");
        assert!(t
            .insert_sql("1,2")
            .contains("ON CONFLICT (id) DO UPDATE SET b = EXCLUDED.b"));
    }

    #[test]
    fn full_identity_without_target_pk_matches_all_columns() {
        let r = rel(ReplicaIdentity::Full, vec![col("a", true), col("b", true)]);
        let t = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[tcol("a", false), tcol("b", false)],
            "s".into(),
        )
        .unwrap();
        assert_eq!(t.key_mode, KeyMode::FullRow);
        assert!(t.rows_may_repeat());
        assert_eq!(t.key_idx, vec![0, 1]);
        assert!(t
            .delete_sql("0")
            .contains("t.a IS NOT DISTINCT FROM s.a::text"));
        assert_eq!(t.on_conflict(), "");
    }

    #[test]
    fn full_identity_with_target_pk_uses_the_pk() {
        let r = rel(ReplicaIdentity::Full, vec![col("a", true), col("b", true)]);
        let t = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[tcol("a", true), tcol("b", false)],
            "s".into(),
        )
        .unwrap();
        assert_eq!(t.key_mode, KeyMode::PrimaryKey);
        assert_eq!(t.key_idx, vec![0]);
    }

    #[test]
    fn missing_and_generated_and_required_columns_are_errors() {
        let r = rel(
            ReplicaIdentity::Default,
            vec![col("id", true), col("x", false)],
        );
        let e = TargetTable::build(
            r.clone(),
            &TableName::new("public", "t"),
            &[tcol("id", true)],
            "s".into(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        // A generated key column cannot be left out of the match.
        let mut g = tcol("id", true);
        g.generated = true;
        let e = TargetTable::build(
            r.clone(),
            &TableName::new("public", "t"),
            &[g, tcol("x", false)],
            "s".into(),
        )
        .unwrap_err();
        assert!(matches!(e, SchemaError::GeneratedOnTarget { .. }), "{e}");
        let mut req = tcol("extra", false);
        req.not_null = true;
        let e = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[tcol("id", true), tcol("x", false), req],
            "s".into(),
        )
        .unwrap_err();
        assert!(matches!(e, SchemaError::ExtraColumnRequired { .. }));
    }

    /// See: issue #12 — PostgreSQL 18 publishes stored generated columns
    /// (`publish_generated_columns = stored`); the target computes them, so they are never in
    /// the written column list.
    #[test]
    fn a_generated_target_column_sent_by_the_source_is_never_written() {
        let r = rel(
            ReplicaIdentity::Default,
            vec![col("id", true), col("x", false), col("total", false)],
        );
        let mut g = tcol("total", false);
        g.generated = true;
        let t = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[tcol("id", true), tcol("x", false), g],
            "s".into(),
        )
        .unwrap();
        let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "x"]);
        assert!(!t.copy_sql().contains("total"), "{}", t.copy_sql());
        assert!(!t.create_staging_sql().contains("total"));
    }

    /// See: R3-1. Reverse replication guards the rows of other owners: the upsert never
    /// replaces a row of another shard key, and the checks read the rows a flush touches.
    #[test]
    fn the_owner_guard_keeps_upserts_off_rows_of_another_shard_key() {
        let r = rel(
            ReplicaIdentity::Default,
            vec![col("id", true), col("account_id", false), col("n", false)],
        );
        let cols = [
            tcol("id", true),
            tcol("account_id", false),
            tcol("n", false),
        ];
        let mut t =
            TargetTable::build(r.clone(), &TableName::new("public", "t"), &cols, "s".into())
                .unwrap();
        let plain = t.insert_sql("1, 2");
        assert!(t.owner_rows_sql("0", "x AS s").is_none());
        assert!(t.guard_owner("account_id"));
        let sql = t.insert_sql("1, 2");
        assert!(
            sql.starts_with("INSERT INTO public.t AS t (id, account_id, n)"),
            "{sql}"
        );
        assert!(
            sql.ends_with("DO UPDATE SET account_id = EXCLUDED.account_id, n = EXCLUDED.n WHERE t.account_id IS NOT DISTINCT FROM EXCLUDED.account_id"),
            "{sql}"
        );
        assert_ne!(sql, plain);
        let rows = t.owner_rows_sql("0, 3", "x AS s").unwrap();
        assert_eq!(
            rows,
            "SELECT 'reshard_owner_row', s._reshard_op, 'public.t', '(id)=(' || concat_ws(', ', coalesce(s.id, 'NULL')) || ')', \
             t.account_id::text, s.account_id FROM public.t AS t, x AS s WHERE s._reshard_op IN (0, 3) AND t.id = s.id::text"
        );
        let lost = t.owner_lost_sql("1, 2", "x AS s").unwrap();
        assert!(
            lost.ends_with("AND t.account_id IS DISTINCT FROM s.account_id::text"),
            "{lost}"
        );
        // A key that is part of the primary key, or no primary key: nothing to guard.
        let mut t =
            TargetTable::build(r.clone(), &TableName::new("public", "t"), &cols, "s".into())
                .unwrap();
        assert!(!t.guard_owner("id"));
        assert!(!t.guard_owner("missing"));
        let mut t = TargetTable::build(
            r,
            &TableName::new("public", "t"),
            &[
                tcol("id", false),
                tcol("account_id", false),
                tcol("n", false),
            ],
            "s".into(),
        )
        .unwrap();
        assert!(!t.guard_owner("account_id"));
    }

    #[test]
    fn update_sets_only_carried_non_key_columns() {
        let r = rel(
            ReplicaIdentity::Default,
            vec![col("id", true), col("a", false), col("b", false)],
        );
        let cols = [tcol("id", true), tcol("a", false), tcol("b", false)];
        let t = TargetTable::build(r, &TableName::new("public", "t"), &cols, "s".into()).unwrap();
        let sql = t.update_sql(3, &[true, false, true]).unwrap();
        assert!(sql.contains("SET b = s.b::text FROM"), "{sql}");
        assert!(t.update_sql(3, &[true, false, false]).is_none());
    }
}
