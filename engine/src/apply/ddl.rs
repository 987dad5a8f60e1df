//! Schema changes on the source during the migration: what a shard does when a source table's
//! pgoutput Relation message no longer matches its shard table.
//!
//! In: the source [`Relation`] a change carries, the shard table's columns ([`TargetColumn`]),
//! the last relation this shard table was found to match, and (looked up only when a
//! difference may be there) the source catalog. Out: a `Verdict`: write as is, add columns or
//! widen column types first (`ALTER TABLE … ADD COLUMN IF NOT EXISTS …, ALTER COLUMN … TYPE …`,
//! run by the applier inside the target transaction that carries the first change of the
//! table, so it commits with that change and the progress row), or wait ([`DdlWait`]).
//!
//! Invariant: nothing is ever written to a column the shard lacks, and a column is only added
//! or retyped when the change is additive. A column the source stopped sending while the shard
//! still has it (DROP or RENAME on the source), a changed type that is no widening, or a new
//! column next to a column the source no longer sends (a possible RENAME) is never guessed at:
//! the shard's apply waits, naming table, columns and the fix, retries on the apply backoff and
//! resumes by itself once the shard table matches. A wait is a transient error, so a shard
//! that only waits for DDL keeps the daemon running.
//!
//! Column types (`ALTER TABLE … ALTER COLUMN … TYPE` on the source): the source's type of a
//! column is the one the relation carries (type OID and modifier), compared with the shard
//! column's `format_type`. A column retyped since the relation last matched is compared (its
//! type formatted by the source); so is every column the first time this process meets the
//! table (after a restart, perhaps while the shard waited for that very change), where only a
//! shard column narrower than the source's built-in type counts (`widens`; other
//! differences may be the operator's choice, and no source query is needed). A widening is
//! propagated with `ddl = "propagate"`: it keeps the text of every value the shard holds, so
//! the shard's rows stay what the source's rows became, as long as the source converted them
//! the default way (a `USING` that changes values is a table rewrite logical decoding does not
//! send, like a volatile default; `verify` finds it). Anything else waits. A type change not
//! found that way (one that is no widening, after a restart) shows as the first value the
//! shard refuses (SQLSTATE class 22); the applier then asks `Ddl::value_error_types` and
//! waits or widens the same way; only a value error with no type difference behind it stops
//! the shard.
//!
//! Limits: which relation a shard table matched is known since this process started; after a
//! restart a DROP COLUMN on the source leaves a nullable shard column in place (NULL in new
//! rows). An added column's default is evaluated by the shard; a volatile default (`now()`,
//! `nextval`, identity) is never propagated, because the source filled its existing rows in a
//! table rewrite that logical decoding does not send.
//! See <https://www.postgresql.org/docs/current/logical-replication-restrictions.html>.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::{info, warn};

use super::schema::{source_name, SchemaError, TargetColumn};
use crate::config::DdlMode;
use crate::event::{quote_ident, Relation, TableId};
use crate::pg::sql::quote_literal;

/// Opens a SQL connection to the source (for its catalog); the error text names the cause.
pub type SourceConnect =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Client, String>> + Send>> + Send + Sync>;

/// What a shard's apply waits for: the shard table must change before the changes of
/// `source_table` can be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DdlWait {
    /// Source `schema.table`.
    pub source_table: String,
    /// What differs, naming the table and columns.
    pub what: String,
    /// The SQL or action that ends the wait (empty when `what` already says it).
    pub fix: String,
}

impl std::fmt::Display for DdlWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "waiting for DDL: {}", self.what)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        f.write_str("; apply resumes by itself once the shard table matches")
    }
}

impl std::error::Error for DdlWait {}

impl DdlWait {
    /// A shard table that cannot take the source table's changes (missing, a missing or
    /// computed column, a required column the source does not send): fixed by DDL on the
    /// shard, so the shard waits for it instead of stopping. A table new in the publication's
    /// scope lands here too: its rows wait in the spill log until the table exists on the
    /// shard.
    pub fn from_schema(e: &SchemaError) -> DdlWait {
        let source_table = match e {
            SchemaError::MissingTable { source_table, .. }
            | SchemaError::MissingColumn { source_table, .. }
            | SchemaError::GeneratedOnTarget { source_table, .. }
            | SchemaError::ExtraColumnRequired { source_table, .. } => source_table.clone(),
        };
        DdlWait {
            source_table,
            what: e.to_string(),
            fix: String::new(),
        }
    }
}

impl DdlWait {
    /// Propagating a widening type change of columns `retyped` (in `sql`) to shard table
    /// `target` failed with `error` (SQLSTATE and message; e.g. a view or rule on the shard
    /// uses the column): the shard waits for the operator to make it possible.
    pub(super) fn retype_failed(
        shard: &str,
        rel: &Relation,
        target: &str,
        sql: &str,
        retyped: &[String],
        error: &str,
    ) -> DdlWait {
        let src = source_name(rel).to_string();
        DdlWait {
            source_table: src.clone(),
            what: format!(
                "shard {shard} cannot follow the type change of column(s) {} of source table {src} on {target}: {sql} failed: {error}",
                retyped
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: format!(
                "remove on shard {shard} what stops it (e.g. drop and recreate a view that uses the column), or run it yourself; reshard then runs {sql}"
            ),
        }
    }
}

/// What to do with a source relation before writing its changes.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The shard table takes the relation's columns as they are.
    Ready,
    /// Run this `ALTER TABLE` on the shard first (additive or widening, idempotent), then
    /// re-read the shard table's columns.
    Add {
        /// The statement.
        sql: String,
        /// The columns whose type it widens (none: it only adds columns).
        retyped: Vec<String>,
    },
    /// Pause this shard's apply.
    Wait(DdlWait),
}

