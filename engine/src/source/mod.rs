//! The replication client: reshard's only reader of the source database's WAL.
//!
//! In: a libpq connection string ([`ConnConfig`]). Out: a [`ReplicationClient`] that runs the
//! replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `DROP_REPLICATION_SLOT`,
//! `START_REPLICATION`) and a [`ReplicationStream`] that yields pgoutput's `XLogData` payloads
//! as zero-copy [`bytes::Bytes`]. [`ConnConfig::connect_sql`] opens ordinary SQL connections with
//! the same settings for the other stages.
//!
//! Invariant kept here: **the slot is never confirmed past what the caller marked durable.** The
//! only LSN ever reported to the server as written/flushed/applied is the one given to
//! [`ReplicationStream::set_flushed`], so a crash loses nothing the source would not resend.
//!
//! Released `tokio-postgres` cannot open replication connections, so the wire protocol is spoken
//! here directly with `postgres-protocol`'s codecs over tokio TCP (or TLS, or a unix socket).
//! See <https://www.postgresql.org/docs/current/protocol-replication.html>.

mod client;
mod conn;
pub mod slot;
mod stream;
mod wire;

pub use client::{
    max_proto_version, PgOutputOptions, ReplicationClient, SlotInfo, SlotOptions, SnapshotAction,
    SystemInfo,
};
pub use conn::{pgpass_lookup, ConnConfig, SqlSession, SslMode, DEFAULT_CONNECT_TIMEOUT};
pub use stream::{ReplicationStream, XLogData, DEFAULT_IDLE_TIMEOUT, DEFAULT_STATUS_INTERVAL};

use std::fmt;

use crate::error::{class_of_sqlstate, Classify, ErrorClass};
use crate::lsn::Lsn;

/// Why talking to the source failed. Every message names the thing (host, user, slot,
/// publication, SQLSTATE) and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// TCP connect, DNS or the connect timeout failed.
    #[error(
        "cannot connect to PostgreSQL at {host}:{port}: {source}; check that the server is \
         running and accepts TCP connections on that host and port"
    )]
    Connect {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server rejected our credentials (SQLSTATE 28P01 / 28000).
    #[error(
        "authentication failed for user \"{user}\": {message}; check the password in the URL, \
         PGPASSWORD or ~/.pgpass, and that pg_hba.conf admits this user (replication \
         connections need a `host replication {user} ...` line)"
    )]
    Auth {
        /// The user we tried to log in as.
        user: String,
        /// What the server (or the client) said.
        message: String,
    },
    /// The server runs with `wal_level` below `logical` (SQLSTATE 55000). `message` says so
    /// (the server's, or reshard's own naming the setting).
    #[error(
        "{message}; fix: run ALTER SYSTEM SET wal_level = logical; then restart the \
         PostgreSQL server"
    )]
    WalLevel {
        /// The server's message.
        message: String,
    },
    /// Another connection is streaming from the slot (SQLSTATE 55006).
    #[error(
        "replication slot \"{slot}\" is active for PID {}; stop the other consumer \
         (SELECT pg_terminate_backend(pid) FROM pg_replication_slots WHERE slot_name = '{slot}') \
         or pick another slot name",
        pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
    )]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// PID of the walsender holding it, when the server named it.
        pid: Option<u32>,
    },
    /// The slot does not exist (SQLSTATE 42704).
    #[error(
        "replication slot \"{slot}\" does not exist; create it (reshard run creates it on first \
         start) or check the slot name in the config"
    )]
    SlotMissing {
        /// Slot name.
        slot: String,
    },
    /// Creating a slot whose name is taken (SQLSTATE 42710).
    #[error(
        "replication slot \"{slot}\" already exists; drop it (reshard slot drop) or pick \
         another slot name"
    )]
    SlotExists {
        /// Slot name.
        slot: String,
    },
    /// pgoutput could not find a publication named in `publication_names` (SQLSTATE 42704,
    /// arrives while streaming, at the first change decoded).
    #[error(
        "publication \"{publication}\" does not exist on the source; create it \
         (CREATE PUBLICATION {publication} FOR TABLE ...) or fix publication_names in the config"
    )]
    PublicationMissing {
        /// Publication name.
        publication: String,
    },
    /// Any other error the server reported.
    #[error("{}", fmt_server(.sqlstate, .message, .detail, .hint, .context))]
    Server {
        /// SQLSTATE, e.g. `42601`.
        sqlstate: String,
        /// Primary message.
        message: String,
        /// DETAIL, if any (the server's CONTEXT is appended here).
        detail: Option<String>,
        /// HINT, if any.
        hint: Option<String>,
        /// What reshard was doing (the command sent).
        context: String,
    },
    /// The connection ended without the copy being closed: EOF, reset, or no data for the idle
    /// timeout. Resume from your own durable position.
    #[error(
        "lost the replication connection (last WAL position received {last_lsn}): {reason}; \
         reshard reconnects from its durable position"
    )]
    ConnectionLost {
        /// Last WAL position received from the server (`wal_end` of the last message), `0/0`
        /// if none.
        last_lsn: Lsn,
        /// What happened.
        reason: String,
    },
    /// The server sent something this client does not understand.
    #[error("replication protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// TLS could not be set up as `sslmode` demands.
    #[error("TLS to {host} failed: {message}")]
    Tls {
        /// Host as configured.
        host: String,
        /// What failed, and how to fix it.
        message: String,
    },
    /// A connection setting is invalid.
    #[error("invalid connection setting {key}: {message}")]
    Config {
        /// The setting (`port`, `sslmode`, ...).
        key: String,
        /// What is wrong, and what is allowed.
        message: String,
    },
}

