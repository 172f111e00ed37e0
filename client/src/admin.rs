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
/// How long a split whose earlier try may have been applied, and whose
/// retry was refused, looks for the ranges that try would have made
/// (see [`Client::split`]): a couple of the nodes' heartbeats, which bring
/// a split the meta range missed.
pub const SPLIT_CONFIRM_WAIT: Duration = Duration::from_millis(2_500);
/// Pause between two such looks.
const SPLIT_CONFIRM_EVERY: Duration = Duration::from_millis(250);
/// The least time one such look may take, even past the call's deadline.
const SPLIT_CONFIRM_LOOK_MIN: Duration = Duration::from_millis(500);

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
    ///
    /// A key where a range already starts is refused (`InvalidArgument`).
    /// The call first looks the key up in the meta range, and refuses at
    /// once when a range starts there. Otherwise a refusal that comes
    /// after a try whose answer was lost (it timed out, its connection
    /// broke, or the node could not tell) means that the range was split
    /// there during this call, by that try (or by another caller at the
    /// same key at the same moment): the call looks the key up again and,
    /// when ranges now end and start at the key, returns them as its
    /// result. When they do not (within [`SPLIT_CONFIRM_WAIT`]), or when
    /// the first look failed, the call fails with an outcome-unknown error
    /// ([`ClientError::is_outcome_unknown`]) naming the refusal.
    pub async fn split(
        &self,
        key: impl Into<Bytes>,
    ) -> Result<(RangeDescriptor, RangeDescriptor), ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let req = SplitRequest { key: key.clone() };
        let mut budget = self.meta_budget(self.admin_deadline());
        // Whether a range starts at the key before any try is sent: only
        // then can a later refusal saying so be told from a split this call
        // made. One look, bounded like one try.
        let look_until = budget.deadline.min(Instant::now() + ADMIN_ATTEMPT_TIMEOUT);
        let starts_before = self.range_starting_at(&key, look_until).await;
        if let Ok(Some(range_id)) = starts_before {
            return Err(ClientError::Server(ServerError::invalid_argument(
                "key",
                format!("a range (range {range_id}) already starts at this key"),
            )));
        }
        let called = self
            .meta_call_in(&mut budget, Some(ADMIN_ATTEMPT_TIMEOUT), |mut c| {
                let req = req.clone();
                async move { c.split(req).await }
            })
            .await;
        let resp = match called {
            Ok(resp) => resp,
            Err(e @ ClientError::Server(ServerError::InvalidArgument { .. }))
                if budget.maybe_applied() =>
            {
                if let Err(look) = starts_before {
                    return Err(ClientError::Server(ServerError::Timeout {
                        reason: format!(
                            "an earlier try of the split timed out or lost its connection and \
                             may or may not have split the range; whether a range started at \
                             the key before could not be read ({look}), and the last try was \
                             refused: {e}"
                        ),
                    }));
                }
                return match self.split_done_at(&key, budget.deadline).await {
                    Some((left, right)) => {
                        self.inner.routes.insert(left.clone());
                        self.inner.routes.insert(right.clone());
                        Ok((left, right))
                    }
                    None => Err(ClientError::Server(ServerError::Timeout {
                        reason: format!(
                            "an earlier try of the split timed out or lost its connection and \
                             may or may not have split the range; the meta range shows no range \
                             starting at the key, and the last try was refused: {e}"
                        ),
                    })),
                };
            }
            Err(e) => return Err(e),
        };
        let (Some(left), Some(right)) = (resp.left, resp.right) else {
            return Err(ClientError::Server(ServerError::internal(
                "the split answer lacks a descriptor",
            )));
        };
        self.inner.routes.insert(left.clone());
        self.inner.routes.insert(right.clone());
        Ok((left, right))
    }

    /// The id of the range that starts at `key`, if one does, as the meta
    /// range records it (one lookup, until `until`).
    async fn range_starting_at(
        &self,
        key: &Bytes,
        until: Instant,
    ) -> Result<Option<u64>, ClientError> {
        let ranges = self.fetch_ranges(key.clone(), false, until).await?;
        Ok(ranges
            .into_iter()
            .filter_map(|r| r.descriptor)
            .find(|d| d.start_key <= *key && (d.end_key.is_empty() || *key < d.end_key))
            .filter(|d| d.start_key == *key)
            .map(|d| d.range_id))
    }

    /// The ranges that end and start at `key`, as the meta range records
    /// them, if there are such: asked until they are there, for at most
    /// [`SPLIT_CONFIRM_WAIT`] (a split the range applied reaches the meta
    /// range with its nodes' heartbeats if its own registration was cut
    /// short), and not past `deadline` unless for one look.
    async fn split_done_at(
        &self,
        key: &Bytes,
        deadline: Instant,
    ) -> Option<(RangeDescriptor, RangeDescriptor)> {
        let started = Instant::now();
        let until = deadline.min(started + SPLIT_CONFIRM_WAIT);
        loop {
            let look = until.max(Instant::now() + SPLIT_CONFIRM_LOOK_MIN);
            let (right, left) = tokio::join!(
                self.fetch_ranges(key.clone(), false, look),
                self.fetch_ranges(key.clone(), true, look)
            );
            let descs = right
                .into_iter()
                .chain(left)
                .flatten()
                .filter_map(|r| r.descriptor);
            let (mut left, mut right) = (None, None);
            for d in descs {
                if d.end_key == *key {
                    left = Some(d);
                } else if d.start_key == *key {
                    right = Some(d);
                }
            }
            if let (Some(l), Some(r)) = (left, right) {
                return Some((l, r));
            }
            if Instant::now() + SPLIT_CONFIRM_EVERY >= until {
                return None;
            }
            tokio::time::sleep(SPLIT_CONFIRM_EVERY).await;
        }
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
