//! `reshard slot list|create|drop`: inspect and manage the replication slot.

use anyhow::Context;
use reshard_engine::source::{list_slots, ReplicationClient};

use super::source_args::{create_selected_slot, resolve};
use crate::output::{CmdResult, Failure};
use crate::{SlotAction, SlotArgs};

/// Runs `reshard slot …`.
pub async fn run(args: SlotArgs) -> CmdResult {
    match args.action {
        SlotAction::List { source, json } => {
            let sel = resolve(&source)?;
            let client = sel.connect_sql().await?;
            let slots = list_slots(&client)
                .await
                .context("listing replication slots")?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&slots).map_err(anyhow::Error::from)?
                );
            } else {
                let lsn =
                    |l: Option<reshard_engine::Lsn>| l.map(|l| l.to_string()).unwrap_or("-".into());
                println!(
                    "{:<24} {:<9} {:<9} {:<6} {:>8} {:>14} {:>20} {:>14} WAL_STATUS",
                    "SLOT",
                    "TYPE",
                    "PLUGIN",
                    "ACTIVE",
                    "PID",
                    "RESTART_LSN",
                    "CONFIRMED_FLUSH_LSN",
                    "RETAINED_WAL",
                );
                for s in &slots {
                    let mark = if s.slot_name == sel.slot { "*" } else { "" };
                    println!(
                        "{:<24} {:<9} {:<9} {:<6} {:>8} {:>14} {:>20} {:>14} {}",
                        format!("{}{}", s.slot_name, mark),
                        s.slot_type,
                        s.plugin.as_deref().unwrap_or("-"),
                        s.active,
                        s.active_pid.map(|p| p.to_string()).unwrap_or("-".into()),
                        lsn(s.restart_lsn),
                        lsn(s.confirmed_flush_lsn),
                        s.retained_wal_bytes.map(human_bytes).unwrap_or("-".into()),
                        s.wal_status.as_deref().unwrap_or("-"),
                    );
                }
                if slots.is_empty() {
                    println!("(no replication slots)");
                }
            }
            Ok(())
        }
        SlotAction::Create { source } => {
            let sel = resolve(&source)?;
            let client = sel.connect_sql().await?;
            let mut repl = ReplicationClient::connect(&sel.conn)
                .await
                .context("opening a replication connection to the source")?;
            let created = create_selected_slot(&sel, &client, &mut repl).await?;
            repl.close().await;
            println!(
                "created slot {} (pgoutput) at consistent point {}; publication {} {}",
                created.info.name,
                created.info.consistent_point,
                sel.publication,
                if created.publication_created {
                    "created"
                } else {
                    "already existed"
                }
            );
            Ok(())
        }
        SlotAction::Drop { source, purge } => {
            let sel = resolve(&source)?;
            let mut repl = ReplicationClient::connect(&sel.conn)
                .await
                .context("opening a replication connection to the source")?;
            // Never WAIT: a drop waiting on a running daemon's walsender hangs silently, and
            // once the daemon stops it drops the slot anyway (the next run must start over).
            let dropped = match repl.drop_slot(&sel.slot, false).await {
                Ok(()) => true,
                Err(e) if e.sqlstate() == Some("42704") => false,
                Err(e) if e.sqlstate() == Some("55006") => {
                    return Err(Failure::failed(anyhow::Error::from(e).context(format!(
                        "slot {} is being streamed (a reshard run is up?): nothing was dropped; \
                         stop the daemon first (SIGTERM), then run this again",
                        sel.slot
                    ))))
                }
                Err(e) => {
                    return Err(Failure::failed(
                        anyhow::Error::from(e).context(format!("dropping slot {}", sel.slot)),
                    ))
                }
            };
            repl.close().await;
            println!(
                "slot {}: {}",
                sel.slot,
                if dropped { "dropped" } else { "did not exist" }
            );
            if purge {
                let Some(cfg) = &sel.config else {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "--purge needs -c reshard.toml (it cleans the shards listed there)"
                    )));
                };
                let mut failed = 0;
                for step in reshard_engine::ops::purge::purge(cfg).await {
                    match &step.error {
                        None => println!("{}: {}: done", step.target, step.sql),
                        Some(e) => {
                            failed += 1;
                            println!("{}: {}: FAILED: {e}", step.target, step.sql);
                        }
                    }
                }
                if failed > 0 {
                    return Err(Failure::failed(anyhow::anyhow!(
                        "{failed} clean-up step(s) failed (see above); fix the cause and run `reshard slot drop --purge` again"
                    )));
                }
                if cfg.spill.dir.exists() {
                    std::fs::remove_dir_all(&cfg.spill.dir).with_context(|| {
                        format!("removing the spill directory {}", cfg.spill.dir.display())
                    })?;
                    println!("spill directory {}: removed", cfg.spill.dir.display());
                }
            }
            Ok(())
        }
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(b: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
