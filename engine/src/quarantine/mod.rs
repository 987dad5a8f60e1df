//! Quarantine: the durable, local, per-table home of changes that could not be routed.
//!
//! In: from the ingest, row changes the router could not place (a NULL shard key, an account
//! missing from the map after a re-lookup) with their transaction's commit LSN and the reason;
//! and every later change of a row that already has a change here. Out: one append-only file
//! per source table under `<spill dir>/quarantine/`, read by `reshard quarantine list|replay|
//! drop` (see [`replay`]).
//!
//! Invariants kept here:
//! - **Never silently dropped.** A quarantined change is written, and made durable by
//!   [`Quarantine::sync`] before the ingest confirms its transaction to the slot (the ingest
//!   calls it in every group commit), so the source never forgets a change that is only here.
//!   Records of a transaction that is not in the spill log are removed on open and on abort
//!   (the source resends that transaction), so a change is never here twice.
//! - **Replay cannot overwrite newer data.** Once a change of a row (by its replica-identity
//!   values) is here, every later change of that row comes here too, in commit order, and none
//!   reaches a shard through the stream: a replay applies the row's changes in their source
//!   order, and the shard has no newer version of the row to overwrite. A TRUNCATE of a table
//!   with quarantined rows is recorded as a marker: the changes before it are obsolete.
//!
//! File format: a sequence of records `u32 body length | u32 crc32c(body) | body`, body = `u64
//! commit_lsn | i64 commit_time | u32 xid | u16 reason length | reason (UTF-8) | the change in
//! the spill codec (its relation included)`. A torn or corrupt tail (kill -9 during an append)
//! ends the file and is cut off on open.

pub mod replay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::event::{Begin, Change, PgTimestamp, Relation, Row, ShardEvent, TableId, Value};
use crate::localfs;
use crate::lsn::Lsn;
use crate::spill::codec::{Decoder, Encoder};
// Defined in the ground (the status shows it); re-exported where it is made.
pub use crate::status::TableSummary;

/// The quarantine's directory under the spill dir.
pub const DIR: &str = "quarantine";
const EXT: &str = "q";
const HEADER_BYTES: usize = 8;
/// Reason of the TRUNCATE markers.
pub const TRUNCATE_REASON: &str = "TRUNCATE (the table's earlier quarantined changes are obsolete)";
/// Reason of a change quarantined because its row already has one here.
pub const HELD_REASON: &str = "an earlier change of this row is quarantined (kept in order)";

/// A quarantine read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// A file operation.
    #[error(
        "quarantine: cannot {op} {path}: {source}; check the spill dir's disk and permissions"
    )]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl crate::error::Classify for QuarantineError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Definite
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> QuarantineError + 'a {
    move |source| QuarantineError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One quarantined change.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Commit LSN of its source transaction.
    pub commit_lsn: Lsn,
    /// Commit time of its source transaction.
    pub commit_time: PgTimestamp,
    /// Its source transaction id.
    pub xid: u32,
    /// Why it is here.
    pub reason: String,
    /// The change.
    pub change: Change,
}

impl Record {
    /// Whether this is a TRUNCATE marker.
    pub fn is_truncate(&self) -> bool {
        matches!(self.change, Change::Truncate { .. })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_BYTES]);
        out.extend_from_slice(&self.commit_lsn.as_u64().to_le_bytes());
        out.extend_from_slice(&self.commit_time.to_le_bytes());
        out.extend_from_slice(&self.xid.to_le_bytes());
        let reason = self.reason.as_bytes();
        let reason = &reason[..reason.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        out.extend_from_slice(reason);
        Encoder::new().encode(&ShardEvent::Change(self.change.clone()), out);
        let body_len = (out.len() - start - HEADER_BYTES) as u32;
        let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The file of `table` (`schema.table`, as [`Relation::qualified_name`] gives it) in `dir`.
pub fn table_file(dir: &Path, table: &str) -> PathBuf {
    let mut name = String::new();
    for b in table.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02x}"));
        }
    }
    dir.join(format!("{name}.{EXT}"))
}

/// The quarantine directory of a spill dir.
pub fn dir_of(spill_dir: &Path) -> PathBuf {
    spill_dir.join(DIR)
}

