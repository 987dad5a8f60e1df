//! The benchmark's results: every measured figure, the comparisons the goals are judged by,
//! and the machine they were taken on.
//!
//! In: [`Figure`]s added by the scenarios. Out: a markdown report (stdout and
//! `results/latest.md`) and a JSON file (`results/<timestamp>.json`) holding the machine
//! facts, the settings and every figure. A figure that could not be measured is recorded with
//! the reason, never left out or invented.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// One measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// `catchup`, `fullload`, `steady`, `cost`.
    pub scenario: String,
    /// `reshard`, `native`, `raw-copy`, `ceiling`, `writer`, ...
    pub contestant: String,
    /// What was measured, e.g. `changes_per_sec`, `p99_ms shard2`.
    pub metric: String,
    /// The value (`None` when it could not be measured; see `note`).
    pub value: Option<f64>,
    /// Unit, e.g. `changes/s`.
    pub unit: String,
    /// Why a value is missing, or what qualifies it.
    pub note: Option<String>,
}

/// How a goal judges reshard's figure `a` against the comparison's `b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// `a / b >= r` (needs both).
    RatioAtLeast(f64),
    /// `a / b <= r` (needs both).
    RatioAtMost(f64),
    /// `a / b < r` (needs both).
    RatioBelow(f64),
    /// `a <= limit`, in the figures' unit (the comparison is shown, not needed).
    AtMost(f64),
    /// No goal: the ratio is shown for information.
    Info,
}

impl Goal {
    /// Whether `a` (and `b`) meet the goal; `None` when a needed figure is missing or there
    /// is no goal.
    pub fn met(self, a: Option<f64>, b: Option<f64>) -> Option<bool> {
        // A small tolerance so that a figure exactly at the limit is not failed by rounding.
        const EPS: f64 = 1e-9;
        match (self, a, b) {
            (Goal::RatioAtLeast(r), Some(a), Some(b)) => Some(a >= r * b * (1.0 - EPS)),
            (Goal::RatioAtMost(r), Some(a), Some(b)) => Some(a <= r * b * (1.0 + EPS)),
            (Goal::RatioBelow(r), Some(a), Some(b)) => Some(a < r * b),
            (Goal::AtMost(x), Some(a), _) => Some(a <= x * (1.0 + EPS)),
            _ => None,
        }
    }

    /// The goal as the report shows it.
    pub fn describe(self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(r) => format!("ratio >= {r}"),
            Goal::RatioAtMost(r) => format!("ratio <= {r:.3}"),
            Goal::RatioBelow(r) => format!("ratio < {r}"),
            Goal::AtMost(x) => format!("reshard <= {x} {unit}"),
            Goal::Info => "(no goal; for information)".into(),
        }
    }
}

/// A goal: reshard's figure next to a comparison's, their ratio, and whether the goal is met.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Scenario.
    pub scenario: String,
    /// What is compared, e.g. `catch-up rate vs native fan-out`.
    pub what: String,
    /// reshard's figure.
    pub reshard: Option<f64>,
    /// The comparison's figure.
    pub comparison: Option<f64>,
    /// Unit of both.
    pub unit: String,
    /// `reshard / comparison`.
    pub ratio: Option<f64>,
    /// The goal, e.g. `ratio >= 1.0`.
    pub goal: String,
    /// Whether it is met (`None`: not measured).
    pub met: Option<bool>,
}

/// Facts about the machine and servers.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: Option<String>,
    /// `MemTotal` of `/proc/meminfo`, KiB.
    pub mem_total_kib: Option<u64>,
    /// `uname -r` (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// Source's `server_version`.
    pub postgres_version: Option<String>,
    /// Source's `fsync`, `synchronous_commit`, `full_page_writes`, `shared_buffers`.
    pub source_settings: Vec<(String, String)>,
    /// Whether the harness started the servers (local throwaway clusters).
    pub local_clusters: bool,
    /// `git rev-parse HEAD` of the working tree, if available.
    pub git_commit: Option<String>,
}

