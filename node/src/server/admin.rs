//! The `Admin` service: status, identity and cluster membership.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lmskv_proto::error::Error;
use lmskv_proto::keys::validate_user_key;
use lmskv_proto::range::META_RANGE_ID;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::admin_server::Admin;
use lmskv_proto::v1::{
    ChangeReplicasRequest, ChangeReplicasResponse, ClusterSummary, CreateReplicaRequest,
    CreateReplicaResponse, DecommissionRequest, DecommissionResponse, HeartbeatRequest,
    HeartbeatResponse, IdentifyRequest, IdentifyResponse, JoinRequest, JoinResponse, LocateRequest,
    LocateResponse, MoveReplicaRequest, MoveReplicaResponse, NodeInfo, NodeListRequest,
    NodeListResponse, RangeInfo, RangeListRequest, RangeListResponse, RangeStatus,
    SplitRangeRequest, SplitRequest, SplitResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::{Request, Response, Status};

use crate::meta::StoredDesc;
use crate::node::Node;
use crate::pd;

/// How long a status call waits for a peer to answer before calling it down.
const PEER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Most ranges one Locate returns.
const LOCATE_PREFETCH_MAX: usize = 64;
/// How long a status call waits for the meta leader's cluster summary.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(1);

/// Fills replica addresses the node registry lacks (a node that has not
/// registered yet) from the meta range's membership, which lists every node
/// that joined, so that clients can reach every replica of a range.
fn fill_addresses(node: &Node, ranges: &mut [RangeInfo]) {
    let missing = |r: &RangeInfo| {
        r.descriptor.as_ref().is_some_and(|d| {
            d.replicas
                .iter()
                .any(|p| !r.addresses.contains_key(&p.node_id))
        })
    };
    if !ranges.iter().any(missing) {
        return;
    }
    let Ok(meta) = node.replicas.get(META_RANGE_ID) else {
        return;
    };
    let known: HashMap<u64, String> = meta.member_addresses().into_iter().collect();
    for r in ranges.iter_mut() {
        let Some(d) = &r.descriptor else { continue };
        for p in &d.replicas {
            if let (false, Some(a)) = (r.addresses.contains_key(&p.node_id), known.get(&p.node_id))
            {
                r.addresses.insert(p.node_id, a.clone());
            }
        }
    }
}

/// Serves cluster administration calls.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }

    async fn probe(&self, addr: &str) -> bool {
        let Ok(ch) = self.node.pool.channel(addr) else {
            return false;
        };
        let mut c = AdminClient::new(ch);
        matches!(
            tokio::time::timeout(PEER_PROBE_TIMEOUT, c.identify(IdentifyRequest {})).await,
            Ok(Ok(_))
        )
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let node = &self.node;
        let mut ranges = Vec::new();
        let mut members = std::collections::BTreeMap::new();
        for r in node.replicas.all() {
            let st = r.status();
            for (id, addr) in &st.nodes {
                members.insert(*id, addr.clone());
            }
            ranges.push(RangeStatus {
                descriptor: Some(node.descriptor(&r)),
                leader_id: st.leader_id.unwrap_or(0),
                term: st.term,
                commit_index: st.commit_index,
                applied_index: st.applied_index,
                local_role: st.role.to_string(),
                last_log_index: st.last_log_index,
                snapshot_index: st.snapshot_index,
                purged_index: st.purged_index,
                fault: st.fault.unwrap_or_default(),
                parked: st.parked,
                writes_proposed: st.writes_proposed,
                entries_proposed: st.entries_proposed,
            });
        }
        let me = node.node_id();
        members
            .entry(me)
            .or_insert_with(|| node.cfg.advertise_addr());
        let probes = members.iter().map(|(id, addr)| async move {
            let up = *id == me || self.probe(addr).await;
            NodeInfo {
                node_id: *id,
                address: addr.clone(),
                state: if up { "up" } else { "down" }.to_string(),
                ..Default::default()
            }
        });
        let nodes = futures::future::join_all(probes).await;
        let cluster = self.cluster_summary().await;
        Ok(Response::new(StatusResponse {
            node_id: me,
            address: node.cfg.advertise_addr(),
            nodes,
            ranges,
            initialized: node.is_member(),
            cluster,
            store_recovery: node.store_loss_note(),
        }))
    }

    async fn identify(
        &self,
        _req: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyResponse>, Status> {
        Ok(Response::new(IdentifyResponse {
            node_id: self.node.node_id(),
            address: self.node.cfg.advertise_addr(),
            initialized: self.node.is_member(),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // Nodes join by heartbeating the meta leader; this registers one directly.
        let req = req.into_inner();
        if req.node_id == 0 {
            return Err(Error::invalid_argument("node_id", "must be at least 1").into());
        }
        if req.address.is_empty() {
            return Err(Error::invalid_argument("address", "must not be empty").into());
        }
        // Past the base cluster version a node must say what it runs, which
        // only its own heartbeats do: registering it unheard could give a
        // replica to a binary that cannot read the cluster's log entries.
        let version = self.node.pd.cluster_version_floor();
        if version > crate::version::CLUSTER_VERSION_BASE {
            return Err(Error::invalid_argument(
                "join",
                format!(
                    "the cluster runs at version {version}: a node registers itself; start it with --join naming a node of the cluster"
                ),
            )
            .into());
        }
        pd::handle_heartbeat(
            &self.node,
            HeartbeatRequest {
                node_id: req.node_id,
                address: req.address,
                ranges: vec![],
                range_ids: vec![],
                full: false,
                faulted_range_ids: vec![],
                // What the node runs is not known here: registered as the
                // base version, which a cluster past it refuses (see above).
                cluster_version_max: crate::version::CLUSTER_VERSION_BASE,
                cluster_version_seen: 0,
            },
        )
        .await?;
        Ok(Response::new(JoinResponse {
            nodes: self.node.pd.node_infos(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = req.into_inner();
        if req.node_id == 0 || req.address.is_empty() {
            return Err(Error::invalid_argument(
                "node_id",
                "heartbeat needs a node id and address",
            )
            .into());
        }
        Ok(Response::new(pd::handle_heartbeat(&self.node, req).await?))
    }

    async fn locate(
        &self,
        req: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let req = req.into_inner();
        pd::serving(&self.node)?;
        let prefetch = (req.prefetch as usize).min(LOCATE_PREFETCH_MAX);
        let mut ranges = self.node.pd.locate(&req.key, prefetch, req.reverse);
        fill_addresses(&self.node, &mut ranges);
        if ranges.is_empty() {
            return Err(Error::unavailable(
                "no range is registered for this key yet (a split may be being registered); retry",
            )
            .into());
        }
        Ok(Response::new(LocateResponse { ranges }))
    }

    async fn range_list(
        &self,
        _req: Request<RangeListRequest>,
    ) -> Result<Response<RangeListResponse>, Status> {
        pd::serving(&self.node)?;
        let mut ranges = self.node.pd.range_infos();
        fill_addresses(&self.node, &mut ranges);
        Ok(Response::new(RangeListResponse { ranges }))
    }

    async fn node_list(
        &self,
        _req: Request<NodeListRequest>,
    ) -> Result<Response<NodeListResponse>, Status> {
        pd::serving(&self.node)?;
        Ok(Response::new(NodeListResponse {
            nodes: self.node.pd.node_infos(),
        }))
    }

    async fn split(&self, req: Request<SplitRequest>) -> Result<Response<SplitResponse>, Status> {
        let req = req.into_inner();
        validate_user_key("key", &req.key)?;
        pd::serving(&self.node)?;
        let located = self.node.pd.locate(&req.key, 0, false);
        let Some(d) = located.first().and_then(|r| r.descriptor.clone()) else {
            return Err(Error::unavailable("no range found for the key").into());
        };
        if d.start_key == req.key {
            return Err(Error::invalid_argument(
                "key",
                format!("a range (range {}) already starts at this key", d.range_id),
            )
            .into());
        }
        let (left, right) = pd::split(&self.node, d.range_id, Some(req.key)).await?;
        Ok(Response::new(SplitResponse {
            left: Some(left.to_proto()),
            right: Some(right.to_proto()),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let req = req.into_inner();
        if req.to_node == 0 {
            return Err(Error::invalid_argument("to_node", "must be at least 1").into());
        }
        // The range's leader on this node hands over; otherwise the meta
        // leader forwards the call to the range's leader.
        if let Ok(r) = self.node.replica(req.range_id) {
            if r.is_leader_now() {
                let st = r.status();
                if !st.voters.contains(&req.to_node) {
                    return Err(Error::invalid_argument(
                        "to_node",
                        format!(
                            "node {} is not a voter of range {}",
                            req.to_node, req.range_id
                        ),
                    )
                    .into());
                }
                if req.to_node != self.node.node_id() {
                    r.transfer_leader(req.to_node).await?;
                }
                return Ok(Response::new(TransferLeaderResponse {}));
            }
        }
        pd::serving(&self.node)?;
        pd::transfer_leader(&self.node, req.range_id, req.to_node).await?;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn decommission(
        &self,
        req: Request<DecommissionRequest>,
    ) -> Result<Response<DecommissionResponse>, Status> {
        let req = req.into_inner();
        let rec = pd::decommission(&self.node, req.node_id).await?;
        let node = self
            .node
            .pd
            .node_infos()
            .into_iter()
            .find(|n| n.node_id == rec.node_id);
        Ok(Response::new(DecommissionResponse { node }))
    }

    async fn move_replica(
        &self,
        req: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        let req = req.into_inner();
        if req.range_id == 0 || req.from_node == 0 || req.to_node == 0 {
            return Err(Error::invalid_argument(
                "range_id",
                "range_id, from_node and to_node must be at least 1",
            )
            .into());
        }
        pd::serving(&self.node)?;
        let d = pd::move_replica(&self.node, req.range_id, req.from_node, req.to_node).await?;
        Ok(Response::new(MoveReplicaResponse {
            descriptor: Some(d.to_proto()),
        }))
    }

    async fn create_replica(
        &self,
        req: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        let req = req.into_inner();
        let Some(d) = req.descriptor else {
            return Err(Error::invalid_argument("descriptor", "missing").into());
        };
        if d.range_id == 0 {
            return Err(
                Error::invalid_argument("descriptor.range_id", "must be at least 1").into(),
            );
        }
        self.node
            .create_replica(&StoredDesc::from_proto(&d))
            .await?;
        Ok(Response::new(CreateReplicaResponse {}))
    }

    async fn change_replicas(
        &self,
        req: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let req = req.into_inner();
        let r = self.node.replica(req.range_id)?;
        if !r.is_leader_now() {
            return Err(Error::NotLeader {
                range_id: req.range_id,
                leader: r.leader_hint(),
            }
            .into());
        }
        if let Some(e) = req.epoch {
            if e.conf_ver < r.meta().conf_ver {
                return Err(Error::EpochMismatch {
                    range_id: req.range_id,
                    current: vec![self.node.descriptor(&r)],
                }
                .into());
            }
        }
        let voters = req.voters.into_iter().collect();
        r.change_voters(voters).await?;
        Ok(Response::new(ChangeReplicasResponse {
            descriptor: Some(self.node.descriptor(&r)),
        }))
    }

    async fn split_range(
        &self,
        req: Request<SplitRangeRequest>,
    ) -> Result<Response<SplitResponse>, Status> {
        let req = req.into_inner();
        if !req.key.is_empty() {
            validate_user_key("key", &req.key)?;
        }
        Ok(Response::new(pd::split_local(&self.node, req).await?))
    }
}

impl AdminService {
    /// The cluster summary from the meta leader (asked over the network when
    /// it is another node).
    async fn cluster_summary(&self) -> Option<ClusterSummary> {
        let rf = self.node.cfg.file.replication_factor;
        if self.node.local_meta_leader().is_some() {
            let (up, total, ranges, under) = self.node.pd.summary(rf);
            return Some(ClusterSummary {
                nodes_up: up,
                nodes_total: total,
                ranges,
                under_replicated: under,
                meta_leader: self.node.node_id(),
                cluster_version: self.node.pd.cluster_version(),
            });
        }
        let hint = self.node.replicas.get(META_RANGE_ID).ok()?.leader_hint()?;
        let mut c = AdminClient::new(self.node.pool.channel(&hint.address).ok()?);
        let resp = tokio::time::timeout(SUMMARY_TIMEOUT, c.status(StatusRequest {}))
            .await
            .ok()?
            .ok()?;
        resp.into_inner().cluster
    }
}
