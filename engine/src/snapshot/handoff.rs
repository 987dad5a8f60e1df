//! The full-load → CDC handoff filter.
//!
//! In: a shard's [`ShardLog`] and, from the full load, a [`Handoff`]: per table copied under an
//! exported snapshot the LSN its copy is consistent at (`skip_until`), and per table copied in
//! watermark chunks its chunk windows (`windows`, see `snapshot::window`). Out: the same log
//! without the changes the copied data already contains.
//!
//! Exported snapshot, why strictly below: a snapshot exported when a slot reaches its
//! consistent point C holds exactly the transactions whose commit record starts before C
//! (logical decoding skips those, `SnapBuildXactNeedsSkip(start_decoding_at)` in PostgreSQL's
//! `snapbuild.c`, and the exported snapshot treats every later committer as running). A commit
//! record that starts exactly at C is sent by the walsender and is not in the snapshot.
//! pgoutput's Begin and Commit carry that start as `commit_lsn` (`final_lsn`), see
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//!
//! Watermark chunks: a change is dropped when the chunk holding its key was read under a
//! snapshot that saw its transaction (Begin's xid); the rest is applied on top of the chunks,
//! in commit order, as if each chunk's rows had entered the stream at its high watermark. An
//! UPDATE that moves a primary key between two chunks that judge it differently becomes the
//! half the copy lacks (the INSERT of the new key, or the DELETE of the old one). A TRUNCATE
//! that some chunks saw and others did not (it committed between their reads: a chunk's lock
//! keeps it out of the read itself) becomes a [`Change::DeleteRange`] per run of chunks that
//! did not see it: their rows are from before it, the other chunks' rows are from after it.
//!
//! Invariant: a table recopied under a later snapshot (a full load resumed after a crash)
//! receives each change exactly once: the copy holds everything committed up to its snapshot's
//! LSN, CDC everything after it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::error::{Classify, ErrorClass};
use crate::event::{
    Change, OldRow, Relation, ShardEvent, ShardId, ShardLog, ShardReader, Value, Xid,
};
use crate::lsn::Lsn;
use crate::snapshot::window::{parse_key_binary, parse_key_text, Key, TableWindows};

/// What the full load hands to CDC: which changes its copy already holds.
#[derive(Clone, Debug, Default)]
pub struct Handoff {
    /// Tables copied under an exported snapshot: changes committed below the LSN are dropped.
    pub skip_until: HashMap<crate::pg::sql::TableName, Lsn>,
    /// Tables copied in watermark chunks: their chunks' windows.
    pub windows: HashMap<crate::pg::sql::TableName, Arc<TableWindows>>,
}

impl Handoff {
    fn is_empty(&self) -> bool {
        self.skip_until.is_empty() && self.windows.is_empty()
    }
}

/// A change the handoff cannot decide without losing or repeating data.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError<E> {
    /// Reading the log failed.
    #[error(transparent)]
    Log(E),
    /// A change of a table loaded in watermark chunks.
    #[error("table {table}, transaction {xid} committed at {commit_lsn}: {message}")]
    Watermark {
        /// Source table.
        table: String,
        /// Its transaction.
        xid: Xid,
        /// Its commit LSN.
        commit_lsn: Lsn,
        /// What is wrong and what to do.
        message: String,
    },
}

impl<E: Classify> Classify for HandoffError<E> {
    fn class(&self) -> ErrorClass {
        match self {
            HandoffError::Log(e) => e.class(),
            HandoffError::Watermark { .. } => ErrorClass::Definite,
        }
    }
}

/// A [`ShardLog`] that drops changes already contained in a table's copy.
pub struct SkipLog<L: ShardLog> {
    inner: Arc<L>,
    handoff: Arc<Handoff>,
}

impl<L: ShardLog> SkipLog<L> {
    /// Wraps `inner`, dropping what `handoff` says the copy holds.
    pub fn new(inner: Arc<L>, handoff: Arc<Handoff>) -> SkipLog<L> {
        SkipLog { inner, handoff }
    }
}

