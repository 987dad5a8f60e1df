//! Prometheus metrics and health endpoints.
//!
//! In: the live [`StatusSnapshot`] (a `watch`, refreshed by the runtime). Out: an HTTP/1.1
//! endpoint on `[admin] metrics` serving
//! - `GET /metrics`: the OpenMetrics text exposition, built at scrape time from the current
//!   snapshot (counters are the runtime's cumulative totals, so they only go up while the
//!   process lives),
//! - `GET /healthz`: `200 ok` while the process is up,
//! - `GET /readyz`: `200 ready` when [`StatusSnapshot::is_ready`] (streaming, no shard stopped),
//!   else `503` with the reason.
//!
//! Every metric name is a constant below, with its unit in the name and `_total` on counters;
//! [`ALL`] lists them (the Grafana dashboard in `deploy/grafana/` is checked against it).
//! LSNs are exported as numbers (the 64-bit WAL position as a float: exact up to 2^53 bytes,
//! i.e. 8 PiB of WAL).
//!
//! The HTTP side is deliberately tiny: requests are a single `GET` line plus headers from a
//! local scraper, so the request head is bounded to [`MAX_REQUEST_BYTES`] and read with a
//! timeout; every response closes the connection.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, Instrument};

use crate::error::{Classify, ErrorClass};
use crate::shutdown::ShutdownRx;
use crate::status::{Phase, ShardState, StatusSnapshot};

/// Last applied source commit LSN of a shard (gauge, label `shard`).
pub const SHARD_APPLIED_LSN: &str = "reshard_shard_applied_lsn";
/// WAL bytes between what a shard applied and what was received (gauge, `shard`).
pub const SHARD_LAG_BYTES: &str = "reshard_shard_lag_bytes";
/// Age of the oldest source transaction not yet applied on a shard (gauge, `shard`).
pub const SHARD_LAG_SECONDS: &str = "reshard_shard_lag_seconds";
/// Rows applied (counter, `shard`, `kind` = insert|update|delete).
pub const SHARD_ROWS_APPLIED_TOTAL: &str = "reshard_shard_rows_applied_total";
/// Source transactions applied (counter, `shard`).
pub const SHARD_TXNS_APPLIED_TOTAL: &str = "reshard_shard_txns_applied_total";
/// Target transactions (batches) committed (counter, `shard`).
pub const SHARD_BATCHES_TOTAL: &str = "reshard_shard_batches_total";
/// Batches replayed change by change after a set-based conflict (counter, `shard`).
pub const SHARD_REPLAYS_TOTAL: &str = "reshard_shard_replays_total";
/// Apply errors (counter, `shard`, `class` = transient|definite).
pub const SHARD_ERRORS_TOTAL: &str = "reshard_shard_errors_total";
/// 1 when the shard's apply is running (gauge, `shard`).
pub const SHARD_UP: &str = "reshard_shard_up";
/// 1 for the shard's current state, 0 for the others (gauge, `shard`, `state`).
pub const SHARD_STATE: &str = "reshard_shard_state";
/// Average source transactions per target transaction (gauge, `shard`).
pub const SHARD_BATCH_TXNS_AVG: &str = "reshard_shard_batch_txns_avg";
/// Rows applied per second, recent (gauge, `shard`).
pub const SHARD_ROWS_PER_SECOND: &str = "reshard_shard_rows_per_second";
/// Commit-to-apply latency (gauge, `shard`, `quantile` = 0.5|0.99|1).
pub const SHARD_APPLY_LATENCY_SECONDS: &str = "reshard_shard_apply_latency_seconds";

/// XLogData bytes received from the slot (counter).
pub const SOURCE_RECEIVED_BYTES_TOTAL: &str = "reshard_source_received_bytes_total";
/// Row changes received (counter).
pub const SOURCE_CHANGES_TOTAL: &str = "reshard_source_changes_total";
/// Source transactions received (counter).
pub const SOURCE_TXNS_TOTAL: &str = "reshard_source_txns_total";
/// The slot's `confirmed_flush_lsn` (gauge).
pub const SOURCE_CONFIRMED_FLUSH_LSN: &str = "reshard_source_confirmed_flush_lsn";
/// End of the last message received (gauge).
pub const SOURCE_RECEIVED_LSN: &str = "reshard_source_received_lsn";
/// WAL the slot makes the source keep (gauge).
pub const SOURCE_RETAINED_WAL_BYTES: &str = "reshard_source_retained_wal_bytes";
/// 1 while connected to the source (gauge).
pub const SOURCE_CONNECTED: &str = "reshard_source_connected";