impl Machine {
    /// Reads what is readable locally.
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: read("/proc/cpuinfo").and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_owned())
            }),
            mem_total_kib: read("/proc/meminfo").and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            }),
            kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()),
            git_commit: std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
            ..Default::default()
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// UTC start time, `YYYYMMDDTHHMMSSZ`.
    pub started_at: String,
    /// Wall-clock seconds the whole run took.
    pub elapsed_secs: f64,
    /// Machine facts.
    pub machine: Machine,
    /// The settings the run used.
    pub settings: serde_json::Value,
    /// The goals.
    pub comparisons: Vec<Comparison>,
    /// Every figure.
    pub figures: Vec<Figure>,
    /// Caveats and failures, in order.
    pub notes: Vec<String>,
}

impl Report {
    /// Records a figure.
    pub fn add(&mut self, scenario: &str, contestant: &str, metric: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            scenario: scenario.into(),
            contestant: contestant.into(),
            metric: metric.into(),
            value: Some(value),
            unit: unit.into(),
            note: None,
        });
    }

    /// Records a figure with a note that qualifies it (e.g. the setting it was measured under).
    pub fn add_noted(
        &mut self,
        scenario: &str,
        contestant: &str,
        metric: &str,
        value: f64,
        unit: &str,
        note: &str,
    ) {
        self.add(scenario, contestant, metric, value, unit);
        if let Some(f) = self.figures.last_mut() {
            f.note = Some(note.into());
        }
    }

    /// Records a figure that could not be measured, with the reason.
    pub fn missing(&mut self, scenario: &str, contestant: &str, metric: &str, why: &str) {
        self.figures.push(Figure {
            scenario: scenario.into(),
            contestant: contestant.into(),
            metric: metric.into(),
            value: None,
            unit: String::new(),
            note: Some(why.into()),
        });
    }

    /// Whether any figure of `scenario` was recorded (measured or missing).
    pub fn has_scenario(&self, scenario: &str) -> bool {
        self.figures.iter().any(|f| f.scenario == scenario)
    }

    /// A recorded value.
    pub fn get(&self, scenario: &str, contestant: &str, metric: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.scenario == scenario && f.contestant == contestant && f.metric == metric)
            .and_then(|f| f.value)
    }

    /// Adds a goal row: reshard's figure, the comparison's, their ratio and whether `goal` is
    /// met.
    pub fn compare(
        &mut self,
        scenario: &str,
        what: &str,
        reshard: Option<f64>,
        comparison: Option<f64>,
        unit: &str,
        goal: Goal,
    ) {
        let ratio = match (reshard, comparison) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        };
        self.comparisons.push(Comparison {
            scenario: scenario.into(),
            what: what.into(),
            reshard,
            comparison,
            unit: unit.into(),
            ratio,
            goal: goal.describe(unit),
            met: goal.met(reshard, comparison),
        });
    }

    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!("# reshard benchmark {}\n\n", self.started_at);
        let m = &self.machine;
        s.push_str(&format!(
            "Machine: {} cores ({}), {} MiB RAM, kernel {}, PostgreSQL {}; servers: {}; run took \
             {:.0} s.\n\n",
            m.cores,
            m.cpu_model.as_deref().unwrap_or("?"),
            m.mem_total_kib.map(|k| k / 1024).unwrap_or(0),
            m.kernel.as_deref().unwrap_or("?"),
            m.postgres_version.as_deref().unwrap_or("?"),
            if m.local_clusters {
                "local throwaway clusters started by the harness"
            } else {
                "given by URL"
            },
            self.elapsed_secs
        ));
        if !m.source_settings.is_empty() {
            s.push_str(&format!(
                "Server settings (same on every side): {}.\n\n",
                m.source_settings
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        s.push_str(&format!(
            "Settings: `{}`\n\n",
            serde_json::to_string(&self.settings).unwrap_or_default()
        ));
        s.push_str("## Goals\n\n| scenario | comparison | reshard | comparison | unit | ratio | goal | met |\n|---|---|---:|---:|---|---:|---|---|\n");
        for c in &self.comparisons {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                c.scenario,
                c.what,
                fmt_opt(c.reshard),
                fmt_opt(c.comparison),
                c.unit,
                c.ratio
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_else(|| "-".into()),
                c.goal,
                match c.met {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None if c.goal.starts_with('(') => "-",
                    None => "not measured",
                }
            ));
        }
        s.push_str("\n## Every figure\n\n| scenario | contestant | metric | value | unit | note |\n|---|---|---|---:|---|---|\n");
        for f in &self.figures {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                f.scenario,
                f.contestant,
                f.metric,
                fmt_opt(f.value),
                f.unit,
                f.note
                    .as_deref()
                    .unwrap_or("")
                    .replace('\n', " ")
                    .replace('|', "/")
            ));
        }
        if !self.notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &self.notes {
                s.push_str(&format!("- {}\n", n.replace('\n', "\n  ")));
            }
        }
        s
    }

    /// Writes `<dir>/<started_at>.json` and `<dir>/latest.md`; returns the JSON's path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.started_at));
        std::fs::write(
            &json,
            serde_json::to_string_pretty(self).context("serializing the report")?,
        )
        .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join("latest.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        Ok(json)
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.4}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_ratio_and_goal() {
        let mut r = Report::default();
        r.add(
            "catchup",
            "reshard",
            "changes_per_sec",
            90_000.0,
            "changes/s",
        );
        r.add(
            "catchup",
            "native",
            "changes_per_sec",
            60_000.0,
            "changes/s",
        );
        let a = r.get("catchup", "reshard", "changes_per_sec");
        let b = r.get("catchup", "native", "changes_per_sec");
        r.compare(
            "catchup",
            "vs native",
            a,
            b,
            "changes/s",
            Goal::RatioAtLeast(1.5),
        );
        r.compare(
            "catchup",
            "vs nothing",
            a,
            None,
            "changes/s",
            Goal::RatioAtLeast(1.0),
        );
        r.compare("catchup", "ratio only", a, b, "changes/s", Goal::Info);
        assert_eq!(r.comparisons[0].ratio, Some(1.5));
        assert_eq!(r.comparisons[0].met, Some(true));
        assert_eq!(r.comparisons[1].met, None);
        assert_eq!(r.comparisons[2].met, None);
        let md = r.markdown();
        assert!(
            md.contains(
                "| catchup | vs native | 90000 | 60000 | changes/s | 1.500 | ratio >= 1.5 | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| vs nothing | 90000 | - | changes/s | - | ratio >= 1 | not measured |"),
            "{md}"
        );
        assert!(
            md.contains("| 1.500 | (no goal; for information) | - |"),
            "{md}"
        );
    }

    #[test]
    fn goals_judge_ratios_and_limits() {
        assert_eq!(
            Goal::RatioAtLeast(1.5).met(Some(149.0), Some(100.0)),
            Some(false)
        );
        assert_eq!(
            Goal::RatioAtLeast(1.5).met(Some(150.0), Some(100.0)),
            Some(true)
        );
        assert_eq!(
            Goal::RatioAtMost(0.25).met(Some(2.0), Some(8.0)),
            Some(true)
        );
        assert_eq!(
            Goal::RatioAtMost(0.25).met(Some(2.1), Some(8.0)),
            Some(false)
        );
        assert_eq!(Goal::RatioBelow(1.0).met(Some(8.0), Some(8.0)), Some(false));
        assert_eq!(Goal::RatioBelow(1.0).met(Some(7.9), Some(8.0)), Some(true));
        // A limit needs only reshard's figure.
        assert_eq!(Goal::AtMost(15.0).met(Some(15.0), None), Some(true));
        assert_eq!(Goal::AtMost(15.0).met(Some(15.1), Some(1.0)), Some(false));
        assert_eq!(Goal::AtMost(15.0).met(None, Some(1.0)), None);
        assert_eq!(Goal::Info.met(Some(1.0), Some(1.0)), None);
        assert_eq!(Goal::AtMost(256.0).describe("MiB"), "reshard <= 256 MiB");
    }
}
