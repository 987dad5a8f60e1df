//! Unit tests of the spill log (temporary directories, no PostgreSQL).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::error::Classify;
use crate::event::{
    Begin, Change, Column, Commit, Relation, ReplicaIdentity, ShardEvent, ShardLog, ShardReader,
    TableId, Value,
};

fn opts(dir: &Path) -> SpillOptions {
    SpillOptions {
        dir: dir.to_path_buf(),
        segment_bytes: 16 << 10,
        max_bytes: 1 << 30,
        block_bytes: 4096,
        zstd_level: 1,
        memory_tail_bytes: 1 << 20,
        flush_interval_ms: 20,
    }
}

fn identity(n: usize) -> SpillIdentity {
    SpillIdentity {
        system_id: "7300000000000000001".into(),
        slot: "reshard".into(),
        shards: (0..n).map(|i| format!("shard{i}")).collect(),
    }
}

fn rel() -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(16384),
        namespace: "public".into(),
        name: "events".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                is_key: true,
            },
            Column {
                name: "payload".into(),
                type_oid: 25,
                type_modifier: -1,
                is_key: false,
            },
        ],
    })
}

fn commit_lsn(k: u64) -> Lsn {
    Lsn::from_u64(k * 1000)
}

fn end_lsn(k: u64) -> Lsn {
    Lsn::from_u64(k * 1000 + 10)
}

/// `len` hex digits that zstd cannot squeeze much (so tests get several segments).
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

/// The events of transaction `k` for one shard: Begin, `rows` inserts, Commit.
fn shard_txn(k: u64, rows: usize, payload: usize) -> Vec<ShardEvent> {
    let rel = rel();
    let mut v = vec![ShardEvent::Begin(Begin {
        xid: k as u32,
        commit_lsn: commit_lsn(k),
        commit_time: k as i64,
    })];
    for r in 0..rows {
        v.push(ShardEvent::Change(Change::Insert {
            rel: Arc::clone(&rel),
            new: vec![
                Value::Text(Bytes::from(format!("{k}-{r}"))),
                Value::Text(Bytes::from(noise(k * 100_003 + r as u64, payload))),
            ],
        }));
    }
    v.push(ShardEvent::Commit(Commit {
        xid: k as u32,
        commit_lsn: commit_lsn(k),
        end_lsn: end_lsn(k),
        commit_time: k as i64,
    }));
    v
}

/// Writes transaction `k` to `shards` and ends it; returns the per-shard events.
fn write_txn(w: &mut SpillWriter, k: u64, shards: &[u16], rows: usize) -> Vec<ShardEvent> {
    let evs = shard_txn(k, rows, 64);
    for s in shards {
        for ev in &evs {
            w.append(ShardId(*s), ev).unwrap();
        }
    }
    w.end_txn(end_lsn(k)).unwrap();
    evs
}

async fn next(r: &mut SpillReader) -> Result<ShardEvent, SpillError> {
    tokio::time::timeout(Duration::from_secs(10), r.next())
        .await
        .expect("reader hung")
}

/// Reads until the reader reports a heartbeat (it is caught up with the durable LSN).
async fn read_until_heartbeat(r: &mut SpillReader) -> (Vec<ShardEvent>, Lsn) {
    let mut out = Vec::new();
    loop {
        match next(r).await.unwrap() {
            ShardEvent::Heartbeat(l) => return (out, l),
            ev => out.push(ev),
        }
    }
}

async fn assert_idle(r: &mut SpillReader) {
    let got = tokio::time::timeout(Duration::from_millis(100), r.next()).await;
    assert!(got.is_err(), "expected no event, got {:?}", got);
}

fn segments(dir: &Path, shard: usize) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(block::shard_dir(dir, shard))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn transactions_round_trip_per_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, rep) = SpillWriter::open(opts(dir.path()), identity(3)).unwrap();
    assert!(rep.created);
    assert_eq!(rep.durable_lsn, Lsn::ZERO);
    let log = w.log();
    let mut expect: Vec<Vec<ShardEvent>> = vec![Vec::new(); 3];
    for k in 1..=200u64 {
        let shards: Vec<u16> = (0..3).filter(|s| (k + *s as u64) % 3 != 0).collect();
        let evs = write_txn(&mut w, k, &shards, (k % 7) as usize * 5);
        for s in &shards {
            expect[*s as usize].extend(evs.iter().cloned());
        }
        if k % 10 == 0 {
            assert_eq!(w.flush().unwrap(), end_lsn(k));
        }
    }
    assert_eq!(w.durable_lsn(), end_lsn(200));
    for s in 0..3u16 {
        let mut r = log.open_reader(ShardId(s), Lsn::ZERO).unwrap();
        let (got, hb) = read_until_heartbeat(&mut r).await;
        assert_eq!(got.len(), expect[s as usize].len(), "shard {s}");
        assert!(got == expect[s as usize], "shard {s} differs");
        assert_eq!(hb, Lsn::from_u64(end_lsn(200).as_u64() - 1));
    }
    let stats = log.stats();
    assert!(stats.segments > 3, "{stats:?}");
    assert_eq!(stats.fsyncs_total, 20);
    assert_eq!(stats.txns_total, 200);
    assert!((stats.txns_per_fsync_avg - 10.0).abs() < 1e-9);
    assert!(
        stats.written_bytes_total < stats.appended_bytes_total / 2,
        "{stats:?}"
    );
}

