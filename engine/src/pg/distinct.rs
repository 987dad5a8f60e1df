//! Every configured shard is its own database and holds its own progress: the operator's url
//! mistakes that no single connection can see.
//!
//! In: the shards of a layout as configured ([`Entry`]: section, name, url) and, for `run` and
//! `check`, the slot whose progress they hold. Out: `Ok`, or a [`DistinctError`] naming both
//! entries and the fix. `check`, `run`, `plan --shards M` and `rebalance` ask [`prove`], before
//! anything is written.
//!
//! Two mistakes (found by outside-user runs):
//! 1. two entries naming one database (a `[[new_shards]]` typo copying a range into an old
//!    shard's database, which the printed layout then listed twice). Urls do not tell
//!    (`localhost` vs `127.0.0.1`, a second DNS name), and neither does the server's system
//!    identifier: clusters cloned from one base backup (and the test harness's) share it. So
//!    each entry's session takes a session advisory lock (key: this process, the entry's
//!    index); an entry whose database shows an earlier entry's lock, held by that entry's
//!    backend, is that entry's database. Nothing is written; the locks go with the sessions.
//! 2. two `[[shards]]` urls swapped between runs: each database holds the other shard's
//!    progress row. Streaming then wrote a bogus `0/0` row under each name and stopped both
//!    shards with "re-copy the shard", advice that would make an operator wipe a correct
//!    shard. A `[[shards]]` database holding this slot's progress under another configured
//!    shard's name and none under its own is refused.

use tokio_postgres::Client;

use crate::config::{Config, ShardConfig};
use crate::error::{Classify, ErrorClass};
use crate::pg::conn::{connect_plain, error_text, url_target};
use crate::pg::progress::shards_of_slot;

/// The config section a shard entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `[[shards]]`: the layout that runs.
    Shards,
    /// `[[new_shards]]`: the shards a growth adds (`plan --shards M`, `rebalance`).
    NewShards,
}

impl std::fmt::Display for Section {
    /// The config key: `shards` or `new_shards`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Section::Shards => "shards",
            Section::NewShards => "new_shards",
        })
    }
}

/// One shard of a layout as the config names it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The section it is listed in.
    pub section: Section,
    /// The shard's name.
    pub name: &'a str,
    /// Its url as written.
    pub url: &'a str,
}

impl Entry<'_> {
    /// `[[new_shards]] shard4 (127.0.0.1:5433/app)`: the entry and where its url points,
    /// without the password.
    fn label(&self) -> String {
        format!(
            "[[{}]] {} ({})",
            self.section,
            self.name,
            url_target(self.url)
        )
    }
}

/// The `[[shards]]` of `config` and its first `new` `[[new_shards]]`, in layout order.
pub fn entries(config: &Config, new: usize) -> Vec<Entry<'_>> {
    fn of<'a>(section: Section, s: &'a ShardConfig) -> Entry<'a> {
        Entry {
            section,
            name: &s.name,
            url: &s.url,
        }
    }
    config
        .shards
        .iter()
        .map(|s| of(Section::Shards, s))
        .chain(
            config
                .new_shards
                .iter()
                .take(new)
                .map(|s| of(Section::NewShards, s)),
        )
        .collect()
}

/// An url mistake among the shards, or why it could not be ruled out.
#[derive(Debug, thiserror::Error)]
pub enum DistinctError {
    /// Two entries name one database.
    #[error("{first} and {second} are the same database: every shard must be its own database; fix the url of {}", .second_name)]
    SameDatabase {
        /// The earlier entry (label).
        first: String,
        /// The later entry (label).
        second: String,
        /// The later entry's name.
        second_name: String,
    },
    /// A `[[shards]]` database holds another configured shard's progress and none of its own.
    #[error("{entry} holds {holds}'s progress (reshard.progress, slot {slot}) and none of its own: were the urls swapped? Nothing was written. Give each [[shards]] entry the url of the database holding its progress (SELECT DISTINCT shard FROM reshard.progress on each), then run again")]
    Swapped {
        /// The entry (label).
        entry: String,
        /// The shard whose progress it holds.
        holds: String,
        /// The slot.
        slot: String,
    },
    /// A shard's server refused the connection itself: its login (28P01, 28000), its database
    /// (3D000), its TLS or its url's syntax. No retry fixes the url.
    #[error("{entry}: {message}; fix the url of [[{section}]] {name}, then run again")]
    Refused {
        /// The section the entry is listed in.
        section: Section,
        /// The entry's name.
        name: String,
        /// The entry (label).
        entry: String,
        /// What the server (or the url's parser) said.
        message: String,
    },
    /// A shard could not be reached or queried.
    #[error("{entry}: {message}")]
    Unreachable {
        /// The section the entry is listed in.
        section: Section,
        /// The entry's name.
        name: String,
        /// The entry (label).
        entry: String,
        /// What failed.
        message: String,
    },
}

