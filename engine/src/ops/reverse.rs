//! The reverse direction, operator side: [`begin`], at a fenced cutover: the slot and the
//! publication on the shard that carry its writes back to the source, recorded in
//! `reshard.reverse` on the source ([`crate::pg::reverse`]). The daemon runs the stream itself
//! ([`crate::runtime::reverse`]).

use tokio_postgres::Client;

use crate::config::{Config, TableMode};
use crate::error::{Classify, ErrorClass};
use crate::pg::conn::connect_plain;
use crate::pg::progress::source_system_id;
use crate::pg::reverse::{self as record, ReverseRow, ReverseState, ReverseTableError};

/// The reverse direction could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReverseOpError {
    /// `--shard` names no configured shard.
    #[error("unknown shard {name:?}; the config's shards are {known:?}")]
    UnknownShard {
        /// Name given.
        name: String,
        /// Configured names.
        known: Vec<String>,
    },
    /// Could not connect.
    #[error("cannot connect to {endpoint}: {error}")]
    Connect {
        /// `source` or `shard <name>`.
        endpoint: String,
        /// Why.
        error: Box<crate::source::SourceError>,
    },
    /// `reshard.reverse`.
    #[error(transparent)]
    Table(#[from] ReverseTableError),
    /// The replicated tables could not be resolved.
    #[error(transparent)]
    Tables(crate::pg::catalog::CatalogError),
    /// The shard's `system_identifier` cannot be read.
    #[error("cannot read the system_identifier of shard {shard} (pg_control_system()); reshard needs it to key the reverse stream's progress: grant pg_read_all_settings or connect as a superuser")]
    NoSystemId {
        /// The shard.
        shard: String,
    },
}

impl Classify for ReverseOpError {
    fn class(&self) -> ErrorClass {
        match self {
            ReverseOpError::Connect { error, .. } => error.class(),
            ReverseOpError::Table(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

async fn connect(endpoint: &str, url: &str) -> Result<Client, ReverseOpError> {
    connect_plain(url)
        .await
        .map_err(|error| ReverseOpError::Connect {
            endpoint: endpoint.to_owned(),
            error: Box::new(error),
        })
}

fn shard_url<'a>(config: &'a Config, shard: &str) -> Result<&'a str, ReverseOpError> {
    config
        .shards
        .iter()
        .find(|s| s.name == shard)
        .map(|s| s.url.as_str())
        .ok_or_else(|| ReverseOpError::UnknownShard {
            name: shard.to_owned(),
            known: config.shard_names(),
        })
}

/// At a fenced cutover of `shard`, once it holds the source's latest write and before the
/// application writes there: the publication (S's share of the sharded tables, no TRUNCATE)
/// and the logical slot on the shard, recorded as `streaming` in `reshard.reverse` on the
/// source. The running daemon starts streaming it within a second. Idempotent: a rerun after
/// a crash reuses what exists; a shard already streaming back is left as it is.
pub async fn begin(config: &Config, shard: &str) -> Result<ReverseRow, ReverseOpError> {
    let url = shard_url(config, shard)?;
    let src = connect("source", &config.source.url).await?;
    let sh = connect(&format!("shard {shard}"), url).await?;
    record::ensure_table(&src).await?;
    let existing = record::read(&src, shard).await?;
    let epoch = match &existing {
        Some(r) if r.state.streams() => return Ok(r.clone()),
        Some(r) if r.state == ReverseState::Starting => r.epoch,
        Some(r) => r.epoch.saturating_add(1),
        None => 1,
    };
    let shard_system_id =
        source_system_id(&sh)
            .await
            .ok_or_else(|| ReverseOpError::NoSystemId {
                shard: shard.to_owned(),
            })?;
    let mut row = ReverseRow {
        shard: shard.to_owned(),
        epoch,
        slot: record::slot_name(&config.source.slot, shard, epoch),
        publication: record::publication_name(&config.source.publication),
        shard_system_id,
        start_lsn: None,
        state: ReverseState::Starting,
        drain_lsn: None,
    };
    // Recorded before anything exists on the shard, so a crash leaves a row a rerun resumes.
    record::write(&src, &row).await?;
    let targets: Vec<String> = crate::pg::catalog::discover(&src, config)
        .await
        .map_err(ReverseOpError::Tables)?
        .into_iter()
        .filter(|t| t.rule.mode == TableMode::Sharded)
        .map(|t| t.rule.target)
        .collect();
    row.start_lsn = Some(record::create_on_shard(&sh, &row, &targets).await?);
    row.state = ReverseState::Streaming;
    record::write(&src, &row).await?;
    tracing::info!(shard, slot = %row.slot, start_lsn = ?row.start_lsn, "reverse replication set up: the shard's writes from here on stream back to the source");
    Ok(row)
}
