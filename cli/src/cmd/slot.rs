//! `reshard slot`.

use crate::output::{CmdResult, Failure};
use crate::SlotArgs;

/// Runs `reshard slot`.
pub async fn run(_args: SlotArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard slot is being built"
    )))
}
