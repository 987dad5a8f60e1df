//! The explicit account → shard map (`hash = "map"`).
//!
//! In: `account_id,shard_name` pairs, from a CSV file or from the rows of the operator's SQL
//! query (the runtime runs the query). Out: [`AccountMap::lookup`] of a parsed key.
//!
//! Invariant kept here: a map is total over what it lists and unambiguous — every account is
//! listed once, names a configured shard, and (for integer and uuid keys) two spellings of the
//! same value never point to different shards. An account that is not listed is an error
//! unless a default shard is configured; it is never routed by guesswork.
//!
//! CSV format: one `account_id,shard_name` per line; fields may be double-quoted (RFC 4180,
//! `""` for a quote; a field cannot span lines); surrounding whitespace is trimmed; blank lines
//! and lines starting with `#` are ignored; an optional first record whose second field is
//! `shard`, `shard_name` or `shard_id` is a header. (Parsed here rather than with the `csv`
//! crate so that errors name the exact file line: `csv` reports the position before the
//! comment and blank lines it skips.)
//!
//! Memory: about 60 bytes per integer account (each account is indexed by its text and, when
//! it parses as one, by its integer or uuid value), so a 1M-account directory takes ~60 MB.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::event::{Oid, ShardId};

use super::error::{KeyError, RouteError};
use super::key::{display_value, format_uuid, parse_uuid, Key, KeyType};

/// An account → shard map.
#[derive(Clone, Debug, Default)]
pub struct AccountMap {
    shards: Vec<String>,
    text: HashMap<Box<[u8]>, ShardId>,
    ints: HashMap<i64, (ShardId, u64)>,
    uuids: HashMap<[u8; 16], (ShardId, u64)>,
    default: Option<ShardId>,
}

const HEADER_SHARD_FIELDS: &[&str] = &["shard", "shard_name", "shard_id"];

impl AccountMap {
    /// An empty map over `shards` (shard names, index = [`ShardId`]).
    pub fn new(shards: &[String]) -> AccountMap {
        AccountMap {
            shards: shards.to_vec(),
            ..AccountMap::default()
        }
    }

