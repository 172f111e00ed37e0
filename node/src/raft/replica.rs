//! [`RangeReplica`]: this node's replica of one range — its Raft group, how
//! commands are proposed, how reads are made consistent, and the handlers of
//! incoming Raft messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::FutureExt;
use lmskv_proto::error::{Error, LeaderHint};
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use openraft::impls::BasicNode;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{ChangeMembers, Config, RaftMetrics, ReadPolicy, ServerState, SnapshotPolicy};

use super::codec::{decode, encode};
use super::command::RangeMeta;
use super::command::{Command, CommandResponse, Op};
use super::log_store::LogStore;
use super::network::{FaultedPeers, NetworkFactory, PeerPool};
use super::proposals::{self, Admission, Answer, Proposals, Waiting};
use super::state_machine::{Installs, SharedMeta, SnapshotFile, SplitHook, StateMachine};
use super::TypeConfig;
use crate::storage::Engine;

type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// How long a leader transfer may take before it is reported as failed.
/// How a request's view of a range differs from the range (see
/// [`RangeReplica::check_span`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanMismatch {
    /// The span version differs: a split the caller did not see.
    Version,
    /// A key is outside the span.
    Key,
}

/// Tries (a second apart) to get a range's snapshot rebuilt after a split;
/// see [`RangeReplica::snapshot_after_split`].
pub const SPLIT_SNAPSHOT_TRIES: u32 = 30;
const LEADER_TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a replica change waits for its new members to catch up.
const LEARNER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a membership change waiting for new replicas to catch up
/// looks for one that faulted, when the metrics show nothing new.
const LEARNER_FAULT_CHECK_EVERY: Duration = Duration::from_millis(500);
/// A learner this close to the leader's last log index counts as caught up.
const LEARNER_LAG_OK: u64 = 16;

/// How often a write waiting for commit checks whether its leader was cut off.
const CUT_OFF_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Raft timing and log retention, from the node config.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    pub heartbeat_interval_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log after a snapshot, for followers that lag a little.
    pub snapshot_logs_to_keep: u64,
    /// Longest a write waits for commit and apply.
    pub write_timeout: Duration,
    /// Longest a read waits for its consistency check.
    pub read_timeout: Duration,
    /// How long the outcome of a request id is remembered for retries.
    pub dedup_window: Duration,
    /// Proposals (single writes or groups) a range's leader keeps in flight.
    pub proposals_in_flight_max: usize,
    /// A replica asleep and unused this long parks (see
    /// [`RangeReplica::hibernate_tick`]).
    pub park_after: Duration,
}

/// How a read must be made consistent before it is served locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLevel {
    /// Linearizable: only the leader, after a lease check (ReadIndex if the lease is unsure).
    Strong,
    /// Within `max_ms` of the leader. Served by the leader under its lease.
    BoundedStaleness { max_ms: u64 },
    /// Once this replica applied at least `min_applied`.
    Session { min_applied: u64 },
    /// This replica's applied state as it is.
    Local,
}

/// A snapshot of a replica's Raft state, for status reports.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub range_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// The leader (term, node id) that proposed the last applied entry.
    pub applied_leader: Option<(u64, u64)>,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    /// Last log index removed from the log (0: none).
    pub purged_index: u64,
    pub role: &'static str,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub nodes: BTreeMap<u64, String>,
    pub fault: Option<String>,
    /// The group is parked (shut down while dormant; loaded on demand).
    pub parked: bool,
    /// Client writes (and splits) this replica proposed since it opened,
    /// and the log entries they went in: many writes share an entry under load.
    pub writes_proposed: u64,
    pub entries_proposed: u64,
    /// Snapshots a leader sent that this replica answered without
    /// installing, its log already holding their last entry.
    pub snapshots_not_installed: u64,
}

/// A replica's Raft group: running, or parked with the metrics it last
/// reported (a parked group has applied every entry of its log and is not
/// running, so those metrics stay true until it is loaded again).
enum Group {
    Live(Raft),
    Parked(Arc<RaftMetrics<TypeConfig>>),
}

/// What loading a parked group again needs.
struct Reopen {
    pool: Arc<PeerPool>,
    data_dir: PathBuf,
    on_split: SplitHook,
    /// Peers that refused as faulted, kept across parking.
    faulted_peers: Arc<FaultedPeers>,
}

/// One call counted in a replica's `users` while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The live group, held by a call that needs it; a group in use is never parked.
struct InUse<'a> {
    raft: Raft,
    _counted: Counted<'a>,
}

impl std::ops::Deref for InUse<'_> {
    type Target = Raft;
    fn deref(&self) -> &Raft {
        &self.raft
    }
}

/// Appends an [`AppendPipe`] holds, queued or in the group; more are refused.
const APPEND_PIPE_MAX: usize = 64;

/// What an append sent into a pipe comes back with: the encoded
/// `AppendEntriesResponse`, or why it was not served.
pub type PipedReply = tokio::sync::oneshot::Receiver<Result<Vec<u8>, Error>>;

/// A follower's ordered intake for the appends of one range that arrive on
/// one append stream. openraft's `Raft::stream_append` hands them to the
/// group in arrival order and answers them in that order, each once its
/// entries are durable. A leader that keeps several appends of a range in
/// flight (`raft_append_pipeline`) thus has the next one queued here while
/// this replica syncs the last; served one by one, concurrently, appends
/// could reach the group out of order and be refused as conflicts.
pub struct AppendPipe {
    raft: Raft,
    /// The group load this pipe feeds (see `RangeReplica::loads`).
    load: u64,
    requests: tokio::sync::mpsc::Sender<AppendEntriesRequest<TypeConfig>>,
    /// One entry per append, in the same order, entered before the append.
    waiting: tokio::sync::mpsc::Sender<PipedAppend>,
}

impl std::fmt::Debug for AppendPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendPipe")
            .field("load", &self.load)
            .finish()
    }
}

/// A follower's last accepted AppendEntries from a leader: its proof of
/// freshness for bounded-staleness reads.
#[derive(Debug, Clone, Copy)]
struct LeaderContact {
    /// When the append arrived (tokio's clock, as everything here).
    received: tokio::time::Instant,
    /// When a quorum last acknowledged a leader, by the last append that
    /// said (its arrival less the age it gave, `RaftMessage::quorum_acked_age_us`),
    /// with that append's commit index: every write acknowledged before
    /// then is at or below it. A leader cut off from the majority still
    /// reaches the followers on its side, but this stays in the past.
    /// Tokio's clock, as the leader's proof (the simulation pauses it).
    proof: Option<(tokio::time::Instant, u64)>,
}

impl LeaderContact {
    /// The contact an append makes, taken as it arrives (before the group
    /// is loaded, which can take a while for a parked one).
    fn new(payload_commit: u64, quorum_acked_age_us: Option<u64>) -> LeaderContact {
        let received = tokio::time::Instant::now();
        LeaderContact {
            received,
            proof: quorum_acked_age_us
                .and_then(|us| received.checked_sub(Duration::from_micros(us)))
                .map(|at| (at, payload_commit)),
        }
    }

    /// Records this accepted append in `slot`: an append without a proof
    /// keeps the proof before it (still true, with its own commit index).
    fn record(self, slot: &Mutex<Option<LeaderContact>>) {
        let mut slot = slot.lock().expect("contact lock");
        let proof = self.proof.or_else(|| slot.and_then(|c| c.proof));
        *slot = Some(LeaderContact { proof, ..self });
    }
}

/// An append in a pipe, waiting for its answer.
struct PipedAppend {
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, Error>>,
    /// An entry-less append from a hibernating leader (see `handle_append`).
    sleep: bool,
    contact: LeaderContact,
    /// The group is not parked while an append runs.
    _user: User,
}

/// Counts as a call holding the live group (see `RangeReplica::users`)
/// until dropped.
struct User(Arc<RangeReplica>);

impl Drop for User {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why an append did not enter a pipe.
#[derive(Debug)]
pub enum PipeRefusal {
    /// The pipe ended, or its group was parked or loaded again since it
    /// opened: the append needs another pipe (or to be served alone).
    Ended,
    /// The append is answered with this error.
    Refused(Error),
}

impl AppendPipe {
    /// Whether the pipe has ended (see `RangeReplica::run_append_pipe`).
    pub fn is_ended(&self) -> bool {
        self.waiting.is_closed()
    }

    /// Sends the append `payload` of `replica` (the one this pipe was
    /// opened on) into the pipe, behind the appends sent before it.
    /// `hibernate` and `quorum_acked_age_us` are the message's.
    pub fn send(
        &self,
        replica: &Arc<RangeReplica>,
        payload: &[u8],
        hibernate: bool,
        quorum_acked_age_us: Option<u64>,
    ) -> Result<PipedReply, PipeRefusal> {
        // Counted before the group is looked at, as in `RangeReplica::raft`.
        replica.users.fetch_add(1, Ordering::SeqCst);
        let user = User(replica.clone());
        if self.waiting.is_closed()
            || replica.loads.load(Ordering::SeqCst) != self.load
            || replica.is_parked()
        {
            return Err(PipeRefusal::Ended);
        }
        let req: AppendEntriesRequest<TypeConfig> = decode("append entries", payload)
            .map_err(|e| PipeRefusal::Refused(Error::invalid_argument("payload", e.to_string())))?;
        let sleep = hibernate && req.entries.is_empty();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let waiting = PipedAppend {
            reply,
            sleep,
            contact: LeaderContact::new(
                req.leader_commit.as_ref().map(|l| l.index()).unwrap_or(0),
                quorum_acked_age_us,
            ),
            _user: user,
        };
        match self.waiting.try_send(waiting) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                return Err(PipeRefusal::Ended)
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                return Err(PipeRefusal::Refused(Error::unavailable(format!(
                    "range {}: {APPEND_PIPE_MAX} appends are waiting already; send again",
                    replica.range_id
                ))))
            }
        }
        if sleep {
            replica.fall_asleep(&self.raft);
        }
        // Never full: every append in `requests` has its entry in
        // `waiting`, which had room for this one. When the group's side has
        // closed, the pipe answers the entry just made.
        let _ = self.requests.try_send(req);
        Ok(answer)
    }
}

