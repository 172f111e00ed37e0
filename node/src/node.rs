//! [`Node`]: one storage node — its engine, the replicas of the ranges it
//! hosts, its gRPC server — how it forms a new cluster or joins a running one,
//! and how it reports to the meta range's leader.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lmskv_proto::error::Error;
use lmskv_proto::range::{spans_overlap, META_RANGE_ID};
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::{
    HeartbeatRequest, IdentifyRequest, NodeListRequest, RangeDescriptor, RangeListRequest,
    RangeStats,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::NodeConfig;
use crate::meta::StoredDesc;
use crate::pd::Pd;
use crate::raft::{PeerPool, RangeReplica, ReplicaMap};
use crate::storage::Engine;

/// How often a node that is not yet part of a cluster retries forming or joining one.
const BOOTSTRAP_RETRY_INTERVAL: Duration = Duration::from_millis(300);
/// How long one bootstrap probe of a peer may take.
const BOOTSTRAP_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one heartbeat to the meta leader may take.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Every this many heartbeats a node reports the stats of every range it
/// hosts; in between only those that changed (and the list of range ids).
const HEARTBEATS_PER_FULL_REPORT: u32 = 10;
/// Splits waiting for their right-hand range to be opened.
const SPLIT_QUEUE_MAX: usize = 1_024;
/// How often the node looks for ranges it has state for but has not opened.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);
/// How often hibernation and the liveness of dormant ranges' leaders are checked.
const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// How often a node that dormant followers wait on is pinged.
const LIVENESS_PING_EVERY: Duration = Duration::from_millis(500);
/// How long a removed replica's Raft group may take to stop.
const REPLICA_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, and how long apart, a removal asks again for its data span
/// while its own snapshot install still holds it (the install lets go a
/// moment after its import ended).
const OWN_CLAIM_WAITS_MAX: u32 = 100;
const OWN_CLAIM_WAIT: Duration = Duration::from_millis(20);
/// A range that applied nothing new has its on-disk size measured again
/// after this long (compactions change it without writes).
const SIZE_REMEASURE_AFTER: Duration = Duration::from_secs(30);
/// A range's size is measured at most once every this many heartbeats.
const SIZE_MEASURE_HEARTBEATS: u64 = 10;

/// The data column family's SST bytes at the last stats round, and per range
/// id (applied index, when measured, size, keys).
type SpanSizes = (
    u64,
    std::collections::HashMap<u64, (u64, Instant, u64, u64)>,
);

/// What a data dir remembers about its node. Kept twice: in the store and in
/// [`IDENTITY_FILE`] beside it, so that a node whose store is damaged or gone
/// still knows it was part of a cluster (and must not form a new one, nor
/// take part in its old ranges' elections with an empty log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    node_id: u64,
    address: String,
    /// Set once the node is part of a cluster (formed or joined it).
    #[serde(default)]
    member: bool,
    /// Set once this node lost a store while a member (see [`StoreLoss`]);
    /// kept for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_lost: Option<StoreLoss>,
    /// The highest cluster version this node recorded that it must run (the
    /// one in force, or one the meta leader was raising it to; 0: none
    /// yet): a binary that runs less refuses this data dir (see
    /// [`crate::version`]).
    #[serde(default)]
    cluster_version: u32,
}

/// The last time this node's store was found damaged or missing and the
/// node started over with an empty one, rebuilt from its peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreLoss {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What was wrong with the store.
    pub reason: String,
    /// Where the damaged store was moved, if there was one.
    pub quarantined: Option<String>,
    /// How many times this node lost its store.
    pub count: u32,
}

/// The identity file in the data dir, outside the store.
const IDENTITY_FILE: &str = "identity.json";
/// Where damaged stores are moved, in the data dir.
const QUARANTINE_DIR: &str = "quarantine";
/// Damaged stores kept in [`QUARANTINE_DIR`]; older ones are deleted.
const QUARANTINE_KEEP: usize = 2;
/// How often a node logs that the meta leader refuses its heartbeats.
const HEARTBEAT_REFUSAL_LOG_EVERY: Duration = Duration::from_secs(30);
/// How often a node with a damaged store checks whether its peers can
/// rebuild it yet.
const RECOVERY_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long one of those checks may wait for a peer.
const RECOVERY_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Peers and leader hints one check follows at most.
const RECOVERY_TARGETS_MAX: usize = 8;

/// Ranges whose snapshot may cover their span before a split, with the
/// times they were marked (see [`Node::rebuild_stale_snapshots`]).
type StaleSnapshots = Arc<Mutex<HashMap<u64, u64>>>;

/// A running storage node.
pub struct Node {
    pub(crate) cfg: NodeConfig,
    pub(crate) engine: Arc<Engine>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) replicas: Arc<ReplicaMap>,
    pub(crate) pd: Pd,
    identity: Mutex<Identity>,
    create_lock: tokio::sync::Mutex<()>,
    split_tx: mpsc::Sender<(u64, u64)>,
    /// Ranges whose newest snapshot may still cover their span before a
    /// split, each with a count of the splits (or findings) that marked it:
    /// each reconcile tick asks them to rebuild it until it covers the new
    /// span (at most one entry per local range).
    stale_snapshots: StaleSnapshots,
    meta_leader_addr: Mutex<Option<String>>,
    served_since: Mutex<Instant>,
    /// The data column family's SST bytes at the last stats round, and per
    /// range id (applied index, when measured, size, keys): the last on-disk
    /// size measured, reused while nothing changed it.
    span_sizes: Mutex<SpanSizes>,
    /// Peer address → (last ping sent, last answer received), for the nodes
    /// that lead dormant ranges.
    peer_liveness: Arc<Mutex<std::collections::HashMap<String, (Instant, Instant)>>>,
    /// When a refused heartbeat was last logged.
    refusal_logged: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.cfg.node_id)
            .finish()
    }
}

