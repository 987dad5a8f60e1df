//! `reshard plan --groups K`: split one migration into K groups that share nothing (see
//! [`reshard_engine::ops::plan`]), write their configs and the Helm values, print the plan.
//! `reshard plan --shards M`: print, read-only, what growing the hash layout from N to M
//! shards moves (see [`reshard_engine::ops::grow`]).
//!
//! With hash = "map", `--shards M` plans a balanced account map (see
//! [`reshard_engine::ops::balance`]) and `--out FILE` writes it.
//!
//! Exit codes: 0 when the files are written (or the growth plan printed); 2 on a config error,
//! a `--groups` out of range, an output file that exists (without `--force`), or an M that is
//! not a multiple of N; 3 when the source or a shard cannot be reached.

use std::path::{Path, PathBuf};

use reshard_engine::config::HashKind;
use reshard_engine::ops::balance::{plan_map, MapPlan};
use reshard_engine::ops::grow::{check_shards, plan_growth, GrowError, GrowPlan};
use reshard_engine::ops::plan::{make_plan, slot_headroom, table_sizes, Plan};
use reshard_engine::pg::conn::connect_plain;
use reshard_engine::pg::distinct;

use super::check::table;
use super::slot::human_bytes;
use crate::output::{load_config, CmdResult, Failure};
use crate::PlanArgs;

/// Runs `reshard plan`.
pub async fn run(args: PlanArgs) -> CmdResult {
    let path = &args.config.config;
    let config = load_config(path)?;
    let groups = match (args.groups, args.shards) {
        (_, Some(m)) if config.routing.hash == HashKind::Map => {
            return balance(&config, usize::from(m), &args).await
        }
        (_, Some(m)) => return grow(&config, usize::from(m), args.rate, args.json).await,
        (Some(k), None) => k,
        (None, None) => {
            return Err(Failure::usage(anyhow::anyhow!(
                "give --groups K (split the migration) or --shards M (plan a new shard count)"
            )))
        }
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    let client = connect_plain(&config.source.url).await.map_err(|e| {
        Failure::failed(anyhow::anyhow!(
            "cannot connect to the source ([source] url) to read the tables and their sizes: {e}"
        ))
    })?;
    let tables = table_sizes(&client, &config)
        .await
        .map_err(|e| Failure::failed(anyhow::Error::from(e).context("reading the table set")))?;
    let plan = make_plan(path, &text, &config, tables, usize::from(groups))
        .map_err(|e| Failure::usage(anyhow::Error::from(e)))?;
    let headroom = slot_headroom(&client)
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("reading max_replication_slots: {e}")))?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("."));
    write(&plan, &out, args.force)?;
    if args.json {
        let json = serde_json::to_string_pretty(&plan)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the plan: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", render(&plan, &out));
        let k = plan.groups.len() as i64;
        if headroom.free_slots < k || headroom.free_senders < k {
            println!(
                "\nWARNING: the groups need {k} replication slots and {k} WAL senders on the source; \
                 {} slot(s) and {} sender(s) are free (max_replication_slots = {}, max_wal_senders = {}). \
                 Raise them (ALTER SYSTEM SET …; restart) before starting every group.",
                headroom.free_slots, headroom.free_senders, headroom.max_slots, headroom.max_senders
            );
        }
    }
    Ok(())
}

