//! Batch building on the apply path, without PostgreSQL: folding a flush's changes per key and
//! encoding the net changes as COPY text rows for the staging table. Reported in rows/s.
//!
//! Run: `cargo bench -p reshard-benches --bench apply_batch`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use reshard_engine::apply::batch::{encode_table, encode_table_inline, Prepared};
use reshard_engine::apply::fold::Fold;
use reshard_engine::apply::schema::{TargetColumn, TargetTable};
use reshard_engine::event::{Change, Column, OldRow, Relation, ReplicaIdentity, TableId, Value};

const ROWS: usize = 10_000;

fn relation() -> Arc<Relation> {
    let col = |n: &str, k: bool| Column {
        name: n.into(),
        type_oid: 25,
        type_modifier: -1,
        is_key: k,
    };
    Arc::new(Relation {
        id: TableId(1),
        namespace: "public".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", true),
            col("account_id", false),
            col("amount", false),
            col("meta", false),
            col("created_at", false),
            col("note", false),
        ],
    })
}

fn table(rel: &Arc<Relation>) -> TargetTable {
    let types = [
        "bigint",
        "bigint",
        "numeric",
        "jsonb",
        "timestamptz",
        "text",
    ];
    let cols: Vec<TargetColumn> = rel
        .columns
        .iter()
        .zip(types)
        .map(|(c, ty)| TargetColumn {
            name: c.name.clone(),
            type_sql: ty.into(),
            cast_sql: ty.into(),
            not_null: c.is_key,
            has_default: false,
            identity_always: false,
            identity_by_default: false,
            generated: false,
            in_primary_key: c.is_key,
        })
        .collect();
    TargetTable::build(
        rel.clone(),
        &reshard_engine::pg::sql::TableName::new("public", "orders"),
        &cols,
        "stage".into(),
    )
    .expect("bench table maps")
}

fn t(s: String) -> Value {
    Value::Text(Bytes::from(s))
}

/// A flush of the usual mix: 70% inserts, 20% updates (half carrying unchanged TOAST, some of
/// rows inserted in the same flush), 10% deletes.
fn changes(rel: &Arc<Relation>) -> Vec<Change> {
    (0..ROWS)
        .map(|i| {
            let id = (i % (ROWS * 9 / 10)).to_string();
            let row = vec![
                t(id.clone()),
                t((i % 97).to_string()),
                t(format!("{}.{:02}", i * 7, i % 100)),
                t(format!(r#"{{"k": {i}, "tags": ["a\tb", "c"]}}"#)),
                t("2024-05-06 07:08:09.123456+00".into()),
                t(format!("note {i} with a \\ backslash\nand a newline")),
            ];
            match i % 10 {
                0 => Change::Delete {
                    rel: rel.clone(),
                    old: OldRow::Key(vec![
                        t(id),
                        Value::Null,
                        Value::Null,
                        Value::Null,
                        Value::Null,
                        Value::Null,
                    ]),
                },
                1 => {
                    let mut r = row;
                    r[3] = Value::UnchangedToast;
                    Change::Update {
                        rel: rel.clone(),
                        old: None,
                        new: r,
                    }
                }
                2 => Change::Update {
                    rel: rel.clone(),
                    old: None,
                    new: row,
                },
                _ => Change::Insert {
                    rel: rel.clone(),
                    new: row,
                },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rel = relation();
    let table = table(&rel);
    let input = changes(&rel);
    let mut g = c.benchmark_group("apply_batch");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("fold_and_encode_copy_10k", |b| {
        let mut out = BytesMut::with_capacity(4 << 20);
        b.iter(|| {
            let mut fold = Fold::new(table.key_idx.clone());
            for ch in &input {
                fold.push(ch).expect("foldable");
            }
            out.clear();
            let tb = encode_table(&table, &fold.finish(), &mut out, None).expect("encodable");
            black_box((tb.rows, out.len()))
        })
    });
    // The same flush with the rows of new keys written as COPY rows for the target table
    // itself (`TargetTable::takes_direct_inserts`): no op code, no staging.
    g.bench_function("fold_and_encode_copy_direct_10k", |b| {
        let mut out = BytesMut::with_capacity(4 << 20);
        let mut direct = BytesMut::with_capacity(4 << 20);
        b.iter(|| {
            let mut fold = Fold::new(table.key_idx.clone());
            for ch in &input {
                fold.push(ch).expect("foldable");
            }
            out.clear();
            direct.clear();
            let tb = encode_table(&table, &fold.finish(), &mut out, Some(&mut direct))
                .expect("encodable");
            black_box((tb.rows, out.len(), direct.len()))
        })
    });
    g.finish();
    // The caught-up case: one small source transaction per flush, its rows inline in the merge
    // statements (`encode_table_inline`) against the COPY encoding of the same rows.
    const SMALL: usize = 5;
    let mut g = c.benchmark_group("apply_batch_small");
    g.throughput(Throughput::Elements((ROWS / SMALL * SMALL) as u64));
    // Folds and encodes every 5-row flush inline, with the session's prepared statements or as
    // VALUES lists; returns the statements' bytes.
    let encode_small = |prepared: &mut Option<Prepared>| {
        let mut n = 0usize;
        for chunk in input.chunks_exact(SMALL) {
            let mut fold = Fold::new(table.key_idx.clone());
            for ch in chunk {
                fold.push(ch).expect("foldable");
            }
            let tb = encode_table_inline(&table, &fold.finish(), false, prepared.as_mut())
                .expect("encodable")
                .expect("small enough");
            n += tb.statements.iter().map(String::len).sum::<usize>();
        }
        n
    };
    g.bench_function("fold_and_encode_inline_5row_flushes", |b| {
        b.iter(|| black_box(encode_small(&mut None)))
    });
    g.bench_function("fold_and_encode_prepared_5row_flushes", |b| {
        // One session's prepared statements: each is prepared on the first flush only.
        let mut prepared = Some(Prepared::new());
        b.iter(|| black_box(encode_small(&mut prepared)))
    });
    g.bench_function("fold_and_encode_copy_5row_flushes", |b| {
        let mut out = BytesMut::with_capacity(1 << 16);
        b.iter(|| {
            let mut n = 0usize;
            for chunk in input.chunks_exact(SMALL) {
                let mut fold = Fold::new(table.key_idx.clone());
                for ch in chunk {
                    fold.push(ch).expect("foldable");
                }
                out.clear();
                let tb = encode_table(&table, &fold.finish(), &mut out, None).expect("encodable");
                n += out.len() + tb.statements.iter().map(String::len).sum::<usize>();
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
