//! Cluster versions: when every node may use a change that older binaries
//! cannot follow.
//!
//! A change to what a log entry means must not be used while any replica
//! runs a binary that would apply it differently (or not at all). Each
//! binary knows the highest cluster version it runs ([`CLUSTER_VERSION`]),
//! and a node may be held lower (`--cluster-version-max`). Nodes report
//! theirs in every heartbeat; the placement driver raises the version in
//! force (kept in the meta range) in two steps:
//!
//! 1. once every registered node that is not decommissioned is live and
//!    runs a higher version, it stages the raise: the meta leader refuses
//!    heartbeats of nodes that run less from then on (a node started later
//!    on an older binary is never registered and never gets a replica), and
//!    tells every node in its heartbeat answers to record, durably, that it
//!    must run the new version;
//! 2. once every node reports it recorded that, it writes the new version.
//!
//! A node refuses to start on a data dir that recorded a version above what
//! it runs, so once a version is in force no node goes back below it.
//! Binaries from before cluster versions do not check this: do not run one
//! on a node once the cluster went past version 1.
//!
//! During a rolling upgrade that may still be rolled back, start the
//! upgraded nodes with `--cluster-version-max` at the version the old
//! binary runs; the version stays there until every node runs without it.
//!
//! | version | what it allows |
//! |---|---|
//! | 1 | everything before cluster versions |
//! | 2 | a split starts the new range's log at the split's own index ([`SPLIT_AT_INDEX`]) |
//! | 3 | writes carry their client session's completed mark ([`SESSION_MARKS`]) |

/// The highest cluster version this binary runs.
pub const CLUSTER_VERSION: u32 = 3;

/// The version of a cluster that has never recorded one.
pub const CLUSTER_VERSION_BASE: u32 = 1;

/// From this version on, the range a split creates starts its log at the
/// index of the split's entry in the parent's log, so the version of a key
/// (the index of the entry that wrote it) never goes down across a split,
/// and a compare-and-swap on a version read before the split cannot match a
/// later write of the new range.
pub const SPLIT_AT_INDEX: u32 = 2;

/// From this version on, a leader proposes a write that carries its client
/// session's completed mark (`WriteOptions.completed_below`) as
/// `Op::Session`: applying it refuses requests of the session below the
/// mark and drops their dedup records, which a binary from before it cannot
/// decode.
pub const SESSION_MARKS: u32 = 3;

/// The version a node reports: 0 (a binary from before cluster versions)
/// counts as [`CLUSTER_VERSION_BASE`].
pub fn reported(v: u32) -> u32 {
    v.max(CLUSTER_VERSION_BASE)
}
