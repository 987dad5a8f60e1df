//! Running reshard as a service: the admin console and the metrics endpoint, driven by real
//! clients (the system's `psql`, `tokio_postgres`, raw HTTP over TCP).
//!
//! The runtime is stood in for by a `watch` channel holding a realistic [`StatusSnapshot`] and a
//! small task that answers the control channel and records every command it receives. The
//! end-to-end test with the real daemon lives with the runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use reshard_engine::admin::{self, AdminAuth, AdminError};
use reshard_engine::lsn::Lsn;
use reshard_engine::metrics;
use reshard_engine::shutdown::{self, ShutdownTx};
use reshard_engine::status::{
    AdminHandle, ControlCommand, ControlRequest, Fence, Phase, ShardState, ShardView, SourceStatus,
    SpillView, StatusSnapshot, TableView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

fn shard(name: &str, state: ShardState, lsn: u64, inserted: u64) -> ShardView {
    ShardView {
        name: name.into(),
        state,
        applied_lsn: Lsn::from_u64(lsn),
        last_commit_time: Some(817_000_000_000_000),
        lag_bytes: 0x3_0000_0000u64.saturating_sub(lsn),
        lag_seconds: 1.5,
        txns_applied_total: inserted / 10,
        rows_inserted_total: inserted,
        rows_updated_total: inserted / 2,
        rows_deleted_total: inserted / 4,
        batches_total: inserted / 100,
        replays_total: 1,
        transient_errors_total: 2,
        definite_errors_total: 0,
        rows_per_sec: 1234.5,
        avg_batch_txns: 10.0,
        latency_p50_ms: 12.0,
        latency_p99_ms: 80.0,
        latency_max_ms: 310.0,
        last_error: None,
        stopped_by_last_run: false,
    }
}

/// What a migration in its full load looks like.
fn snapshot() -> StatusSnapshot {
    StatusSnapshot {
        phase: Phase::FullLoad,
        version: "0.1.0".into(),
        uptime_secs: 3600.0,
        source: SourceStatus {
            slot: "reshard".into(),
            publication: "reshard".into(),
            system_id: "7301234567890123456".into(),
            confirmed_flush_lsn: Lsn::from_u64(0x2_FFFF_0000),
            current_wal_lsn: Lsn::from_u64(0x3_0000_0000),
            retained_wal_bytes: 65536,
            received_lsn: Lsn::from_u64(0x3_0000_0000),
            bytes_received_total: 1_000_000,
            txns_received_total: 5000,
            changes_received_total: 60000,
            changes_per_sec: 900.0,
            backpressure: false,
            pause_reason: None,
            connected: true,
            last_error: None,
            fences: vec![Fence {
                shard: "shard1".into(),
                reason: "cutover".into(),
                step: "safe".into(),
                fenced_secs: 12.5,
                refused: 3,
                ..Fence::default()
            }],
        },
        shards: vec![
            shard("shard0", ShardState::Running, 0x2_FFFF_0000, 1000),
            shard("shard1", ShardState::Running, 0x2_FFF0_0000, 2000),
            ShardView {
                last_error: Some(
                    "shard2: table public.events key (account_id)=(7) at LSN 2/FFE00000: \
                     SQLSTATE 42703 column \"x\" does not exist"
                        .into(),
                ),
                ..shard("shard2", ShardState::Retrying, 0x2_FFE0_0000, 3000)
            },
        ],
        tables: vec![
            TableView {
                name: "public.events".into(),
                target: "public.events".into(),
                mode: "sharded".into(),
                state: "copying".into(),
                rows_copied: 4000,
                rows_estimated: 10000,
                bytes_copied: 400_000,
            },
            TableView {
                name: "public.plans".into(),
                target: "ref.plans".into(),
                mode: "broadcast".into(),
                state: "done".into(),
                rows_copied: 12,
                rows_estimated: 12,
                bytes_copied: 900,
            },
        ],
        spill: SpillView {
            dir: "/var/lib/reshard".into(),
            bytes: 5 << 20,
            max_bytes: 10 << 30,
            segments: 2,
            durable_lsn: Lsn::from_u64(0x2_FFFF_0000),
            oldest_unapplied_lsn: Some(Lsn::from_u64(0x2_FFE0_0000)),
            backpressure_active: false,
            disk_full: false,
            fsyncs_total: 77,
            txns_per_fsync: 64.9,
            high_water_bytes: 6 << 20,
        },
        ..Default::default()
    }
}

/// The stand-in runtime: answers every command and records it.
struct Runtime {
    status: watch::Sender<StatusSnapshot>,
    commands: mpsc::UnboundedReceiver<ControlCommand>,
    handle: AdminHandle,
}

fn runtime() -> Runtime {
    let (status, status_rx) = watch::channel(snapshot());
    let (control, mut control_rx) = mpsc::channel::<ControlRequest>(8);
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((cmd, answer)) = control_rx.recv().await {
            let reply = match &cmd {
                ControlCommand::Pause(Some(s)) if s == "shard2" => {
                    Err("shard shard2 is retrying; wait for it to be running".to_owned())
                }
                ControlCommand::Pause(Some(s)) => Ok(format!("shard {s} paused")),
                ControlCommand::Pause(None) => Ok("reading from the source paused".to_owned()),
                ControlCommand::Resume(Some(s)) => Ok(format!("shard {s} resumed")),
                ControlCommand::Resume(None) => Ok("reading from the source resumed".to_owned()),
                ControlCommand::Shutdown => Ok("shutting down".to_owned()),
            };
            let _ = seen_tx.send(cmd);
            let _ = answer.send(reply);
        }
    });
    Runtime {
        status,
        commands: seen_rx,
        handle: AdminHandle {
            status: status_rx,
            control,
        },
    }
}

