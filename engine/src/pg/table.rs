//! Table descriptions read from `pg_catalog`, shared by `check`, `verify` and `cutover`.
//!
//! In: a SQL connection and a [`TableName`]. Out: [`TableInfo`] (columns with their
//! `format_type`, primary key, replica identity). Which tables are replicated is decided by
//! [`crate::pg::catalog`] alone.

use super::sql::TableName;

/// Type OIDs a shard key may have (`int2`, `int4`, `int8`, `text`, `varchar`, `uuid`).
pub const SUPPORTED_KEY_TYPES: &[(u32, &str)] = &[
    (21, "smallint"),
    (23, "integer"),
    (20, "bigint"),
    (25, "text"),
    (1043, "character varying"),
    (2950, "uuid"),
];

/// One column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `numeric(12,2)`.
    pub type_name: String,
    /// Type OID.
    pub type_oid: u32,
    /// `NOT NULL`.
    pub not_null: bool,
    /// Has a default expression.
    pub has_default: bool,
    /// Stored generated column (never sent by pgoutput before PostgreSQL 18).
    pub generated: bool,
    /// Identity column.
    pub identity: bool,
}

/// One table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// The table.
    pub name: TableName,
    /// `pg_class.oid`.
    pub oid: u32,
    /// Partitioned (`relkind = 'p'`).
    pub partitioned: bool,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Columns in `attnum` order (dropped ones left out).
    pub columns: Vec<ColumnInfo>,
    /// Primary key columns in key order (empty without a primary key).
    pub primary_key: Vec<String>,
    /// Columns of the replica identity index (`REPLICA IDENTITY USING INDEX`).
    pub replica_identity_index: Vec<String>,
}

impl TableInfo {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The columns identifying a row in the WAL's old tuple; `None` for FULL (every column)
    /// and for NOTHING / DEFAULT without a primary key (no usable identity).
    pub fn identity_columns(&self) -> Option<&[String]> {
        match self.replica_identity {
            'd' if !self.primary_key.is_empty() => Some(&self.primary_key),
            'i' => Some(&self.replica_identity_index),
            _ => None,
        }
    }

    /// Whether a row's identity is usable for UPDATE/DELETE replication.
    pub fn has_usable_identity(&self) -> bool {
        self.replica_identity == 'f' || self.identity_columns().is_some()
    }

    /// Columns that row comparisons use to identify a row: the primary key, else the replica
    /// identity index, else every non-generated column.
    pub fn row_key(&self) -> Vec<String> {
        if !self.primary_key.is_empty() {
            self.primary_key.clone()
        } else if !self.replica_identity_index.is_empty() {
            self.replica_identity_index.clone()
        } else {
            self.columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| c.name.clone())
                .collect()
        }
    }
}

/// Describes a table or partitioned table; `None` if it does not exist.
pub async fn describe_table(
    client: &tokio_postgres::Client,
    name: &TableName,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let (schema, table) = (&name.schema, &name.name);
    let rows = client
        .query(
            "SELECT c.oid, c.relkind::text, c.relreplident::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = r.try_get(0)?;
    let relkind: String = r.try_get(1)?;
    let ri: String = r.try_get(2)?;
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, \
                    a.attnotnull, a.atthasdef, a.attgenerated <> '', a.attidentity <> '' \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let mut columns = Vec::with_capacity(cols.len());
    for c in &cols {
        columns.push(ColumnInfo {
            name: c.try_get(0)?,
            type_name: c.try_get(1)?,
            type_oid: c.try_get(2)?,
            not_null: c.try_get(3)?,
            has_default: c.try_get(4)?,
            generated: c.try_get(5)?,
            identity: c.try_get(6)?,
        });
    }
    let index_cols = |flag: &'static str| {
        format!(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.{flag} ORDER BY k.ord"
        )
    };
    let pk = client
        .query(&index_cols("indisprimary"), &[&oid])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()?;
    let rii = client
        .query(&index_cols("indisreplident"), &[&oid])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()?;
    Ok(Some(TableInfo {
        name: name.clone(),
        oid,
        partitioned: relkind == "p",
        replica_identity: ri.chars().next().unwrap_or('d'),
        columns,
        primary_key: pk,
        replica_identity_index: rii,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            type_name: "bigint".into(),
            type_oid: 20,
            not_null: true,
            has_default: false,
            generated: false,
            identity: false,
        }
    }

    #[test]
    fn identity_rules() {
        let mut t = TableInfo {
            name: TableName::new("public", "t"),
            oid: 1,
            partitioned: false,
            replica_identity: 'd',
            columns: vec![col("account_id"), col("id")],
            primary_key: vec![],
            replica_identity_index: vec![],
        };
        assert!(!t.has_usable_identity());
        assert_eq!(t.row_key(), vec!["account_id", "id"]);
        t.primary_key = vec!["id".into()];
        assert!(t.has_usable_identity());
        assert_eq!(t.identity_columns().unwrap(), ["id".to_string()]);
        t.replica_identity = 'n';
        assert!(!t.has_usable_identity());
        t.replica_identity = 'f';
        assert!(t.has_usable_identity());
        assert!(t.identity_columns().is_none());
    }
}
