//! JSON rendering of assembled transactions, for `reshard peek` and golden files.
//!
//! In: [`TxnEvent`]s in assembly order, each with the LSN of its message. Out: one
//! `serde_json::Value` object per event:
//!
//! ```text
//! {"kind":"begin","xid":750,"commit_lsn":"0/1A2B3C","commit_time":"2026-01-02T03:04:05.123456Z"}
//! {"kind":"insert","table":"public.t","lsn":"0/1A2A00","commit_lsn":"0/1A2B3C","xid":750,"new":{"id":"1","note":null}}
//! {"kind":"update","table":"public.t",…,"old_kind":"key","old":{"id":"1"},"new":{…},"unchanged_toast":["body"]}
//! {"kind":"commit","xid":750,"commit_lsn":"0/1A2B3C","end_lsn":"0/1A2B70","commit_time":"…"}
//! ```
//!
//! Invariant: the output is deterministic, so it can be compared byte for byte with a golden
//! file: keys in a fixed order, columns in relation order, text values as their text (invalid
//! UTF-8 replaced, which PostgreSQL never sends from a UTF-8 database), binary values and
//! message contents as `\x` hex (like `bytea_output = hex`). Unchanged TOAST columns are left out
//! of `new` and listed in `unchanged_toast`. In `old`, a key-only old row (`K`) lists only the
//! replica-identity columns.

use serde_json::{Map, Value as Json};

use super::assemble::{AssembleError, Assembler, AssemblerOptions};
use crate::event::{Begin, Change, OldRow, PgTimestamp, Relation, TxnEvent, Value, Xid};
use crate::lsn::Lsn;

/// Renders a stream of [`TxnEvent`]s; remembers the open transaction so each change line can
/// carry its `xid` and `commit_lsn`.
#[derive(Debug, Default)]
pub struct JsonRenderer {
    open: Option<Begin>,
}

impl JsonRenderer {
    /// A renderer between transactions.
    pub fn new() -> JsonRenderer {
        JsonRenderer::default()
    }

    /// Renders one event; `lsn` is the LSN of the message that produced it.
    pub fn render(&mut self, lsn: Lsn, event: &TxnEvent) -> Json {
        let mut o = Map::new();
        match event {
            TxnEvent::Begin(b) => {
                self.open = Some(*b);
                o.insert("kind".into(), "begin".into());
                o.insert("xid".into(), b.xid.into());
                o.insert("commit_lsn".into(), b.commit_lsn.to_string().into());
                o.insert("commit_time".into(), timestamp(b.commit_time).into());
            }
            TxnEvent::Commit(c) => {
                self.open = None;
                o.insert("kind".into(), "commit".into());
                o.insert("xid".into(), c.xid.into());
                o.insert("commit_lsn".into(), c.commit_lsn.to_string().into());
                o.insert("end_lsn".into(), c.end_lsn.to_string().into());
                o.insert("commit_time".into(), timestamp(c.commit_time).into());
            }
            TxnEvent::Change(change) => {
                o.insert("kind".into(), change.kind().into());
                if let Some(rel) = change.relation() {
                    o.insert("table".into(), rel.qualified_name().into());
                }
                o.insert("lsn".into(), lsn.to_string().into());
                let (xid, commit_lsn): (Option<Xid>, Option<String>) = match &self.open {
                    Some(b) => (Some(b.xid), Some(b.commit_lsn.to_string())),
                    None => (None, None),
                };
                o.insert("commit_lsn".into(), commit_lsn.into());
                o.insert("xid".into(), xid.into());
                render_change(change, &mut o);
            }
        }
        Json::Object(o)
    }
}

/// Decodes and assembles a captured message stream (frames of `(LSN, pgoutput message)` in
/// slot order) and renders every event as one JSON line (each ending in `\n`). Used for the
/// golden files of `fixtures/pgoutput` and by tooling.
pub fn render_capture<I>(
    frames: I,
    proto_version: u32,
    stream_dir: &std::path::Path,
) -> Result<String, AssembleError>
where
    I: IntoIterator<Item = (Lsn, bytes::Bytes)>,
{
    let mut asm = Assembler::new(AssemblerOptions {
        stream_dir: stream_dir.to_owned(),
        proto_version,
    })?;
    let mut renderer = JsonRenderer::new();
    let mut text = String::new();
    for (lsn, data) in frames {
        asm.push(lsn, data, &mut |at, ev| {
            text.push_str(&renderer.render(at, &ev).to_string());
            text.push('\n');
            Ok::<(), AssembleError>(())
        })?;
    }
    Ok(text)
}

