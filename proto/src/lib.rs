//! Wire and domain types shared by lmskv clients and nodes.
//!
//! This crate holds the generated protobuf messages and gRPC services (package
//! `lmskv.v1`), the named request limits, key validation, the stable error codes
//! and their single mapping to gRPC status. It performs no I/O.

pub mod error;
pub mod keys;
pub mod limits;
pub mod range;

/// Generated protobuf types and gRPC services of package `lmskv.v1`.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("lmskv.v1");
}

pub use error::{Error, ErrorKind};