impl<L: ShardLog> ShardLog for SkipLog<L> {
    type Reader = SkipReader<L::Reader>;
    type Error = L::Error;

    fn open_reader(&self, shard: ShardId, after: Lsn) -> Result<Self::Reader, Self::Error> {
        Ok(SkipReader {
            inner: self.inner.open_reader(shard, after)?,
            handoff: self.handoff.clone(),
            commit_lsn: Lsn::ZERO,
            xid: 0,
            more: VecDeque::new(),
        })
    }

    fn applied(&self, shard: ShardId, commit_lsn: Lsn) {
        self.inner.applied(shard, commit_lsn)
    }
}

/// Reader of a [`SkipLog`].
pub struct SkipReader<R: ShardReader> {
    inner: R,
    handoff: Arc<Handoff>,
    commit_lsn: Lsn,
    xid: Xid,
    /// Events made from one input event, returned before the next is read.
    more: VecDeque<ShardEvent>,
}

type Filtered<E> = Result<Option<ShardEvent>, HandoffError<E>>;

impl<R: ShardReader> SkipReader<R> {
    fn skipped(&self, namespace: &str, name: &str) -> bool {
        if self.handoff.skip_until.is_empty() {
            return false;
        }
        let key = crate::pg::sql::TableName::new(namespace, name);
        self.handoff
            .skip_until
            .get(&key)
            .is_some_and(|l| self.commit_lsn < *l)
    }

    /// The chunk windows of `rel` while the stream is still inside them.
    fn windows(&self, rel: &Relation) -> Option<&Arc<TableWindows>> {
        if self.handoff.windows.is_empty() {
            return None;
        }
        self.handoff
            .windows
            .get(&crate::pg::sql::TableName::new(
                rel.namespace.clone(),
                rel.name.clone(),
            ))
            .filter(|w| !w.past(self.commit_lsn))
    }

    fn error(&self, rel: &Relation, message: String) -> HandoffError<R::Error> {
        HandoffError::Watermark {
            table: rel.qualified_name(),
            xid: self.xid,
            commit_lsn: self.commit_lsn,
            message,
        }
    }

    /// The chunk key of a row of `rel`.
    fn key(
        &self,
        w: &TableWindows,
        rel: &Relation,
        row: &[Value],
    ) -> Result<Key, HandoffError<R::Error>> {
        let mut key = Vec::with_capacity(w.key_columns.len());
        for name in &w.key_columns {
            let Some(i) = rel.columns.iter().position(|c| &c.name == name) else {
                return Err(self.error(rel, format!("the stream's relation has no key column {name}, which the watermark chunks were cut on")));
            };
            let v = match row.get(i) {
                Some(Value::Text(t)) => parse_key_text(t),
                Some(Value::Binary(b)) => parse_key_binary(b),
                _ => None,
            };
            match v {
                Some(v) => key.push(v),
                None => return Err(self.error(rel, format!("key column {name} has no integer value in the change; its chunk cannot be found"))),
            }
        }
        Ok(key)
    }

    fn sees(&self, w: &TableWindows, key: &[i64]) -> bool {
        w.sees(key, self.xid, self.commit_lsn)
    }

