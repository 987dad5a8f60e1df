//! Connection settings, parsed the way libpq parses them, and opening connections with them.
//!
//! In: a libpq connection string, either a URL (`postgres://user:pw@host:port/db?sslmode=...`)
//! or `key=value` pairs, plus the `PG*` environment variables and the password file. Out: a
//! validated [`ConnConfig`], a raw byte stream for the replication client, and ordinary
//! `tokio_postgres` clients ([`ConnConfig::connect_sql`]) with the same host, credentials and TLS
//! policy, for every other stage.
//!
//! Invariant kept here: the password never appears in logs ([`ConnConfig::redacted`], `Debug`),
//! and TLS is never weaker than `sslmode` asks for.
//!
//! See <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING>,
//! <https://www.postgresql.org/docs/current/libpq-envars.html> and
//! <https://www.postgresql.org/docs/current/libpq-pgpass.html>.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::wire::Transport;
use super::{from_pg_error, SourceError};
use crate::pg::conn::drive_connection;

/// libpq's `sslmode`. See
/// <https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-PROTECTION>.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (`allow` maps here too).
    #[default]
    Prefer,
    /// TLS required; the certificate is not verified (unless `sslrootcert` is given, then as
    /// `verify-ca`, like libpq).
    Require,
    /// TLS required; the certificate chain must lead to a trusted root; the host name is not
    /// checked.
    VerifyCa,
    /// TLS required; chain and host name are verified.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<SslMode, SourceError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            // `allow` tries plain first; reshard tries TLS first, which is never weaker.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(SourceError::Config {
                    key: "sslmode".into(),
                    message: format!(
                        "{other:?} is not one of disable, allow, prefer, require, verify-ca, \
                         verify-full"
                    ),
                })
            }
        })
    }
}

/// Where and how to connect. Built by [`ConnConfig::parse`]; fields are public so that tests
/// and the CLI can adjust them.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnConfig {
    /// Host name, IP address, or a directory holding the server's unix socket (starts with `/`).
    pub host: String,
    /// TCP port (also names the unix socket file `.s.PGSQL.<port>`).
    pub port: u16,
    /// Login role.
    pub user: String,
    /// Password, from the string, `PGPASSWORD` or the password file.
    pub password: Option<String>,
    /// Database.
    pub dbname: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// PEM file of trusted root certificates; the Mozilla roots (webpki-roots) when unset.
    pub sslrootcert: Option<PathBuf>,
    /// `application_name` shown in `pg_stat_activity` (default `reshard`).
    pub application_name: String,
    /// Gives up connecting after this long (`connect_timeout`, seconds; at least 2 like libpq).
    /// Unlike libpq, reshard never waits forever: unset or `0` means
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Option<Duration>,
    /// Server options sent at startup (`options`, e.g. `-c statement_timeout=0`).
    pub options: Option<String>,
}

impl fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for ConnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for ConnConfig {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<ConnConfig, SourceError> {
        ConnConfig::parse(s)
    }
}

/// Connect (TCP, TLS and startup) timeout when `connect_timeout` is unset or 0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Setting names accepted in a connection string.
const KNOWN_KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "options",
];

fn config_err(key: &str, message: impl Into<String>) -> SourceError {
    SourceError::Config {
        key: key.to_owned(),
        message: message.into(),
    }
}

impl ConnConfig {
    /// Parses a libpq connection string, filling gaps from the process environment (`PGHOST`,
    /// `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`,
    /// `PGAPPNAME`, `PGCONNECT_TIMEOUT`) and the password file (`PGPASSFILE` or `~/.pgpass`).
    pub fn parse(s: &str) -> Result<ConnConfig, SourceError> {
        ConnConfig::parse_with_env(s, &|k| std::env::var(k).ok())
    }

