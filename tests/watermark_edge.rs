//! The watermark load (`[snapshot] mode = "watermark"`) while the source's tables are
//! rewritten (`ALTER TABLE … TYPE … USING`, `VACUUM FULL`, `CLUSTER`), truncated or dropped by
//! other sessions. See: issue #16.
//!
//! A rewrite swaps the table's file: a chunk whose snapshot was taken before the rewrite
//! committed and whose read came after it would see the new file through an old snapshot
//! (PostgreSQL: "not MVCC-safe", <https://www.postgresql.org/docs/current/mvcc-caveats.html>),
//! an empty table, and end the load there. The tests make that interleaving certain: a session
//! holds `ACCESS SHARE` on the tables, the rewrite queues behind it, the load's next chunk
//! queues behind the rewrite, and only then is the first lock released.
//!
//! Correctness is judged by PostgreSQL's own hash partitioning (`satisfies_hash_partition`),
//! never by reshard's routing code.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{TableCheck, Topology};
use crate::robust::{seed, Writer, SCHEMA, TABLES};
use crate::watermark::{chunks, finished};

/// The rewritten tables and what rewrites each one while a chunk of it waits.
const REWRITES: &[(&str, &str)] = &[
    (
        "rw_alter",
        "ALTER TABLE rw_alter ALTER COLUMN name TYPE text USING name || ''",
    ),
    ("rw_vacuum", "VACUUM FULL rw_vacuum"),
    ("rw_cluster", "CLUSTER rw_cluster USING rw_cluster_pkey"),
    (
        "rw_truncate",
        "BEGIN; TRUNCATE rw_truncate; \
         INSERT INTO rw_truncate SELECT g % 97 + 1, g, 'post' || g, 1 \
         FROM generate_series(1, 6000, 2) g; COMMIT",
    ),
];

const ROWS: i64 = 6000;

fn table_ddl(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (account_id bigint NOT NULL, id bigint NOT NULL, name text, n int, \
         PRIMARY KEY (account_id, id));"
    )
}

