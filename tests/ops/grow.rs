//! `reshard plan --shards M` (issue #17, "N → M"): the rows it plans per new shard are the
//! rows PostgreSQL's own hash partitioning assigns for MODULUS M, counted directly on the
//! source; an M that is not a multiple of N is refused; nothing is written.
// See: issue #17.

use reshard_harness::workload::FillSpec;

use super::{json, load_shards, topology_with_data, SHARDED};

const SPEC: FillSpec = FillSpec {
    accounts: 40,
    customers: 10,
    events: 30,
    body_bytes: 32,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_two_hash_shards_to_four_matches_satisfies_hash_partition_and_refuses_three() {
    let t = topology_with_data(2, SPEC).await;
    load_shards(&t);
    // The new shards' names and URLs ([[new_shards]]); the plan reads only the old shards.
    let cfg = t.write_config(
        "[[new_shards]]\nname = \"shard2\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\n\n\
         [[new_shards]]\nname = \"shard3\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\n",
    );
    let cfg = cfg.to_str().unwrap();

    let (code, out, err) = t.reshard(&["plan", "-c", cfg, "--shards", "4", "--json"]);
    assert_eq!(code, 0, "plan --shards 4:\n{out}\n{err}");
    let plan = json(&out, &err);
    let shards = plan["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4, "{plan}");
    let mut moved = 0;
    for (j, s) in shards.iter().enumerate() {
        // Judged by PostgreSQL on the source, not by reshard.
        let union = SHARDED
            .iter()
            .map(|tb| {
                format!(
                    "SELECT count(*) AS n FROM {tb} WHERE satisfies_hash_partition('route_helper'::regclass, 4, {j}, account_id)"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let want: i64 = t
            .source_sql(&format!(
                "CREATE TEMP TABLE route_helper (k bigint) PARTITION BY HASH (k); SELECT sum(n) FROM ({union}) x"
            ))
            .trim()
            .parse()
            .expect("count");
        assert!(
            want > 0,
            "new shard {j} would be empty: the test proves nothing"
        );
        assert_eq!(s["rows"].as_i64(), Some(want), "new shard {j}: {s}");
        assert_eq!(s["from_index"].as_u64(), Some(j as u64 % 2), "{s}");
        assert_eq!(
            s["name"].as_str(),
            Some(format!("shard{j}").as_str()),
            "{s}"
        );
        assert_eq!(s["stays"].as_bool(), Some(j < 2), "{s}");
        assert!(s["bytes"].as_i64().unwrap() > 0, "{s}");
        if j >= 2 {
            moved += want;
        }
    }
    assert_eq!(plan["rows_to_move"].as_i64(), Some(moved), "{plan}");
    assert_eq!(plan["misplaced_rows"].as_i64(), Some(0), "{plan}");

    // Human output names the estimate's rate.
    let (code, out, err) = t.reshard(&["plan", "-c", cfg, "--shards", "4", "--rate", "1000"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1000 rows/s"), "{out}");

    // 3 is not a multiple of 2: refused with exit 2, saying why.
    let (code, out, err) = t.reshard(&["plan", "-c", cfg, "--shards", "3"]);
    assert_eq!(code, 2, "plan --shards 3:\n{out}\n{err}");
    assert!(err.contains("multiple of the current one (2)"), "{err}");

    // A new shard that is not reachable yet is left out, and the next one is still proven to
    // be its own database: shard3 names shard0's database (written `localhost`), refused with
    // exit 2 naming both, after a warning naming the unreachable shard2.
    let cfg = t.write_config(&format!(
        "[[new_shards]]\nname = \"shard2\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\n\n\
         [[new_shards]]\nname = \"shard3\"\nurl = \"{}\"\n",
        t.shards[0].url("app").replace("127.0.0.1", "localhost")
    ));
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = t.reshard(&["plan", "-c", cfg, "--shards", "4"]);
    assert_eq!(code, 2, "plan --shards 4, shard3 = shard0:\n{out}\n{err}");
    assert!(
        err.contains("[[shards]] shard0 (127.0.0.1:")
            && err.contains("[[new_shards]] shard3 (localhost:")
            && err.contains("are the same database"),
        "{err}"
    );
    assert!(
        err.contains("[[new_shards]] shard2 (127.0.0.1:1/app) is not reachable"),
        "{err}"
    );

    // Read-only: no reshard schema appeared on any shard.
    for s in &t.shards {
        let n = s
            .psql(
                "app",
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'reshard'",
            )
            .expect("psql");
        assert_eq!(n.trim(), "0", "plan wrote on a shard");
    }
}

/// Per account: bytes over `items` and `notes` on shard `s`, measured by the test itself.
fn account_bytes(t: &crate::common::Topology, s: usize) -> std::collections::BTreeMap<i64, i64> {
    let text = t.shards[s]
        .psql(
            "app",
            "SELECT account_id, sum(b) FROM (\
               SELECT account_id, pg_column_size(i.*) AS b FROM items i \
               UNION ALL SELECT account_id, pg_column_size(n.*) FROM notes n) x GROUP BY account_id",
        )
        .expect("account bytes");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (a, b) = l.split_once('|').expect("a|b");
            (a.parse().expect("a"), b.parse().expect("b"))
        })
        .collect()
}

/// `reshard plan --shards M` with `hash = "map"`: three accounts of very different sizes and
/// 200 small ones on two of four shards. Every account is assigned once, the loads (measured by
/// the test on the shards) end within the stated tolerance, the JSON's moves are exactly the map
/// diff, and the written map reads back through the map reader.
// See: issue #17.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_map_layout_onto_three_and_four_shards_balances_within_the_tolerance() {
    use std::collections::BTreeMap;

    let t = crate::common::Topology::start(4);
    t.ddl_everywhere(
        "CREATE TABLE items (account_id bigint NOT NULL, id bigint NOT NULL, v text NOT NULL, PRIMARY KEY (account_id, id)); \
         CREATE TABLE notes (account_id bigint NOT NULL, id bigint NOT NULL, body text, PRIMARY KEY (account_id, id)); \
         CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL)",
    );
    // shard0: account 1 (6000 rows), account 2 (4000) and 101..=200 (75 each); shard1: account
    // 3 (3000) and 201..=300 (75 each); account 999 is in the map with no rows; shards 2 and 3
    // hold nothing.
    let seed = |s: usize, accounts: &str, rows: i64| {
        t.shards[s]
            .psql(
                "app",
                &format!(
                    "INSERT INTO items SELECT a, i, repeat('x', 40) FROM unnest(ARRAY[{accounts}]::bigint[]) a, generate_series(1, {rows}) i; \
                     INSERT INTO notes SELECT a, i, repeat('n', 40) FROM unnest(ARRAY[{accounts}]::bigint[]) a, generate_series(1, {}) i",
                    rows / 5
                ),
            )
            .expect("seed");
    };
    let range = |a: i64, b: i64| (a..=b).map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    seed(0, "1", 6000);
    seed(0, "2", 4000);
    seed(0, &range(101, 200), 75);
    seed(1, "3", 3000);
    seed(1, &range(201, 300), 75);
    let mut old: BTreeMap<i64, usize> = BTreeMap::new();
    for a in [1, 2].into_iter().chain(101..=200) {
        old.insert(a, 0);
    }
    for a in [3, 999].into_iter().chain(201..=300) {
        old.insert(a, 1);
    }
    let map_path = t.dir.path().join("accounts.csv");
    let mut text = String::from("account_id,shard\n");
    for (a, s) in &old {
        text.push_str(&format!("{a},shard{s}\n"));
    }
    std::fs::write(&map_path, &text).expect("map");
    let cfg = t.write_config("[routing]\nhash = \"map\"\nmap = \"accounts.csv\"\n");
    let cfg = cfg.to_str().unwrap();
    let mut bytes = account_bytes(&t, 0);
    bytes.extend(account_bytes(&t, 1));
    let names: Vec<String> = (0..4).map(|i| format!("shard{i}")).collect();

    for m in [3usize, 4] {
        let out = t.dir.path().join(format!("accounts-{m}.csv"));
        let out_s = out.to_str().unwrap();
        let (code, stdout, err) = t.reshard(&[
            "plan",
            "-c",
            cfg,
            "--shards",
            &m.to_string(),
            "--json",
            "--out",
            out_s,
        ]);
        assert_eq!(code, 0, "plan --shards {m}:\n{stdout}\n{err}");
        let plan = super::json(&stdout, &err);
        let tol = plan["tolerance_pct"].as_f64().expect("tolerance") / 100.0;
        assert_eq!(plan["balanced"], true, "{plan:#}");

        // The written map, read by the map reader.
        let new = reshard_engine::route::AccountMap::from_csv_path(&out, &names)
            .unwrap_or_else(|e| panic!("the new map does not read back: {e}"));
        assert_eq!(new.len(), old.len(), "every account once");
        let mut loads = vec![0i64; m];
        let mut diff = BTreeMap::new();
        for (a, from) in &old {
            let to = new
                .lookup(&reshard_engine::route::Key::Int(*a))
                .unwrap_or_else(|e| panic!("account {a} missing from the new map: {e}"))
                .index();
            assert!(to < m, "account {a} on shard{to}, beyond --shards {m}");
            loads[to] += bytes.get(a).copied().unwrap_or(0);
            if to != *from {
                diff.insert(
                    a.to_string(),
                    (format!("shard{from}"), format!("shard{to}")),
                );
            }
        }
        assert_eq!(diff.get("999"), None, "an account without rows moved");
        let moves: BTreeMap<String, (String, String)> = plan["moves"]
            .as_array()
            .expect("moves")
            .iter()
            .map(|x| {
                let b = bytes[&x["account"].as_str().unwrap().parse::<i64>().unwrap()];
                assert_eq!(x["bytes"].as_i64(), Some(b), "{x}");
                (
                    x["account"].as_str().unwrap().to_owned(),
                    (
                        x["from"].as_str().unwrap().to_owned(),
                        x["to"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect();
        assert_eq!(moves, diff, "the plan's moves are the map diff");
        // Judged on the test's own measurement of the shards.
        let mean = loads.iter().sum::<i64>() as f64 / m as f64;
        for (s, l) in loads.iter().enumerate() {
            assert!(
                (*l as f64 - mean).abs() <= mean * tol,
                "--shards {m}: shard{s} holds {l} bytes, mean {mean}, tolerance {tol}: {loads:?}"
            );
        }
        let (max, min) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
        assert!(
            max as f64 / min as f64 <= (1.0 + tol) / (1.0 - tol),
            "{loads:?}"
        );
        // Few bytes moved: no more than the excess over the mean plus one small account per shard.
        let before: Vec<i64> = (0..m)
            .map(|s| {
                old.iter()
                    .filter(|(_, x)| **x == s)
                    .map(|(a, _)| bytes.get(a).copied().unwrap_or(0))
                    .sum()
            })
            .collect();
        let excess: f64 = before.iter().map(|&b| (b as f64 - mean).max(0.0)).sum();
        let moved = plan["bytes_to_move"].as_i64().unwrap();
        assert!(
            moved as f64 <= excess + m as f64 * bytes[&101] as f64,
            "moved {moved}, excess {excess}"
        );
    }

    // Human output: the diff and the tolerance it aimed at.
    let (code, stdout, err) = t.reshard(&["plan", "-c", cfg, "--shards", "4", "--rate", "1000"]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(
        stdout.contains("±5%") && stdout.contains("1000 rows/s") && stdout.contains("shard3 (new)"),
        "{stdout}"
    );

    // Operator mistakes, refused with exit 2 before anything is written.
    let (code, _, err) = t.reshard(&["plan", "-c", cfg, "--shards", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("2 shards hold accounts now (shard0, shard1)"),
        "{err}"
    );
    let (code, _, err) = t.reshard(&["plan", "-c", cfg, "--shards", "5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the config lists 4"), "{err}");
    let (code, _, err) = t.reshard(&[
        "plan",
        "-c",
        cfg,
        "--shards",
        "4",
        "--out",
        map_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is the live account map"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&map_path).unwrap(),
        text,
        "the live map changed"
    );
    for s in &t.shards {
        let n = s
            .psql(
                "app",
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'reshard'",
            )
            .expect("psql");
        assert_eq!(n.trim(), "0", "plan wrote on a shard");
    }
}
