//! Resolving `-c reshard.toml` or `--source/--slot/--publication` into one source selection.

use anyhow::Context;
use reshard_engine::config::Config;
use reshard_engine::pg::catalog;
use reshard_engine::source::slot::{create_slot, CreatedSlot};
use reshard_engine::source::{ConnConfig, ReplicationClient, SnapshotAction};

use crate::output::{load_config, Failure};
use crate::SourceArgs;

/// The source, slot and publication a `slot`/`peek` command works on.
pub struct SourceSel {
    /// Parsed connection settings.
    pub conn: ConnConfig,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// The config file, when one was given.
    pub config: Option<Config>,
}

/// `--source` wins over the config's `[source] url`; `--slot`/`--publication` over the
/// config's; defaults are `reshard`.
pub fn resolve(a: &SourceArgs) -> Result<SourceSel, Failure> {
    let config = match &a.config {
        Some(p) => Some(load_config(p)?),
        None => None,
    };
    let url = match (&a.source, &config) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => c.source.url.clone(),
        (None, None) => {
            return Err(Failure::usage(anyhow::anyhow!(
                "no source given: pass -c reshard.toml or --source URL"
            )))
        }
    };
    let conn = ConnConfig::parse(&url)
        .map_err(Failure::usage)
        .map_err(|f| Failure {
            error: f.error.context("parsing the source connection string"),
            ..f
        })?;
    let slot = a
        .slot
        .clone()
        .or_else(|| config.as_ref().map(|c| c.source.slot.clone()))
        .unwrap_or_else(|| "reshard".into());
    let publication = a
        .publication
        .clone()
        .or_else(|| config.as_ref().map(|c| c.source.publication.clone()))
        .unwrap_or_else(|| "reshard".into());
    Ok(SourceSel {
        conn,
        slot,
        publication,
        config,
    })
}

impl SourceSel {
    /// An SQL connection to the selected source.
    pub async fn connect_sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        self.conn
            .connect_sql()
            .await
            .context("connecting to the source")
    }
}

/// Creates the selected slot (no exported snapshot) and the publication of the tables `reshard
/// run` would replicate (`slot create`, `peek --create`).
pub async fn create_selected_slot(
    sel: &SourceSel,
    sql: &tokio_postgres::Client,
    repl: &mut ReplicationClient,
) -> anyhow::Result<CreatedSlot> {
    let cfg = config_or_default(sel)?;
    let tables = catalog::discover(sql, &cfg)
        .await
        .context("listing the tables to publish")?;
    create_slot(
        sql,
        repl,
        &sel.publication,
        &tables,
        &sel.slot,
        SnapshotAction::NoExport,
    )
    .await
    .with_context(|| {
        format!(
            "creating publication {} and replication slot {}",
            sel.publication, sel.slot
        )
    })
}

/// A config for catalog discovery: the given one, or defaults around the source URL.
pub fn config_or_default(sel: &SourceSel) -> anyhow::Result<Config> {
    match &sel.config {
        Some(c) => Ok(c.clone()),
        None => {
            let text = format!(
                "[source]\nurl = {:?}\nslot = {:?}\npublication = {:?}\n[[shards]]\nname = \"peek\"\nurl = \"unused\"\n",
                "unused", sel.slot, sel.publication
            );
            Config::parse(&text, "(defaults)").context("building a default configuration")
        }
    }
}
