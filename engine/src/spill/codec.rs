//! Binary record codec of the spill log.
//!
//! In: [`ShardEvent`]s from the writer. Out: the same events, decoded from the uncompressed
//! payload of a block (see `spill::block`). Every record is self-contained: a change carries
//! its [`Relation`] inline, so a reader can start at any block and needs no schema history.
//! The repetition costs little on disk because blocks are zstd-compressed, and little CPU
//! because the [`Encoder`] encodes each relation once and the [`Decoder`] hands out the same
//! `Arc<Relation>` for identical relation bytes instead of allocating one per row.
//!
//! Invariant kept here: decoding never panics and never allocates more than the input can
//! justify; any malformed input is a [`CodecError`] naming the offset.
//!
//! Record layout (integers little-endian, `varint` = unsigned LEB128):
//!
//! ```text
//! Begin      0x01  xid:u32 commit_lsn:u64 commit_time:i64
//! Commit     0x02  xid:u32 commit_lsn:u64 end_lsn:u64 commit_time:i64
//! Heartbeat  0x03  lsn:u64
//! Insert     0x10  relation row
//! Update     0x11  relation old? row          old? = 0x00 | 0x01 row (key) | 0x02 row (full)
//! Delete     0x12  relation old              old  = 0x01 row | 0x02 row
//! Truncate   0x13  flags:u8 n:varint relation*n   flags: bit0 CASCADE, bit1 RESTART IDENTITY
//! Message    0x14  prefix:str content:bytes
//! relation   len:varint  id:u32 namespace:str name:str replident:u8 ncols:varint
//!                        (name:str type_oid:u32 typmod:i32 is_key:u8)*ncols
//! row        n:varint value*n   value = 0x00 NULL | 0x01 unchanged TOAST
//!                                       | 0x02 len:varint text | 0x03 len:varint binary
//! str/bytes  len:varint bytes
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::{
    Begin, Change, Column, Commit, OldRow, Relation, ReplicaIdentity, Row, ShardEvent, TableId,
    Value,
};
use crate::lsn::Lsn;

const TAG_BEGIN: u8 = 0x01;
const TAG_COMMIT: u8 = 0x02;
const TAG_HEARTBEAT: u8 = 0x03;
const TAG_INSERT: u8 = 0x10;
const TAG_UPDATE: u8 = 0x11;
const TAG_DELETE: u8 = 0x12;
const TAG_TRUNCATE: u8 = 0x13;
const TAG_MESSAGE: u8 = 0x14;
const TAG_DELETE_RANGE: u8 = 0x15;

const OLD_NONE: u8 = 0x00;
const OLD_KEY: u8 = 0x01;
const OLD_FULL: u8 = 0x02;

const VAL_NULL: u8 = 0x00;
const VAL_UNCHANGED: u8 = 0x01;
const VAL_TEXT: u8 = 0x02;
const VAL_BINARY: u8 = 0x03;

/// Relations remembered by an [`Encoder`] or [`Decoder`] before the cache is cleared (a
/// bound, not a tuning knob: a source rarely publishes this many tables).
const RELATION_CACHE_ENTRIES: usize = 4096;

/// Malformed record bytes. Carries the byte offset inside the decoded buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input ended inside a record.
    #[error("record truncated at offset {offset}: {what} needs {needed} more bytes")]
    Truncated {
        /// Offset where the missing field starts.
        offset: usize,
        /// The field.
        what: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A tag byte has no meaning here.
    #[error("unknown {what} tag 0x{tag:02x} at offset {offset}")]
    BadTag {
        /// Offset of the tag.
        offset: usize,
        /// Which kind of tag.
        what: &'static str,
        /// The byte found.
        tag: u8,
    },
    /// A field holds an impossible value (overlong varint, invalid UTF-8, …).
    #[error("invalid {what} at offset {offset}")]
    Invalid {
        /// Offset of the field.
        offset: usize,
        /// The field.
        what: &'static str,
    },
}

