//! [`Node`]: one storage node — its engine, its ranges, its gRPC server — and
//! how it forms a new cluster or joins a running one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::{
    IdentifyRequest, JoinRequest, RangeDescriptor, RangeEpoch, Replica, ReplicaRole,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::raft::{PeerPool, RangeReplica, ReplicaMap};
use crate::storage::Engine;

/// The id of the range that holds the whole key space until ranges are split.
pub const FIRST_RANGE_ID: u64 = 1;
/// The epoch version of a range that has never been split or merged.
pub const INITIAL_RANGE_VERSION: u64 = 1;

/// How often a node that is not yet part of a cluster retries forming or joining one.
const BOOTSTRAP_RETRY_INTERVAL: Duration = Duration::from_millis(300);
/// How long one bootstrap probe of a peer may take.
const BOOTSTRAP_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a data dir remembers about its node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    node_id: u64,
    address: String,
}

/// A running storage node.
pub struct Node {
    pub(crate) cfg: NodeConfig,
    pub(crate) engine: Arc<Engine>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) replicas: Arc<ReplicaMap>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.cfg.node_id)
            .finish()
    }
}

impl Node {
    /// Opens the data dir (checking the node's identity) and its ranges.
    pub async fn open(cfg: NodeConfig) -> anyhow::Result<Arc<Node>> {
        let engine = Arc::new(
            Engine::open(&cfg.data_dir.join("db"), &cfg.engine_options()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the storage in {}: {e}. If the data is damaged, wipe the data dir and restart the node with --join so it recovers from its peers",
                    cfg.data_dir.display()
                )
            })?,
        );
        let me = Identity {
            node_id: cfg.node_id,
            address: cfg.advertise_addr(),
        };
        match engine.node_identity()? {
            Some(raw) => {
                let stored: Identity = serde_json::from_slice(&raw)?;
                if stored.node_id != me.node_id {
                    anyhow::bail!(
                        "data dir {} belongs to node {}, not node {}",
                        cfg.data_dir.display(),
                        stored.node_id,
                        me.node_id
                    );
                }
                if stored.address != me.address {
                    anyhow::bail!(
                        "node {} was created with address {}; start it with --listen {}",
                        me.node_id,
                        stored.address,
                        stored.address
                    );
                }
                tracing::info!(node_id = me.node_id, "restarting with existing data");
            }
            None => {
                engine.put_node_identity(&serde_json::to_vec(&me)?)?;
                tracing::info!(node_id = me.node_id, "initialized new data dir");
            }
        }
        let pool = PeerPool::new(cfg.node_id);
        let replicas = Arc::new(ReplicaMap::default());
        let replica = RangeReplica::open(
            engine.clone(),
            pool.clone(),
            FIRST_RANGE_ID,
            (Bytes::new(), Bytes::new()),
            &cfg.data_dir,
            cfg.raft_tuning(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        replicas.insert(replica);
        Ok(Arc::new(Node {
            cfg,
            engine,
            pool,
            replicas,
        }))
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// The replica that holds `key`.
    pub fn replica_for_key(&self, _key: &[u8]) -> Result<Arc<RangeReplica>, Error> {
        self.replicas.get(FIRST_RANGE_ID)
    }

    /// The replica of `range_id`; 0 means "whichever holds the keys".
    pub fn replica(&self, range_id: u64) -> Result<Arc<RangeReplica>, Error> {
        self.replicas.get(if range_id == 0 {
            FIRST_RANGE_ID
        } else {
            range_id
        })
    }

    /// The descriptor of a replica's range as clients see it.
    pub fn descriptor(&self, r: &RangeReplica) -> RangeDescriptor {
        let st = r.status();
        let mut replicas: Vec<Replica> = st
            .voters
            .iter()
            .map(|id| Replica {
                node_id: *id,
                role: ReplicaRole::Voter as i32,
            })
            .collect();
        replicas.extend(st.learners.iter().map(|id| Replica {
            node_id: *id,
            role: ReplicaRole::Learner as i32,
        }));
        RangeDescriptor {
            range_id: r.range_id(),
            start_key: Bytes::new(),
            end_key: Bytes::new(),
            epoch: Some(RangeEpoch {
                conf_ver: (st.voters.len() + st.learners.len()) as u64,
                version: INITIAL_RANGE_VERSION,
            }),
            replicas,
        }
    }

    /// Forms a new cluster with the nodes named in `--join`, or joins the
    /// running cluster one of them belongs to. Returns once this node is part
    /// of a cluster or `stop` fires.
    pub async fn bootstrap(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let replica = match self.replicas.get(FIRST_RANGE_ID) {
            Ok(r) => r,
            Err(_) => return,
        };
        let me = self.cfg.advertise_addr();
        let peers: Vec<String> = self
            .cfg
            .join
            .iter()
            .filter(|a| **a != me)
            .cloned()
            .collect();
        let mut attempt = 0u64;
        loop {
            if replica.is_initialized().await {
                return;
            }
            if peers.is_empty() {
                // A node named alone forms a single-node cluster.
                let members = BTreeMap::from([(self.cfg.node_id, me.clone())]);
                match replica.initialize(members).await {
                    Ok(()) => tracing::info!("formed a single-node cluster"),
                    Err(e) => tracing::error!(error = %e, "cannot initialize"),
                }
                return;
            }
            match self.bootstrap_round(&replica, &peers).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    if attempt.is_multiple_of(20) {
                        tracing::info!(reason = %e, "waiting to form or join a cluster");
                    }
                }
            }
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(BOOTSTRAP_RETRY_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One bootstrap attempt; `Ok(true)` when this node is now part of a cluster.
    async fn bootstrap_round(
        &self,
        replica: &RangeReplica,
        peers: &[String],
    ) -> Result<bool, String> {
        let mut ids = BTreeMap::from([(self.cfg.node_id, self.cfg.advertise_addr())]);
        let mut missing = Vec::new();
        for addr in peers {
            match self.identify(addr).await {
                Ok(resp) if resp.initialized => {
                    // A running cluster exists: ask it to add us.
                    self.join_via(addr).await?;
                    tracing::info!(via = %addr, "joined the running cluster");
                    return Ok(true);
                }
                Ok(resp) => {
                    if let Some(prev) = ids.insert(resp.node_id, resp.address.clone()) {
                        if resp.node_id == self.cfg.node_id {
                            return Err(format!(
                                "node {} at {addr} has this node's id (this node is at {prev})",
                                resp.node_id
                            ));
                        }
                    }
                }
                Err(e) => missing.push(format!("{addr} ({e})")),
            }
        }
        if !missing.is_empty() {
            return Err(format!("peers not reachable yet: {}", missing.join(", ")));
        }
        // Every named node answered and none is in a cluster: the lowest id forms it.
        if ids.keys().next() == Some(&self.cfg.node_id) {
            tracing::info!(members = ?ids, "forming a new cluster");
            replica.initialize(ids).await.map_err(|e| e.to_string())?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn admin(&self, addr: &str) -> Result<AdminClient<tonic::transport::Channel>, String> {
        Ok(AdminClient::new(self.pool.channel(addr)?))
    }

    async fn identify(&self, addr: &str) -> Result<lmskv_proto::v1::IdentifyResponse, String> {
        let mut c = self.admin(addr).await?;
        let r = tokio::time::timeout(BOOTSTRAP_PROBE_TIMEOUT, c.identify(IdentifyRequest {}))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|s| s.message().to_string())?;
        Ok(r.into_inner())
    }

    async fn join_via(&self, addr: &str) -> Result<(), String> {
        let mut target = addr.to_string();
        for _ in 0..5 {
            let mut c = self.admin(&target).await?;
            let req = JoinRequest {
                node_id: self.cfg.node_id,
                address: self.cfg.advertise_addr(),
            };
            match tokio::time::timeout(Duration::from_secs(30), c.join(req)).await {
                Err(_) => return Err(format!("join via {target} timed out")),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => match Error::from_status(&status) {
                    Error::NotLeader {
                        leader: Some(h), ..
                    } if !h.address.is_empty() => target = h.address,
                    e => return Err(format!("join via {target}: {e}")),
                },
            }
        }
        Err("join: leader kept moving".into())
    }

    /// Stops every range and flushes the engine.
    pub async fn shutdown(&self) {
        for r in self.replicas.all() {
            r.shutdown().await;
        }
        if let Err(e) = self.engine.flush() {
            tracing::warn!(error = %e, "flush on shutdown failed");
        }
    }
}
