//! Cost of one Prometheus scrape and of one admin-console `SHOW` result, as functions of the
//! number of shards and tables: both are built from the status snapshot on request, so they
//! must stay cheap next to a scrape interval (seconds) even for large deployments.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use reshard_engine::admin::render;
use reshard_engine::lsn::Lsn;
use reshard_engine::metrics;
use reshard_engine::status::{Phase, ShardState, ShardView, StatusSnapshot, TableView};

fn snapshot(shards: usize, tables: usize) -> StatusSnapshot {
    StatusSnapshot {
        phase: Phase::Streaming,
        version: "0.1.0".into(),
        uptime_secs: 1234.5,
        shards: (0..shards)
            .map(|i| ShardView {
                name: format!("shard{i}"),
                state: ShardState::Running,
                applied_lsn: Lsn::from_u64(0x1_0000_0000 + i as u64 * 4096),
                lag_bytes: 4096,
                lag_seconds: 0.5,
                txns_applied_total: 1_000_000,
                rows_inserted_total: 5_000_000,
                rows_updated_total: 2_000_000,
                rows_deleted_total: 100_000,
                batches_total: 100_000,
                rows_per_sec: 25_000.0,
                avg_batch_txns: 10.0,
                latency_p50_ms: 20.0,
                latency_p99_ms: 90.0,
                latency_max_ms: 400.0,
                ..Default::default()
            })
            .collect(),
        tables: (0..tables)
            .map(|i| TableView {
                name: format!("public.table_{i}"),
                target: format!("public.table_{i}"),
                mode: "sharded".into(),
                state: "done".into(),
                rows_copied: 1_000_000,
                rows_estimated: 1_000_000,
                bytes_copied: 100_000_000,
            })
            .collect(),
        ..Default::default()
    }
}

fn scrape(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics_encode");
    for (shards, tables) in [(5, 20), (64, 200)] {
        let snap = snapshot(shards, tables);
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{shards}_shards_{tables}_tables")),
            &snap,
            |b, s| b.iter(|| metrics::encode(s).len()),
        );
    }
    g.finish();
}

fn show(c: &mut Criterion) {
    let snap = snapshot(64, 200);
    c.bench_function("admin_show_shards_64", |b| {
        b.iter(|| render::shards(&snap).rows.len())
    });
    c.bench_function("admin_show_status_json_64_200", |b| {
        b.iter(|| render::status_json(&snap).map(|r| r.rows.len()))
    });
}

criterion_group!(benches, scrape, show);
criterion_main!(benches);
