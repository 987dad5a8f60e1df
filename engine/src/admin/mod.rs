//! The admin console: a PostgreSQL-protocol server, like PgBouncer's, so that
//! `psql -h 127.0.0.1 -p 6433 -U reshard reshard -c 'SHOW LAG'` works.
//!
//! In: TCP connections on `[admin] listen`, the live [`StatusSnapshot`] (a `watch`) and the
//! runtime's control channel ([`AdminHandle`]). Out: text result sets for `SHOW …`, and
//! [`ControlCommand`]s (`PAUSE`, `RESUME`, `SHUTDOWN`) forwarded to the runtime, whose answer
//! comes back as a `NOTICE` plus a command tag, or as an `ErrorResponse`.
//!
//! Guarantees:
//! - Only the configured `[admin] user` may connect; with `[admin] password` set the client must
//!   prove it with SCRAM-SHA-256 (the password never crosses the wire, and a captured exchange
//!   cannot be replayed). See <https://www.postgresql.org/docs/current/auth-password.html>.
//! - Without a password the console only listens on a loopback address: a non-loopback
//!   `[admin] listen` without `[admin] password` is refused before anything is served, since
//!   anyone who can reach it could `PAUSE` or `SHUTDOWN` the migration.
//! - With `[admin] tls_cert` and `tls_key` set, the console speaks TLS (`sslmode=require`
//!   works) and refuses clients that do not use it.
//! - Bounded: at most [`MAX_CONNECTIONS`] sessions at once (further clients wait in the listen
//!   backlog); a result set is at most one row per shard/table.
//! - Nothing typed here can crash the daemon: a statement that is not understood gets
//!   `ErrorResponse` SQLSTATE 42601 naming it, and nothing of that message runs.
//! - Both query protocols are served: simple (psql, `simple_query`; several statements per
//!   message) and extended (`tokio_postgres::Client::query`, one statement, no parameters,
//!   text or binary results); see
//!   <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY>.

pub mod command;
pub mod render;

use std::fmt::{self, Debug};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::sink::{Sink, SinkExt};
use futures_util::stream;
use pgwire::api::auth::mechanism::AuthMechanismFactory;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, SCRAM_ITERATIONS};
use pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, AuthDriver, AuthOutcome, AuthSource,
    DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type, METADATA_USER};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{listen_is_loopback, AdminConfig};
use crate::error::{Classify, ErrorClass};
use crate::shutdown::ShutdownRx;
use crate::status::{AdminHandle, ControlCommand, StatusSnapshot};

use self::command::AdminCommand;
use self::render::ResultSet;

/// Most concurrent admin sessions.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a `PAUSE`/`RESUME`/`SHUTDOWN` waits for the runtime's answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin console failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address cannot be bound.
    #[error(
        "cannot listen for the admin console on {addr} (config key admin.listen): {source}; \
         choose a free address, or set admin.listen = \"\" to turn the console off"
    )]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A non-loopback listen address without a password.
    #[error(
        "the admin console would listen on {addr} (config key admin.listen), which is not a \
         loopback address, without a password: anyone who can reach it could PAUSE or SHUTDOWN \
         the migration; set admin.password (or RESHARD_ADMIN_PASSWORD), or listen on \
         127.0.0.1, or set admin.listen = \"\" to turn the console off"
    )]
    Exposed {
        /// The address.
        addr: String,
    },
    /// The TLS certificate or key cannot be used.
    #[error(
        "admin console TLS (config keys admin.tls_cert / admin.tls_key): {path}: {message}; \
         give a PEM certificate chain in admin.tls_cert and its PEM private key in \
         admin.tls_key, or remove both to turn TLS off"
    )]
    Tls {
        /// The file (or the pair) at fault.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Classify for AdminError {
    fn class(&self) -> ErrorClass {
        match self {
            AdminError::Bind { .. } | AdminError::Exposed { .. } | AdminError::Tls { .. } => {
                ErrorClass::Definite
            }
        }
    }
}

