//! Decode stage against real pgoutput: the captured fixtures replay to their golden JSON, and a
//! live cluster's slot (read through the SQL interface) decodes with every field right.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use reshard_engine::decode::frame::split_frames;
use reshard_engine::decode::json::render_capture;
use reshard_engine::decode::{AssembleError, Assembler, AssemblerOptions, Decoder};
use reshard_engine::{Change, Lsn, OldRow, Relation, ReplicaIdentity, TxnEvent, Value};
use reshard_harness::PgCluster;
use tokio_postgres::{Client, NoTls};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pgoutput")
}

/// Every committed capture decodes, assembles and renders to exactly its committed golden file.
#[test]
fn fixtures_replay_to_their_golden_json() -> Result<()> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    bins.retain(|p| p.extension().is_some_and(|x| x == "bin"));
    bins.sort();
    ensure!(
        bins.len() >= 10,
        "expected the captured fixtures, found {bins:?}"
    );
    for bin in bins {
        let data = Bytes::from(std::fs::read(&bin)?);
        let frames = split_frames(&data).with_context(|| bin.display().to_string())?;
        let tmp = tempfile::tempdir()?;
        let got = render_capture(frames, 3, tmp.path())
            .with_context(|| format!("decoding {}", bin.display()))?;
        let golden_path =
            PathBuf::from(format!("{}.golden.jsonl", bin.with_extension("").display()));
        let want = std::fs::read_to_string(&golden_path)
            .with_context(|| golden_path.display().to_string())?;
        if got != want {
            let (n, (g, w)) = got
                .lines()
                .zip(want.lines())
                .enumerate()
                .find(|(_, (g, w))| g != w)
                .unwrap_or((0, ("<length differs>", "<length differs>")));
            bail!(
                "{} does not match {} at line {}:\n got: {g}\nwant: {w}",
                bin.display(),
                golden_path.display(),
                n + 1
            );
        }
        // The spool directory is cleaned up.
        ensure!(std::fs::read_dir(tmp.path())?.count() == 0);
    }
    Ok(())
}

/// What came out of the assembler, plus the raw message kinds seen.
struct Captured {
    tags: BTreeSet<u8>,
    events: Vec<(Lsn, TxnEvent)>,
}

impl Captured {
    /// The transactions, as (xid, changes).
    fn transactions(&self) -> Result<Vec<(u32, Vec<Change>)>> {
        let mut out = Vec::new();
        let mut open: Option<(u32, Lsn, Vec<Change>)> = None;
        let mut last_commit = Lsn::ZERO;
        for (_, ev) in &self.events {
            match ev {
                TxnEvent::Begin(b) => {
                    ensure!(open.is_none(), "Begin {} inside a transaction", b.xid);
                    open = Some((b.xid, b.commit_lsn, Vec::new()));
                }
                TxnEvent::Change(c) => open
                    .as_mut()
                    .ok_or_else(|| anyhow!("change outside a transaction"))?
                    .2
                    .push(c.clone()),
                TxnEvent::Commit(c) => {
                    let (xid, commit_lsn, changes) =
                        open.take().ok_or_else(|| anyhow!("Commit without Begin"))?;
                    ensure!(
                        xid == c.xid && commit_lsn == c.commit_lsn,
                        "Begin/Commit mismatch"
                    );
                    ensure!(
                        c.commit_lsn > last_commit,
                        "transactions out of commit order"
                    );
                    ensure!(c.end_lsn > c.commit_lsn);
                    last_commit = c.commit_lsn;
                    out.push((xid, changes));
                }
            }
        }
        ensure!(open.is_none(), "unterminated transaction");
        Ok(out)
    }