/// This node's replica of one range.
pub struct RangeReplica {
    range_id: u64,
    node_id: u64,
    group: RwLock<Group>,
    /// Serialises parking and loading the group.
    lifecycle: tokio::sync::Mutex<()>,
    /// The load of the parked group under way, shared by every caller
    /// that needs the group meanwhile (see [`RangeReplica::load`]).
    loading: Mutex<Option<SharedLoad>>,
    /// Calls holding the live group now.
    users: AtomicUsize,
    /// Set by `shutdown`: the group is never loaded again.
    closed: AtomicBool,
    /// Set while [`RangeReplica::snapshot_after_split`] runs, so that its
    /// callers (the split, the node's start, the reconcile tick) do not
    /// run two at once.
    snapshot_rebuilding: AtomicBool,
    reopen: Reopen,
    engine: Arc<Engine>,
    tuning: RaftTuning,
    snapshot_dir: PathBuf,
    meta: SharedMeta,
    fault: Mutex<Option<String>>,
    /// Requests served since the last stats read (for load-based splits).
    served: std::sync::atomic::AtomicU64,
    /// Leader side: set while the range is idle and its heartbeats are off.
    hibernating: Arc<AtomicBool>,
    /// The state machine's snapshot installs: their sequence (odd while one
    /// runs; see [`RangeReplica::read_local`]), and the import's own lock
    /// and stop flag (see [`RangeReplica::stop_installs`]).
    installs: Arc<Installs>,
    /// Follower side: set while the election timer is off because the
    /// leader said it hibernates.
    dormant: AtomicBool,
    /// When `dormant` or `hibernating` was last set.
    asleep_since: Mutex<std::time::Instant>,
    /// The group led its range when it parked: the next request that needs
    /// a leader campaigns first.
    led_when_parked: AtomicBool,
    /// Times the group was loaded after parking: an append pipe feeds the
    /// group that was live when it opened (see [`AppendPipe`]).
    loads: std::sync::atomic::AtomicU64,
    /// When a client request or proposal last touched the range.
    last_activity: Mutex<std::time::Instant>,
    /// What this replica last accepted AppendEntries from a leader (see
    /// [`LeaderContact`]).
    leader_contact: Mutex<Option<LeaderContact>>,
    /// Proposal slots and the writes waiting for one (many writes per entry).
    proposals: Mutex<Proposals>,
    /// This replica, for the tasks that propose queued writes as a group.
    me: Weak<RangeReplica>,
    /// Client writes proposed, and the log entries they went in.
    writes_proposed: std::sync::atomic::AtomicU64,
    entries_proposed: std::sync::atomic::AtomicU64,
    /// See [`ReplicaStatus::snapshots_not_installed`].
    snapshots_not_installed: std::sync::atomic::AtomicU64,
}

/// A parked group's load, awaited by every caller that needs the group
/// while it runs.
type SharedLoad = futures::future::Shared<futures::future::BoxFuture<'static, Result<Raft, Error>>>;

/// Clears a replica's shared load when its task ends.
struct LoadDone<'a>(&'a RangeReplica);

impl Drop for LoadDone<'_> {
    fn drop(&mut self) {
        *self.0.loading.lock().expect("loading lock") = None;
    }
}

/// A proposal slot held while a proposal is in flight; giving it up starts
/// the next group of waiting writes (also when the holder is dropped).
struct Slot<'a>(&'a RangeReplica);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.slot_done();
    }
}

impl std::fmt::Debug for RangeReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReplica")
            .field("range_id", &self.range_id)
            .field("node_id", &self.node_id)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hint_of(f: &ForwardToLeader<TypeConfig>) -> Option<LeaderHint> {
    f.leader_id.map(|id| LeaderHint {
        node_id: id,
        address: f
            .leader_node
            .as_ref()
            .map(|n| n.addr.clone())
            .unwrap_or_default(),
    })
}

fn snapshot_dir_of(data_dir: &std::path::Path, range_id: u64) -> PathBuf {
    data_dir.join("snapshots").join(format!("range-{range_id}"))
}

