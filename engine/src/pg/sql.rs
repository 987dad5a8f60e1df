//! How reshard writes names and values into SQL text, defined once: literals, identifiers,
//! qualified table names, and the [`TableName`] type that carries a table's schema and name.
//!
//! In: names as `pg_class` holds them (schema and name apart), names as the config spells them
//! (`t` means `public.t`; SQL double quotes for a part holding a dot, see [`TableName::parse`])
//! and values as text. Out: SQL text that PostgreSQL reads back as
//! exactly that name or value, whatever the characters (quotes, backslashes, upper case).
//! See <https://www.postgresql.org/docs/current/sql-syntax-lexical.html>.
//!
//! Two identifier forms, on purpose: [`quote_ident`] always quotes (SQL the operator copies and
//! pastes, where a name must never be read as a keyword); [`crate::event::quote_ident`] quotes
//! only where needed (`public.events`, `"Sales"."Q1"`), for readable messages and the SQL the
//! stages generate. Both are read back as the same name.

use std::fmt;

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

    /// The table that a name in the config (`[[tables]] name`, `target`) or on the command line
    /// spells: `schema.table`, or `table` (schema `public`).
    ///
    /// A part in SQL double quotes is taken as written, `""` being one quote, so it may hold
    /// dots, quotes and spaces at its ends: `"sales.eu".orders`, `public." padded "`. A part
    /// without quotes is trimmed and otherwise taken as written, case kept, the way PostgreSQL
    /// stores it (`Sales.Q1` is `"Sales"."Q1"`), as config names have always been read. The
    /// [`Display`](fmt::Display) form parses back to the same name.
    ///
    /// Refused, never guessed: more than two parts (`a.b.c`: which dot separates the schema?),
    /// an empty part, a quote that does not close or text after it, and an unquoted part with
    /// upper case beside a quoted one (`Sales."Q1"`: SQL would read `sales`, a config name
    /// keeps the case).
    pub fn parse(text: &str) -> Result<TableName, TableNameError> {
        let parts = split_parts(text)?;
        let any_quoted = parts.iter().any(|(_, quoted)| *quoted);
        if any_quoted {
            if let Some((part, _)) = parts
                .iter()
                .find(|(p, quoted)| !quoted && p.chars().any(char::is_uppercase))
            {
                return Err(TableNameError::AmbiguousCase {
                    name: text.to_owned(),
                    part: part.clone(),
                    lower: part.to_lowercase(),
                    fix: join_quoted(&parts),
                });
            }
        }
        let mut names = parts.into_iter().map(|(p, _)| p);
        match (names.next(), names.next(), names.next()) {
            (Some(table), None, _) => Ok(TableName::new("public", table)),
            (Some(schema), Some(table), None) => Ok(TableName::new(schema, table)),
            _ => Err(TableNameError::TooManyParts {
                name: text.to_owned(),
                example: example_fix(text),
            }),
        }
    }

    /// The table as a TOML string for a `[[tables]] name = …` line that an error message
    /// proposes: its [`Display`](fmt::Display) form, which [`TableName::parse`] reads back, in
    /// `'…'` when it holds a double quote (`'"sales.eu".orders'`), else in `"…"`.
    pub fn toml_value(&self) -> String {
        let s = self.to_string();
        if !s.contains('"') {
            format!("\"{s}\"")
        } else if !s.contains('\'') {
            format!("'{s}'")
        } else {
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        }
    }

    /// Both parts always quoted: `"public"."events"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl serde::Serialize for TableName {
    /// As its [`Display`](fmt::Display) form, which [`TableName::parse`] reads back.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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

/// Why a table name (from the config or the command line) cannot be read; each names the
/// text and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableNameError {
    /// More than one dot outside quotes.
    #[error("{name:?} has more than two dot-separated parts, so it is not clear which dot separates the schema from the table; a name is `table` or `schema.table`: write the part that holds a dot in SQL double quotes, e.g. {example}")]
    TooManyParts {
        /// The text.
        name: String,
        /// The ways to write it.
        example: String,
    },
    /// An empty part (`a.`, `.b`, `""`).
    #[error("{name:?} has an empty schema or table name; write `table` or `schema.table`")]
    Empty {
        /// The text.
        name: String,
    },
    /// A quote that does not close, or text after a closing quote.
    #[error("{name:?} is not a table name: a double-quoted part must be closed and followed by `.` or the end (write a quote inside it as \"\"), e.g. '\"sales.eu\".orders'")]
    Malformed {
        /// The text.
        name: String,
    },
    /// Unquoted upper case beside quotes (SQL would fold it, the config keeps it).
    #[error("{name:?}: the unquoted part {part:?} has upper case beside a quoted part; SQL would read it as {lower:?}, a config name without quotes keeps its case, so quote it to say which: {fix}")]
    AmbiguousCase {
        /// The text.
        name: String,
        /// The unquoted part.
        part: String,
        /// SQL's reading of it.
        lower: String,
        /// Every part quoted, case kept.
        fix: String,
    },
}

