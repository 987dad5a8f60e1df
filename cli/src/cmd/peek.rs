//! `reshard peek`.

use crate::output::{CmdResult, Failure};
use crate::PeekArgs;

/// Runs `reshard peek`.
pub async fn run(_args: PeekArgs) -> CmdResult {
    Err(Failure::failed(anyhow::anyhow!(
        "reshard peek is being built"
    )))
}