    /// Every change of a table, in order.
    fn changes_of(&self, table: &str) -> Result<Vec<Change>> {
        Ok(self
            .transactions()?
            .into_iter()
            .flat_map(|(_, c)| c)
            .filter(|c| c.relation().is_some_and(|r| r.name == table))
            .collect())
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn col(rel: &Relation, row: &[Value], name: &str) -> Result<Value> {
    let i = rel
        .column_index(name)
        .ok_or_else(|| anyhow!("no column {name} in {}", rel.name))?;
    row.get(i).cloned().ok_or_else(|| anyhow!("short row"))
}

/// Runs a batch, with the server's message in the error.
async fn exec(client: &Client, sql: &str) -> Result<()> {
    client.batch_execute(sql).await.map_err(|e| {
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string());
        anyhow!("{msg}\nSQL: {sql}")
    })
}

async fn connect(cluster: &PgCluster, db: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(&cluster.url(db), NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Reads the slot through the SQL interface and feeds the assembler.
async fn read_slot(client: &Client) -> Result<Captured> {
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('slot', NULL, NULL, \
             'proto_version', '3', 'publication_names', 'pub', 'messages', 'true', \
             'streaming', 'on', 'two_phase', 'on')",
            &[],
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let mut asm = Assembler::new(AssemblerOptions {
        stream_dir: dir.path().to_owned(),
        proto_version: 3,
    })?;
    let mut decoder = Decoder::new(3);
    let mut tags = BTreeSet::new();
    let mut events = Vec::new();
    for row in rows {
        let lsn: Lsn = row.get::<_, String>(0).parse()?;
        let data = Bytes::from(row.get::<_, Vec<u8>>(1));
        decoder.decode(&data)?;
        tags.insert(data[0]);
        asm.push(lsn, data, &mut |at, ev| {
            events.push((at, ev));
            Ok::<(), AssembleError>(())
        })?;
    }
    ensure!(asm.is_idle() && asm.open_streams() == 0 && asm.open_prepared() == 0);
    Ok(Captured { tags, events })
}

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE all_types (
    id bigint PRIMARY KEY, n numeric, f8 double precision, t text, by bytea, jb jsonb,
    tstz timestamptz, arr integer[], tarr text[], m mood, pos posint, rng int4range,
    nothing text
);
CREATE TABLE ri_full (id integer, v text, w integer);
ALTER TABLE ri_full REPLICA IDENTITY FULL;
CREATE TABLE ri_index (id integer NOT NULL, code text NOT NULL, v text);
CREATE UNIQUE INDEX ri_index_code ON ri_index (code);
ALTER TABLE ri_index REPLICA IDENTITY USING INDEX ri_index_code;
CREATE TABLE docs (id integer PRIMARY KEY, title text, body text);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE parent (id integer PRIMARY KEY);
CREATE TABLE child (id integer PRIMARY KEY, parent_id integer REFERENCES parent (id));
CREATE TABLE counter (id serial PRIMARY KEY);
CREATE TABLE big (id integer PRIMARY KEY, payload text);
CREATE TABLE small (id integer PRIMARY KEY);
CREATE TABLE tp (id integer PRIMARY KEY, v text);
CREATE TABLE o (id integer PRIMARY KEY);
CREATE PUBLICATION pub FOR ALL TABLES;
"#;

const TYPE_COLUMNS: &[&str] = &[
    "id", "n", "f8", "t", "by", "jb", "tstz", "arr", "tarr", "m", "pos", "rng", "nothing",
];

/// Every pgoutput message kind, produced by a live PostgreSQL and read through the SQL
/// interface, arrives decoded and assembled with every field right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_slot_decodes_every_message_kind_with_every_field_right() -> Result<()> {
    let cluster = PgCluster::builder()
        .setting("logical_decoding_work_mem", "64kB")
        .start()?;
    cluster.create_database("live")?;
    // The SQL interface decodes only flushed WAL; the harness defaults to asynchronous commit.
    cluster.psql(
        "postgres",
        "ALTER DATABASE live SET synchronous_commit = on",
    )?;
    let a = connect(&cluster, "live").await?;
    let b = connect(&cluster, "live").await?;
    exec(&a, SCHEMA).await?;
    a.query(
        "SELECT pg_create_logical_replication_slot('slot', 'pgoutput', false, true)",
        &[],
    )
    .await?;

    // Types: remember the server's own text form of each inserted value.
    exec(
        &a,
        r#"INSERT INTO all_types VALUES (1, '12345678901234567890.000000000001', 'NaN',
           E'tab\there "q" ünï 🐘', '\x00ff', '{"b": [1, null], "a": "x"}',
           '2024-02-29 12:34:56.789+05', '{1,NULL,3}', '{"a b",NULL,"c\"d"}', 'happy', 42,
           '[3,7)', NULL)"#,
    )
    .await?;
    let mut expected_types = Vec::new();
    for c in TYPE_COLUMNS {
        let row = a
            .query_one(
                &format!("SELECT {c}::text FROM all_types WHERE id = 1"),
                &[],
            )
            .await?;
        expected_types.push(row.get::<_, Option<String>>(0));
    }
    let mood_oid: u32 = a
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await?
        .get(0);
    exec(&a, "UPDATE all_types SET t = 'updated' WHERE id = 1").await?;

    // Replica identity FULL and USING INDEX.
    exec(
        &a,
        "INSERT INTO ri_full VALUES (1, 'one', NULL);
         UPDATE ri_full SET v = 'uno' WHERE id = 1;
         DELETE FROM ri_full WHERE id = 1;
         INSERT INTO ri_index VALUES (1, 'A', 'x');
         UPDATE ri_index SET code = 'B' WHERE code = 'A';
         DELETE FROM ri_index WHERE code = 'B';",
    )
    .await?;

    // Unchanged TOAST.
    exec(&a,
        "INSERT INTO docs VALUES (1, 'first', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) i));
         UPDATE docs SET title = 'second' WHERE id = 1;",
    )
    .await?;

    // Truncate.
    exec(&a,
        "INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1); INSERT INTO counter DEFAULT VALUES;
         TRUNCATE counter, small RESTART IDENTITY;
         TRUNCATE parent CASCADE;",
    )
    .await?;

    // Logical messages.
    exec(
        &a,
        "SELECT pg_logical_emit_message(false, 'live/nontx', 'skipped');
         BEGIN;
         SELECT pg_logical_emit_message(true, 'live/tx', 'hello');
         INSERT INTO small VALUES (100);
         COMMIT;",
    )
    .await?;

    // Origin.
    let c = connect(&cluster, "live").await?;
    exec(
        &c,
        "SELECT pg_replication_origin_create('upstream');
         SELECT pg_replication_origin_session_setup('upstream');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-01 00:00:00+00');
         INSERT INTO o VALUES (1);
         COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await?;
    drop(c);

    // A streamed transaction with a rolled-back subtransaction, interleaved with a small
    // transaction that commits first.
    exec(
        &a,
        "BEGIN;
         INSERT INTO big SELECT i, 'keep' FROM generate_series(1, 800) i;
         SAVEPOINT s1;
         INSERT INTO big SELECT i, 'drop' FROM generate_series(801, 1600) i;
         ROLLBACK TO SAVEPOINT s1;",
    )
    .await?;
    exec(&b, "INSERT INTO small VALUES (1)").await?;
    exec(
        &a,
        "INSERT INTO big SELECT i, 'keep2' FROM generate_series(1601, 2000) i;
         COMMIT;",
    )
    .await?;
    // A streamed transaction that aborts entirely.
    exec(
        &a,
        "BEGIN;
         INSERT INTO big SELECT i, 'aborted' FROM generate_series(5001, 6000) i;
         ROLLBACK;",
    )
    .await?;

    // Two-phase: one commits, one rolls back, one is streamed before its PREPARE. (COMMIT /
    // ROLLBACK PREPARED refuse to run inside a multi-statement query string.)
    for sql in [
        "BEGIN; INSERT INTO tp VALUES (1, 'committed'); PREPARE TRANSACTION 'live-commit';",
        "BEGIN; INSERT INTO tp VALUES (2, 'rolled back'); PREPARE TRANSACTION 'live-rollback';",
        "COMMIT PREPARED 'live-commit'",
        "ROLLBACK PREPARED 'live-rollback'",
        "BEGIN; INSERT INTO tp SELECT i, 'streamed' FROM generate_series(100, 1599) i;
         PREPARE TRANSACTION 'live-stream';",
        "COMMIT PREPARED 'live-stream'",
    ] {
        exec(&a, sql).await?;
    }

    let cap = read_slot(&a).await?;

    // Every message kind arrived.
    let want: BTreeSet<u8> = b"BCORYIUDTMSEcAbPKrp".iter().copied().collect();
    let missing: Vec<char> = want.difference(&cap.tags).map(|&t| t as char).collect();
    ensure!(missing.is_empty(), "message kinds never seen: {missing:?}");

    // Types: relation shape and every value byte-identical to the server's text form.
    let types = cap.changes_of("all_types")?;
    let Some(Change::Insert { rel, new }) = types.first() else {
        bail!("no insert into all_types: {types:?}");
    };
    ensure!(rel.namespace == "public" && rel.replica_identity == ReplicaIdentity::Default);
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    ensure!(names == TYPE_COLUMNS, "columns {names:?}");
    ensure!(rel.columns[0].is_key && rel.columns.iter().filter(|c| c.is_key).count() == 1);
    ensure!(rel.columns[rel.column_index("m").unwrap_or(0)].type_oid == mood_oid);
    for (i, want) in expected_types.iter().enumerate() {
        let got = text(&new[i]);
        ensure!(
            &got == want,
            "column {}: got {got:?}, want {want:?}",
            TYPE_COLUMNS[i]
        );
    }
    ensure!(new[12] == Value::Null);
    let Some(Change::Update { old: None, new, .. }) = types.get(1) else {
        bail!(
            "update of all_types without old key expected: {:?}",
            types.get(1)
        );
    };
    ensure!(text(&new[3]).as_deref() == Some("updated"));

    // REPLICA IDENTITY FULL: old rows; USING INDEX: old key with the index column.
    let full = cap.changes_of("ri_full")?;
    match full.as_slice() {
        [Change::Insert { .. }, Change::Update {
            rel,
            old: Some(OldRow::Full(old)),
            new,
        }, Change::Delete {
            old: OldRow::Full(del),
            ..
        }] => {
            ensure!(rel.replica_identity == ReplicaIdentity::Full);
            ensure!(
                *old == vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Text(Bytes::from_static(b"one")),
                    Value::Null
                ]
            );
            ensure!(text(&new[1]).as_deref() == Some("uno"));
            ensure!(text(&del[1]).as_deref() == Some("uno"));
        }
        other => bail!("ri_full changes: {other:?}"),
    }
    let index = cap.changes_of("ri_index")?;
    match index.as_slice() {
        [Change::Insert { .. }, Change::Update {
            rel,
            old: Some(OldRow::Key(old)),
            new,
        }, Change::Delete {
            old: OldRow::Key(del),
            ..
        }] => {
            ensure!(rel.replica_identity == ReplicaIdentity::Index);
            let keys: Vec<&str> = rel
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.as_str())
                .collect();
            ensure!(keys == ["code"], "key columns {keys:?}");
            ensure!(text(&col(rel, old, "code")?).as_deref() == Some("A"));
            ensure!(text(&col(rel, new, "code")?).as_deref() == Some("B"));
            ensure!(text(&col(rel, del, "code")?).as_deref() == Some("B"));
        }
        other => bail!("ri_index changes: {other:?}"),
    }