/// Who may connect and how: `[admin] user`, `password`, `tls_cert`/`tls_key`.
#[derive(Clone)]
pub struct AdminAuth {
    /// The only user name accepted.
    pub user: String,
    /// Required password (SCRAM-SHA-256), or none (trust, on a loopback address only).
    pub password: Option<String>,
    /// TLS for the console (clients must use it), or none.
    pub tls: Option<AdminTls>,
}

impl AdminAuth {
    /// From the `[admin]` section; loads the TLS certificate and key when configured.
    pub fn from_config(cfg: &AdminConfig) -> Result<AdminAuth, AdminError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(AdminTls::load(cert, key)?),
            (None, None) => None,
            _ => {
                return Err(AdminError::Tls {
                    path: "admin.tls_cert / admin.tls_key".into(),
                    message: "only one of the two is set".into(),
                })
            }
        };
        Ok(AdminAuth {
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            tls,
        })
    }

    /// Refuses a non-loopback `addr` (`[admin] listen`, or the address actually bound) when
    /// no password is set.
    pub fn check_exposure(&self, addr: &str) -> Result<(), AdminError> {
        if self.password.is_none() && !listen_is_loopback(addr) {
            return Err(AdminError::Exposed {
                addr: addr.to_owned(),
            });
        }
        Ok(())
    }
}