struct Console {
    addr: SocketAddr,
    shutdown: ShutdownTx,
    task: JoinHandle<Result<(), AdminError>>,
}

async fn console(handle: AdminHandle, password: Option<&str>) -> Console {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, shutdown_rx) = shutdown::channel();
    let auth = AdminAuth {
        user: "reshard".into(),
        password: password.map(str::to_owned),
        tls: None,
    };
    let task = tokio::spawn(admin::serve_on(listener, auth, handle, shutdown_rx));
    Console {
        addr,
        shutdown,
        task,
    }
}

impl Console {
    async fn stop(self) {
        self.shutdown.shutdown();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("admin console stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

fn psql_bin() -> PathBuf {
    reshard_harness::bindir().unwrap().join("psql")
}

/// `psql -h 127.0.0.1 -p PORT -U user reshard -c SQL`, unaligned, `|`-separated, with headers.
async fn psql(addr: SocketAddr, user: &str, password: Option<&str>, sql: &str) -> Output {
    let mut cmd = tokio::process::Command::new(psql_bin());
    cmd.args(["-X", "-w", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            user,
        ])
        .args(["-c", sql, "reshard"])
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGPASSFILE", "/nonexistent");
    match password {
        Some(pw) => cmd.env("PGPASSWORD", pw),
        None => cmd.env_remove("PGPASSWORD"),
    };
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("psql finishes")
        .expect("psql runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// psql's unaligned output: header line, then rows, then `(N rows)`.
fn table(o: &Output) -> (Vec<String>, Vec<Vec<String>>) {
    assert!(o.status.success(), "psql failed: {}", stderr(o));
    let out = stdout(o);
    let mut lines = out.lines().filter(|l| !l.is_empty());
    let header = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_owned)
        .collect();
    let rows = lines
        .filter(|l| !(l.starts_with('(') && l.ends_with(')')))
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    (header, rows)
}

/// A tokio-postgres client; notices go to the returned channel.
async fn client(
    addr: SocketAddr,
    user: &str,
    password: Option<&str>,
) -> Result<
    (
        tokio_postgres::Client,
        mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
    ),
    tokio_postgres::Error,
> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .dbname("reshard")
        .connect_timeout(Duration::from_secs(5));
    if let Some(pw) = password {
        cfg.password(pw);
    }
    let (client, mut conn) = cfg.connect(NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok((client, rx))
}

/// Column names and rows of a simple query's result.
async fn simple(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<(Vec<String>, Vec<Vec<Option<String>>>), tokio_postgres::Error> {
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::RowDescription(d) => {
                cols = d.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    Ok((cols, rows))
}

fn kv(rows: &[Vec<String>], key: &str) -> String {
    rows.iter()
        .find(|r| r.first().map(String::as_str) == Some(key))
        .and_then(|r| r.get(1).cloned())
        .unwrap_or_else(|| panic!("no key {key} in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_answers_every_show_command_over_psql() {
    let rt = runtime();
    let c = console(rt.handle.clone(), None).await;

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "SHOW STATUS").await);
    assert_eq!(cols, ["key", "value"]);
    assert_eq!(kv(&rows, "phase"), "full_load");
    assert_eq!(kv(&rows, "ready"), "false");
    assert_eq!(kv(&rows, "uptime_secs"), "3600.0");
    assert_eq!(kv(&rows, "slot"), "reshard");
    assert_eq!(kv(&rows, "confirmed_flush_lsn"), "2/FFFF0000");
    assert_eq!(kv(&rows, "retained_wal_bytes"), "65536");
    assert_eq!(kv(&rows, "spill_bytes"), (5u64 << 20).to_string());
    assert_eq!(kv(&rows, "shards"), "3");
    assert_eq!(kv(&rows, "shards_running"), "2");

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "show shards;").await);
    assert_eq!(
        cols,
        [
            "name",
            "state",
            "applied_lsn",
            "lag_bytes",
            "lag_seconds",
            "txns",
            "rows_inserted",
            "rows_updated",
            "rows_deleted",
            "rows_per_sec",
            "batches",
            "replays",
            "transient_errors",
            "definite_errors",
            "last_error"
        ]
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[1],
        [
            "shard1",
            "running",
            "2/FFF00000",
            "1048576",
            "1.500",
            "200",
            "2000",
            "1000",
            "500",
            "1234.5",
            "20",
            "1",
            "2",
            "0",
            ""
        ]
    );
    assert_eq!(rows[2][1], "retrying");
    assert!(rows[2][14].contains("SQLSTATE 42703"), "{:?}", rows[2]);

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "SHOW TABLES").await);
    assert_eq!(
        cols,
        [
            "name",
            "target",
            "mode",
            "state",
            "rows_copied",
            "rows_estimated",
            "bytes_copied"
        ]
    );
    assert_eq!(
        rows,
        [
            [
                "public.events",
                "public.events",
                "sharded",
                "copying",
                "4000",
                "10000",
                "400000"
            ],
            [
                "public.plans",
                "ref.plans",
                "broadcast",
                "done",
                "12",
                "12",
                "900"
            ]
        ]
    );

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "Show Lag").await);
    assert_eq!(
        cols,
        [
            "shard",
            "state",
            "applied_lsn",
            "lag_bytes",
            "lag_seconds",
            "p50_ms",
            "p99_ms",
            "max_ms"
        ]
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][0], "shard0");
    assert_eq!(&rows[0][5..], ["12.0", "80.0", "310.0"]);

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "SHOW SPILL").await);
    assert_eq!(
        cols,
        [
            "dir",
            "bytes",
            "max_bytes",
            "high_water_bytes",
            "segments",
            "durable_lsn",
            "oldest_unapplied_lsn",
            "backpressure",
            "fsyncs",
            "txns_per_fsync"
        ]
    );
    assert_eq!(
        rows,
        [[
            "/var/lib/reshard",
            (5u64 << 20).to_string().as_str(),
            (10u64 << 30).to_string().as_str(),
            (6u64 << 20).to_string().as_str(),
            "2",
            "2/FFFF0000",
            "2/FFE00000",
            "false",
            "77",
            "64.9"
        ]]
    );

    let (cols, rows) = table(&psql(c.addr, "reshard", None, "SHOW HELP").await);
    assert_eq!(cols, ["command", "description"]);
    for cmd in [
        "SHOW STATUS",
        "SHOW SHARDS",
        "SHOW TABLES",
        "SHOW LAG",
        "SHOW SPILL",
        "SHOW STATUS JSON",
        "PAUSE [shard]",
        "RESUME [shard]",
        "SHUTDOWN",
    ] {
        assert!(rows.iter().any(|r| r[0] == cmd), "{cmd} missing from help");
    }

    // The snapshot is read live: a change is visible on the next query.
    rt.status.send_modify(|s| s.phase = Phase::Streaming);
    let (_, rows) = table(&psql(c.addr, "reshard", None, "SHOW STATUS").await);
    assert_eq!(kv(&rows, "phase"), "streaming");

    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_serves_tokio_postgres_simple_queries_and_status_json() {
    let rt = runtime();
    let c = console(rt.handle.clone(), None).await;
    let (client, _notices) = client(c.addr, "reshard", None).await.unwrap();

    let (cols, rows) = simple(&client, "SHOW STATUS JSON").await.unwrap();
    assert_eq!(cols, ["status"]);
    assert_eq!(rows.len(), 1);
    let json = rows[0][0].clone().expect("status is not NULL");
    let back: StatusSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back.phase, Phase::FullLoad);
    assert_eq!(back.shards.len(), 3);
    assert_eq!(back.shards[2].state, ShardState::Retrying);
    assert_eq!(back.spill.durable_lsn, Lsn::from_u64(0x2_FFFF_0000));
    assert_eq!(back.tables[1].target, "ref.plans");

    // NULLs stay NULL; several statements in one message each get their result.
    let (cols, rows) = simple(&client, "SHOW SHARDS").await.unwrap();
    assert_eq!(cols.last().map(String::as_str), Some("last_error"));
    assert_eq!(rows[0][14], None);
    assert!(rows[2][14].is_some());
    let msgs = client.simple_query("SHOW LAG; SHOW SPILL").await.unwrap();
    let completes = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(completes, 2);

    // Clients that set session parameters on connect keep working.
    client
        .simple_query("SET application_name = 'x'")
        .await
        .unwrap();
    drop(client);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_serves_the_extended_query_protocol() {
    let mut rt = runtime();
    let c = console(rt.handle.clone(), None).await;
    let (client, _notices) = client(c.addr, "reshard", None).await.unwrap();

    // `query` = Parse/Bind/Describe/Execute/Sync, results in binary.
    let rows = client.query("SHOW LAG", &[]).await.unwrap();
    assert_eq!(rows.len(), 3);
    let names: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "shard",
            "state",
            "applied_lsn",
            "lag_bytes",
            "lag_seconds",
            "p50_ms",
            "p99_ms",
            "max_ms"
        ]
    );
    assert_eq!(rows[2].get::<_, String>("shard"), "shard2");
    assert_eq!(rows[2].get::<_, String>("applied_lsn"), "2/FFE00000");
    assert_eq!(rows[0].get::<_, String>("p99_ms"), "80.0");

    let row = client.query_one("show status json;", &[]).await.unwrap();
    let back: StatusSnapshot = serde_json::from_str(row.get::<_, &str>("status")).unwrap();
    assert_eq!(back.tables.len(), 2);

    // A prepared statement can run again and sees the live status.
    let stmt = client.prepare("SHOW SHARDS").await.unwrap();
    assert_eq!(stmt.columns().len(), 15);
    rt.status
        .send_modify(|s| s.shards[0].state = ShardState::Paused);
    let rows = client.query(&stmt, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>("state"), "paused");
    assert_eq!(rows[0].get::<_, Option<String>>("last_error"), None);

    // Commands return no rows; they reach the runtime.
    assert_eq!(client.execute("RESUME shard0", &[]).await.unwrap(), 0);
    assert_eq!(
        rt.commands.recv().await,
        Some(ControlCommand::Resume(Some("shard0".into())))
    );

    // Errors are ErrorResponses, and the session goes on.
    let e = client.query("SHOW BOGUS", &[]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42601");
    let e = client.query("SHOW LAG; SHOW SPILL", &[]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42601");
    assert_eq!(client.query("SHOW SPILL", &[]).await.unwrap().len(), 1);
    // Shutdown does not wait for idle sessions: they are closed.
    c.stop().await;
    let e = client.simple_query("SHOW LAG").await.unwrap_err();
    assert!(e.is_closed(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_forwards_pause_resume_shutdown_to_the_runtime() {
    let mut rt = runtime();
    let c = console(rt.handle.clone(), None).await;

    // psql: the answer arrives as a NOTICE and the command tag.
    let out = psql(c.addr, "reshard", None, "PAUSE shard1").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NOTICE:  shard shard1 paused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out).trim(), "PAUSE");
    assert_eq!(
        rt.commands.recv().await,
        Some(ControlCommand::Pause(Some("shard1".into())))
    );

    let out = psql(c.addr, "reshard", None, "resume shard1;").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "RESUME");
    assert_eq!(
        rt.commands.recv().await,
        Some(ControlCommand::Resume(Some("shard1".into())))
    );

    // tokio-postgres: same, notices through the connection.
    let (client, mut notices) = client(c.addr, "reshard", None).await.unwrap();
    client.simple_query("PAUSE").await.unwrap();
    assert_eq!(rt.commands.recv().await, Some(ControlCommand::Pause(None)));
    let n = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.message(), "reading from the source paused");

    // An unknown shard is refused before it reaches the runtime, naming the valid ones.
    let e = client.simple_query("PAUSE shard9").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "42704");
    assert_eq!(
        db.message(),
        "shard \"shard9\" does not exist; shards are: shard0, shard1, shard2"
    );
    // The runtime's refusal is forwarded as an error.
    let e = client.simple_query("PAUSE shard2").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "55000");
    assert!(
        db.message().contains("shard2 is retrying"),
        "{}",
        db.message()
    );
    assert_eq!(
        rt.commands.recv().await,
        Some(ControlCommand::Pause(Some("shard2".into())))
    );

    let out = psql(c.addr, "reshard", None, "SHUTDOWN").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("shutting down"), "{}", stderr(&out));
    assert_eq!(rt.commands.recv().await, Some(ControlCommand::Shutdown));

    // Nothing else was sent (shard9 never reached the runtime).
    assert!(rt.commands.try_recv().is_err());
    drop(client);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_rejects_unknown_commands_clearly_and_stays_usable() {
    let mut rt = runtime();
    let c = console(rt.handle.clone(), None).await;

    let out = psql(c.addr, "reshard", None, "SELECT * FROM accounts").await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown command \"SELECT * FROM accounts\"; try SHOW HELP"),
        "{}",
        stderr(&out)
    );

    let (client, _n) = client(c.addr, "reshard", None).await.unwrap();
    let e = client.simple_query("SHOW STATS").await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert_eq!(
        db.message(),
        "unknown command \"SHOW STATS\"; try SHOW HELP"
    );
    // A typo anywhere in a message runs nothing of it.
    client
        .simple_query("PAUSE shard0; SHOW BOGUS")
        .await
        .unwrap_err();
    // The session is still usable.
    let (_, rows) = simple(&client, "SHOW LAG").await.unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rt.commands.try_recv().is_err(), "nothing was forwarded");
    drop(client);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_password_and_user_are_enforced() {
    let rt = runtime();
    let c = console(rt.handle.clone(), Some("s3cret pw")).await;

    // Right password, psql and tokio-postgres.
    let (cols, _) = table(&psql(c.addr, "reshard", Some("s3cret pw"), "SHOW STATUS").await);
    assert_eq!(cols, ["key", "value"]);
    let (client, _n) = client(c.addr, "reshard", Some("s3cret pw")).await.unwrap();
    assert_eq!(simple(&client, "SHOW SHARDS").await.unwrap().1.len(), 3);

    // Wrong or missing password.
    let out = psql(c.addr, "reshard", Some("wrong"), "SHOW STATUS").await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Password authentication failed for user \"reshard\""),
        "{}",
        stderr(&out)
    );
    let out = psql(c.addr, "reshard", None, "SHOW STATUS").await;
    assert!(!out.status.success());
    let e = match self::client(c.addr, "reshard", Some("wrong")).await {
        Err(e) => e,
        Ok(_) => panic!("a wrong password must be refused"),
    };
    assert_eq!(e.as_db_error().unwrap().code().code(), "28P01");

    // Another user, even with the right password.
    let e = match self::client(c.addr, "postgres", Some("s3cret pw")).await {
        Err(e) => e,
        Ok(_) => panic!("only [admin] user may connect"),
    };
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "28000");
    assert_eq!(
        db.message(),
        "user \"postgres\" may not connect to the reshard admin console; connect as \"reshard\" \
         (config key admin.user)"
    );
    drop(client);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bind_errors_name_the_address_and_config_key_and_empty_turns_off() {
    let rt = runtime();
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_tx, rx) = shutdown::channel();
    let auth = AdminAuth {
        user: "reshard".into(),
        password: None,
        tls: None,
    };
    let e = admin::serve(&addr, auth, rt.handle.clone(), rx.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&addr) && e.contains("admin.listen"), "{e}");
    let e = metrics::serve_metrics(&addr, rt.handle.status.clone(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&addr) && e.contains("admin.metrics"), "{e}");

    // "" turns them off: they return at once, without waiting for shutdown.
    let (_tx, rx) = shutdown::channel();
    let auth = AdminAuth {
        user: "reshard".into(),
        password: None,
        tls: None,
    };
    tokio::time::timeout(
        Duration::from_secs(5),
        admin::serve("", auth, rt.handle.clone(), rx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        metrics::serve_metrics("", rt.handle.status.clone(), rx),
    )
    .await
    .unwrap()
    .unwrap();
}

