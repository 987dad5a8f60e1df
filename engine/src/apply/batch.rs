//! Turning folded changes into set-based SQL, and single changes into single statements.
//!
//! In: a [`TargetTable`] and its [`Folded`] net changes (or one source [`Change`] for the
//! ordered replay path). Out: COPY text rows for the table's staging table plus the statements
//! that merge the staged rows into the target (`DELETE … USING`, `INSERT … SELECT … ON
//! CONFLICT`, `UPDATE … FROM`, one per set of carried columns), or one literal statement per
//! change. Invariant: a column a change did not carry (unchanged TOAST) is never written, and no
//! value passes through anything but its text form.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};

use super::fold::{Folded, NetChange};
use super::schema::{KeyMode, TargetTable};
use super::text::{push_copy_escaped, push_sql_literal, sql_literal, COPY_NULL};
use crate::event::{Change, OldRow, Row, Value};

/// Op code of a staged delete.
const OP_DELETE: u32 = 0;
/// Op code of a staged upsert (key deleted earlier in the batch, then inserted again).
const OP_UPSERT: u32 = 1;
/// Op code of a staged insert.
const OP_INSERT: u32 = 2;
/// First op code of staged updates; one per set of carried columns.
const OP_UPDATE_BASE: u32 = 3;

/// Most net changes of one table a flush writes inline (as `VALUES` lists inside the merge
/// statements) instead of through COPY into the staging table.
pub const INLINE_MAX_ROWS: usize = 1000;
/// Most bytes of `VALUES` lists one table's inline flush writes.
pub const INLINE_MAX_BYTES: usize = 1 << 20;

/// A value that cannot be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A value in binary form (the publication's `binary = true`); apply writes text only.
    #[error("column {column:?} arrived in binary form; run the source with binary = false")]
    Binary {
        /// The column.
        column: String,
    },
    /// A row that must be complete carries an unchanged-TOAST marker.
    #[error("column {column:?} of a new row arrived as unchanged TOAST")]
    MissingValue {
        /// The column.
        column: String,
    },
    /// A text value that is not UTF-8.
    #[error("column {column:?} is not valid UTF-8")]
    NotUtf8 {
        /// The column.
        column: String,
    },
}

/// What one table contributes to a flush.
#[derive(Debug, Default)]
pub struct TableBatch {
    /// Staged rows (inline: rows in the `VALUES` lists).
    pub rows: usize,
    /// Statements to run after the COPY, in order.
    pub statements: Vec<String>,
    /// Rows written straight into the target table, without a staging table and without `ON
    /// CONFLICT` (see [`TargetTable::takes_direct_inserts`]): COPY text rows in the caller's
    /// `direct` buffer ([`encode_table`]), or a plain `INSERT` among `statements`
    /// ([`encode_table_inline`]).
    pub direct_rows: usize,
}

fn put_op(out: &mut BytesMut, op: u32) {
    // Decimal digits without allocating: op codes are small.
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    let mut v = op;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    out.put_slice(&buf[i..]);
}

fn put_value(
    out: &mut BytesMut,
    table: &TargetTable,
    col: usize,
    v: Option<&Value>,
) -> Result<(), EncodeError> {
    match v {
        Some(Value::Text(b)) => push_copy_escaped(out, b),
        Some(Value::Null) | Some(Value::UnchangedToast) | None => out.put_slice(COPY_NULL),
        Some(Value::Binary(_)) => {
            return Err(EncodeError::Binary {
                column: column_name(table, col),
            })
        }
    }
    Ok(())
}

fn column_name(table: &TargetTable, source_idx: usize) -> String {
    table
        .source
        .columns
        .get(source_idx)
        .map(|c| c.name.clone())
        .unwrap_or_else(|| format!("#{source_idx}"))
}

/// Appends one staged row: op code, then every mapped column (`keys_only`: only key columns,
/// the rest NULL).
fn put_row(
    out: &mut BytesMut,
    table: &TargetTable,
    op: u32,
    row: &Row,
    keys_only: bool,
    complete: bool,
) -> Result<(), EncodeError> {
    put_op(out, op);
    if !table.columns.is_empty() {
        out.put_u8(b'\t');
    }
    put_columns(out, table, row, keys_only, complete)
}

/// Appends every mapped column of `row` as COPY text (see [`put_row`]), then the row's end.
fn put_columns(
    out: &mut BytesMut,
    table: &TargetTable,
    row: &Row,
    keys_only: bool,
    complete: bool,
) -> Result<(), EncodeError> {
    for (i, c) in table.columns.iter().enumerate() {
        if i > 0 {
            out.put_u8(b'\t');
        }
        let v = row.get(c.source_idx);
        if complete && matches!(v, Some(Value::UnchangedToast) | None) {
            return Err(EncodeError::MissingValue {
                column: c.name.clone(),
            });
        }
        if keys_only && !c.is_key && !table.is_owner(c) {
            out.put_slice(COPY_NULL);
        } else {
            put_value(out, table, c.source_idx, v)?;
        }
    }
    out.put_u8(b'\n');
    Ok(())
}

