//! The admin console's command language.
//!
//! In: the text of one simple-protocol `Query` message (possibly several statements separated by
//! `;`). Out: a list of [`AdminCommand`]s, or a [`ParseError`] naming the statement that is not
//! understood. Parsing is pure (no I/O, no status), never panics on any input, and is
//! case-insensitive on keywords; shard names keep their case (they are matched exactly against
//! `[[shards]] name`) and may be double- or single-quoted.

/// One statement of the admin console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// `SHOW STATUS`: key/value rows.
    ShowStatus,
    /// `SHOW STATUS JSON`: the whole snapshot as one JSON text value.
    ShowStatusJson,
    /// `SHOW SHARDS`: one row per shard.
    ShowShards,
    /// `SHOW TABLES`: one row per table of the full load.
    ShowTables,
    /// `SHOW LAG`: per-shard lag and commit-to-apply latency.
    ShowLag,
    /// `SHOW SPILL`: the local spill log.
    ShowSpill,
    /// `SHOW FENCES`: the write fences on the source.
    ShowFences,
    /// `SHOW THROTTLE`: per shard, the full load's throttle (rate in force, health signals).
    ShowThrottle,
    /// `SHOW REVERSE`: the cut-over shards' writes streaming back to the source.
    ShowReverse,
    /// `SHOW HELP`: the command list.
    ShowHelp,
    /// `PAUSE [shard]`: pause one shard, or reading from the source.
    Pause(Option<String>),
    /// `RESUME [shard]`.
    Resume(Option<String>),
    /// `SHUTDOWN`: stop the daemon cleanly.
    Shutdown,
    /// `SET …`: accepted and ignored, so that clients which set session parameters on connect
    /// (as they do with PostgreSQL) keep working.
    Set,
}

/// A statement the console does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a known command.
    #[error("unknown command \"{0}\"; try SHOW HELP")]
    Unknown(String),
    /// A quoted name is not closed.
    #[error("unterminated quoted name in \"{0}\"; close the quote")]
    Unterminated(String),
}

/// The commands and what they do, as `SHOW HELP` lists them.
pub const HELP: &[(&str, &str)] = &[
    (
        "SHOW STATUS",
        "phase, uptime, slot, confirmed_flush_lsn, retained WAL, spill size (key/value rows)",
    ),
    (
        "SHOW STATUS JSON",
        "the whole status snapshot as one JSON value (used by `reshard status --json`)",
    ),
    (
        "SHOW SHARDS",
        "one row per shard: state, applied_lsn, lag, rows applied, rate, last error",
    ),
    (
        "SHOW TABLES",
        "one row per table: target, mode, full-load state and progress",
    ),
    (
        "SHOW LAG",
        "per shard: lag in bytes and seconds, commit-to-apply latency p50/p99/max",
    ),
    (
        "SHOW SPILL",
        "the local spill log: size, cap, segments, durable LSN, backpressure, fsyncs",
    ),
    (
        "SHOW FENCES",
        "write fences on the source: shard, since, seconds fenced, writes refused, cutover step, LSN",
    ),
    (
        "SHOW THROTTLE",
        "per shard, the full load's throttle: rows/s in force, floor, ceiling, backoffs, probe latency, active backends, replica lag, why it holds back",
    ),
    (
        "SHOW REVERSE",
        "per cut-over shard, its writes streaming back to the source: state, stream, slot, applied_lsn, lag, rows applied",
    ),
    ("SHOW HELP", "this list"),
    (
        "PAUSE [shard]",
        "pause applying to one shard, or (without a name) reading from the source",
    ),
    (
        "RESUME [shard]",
        "resume a paused shard, or (without a name) reading from the source",
    ),
    (
        "SHUTDOWN",
        "stop reshard cleanly (finish batches, flush the spill log, confirm to the source)",
    ),
];

/// Parses the text of one `Query` message into its statements. Empty statements (`;;`) are
/// skipped. The first statement that is not understood makes the whole message an error, so
/// nothing is executed from a message that contains a typo.
pub fn parse(query: &str) -> Result<Vec<AdminCommand>, ParseError> {
    let mut out = Vec::new();
    for stmt in split_statements(query)? {
        let stmt = stmt.trim();
        if stmt.is_empty() {
            continue;
        }
        out.push(parse_statement(stmt)?);
    }
    Ok(out)
}

/// Splits on `;` outside quotes.
fn split_statements(query: &str) -> Result<Vec<&str>, ParseError> {
    let mut parts = Vec::new();
    let mut quote: Option<char> = None;
    let mut start = 0;
    for (i, c) in query.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ';' => {
                parts.push(&query[start..i]);
                start = i + c.len_utf8();
            }
            None => {}
        }
    }
    if quote.is_some() {
        return Err(ParseError::Unterminated(query.trim().to_owned()));
    }
    parts.push(&query[start..]);
    Ok(parts)
}

