//! Replication: one openraft group per range, on the node's storage engine.
//!
//! This is the only module that imports `openraft`. It turns Raft log entries,
//! votes and snapshots into the byte records `node::storage` persists, runs
//! the state machine that applies commands, carries Raft messages between
//! nodes over gRPC, and exposes [`RangeReplica`] to the services.

mod codec;
pub mod command;
mod log_store;
mod network;
pub mod proposals;
mod replica;
pub mod runtime;
mod service;
mod state_machine;
#[cfg(test)]
mod store_suite;
mod stream;

pub use network::{ChannelMaker, PeerPool, APPEND_PIPELINE_MAX, RAFT_RPC_TIMEOUT_MIN};
pub use proposals::PROPOSALS_IN_FLIGHT_MAX;
pub use replica::{RaftTuning, RangeReplica, ReadLevel, ReplicaMap, ReplicaStatus, SpanMismatch};
pub use service::RaftService;

openraft::declare_raft_types!(
    /// The Raft type configuration of an lmskv range.
    pub TypeConfig:
        D = command::Command,
        R = command::CommandResponse,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        AsyncRuntime = runtime::NodeRuntime,
);
