//! `reshard lag`.

use crate::output::{CmdResult, Failure};
use crate::LagArgs;

/// Runs `reshard lag`.
pub async fn run(_args: LagArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard lag is being built"
    )))
}
