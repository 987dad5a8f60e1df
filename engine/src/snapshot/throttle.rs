//! Per-shard write throttling for the full load: a token bucket for rows and one for bytes,
//! shared by every copy worker writing to that shard.
//!
//! In: `acquire(rows, bytes)` before a batch is sent to the shard, and, from the shard's health
//! watcher (`health`), [`Throttle::set_rows_rate`] with the rate it chose. Out: the call returns
//! when the batch may go, and the bucket keeps its own accounting ([`ThrottleStats`]).
//!
//! The configured limits (`max_rows_per_sec`, `max_bytes_per_sec`) are ceilings: a rate set by
//! the watcher only ever lowers the row bucket's rate below `max_rows_per_sec`.
//!
//! Invariant: for each bucket with rate `r` and burst `b`, the units granted by the time the
//! last grant is released never exceed `b + r × (last_release − first_request)`. Reservations
//! are taken in arrival order under a lock and may run the balance negative ("debt"); the caller
//! then sleeps until the debt is repaid, so a batch larger than the burst still goes through.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Fraction of a second of traffic a bucket may send at once after being idle.
const BURST_SECONDS: f64 = 0.1;

#[derive(Debug)]
struct Bucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate_per_sec: u64, now: Instant) -> Bucket {
        Bucket::with_rate(rate_per_sec as f64, now)
    }

    fn with_rate(rate: f64, now: Instant) -> Bucket {
        let burst = (rate * BURST_SECONDS).max(1.0);
        Bucket {
            rate_per_sec: rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Changes the rate from `now` on: what accrued so far at the old rate is kept (up to the
    /// new burst), debt stays debt.
    fn set_rate(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens += elapsed * self.rate_per_sec;
        self.last = now;
        self.rate_per_sec = rate;
        self.burst = (rate * BURST_SECONDS).max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes `n` units now; returns when they are paid for.
    fn reserve(&mut self, n: u64, now: Instant) -> Instant {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate_per_sec)
        }
    }
}

/// What a shard's throttle has let through, by its own clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThrottleStats {
    /// Rows granted.
    pub rows: u64,
    /// Bytes granted.
    pub bytes: u64,
    /// The configured row limit (`max_rows_per_sec`), if any.
    pub max_rows_per_sec: Option<u64>,
    /// The configured byte limit (`max_bytes_per_sec`), if any.
    pub max_bytes_per_sec: Option<u64>,
    /// Rows the row bucket may send at once when idle.
    pub rows_burst: f64,
    /// Bytes the byte bucket may send at once when idle.
    pub bytes_burst: f64,
    /// From the first request to the release of the last grant.
    pub window: Duration,
    /// Total time callers were made to wait.
    pub waited: Duration,
    /// The row rate in force now: the health watcher's choice under the ceiling, or the
    /// ceiling; `None`: unlimited.
    pub rows_per_sec: Option<f64>,
}

impl ThrottleStats {
    /// Whether the grants stayed within `burst + rate × window` for every configured limit.
    pub fn within_limits(&self) -> bool {
        let secs = self.window.as_secs_f64();
        let ok = |granted: u64, rate: Option<u64>, burst: f64| match rate {
            // A tiny allowance for float rounding in the bucket arithmetic.
            Some(r) => granted as f64 <= burst + r as f64 * secs + 1e-6 * granted as f64,
            None => true,
        };
        ok(self.rows, self.max_rows_per_sec, self.rows_burst)
            && ok(self.bytes, self.max_bytes_per_sec, self.bytes_burst)
    }
}

#[derive(Debug)]
struct State {
    /// `max_rows_per_sec`, the ceiling of any rate set later.
    ceiling_rows: Option<u64>,
    rows: Option<Bucket>,
    bytes: Option<Bucket>,
    first_request: Option<Instant>,
    last_release: Option<Instant>,
    stats: ThrottleStats,
}

/// One shard's throttle. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

impl Throttle {
    /// A throttle with the given limits (`None` = unlimited).
    pub fn new(max_rows_per_sec: Option<u64>, max_bytes_per_sec: Option<u64>) -> Throttle {
        let now = Instant::now();
        let rows = max_rows_per_sec
            .filter(|r| *r > 0)
            .map(|r| Bucket::new(r, now));
        let bytes = max_bytes_per_sec
            .filter(|r| *r > 0)
            .map(|r| Bucket::new(r, now));
        let stats = ThrottleStats {
            max_rows_per_sec: rows.as_ref().map(|_| max_rows_per_sec.unwrap_or(0)),
            max_bytes_per_sec: bytes.as_ref().map(|_| max_bytes_per_sec.unwrap_or(0)),
            rows_burst: rows.as_ref().map_or(0.0, |b| b.burst),
            bytes_burst: bytes.as_ref().map_or(0.0, |b| b.burst),
            rows_per_sec: rows.as_ref().map(|b| b.rate_per_sec),
            ..ThrottleStats::default()
        };
        Throttle {
            state: Mutex::new(State {
                ceiling_rows: max_rows_per_sec.filter(|r| *r > 0),
                rows,
                bytes,
                first_request: None,
                last_release: None,
                stats,
            }),
        }
    }

