//! `reshard plan --groups K`: one migration split into K groups that share nothing, each an
//! ordinary daemon with its own slot (DESIGN.md "One walsender is the ceiling" and "Beyond one
//! machine").
//!
//! In: the base config (its text and its parsed [`Config`]) and a SQL connection to the source.
//! Out: a [`Plan`]: the replicated tables (THE table set, [`crate::pg::catalog::resolve`]) split
//! into K disjoint groups balanced by `pg_total_relation_size`, and per group a config file
//! derived from the base text (comments and every other key kept) with its own slot,
//! publication, spill directory, admin and metrics ports, an explicit `[[tables]]` list and a
//! `[group]` section naming its peers; plus the values of the Helm chart in `deploy/helm/`.
//!
//! Invariants: every replicated table is in exactly one group, broadcast tables included (a
//! broadcast table is one more table: the group it falls in copies and streams it to every
//! shard, and no other group touches it). Two groups never share a slot, a publication, a spill
//! directory or a table, so their progress rows on a shard (keyed by source system, slot and
//! shard, see [`crate::pg::progress`]), their full-load records (keyed by table) and their
//! migration ids (one per slot and spill directory) cannot collide. [`peer_overlaps`] proves
//! it for configs written by hand too: `check` reports each overlap and `run` refuses to start.
//!
//! What a group split gives up: a source transaction that writes tables of two groups reaches a
//! shard as two transactions, one per group, applied at each group's own pace (per-table commit
//! order holds; cross-table atomicity on the shard does not while both lag). Foreign keys
//! between tables of two groups are not checked on the shards during the migration
//! (`session_replication_role = replica`), as with one daemon.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, TableMode, TableRule};
use crate::pg::catalog::{self, CatalogError, SourceTable};

/// Why no plan could be made, or a peer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--groups` is out of range for the table set.
    #[error("cannot split {tables} replicated table(s) into {groups} groups: use --groups 2..={tables} (a group owns whole tables)")]
    Groups {
        /// Requested groups.
        groups: usize,
        /// Replicated tables.
        tables: usize,
    },
    /// The base config is itself a group's config.
    #[error("{path} is the config of group {group} (it has a [group] section): plan from the base config the groups were made from")]
    AlreadyGroup {
        /// The config file.
        path: String,
        /// Its group name.
        group: String,
    },
    /// A derived name or address does not fit.
    #[error("{key}: {message}")]
    Derive {
        /// The config key, e.g. `admin.metrics`.
        key: &'static str,
        /// What is wrong and the fix.
        message: String,
    },
    /// The base text is not TOML (cannot happen for a text that parsed as a config).
    #[error("{path}: {message}")]
    Toml {
        /// The config file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// The table set could not be resolved.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A size query failed.
    #[error("source query failed (reading the size of {table}): {source}")]
    Size {
        /// The table.
        table: crate::pg::sql::TableName,
        /// The error.
        source: tokio_postgres::Error,
    },
    /// A peer config named in `[group] peers` cannot be loaded.
    #[error("[group] peers: {0}")]
    Peer(crate::config::ConfigError),
}

/// One replicated table with its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedTable {
    /// Source table.
    pub table: crate::pg::sql::TableName,
    /// Target table on every shard.
    pub target: crate::pg::sql::TableName,
    /// `sharded` or `broadcast`.
    pub mode: TableMode,
    /// The shard-key column (sharded tables).
    pub key: String,
    /// `key_immutable` of the table.
    pub key_immutable: bool,
    /// `pg_total_relation_size`, summed over a partitioned table's partitions, bytes.
    pub bytes: i64,
}

/// One group of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedGroup {
    /// `g0` … `g{K-1}`.
    pub name: String,
    /// Its config file name (in the output directory).
    pub file: String,
    /// Its slot.
    pub slot: String,
    /// Its publication.
    pub publication: String,
    /// Its spill directory, as written in its config (relative to the config file).
    pub spill_dir: PathBuf,
    /// `[admin] listen` (`""`: off).
    pub admin: String,
    /// `[admin] metrics` (`""`: off).
    pub metrics: String,
    /// Its tables, by name.
    pub tables: Vec<PlannedTable>,
    /// Sum of its tables' sizes, bytes.
    pub bytes: i64,
}