fn checks(names: &[&'static str]) -> Vec<TableCheck<'static>> {
    names
        .iter()
        .map(|n| (*n, Some(("account_id", "bigint")), "account_id, id"))
        .collect()
}

fn int(t: &Topology, sql: &str) -> i64 {
    let v = t.source_sql(sql);
    v.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {v:?}: {e}"))
}

/// A `psql` session on the source fed statement by statement.
struct Session {
    child: Child,
}

impl Session {
    fn open(t: &Topology, name: &str) -> Session {
        let psql = reshard_harness::bindir().expect("bindir").join("psql");
        let url = format!("{}?application_name={name}", t.source.url("app"));
        let child = Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql");
        Session { child }
    }

    fn send(&mut self, sql: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{sql}").expect("write to psql");
        stdin.flush().expect("flush psql");
    }

    fn close(mut self) {
        drop(self.child.stdin.take());
        let st = self.child.wait().expect("psql");
        assert!(st.success(), "psql session failed: {st}");
    }
}

/// `sql` on the source in its own `psql`, not waited for.
fn background(t: &Topology, sql: &str) -> Child {
    let psql = reshard_harness::bindir().expect("bindir").join("psql");
    Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .arg(t.source.url("app"))
        .args(["-c", sql])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql")
}

/// Sessions waiting for `mode` on `table` (locks not yet granted).
fn waiting(t: &Topology, table: &str, mode: &str) -> i64 {
    int(
        t,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = '{mode}' \
             AND relation = to_regclass('public.{table}')"
        ),
    )
}

fn filenode(t: &Topology, table: &str) -> String {
    t.source_sql(&format!("SELECT pg_relation_filenode('public.{table}')"))
}

/// A rewrite or a TRUNCATE committed while a chunk of the table waits for its lock: the chunk
/// reads the new file under a snapshot that sees the rewrite (it takes its lock before its
/// snapshot), so no row is lost, and the TRUNCATE in the stream removes exactly the rows of
/// the chunks read before it. Every shard ends equal to its share.
#[test]
fn a_table_rewritten_or_truncated_while_a_chunk_waits_loses_no_rows() {
    let mut t = Topology::start(2);
    let names: Vec<&'static str> = REWRITES.iter().map(|r| r.0).collect();
    let ddl: String = names.iter().map(|n| table_ddl(n)).collect();
    t.ddl_everywhere(&ddl);
    for n in &names {
        t.source_sql(&format!(
            "INSERT INTO {n} SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, {ROWS}) g"
        ));
    }
    t.source_sql("VACUUM ANALYZE");
    // 24k rows at 2000 rows/s, 12 chunks per table: about a chunk per second per table.
    t.write_config(
        "[snapshot]\nmode = \"watermark\"\nparallel = 4\nchunk_rows = 500\nmax_rows_per_sec = 2000\n",
    );
    // Granted at once (ACCESS SHARE conflicts only with ACCESS EXCLUSIVE); the rewrites queue
    // behind it later.
    let mut holder = Session::open(&t, "test_holder");
    holder.send(&format!(
        "BEGIN; LOCK TABLE {} IN ACCESS SHARE MODE;",
        names.join(", ")
    ));
    t.wait("the holder's locks", Duration::from_secs(10), || {
        let held = int(
            &t,
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'test_holder' AND l.granted \
             AND l.relation::regclass::text LIKE 'rw\\_%'",
        );
        (held == names.len() as i64).then_some(())
    });
    let d = t.spawn_run(&[]);
    t.wait(
        "2 chunks of every table on every shard",
        Duration::from_secs(60),
        || {
            names
                .iter()
                .all(|n| (0..2).all(|s| chunks(&t, s, &format!("public.{n}")).len() >= 2))
                .then_some(())
        },
    );
    // Dead rows and new versions for VACUUM FULL to sort out.
    t.source_sql("UPDATE rw_vacuum SET n = n + 1 WHERE id % 3 = 0");
    let before: Vec<String> = names.iter().map(|n| filenode(&t, n)).collect();
    let rewriters: Vec<Child> = REWRITES
        .iter()
        .map(|(_, sql)| background(&t, sql))
        .collect();
    for n in &names {
        t.wait(
            &format!("the rewrite of {n} to queue"),
            Duration::from_secs(20),
            || (waiting(&t, n, "AccessExclusiveLock") == 1).then_some(()),
        );
    }
    for n in &names {
        t.wait(
            &format!("the next chunk of {n} to queue behind its rewrite"),
            Duration::from_secs(30),
            || (waiting(&t, n, "AccessShareLock") >= 1).then_some(()),
        );
    }
    assert!(
        names.iter().all(|n| !finished(&t, &format!("public.{n}"))),
        "a table finished loading before its rewrite:\n{}",
        t.all_logs()
    );
    holder.send("COMMIT;");
    holder.close();
    for (mut r, (n, _)) in rewriters.into_iter().zip(REWRITES) {
        let st = r.wait().expect("rewrite");
        let mut err = String::new();
        if let Some(mut e) = r.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(st.success(), "rewriting {n}: {err}");
    }
    for (n, old) in names.iter().zip(&before) {
        assert_ne!(&filenode(&t, n), old, "{n} was not rewritten");
    }
    t.wait("the full load to finish", Duration::from_secs(90), || {
        t.last_log().contains("full load done").then_some(())
    });
    // Changes after the load stream on top of the chunks.
    for n in &names {
        t.source_sql(&format!(
            "UPDATE {n} SET n = n + 10 WHERE id % 7 = 0; DELETE FROM {n} WHERE id % 11 = 0; \
             INSERT INTO {n} VALUES (5, 100000, 'after', 0)"
        ));
    }
    t.wait_converged(&checks(&names), Duration::from_secs(60));
    let left = int(&t, "SELECT count(*) FROM rw_alter");
    assert!(
        left > ROWS / 2,
        "rw_alter has only {left} rows on the source"
    );
    t.stop_cleanly(d);
}

/// TRUNCATE on the source between chunks, twice, under a live writer: the chunks read before
/// it lose their rows, the chunks read after it keep theirs (rows written after the TRUNCATE),
/// and every shard ends equal to its share.
#[test]
fn a_truncate_between_chunks_wins_over_the_earlier_chunks_only() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 500) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 197 + 1, g, 'pre' || g, 0 FROM generate_series(1, 30000) g",
    );
    t.source_sql("INSERT INTO audit SELECT g % 89 + 1, 'pre', g FROM generate_series(1, 500) g");
    t.source_sql("VACUUM ANALYZE");
    t.write_config(
        "[snapshot]\nmode = \"watermark\"\nparallel = 2\nchunk_rows = 1000\nmax_rows_per_sec = 2000\n",
    );
    let writer = Writer::start(t.source.url("app"), seed(), false);
    let d = t.spawn_run(&[]);
    for (round, after) in [(1, 3), (2, 6)] {
        t.wait(
            &format!("{after} chunks of items on every shard"),
            Duration::from_secs(60),
            || {
                (0..2)
                    .all(|s| chunks(&t, s, "public.items").len() >= after)
                    .then_some(())
            },
        );
        assert!(
            !finished(&t, "public.items"),
            "the load finished before TRUNCATE {round}:\n{}",
            t.all_logs()
        );
        // Rows in the ranges of the chunks already read and of those still to come.
        t.source_sql(&format!(
            "BEGIN; TRUNCATE items; INSERT INTO items SELECT g % 197 + 1, g, 't{round}.' || g, \
             {round} FROM generate_series(1, 30000, 4) g; COMMIT"
        ));
    }
    t.wait("the full load to finish", Duration::from_secs(90), || {
        t.last_log().contains("full load done").then_some(())
    });
    let commits = writer.finish();
    assert!(
        commits > 10,
        "the writer made too little progress ({commits} commits)"
    );
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.stop_cleanly(d);
}

/// A table dropped on the source while it is loaded stops the load with an error that names
/// the table and says what to do, instead of waiting or loading a part of it.
#[test]
fn a_table_dropped_mid_load_stops_the_load_naming_it() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(&(table_ddl("rw_drop") + &table_ddl("rw_keep")));
    for n in ["rw_drop", "rw_keep"] {
        t.source_sql(&format!(
            "INSERT INTO {n} SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, {ROWS}) g"
        ));
    }
    t.write_config(
        "[snapshot]\nmode = \"watermark\"\nparallel = 2\nchunk_rows = 500\nmax_rows_per_sec = 2000\n",
    );
    let d = t.spawn_run(&[]);
    t.wait(
        "2 chunks of rw_drop on every shard",
        Duration::from_secs(60),
        || {
            (0..2)
                .all(|s| chunks(&t, s, "public.rw_drop").len() >= 2)
                .then_some(())
        },
    );
    t.source_sql("DROP TABLE rw_drop");
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert!(
        code.is_some_and(|c| c != 0),
        "the run did not stop with an error after the table was dropped (exit {code:?}):\n{log}"
    );
    assert!(
        log.contains("public.rw_drop") && log.contains("dropped"),
        "the error does not name the dropped table:\n{log}"
    );
}