/// Starts a range's Raft group over its stored state. `meta`: the descriptor
/// the replica already shares with the services, when the group is loaded
/// again after parking (it then keeps snapshot files being received).
async fn start_group(
    range_id: u64,
    engine: &Arc<Engine>,
    reopen: &Reopen,
    tuning: &RaftTuning,
    hibernating: &Arc<AtomicBool>,
    installs: &Arc<Installs>,
    meta: Option<SharedMeta>,
) -> Result<(Raft, SharedMeta), Error> {
    let node_id = reopen.pool.local_id();
    let config = Config {
        cluster_name: "lmskv".into(),
        election_timeout_min: tuning.election_timeout_ms_min,
        election_timeout_max: tuning.election_timeout_ms_max,
        heartbeat_interval: tuning.heartbeat_interval_ms,
        install_snapshot_timeout: 60_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: tuning.snapshot_logs_to_keep,
        max_payload_entries: 1_000,
        enable_pre_vote: Some(true),
        // Replicate entries as soon as they are written, in parallel with the
        // leader's own fsync, rather than after it.
        broadcast_submitted_on_append: Some(true),
        // A leader restarted before its followers elect another must not
        // take up its old term again: it would come back without a new
        // entry, with the commit index its last saved hint holds (saved at
        // most every 200 ms, not synced) and with applied state that skips
        // the WAL, and answer STRONG reads at that older index. It stands
        // for election instead, and the winner's first entry must commit
        // before it serves reads.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::invalid_argument("raft config", e.to_string()))?;

    let reloading = meta.is_some();
    // Opening blocks: it reads the snapshot directory, waits for an import
    // of this replica still running from before the group was parked, and
    // finishes an install a crash interrupted. Off the async threads, so a
    // node with one worker thread goes on serving its other ranges.
    let open = {
        let (engine, dir, window, on_split, installs) = (
            engine.clone(),
            snapshot_dir_of(&reopen.data_dir, range_id),
            tuning.dedup_window,
            reopen.on_split.clone(),
            installs.clone(),
        );
        move || {
            StateMachine::open(
                engine, range_id, dir, window, on_split, !reloading, installs,
            )
        }
    };
    let opened = if engine.runs_inline() {
        open()
    } else {
        tokio::task::spawn_blocking(open)
            .await
            .map_err(|e| Error::Internal {
                reason: format!("range {range_id}: opening the state machine failed: {e}"),
            })?
    };
    let mut sm = opened.map_err(|e| Error::Corruption {
        reason: format!("range {range_id} state machine: {e}"),
    })?;
    if let Some(shared) = meta {
        sm.share_meta(shared);
    }
    let meta = sm.meta();
    let mut log = LogStore::new(engine.clone(), range_id, Some(reopen.pool.local_id()));
    {
        // Applied writes skip the WAL: after a crash the applied state can
        // be behind the commit saved in the log, and openraft applies the
        // entries between again as it starts. Said here, as it is work a
        // restart does and the reason a replica's reads went back in time.
        use openraft::storage::{RaftLogStorage, RaftStateMachine};
        if let (Ok(Some(committed)), Ok((applied, _))) =
            (log.read_committed().await, sm.applied_state().await)
        {
            let applied_index = applied.as_ref().map_or(0, |l| l.index());
            if applied_index < committed.index() {
                tracing::info!(
                    range_id,
                    applied = applied_index,
                    committed = committed.index(),
                    "applied state is behind the saved commit (a crash lost what was applied since the last flush, or apply lagged at the stop); applying the log again"
                );
            }
        }
    }
    let net = NetworkFactory {
        pool: reopen.pool.clone(),
        range_id,
        hibernating: hibernating.clone(),
        faulted_peers: reopen.faulted_peers.clone(),
        metrics: Default::default(),
    };
    let metrics = net.metrics.0.clone();
    let raft = Raft::new(node_id, Arc::new(config), net, log, sm)
        .await
        .map_err(|e| Error::Corruption {
            reason: format!("range {range_id} failed to start: {e}"),
        })?;
    let _ = metrics.set(raft.metrics());
    Ok((raft, meta))
}

impl RangeReplica {
    /// Opens (creating if new) this node's replica of `range_id` covering `span`.
    pub async fn open(
        engine: Arc<Engine>,
        pool: Arc<PeerPool>,
        range_id: u64,
        data_dir: &std::path::Path,
        tuning: RaftTuning,
        on_split: SplitHook,
    ) -> Result<Arc<Self>, Error> {
        let node_id = pool.local_id();
        let hibernating = Arc::new(AtomicBool::new(false));
        let installs = Arc::new(Installs::default());
        let reopen = Reopen {
            pool,
            data_dir: data_dir.to_path_buf(),
            on_split,
            faulted_peers: Arc::default(),
        };
        let (raft, meta) = start_group(
            range_id,
            &engine,
            &reopen,
            &tuning,
            &hibernating,
            &installs,
            None,
        )
        .await?;
        let snapshot_dir = snapshot_dir_of(data_dir, range_id);
        let slots = tuning.proposals_in_flight_max;
        Ok(Arc::new_cyclic(|me| RangeReplica {
            range_id,
            node_id,
            group: RwLock::new(Group::Live(raft)),
            lifecycle: tokio::sync::Mutex::new(()),
            loading: Mutex::new(None),
            users: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            snapshot_rebuilding: AtomicBool::new(false),
            reopen,
            engine,
            tuning,
            snapshot_dir,
            meta,
            fault: Mutex::new(None),
            served: std::sync::atomic::AtomicU64::new(0),
            hibernating,
            installs,
            dormant: AtomicBool::new(false),
            asleep_since: Mutex::new(std::time::Instant::now()),
            led_when_parked: AtomicBool::new(false),
            loads: std::sync::atomic::AtomicU64::new(0),
            last_activity: Mutex::new(std::time::Instant::now()),
            leader_contact: Mutex::new(None),
            proposals: Mutex::new(Proposals::with_slots(slots)),
            me: me.clone(),
            writes_proposed: std::sync::atomic::AtomicU64::new(0),
            snapshots_not_installed: std::sync::atomic::AtomicU64::new(0),
            entries_proposed: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Reads the group's metrics: live ones, or those it parked with.
    fn with_metrics<R>(&self, f: impl FnOnce(&RaftMetrics<TypeConfig>) -> R) -> R {
        let rx = {
            let g = self.group.read().expect("group lock");
            match &*g {
                Group::Live(raft) => raft.metrics(),
                Group::Parked(m) => {
                    let m = m.clone();
                    drop(g);
                    return f(&m);
                }
            }
        };
        let m = rx.borrow_watched();
        f(&m)
    }

    /// The running group, if it is not parked (for calls that only adjust it).
    fn live(&self) -> Option<Raft> {
        match &*self.group.read().expect("group lock") {
            Group::Live(raft) => Some(raft.clone()),
            Group::Parked(_) => None,
        }
    }

    /// The running group, loaded first when parked.
    async fn raft(&self) -> Result<InUse<'_>, Error> {
        // Counted before the group is looked at: `park` checks the count
        // under the group's write lock, so once this call has seen a live
        // group (or loaded one) it stays live until the call is done.
        self.users.fetch_add(1, Ordering::SeqCst);
        let counted = Counted(&self.users);
        let raft = match self.live() {
            Some(r) => r,
            None => self.load().await?,
        };
        Ok(InUse {
            raft,
            _counted: counted,
        })
    }

    /// The running group for a call that needs this replica to lead (a
    /// write, a STRONG read, an operator change): a group that led its range
    /// when it parked campaigns first (it restarted as a follower, and every
    /// other replica sleeps), waiting at most two election timeouts.
    async fn serving(&self) -> Result<InUse<'_>, Error> {
        let held = self.raft().await?;
        if !self.led_when_parked.swap(false, Ordering::SeqCst) {
            return Ok(held);
        }
        let me = self.node_id;
        let settled = |m: &RaftMetrics<TypeConfig>| {
            m.state == ServerState::Leader || m.current_leader.is_some_and(|l| l != me)
        };
        let mut rx = held.metrics();
        if settled(&rx.borrow_watched()) {
            return Ok(held);
        }
        if let Err(e) = held.trigger().elect(false).await {
            return Err(self.fatal(e));
        }
        let wait = Duration::from_millis(2 * self.tuning.election_timeout_ms_max);
        let _ = tokio::time::timeout(wait, async {
            loop {
                if settled(&rx.borrow_and_update()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        tracing::debug!(
            range_id = self.range_id,
            "parked leader loaded and campaigned"
        );
        Ok(held)
    }

    /// Loads a parked group; returns the running one. The load runs to its
    /// end even when the caller stops waiting (a request that timed out): a
    /// load dropped midway would leave its state machine's open (which
    /// clears the range's temporary snapshot files, and may resume an
    /// import) running outside the lifecycle lock, beside the next load's
    /// group. One load runs at a time, shared by every caller that comes
    /// while it runs: callers that keep giving up on a slow load (one
    /// waiting for an import) leave nothing queued behind it.
    async fn load(&self) -> Result<Raft, Error> {
        let shared = {
            let mut slot = self.loading.lock().expect("loading lock");
            match &*slot {
                Some(load) => load.clone(),
                None => {
                    let Some(me) = self.me.upgrade() else {
                        return Err(self.shut_down());
                    };
                    let range_id = self.range_id;
                    let task = tokio::spawn(async move { me.load_to_end().await });
                    let load: SharedLoad = async move {
                        task.await
                            .map_err(|e| Error::internal(format!("range {range_id} load: {e}")))?
                    }
                    .boxed()
                    .shared();
                    *slot = Some(load.clone());
                    load
                }
            }
        };
        shared.await
    }

    async fn load_to_end(&self) -> Result<Raft, Error> {
        let _l = self.lifecycle.lock().await;
        // Clears the shared load before the lifecycle lock is let go (also
        // if the load panics): once the group could park again, a caller
        // that comes starts a load of its own instead of taking this one's
        // group.
        let _done = LoadDone(self);
        if let Some(r) = self.live() {
            return Ok(r);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.shut_down());
        }
        self.check_fault()?;
        let (raft, _) = start_group(
            self.range_id,
            &self.engine,
            &self.reopen,
            &self.tuning,
            &self.hibernating,
            &self.installs,
            Some(self.meta.clone()),
        )
        .await
        // Recorded as the replica's fault: status reports it, and the
        // replica refuses requests instead of retrying the load each time.
        .map_err(|e| self.fatal(e))?;
        if self.led_when_parked.load(Ordering::SeqCst) {
            // It restarts as a follower; `serving` campaigns for a request,
            // and its election timer runs meanwhile.
            self.hibernating.store(false, Ordering::Relaxed);
        } else if self.dormant.load(Ordering::Relaxed) {
            // Still waiting for a hibernating leader: no election timer until
            // the leader speaks without the mark (or its node goes silent).
            let rc = raft.runtime_config();
            rc.elect(false);
            rc.tick(false);
        }
        self.loads.fetch_add(1, Ordering::SeqCst);
        {
            let mut g = self.group.write().expect("group lock");
            // A fault recorded while the group started (a read of the
            // parked range's data found it corrupt) keeps it stopped; so
            // does a shutdown for good that gave up waiting for this load
            // (the replica may be removed and its data deleted).
            if self.fault.lock().expect("fault lock").is_some() {
                drop(g);
                let _ = raft.shutdown().await;
                return Err(self.check_fault().expect_err("the replica is faulted"));
            }
            if self.closed.load(Ordering::SeqCst) {
                drop(g);
                let _ = raft.shutdown().await;
                return Err(self.shut_down());
            }
            *g = Group::Live(raft.clone());
        }
        tracing::debug!(range_id = self.range_id, "range group loaded");
        Ok(raft)
    }

    /// Whether this replica may park now: asleep (a follower dormant, or a
    /// leader hibernating with every follower holding every entry and no
    /// learner) for `park_after` ([`RaftTuning`]), idle as long, every log entry
    /// applied, no fault. Never the meta range.
    fn parkable(&self, m: &RaftMetrics<TypeConfig>) -> bool {
        let settled = self.range_id != lmskv_proto::range::META_RANGE_ID
            && self.asleep_since.lock().expect("asleep lock").elapsed() >= self.tuning.park_after
            && self.last_activity.lock().expect("activity lock").elapsed()
                >= self.tuning.park_after
            && m.running_state.is_ok()
            && m.last_log_index.is_some()
            && m.last_applied.as_ref().map(|l| l.index()) == m.last_log_index
            && self.fault.lock().expect("fault lock").is_none();
        settled
            && match m.state {
                ServerState::Follower => self.dormant.load(Ordering::Relaxed),
                ServerState::Leader => {
                    self.hibernating.load(Ordering::Relaxed)
                        && m.membership_config
                            .membership()
                            .learner_ids()
                            .next()
                            .is_none()
                        && m.replication.as_ref().is_some_and(|rep| {
                            rep.values()
                                .all(|l| l.as_ref().map(|l| l.index()) == m.last_log_index)
                        })
                }
                _ => false,
            }
    }

    /// Shuts the group down if the replica is still parkable and no call
    /// holds the group; its metrics stand in for it until it is loaded.
    async fn park(&self) {
        let Ok(_l) = self.lifecycle.try_lock() else {
            return;
        };
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let raft = {
            let mut g = self.group.write().expect("group lock");
            let Group::Live(raft) = &*g else {
                return;
            };
            if self.users.load(Ordering::SeqCst) != 0 {
                return;
            }
            let m = raft.metrics().borrow_watched().clone();
            if !self.parkable(&m) {
                return;
            }
            let raft = raft.clone();
            self.led_when_parked
                .store(m.state == ServerState::Leader, Ordering::SeqCst);
            *g = Group::Parked(Arc::new(m));
            raft
        };
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(range_id = self.range_id, error = %e, "parking the range group");
        }
        tracing::debug!(range_id = self.range_id, "range group parked");
    }

    /// Whether the group is parked now.
    pub fn is_parked(&self) -> bool {
        self.live().is_none()
    }

    /// The range's span and epoch as this replica last applied them.
    pub fn meta(&self) -> RangeMeta {
        self.meta.read().expect("meta lock").clone()
    }

    /// Whether the range's span is still at `version` (when given; raised
    /// by every split) and holds every key of `keys`, checked under the
    /// metadata lock without copying the metadata (every request asks).
    pub fn check_span(&self, keys: &[&[u8]], version: Option<u64>) -> Result<(), SpanMismatch> {
        let m = self.meta.read().expect("meta lock");
        if version.is_some_and(|v| v != m.version) {
            return Err(SpanMismatch::Version);
        }
        if keys.iter().any(|k| !m.contains(k)) {
            return Err(SpanMismatch::Key);
        }
        Ok(())
    }

    /// Runs `read` on this replica's store unless a snapshot install
    /// overlapped it: an install first deletes the range's data and then
    /// writes the snapshot's back in batches, so a read between the two saw
    /// neither the old state nor the new one (a key missing, a scan with a
    /// hole). Such a read is refused (retryable) instead of answered.
    pub fn read_local<T>(&self, read: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let before = self.installs.seq.load(Ordering::SeqCst);
        let out = if before.is_multiple_of(2) {
            Some(read()?)
        } else {
            None
        };
        match out {
            Some(v) if self.installs.seq.load(Ordering::SeqCst) == before => Ok(v),
            _ => Err(Error::unavailable(format!(
                "range {} is installing a snapshot on this node; retry",
                self.range_id
            ))),
        }
    }

    /// The span this replica may hold data in: its own, except that the meta
    /// range never holds user keys (until its first split it nominally spans
    /// everything, but user requests are never routed to it).
    pub fn effective_span(&self) -> (Bytes, Bytes) {
        let m = self.meta();
        if self.range_id == lmskv_proto::range::META_RANGE_ID {
            let end = if m.end.is_empty() || m.end.as_ref() > lmskv_proto::range::USER_SPACE_START {
                Bytes::from_static(lmskv_proto::range::USER_SPACE_START)
            } else {
                m.end
            };
            return (m.start, end);
        }
        (m.start, m.end)
    }

    /// Whether this replica knows its range (it has state from a split, a
    /// snapshot or the bootstrap), so it can serve requests for its span.
    pub fn is_ready(&self) -> bool {
        self.meta.read().expect("meta lock").version > 0
    }

    /// Waits until no snapshot import of this replica runs. The import goes
    /// on in a blocking task after openraft's install call returns or is
    /// dropped, so whoever keeps others off its span waits for this first.
    pub async fn installs_idle(&self) {
        let installs = self.installs.clone();
        if self.engine.runs_inline() {
            // Imports run inline too: none can be under way here.
            installs.wait_idle();
        } else {
            let _ = tokio::task::spawn_blocking(move || installs.wait_idle()).await;
        }
    }

    /// Stops this replica's snapshot imports from here on, without waiting
    /// (see [`RangeReplica::stop_installs`]).
    pub fn abort_installs(&self) {
        self.installs.abort();
    }

    /// Stops this replica's snapshot imports for good (one not begun will
    /// not begin; one under way stops at its next batch and deletes what it
    /// wrote) and waits until none runs: the replica is being removed, and
    /// an import going on after its data and state were deleted would leave
    /// data, an applied state or an install marker behind.
    pub async fn stop_installs(&self) {
        self.installs.abort();
        self.installs_idle().await;
    }

    /// Counts a served request (for load statistics) and wakes the range.
    pub fn count_request(&self) {
        self.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    /// Notes activity: a hibernating leader resumes its heartbeats.
    pub fn touch(&self) {
        *self.last_activity.lock().expect("activity lock") = std::time::Instant::now();
        if self.hibernating.swap(false, Ordering::Relaxed) {
            if let Some(raft) = self.live() {
                let rc = raft.runtime_config();
                rc.heartbeat(true);
                rc.tick(true);
            }
            tracing::debug!(range_id = self.range_id, "range wakes up");
        }
    }

    /// Leader side of hibernation, called periodically. An idle range whose
    /// followers have every entry first marks its heartbeats (followers stop
    /// their election timers and Raft ticks), and on the next call stops
    /// sending them and its own ticks, so an idle range costs no messages
    /// and no timer wake-ups. Any request or proposal wakes it.
    ///
    /// Follower side: a replica dormant for `park_after` ([`RaftTuning`]) parks
    /// (its group is shut down until a message or request needs it).
    pub fn hibernate_tick(self: &Arc<Self>, idle_after: Duration) {
        let Some(raft) = self.live() else {
            return;
        };
        // Read under a borrow (not a clone: every replica runs this each
        // second), released before any call below.
        let (leader, caught_up, parkable) = {
            let rx = raft.metrics();
            let m = rx.borrow_watched();
            let parkable = self.parkable(&m);
            let caught_up = m.replication.as_ref().is_some_and(|rep| {
                rep.values()
                    .all(|l| l.as_ref().map(|l| l.index()) == m.last_log_index)
            }) && m
                .membership_config
                .membership()
                .learner_ids()
                .next()
                .is_none()
                && m.last_applied.as_ref().map(|l| l.index()) == m.last_log_index;
            (m.state == ServerState::Leader, caught_up, parkable)
        };
        if parkable {
            let this = self.clone();
            tokio::spawn(async move { this.park().await });
            return;
        }
        if !leader {
            // Stepped down while asleep: a follower needs its timers back
            // (unless its new leader put it to sleep).
            if self.hibernating.swap(false, Ordering::Relaxed) {
                let rc = raft.runtime_config();
                rc.heartbeat(true);
                if !self.dormant.load(Ordering::Relaxed) {
                    rc.tick(true);
                }
            }
            return;
        }
        let idle = self.last_activity.lock().expect("activity lock").elapsed() >= idle_after;
        if !idle || !caught_up {
            if self.hibernating.load(Ordering::Relaxed) {
                self.touch();
            }
            return;
        }
        if !self.hibernating.swap(true, Ordering::Relaxed) {
            // This round's heartbeats carry the mark; the next round stops them.
            *self.asleep_since.lock().expect("asleep lock") = std::time::Instant::now();
            return;
        }
        let rc = raft.runtime_config();
        rc.heartbeat(false);
        rc.tick(false);
    }

    /// Follower side: whether this replica's election timer is off, and the
    /// node id of the leader it waits for.
    pub fn dormant_leader(&self) -> Option<u64> {
        if !self.dormant.load(Ordering::Relaxed) {
            return None;
        }
        self.with_metrics(|m| m.current_leader)
    }

    /// Turns a dormant follower's election timer back on (its leader's node
    /// stopped answering): a parked group is loaded with its timers on.
    pub fn wake_follower(self: &Arc<Self>) {
        match self.live() {
            Some(raft) => self.wake_follower_in(&raft),
            None => {
                if self.dormant.swap(false, Ordering::Relaxed) {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.raft().await {
                            tracing::warn!(range_id = this.range_id, error = %e, "loading a parked range");
                        }
                    });
                }
            }
        }
    }

    /// Turns the election timer of `raft`, this replica's running group,
    /// back on if it was off (the leader spoke without the mark, or asks
    /// this replica to take over).
    fn wake_follower_in(&self, raft: &Raft) {
        if self.dormant.swap(false, Ordering::Relaxed) {
            let rc = raft.runtime_config();
            rc.elect(true);
            rc.tick(true);
            tracing::debug!(range_id = self.range_id, "follower election timer back on");
        }
    }

    /// Requests served since the last call.
    pub fn take_served(&self) -> u64 {
        self.served.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes a split of this range at `split_key` into `new_range_id`,
    /// planned against epoch version `version`. Returns both halves. With
    /// `at_index` the new range's log starts at the split's own index (only
    /// once every node runs cluster version 2: see `crate::version`).
    pub async fn split(
        &self,
        split_key: Bytes,
        new_range_id: u64,
        version: u64,
        at_index: bool,
    ) -> Result<(RangeMeta, RangeMeta), Error> {
        let op = if at_index {
            Op::SplitAtIndex {
                split_key,
                new_range_id,
                version,
            }
        } else {
            Op::Split {
                split_key,
                new_range_id,
                version,
            }
        };
        match self.propose(Bytes::new(), op, false).await? {
            (_, CommandResponse::Split(Ok(halves))) => Ok(halves),
            (_, CommandResponse::Split(Err(reason))) => {
                Err(Error::invalid_argument("split", reason))
            }
            (_, other) => Err(Error::internal(format!("split returned {other:?}"))),
        }
    }

    /// Makes `voters` (node id → address) the range's voters: new nodes are
    /// added as learners and caught up first, then one joint membership
    /// change installs the new voter set. Only the leader can do it.
    pub async fn change_voters(&self, voters: BTreeMap<u64, String>) -> Result<(), Error> {
        self.touch();
        if voters.is_empty() {
            return Err(Error::invalid_argument("voters", "a range needs a voter"));
        }
        let status = self.status();
        // A leader whose own removal is under way (or done) must not start
        // another change: it was planned from a voter set that no longer
        // holds, and openraft refuses membership work from a leader that is
        // stepping down. The caller re-plans against the new leader.
        if !self.is_leader() || !status.voters.contains(&self.node_id) {
            return Err(Error::NotLeader {
                range_id: self.range_id,
                leader: self.leader_hint(),
            });
        }
        let raft = self.serving().await?;
        let mut added = Vec::new();
        for (id, addr) in &voters {
            if !status.voters.contains(id) && !status.learners.contains(id) {
                raft.add_learner(*id, BasicNode { addr: addr.clone() }, false)
                    .await
                    .map_err(|e| self.write_error(e))?;
            }
            if !status.voters.contains(id) {
                added.push(*id);
            }
        }
        // New members must have caught up (by snapshot and log) before they vote.
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + LEARNER_CATCH_UP_TIMEOUT;
        let mut rx = raft.metrics();
        loop {
            let done = {
                let m = rx.borrow_and_update();
                let last = m.last_log_index;
                m.replication.as_ref().is_some_and(|rep| {
                    added.iter().all(|id| {
                        rep.get(id)
                            .and_then(|l| l.as_ref())
                            .map(|l| l.index())
                            .is_some_and(|i| {
                                Some(i) >= last.map(|l| l.saturating_sub(LEARNER_LAG_OK))
                            })
                    })
                })
            };
            if done {
                break;
            }
            if !self.is_leader() {
                return Err(Error::NotLeader {
                    range_id: self.range_id,
                    leader: self.leader_hint(),
                });
            }
            // A new replica that faulted (it answers that it refuses to
            // serve) never catches up: give up now, so that the caller can
            // put a fresh replica in its place, rather than at the deadline.
            let refused = &self.reopen.faulted_peers;
            if let Some(id) = added.iter().find(|id| refused.refused_since(**id, started)) {
                tracing::warn!(
                    range_id = self.range_id,
                    node_id = id,
                    "new replica faulted while catching up; the change gives up on it"
                );
                return Err(Error::unavailable(format!(
                    "the new replica of range {} on node {id} refuses to serve (it faulted); retry with a fresh one",
                    self.range_id
                )));
            }
            let wake = deadline.min(tokio::time::Instant::now() + LEARNER_FAULT_CHECK_EVERY);
            match tokio::time::timeout_at(wake, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::unavailable("range shut down")),
                Err(_) if tokio::time::Instant::now() < deadline => {}
                Err(_) => {
                    return Err(Error::Timeout {
                        reason: format!(
                            "new replicas {added:?} of range {} did not catch up in {LEARNER_CATCH_UP_TIMEOUT:?}",
                            self.range_id
                        ),
                    })
                }
            }
        }
        let want: BTreeSet<u64> = voters.keys().copied().collect();
        let have: BTreeSet<u64> = status.voters.iter().copied().collect();
        if want != have {
            // `retain = false`: removed voters leave the group entirely.
            raft.change_membership(want.clone(), false)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        // Learners outside the new voter set (left by a change that did not
        // finish) leave too: `retain = false` drops only removed voters, and
        // the leader would otherwise replicate to them for good.
        let stale: BTreeSet<u64> = status
            .learners
            .iter()
            .copied()
            .filter(|id| !want.contains(id))
            .collect();
        if !stale.is_empty() {
            tracing::info!(range_id = self.range_id, learners = ?stale, "removing learners outside the voter set");
            raft.change_membership(ChangeMembers::RemoveNodes(stale), false)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    /// The range's id.
    pub fn range_id(&self) -> u64 {
        self.range_id
    }

    /// The current leader's id, 0 when unknown. Cheap: no metrics copy.
    pub fn leader_id(&self) -> u64 {
        self.with_metrics(|m| m.current_leader.unwrap_or(0))
    }

    /// The storage engine the replica's data lives in.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether the range's Raft group has been initialized (locally known).
    pub async fn is_initialized(&self) -> bool {
        match self.raft().await {
            Ok(raft) => raft.is_initialized().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Forms the range's first membership from `members` (node id → address).
    /// Succeeds without change when the group is already initialized.
    pub async fn initialize(&self, members: BTreeMap<u64, String>) -> Result<(), Error> {
        let nodes: BTreeMap<u64, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        match self.raft().await?.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                tracing::info!(range_id = self.range_id, reason = %e, "range already initialized");
                Ok(())
            }
            Err(RaftError::Fatal(f)) => Err(self.fatal(f)),
        }
    }

    /// Adds a node as a voter: first as a learner that catches up, then by a
    /// joint membership change. Only the leader can do it.
    pub async fn add_voter(&self, node_id: u64, addr: String) -> Result<(), Error> {
        let status = self.status();
        if status.voters.contains(&node_id) && status.nodes.get(&node_id) == Some(&addr) {
            return Ok(());
        }
        let raft = self.serving().await?;
        raft.add_learner(node_id, BasicNode { addr }, true)
            .await
            .map_err(|e| self.write_error(e))?;
        let voters: BTreeSet<u64> = status.voters.iter().copied().chain([node_id]).collect();
        raft.change_membership(voters, false)
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// The answer of a replica shut down for good (removed from this node):
    /// retryable, the range lives on elsewhere.
    fn shut_down(&self) -> Error {
        Error::unavailable(format!("range {} is shut down on this node", self.range_id))
    }

    fn fatal(&self, f: impl std::fmt::Display) -> Error {
        // A call that outlived the replica's shutdown sees its group
        // stopped: that is no fault of the range's data.
        if self.closed.load(Ordering::SeqCst) {
            return self.shut_down();
        }
        let what = f.to_string();
        if what == openraft::errors::Fatal::<TypeConfig>::Stopped.to_string() {
            // The group the call held stopped under it. Parking stops a
            // group on purpose (the replica's group now is the parked one,
            // or one loaded since: the call is sent again), as does a fault
            // already recorded. A group that stopped on a storage error
            // shows that error in its metrics, and that is the fault.
            let now = self.with_metrics(|m| m.running_state.as_ref().err().cloned());
            match now {
                None if self.fault.lock().expect("fault lock").is_none() => {
                    return Error::unavailable(format!(
                        "range {}: its group stopped under the call (parked); send again",
                        self.range_id
                    ));
                }
                Some(e) if !matches!(e, openraft::errors::Fatal::Stopped) => {
                    return self.fatal(e);
                }
                _ => {}
            }
        }
        let reason = format!("range {} stopped: {what}", self.range_id);
        // Answered with the fault recorded first: what later errors say is
        // mostly that the group has stopped.
        let (reason, first) = {
            let mut fault = self.fault.lock().expect("fault lock");
            let first = fault.is_none();
            if first {
                tracing::error!(range_id = self.range_id, %reason, "range refuses to serve; its Raft group stops here and its peers go on without it");
                *fault = Some(reason);
            }
            (fault.clone().expect("recorded"), first)
        };
        if first {
            self.stop_faulted_group();
        }
        if reason.contains("checksum") || reason.contains("orrupt") {
            Error::Corruption { reason }
        } else {
            Error::unavailable(reason)
        }
    }

    /// Stops the Raft group of a replica that just faulted: it neither
    /// leads nor votes any more, so a faulted leader's peers elect another
    /// leader within an election timeout instead of following one that
    /// refuses every request. Its data stays until the placement driver has
    /// removed it from the range's members (see `pd::missing_voters`); the
    /// node then deletes it, and a fresh replica may be added back.
    fn stop_faulted_group(&self) {
        let raft = {
            let mut g = self.group.write().expect("group lock");
            let Group::Live(raft) = &*g else {
                // Parked: `load` refuses a faulted replica.
                return;
            };
            let raft = raft.clone();
            let mut m = raft.metrics().borrow_watched().clone();
            m.state = ServerState::Shutdown;
            m.current_leader = None;
            *g = Group::Parked(Arc::new(m));
            raft
        };
        let range_id = self.range_id;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // An error here is the group having stopped already.
                    if let Err(e) = raft.shutdown().await {
                        tracing::debug!(range_id, error = %e, "stopping a faulted group");
                    }
                });
            }
            // Outside a runtime (never on the serving paths): its last
            // handle drops with the replica.
            Err(_) => tracing::warn!(range_id, "faulted group not stopped: no runtime"),
        }
    }

    /// The reason this replica refuses to serve, if it does: a fault it
    /// recorded, or its Raft group having stopped on a storage error (which
    /// records it now, and stops the group for good).
    pub fn fault(&self) -> Option<String> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        match self.check_fault() {
            Ok(()) => None,
            Err(_) => self.fault.lock().expect("fault lock").clone(),
        }
    }

    /// Marks the range as refusing to serve because of `err` (e.g. corrupt data found on read).
    pub fn refuse(&self, err: &crate::storage::StorageError) -> Error {
        self.fatal(err)
    }

    fn check_fault(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.shut_down());
        }
        if let Some(reason) = self.fault.lock().expect("fault lock").clone() {
            return Err(Error::Corruption { reason });
        }
        match self.with_metrics(|m| m.running_state.as_ref().err().map(|f| f.to_string())) {
            Some(f) => Err(self.fatal(f)),
            None => Ok(()),
        }
    }

    fn write_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
                range_id: self.range_id,
                leader: hint_of(&f),
            },
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => Error::Unavailable {
                reason: format!(
                    "leader changed before the write committed; outcome unknown, retry with the same request id ({})",
                    hint_of(&f).map(|h| format!("leader is node {}", h.node_id)).unwrap_or_default()
                ),
            },
            RaftError::APIError(other) => Error::internal(other.to_string()),
            RaftError::Fatal(f) => self.fatal(f),
        }
    }

    /// Proposes a write, waits until it is committed and applied on this
    /// leader (and, with `all`, replicated to every voter), and returns its log
    /// index and outcome. Under load the write may share its log entry with
    /// others (see [`proposals`]).
    pub async fn propose(
        &self,
        request_id: Bytes,
        op: Op,
        all: bool,
    ) -> Result<(u64, CommandResponse), Error> {
        self.check_fault()?;
        self.touch();
        let cmd = Command {
            request_id,
            proposed_at_ms: now_ms(),
            op,
        };
        let started = tokio::time::Instant::now();
        let (index, resp) = if cmd.op.is_split() {
            // Splits never share an entry (nor take a slot).
            self.propose_entry(cmd, started).await?
        } else {
            let admission = self.proposals.lock().expect("proposals lock").admit(cmd);
            if matches!(admission, Admission::Gather(_)) {
                self.gather_soon();
            }
            match admission {
                Admission::Now(cmd) => {
                    let _slot = Slot(self);
                    self.propose_entry(cmd, started).await?
                }
                Admission::Gather(rx) | Admission::Queued(rx) => {
                    let answer = async {
                        rx.await.unwrap_or_else(|_| {
                            Err(Error::unavailable(
                                "the write's proposal was abandoned; outcome unknown, retry with the same request id",
                            ))
                        })
                    };
                    self.until_committed(answer, started).await?
                }
                Admission::Full => return Err(Error::Overloaded { retry_after_ms: 20 }),
            }
        };
        if all {
            self.wait_all_voters(index).await?;
        }
        Ok((index, resp))
    }

    /// Proposes one log entry and waits for its outcome.
    async fn propose_entry(
        &self,
        cmd: Command,
        started: tokio::time::Instant,
    ) -> Result<(u64, CommandResponse), Error> {
        let raft = self.serving().await?;
        let writes = match &cmd.op {
            Op::Group(cmds) => cmds.len() as u64,
            _ => 1,
        };
        self.writes_proposed.fetch_add(writes, Ordering::Relaxed);
        self.entries_proposed.fetch_add(1, Ordering::Relaxed);
        let write = async {
            raft.client_write(cmd)
                .await
                .map(|resp| (resp.log_id.index(), resp.data))
                .map_err(|e| self.write_error(e))
        };
        self.until_committed(write, started).await
    }

    /// Waits for `write`, but no longer than the write timeout from
    /// `started`, and gives up early when this leader was cut off from its
    /// quorum since then.
    async fn until_committed<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, Error>>,
        started: tokio::time::Instant,
    ) -> Result<T, Error> {
        let deadline = started + self.tuning.write_timeout;
        tokio::pin!(write);
        loop {
            tokio::select! {
                r = &mut write => return r,
                _ = tokio::time::sleep(CUT_OFF_CHECK_EVERY) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            reason: format!(
                                "write not committed within {:?}; outcome unknown, retry with the same request id",
                                self.tuning.write_timeout
                            ),
                        });
                    }
                    if self.cut_off_since(started.elapsed()) {
                        // A leader no quorum answers (partitioned away) would
                        // hold the write until the timeout; let the client
                        // find the leader the majority elected instead.
                        return Err(Error::Timeout {
                            reason: "this leader has heard from no quorum since the write was proposed; outcome unknown, retry with the same request id".into(),
                        });
                    }
                }
            }
        }
    }

    /// Forms the group of a slot taken by [`Admission::Gather`] on a task of
    /// its own, which runs once the current task yields: by then the writes
    /// that came with the gathering one (the rest of a client's bundle,
    /// served by the current task) have queued behind it.
    fn gather_soon(&self) {
        match (self.me.upgrade(), tokio::runtime::Handle::try_current()) {
            (Some(me), Ok(rt)) => {
                // The group is formed and proposed on this one task: no
                // second hop through `slot_done`'s spawn.
                rt.spawn(async move {
                    let group = me.proposals.lock().expect("proposals lock").finish();
                    if let Some(group) = group {
                        me.propose_group(group).await;
                    }
                });
            }
            _ => self.slot_done(),
        }
    }

    /// A proposal gave up its slot: the writes waiting now go out as the
    /// next group, on their own task (a caller's request may be dropped at
    /// any time; the group must not go with it).
    fn slot_done(&self) {
        let Some(group) = self.proposals.lock().expect("proposals lock").finish() else {
            return;
        };
        let runtime = tokio::runtime::Handle::try_current();
        match (self.me.upgrade(), runtime) {
            (Some(me), Ok(rt)) => {
                rt.spawn(async move { me.propose_group(group).await });
            }
            _ => {
                // Shutting down: nothing will propose these.
                for w in group {
                    let _ = w.tx.send(Err(Error::unavailable(
                        "the range is shutting down; outcome unknown, retry with the same request id",
                    )));
                }
                self.proposals.lock().expect("proposals lock").release();
            }
        }
    }

    /// Proposes waiting writes as one entry and answers each of them.
    async fn propose_group(self: Arc<Self>, group: Vec<Waiting>) {
        let _slot = Slot(&self);
        let started = tokio::time::Instant::now();
        let (cmds, txs): (Vec<Command>, Vec<_>) = group.into_iter().map(|w| (w.cmd, w.tx)).unzip();
        let count = cmds.len();
        let outcome: Answer = self
            .propose_entry(proposals::group_command(cmds, now_ms()), started)
            .await;
        for (tx, answer) in txs.into_iter().zip(proposals::answers(count, outcome)) {
            let _ = tx.send(answer);
        }
    }

    /// Whether this node still leads but no quorum has acknowledged it for
    /// `waited`, and for longer than an election timeout: the majority may
    /// well have elected another leader.
    fn cut_off_since(&self, waited: Duration) -> bool {
        if waited <= Duration::from_millis(self.tuning.election_timeout_ms_max) {
            return false;
        }
        self.with_metrics(|m| {
            m.state == ServerState::Leader
                && m.membership_config
                    .membership()
                    .voter_ids()
                    .nth(1)
                    .is_some()
                && m.last_quorum_acked
                    .as_ref()
                    .is_none_or(|t| openraft::Instant::elapsed(&**t) >= waited)
        })
    }

    async fn wait_all_voters(&self, index: u64) -> Result<(), Error> {
        let raft = self.raft().await?;
        let mut rx = raft.metrics();
        let deadline = tokio::time::Instant::now() + self.tuning.write_timeout;
        loop {
            {
                let m = rx.borrow_and_update();
                let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                let applied = m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0);
                let done = match &m.replication {
                    Some(rep) => voters.iter().all(|v| {
                        // The leader's own log is flushed before it applies.
                        (*v == self.node_id && applied >= index)
                            || rep
                                .get(v)
                                .and_then(|l| l.as_ref())
                                .is_some_and(|l| l.index() >= index)
                    }),
                    None => false,
                };
                if done {
                    return Ok(());
                }
                if m.state != ServerState::Leader {
                    return Err(Error::unavailable(
                        "leadership lost before every voter acknowledged; the write is committed",
                    ));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::unavailable("range shut down")),
                Err(_) => {
                    return Err(Error::Timeout {
                        reason:
                            "the write is committed but not every voter acknowledged it in time"
                                .into(),
                    })
                }
            }
        }
    }

    /// Makes a local read consistent at `level` and returns the applied index
    /// the read will observe (at least).
    pub async fn read_barrier(&self, level: ReadLevel) -> Result<u64, Error> {
        self.check_fault()?;
        if matches!(
            level,
            ReadLevel::Strong | ReadLevel::BoundedStaleness { .. }
        ) {
            self.touch();
        }
        match level {
            ReadLevel::Local => Ok(self.applied_index()),
            ReadLevel::Session { min_applied } => {
                if self.applied_index() >= min_applied {
                    return Ok(self.applied_index());
                }
                self.raft()
                    .await?
                    .wait(Some(self.tuning.read_timeout))
                    .applied_index_at_least(Some(min_applied), "session read")
                    .await
                    .map_err(|_| Error::Timeout {
                        reason: format!(
                            "replica did not reach the session's index {min_applied} in time"
                        ),
                    })?;
                Ok(self.applied_index())
            }
            ReadLevel::BoundedStaleness { max_ms } if !self.is_leader() => {
                self.bounded_read(max_ms).await
            }
            ReadLevel::Strong | ReadLevel::BoundedStaleness { .. } => {
                let raft = self.serving().await?;
                let fut = async {
                    match raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
                        Ok(r) => Ok(r),
                        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => Err(
                            RaftError::APIError(LinearizableReadError::ForwardToLeader(f)),
                        ),
                        // The lease is not certain: confirm leadership with a quorum round.
                        Err(_) => raft.ensure_linearizable(ReadPolicy::ReadIndex).await,
                    }
                };
                let r = tokio::time::timeout(self.tuning.read_timeout, fut)
                    .await
                    .map_err(|_| Error::Timeout {
                        reason: "leadership not confirmed in time".into(),
                    })?;
                match r {
                    Ok(read_log_id) => Ok(read_log_id.index().max(self.applied_index())),
                    Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                        Err(Error::NotLeader {
                            range_id: self.range_id,
                            leader: hint_of(&f),
                        })
                    }
                    Err(RaftError::APIError(e)) => Err(Error::unavailable(e.to_string())),
                    Err(RaftError::Fatal(f)) => Err(self.fatal(f)),
                }
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.with_metrics(|m| m.state == ServerState::Leader)
    }

    /// The term this replica leads in, if it is the leader now.
    pub fn leader_term(&self) -> Option<u64> {
        self.with_metrics(|m| (m.state == ServerState::Leader).then_some(m.current_term))
    }

    /// A follower serves a bounded-staleness read only if it heard from the
    /// leader within `max_ms` and has applied what the leader had committed then.
    async fn bounded_read(&self, max_ms: u64) -> Result<u64, Error> {
        let bound = Duration::from_millis(max_ms);
        let refuse = || Error::Unavailable {
            reason: format!(
                "range {} replica on node {} cannot prove it is within {max_ms} ms of the leader",
                self.range_id, self.node_id
            ),
        };
        let contact = *self.leader_contact.lock().expect("contact lock");
        let Some((at, commit)) = contact.and_then(|c| c.proof) else {
            return Err(refuse());
        };
        if at.elapsed() > bound {
            return Err(refuse());
        }
        if self.applied_index() < commit {
            let wait = bound.saturating_sub(at.elapsed());
            self.raft()
                .await?
                .wait(Some(wait))
                .applied_index_at_least(Some(commit), "bounded staleness read")
                .await
                .map_err(|_| refuse())?;
            if at.elapsed() > bound {
                return Err(refuse());
            }
        }
        Ok(self.applied_index())
    }

    fn applied_index(&self) -> u64 {
        self.with_metrics(|m| m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0))
    }

    /// The current leader as a routing hint.
    pub fn leader_hint(&self) -> Option<LeaderHint> {
        self.with_metrics(|m| {
            let id = m.current_leader?;
            let address = m
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_default();
            Some(LeaderHint {
                node_id: id,
                address,
            })
        })
    }

    /// Follower side: waits, at most `max`, while this replica names no
    /// leader or names `suspect`, whom a client could not reach. Returns as
    /// soon as an election names another leader (or this replica), or that
    /// leader is heard from after the wait began (it is alive; a heartbeat
    /// comes every heartbeat interval): the request then goes on as usual,
    /// and answers NOT_LEADER with the current leader when it is not this
    /// replica.
    ///
    /// Without this a client that lost its leader polls the followers, each
    /// answer naming the lost leader, with backoff until one names the new
    /// leader; the backoff sleep came on top of the election.
    ///
    /// A replica whose leader put it to sleep (dormant, its election timer
    /// off) or whose group is parked does not wait: no election would come
    /// before the node's liveness check wakes it.
    pub async fn await_leader_other_than(&self, suspect: u64, max: Duration) {
        if self.dormant.load(Ordering::Relaxed) {
            return;
        }
        let Some(raft) = self.live() else {
            return;
        };
        let me = self.node_id;
        let began = tokio::time::Instant::now();
        let recheck = Duration::from_millis(self.tuning.heartbeat_interval_ms.max(1));
        let deadline = tokio::time::Instant::now() + max;
        let mut rx = raft.metrics();
        loop {
            let moved = {
                let m = rx.borrow_and_update();
                m.state == ServerState::Leader
                    || m.current_leader.is_some_and(|l| l != suspect && l != me)
                    || (m.current_leader == Some(suspect) && self.heard_from_leader_since(began))
            };
            if moved {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            // Metrics change with the election; heartbeats alone do not
            // change them, so look again every heartbeat interval.
            if let Ok(Err(_)) =
                tokio::time::timeout_at(deadline.min(now + recheck), rx.changed()).await
            {
                return;
            }
        }
    }

    /// Whether this replica accepted AppendEntries (a heartbeat at least)
    /// received after `since`.
    fn heard_from_leader_since(&self, since: tokio::time::Instant) -> bool {
        self.leader_contact
            .lock()
            .expect("contact lock")
            .is_some_and(|c| c.received > since)
    }

    /// Every member's (voters' and learners') node id and address, as the
    /// replica's membership records them.
    pub fn member_addresses(&self) -> Vec<(u64, String)> {
        self.with_metrics(|m| {
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        })
    }

    /// The replica's Raft state now.
    pub fn status(&self) -> ReplicaStatus {
        // Borrowed, not cloned: heartbeats read every replica's status each second.
        // A faulted replica's stopped group stands parked, but is not.
        let parked = self.is_parked() && self.fault.lock().expect("fault lock").is_none();
        self.with_metrics(|m| self.status_of(m, parked))
    }

    fn status_of(&self, m: &RaftMetrics<TypeConfig>, parked: bool) -> ReplicaStatus {
        let membership = m.membership_config.membership();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ReplicaStatus {
            range_id: self.range_id,
            leader_id: m.current_leader,
            term: m.current_term,
            commit_index: m.local_committed.as_ref().map(|l| l.index()).unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0),
            applied_leader: m.last_applied.as_ref().map(|l| {
                let leader = l.committed_leader_id();
                (leader.term, leader.node_id)
            }),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index()).unwrap_or(0),
            purged_index: m.purged.as_ref().map(|l| l.index()).unwrap_or(0),
            role,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            fault: self
                .fault
                .lock()
                .expect("fault lock")
                .clone()
                .or_else(|| m.running_state.as_ref().err().map(|e| e.to_string())),
            parked,
            writes_proposed: self.writes_proposed.load(Ordering::Relaxed),
            entries_proposed: self.entries_proposed.load(Ordering::Relaxed),
            snapshots_not_installed: self.snapshots_not_installed.load(Ordering::Relaxed),
        }
    }

    /// Asks this replica (it must be the leader) to hand leadership to `to`.
    /// Hands the leadership to voter `to` and waits until it has it.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        self.touch();
        let raft = self.serving().await?;
        let mut rx = raft.metrics();
        raft.trigger()
            .transfer_leader(to)
            .await
            .map_err(|f| self.fatal(f))?;
        let deadline = tokio::time::Instant::now() + LEADER_TRANSFER_TIMEOUT;
        loop {
            if rx.borrow_and_update().current_leader == Some(to) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::unavailable("range shut down")),
                Err(_) => {
                    return Err(Error::Timeout {
                        reason: format!(
                            "node {to} did not take the leadership of range {} within {LEADER_TRANSFER_TIMEOUT:?}",
                            self.range_id
                        ),
                    })
                }
            }
        }
    }

    /// Starts an election on this replica now (used for the right-hand half
    /// of a split on the node that led the left half).
    pub async fn campaign(&self) {
        let Ok(raft) = self.raft().await else {
            return;
        };
        if let Err(e) = raft.trigger().elect(false).await {
            tracing::debug!(range_id = self.range_id, error = %e, "campaign");
        }
    }

    /// After a split of this range: makes its current snapshot one of its
    /// new (smaller) span. Until then the snapshot it sends new members
    /// still covers the old span, and a node where the right half is ready
    /// refuses it, so the range could not gain a replica there. openraft
    /// ignores a trigger while a build runs (one that may have started
    /// before the split), so this asks again, once a second, until the
    /// current snapshot covers the new span or [`SPLIT_SNAPSHOT_TRIES`]
    /// tries pass. Returns whether the snapshot covers the span; `false`
    /// also when the replica is closed or another call is running.
    pub async fn snapshot_after_split(&self) -> bool {
        /// Clears the flag however the rebuild ends.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        if self.snapshot_rebuilding.swap(true, Ordering::SeqCst) {
            return false;
        }
        let _running = Running(&self.snapshot_rebuilding);
        self.rebuild_snapshot_for_span().await
    }

    /// The body of [`RangeReplica::snapshot_after_split`]: whether the
    /// snapshot covers the span when it returns. The group is held in use
    /// throughout, so it does not park while its build runs: a later load
    /// clears the build's temporary file.
    async fn rebuild_snapshot_for_span(&self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let Ok(raft) = self.raft().await else {
            return false;
        };
        for _ in 0..SPLIT_SNAPSHOT_TRIES {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            let Ok(current) = raft.get_snapshot().await else {
                return false;
            };
            let m = self.meta();
            let fits = current
                .and_then(|s| super::state_machine::snapshot_meta(&s.snapshot.path).ok())
                .is_some_and(|span| span.start == m.start && span.end == m.end);
            if fits {
                return true;
            }
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::debug!(range_id = self.range_id, error = %e, "snapshot trigger");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::warn!(
            range_id = self.range_id,
            "the range's snapshot still covers its span before the split; trying again later"
        );
        false
    }

    /// Whether the replica's newest snapshot covers another span than the
    /// range's (see [`super::state_machine::snapshot_span_differs`]). Reads
    /// the snapshot directory and a file's head: call off the async workers.
    pub fn snapshot_span_differs(&self) -> bool {
        super::state_machine::snapshot_span_differs(&self.snapshot_dir, &self.meta())
    }

    /// Whether this replica is the range's leader.
    pub fn is_leader_now(&self) -> bool {
        self.is_leader()
    }

    /// Stops the replica's Raft group for good: it is not loaded again.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _l = self.lifecycle.lock().await;
        let Some(raft) = self.live() else {
            return;
        };
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(range_id = self.range_id, error = %e, "raft shutdown");
        }
    }

    // ---- incoming Raft messages (payloads encoded by the peer's `network`) ----

    /// Handles an AppendEntries payload; returns the encoded response.
    /// `hibernate` and `quorum_acked_age_us` are the message's.
    pub async fn handle_append(
        &self,
        payload: &[u8],
        hibernate: bool,
        quorum_acked_age_us: Option<u64>,
    ) -> Result<Vec<u8>, Error> {
        let req: AppendEntriesRequest<TypeConfig> = decode("append entries", payload)
            .map_err(|e| Error::invalid_argument("payload", e.to_string()))?;
        let sleep = hibernate && req.entries.is_empty();
        let contact = LeaderContact::new(
            req.leader_commit.as_ref().map(|l| l.index()).unwrap_or(0),
            quorum_acked_age_us,
        );
        let raft = self.raft().await?;
        if sleep {
            self.fall_asleep(&raft);
        }
        let resp = raft.append_entries(req).await.map_err(|e| self.fatal(e))?;
        if !sleep {
            // After the append renewed the leader's lease here, so the
            // restarted timer does not find it long expired.
            self.wake_follower_in(&raft);
        }
        if matches!(
            resp,
            AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)
        ) {
            contact.record(&self.leader_contact);
        }
        encode(&resp).map_err(|e| Error::internal(e.to_string()))
    }

    /// A pipe into the live group for the appends of one append stream
    /// (see [`AppendPipe`]); `None` while the group is parked (the append
    /// is then served alone, which loads it).
    pub fn open_append_pipe(self: &Arc<Self>) -> Option<AppendPipe> {
        let load = self.loads.load(Ordering::SeqCst);
        let raft = self.live()?;
        let (requests, requests_rx) = tokio::sync::mpsc::channel(APPEND_PIPE_MAX);
        let (waiting, waiting_rx) = tokio::sync::mpsc::channel(APPEND_PIPE_MAX);
        tokio::spawn(
            self.clone()
                .run_append_pipe(raft.clone(), requests_rx, waiting_rx),
        );
        Some(AppendPipe {
            raft,
            load,
            requests,
            waiting,
        })
    }

    /// Feeds a pipe's appends to the group in order and answers each, in
    /// the same order, once the group has made its entries durable. Ends
    /// when the group refuses one (a conflict or a higher vote: the leader
    /// starts over from the answer), when the group stops, or when the
    /// stream that opened the pipe is gone; appends still waiting then are
    /// answered as unavailable, to be sent again.
    async fn run_append_pipe(
        self: Arc<Self>,
        raft: Raft,
        requests: tokio::sync::mpsc::Receiver<AppendEntriesRequest<TypeConfig>>,
        mut waiting: tokio::sync::mpsc::Receiver<PipedAppend>,
    ) {
        use futures::StreamExt;
        let answers = raft.stream_append(tokio_stream::wrappers::ReceiverStream::new(requests));
        let mut answers = std::pin::pin!(answers);
        while let Some(answer) = answers.next().await {
            // Every append enters `waiting` before the group sees it.
            let Some(w) = waiting.recv().await else {
                break;
            };
            let reply = match answer {
                Ok(result) => {
                    if !w.sleep {
                        self.wake_follower_in(&raft);
                    }
                    if result.is_ok() {
                        w.contact.record(&self.leader_contact);
                    }
                    encode(&AppendEntriesResponse::<TypeConfig>::from(result))
                        .map_err(|e| Error::internal(e.to_string()))
                }
                Err(fatal) => Err(self.fatal(fatal)),
            };
            let _ = w.reply.send(reply);
        }
        waiting.close();
        while let Some(w) = waiting.recv().await {
            let _ = w.reply.send(Err(Error::unavailable(format!(
                "range {}: the append pipe ended; send again",
                self.range_id
            ))));
        }
    }

    /// A follower told by its leader that the range hibernates stops its
    /// election timer (see `handle_append`).
    fn fall_asleep(&self, raft: &Raft) {
        if !self.dormant.swap(true, Ordering::Relaxed) {
            *self.asleep_since.lock().expect("asleep lock") = std::time::Instant::now();
            let rc = raft.runtime_config();
            rc.elect(false);
            rc.tick(false);
        }
    }

    /// Handles a Vote payload.
    pub async fn handle_vote(&self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let req = decode("vote", payload)
            .map_err(|e| Error::invalid_argument("payload", e.to_string()))?;
        let resp = self
            .raft()
            .await?
            .vote(req)
            .await
            .map_err(|e| self.fatal(e))?;
        encode(&resp).map_err(|e| Error::internal(e.to_string()))
    }

    /// Handles a PreVote payload.
    pub async fn handle_pre_vote(&self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let req = decode("pre-vote", payload)
            .map_err(|e| Error::invalid_argument("payload", e.to_string()))?;
        let resp = self
            .raft()
            .await?
            .pre_vote(req)
            .await
            .map_err(|e| self.fatal(e))?;
        encode(&resp).map_err(|e| Error::internal(e.to_string()))
    }

    /// Handles a TransferLeader payload.
    pub async fn handle_transfer_leader(&self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let req = decode("transfer leader", payload)
            .map_err(|e| Error::invalid_argument("payload", e.to_string()))?;
        // The new leader needs its timers to run its election.
        let raft = self.raft().await?;
        self.wake_follower_in(&raft);
        let resp = raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| self.fatal(e))?;
        encode(&resp).map_err(|e| Error::internal(e.to_string()))
    }

    /// A fresh path in this range's snapshot directory to receive a snapshot into.
    pub fn incoming_snapshot_path(&self) -> PathBuf {
        self.snapshot_dir
            .join(format!("recv-{}.tmp", rand::random::<u64>()))
    }

    /// Installs a snapshot received into `path`; `header` is the sender's
    /// encoded vote and snapshot metadata. Returns the encoded response.
    pub async fn handle_snapshot(&self, header: &[u8], path: PathBuf) -> Result<Vec<u8>, Error> {
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) =
            decode("snapshot header", header)
                .map_err(|e| Error::invalid_argument("header", e.to_string()))?;
        let raft = self.raft().await?;
        if let Some(resp) = self.snapshot_not_needed(&raft, &vote, &meta).await? {
            let _ = std::fs::remove_file(&path);
            return encode(&resp).map_err(|e| Error::internal(e.to_string()));
        }
        let snapshot = SnapshotOf::<TypeConfig, SnapshotFile> {
            meta,
            snapshot: SnapshotFile { path },
        };
        let resp = raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| self.fatal(e))?;
        encode(&resp).map_err(|e| Error::internal(e.to_string()))
    }

    /// Answers a leader's snapshot without installing it when this replica's
    /// log already holds the snapshot's last entry, under a vote at least the
    /// leader's. The leader sends a snapshot when it does not know how far
    /// the follower's log reaches, e.g. after an append it gave up on had in
    /// fact arrived. Such a follower catches up from its own log: by the log
    /// matching property every entry up to the snapshot's last is the
    /// leader's, and the leader continues with the entries after it.
    ///
    /// Installing it instead can run the state machine backwards: openraft
    /// accepts the snapshot while commands ahead of it in its queue wait for
    /// a log flush, and a commit arriving meanwhile lets it apply entries
    /// past the snapshot before the queued install runs (the simulation's
    /// seed 917 with 50 ms append timeouts; a debug build panics on it).
    async fn snapshot_not_needed(
        &self,
        raft: &Raft,
        vote: &VoteOf<TypeConfig>,
        meta: &SnapshotMetaOf<TypeConfig>,
    ) -> Result<Option<openraft::raft::SnapshotResponse<TypeConfig>>, Error> {
        let Some(last) = meta.last_log_id else {
            return Ok(None);
        };
        let (vote, wanted) = (*vote, last);
        let ours = raft
            .with_raft_state(move |st| {
                let has_last = st.log_ids.get(wanted.index()) == Some(wanted);
                let current = *st.vote_ref();
                (has_last && current >= vote).then_some(current)
            })
            .await
            .map_err(|e| self.fatal(e))?;
        Ok(ours.map(|current| {
            self.snapshots_not_installed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                range = self.range_id,
                snapshot_last = %last,
                "log already holds the snapshot's last entry; snapshot not installed"
            );
            openraft::raft::SnapshotResponse::new(current)
        }))
    }
}

