//! Unroutable changes (issue #11 item 9), end to end with `hash = "map"` over a `map_query`
//! directory table: a new signup routes mid-run without halting; a NULL shard key and an
//! account missing from the map are quarantined while the other shards keep applying; the
//! quarantine is listed (CLI, status, metric); after the directory is fixed and SIGHUP, a
//! replay applies the row's changes in order and the shards equal the source; `drop` needs
//! `--yes`; `on_unroutable = "stop"` still stops with a clear error.

use std::time::Duration;

use crate::common::{http_get, port_of, sample, Topology};

const ROUTING: &str = "[routing]\nhash = \"map\"\n\
     map_query = \"SELECT account_id, shard FROM account_dir\"\nmap_refresh_secs = 0\n";
const TABLES: &str = "\n[[tables]]\nname = \"notes\"\n";

/// `(source rows the directory puts on shard k, rows shard k holds)` as count:md5.
fn digests(t: &Topology, k: usize) -> (String, String) {
    let q = |filter: &str| {
        format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(n::text, '|' ORDER BY id)), '-') \
             FROM notes n {filter}"
        )
    };
    let src = t.source_sql(&q(&format!(
        "WHERE account_id IN (SELECT account_id FROM account_dir WHERE shard = 'shard{k}')"
    )));
    let dst = t.shards[k].psql("app", &q("")).expect("shard query");
    (src, dst)
}

fn wait_equal(t: &Topology, what: &str) {
    t.wait(what, Duration::from_secs(60), || {
        (0..t.shards.len())
            .all(|k| {
                let (a, b) = digests(t, k);
                a == b
            })
            .then_some(())
    });
}

fn quarantine_json(t: &Topology, action: &[&str]) -> (i32, serde_json::Value, String) {
    let cfg = t.config_path();
    let mut args = vec!["quarantine"];
    args.extend_from_slice(action);
    args.extend_from_slice(&["-c", cfg.to_str().unwrap(), "--json"]);
    let (code, out, err) = t.reshard(&args);
    let v = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, v, err)
}

/// The quarantined changes of public.notes, as the daemon's status reports them.
fn status_quarantined(t: &Topology) -> Option<u64> {
    let s = t.status_json()?;
    let q = s["quarantine"].as_array()?;
    Some(
        q.iter()
            .filter(|x| x["table"] == "public.notes")
            .filter_map(|x| x["changes"].as_u64())
            .sum(),
    )
}