#[tokio::test]
async fn reader_starts_after_the_given_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
    let mut all = Vec::new();
    for k in 1..=300u64 {
        all.push(write_txn(&mut w, k, &[0], 8));
    }
    w.flush().unwrap();
    assert!(segments(dir.path(), 0).len() > 4);
    let log = w.log();
    for after in [0u64, 1, 57, 150, 299, 300] {
        // `after` as a commit LSN, and an LSN between two commits.
        for lsn in [
            commit_lsn(after),
            Lsn::from_u64(commit_lsn(after).as_u64() + 500),
        ] {
            let mut r = log.open_reader(ShardId(0), lsn).unwrap();
            let want: Vec<ShardEvent> = all[after as usize..].concat();
            let mut got = Vec::new();
            while got.len() < want.len() {
                match next(&mut r).await.unwrap() {
                    ShardEvent::Heartbeat(h) => panic!("heartbeat {h} before the data"),
                    ev => got.push(ev),
                }
            }
            assert!(
                got == want,
                "after {lsn}: {} vs {} events",
                got.len(),
                want.len()
            );
            // Then nothing but possibly a heartbeat.
            match tokio::time::timeout(Duration::from_millis(50), r.next()).await {
                Err(_) | Ok(Ok(ShardEvent::Heartbeat(_))) => {}
                Ok(other) => panic!("after {lsn}: unexpected {other:?}"),
            }
        }
    }
    // Positioning does not read the segments before the start: only frames of the start
    // segment and later are touched (the tail holds the newest frames).
    let before = log.stats().shards[0].file_block_reads;
    let mut r = log.open_reader(ShardId(0), commit_lsn(299)).unwrap();
    let _ = read_until_heartbeat(&mut r).await;
    let reads = log.stats().shards[0].file_block_reads - before;
    assert!(reads <= 8, "{reads} file reads to position near the end");
}

#[tokio::test]
async fn memory_tail_serves_a_caught_up_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    for k in 1..=500u64 {
        let evs = write_txn(&mut w, k, &[0, 1], 4);
        w.flush().unwrap();
        for ev in evs {
            assert_eq!(next(&mut r).await.unwrap(), ev);
        }
    }
    let s = &log.stats().shards[0];
    assert_eq!(s.file_block_reads, 0, "{s:?}");
    assert!(s.memory_block_reads >= 500, "{s:?}");

    // A reader that starts far behind a small tail reads files, then catches up.
    drop(w);
    let dir2 = tempfile::tempdir().unwrap();
    let mut o = opts(dir2.path());
    o.memory_tail_bytes = 16 << 10;
    let (mut w, _) = SpillWriter::open(o, identity(1)).unwrap();
    let mut want = Vec::new();
    for k in 1..=300u64 {
        want.extend(write_txn(&mut w, k, &[0], 4));
    }
    w.flush().unwrap();
    let log = w.log();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == want);
    let s = &log.stats().shards[0];
    assert!(s.file_block_reads > 0 && s.memory_block_reads > 0, "{s:?}");
}

/// Files of one shard: (stored frames, zstd frames).
fn frame_kinds(dir: &Path, shard: usize) -> (usize, usize) {
    let (mut stored, mut zstd) = (0, 0);
    for p in segments(dir, shard) {
        let f = std::fs::File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        let mut off = 0;
        while off < len {
            let fr = block::read_frame(&f, off, len).unwrap();
            if fr.header.stored {
                stored += 1;
            } else {
                zstd += 1;
            }
            off += fr.header.frame_len();
        }
    }
    (stored, zstd)
}

#[tokio::test]
async fn blocks_a_caught_up_reader_takes_from_memory_are_not_compressed() {
    // See: issue #14 (zstd compressed every block, though caught-up shards read the memory tail).
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.memory_tail_bytes = 64 << 10; // 32 KiB per shard: a reader 16 KiB behind reads files
    let (mut w, _) = SpillWriter::open(o.clone(), identity(2)).unwrap();
    let log = w.log();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let mut want = [Vec::new(), Vec::new()];
    // Shard 0 is read as it is written; shard 1 is never read.
    for k in 1..=200u64 {
        let evs = write_txn(&mut w, k, &[0, 1], 3);
        w.flush().unwrap();
        for ev in &evs {
            assert_eq!(&next(&mut r).await.unwrap(), ev);
        }
        want[0].extend(evs.iter().cloned());
        want[1].extend(evs);
    }
    let (stored0, zstd0) = frame_kinds(dir.path(), 0);
    let (stored1, zstd1) = frame_kinds(dir.path(), 1);
    // The first block was written before the reader had looked for one.
    assert!(
        stored0 >= 199 && zstd0 <= 1,
        "shard 0: {stored0} stored, {zstd0} zstd"
    );
    assert_eq!(stored1, 0, "shard 1 has no reader: every block compressed");
    assert!(zstd1 >= 200);
    let st = log.stats();
    assert_eq!(st.blocks_total, (stored0 + zstd0 + stored1 + zstd1) as u64);
    assert_eq!(st.stored_blocks_total, stored0 as u64);
    assert_eq!(st.shards[0].file_block_reads, 0);

    // Shard 0 falls behind by more than half its tail: its new blocks are compressed again.
    let before = frame_kinds(dir.path(), 0);
    for k in 201..=400u64 {
        want[0].extend(write_txn(&mut w, k, &[0], 3));
        w.flush().unwrap();
    }
    let after = frame_kinds(dir.path(), 0);
    assert!(after.1 - before.1 >= 100, "{before:?} -> {after:?}");
    drop(w);

    // After a restart (which checks every frame of the last segments) both kinds read back.
    let (w, rep) = SpillWriter::open(o, identity(2)).unwrap();
    assert_eq!(rep.durable_lsn, end_lsn(400));
    let log = w.log();
    for s in 0..2u16 {
        let mut r = log.open_reader(ShardId(s), Lsn::ZERO).unwrap();
        let (got, _) = read_until_heartbeat(&mut r).await;
        assert!(got == want[s as usize], "shard {s}");
    }
}

