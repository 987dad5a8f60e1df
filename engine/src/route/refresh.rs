//! Keeping the account map current (`hash = "map"`).
//!
//! In: the configured map origin (a CSV file or `map_query` on the source), a timer
//! (`[routing] map_refresh_secs`), SIGHUP, the CSV file's modification time, and re-lookup
//! requests from the ingest when a change names an account the map does not know. Out: each
//! accepted map on a `watch` channel; the ingest swaps it in between transactions.
//!
//! Invariant kept here: **a refresh never re-routes an account.** A map that moves an account
//! the map in use routes elsewhere is refused whole ([`AccountMap::refreshed`]); the previous
//! map stays in use and the error is logged and shown in the status. Accounts missing from a
//! fresh read keep their shard. Re-lookups are bounded: at most one read per
//! [`RELOOKUP_MIN_INTERVAL`], however many unknown accounts ask.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use super::error::RouteError;
use super::map::AccountMap;
use crate::config::{Config, HashKind};
use crate::shutdown::ShutdownRx;
use crate::source::ConnConfig;
// Defined in the ground (the status shows it); re-exported where it is made.
pub use crate::status::MapStatus;

/// Shortest time between two reads of the map caused by unknown accounts.
pub const RELOOKUP_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait of the ingest for a re-lookup.
pub const RELOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the map is read from.
#[derive(Clone, Debug)]
pub enum MapOrigin {
    /// A CSV file.
    Csv(PathBuf),
    /// A query on the source.
    Query {
        /// The source.
        conn: ConnConfig,
        /// `[routing] map_query`.
        sql: String,
    },
}

/// How to read the account map.
#[derive(Clone, Debug)]
pub struct MapSource {
    /// The origin.
    pub origin: MapOrigin,
    /// Shard names.
    pub shards: Vec<String>,
    /// `[routing] default_shard`.
    pub default_shard: Option<String>,
}

/// `hash = "map"` with neither `map` nor `map_query`: nothing could be routed.
pub fn no_map_configured() -> RouteError {
    RouteError::Config(
        "[routing] hash = \"map\" needs an account map: set [routing] map (a CSV file) or map_query".into(),
    )
}

impl MapSource {
    /// The map source of `cfg`, or `None` with `hash = "postgres"`.
    pub fn from_config(cfg: &Config) -> Result<Option<MapSource>, RouteError> {
        if cfg.routing.hash != HashKind::Map {
            return Ok(None);
        }
        let origin = if let Some(path) = &cfg.routing.map {
            MapOrigin::Csv(path.clone())
        } else if let Some(q) = &cfg.routing.map_query {
            MapOrigin::Query {
                conn: ConnConfig::parse(&cfg.source.url)
                    .map_err(|e| RouteError::Config(format!("[source] url: {e}")))?,
                sql: q.clone(),
            }
        } else {
            return Err(no_map_configured());
        };
        Ok(Some(MapSource {
            origin,
            shards: cfg.shard_names(),
            default_shard: cfg.routing.default_shard.clone(),
        }))
    }

    /// Reads the map. `client` is reused (and set) for `map_query`.
    pub async fn load(
        &self,
        client: &mut Option<tokio_postgres::Client>,
    ) -> Result<AccountMap, RouteError> {
        let map = match &self.origin {
            MapOrigin::Csv(path) => {
                let (path, shards) = (path.clone(), self.shards.clone());
                tokio::task::spawn_blocking(move || AccountMap::from_csv_path(&path, &shards))
                    .await
                    .map_err(|e| RouteError::Config(format!("reading the account map: {e}")))??
            }
            MapOrigin::Query { conn, sql } => {
                let failed = |e: String| RouteError::MapQuery {
                    query: sql.clone(),
                    message: e,
                };
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    *client = Some(
                        conn.connect_sql()
                            .await
                            .map_err(|e| failed(e.to_string()))?,
                    );
                }
                let Some(c) = client.as_ref() else {
                    return Err(failed("no connection".into()));
                };
                let rows = c
                    .simple_query(sql)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let pairs: Vec<(String, String)> = rows
                    .iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                            r.get(0).unwrap_or_default().to_owned(),
                            r.get(1).unwrap_or_default().to_owned(),
                        )),
                        _ => None,
                    })
                    .collect();
                AccountMap::from_pairs(&self.shards, pairs)?
            }
        };
        match &self.default_shard {
            Some(d) => map.with_default(d),
            None => Ok(map),
        }
    }

    fn csv_mtime(&self) -> Option<SystemTime> {
        match &self.origin {
            MapOrigin::Csv(p) => std::fs::metadata(p).and_then(|m| m.modified()).ok(),
            MapOrigin::Query { .. } => None,
        }
    }
}

