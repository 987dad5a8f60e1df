//! Folding a run of row changes of one table into at most one net change per key.
//!
//! In: the row changes of one table inside one flush unit, in source order, plus the positions
//! (in the source relation) of the columns that identify a row on the target (the match key).
//! Out: [`NetChange`]s in first-seen key order, at most one per key.
//!
//! Invariant: applying the net changes in any order across keys leaves the target exactly as
//! applying the source changes one by one would, as far as the match key is concerned (unique
//! constraints other than the key are the apply path's business: it falls back to an ordered
//! replay). Rules, per key:
//!
//! | pending   | then insert | then update `u`          | then delete |
//! |-----------|-------------|--------------------------|-------------|
//! | none      | insert      | update (carried columns) | delete      |
//! | insert    | *ordered*   | insert (merged)          | none        |
//! | upsert    | *ordered*   | upsert (merged)          | delete      |
//! | update    | *ordered*   | update (columns merged)  | delete      |
//! | delete    | upsert      | *ordered*                | delete      |
//!
//! A key value stored out of line and left unchanged arrives as unchanged TOAST in the new tuple;
//! it is taken from the old key tuple, so the staged row always carries its key.
//! Under REPLICA IDENTITY FULL without a target key ([`Fold::rows_may_repeat`]) rows may
//! repeat and nothing folds: inserts are kept, an update or delete takes the ordered path.
//!
//! *ordered* marks sequences the source cannot produce for a real key (a duplicate insert);
//! the fold then asks for the change-by-change path instead of guessing. An update that changes
//! the key becomes a delete of the old key and an insert of the new row; if that new row has
//! unchanged-TOAST columns the fold also asks for the ordered path, since the set-based path
//! cannot carry the old value over.

use crate::event::{Change, OldRow, Row, Value};

/// The net effect on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetChange {
    /// The key did not exist before the batch; the full new row.
    Insert(Row),
    /// The key existed and was deleted in the batch, then inserted again: the full new row.
    Upsert(Row),
    /// The key existed: set the columns that are not [`Value::UnchangedToast`].
    Update(Row),
    /// The key existed and is gone: a row whose key columns identify it (other values ignored).
    Delete(Row),
}

/// Why a change cannot be folded at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// An UPDATE or DELETE on a table with no match key.
    #[error("{kind} on a table without a replica identity or primary key: cannot find the row")]
    NoKey {
        /// `update` or `delete`.
        kind: &'static str,
    },
    /// A key column arrived as unchanged TOAST and no old tuple was sent.
    #[error("{kind}: key column #{column} arrived as unchanged TOAST without an old tuple")]
    KeyUnknown {
        /// `update` or `delete`.
        kind: &'static str,
        /// Position of the column in the source relation.
        column: usize,
    },
}

/// The folded changes of one table.
#[derive(Debug, Default)]
pub struct Folded {
    /// Net changes, in first-seen key order.
    pub changes: Vec<NetChange>,
    /// The sequence cannot be folded safely: apply the original changes one by one instead.
    pub needs_ordered: bool,
}

/// Folds changes of one table, one by one.
#[derive(Debug)]
pub struct Fold {
    key_idx: Vec<usize>,
    /// Several rows may hold the same key (REPLICA IDENTITY FULL without a target key).
    rows_may_repeat: bool,
    /// foldhash, not SipHash: hashing every key of a flush was 2 % of the daemon's CPU
    /// (issue #14); its per-map random seed still spreads crafted keys.
    index: foldhash::HashMap<Vec<Value>, usize>,
    nets: Vec<Option<NetChange>>,
    needs_ordered: bool,
}

impl Fold {
    /// A fold matching rows by the source columns at `key_idx` (empty: the table has no key, it
    /// can only take inserts).
    pub fn new(key_idx: Vec<usize>) -> Fold {
        Fold {
            key_idx,
            rows_may_repeat: false,
            index: foldhash::HashMap::default(),
            nets: Vec::new(),
            needs_ordered: false,
        }
    }

    /// A fold for a table whose match key is not unique (every column of a REPLICA IDENTITY
    /// FULL table without a target key): identical rows are distinct rows, and each UPDATE or
    /// DELETE changes exactly one of them, so nothing folds per key. Inserts are kept as they
    /// come; an UPDATE or DELETE asks for the ordered path, which matches one row per change.
    pub fn rows_may_repeat(key_idx: Vec<usize>) -> Fold {
        Fold {
            rows_may_repeat: true,
            ..Fold::new(key_idx)
        }
    }