/// Spill log size on disk (gauge).
pub const SPILL_BYTES: &str = "reshard_spill_bytes";
/// Spill log cap, `[spill] max_bytes` (gauge).
pub const SPILL_MAX_BYTES: &str = "reshard_spill_max_bytes";
/// Spill segment files (gauge).
pub const SPILL_SEGMENTS: &str = "reshard_spill_segments";
/// 1 while reading from the source is paused because the spill cap is reached (gauge).
pub const SPILL_BACKPRESSURE_ACTIVE: &str = "reshard_spill_backpressure_active";
/// 1 while reading from the source is paused because the spill filesystem is full (gauge).
pub const SPILL_DISK_FULL: &str = "reshard_spill_disk_full";
/// fsyncs of the spill log (counter).
pub const SPILL_FSYNCS_TOTAL: &str = "reshard_spill_fsyncs_total";
/// Everything up to this LSN is durable in the spill log (gauge).
pub const SPILL_DURABLE_LSN: &str = "reshard_spill_durable_lsn";
/// Average source transactions per fsync (gauge).
pub const SPILL_TXNS_PER_FSYNC: &str = "reshard_spill_txns_per_fsync";

/// Rows copied by the full load (counter, `table`).
pub const FULLLOAD_ROWS_COPIED_TOTAL: &str = "reshard_fullload_rows_copied_total";
/// Bytes copied by the full load (counter, `table`).
pub const FULLLOAD_BYTES_COPIED_TOTAL: &str = "reshard_fullload_bytes_copied_total";
/// Estimated rows of a table (gauge, `table`).
pub const FULLLOAD_ROWS_ESTIMATED: &str = "reshard_fullload_rows_estimated";

/// The row rate the full load's copy into a shard is held to now (gauge, `shard`; present while
/// a full load runs and the shard's rate is limited, absent when unlimited).
pub const SNAPSHOT_THROTTLE_ROWS_PER_SECOND: &str = "reshard_snapshot_throttle_rows_per_second";
/// Times the adaptive throttle cut a shard's rate because a health signal was over its bound
/// (counter, `shard`).
pub const SNAPSHOT_THROTTLE_BACKOFFS_TOTAL: &str = "reshard_snapshot_throttle_backoffs_total";
/// Round trip of the adaptive throttle's last probe query on a shard (gauge, `shard`).
pub const SNAPSHOT_PROBE_LATENCY_SECONDS: &str = "reshard_snapshot_probe_latency_seconds";
/// Active client backends on a shard at the last probe, reshard's own excluded (gauge, `shard`).
pub const SNAPSHOT_ACTIVE_BACKENDS: &str = "reshard_snapshot_active_backends";
/// Largest replay lag of a shard's read replicas at the last probe (gauge, `shard`).
pub const SNAPSHOT_REPLICA_LAG_SECONDS: &str = "reshard_snapshot_replica_lag_seconds";

/// 1 for the current phase, 0 for the others (gauge, `phase`).
pub const PHASE: &str = "reshard_phase";
/// 1 when ready (streaming, no shard stopped) (gauge).
pub const READY: &str = "reshard_ready";
/// Seconds since the daemon started (gauge).
pub const UPTIME_SECONDS: &str = "reshard_uptime_seconds";
/// Build information (OpenMetrics `info`: always 1, label `version`).
pub const BUILD_INFO: &str = "reshard_build_info";

/// Changes kept in the quarantine because they could not be routed, per table (counter).
pub const QUARANTINED_CHANGES_TOTAL: &str = "reshard_quarantined_changes_total";

/// Seconds a shard's write fence has stood on the source (gauge, `shard`; absent when the shard is
/// not fenced).
pub const FENCE_SECONDS: &str = "reshard_fence_seconds";
/// Writes the source refused because they route to a fenced shard (counter, `shard`; counted on
/// the source by the fence itself).
pub const FENCE_REFUSED_WRITES_TOTAL: &str = "reshard_fence_refused_writes_total";

/// The reverse direction (a cut-over shard's writes streaming back to the source): every shard
/// commit at or below this LSN is on the source (gauge, `shard`; the shard's LSN as a number).
pub const REVERSE_APPLIED_LSN: &str = "reshard_reverse_applied_lsn";
/// Bytes of the shard's WAL received by its reverse stream and not yet applied to the source
/// (gauge, `shard`).
pub const REVERSE_LAG_BYTES: &str = "reshard_reverse_lag_bytes";
/// Seconds since the shard committed the oldest transaction its reverse stream has not yet
/// applied to the source (gauge, `shard`; 0 when caught up).
pub const REVERSE_LAG_SECONDS: &str = "reshard_reverse_lag_seconds";
/// Rows the reverse stream applied to the source (counter, `shard` and `kind` =
/// insert/update/delete; this run).
pub const REVERSE_ROWS_APPLIED_TOTAL: &str = "reshard_reverse_rows_applied_total";
/// 1 while the shard's reverse stream runs in this daemon (gauge, `shard`).
pub const REVERSE_UP: &str = "reshard_reverse_up";