fn fmt_server(
    sqlstate: &str,
    message: &str,
    detail: &Option<String>,
    hint: &Option<String>,
    context: &str,
) -> String {
    let mut s = format!("server error {sqlstate} during {context}: {message}");
    if let Some(d) = detail {
        s.push_str("; DETAIL: ");
        s.push_str(d);
    }
    if let Some(h) = hint {
        s.push_str("; HINT: ");
        s.push_str(h);
    }
    s
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::Connect { .. } | SourceError::ConnectionLost { .. } => {
                ErrorClass::Transient
            }
            // The other consumer may be our own previous walsender that has not exited yet.
            SourceError::SlotInUse { .. } => ErrorClass::Transient,
            SourceError::Server { sqlstate, .. } => class_of_sqlstate(sqlstate),
            SourceError::Auth { .. }
            | SourceError::WalLevel { .. }
            | SourceError::SlotMissing { .. }
            | SourceError::SlotExists { .. }
            | SourceError::PublicationMissing { .. }
            | SourceError::Protocol { .. }
            | SourceError::Tls { .. }
            | SourceError::Config { .. } => ErrorClass::Definite,
        }
    }
}

impl SourceError {
    /// The server refused the connection itself: its login (28P01, 28000) or its database
    /// (3D000). The url (or the password it finds) is wrong; no retry fixes it.
    pub fn is_refused(&self) -> bool {
        matches!(self, SourceError::Auth { .. }) || self.sqlstate() == Some("3D000")
    }

    /// The SQLSTATE the server sent, when this error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SourceError::Server { sqlstate, .. } => Some(sqlstate),
            SourceError::WalLevel { .. } => Some("55000"),
            SourceError::SlotInUse { .. } => Some("55006"),
            SourceError::SlotMissing { .. } | SourceError::PublicationMissing { .. } => {
                Some("42704")
            }
            SourceError::SlotExists { .. } => Some("42710"),
            _ => None,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> SourceError {
        SourceError::Protocol {
            message: message.into(),
        }
    }
}

/// The fields of an ErrorResponse, owned.
#[derive(Debug, Default, Clone)]
pub(crate) struct ServerFields {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub where_: Option<String>,
}

/// The first `"quoted"` name in a server message.
fn quoted_name(message: &str) -> Option<String> {
    let start = message.find('"')? + 1;
    let len = message.get(start..)?.find('"')?;
    message.get(start..start + len).map(str::to_owned)
}