#[tokio::test]
async fn shards_read_at_their_own_pace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let mut fast = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let mut slow = log.open_reader(ShardId(1), Lsn::ZERO).unwrap();
    let mut slow_want = Vec::new();
    for k in 1..=200u64 {
        let evs = write_txn(&mut w, k, &[0, 1], 6);
        w.flush().unwrap();
        for ev in &evs {
            assert_eq!(&next(&mut fast).await.unwrap(), ev);
        }
        slow_want.extend(evs);
        // The slow shard reads one event every other transaction.
        if k % 2 == 0 {
            assert_eq!(next(&mut slow).await.unwrap(), slow_want.remove(0));
        }
    }
    let (rest, _) = read_until_heartbeat(&mut slow).await;
    assert!(rest == slow_want);
}

#[tokio::test]
async fn idle_shard_gets_heartbeats_after_durable_moves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let mut idle = log.open_reader(ShardId(1), Lsn::ZERO).unwrap();
    assert_idle(&mut idle).await;
    write_txn(&mut w, 1, &[0], 2);
    // Written but not durable: no heartbeat yet.
    assert_idle(&mut idle).await;
    w.flush().unwrap();
    assert_eq!(
        next(&mut idle).await.unwrap(),
        ShardEvent::Heartbeat(Lsn::from_u64(end_lsn(1).as_u64() - 1))
    );
    assert_idle(&mut idle).await;
    // A transaction that touches no shard still moves the durable LSN.
    w.end_txn(end_lsn(2)).unwrap();
    w.flush().unwrap();
    assert_eq!(
        next(&mut idle).await.unwrap(),
        ShardEvent::Heartbeat(Lsn::from_u64(end_lsn(2).as_u64() - 1))
    );
    // The heartbeat never claims a transaction that may still come: the next one can have
    // commit LSN == durable LSN, and a reader opened after the heartbeat still sees it.
    let hb = Lsn::from_u64(end_lsn(2).as_u64() - 1);
    let evs = shard_txn(3, 1, 8);
    let mut evs3 = evs.clone();
    if let ShardEvent::Begin(b) = &mut evs3[0] {
        b.commit_lsn = end_lsn(2);
    }
    if let Some(ShardEvent::Commit(c)) = evs3.last_mut() {
        c.commit_lsn = end_lsn(2);
    }
    for ev in &evs3 {
        w.append(ShardId(1), ev).unwrap();
    }
    w.end_txn(end_lsn(3)).unwrap();
    w.flush().unwrap();
    let mut r = log.open_reader(ShardId(1), hb).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == evs3);
}

#[tokio::test]
async fn restart_cuts_back_to_the_durable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = Vec::new();
    {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
        for k in 1..=50u64 {
            want.extend(write_txn(&mut w, k, &[0, 1], 5));
        }
        w.flush().unwrap();
        // Complete but never group-committed, including sealed frames: lost at restart.
        for k in 51..=80u64 {
            write_txn(&mut w, k, &[0, 1], 5);
        }
        // Like kill -9: no flush, no clean shutdown.
    }
    let (mut w, rep) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    assert!(!rep.created);
    assert_eq!(rep.durable_lsn, end_lsn(50));
    assert!(rep.shards[0].discarded_bytes > 0, "{rep:?}");
    let log = w.log();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == want);
    // The source re-sends from the durable LSN; the log continues seamlessly.
    let mut resent = Vec::new();
    for k in 51..=60u64 {
        resent.extend(write_txn(&mut w, k, &[0, 1], 5));
    }
    w.flush().unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == resent);
    want.extend(resent);
    let mut r = log.open_reader(ShardId(1), Lsn::ZERO).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == want);
}

