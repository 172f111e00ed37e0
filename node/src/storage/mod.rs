//! The node's storage engine: one RocksDB per node, shared by every range.
//!
//! This is the only module that imports `rocksdb`. It speaks in bytes: Raft
//! log entries, votes and applied states arrive already encoded by
//! `node::raft`, and leave checksummed (see [`value`]). The on-disk layout is
//! defined in [`keys`].

mod budget;
pub mod durability;
mod engine;
mod group_commit;
pub mod keys;
mod snapshot;
pub mod value;

pub use budget::ByteBudget;
pub use engine::{
    ApplyBatch, DedupClock, Engine, EngineOptions, ScanItem, SessionMark, APPLIED_FLUSH_AFTER,
    DEDUP_PURGE_GRACE_MS,
};
pub use group_commit::{Foreground, SyncCallback};
pub use snapshot::{SnapshotExport, SNAPSHOT_CHUNK_BYTES};
pub use value::StoredValue;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Stored bytes failed a checksum or could not be decoded: the data must not be served.
    #[error("corruption: {0}")]
    Corruption(String),
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The engine is shutting down.
    #[error("storage is shutting down")]
    Closed,
    /// A snapshot import was stopped because its replica is being removed.
    #[error("snapshot import stopped: the replica is being removed")]
    Aborted,
}

impl StorageError {
    /// Whether the error means stored data is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, StorageError::Corruption(_))
    }
}

impl From<rocksdb::Error> for StorageError {
    fn from(e: rocksdb::Error) -> Self {
        if e.kind() == rocksdb::ErrorKind::Corruption {
            StorageError::Corruption(e.to_string())
        } else {
            StorageError::Rocks(e.to_string())
        }
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(e) => e,
            StorageError::Corruption(m) => std::io::Error::new(std::io::ErrorKind::InvalidData, m),
            other => std::io::Error::other(other.to_string()),
        }
    }
}
