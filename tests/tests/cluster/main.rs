//! The suites that run against real multi-process clusters, one module
//! each, built as one test binary: every suite links the same client,
//! harness and gRPC stack, and one binary compiles and links them once.
//! Run one suite with `cargo test -p lmskv-tests --test cluster -- MODULE::`
//! (e.g. `routing::`); the tests run one at a time (`--test-threads=1`).

mod bundle;
mod chaos_short;
mod cli;
mod client_cache;
mod consistency;
mod corruption;
mod failpoints;
mod grouped_writes;
mod linearizability;
mod netns;
mod outcomes;
mod parking;
mod replication;
mod requests;
mod routing;
mod sharding;