/// Creates (opens) a replica of a range on demand.
pub type ReplicaCreator = Arc<
    dyn Fn(u64) -> futures::future::BoxFuture<'static, Result<Arc<RangeReplica>, Error>>
        + Send
        + Sync,
>;

/// The ranges this node hosts, by id.
#[derive(Default)]
pub struct ReplicaMap {
    inner: RwLock<HashMap<u64, Arc<RangeReplica>>>,
    creator: std::sync::OnceLock<ReplicaCreator>,
    /// Data spans being rewritten whole (a snapshot install) or deleted (a
    /// removed replica's data), by range: see [`ReplicaMap::claim_span`].
    span_claims: Arc<Mutex<HashMap<u64, (Bytes, Bytes)>>>,
}

/// A range's claim on a data span of this node's store; released on drop.
#[derive(Debug)]
pub struct SpanClaim {
    claims: Arc<Mutex<HashMap<u64, (Bytes, Bytes)>>>,
    range_id: u64,
}

impl Drop for SpanClaim {
    fn drop(&mut self) {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.range_id);
    }
}

impl std::fmt::Debug for ReplicaMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaMap").finish()
    }
}

impl ReplicaMap {
    /// Sets how unknown ranges named by incoming Raft messages are created.
    pub fn set_creator(&self, c: ReplicaCreator) {
        let _ = self.creator.set(c);
    }