impl Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// The console's TLS server side: a certificate chain and its key, loaded from PEM files.
#[derive(Clone)]
pub struct AdminTls {
    cert: PathBuf,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Debug for AdminTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminTls")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl AdminTls {
    /// Loads `cert` (PEM certificate chain, server certificate first) and `key` (its PEM
    /// private key: PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<AdminTls, AdminError> {
        let bad = |p: &Path, message: String| AdminError::Tls {
            path: p.display().to_string(),
            message,
        };
        let open = |p: &Path| {
            std::fs::File::open(p)
                .map(BufReader::new)
                .map_err(|e| bad(p, format!("cannot read it: {e}")))
        };
        let certs = rustls_pemfile::certs(&mut open(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert, format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(bad(cert, "holds no PEM certificate".into()));
        }
        let private = rustls_pemfile::private_key(&mut open(key)?)
            .map_err(|e| bad(key, format!("not a PEM key file: {e}")))?
            .ok_or_else(|| bad(key, "holds no PEM private key".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, private)
            .map_err(|e| bad(key, format!("does not fit the certificate: {e}")))?;
        // PostgreSQL 17's direct TLS (`sslnegotiation=direct`) requires this ALPN name.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(AdminTls {
            cert: cert.to_owned(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// Binds `listen` (`[admin] listen`) and serves the admin console until `shutdown` turns true
/// (or its sender is dropped). An empty `listen` means the console is off: returns at once.
pub async fn serve(
    listen: &str,
    cfg: AdminAuth,
    handle: AdminHandle,
    shutdown: ShutdownRx,
) -> Result<(), AdminError> {
    if listen.trim().is_empty() {
        info!("admin console off (admin.listen = \"\")");
        return Ok(());
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| AdminError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
    serve_on(listener, cfg, handle, shutdown).await
}

/// Serves the admin console on an already bound listener (tests bind port 0 and read the
/// port back).
pub async fn serve_on(
    listener: TcpListener,
    cfg: AdminAuth,
    handle: AdminHandle,
    mut shutdown: ShutdownRx,
) -> Result<(), AdminError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    cfg.check_exposure(&addr)?;
    let tls = cfg.tls.as_ref().map(|t| t.acceptor.clone());
    info!(addr = %addr, user = %cfg.user, password = cfg.password.is_some(), tls = tls.is_some(), "admin console listening");
    let handlers = Arc::new(Handlers::new(cfg, handle));
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        let Some((socket, peer, permit)) =
            next_connection(&listener, &limit, &mut shutdown, "admin console", &addr).await
        else {
            break;
        };
        let handlers = handlers.clone();
        let tls = tls.clone();
        let span = info_span!("admin_session", peer = %peer);
        sessions.spawn(
            async move {
                let _permit = permit;
                debug!("admin session opened");
                if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                    debug!(error = %e, "admin session ended with an error");
                }
            }
            .instrument(span),
        );
    }
    info!(addr = %addr, "admin console stopped");
    sessions.abort_all();
    while sessions.join_next().await.is_some() {}
    Ok(())
}

/// The next connection of a server that serves at most `limit` at once (the admin console, the
/// metrics endpoint), with its slot; `None` once shutdown is requested. Accept errors (out of
/// file descriptors and the like) are transient: logged naming `what` and `addr`, retried.
pub(crate) async fn next_connection(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
    shutdown: &mut ShutdownRx,
    what: &str,
    addr: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // Both arms are cancel-safe: `requested` and `acquire_owned` lose nothing when dropped.
    let permit = tokio::select! {
        biased;
        _ = shutdown.requested() => return None,
        p = limit.clone().acquire_owned() => p.ok()?,
    };
    loop {
        // `accept` is cancel-safe: a connection is either returned or stays queued.
        tokio::select! {
            biased;
            _ = shutdown.requested() => return None,
            r = listener.accept() => match r {
                Ok((socket, peer)) => return Some((socket, peer, permit)),
                Err(e) => {
                    warn!(addr = %addr, error = %e, "{what}: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// The pgwire handler set: startup (auth) and simple queries.
struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<Queries>,
}

impl Handlers {
    fn new(auth: AdminAuth, handle: AdminHandle) -> Handlers {
        let scram: Option<Arc<dyn AuthMechanismFactory>> = auth.password.as_deref().map(|pw| {
            let source = Arc::new(PasswordSource::new(&auth.user, pw));
            let mut scram = ScramAuth::new(source);
            scram.set_iterations(SCRAM_ITERATIONS);
            Arc::new(scram) as Arc<dyn AuthMechanismFactory>
        });
        Handlers {
            startup: Arc::new(Startup {
                user: auth.user,
                scram,
                tls: auth.tls.is_some(),
                driver: AuthDriver::new(DefaultServerParameterProvider::default()),
            }),
            queries: Arc::new(Queries { handle }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// The SCRAM secret of the one console user: its salted password, derived once (4096
/// PBKDF2 rounds) with a random salt when the console starts.
struct PasswordSource {
    user: String,
    salt: Vec<u8>,
    salted_password: Vec<u8>,
}

impl PasswordSource {
    fn new(user: &str, password: &str) -> PasswordSource {
        let salt: [u8; 16] = rand::random();
        PasswordSource {
            user: user.to_owned(),
            salt: salt.to_vec(),
            salted_password: gen_salted_password(password, &salt, SCRAM_ITERATIONS),
        }
    }
}

impl Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordSource")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AuthSource for PasswordSource {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(
            Some(self.salt.clone()),
            self.salted_password.clone(),
        ))
    }
}

/// Startup: checks TLS and the user name, then SCRAM-SHA-256 authentication or none.
struct Startup {
    user: String,
    scram: Option<Arc<dyn AuthMechanismFactory>>,
    /// TLS is configured: plain connections are refused.
    tls: bool,
    driver: AuthDriver<DefaultServerParameterProvider>,
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".to_owned(),
        code.to_owned(),
        message,
    )))
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let outcome = match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.tls && !client.is_secure() {
                    warn!("admin console: refused a connection without TLS");
                    return Err(fatal(
                        "28000",
                        "the reshard admin console requires TLS (config key admin.tls_cert is \
                         set); connect with sslmode=require"
                            .to_owned(),
                    ));
                }
                let user = client.metadata().get(METADATA_USER).cloned();
                match user {
                    None => return Err(PgWireError::UserNameRequired),
                    Some(u) if u != self.user => {
                        warn!(user = %u, "admin console: refused a connection for an unknown user");
                        return Err(fatal(
                            "28000",
                            format!(
                                "user \"{u}\" may not connect to the reshard admin console; \
                                 connect as \"{}\" (config key admin.user)",
                                self.user
                            ),
                        ));
                    }
                    Some(_) => {}
                }
                match &self.scram {
                    Some(factory) => {
                        self.driver
                            .begin_authentication(client, factory.create())
                            .await?
                    }
                    None => AuthOutcome::Authenticated {
                        identity: None,
                        final_message: None,
                    },
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                match self.driver.advance_authentication(client, msg).await {
                    Ok(o) => o,
                    Err(e) => {
                        warn!(error = %e, "admin console: authentication failed");
                        // SCRAM clients leave the user name out of their messages (PostgreSQL
                        // takes it from the startup packet): name the user we checked.
                        return Err(match e {
                            PgWireError::InvalidPassword(_) => {
                                PgWireError::InvalidPassword(self.user.clone())
                            }
                            e => e,
                        });
                    }
                }
            }
            _ => return Ok(()),
        };
        match outcome {
            AuthOutcome::InProgress => Ok(()),
            AuthOutcome::Authenticated { final_message, .. } => {
                self.driver
                    .complete_authentication(client, final_message)
                    .await
            }
        }
    }
}

/// Simple-query execution.
struct Queries {
    handle: AdminHandle,
}

fn error_info(code: &str, message: String) -> Box<ErrorInfo> {
    Box::new(ErrorInfo::new("ERROR".to_owned(), code.to_owned(), message))
}

/// `text` columns, in the format the client asked for (binary `text` is the same bytes).
fn fields(columns: &[&str], format: &Format) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            FieldInfo::new(
                (*c).to_owned(),
                None,
                None,
                Type::TEXT,
                format.format_for(i),
            )
        })
        .collect()
}

