//! The meta range's content (range 1, system keys starting with `0x00`): the
//! node registry, every range descriptor and the placement driver's pending
//! operations, read and written through the meta range's own Raft group.
//!
//! | key                           | value (JSON)            |
//! |-------------------------------|-------------------------|
//! | `0x00 desc/` · start key      | [`StoredDesc`]          |
//! | `0x00 node/` · node id BE(8)  | [`NodeRecord`]          |
//! | `0x00 pd/next_range_id`       | next free range id      |
//! | `0x00 pd/op/` · range id BE(8)| [`PendingOp`]           |
//! | `0x00 pd/cluster_version`     | the cluster version in force (absent: 1; see `crate::version`) |

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::keys::prefix_end;
use lmskv_proto::range::{FIRST_USER_RANGE_ID, META_RANGE_ID};
use lmskv_proto::v1::{RangeDescriptor, RangeEpoch, Replica, ReplicaRole};
use serde::{Deserialize, Serialize};

use crate::raft::command::{CommandResponse, Condition, Expect, Op, RangeMeta, WriteOp};
use crate::raft::{RangeReplica, ReadLevel};

const DESC_PREFIX: &[u8] = b"\x00desc/";
const NODE_PREFIX: &[u8] = b"\x00node/";
const NEXT_RANGE_ID_KEY: &[u8] = b"\x00pd/next_range_id";
const OP_PREFIX: &[u8] = b"\x00pd/op/";
const CLUSTER_VERSION_KEY: &[u8] = b"\x00pd/cluster_version";
/// Records read per engine scan page of the meta range.
const META_SCAN_PAGE: usize = 1_000;
/// Attempts of a conditional meta write that lost a race.
const META_CAS_ATTEMPTS_MAX: usize = 8;

/// A range descriptor as the meta range stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDesc {
    pub range_id: u64,
    pub start: Bytes,
    pub end: Bytes,
    pub version: u64,
    pub conf_ver: u64,
    pub voters: Vec<u64>,
    #[serde(default)]
    pub learners: Vec<u64>,
}

impl StoredDesc {
    /// The descriptor of `meta` with the given replica set.
    pub fn new(meta: &RangeMeta, voters: Vec<u64>, learners: Vec<u64>) -> Self {
        StoredDesc {
            range_id: meta.range_id,
            start: meta.start.clone(),
            end: meta.end.clone(),
            version: meta.version,
            conf_ver: meta.conf_ver,
            voters,
            learners,
        }
    }

    /// Whether this descriptor is newer than `other` (same range).
    pub fn newer_than(&self, other: &StoredDesc) -> bool {
        (self.version, self.conf_ver) > (other.version, other.conf_ver)
    }

    /// Whether the range holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        lmskv_proto::range::span_contains(&self.start, &self.end, key)
    }

    /// The wire form.
    pub fn to_proto(&self) -> RangeDescriptor {
        let mut replicas: Vec<Replica> = self
            .voters
            .iter()
            .map(|id| Replica {
                node_id: *id,
                role: ReplicaRole::Voter as i32,
            })
            .collect();
        replicas.extend(self.learners.iter().map(|id| Replica {
            node_id: *id,
            role: ReplicaRole::Learner as i32,
        }));
        RangeDescriptor {
            range_id: self.range_id,
            start_key: self.start.clone(),
            end_key: self.end.clone(),
            epoch: Some(RangeEpoch {
                conf_ver: self.conf_ver,
                version: self.version,
            }),
            replicas,
        }
    }

    /// From the wire form.
    pub fn from_proto(d: &RangeDescriptor) -> Self {
        let e = d.epoch.unwrap_or_default();
        let role = |r: &Replica, want: ReplicaRole| r.role == want as i32;
        StoredDesc {
            range_id: d.range_id,
            start: d.start_key.clone(),
            end: d.end_key.clone(),
            version: e.version,
            conf_ver: e.conf_ver,
            voters: d
                .replicas
                .iter()
                .filter(|r| role(r, ReplicaRole::Voter))
                .map(|r| r.node_id)
                .collect(),
            learners: d
                .replicas
                .iter()
                .filter(|r| role(r, ReplicaRole::Learner))
                .map(|r| r.node_id)
                .collect(),
        }
    }
}

/// What the registry says about a node (liveness is not stored: the meta
/// leader derives "down" from heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Decommissioning,
    Decommissioned,
}