    /// Loads a CSV file (see the module docs for the format). Errors name the file and line.
    pub fn from_csv_path(path: &Path, shards: &[String]) -> Result<AccountMap, RouteError> {
        let file = std::fs::File::open(path).map_err(|e| RouteError::MapFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        AccountMap::from_csv_reader(&path.display().to_string(), file, shards)
    }

    /// Loads CSV from a reader; `source_name` (usually the path) names it in errors.
    pub fn from_csv_reader(
        source_name: &str,
        reader: impl Read,
        shards: &[String],
    ) -> Result<AccountMap, RouteError> {
        let mut map = AccountMap::new(shards);
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        let mut line: u64 = 0;
        let mut seen_record = false;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| RouteError::MapFile {
                    path: source_name.to_owned(),
                    message: format!("read failed after line {line}: {e}"),
                })?;
            if n == 0 {
                break;
            }
            line += 1;
            let line_err = |message: String| RouteError::MapLine {
                source_name: source_name.to_owned(),
                unit: "line",
                line,
                message,
            };
            let mut text = buf.as_slice();
            if line == 1 {
                text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
            }
            let text = text.trim_ascii();
            if text.is_empty() || text.starts_with(b"#") {
                continue;
            }
            let fields = split_csv_line(text).map_err(line_err)?;
            let [account, shard] = fields.as_slice() else {
                return Err(line_err(format!(
                    "expected 2 fields `account_id,shard_name`, found {}",
                    fields.len()
                )));
            };
            if !std::mem::replace(&mut seen_record, true) && map.shard_id(shard).is_none() {
                let s = String::from_utf8_lossy(shard).to_ascii_lowercase();
                if HEADER_SHARD_FIELDS.contains(&s.as_str()) {
                    continue;
                }
            }
            map.insert(account, shard, line).map_err(line_err)?;
        }
        Ok(map)
    }

    /// Builds a map from `(account_id, shard_name)` rows, e.g. the result of the configured
    /// account query. Errors name the 1-based row.
    pub fn from_pairs(
        shards: &[String],
        rows: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AccountMap, RouteError> {
        let mut map = AccountMap::new(shards);
        for (i, (account, shard)) in rows.into_iter().enumerate() {
            let row = i as u64 + 1;
            map.insert(account.trim().as_bytes(), shard.trim().as_bytes(), row)
                .map_err(|message| RouteError::MapLine {
                    source_name: "query".to_owned(),
                    unit: "row",
                    line: row,
                    message,
                })?;
        }
        Ok(map)
    }

    /// Sends accounts that are not in the map to `shard` instead of failing.
    pub fn with_default(mut self, shard: &str) -> Result<AccountMap, RouteError> {
        let id = self.shard_id(shard.as_bytes()).ok_or_else(|| {
            RouteError::Config(format!(
                "default shard {shard:?} is not a configured shard; valid names: {}",
                self.shards.join(", ")
            ))
        })?;
        self.default = Some(id);
        Ok(self)
    }

    /// The shard names this map was built for.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether the map lists no account.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    fn shard_id(&self, name: &[u8]) -> Option<ShardId> {
        self.shards
            .iter()
            .position(|s| s.as_bytes() == name)
            .and_then(|i| u16::try_from(i).ok())
            .map(ShardId)
    }

    fn insert(&mut self, account: &[u8], shard: &[u8], line: u64) -> Result<(), String> {
        if account.is_empty() {
            return Err("empty account_id".to_owned());
        }
        let id = self.shard_id(shard).ok_or_else(|| {
            format!(
                "unknown shard {:?} for account {:?}; valid names: {}",
                display_value(shard),
                display_value(account),
                self.shards.join(", ")
            )
        })?;
        if self.text.contains_key(account) {
            return Err(format!(
                "account {:?} is listed twice; list each account once",
                display_value(account)
            ));
        }
        // Index integers and uuids by value too, so that the map finds them whatever spelling
        // the file uses (PostgreSQL prints `007` as `7` and uuids in lower case).
        if let Ok(Key::Int(v)) = KeyType::Int8.parse_text(account) {
            if let Some(&(prev, prev_line)) = self.ints.get(&v) {
                if prev != id {
                    return Err(format!(
                        "account {:?} is the integer {v}, which line {prev_line} already maps \
                         to shard {}; remove one of them",
                        display_value(account),
                        self.name(prev)
                    ));
                }
            } else {
                self.ints.insert(v, (id, line));
            }
        }
        if let Some(u) = parse_uuid(account) {
            if let Some(&(prev, prev_line)) = self.uuids.get(&u) {
                if prev != id {
                    return Err(format!(
                        "account {:?} is the uuid {}, which line {prev_line} already maps to \
                         shard {}; remove one of them",
                        display_value(account),
                        format_uuid(&u),
                        self.name(prev)
                    ));
                }
            } else {
                self.uuids.insert(u, (id, line));
            }
        }
        self.text.insert(account.into(), id);
        Ok(())
    }

    fn name(&self, id: ShardId) -> &str {
        self.shards.get(id.index()).map_or("?", String::as_str)
    }

    /// The shard of accounts the map does not list (`[routing] default_shard`), if any.
    pub fn default_shard(&self) -> Option<&str> {
        self.default.map(|d| self.name(d))
    }

    /// Every listed account with its shard's name, under each spelling a key column's
    /// `::text` can give it: as listed, and for integers and uuids also PostgreSQL's own output
    /// form (`7` for `007`, lower-case uuids), the forms [`AccountMap::lookup`] matches by value.
    pub fn spellings(&self) -> impl Iterator<Item = (String, &str)> + '_ {
        self.text.iter().flat_map(move |(account, &id)| {
            let shard = self.name(id);
            let listed = String::from_utf8_lossy(account).into_owned();
            let canonical = canonical_account(account).filter(|c| *c != listed);
            std::iter::once((listed, shard)).chain(canonical.map(|c| (c, shard)))
        })
    }

    /// Every listed account, as listed, with its shard's name (in no particular order).
    pub fn accounts(&self) -> impl Iterator<Item = (String, &str)> + '_ {
        self.text.iter().map(move |(account, &id)| {
            (String::from_utf8_lossy(account).into_owned(), self.name(id))
        })
    }

    /// `newer` (a fresh read of the same CSV file or query) as the map to route by from now on,
    /// or an error if it moves an account this map already routes to another shard: rows of
    /// that account already live there, and moving an account between live shards is a
    /// separate operation, never a side effect of a refresh. Accounts missing from `newer` keep
    /// their shard (their rows are on it); the second value counts them.
    pub fn refreshed(&self, mut newer: AccountMap) -> Result<(AccountMap, usize), RouteError> {
        let moved = |account: String, from: ShardId, to: ShardId| RouteError::MapMove {
            account,
            from: self.name(from).to_owned(),
            to: self.name(to).to_owned(),
        };
        let mut kept = 0;
        for (account, &id) in &self.text {
            let now = newer.text.get(account).copied().or_else(|| {
                match KeyType::Int8.parse_text(account) {
                    Ok(Key::Int(v)) => newer.ints.get(&v).map(|&(s, _)| s),
                    _ => parse_uuid(account).and_then(|u| newer.uuids.get(&u).map(|&(s, _)| s)),
                }
            });
            match now {
                Some(s) if s != id => return Err(moved(display_value(account), id, s)),
                Some(_) => {}
                None => {
                    kept += 1;
                    let line = u64::MAX;
                    if let Ok(Key::Int(v)) = KeyType::Int8.parse_text(account) {
                        newer.ints.entry(v).or_insert((id, line));
                    }
                    if let Some(u) = parse_uuid(account) {
                        newer.uuids.entry(u).or_insert((id, line));
                    }
                    newer.text.insert(account.clone(), id);
                }
            }
        }
        Ok((newer, kept))
    }

    /// The shard of a key given as its text form, for a column of type `type_oid`: a
    /// supported key type is parsed (so `007` finds account `7`), any other type is looked up
    /// by its exact text.
    pub fn shard_of_text(&self, type_oid: Oid, text: &[u8]) -> Result<ShardId, KeyError> {
        match KeyType::from_oid(type_oid) {
            Some(t) => self.lookup(&t.parse_text(text)?),
            None => self.lookup(&Key::Bytes(text)),
        }
    }

    /// The shard of a key: by value for integers and uuids, by exact bytes for strings.
    pub fn lookup(&self, key: &Key<'_>) -> Result<ShardId, KeyError> {
        let found = match key {
            Key::Int(v) => self.ints.get(v).map(|&(s, _)| s),
            Key::Uuid(u) => self.uuids.get(u).map(|&(s, _)| s),
            Key::Bytes(b) => self.text.get(*b).copied(),
        };
        found
            .or(self.default)
            .ok_or_else(|| KeyError::UnknownAccount {
                account: match key {
                    Key::Int(v) => v.to_string(),
                    Key::Uuid(u) => format_uuid(u),
                    Key::Bytes(b) => display_value(b),
                },
            })
    }
}