    /// [`ConnConfig::parse`] with an explicit environment (for tests and embedding).
    pub fn parse_with_env(
        s: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnConfig, SourceError> {
        let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_url(s)?
        } else {
            parse_keyword_value(s)?
        };
        let env_nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
        let mut cfg = ConnConfig {
            host: env_nonempty("PGHOST").unwrap_or_else(|| "localhost".into()),
            port: 5432,
            user: env_nonempty("PGUSER")
                .or_else(|| env_nonempty("USER"))
                .unwrap_or_else(|| "postgres".into()),
            password: env("PGPASSWORD"),
            dbname: String::new(),
            sslmode: SslMode::Prefer,
            sslrootcert: env_nonempty("PGSSLROOTCERT").map(PathBuf::from),
            application_name: env_nonempty("PGAPPNAME").unwrap_or_else(|| "reshard".into()),
            connect_timeout: None,
            options: env_nonempty("PGOPTIONS"),
        };
        let mut dbname = env_nonempty("PGDATABASE");
        let mut port = env_nonempty("PGPORT").map(|p| ("PGPORT", p));
        let mut sslmode = env_nonempty("PGSSLMODE").map(|m| ("PGSSLMODE", m));
        let mut timeout = env_nonempty("PGCONNECT_TIMEOUT").map(|t| ("PGCONNECT_TIMEOUT", t));
        let mut app_set = false;
        let mut fallback_app = None;
        for (k, v) in pairs {
            match k.as_str() {
                "host" => cfg.host = v,
                "port" => port = Some(("port", v)),
                "user" => cfg.user = v,
                "password" => cfg.password = Some(v),
                "dbname" => dbname = Some(v),
                "sslmode" => sslmode = Some(("sslmode", v)),
                "sslrootcert" => cfg.sslrootcert = Some(PathBuf::from(v)),
                "application_name" => {
                    cfg.application_name = v;
                    app_set = true;
                }
                "fallback_application_name" => fallback_app = Some(v),
                "connect_timeout" => timeout = Some(("connect_timeout", v)),
                "options" => cfg.options = Some(v),
                other => {
                    return Err(config_err(
                        other,
                        format!(
                            "unknown connection option; reshard understands {}",
                            KNOWN_KEYS.join(", ")
                        ),
                    ))
                }
            }
        }
        if let (false, Some(f), None) = (app_set, fallback_app, env_nonempty("PGAPPNAME")) {
            cfg.application_name = f;
        }
        if cfg.host.contains(',') {
            return Err(config_err(
                "host",
                format!(
                    "{:?} lists several hosts; reshard connects to exactly one",
                    cfg.host
                ),
            ));
        }
        if cfg.host.is_empty() {
            cfg.host = "localhost".into();
        }
        if let Some((key, p)) = port {
            cfg.port = p
                .trim()
                .parse()
                .map_err(|_| config_err(key, format!("{p:?} is not a port number (1-65535)")))?;
            if cfg.port == 0 {
                return Err(config_err(key, "port 0 is not a port number (1-65535)"));
            }
        }
        if let Some((key, m)) = sslmode {
            cfg.sslmode = m.parse().map_err(|e| match e {
                SourceError::Config { message, .. } => config_err(key, message),
                e => e,
            })?;
        }
        if let Some((key, t)) = timeout {
            let secs: i64 = t
                .trim()
                .parse()
                .map_err(|_| config_err(key, format!("{t:?} is not a whole number of seconds")))?;
            // libpq: zero or negative waits forever; 1 is raised to 2.
            cfg.connect_timeout = (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64));
        }
        cfg.dbname = dbname
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| cfg.user.clone());
        if cfg.password.is_none() {
            let path = env_nonempty("PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let Some(path) = path {
                cfg.password = read_pgpass(&path, &cfg);
            }
        }
        Ok(cfg)
    }

    /// The settings without the password, for logs: `host=... port=... user=... dbname=...
    /// sslmode=... application_name=...`.
    pub fn redacted(&self) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={} sslmode={} application_name={}",
            self.host,
            self.port,
            self.user,
            self.dbname,
            self.sslmode.as_str(),
            self.application_name
        );
        if self.password.is_some() {
            s.push_str(" password=********");
        }
        if let Some(r) = &self.sslrootcert {
            s.push_str(&format!(" sslrootcert={}", r.display()));
        }
        s
    }

    /// `connect_timeout`, or [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn effective_connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// Whether `host` names a unix-socket directory.
    fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The certificate check `sslmode` (and `sslrootcert`) calls for.
    fn verification(&self) -> Verification {
        match self.sslmode {
            SslMode::Disable => Verification::None,
            SslMode::Prefer => Verification::AcceptAny,
            // libpq: "if a root CA file exists, require behaves like verify-ca".
            SslMode::Require if self.sslrootcert.is_some() => Verification::Chain,
            SslMode::Require => Verification::AcceptAny,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::Full,
        }
    }

    /// The rustls client configuration for this `sslmode`, `None` for `disable`.
    pub fn tls_config(&self) -> Result<Option<rustls::ClientConfig>, SourceError> {
        let verification = self.verification();
        if verification == Verification::None {
            return Ok(None);
        }
        let tls_err = |message: String| SourceError::Tls {
            host: self.host.clone(),
            message,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(format!("TLS setup: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::AcceptAny => Arc::new(AcceptAnyCert(provider)),
            Verification::Chain | Verification::Full => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| tls_err(format!("building the certificate verifier: {e}")))?;
                if verification == Verification::Full {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            Verification::None => return Ok(None),
        };
        Ok(Some(
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
        ))
    }

    fn root_store(&self) -> Result<RootCertStore, SourceError> {
        let mut store = RootCertStore::empty();
        match &self.sslrootcert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    config_err(
                        "sslrootcert",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let mut n = 0;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| {
                        config_err(
                            "sslrootcert",
                            format!("{} is not valid PEM: {e}", path.display()),
                        )
                    })?;
                    store.add(cert).map_err(|e| {
                        config_err(
                            "sslrootcert",
                            format!("a certificate in {} is unusable: {e}", path.display()),
                        )
                    })?;
                    n += 1;
                }
                if n == 0 {
                    return Err(config_err(
                        "sslrootcert",
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
            }
            None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(store)
    }

    /// Opens the byte stream for the replication client: TCP (with TLS negotiated as `sslmode`
    /// says) or a unix socket. Returns whether TLS is on.
    pub(crate) async fn open_transport(&self) -> Result<(Transport, bool), SourceError> {
        let t = self.effective_connect_timeout();
        tokio::time::timeout(t, self.open_transport_inner())
            .await
            .unwrap_or_else(|_| {
                Err(SourceError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    source: format!("connect_timeout of {}s expired", t.as_secs()).into(),
                })
            })
    }

    async fn open_transport_inner(&self) -> Result<(Transport, bool), SourceError> {
        let connect_err = |e: std::io::Error| SourceError::Connect {
            host: self.host.clone(),
            port: self.port,
            source: Box::new(e),
        };
        if self.is_unix_socket() {
            // libpq never uses TLS over a unix socket.
            let path = Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port));
            let s = UnixStream::connect(&path).await.map_err(connect_err)?;
            return Ok((Transport::Unix(s), false));
        }
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = self.tls_config()? else {
            return Ok((Transport::Tcp(tcp), false));
        };
        // SSLRequest, then one byte: 'S' (go ahead) or 'N' (no TLS here).
        // See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>.
        let mut req = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(connect_err)?;
        let answer = tcp.read_u8().await.map_err(connect_err)?;
        match answer {
            b'S' => {}
            b'N' if self.sslmode == SslMode::Prefer => return Ok((Transport::Tcp(tcp), false)),
            b'N' => {
                return Err(SourceError::Tls {
                    host: self.host.clone(),
                    message: format!(
                        "the server does not accept TLS but sslmode={}; enable ssl on the \
                         server or use sslmode=prefer",
                        self.sslmode.as_str()
                    ),
                })
            }
            other => {
                return Err(SourceError::protocol(format!(
                    "unexpected answer {:?} to SSLRequest",
                    char::from(other)
                )))
            }
        }
        let name = ServerName::try_from(self.host.clone()).map_err(|e| SourceError::Tls {
            host: self.host.clone(),
            message: format!("{:?} is not a valid TLS server name: {e}", self.host),
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| SourceError::Tls {
                host: self.host.clone(),
                message: format!(
                    "handshake failed: {e} (sslmode={}; with verify-ca/verify-full set \
                     sslrootcert to the CA that signed the server certificate)",
                    self.sslmode.as_str()
                ),
            })?;
        Ok((Transport::Tls(Box::new(stream)), true))
    }

    /// The same settings as a `tokio_postgres::Config` (no replication).
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.is_unix_socket() {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .keepalives(true)
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        c.connect_timeout(self.effective_connect_timeout());
        if let Some(o) = &self.options {
            c.options(o);
        }
        c
    }

    /// Opens an ordinary (non-replication) SQL connection with these settings and the same TLS
    /// policy. The connection's I/O runs in a spawned tokio task that logs how it ended; the
    /// returned client reports `is_closed()` once it has. Its commits are durable before they
    /// are answered ([`crate::pg::conn::DURABLE_COMMITS_SQL`]): every reshard session writes
    /// progress, chunk records, steps or layouts that later decisions trust. No timeout set for
    /// the role or database applies to it ([`crate::pg::conn::NO_SESSION_TIMEOUTS_SQL`]).
    /// The whole connection (TCP, TLS, startup, authentication and the session's setup) is
    /// bounded by `connect_timeout` (tokio-postgres bounds only the TCP connect): a port that
    /// accepts but never answers (not PostgreSQL's, a hung server) is an error naming it.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SourceError> {
        let t = self.effective_connect_timeout();
        tokio::time::timeout(t, self.connect_sql_unbounded())
            .await
            .unwrap_or_else(|_| {
                Err(SourceError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    source: format!(
                        "connect_timeout of {}s expired during startup: the server accepted the connection but did not answer",
                        t.as_secs()
                    )
                    .into(),
                })
            })
    }

    async fn connect_sql_unbounded(&self) -> Result<tokio_postgres::Client, SourceError> {
        let cfg = self.to_tokio_postgres();
        let map = |e| from_pg_error(e, &self.host, self.port, &self.user, "connecting");
        let target = format!("{}:{}/{}", self.host, self.port, self.dbname);
        let client = match self.tls_config()? {
            Some(tls) if !self.is_unix_socket() => {
                let (client, conn) = cfg
                    .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                    .await
                    .map_err(map)?;
                tokio::spawn(async move {
                    if let Err(e) = drive_connection(conn, target.clone()).await {
                        tracing::warn!(target_db = %target, error = %crate::pg::conn::error_text(&e), "SQL connection ended with an error");
                    }
                });
                client
            }
            _ => {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(map)?;
                tokio::spawn(async move {
                    if let Err(e) = drive_connection(conn, target.clone()).await {
                        tracing::warn!(target_db = %target, error = %crate::pg::conn::error_text(&e), "SQL connection ended with an error");
                    }
                });
                client
            }
        };
        // One round trip for both.
        let setup = format!(
            "{}; {}",
            crate::pg::conn::DURABLE_COMMITS_SQL,
            crate::pg::conn::NO_SESSION_TIMEOUTS_SQL
        );
        client.batch_execute(&setup).await.map_err(|e| {
            from_pg_error(
                e,
                &self.host,
                self.port,
                &self.user,
                "setting synchronous_commit and clearing the role's session timeouts",
            )
        })?;
        Ok(client)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Verification {
    None,
    AcceptAny,
    Chain,
    Full,
}

/// `sslmode=require`/`prefer`: encrypt, but accept any certificate (libpq does the same). The
/// handshake signatures are still checked against the presented certificate.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must verify; a host-name mismatch is accepted. webpki checks
/// the chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Splits a URL into libpq `(key, value)` pairs, percent-decoded.
fn parse_url(s: &str) -> Result<Vec<(String, String)>, SourceError> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or_else(|| config_err("url", "must start with postgres:// or postgresql://"))?;
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    // The authority ends at the first '/' after the userinfo.
    let at = main.rfind('@');
    let auth_end = main[at.map_or(0, |a| a + 1)..]
        .find('/')
        .map(|i| i + at.map_or(0, |a| a + 1))
        .unwrap_or(main.len());
    let (authority, path) = main.split_at(auth_end);
    let mut pairs = Vec::new();
    let hostport = match authority.rfind('@') {
        Some(a) => {
            let userinfo = &authority[..a];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    if !u.is_empty() {
                        pairs.push(("user".into(), decode("user", u)?));
                    }
                    pairs.push(("password".into(), decode("password", p)?));
                }
                None if !userinfo.is_empty() => {
                    pairs.push(("user".into(), decode("user", userinfo)?))
                }
                None => {}
            }
            &authority[a + 1..]
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| config_err("host", format!("unclosed '[' in {hostport:?}")))?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() {
        pairs.push(("host".into(), decode("host", host)?));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        pairs.push(("port".into(), decode("port", p)?));
    }
    if let Some(db) = path.strip_prefix('/').filter(|d| !d.is_empty()) {
        pairs.push(("dbname".into(), decode("dbname", db)?));
    }
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        if kv.is_empty() {
            continue;
        }
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| config_err(kv, "URL parameter without '='; write key=value"))?;
        let k = decode(k, k)?;
        let v = decode(&k, v)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