/// The table files in `dir` (none if it does not exist).
pub fn table_files(dir: &Path) -> Result<Vec<PathBuf>, QuarantineError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", dir)(e)),
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == EXT))
        .collect();
    out.sort();
    Ok(out)
}

/// Reads a table file: its complete records, and the byte length they cover (a torn or corrupt
/// tail after it is not a record).
pub fn read_file(path: &Path) -> Result<(Vec<Record>, u64), QuarantineError> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data).map_err(io("read", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io("open", path)(e)),
    }
    let data = Bytes::from(data);
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut decoder = Decoder::new();
    while let Some(header) = data.get(pos..pos + HEADER_BYTES) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let start = pos + HEADER_BYTES;
        let Some(body) = data.get(start..start + len) else {
            break;
        };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let Some(r) = decode_body(&mut decoder, &data.slice(start..start + len)) else {
            break;
        };
        records.push(r);
        pos = start + len;
    }
    Ok((records, pos as u64))
}

fn decode_body(decoder: &mut Decoder, body: &Bytes) -> Option<Record> {
    let u64_at = |p: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(p..p + 8)?.try_into().ok()?))
    };
    let commit_lsn = Lsn::from_u64(u64_at(0)?);
    let commit_time = u64_at(8)? as i64;
    let xid = u32::from_le_bytes(body.get(16..20)?.try_into().ok()?);
    let rlen = u16::from_le_bytes(body.get(20..22)?.try_into().ok()?) as usize;
    let reason = String::from_utf8_lossy(body.get(22..22 + rlen)?).into_owned();
    let mut pos = 22 + rlen;
    match decoder.decode(body, &mut pos).ok()? {
        ShardEvent::Change(change) => Some(Record {
            commit_lsn,
            commit_time,
            xid,
            reason,
            change,
        }),
        _ => None,
    }
}

/// Replaces a table file with `records` (written to a temporary file, synced, renamed); with
/// no records the file is removed.
pub fn rewrite_file(path: &Path, records: &[Record]) -> Result<(), QuarantineError> {
    if records.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
            _ => sync_parent(path),
        };
    }
    let tmp = path.with_extension("q.tmp");
    let mut buf = Vec::new();
    for r in records {
        r.encode(&mut buf);
    }
    localfs::replace_file(path, &tmp, &buf)?;
    Ok(())
}

impl From<localfs::FileError> for QuarantineError {
    fn from(e: localfs::FileError) -> QuarantineError {
        QuarantineError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

fn sync_parent(path: &Path) -> Result<(), QuarantineError> {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            d.sync_all().map_err(io("sync", dir))?;
        }
    }
    Ok(())
}

