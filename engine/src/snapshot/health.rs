//! The adaptive part of the full load's throttle: per shard, a health watcher on its own small
//! connection that samples the shard while the load writes, and an AIMD controller that sets the
//! shard's row rate from the samples.
//!
//! In: the shard's connector (and its read replicas'), the bounds of `[snapshot]`
//! (`max_probe_latency_ms`, `max_active_backends`, `max_replica_lag_ms`), the floor
//! (`min_rows_per_sec`) and the shard's [`Throttle`]. Out: [`Throttle::set_rows_rate`] every
//! `health_interval_ms`, and the shard's [`ThrottleView`] in the load's progress (what `status`,
//! `SHOW THROTTLE`, the metrics and the progress lines show).
//!
//! The signals, each sampled once per interval:
//! - **probe latency**: the round trip of one cheap query on the shard (the one that counts the
//!   backends below), so it measures what any short query of the product sees: CPU, locks on
//!   shared memory, the network;
//! - **active backends**: client backends of the shard in state `active`, without the probe
//!   itself and without reshard's own sessions (application_name `reshard`, or the
//!   application_name the load's connections are opened with);
//! - **replica lag** (with `[[shards]] replicas`): how long ago the shard first had WAL that
//!   the replica has not replayed yet. Every sample records the shard's `pg_current_wal_lsn()`
//!   with its time; the replica's `pg_last_wal_replay_lsn()` is looked up in that history
//!   ([`LsnHistory::lag`]). This is the same definition as `pg_stat_replication.replay_lag` and
//!   is 0 when the replica has replayed everything, also when the shard is idle. The common
//!   `now() - pg_last_xact_replay_timestamp()` is not used: on an idle primary it grows without
//!   bound although the replica is caught up.
//!
//! The controller ([`Aimd`]): when any signal is over its bound (or the probe fails), the rate
//! is halved (from what the copy actually wrote over the last interval, if that is lower), never
//! below the floor; when every signal is within its bound the rate grows by the floor per
//! interval, up to `max_rows_per_sec` when that is set. The floor keeps the load going: it
//! always finishes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::progress::FullLoadProgress;
use super::throttle::Throttle;
use super::Connect;
use crate::lsn::Lsn;
use crate::status::ThrottleView;

/// The bounds of the shard's health signals; `None`: that signal is not watched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthBounds {
    /// `max_probe_latency_ms`.
    pub probe_latency: Option<Duration>,
    /// `max_active_backends`.
    pub active_backends: Option<u64>,
    /// `max_replica_lag_ms`.
    pub replica_lag: Option<Duration>,
}

impl HealthBounds {
    /// Whether any signal is watched (else the throttle is the fixed one).
    pub fn any(&self) -> bool {
        self.probe_latency.is_some() || self.active_backends.is_some() || self.replica_lag.is_some()
    }

    /// The first signal of `s` over its bound, as a phrase for the status and the log; `None`
    /// when every watched signal is within its bound.
    pub fn over(&self, s: &HealthSample) -> Option<String> {
        if let Some(e) = &s.error {
            return Some(format!("health probe failed: {e}"));
        }
        if let (Some(b), Some(v)) = (self.probe_latency, s.probe_latency) {
            if v > b {
                return Some(format!(
                    "probe latency {:.1} ms > max_probe_latency_ms {}",
                    ms(v),
                    b.as_millis()
                ));
            }
        }
        if let (Some(b), Some(v)) = (self.active_backends, s.active_backends) {
            if v > b {
                return Some(format!("{v} active backends > max_active_backends {b}"));
            }
        }
        if let (Some(b), Some(v)) = (self.replica_lag, s.replica_lag) {
            if v > b {
                return Some(format!(
                    "replica lag {:.0} ms > max_replica_lag_ms {}",
                    ms(v),
                    b.as_millis()
                ));
            }
        }
        None
    }
}

/// One sample of a shard's health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthSample {
    /// Round trip of the probe query.
    pub probe_latency: Option<Duration>,
    /// Active client backends, reshard's own excluded.
    pub active_backends: Option<u64>,
    /// The largest replay lag of the shard's replicas (`None` without replicas).
    pub replica_lag: Option<Duration>,
    /// Why the sample could not be taken (the shard or a replica unreachable, a query failed).
    pub error: Option<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Additive increase, multiplicative decrease of one shard's row rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Aimd {
    floor: f64,
    ceiling: Option<f64>,
    rate: Option<f64>,
    backoffs: u64,
}

