//! The admin console's result sets.
//!
//! In: one [`StatusSnapshot`]. Out: a [`ResultSet`] (column names, rows of nullable text) for
//! each `SHOW` command. Pure functions, so every column and value is unit-tested without a
//! socket; the wire layer ([`super`]) only encodes them. Every column is `text`, as in
//! PgBouncer's console; LSNs are `X/X`, byte counts are integers, rates and seconds are
//! decimals, a missing value (no error, no LSN yet) is SQL `NULL`.

use crate::lsn::Lsn;
use crate::status::StatusSnapshot;

use super::command::HELP;

/// Columns and rows of one result set.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultSet {
    /// Column names, all of type `text`.
    pub columns: Vec<&'static str>,
    /// Rows; each has exactly `columns.len()` values (`None` = NULL).
    pub rows: Vec<Vec<Option<String>>>,
}

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn lsn(v: Lsn) -> Option<String> {
    Some(v.to_string())
}

fn f1(v: f64) -> Option<String> {
    Some(format!("{v:.1}"))
}

fn f3(v: f64) -> Option<String> {
    Some(format!("{v:.3}"))
}

/// `SHOW STATUS`: `key`, `value`.
pub fn status(snap: &StatusSnapshot) -> ResultSet {
    let src = &snap.source;
    let sp = &snap.spill;
    let running = snap
        .shards
        .iter()
        .filter(|s| s.state == crate::status::ShardState::Running)
        .count();
    let kv: Vec<(&str, Option<String>)> = vec![
        ("phase", s(snap.phase.as_str())),
        ("ready", s(snap.is_ready())),
        ("version", s(&snap.version)),
        ("uptime_secs", f1(snap.uptime_secs)),
        ("slot", s(&src.slot)),
        ("publication", s(&src.publication)),
        ("system_id", s(&src.system_id)),
        ("source_connected", s(src.connected)),
        ("confirmed_flush_lsn", lsn(src.confirmed_flush_lsn)),
        ("received_lsn", lsn(src.received_lsn)),
        ("current_wal_lsn", lsn(src.current_wal_lsn)),
        ("retained_wal_bytes", s(src.retained_wal_bytes)),
        ("received_bytes_total", s(src.bytes_received_total)),
        ("received_txns_total", s(src.txns_received_total)),
        ("received_changes_total", s(src.changes_received_total)),
        ("changes_per_sec", f1(src.changes_per_sec)),
        ("source_backpressure", s(src.backpressure)),
        ("source_pause_reason", src.pause_reason.clone()),
        ("source_last_error", src.last_error.clone()),
        ("shards", s(snap.shards.len())),
        ("shards_running", s(running)),
        ("tables", s(snap.tables.len())),
        ("spill_bytes", s(sp.bytes)),
        ("spill_max_bytes", s(sp.max_bytes)),
        ("spill_segments", s(sp.segments)),
        ("spill_durable_lsn", lsn(sp.durable_lsn)),
        (
            "quarantined_changes",
            s(snap.quarantine.iter().map(|q| q.changes).sum::<u64>()),
        ),
        (
            "quarantined_tables",
            Some(
                snap.quarantine
                    .iter()
                    .map(|q| format!("{} ({})", q.table, q.changes))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ),
        (
            "fenced_shards",
            Some(
                src.fences
                    .iter()
                    .map(|f| format!("{} ({}, {})", f.shard, f.reason, f.step))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ),
        (
            "account_map_accounts",
            snap.account_map.as_ref().map(|m| m.accounts.to_string()),
        ),
        (
            "account_map_last_error",
            snap.account_map.as_ref().and_then(|m| m.last_error.clone()),
        ),
    ];
    ResultSet {
        columns: vec!["key", "value"],
        rows: kv.into_iter().map(|(k, v)| vec![s(k), v]).collect(),
    }
}

/// `SHOW SHARDS`.
pub fn shards(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
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
            "last_error",
        ],
        rows: snap
            .shards
            .iter()
            .map(|sh| {
                vec![
                    s(&sh.name),
                    s(sh.state.as_str()),
                    lsn(sh.applied_lsn),
                    s(sh.lag_bytes),
                    f3(sh.lag_seconds),
                    s(sh.txns_applied_total),
                    s(sh.rows_inserted_total),
                    s(sh.rows_updated_total),
                    s(sh.rows_deleted_total),
                    f1(sh.rows_per_sec),
                    s(sh.batches_total),
                    s(sh.replays_total),
                    s(sh.transient_errors_total),
                    s(sh.definite_errors_total),
                    sh.last_error.clone(),
                ]
            })
            .collect(),
    }
}

/// `SHOW TABLES`.
pub fn tables(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
            "name",
            "target",
            "mode",
            "state",
            "rows_copied",
            "rows_estimated",
            "bytes_copied",
        ],
        rows: snap
            .tables
            .iter()
            .map(|t| {
                vec![
                    s(&t.name),
                    s(&t.target),
                    s(&t.mode),
                    s(&t.state),
                    s(t.rows_copied),
                    s(t.rows_estimated),
                    s(t.bytes_copied),
                ]
            })
            .collect(),
    }
}

