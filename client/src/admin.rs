//! Operator calls on [`Client`]: node status, the cluster's ranges and
//! nodes, splits, leader transfers and decommissioning.
//!
//! Everything but `node_status` is served by the meta range's leader; the
//! client follows `NotLeader` hints to it (see `call.rs`).

use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::range::META_RANGE_ID;
use lmskv_proto::v1::{
    DecommissionRequest, MoveReplicaRequest, NodeInfo, NodeListRequest, RangeDescriptor, RangeInfo,
    RangeListRequest, SplitRequest, StatusRequest, StatusResponse, TransferLeaderRequest,
};
use tokio::time::Instant;

use crate::client::{check_key, Client};
use crate::error::ClientError;

/// How long one try of an operator call on one node may take.
pub const ADMIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one try of a replica move may take: the new replica catches up
/// by snapshot before the membership change (the node gives up after 45 s).
pub const MOVE_REPLICA_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node's status report may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

impl Client {
    fn admin_deadline(&self) -> Instant {
        Instant::now() + self.retry.deadline
    }

    /// The status report of the node at `endpoint`.
    pub async fn node_status(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let mut c = self.admin_client(endpoint)?;
        match tokio::time::timeout(STATUS_TIMEOUT, c.status(StatusRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::Unreachable {
                endpoint: endpoint.into(),
                reason: ServerError::from_status(&s).to_string(),
            }),
            Err(_) => Err(ClientError::Unreachable {
                endpoint: endpoint.into(),
                reason: "timed out".into(),
            }),
        }
    }

    /// The cluster's status as the meta range's leader reports it, or as the
    /// first endpoint that answers reports it when the meta leader cannot be
    /// found.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let calls = self.inner.endpoints.iter().map(|e| self.node_status(e));
        let results = futures::future::join_all(calls).await;
        let mut first_ok = None;
        let mut last_err = None;
        let leads_meta = |s: &StatusResponse| {
            s.ranges.iter().any(|r| {
                r.local_role == "leader"
                    && r.descriptor
                        .as_ref()
                        .is_some_and(|d| d.range_id == META_RANGE_ID)
            })
        };
        for r in results {
            match r {
                Ok(s) if leads_meta(&s) => return Ok(s),
                Ok(s) => {
                    first_ok.get_or_insert(s);
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(s) = first_ok {
            // Ask the node the answering one believes leads the meta range.
            let meta_leader = s
                .cluster
                .as_ref()
                .map(|c| c.meta_leader)
                .filter(|l| *l != 0)
                .or_else(|| {
                    s.ranges
                        .iter()
                        .find(|r| {
                            r.descriptor
                                .as_ref()
                                .is_some_and(|d| d.range_id == META_RANGE_ID)
                        })
                        .map(|r| r.leader_id)
                });
            if let Some(addr) = meta_leader
                .and_then(|id| s.nodes.iter().find(|n| n.node_id == id))
                .map(|n| n.address.clone())
            {
                if let Ok(ls) = self.node_status(&addr).await {
                    return Ok(ls);
                }
            }
            return Ok(s);
        }
        Err(last_err.unwrap_or_else(|| ClientError::Config("no endpoints".into())))
    }

    /// Every range of the cluster in key order, with its leader, replicas'
    /// addresses, size and load. Also refreshes the client's route cache.
    pub async fn range_list(&self) -> Result<Vec<RangeInfo>, ClientError> {
        let resp = self
            .meta_call(
                self.admin_deadline(),
                Some(ADMIN_ATTEMPT_TIMEOUT),
                |mut c| async move { c.range_list(RangeListRequest {}).await },
            )
            .await?;
        let mut ranges = resp.ranges;
        ranges.sort_by(|a, b| {
            let key = |r: &RangeInfo| r.descriptor.as_ref().map(|d| d.start_key.clone());
            key(a).cmp(&key(b))
        });
        self.inner.routes.insert_infos(ranges.clone());
        Ok(ranges)
    }

    /// Every node the cluster knows, with its state and replica counts.
    pub async fn node_list(&self) -> Result<Vec<NodeInfo>, ClientError> {
        let resp = self
            .meta_call(
                self.admin_deadline(),
                Some(ADMIN_ATTEMPT_TIMEOUT),
                |mut c| async move { c.node_list(NodeListRequest {}).await },
            )
            .await?;
        let mut nodes = resp.nodes;
        nodes.sort_by_key(|n| n.node_id);
        for n in &nodes {
            self.inner.routes.set_address(n.node_id, &n.address);
        }
        Ok(nodes)
    }

    /// Splits the range holding `key` at `key`, which becomes the start of
    /// the new right-hand range. Returns the left and right descriptors.
    pub async fn split(
        &self,
        key: impl Into<Bytes>,
    ) -> Result<(RangeDescriptor, RangeDescriptor), ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let req = SplitRequest { key };
        let resp = self
            .meta_call(
                self.admin_deadline(),
                Some(ADMIN_ATTEMPT_TIMEOUT),
                |mut c| {
                    let req = req.clone();
                    async move { c.split(req).await }
                },
            )
            .await?;
        let (Some(left), Some(right)) = (resp.left, resp.right) else {
            return Err(ClientError::Server(ServerError::internal(
                "the split answer lacks a descriptor",
            )));
        };
        self.inner.routes.insert(left.clone());
        self.inner.routes.insert(right.clone());
        Ok((left, right))
    }

    /// Moves the leadership of `range_id` to node `to_node`.
    pub async fn transfer_leader(&self, range_id: u64, to_node: u64) -> Result<(), ClientError> {
        let req = TransferLeaderRequest { range_id, to_node };
        self.meta_call(
            self.admin_deadline(),
            Some(ADMIN_ATTEMPT_TIMEOUT),
            |mut c| async move { c.transfer_leader(req).await },
        )
        .await?;
        self.inner.routes.set_leader(range_id, to_node, None);
        Ok(())
    }

    /// Moves range `range_id`'s replica from node `from_node` to node
    /// `to_node` (learner, catch-up, joint membership change, removal of the
    /// old one) and returns the range's descriptor afterwards. A move that
    /// is already done answers with the current descriptor, so a retried
    /// call is safe.
    pub async fn move_replica(
        &self,
        range_id: u64,
        from_node: u64,
        to_node: u64,
    ) -> Result<RangeDescriptor, ClientError> {
        let req = MoveReplicaRequest {
            range_id,
            from_node,
            to_node,
        };
        let deadline = Instant::now() + self.retry.deadline.max(MOVE_REPLICA_ATTEMPT_TIMEOUT);
        let resp = self
            .meta_call(
                deadline,
                Some(MOVE_REPLICA_ATTEMPT_TIMEOUT),
                |mut c| async move { c.move_replica(req).await },
            )
            .await?;
        let d = resp.descriptor.ok_or_else(|| {
            ClientError::Server(ServerError::internal("the move answer lacks a descriptor"))
        })?;
        self.inner.routes.insert(d.clone());
        Ok(d)
    }

    /// Starts draining node `node_id`: its replicas move to other nodes and
    /// it ends with none. Returns the node as the cluster now records it.
    pub async fn decommission(&self, node_id: u64) -> Result<NodeInfo, ClientError> {
        let req = DecommissionRequest { node_id };
        let resp = self
            .meta_call(
                self.admin_deadline(),
                Some(ADMIN_ATTEMPT_TIMEOUT),
                |mut c| async move { c.decommission(req).await },
            )
            .await?;
        resp.node.ok_or_else(|| {
            ClientError::Server(ServerError::internal(
                "the decommission answer lacks the node",
            ))
        })
    }
}
