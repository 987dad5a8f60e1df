//! pgoutput message decoder, protocol versions 1–4.
//!
//! In: the bytes of one pgoutput message (the payload of an XLogData message, or one `data` row
//! of `pg_logical_slot_get_binary_changes`), as [`Bytes`]. Out: a typed [`PgOutputMessage`].
//! Column values are zero-copy slices of the input buffer ([`Value::Text`] / [`Value::Binary`]
//! share its allocation).
//!
//! Invariant: no input can make it panic. Every read is checked; malformed or truncated input
//! is a [`DecodeError`] naming the byte offset and the message tag, and trailing bytes after a
//! complete message are an error too (so a format we do not know is never half-read).
//!
//! Format reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//! Streamed transactions (protocol 2+, `streaming = on`) prefix the row-level messages (Relation,
//! Type, Insert, Update, Delete, Truncate, Message) with the xid of the (sub)transaction, but
//! only between Stream Start and Stream Stop; the [`Decoder`] tracks that state. Callers that
//! decode messages out of their original order use [`decode_message`] with the flag explicit.

use bytes::Bytes;

use crate::event::{Column, Oid, OldRow, PgTimestamp, Relation, ReplicaIdentity, Row, TableId};
use crate::event::{Value, Xid};
use crate::lsn::Lsn;

/// Highest pgoutput protocol version this decoder understands.
pub const MAX_PROTO_VERSION: u32 = 4;

/// Where and why a message could not be decoded.
///
/// A plain value (never boxed): this is the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message (tag {tag_display}) at byte {offset}: {kind}", tag_display = TagDisplay(*.tag))]
pub struct DecodeError {
    /// Byte offset inside the message where decoding failed.
    pub offset: usize,
    /// The message tag (first byte; 0 when the message was empty).
    pub tag: u8,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl crate::error::Classify for DecodeError {
    fn class(&self) -> crate::error::ErrorClass {
        // The same bytes decode the same way every time: retrying cannot help.
        crate::error::ErrorClass::Definite
    }
}

struct TagDisplay(u8);

impl std::fmt::Display for TagDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// The reason a message could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// The message is empty.
    #[error("empty message")]
    Empty,
    /// The message ended while `needed` more bytes were expected.
    #[error("message truncated: {needed} more bytes expected")]
    Truncated {
        /// Bytes missing.
        needed: usize,
    },
    /// The first byte is not a pgoutput message tag.
    #[error("unknown message tag")]
    UnknownTag,
    /// The message is not valid in the negotiated protocol version.
    #[error("message needs protocol version {needed}, but {negotiated} was negotiated")]
    ProtocolVersion {
        /// Version that introduced the message.
        needed: u32,
        /// Version in use.
        negotiated: u32,
    },
    /// A string was not NUL-terminated before the end of the message.
    #[error("string not NUL-terminated")]
    UnterminatedString,
    /// A string is not valid UTF-8 (reshard requires a UTF-8 source database).
    #[error("string is not valid UTF-8; reshard needs a source database with ENCODING 'UTF8'")]
    InvalidUtf8,
    /// A length field is negative.
    #[error("negative length {0}")]
    NegativeLength(i32),
    /// A tuple column kind other than `n`, `u`, `t`, `b`.
    #[error("unknown tuple column kind 0x{0:02x}")]
    BadColumnKind(u8),
    /// A tuple marker other than the expected `N`, `K`, `O`.
    #[error("unexpected tuple marker 0x{0:02x}")]
    BadTupleMarker(u8),
    /// A replica identity byte other than `d`, `n`, `f`, `i`.
    #[error("unknown replica identity 0x{0:02x}")]
    BadReplicaIdentity(u8),
    /// Bytes are left after a complete message.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Begin (`B`): start of a non-streamed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record.
    pub final_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
}

/// Commit (`C`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused, 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// Origin (`O`): the transaction was replayed from another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// Relation (`R`): the shape of a table, sent before its first change (again after DDL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationMessage {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// The relation (an empty namespace on the wire means `pg_catalog`).
    pub relation: Relation,
}

/// Type (`Y`): a non-built-in type used by a following Relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMessage {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// Type OID.
    pub oid: Oid,
    /// Schema name (`pg_catalog` when empty on the wire).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// Insert (`I`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Xid prefix (inside a stream block only): the (sub)transaction of this change.
    pub xid: Option<Xid>,
    /// Relation OID.
    pub rel_id: Oid,
    /// The new tuple.
    pub new: Row,
}

