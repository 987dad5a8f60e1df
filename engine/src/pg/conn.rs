//! Plain SQL connections for the operator commands (check, status, verify, cutover).
//!
//! In: a libpq URL or key=value string. Out: a connected `tokio_postgres::Client` whose
//! connection task runs in the background. This is the ONE place the operator commands open
//! connections; it goes through the replication client's [`ConnConfig`] so that `.pgpass`,
//! `PGPASSWORD`, `sslmode` and the connect timeout behave as in `reshard run`.
//!
//! [`normalize_session`] pins every setting that changes the text form of a value
//! (<https://www.postgresql.org/docs/current/runtime-config-client.html#RUNTIME-CONFIG-CLIENT-FORMAT>),
//! so that a row rendered as text on the source and on a shard compares equal byte for byte.

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::{ConnConfig, SourceError};

/// Run by [`ConnConfig::connect_sql`] on every SQL session it opens, so that what reshard
/// commits on a shard (or the source) is durable when answered: with
/// `synchronous_commit = off` (common on migration targets) the server answers COMMIT before
/// its WAL is written, and a crash of it loses acknowledged commits: an apply group with its
/// progress row after the spill log released it, or a full-load chunk with its record after
/// the load counted it. `local` waits for the local WAL flush only; a stronger setting (`on`
/// with synchronous standbys, `remote_apply`) is kept. Returns a row when it changed the
/// setting.
pub const DURABLE_COMMITS_SQL: &str = "SELECT set_config('synchronous_commit', 'local', false) \
     WHERE current_setting('synchronous_commit') = 'off'";

/// Run by [`ConnConfig::connect_sql`] on every SQL session it opens and by
/// [`crate::source::ReplicationClient::connect`] on every replication connection, so that a
/// timeout a DBA set for the role, the database or the server (`ALTER ROLE … SET
/// statement_timeout = '30s'`) never cuts a reshard session short: a full-load COPY or an
/// applier's merge of a large transaction runs longer than any such limit, verify's and the
/// copy workers' snapshots sit idle in their transactions while another side is read, the
/// walsender that exported the load's snapshot sits idle in its transaction until every copy
/// connection imported it, and an applier's session sits idle between transactions. As
/// pg_dump does, `statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`,
/// `idle_session_timeout` (PostgreSQL 14+) and `transaction_timeout` (17+) are set to 0,
/// where the server has them: `pg_settings` lists only the settings the server knows. A value
/// the user gave in the URL's `options` (or `PGOPTIONS`), source `client`, is kept. A
/// deliberate bound (the fence's `SET LOCAL lock_timeout`) is set after this
/// (<https://www.postgresql.org/docs/current/runtime-config-client.html#RUNTIME-CONFIG-CLIENT-STATEMENT>).
/// Not sent in the startup packet's `options`: PgBouncer refuses an `options` that sets a
/// parameter it does not track, or drops it silently when told to ignore `options`.
pub const NO_SESSION_TIMEOUTS_SQL: &str = "SELECT set_config(name, '0', false) FROM pg_settings \
     WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', \
     'idle_session_timeout', 'transaction_timeout') AND setting <> '0' AND source <> 'client'";

/// Connects with the libpq semantics of [`ConnConfig`] (URL or key=value, environment,
/// password file, TLS policy).
pub async fn connect_plain(url: &str) -> Result<Client, SourceError> {
    ConnConfig::parse(url)?.connect_sql().await
}

/// Where `url` points, without the password, for messages: `host:port/dbname` (as
/// [`ConnConfig::connect_sql`] names its connection), or "an unparsable url".
pub fn url_target(url: &str) -> String {
    match ConnConfig::parse(url) {
        Ok(c) => format!("{}:{}/{}", c.host, c.port, c.dbname),
        Err(_) => "an unparsable url".to_owned(),
    }
}

/// Drives a connection's I/O to its end (spawn it), logging what the server sends on its own:
/// NOTICE, INFO, LOG and DEBUG messages ("relation … already exists, skipping") at DEBUG,
/// WARNING and worse at WARN, each naming `target`. The ONE place connection I/O is driven:
/// `tokio_postgres`'s own driver logs every notice at INFO, which floods the operator's terminal.
pub async fn drive_connection<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    target: String,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_postgres::error::Severity;
    use tokio_postgres::AsyncMessage;
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notice(n))) => match n.parsed_severity() {
                Some(Severity::Warning | Severity::Error | Severity::Fatal | Severity::Panic) => {
                    tracing::warn!(target_db = %target, sqlstate = n.code().code(), detail = ?n.detail(), "server {}: {}", n.severity(), n.message())
                }
                _ => {
                    tracing::debug!(target_db = %target, sqlstate = n.code().code(), "server {}: {}", n.severity(), n.message())
                }
            },
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

/// A driver error as one line with everything the server said: severity, message, SQLSTATE,
/// detail and hint for database errors; the cause chain (e.g. `Connection refused`) otherwise.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(d) = db.detail() {
            s.push_str(&format!("; DETAIL: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; HINT: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// The SQL of the source's present, for queries that read it with other values (see
/// [`current_insert_lsn`]).
pub const SOURCE_PRESENT_LSN: &str = "pg_current_wal_insert_lsn()";

/// The source's present: `pg_current_wal_insert_lsn()`, the end of the last WAL record
/// inserted. Every commit any session can see has its commit record below it. Not
/// `pg_current_wal_lsn()` (the write pointer): with `synchronous_commit = off` a commit is
/// visible before its record is written, so it can lie past the write pointer
/// (<https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-BACKUP>).
pub async fn current_insert_lsn(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one(&format!("SELECT {SOURCE_PRESENT_LSN}"), &[])
        .await?;
    let lsn: tokio_postgres::types::PgLsn = row.try_get(0)?;
    Ok(Lsn::from_u64(lsn.into()))
}

/// Writes the cutover marker (a transactional logical message with prefix
/// [`CUTOVER_MESSAGE_PREFIX`](crate::event::CUTOVER_MESSAGE_PREFIX) and `content`) in its own
/// transaction and returns the LSN of its record: routed to every shard, it makes a caught-up
/// shard's progress pass every commit before it at once
/// (<https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-REPLICATION>).
/// Fails where the role may not call `pg_logical_emit_message`.
pub async fn emit_marker(client: &Client, content: &str) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&crate::event::CUTOVER_MESSAGE_PREFIX, &content],
        )
        .await?;
    let lsn: tokio_postgres::types::PgLsn = row.try_get(0)?;
    Ok(Lsn::from_u64(lsn.into()))
}

/// Session settings that fix the text output of every type, set on every side of a comparison.
pub const NORMALIZE_SESSION_SQL: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
     SET application_name = 'reshard'";

/// Applies [`NORMALIZE_SESSION_SQL`].
pub async fn normalize_session(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(NORMALIZE_SESSION_SQL).await
}

// Quoting lives in `pg::sql`; these are its names for the commands that connect here.
pub use super::sql::{quote_ident, quote_literal};

/// Parses a duration: plain seconds (`600`, `1.5`) or a number with a unit `ms`, `s`, `m`, `h`
/// (`10m`, `500ms`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        format!("invalid duration {s:?}: use seconds (600) or a unit: 500ms, 30s, 10m, 1h")
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be a positive number"));
    }
    Ok(std::time::Duration::from_secs_f64(v * mult))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