/// One node in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: u64,
    pub address: String,
    pub state: NodeState,
}

/// A replica change the placement driver started and has not finished; a
/// new meta leader finishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    pub range_id: u64,
    /// The voter set the range must end with.
    pub voters: Vec<u64>,
    /// Why (for logs and status).
    pub reason: String,
}

fn desc_key(start: &[u8]) -> Vec<u8> {
    let mut k = DESC_PREFIX.to_vec();
    k.extend_from_slice(start);
    k
}

fn node_key(id: u64) -> Vec<u8> {
    let mut k = NODE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn op_key(range_id: u64) -> Vec<u8> {
    let mut k = OP_PREFIX.to_vec();
    k.extend_from_slice(&range_id.to_be_bytes());
    k
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("meta records serialize"))
}

/// Reads and writes the meta range through its local replica, which must be
/// the leader.
#[derive(Debug, Clone)]
pub struct MetaStore {
    replica: Arc<RangeReplica>,
}

impl MetaStore {
    /// The local meta replica this store reads and writes through.
    pub fn replica(&self) -> &Arc<RangeReplica> {
        &self.replica
    }

    /// Meta access through `replica` (the local replica of range 1).
    pub fn new(replica: Arc<RangeReplica>) -> Self {
        debug_assert_eq!(replica.range_id(), META_RANGE_ID);
        MetaStore { replica }
    }

