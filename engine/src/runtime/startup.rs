//! The start-up proof: before anything streams, the spill log, the slot and the shards'
//! progress rows must belong to one migration, and the log must hold every transaction some
//! shard still needs that the slot will not send again.
//!
//! In: what the slot says ([`SlotState`]), what the spill directory says ([`LogState`]: its
//! migration id, the LSN it starts at, its durable LSN) and, per shard, its progress row and
//! the earliest snapshot of a table an earlier full load finished ([`ShardState`]). Out: a
//! [`Plan`] (the migration id to record, where the log starts) or a [`StartupError`] naming
//! the shard, the missing LSN range, the spill directory and the ways out.
//!
//! Invariant (DESIGN.md "Local state is proven, not assumed"): a shard is resumed only when
//! every transaction it needs is either in the local log or will be sent by the slot. The slot
//! sends the transactions whose commit record starts at or after `max(durable, confirmed)`;
//! the log holds those from its start LSN up to its durable LSN. A shard needs everything
//! after its progress (or, before its first applied transaction, everything from the oldest
//! snapshot its copied tables were taken at). Anything else is a refusal, never a skip.
//! Pure logic: the runtime gathers the inputs.

use std::path::PathBuf;

use crate::lsn::Lsn;

/// The replication slot as the source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// `pg_replication_slots` has no such slot.
    Missing,
    /// The slot exists; the source sends only transactions committed at or after this.
    Exists {
        /// `confirmed_flush_lsn`.
        confirmed_flush_lsn: Lsn,
    },
}

/// What the spill directory says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// The spill directory (for messages).
    pub dir: PathBuf,
    /// The migration the directory belongs to (`None`: fresh, or written by an older version).
    pub migration_id: Option<String>,
    /// The log holds every transaction with commit LSN at or after this (up to `durable_lsn`);
    /// `None`: not recorded yet.
    pub start_lsn: Option<Lsn>,
    /// End of the last durable transaction (`0/0`: nothing was ever made durable).
    pub durable_lsn: Lsn,
}

/// One shard as its target reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    /// Shard name.
    pub name: String,
    /// Its progress row for this slot: every source commit at or below `commit_lsn` is on the
    /// shard. `None` without a row.
    pub progress: Option<Lsn>,
    /// The migration that wrote the progress row (`None`: no row, or an older version's).
    pub migration_id: Option<String>,
    /// Whether an earlier full load recorded chunks on the shards.
    pub has_load_records: bool,
    /// Other slots with progress rows on the shard: the migrations its records may belong to.
    pub other_slots: Vec<String>,
    /// The earliest snapshot LSN of a table an earlier full load finished: its changes from
    /// there on are needed.
    pub oldest_copy_lsn: Option<Lsn>,
}

