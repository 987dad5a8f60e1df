//! Watermark chunks at the handoff: which streamed changes a chunk's copy already contains.
//!
//! In: per table loaded in `[snapshot] mode = "watermark"`, its chunks as recorded on the shards
//! (`reshard.watermark_chunks`): each chunk's key range, the `pg_current_snapshot()` its rows
//! were read under, and its high watermark (the source's WAL insert position read inside that
//! snapshot). Out: for a change of such a table committed by transaction `xid` at `commit_lsn`,
//! whether the chunk that holds its key already saw it ([`TableWindows::sees`]).
//!
//! Why this is exact. A chunk is read in its own `REPEATABLE READ` transaction; its snapshot
//! (`xmin:xmax:xip`, <https://www.postgresql.org/docs/current/functions-info.html#FUNCTIONS-PG-SNAPSHOT-PARTS>)
//! says which top-level transactions it sees, and pgoutput's Begin carries the top-level xid
//! of every decoded transaction. A change the chunk saw is in the copied rows; a change it did
//! not see is applied on top of them, in commit order. This is DBLog's "events in the window
//! win over the chunk's rows", decided per transaction instead of per key: dropping the chunk's
//! row of a key changed inside the window would leave pgoutput's UPDATE (no unchanged TOAST
//! values, no old row) without the row it updates. The high watermark `H` bounds the window:
//! a transaction the snapshot sees had written its commit record before the snapshot was
//! taken, so before `H`; every change committed at or after `H` is applied without a lookup,
//! and once the stream passes a table's last `H` the table is not looked at again.
//!
//! For one key, the order holds too: two transactions that write the same row are serialized
//! by its row lock, which is released only after the first one left the proc array, so the
//! one a snapshot sees always precedes, in commit order, the one it does not.
//!
//! Memory: one [`ChunkWindow`] per chunk (its upper key, its snapshot's in-progress list, two
//! LSNs): about 100 bytes plus 8 per transaction in progress at its read, whatever the chunk's
//! row count; no key set of a chunk is ever held.

use crate::lsn::Lsn;

/// The xids a snapshot sees, from `pg_current_snapshot()` / `txid_current_snapshot()` text
/// (`xmin:xmax:xip,…`, 64-bit with the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidSnapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted.
    xip: Vec<u64>,
}

impl XidSnapshot {
    /// Parses the text form; `None` when it is not `xmin:xmax:xip`.
    pub fn parse(text: &str) -> Option<XidSnapshot> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        if parts.next().is_some() || xmax < xmin {
            return None;
        }
        let mut xip = Vec::new();
        for x in list.split(',').filter(|s| !s.is_empty()) {
            xip.push(x.parse().ok()?);
        }
        xip.sort_unstable();
        Some(XidSnapshot { xmin, xmax, xip })
    }

    /// The oldest xid still running at the snapshot (64-bit).
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// Whether the snapshot sees the committed transaction with this 32-bit xid. The xid is
    /// widened with the epoch that puts it nearest `xmin` (PostgreSQL's own rule for 32-bit
    /// xids, exact while the load spans fewer than 2^31 transactions; the load checks that).
    pub fn sees(&self, xid: u32) -> bool {
        let full = widen(self.xmin, xid);
        if full < self.xmin {
            return true;
        }
        if full >= self.xmax {
            return false;
        }
        self.xip.binary_search(&full).is_err()
    }
}

/// The 64-bit xid with low half `xid` nearest `near`.
fn widen(near: u64, xid: u32) -> u64 {
    let base = (near & !0xFFFF_FFFF) | u64::from(xid);
    let up = base.wrapping_add(1 << 32);
    let down = base.wrapping_sub(1 << 32);
    let dist = |v: u64| v.abs_diff(near);
    let mut best = base;
    if base >= (1 << 32) && dist(down) < dist(best) {
        best = down;
    }
    if dist(up) < dist(best) {
        best = up;
    }
    best
}

/// A primary-key value of a watermark-loaded table: one `i64` per key column.
pub type Key = Vec<i64>;

/// One chunk as the handoff needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkWindow {
    /// The largest key the chunk covers (inclusive); `None` for the table's last chunk, which
    /// covers every larger key. Its lower bound is the previous chunk's `last` (exclusive).
    pub last: Option<Key>,
    /// The snapshot its rows were read under.
    pub snapshot: XidSnapshot,
    /// Changes committed at or after this LSN are not in the chunk.
    pub high: Lsn,
}