    /// The replica of `range_id`, created when unknown and a creator is set.
    pub async fn get_or_create(&self, range_id: u64) -> Result<Arc<RangeReplica>, Error> {
        if let Ok(r) = self.get(range_id) {
            return Ok(r);
        }
        match self.creator.get() {
            Some(c) => c(range_id).await,
            None => Err(Error::RangeNotFound { range_id }),
        }
    }

    /// Removes a replica from the map (the caller shuts it down).
    pub fn remove(&self, range_id: u64) -> Option<Arc<RangeReplica>> {
        self.inner
            .write()
            .expect("replica map lock")
            .remove(&range_id)
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.inner.read().expect("replica map lock").len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The replica of `range_id`, or `RangeNotFound`.
    pub fn get(&self, range_id: u64) -> Result<Arc<RangeReplica>, Error> {
        self.inner
            .read()
            .expect("replica map lock")
            .get(&range_id)
            .cloned()
            .ok_or(Error::RangeNotFound { range_id })
    }

    /// Adds a replica.
    pub fn insert(&self, r: Arc<RangeReplica>) {
        self.inner
            .write()
            .expect("replica map lock")
            .insert(r.range_id(), r);
    }

    /// Claims `[start, end)` of the shared data column family for
    /// `range_id` to rewrite or delete whole. Refused (with the range in
    /// the way) while another range is ready here with data in the span,
    /// or holds a claim on part of it: two installs arriving together on a
    /// fresh node (an old snapshot of a split range's left half, still
    /// covering the whole old span, and one of its right half) must not
    /// both run, and a removed replica's data must not be deleted under
    /// another range's install. Claims are taken and checked under one
    /// lock.
    pub fn claim_span(&self, range_id: u64, start: &Bytes, end: &Bytes) -> Result<SpanClaim, u64> {
        let mut claims = self
            .span_claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A claim of the same range (its install racing its removal) is in
        // the way too.
        if let Some((other, _)) = claims.iter().find(|(id, (s, e))| {
            **id == range_id || lmskv_proto::range::spans_overlap((s, e), (start, end))
        }) {
            return Err(*other);
        }
        for other in self.all() {
            if other.range_id() == range_id || !other.is_ready() {
                continue;
            }
            let (s, e) = other.effective_span();
            if lmskv_proto::range::spans_overlap((&s, &e), (start, end)) {
                return Err(other.range_id());
            }
        }
        claims.insert(range_id, (start.clone(), end.clone()));
        Ok(SpanClaim {
            claims: self.span_claims.clone(),
            range_id,
        })
    }

    /// Every replica, ordered by range id.
    pub fn all(&self) -> Vec<Arc<RangeReplica>> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .expect("replica map lock")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|r| r.range_id());
        v
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::EngineOptions;

