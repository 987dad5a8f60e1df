//! Merge-joins of ordered streams: per-account aggregates (source against every shard at
//! once) and per-row hashes (source against one shard).
//!
//! In: [`Peeked`] streams ordered by their key's text under byte order (see `sql.rs`). Out:
//! per-shard tallies and the accounts or row keys that differ. Memory is one row per stream
//! plus the (capped) list of suspects: never a table.

use serde::Serialize;

use super::cursor::{Peeked, RowSource, TextRow};

/// Most suspect accounts kept per table and shard for the drill-down; beyond that they are
/// only counted.
pub const SUSPECT_CAP: usize = 10_000;

/// An account whose aggregate differs on a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    /// The account's key, as text.
    pub account: String,
    /// The shard the source routes it to (`None`: not on the source at all).
    pub expected: Option<usize>,
}

/// Tally of one shard during an account merge.
#[derive(Debug, Clone, Default)]
pub struct ShardTally {
    /// Source rows that route to this shard.
    pub rows_source: u64,
    /// Rows found on this shard.
    pub rows_shard: u64,
    /// Accounts compared (routed here on the source).
    pub accounts_checked: u64,
    /// Accounts whose aggregate differs (up to [`SUSPECT_CAP`]).
    pub suspects: Vec<Suspect>,
    /// All accounts whose aggregate differs.
    pub suspects_total: u64,
}

impl ShardTally {
    fn suspect(&mut self, account: &str, expected: Option<usize>) {
        self.suspects_total += 1;
        if self.suspects.len() < SUSPECT_CAP {
            self.suspects.push(Suspect {
                account: account.to_owned(),
                expected,
            });
        }
    }
}

/// A merge failed: a stream errored, or a row could not be routed or read.
#[derive(Debug)]
pub enum MergeError {
    /// Source stream (`false`) or shard stream `index` (`true`, index) failed.
    Stream {
        /// `None` for the source, else the position of the shard stream.
        shard_pos: Option<usize>,
        /// Driver error.
        source: tokio_postgres::Error,
    },
    /// An account could not be routed.
    Route {
        /// The account.
        account: String,
        /// Why.
        message: String,
    },
    /// A row did not have the expected shape.
    Malformed(String),
}

fn field(row: &TextRow, i: usize) -> Result<&str, MergeError> {
    row.get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| MergeError::Malformed(format!("column {i} missing or NULL in {row:?}")))
}

fn count(row: &TextRow) -> Result<u64, MergeError> {
    field(row, 1)?
        .parse()
        .map_err(|_| MergeError::Malformed(format!("count is not a number in {row:?}")))
}

/// A row's key: its first `key_len` columns.
fn key_of(row: &TextRow, key_len: usize) -> &[Option<String>] {
    row.get(..key_len).unwrap_or(row)
}

/// The merge itself, one definition for both joins: walks `source` and `streams` (each ordered
/// by its rows' first `key_len` columns) in key order and calls `group` once per key with the
/// row the source has at that key (if any) and, per stream, the row that stream has (if any).
/// Rows with equal keys pair up one to one: a stream holding a key twice yields two groups.
/// The first `FETCH` of every stream is started at once: it runs that side's whole query, so
/// the source and the shards work in parallel.
async fn merge<S, T, G>(
    source: &mut Peeked<S>,
    streams: &mut [Peeked<T>],
    key_len: usize,
    mut group: G,
) -> Result<(), MergeError>
where
    S: RowSource,
    T: RowSource,
    G: FnMut(Option<&TextRow>, &[Option<TextRow>]) -> Result<(), MergeError>,
{
    let src_err = |source| MergeError::Stream {
        shard_pos: None,
        source,
    };
    let shard_err = |pos| {
        move |source| MergeError::Stream {
            shard_pos: Some(pos),
            source,
        }
    };
    {
        let first = futures_util::future::join(
            source.peek(),
            futures_util::future::join_all(streams.iter_mut().map(|s| s.peek())),
        )
        .await;
        first.0.map_err(src_err)?;
        for (pos, r) in first.1.into_iter().enumerate() {
            r.map_err(shard_err(pos))?;
        }
    }
    let mut rows: Vec<Option<TextRow>> = Vec::with_capacity(streams.len());
    // Every head is read from here on (`pop` reads the next row): the smallest key and the
    // heads at it are found without copying a key.
    let mut at_min: Vec<bool> = Vec::with_capacity(streams.len() + 1);
    loop {
        {
            let heads = std::iter::once(source.head()).chain(streams.iter().map(Peeked::head));
            let Some(min) = heads.clone().flatten().map(|r| key_of(r, key_len)).min() else {
                return Ok(());
            };
            at_min.clear();
            at_min.extend(heads.map(|h| h.is_some_and(|r| key_of(r, key_len) == min)));
        }
        let src = if at_min.first().copied().unwrap_or(false) {
            source.pop().await.map_err(src_err)?
        } else {
            None
        };
        rows.clear();
        for (pos, (s, &at)) in streams.iter_mut().zip(at_min.iter().skip(1)).enumerate() {
            rows.push(if at {
                s.pop().await.map_err(shard_err(pos))?
            } else {
                None
            });
        }
        group(src.as_ref(), &rows)?;
    }
}