/// One HTTP/1.1 GET over a raw socket: (status code, content type, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|l| l.parse().ok())
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (code, ctype, body.to_owned())
}

/// The value of the sample line that starts with `series ` (`name{labels}`).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_follows_the_snapshot_and_reports_health() {
    let rt = runtime();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, shutdown_rx) = shutdown::channel();
    let task = tokio::spawn(metrics::serve_metrics_on(
        listener,
        rt.handle.status.clone(),
        shutdown_rx,
    ));

    let (code, body) = {
        let (c, _, b) = http_get(addr, "/healthz").await;
        (c, b)
    };
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // Full load: not ready, and the reason says why.
    let (code, _, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert_eq!(body, "not ready: phase is full_load, not streaming\n");

    let (code, ctype, m1) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(m1.ends_with("# EOF\n"));
    assert_eq!(
        sample(
            &m1,
            "reshard_shard_rows_applied_total{shard=\"shard1\",kind=\"insert\"}"
        ),
        2000.0
    );
    assert_eq!(
        sample(
            &m1,
            "reshard_shard_errors_total{shard=\"shard2\",class=\"transient\"}"
        ),
        2.0
    );
    assert_eq!(sample(&m1, "reshard_shard_up{shard=\"shard2\"}"), 0.0);
    assert_eq!(
        sample(&m1, "reshard_shard_applied_lsn{shard=\"shard0\"}"),
        0x2_FFFF_0000u64 as f64
    );
    assert_eq!(
        sample(&m1, "reshard_source_received_bytes_total"),
        1_000_000.0
    );
    assert_eq!(sample(&m1, "reshard_source_retained_wal_bytes"), 65536.0);
    assert_eq!(sample(&m1, "reshard_phase{phase=\"full_load\"}"), 1.0);
    assert_eq!(sample(&m1, "reshard_phase{phase=\"streaming\"}"), 0.0);
    assert_eq!(
        sample(
            &m1,
            "reshard_fullload_rows_copied_total{table=\"public.events\"}"
        ),
        4000.0
    );
    assert_eq!(
        sample(
            &m1,
            "reshard_shard_apply_latency_seconds{shard=\"shard0\",quantile=\"0.99\"}"
        ),
        0.08
    );

    // The runtime moves on: counters follow, readiness flips once streaming.
    rt.status.send_modify(|s| {
        s.phase = Phase::Streaming;
        s.shards[1].rows_inserted_total += 500;
        s.shards[2].state = ShardState::Running;
        s.source.bytes_received_total += 4096;
        s.spill.fsyncs_total += 3;
        s.tables[0].rows_copied = 10000;
    });
    let (code, _, m2) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(
            &m2,
            "reshard_shard_rows_applied_total{shard=\"shard1\",kind=\"insert\"}"
        ),
        2500.0
    );
    assert_eq!(
        sample(&m2, "reshard_source_received_bytes_total"),
        1_004_096.0
    );
    assert_eq!(sample(&m2, "reshard_spill_fsyncs_total"), 80.0);
    assert_eq!(sample(&m2, "reshard_shard_up{shard=\"shard2\"}"), 1.0);
    assert_eq!(sample(&m2, "reshard_phase{phase=\"streaming\"}"), 1.0);
    assert_eq!(
        sample(
            &m2,
            "reshard_fullload_rows_copied_total{table=\"public.events\"}"
        ),
        10000.0
    );
    let (code, _, body) = http_get(addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));

    // A stopped shard makes it unready again, naming the shard and its error.
    rt.status.send_modify(|s| {
        s.shards[0].state = ShardState::Stopped;
        s.shards[0].last_error = Some("SQLSTATE 42P01 relation missing".into());
    });
    let (code, _, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("shard0 (SQLSTATE 42P01 relation missing)"),
        "{body}"
    );

    let (code, _, _) = http_get(addr, "/nope").await;
    assert_eq!(code, 404);

    // Anything but a small GET/HEAD gets a clear status, never a hang.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 405 "), "{buf}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Big: {}\r\n", "a".repeat(20_000));
    // The server may answer and close before reading everything.
    let _ = s.write_all(huge.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let buf = String::from_utf8_lossy(&buf);
    assert!(buf.starts_with("HTTP/1.1 431 "), "{buf}");

    shutdown.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("metrics endpoint stops on shutdown")
        .unwrap()
        .unwrap();
}