/// Every metric name this module exports.
pub const ALL: &[&str] = &[
    SHARD_APPLIED_LSN,
    SHARD_LAG_BYTES,
    SHARD_LAG_SECONDS,
    SHARD_ROWS_APPLIED_TOTAL,
    SHARD_TXNS_APPLIED_TOTAL,
    SHARD_BATCHES_TOTAL,
    SHARD_REPLAYS_TOTAL,
    SHARD_ERRORS_TOTAL,
    SHARD_UP,
    SHARD_STATE,
    SHARD_BATCH_TXNS_AVG,
    SHARD_ROWS_PER_SECOND,
    SHARD_APPLY_LATENCY_SECONDS,
    SOURCE_RECEIVED_BYTES_TOTAL,
    SOURCE_CHANGES_TOTAL,
    SOURCE_TXNS_TOTAL,
    SOURCE_CONFIRMED_FLUSH_LSN,
    SOURCE_RECEIVED_LSN,
    SOURCE_RETAINED_WAL_BYTES,
    SOURCE_CONNECTED,
    SPILL_BYTES,
    SPILL_MAX_BYTES,
    SPILL_SEGMENTS,
    SPILL_BACKPRESSURE_ACTIVE,
    SPILL_DISK_FULL,
    SPILL_FSYNCS_TOTAL,
    SPILL_DURABLE_LSN,
    SPILL_TXNS_PER_FSYNC,
    FULLLOAD_ROWS_COPIED_TOTAL,
    FULLLOAD_BYTES_COPIED_TOTAL,
    FULLLOAD_ROWS_ESTIMATED,
    SNAPSHOT_THROTTLE_ROWS_PER_SECOND,
    SNAPSHOT_THROTTLE_BACKOFFS_TOTAL,
    SNAPSHOT_PROBE_LATENCY_SECONDS,
    SNAPSHOT_ACTIVE_BACKENDS,
    SNAPSHOT_REPLICA_LAG_SECONDS,
    PHASE,
    READY,
    UPTIME_SECONDS,
    BUILD_INFO,
    QUARANTINED_CHANGES_TOTAL,
    FENCE_SECONDS,
    FENCE_REFUSED_WRITES_TOTAL,
    REVERSE_APPLIED_LSN,
    REVERSE_LAG_BYTES,
    REVERSE_LAG_SECONDS,
    REVERSE_ROWS_APPLIED_TOTAL,
    REVERSE_UP,
];

/// Largest request head accepted (request line + headers).
pub const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most concurrent HTTP connections.
pub const MAX_CONNECTIONS: usize = 32;

/// `Content-Type` of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Metrics endpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address cannot be bound.
    #[error(
        "cannot listen for metrics on {addr} (config key admin.metrics): {source}; choose a \
         free address, or set admin.metrics = \"\" to turn the endpoint off"
    )]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

impl Classify for MetricsError {
    fn class(&self) -> ErrorClass {
        match self {
            MetricsError::Bind { .. } => ErrorClass::Definite,
        }
    }
}

const ALL_PHASES: [Phase; 6] = [
    Phase::Starting,
    Phase::FullLoad,
    Phase::Streaming,
    Phase::Paused,
    Phase::Stopping,
    Phase::Stopped,
];

const ALL_SHARD_STATES: [ShardState; 6] = [
    ShardState::Waiting,
    ShardState::Running,
    ShardState::Retrying,
    ShardState::Paused,
    ShardState::Stopped,
    ShardState::WaitingForDdl,
];

// Compile-time reminder: a new Phase or ShardState variant must be added to the lists above.
const _: () = {
    const fn phase_index(p: Phase) -> usize {
        match p {
            Phase::Starting => 0,
            Phase::FullLoad => 1,
            Phase::Streaming => 2,
            Phase::Paused => 3,
            Phase::Stopping => 4,
            Phase::Stopped => 5,
        }
    }
    const fn state_index(s: ShardState) -> usize {
        match s {
            ShardState::Waiting => 0,
            ShardState::Running => 1,
            ShardState::Retrying => 2,
            ShardState::Paused => 3,
            ShardState::Stopped => 4,
            ShardState::WaitingForDdl => 5,
        }
    }
    assert!(phase_index(Phase::Stopped) + 1 == ALL_PHASES.len());
    assert!(state_index(ShardState::WaitingForDdl) + 1 == ALL_SHARD_STATES.len());
};

/// Escapes a label value for the text exposition (`\`, `"` and newlines), which the encoder
/// writes verbatim.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// Writes one family of gauges.
fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// Writes one family of counters; `name` is the exposed sample name with `_total`, the
/// family name is without it (OpenMetrics).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let family = name.strip_suffix("_total").unwrap_or(name);
    let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let family = name.strip_suffix("_total").unwrap_or(name);
    let m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

