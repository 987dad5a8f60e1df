//! The shard key outside the replica identity: a Rails-shaped schema (surrogate `id` primary
//! keys, `account_id` a plain NOT NULL column) migrated through the real `reshard` binary.
//!
//! Without a strategy `check` FAILs with the fix SQL and `run` refuses before anything is
//! created or copied; `check --fix` builds the replica identity indexes concurrently; the
//! migration then converges under a live writer with updates, deletes and key moves. With
//! `key_immutable = true` (no index) it converges too, DELETEs by primary key reaching every
//! shard, and `verify` reports a row whose key was changed against the promise.
//!
//! Correctness is judged by PostgreSQL's own hash partitioning (`satisfies_hash_partition`),
//! never by reshard's routing code. See: issue #12.

use std::time::Duration;

use crate::common::{TableCheck, Topology};

/// The source: Rails' shape, foreign keys included.
const SOURCE_SCHEMA: &str = "
CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (id bigserial PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts (id),
                    email text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON users (account_id);
CREATE TABLE orders (id bigserial PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts (id),
                     user_id bigint REFERENCES users (id), total numeric(12,2), status text);
CREATE INDEX ON orders (account_id);
CREATE TABLE line_items (id bigserial PRIMARY KEY, account_id bigint NOT NULL,
                         order_id bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
                         sku text, qty int);
";

/// The shards: the same tables without foreign keys (a moved user's orders stay with their
/// account, so cross-row references do not hold per shard).
const SHARD_SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (id bigint PRIMARY KEY, account_id bigint NOT NULL, email text NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint PRIMARY KEY, account_id bigint NOT NULL, user_id bigint,
                     total numeric(12,2), status text);
CREATE TABLE line_items (id bigint PRIMARY KEY, account_id bigint NOT NULL, order_id bigint NOT NULL,
                         sku text, qty int);
";

const DATA: &str = "
INSERT INTO accounts (name) SELECT 'acct ' || a FROM generate_series(1, 30) a;
INSERT INTO users (account_id, email) SELECT 1 + u % 30, 'u' || u || '@example.com'
  FROM generate_series(1, 300) u;
INSERT INTO orders (account_id, user_id, total, status) SELECT u.account_id, u.id, o * 1.25, 'new'
  FROM generate_series(1, 1000) o JOIN users u ON u.id = 1 + o % 300;
INSERT INTO line_items (account_id, order_id, sku, qty) SELECT o.account_id, o.id, 'sku' || l, l % 7
  FROM generate_series(1, 3000) l JOIN orders o ON o.id = 1 + l % 1000;
";

const TABLES: &[TableCheck<'static>] = &[
    ("accounts", Some(("id", "bigint")), "id"),
    ("users", Some(("account_id", "bigint")), "id"),
    ("orders", Some(("account_id", "bigint")), "id"),
    ("line_items", Some(("account_id", "bigint")), "id"),
];

/// `[[tables]]`: accounts sharded by their own id, the rest by account_id; `immutable` is
/// appended to `[routing]`.
fn tables_config(routing: &str) -> String {
    format!(
        "[routing]\n{routing}\n\n[[tables]]\nname = \"accounts\"\nkey = \"id\"\n\n\
         [[tables]]\nname = \"users\"\n\n[[tables]]\nname = \"orders\"\n\n\
         [[tables]]\nname = \"public.line_items\"\n"
    )
}

fn rails(shards: usize) -> Topology {
    let t = Topology::start(shards);
    t.source_sql(SOURCE_SCHEMA);
    t.shards_sql(SHARD_SCHEMA);
    t.source_sql(DATA);
    t
}

/// A live writer on the source: `rounds` rounds of inserts, updates and deletes (and, with
/// `key_moves`, rows moved to other accounts). Returns when done.
fn spawn_writer(url: String, rounds: usize, key_moves: bool) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("writer connects");
            tokio::spawn(conn);
            let pick = |t: &str| format!("(SELECT (random() * max(id))::bigint FROM {t})");
            for i in 0..rounds {
                let mut sql = format!(
                    "INSERT INTO users (account_id, email) VALUES (1 + (random() * 29)::int, 'live{i}@example.com');
                     INSERT INTO orders (account_id, user_id, total, status)
                       SELECT account_id, id, {i}, 'new' FROM users WHERE id = currval('users_id_seq');
                     INSERT INTO line_items (account_id, order_id, sku, qty)
                       SELECT account_id, id, 'live' || {i}, 1 FROM orders WHERE id = currval('orders_id_seq');
                     UPDATE orders SET status = 'paid', total = total + 1 WHERE id = {o};
                     UPDATE line_items SET qty = qty + 1 WHERE id = {l};
                     UPDATE users SET email = 'changed{i}@example.com' WHERE id = {u};
                     DELETE FROM line_items WHERE id = {l};",
                    o = pick("orders"),
                    l = pick("line_items"),
                    u = pick("users"),
                );
                if i % 5 == 0 {
                    // Cascades to the order's line items (each a DELETE of its own).
                    sql.push_str(&format!("DELETE FROM orders WHERE id = {};", pick("orders")));
                }
                if i % 10 == 0 {
                    sql.push_str(&format!(
                        "INSERT INTO accounts (name) VALUES ('live {i}'); \
                         UPDATE accounts SET name = name || '!' WHERE id = {};",
                        pick("accounts")
                    ));
                }
                if key_moves && i % 3 == 0 {
                    for t in ["users", "orders", "line_items"] {
                        sql.push_str(&format!(
                            "UPDATE {t} SET account_id = 1 + (random() * 29)::int WHERE id = {};",
                            pick(t)
                        ));
                    }
                }
                c.batch_execute(&sql).await.expect("writer statement");
            }
            rounds
        })
    })
}

