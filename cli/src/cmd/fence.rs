//! `reshard fence --shard S` and `reshard unfence --shard S`: refuse (or allow again) the
//! application's writes to S's accounts on the source (`--on source`, the default) or every
//! write to S's sharded tables on S itself (`--on shard`).
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

/// Runs `reshard unfence`.
pub async fn run_unfence(args: FenceArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    let on = side(args.on);
    if !config.shards.iter().any(|s| s.name == args.shard) {
        return Err(fence_failure(FenceError::UnknownShard {
            name: args.shard.clone(),
            known: config.shard_names(),
        }));
    }
    let mut db = target(&config, &args.shard, on).await?;
    let lock_timeout = std::time::Duration::from_millis(config.cutover.fence_lock_timeout_ms);
    let removed = fence::remove(&mut db, on, &args.shard, lock_timeout)
        .await
        .map_err(fence_failure)?;
    if args.json {
        let v = serde_json::json!({"shard": args.shard, "on": on, "removed": removed});
        println!("{v}");
    } else {
        match removed {
            Some(f) => println!(
                "shard {} is no longer fenced on the {on}: the fence stood {:.1}s (since {}, last step {}) and refused {} writes",
                f.shard, f.fenced_secs, f.installed_at, f.step, f.refused
            ),
            None => println!("shard {} was not fenced on the {on}; nothing to do", args.shard),
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
