//! Decoder throughput over the captured pgoutput fixtures (`fixtures/pgoutput/*.bin`).
//!
//! - `decode/pgoutput`: every captured message through the stateful decoder (zero-copy values).
//! - `decode/assemble`: decode + transaction assembly, including spooling and replaying the
//!   streamed and prepared transactions through their spool files on disk.
//!
//! Throughput is in row-level changes (Insert, Update, Delete, Truncate, Message) per second.
//! Run: `cargo bench -p reshard-benches --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::path::Path;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use reshard_engine::decode::frame::split_frames;
use reshard_engine::decode::{AssembleError, Assembler, AssemblerOptions, Decoder};
use reshard_engine::Lsn;

fn fixture_stream() -> Vec<(Lsn, Bytes)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pgoutput");
    let mut bins: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures/pgoutput")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    bins.sort();
    let mut frames = Vec::new();
    for b in bins {
        let data = Bytes::from(std::fs::read(&b).expect("fixture"));
        frames.extend(split_frames(&data).expect("framed fixture"));
    }
    frames
}

fn is_change(msg: &[u8]) -> bool {
    matches!(msg.first(), Some(b'I' | b'U' | b'D' | b'T' | b'M'))
}

fn bench(c: &mut Criterion) {
    let frames = fixture_stream();
    let changes = frames.iter().filter(|(_, m)| is_change(m)).count() as u64;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(changes));
    g.bench_function("pgoutput", |b| {
        b.iter(|| {
            let mut d = Decoder::new(3);
            for (_, m) in &frames {
                black_box(d.decode(m).expect("fixture decodes"));
            }
        })
    });
    let dir = tempfile::tempdir().expect("tempdir");
    g.bench_function("assemble", |b| {
        b.iter(|| {
            let mut asm = Assembler::new(AssemblerOptions {
                stream_dir: dir.path().to_owned(),
                proto_version: 3,
            })
            .expect("assembler");
            let mut n = 0u64;
            for (lsn, m) in &frames {
                asm.push(*lsn, m.clone(), &mut |_, ev| {
                    black_box(ev);
                    n += 1;
                    Ok::<(), AssembleError>(())
                })
                .expect("fixture assembles");
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
