//! `reshard plan --shards M` for `hash = "map"`: a balanced account map for M shards that moves
//! as few bytes as it can, read-only (issue #17, "N → M").
//!
//! In: the config (its `[[shards]]`, the account map, the table set on the source) and M. Out:
//! a [`MapPlan`]: every account that moves (account, from, to, rows, bytes), the bytes on every
//! target before and after, the whole new map (written with [`csv_of_pairs`], the format the
//! map reader reads), and an estimate of the copy time at a stated rate. [`MapPlan::batches`]
//! groups the moves by (from, to): each batch is one `reshard move`.
//!
//! Measured: per account, rows and bytes (`pg_column_size` of each row: the row's data as
//! stored, a lower bound of what a copy writes) over every sharded table, one `GROUP BY` query
//! per table per shard, on the shard the map gives the account. Rows found on a shard the map
//! does not give their account are counted (`misplaced_rows`) and not planned; rows of an
//! account the map does not know (and no `default_shard`) likewise (`unmapped_rows`).
//!
//! The targets ([`map_targets`]): the shards that hold accounts now (the map names them, or
//! `default_shard`), in config order, then the config's shards that hold none, in config order,
//! up to M. M below the shards that hold accounts, or above the config's shards, is refused.
//!
//! The assignment ([`assign`]), by bytes: every account starts where it is. While a target is
//! outside ±tolerance of the mean, the largest account of the most loaded target that fits in
//! what that target must shed and the least loaded one may take (both toward the mean) moves
//! there; if none fits, the smallest account whose move still narrows the gap between those two;
//! if none does, it stops (an account larger than the mean: `balanced` is false). Each move
//! strictly lowers the sum of squared loads, so it ends; an account never moves twice.
//!
//! Nothing is written anywhere but the `--out` file the CLI is given.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::config::{Config, HashKind};
use crate::event::Oid;
use crate::ops::grow::GrowError;
use crate::pg::conn::error_text;
use crate::pg::sql::quote_ident;
use crate::route::key::KeyType;
use crate::route::map::{canonical_account, csv_of_pairs};
use crate::route::refresh::{no_map_configured, MapSource};
use crate::route::AccountMap;

/// The tolerance the plan aims at when none is given: every target within ±this percent of the
/// mean bytes.
pub const DEFAULT_TOLERANCE_PCT: u32 = 5;

/// One account that moves.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccountMove {
    /// The account, as the map lists it (PostgreSQL's text form if the map does not list it).
    pub account: String,
    /// Its shard now.
    pub from: String,
    /// Its shard in the new map.
    pub to: String,
    /// Its rows over every sharded table.
    pub rows: i64,
    /// Their bytes (`pg_column_size` of each row).
    pub bytes: i64,
}

/// The accounts moving from one shard to another: one `reshard move`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MoveBatch {
    /// The shard that holds them.
    pub from: String,
    /// The shard that gets them.
    pub to: String,
    /// The accounts.
    pub accounts: Vec<String>,
    /// Their rows.
    pub rows: i64,
    /// Their bytes.
    pub bytes: i64,
}

/// One target shard, before and after.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardLoad {
    /// Its name in the config.
    pub name: String,
    /// It holds no account now (a new shard to fill).
    pub new: bool,
    /// Accounts now.
    pub accounts_before: usize,
    /// Rows now.
    pub rows_before: i64,
    /// Bytes now.
    pub bytes_before: i64,
    /// Accounts after the plan.
    pub accounts_after: usize,
    /// Rows after the plan.
    pub rows_after: i64,
    /// Bytes after the plan.
    pub bytes_after: i64,
}

