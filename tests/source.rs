//! The replication client against real PostgreSQL clusters: authentication, replication
//! commands, streaming, keepalives, flush confirmation, lost connections and clear errors.

use std::time::Duration;

use reshard_engine::error::{Classify, ErrorClass};
use reshard_engine::source::{
    list_slots, ConnConfig, PgOutputOptions, ReplicationClient, ReplicationStream, SlotOptions,
    SnapshotAction, SourceError, XLogData,
};
use reshard_engine::Lsn;
use reshard_harness::{Auth, PgCluster};

/// Connection settings for `db` on `c`, ignoring the environment and ~/.pgpass of the machine.
fn cfg(c: &PgCluster, db: &str) -> ConnConfig {
    ConnConfig::parse_with_env(&c.url(db), &|_| None).unwrap()
}

fn pgoutput(publications: &[&str]) -> PgOutputOptions {
    PgOutputOptions {
        publication_names: publications.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn no_export() -> SlotOptions {
    SlotOptions {
        snapshot: SnapshotAction::NoExport,
        ..Default::default()
    }
}

/// Reads frames until one whose pgoutput tag is `tag`, collecting the tags seen.
async fn read_until(
    stream: &mut ReplicationStream,
    tag: u8,
    tags: &mut Vec<u8>,
) -> Result<XLogData, SourceError> {
    loop {
        let x = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("no replication data within 20 s")?
            .expect("stream ended");
        let t = x.data.first().copied().unwrap_or(0);
        tags.push(t);
        if t == tag {
            return Ok(x);
        }
    }
}

/// `end_lsn` of a pgoutput Commit message: tag, flags, commit_lsn, end_lsn, timestamp.
fn commit_end_lsn(x: &XLogData) -> Lsn {
    assert_eq!(x.data[0], b'C');
    Lsn::from_u64(u64::from_be_bytes(x.data[10..18].try_into().unwrap()))
}

async fn confirmed_flush(sql: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
}

fn setup_table(c: &PgCluster) {
    c.psql(
        "postgres",
        "CREATE TABLE accounts(id bigint PRIMARY KEY, name text); \
         CREATE PUBLICATION pub_all FOR TABLE accounts",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_connection_identifies_the_system() {
    let c = PgCluster::start().unwrap();
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    assert!(
        rc.server_version_num() >= 100000,
        "{}",
        rc.server_version_num()
    );
    let shown = c.psql("postgres", "SHOW server_version_num").unwrap();
    assert_eq!(
        rc.server_version_num() / 100,
        shown.parse::<u32>().unwrap() / 100
    );
    assert!(rc.backend_key().is_some());
    let sys = rc.identify_system().await.unwrap();
    let expected_id = c
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    assert_eq!(sys.system_id, expected_id);
    assert_eq!(sys.timeline, 1);
    assert!(!sys.xlogpos.is_zero());
    assert_eq!(sys.dbname.as_deref(), Some("postgres"));
    // Plain SQL in simple query mode works on a replication=database connection.
    let rows = rc.simple_query("SELECT 1, NULL::text, 'x'").await.unwrap();
    assert_eq!(rows, vec![vec![Some("1".into()), None, Some("x".into())]]);
    // A bad statement is an error naming the SQLSTATE, and the connection stays usable.
    let e = rc.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("42601"), "{e}");
    assert_eq!(
        rc.simple_query("SHOW wal_level").await.unwrap()[0][0].as_deref(),
        Some("logical")
    );
    rc.close().await;
}

async fn password_round_trip(auth: Auth) {
    let c = PgCluster::builder()
        .password("s3cr:et/pw", auth)
        .start()
        .unwrap();
    let url = format!(
        "postgres://postgres:s3cr%3Aet%2Fpw@127.0.0.1:{}/postgres?sslmode=disable",
        c.port()
    );
    let good = ConnConfig::parse_with_env(&url, &|_| None).unwrap();
    let mut rc = ReplicationClient::connect(&good).await.unwrap();
    assert_eq!(
        rc.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    rc.close().await;
    // The same settings open an ordinary SQL connection.
    let sql = good.connect_sql().await.unwrap();
    let one: i32 = sql.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let mut bad = good.clone();
    bad.password = Some("wrong".into());
    match ReplicationClient::connect(&bad).await {
        Err(e @ SourceError::Auth { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("\"postgres\""), "{msg}");
            assert!(msg.contains("PGPASSWORD"), "{msg}");
            assert_eq!(e.class(), ErrorClass::Definite);
        }
        other => panic!("expected an Auth error, got {other:?}"),
    }
    match bad.connect_sql().await {
        Err(SourceError::Auth { user, .. }) => assert_eq!(user, "postgres"),
        other => panic!(
            "expected an Auth error from connect_sql, got {:?}",
            other.err()
        ),
    }
    let mut none = good.clone();
    none.password = None;
    match ReplicationClient::connect(&none).await {
        Err(SourceError::Auth { user, message }) => {
            assert_eq!(user, "postgres");
            assert!(message.contains("none was given"), "{message}");
        }
        other => panic!("expected an Auth error, got {other:?}"),
    }
    // The same from an ordinary SQL connection (a shard's apply, check, verify): it was
    // "cannot connect …: invalid configuration; check that the server is running".
    match none.connect_sql().await {
        Err(e @ SourceError::Auth { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("none was given"), "{msg}");
            assert!(!msg.contains("invalid configuration"), "{msg}");
        }
        other => panic!(
            "expected an Auth error from connect_sql, got {:?}",
            other.err()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_authentication() {
    password_round_trip(Auth::Scram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_authentication() {
    password_round_trip(Auth::Md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connect_error() {
    // Bind and drop a port so that nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ConnConfig::parse_with_env(
        &format!("host=127.0.0.1 port={port} user=u dbname=d connect_timeout=5"),
        &|_| None,
    )
    .unwrap();
    match ReplicationClient::connect(&cfg).await {
        Err(e @ SourceError::Connect { .. }) => {
            assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
            assert_eq!(e.class(), ErrorClass::Transient);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_snapshot_is_importable_and_consistent() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    c.psql("postgres", "INSERT INTO accounts VALUES (1, 'before')")
        .unwrap();
    let config = cfg(&c, "postgres");
    let mut rc = ReplicationClient::connect(&config).await.unwrap();
    let slot = rc
        .create_slot("snap_slot", SlotOptions::default())
        .await
        .unwrap();
    assert_eq!(slot.name, "snap_slot");
    assert_eq!(slot.output_plugin.as_deref(), Some("pgoutput"));
    assert!(!slot.consistent_point.is_zero());
    let snapshot = slot.snapshot_name.clone().expect("exported snapshot name");

    // A row committed after the slot exists must not be visible in the snapshot.
    c.psql("postgres", "INSERT INTO accounts VALUES (2, 'after')")
        .unwrap();
    let sql = config.connect_sql().await.unwrap();
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
    ))
    .await
    .unwrap();
    let n: i64 = sql
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the snapshot shows exactly the rows before the slot");
    sql.batch_execute("COMMIT").await.unwrap();

    // Without export: no snapshot name.
    let plain = rc.create_slot("plain_slot", no_export()).await.unwrap();
    assert_eq!(plain.snapshot_name, None);
    // The name is taken now.
    match rc.create_slot("plain_slot", no_export()).await {
        Err(SourceError::SlotExists { slot }) => assert_eq!(slot, "plain_slot"),
        other => panic!("expected SlotExists, got {other:?}"),
    }
    let slots = list_slots(&sql).await.unwrap();
    let names: Vec<&str> = slots.iter().map(|s| s.slot_name.as_str()).collect();
    assert_eq!(names, ["plain_slot", "snap_slot"]);
    let s = &slots[1];
    assert_eq!(s.plugin.as_deref(), Some("pgoutput"));
    assert_eq!(s.slot_type, "logical");
    assert_eq!(s.database.as_deref(), Some("postgres"));
    assert!(!s.active);
    assert_eq!(s.confirmed_flush_lsn, Some(slot.consistent_point));
    assert!(s.retained_wal_bytes.unwrap() >= 0);

    // A two-phase slot (PostgreSQL 14+ decodes prepared transactions at PREPARE).
    rc.create_slot(
        "tp_slot",
        SlotOptions {
            temporary: false,
            snapshot: SnapshotAction::NoExport,
            two_phase: true,
        },
    )
    .await
    .unwrap();
    let tp = c
        .psql(
            "postgres",
            "SELECT two_phase FROM pg_replication_slots WHERE slot_name = 'tp_slot'",
        )
        .unwrap();
    assert_eq!(tp, "t");
    rc.drop_slot("tp_slot", false).await.unwrap();

    rc.drop_slot("snap_slot", true).await.unwrap();
    rc.drop_slot("plain_slot", false).await.unwrap();
    assert!(list_slots(&sql).await.unwrap().is_empty());
    match rc.drop_slot("plain_slot", true).await {
        Err(e @ SourceError::SlotMissing { .. }) => {
            assert!(e.to_string().contains("plain_slot"), "{e}")
        }
        other => panic!("expected SlotMissing, got {other:?}"),
    }
    rc.close().await;
}

/// Timeouts a DBA gave reshard's role (`ALTER ROLE … SET`) or database do not reach reshard's
/// sessions: the walsender holding an exported snapshot stays idle in its transaction past
/// `idle_in_transaction_session_timeout` (the copy workers import it later); a SQL session runs
/// a statement past `statement_timeout`, waits for a lock past `lock_timeout`, sits idle in a
/// transaction and idle outside one past their timeouts. A value the url's `options` gives
/// is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_and_databases_timeouts_do_not_cut_sessions_short() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    c.psql(
        "postgres",
        "ALTER ROLE postgres SET statement_timeout = '1s'; \
         ALTER ROLE postgres SET idle_in_transaction_session_timeout = '1s'; \
         ALTER ROLE postgres SET lock_timeout = '1s'; \
         ALTER DATABASE postgres SET idle_session_timeout = '1s'",
    )
    .unwrap();
    let past = Duration::from_millis(1600);
    let config = cfg(&c, "postgres");
    let mut rc = ReplicationClient::connect(&config).await.unwrap();
    let slot = rc
        .create_slot("timeouts_slot", SlotOptions::default())
        .await
        .unwrap();
    let snapshot = slot.snapshot_name.expect("exported snapshot name");
    tokio::time::sleep(past).await;
    let sql = config.connect_sql().await.unwrap();
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
    ))
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the snapshot's exporter must outlive idle_in_transaction_session_timeout: {e:?}\n{}",
            c.log_tail()
        )
    });
    rc.identify_system().await.unwrap();

    // Idle in the imported snapshot's transaction, then a statement longer than the limit.
    tokio::time::sleep(past).await;
    sql.batch_execute("SELECT pg_sleep(1.6)")
        .await
        .unwrap_or_else(|e| panic!("idle in transaction, then pg_sleep: {e:?}"));
    sql.batch_execute("COMMIT").await.unwrap();

    // A lock held longer than lock_timeout by another session is waited for.
    let holder = config.connect_sql().await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(past).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    sql.batch_execute("SELECT count(*) FROM accounts")
        .await
        .unwrap_or_else(|e| panic!("waiting for a lock: {e:?}"));
    release.await.unwrap();

    // Idle outside a transaction, on both kinds of connection.
    tokio::time::sleep(past).await;
    sql.batch_execute("SELECT 1")
        .await
        .unwrap_or_else(|e| panic!("after an idle stretch: {e:?}"));
    rc.drop_slot("timeouts_slot", false)
        .await
        .unwrap_or_else(|e| panic!("replication connection after an idle stretch: {e:?}"));
    rc.close().await;

    // The url's own options win.
    let mut own = config.clone();
    own.options = Some("-c statement_timeout=5s".into());
    let c5 = own.connect_sql().await.unwrap();
    let v: String = c5
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "5s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_slot_goes_away_with_its_connection() {
    let c = PgCluster::start().unwrap();
    let config = cfg(&c, "postgres");
    let mut rc = ReplicationClient::connect(&config).await.unwrap();
    rc.create_slot(
        "temp_slot",
        SlotOptions {
            temporary: true,
            snapshot: SnapshotAction::NoExport,
            two_phase: false,
        },
    )
    .await
    .unwrap();
    let seen = c
        .psql(
            "postgres",
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = 'temp_slot'",
        )
        .unwrap();
    assert_eq!(seen, "t");
    rc.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = c
            .psql("postgres", "SELECT count(*) FROM pg_replication_slots")
            .unwrap();
        if n == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "temporary slot survived its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_begin_relation_insert_commit_and_confirms_only_marked_positions() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    let config = cfg(&c, "postgres");
    let mut rc = ReplicationClient::connect(&config).await.unwrap();
    let slot = rc.create_slot("s1", no_export()).await.unwrap();
    c.psql("postgres", "INSERT INTO accounts VALUES (1, 'a'), (2, 'b')")
        .unwrap();
    c.psql("postgres", "INSERT INTO accounts VALUES (3, 'c')")
        .unwrap();
    let mut stream = rc
        .start_replication("s1", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap()
        .with_status_interval(Duration::from_millis(200));

    let mut tags = Vec::new();
    let first_commit = read_until(&mut stream, b'C', &mut tags).await.unwrap();
    assert_eq!(tags, b"BRIIC", "Begin, Relation, Insert x2, Commit");
    let mut tags2 = Vec::new();
    let second_commit = read_until(&mut stream, b'C', &mut tags2).await.unwrap();
    assert_eq!(tags2, b"BIC", "the relation is sent once per session");
    let first_end = commit_end_lsn(&first_commit);
    let second_end = commit_end_lsn(&second_commit);
    assert!(slot.consistent_point < first_end && first_end < second_end);

    // Nothing marked yet: several status updates go out, the slot stays where it was.
    let sql = config.connect_sql().await.unwrap();
    stream.send_status(true).await.unwrap();
    let idle = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    assert!(idle.is_err(), "no more data expected");
    assert_eq!(
        confirmed_flush(&sql, "s1").await,
        Some(slot.consistent_point)
    );

    // Mark the first transaction: the slot advances exactly there and no further.
    stream.set_flushed(first_end);
    stream.send_status(false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cf = confirmed_flush(&sql, "s1").await.unwrap();
        assert!(
            cf <= first_end,
            "confirmed {cf} beyond the mark {first_end}"
        );
        if cf == first_end {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "confirmed_flush_lsn stuck at {cf}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    }
    // A lower mark is ignored; periodic updates keep reporting the first mark.
    stream.set_flushed(slot.consistent_point);
    assert_eq!(stream.flushed(), first_end);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    assert_eq!(confirmed_flush(&sql, "s1").await, Some(first_end));

    // Clean shutdown sends the last mark and frees the slot.
    stream.set_flushed(second_end);
    stream.shutdown().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let slots = list_slots(&sql).await.unwrap();
        if !slots[0].active {
            assert_eq!(slots[0].confirmed_flush_lsn, Some(second_end));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot still active after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_keep_an_idle_stream_alive() {
    let c = PgCluster::builder()
        .setting("wal_sender_timeout", "2s")
        .start()
        .unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("idle_slot", no_export()).await.unwrap();
    // The periodic status interval (default 10 s) is longer than the test: only answers to the
    // server's keepalives keep the walsender from timing out.
    let mut stream = rc
        .start_replication("idle_slot", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap();
    // 6 s idle in next(), dropped (cancelled) every 1.5 s.
    for _ in 0..4 {
        let r = tokio::time::timeout(Duration::from_millis(1500), stream.next()).await;
        assert!(
            r.is_err(),
            "expected no data and no error while idle, got {r:?}"
        );
    }
    c.psql("postgres", "INSERT INTO accounts VALUES (10, 'still here')")
        .unwrap();
    let mut tags = Vec::new();
    read_until(&mut stream, b'C', &mut tags).await.unwrap();
    assert_eq!(tags, b"BRIC");
    let active = c
        .psql("postgres", "SELECT count(*) FROM pg_stat_replication")
        .unwrap();
    assert_eq!(active, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_walsender_is_reported_not_hung() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("kill_slot", no_export()).await.unwrap();
    let mut stream = rc
        .start_replication("kill_slot", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    let killed = c
        .psql(
            "postgres",
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'kill_slot'",
        )
        .unwrap();
    assert_eq!(killed, "t");
    let r = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("next() hung after the walsender was terminated");
    match r {
        Err(e @ SourceError::ConnectionLost { .. }) => assert_eq!(e.class(), ErrorClass::Transient),
        Err(e @ SourceError::Server { .. }) => {
            assert_eq!(e.sqlstate(), Some("57P01"), "{e}");
            assert_eq!(e.class(), ErrorClass::Transient);
        }
        other => panic!("expected ConnectionLost or 57P01, got {other:?}"),
    }
    // The stream stays failed instead of pretending to work.
    assert!(stream.next().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_hits_the_idle_timeout() {
    let c = PgCluster::builder()
        .setting("wal_sender_timeout", "0")
        .start()
        .unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("quiet", no_export()).await.unwrap();
    // The idle timer runs from the last frame received, i.e. from the start of streaming.
    let started = std::time::Instant::now();
    let mut stream = rc
        .start_replication("quiet", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap()
        .with_idle_timeout(Duration::from_secs(2));
    // A walsender that answers nothing at all (not even the keepalive the stream asks for
    // after half the idle timeout): stop the process.
    let pid: i32 = c
        .psql(
            "postgres",
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'quiet'",
        )
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: signalling a process of the throwaway cluster.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let r = tokio::time::timeout(Duration::from_secs(20), stream.next()).await;
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    let r = r.expect("idle timeout did not fire");
    assert!(
        matches!(r, Err(SourceError::ConnectionLost { .. })),
        "{r:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_a_clear_error() {
    let c = PgCluster::builder()
        .setting("wal_level", "replica")
        .start()
        .unwrap();
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    match rc.create_slot("nope", no_export()).await {
        Err(e @ SourceError::WalLevel { .. }) => {
            assert!(
                e.to_string()
                    .contains("ALTER SYSTEM SET wal_level = logical"),
                "{e}"
            );
            assert_eq!(e.class(), ErrorClass::Definite);
        }
        other => panic!("expected WalLevel, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_streaming_elsewhere_is_slot_in_use() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    let config = cfg(&c, "postgres");
    let mut first = ReplicationClient::connect(&config).await.unwrap();
    let slot = first.create_slot("busy", no_export()).await.unwrap();
    let mut stream = first
        .start_replication("busy", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    let pid: u32 = c
        .psql(
            "postgres",
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'busy'",
        )
        .unwrap()
        .parse()
        .unwrap();
    let second = ReplicationClient::connect(&config).await.unwrap();
    match second
        .start_replication("busy", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
    {
        Err(e @ SourceError::SlotInUse { .. }) => {
            assert!(
                matches!(&e, SourceError::SlotInUse { slot, pid: Some(p) } if slot == "busy" && *p == pid),
                "{e:?}"
            );
            assert!(e.to_string().contains(&pid.to_string()));
        }
        other => panic!("expected SlotInUse, got {other:?}"),
    }
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication_is_reported_while_streaming() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("publess", no_export()).await.unwrap();
    let mut stream = rc
        .start_replication("publess", slot.consistent_point, pgoutput(&["no_such_pub"]))
        .await
        .unwrap();
    c.psql("postgres", "INSERT INTO accounts VALUES (1, 'x')")
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no error within 20 s");
    match r {
        Err(SourceError::PublicationMissing { publication }) => {
            assert_eq!(publication, "no_such_pub")
        }
        other => panic!("expected PublicationMissing, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_is_reported_at_start() {
    let c = PgCluster::start().unwrap();
    let rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    match rc
        .start_replication("ghost", Lsn::ZERO, pgoutput(&["p"]))
        .await
    {
        Err(SourceError::SlotMissing { slot }) => assert_eq!(slot, "ghost"),
        other => panic!("expected SlotMissing, got {other:?}"),
    }
}

/// Makes a CA and a server certificate for `DNS:localhost` only, installs them in the cluster
/// and turns `ssl` on (a reload is enough). Returns the CA file.
fn enable_tls(c: &PgCluster, dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    use std::process::Command;
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for the TLS test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=reshard test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let owner = std::fs::metadata(c.data_dir()).unwrap();
    for f in ["server.crt", "server.key"] {
        let dst = c.data_dir().join(f);
        std::fs::copy(dir.join(f), &dst).unwrap();
        chown(&dst, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for sql in [
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "ALTER SYSTEM SET ssl = on",
    ] {
        c.psql("postgres", sql).unwrap();
    }
    c.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    dir.join("ca.crt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_encrypt_and_verify_as_libpq_does() {
    let c = PgCluster::builder()
        .password("tls-pw", Auth::Scram)
        .start()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = enable_tls(&c, dir.path());
    let ca = ca.to_str().unwrap();
    let port = c.port();
    let conf = |host: &str, mode: &str, root: Option<&str>| {
        let mut s = format!(
            "host={host} port={port} user=postgres password=tls-pw dbname=postgres sslmode={mode}"
        );
        if let Some(r) = root {
            s.push_str(&format!(" sslrootcert={r}"));
        }
        ConnConfig::parse_with_env(&s, &|_| None).unwrap()
    };
    // Encrypted without verification; SCRAM over TLS (the server also offers -PLUS).
    for (host, mode, root) in [
        ("127.0.0.1", "prefer", None),
        ("127.0.0.1", "require", None),
        ("127.0.0.1", "verify-ca", Some(ca)), // the name does not match: fine for verify-ca
        ("localhost", "verify-full", Some(ca)),
    ] {
        let cfg = conf(host, mode, root);
        let mut rc = ReplicationClient::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{mode} to {host}: {e}"));
        assert!(rc.is_tls(), "{mode}");
        rc.identify_system().await.unwrap();
        rc.close().await;
        let sql = cfg
            .connect_sql()
            .await
            .unwrap_or_else(|e| panic!("SQL {mode} to {host}: {e}"));
        let ssl: bool = sql
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "SQL connection with sslmode={mode} is not encrypted");
    }
    // Plain when asked.
    let rc = ReplicationClient::connect(&conf("127.0.0.1", "disable", None))
        .await
        .unwrap();
    assert!(!rc.is_tls());
    // Verification failures are TLS errors, not silent downgrades.
    for (host, mode, root) in [
        ("127.0.0.1", "verify-full", Some(ca)), // certificate is for localhost only
        ("localhost", "verify-full", None),     // not signed by a public root
        ("localhost", "verify-ca", None),
    ] {
        match ReplicationClient::connect(&conf(host, mode, root)).await {
            Err(e @ SourceError::Tls { .. }) => assert!(e.to_string().contains(mode), "{e}"),
            other => panic!("{mode} to {host}: expected a TLS error, got {other:?}"),
        }
        assert!(
            conf(host, mode, root).connect_sql().await.is_err(),
            "SQL {mode} to {host}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fails_when_the_server_has_no_tls() {
    let c = PgCluster::start().unwrap();
    let cfg = ConnConfig::parse_with_env(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            c.port()
        ),
        &|_| None,
    )
    .unwrap();
    match ReplicationClient::connect(&cfg).await {
        Err(e @ SourceError::Tls { .. }) => {
            assert!(e.to_string().contains("does not accept TLS"), "{e}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // prefer falls back to plain.
    let mut prefer = cfg.clone();
    prefer.sslmode = reshard_engine::source::SslMode::Prefer;
    let rc = ReplicationClient::connect(&prefer).await.unwrap();
    assert!(!rc.is_tls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_listener_hits_the_connect_timeout() {
    // Accepts TCP connections (the kernel does it) but never answers the startup message.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = ConnConfig::parse_with_env(
        &format!("host=127.0.0.1 port={port} user=u dbname=d sslmode=disable connect_timeout=2"),
        &|_| None,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), ReplicationClient::connect(&cfg))
        .await
        .expect("connect hung past its connect_timeout");
    match r {
        Err(e @ SourceError::Connect { .. }) => {
            assert!(e.to_string().contains("connect_timeout"), "{e}")
        }
        other => panic!("expected a Connect timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pgoutput_option_is_accepted() {
    let c = PgCluster::start().unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("opts", no_export()).await.unwrap();
    let mut stream = rc
        .start_replication(
            "opts",
            slot.consistent_point,
            PgOutputOptions {
                proto_version: None,
                publication_names: vec!["pub_all".into()],
                messages: true,
                streaming: true,
                binary: true,
                two_phase: true,
            },
        )
        .await
        .unwrap();
    c.psql(
        "postgres",
        "SELECT pg_logical_emit_message(false, 'reshard', 'hello')",
    )
    .unwrap();
    let x = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(x.data[0], b'M', "a logical message, since messages=true");
    assert!(x.data.ends_with(b"hello"));
    stream.shutdown().await.unwrap();

    // A protocol version the server does not speak is refused before anything is sent.
    let rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let too_new = PgOutputOptions {
        proto_version: Some(99),
        ..pgoutput(&["pub_all"])
    };
    match rc.start_replication("opts", Lsn::ZERO, too_new).await {
        Err(SourceError::Config { key, .. }) => assert_eq!(key, "proto_version"),
        other => panic!("expected a Config error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_keeps_its_connection() {
    let c = PgCluster::builder()
        .setting("wal_sender_timeout", "2s")
        .start()
        .unwrap();
    setup_table(&c);
    let mut rc = ReplicationClient::connect(&cfg(&c, "postgres"))
        .await
        .unwrap();
    let slot = rc.create_slot("paused", no_export()).await.unwrap();
    let mut stream = rc
        .start_replication("paused", slot.consistent_point, pgoutput(&["pub_all"]))
        .await
        .unwrap()
        .with_status_interval(Duration::from_millis(500));
    c.psql(
        "postgres",
        "INSERT INTO accounts SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
    )
    .unwrap();
    // Downstream is "full" for 5 s (2.5 x wal_sender_timeout): nothing is read.
    let r = tokio::time::timeout(Duration::from_secs(5), stream.keepalive_while_paused()).await;
    assert!(r.is_err(), "keepalive_while_paused failed: {r:?}");
    let mut tags = Vec::new();
    read_until(&mut stream, b'C', &mut tags).await.unwrap();
    assert_eq!(tags.iter().filter(|t| **t == b'I').count(), 20000);
}
