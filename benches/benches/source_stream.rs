//! Replication client throughput against a real PostgreSQL: rows per second delivered by
//! `ReplicationStream::next` for one large transaction of 6-column rows (bigint, bigint,
//! numeric, jsonb, timestamptz, text), re-read from an unconfirmed slot on every iteration.
//!
//! The walsender's decoding is part of what is measured (it is the ceiling, see DESIGN.md);
//! the figure shows whether the client keeps up with it.
//!
//! Run: `cargo bench -p reshard-benches --bench source_stream`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reshard_engine::source::{
    ConnConfig, PgOutputOptions, ReplicationClient, SlotOptions, SnapshotAction,
};
use reshard_harness::PgCluster;

const ROWS: u64 = 50_000;

fn source_stream(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cluster = PgCluster::start().expect("start PostgreSQL");
    cluster
        .psql(
            "postgres",
            "CREATE TABLE events(id bigint PRIMARY KEY, account_id bigint, amount numeric, \
             payload jsonb, created_at timestamptz, note text); \
             CREATE PUBLICATION bench_pub FOR TABLE events",
        )
        .expect("schema");
    let cfg = ConnConfig::parse_with_env(&cluster.url("postgres"), &|_| None).expect("config");
    let start = rt.block_on(async {
        let mut rc = ReplicationClient::connect(&cfg).await.expect("connect");
        let slot = rc
            .create_slot(
                "bench_slot",
                SlotOptions {
                    snapshot: SnapshotAction::NoExport,
                    ..Default::default()
                },
            )
            .await
            .expect("slot");
        rc.close().await;
        slot.consistent_point
    });
    cluster
        .psql(
            "postgres",
            &format!(
                "INSERT INTO events SELECT g, g % 1000, g * 1.25, \
                 jsonb_build_object('k', g, 'tag', 'bench'), now(), 'note ' || g \
                 FROM generate_series(1, {ROWS}) g"
            ),
        )
        .expect("rows");

    let mut group = c.benchmark_group("source_stream");
    group.throughput(Throughput::Elements(ROWS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("pgoutput_v3_inserts", |b| {
        b.iter(|| {
            rt.block_on(async {
                let rc = ReplicationClient::connect(&cfg).await.expect("connect");
                let mut stream = rc
                    .start_replication(
                        "bench_slot",
                        start,
                        PgOutputOptions {
                            publication_names: vec!["bench_pub".into()],
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("start");
                let mut inserts = 0u64;
                loop {
                    let x = stream.next().await.expect("next").expect("open stream");
                    match x.data.first() {
                        Some(b'I') => inserts += 1,
                        Some(b'C') => break,
                        _ => {}
                    }
                }
                assert_eq!(inserts, ROWS);
                stream.shutdown().await.expect("shutdown");
            })
        })
    });
    group.finish();
}

criterion_group!(benches, source_stream);
criterion_main!(benches);
