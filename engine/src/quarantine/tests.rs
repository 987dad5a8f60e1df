use super::*;
use crate::event::{Column, OldRow, ReplicaIdentity};

fn rel() -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(16384),
        namespace: "public".into(),
        name: "notes".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                is_key: true,
            },
            Column {
                name: "account_id".into(),
                type_oid: 20,
                type_modifier: -1,
                is_key: false,
            },
        ],
    })
}

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn begin(lsn: u64) -> Begin {
    Begin {
        xid: 7,
        commit_lsn: Lsn::from_u64(lsn),
        commit_time: 1,
    }
}

fn insert(id: &str, account: Value) -> Change {
    Change::Insert {
        rel: rel(),
        new: vec![t(id), account],
    }
}

#[test]
fn records_survive_reopen_and_hold_later_changes_of_their_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Quarantine::open(dir.path(), Lsn::ZERO).unwrap();
    q.append(&begin(0x100), insert("1", Value::Null), "NULL".into())
        .unwrap();
    q.commit_txn();
    q.sync().unwrap();
    let later = Change::Update {
        rel: rel(),
        old: None,
        new: vec![t("1"), t("5")],
    };
    assert!(q.holds(&later));
    assert!(!q.holds(&insert("2", t("5"))));

    // Reopen: the record is kept (committed before the durable LSN) and still holds its row.
    let q = Quarantine::open(dir.path(), Lsn::from_u64(0x200)).unwrap();
    assert!(q.holds(&later));
    let s = summarize_dir(&dir_of(dir.path())).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].table, "public.notes");
    assert_eq!(s[0].changes, 1);
    assert_eq!(s[0].sample, "insert (id=1)");

    // Reopen below it: the source resends that transaction, so the record goes.
    let q = Quarantine::open(dir.path(), Lsn::from_u64(0x100)).unwrap();
    assert!(!q.holds(&later));
    assert!(summarize_dir(&dir_of(dir.path())).unwrap().is_empty());
}

#[test]
fn an_aborted_transaction_leaves_nothing_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Quarantine::open(dir.path(), Lsn::ZERO).unwrap();
    q.append(&begin(0x100), insert("1", Value::Null), "NULL".into())
        .unwrap();
    q.commit_txn();
    q.append(&begin(0x200), insert("2", Value::Null), "NULL".into())
        .unwrap();
    q.abort_txn().unwrap();
    assert!(!q.holds(&insert("2", t("1"))));
    assert!(q.holds(&insert("1", t("1"))));
    let path = table_file(&dir_of(dir.path()), "public.notes");
    let (records, _) = read_file(&path).unwrap();
    assert_eq!(records.len(), 1);

    // A torn append: half a record at the end.
    let mut buf = Vec::new();
    Record {
        commit_lsn: Lsn::from_u64(0x300),
        commit_time: 0,
        xid: 1,
        reason: "x".into(),
        change: Change::Delete {
            rel: rel(),
            old: OldRow::Key(vec![t("3"), Value::Null]),
        },
    }
    .encode(&mut buf);
    let mut f = OpenOptionsExt::append(&path);
    f.write_all(&buf[..buf.len() / 2]).unwrap();
    drop(f);
    let (records, valid) = read_file(&path).unwrap();
    assert_eq!(records.len(), 1);
    assert!(valid < std::fs::metadata(&path).unwrap().len());
    let _q = Quarantine::open(dir.path(), Lsn::from_u64(u64::MAX)).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid);
}

struct OpenOptionsExt;
impl OpenOptionsExt {
    fn append(path: &Path) -> File {
        std::fs::OpenOptions::new().append(true).open(path).unwrap()
    }
}