    /// Confirms leadership (lease read) so the following reads are current.
    pub async fn barrier(&self) -> Result<(), Error> {
        self.replica
            .read_barrier(ReadLevel::Strong)
            .await
            .map(|_| ())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes, u64)>, Error> {
        let end = prefix_end(prefix).unwrap_or_default();
        let mut start = prefix.to_vec();
        let mut out = Vec::new();
        loop {
            let (items, more) = self
                .replica
                .engine()
                .scan(&start, &end, META_SCAN_PAGE, false, usize::MAX)
                .map_err(|e| self.replica.refuse(&e))?;
            for i in &items {
                out.push((i.key.clone(), i.value.value.clone(), i.value.version));
            }
            match (more, items.last()) {
                (true, Some(last)) => {
                    start = last.key.to_vec();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<(Bytes, u64)>, Error> {
        Ok(self
            .replica
            .engine()
            .get(key)
            .map_err(|e| self.replica.refuse(&e))?
            .map(|v| (v.value, v.version)))
    }

    async fn write(&self, conditions: Vec<Condition>, ops: Vec<WriteOp>) -> Result<bool, Error> {
        let (_, resp) = self
            .replica
            .propose(Bytes::new(), Op::Batch { conditions, ops }, false)
            .await?;
        match resp {
            CommandResponse::Batch { succeeded, .. } => Ok(succeeded),
            other => Err(Error::internal(format!("meta write returned {other:?}"))),
        }
    }

    /// Every range descriptor, in key order.
    pub fn descriptors(&self) -> Result<Vec<StoredDesc>, Error> {
        self.scan_prefix(DESC_PREFIX)?
            .into_iter()
            .map(|(_, v, _)| {
                serde_json::from_slice(&v)
                    .map_err(|e| Error::internal(format!("bad descriptor in meta: {e}")))
            })
            .collect()
    }

    /// Every registered node.
    pub fn nodes(&self) -> Result<BTreeMap<u64, NodeRecord>, Error> {
        let mut out = BTreeMap::new();
        for (_, v, _) in self.scan_prefix(NODE_PREFIX)? {
            let r: NodeRecord = serde_json::from_slice(&v)
                .map_err(|e| Error::internal(format!("bad node record in meta: {e}")))?;
            out.insert(r.node_id, r);
        }
        Ok(out)
    }

    /// Pending placement operations.
    pub fn pending_ops(&self) -> Result<Vec<PendingOp>, Error> {
        self.scan_prefix(OP_PREFIX)?
            .into_iter()
            .map(|(_, v, _)| {
                serde_json::from_slice(&v)
                    .map_err(|e| Error::internal(format!("bad pending op in meta: {e}")))
            })
            .collect()
    }

    /// Records a pending operation (replacing one for the same range).
    pub async fn put_op(&self, op: &PendingOp) -> Result<(), Error> {
        self.write(
            vec![],
            vec![WriteOp::Put {
                key: Bytes::from(op_key(op.range_id)),
                value: json(op),
            }],
        )
        .await
        .map(|_| ())
    }

    /// Removes a pending operation.
    pub async fn delete_op(&self, range_id: u64) -> Result<(), Error> {
        self.write(
            vec![],
            vec![WriteOp::Delete {
                key: Bytes::from(op_key(range_id)),
            }],
        )
        .await
        .map(|_| ())
    }

    /// Writes each descriptor that is newer than what meta holds for its
    /// start key (or new). Conditional on the versions read, so concurrent
    /// writers never regress a descriptor. Returns how many were written.
    pub async fn upsert_descriptors(&self, descs: &[StoredDesc]) -> Result<usize, Error> {
        for _ in 0..META_CAS_ATTEMPTS_MAX {
            let mut conditions = Vec::new();
            let mut ops = Vec::new();
            for d in descs {
                let key = Bytes::from(desc_key(&d.start));
                let cur = self.get(&key)?;
                let newer = match &cur {
                    Some((raw, _)) => match serde_json::from_slice::<StoredDesc>(raw) {
                        Ok(old) if old.range_id == d.range_id => d.newer_than(&old),
                        // Another range at this start key: the later split wins.
                        Ok(old) => d.version > old.version,
                        Err(_) => true,
                    },
                    None => true,
                };
                if !newer {
                    continue;
                }
                conditions.push(Condition {
                    key: key.clone(),
                    expect: Expect::Version(cur.as_ref().map(|(_, v)| *v).unwrap_or(0)),
                });
                ops.push(WriteOp::Put {
                    key,
                    value: json(d),
                });
            }
            if ops.is_empty() {
                return Ok(0);
            }
            let n = ops.len();
            if self.write(conditions, ops).await? {
                return Ok(n);
            }
        }
        Err(Error::unavailable("meta descriptors kept changing; retry"))
    }

    /// Registers or updates a node record.
    pub async fn put_node(&self, rec: &NodeRecord) -> Result<(), Error> {
        self.write(
            vec![],
            vec![WriteOp::Put {
                key: Bytes::from(node_key(rec.node_id)),
                value: json(rec),
            }],
        )
        .await
        .map(|_| ())
    }

    /// The cluster version in force, with the version of its record (0:
    /// none, the cluster never raised it from version 1).
    pub fn cluster_version(&self) -> Result<(u32, u64), Error> {
        match self.get(CLUSTER_VERSION_KEY)? {
            None => Ok((crate::version::CLUSTER_VERSION_BASE, 0)),
            Some((raw, version)) => std::str::from_utf8(&raw)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
                .map(|v| (v, version))
                .ok_or_else(|| Error::internal("bad cluster version in meta")),
        }
    }

    /// Raises the cluster version to `to` if its record is still at
    /// `record_version` (as [`MetaStore::cluster_version`] read it);
    /// whether it did.
    pub async fn raise_cluster_version(&self, to: u32, record_version: u64) -> Result<bool, Error> {
        self.write(
            vec![Condition {
                key: Bytes::from_static(CLUSTER_VERSION_KEY),
                expect: Expect::Version(record_version),
            }],
            vec![WriteOp::Put {
                key: Bytes::from_static(CLUSTER_VERSION_KEY),
                value: Bytes::from(to.to_string()),
            }],
        )
        .await
    }

    /// Allocates a fresh range id.
    pub async fn alloc_range_id(&self) -> Result<u64, Error> {
        for _ in 0..META_CAS_ATTEMPTS_MAX {
            let cur = self.get(NEXT_RANGE_ID_KEY)?;
            let next = match &cur {
                Some((raw, _)) => std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| Error::internal("bad next range id in meta"))?,
                None => self
                    .descriptors()?
                    .iter()
                    .map(|d| d.range_id + 1)
                    .max()
                    .unwrap_or(FIRST_USER_RANGE_ID)
                    .max(FIRST_USER_RANGE_ID),
            };
            let ok = self
                .write(
                    vec![Condition {
                        key: Bytes::from_static(NEXT_RANGE_ID_KEY),
                        expect: Expect::Version(cur.map(|(_, v)| v).unwrap_or(0)),
                    }],
                    vec![WriteOp::Put {
                        key: Bytes::from_static(NEXT_RANGE_ID_KEY),
                        value: Bytes::from((next + 1).to_string()),
                    }],
                )
                .await?;
            if ok {
                return Ok(next);
            }
        }
        Err(Error::unavailable("range id allocation kept racing; retry"))
    }
}
