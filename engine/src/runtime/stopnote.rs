//! Why a shard stopped, kept where `reshard status` finds it with the daemon down.
//!
//! In: a shard stopped by a definite error (the supervisor's `shard stopped`), or a shard
//! started again. Out: `stopped.json` in `[spill] dir`, `{"<shard>": "<error>"}`, replaced
//! atomically. The daemon ends when every shard stopped; without this note the offline status
//! showed `stopped` and `-` and the cause was only in the daemon's log. A shard started again
//! (daemon start, SIGHUP, `RESUME`) loses its note: it applies again, or stops with a new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name of the note in `[spill] dir`.
const NAME: &str = "stopped.json";

fn path(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

/// The notes in `dir`, shard → error; empty when there is none (or it cannot be read: the
/// status then shows what it shows without it).
pub fn read(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write(dir: &Path, notes: &BTreeMap<String, String>) {
    let result = if notes.is_empty() {
        match std::fs::remove_file(path(dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
            _ => Ok(()),
        }
    } else {
        serde_json::to_vec_pretty(notes)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                crate::localfs::replace_file(&path(dir), &dir.join("stopped.json.tmp"), &bytes)
                    .map(drop)
                    .map_err(|e| format!("could not {} {}: {}", e.op, e.path.display(), e.source))
            })
    };
    if let Err(e) = result {
        // The note only helps the offline status; the daemon's log has the error anyway.
        tracing::warn!(dir = %dir.display(), error = %e, "could not record why shards stopped for `reshard status`");
    }
}

/// Records that `shard` stopped with `error`.
pub fn record(dir: &Path, shard: &str, error: &str) {
    let mut notes = read(dir);
    notes.insert(shard.to_owned(), error.to_owned());
    write(dir, &notes);
}

/// Removes `shard`'s note (it is started again); `None` removes every note (the daemon starts
/// every shard).
pub fn clear(dir: &Path, shard: Option<&str>) {
    let mut notes = read(dir);
    let before = notes.len();
    match shard {
        Some(s) => {
            notes.remove(s);
        }
        None => notes.clear(),
    }
    if notes.len() != before {
        write(dir, &notes);
    }
}