/// Writes an OpenMetrics `info` family; `name` is the exposed sample name with `_info`.
fn info(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &Labels,
) -> Result<(), std::fmt::Error> {
    let family = name.strip_suffix("_info").unwrap_or(name);
    let mut m = enc.encode_descriptor(family, help, None, MetricType::Info)?;
    m.encode_info(labels)
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Encodes one snapshot at scrape time.
#[derive(Debug)]
struct SnapshotCollector(StatusSnapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut enc;
        info(
            e,
            BUILD_INFO,
            "reshard build information",
            &vec![("version", label(&s.version))],
        )?;
        gauge(
            e,
            UPTIME_SECONDS,
            "Seconds since the daemon started",
            s.uptime_secs,
        )?;
        gauge(
            e,
            READY,
            "1 when streaming and no shard is stopped",
            flag(s.is_ready()),
        )?;
        let phases: Vec<(Labels, f64)> = ALL_PHASES
            .iter()
            .map(|p| (vec![("phase", p.as_str().to_owned())], flag(*p == s.phase)))
            .collect();
        gauges(e, PHASE, "1 for the current phase of the daemon", &phases)?;

        // Source.
        let src = &s.source;
        counter(
            e,
            SOURCE_RECEIVED_BYTES_TOTAL,
            "XLogData bytes received from the slot",
            src.bytes_received_total,
        )?;
        counter(
            e,
            SOURCE_CHANGES_TOTAL,
            "Row changes received from the source",
            src.changes_received_total,
        )?;
        counter(
            e,
            SOURCE_TXNS_TOTAL,
            "Source transactions received",
            src.txns_received_total,
        )?;
        gauge(
            e,
            SOURCE_CONFIRMED_FLUSH_LSN,
            "The slot's confirmed_flush_lsn as a number",
            src.confirmed_flush_lsn.as_u64() as f64,
        )?;
        gauge(
            e,
            SOURCE_RECEIVED_LSN,
            "End of the last message received, as a number",
            src.received_lsn.as_u64() as f64,
        )?;
        gauge(
            e,
            SOURCE_RETAINED_WAL_BYTES,
            "WAL the slot makes the source keep",
            src.retained_wal_bytes as f64,
        )?;
        gauge(
            e,
            SOURCE_CONNECTED,
            "1 while connected to the source",
            flag(src.connected),
        )?;

        // Spill log.
        let sp = &s.spill;
        gauge(e, SPILL_BYTES, "Spill log size on disk", sp.bytes as f64)?;
        gauge(
            e,
            SPILL_MAX_BYTES,
            "Spill log cap ([spill] max_bytes)",
            sp.max_bytes as f64,
        )?;
        gauge(
            e,
            SPILL_SEGMENTS,
            "Spill log segment files",
            sp.segments as f64,
        )?;
        gauge(
            e,
            SPILL_BACKPRESSURE_ACTIVE,
            "1 while reading is paused because the spill cap is reached or its filesystem is full",
            flag(sp.backpressure_active),
        )?;
        gauge(
            e,
            SPILL_DISK_FULL,
            "1 while reading is paused because the spill filesystem is full",
            flag(sp.disk_full),
        )?;
        counter(
            e,
            SPILL_FSYNCS_TOTAL,
            "fsyncs of the spill log",
            sp.fsyncs_total,
        )?;
        gauge(
            e,
            SPILL_DURABLE_LSN,
            "Everything up to this LSN is durable in the spill log",
            sp.durable_lsn.as_u64() as f64,
        )?;
        gauge(
            e,
            SPILL_TXNS_PER_FSYNC,
            "Average source transactions per spill fsync",
            sp.txns_per_fsync,
        )?;

        // Shards.
        let per_shard = |f: &dyn Fn(&crate::status::ShardView) -> f64| -> Vec<(Labels, f64)> {
            s.shards
                .iter()
                .map(|sh| (vec![("shard", label(&sh.name))], f(sh)))
                .collect()
        };
        let per_shard_count = |f: &dyn Fn(&crate::status::ShardView) -> u64| -> Vec<(Labels, u64)> {
            s.shards
                .iter()
                .map(|sh| (vec![("shard", label(&sh.name))], f(sh)))
                .collect()
        };
        gauges(
            e,
            SHARD_UP,
            "1 while the shard's apply is running",
            &per_shard(&|sh| flag(sh.state == ShardState::Running)),
        )?;
        let states: Vec<(Labels, f64)> = s
            .shards
            .iter()
            .flat_map(|sh| {
                ALL_SHARD_STATES.iter().map(move |st| {
                    (
                        vec![
                            ("shard", label(&sh.name)),
                            ("state", st.as_str().to_owned()),
                        ],
                        flag(*st == sh.state),
                    )
                })
            })
            .collect();
        gauges(e, SHARD_STATE, "1 for the shard's current state", &states)?;
        gauges(
            e,
            SHARD_APPLIED_LSN,
            "Every source commit at or below this LSN is applied on the shard",
            &per_shard(&|sh| sh.applied_lsn.as_u64() as f64),
        )?;
        gauges(
            e,
            SHARD_LAG_BYTES,
            "WAL bytes between what the shard applied and what was received",
            &per_shard(&|sh| sh.lag_bytes as f64),
        )?;
        gauges(
            e,
            SHARD_LAG_SECONDS,
            "Age of the oldest source transaction not yet applied on the shard",
            &per_shard(&|sh| sh.lag_seconds),
        )?;
        let rows: Vec<(Labels, u64)> = s
            .shards
            .iter()
            .flat_map(|sh| {
                [
                    ("insert", sh.rows_inserted_total),
                    ("update", sh.rows_updated_total),
                    ("delete", sh.rows_deleted_total),
                ]
                .into_iter()
                .map(move |(kind, v)| {
                    (
                        vec![("shard", label(&sh.name)), ("kind", kind.to_owned())],
                        v,
                    )
                })
            })
            .collect();
        counters(
            e,
            SHARD_ROWS_APPLIED_TOTAL,
            "Rows applied to the shard, by kind",
            &rows,
        )?;
        counters(
            e,
            SHARD_TXNS_APPLIED_TOTAL,
            "Source transactions applied to the shard",
            &per_shard_count(&|sh| sh.txns_applied_total),
        )?;
        counters(
            e,
            SHARD_BATCHES_TOTAL,
            "Target transactions (batches) committed on the shard",
            &per_shard_count(&|sh| sh.batches_total),
        )?;
        counters(
            e,
            SHARD_REPLAYS_TOTAL,
            "Batches replayed change by change after a set-based conflict",
            &per_shard_count(&|sh| sh.replays_total),
        )?;
        let errors: Vec<(Labels, u64)> = s
            .shards
            .iter()
            .flat_map(|sh| {
                [
                    (ErrorClass::Transient, sh.transient_errors_total),
                    (ErrorClass::Definite, sh.definite_errors_total),
                ]
                .into_iter()
                .map(move |(c, v)| {
                    (
                        vec![("shard", label(&sh.name)), ("class", c.as_str().to_owned())],
                        v,
                    )
                })
            })
            .collect();
        counters(
            e,
            SHARD_ERRORS_TOTAL,
            "Apply errors on the shard, by class",
            &errors,
        )?;
        gauges(
            e,
            SHARD_BATCH_TXNS_AVG,
            "Average source transactions per target transaction",
            &per_shard(&|sh| sh.avg_batch_txns),
        )?;
        gauges(
            e,
            SHARD_ROWS_PER_SECOND,
            "Rows applied per second (recent)",
            &per_shard(&|sh| sh.rows_per_sec),
        )?;
        let latency: Vec<(Labels, f64)> = s
            .shards
            .iter()
            .flat_map(|sh| {
                [
                    ("0.5", sh.latency_p50_ms),
                    ("0.99", sh.latency_p99_ms),
                    ("1", sh.latency_max_ms),
                ]
                .into_iter()
                .map(move |(q, ms)| {
                    (
                        vec![("shard", label(&sh.name)), ("quantile", q.to_owned())],
                        ms / 1000.0,
                    )
                })
            })
            .collect();
        gauges(
            e,
            SHARD_APPLY_LATENCY_SECONDS,
            "Commit-to-apply latency quantiles (1 = max)",
            &latency,
        )?;

        // Full load.
        let per_table = |f: &dyn Fn(&crate::status::TableView) -> u64| -> Vec<(Labels, u64)> {
            s.tables
                .iter()
                .map(|t| (vec![("table", label(&t.name))], f(t)))
                .collect()
        };
        counters(
            e,
            FULLLOAD_ROWS_COPIED_TOTAL,
            "Rows copied by the full load",
            &per_table(&|t| t.rows_copied),
        )?;
        counters(
            e,
            FULLLOAD_BYTES_COPIED_TOTAL,
            "Bytes copied by the full load",
            &per_table(&|t| t.bytes_copied),
        )?;
        let est: Vec<(Labels, f64)> = per_table(&|t| t.rows_estimated)
            .into_iter()
            .map(|(l, v)| (l, v as f64))
            .collect();
        gauges(
            e,
            FULLLOAD_ROWS_ESTIMATED,
            "Estimated rows of the table (pg_class.reltuples)",
            &est,
        )?;
        // The full load's throttles.
        let per_shard = |f: &dyn Fn(&crate::status::ThrottleView) -> Option<f64>| {
            s.throttle
                .iter()
                .filter_map(|t| f(t).map(|v| (vec![("shard", label(&t.shard))], v)))
                .collect::<Vec<(Labels, f64)>>()
        };
        gauges(
            e,
            SNAPSHOT_THROTTLE_ROWS_PER_SECOND,
            "Row rate the full load's copy into the shard is held to (absent: unlimited)",
            &per_shard(&|t| t.rows_per_sec),
        )?;
        counters(
            e,
            SNAPSHOT_THROTTLE_BACKOFFS_TOTAL,
            "Times the adaptive throttle cut the shard's rate (a health signal over its bound)",
            &s.throttle
                .iter()
                .map(|t| (vec![("shard", label(&t.shard))], t.backoffs_total))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            e,
            SNAPSHOT_PROBE_LATENCY_SECONDS,
            "Round trip of the adaptive throttle's last probe query on the shard",
            &per_shard(&|t| t.probe_latency_ms.map(|v| v / 1000.0)),
        )?;
        gauges(
            e,
            SNAPSHOT_ACTIVE_BACKENDS,
            "Active client backends on the shard at the last probe (reshard's own excluded)",
            &per_shard(&|t| t.active_backends.map(|v| v as f64)),
        )?;
        gauges(
            e,
            SNAPSHOT_REPLICA_LAG_SECONDS,
            "Largest replay lag of the shard's read replicas at the last probe",
            &per_shard(&|t| t.replica_lag_ms.map(|v| v / 1000.0)),
        )?;
        let quarantined: Vec<(Labels, u64)> = s
            .quarantine
            .iter()
            .map(|q| (vec![("table", label(&q.table))], q.changes))
            .collect();
        counters(
            e,
            QUARANTINED_CHANGES_TOTAL,
            "Changes kept in the quarantine because they could not be routed (see `reshard quarantine list`)",
            &quarantined,
        )?;
        let fences = &s.source.fences;
        gauges(
            e,
            FENCE_SECONDS,
            "Seconds the shard's write fence has stood on the source (reshard fence, cutover --fence)",
            &fences
                .iter()
                .map(|f| (vec![("shard", label(&f.shard))], f.fenced_secs))
                .collect::<Vec<_>>(),
        )?;
        counters(
            e,
            FENCE_REFUSED_WRITES_TOTAL,
            "Writes the source refused because they route to a fenced shard",
            &fences
                .iter()
                .map(|f| (vec![("shard", label(&f.shard))], f.refused.max(0) as u64))
                .collect::<Vec<_>>(),
        )?;

        // The reverse direction.
        let per_reverse = |f: &dyn Fn(&crate::status::ReverseView) -> f64| -> Vec<(Labels, f64)> {
            s.reverse
                .iter()
                .map(|r| (vec![("shard", label(&r.shard))], f(r)))
                .collect()
        };
        gauges(
            e,
            REVERSE_APPLIED_LSN,
            "Every commit of the cut-over shard at or below this LSN is on the source (the shard's LSN as a number)",
            &per_reverse(&|r| r.applied_lsn.as_u64() as f64),
        )?;
        gauges(
            e,
            REVERSE_LAG_BYTES,
            "Bytes of the shard's WAL received by its reverse stream and not yet applied to the source",
            &per_reverse(&|r| r.lag_bytes as f64),
        )?;
        gauges(
            e,
            REVERSE_LAG_SECONDS,
            "Seconds since the shard committed the oldest transaction not yet applied to the source",
            &per_reverse(&|r| r.lag_seconds),
        )?;
        gauges(
            e,
            REVERSE_UP,
            "1 while the shard's reverse stream runs in this daemon",
            &per_reverse(&|r| flag(r.stream == "running")),
        )?;
        let reverse_rows: Vec<(Labels, u64)> = s
            .reverse
            .iter()
            .flat_map(|r| {
                [
                    ("insert", r.rows_inserted_total),
                    ("update", r.rows_updated_total),
                    ("delete", r.rows_deleted_total),
                ]
                .into_iter()
                .map(move |(kind, n)| {
                    (
                        vec![("shard", label(&r.shard)), ("kind", kind.to_owned())],
                        n,
                    )
                })
            })
            .collect();
        counters(
            e,
            REVERSE_ROWS_APPLIED_TOTAL,
            "Rows the reverse stream applied to the source, by kind (this run)",
            &reverse_rows,
        )?;
        Ok(())
    }
}

