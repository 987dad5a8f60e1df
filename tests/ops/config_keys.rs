//! Documented config keys do what the README says (none is accepted and ignored).
// See: issue #13 ("Two documented keys do nothing").

use std::time::Duration;

use super::common::Topology;

/// `[snapshot] progress_interval_secs`: while a (throttled) full load copies, the daemon logs a
/// progress line per table being copied at that interval.
#[test]
fn progress_interval_secs_logs_the_full_load_progress() {
    let mut t = Topology::start(1);
    t.ddl_everywhere(
        "CREATE TABLE items (account_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (account_id, id))",
    );
    t.source_sql("INSERT INTO items SELECT g % 50, g FROM generate_series(1, 9000) g; ANALYZE");
    t.write_config(
        "[snapshot]\nparallel = 1\nchunk_rows = 1000\nmax_rows_per_sec = 3000\nprogress_interval_secs = 1\n",
    );
    let d = t.spawn_run(&[]);
    t.wait("the full load to finish", Duration::from_secs(60), || {
        t.last_log().contains("full load done").then_some(())
    });
    let log = t.last_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("full load progress") && l.contains("public.items: copying"))
        .collect();
    assert!(
        lines.len() >= 2,
        "a ~3 s load with progress_interval_secs = 1 logged {} progress lines:\n{log}",
        lines.len()
    );
    t.stop_cleanly(d);
}