impl CodecError {
    /// Offset of the error inside the decoded buffer.
    pub fn offset(&self) -> usize {
        match self {
            CodecError::Truncated { offset, .. }
            | CodecError::BadTag { offset, .. }
            | CodecError::Invalid { offset, .. } => *offset,
        }
    }
}

/// Encodes [`ShardEvent`]s, caching each relation's bytes.
#[derive(Default)]
pub struct Encoder {
    /// By relation OID: the relation last encoded for it and its bytes. Holding the `Arc`
    /// keeps its pointer from being reused, so `Arc::ptr_eq` is a sound fast path.
    relations: HashMap<TableId, (Arc<Relation>, Vec<u8>)>,
}

impl Encoder {
    /// A new encoder with an empty relation cache.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// Appends the encoding of `ev` to `out`.
    pub fn encode(&mut self, ev: &ShardEvent, out: &mut Vec<u8>) {
        match ev {
            ShardEvent::Begin(b) => {
                out.push(TAG_BEGIN);
                out.extend_from_slice(&b.xid.to_le_bytes());
                out.extend_from_slice(&b.commit_lsn.as_u64().to_le_bytes());
                out.extend_from_slice(&b.commit_time.to_le_bytes());
            }
            ShardEvent::Commit(c) => {
                out.push(TAG_COMMIT);
                out.extend_from_slice(&c.xid.to_le_bytes());
                out.extend_from_slice(&c.commit_lsn.as_u64().to_le_bytes());
                out.extend_from_slice(&c.end_lsn.as_u64().to_le_bytes());
                out.extend_from_slice(&c.commit_time.to_le_bytes());
            }
            ShardEvent::Heartbeat(l) => {
                out.push(TAG_HEARTBEAT);
                out.extend_from_slice(&l.as_u64().to_le_bytes());
            }
            ShardEvent::Change(c) => self.encode_change(c, out),
        }
    }

    fn encode_change(&mut self, c: &Change, out: &mut Vec<u8>) {
        match c {
            Change::Insert { rel, new } => {
                out.push(TAG_INSERT);
                self.put_relation(rel, out);
                put_row(new, out);
            }
            Change::Update { rel, old, new } => {
                out.push(TAG_UPDATE);
                self.put_relation(rel, out);
                match old {
                    None => out.push(OLD_NONE),
                    Some(o) => put_old(o, out),
                }
                put_row(new, out);
            }
            Change::Delete { rel, old } => {
                out.push(TAG_DELETE);
                self.put_relation(rel, out);
                put_old(old, out);
            }
            Change::Truncate {
                rels,
                cascade,
                restart_identity,
            } => {
                out.push(TAG_TRUNCATE);
                out.push(u8::from(*cascade) | (u8::from(*restart_identity) << 1));
                put_varint(rels.len() as u64, out);
                for rel in rels {
                    self.put_relation(rel, out);
                }
            }
            Change::DeleteRange {
                rel,
                key,
                after,
                upto,
            } => {
                out.push(TAG_DELETE_RANGE);
                self.put_relation(rel, out);
                put_varint(key.len() as u64, out);
                for k in key {
                    put_bytes(k.as_bytes(), out);
                }
                for bound in [after, upto] {
                    match bound {
                        None => out.push(0),
                        Some(v) => {
                            out.push(1);
                            put_varint(v.len() as u64, out);
                            for x in v {
                                out.extend_from_slice(&x.to_le_bytes());
                            }
                        }
                    }
                }
            }
            Change::Message { prefix, content } => {
                out.push(TAG_MESSAGE);
                put_bytes(prefix.as_bytes(), out);
                put_bytes(content, out);
            }
        }
    }

