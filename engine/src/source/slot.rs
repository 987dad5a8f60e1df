//! Creating reshard's replication slot, the one way `reshard run`, `reshard slot create` and
//! `reshard peek --create` all do it.
//!
//! In: an SQL connection and a replication connection to the source, the publication's name
//! and the tables it must publish ([`SourceTable`], from [`crate::pg::catalog`]), the slot's
//! name and what to do with its snapshot. Out: the new slot ([`SlotInfo`]: its consistent
//! point and, with [`SnapshotAction::Export`], the exported snapshot) and whether the
//! publication had to be created.
//!
//! Invariant: the publication exists and publishes every table before the slot is created, so
//! pgoutput decodes every change from the slot's consistent point on with it (a slot decodes
//! with the catalog as of each change: a publication created after the slot is unknown to the
//! changes before it). See
//! <https://www.postgresql.org/docs/current/logical-replication-publication.html>.

use tokio_postgres::Client;

use super::{ReplicationClient, SlotInfo, SlotOptions, SnapshotAction, SourceError};
use crate::pg::catalog::{ensure_publication, CatalogError, SourceTable};

/// Why the publication or the slot could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The publication is missing a table, or could not be read or created.
    #[error(transparent)]
    Publication(#[from] CatalogError),
    /// `CREATE_REPLICATION_SLOT` failed (it exists, `max_replication_slots`, privileges).
    #[error(transparent)]
    Slot(#[from] SourceError),
}

/// A slot just created, and its publication.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The slot (`pgoutput`): its consistent point and exported snapshot.
    pub info: SlotInfo,
    /// Whether the publication was created now (`false`: it existed and publishes the tables).
    pub publication_created: bool,
}

/// Makes sure `publication` publishes `tables` (creating it if missing), then creates the
/// logical slot `slot` with `pgoutput` on `repl`. With [`SnapshotAction::Export`] the snapshot
/// stays importable only until the next command on `repl`.
pub async fn create_slot(
    sql: &Client,
    repl: &mut ReplicationClient,
    publication: &str,
    tables: &[SourceTable],
    slot: &str,
    snapshot: SnapshotAction,
) -> Result<CreatedSlot, SlotError> {
    let publication_created = ensure_publication(sql, publication, tables).await?;
    if publication_created {
        tracing::info!(
            publication,
            tables = tables.len(),
            "created the publication"
        );
    }
    let info = repl
        .create_slot(
            slot,
            SlotOptions {
                snapshot,
                ..Default::default()
            },
        )
        .await?;
    tracing::info!(slot = %info.name, consistent_point = %info.consistent_point, publication, exported_snapshot = info.snapshot_name.is_some(), "created the slot");
    Ok(CreatedSlot {
        info,
        publication_created,
    })
}