#[tokio::test]
async fn torn_tail_is_cut_at_every_byte_of_the_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = Vec::new();
    let (seg, durable_len) = {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
        for k in 1..=10u64 {
            want.extend(write_txn(&mut w, k, &[0], 3));
        }
        w.flush().unwrap();
        let seg = segments(dir.path(), 0).pop().unwrap();
        let durable_len = std::fs::metadata(&seg).unwrap().len();
        // Transaction 11 is big enough to seal a frame (small once compressed, so the loop
        // below stays short), but is never group-committed.
        let rel = rel();
        let mut evs = shard_txn(11, 0, 0);
        let commit = evs.pop().unwrap();
        for r in 0..200 {
            evs.push(ShardEvent::Change(Change::Insert {
                rel: Arc::clone(&rel),
                new: vec![Value::Text(Bytes::from(format!(
                    "row {r} {}",
                    "y".repeat(40)
                )))],
            }));
        }
        evs.push(commit);
        for ev in &evs {
            w.append(ShardId(0), ev).unwrap();
        }
        w.end_txn(end_lsn(11)).unwrap();
        (seg, durable_len)
    };
    let full = std::fs::read(&seg).unwrap();
    assert!(
        full.len() as u64 > durable_len,
        "a frame was written after the checkpoint"
    );
    let last_frame_start = {
        // Find the start of the last frame after the durable end.
        let f = std::fs::File::open(&seg).unwrap();
        let mut off = durable_len;
        let mut last = off;
        while off < full.len() as u64 {
            last = off;
            off += block::read_header(&f, off, full.len() as u64)
                .map(|h| h.header)
                .unwrap()
                .frame_len();
        }
        last
    };
    for cut in last_frame_start..=full.len() as u64 {
        std::fs::write(&seg, &full[..cut as usize]).unwrap();
        let (w, rep) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
        assert_eq!(rep.durable_lsn, end_lsn(10), "cut at {cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), durable_len);
        let mut r = w.log().open_reader(ShardId(0), Lsn::ZERO).unwrap();
        let (got, _) = read_until_heartbeat(&mut r).await;
        assert!(got == want, "cut at {cut}");
    }
    // A log shorter than its durable checkpoint is lost data, not a torn tail.
    std::fs::write(&seg, &full[..durable_len as usize - 1]).unwrap();
    let err = SpillWriter::open(opts(dir.path()), identity(1))
        .err()
        .unwrap();
    assert!(matches!(err, SpillError::DurableDataLost { .. }), "{err}");
    assert!(err.to_string().contains(&seg.display().to_string()));
}

#[tokio::test]
async fn corruption_in_the_middle_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
        for k in 1..=200u64 {
            write_txn(&mut w, k, &[0], 4);
        }
        w.flush().unwrap();
    }
    let segs = segments(dir.path(), 0);
    assert!(segs.len() >= 3);
    // A flipped byte inside the first frame of an older segment: found by the reader.
    let mut data = std::fs::read(&segs[0]).unwrap();
    let pristine = data.clone();
    data[50] ^= 0x55;
    std::fs::write(&segs[0], &data).unwrap();
    let (w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
    let mut r = w.log().open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let err = next(&mut r).await.unwrap_err();
    match &err {
        SpillError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &segs[0]);
            assert_eq!(*offset, 0);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(err.class(), crate::error::ErrorClass::Definite);
    drop(w);
    std::fs::write(&segs[0], &pristine).unwrap();

    // A flipped byte in the middle of the last segment: found at open.
    let last = segs.last().unwrap();
    let mut data = std::fs::read(last).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(last, &data).unwrap();
    let err = SpillWriter::open(opts(dir.path()), identity(1))
        .err()
        .unwrap();
    assert!(
        matches!(&err, SpillError::Corrupt { path, .. } if path == last),
        "{err}"
    );
    let mut fixed = data;
    fixed[mid] ^= 0x55;
    std::fs::write(last, &fixed).unwrap();

    // A missing segment between two others.
    std::fs::remove_file(&segs[1]).unwrap();
    let err = SpillWriter::open(opts(dir.path()), identity(1))
        .err()
        .unwrap();
    assert!(matches!(err, SpillError::MissingSegment { .. }), "{err}");
}

#[tokio::test]
async fn a_shard_log_emptied_by_hand_is_an_error_not_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
        for k in 1..=50u64 {
            write_txn(&mut w, k, &[0, 1], 4);
        }
        w.flush().unwrap();
    }
    for seg in segments(dir.path(), 1) {
        std::fs::remove_file(seg).unwrap();
    }
    let err = SpillWriter::open(opts(dir.path()), identity(2))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            SpillError::NewestSegmentMissing {
                shard: ShardId(1),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.class(), crate::error::ErrorClass::Definite);
    // The whole shard directory gone is the same.
    std::fs::remove_dir_all(dir.path().join("shard-0001")).unwrap();
    let err = SpillWriter::open(opts(dir.path()), identity(2))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            SpillError::NewestSegmentMissing {
                shard: ShardId(1),
                ..
            }
        ),
        "{err}"
    );
}

// See: explore-findings "Not fixed" (spill segments deleted from the front of a shard's log).
/// Files removed by hand from the FRONT of a lagging shard's log, newer segments kept, are a
/// refusal naming the shard, directory and LSN range, both behind retention (shard 0) and on a
/// log retention never touched (shard 1); they are not taken for retention.
#[tokio::test]
async fn front_segments_removed_by_hand_are_refused_not_taken_for_retention() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
        for k in 1..=300u64 {
            write_txn(&mut w, k, &[0, 1], 4);
        }
        w.flush().unwrap();
        w.log().applied(ShardId(0), commit_lsn(100));
        w.flush().unwrap();
    }
    let before0 = segments(dir.path(), 0);
    let before1 = segments(dir.path(), 1);
    assert!(before0.len() >= 3 && before1.len() > before0.len());
    let held = dir.path().join("held");
    std::fs::create_dir(&held).unwrap();
    for shard in [0usize, 1] {
        let oldest = segments(dir.path(), shard)[0].clone();
        let kept = held.join(oldest.file_name().unwrap());
        std::fs::rename(&oldest, &kept).unwrap();
        let err = SpillWriter::open(opts(dir.path()), identity(2))
            .err()
            .unwrap();
        match &err {
            SpillError::FrontSegmentsMissing {
                shard: s,
                dir: d,
                after,
                before,
                ..
            } => {
                assert_eq!(*s, ShardId(shard as u16));
                assert_eq!(*d, block::shard_dir(dir.path(), shard));
                assert!(after < before, "{err}");
                if shard == 0 {
                    assert!(*after > Lsn::ZERO && *after <= commit_lsn(100), "{err}");
                } else {
                    assert_eq!(*after, Lsn::ZERO, "{err}");
                }
            }
            other => panic!("expected FrontSegmentsMissing, got {other}"),
        }
        assert_eq!(err.class(), crate::error::ErrorClass::Definite);
        let msg = err.to_string();
        assert!(msg.contains("Restore the files"), "{msg}");
        std::fs::rename(&kept, &oldest).unwrap();
    }
    // Restored: the log opens with every segment.
    let (_w, rep) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    assert_eq!(rep.shards[0].segments, before0.len());
    assert_eq!(rep.shards[1].segments, before1.len());
}