    // Unchanged TOAST.
    let docs = cap.changes_of("docs")?;
    let Some(Change::Update { rel, new, .. }) = docs.get(1) else {
        bail!("docs changes: {docs:?}");
    };
    ensure!(col(rel, new, "body")? == Value::UnchangedToast);
    ensure!(text(&col(rel, new, "title")?).as_deref() == Some("second"));

    // Truncate flags and relations.
    let truncates: Vec<(Vec<String>, bool, bool)> = cap
        .transactions()?
        .into_iter()
        .flat_map(|(_, c)| c)
        .filter_map(|c| match c {
            Change::Truncate {
                rels,
                cascade,
                restart_identity,
            } => Some((
                rels.iter()
                    .map(|r: &Arc<Relation>| r.name.clone())
                    .collect(),
                cascade,
                restart_identity,
            )),
            _ => None,
        })
        .collect();
    ensure!(
        truncates
            == vec![
                (vec!["counter".into(), "small".into()], false, true),
                (vec!["parent".into(), "child".into()], true, false),
            ],
        "truncates {truncates:?}"
    );

    // Logical messages: the transactional one in its transaction, the other skipped.
    let txns = cap.transactions()?;
    let msgs: Vec<(String, Bytes)> = txns
        .iter()
        .flat_map(|(_, c)| c)
        .filter_map(|c| match c {
            Change::Message { prefix, content } => Some((prefix.clone(), content.clone())),
            _ => None,
        })
        .collect();
    ensure!(msgs == vec![("live/tx".to_owned(), Bytes::from_static(b"hello"))]);

