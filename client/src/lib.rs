//! The lmskv client library.
//!
//! A [`Client`] connects to a few seed endpoints and routes every call by
//! key: it finds the range that holds the key from the meta range (keeping
//! descriptors in an ordered route cache that routing errors heal), sends
//! the request with its view of the range (id and epoch) over one HTTP/2
//! channel per node, and retries with capped exponential backoff and jitter
//! inside a per-call deadline. Writes carry a request id that stays the same
//! across retries, so a retried write is applied at most once.
//!
//! Writes and STRONG reads go to the range's leader; reads at weaker levels
//! spread over the range's replicas and fall back to the leader. Calls over
//! many keys ([`Client::batch_get`], [`Client::batch_put`], [`Client::scan`])
//! cross range boundaries; an atomic [`Client::batch`] stays in one range. A bounded read cache
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

mod admin;
mod bundle;
mod call;
mod client;
mod error;
mod fanout;
mod read_cache;
mod replica_selector;
mod retry;
pub mod route_cache;
mod scan;
mod session_token;

pub use admin::{
    ADMIN_ATTEMPT_TIMEOUT, MOVE_REPLICA_ATTEMPT_TIMEOUT, SPLIT_CONFIRM_WAIT, STATUS_TIMEOUT,
};
pub use bundle::{
    BundleStats, BUNDLE_BYTES_MAX, BUNDLE_CALLS_PER_LANE_MAX, BUNDLE_ITEM_BYTES_MAX,
    BUNDLE_QUEUE_MAX, BUNDLE_REQUESTS_CLIENT_MAX, BUNDLE_SLOT_HOLD_MAX,
};
pub use call::{HELD_ATTEMPT_TIMEOUT_MIN, LOCATE_PREFETCH, META_ATTEMPT_TIMEOUT};
pub use client::{
    BatchOp, BatchOutcome, CasOutcome, Client, ClientBuilder, Compare, Durability, GetOutcome,
    KeyValue, ReadConsistency, ScanOptions, ScanPage, ServedBy, WriteOptions, WriteResult,
    ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN, ATTEMPT_BYTES_FREE, ATTEMPT_BYTES_PER_EXTRA_SECOND,
    CALL_DEADLINE_MAX, ENDPOINTS_MAX, LEADER_ATTEMPT_TIMEOUT_DEFAULT,
    REPLICA_ATTEMPT_TIMEOUT_DEFAULT,
};
pub use error::ClientError;
pub use fanout::{
    BATCH_GET_KEYS_MAX, BATCH_GET_KEYS_PER_REQUEST_MAX, BATCH_PUT_PAIRS_MAX, FANOUT_CONCURRENCY_MAX,
};
pub use lmskv_proto::error::{Error as ServerError, LeaderHint};
pub use lmskv_proto::v1::{
    ClusterSummary, NodeInfo, RangeDescriptor, RangeEpoch, RangeInfo, StatusResponse,
};
pub use read_cache::{
    CacheStats, ReadCacheConfig, READ_CACHE_BYTES_MAX_DEFAULT, READ_CACHE_ENTRIES_MAX_DEFAULT,
    READ_CACHE_TTL_DEFAULT, READ_CACHE_TTL_MAX,
};
pub use replica_selector::{REPLICA_SUSPECTS_MAX, REPLICA_SUSPECT_FOR, REPLICA_TRIES_MAX};
pub use retry::RetryPolicy;
pub use route_cache::{
    LOCATE_DEADLINE, LOCATE_IN_FLIGHT_MAX, LOCATE_WAITING_MAX, NODE_ADDRESSES_MAX,
    ROUTE_CACHE_RANGES_MAX,
};
pub use scan::SCAN_FANOUT_CONCURRENCY_MAX;
pub use session_token::{
    ParseSessionTokenError, SessionBound, SessionToken, SESSION_TOKEN_RANGES_MAX,
};
