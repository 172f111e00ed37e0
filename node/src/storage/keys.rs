//! The map of the on-disk key space: every column family and key prefix the
//! node writes is defined here and nowhere else.
//!
//! | column family | key                                   | value                                   |
//! |---------------|---------------------------------------|-----------------------------------------|
//! | `data`        | user key (bytes as given)             | [`crate::storage::value`] encoding      |
//! | `raft_log`    | range_id BE(8) · index BE(8)          | crc32 BE(4) · encoded log entry         |
//! | `raft_state`  | range_id BE(8) · field(1)             | crc32 BE(4) · encoded vote/committed/purged |
//! | `raft_state`  | `0xff 0xff` · `node`                  | crc32 BE(4) · node identity             |
//! | `range_state` | range_id BE(8) · field(1)             | crc32 BE(4) · applied state, markers    |
//! | `range_state` | range_id BE(8) · `0x10` · request id  | crc32 BE(4) · expiry BE(8) · dedup record |
//! | `range_state` | range_id BE(8) · `0x0f` · session(8)  | crc32 BE(4) · expiry BE(8) · completed mark BE(8) |
//!
//! Data keys carry no range id: ranges partition the user key space, so a
//! range's data is the key span `[start_key, end_key)` of the `data` family.

use lmskv_proto::limits::KEY_BYTES_MAX;

/// Column family holding user data.
pub const CF_DATA: &str = "data";
/// Column family holding the Raft logs of all ranges.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Column family holding each range's vote, committed and purged log ids.
pub const CF_RAFT_STATE: &str = "raft_state";
/// Column family holding each range's applied state, markers and dedup table.
pub const CF_RANGE_STATE: &str = "range_state";

/// Every column family, in the order they are opened.
pub const ALL_CFS: [&str; 4] = [CF_DATA, CF_RAFT_LOG, CF_RAFT_STATE, CF_RANGE_STATE];

/// Fields of a range's Raft state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftStateField {
    /// The last vote cast or granted.
    Vote = 1,
    /// The last committed log id (an optimisation; may lag).
    Committed = 2,
    /// The last purged log id.
    Purged = 3,
}

/// Fields of a range's state-machine state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RangeStateField {
    /// The applied log id and membership, written with every apply.
    Applied = 1,
    /// Set while a snapshot is being installed; names the snapshot file.
    InstallingSnapshot = 3,
    /// Set when the range was removed from this node.
    Tombstone = 4,
}

/// Session marks sort before dedup records: a flushed file of the family
/// then ends at the range's newest record, and the lookup of a new request
/// id (which sorts after every record of its session) skips the files
/// without probing their bloom filters.
const SESSION_MARK: u8 = 0x0f;
const DEDUP_RECORD: u8 = 0x10;

/// Key of one Raft log entry.
pub fn raft_log_key(range_id: u64, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes the index from a [`raft_log_key`], checking that it belongs to `range_id`.
pub fn raft_log_index(range_id: u64, key: &[u8]) -> Option<u64> {
    if key.len() != 16 || key[..8] != range_id.to_be_bytes() {
        return None;
    }
    Some(u64::from_be_bytes(key[8..].try_into().ok()?))
}

/// Key of one field of a range's Raft state.
pub fn raft_state_key(range_id: u64, field: RaftStateField) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8] = field as u8;
    k
}

/// Key of the node's identity record.
pub const NODE_IDENTITY_KEY: &[u8] = b"\xff\xffnode";

/// Key of one field of a range's state-machine state.
pub fn range_state_key(range_id: u64, field: RangeStateField) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8] = field as u8;
    k
}

/// The range id of a dedup record's or session mark's key, when `key` is
/// one (both expire alike, see `dedup_span`).
pub fn dedup_key_range(key: &[u8]) -> Option<u64> {
    if key.len() < 9 || !matches!(key[8], DEDUP_RECORD | SESSION_MARK) {
        return None;
    }
    Some(u64::from_be_bytes(key[..8].try_into().ok()?))
}

/// Key of a dedup record for a client request id.
pub fn dedup_key(range_id: u64, request_id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + request_id.len());
    k.extend_from_slice(&range_id.to_be_bytes());
    k.push(DEDUP_RECORD);
    k.extend_from_slice(request_id);
    k
}

/// Key of a client session's completed mark (see `Op::Session`).
pub fn session_mark_key(range_id: u64, session: &[u8; 8]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8] = SESSION_MARK;
    k[9..].copy_from_slice(session);
    k
}

/// The span of a range's dedup table in `range_state`: its session marks,
/// then its dedup records. Snapshots carry it, a split copies it, and the
/// compaction filter drops its expired entries, all alike.
pub fn dedup_span(range_id: u64) -> (Vec<u8>, Vec<u8>) {
    let mut start = range_id.to_be_bytes().to_vec();
    start.push(SESSION_MARK);
    let mut end = range_id.to_be_bytes().to_vec();
    end.push(DEDUP_RECORD + 1);
    (start, end)
}

/// An exclusive upper bound above every valid data key, used where a range's
/// `end_key` is empty ("to the end of the key space").
pub fn data_key_space_end() -> Vec<u8> {
    vec![0xff; KEY_BYTES_MAX + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_range_then_index() {
        assert!(raft_log_key(1, 9) < raft_log_key(1, 10));
        assert!(raft_log_key(1, u64::MAX) < raft_log_key(2, 0));
        assert_eq!(raft_log_index(7, &raft_log_key(7, 42)), Some(42));
        assert_eq!(raft_log_index(8, &raft_log_key(7, 42)), None);
    }

    #[test]
    fn dedup_keys_stay_inside_their_span() {
        let (s, e) = dedup_span(3);
        let k = dedup_key(3, b"req");
        assert!(s.as_slice() <= k.as_slice() && k.as_slice() < e.as_slice());
        assert_eq!(dedup_key_range(&k), Some(3));
        let m = session_mark_key(3, b"sessionA");
        assert!(s.as_slice() <= m.as_slice() && m.as_slice() < e.as_slice());
        assert!(m.to_vec() < k, "marks sort before records");
        assert_eq!(dedup_key_range(&m), Some(3));
        let (s4, _) = dedup_span(4);
        assert!(e <= s4, "spans of ranges do not overlap");
        let applied = range_state_key(3, RangeStateField::Applied);
        assert!(!(s.as_slice() <= applied.as_slice() && applied.as_slice() < e.as_slice()));
        assert_eq!(dedup_key_range(&applied), None);
    }

    #[test]
    fn key_space_end_is_above_every_key() {
        let max_key = vec![0xff; KEY_BYTES_MAX];
        assert!(max_key < data_key_space_end());
    }
}
