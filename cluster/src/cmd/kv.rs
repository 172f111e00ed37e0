//! `lmskv kv get|put|del|scan`: key-value access from the command line.
//!
//! Keys and values are written with the escapes `lmskv_proto::keys::escape`
//! prints (`\xNN`, `\\`), so any byte string can be given and every printed
//! key can be pasted back. Each operation is parsed by clap into its argument
//! struct, run through [`lmskv_client::Client`], and rendered by a serde view
//! whose JSON shape is stable.

use clap::{Args, Subcommand, ValueEnum};
use lmskv_client::{
    Durability, KeyValue, ReadConsistency, ScanOptions, SessionToken, WriteOptions,
};
use lmskv_proto::limits::SCAN_LIMIT_MAX;
use serde::Serialize;

use crate::cmd::{
    parse_duration, parse_scan_bound, parse_user_key, parse_value, CmdError, Context, Escaped,
};
use crate::output::{self, bytes_text, Table};

/// Most pairs one `kv scan` prints; larger scans belong in a program using the
/// client library.
pub const SCAN_PAIRS_MAX: usize = 1_000_000;

/// Pairs `kv scan` prints when no `--limit` is given.
pub const SCAN_PAIRS_DEFAULT: usize = 100;

/// Key-value operations.
#[derive(Debug, Clone, Subcommand)]
pub enum KvCommand {
    /// Read one key and print its value and version.
    Get(GetArgs),
    /// Set a key to a value and print the new version and session token.
    Put(PutArgs),
    /// Delete a key (succeeds also when the key does not exist).
    Del(DelArgs),
    /// List keys in key order, following pages up to --limit pairs.
    Scan(ScanArgs),
}

/// Arguments of `lmskv kv get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// The key; `\xNN` and `\\` escapes give any byte.
    #[arg(value_parser = parse_user_key)]
    pub key: Escaped,
    /// Read consistency: strong, bounded:DURATION (e.g. bounded:500ms),
    /// session:TOKEN (a put's session_token), prefix or eventual.
    #[arg(long, value_name = "LEVEL", default_value = "strong", value_parser = parse_consistency)]
    pub consistency: ReadConsistency,
}

/// Arguments of `lmskv kv put`.
#[derive(Debug, Clone, Args)]
pub struct PutArgs {
    /// The key; `\xNN` and `\\` escapes give any byte.
    #[arg(value_parser = parse_user_key)]
    pub key: Escaped,
    /// The value; `\xNN` and `\\` escapes give any byte.
    #[arg(value_parser = parse_value, allow_hyphen_values = true)]
    pub value: Escaped,
    /// When to acknowledge: once a majority has the write, or every voter.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Majority)]
    pub durability: DurabilityArg,
}

/// Arguments of `lmskv kv del`.
#[derive(Debug, Clone, Args)]
pub struct DelArgs {
    /// The key; `\xNN` and `\\` escapes give any byte.
    #[arg(value_parser = parse_user_key)]
    pub key: Escaped,
}

/// Arguments of `lmskv kv scan`.
#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// Only keys that start with this prefix (excludes --start and --end).
    #[arg(long, value_parser = parse_scan_bound, conflicts_with_all = ["start", "end"])]
    pub prefix: Option<Escaped>,
    /// First key of the scan, inclusive (default: the first key).
    #[arg(long, value_parser = parse_scan_bound)]
    pub start: Option<Escaped>,
    /// Key where the scan stops, exclusive (default: the last key).
    #[arg(long, value_parser = parse_scan_bound)]
    pub end: Option<Escaped>,
    /// Most pairs to print in total.
    #[arg(long, default_value_t = SCAN_PAIRS_DEFAULT, value_parser = parse_scan_limit)]
    pub limit: usize,
    /// Walk from the end of the span towards its start.
    #[arg(long)]
    pub reverse: bool,
    /// Print keys and versions without values.
    #[arg(long)]
    pub keys_only: bool,
    /// Read consistency: strong, bounded:DURATION, session:TOKEN, prefix or eventual.
    #[arg(long, value_name = "LEVEL", default_value = "strong", value_parser = parse_consistency)]
    pub consistency: ReadConsistency,
}