impl Aimd {
    /// A controller that starts at the ceiling (`None`: unlimited) and never goes below
    /// `floor` rows per second (at least 1).
    pub fn new(floor: u64, ceiling: Option<u64>) -> Aimd {
        let floor = floor.max(1) as f64;
        let ceiling = ceiling.map(|c| (c as f64).max(floor));
        Aimd {
            floor,
            ceiling,
            rate: ceiling,
            backoffs: 0,
        }
    }

    /// One interval: `over` says whether a signal was over its bound, `observed` is the row
    /// rate the copy actually wrote over the interval. Returns the rate to hold the copy to
    /// (`None`: unlimited).
    pub fn step(&mut self, over: bool, observed: f64) -> Option<f64> {
        if over {
            // Halve what is really going through: a limit far above the actual rate would
            // take many halvings to bite.
            let used = observed.max(self.floor);
            let base = self.rate.map_or(used, |r| r.min(used));
            let next = (base / 2.0).max(self.floor);
            if self.rate.is_none_or(|r| next < r) {
                self.backoffs += 1;
            }
            self.rate = Some(next);
        } else if let Some(r) = self.rate {
            let next = r + self.floor;
            self.rate = Some(self.ceiling.map_or(next, |c| next.min(c)));
        }
        self.rate
    }

    /// The rate in force (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Times the rate was lowered.
    pub fn backoffs(&self) -> u64 {
        self.backoffs
    }
}

/// The shard's WAL position over the last samples, to turn a replica's replay position into a
/// time lag.
#[derive(Debug)]
pub struct LsnHistory {
    samples: VecDeque<(Instant, Lsn)>,
    cap: usize,
}

impl LsnHistory {
    /// A history of at most `cap` samples (older ones are forgotten; a replica behind all of
    /// them is reported at least as far behind as the oldest).
    pub fn new(cap: usize) -> LsnHistory {
        LsnHistory {
            samples: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Records the shard's WAL position `lsn` seen at `at`.
    pub fn record(&mut self, at: Instant, lsn: Lsn) {
        if self.samples.back().is_some_and(|(_, l)| *l >= lsn) {
            return; // no new WAL: the first time the shard had this position stays the one kept
        }
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    /// How far behind a replica that has replayed up to `replayed` is at `now`: the time since
    /// the shard first had WAL past `replayed`, 0 when the replica has everything recorded.
    pub fn lag(&self, replayed: Lsn, now: Instant) -> Duration {
        self.samples
            .iter()
            .find(|(_, lsn)| *lsn > replayed)
            .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at))
    }
}

/// Active client backends on the shard, the probe and reshard's own sessions excluded.
const BACKENDS_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND application_name <> 'reshard' \
     AND application_name <> current_setting('application_name')";

/// The same, with the shard's WAL write position (only when replicas are watched).
const BACKENDS_LSN_SQL: &str = "SELECT (SELECT count(*) FROM pg_stat_activity \
     WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND application_name <> 'reshard' \
     AND application_name <> current_setting('application_name')), pg_current_wal_lsn()";

/// Takes one health sample of a shard. The real one is [`ShardProbe`]; tests script it.
pub(crate) trait Sampler: Send {
    /// One sample (never fails: a failure is a sample with `error`).
    fn sample(&mut self) -> impl std::future::Future<Output = HealthSample> + Send;
}

/// One shard's controller: samples every interval, steps the [`Aimd`], sets the throttle and
/// publishes the shard's [`ThrottleView`].
pub(crate) struct Watcher {
    pub(crate) index: usize,
    pub(crate) shard: String,
    pub(crate) bounds: HealthBounds,
    pub(crate) interval: Duration,
    pub(crate) floor: u64,
    pub(crate) ceiling: Option<u64>,
    pub(crate) throttle: Arc<Throttle>,
    pub(crate) progress: Arc<watch::Sender<FullLoadProgress>>,
}

impl Watcher {
    /// Samples and steers until dropped (the load aborts it when it ends). Cancel-safe: a
    /// dropped sample leaves the throttle at its last rate.
    pub(crate) async fn run(self, mut sampler: impl Sampler) {
        let mut aimd = Aimd::new(self.floor, self.ceiling);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rows = self.throttle.rows_granted();
        let mut last_at = Instant::now();
        let mut was_over = false;
        loop {
            tick.tick().await;
            let sample = sampler.sample().await;
            let now = Instant::now();
            let rows = self.throttle.rows_granted();
            let secs = now.saturating_duration_since(last_at).as_secs_f64();
            let observed = if secs > 0.0 {
                rows.saturating_sub(last_rows) as f64 / secs
            } else {
                0.0
            };
            (last_rows, last_at) = (rows, now);
            let reason = self.bounds.over(&sample);
            let before = aimd.rate();
            let rate = aimd.step(reason.is_some(), observed);
            self.throttle.set_rows_rate(rate);
            match &reason {
                Some(why) if rate != before => tracing::info!(
                    shard = %self.shard,
                    rows_per_sec = rate.unwrap_or_default().round(),
                    observed_rows_per_sec = observed.round(),
                    "full load slows down: {why}"
                ),
                None if was_over => tracing::info!(
                    shard = %self.shard,
                    rows_per_sec = rate.map(f64::round),
                    "full load speeds up again: the shard is within its bounds"
                ),
                _ => {}
            }
            was_over = reason.is_some();
            let view = ThrottleView {
                shard: self.shard.clone(),
                adaptive: true,
                rows_per_sec: rate,
                max_rows_per_sec: self.ceiling,
                min_rows_per_sec: self.floor,
                rows_total: rows,
                backoffs_total: aimd.backoffs(),
                probe_latency_ms: sample.probe_latency.map(ms),
                active_backends: sample.active_backends,
                replica_lag_ms: sample.replica_lag.map(ms),
                holding_back: reason,
            };
            self.progress.send_modify(|p| {
                if let Some(v) = p.throttle.get_mut(self.index) {
                    *v = view;
                }
            });
        }
    }
}

/// Samples a shard (and its replicas) over connections of its own; a connection that fails is
/// dropped and opened again at the next sample.
pub(crate) struct ShardProbe {
    shard: String,
    connect: Connect,
    replicas: Vec<Connect>,
    /// A probe that takes this long is over any sensible bound: stop waiting for it.
    limit: Duration,
    client: Option<Client>,
    replica_clients: Vec<Option<Client>>,
    history: LsnHistory,
}

impl ShardProbe {
    pub(crate) fn new(
        shard: String,
        connect: Connect,
        replicas: Vec<Connect>,
        interval: Duration,
    ) -> ShardProbe {
        ShardProbe {
            shard,
            connect,
            replica_clients: replicas.iter().map(|_| None).collect(),
            replicas,
            limit: (interval * 10).max(Duration::from_secs(5)),
            client: None,
            // Ten minutes of samples at the default interval.
            history: LsnHistory::new(1200),
        }
    }

