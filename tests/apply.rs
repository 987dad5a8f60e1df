//! Per-shard apply against a real PostgreSQL target, fed by the in-memory shard log with
//! hand-built relations and changes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reshard_engine::apply::memlog::MemLog;
use reshard_engine::apply::{
    ApplyError, ApplyOptions, ApplyState, PgConnect, ShardApplier, ShardStatus,
};
use reshard_engine::event::{
    Begin, Change, Column, Commit, OldRow, PgTimestamp, Relation, ReplicaIdentity, ShardEvent,
    ShardId, TableId, Value,
};
use reshard_engine::pg::progress::read_progress;
use reshard_engine::shutdown::ShutdownTx;
use reshard_engine::Lsn;
use reshard_harness::PgCluster;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const SHARD: ShardId = ShardId(0);

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

const N: Value = Value::Null;
const U: Value = Value::UnchangedToast;

fn rel(id: u32, name: &str, ri: ReplicaIdentity, cols: &[(&str, bool)]) -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(id),
        namespace: "public".into(),
        name: name.into(),
        replica_identity: ri,
        columns: cols
            .iter()
            .map(|(n, k)| Column {
                name: (*n).into(),
                type_oid: 25,
                type_modifier: -1,
                is_key: *k,
            })
            .collect(),
    })
}

fn lsn(n: u64) -> Lsn {
    Lsn::from_u64(0x1000_0000 + n * 0x100)
}

fn ins(rel: &Arc<Relation>, row: Vec<Value>) -> Change {
    Change::Insert {
        rel: rel.clone(),
        new: row,
    }
}

fn upd(rel: &Arc<Relation>, old: Option<OldRow>, row: Vec<Value>) -> Change {
    Change::Update {
        rel: rel.clone(),
        old,
        new: row,
    }
}

fn del(rel: &Arc<Relation>, old: OldRow) -> Change {
    Change::Delete {
        rel: rel.clone(),
        old,
    }
}

/// Sends one source transaction with commit LSN `lsn(n)`, committed on the source 1 ms ago.
async fn txn(log: &MemLog, n: u64, changes: Vec<Change>) {
    txn_at(log, n, changes, reshard_engine::event::pg_now() - 1_000).await
}

/// [`txn`] committed on the source at `commit_time`.
async fn txn_at(log: &MemLog, n: u64, changes: Vec<Change>, commit_time: PgTimestamp) {
    log.send(
        SHARD,
        ShardEvent::Begin(Begin {
            xid: n as u32,
            commit_lsn: lsn(n),
            commit_time,
        }),
    )
    .await
    .unwrap();
    for c in changes {
        log.send(SHARD, ShardEvent::Change(c)).await.unwrap();
    }
    log.send(
        SHARD,
        ShardEvent::Commit(Commit {
            xid: n as u32,
            commit_lsn: lsn(n),
            end_lsn: lsn(n).add_bytes(0x10),
            commit_time,
        }),
    )
    .await
    .unwrap();
}

fn opts() -> ApplyOptions {
    ApplyOptions {
        shard_name: "shard-a".into(),
        source_system_id: "7300000000000000001".into(),
        slot: "reshard_test".into(),
        batch_max_delay_ms: 20,
        retry_initial_ms: 50,
        retry_max_ms: 500,
        ..ApplyOptions::default()
    }
}

struct Running {
    handle: JoinHandle<Result<(), ApplyError>>,
    shutdown: ShutdownTx,
    status: watch::Receiver<ShardStatus>,
}

impl Running {
    /// Waits until the shard's durable progress reaches `target`.
    async fn wait_applied(&mut self, target: Lsn) -> ShardStatus {
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.status
                .wait_for(|s| s.applied_commit_lsn >= target || s.state == ApplyState::Stopped),
        )
        .await;
        let s = match r {
            Ok(Ok(s)) => s.clone(),
            _ => {
                drop(r);
                panic!("shard did not reach {target}: {:?}", *self.status.borrow())
            }
        };
        assert!(s.applied_commit_lsn >= target, "shard stopped: {s:?}");
        s
    }

    async fn stop(self) -> (Result<(), ApplyError>, ShardStatus) {
        self.shutdown.shutdown();
        let r = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("applier did not stop")
            .expect("applier panicked");
        let s = self.status.borrow().clone();
        (r, s)
    }
}

fn start(pg: &PgCluster, db: &str, log: Arc<MemLog>, opts: ApplyOptions) -> Running {
    let config: tokio_postgres::Config = pg.url(db).parse().unwrap();
    let applier = ShardApplier::new(opts, PgConnect(config), log);
    let (shutdown, shutdown_rx) = reshard_engine::shutdown::channel();
    let (status_tx, status) = watch::channel(ShardStatus::default());
    let handle = tokio::spawn(applier.run(shutdown_rx, status_tx));
    Running {
        handle,
        shutdown,
        status,
    }
}

async fn client(pg: &PgCluster, db: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&pg.url(db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    c
}

/// Rows of `sql` as `|`-joined text (NULL as `∅`).
async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("∅").to_owned())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