/// Merges per-account aggregates `(account, count, sum[, shard])` of the source against the
/// shards in `shard_ids` (`streams[i]` is shard `shard_ids[i]`). `route` maps a source row to
/// its shard: the row's 4th column when the source computed it, else a router call.
pub async fn merge_accounts<S, T, R>(
    source: &mut Peeked<S>,
    streams: &mut [Peeked<T>],
    shard_ids: &[usize],
    route: R,
    tallies: &mut [ShardTally],
) -> Result<(), MergeError>
where
    S: RowSource,
    T: RowSource,
    R: Fn(&str, Option<&str>) -> Result<usize, String>,
{
    merge(source, streams, 1, |src, shards| {
        let Some(first) = src.or_else(|| shards.iter().flatten().next()) else {
            return Ok(());
        };
        let account = field(first, 0)?;
        let expected = match src {
            Some(r) => Some(route(account, r.get(3).and_then(|v| v.as_deref())).map_err(
                |message| MergeError::Route {
                    account: account.to_owned(),
                    message,
                },
            )?),
            None => None,
        };
        for (pos, here) in shards.iter().enumerate() {
            let id = shard_ids.get(pos).copied().unwrap_or(usize::MAX);
            let Some(tally) = tallies.get_mut(pos) else {
                continue;
            };
            if let Some(h) = here {
                tally.rows_shard += count(h)?;
            }
            if expected == Some(id) {
                let Some(src) = src else { continue };
                tally.accounts_checked += 1;
                tally.rows_source += count(src)?;
                let same = match here {
                    Some(h) => field(h, 1)? == field(src, 1)? && field(h, 2)? == field(src, 2)?,
                    None => false,
                };
                if !same {
                    tally.suspect(account, expected);
                }
            } else if here.is_some() {
                // On this shard, but the source routes it elsewhere (or has no such account).
                tally.suspect(account, expected);
            }
        }
        Ok(())
    })
    .await
}

/// How a row differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// On the source (routed to this shard), not on the shard.
    Missing,
    /// On the shard, not on the source (or the source routes it to another shard).
    Extra,
    /// On both, with different values.
    Different,
}

/// Merges row hashes `(key…, md5)` ordered by the key columns; calls `diff` for every key
/// that is missing on the shard, extra on the shard, or different. Rows with equal keys pair
/// up one to one (tables keyed by every column may hold duplicates).
pub async fn merge_rows<S, T, F>(
    source: &mut Peeked<S>,
    shard: &mut Peeked<T>,
    key_len: usize,
    mut diff: F,
) -> Result<(), MergeError>
where
    S: RowSource,
    T: RowSource,
    F: FnMut(DiffKind, &[Option<String>]),
{
    merge(
        source,
        std::slice::from_mut(shard),
        key_len,
        |src, shards| {
            match (src, shards.first().and_then(Option::as_ref)) {
                (Some(a), None) => diff(DiffKind::Missing, key_of(a, key_len)),
                (None, Some(b)) => diff(DiffKind::Extra, key_of(b, key_len)),
                (Some(a), Some(b)) => {
                    if a.get(key_len) != b.get(key_len) {
                        diff(DiffKind::Different, key_of(a, key_len));
                    }
                }
                (None, None) => {}
            }
            Ok(())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn rows(v: &[&[&str]]) -> Peeked<VecDeque<TextRow>> {
        Peeked::new(
            v.iter()
                .map(|r| r.iter().map(|s| Some(s.to_string())).collect())
                .collect(),
        )
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn accounts_merge_finds_missing_different_and_misplaced() {
        // Source: accounts 1 → shard 0, 2 → shard 1, 3 → shard 0, 5 → shard 1.
        let mut src = rows(&[
            &["1", "2", "10", "0"],
            &["2", "1", "20", "1"],
            &["3", "4", "30", "0"],
            &["5", "1", "50", "1"],
        ]);
        // Shard 0: 1 ok, 3 different sum, 4 extra (not on source), 5 misplaced.
        // Shard 1: 2 ok, 5 missing.
        let mut shards = vec![
            rows(&[
                &["1", "2", "10"],
                &["3", "4", "31"],
                &["4", "1", "40"],
                &["5", "1", "50"],
            ]),
            rows(&[&["2", "1", "20"]]),
        ];
        let mut tallies = vec![ShardTally::default(), ShardTally::default()];
        block_on(merge_accounts(
            &mut src,
            &mut shards,
            &[0, 1],
            |_, s| s.unwrap().parse::<usize>().map_err(|e| e.to_string()),
            &mut tallies,
        ))
        .unwrap();
        let t0 = &tallies[0];
        assert_eq!(t0.accounts_checked, 2);
        assert_eq!(t0.rows_source, 6);
        assert_eq!(t0.rows_shard, 8);
        let s0: Vec<_> = t0
            .suspects
            .iter()
            .map(|s| (s.account.as_str(), s.expected))
            .collect();
        assert_eq!(s0, vec![("3", Some(0)), ("4", None), ("5", Some(1))]);
        let t1 = &tallies[1];
        assert_eq!(t1.accounts_checked, 2);
        let s1: Vec<_> = t1
            .suspects
            .iter()
            .map(|s| (s.account.as_str(), s.expected))
            .collect();
        assert_eq!(s1, vec![("5", Some(1))]);
    }

    #[test]
    fn rows_merge_classifies_keys() {
        let mut src = rows(&[&["1", "a"], &["2", "b"], &["3", "c"], &["3", "c"]]);
        let mut sh = rows(&[&["2", "B"], &["3", "c"], &["4", "d"]]);
        let mut got = Vec::new();
        block_on(merge_rows(&mut src, &mut sh, 1, |k, key| {
            got.push((k, key[0].clone().unwrap()))
        }))
        .unwrap();
        assert_eq!(
            got,
            vec![
                (DiffKind::Missing, "1".into()),
                (DiffKind::Different, "2".into()),
                (DiffKind::Missing, "3".into()),
                (DiffKind::Extra, "4".into()),
            ]
        );
    }
}
