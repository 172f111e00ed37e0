//! Range ids, the reserved meta range, and key-span rules shared by the node
//! and the client.
//!
//! The key space is cut into ranges `[start_key, end_key)`; an empty `end_key`
//! means "to the end of the key space". The meta range (id 1) owns the system
//! span `["", "\x01")`, every user key (first byte ≥ 0x01) lives in a user range.

use crate::v1::{RangeDescriptor, RangeEpoch};

/// The id of the meta range, which holds the node registry and every range
/// descriptor.
pub const META_RANGE_ID: u64 = 1;
/// The first key of the user key space; the meta range ends here.
pub const USER_SPACE_START: &[u8] = &[0x01];
/// The id of the first user range a new cluster creates.
pub const FIRST_USER_RANGE_ID: u64 = 2;

/// Whether `key` lies in `[start, end)` (an empty `end` is unbounded).
pub fn span_contains(start: &[u8], end: &[u8], key: &[u8]) -> bool {
    start <= key && (end.is_empty() || key < end)
}

/// Whether `desc` covers `key`.
pub fn contains(desc: &RangeDescriptor, key: &[u8]) -> bool {
    span_contains(&desc.start_key, &desc.end_key, key)
}

/// The epoch of a descriptor (zero when absent).
pub fn epoch(desc: &RangeDescriptor) -> RangeEpoch {
    desc.epoch.unwrap_or_default()
}

/// Whether descriptor `a` is newer than `b` (for the same range): a later
/// split version, or the same version with a later replica configuration.
pub fn is_newer(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    let (ea, eb) = (epoch(a), epoch(b));
    (ea.version, ea.conf_ver) > (eb.version, eb.conf_ver)
}

/// Whether two spans overlap.
pub fn spans_overlap(a: (&[u8], &[u8]), b: (&[u8], &[u8])) -> bool {
    let a_before_b_end = b.1.is_empty() || a.0 < b.1;
    let b_before_a_end = a.1.is_empty() || b.0 < a.1;
    a_before_b_end && b_before_a_end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_contain_and_overlap() {
        assert!(span_contains(b"a", b"c", b"b"));
        assert!(!span_contains(b"a", b"c", b"c"));
        assert!(span_contains(b"a", b"", b"zzz"));
        assert!(spans_overlap((b"a", b"c"), (b"b", b"")));
        assert!(!spans_overlap((b"a", b"c"), (b"c", b"d")));
        assert!(spans_overlap((b"", b""), (b"x", b"y")));
    }
}
