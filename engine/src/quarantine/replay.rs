//! `reshard quarantine replay`: route quarantined changes with the map as it is now and apply
//! them to their shards, in source order, with the daemon stopped.
//!
//! In: the quarantine files, a [`Router`] built from the current config and account map, one
//! connection per shard. Out: the changes that route now applied (one transaction per shard),
//! and the files rewritten to what stays.
//!
//! Order: a row's changes replay as a prefix in commit order. The first of a row's changes
//! that still cannot be routed keeps it and every later change of that row here (so nothing
//! of the row is applied out of order). A change is only applied to a shard whose progress has
//! reached the change's commit LSN: every change of the row that went through the stream
//! before it is then applied, and none after it went through the stream (the ingest held
//! them), so replay never overwrites newer data. Changes before a TRUNCATE marker are obsolete
//! and removed. Re-running a replay after a failure re-applies idempotently for tables with a
//! primary key (inserts are upserts); a table without one could get a duplicate row.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tokio_postgres::Client;

use super::{identities, read_file, record_table, rewrite_file, table_files, Record};
use crate::apply::batch::change_sql;
use crate::apply::schema::{load_target_table, source_name, TargetTable};
use crate::apply::ApplyError;
use crate::event::{Change, ShardId, TableId};
use crate::lsn::Lsn;
use crate::pg::progress::{read_progress, ProgressError};
use crate::route::Router;

/// One shard, for replay.
pub struct ReplayShard {
    /// Its name.
    pub name: String,
    /// A connection.
    pub client: Client,
}

/// What replay needs besides the quarantine.
pub struct ReplayTarget {
    /// The shards, in router order.
    pub shards: Vec<ReplayShard>,
    /// Source table → target table names that differ.
    pub table_map: HashMap<crate::pg::sql::TableName, crate::pg::sql::TableName>,
    /// The source's system id and the slot (the shards' progress rows).
    pub system_id: String,
    /// The slot name.
    pub slot: String,
}

/// The outcome for one table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TableReplay {
    /// `schema.table`.
    pub table: String,
    /// Changes applied to shards.
    pub replayed: u64,
    /// Changes removed as obsolete (before a TRUNCATE).
    pub obsolete: u64,
    /// Changes that stay quarantined.
    pub remaining: u64,
    /// Why changes stay (one line per distinct reason).
    pub why_remaining: Vec<String>,
}

/// Why replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading or rewriting the quarantine.
    #[error(transparent)]
    Quarantine(#[from] super::QuarantineError),
    /// A shard's progress row could not be read.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// A shard refused a change (nothing of the quarantine was removed; run replay again
    /// after fixing it).
    #[error(
        "{0}; the quarantine is unchanged: fix this and run `reshard quarantine replay` again"
    )]
    Apply(#[from] ApplyError),
}