fn target(schema: &str) -> PgCluster {
    let pg = PgCluster::start().unwrap();
    pg.create_database("shard").unwrap();
    pg.psql("shard", schema).unwrap();
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_key_inserts_updates_deletes_and_truncate() {
    let pg = target(
        "CREATE TABLE public.items (a int, b text, v text, PRIMARY KEY (a, b));
         CREATE TABLE public.other (id int PRIMARY KEY, x text);",
    );
    let items = rel(
        1,
        "items",
        ReplicaIdentity::Default,
        &[("a", true), ("b", true), ("v", false)],
    );
    let other = rel(
        2,
        "other",
        ReplicaIdentity::Default,
        &[("id", true), ("x", false)],
    );
    let key = |a: &str, b: &str| OldRow::Key(vec![t(a), t(b), N]);
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&items, vec![t("1"), t("x"), t("one")]),
            ins(&items, vec![t("1"), t("y"), t("two")]),
            ins(&items, vec![t("2"), t("x"), t("three")]),
            ins(&items, vec![t("3"), t("z"), t("gone")]),
            ins(&other, vec![t("1"), t("o")]),
        ],
    )
    .await;
    txn(
        &log,
        2,
        vec![
            upd(&items, None, vec![t("1"), t("x"), t("one-b")]),
            del(&items, key("1", "y")),
            // Insert then update in one batch: an insert of the updated row.
            ins(&items, vec![t("4"), t("w"), t("four")]),
            upd(&items, None, vec![t("4"), t("w"), t("four-b")]),
            // Delete then insert: an upsert.
            del(&items, key("2", "x")),
            ins(&items, vec![t("2"), t("x"), t("three-b")]),
            // Insert then delete: nothing.
            ins(&items, vec![t("5"), t("q"), t("never")]),
            del(&items, key("5", "q")),
            // Key change.
            upd(
                &items,
                Some(key("3", "z")),
                vec![t("3"), t("zz"), t("moved")],
            ),
        ],
    )
    .await;
    let truncate = Change::Truncate {
        rels: vec![other.clone()],
        cascade: false,
        restart_identity: false,
    };
    txn(
        &log,
        3,
        vec![
            ins(&other, vec![t("2"), t("p")]),
            truncate,
            ins(&other, vec![t("3"), t("after")]),
        ],
    )
    .await;
    let mut run = start(&pg, "shard", log.clone(), opts());
    let st = run.wait_applied(lsn(3)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT a, b, v FROM items ORDER BY a, b").await,
        vec!["1|x|one-b", "2|x|three-b", "3|zz|moved", "4|w|four-b"]
    );
    assert_eq!(rows(&c, "SELECT id, x FROM other").await, vec!["3|after"]);
    assert_eq!(st.txns_applied, 3);
    assert_eq!(st.rows_inserted, 10);
    assert_eq!(st.rows_deleted, 3);
    assert_eq!(st.truncates, 1);
    assert_eq!(log.applied_lsn(SHARD), Some(lsn(3)));
    let p = read_progress(&c, "reshard_test", "shard-a", Some("7300000000000000001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.commit_lsn, lsn(3));
    assert_eq!(p.end_lsn, lsn(3).add_bytes(0x10));
    assert!(p.commit_time.is_some());
    let (r, st) = run.stop().await;
    r.unwrap();
    assert_eq!(st.state, ApplyState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_with_and_without_target_pk() {
    let pg = target(
        "CREATE TABLE public.nopk (a int, b text);
         CREATE TABLE public.withpk (a int PRIMARY KEY, b text);",
    );
    let cols = [("a", true), ("b", true)];
    let nopk = rel(1, "nopk", ReplicaIdentity::Full, &cols);
    let withpk = rel(2, "withpk", ReplicaIdentity::Full, &cols);
    let log = Arc::new(MemLog::new(1024));
    let full = |a: &str, b: Value| OldRow::Full(vec![t(a), b]);
    for r in [&nopk, &withpk] {
        txn(
            &log,
            if r.name == "nopk" { 1 } else { 2 },
            vec![
                ins(r, vec![t("1"), t("one")]),
                ins(r, vec![t("2"), N]),
                ins(r, vec![t("3"), t("three")]),
            ],
        )
        .await;
    }
    for (n, r) in [(3, &nopk), (4, &withpk)] {
        txn(
            &log,
            n,
            vec![
                upd(r, Some(full("1", t("one"))), vec![t("1"), t("uno")]),
                // A NULL in the old row still matches (IS NOT DISTINCT FROM).
                upd(r, Some(full("2", N)), vec![t("2"), t("dos")]),
                del(r, full("3", t("three"))),
            ],
        )
        .await;
    }
    let mut run = start(&pg, "shard", log, opts());
    run.wait_applied(lsn(4)).await;
    let c = client(&pg, "shard").await;
    for table in ["nopk", "withpk"] {
        assert_eq!(
            rows(&c, &format!("SELECT a, b FROM {table} ORDER BY a")).await,
            vec!["1|uno", "2|dos"],
            "{table}"
        );
    }
    run.stop().await.0.unwrap();
}

// See: issue #11 item 4.
/// REPLICA IDENTITY FULL and no key on the target: identical rows are distinct rows, and each
/// source UPDATE or DELETE affects exactly one of them, as on the source — also when a run of
/// such changes to identical rows lands in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_without_key_changes_exactly_one_of_identical_rows() {
    let pg = target(
        "CREATE TABLE public.audit (a int, msg text);
         CREATE TABLE public.other (id int PRIMARY KEY, x text);",
    );
    let audit = rel(
        1,
        "audit",
        ReplicaIdentity::Full,
        &[("a", true), ("msg", true)],
    );
    // A keyed table in the same batch stays set-based and correct.
    let other = rel(
        2,
        "other",
        ReplicaIdentity::Default,
        &[("id", true), ("x", false)],
    );
    let full = |a: &str, m: &str| OldRow::Full(vec![t(a), t(m)]);
    let row = |a: &str, m: &str| vec![t(a), t(m)];
    let log = Arc::new(MemLog::new(1024));
    let mut seed = Vec::new();
    for (a, m, copies) in [
        ("1", "a", 3),
        ("2", "b", 2),
        ("3", "x", 3),
        ("4", "y", 2),
        ("5", "n", 2),
    ] {
        for _ in 0..copies {
            seed.push(ins(&audit, row(a, m)));
        }
    }
    txn(&log, 1, seed).await;
    // Applied first on its own, so that the next batch meets existing duplicates.
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(1)).await;
    run.stop().await.0.unwrap();
    // One batch of changes to identical rows.
    txn(&log, 2, vec![del(&audit, full("1", "a"))]).await;
    txn(
        &log,
        3,
        vec![upd(&audit, Some(full("2", "b")), row("2", "c"))],
    )
    .await;
    // Delete then insert of an identical row: still two.
    txn(
        &log,
        4,
        vec![
            ins(&other, vec![t("1"), t("one")]),
            del(&audit, full("1", "a")),
            ins(&audit, row("1", "a")),
            upd(&other, None, vec![t("1"), t("uno")]),
            ins(&other, vec![t("2"), t("two")]),
        ],
    )
    .await;
    // Two deletes of identical rows: two of three go.
    txn(
        &log,
        5,
        vec![del(&audit, full("3", "x")), del(&audit, full("3", "x"))],
    )
    .await;
    // Two updates of the same one of two identical rows.
    txn(
        &log,
        6,
        vec![
            upd(&audit, Some(full("4", "y")), row("4", "z")),
            upd(&audit, Some(full("4", "z")), row("4", "w")),
        ],
    )
    .await;
    // Insert of a third copy, then delete of one: still two.
    txn(
        &log,
        7,
        vec![ins(&audit, row("5", "n")), del(&audit, full("5", "n"))],
    )
    .await;
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(7)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(
            &c,
            "SELECT a, msg, count(*) FROM audit GROUP BY 1, 2 ORDER BY 1, 2"
        )
        .await,
        vec!["1|a|2", "2|b|1", "2|c|1", "3|x|1", "4|w|1", "4|y|1", "5|n|2"]
    );
    assert_eq!(
        rows(&c, "SELECT id, x FROM other ORDER BY id").await,
        vec!["1|uno", "2|two"]
    );
    run.stop().await.0.unwrap();
}