/// Retention records what it releases before deleting: a crash between the record and the
/// deletions leaves released segments behind, which the next open deletes (not a refusal).
/// A directory without records (written by an older reshard) opens as before and gets them.
#[tokio::test]
async fn released_segments_left_behind_are_deleted_and_old_directories_get_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let spill = dir.path().join("spill");
    {
        let (mut w, _) = SpillWriter::open(opts(&spill), identity(1)).unwrap();
        for k in 1..=300u64 {
            write_txn(&mut w, k, &[0], 4);
        }
        w.flush().unwrap();
        let before = segments(&spill, 0);
        for p in &before {
            std::fs::copy(p, copies.join(p.file_name().unwrap())).unwrap();
        }
        w.log().applied(ShardId(0), commit_lsn(150));
        let after = segments(&spill, 0);
        assert!(after.len() < before.len());
        // The crash: the released files are back, as if their deletion never happened.
        for p in &before {
            if !p.exists() {
                std::fs::copy(copies.join(p.file_name().unwrap()), p).unwrap();
            }
        }
        w.flush().unwrap();
    }
    let kept_by_retention = {
        let (w, rep) = SpillWriter::open(opts(&spill), identity(1)).unwrap();
        let n = segments(&spill, 0).len();
        assert_eq!(rep.shards[0].segments, n);
        drop(w);
        n
    };
    assert!(kept_by_retention < std::fs::read_dir(&copies).unwrap().count());

    // An older reshard's directory: no record. Its front cannot be checked at this open …
    std::fs::remove_file(block::shard_dir(&spill, 0).join("retained")).unwrap();
    std::fs::remove_file(&segments(&spill, 0)[0]).unwrap();
    let (w, rep) = SpillWriter::open(opts(&spill), identity(1)).unwrap();
    assert_eq!(rep.shards[0].segments, kept_by_retention - 1);
    drop(w);
    // … but from then on it is.
    std::fs::remove_file(&segments(&spill, 0)[0]).unwrap();
    let err = SpillWriter::open(opts(&spill), identity(1)).err().unwrap();
    assert!(
        matches!(
            err,
            SpillError::FrontSegmentsMissing {
                shard: ShardId(0),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn retention_deletes_only_fully_applied_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let mut want = Vec::new();
    for k in 1..=300u64 {
        want.push(write_txn(&mut w, k, &[0, 1], 4));
    }
    w.flush().unwrap();
    let log = w.log();
    let before0 = segments(dir.path(), 0);
    let before1 = segments(dir.path(), 1);
    assert!(before0.len() >= 4);
    let bytes_before = log.stats().bytes_on_disk;

    // Applied up to transaction 150: exactly the segments whose every record is <= 150 go.
    log.applied(ShardId(0), commit_lsn(150));
    let after0 = segments(dir.path(), 0);
    assert!(after0.len() < before0.len());
    assert_eq!(
        segments(dir.path(), 1),
        before1,
        "other shards keep their logs"
    );
    assert!(log.stats().bytes_on_disk < bytes_before);
    // The first remaining segment still holds transaction 151 …
    let mut r = log.open_reader(ShardId(0), commit_lsn(150)).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == want[150..].concat());
    // … and every deleted one held only transactions <= 150.
    let first_kept = block::parse_segment_name(after0[0].file_name().unwrap().to_str().unwrap())
        .unwrap()
        .0;
    assert!(first_kept <= commit_lsn(151));
    let deleted_through = log.stats().shards[0].deleted_through;
    assert!(deleted_through <= commit_lsn(150) && deleted_through > Lsn::ZERO);
    // Asking for deleted data is an error, not a silent gap.
    let err = log.open_reader(ShardId(0), Lsn::ZERO).err().unwrap();
    assert!(matches!(err, SpillError::Discarded { .. }), "{err}");

    // Everything applied: all but the newest segment go; the newest is never deleted.
    log.applied(ShardId(0), commit_lsn(300));
    assert_eq!(segments(dir.path(), 0).len(), 1);
    // Retention survives a restart (the checkpoint records what was deleted).
    w.flush().unwrap();
    drop(w);
    let (_w, rep) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    assert!(rep.shards[0].deleted_through >= deleted_through);
    assert_eq!(rep.shards[0].segments, 1);
    assert_eq!(rep.shards[1].segments, before1.len());
}

#[tokio::test]
async fn cap_blocks_the_writer_and_releases_when_shards_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.max_bytes = 64 << 10;
    let (mut w, _) = SpillWriter::open(o, identity(1)).unwrap();
    let log = w.log();
    let mut k = 0;
    while !w.over_cap(0) {
        k += 1;
        write_txn(&mut w, k, &[0], 8);
        w.flush().unwrap();
        assert!(k < 10_000, "cap never reached");
    }
    assert!(log.backpressure_active());
    assert!(log.stats().backpressure_active);
    // Blocked while nothing is applied.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), w.wait_for_space())
            .await
            .is_err()
    );
    // Applying releases it.
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move { log.wait_for_space().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.applied(ShardId(0), commit_lsn(k));
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("wait_for_space did not wake up")
        .unwrap();
    assert!(!w.over_cap(0));
    assert!(!log.backpressure_active());
}

