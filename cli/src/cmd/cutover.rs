//! `reshard cutover --shard S [--fence]`: (fence S's accounts on the source,) wait until S has
//! applied everything the source committed before the command started, move its sequences
//! past the source's, verify it, report.
//!
//! Exit codes: 0 = safe to point the shard's accounts at it; 1 = not safe (timed out with the
//! shard still behind, a verify mismatch, a sequence that could not be set); 2 = config or
//! argument error (unknown shard, bad `--timeout`); 3 = could not complete (unreachable
//! endpoint, the shard has never been fed by reshard, a failing query, a fence that could not
//! be installed, e.g. its table locks not granted within `[cutover] fence_lock_timeout_ms`).
//! With `--fence`, the fence stays in place whatever the outcome; run the command again to
//! resume, or `reshard unfence --shard S` to lift it.

use reshard_engine::ops::cutover::{cutover, CutoverError, CutoverOptions, CutoverReport};
use reshard_engine::ops::fence::FenceError;

use super::check::table;
use crate::output::{emit, emit_failure, load_config, CmdResult, Failure};
use crate::CutoverArgs;

/// Runs `reshard cutover`.
pub async fn run(args: CutoverArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let timeout = reshard_engine::pg::conn::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--timeout: {e}")))?;
    let opts = CutoverOptions {
        shard: args.shard.clone(),
        timeout,
        verify: !args.no_verify,
        router: None,
        fence: args.fence,
    };
    let report = match cutover(&config, &opts).await {
        Ok(r) => r,
        Err(e) => {
            emit_failure(args.json, serde_json::json!({"shard": args.shard}), &e);
            return Err(match e {
                CutoverError::UnknownShard { .. } => Failure::usage(e),
                CutoverError::Timeout { .. } | CutoverError::TableMissing { .. } => {
                    Failure::problem(e)
                }
                CutoverError::Verify { source, .. } => super::verify::verify_failure(source),
                CutoverError::Fence {
                    source: FenceError::UnknownShard { .. } | FenceError::Config(_),
                    ..
                } => Failure::usage(e),
                other => Failure::failed(other),
            });
        }
    };
    emit(args.json, &report, || render(&report))?;
    if report.ok {
        Ok(())
    } else {
        Err(Failure::problem(anyhow::anyhow!(
            "shard {} is NOT safe to cut over (see above)",
            report.shard
        )))
    }
}

fn render(r: &CutoverReport) -> String {
    let mut out = format!(
        "shard {}: reached source LSN {} (progress {}) after waiting {:.1}s ({})\n\n",
        r.shard, r.target_lsn, r.reached_lsn, r.waited_secs, r.marker
    );
    match &r.fence {
        Some(f) => out.push_str(&format!(
            "fence: shard {} fenced on the source since {} ({:.1}s of refused writes so far, {} refused); it stays until `reshard unfence --shard {}`\n\n",
            r.shard, f.installed_at, f.fenced_secs, f.refused, r.shard
        )),
        None => out.push_str("fence: none (writes to the shard's accounts on the source were not refused; use --fence to close that window)\n\n"),
    }
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    if r.sequences.is_empty() {
        out.push_str("sequences: none in the replicated schemas\n");
    } else {
        out.push_str(&format!("sequences (gap {}):\n", r.sequence_gap));
        let mut rows = vec![[
            "SEQUENCE",
            "SOURCE",
            "SHARD BEFORE",
            "SHARD AFTER",
            "ACTION",
        ]
        .map(String::from)];
        for s in &r.sequences {
            rows.push([
                s.name.clone(),
                opt(s.source_value),
                opt(s.shard_before),
                opt(s.shard_after),
                s.action.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out.push_str("\nrows on the shard:\n");
    let mut rows = vec![["TABLE", "ROWS"].map(String::from)];
    for t in &r.tables {
        rows.push([t.table.clone(), t.rows.to_string()]);
    }
    out.push_str(&table(&rows));
    match &r.verify {
        Some(v) => {
            out.push_str("\nverify:\n");
            out.push_str(&super::verify::render(v));
            for c in &v.missing_columns {
                out.push_str(&format!(
                    "shard {} lacks column {c} that the source has: add it on the shard (ALTER TABLE … ADD COLUMN, as on the source), then cut over again\n",
                    r.shard
                ));
            }
        }
        None => out.push_str("\nverify: skipped (--no-verify)\n"),
    }
    let steps: Vec<String> = r
        .timings
        .iter()
        .map(|t| format!("{} {:.3}s", t.step, t.secs))
        .collect();
    out.push_str(&format!(
        "\ntook {:.3}s: {}\n",
        r.timings.iter().map(|t| t.secs).sum::<f64>(),
        steps.join(", ")
    ));
    out.push_str(&format!(
        "\n{}\n",
        if r.ok {
            format!("SAFE: point the accounts of shard {} at it", r.shard)
        } else {
            format!("NOT SAFE: shard {} must not take traffic yet", r.shard)
        }
    ));
    out
}
