//! The placement driver. It runs on whichever node leads the meta range and
//! keeps the cluster in shape: it registers nodes from their heartbeats,
//! keeps range descriptors in the meta range current, splits ranges that
//! grow too large or too hot, replaces replicas on dead or decommissioned
//! nodes, and balances replicas and leaders across live nodes.
//!
//! Everything it decides is derived from the meta range (descriptors, node
//! records, pending operations) plus heartbeats, so a new meta leader picks up
//! where the old one stopped: pending replica changes are stored in the meta
//! range before they start and finished by whoever leads next. Liveness is
//! kept in memory only; a new leader grants every node one dead-node timeout
//! of grace before it calls any node dead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::range::{META_RANGE_ID, USER_SPACE_START};
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::{
    ChangeReplicasRequest, CreateReplicaRequest, HeartbeatRequest, HeartbeatResponse, NodeInfo,
    RangeEpoch, RangeInfo, RangeStats, SplitRangeRequest, TransferLeaderRequest,
};
use tokio::sync::{watch, Semaphore};

use crate::config::NodeConfig;
use crate::meta::{MetaStore, NodeRecord, NodeState, PendingOp, StoredDesc};
use crate::node::Node;
use crate::storage::StorageError;

/// Replica changes the driver runs at once.
const OPS_INFLIGHT_MAX: usize = 4;
/// How long one node-to-node placement call may take (a learner catching up
/// by snapshot is part of a replica change).
const PLACEMENT_CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// Longest one replica change may run before its slot is freed for others
/// (it is planned again in a later round if still needed).
const OP_TIMEOUT: Duration = Duration::from_secs(45);
/// A range whose replica change failed waits this long before the driver
/// starts one again, doubled per failure in a row up to
/// [`CHANGE_RETRY_WAIT_MAX`]: a change that keeps failing (say, a new
/// replica on a node whose disk faults again) costs a try, and perhaps a
/// snapshot, every 8 s instead of every round.
const CHANGE_RETRY_WAIT_MIN: Duration = Duration::from_secs(1);
const CHANGE_RETRY_WAIT_MAX: Duration = Duration::from_secs(8);
/// The least lateness of the driver's round timer taken as a stall of its
/// process (with half the dead-node timeout, if that is longer).
const STALL_AFTER_MIN: Duration = Duration::from_secs(5);
/// The longest wait before an automatic split that keeps failing is tried
/// again ([`split_retry_wait`]).
const SPLIT_RETRY_WAIT_MAX: Duration = Duration::from_secs(60);
/// How often the stage of a running placement round is checked ...
const STAGE_CHECK_EVERY: Duration = Duration::from_secs(5);
/// ... and how long one step may take before it is reported.
const STAGE_STUCK_AFTER: Duration = Duration::from_secs(20);
/// Splits and leader transfers are quick when the range is healthy.
const SHORT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one placement round may run; a stuck call does not stall
/// placement (replica changes run in their own tasks, outside the round).
const TICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Addresses one call to a range's leader tries.
const LEADER_TARGETS_MAX: usize = 8;
/// A node heard from within this is shown as "up".
const NODE_UP_WITHIN: Duration = Duration::from_secs(5);
/// A voter whose live node has not reported a replica of its range for this
/// long has lost it: it is replaced like a voter on a dead node.
const MISSING_VOTER_GRACE: Duration = Duration::from_secs(10);
/// A learner of a range with no replica change under way or pending (one
/// left by a change that was given up) is removed after this long.
const LEFTOVER_LEARNER_GRACE: Duration = Duration::from_secs(10);
/// A replica outside its range's membership at the same membership version
/// is removed after this long.
const STRAY_REPLICA_GRACE: Duration = Duration::from_secs(5);
/// Leaders are moved only to nodes heard from within this many heartbeat
/// intervals (a node that just died is not a target)...
const LEADER_TARGET_HEARD_WITHIN_HEARTBEATS: u32 = 2;
/// ...and that have heartbeated without a gap for this long (a node that just
/// restarted or resumed from a pause holds no leaders, so it looks least
/// loaded exactly when it is least fit to lead).
const LEADER_TARGET_UP_FOR: Duration = Duration::from_secs(10);
/// A gap between two heartbeats of a node longer than this many heartbeat
/// intervals starts its uptime over.
const UPTIME_GAP_HEARTBEATS: u32 = 3;

#[derive(Debug, Clone)]
struct NodeLive {
    last_heartbeat: Instant,
    /// Since when the node has heartbeated without a long gap.
    up_since: Instant,
    /// The ranges the node reported a ready replica of.
    ranges: HashSet<u64>,
    /// Those of them whose replica there refuses to serve (faulted).
    faulted: HashSet<u64>,
    /// The highest cluster version the node runs.
    version_max: u32,
    /// The cluster version it recorded that it must run at least.
    version_seen: u32,
}

#[derive(Debug, Clone)]
struct RangeLive {
    stats: RangeStats,
    hot_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct PdState {
    /// When this node last became the meta leader.
    leader_since: Option<Instant>,
    /// The term of that leadership.
    leader_term: Option<u64>,
    /// The meta-leader term in which `descs` and `records` were loaded from
    /// the meta range: the driver answers nothing from a term it has not
    /// loaded (a former leader's cache may be far behind).
    loaded_term: Option<u64>,
    nodes: HashMap<u64, NodeLive>,
    /// Stats reported by each range's leader.
    ranges: HashMap<u64, RangeLive>,
    /// Descriptors by range id (a cache of the meta range).
    descs: BTreeMap<u64, StoredDesc>,
    records: BTreeMap<u64, NodeRecord>,
    /// (range, node) pairs where the node is a voter but reports no replica,
    /// and since when.
    missing: HashMap<(u64, u64), Instant>,
    /// (range, node) pairs where the node reports a replica that is not a
    /// member at the same membership version, and since when.
    stray: HashMap<(u64, u64), Instant>,
    /// (range, node) pairs where the node is a learner of a range with no
    /// change under way or pending, and since when.
    leftover: HashMap<(u64, u64), Instant>,
    /// The nodes the last round counted live, to log changes.
    live_last: Option<HashSet<u64>>,
    /// Ranges whose automatic splits failed: how many in a row, and when
    /// the next may be tried (a range one row too large to cut, or with no
    /// quorum, is not split, and read through for its middle key, every
    /// round). At most one entry per range.
    split_retry: HashMap<u64, (u32, Instant)>,
    /// The cluster version in force, loaded with `loaded_term`.
    cluster_version: u32,
    /// The version a raise under way goes to: heartbeats of nodes that run
    /// less are refused from before the raise is decided, so no such node
    /// registers between the decision and the write.
    raising_to: Option<u32>,
}

/// The placement driver's in-memory state.
#[derive(Debug)]
pub struct Pd {
    state: Mutex<PdState>,
    /// The step the current placement round is at and since when ("idle"
    /// between rounds), so a round stuck in one step is reported.
    stage: Arc<Mutex<(&'static str, Instant)>>,
    inflight: Arc<Mutex<HashSet<u64>>>,
    /// Ranges whose last replica changes failed: how many in a row, and
    /// when the next may start. Cleared by a change that succeeds; at most
    /// one entry per range.
    retry: Arc<Mutex<HashMap<u64, (u32, Instant)>>>,
    slots: Arc<Semaphore>,
    dead_after: Duration,
    /// How many times the driver gave up a pending change of each range (a
    /// node it would add started draining or died): a change of the range
    /// that is running stops at once (see [`Pd::until_given_up`]), so it
    /// cannot finish adding that node. One entry per range given up.
    given_up: watch::Sender<HashMap<u64, u64>>,
}

impl Pd {
    /// A driver for a node with config `cfg` (idle until the node leads meta).
    pub fn new(cfg: &NodeConfig) -> Self {
        Pd {
            state: Mutex::new(PdState::default()),
            stage: Arc::new(Mutex::new(("idle", Instant::now()))),
            inflight: Arc::new(Mutex::new(HashSet::new())),
            retry: Arc::default(),
            slots: Arc::new(Semaphore::new(OPS_INFLIGHT_MAX)),
            dead_after: Duration::from_secs(cfg.file.dead_node_timeout_s),
            given_up: watch::Sender::new(HashMap::new()),
        }
    }

    /// Gives up the changes of `range_id` under way: each resolves its
    /// [`Pd::until_given_up`].
    fn give_up(&self, range_id: u64) {
        self.given_up
            .send_modify(|m| *m.entry(range_id).or_insert(0) += 1);
    }

    /// How many times the driver gave up a change of `range_id`.
    fn given_up_count(&self, range_id: u64) -> u64 {
        self.given_up.borrow().get(&range_id).copied().unwrap_or(0)
    }