#[tokio::test]
async fn abort_incomplete_cuts_back_and_fails_readers_that_passed_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let first = write_txn(&mut w, 1, &[0, 1], 3);
    w.flush().unwrap();
    let bytes = log.stats().bytes_on_disk;
    let seg_count = segments(dir.path(), 0).len();

    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let mut quiet = log.open_reader(ShardId(1), Lsn::ZERO).unwrap();
    for ev in &first {
        assert_eq!(&next(&mut r).await.unwrap(), ev);
    }
    // Transaction 2 streams into shard 0 (sealing frames) when the source drops.
    let big = shard_txn(2, 1500, 64);
    for ev in &big[..big.len() - 1] {
        w.append(ShardId(0), ev).unwrap();
    }
    assert!(
        log.stats().bytes_on_disk > bytes,
        "frames of txn 2 were written"
    );
    assert!(
        segments(dir.path(), 0).len() > seg_count,
        "txn 2 spilled into new segments"
    );
    assert_eq!(
        next(&mut r).await.unwrap(),
        big[0],
        "the reader sees the streamed Begin"
    );
    w.abort_incomplete().unwrap();
    let err = next(&mut r).await.unwrap_err();
    assert!(matches!(err, SpillError::CutBack { .. }), "{err}");
    assert_eq!(err.class(), crate::error::ErrorClass::Transient);
    assert_eq!(log.stats().bytes_on_disk, bytes);
    assert_eq!(segments(dir.path(), 0).len(), seg_count);
    // Shard 1 never saw anything past the cut: unaffected.
    let (got, _) = read_until_heartbeat(&mut quiet).await;
    assert!(got == first);

    // The source re-sends transaction 2; a reopened reader sees it exactly once.
    for ev in &big {
        w.append(ShardId(0), ev).unwrap();
    }
    w.end_txn(end_lsn(2)).unwrap();
    w.flush().unwrap();
    let mut r = log.open_reader(ShardId(0), commit_lsn(1)).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == big);
    drop(w);
    // And it is what survives a restart.
    let (w, rep) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    assert_eq!(rep.durable_lsn, end_lsn(2));
    let mut r = w.log().open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let (got, _) = read_until_heartbeat(&mut r).await;
    assert!(got == [first, big].concat());
}

#[tokio::test]
async fn a_transaction_spanning_segments_is_read_and_retained_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
    let t1 = write_txn(&mut w, 1, &[0], 2);
    let t2 = write_txn(&mut w, 2, &[0], 1500);
    let t3 = write_txn(&mut w, 3, &[0], 2);
    w.flush().unwrap();
    let log = w.log();
    let names: Vec<_> = segments(dir.path(), 0)
        .iter()
        .map(|p| block::parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap())
        .collect();
    let spanning = names.iter().filter(|(l, _)| *l == commit_lsn(2)).count();
    assert!(spanning >= 2, "txn 2 starts several segments: {names:?}");

    let read_after = |after: Lsn| {
        let log = log.clone();
        async move {
            let mut r = log.open_reader(ShardId(0), after).unwrap();
            read_until_heartbeat(&mut r).await.0
        }
    };
    assert!(read_after(Lsn::ZERO).await == [t1.clone(), t2.clone(), t3.clone()].concat());
    assert!(read_after(commit_lsn(1)).await == [t2.clone(), t3.clone()].concat());
    assert!(read_after(commit_lsn(2)).await == t3);
    // Applied through txn 1: no segment holding part of txn 2 may go.
    log.applied(ShardId(0), commit_lsn(1));
    assert!(read_after(commit_lsn(1)).await == [t2.clone(), t3.clone()].concat());
    // Applied through txn 2: its segments go, txn 3 stays readable.
    let before = segments(dir.path(), 0).len();
    log.applied(ShardId(0), commit_lsn(2));
    assert!(segments(dir.path(), 0).len() < before);
    assert!(read_after(commit_lsn(2)).await == t3);
}

#[test]
fn identity_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(SpillWriter::open(opts(dir.path()), identity(2)).unwrap());
    let mut other = identity(2);
    other.slot = "other_slot".into();
    let err = SpillWriter::open(opts(dir.path()), other).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("belongs to source 7300000000000000001 slot reshard, not 7300000000000000001/other_slot"),
        "{msg}"
    );
    assert!(msg.contains("point [spill] dir elsewhere"));
    let err = SpillWriter::open(opts(dir.path()), identity(3))
        .err()
        .unwrap();
    assert!(matches!(err, SpillError::ShardsMismatch { .. }), "{err}");
}

