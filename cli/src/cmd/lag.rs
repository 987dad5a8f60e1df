//! `reshard lag`: per shard applied LSN, lag in bytes and seconds, commit-to-apply latency;
//! and, for each cut-over shard whose writes stream back to the source, the reverse stream's
//! applied LSN and lag (JSON `reverse`).
//!
//! From the daemon when it answers; offline (progress rows) otherwise, where latencies are
//! `-`. `--watch` refreshes every `--interval` seconds until Ctrl-C (clearing the screen on a
//! terminal, printing successive blocks otherwise). Offline, a lag that cannot be known (the
//! source's WAL position or a shard's progress row unreadable) is shown as `-` (JSON `null`)
//! with the error, never as 0. Exit codes: 0; 2 on a config error; 3 (without `--watch`) when
//! the source or a shard could not be read.

use std::io::IsTerminal;
use std::time::Duration;

use reshard_engine::ops::observe::{
    current_status, lag_known, lag_unknown, unreadable, StatusOrigin,
};
use reshard_engine::runtime;
use reshard_engine::status::StatusSnapshot;

use super::check::table;
use super::status::{lag_cells, reverse_table};
use crate::output::{load_config, CmdResult, Failure};
use crate::LagArgs;

/// Runs `reshard lag`.
pub async fn run(args: LagArgs) -> CmdResult {
    let config = load_config(&args.config.config)?;
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--interval must be a positive number of seconds"
        )));
    }
    let tty = std::io::stdout().is_terminal();
    if !args.watch {
        let (snap, origin) = current_status(&config).await;
        print_lag(&snap, origin, &args, tty)?;
        return match unreadable(&snap, origin) {
            Some(what) => Err(Failure::failed(anyhow::anyhow!(
                "lag unknown: {what}; start the servers or fix the connection settings, then run reshard lag again"
            ))),
            None => Ok(()),
        };
    }
    // One listener for the whole watch: Ctrl-C while a refresh is being built (a slow or
    // unreachable server) ends the command at once instead of being lost.
    let mut signals = runtime::Signals::new();
    loop {
        tokio::select! {
            _ = signals.recv() => return Ok(()),
            (snap, origin) = current_status(&config) => print_lag(&snap, origin, &args, tty)?,
        }
        tokio::select! {
            _ = signals.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs_f64(args.interval)) => {}
        }
    }
}

/// One refresh of `reshard lag`, as JSON lines or as a table.
fn print_lag(s: &StatusSnapshot, origin: StatusOrigin, args: &LagArgs, tty: bool) -> CmdResult {
    if args.json {
        let json = serde_json::to_string(&lag_json(s, origin))
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode: {e}")))?;
        println!("{json}");
    } else {
        if args.watch && tty {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", render(s, origin));
        if args.watch && !tty {
            println!();
        }
    }
    Ok(())
}

fn lag_json(s: &StatusSnapshot, origin: StatusOrigin) -> serde_json::Value {
    let live = origin == StatusOrigin::Daemon;
    serde_json::json!({
        "source": if live { "daemon" } else { "offline" },
        "current_wal_lsn": s.source.current_wal_lsn,
        "source_error": s.source.last_error,
        "shards": s.shards.iter().map(|sh| serde_json::json!({
            "shard": sh.name,
            "state": sh.state.as_str(),
            "applied_lsn": sh.applied_lsn,
            "lag_bytes": lag_known(s, origin, sh).then_some(sh.lag_bytes),
            "lag_seconds": lag_known(s, origin, sh).then_some(sh.lag_seconds),
            "lag_error": lag_unknown(s, origin, sh),
            "latency_p50_ms": live.then_some(sh.latency_p50_ms),
            "latency_p99_ms": live.then_some(sh.latency_p99_ms),
            "last_error": sh.last_error,
        })).collect::<Vec<_>>(),
        "reverse": s.reverse.iter().map(|r| serde_json::json!({
            "shard": r.shard,
            "state": r.state,
            "stream": (!r.stream.is_empty()).then_some(&r.stream),
            "slot": r.slot,
            "applied_lsn": r.applied_lsn,
            "lag_bytes": r.lag_bytes,
            "lag_seconds": r.lag_seconds,
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn render(s: &StatusSnapshot, origin: StatusOrigin) -> String {
    let live = origin == StatusOrigin::Daemon;
    let mut rows = vec![[
        "SHARD",
        "STATE",
        "APPLIED LSN",
        "LAG BYTES",
        "LAG S",
        "P50 MS",
        "P99 MS",
    ]
    .map(String::from)];
    let ms = |v: f64| if live { format!("{v:.1}") } else { "-".into() };
    for sh in &s.shards {
        let [lag_b, lag_s] = lag_cells(s, origin, sh);
        rows.push([
            sh.name.clone(),
            sh.state.as_str().into(),
            sh.applied_lsn.to_string(),
            lag_b,
            lag_s,
            ms(sh.latency_p50_ms),
            ms(sh.latency_p99_ms),
        ]);
    }
    let mut out = format!(
        "source WAL {} ({})\n{}",
        s.source.current_wal_lsn,
        if live {
            "live"
        } else {
            "offline: daemon not running"
        },
        table(&rows)
    );
    if !live {
        if let Some(e) = &s.source.last_error {
            out.push_str(&format!("! source: {e}\n"));
        }
        for sh in &s.shards {
            if let Some(e) = &sh.last_error {
                out.push_str(&format!("! {}: {e}\n", sh.name));
            }
        }
    }
    if !s.reverse.is_empty() {
        out.push_str("\nreverse (shard -> source; LSNs are the shard's)\n");
        out.push_str(&reverse_table(s));
    }
    out
}
