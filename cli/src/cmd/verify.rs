//! `reshard verify`: prove each shard holds exactly the source rows that route to it.
//!
//! Exit codes: 0 when every table matches on every shard; 1 on any mismatch (the differing
//! keys are printed); 2 on a config or argument error (unknown `--shard`/`--table`, bad
//! `--timeout`); 3 when the verification could not complete (unreachable endpoint, a shard
//! that did not catch up within `--timeout`, a failing query, differences only on shards that
//! no running `reshard run` is applying to).

use reshard_engine::ops::verify::{verify, Difference, VerifyError, VerifyOptions, VerifyReport};

use super::check::table;
use crate::output::{emit, load_config, CmdResult, Failure};
use crate::VerifyArgs;

/// Runs `reshard verify`.
pub async fn run(args: VerifyArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let timeout = reshard_engine::pg::conn::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--timeout: {e}")))?;
    let opts = VerifyOptions {
        tables: args.table.clone(),
        shards: args.shard.clone(),
        accounts: args.accounts.iter().map(|a| a.trim().to_owned()).collect(),
        sample: args.sample,
        timeout,
        router: None,
    };
    let report = verify(&config, &opts).await.map_err(verify_failure)?;
    emit(args.json, &report, || render(&report))?;
    if report.ok {
        return Ok(());
    }
    // Differences only on shards nothing was applying to: they may be changes not applied yet,
    // so the verification could not complete rather than found a divergence.
    let differing: Vec<&str> = report
        .results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.shard.as_str())
        .collect();
    let unsure = differing
        .iter()
        .all(|s| report.not_applying.iter().any(|n| n.shard == *s));
    if unsure {
        let mut shards: Vec<&str> = differing;
        shards.dedup();
        return Err(Failure::failed(anyhow::anyhow!(
            "shard(s) {} differ from the source, but no reshard run is applying to them and their \
             progress is behind the source: the differences may be changes not applied yet; start \
             reshard run, let it catch up, and verify again",
            shards.join(", ")
        )));
    }
    Err(Failure::problem(anyhow::anyhow!(
        "verification found differences"
    )))
}

/// Exit code of a verify error: 2 for what the operator typed, 3 for the rest.
pub(crate) fn verify_failure(e: VerifyError) -> Failure {
    match e {
        VerifyError::UnknownShard { .. }
        | VerifyError::UnknownTable { .. }
        | VerifyError::Config(_) => Failure::usage(e),
        other => Failure::failed(other),
    }
}

fn diff_line(d: &Difference, key_columns: &[String]) -> String {
    let key: Vec<String> = key_columns
        .iter()
        .zip(&d.key)
        .map(|(c, v)| format!("{c}={}", v.as_deref().unwrap_or("NULL")))
        .collect();
    let mut s = format!(
        "    {:<9} {}",
        serde_json::to_value(d.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        key.join(" ")
    );
    if let Some(b) = &d.belongs_to {
        s.push_str(&format!("  (belongs on {b})"));
    }
    s
}

/// The summary table, then the differing keys per table and shard.
pub(crate) fn render(r: &VerifyReport) -> String {
    let mut rows = vec![[
        "TABLE",
        "SHARD",
        "MODE",
        "ROWS SOURCE",
        "ROWS SHARD",
        "ACCOUNTS",
        "MISMATCHED",
        "SAMPLED",
        "RESULT",
    ]
    .map(String::from)];
    for t in &r.results {
        let result = if let Some(e) = &t.error {
            format!("ERROR: {e}")
        } else if t.ok {
            "ok".into()
        } else {
            format!(
                "DIFFERS: {} missing, {} extra, {} different",
                t.missing, t.extra, t.different
            )
        };
        rows.push([
            t.table.clone(),
            t.shard.clone(),
            t.mode.clone(),
            t.rows_source.to_string(),
            t.rows_shard.to_string(),
            if t.mode == "sharded" {
                t.accounts_checked.to_string()
            } else {
                "-".into()
            },
            if t.mode == "sharded" {
                t.accounts_mismatched.to_string()
            } else {
                "-".into()
            },
            t.accounts_sampled.to_string(),
            result,
        ]);
    }
    let mut out = table(&rows);
    for t in r.results.iter().filter(|t| !t.differences.is_empty()) {
        out.push_str(&format!("\n{} on {}:\n", t.table, t.shard));
        for d in &t.differences {
            out.push_str(&diff_line(d, &t.key_columns));
            out.push('\n');
        }
        if t.differences_omitted > 0 {
            out.push_str(&format!("    … and {} more\n", t.differences_omitted));
        }
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(&format!(
        "\n{} at source LSN {} in {:.1}s\n",
        if r.ok { "MATCH" } else { "MISMATCH" },
        r.source_lsn
            .map(|l| l.to_string())
            .unwrap_or_else(|| "-".into()),
        r.elapsed_secs
    ));
    out
}