#[test]
fn protocol_misuse_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(1)).unwrap();
    let evs = shard_txn(5, 1, 8);
    assert!(
        w.append(ShardId(0), &evs[1]).is_err(),
        "change before Begin"
    );
    assert!(w.append(ShardId(3), &evs[0]).is_err(), "unknown shard");
    assert!(w
        .append(ShardId(0), &ShardEvent::Heartbeat(Lsn::ZERO))
        .is_err());
    w.append(ShardId(0), &evs[0]).unwrap();
    assert!(w.end_txn(end_lsn(5)).is_err(), "end_txn before Commit");
    w.append(ShardId(0), &evs[1]).unwrap();
    w.append(ShardId(0), &evs[2]).unwrap();
    w.end_txn(end_lsn(5)).unwrap();
    // An older transaction after a newer one.
    assert!(w.append(ShardId(0), &shard_txn(4, 0, 0)[0]).is_err());
    assert!(w.end_txn(end_lsn(5)).is_err());
}

fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_200_mb_transaction_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.block_bytes = DEFAULT_BLOCK_BYTES;
    o.segment_bytes = SpillOptions::default().segment_bytes;
    o.max_bytes = SpillOptions::default().max_bytes;
    o.memory_tail_bytes = 8 << 20;
    let (mut w, _) = SpillWriter::open(o, identity(1)).unwrap();
    let log = w.log();
    // Reset the peak-RSS counter so the measurement starts now (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_kib("VmRSS:");
    let rel = rel();
    let filler = "x".repeat(1000);
    let total: u64 = 200 << 20;
    let mut written = 0u64;
    let mut rows = 0u64;
    w.append(
        ShardId(0),
        &ShardEvent::Begin(Begin {
            xid: 1,
            commit_lsn: commit_lsn(1),
            commit_time: 0,
        }),
    )
    .unwrap();
    while written < total {
        let ev = ShardEvent::Change(Change::Insert {
            rel: Arc::clone(&rel),
            new: vec![
                Value::Text(Bytes::from(rows.to_string())),
                Value::Text(Bytes::from(filler.clone())),
            ],
        });
        w.append(ShardId(0), &ev).unwrap();
        written += 1000;
        rows += 1;
    }
    w.append(
        ShardId(0),
        &ShardEvent::Commit(Commit {
            xid: 1,
            commit_lsn: commit_lsn(1),
            end_lsn: end_lsn(1),
            commit_time: 0,
        }),
    )
    .unwrap();
    w.end_txn(end_lsn(1)).unwrap();
    w.flush().unwrap();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let mut seen = 0u64;
    loop {
        match next(&mut r).await.unwrap() {
            ShardEvent::Change(Change::Insert { new, .. }) => {
                assert_eq!(new[0], Value::Text(Bytes::from(seen.to_string())));
                seen += 1;
            }
            ShardEvent::Commit(_) => break,
            ShardEvent::Begin(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, rows);
    let peak = proc_status_kib("VmHWM:");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    let stats = log.stats();
    eprintln!(
        "200 MB transaction: {rows} rows, {} bytes on disk, peak RSS growth {growth_mib} MiB",
        stats.bytes_on_disk
    );
    assert!(growth_mib < 64, "peak RSS grew by {growth_mib} MiB");
    assert!(stats.bytes_on_disk < 50 << 20);
}

#[test]
fn options_come_from_the_config_and_validate_with_the_key_named() {
    let c = crate::config::SpillConfig {
        dir: PathBuf::from("/var/lib/reshard"),
        max_bytes: 1 << 30,
        ..Default::default()
    };
    let o = SpillOptions::from(&c);
    assert_eq!(o.dir, PathBuf::from("/var/lib/reshard"));
    assert_eq!(o.max_bytes, 1 << 30);
    assert_eq!(o.segment_bytes, SpillOptions::default().segment_bytes);
    o.validate().unwrap();
    SpillOptions::default().validate().unwrap();
    let bad = SpillOptions {
        zstd_level: 30,
        ..SpillOptions::default()
    };
    let err = bad.validate().unwrap_err();
    assert!(err.to_string().contains("[spill] zstd_level"), "{err}");
    let bad = SpillOptions {
        max_bytes: SpillOptions::default().segment_bytes,
        ..SpillOptions::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("[spill] max_bytes"));
    // The cap must leave room for every shard's newest segment (never deleted).
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.max_bytes = 4 * o.segment_bytes;
    let err = SpillWriter::open(o.clone(), identity(4)).err().unwrap();
    assert!(err.to_string().contains("[spill] max_bytes"), "{err}");
    SpillWriter::open(o, identity(3)).unwrap();
}

fn shards_of(k: u64) -> Vec<u16> {
    (0..3).filter(|s| (k + *s as u64) % 3 != 0).collect()
}

/// Writer on a blocking thread with group commit, three readers at different paces applying
/// as they go (so retention deletes segments under them). Regression: a reader that had just
/// finished a segment retention then deleted used to fail with `Discarded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_and_readers_agree() {
    const TXNS: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.memory_tail_bytes = 48 << 10; // small: slow readers fall back to the files
    o.flush_interval_ms = 2;
    let (mut w, _) = SpillWriter::open(o, identity(3)).unwrap();
    let log = w.log();
    let mut readers = Vec::new();
    for s in 0..3u16 {
        let log = log.clone();
        readers.push(tokio::spawn(async move {
            let mut r = log.open_reader(ShardId(s), Lsn::ZERO).unwrap();
            let mut n = 0usize;
            for k in 1..=TXNS {
                if !shards_of(k).contains(&s) {
                    continue;
                }
                for want in shard_txn(k, (k % 5) as usize, 64) {
                    let got = loop {
                        match r.next().await.unwrap() {
                            ShardEvent::Heartbeat(_) => continue,
                            ev => break ev,
                        }
                    };
                    assert_eq!(got, want, "shard {s} txn {k}");
                    n += 1;
                    // Shard 2 is slow.
                    if s == 2 && n % 50 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                log.applied(ShardId(s), commit_lsn(k));
            }
        }));
    }
    let writer = tokio::task::spawn_blocking(move || {
        for k in 1..=TXNS {
            let evs = shard_txn(k, (k % 5) as usize, 64);
            for s in shards_of(k) {
                for ev in &evs {
                    w.append(ShardId(s), ev).unwrap();
                }
            }
            w.end_txn(end_lsn(k)).unwrap();
            if w.flush_due() {
                w.flush().unwrap();
            }
        }
        w.flush().unwrap();
        w
    });
    let w = writer.await.unwrap();
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("reader hung")
            .unwrap();
    }
    let st = w.stats();
    eprintln!(
        "group commit: {} txns in {} fsyncs ({:.1} per fsync); shard 2 file reads {}",
        st.txns_total, st.fsyncs_total, st.txns_per_fsync_avg, st.shards[2].file_block_reads
    );
    assert_eq!(st.txns_total, TXNS);
    assert!(st.fsyncs_total < TXNS, "group commit shares fsyncs");
}