/// The OpenMetrics text exposition of one snapshot (ends with `# EOF`).
pub fn encode(snapshot: &StatusSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::with_capacity(8192);
    if let Err(e) = text::encode(&mut out, &registry) {
        // Writing into a String cannot fail; a failure here is a bug in a value (u64::MAX
        // gauge), so say so in the exposition instead of panicking.
        out.clear();
        let _ = writeln!(out, "# encoding failed: {e}\n# EOF");
    }
    out
}

/// Binds `listen` (`[admin] metrics`) and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown` turns true (or its sender is dropped). An empty `listen` means the endpoint is
/// off: returns at once.
pub async fn serve_metrics(
    listen: &str,
    status: watch::Receiver<StatusSnapshot>,
    shutdown: ShutdownRx,
) -> Result<(), MetricsError> {
    if listen.trim().is_empty() {
        info!("metrics endpoint off (admin.metrics = \"\")");
        return Ok(());
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
    serve_metrics_on(listener, status, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve_metrics_on(
    listener: TcpListener,
    status: watch::Receiver<StatusSnapshot>,
    mut shutdown: ShutdownRx,
) -> Result<(), MetricsError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(addr = %addr, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    let limit = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Some((socket, peer, permit)) = crate::admin::next_connection(
            &listener,
            &limit,
            &mut shutdown,
            "metrics endpoint",
            &addr,
        )
        .await
        else {
            break;
        };
        let status = status.clone();
        let span = info_span!("metrics_request", peer = %peer);
        conns.spawn(
            async move {
                let _permit = permit;
                if let Err(e) = handle_connection(socket, status).await {
                    debug!(error = %e, "metrics request failed");
                }
            }
            .instrument(span),
        );
    }
    info!(addr = %addr, "metrics endpoint stopped");
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// What one request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET`/`HEAD` of a path (query string stripped).
    Get { path: String, head: bool },
    /// Some other method.
    BadMethod,
    /// Not an HTTP request line.
    Malformed,
}

/// Parses the request line of a complete head.
fn parse_request(head: &[u8]) -> Request {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Malformed;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Request::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    match method {
        "GET" => Request::Get { path, head: false },
        "HEAD" => Request::Get { path, head: true },
        _ => Request::BadMethod,
    }
}

/// Reads the request head (up to the blank line), bounded in size and time.
async fn read_head(socket: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Some(Vec::new()));
        }
    }
}