    /// Resolves once the driver gives up the change of `range_id` started
    /// now (not one it gave up before).
    fn until_given_up(&self, range_id: u64) -> impl std::future::Future<Output = ()> + Send {
        let mut rx = self.given_up.subscribe();
        let at_start = rx.borrow_and_update().get(&range_id).copied().unwrap_or(0);
        async move {
            let ended = rx
                .wait_for(|m| m.get(&range_id).copied().unwrap_or(0) > at_start)
                .await
                .is_err();
            if ended {
                // The driver is gone (never while a node runs): never resolve.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Notes the step the placement round has reached.
    fn stage(&self, name: &'static str) {
        *self.stage.lock().expect("stage lock") = (name, Instant::now());
    }

    fn is_live(&self, st: &PdState, id: u64) -> bool {
        let grace = st
            .leader_since
            .is_some_and(|t| t.elapsed() < self.dead_after);
        match st.nodes.get(&id) {
            Some(n) => n.last_heartbeat.elapsed() < self.dead_after,
            None => grace,
        }
    }

    /// The cluster version in force, or the one a raise under way goes to
    /// if that is higher (0: not loaded).
    pub fn cluster_version_floor(&self) -> u32 {
        let st = self.state.lock().expect("pd lock");
        if st.loaded_term.is_some() {
            st.cluster_version.max(st.raising_to.unwrap_or(0))
        } else {
            0
        }
    }

    /// The cluster version in force as last loaded (0: not loaded).
    pub fn cluster_version(&self) -> u32 {
        let st = self.state.lock().expect("pd lock");
        if st.loaded_term.is_some() {
            st.cluster_version
        } else {
            0
        }
    }

    /// The registry as operators see it.
    pub fn node_infos(&self) -> Vec<NodeInfo> {
        let st = self.state.lock().expect("pd lock");
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for d in st.descs.values() {
            for v in d.voters.iter().chain(&d.learners) {
                *counts.entry(*v).or_default() += 1;
            }
        }
        let mut leaders: HashMap<u64, u64> = HashMap::new();
        for r in st.ranges.values() {
            if r.stats.leader_id != 0 {
                *leaders.entry(r.stats.leader_id).or_default() += 1;
            }
        }
        st.records
            .values()
            .map(|r| {
                let live = st.nodes.get(&r.node_id);
                let up = live.is_some_and(|n| n.last_heartbeat.elapsed() < NODE_UP_WITHIN);
                let state = match r.state {
                    NodeState::Decommissioned => "decommissioned",
                    NodeState::Decommissioning => "decommissioning",
                    NodeState::Up if up => "up",
                    NodeState::Up => "down",
                };
                NodeInfo {
                    node_id: r.node_id,
                    address: r.address.clone(),
                    state: state.into(),
                    replicas: counts.get(&r.node_id).copied().unwrap_or(0),
                    leaders: leaders.get(&r.node_id).copied().unwrap_or(0),
                    last_heartbeat_ms_ago: live
                        .map(|n| n.last_heartbeat.elapsed().as_millis() as u64)
                        .unwrap_or(0),
                    cluster_version_max: live.map(|n| n.version_max).unwrap_or(0),
                }
            })
            .collect()
    }

    /// Every range with addresses and stats, in key order.
    pub fn range_infos(&self) -> Vec<RangeInfo> {
        let st = self.state.lock().expect("pd lock");
        let mut descs: Vec<&StoredDesc> = st.descs.values().collect();
        descs.sort_by(|a, b| a.start.cmp(&b.start));
        descs.into_iter().map(|d| range_info(&st, d)).collect()
    }

    /// The ranges holding `key` (and `prefetch` following ones), or the ones
    /// just below `key` with `reverse`.
    pub fn locate(&self, key: &[u8], prefetch: usize, reverse: bool) -> Vec<RangeInfo> {
        let st = self.state.lock().expect("pd lock");
        let mut descs: Vec<&StoredDesc> = st.descs.values().collect();
        descs.sort_by(|a, b| a.start.cmp(&b.start));
        let pos = if reverse {
            // The range holding the keys just below `key`: the last one starting below it.
            if key.is_empty() {
                descs.len().checked_sub(1)
            } else {
                descs.iter().rposition(|d| d.start.as_ref() < key)
            }
        } else {
            descs.iter().rposition(|d| d.start.as_ref() <= key)
        };
        let Some(pos) = pos else {
            return Vec::new();
        };
        // While a split registers its halves one at a time, the range found
        // may end before `key` (the right half is not known yet): answer
        // nothing rather than a range that does not hold the key.
        let end = &descs[pos].end;
        let holds = end.is_empty()
            || if reverse {
                key.is_empty() || end.as_ref() >= key
            } else {
                end.as_ref() > key
            };
        if !holds {
            return Vec::new();
        }
        let pick: Vec<&StoredDesc> = if reverse {
            descs[..=pos]
                .iter()
                .rev()
                .take(prefetch + 1)
                .copied()
                .collect()
        } else {
            descs[pos..].iter().take(prefetch + 1).copied().collect()
        };
        pick.into_iter().map(|d| range_info(&st, d)).collect()
    }

    /// Nodes up, ranges, under-replicated ranges.
    pub fn summary(&self, replication_factor: usize) -> (u64, u64, u64, u64) {
        let infos = self.node_infos();
        let st = self.state.lock().expect("pd lock");
        let up = infos.iter().filter(|n| n.state == "up").count() as u64;
        let under = st
            .descs
            .values()
            .filter(|d| {
                d.voters.iter().filter(|v| self.is_live(&st, **v)).count() < replication_factor
            })
            .count() as u64;
        (up, infos.len() as u64, st.descs.len() as u64, under)
    }

    /// The address of a registered node.
    pub fn address(&self, id: u64) -> Option<String> {
        self.state
            .lock()
            .expect("pd lock")
            .records
            .get(&id)
            .map(|r| r.address.clone())
    }

    fn desc_of(&self, range_id: u64) -> Option<StoredDesc> {
        self.state
            .lock()
            .expect("pd lock")
            .descs
            .get(&range_id)
            .cloned()
    }

    fn is_changing(&self, range_id: u64) -> bool {
        self.inflight
            .lock()
            .expect("inflight lock")
            .contains(&range_id)
    }

    /// Voters whose (live, recently heard) node has not reported a replica of
    /// the range for `MISSING_VOTER_GRACE`, or reports it faulted, as
    /// (range, node) pairs. A faulted replica is due at once: its node
    /// stopped its group, and it never serves again.
    fn missing_voters(&self, descs: &[StoredDesc]) -> HashSet<(u64, u64)> {
        let mut st = self.state.lock().expect("pd lock");
        let now = Instant::now();
        let mut seen = HashSet::new();
        let mut faulted = HashSet::new();
        for d in descs {
            if self.is_changing(d.range_id) {
                continue;
            }
            for v in &d.voters {
                let Some(n) = st.nodes.get(v) else { continue };
                if n.last_heartbeat.elapsed() >= NODE_UP_WITHIN {
                    continue;
                }
                if n.faulted.contains(&d.range_id) {
                    faulted.insert((d.range_id, *v));
                } else if !n.ranges.contains(&d.range_id) {
                    seen.insert((d.range_id, *v));
                }
            }
        }
        st.missing.retain(|k, _| seen.contains(k));
        for k in &seen {
            st.missing.entry(*k).or_insert(now);
        }
        st.missing
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= MISSING_VOTER_GRACE)
            .map(|(k, _)| *k)
            .chain(faulted)
            .collect()
    }

    /// Learners left outside their range's voters by a change that was
    /// given up (its target died or is draining, so its pending op was
    /// dropped), by range: those seen for `LEFTOVER_LEARNER_GRACE` in a
    /// range with no change in flight here and none pending (`pending`).
    /// A change that starts restarts the range's grace.
    fn leftover_learners(
        &self,
        descs: &[StoredDesc],
        pending: &HashSet<u64>,
        now: Instant,
    ) -> BTreeMap<u64, Vec<u64>> {
        let mut st = self.state.lock().expect("pd lock");
        let mut seen = HashSet::new();
        for d in descs {
            if self.is_changing(d.range_id) || pending.contains(&d.range_id) {
                continue;
            }
            for l in &d.learners {
                seen.insert((d.range_id, *l));
            }
        }
        st.leftover.retain(|k, _| seen.contains(k));
        for k in &seen {
            st.leftover.entry(*k).or_insert(now);
        }
        let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for ((range_id, node_id), since) in &st.leftover {
            if now.saturating_duration_since(*since) >= LEFTOVER_LEARNER_GRACE {
                out.entry(*range_id).or_default().push(*node_id);
            }
        }
        for ls in out.values_mut() {
            ls.sort_unstable();
        }
        out
    }

    fn note_descs(&self, descs: &[StoredDesc]) {
        let mut st = self.state.lock().expect("pd lock");
        for d in descs {
            let newer = st.descs.get(&d.range_id).is_none_or(|o| d.newer_than(o));
            if newer {
                st.descs.insert(d.range_id, d.clone());
            }
        }
    }
}

fn range_info(st: &PdState, d: &StoredDesc) -> RangeInfo {
    let stats = st.ranges.get(&d.range_id).map(|r| &r.stats);
    RangeInfo {
        descriptor: Some(d.to_proto()),
        leader_id: stats.map(|s| s.leader_id).unwrap_or(0),
        addresses: d
            .voters
            .iter()
            .chain(&d.learners)
            .filter_map(|id| st.records.get(id).map(|r| (*id, r.address.clone())))
            .collect(),
        size_bytes: stats.map(|s| s.size_bytes).unwrap_or(0),
        keys: stats.map(|s| s.keys).unwrap_or(0),
        qps: stats.map(|s| s.qps).unwrap_or(0.0),
    }
}

/// The meta store when this node leads the meta range, else `NotLeader`.
pub fn meta_store(node: &Node) -> Result<MetaStore, Error> {
    match node.local_meta_leader() {
        Some(r) => Ok(MetaStore::new(r)),
        None => Err(Error::NotLeader {
            range_id: META_RANGE_ID,
            leader: node
                .replicas
                .get(META_RANGE_ID)
                .ok()
                .and_then(|r| r.leader_hint()),
        }),
    }
}

/// The meta store when this node leads the meta range and the driver has
/// loaded it in the current term; `Unavailable` (retry shortly) while loading.
pub fn serving(node: &Node) -> Result<MetaStore, Error> {
    let meta = meta_store(node)?;
    let term = meta.replica().leader_term();
    let loaded = node.pd.state.lock().expect("pd lock").loaded_term;
    if term.is_none() || loaded != term {
        return Err(Error::unavailable(
            "the placement driver is loading the meta range; retry",
        ));
    }
    Ok(meta)
}

/// Handles a node's heartbeat on the meta leader.
pub async fn handle_heartbeat(
    node: &Arc<Node>,
    req: HeartbeatRequest,
) -> Result<HeartbeatResponse, Error> {
    let meta = serving(node)?;
    let pd = &node.pd;
    let (known, want_full, cluster_version) = {
        let mut st = pd.state.lock().expect("pd lock");
        // A node that runs less than the cluster version in force (or one
        // being raised to) would misread entries the cluster now writes:
        // never registered, never given a replica, and not counted live.
        let version_max = crate::version::reported(req.cluster_version_max);
        let floor = st.raising_to.unwrap_or(0).max(st.cluster_version);
        if version_max < floor {
            // Not heard from (its liveness runs out as for a silent node, so
            // a refusal that lasts only while a raise is staged moves no
            // replica), and counted in a raise by what it runs now: the
            // staged raise is dropped.
            if let Some(n) = st.nodes.get_mut(&req.node_id) {
                n.version_max = version_max;
            }
            return Err(Error::invalid_argument(
                "cluster_version_max",
                format!(
                    "node {} runs cluster version {version_max} at most, and the cluster runs at version {floor}: \
                     upgrade its binary (or drop its --cluster-version-max)",
                    req.node_id
                ),
            ));
        }
        // Every hosted range is in `range_ids`; the stats sent name a subset.
        let hosted: HashSet<u64> = req
            .ranges
            .iter()
            .filter_map(|r| r.descriptor.as_ref().map(|d| d.range_id))
            .chain(req.range_ids.iter().copied())
            .collect();
        // Stats of ranges that did not change are not sent again: a driver
        // that has none of this node's (it just took over) asks for them all.
        let want_full = !req.full && !st.nodes.contains_key(&req.node_id);
        let now = Instant::now();
        let gap = Duration::from_millis(node.cfg.file.node_heartbeat_ms) * UPTIME_GAP_HEARTBEATS;
        let up_since = match st.nodes.get(&req.node_id) {
            Some(prev) if now.duration_since(prev.last_heartbeat) <= gap => prev.up_since,
            _ => now,
        };
        st.nodes.insert(
            req.node_id,
            NodeLive {
                last_heartbeat: now,
                up_since,
                ranges: hosted,
                faulted: req.faulted_range_ids.iter().copied().collect(),
                version_max,
                version_seen: req.cluster_version_seen,
            },
        );
        for r in &req.ranges {
            if !r.leader {
                continue;
            }
            let Some(d) = &r.descriptor else { continue };
            let limit = node.cfg.file.split_qps;
            let hot = limit > 0.0 && r.qps > limit;
            if split_backoff_ends(r.qps, r.size_bytes, limit, node.cfg.file.split_size_bytes) {
                // No longer a split candidate: should it become one again,
                // its first try is not held back by old failures.
                st.split_retry.remove(&d.range_id);
            }
            let prev = st.ranges.get(&d.range_id).and_then(|x| x.hot_since);
            st.ranges.insert(
                d.range_id,
                RangeLive {
                    stats: r.clone(),
                    hot_since: if hot {
                        prev.or(Some(Instant::now()))
                    } else {
                        None
                    },
                },
            );
        }
        (st.records.get(&req.node_id).cloned(), want_full, floor)
    };
    if known.as_ref().map(|r| &r.address) != Some(&req.address) {
        let stored = meta.nodes()?.remove(&req.node_id);
        let rec = match stored {
            Some(mut r) => {
                r.address = req.address.clone();
                r
            }
            None => NodeRecord {
                node_id: req.node_id,
                address: req.address.clone(),
                state: NodeState::Up,
            },
        };
        meta.put_node(&rec).await?;
        tracing::info!(node_id = rec.node_id, address = %rec.address, "registered node");
        pd.state
            .lock()
            .expect("pd lock")
            .records
            .insert(rec.node_id, rec);
    }
    // Newer descriptors reported by range leaders go to the meta range.
    let newer: Vec<StoredDesc> = req
        .ranges
        .iter()
        .filter(|r| r.leader)
        .filter_map(|r| r.descriptor.as_ref().map(StoredDesc::from_proto))
        .filter(|d| pd.desc_of(d.range_id).is_none_or(|o| d.newer_than(&o)))
        .collect();
    if !newer.is_empty() {
        meta.upsert_descriptors(&newer).await?;
        pd.note_descs(&newer);
    }
    // Replicas that are no longer members of their range.
    let mut remove = Vec::new();
    for r in &req.ranges {
        let Some(d) = r.descriptor.as_ref().map(StoredDesc::from_proto) else {
            continue;
        };
        // A replica change in flight may be adding this very replica as a
        // learner the descriptor does not show yet.
        if pd.is_changing(d.range_id) {
            continue;
        }
        let Some(cur) = pd.desc_of(d.range_id) else {
            continue;
        };
        let member = cur.voters.contains(&req.node_id) || cur.learners.contains(&req.node_id);
        let key = (d.range_id, req.node_id);
        let mut st = pd.state.lock().expect("pd lock");
        if member || cur.conf_ver < d.conf_ver {
            st.stray.remove(&key);
        } else if cur.conf_ver > d.conf_ver {
            // Removed by a later membership change it never saw.
            remove.push(d.range_id);
        } else {
            // Same membership config, and the node is not in it: a replica
            // left over from a split or an interrupted change. Removed once
            // it stays that way for a while.
            let since = *st.stray.entry(key).or_insert_with(Instant::now);
            if since.elapsed() >= STRAY_REPLICA_GRACE {
                tracing::info!(
                    range_id = d.range_id,
                    node_id = req.node_id,
                    "removing a stray replica"
                );
                remove.push(d.range_id);
            }
        }
    }
    {
        let mut st = pd.state.lock().expect("pd lock");
        let st = &mut *st;
        if let Some(live) = st.nodes.get(&req.node_id) {
            let hosted = &live.ranges;
            st.stray
                .retain(|(range, n), _| *n != req.node_id || hosted.contains(range));
        }
    }
    Ok(HeartbeatResponse {
        remove_ranges: remove,
        want_full,
        cluster_version,
    })
}

/// Runs the placement loop while this node leads the meta range.
pub async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(node.cfg.file.placement_interval_ms);
    // Reports a round stuck in one step; it runs as its own task, so it
    // speaks even when the round's task cannot be polled.
    let watch_stage = node.pd.stage.clone();
    let mut watch_stop = stop.clone();
    tokio::spawn(async move {
        let mut reported: Option<(&'static str, Instant)> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STAGE_CHECK_EVERY) => {}
                _ = watch_stop.changed() => return,
            }
            let (name, since) = *watch_stage.lock().expect("stage lock");
            if name != "idle"
                && since.elapsed() >= STAGE_STUCK_AFTER
                && reported != Some((name, since))
            {
                tracing::warn!(
                    step = name,
                    secs = since.elapsed().as_secs(),
                    "placement round stuck in one step"
                );
                reported = Some((name, since));
            }
        }
    });
    loop {
        let slept = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        // Woken far later than asked: this process was stalled (paused,
        // starved of CPU), and heard no heartbeats meanwhile. The stall
        // does not count as silence: every time the driver keeps (last
        // heartbeats, the new-leader grace, since when a voter is missing
        // or a replica stray) moves on by the lateness, so a node already
        // dead stays dead and a live one is not called dead for it; and
        // this round does not plan, so the next one plans from the
        // heartbeats that arrive meanwhile.
        let lateness = slept.elapsed().saturating_sub(every);
        let stalled = lateness > (node.pd.dead_after / 2).max(STALL_AFTER_MIN);
        let term = node.local_meta_leader().and_then(|r| r.leader_term());
        {
            let mut st = node.pd.state.lock().expect("pd lock");
            if stalled && term.is_some() && term == st.leader_term {
                tracing::warn!(
                    stalled_ms = lateness.as_millis() as u64,
                    "placement driver woke late: the stall is not counted as the nodes' silence"
                );
                let now = Instant::now();
                let shift = |t: &mut Instant| *t = (*t + lateness).min(now);
                if let Some(t) = st.leader_since.as_mut() {
                    shift(t);
                }
                st.nodes
                    .values_mut()
                    .for_each(|n| shift(&mut n.last_heartbeat));
                st.missing.values_mut().for_each(shift);
                st.stray.values_mut().for_each(shift);
                st.leftover.values_mut().for_each(shift);
                continue;
            }
            if term != st.leader_term {
                if let Some(t) = term {
                    tracing::info!(term = t, "leading the meta range: placement driver active");
                    st.leader_since = Some(Instant::now());
                    st.nodes.clear();
                    st.ranges.clear();
                    st.live_last = None;
                } else {
                    st.leader_since = None;
                }
                st.leader_term = term;
                // Changes started in an earlier term stop: the driver that
                // leads now plans from the meta range and does not know of
                // them, and must not race them on the same ranges.
                let running: Vec<u64> = node
                    .pd
                    .inflight
                    .lock()
                    .expect("inflight lock")
                    .iter()
                    .copied()
                    .collect();
                if !running.is_empty() {
                    tracing::info!(ranges = ?running, "meta leadership changed: stopping the replica changes under way");
                }
                for range_id in running {
                    node.pd.give_up(range_id);
                }
            }
        }
        let Some(term) = term else {
            continue;
        };
        match tokio::time::timeout(TICK_TIMEOUT, tick(&node, term)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "placement round failed"),
            Err(_) => {
                tracing::warn!("placement round took longer than {TICK_TIMEOUT:?}; starting over")
            }
        }
        node.pd.stage("idle");
    }
}

/// Raises the cluster version in force (`current`, its meta record at
/// `record_version`) to the highest that every node runs, in two steps. A
/// round that finds every registered node that is not decommissioned live
/// (a node that is down may come back on an old binary), and every node
/// heard from running more than `current` (those not registered yet count
/// too: their registration may be under way), stages the raise: from then
/// on heartbeats of nodes that run less are refused, and every heartbeat
/// answer tells the node to record that it must run the new version. A
/// later round that finds every one of them has recorded it writes the new
/// version to the meta range. So once a version is in force no node can
/// start on a binary (or `--cluster-version-max`) below it. A raise whose
/// conditions stop holding before it is written is dropped.
async fn raise_cluster_version(
    node: &Arc<Node>,
    meta: &MetaStore,
    current: u32,
    record_version: u64,
) -> Result<(), Error> {
    let target = {
        let mut st = node.pd.state.lock().expect("pd lock");
        let decommissioned = |id: &u64| {
            st.records
                .get(id)
                .is_some_and(|r| r.state == NodeState::Decommissioned)
        };
        let mut all_live = !st.records.is_empty();
        for rec in st.records.values() {
            let live = st
                .nodes
                .get(&rec.node_id)
                .is_some_and(|n| n.last_heartbeat.elapsed() < NODE_UP_WITHIN);
            if rec.state != NodeState::Decommissioned && !live {
                all_live = false;
            }
        }
        let heard: Vec<&NodeLive> = st
            .nodes
            .iter()
            .filter(|(id, n)| !decommissioned(id) && n.last_heartbeat.elapsed() < NODE_UP_WITHIN)
            .map(|(_, n)| n)
            .collect();
        let target = heard
            .iter()
            .map(|n| n.version_max)
            .fold(node.cfg.cluster_version_max(), u32::min);
        let recorded = heard.iter().all(|n| n.version_seen >= target);
        if !all_live || target <= current {
            if let Some(t) = st.raising_to.take() {
                tracing::info!(
                    from = current,
                    to = t,
                    "dropped a cluster version raise: a node is down or runs less"
                );
            }
            return Ok(());
        }
        if st.raising_to != Some(target) {
            st.raising_to = Some(target);
            tracing::info!(
                from = current,
                to = target,
                "raising the cluster version once every node has recorded it"
            );
            return Ok(());
        }
        if !recorded {
            return Ok(());
        }
        target
    };
    if meta.raise_cluster_version(target, record_version).await? {
        let mut st = node.pd.state.lock().expect("pd lock");
        st.cluster_version = target;
        st.raising_to = None;
        tracing::info!(from = current, to = target, "raised the cluster version");
    }
    Ok(())
}

/// One placement round in meta-leader term `term` (the one the run loop
/// saw and settled its state for; a round that finds another ends at once).
async fn tick(node: &Arc<Node>, term: u64) -> Result<(), Error> {
    let meta = meta_store(node)?;
    if meta.replica().leader_term() != Some(term) {
        return Ok(());
    }
    node.pd.stage("barrier on the meta range");
    meta.barrier().await?;
    node.pd.stage("load descriptors");
    let pd = &node.pd;
    let mut descs = meta.descriptors()?;
    let records = meta.nodes()?;
    let (cluster_version, cluster_version_record) = meta.cluster_version()?;
    if !descs.iter().any(|d| d.range_id == META_RANGE_ID) {
        // A new cluster: the meta range describes itself first.
        let r = node.replica(META_RANGE_ID)?;
        let d = node.stored_desc(&r);
        meta.upsert_descriptors(std::slice::from_ref(&d)).await?;
        descs.push(d);
    }
    {
        let mut st = pd.state.lock().expect("pd lock");
        st.records = records.clone();
        if st.loaded_term != Some(term) {
            st.descs.clear();
        }
        // Newer wins: a split or heartbeat may have noted a descriptor after
        // the read above.
        for d in &descs {
            if st.descs.get(&d.range_id).is_none_or(|o| d.newer_than(o)) {
                st.descs.insert(d.range_id, d.clone());
            }
        }
        st.cluster_version = cluster_version;
        st.loaded_term = Some(term);
    }
    node.pd.stage("cluster version");
    raise_cluster_version(node, &meta, cluster_version, cluster_version_record).await?;
    node.pd.stage("meta range and pre-splits");
    // The meta range keeps only the system key space.
    let meta_desc = node.stored_desc(&*node.replica(META_RANGE_ID)?);
    if meta_desc.end.is_empty() || meta_desc.end.as_ref() > USER_SPACE_START {
        split(
            node,
            META_RANGE_ID,
            Some(Bytes::from_static(USER_SPACE_START)),
        )
        .await?;
        return Ok(());
    }
    // Pre-splits from the config (e.g. one range per LMS table).
    for k in node.cfg.pre_split_keys() {
        if descs.iter().any(|d| d.start == k) {
            continue;
        }
        if let Some(d) = descs.iter().find(|d| d.contains(&k)) {
            if d.range_id != META_RANGE_ID {
                // A range that cannot split now (no quorum) must not hold
                // up the repair of every other range: the round goes on,
                // and the next one tries the split again.
                match split(node, d.range_id, Some(k.clone())).await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(range_id = d.range_id, key = %lmskv_proto::keys::escape(&k), error = %e, "pre-split failed; placement goes on");
                        break;
                    }
                }
            }
        }
    }
    // Finish decommissions.
    for rec in records.values() {
        if rec.state == NodeState::Decommissioning
            && !descs
                .iter()
                .any(|d| d.voters.contains(&rec.node_id) || d.learners.contains(&rec.node_id))
        {
            let mut r = rec.clone();
            r.state = NodeState::Decommissioned;
            meta.put_node(&r).await?;
            tracing::info!(node_id = r.node_id, "node decommissioned");
        }
    }
    node.pd.stage("decommissions and pending changes");
    // Resume replica changes a previous leader started (or that failed),
    // unless one of the voters they want is dead or a node they would add
    // is draining: those are planned again from the current state.
    let mut pending = HashSet::new();
    for op in meta.pending_ops()? {
        let Some(d) = descs.iter().find(|d| d.range_id == op.range_id) else {
            meta.delete_op(op.range_id).await?;
            continue;
        };
        let dead = {
            let st = pd.state.lock().expect("pd lock");
            op.voters.iter().any(|v| {
                let draining = !d.voters.contains(v)
                    && records.get(v).is_some_and(|r| r.state != NodeState::Up);
                draining || !pd.is_live(&st, *v)
            })
        };
        if dead {
            tracing::info!(range_id = op.range_id, voters = ?op.voters, reason = %op.reason, "dropping a pending replica change: a voter it wants is dead or draining");
            meta.delete_op(op.range_id).await?;
            // A change of the range running now (started by an earlier
            // round or an operator's move) must not go on to add the node.
            pd.give_up(op.range_id);
            continue;
        }
        pending.insert(op.range_id);
        start_op(node, op);
    }
    node.pd.stage("liveness and repair");
    let rf = node.cfg.file.replication_factor;
    // A voter is bad only when known to be dead or draining; a node not yet
    // registered (its first heartbeat is on the way) is not bad.
    let (candidates, live, bad): (Vec<u64>, HashSet<u64>, HashSet<u64>) = {
        let st = pd.state.lock().expect("pd lock");
        let live: HashSet<u64> = records
            .values()
            .filter(|r| r.state != NodeState::Decommissioned && pd.is_live(&st, r.node_id))
            .map(|r| r.node_id)
            .collect();
        let cands = records
            .values()
            .filter(|r| r.state == NodeState::Up && live.contains(&r.node_id))
            .map(|r| r.node_id)
            .collect();
        let mut bad = HashSet::new();
        for d in &descs {
            for v in &d.voters {
                let dead = !pd.is_live(&st, *v);
                let draining = records.get(v).is_some_and(|r| r.state != NodeState::Up);
                if dead || draining {
                    bad.insert(*v);
                }
            }
        }
        (cands, live, bad)
    };
    {
        // Every change in who counts as live, with how long each node has
        // been silent: placement decisions all follow from this set.
        let mut st = pd.state.lock().expect("pd lock");
        if st.live_last.as_ref() != Some(&live) {
            let silent: Vec<(u64, Option<u128>)> = records
                .keys()
                .filter(|id| !live.contains(id))
                .map(|id| {
                    (
                        *id,
                        st.nodes
                            .get(id)
                            .map(|n| n.last_heartbeat.elapsed().as_millis()),
                    )
                })
                .collect();
            let mut up: Vec<u64> = live.iter().copied().collect();
            up.sort_unstable();
            tracing::info!(live = ?up, not_live_ms_since_heartbeat = ?silent, "placement: live nodes changed");
            st.live_last = Some(live.clone());
        }
    }
    let missing = pd.missing_voters(&descs);
    for (range_id, v) in &missing {
        tracing::warn!(
            range_id,
            node_id = v,
            "voter reports no replica of its range, or a faulted one; replacing it"
        );
    }
    let mut load: HashMap<u64, usize> = candidates.iter().map(|c| (*c, 0)).collect();
    for d in &descs {
        for v in d.voters.iter().chain(&d.learners) {
            if let Some(n) = load.get_mut(v) {
                *n += 1;
            }
        }
    }
    let leftover = pd.leftover_learners(&descs, &pending, Instant::now());
    // Repair: every range gets `rf` voters on live, non-draining nodes.
    let mut started = 0;

    for d in &descs {
        let keep: Vec<u64> = d
            .voters
            .iter()
            .copied()
            .filter(|v| !bad.contains(v) && !missing.contains(&(d.range_id, *v)))
            .collect();
        let usable: HashSet<u64> = candidates.iter().chain(&keep).copied().collect();
        let want = rf.min(usable.len().max(1));
        let mut voters = keep.clone();
        let reason;
        if keep.len() < want {
            let Some(target) = candidates
                .iter()
                .filter(|c| !voters.contains(c) && !d.voters.contains(c))
                .min_by_key(|c| (load.get(c).copied().unwrap_or(0), **c))
                .copied()
            else {
                // Every live node already is a voter (e.g. 3 nodes, 3
                // replicas), and one of them lost its replica (its store was
                // damaged and rebuilt empty) or reports it faulted (its
                // group stopped): remove it first, so that a
                // later round adds it back as a learner that catches up from
                // the leader. It never votes with an empty log meanwhile: it
                // hosts no replica, so it answers nothing for the range.
                let lost: Vec<u64> = d
                    .voters
                    .iter()
                    .copied()
                    .filter(|v| missing.contains(&(d.range_id, *v)))
                    .collect();
                if lost.is_empty() {
                    continue;
                }
                let mut voters: Vec<u64> = d
                    .voters
                    .iter()
                    .copied()
                    .filter(|v| !lost.contains(v))
                    .collect();
                voters.sort_unstable();
                if start_op(
                    node,
                    PendingOp {
                        range_id: d.range_id,
                        voters,
                        reason: format!(
                            "remove the lost replica on node(s) {lost:?} to add it back empty (no other node can take it)"
                        ),
                    },
                ) {
                    started += 1;
                }
                continue;
            };
            voters.push(target);
            *load.entry(target).or_default() += 1;
            // Keep the bad voters still alive until the new one is in, so a
            // range never drops below its quorum on the way.
            reason = format!("add a replica on node {target}");
        } else if keep.len() > want {
            let victim = *keep
                .iter()
                .max_by_key(|v| (load.get(v).copied().unwrap_or(0), **v))
                .expect("keep is not empty");
            voters.retain(|v| *v != victim);
            reason = format!("remove the extra replica on node {victim}");
        } else if d.voters.len() != keep.len() {
            // A live voter on a draining node leaves only once `rf` others
            // hold the range: with too few nodes left to take its place
            // (one died since the drain began) it stays, and the drain
            // waits, rather than the range running on fewer replicas.
            for v in &d.voters {
                if voters.len() < rf
                    && !voters.contains(v)
                    && live.contains(v)
                    && !missing.contains(&(d.range_id, *v))
                {
                    voters.push(*v);
                }
            }
            reason = "remove replicas on dead, draining or lost nodes".to_string();
        } else if let Some(learners) = leftover.get(&d.range_id) {
            // The voters are right; a learner a given-up change left behind
            // goes by a change to the same voters (which drops learners
            // outside them), or it would be replicated to for good and
            // hold up its node's decommission.
            reason = format!(
                "remove the learner(s) on node(s) {learners:?} left by a change that did not finish"
            );
        } else {
            continue;
        }
        // Bad voters that are still live stay in while a new voter joins:
        // removal happens in a following round once the set has `want` good ones.
        if keep.len() < want {
            for v in &d.voters {
                if !voters.contains(v) && live.contains(v) && voters.len() < want + 1 {
                    voters.push(*v);
                }
            }
        }
        voters.sort_unstable();
        let mut cur = d.voters.clone();
        cur.sort_unstable();
        if voters == cur && !leftover.contains_key(&d.range_id) {
            continue;
        }
        if start_op(
            node,
            PendingOp {
                range_id: d.range_id,
                voters,
                reason,
            },
        ) {
            started += 1;
        }
    }
    node.pd.stage("splits");
    // Splits by size and by sustained load.
    let split_size = node.cfg.file.split_size_bytes;
    let hot_for = Duration::from_secs(node.cfg.file.split_qps_duration_s);
    let to_split: Vec<u64> = {
        let st = pd.state.lock().expect("pd lock");
        st.ranges
            .iter()
            .filter(|(id, r)| {
                **id != META_RANGE_ID
                    && (r.stats.size_bytes > split_size
                        || r.hot_since.is_some_and(|t| t.elapsed() >= hot_for))
                    && st
                        .split_retry
                        .get(id)
                        .is_none_or(|(_, next)| Instant::now() >= *next)
            })
            .map(|(id, _)| *id)
            .collect()
    };
    let split_tried = !to_split.is_empty();
    for id in to_split {
        let failed = split(node, id, None).await.err();
        let mut st = pd.state.lock().expect("pd lock");
        match failed {
            Some(e) => {
                let e_str = e.to_string();
                let retry = st.split_retry.entry(id).or_insert((0, Instant::now()));
                retry.0 = retry.0.saturating_add(1);
                let wait = split_retry_wait(retry.0);
                retry.1 = Instant::now() + wait;
                tracing::debug!(range_id = id, error = %e_str, retry_in_ms = wait.as_millis() as u64, "automatic split failed");
            }
            None => {
                st.split_retry.remove(&id);
            }
        }
        if let Some(r) = st.ranges.get_mut(&id) {
            r.hot_since = None;
            r.stats.size_bytes = 0;
        }
    }
    {
        // Entries of ranges that are gone (merged away or never reported
        // again) do not outlive them.
        let mut st = pd.state.lock().expect("pd lock");
        let PdState {
            split_retry, descs, ..
        } = &mut *st;
        split_retry.retain(|id, _| descs.contains_key(id));
    }
    // Balancing plans from this round's descriptors: after splits (which
    // can take seconds, while changes started earlier finish) it waits for
    // the next round's, rather than moving replicas by a stale picture.
    if started > 0 || split_tried {
        return Ok(());
    }
    node.pd.stage("balance");
    balance(node, &descs, &candidates, &load).await;
    Ok(())
}