/// A table's chunks, in key order, and the key columns that find a change's chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableWindows {
    /// Key column names (unquoted), in key order.
    pub key_columns: Vec<String>,
    chunks: Vec<ChunkWindow>,
    max_high: Lsn,
}

impl TableWindows {
    /// The windows of a table's chunks, given in chunk order. `None` unless they cover every
    /// key: ascending upper bounds, the last one open-ended.
    pub fn new(key_columns: Vec<String>, chunks: Vec<ChunkWindow>) -> Option<TableWindows> {
        let last = chunks.last()?;
        if last.last.is_some() {
            return None;
        }
        for w in chunks.windows(2) {
            match (&w[0].last, &w[1].last) {
                (Some(a), Some(b)) if a < b => {}
                (Some(_), None) => {}
                _ => return None,
            }
        }
        let max_high = chunks.iter().map(|c| c.high).max().unwrap_or(Lsn::ZERO);
        Some(TableWindows {
            key_columns,
            chunks,
            max_high,
        })
    }

    /// Whether every change committed at `commit_lsn` is newer than every chunk.
    pub fn past(&self, commit_lsn: Lsn) -> bool {
        commit_lsn >= self.max_high
    }

    /// The chunk covering `key`.
    fn chunk(&self, key: &[i64]) -> Option<&ChunkWindow> {
        let i = self
            .chunks
            .partition_point(|c| c.last.as_deref().is_some_and(|l| l < key));
        self.chunks.get(i)
    }

    /// Whether the copied rows already contain the change to `key` made by the transaction
    /// `xid` that committed at `commit_lsn`.
    pub fn sees(&self, key: &[i64], xid: u32, commit_lsn: Lsn) -> bool {
        match self.chunk(key) {
            Some(c) => commit_lsn < c.high && c.snapshot.sees(xid),
            None => false,
        }
    }

    /// For a change to every key (TRUNCATE): the key ranges of the chunks that did not see it,
    /// adjacent chunks merged, as `(after, upto)` (exclusive lower and inclusive upper bound,
    /// `None` for open). Empty when every chunk saw it; `[(None, None)]` when none did. The
    /// chunks that saw it were read after it: their rows were written after it and stay.
    pub fn unseen_ranges(&self, xid: u32, commit_lsn: Lsn) -> Vec<(Option<Key>, Option<Key>)> {
        let mut out: Vec<(Option<Key>, Option<Key>)> = Vec::new();
        let mut open = false;
        let mut lower: Option<&Key> = None;
        for c in &self.chunks {
            let seen = commit_lsn < c.high && c.snapshot.sees(xid);
            match (seen, open, out.last_mut()) {
                (false, true, Some(last)) => last.1 = c.last.clone(),
                (false, _, _) => out.push((lower.cloned(), c.last.clone())),
                (true, _, _) => {}
            }
            open = !seen;
            lower = c.last.as_ref();
        }
        out
    }

