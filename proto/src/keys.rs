//! User key rules and printable key rendering.
//!
//! Keys are bytes. Keys that begin with byte `0x00` belong to the system (meta)
//! key space and are refused in user requests.

use crate::error::Error;
use crate::limits::KEY_BYTES_MAX;

/// First byte of every system key. User keys never start with it.
pub const SYSTEM_KEY_PREFIX: u8 = 0x00;

/// Checks that `key` may be used as a user key: non-empty, at most
/// [`KEY_BYTES_MAX`] bytes and outside the reserved system prefix.
pub fn validate_user_key(field: &str, key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid_argument(field, "key must not be empty"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(Error::invalid_argument(
            field,
            format!("key is {} bytes, the limit is {KEY_BYTES_MAX}", key.len()),
        ));
    }
    if key[0] == SYSTEM_KEY_PREFIX {
        return Err(Error::invalid_argument(
            field,
            "keys beginning with byte 0x00 are reserved for the system",
        ));
    }
    Ok(())
}

/// Checks a scan bound: empty (unbounded) or a valid user key, or one byte
/// longer: a bound is a position, and the one just past a longest key (the
/// key and a zero byte, where a scan that stopped at it goes on) is one byte
/// over the key limit. A bound may not point into the system key space.
pub fn validate_scan_bound(field: &str, key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Ok(());
    }
    if key.len() == KEY_BYTES_MAX + 1 {
        return validate_user_key(field, &key[..KEY_BYTES_MAX]);
    }
    validate_user_key(field, key)
}

/// Renders bytes for people: printable ASCII as is, `\` as `\\`, everything
/// else as `\xNN`. [`parse_escaped`] reverses it.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Parses the `\xNN` / `\\` escapes produced by [`escape`]; other characters
/// are taken as their UTF-8 bytes.
pub fn parse_escaped(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            match bytes.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let hex = s
                        .get(i + 2..i + 4)
                        .ok_or_else(|| format!("incomplete \\x escape at byte {i}"))?;
                    let v = u8::from_str_radix(hex, 16)
                        .map_err(|_| format!("bad \\x escape {hex:?} at byte {i}"))?;
                    out.push(v);
                    i += 4;
                }
                _ => return Err(format!("unknown escape at byte {i}; use \\\\ or \\xNN")),
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The smallest key strictly greater than every key that starts with `prefix`,
/// or `None` when no such key exists (the prefix is all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(parse_escaped(&escape(&all)).unwrap(), all);
        assert_eq!(escape(b"user/\x00\x01"), "user/\\x00\\x01");
    }

    #[test]
    fn user_keys_are_checked() {
        assert!(validate_user_key("key", b"a").is_ok());
        assert!(validate_user_key("key", b"").is_err());
        assert!(validate_user_key("key", b"\x00meta").is_err());
        assert!(validate_user_key("key", &vec![b'a'; KEY_BYTES_MAX]).is_ok());
        assert!(validate_user_key("key", &vec![b'a'; KEY_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn a_scan_may_go_on_just_past_a_longest_key() {
        let mut past = vec![b'a'; KEY_BYTES_MAX];
        past.push(0);
        assert!(validate_scan_bound("start", &past).is_ok());
        assert!(validate_scan_bound("start", b"").is_ok());
        assert!(validate_scan_bound("start", &vec![b'a'; KEY_BYTES_MAX + 2]).is_err());
        let mut system = vec![0u8; KEY_BYTES_MAX];
        system.push(0);
        assert!(validate_scan_bound("start", &system).is_err());
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