/// Moves one replica and one leader per round from the most to the least
/// loaded node when the spread exceeds the tolerance.
async fn balance(
    node: &Arc<Node>,
    descs: &[StoredDesc],
    candidates: &[u64],
    load: &HashMap<u64, usize>,
) {
    if candidates.len() < 2 {
        return;
    }
    let tol = node.cfg.file.balance_tolerance;
    let total: usize = candidates
        .iter()
        .map(|c| load.get(c).copied().unwrap_or(0))
        .sum();
    let mean = total as f64 / candidates.len() as f64;
    // Up to the free change slots, each time from the most to the least
    // loaded node, counting the moves planned this round.
    let mut load = load.clone();
    let mut planned: HashSet<u64> = HashSet::new();
    for _ in 0..OPS_INFLIGHT_MAX {
        let (min_n, min_l) = candidates
            .iter()
            .map(|c| (*c, load.get(c).copied().unwrap_or(0)))
            .min_by_key(|(c, l)| (*l, *c))
            .expect("candidates");
        // The most loaded node that has a replica to give: the most loaded
        // one may hold nothing movable (e.g. its load is learners).
        let mut by_load: Vec<(u64, usize)> = candidates
            .iter()
            .map(|c| (*c, load.get(c).copied().unwrap_or(0)))
            .collect();
        by_load.sort_unstable_by_key(|&(c, l)| std::cmp::Reverse((l, c)));
        let me = node.node_id();
        let mut pick = None;
        for &(max_n, max_l) in &by_load {
            // Out of balance when a node is above the band or one (e.g. a
            // node that just joined) is below it.
            let above = max_l as f64 > mean * (1.0 + tol);
            let below = (min_l as f64) < mean * (1.0 - tol);
            if !((above || below) && max_l >= min_l + 2) {
                break;
            }
            // A random range among those that can move, so that moved
            // replicas do not all end up on the same set of nodes.
            let movable: Vec<&StoredDesc> = descs
                .iter()
                .filter(|d| {
                    // The driver does not move the meta replica it leads
                    // from: that would hand placement to a new, still
                    // catching-up meta leader in the middle of the rebalance.
                    let own_meta = d.range_id == META_RANGE_ID && max_n == me;
                    !own_meta
                        && !planned.contains(&d.range_id)
                        && d.voters.contains(&max_n)
                        && !d.voters.contains(&min_n)
                        && !d.learners.contains(&min_n)
                })
                .collect();
            if !movable.is_empty() {
                pick = Some((max_n, movable));
                break;
            }
        }
        let Some((max_n, movable)) = pick else {
            break;
        };
        let d = movable[rand::random::<usize>() % movable.len()];
        let mut voters: Vec<u64> = d.voters.iter().copied().filter(|v| *v != max_n).collect();
        voters.push(min_n);
        voters.sort_unstable();
        planned.insert(d.range_id);
        if !start_op(
            node,
            PendingOp {
                range_id: d.range_id,
                voters,
                reason: format!("balance: move a replica from node {max_n} to node {min_n}"),
            },
        ) {
            break;
        }
        *load.entry(max_n).or_default() -= 1;
        *load.entry(min_n).or_default() += 1;
    }
    if !planned.is_empty() || !node.cfg.file.balance_leaders {
        return;
    }
    node.pd.stage("balance leaders");
    // Leaders: while the spread is beyond the tolerance, move a leader from
    // a node with at least two more than the least-loaded node to it.
    let mut leader_of: HashMap<u64, u64> = {
        let st = node.pd.state.lock().expect("pd lock");
        st.ranges
            .iter()
            .filter(|(_, r)| r.stats.leader_id != 0)
            .map(|(id, r)| (*id, r.stats.leader_id))
            .collect()
    };
    // Leaders go only to nodes heard from lately, not to one that may have
    // just died (it is still a candidate until the dead-node timeout), and
    // that have been up a while, not to one that just came back.
    let heard_within = Duration::from_millis(node.cfg.file.node_heartbeat_ms)
        * LEADER_TARGET_HEARD_WITHIN_HEARTBEATS;
    let fresh: HashSet<u64> = {
        let st = node.pd.state.lock().expect("pd lock");
        candidates
            .iter()
            .copied()
            .filter(|c| {
                st.nodes.get(c).is_some_and(|n| {
                    n.last_heartbeat.elapsed() < heard_within
                        && n.up_since.elapsed() >= LEADER_TARGET_UP_FOR
                })
            })
            .collect()
    };
    let mut count: HashMap<u64, usize> = candidates.iter().map(|c| (*c, 0)).collect();
    for l in leader_of.values() {
        if let Some(n) = count.get_mut(l) {
            *n += 1;
        }
    }
    let total_l: usize = count.values().sum();
    let mean_l = total_l as f64 / candidates.len() as f64;
    for _ in 0..OPS_INFLIGHT_MAX {
        let Some((&lo, &lo_n)) = count
            .iter()
            .filter(|(c, _)| fresh.contains(c))
            .min_by_key(|(c, n)| (**n, **c))
        else {
            return;
        };
        let hi_n = count.values().copied().max().unwrap_or(0);
        let spread = hi_n as f64 > mean_l * (1.0 + tol) || (lo_n as f64) < mean_l * (1.0 - tol);
        if !spread || hi_n < lo_n + 2 {
            return;
        }
        // The range whose leader is the most loaded among those `lo` can take.
        // Never the meta range: moving its leader moves the driver itself
        // (its liveness grace starts over and its changes in flight are
        // left to run unwatched).
        let pick = descs
            .iter()
            .filter(|d| d.range_id != META_RANGE_ID && d.voters.contains(&lo))
            .filter_map(|d| {
                let l = *leader_of.get(&d.range_id)?;
                let n = count.get(&l).copied()?;
                (n >= lo_n + 2).then_some((n, d.range_id, l))
            })
            .max();
        let Some((_, range_id, from)) = pick else {
            return;
        };
        if let Err(e) = transfer_leader(node, range_id, lo).await {
            tracing::debug!(range_id, to = lo, error = %e, "leader balance");
            return;
        }
        tracing::info!(range_id, from, to = lo, "balance: moved a leader");
        // Counted as moved until the new leader's next heartbeat says so.
        if let Some(r) = node
            .pd
            .state
            .lock()
            .expect("pd lock")
            .ranges
            .get_mut(&range_id)
        {
            r.stats.leader_id = lo;
        }
        leader_of.insert(range_id, lo);
        *count.entry(from).or_default() -= 1;
        *count.entry(lo).or_default() += 1;
    }
}

