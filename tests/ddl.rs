//! Schema changes on the source while the daemon streams (issue #12, "Schema changes during
//! the migration"): `ADD COLUMN` in both `[apply] ddl` modes and both orders (shards first,
//! source first) under a live writer, and a non-additive change (RENAME) that pauses the
//! shards it touches until they match, with the daemon running throughout.
//!
//! Correctness is judged by PostgreSQL's own hash partitioning (`satisfies_hash_partition`),
//! never by reshard's routing code.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::{TableCheck, Topology};

const SCHEMA: &str = "
CREATE TABLE items (account_id bigint NOT NULL, id bigint NOT NULL, name text, n int,
                    PRIMARY KEY (account_id, id));
CREATE TABLE plans (id bigint PRIMARY KEY, name text NOT NULL);
";

const TABLES: &[TableCheck<'static>] = &[
    ("items", Some(("account_id", "bigint")), "account_id, id"),
    ("plans", None, "id"),
];

/// The additive change under test: a nullable column without a default and a NOT NULL one
/// with a default (existing rows take it on the source without any WAL for them).
const ADD_COLUMNS: &str =
    "ALTER TABLE items ADD COLUMN note text, ADD COLUMN score int NOT NULL DEFAULT 7";

/// What the writer's statements look like.
const PLAIN: u64 = 0;
/// Inserts and updates also write `note` and `score`.
const WITH_COLUMNS: u64 = 1;
/// `name` was renamed to `title`.
const RENAMED: u64 = 2;

/// A thread committing inserts, updates, deletes and key moves on the source until stopped;
/// its statements follow `shape` (set by the test after each source DDL).
struct Writer {
    stop: Arc<AtomicBool>,
    shape: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(url: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let shape = Arc::new(AtomicU64::new(PLAIN));
        let commits = Arc::new(AtomicU64::new(0));
        let (s, sh, c) = (stop.clone(), shape.clone(), commits.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(write_loop(url, s, sh, c))
        });
        Writer {
            stop,
            shape,
            commits,
            handle: Some(handle),
        }
    }

    fn set_shape(&self, shape: u64) {
        self.shape.store(shape, Ordering::SeqCst);
    }

    fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Waits for `n` more commits (the writer is alive and the source takes its statements).
    fn wait_commits(&self, t: &Topology, n: u64) {
        let target = self.commits() + n;
        t.wait(
            &format!("the writer to commit {n} more transactions"),
            Duration::from_secs(60),
            || {
                (self.commits() >= target || self.handle.as_ref().is_some_and(|h| h.is_finished()))
                    .then_some(())
            },
        );
    }

    /// Stops the writer; panics with its error if a statement failed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("the writer failed: {e}"),
                Err(_) => panic!("the writer panicked"),
            }
        }
        self.commits()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn write_loop(
    url: String,
    stop: Arc<AtomicBool>,
    shape: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("writer connect: {e}"))?;
    tokio::spawn(conn);
    let mut next: i64 = 1_000_000;
    let mut k: i64 = 0;
    while !stop.load(Ordering::SeqCst) {
        k += 1;
        next += 3;
        let (a, b, c) = (next, next + 1, next + 2);
        let acct = k % 97 + 1;
        let old = next - 30;
        let shape = shape.load(Ordering::SeqCst);
        let (name, extra_cols, extra_vals, extra_set) = match shape {
            PLAIN => ("name", "", String::new(), String::new()),
            WITH_COLUMNS => (
                "name",
                ", note, score",
                format!(", 'note{k}', {k}"),
                format!(", note = 'u{k}', score = score + 1"),
            ),
            _ => ("title", "", String::new(), String::new()),
        };
        let sql = format!(
            "BEGIN;\
             INSERT INTO items (account_id, id, {name}, n{extra_cols}) VALUES \
               ({acct}, {a}, 'i{a}', 0{extra_vals}), ({acct} + 1, {b}, 'i{b}', 0{extra_vals}), \
               ({acct} + 2, {c}, 'i{c}', 0{extra_vals});\
             UPDATE items SET n = n + 1, {name} = 'u{k}'{extra_set} WHERE id = {old};\
             DELETE FROM items WHERE id = {old} + 1;\
             UPDATE items SET account_id = account_id + 5 WHERE id = {old} + 2;\
             COMMIT;"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => {}
            // A statement built just before the test renamed a column on the source: build it
            // again with the new shape (the transaction rolled back; the ids are skipped).
            Err(e) if e.code().is_some_and(|c| c.code() == "42703") => {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| format!("writer: {e}"))?;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(e) => return Err(format!("writer: {e}\n{sql}")),
        }
        commits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Source, 2 shards, schema everywhere, some preloaded rows, the daemon started with
/// `[apply] ddl = mode` and streaming, and the writer running.
fn start(mode: &str) -> (Topology, usize, Writer) {
    start_with(mode, "")
}

/// Like [`start`], with `extra` DDL run everywhere before the daemon starts.
fn start_with(mode: &str, extra: &str) -> (Topology, usize, Writer) {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    if !extra.is_empty() {
        t.ddl_everywhere(extra);
    }
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 10) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, 500) g",
    );
    t.write_config_apply(&format!("ddl = \"{mode}\"\n"), "");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    let w = Writer::start(t.source.url("app"));
    w.wait_commits(&t, 20);
    (t, d, w)
}

