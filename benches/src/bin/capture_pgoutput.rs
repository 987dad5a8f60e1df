//! Captures real pgoutput streams for the fixtures in `fixtures/pgoutput`.
//!
//! Usage: `cargo run -p reshard-benches --bin capture_pgoutput -- fixtures/pgoutput [name…]`
//!
//! For each `<name>.sql` in the directory (or only the names given), it starts from a fresh
//! database on a throwaway cluster (`logical_decoding_work_mem = 64kB`, so large transactions
//! are streamed), creates publication `pub FOR ALL TABLES` and a two-phase pgoutput slot, runs
//! the script, and reads the slot through the SQL interface
//! (`pg_logical_slot_get_binary_changes`, one pgoutput message per row — no replication
//! protocol needed). It writes `<name>.bin` (frames of u64 BE LSN, u32 BE length, message) and
//! `<name>.golden.jsonl` (the `.bin` decoded, assembled and rendered by `reshard-engine`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use reshard_engine::decode::frame::write_frame;
use reshard_engine::decode::json::render_capture;
use reshard_engine::Lsn;
use reshard_harness::PgCluster;

/// Protocol version used for the fixtures (the highest PostgreSQL 15 speaks).
const PROTO_VERSION: u32 = 3;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .context("usage: capture_pgoutput <fixtures/pgoutput> [name…]")?,
    );
    let only: Vec<String> = args.collect();
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .filter(|p| {
            only.is_empty()
                || p.file_stem()
                    .is_some_and(|s| only.iter().any(|o| s.to_string_lossy() == *o))
        })
        .collect();
    scripts.sort();
    if scripts.is_empty() {
        bail!("no .sql scripts to capture in {}", dir.display());
    }
    let cluster = PgCluster::builder()
        .setting("logical_decoding_work_mem", "64kB")
        .start()
        .context("starting a PostgreSQL cluster")?;
    for script in &scripts {
        let frames = capture(&cluster, script)?;
        let stem = script.with_extension("");
        let bin = stem.with_extension("bin");
        let mut file = Vec::new();
        for (lsn, msg) in &frames {
            write_frame(&mut file, *lsn, msg)?;
        }
        std::fs::write(&bin, &file).with_context(|| format!("writing {}", bin.display()))?;
        let tmp = tempfile::tempdir()?;
        let golden = render_capture(frames.iter().cloned(), PROTO_VERSION, tmp.path())
            .with_context(|| format!("decoding the capture of {}", script.display()))?;
        let golden_path = golden_file(&stem);
        std::fs::write(&golden_path, golden)
            .with_context(|| format!("writing {}", golden_path.display()))?;
        println!(
            "{}: {} messages, {} bytes",
            script.display(),
            frames.len(),
            file.len()
        );
    }
    Ok(())
}

fn golden_file(stem: &Path) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".golden.jsonl");
    PathBuf::from(s)
}

/// Runs one script on a fresh database and returns the slot's messages.
fn capture(cluster: &PgCluster, script: &Path) -> Result<Vec<(Lsn, Bytes)>> {
    let name = script
        .file_stem()
        .context("script without a name")?
        .to_string_lossy()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let db = format!("fx_{name}");
    cluster.create_database(&db)?;
    // The SQL interface decodes only up to the flushed WAL; the harness runs with
    // synchronous_commit = off, so make this database's commits flush.
    cluster.psql(
        "postgres",
        &format!("ALTER DATABASE {db} SET synchronous_commit = on"),
    )?;
    cluster.psql(&db, "CREATE PUBLICATION pub FOR ALL TABLES")?;
    cluster.psql(
        &db,
        "SELECT pg_create_logical_replication_slot('slot', 'pgoutput', false, true)",
    )?;
    cluster
        .psql_file(&db, script)
        .with_context(|| format!("running {}", script.display()))?;
    let out = cluster.psql(
        &db,
        &format!(
            "SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_get_binary_changes('slot', \
             NULL, NULL, 'proto_version', '{PROTO_VERSION}', 'publication_names', 'pub', \
             'messages', 'true', 'streaming', 'on', 'two_phase', 'on')"
        ),
    )?;
    if std::env::var_os("CAPTURE_DEBUG").is_some() {
        eprintln!("{out}");
        eprintln!("{}", cluster.psql(&db, "SELECT slot_name, database, two_phase, confirmed_flush_lsn, pg_current_wal_lsn() FROM pg_replication_slots")?);
        eprintln!(
            "{}",
            cluster.psql(&db, "SELECT count(*) FROM pg_publication_tables")?
        );
    }
    let mut frames = Vec::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let (lsn, hex) = line
            .split_once('|')
            .with_context(|| format!("unexpected psql line {line:?}"))?;
        let lsn: Lsn = lsn.parse().with_context(|| format!("bad LSN {lsn:?}"))?;
        frames.push((lsn, Bytes::from(unhex(hex)?)));
    }
    cluster.psql(&db, "SELECT pg_drop_replication_slot('slot')")?;
    Ok(frames)
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    let digit = |c: u8| -> Result<u8> {
        Ok(match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => bail!("bad hex digit {:?}", c as char),
        })
    };
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        bail!("odd-length hex");
    }
    b.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}
