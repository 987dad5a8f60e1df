//! Error classification shared by every stage.
//!
//! Following Materialize's `TransientError`/`DefiniteError` split, every engine error says what
//! the caller must do: retry with backoff (transient: connection lost, serialization failure,
//! shard restarting) or stop and report (definite: missing table, type mismatch, bad config).

/// What the caller must do about an error.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff; the condition may clear by itself.
    Transient,
    /// Stop (this shard, or the run) and report; retrying will not help.
    Definite,
}

impl ErrorClass {
    /// Lower-case label used in logs and metrics (`transient` / `definite`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Definite => "definite",
        }
    }
}

/// Errors that know their class.
pub trait Classify {
    /// Transient or definite.
    fn class(&self) -> ErrorClass;
}

/// The class of a PostgreSQL error by SQLSTATE: connection failures (08), serialization and
/// deadlock (40001, 40P01), operator intervention and shutdown (57P01–57P03), lock not available
/// (55P03), insufficient resources (53) and system errors (58) are transient; everything else
/// (syntax, undefined table/column, data exceptions, constraint violations, privileges) is
/// definite.
pub fn class_of_sqlstate(code: &str) -> ErrorClass {
    if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03" | "55006"
        )
    {
        ErrorClass::Transient
    } else {
        ErrorClass::Definite
    }
}

/// The class of a `tokio_postgres` error: by SQLSTATE when the server sent one, transient when
/// the connection itself failed or closed.
pub fn class_of_pg(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code() {
        Some(code) => class_of_sqlstate(code.code()),
        None => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(class_of_sqlstate("08006"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("40001"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("57P01"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("42P01"), ErrorClass::Definite);
        assert_eq!(class_of_sqlstate("23505"), ErrorClass::Definite);
    }
}
