//! `reshard verify`.

use crate::output::{CmdResult, Failure};
use crate::VerifyArgs;

/// Runs `reshard verify`.
pub async fn run(_args: VerifyArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard verify is being built"
    )))
}