    /// A row change of a watermark-loaded table: kept, dropped or reduced to the half the
    /// copy lacks.
    fn filter_windowed(&self, w: &TableWindows, c: Change) -> Filtered<R::Error> {
        match c {
            Change::Insert { ref rel, ref new } => {
                let k = self.key(w, rel, new)?;
                Ok((!self.sees(w, &k)).then_some(ShardEvent::Change(c)))
            }
            Change::Delete { ref rel, ref old } => {
                let k = self.key(w, rel, old.row())?;
                Ok((!self.sees(w, &k)).then_some(ShardEvent::Change(c)))
            }
            Change::Update { rel, old, new } => {
                let new_key = self.key(w, &rel, &new)?;
                let old_key = match &old {
                    Some(o) => self.key(w, &rel, o.row())?,
                    None => new_key.clone(),
                };
                match (self.sees(w, &old_key), self.sees(w, &new_key)) {
                    (true, true) => Ok(None),
                    (false, false) => {
                        Ok(Some(ShardEvent::Change(Change::Update { rel, old, new })))
                    }
                    // The old key's chunk has the row gone, the new key's chunk lacks it.
                    (true, false) => {
                        if new.iter().any(|v| matches!(v, Value::UnchangedToast)) {
                            return Err(self.error(&rel, format!("an UPDATE moved the key from {old_key:?} to {new_key:?} between two watermark chunks and did not send every column (unchanged TOAST); load this table in [snapshot] mode = \"exported\"")));
                        }
                        Ok(Some(ShardEvent::Change(Change::Insert { rel, new })))
                    }
                    // The old key's chunk still has the row, the new key's chunk has it too.
                    (false, true) => {
                        let old = old.unwrap_or(OldRow::Key(new));
                        Ok(Some(ShardEvent::Change(Change::Delete { rel, old })))
                    }
                }
            }
            other => Ok(Some(ShardEvent::Change(other))),
        }
    }

    /// The event with already-copied changes removed (`None` to drop it whole).
    fn filter(&mut self, ev: ShardEvent) -> Filtered<R::Error> {
        match ev {
            ShardEvent::Begin(b) => {
                self.commit_lsn = b.commit_lsn;
                self.xid = b.xid;
                Ok(Some(ShardEvent::Begin(b)))
            }
            ShardEvent::Change(Change::Truncate {
                rels,
                cascade,
                restart_identity,
            }) => {
                let mut kept = Vec::with_capacity(rels.len());
                for r in rels {
                    if self.skipped(&r.namespace, &r.name) {
                        continue;
                    }
                    if let Some(w) = self.windows(&r).cloned() {
                        let ranges = w.unseen_ranges(self.xid, self.commit_lsn);
                        if ranges
                            .first()
                            .is_some_and(|g| g.0.is_none() && g.1.is_none())
                        {
                            kept.push(r);
                            continue;
                        }
                        for (after, upto) in ranges {
                            self.more.push_back(ShardEvent::Change(Change::DeleteRange {
                                rel: r.clone(),
                                key: w.key_columns.clone(),
                                after,
                                upto,
                            }));
                        }
                        continue;
                    }
                    kept.push(r);
                }
                if kept.is_empty() {
                    Ok(self.more.pop_front())
                } else {
                    Ok(Some(ShardEvent::Change(Change::Truncate {
                        rels: kept,
                        cascade,
                        restart_identity,
                    })))
                }
            }
            ShardEvent::Change(c) => match c.relation() {
                Some(rel) if self.skipped(&rel.namespace, &rel.name) => Ok(None),
                Some(rel) => match self.windows(rel).cloned() {
                    Some(w) => self.filter_windowed(&w, c),
                    None => Ok(Some(ShardEvent::Change(c))),
                },
                None => Ok(Some(ShardEvent::Change(c))),
            },
            other => Ok(Some(other)),
        }
    }
}

impl<R: ShardReader> ShardReader for SkipReader<R> {
    type Error = HandoffError<R::Error>;

