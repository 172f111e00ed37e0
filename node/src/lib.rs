//! The lmskv storage node.
//!
//! A node keeps one RocksDB ([`storage`]), replicates each range through its
//! own Raft group ([`raft`]) and serves the `Kv`, `Admin` and `Raft` gRPC
//! services ([`server`]). [`node::Node`] ties them together and forms or
//! joins a cluster; `main.rs` is the `lmskv-node` binary.

pub mod config;
pub mod failpoints;
pub mod meta;
pub mod node;
pub mod pd;
pub mod raft;
pub mod server;
pub mod storage;
pub mod version;