/// Write durability as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// Committed by a quorum and applied on the leader.
    Majority,
    /// Durable on every voter.
    All,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Majority => Durability::Majority,
            DurabilityArg::All => Durability::All,
        }
    }
}

/// Parses a read consistency level: `strong`, `bounded:500ms`,
/// `session:TOKEN`, `prefix` or `eventual`. A session token may name several
/// ranges (`1:42,7:99`); each read waits only for the index of the range
/// that serves it.
pub fn parse_consistency(s: &str) -> Result<ReadConsistency, String> {
    if let Some(t) = s.strip_prefix("session:") {
        return t
            .trim()
            .parse::<SessionToken>()
            .map(ReadConsistency::Session)
            .map_err(|e| format!("bad session token {t:?}: {e} (use a put's session_token)"));
    }
    parse_level(s)
}

fn parse_level(s: &str) -> Result<ReadConsistency, String> {
    let (level, param) = match s.split_once(':') {
        Some((l, p)) => (l, Some(p)),
        None => (s, None),
    };
    match (level.to_ascii_lowercase().as_str(), param) {
        ("strong", None) => Ok(ReadConsistency::Strong),
        ("prefix" | "consistent-prefix", None) => Ok(ReadConsistency::ConsistentPrefix),
        ("eventual", None) => Ok(ReadConsistency::Eventual),
        ("bounded", Some(d)) => parse_duration(d).map(ReadConsistency::BoundedStaleness),
        ("bounded", None) => Err("bounded needs a staleness bound, e.g. bounded:500ms".into()),
        ("session", None) => Err("session needs a token, e.g. session:42 (a put's session_token)".into()),
        ("strong" | "prefix" | "consistent-prefix" | "eventual", Some(_)) => {
            Err(format!("level {level:?} takes no parameter"))
        }
        _ => Err(format!(
            "unknown consistency {s:?}; use strong, bounded:DURATION, session:TOKEN, prefix or eventual"
        )),
    }
}

fn parse_scan_limit(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if n == 0 || n > SCAN_PAIRS_MAX {
        return Err(format!("the limit must be between 1 and {SCAN_PAIRS_MAX}"));
    }
    Ok(n)
}

/// A key with its value and version, as printed by `get` and `scan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValueView {
    /// The key, escaped.
    pub key: String,
    /// The value, escaped; absent for `scan --keys-only`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The log index of the key's last write.
    pub version: u64,
}

impl KeyValueView {
    fn new(kv: &KeyValue, with_value: bool) -> Self {
        KeyValueView {
            key: bytes_text(&kv.key),
            value: with_value.then(|| bytes_text(&kv.value)),
            version: kv.version,
        }
    }
}

/// What `put` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PutView {
    /// The key, escaped.
    pub key: String,
    /// The key's new version.
    pub version: u64,
    /// The write's session token (`RANGE:INDEX`): pass it as
    /// `--consistency session:TOKEN` to read this write from any replica.
    pub session_token: String,
}

/// What `del` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DelView {
    /// The key, escaped.
    pub key: String,
    /// Whether the key existed.
    pub deleted: bool,
}

/// The span a scan covers: `[start, end)`, empty meaning unbounded.
///
/// `--prefix P` becomes `[P, prefix_end(P))`; a prefix of only `0xff` bytes
/// has no end key and runs to the end of the key space.
pub fn scan_bounds(args: &ScanArgs) -> (Vec<u8>, Vec<u8>) {
    match &args.prefix {
        Some(Escaped(p)) => {
            let end = lmskv_proto::keys::prefix_end(p).unwrap_or_default();
            (p.clone(), end)
        }
        None => (
            args.start.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            args.end.as_ref().map(|e| e.0.clone()).unwrap_or_default(),
        ),
    }
}