async fn respond(
    socket: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    socket.write_all(out.as_bytes()).await?;
    socket.shutdown().await
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn handle_connection(
    mut socket: TcpStream,
    status: watch::Receiver<StatusSnapshot>,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut socket)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return respond(
                &mut socket,
                "408 Request Timeout",
                TEXT,
                "request timeout\n",
                false,
            )
            .await
        }
    };
    if head.is_empty() {
        return respond(
            &mut socket,
            "431 Request Header Fields Too Large",
            TEXT,
            "request head too large\n",
            false,
        )
        .await;
    }
    let (path, head_only) = match parse_request(&head) {
        Request::Get { path, head } => (path, head),
        Request::BadMethod => {
            return respond(
                &mut socket,
                "405 Method Not Allowed",
                TEXT,
                "only GET and HEAD are served\n",
                false,
            )
            .await
        }
        Request::Malformed => {
            return respond(&mut socket, "400 Bad Request", TEXT, "bad request\n", false).await
        }
    };
    match path.as_str() {
        "/metrics" => {
            let snap = status.borrow().clone();
            let body = encode(&snap);
            respond(
                &mut socket,
                "200 OK",
                OPENMETRICS_CONTENT_TYPE,
                &body,
                head_only,
            )
            .await
        }
        "/healthz" => respond(&mut socket, "200 OK", TEXT, "ok\n", head_only).await,
        "/readyz" => {
            let (ready, reason) = readiness(&status.borrow());
            if ready {
                respond(&mut socket, "200 OK", TEXT, "ready\n", head_only).await
            } else {
                let body = format!("not ready: {reason}\n");
                respond(
                    &mut socket,
                    "503 Service Unavailable",
                    TEXT,
                    &body,
                    head_only,
                )
                .await
            }
        }
        _ => {
            respond(
                &mut socket,
                "404 Not Found",
                TEXT,
                "not found; try /metrics, /healthz or /readyz\n",
                head_only,
            )
            .await
        }
    }
}