fn to_response(rs: ResultSet, format: &Format) -> PgWireResult<Response> {
    let fields: Arc<Vec<FieldInfo>> = Arc::new(fields(&rs.columns, format));
    let mut enc = DataRowEncoder::new(fields.clone());
    let mut rows = Vec::with_capacity(rs.rows.len());
    for row in rs.rows {
        for v in row.iter().take(fields.len()) {
            enc.encode_field(v)?;
        }
        rows.push(Ok(enc.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

impl Queries {
    fn snapshot(&self) -> StatusSnapshot {
        self.handle.status.borrow().clone()
    }

    /// Runs one statement; `Err` is the `ErrorResponse` to send.
    async fn run<C>(
        &self,
        client: &mut C,
        cmd: AdminCommand,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: Sink<PgWireBackendMessage> + Unpin + Send,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let rs = match cmd {
            AdminCommand::ShowStatus => render::status(&self.snapshot()),
            AdminCommand::ShowShards => render::shards(&self.snapshot()),
            AdminCommand::ShowTables => render::tables(&self.snapshot()),
            AdminCommand::ShowLag => render::lag(&self.snapshot()),
            AdminCommand::ShowSpill => render::spill(&self.snapshot()),
            AdminCommand::ShowFences => render::fences(&self.snapshot()),
            AdminCommand::ShowThrottle => render::throttle(&self.snapshot()),
            AdminCommand::ShowReverse => render::reverse(&self.snapshot()),
            AdminCommand::ShowHelp => render::help(),
            AdminCommand::ShowStatusJson => render::status_json(&self.snapshot()).map_err(|e| {
                PgWireError::UserError(error_info(
                    "XX000",
                    format!("cannot encode the status as JSON: {e}"),
                ))
            })?,
            AdminCommand::Set => return Ok(Response::Execution(Tag::new("SET"))),
            AdminCommand::Pause(shard) => {
                return self
                    .control(client, "PAUSE", ControlCommand::Pause(shard))
                    .await
            }
            AdminCommand::Resume(shard) => {
                return self
                    .control(client, "RESUME", ControlCommand::Resume(shard))
                    .await
            }
            AdminCommand::Shutdown => {
                return self
                    .control(client, "SHUTDOWN", ControlCommand::Shutdown)
                    .await
            }
        };
        to_response(rs, format)
    }

    /// Forwards a command to the runtime; its answer becomes a NOTICE and the command tag.
    async fn control<C>(
        &self,
        client: &mut C,
        tag: &str,
        cmd: ControlCommand,
    ) -> PgWireResult<Response>
    where
        C: Sink<PgWireBackendMessage> + Unpin + Send,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let ControlCommand::Pause(Some(name)) | ControlCommand::Resume(Some(name)) = &cmd {
            let names: Vec<String> = self
                .handle
                .status
                .borrow()
                .shards
                .iter()
                .map(|s| s.name.clone())
                .collect();
            if !names.is_empty() && !names.iter().any(|n| n == name) {
                return Err(PgWireError::UserError(error_info(
                    "42704",
                    format!(
                        "shard \"{name}\" does not exist; shards are: {}",
                        names.join(", ")
                    ),
                )));
            }
        }
        info!(command = ?cmd, "admin console: forwarding command to the runtime");
        let answer = tokio::time::timeout(CONTROL_TIMEOUT, self.handle.command(cmd.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "reshard did not answer {tag} within {}s; check its log",
                    CONTROL_TIMEOUT.as_secs()
                ))
            });
        match answer {
            Ok(msg) => {
                let notice = ErrorInfo::new("NOTICE".to_owned(), "00000".to_owned(), msg);
                client
                    .send(PgWireBackendMessage::NoticeResponse(notice.into()))
                    .await?;
                Ok(Response::Execution(Tag::new(tag)))
            }
            Err(msg) => {
                // The runtime refuses a shard it does not know with "unknown shard …"; any
                // other refusal (a PAUSE still waiting for its effect) is a state error.
                let code = match &cmd {
                    ControlCommand::Pause(Some(_)) | ControlCommand::Resume(Some(_))
                        if msg.starts_with("unknown shard") =>
                    {
                        "42704"
                    }
                    _ => "55000",
                };
                Err(PgWireError::UserError(error_info(code, msg)))
            }
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let cmds = match command::parse(query) {
            Ok(c) => c,
            Err(e) => return Ok(vec![Response::Error(error_info("42601", e.to_string()))]),
        };
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match self.run(client, cmd, &Format::UnifiedText).await {
                Ok(r) => out.push(r),
                Err(PgWireError::UserError(info)) => {
                    // As PostgreSQL does, the first error ends the message.
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// The column names a statement returns (none for commands), for `Describe`.
fn columns_of(cmd: &AdminCommand) -> Vec<&'static str> {
    let empty = StatusSnapshot::default();
    match cmd {
        AdminCommand::ShowStatus => render::status(&empty).columns,
        AdminCommand::ShowStatusJson => vec!["status"],
        AdminCommand::ShowShards => render::shards(&empty).columns,
        AdminCommand::ShowTables => render::tables(&empty).columns,
        AdminCommand::ShowLag => render::lag(&empty).columns,
        AdminCommand::ShowSpill => render::spill(&empty).columns,
        AdminCommand::ShowFences => render::fences(&empty).columns,
        AdminCommand::ShowThrottle => render::throttle(&empty).columns,
        AdminCommand::ShowReverse => render::reverse(&empty).columns,
        AdminCommand::ShowHelp => render::help().columns,
        AdminCommand::Pause(_)
        | AdminCommand::Resume(_)
        | AdminCommand::Shutdown
        | AdminCommand::Set => Vec::new(),
    }
}

/// Parses the one statement of a `Parse` message.
#[derive(Debug)]
struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = AdminCommand;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<AdminCommand>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut cmds = command::parse(sql)
            .map_err(|e| PgWireError::UserError(error_info("42601", e.to_string())))?;
        if cmds.len() > 1 {
            return Err(PgWireError::UserError(error_info(
                "42601",
                "cannot insert multiple commands into a prepared statement; send them one by one"
                    .to_owned(),
            )));
        }
        Ok(cmds.pop())
    }

    fn get_parameter_types(&self, _stmt: &AdminCommand) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new())
    }

    fn get_result_schema(
        &self,
        stmt: &AdminCommand,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(fields(
            &columns_of(stmt),
            column_format.unwrap_or(&Format::UnifiedText),
        ))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = AdminCommand;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::new(Parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<AdminCommand>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = AdminCommand>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !portal.parameters.is_empty() {
            return Err(PgWireError::UserError(error_info(
                "42P02",
                "admin console commands take no parameters".to_owned(),
            )));
        }
        let cmd = portal.statement.statement.clone();
        self.run(client, cmd, &portal.result_column_format).await
    }
}
