//! SQL text of the verify queries. Pure string building, unit-tested without PostgreSQL.
//!
//! Every value is compared in its text form, inside PostgreSQL: a row is rendered as
//! `ROW(c1::text, c2::text, …)::text` over the columns both sides replicate (source order,
//! generated columns left out), hashed with `md5`. Per account, the aggregate is `count(*)`
//! and the sum of the first 64 bits of each row's md5 as a signed bigint (order-independent,
//! summed as `numeric` so it cannot overflow). Streams are ordered by the text form of their
//! key under `COLLATE "C"` (byte order, which is Rust's `str` order) with `NULLS FIRST`
//! (which is `Option`'s order), so reshard can merge-join them.

use crate::pg::conn::{quote_ident, quote_literal};
use crate::pg::sql::TableName;

/// `md5(ROW(c1::text, …)::text)`.
pub fn row_md5(columns: &[String]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .map(|c| format!("{}::text", quote_ident(c)))
        .collect();
    format!("md5(ROW({})::text)", cols.join(", "))
}

/// The 64-bit row hash as `bigint`.
pub fn row_hash64(columns: &[String]) -> String {
    format!(
        "('x' || substr({}, 1, 16))::bit(64)::bigint",
        row_md5(columns)
    )
}

/// `(<expr>) COLLATE "C" NULLS FIRST` for each column's text form.
fn order_by(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("({}::text) COLLATE \"C\" NULLS FIRST", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"key" = ANY(ARRAY['a', 'b']::<type>[])`, over the accounts that are values of the key's
/// type: an account that is not (`5` for a uuid key, `abc` for a bigint one) holds no rows of
/// that table, and casting it would fail the whole query (22P02). `false` when none is.
pub fn key_in(key: &str, key_type: &str, accounts: &[String]) -> String {
    let lits: Vec<String> = accounts
        .iter()
        .filter(|a| account_fits_type(a, key_type))
        .map(|a| quote_literal(a))
        .collect();
    if lits.is_empty() {
        return "false".into();
    }
    format!(
        "{} = ANY(ARRAY[{}]::{}[])",
        quote_ident(key),
        lits.join(", "),
        key_type
    )
}

/// Whether `account` can be a value of `key_type` (`format_type` text) as PostgreSQL reads
/// it: checked for the integer types and uuid; any text for every other type.
pub(super) fn account_fits_type(account: &str, key_type: &str) -> bool {
    let a = account.trim();
    match key_type {
        "smallint" => a.parse::<i16>().is_ok(),
        "integer" => a.parse::<i32>().is_ok(),
        "bigint" => a.parse::<i64>().is_ok(),
        "uuid" => {
            // 32 hex digits, optionally in braces and with hyphens (uuid_in's forms).
            let inner = a
                .strip_prefix('{')
                .and_then(|x| x.strip_suffix('}'))
                .unwrap_or(a);
            let hex: Vec<char> = inner.chars().filter(|c| *c != '-').collect();
            hex.len() == 32 && hex.iter().all(char::is_ascii_hexdigit)
        }
        _ => true,
    }
}

/// How the source side computes a row's shard (hash = postgres): a hash-partitioned helper
/// table of the key's type with `MODULUS shards`.
#[derive(Debug, Clone)]
pub struct HashRoute {
    /// The helper table (a temporary partitioned table), as a regclass literal's text.
    pub helper: String,
    /// Number of shards (the modulus).
    pub shards: usize,
}

impl HashRoute {
    /// `CASE WHEN satisfies_hash_partition(…, 0, k) THEN 0 … ELSE N-1 END` over expression `k`.
    pub fn shard_expr(&self, k: &str) -> String {
        if self.shards <= 1 {
            return "0".into();
        }
        let mut s = String::from("CASE");
        for r in 0..self.shards - 1 {
            s.push_str(&format!(
                " WHEN satisfies_hash_partition({}::regclass, {}, {r}, {k}) THEN {r}",
                quote_literal(&self.helper),
                self.shards
            ));
        }
        s.push_str(&format!(" ELSE {} END", self.shards - 1));
        s
    }

    /// Whether expression `k` routes to one of `shards` (remainders): one
    /// `satisfies_hash_partition` per shard, cheaper per row than the row's md5 it spares.
    pub fn routes_to(&self, k: &str, shards: &[usize]) -> String {
        if shards.is_empty() {
            return "false".into();
        }
        let any: Vec<String> = shards
            .iter()
            .map(|r| {
                format!(
                    "satisfies_hash_partition({}::regclass, {}, {r}, {k})",
                    quote_literal(&self.helper),
                    self.shards
                )
            })
            .collect();
        format!("({})", any.join(" OR "))
    }

    /// `CREATE TEMP TABLE` of the helper for a key of type `key_type`.
    pub fn create_sql(&self, key_type: &str) -> String {
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} (k {key_type}) PARTITION BY HASH (k)",
            quote_ident(&self.helper)
        )
    }
}

/// Per-account aggregates of a sharded table, ordered by account:
/// `account_text, count, sum_text[, shard]`.
pub fn account_aggregates(
    table: &TableName,
    key: &str,
    columns: &[String],
    filter: Option<&str>,
    route: Option<&HashRoute>,
) -> String {
    let qkey = quote_ident(key);
    let shard = route
        .map(|r| format!(", {}", r.shard_expr("k")))
        .unwrap_or_default();
    format!(
        "SELECT k::text, n, s::text{shard} FROM (\
           SELECT {qkey} AS k, count(*) AS n, sum({}) AS s FROM {} \
           WHERE {qkey} IS NOT NULL{} GROUP BY {qkey}) a \
         ORDER BY (k::text) COLLATE \"C\"",
        row_hash64(columns),
        table.quoted(),
        filter.map(|f| format!(" AND {f}")).unwrap_or_default(),
    )
}

/// Whole-table aggregate: `count, sum_text`.
pub fn table_aggregate(table: &TableName, columns: &[String]) -> String {
    format!(
        "SELECT count(*), coalesce(sum({}), 0)::text FROM {}",
        row_hash64(columns),
        table.quoted()
    )
}

/// Rows with their md5, ordered by `order` columns (account first for sharded tables, then the
/// row key): `order_text…, md5`.
pub fn row_hashes(
    table: &TableName,
    order: &[String],
    columns: &[String],
    filter: Option<&str>,
) -> String {
    let sel: Vec<String> = order
        .iter()
        .map(|c| format!("{}::text", quote_ident(c)))
        .collect();
    format!(
        "SELECT {}, {} FROM {}{} ORDER BY {}",
        sel.join(", "),
        row_md5(columns),
        table.quoted(),
        filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
        order_by(order)
    )
}

/// `N` random accounts (with their shard when `route` is given).
pub fn sample_accounts(table: &TableName, key: &str, n: u64, route: Option<&HashRoute>) -> String {
    let qkey = quote_ident(key);
    let shard = route
        .map(|r| format!(", {}", r.shard_expr("k")))
        .unwrap_or_default();
    format!(
        "SELECT k::text{shard} FROM (SELECT DISTINCT {qkey} AS k FROM {} WHERE {qkey} IS NOT NULL) a \
         ORDER BY random() LIMIT {n}",
        table.quoted()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_are_ordered_bytewise() {
        let sql = account_aggregates(
            &TableName::new("public", "events"),
            "account_id",
            &["account_id".into(), "id".into()],
            None,
            Some(&HashRoute {
                helper: "reshard_route_0".into(),
                shards: 3,
            }),
        );
        assert!(sql.contains("ORDER BY (k::text) COLLATE \"C\""), "{sql}");
        assert!(
            sql.contains("md5(ROW(\"account_id\"::text, \"id\"::text)::text)"),
            "{sql}"
        );
        assert!(
            sql.contains("satisfies_hash_partition('reshard_route_0'::regclass, 3, 1, k) THEN 1"),
            "{sql}"
        );
        assert!(sql.contains("ELSE 2 END"), "{sql}");
        assert!(sql.contains("FROM \"public\".\"events\""), "{sql}");
    }

    #[test]
    fn a_shard_subset_is_one_hash_test_per_shard() {
        let r = HashRoute {
            helper: "h".into(),
            shards: 4,
        };
        assert_eq!(
            r.routes_to("\"account_id\"", &[1, 3]),
            "(satisfies_hash_partition('h'::regclass, 4, 1, \"account_id\") OR \
             satisfies_hash_partition('h'::regclass, 4, 3, \"account_id\"))"
        );
        assert_eq!(r.routes_to("k", &[]), "false");
    }

    #[test]
    fn one_shard_needs_no_hash() {
        let r = HashRoute {
            helper: "h".into(),
            shards: 1,
        };
        assert_eq!(r.shard_expr("k"), "0");
    }

    #[test]
    fn account_filter_is_quoted() {
        let f = key_in("account_id", "text", &["1".into(), "2'x".into()]);
        assert_eq!(f, "\"account_id\" = ANY(ARRAY['1', '2''x']::text[])");
    }

    #[test]
    fn account_filter_leaves_out_accounts_that_are_not_values_of_the_key_type() {
        let accounts: Vec<String> = ["5", "8", "0b6f2a4e-1c1d-4c8e-9f00-3a7d2c1b9e11"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            key_in("k", "uuid", &accounts),
            "\"k\" = ANY(ARRAY['0b6f2a4e-1c1d-4c8e-9f00-3a7d2c1b9e11']::uuid[])"
        );
        assert_eq!(
            key_in("k", "bigint", &accounts),
            "\"k\" = ANY(ARRAY['5', '8']::bigint[])"
        );
        assert_eq!(key_in("k", "smallint", &["70000".into()]), "false");
        assert_eq!(key_in("k", "uuid", &["5".into()]), "false");
    }

    #[test]
    fn row_hashes_order_nulls_first() {
        let sql = row_hashes(
            &TableName::new("public", "t"),
            &["a".into()],
            &["a".into(), "b".into()],
            Some("x"),
        );
        assert!(
            sql.ends_with("ORDER BY (\"a\"::text) COLLATE \"C\" NULLS FIRST"),
            "{sql}"
        );
        assert!(sql.contains(" WHERE x "), "{sql}");
    }
}