/// Writes every group config and the Helm values into `out` (created if missing); refuses to
/// overwrite an existing file unless `force`, before writing anything.
fn write(plan: &Plan, out: &Path, force: bool) -> Result<(), Failure> {
    let files: Vec<&(String, String)> = plan
        .configs
        .iter()
        .chain(std::iter::once(&plan.helm_values))
        .collect();
    if !force {
        let existing: Vec<String> = files
            .iter()
            .map(|(f, _)| out.join(f))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(Failure::usage(anyhow::anyhow!(
                "{} already exist(s); choose another --out directory or pass --force to overwrite",
                existing.join(", ")
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| {
        Failure::usage(anyhow::anyhow!(
            "cannot create --out {}: {e}",
            out.display()
        ))
    })?;
    for (f, text) in files {
        let p = out.join(f);
        std::fs::write(&p, text)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot write {}: {e}", p.display())))?;
    }
    Ok(())
}

/// The groups, then every table with its group, then what to run.
fn render(plan: &Plan, out: &Path) -> String {
    let total: i64 = plan.groups.iter().map(|g| g.bytes).sum();
    let tables: usize = plan.groups.iter().map(|g| g.tables.len()).sum();
    let mut s = format!(
        "{} groups over {tables} tables ({}), balanced by pg_total_relation_size; each table in exactly one group (broadcast tables too: their group copies them to every shard)\n\n",
        plan.groups.len(),
        human_bytes(total)
    );
    let mut rows = vec![[
        "GROUP".to_owned(),
        "TABLES".into(),
        "SIZE".into(),
        "SLOT".into(),
        "PUBLICATION".into(),
        "SPILL DIR".into(),
        "METRICS".into(),
        "CONFIG".into(),
    ]];
    for g in &plan.groups {
        rows.push([
            g.name.clone(),
            g.tables.len().to_string(),
            human_bytes(g.bytes),
            g.slot.clone(),
            g.publication.clone(),
            g.spill_dir.display().to_string(),
            if g.metrics.is_empty() {
                "off".into()
            } else {
                g.metrics.clone()
            },
            out.join(&g.file).display().to_string(),
        ]);
    }
    s.push_str(&table(&rows));
    let mut rows = vec![[
        "TABLE".to_owned(),
        "MODE".into(),
        "SIZE".into(),
        "GROUP".into(),
    ]];
    for g in &plan.groups {
        for t in &g.tables {
            rows.push([
                t.table.to_string(),
                t.mode.to_string(),
                human_bytes(t.bytes),
                g.name.clone(),
            ]);
        }
    }
    s.push('\n');
    s.push_str(&table(&rows));
    s.push_str(&format!(
        "\nWrote {} and the Helm values {}.\nEach group is an ordinary daemon: `reshard check -c <group config>` (proves the groups disjoint), then `reshard run -c <group config>` for every group.\n",
        plan.configs
            .iter()
            .map(|(f, _)| out.join(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        out.join(&plan.helm_values.0).display()
    ));
    s
}

/// Every shard of the planned layout (`[[shards]]` and the `[[new_shards]]` it adds) is its own
/// database: a typo in a url is refused (exit 2) before anything is measured. The plan reads only
/// the old shards, so a `[[new_shards]]` entry that is not reachable yet is left out with a
/// warning (`rebalance` proves it before a move) and the others are still proven distinct.
async fn refuse_shared_databases(
    config: &reshard_engine::config::Config,
    to: usize,
) -> Result<(), Failure> {
    let new = to.saturating_sub(config.shards.len());
    let mut entries = distinct::entries(config, new);
    loop {
        match distinct::prove(&entries, None).await {
            Ok(()) => return Ok(()),
            Err(
                distinct::DistinctError::Unreachable {
                    section: distinct::Section::NewShards,
                    name,
                    entry,
                    message,
                }
                | distinct::DistinctError::Refused {
                    section: distinct::Section::NewShards,
                    name,
                    entry,
                    message,
                },
            ) if entries
                .iter()
                .any(|e| e.section == distinct::Section::NewShards && e.name == name) =>
            {
                tracing::warn!(
                    "{entry} is not reachable ({message}): the plan does not need it, but \
                     whether it is another shard's database is checked only by `reshard \
                     rebalance`"
                );
                entries.retain(|e| !(e.section == distinct::Section::NewShards && e.name == name));
            }
            Err(e) if e.is_mistake() => return Err(Failure::usage(anyhow::Error::from(e))),
            Err(e) => return Err(Failure::failed(anyhow::Error::from(e))),
        }
    }
}

/// `reshard plan --shards M`: the growth plan, printed; nothing is written.
async fn grow(
    config: &reshard_engine::config::Config,
    to: usize,
    rate: u64,
    json: bool,
) -> CmdResult {
    check_shards(config, to).map_err(|e| Failure::usage(anyhow::Error::from(e)))?;
    refuse_shared_databases(config, to).await?;
    let plan = plan_growth(config, to, rate).await.map_err(|e| match e {
        GrowError::NotMultiple { .. }
        | GrowError::NewShardsMissing { .. }
        | GrowError::NotHash
        | GrowError::NotMap
        | GrowError::MapTooMany { .. }
        | GrowError::MapTooFew { .. }
        | GrowError::Map(_) => Failure::usage(anyhow::Error::from(e)),
        _ => Failure::failed(anyhow::Error::from(e)),
    })?;
    if json {
        let text = serde_json::to_string_pretty(&plan)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the plan: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render_growth(&plan));
    }
    Ok(())
}

/// One line per new shard, then the totals and the estimate.
fn render_growth(plan: &GrowPlan) -> String {
    let mut s = format!(
        "{} -> {} shards (hash = \"postgres\"): new shard j takes the rows of old shard j mod {} whose hash satisfies MODULUS {}, REMAINDER j; no row moves between two old shards. Read-only: nothing was written.\n\n",
        plan.from_shards, plan.to_shards, plan.from_shards, plan.to_shards
    );
    let mut rows = vec![[
        "NEW SHARD".to_owned(),
        "NAME".into(),
        "FROM".into(),
        "ROWS".into(),
        "BYTES".into(),
        "ACTION".into(),
    ]];
    for n in &plan.shards {
        rows.push([
            n.index.to_string(),
            n.name.clone(),
            format!("{} ({})", n.from, n.from_index),
            n.rows.to_string(),
            human_bytes(n.bytes),
            if n.stays {
                "stays in place".into()
            } else {
                "move".into()
            },
        ]);
    }
    s.push_str(&table(&rows));
    s.push_str(&format!(
        "\nTo move: {} rows, {} (row data, pg_column_size). At {} rows/s (--rate): about {}s.\n",
        plan.rows_to_move,
        human_bytes(plan.bytes_to_move),
        plan.rate_rows_per_sec,
        plan.eta_secs.ceil()
    ));
    if plan.misplaced_rows > 0 {
        s.push_str(&format!(
            "WARNING: {} row(s) are on an old shard that hash partitioning does not assign them to (not part of this plan); run `reshard verify`.\n",
            plan.misplaced_rows
        ));
    }
    s.push_str(&format!(
        "Execute it with `reshard rebalance --shards {}` (the same plan, as one move per new shard).\n",
        plan.to_shards
    ));
    s
}

/// `reshard plan --shards M` for `hash = "map"`: the balanced map, printed; with `--out` the new
/// map file is written (nothing else is).
async fn balance(config: &reshard_engine::config::Config, to: usize, args: &PlanArgs) -> CmdResult {
    check_shards(config, to).map_err(|e| Failure::usage(anyhow::Error::from(e)))?;
    refuse_shared_databases(config, to).await?;
    // Writing the plan over the live map would route the accounts to shards that do not hold
    // their rows yet: refused before anything is measured.
    if let (Some(out), Some(live)) = (&args.out, &config.routing.map) {
        let same = match (std::fs::canonicalize(out), std::fs::canonicalize(live)) {
            (Ok(a), Ok(b)) => a == b,
            _ => out == live,
        };
        if same {
            return Err(Failure::usage(anyhow::anyhow!(
                "--out {} is the live account map ([routing] map): the application would send the accounts to shards that do not hold their rows yet; write the plan to another file (the moves flip the live map account by account)",
                out.display()
            )));
        }
    }
    if let Some(out) = &args.out {
        if out.exists() && !args.force {
            return Err(Failure::usage(anyhow::anyhow!(
                "{} already exists; choose another --out file or pass --force to overwrite",
                out.display()
            )));
        }
    }
    let plan = plan_map(config, to, args.rate, args.tolerance)
        .await
        .map_err(|e| match e {
            GrowError::Shard { .. } | GrowError::Catalog(_) => {
                Failure::failed(anyhow::Error::from(e))
            }
            _ => Failure::usage(anyhow::Error::from(e)),
        })?;
    if let Some(out) = &args.out {
        let text = plan.csv().map_err(|e| {
            Failure::failed(anyhow::anyhow!("cannot write the new map: account {e}"))
        })?;
        std::fs::write(out, text)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot write {}: {e}", out.display())))?;
    }
    if args.json {
        let mut v = serde_json::to_value(&plan)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the plan: {e}")))?;
        v["batches"] = serde_json::to_value(plan.batches())
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the plan: {e}")))?;
        v["out"] = serde_json::json!(args.out.as_ref().map(|p| p.display().to_string()));
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the plan: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render_balance(&plan, args.out.as_deref()));
    }
    Ok(())
}

/// The map diff, the shards before and after, the totals and the estimate.
fn render_balance(plan: &MapPlan, out: Option<&Path>) -> String {
    let mut s = format!(
        "{} -> {} shards (hash = \"map\"): accounts stay where they are; greedy by bytes: the largest account that fits moves from the most loaded shard to the least loaded until every shard is within ±{}% of the mean ({}). Read-only{}.\n\n",
        plan.from_shards,
        plan.to_shards,
        plan.tolerance_pct,
        human_bytes(plan.mean_bytes),
        if out.is_some() { ": only --out was written" } else { ": nothing was written" }
    );
    let mut rows = vec![[
        "ACCOUNT".to_owned(),
        "FROM".into(),
        "TO".into(),
        "ROWS".into(),
        "BYTES".into(),
    ]];
    for m in &plan.moves {
        rows.push([
            m.account.clone(),
            m.from.clone(),
            m.to.clone(),
            m.rows.to_string(),
            human_bytes(m.bytes),
        ]);
    }
    if plan.moves.is_empty() {
        s.push_str("No account moves: the shards are already within the tolerance.\n");
    } else {
        s.push_str(&table(&rows));
    }
    let mut rows = vec![[
        "SHARD".to_owned(),
        "ACCOUNTS".into(),
        "BYTES BEFORE".into(),
        "BYTES AFTER".into(),
        "ROWS AFTER".into(),
    ]];
    for sh in &plan.shards {
        rows.push([
            if sh.new {
                format!("{} (new)", sh.name)
            } else {
                sh.name.clone()
            },
            format!("{} -> {}", sh.accounts_before, sh.accounts_after),
            human_bytes(sh.bytes_before),
            human_bytes(sh.bytes_after),
            sh.rows_after.to_string(),
        ]);
    }
    s.push('\n');
    s.push_str(&table(&rows));
    let ratio = |r: f64| {
        if r.is_finite() {
            format!("{r:.2}")
        } else {
            "inf".into()
        }
    };
    s.push_str(&format!(
        "\nMost/least loaded shard: {} now, {} after{}.\nTo move: {} accounts in {} moves (one `reshard move` per from/to pair), {} rows, {} (row data, pg_column_size). At {} rows/s (--rate): about {}s.\n",
        ratio(plan.max_min_ratio_before),
        ratio(plan.max_min_ratio_after),
        if plan.balanced {
            String::new()
        } else {
            format!(" (NOT within ±{}%: an account is larger than the shards' share, or the accounts are too coarse to balance finer)", plan.tolerance_pct)
        },
        plan.moves.len(),
        plan.batches().len(),
        plan.rows_to_move,
        human_bytes(plan.bytes_to_move),
        plan.rate_rows_per_sec,
        plan.eta_secs.ceil()
    ));
    if plan.misplaced_rows > 0 || plan.unmapped_rows > 0 {
        s.push_str(&format!(
            "WARNING: {} row(s) are on a shard the map does not give their account and {} row(s) belong to accounts the map does not know (neither is part of this plan); run `reshard verify`.\n",
            plan.misplaced_rows, plan.unmapped_rows
        ));
    }
    match out {
        Some(p) => s.push_str(&format!(
            "Wrote the new account map to {} ({} accounts).\n",
            p.display(),
            plan.accounts
        )),
        None => s.push_str("Give --out FILE to write the new account map.\n"),
    }
    s
}
