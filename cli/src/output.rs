//! Logging set-up and shared output helpers.

use std::process::ExitCode;

use crate::LogFormat;

/// Exit code: the command ran and found a problem.
pub const EXIT_PROBLEM: u8 = 1;
/// Exit code: bad invocation or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: could not complete.
pub const EXIT_FAILED: u8 = 3;

/// Logs go to stderr (stdout is for command output), as text or JSON lines. Text is colored
/// only when stderr is a terminal: a log file or the journal gets plain `key=value` fields.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A failed command: its message and exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// The error chain.
    pub error: anyhow::Error,
}

impl Failure {
    /// Bad invocation or configuration.
    pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }

    /// Could not complete.
    pub fn failed(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_FAILED,
            error: error.into(),
        }
    }

    /// Ran and found a problem.
    pub fn problem(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_PROBLEM,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure::failed(error)
    }
}

/// Result of a command.
pub type CmdResult = Result<(), Failure>;

/// Prints a command's result on stdout: pretty-printed JSON with `--json`, else `text` (called
/// only then). The one place a report is encoded, so every `--json` prints the same way.
pub fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> CmdResult {
    if json {
        let json = serde_json::to_string_pretty(value).map_err(|e| {
            Failure::failed(anyhow::anyhow!("cannot encode the output as JSON: {e}"))
        })?;
        println!("{json}");
    } else {
        print!("{}", text());
    }
    Ok(())
}

/// [`emit`] for a command that also reports failures with [`emit_failure`]: with `--json`, the
/// value with `"ok": true`, so a script reads one field whichever way the command ended.
pub fn emit_ok<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> CmdResult {
    if json {
        let mut v = serde_json::to_value(value)
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot encode the report: {e}")))?;
        v["ok"] = serde_json::Value::Bool(true);
        println!("{v:#}");
    } else {
        print!("{}", text());
    }
    Ok(())
}

/// With `--json`, prints a command's failure on stdout as one JSON line: `fields` (what the
/// command was asked to do) with `"ok": false` and the error's text. Without, prints nothing
/// (the error goes to stderr through [`finish`]).
pub fn emit_failure(json: bool, fields: serde_json::Value, error: &impl std::fmt::Display) {
    if !json {
        return;
    }
    let mut v = fields;
    v["ok"] = serde_json::Value::Bool(false);
    v["error"] = serde_json::Value::String(error.to_string());
    println!("{v}");
}

/// Prints the failure (the whole context chain) and maps it to an exit code.
pub fn finish(r: CmdResult) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.error.to_string().is_empty() {
                eprintln!("error: {}", chain_text(&f.error));
            }
            ExitCode::from(f.code)
        }
    }
}

/// The error and its causes joined by `: ` (as `{:#}` does), leaving out a cause whose text
/// the message so far already ends with: an error that wraps its source and prints it (a
/// `thiserror` `"{0}"` with `#[from]`) would otherwise say everything twice.
fn chain_text(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Loads the config file, mapping errors to exit code 2.
pub fn load_config(path: &std::path::Path) -> Result<reshard_engine::config::Config, Failure> {
    reshard_engine::config::Config::load(path).map_err(Failure::usage)
}
