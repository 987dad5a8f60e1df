//! One module per command; [`dispatch`] maps the parsed command line to them.

use std::process::ExitCode;

use crate::output::finish;
use crate::Command;

mod check;
mod cutover;
mod demo;
mod fence;
mod lag;
mod moves;
mod peek;
mod plan;
mod quarantine;
mod rebalance;
mod rollback;
mod run;
mod slot;
mod source_args;
mod status;
mod verify;

/// Runs a command and maps its outcome to an exit code.
pub async fn dispatch(command: Command) -> ExitCode {
    let r = match command {
        Command::Run(a) => run::run(a).await,
        Command::Check(a) => check::run(a).await,
        Command::Plan(a) => plan::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Lag(a) => lag::run(a).await,
        Command::Move(a) => moves::run(a).await,
        Command::Rebalance(a) => rebalance::run(a).await,
        Command::Verify(a) => verify::run(a).await,
        Command::Cutover(a) => cutover::run(a).await,
        Command::Slot(a) => slot::run(a).await,
        Command::Peek(a) => peek::run(a).await,
        Command::Fence(a) => fence::run_fence(a).await,
        Command::Unfence(a) => fence::run_unfence(a).await,
        Command::Rollback(a) => rollback::run(a).await,
        Command::Quarantine(a) => quarantine::run(a).await,
        Command::Demo(a) => demo::run(a).await,
    };
    finish(r)
}
