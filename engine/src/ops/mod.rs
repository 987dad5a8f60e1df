//! The operator's commands, engine side: each is a function the CLI calls, built on the
//! [`crate::pg`] toolkit, the ground and the stages; nothing below (no stage, not the runtime)
//! imports them.
//!
//! - [`check`]: preflight (source settings, tables, keys, targets).
//! - [`verify`]: the shards against the source, per table (counts and ordered hashes).
//! - [`cutover`]: (fence,) wait, sync sequences, verify, SAFE.
//! - [`fence`]: refuse one shard's writes on the source or on the shard (triggers in `reshard`).
//! - [`observe`]: `status` and `lag` without a running daemon, and finding one.
//! - [`purge`]: reshard's objects removed from the shards.
//! - [`plan`]: one migration split into K groups that share nothing, and the proof that group
//!   configs are disjoint.
//! - [`reverse`]: the reverse direction set up at a fenced cutover, and `rollback`.
//! - [`grow`]: what growing a hash layout from N to M shards moves (`reshard plan --shards`).
//! - [`balance`]: the same for an account map: a balanced new map that moves few bytes.
//! - [`moves`]: accounts moved between two live shards (`reshard move`).
//! - [`rebalance`]: growing a hash layout from N to M shards as a series of hash-range moves
//!   (`reshard rebalance`).

pub mod balance;
pub mod check;
pub mod cutover;
pub mod fence;
pub mod grow;
pub mod moves;
pub mod observe;
pub mod plan;
pub mod purge;
pub mod rebalance;
pub mod reverse;
pub mod verify;

/// Test builds only: `RESHARD_CRASH_AT=<step>` aborts the process right after that step, as a
/// `kill -9` there would (the crash-and-rerun tests of rollback and move).
pub(crate) fn crash_point(step: &str) {
    #[cfg(feature = "test-utils")]
    if std::env::var("RESHARD_CRASH_AT").is_ok_and(|s| s == step) {
        eprintln!("RESHARD_CRASH_AT={step}: aborting");
        std::process::abort();
    }
    let _ = step;
}