/// Starts a replica change unless one runs for the range or all slots are
/// busy; returns whether it started.
fn start_op(node: &Arc<Node>, op: PendingOp) -> bool {
    if node
        .pd
        .retry
        .lock()
        .expect("retry lock")
        .get(&op.range_id)
        .is_some_and(|(_, next)| Instant::now() < *next)
    {
        return false;
    }
    let Ok(permit) = node.pd.slots.clone().try_acquire_owned() else {
        return false;
    };
    if !node
        .pd
        .inflight
        .lock()
        .expect("inflight lock")
        .insert(op.range_id)
    {
        return false;
    }
    /// Ends the change's claim on its range however the task ends (a
    /// panic included), so the range is never skipped for good.
    struct Claim(Arc<Mutex<HashSet<u64>>>, u64);
    impl Drop for Claim {
        fn drop(&mut self) {
            if let Ok(mut set) = self.0.lock() {
                set.remove(&self.1);
            }
        }
    }
    let claim = Claim(node.pd.inflight.clone(), op.range_id);
    let node = node.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let _permit = permit;
        let range_id = op.range_id;
        tracing::info!(range_id, voters = ?op.voters, reason = %op.reason, "replica change");
        let given_up_before = node.pd.given_up_count(range_id);
        let r = tokio::time::timeout(OP_TIMEOUT, run_op(&node, &op)).await;
        if let Ok(Ok(())) = r {
            node.pd.retry.lock().expect("retry lock").remove(&range_id);
            tracing::info!(range_id, voters = ?op.voters, "replica change done");
            return;
        }
        if node.pd.given_up_count(range_id) > given_up_before {
            // Not a failure of the range: the next round plans it again at
            // once, without a backoff.
            tracing::info!(range_id, voters = ?op.voters, "replica change given up");
            return;
        }
        let wait = {
            let mut retry = node.pd.retry.lock().expect("retry lock");
            let e = retry.entry(range_id).or_insert((0, Instant::now()));
            e.0 = e.0.saturating_add(1);
            let wait = change_retry_wait(e.0);
            e.1 = Instant::now() + wait;
            wait
        };
        match r {
            Ok(Err(e)) => {
                tracing::warn!(range_id, error = %e, retry_in_ms = wait.as_millis() as u64, "replica change failed; will retry")
            }
            _ => tracing::warn!(
                range_id,
                retry_in_ms = wait.as_millis() as u64,
                "replica change timed out; will retry"
            ),
        }
    });
    true
}