// See: issue #11 item 5.
/// An UPDATE of another column of a row whose key is stored out of line arrives with the key as
/// unchanged TOAST in the new tuple and the key value in the old key tuple (what PostgreSQL
/// sends for a REPLICA IDENTITY with external values): the row is found and updated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_the_key_as_unchanged_toast_finds_the_row() {
    let pg = target(
        "CREATE TABLE public.docs (id text PRIMARY KEY, title text, body text);
         CREATE TABLE public.notes (id text, title text);",
    );
    let docs = rel(
        1,
        "docs",
        ReplicaIdentity::Default,
        &[("id", true), ("title", false), ("body", false)],
    );
    // No target key: matched by the source's replica identity.
    let notes = rel(
        2,
        "notes",
        ReplicaIdentity::Index,
        &[("id", true), ("title", false)],
    );
    let big: String = (0..3000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&docs, vec![t(&big), t("t1"), t("b1")]),
            ins(&docs, vec![t("small"), t("s1"), t("b1")]),
            ins(&notes, vec![t(&big), t("n1")]),
        ],
    )
    .await;
    // The rows exist before the updates' batch (else they fold into the inserts).
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(1)).await;
    txn(
        &log,
        2,
        vec![
            upd(
                &docs,
                Some(OldRow::Key(vec![t(&big), N, N])),
                vec![U, t("t2"), U],
            ),
            upd(
                &notes,
                Some(OldRow::Key(vec![t(&big), N])),
                vec![U, t("n2")],
            ),
        ],
    )
    .await;
    // Then once more, alone in its batch and after a change that folds with it.
    txn(
        &log,
        3,
        vec![
            upd(&docs, None, vec![t("small"), t("s2"), U]),
            upd(
                &docs,
                Some(OldRow::Key(vec![t(&big), N, N])),
                vec![U, U, t("b3")],
            ),
        ],
    )
    .await;
    run.wait_applied(lsn(3)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT length(id), title, body FROM docs ORDER BY 1").await,
        vec!["5|s2|b1", "3000|t2|b3"]
    );
    assert_eq!(
        rows(&c, "SELECT length(id), title FROM notes").await,
        vec!["3000|n2"]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_column_keeps_the_target_value() {
    let pg = target("CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text);");
    let docs = rel(
        1,
        "docs",
        ReplicaIdentity::Default,
        &[("id", true), ("title", false), ("body", false)],
    );
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&docs, vec![t("1"), t("t1"), t(&big)]),
            ins(&docs, vec![t("2"), t("t2"), t(&big)]),
        ],
    )
    .await;
    txn(
        &log,
        2,
        vec![
            // Carries only the title; body is unchanged TOAST and must be left as is.
            upd(&docs, None, vec![t("1"), t("t1-new"), U]),
            // Two updates with different carried columns fold into one.
            upd(&docs, None, vec![t("2"), t("t2-new"), U]),
            upd(&docs, None, vec![t("2"), U, t("short")]),
        ],
    )
    .await;
    let mut run = start(&pg, "shard", log, opts());
    run.wait_applied(lsn(2)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT id, title, length(body), body = left(repeat('abcdefghijklmnopqrstuvwxyz', 7693), 200000) FROM docs ORDER BY id").await,
        vec!["1|t1-new|200000|t", "2|t2-new|5|f"]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_many_types_round_trip_in_text_form() {
    let pg = target(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TABLE public.vals (id int PRIMARY KEY, i int, n numeric, j jsonb, arr int[],
            by bytea, m mood, r int4range, d posint, ts timestamptz, tx text, nul text,
            tarr text[], iv interval, u uuid);",
    );
    let names = [
        "id", "i", "n", "j", "arr", "by", "m", "r", "d", "ts", "tx", "nul", "tarr", "iv", "u",
    ];
    let cols: Vec<(&str, bool)> = names.iter().map(|n| (*n, *n == "id")).collect();
    let vals = rel(1, "vals", ReplicaIdentity::Default, &cols);
    // The text forms PostgreSQL itself prints (with TimeZone = UTC).
    let texts = [
        "-2147483648",
        "1.50000000000000000001",
        r#"{"a": [1, 2], "b": "x\ty\\z", "c": null}"#,
        "{1,2}",
        r"\x00ff5c0a",
        "happy",
        "[1,5)",
        "7",
        "2024-01-02 03:04:05.123456+00",
        "tab\there\nnewline\rcr\\back'quote \\N",
        "",
        r#"{"a\\b","c\"d",NULL,"e,f"}"#,
        "1 year 2 mons 3 days 04:05:06.789",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ];
    let row = |id: &str| {
        let mut r = vec![t(id)];
        for (i, v) in texts.iter().enumerate() {
            // Column "nul" (index 11 of the row) is NULL; column "tx" is the tricky text.
            if i == 10 {
                r.push(N);
            } else {
                r.push(t(v));
            }
        }
        r
    };
    let log = Arc::new(MemLog::new(1024));
    // Row 1 goes through the set-based COPY path; row 2 through the literal (ordered) path,
    // forced by a duplicate insert that cannot be folded.
    txn(&log, 1, vec![ins(&vals, row("1"))]).await;
    txn(&log, 2, vec![ins(&vals, row("2")), ins(&vals, row("2"))]).await;
    let mut run = start(&pg, "shard", log, opts());
    run.wait_applied(lsn(2)).await;
    let c = client(&pg, "shard").await;
    let select: Vec<String> = names.iter().map(|n| format!("{n}::text")).collect();
    let got = rows(
        &c,
        &format!("SELECT {} FROM vals ORDER BY id", select.join(", ")),
    )
    .await;
    let mut expect: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    expect[10] = "∅".into();
    for (id, line) in got.iter().enumerate() {
        let mut want = vec![(id + 1).to_string()];
        want.extend(expect.iter().cloned());
        assert_eq!(line, &want.join("|"), "row {}", id + 1);
    }
    assert_eq!(got.len(), 2);
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_identity_and_default_columns_are_filled_by_the_target() {
    let pg = target(
        "CREATE TABLE public.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            price numeric, qty int,
            total numeric GENERATED ALWAYS AS (price * qty) STORED,
            created text NOT NULL DEFAULT 'dflt', note text);",
    );
    let orders = rel(
        1,
        "orders",
        ReplicaIdentity::Default,
        &[("id", true), ("price", false), ("qty", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&orders, vec![t("10"), t("2.50"), t("4")]),
            ins(&orders, vec![t("11"), t("1"), t("1")]),
        ],
    )
    .await;
    txn(&log, 2, vec![upd(&orders, None, vec![t("11"), t("3"), U])]).await;
    let mut run = start(&pg, "shard", log, opts());
    run.wait_applied(lsn(2)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(
            &c,
            "SELECT id, price, qty, total, created, note FROM orders ORDER BY id"
        )
        .await,
        vec!["10|2.50|4|10.00|dflt|∅", "11|3|1|3|dflt|∅"]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_unique_values_are_replayed_in_source_order() {
    let pg = target("CREATE TABLE public.users (id int PRIMARY KEY, email text UNIQUE);");
    let users = rel(
        1,
        "users",
        ReplicaIdentity::Default,
        &[("id", true), ("email", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&users, vec![t("1"), t("a@x")]),
            ins(&users, vec![t("2"), t("b@x")]),
        ],
    )
    .await;
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(1)).await;
    // Swap the emails through a temporary value, as the source did; with enough other rows in
    // the transaction that it goes set-based (a small group is written change by change).
    let mut swap = vec![
        upd(&users, None, vec![t("1"), t("tmp@x")]),
        upd(&users, None, vec![t("2"), t("a@x")]),
        upd(&users, None, vec![t("1"), t("b@x")]),
    ];
    for k in 100..150 {
        swap.push(ins(&users, vec![t(&k.to_string()), t(&format!("{k}@x"))]));
    }
    txn(&log, 2, swap).await;
    let st = run.wait_applied(lsn(2)).await;
    assert!(st.replays >= 1, "expected a replay: {st:?}");
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT id, email FROM users WHERE id < 100 ORDER BY id").await,
        vec!["1|b@x", "2|a@x"]
    );
    assert_eq!(
        rows(&c, "SELECT count(*) FROM users WHERE id >= 100").await,
        vec!["50"]
    );
    run.stop().await.0.unwrap();
}

/// A new key of a primary-key table goes straight into the target table (COPY or a plain
/// INSERT, no ON CONFLICT). When the shard already holds the key (here the application wrote
/// it; in a migration, a load or move overlapping the stream), the primary key refuses it and
/// the flush is replayed from the log as an upsert: never an error, never a lost or repeated
/// row. The table then merges for a while, without another replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_already_on_the_shard_is_replayed_as_an_upsert() {
    let pg = target(
        "CREATE TABLE public.users (id int PRIMARY KEY, v text);
         CREATE TABLE public.items (id int PRIMARY KEY, v text);
         INSERT INTO users VALUES (5, 'app');
         INSERT INTO items VALUES (1500, 'app');",
    );
    let users = rel(
        1,
        "users",
        ReplicaIdentity::Default,
        &[("id", true), ("v", false)],
    );
    let items = rel(
        2,
        "items",
        ReplicaIdentity::Default,
        &[("id", true), ("v", false)],
    );
    let log = Arc::new(MemLog::new(1 << 16));
    // A small flush: the rows inline, in a plain INSERT.
    let small = (1..=10).map(|k| ins(&users, vec![t(&k.to_string()), t("src")]));
    txn(&log, 1, small.collect()).await;
    let mut run = start(&pg, "shard", log.clone(), opts());
    let st = run.wait_applied(lsn(1)).await;
    assert_eq!(st.replays, 1, "the direct insert met id 5: {st:?}");
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(
            &c,
            "SELECT count(*), count(*) FILTER (WHERE v = 'src') FROM users"
        )
        .await,
        vec!["10|10"]
    );

    // A large flush: the rows by COPY into the target table.
    let large = (1001..=2200).map(|k| ins(&items, vec![t(&k.to_string()), t("src")]));
    txn(&log, 2, large.collect()).await;
    let st = run.wait_applied(lsn(2)).await;
    assert_eq!(st.replays, 2, "the direct COPY met id 1500: {st:?}");
    assert_eq!(
        rows(
            &c,
            "SELECT count(*), count(*) FILTER (WHERE v = 'src') FROM items"
        )
        .await,
        vec!["1200|1200"]
    );

    // users merges its inserts after its conflict: another key already there is no replay.
    c.batch_execute("INSERT INTO users VALUES (12, 'app')")
        .await
        .unwrap();
    txn(
        &log,
        3,
        vec![
            ins(&users, vec![t("12"), t("src")]),
            ins(&users, vec![t("13"), t("src")]),
        ],
    )
    .await;
    let st = run.wait_applied(lsn(3)).await;
    assert_eq!(st.replays, 2, "{st:?}");
    assert_eq!(
        rows(&c, "SELECT id, v FROM users WHERE id > 10 ORDER BY id").await,
        vec!["12|src", "13|src"]
    );
    assert_eq!(st.rows_inserted, 1212, "{st:?}");
    run.stop().await.0.unwrap();
}