    /// Number of pending net changes (including ones folded to nothing).
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Folds one change. TRUNCATE and messages are not row changes and are ignored here (the
    /// caller flushes before a TRUNCATE).
    pub fn push(&mut self, change: &Change) -> Result<(), FoldError> {
        match change {
            Change::Insert { new, .. } => {
                if self.key_idx.is_empty() || self.rows_may_repeat {
                    self.nets.push(Some(NetChange::Insert(new.clone())));
                    return Ok(());
                }
                let key = self.key_of(new, None, "insert")?;
                self.on_insert(key, new.clone());
            }
            Change::Update { old, new, .. } => {
                if self.key_idx.is_empty() {
                    return Err(FoldError::NoKey { kind: "update" });
                }
                if self.rows_may_repeat {
                    self.needs_ordered = true;
                    return Ok(());
                }
                let old_row = old.as_ref().map(OldRow::row);
                let new_key = self.key_of(new, old_row, "update")?;
                let old_key = match old_row {
                    Some(o) => self.key_of(o, None, "update")?,
                    None => new_key.clone(),
                };
                // A key value stored out of line and not changed arrives as unchanged TOAST in
                // the new tuple (its value is in the old key tuple): the staged row must carry
                // it, or the set-based UPDATE matches nothing.
                let mut row = new.clone();
                for (&i, k) in self.key_idx.iter().zip(&new_key) {
                    if let Some(v @ Value::UnchangedToast) = row.get_mut(i) {
                        *v = k.clone();
                    }
                }
                if old_key == new_key {
                    self.on_update(new_key, &row);
                } else {
                    // The key moved: the old key is deleted, the new one inserted. Carried-over
                    // TOAST values can be filled from a full old row; otherwise only the ordered
                    // path (a real UPDATE) can keep them.
                    for (i, v) in row.iter_mut().enumerate() {
                        if *v == Value::UnchangedToast {
                            match old {
                                Some(OldRow::Full(o)) => match o.get(i) {
                                    Some(ov) if *ov != Value::UnchangedToast => *v = ov.clone(),
                                    _ => self.needs_ordered = true,
                                },
                                _ => self.needs_ordered = true,
                            }
                        }
                    }
                    let old_full = old_row.cloned().unwrap_or_default();
                    self.on_delete(old_key, old_full);
                    self.on_insert(new_key, row);
                }
            }
            Change::Delete { old, .. } => {
                if self.key_idx.is_empty() {
                    return Err(FoldError::NoKey { kind: "delete" });
                }
                if self.rows_may_repeat {
                    self.needs_ordered = true;
                    return Ok(());
                }
                let key = self.key_of(old.row(), None, "delete")?;
                self.on_delete(key, old.row().clone());
            }
            Change::Truncate { .. } | Change::DeleteRange { .. } | Change::Message { .. } => {}
        }
        Ok(())
    }

    /// The net changes.
    pub fn finish(self) -> Folded {
        Folded {
            changes: self.nets.into_iter().flatten().collect(),
            needs_ordered: self.needs_ordered,
        }
    }

    /// The key of `row`; an unchanged-TOAST key value is taken from `fallback` (the old row).
    fn key_of(
        &self,
        row: &Row,
        fallback: Option<&Row>,
        kind: &'static str,
    ) -> Result<Vec<Value>, FoldError> {
        self.key_idx
            .iter()
            .map(|&i| match row.get(i) {
                Some(Value::UnchangedToast) | None => match fallback.and_then(|f| f.get(i)) {
                    Some(v) if *v != Value::UnchangedToast => Ok(v.clone()),
                    _ => Err(FoldError::KeyUnknown { kind, column: i }),
                },
                Some(v) => Ok(v.clone()),
            })
            .collect()
    }

    /// Replaces the net change of `key` with `next(previous)`, with one hash lookup; `None`
    /// forgets the key (a later change of it starts afresh, in a new position).
    fn update(
        &mut self,
        key: Vec<Value>,
        next: impl FnOnce(Option<NetChange>, &mut bool) -> Option<NetChange>,
    ) {
        use std::collections::hash_map::Entry;
        match self.index.entry(key) {
            Entry::Occupied(e) => {
                let i = *e.get();
                let prev = self.nets.get_mut(i).and_then(Option::take);
                let net = next(prev, &mut self.needs_ordered);
                if net.is_none() {
                    e.remove();
                }
                if let Some(s) = self.nets.get_mut(i) {
                    *s = net;
                }
            }
            Entry::Vacant(e) => {
                if let Some(net) = next(None, &mut self.needs_ordered) {
                    e.insert(self.nets.len());
                    self.nets.push(Some(net));
                }
            }
        }
    }

    fn on_insert(&mut self, key: Vec<Value>, row: Row) {
        self.update(key, |prev, needs_ordered| {
            Some(match prev {
                None => NetChange::Insert(row),
                Some(NetChange::Delete(_)) => NetChange::Upsert(row),
                Some(NetChange::Insert(_) | NetChange::Upsert(_) | NetChange::Update(_)) => {
                    // A duplicate key the source cannot have produced: keep the last row, and
                    // let the ordered path decide what the target says.
                    *needs_ordered = true;
                    NetChange::Upsert(row)
                }
            })
        });
    }

    fn on_update(&mut self, key: Vec<Value>, new: &Row) {
        self.update(key, |prev, needs_ordered| {
            Some(match prev {
                None => NetChange::Update(new.clone()),
                Some(NetChange::Insert(mut r)) => {
                    merge(&mut r, new);
                    NetChange::Insert(r)
                }
                Some(NetChange::Upsert(mut r)) => {
                    merge(&mut r, new);
                    NetChange::Upsert(r)
                }
                Some(NetChange::Update(mut r)) => {
                    merge(&mut r, new);
                    NetChange::Update(r)
                }
                Some(d @ NetChange::Delete(_)) => {
                    *needs_ordered = true;
                    d
                }
            })
        });
    }

    fn on_delete(&mut self, key: Vec<Value>, old: Row) {
        self.update(key, |prev, _| match prev {
            Some(NetChange::Insert(_)) => None,
            Some(NetChange::Upsert(_) | NetChange::Update(_) | NetChange::Delete(_)) | None => {
                Some(NetChange::Delete(old))
            }
        });
    }
}

/// Overwrites `base` with the values `upd` carries (its unchanged-TOAST values keep `base`'s).
fn merge(base: &mut Row, upd: &Row) {
    if base.len() < upd.len() {
        base.resize(upd.len(), Value::UnchangedToast);
    }
    for (b, u) in base.iter_mut().zip(upd) {
        if *u != Value::UnchangedToast {
            *b = u.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::event::{Column, Relation, ReplicaIdentity, TableId};

    fn rel() -> Arc<Relation> {
        let col = |n: &str, k| Column {
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: k,
        };
        Arc::new(Relation {
            id: TableId(1),
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", true), col("a", false), col("b", false)],
        })
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }
    const U: Value = Value::UnchangedToast;

    fn ins(id: &str, a: &str, b: &str) -> Change {
        Change::Insert {
            rel: rel(),
            new: vec![t(id), t(a), t(b)],
        }
    }
    fn upd(id: &str, a: Value, b: Value) -> Change {
        Change::Update {
            rel: rel(),
            old: None,
            new: vec![t(id), a, b],
        }
    }
    fn del(id: &str) -> Change {
        Change::Delete {
            rel: rel(),
            old: OldRow::Key(vec![t(id), Value::Null, Value::Null]),
        }
    }

    fn fold(changes: &[Change]) -> Folded {
        let mut f = Fold::new(vec![0]);
        for c in changes {
            f.push(c).unwrap();
        }
        f.finish()
    }

    #[test]
    fn insert_then_update_is_insert_of_updated_row() {
        let f = fold(&[ins("1", "a", "b"), upd("1", t("a2"), U)]);
        assert_eq!(
            f.changes,
            vec![NetChange::Insert(vec![t("1"), t("a2"), t("b")])]
        );
        assert!(!f.needs_ordered);
    }

    #[test]
    fn insert_then_delete_is_nothing_and_a_reinsert_is_an_insert() {
        let f = fold(&[ins("1", "a", "b"), del("1")]);
        assert!(f.changes.is_empty());
        let f = fold(&[ins("1", "a", "b"), del("1"), ins("1", "c", "d")]);
        assert_eq!(
            f.changes,
            vec![NetChange::Insert(vec![t("1"), t("c"), t("d")])]
        );
    }

    #[test]
    fn delete_then_insert_is_upsert_and_upsert_then_delete_is_delete() {
        let f = fold(&[del("1"), ins("1", "a", "b")]);
        assert_eq!(
            f.changes,
            vec![NetChange::Upsert(vec![t("1"), t("a"), t("b")])]
        );
        let f = fold(&[del("1"), ins("1", "a", "b"), del("1")]);
        assert!(matches!(f.changes.as_slice(), [NetChange::Delete(r)] if r[0] == t("1")));
    }

    #[test]
    fn updates_merge_carried_columns_and_keep_unchanged_toast() {
        let f = fold(&[upd("1", t("a1"), U), upd("1", U, Value::Null)]);
        assert_eq!(
            f.changes,
            vec![NetChange::Update(vec![t("1"), t("a1"), Value::Null])]
        );
        let f = fold(&[upd("1", U, t("b1")), upd("1", U, t("b2"))]);
        assert_eq!(f.changes, vec![NetChange::Update(vec![t("1"), U, t("b2")])]);
    }

    #[test]
    fn update_then_delete_is_delete() {
        let f = fold(&[upd("1", t("x"), t("y")), del("1")]);
        assert!(matches!(f.changes.as_slice(), [NetChange::Delete(_)]));
    }

    #[test]
    fn keys_are_independent_and_keep_first_seen_order() {
        let f = fold(&[
            ins("2", "a", "b"),
            ins("1", "a", "b"),
            upd("2", t("z"), U),
            del("3"),
        ]);
        let ids: Vec<_> = f
            .changes
            .iter()
            .map(|c| match c {
                NetChange::Insert(r)
                | NetChange::Upsert(r)
                | NetChange::Update(r)
                | NetChange::Delete(r) => r[0].clone(),
            })
            .collect();
        assert_eq!(ids, vec![t("2"), t("1"), t("3")]);
    }

    #[test]
    fn key_change_is_delete_plus_insert() {
        let c = Change::Update {
            rel: rel(),
            old: Some(OldRow::Key(vec![t("1"), Value::Null, Value::Null])),
            new: vec![t("9"), t("a"), t("b")],
        };
        let f = fold(&[ins("1", "a", "b"), c]);
        assert_eq!(
            f.changes,
            vec![NetChange::Insert(vec![t("9"), t("a"), t("b")])]
        );
        assert!(!f.needs_ordered);
    }

    #[test]
    fn key_change_with_unchanged_toast_needs_the_ordered_path() {
        let c = Change::Update {
            rel: rel(),
            old: Some(OldRow::Key(vec![t("1"), Value::Null, Value::Null])),
            new: vec![t("9"), U, t("b")],
        };
        assert!(fold(&[c]).needs_ordered);
    }

    #[test]
    fn duplicate_insert_and_update_after_delete_need_the_ordered_path() {
        assert!(fold(&[ins("1", "a", "b"), ins("1", "a", "b")]).needs_ordered);
        assert!(fold(&[del("1"), upd("1", t("a"), U)]).needs_ordered);
    }

    #[test]
    fn an_unchanged_toast_key_is_staged_with_the_old_key_value() {
        let c = Change::Update {
            rel: rel(),
            old: Some(OldRow::Key(vec![t("1"), Value::Null, Value::Null])),
            new: vec![U, t("a2"), U],
        };
        let f = fold(&[c]);
        assert_eq!(f.changes, vec![NetChange::Update(vec![t("1"), t("a2"), U])]);
        assert!(!f.needs_ordered);
    }

    #[test]
    fn repeating_rows_keep_every_insert_and_order_updates_and_deletes() {
        let mut f = Fold::rows_may_repeat(vec![0, 1, 2]);
        f.push(&ins("1", "a", "b")).unwrap();
        f.push(&ins("1", "a", "b")).unwrap();
        let f = f.finish();
        assert_eq!(f.changes.len(), 2);
        assert!(!f.needs_ordered);
        let full = OldRow::Full(vec![t("1"), t("a"), t("b")]);
        for c in [
            Change::Delete {
                rel: rel(),
                old: full.clone(),
            },
            Change::Update {
                rel: rel(),
                old: Some(full.clone()),
                new: vec![t("1"), t("a"), t("c")],
            },
        ] {
            let mut f = Fold::rows_may_repeat(vec![0, 1, 2]);
            f.push(&c).unwrap();
            assert!(f.finish().needs_ordered, "{c:?}");
        }
    }

    #[test]
    fn keyless_tables_take_inserts_only() {
        let mut f = Fold::new(vec![]);
        f.push(&ins("1", "a", "b")).unwrap();
        f.push(&ins("1", "a", "b")).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.push(&del("1")), Err(FoldError::NoKey { kind: "delete" }));
    }

    #[test]
    fn unknown_key_is_an_error_not_a_guess() {
        let mut f = Fold::new(vec![0]);
        let c = Change::Update {
            rel: rel(),
            old: None,
            new: vec![U, t("a"), t("b")],
        };
        assert_eq!(
            f.push(&c),
            Err(FoldError::KeyUnknown {
                kind: "update",
                column: 0
            })
        );
    }
}