/// The whole plan: the groups and the files to write.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The groups.
    pub groups: Vec<PlannedGroup>,
    /// `(file name, text)` of every group config, in group order.
    #[serde(skip)]
    pub configs: Vec<(String, String)>,
    /// File name and text of the Helm values (`deploy/helm/reshard`).
    #[serde(skip)]
    pub helm_values: (String, String),
}

/// Splits `tables` into `k` groups, largest table first into the group with the fewest bytes
/// (then the fewest tables, then the lowest index): every group gets at least one table, and
/// the largest group exceeds the ideal share by less than the largest table. Groups keep their
/// tables in name order.
pub fn split(mut tables: Vec<PlannedTable>, k: usize) -> Result<Vec<Vec<PlannedTable>>, PlanError> {
    if k < 2 || k > tables.len() {
        return Err(PlanError::Groups {
            groups: k,
            tables: tables.len(),
        });
    }
    tables.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.table.cmp(&b.table)));
    let mut groups: Vec<Vec<PlannedTable>> = vec![Vec::new(); k];
    let mut load = vec![0i64; k];
    for t in tables {
        let g = (0..k)
            .min_by_key(|&g| (load[g], groups[g].len(), g))
            .unwrap_or(0);
        load[g] = load[g].saturating_add(t.bytes);
        groups[g].push(t);
    }
    for g in &mut groups {
        g.sort_by(|a, b| a.table.cmp(&b.table));
    }
    Ok(groups)
}

/// The replicated tables of `config` with their sizes (every refusal of the table set, e.g. a
/// missing configured table, is an error here as in `run`).
pub async fn table_sizes(client: &Client, config: &Config) -> Result<Vec<PlannedTable>, PlanError> {
    let tables = catalog::discover(client, config).await?;
    let mut out = Vec::with_capacity(tables.len());
    for SourceTable { rule, oid, .. } in tables {
        let bytes: i64 = client
            .query_one(
                "SELECT (pg_total_relation_size($1::oid::regclass) + coalesce(( \
                   SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree($1::oid::regclass) \
                   WHERE relid <> $1::oid::regclass), 0))::int8",
                &[&oid],
            )
            .await
            .map_err(|source| PlanError::Size {
                table: rule.source.clone(),
                source,
            })?
            .get(0);
        out.push(PlannedTable {
            table: rule.source,
            target: rule.target,
            mode: rule.mode,
            key: rule.key,
            key_immutable: rule.key_immutable,
            bytes,
        });
    }
    Ok(out)
}

/// Makes the plan: `k` groups of `config` (loaded from `path`, whose text is `text`) with the
/// tables and sizes `tables`. Pure: [`table_sizes`] reads the source.
pub fn make_plan(
    path: &Path,
    text: &str,
    config: &Config,
    tables: Vec<PlannedTable>,
    k: usize,
) -> Result<Plan, PlanError> {
    let origin = path.display().to_string();
    if let Some(g) = &config.group {
        return Err(PlanError::AlreadyGroup {
            path: origin,
            group: g.name.clone(),
        });
    }
    // The spill dir as written (relative paths stay relative: to the group's config file).
    let raw = Config::parse(text, &origin).map_err(|e| PlanError::Toml {
        path: origin.clone(),
        message: e.to_string(),
    })?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("reshard");
    let split = split(tables, k)?;
    let names: Vec<String> = (0..k).map(|i| format!("g{i}")).collect();
    let files: Vec<String> = names.iter().map(|n| format!("{stem}-{n}.toml")).collect();
    let mut groups = Vec::with_capacity(k);
    for (i, tables) in split.into_iter().enumerate() {
        let name = names[i].clone();
        let by = u16::try_from(i).unwrap_or(u16::MAX);
        groups.push(PlannedGroup {
            slot: suffixed("source.slot", &config.source.slot, &name)?,
            publication: suffixed("source.publication", &config.source.publication, &name)?,
            spill_dir: spill_dir_of(&raw.spill.dir, &name)?,
            admin: shift_port("admin.listen", &config.admin.listen, by)?,
            metrics: shift_port("admin.metrics", &config.admin.metrics, by)?,
            bytes: tables.iter().map(|t| t.bytes).sum(),
            file: files[i].clone(),
            name,
            tables,
        });
    }
    let mut configs = Vec::with_capacity(k);
    for (i, g) in groups.iter().enumerate() {
        let peers: Vec<&str> = files
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, f)| f.as_str())
            .collect();
        configs.push((
            g.file.clone(),
            group_config(text, &origin, config, g, &peers, k)?,
        ));
    }
    let helm_values = (
        format!("{stem}-helm-values.yaml"),
        helm_values(&groups, &configs),
    );
    Ok(Plan {
        groups,
        configs,
        helm_values,
    })
}