/// `reshard plan --shards M` for `hash = "map"`.
#[derive(Debug, Clone, Serialize)]
pub struct MapPlan {
    /// Shards that hold accounts now.
    pub from_shards: usize,
    /// Target shards (M).
    pub to_shards: usize,
    /// Every target, in order ([`map_targets`]).
    pub shards: Vec<ShardLoad>,
    /// Every account that moves, largest first.
    pub moves: Vec<AccountMove>,
    /// Rows that move.
    pub rows_to_move: i64,
    /// Their bytes.
    pub bytes_to_move: i64,
    /// The aim: every target within ±this percent of the mean bytes.
    pub tolerance_pct: u32,
    /// Mean bytes per target.
    pub mean_bytes: i64,
    /// Every target is within the tolerance after the plan.
    pub balanced: bool,
    /// Most / least loaded target's bytes, now (infinite when one holds nothing).
    pub max_min_ratio_before: f64,
    /// The same after the plan.
    pub max_min_ratio_after: f64,
    /// Accounts in the new map.
    pub accounts: usize,
    /// Rows on a shard the map does not give their account (not planned; run `reshard verify`).
    pub misplaced_rows: i64,
    /// Rows of accounts the map does not know (not planned).
    pub unmapped_rows: i64,
    /// The copy rate the estimate assumes (rows per second).
    pub rate_rows_per_sec: u64,
    /// The estimate: rows to move / rate (seconds).
    pub eta_secs: f64,
    /// The whole new map, `(account, shard)`, in account order: what `--out` writes.
    #[serde(skip)]
    pub new_map: Vec<(String, String)>,
}

impl MapPlan {
    /// The moves grouped by (from, to), in the order of their first (largest) account: each is
    /// one `reshard move --accounts … --from … --to …`.
    pub fn batches(&self) -> Vec<MoveBatch> {
        let mut out: Vec<MoveBatch> = Vec::new();
        for m in &self.moves {
            match out.iter_mut().find(|b| b.from == m.from && b.to == m.to) {
                Some(b) => {
                    b.accounts.push(m.account.clone());
                    b.rows += m.rows;
                    b.bytes += m.bytes;
                }
                None => out.push(MoveBatch {
                    from: m.from.clone(),
                    to: m.to.clone(),
                    accounts: vec![m.account.clone()],
                    rows: m.rows,
                    bytes: m.bytes,
                }),
            }
        }
        out
    }

    /// The new map as a map file (the format [`AccountMap::from_csv_reader`] reads).
    pub fn csv(&self) -> Result<String, String> {
        csv_of_pairs(self.new_map.iter().map(|(a, s)| (a.as_str(), s.as_str())))
    }
}

/// The M target shards of a map layout: the shards that hold accounts now (named by the map, or
/// its default shard), in config order, then the config's other shards, in config order.
pub fn map_targets(config: &Config, map: &AccountMap, to: usize) -> Result<Vec<String>, GrowError> {
    let mut holding: Vec<bool> = vec![false; config.shards.len()];
    for (_, shard) in map.accounts() {
        if let Some(i) = config.shard_index(shard) {
            holding[i] = true;
        }
    }
    if let Some(i) = map.default_shard().and_then(|d| config.shard_index(d)) {
        holding[i] = true;
    }
    let held: Vec<&str> = config
        .shards
        .iter()
        .zip(&holding)
        .filter(|(_, h)| **h)
        .map(|(s, _)| s.name.as_str())
        .collect();
    if to > config.shards.len() {
        return Err(GrowError::MapTooMany {
            to,
            listed: config.shards.len(),
        });
    }
    if to < held.len().max(1) {
        return Err(GrowError::MapTooFew {
            to,
            holding: held.len(),
            names: held.join(", "),
        });
    }
    let mut out: Vec<String> = Vec::with_capacity(to);
    for pass in [true, false] {
        for (s, h) in config.shards.iter().zip(&holding) {
            if *h == pass && out.len() < to {
                out.push(s.name.clone());
            }
        }
    }
    Ok(out)
}

