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
    let cfg = t.write_config("");
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