/// Whether a range's leader report (`qps`, `size_bytes`) ends the backoff
/// of its failed automatic splits: only once it is well below both split
/// limits (half the qps limit, nine tenths of the size), so that a report
/// that dips just below them (bursty load, a size estimate that moves with
/// flushes) does not make a range that cannot split (one row of
/// `split_rows`) be tried again at once.
fn split_backoff_ends(qps: f64, size_bytes: u64, qps_limit: f64, size_limit: u64) -> bool {
    let calm = qps_limit <= 0.0 || qps <= qps_limit / 2.0;
    let small = size_bytes <= size_limit / 10 * 9;
    calm && small
}

/// How long a range waits after its `failures`-th failed automatic split
/// in a row before the driver tries it again: 1 s, doubling, at most
/// [`SPLIT_RETRY_WAIT_MAX`].
fn split_retry_wait(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (Duration::from_secs(1) * 2u32.pow(doublings)).min(SPLIT_RETRY_WAIT_MAX)
}

/// How long a range waits after its `failures`-th failed replica change in
/// a row before the driver starts another.
fn change_retry_wait(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (CHANGE_RETRY_WAIT_MIN * 2u32.pow(doublings)).min(CHANGE_RETRY_WAIT_MAX)
}

async fn admin(node: &Node, addr: &str) -> Result<AdminClient<tonic::transport::Channel>, Error> {
    Ok(AdminClient::new(
        node.pool.channel(addr).map_err(Error::unavailable)?,
    ))
}