impl ServerFields {
    /// Turns a server error into the most specific [`SourceError`]. `user` names the login for
    /// auth errors, `context` says what we were doing.
    pub(crate) fn into_error(self, user: &str, context: &str) -> SourceError {
        let msg = self.message.as_str();
        match self.code.as_str() {
            "28P01" | "28000" => {
                return SourceError::Auth {
                    user: user.to_owned(),
                    message: self.message,
                }
            }
            "55000" if msg.contains("wal_level") => {
                return SourceError::WalLevel {
                    message: self.message,
                }
            }
            "55006" if msg.starts_with("replication slot") => {
                let pid = msg
                    .rsplit(' ')
                    .next()
                    .and_then(|p| p.trim_end_matches('.').parse().ok());
                if let Some(slot) = quoted_name(msg) {
                    return SourceError::SlotInUse { slot, pid };
                }
            }
            "42704" if msg.starts_with("replication slot") => {
                if let Some(slot) = quoted_name(msg) {
                    return SourceError::SlotMissing { slot };
                }
            }
            "42704" if msg.starts_with("publication") => {
                if let Some(publication) = quoted_name(msg) {
                    return SourceError::PublicationMissing { publication };
                }
            }
            "42710" if msg.starts_with("replication slot") => {
                if let Some(slot) = quoted_name(msg) {
                    return SourceError::SlotExists { slot };
                }
            }
            _ => {}
        }
        let detail = match (self.detail, self.where_) {
            (Some(d), Some(w)) => Some(format!("{d}; CONTEXT: {w}")),
            (Some(d), None) => Some(d),
            (None, Some(w)) => Some(format!("CONTEXT: {w}")),
            (None, None) => None,
        };
        SourceError::Server {
            sqlstate: self.code,
            message: self.message,
            detail,
            hint: self.hint,
            context: context.to_owned(),
        }
    }
}

/// Maps a `tokio_postgres` error (from [`ConnConfig::connect_sql`] or a query on such a
/// connection) to a [`SourceError`].
pub fn from_pg_error(
    e: tokio_postgres::Error,
    host: &str,
    port: u16,
    user: &str,
    context: &str,
) -> SourceError {
    if let Some(db) = e.as_db_error() {
        let where_ = db.where_().map(str::to_owned);
        return ServerFields {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
            where_,
        }
        .into_error(user, context);
    }
    if e.is_closed() {
        return SourceError::ConnectionLost {
            last_lsn: Lsn::ZERO,
            reason: format!("{context}: {e}"),
        };
    }
    // tokio_postgres reports a server that asks for a password none was given for as
    // "invalid configuration" (its cause, "password missing", is not in its Display): the same
    // error as the replication client's, not "is the server running?".
    if std::error::Error::source(&e).is_some_and(|c| c.to_string() == "password missing") {
        return SourceError::Auth {
            user: user.to_owned(),
            message: "the server asks for a password but none was given".into(),
        };
    }
    SourceError::Connect {
        host: host.to_owned(),
        port,
        source: Box::new(e),
    }
}

/// One row of `pg_replication_slots`, as `reshard slot list` and `reshard status` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotRow {
    /// `slot_name`.
    pub slot_name: String,
    /// `plugin` (`pgoutput`), `None` for physical slots.
    pub plugin: Option<String>,
    /// `slot_type`: `logical` or `physical`.
    pub slot_type: String,
    /// `database`, `None` for physical slots.
    pub database: Option<String>,
    /// Whether a walsender is streaming from it now.
    pub active: bool,
    /// PID of that walsender.
    pub active_pid: Option<i32>,
    /// `restart_lsn`: the oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// `confirmed_flush_lsn`: what the consumer confirmed.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// WAL bytes the slot keeps on the source:
    /// `pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)`.
    pub retained_wal_bytes: Option<i64>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
}

impl fmt::Display for SlotRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |l: Option<Lsn>| l.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        write!(
            f,
            "{} ({} {}) active={} restart_lsn={} confirmed_flush_lsn={} retained={}B",
            self.slot_name,
            self.slot_type,
            self.plugin.as_deref().unwrap_or("-"),
            self.active,
            opt(self.restart_lsn),
            opt(self.confirmed_flush_lsn),
            self.retained_wal_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
        )
    }
}

