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

use tokio_postgres::Client;

use crate::error::{class_of_pg, Classify, ErrorClass};
use crate::pg::conn::{connect_plain, error_text};
use crate::source::SourceError;

/// An endpoint of a command (the source or a shard) could not be reached, or a query on it
/// failed: the one definition the commands' errors ([`moves`], [`reverse`]) carry.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Could not connect.
    #[error("cannot connect to {endpoint}: {error}")]
    Connect {
        /// `source` or `shard <name>`.
        endpoint: String,
        /// Why.
        error: Box<SourceError>,
    },
    /// A query failed.
    #[error("{what} on {endpoint} failed: {}", error_text(error))]
    Query {
        /// `source` or `shard <name>`.
        endpoint: String,
        /// What was being done.
        what: String,
        /// Driver error.
        error: tokio_postgres::Error,
    },
}

impl EndpointError {
    /// `endpoint` could not be reached (or its URL not parsed).
    pub fn connect(endpoint: &str, error: SourceError) -> Self {
        EndpointError::Connect {
            endpoint: endpoint.to_owned(),
            error: Box::new(error),
        }
    }

    /// Names `endpoint` and `what` was being done in a failed query's error.
    pub fn query(endpoint: &str, what: &str) -> impl Fn(tokio_postgres::Error) -> Self {
        let endpoint = endpoint.to_owned();
        let what = what.to_owned();
        move |error| EndpointError::Query {
            endpoint: endpoint.clone(),
            what: what.clone(),
            error,
        }
    }
}

impl Classify for EndpointError {
    fn class(&self) -> ErrorClass {
        match self {
            EndpointError::Connect { error, .. } => error.class(),
            EndpointError::Query { error, .. } => class_of_pg(error),
        }
    }
}

/// A SQL connection to `url` ([`connect_plain`]), failing with `endpoint` (`source`,
/// `shard <name>`) named.
pub async fn connect(endpoint: &str, url: &str) -> Result<Client, EndpointError> {
    connect_plain(url)
        .await
        .map_err(|e| EndpointError::connect(endpoint, e))
}

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