/// The shards hold exactly their share of the source, the daemon still runs, and SIGTERM
/// is a clean exit.
fn converge_and_stop(mut t: Topology, d: usize, w: Writer) {
    w.wait_commits(&t, 20);
    let commits = w.finish();
    println!("writer committed {commits} transactions");
    t.wait_converged(TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

/// Waits until `reshard status --json` shows some shard waiting for DDL with a message that
/// contains every one of `words`; returns that message.
fn wait_ddl_state(t: &Topology, words: &[&str]) -> String {
    t.wait(
        "a shard to show \"waiting for DDL\" in status",
        Duration::from_secs(60),
        || {
            let st = t.status_json()?;
            st["shards"].as_array()?.iter().find_map(|s| {
                let err = s["last_error"].as_str().unwrap_or_default();
                (s["state"] == "waiting_for_ddl"
                    && err.contains("waiting for DDL")
                    && words.iter().all(|w| err.contains(w)))
                .then(|| err.to_owned())
            })
        },
    )
}

// See: issue #12 (ADD COLUMN on the source before the shards stopped every shard, then the
// daemon exited "every shard stopped").
/// wait mode, source first: the shards pause naming table and column, the daemon keeps
/// running, and once the column exists on the shards apply resumes by itself.
#[test]
fn ddl_wait_add_column_on_source_first_then_shards_resumes() {
    let (mut t, d, w) = start("wait");
    t.source_sql(ADD_COLUMNS);
    w.set_shape(WITH_COLUMNS);
    w.wait_commits(&t, 20);
    let msg = wait_ddl_state(&t, &["public.items", "note"]);
    println!("status says: {msg}");
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.shards_sql(ADD_COLUMNS);
    converge_and_stop(t, d, w);
}

/// wait mode, shards first: nothing pauses, nothing is lost.
#[test]
fn ddl_wait_add_column_on_shards_first_then_source() {
    let (t, d, w) = start("wait");
    t.shards_sql(ADD_COLUMNS);
    w.wait_commits(&t, 20);
    t.source_sql(ADD_COLUMNS);
    w.set_shape(WITH_COLUMNS);
    converge_and_stop(t, d, w);
}

/// propagate mode, source first: reshard adds the columns on every shard itself, with the
/// source's type, nullability and default, before the first change that carries them.
#[test]
fn ddl_propagate_add_column_on_source_first() {
    let (t, d, w) = start("propagate");
    t.source_sql(ADD_COLUMNS);
    w.set_shape(WITH_COLUMNS);
    w.wait_commits(&t, 20);
    t.wait("the columns on every shard", Duration::from_secs(60), || {
        t.shards.iter().all(|s| {
            s.psql(
                "app",
                "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-'), ', ' ORDER BY attnum) \
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE attrelid = 'items'::regclass AND attname IN ('note', 'score')",
            )
            .is_ok_and(|s| s == "note text false -, score integer true 7")
        })
        .then_some(())
    });
    converge_and_stop(t, d, w);
}

/// propagate mode, shards first: the shards already have the columns (ADD COLUMN IF NOT
/// EXISTS is a no-op), nothing pauses, nothing is lost.
#[test]
fn ddl_propagate_add_column_on_shards_first_then_source() {
    let (t, d, w) = start("propagate");
    t.shards_sql(ADD_COLUMNS);
    w.wait_commits(&t, 20);
    t.source_sql(ADD_COLUMNS);
    w.set_shape(WITH_COLUMNS);
    converge_and_stop(t, d, w);
}

/// A RENAME on the source is not additive: even in propagate mode the shards that receive the
/// table's changes pause, naming the table, both columns and the fix; the daemon keeps
/// running; after the operator renames the column on the shards apply resumes by itself.
#[test]
fn ddl_rename_on_source_pauses_the_table_until_the_shards_match() {
    let (mut t, d, w) = start("propagate");
    t.source_sql("ALTER TABLE items RENAME COLUMN name TO title");
    w.set_shape(RENAMED);
    w.wait_commits(&t, 20);
    let msg = wait_ddl_state(
        &t,
        &["public.items", "\"name\"", "\"title\"", "RENAME COLUMN"],
    );
    println!("status says: {msg}");
    // Nothing was added on a shard behind the operator's back.
    for (i, s) in t.shards.iter().enumerate() {
        let cols = s
            .psql("app", "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped")
            .unwrap();
        assert_eq!(cols, "account_id,id,name,n", "shard{i}");
    }
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.shards_sql("ALTER TABLE items RENAME COLUMN name TO title");
    converge_and_stop(t, d, w);
}

// Found by the outside-user acceptance runs (explore).
/// An ADD COLUMN on the source reaches a shard with the first change of that table it gets;
/// before that the shard lacks the column (verify leaves it out of the comparison). `cutover`
/// must not call such a shard SAFE (the application's reads and writes of the column would
/// fail there): exit 1 naming the column; once the shard has it, SAFE.
#[test]
fn cutover_is_not_safe_while_the_shard_lacks_a_source_column() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql(
        "INSERT INTO items SELECT g % 13, g, 'i', g FROM generate_series(1, 200) g;
         INSERT INTO plans VALUES (1, 'one')",
    );
    let cfg = t.write_config("");
    let cfg = cfg.to_str().unwrap().to_owned();
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.wait_converged(TABLES, Duration::from_secs(60));
    t.source_sql(ADD_COLUMNS);
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard0",
        "--timeout",
        "60",
    ]);
    assert_eq!(
        code, 1,
        "a shard without items.note must not be SAFE:\n{out}\n{err}"
    );
    assert!(
        out.contains("NOT SAFE") && out.contains("lacks column public.items.note"),
        "{out}"
    );
    t.shards[0]
        .psql(
            "app",
            "ALTER TABLE items ADD COLUMN note text, ADD COLUMN score int NOT NULL DEFAULT 7",
        )
        .unwrap();
    let (code, out, err) = t.reshard(&[
        "cutover",
        "-c",
        &cfg,
        "--shard",
        "shard0",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("SAFE: point"), "{out}");
    assert_eq!(
        t.terminate(d, Duration::from_secs(30)),
        Some(0),
        "{}",
        t.all_logs()
    );
}