/// See: the end of a burst hands transactions to the readers (`publish`) without a group
/// commit: no fsync, the durable LSN unchanged, and a frame per publish, not per transaction.
#[tokio::test]
async fn publish_hands_transactions_to_readers_without_a_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let mut r = log.open_reader(ShardId(0), Lsn::ZERO).unwrap();
    let mut want = Vec::new();
    for k in 1..=3u64 {
        want.extend(write_txn(&mut w, k, &[0, 1], 2));
    }
    // Appended, not handed on yet.
    assert_idle(&mut r).await;
    assert!(w.has_unpublished());
    w.publish().unwrap();
    assert!(!w.has_unpublished());
    for ev in want {
        assert_eq!(next(&mut r).await.unwrap(), ev);
    }
    let st = log.stats();
    assert_eq!((st.fsyncs_total, st.blocks_total), (0, 2), "{st:?}");
    assert_eq!(
        w.durable_lsn(),
        Lsn::ZERO,
        "nothing is durable before a group commit"
    );
    // The group commit that follows syncs what was published.
    assert_eq!(w.flush().unwrap(), end_lsn(3));
    assert_eq!(log.stats().fsyncs_total, 1);
}

#[tokio::test]
async fn commit_does_not_wait_for_the_disk_and_publishes_the_durable_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    let log = w.log();
    let mut durable = log.durable_watch();
    write_txn(&mut w, 1, &[0, 1], 3);
    assert!(w.commit().unwrap(), "a group commit starts");
    // Appends go on while the syncer works.
    write_txn(&mut w, 2, &[0], 3);
    tokio::time::timeout(
        Duration::from_secs(10),
        durable.wait_for(|l| *l >= end_lsn(1)),
    )
    .await
    .expect("durable LSN never published")
    .unwrap();
    assert!(w.durable_lsn() >= end_lsn(1));
    assert_eq!(w.flush().unwrap(), end_lsn(2));
    assert_eq!(*durable.borrow(), end_lsn(2));
    // Nothing new: no group commit.
    assert!(!w.commit().unwrap());
    let st = log.stats();
    assert_eq!((st.fsyncs_total, st.txns_total), (2, 2));
}

#[tokio::test]
async fn torn_checkpoint_falls_back_and_cuts_the_logs_to_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = Vec::new();
    let cp_len_after_first = {
        let (mut w, _) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
        for k in 1..=10u64 {
            want.extend(write_txn(&mut w, k, &[0, 1], 4));
        }
        w.flush().unwrap();
        let len = std::fs::metadata(dir.path().join("checkpoint"))
            .unwrap()
            .len();
        for k in 11..=20u64 {
            write_txn(&mut w, k, &[0, 1], 4);
        }
        w.flush().unwrap();
        len
    };
    // The second checkpoint record is torn (crash while writing it): its group is not durable.
    let cp = std::fs::read(dir.path().join("checkpoint")).unwrap();
    std::fs::write(
        dir.path().join("checkpoint"),
        &cp[..cp_len_after_first as usize + 5],
    )
    .unwrap();
    let (w, rep) = SpillWriter::open(opts(dir.path()), identity(2)).unwrap();
    assert_eq!(rep.durable_lsn, end_lsn(10));
    for s in 0..2u16 {
        assert!(rep.shards[s as usize].discarded_bytes > 0);
        let mut r = w.log().open_reader(ShardId(s), Lsn::ZERO).unwrap();
        let (got, _) = read_until_heartbeat(&mut r).await;
        assert!(got == want, "shard {s}");
    }
}

// See: issue #11 item 13 (spill segments hold full row images).
#[test]
fn the_spill_directory_is_0700_and_its_files_0600() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("spill");
    let (mut w, _) = SpillWriter::open(opts(&dir), identity(2)).unwrap();
    for k in 1..=40u64 {
        write_txn(&mut w, k, &[0, 1], 20);
    }
    w.flush().unwrap();
    drop(w);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut seen = 0;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        assert_eq!(mode(&d), 0o700, "directory {}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert_eq!(mode(&p), 0o600, "file {}", p.display());
                seen += 1;
            }
        }
    }
    assert!(!segments(&dir, 1).is_empty());
    assert!(seen >= 5, "only {seen} files checked");
}