/// Update (`U`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// Relation OID.
    pub rel_id: Oid,
    /// Old key (`K`) or old tuple (`O`), if sent.
    pub old: Option<OldRow>,
    /// The new tuple.
    pub new: Row,
}

/// Delete (`D`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// Relation OID.
    pub rel_id: Oid,
    /// Old key (`K`) or old tuple (`O`).
    pub old: OldRow,
}

/// Truncate (`T`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// `CASCADE` (flag bit 1).
    pub cascade: bool,
    /// `RESTART IDENTITY` (flag bit 2).
    pub restart_identity: bool,
    /// The truncated relations.
    pub rel_ids: Vec<Oid>,
}

/// Logical decoding message (`M`), from `pg_logical_emit_message` (needs `messages = true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Xid prefix (inside a stream block only).
    pub xid: Option<Xid>,
    /// Emitted with `transactional = true`.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// Prefix.
    pub prefix: String,
    /// Content.
    pub content: Bytes,
}

/// Stream Start (`S`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// Top-level transaction id.
    pub xid: Xid,
    /// First stream segment of this transaction.
    pub first_segment: bool,
}

/// Stream Commit (`c`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    /// Top-level transaction id.
    pub xid: Xid,
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// Stream Abort (`A`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: Xid,
    /// The aborted (sub)transaction; equal to `xid` when the whole transaction aborted.
    pub subxid: Xid,
    /// Abort LSN and timestamp: protocol 4 sends them only with `streaming = parallel`, so they
    /// are present exactly when the message is long enough to carry them.
    pub abort: Option<(Lsn, PgTimestamp)>,
}

/// Begin Prepare (`b`), Prepare (`P`) and Stream Prepare (`p`) share this shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareInfo {
    /// Flags (unused, 0; Begin Prepare has none and reports 0).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// The user-defined GID.
    pub gid: String,
}

/// Commit Prepared (`K`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// End LSN of the commit prepared transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// The user-defined GID.
    pub gid: String,
}

/// Rollback Prepared (`r`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags (unused, 0).
    pub flags: u8,
    /// End LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the rollback prepared transaction.
    pub rollback_end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_time: PgTimestamp,
    /// Rollback timestamp.
    pub rollback_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// The user-defined GID.
    pub gid: String,
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// `B`
    Begin(Begin),
    /// `C`
    Commit(Commit),
    /// `O`
    Origin(Origin),
    /// `R`
    Relation(RelationMessage),
    /// `Y`
    Type(TypeMessage),
    /// `I`
    Insert(Insert),
    /// `U`
    Update(Update),
    /// `D`
    Delete(Delete),
    /// `T`
    Truncate(Truncate),
    /// `M`
    Message(Message),
    /// `S` (protocol 2+)
    StreamStart(StreamStart),
    /// `E` (protocol 2+)
    StreamStop,
    /// `c` (protocol 2+)
    StreamCommit(StreamCommit),
    /// `A` (protocol 2+)
    StreamAbort(StreamAbort),
    /// `b` (protocol 3+)
    BeginPrepare(PrepareInfo),
    /// `P` (protocol 3+)
    Prepare(PrepareInfo),
    /// `K` (protocol 3+)
    CommitPrepared(CommitPrepared),
    /// `r` (protocol 3+)
    RollbackPrepared(RollbackPrepared),
    /// `p` (protocol 3+)
    StreamPrepare(PrepareInfo),
}

impl PgOutputMessage {
    /// A short name for logs and errors (`insert`, `stream commit`, …).
    pub fn name(&self) -> &'static str {
        match self {
            PgOutputMessage::Begin(_) => "begin",
            PgOutputMessage::Commit(_) => "commit",
            PgOutputMessage::Origin(_) => "origin",
            PgOutputMessage::Relation(_) => "relation",
            PgOutputMessage::Type(_) => "type",
            PgOutputMessage::Insert(_) => "insert",
            PgOutputMessage::Update(_) => "update",
            PgOutputMessage::Delete(_) => "delete",
            PgOutputMessage::Truncate(_) => "truncate",
            PgOutputMessage::Message(_) => "message",
            PgOutputMessage::StreamStart(_) => "stream start",
            PgOutputMessage::StreamStop => "stream stop",
            PgOutputMessage::StreamCommit(_) => "stream commit",
            PgOutputMessage::StreamAbort(_) => "stream abort",
            PgOutputMessage::BeginPrepare(_) => "begin prepare",
            PgOutputMessage::Prepare(_) => "prepare",
            PgOutputMessage::CommitPrepared(_) => "commit prepared",
            PgOutputMessage::RollbackPrepared(_) => "rollback prepared",
            PgOutputMessage::StreamPrepare(_) => "stream prepare",
        }
    }
}