/// `base` + `_` + group, within PostgreSQL's 63-character names.
fn suffixed(key: &'static str, base: &str, group: &str) -> Result<String, PlanError> {
    let s = format!("{base}_{group}");
    if s.len() > 63 {
        return Err(PlanError::Derive {
            key,
            message: format!("{s:?} is longer than 63 characters; shorten {base:?}"),
        });
    }
    Ok(s)
}

/// The group's spill directory: the base directory's name with `-<group>` appended, beside it.
fn spill_dir_of(base: &Path, group: &str) -> Result<PathBuf, PlanError> {
    let name = match base.components().next_back() {
        Some(Component::Normal(n)) => n.to_string_lossy().into_owned(),
        _ => {
            return Err(PlanError::Derive {
                key: "spill.dir",
                message: format!(
                    "{} has no directory name to derive the groups' spill directories from; set [spill] dir = \"/var/lib/reshard/spill\" (or similar)",
                    base.display()
                ),
            })
        }
    };
    Ok(base.with_file_name(format!("{name}-{group}")))
}

/// `host:port` with the port moved up by `by` (`""` stays off).
fn shift_port(key: &'static str, addr: &str, by: u16) -> Result<String, PlanError> {
    if addr.trim().is_empty() {
        return Ok(String::new());
    }
    let bad = |message: String| PlanError::Derive { key, message };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad(format!("{addr:?} has no :port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("{addr:?} has no numeric port")))?;
    let port = port.checked_add(by).ok_or_else(|| {
        bad(format!(
            "port {port} + {by} is past 65535; choose a lower port"
        ))
    })?;
    Ok(format!("{host}:{port}"))
}

/// The group's config: the base text with its own slot, publication, spill dir, ports, its
/// tables and its `[group]`; everything else (comments, every other key) as written.
fn group_config(
    text: &str,
    origin: &str,
    base: &Config,
    g: &PlannedGroup,
    peers: &[&str],
    k: usize,
) -> Result<String, PlanError> {
    use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| PlanError::Toml {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
    doc["source"]["slot"] = value(g.slot.as_str());
    doc["source"]["publication"] = value(g.publication.as_str());
    doc["spill"]["dir"] = value(g.spill_dir.to_string_lossy().as_ref());
    doc["admin"]["listen"] = value(g.admin.as_str());
    doc["admin"]["metrics"] = value(g.metrics.as_str());
    doc.remove("tables");
    doc.remove("group");
    let mut tables = ArrayOfTables::new();
    for t in &g.tables {
        let mut row = Table::new();
        // The form `[[tables]]` reads back (quoted where needed).
        row["name"] = value(t.table.to_string());
        if t.target != t.table {
            row["target"] = value(t.target.to_string());
        }
        row["mode"] = value(t.mode.to_string());
        if t.mode == TableMode::Sharded {
            row["key"] = value(t.key.as_str());
            if t.key_immutable != base.routing.key_immutable {
                row["key_immutable"] = value(t.key_immutable);
            }
        }
        tables.push(row);
    }
    let mut group = Table::new();
    group["name"] = value(g.name.as_str());
    group["peers"] = value(peers.iter().copied().collect::<Array>());
    doc.insert("group", Item::Table(group));
    doc.insert("tables", Item::ArrayOfTables(tables));
    let header = format!(
        "# Group {name} of {k}, written by `reshard plan --groups {k}` from {origin}.\n\
         # It shares nothing with its peers: own slot, publication, spill directory and ports,\n\
         # and its own tables. Run it as an ordinary daemon: reshard run -c {file}\n\n",
        name = g.name,
        file = g.file,
    );
    let out = format!("{header}{doc}");
    // What is written must load as what was planned.
    Config::parse(&out, &g.file).map_err(|e| PlanError::Toml {
        path: g.file.clone(),
        message: e.to_string(),
    })?;
    Ok(out)
}

/// The Helm values of `deploy/helm/reshard` for these groups: one StatefulSet per group, every
/// config in the one ConfigMap. JSON strings are YAML scalars; each config is a literal block.
pub fn helm_values(groups: &[PlannedGroup], configs: &[(String, String)]) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut out = format!(
        "# Helm values for deploy/helm/reshard, written by `reshard plan --groups {}`.\n\
         # helm install reshard deploy/helm/reshard -f <this file> --set secret.existingSecret=<Secret with the URLs>\n\
         groups:\n",
        groups.len()
    );
    for g in groups {
        out.push_str(&format!(
            "  - name: {}\n    config: {}\n    spillDir: {}\n    metrics: {}\n    admin: {}\n",
            q(&g.name),
            q(&g.file),
            q(&g.spill_dir.to_string_lossy()),
            q(&g.metrics),
            q(&g.admin)
        ));
    }
    out.push_str("configs:\n");
    for (file, text) in configs {
        out.push_str(&format!("  {}: |\n", q(file)));
        for line in text.lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Replication slots and WAL senders on the source: K groups need K of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotHeadroom {
    /// `max_replication_slots`.
    pub max_slots: i64,
    /// Slots not yet used.
    pub free_slots: i64,
    /// `max_wal_senders`.
    pub max_senders: i64,
    /// WAL senders not in use now.
    pub free_senders: i64,
}

/// Reads [`SlotHeadroom`] from the source.
pub async fn slot_headroom(client: &Client) -> Result<SlotHeadroom, tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int8, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    current_setting('max_wal_senders')::int8, \
                    (SELECT count(*) FROM pg_stat_replication)",
            &[],
        )
        .await?;
    let (max_slots, used_slots, max_senders, used_senders): (i64, i64, i64, i64) =
        (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
    Ok(SlotHeadroom {
        max_slots,
        free_slots: max_slots - used_slots,
        max_senders,
        free_senders: max_senders - used_senders,
    })
}

/// One way two group configs overlap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    /// The peer's config file.
    pub peer: String,
    /// What both use: `table`, `target`, `slot`, `publication`, `spill_dir`, `shards`,
    /// `routing`, `port`.
    pub what: &'static str,
    /// The shared thing and what would collide.
    pub detail: String,
    /// `false`: a warning only (two groups on one host cannot bind the same port; in separate
    /// pods they can).
    pub fatal: bool,
}

/// A group config with its resolved replicated tables.
#[derive(Debug, Clone)]
pub struct GroupSide<'a> {
    /// The config file (for messages).
    pub file: String,
    /// The config.
    pub config: &'a Config,
    /// Its replicated tables (sources and targets).
    pub tables: Vec<TableRule>,
}

/// Everything `a` and its peer `b` share that two groups must not. Pure.
pub fn overlaps(a: &GroupSide<'_>, b: &GroupSide<'_>) -> Vec<Overlap> {
    let mut out = Vec::new();
    let mut push = |what, detail: String, fatal| {
        out.push(Overlap {
            peer: b.file.clone(),
            what,
            detail,
            fatal,
        })
    };
    let (ca, cb) = (a.config, b.config);
    let shards = ca.shard_names().join(", ");
    if ca.shard_names() != cb.shard_names() {
        push(
            "shards",
            format!(
                "{} has shards [{shards}] and {} has [{}]: groups of one migration route with the same shards in the same order",
                a.file,
                b.file,
                cb.shard_names().join(", ")
            ),
            true,
        );
    }
    if ca.routing.key != cb.routing.key || ca.routing.hash != cb.routing.hash {
        push(
            "routing",
            format!(
                "{} routes by {} ({:?}) and {} by {} ({:?}): groups of one migration route alike",
                a.file, ca.routing.key, ca.routing.hash, b.file, cb.routing.key, cb.routing.hash
            ),
            true,
        );
    }
    for t in &a.tables {
        if b.tables.iter().any(|u| u.source == t.source) {
            push(
                "table",
                format!(
                    "table {} is replicated by both {} and {}: its rows would be copied twice and its changes applied twice, and both would write its full-load records (reshard.fullload_chunks) on every shard; keep it in one group's [[tables]]",
                    t.source, a.file, b.file
                ),
                true,
            );
        } else if let Some(u) = b.tables.iter().find(|u| u.target == t.target) {
            push(
                "target",
                format!(
                    "target table {} is written on every shard by both {} (from {}) and {} (from {})",
                    t.target, a.file, t.source, b.file, u.source
                ),
                true,
            );
        }
    }
    if ca.source.slot == cb.source.slot {
        push(
            "slot",
            format!(
                "slot {} is used by both {} and {}: they would take turns on one slot, and their progress rows (reshard.progress: slot {}, shards [{shards}]) on every shard would collide; give each group its own [source] slot",
                ca.source.slot, a.file, b.file, ca.source.slot
            ),
            true,
        );
    }
    if ca.source.publication == cb.source.publication {
        push(
            "publication",
            format!(
                "publication {} is used by both {} and {}: give each group its own [source] publication",
                ca.source.publication, a.file, b.file
            ),
            true,
        );
    }
    if same_dir(&ca.spill.dir, &cb.spill.dir) {
        push(
            "spill_dir",
            format!(
                "spill directory {} is used by both {} and {}: give each group its own [spill] dir",
                ca.spill.dir.display(),
                a.file,
                b.file
            ),
            true,
        );
    }
    for (key, x, y) in [
        ("admin.listen", &ca.admin.listen, &cb.admin.listen),
        ("admin.metrics", &ca.admin.metrics, &cb.admin.metrics),
    ] {
        if !x.is_empty() && x == y {
            push(
                "port",
                format!(
                    "{key} {x} is the same in {} and {}: on one host the second cannot bind it (fine in separate pods)",
                    a.file, b.file
                ),
                false,
            );
        }
    }
    out
}

/// Whether two spill directories are one (canonical when they exist, else lexically).
fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| lexical(p));
    canon(a) == canon(b)
}

fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The overlaps of `config` (a group's, with `[group] peers`) with each of its peers, the table
/// sets resolved on the source through `client`. Empty without `[group]`. A peer that cannot be
/// loaded is an error naming it.
pub async fn peer_overlaps(
    client: &Client,
    config: &Config,
    file: &str,
) -> Result<Vec<Overlap>, PlanError> {
    let Some(group) = &config.group else {
        return Ok(Vec::new());
    };
    let rules = |set: catalog::TableSet| -> Vec<TableRule> {
        set.tables.into_iter().map(|t| t.rule).collect()
    };
    let me = GroupSide {
        file: file.to_owned(),
        config,
        tables: rules(catalog::resolve(client, config).await?),
    };
    let mut peers = BTreeMap::new();
    for p in &group.peers {
        let c = Config::load(p).map_err(PlanError::Peer)?;
        peers.insert(p.display().to_string(), c);
    }
    let mut out = Vec::new();
    for (f, c) in &peers {
        let side = GroupSide {
            file: f.clone(),
            config: c,
            tables: rules(catalog::resolve(client, c).await?),
        };
        out.extend(overlaps(&me, &side));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, bytes: i64, mode: TableMode) -> PlannedTable {
        PlannedTable {
            table: crate::pg::sql::TableName::new("public", name),
            target: crate::pg::sql::TableName::new("public", name),
            mode,
            key: "account_id".into(),
            key_immutable: false,
            bytes,
        }
    }

    fn base_text() -> String {
        "# the operator's comment stays\n[source]\nurl = \"postgres://reshard@db/ingest\"\nslot = \"mig\"\n\n[spill]\ndir = \"/var/lib/reshard/spill\"\n\n[admin]\nmetrics = \"0.0.0.0:9187\"\n\n[[shards]]\nname = \"s0\"\nurl = \"postgres://s0/app\"\n\n[[shards]]\nname = \"s1\"\nurl = \"postgres://s1/app\"\n\n[[tables]]\nname = \"old\"\nmode = \"skip\"\n".into()
    }

    #[test]
    fn split_balances_by_size_and_gives_every_group_a_table() {
        let tables = vec![
            t("a", 100, TableMode::Sharded),
            t("b", 60, TableMode::Sharded),
            t("c", 50, TableMode::Sharded),
            t("d", 10, TableMode::Broadcast),
        ];
        let g = split(tables, 2).unwrap();
        let names = |g: &[PlannedTable]| g.iter().map(|t| t.table.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&g[0]), ["public.a", "public.d"]);
        assert_eq!(names(&g[1]), ["public.b", "public.c"]);
        // Zero sizes (never analyzed, empty): round robin, not everything in g0.
        let zero: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| t(n, 0, TableMode::Sharded))
            .collect();
        let g = split(zero, 3).unwrap();
        assert!(g.iter().all(|g| g.len() == 1), "{g:?}");
    }

    #[test]
    fn split_refuses_more_groups_than_tables() {
        let e = split(vec![t("a", 1, TableMode::Sharded)], 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--groups 2..=1") || e.contains("1 replicated table"),
            "{e}"
        );
        assert!(split(
            vec![t("a", 1, TableMode::Sharded), t("b", 1, TableMode::Sharded)],
            1
        )
        .is_err());
    }

    #[test]
    fn every_table_lands_in_exactly_one_group_config_and_groups_share_nothing() {
        let text = base_text();
        let path = Path::new("/etc/reshard/reshard.toml");
        let base = Config::parse(&text, "reshard.toml").unwrap();
        let tables = vec![
            t("events", 500, TableMode::Sharded),
            t("invoices", 300, TableMode::Sharded),
            t("accounts", 200, TableMode::Sharded),
            t("plans", 5, TableMode::Broadcast),
        ];
        let plan = make_plan(path, &text, &base, tables.clone(), 2).unwrap();
        assert_eq!(plan.configs.len(), 2);
        let loaded: Vec<Config> = plan
            .configs
            .iter()
            .map(|(f, text)| Config::parse(text, f).unwrap())
            .collect();
        // Each table in exactly one group's [[tables]], with its mode.
        for want in &tables {
            let owners: Vec<_> = loaded
                .iter()
                .filter(|c| {
                    c.table_rules()
                        .iter()
                        .any(|r| r.source == want.table && r.mode == want.mode)
                })
                .collect();
            assert_eq!(
                owners.len(),
                1,
                "{} is in {} groups",
                want.table,
                owners.len()
            );
        }
        let (a, b) = (&loaded[0], &loaded[1]);
        assert_eq!(
            (a.source.slot.as_str(), b.source.slot.as_str()),
            ("mig_g0", "mig_g1")
        );
        assert_eq!(a.source.publication, "reshard_g0");
        assert_eq!(a.spill.dir, PathBuf::from("/var/lib/reshard/spill-g0"));
        assert_eq!(b.spill.dir, PathBuf::from("/var/lib/reshard/spill-g1"));
        assert_eq!(
            (a.admin.metrics.as_str(), b.admin.metrics.as_str()),
            ("0.0.0.0:9187", "0.0.0.0:9188")
        );
        assert_eq!(
            (a.admin.listen.as_str(), b.admin.listen.as_str()),
            ("127.0.0.1:6433", "127.0.0.1:6434")
        );
        assert_eq!(
            a.group.as_ref().unwrap().peers,
            [PathBuf::from("reshard-g1.toml")]
        );
        assert_eq!(b.group.as_ref().unwrap().name, "g1");
        assert_eq!(a.shard_names(), base.shard_names());
        assert!(plan.configs[0].1.contains("# the operator's comment stays"));
        // The groups' configs overlap in nothing.
        fn side<'c>(f: &str, c: &'c Config) -> GroupSide<'c> {
            GroupSide {
                file: f.into(),
                config: c,
                tables: c.table_rules(),
            }
        }
        let (a, b) = (&loaded[0], &loaded[1]);
        assert_eq!(overlaps(&side("g0", a), &side("g1", b)), vec![]);
        // A group config is not a base to plan from.
        let e = make_plan(path, &plan.configs[0].1, a, tables, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[group]"), "{e}");
    }

    #[test]
    fn overlaps_name_the_shared_table_slot_spill_dir_and_progress_rows() {
        let text = base_text();
        let a = Config::parse(&text, "a.toml").unwrap();
        let mut b = a.clone();
        b.admin.metrics = String::new();
        let rules = |names: &[&str]| -> Vec<TableRule> {
            names
                .iter()
                .map(|n| TableRule {
                    source: crate::pg::sql::TableName::new("public", *n),
                    target: crate::pg::sql::TableName::new("public", *n),
                    mode: TableMode::Sharded,
                    key: "account_id".into(),
                    key_immutable: false,
                })
                .collect()
        };
        let found = overlaps(
            &GroupSide {
                file: "a.toml".into(),
                config: &a,
                tables: rules(&["events", "plans"]),
            },
            &GroupSide {
                file: "b.toml".into(),
                config: &b,
                tables: rules(&["events", "users"]),
            },
        );
        let what: Vec<_> = found.iter().map(|o| o.what).collect();
        assert_eq!(
            what,
            ["table", "slot", "publication", "spill_dir", "port"],
            "{found:#?}"
        );
        let text = |w: &str| found.iter().find(|o| o.what == w).unwrap().detail.clone();
        assert!(text("table").contains("public.events"), "{}", text("table"));
        assert!(
            text("slot").contains("reshard.progress: slot mig, shards [s0, s1]"),
            "{}",
            text("slot")
        );
        assert!(
            text("spill_dir").contains("/var/lib/reshard/spill"),
            "{}",
            text("spill_dir")
        );
        assert!(found.iter().filter(|o| o.what == "port").all(|o| !o.fatal));
        // Different shards are an overlap of another kind: the groups would route differently.
        b.shards.pop();
        let found = overlaps(
            &GroupSide {
                file: "a.toml".into(),
                config: &a,
                tables: vec![],
            },
            &GroupSide {
                file: "b.toml".into(),
                config: &b,
                tables: vec![],
            },
        );
        assert!(found.iter().any(|o| o.what == "shards"), "{found:#?}");
    }

    /// `deploy/helm/reshard/ci/plan-values.yaml` is what `plan` writes for a Kubernetes-ready
    /// base, so the chart's CI render (`deploy/helm/check.py`) renders today's output.
    /// `RESHARD_BLESS=1` rewrites the file.
    #[test]
    fn helm_values_fixture_is_what_plan_writes() {
        let text = base_text();
        let base = Config::parse(&text, "reshard.toml").unwrap();
        let tables = vec![
            t("events", 500, TableMode::Sharded),
            t("accounts", 200, TableMode::Sharded),
            t("plans", 5, TableMode::Broadcast),
        ];
        let plan = make_plan(Path::new("reshard.toml"), &text, &base, tables, 2).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/helm/reshard/ci/plan-values.yaml");
        if std::env::var_os("RESHARD_BLESS").is_some() {
            std::fs::write(&path, &plan.helm_values.1).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            committed,
            plan.helm_values.1,
            "{} is not what `reshard plan` writes; rewrite it with RESHARD_BLESS=1 cargo test -p reshard-engine helm_values_fixture",
            path.display()
        );
    }

    /// Secrets stay out of the written files: `${VAR}` is kept as written, never expanded.
    #[test]
    fn group_configs_keep_env_references_not_their_values() {
        std::env::set_var("RESHARD_TEST_PLAN_PW", "s3cret-value");
        let text = base_text().replace(
            "postgres://reshard@db/ingest",
            "postgres://reshard:${RESHARD_TEST_PLAN_PW}@db/ingest",
        );
        let base = Config::parse(&text, "reshard.toml").unwrap();
        assert!(base.source.url.contains("s3cret-value"));
        let tables = vec![t("a", 1, TableMode::Sharded), t("b", 1, TableMode::Sharded)];
        let plan = make_plan(Path::new("reshard.toml"), &text, &base, tables, 2).unwrap();
        for (f, text) in plan.configs.iter().chain([&plan.helm_values]) {
            assert!(text.contains("${RESHARD_TEST_PLAN_PW}"), "{f}:\n{text}");
            assert!(
                !text.contains("s3cret-value"),
                "{f} holds the secret:\n{text}"
            );
        }
    }

    #[test]
    fn derived_names_and_ports() {
        assert_eq!(
            shift_port("k", "127.0.0.1:6433", 2).unwrap(),
            "127.0.0.1:6435"
        );
        assert_eq!(shift_port("k", "[::]:9187", 1).unwrap(), "[::]:9188");
        assert_eq!(shift_port("k", "", 3).unwrap(), "");
        assert!(shift_port("k", "0.0.0.0:65535", 1).is_err());
        assert_eq!(
            spill_dir_of(Path::new("./reshard-data"), "g1").unwrap(),
            PathBuf::from("./reshard-data-g1")
        );
        assert_eq!(
            spill_dir_of(Path::new("/var/x/"), "g0").unwrap(),
            PathBuf::from("/var/x-g0")
        );
        assert!(spill_dir_of(Path::new("/"), "g0").is_err());
        assert!(suffixed("source.slot", &"s".repeat(61), "g1").is_err());
    }
}