// See: issue #11 item 9.
#[test]
fn unroutable_changes_are_quarantined_listed_and_replayed_in_order() {
    let mut t = Topology::start(2);
    t.ddl_everywhere(
        "CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint, body text); \
         ALTER TABLE notes REPLICA IDENTITY FULL",
    );
    t.source_sql(
        "CREATE TABLE account_dir (account_id bigint PRIMARY KEY, shard text NOT NULL); \
         INSERT INTO account_dir VALUES (1, 'shard0'), (2, 'shard1'); \
         INSERT INTO notes SELECT i, 1 + i % 2, 'n' || i FROM generate_series(1, 20) i",
    );
    let config = std::fs::read_to_string(t.write_config(&format!("{ROUTING}{TABLES}"))).unwrap();
    let metrics = port_of(&config, "metrics");
    let d = t.spawn_run(&[]);
    wait_equal(&t, "the full load");

    // A signup: the directory row, then the account's first row, in separate transactions.
    // The unknown account makes the ingest read the map again at once.
    t.source_sql("INSERT INTO account_dir VALUES (3, 'shard1')");
    t.source_sql("INSERT INTO notes VALUES (100, 3, 'signup')");
    wait_equal(&t, "the signup's row on shard1");
    assert!(
        t.is_running(d),
        "a signup halted the daemon:\n{}",
        t.all_logs()
    );

    // A NULL key, and an account the directory does not list (twice: the update is a later
    // change of a quarantined row). Then a routable row: the shards keep applying.
    t.source_sql("INSERT INTO notes VALUES (200, NULL, 'no key')");
    t.source_sql("INSERT INTO notes VALUES (300, 4, 'unknown')");
    t.source_sql("UPDATE notes SET body = 'unknown v2' WHERE id = 300");
    t.source_sql("INSERT INTO notes VALUES (101, 1, 'after'), (102, 2, 'after')");
    wait_equal(&t, "the routable rows after the unroutable ones");
    assert!(
        t.is_running(d),
        "an unroutable row halted the daemon:\n{}",
        t.all_logs()
    );
    t.wait(
        "the status to count 3 quarantined changes",
        Duration::from_secs(20),
        || (status_quarantined(&t) == Some(3)).then_some(()),
    );
    let (code, body) = http_get(metrics, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(
            &body,
            "reshard_quarantined_changes_total{table=\"public.notes\"}"
        ),
        3
    );
    let (code, list, err) = quarantine_json(&t, &["list"]);
    assert_eq!(code, 0, "{err}");
    let notes = &list["tables"][0];
    assert_eq!(notes["table"], "public.notes", "{list}");
    assert_eq!(notes["changes"], 3, "{list}");
    assert!(
        notes["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("NULL"),
        "{list}"
    );
    assert!(
        notes["sample"]
            .as_str()
            .unwrap_or_default()
            .contains("id=200"),
        "{list}"
    );
    assert_ne!(notes["first_lsn"], notes["last_lsn"], "{list}");

    // Fix the directory and tell the daemon (SIGHUP). A later change of the quarantined row
    // still goes to the quarantine (replay keeps the row's order), though it routes now.
    t.source_sql("INSERT INTO account_dir VALUES (4, 'shard0')");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(t.pid(d) as libc::pid_t, libc::SIGHUP);
    }
    t.wait(
        "the map refresh after SIGHUP",
        Duration::from_secs(20),
        || {
            let s = t.status_json()?;
            (s["account_map"]["accounts"].as_u64() == Some(4)).then_some(())
        },
    );
    t.source_sql("UPDATE notes SET body = 'unknown v3' WHERE id = 300");
    t.source_sql("INSERT INTO notes VALUES (103, 1, 'later')");
    t.wait("4 quarantined changes", Duration::from_secs(20), || {
        (status_quarantined(&t) == Some(4)).then_some(())
    });
    let (a, b) = digests(&t, 0);
    assert_ne!(a, b, "row 300 reached shard0 before the replay");

    // Replay needs the daemon stopped.
    let (code, _, err) = quarantine_json(&t, &["replay"]);
    assert_eq!(code, 3, "replay beside a running daemon: {err}");
    assert!(err.contains("stop it"), "{err}");
    // Shard0 has applied past the last quarantined change (row 103 is there).
    t.wait("row 103 on shard0", Duration::from_secs(60), || {
        let n = t.shards[0]
            .psql("app", "SELECT count(*) FROM notes WHERE id = 103")
            .ok()?;
        (n == "1").then_some(())
    });
    assert_eq!(t.terminate(d, Duration::from_secs(60)), Some(0));
    let (code, report, err) = quarantine_json(&t, &["replay"]);
    assert_eq!(code, 1, "the NULL row stays: {report} {err}");
    let r = &report[0];
    assert_eq!(
        (r["replayed"].as_u64(), r["remaining"].as_u64()),
        (Some(3), Some(1)),
        "{report}"
    );
    assert!(r["why_remaining"].to_string().contains("NULL"), "{report}");
    wait_equal(&t, "row 300 on shard0 after the replay");

    // Drop asks for confirmation, then deletes.
    let cfg = t.config_path();
    let cfg = cfg.to_str().unwrap();
    let (code, _, err) = t.reshard(&["quarantine", "drop", "-c", cfg]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("1 quarantined change") && err.contains("--yes"),
        "{err}"
    );
    let (code, _, err) = t.reshard(&["quarantine", "drop", "-c", cfg, "--yes"]);
    assert_eq!(code, 0, "{err}");
    let (_, list, _) = quarantine_json(&t, &["list"]);
    assert_eq!(list["tables"].as_array().map(Vec::len), Some(0), "{list}");

    // Restarted: row 300 is no longer held, its changes flow.
    let d = t.spawn_run(&[]);
    t.source_sql("UPDATE notes SET body = 'v4' WHERE id = 300");
    wait_equal(&t, "row 300's next change through the stream");
    assert_eq!(t.terminate(d, Duration::from_secs(60)), Some(0));

    // Policy stop: the NULL key stops reading, with a clear error.
    t.write_config(&format!("{ROUTING}on_unroutable = \"stop\"\n{TABLES}"));
    let d = t.spawn_run(&[]);
    t.source_sql("INSERT INTO notes VALUES (201, NULL, 'stop')");
    let code = t.wait_exit(d, Duration::from_secs(60));
    let log = t.last_log();
    assert_eq!(code, Some(3), "{log}");
    assert!(
        log.contains("the shard key is NULL") && log.contains("on_unroutable"),
        "{log}"
    );
}