    #[test]
    fn span_claims_exclude_overlapping_installs_and_removals_until_released() {
        let map = ReplicaMap::default();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        // An old snapshot of a left half still covering the whole old span.
        let left = map.claim_span(7, &b("a"), &b("c")).expect("claim");
        assert_eq!(map.claim_span(8, &b("b"), &b("c")).unwrap_err(), 7);
        assert_eq!(map.claim_span(7, &b("x"), &b("y")).unwrap_err(), 7);
        let apart = map.claim_span(9, &b("c"), &b("d")).expect("no overlap");
        drop(left);
        let right = map.claim_span(8, &b("b"), &b("c")).expect("released");
        // An empty end is the end of the key space.
        assert_eq!(map.claim_span(10, &b("cz"), &b("")).unwrap_err(), 9);
        drop((right, apart));
        map.claim_span(10, &b("a"), &b("")).expect("all released");
    }

    /// Fast Raft timing for replicas in unit tests.
    pub(crate) fn tuning() -> RaftTuning {
        RaftTuning {
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_interval_ms: 50,
            snapshot_logs_since_last: 10_000,
            snapshot_logs_to_keep: 1_000,
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            dedup_window: Duration::from_secs(600),
            proposals_in_flight_max: crate::raft::proposals::PROPOSALS_IN_FLIGHT_MAX,
            park_after: Duration::from_secs(10),
        }
    }

