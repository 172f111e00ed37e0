//! The commands a range's Raft log carries and what applying them returns.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One replicated write. Its `request_id` makes a retried write apply at most
/// once: the state machine remembers each id's outcome for a while and returns
/// it again instead of re-executing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Client-chosen id of the logical request; empty when the client set none.
    pub request_id: Bytes,
    /// The leader's wall clock when it proposed the command (ms since the
    /// epoch). Replicas use it, not their own clocks, to expire dedup records,
    /// so every replica expires the same ones.
    pub proposed_at_ms: u64,
    /// What to do.
    pub op: Op,
}

/// A write operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set a key.
    Put { key: Bytes, value: Bytes },
    /// Remove a key.
    Delete { key: Bytes },
    /// Set (or delete, when `new_value` is `None`) a key if a condition holds.
    CompareAndSwap {
        compare: Condition,
        new_value: Option<Bytes>,
    },
    /// Apply all `ops` if every condition holds, else nothing.
    Batch {
        conditions: Vec<Condition>,
        ops: Vec<WriteOp>,
    },
}

/// One write inside a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    Put { key: Bytes, value: Bytes },
    Delete { key: Bytes },
}

/// A condition on a key's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub key: Bytes,
    pub expect: Expect,
}

/// What a [`Condition`] expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The current value equals this (a missing key never matches).
    Value(Bytes),
    /// The current version equals this; 0 means the key is absent.
    Version(u64),
}

/// A key's state as returned to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRecord {
    pub key: Bytes,
    pub value: Bytes,
    pub version: u64,
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    /// Entries that are not client commands (blank, membership).
    #[default]
    None,
    Put {
        version: u64,
    },
    Delete {
        deleted: bool,
    },
    CompareAndSwap {
        succeeded: bool,
        current: Option<KvRecord>,
    },
    Batch {
        succeeded: bool,
        current: Vec<KvRecord>,
        version: u64,
    },
}

impl Condition {
    /// Whether the condition holds for a key whose current state is `current`
    /// (`None`: the key does not exist).
    pub fn holds(&self, current: Option<(&[u8], u64)>) -> bool {
        match (&self.expect, current) {
            (Expect::Version(0), None) => true,
            (Expect::Version(v), Some((_, cur))) => *v == cur,
            (Expect::Value(want), Some((cur, _))) => want.as_ref() == cur,
            _ => false,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = |k: &Bytes| lmskv_proto::keys::escape(&k[..k.len().min(32)]);
        match &self.op {
            Op::Put { key: k, value } => write!(f, "put {} ({} bytes)", key(k), value.len()),
            Op::Delete { key: k } => write!(f, "delete {}", key(k)),
            Op::CompareAndSwap { compare, .. } => write!(f, "cas {}", key(&compare.key)),
            Op::Batch { conditions, ops } => {
                write!(
                    f,
                    "batch of {} ops, {} conditions",
                    ops.len(),
                    conditions.len()
                )
            }
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_their_rules() {
        let c = |e| Condition {
            key: Bytes::from_static(b"k"),
            expect: e,
        };
        assert!(c(Expect::Version(0)).holds(None));
        assert!(!c(Expect::Version(0)).holds(Some((b"v", 3))));
        assert!(c(Expect::Version(3)).holds(Some((b"v", 3))));
        assert!(!c(Expect::Version(4)).holds(Some((b"v", 3))));
        assert!(c(Expect::Value(Bytes::from_static(b"v"))).holds(Some((b"v", 3))));
        assert!(!c(Expect::Value(Bytes::from_static(b"v"))).holds(None));
    }
}