/// A stateful decoder: knows the negotiated protocol version and whether it is between Stream
/// Start and Stream Stop (where row messages carry an xid prefix).
#[derive(Clone, Debug)]
pub struct Decoder {
    proto_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for `proto_version` (1–4; higher values are treated as 4), outside any stream.
    pub fn new(proto_version: u32) -> Decoder {
        Decoder {
            proto_version,
            in_stream: false,
        }
    }

    /// The negotiated protocol version.
    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    /// Whether the decoder is inside a Stream Start … Stream Stop block.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message and tracks Stream Start/Stop.
    pub fn decode(&mut self, buf: &Bytes) -> Result<PgOutputMessage, DecodeError> {
        let msg = decode_message(buf, self.proto_version, self.in_stream)?;
        match msg {
            PgOutputMessage::StreamStart(_) => self.in_stream = true,
            PgOutputMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

/// Decodes one message. `in_stream` says whether it was sent between Stream Start and Stream
/// Stop (row-level messages then carry an xid prefix).
pub fn decode_message(
    buf: &Bytes,
    proto_version: u32,
    in_stream: bool,
) -> Result<PgOutputMessage, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            offset: 0,
            tag: 0,
            kind: DecodeErrorKind::Empty,
        });
    };
    let mut r = Reader { buf, pos: 1, tag };
    let need = |v: u32| -> Result<(), DecodeError> {
        if proto_version < v {
            Err(DecodeError {
                offset: 0,
                tag,
                kind: DecodeErrorKind::ProtocolVersion {
                    needed: v,
                    negotiated: proto_version,
                },
            })
        } else {
            Ok(())
        }
    };
    let msg = match tag {
        b'B' => PgOutputMessage::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        }),
        b'C' => PgOutputMessage::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        }),
        b'O' => PgOutputMessage::Origin(Origin {
            commit_lsn: r.lsn()?,
            name: r.string()?,
        }),
        b'R' => {
            let xid = r.stream_xid(in_stream)?;
            let id = r.u32()?;
            let namespace = r.namespace()?;
            let name = r.string()?;
            let ri_at = r.pos;
            let ri = r.u8()?;
            let replica_identity = ReplicaIdentity::from_byte(ri)
                .ok_or(r.err_at(ri_at, DecodeErrorKind::BadReplicaIdentity(ri)))?;
            let ncols = r.count16()?;
            // Each column takes at least 10 bytes: never reserve more than the input can hold.
            let mut columns = Vec::with_capacity(ncols.min(r.remaining() / 10));
            for _ in 0..ncols {
                let flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let type_modifier = r.i32()?;
                columns.push(Column {
                    name,
                    type_oid,
                    type_modifier,
                    is_key: flags & 1 != 0,
                });
            }
            PgOutputMessage::Relation(RelationMessage {
                xid,
                relation: Relation {
                    id: TableId(id),
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            })
        }
        b'Y' => PgOutputMessage::Type(TypeMessage {
            xid: r.stream_xid(in_stream)?,
            oid: r.u32()?,
            namespace: r.namespace()?,
            name: r.string()?,
        }),
        b'I' => {
            let xid = r.stream_xid(in_stream)?;
            let rel_id = r.u32()?;
            r.marker(b'N')?;
            PgOutputMessage::Insert(Insert {
                xid,
                rel_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = r.stream_xid(in_stream)?;
            let rel_id = r.u32()?;
            let at = r.pos;
            let old = match r.u8()? {
                b'K' => {
                    let old = OldRow::Key(r.tuple()?);
                    r.marker(b'N')?;
                    Some(old)
                }
                b'O' => {
                    let old = OldRow::Full(r.tuple()?);
                    r.marker(b'N')?;
                    Some(old)
                }
                b'N' => None,
                m => return Err(r.err_at(at, DecodeErrorKind::BadTupleMarker(m))),
            };
            PgOutputMessage::Update(Update {
                xid,
                rel_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = r.stream_xid(in_stream)?;
            let rel_id = r.u32()?;
            let at = r.pos;
            let old = match r.u8()? {
                b'K' => OldRow::Key(r.tuple()?),
                b'O' => OldRow::Full(r.tuple()?),
                m => return Err(r.err_at(at, DecodeErrorKind::BadTupleMarker(m))),
            };
            PgOutputMessage::Delete(Delete { xid, rel_id, old })
        }
        b'T' => {
            let xid = r.stream_xid(in_stream)?;
            let n_at = r.pos;
            let n = r.i32()?;
            let n = usize::try_from(n)
                .map_err(|_| r.err_at(n_at, DecodeErrorKind::NegativeLength(n)))?;
            let flags = r.u8()?;
            let mut rel_ids = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                rel_ids.push(r.u32()?);
            }
            PgOutputMessage::Truncate(Truncate {
                xid,
                cascade: flags & 1 != 0,
                restart_identity: flags & 2 != 0,
                rel_ids,
            })
        }
        b'M' => {
            let xid = r.stream_xid(in_stream)?;
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.string()?;
            let len = r.len32()?;
            PgOutputMessage::Message(Message {
                xid,
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len)?,
            })
        }
        b'S' => {
            need(2)?;
            PgOutputMessage::StreamStart(StreamStart {
                xid: r.u32()?,
                first_segment: r.u8()? == 1,
            })
        }
        b'E' => {
            need(2)?;
            PgOutputMessage::StreamStop
        }
        b'c' => {
            need(2)?;
            PgOutputMessage::StreamCommit(StreamCommit {
                xid: r.u32()?,
                flags: r.u8()?,
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_time: r.i64()?,
            })
        }
        b'A' => {
            need(2)?;
            let xid = r.u32()?;
            let subxid = r.u32()?;
            // Protocol 4 with streaming = parallel appends the abort LSN and time.
            let abort = if proto_version >= 4 && r.remaining() > 0 {
                Some((r.lsn()?, r.i64()?))
            } else {
                None
            };
            PgOutputMessage::StreamAbort(StreamAbort { xid, subxid, abort })
        }
        b'b' => {
            need(3)?;
            PgOutputMessage::BeginPrepare(PrepareInfo {
                flags: 0,
                prepare_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                prepare_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            })
        }
        b'P' | b'p' => {
            need(3)?;
            let info = r.prepare_info()?;
            if tag == b'P' {
                PgOutputMessage::Prepare(info)
            } else {
                PgOutputMessage::StreamPrepare(info)
            }
        }
        b'K' => {
            need(3)?;
            PgOutputMessage::CommitPrepared(CommitPrepared {
                flags: r.u8()?,
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            })
        }
        b'r' => {
            need(3)?;
            PgOutputMessage::RollbackPrepared(RollbackPrepared {
                flags: r.u8()?,
                prepare_end_lsn: r.lsn()?,
                rollback_end_lsn: r.lsn()?,
                prepare_time: r.i64()?,
                rollback_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            })
        }
        _ => return Err(r.err_at(0, DecodeErrorKind::UnknownTag)),
    };
    if r.remaining() != 0 {
        return Err(r.err_at(r.pos, DecodeErrorKind::TrailingBytes(r.remaining())));
    }
    Ok(msg)
}

/// Checked big-endian reads over one message.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl Reader<'_> {
    fn err_at(&self, offset: usize, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            offset,
            tag: self.tag,
            kind,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    #[inline]
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N);
        match end.and_then(|e| self.buf.get(self.pos..e)) {
            Some(s) => {
                let mut a = [0u8; N];
                a.copy_from_slice(s);
                self.pos += N;
                Ok(a)
            }
            None => Err(self.err_at(
                self.pos,
                DecodeErrorKind::Truncated {
                    needed: N - self.remaining(),
                },
            )),
        }
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    #[inline]
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn::from_u64(u64::from_be_bytes(self.take()?)))
    }

    /// An Int16 count (never negative in practice; read as unsigned, as PostgreSQL's
    /// `pq_getmsgint(…, 2)` does).
    fn count16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.take()?) as usize)
    }

    /// An Int32 length that must not be negative.
    #[inline]
    fn len32(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| self.err_at(at, DecodeErrorKind::NegativeLength(n)))
    }

    #[inline]
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.err_at(
                self.pos,
                DecodeErrorKind::Truncated {
                    needed: len - self.remaining(),
                },
            ));
        }
        let b = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.err_at(self.pos, DecodeErrorKind::UnterminatedString));
        };
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err_at(self.pos, DecodeErrorKind::InvalidUtf8))?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// A namespace: the empty string stands for `pg_catalog` (see the Relation and Type
    /// message formats).
    fn namespace(&mut self) -> Result<String, DecodeError> {
        let s = self.string()?;
        Ok(if s.is_empty() {
            "pg_catalog".to_owned()
        } else {
            s
        })
    }

    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<Xid>, DecodeError> {
        if in_stream {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }

    fn marker(&mut self, want: u8) -> Result<(), DecodeError> {
        let at = self.pos;
        let m = self.u8()?;
        if m == want {
            Ok(())
        } else {
            Err(self.err_at(at, DecodeErrorKind::BadTupleMarker(m)))
        }
    }

    fn prepare_info(&mut self) -> Result<PrepareInfo, DecodeError> {
        Ok(PrepareInfo {
            flags: self.u8()?,
            prepare_lsn: self.lsn()?,
            end_lsn: self.lsn()?,
            prepare_time: self.i64()?,
            xid: self.u32()?,
            gid: self.string()?,
        })
    }

    /// TupleData: Int16 column count, then per column a kind byte and maybe a value.
    #[inline]
    fn tuple(&mut self) -> Result<Row, DecodeError> {
        let n = self.count16()?;
        // Every column takes at least one byte.
        let mut row = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let at = self.pos;
            let v = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.len32()?;
                    Value::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.len32()?;
                    Value::Binary(self.bytes(len)?)
                }
                k => return Err(self.err_at(at, DecodeErrorKind::BadColumnKind(k))),
            };
            row.push(v);
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Builds messages by hand, field by field, as the docs list them.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn tag(t: u8) -> W {
            W(vec![t])
        }
        fn u8(mut self, v: u8) -> W {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> W {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, v: &[u8]) -> W {
            self.0.extend_from_slice(v);
            self
        }
        /// TupleData with a null, an unchanged TOAST, a text and a binary column.
        fn tuple4(self) -> W {
            self.i16(4)
                .u8(b'n')
                .u8(b'u')
                .u8(b't')
                .i32(3)
                .raw(b"abc")
                .u8(b'b')
                .i32(2)
                .raw(&[0, 0xff])
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn tuple4() -> Row {
        vec![
            Value::Null,
            Value::UnchangedToast,
            Value::Text(Bytes::from_static(b"abc")),
            Value::Binary(Bytes::from_static(&[0, 0xff])),
        ]
    }

    fn dec(b: &Bytes, in_stream: bool) -> PgOutputMessage {
        decode_message(b, 4, in_stream).unwrap()
    }

    fn lsn(v: u64) -> Lsn {
        Lsn::from_u64(v)
    }

    #[test]
    fn begin_commit_origin() {
        let b = W::tag(b'B').u64(0x1_0000_0010).i64(-5).u32(77).bytes();
        assert_eq!(
            dec(&b, false),
            PgOutputMessage::Begin(Begin {
                final_lsn: lsn(0x1_0000_0010),
                commit_time: -5,
                xid: 77
            })
        );
        let c = W::tag(b'C').u8(0).u64(10).u64(20).i64(30).bytes();
        assert_eq!(
            dec(&c, false),
            PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: lsn(10),
                end_lsn: lsn(20),
                commit_time: 30
            })
        );
        let o = W::tag(b'O').u64(99).s("upstream").bytes();
        assert_eq!(
            dec(&o, false),
            PgOutputMessage::Origin(Origin {
                commit_lsn: lsn(99),
                name: "upstream".into()
            })
        );
    }

    fn relation_body(w: W) -> W {
        w.u32(16384)
            .s("")
            .s("t")
            .u8(b'f')
            .i16(2)
            .u8(1)
            .s("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .s("n")
            .u32(1700)
            .i32(655366)
    }

    #[test]
    fn relation_outside_and_inside_stream() {
        let want = Relation {
            id: TableId(16384),
            namespace: "pg_catalog".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    is_key: true,
                },
                Column {
                    name: "n".into(),
                    type_oid: 1700,
                    type_modifier: 655366,
                    is_key: false,
                },
            ],
        };
        let out = relation_body(W::tag(b'R')).bytes();
        assert_eq!(
            dec(&out, false),
            PgOutputMessage::Relation(RelationMessage {
                xid: None,
                relation: want.clone()
            })
        );
        let inside = relation_body(W::tag(b'R').u32(900)).bytes();
        assert_eq!(
            dec(&inside, true),
            PgOutputMessage::Relation(RelationMessage {
                xid: Some(900),
                relation: want
            })
        );
        // The same bytes with the wrong stream flag are an error, not a misread.
        assert!(decode_message(&inside, 4, false).is_err());
    }

    #[test]
    fn type_message() {
        let y = W::tag(b'Y').u32(7).u32(50000).s("public").s("mood").bytes();
        assert_eq!(
            dec(&y, true),
            PgOutputMessage::Type(TypeMessage {
                xid: Some(7),
                oid: 50000,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
    }

    #[test]
    fn insert_update_delete_with_every_column_kind() {
        let i = W::tag(b'I').u32(5).u8(b'N').tuple4().bytes();
        assert_eq!(
            dec(&i, false),
            PgOutputMessage::Insert(Insert {
                xid: None,
                rel_id: 5,
                new: tuple4()
            })
        );
        let u_plain = W::tag(b'U').u32(9).u32(5).u8(b'N').tuple4().bytes();
        assert_eq!(
            dec(&u_plain, true),
            PgOutputMessage::Update(Update {
                xid: Some(9),
                rel_id: 5,
                old: None,
                new: tuple4()
            })
        );
        let key = W::tag(b'U')
            .u32(5)
            .u8(b'K')
            .i16(1)
            .u8(b't')
            .i32(1)
            .raw(b"7")
            .u8(b'N')
            .tuple4()
            .bytes();
        assert_eq!(
            dec(&key, false),
            PgOutputMessage::Update(Update {
                xid: None,
                rel_id: 5,
                old: Some(OldRow::Key(vec![Value::Text(Bytes::from_static(b"7"))])),
                new: tuple4()
            })
        );
        let full = W::tag(b'U')
            .u32(5)
            .u8(b'O')
            .tuple4()
            .u8(b'N')
            .tuple4()
            .bytes();
        assert_eq!(
            dec(&full, false),
            PgOutputMessage::Update(Update {
                xid: None,
                rel_id: 5,
                old: Some(OldRow::Full(tuple4())),
                new: tuple4()
            })
        );
        for (marker, old) in [
            (b'K', OldRow::Key(tuple4())),
            (b'O', OldRow::Full(tuple4())),
        ] {
            let d = W::tag(b'D').u32(5).u8(marker).tuple4().bytes();
            assert_eq!(
                dec(&d, false),
                PgOutputMessage::Delete(Delete {
                    xid: None,
                    rel_id: 5,
                    old
                })
            );
        }
        // Values are zero-copy slices of the input.
        if let PgOutputMessage::Insert(ins) = dec(&i, false) {
            let Value::Text(t) = &ins.new[2] else {
                panic!("not text")
            };
            let range = i.as_ptr_range();
            assert!(range.contains(&t.as_ptr()));
        }
    }

    #[test]
    fn truncate_flags_and_relations() {
        for (flags, cascade, restart) in [
            (0, false, false),
            (1, true, false),
            (2, false, true),
            (3, true, true),
        ] {
            let t = W::tag(b'T').i32(3).u8(flags).u32(1).u32(2).u32(3).bytes();
            assert_eq!(
                dec(&t, false),
                PgOutputMessage::Truncate(Truncate {
                    xid: None,
                    cascade,
                    restart_identity: restart,
                    rel_ids: vec![1, 2, 3]
                })
            );
        }
        let neg = W::tag(b'T').i32(-1).u8(0).bytes();
        assert_eq!(
            decode_message(&neg, 4, false).unwrap_err().kind,
            DecodeErrorKind::NegativeLength(-1)
        );
    }

    #[test]
    fn logical_message() {
        let m = W::tag(b'M')
            .u32(12)
            .u8(1)
            .u64(0x40)
            .s("pfx")
            .i32(3)
            .raw(&[1, 0, 2])
            .bytes();
        assert_eq!(
            dec(&m, true),
            PgOutputMessage::Message(Message {
                xid: Some(12),
                transactional: true,
                lsn: lsn(0x40),
                prefix: "pfx".into(),
                content: Bytes::from_static(&[1, 0, 2])
            })
        );
        let nt = W::tag(b'M').u8(0).u64(1).s("").i32(0).bytes();
        assert_eq!(
            dec(&nt, false),
            PgOutputMessage::Message(Message {
                xid: None,
                transactional: false,
                lsn: lsn(1),
                prefix: String::new(),
                content: Bytes::new()
            })
        );
    }

    #[test]
    fn stream_messages() {
        let mut d = Decoder::new(2);
        assert!(!d.in_stream());
        let s = W::tag(b'S').u32(800).u8(1).bytes();
        assert_eq!(
            d.decode(&s).unwrap(),
            PgOutputMessage::StreamStart(StreamStart {
                xid: 800,
                first_segment: true
            })
        );
        assert!(d.in_stream());
        let i = W::tag(b'I').u32(801).u32(5).u8(b'N').tuple4().bytes();
        assert_eq!(
            d.decode(&i).unwrap(),
            PgOutputMessage::Insert(Insert {
                xid: Some(801),
                rel_id: 5,
                new: tuple4()
            })
        );
        assert_eq!(
            d.decode(&W::tag(b'E').bytes()).unwrap(),
            PgOutputMessage::StreamStop
        );
        assert!(!d.in_stream());
        let c = W::tag(b'c').u32(800).u8(0).u64(1).u64(2).i64(3).bytes();
        assert_eq!(
            d.decode(&c).unwrap(),
            PgOutputMessage::StreamCommit(StreamCommit {
                xid: 800,
                flags: 0,
                commit_lsn: lsn(1),
                end_lsn: lsn(2),
                commit_time: 3
            })
        );
        let a = W::tag(b'A').u32(800).u32(801).bytes();
        assert_eq!(
            d.decode(&a).unwrap(),
            PgOutputMessage::StreamAbort(StreamAbort {
                xid: 800,
                subxid: 801,
                abort: None
            })
        );
        // Protocol 4 with streaming = parallel: abort LSN and time follow.
        let a4 = W::tag(b'A').u32(800).u32(800).u64(0x99).i64(-7).bytes();
        assert_eq!(
            decode_message(&a4, 4, false).unwrap(),
            PgOutputMessage::StreamAbort(StreamAbort {
                xid: 800,
                subxid: 800,
                abort: Some((lsn(0x99), -7))
            })
        );
        // …which protocol 2/3 never send.
        assert_eq!(
            decode_message(&a4, 3, false).unwrap_err().kind,
            DecodeErrorKind::TrailingBytes(16)
        );
        // Protocol 4 without parallel streaming: the short form.
        assert!(matches!(
            decode_message(&a, 4, false).unwrap(),
            PgOutputMessage::StreamAbort(StreamAbort { abort: None, .. })
        ));
        // Stream messages do not exist in protocol 1.
        assert_eq!(
            decode_message(&s, 1, false).unwrap_err().kind,
            DecodeErrorKind::ProtocolVersion {
                needed: 2,
                negotiated: 1
            }
        );
    }

    #[test]
    fn two_phase_messages() {
        let info = PrepareInfo {
            flags: 0,
            prepare_lsn: lsn(10),
            end_lsn: lsn(20),
            prepare_time: 30,
            xid: 40,
            gid: "g1".into(),
        };
        let bp = W::tag(b'b').u64(10).u64(20).i64(30).u32(40).s("g1").bytes();
        assert_eq!(dec(&bp, false), PgOutputMessage::BeginPrepare(info.clone()));
        let p = W::tag(b'P')
            .u8(0)
            .u64(10)
            .u64(20)
            .i64(30)
            .u32(40)
            .s("g1")
            .bytes();
        assert_eq!(dec(&p, false), PgOutputMessage::Prepare(info.clone()));
        let sp = W::tag(b'p')
            .u8(0)
            .u64(10)
            .u64(20)
            .i64(30)
            .u32(40)
            .s("g1")
            .bytes();
        assert_eq!(dec(&sp, false), PgOutputMessage::StreamPrepare(info));
        let k = W::tag(b'K')
            .u8(0)
            .u64(11)
            .u64(21)
            .i64(31)
            .u32(41)
            .s("g2")
            .bytes();
        assert_eq!(
            dec(&k, false),
            PgOutputMessage::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: lsn(11),
                end_lsn: lsn(21),
                commit_time: 31,
                xid: 41,
                gid: "g2".into()
            })
        );
        let r = W::tag(b'r')
            .u8(0)
            .u64(12)
            .u64(22)
            .i64(32)
            .i64(33)
            .u32(42)
            .s("g3")
            .bytes();
        assert_eq!(
            dec(&r, false),
            PgOutputMessage::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: lsn(12),
                rollback_end_lsn: lsn(22),
                prepare_time: 32,
                rollback_time: 33,
                xid: 42,
                gid: "g3".into()
            })
        );
        assert_eq!(
            decode_message(&k, 2, false).unwrap_err().kind,
            DecodeErrorKind::ProtocolVersion {
                needed: 3,
                negotiated: 2
            }
        );
    }

    #[test]
    fn malformed_messages_name_offset_and_tag() {
        let e = decode_message(&Bytes::new(), 4, false).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Empty);
        let e = decode_message(&Bytes::from_static(b"Z"), 4, false).unwrap_err();
        assert_eq!(
            (e.offset, e.tag, e.kind),
            (0, b'Z', DecodeErrorKind::UnknownTag)
        );
        let bad_kind = W::tag(b'I').u32(5).u8(b'N').i16(1).u8(b'x').bytes();
        let e = decode_message(&bad_kind, 4, false).unwrap_err();
        assert_eq!(
            (e.offset, e.kind),
            (8, DecodeErrorKind::BadColumnKind(b'x'))
        );
        let neg = W::tag(b'I').u32(5).u8(b'N').i16(1).u8(b't').i32(-2).bytes();
        assert_eq!(
            decode_message(&neg, 4, false).unwrap_err().kind,
            DecodeErrorKind::NegativeLength(-2)
        );
        let long = W::tag(b'I')
            .u32(5)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(1000)
            .raw(b"ab")
            .bytes();
        assert_eq!(
            decode_message(&long, 4, false).unwrap_err().kind,
            DecodeErrorKind::Truncated { needed: 998 }
        );
        let marker = W::tag(b'D').u32(5).u8(b'N').tuple4().bytes();
        assert_eq!(
            decode_message(&marker, 4, false).unwrap_err().kind,
            DecodeErrorKind::BadTupleMarker(b'N')
        );
        let ri = relation_body(W::tag(b'R')).bytes();
        let mut bad_ri = ri.to_vec();
        bad_ri[8] = b'z';
        assert_eq!(
            decode_message(&Bytes::from(bad_ri), 4, false)
                .unwrap_err()
                .kind,
            DecodeErrorKind::BadReplicaIdentity(b'z')
        );
        let utf = W::tag(b'O').u64(1).raw(&[0xff, 0xfe, 0]).bytes();
        assert_eq!(
            decode_message(&utf, 4, false).unwrap_err().kind,
            DecodeErrorKind::InvalidUtf8
        );
        let unterminated = W::tag(b'O').u64(1).raw(b"abc").bytes();
        assert_eq!(
            decode_message(&unterminated, 4, false).unwrap_err().kind,
            DecodeErrorKind::UnterminatedString
        );
        let trailing = W::tag(b'E').u8(0).bytes();
        assert_eq!(
            decode_message(&trailing, 4, false).unwrap_err(),
            DecodeError {
                offset: 1,
                tag: b'E',
                kind: DecodeErrorKind::TrailingBytes(1)
            }
        );
        let e = decode_message(&Bytes::from_static(b"B\x00"), 4, false).unwrap_err();
        assert_eq!(e.to_string(), "malformed pgoutput message (tag 'B') at byte 1: message truncated: 7 more bytes expected");
    }

    /// Every message of every captured fixture, with the stream flag it was sent under.
    fn fixture_messages() -> Vec<(Bytes, bool)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pgoutput");
        let mut out = Vec::new();
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        names.sort();
        assert!(names.len() >= 10, "fixtures missing in {}", dir.display());
        for p in names {
            let data = Bytes::from(std::fs::read(&p).unwrap());
            let mut d = Decoder::new(3);
            for (_, msg) in crate::decode::frame::split_frames(&data).unwrap() {
                let in_stream = d.in_stream();
                d.decode(&msg)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.push((msg, in_stream));
            }
        }
        out
    }

    #[test]
    fn every_prefix_of_every_fixture_message_is_an_error_not_a_panic() {
        let msgs = fixture_messages();
        let mut checked = 0;
        for (msg, in_stream) in &msgs {
            // Long row messages: every prefix up to 600 bytes, then a stride.
            let step = if msg.len() > 600 { 97 } else { 1 };
            let mut cut = 0;
            while cut < msg.len() {
                let prefix = msg.slice(..cut);
                let e = decode_message(&prefix, 3, *in_stream)
                    .expect_err("a strict prefix of a message must not decode");
                assert!(e.offset <= cut, "offset {} beyond input {cut}", e.offset);
                checked += 1;
                cut += if cut < 600 { 1 } else { step };
            }
        }
        assert!(checked > 10_000, "only {checked} prefixes checked");
    }

    #[test]
    fn random_byte_flips_never_panic() {
        let seed: u64 = std::env::var("DECODE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::thread_rng().gen());
        println!(
            "random_byte_flips_never_panic seed = {seed} (rerun with DECODE_FUZZ_SEED={seed})"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let msgs = fixture_messages();
        for _ in 0..50_000 {
            let (msg, in_stream) = &msgs[rng.gen_range(0..msgs.len())];
            let mut m = msg.to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..m.len());
                m[at] = rng.gen();
            }
            if rng.gen_bool(0.2) {
                let cut = rng.gen_range(0..=m.len());
                m.truncate(cut);
            }
            let m = Bytes::from(m);
            for proto in 1..=4 {
                if let Err(e) = decode_message(&m, proto, *in_stream) {
                    assert!(e.offset <= m.len());
                    let _ = e.to_string();
                }
            }
            let _ = decode_message(&m, 4, !*in_stream);
        }
    }
}