    async fn take(&mut self) -> HealthSample {
        let limit = self.limit;
        let mut s = HealthSample::default();
        if self.client.is_none() {
            match tokio::time::timeout(limit, (self.connect)()).await {
                Ok(Ok(c)) => self.client = Some(c),
                Ok(Err(e)) => {
                    s.error = Some(format!("cannot connect to shard {}: {e}", self.shard));
                    return s;
                }
                Err(_) => {
                    s.error = Some(format!(
                        "connecting to shard {} took over {} s",
                        self.shard,
                        limit.as_secs()
                    ));
                    return s;
                }
            }
        }
        let Some(client) = self.client.as_ref() else {
            return s;
        };
        let with_lsn = !self.replicas.is_empty();
        let sql = if with_lsn {
            BACKENDS_LSN_SQL
        } else {
            BACKENDS_SQL
        };
        let started = Instant::now();
        match tokio::time::timeout(limit, client.query_one(sql, &[])).await {
            Ok(Ok(row)) => {
                s.probe_latency = Some(started.elapsed());
                let n: i64 = row.try_get(0).unwrap_or_default();
                s.active_backends = Some(n.max(0) as u64);
                if with_lsn {
                    match row.try_get::<_, tokio_postgres::types::PgLsn>(1) {
                        Ok(l) => self.history.record(started, Lsn::from_u64(u64::from(l))),
                        Err(e) => s.error = Some(format!("shard {}: {e}", self.shard)),
                    }
                }
            }
            Ok(Err(e)) => {
                self.client = None;
                s.error = Some(format!("shard {}: {e}", self.shard));
                return s;
            }
            Err(_) => {
                self.client = None;
                s.probe_latency = Some(started.elapsed());
                s.error = Some(format!(
                    "the probe query on shard {} took over {} s",
                    self.shard,
                    limit.as_secs()
                ));
                return s;
            }
        }
        for i in 0..self.replicas.len() {
            match self.replica_lag(i).await {
                Ok(lag) => s.replica_lag = s.replica_lag.max(Some(lag)),
                Err(e) => {
                    s.error = Some(e);
                    break;
                }
            }
        }
        s
    }

