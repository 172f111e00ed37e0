//! The `lmskv` subcommands, one file each, and what they share: the
//! [`Context`] built from the global flags, the [`CmdError`] every command
//! returns (it decides the exit code), and parsers for command-line arguments
//! that carry keys, values and durations.
//!
//! Each subcommand follows the same shape: parse its arguments (clap does most
//! of it, with the value parsers below), call the cluster through
//! [`lmskv_client::Client`], then render the result as a table or as JSON with
//! the helpers in [`crate::output`].

pub mod kv;
pub mod local;
pub mod node;
pub mod range;
pub mod status;

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use lmskv_client::{Client, ClientError};
use lmskv_proto::keys::{parse_escaped, validate_scan_bound, validate_user_key};
use lmskv_proto::limits::VALUE_BYTES_MAX;

use crate::output::OutputFormat;

/// What every subcommand gets from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// Seed endpoints (`HOST:PORT`) of the cluster.
    pub endpoints: Vec<String>,
    /// How results are printed.
    pub format: OutputFormat,
}

impl Context {
    /// Creates a client for the configured endpoints. No connection is made
    /// until the first call, so this only fails on a malformed endpoint.
    pub fn client(&self) -> Result<Client, CmdError> {
        Client::builder()
            .endpoints(self.endpoints.iter().cloned())
            .build()
            .map_err(|e| match e {
                ClientError::Config(m) => CmdError::Usage(format!("--endpoints: {m}")),
                other => CmdError::Client(other),
            })
    }
}

/// Why a command failed. The message is printed as `lmskv: <message>` on one
/// line and the variant chooses the exit code.
#[derive(Debug)]
pub enum CmdError {
    /// The command line is wrong (exit code 2, like clap's own usage errors).
    Usage(String),
    /// The key asked for does not exist (exit code 1).
    NotFound(String),
    /// The cluster refused the request or could not be reached (exit code 1).
    Client(ClientError),
    /// Anything else that went wrong at run time (exit code 1).
    Failed(String),
}

impl CmdError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CmdError::Usage(_) => ExitCode::from(2),
            CmdError::NotFound(_) | CmdError::Client(_) | CmdError::Failed(_) => ExitCode::FAILURE,
        }
    }
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::Usage(m) | CmdError::Failed(m) => f.write_str(m),
            CmdError::NotFound(key) => write!(f, "not found: {key}"),
            CmdError::Client(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CmdError {}

impl From<ClientError> for CmdError {
    fn from(e: ClientError) -> Self {
        CmdError::Client(e)
    }
}

/// Bytes given on the command line with `\xNN` and `\\` escapes, as printed
/// by [`lmskv_proto::keys::escape`].
///
/// A newtype because clap treats a plain `Vec<u8>` field as a list of numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escaped(pub Vec<u8>);

/// Parses a key that must be a valid user key: not empty, within the size
/// limit and outside the reserved system key space.
pub fn parse_user_key(s: &str) -> Result<Escaped, String> {
    let key = parse_escaped(s)?;
    validate_user_key("key", &key).map_err(|e| e.to_string())?;
    Ok(Escaped(key))
}

/// Parses a scan bound or prefix: empty (unbounded) or a valid user key.
pub fn parse_scan_bound(s: &str) -> Result<Escaped, String> {
    let key = parse_escaped(s)?;
    validate_scan_bound("key", &key).map_err(|e| e.to_string())?;
    Ok(Escaped(key))
}

/// Parses a value: any bytes up to the value size limit.
pub fn parse_value(s: &str) -> Result<Escaped, String> {
    let value = parse_escaped(s)?;
    if value.len() > VALUE_BYTES_MAX {
        return Err(format!(
            "value is {} bytes, the limit is {VALUE_BYTES_MAX}",
            value.len()
        ));
    }
    Ok(Escaped(value))
}

/// Parses a positive duration written with a unit suffix: `500ms`, `2s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit_ms) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1u64)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1_000u64)
    } else {
        return Err(format!(
            "duration {s:?} needs a unit: ms or s (e.g. 500ms, 2s)"
        ));
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("duration {s:?} is not a whole number of ms or s"))?;
    if n == 0 {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("500").is_err());
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn keys_are_unescaped_and_checked() {
        assert_eq!(
            parse_user_key("user/\\x01"),
            Ok(Escaped(b"user/\x01".to_vec()))
        );
        assert!(parse_user_key("").is_err());
        assert!(parse_user_key("\\x00meta").is_err());
        assert!(parse_user_key("bad\\q").is_err());
        assert_eq!(parse_scan_bound(""), Ok(Escaped(Vec::new())));
        assert!(parse_scan_bound("\\x00").is_err());
        assert_eq!(parse_value(""), Ok(Escaped(Vec::new())));
    }

    #[test]
    fn error_exit_codes() {
        assert_eq!(CmdError::Usage("x".into()).exit_code(), ExitCode::from(2));
        assert_eq!(
            CmdError::NotFound("k".into()).exit_code(),
            ExitCode::FAILURE
        );
        assert_eq!(CmdError::NotFound("k".into()).to_string(), "not found: k");
    }
}