fn decode(key: &str, s: &str) -> Result<String, SourceError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| config_err(key, "percent-encoded value is not UTF-8"))
}

/// Splits `key=value key='quoted \' value'` into pairs.
fn parse_keyword_value(s: &str) -> Result<Vec<(String, String)>, SourceError> {
    let mut pairs = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(config_err(
                &key,
                "missing '=' after the setting name; write key=value",
            ));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => {
                        return Err(config_err(
                            &key,
                            "unterminated quoted value; close it with '",
                        ))
                    }
                    Some('\'') => break,
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => return Err(config_err(&key, "backslash at the end of the value")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    match it.next() {
                        Some(e) => value.push(e),
                        None => return Err(config_err(&key, "backslash at the end of the value")),
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Reads the password file, ignoring it (with a warning) when others can read it, as libpq does.
fn read_pgpass(path: &Path, cfg: &ConnConfig) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access; ignoring it (chmod 0600 it)"
            );
            return None;
        }
    }
    if !meta.is_file() {
        return None;
    }
    let contents = std::fs::read_to_string(path).ok()?;
    // A unix socket in any directory matches the `localhost` entry, like libpq's default socket.
    let host = if cfg.host.starts_with('/') {
        "localhost"
    } else {
        cfg.host.as_str()
    };
    pgpass_lookup(&contents, host, cfg.port, &cfg.dbname, &cfg.user)
}

