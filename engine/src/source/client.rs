//! A connection in logical replication mode (`replication=database`) and its commands.
//!
//! In: a [`ConnConfig`]. Out: the answers of `IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`,
//! `DROP_REPLICATION_SLOT` and plain simple-query SQL, and, once `START_REPLICATION` is sent, a
//! [`ReplicationStream`] that owns the connection.
//!
//! Invariant kept here: the command syntax matches the server's version
//! ([`ReplicationClient::server_version_num`]): PostgreSQL 15 introduced the parenthesized
//! option list for `CREATE_REPLICATION_SLOT`; 10–14 take keywords. The pgoutput protocol version
//! is the highest the server speaks unless the caller pins one.
//!
//! See <https://www.postgresql.org/docs/current/protocol-replication.html> and
//! <https://www.postgresql.org/docs/current/protocol-logical-replication.html>.

use std::collections::HashMap;

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::ConnConfig;
use super::stream::ReplicationStream;
use super::wire::{server_fields, Frame, Wire};
use super::SourceError;
use crate::lsn::Lsn;

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier (a decimal 64-bit number, as text).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for physical replication connections).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with the snapshot at the slot's consistent point.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum SnapshotAction {
    /// Export it: its name is returned and other sessions can `SET TRANSACTION SNAPSHOT` to it
    /// until the next command on this connection (the full load uses this).
    #[default]
    Export,
    /// Don't create one.
    NoExport,
    /// Use it in the current transaction of this connection.
    Use,
}

/// Options for [`ReplicationClient::create_slot`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SlotOptions {
    /// Dropped when this connection ends.
    pub temporary: bool,
    /// What to do with the snapshot.
    pub snapshot: SnapshotAction,
    /// Decode prepared transactions at PREPARE (PostgreSQL 14+).
    pub two_phase: bool,
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Slot name.
    pub name: String,
    /// The slot's consistent point: streaming from here misses nothing committed after the
    /// exported snapshot and repeats nothing visible in it.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
    /// The output plugin (`pgoutput`).
    pub output_plugin: Option<String>,
}

/// pgoutput's options for `START_REPLICATION`. See
/// <https://www.postgresql.org/docs/current/protocol-logical-replication.html#PROTOCOL-LOGICAL-REPLICATION-PARAMS>.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PgOutputOptions {
    /// Protocol version; `None` picks the highest the server speaks (before 14: 1, 14: 2,
    /// 15: 3, 16+: 4).
    pub proto_version: Option<u32>,
    /// Publications to stream (at least one).
    pub publication_names: Vec<String>,
    /// Also send `pg_logical_emit_message` messages.
    pub messages: bool,
    /// Stream large in-progress transactions (needs protocol 2+; left out otherwise).
    pub streaming: bool,
    /// Send column values in binary.
    pub binary: bool,
    /// Send PREPARE/COMMIT PREPARED (needs protocol 3+; left out otherwise).
    pub two_phase: bool,
}

/// The highest pgoutput protocol version a server speaks.
pub fn max_proto_version(server_version_num: u32) -> u32 {
    match server_version_num {
        v if v >= 160000 => 4,
        v if v >= 150000 => 3,
        v if v >= 140000 => 2,
        _ => 1,
    }
}

