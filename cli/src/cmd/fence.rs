//! `reshard fence --shard S` and `reshard unfence --shard S`: refuse (or allow again) the
//! application's writes to S's accounts on the source (`--on source`, the default) or every
//! write to S's sharded tables on S itself (`--on shard`).
//!
//! `unfence --on shard` also lists the fences account moves left on S (named after the move);
//! `--fence NAME` lifts one of them, `--all` every fence there. A move's fence is only lifted
//! once the move has deleted its rows from S (exit 2 before that, naming the move's step).
//!
//! Exit codes: 0 = the fence is installed (refreshed if it was) / removed (or was not there);
//! 2 = config or argument error (unknown shard, an account map that does not load);
//! 3 = could not complete (unreachable database, a table lock not granted within
//! `[cutover] fence_lock_timeout_ms`, a failing query).

use reshard_engine::config::{Config, HashKind};
use reshard_engine::ops::fence::{self, Fence, FenceError, FenceSide, FenceSpec};
use reshard_engine::ops::verify::load_account_map;
use reshard_engine::pg::conn::connect_plain;
use tokio_postgres::Client;

use super::check::table;
use crate::output::{load_config, CmdResult, Failure};
use crate::{FenceArgs, FenceOn};

fn side(on: FenceOn) -> FenceSide {
    match on {
        FenceOn::Source => FenceSide::Source,
        FenceOn::Shard => FenceSide::Shard,
    }
}

fn fence_failure(e: FenceError) -> Failure {
    match e {
        FenceError::UnknownShard { .. } | FenceError::Config(_) => Failure::usage(e),
        other => Failure::failed(other),
    }
}

async fn connect(url: &str, what: &str) -> Result<Client, Failure> {
    connect_plain(url)
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("cannot connect to {what}: {e}")))
}

/// The database the fence lives on.
async fn target(config: &Config, shard: &str, on: FenceSide) -> Result<Client, Failure> {
    match on {
        FenceSide::Source => connect(&config.source.url, "the source").await,
        FenceSide::Shard => {
            let Some(s) = config.shards.iter().find(|s| s.name == shard) else {
                return Err(fence_failure(FenceError::UnknownShard {
                    name: shard.to_owned(),
                    known: config.shard_names(),
                }));
            };
            connect(&s.url, &format!("shard {shard}")).await
        }
    }
}

/// Runs `reshard fence`.
pub async fn run_fence(args: FenceArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    if args.fence.is_some() || args.all {
        return Err(Failure::usage(anyhow::anyhow!(
            "--fence and --all are options of reshard unfence"
        )));
    }
    let on = side(args.on);
    let src = connect(&config.source.url, "the source").await?;
    let reason = "reshard fence";
    let spec = match on {
        FenceSide::Source => {
            let map = match config.routing.hash {
                HashKind::Map => Some(
                    load_account_map(&config)
                        .await
                        .map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?,
                ),
                HashKind::Postgres => None,
            };
            FenceSpec::for_source(&config, &src, &args.shard, reason, map).await
        }
        FenceSide::Shard => FenceSpec::for_shard(&config, &src, &args.shard, reason).await,
    }
    .map_err(fence_failure)?;
    let mut db = match on {
        FenceSide::Source => src,
        FenceSide::Shard => target(&config, &args.shard, on).await?,
    };
    let f = fence::install(&mut db, &spec)
        .await
        .map_err(fence_failure)?;
    if args.json {
        print_json(&f)?;
    } else {
        println!(
            "shard {} is fenced on the {on} since {}: {} from now on (SQLSTATE {}); lift it with: reshard unfence --shard {}{}",
            f.shard,
            f.installed_at,
            match on {
                FenceSide::Source => "writes that route to it are refused there",
                FenceSide::Shard => "every write to its sharded tables is refused there",
            },
            fence::FENCE_SQLSTATE,
            f.shard,
            if on == FenceSide::Shard { " --on shard" } else { "" }
        );
        print!("{}", render(std::slice::from_ref(&f)));
    }
    Ok(())
}

