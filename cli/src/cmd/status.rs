//! `reshard status`: one screen — phase, source slot, shards, tables, write fences, reverse
//! streams (cut-over shards' writes back to the source), spill log.
//!
//! Asks the running daemon's admin console; when it does not answer, rebuilds the status from
//! the source's slot, the shards' progress rows, `reshard.reverse` with the reverse streams'
//! progress rows on the source, and the spill directory (phase `stopped`).
//! Exit codes: 0 when the status could be shown; 2 on a config error. An unreachable source
//! or shard is shown in the screen (its error column), not as a failure.

use reshard_engine::ops::observe::{current_status, lag_known, lag_unknown, StatusOrigin};
use reshard_engine::status::StatusSnapshot;

use super::check::table;
use crate::output::{emit, load_config, CmdResult, Failure};
use crate::StatusArgs;

/// Runs `reshard status`.
pub async fn run(args: StatusArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let (snap, origin) = current_status(&config).await;
    let json = if args.json {
        status_json(&snap, origin)?
    } else {
        serde_json::Value::Null
    };
    emit(args.json, &json, || render(&snap, origin))
}

/// The snapshot as JSON, where a shard's lag that is not known ([`lag_known`]) is `null` in
/// `lag_bytes` and `lag_seconds`, with `lag_error` naming the shard and why, never a 0.
fn status_json(s: &StatusSnapshot, origin: StatusOrigin) -> Result<serde_json::Value, Failure> {
    let mut v = serde_json::to_value(s)
        .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the status: {e}")))?;
    for (j, sh) in s.shards.iter().enumerate() {
        let unknown = lag_unknown(s, origin, sh);
        let out = &mut v["shards"][j];
        if unknown.is_some() {
            out["lag_bytes"] = serde_json::Value::Null;
            out["lag_seconds"] = serde_json::Value::Null;
        }
        out["lag_error"] = unknown.into();
    }
    Ok(v)
}

/// A shard's LAG BYTES and LAG S cells: `-` where the lag is not known
/// ([`lag_known`]: the daemon is down and the shard or the source could not be read).
pub(crate) fn lag_cells(
    s: &StatusSnapshot,
    origin: StatusOrigin,
    sh: &reshard_engine::status::ShardView,
) -> [String; 2] {
    if lag_known(s, origin, sh) {
        [bytes(sh.lag_bytes), format!("{:.1}", sh.lag_seconds)]
    } else {
        ["-".into(), "-".into()]
    }
}