/// Under load a full group's last request (merge statements, progress row, COMMIT) is left in
/// flight while the next group is read. A constraint error in it (here a unique swap, set-based)
/// surfaces when the answer is read, and is replayed from the log in source order like any
/// failed flush: nothing lost, nothing applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_in_a_commit_left_in_flight_is_replayed_from_the_log() {
    let pg = target("CREATE TABLE public.users (id int PRIMARY KEY, email text UNIQUE);");
    let users = rel(
        1,
        "users",
        ReplicaIdentity::Default,
        &[("id", true), ("email", false)],
    );
    let log = Arc::new(MemLog::new(1 << 16));
    let user = |k: u32| ins(&users, vec![t(&k.to_string()), t(&format!("{k}@x"))]);
    // 150 rows: the first 100 flushed into the open target transaction, the rest ride with
    // the (full) group's commit.
    txn(&log, 1, (1..=150).map(user).collect()).await;
    let mut swap: Vec<Change> = (200..317).map(user).collect();
    swap.push(upd(&users, None, vec![t("1"), t("tmp@x")]));
    swap.push(upd(&users, None, vec![t("2"), t("1@x")]));
    swap.push(upd(&users, None, vec![t("1"), t("2@x")]));
    txn(&log, 2, swap).await;
    txn(&log, 3, vec![user(500)]).await;
    let o = ApplyOptions {
        batch_max_rows: 100,
        ..opts()
    };
    let mut run = start(&pg, "shard", log.clone(), o);
    let st = run.wait_applied(lsn(3)).await;
    assert!(st.replays >= 1, "expected a replay: {st:?}");
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT id, email FROM users WHERE id <= 2 ORDER BY id").await,
        vec!["1|2@x", "2|1@x"]
    );
    assert_eq!(
        rows(&c, "SELECT count(*), count(DISTINCT email) FROM users").await,
        vec!["268|268"]
    );
    run.stop().await.0.unwrap();
}