/// Whether the daemon is ready, and if not, why (names the phase or the stopped shards).
pub fn readiness(s: &StatusSnapshot) -> (bool, String) {
    if s.is_ready() {
        return (true, String::new());
    }
    let stopped: Vec<String> = s
        .shards
        .iter()
        .filter(|sh| sh.state == ShardState::Stopped)
        .map(|sh| match &sh.last_error {
            Some(err) => format!("{} ({err})", sh.name),
            None => sh.name.clone(),
        })
        .collect();
    if s.phase != Phase::Streaming {
        (
            false,
            format!("phase is {}, not streaming", s.phase.as_str()),
        )
    } else {
        (false, format!("shard(s) stopped: {}", stopped.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::status::{ShardView, TableView};

    fn snap() -> StatusSnapshot {
        StatusSnapshot {
            phase: Phase::Streaming,
            version: "0.1.0".into(),
            uptime_secs: 3.5,
            shards: vec![
                ShardView {
                    name: "shard0".into(),
                    state: ShardState::Running,
                    applied_lsn: Lsn::from_u64(4096),
                    rows_inserted_total: 10,
                    rows_updated_total: 2,
                    transient_errors_total: 1,
                    latency_p99_ms: 250.0,
                    ..Default::default()
                },
                ShardView {
                    name: "we\"ird\\name".into(),
                    state: ShardState::Stopped,
                    last_error: Some("boom".into()),
                    ..Default::default()
                },
            ],
            tables: vec![TableView {
                name: "public.events".into(),
                rows_copied: 5,
                ..Default::default()
            }],
            quarantine: vec![crate::quarantine::TableSummary {
                table: "public.notes".into(),
                changes: 3,
                ..Default::default()
            }],
            throttle: vec![
                crate::status::ThrottleView {
                    shard: "shard0".into(),
                    adaptive: true,
                    rows_per_sec: Some(2500.0),
                    backoffs_total: 4,
                    probe_latency_ms: Some(12.5),
                    active_backends: Some(3),
                    ..Default::default()
                },
                crate::status::ThrottleView {
                    shard: "shard1".into(),
                    ..Default::default()
                },
            ],
            reverse: vec![crate::status::ReverseView {
                shard: "shard1".into(),
                stream: "running".into(),
                applied_lsn: Lsn::from_u64(8192),
                lag_bytes: 100,
                lag_seconds: 1.5,
                rows_updated_total: 4,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn exposition_has_every_metric_and_labels() {
        let text = encode(&snap());
        assert!(text.ends_with("# EOF\n"), "{text}");
        for name in ALL {
            let family = name
                .strip_suffix("_total")
                .or_else(|| name.strip_suffix("_info"))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains("reshard_shard_rows_applied_total{shard=\"shard0\",kind=\"insert\"} 10")
        );
        assert!(text.contains("reshard_shard_errors_total{shard=\"shard0\",class=\"transient\"} 1"));
        assert!(text.contains("reshard_shard_applied_lsn{shard=\"shard0\"} 4096"));
        assert!(text.contains("reshard_phase{phase=\"streaming\"} 1"));
        assert!(
            text.contains("# TYPE reshard_build info\nreshard_build_info{version=\"0.1.0\"} 1\n")
        );
        assert!(text.contains("reshard_phase{phase=\"full_load\"} 0"));
        assert!(text.contains(
            "reshard_shard_apply_latency_seconds{shard=\"shard0\",quantile=\"0.99\"} 0.25"
        ));
        assert!(text.contains("reshard_fullload_rows_copied_total{table=\"public.events\"} 5"));
        assert!(text.contains("reshard_quarantined_changes_total{table=\"public.notes\"} 3"));
        assert!(text.contains("reshard_snapshot_throttle_rows_per_second{shard=\"shard0\"} 2500.0"));
        assert!(!text.contains("reshard_snapshot_throttle_rows_per_second{shard=\"shard1\"}"));
        assert!(text.contains("reshard_snapshot_throttle_backoffs_total{shard=\"shard0\"} 4"));
        assert!(text.contains("reshard_snapshot_probe_latency_seconds{shard=\"shard0\"} 0.0125"));
        assert!(text.contains("reshard_snapshot_active_backends{shard=\"shard0\"} 3.0"));
        assert!(!text.contains("reshard_snapshot_probe_latency_seconds{shard=\"shard1\"}"));
        assert!(text.contains("reshard_reverse_applied_lsn{shard=\"shard1\"} 8192"));
        assert!(text.contains("reshard_reverse_lag_bytes{shard=\"shard1\"} 100"));
        assert!(text.contains("reshard_reverse_lag_seconds{shard=\"shard1\"} 1.5"));
        assert!(text.contains("reshard_reverse_up{shard=\"shard1\"} 1"));
        assert!(
            text.contains("reshard_reverse_rows_applied_total{shard=\"shard1\",kind=\"update\"} 4")
        );
        // Label values are escaped.
        assert!(text.contains("shard=\"we\\\"ird\\\\name\""), "{text}");
    }

    #[test]
    fn counters_end_in_total_and_gauges_do_not() {
        let text = encode(&snap());
        for name in ALL {
            let is_counter = text.contains(&format!(
                "# TYPE {} counter",
                name.strip_suffix("_total").unwrap_or(name)
            ));
            assert_eq!(is_counter, name.ends_with("_total"), "{name}");
        }
    }

    #[test]
    fn readiness_names_the_reason() {
        let mut s = snap();
        let (ready, why) = readiness(&s);
        assert!(!ready);
        assert!(why.contains("we\"ird\\name (boom)"), "{why}");
        s.shards.pop();
        assert_eq!(readiness(&s), (true, String::new()));
        s.phase = Phase::FullLoad;
        assert_eq!(readiness(&s).1, "phase is full_load, not streaming");
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Request::Get {
                path: "/metrics".into(),
                head: false
            }
        );
        assert_eq!(
            parse_request(b"HEAD /healthz HTTP/1.0\r\n\r\n"),
            Request::Get {
                path: "/healthz".into(),
                head: true
            }
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        assert_eq!(parse_request(b"garbage\r\n\r\n"), Request::Malformed);
        assert_eq!(parse_request(b"\xff\xfe\r\n\r\n"), Request::Malformed);
        assert_eq!(parse_request(b""), Request::Malformed);
    }
}
