//! The lmskv client library.
//!
//! A [`Client`] connects to a few seed endpoints, finds the leader from the
//! `NotLeader` hints nodes return, and retries with capped exponential backoff
//! and jitter inside a per-call deadline. Writes carry a request id that stays
//! the same across retries, so a retried write is applied at most once.
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
mod retry;

pub use client::{
    BatchOp, BatchOutcome, CasOutcome, Client, ClientBuilder, Compare, Durability, KeyValue,
    ReadConsistency, ScanOptions, ScanPage, WriteOptions, WriteResult,
};
pub use error::ClientError;
pub use lmskv_proto::error::{Error as ServerError, LeaderHint};
pub use retry::RetryPolicy;
