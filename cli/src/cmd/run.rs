//! `reshard run`: the migration daemon.

use std::time::{Duration, Instant};

use reshard_engine::config::Config;
use reshard_engine::error::{Classify, ErrorClass};
use reshard_engine::ops::plan::peer_overlaps;
use reshard_engine::pg::conn::connect_plain;
use reshard_engine::runtime::{self, RunOptions, RunSummary, RuntimeError};
use reshard_engine::source::SourceError;
use reshard_engine::spill::SpillError;

use crate::output::{load_config, CmdResult, Failure};
use crate::RunArgs;

/// Runs the daemon until SIGTERM/SIGINT, `SHUTDOWN` on the admin console, or a fatal error.
/// A clean shutdown finishes or rolls back every open batch, confirms the final flush
/// position to the slot and exits 0.
pub async fn run(args: RunArgs) -> CmdResult {
    // Listening from here on: a signal between two waits below is kept, not lost.
    let mut signals = runtime::Signals::new();
    let cfg = load_config(&args.config.config)?;
    // A spill directory that cannot be created or written is a mistake in the config: said at
    // once (exit 2), not retried for `--start-retry-secs` as if a server were restarting.
    reshard_engine::spill::probe_dir(&cfg.spill.dir, true).map_err(|e| {
        Failure::usage(anyhow::Error::from(e).context("reshard run refuses to start"))
    })?;
    if cfg.group.is_some() {
        refuse_overlapping_peers(&cfg, &args.config.config).await?;
    }
    let retry_initial = Duration::from_millis(cfg.apply.retry_initial_ms.max(1));
    let retry_max = Duration::from_millis(cfg.apply.retry_max_ms.max(1));
    let mut backoff = retry_initial;
    loop {
        let start = runtime::start(
            cfg.clone(),
            RunOptions {
                skip_full_load: args.skip_full_load,
                start_retry: Duration::from_secs(args.start_retry_secs),
            },
        );
        // A signal while starting (or while waiting for a server to come back) ends the start.
        let running = tokio::select! {
            r = start => r.map_err(start_failure)?,
            sig = signals.recv() => {
                tracing::info!(signal = sig, "shutting down before the start completed");
                return Ok(());
            }
        };
        let started = Instant::now();
        let mut done = running.done;
        let result = tokio::select! {
            sig = signals.recv() => {
                tracing::info!(signal = sig, "shutting down");
                running.shutdown.shutdown();
                return finish(done.await);
            }
            r = &mut done => r,
        };
        match result {
            // A transient failure after the start (a shard restarting under the full load, a
            // connection cut): every stage has stopped and flushed; start again as a restart
            // of the process would, after a backoff.
            Ok(Err(e)) if e.class() == ErrorClass::Transient => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = retry_initial;
                }
                tracing::warn!(
                    error = %e,
                    restart_in_ms = backoff.as_millis() as u64,
                    "reshard run stopped after a transient failure; starting again"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    sig = signals.recv() => {
                        tracing::info!(signal = sig, "shutting down");
                        return Ok(());
                    }
                }
                backoff = (backoff * 2).min(retry_max);
            }
            r => return finish(r),
        }
    }
}

/// The exit of a daemon run that is not started again.
fn finish(result: Result<Result<RunSummary, RuntimeError>, tokio::task::JoinError>) -> CmdResult {
    match result {
        Ok(Ok(summary)) => {
            tracing::info!(confirmed_flush_lsn = %summary.confirmed_flush_lsn, "clean shutdown");
            Ok(())
        }
        Ok(Err(e)) => Err(Failure::failed(
            anyhow::Error::from(e).context("reshard run stopped"),
        )),
        Err(e) => Err(Failure::failed(anyhow::anyhow!("reshard run crashed: {e}"))),
    }
}

/// Why the start failed, as an exit code: a source schema or setup that needs a decision
/// (config or SQL), a shard url its server refuses, a spill directory of another migration and
/// an admin console configuration that is refused are like configuration errors (exit 2);
/// anything else could not complete (exit 3).
fn start_failure(e: RuntimeError) -> Failure {
    match e {
        e @ (RuntimeError::KeyOutsideIdentity(_)
        | RuntimeError::NoRowIdentity(_)
        | RuntimeError::PartitionedOnPg12(_)) => {
            Failure::usage(anyhow::Error::from(e).context("reshard run refuses to start"))
        }
        // No retry fixes these: the source's wal_level, a [spill] dir holding another
        // migration's log.
        e @ (RuntimeError::Source(SourceError::WalLevel { .. })
        | RuntimeError::Spill(SpillError::IdentityMismatch { .. })) => {
            Failure::usage(anyhow::Error::from(e).context("reshard run refuses to start"))
        }
        RuntimeError::Source(e) if e.is_refused() => Failure::usage(
            anyhow::Error::from(RuntimeError::Source(e)).context(
                "reshard run refuses to start: the source's server refused [source] url; fix it (or RESHARD_SOURCE_URL), then run again",
            ),
        ),
        RuntimeError::Shards(e) if e.is_mistake() => {
            Failure::usage(anyhow::Error::from(e).context("reshard run refuses to start"))
        }
        e @ RuntimeError::Admin(_) => {
            Failure::usage(anyhow::Error::from(e).context("reshard run could not start"))
        }
        e => Failure::from(anyhow::Error::from(e).context("reshard run could not start")),
    }
}

/// A group's config (`[group]`, see `reshard plan`) must share no table, slot, publication or
/// spill directory with its peers: the proof `check` runs, refused here (exit 2) before anything
/// is created on the source or the shards.
async fn refuse_overlapping_peers(cfg: &Config, path: &std::path::Path) -> Result<(), Failure> {
    let file = path.display().to_string();
    let client = connect_plain(&cfg.source.url).await.map_err(|e| {
        Failure::failed(anyhow::anyhow!(
            "cannot connect to the source to prove {file} disjoint from its [group] peers: {e}"
        ))
    })?;
    let found = peer_overlaps(&client, cfg, &file)
        .await
        .map_err(|e| Failure::usage(anyhow::Error::from(e).context(file.clone())))?;
    let fatal: Vec<String> = found
        .into_iter()
        .filter(|o| o.fatal)
        .map(|o| o.detail)
        .collect();
    if fatal.is_empty() {
        return Ok(());
    }
    Err(Failure::usage(anyhow::anyhow!(
        "{file} overlaps its [group] peers, refusing to start (`reshard check -c {file}` shows the whole report):\n  {}",
        fatal.join("\n  ")
    )))
}
