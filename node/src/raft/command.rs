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
    /// Split the range at `split_key`: the range keeps `[start, split_key)`
    /// and a new range `new_range_id` takes `[split_key, end)` with the same
    /// replicas. Refused (no change) unless `version` is the range's current
    /// epoch version and the key lies strictly inside the range.
    Split {
        split_key: Bytes,
        new_range_id: u64,
        version: u64,
    },
    /// Independent client writes proposed together as one log entry (see
    /// `raft::proposals`). Each keeps its own request id, is deduplicated on
    /// its own and gets its own response; no two touch the same key, so each
    /// key's version (the entry's index) still names one write. Never holds
    /// a split or another group.
    Group(Vec<Command>),
    /// A [`Op::Split`] whose new range starts its log at the index of this
    /// entry instead of at `SPLIT_INIT_LOG_INDEX`, so its keys' versions
    /// never go down (cluster version 2, `crate::version::SPLIT_AT_INDEX`:
    /// a binary from before it cannot decode this entry, and must not run a
    /// replica of a range that may get one).
    SplitAtIndex {
        split_key: Bytes,
        new_range_id: u64,
        version: u64,
    },
    /// A client write (`op`: never a split, a group or another session)
    /// whose 16-byte request id is a client session (8 bytes) and a sequence
    /// number (big-endian), sent with the session's completed mark: the
    /// client has the outcome of, or gave up on, every request of the
    /// session numbered below `completed_below`. Applying it refuses a
    /// request of the session numbered below the highest mark the range
    /// applied ([`CommandResponse::Superseded`], nothing applied) and drops
    /// the dedup records below it, so a range keeps records only for
    /// requests still in flight (cluster version 3,
    /// `crate::version::SESSION_MARKS`).
    Session { completed_below: u64, op: Box<Op> },
}

/// What a range replica knows about its own range: the span and the epoch.
/// The replica set is the range's Raft membership. Replicated: it changes only
/// by applying log entries (splits bump `version`, membership changes
/// `conf_ver`), so every replica has the same one at the same log position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeMeta {
    pub range_id: u64,
    pub start: Bytes,
    /// Exclusive end; empty: to the end of the key space.
    pub end: Bytes,
    pub version: u64,
    pub conf_ver: u64,
    /// Voters and learners of the applied membership config (the one
    /// `conf_ver` counts; a joint config lists both halves). Not stored with
    /// the span: derived from the applied membership when it is loaded.
    #[serde(skip)]
    pub voters: Vec<u64>,
    #[serde(skip)]
    pub learners: Vec<u64>,
}

impl RangeMeta {
    /// Whether the range holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        lmskv_proto::range::span_contains(&self.start, &self.end, key)
    }
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
    /// The split happened (`Ok` with both halves) or was refused (`Err`, why).
    Split(Result<(RangeMeta, RangeMeta), String>),
    /// The write touches keys the range no longer holds (it split after the
    /// write was proposed); nothing was applied.
    KeyNotInRange,
    /// The responses of an [`Op::Group`]'s commands, in order.
    Group(Vec<CommandResponse>),
    /// The write's request id is below its session's completed mark (see
    /// [`Op::Session`]): the client already had its outcome or gave up on
    /// it, so this is a late copy; nothing was applied.
    Superseded,
}

/// The client session and sequence number of a request id made of both
/// (see [`Op::Session`]): 16 bytes, the sequence number big-endian.
pub fn session_of(request_id: &[u8]) -> Option<([u8; 8], u64)> {
    let id: &[u8; 16] = request_id.try_into().ok()?;
    let (session, seq) = id.split_at(8);
    Some((
        session.try_into().expect("8 bytes"),
        u64::from_be_bytes(seq.try_into().expect("8 bytes")),
    ))
}

impl Op {
    /// Whether the operation splits the range.
    pub fn is_split(&self) -> bool {
        matches!(self, Op::Split { .. } | Op::SplitAtIndex { .. })
    }

    /// Every user key the operation reads or writes.
    pub fn keys(&self) -> Box<dyn Iterator<Item = &Bytes> + '_> {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => Box::new(std::iter::once(key)),
            Op::CompareAndSwap { compare, .. } => Box::new(std::iter::once(&compare.key)),
            Op::Batch { conditions, ops } => Box::new(conditions.iter().map(|c| &c.key).chain(
                ops.iter().map(|o| match o {
                    WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
                }),
            )),
            Op::Split { .. } | Op::SplitAtIndex { .. } => Box::new(std::iter::empty()),
            Op::Group(cmds) => Box::new(cmds.iter().flat_map(|c| c.op.keys())),
            Op::Session { op, .. } => op.keys(),
        }
    }

    /// Bytes of keys and values the operation carries (what it adds to a
    /// log entry, roughly).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
            Op::CompareAndSwap { compare, new_value } => {
                compare.payload_bytes() + new_value.as_ref().map_or(0, |v| v.len())
            }
            Op::Batch { conditions, ops } => {
                conditions
                    .iter()
                    .map(Condition::payload_bytes)
                    .sum::<usize>()
                    + ops
                        .iter()
                        .map(|o| match o {
                            WriteOp::Put { key, value } => key.len() + value.len(),
                            WriteOp::Delete { key } => key.len(),
                        })
                        .sum::<usize>()
            }
            Op::Split { split_key, .. } | Op::SplitAtIndex { split_key, .. } => split_key.len(),
            Op::Group(cmds) => cmds
                .iter()
                .map(|c| c.request_id.len() + c.op.payload_bytes())
                .sum(),
            Op::Session { op, .. } => op.payload_bytes(),
        }
    }
}

impl Condition {
    fn payload_bytes(&self) -> usize {
        self.key.len()
            + match &self.expect {
                Expect::Value(v) => v.len(),
                Expect::Version(_) => 8,
            }
    }

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
            Op::Split {
                split_key,
                new_range_id,
                ..
            }
            | Op::SplitAtIndex {
                split_key,
                new_range_id,
                ..
            } => write!(f, "split at {} into range {new_range_id}", key(split_key)),
            Op::Group(cmds) => write!(f, "group of {} writes", cmds.len()),
            Op::Session {
                completed_below,
                op,
            } => {
                let inner = Command {
                    request_id: self.request_id.clone(),
                    proposed_at_ms: self.proposed_at_ms,
                    op: (**op).clone(),
                };
                write!(f, "{inner} (session mark {completed_below})")
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
