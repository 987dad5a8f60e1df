//! Clean-up after a migration (`reshard slot drop --purge`).
//!
//! In: the config. Out: the publication dropped on the source and the `reshard` schema
//! (progress rows and anything else reshard created) dropped on every shard. The slot itself
//! is dropped by the slot command. Each step is idempotent (`IF EXISTS`); a shard that cannot
//! be reached is reported and the others are still cleaned.
//!
//! A group's config (`[group]`, `reshard plan --groups K`) shares the shards' `reshard` schema
//! with its peers, so it removes only what is its own: its progress rows (its slot) and its
//! tables' full-load records; the schema goes with the last group's purge.

use serde::Serialize;

use crate::config::{Config, TableMode};
use crate::pg::conn::{connect_plain, quote_ident, quote_literal};

/// One clean-up step.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeStep {
    /// `source` or the shard name.
    pub target: String,
    /// The SQL run.
    pub sql: String,
    /// `None` if it succeeded, else the error.
    pub error: Option<String>,
}

/// Drops the publication on the source and schema `reshard` on every shard.
pub async fn purge(config: &Config) -> Vec<PurgeStep> {
    let mut steps = Vec::new();
    let pub_sql = format!(
        "DROP PUBLICATION IF EXISTS {}",
        quote_ident(&config.source.publication)
    );
    steps.push(run("source", &config.source.url, &pub_sql).await);
    let shard_sql = match &config.group {
        None => "DROP SCHEMA IF EXISTS reshard CASCADE".to_owned(),
        Some(_) => group_purge_sql(config),
    };
    for s in &config.shards {
        steps.push(run(&s.name, &s.url, &shard_sql).await);
    }
    steps
}

/// A group's clean-up on a shard: its progress rows (keyed by its slot) and its tables'
/// full-load records (`fullload_chunks`, `watermark_chunks`: keyed by table, as the full load
/// writes them), then the `reshard` schema only when no other group's progress row is left.
fn group_purge_sql(config: &Config) -> String {
    let tables: Vec<String> = config
        .table_rules()
        .into_iter()
        .filter(|r| r.mode != TableMode::Skip)
        .map(|r| quote_literal(&r.source.to_string()))
        .collect();
    let tables = if tables.is_empty() {
        "NULL".to_owned()
    } else {
        tables.join(", ")
    };
    format!(
        "DO $purge$ BEGIN \
         IF to_regclass('reshard.progress') IS NOT NULL THEN \
           DELETE FROM reshard.progress WHERE slot = {slot}; END IF; \
         IF to_regclass('reshard.fullload_chunks') IS NOT NULL THEN \
           DELETE FROM reshard.fullload_chunks WHERE source_table IN ({tables}); END IF; \
         IF to_regclass('reshard.watermark_chunks') IS NOT NULL THEN \
           DELETE FROM reshard.watermark_chunks WHERE source_table IN ({tables}); END IF; \
         IF to_regclass('reshard.progress') IS NULL OR NOT EXISTS (SELECT FROM reshard.progress) THEN \
           DROP SCHEMA IF EXISTS reshard CASCADE; END IF; \
         END $purge$",
        slot = quote_literal(&config.source.slot)
    )
}

async fn run(target: &str, url: &str, sql: &str) -> PurgeStep {
    let error = match connect_plain(url).await {
        Err(e) => Some(format!("cannot connect: {e}")),
        Ok(c) => c
            .batch_execute(sql)
            .await
            .err()
            .map(|e| crate::pg::conn::error_text(&e)),
    };
    PurgeStep {
        target: target.to_owned(),
        sql: sql.to_owned(),
        error,
    }
}