/// Waits until the shard's durable progress reaches `target`, at most `within`.
async fn applied_within(run: &mut Running, target: Lsn, within: Duration) -> ShardStatus {
    let r = tokio::time::timeout(
        within,
        run.status.wait_for(|s| s.applied_commit_lsn >= target),
    )
    .await;
    match r {
        Ok(Ok(s)) => s.clone(),
        _ => {
            drop(r);
            panic!(
                "shard did not reach {target} within {within:?}: {:?}",
                *run.status.borrow()
            )
        }
    }
}

// See: issue #14 (a caught-up shard should not wait out a batching delay when nothing else is
// coming).
/// A shard whose log has nothing more to read commits what it has at once, whatever
/// `batch_max_delay_ms` says; transactions already queued together still go in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_shard_commits_at_once_and_batches_only_what_is_queued() {
    let pg = target("CREATE TABLE public.kv (k int PRIMARY KEY, v text);");
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let o = ApplyOptions {
        batch_max_delay_ms: 600_000,
        ..opts()
    };
    // Five transactions queued before the applier starts: one target transaction.
    let log = Arc::new(MemLog::new(1024));
    for n in 1..=5 {
        txn(&log, n, vec![ins(&kv, vec![t(&n.to_string()), t("v")])]).await;
    }
    let mut run = start(&pg, "shard", log.clone(), o);
    let st = applied_within(&mut run, lsn(5), Duration::from_secs(30)).await;
    assert_eq!((st.batches, st.txns_applied), (1, 5), "{st:?}");
    // Then one at a time, each alone in the log: each is committed without waiting.
    for n in 6..=8 {
        txn(&log, n, vec![ins(&kv, vec![t(&n.to_string()), t("v")])]).await;
        let st = applied_within(&mut run, lsn(n), Duration::from_secs(30)).await;
        assert_eq!(st.batches, n - 4, "{st:?}");
    }
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT count(*) FROM kv").await, vec!["8"]);
    run.stop().await.0.unwrap();
}

