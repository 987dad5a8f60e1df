//! `reshard cutover`.

use crate::output::{CmdResult, Failure};
use crate::CutoverArgs;

/// Runs `reshard cutover`.
pub async fn run(_args: CutoverArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard cutover is being built"
    )))
}