    fn put_relation(&mut self, rel: &Arc<Relation>, out: &mut Vec<u8>) {
        if let Some((cached, bytes)) = self.relations.get(&rel.id) {
            if Arc::ptr_eq(cached, rel) || **cached == **rel {
                put_bytes(bytes, out);
                return;
            }
        }
        let mut bytes = Vec::with_capacity(64 + rel.columns.len() * 24);
        encode_relation(rel, &mut bytes);
        put_bytes(&bytes, out);
        if self.relations.len() >= RELATION_CACHE_ENTRIES {
            self.relations.clear();
        }
        self.relations.insert(rel.id, (Arc::clone(rel), bytes));
    }
}

fn encode_relation(rel: &Relation, out: &mut Vec<u8>) {
    out.extend_from_slice(&rel.id.0.to_le_bytes());
    put_bytes(rel.namespace.as_bytes(), out);
    put_bytes(rel.name.as_bytes(), out);
    out.push(rel.replica_identity.as_byte());
    put_varint(rel.columns.len() as u64, out);
    for c in &rel.columns {
        put_bytes(c.name.as_bytes(), out);
        out.extend_from_slice(&c.type_oid.to_le_bytes());
        out.extend_from_slice(&c.type_modifier.to_le_bytes());
        out.push(u8::from(c.is_key));
    }
}

fn put_old(old: &OldRow, out: &mut Vec<u8>) {
    match old {
        OldRow::Key(r) => {
            out.push(OLD_KEY);
            put_row(r, out);
        }
        OldRow::Full(r) => {
            out.push(OLD_FULL);
            put_row(r, out);
        }
    }
}

