//! `reshard check`: preflight checks of the source and every shard.
//!
//! With `--fix`, first runs [`fix_replica_identity`] on the source and prints what it did.
//!
//! Exit codes: 0 when no check FAILs (WARNs allowed); 1 when any check FAILs; 2 on a config
//! error; 3 when the source or a shard could not be reached. Every check that could run is
//! printed in all cases; an unreachable endpoint is itself a FAIL line (`connect`), and the
//! exit code 3 tells scripts that the report is incomplete.

use reshard_engine::ops::check::{run_checks, CheckReport, CheckStatus, DISTINCT_SHARDS};
use reshard_engine::pg::identity::{fix_replica_identity, FixAction};

use crate::output::{emit, load_config, CmdResult, Failure};
use crate::CheckArgs;

/// Runs `reshard check`.
pub async fn run(args: CheckArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let mut fixed = Vec::new();
    if args.fix {
        fixed = fix_replica_identity(&config)
            .await
            .map_err(|e| Failure::failed(anyhow::Error::from(e).context("check --fix")))?;
        if !args.json {
            print!("{}", render_fixes(&fixed));
        }
    }
    let mut report = run_checks(&config).await;
    report.fixed = fixed;
    emit(args.json, &report, || render(&report))?;
    let fails = report.count(CheckStatus::Fail);
    if report.unreachable {
        Err(Failure::failed(anyhow::anyhow!(
            "{fails} check(s) failed; some endpoints were unreachable, so the report is incomplete"
        )))
    } else if report
        .checks
        .iter()
        .any(|c| c.status == CheckStatus::Fail && c.check == DISTINCT_SHARDS)
    {
        Err(Failure::usage(anyhow::anyhow!(
            "{fails} check(s) failed; a [[shards]] url names the wrong database: fix the config and check again"
        )))
    } else if fails > 0 {
        Err(Failure::problem(anyhow::anyhow!(
            "{fails} check(s) failed; run the SQL under \"Fixes:\" and check again"
        )))
    } else {
        Ok(())
    }
}

/// What `--fix` did, one line per statement or skip, then a blank line.
fn render_fixes(actions: &[FixAction]) -> String {
    if actions.is_empty() {
        return "--fix: nothing to fix (every sharded table's replica identity carries its key, or it has a strategy)\n\n".into();
    }
    let mut out = String::from("--fix:\n");
    for a in actions {
        out.push_str(&format!(
            "  {} {}: {}\n",
            if a.ok { "done" } else { "NOT DONE" },
            a.table,
            a.action
        ));
    }
    out.push('\n');
    out
}

/// Aligned `STATUS  CHECK  TARGET  DETAIL` table, then the fixes.
fn render(report: &CheckReport) -> String {
    let mut rows: Vec<[String; 4]> = vec![[
        "STATUS".into(),
        "CHECK".into(),
        "TARGET".into(),
        "DETAIL".into(),
    ]];
    for c in &report.checks {
        rows.push([
            c.status.label().into(),
            c.check.clone(),
            c.target.clone(),
            c.detail.clone(),
        ]);
    }
    let mut out = table(&rows);
    let fixes: Vec<_> = report.checks.iter().filter(|c| c.fix.is_some()).collect();
    if !fixes.is_empty() {
        out.push_str("\nFixes:\n");
        for c in fixes {
            out.push_str(&format!(
                "  -- {} {} ({}):\n  {}\n",
                c.status.label(),
                c.check,
                c.target,
                c.fix.as_deref().unwrap_or_default().replace('\n', "\n  ")
            ));
        }
    }
    out.push_str(&format!(
        "\n{} passed, {} warnings, {} failed\n",
        report.count(CheckStatus::Pass),
        report.count(CheckStatus::Warn),
        report.count(CheckStatus::Fail)
    ));
    out
}

/// Renders rows as left-aligned columns separated by two spaces (the last column unpadded).
/// Shared by the operator commands (`check`, `status`, `lag`, `verify`, `cutover`).
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