/// Runs one `lmskv kv` subcommand.
pub async fn run(ctx: &Context, command: KvCommand) -> Result<(), CmdError> {
    match command {
        KvCommand::Get(a) => get(ctx, a).await,
        KvCommand::Put(a) => put(ctx, a).await,
        KvCommand::Del(a) => del(ctx, a).await,
        KvCommand::Scan(a) => scan(ctx, a).await,
    }
}

async fn get(ctx: &Context, args: GetArgs) -> Result<(), CmdError> {
    let client = ctx.client()?;
    let key_text = bytes_text(&args.key.0);
    let kv = client
        .get(args.key.0, args.consistency)
        .await?
        .ok_or(CmdError::NotFound(key_text))?;
    let view = KeyValueView::new(&kv, true);
    output::emit(ctx.format, &view, |v| v.value.clone().unwrap_or_default())
}

async fn put(ctx: &Context, args: PutArgs) -> Result<(), CmdError> {
    let client = ctx.client()?;
    let key_text = bytes_text(&args.key.0);
    let opts = WriteOptions {
        durability: args.durability.into(),
        request_id: None,
    };
    let written = client.put_with(args.key.0, args.value.0, &opts).await?;
    let view = PutView {
        key: key_text,
        version: written.version,
        session_token: written.session_token().to_string(),
    };
    output::emit(ctx.format, &view, |v| format!("OK version {}", v.version))
}

async fn del(ctx: &Context, args: DelArgs) -> Result<(), CmdError> {
    let client = ctx.client()?;
    let key_text = bytes_text(&args.key.0);
    let deleted = client.delete(args.key.0).await?;
    let view = DelView {
        key: key_text,
        deleted,
    };
    output::emit(ctx.format, &view, |v| {
        if v.deleted {
            "OK deleted".to_string()
        } else {
            "OK (the key did not exist)".to_string()
        }
    })
}