/// Runs a replica change until it is done, fails, or the driver gives it up
/// (its wanted voters turned dead or draining while it ran). Stopping drops
/// the call to the range leader, which ends its wait for the new replicas
/// to catch up before any membership change.
async fn run_op(node: &Arc<Node>, op: &PendingOp) -> Result<(), Error> {
    let given_up = node.pd.until_given_up(op.range_id);
    tokio::select! {
        r = run_op_steps(node, op) => r,
        () = given_up => Err(Error::unavailable(format!(
            "the replica change of range {} was given up: a node it wants is dead or draining",
            op.range_id
        ))),
    }
}

async fn run_op_steps(node: &Arc<Node>, op: &PendingOp) -> Result<(), Error> {
    let meta = meta_store(node)?;
    meta.put_op(op).await?;
    let desc = node.pd.desc_of(op.range_id).ok_or(Error::RangeNotFound {
        range_id: op.range_id,
    })?;
    let mut voters = BTreeMap::new();
    for v in &op.voters {
        let addr = node
            .pd
            .address(*v)
            .ok_or_else(|| Error::unavailable(format!("node {v} is not registered")))?;
        if !desc.voters.contains(v) {
            // The new replica exists (empty) before its leader sends it a snapshot.
            let mut c = admin(node, &addr).await?;
            tokio::time::timeout(
                PLACEMENT_CALL_TIMEOUT,
                c.create_replica(CreateReplicaRequest {
                    descriptor: Some(desc.to_proto()),
                }),
            )
            .await
            .map_err(|_| Error::unavailable("create replica timed out"))?
            .map_err(|s| Error::from_status(&s))?;
        }
        voters.insert(*v, addr);
    }
    let req = ChangeReplicasRequest {
        range_id: op.range_id,
        voters: voters.into_iter().collect(),
        epoch: Some(RangeEpoch {
            conf_ver: desc.conf_ver,
            version: desc.version,
        }),
    };
    let resp = call_range_leader(node, &desc, PLACEMENT_CALL_TIMEOUT, |mut c| {
        let req = req.clone();
        async move { c.change_replicas(req).await }
    })
    .await?;
    if let Some(d) = resp.descriptor {
        let d = StoredDesc::from_proto(&d);
        meta.upsert_descriptors(std::slice::from_ref(&d)).await?;
        node.pd.note_descs(&[d]);
    }
    meta.delete_op(op.range_id).await?;
    Ok(())
}

/// Calls the leader of the range `desc` describes, trying its voters and
/// following `NotLeader` hints.
async fn call_range_leader<T, F, Fut>(
    node: &Node,
    desc: &StoredDesc,
    timeout: Duration,
    f: F,
) -> Result<T, Error>
where
    F: Fn(AdminClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut targets: Vec<String> = Vec::new();
    let hinted = node
        .pd
        .state
        .lock()
        .expect("pd lock")
        .ranges
        .get(&desc.range_id)
        .map(|r| r.stats.leader_id);
    if let Some(a) = hinted.and_then(|l| node.pd.address(l)) {
        targets.push(a);
    }
    targets.extend(desc.voters.iter().filter_map(|v| node.pd.address(*v)));
    let mut last = Error::unavailable(format!("range {} has no reachable leader", desc.range_id));
    let mut tried = 0;
    while let Some(addr) = targets.first().cloned() {
        targets.remove(0);
        tried += 1;
        if tried > LEADER_TARGETS_MAX {
            break;
        }
        let c = admin(node, &addr).await?;
        match tokio::time::timeout(timeout, f(c)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) => {
                let e = Error::from_status(&s);
                // Only a hint about this range: a voter that does not lead
                // it and is not the meta leader answers with the meta
                // range's leader (this node), which would call itself.
                if let Error::NotLeader {
                    range_id,
                    leader: Some(h),
                } = &e
                {
                    if *range_id == desc.range_id && !h.address.is_empty() {
                        targets.insert(0, h.address.clone());
                    }
                }
                last = e;
            }
            Err(_) => last = Error::unavailable(format!("{addr} timed out")),
        }
    }
    Err(last)
}

/// Splits `range_id` at `key` (its middle when `None`) and records both
/// halves in the meta range. Runs on the meta leader.
pub async fn split(
    node: &Arc<Node>,
    range_id: u64,
    key: Option<Bytes>,
) -> Result<(StoredDesc, StoredDesc), Error> {
    let meta = meta_store(node)?;
    let desc = match node.pd.desc_of(range_id) {
        Some(d) => d,
        None if range_id == META_RANGE_ID => node.stored_desc(&*node.replica(META_RANGE_ID)?),
        None => return Err(Error::RangeNotFound { range_id }),
    };
    let new_range_id = meta.alloc_range_id().await?;
    let cluster_version = node.pd.state.lock().expect("pd lock").cluster_version;
    let req = SplitRangeRequest {
        range_id,
        key: key.unwrap_or_default(),
        new_range_id,
        version: 0,
        start_at_split_index: cluster_version >= crate::version::SPLIT_AT_INDEX,
    };
    let resp = if range_id == META_RANGE_ID {
        split_local(node, req).await?
    } else {
        call_range_leader(node, &desc, SHORT_CALL_TIMEOUT, |mut c| {
            let req = req.clone();
            async move { c.split_range(req).await }
        })
        .await?
    };
    let left = StoredDesc::from_proto(&resp.left.unwrap_or_default());
    let right = StoredDesc::from_proto(&resp.right.unwrap_or_default());
    meta.upsert_descriptors(&[left.clone(), right.clone()])
        .await?;
    node.pd.note_descs(&[left.clone(), right.clone()]);
    tracing::info!(
        range_id,
        new_range_id,
        key = %lmskv_proto::keys::escape(&right.start),
        "split range"
    );
    Ok((left, right))
}