fn render_change(change: &Change, o: &mut Map<String, Json>) {
    match change {
        Change::Insert { rel, new } => {
            new_row(rel, new, o);
        }
        Change::Update { rel, old, new } => {
            if let Some(old) = old {
                old_row(rel, old, o);
            }
            new_row(rel, new, o);
        }
        Change::Delete { rel, old } => old_row(rel, old, o),
        Change::Truncate {
            rels,
            cascade,
            restart_identity,
        } => {
            o.insert(
                "tables".into(),
                rels.iter()
                    .map(|r| Json::from(r.qualified_name()))
                    .collect::<Vec<_>>()
                    .into(),
            );
            o.insert("cascade".into(), (*cascade).into());
            o.insert("restart_identity".into(), (*restart_identity).into());
        }
        Change::DeleteRange {
            rel,
            key,
            after,
            upto,
        } => {
            o.insert("table".into(), rel.qualified_name().into());
            o.insert("key".into(), key.clone().into());
            o.insert("after".into(), after.clone().into());
            o.insert("upto".into(), upto.clone().into());
        }
        Change::Message { prefix, content } => {
            o.insert("prefix".into(), prefix.clone().into());
            o.insert("content".into(), hex(content).into());
        }
    }
}

fn new_row(rel: &Relation, row: &[Value], o: &mut Map<String, Json>) {
    let mut cols = Map::new();
    let mut toast = Vec::new();
    for (col, v) in rel.columns.iter().zip(row) {
        match v {
            Value::UnchangedToast => toast.push(Json::from(col.name.clone())),
            v => {
                cols.insert(col.name.clone(), value(v));
            }
        }
    }
    o.insert("new".into(), Json::Object(cols));
    if !toast.is_empty() {
        o.insert("unchanged_toast".into(), Json::Array(toast));
    }
}

fn old_row(rel: &Relation, old: &OldRow, o: &mut Map<String, Json>) {
    let (kind, key_only) = match old {
        OldRow::Key(_) => ("key", true),
        OldRow::Full(_) => ("full", false),
    };
    let mut cols = Map::new();
    for (col, v) in rel.columns.iter().zip(old.row()) {
        if key_only && !col.is_key {
            continue;
        }
        cols.insert(col.name.clone(), value(v));
    }
    o.insert("old_kind".into(), kind.into());
    o.insert("old".into(), Json::Object(cols));
}

fn value(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::UnchangedToast => Json::from("<unchanged toast>"),
        Value::Text(b) => Json::from(String::from_utf8_lossy(b).into_owned()),
        Value::Binary(b) => Json::from(hex(b)),
    }
}

/// `\x` followed by lower-case hex, like PostgreSQL's `bytea_output = hex`.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("\\x");
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// A [`PgTimestamp`] as RFC 3339 UTC with microseconds (`2026-01-02T03:04:05.123456Z`).
pub fn timestamp(t: PgTimestamp) -> String {
    let unix_micros = i128::from(t) + i128::from(crate::event::PG_EPOCH_OFFSET_MICROS);
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i128) -> (i128, i128, i128) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_utc() {
        assert_eq!(timestamp(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(timestamp(-1), "1999-12-31T23:59:59.999999Z");
        // 2024-02-29T12:34:56.789012Z
        let leap = 1_709_210_096_789_012i64 - crate::event::PG_EPOCH_OFFSET_MICROS;
        assert_eq!(timestamp(leap), "2024-02-29T12:34:56.789012Z");
        assert!(timestamp(i64::MIN).len() > 10);
    }

    #[test]
    fn hex_is_lower_case_with_prefix() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "\\x00abff");
        assert_eq!(hex(&[]), "\\x");
    }
}
