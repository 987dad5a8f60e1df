//! `reshard run`.

use crate::output::{CmdResult, Failure};
use crate::RunArgs;

/// Runs `reshard run`.
pub async fn run(_args: RunArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard run is being built"
    )))
}