/// The ingest's end: the current map, and re-lookups.
pub struct MapHandle {
    rx: watch::Receiver<Arc<AccountMap>>,
    ask: mpsc::Sender<std::sync::mpsc::SyncSender<()>>,
}

impl MapHandle {
    /// The map, if it changed since the last call.
    pub fn changed(&mut self) -> Option<Arc<AccountMap>> {
        if self.rx.has_changed().unwrap_or(false) {
            Some(self.rx.borrow_and_update().clone())
        } else {
            None
        }
    }

    /// Asks for an immediate read of the map and waits for it (at most [`RELOOKUP_TIMEOUT`];
    /// blocking: for the ingest's own thread, while the refresher runs on another runtime).
    /// Returns the map in use afterwards if it changed.
    pub fn relookup_blocking(&mut self) -> Option<Arc<AccountMap>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.ask.try_send(tx).is_ok() {
            tracing::info!(timeout = ?RELOOKUP_TIMEOUT, "an unknown account: waiting for a re-read of the account map");
            if rx.recv_timeout(RELOOKUP_TIMEOUT).is_err() {
                tracing::warn!(timeout = ?RELOOKUP_TIMEOUT, "the account map re-read did not finish in time");
            }
        }
        self.changed()
    }
}

/// Reads the map again on its timer, on SIGHUP, when the CSV file changes, and when asked.
pub struct MapRefresher {
    source: MapSource,
    every: Option<Duration>,
    current: Arc<AccountMap>,
    tx: watch::Sender<Arc<AccountMap>>,
    ask: mpsc::Receiver<std::sync::mpsc::SyncSender<()>>,
    status: Arc<Mutex<MapStatus>>,
    client: Option<tokio_postgres::Client>,
}

impl MapRefresher {
    /// A refresher starting from `initial` (already loaded), and the ingest's handle.
    pub fn new(
        source: MapSource,
        initial: Arc<AccountMap>,
        every: Option<Duration>,
    ) -> (MapRefresher, MapHandle) {
        let (tx, rx) = watch::channel(initial.clone());
        let (ask_tx, ask_rx) = mpsc::channel(1);
        let status = Arc::new(Mutex::new(MapStatus {
            accounts: initial.len() as u64,
            ..MapStatus::default()
        }));
        (
            MapRefresher {
                source,
                every,
                current: initial,
                tx,
                ask: ask_rx,
                status,
                client: None,
            },
            MapHandle { rx, ask: ask_tx },
        )
    }

    /// The status the supervisor shows.
    pub fn status(&self) -> Arc<Mutex<MapStatus>> {
        self.status.clone()
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut shutdown: ShutdownRx) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let every = self.every.unwrap_or(Duration::from_secs(3600));
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        let mut mtime = self.source.csv_mtime();
        let mut last_relookup: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                // This is cancellation-safe.
                _ = shutdown.requested() => return,
                // This is cancellation-safe (mpsc recv).
                Some(reply) = self.ask.recv() => {
                    if let Some(at) = last_relookup {
                        let wait = RELOOKUP_MIN_INTERVAL.saturating_sub(at.elapsed());
                        tokio::time::sleep(wait).await;
                    }
                    self.refresh("an unknown account").await;
                    last_relookup = Some(Instant::now());
                    let _ = reply.send(());
                }
                // This is cancellation-safe (a signal stream).
                Some(()) = recv_signal(&mut hup) => self.refresh("SIGHUP").await,
                // This is cancellation-safe.
                _ = timer.tick(), if self.every.is_some() => self.refresh("timer").await,
                // This is cancellation-safe.
                _ = poll.tick(), if mtime.is_some() => {
                    let now = self.source.csv_mtime();
                    if now.is_some() && now != mtime {
                        mtime = now;
                        self.refresh("the CSV file changed").await;
                    }
                }
            }
        }
    }

    async fn refresh(&mut self, why: &str) {
        let result = match self.source.load(&mut self.client).await {
            Ok(fresh) => self.current.refreshed(fresh),
            Err(e) => Err(e),
        };
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((map, kept)) => {
                let before = self.current.len();
                self.current = Arc::new(map);
                st.accounts = self.current.len() as u64;
                st.refreshes_total += 1;
                st.last_error = None;
                tracing::info!(
                    trigger = why,
                    accounts = self.current.len(),
                    added = self.current.len().saturating_sub(before),
                    kept_missing = kept,
                    "account map refreshed"
                );
                self.tx.send_replace(self.current.clone());
            }
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "account map refresh refused; the previous map stays in use");
                st.last_error = Some(e.to_string());
            }
        }
    }
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