/// The identity of a row for ordering: its replica-identity values (every column when the
/// relation marks none).
fn identity(rel: &Relation, row: &Row, fallback: Option<&Row>) -> Vec<u8> {
    let mut key: Vec<usize> = rel.key_indexes().collect();
    if key.is_empty() {
        key = (0..rel.columns.len()).collect();
    }
    let mut out = Vec::new();
    for i in key {
        let v = match (row.get(i), fallback.and_then(|f| f.get(i))) {
            (Some(Value::UnchangedToast), Some(f)) => f,
            (Some(v), _) => v,
            (None, _) => &Value::Null,
        };
        match v {
            Value::Null => out.push(0),
            Value::UnchangedToast => out.push(1),
            Value::Text(b) | Value::Binary(b) => {
                out.push(2);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// The identities a change touches: the row it finds (old side) and the row it leaves (new
/// side).
fn identities(change: &Change) -> Option<(TableId, Vec<u8>, Option<Vec<u8>>)> {
    match change {
        Change::Insert { rel, new } => Some((rel.id, identity(rel, new, None), None)),
        Change::Update { rel, old, new } => {
            let after = identity(rel, new, old.as_ref().map(|o| o.row()));
            match old {
                Some(o) => Some((rel.id, identity(rel, o.row(), None), Some(after))),
                None => Some((rel.id, after, None)),
            }
        }
        Change::Delete { rel, old } => Some((rel.id, identity(rel, old.row(), None), None)),
        Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => None,
    }
}

/// Counts `r` in its table's summary.
fn add(s: &mut TableSummary, r: &Record) {
    if r.is_truncate() {
        return;
    }
    if s.changes == 0 {
        s.first_lsn = r.commit_lsn;
        s.reason = r.reason.clone();
        s.sample = describe(&r.change);
    }
    s.changes += 1;
    s.last_lsn = r.commit_lsn;
}

/// `insert (id=5, account_id=NULL)`: the kind and the replica-identity values (or every value).
pub fn describe(change: &Change) -> String {
    let (rel, row) = match change {
        Change::Insert { rel, new } => (rel, new),
        Change::Update { rel, new, .. } => (rel, new),
        Change::Delete { rel, old } => (rel, old.row()),
        Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => {
            return change.kind().to_owned()
        }
    };
    let mut idx: Vec<usize> = rel.key_indexes().collect();
    if idx.is_empty() || idx.len() == rel.columns.len() {
        idx = (0..rel.columns.len().min(6)).collect();
    }
    let parts: Vec<String> = idx
        .into_iter()
        .filter_map(|i| {
            let c = rel.columns.get(i)?;
            let v = match row.get(i)? {
                Value::Null => "NULL".to_owned(),
                Value::UnchangedToast => "(unchanged toast)".to_owned(),
                Value::Text(b) => crate::route::key::display_value(b),
                Value::Binary(b) => format!("(binary, {} bytes)", b.len()),
            };
            Some(format!("{}={v}", c.name))
        })
        .collect();
    format!("{} ({})", change.kind(), parts.join(", "))
}

/// Summaries of every table file in `dir`, in table order.
pub fn summarize_dir(dir: &Path) -> Result<Vec<TableSummary>, QuarantineError> {
    let mut out = Vec::new();
    for path in table_files(dir)? {
        let (records, _) = read_file(&path)?;
        let mut s = TableSummary::default();
        for r in &records {
            if s.table.is_empty() {
                s.table = record_table(r);
            }
            add(&mut s, r);
        }
        if !s.table.is_empty() {
            out.push(s);
        }
    }
    Ok(out)
}

/// The `schema.table` a record belongs to.
pub fn record_table(r: &Record) -> String {
    match &r.change {
        Change::Truncate { rels, .. } => {
            rels.first().map(|r| r.qualified_name()).unwrap_or_default()
        }
        c => c.relation().map(|r| r.qualified_name()).unwrap_or_default(),
    }
}

/// Live counters shared with the status (updated only when something is quarantined).
#[derive(Debug, Default)]
pub struct QuarantineStats {
    tables: Mutex<BTreeMap<String, TableSummary>>,
}

impl QuarantineStats {
    /// The per-table summaries.
    pub fn tables(&self) -> Vec<TableSummary> {
        self.tables
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    fn add(&self, table: &str, r: &Record) {
        if let Ok(mut t) = self.tables.lock() {
            let s = t.entry(table.to_owned()).or_insert_with(|| TableSummary {
                table: table.to_owned(),
                ..TableSummary::default()
            });
            add(s, r);
        }
    }
}

struct TableFile {
    path: PathBuf,
    file: File,
    len: u64,
    /// Length before the open transaction's first record, if it wrote any.
    mark: Option<u64>,
}

/// The ingest's writer of the quarantine.
pub struct Quarantine {
    dir: PathBuf,
    files: HashMap<String, TableFile>,
    /// Rows with a change here, by table: their later changes come here too.
    held: HashMap<TableId, HashSet<Vec<u8>>>,
    unsynced: bool,
    stats: Arc<QuarantineStats>,
    buf: Vec<u8>,
}

impl Quarantine {
    /// Opens the quarantine of `spill_dir`. Records of transactions that are not in the spill
    /// log (commit LSN at or after `resume_from`, the log's durable LSN: the source resends
    /// them) and torn tails are cut off; the held rows are rebuilt.
    pub fn open(spill_dir: &Path, resume_from: Lsn) -> Result<Quarantine, QuarantineError> {
        let dir = dir_of(spill_dir);
        let mut q = Quarantine {
            dir: dir.clone(),
            files: HashMap::new(),
            held: HashMap::new(),
            unsynced: false,
            stats: Arc::new(QuarantineStats::default()),
            buf: Vec::new(),
        };
        for path in table_files(&dir)? {
            let (records, valid) = read_file(&path)?;
            let keep = records
                .iter()
                .position(|r| r.commit_lsn >= resume_from)
                .unwrap_or(records.len());
            let on_disk = std::fs::metadata(&path).map_err(io("stat", &path))?.len();
            if keep < records.len() || valid < on_disk {
                tracing::info!(file = %path.display(), kept = keep, removed = records.len() - keep, "quarantine: removing records of transactions the source resends");
                rewrite_file(&path, &records[..keep])?;
            }
            for r in &records[..keep] {
                q.note(r);
            }
        }
        Ok(q)
    }

    /// The counters the status shows.
    pub fn stats(&self) -> Arc<QuarantineStats> {
        self.stats.clone()
    }

    fn note(&mut self, r: &Record) {
        let table = record_table(r);
        match &r.change {
            Change::Truncate { rels, .. } => {
                for rel in rels {
                    self.held.remove(&rel.id);
                }
            }
            c => {
                if let Some((id, before, after)) = identities(c) {
                    let set = self.held.entry(id).or_default();
                    set.insert(before);
                    if let Some(a) = after {
                        set.insert(a);
                    }
                }
            }
        }
        self.stats.add(&table, r);
    }

    /// Whether `change` is a later change of a row that has a change here.
    #[inline]
    pub fn holds(&self, change: &Change) -> bool {
        if self.held.is_empty() {
            return false;
        }
        match identities(change) {
            Some((id, before, _)) => self.held.get(&id).is_some_and(|s| s.contains(&before)),
            None => false,
        }
    }

    /// Whether any row of `table` is held (a TRUNCATE of it is then recorded as a marker).
    pub fn holds_table(&self, table: TableId) -> bool {
        self.held.get(&table).is_some_and(|s| !s.is_empty())
    }

    /// Appends `change` of the transaction `begin` with `reason`.
    pub fn append(
        &mut self,
        begin: &Begin,
        change: Change,
        reason: String,
    ) -> Result<(), QuarantineError> {
        let record = Record {
            commit_lsn: begin.commit_lsn,
            commit_time: begin.commit_time,
            xid: begin.xid,
            reason,
            change,
        };
        let table = record_table(&record);
        if !self.files.contains_key(&table) {
            localfs::create_private_dir_all(&self.dir).map_err(io("create", &self.dir))?;
            let path = table_file(&self.dir, &table);
            let file = localfs::private_file()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io("open", &path))?;
            let len = file.metadata().map_err(io("stat", &path))?.len();
            self.files.insert(
                table.clone(),
                TableFile {
                    path,
                    file,
                    len,
                    mark: None,
                },
            );
        }
        self.buf.clear();
        record.encode(&mut self.buf);
        if let Some(f) = self.files.get_mut(&table) {
            f.mark.get_or_insert(f.len);
            f.file
                .write_all(&self.buf)
                .map_err(io("append to", &f.path))?;
            f.len += self.buf.len() as u64;
        }
        self.unsynced = true;
        self.note(&record);
        Ok(())
    }

    /// The open transaction committed: its records stay.
    pub fn commit_txn(&mut self) {
        for f in self.files.values_mut() {
            f.mark = None;
        }
    }

    /// The open transaction was cut (the source resends it): its records are removed.
    pub fn abort_txn(&mut self) -> Result<(), QuarantineError> {
        let mut cut = false;
        for f in self.files.values_mut() {
            if let Some(m) = f.mark.take() {
                f.file.set_len(m).map_err(io("truncate", &f.path))?;
                f.len = m;
                cut = true;
            }
        }
        if cut {
            // Rebuild the held rows and counters from what stays.
            let reopened = Quarantine::open(
                self.dir.parent().unwrap_or(Path::new(".")),
                Lsn::from_u64(u64::MAX),
            )?;
            self.held = reopened.held;
            let fresh = reopened.stats.tables();
            if let Ok(mut mine) = self.stats.tables.lock() {
                *mine = fresh.into_iter().map(|t| (t.table.clone(), t)).collect();
            }
        }
        Ok(())
    }

    /// Makes every appended record durable (called before the ingest confirms to the slot).
    pub fn sync(&mut self) -> Result<(), QuarantineError> {
        if !self.unsynced {
            return Ok(());
        }
        for f in self.files.values() {
            f.file.sync_data().map_err(io("sync", &f.path))?;
        }
        sync_parent(&self.dir.join("x"))?;
        self.unsynced = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