/// A shard draining a backlog (its transactions committed on the source long ago) keeps its
/// group open up to `catchup_batch_ms` for the transactions still coming, instead of
/// committing each time its log is momentarily empty: fewer, larger target transactions. With
/// `catchup_batch_ms = 0` the same backlog goes one target transaction per source transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_catching_up_holds_its_group_open_for_the_next_transactions() {
    let pg = PgCluster::start().unwrap();
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    // Committed on the source a minute ago: the shard is a minute behind.
    let old = reshard_engine::event::pg_now() - 60_000_000;
    for (db, hold, want_batches) in [("nohold", 0, 4), ("hold", 5_000, 1)] {
        pg.create_database(db).unwrap();
        pg.psql(db, "CREATE TABLE public.kv (k int PRIMARY KEY, v text);")
            .unwrap();
        let c = client(&pg, db).await;
        let o = ApplyOptions {
            batch_max_delay_ms: 600_000,
            catchup_batch_ms: hold,
            ..opts()
        };
        let log = Arc::new(MemLog::new(1024));
        let mut run = start(&pg, db, log.clone(), o);
        for n in 1..=4 {
            txn_at(
                &log,
                n,
                vec![ins(&kv, vec![t(&n.to_string()), t("v")])],
                old,
            )
            .await;
            if hold == 0 {
                applied_within(&mut run, lsn(n), Duration::from_secs(30)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let st = applied_within(&mut run, lsn(4), Duration::from_secs(30)).await;
        assert_eq!(
            (st.batches, st.txns_applied),
            (want_batches, 4),
            "catchup_batch_ms = {hold}: {st:?}"
        );
        assert_eq!(rows(&c, "SELECT count(*) FROM kv").await, vec!["4"]);
        run.stop().await.0.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_exactly_after_progress() {
    // No key on either side: a duplicate apply would show as a duplicate row.
    let pg = target("CREATE TABLE public.events (n int, payload text);");
    let events = rel(
        1,
        "events",
        ReplicaIdentity::Default,
        &[("n", false), ("payload", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    for n in 1..=10 {
        txn(&log, n, vec![ins(&events, vec![t(&n.to_string()), t("p")])]).await;
    }
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(10)).await;
    run.stop().await.0.unwrap();
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT count(*), sum(n) FROM events").await,
        vec!["10|55"]
    );

    // A log that delivers everything again from the start, plus two new transactions.
    let replay = Arc::new(MemLog::new(1024).replay_everything());
    for n in 1..=12 {
        txn(
            &replay,
            n,
            vec![ins(&events, vec![t(&n.to_string()), t("p")])],
        )
        .await;
    }
    let mut run = start(&pg, "shard", replay.clone(), opts());
    let st = run.wait_applied(lsn(12)).await;
    assert_eq!(st.txns_applied, 2, "only the two new transactions: {st:?}");
    run.stop().await.0.unwrap();
    assert_eq!(
        rows(&c, "SELECT count(*), sum(n), count(DISTINCT n) FROM events").await,
        vec!["12|78|12"]
    );
    let p = read_progress(&c, "reshard_test", "shard-a", Some("7300000000000000001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.commit_lsn, lsn(12));
}

// See: issue #12 (a table new in the publication's scope, or not yet created on a shard, must
// not stop the shard for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_table_waits_for_ddl_with_a_named_error_then_resumes() {
    let pg = target("CREATE TABLE public.present (id int PRIMARY KEY);");
    let missing = rel(1, "absent", ReplicaIdentity::Default, &[("id", true)]);
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&missing, vec![t("1")])]).await;
    let mut run = start(&pg, "shard", log, opts());
    let st = tokio::time::timeout(
        Duration::from_secs(30),
        run.status
            .wait_for(|s| s.state == ApplyState::WaitingForDdl),
    )
    .await
    .expect("the shard shows it waits for DDL")
    .unwrap()
    .clone();
    let msg = st.last_error.clone().unwrap_or_default();
    assert!(msg.contains("shard-a"), "{msg}");
    assert!(msg.contains("public.absent"), "{msg}");
    assert!(msg.contains("42P01"), "{msg}");
    assert!(msg.contains("waiting for DDL"), "{msg}");
    assert_eq!(st.applied_commit_lsn, Lsn::ZERO);
    assert!(
        !run.handle.is_finished(),
        "a shard waiting for DDL keeps running"
    );

    let c = client(&pg, "shard").await;
    c.batch_execute("CREATE TABLE public.absent (id int PRIMARY KEY)")
        .await
        .unwrap();
    run.wait_applied(lsn(1)).await;
    assert_eq!(rows(&c, "SELECT id FROM absent").await, vec!["1"]);
    assert_eq!(run.status.borrow().state, ApplyState::Running);
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_restart_mid_run_is_retried_and_completes() {
    let mut pg = target("CREATE TABLE public.kv (k int PRIMARY KEY, v text);");
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    for n in 1..=5 {
        txn(&log, n, vec![ins(&kv, vec![t(&n.to_string()), t("v")])]).await;
    }
    let mut run = start(&pg, "shard", log.clone(), opts());
    run.wait_applied(lsn(5)).await;
    pg.stop().unwrap();
    for n in 6..=10 {
        txn(&log, n, vec![ins(&kv, vec![t(&n.to_string()), t("v")])]).await;
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        run.status.wait_for(|s| s.state == ApplyState::Retrying),
    )
    .await
    .expect("no retry while the shard is down")
    .unwrap();
    pg.restart().unwrap();
    let st = run.wait_applied(lsn(10)).await;
    assert!(st.retries >= 1);
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT count(*), sum(k) FROM kv").await,
        vec!["10|55"]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transaction_is_flushed_in_pieces_and_committed_once() {
    let pg = target("CREATE TABLE public.big (id int PRIMARY KEY, v text);");
    let big = rel(
        1,
        "big",
        ReplicaIdentity::Default,
        &[("id", true), ("v", false)],
    );
    // A small log capacity: the test's sender waits for the applier, like the spill log.
    let log = Arc::new(MemLog::new(4096));
    let mut run = start(&pg, "shard", log.clone(), opts());
    const ROWS: u64 = 200_000;
    let commit_time = reshard_engine::event::pg_now();
    log.send(
        SHARD,
        ShardEvent::Begin(Begin {
            xid: 1,
            commit_lsn: lsn(1),
            commit_time,
        }),
    )
    .await
    .unwrap();
    for i in 0..ROWS {
        let c = ins(&big, vec![t(&i.to_string()), t("row")]);
        log.send(SHARD, ShardEvent::Change(c)).await.unwrap();
    }
    // Touch rows flushed long ago, inside the same source transaction.
    log.send(
        SHARD,
        ShardEvent::Change(upd(&big, None, vec![t("5"), t("updated")])),
    )
    .await
    .unwrap();
    log.send(
        SHARD,
        ShardEvent::Change(del(&big, OldRow::Key(vec![t("6"), N]))),
    )
    .await
    .unwrap();
    // The applier has written (at least) 19 pieces into its open target transaction, yet
    // nothing is visible before the source Commit arrives.
    tokio::time::timeout(
        Duration::from_secs(60),
        run.status.wait_for(|s| s.flushes >= 19),
    )
    .await
    .expect("the large transaction was not flushed in pieces")
    .unwrap();
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT count(*) FROM big").await, vec!["0"]);
    log.send(
        SHARD,
        ShardEvent::Commit(Commit {
            xid: 1,
            commit_lsn: lsn(1),
            end_lsn: lsn(1).add_bytes(0x10),
            commit_time,
        }),
    )
    .await
    .unwrap();
    let st = run.wait_applied(lsn(1)).await;
    assert_eq!(st.batches, 1, "{st:?}");
    assert!(
        st.flushes >= 20,
        "flushed in pieces of at most 10k rows: {st:?}"
    );
    assert_eq!(
        rows(
            &c,
            "SELECT count(*), count(DISTINCT xmin::text), max(id), \
             (SELECT v FROM big WHERE id = 5), (SELECT count(*) FROM big WHERE id = 6) FROM big"
        )
        .await,
        vec![format!("{}|1|{}|updated|0", ROWS - 1, ROWS - 1)]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shard_records_heartbeat_progress() {
    let pg = target("SELECT 1;");
    let log = Arc::new(MemLog::new(16));
    let mut run = start(&pg, "shard", log.clone(), opts());
    log.send(SHARD, ShardEvent::Heartbeat(lsn(42)))
        .await
        .unwrap();
    let st = run.wait_applied(lsn(42)).await;
    assert_eq!(st.txns_applied, 0);
    assert_eq!(st.batches, 0);
    let c = client(&pg, "shard").await;
    let p = read_progress(&c, "reshard_test", "shard-a", Some("7300000000000000001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.commit_lsn, lsn(42));
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creators_of_the_progress_table_all_succeed() {
    let pg = target("SELECT 1;");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = client(&pg, "shard").await;
        tasks.push(tokio::spawn(async move {
            reshard_engine::pg::progress::ensure_progress_table(&c).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let c = client(&pg, "shard").await;
    assert_eq!(
        read_progress(&c, "y", "z", Some("x")).await.unwrap(),
        None,
        "no row yet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_inside_a_transaction_flushed_in_pieces_is_replayed_from_the_log() {
    let pg = target("CREATE TABLE public.users (id int PRIMARY KEY, email text UNIQUE);");
    let users = rel(
        1,
        "users",
        ReplicaIdentity::Default,
        &[("id", true), ("email", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(
        &log,
        1,
        vec![
            ins(&users, vec![t("1"), t("a@x")]),
            ins(&users, vec![t("2"), t("b@x")]),
        ],
    )
    .await;
    let o = ApplyOptions {
        batch_max_rows: 3,
        ..opts()
    };
    let mut run = start(&pg, "shard", log.clone(), o);
    run.wait_applied(lsn(1)).await;
    // One source transaction, written in pieces of three changes: the swap lands in the second
    // piece, after a piece already written into the open target transaction.
    txn(
        &log,
        2,
        vec![
            ins(&users, vec![t("10"), t("c@x")]),
            ins(&users, vec![t("11"), t("d@x")]),
            ins(&users, vec![t("12"), t("e@x")]),
            upd(&users, None, vec![t("1"), t("tmp@x")]),
            upd(&users, None, vec![t("2"), t("a@x")]),
            upd(&users, None, vec![t("1"), t("b@x")]),
            ins(&users, vec![t("13"), t("f@x")]),
        ],
    )
    .await;
    txn(&log, 3, vec![ins(&users, vec![t("14"), t("g@x")])]).await;
    let st = run.wait_applied(lsn(3)).await;
    assert!(st.replays >= 1, "{st:?}");
    let c = client(&pg, "shard").await;
    assert_eq!(
        rows(&c, "SELECT id, email FROM users ORDER BY id").await,
        vec!["1|b@x", "2|a@x", "10|c@x", "11|d@x", "12|e@x", "13|f@x", "14|g@x"]
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_error_that_replay_also_hits_names_the_row() {
    let pg =
        target("CREATE TABLE public.acct (id int PRIMARY KEY, balance int CHECK (balance >= 0));");
    let acct = rel(
        1,
        "acct",
        ReplicaIdentity::Default,
        &[("id", true), ("balance", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&acct, vec![t("1"), t("5")])]).await;
    txn(
        &log,
        2,
        vec![
            ins(&acct, vec![t("2"), t("7")]),
            ins(&acct, vec![t("3"), t("-1")]),
        ],
    )
    .await;
    let run = start(&pg, "shard", log, opts());
    let r = tokio::time::timeout(Duration::from_secs(30), run.handle)
        .await
        .unwrap()
        .unwrap();
    let msg = r.unwrap_err().to_string();
    for part in [
        "shard-a",
        "public.acct",
        "(id)=(3)",
        "23514",
        &lsn(2).to_string(),
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
    let st = run.status.borrow().clone();
    assert_eq!(st.state, ApplyState::Stopped);
    // The first transaction stays applied; nothing of the failed one is.
    assert_eq!(st.applied_commit_lsn, lsn(1));
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT id FROM acct ORDER BY id").await, vec!["1"]);
}

/// Like [`start`], with a PAUSE switch (`true` pauses) and the applier's latency histogram.
fn start_pausable(
    pg: &PgCluster,
    log: Arc<MemLog>,
    opts: ApplyOptions,
) -> (
    Running,
    watch::Sender<bool>,
    reshard_engine::apply::LatencyHistogram,
) {
    let config: tokio_postgres::Config = pg.url("shard").parse().unwrap();
    let (pause_tx, pause_rx) = watch::channel(false);
    let applier = ShardApplier::new(opts, PgConnect(config), log).with_pause(pause_rx);
    let latency = applier.latency_histogram();
    let (shutdown, shutdown_rx) = reshard_engine::shutdown::channel();
    let (status_tx, status) = watch::channel(ShardStatus::default());
    let run = Running {
        handle: tokio::spawn(applier.run(shutdown_rx, status_tx)),
        shutdown,
        status,
    };
    (run, pause_tx, latency)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_shard_stops_committing_until_resumed() {
    let pg = target("CREATE TABLE public.kv (k int PRIMARY KEY, v text);");
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&kv, vec![t("1"), t("v")])]).await;
    let (mut run, pause_tx, latency) = start_pausable(&pg, log.clone(), opts());
    run.wait_applied(lsn(1)).await;
    pause_tx.send(true).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        run.status.wait_for(|s| s.state == ApplyState::Paused),
    )
    .await
    .unwrap()
    .unwrap();
    txn(&log, 2, vec![ins(&kv, vec![t("2"), t("v")])]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT count(*) FROM kv").await, vec!["1"]);
    assert_eq!(run.status.borrow().applied_commit_lsn, lsn(1));
    pause_tx.send(false).unwrap();
    run.wait_applied(lsn(2)).await;
    assert_eq!(rows(&c, "SELECT count(*) FROM kv").await, vec!["2"]);
    assert_eq!(
        latency.lock().unwrap().len(),
        2,
        "one latency sample per transaction"
    );
    run.stop().await.0.unwrap();
}

/// An idle shard's heartbeat read just before PAUSE stays unwritten while the shard is paused:
/// a paused shard's progress stands still (the console test once saw it move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_shard_does_not_write_a_pending_heartbeat() {
    let pg = target("CREATE TABLE public.kv (k int PRIMARY KEY, v text);");
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&kv, vec![t("1"), t("v")])]).await;
    let o = ApplyOptions {
        heartbeat_interval_ms: 600,
        ..opts()
    };
    let (mut run, pause_tx, _) = start_pausable(&pg, log.clone(), o);
    run.wait_applied(lsn(1)).await;
    // Read at once but not written yet: the last progress write was just now.
    log.send(SHARD, ShardEvent::Heartbeat(lsn(50)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pause_tx.send(true).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        run.status.wait_for(|s| s.state == ApplyState::Paused),
    )
    .await
    .unwrap()
    .unwrap();
    // Well past the heartbeat interval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        run.status.borrow().applied_commit_lsn,
        lsn(1),
        "a paused shard wrote a heartbeat"
    );
    let c = client(&pg, "shard").await;
    let p = read_progress(&c, "reshard_test", "shard-a", Some("7300000000000000001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.commit_lsn, lsn(1));
    pause_tx.send(false).unwrap();
    run.wait_applied(lsn(50)).await;
    run.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_complete_transactions_and_rolls_back_a_partly_written_one() {
    let pg = target("CREATE TABLE public.kv (k int PRIMARY KEY, v text);");
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let o = ApplyOptions {
        batch_max_rows: 3,
        batch_max_delay_ms: 60_000,
        ..opts()
    };

    // 1. A complete transaction waiting for its batch delay, then an open one not written
    //    yet: shutdown commits the first and drops the second.
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&kv, vec![t("1"), t("v")])]).await;
    let begin = |n: u64| {
        ShardEvent::Begin(Begin {
            xid: n as u32,
            commit_lsn: lsn(n),
            commit_time: reshard_engine::event::pg_now(),
        })
    };
    log.send(SHARD, begin(2)).await.unwrap();
    log.send(SHARD, ShardEvent::Change(ins(&kv, vec![t("2"), t("v")])))
        .await
        .unwrap();
    let mut run = start(&pg, "shard", log.clone(), o.clone());
    tokio::time::timeout(
        Duration::from_secs(10),
        run.status.wait_for(|s| s.state == ApplyState::Running),
    )
    .await
    .unwrap()
    .unwrap();
    // Wait until the applier has taken both transactions' events.
    tokio::time::timeout(Duration::from_secs(10), async {
        while log.unread(SHARD) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the applier did not read the log");
    assert_eq!(
        run.status.borrow().applied_commit_lsn,
        Lsn::ZERO,
        "batch delay not over yet"
    );
    let (r, st) = run.stop().await;
    r.unwrap();
    assert_eq!(st.applied_commit_lsn, lsn(1), "{st:?}");
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT k FROM kv ORDER BY k").await, vec!["1"]);

    // 2. An open transaction already partly written into the target transaction (more
    //    changes than batch_max_rows): shutdown rolls it all back.
    let log = Arc::new(MemLog::new(1024));
    log.send(SHARD, begin(2)).await.unwrap();
    for k in 2..10 {
        log.send(
            SHARD,
            ShardEvent::Change(ins(&kv, vec![t(&k.to_string()), t("v")])),
        )
        .await
        .unwrap();
    }
    let mut run = start(&pg, "shard", log, o);
    tokio::time::timeout(
        Duration::from_secs(10),
        run.status.wait_for(|s| s.flushes >= 2),
    )
    .await
    .expect("the open transaction was not written in pieces")
    .unwrap();
    let (r, st) = run.stop().await;
    r.unwrap();
    assert_eq!(st.applied_commit_lsn, lsn(1));
    assert_eq!(rows(&c, "SELECT k FROM kv ORDER BY k").await, vec!["1"]);
    let p = read_progress(&c, "reshard_test", "shard-a", Some("7300000000000000001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.commit_lsn, lsn(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_without_replica_permission_falls_back_and_applies() {
    let pg = target(
        "CREATE TABLE public.kv (k int PRIMARY KEY, v text);
         CREATE ROLE applier LOGIN;
         GRANT CREATE ON DATABASE shard TO applier;
         GRANT ALL ON public.kv TO applier;",
    );
    let kv = rel(
        1,
        "kv",
        ReplicaIdentity::Default,
        &[("k", true), ("v", false)],
    );
    let log = Arc::new(MemLog::new(1024));
    txn(&log, 1, vec![ins(&kv, vec![t("1"), t("v")])]).await;
    let mut config: tokio_postgres::Config = pg.url("shard").parse().unwrap();
    config.user("applier");
    let applier = ShardApplier::new(opts(), PgConnect(config), log);
    let (shutdown, shutdown_rx) = reshard_engine::shutdown::channel();
    let (status_tx, status) = watch::channel(ShardStatus::default());
    let mut run = Running {
        handle: tokio::spawn(applier.run(shutdown_rx, status_tx)),
        shutdown,
        status,
    };
    run.wait_applied(lsn(1)).await;
    let c = client(&pg, "shard").await;
    assert_eq!(rows(&c, "SELECT k, v FROM kv").await, vec!["1|v"]);
    run.stop().await.0.unwrap();
}
