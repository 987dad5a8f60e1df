//! `reshard status`.

use crate::output::{CmdResult, Failure};
use crate::StatusArgs;

/// Runs `reshard status`.
pub async fn run(_args: StatusArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard status is being built"
    )))
}
