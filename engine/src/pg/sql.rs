//! How reshard writes names and values into SQL text, defined once: literals, identifiers,
//! qualified table names, and the [`TableName`] type that carries a table's schema and name.
//!
//! In: names as the config and `pg_class` spell them (unquoted; `t` means `public.t`, see
//! [`crate::config::qualify`]) and values as text. Out: SQL text that PostgreSQL reads back as
//! exactly that name or value, whatever the characters (quotes, backslashes, upper case).
//! See <https://www.postgresql.org/docs/current/sql-syntax-lexical.html>.
//!
//! Two identifier forms, on purpose: [`quote_ident`] always quotes (SQL the operator copies and
//! pastes, where a name must never be read as a keyword); [`crate::event::quote_ident`] quotes
//! only where needed (`public.events`, `"Sales"."Q1"`), for readable messages and the SQL the
//! stages generate. Both are read back as the same name.

use std::fmt;

use crate::config::qualify;
use crate::event::quote_ident as quote_ident_if_needed;

/// `'text'` as an SQL string literal (E'' form when it contains a backslash).
pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// `"ident"` quoted as an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` (unquoted, as in the config; `t` is `public.t`) as a quoted qualified name.
pub fn quote_qualified(name: &str) -> String {
    let (schema, table) = split_name(name);
    format!("{}.{}", quote_ident(&schema), quote_ident(&table))
}

/// `(schema, table)` of `schema.table` (`t` is `public.t`).
pub fn split_name(name: &str) -> (String, String) {
    let t = TableName::parse(name);
    (t.schema, t.name)
}

/// A schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
}

impl TableName {
    /// `schema.name` from its parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The table of `schema.table` as the config spells it (`t` is `public.t`).
    pub fn parse(name: &str) -> TableName {
        let q = qualify(name);
        match q.split_once('.') {
            Some((s, t)) => TableName::new(s, t),
            None => TableName::new("public", q),
        }
    }

    /// Both parts always quoted: `"public"."events"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    /// Quoted where needed: `public.events`, `"Sales"."Q1"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident_if_needed(&self.schema),
            quote_ident_if_needed(&self.name)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_qualified("public.t"), "\"public\".\"t\"");
        assert_eq!(quote_qualified("t"), "\"public\".\"t\"");
        assert_eq!(quote_qualified("S.T\"x"), "\"S\".\"T\"\"x\"");
    }

    #[test]
    fn table_names() {
        assert_eq!(split_name("t"), ("public".into(), "t".into()));
        assert_eq!(split_name("s.t"), ("s".into(), "t".into()));
        let t = TableName::parse(" Sales.Q1 ");
        assert_eq!(t, TableName::new("Sales", "Q1"));
        assert_eq!(t.to_string(), "\"Sales\".\"Q1\"");
        assert_eq!(TableName::parse("events").to_string(), "public.events");
        assert_eq!(TableName::parse("events").quoted(), "\"public\".\"events\"");
    }
}