    async fn next(&mut self) -> Result<ShardEvent, Self::Error> {
        loop {
            if let Some(ev) = self.more.pop_front() {
                return Ok(ev);
            }
            // Cancel-safe: the inner `next` is, and filtering happens after it completed (what
            // one event turns into waits in `more`).
            let ev = self.inner.next().await.map_err(HandoffError::Log)?;
            if self.handoff.is_empty() {
                return Ok(ev);
            }
            if let Some(ev) = self.filter(ev)? {
                return Ok(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Begin, Column, ReplicaIdentity, TableId};
    use crate::snapshot::window::{ChunkWindow, XidSnapshot};
    use bytes::Bytes;

    struct Nothing;
    #[derive(Debug, thiserror::Error)]
    #[error("unused")]
    struct Never;
    impl crate::error::Classify for Never {
        fn class(&self) -> crate::error::ErrorClass {
            crate::error::ErrorClass::Definite
        }
    }
    impl ShardReader for Nothing {
        type Error = Never;
        async fn next(&mut self) -> Result<ShardEvent, Never> {
            Err(Never)
        }
    }

    fn rel(name: &str) -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(1),
            namespace: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                is_key: true,
            }],
        })
    }

    fn reader(handoff: Handoff) -> SkipReader<Nothing> {
        SkipReader {
            inner: Nothing,
            handoff: Arc::new(handoff),
            commit_lsn: Lsn::ZERO,
            xid: 0,
            more: VecDeque::new(),
        }
    }

    fn begin(xid: u32, l: u64) -> ShardEvent {
        ShardEvent::Begin(Begin {
            xid,
            commit_lsn: Lsn::from_u64(l),
            commit_time: 0,
        })
    }

    fn ins(n: &str, id: i64) -> ShardEvent {
        ShardEvent::Change(Change::Insert {
            rel: rel(n),
            new: vec![Value::Text(Bytes::from(id.to_string()))],
        })
    }

    #[test]
    fn drops_only_copied_changes() {
        let mut skip = HashMap::new();
        skip.insert(
            crate::pg::sql::TableName::new("public", "a"),
            Lsn::from_u64(100),
        );
        let mut r = reader(Handoff {
            skip_until: skip,
            windows: HashMap::new(),
        });
        let mut f = |ev| r.filter(ev).unwrap();
        assert!(f(begin(1, 99)).is_some());
        assert!(
            f(ins("a", 1)).is_none(),
            "a committed below 100 is in the copy"
        );
        assert!(f(ins("b", 1)).is_some(), "b is not skipped");
        // See: issue #11 item 3. A snapshot exported at consistent point 100 does not hold a
        // commit record that starts exactly at 100: the walsender sends it, CDC applies it.
        assert!(f(begin(1, 100)).is_some());
        assert!(f(ins("a", 1)).is_some(), "a committed at 100 is CDC's");
        assert!(f(begin(1, 101)).is_some());
        assert!(f(ins("a", 1)).is_some(), "a after 100 is CDC's");
        f(begin(1, 50));
        let t = ShardEvent::Change(Change::Truncate {
            rels: vec![rel("a"), rel("b")],
            cascade: false,
            restart_identity: false,
        });
        match f(t) {
            Some(ShardEvent::Change(Change::Truncate { rels, .. })) => {
                assert_eq!(rels.len(), 1);
                assert_eq!(rels[0].name, "b");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Two chunks of `public.w`: keys up to 10 read under `100:100:` (high 1000), the rest
    /// under `200:202:200` (high 2000).
    fn windowed() -> SkipReader<Nothing> {
        let c = |last: Option<i64>, s: &str, high: u64| ChunkWindow {
            last: last.map(|l| vec![l]),
            snapshot: XidSnapshot::parse(s).unwrap(),
            high: Lsn::from_u64(high),
        };
        let w = TableWindows::new(
            vec!["id".into()],
            vec![c(Some(10), "100:100:", 1000), c(None, "200:202:200", 2000)],
        )
        .unwrap();
        let mut windows = HashMap::new();
        windows.insert(crate::pg::sql::TableName::new("public", "w"), Arc::new(w));
        reader(Handoff {
            skip_until: HashMap::new(),
            windows,
        })
    }

    #[test]
    fn a_chunk_drops_exactly_the_transactions_its_snapshot_saw() {
        let mut r = windowed();
        let mut f = |ev| r.filter(ev).unwrap();
        f(begin(150, 1500));
        assert!(f(ins("w", 5)).is_some(), "chunk 0 was read before xid 150");
        assert!(f(ins("w", 50)).is_none(), "chunk 1 saw xid 150");
        assert!(f(ins("other", 50)).is_some(), "not a watermark table");
        f(begin(200, 1900));
        assert!(
            f(ins("w", 50)).is_some(),
            "200 was running at chunk 1's read"
        );
        f(begin(199, 2000));
        assert!(
            f(ins("w", 50)).is_some(),
            "at the high watermark: after the chunk"
        );
    }

    fn upd(old: Option<i64>, new: i64, toast: bool) -> ShardEvent {
        let mut row = vec![Value::Text(Bytes::from(new.to_string()))];
        if toast {
            row.push(Value::UnchangedToast);
        }
        ShardEvent::Change(Change::Update {
            rel: rel("w"),
            old: old.map(|o| OldRow::Key(vec![Value::Text(Bytes::from(o.to_string()))])),
            new: row,
        })
    }

    #[test]
    fn a_key_moved_between_chunks_keeps_the_half_the_copy_lacks() {
        let mut r = windowed();
        r.filter(begin(150, 1500)).unwrap();
        // Chunk 0 (key 5) did not see 150, chunk 1 (key 50) did: both rows are on the shard.
        match r.filter(upd(Some(5), 50, false)).unwrap() {
            Some(ShardEvent::Change(Change::Delete { old, .. })) => {
                assert_eq!(old, OldRow::Key(vec![Value::Text(Bytes::from("5"))]));
            }
            other => panic!("{other:?}"),
        }
        // The other way round: neither row is on the shard; the new one is inserted.
        match r.filter(upd(Some(50), 5, false)).unwrap() {
            Some(ShardEvent::Change(Change::Insert { new, .. })) => assert_eq!(new.len(), 1),
            other => panic!("{other:?}"),
        }
        let e = r.filter(upd(Some(50), 5, true)).unwrap_err().to_string();
        assert!(e.contains("public.w") && e.contains("exported"), "{e}");
        // Same key: the chunk decides as for any change.
        assert!(r.filter(upd(None, 50, true)).unwrap().is_none());
        assert!(matches!(
            r.filter(upd(None, 5, true)).unwrap(),
            Some(ShardEvent::Change(Change::Update { .. }))
        ));
    }

    #[test]
    fn a_truncate_is_dropped_kept_or_cut_to_the_chunks_read_before_it() {
        let mut r = windowed();
        let t = |rels: Vec<Arc<Relation>>| {
            ShardEvent::Change(Change::Truncate {
                rels,
                cascade: false,
                restart_identity: false,
            })
        };
        r.filter(begin(99, 900)).unwrap();
        assert!(
            r.filter(t(vec![rel("w")])).unwrap().is_none(),
            "both chunks saw it"
        );
        r.filter(begin(300, 2500)).unwrap();
        assert!(
            r.filter(t(vec![rel("w")])).unwrap().is_some(),
            "after every chunk"
        );
        // Chunk 0 (keys up to 10) was read before xid 150, chunk 1 after it: the TRUNCATE of
        // `w` removes chunk 0's keys only; `other` is truncated whole, first.
        r.filter(begin(150, 1500)).unwrap();
        match r.filter(t(vec![rel("w"), rel("other")])).unwrap() {
            Some(ShardEvent::Change(Change::Truncate { rels, .. })) => {
                assert_eq!(rels.len(), 1);
                assert_eq!(rels[0].name, "other");
            }
            other => panic!("{other:?}"),
        }
        match r.more.pop_front() {
            Some(ShardEvent::Change(Change::DeleteRange {
                rel,
                key,
                after,
                upto,
            })) => {
                assert_eq!(rel.name, "w");
                assert_eq!(key, vec!["id".to_owned()]);
                assert_eq!((after, upto), (None, Some(vec![10])));
            }
            other => panic!("{other:?}"),
        }
        assert!(r.more.is_empty());
        // Only `w`: the range delete is the event itself.
        assert!(matches!(
            r.filter(t(vec![rel("w")])).unwrap(),
            Some(ShardEvent::Change(Change::DeleteRange { .. }))
        ));
        let bad = ShardEvent::Change(Change::Insert {
            rel: rel("w"),
            new: vec![Value::Null],
        });
        assert!(r.filter(bad).is_err());
    }
}