fn put_row(row: &Row, out: &mut Vec<u8>) {
    put_varint(row.len() as u64, out);
    for v in row {
        match v {
            Value::Null => out.push(VAL_NULL),
            Value::UnchangedToast => out.push(VAL_UNCHANGED),
            Value::Text(b) => {
                out.push(VAL_TEXT);
                put_bytes(b, out);
            }
            Value::Binary(b) => {
                out.push(VAL_BINARY);
                put_bytes(b, out);
            }
        }
    }
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes records from one buffer, sharing `Arc<Relation>`s between records with identical
/// relation bytes. Values are zero-copy slices of the buffer.
#[derive(Default)]
pub struct Decoder {
    relations: HashMap<u32, (Bytes, Arc<Relation>)>,
}

impl Decoder {
    /// A new decoder with an empty relation cache.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes the record starting at `*pos` in `buf` and advances `*pos` past it.
    pub fn decode(&mut self, buf: &Bytes, pos: &mut usize) -> Result<ShardEvent, CodecError> {
        let mut cur = Cursor { buf, pos: *pos };
        let ev = self.record(&mut cur)?;
        *pos = cur.pos;
        Ok(ev)
    }

    fn record(&mut self, cur: &mut Cursor<'_>) -> Result<ShardEvent, CodecError> {
        let at = cur.pos;
        let tag = cur.u8("record tag")?;
        Ok(match tag {
            TAG_BEGIN => ShardEvent::Begin(Begin {
                xid: cur.u32("xid")?,
                commit_lsn: Lsn::from_u64(cur.u64("commit_lsn")?),
                commit_time: cur.i64("commit_time")?,
            }),
            TAG_COMMIT => ShardEvent::Commit(Commit {
                xid: cur.u32("xid")?,
                commit_lsn: Lsn::from_u64(cur.u64("commit_lsn")?),
                end_lsn: Lsn::from_u64(cur.u64("end_lsn")?),
                commit_time: cur.i64("commit_time")?,
            }),
            TAG_HEARTBEAT => ShardEvent::Heartbeat(Lsn::from_u64(cur.u64("heartbeat lsn")?)),
            TAG_INSERT => {
                let rel = self.relation(cur)?;
                let new = row(cur)?;
                ShardEvent::Change(Change::Insert { rel, new })
            }
            TAG_UPDATE => {
                let rel = self.relation(cur)?;
                let old = old_row(cur, true)?;
                let new = row(cur)?;
                ShardEvent::Change(Change::Update { rel, old, new })
            }
            TAG_DELETE => {
                let rel = self.relation(cur)?;
                let at_old = cur.pos;
                let old = old_row(cur, false)?.ok_or(CodecError::Invalid {
                    offset: at_old,
                    what: "delete old row",
                })?;
                ShardEvent::Change(Change::Delete { rel, old })
            }
            TAG_TRUNCATE => {
                let at_flags = cur.pos;
                let flags = cur.u8("truncate flags")?;
                if flags & !0b11 != 0 {
                    return Err(CodecError::Invalid {
                        offset: at_flags,
                        what: "truncate flags",
                    });
                }
                let n = cur.count("truncate relation count")?;
                let mut rels = Vec::with_capacity(n);
                for _ in 0..n {
                    rels.push(self.relation(cur)?);
                }
                ShardEvent::Change(Change::Truncate {
                    rels,
                    cascade: flags & 1 != 0,
                    restart_identity: flags & 2 != 0,
                })
            }
            TAG_DELETE_RANGE => {
                let rel = self.relation(cur)?;
                let n = cur.count("delete range key columns")?;
                let mut key = Vec::with_capacity(n);
                for _ in 0..n {
                    key.push(cur.string("delete range key column")?);
                }
                let mut bound = || -> Result<Option<Vec<i64>>, CodecError> {
                    let at = cur.pos;
                    match cur.u8("delete range bound")? {
                        0 => Ok(None),
                        1 => {
                            let n = cur.count("delete range bound length")?;
                            let mut v = Vec::with_capacity(n);
                            for _ in 0..n {
                                v.push(cur.i64("delete range bound value")?);
                            }
                            Ok(Some(v))
                        }
                        _ => Err(CodecError::Invalid {
                            offset: at,
                            what: "delete range bound",
                        }),
                    }
                };
                let after = bound()?;
                let upto = bound()?;
                ShardEvent::Change(Change::DeleteRange {
                    rel,
                    key,
                    after,
                    upto,
                })
            }
            TAG_MESSAGE => {
                let prefix = cur.string("message prefix")?;
                let content = cur.bytes("message content")?;
                ShardEvent::Change(Change::Message { prefix, content })
            }
            other => {
                return Err(CodecError::BadTag {
                    offset: at,
                    what: "record",
                    tag: other,
                })
            }
        })
    }

    fn relation(&mut self, cur: &mut Cursor<'_>) -> Result<Arc<Relation>, CodecError> {
        let raw = cur.bytes("relation")?;
        let start = cur.pos - raw.len();
        let id = match raw.get(..4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => {
                return Err(CodecError::Truncated {
                    offset: start,
                    what: "relation id",
                    needed: 4 - raw.len(),
                })
            }
        };
        if let Some((bytes, rel)) = self.relations.get(&id) {
            if *bytes == raw {
                return Ok(Arc::clone(rel));
            }
        }
        let mut inner = Cursor { buf: &raw, pos: 0 };
        let rel = decode_relation(&mut inner).map_err(|e| shift(e, start))?;
        if inner.pos != raw.len() {
            return Err(CodecError::Invalid {
                offset: start + inner.pos,
                what: "relation length",
            });
        }
        let rel = Arc::new(rel);
        if self.relations.len() >= RELATION_CACHE_ENTRIES {
            self.relations.clear();
        }
        self.relations.insert(id, (raw, Arc::clone(&rel)));
        Ok(rel)
    }
}

fn shift(e: CodecError, by: usize) -> CodecError {
    match e {
        CodecError::Truncated {
            offset,
            what,
            needed,
        } => CodecError::Truncated {
            offset: offset + by,
            what,
            needed,
        },
        CodecError::BadTag { offset, what, tag } => CodecError::BadTag {
            offset: offset + by,
            what,
            tag,
        },
        CodecError::Invalid { offset, what } => CodecError::Invalid {
            offset: offset + by,
            what,
        },
    }
}

fn decode_relation(cur: &mut Cursor<'_>) -> Result<Relation, CodecError> {
    let id = TableId(cur.u32("relation id")?);
    let namespace = cur.string("relation namespace")?;
    let name = cur.string("relation name")?;
    let at = cur.pos;
    let ri = cur.u8("replica identity")?;
    let replica_identity = ReplicaIdentity::from_byte(ri).ok_or(CodecError::BadTag {
        offset: at,
        what: "replica identity",
        tag: ri,
    })?;
    let n = cur.count("column count")?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let name = cur.string("column name")?;
        let type_oid = cur.u32("column type oid")?;
        let type_modifier = cur.i32("column type modifier")?;
        let at = cur.pos;
        let is_key = match cur.u8("column key flag")? {
            0 => false,
            1 => true,
            tag => {
                return Err(CodecError::BadTag {
                    offset: at,
                    what: "column key flag",
                    tag,
                })
            }
        };
        columns.push(Column {
            name,
            type_oid,
            type_modifier,
            is_key,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn old_row(cur: &mut Cursor<'_>, optional: bool) -> Result<Option<OldRow>, CodecError> {
    let at = cur.pos;
    match cur.u8("old row kind")? {
        OLD_NONE if optional => Ok(None),
        OLD_KEY => Ok(Some(OldRow::Key(row(cur)?))),
        OLD_FULL => Ok(Some(OldRow::Full(row(cur)?))),
        tag => Err(CodecError::BadTag {
            offset: at,
            what: "old row kind",
            tag,
        }),
    }
}

fn row(cur: &mut Cursor<'_>) -> Result<Row, CodecError> {
    let n = cur.count("row length")?;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let at = cur.pos;
        row.push(match cur.u8("value kind")? {
            VAL_NULL => Value::Null,
            VAL_UNCHANGED => Value::UnchangedToast,
            VAL_TEXT => Value::Text(cur.bytes("text value")?),
            VAL_BINARY => Value::Binary(cur.bytes("binary value")?),
            tag => {
                return Err(CodecError::BadTag {
                    offset: at,
                    what: "value kind",
                    tag,
                })
            }
        });
    }
    Ok(row)
}

struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], CodecError> {
        let avail = self.buf.len().saturating_sub(self.pos);
        if n > avail {
            return Err(CodecError::Truncated {
                offset: self.pos,
                what,
                needed: n - avail,
            });
        }
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(CodecError::Invalid {
                offset: self.pos,
                what,
            })?;
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, CodecError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10u32 {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(CodecError::Invalid {
                    offset: start,
                    what,
                });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Invalid {
            offset: start,
            what,
        })
    }

    /// A length or count that must fit in what is left of the buffer (each element takes at
    /// least one byte), so a corrupt count can never cause a huge allocation.
    fn count(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let start = self.pos;
        let n = self.varint(what)?;
        let left = self.buf.len().saturating_sub(self.pos) as u64;
        if n > left {
            return Err(CodecError::Truncated {
                offset: start,
                what,
                needed: usize::try_from(n - left).unwrap_or(usize::MAX),
            });
        }
        Ok(n as usize)
    }

    fn bytes(&mut self, what: &'static str) -> Result<Bytes, CodecError> {
        let n = self.count(what)?;
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..start + n))
    }

    fn string(&mut self, what: &'static str) -> Result<String, CodecError> {
        let n = self.count(what)?;
        let start = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| CodecError::Invalid {
            offset: start,
            what,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A seed from the environment (`RESHARD_TEST_SEED`) or the clock, printed so a failure
    /// can be replayed.
    pub(crate) fn seed() -> u64 {
        let seed = std::env::var("RESHARD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("seed: {seed} (replay with RESHARD_TEST_SEED={seed})");
        seed
    }

    pub(crate) fn relation(rng: &mut StdRng, id: u32) -> Arc<Relation> {
        let ncols = rng.gen_range(0..8);
        Arc::new(Relation {
            id: TableId(id),
            namespace: if rng.gen_bool(0.5) {
                "public".into()
            } else {
                "Sch\u{e9}ma \"x\"".into()
            },
            name: format!("t{id}"),
            replica_identity: [
                ReplicaIdentity::Default,
                ReplicaIdentity::Nothing,
                ReplicaIdentity::Full,
                ReplicaIdentity::Index,
            ][rng.gen_range(0..4)],
            columns: (0..ncols)
                .map(|i| Column {
                    name: format!("c{i}"),
                    type_oid: rng.gen(),
                    type_modifier: rng.gen(),
                    is_key: rng.gen_bool(0.3),
                })
                .collect(),
        })
    }

    fn value(rng: &mut StdRng) -> Value {
        match rng.gen_range(0..4) {
            0 => Value::Null,
            1 => Value::UnchangedToast,
            2 => {
                let n = rng.gen_range(0..300);
                Value::Text(Bytes::from(
                    (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<_>>(),
                ))
            }
            _ => {
                let n = rng.gen_range(0..40);
                Value::Binary(Bytes::from(
                    (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<_>>(),
                ))
            }
        }
    }

    fn row_of(rng: &mut StdRng) -> Row {
        let n = rng.gen_range(0..10);
        (0..n).map(|_| value(rng)).collect()
    }

    fn old_of(rng: &mut StdRng) -> OldRow {
        if rng.gen_bool(0.5) {
            OldRow::Key(row_of(rng))
        } else {
            OldRow::Full(row_of(rng))
        }
    }

    /// A random event of any kind, every `Change` variant included.
    pub(crate) fn event(rng: &mut StdRng, rels: &[Arc<Relation>]) -> ShardEvent {
        let rel = Arc::clone(&rels[rng.gen_range(0..rels.len())]);
        match rng.gen_range(0..10) {
            0 => ShardEvent::Begin(Begin {
                xid: rng.gen(),
                commit_lsn: Lsn::from_u64(rng.gen()),
                commit_time: rng.gen(),
            }),
            1 => ShardEvent::Commit(Commit {
                xid: rng.gen(),
                commit_lsn: Lsn::from_u64(rng.gen()),
                end_lsn: Lsn::from_u64(rng.gen()),
                commit_time: rng.gen(),
            }),
            2 => ShardEvent::Heartbeat(Lsn::from_u64(rng.gen())),
            3 => ShardEvent::Change(Change::Insert {
                rel,
                new: row_of(rng),
            }),
            4 => ShardEvent::Change(Change::Update {
                rel,
                old: if rng.gen_bool(0.5) {
                    Some(old_of(rng))
                } else {
                    None
                },
                new: row_of(rng),
            }),
            5 => ShardEvent::Change(Change::Delete {
                rel,
                old: old_of(rng),
            }),
            6 => ShardEvent::Change(Change::Truncate {
                rels: (0..rng.gen_range(0..4))
                    .map(|_| Arc::clone(&rels[rng.gen_range(0..rels.len())]))
                    .collect(),
                cascade: rng.gen(),
                restart_identity: rng.gen(),
            }),
            7 => ShardEvent::Change(Change::DeleteRange {
                rel,
                key: (0..rng.gen_range(1..4)).map(|i| format!("k{i}")).collect(),
                after: rng
                    .gen_bool(0.5)
                    .then(|| (0..rng.gen_range(1..4)).map(|_| rng.gen()).collect()),
                upto: rng
                    .gen_bool(0.5)
                    .then(|| (0..rng.gen_range(1..4)).map(|_| rng.gen()).collect()),
            }),
            _ => ShardEvent::Change(Change::Message {
                prefix: "pr\u{e9}fixe".into(),
                content: Bytes::from(
                    (0..rng.gen_range(0..64))
                        .map(|_| rng.gen::<u8>())
                        .collect::<Vec<_>>(),
                ),
            }),
        }
    }

    #[test]
    fn round_trips_every_variant() {
        let mut rng = StdRng::seed_from_u64(seed());
        let rels: Vec<_> = (1..6).map(|i| relation(&mut rng, i)).collect();
        let mut enc = Encoder::new();
        let mut buf = Vec::new();
        let mut events = Vec::new();
        for _ in 0..5000 {
            let ev = event(&mut rng, &rels);
            enc.encode(&ev, &mut buf);
            events.push(ev);
        }
        let buf = Bytes::from(buf);
        let mut dec = Decoder::new();
        let mut pos = 0;
        for ev in &events {
            assert_eq!(&dec.decode(&buf, &mut pos).unwrap(), ev);
        }
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn identical_relations_share_one_arc() {
        let mut rng = StdRng::seed_from_u64(7);
        let rel = relation(&mut rng, 42);
        let mut enc = Encoder::new();
        let mut buf = Vec::new();
        for _ in 0..3 {
            let copy = Arc::new((*rel).clone()); // a different Arc with equal content
            enc.encode(
                &ShardEvent::Change(Change::Insert {
                    rel: copy,
                    new: vec![Value::Null],
                }),
                &mut buf,
            );
        }
        let buf = Bytes::from(buf);
        let mut dec = Decoder::new();
        let mut pos = 0;
        let mut arcs = Vec::new();
        for _ in 0..3 {
            match dec.decode(&buf, &mut pos).unwrap() {
                ShardEvent::Change(Change::Insert { rel: r, .. }) => {
                    assert_eq!(*r, *rel);
                    arcs.push(r)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(Arc::ptr_eq(&arcs[0], &arcs[1]) && Arc::ptr_eq(&arcs[1], &arcs[2]));

        // A changed relation with the same OID (ALTER TABLE) is re-encoded, not served stale.
        let mut altered = (*rel).clone();
        altered.name.push_str("_renamed");
        let mut buf2 = Vec::new();
        enc.encode(
            &ShardEvent::Change(Change::Insert {
                rel: Arc::new(altered.clone()),
                new: vec![],
            }),
            &mut buf2,
        );
        let buf2 = Bytes::from(buf2);
        let mut pos = 0;
        match dec.decode(&buf2, &mut pos).unwrap() {
            ShardEvent::Change(Change::Insert { rel: r, .. }) => assert_eq!(*r, altered),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn corrupt_input_is_an_error_never_a_panic() {
        let mut rng = StdRng::seed_from_u64(seed());
        let rels: Vec<_> = (1..4).map(|i| relation(&mut rng, i)).collect();
        let mut enc = Encoder::new();
        for _ in 0..300 {
            let mut buf = Vec::new();
            enc.encode(&event(&mut rng, &rels), &mut buf);
            // Every truncation is an error.
            for cut in 0..buf.len() {
                let b = Bytes::copy_from_slice(&buf[..cut]);
                let mut pos = 0;
                assert!(Decoder::new().decode(&b, &mut pos).is_err(), "cut at {cut}");
            }
            // Random byte flips: an error or some event, never a panic.
            for _ in 0..20 {
                let mut m = buf.clone();
                let i = rng.gen_range(0..m.len());
                m[i] = rng.gen();
                let b = Bytes::from(m);
                let mut pos = 0;
                if let Err(e) = Decoder::new().decode(&b, &mut pos) {
                    assert!(e.offset() <= b.len());
                }
            }
        }
        // A huge count in a tiny buffer is rejected before allocating.
        let b = Bytes::from_static(&[TAG_INSERT, 0x02, 0, 0]);
        let mut pos = 0;
        assert!(Decoder::new().decode(&b, &mut pos).is_err());
        let b = Bytes::from_static(&[
            0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ]);
        let mut pos = 0;
        assert!(matches!(
            Decoder::new().decode(&b, &mut pos),
            Err(CodecError::Invalid { offset: 1, .. })
        ));
    }
}