    /// The replica's status once `done` holds for it, or after 5 s: a group
    /// answers an append or a commit notice before its metrics show it.
    pub(crate) async fn status_once(
        r: &RangeReplica,
        done: impl Fn(&ReplicaStatus) -> bool,
    ) -> ReplicaStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let s = r.status();
            if done(&s) || tokio::time::Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A small engine in `dir` for unit tests.
    pub(crate) fn small_engine(dir: &std::path::Path) -> Arc<Engine> {
        let opts = EngineOptions {
            block_cache_bytes: 4 << 20,
            write_buffer_bytes: 4 << 20,
            ..EngineOptions::default()
        };
        Arc::new(Engine::open(&dir.join("db"), &opts).unwrap())
    }

    /// Node 1's replica of `range_id` in `dir`, the one voter of its group,
    /// once it leads and has committed a first write.
    async fn lone_leader(dir: &std::path::Path, range_id: u64) -> Arc<RangeReplica> {
        let r = RangeReplica::open(
            small_engine(dir),
            PeerPool::new(1, None, false, 1),
            range_id,
            dir,
            tuning(),
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
        r.initialize([(1, "127.0.0.1:1".to_string())].into())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r
            .propose(Bytes::from_static(b"first"), put(0), false)
            .await
            .is_err()
        {
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    /// A parked group loaded again while an import of its replica still
    /// runs waits for the import before it opens its state machine. The
    /// wait happens off the async threads: a node with one worker thread
    /// (a current-thread runtime here) goes on running its other tasks.
    #[tokio::test(flavor = "current_thread")]
    async fn a_group_waiting_for_a_running_import_does_not_stall_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine(dir.path());
        let reopen = Reopen {
            pool: PeerPool::new(1, None, false, 1),
            data_dir: dir.path().to_path_buf(),
            on_split: Arc::new(|_| {}),
            faulted_peers: Arc::default(),
        };
        let installs = Arc::new(Installs::default());
        let released = Arc::new(AtomicBool::new(false));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let import = {
            let (installs, released) = (installs.clone(), released.clone());
            std::thread::spawn(move || {
                let running = installs.hold_running();
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(800));
                released.store(true, Ordering::SeqCst);
                drop(running);
            })
        };
        held_rx.recv().unwrap();
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let (raft, _) = start_group(
            7,
            &engine,
            &reopen,
            &tuning(),
            &Arc::new(AtomicBool::new(false)),
            &installs,
            None,
        )
        .await
        .unwrap();
        let ticked = ticks.load(Ordering::SeqCst);
        assert!(
            released.load(Ordering::SeqCst),
            "the group opened while the import still ran"
        );
        import.join().unwrap();
        ticker.abort();
        raft.shutdown().await.unwrap();
        assert!(
            ticked >= 10,
            "other tasks ran {ticked} times while the group waited for the import"
        );
    }

    /// Three proposals and three STRONG read barriers on a replica that
    /// must refuse them all, with their errors, numbered by round.
    async fn refused_calls(r: &RangeReplica) -> Vec<(u32, Error)> {
        let mut out = Vec::new();
        for n in 1..=3 {
            let id = Bytes::from(format!("after-{n}"));
            out.push((n, r.propose(id, put(n), false).await.unwrap_err()));
            out.push((n, r.read_barrier(ReadLevel::Strong).await.unwrap_err()));
        }
        out
    }

    fn put(n: u32) -> Op {
        Op::Put {
            key: Bytes::from(format!("k{n}")),
            value: Bytes::from_static(b"v"),
        }
    }

    /// A load of a parked group whose caller stops waiting (a request that
    /// timed out while the load waited for an import) still runs to its
    /// end: the group is live afterwards without another caller, loaded
    /// once.
    /// Parks the replica's live group at once, as `park` would once idle.
    async fn park_now(r: &RangeReplica) {
        let raft = {
            let mut g = r.group.write().unwrap();
            let Group::Live(raft) = &*g else {
                panic!("the group is live")
            };
            let raft = raft.clone();
            let m = raft.metrics().borrow_watched().clone();
            *g = Group::Parked(Arc::new(m));
            raft
        };
        raft.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_its_caller_gave_up_on_still_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let r = lone_leader(dir.path(), 7).await;
        park_now(&r).await;
        assert!(r.is_parked());
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let import = {
            let installs = r.installs.clone();
            std::thread::spawn(move || {
                let running = installs.hold_running();
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                drop(running);
            })
        };
        held_rx.recv().unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(300), r.raft()).await;
        assert!(gave_up.is_err(), "the load waits for the import");
        assert!(r.is_parked());
        // Callers that come and give up while it waits join that load: no
        // task (each holding the replica) is left queued per caller.
        let holders = Arc::strong_count(&r);
        for _ in 0..5 {
            let gave_up = tokio::time::timeout(Duration::from_millis(50), r.raft()).await;
            assert!(gave_up.is_err(), "the load still waits for the import");
        }
        assert_eq!(
            Arc::strong_count(&r),
            holders,
            "callers that gave up left loads of their own behind"
        );
        release_tx.send(()).unwrap();
        import.join().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.is_parked() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the load given up on never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(r.loads.load(Ordering::SeqCst), 1);
        drop(r.raft().await.unwrap());
        assert_eq!(r.loads.load(Ordering::SeqCst), 1, "loaded once");
        // Parked again, the group gets a load of its own, not the last one's.
        park_now(&r).await;
        let again = r.raft().await.expect("loaded again");
        assert_eq!(r.loads.load(Ordering::SeqCst), 2, "loaded anew");
        assert!(
            again.metrics().borrow_watched().running_state.is_ok(),
            "the group handed out runs"
        );
    }

