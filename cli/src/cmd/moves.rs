//! `reshard move --accounts A,B --from S --to T`: move accounts between two live shards (see
//! `reshard_engine::ops::moves`).
//!
//! Exit codes: 0 = moved (the map sends the accounts to T, S holds none of their rows); 1 = not
//! done: T did not catch up within `--timeout`, or the shards' rows of the accounts differ (the
//! accounts stay fenced on S; run it again); 2 = bad invocation or config (unknown shard or
//! account, an account not on `--from`, `hash = "postgres"`, T already holding rows of the
//! accounts, S older than PostgreSQL 15); 3 = could not complete (unreachable shard, failing
//! query).

use reshard_engine::ops::moves::{run_move, MoveError, MoveOptions, MoveReport, Selector};

use crate::output::{emit_failure, emit_ok, load_config, CmdResult, Failure};
use crate::MoveArgs;

/// Runs `reshard move`.
pub async fn run(args: MoveArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let timeout = reshard_engine::pg::conn::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--timeout: {e}")))?;
    let delete_grace = reshard_engine::pg::conn::parse_duration(&args.delete_grace)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--delete-grace: {e}")))?;
    let mut accounts = args.accounts.clone();
    if let Some(path) = &args.accounts_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Failure::usage(anyhow::anyhow!("--accounts-file {}: {e}", path.display()))
        })?;
        accounts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    let opts = MoveOptions {
        selector: Selector::Accounts(accounts),
        from: args.from.clone(),
        to: args.to.clone(),
        timeout,
        delete_grace,
        max_rows_per_sec: None,
    };
    let report = match run_move(&config, &opts).await {
        Ok(r) => r,
        Err(e) => {
            emit_failure(
                args.json,
                serde_json::json!({"from": args.from, "to": args.to}),
                &e,
            );
            return Err(match e {
                MoveError::Usage(_) => Failure::usage(e),
                MoveError::Timeout { .. } | MoveError::Mismatch { .. } => Failure::problem(e),
                other => Failure::failed(other),
            });
        }
    };
    emit_ok(args.json, &report, || render(&report))
}

fn render(r: &MoveReport) -> String {
    let mut out = format!(
        "move {}: accounts {} from shard {} to shard {}{}\n",
        r.id,
        r.accounts.join(","),
        r.from,
        r.to,
        r.resumed_at
            .map(|s| format!(" (resumed at step {})", s.as_str()))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "copied {} rows from the snapshot, streamed {} changes, caught up at {}, deleted {} rows from {}\n",
        r.rows_copied,
        r.rows_streamed,
        r.fence_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
        r.rows_deleted,
        r.from
    ));
    let equal = r.checks.iter().filter(|c| c.equal).count();
    if !r.checks.is_empty() {
        out.push_str(&format!(
            "verified {equal}/{} table-account digests equal\n",
            r.checks.len()
        ));
    }
    out.push_str(&format!(
        "\nMOVED in {:.1}s: the map sends the accounts to {}; {} keeps refusing their writes (fence {} in reshard.fence there, {} refused so far)\n",
        r.secs, r.to, r.from, r.id, r.refused
    ));
    out
}