    // The streamed transaction: reassembled in order after the small one, rollback removed.
    let small_pos = txns
        .iter()
        .position(|(_, c)| {
            matches!(c.as_slice(), [Change::Insert { rel, new }]
                if rel.name == "small" && text(&new[0]).as_deref() == Some("1"))
        })
        .ok_or_else(|| anyhow!("small transaction missing"))?;
    let big_pos = txns
        .iter()
        .position(|(_, c)| {
            c.iter()
                .any(|c| c.relation().is_some_and(|r| r.name == "big"))
        })
        .ok_or_else(|| anyhow!("streamed transaction missing"))?;
    ensure!(small_pos < big_pos, "the small transaction committed first");
    let ids: Vec<i64> = txns[big_pos]
        .1
        .iter()
        .map(|c| match c {
            Change::Insert { new, .. } => text(&new[0])
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("bad id")),
            other => Err(anyhow!("unexpected {other:?}")),
        })
        .collect::<Result<_>>()?;
    let want_ids: Vec<i64> = (1..=800).chain(1601..=2000).collect();
    ensure!(ids == want_ids, "streamed ids: {} rows", ids.len());
    ensure!(
        txns.iter()
            .filter(|(_, c)| c
                .iter()
                .any(|c| c.relation().is_some_and(|r| r.name == "big")))
            .count()
            == 1,
        "the aborted streamed transaction must not appear"
    );

    // Two-phase: committed ones emitted in full, the rolled-back one dropped.
    let tp: Vec<String> = cap
        .changes_of("tp")?
        .iter()
        .filter_map(|c| match c {
            Change::Insert { new, .. } => text(&new[1]),
            _ => None,
        })
        .collect();
    ensure!(tp.first().map(String::as_str) == Some("committed"));
    ensure!(tp.iter().filter(|v| *v == "streamed").count() == 1500);
    ensure!(!tp.iter().any(|v| v == "rolled back"));
    ensure!(tp.len() == 1501);

    // Origin: the replayed transaction arrived with the origin's commit time.
    let o = txns
        .iter()
        .position(|(_, c)| {
            c.iter()
                .any(|c| c.relation().is_some_and(|r| r.name == "o"))
        })
        .ok_or_else(|| anyhow!("origin transaction missing"))?;
    let begin = cap
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            TxnEvent::Begin(b) => Some(b),
            _ => None,
        })
        .nth(o)
        .ok_or_else(|| anyhow!("no begin"))?;
    // 2024-01-01 00:00:00 UTC in microseconds since 2000-01-01.
    ensure!(
        begin.commit_time == 757_382_400_000_000,
        "origin commit time {}",
        begin.commit_time
    );

    Ok(())
}