    /// Chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether there are no chunks (never, for a value built by [`TableWindows::new`]).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Parses one key field's text (`int2`, `int4`, `int8`).
pub fn parse_key_text(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// Parses one key field's binary send form (`int2`, `int4`, `int8`: big-endian).
pub fn parse_key_binary(b: &[u8]) -> Option<i64> {
    match b.len() {
        2 => Some(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        4 => Some(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Some(i64::from_be_bytes(a))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> XidSnapshot {
        XidSnapshot::parse(s).unwrap()
    }

    #[test]
    fn a_snapshot_sees_what_committed_before_it() {
        let s = snap("100:105:100,103");
        assert!(s.sees(99));
        assert!(!s.sees(100), "in progress");
        assert!(s.sees(101));
        assert!(!s.sees(103), "in progress");
        assert!(s.sees(104));
        assert!(!s.sees(105), "started after");
        assert!(!s.sees(5000));
        assert_eq!(XidSnapshot::parse("7:7:"), Some(snap("7:7:")));
        assert!(XidSnapshot::parse("9:7:").is_none());
        assert!(XidSnapshot::parse("x").is_none());
    }

    #[test]
    fn xids_are_widened_across_the_epoch() {
        // xmin in epoch 1 just after the wrap: a 32-bit xid near u32::MAX is epoch 0 (older).
        let s =
            XidSnapshot::parse(&format!("{}:{}:", (1u64 << 32) + 10, (1u64 << 32) + 20)).unwrap();
        assert!(
            s.sees(u32::MAX - 5),
            "from the previous epoch: committed before"
        );
        assert!(s.sees(9));
        assert!(!s.sees(15 + 10));
        // xmin just before the wrap: xid 3 is in the next epoch (newer).
        let near = (1u64 << 32) - 10;
        let s = XidSnapshot::parse(&format!("{near}:{}:", near + 5)).unwrap();
        assert!(!s.sees(3));
        assert!(s.sees(u32::MAX - 20));
    }

    fn w(last: Option<i64>, snapshot: &str, high: u64) -> ChunkWindow {
        ChunkWindow {
            last: last.map(|l| vec![l]),
            snapshot: snap(snapshot),
            high: Lsn::from_u64(high),
        }
    }

    #[test]
    fn a_change_is_judged_by_the_chunk_that_holds_its_key() {
        let t = TableWindows::new(
            vec!["id".into()],
            vec![w(Some(10), "100:100:", 1000), w(None, "200:202:200", 2000)],
        )
        .unwrap();
        let l = Lsn::from_u64;
        // Key 5 is in chunk 0 (read before xid 150 ran): 150 is not in it.
        assert!(t.sees(&[5], 99, l(900)));
        assert!(!t.sees(&[5], 150, l(1500)));
        // Key 10 is chunk 0's last key; key 11 is chunk 1's, which saw 150 but not 200.
        assert!(!t.sees(&[10], 150, l(900)));
        assert!(t.sees(&[11], 150, l(1500)));
        assert!(
            !t.sees(&[11], 200, l(1500)),
            "in progress at chunk 1's read"
        );
        assert!(t.sees(&[1 << 40], 201, l(1999)));
        // At or after the high watermark, nothing is in the chunk, whatever the xid says.
        assert!(!t.sees(&[11], 150, l(2000)));
        assert!(t.past(l(2000)) && !t.past(l(1999)));
        assert!(t.unseen_ranges(99, l(900)).is_empty());
        assert_eq!(t.unseen_ranges(150, l(1500)), vec![(None, Some(vec![10]))]);
        assert_eq!(t.unseen_ranges(300, l(2500)), vec![(None, None)]);
    }

    #[test]
    fn a_truncate_removes_the_ranges_of_the_chunks_that_did_not_see_it() {
        let l = Lsn::from_u64;
        // Xid 150 committed between chunk 1's read and chunk 2's.
        let t = TableWindows::new(
            vec!["a".into(), "b".into()],
            vec![
                ChunkWindow {
                    last: Some(vec![1, 5]),
                    snapshot: snap("100:100:"),
                    high: l(1000),
                },
                ChunkWindow {
                    last: Some(vec![3, 0]),
                    snapshot: snap("120:120:"),
                    high: l(1200),
                },
                ChunkWindow {
                    last: Some(vec![7, 2]),
                    snapshot: snap("200:200:"),
                    high: l(2000),
                },
                w(None, "300:300:", 3000),
            ],
        )
        .unwrap();
        assert_eq!(
            t.unseen_ranges(150, l(1500)),
            vec![(None, Some(vec![3, 0]))],
            "chunks 0 and 1 merged; chunks 2 and 3 saw it"
        );
        // Seen by a middle chunk only (chunks read out of order by a resumed load): two ranges.
        let t = TableWindows::new(
            vec!["id".into()],
            vec![
                w(Some(10), "100:100:", 1000),
                w(Some(20), "200:200:", 2000),
                w(None, "100:100:", 3000),
            ],
        )
        .unwrap();
        assert_eq!(
            t.unseen_ranges(150, l(1500)),
            vec![(None, Some(vec![10])), (Some(vec![20]), None)]
        );
    }

    #[test]
    fn windows_must_cover_every_key() {
        assert!(TableWindows::new(vec![], vec![]).is_none());
        assert!(TableWindows::new(vec![], vec![w(Some(1), "1:1:", 1)]).is_none());
        assert!(TableWindows::new(
            vec![],
            vec![
                w(Some(5), "1:1:", 1),
                w(Some(5), "1:1:", 1),
                w(None, "1:1:", 1)
            ]
        )
        .is_none());
        let t = TableWindows::new(vec![], vec![w(None, "1:1:", 1)]).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn key_fields_parse_in_text_and_binary() {
        assert_eq!(parse_key_text(b"-42"), Some(-42));
        assert_eq!(parse_key_text(b"4x"), None);
        assert_eq!(parse_key_binary(&7i16.to_be_bytes()), Some(7));
        assert_eq!(parse_key_binary(&(-7i32).to_be_bytes()), Some(-7));
        assert_eq!(parse_key_binary(&(1i64 << 40).to_be_bytes()), Some(1 << 40));
        assert_eq!(parse_key_binary(&[1, 2, 3]), None);
    }
}
