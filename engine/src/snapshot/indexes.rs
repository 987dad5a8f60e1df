//! Deferred secondary indexes (`defer_indexes = true`): dropped on the targets before the load,
//! rebuilt after it, because building an index once over loaded rows is much cheaper than
//! maintaining it row by row (<https://www.postgresql.org/docs/current/populate.html#POPULATE-RM-INDEXES>).
//!
//! In: the target tables about to be loaded. Out: the same index definitions afterwards.
//!
//! Invariant: an index is never lost. Its exact `pg_get_indexdef` is recorded in
//! `reshard.deferred_indexes` in the same shard transaction that drops it, and each rebuild
//! creates the index and deletes its record in one transaction. A crashed load leaves the
//! records; the next run (with or without `defer_indexes`) rebuilds them. Primary keys and
//! indexes backing constraints (unique, exclusion, referenced by foreign keys) stay.

use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::catalog::{connect, shard_err, Plan};
use super::error::SnapshotError;
use super::progress::FullLoadProgress;
use super::ShardTarget;

const SECONDARY_INDEXES_SQL: &str = "\
SELECT format('%I.%I', n.nspname, ic.relname), pg_get_indexdef(i.indexrelid), ic.relkind::text
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
WHERE i.indrelid = $1::text::regclass
  AND NOT i.indisprimary
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
ORDER BY 1";

/// The statement that recreates an index from its recorded definition. A partitioned index's
/// definition reads `ON ONLY parent`, which would build it on the parent alone; without `ONLY`
/// it is built on every partition too.
pub(crate) fn rebuild_statement(indexdef: &str, partitioned: bool) -> String {
    if partitioned {
        indexdef.replacen(" ON ONLY ", " ON ", 1)
    } else {
        indexdef.to_owned()
    }
}

/// Records and drops the secondary indexes of the tables about to be loaded, on every shard.
pub(crate) async fn defer(
    shards: &[ShardTarget],
    plan: &Plan,
    to_copy: &[usize],
) -> Result<usize, SnapshotError> {
    let mut dropped = 0;
    for shard in shards {
        let mut client = connect(&shard.name, &shard.connect).await?;
        let tx = client
            .transaction()
            .await
            .map_err(shard_err(&shard.name, "deferring indexes".into()))?;
        for t in to_copy.iter().filter_map(|&i| plan.tables.get(i)) {
            let ctx = || format!("deferring the indexes of {}", t.target_display);
            let rows = tx
                .query(SECONDARY_INDEXES_SQL, &[&t.target_display])
                .await
                .map_err(shard_err(&shard.name, ctx()))?;
            for r in rows {
                let get = || -> Result<(String, String, String), tokio_postgres::Error> {
                    Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
                };
                let (name, def, kind) = get().map_err(shard_err(&shard.name, ctx()))?;
                let def = rebuild_statement(&def, kind == "I");
                tx.execute(
                    "INSERT INTO reshard.deferred_indexes (target_table, index_name, indexdef)
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&t.target_display, &name, &def],
                )
                .await
                .map_err(shard_err(&shard.name, ctx()))?;
                tx.batch_execute(&format!("DROP INDEX {name}"))
                    .await
                    .map_err(shard_err(&shard.name, ctx()))?;
                tracing::info!(shard = %shard.name, table = %t.target_display, index = %name,
                    "secondary index dropped for the load; it is rebuilt afterwards");
                dropped += 1;
            }
        }
        tx.commit()
            .await
            .map_err(shard_err(&shard.name, "deferring indexes".into()))?;
    }
    Ok(dropped)
}

/// Rebuilds every recorded index on every shard, up to `parallel` at once across shards, and
/// deletes each record with its rebuild. Returns how many were rebuilt.
pub(crate) async fn rebuild(
    shards: &[ShardTarget],
    parallel: usize,
    progress: &Arc<watch::Sender<FullLoadProgress>>,
) -> Result<usize, SnapshotError> {
    let mut pending = Vec::new();
    for shard in shards {
        let client = connect(&shard.name, &shard.connect).await?;
        let rows = client
            .query(
                "SELECT target_table, index_name, indexdef FROM reshard.deferred_indexes
                 ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(shard_err(
                &shard.name,
                "reading reshard.deferred_indexes".into(),
            ))?;
        for r in rows {
            let get = || -> Result<(String, String, String), tokio_postgres::Error> {
                Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
            };
            let rec = get().map_err(shard_err(
                &shard.name,
                "reading reshard.deferred_indexes".into(),
            ))?;
            pending.push((shard.clone(), rec));
        }
    }
    let total = pending.len();
    progress.send_modify(|p| p.indexes_pending = total);
    let slots = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for (shard, (table, name, def)) in pending {
        let slots = slots.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let _permit = slots.acquire_owned().await;
            let ctx = || format!("rebuilding index {name} on {table} ({def})");
            let mut client = connect(&shard.name, &shard.connect).await?;
            let tx = client
                .transaction()
                .await
                .map_err(shard_err(&shard.name, ctx()))?;
            let exists: bool = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(shard_err(&shard.name, ctx()))?;
            if !exists {
                tx.batch_execute(&def)
                    .await
                    .map_err(shard_err(&shard.name, ctx()))?;
            }
            tx.execute(
                "DELETE FROM reshard.deferred_indexes WHERE target_table = $1 AND index_name = $2",
                &[&table, &name],
            )
            .await
            .map_err(shard_err(&shard.name, ctx()))?;
            tx.commit().await.map_err(shard_err(&shard.name, ctx()))?;
            tracing::info!(shard = %shard.name, table = %table, index = %name, "index rebuilt");
            progress.send_modify(|p| p.indexes_pending = p.indexes_pending.saturating_sub(1));
            Ok::<(), SnapshotError>(())
        });
    }
    while let Some(res) = set.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                return Err(SnapshotError::Task {
                    what: "index rebuild".into(),
                    message: join.to_string(),
                })
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioned_index_definitions_lose_only() {
        let def = "CREATE INDEX e_idx ON ONLY public.events USING btree (created)";
        assert_eq!(
            rebuild_statement(def, true),
            "CREATE INDEX e_idx ON public.events USING btree (created)"
        );
        assert_eq!(rebuild_statement(def, false), def);
    }
}