    async fn replica_lag(&mut self, i: usize) -> Result<Duration, String> {
        let limit = self.limit;
        let name = format!("replica {} of shard {}", i + 1, self.shard);
        let connect = self
            .replicas
            .get(i)
            .cloned()
            .ok_or_else(|| format!("{name}: not configured"))?;
        let slot = self
            .replica_clients
            .get_mut(i)
            .ok_or_else(|| format!("{name}: not watched"))?;
        if slot.is_none() {
            match tokio::time::timeout(limit, connect()).await {
                Ok(Ok(c)) => *slot = Some(c),
                Ok(Err(e)) => return Err(format!("cannot connect to {name}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "connecting to {name} took over {} s",
                        limit.as_secs()
                    ))
                }
            }
        }
        let Some(client) = slot.as_ref() else {
            return Err(format!("{name}: no connection"));
        };
        let q = client.query_one("SELECT pg_last_wal_replay_lsn()", &[]);
        let row = match tokio::time::timeout(limit, q).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => {
                *slot = None;
                return Err(format!("{name}: {e}"));
            }
            Err(_) => {
                *slot = None;
                return Err(format!(
                    "{name}: the lag query took over {} s",
                    limit.as_secs()
                ));
            }
        };
        match row.try_get::<_, Option<tokio_postgres::types::PgLsn>>(0) {
            Ok(Some(l)) => Ok(self
                .history
                .lag(Lsn::from_u64(u64::from(l)), Instant::now())),
            Ok(None) => Err(format!(
                "{name} is not a standby (pg_last_wal_replay_lsn() is NULL); list only the \
                 shard's physical read replicas in [[shards]] replicas"
            )),
            Err(e) => Err(format!("{name}: {e}")),
        }
    }
}

impl Sampler for ShardProbe {
    fn sample(&mut self) -> impl std::future::Future<Output = HealthSample> + Send {
        self.take()
    }
}