/// One column as the source catalog describes it now.
#[derive(Clone, Debug)]
struct SourceColumn {
    name: String,
    type_sql: String,
    not_null: bool,
    default: Option<String>,
    /// The default (or identity) computes a value per row.
    volatile: bool,
}

/// The schema-change state of one shard's applier (kept across reconnects).
pub(super) struct Ddl {
    mode: DdlMode,
    source: Option<SourceConnect>,
    client: Option<Client>,
    /// Per source table: the relation the shard table was last found to match.
    matched: HashMap<TableId, Arc<Relation>>,
}

impl Ddl {
    pub(super) fn new(mode: DdlMode, source: Option<SourceConnect>) -> Ddl {
        Ddl {
            mode,
            source,
            client: None,
            matched: HashMap::new(),
        }
    }

    /// Records that the shard table now takes `rel` as it is.
    pub(super) fn matched(&mut self, rel: &Arc<Relation>) {
        self.matched.insert(rel.id, Arc::clone(rel));
    }

    /// Compares `rel` with the shard table `target` (for messages) / `target_sql` (for SQL) and
    /// its columns `cols`; `shard` is for messages.
    pub(super) async fn check(
        &mut self,
        shard: &str,
        rel: &Arc<Relation>,
        target: &str,
        target_sql: &str,
        cols: &[TargetColumn],
    ) -> Verdict {
        let src = source_name(rel).to_string();
        let prev = self.matched.get(&rel.id).cloned();
        let has = |n: &str| cols.iter().any(|c| c.name == n);
        let missing: Vec<&str> = rel
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .filter(|n| !has(n))
            .collect();
        // Shard columns the source does not send: harmless extras, unless the source sent them
        // before (dropped or renamed there), or, with no earlier relation known, unless the
        // source also sends a column the shard lacks (it may be the same column renamed).
        let gone: Vec<&str> = cols
            .iter()
            .filter(|c| !c.generated && rel.column_index(&c.name).is_none())
            .map(|c| c.name.as_str())
            .filter(|n| match &prev {
                Some(p) => p.column_index(n).is_some(),
                None => !missing.is_empty(),
            })
            .collect();
        if !gone.is_empty() {
            return Verdict::Wait(non_additive(
                shard, &src, target, target_sql, &gone, &missing,
            ));
        }
        // Same column, new type on the source (ALTER TYPE) since the relation last matched.
        let retyped: Vec<&str> = match &prev {
            Some(p) => rel
                .columns
                .iter()
                .filter(|c| {
                    p.columns.iter().any(|o| {
                        o.name == c.name
                            && (o.type_oid, o.type_modifier) != (c.type_oid, c.type_modifier)
                    })
                })
                .map(|c| c.name.as_str())
                .filter(|n| has(n))
                .collect(),
            None => Vec::new(),
        };
        // The source's types as this relation carries them, when a type may have changed: a
        // column retyped since the relation last matched, or any column the first time this
        // process sees the table (after a restart, perhaps while the shard waited for an ALTER
        // TYPE, the relation is the first this process knows). At first sight only a shard
        // column narrower than the source's (see `widens`) is a type change the shard has not
        // followed; another difference may be the operator's choice (that `check` reports).
        let mut retypes: Vec<Retype> = Vec::new();
        if !retyped.is_empty() {
            match self.relation_types(rel).await {
                Ok(types) => {
                    retypes = compare_types(rel, cols, types, |r| {
                        r.widening || retyped.contains(&r.column.as_str())
                    })
                }
                Err(e) => {
                    return unreadable_source(shard, &src, target, &missing, &retyped, &e);
                }
            }
        } else if prev.is_none() {
            // Only the built-in types `widens` knows, formatted here: no source query.
            let types = rel
                .columns
                .iter()
                .map(|c| widenable_type_sql(c.type_oid, c.type_modifier))
                .collect();
            retypes = compare_types(rel, cols, types, |r| r.widening);
        }
        if !retypes.is_empty() {
            // In propagate mode a widening rides in the statement that adds new columns.
            let with_adds = !missing.is_empty()
                && self.mode == DdlMode::Propagate
                && retypes.iter().all(|r| r.widening);
            if !with_adds {
                return self.retype_verdict(shard, &src, target, target_sql, retypes);
            }
        }
        if missing.is_empty() {
            return Verdict::Ready;
        }
        let catalog = match self.source_columns(rel).await {
            Ok(c) => c,
            Err(e) => return unreadable_source(shard, &src, target, &missing, &retyped, &e),
        };
        let find = |n: &str| catalog.iter().find(|c| c.name == n);
        let mut adds = Vec::new();
        let mut unsure = Vec::new();
        for n in &missing {
            match find(n) {
                Some(c) => {
                    if c.volatile {
                        unsure.push(format!(
                            "column {:?} has a volatile default {} (the source computed it for every existing row in a table rewrite that is not replicated)",
                            c.name,
                            c.default.as_deref().unwrap_or("(identity)")
                        ));
                    }
                    adds.push(add_column_sql(c));
                }
                None => unsure.push(format!(
                    "column {n:?} is no longer in the source catalog (dropped again since)"
                )),
            }
        }
        // A widening to propagate with the new columns (see above) rides in the same statement.
        adds.extend(retypes.iter().map(Retype::clause));
        let add_sql = format!("ALTER TABLE {target_sql} {}", adds.join(", "));
        let what = format!(
            "shard {shard} table {target} has no column(s) {} that source table {src} now sends (ADD COLUMN on the source)",
            quoted(&missing)
        );
        if !unsure.is_empty() {
            return Verdict::Wait(DdlWait {
                source_table: src,
                what: format!("{what}; not propagated: {}", unsure.join("; ")),
                fix: format!(
                    "add the column(s) on shard {shard} with the values the source holds, e.g. {add_sql}, then copy the existing rows' values"
                ),
            });
        }
        match self.mode {
            DdlMode::Propagate => {
                info!(table = %src, target = %target, columns = %quoted(&missing), "propagating ADD COLUMN to the shard");
                Verdict::Add {
                    sql: add_sql,
                    retyped: retypes.into_iter().map(|r| r.column).collect(),
                }
            }
            DdlMode::Wait => Verdict::Wait(DdlWait {
                source_table: src,
                what,
                fix: format!(
                    "run on shard {shard}: {add_sql} (or set [apply] ddl = \"propagate\")"
                ),
            }),
        }
    }