/// `SHOW LAG`.
pub fn lag(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
            "shard",
            "state",
            "applied_lsn",
            "lag_bytes",
            "lag_seconds",
            "p50_ms",
            "p99_ms",
            "max_ms",
        ],
        rows: snap
            .shards
            .iter()
            .map(|sh| {
                vec![
                    s(&sh.name),
                    s(sh.state.as_str()),
                    lsn(sh.applied_lsn),
                    s(sh.lag_bytes),
                    f3(sh.lag_seconds),
                    f1(sh.latency_p50_ms),
                    f1(sh.latency_p99_ms),
                    f1(sh.latency_max_ms),
                ]
            })
            .collect(),
    }
}

/// `SHOW SPILL`: one row.
pub fn spill(snap: &StatusSnapshot) -> ResultSet {
    let sp = &snap.spill;
    ResultSet {
        columns: vec![
            "dir",
            "bytes",
            "max_bytes",
            "high_water_bytes",
            "segments",
            "durable_lsn",
            "oldest_unapplied_lsn",
            "backpressure",
            "fsyncs",
            "txns_per_fsync",
        ],
        rows: vec![vec![
            s(&sp.dir),
            s(sp.bytes),
            s(sp.max_bytes),
            s(sp.high_water_bytes),
            s(sp.segments),
            lsn(sp.durable_lsn),
            sp.oldest_unapplied_lsn.map(|l| l.to_string()),
            s(sp.backpressure_active),
            s(sp.fsyncs_total),
            f1(sp.txns_per_fsync),
        ]],
    }
}

/// `SHOW FENCES`: one row per write fence on the source.
pub fn fences(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
            "shard",
            "reason",
            "rule",
            "installed_at",
            "fenced_secs",
            "refused",
            "step",
            "step_at",
            "lsn",
            "tables",
        ],
        rows: snap
            .source
            .fences
            .iter()
            .map(|f| {
                vec![
                    s(&f.shard),
                    s(&f.reason),
                    s(&f.rule),
                    s(&f.installed_at),
                    f1(f.fenced_secs),
                    s(f.refused),
                    s(&f.step),
                    s(&f.step_at),
                    f.lsn.map(|l| l.to_string()),
                    s(f.tables.len()),
                ]
            })
            .collect(),
    }
}

/// `SHOW THROTTLE`: one row per shard while a full load runs (none otherwise). `rows_per_sec`
/// is NULL when unlimited.
pub fn throttle(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
            "shard",
            "adaptive",
            "rows_per_sec",
            "min_rows_per_sec",
            "max_rows_per_sec",
            "rows",
            "backoffs",
            "probe_latency_ms",
            "active_backends",
            "replica_lag_ms",
            "holding_back",
        ],
        rows: snap
            .throttle
            .iter()
            .map(|t| {
                vec![
                    s(&t.shard),
                    s(t.adaptive),
                    t.rows_per_sec.and_then(|r| f1(r.round())),
                    s(t.min_rows_per_sec),
                    t.max_rows_per_sec.map(|m| m.to_string()),
                    s(t.rows_total),
                    s(t.backoffs_total),
                    t.probe_latency_ms.and_then(f1),
                    t.active_backends.map(|n| n.to_string()),
                    t.replica_lag_ms.and_then(f1),
                    t.holding_back.clone(),
                ]
            })
            .collect(),
    }
}

/// `SHOW REVERSE`: one row per shard whose writes stream back to the source (after a fenced
/// cutover), or streamed back until its rollback (`rolled_back`, no stream, its final
/// figures); `applied_lsn` and `drain_lsn` are the shard's LSNs.
pub fn reverse(snap: &StatusSnapshot) -> ResultSet {
    ResultSet {
        columns: vec![
            "shard",
            "state",
            "stream",
            "slot",
            "epoch",
            "start_lsn",
            "received_lsn",
            "applied_lsn",
            "drain_lsn",
            "lag_bytes",
            "lag_seconds",
            "txns_applied",
            "rows_inserted",
            "rows_updated",
            "rows_deleted",
            "sequence_headroom",
            "sequence_warning",
            "last_error",
        ],
        rows: snap
            .reverse
            .iter()
            .map(|r| {
                vec![
                    s(&r.shard),
                    s(&r.state),
                    (!r.stream.is_empty()).then(|| r.stream.clone()),
                    s(&r.slot),
                    s(r.epoch),
                    lsn(r.start_lsn),
                    lsn(r.received_lsn),
                    lsn(r.applied_lsn),
                    r.drain_lsn.map(|l| l.to_string()),
                    s(r.lag_bytes),
                    f3(r.lag_seconds),
                    s(r.txns_applied_total),
                    s(r.rows_inserted_total),
                    s(r.rows_updated_total),
                    s(r.rows_deleted_total),
                    r.sequence_headroom.map(|h| h.to_string()),
                    r.sequence_warning.clone(),
                    r.last_error.clone(),
                ]
            })
            .collect(),
    }
}