/// The view of a shard whose throttle does not adapt (no bound set), or before the first
/// sample.
pub(crate) fn fixed_view(
    shard: &str,
    throttle: &Throttle,
    adaptive: bool,
    floor: u64,
) -> ThrottleView {
    let st = throttle.stats();
    ThrottleView {
        shard: shard.to_owned(),
        adaptive,
        rows_per_sec: st.rows_per_sec,
        max_rows_per_sec: st.max_rows_per_sec,
        min_rows_per_sec: floor,
        rows_total: st.rows,
        ..ThrottleView::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_over_its_bound_is_named() {
        let b = HealthBounds {
            probe_latency: Some(Duration::from_millis(10)),
            active_backends: Some(4),
            replica_lag: None,
        };
        let mut s = HealthSample {
            probe_latency: Some(Duration::from_millis(3)),
            active_backends: Some(4),
            replica_lag: Some(Duration::from_secs(60)),
            error: None,
        };
        assert_eq!(
            b.over(&s),
            None,
            "at the bound is within it; lag is not watched"
        );
        s.active_backends = Some(5);
        let why = b.over(&s).unwrap();
        assert!(
            why.contains("5 active backends > max_active_backends 4"),
            "{why}"
        );
        s.probe_latency = Some(Duration::from_millis(25));
        let why = b.over(&s).unwrap();
        assert!(
            why.contains("probe latency 25.0 ms > max_probe_latency_ms 10"),
            "{why}"
        );
        s.error = Some("connection refused".into());
        assert!(b.over(&s).unwrap().contains("connection refused"));
        assert!(b.any());
        assert!(!HealthBounds::default().any());
    }

    #[test]
    fn aimd_halves_on_trouble_and_climbs_by_the_floor() {
        let mut a = Aimd::new(1_000, Some(10_000));
        assert_eq!(a.rate(), Some(10_000.0));
        // Healthy at the ceiling: stays there.
        assert_eq!(a.step(false, 9_000.0), Some(10_000.0));
        // Over: halves what went through (8000 < 10000).
        assert_eq!(a.step(true, 8_000.0), Some(4_000.0));
        assert_eq!(a.step(true, 4_000.0), Some(2_000.0));
        assert_eq!(a.step(true, 2_000.0), Some(1_000.0));
        // Never below the floor; staying there is not another backoff.
        assert_eq!(a.step(true, 1_000.0), Some(1_000.0));
        assert_eq!(a.backoffs(), 3);
        // Recovery: +floor per interval, capped by the ceiling.
        for want in [2_000.0, 3_000.0, 4_000.0] {
            assert_eq!(a.step(false, 0.0), Some(want));
        }
        for _ in 0..20 {
            a.step(false, 0.0);
        }
        assert_eq!(a.rate(), Some(10_000.0));
    }

    #[test]
    fn aimd_without_a_ceiling_starts_unlimited_and_backs_off_from_the_actual_rate() {
        let mut a = Aimd::new(500, None);
        assert_eq!(a.step(false, 50_000.0), None);
        assert_eq!(a.step(true, 50_000.0), Some(25_000.0));
        assert_eq!(a.backoffs(), 1);
        assert_eq!(a.step(false, 25_000.0), Some(25_500.0));
        // Nothing went through (between chunks) while over: down to the floor.
        assert_eq!(a.step(true, 0.0), Some(500.0));
    }

    #[test]
    fn replica_lag_is_zero_when_caught_up_even_if_the_shard_is_idle() {
        let t0 = Instant::now();
        let mut h = LsnHistory::new(10);
        h.record(t0, Lsn::from_u64(100));
        // The shard stays idle: the same position again and again.
        for s in 1..5 {
            h.record(t0 + Duration::from_secs(s), Lsn::from_u64(100));
        }
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(h.lag(Lsn::from_u64(100), later), Duration::ZERO);
        // Behind: the time since the shard first had WAL past the replica's position.
        h.record(t0 + Duration::from_secs(10), Lsn::from_u64(200));
        h.record(t0 + Duration::from_secs(11), Lsn::from_u64(300));
        let now = t0 + Duration::from_secs(12);
        assert_eq!(h.lag(Lsn::from_u64(150), now), Duration::from_secs(2));
        assert_eq!(h.lag(Lsn::from_u64(250), now), Duration::from_secs(1));
        assert_eq!(h.lag(Lsn::from_u64(99), now), Duration::from_secs(12));
        assert_eq!(h.lag(Lsn::from_u64(300), now), Duration::ZERO);
    }

    #[test]
    fn replica_lag_history_is_bounded() {
        let t0 = Instant::now();
        let mut h = LsnHistory::new(3);
        for i in 1..=10u64 {
            h.record(t0 + Duration::from_secs(i), Lsn::from_u64(i * 10));
        }
        assert_eq!(h.samples.len(), 3);
        // Behind everything kept: at least as old as the oldest kept sample.
        assert_eq!(
            h.lag(Lsn::ZERO, t0 + Duration::from_secs(10)),
            Duration::from_secs(2)
        );
    }

    /// A model shard: the probe's latency grows with the rows per second written into it
    /// (1 ms + 1 ms per 1000 rows/s), measured from the throttle's own grants.
    struct Model {
        throttle: Arc<Throttle>,
        last_rows: u64,
        last_at: Instant,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Sampler for Model {
        fn sample(&mut self) -> impl std::future::Future<Output = HealthSample> + Send {
            let now = Instant::now();
            let rows = self.throttle.rows_granted();
            let secs = now.saturating_duration_since(self.last_at).as_secs_f64();
            let rate = if secs > 0.0 {
                rows.saturating_sub(self.last_rows) as f64 / secs
            } else {
                0.0
            };
            (self.last_rows, self.last_at) = (rows, now);
            let sample = if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                HealthSample {
                    error: Some("connection refused".into()),
                    ..HealthSample::default()
                }
            } else {
                HealthSample {
                    probe_latency: Some(Duration::from_secs_f64((1.0 + rate / 1000.0) / 1000.0)),
                    active_backends: Some(0),
                    ..HealthSample::default()
                }
            };
            std::future::ready(sample)
        }
    }

    fn watcher(
        throttle: &Arc<Throttle>,
        bound_ms: u64,
        ceiling: Option<u64>,
    ) -> (Watcher, watch::Receiver<FullLoadProgress>) {
        let (tx, rx) = watch::channel(FullLoadProgress {
            throttle: vec![ThrottleView::default()],
            ..FullLoadProgress::default()
        });
        let w = Watcher {
            index: 0,
            shard: "shard0".into(),
            bounds: HealthBounds {
                probe_latency: Some(Duration::from_millis(bound_ms)),
                ..HealthBounds::default()
            },
            interval: Duration::from_millis(500),
            floor: 1_000,
            ceiling,
            throttle: throttle.clone(),
            progress: Arc::new(tx),
        };
        (w, rx)
    }

    /// A copy that the shard itself could take at 20000 rows/s, in 100-row batches.
    async fn copy(throttle: Arc<Throttle>, rows: u64) {
        let mut sent = 0;
        while sent < rows {
            throttle.acquire(100, 0).await;
            tokio::time::sleep(Duration::from_micros(5_000)).await;
            sent += 100;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_controller_holds_the_probe_near_its_bound_and_the_load_finishes() {
        let throttle = Arc::new(Throttle::new(None, None));
        // Unthrottled the model shard answers in 21 ms; the bound is 10 ms (~9000 rows/s).
        let (w, progress) = watcher(&throttle, 10, None);
        let model = Model {
            throttle: throttle.clone(),
            last_rows: 0,
            last_at: Instant::now(),
            fail: Arc::default(),
        };
        let steer = tokio::spawn(w.run(model));
        let start = Instant::now();
        let load = tokio::spawn(copy(throttle.clone(), 600_000));
        // Warm-up: the first over-bound samples cut the rate from the unthrottled 20000.
        tokio::time::sleep(Duration::from_millis(10_250)).await;
        let v = progress.borrow().clone();
        assert!(v.throttle[0].backoffs_total >= 1, "{v:?}");
        assert!(v.throttle[0].rows_per_sec.is_some(), "{v:?}");
        // Steady state: sample the view each interval for 30 s.
        let (mut over, mut samples) = (0, 0);
        let rows_before = throttle.rows_granted();
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = progress.borrow().throttle[0].clone();
            samples += 1;
            if t.holding_back.is_some() {
                over += 1;
            }
            let rate = t.rows_per_sec.unwrap_or(f64::INFINITY);
            assert!((1_000.0..=10_500.0).contains(&rate), "rate {rate}: {t:?}");
        }
        let rate = (throttle.rows_granted() - rows_before) as f64 / 30.0;
        // AIMD's saw-tooth between half the bound's rate and the bound's rate.
        assert!(
            (4_000.0..=10_000.0).contains(&rate),
            "steady copy rate {rate}"
        );
        assert!(
            over * 4 <= samples,
            "{over} of {samples} samples over the bound"
        );
        load.await.unwrap();
        assert_eq!(throttle.rows_granted(), 600_000);
        let took = Instant::now() - start;
        // Unthrottled it would take 30 s; at the floor 600 s.
        assert!(
            took > Duration::from_secs(45) && took < Duration::from_secs(200),
            "{took:?}"
        );
        steer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_shard_holds_the_copy_at_the_floor_and_recovery_ramps_up() {
        let throttle = Arc::new(Throttle::new(Some(5_000), None));
        let (w, progress) = watcher(&throttle, 10, Some(5_000));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let model = Model {
            throttle: throttle.clone(),
            last_rows: 0,
            last_at: Instant::now(),
            fail: fail.clone(),
        };
        let steer = tokio::spawn(w.run(model));
        let load = tokio::spawn(copy(throttle.clone(), 40_000));
        // Read between samples (every 500 ms from 0).
        tokio::time::sleep(Duration::from_millis(5_250)).await;
        let t = progress.borrow().throttle[0].clone();
        assert_eq!(t.rows_per_sec, Some(1_000.0), "{t:?}");
        assert!(t
            .holding_back
            .as_deref()
            .unwrap_or("")
            .contains("connection refused"));
        assert_eq!(throttle.stats().rows_per_sec, Some(1_000.0));

        // The shard answers again (1 ms + 1 ms per 1000 rows/s, within the 10 ms bound up to
        // the 5000 ceiling): the rate climbs by the floor per interval, up to the ceiling.
        fail.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut seen = vec![];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            seen.push(
                progress.borrow().throttle[0]
                    .rows_per_sec
                    .unwrap_or_default(),
            );
        }
        assert_eq!(seen.first(), Some(&2_000.0), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] - w[0] <= 1_000.0), "{seen:?}");
        assert_eq!(seen.last(), Some(&5_000.0), "{seen:?}");
        assert_eq!(progress.borrow().throttle[0].holding_back, None);
        // The floor kept the load going; it finishes.
        load.await.unwrap();
        assert_eq!(throttle.rows_granted(), 40_000);
        assert!(throttle.stats().within_limits());
        steer.abort();
    }
}