/// Runs `reshard unfence`: the shard's own fence, one fence by name (`--fence`), or every fence
/// on the shard's database (`--all`); then lists the fences left there.
pub async fn run_unfence(args: FenceArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let on = side(args.on);
    if !config.shards.iter().any(|s| s.name == args.shard) {
        return Err(fence_failure(FenceError::UnknownShard {
            name: args.shard.clone(),
            known: config.shard_names(),
        }));
    }
    if args.all && on != FenceSide::Shard {
        return Err(Failure::usage(anyhow::anyhow!(
            "--all lifts every fence on a shard's own database: give --on shard (on the source, lift one shard's fence with --shard S)"
        )));
    }
    let mut db = target(&config, &args.shard, on).await?;
    let lock_timeout = std::time::Duration::from_millis(config.cutover.fence_lock_timeout_ms);
    let present = fence::status(&db, on).await.map_err(fence_failure)?;
    // Which fences to lift, by name.
    let names: Vec<String> = if args.all {
        present.iter().map(|f| f.shard.clone()).collect()
    } else if let Some(name) = &args.fence {
        vec![name.clone()]
    } else {
        vec![args.shard.clone()]
    };
    // A move's fence keeps stale writers off rows the move has not deleted yet: lifting it
    // before the move's delete would let writes land on the old shard that nothing carries to
    // the target. Refused, naming the move's step, before anything is lifted.
    for name in &names {
        let is_move = present
            .iter()
            .any(|f| &f.shard == name && f.rule == "accounts");
        if !is_move {
            continue;
        }
        let step = reshard_engine::ops::moves::move_step(&config, name)
            .await
            .map_err(|e| Failure::failed(anyhow::anyhow!("looking up move {name}: {e}")))?;
        if let Some((to, step)) = step {
            if step < reshard_engine::ops::moves::Step::Deleted {
                return Err(Failure::usage(anyhow::anyhow!(
                    "fence {name} on shard {} belongs to a move that is at step {} (recorded in reshard.move on shard {to}): lifting it now would let writes of the moved accounts land on shard {} that never reach shard {to}; finish the move first (run the same `reshard move` again), then unfence. Nothing was lifted",
                    args.shard,
                    step.as_str(),
                    args.shard
                )));
            }
        }
    }
    let mut lifted = Vec::new();
    for name in &names {
        if let Some(f) = fence::remove(&mut db, on, name, lock_timeout)
            .await
            .map_err(fence_failure)?
        {
            lifted.push(f);
        }
    }
    let left = fence::status(&db, on).await.map_err(fence_failure)?;
    let which = if args.all {
        "every fence".to_owned()
    } else {
        format!("fence {}", names.join(", "))
    };
    if args.json {
        let own = lifted.iter().find(|f| f.shard == args.shard);
        let v = serde_json::json!({
            "shard": args.shard,
            "on": on,
            "asked": which,
            "removed": own,
            "lifted": lifted,
            "left": left,
        });
        println!("{v}");
    } else {
        let place = match on {
            FenceSide::Source => "the source".to_owned(),
            FenceSide::Shard => format!("shard {}'s own database", args.shard),
        };
        for f in &lifted {
            println!(
                "fence {} ({}) on {place} is lifted: it stood {:.1}s (since {}, last step {}) and refused {} writes",
                f.shard, f.reason, f.fenced_secs, f.installed_at, f.step, f.refused
            );
        }
        if lifted.is_empty() {
            println!("{which}: not on {place}; nothing to do");
        }
        if !left.is_empty() {
            println!(
                "\nStill fenced on {place} (lift one with --fence NAME{}):",
                if on == FenceSide::Shard {
                    ", all with --all"
                } else {
                    ""
                }
            );
            let mut rows = vec![["NAME", "RULE", "REASON", "SINCE", "REFUSED"].map(String::from)];
            for f in &left {
                rows.push([
                    f.shard.clone(),
                    f.rule.clone(),
                    f.reason.clone(),
                    f.installed_at.clone(),
                    f.refused.to_string(),
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

fn print_json(f: &Fence) -> CmdResult {
    let json = serde_json::to_string_pretty(f)
        .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the fence: {e}")))?;
    println!("{json}");
    Ok(())
}

/// The fences as a table (also used by `status`).
pub fn render(fences: &[Fence]) -> String {
    let mut rows = vec![[
        "SHARD", "ON", "SINCE", "FENCED", "REFUSED", "STEP", "LSN", "TABLES",
    ]
    .map(String::from)];
    for f in fences {
        rows.push([
            f.shard.clone(),
            f.side.to_string(),
            f.installed_at.clone(),
            format!("{:.1}s", f.fenced_secs),
            f.refused.to_string(),
            f.step.clone(),
            f.lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            f.tables.len().to_string(),
        ]);
    }
    table(&rows)
}