fn repo_file(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Field names of a `{:#?}` rendering (the lines indented by exactly four spaces).
fn debug_fields(pretty: &str) -> Vec<String> {
    pretty
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("    ")?;
            if rest.starts_with(' ') {
                return None;
            }
            rest.split_once(':').map(|(k, _)| k.to_owned())
        })
        .collect()
}

/// The text of `[header]` up to the next table header.
fn toml_section<'a>(text: &'a str, header: &str) -> &'a str {
    let start = text
        .find(&format!("\n{header}\n"))
        .unwrap_or_else(|| panic!("no {header} in the example"));
    let body = &text[start + header.len() + 2..];
    match body.find("\n[") {
        Some(end) => &body[..end],
        None => body,
    }
}

#[test]
fn example_config_documents_every_key_with_its_default() {
    use reshard_engine::config::Config;
    let text = repo_file("deploy/reshard.example.toml");
    let example = Config::parse(&text, "deploy/reshard.example.toml").unwrap();

    // Every key of every section is in the example, set or (for keys without a default)
    // commented out, and preceded by a comment line.
    let sections: [(&str, String); 9] = [
        ("[source]", format!("{:#?}", example.source)),
        ("[routing]", format!("{:#?}", example.routing)),
        ("[[shards]]", format!("{:#?}", example.shards[0])),
        ("[[tables]]", format!("{:#?}", example.tables[0])),
        ("[apply]", format!("{:#?}", example.apply)),
        ("[spill]", format!("{:#?}", example.spill)),
        ("[snapshot]", format!("{:#?}", example.snapshot)),
        ("[admin]", format!("{:#?}", example.admin)),
        ("[cutover]", format!("{:#?}", example.cutover)),
    ];
    let mut checked = 0;
    for (header, debug) in &sections {
        let body = toml_section(&text, header);
        let lines: Vec<&str> = body.lines().collect();
        for key in debug_fields(debug) {
            let at = lines.iter().position(|l| {
                l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = "))
            });
            let at = at.unwrap_or_else(|| panic!("{header} {key} is not in the example"));
            assert!(
                at > 0 && lines[at - 1].starts_with('#'),
                "{header} {key} has no comment above it"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 40,
        "only {checked} keys found: the Debug scan is broken"
    );

    // Every value set in the example is the default: the parsed example equals a minimal
    // config (only the required keys) section by section.
    let minimal = Config::parse(
        &format!(
            "[source]\nurl = {:?}\n[[shards]]\nname = \"s\"\nurl = \"postgres://x\"\n",
            example.source.url
        ),
        "minimal",
    )
    .unwrap();
    assert_eq!(
        format!("{:?}", example.source),
        format!("{:?}", minimal.source)
    );
    assert_eq!(
        format!("{:?}", example.routing),
        format!("{:?}", minimal.routing)
    );
    assert_eq!(
        format!("{:?}", example.apply),
        format!("{:?}", minimal.apply)
    );
    assert_eq!(
        format!("{:?}", example.spill),
        format!("{:?}", minimal.spill)
    );
    assert_eq!(
        format!("{:?}", example.snapshot),
        format!("{:?}", minimal.snapshot)
    );
    assert_eq!(
        format!("{:?}", example.admin),
        format!("{:?}", minimal.admin)
    );
    assert_eq!(
        format!("{:?}", example.cutover),
        format!("{:?}", minimal.cutover)
    );
}

#[test]
fn compose_config_parses_and_listens_on_all_interfaces() {
    use reshard_engine::config::Config;
    let c = Config::parse(
        &repo_file("deploy/compose/reshard.toml"),
        "deploy/compose/reshard.toml",
    )
    .unwrap();
    assert_eq!(c.shard_names(), ["shard0", "shard1", "shard2"]);
    assert!(c.source.url.contains("@source:5432"));
    assert_eq!(c.admin.listen, "0.0.0.0:6433");
    assert_eq!(c.admin.metrics, "0.0.0.0:9187");
    let compose = repo_file("docker-compose.yml");
    for service in ["source:", "shard0:", "shard1:", "shard2:", "reshard:"] {
        assert!(compose.contains(&format!("\n  {service}\n")), "{service}");
    }
    for shard in c.shard_names() {
        assert!(c
            .shards
            .iter()
            .any(|s| s.url.contains(&format!("@{shard}:"))));
    }
}

/// Every `reshard_…` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("reshard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn grafana_dashboard_is_valid_json_and_plots_exported_metrics() {
    let text = repo_file("deploy/grafana/reshard-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut exprs = String::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            exprs.push_str(e);
            exprs.push('\n');
        }
    }
    let used = metric_names(&text);
    for name in &used {
        assert!(
            metrics::ALL.contains(&name.as_str()),
            "the dashboard uses {name}, which metrics.rs does not export"
        );
    }
    let plotted = metric_names(&exprs);
    for name in [
        metrics::SHARD_LAG_BYTES,
        metrics::SHARD_LAG_SECONDS,
        metrics::SHARD_ROWS_APPLIED_TOTAL,
        metrics::SHARD_ERRORS_TOTAL,
        metrics::SHARD_APPLY_LATENCY_SECONDS,
        metrics::SPILL_BYTES,
        metrics::SPILL_BACKPRESSURE_ACTIVE,
        metrics::SOURCE_RECEIVED_BYTES_TOTAL,
        metrics::SOURCE_RETAINED_WAL_BYTES,
        metrics::FULLLOAD_ROWS_COPIED_TOTAL,
    ] {
        assert!(plotted.contains(name), "the dashboard does not plot {name}");
    }
    // Panel ids are unique (Grafana keys panels by id).
    let mut ids: Vec<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
}

