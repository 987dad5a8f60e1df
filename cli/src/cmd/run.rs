//! `reshard run`: the migration daemon.

use reshard_engine::runtime::{self, RunOptions};

use crate::output::{load_config, CmdResult, Failure};
use crate::RunArgs;

/// Runs the daemon until SIGTERM/SIGINT, `SHUTDOWN` on the admin console, or a fatal error.
/// A clean shutdown finishes or rolls back every open batch, confirms the final flush
/// position to the slot and exits 0.
pub async fn run(args: RunArgs) -> CmdResult {
    let cfg = load_config(&args.config.config)?;
    let start = runtime::start(
        cfg,
        RunOptions {
            skip_full_load: args.skip_full_load,
            start_retry: std::time::Duration::from_secs(args.start_retry_secs),
        },
    );
    // A signal while starting (or while waiting for a server to come back) ends the start.
    let running = tokio::select! {
        r = start => match r {
            Ok(running) => running,
            // The source's schema needs a decision (config or SQL): like a configuration error.
            Err(e @ runtime::RuntimeError::KeyOutsideIdentity(_)) => {
                return Err(Failure::usage(
                    anyhow::Error::from(e).context("reshard run refuses to start"),
                ))
            }
            Err(e) => return Err(Failure::from(anyhow::Error::from(e).context("reshard run could not start"))),
        },
        sig = runtime::wait_for_signal() => {
            tracing::info!(signal = sig, "shutting down before the start completed");
            return Ok(());
        }
    };
    let mut done = running.done;
    let result = tokio::select! {
        sig = runtime::wait_for_signal() => {
            tracing::info!(signal = sig, "shutting down");
            let _ = running.shutdown.send(true);
            done.await
        }
        r = &mut done => r,
    };
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