/// Splits a range this node leads (the `SplitRange` call).
pub async fn split_local(
    node: &Node,
    req: SplitRangeRequest,
) -> Result<lmskv_proto::v1::SplitResponse, Error> {
    let r = node.replica(req.range_id)?;
    if !r.is_leader_now() {
        return Err(Error::NotLeader {
            range_id: req.range_id,
            leader: r.leader_hint(),
        });
    }
    if req.new_range_id <= META_RANGE_ID {
        return Err(Error::invalid_argument("new_range_id", "must be above 1"));
    }
    if req.start_at_split_index && node.cluster_version_seen() < crate::version::SPLIT_AT_INDEX {
        return Err(Error::invalid_argument(
            "start_at_split_index",
            format!(
                "needs cluster version {}; this node has recorded {}",
                crate::version::SPLIT_AT_INDEX,
                node.cluster_version_seen()
            ),
        ));
    }
    let m = r.meta();
    let key = if req.key.is_empty() {
        // Reads every key of the range: off the async workers.
        let engine = node.engine.clone();
        let (start, end) = (m.start.clone(), m.end.clone());
        let rows = node.cfg.split_rows();
        let found = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            let Some((mid, _)) = engine.middle_key(&start, &end, 10_000)? else {
                return Ok(Err("range too small to split"));
            };
            if mid.as_ref() <= start.as_ref() {
                return Ok(Err("range too small to split"));
            }
            // Never inside a row of `split_rows`: the application's atomic
            // batches stay in one range.
            let Some(key) = row_split_key(&rows, &start, &end, &mid) else {
                return Ok(Err("the range is one row of split_rows; it is not split"));
            };
            // Both halves must hold a key: moving the key to a row boundary
            // can leave one side empty (all keys in one row and past it).
            let has_keys = |lo: &[u8], hi: &[u8]| -> Result<bool, StorageError> {
                Ok(!engine.scan(lo, hi, 1, false, usize::MAX)?.0.is_empty())
            };
            if !has_keys(&start, &key)? || !has_keys(&key, &end)? {
                return Ok(Err(
                    "no split key leaves keys on both sides without cutting a row",
                ));
            }
            Ok(Ok(key))
        })
        .await
        .map_err(|e| Error::internal(format!("split key search: {e}")))?;
        match found.map_err(|e| r.refuse(&e))? {
            Ok(k) => k,
            Err(reason) => return Err(Error::invalid_argument("key", reason)),
        }
    } else {
        req.key
    };
    let version = if req.version == 0 {
        m.version
    } else {
        req.version
    };
    // Both halves carry the membership applied with the split.
    let (left, right) = r
        .split(key, req.new_range_id, version, req.start_at_split_index)
        .await?;
    Ok(lmskv_proto::v1::SplitResponse {
        left: Some(StoredDesc::new(&left, left.voters.clone(), left.learners.clone()).to_proto()),
        right: Some(
            StoredDesc::new(&right, right.voters.clone(), right.learners.clone()).to_proto(),
        ),
    })
}

/// Moves the leadership of `range_id` to node `to` (from the meta leader).
pub async fn transfer_leader(node: &Arc<Node>, range_id: u64, to: u64) -> Result<(), Error> {
    let desc = node
        .pd
        .desc_of(range_id)
        .ok_or(Error::RangeNotFound { range_id })?;
    if !desc.voters.contains(&to) {
        return Err(Error::invalid_argument(
            "to_node",
            format!("node {to} is not a voter of range {range_id}"),
        ));
    }
    call_range_leader(node, &desc, SHORT_CALL_TIMEOUT, |mut c| async move {
        c.transfer_leader(TransferLeaderRequest {
            range_id,
            to_node: to,
        })
        .await
    })
    .await
    .map(|_| ())
}

/// Marks a node as draining: the driver moves its replicas away.
pub async fn decommission(node: &Arc<Node>, node_id: u64) -> Result<NodeRecord, Error> {
    // Only once the driver has loaded its term: it judges liveness below.
    let meta = serving(node)?;
    let mut rec = meta.nodes()?.remove(&node_id).ok_or_else(|| {
        Error::invalid_argument("node_id", format!("node {node_id} is not registered"))
    })?;
    if rec.state == NodeState::Up {
        // Nodes that can take its replicas: up and alive (a node that died
        // is still registered as up).
        let others = {
            let records = meta.nodes()?;
            let st = node.pd.state.lock().expect("pd lock");
            records
                .values()
                .filter(|r| {
                    r.node_id != node_id
                        && r.state == NodeState::Up
                        && node.pd.is_live(&st, r.node_id)
                })
                .count()
        };
        if others < node.cfg.file.replication_factor {
            return Err(Error::invalid_argument(
                "node_id",
                format!(
                    "draining node {node_id} would leave {others} live nodes for a replication factor of {}",
                    node.cfg.file.replication_factor
                ),
            ));
        }
        rec.state = NodeState::Decommissioning;
        meta.put_node(&rec).await?;
        node.pd
            .state
            .lock()
            .expect("pd lock")
            .records
            .insert(node_id, rec.clone());
        tracing::info!(node_id, "decommissioning node");
    }
    Ok(rec)
}

/// Moves `range_id`'s replica on node `from` to node `to` (an operator
/// request, on the meta leader) the way the driver's own moves go: a
/// pending op in the meta range (resumed by a later leader if this one
/// fails), an empty replica on `to`, learner, joint change, removal. Holds
/// the range's change claim, so no driver change of the range runs at the
/// same time; returns the descriptor after the change.
pub async fn move_replica(
    node: &Arc<Node>,
    range_id: u64,
    from: u64,
    to: u64,
) -> Result<StoredDesc, Error> {
    let desc = node
        .pd
        .desc_of(range_id)
        .ok_or(Error::RangeNotFound { range_id })?;
    if !desc.voters.contains(&from) && desc.voters.contains(&to) {
        // Already done (a retried call).
        return Ok(desc);
    }
    if !desc.voters.contains(&from) {
        return Err(Error::invalid_argument(
            "from_node",
            format!("node {from} is not a voter of range {range_id}"),
        ));
    }
    if desc.voters.contains(&to) || desc.learners.contains(&to) {
        return Err(Error::invalid_argument(
            "to_node",
            format!("node {to} already holds a replica of range {range_id}"),
        ));
    }
    let heard_within = Duration::from_millis(node.cfg.file.node_heartbeat_ms)
        * LEADER_TARGET_HEARD_WITHIN_HEARTBEATS;
    {
        let st = node.pd.state.lock().expect("pd lock");
        let up = st
            .records
            .get(&to)
            .is_some_and(|r| r.state == NodeState::Up);
        let heard = st
            .nodes
            .get(&to)
            .is_some_and(|n| n.last_heartbeat.elapsed() < heard_within);
        if !up || !heard {
            return Err(Error::invalid_argument(
                "to_node",
                format!("node {to} is not an up node heard from lately"),
            ));
        }
    }
    let Ok(_permit) = node.pd.slots.clone().try_acquire_owned() else {
        return Err(Error::unavailable(
            "the placement driver runs as many replica changes as it may; retry",
        ));
    };
    if !node
        .pd
        .inflight
        .lock()
        .expect("inflight lock")
        .insert(range_id)
    {
        return Err(Error::unavailable(format!(
            "a replica change of range {range_id} is in flight; retry"
        )));
    }
    struct Claim<'a>(&'a Mutex<HashSet<u64>>, u64);
    impl Drop for Claim<'_> {
        fn drop(&mut self) {
            if let Ok(mut set) = self.0.lock() {
                set.remove(&self.1);
            }
        }
    }
    let _claim = Claim(&node.pd.inflight, range_id);
    let mut voters: Vec<u64> = desc.voters.iter().copied().filter(|v| *v != from).collect();
    voters.push(to);
    voters.sort_unstable();
    let op = PendingOp {
        range_id,
        voters,
        reason: format!("operator: move a replica from node {from} to node {to}"),
    };
    tracing::info!(range_id, voters = ?op.voters, reason = %op.reason, "replica change");
    match tokio::time::timeout(OP_TIMEOUT, run_op(node, &op)).await {
        Ok(Ok(())) => tracing::info!(range_id, voters = ?op.voters, "replica change done"),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::unavailable(format!(
                "moving range {range_id}'s replica timed out (the driver resumes it)"
            )))
        }
    }
    node.pd
        .desc_of(range_id)
        .ok_or(Error::RangeNotFound { range_id })
}

/// The start of the row `key` belongs to under `rows` (prefix, id length):
/// `key` cut to its longest matching prefix plus the id length. A key that
/// matches no prefix, or is no longer than its prefix and id, is its own row.
pub fn row_start(rows: &[(Bytes, usize)], key: &[u8]) -> Bytes {
    let rule = rows
        .iter()
        .filter(|(p, _)| key.starts_with(p))
        .max_by_key(|(p, _)| p.len());
    match rule {
        Some((p, id_len)) if key.len() > p.len() + id_len => {
            Bytes::copy_from_slice(&key[..p.len() + id_len])
        }
        _ => Bytes::copy_from_slice(key),
    }
}