/// PostgreSQL's own text form of an account the map matches by value (`7` for `007`, a
/// lower-case uuid), or `None` for an account matched by its exact text. Two spellings with the
/// same canonical form are the same account to [`AccountMap::lookup`].
pub fn canonical_account(account: &[u8]) -> Option<String> {
    match KeyType::Int8.parse_text(account) {
        Ok(Key::Int(v)) => Some(v.to_string()),
        _ => parse_uuid(account).map(|u| format_uuid(&u)),
    }
}

/// A whole map file in the format [`AccountMap::from_csv_reader`] reads: a header, then one
/// `account_id,shard_name` line per pair, in the given order. A field is double-quoted when the
/// reader would otherwise change it (a comma, a quote, surrounding whitespace, a leading `#`,
/// an empty field). Fails, naming the account, on a value no map line can hold (a line break).
pub fn csv_of_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<String, String> {
    fn field(out: &mut String, v: &str, first: bool) -> Result<(), String> {
        if v.contains(['\n', '\r']) {
            return Err(format!(
                "{:?} contains a line break, which a map line cannot hold",
                v
            ));
        }
        let quote = v.is_empty()
            || v.contains([',', '"'])
            || v.trim_ascii() != v
            || (first && (v.starts_with('#') || v.starts_with('\u{feff}')));
        if quote {
            out.push('"');
            out.push_str(&v.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(v);
        }
        Ok(())
    }
    let mut out = String::from("account_id,shard_name\n");
    for (account, shard) in pairs {
        field(&mut out, account, true)?;
        out.push(',');
        field(&mut out, shard, false)?;
        out.push('\n');
    }
    Ok(out)
}

/// The map file `text` with `accounts` sent to `shard` (an account move's flip): each line
/// whose account field is one of them gets `shard` as its second field, every other line is
/// kept byte for byte, and an account without a line gets one at the end. The account field is
/// compared as the map compares it: `lookup` parses it the way the map does (so `007` is the
/// line of account `7`).
pub fn csv_with_accounts_on(
    text: &str,
    accounts: &[String],
    shard: &str,
    same_account: impl Fn(&str, &str) -> bool,
) -> String {
    let mut out = String::with_capacity(text.len() + accounts.len() * 16);
    let mut written = vec![false; accounts.len()];
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let fields = split_csv_line(body.trim_ascii().as_bytes()).ok();
        let hit = fields.as_ref().and_then(|f| match f.as_slice() {
            [account, _] => {
                let a = String::from_utf8_lossy(account);
                accounts.iter().position(|x| same_account(x, a.trim()))
            }
            _ => None,
        });
        match hit {
            Some(i) => {
                let account = body.split(',').next().unwrap_or_default();
                out.push_str(account);
                out.push(',');
                out.push_str(shard);
                out.push_str(&line[body.len()..]);
                written[i] = true;
            }
            None => out.push_str(line),
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for (a, done) in accounts.iter().zip(written) {
        if !done {
            out.push_str(&format!("{a},{shard}\n"));
        }
    }
    out
}

/// Splits one CSV line (RFC 4180 quoting: `"a, b"`, `""` for a quote) into trimmed fields.
fn split_csv_line(line: &[u8]) -> Result<Vec<Cow<'_, [u8]>>, String> {
    let mut fields = Vec::with_capacity(2);
    let mut rest = line;
    loop {
        rest = rest.trim_ascii_start();
        if let [b'"', quoted @ ..] = rest {
            let mut value = Vec::new();
            let mut i = 0;
            loop {
                match (quoted.get(i), quoted.get(i + 1)) {
                    (Some(b'"'), Some(b'"')) => {
                        value.push(b'"');
                        i += 2;
                    }
                    (Some(b'"'), _) => {
                        i += 1;
                        break;
                    }
                    (Some(&c), _) => {
                        value.push(c);
                        i += 1;
                    }
                    (None, _) => return Err("unterminated quoted field".to_owned()),
                }
            }
            fields.push(Cow::Owned(value));
            rest = quoted.get(i..).unwrap_or_default().trim_ascii_start();
            match rest {
                [] => return Ok(fields),
                [b',', tail @ ..] => rest = tail,
                _ => return Err("unexpected text after a quoted field".to_owned()),
            }
        } else {
            match rest.iter().position(|&c| c == b',') {
                Some(p) => {
                    fields.push(Cow::Borrowed(
                        rest.get(..p).unwrap_or_default().trim_ascii(),
                    ));
                    rest = rest.get(p + 1..).unwrap_or_default();
                }
                None => {
                    fields.push(Cow::Borrowed(rest.trim_ascii()));
                    return Ok(fields);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards() -> Vec<String> {
        vec!["s0".into(), "s1".into(), "s2".into()]
    }

    #[test]
    fn csv_with_header_comments_and_quotes() {
        let csv = "\u{feff}# directory export\naccount_id,shard_name\n1,s0\n 007 , s1 \r\n\n\
                   \"acme, \"\"inc\"\"\" ,s2\nA0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11,s2\n";
        let m = AccountMap::from_csv_reader("accounts.csv", csv.as_bytes(), &shards()).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.lookup(&Key::Int(1)), Ok(ShardId(0)));
        assert_eq!(m.lookup(&Key::Int(7)), Ok(ShardId(1)));
        assert_eq!(m.lookup(&Key::Bytes(b"007")), Ok(ShardId(1)));
        assert_eq!(m.lookup(&Key::Bytes(b"acme, \"inc\"")), Ok(ShardId(2)));
        let u = parse_uuid(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(m.lookup(&Key::Uuid(u)), Ok(ShardId(2)));
        let err = m.lookup(&Key::Int(8)).unwrap_err();
        assert!(err.to_string().contains("account \"8\""), "{err}");
        let m = m.with_default("s2").unwrap();
        assert_eq!(m.lookup(&Key::Int(8)), Ok(ShardId(2)));
    }

    #[test]
    fn errors_name_file_line_and_fix() {
        let err = AccountMap::from_csv_reader("a.csv", "1,s0\n2,s9\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.csv line 2"), "{err}");
        assert!(err.contains("valid names: s0, s1, s2"), "{err}");

        let err = AccountMap::from_csv_reader("a.csv", "1,s0\n#x\n1,s1\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("listed twice"),
            "{err}"
        );

        let err = AccountMap::from_csv_reader("a.csv", "1,s0\n01,s1\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1 already maps"), "{err}");

        let err = AccountMap::from_csv_reader("a.csv", "1,s0,x\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("2 fields"), "{err}");

        let err = AccountMap::from_csv_reader("a.csv", "\n\n\"1,s0\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3: unterminated"), "{err}");

        // A misspelt shard on the first line is not mistaken for a header.
        let err = AccountMap::from_csv_reader("a.csv", "1,sO\n".as_bytes(), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown shard \"sO\""), "{err}");

        let err = AccountMap::new(&shards()).with_default("nope").unwrap_err();
        assert!(err.to_string().contains("valid names"), "{err}");
    }

    #[test]
    fn pairs_from_a_query() {
        let m = AccountMap::from_pairs(
            &shards(),
            vec![
                ("10".to_owned(), "s1".to_owned()),
                ("x".into(), "s0".into()),
            ],
        )
        .unwrap();
        assert_eq!(m.lookup(&Key::Int(10)), Ok(ShardId(1)));
        let err = AccountMap::from_pairs(&shards(), vec![("10".to_owned(), "zz".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("query row 1"), "{err}");
    }

    /// See: issue #11 item 9. A refresh adds accounts, keeps dropped ones, and refuses to move
    /// one.
    #[test]
    fn a_refresh_adds_keeps_and_refuses_moves() {
        let old = AccountMap::from_pairs(
            &shards(),
            vec![("1".to_owned(), "s0".to_owned()), ("2".into(), "s1".into())],
        )
        .unwrap();
        let newer = AccountMap::from_pairs(
            &shards(),
            vec![
                ("01".to_owned(), "s0".to_owned()),
                ("3".into(), "s2".into()),
            ],
        )
        .unwrap();
        let (m, kept) = old.refreshed(newer).unwrap();
        assert_eq!(kept, 1);
        assert_eq!(m.lookup(&Key::Int(1)), Ok(ShardId(0)));
        assert_eq!(m.lookup(&Key::Int(2)), Ok(ShardId(1)));
        assert_eq!(m.lookup(&Key::Int(3)), Ok(ShardId(2)));
        let moved =
            AccountMap::from_pairs(&shards(), vec![("2".to_owned(), "s2".to_owned())]).unwrap();
        let err = m.refreshed(moved).unwrap_err().to_string();
        assert!(
            err.contains("account \"2\"") && err.contains("from shard s1 to shard s2"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = AccountMap::from_csv_path(Path::new("/nonexistent/map.csv"), &shards())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/map.csv"), "{err}");
    }

    #[test]
    fn written_pairs_read_back_the_same() {
        let pairs = [
            ("1", "s0"),
            ("007", "s1"),
            ("a,b", "s2"),
            ("say \"hi\"", "s0"),
            (" padded ", "s1"),
            ("#hash", "s2"),
            ("shard", "s0"),
        ];
        let text = csv_of_pairs(pairs).unwrap();
        let m = AccountMap::from_csv_reader("new.csv", text.as_bytes(), &shards()).unwrap();
        assert_eq!(m.len(), pairs.len(), "{text}");
        for (a, s) in pairs {
            let got = m.lookup(&Key::Bytes(a.as_bytes())).unwrap();
            assert_eq!(m.shards()[got.index()], s, "{a:?} in\n{text}");
        }
        assert_eq!(m.lookup(&Key::Int(7)), Ok(ShardId(1)));
        let err = csv_of_pairs([("a\nb", "s0")]).unwrap_err();
        assert!(err.contains("line break"), "{err}");
    }

    #[test]
    fn csv_flip_moves_only_the_listed_accounts() {
        let text = "account_id,shard\n1,s0\n007,s0\n# note\n8,s1\r\n9,s1";
        let same = |a: &str, b: &str| a.trim_start_matches('0') == b.trim_start_matches('0');
        let out = csv_with_accounts_on(text, &["7".into(), "9".into(), "10".into()], "s2", same);
        assert_eq!(
            out,
            "account_id,shard\n1,s0\n007,s2\n# note\n8,s1\r\n9,s2\n10,s2\n"
        );
    }
}
