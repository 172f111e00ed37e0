//! Checksummed encodings of what the node stores: user values (with their
//! version) and framed metadata records.
//!
//! A user value is stored as `crc32 BE(4) · version BE(8) · value`, where the
//! crc covers the key, the version and the value, so a value read back under
//! the wrong key or with a flipped bit is detected, never served.

use bytes::Bytes;

use super::StorageError;

/// A user value as stored, with its version (the log index of its last write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The log index of the key's last write.
    pub version: u64,
    /// The value bytes.
    pub value: Bytes,
}

fn value_crc(key: &[u8], version: u64, value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(&version.to_be_bytes());
    h.update(value);
    h.finalize()
}

/// Encodes a user value for storage under `key`.
pub fn encode_value(key: &[u8], version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + value.len());
    out.extend_from_slice(&value_crc(key, version, value).to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Decodes and verifies a stored user value read under `key`.
pub fn decode_value(key: &[u8], raw: &[u8]) -> Result<StoredValue, StorageError> {
    if raw.len() < 12 {
        return Err(StorageError::Corruption(format!(
            "stored value of {} bytes is shorter than its header",
            raw.len()
        )));
    }
    let crc = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes"));
    let version = u64::from_be_bytes(raw[4..12].try_into().expect("8 bytes"));
    let value = &raw[12..];
    if value_crc(key, version, value) != crc {
        return Err(StorageError::Corruption(format!(
            "checksum mismatch in value of key {}",
            lmskv_proto::keys::escape(&key[..key.len().min(64)])
        )));
    }
    Ok(StoredValue {
        version,
        value: Bytes::copy_from_slice(value),
    })
}

/// Frames a metadata record (Raft log entry, vote, applied state) with a crc32.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Verifies a [`frame`]d record and returns its payload. `what` names the
/// record in the error.
pub fn unframe<'a>(what: &str, raw: &'a [u8]) -> Result<&'a [u8], StorageError> {
    if raw.len() < 4 {
        return Err(StorageError::Corruption(format!(
            "{what}: record too short"
        )));
    }
    let crc = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes"));
    let payload = &raw[4..];
    if crc32fast::hash(payload) != crc {
        return Err(StorageError::Corruption(format!(
            "{what}: checksum mismatch"
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trips_and_detects_every_flipped_byte() {
        let raw = encode_value(b"k", 7, b"hello");
        assert_eq!(
            decode_value(b"k", &raw).unwrap(),
            StoredValue {
                version: 7,
                value: Bytes::from_static(b"hello")
            }
        );
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(decode_value(b"k", &bad).is_err(), "flip at {i} undetected");
        }
        assert!(decode_value(b"other", &raw).is_err());
    }

    #[test]
    fn frames_detect_corruption() {
        let f = frame(b"payload");
        assert_eq!(unframe("t", &f).unwrap(), b"payload");
        let mut bad = f.clone();
        bad[6] ^= 1;
        assert!(unframe("t", &bad).is_err());
    }
}