/// The `START_REPLICATION … LOGICAL` command for a server of `server_version_num`: options the
/// server's pgoutput does not know are left out, since it refuses unknown options
/// (PostgreSQL 12/13 refuse `messages`, and speak only protocol 1, without `streaming`).
/// See <https://www.postgresql.org/docs/current/protocol-logical-replication.html#PROTOCOL-LOGICAL-REPLICATION-PARAMS>.
pub fn start_replication_sql(
    server_version_num: u32,
    slot: &str,
    start: Lsn,
    opts: &PgOutputOptions,
) -> Result<String, SourceError> {
    check_slot_name(slot)?;
    if opts.publication_names.is_empty() {
        return Err(SourceError::Config {
            key: "publication_names".into(),
            message: "name at least one publication to stream".into(),
        });
    }
    let max = max_proto_version(server_version_num);
    let proto = opts.proto_version.unwrap_or(max);
    if proto == 0 || proto > max {
        return Err(SourceError::Config {
            key: "proto_version".into(),
            message: format!(
                "pgoutput protocol {proto} is not spoken by PostgreSQL {} (1..={max})",
                server_version_num / 10000
            ),
        });
    }
    let pubs = opts
        .publication_names
        .iter()
        .map(|p| crate::event::quote_ident(p))
        .collect::<Vec<_>>()
        .join(",");
    let mut sql = format!(
        "START_REPLICATION SLOT \"{slot}\" LOGICAL {start} (proto_version '{proto}', \
         publication_names {}",
        quote_literal(&pubs)
    );
    // `messages` is a pgoutput option since PostgreSQL 14 (whatever the protocol version).
    if opts.messages && server_version_num >= 140000 {
        sql.push_str(", messages 'true'");
    }
    if opts.binary {
        sql.push_str(", binary 'true'");
    }
    if opts.streaming {
        if proto >= 2 {
            sql.push_str(", streaming 'on'");
        } else {
            tracing::info!(
                proto,
                "pgoutput protocol 1 cannot stream in-progress transactions: a large transaction \
                 arrives whole at its commit and is written to the spill log as it arrives"
            );
        }
    }
    if opts.two_phase {
        if proto >= 3 {
            sql.push_str(", two_phase 'true'");
        } else {
            tracing::warn!(proto, "two_phase needs pgoutput protocol 3+; not requested");
        }
    }
    sql.push(')');
    Ok(sql)
}

/// A connection in `replication=database` mode.
pub struct ReplicationClient {
    wire: Wire,
    params: HashMap<String, String>,
    backend_key: Option<(i32, i32)>,
    user: String,
    tls: bool,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("user", &self.user)
            .field("server_version", &self.params.get("server_version"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Whether `name` is a valid replication slot name (what the server accepts).
fn check_slot_name(name: &str) -> Result<(), SourceError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SourceError::Config {
            key: "slot".into(),
            message: format!(
                "{name:?} is not a valid replication slot name: use 1-63 lower-case letters, \
                 digits and underscores"
            ),
        })
    }
}

