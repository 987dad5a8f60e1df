//! End-to-end CDC through the real `reshard run` daemon: a source and three shards.
//!
//! Correctness is always judged by PostgreSQL's own hash partitioning
//! (`satisfies_hash_partition`), never by reshard's routing code.

use std::time::{Duration, Instant};

use crate::common::{wait_for, Topology};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (
    account_id bigint NOT NULL,
    id int NOT NULL,
    name text,
    qty numeric,
    tags text[],
    doc jsonb,
    feeling mood,
    span int4range,
    raw bytea,
    big text,
    PRIMARY KEY (account_id, id)
);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE audit (account_id bigint NOT NULL, msg text, n int);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL);
";

pub const TABLES: &[crate::common::TableCheck<'static>] = &[
    ("items", Some(("account_id", "bigint")), "account_id, id"),
    (
        "audit",
        Some(("account_id", "bigint")),
        "account_id, msg, n",
    ),
    ("plans", None, "id"),
];

fn wait_slot(t: &Topology) {
    wait_for("the slot to be streaming", Duration::from_secs(60), || {
        let active = t.source_sql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reshard' AND active",
        );
        (active == "1").then_some(())
    });
}

/// Inserts, updates, deletes, key moves, unchanged TOAST, TRUNCATE, a broadcast table, a
/// REPLICA IDENTITY FULL table without a primary key and a composite key: after catching up,
/// each shard holds exactly the source rows whose hash partition is that shard.
#[test]
fn every_kind_of_change_reaches_the_right_shard() {
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans VALUES (1, 'free'), (2, 'pro')");
    t.source_sql(
        "INSERT INTO items SELECT a, i, 'pre ' || i, i * 1.5, ARRAY['x'], '{\"pre\":true}', 'ok', \
         int4range(i, i + 10), '\\x00ff', NULL FROM generate_series(1, 20) a, generate_series(1, 5) i",
    );
    t.write_config("");
    let d = t.spawn_run(&[]);
    wait_slot(&t);

    t.source_sql(
        "INSERT INTO items SELECT a, i, 'n' || i, 1.50000000000000000001, ARRAY['a', 'b c', NULL], \
         jsonb_build_object('a', a, 'i', i), 'happy', int4range(1, i + 2), decode('00ff7f', 'hex'), \
         repeat(md5(a::text || i::text), 200) FROM generate_series(1, 50) a, generate_series(10, 14) i",
    );
    t.source_sql("UPDATE items SET name = 'tab\there', qty = NULL WHERE id = 10");
    // Leaves the TOASTed `big` unchanged.
    t.source_sql("UPDATE items SET feeling = 'sad' WHERE id = 11 AND account_id % 3 = 0");
    t.source_sql("DELETE FROM items WHERE id = 12 AND account_id % 2 = 0");
    // Key moves: rows change account, hence (mostly) shard. (A moved row must not carry an
    // unchanged TOAST value under REPLICA IDENTITY DEFAULT: that is a clear error by design.)
    t.source_sql(
        "UPDATE items SET account_id = account_id + 1000 WHERE id = 3 AND account_id <= 15",
    );
    t.source_sql(
        "BEGIN; INSERT INTO audit SELECT a, 'm' || a, a FROM generate_series(1, 60) a; COMMIT",
    );
    t.source_sql("UPDATE audit SET n = n * 10 WHERE account_id % 4 = 0");
    t.source_sql("DELETE FROM audit WHERE account_id % 5 = 0");
    t.source_sql(
        "INSERT INTO plans VALUES (3, 'enterprise'); UPDATE plans SET name = 'Free' WHERE id = 1",
    );
    t.source_sql("TRUNCATE plans; INSERT INTO plans VALUES (7, 'after truncate')");
    t.source_sql("BEGIN; DELETE FROM items WHERE id = 1; INSERT INTO items (account_id, id, name) SELECT a, 1, 're' FROM generate_series(1, 20) a; COMMIT");

    t.wait_converged(TABLES, Duration::from_secs(90));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

/// A shard that is down does not stop the others; it catches up after it returns.
#[test]
fn a_stopped_shard_does_not_block_the_others_and_catches_up() {
    let mut t = Topology::start(3);
    t.ddl_everywhere(SCHEMA);
    t.write_config("");
    let d = t.spawn_run(&[]);
    wait_slot(&t);
    t.source_sql("INSERT INTO items (account_id, id, name) SELECT a, 1, 'before' FROM generate_series(1, 30) a");
    t.wait_converged(TABLES, Duration::from_secs(60));

    t.shards[1].stop().unwrap();
    t.source_sql("INSERT INTO items (account_id, id, name) SELECT a, 2, 'during' FROM generate_series(1, 300) a");
    t.source_sql("UPDATE items SET name = 'changed' WHERE id = 1");
    // The live shards converge while shard1 is down.
    let live = |t: &Topology| {
        [0usize, 2].iter().all(|&s| {
            let (a, b) = t.digests("items", Some(("account_id", "bigint")), "account_id, id", s);
            a == b
        })
    };
    wait_for(
        "shards 0 and 2 to apply while shard1 is down",
        Duration::from_secs(60),
        || live(&t).then_some(()),
    );
    assert!(
        t.is_running(d),
        "daemon exited while a shard was down:\n{}",
        t.all_logs()
    );

    t.shards[1].restart().unwrap();
    t.wait_converged(TABLES, Duration::from_secs(90));
}

// See: issue #11 item 5.
/// A key column stored out of line (a text key over 2 kB with STORAGE EXTERNAL), left unchanged
/// by an UPDATE of another column: PostgreSQL sends it as unchanged TOAST in the new tuple and
/// in full in the old key tuple. The update reaches the shard.
#[test]
fn update_of_a_row_whose_key_is_stored_out_of_line_reaches_the_shard() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE docs (account_id bigint NOT NULL, slug text NOT NULL, title text, \
         PRIMARY KEY (account_id, slug));
         ALTER TABLE docs ALTER COLUMN slug SET STORAGE EXTERNAL;",
    );
    t.write_config("");
    let d = t.spawn_run(&[]);
    wait_slot(&t);
    t.source_sql(
        "INSERT INTO docs SELECT a, repeat('k', 2100) || a, 'old' FROM generate_series(1, 20) a",
    );
    let toast_bytes = t.source_sql(
        "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'docs'::regclass",
    );
    assert_ne!(toast_bytes, "0", "the keys must be stored out of line");
    t.source_sql("UPDATE docs SET title = 'new'");
    const DOCS: &[crate::common::TableCheck<'static>] =
        &[("docs", Some(("account_id", "bigint")), "account_id, slug")];
    t.wait_converged(DOCS, Duration::from_secs(90));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: issue #11 item 4.
/// REPLICA IDENTITY FULL and no key anywhere: identical rows are distinct rows. Deleting or
/// updating one of three identical rows on the source changes exactly one on the shard.
#[test]
fn one_of_identical_rows_of_a_full_identity_table_is_changed_alone() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE likes (account_id bigint NOT NULL, what text, n int);
         ALTER TABLE likes REPLICA IDENTITY FULL;",
    );
    t.write_config("");
    let d = t.spawn_run(&[]);
    wait_slot(&t);
    t.source_sql(
        "INSERT INTO likes SELECT a, 'x', 1 FROM generate_series(1, 10) a, generate_series(1, 3)",
    );
    t.source_sql(
        "DELETE FROM likes WHERE ctid IN (SELECT min(ctid) FROM likes GROUP BY account_id)",
    );
    t.source_sql(
        "UPDATE likes SET n = 2 WHERE ctid IN (SELECT min(ctid) FROM likes GROUP BY account_id)",
    );
    assert_eq!(
        t.source_sql("SELECT count(*) FILTER (WHERE n = 1) || '/' || count(*) FROM likes"),
        "10/20"
    );
    const LIKES: &[crate::common::TableCheck<'static>] = &[(
        "likes",
        Some(("account_id", "bigint")),
        "account_id, what, n",
    )];
    t.wait_converged(LIKES, Duration::from_secs(90));
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: issue #14 (a caught-up shard should not wait out a batching delay when nothing else is
// coming).
/// With long batching delays configured (`[spill] flush_interval_ms` 10 s, `[apply]
/// batch_max_delay_ms` 10 min), a row written to an idle source still reaches its shard within
/// seconds: at the end of a burst the ingest hands what it read to the shards, and a shard whose
/// log has nothing more commits at once.
#[test]
fn a_caught_up_shard_applies_without_waiting_out_the_batching_delays() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    let p = t.write_config("");
    let cfg = std::fs::read_to_string(&p).expect("read config");
    let cfg = cfg
        .replace("flush_interval_ms = 10\n", "flush_interval_ms = 10000\n")
        .replace("batch_max_delay_ms = 20\n", "batch_max_delay_ms = 600000\n");
    assert!(
        cfg.contains("flush_interval_ms = 10000") && cfg.contains("batch_max_delay_ms = 600000")
    );
    std::fs::write(&p, cfg).expect("write config");
    let helper = t.create_route_helper("bigint");
    let d = t.spawn_run(&[]);
    wait_slot(&t);
    // The first row also waits for the start-up (the full load's hand-off to streaming
    // completes at a group commit): not timed.
    for account in 0..=4 {
        let written = Instant::now();
        t.source_sql(&format!(
            "INSERT INTO items (account_id, id, name) VALUES ({account}, 1, 'x')"
        ));
        let shard = t.source_sql(&format!(
            "SELECT k FROM generate_series(0, 1) k \
             WHERE satisfies_hash_partition('{helper}'::regclass, 2, k, {account}::bigint)"
        ));
        let shard: usize = shard.trim().parse().expect("shard index");
        wait_for("the row on its shard", Duration::from_secs(60), || {
            let n = t.shards[shard]
                .psql(
                    "app",
                    &format!("SELECT count(*) FROM items WHERE account_id = {account}"),
                )
                .ok()?;
            (n.trim() == "1").then_some(())
        });
        assert!(
            account == 0 || written.elapsed() < Duration::from_secs(8),
            "account {account}: applied after {:?}, i.e. after a batching delay\n{}",
            written.elapsed(),
            t.all_logs()
        );
    }
    t.stop_cleanly(d);
}