impl DistinctError {
    /// A mistake in the config (exit 2), not a server that could not be asked.
    pub fn is_mistake(&self) -> bool {
        !matches!(self, DistinctError::Unreachable { .. })
    }
}

/// Proves that no two `entries` are one database and, with `progress = Some((slot,
/// system_id))`, that no `[[shards]]` database holds another configured shard's progress of
/// `slot` instead of its own. Read only.
pub async fn prove(
    entries: &[Entry<'_>],
    progress: Option<(&str, Option<&str>)>,
) -> Result<(), DistinctError> {
    let key = i64::from(std::process::id() & 0x3fff_ffff);
    let mut held: Vec<(Client, i32)> = Vec::with_capacity(entries.len());
    // Every connection at once (each is a backend start); the checks below go in order.
    let clients =
        futures_util::future::join_all(entries.iter().map(|e| connect_plain(e.url))).await;
    for ((i, e), c) in entries.iter().enumerate().zip(clients) {
        let unreachable = |message: String| DistinctError::Unreachable {
            section: e.section,
            name: e.name.to_owned(),
            entry: e.label(),
            message,
        };
        let c = c.map_err(|err| match err.class() {
            ErrorClass::Definite => DistinctError::Refused {
                section: e.section,
                name: e.name.to_owned(),
                entry: e.label(),
                message: err.to_string(),
            },
            ErrorClass::Transient => unreachable(err.to_string()),
        })?;
        let query = |err: tokio_postgres::Error| unreachable(error_text(&err));
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(query)?
            .get(0);
        let earlier = c
            .query(
                "SELECT objid::bigint, pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND classid::bigint = $1 AND objsubid = 2 \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&key],
            )
            .await
            .map_err(query)?;
        for r in &earlier {
            let (j, holder): (i64, Option<i32>) = (r.get(0), r.get(1));
            let same = usize::try_from(j)
                .ok()
                .filter(|&j| held.get(j).is_some_and(|(_, p)| Some(*p) == holder));
            if let Some(j) = same {
                return Err(DistinctError::SameDatabase {
                    first: entries[j].label(),
                    second: e.label(),
                    second_name: e.name.to_owned(),
                });
            }
        }
        c.execute(
            "SELECT pg_advisory_lock($1::bigint::int, $2::bigint::int)",
            &[&key, &(i as i64)],
        )
        .await
        .map_err(query)?;
        held.push((c, pid));
    }
    let Some((slot, system_id)) = progress else {
        return Ok(());
    };
    let configured: Vec<&str> = entries
        .iter()
        .filter(|e| e.section == Section::Shards)
        .map(|e| e.name)
        .collect();
    for (e, (c, _)) in entries.iter().zip(&held) {
        if e.section != Section::Shards {
            continue;
        }
        let names = shards_of_slot(c, slot, system_id, e.name)
            .await
            .map_err(|err| DistinctError::Unreachable {
                section: e.section,
                name: e.name.to_owned(),
                entry: e.label(),
                message: err.to_string(),
            })?;
        if names.iter().any(|n| n == e.name) {
            continue;
        }
        if let Some(other) = names.iter().find(|n| configured.contains(&n.as_str())) {
            return Err(DistinctError::Swapped {
                entry: e.label(),
                holds: other.clone(),
                slot: slot.to_owned(),
            });
        }
    }
    Ok(())
}