/// The dot-separated parts of `text` with whether each was quoted.
fn split_parts(text: &str) -> Result<Vec<(String, bool)>, TableNameError> {
    let malformed = || TableNameError::Malformed {
        name: text.to_owned(),
    };
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let part = if chars.next_if_eq(&'"').is_some() {
            let mut part = String::new();
            loop {
                match chars.next().ok_or_else(malformed)? {
                    '"' if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    '"' => break,
                    c => part.push(c),
                }
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            (part, true)
        } else {
            let mut part = String::new();
            while let Some(c) = chars.next_if(|&c| c != '.' && c != '"') {
                part.push(c);
            }
            (part.trim().to_owned(), false)
        };
        if part.0.is_empty() {
            return Err(TableNameError::Empty {
                name: text.to_owned(),
            });
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(_) => return Err(malformed()),
        }
    }
}

/// Every part of `parts` in quotes, joined by dots.
fn join_quoted(parts: &[(String, bool)]) -> String {
    let q: Vec<String> = parts.iter().map(|(p, _)| quote_ident(p)).collect();
    format!("'{}'", q.join("."))
}

/// For `a.b.c`: `'"a.b".c' (schema "a.b") or 'a."b.c"' (table "b.c" in schema a)`.
fn example_fix(text: &str) -> String {
    let parts: Vec<&str> = text.trim().split('.').collect();
    match parts.as_slice() {
        [a, b, c] if !text.contains('"') => {
            let (a, b, c) = (a.trim(), b.trim(), c.trim());
            format!(
                "'{}.{c}' (schema \"{a}.{b}\") or '{a}.{}' (table \"{b}.{c}\" in schema {a})",
                quote_ident(&format!("{a}.{b}")),
                quote_ident(&format!("{b}.{c}"))
            )
        }
        _ => "'\"sales.eu\".orders' or 'public.\"order.items\"'".to_owned(),
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
        assert_eq!(TableName::new("S", "T\"x").quoted(), "\"S\".\"T\"\"x\"");
    }

    fn parse(s: &str) -> TableName {
        TableName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn table_names() {
        assert_eq!(parse("t"), TableName::new("public", "t"));
        assert_eq!(parse("s.t"), TableName::new("s", "t"));
        let t = parse(" Sales.Q1 ");
        assert_eq!(t, TableName::new("Sales", "Q1"));
        assert_eq!(t.to_string(), "\"Sales\".\"Q1\"");
        assert_eq!(parse("events").to_string(), "public.events");
        assert_eq!(parse("events").quoted(), "\"public\".\"events\"");
        assert_eq!(parse("my table"), TableName::new("public", "my table"));
    }

    #[test]
    fn quoted_parts_keep_dots_quotes_and_spaces() {
        assert_eq!(
            parse("\"sales.eu\".orders"),
            TableName::new("sales.eu", "orders")
        );
        assert_eq!(
            parse("public.\"order.items\""),
            TableName::new("public", "order.items")
        );
        assert_eq!(parse("\" padded \""), TableName::new("public", " padded "));
        assert_eq!(
            parse(" \"Sales\" . \"Invoice \"\"No\"\"\" "),
            TableName::new("Sales", "Invoice \"No\"")
        );
        assert_eq!(parse("\"a.b\".\"c.d\""), TableName::new("a.b", "c.d"));
        // The Display form reads back as the same name, whatever the characters.
        for t in [
            TableName::new("sales.eu", "orders"),
            TableName::new("public", " padded "),
            TableName::new("Sales", "Q\"1"),
            TableName::new("select", "t"),
            TableName::new("a b", "c.d"),
        ] {
            assert_eq!(parse(&t.to_string()), t, "{t}");
            assert_eq!(parse(&t.quoted()), t, "{}", t.quoted());
        }
    }

    #[test]
    fn ambiguous_names_are_refused_with_the_way_to_write_them() {
        let e = TableName::parse("a.b.c").unwrap_err();
        assert!(matches!(e, TableNameError::TooManyParts { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("'\"a.b\".c'") && m.contains("'a.\"b.c\"'"),
            "{m}"
        );
        for bad in [
            "a.",
            ".b",
            "\"\"",
            "",
            "\"a",
            "\"a\"b",
            "a\"b\"",
            "\"a\".\"b\".\"c\"",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let e = TableName::parse("Sales.\"Q1\"").unwrap_err().to_string();
        assert!(e.contains("'\"Sales\".\"Q1\"'"), "{e}");
        assert_eq!(parse("sales.\"Q1\""), TableName::new("sales", "Q1"));
    }

    #[test]
    fn toml_values_read_back_as_the_table() {
        for t in [
            TableName::new("public", "events"),
            TableName::new("sales.eu", "orders"),
            TableName::new("public", " padded "),
            TableName::new("it's", "a \"b\" \\c"),
        ] {
            let doc: toml::Value = toml::from_str(&format!("name = {}", t.toml_value())).unwrap();
            assert_eq!(
                parse(doc["name"].as_str().unwrap()),
                t,
                "{}",
                t.toml_value()
            );
        }
    }
}