/// `1.5 GiB`-style sizes.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One row per shard whose writes stream back to the source (`reshard status` and `reshard
/// lag` both show it).
pub(crate) fn reverse_table(s: &StatusSnapshot) -> String {
    let mut rows = vec![[
        "SHARD",
        "STATE",
        "STREAM",
        "SLOT",
        "APPLIED LSN",
        "LAG",
        "LAG S",
        "ROWS",
        "ID HEADROOM",
        "LAST ERROR",
    ]
    .map(String::from)];
    for r in &s.reverse {
        rows.push([
            r.shard.clone(),
            r.state.clone(),
            if r.stream.is_empty() {
                "-".into()
            } else {
                r.stream.clone()
            },
            r.slot.clone(),
            r.applied_lsn.to_string(),
            bytes(r.lag_bytes),
            format!("{:.1}", r.lag_seconds),
            (r.rows_inserted_total + r.rows_updated_total + r.rows_deleted_total).to_string(),
            match (r.sequence_headroom, &r.sequence_warning) {
                (Some(h), Some(_)) => format!("{h} LOW"),
                (Some(h), None) => h.to_string(),
                (None, _) => "-".into(),
            },
            r.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = table(&rows);
    for r in &s.reverse {
        if let Some(w) = &r.sequence_warning {
            out.push_str(&format!("WARN {w}\n"));
        }
    }
    out
}

fn render(s: &StatusSnapshot, origin: StatusOrigin) -> String {
    let mut out = String::new();
    let from = match origin {
        StatusOrigin::Daemon => format!("live, from the daemon; up {:.0}s", s.uptime_secs),
        StatusOrigin::Offline => {
            "daemon not running: rebuilt from slot, progress rows and spill directory".into()
        }
    };
    out.push_str(&format!("phase: {}  ({from})\n\n", s.phase.as_str()));
    let src = &s.source;
    out.push_str(&format!(
        "source  slot {}  publication {}  system {}\n",
        src.slot,
        src.publication,
        if src.system_id.is_empty() {
            "-"
        } else {
            &src.system_id
        }
    ));
    out.push_str(&format!(
        "        current WAL {}  confirmed flush {}  retained WAL {}{}\n",
        src.current_wal_lsn,
        src.confirmed_flush_lsn,
        bytes(src.retained_wal_bytes),
        if src.backpressure && src.pause_reason.is_none() {
            "  READING PAUSED (spill cap)"
        } else {
            ""
        }
    ));
    if let Some(r) = &src.pause_reason {
        out.push_str(&format!("        READING PAUSED: {r}\n"));
    }
    if let Some(e) = &src.last_error {
        out.push_str(&format!("        ! {e}\n"));
    }
    out.push('\n');
    let mut rows = vec![[
        "SHARD",
        "STATE",
        "APPLIED LSN",
        "LAG",
        "LAG S",
        "TXNS",
        "ROWS",
        "ROWS/S",
        "LAST ERROR",
    ]
    .map(String::from)];
    for sh in &s.shards {
        let [lag_b, lag_s] = lag_cells(s, origin, sh);
        rows.push([
            sh.name.clone(),
            sh.state.as_str().into(),
            sh.applied_lsn.to_string(),
            lag_b,
            lag_s,
            sh.txns_applied_total.to_string(),
            (sh.rows_inserted_total + sh.rows_updated_total + sh.rows_deleted_total).to_string(),
            format!("{:.0}", sh.rows_per_sec),
            sh.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&table(&rows));
    if !s.tables.is_empty() {
        out.push('\n');
        let mut rows = vec![["TABLE", "TARGET", "MODE", "STATE", "ROWS COPIED"].map(String::from)];
        for t in &s.tables {
            let copied = if t.rows_estimated > 0 {
                format!("{} / ~{}", t.rows_copied, t.rows_estimated)
            } else {
                t.rows_copied.to_string()
            };
            rows.push([
                t.name.clone(),
                t.target.clone(),
                t.mode.clone(),
                t.state.clone(),
                copied,
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !s.throttle.is_empty() {
        out.push('\n');
        let mut rows = vec![[
            "THROTTLE",
            "ROWS/S",
            "FLOOR",
            "CEILING",
            "BACKOFFS",
            "PROBE MS",
            "BACKENDS",
            "REPLICA LAG MS",
            "HOLDING BACK",
        ]
        .map(String::from)];
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        for t in &s.throttle {
            rows.push([
                t.shard.clone(),
                t.rows_per_sec
                    .map_or("unlimited".into(), |r| format!("{r:.0}")),
                if t.adaptive {
                    t.min_rows_per_sec.to_string()
                } else {
                    "fixed".into()
                },
                t.max_rows_per_sec
                    .map_or("unlimited".into(), |c| c.to_string()),
                t.backoffs_total.to_string(),
                opt(t.probe_latency_ms.map(|v| format!("{v:.1}"))),
                opt(t.active_backends.map(|v| v.to_string())),
                opt(t.replica_lag_ms.map(|v| format!("{v:.0}"))),
                opt(t.holding_back.clone()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !s.source.fences.is_empty() {
        out.push_str("\nwrite fences on the source (lift with: reshard unfence --shard S):\n");
        out.push_str(&super::fence::render(&s.source.fences));
    }
    if !s.rebalance.is_empty() {
        out.push_str("\nrebalances (reshard.rebalance on the directory shard):\n");
        let mut rows = vec![[
            "ID",
            "SHARDS",
            "STATE",
            "MOVES",
            "ROWS",
            "BYTES PLANNED",
            "UPDATED",
        ]
        .map(String::from)];
        for r in &s.rebalance {
            rows.push([
                r.id.clone(),
                format!("{} -> {}", r.from_shards, r.to_shards),
                r.state.clone(),
                format!("{}/{}", r.moves_done, r.moves_total),
                format!("{}/{}", r.rows_done, r.rows_planned),
                bytes(r.bytes_planned.max(0) as u64),
                format!("{:.0}s ago", r.idle_secs),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !s.reverse.is_empty() {
        out.push_str(
            "\nreverse streams: cut-over shards' writes back to the source (LSNs are the shard's):\n",
        );
        out.push_str(&reverse_table(s));
    }
    let sp = &s.spill;
    out.push_str(&format!(
        "\nspill   {}  {} of {} in {} segments  oldest unapplied {}{}\n",
        sp.dir,
        bytes(sp.bytes),
        bytes(sp.max_bytes),
        sp.segments,
        sp.oldest_unapplied_lsn
            .map(|l| l.to_string())
            .unwrap_or_else(|| "-".into()),
        if sp.backpressure_active {
            "  CAP REACHED"
        } else {
            ""
        }
    ));
    out
}
