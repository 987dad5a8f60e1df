//! `reshard rollback --shard S`: after a fenced cutover, make the source authoritative for S's
//! accounts again, with every write S took since (see `reshard_engine::ops::reverse`).
//!
//! Exit codes: 0 = rolled back (the application may send S's accounts to the source again);
//! 1 = not done yet (the reverse stream did not drain within `--timeout`: S stays fenced, run
//! it again); 2 = config or argument error (unknown shard, bad `--timeout`, a shard never cut
//! over with `--fence`); 3 = could not complete (unreachable endpoint, a failing query).

use reshard_engine::ops::reverse::{rollback, ReverseOpError, RollbackOptions, RollbackReport};

use crate::output::{emit_failure, emit_ok, load_config, CmdResult, Failure};
use crate::RollbackArgs;

/// Runs `reshard rollback`.
pub async fn run(args: RollbackArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let timeout = reshard_engine::pg::conn::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--timeout: {e}")))?;
    let opts = RollbackOptions {
        shard: args.shard.clone(),
        timeout,
    };
    let report = match rollback(&config, &opts).await {
        Ok(r) => r,
        Err(e) => {
            emit_failure(args.json, serde_json::json!({"shard": args.shard}), &e);
            return Err(match e {
                ReverseOpError::UnknownShard { .. }
                | ReverseOpError::NotCutOver { .. }
                | ReverseOpError::Unfinished { .. } => Failure::usage(e),
                ReverseOpError::Timeout { .. } | ReverseOpError::Halted { .. } => {
                    Failure::problem(e)
                }
                other => Failure::failed(other),
            });
        }
    };
    emit_ok(args.json, &report, || render(&report))
}

fn render(r: &RollbackReport) -> String {
    let mut out = String::new();
    match r.drain_lsn {
        Some(d) if !r.resumed => out.push_str(&format!(
            "shard {}: the source holds every write the shard took (up to shard LSN {d}, reverse progress {}) after waiting {:.1}s\n",
            r.shard, r.reached_lsn, r.waited_secs
        )),
        _ => out.push_str(&format!(
            "shard {}: already drained by an earlier run (reverse progress {})\n",
            r.shard, r.reached_lsn
        )),
    }
    for s in &r.sequences {
        if s.action == "set" {
            out.push_str(&format!(
                "sequence {}: source moved to {} (shard at {})\n",
                s.name,
                s.shard_after
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.source_value
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
            ));
        }
    }
    out.push_str(&format!(
        "reverse slot: {}\n",
        if r.slot_dropped {
            "dropped"
        } else {
            "left for the daemon to drop once it stops reading it"
        }
    ));
    out.push_str(&format!(
        "\nROLLED BACK: point the accounts of shard {} at the source again; the shard stays fenced (its writes are refused) until it is cut over again\n",
        r.shard
    ));
    out
}
