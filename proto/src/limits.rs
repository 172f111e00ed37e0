//! Named request limits, enforced by nodes and checked early by clients.
//!
//! Input beyond a limit is rejected with `InvalidArgument` and nothing is written.

/// Largest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 4 * 1024;
/// Largest value accepted, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most operations (puts, deletes) in one atomic batch.
pub const BATCH_OPS_MAX: usize = 1_000;
/// Most conditions in one atomic batch.
pub const BATCH_CONDITIONS_MAX: usize = 100;
/// Largest total of key and value bytes in one atomic batch.
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest number of pairs one scan page may return.
pub const SCAN_LIMIT_MAX: u32 = 10_000;
/// Pairs returned by a scan page that sets no limit.
pub const SCAN_LIMIT_DEFAULT: u32 = 1_000;
/// Most bytes of keys and values one scan page returns before it stops early.
pub const SCAN_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest client request id, in bytes.
pub const REQUEST_ID_BYTES_MAX: usize = 64;
/// Most requests in one bundle (`Kv.Bundle`).
pub const BUNDLE_REQUESTS_MAX: usize = 1_024;
/// Encoded bytes of answers one bundle response message gathers before the
/// rest go in the next (an answer larger than this goes alone), so that many
/// large answers ready at once never make one message over the gRPC limit.
pub const BUNDLE_RESPONSE_BYTES_TARGET: usize = 4 * 1024 * 1024;
/// Largest gRPC message a node or client accepts, in bytes.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