#[test]
fn deploy_readme_lists_exactly_the_exported_metrics() {
    let readme = repo_file("deploy/README.md");
    // The metrics table: rows that start with a metric name.
    let table: String = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("{n}\n"))
        .collect();
    let listed = metric_names(&table);
    assert!(!listed.is_empty());
    for name in metrics::ALL {
        assert!(
            listed.contains(*name),
            "deploy/README.md does not list {name}"
        );
    }
    for name in &listed {
        assert!(
            metrics::ALL.contains(&name.as_str()),
            "deploy/README.md lists {name}, which metrics.rs does not export"
        );
    }
}

/// The README's configuration block, parsed.
fn readme_config() -> reshard_engine::config::Config {
    let text = repo_file("README.md");
    let start = text
        .find("## Configuration")
        .expect("README has a Configuration section");
    let block = &text[start..];
    let open = block.find("```toml\n").expect("a ```toml block") + "```toml\n".len();
    let close = block[open..].find("```").expect("the block's end");
    reshard_engine::config::Config::parse(&block[open..open + close], "README.md")
        .unwrap_or_else(|e| panic!("README's config block does not parse: {e}"))
}

/// One set of defaults (issue #13): every default in `config.rs` is the one the README's
/// config block and `deploy/reshard.example.toml` show, and the one each stage runs with when
/// built with its own defaults (tests, benches) — so no second set of defaults exists anywhere.
#[test]
fn config_defaults_are_documented_and_are_the_stage_defaults() {
    use reshard_engine::apply::ApplyOptions;
    use reshard_engine::config::Config;
    use reshard_engine::snapshot::FullLoadOptions;
    use reshard_engine::spill::SpillOptions;
    let minimal = Config::parse(
        "[source]\nurl = \"postgres://x\"\n[[shards]]\nname = \"s\"\nurl = \"postgres://y\"\n",
        "minimal",
    )
    .unwrap();
    let d = &minimal;
    let example = Config::parse(
        &repo_file("deploy/reshard.example.toml"),
        "deploy/reshard.example.toml",
    )
    .unwrap();
    let readme = readme_config();
    for (origin, c) in [("README.md", &readme), ("reshard.example.toml", &example)] {
        for (section, got, want) in [
            (
                "[source] (without url)",
                {
                    let mut s = c.source.clone();
                    s.url = d.source.url.clone();
                    format!("{s:?}")
                },
                format!("{:?}", d.source),
            ),
            (
                "[routing]",
                format!("{:?}", c.routing),
                format!("{:?}", d.routing),
            ),
            (
                "[apply]",
                format!("{:?}", c.apply),
                format!("{:?}", d.apply),
            ),
            (
                "[spill]",
                format!("{:?}", c.spill),
                format!("{:?}", d.spill),
            ),
            (
                "[snapshot]",
                format!("{:?}", c.snapshot),
                format!("{:?}", d.snapshot),
            ),
            (
                "[admin]",
                format!("{:?}", c.admin),
                format!("{:?}", d.admin),
            ),
            (
                "[cutover]",
                format!("{:?}", c.cutover),
                format!("{:?}", d.cutover),
            ),
        ] {
            assert_eq!(
                got, want,
                "{origin} {section} differs from config.rs's defaults"
            );
        }
    }

    // The stages' own defaults are config's.
    let a = ApplyOptions::default();
    assert_eq!(
        (
            a.batch_max_rows,
            a.batch_max_bytes,
            a.batch_max_delay_ms,
            a.catchup_batch_ms,
            a.session_replication_role_replica,
            a.retry_initial_ms,
            a.retry_max_ms,
        ),
        (
            d.apply.batch_max_rows,
            d.apply.batch_max_bytes,
            d.apply.batch_max_delay_ms,
            d.apply.catchup_batch_ms,
            d.apply.session_replication_role_replica,
            d.apply.retry_initial_ms,
            d.apply.retry_max_ms,
        ),
        "ApplyOptions::default() vs [apply]"
    );
    let s = SpillOptions::default();
    assert_eq!(
        (
            s.dir.clone(),
            s.segment_bytes,
            s.max_bytes,
            s.zstd_level,
            s.memory_tail_bytes,
            s.flush_interval_ms,
        ),
        (
            d.spill.dir.clone(),
            d.spill.segment_bytes,
            d.spill.max_bytes,
            d.spill.zstd_level,
            d.spill.memory_tail_bytes,
            d.spill.flush_interval_ms,
        ),
        "SpillOptions::default() vs [spill]"
    );
    assert_eq!(
        FullLoadOptions::default(),
        FullLoadOptions::from_config(&d.snapshot).unwrap(),
        "FullLoadOptions::default() vs [snapshot]"
    );
    let f = FullLoadOptions::default();
    assert_eq!(
        (f.parallel.get(), f.chunk_rows.get()),
        (d.snapshot.parallel, d.snapshot.chunk_rows),
        "FullLoadOptions::default() vs [snapshot]"
    );
}