/// Where an automatic split of the range `[start, end)` (`end` empty: no
/// end) goes, given the middle key `mid` the engine found: the start of
/// `mid`'s row, so no row is cut; when that is not inside `(start, end)`
/// (the range begins at, or inside, that row), the first key after the row;
/// `None` when that is not inside either (the range is one row) and the
/// range should not be split.
pub fn row_split_key(
    rows: &[(Bytes, usize)],
    start: &[u8],
    end: &[u8],
    mid: &[u8],
) -> Option<Bytes> {
    let inside = |k: &[u8]| k > start && (end.is_empty() || k < end);
    let row = row_start(rows, mid);
    if inside(&row) {
        return Some(row);
    }
    // Every key of the row starts with `row`: the first key after them all.
    let next = Bytes::from(lmskv_proto::keys::prefix_end(&row)?);
    // `next` may itself lie inside a row of another rule: use that row's start.
    let next = row_start(rows, &next);
    inside(&next).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pd() -> Pd {
        Pd {
            state: Mutex::new(PdState::default()),
            stage: Arc::new(Mutex::new(("idle", Instant::now()))),
            inflight: Arc::new(Mutex::new(HashSet::new())),
            retry: Arc::default(),
            slots: Arc::new(Semaphore::new(OPS_INFLIGHT_MAX)),
            dead_after: Duration::from_secs(30),
            given_up: watch::Sender::new(HashMap::new()),
        }
    }

    #[tokio::test]
    async fn a_change_given_up_stops_and_later_changes_do_not() {
        let pd = pd();
        let first = pd.until_given_up(7);
        let other = pd.until_given_up(8);
        tokio::pin!(first, other);
        let quiet = Duration::from_millis(50);
        assert!(tokio::time::timeout(quiet, &mut first).await.is_err());
        pd.give_up(7);
        tokio::time::timeout(Duration::from_secs(5), &mut first)
            .await
            .expect("the running change of range 7 is given up");
        assert!(
            tokio::time::timeout(quiet, &mut other).await.is_err(),
            "giving up range 7 stopped a change of range 8"
        );
        // A change started after the give-up is not stopped by it.
        let later = pd.until_given_up(7);
        tokio::pin!(later);
        assert!(tokio::time::timeout(quiet, &mut later).await.is_err());
        pd.give_up(7);
        tokio::time::timeout(Duration::from_secs(5), &mut later)
            .await
            .expect("a second give-up stops the later change");
    }

    fn heard(pd: &Pd, node: u64, ranges: &[u64], faulted: &[u64]) {
        pd.state.lock().unwrap().nodes.insert(
            node,
            NodeLive {
                last_heartbeat: Instant::now(),
                up_since: Instant::now(),
                ranges: ranges.iter().copied().collect(),
                faulted: faulted.iter().copied().collect(),
                version_max: crate::version::CLUSTER_VERSION,
                version_seen: 0,
            },
        );
    }

    /// A whole-key-space range on voters 1, 2 and 3 with `learners`.
    fn desc(range_id: u64, learners: Vec<u64>) -> StoredDesc {
        StoredDesc {
            range_id,
            start: Bytes::new(),
            end: Bytes::new(),
            version: 1,
            conf_ver: 1,
            voters: vec![1, 2, 3],
            learners,
        }
    }

    /// A voter whose node reports its replica faulted is replaced at once;
    /// one whose node reports no replica only after the grace, and not
    /// while a change of its range is in flight.
    #[test]
    fn faulted_voters_are_missing_at_once_absent_ones_after_the_grace() {
        let pd = pd();
        let descs = [desc(2, vec![]), desc(3, vec![])];
        heard(&pd, 1, &[2, 3], &[]);
        heard(&pd, 2, &[2, 3], &[2]);
        heard(&pd, 3, &[2], &[]);
        let missing = pd.missing_voters(&descs);
        assert_eq!(missing, HashSet::from([(2, 2)]));
        // Node 3's lack of range 3 is being timed.
        assert!(pd.state.lock().unwrap().missing.contains_key(&(3, 3)));
        let long_ago = Instant::now() - MISSING_VOTER_GRACE;
        pd.state.lock().unwrap().missing.insert((3, 3), long_ago);
        assert_eq!(pd.missing_voters(&descs), HashSet::from([(2, 2), (3, 3)]));
        // A change of range 2 in flight: its voters are left alone.
        pd.inflight.lock().unwrap().insert(2);
        assert_eq!(pd.missing_voters(&descs), HashSet::from([(3, 3)]));
        pd.inflight.lock().unwrap().clear();
        // A node whose fault is gone (its replica was replaced) is no longer
        // missing.
        heard(&pd, 2, &[2, 3], &[]);
        assert_eq!(pd.missing_voters(&descs), HashSet::from([(3, 3)]));
    }

    /// A learner is left over only once seen for the grace in a range with
    /// no change in flight or pending; a change restarts the grace, and a
    /// learner that leaves is forgotten.
    #[test]
    fn learners_are_left_over_after_the_grace_with_no_change_under_way() {
        let pd = pd();
        let t0 = Instant::now();
        let later = t0 + LEFTOVER_LEARNER_GRACE;
        let none = HashSet::new();
        let descs = [desc(2, vec![5, 4]), desc(3, vec![]), desc(4, vec![4])];
        assert!(pd.leftover_learners(&descs, &none, t0).is_empty());
        assert_eq!(
            pd.leftover_learners(&descs, &none, later),
            BTreeMap::from([(2, vec![4, 5]), (4, vec![4])])
        );
        // A change of range 2 pending, and one of range 4 in flight: their
        // learners are theirs, and their grace starts over afterwards.
        pd.inflight.lock().unwrap().insert(4);
        assert!(pd
            .leftover_learners(&descs, &HashSet::from([2]), later)
            .is_empty());
        pd.inflight.lock().unwrap().clear();
        assert!(pd.leftover_learners(&descs, &none, later).is_empty());
        let much_later = later + LEFTOVER_LEARNER_GRACE;
        // Range 2's learner 5 left meanwhile.
        let descs = [desc(2, vec![4]), desc(3, vec![]), desc(4, vec![4])];
        assert_eq!(
            pd.leftover_learners(&descs, &none, much_later),
            BTreeMap::from([(2, vec![4]), (4, vec![4])])
        );
        assert_eq!(pd.state.lock().unwrap().leftover.len(), 2);
    }

    /// A range's failed replica changes are tried again after 1, 2 and 4 s,
    /// and then every 8 s.
    #[test]
    fn failed_changes_wait_longer_each_time_up_to_a_bound() {
        let waits: Vec<u64> = (1..=7).map(|n| change_retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 8, 8, 8]);
        assert_eq!(change_retry_wait(u32::MAX), CHANGE_RETRY_WAIT_MAX);
    }

    #[test]
    fn a_failed_split_backs_off_until_the_range_is_well_below_the_limits() {
        let mib = 1 << 20;
        // Just below a limit keeps the backoff; well below both ends it.
        assert!(!split_backoff_ends(2_400.0, mib, 2_500.0, 64 * mib));
        assert!(!split_backoff_ends(100.0, 63 * mib, 2_500.0, 64 * mib));
        assert!(split_backoff_ends(1_000.0, 50 * mib, 2_500.0, 64 * mib));
        // Load splits off: only the size counts.
        assert!(split_backoff_ends(1e9, mib, 0.0, 64 * mib));
        assert!(!split_backoff_ends(0.0, 64 * mib, 0.0, 64 * mib));
    }

    #[test]
    fn failed_splits_wait_longer_each_time_up_to_a_bound() {
        let waits: Vec<u64> = (1..=8).map(|n| split_retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(split_retry_wait(u32::MAX), SPLIT_RETRY_WAIT_MAX);
    }

    fn course(cid: u64, rest: &[u8]) -> Vec<u8> {
        let mut k = b"course/".to_vec();
        k.extend_from_slice(&cid.to_be_bytes());
        k.extend_from_slice(rest);
        k
    }

    fn rows() -> Vec<(Bytes, usize)> {
        vec![(Bytes::from_static(b"course/"), 8)]
    }

    #[test]
    fn split_keys_move_to_the_start_of_their_row() {
        let rows = rows();
        // A key inside course 7's row moves to the row's start.
        let mid = course(7, b"/s/\x00\x01");
        assert_eq!(
            row_split_key(&rows, b"course/", b"email/", &mid).unwrap(),
            course(7, b"")
        );
        // With no end bound too.
        assert_eq!(
            row_split_key(&rows, b"course/", b"", &mid).unwrap(),
            course(7, b"")
        );
        // Keys outside every row family, and the row start itself, stay.
        assert_eq!(
            row_split_key(&rows, b"a", b"z", b"user/\x00\x05").unwrap(),
            Bytes::from_static(b"user/\x00\x05")
        );
        assert_eq!(
            row_split_key(&rows, b"a", b"z", &course(7, b"")).unwrap(),
            course(7, b"")
        );
        // A key shorter than prefix + id cuts no row.
        assert_eq!(
            row_split_key(&rows, b"a", b"z", b"course/\x00\x01").unwrap(),
            Bytes::from_static(b"course/\x00\x01")
        );
        // No rules: the middle key as found.
        assert_eq!(
            row_split_key(&[], b"a", b"z", &mid).unwrap(),
            Bytes::from(mid.clone())
        );
    }

    #[test]
    fn a_range_starting_at_its_middle_row_splits_after_the_row() {
        let rows = rows();
        let start = course(7, b"");
        let mid = course(7, b"/m/x");
        assert_eq!(
            row_split_key(&rows, &start, b"", &mid).unwrap(),
            course(8, b"")
        );
        // A range that starts inside the row (a manual split) likewise.
        let start = course(7, b"/a/");
        assert_eq!(
            row_split_key(&rows, &start, &course(9, b""), &mid).unwrap(),
            course(8, b"")
        );
        // After row 0x..ff comes the shortest key above it (no row cut).
        let start = course(0xff, b"");
        assert_eq!(
            row_split_key(&rows, &start, b"", &course(0xff, b"/i")).unwrap(),
            Bytes::from_static(b"course/\x00\x00\x00\x00\x00\x00\x01")
        );
    }

    #[test]
    fn a_range_that_is_one_row_is_not_split() {
        let rows = rows();
        let mid = course(7, b"/s/1");
        assert_eq!(
            row_split_key(&rows, &course(7, b""), &course(8, b""), &mid),
            None
        );
        assert_eq!(
            row_split_key(&rows, &course(7, b""), &course(7, b"/t"), &mid),
            None
        );
        // After the last row of a family comes the next prefix ...
        let last = course(u64::MAX, b"");
        assert_eq!(
            row_split_key(&rows, &last, b"", &course(u64::MAX, b"/i")).unwrap(),
            Bytes::from_static(b"course0")
        );
        // ... unless nothing comes after it.
        assert_eq!(
            row_split_key(
                &[(Bytes::from_static(b"\xff"), 2)],
                b"\xff\xff\xff",
                b"",
                b"\xff\xff\xff\x01"
            ),
            None
        );
    }

    #[test]
    fn the_longest_matching_prefix_decides() {
        let rows = vec![
            (Bytes::from_static(b"c/"), 2),
            (Bytes::from_static(b"c/x/"), 1),
        ];
        assert_eq!(row_start(&rows, b"c/x/abc"), Bytes::from_static(b"c/x/a"));
        assert_eq!(row_start(&rows, b"c/ab/cd"), Bytes::from_static(b"c/ab"));
        assert_eq!(row_start(&rows, b"c/a"), Bytes::from_static(b"c/a"));
    }
}