fn check(t: &Topology, args: &[&str]) -> (i32, String, String) {
    let cfg = t.config_path();
    let mut all = vec!["check", "-c", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    t.reshard(&all)
}

fn check_json(t: &Topology) -> (i32, serde_json::Value) {
    let (code, out, err) = check(t, &["--json"]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"));
    (code, v)
}

fn verify(t: &Topology) -> (i32, serde_json::Value) {
    let cfg = t.config_path();
    let (code, out, err) = t.reshard(&[
        "verify",
        "-c",
        cfg.to_str().unwrap(),
        "--json",
        "--timeout",
        "120",
    ]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"));
    (code, v)
}

/// Without a strategy: `check` FAILs with the index SQL and `run` refuses before anything is
/// created or copied. `check --fix` builds the indexes (replacing an INVALID leftover of an
/// interrupted build), is idempotent, and then the migration converges under a live writer with
/// updates, deletes and key moves, and verify passes.
#[test]
fn run_refuses_without_a_strategy_and_check_fix_makes_key_moves_exact() {
    let mut t = rails(3);
    t.write_config(&tables_config(""));

    // run refuses, naming every table and the fix, having created and copied nothing (it used
    // to load everything and stop at the first UPDATE).
    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(code, Some(2), "run must refuse to start:\n{log}");
    for needle in [
        "public.users: shard key account_id is not part of the replica identity (id)",
        "public.line_items: shard key account_id",
        "CREATE UNIQUE INDEX CONCURRENTLY \"orders_account_id_reshard_ri\"",
        "reshard check --fix",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
    assert_eq!(
        t.source_sql("SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)"),
        "0",
        "run created a slot or publication before refusing"
    );
    for (i, s) in t.shards.iter().enumerate() {
        let n = s
            .psql(
                "app",
                "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM accounts)",
            )
            .unwrap();
        assert_eq!(n, "0", "shard{i} got rows from a run that refused");
    }

    // check: exit 1, one FAIL per surrogate-key table, with the same message and the SQL.
    let (code, report) = check_json(&t);
    assert_eq!(code, 1, "{report:#}");
    for table in ["users", "orders", "line_items"] {
        let line = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["status"] == "fail"
                    && c["check"] == "shard_key"
                    && c["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with(&format!("public.{table}: shard key account_id is not part of the replica identity (id)"))
            })
            .unwrap_or_else(|| panic!("no shard_key FAIL for {table}: {report:#}"));
        let fix = line["fix"].as_str().unwrap_or_default();
        assert!(
            fix.contains(&format!(
                "CREATE UNIQUE INDEX CONCURRENTLY \"{table}_account_id_reshard_ri\" ON \"public\".\"{table}\" (\"id\", \"account_id\");"
            )) && fix.contains(&format!(
                "ALTER TABLE \"public\".\"{table}\" REPLICA IDENTITY USING INDEX \"{table}_account_id_reshard_ri\";"
            )) && fix.contains("key_immutable = true")
                && fix.contains("REPLICA IDENTITY FULL"),
            "{table}: {fix}"
        );
    }

    // An interrupted concurrent build leaves an INVALID index under the name --fix uses.
    let failed = t.source.psql(
        "app",
        "CREATE UNIQUE INDEX CONCURRENTLY orders_account_id_reshard_ri ON orders (status)",
    );
    assert!(failed.is_err(), "duplicate statuses must fail the build");
    assert_eq!(
        t.source_sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_account_id_reshard_ri'::regclass"),
        "f"
    );

    // --fix under a live writer: concurrent builds, the INVALID one dropped and rebuilt.
    let writer = spawn_writer(t.source.url("app"), 60, true);
    let (code, out, err) = check(&t, &["--fix"]);
    assert_eq!(
        code, 0,
        "check --fix must leave a passing setup:\n{out}\n{err}"
    );
    for needle in [
        "done public.orders: dropped INVALID index orders_account_id_reshard_ri",
        "done public.users: CREATE UNIQUE INDEX CONCURRENTLY \"users_account_id_reshard_ri\" ON \"public\".\"users\" (\"id\", \"account_id\")",
        "done public.line_items: ALTER TABLE \"public\".\"line_items\" REPLICA IDENTITY USING INDEX \"line_items_account_id_reshard_ri\"",
        "0 failed",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    assert_eq!(writer.join().expect("writer"), 60);
    assert_eq!(
        t.source_sql(
            "SELECT string_agg(c.relname || ':' || c.relreplident::text || ':' || i.indisvalid::text, ' ' ORDER BY c.relname) \
             FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid AND i.indisreplident \
             WHERE c.relname IN ('users', 'orders', 'line_items')"
        ),
        "line_items:i:true orders:i:true users:i:true"
    );
    // Idempotent.
    let (code, out, _) = check(&t, &["--fix"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("--fix: nothing to fix"), "{out}");

    // The migration: full load and CDC under a live writer with key moves.
    let writer = spawn_writer(t.source.url("app"), 400, true);
    let d = t.spawn_run(&[]);
    assert_eq!(writer.join().expect("writer"), 400);
    // Every kind of change once more after the load, including key moves that change shard.
    t.wait_slot_active(Duration::from_secs(60));
    let writer = spawn_writer(t.source.url("app"), 100, true);
    assert_eq!(writer.join().expect("writer"), 100);
    t.wait_converged(TABLES, Duration::from_secs(180));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    let (code, report) = verify(&t);
    assert_eq!(code, 0, "verify: {report:#}");
    t.stop_cleanly(d);
}

/// `key_immutable = true`: no index, no FULL. The migration converges under a live writer
/// with updates and deletes (each DELETE by primary key goes to every shard, cascades
/// included), and verify passes.
#[test]
fn key_immutable_migrates_a_rails_schema_under_a_live_writer() {
    let mut t = rails(3);
    // Global, with the per-table override exercised on accounts (whose key is its PK anyway).
    t.write_config(
        &tables_config("key_immutable = true")
            .replace("key = \"id\"\n", "key = \"id\"\nkey_immutable = false\n"),
    );
    let (code, report) = check_json(&t);
    assert_eq!(code, 0, "key_immutable is a strategy: {report:#}");
    assert!(
        report["checks"].as_array().unwrap().iter().any(|c| c["check"] == "shard_key"
            && c["detail"].as_str().unwrap_or_default().contains("public.users.account_id (bigint) is outside the replica identity (id); key_immutable = true")),
        "{report:#}"
    );

    let writer = spawn_writer(t.source.url("app"), 400, false);
    let d = t.spawn_run(&[]);
    assert_eq!(writer.join().expect("writer"), 400);
    t.wait_slot_active(Duration::from_secs(60));
    let writer = spawn_writer(t.source.url("app"), 100, false);
    assert_eq!(writer.join().expect("writer"), 100);
    t.wait_converged(TABLES, Duration::from_secs(180));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    let (code, report) = verify(&t);
    assert_eq!(code, 0, "verify: {report:#}");
    t.stop_cleanly(d);
}

/// `key_immutable = true` but a row's key changes anyway: the row stays on its old shard, and
/// verify reports it there as a row on the wrong shard (naming the shard it belongs to) and
/// missing where it belongs, instead of passing.
#[test]
fn verify_reports_a_row_left_behind_when_key_immutable_is_violated() {
    let mut t = rails(2);
    t.write_config(&tables_config("key_immutable = true"));
    let d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(120));
    let shard_of = |account: i64| -> usize {
        t.source_sql(&format!(
            "CREATE TEMP TABLE route_helper (k bigint) PARTITION BY HASH (k); \
             SELECT r FROM generate_series(0, 1) r WHERE satisfies_hash_partition('route_helper'::regclass, 2, r, {account}::bigint)"
        ))
        .parse()
        .expect("remainder")
    };
    let user: i64 = t.source_sql("SELECT min(id) FROM users").parse().unwrap();
    let from: i64 = t
        .source_sql(&format!("SELECT account_id FROM users WHERE id = {user}"))
        .parse()
        .unwrap();
    let to = (1..=30).find(|&a| shard_of(a) != shard_of(from)).unwrap();
    t.source_sql(&format!(
        "UPDATE users SET account_id = {to} WHERE id = {user}"
    ));
    let (code, report) = verify(&t);
    assert_eq!(
        code, 1,
        "a violated key_immutable must fail verify: {report:#}"
    );
    // Keys are (account_id, id); a stale row names the shard it belongs to.
    let diffs: Vec<(String, String, String, String)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["table"] == "public.users")
        .flat_map(|r| {
            r["differences"].as_array().unwrap().iter().map(move |d| {
                (
                    r["shard"].as_str().unwrap().to_owned(),
                    d["kind"].as_str().unwrap().to_owned(),
                    d["key"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap_or("NULL"))
                        .collect::<Vec<_>>()
                        .join(","),
                    d["belongs_to"].as_str().unwrap_or("-").to_owned(),
                )
            })
        })
        .collect();
    let old = format!("shard{}", shard_of(from));
    let new = format!("shard{}", shard_of(to));
    assert!(
        diffs.contains(&(
            old.clone(),
            "extra".into(),
            format!("{from},{user}"),
            new.clone()
        )),
        "the stale row on {old}: {diffs:?}\n{report:#}"
    );
    assert!(
        diffs.contains(&(
            new.clone(),
            "missing".into(),
            format!("{to},{user}"),
            "-".into()
        )),
        "the row missing on {new}: {diffs:?}\n{report:#}"
    );
    t.stop_cleanly(d);
}

/// `check --fix` never builds on a key that may be NULL (an identity index needs NOT NULL
/// columns) nor on a table without a usable unique key; it says why and `check` still FAILs.
#[test]
fn check_fix_leaves_a_nullable_key_and_a_table_without_a_key_alone() {
    let t = Topology::start(1);
    t.ddl_everywhere(
        "CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint, body text);
         CREATE TABLE logs (account_id bigint NOT NULL, msg text);",
    );
    t.write_config("");
    let (code, out, err) = check(&t, &["--fix"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("NOT DONE public.notes: skipped: account_id may be NULL"),
        "{out}"
    );
    let fixes = out.split("STATUS").next().unwrap_or_default();
    assert!(
        !fixes.contains("public.logs"),
        "no fix action on a keyless table: {out}"
    );
    assert_eq!(
        t.source_sql(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             WHERE c.relname IN ('notes', 'logs') AND NOT i.indisprimary"
        ),
        "0",
        "--fix built an index it must not build"
    );
    assert_eq!(
        t.source_sql("SELECT string_agg(relreplident::text, '' ORDER BY relname) FROM pg_class WHERE relname IN ('logs', 'notes')"),
        "dd"
    );
}

// Found by the outside-user acceptance runs (explore).
/// A table without a row identity (no primary key, REPLICA IDENTITY DEFAULT): publishing it
/// would make the source refuse the application's UPDATEs and DELETEs on it. `run` refuses
/// (exit 2) naming the table and the fix, before any publication or slot exists, and the
/// source still takes UPDATEs on it; with REPLICA IDENTITY FULL it migrates.
#[test]
fn run_refuses_a_table_without_row_identity_instead_of_breaking_source_updates() {
    let t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE events (account_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (account_id, id));
         CREATE TABLE notes (account_id bigint NOT NULL, body text);
         CREATE TABLE settings (name text, value text)",
    );
    t.source_sql(
        "INSERT INTO events SELECT g % 7, g FROM generate_series(1, 100) g;
         INSERT INTO notes SELECT g % 7, 'n' FROM generate_series(1, 100) g;
         INSERT INTO settings VALUES ('a', '1')",
    );
    t.write_config("");
    let mut t = t;
    let d = t.spawn_run(&[]);
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(code, Some(2), "run must refuse to start:\n{}", t.all_logs());
    for needle in [
        "public.notes: no primary key and REPLICA IDENTITY DEFAULT",
        "public.settings: no primary key",
        "ALTER TABLE \"public\".\"notes\" REPLICA IDENTITY FULL",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
    assert_eq!(
        t.source_sql("SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)"),
        "0",
        "run created a slot or publication before refusing"
    );
    // The application's writes still work.
    t.source_sql("UPDATE notes SET body = 'x' WHERE account_id = 1; DELETE FROM settings");

    t.source_sql(
        "ALTER TABLE notes REPLICA IDENTITY FULL; ALTER TABLE settings REPLICA IDENTITY FULL",
    );
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.source_sql(
        "UPDATE notes SET body = 'y' WHERE account_id = 2; INSERT INTO settings VALUES ('b', '2')",
    );
    t.wait_converged(
        &[
            ("events", Some(("account_id", "bigint")), "account_id, id"),
            ("notes", Some(("account_id", "bigint")), "account_id, body"),
            ("settings", None, "name, value"),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(
        t.terminate(d, Duration::from_secs(30)),
        Some(0),
        "{}",
        t.all_logs()
    );
}