impl ShardState {
    /// The progress this shard resumes from: it needs every commit after this, if any.
    fn needs_after(&self) -> Option<Lsn> {
        match self.progress {
            Some(p) if !p.is_zero() => Some(p),
            _ => self.oldest_copy_lsn.map(Lsn::covering),
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No slot: create it, and start a new migration with this id; the log starts at the
    /// slot's consistent point.
    Create {
        /// The new migration's id.
        migration_id: String,
    },
    /// Resume from the existing slot.
    Resume {
        /// The migration's id (to record in the log if it lacks one).
        migration_id: String,
        /// Where the log starts (to record if it was not recorded).
        log_start: Lsn,
    },
}

impl Plan {
    /// The migration id.
    pub fn migration_id(&self) -> &str {
        match self {
            Plan::Create { migration_id } | Plan::Resume { migration_id, .. } => migration_id,
        }
    }
}

/// Why the engine refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// The slot is gone but the spill log holds data for it.
    #[error("the spill directory {dir} holds data up to {durable} from an earlier slot {slot}, but that slot no longer exists on the source: the shards cannot be resumed from it. Start over: `reshard slot drop -c <config> --purge` (drops the `reshard` schema on every shard), empty the target tables (or set [snapshot] truncate_targets = true), remove {dir}, then run again")]
    SlotGoneWithLog {
        /// The spill directory.
        dir: PathBuf,
        /// Its durable LSN.
        durable: Lsn,
        /// The slot name.
        slot: String,
    },
    /// The slot is gone (dropped by hand?) but a shard has progress or full-load records: the
    /// changes since then cannot be streamed again (issue #11 item 2).
    #[error("shard {shard} holds {what} from an earlier run of slot {slot}, but that slot no longer exists on the source (dropped?): the changes made since then can no longer be streamed, so the shard cannot be resumed and creating a new slot would skip them. Re-sync from scratch: `reshard slot drop -c <config> --purge` (drops the `reshard` schema on every shard), empty the target tables (or set [snapshot] truncate_targets = true), remove the spill directory {dir} if it holds anything, then run again")]
    SlotGoneWithProgress {
        /// The shard.
        shard: String,
        /// "progress up to X" or "full-load records".
        what: String,
        /// The slot name.
        slot: String,
        /// The spill directory.
        dir: PathBuf,
    },
    /// The slot is new, and a shard holds full-load records while its progress rows name only
    /// other slots: the records are another migration's.
    #[error("shard {shard} holds full-load records (reshard.fullload_chunks) of another migration: its reshard.progress rows name slot {others}, not {slot} (this config's [source] slot). To go on with that migration, set [source] slot (and its publication) back to it; to start a new one, re-sync from scratch: `reshard slot drop -c <config> --purge` (drops the `reshard` schema on every shard), empty the target tables (or set [snapshot] truncate_targets = true), remove the spill directory if it holds anything, then run again")]
    LoadRecordsOfAnotherSlot {
        /// The shard.
        shard: String,
        /// The slots named by its progress rows, comma-separated.
        others: String,
        /// This config's slot.
        slot: String,
    },
    /// The spill log and a shard's progress were written by different migrations.
    #[error("the spill directory {dir} belongs to migration {log_migration}, but shard {shard}'s progress row was written by migration {shard_migration}: this is another migration's spill log. Point [spill] dir at the directory of migration {shard_migration}, or re-sync shard {shard} (`DROP SCHEMA reshard CASCADE` and empty its tables)")]
    MigrationMismatch {
        /// The spill directory.
        dir: PathBuf,
        /// The directory's migration.
        log_migration: String,
        /// The shard.
        shard: String,
        /// The shard's migration.
        shard_migration: String,
    },
    /// Two shards' progress rows belong to different migrations.
    #[error("shards {a} and {b} were written by different migrations ({a_migration} and {b_migration}) of slot {slot}: re-sync the shard that does not belong (`DROP SCHEMA reshard CASCADE` and empty its tables)")]
    ShardsDisagree {
        /// One shard.
        a: String,
        /// Its migration.
        a_migration: String,
        /// Another shard.
        b: String,
        /// Its migration.
        b_migration: String,
        /// The slot name.
        slot: String,
    },
    /// The log does not hold transactions a shard needs, and the slot will not send them.
    #[error("the spill log in {dir} does not cover shard {shard}: the shard needs the transactions committed after {after}, the slot {slot} sends them only from {slot_from} on, and the log holds {held}. The transactions after {after} and before {slot_from} are missing (a fresh or wrong spill directory: another working directory, a volume that is not mounted, a restored backup). Ways out: restore the spill directory of this migration and point [spill] dir at it; or re-sync shard {shard} (`DROP SCHEMA reshard CASCADE` on it and empty its tables, or start over with `reshard slot drop --purge`). Nothing was streamed")]
    Gap {
        /// The spill directory.
        dir: PathBuf,
        /// The shard.
        shard: String,
        /// The missing commits start after this LSN.
        after: Lsn,
        /// Where the slot resumes.
        slot_from: Lsn,
        /// What the log holds, in words.
        held: String,
        /// The slot name.
        slot: String,
    },
}

/// Decides whether (and how) to start. `new_id` makes a fresh migration id.
pub fn plan(
    slot_name: &str,
    slot: SlotState,
    log: &LogState,
    shards: &[ShardState],
    new_id: impl FnOnce() -> String,
) -> Result<Plan, StartupError> {
    let confirmed = match slot {
        SlotState::Missing => {
            if !log.durable_lsn.is_zero() {
                return Err(StartupError::SlotGoneWithLog {
                    dir: log.dir.clone(),
                    durable: log.durable_lsn,
                    slot: slot_name.to_owned(),
                });
            }
            for s in shards {
                if s.has_load_records
                    && s.progress.is_none_or(|p| p.is_zero())
                    && !s.other_slots.is_empty()
                {
                    return Err(StartupError::LoadRecordsOfAnotherSlot {
                        shard: s.name.clone(),
                        others: s.other_slots.join(", "),
                        slot: slot_name.to_owned(),
                    });
                }
                let what = match s.progress {
                    Some(p) if !p.is_zero() => format!("progress up to {p}"),
                    _ if s.has_load_records => "full-load records (reshard.fullload_chunks)".into(),
                    _ => continue,
                };
                return Err(StartupError::SlotGoneWithProgress {
                    shard: s.name.clone(),
                    what,
                    slot: slot_name.to_owned(),
                    dir: log.dir.clone(),
                });
            }
            return Ok(Plan::Create {
                migration_id: log.migration_id.clone().unwrap_or_else(new_id),
            });
        }
        SlotState::Exists {
            confirmed_flush_lsn,
        } => confirmed_flush_lsn,
    };
    let migration_id = migration_of(slot_name, log, shards, new_id)?;
    // An empty log starts where the slot resumes; a log with data but no recorded start was
    // written by an older version, which opened it before creating the slot.
    let log_start = match log.start_lsn {
        Some(l) => l,
        None if log.durable_lsn.is_zero() => confirmed,
        None => Lsn::ZERO,
    };
    let slot_from = log.durable_lsn.max(confirmed);
    for s in shards {
        let Some(after) = s.needs_after() else {
            continue;
        };
        if after.covers(slot_from) {
            continue;
        }
        // Held: commits starting in [log_start, durable) from the log, from slot_from on from
        // the slot.
        let before_log = !after.covers(log_start);
        if before_log || log.durable_lsn < slot_from {
            let held = if log.durable_lsn <= log_start {
                "nothing".to_owned()
            } else {
                format!(
                    "only the transactions from {log_start} to {}",
                    log.durable_lsn
                )
            };
            return Err(StartupError::Gap {
                dir: log.dir.clone(),
                shard: s.name.clone(),
                after: if before_log {
                    after
                } else {
                    after.max(Lsn::covering(log.durable_lsn))
                },
                slot_from,
                held,
                slot: slot_name.to_owned(),
            });
        }
    }
    Ok(Plan::Resume {
        migration_id,
        log_start,
    })
}

fn migration_of(
    slot_name: &str,
    log: &LogState,
    shards: &[ShardState],
    new_id: impl FnOnce() -> String,
) -> Result<String, StartupError> {
    if let Some(id) = &log.migration_id {
        if let Some(s) = shards
            .iter()
            .find(|s| s.migration_id.as_ref().is_some_and(|m| m != id))
        {
            return Err(StartupError::MigrationMismatch {
                dir: log.dir.clone(),
                log_migration: id.clone(),
                shard: s.name.clone(),
                shard_migration: s.migration_id.clone().unwrap_or_default(),
            });
        }
        return Ok(id.clone());
    }
    let mut found: Option<(&str, &str)> = None;
    for s in shards {
        let Some(m) = s.migration_id.as_deref() else {
            continue;
        };
        match found {
            None => found = Some((&s.name, m)),
            Some((a, am)) if am != m => {
                return Err(StartupError::ShardsDisagree {
                    a: a.to_owned(),
                    a_migration: am.to_owned(),
                    b: s.name.clone(),
                    b_migration: m.to_owned(),
                    slot: slot_name.to_owned(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(found.map_or_else(new_id, |(_, m)| m.to_owned()))
}

/// A new migration id: the source system, the time and the process, in hex. Unique enough to
/// tell two migrations of one slot apart; it is compared, never parsed.
pub fn new_migration_id(system_id: &str) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{system_id}-{micros:x}-{:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(v: u64) -> Lsn {
        Lsn::from_u64(v)
    }

    fn log(id: Option<&str>, start: Option<u64>, durable: u64) -> LogState {
        LogState {
            dir: PathBuf::from("/var/lib/reshard/spill"),
            migration_id: id.map(str::to_owned),
            start_lsn: start.map(l),
            durable_lsn: l(durable),
        }
    }

    fn shard(name: &str, progress: Option<u64>, id: Option<&str>) -> ShardState {
        ShardState {
            name: name.into(),
            progress: progress.map(l),
            migration_id: id.map(str::to_owned),
            has_load_records: progress.is_some(),
            other_slots: Vec::new(),
            oldest_copy_lsn: None,
        }
    }

    fn exists(f: u64) -> SlotState {
        SlotState::Exists {
            confirmed_flush_lsn: l(f),
        }
    }

    #[test]
    fn an_intact_log_resumes_every_shard() {
        let p = plan(
            "s",
            exists(900),
            &log(Some("m"), Some(100), 1000),
            &[
                shard("a", Some(150), Some("m")),
                shard("b", Some(999), Some("m")),
            ],
            || "new".into(),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Resume {
                migration_id: "m".into(),
                log_start: l(100)
            }
        );
    }

    // See: issue #11 item 1 (a fresh spill directory while a shard lags).
    #[test]
    fn a_fresh_log_behind_a_lagging_shard_is_refused_with_the_range() {
        let e = plan(
            "reshard",
            exists(900),
            &log(None, None, 0),
            &[
                shard("a", Some(899), Some("m")),
                shard("b", Some(500), Some("m")),
            ],
            || "new".into(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, StartupError::Gap { shard, after, slot_from, .. }
                if shard == "b" && *after == l(500) && *slot_from == l(900)),
            "{msg}"
        );
        for part in [
            "shard b",
            "after 0/1F4 and before 0/384",
            "/var/lib/reshard/spill",
            "re-sync",
        ] {
            assert!(msg.contains(part), "{part} missing: {msg}");
        }
    }

    #[test]
    fn a_fresh_log_is_fine_when_every_shard_is_caught_up() {
        let p = plan(
            "s",
            exists(900),
            &log(None, None, 0),
            &[
                shard("a", Some(899), Some("m")),
                shard("b", Some(950), None),
            ],
            || "new".into(),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Resume {
                migration_id: "m".into(),
                log_start: l(900)
            }
        );
    }

    #[test]
    fn copied_tables_need_the_log_from_their_snapshot() {
        let mut s = shard("a", None, None);
        s.oldest_copy_lsn = Some(l(300));
        let e = plan("s", exists(900), &log(None, None, 0), &[s.clone()], || {
            "n".into()
        });
        assert!(matches!(e, Err(StartupError::Gap { after, .. }) if after == l(299)));
        assert!(plan(
            "s",
            exists(900),
            &log(Some("m"), Some(300), 950),
            &[s],
            || { "n".into() }
        )
        .is_ok());
        // No progress and nothing copied yet: the load will copy under a new snapshot.
        assert!(plan(
            "s",
            exists(900),
            &log(None, None, 0),
            &[shard("b", None, None)],
            || { "n".into() }
        )
        .is_ok());
    }

    #[test]
    fn a_log_restored_from_an_older_backup_leaves_a_hole() {
        let e = plan(
            "s",
            exists(900),
            &log(Some("m"), Some(100), 600),
            &[shard("a", Some(400), Some("m"))],
            || "n".into(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("from 0/64 to 0/258"), "{e}");
        assert!(
            matches!(e, StartupError::Gap { after, .. } if after == l(599)),
            "{e}"
        );
    }

    #[test]
    fn another_migrations_log_is_refused() {
        let e = plan(
            "s",
            exists(900),
            &log(Some("m1"), Some(100), 1000),
            &[shard("a", Some(950), Some("m2"))],
            || "n".into(),
        )
        .unwrap_err();
        assert!(matches!(e, StartupError::MigrationMismatch { .. }), "{e}");
        let e = plan(
            "s",
            exists(900),
            &log(None, None, 0),
            &[
                shard("a", Some(950), Some("m1")),
                shard("b", Some(950), Some("m2")),
            ],
            || "n".into(),
        )
        .unwrap_err();
        assert!(matches!(e, StartupError::ShardsDisagree { .. }), "{e}");
    }

    // See: issue #11 item 2 (slot dropped by a DBA, old progress rows and chunk records).
    #[test]
    fn a_dropped_slot_with_old_progress_or_chunks_is_refused() {
        let e = plan(
            "reshard",
            SlotState::Missing,
            &log(None, None, 0),
            &[shard("a", None, None), shard("b", Some(700), Some("m"))],
            || "n".into(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("shard b holds progress up to 0/2BC"),
            "{e}"
        );
        let mut c = shard("a", None, None);
        c.has_load_records = true;
        let e = plan(
            "reshard",
            SlotState::Missing,
            &log(None, None, 0),
            &[c],
            || "n".into(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("full-load records"), "{e}");
        // See: explore-findings "Not fixed" (the refusal named the new slot, not the records').
        // A new slot on a shard whose records belong to slot r2's migration names r2 and the fix.
        let mut c = shard("a", None, None);
        c.has_load_records = true;
        c.other_slots = vec!["r2".into()];
        let e = plan("r3", SlotState::Missing, &log(None, None, 0), &[c], || {
            "n".into()
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, StartupError::LoadRecordsOfAnotherSlot { .. })
                && msg.contains("name slot r2, not r3")
                && msg.contains("set [source] slot (and its publication) back to it")
                && !msg.contains("earlier run of slot r3"),
            "{msg}"
        );
        let e = plan(
            "reshard",
            SlotState::Missing,
            &log(Some("m"), Some(5), 70),
            &[],
            || "n".into(),
        )
        .unwrap_err();
        assert!(matches!(e, StartupError::SlotGoneWithLog { .. }));
        let mut fresh = shard("a", Some(0), None);
        fresh.has_load_records = false;
        let p = plan(
            "reshard",
            SlotState::Missing,
            &log(None, None, 0),
            &[fresh],
            || "n".into(),
        )
        .unwrap();
        assert_eq!(p.migration_id(), "n");
    }
}