/// Splits a statement into words; a quoted word keeps its inner text verbatim (a doubled
/// quote inside stands for one, as in SQL).
fn words(stmt: &str) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' || c == '\'' {
            chars.next();
            let mut closed = false;
            while let Some(d) = chars.next() {
                if d == c {
                    if chars.peek() == Some(&c) {
                        chars.next();
                        word.push(c);
                        continue;
                    }
                    closed = true;
                    break;
                }
                word.push(d);
            }
            if !closed {
                return Err(ParseError::Unterminated(stmt.to_owned()));
            }
        } else {
            while let Some(&d) = chars.peek() {
                if d.is_whitespace() {
                    break;
                }
                word.push(d);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn parse_statement(stmt: &str) -> Result<AdminCommand, ParseError> {
    let unknown = || ParseError::Unknown(stmt.to_owned());
    let w = words(stmt)?;
    let kw: Vec<String> = w.iter().map(|s| s.to_ascii_uppercase()).collect();
    let kw: Vec<&str> = kw.iter().map(String::as_str).collect();
    match kw.as_slice() {
        ["SHOW", "STATUS"] => Ok(AdminCommand::ShowStatus),
        ["SHOW", "STATUS", "JSON"] => Ok(AdminCommand::ShowStatusJson),
        ["SHOW", "SHARDS"] => Ok(AdminCommand::ShowShards),
        ["SHOW", "TABLES"] => Ok(AdminCommand::ShowTables),
        ["SHOW", "LAG"] => Ok(AdminCommand::ShowLag),
        ["SHOW", "SPILL"] => Ok(AdminCommand::ShowSpill),
        ["SHOW", "FENCES"] => Ok(AdminCommand::ShowFences),
        ["SHOW", "THROTTLE"] => Ok(AdminCommand::ShowThrottle),
        ["SHOW", "REVERSE"] => Ok(AdminCommand::ShowReverse),
        ["SHOW", "HELP"] | ["HELP"] => Ok(AdminCommand::ShowHelp),
        ["PAUSE"] => Ok(AdminCommand::Pause(None)),
        ["RESUME"] => Ok(AdminCommand::Resume(None)),
        ["PAUSE", _] => Ok(AdminCommand::Pause(w.get(1).cloned())),
        ["RESUME", _] => Ok(AdminCommand::Resume(w.get(1).cloned())),
        ["SHUTDOWN"] => Ok(AdminCommand::Shutdown),
        ["SET", ..] if kw.len() > 1 => Ok(AdminCommand::Set),
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_case_insensitive_and_semicolon_optional() {
        assert_eq!(
            parse("show status").unwrap(),
            vec![AdminCommand::ShowStatus]
        );
        assert_eq!(
            parse("SHOW STATUS;").unwrap(),
            vec![AdminCommand::ShowStatus]
        );
        assert_eq!(
            parse("  Show   Status   Json ; ").unwrap(),
            vec![AdminCommand::ShowStatusJson]
        );
        assert_eq!(parse("show lag").unwrap(), vec![AdminCommand::ShowLag]);
        assert_eq!(parse("SHOW spill").unwrap(), vec![AdminCommand::ShowSpill]);
        assert_eq!(
            parse("show throttle").unwrap(),
            vec![AdminCommand::ShowThrottle]
        );
        assert_eq!(
            parse("show tables").unwrap(),
            vec![AdminCommand::ShowTables]
        );
        assert_eq!(
            parse("show shards").unwrap(),
            vec![AdminCommand::ShowShards]
        );
        assert_eq!(parse("show help").unwrap(), vec![AdminCommand::ShowHelp]);
        assert_eq!(
            parse("show reverse").unwrap(),
            vec![AdminCommand::ShowReverse]
        );
        assert_eq!(parse("shutdown").unwrap(), vec![AdminCommand::Shutdown]);
    }

    #[test]
    fn shard_names_keep_case_and_may_be_quoted() {
        assert_eq!(
            parse("pause Shard1").unwrap(),
            vec![AdminCommand::Pause(Some("Shard1".into()))]
        );
        assert_eq!(
            parse("RESUME \"eu west;1\"").unwrap(),
            vec![AdminCommand::Resume(Some("eu west;1".into()))]
        );
        assert_eq!(
            parse("resume 'it''s'").unwrap(),
            vec![AdminCommand::Resume(Some("it's".into()))]
        );
        assert_eq!(parse("PAUSE").unwrap(), vec![AdminCommand::Pause(None)]);
        assert_eq!(parse("resume;").unwrap(), vec![AdminCommand::Resume(None)]);
    }

    #[test]
    fn several_statements_in_one_message() {
        assert_eq!(
            parse("SHOW LAG; SHOW SPILL;;").unwrap(),
            vec![AdminCommand::ShowLag, AdminCommand::ShowSpill]
        );
        assert!(parse(";").unwrap().is_empty());
    }

    #[test]
    fn unknown_commands_name_the_statement_and_the_help() {
        let e = parse("SHOW STATS").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown command \"SHOW STATS\"; try SHOW HELP"
        );
        // A typo anywhere rejects the whole message: nothing of it runs.
        assert!(parse("PAUSE shard1; DROP everything").is_err());
        assert!(parse("PAUSE a b").is_err());
        assert!(parse("SET").is_err());
        assert_eq!(
            parse("set application_name = 'x'").unwrap(),
            vec![AdminCommand::Set]
        );
    }

    #[test]
    fn unterminated_quotes_are_an_error_not_a_panic() {
        assert!(matches!(
            parse("PAUSE \"shard1"),
            Err(ParseError::Unterminated(_))
        ));
        assert!(matches!(parse("'"), Err(ParseError::Unterminated(_))));
        // Arbitrary bytes never panic.
        for s in ["\u{0}", "ß;ü\"", "PAUSE 'ä", "\"\"", "SHOW\u{3000}LAG"] {
            let _ = parse(s);
        }
    }
}