impl Node {
    /// Opens the data dir (checking the node's identity) and every range it hosts.
    ///
    /// A damaged store (see `storage::durability`) is never served. With
    /// `recover_from_peers` on, and once the cluster can spare this node's
    /// replicas (every range it is a voter of keeps a quorum on other live
    /// nodes), the store is moved to `quarantine/` and the node starts over
    /// with an empty one under the same id; otherwise it waits (or, with the
    /// option off, exits) and leaves the store as it is.
    ///
    /// Why an empty store under the same id is safe: the node keeps knowing
    /// it is a member (the identity file), so it never forms a new cluster;
    /// it hosts no replica, so it casts no vote and acknowledges no entry in
    /// any of its old ranges; Raft messages for a range it does not host are
    /// refused, never answered by a new empty replica (the identity file
    /// marks the loss for good); and [`Node::create_replica`] refuses a range
    /// whose descriptor still lists this node as a voter. So a range only
    /// gets a replica here again after the placement driver removed this
    /// node from its voters (the missing-voter rule) and added it back as a
    /// learner that catches up from the leader before it is promoted: the
    /// node id never holds an empty log while it is a voter.
    pub async fn open(cfg: NodeConfig) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display())
        })?;
        let db_dir = cfg.data_dir.join("db");
        let from_file = read_identity_file(&cfg.data_dir)?;
        let mut me = Identity {
            node_id: cfg.node_id,
            address: cfg.advertise_addr(),
            member: false,
            store_lost: None,
            cluster_version: 0,
        };
        if let Some(f) = &from_file {
            check_identity(&cfg, f)?;
            // Before anything is done to the store (a damaged one is moved
            // aside below): a binary held below the recorded version stops here.
            check_cluster_version(&cfg, f.node_id, f.cluster_version)?;
            me.member = f.member;
            me.store_lost = f.store_lost.clone();
            me.cluster_version = f.cluster_version;
        }
        let mut lost: Option<(String, Option<PathBuf>)> = None;
        let mut engine = None;
        if db_dir.join("CURRENT").exists() {
            match Engine::open(&db_dir, &cfg.engine_options()) {
                Ok(e) => engine = Some(e),
                Err(e) if e.is_corruption() => {
                    let reason = e.to_string();
                    tracing::error!(data_dir = %cfg.data_dir.display(), error = %reason, "the store is damaged; it will not be served");
                    // Membership unknown (a store from before the identity
                    // file): counted as a member, which never forms a cluster.
                    let member = from_file.as_ref().is_none_or(|f| f.member);
                    if member {
                        if !cfg.file.recover_from_peers {
                            anyhow::bail!(
                                "the store in {} is damaged: {reason}. It was left as it is and is not served. \
                                 Restart with --recover-from-peers true to move it to {}/ and rebuild this node from its peers",
                                db_dir.display(),
                                cfg.data_dir.join(QUARANTINE_DIR).display()
                            );
                        }
                        wait_until_peers_can_rebuild(&cfg).await?;
                        me.member = true;
                    }
                    let moved = quarantine(&cfg.data_dir, &db_dir)?;
                    tracing::error!(
                        quarantined = %moved.display(),
                        "moved the damaged store aside; starting over with an empty store"
                    );
                    if member {
                        lost = Some((reason, Some(moved)));
                    }
                }
                Err(e) => {
                    anyhow::bail!("cannot open the storage in {}: {e}", cfg.data_dir.display())
                }
            }
        } else if me.member {
            // The identity says member but the store is gone (deleted, or a
            // quarantine interrupted after the move).
            tracing::error!(data_dir = %cfg.data_dir.display(), "this member node's store is missing; starting over with an empty store");
            lost = Some(("the store is missing".to_string(), None));
        }
        let engine = match engine {
            Some(e) => e,
            None => Engine::open(&db_dir, &cfg.engine_options()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the storage in {}: {e}",
                    cfg.data_dir.display()
                )
            })?,
        };
        let engine = Arc::new(engine);
        match engine.node_identity()? {
            Some(raw) => {
                let stored: Identity = serde_json::from_slice(&raw)?;
                check_identity(&cfg, &stored)?;
                me.member |= stored.member;
                me.cluster_version = me.cluster_version.max(stored.cluster_version);
                tracing::info!(node_id = me.node_id, "restarting with existing data");
            }
            None if lost.is_none() && from_file.is_none() => {
                tracing::info!(node_id = me.node_id, "initialized new data dir");
            }
            None => {}
        }
        if let Some((reason, moved)) = lost {
            let count = me.store_lost.as_ref().map_or(0, |l| l.count) + 1;
            let loss = StoreLoss {
                at_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                reason,
                quarantined: moved.map(|p| p.display().to_string()),
                count,
            };
            tracing::error!(
                node_id = me.node_id,
                reason = %loss.reason,
                quarantined = loss.quarantined.as_deref().unwrap_or("-"),
                losses = count,
                "STORE LOST: this node rejoins with an empty store; it hosts no replica and takes no part in its old ranges until the placement driver replaces them from the healthy peers"
            );
            me.member = true;
            me.store_lost = Some(loss);
        }
        check_cluster_version(&cfg, me.node_id, me.cluster_version)?;
        write_identity_file(&cfg.data_dir, &me)?;
        engine.put_node_identity(&serde_json::to_vec(&me)?)?;
        let (split_tx, split_rx) = mpsc::channel(SPLIT_QUEUE_MAX);
        let pool = PeerPool::new(
            me.node_id,
            cfg.source_ip,
            cfg.file.raft_append_stream,
            cfg.file.raft_append_pipeline,
        );
        let node = Arc::new(Node {
            pd: Pd::new(&cfg),
            cfg,
            engine: engine.clone(),
            pool,
            replicas: Arc::new(ReplicaMap::default()),
            identity: Mutex::new(me),
            create_lock: tokio::sync::Mutex::new(()),
            split_tx,
            stale_snapshots: StaleSnapshots::default(),
            meta_leader_addr: Mutex::new(None),
            served_since: Mutex::new(Instant::now()),
            span_sizes: Mutex::new((0, std::collections::HashMap::new())),
            peer_liveness: Arc::new(Mutex::new(std::collections::HashMap::new())),
            refusal_logged: Mutex::new(None),
        });
        let ids = engine.local_range_ids()?;
        for id in &ids {
            node.open_replica(*id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if !ids.is_empty() {
            node.set_member()?;
        }
        tracing::info!(ranges = ids.len(), "opened local ranges");
        // Stray Raft messages for ranges this node does not know create them
        // (unless tombstoned); the right-hand halves of splits are opened here.
        // Not on a node that lost its store: it may still be a voter of the
        // range with an empty log (see `Node::open`), so it refuses instead.
        let weak = Arc::downgrade(&node);
        let refuse_unknown = node.store_loss().is_some();
        node.replicas.set_creator(Arc::new(move |range_id| {
            let weak = weak.clone();
            Box::pin(async move {
                if refuse_unknown {
                    return Err(Error::RangeNotFound { range_id });
                }
                match weak.upgrade() {
                    Some(n) => n.open_replica(range_id).await,
                    None => Err(Error::unavailable("node is stopping")),
                }
            })
        }));
        tokio::spawn(Self::open_split_ranges(Arc::downgrade(&node), split_rx));
        tokio::spawn(Self::find_stale_snapshots(
            node.replicas.all(),
            node.stale_snapshots.clone(),
        ));
        Ok(node)
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// Whether this node is part of a cluster.
    pub fn is_member(&self) -> bool {
        self.identity.lock().expect("identity lock").member
    }

    fn set_member(&self) -> anyhow::Result<()> {
        let mut id = self.identity.lock().expect("identity lock");
        if !id.member {
            id.member = true;
            write_identity_file(&self.cfg.data_dir, &id)?;
            self.engine.put_node_identity(&serde_json::to_vec(&*id)?)?;
        }
        Ok(())
    }

    /// The highest cluster version this node recorded that it must run (0:
    /// none).
    pub fn cluster_version_seen(&self) -> u32 {
        self.identity.lock().expect("identity lock").cluster_version
    }

    /// Records that this node must run cluster version `version` at least
    /// (from the meta leader), durably and before it says so in a
    /// heartbeat, so this data dir refuses a binary that runs less.
    fn note_cluster_version(&self, version: u32) -> anyhow::Result<()> {
        let mut id = self.identity.lock().expect("identity lock");
        if version > id.cluster_version {
            let mut next = id.clone();
            next.cluster_version = version;
            write_identity_file(&self.cfg.data_dir, &next)?;
            self.engine.put_node_identity(&serde_json::to_vec(&next)?)?;
            *id = next;
            tracing::info!(
                cluster_version = version,
                "recorded the cluster version this node must run"
            );
        }
        Ok(())
    }

    /// When this node last lost its store and rebuilt it from its peers.
    pub fn store_loss(&self) -> Option<StoreLoss> {
        self.identity
            .lock()
            .expect("identity lock")
            .store_lost
            .clone()
    }

    /// One line on the last store loss, for status reports (empty: none).
    pub fn store_loss_note(&self) -> String {
        let Some(l) = self.store_loss() else {
            return String::new();
        };
        format!(
            "store lost {} time(s), last at unix ms {}: {}; damaged store kept in {}; replicas are rebuilt from peers",
            l.count,
            l.at_unix_ms,
            l.reason,
            l.quarantined.as_deref().unwrap_or("(none: it was missing)")
        )
    }

    /// Opens (creating when new) this node's replica of `range_id`; returns
    /// the open one when it already is.
    pub async fn open_replica(&self, range_id: u64) -> Result<Arc<RangeReplica>, Error> {
        if let Ok(r) = self.replicas.get(range_id) {
            return Ok(r);
        }
        let _guard = self.create_lock.lock().await;
        if let Ok(r) = self.replicas.get(range_id) {
            return Ok(r);
        }
        if self
            .engine
            .is_tombstoned(range_id)
            .map_err(|e| Error::internal(e.to_string()))?
        {
            return Err(Error::RangeNotFound { range_id });
        }
        let tx = self.split_tx.clone();
        let stale = self.stale_snapshots.clone();
        let hook = Arc::new(move |new_id: u64| {
            // The range's snapshot covers its span before the split until it
            // is rebuilt; the reconcile tick sees to it if nothing else does.
            *stale.lock().unwrap().entry(range_id).or_default() += 1;
            if tx.try_send((range_id, new_id)).is_err() {
                tracing::warn!(
                    range_id,
                    new_id,
                    "split queue full; the range opens at the next reconcile"
                );
            }
        });
        let r = RangeReplica::open(
            self.engine.clone(),
            self.pool.clone(),
            range_id,
            &self.cfg.data_dir,
            self.cfg.raft_tuning(),
            hook,
        )
        .await?;
        self.replicas.insert(r.clone());
        tracing::debug!(range_id, "opened range replica");
        Ok(r)
    }

    /// Marks for a rebuild the snapshot of each of `replicas` that still
    /// covers its span before a split: the rebuild that follows a split (see
    /// [`RangeReplica::snapshot_after_split`]) does not survive a restart,
    /// and until it is done a node that holds the other half refuses the
    /// snapshot, so the range could not gain a replica there.
    async fn find_stale_snapshots(replicas: Vec<Arc<RangeReplica>>, stale: StaleSnapshots) {
        for r in replicas {
            let check = r.clone();
            let differs = tokio::task::spawn_blocking(move || check.snapshot_span_differs())
                .await
                .unwrap_or(false);
            if differs {
                tracing::info!(
                    range_id = r.range_id(),
                    "the range's snapshot covers its span before a split; rebuilding it"
                );
                *stale.lock().unwrap().entry(r.range_id()).or_default() += 1;
                Self::rebuild_snapshot(r, stale.clone());
            }
        }
    }

    /// Rebuilds `r`'s snapshot for its span, and drops the range from
    /// `stale` once that is done, unless a split marked it again meanwhile
    /// (a call while another runs does nothing).
    fn rebuild_snapshot(r: Arc<RangeReplica>, stale: StaleSnapshots) {
        tokio::spawn(async move {
            let id = r.range_id();
            let marked = stale.lock().unwrap().get(&id).copied();
            if r.snapshot_after_split().await {
                let mut stale = stale.lock().unwrap();
                if stale.get(&id).copied() == marked {
                    stale.remove(&id);
                }
            }
        });
    }

    /// Asks each range of `stale_snapshots` to rebuild its snapshot; drops
    /// those not among `local` (the ranges on disk; `None` when they could
    /// not be listed: then every mark is kept).
    fn rebuild_stale_snapshots(&self, local: Option<&[u64]>) {
        let ids: Vec<u64> = self
            .stale_snapshots
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect();
        for id in ids {
            match self.replicas.get(id) {
                Ok(r) => Self::rebuild_snapshot(r, self.stale_snapshots.clone()),
                Err(_) => {
                    if local.is_some_and(|l| !l.contains(&id)) {
                        self.stale_snapshots.lock().unwrap().remove(&id);
                    }
                }
            }
        }
    }

    async fn open_split_ranges(node: Weak<Node>, mut rx: mpsc::Receiver<(u64, u64)>) {
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some((left, right)) = m else { return };
                    let Some(n) = node.upgrade() else { return };
                    match n.open_replica(right).await {
                        Ok(r) => {
                            // The left range's leader campaigns first for the
                            // right half, so it gets a leader without waiting
                            // for an election timeout.
                            if n.replicas.get(left).map(|l| l.leader_id() == n.node_id()).unwrap_or(false) {
                                r.campaign().await;
                            }
                            // The left range's current snapshot still covers
                            // the old span; new members need one of the new.
                            if let Ok(l) = n.replicas.get(left) {
                                Self::rebuild_snapshot(l, n.stale_snapshots.clone());
                            }
                        }
                        Err(e) => tracing::warn!(left, right, error = %e, "cannot open split range"),
                    }
                }
                _ = tick.tick() => {
                    let Some(n) = node.upgrade() else { return };
                    let local = n.engine.local_range_ids();
                    n.rebuild_stale_snapshots(local.as_deref().ok());
                    if let Ok(ids) = local {
                        for id in ids {
                            if n.replicas.get(id).is_err() {
                                if let Err(e) = n.open_replica(id).await {
                                    tracing::warn!(range_id = id, error = %e, "cannot open range");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Shuts down and deletes this node's replica of `range_id`, leaving a
    /// tombstone so stray messages do not bring it back.
    pub async fn destroy_replica(&self, range_id: u64) -> Result<(), Error> {
        let _guard = self.create_lock.lock().await;
        let Some(r) = self.replicas.remove(range_id) else {
            return Ok(());
        };
        // Before the shutdown: an install openraft has queued must not
        // begin its import once the group is gone.
        r.abort_installs();
        // Bounded: everything that opens a replica waits for this lock.
        if tokio::time::timeout(REPLICA_SHUTDOWN_TIMEOUT, r.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(range_id, "replica shutdown took longer than {REPLICA_SHUTDOWN_TIMEOUT:?}; removing its data anyway");
        }
        // An import under way stops at its next batch (deleting what it
        // wrote); its data, state and marker must not outlive the removal.
        let waited = std::time::Instant::now();
        r.stop_installs().await;
        if waited.elapsed() > REPLICA_SHUTDOWN_TIMEOUT {
            tracing::warn!(
                range_id,
                waited_ms = waited.elapsed().as_millis() as u64,
                "waited long for the replica's snapshot import to stop"
            );
        }
        let meta = r.meta();
        // Delete the data span only when no other local range holds any of
        // it or is installing into it; the claim keeps installs out of the
        // span until the data is gone. This range's own install releases
        // its claim a moment after its import ended.
        let claim = if r.is_ready() {
            let mut tries = 0;
            loop {
                match self.replicas.claim_span(range_id, &meta.start, &meta.end) {
                    Ok(c) => break Some(c),
                    Err(owner) if owner == range_id && tries < OWN_CLAIM_WAITS_MAX => {
                        tries += 1;
                        tokio::time::sleep(OWN_CLAIM_WAIT).await;
                    }
                    Err(_) => break None,
                }
            }
        } else {
            None
        };
        let span = claim.as_ref().map(|_| (&meta.start[..], &meta.end[..]));
        self.engine
            .destroy_range(range_id, span)
            .map_err(|e| Error::internal(e.to_string()))?;
        let _ = std::fs::remove_dir_all(
            self.cfg
                .data_dir
                .join("snapshots")
                .join(format!("range-{range_id}")),
        );
        tracing::info!(range_id, "removed range replica");
        Ok(())
    }

    /// Prepares an empty replica of a range that will be brought up to date
    /// by its leader (clears an old tombstone).
    pub async fn create_replica(&self, desc: &StoredDesc) -> Result<(), Error> {
        if let Ok(r) = self.replicas.get(desc.range_id) {
            let faulted = r.fault();
            drop(r);
            match faulted {
                None => return Ok(()),
                // The faulted replica this one replaces: its data goes
                // first, once it is no voter (checked below, as for a
                // replica this node lost).
                Some(reason) if !desc.voters.contains(&self.node_id()) => {
                    tracing::info!(range_id = desc.range_id, %reason, "removing the faulted replica to add a fresh one");
                    self.destroy_replica(desc.range_id).await?;
                }
                Some(reason) => {
                    return Err(Error::unavailable(format!(
                        "node {}'s replica of range {} refuses to serve ({reason}); remove it from the voters first",
                        self.node_id(),
                        desc.range_id
                    )))
                }
            }
        }
        // An empty replica in a voter's seat could vote with an empty log
        // (this node lost the range, e.g. with its store): it must be
        // removed from the voters and come back as a learner first.
        if desc.voters.contains(&self.node_id()) {
            return Err(Error::invalid_argument(
                "descriptor",
                format!(
                    "node {} is a voter of range {} but holds no replica of it; remove it from the voters first",
                    self.node_id(),
                    desc.range_id
                ),
            ));
        }
        for o in self.replicas.all() {
            let (s, e) = o.effective_span();
            if o.is_ready() && spans_overlap((&s, &e), (&desc.start, &desc.end)) {
                return Err(Error::unavailable(format!(
                    "range {} overlaps local range {}; retry once it is removed",
                    desc.range_id,
                    o.range_id()
                )));
            }
        }
        self.engine
            .clear_tombstone(desc.range_id)
            .map_err(|e| Error::internal(e.to_string()))?;
        self.open_replica(desc.range_id).await.map(|_| ())
    }

    /// The local replica serving user `key` when the client named no range:
    /// the ready range holding it (the meta range only for system keys).
    pub fn replica_for_key(&self, key: &[u8]) -> Result<Arc<RangeReplica>, Error> {
        let system = key.first() == Some(&lmskv_proto::keys::SYSTEM_KEY_PREFIX);
        self.replicas
            .all()
            .into_iter()
            .filter(|r| r.is_ready() && (r.range_id() == META_RANGE_ID) == system)
            .filter(|r| r.meta().contains(key))
            .max_by_key(|r| r.meta().version)
            .ok_or(Error::RangeNotFound { range_id: 0 })
    }

    /// The replica of `range_id`.
    pub fn replica(&self, range_id: u64) -> Result<Arc<RangeReplica>, Error> {
        let r = self.replicas.get(range_id)?;
        if !r.is_ready() {
            return Err(Error::RangeNotFound { range_id });
        }
        Ok(r)
    }

    /// The descriptor of a replica's range as this replica knows it.
    pub fn stored_desc(&self, r: &RangeReplica) -> StoredDesc {
        let m = r.meta();
        if m.voters.is_empty() {
            // Not initialized yet: the membership Raft knows, if any.
            let st = r.status();
            return StoredDesc::new(&m, st.voters, st.learners);
        }
        // The applied membership, consistent with `conf_ver` (the Raft
        // metrics show the latest appended config, which may not be applied).
        let (v, l) = (m.voters.clone(), m.learners.clone());
        StoredDesc::new(&m, v, l)
    }

    /// The descriptor of a replica's range as clients see it.
    pub fn descriptor(&self, r: &RangeReplica) -> RangeDescriptor {
        self.stored_desc(r).to_proto()
    }

    /// The current descriptors of `r`'s range and of the local ranges that
    /// follow it (the right-hand halves of its splits), for `EpochMismatch`.
    pub fn current_descriptors(&self, r: &RangeReplica) -> Vec<RangeDescriptor> {
        let mut out = vec![self.descriptor(r)];
        let mut ready: Vec<Arc<RangeReplica>> = self
            .replicas
            .all()
            .into_iter()
            .filter(|o| o.is_ready() && o.range_id() != r.range_id())
            .collect();
        ready.sort_by(|a, b| a.meta().start.cmp(&b.meta().start));
        let mut end = r.meta().end;
        for o in ready {
            if out.len() >= 8 || end.is_empty() {
                break;
            }
            if o.meta().start == end {
                end = o.meta().end;
                out.push(self.descriptor(&o));
            }
        }
        out
    }

    /// Forms a new cluster with the nodes named in `--join`, or joins the
    /// running cluster one of them belongs to; then reports to the meta
    /// leader until `stop` fires.
    pub async fn run_background(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let hb = tokio::spawn(self.clone().heartbeat_loop(stop.clone()));
        let live = tokio::spawn(self.clone().liveness_loop(stop.clone()));
        let pd = tokio::spawn(crate::pd::run(self.clone(), stop.clone()));
        self.bootstrap(stop).await;
        let _ = hb.await;
        pd.abort();
        live.abort();
    }

    async fn bootstrap(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
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
            if self.is_member() {
                return;
            }
            if peers.is_empty() {
                // A node named alone forms a single-node cluster.
                let members = BTreeMap::from([(self.cfg.node_id, me.clone())]);
                match self.form(members).await {
                    Ok(()) => tracing::info!("formed a single-node cluster"),
                    Err(e) => tracing::error!(error = %e, "cannot initialize"),
                }
                return;
            }
            match self.bootstrap_round(&peers).await {
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

    /// Creates the meta range on `members` (the first replication-factor ids).
    async fn form(&self, members: BTreeMap<u64, String>) -> Result<(), Error> {
        let r = self.open_replica(META_RANGE_ID).await?;
        r.initialize(members).await?;
        self.set_member()
            .map_err(|e| Error::internal(e.to_string()))?;
        Ok(())
    }

    /// One bootstrap attempt; `Ok(true)` when this node is now part of a cluster.
    async fn bootstrap_round(&self, peers: &[String]) -> Result<bool, String> {
        let mut ids = BTreeMap::from([(self.cfg.node_id, self.cfg.advertise_addr())]);
        let mut missing = Vec::new();
        for addr in peers {
            match self.identify(addr).await {
                Ok(resp) if resp.initialized => {
                    // A running cluster exists: heartbeats register this node.
                    self.set_member().map_err(|e| e.to_string())?;
                    tracing::info!(via = %addr, "joining the running cluster");
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
            let members: BTreeMap<u64, String> = ids
                .into_iter()
                .take(self.cfg.file.replication_factor)
                .collect();
            tracing::info!(members = ?members, "forming a new cluster");
            self.form(members).await.map_err(|e| e.to_string())?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn identify(&self, addr: &str) -> Result<lmskv_proto::v1::IdentifyResponse, String> {
        let mut c = AdminClient::new(self.pool.channel(addr)?);
        let r = tokio::time::timeout(BOOTSTRAP_PROBE_TIMEOUT, c.identify(IdentifyRequest {}))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|s| s.message().to_string())?;
        Ok(r.into_inner())
    }

    /// The local meta replica when it is the meta range's leader.
    pub fn local_meta_leader(&self) -> Option<Arc<RangeReplica>> {
        let r = self.replicas.get(META_RANGE_ID).ok()?;
        // The Raft state, not the leader id: a leader removed from the meta
        // range steps down to learner but may still name itself as leader.
        (r.is_ready() && r.is_leader_now()).then_some(r)
    }

    /// Where the meta leader probably is: the cached answer, the local meta
    /// replica's leader, the known peers.
    fn meta_leader_candidates(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = self.meta_leader_addr.lock().expect("hint lock").clone() {
            out.push(a);
        }
        if let Ok(r) = self.replicas.get(META_RANGE_ID) {
            if let Some(h) = r.leader_hint() {
                out.push(h.address);
            }
        }
        for r in self.replicas.all() {
            out.extend(r.status().nodes.into_values());
        }
        out.extend(self.cfg.join.iter().cloned());
        let me = self.cfg.advertise_addr();
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| *a != me && seen.insert(a.clone()));
        out
    }

    /// Stats of every ready local replica, as heartbeats report them.
    pub fn range_stats(&self) -> Vec<RangeStats> {
        let elapsed = {
            let mut since = self.served_since.lock().expect("stats lock");
            let e = since.elapsed().as_secs_f64().max(0.001);
            *since = Instant::now();
            e
        };
        // Sizes are measured again only for ranges that applied something,
        // after a flush or compaction, or after a while: measuring every
        // idle range every heartbeat would cost more than the range itself.
        // A busy range is measured at most once every
        // SIZE_MEASURE_HEARTBEATS heartbeats: a measurement walks its
        // memtable entries (old versions included), which under a steady
        // write load cost some 5% of the node's CPU when done every second.
        let measure_every = Duration::from_millis(
            self.cfg
                .file
                .node_heartbeat_ms
                .saturating_mul(SIZE_MEASURE_HEARTBEATS),
        );
        let sst = self.engine.data_sst_bytes();
        let mut guard = self.span_sizes.lock().expect("sizes lock");
        let (last_sst, sizes) = &mut *guard;
        let sst_changed = std::mem::replace(last_sst, sst) != sst;
        let replicas = self.replicas.all();
        let live: std::collections::HashSet<u64> = replicas.iter().map(|r| r.range_id()).collect();
        sizes.retain(|id, _| live.contains(id));
        replicas
            .into_iter()
            .filter(|r| r.is_ready())
            .map(|r| {
                let st = r.status();
                let (size, keys) = if r.range_id() == META_RANGE_ID {
                    (0, 0)
                } else {
                    match sizes.get(&r.range_id()) {
                        Some(&(applied, at, size, keys))
                            if at.elapsed() < measure_every
                                || (!sst_changed
                                    && applied == st.applied_index
                                    && at.elapsed() < SIZE_REMEASURE_AFTER) =>
                        {
                            (size, keys)
                        }
                        _ => {
                            let m = r.meta();
                            let (size, keys) = self.engine.approximate_span_size(&m.start, &m.end);
                            sizes.insert(
                                r.range_id(),
                                (st.applied_index, Instant::now(), size, keys),
                            );
                            (size, keys)
                        }
                    }
                };
                RangeStats {
                    descriptor: Some(self.descriptor(&r)),
                    leader: r.is_leader_now(),
                    size_bytes: size,
                    keys,
                    qps: r.take_served() as f64 / elapsed,
                    applied_index: st.applied_index,
                    leader_id: st.leader_id.unwrap_or(0),
                }
            })
            .collect()
    }

    /// Puts idle ranges to sleep (leader side) and wakes dormant followers
    /// whose leader's node stopped answering, so that a hibernating range
    /// still fails over when its leader dies.
    async fn liveness_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // A live node answers a ping every LIVENESS_PING_EVERY, checked every
        // LIVENESS_TICK: silence shorter than two ping rounds is no sign of
        // death (with the 400 ms default lease alone, every live leader
        // looked dead between two answers and its dormant ranges held
        // elections over and over).
        let dead_after =
            Duration::from_millis(self.cfg.file.election_timeout_ms_max) + 2 * LIVENESS_PING_EVERY;
        // A range with no request or proposal for this long stops its
        // heartbeats.
        let hibernate_after = Duration::from_millis(self.cfg.file.range_hibernate_after_ms);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LIVENESS_TICK) => {}
                _ = stop.changed() => return,
            }
            n += 1;
            let replicas = self.replicas.all();
            if n.is_multiple_of(4) {
                for r in &replicas {
                    if r.range_id() != META_RANGE_ID {
                        r.hibernate_tick(hibernate_after);
                    }
                }
            }
            let now = Instant::now();
            // Grouped by leader node id first (no address lookups per
            // replica: a node may host thousands of dormant ones).
            let mut by_leader: std::collections::HashMap<u64, Vec<Arc<RangeReplica>>> =
                std::collections::HashMap::new();
            for r in replicas {
                if let Some(leader) = r.dormant_leader() {
                    by_leader.entry(leader).or_default().push(r);
                }
            }
            let mut waiting: std::collections::HashMap<String, Vec<Arc<RangeReplica>>> =
                std::collections::HashMap::new();
            for (_, rs) in by_leader {
                if let Some(h) = rs.first().and_then(|r| r.leader_hint()) {
                    waiting.entry(h.address).or_default().extend(rs);
                }
            }
            let mut live = self.peer_liveness.lock().expect("liveness lock");
            live.retain(|a, _| waiting.contains_key(a));
            for (addr, rs) in waiting {
                let (sent, ok) = *live
                    .entry(addr.clone())
                    .or_insert((now - LIVENESS_PING_EVERY, now));
                if now.duration_since(ok) > dead_after {
                    tracing::info!(leader = %addr, ranges = rs.len(), "leader node silent; dormant ranges resume elections");
                    for r in rs {
                        r.wake_follower();
                    }
                    live.remove(&addr);
                    continue;
                }
                if now.duration_since(sent) >= LIVENESS_PING_EVERY {
                    live.insert(addr.clone(), (now, ok));
                    let Ok(ch) = self.pool.channel(&addr) else {
                        continue;
                    };
                    let table = self.peer_liveness.clone();
                    tokio::spawn(async move {
                        let mut c = AdminClient::new(ch);
                        let answered = tokio::time::timeout(
                            LIVENESS_PING_EVERY,
                            c.identify(IdentifyRequest {}),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        if answered {
                            if let Some(e) = table.lock().expect("liveness lock").get_mut(&addr) {
                                e.1 = Instant::now();
                            }
                        }
                    });
                }
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.file.node_heartbeat_ms);
        // The stats the meta leader has of each range, as last sent: only
        // changes are sent between full reports.
        let mut sent: HashMap<u64, RangeStats> = HashMap::new();
        let mut since_full = u32::MAX;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if !self.is_member() {
                continue;
            }
            let all = self.range_stats();
            let full = since_full >= HEARTBEATS_PER_FULL_REPORT;
            let range_ids: Vec<u64> = all
                .iter()
                .filter_map(|r| r.descriptor.as_ref().map(|d| d.range_id))
                .collect();
            let ranges: Vec<RangeStats> = if full {
                all.clone()
            } else {
                all.iter()
                    .filter(|r| {
                        r.descriptor
                            .as_ref()
                            .is_none_or(|d| sent.get(&d.range_id) != Some(*r))
                    })
                    .cloned()
                    .collect()
            };
            let faulted_range_ids: Vec<u64> = self
                .replicas
                .all()
                .iter()
                .filter(|r| r.fault().is_some())
                .map(|r| r.range_id())
                .collect();
            let req = HeartbeatRequest {
                node_id: self.node_id(),
                address: self.cfg.advertise_addr(),
                ranges,
                range_ids,
                full,
                faulted_range_ids,
                cluster_version_max: self.cfg.cluster_version_max(),
                cluster_version_seen: self.cluster_version_seen(),
            };
            let resp = if self.local_meta_leader().is_some() {
                crate::pd::handle_heartbeat(&self, req).await.ok()
            } else {
                self.send_heartbeat(req).await
            };
            match &resp {
                // Whoever leads the meta range now has these stats.
                Some(r) if !r.want_full => {
                    since_full = if full {
                        1
                    } else {
                        since_full.saturating_add(1)
                    };
                    sent = all
                        .into_iter()
                        .filter_map(|r| r.descriptor.as_ref().map(|d| d.range_id).map(|id| (id, r)))
                        .collect();
                }
                // Unheard, or a new meta leader: report everything next time.
                _ => since_full = u32::MAX,
            }
            if let Some(resp) = resp {
                if resp.cluster_version > 0 {
                    if let Err(e) = self.note_cluster_version(resp.cluster_version) {
                        tracing::warn!(error = %e, "cannot record the cluster version");
                    }
                }
                for id in resp.remove_ranges {
                    if let Err(e) = self.destroy_replica(id).await {
                        tracing::warn!(range_id = id, error = %e, "cannot remove range");
                    }
                }
            }
        }
    }

    async fn send_heartbeat(
        &self,
        req: HeartbeatRequest,
    ) -> Option<lmskv_proto::v1::HeartbeatResponse> {
        let mut targets = self.meta_leader_candidates();
        let mut tried = 0;
        while let Some(addr) = targets.first().cloned() {
            targets.remove(0);
            tried += 1;
            if tried > 8 {
                break;
            }
            let Ok(ch) = self.pool.channel(&addr) else {
                continue;
            };
            let mut c = AdminClient::new(ch);
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, c.heartbeat(req.clone())).await {
                Ok(Ok(resp)) => {
                    *self.meta_leader_addr.lock().expect("hint lock") = Some(addr);
                    return Some(resp.into_inner());
                }
                Ok(Err(status)) => match Error::from_status(&status) {
                    Error::NotLeader {
                        leader: Some(h), ..
                    } if !h.address.is_empty() && h.address != self.cfg.advertise_addr() => {
                        targets.insert(0, h.address);
                    }
                    // Refused for good (this node runs less than the
                    // cluster): said loudly, at most every half minute.
                    Error::InvalidArgument { reason, .. } => {
                        let mut last = self.refusal_logged.lock().expect("refusal lock");
                        if last.is_none_or(|t| t.elapsed() >= HEARTBEAT_REFUSAL_LOG_EVERY) {
                            *last = Some(Instant::now());
                            tracing::error!(meta_leader = %addr, %reason, "the meta leader refuses this node's heartbeats");
                        }
                        break;
                    }
                    _ => {}
                },
                Err(_) => {}
            }
        }
        *self.meta_leader_addr.lock().expect("hint lock") = None;
        None
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

/// Refuses a node that recorded cluster version `recorded` but runs less.
fn check_cluster_version(cfg: &NodeConfig, node_id: u64, recorded: u32) -> anyhow::Result<()> {
    if recorded > cfg.cluster_version_max() {
        anyhow::bail!(
            "node {node_id} has run in a cluster at version {recorded}, and this node runs at most version {} \
             (this binary runs up to {}{}): a cluster never goes back to an older version; \
             start it with a binary that runs version {recorded} (and no lower --cluster-version-max)",
            cfg.cluster_version_max(),
            crate::version::CLUSTER_VERSION,
            if cfg.file.cluster_version_max.is_some() {
                ", held lower by --cluster-version-max"
            } else {
                ""
            },
        );
    }
    Ok(())
}

fn check_identity(cfg: &NodeConfig, stored: &Identity) -> anyhow::Result<()> {
    if stored.node_id != cfg.node_id {
        anyhow::bail!(
            "data dir {} belongs to node {}, not node {}",
            cfg.data_dir.display(),
            stored.node_id,
            cfg.node_id
        );
    }
    if stored.address != cfg.advertise_addr() {
        anyhow::bail!(
            "node {} was created with address {}; start it with --listen {}",
            cfg.node_id,
            stored.address,
            stored.address
        );
    }
    Ok(())
}

/// The identity file of `data_dir`, if there is one. An unreadable one is an
/// error: guessing could make a member node form a new cluster.
fn read_identity_file(data_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{} is damaged ({e}); fix it by hand (it names the node id, address and whether the node is a cluster member)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Replaces the identity file durably (write, sync, rename, sync the dir).
fn write_identity_file(data_dir: &Path, id: &Identity) -> anyhow::Result<()> {
    let path = data_dir.join(IDENTITY_FILE);
    let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
    let mut raw = serde_json::to_vec_pretty(id)?;
    raw.push(b'\n');
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &raw)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Moves the store in `db_dir` to a new directory under `quarantine/` and
/// deletes all but the newest [`QUARANTINE_KEEP`] stores there.
fn quarantine(data_dir: &Path, db_dir: &Path) -> anyhow::Result<PathBuf> {
    let qdir = data_dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", qdir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let to = qdir.join(format!("db-{stamp}"));
    std::fs::rename(db_dir, &to).map_err(|e| {
        anyhow::anyhow!(
            "cannot move the damaged store {} to {}: {e}",
            db_dir.display(),
            to.display()
        )
    })?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot sync {}: {e}", data_dir.display()))?;
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&qdir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("db-"))
                })
                .collect()
        })
        .unwrap_or_default();
    // Names sort by time: the stamps have the same number of digits for
    // centuries.
    kept.sort();
    while kept.len() > QUARANTINE_KEEP {
        let old = kept.remove(0);
        match std::fs::remove_dir_all(&old) {
            Ok(()) => tracing::warn!(path = %old.display(), "deleted an older quarantined store"),
            Err(e) => {
                tracing::warn!(path = %old.display(), error = %e, "cannot delete an older quarantined store")
            }
        }
    }
    Ok(to)
}

/// Waits until the cluster can rebuild this node's replicas: its meta range
/// answers, and every range that lists this node as a voter keeps a quorum
/// of voters on other nodes that are up. A node whose peers are all down or
/// damaged too keeps its store where it is and waits (logging why).
async fn wait_until_peers_can_rebuild(cfg: &NodeConfig) -> anyhow::Result<()> {
    let me = cfg.advertise_addr();
    let peers: Vec<String> = cfg.join.iter().filter(|a| **a != me).cloned().collect();
    if peers.is_empty() {
        anyhow::bail!(
            "the store in {} is damaged and this node has no peers (--join) to rebuild it from; it was left as it is",
            cfg.data_dir.display()
        );
    }
    let pool = PeerPool::new(cfg.node_id, cfg.source_ip, false, 1);
    let mut attempt = 0u64;
    loop {
        match peers_can_rebuild(cfg.node_id, &pool, &peers).await {
            Ok(()) => return Ok(()),
            Err(why) => {
                if attempt.is_multiple_of(15) {
                    tracing::warn!(reason = %why, "the damaged store stays in place until the peers can rebuild this node");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(RECOVERY_CHECK_INTERVAL).await;
    }
}

/// One check of [`wait_until_peers_can_rebuild`].
async fn peers_can_rebuild(me: u64, pool: &PeerPool, peers: &[String]) -> Result<(), String> {
    let mut targets: Vec<String> = peers.to_vec();
    let mut tried = 0;
    let mut last = "no peer answered".to_string();
    while let Some(addr) = targets.first().cloned() {
        targets.remove(0);
        tried += 1;
        if tried > RECOVERY_TARGETS_MAX {
            break;
        }
        let Ok(ch) = pool.channel(&addr) else {
            continue;
        };
        let mut c = AdminClient::new(ch);
        let ranges =
            match tokio::time::timeout(RECOVERY_CALL_TIMEOUT, c.range_list(RangeListRequest {}))
                .await
            {
                Ok(Ok(r)) => r.into_inner().ranges,
                Ok(Err(status)) => {
                    if let Error::NotLeader {
                        leader: Some(h), ..
                    } = Error::from_status(&status)
                    {
                        if !h.address.is_empty() && !targets.contains(&h.address) {
                            targets.insert(0, h.address);
                        }
                    }
                    last = format!("{addr}: {}", status.message());
                    continue;
                }
                Err(_) => {
                    last = format!("{addr}: timed out");
                    continue;
                }
            };
        let nodes = match tokio::time::timeout(
            RECOVERY_CALL_TIMEOUT,
            c.node_list(NodeListRequest {}),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner().nodes,
            Ok(Err(s)) => return Err(format!("{addr}: {}", s.message())),
            Err(_) => return Err(format!("{addr}: timed out")),
        };
        let up: std::collections::HashSet<u64> = nodes
            .iter()
            .filter(|n| n.state == "up" && n.node_id != me)
            .map(|n| n.node_id)
            .collect();
        let mut short = Vec::new();
        for r in &ranges {
            let Some(d) = &r.descriptor else { continue };
            let d = StoredDesc::from_proto(d);
            if !d.voters.contains(&me) {
                continue;
            }
            let others = d.voters.iter().filter(|v| up.contains(v)).count();
            if others < d.voters.len() / 2 + 1 {
                short.push(format!(
                    "range {} (voters {:?}, up besides this node: {others})",
                    d.range_id, d.voters
                ));
            }
        }
        if short.is_empty() {
            return Ok(());
        }
        return Err(format!(
            "ranges without a quorum on other live nodes: {}",
            short.join(", ")
        ));
    }
    Err(last)
}