async fn scan(ctx: &Context, args: ScanArgs) -> Result<(), CmdError> {
    let client = ctx.client()?;
    let (start, end) = scan_bounds(&args);
    if !start.is_empty() && !end.is_empty() && start >= end {
        return Err(CmdError::Usage(format!(
            "--start {} is not before --end {}",
            bytes_text(&start),
            bytes_text(&end)
        )));
    }
    let opts = ScanOptions {
        start: start.into(),
        end: end.into(),
        limit: u32::try_from(args.limit)
            .unwrap_or(u32::MAX)
            .min(SCAN_LIMIT_MAX),
        reverse: args.reverse,
        keys_only: args.keys_only,
        consistency: args.consistency,
        page_token: Default::default(),
    };
    let kvs = client.scan_all(&opts, args.limit).await?;
    let views: Vec<KeyValueView> = kvs
        .iter()
        .map(|kv| KeyValueView::new(kv, !args.keys_only))
        .collect();
    output::emit(ctx.format, &views, |views| {
        let mut table = if args.keys_only {
            Table::new(&["KEY", "VERSION"])
        } else {
            Table::new(&["KEY", "VALUE", "VERSION"])
        };
        for v in views {
            let mut row = vec![v.key.clone()];
            if let Some(value) = &v.value {
                row.push(value.clone());
            }
            row.push(v.version.to_string());
            table.push(row);
        }
        table.render()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        kv: KvCommand,
    }

    fn parse(args: &[&str]) -> Result<KvCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("kv").chain(args.iter().copied())).map(|c| c.kv)
    }

    fn scan_args(args: &[&str]) -> ScanArgs {
        match parse(&[&["scan"], args].concat()) {
            Ok(KvCommand::Scan(a)) => a,
            other => panic!("not a scan: {other:?}"),
        }
    }

    #[test]
    fn consistency_levels_parse() {
        assert_eq!(parse_consistency("strong"), Ok(ReadConsistency::Strong));
        assert_eq!(
            parse_consistency("bounded:500ms"),
            Ok(ReadConsistency::BoundedStaleness(Duration::from_millis(
                500
            )))
        );
        assert_eq!(
            parse_consistency("bounded:2s"),
            Ok(ReadConsistency::BoundedStaleness(Duration::from_secs(2)))
        );
        assert_eq!(
            parse_consistency("session:3:42"),
            Ok(ReadConsistency::Session(SessionToken::for_range(3, 42)))
        );
        assert_eq!(
            parse_consistency("prefix"),
            Ok(ReadConsistency::ConsistentPrefix)
        );
        assert_eq!(parse_consistency("eventual"), Ok(ReadConsistency::Eventual));
        for bad in [
            "",
            "bounded",
            "bounded:5",
            "bounded:0ms",
            "session",
            "session:x",
            "session:42",
            "strong:1",
            "linear",
        ] {
            assert!(parse_consistency(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn session_tokens_keep_every_range() {
        let want: SessionToken = "1:42,7:99".parse().unwrap();
        assert_eq!(
            parse_consistency("session:1:42,7:99"),
            Ok(ReadConsistency::Session(want))
        );
    }

    #[test]
    fn prefix_sets_both_bounds() {
        assert_eq!(
            scan_bounds(&scan_args(&["--prefix", "user/"])),
            (b"user/".to_vec(), b"user0".to_vec())
        );
        assert_eq!(
            scan_bounds(&scan_args(&["--prefix", "a\\xff"])),
            (b"a\xff".to_vec(), b"b".to_vec())
        );
        assert_eq!(
            scan_bounds(&scan_args(&["--prefix", "\\xff\\xff"])),
            (b"\xff\xff".to_vec(), Vec::new())
        );
        assert_eq!(
            scan_bounds(&scan_args(&["--start", "a", "--end", "c"])),
            (b"a".to_vec(), b"c".to_vec())
        );
        assert_eq!(scan_bounds(&scan_args(&[])), (Vec::new(), Vec::new()));
    }

    #[test]
    fn scan_flags_are_checked() {
        assert!(parse(&["scan", "--prefix", "a", "--start", "b"]).is_err());
        assert!(parse(&["scan", "--prefix", "a", "--end", "b"]).is_err());
        assert!(parse(&["scan", "--limit", "0"]).is_err());
        assert!(parse(&["scan", "--start", "\\x00"]).is_err());
        let a = scan_args(&[
            "--limit",
            "5",
            "--reverse",
            "--keys-only",
            "--consistency",
            "prefix",
        ]);
        assert_eq!(a.limit, 5);
        assert!(a.reverse && a.keys_only);
        assert_eq!(a.consistency, ReadConsistency::ConsistentPrefix);
        assert_eq!(scan_args(&[]).limit, SCAN_PAIRS_DEFAULT);
    }

    #[test]
    fn keys_and_values_are_unescaped() {
        match parse(&["put", "k\\x00\\x01", "-v\\\\"]) {
            Ok(KvCommand::Put(p)) => {
                assert_eq!(p.key.0, b"k\x00\x01");
                assert_eq!(p.value.0, b"-v\\");
                assert_eq!(p.durability, DurabilityArg::Majority);
            }
            other => panic!("not a put: {other:?}"),
        }
        assert!(parse(&["get", "\\x00system"]).is_err());
        assert!(parse(&["get", ""]).is_err());
        assert!(parse(&["del", "bad\\x0"]).is_err());
    }

    #[test]
    fn kv_json_shapes_are_stable() {
        let kv = KeyValue {
            key: "k\u{1}".into(),
            value: "v".into(),
            version: 7,
        };
        assert_eq!(
            output::json(&KeyValueView::new(&kv, true)).expect("json"),
            r#"{"key":"k\\x01","value":"v","version":7}"#
        );
        assert_eq!(
            output::json(&KeyValueView::new(&kv, false)).expect("json"),
            r#"{"key":"k\\x01","version":7}"#
        );
        let put = PutView {
            key: "k".into(),
            version: 7,
            session_token: "7".into(),
        };
        assert_eq!(
            output::json(&put).expect("json"),
            r#"{"key":"k","version":7,"session_token":"7"}"#
        );
        let del = DelView {
            key: "k".into(),
            deleted: true,
        };
        assert_eq!(
            output::json(&del).expect("json"),
            r#"{"key":"k","deleted":true}"#
        );
    }
}
