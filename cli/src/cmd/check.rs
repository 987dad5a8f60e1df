//! `reshard check`.

use crate::output::{CmdResult, Failure};
use crate::CheckArgs;

/// Runs `reshard check`.
pub async fn run(_args: CheckArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard check is being built"
    )))
}