/// A console for `password` over TLS with a fresh self-signed certificate for `localhost`.
async fn tls_console(handle: AdminHandle, password: &str, dir: &std::path::Path) -> Console {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "admin.key",
            "-out",
            "admin.crt",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl is needed for the TLS test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = reshard_engine::config::AdminConfig {
        password: Some(password.to_owned()),
        tls_cert: Some(dir.join("admin.crt")),
        tls_key: Some(dir.join("admin.key")),
        ..Default::default()
    };
    let auth = AdminAuth::from_config(&cfg).expect("TLS files load");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, shutdown_rx) = shutdown::channel();
    let task = tokio::spawn(admin::serve_on(listener, auth, handle, shutdown_rx));
    Console {
        addr,
        shutdown,
        task,
    }
}

/// `psql` with `sslmode` set; the rest as [`psql`].
async fn psql_ssl(addr: SocketAddr, password: &str, sslmode: &str, sql: &str) -> Output {
    let mut cmd = tokio::process::Command::new(psql_bin());
    cmd.args(["-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=reshard dbname=reshard sslmode={sslmode}",
            addr.port()
        ))
        .args(["-c", sql])
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGPASSFILE", "/nonexistent")
        .env("PGPASSWORD", password);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("psql finishes")
        .expect("psql runs")
}

