//! The `Admin` service: status, identity and cluster membership.

use std::sync::Arc;
use std::time::Duration;

use lmskv_proto::error::Error;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::admin_server::Admin;
use lmskv_proto::v1::{
    IdentifyRequest, IdentifyResponse, JoinRequest, JoinResponse, NodeInfo, RangeStatus,
    StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::node::{Node, FIRST_RANGE_ID};

/// How long a status call waits for a peer to answer before calling it down.
const PEER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

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
        let mut initialized = false;
        for r in node.replicas.all() {
            let st = r.status();
            initialized |= !st.nodes.is_empty();
            if r.range_id() == FIRST_RANGE_ID {
                members = st.nodes.clone();
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
                fault: st.fault.unwrap_or_default(),
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
            }
        });
        let nodes = futures::future::join_all(probes).await;
        Ok(Response::new(StatusResponse {
            node_id: me,
            address: node.cfg.advertise_addr(),
            nodes,
            ranges,
            initialized,
        }))
    }

    async fn identify(
        &self,
        _req: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyResponse>, Status> {
        let initialized = match self.node.replicas.get(FIRST_RANGE_ID) {
            Ok(r) => r.is_initialized().await,
            Err(_) => false,
        };
        Ok(Response::new(IdentifyResponse {
            node_id: self.node.node_id(),
            address: self.node.cfg.advertise_addr(),
            initialized,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        if req.node_id == 0 {
            return Err(Error::invalid_argument("node_id", "must be at least 1").into());
        }
        if req.address.is_empty() {
            return Err(Error::invalid_argument("address", "must not be empty").into());
        }
        let r = self.node.replicas.get(FIRST_RANGE_ID)?;
        let st = r.status();
        if let Some(addr) = st.nodes.get(&req.node_id) {
            if *addr != req.address {
                return Err(Error::invalid_argument(
                    "node_id",
                    format!("node {} is already a member at {addr}", req.node_id),
                )
                .into());
            }
        }
        if st.role != "leader" {
            return Err(Error::NotLeader {
                range_id: FIRST_RANGE_ID,
                leader: r.leader_hint(),
            }
            .into());
        }
        tracing::info!(node_id = req.node_id, address = %req.address, "adding node");
        r.add_voter(req.node_id, req.address).await?;
        let nodes = r
            .status()
            .nodes
            .into_iter()
            .map(|(id, address)| NodeInfo {
                node_id: id,
                address,
                state: "up".into(),
            })
            .collect();
        Ok(Response::new(JoinResponse { nodes }))
    }
}