    /// Waits until `rows` rows and `bytes` bytes may be written. Cancel-safe in the sense that
    /// a dropped wait keeps its reservation (the bucket stays conservative).
    pub async fn acquire(&self, rows: u64, bytes: u64) {
        let now = Instant::now();
        let release = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let r = st.rows.as_mut().map_or(now, |b| b.reserve(rows, now));
            let b = st.bytes.as_mut().map_or(now, |b| b.reserve(bytes, now));
            let release = r.max(b);
            let first = *st.first_request.get_or_insert(now);
            let last = st.last_release.map_or(release, |l| l.max(release));
            st.last_release = Some(last);
            st.stats.rows += rows;
            st.stats.bytes += bytes;
            st.stats.window = last.saturating_duration_since(first);
            st.stats.waited += release.saturating_duration_since(now);
            release
        };
        if release > now {
            tokio::time::sleep_until(release).await;
        }
    }

    /// Holds the row rate to `rate` rows per second from now on (`None`: back to the
    /// ceiling), never above `max_rows_per_sec`. Callers already waiting keep their release
    /// time; later reservations pay at the new rate.
    pub fn set_rows_rate(&self, rate: Option<f64>) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ceiling = st.ceiling_rows.map(|c| c as f64);
        let effective = match (rate.filter(|r| r.is_finite() && *r > 0.0), ceiling) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (Some(r), None) => Some(r),
            (None, c) => c,
        };
        match (effective, st.rows.as_mut()) {
            (Some(r), Some(b)) => b.set_rate(r, now),
            (Some(r), None) => st.rows = Some(Bucket::with_rate(r, now)),
            (None, _) => st.rows = None,
        }
        st.stats.rows_per_sec = effective;
    }

    /// Rows granted so far (cheaper than [`Throttle::stats`]).
    pub fn rows_granted(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats
            .rows
    }

    /// The accounting so far.
    pub fn stats(&self) -> ThrottleStats {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let t = Throttle::new(None, None);
        let start = Instant::now();
        for _ in 0..100 {
            t.acquire(10_000, 1 << 20).await;
        }
        assert_eq!(Instant::now(), start);
        let s = t.stats();
        assert_eq!(s.rows, 1_000_000);
        assert!(s.within_limits());
    }

    #[tokio::test(start_paused = true)]
    async fn rows_are_paced_to_the_rate() {
        let t = Throttle::new(Some(1_000), None);
        let start = Instant::now();
        for _ in 0..50 {
            t.acquire(100, 0).await;
        }
        // 5000 rows at 1000/s with a 100-row burst: 4.9 s.
        let took = Instant::now() - start;
        assert!(took >= Duration::from_millis(4_890), "{took:?}");
        assert!(took <= Duration::from_millis(4_910), "{took:?}");
        let s = t.stats();
        assert_eq!(s.rows, 5_000);
        assert!(s.within_limits(), "{s:?}");
        assert!(s.waited > Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn the_tighter_of_rows_and_bytes_wins() {
        let t = Throttle::new(Some(1_000_000), Some(10_000));
        let start = Instant::now();
        for _ in 0..10 {
            t.acquire(1, 10_000).await;
        }
        let took = Instant::now() - start;
        assert!(took >= Duration::from_millis(9_890), "{took:?}");
        assert!(t.stats().within_limits());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_bucket() {
        let t = std::sync::Arc::new(Throttle::new(Some(500), None));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    t.acquire(50, 0).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // 1000 rows at 500/s with a 50-row burst: 1.9 s.
        assert!(Instant::now() - start >= Duration::from_millis(1_890));
        assert!(t.stats().within_limits());
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_rate_paces_and_the_ceiling_caps_it() {
        let t = Throttle::new(Some(1_000), None);
        t.set_rows_rate(Some(100.0));
        assert_eq!(t.stats().rows_per_sec, Some(100.0));
        let start = Instant::now();
        for _ in 0..10 {
            t.acquire(100, 0).await;
        }
        // 1000 rows at 100/s with a 10-row burst: 9.9 s.
        let took = Instant::now() - start;
        assert!(took >= Duration::from_millis(9_890), "{took:?}");
        // Above the ceiling is the ceiling; None is the ceiling again.
        t.set_rows_rate(Some(50_000.0));
        assert_eq!(t.stats().rows_per_sec, Some(1_000.0));
        t.set_rows_rate(None);
        assert_eq!(t.stats().rows_per_sec, Some(1_000.0));
        assert!(t.stats().within_limits());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_ceiling_none_is_unlimited_again() {
        let t = Throttle::new(None, None);
        t.set_rows_rate(Some(10.0));
        let start = Instant::now();
        t.acquire(1, 0).await;
        t.acquire(10, 0).await;
        assert!(Instant::now() - start >= Duration::from_millis(990));
        t.set_rows_rate(None);
        assert_eq!(t.stats().rows_per_sec, None);
        let at = Instant::now();
        t.acquire(1_000_000, 0).await;
        assert_eq!(Instant::now(), at);
        assert_eq!(t.rows_granted(), 1_000_011);
    }

    #[test]
    fn accounting_detects_an_overrun() {
        let s = ThrottleStats {
            rows: 10_000,
            max_rows_per_sec: Some(1_000),
            rows_burst: 100.0,
            window: Duration::from_secs(2),
            ..ThrottleStats::default()
        };
        assert!(!s.within_limits());
    }
}
