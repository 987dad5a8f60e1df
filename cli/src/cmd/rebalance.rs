//! `reshard rebalance --shards M`: grow a `hash = "postgres"` layout from N to M shards, or
//! balance a `hash = "map"` layout onto M shards, under live writers (see
//! `reshard_engine::ops::rebalance`).
//!
//! Exit codes: 0 = every move done (old shard i holds only hash remainder i of MODULUS M, the
//! new shards the others; the final `[[shards]]` are printed); 1 = a move is not done: its
//! target did not catch up within `--timeout`, or the shards' rows differ (the range stays
//! fenced on its old shard; run it again); 2 = bad invocation or config (M not a multiple of
//! N, too few `[[new_shards]]`, a map's M outside what the config lists, a table missing on a new shard, a new shard
//! already holding rows of its range); 3 = could not complete (unreachable shard, failing
//! query).

use reshard_engine::ops::moves::MoveError;
use reshard_engine::ops::rebalance::{
    run_rebalance, RebalanceError, RebalanceOptions, RebalanceReport,
};

use super::check::table;
use super::slot::human_bytes;
use crate::output::{emit_failure, emit_ok, load_config, CmdResult, Failure};
use crate::RebalanceArgs;

/// Runs `reshard rebalance`.
pub async fn run(args: RebalanceArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let timeout = reshard_engine::pg::conn::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--timeout: {e}")))?;
    let delete_grace = reshard_engine::pg::conn::parse_duration(&args.delete_grace)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--delete-grace: {e}")))?;
    let opts = RebalanceOptions {
        to: usize::from(args.shards),
        parallel: usize::from(args.parallel),
        timeout,
        delete_grace,
        max_rows_per_sec: args.max_rows_per_sec.filter(|r| *r > 0),
        tolerance_pct: args.tolerance,
    };
    let report = match run_rebalance(&config, &opts).await {
        Ok(r) => r,
        Err(e) => {
            let fields = match &e {
                RebalanceError::Move { report, .. } => {
                    serde_json::to_value(report.as_ref()).unwrap_or_else(|_| serde_json::json!({}))
                }
                _ => serde_json::json!({"to_shards": opts.to}),
            };
            emit_failure(args.json, fields, &e);
            return Err(match &e {
                RebalanceError::Usage(_) => Failure::usage(e),
                RebalanceError::Plan(p) => match p {
                    reshard_engine::ops::grow::GrowError::Distinct(d) if !d.is_mistake() => {
                        Failure::failed(e)
                    }
                    reshard_engine::ops::grow::GrowError::Shard { .. }
                    | reshard_engine::ops::grow::GrowError::Catalog(_) => Failure::failed(e),
                    _ => Failure::usage(e),
                },
                RebalanceError::Move { cause, .. } => match cause.as_ref() {
                    MoveError::Usage(_) => Failure::usage(e),
                    MoveError::Timeout { .. } | MoveError::Mismatch { .. } => Failure::problem(e),
                    _ => Failure::failed(e),
                },
                RebalanceError::Directory { .. } => Failure::failed(e),
            });
        }
    };
    emit_ok(args.json, &report, || render(&report))
}

fn render(r: &RebalanceReport) -> String {
    let mut out = format!(
        "rebalance {}: {} -> {} shards, {}/{} moves done in {:.1}s\n\n",
        r.id, r.from_shards, r.to_shards, r.moves_done, r.moves_total, r.secs
    );
    let mut rows = vec![[
        if r.map { "MOVE" } else { "REMAINDER" }.to_owned(),
        "FROM".into(),
        "TO".into(),
        "PLANNED".into(),
        "COPIED".into(),
        "STREAMED".into(),
        "DELETED".into(),
        "STEP".into(),
    ]];
    for p in &r.moves {
        let m = p.report.as_ref();
        rows.push([
            if r.map {
                p.what.clone()
            } else {
                p.remainder.to_string()
            },
            p.from.clone(),
            p.to.clone(),
            format!("{} rows, {}", p.rows_planned, human_bytes(p.bytes_planned)),
            m.map_or("-".into(), |m| m.rows_copied.to_string()),
            m.map_or("-".into(), |m| m.rows_streamed.to_string()),
            m.map_or("-".into(), |m| m.rows_deleted.to_string()),
            m.map_or("failed".into(), |m| m.step.as_str().to_owned()),
        ]);
    }
    out.push_str(&table(&rows));
    if r.map {
        out.push_str(&format!(
            "\nDONE: {} sends every moved account to its new shard ({} shards: {})\n",
            r.layout,
            r.to_shards,
            r.shards.join(", ")
        ));
        return out;
    }
    out.push_str(&format!(
        "\nDONE: the layout is hash partitioning with MODULUS {} over these shards, in remainder order (the application may drop {} and use this config):\n\n{}",
        r.to_shards, r.layout, r.config
    ));
    out
}
