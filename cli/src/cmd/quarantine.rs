//! `reshard quarantine list|replay|drop`: the changes that could not be routed.

use anyhow::{anyhow, Context};
use reshard_engine::quarantine::{
    self,
    replay::{self, ReplayShard, ReplayTarget},
};
use reshard_engine::runtime;
use reshard_engine::source::ConnConfig;
use reshard_engine::spill;

use crate::output::{load_config, CmdResult, Failure};
use crate::{QuarantineAction, QuarantineArgs};

/// Runs one quarantine action.
pub async fn run(args: QuarantineArgs) -> CmdResult {
    match args.action {
        QuarantineAction::List { config, json } => {
            let cfg = load_config(&config.config)?;
            let dir = quarantine::dir_of(&cfg.spill.dir);
            let tables =
                quarantine::summarize_dir(&dir).map_err(|e| Failure::failed(anyhow!(e)))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "dir": dir, "tables": tables })
                    )
                    .map_err(|e| Failure::failed(anyhow!(e)))?
                );
                return Ok(());
            }
            if tables.is_empty() {
                println!("no quarantined changes in {}", dir.display());
                return Ok(());
            }
            println!(
                "{:<32} {:>8} {:>14} {:>14}  REASON / SAMPLE",
                "TABLE", "CHANGES", "FIRST_LSN", "LAST_LSN"
            );
            for t in &tables {
                println!(
                    "{:<32} {:>8} {:>14} {:>14}  {}\n{:<72}  sample: {}",
                    t.table, t.changes, t.first_lsn, t.last_lsn, t.reason, "", t.sample
                );
            }
            println!(
                "{} change(s) in {}; `reshard quarantine replay` applies those that route now",
                tables.iter().map(|t| t.changes).sum::<u64>(),
                dir.display()
            );
            Ok(())
        }
        QuarantineAction::Replay {
            config,
            table,
            json,
        } => {
            let cfg = load_config(&config.config)?;
            let _lock = lock(&cfg.spill.dir, "replay")?;
            let identity = spill::read_identity(&cfg.spill.dir).ok_or_else(|| {
                Failure::failed(anyhow!(
                    "spill directory {} has no identity file: nothing was ever run there, so \
                     it has no quarantine to replay",
                    cfg.spill.dir.display()
                ))
            })?;
            let (mut router, tables) = runtime::current_router(&cfg)
                .await
                .context("building the router with the current account map")?;
            let mut shards = Vec::new();
            for s in &cfg.shards {
                let client = ConnConfig::parse(&s.url)
                    .map_err(|e| Failure::usage(anyhow!("shard {}: {e}", s.name)))?
                    .connect_sql()
                    .await
                    .with_context(|| format!("connecting to shard {}", s.name))?;
                shards.push(ReplayShard {
                    name: s.name.clone(),
                    client,
                });
            }
            let target = ReplayTarget {
                shards,
                table_map: tables
                    .iter()
                    .filter(|t| t.rule.target != t.rule.source)
                    .map(|t| (t.rule.source.clone(), t.rule.target.clone()))
                    .collect(),
                system_id: identity.system_id,
                slot: identity.slot,
            };
            let report = replay::replay(&cfg.spill.dir, &mut router, &target, table.as_deref())
                .await
                .map_err(|e| Failure::failed(anyhow!(e)))?;
            let remaining: u64 = report.iter().map(|t| t.remaining).sum();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Failure::failed(anyhow!(e)))?
                );
            } else {
                for t in &report {
                    println!(
                        "{}: {} replayed, {} obsolete (before a TRUNCATE), {} remain",
                        t.table, t.replayed, t.obsolete, t.remaining
                    );
                    for w in &t.why_remaining {
                        println!("  remains because: {w}");
                    }
                }
                if report.is_empty() {
                    println!("no quarantined changes");
                }
            }
            if remaining > 0 {
                return Err(Failure::problem(anyhow!(
                    "{remaining} change(s) stay quarantined (see above); fix the map or the rows, \
                     then replay again, or drop them with `reshard quarantine drop --yes`"
                )));
            }
            Ok(())
        }
        QuarantineAction::Drop { config, table, yes } => {
            let cfg = load_config(&config.config)?;
            let dir = quarantine::dir_of(&cfg.spill.dir);
            let tables =
                quarantine::summarize_dir(&dir).map_err(|e| Failure::failed(anyhow!(e)))?;
            let chosen: Vec<_> = tables
                .iter()
                .filter(|t| {
                    table
                        .as_deref()
                        .is_none_or(|n| replay::same_table(n, &t.table))
                })
                .collect();
            let count: u64 = chosen.iter().map(|t| t.changes).sum();
            if count == 0 {
                let of = table
                    .as_deref()
                    .map(|t| format!(" of table {t}"))
                    .unwrap_or_default();
                println!(
                    "no quarantined changes{of} in {}: nothing to drop",
                    dir.display()
                );
                return Ok(());
            }
            if !yes {
                return Err(Failure::usage(anyhow!(
                    "this deletes {count} quarantined change(s) ({}) for good: their rows will \
                     not reach any shard; add --yes to confirm",
                    chosen
                        .iter()
                        .map(|t| format!("{}: {}", t.table, t.changes))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let _lock = lock(&cfg.spill.dir, "drop")?;
            for t in &chosen {
                let path = quarantine::table_file(&dir, &t.table);
                quarantine::rewrite_file(&path, &[]).map_err(|e| Failure::failed(anyhow!(e)))?;
                println!("dropped {} quarantined change(s) of {}", t.changes, t.table);
            }
            Ok(())
        }
    }
}

/// The spill dir's lock: replay and drop must not run beside `reshard run`.
fn lock(dir: &std::path::Path, what: &str) -> Result<spill::DirLock, Failure> {
    spill::lock_spill_dir(dir).map_err(|e| match e {
        spill::SpillError::Locked { .. } => Failure::failed(anyhow!(
            "`reshard run` is running on {} (it holds the lock): stop it (SIGTERM), then run \
             `reshard quarantine {what}` again; the daemon keeps later changes of quarantined \
             rows aside while it runs, so stopping it loses nothing",
            dir.display()
        )),
        e => Failure::failed(anyhow!(e)),
    })
}
