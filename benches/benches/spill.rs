//! Spill log throughput: append with group commit (fsync) and read back, in MB/s of
//! uncompressed records and in records/s; prints the achieved transactions per fsync.
//!
//! Run: `cargo bench -p reshard-benches --bench spill -- --warm-up-time 1 --measurement-time 3`
//! (`TMPDIR` chooses the disk measured).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use reshard_engine::event::{
    Begin, Change, Column, Commit, Relation, ReplicaIdentity, ShardEvent, ShardId, ShardLog,
    ShardReader, TableId, Value,
};
use reshard_engine::spill::{codec::Encoder, SpillIdentity, SpillOptions, SpillWriter};
use reshard_engine::Lsn;

const SHARDS: u16 = 4;
/// Transactions per benchmark iteration.
const TXNS: u64 = 2_000;
/// Rows per transaction (spread over the shards).
const ROWS: u64 = 8;

fn relation() -> Arc<Relation> {
    let col = |name: &str, type_oid, is_key| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    };
    Arc::new(Relation {
        id: TableId(16_384),
        namespace: "public".into(),
        name: "ledger_entries".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, true),
            col("account_id", 20, false),
            col("amount", 1700, false),
            col("meta", 3802, false),
            col("created_at", 1184, false),
            col("note", 25, false),
        ],
    })
}

/// A realistic row: ids, a numeric, a small jsonb, a timestamp, some text.
fn row(n: u64) -> Vec<Value> {
    let t = |s: String| Value::Text(Bytes::from(s));
    vec![
        t(n.to_string()),
        t((n % 9_973).to_string()),
        t(format!("{}.{:02}", n * 7 % 100_000, n % 100)),
        t(format!(
            r#"{{"source": "api", "seq": {n}, "tags": ["a", "b{}"]}}"#,
            n % 13
        )),
        t(format!(
            "2024-05-{:02} 12:{:02}:{:02}+00",
            n % 28 + 1,
            n % 60,
            n * 7 % 60
        )),
        t(format!("payment {n} for invoice {}", n * 31 % 1_000_003)),
    ]
}

struct Workload {
    next_txn: u64,
    rel: Arc<Relation>,
}

impl Workload {
    /// Appends `TXNS` transactions, starting a group commit whenever `flush_due` says so
    /// (the fsyncs run on the syncer thread meanwhile), then waits for the last one.
    fn run(&mut self, w: &mut SpillWriter) {
        for _ in 0..TXNS {
            let k = self.next_txn;
            self.next_txn += 1;
            let commit_lsn = Lsn::from_u64(k * 10_000);
            let begin = ShardEvent::Begin(Begin {
                xid: k as u32,
                commit_lsn,
                commit_time: k as i64,
            });
            let commit = ShardEvent::Commit(Commit {
                xid: k as u32,
                commit_lsn,
                end_lsn: commit_lsn.add_bytes(100),
                commit_time: k as i64,
            });
            let mut touched = [false; SHARDS as usize];
            for r in 0..ROWS {
                let s = ((k * ROWS + r) % u64::from(SHARDS)) as u16;
                if !touched[s as usize] {
                    touched[s as usize] = true;
                    w.append(ShardId(s), &begin).unwrap();
                }
                let ev = ShardEvent::Change(Change::Insert {
                    rel: Arc::clone(&self.rel),
                    new: row(k * ROWS + r),
                });
                w.append(ShardId(s), &ev).unwrap();
            }
            for (s, t) in touched.iter().enumerate() {
                if *t {
                    w.append(ShardId(s as u16), &commit).unwrap();
                }
            }
            w.end_txn(commit_lsn.add_bytes(100)).unwrap();
            if w.flush_due() {
                w.commit().unwrap();
            }
        }
        w.flush().unwrap();
    }
}

fn record_bytes_per_iteration(rel: &Arc<Relation>) -> u64 {
    let mut enc = Encoder::new();
    let mut buf = Vec::new();
    for n in 0..TXNS * ROWS {
        enc.encode(
            &ShardEvent::Change(Change::Insert {
                rel: Arc::clone(rel),
                new: row(n),
            }),
            &mut buf,
        );
    }
    buf.len() as u64
}

fn identity() -> SpillIdentity {
    SpillIdentity {
        system_id: "7300000000000000001".into(),
        slot: "bench".into(),
        shards: (0..SHARDS).map(|i| format!("s{i}")).collect(),
    }
}