/// `SHOW STATUS JSON`: one row, one column `status`.
pub fn status_json(snap: &StatusSnapshot) -> Result<ResultSet, serde_json::Error> {
    Ok(ResultSet {
        columns: vec!["status"],
        rows: vec![vec![Some(serde_json::to_string(snap)?)]],
    })
}

/// `SHOW HELP`.
pub fn help() -> ResultSet {
    ResultSet {
        columns: vec!["command", "description"],
        rows: HELP.iter().map(|(c, d)| vec![s(c), s(d)]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{
        Phase, ReverseView, ShardState, ShardView, SpillView, TableView, ThrottleView,
    };

    fn snap() -> StatusSnapshot {
        StatusSnapshot {
            phase: Phase::Streaming,
            version: "0.1.0".into(),
            uptime_secs: 12.34,
            shards: vec![ShardView {
                name: "shard0".into(),
                state: ShardState::Running,
                applied_lsn: Lsn::from_u64(0x1_0000_0010),
                lag_bytes: 42,
                lag_seconds: 0.25,
                rows_inserted_total: 7,
                latency_p99_ms: 12.5,
                last_error: None,
                ..Default::default()
            }],
            tables: vec![TableView {
                name: "public.events".into(),
                target: "public.events".into(),
                mode: "sharded".into(),
                state: "done".into(),
                rows_copied: 100,
                rows_estimated: 99,
                bytes_copied: 4096,
            }],
            spill: SpillView {
                dir: "/var/lib/reshard".into(),
                bytes: 1000,
                oldest_unapplied_lsn: None,
                ..Default::default()
            },
            throttle: vec![ThrottleView {
                shard: "shard0".into(),
                adaptive: true,
                rows_per_sec: Some(2500.0),
                min_rows_per_sec: 1000,
                backoffs_total: 2,
                probe_latency_ms: Some(14.26),
                active_backends: Some(3),
                holding_back: Some("probe latency 14.2 ms > max_probe_latency_ms 10".into()),
                ..Default::default()
            }],
            reverse: vec![ReverseView {
                shard: "shard1".into(),
                slot: "reshard_rev_shard1_1".into(),
                epoch: 1,
                state: "streaming".into(),
                stream: "running".into(),
                applied_lsn: Lsn::from_u64(0x2_0000_0020),
                lag_bytes: 7,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn well_formed(rs: &ResultSet) {
        for r in &rs.rows {
            assert_eq!(r.len(), rs.columns.len(), "{rs:?}");
        }
    }

    #[test]
    fn every_result_set_is_rectangular() {
        let s = snap();
        for rs in [
            status(&s),
            shards(&s),
            tables(&s),
            lag(&s),
            spill(&s),
            throttle(&s),
            fences(&s),
            reverse(&s),
            status_json(&s).unwrap(),
            help(),
        ] {
            well_formed(&rs);
        }
    }

    #[test]
    fn values_are_rendered_as_operators_read_them() {
        let s = snap();
        let st = status(&s);
        let get = |k: &str| {
            st.rows
                .iter()
                .find(|r| r[0].as_deref() == Some(k))
                .and_then(|r| r[1].clone())
        };
        assert_eq!(get("phase").as_deref(), Some("streaming"));
        assert_eq!(get("ready").as_deref(), Some("true"));
        assert_eq!(get("uptime_secs").as_deref(), Some("12.3"));
        assert_eq!(get("source_last_error"), None);
        let sh = shards(&s);
        assert_eq!(sh.rows[0][2].as_deref(), Some("1/10"));
        assert_eq!(sh.rows[0][4].as_deref(), Some("0.250"));
        assert_eq!(sh.rows[0][14], None);
        let l = lag(&s);
        assert_eq!(l.rows[0][6].as_deref(), Some("12.5"));
        let sp = spill(&s);
        assert_eq!(sp.rows[0][6], None, "no oldest_unapplied_lsn is NULL");
        let th = throttle(&s);
        assert_eq!(th.rows[0][2].as_deref(), Some("2500.0"));
        assert_eq!(th.rows[0][4], None, "no ceiling is NULL");
        assert_eq!(th.rows[0][7].as_deref(), Some("14.3"));
        assert!(th.rows[0][10]
            .as_deref()
            .unwrap()
            .contains("max_probe_latency_ms"));
        let r = reverse(&s);
        assert_eq!(r.rows[0][0].as_deref(), Some("shard1"));
        assert_eq!(r.rows[0][7].as_deref(), Some("2/20"));
        assert_eq!(r.rows[0][8], None, "no drain_lsn is NULL");
        assert_eq!(r.rows[0][9].as_deref(), Some("7"));
        let j = status_json(&s).unwrap();
        let v: serde_json::Value = serde_json::from_str(j.rows[0][0].as_deref().unwrap()).unwrap();
        assert_eq!(v["shards"][0]["name"], "shard0");
    }
}
