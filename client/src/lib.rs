//! The lmskv client library.
//!
//! A [`Client`] connects to a few seed endpoints, finds the leader from the
//! `NotLeader` hints nodes return, and retries with capped exponential backoff
//! and jitter inside a per-call deadline. Writes carry a request id that stays
//! the same across retries, so a retried write is applied at most once.
//!
//! Writes and STRONG reads go to the leader; reads at weaker levels spread
//! over the replicas and fall back to the leader. A bounded read cache
//! ([`ReadCacheConfig`], on by default) answers EVENTUAL reads and
//! BOUNDED_STALENESS reads whose bound it can prove, and is updated by the
//! client's own writes. Every response grows the client's [`SessionToken`],
//! which a SESSION read turns into read-your-writes on any replica.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lmskv_client::ClientError> {
//! use lmskv_client::{Client, ReadConsistency};
//!
//! let client = Client::builder()
//!     .endpoints(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
//!     .build()?;
//! let written = client.put("user/42", "Ada").await?;
//! let read = client.get("user/42", ReadConsistency::Strong).await?;
//! assert_eq!(read.map(|kv| kv.version), Some(written.version));
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod read_cache;
mod replica_selector;
mod retry;
mod session_token;

pub use client::{
    BatchOp, BatchOutcome, CasOutcome, Client, ClientBuilder, Compare, Durability, GetOutcome,
    KeyValue, ReadConsistency, ScanOptions, ScanPage, ServedBy, WriteOptions, WriteResult,
    ENDPOINTS_MAX, REPLICA_ATTEMPT_TIMEOUT_DEFAULT,
};
pub use error::ClientError;
pub use lmskv_proto::error::{Error as ServerError, LeaderHint};
pub use read_cache::{
    CacheStats, ReadCacheConfig, READ_CACHE_BYTES_MAX_DEFAULT, READ_CACHE_ENTRIES_MAX_DEFAULT,
    READ_CACHE_TTL_DEFAULT, READ_CACHE_TTL_MAX,
};
pub use replica_selector::{REPLICA_SUSPECT_FOR, REPLICA_TRIES_MAX};
pub use retry::RetryPolicy;
pub use session_token::{
    ParseSessionTokenError, SessionToken, ANY_RANGE, SESSION_TOKEN_RANGES_MAX,
};