/// The first authentication request the console sends to a fresh connection (after a plain
/// StartupMessage for `reshard`): the `R` message's code and body.
async fn first_auth_request(addr: SocketAddr) -> (i32, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes()); // protocol 3.0
    for kv in ["user", "reshard", "database", "reshard"] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).await.unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(
        head[0], b'R',
        "expected an authentication request, got {:?}",
        head[0] as char
    );
    let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len - 4];
    s.read_exact(&mut rest).await.unwrap();
    (
        i32::from_be_bytes(rest[..4].try_into().unwrap()),
        rest[4..].to_vec(),
    )
}

// See: issue #11 item 12.
/// With a password the console asks for SCRAM-SHA-256 (SASL, code 10), not md5 (code 5);
/// psql connects with the password and is refused with a wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_password_is_checked_with_scram_sha_256() {
    let rt = runtime();
    let c = console(rt.handle.clone(), Some("s3cret")).await;
    let (code, body) = first_auth_request(c.addr).await;
    assert_eq!(
        code, 10,
        "authentication request {code} instead of SASL (10)"
    );
    assert_eq!(
        body,
        b"SCRAM-SHA-256\0\0",
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    let ok = psql(c.addr, "reshard", Some("s3cret"), "SHOW LAG").await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let bad = psql(c.addr, "reshard", Some("wrong"), "SHOW LAG").await;
    assert!(!bad.status.success(), "a wrong password was accepted");
    c.stop().await;
}

