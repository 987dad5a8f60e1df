//! Clean-up after a migration (`reshard slot drop --purge`).
//!
//! In: the config. Out: the publication dropped on the source and the `reshard` schema
//! (progress rows and anything else reshard created) dropped on every shard. The slot itself
//! is dropped by the slot command. Each step is idempotent (`IF EXISTS`); a shard that cannot
//! be reached is reported and the others are still cleaned.

use serde::Serialize;

use crate::config::Config;
use crate::pg::conn::{connect_plain, quote_ident};

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
    for s in &config.shards {
        steps.push(run(&s.name, &s.url, "DROP SCHEMA IF EXISTS reshard CASCADE").await);
    }
    steps
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