fn bench_spill(c: &mut Criterion) {
    let rel = relation();
    let bytes = record_bytes_per_iteration(&rel);
    let dir = tempfile::tempdir().unwrap();
    let opts = SpillOptions {
        dir: dir.path().join("append"),
        ..SpillOptions::default()
    };
    let (mut w, _) = SpillWriter::open(opts, identity()).unwrap();
    let log = w.log();
    let mut load = Workload {
        next_txn: 1,
        rel: Arc::clone(&rel),
    };

    let mut g = c.benchmark_group("spill_append_group_commit");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("bytes", |b| {
        b.iter(|| {
            load.run(&mut w);
            // Let retention keep the directory small.
            let applied = Lsn::from_u64((load.next_txn - 1) * 10_000);
            for s in 0..SHARDS {
                log.applied(ShardId(s), applied);
            }
        })
    });
    g.throughput(Throughput::Elements(TXNS * ROWS));
    g.bench_function("records", |b| b.iter(|| load.run(&mut w)));
    g.finish();
    let st = w.stats();
    println!(
        "spill append: {} txns in {} group commits = {:.1} txns per fsync ({} file syncs); {} record bytes -> {} on disk",
        st.txns_total,
        st.fsyncs_total,
        st.txns_per_fsync_avg,
        st.file_syncs_total,
        st.appended_bytes_total,
        st.written_bytes_total
    );
    drop(w);

    // Read throughput: one shard's log of TXNS * ROWS / SHARDS rows read from the files
    // (memory tail off) and from the memory tail.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, tail) in [("files", 0u64), ("memory_tail", 256 << 20)] {
        let opts = SpillOptions {
            dir: dir.path().join(name),
            memory_tail_bytes: tail,
            ..SpillOptions::default()
        };
        let (mut w, _) = SpillWriter::open(opts, identity()).unwrap();
        let mut load = Workload {
            next_txn: 1,
            rel: Arc::clone(&rel),
        };
        for _ in 0..5 {
            load.run(&mut w);
        }
        let log = w.log();
        let rows_per_shard = 5 * TXNS * ROWS / u64::from(SHARDS);
        let mut g = c.benchmark_group(format!("spill_read_{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(5 * bytes / u64::from(SHARDS)));
        g.bench_function("bytes", |b| {
            b.iter_batched(
                || log.open_reader(ShardId(0), Lsn::ZERO).unwrap(),
                |mut r| {
                    rt.block_on(async {
                        let mut rows = 0;
                        while rows < rows_per_shard {
                            if let ShardEvent::Change(_) = r.next().await.unwrap() {
                                rows += 1;
                            }
                        }
                    })
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
        let s = &log.stats().shards[0];
        println!(
            "spill read ({name}): {} file block reads, {} memory block reads; {rows_per_shard} records per pass",
            s.file_block_reads, s.memory_block_reads
        );
    }

    bench_caught_up(c, &rel, &dir, &rt);
}

/// Caught-up readers: each single-row transaction is handed to the readers as soon as it is
/// appended (the ingest's group commit at the end of each burst seals it into its own block),
/// and its shard's reader takes it from the memory tail at once — the path of every shard
/// when reshard keeps up. Round robin over the shards; in transactions/s.
fn bench_caught_up(
    c: &mut Criterion,
    rel: &Arc<Relation>,
    dir: &tempfile::TempDir,
    rt: &tokio::runtime::Runtime,
) {
    let opts = SpillOptions {
        dir: dir.path().join("caught_up"),
        ..SpillOptions::default()
    };
    let (mut w, _) = SpillWriter::open(opts, identity()).unwrap();
    let log = w.log();
    let mut readers: Vec<_> = (0..SHARDS)
        .map(|s| log.open_reader(ShardId(s), Lsn::ZERO).unwrap())
        .collect();
    let mut k = 0u64;
    let mut g = c.benchmark_group("spill_caught_up_readers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(TXNS));
    // "group_commit_each": every transaction handed on by a group commit (an fsync each, the
    // ingest's old end-of-burst path); "publish_each": handed on by `publish`, with a group
    // commit only when one is due (`flush_interval_ms`), as the ingest does now.
    for (name, publish) in [
        ("single_row_txns_group_commit_each", false),
        ("single_row_txns_publish_each", true),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..TXNS {
                    k += 1;
                    let commit_lsn = Lsn::from_u64(k * 10_000);
                    let shard = ShardId((k % u64::from(SHARDS)) as u16);
                    w.append(
                        shard,
                        &ShardEvent::Begin(Begin {
                            xid: k as u32,
                            commit_lsn,
                            commit_time: k as i64,
                        }),
                    )
                    .unwrap();
                    w.append(
                        shard,
                        &ShardEvent::Change(Change::Insert {
                            rel: Arc::clone(rel),
                            new: row(k),
                        }),
                    )
                    .unwrap();
                    w.append(
                        shard,
                        &ShardEvent::Commit(Commit {
                            xid: k as u32,
                            commit_lsn,
                            end_lsn: commit_lsn.add_bytes(100),
                            commit_time: k as i64,
                        }),
                    )
                    .unwrap();
                    w.end_txn(commit_lsn.add_bytes(100)).unwrap();
                    if !publish || w.flush_due() {
                        w.commit().unwrap();
                    } else {
                        w.publish().unwrap();
                    }
                    let r = &mut readers[shard.index()];
                    rt.block_on(async {
                        let mut got = 0;
                        while got < 3 {
                            match r.next().await.unwrap() {
                                ShardEvent::Heartbeat(_) => {}
                                _ => got += 1,
                            }
                        }
                    });
                    log.applied(shard, commit_lsn);
                }
            })
        });
    }
    g.finish();
    let s = &log.stats().shards[0];
    println!(
        "spill caught-up readers: shard 0: {} memory block reads, {} file block reads",
        s.memory_block_reads, s.file_block_reads
    );
    w.flush().unwrap();
}

criterion_group!(benches, bench_spill);
criterion_main!(benches);