/// Lists the replication slots of the server `client` is connected to (all databases), with
/// the WAL each one retains. Works on a primary and on a standby (there the current position is
/// `pg_last_wal_receive_lsn()`).
///
/// See <https://www.postgresql.org/docs/current/view-pg-replication-slots.html> (`wal_status`
/// is PostgreSQL 13+: read through `to_jsonb` so that 12 answers NULL).
pub async fn list_slots(client: &tokio_postgres::Client) -> Result<Vec<SlotRow>, SourceError> {
    const SQL: &str = "SELECT slot_name::text, plugin::text, slot_type::text, database::text, \
         active, active_pid, restart_lsn::text, confirmed_flush_lsn::text, \
         pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                              ELSE pg_current_wal_lsn() END, restart_lsn)::bigint, \
         to_jsonb(s) ->> 'wal_status' \
         FROM pg_replication_slots s ORDER BY slot_name";
    let rows = client
        .query(SQL, &[])
        .await
        .map_err(|e| from_pg_error(e, "?", 0, "?", "listing pg_replication_slots"))?;
    let lsn = |s: Option<String>| -> Result<Option<Lsn>, SourceError> {
        s.map(|s| {
            s.parse::<Lsn>()
                .map_err(|e| SourceError::protocol(format!("pg_replication_slots: {e}")))
        })
        .transpose()
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let get = |i: usize| -> Result<Option<String>, SourceError> {
            r.try_get::<_, Option<String>>(i)
                .map_err(|e| from_pg_error(e, "?", 0, "?", "reading pg_replication_slots"))
        };
        out.push(SlotRow {
            slot_name: get(0)?.unwrap_or_default(),
            plugin: get(1)?,
            slot_type: get(2)?.unwrap_or_default(),
            database: get(3)?,
            active: r
                .try_get::<_, bool>(4)
                .map_err(|e| from_pg_error(e, "?", 0, "?", "reading pg_replication_slots"))?,
            active_pid: r
                .try_get::<_, Option<i32>>(5)
                .map_err(|e| from_pg_error(e, "?", 0, "?", "reading pg_replication_slots"))?,
            restart_lsn: lsn(get(6)?)?,
            confirmed_flush_lsn: lsn(get(7)?)?,
            retained_wal_bytes: r
                .try_get::<_, Option<i64>>(8)
                .map_err(|e| from_pg_error(e, "?", 0, "?", "reading pg_replication_slots"))?,
            wal_status: get(9)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(code: &str, message: &str) -> ServerFields {
        ServerFields {
            code: code.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn server_errors_become_specific_variants() {
        let e = fields("55006", "replication slot \"s1\" is active for PID 4242")
            .into_error("u", "START_REPLICATION");
        assert!(matches!(&e, SourceError::SlotInUse { slot, pid: Some(4242) } if slot == "s1"));
        assert!(e.to_string().contains("PID 4242"), "{e}");
        assert_eq!(e.class(), ErrorClass::Transient);

        let e = fields("42704", "publication \"pub_x\" does not exist").into_error("u", "x");
        assert!(
            matches!(&e, SourceError::PublicationMissing { publication } if publication == "pub_x")
        );
        let e = fields("42704", "replication slot \"gone\" does not exist").into_error("u", "x");
        assert!(matches!(&e, SourceError::SlotMissing { slot } if slot == "gone"));
        let e = fields("42710", "replication slot \"dup\" already exists").into_error("u", "x");
        assert!(matches!(&e, SourceError::SlotExists { slot } if slot == "dup"));
        let e =
            fields("55000", "logical decoding requires wal_level >= logical").into_error("u", "x");
        assert!(matches!(e, SourceError::WalLevel { .. }));
        assert!(e
            .to_string()
            .contains("ALTER SYSTEM SET wal_level = logical"));
        let e = fields("28P01", "password authentication failed for user \"bob\"")
            .into_error("bob", "x");
        assert!(matches!(&e, SourceError::Auth { user, .. } if user == "bob"));
        assert_eq!(e.class(), ErrorClass::Definite);
        let e = fields("42601", "syntax error").into_error("u", "CREATE_REPLICATION_SLOT");
        assert!(matches!(e, SourceError::Server { .. }));
        assert!(e.to_string().contains("42601"));
        assert!(e.to_string().contains("CREATE_REPLICATION_SLOT"));
        assert_eq!(e.sqlstate(), Some("42601"));
    }

    #[test]
    fn transient_and_definite() {
        let lost = SourceError::ConnectionLost {
            last_lsn: Lsn::from_u64(5),
            reason: "eof".into(),
        };
        assert_eq!(lost.class(), ErrorClass::Transient);
        assert!(lost.to_string().contains("0/5"));
        let shutdown = fields(
            "57P01",
            "terminating connection due to administrator command",
        )
        .into_error("u", "x");
        assert_eq!(shutdown.class(), ErrorClass::Transient);
    }
}