/// The balanced assignment (see the module doc). `loads[t]` is target t's bytes now (every
/// account included); `accounts[i] = (bytes, target now)`. Returns each account's target after
/// the plan, and whether every target ends within ±`tolerance_pct` of the mean.
pub fn assign(loads: &[i64], accounts: &[(i64, usize)], tolerance_pct: u32) -> (Vec<usize>, bool) {
    let mut loads = loads.to_vec();
    let mut placed: Vec<usize> = accounts.iter().map(|a| a.1).collect();
    let m = loads.len();
    if m == 0 {
        return (placed, true);
    }
    let mut on: Vec<BTreeSet<(i64, usize)>> = vec![BTreeSet::new(); m];
    for (i, &(bytes, t)) in accounts.iter().enumerate() {
        if bytes > 0 && t < m {
            on[t].insert((bytes, i));
        }
    }
    let total: i64 = loads.iter().sum();
    let mean = total as f64 / m as f64;
    let tol = f64::from(tolerance_pct) / 100.0;
    let within = |loads: &[i64]| loads.iter().all(|&l| (l as f64 - mean).abs() <= mean * tol);
    while !within(&loads) {
        let (h, _) = loads
            .iter()
            .enumerate()
            .max_by_key(|(i, l)| (**l, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        let (l, _) = loads
            .iter()
            .enumerate()
            .min_by_key(|(i, l)| (**l, *i))
            .unwrap_or((0, &0));
        let need = ((loads[h] as f64 - mean).min(mean - loads[l] as f64)).floor() as i64;
        let gap = loads[h] - loads[l];
        // Only accounts still on their own shard are in `on`: a moved one never moves again.
        let fits = on[h].range(..=(need, usize::MAX)).next_back().copied();
        let pick = fits.or_else(|| on[h].first().copied().filter(|(b, _)| *b < gap));
        let Some((bytes, i)) = pick else { break };
        on[h].remove(&(bytes, i));
        loads[h] -= bytes;
        loads[l] += bytes;
        placed[i] = l;
    }
    let ok = within(&loads);
    (placed, ok)
}

/// One account: as listed, where it is, its size.
struct Entry {
    listed: String,
    shard: usize,
    rows: i64,
    bytes: i64,
    in_map: bool,
}

/// How two spellings of one account compare for a key of type `key_oid`: integers and uuids by
/// value (as the map looks them up), any other type by exact text.
fn canon(key_oid: Oid, text: &str) -> String {
    match KeyType::from_oid(key_oid) {
        Some(KeyType::Int2 | KeyType::Int4 | KeyType::Int8 | KeyType::Uuid) => {
            canonical_account(text.as_bytes()).unwrap_or_else(|| text.to_owned())
        }
        _ => text.to_owned(),
    }
}

fn ratio(loads: &[i64]) -> f64 {
    let max = loads.iter().copied().max().unwrap_or(0);
    let min = loads.iter().copied().min().unwrap_or(0);
    if min <= 0 {
        if max <= 0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        max as f64 / min as f64
    }
}

/// Measures every account on the current shards and makes the plan (see the module doc).
pub async fn plan_map(
    config: &Config,
    to: usize,
    rate: u64,
    tolerance_pct: u32,
) -> Result<MapPlan, GrowError> {
    if config.routing.hash != HashKind::Map {
        return Err(GrowError::NotMap);
    }
    let source = MapSource::from_config(config)
        .map_err(GrowError::Map)?
        .ok_or_else(|| GrowError::Map(no_map_configured()))?;
    let map = source.load(&mut None).await.map_err(GrowError::Map)?;
    let targets = map_targets(config, &map, to)?;
    let tables = crate::ops::grow::sharded_tables(config).await?;

    // Measured: (canonical account) -> entry. Only the shards that hold accounts are read.
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut key_oid: Option<Oid> = None;
    let (mut misplaced_rows, mut unmapped_rows) = (0i64, 0i64);
    for (i, shard) in config.shards.iter().enumerate() {
        if !targets.contains(&shard.name) {
            continue;
        }
        let err = |what: String| {
            let shard = shard.name.clone();
            move |e: tokio_postgres::Error| GrowError::Shard {
                shard,
                what,
                message: error_text(&e),
            }
        };
        let c = crate::ops::grow::connect_shard(shard).await?;
        for rule in &tables {
            let (oid, _) = crate::ops::grow::key_type(&c, &shard.name, rule).await?;
            key_oid.get_or_insert(oid);
            let k = quote_ident(&rule.key);
            let sql = format!(
                "SELECT t.{k}::text, count(*), coalesce(sum(pg_column_size(t.*)), 0)::bigint \
                 FROM {} t WHERE t.{k} IS NOT NULL GROUP BY t.{k}",
                rule.target.quoted()
            );
            let rows = c.query(&sql, &[]).await.map_err(err(format!(
                "measuring the rows and bytes of each account in {}",
                rule.target
            )))?;
            for r in rows {
                let (text, n, b): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                match map.shard_of_text(oid, text.as_bytes()) {
                    Ok(s) if s.index() == i => {}
                    Ok(_) => {
                        misplaced_rows += n;
                        continue;
                    }
                    Err(_) => {
                        unmapped_rows += n;
                        continue;
                    }
                }
                let e = entries.entry(canon(oid, &text)).or_insert_with(|| Entry {
                    listed: text.clone(),
                    shard: i,
                    rows: 0,
                    bytes: 0,
                    in_map: false,
                });
                e.rows += n;
                e.bytes += b;
            }
        }
    }
    // The map's accounts (those without rows too: they keep their shard).
    let oid = key_oid.unwrap_or(25);
    for (listed, shard) in map.accounts() {
        let Some(i) = config.shard_index(shard) else {
            continue;
        };
        let e = entries.entry(canon(oid, &listed)).or_insert_with(|| Entry {
            listed: listed.clone(),
            shard: i,
            rows: 0,
            bytes: 0,
            in_map: true,
        });
        e.listed = listed;
        e.in_map = true;
    }
    let mut entries: Vec<Entry> = entries.into_values().collect();
    entries.sort_by(|a, b| order_key(&a.listed).cmp(&order_key(&b.listed)));

    // Indexes into `targets`.
    let target_of = |shard: usize| {
        targets
            .iter()
            .position(|t| *t == config.shards[shard].name)
            .unwrap_or(0)
    };
    let mut loads = vec![0i64; targets.len()];
    let mut before: Vec<(usize, i64, i64)> = vec![(0, 0, 0); targets.len()];
    let sizes: Vec<(i64, usize)> = entries
        .iter()
        .map(|e| {
            let t = target_of(e.shard);
            loads[t] += e.bytes;
            before[t].0 += 1;
            before[t].1 += e.rows;
            before[t].2 += e.bytes;
            (e.bytes, t)
        })
        .collect();
    let (placed, balanced) = assign(&loads, &sizes, tolerance_pct);

    let mut after: Vec<(usize, i64, i64)> = vec![(0, 0, 0); targets.len()];
    let mut moves = Vec::new();
    let mut new_map = Vec::with_capacity(entries.len());
    for (e, &t) in entries.iter().zip(&placed) {
        after[t].0 += 1;
        after[t].1 += e.rows;
        after[t].2 += e.bytes;
        let from = target_of(e.shard);
        if t != from {
            moves.push(AccountMove {
                account: e.listed.clone(),
                from: targets[from].clone(),
                to: targets[t].clone(),
                rows: e.rows,
                bytes: e.bytes,
            });
        }
        // An account routed by the default shard is listed once it moves.
        if e.in_map || t != from {
            new_map.push((e.listed.clone(), targets[t].clone()));
        }
    }
    moves.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| a.account.cmp(&b.account))
    });
    let shards: Vec<ShardLoad> = targets
        .iter()
        .enumerate()
        .map(|(t, name)| ShardLoad {
            name: name.clone(),
            new: before[t].0 == 0
                && !map.accounts().any(|(_, s)| s == name)
                && map.default_shard() != Some(name.as_str()),
            accounts_before: before[t].0,
            rows_before: before[t].1,
            bytes_before: before[t].2,
            accounts_after: after[t].0,
            rows_after: after[t].1,
            bytes_after: after[t].2,
        })
        .collect();
    let rows_to_move: i64 = moves.iter().map(|m| m.rows).sum();
    let bytes_to_move: i64 = moves.iter().map(|m| m.bytes).sum();
    let rate = rate.max(1);
    let after_bytes: Vec<i64> = after.iter().map(|a| a.2).collect();
    Ok(MapPlan {
        from_shards: shards.iter().filter(|s| !s.new).count(),
        to_shards: targets.len(),
        max_min_ratio_before: ratio(&loads),
        max_min_ratio_after: ratio(&after_bytes),
        mean_bytes: loads.iter().sum::<i64>() / targets.len().max(1) as i64,
        shards,
        moves,
        rows_to_move,
        bytes_to_move,
        tolerance_pct,
        balanced,
        accounts: new_map.len(),
        misplaced_rows,
        unmapped_rows,
        rate_rows_per_sec: rate,
        eta_secs: rows_to_move as f64 / rate as f64,
        new_map,
    })
}

