//! The physical ceiling of catch-up: reshard's own replication client reading one slot and
//! discarding everything.
//!
//! In: the source URL, a slot created before the backlog, a publication of every replicated
//! table, and how many row changes the backlog holds. Out: the time to receive them all. No
//! decoding beyond the message tag, no routing, no spill, no apply: what remains is the
//! walsender (decoding the WAL, the one-core ceiling of DESIGN.md) and the wire. The slot is
//! never confirmed (`set_flushed` is not called), so reading leaves it where it was.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reshard_engine::source::{
    ConnConfig, PgOutputOptions, ReplicationClient, SlotOptions, SnapshotAction,
};
use reshard_engine::Lsn;

/// Creates slot `slot` (pgoutput, no snapshot) on the database of `url`; returns its
/// consistent point.
pub async fn create_slot(url: &str, slot: &str) -> Result<Lsn> {
    let cfg = ConnConfig::parse(url).context("parsing the source connection string")?;
    let mut rc = ReplicationClient::connect(&cfg)
        .await
        .context("opening a replication connection to the source")?;
    let info = rc
        .create_slot(
            slot,
            SlotOptions {
                snapshot: SnapshotAction::NoExport,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating slot {slot}"))?;
    rc.close().await;
    Ok(info.consistent_point)
}

/// What one read of the backlog took.
#[derive(Debug, Clone, Copy)]
pub struct CeilingRun {
    /// Row changes (`I`, `U`, `D` messages) received.
    pub changes: u64,
    /// Transactions (`C` messages) received.
    pub txns: u64,
    /// From `START_REPLICATION` to the last expected change.
    pub elapsed: Duration,
}

/// Streams slot `slot` from `start` until `changes` row changes have arrived.
pub async fn read_backlog(
    url: &str,
    slot: &str,
    publication: &str,
    start: Lsn,
    changes: u64,
    timeout: Duration,
) -> Result<CeilingRun> {
    let cfg = ConnConfig::parse(url).context("parsing the source connection string")?;
    let t0 = Instant::now();
    let rc = ReplicationClient::connect(&cfg)
        .await
        .context("opening a replication connection to the source")?;
    let mut stream = rc
        .start_replication(
            slot,
            start,
            PgOutputOptions {
                publication_names: vec![publication.to_owned()],
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("START_REPLICATION on slot {slot}"))?;
    let mut seen = CeilingRun {
        changes: 0,
        txns: 0,
        elapsed: Duration::ZERO,
    };
    let deadline = t0 + timeout;
    while seen.changes < changes {
        let left = deadline.saturating_duration_since(Instant::now());
        let x = match tokio::time::timeout(left, stream.next()).await {
            Ok(r) => r.context("reading the replication stream")?,
            Err(_) => bail!(
                "ceiling: only {} of {changes} changes arrived within {timeout:?}",
                seen.changes
            ),
        };
        let Some(x) = x else {
            bail!(
                "ceiling: the server ended the stream after {} changes",
                seen.changes
            );
        };
        match x.data.first() {
            Some(b'I' | b'U' | b'D') => seen.changes += 1,
            Some(b'C') => seen.txns += 1,
            _ => {}
        }
    }
    seen.elapsed = t0.elapsed();
    // Not confirmed: the stream's flush position was never set.
    let _ = stream.shutdown().await;
    Ok(seen)
}