    /// After a split the range's snapshot covers its old span until it is
    /// rebuilt; a restart can cut that rebuild short, so a node checks at
    /// start and rebuilds it. Here: the split leaves a snapshot that is told
    /// apart from the new span, and the rebuild makes one of the new span.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_of_the_span_before_a_split_is_found_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let r = lone_leader(dir.path(), 9).await;
        for n in 1..20 {
            r.propose(Bytes::new(), put(n), false).await.unwrap();
        }
        assert!(!r.snapshot_span_differs(), "no snapshot yet");
        r.serving()
            .await
            .unwrap()
            .trigger()
            .snapshot()
            .await
            .unwrap();
        let s = status_once(&r, |s| s.snapshot_index > 0).await;
        assert!(s.snapshot_index > 0, "no snapshot was built");
        assert!(!r.snapshot_span_differs());

        let version = r.meta().version;
        r.split(Bytes::from_static(b"k5"), 10, version, true)
            .await
            .unwrap();
        assert_eq!(r.meta().end, Bytes::from_static(b"k5"));
        assert!(
            r.snapshot_span_differs(),
            "the snapshot from before the split still covers the old span"
        );
        // A second caller while one rebuild runs leaves it to that one.
        let (first, second) = tokio::join!(r.snapshot_after_split(), async {
            tokio::task::yield_now().await;
            r.snapshot_after_split().await
        });
        assert!(first, "the rebuild reports the snapshot covers the span");
        assert!(!second, "a second rebuild ran beside the first");
        assert!(!r.snapshot_span_differs(), "rebuilt for the new span");
        assert!(r.snapshot_after_split().await, "nothing left to rebuild");
    }

    /// A learner left outside the voter set (by a change that did not
    /// finish) is removed by the next change of the voters, even one that
    /// keeps the same voters: the leader stops replicating to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_voter_change_removes_learners_left_outside_the_voter_set() {
        let dir = tempfile::tempdir().unwrap();
        let r = lone_leader(dir.path(), 7).await;
        let raft = r.serving().await.unwrap();
        raft.add_learner(
            2,
            BasicNode {
                addr: "127.0.0.1:1".into(),
            },
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status().learners, vec![2]);

        r.change_voters([(1, "127.0.0.1:1".to_string())].into())
            .await
            .unwrap();
        let st = r.status();
        assert!(st.learners.is_empty(), "learners left: {:?}", st.learners);
        assert_eq!(st.voters, vec![1]);
        assert_eq!(
            st.nodes.keys().copied().collect::<Vec<_>>(),
            vec![1],
            "node 2 is no longer a member"
        );
    }

    /// Calls that reach a replica after it was shut down for good (removed
    /// from its node) find its Raft group stopped. They are answered as
    /// "shut down on this node", which a client retries elsewhere, every
    /// time: the stop is not recorded as a fault of the range's data, which
    /// the replica would then report as data corruption to every later call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_after_shutdown_are_answered_as_shut_down_not_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let r = lone_leader(dir.path(), lmskv_proto::range::META_RANGE_ID).await;

        r.shutdown().await;
        for (n, e) in refused_calls(&r).await {
            assert!(
                matches!(&e, Error::Unavailable { reason } if reason.contains("shut down on this node")),
                "call {n} after shutdown answered {e}"
            );
        }
        assert!(r.fault.lock().unwrap().is_none());
    }

    /// A leader that refuses its data (corrupt on read) stops leading: its
    /// group stops, status says so and names no leader, every later call
    /// is refused with the fault, and the replica reports it (for the
    /// node's heartbeat, so the placement driver replaces it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_faulted_leader_stops_its_group_and_refuses_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let r = lone_leader(dir.path(), 2).await;
        assert!(r.is_leader() && r.fault().is_none());
        // A call whose group stopped under it while the replica's group
        // runs (it was parked and loaded again meanwhile) is sent again:
        // no fault.
        let e = r.fatal(openraft::errors::Fatal::<TypeConfig>::Stopped);
        assert!(matches!(e, Error::Unavailable { .. }), "answered {e}");
        assert!(r.fault().is_none() && r.is_leader());

        let e = r.refuse(&crate::storage::StorageError::Corruption(
            "block checksum mismatch".into(),
        ));
        assert!(matches!(e, Error::Corruption { .. }), "answered {e}");
        assert!(!r.is_leader(), "a faulted replica does not lead");
        assert_eq!(r.leader_id(), 0);
        let st = r.status();
        assert_eq!(st.role, "shutdown");
        assert!(!st.parked, "a faulted group is stopped, not parked");
        assert!(st.fault.as_deref().is_some_and(|f| f.contains("checksum")));
        assert!(r.fault().is_some_and(|f| f.contains("checksum")));
        for (n, e) in refused_calls(&r).await {
            assert!(
                matches!(&e, Error::Corruption { reason } if reason.contains("checksum")),
                "call {n} after the fault answered {e}"
            );
        }
        // A call that raced the stop sees the group stopped: still the
        // recorded fault, not a new one.
        let e = r.fatal(openraft::errors::Fatal::<TypeConfig>::Stopped);
        assert!(matches!(&e, Error::Corruption { reason } if reason.contains("checksum")));
        r.shutdown().await;
        assert!(
            r.fault().is_none(),
            "a replica shut down for good reports nothing"
        );
    }
}