// See: issue #11 item 12.
/// With `tls_cert`/`tls_key` the console speaks TLS: psql with `sslmode=require` connects
/// (and SCRAM runs inside TLS); a client without TLS is refused with the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_speaks_tls_when_a_certificate_is_configured() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = tls_console(rt.handle.clone(), "s3cret", dir.path()).await;
    let ok = psql_ssl(c.addr, "s3cret", "require", "SHOW LAG").await;
    assert!(ok.status.success(), "sslmode=require: {}", stderr(&ok));
    assert!(stdout(&ok).contains("shard0"), "{}", stdout(&ok));
    let plain = psql_ssl(c.addr, "s3cret", "disable", "SHOW LAG").await;
    assert!(
        !plain.status.success(),
        "a connection without TLS was accepted"
    );
    assert!(
        stderr(&plain).contains("requires TLS") && stderr(&plain).contains("sslmode=require"),
        "{}",
        stderr(&plain)
    );
    c.stop().await;
}

// See: issue #11 item 12.
/// A non-loopback `listen` without a password is refused before anything is served, naming
/// the config keys and the ways out; with a password it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_refuses_a_non_loopback_listen_without_a_password() {
    let rt = runtime();
    let (tx, rx) = shutdown::channel();
    let auth = AdminAuth {
        user: "reshard".into(),
        password: None,
        tls: None,
    };
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        admin::serve("0.0.0.0:0", auth, rt.handle.clone(), rx.clone()),
    )
    .await
    .expect("the console served on 0.0.0.0 without a password instead of refusing");
    let e = r.unwrap_err().to_string();
    for needle in ["0.0.0.0:", "admin.listen", "admin.password", "127.0.0.1"] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let auth = AdminAuth {
        user: "reshard".into(),
        password: Some("s3cret".into()),
        tls: None,
    };
    let served = tokio::spawn(admin::serve("0.0.0.0:0", auth, rt.handle.clone(), rx));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!served.is_finished(), "{:?}", served.await);
    tx.shutdown();
    served.await.unwrap().unwrap();
}