/// The password of the first `.pgpass` line `hostname:port:database:username:password` that
/// matches. `*` matches anything; `\:` and `\\` stand for `:` and `\`; `#` starts a comment line.
pub fn pgpass_lookup(
    contents: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), dbname, user];
    for line in contents.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields: Vec<String> = vec![String::new()];
        let mut raw: Vec<bool> = vec![true]; // whether the field is exactly an unescaped "*"
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            let n = fields.len();
            match (c, fields.last_mut(), raw.last_mut()) {
                ('\\', Some(cur), Some(r)) => {
                    if let Some(e) = chars.next() {
                        cur.push(e);
                        *r = false;
                    }
                }
                (':', _, _) if n < 5 => {
                    fields.push(String::new());
                    raw.push(true);
                }
                (c, Some(cur), _) => cur.push(c),
                _ => break,
            }
        }
        if fields.len() != 5 {
            continue;
        }
        let matches = wanted.iter().enumerate().all(|(i, w)| {
            let f = &fields[i];
            (f == "*" && raw[i]) || f == w
        });
        if matches {
            return fields.pop();
        }
    }
    None
}

/// An ordinary SQL connection to the source for a long-lived poller (the supervisor's status
/// poll and idle heartbeat, the reverse-stream watcher) that survives a source restart: a
/// closed (or [`SqlSession::reset`]) client is replaced by a new connection, tried again on a
/// doubling backoff (1 s up to 30 s) while the source does not answer.
pub struct SqlSession {
    conn: ConnConfig,
    client: Option<tokio_postgres::Client>,
    retry_at: Option<std::time::Instant>,
    backoff: Duration,
}