    /// A change of `rel` failed on shard table `target` with a data error (22P02): if the
    /// source's enum types have labels the shard's (`shard_enums`, the shard table's enum
    /// columns) lack, the source added them (`ALTER TYPE … ADD VALUE`, which pgoutput does not
    /// send): propagate them or wait for them, as `[apply] ddl` says.
    pub(super) async fn enum_gap(
        &mut self,
        shard: &str,
        rel: &Relation,
        target: &str,
        shard_enums: &[EnumColumn],
    ) -> EnumGap {
        if shard_enums.is_empty() {
            return EnumGap::None;
        }
        let src = source_name(rel).to_string();
        let sql = enum_columns_query(&format!("{}::oid", rel.id.0));
        let source = match self.source_query(&sql, &[]).await {
            Ok(rows) => enum_columns(enum_rows(&rows)),
            Err(e) => {
                return EnumGap::Wait(DdlWait {
                    source_table: src.clone(),
                    what: format!(
                        "a value of an enum column of source table {src} is not a label of its type on shard {shard} table {target}, and the source's enum labels cannot be read from the source catalog: {e}"
                    ),
                    fix: format!(
                        "add the source's new enum values on shard {shard} (ALTER TYPE … ADD VALUE), or restore the source connection"
                    ),
                })
            }
        };
        let missing = missing_enum_values(&source, shard_enums);
        if missing.is_empty() {
            return EnumGap::None;
        }
        let statements: Vec<String> = missing.iter().flat_map(|(_, _, s)| s.clone()).collect();
        let what = format!(
            "source table {src} sends enum value(s) that shard {shard} table {target} cannot take: {} (ALTER TYPE … ADD VALUE on the source)",
            missing
                .iter()
                .map(|(ty, labels, _)| format!(
                    "type {ty} lacks {}",
                    labels
                        .iter()
                        .map(|l| quote_literal(l))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        match self.mode {
            DdlMode::Propagate => {
                info!(table = %src, target = %target, values = %what, "propagating ALTER TYPE … ADD VALUE to the shard");
                EnumGap::Add(statements)
            }
            DdlMode::Wait => EnumGap::Wait(DdlWait {
                source_table: src,
                what,
                fix: format!(
                    "run on shard {shard}: {} (or set [apply] ddl = \"propagate\")",
                    statements.join("; ")
                ),
            }),
        }
    }

    /// Propagating new column(s) of `rel` to shard table `target` failed with `error`, an
    /// object the shard lacks (e.g. `42704`: the columns' type was created on the source after
    /// the shard's schema): wait for the operator, naming the `CREATE TYPE` of each enum type
    /// of the source's new columns (`new_columns`).
    pub(super) async fn missing_type_wait(
        &mut self,
        shard: &str,
        rel: &Relation,
        target: &str,
        add_sql: &str,
        new_columns: &[String],
        error: &str,
    ) -> DdlWait {
        let src = source_name(rel).to_string();
        let sql = enum_columns_query(&format!("{}::oid", rel.id.0));
        let creates: Vec<String> = match self.source_query(&sql, &[]).await {
            Ok(rows) => {
                let cols = enum_columns(enum_rows(&rows));
                let mut creates: Vec<String> = Vec::new();
                for c in cols.iter().filter(|c| new_columns.contains(&c.column)) {
                    let create = format!(
                        "CREATE TYPE {} AS ENUM ({})",
                        c.type_sql,
                        c.labels
                            .iter()
                            .map(|l| quote_literal(l))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if !creates.contains(&create) {
                        creates.push(create);
                    }
                }
                creates
            }
            Err(e) => {
                warn!(error = %e, table = %src, "cannot read the source's enum types for the fix");
                Vec::new()
            }
        };
        let fix = if creates.is_empty() {
            format!(
                "create on shard {shard} what the new column(s) need as the source has it (their type, its schema, a default's function); reshard then runs {add_sql}"
            )
        } else {
            format!(
                "run on shard {shard}: {}; reshard then runs {add_sql}",
                creates.join("; ")
            )
        };
        DdlWait {
            source_table: src.clone(),
            what: format!(
                "shard {shard} cannot add the column(s) {} that source table {src} now sends to {target}: {error}",
                new_columns
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix,
        }
    }

    /// Runs `sql` on the source catalog connection, reconnecting once if it broke.
    async fn source_query(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, String> {
        let Some(connect) = self.source.clone() else {
            return Err("no source connection is configured for the applier".into());
        };
        for attempt in 0..2 {
            if self.client.as_ref().is_none_or(Client::is_closed) {
                self.client = Some(connect().await?);
            }
            let Some(client) = &self.client else { continue };
            match client.query(sql, params).await {
                Ok(rows) => return Ok(rows),
                Err(e) if attempt == 0 && e.as_db_error().is_none() => {
                    warn!(error = %e, "source catalog connection failed; reconnecting");
                    self.client = None;
                }
                Err(e) => return Err(crate::pg::conn::error_text(&e)),
            }
        }
        Err("the source catalog connection failed twice".into())
    }

    /// What to do about shard columns of another type than the source's (`retypes`, not
    /// empty): with `ddl = "propagate"`, widen them; otherwise, or if one is not a widening,
    /// wait for the operator, naming the `ALTER TABLE` to run.
    fn retype_verdict(
        &self,
        shard: &str,
        src: &str,
        target: &str,
        target_sql: &str,
        retypes: Vec<Retype>,
    ) -> Verdict {
        let clauses: Vec<String> = retypes.iter().map(Retype::clause).collect();
        let sql = format!("ALTER TABLE {target_sql} {}", clauses.join(", "));
        let what = format!(
            "source table {src} changed the type of column(s) {} (ALTER TABLE … ALTER COLUMN … TYPE on the source); shard {shard} table {target} has the old type, and nothing of {src} is written to it until it has the new one",
            retypes
                .iter()
                .map(|r| format!("{:?} ({} → {})", r.column, r.shard_type, r.source_type))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let narrowing: Vec<String> = retypes
            .iter()
            .filter(|r| !r.widening)
            .map(|r| format!("{} → {}", r.shard_type, r.source_type))
            .collect();
        if !narrowing.is_empty() {
            return Verdict::Wait(DdlWait {
                source_table: src.to_owned(),
                what: format!(
                    "{what}; reshard never runs {} itself: the conversion may change a value the shard holds, as the source converted its rows in a table rewrite that is not replicated",
                    narrowing.join(", ")
                ),
                fix: format!("run on shard {shard}: {sql}"),
            });
        }
        match self.mode {
            DdlMode::Wait => Verdict::Wait(DdlWait {
                source_table: src.to_owned(),
                what,
                fix: format!("run on shard {shard}: {sql} (or set [apply] ddl = \"propagate\")"),
            }),
            DdlMode::Propagate => {
                info!(table = %src, target = %target, sql = %sql, "propagating a widening ALTER COLUMN … TYPE to the shard");
                Verdict::Add {
                    sql,
                    retyped: retypes.into_iter().map(|r| r.column).collect(),
                }
            }
        }
    }

    /// A change of `rel` failed on shard table `target` (columns `cols`) with a data error
    /// (SQLSTATE class 22: a value the shard's type does not take): if a shard column's type
    /// differs from the source's as the relation carries it, the source changed it (ALTER
    /// TYPE) and the shard did not follow: what to do, as [`Ddl::check`] would say, for every
    /// column that differs. `None`: no column differs (or the source's types cannot be read),
    /// the error is about the value.
    pub(super) async fn value_error_types(
        &mut self,
        shard: &str,
        rel: &Relation,
        target: &str,
        target_sql: &str,
        cols: &[TargetColumn],
    ) -> Option<Verdict> {
        match self.relation_types(rel).await {
            Ok(types) => {
                let r = compare_types(rel, cols, types, |_| true);
                if r.is_empty() {
                    return None;
                }
                Some(self.retype_verdict(
                    shard,
                    &source_name(rel).to_string(),
                    target,
                    target_sql,
                    r,
                ))
            }
            Err(e) => {
                warn!(table = %source_name(rel), error = %e, "the source's column types cannot be read to explain a value the shard refused");
                None
            }
        }
    }

    /// The source's type of each column of `rel` as the relation carries it (type OID and
    /// modifier at that point of the stream, not the catalog's current ones), formatted by the
    /// source: `None` for a type the source no longer has.
    async fn relation_types(&mut self, rel: &Relation) -> Result<Vec<Option<String>>, String> {
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
        let rows = self.source_query(RELATION_TYPES, &[&oids, &mods]).await?;
        if rows.len() != rel.columns.len() {
            return Err(format!(
                "the source formatted {} of {} column types",
                rows.len(),
                rel.columns.len()
            ));
        }
        rows.iter()
            .map(|r| r.try_get(0).map_err(|e| e.to_string()))
            .collect()
    }

    /// The source catalog's columns of `rel` (by OID).
    async fn source_columns(&mut self, rel: &Relation) -> Result<Vec<SourceColumn>, String> {
        let rows = self.source_query(SOURCE_COLUMNS, &[&rel.id.0]).await?;
        Ok(rows
            .iter()
            .map(|r| SourceColumn {
                name: r.get(0),
                type_sql: r.get(1),
                not_null: r.get(2),
                default: r.get(3),
                volatile: r.get(4),
            })
            .collect())
    }
}

/// A table column whose type is an enum, or an array of or a domain over one: the enum's
/// schema-qualified, quoted name and its labels in sort order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EnumColumn {
    /// Column name.
    pub column: String,
    /// `schema.type`, quoted as needed.
    pub type_sql: String,
    /// Labels in `enumsortorder`.
    pub labels: Vec<String>,
}

/// The enum columns of the table `rel_expr` (an `oid` or `regclass` SQL expression): one row
/// per (column, qualified enum type, label), labels in sort order. Domains and arrays are
/// followed down to their enum.
pub(super) fn enum_columns_query(rel_expr: &str) -> String {
    format!(
        "WITH RECURSIVE ty(col, oid, depth) AS ( \
           SELECT a.attname::text, a.atttypid, 0 FROM pg_attribute a \
           WHERE a.attrelid = {rel_expr} AND a.attnum > 0 AND NOT a.attisdropped \
           UNION ALL \
           SELECT ty.col, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END, ty.depth + 1 \
           FROM ty JOIN pg_type t ON t.oid = ty.oid \
           WHERE ty.depth < 8 AND (t.typtype = 'd' OR (t.typcategory = 'A' AND t.typelem <> 0))) \
         SELECT ty.col, quote_ident(n.nspname) || '.' || quote_ident(t.typname), e.enumlabel::text \
         FROM ty JOIN pg_type t ON t.oid = ty.oid AND t.typtype = 'e' \
         JOIN pg_namespace n ON n.oid = t.typnamespace \
         JOIN pg_enum e ON e.enumtypid = t.oid \
         ORDER BY ty.col, e.enumsortorder"
    )
}

/// Groups the rows of [`enum_columns_query`] (column, type, label), in their order.
pub(super) fn enum_columns(
    rows: impl IntoIterator<Item = (String, String, String)>,
) -> Vec<EnumColumn> {
    let mut out: Vec<EnumColumn> = Vec::new();
    for (column, type_sql, label) in rows {
        match out.last_mut() {
            Some(last) if last.column == column => last.labels.push(label),
            _ => out.push(EnumColumn {
                column,
                type_sql,
                labels: vec![label],
            }),
        }
    }
    out
}

/// Enum values the source has and the shard's enum types lack (`ALTER TYPE … ADD VALUE` on
/// the source): per shard enum type, the missing labels and the statements that add them in
/// the source's sort order (each after the nearest label before it in the source's order that
/// the shard has or is given first; a label with none before it goes before the first one
/// after it). Empty when the shard has every source label.
pub(super) fn missing_enum_values(
    source: &[EnumColumn],
    shard: &[EnumColumn],
) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for s in source {
        let Some(t) = shard.iter().find(|t| t.column == s.column) else {
            continue;
        };
        if out.iter().any(|(ty, _, _)| *ty == t.type_sql) {
            continue;
        }
        let mut have: Vec<&str> = t.labels.iter().map(String::as_str).collect();
        let (mut labels, mut statements) = (Vec::new(), Vec::new());
        for (i, label) in s.labels.iter().enumerate() {
            if have.contains(&label.as_str()) {
                continue;
            }
            let before = s.labels[..i]
                .iter()
                .rev()
                .find(|l| have.contains(&l.as_str()));
            let after = s.labels[i + 1..]
                .iter()
                .find(|l| have.contains(&l.as_str()));
            let place = match (before, after) {
                (Some(b), _) => format!(" AFTER {}", quote_literal(b)),
                (None, Some(a)) => format!(" BEFORE {}", quote_literal(a)),
                (None, None) => String::new(),
            };
            statements.push(format!(
                "ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{place}",
                t.type_sql,
                quote_literal(label)
            ));
            labels.push(label.clone());
            have.push(label);
        }
        if !labels.is_empty() {
            out.push((t.type_sql.clone(), labels, statements));
        }
    }
    out
}

/// The (column, type, label) rows of [`enum_columns_query`] read with the extended protocol
/// (a row that does not have three text columns is left out).
fn enum_rows(rows: &[tokio_postgres::Row]) -> Vec<(String, String, String)> {
    rows.iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?, r.try_get(2).ok()?)))
        .collect()
}

/// What a data error on an enum column comes to (see [`Ddl::enum_gap`]).
#[derive(Debug)]
pub(super) enum EnumGap {
    /// The shard has every label the source has: the error is something else.
    None,
    /// Run these `ALTER TYPE … ADD VALUE` on the shard, one by one, outside a transaction
    /// (`ddl = "propagate"`), then apply again.
    Add(Vec<String>),
    /// Wait for the operator (`ddl = "wait"`, or the source catalog cannot be read).
    Wait(DdlWait),
}

/// A shard column whose type differs from the source's.
#[derive(Debug)]
struct Retype {
    column: String,
    /// `format_type` on the shard.
    shard_type: String,
    /// `format_type` on the source, of the type the relation carries.
    source_type: String,
    /// See [`widens`].
    widening: bool,
}

impl Retype {
    /// `ALTER COLUMN c TYPE t USING c::t`.
    fn clause(&self) -> String {
        format!(
            "ALTER COLUMN {c} TYPE {t} USING {c}::{t}",
            c = quote_ident(&self.column),
            t = self.source_type
        )
    }
}

/// Whether every value of type `from` converts to type `to` (both `format_type` text) with the
/// same text form, so that `ALTER COLUMN … TYPE to` on a shard keeps every row it holds as the
/// source holds it after the same change: a wider integer, or `numeric` from an integer;
/// `varchar(n)` to a longer `varchar` or to `text`; `numeric(p,s)` to `numeric` or to more
/// precision at the same scale (a numeric keeps its scale, `1.50` stays `1.50`). More scale
/// (`1.50` → `1.500`), floats, or anything else is not a widening.
pub(super) fn widens(from: &str, to: &str) -> bool {
    fn split(t: &str) -> (&str, Option<Vec<u32>>) {
        match t.strip_suffix(')').and_then(|t| t.split_once('(')) {
            Some((base, mods)) => (
                base,
                mods.split(',').map(|m| m.trim().parse().ok()).collect(),
            ),
            None => (t, None),
        }
    }
    let int_rank = |t: &str| match t {
        "smallint" => Some(1),
        "integer" => Some(2),
        "bigint" => Some(3),
        _ => None,
    };
    if from == to {
        return false;
    }
    if let Some(a) = int_rank(from) {
        return int_rank(to).is_some_and(|b| a < b) || to == "numeric";
    }
    let ((fb, fm), (tb, tm)) = (split(from), split(to));
    match (fb, tb) {
        ("character varying", "text") => true,
        ("character varying", "character varying") => match (fm.as_deref(), tm.as_deref()) {
            (Some(_), None) => true,
            (Some([n]), Some([m])) => m >= n,
            _ => false,
        },
        ("numeric", "numeric") => match (fm.as_deref(), tm.as_deref()) {
            (Some(_), None) => true,
            (Some([p, s]), Some([p2, s2])) => s == s2 && p2 >= p,
            _ => false,
        },
        _ => false,
    }
}

/// The wait when the source changed a table and its definition cannot be read from the
/// source catalog.
fn unreadable_source(
    shard: &str,
    src: &str,
    target: &str,
    missing: &[&str],
    retyped: &[&str],
    e: &dyn std::fmt::Display,
) -> Verdict {
    Verdict::Wait(DdlWait {
        source_table: src.to_owned(),
        what: format!(
            "source table {src} changed ({}) and its definition cannot be read from the source catalog: {e}",
            describe(missing, retyped)
        ),
        fix: format!(
            "make shard {shard} table {target} match source table {src}, or restore the source connection"
        ),
    })
}

/// The shard columns of `cols` whose type differs from `types`, the source's type of each
/// column of `rel` in order (`None`: unknown, not compared); those that `keep` accepts.
fn compare_types(
    rel: &Relation,
    cols: &[TargetColumn],
    types: Vec<Option<String>>,
    keep: impl Fn(&Retype) -> bool,
) -> Vec<Retype> {
    let mut out = Vec::new();
    for (c, source_type) in rel.columns.iter().zip(types) {
        let Some(source_type) = source_type else {
            continue;
        };
        let Some(t) = cols.iter().find(|t| t.name == c.name && !t.generated) else {
            continue;
        };
        if t.type_sql == source_type {
            continue;
        }
        let r = Retype {
            column: c.name.clone(),
            widening: widens(&t.type_sql, &source_type),
            shard_type: t.type_sql.clone(),
            source_type,
        };
        if keep(&r) {
            out.push(r);
        }
    }
    out
}

/// `format_type(oid, typmod)` of the built-in types [`widens`] knows (`smallint`, `integer`,
/// `bigint`, `text`, `character varying[(n)]`, `numeric[(p,s)]`; their OIDs are fixed in every
/// PostgreSQL version), computed here; `None` for any other type.
/// See <https://www.postgresql.org/docs/current/datatype-numeric.html> for the modifiers.
fn widenable_type_sql(oid: u32, typmod: i32) -> Option<String> {
    // A type modifier carries a 4-byte header (VARHDRSZ); -1 is none.
    let m = (typmod >= 4).then(|| typmod - 4);
    Some(match (oid, m) {
        (21, _) => "smallint".into(),
        (23, _) => "integer".into(),
        (20, _) => "bigint".into(),
        (25, _) => "text".into(),
        (1043, None) => "character varying".into(),
        (1043, Some(n)) => format!("character varying({n})"),
        (1700, None) => "numeric".into(),
        (1700, Some(m)) => {
            let (precision, scale) = ((m >> 16) & 0xffff, m & 0xffff);
            // A negative scale (PostgreSQL 15+) is stored in 11 bits: not a widening we know.
            if scale > precision {
                return None;
            }
            format!("numeric({precision},{scale})")
        }
        _ => return None,
    })
}

/// The `format_type` of each (type OID, type modifier) pair of `$1`, `$2`, in order; NULL for
/// a type the catalog no longer has.
const RELATION_TYPES: &str = "\
SELECT CASE WHEN t.oid IS NULL THEN NULL ELSE format_type(u.o, u.m) END \
FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(o, m, i) \
LEFT JOIN pg_type t ON t.oid = u.o \
ORDER BY u.i";

/// The current columns of a source table by OID: name, `format_type`, NOT NULL, default
/// expression, and whether a row's value is computed per row (a default calling a volatile
/// function, found through the `funcid`s of its stored expression tree, or an identity).
const SOURCE_COLUMNS: &str = "\
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
       pg_get_expr(d.adbin, d.adrelid), \
       a.attidentity <> '' OR coalesce((SELECT bool_or(p.provolatile = 'v') \
         FROM regexp_matches(d.adbin::text, ':(?:funcid|opfuncid) (\\d+)', 'g') m \
         JOIN pg_proc p ON p.oid = m[1]::oid), false) \
FROM pg_attribute a \
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped \
ORDER BY a.attnum";

/// `ADD COLUMN IF NOT EXISTS name type [DEFAULT expr] [NOT NULL]`.
fn add_column_sql(c: &SourceColumn) -> String {
    let mut s = format!(
        "ADD COLUMN IF NOT EXISTS {} {}",
        quote_ident(&c.name),
        c.type_sql
    );
    if let Some(d) = &c.default {
        s.push_str(" DEFAULT ");
        s.push_str(d);
    }
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    s
}

/// The wait for a column the source no longer sends while the shard still has it.
fn non_additive(
    shard: &str,
    src: &str,
    target: &str,
    target_sql: &str,
    gone: &[&str],
    missing: &[&str],
) -> DdlWait {
    let what = format!(
        "source table {src} no longer sends column(s) {} that shard {shard} table {target} still has{} (DROP or RENAME on the source, not additive; nothing is written to {target} until it matches)",
        quoted(gone),
        if missing.is_empty() {
            String::new()
        } else {
            format!(", and sends column(s) {} that it lacks", quoted(missing))
        }
    );
    let fix = if let ([old], [new]) = (gone, missing) {
        format!(
            "if the column was renamed, run on shard {shard}: ALTER TABLE {target_sql} RENAME COLUMN {} TO {}; if it was dropped, drop it on the shard and add the new one",
            quote_ident(old),
            quote_ident(new)
        )
    } else {
        let drops: Vec<String> = gone
            .iter()
            .map(|c| format!("DROP COLUMN {}", quote_ident(c)))
            .collect();
        format!(
            "if dropped, run on shard {shard}: ALTER TABLE {target_sql} {}; if renamed, RENAME COLUMN each on the shard{}",
            drops.join(", "),
            if missing.is_empty() {
                ""
            } else {
                "; add any new column too"
            }
        )
    };
    DdlWait {
        source_table: src.to_owned(),
        what,
        fix,
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(missing: &[&str], retyped: &[&str]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("new column(s) {}", quoted(missing)));
    }
    if !retyped.is_empty() {
        parts.push(format!("new type of {}", quoted(retyped)));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, ReplicaIdentity};

    fn rel(cols: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(7),
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                    is_key: *n == "id",
                })
                .collect(),
        })
    }

    fn tcols(cols: &[&str]) -> Vec<TargetColumn> {
        cols.iter()
            .map(|n| TargetColumn {
                name: (*n).into(),
                type_sql: "text".into(),
                cast_sql: "text".into(),
                not_null: false,
                has_default: false,
                identity_always: false,
                identity_by_default: false,
                generated: false,
                in_primary_key: *n == "id",
            })
            .collect()
    }

    async fn check(d: &mut Ddl, r: &[&str], t: &[&str]) -> Verdict {
        d.check("shard0", &rel(r), "public.items", "public.items", &tcols(t))
            .await
    }

    #[tokio::test]
    async fn a_rename_is_never_taken_for_an_added_column() {
        let mut d = Ddl::new(DdlMode::Propagate, None);
        d.matched(&rel(&["id", "name"]));
        let Verdict::Wait(w) = check(&mut d, &["id", "title"], &["id", "name"]).await else {
            panic!("a rename must wait");
        };
        let m = w.to_string();
        assert!(m.contains("\"name\"") && m.contains("\"title\""), "{m}");
        assert!(m.contains("RENAME COLUMN name TO title"), "{m}");
        // Without an earlier relation (after a restart) it is just as ambiguous.
        let mut d = Ddl::new(DdlMode::Propagate, None);
        assert!(matches!(
            check(&mut d, &["id", "title"], &["id", "name"]).await,
            Verdict::Wait(_)
        ));
    }

    #[tokio::test]
    async fn a_dropped_column_waits_and_an_extra_shard_column_does_not() {
        let mut d = Ddl::new(DdlMode::Propagate, None);
        // A shard column the source never sent is the operator's own.
        assert!(matches!(
            check(&mut d, &["id"], &["id", "extra"]).await,
            Verdict::Ready
        ));
        d.matched(&rel(&["id", "gone"]));
        let Verdict::Wait(w) = check(&mut d, &["id"], &["id", "gone"]).await else {
            panic!("a drop must wait");
        };
        assert!(w.to_string().contains("DROP COLUMN gone"), "{w}");
        // Resumes once the shard matches.
        assert!(matches!(
            check(&mut d, &["id"], &["id"]).await,
            Verdict::Ready
        ));
    }

    #[tokio::test]
    async fn an_added_column_without_the_source_catalog_waits_naming_it() {
        let mut d = Ddl::new(DdlMode::Propagate, None);
        d.matched(&rel(&["id"]));
        let Verdict::Wait(w) = check(&mut d, &["id", "note"], &["id"]).await else {
            panic!("must wait");
        };
        assert!(w.to_string().contains("\"note\""), "{w}");
    }

    fn enums(rows: &[(&str, &str, &str)]) -> Vec<EnumColumn> {
        enum_columns(
            rows.iter()
                .map(|(c, t, l)| ((*c).to_owned(), (*t).to_owned(), (*l).to_owned())),
        )
    }

    #[test]
    fn missing_enum_values_are_added_in_the_sources_order_once_per_type() {
        // Source: sad, meh, ok, angry (meh added BEFORE ok); two columns of the type, one of
        // them an array (same type on the shard).
        let source = enums(&[
            ("m", "public.mood", "sad"),
            ("m", "public.mood", "meh"),
            ("m", "public.mood", "ok"),
            ("m", "public.mood", "angry"),
            ("ms", "public.mood", "sad"),
            ("ms", "public.mood", "meh"),
            ("ms", "public.mood", "ok"),
            ("ms", "public.mood", "angry"),
        ]);
        let shard = enums(&[
            ("m", "public.mood", "sad"),
            ("m", "public.mood", "ok"),
            ("ms", "public.mood", "sad"),
            ("ms", "public.mood", "ok"),
        ]);
        let missing = missing_enum_values(&source, &shard);
        assert_eq!(missing.len(), 1, "{missing:?}");
        let (ty, labels, statements) = &missing[0];
        assert_eq!(ty, "public.mood");
        assert_eq!(labels, &["meh", "angry"]);
        assert_eq!(
            statements,
            &[
                "ALTER TYPE public.mood ADD VALUE IF NOT EXISTS 'meh' AFTER 'sad'",
                "ALTER TYPE public.mood ADD VALUE IF NOT EXISTS 'angry' AFTER 'ok'",
            ]
        );
        // A new first label goes before the first one the shard has; a quote is escaped.
        let source = enums(&[("m", "s.\"E\"", "it's"), ("m", "s.\"E\"", "b")]);
        let shard = enums(&[("m", "s.\"E\"", "b")]);
        assert_eq!(
            missing_enum_values(&source, &shard)[0].2,
            ["ALTER TYPE s.\"E\" ADD VALUE IF NOT EXISTS 'it''s' BEFORE 'b'"]
        );
        // Nothing missing, or a column that is no enum on the shard: nothing to add.
        assert!(missing_enum_values(&shard, &shard).is_empty());
        assert!(missing_enum_values(&source, &[]).is_empty());
    }

    /// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value". The first
    /// relation a process meets (after a restart) already carries the new type: a shard column
    /// narrower than it is found without an earlier relation and without the source catalog.
    #[tokio::test]
    async fn a_narrower_shard_column_is_found_at_first_sight() {
        let mut r = (*rel(&["id", "n", "note"])).clone();
        r.columns[1].type_oid = 20; // bigint on the source
        let r = Arc::new(r);
        let mut cols = tcols(&["id", "n", "note"]);
        cols[1].type_sql = "integer".into();
        let mut d = Ddl::new(DdlMode::Wait, None);
        let Verdict::Wait(w) = d
            .check("shard0", &r, "public.items", "public.items", &cols)
            .await
        else {
            panic!("an integer shard column for a bigint must wait");
        };
        let m = w.to_string();
        assert!(m.contains("\"n\" (integer → bigint)"), "{m}");
        assert!(
            m.contains("run on shard shard0: ALTER TABLE public.items ALTER COLUMN n TYPE bigint USING n::bigint"),
            "{m}"
        );
        let mut d = Ddl::new(DdlMode::Propagate, None);
        let Verdict::Add { sql, retyped } = d
            .check("shard0", &r, "public.items", "public.items", &cols)
            .await
        else {
            panic!("a widening is propagated");
        };
        assert_eq!(
            sql,
            "ALTER TABLE public.items ALTER COLUMN n TYPE bigint USING n::bigint"
        );
        assert_eq!(retyped, ["n"]);
        // A shard column wider than the source's is the operator's choice.
        cols[1].type_sql = "numeric".into();
        assert!(matches!(
            d.check("shard0", &r, "public.items", "public.items", &cols)
                .await,
            Verdict::Ready
        ));
    }

    #[test]
    fn widens_only_where_every_value_keeps_its_text() {
        for (from, to) in [
            ("smallint", "integer"),
            ("integer", "bigint"),
            ("integer", "numeric"),
            ("character varying(10)", "text"),
            ("character varying(10)", "character varying(12)"),
            ("character varying(10)", "character varying"),
            ("character varying", "text"),
            ("numeric(10,2)", "numeric"),
            ("numeric(10,2)", "numeric(12,2)"),
        ] {
            assert!(widens(from, to), "{from} → {to}");
        }
        for (from, to) in [
            ("bigint", "integer"),
            ("integer", "integer"),
            ("integer", "text"),
            ("integer", "numeric(5,0)"),
            ("real", "double precision"),
            ("text", "character varying(10)"),
            ("character varying(10)", "character varying(8)"),
            ("numeric(10,2)", "numeric(12,3)"),
            ("numeric(10,2)", "numeric(8,2)"),
            ("numeric", "numeric(10,2)"),
            ("integer[]", "bigint[]"),
            ("character(3)", "text"),
        ] {
            assert!(!widens(from, to), "{from} → {to}");
        }
    }

    #[test]
    fn widenable_types_are_formatted_as_format_type_does() {
        assert_eq!(widenable_type_sql(23, -1).as_deref(), Some("integer"));
        assert_eq!(widenable_type_sql(20, -1).as_deref(), Some("bigint"));
        assert_eq!(widenable_type_sql(21, -1).as_deref(), Some("smallint"));
        assert_eq!(widenable_type_sql(25, -1).as_deref(), Some("text"));
        assert_eq!(
            widenable_type_sql(1043, 14).as_deref(),
            Some("character varying(10)")
        );
        assert_eq!(
            widenable_type_sql(1043, -1).as_deref(),
            Some("character varying")
        );
        // numeric(10,2): ((10 << 16) | 2) + 4.
        assert_eq!(
            widenable_type_sql(1700, (10 << 16 | 2) + 4).as_deref(),
            Some("numeric(10,2)")
        );
        assert_eq!(widenable_type_sql(1700, -1).as_deref(), Some("numeric"));
        // numeric(5,-2): the scale is 11-bit two's complement.
        assert_eq!(widenable_type_sql(1700, (5 << 16 | 0x7fe) + 4), None);
        assert_eq!(widenable_type_sql(16, -1), None);
    }

    #[test]
    fn add_column_sql_carries_type_default_and_nullability() {
        let c = SourceColumn {
            name: "score".into(),
            type_sql: "integer".into(),
            not_null: true,
            default: Some("7".into()),
            volatile: false,
        };
        assert_eq!(
            add_column_sql(&c),
            "ADD COLUMN IF NOT EXISTS score integer DEFAULT 7 NOT NULL"
        );
    }
}
