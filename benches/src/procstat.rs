//! CPU time and memory of processes, from `/proc`, and a background sampler of the source's
//! walsenders, the reshard process and its spill directory.
//!
//! In: pids (the reshard child; walsender pids found through `pg_replication_slots.active_pid`
//! of the slots being measured; the shard servers' backends that apply a contestant's changes,
//! found through `pg_stat_activity` of its shard databases). Out: [`Samples`]: CPU seconds
//! (`utime + stime` of `/proc/<pid>/stat`) of each process at its last sample, peak RSS (`VmHWM`
//! of `/proc/<pid>/status`) and the spill directory's largest size. A process's counters vanish
//! when it exits, so the sampler reads them every [`INTERVAL`] and once more when stopped, just
//! before the caller stops the consumer; the last value seen is the process's total.
//! See `proc(5)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// How often the sampler reads `/proc`.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// CPU seconds (user + system) a process has used, or `None` if it is gone or unreadable.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) is 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Peak resident set size (`VmHWM`) in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes of the regular files under `dir` (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Last CPU seconds seen per walsender pid.
    pub walsender_cpu: BTreeMap<u32, f64>,
    /// Last CPU seconds of the watched process.
    pub process_cpu: Option<f64>,
    /// Largest `VmHWM` of the watched process, KiB.
    pub process_hwm_kib: Option<u64>,
    /// Largest size of the spill directory, bytes.
    pub spill_max_bytes: Option<u64>,
    /// Last CPU seconds seen per applying backend on the shard servers: `(shard, pid)`.
    pub shard_backend_cpu: BTreeMap<(usize, u32), f64>,
    /// Whether the shard servers' backends were sampled at all (they must be on this machine).
    pub shard_backends_sampled: bool,
}

impl Samples {
    /// CPU seconds of all walsenders seen.
    pub fn walsender_cpu_total(&self) -> f64 {
        self.walsender_cpu.values().sum()
    }

    /// CPU seconds of all applying shard backends seen.
    pub fn shard_backend_cpu_total(&self) -> f64 {
        self.shard_backend_cpu.values().sum()
    }
}

/// The backends of a shard database that apply a contestant's changes: native logical
/// replication's workers (`backend_type` `logical replication worker` on PostgreSQL 15,
/// `logical replication apply worker` / `… parallel worker` from 16) and reshard's own
/// connections (`application_name` `reshard`). The benchmark's own monitoring connections set
/// no `application_name` and are not counted.
/// See <https://www.postgresql.org/docs/current/monitoring-stats.html#MONITORING-PG-STAT-ACTIVITY-VIEW>.
pub const APPLYING_BACKENDS_SQL: &str = "SELECT pid FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid() \
       AND (backend_type LIKE 'logical replication%' \
            OR (backend_type = 'client backend' AND application_name LIKE 'reshard%'))";

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// Walsenders of slots whose name matches this `LIKE` pattern (on the source; only when
    /// the source runs on this machine).
    pub slot_like: Option<String>,
    /// A process of ours (the reshard daemon).
    pub pid: Option<u32>,
    /// A spill directory.
    pub spill_dir: Option<PathBuf>,
}

/// A background task sampling [`Watch`] every [`INTERVAL`] until [`Sampler::finish`].
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Samples>,
}

async fn sample_once(src: Option<&Client>, shards: &[Client], w: &Watch, s: &mut Samples) {
    for (k, c) in shards.iter().enumerate() {
        if let Ok(rows) = c.query(APPLYING_BACKENDS_SQL, &[]).await {
            s.shard_backends_sampled = true;
            for r in rows {
                let pid: i32 = r.get(0);
                if let Some(cpu) = cpu_secs(pid as u32) {
                    s.shard_backend_cpu.insert((k, pid as u32), cpu);
                }
            }
        }
    }
    if let (Some(c), Some(like)) = (src, &w.slot_like) {
        if let Ok(rows) = c
            .query(
                "SELECT active_pid FROM pg_replication_slots \
                 WHERE slot_name LIKE $1 AND active_pid IS NOT NULL",
                &[like],
            )
            .await
        {
            for r in rows {
                let pid: i32 = r.get(0);
                if let Some(cpu) = cpu_secs(pid as u32) {
                    s.walsender_cpu.insert(pid as u32, cpu);
                }
            }
        }
    }
    if let Some(pid) = w.pid {
        if let Some(cpu) = cpu_secs(pid) {
            s.process_cpu = Some(cpu);
        }
        if let Some(h) = vm_hwm_kib(pid) {
            s.process_hwm_kib = Some(s.process_hwm_kib.unwrap_or(0).max(h));
        }
    }
    if let Some(d) = &w.spill_dir {
        let b = dir_bytes(d);
        s.spill_max_bytes = Some(s.spill_max_bytes.unwrap_or(0).max(b));
    }
}

impl Sampler {
    /// Starts sampling. `src` is an SQL connection to the source (used to find walsender pids),
    /// `None` when the source is not on this machine; `shards` are connections to the
    /// contestant's shard databases, in shard order, whose applying backends are sampled (empty
    /// when the shards are not on this machine or not measured).
    pub fn start(src: Option<Client>, shards: Vec<Client>, w: Watch) -> Sampler {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut s = Samples::default();
            loop {
                sample_once(src.as_ref(), &shards, &w, &mut s).await;
                tokio::select! {
                    biased;
                    // Cancel-safe: a watch change is not lost.
                    _ = rx.changed() => break,
                    _ = tokio::time::sleep(INTERVAL) => {}
                }
            }
            sample_once(src.as_ref(), &shards, &w, &mut s).await;
            s
        });
        Sampler { stop, task }
    }

    /// Takes a last sample and returns everything seen. Call it before stopping the consumer.
    pub async fn finish(self) -> Samples {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_memory() {
        let me = std::process::id();
        // Burn a little CPU so the counter is non-zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_secs(me).is_some_and(|c| c > 0.0));
        assert!(vm_hwm_kib(me).is_some_and(|k| k > 100));
        assert_eq!(cpu_secs(u32::MAX), None);
    }

    #[test]
    fn dir_bytes_sums_nested_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).unwrap();
        assert_eq!(dir_bytes(d.path()), 1024);
        assert_eq!(dir_bytes(&d.path().join("missing")), 0);
    }
}