impl SqlSession {
    const FIRST_BACKOFF: Duration = Duration::from_secs(1);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    /// A session on `conn`, starting with `client` if one is already open.
    pub fn new(conn: ConnConfig, client: Option<tokio_postgres::Client>) -> SqlSession {
        SqlSession {
            conn,
            client,
            retry_at: None,
            backoff: Self::FIRST_BACKOFF,
        }
    }

    /// The open client, reconnecting first if the last one closed. Errs (naming the source and
    /// when the next attempt is) while the source cannot be reached.
    pub async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let now = std::time::Instant::now();
            if let Some(at) = self.retry_at.filter(|at| now < *at) {
                return Err(format!(
                    "the connection to the source {}:{}/{} is closed; reconnecting in {:.0?}",
                    self.conn.host,
                    self.conn.port,
                    self.conn.dbname,
                    at - now
                ));
            }
            match self.conn.connect_sql().await {
                Ok(c) => {
                    if self.retry_at.take().is_some() {
                        tracing::info!(host = %self.conn.host, port = self.conn.port, "reconnected to the source");
                    }
                    self.backoff = Self::FIRST_BACKOFF;
                    self.client = Some(c);
                }
                Err(e) => {
                    self.retry_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
                    return Err(format!("reconnecting to the source: {e}"));
                }
            }
        }
        self.client
            .as_ref()
            .ok_or_else(|| "no connection to the source".to_owned())
    }

    /// Drops the client (after an error that may have left it unusable): the next
    /// [`SqlSession::client`] connects again.
    pub fn reset(&mut self) {
        self.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(s: &str, env: &[(&str, &str)]) -> Result<ConnConfig, SourceError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConnConfig::parse_with_env(s, &|k| env.get(k).cloned())
    }

    #[test]
    fn url_with_everything() {
        let c = parse(
            "postgres://al%40ice:p%3Aw%2Fd@db.example.com:6543/my%20db?sslmode=verify-full&application_name=mover&connect_timeout=1",
            &[],
        )
        .unwrap();
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password.as_deref(), Some("p:w/d"));
        assert_eq!(c.host, "db.example.com");
        assert_eq!(c.port, 6543);
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.application_name, "mover");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)));
        assert!(!c.redacted().contains("p:w/d"));
        assert!(!format!("{c:?}").contains("p:w/d"));
    }

    #[test]
    fn url_minimal_ipv6_and_env_defaults() {
        let c = parse(
            "postgresql://[::1]:5433",
            &[
                ("PGUSER", "u1"),
                ("PGDATABASE", "d1"),
                ("PGPASSWORD", "envpw"),
            ],
        )
        .unwrap();
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5433);
        assert_eq!(c.user, "u1");
        assert_eq!(c.dbname, "d1");
        assert_eq!(c.password.as_deref(), Some("envpw"));
        assert_eq!(c.sslmode, SslMode::Prefer);
        let c = parse(
            "postgres://",
            &[("PGHOST", "h"), ("PGPORT", "7000"), ("USER", "me")],
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("h", 7000));
        assert_eq!(c.user, "me");
        assert_eq!(c.dbname, "me", "dbname defaults to the user");
        let c = parse("postgres://u@/sock?host=%2Ftmp%2Fpg", &[]).unwrap();
        assert_eq!(c.host, "/tmp/pg");
        assert_eq!(c.dbname, "sock");
    }

    #[test]
    fn keyword_value_with_quotes_and_escapes() {
        let c = parse(
            r"host=10.0.0.1 port = 5439 user=bob password='it\'s a \\secret' dbname=app sslmode=require sslrootcert=/etc/ca.pem application_name=x\ y connect_timeout=10",
            &[("PGPASSWORD", "ignored")],
        )
        .unwrap();
        assert_eq!(c.host, "10.0.0.1");
        assert_eq!(c.port, 5439);
        assert_eq!(c.user, "bob");
        assert_eq!(c.password.as_deref(), Some(r"it's a \secret"));
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.sslrootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(c.application_name, "x y");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            c.verification(),
            Verification::Chain,
            "require + root file = verify-ca"
        );
        let c = parse("", &[]).unwrap();
        assert_eq!(c.host, "localhost");
        assert_eq!(c.port, 5432);
    }

    #[test]
    fn bad_settings_name_the_key() {
        for (s, key) in [
            ("host=a port=x", "port"),
            ("host=a port=70000", "port"),
            ("sslmode=sometimes", "sslmode"),
            ("host=a bogus=1", "bogus"),
            ("host='unterminated", "host"),
            ("host", "host"),
            ("postgres://h/db?sslmode=nope", "sslmode"),
            ("postgres://h1,h2/db", "host"),
            ("connect_timeout=soon", "connect_timeout"),
        ] {
            match parse(s, &[]) {
                Err(SourceError::Config { key: k, message }) => {
                    assert_eq!(k, key, "{s}: {message}")
                }
                other => panic!("{s}: expected a Config error, got {other:?}"),
            }
        }
        let e = parse("", &[("PGPORT", "nope")]).unwrap_err();
        assert!(matches!(e, SourceError::Config { key, .. } if key == "PGPORT"));
    }

    #[test]
    fn pgpass_matching() {
        let file = "# comment\n\
                    other:5432:*:bob:wrong-host\n\
                    db\\:1:5432:app:bob:escaped-colon-host\n\
                    *:5432:app:bob:pw\\:with\\\\colon\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(file, "db:1", 5432, "app", "bob").as_deref(),
            Some("escaped-colon-host")
        );
        assert_eq!(
            pgpass_lookup(file, "h", 5432, "app", "bob").as_deref(),
            Some(r"pw:with\colon")
        );
        assert_eq!(
            pgpass_lookup(file, "h", 5433, "app", "bob").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_lookup("h:1:d:u\n", "h", 1, "d", "u"),
            None,
            "4 fields"
        );
        assert_eq!(
            pgpass_lookup("\\*:1:d:u:p\n", "h", 1, "d", "u"),
            None,
            "an escaped * is literal"
        );
    }

    #[test]
    fn pgpass_file_is_read_when_no_password_given() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "127.0.0.1:6000:app:carol:from-file\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = path.to_str().unwrap();
        let c = parse(
            "host=127.0.0.1 port=6000 dbname=app user=carol",
            &[("PGPASSFILE", p)],
        )
        .unwrap();
        assert_eq!(c.password.as_deref(), Some("from-file"));
        let c = parse(
            "host=127.0.0.1 port=6000 dbname=app user=carol password=given",
            &[("PGPASSFILE", p)],
        )
        .unwrap();
        assert_eq!(c.password.as_deref(), Some("given"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = parse(
            "host=127.0.0.1 port=6000 dbname=app user=carol",
            &[("PGPASSFILE", p)],
        )
        .unwrap();
        assert_eq!(
            c.password, None,
            "a world-readable password file is ignored"
        );
    }

    #[test]
    fn tls_configs_build_for_every_mode() {
        for mode in ["prefer", "require", "verify-ca", "verify-full"] {
            let c = parse(&format!("host=db sslmode={mode}"), &[]).unwrap();
            assert!(c.tls_config().unwrap().is_some(), "{mode}");
        }
        let c = parse("host=db sslmode=disable", &[]).unwrap();
        assert!(c.tls_config().unwrap().is_none());
        let c = parse(
            "host=db sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            &[],
        )
        .unwrap();
        assert!(
            matches!(c.tls_config(), Err(SourceError::Config { key, .. }) if key == "sslrootcert")
        );
    }
}