/// Replays the quarantine under `spill_dir` (only `table`, if given).
pub async fn replay(
    spill_dir: &Path,
    router: &mut Router,
    target: &ReplayTarget,
    table: Option<&str>,
) -> Result<Vec<TableReplay>, ReplayError> {
    let mut progress: HashMap<usize, Lsn> = HashMap::new();
    for (i, s) in target.shards.iter().enumerate() {
        let p = read_progress(&s.client, &target.slot, &s.name, Some(&target.system_id)).await?;
        progress.insert(i, p.map(|p| p.commit_lsn).unwrap_or(Lsn::ZERO));
    }
    let mut out = Vec::new();
    for path in table_files(&super::dir_of(spill_dir))? {
        let (records, _) = read_file(&path)?;
        let Some(first) = records.first() else {
            continue;
        };
        let name = record_table(first);
        if table.is_some_and(|t| !same_table(t, &name)) {
            continue;
        }
        let mut report = TableReplay {
            table: name.clone(),
            ..TableReplay::default()
        };
        let start = records
            .iter()
            .rposition(Record::is_truncate)
            .map_or(0, |i| i + 1);
        report.obsolete = records[..start].iter().filter(|r| !r.is_truncate()).count() as u64;
        let mut keep: Vec<Record> = Vec::new();
        let mut blocked: HashSet<(TableId, Vec<u8>)> = HashSet::new();
        let mut why: Vec<String> = Vec::new();
        let mut plan: Vec<(ShardId, Change, Lsn)> = Vec::new();
        for r in &records[start..] {
            let Some((id, before, after)) = identities(&r.change) else {
                continue;
            };
            let is_blocked = blocked.contains(&(id, before.clone()));
            let mut stay = |reason: String, keep: &mut Vec<Record>| {
                blocked.insert((id, before.clone()));
                if let Some(a) = &after {
                    blocked.insert((id, a.clone()));
                }
                if !why.contains(&reason) {
                    why.push(reason);
                }
                keep.push(r.clone());
            };
            if is_blocked {
                stay(
                    "an earlier change of the same row still cannot be replayed".into(),
                    &mut keep,
                );
                continue;
            }
            let mut routed = Vec::new();
            match router.route_into_or_return(r.change.clone(), &mut routed) {
                Err(u) => stay(u.error.to_string(), &mut keep),
                Ok(()) => {
                    let behind = routed.iter().find_map(|(s, _)| {
                        let p = progress.get(&s.index()).copied().unwrap_or(Lsn::ZERO);
                        (p < r.commit_lsn).then_some((*s, p))
                    });
                    match behind {
                        Some((s, p)) => stay(
                            format!(
                                "shard {} has applied up to {p}, before this change ({}): run \
                                 reshard until it catches up, stop it, then replay again",
                                router.shard_name(s),
                                r.commit_lsn
                            ),
                            &mut keep,
                        ),
                        None => {
                            report.replayed += 1;
                            plan.extend(routed.into_iter().map(|(s, c)| (s, c, r.commit_lsn)));
                        }
                    }
                }
            }
        }
        apply(target, &plan).await?;
        report.remaining = keep.len() as u64;
        report.why_remaining = why;
        rewrite_file(&path, &keep)?;
        out.push(report);
    }
    Ok(out)
}

/// Applies `plan` shard by shard, each in one transaction, in order.
async fn apply(target: &ReplayTarget, plan: &[(ShardId, Change, Lsn)]) -> Result<(), ApplyError> {
    let mut by_shard: HashMap<usize, Vec<(&Change, Lsn)>> = HashMap::new();
    for (s, c, l) in plan {
        by_shard.entry(s.index()).or_default().push((c, *l));
    }
    for (i, changes) in by_shard {
        let Some(shard) = target.shards.get(i) else {
            continue;
        };
        let name = shard.name.as_str();
        let pg = |what: &str| {
            let what = what.to_owned();
            move |e: tokio_postgres::Error| ApplyError::pg(name, what, &e)
        };
        let mut tables: HashMap<TableId, TargetTable> = HashMap::new();
        shard
            .client
            .batch_execute("BEGIN")
            .await
            .map_err(pg("replaying the quarantine"))?;
        for (c, commit_lsn) in changes {
            let Some(rel) = c.relation() else { continue };
            let t = match tables.entry(rel.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let src = source_name(rel);
                    let tname = target.table_map.get(&src).cloned().unwrap_or(src);
                    let staging = "reshard_replay_stage".to_owned();
                    e.insert(load_target_table(&shard.client, name, rel, &tname, staging).await?)
                }
            };
            let sql = change_sql(t, c).map_err(|e| ApplyError::Encode {
                shard: name.to_owned(),
                table: t.target.clone(),
                commit_lsn,
                source: e,
            })?;
            if let Some(sql) = sql {
                shard.client.batch_execute(&sql).await.map_err(pg(&format!(
                    "replaying a quarantined {} on {}",
                    c.kind(),
                    t.target
                )))?;
            }
        }
        shard
            .client
            .batch_execute("COMMIT")
            .await
            .map_err(pg("committing the replay"))?;
    }
    Ok(())
}

/// Whether the user's `table` (`notes`, `public.notes`, `"public"."notes"`) names `qualified`.
pub fn same_table(table: &str, qualified: &str) -> bool {
    let norm = |s: &str| {
        let s = s.replace('"', "");
        if s.contains('.') {
            s
        } else {
            format!("public.{s}")
        }
    };
    norm(table) == norm(qualified)
}