/// Encodes `folded` into COPY text rows for `table`'s staging table (appended to `out`) and
/// returns the statements that merge them: deletes first (freeing unique values), then
/// inserts/upserts, then updates grouped by the set of columns they carry, then `TRUNCATE` of
/// the staging table (no statement at all when nothing is staged).
///
/// With `direct` (only for a table that [takes direct
/// inserts](TargetTable::takes_direct_inserts)), the rows of keys new to the batch
/// ([`NetChange::Insert`]) are appended to it instead, as COPY text rows for the target table
/// itself ([`TargetTable::copy_target_sql`]); the caller sends them after the statements.
pub fn encode_table(
    table: &TargetTable,
    folded: &Folded,
    out: &mut BytesMut,
    mut direct: Option<&mut BytesMut>,
) -> Result<TableBatch, EncodeError> {
    let mut groups: HashMap<Vec<bool>, u32> = HashMap::new();
    let mut group_list: Vec<Vec<bool>> = Vec::new();
    let (mut deletes, mut upserts, mut inserts, mut direct_rows) = (0usize, 0usize, 0usize, 0);
    for net in &folded.changes {
        match net {
            NetChange::Delete(r) => {
                deletes += 1;
                put_row(out, table, OP_DELETE, r, true, false)?;
            }
            NetChange::Upsert(r) => {
                upserts += 1;
                put_row(out, table, OP_UPSERT, r, false, true)?;
            }
            NetChange::Insert(r) => match direct.as_deref_mut() {
                Some(d) => {
                    direct_rows += 1;
                    put_columns(d, table, r, false, true)?;
                }
                None => {
                    inserts += 1;
                    put_row(out, table, OP_INSERT, r, false, true)?;
                }
            },
            NetChange::Update(r) => {
                let carried: Vec<bool> = r.iter().map(|v| *v != Value::UnchangedToast).collect();
                let next = group_list.len() as u32;
                let g = *groups.entry(carried.clone()).or_insert_with(|| {
                    group_list.push(carried);
                    next
                });
                put_row(out, table, OP_UPDATE_BASE + g, r, false, false)?;
            }
        }
    }

    let mut statements = Vec::new();
    let upsert_by_delete = table.key_mode != KeyMode::PrimaryKey;
    // The owner guard (reverse replication) first reads the rows the deletes and updates
    // would change.
    if deletes > 0 || !group_list.is_empty() {
        let mut ops = vec![OP_DELETE.to_string()];
        ops.extend((0..group_list.len()).map(|g| (OP_UPDATE_BASE + g as u32).to_string()));
        statements.extend(table.owner_rows_sql(&ops.join(", "), &table.staging_source()));
    }
    if deletes > 0 || (upsert_by_delete && upserts > 0) {
        let ops = if upsert_by_delete { "0, 1" } else { "0" };
        statements.push(table.delete_sql(ops));
    }
    if upserts + inserts > 0 {
        statements.push(table.insert_sql("1, 2"));
        statements.extend(table.owner_lost_sql("1, 2", &table.staging_source()));
    }
    for (g, carried) in group_list.iter().enumerate() {
        if let Some(sql) = table.update_sql(OP_UPDATE_BASE + g as u32, carried) {
            statements.push(sql);
        }
    }
    let rows = folded.changes.len() - direct_rows;
    if rows > 0 {
        statements.push(table.truncate_staging_sql());
    }
    Ok(TableBatch {
        rows,
        statements,
        direct_rows,
    })
}

/// Appends `(op, 'v', NULL, …)` for `row` to the `VALUES` list `out` (see [`put_row`] for
/// `keys_only` and `complete`). `Ok(false)`: a value is not UTF-8, so no SQL literal can carry
/// it (the caller takes COPY instead).
fn push_values_row(
    out: &mut String,
    table: &TargetTable,
    op: u32,
    row: &Row,
    keys_only: bool,
    complete: bool,
) -> Result<bool, EncodeError> {
    use std::fmt::Write as _;
    if !out.is_empty() {
        out.push_str(", ");
    }
    // Writing into a String cannot fail.
    let _ = write!(out, "({op}");
    for c in &table.columns {
        out.push_str(", ");
        match inline_value(table, c, row, keys_only, complete)? {
            None => out.push_str("NULL"),
            Some(b) => {
                if push_sql_literal(out, b).is_err() {
                    return Ok(false);
                }
            }
        }
    }
    out.push(')');
    Ok(true)
}

/// The text a staged row carries in column `c` (`None`: NULL), as [`put_row`] stages it.
fn inline_value<'r>(
    table: &TargetTable,
    c: &super::schema::MappedColumn,
    row: &'r Row,
    keys_only: bool,
    complete: bool,
) -> Result<Option<&'r [u8]>, EncodeError> {
    let v = row.get(c.source_idx);
    if complete && matches!(v, Some(Value::UnchangedToast) | None) {
        return Err(EncodeError::MissingValue {
            column: c.name.clone(),
        });
    }
    match v {
        _ if keys_only && !c.is_key && !table.is_owner(c) => Ok(None),
        Some(Value::Text(b)) => Ok(Some(b)),
        Some(Value::Null) | Some(Value::UnchangedToast) | None => Ok(None),
        Some(Value::Binary(_)) => Err(EncodeError::Binary {
            column: column_name(table, c.source_idx),
        }),
    }
}

/// Most statements an applier session keeps prepared; past it they are all deallocated and
/// prepared again as they come (a table's statements differ only by the sets of columns its
/// updates carry, so this is reached only by unusual churn).
const PREPARED_MAX: usize = 512;

/// The merge statements an applier session has prepared (`PREPARE`/`EXECUTE` inside its simple
/// queries, so a flush still goes in one round trip): the target parses and plans each once
/// per session instead of once per flush, and a flush's rows travel as one array literal per
/// column instead of a `VALUES` list the target must parse value by value.
///
/// A prepared statement outlives a failed or rolled-back transaction, but one whose `PREPARE`
/// never ran (a statement before it failed) does not exist: after any error the session's set
/// is unknown, so [`Self::reset`] forgets it and the next statement deallocates all first.
#[derive(Debug, Default)]
pub struct Prepared {
    names: HashMap<String, usize>,
    deallocate: bool,
}

impl Prepared {
    /// A new session's (nothing prepared).
    pub fn new() -> Prepared {
        Prepared::default()
    }

    /// After an error on the session: what it holds prepared is unknown.
    pub fn reset(&mut self) {
        self.deallocate = !self.names.is_empty() || self.deallocate;
        self.names.clear();
    }