/// A table with enum columns (plain, array, a domain over the enum), for the enum tests.
const ENUM_SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE DOMAIN mood_d AS mood;
CREATE TABLE feelings (account_id bigint NOT NULL, id bigint NOT NULL, m mood, ms mood[],
                       md mood_d, PRIMARY KEY (account_id, id));
";

const ENUM_TABLES: &[TableCheck<'static>] =
    &[("feelings", Some(("account_id", "bigint")), "account_id, id")];

/// Source, 2 shards with [`ENUM_SCHEMA`], rows on both shards, the daemon in `ddl = mode`
/// streaming and caught up.
fn start_enum(mode: &str) -> (Topology, usize) {
    let mut t = Topology::start(2);
    t.ddl_everywhere(ENUM_SCHEMA);
    t.source_sql(
        "INSERT INTO feelings SELECT g % 13, g, 'ok', ARRAY['sad', 'ok']::mood[], 'sad' \
         FROM generate_series(1, 100) g",
    );
    t.write_config_apply(&format!("ddl = \"{mode}\"\n"), "");
    let d = t.spawn_run(&[]);
    t.wait_slot_active(Duration::from_secs(60));
    t.wait_converged(ENUM_TABLES, Duration::from_secs(60));
    (t, d)
}

/// `ALTER TYPE … ADD VALUE` on the source, then rows of every account (so both shards) using
/// the new values in each kind of column.
const NEW_ENUM_VALUES: &str = "
ALTER TYPE mood ADD VALUE 'angry';
ALTER TYPE mood ADD VALUE 'meh' BEFORE 'ok';
";
const ROWS_WITH_NEW_VALUES: &str = "
INSERT INTO feelings SELECT g % 13, g, 'angry', ARRAY['meh', 'angry']::mood[], 'meh'
FROM generate_series(101, 140) g;
UPDATE feelings SET m = 'meh', ms = ms || 'angry'::mood WHERE id % 10 = 0 AND id <= 100;
";

fn enum_labels(c: &reshard_harness::PgCluster) -> String {
    c.psql("app", "SELECT enum_range(NULL::mood)::text")
        .unwrap()
}

// Found by the outside-user acceptance runs (explore): an enum value added on the source
// (`ALTER TYPE mood ADD VALUE`, a routine change in a days-long migration) reached the
// shards as `22P02 invalid input value for enum`, a definite error: every shard stopped and
// `reshard run` exited 3.
/// wait mode: the shards wait for DDL naming the type, the missing values and the exact
/// `ALTER TYPE … ADD VALUE`s (each after its predecessor in the source's order), the daemon
/// keeps running, and once the operator adds the values on the shards apply resumes by itself.
#[test]
fn ddl_wait_enum_value_added_on_the_source_waits_then_resumes() {
    let (mut t, d) = start_enum("wait");
    t.source_sql(NEW_ENUM_VALUES);
    t.source_sql(ROWS_WITH_NEW_VALUES);
    let msg = wait_ddl_state(
        &t,
        &[
            "public.feelings",
            "mood",
            "ALTER TYPE",
            "ADD VALUE IF NOT EXISTS 'meh' AFTER 'sad'",
            "ADD VALUE IF NOT EXISTS 'angry' AFTER 'ok'",
        ],
    );
    println!("status says: {msg}");
    // Give a stop time to happen, then make sure none did.
    std::thread::sleep(Duration::from_secs(2));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    // Each shard waits (its state goes between waiting and a retry's running), none stopped.
    for shard in ["shard0", "shard1"] {
        t.wait(
            &format!("{shard} to wait for DDL"),
            Duration::from_secs(60),
            || {
                let st = t.status_json()?;
                st["shards"]
                    .as_array()?
                    .iter()
                    .any(|s| s["name"] == shard && s["state"] == "waiting_for_ddl")
                    .then_some(())
            },
        );
    }
    let st = t.status_json().expect("status");
    for s in st["shards"].as_array().expect("shards") {
        assert_ne!(s["state"], "stopped", "{st}");
    }
    t.shards_sql(NEW_ENUM_VALUES);
    t.wait_converged(ENUM_TABLES, Duration::from_secs(60));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// Found by the outside-user acceptance runs (explore), as above.
/// propagate mode: reshard adds the source's new enum values on each shard itself, in the
/// source's sort order, and the rows that use them arrive; the daemon never stops.
#[test]
fn ddl_propagate_enum_value_added_on_the_source() {
    let (mut t, d) = start_enum("propagate");
    t.source_sql(NEW_ENUM_VALUES);
    t.source_sql(ROWS_WITH_NEW_VALUES);
    t.wait_converged(ENUM_TABLES, Duration::from_secs(60));
    let want = enum_labels(&t.source);
    assert_eq!(want, "{sad,meh,ok,angry}");
    for (i, s) in t.shards.iter().enumerate() {
        assert_eq!(enum_labels(s), want, "shard{i}");
    }
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// Found by the outside-user acceptance runs (explore): `ADD COLUMN c tier` of a type created
// on the source after the shards' schema was made: propagating the column failed with
// `42704 type "tier" does not exist`, a definite error: every shard stopped and `reshard run`
// exited 3.
/// The shards wait for DDL naming the type and the statement that creates it (an enum's, from
/// the source), the daemon keeps running, and once the type exists on the shards the column
/// is propagated and the rows arrive.
#[test]
fn ddl_propagate_add_column_of_a_type_the_shard_lacks_waits_for_the_type() {
    let (mut t, d) = start_enum("propagate");
    t.source_sql(
        "CREATE TYPE tier AS ENUM ('free', 'pro');
         ALTER TABLE feelings ADD COLUMN tier tier;
         UPDATE feelings SET tier = 'pro' WHERE id % 3 = 0;",
    );
    let msg = wait_ddl_state(
        &t,
        &[
            "public.feelings",
            "\"tier\"",
            "CREATE TYPE public.tier AS ENUM ('free', 'pro')",
        ],
    );
    println!("status says: {msg}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.shards_sql("CREATE TYPE tier AS ENUM ('free', 'pro')");
    t.wait_converged(ENUM_TABLES, Duration::from_secs(60));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

/// A table whose column types the source widens (`ALTER TABLE … ALTER COLUMN … TYPE`) while the
/// daemon streams.
const TYPED_SCHEMA: &str = "
CREATE TABLE typed (account_id bigint NOT NULL, id bigint NOT NULL, n int, v varchar(10),
                    d numeric(10,2), PRIMARY KEY (account_id, id));
";

const TYPED_TABLES: &[TableCheck<'static>] = &[
    ("items", Some(("account_id", "bigint")), "account_id, id"),
    ("plans", None, "id"),
    ("typed", Some(("account_id", "bigint")), "account_id, id"),
];

/// A type change on the source, and rows of every account (so every shard) that only
/// fit the new type: inserts and updates of existing rows.
struct TypeChange {
    /// The `ALTER TABLE` run on the source.
    source_ddl: &'static str,
    /// The statement the shards must run: its clauses are named in the wait, exactly.
    shard_ddl: &'static str,
    /// Rows that do not fit the old type.
    rows: &'static str,
}

/// `integer` → `bigint`, values above 2^31.
const TO_BIGINT: TypeChange = TypeChange {
    source_ddl: "ALTER TABLE typed ALTER COLUMN n TYPE bigint",
    shard_ddl: "ALTER TABLE public.typed ALTER COLUMN n TYPE bigint USING n::bigint",
    rows: "INSERT INTO typed (account_id, id, n) SELECT g % 97 + 1, 10000 + g, 3000000000 + g FROM generate_series(1, 200) g;
           UPDATE typed SET n = 2147483648 + id WHERE id % 4 = 0 AND id <= 200;",
};

/// `integer` → `bigint`, `varchar(10)` → `text` and `numeric(10,2)` → `numeric` (three
/// statements, so three relation versions on the source), with values that only fit the new
/// types: a bigint, a longer string, more digits and more scale (which `numeric(10,2)` would
/// round without an error).
const THREE_WIDENINGS: TypeChange = TypeChange {
    source_ddl: "ALTER TABLE typed ALTER COLUMN n TYPE bigint;
                 ALTER TABLE typed ALTER COLUMN v TYPE text;
                 ALTER TABLE typed ALTER COLUMN d TYPE numeric;",
    shard_ddl: "ALTER TABLE public.typed ALTER COLUMN n TYPE bigint USING n::bigint, \
                ALTER COLUMN v TYPE text USING v::text, ALTER COLUMN d TYPE numeric USING d::numeric",
    rows: "INSERT INTO typed (account_id, id, n, v, d) SELECT g % 97 + 1, 10000 + g, 3000000000 + g,
             'a value longer than ten characters ' || g, 123456789012.125 + g
           FROM generate_series(1, 200) g;
           UPDATE typed SET v = 'updated to a longer value ' || id, d = 1.125 + id WHERE id % 4 = 1 AND id <= 200;
           UPDATE typed SET n = 2147483648 + id WHERE id % 4 = 2 AND id <= 200;",
};

/// `varchar(10)` → `text` and `numeric(10,2)` → `numeric` only, with values that the old
/// types would not refuse in a merge but change: an explicit cast to `varchar(10)` truncates,
/// and `numeric(10,2)` rounds, without an error
/// (<https://www.postgresql.org/docs/current/datatype-character.html>).
const TEXT_AND_NUMERIC: TypeChange = TypeChange {
    source_ddl: "ALTER TABLE typed ALTER COLUMN v TYPE text;
                 ALTER TABLE typed ALTER COLUMN d TYPE numeric;",
    shard_ddl: "ALTER TABLE public.typed ALTER COLUMN v TYPE text USING v::text, \
                ALTER COLUMN d TYPE numeric USING d::numeric",
    rows: "INSERT INTO typed (account_id, id, n, v, d) SELECT g % 97 + 1, 10000 + g, g,
             'a value longer than ten characters ' || g, 1.125 + g
           FROM generate_series(1, 200) g;
           UPDATE typed SET v = 'updated to a longer value ' || id, d = 2.375 + id WHERE id % 4 = 1 AND id <= 200;",
};

/// `integer` → `text`, not a widening (reshard never runs it itself), with values no integer
/// takes: after a restart the shard learns of it from the first value that does not fit.
const INT_TO_TEXT: TypeChange = TypeChange {
    source_ddl: "ALTER TABLE typed ALTER COLUMN n TYPE text",
    shard_ddl: "ALTER TABLE public.typed ALTER COLUMN n TYPE text USING n::text",
    rows: "INSERT INTO typed (account_id, id, n) SELECT g % 97 + 1, 10000 + g, 'n' || g FROM generate_series(1, 200) g;
           UPDATE typed SET n = 'u' || id WHERE id % 4 = 3 AND id <= 200;",
};

/// `varchar(10)` → `character(40)`: not a widening reshard knows, so after a restart the shard
/// learns of it only from a value: the old apply cast to `varchar(10)` cut every longer value
/// to ten characters, silently (the shards converged to other rows than the source's).
const VARCHAR_TO_CHAR: TypeChange = TypeChange {
    source_ddl: "ALTER TABLE typed ALTER COLUMN v TYPE character(40)",
    shard_ddl: "ALTER TABLE public.typed ALTER COLUMN v TYPE character(40) USING v::character(40)",
    rows: "INSERT INTO typed (account_id, id, n, v) SELECT g % 97 + 1, 10000 + g, g,
             'a value longer than ten characters ' || g FROM generate_series(1, 200) g;
           UPDATE typed SET v = 'updated to a longer value ' || id WHERE id % 4 = 1 AND id <= 200;",
};

/// How the daemon is restarted while its shards wait for the shard DDL.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    Never,
    Sigterm,
    Kill9,
}

/// Like [`start`], with [`TYPED_SCHEMA`] too (200 rows, on the shards once this returns).
fn start_typed(mode: &str) -> (Topology, usize, Writer) {
    let (t, d, w) = start_with(mode, TYPED_SCHEMA);
    t.source_sql(
        "INSERT INTO typed SELECT g % 97 + 1, g, g, 'v' || g, g + 0.25 FROM generate_series(1, 200) g",
    );
    // Only `typed`: the writer keeps `items` moving.
    t.wait_converged(&TYPED_TABLES[2..], Duration::from_secs(60));
    (t, d, w)
}

/// Waits until every shard waits for DDL with a message containing every one of `words`
/// (failing at once if a shard stopped or the daemon exited); returns the messages.
fn wait_every_shard_ddl(t: &mut Topology, d: usize, words: &[&str]) -> Vec<String> {
    let n = t.shards.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
        // A status left by a daemon that stopped says so in its phase: not this one's.
        if let Some(st) = t.status_json().filter(|st| st["phase"] != "stopped") {
            let shards = st["shards"].as_array().cloned().unwrap_or_default();
            for s in &shards {
                assert_ne!(
                    s["state"],
                    "stopped",
                    "a shard stopped: {st}\n{}",
                    t.all_logs()
                );
            }
            let waiting: Vec<String> = shards
                .iter()
                .filter_map(|s| {
                    let err = s["last_error"].as_str().unwrap_or_default();
                    (s["state"] == "waiting_for_ddl"
                        && err.contains("waiting for DDL")
                        && words.iter().all(|w| err.contains(w)))
                    .then(|| err.to_owned())
                })
                .collect();
            if waiting.len() == n {
                return waiting;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for every shard to wait for DDL naming {words:?}\n{}",
            t.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The shards' `format_type` of `typed`'s columns n, v, d.
fn typed_types(s: &reshard_harness::PgCluster) -> String {
    s.psql(
        "app",
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) \
         FROM pg_attribute WHERE attrelid = 'typed'::regclass AND attname IN ('n', 'v', 'd')",
    )
    .unwrap()
}

/// `[apply] ddl = mode`: the source changes column type(s) mid-stream (widenings in wait mode,
/// or a change that is not a widening) and writes values only the new type takes, for accounts
/// on every shard. Every shard waits for DDL naming the table, the column(s) and the exact
/// `ALTER TABLE … ALTER COLUMN … TYPE …`; the daemon keeps running, also across a restart of
/// the given kind while the shards wait; once the operator runs the named statement on the
/// shards, everything converges (nothing lost, nothing twice).
fn alter_type_waits(mode: &str, change: &TypeChange, restart: Restart) {
    let (mut t, mut d, w) = start_typed(mode);
    t.source_sql(change.source_ddl);
    t.source_sql(change.rows);
    w.wait_commits(&t, 20);
    // "ALTER TABLE public.typed ALTER COLUMN n TYPE …", "ALTER COLUMN v TYPE …", …
    let mut words = vec!["public.typed"];
    words.extend(change.shard_ddl.split(", "));
    let msgs = wait_every_shard_ddl(&mut t, d, &words);
    println!("status says: {msgs:#?}");
    match restart {
        Restart::Never => {}
        Restart::Sigterm => {
            assert_eq!(
                t.terminate(d, Duration::from_secs(30)),
                Some(0),
                "SIGTERM while waiting for DDL must be a clean exit 0:\n{}",
                t.all_logs()
            );
        }
        Restart::Kill9 => t.kill9(d),
    }
    if restart != Restart::Never {
        d = t.spawn_run(&[]);
        w.wait_commits(&t, 20);
        let msgs = wait_every_shard_ddl(&mut t, d, &words);
        println!("after the restart, status says: {msgs:#?}");
    }
    // Give a stop time to happen, then make sure none did.
    std::thread::sleep(Duration::from_secs(2));
    wait_every_shard_ddl(&mut t, d, &words);
    for s in &t.shards {
        s.psql("app", change.shard_ddl)
            .unwrap_or_else(|e| panic!("the named fix: {e}"));
    }
    w.wait_commits(&t, 20);
    let commits = w.finish();
    println!("writer committed {commits} transactions");
    t.wait_converged(TYPED_TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value".
/// wait mode, no restart, `integer` → `bigint`.
#[test]
fn ddl_wait_alter_type_to_bigint_waits_then_resumes() {
    alter_type_waits("wait", &TO_BIGINT, Restart::Never);
}

/// wait mode, no restart, three widenings (bigint, text, numeric) at once.
#[test]
fn ddl_wait_alter_type_three_widenings_wait_then_resume() {
    alter_type_waits("wait", &THREE_WIDENINGS, Restart::Never);
}

// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value".
/// wait mode, the daemon stopped with SIGTERM while the shards wait, then started again: they
/// wait again (they do not stop on the first value that does not fit).
#[test]
fn ddl_wait_alter_type_survives_a_sigterm_restart_while_waiting() {
    alter_type_waits("wait", &TO_BIGINT, Restart::Sigterm);
}

// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value".
/// wait mode, the daemon killed (-9) while the shards wait, then started again; the three
/// widenings, of which `numeric(10,2)` would round a value silently.
#[test]
fn ddl_wait_alter_type_survives_a_kill9_restart_while_waiting() {
    alter_type_waits("wait", &THREE_WIDENINGS, Restart::Kill9);
}

// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value".
/// wait mode, SIGTERM while waiting, `varchar(10)` → `text` and `numeric(10,2)` → `numeric`:
/// after the restart no longer value is cut and no finer value rounded on the old type.
#[test]
fn ddl_wait_alter_type_to_text_and_numeric_survives_a_sigterm_restart() {
    alter_type_waits("wait", &TEXT_AND_NUMERIC, Restart::Sigterm);
}

/// propagate mode, SIGTERM while waiting, `integer` → `text`: not a widening, so the shards
/// wait (also in propagate mode), and after the restart they wait again once the first value
/// no integer takes fails on them (22P02), naming the column and the statement.
#[test]
fn ddl_propagate_alter_type_int_to_text_waits_across_a_sigterm_restart() {
    alter_type_waits("propagate", &INT_TO_TEXT, Restart::Sigterm);
}

/// propagate mode: a widening the shard can follow without changing any row it holds is run
/// on the shard by reshard itself, before the first change that needs it; with `restart` the
/// daemon is down (SIGTERM) while the source changes the type and writes the rows, so the new
/// relation is the first this process sees.
fn alter_type_propagates(change: &TypeChange, down_during_ddl: bool) {
    let (mut t, mut d, w) = start_typed("propagate");
    if down_during_ddl {
        t.stop_cleanly(d);
    }
    t.source_sql(change.source_ddl);
    t.source_sql(change.rows);
    if down_during_ddl {
        w.wait_commits(&t, 20);
        d = t.spawn_run(&[]);
    }
    let want = typed_types(&t.source);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !t.shards.iter().all(|s| typed_types(s) == want) {
        assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
        if let Some(st) = t.status_json().filter(|st| st["phase"] != "stopped") {
            for s in st["shards"].as_array().cloned().unwrap_or_default() {
                assert_ne!(
                    s["state"],
                    "stopped",
                    "a shard stopped: {st}\n{}",
                    t.all_logs()
                );
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the source's types ({want}) on every shard\n{}",
            t.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    w.wait_commits(&t, 20);
    let commits = w.finish();
    println!("writer committed {commits} transactions");
    t.wait_converged(TYPED_TABLES, Duration::from_secs(120));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}

/// propagate mode, no restart: the three widenings follow on every shard.
#[test]
fn ddl_propagate_alter_type_widenings_follow_on_the_shards() {
    alter_type_propagates(&THREE_WIDENINGS, false);
}

// See: "ALTER COLUMN TYPE + restart stops the shard on a non-fitting value".
/// propagate mode, the daemon down while the source widens the types: after the restart the
/// shards follow too.
#[test]
fn ddl_propagate_alter_type_while_the_daemon_is_down() {
    alter_type_propagates(&THREE_WIDENINGS, true);
}

// See: helper report on fd34b29 (an explicit cast to the shard's `varchar(n)` cuts a longer
// value without an error).
/// wait mode, SIGTERM while waiting, `varchar(10)` → `character(40)`: after the restart the
/// shards wait on the first value too long for their column (22001), naming the statement;
/// no value is cut to fit.
#[test]
fn ddl_wait_alter_type_varchar_to_char_never_cuts_a_value_across_a_restart() {
    alter_type_waits("wait", &VARCHAR_TO_CHAR, Restart::Sigterm);
}

// See: helper report on fd34b29 ("startup still refuses … has no stored column … present on
// other shards").
/// propagate mode: an ADD COLUMN reaches a shard with the first change of the table it gets,
/// so for a while one shard has the column and the other not. A restart then (a deploy, a
/// crash) must start: the table is loaded, the stream adds the column on the other shard with
/// its first change. Before, the full load's check refused to start the daemon.
#[test]
fn ddl_propagate_restart_while_only_some_shards_have_the_new_column() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(SCHEMA);
    t.source_sql("INSERT INTO plans SELECT g, 'plan' || g FROM generate_series(1, 10) g");
    t.source_sql(
        "INSERT INTO items SELECT g % 97 + 1, g, 'pre' || g, 0 FROM generate_series(1, 500) g",
    );
    t.write_config_apply("ddl = \"propagate\"\n", "");
    let mut d = t.spawn_run(&[]);
    t.wait_converged(TABLES, Duration::from_secs(90));
    t.source_sql(ADD_COLUMNS);
    // One account's rows only: one shard gets a change of items, the other none.
    t.source_sql("INSERT INTO items (account_id, id, name, note) VALUES (5, 100001, 'one', 'n1')");
    let has_note = |s: &reshard_harness::PgCluster| {
        s.psql(
            "app",
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'note' AND NOT attisdropped",
        )
        .unwrap()
            == "1"
    };
    let with = t.wait(
        "one shard to have the new column",
        Duration::from_secs(60),
        || t.shards.iter().position(has_note),
    );
    let without = 1 - with;
    assert!(
        !has_note(&t.shards[without]),
        "both shards got the column: the test needs one without it"
    );
    t.stop_cleanly(d);
    d = t.spawn_run(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while t.status_json().map(|s| s["phase"].clone()) != Some("streaming".into()) {
        assert!(
            t.is_running(d),
            "the daemon did not start while shard{without} lacks the propagated column:\n{}",
            t.all_logs()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the restarted daemon to stream\n{}",
            t.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every account now: the other shard gets the column with its first change.
    t.source_sql(
        "INSERT INTO items (account_id, id, name, note) SELECT g % 97 + 1, 200000 + g, 'after', 'n' || g FROM generate_series(1, 300) g;
         UPDATE items SET note = 'u' || id WHERE id % 5 = 0 AND id <= 500",
    );
    t.wait_converged(TABLES, Duration::from_secs(90));
    assert!(has_note(&t.shards[without]));
    assert!(t.is_running(d), "the daemon exited:\n{}", t.all_logs());
    t.stop_cleanly(d);
}