/// `'text'` as a string literal of the replication command grammar, which knows no `E''` form
/// (so not [`crate::pg::conn::quote_literal`]).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl ReplicationClient {
    /// Connects in `replication=database` mode and authenticates (trust, cleartext, md5 or
    /// SCRAM-SHA-256).
    pub async fn connect(cfg: &ConnConfig) -> Result<ReplicationClient, SourceError> {
        let (io, tls) = cfg.open_transport().await?;
        let mut c = ReplicationClient {
            wire: Wire::new(io),
            params: HashMap::new(),
            backend_key: None,
            user: cfg.user.clone(),
            tls,
        };
        let startup = async {
            c.startup(cfg).await?;
            Ok::<_, SourceError>(())
        };
        let t = cfg.effective_connect_timeout();
        tokio::time::timeout(t, startup).await.unwrap_or_else(|_| {
            Err(SourceError::Connect {
                host: cfg.host.clone(),
                port: cfg.port,
                source: format!("connect_timeout of {}s expired during startup", t.as_secs())
                    .into(),
            })
        })?;
        let version = c.server_version_num();
        if version != 0 && version < 100000 {
            return Err(SourceError::Config {
                key: "server_version".into(),
                message: format!(
                    "the source runs PostgreSQL {}; logical replication with pgoutput needs \
                     PostgreSQL 10 or later",
                    c.parameter("server_version").unwrap_or("?")
                ),
            });
        }
        // A `replication=database` walsender runs SQL too; the one that exports the load's
        // snapshot sits idle in a transaction until the copy workers imported it.
        c.query(crate::pg::conn::NO_SESSION_TIMEOUTS_SQL).await?;
        tracing::debug!(
            host = %cfg.host,
            port = cfg.port,
            server_version = c.params.get("server_version").map(String::as_str).unwrap_or("?"),
            tls = c.tls,
            "replication connection established"
        );
        Ok(c)
    }

    async fn startup(&mut self, cfg: &ConnConfig) -> Result<(), SourceError> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if let Some(o) = &cfg.options {
            params.push(("options", o.as_str()));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wire.wbuf)
            .map_err(|e| SourceError::protocol(format!("encoding the startup message: {e}")))?;
        self.wire.send("startup").await?;
        self.authenticate(cfg).await?;
        // Until ReadyForQuery: ParameterStatus, BackendKeyData, notices.
        loop {
            match self.wire.recv("startup").await? {
                Frame::Msg(Message::ParameterStatus(p)) => self.record_param(&p),
                Frame::Msg(Message::BackendKeyData(k)) => {
                    self.backend_key = Some((k.process_id(), k.secret_key()))
                }
                Frame::Msg(Message::NoticeResponse(n)) => log_notice(n.fields()),
                Frame::Msg(Message::ReadyForQuery(_)) => return Ok(()),
                Frame::Msg(Message::ErrorResponse(e)) => {
                    return Err(server_fields(e.fields()).into_error(&cfg.user, "startup"))
                }
                _ => return Err(SourceError::protocol("unexpected message during startup")),
            }
        }
    }

    fn password<'a>(&self, cfg: &'a ConnConfig) -> Result<&'a str, SourceError> {
        cfg.password.as_deref().ok_or_else(|| SourceError::Auth {
            user: cfg.user.clone(),
            message: "the server asks for a password but none was given".into(),
        })
    }

    async fn authenticate(&mut self, cfg: &ConnConfig) -> Result<(), SourceError> {
        let user = cfg.user.as_str();
        loop {
            let frame = self.wire.recv("authentication").await?;
            let Frame::Msg(msg) = frame else {
                return Err(SourceError::protocol(
                    "unexpected CopyBothResponse during authentication",
                ));
            };
            match msg {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(cfg)?;
                    frontend::password_message(pw.as_bytes(), &mut self.wire.wbuf)
                        .map_err(|e| SourceError::protocol(e.to_string()))?;
                    self.wire.send("authentication").await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(cfg)?;
                    let hash = md5_hash(user.as_bytes(), pw.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wire.wbuf)
                        .map_err(|e| SourceError::protocol(e.to_string()))?;
                    self.wire.send("authentication").await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| SourceError::protocol(format!("SASL mechanisms: {e}")))?
                    {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(SourceError::Auth {
                            user: user.to_owned(),
                            message: "the server offers no SASL mechanism reshard speaks \
                                      (SCRAM-SHA-256)"
                                .into(),
                        });
                    }
                    self.scram(cfg).await?;
                }
                Message::ErrorResponse(e) => {
                    return Err(server_fields(e.fields()).into_error(user, "authentication"))
                }
                Message::NoticeResponse(n) => log_notice(n.fields()),
                _ => {
                    return Err(SourceError::Auth {
                        user: user.to_owned(),
                        message: "the server asks for an authentication method reshard does \
                                  not support (supported: trust, password, md5, scram-sha-256)"
                            .into(),
                    })
                }
            }
        }
    }

    /// SCRAM-SHA-256 exchange (RFC 7677), without channel binding. Over TLS the client says it
    /// does not support binding ('n'); saying "supported but not offered" ('y') would make a
    /// server that offers SCRAM-SHA-256-PLUS suspect a downgrade and refuse.
    async fn scram(&mut self, cfg: &ConnConfig) -> Result<(), SourceError> {
        let user = cfg.user.as_str();
        let pw = self.password(cfg)?;
        let binding = if self.tls {
            ChannelBinding::unsupported()
        } else {
            ChannelBinding::unrequested()
        };
        let mut scram = ScramSha256::new(pw.as_bytes(), binding);
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.wire.wbuf)
            .map_err(|e| SourceError::protocol(e.to_string()))?;
        self.wire.send("SCRAM").await?;
        match self.wire.recv("SCRAM").await? {
            Frame::Msg(Message::AuthenticationSaslContinue(b)) => {
                scram.update(b.data()).map_err(|e| SourceError::Auth {
                    user: user.to_owned(),
                    message: format!("SCRAM server-first message rejected: {e}"),
                })?
            }
            Frame::Msg(Message::ErrorResponse(e)) => {
                return Err(server_fields(e.fields()).into_error(user, "SCRAM authentication"))
            }
            _ => return Err(SourceError::protocol("expected AuthenticationSASLContinue")),
        }
        frontend::sasl_response(scram.message(), &mut self.wire.wbuf)
            .map_err(|e| SourceError::protocol(e.to_string()))?;
        self.wire.send("SCRAM").await?;
        match self.wire.recv("SCRAM").await? {
            Frame::Msg(Message::AuthenticationSaslFinal(b)) => {
                scram.finish(b.data()).map_err(|e| SourceError::Auth {
                    user: user.to_owned(),
                    message: format!("the server's SCRAM proof is invalid: {e}"),
                })?
            }
            Frame::Msg(Message::ErrorResponse(e)) => {
                return Err(server_fields(e.fields()).into_error(user, "SCRAM authentication"))
            }
            _ => return Err(SourceError::protocol("expected AuthenticationSASLFinal")),
        }
        Ok(())
    }

    fn record_param(&mut self, p: &postgres_protocol::message::backend::ParameterStatusBody) {
        if let (Ok(k), Ok(v)) = (p.name(), p.value()) {
            self.params.insert(k.to_owned(), v.to_owned());
        }
    }

    /// A server parameter reported at startup (`server_version`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// `server_version` as a number like `server_version_num` (`150004` for 15.4, `100023`
    /// for 10.23); 0 if the server did not report a parsable version.
    pub fn server_version_num(&self) -> u32 {
        let Some(v) = self.params.get("server_version") else {
            return 0;
        };
        // "15.4 (Debian 15.4-1)", "16beta1", "9.6.24".
        let num: String = v
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let second = parts.next().unwrap_or(0);
        if major >= 10 {
            major * 10000 + second
        } else {
            major * 10000 + second * 100 + parts.next().unwrap_or(0)
        }
    }

    /// PID and secret key of the backend (for a cancel request), if the server sent them.
    pub fn backend_key(&self) -> Option<(i32, i32)> {
        self.backend_key
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Runs one statement with the simple query protocol and returns every row as text.
    /// Replication connections accept replication commands, `SHOW`, and (with
    /// `replication=database`) plain SQL.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        Ok(self.query(sql).await?.1)
    }

    /// Runs `sql`; returns column names and rows. Reads up to ReadyForQuery even on error, so
    /// the connection stays usable.
    async fn query(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<String>, Vec<Vec<Option<String>>>), SourceError> {
        frontend::query(sql, &mut self.wire.wbuf)
            .map_err(|e| SourceError::protocol(format!("encoding query: {e}")))?;
        self.wire.send(sql).await?;
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.wire.recv(sql).await? {
                Frame::Msg(Message::RowDescription(d)) => {
                    let mut fields = d.fields();
                    columns.clear();
                    while let Some(f) = fields
                        .next()
                        .map_err(|e| SourceError::protocol(format!("RowDescription: {e}")))?
                    {
                        columns.push(f.name().to_owned());
                    }
                }
                Frame::Msg(Message::DataRow(r)) => {
                    let buf = r.buffer();
                    let mut ranges = r.ranges();
                    let mut row = Vec::with_capacity(columns.len());
                    while let Some(range) = ranges
                        .next()
                        .map_err(|e| SourceError::protocol(format!("DataRow: {e}")))?
                    {
                        row.push(match range {
                            None => None,
                            Some(range) => {
                                let bytes = buf.get(range).ok_or_else(|| {
                                    SourceError::protocol("DataRow value out of bounds")
                                })?;
                                Some(String::from_utf8_lossy(bytes).into_owned())
                            }
                        });
                    }
                    rows.push(row);
                }
                Frame::Msg(Message::CommandComplete(_))
                | Frame::Msg(Message::EmptyQueryResponse) => {}
                Frame::Msg(Message::NoticeResponse(n)) => log_notice(n.fields()),
                Frame::Msg(Message::ParameterStatus(p)) => self.record_param(&p),
                Frame::Msg(Message::ErrorResponse(e)) => {
                    error = Some(server_fields(e.fields()).into_error(&self.user, sql))
                }
                Frame::Msg(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok((columns, rows)),
                    }
                }
                Frame::Msg(Message::CopyOutResponse(_))
                | Frame::Msg(Message::CopyInResponse(_))
                | Frame::CopyBoth => {
                    return Err(SourceError::protocol(format!(
                        "{sql:?} started a COPY; use start_replication for streaming"
                    )))
                }
                _ => {
                    return Err(SourceError::protocol(format!(
                        "unexpected message in the answer to {sql:?}"
                    )))
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: system id, timeline, current WAL position, database.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        let (cols, rows) = self.query("IDENTIFY_SYSTEM").await?;
        let row = one_row(&cols, rows, "IDENTIFY_SYSTEM")?;
        let system_id = row
            .get("systemid")
            .ok_or_else(|| SourceError::protocol("IDENTIFY_SYSTEM without systemid"))?;
        let timeline = row
            .get("timeline")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| SourceError::protocol("IDENTIFY_SYSTEM without a numeric timeline"))?;
        let xlogpos = parse_lsn(row.get("xlogpos"), "IDENTIFY_SYSTEM xlogpos")?;
        Ok(SystemInfo {
            system_id,
            timeline,
            xlogpos,
            dbname: row.get("dbname"),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput ...`.
    ///
    /// With [`SnapshotAction::Export`] the returned snapshot stays importable only until the
    /// next command on this connection: open the copy connections and run
    /// `SET TRANSACTION SNAPSHOT` on them first.
    pub async fn create_slot(
        &mut self,
        name: &str,
        opts: SlotOptions,
    ) -> Result<SlotInfo, SourceError> {
        check_slot_name(name)?;
        let version = self.server_version_num();
        let mut sql = format!("CREATE_REPLICATION_SLOT \"{name}\"");
        if opts.temporary {
            sql.push_str(" TEMPORARY");
        }
        sql.push_str(" LOGICAL pgoutput");
        if version >= 150000 {
            // PostgreSQL 15+: parenthesized options.
            let snap = match opts.snapshot {
                SnapshotAction::Export => "export",
                SnapshotAction::NoExport => "nothing",
                SnapshotAction::Use => "use",
            };
            sql.push_str(&format!(" (SNAPSHOT '{snap}'"));
            if opts.two_phase {
                sql.push_str(", TWO_PHASE true");
            }
            sql.push(')');
        } else {
            // PostgreSQL 10-14: keywords.
            sql.push_str(match opts.snapshot {
                SnapshotAction::Export => " EXPORT_SNAPSHOT",
                SnapshotAction::NoExport => " NOEXPORT_SNAPSHOT",
                SnapshotAction::Use => " USE_SNAPSHOT",
            });
            if opts.two_phase {
                if version < 140000 {
                    return Err(SourceError::Config {
                        key: "two_phase".into(),
                        message: format!(
                            "two-phase decoding needs PostgreSQL 14 or later; the source runs \
                             {}",
                            self.parameter("server_version").unwrap_or("?")
                        ),
                    });
                }
                sql.push_str(" TWO_PHASE");
            }
        }
        let (cols, rows) = self.query(&sql).await?;
        let row = one_row(&cols, rows, "CREATE_REPLICATION_SLOT")?;
        Ok(SlotInfo {
            name: row.get("slot_name").unwrap_or_else(|| name.to_owned()),
            consistent_point: parse_lsn(row.get("consistent_point"), "consistent_point")?,
            snapshot_name: row.get("snapshot_name"),
            output_plugin: row.get("output_plugin"),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`: with `wait`, waits for an active consumer to let go
    /// instead of failing with [`SourceError::SlotInUse`].
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), SourceError> {
        check_slot_name(name)?;
        let sql = if wait {
            format!("DROP_REPLICATION_SLOT \"{name}\" WAIT")
        } else {
            format!("DROP_REPLICATION_SLOT \"{name}\"")
        };
        self.query(&sql).await.map(|_| ())
    }

    /// The `START_REPLICATION` command for these options.
    fn start_command(
        &self,
        slot: &str,
        start: Lsn,
        opts: &PgOutputOptions,
    ) -> Result<String, SourceError> {
        start_replication_sql(self.server_version_num(), slot, start, opts)
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (...)`: hands the connection to a
    /// [`ReplicationStream`] once the server enters COPY BOTH mode.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        opts: PgOutputOptions,
    ) -> Result<ReplicationStream, SourceError> {
        let sql = self.start_command(slot, start, &opts)?;
        tracing::debug!(%sql, "starting replication");
        frontend::query(&sql, &mut self.wire.wbuf)
            .map_err(|e| SourceError::protocol(format!("encoding START_REPLICATION: {e}")))?;
        self.wire.send("START_REPLICATION").await?;
        loop {
            match self.wire.recv("START_REPLICATION").await? {
                Frame::CopyBoth => {
                    return Ok(ReplicationStream::new(self.wire, slot.to_owned(), start))
                }
                Frame::Msg(Message::NoticeResponse(n)) => log_notice(n.fields()),
                Frame::Msg(Message::ParameterStatus(p)) => self.record_param(&p),
                Frame::Msg(Message::ErrorResponse(e)) => {
                    return Err(server_fields(e.fields()).into_error(&self.user, &sql))
                }
                _ => {
                    return Err(SourceError::protocol(
                        "unexpected answer to START_REPLICATION (expected CopyBothResponse)",
                    ))
                }
            }
        }
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wire.wbuf);
        self.wire.close().await;
    }
}

/// A row addressed by column name.
struct NamedRow(Vec<(String, Option<String>)>);

impl NamedRow {
    fn get(&self, col: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(c, _)| c == col)
            .and_then(|(_, v)| v.clone())
    }
}

fn one_row(
    cols: &[String],
    rows: Vec<Vec<Option<String>>>,
    what: &str,
) -> Result<NamedRow, SourceError> {
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| SourceError::protocol(format!("{what} returned no row")))?;
    Ok(NamedRow(cols.iter().cloned().zip(row).collect()))
}

fn parse_lsn(v: Option<String>, what: &str) -> Result<Lsn, SourceError> {
    let v = v.ok_or_else(|| SourceError::protocol(format!("{what} missing")))?;
    v.parse()
        .map_err(|e| SourceError::protocol(format!("{what}: {e}")))
}

pub(crate) fn log_notice(fields: postgres_protocol::message::backend::ErrorFields<'_>) {
    let f = server_fields(fields);
    tracing::info!(sqlstate = %f.code, detail = ?f.detail, "source notice: {}", f.message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_version_follows_the_server() {
        assert_eq!(max_proto_version(120000), 1);
        assert_eq!(max_proto_version(130012), 1);
        assert_eq!(max_proto_version(140000), 2);
        assert_eq!(max_proto_version(150004), 3);
        assert_eq!(max_proto_version(160000), 4);
        assert_eq!(max_proto_version(170002), 4);
    }

    /// See: issue #12 — a PostgreSQL 13 source refused `messages` at START_REPLICATION.
    #[test]
    fn start_replication_leaves_out_what_old_servers_refuse() {
        let opts = PgOutputOptions {
            publication_names: vec!["reshard".into()],
            messages: true,
            streaming: true,
            ..Default::default()
        };
        let start = Lsn::from_u64(0x100);
        for v in [120022, 130023] {
            let sql = start_replication_sql(v, "reshard", start, &opts).unwrap();
            assert!(sql.contains("proto_version '1'"), "{sql}");
            assert!(!sql.contains("messages"), "{v}: {sql}");
            assert!(!sql.contains("streaming"), "{v}: {sql}");
        }
        let sql = start_replication_sql(140010, "reshard", start, &opts).unwrap();
        assert!(
            sql.contains("proto_version '2'")
                && sql.contains("messages 'true'")
                && sql.contains("streaming 'on'"),
            "{sql}"
        );
        let sql = start_replication_sql(180004, "reshard", start, &opts).unwrap();
        assert!(
            sql.contains("proto_version '4'") && sql.contains("messages 'true'"),
            "{sql}"
        );
    }

    #[test]
    fn slot_names_are_checked() {
        assert!(check_slot_name("reshard_1").is_ok());
        for bad in ["", "Upper", "has space", "x\"; DROP", &"a".repeat(64)] {
            assert!(
                matches!(check_slot_name(bad), Err(SourceError::Config { key, .. }) if key == "slot"),
                "{bad}"
            );
        }
    }
}