    /// Statements currently known prepared.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// `EXECUTE` of `sql` with `params` (SQL literals, comma-separated), preceded by its
    /// `PREPARE … (types) AS sql` the first time this session runs it.
    fn execute(&mut self, sql: String, types: &str, params: &str) -> String {
        let mut out = String::new();
        if self.deallocate || self.names.len() >= PREPARED_MAX {
            out.push_str("DEALLOCATE ALL;\n");
            self.names.clear();
            self.deallocate = false;
        }
        let next = self.names.len();
        let (id, new) = match self.names.get(&sql) {
            Some(id) => (*id, false),
            None => (next, true),
        };
        if new {
            out.push_str(&format!("PREPARE reshard_{id} ({types}) AS {sql};\n"));
            self.names.insert(sql, id);
        }
        out.push_str(&format!("EXECUTE reshard_{id}({params})"));
        out
    }
}

/// The rows of one inline merge statement as arrays: the op codes, and per mapped column the
/// values' text forms, each an `int4[]` / `text[]` literal for [`TargetTable::unnest_source`].
#[derive(Debug)]
struct ArrayRows {
    ops: String,
    cols: Vec<String>,
}

impl ArrayRows {
    fn new(table: &TargetTable) -> ArrayRows {
        ArrayRows {
            ops: String::new(),
            cols: vec![String::new(); table.columns.len()],
        }
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn bytes(&self) -> usize {
        self.ops.len() + self.cols.iter().map(String::len).sum::<usize>()
    }

    /// Appends `row` (see [`push_values_row`]); `Ok(false)`: a value is not UTF-8.
    fn push(
        &mut self,
        table: &TargetTable,
        op: u32,
        row: &Row,
        keys_only: bool,
        complete: bool,
    ) -> Result<bool, EncodeError> {
        use std::fmt::Write as _;
        for (c, out) in table.columns.iter().zip(self.cols.iter_mut()) {
            let Some(b) = inline_value(table, c, row, keys_only, complete)? else {
                if !self.ops.is_empty() {
                    out.push(',');
                }
                out.push_str("NULL");
                continue;
            };
            let Ok(text) = std::str::from_utf8(b) else {
                return Ok(false);
            };
            if !self.ops.is_empty() {
                out.push(',');
            }
            push_array_element(out, text);
        }
        if !self.ops.is_empty() {
            self.ops.push(',');
        }
        // Writing into a String cannot fail.
        let _ = write!(self.ops, "{op}");
        Ok(true)
    }

    /// The statement's parameters: each array as an SQL literal.
    fn params(&self) -> String {
        let mut out = String::with_capacity(self.bytes() + 6 * (self.cols.len() + 1));
        for (i, a) in std::iter::once(&self.ops).chain(&self.cols).enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str("'{");
            out.push_str(a);
            out.push_str("}'");
        }
        out
    }
}

