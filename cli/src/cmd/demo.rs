//! `reshard demo`.

use crate::output::{CmdResult, Failure};
use crate::DemoArgs;

/// Runs `reshard demo`.
pub async fn run(_args: DemoArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard demo is being built"
    )))
}
