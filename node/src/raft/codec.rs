//! Binary encoding of Raft types for the log, the state and the wire.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes a value with bincode.
pub(crate) fn encode<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Decodes a value encoded by [`encode`]. `what` names it in the error.
pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> std::io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("cannot decode {what}: {e}"),
        )
    })
}