/// `TRUNCATE accounts CASCADE` on the source reaches `orders` (its FK) there; both are in the
/// message and are emptied on every shard, but the shard does not cascade further: a table only
/// shard0 has (`notes`, referencing `orders`) keeps its rows, and shard0 stops with an error
/// naming the shard, the table, the referencing table and the fix (native logical replication
/// refuses the same way). Before, the shard ran `TRUNCATE … CASCADE` and emptied `notes`.
#[test]
fn truncate_cascade_on_the_source_does_not_cascade_onto_shard_only_tables() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE accounts (account_id bigint PRIMARY KEY, name text);
         CREATE TABLE orders (account_id bigint NOT NULL REFERENCES accounts, id int NOT NULL,
                              PRIMARY KEY (account_id, id));",
    );
    t.shards[0]
        .psql(
            "app",
            "CREATE TABLE notes (account_id bigint, id int, body text, \
             FOREIGN KEY (account_id, id) REFERENCES orders)",
        )
        .unwrap();
    t.write_config("");
    let d = t.spawn_run(&[]);
    wait_slot(&t);
    t.source_sql(
        "INSERT INTO accounts SELECT a, 'a' || a FROM generate_series(1, 20) a; \
         INSERT INTO orders SELECT a, i FROM generate_series(1, 20) a, generate_series(1, 3) i",
    );
    let count = |i: usize, table: &str| {
        t.shards[i]
            .psql("app", &format!("SELECT count(*) FROM {table}"))
            .unwrap()
    };
    t.wait("the orders on both shards", Duration::from_secs(60), || {
        let n: Vec<i64> = (0..2)
            .map(|i| count(i, "orders").parse().unwrap())
            .collect();
        (n.iter().sum::<i64>() == 60 && n.iter().all(|&n| n > 0)).then_some(())
    });
    t.shards[0]
        .psql(
            "app",
            "INSERT INTO notes SELECT account_id, id, 'mine' FROM orders",
        )
        .unwrap();
    let notes = count(0, "notes");
    assert_ne!(notes, "0");

    t.source_sql("TRUNCATE accounts CASCADE");
    assert_eq!(t.source_sql("SELECT count(*) FROM orders"), "0");
    // shard1 has no table of its own: both published tables the cascade reached are emptied.
    t.wait("shard1 emptied", Duration::from_secs(60), || {
        (count(1, "accounts") == "0" && count(1, "orders") == "0").then_some(())
    });
    // shard0 stops on its own foreign key, naming it and the fix; `notes` keeps its rows.
    let err = t.wait("shard0 to stop", Duration::from_secs(60), || {
        let s = t.status_json()?;
        let sh = &s["shards"][0];
        let e = sh["last_error"].as_str().unwrap_or_default();
        (sh["state"] == "stopped").then(|| e.to_owned())
    });
    println!("shard0 says: {err}");
    for want in ["shard0", "public.orders", "notes", "0A000", "empty or drop"] {
        assert!(err.contains(want), "wants {want:?}: {err}");
    }
    assert_eq!(count(0, "notes"), notes, "the shard-only table was emptied");
    assert!(t.is_running(d), "daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}