/// Appends `text` to an array literal that will itself sit inside a standard-conforming SQL
/// string literal: double-quoted, `"` and `\` backslash-escaped for the array parser
/// (<https://www.postgresql.org/docs/current/arrays.html#ARRAYS-IO>), `'` doubled for the
/// string literal.
fn push_array_element(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    let mut start = 0;
    for (i, ch) in text.char_indices() {
        let esc = match ch {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\'' => "''",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        out.push_str(esc);
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// The rows of one inline merge statement: a `VALUES` list, or arrays for a prepared
/// statement (see [`Prepared`]).
#[derive(Debug)]
enum InlineRows {
    Values(String),
    Arrays(ArrayRows),
}

impl InlineRows {
    fn new(table: &TargetTable, arrays: bool) -> InlineRows {
        if arrays {
            InlineRows::Arrays(ArrayRows::new(table))
        } else {
            InlineRows::Values(String::new())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            InlineRows::Values(v) => v.is_empty(),
            InlineRows::Arrays(a) => a.is_empty(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            InlineRows::Values(v) => v.len(),
            InlineRows::Arrays(a) => a.bytes(),
        }
    }

    fn push(
        &mut self,
        table: &TargetTable,
        op: u32,
        row: &Row,
        keys_only: bool,
        complete: bool,
    ) -> Result<bool, EncodeError> {
        match self {
            InlineRows::Values(v) => push_values_row(v, table, op, row, keys_only, complete),
            InlineRows::Arrays(a) => a.push(table, op, row, keys_only, complete),
        }
    }

    /// The statement `sql` builds on these rows as its row source `s`.
    fn statement(
        &self,
        table: &TargetTable,
        prepared: &mut Option<&mut Prepared>,
        sql: impl Fn(&str) -> Option<String>,
    ) -> Option<String> {
        match (self, prepared) {
            (InlineRows::Arrays(a), Some(p)) => {
                let stmt = sql(&table.unnest_source())?;
                Some(p.execute(stmt, &table.unnest_types(), &a.params()))
            }
            // Not reached: `encode_table_inline` makes arrays only when it has `prepared`.
            (InlineRows::Arrays(_), None) => None,
            (InlineRows::Values(v), _) => sql(&table.values_source(v)),
        }
    }
}

/// Encodes `folded` into the same merge statements as [`encode_table`], each reading its rows
/// from a `VALUES` list instead of the staging table: no COPY, no staging table, no `TRUNCATE`
/// (one simple query carries a small flush). `Ok(None)` when the flush is too large
/// ([`INLINE_MAX_ROWS`], [`INLINE_MAX_BYTES`]) or a value is not UTF-8: use [`encode_table`].
///
/// With `prepared` (the session's [`Prepared`]), the statements are prepared once per session
/// and read their rows from arrays (`unnest`); a table whose rows of other owners are guarded
/// ([`TargetTable::guard_owner`]) keeps `VALUES` lists.
///
/// With `direct` (only for a table that [takes direct
/// inserts](TargetTable::takes_direct_inserts)), the rows of keys new to the batch go into a
/// plain `INSERT` without `ON CONFLICT`, after the upserts.
pub fn encode_table_inline(
    table: &TargetTable,
    folded: &Folded,
    direct: bool,
    mut prepared: Option<&mut Prepared>,
) -> Result<Option<TableBatch>, EncodeError> {
    if folded.changes.len() > INLINE_MAX_ROWS {
        return Ok(None);
    }
    if table.owner().is_some() {
        prepared = None;
    }
    let arrays = prepared.is_some();
    let upsert_by_delete = table.key_mode != KeyMode::PrimaryKey;
    let mut deletes = InlineRows::new(table, arrays);
    let mut inserts = InlineRows::new(table, arrays);
    let mut plain = InlineRows::new(table, arrays);
    let mut direct_rows = 0usize;
    let mut groups: HashMap<Vec<bool>, usize> = HashMap::new();
    let mut updates: Vec<(Vec<bool>, InlineRows)> = Vec::new();
    let mut update_bytes = 0usize;
    for net in &folded.changes {
        let ok = match net {
            NetChange::Delete(r) => deletes.push(table, OP_DELETE, r, true, false)?,
            NetChange::Upsert(r) => {
                (!upsert_by_delete || deletes.push(table, OP_UPSERT, r, true, false)?)
                    && inserts.push(table, OP_UPSERT, r, false, true)?
            }
            NetChange::Insert(r) if direct => {
                direct_rows += 1;
                plain.push(table, OP_INSERT, r, false, true)?
            }
            NetChange::Insert(r) => inserts.push(table, OP_INSERT, r, false, true)?,
            NetChange::Update(r) => {
                let carried: Vec<bool> = r.iter().map(|v| *v != Value::UnchangedToast).collect();
                let g = match groups.get(&carried) {
                    Some(g) => *g,
                    None => {
                        groups.insert(carried.clone(), updates.len());
                        updates.push((carried, InlineRows::new(table, arrays)));
                        updates.len() - 1
                    }
                };
                let op = OP_UPDATE_BASE + g as u32;
                match updates.get_mut(g) {
                    Some((_, rows)) => {
                        let before = rows.bytes();
                        let ok = rows.push(table, op, r, false, false)?;
                        update_bytes += rows.bytes() - before;
                        ok
                    }
                    None => false,
                }
            }
        };
        if !ok
            || deletes.bytes() + inserts.bytes() + plain.bytes() + update_bytes > INLINE_MAX_BYTES
        {
            return Ok(None);
        }
    }
    let mut statements = Vec::new();
    let p = &mut prepared;
    // The owner guard (reverse replication) first reads the rows the deletes and updates
    // would change.
    if !deletes.is_empty() {
        statements.extend(deletes.statement(table, p, |s| table.owner_rows_sql("0", s)));
    }
    for (g, (_, rows)) in updates.iter().enumerate() {
        let op = (OP_UPDATE_BASE + g as u32).to_string();
        statements.extend(rows.statement(table, p, |s| table.owner_rows_sql(&op, s)));
    }
    if !deletes.is_empty() {
        let ops = if upsert_by_delete { "0, 1" } else { "0" };
        statements.extend(deletes.statement(table, p, |s| Some(table.delete_sql_from(ops, s))));
    }
    if !inserts.is_empty() {
        statements.extend(inserts.statement(table, p, |s| Some(table.insert_sql_from("1, 2", s))));
        statements.extend(inserts.statement(table, p, |s| table.owner_lost_sql("1, 2", s)));
    }
    if !plain.is_empty() {
        statements.extend(plain.statement(table, p, |s| Some(table.insert_new_sql_from(s))));
    }
    for (g, (carried, rows)) in updates.iter().enumerate() {
        let op = OP_UPDATE_BASE + g as u32;
        statements.extend(rows.statement(table, p, |s| table.update_sql_from(op, carried, s)));
    }
    Ok(Some(TableBatch {
        rows: folded.changes.len() - direct_rows,
        statements,
        direct_rows,
    }))
}

fn literal(table: &TargetTable, idx: usize, v: Option<&Value>) -> Result<String, EncodeError> {
    match v {
        Some(Value::Text(b)) => sql_literal(b).map_err(|_| EncodeError::NotUtf8 {
            column: column_name(table, idx),
        }),
        Some(Value::Null) => Ok("NULL".to_owned()),
        Some(Value::UnchangedToast) | None => Err(EncodeError::MissingValue {
            column: column_name(table, idx),
        }),
        Some(Value::Binary(_)) => Err(EncodeError::Binary {
            column: column_name(table, idx),
        }),
    }
}

fn where_key(table: &TargetTable, key_row: &Row) -> Result<String, EncodeError> {
    let mut parts = Vec::new();
    for c in table.columns.iter().filter(|c| c.is_key) {
        let v = key_row.get(c.source_idx);
        let p = match (table.key_mode, v) {
            (KeyMode::PrimaryKey, _) => format!(
                "{} = {}::{}",
                c.name_sql,
                literal(table, c.source_idx, v)?,
                c.type_sql
            ),
            (_, Some(Value::Null)) => format!("{} IS NULL", c.name_sql),
            _ => format!(
                "{} IS NOT DISTINCT FROM {}::{}",
                c.name_sql,
                literal(table, c.source_idx, v)?,
                c.type_sql
            ),
        };
        parts.push(p);
    }
    Ok(parts.join(" AND "))
}

/// One statement applying exactly `change` (the ordered replay path), or `None` if it has no
/// effect on the target (a message, an update that sets nothing).
pub fn change_sql(table: &TargetTable, change: &Change) -> Result<Option<String>, EncodeError> {
    match change {
        Change::Insert { new, .. } => {
            let mut vals = Vec::new();
            for c in &table.columns {
                vals.push(format!(
                    "{}::{}",
                    literal(table, c.source_idx, new.get(c.source_idx))?,
                    c.type_sql
                ));
            }
            Ok(Some(format!(
                "{} VALUES ({}){}",
                table.insert_into(),
                vals.join(", "),
                table.on_conflict()
            )))
        }
        Change::Update { old, new, .. } => {
            let key_row = key_row(old.as_ref(), new);
            let mut sets = Vec::new();
            for c in &table.columns {
                let v = new.get(c.source_idx);
                let changed_key = c.is_key && key_row.get(c.source_idx) != v;
                if (c.settable || changed_key) && !matches!(v, Some(Value::UnchangedToast) | None) {
                    sets.push(format!(
                        "{} = {}::{}",
                        c.name_sql,
                        literal(table, c.source_idx, v)?,
                        c.type_sql
                    ));
                }
            }
            if sets.is_empty() {
                return Ok(None);
            }
            let w = where_key(table, &key_row)?;
            Ok(Some(if table.rows_may_repeat() {
                format!(
                    "{} UPDATE {} SET {} WHERE {ONE_ROW_MATCH}",
                    one_row_cte(table, &w),
                    table.target_sql,
                    sets.join(", "),
                )
            } else {
                format!(
                    "UPDATE {} SET {} WHERE {w}",
                    table.target_sql,
                    sets.join(", "),
                )
            }))
        }
        Change::Delete { old, .. } => {
            let w = where_key(table, old.row())?;
            Ok(Some(if table.rows_may_repeat() {
                format!(
                    "{} DELETE FROM {} WHERE {ONE_ROW_MATCH}",
                    one_row_cte(table, &w),
                    table.target_sql
                )
            } else {
                format!("DELETE FROM {} WHERE {w}", table.target_sql)
            }))
        }
        Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => Ok(None),
    }
}

/// With the owner guard ([`TargetTable::guard_owner`]): the checks around [`change_sql`] of
/// `change`: the owner read before it (UPDATE, DELETE: the row it would change) and the lost
/// insert read after it (INSERT). `(None, None)` without the guard.
pub fn owner_sql_for_change(
    table: &TargetTable,
    change: &Change,
) -> Result<(Option<String>, Option<String>), EncodeError> {
    if table.owner_col.is_none() {
        return Ok((None, None));
    }
    let mut rows = String::new();
    match change {
        Change::Insert { new, .. } => {
            if !push_values_row(&mut rows, table, OP_INSERT, new, false, true)? {
                return Err(EncodeError::NotUtf8 {
                    column: table.target.clone(),
                });
            }
            Ok((
                None,
                table.owner_lost_sql(&OP_INSERT.to_string(), &table.values_source(&rows)),
            ))
        }
        Change::Update { old, new, .. } => {
            // Matched by the old key, carrying the new shard key.
            let mut row = key_row(old.as_ref(), new);
            if let Some(c) = table.owner() {
                if let (Some(v), Some(slot)) = (new.get(c.source_idx), row.get_mut(c.source_idx)) {
                    *slot = v.clone();
                }
            }
            if !push_values_row(&mut rows, table, OP_UPDATE_BASE, &row, false, false)? {
                return Err(EncodeError::NotUtf8 {
                    column: table.target.clone(),
                });
            }
            Ok((
                table.owner_rows_sql(&OP_UPDATE_BASE.to_string(), &table.values_source(&rows)),
                None,
            ))
        }
        Change::Delete { old, .. } => {
            if !push_values_row(&mut rows, table, OP_DELETE, old.row(), true, false)? {
                return Err(EncodeError::NotUtf8 {
                    column: table.target.clone(),
                });
            }
            Ok((
                table.owner_rows_sql(&OP_DELETE.to_string(), &table.values_source(&rows)),
                None,
            ))
        }
        Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => {
            Ok((None, None))
        }
    }
}

/// What an op code of a staged change does, for messages.
pub fn op_kind(op: u32) -> &'static str {
    match op {
        OP_DELETE => "DELETE",
        OP_UPSERT | OP_INSERT => "INSERT",
        _ => "UPDATE",
    }
}

/// `WITH one AS (…)`: the physical address of ONE row matching `where_` (of several identical
/// ones, any: they are indistinguishable). `tableoid` too, since a `ctid` is unique only within
/// one partition of a partitioned target.
fn one_row_cte(table: &TargetTable, where_: &str) -> String {
    format!(
        "WITH one AS MATERIALIZED (SELECT tableoid, ctid FROM {} WHERE {where_} LIMIT 1)",
        table.target_sql
    )
}

/// The condition selecting the row of [`one_row_cte`] (a TID scan: `ctid = (scalar)`).
const ONE_ROW_MATCH: &str =
    "ctid = (SELECT ctid FROM one) AND tableoid = (SELECT tableoid FROM one)";

/// The row holding the old key of an UPDATE: the old tuple if sent, else the new row (with an
/// unchanged-TOAST key value filled from the old tuple).
fn key_row(old: Option<&OldRow>, new: &Row) -> Row {
    match old {
        Some(o) => {
            let mut r = o.row().clone();
            for (i, v) in r.iter_mut().enumerate() {
                if *v == Value::UnchangedToast {
                    if let Some(n) = new.get(i) {
                        *v = n.clone();
                    }
                }
            }
            r
        }
        None => new.clone(),
    }
}

/// `(k1, k2)=(v1, v2)` for messages: the match key of `change` as text.
pub fn key_text(table: &TargetTable, change: &Change) -> String {
    let row = match change {
        Change::Insert { new, .. } => new.clone(),
        Change::Update { old, new, .. } => key_row(old.as_ref(), new),
        Change::Delete { old, .. } => old.row().clone(),
        Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => {
            return String::new()
        }
    };
    let key_idx: Vec<usize> = if table.key_idx.is_empty() {
        (0..table.source.columns.len()).collect()
    } else {
        table.key_idx.clone()
    };
    let names: Vec<String> = key_idx.iter().map(|&i| column_name(table, i)).collect();
    let vals: Vec<String> = key_idx
        .iter()
        .map(|&i| match row.get(i) {
            Some(Value::Text(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::Null) => "NULL".to_owned(),
            Some(Value::UnchangedToast) => "(unchanged toast)".to_owned(),
            Some(Value::Binary(_)) => "(binary)".to_owned(),
            None => "?".to_owned(),
        })
        .collect();
    format!("({})=({})", names.join(", "), vals.join(", "))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::fold::Fold;
    use super::super::schema::TargetColumn;
    use super::*;
    use crate::event::{Column, Relation, ReplicaIdentity, TableId};

    fn table() -> TargetTable {
        let col = |n: &str, k| Column {
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: k,
        };
        let rel = Arc::new(Relation {
            id: TableId(1),
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", true), col("a", false), col("b", false)],
        });
        let tcol = |n: &str, pk| TargetColumn {
            name: n.into(),
            type_sql: if pk { "bigint" } else { "text" }.into(),
            cast_sql: if pk { "bigint" } else { "text" }.into(),
            not_null: pk,
            has_default: false,
            identity_always: false,
            identity_by_default: false,
            generated: false,
            in_primary_key: pk,
        };
        TargetTable::build(
            rel.clone(),
            &crate::pg::sql::TableName::new("public", "t"),
            &[tcol("id", true), tcol("a", false), tcol("b", false)],
            "stg".into(),
        )
        .unwrap()
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn stages_each_op_and_groups_updates_by_carried_columns() {
        let tb = table();
        let rel = tb.source.clone();
        let changes = vec![
            Change::Insert {
                rel: rel.clone(),
                new: vec![t("1"), t("x\ty"), Value::Null],
            },
            Change::Update {
                rel: rel.clone(),
                old: None,
                new: vec![t("2"), t("a"), Value::UnchangedToast],
            },
            Change::Update {
                rel: rel.clone(),
                old: None,
                new: vec![t("3"), t("a"), t("b")],
            },
            Change::Delete {
                rel: rel.clone(),
                old: OldRow::Key(vec![t("4"), Value::Null, Value::Null]),
            },
        ];
        let mut f = Fold::new(tb.key_idx.clone());
        for c in &changes {
            f.push(c).unwrap();
        }
        let mut out = BytesMut::new();
        let b = encode_table(&tb, &f.finish(), &mut out, None).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "2\t1\tx\\ty\t\\N\n3\t2\ta\t\\N\n4\t3\ta\tb\n0\t4\t\\N\t\\N\n"
        );
        assert_eq!(b.rows, 4);
        assert_eq!(b.statements.len(), 5, "{:#?}", b.statements);
        assert!(b.statements[0].starts_with("DELETE"));
        assert!(b.statements[1].starts_with("INSERT"));
        assert!(b.statements[2].contains("SET a = s.a::text FROM"));
        assert!(b.statements[3].contains("SET a = s.a::text, b = s.b::text FROM"));
        assert!(b.statements[4].starts_with("TRUNCATE"));
    }

    #[test]
    fn full_identity_without_a_key_changes_one_row_per_statement() {
        let col = |n: &str| Column {
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: true,
        };
        let rel = Arc::new(Relation {
            id: TableId(2),
            namespace: "public".into(),
            name: "f".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![col("a"), col("b")],
        });
        let tcol = |n: &str| TargetColumn {
            name: n.into(),
            type_sql: "text".into(),
            cast_sql: "text".into(),
            not_null: false,
            has_default: false,
            identity_always: false,
            identity_by_default: false,
            generated: false,
            in_primary_key: false,
        };
        let tb = TargetTable::build(
            rel.clone(),
            &crate::pg::sql::TableName::new("public", "f"),
            &[tcol("a"), tcol("b")],
            "stg".into(),
        )
        .unwrap();
        let old = OldRow::Full(vec![t("1"), Value::Null]);
        let d = change_sql(
            &tb,
            &Change::Delete {
                rel: rel.clone(),
                old: old.clone(),
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            d,
            "WITH one AS MATERIALIZED (SELECT tableoid, ctid FROM public.f WHERE a IS NOT DISTINCT FROM '1'::text AND b IS NULL LIMIT 1) \
             DELETE FROM public.f WHERE ctid = (SELECT ctid FROM one) AND tableoid = (SELECT tableoid FROM one)"
        );
        let u = change_sql(
            &tb,
            &Change::Update {
                rel,
                old: Some(old),
                new: vec![t("1"), t("x")],
            },
        )
        .unwrap()
        .unwrap();
        assert!(
            u.contains(") UPDATE public.f SET b = 'x'::text WHERE ctid = (SELECT ctid FROM one)"),
            "{u}"
        );
    }

    #[test]
    fn small_flushes_carry_their_rows_in_values_lists() {
        let tb = table();
        let rel = tb.source.clone();
        let mut f = Fold::new(tb.key_idx.clone());
        for c in [
            Change::Insert {
                rel: rel.clone(),
                new: vec![t("1"), t("it's"), Value::Null],
            },
            Change::Update {
                rel: rel.clone(),
                old: None,
                new: vec![t("2"), t("a"), Value::UnchangedToast],
            },
            Change::Delete {
                rel: rel.clone(),
                old: OldRow::Key(vec![t("4"), Value::Null, Value::Null]),
            },
        ] {
            f.push(&c).unwrap();
        }
        let b = encode_table_inline(&tb, &f.finish(), false, None)
            .unwrap()
            .unwrap();
        assert_eq!(b.rows, 3);
        assert_eq!(
            b.statements,
            vec![
                "DELETE FROM public.t AS t USING (VALUES (0, '4', NULL, NULL)) AS s(_reshard_op, id, a, b) \
                 WHERE s._reshard_op IN (0) AND t.id = s.id::bigint"
                    .to_owned(),
                "INSERT INTO public.t (id, a, b) SELECT s.id::bigint, s.a::text, s.b::text \
                 FROM (VALUES (2, '1', 'it''s', NULL)) AS s(_reshard_op, id, a, b) \
                 WHERE s._reshard_op IN (1, 2) ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b"
                    .to_owned(),
                "UPDATE public.t AS t SET a = s.a::text FROM (VALUES (3, '2', 'a', NULL)) AS s(_reshard_op, id, a, b) \
                 WHERE s._reshard_op = 3 AND t.id = s.id::bigint"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn new_keys_of_a_primary_key_table_skip_staging_and_on_conflict() {
        let tb = table();
        assert!(tb.takes_direct_inserts());
        let rel = tb.source.clone();
        let mut f = Fold::new(tb.key_idx.clone());
        for c in [
            Change::Insert {
                rel: rel.clone(),
                new: vec![t("1"), t("x\ty"), Value::Null],
            },
            // Deleted, then inserted again: the row may exist, so it still upserts.
            Change::Delete {
                rel: rel.clone(),
                old: OldRow::Key(vec![t("2"), Value::Null, Value::Null]),
            },
            Change::Insert {
                rel: rel.clone(),
                new: vec![t("2"), t("b"), t("c")],
            },
        ] {
            f.push(&c).unwrap();
        }
        let folded = f.finish();
        let (mut out, mut direct) = (BytesMut::new(), BytesMut::new());
        let b = encode_table(&tb, &folded, &mut out, Some(&mut direct)).unwrap();
        assert_eq!((b.rows, b.direct_rows), (1, 1));
        assert_eq!(std::str::from_utf8(&direct).unwrap(), "1\tx\\ty\t\\N\n");
        assert_eq!(std::str::from_utf8(&out).unwrap(), "1\t2\tb\tc\n");
        assert_eq!(tb.copy_target_sql(), "COPY public.t (id, a, b) FROM STDIN");
        assert!(
            b.statements[0].contains("ON CONFLICT (id)"),
            "{:#?}",
            b.statements
        );
        assert!(b.statements.last().unwrap().starts_with("TRUNCATE"));

        let b = encode_table_inline(&tb, &folded, true, None)
            .unwrap()
            .unwrap();
        assert_eq!((b.rows, b.direct_rows), (1, 1));
        assert_eq!(
            b.statements[1],
            "INSERT INTO public.t (id, a, b) SELECT s.id::bigint, s.a::text, s.b::text \
             FROM (VALUES (2, '1', 'x\ty', NULL)) AS s(_reshard_op, id, a, b)"
        );
        assert!(
            b.statements[0].contains("ON CONFLICT (id)"),
            "{:#?}",
            b.statements
        );

        // Only new keys: nothing staged, no statement at all.
        let mut f = Fold::new(tb.key_idx.clone());
        f.push(&Change::Insert {
            rel,
            new: vec![t("3"), Value::Null, Value::Null],
        })
        .unwrap();
        let (mut out, mut direct) = (BytesMut::new(), BytesMut::new());
        let b = encode_table(&tb, &f.finish(), &mut out, Some(&mut direct)).unwrap();
        assert_eq!((b.rows, b.direct_rows), (0, 1));
        assert!(b.statements.is_empty() && out.is_empty());
    }

    #[test]
    fn values_that_no_literal_can_carry_fall_back_to_copy() {
        let tb = table();
        let mut f = Fold::new(tb.key_idx.clone());
        f.push(&Change::Insert {
            rel: tb.source.clone(),
            new: vec![
                t("1"),
                Value::Text(Bytes::from_static(b"\xff")),
                Value::Null,
            ],
        })
        .unwrap();
        assert!(encode_table_inline(&tb, &f.finish(), false, None)
            .unwrap()
            .is_none());
        let mut f = Fold::new(tb.key_idx.clone());
        for i in 0..=INLINE_MAX_ROWS {
            f.push(&Change::Insert {
                rel: tb.source.clone(),
                new: vec![t(&i.to_string()), Value::Null, Value::Null],
            })
            .unwrap();
        }
        assert!(encode_table_inline(&tb, &f.finish(), false, None)
            .unwrap()
            .is_none());
    }

    /// See: R3-1. With the owner guard, a flush reads the rows its deletes and updates would
    /// change before changing them, and the inserts that did not land after inserting; a
    /// delete stages the shard key its old key carries.
    #[test]
    fn guarded_flushes_check_owners_around_the_merge() {
        let mut tb = table();
        assert!(tb.guard_owner("a"));
        let rel = tb.source.clone();
        let mut f = Fold::new(tb.key_idx.clone());
        for c in [
            Change::Insert {
                rel: rel.clone(),
                new: vec![t("1"), t("x"), Value::Null],
            },
            Change::Update {
                rel: rel.clone(),
                old: None,
                new: vec![t("2"), t("y"), t("b")],
            },
            Change::Delete {
                rel: rel.clone(),
                old: OldRow::Key(vec![t("4"), t("z"), Value::Null]),
            },
        ] {
            f.push(&c).unwrap();
        }
        let folded = f.finish();
        for statements in [
            encode_table(&tb, &folded, &mut BytesMut::new(), None)
                .unwrap()
                .statements,
            encode_table_inline(&tb, &folded, false, None)
                .unwrap()
                .unwrap()
                .statements,
        ] {
            let pos = |p: &str| {
                statements
                    .iter()
                    .position(|s| s.starts_with(p))
                    .unwrap_or_else(|| panic!("{p}: {statements:#?}"))
            };
            let check = pos("SELECT 'reshard_owner_row'");
            assert!(
                check < pos("DELETE") && check < pos("UPDATE"),
                "{statements:#?}"
            );
            assert!(pos("INSERT") < pos("SELECT 'reshard_owner_lost'"));
        }
        // A guarded table keeps its VALUES lists, prepared statements or not (the checks read
        // the rows back).
        let mut p = Prepared::new();
        let inline = encode_table_inline(&tb, &folded, false, Some(&mut p))
            .unwrap()
            .unwrap();
        assert!(p.is_empty());
        assert!(
            inline.statements[0].contains("(VALUES (0, '4', 'z', NULL))"),
            "{:#?}",
            inline.statements
        );
        let (before, after) = owner_sql_for_change(
            &tb,
            &Change::Delete {
                rel,
                old: OldRow::Key(vec![t("4"), Value::Null, Value::Null]),
            },
        )
        .unwrap();
        assert!(before.unwrap().contains("s._reshard_op IN (0)"));
        assert!(after.is_none());
    }

    /// The same flush as [`small_flushes_carry_their_rows_in_values_lists`], prepared: the first
    /// flush prepares each statement, the next only executes it; after an error the session
    /// deallocates everything and prepares again.
    #[test]
    fn prepared_flushes_send_arrays_and_prepare_each_statement_once_per_session() {
        let tb = table();
        let rel = tb.source.clone();
        let flush = || {
            let mut f = Fold::new(tb.key_idx.clone());
            for c in [
                Change::Insert {
                    rel: rel.clone(),
                    new: vec![t("1"), t(r#"it's "q" \ NULL {,}"#), Value::Null],
                },
                Change::Insert {
                    rel: rel.clone(),
                    new: vec![t("5"), t("NULL"), t("")],
                },
                Change::Delete {
                    rel: rel.clone(),
                    old: OldRow::Key(vec![t("4"), Value::Null, Value::Null]),
                },
            ] {
                f.push(&c).unwrap();
            }
            f.finish()
        };
        let mut p = Prepared::new();
        let first = encode_table_inline(&tb, &flush(), false, Some(&mut p))
            .unwrap()
            .unwrap();
        assert_eq!(
            first.statements,
            vec![
                "PREPARE reshard_0 (int4[], text[], text[], text[]) AS DELETE FROM public.t AS t \
                 USING unnest($1, $2, $3, $4) AS s(_reshard_op, id, a, b) \
                 WHERE s._reshard_op IN (0) AND t.id = s.id::bigint;\n\
                 EXECUTE reshard_0('{0}', '{\"4\"}', '{NULL}', '{NULL}')"
                    .to_owned(),
                "PREPARE reshard_1 (int4[], text[], text[], text[]) AS INSERT INTO public.t (id, a, b) \
                 SELECT s.id::bigint, s.a::text, s.b::text FROM unnest($1, $2, $3, $4) AS s(_reshard_op, id, a, b) \
                 WHERE s._reshard_op IN (1, 2) ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b;\n\
                 EXECUTE reshard_1('{2,2}', '{\"1\",\"5\"}', \
                 '{\"it''s \\\"q\\\" \\\\ NULL {,}\",\"NULL\"}', '{NULL,\"\"}')"
                    .to_owned(),
            ]
        );
        let again = encode_table_inline(&tb, &flush(), false, Some(&mut p))
            .unwrap()
            .unwrap();
        assert!(again.statements[0].starts_with("EXECUTE reshard_0('{0}'"));
        assert!(again.statements[1].starts_with("EXECUTE reshard_1('{2,2}'"));
        assert_eq!(p.len(), 2);
        p.reset();
        let after_error = encode_table_inline(&tb, &flush(), false, Some(&mut p))
            .unwrap()
            .unwrap();
        assert!(
            after_error.statements[0].starts_with("DEALLOCATE ALL;\nPREPARE reshard_0 "),
            "{:#?}",
            after_error.statements
        );
        assert!(after_error.statements[1].starts_with("PREPARE reshard_1 "));
    }

    #[test]
    fn op_codes_are_written_in_decimal() {
        for op in [0u32, 7, 10, 123, u32::MAX] {
            let mut b = BytesMut::new();
            put_op(&mut b, op);
            assert_eq!(&b[..], op.to_string().as_bytes());
        }
    }

    #[test]
    fn binary_values_are_refused_with_the_column_name() {
        let tb = table();
        let mut f = Fold::new(tb.key_idx.clone());
        f.push(&Change::Insert {
            rel: tb.source.clone(),
            new: vec![
                t("1"),
                Value::Binary(Bytes::from_static(b"\x00")),
                Value::Null,
            ],
        })
        .unwrap();
        let e = encode_table(&tb, &f.finish(), &mut BytesMut::new(), None).unwrap_err();
        assert_eq!(e, EncodeError::Binary { column: "a".into() });
    }

    #[test]
    fn ordered_statements_use_literals_and_skip_unchanged_toast() {
        let tb = table();
        let c = Change::Update {
            rel: tb.source.clone(),
            old: Some(OldRow::Key(vec![t("1"), Value::Null, Value::Null])),
            new: vec![t("2"), Value::UnchangedToast, t("it's")],
        };
        assert_eq!(
            change_sql(&tb, &c).unwrap().unwrap(),
            "UPDATE public.t SET id = '2'::bigint, b = 'it''s'::text WHERE id = '1'::bigint"
        );
        assert_eq!(key_text(&tb, &c), "(id)=(1)");
    }
}
