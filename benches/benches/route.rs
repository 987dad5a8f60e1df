//! Routing throughput: PostgreSQL-compatible key hashing and `Router::route` per row.
//!
//! Run: `cargo bench -p reshard-benches --bench route`. Reported per row (criterion's
//! `elem/s`; ns/row = 1e9 / that).

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use reshard_engine::event::{Change, Column, Relation, ReplicaIdentity, TableId, Value};
use reshard_engine::route::hash::{self, HASH_PARTITION_SEED};
use reshard_engine::route::{
    HashKind, KeyType, RouteSpec, Router, TableMode, TableRoute, TableRule, Unlisted,
};

const ROWS: usize = 10_000;

fn col(name: &str, type_oid: u32, is_key: bool) -> Column {
    Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    }
}

fn router(shards: usize) -> Router {
    Router::new(RouteSpec {
        shards: (0..shards).map(|i| format!("s{i}")).collect(),
        tables: vec![(
            reshard_engine::pg::sql::TableName::new("public", "events"),
            TableRule {
                mode: TableMode::Sharded {
                    key: "account_id".into(),
                    key_immutable: false,
                },
                target: None,
            },
        )],
        default_key: "account_id".into(),
        hash: HashKind::Postgres,
        unlisted: Unlisted::Auto,
    })
    .expect("valid spec")
}

/// `events (id bigint, account_id <key type>, kind text, payload jsonb, amount numeric,
/// created_at timestamptz)`, the 6-column row of DESIGN.md's measurement.
fn relation(key_oid: u32) -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(16_400),
        namespace: "public".into(),
        name: "events".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, true),
            col("account_id", key_oid, true),
            col("kind", 25, false),
            col("payload", 3802, false),
            col("amount", 1700, false),
            col("created_at", 1184, false),
        ],
    })
}

fn inserts(rel: &Arc<Relation>, key: impl Fn(usize) -> String) -> Vec<Change> {
    (0..ROWS)
        .map(|i| Change::Insert {
            rel: rel.clone(),
            new: vec![
                Value::Text(Bytes::from(i.to_string())),
                Value::Text(Bytes::from(key(i))),
                Value::Text(Bytes::from_static(b"page_view")),
                Value::Text(Bytes::from_static(br#"{"path": "/home", "ms": 12}"#)),
                Value::Text(Bytes::from_static(b"12.50")),
                Value::Text(Bytes::from_static(b"2026-11-23 02:00:00.123456+00")),
            ],
        })
        .collect()
}

fn bench_hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("route/hash");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hashint8extended", |b| {
        let mut v = 1_234_567_890_123_i64;
        b.iter(|| {
            v = v.wrapping_add(1);
            black_box(hash::hashint8extended(black_box(v), HASH_PARTITION_SEED))
        })
    });
    g.bench_function("hashtextextended_16B", |b| {
        let s = b"acct-00000012345";
        b.iter(|| black_box(hash::hashtextextended(black_box(s), HASH_PARTITION_SEED)))
    });
    g.bench_function("uuid_text_parse_and_hash", |b| {
        let s = b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        b.iter(|| {
            let k = KeyType::Uuid.parse_text(black_box(s)).expect("uuid");
            black_box(k.row_hash())
        })
    });
    g.finish();
}

fn bench_route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route/route");
    g.throughput(Throughput::Elements(ROWS as u64));
    for (name, oid, key) in [
        ("insert_int8_key_8_shards", 20u32, KeyKind::Int),
        ("insert_uuid_key_8_shards", 2950, KeyKind::Uuid),
        ("insert_text_key_8_shards", 25, KeyKind::Text),
    ] {
        let rel = relation(oid);
        let changes = inserts(&rel, |i| key.make(i));
        let mut r = router(8);
        g.bench_function(name, |b| {
            b.iter_batched(
                || changes.clone(),
                |cs| {
                    for ch in cs {
                        r.route(ch, &mut |s, c| {
                            black_box((s, c));
                        })
                        .expect("routes");
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    let rel = relation(20);
    let r = router(8);
    let TableRoute::Sharded(key) = r.table_route(&rel).expect("route") else {
        panic!("sharded");
    };
    let fields: Vec<String> = (0..ROWS).map(|i| (i as i64 * 7919).to_string()).collect();
    g.bench_function("copy_field_int8_8_shards", |b| {
        b.iter(|| {
            for f in &fields {
                black_box(r.shard_of_copy_field(&key, f.as_bytes()).expect("routes"));
            }
        })
    });
    g.finish();
}

#[derive(Copy, Clone)]
enum KeyKind {
    Int,
    Uuid,
    Text,
}

impl KeyKind {
    fn make(self, i: usize) -> String {
        match self {
            KeyKind::Int => (i as i64 * 104_729).to_string(),
            KeyKind::Uuid => format!("a0eebc99-9c0b-4ef8-bb6d-{:012x}", i * 7919),
            KeyKind::Text => format!("acct-{i:011}"),
        }
    }
}

criterion_group!(benches, bench_hash, bench_route);
criterion_main!(benches);