/// Accounts in a readable order: integers by value, then everything else by text.
fn order_key(a: &str) -> (bool, i64, &str) {
    match a.trim().parse::<i64>() {
        Ok(v) => (false, v, a),
        Err(_) => (true, 0, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads_after(accounts: &[(i64, usize)], placed: &[usize], m: usize) -> Vec<i64> {
        let mut l = vec![0; m];
        for (a, &t) in accounts.iter().zip(placed) {
            l[t] += a.0;
        }
        l
    }

    #[test]
    fn three_big_accounts_and_many_small_ones_spread_onto_new_shards() {
        // Shard 0: 6000, 4000 and 100 × 75; shard 1: 3000 and 100 × 75; shards 2, 3 empty.
        let mut accounts = vec![(6000, 0), (4000, 0), (3000, 1)];
        for i in 0..200 {
            accounts.push((75, i / 100));
        }
        let loads = loads_after(
            &accounts,
            &(0..accounts.len())
                .map(|i| accounts[i].1)
                .collect::<Vec<_>>(),
            4,
        );
        assert_eq!(loads, vec![17500, 10500, 0, 0]);
        let (placed, ok) = assign(&loads, &accounts, 5);
        assert!(ok);
        let after = loads_after(&accounts, &placed, 4);
        let mean = 28000.0 / 4.0;
        for l in &after {
            assert!((*l as f64 - mean).abs() <= mean * 0.05, "{after:?}");
        }
        // No target both gives and takes; targets under the mean give nothing.
        for (t, load) in loads.iter().enumerate() {
            let gives = accounts
                .iter()
                .zip(&placed)
                .any(|(a, &p)| a.1 == t && p != t);
            let takes = accounts
                .iter()
                .zip(&placed)
                .any(|(a, &p)| a.1 != t && p == t);
            assert!(!(gives && takes), "target {t} gives and takes");
            if (*load as f64) <= mean {
                assert!(!gives, "target {t} was under the mean and gave");
            }
        }
        // Moved no more than the excess over the mean plus one small account per target.
        let moved: i64 = accounts
            .iter()
            .zip(&placed)
            .filter(|(a, &p)| a.1 != p)
            .map(|(a, _)| a.0)
            .sum();
        let excess: f64 = loads.iter().map(|&l| (l as f64 - mean).max(0.0)).sum();
        assert!(
            moved as f64 <= excess + 4.0 * 75.0,
            "moved {moved}, excess {excess}"
        );
    }

    #[test]
    fn an_account_larger_than_the_mean_stays_and_the_plan_says_unbalanced() {
        let accounts = vec![(10_000, 0), (10, 0), (10, 1)];
        let (placed, ok) = assign(&[10_010, 10, 0], &accounts, 5);
        assert!(!ok);
        assert_eq!(placed[0], 0, "the big account cannot go anywhere better");
    }

    #[test]
    fn balanced_already_moves_nothing() {
        let accounts = vec![(100, 0), (101, 1)];
        let (placed, ok) = assign(&[100, 101], &accounts, 5);
        assert!(ok);
        assert_eq!(placed, vec![0, 1]);
    }
}
