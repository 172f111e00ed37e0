//! [`StateMachine`]: applies a range's committed commands to the storage
//! engine and builds and installs its snapshots.
//!
//! Each apply call writes the data mutations, the dedup records and the
//! applied log id in one atomic batch, without the WAL (see
//! `ApplyBatch::commit`): after a crash the range resumes from the last
//! applied entry that a flush made durable, and applies the entries after it
//! again from its log, coming to the same state.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use openraft::alias::{
    LeaderIdOf, LogIdOf, NodeIdOf, NodeOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, Membership, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::command::{session_of, Command, CommandResponse, KvRecord, Op, RangeMeta, WriteOp};
use super::TypeConfig;
use crate::storage::keys::RangeStateField;
use crate::storage::{ApplyBatch, Engine, SessionMark, StorageError, DEDUP_PURGE_GRACE_MS};

/// Runs `work`, which blocks on files and RocksDB, on a blocking thread; or,
/// when `inline` (an engine opened for the simulation, see
/// [`Engine::runs_inline`]), on the calling task, so that it finishes at a
/// definite point of simulated time.
async fn run_blocking<T, F>(inline: bool, work: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    if inline {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// A snapshot: a file in the range's snapshot directory, streamed in chunks.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Where the snapshot file is.
    pub path: PathBuf,
}

/// The range's current snapshot: its metadata and file.
type MembershipOf<C> = Membership<NodeIdOf<C>, NodeOf<C>>;
type CurrentSnapshot = (SnapshotMetaOf<TypeConfig>, PathBuf);

/// The log index at which a range created by an [`Op::Split`] starts: its
/// log is "purged" up to here, so a replica that lacks the range's initial
/// data gets it by snapshot and never by replaying entries it does not have.
/// An [`Op::SplitAtIndex`] starts it at the split entry's own index instead
/// (or here, if that is lower), so the new range's writes get versions above
/// every version its keys had. Every replica applies the same entry, so all
/// agree on the start; a binary that knows only [`Op::Split`] cannot decode
/// the other (see `crate::version`).
pub const SPLIT_INIT_LOG_INDEX: u64 = 5;

/// A range's applied state, written with every apply batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogIdOf<TypeConfig>>,
    pub membership: StoredMembershipOf<TypeConfig>,
    pub desc: RangeMeta,
}

/// Called after a split committed on this replica, with the new range's id.
pub type SplitHook = Arc<dyn Fn(u64) + Send + Sync>;

/// The range's descriptor, shared between its state machine (which changes it
/// by applying entries) and the services (which route by it).
pub type SharedMeta = Arc<RwLock<RangeMeta>>;

/// The descriptor a range starts with when nothing about it is stored yet:
/// the meta range is well known (the whole key space until it is split);
/// any other range is unknown (version 0, serves nothing) until a snapshot
/// brings its state.
/// `desc` with the members of the applied membership config `m`.
fn with_members(mut desc: RangeMeta, m: &StoredMembershipOf<TypeConfig>) -> RangeMeta {
    desc.voters = m.membership().voter_ids().collect();
    desc.learners = m.membership().learner_ids().collect();
    desc
}

/// The membership a split's right-hand range starts with: the voters the
/// parent is heading to (the last of a joint config) as one plain config, and
/// no learners. A move in flight on the parent is the parent's own: copying
/// its learner or joint config would leave the new group with a member no one
/// promotes or a joint config no one finishes. A node the parent is adding or
/// removing may still create a replica of the new range from the split; it is
/// not a member, so the placement driver removes it as a stray.
fn split_membership(m: &MembershipOf<TypeConfig>) -> MembershipOf<TypeConfig> {
    let voters = m.get_joint_config().last().cloned().unwrap_or_default();
    let nodes: std::collections::BTreeMap<_, _> = m
        .nodes()
        .filter(|(id, _)| voters.contains(id))
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    MembershipOf::<TypeConfig>::new(vec![voters], nodes).unwrap_or_else(|_| m.clone())
}

pub fn initial_meta(range_id: u64) -> RangeMeta {
    RangeMeta {
        range_id,
        version: u64::from(range_id == lmskv_proto::range::META_RANGE_ID),
        ..Default::default()
    }
}

/// The descriptor recorded in a snapshot file.
pub fn snapshot_meta(path: &Path) -> io::Result<RangeMeta> {
    match Engine::snapshot_applied_state(path)? {
        Some(b) => Ok(decode::<AppliedState>("snapshot applied state", &b)?.desc),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot file has no applied state",
        )),
    }
}

/// The state machine of one range.
#[derive(Clone)]
pub struct StateMachine {
    engine: Arc<Engine>,
    range_id: u64,
    /// The range's span and epoch as of the last applied entry.
    meta: SharedMeta,
    snapshot_dir: PathBuf,
    dedup_window: Duration,
    current_snapshot: Arc<Mutex<Option<CurrentSnapshot>>>,
    on_split: SplitHook,
    /// Where this state machine notes the latest proposal time it applied;
    /// compactions drop the range's dedup records that expired well before
    /// the latest one a flush made durable (see the engine).
    dedup_clock: Arc<crate::storage::DedupClock>,
    /// The applied state as last written by this state machine (or read
    /// from the engine), so that an apply does not read it back from
    /// RocksDB. Only this state machine writes its range's applied state
    /// while the group runs (apply, snapshot install).
    applied_cache: Arc<Mutex<Option<AppliedState>>>,
    /// The range's snapshot installs, shared with the replica.
    installs: Arc<Installs>,
    /// The dedup records of client sessions this replica wrote and has not
    /// deleted yet, so that raising a session's mark deletes them.
    sessions: Arc<Mutex<SessionRecords>>,
    /// The range's session marks as committed (`None`: none stored), so
    /// that a marked write does not look its mark up in RocksDB.
    marks: Arc<Mutex<MarkCache>>,
}

/// Session marks a range's state machine keeps in memory.
const MARKS_CACHED_MAX: usize = 4_096;

/// The committed session marks of a range, as read from or written to the
/// engine by its state machine, the only writer of its marks while it runs
/// (a snapshot install clears this). Exact, not a hint: what is applied
/// depends on it. Emptied when full.
#[derive(Debug, Default)]
struct MarkCache(std::collections::HashMap<[u8; 8], Option<SessionMark>>);

impl MarkCache {
    fn put(&mut self, session: [u8; 8], mark: Option<SessionMark>) {
        if self.0.len() >= MARKS_CACHED_MAX && !self.0.contains_key(&session) {
            self.0.clear();
        }
        self.0.insert(session, mark);
    }
}

/// How far a session's completed mark must rise before a command writes it
/// again (and deletes the records below it): the mark is a key rewritten in
/// the range's state, so not on every write; a range keeps at most about
/// this many records of a session beyond those in flight.
const SESSION_MARK_STEP: u64 = 32;

/// Request numbers a replica keeps per range for [`SessionRecords`]; the
/// records of requests beyond that leave by expiry only.
const SESSION_RECORDS_MAX: usize = 1 << 16;

/// Request numbers all the ranges of this process keep together.
const SESSION_RECORDS_PROCESS_MAX: usize = 1 << 20;

/// How often (in proposal time) a range forgets its sessions idle for a
/// whole dedup window.
const SESSION_PRUNE_EVERY_MS: u64 = 10_000;

/// Request numbers kept by every [`SessionRecords`] of this process.
static SESSION_RECORDS_KEPT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// The 16-byte request id of a session's request number.
fn request_id_of(session: &[u8; 8], seq: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(session);
    id[8..].copy_from_slice(&seq.to_be_bytes());
    id
}

/// Per client session, the numbers of the requests whose dedup records a
/// replica wrote and has not deleted, with the session's last proposal
/// time. Not replicated and not kept across restarts or snapshot installs:
/// what is applied never depends on it (a request below a session's mark is
/// refused whether its record is there or not), and records it does not
/// know of leave by expiry, as records without a session do.
#[derive(Debug, Default)]
struct SessionRecords {
    by_session: std::collections::HashMap<[u8; 8], (std::collections::BTreeSet<u64>, u64)>,
    total: usize,
    /// Proposal time from which idle sessions are looked for again.
    next_prune_ms: u64,
}

impl SessionRecords {
    /// Removes and returns the session's request numbers below `below`.
    fn take_below(&mut self, session: &[u8; 8], below: u64) -> Vec<u64> {
        let Some((seqs, _)) = self.by_session.get_mut(session) else {
            return Vec::new();
        };
        let keep = seqs.split_off(&below);
        let taken = std::mem::replace(seqs, keep);
        if seqs.is_empty() {
            self.by_session.remove(session);
        }
        self.forget(taken.len());
        taken.into_iter().collect()
    }

    fn forget(&mut self, n: usize) {
        self.total -= n;
        SESSION_RECORDS_KEPT.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Notes a record of `session` for request `seq`, proposed at `now_ms`,
    /// unless this range or the process keeps as many as it may; every
    /// [`SESSION_PRUNE_EVERY_MS`] first forgets the sessions idle for a
    /// whole `window_ms` (a client gone: its records leave by expiry).
    fn insert(&mut self, session: [u8; 8], seq: u64, now_ms: u64, window_ms: u64) {
        if now_ms >= self.next_prune_ms {
            self.next_prune_ms = now_ms.saturating_add(SESSION_PRUNE_EVERY_MS);
            let mut dropped = 0;
            self.by_session.retain(|_, (seqs, last)| {
                let keep = last.saturating_add(window_ms) > now_ms;
                if !keep {
                    dropped += seqs.len();
                }
                keep
            });
            self.forget(dropped);
        }
        let kept = SESSION_RECORDS_KEPT.load(std::sync::atomic::Ordering::Relaxed);
        if self.total >= SESSION_RECORDS_MAX || kept >= SESSION_RECORDS_PROCESS_MAX {
            return;
        }
        let (seqs, last) = self.by_session.entry(session).or_default();
        *last = (*last).max(now_ms);
        if seqs.insert(seq) {
            self.total += 1;
            SESSION_RECORDS_KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for SessionRecords {
    fn drop(&mut self) {
        SESSION_RECORDS_KEPT.fetch_sub(self.total, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A range's snapshot installs, shared by its state machine and its replica
/// (and kept across parking).
#[derive(Debug, Default)]
pub struct Installs {
    /// Raised when a snapshot install starts and again when its import
    /// succeeded (odd: one is under way, or one failed): a local read that
    /// saw it change read a store the install was clearing and refilling.
    pub seq: std::sync::atomic::AtomicU64,
    /// Held by the blocking import for as long as it runs, which can be
    /// longer than openraft's install call (that future may be dropped).
    running: Mutex<()>,
    /// Set when the replica is being removed: an import not yet begun
    /// refuses to begin, and one under way stops at its next batch and
    /// deletes what it wrote (see [`Engine::import_snapshot`]).
    abort: std::sync::atomic::AtomicBool,
}

impl Installs {
    /// Marks an install under way (`seq` odd; it may be odd already, after
    /// one that failed).
    fn begin(&self) {
        self.seq.fetch_or(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops imports from here on (the replica is being removed).
    pub fn abort(&self) {
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Blocks until no import runs; call off the async threads.
    pub fn wait_idle(&self) {
        drop(self.running.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Holds the import lock as a running import does (tests).
    #[cfg(test)]
    pub(crate) fn hold_running(&self) -> std::sync::MutexGuard<'_, ()> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("range_id", &self.range_id)
            .finish()
    }
}

fn meta_path(snap: &Path) -> PathBuf {
    snap.with_extension("meta")
}

impl StateMachine {
    /// Opens the state machine of `range_id`, finishing a snapshot install
    /// that a crash interrupted, with the replica's install state (kept
    /// across parking): an interrupted install resumed here is one the
    /// replica's removal can stop and wait for, like any other.
    pub fn open(
        engine: Arc<Engine>,
        range_id: u64,
        snapshot_dir: PathBuf,
        dedup_window: Duration,
        on_split: SplitHook,
        clean_received: bool,
        installs: Arc<Installs>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let mut sm = StateMachine {
            engine: engine.clone(),
            range_id,
            meta: Arc::new(RwLock::new(initial_meta(range_id))),
            snapshot_dir,
            dedup_window,
            current_snapshot: Arc::new(Mutex::new(None)),
            on_split,
            dedup_clock: engine.dedup_clock(range_id),
            applied_cache: Arc::new(Mutex::new(None)),
            installs,
            sessions: Arc::default(),
            marks: Arc::default(),
        };
        // Remove partial files of builds or transfers that did not finish
        // (when a parked group is loaded again, a snapshot being received
        // right now is kept: only `clean_received` removes those).
        for entry in std::fs::read_dir(&sm.snapshot_dir)? {
            let p = entry?.path();
            let received = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("recv-"));
            if p.extension().is_some_and(|e| e == "tmp") && (clean_received || !received) {
                let _ = std::fs::remove_file(&p);
            }
        }
        let current = latest_snapshot_in(&sm.snapshot_dir)?;
        // Under the import lock: an import of this replica may still run
        // (its group was shut down and loaded again meanwhile); the marker
        // is read once it ended.
        let installs = sm.installs.clone();
        let _running = installs.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = sm.engine.pending_snapshot_install(range_id)? {
            let Some((meta, cur_path)) = current.clone().filter(|(_, p)| *p == path) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "range {range_id}: interrupted snapshot install of {} cannot be resumed: file missing",
                        path.display()
                    ),
                ));
            };
            tracing::warn!(range_id, path = %cur_path.display(), "resuming interrupted snapshot install");
            installs.begin();
            sm.import(&meta, &cur_path)?;
            installs
                .seq
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        *sm.current_snapshot.lock().expect("snapshot lock") = current;
        if let Some(a) = sm.stored_applied()? {
            sm.meta = Arc::new(RwLock::new(with_members(a.desc, &a.membership)));
        }
        Ok(sm)
    }

    /// The range's descriptor, shared with the replica.
    pub fn meta(&self) -> SharedMeta {
        self.meta.clone()
    }

    /// Makes `shared` (the descriptor the replica's services already read)
    /// this state machine's, holding what this one loaded from storage.
    pub fn share_meta(&mut self, shared: SharedMeta) {
        let loaded = self.meta.read().expect("meta lock").clone();
        *shared.write().expect("meta lock") = loaded;
        self.meta = shared;
    }

    fn stored_applied(&self) -> io::Result<Option<AppliedState>> {
        match self
            .engine
            .range_state(self.range_id, RangeStateField::Applied)?
        {
            Some(b) => Ok(Some(decode("applied state", &b)?)),
            None => Ok(None),
        }
    }
}

/// Whether the newest snapshot in `snapshot_dir` covers another span than
/// `span` (a split applied after it was built, and the rebuild that follows
/// a split was cut short by a restart): a node that holds the other half
/// refuses it, so a new member there could not be brought up from it.
/// `false` when there is none, or it cannot be read.
pub fn snapshot_span_differs(snapshot_dir: &Path, span: &RangeMeta) -> bool {
    let Ok(Some((_, path))) = latest_snapshot_in(snapshot_dir) else {
        return false;
    };
    snapshot_meta(&path).is_ok_and(|m| m.start != span.start || m.end != span.end)
}

/// The newest snapshot in `snapshot_dir` whose meta can be read.
fn latest_snapshot_in(
    snapshot_dir: &Path,
) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, PathBuf)>> {
    let mut best: Option<(SnapshotMetaOf<TypeConfig>, PathBuf)> = None;
    for entry in std::fs::read_dir(snapshot_dir)? {
        let p = entry?.path();
        if p.extension().is_none_or(|e| e != "snap") {
            continue;
        }
        let Ok(raw) = std::fs::read(meta_path(&p)) else {
            continue;
        };
        let meta: SnapshotMetaOf<TypeConfig> = match crate::storage::value::unframe(
            "snapshot meta",
            &raw,
        )
        .map_err(io::Error::from)
        .and_then(|b| decode("snapshot meta", b))
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "ignoring unreadable snapshot meta");
                continue;
            }
        };
        if best
            .as_ref()
            .is_none_or(|(b, _)| meta.last_log_id > b.last_log_id)
        {
            best = Some((meta, p));
        }
    }
    Ok(best)
}

impl StateMachine {
    fn applied(&self) -> io::Result<AppliedState> {
        if let Some(a) = self.applied_cache.lock().expect("applied lock").as_ref() {
            return Ok(a.clone());
        }
        match self.stored_applied()? {
            Some(a) => {
                *self.applied_cache.lock().expect("applied lock") = Some(a.clone());
                Ok(a)
            }
            None => Ok(AppliedState {
                desc: self.meta.read().expect("meta lock").clone(),
                ..Default::default()
            }),
        }
    }

    /// Makes `path` (with `meta`) the range's current snapshot and deletes
    /// older ones; returns the current snapshot after the call. A snapshot
    /// this replica built (`built`) that is older than the current one (an
    /// install landed while it was being built) is deleted instead: it must
    /// not replace, and so delete, the newer snapshot the install is
    /// importing or has imported.
    fn keep_snapshot(
        &self,
        meta: &SnapshotMetaOf<TypeConfig>,
        path: &Path,
        built: bool,
    ) -> io::Result<CurrentSnapshot> {
        let framed = crate::storage::value::frame(&encode(meta)?);
        let mp = meta_path(path);
        let tmp = mp.with_extension("meta.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&framed)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &mp)?;
        // The snapshot's and its meta's names (both just renamed into
        // place) must survive a power cut before an install's synced
        // marker names the snapshot.
        std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        let mut cur = self.current_snapshot.lock().expect("snapshot lock");
        let index = |m: &SnapshotMetaOf<TypeConfig>| m.last_log_id.as_ref().map(|l| l.index());
        if let Some((cur_meta, cur_path)) = cur.as_ref() {
            if built && index(cur_meta) > index(meta) && cur_path != path {
                let _ = std::fs::remove_file(&mp);
                let _ = std::fs::remove_file(path);
                return Ok((cur_meta.clone(), cur_path.clone()));
            }
        }
        let old = cur.replace((meta.clone(), path.to_path_buf()));
        if let Some((_, old_path)) = old {
            if old_path != path {
                let _ = std::fs::remove_file(meta_path(&old_path));
                let _ = std::fs::remove_file(&old_path);
            }
        }
        Ok((meta.clone(), path.to_path_buf()))
    }

    fn snapshot_file_name(meta: &SnapshotMetaOf<TypeConfig>) -> String {
        match &meta.last_log_id {
            Some(l) => format!("{:020}-{}.snap", l.index(), l.committed_leader_id()),
            None => "empty.snap".to_string(),
        }
        .replace(['/', ' ', ':'], "_")
    }

    fn import(&self, meta: &SnapshotMetaOf<TypeConfig>, path: &Path) -> io::Result<()> {
        let r = self.import_file(meta, path);
        // The records and marks it knew of were replaced with the
        // snapshot's (or half of them, when the import failed).
        *self.sessions.lock().expect("sessions lock") = SessionRecords::default();
        self.marks.lock().expect("marks lock").0.clear();
        r
    }

    fn import_file(&self, meta: &SnapshotMetaOf<TypeConfig>, path: &Path) -> io::Result<()> {
        let in_file: AppliedState = match Engine::snapshot_applied_state(path)? {
            Some(b) => decode("snapshot applied state", &b)?,
            None => AppliedState {
                desc: initial_meta(self.range_id),
                ..Default::default()
            },
        };
        if in_file.desc.range_id != self.range_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot of range {} offered to range {}",
                    in_file.desc.range_id, self.range_id
                ),
            ));
        }
        let applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            desc: in_file.desc.clone(),
        };
        self.engine.import_snapshot(
            self.range_id,
            &applied.desc.start,
            &applied.desc.end,
            path,
            &encode(&applied)?,
            &self.installs.abort,
        )?;
        *self.meta.write().expect("meta lock") =
            with_members(applied.desc.clone(), &applied.membership);
        *self.applied_cache.lock().expect("applied lock") = Some(applied);
        Ok(())
    }

    /// Applies a split at `split_key`: shrinks this range and creates the
    /// right-hand range's state in the same batch, its log starting (purged)
    /// at `start`.
    fn split(
        &self,
        batch: &mut ApplyBatch<'_>,
        desc: &mut RangeMeta,
        membership: &StoredMembershipOf<TypeConfig>,
        (split_key, new_range_id, version): (&Bytes, u64, u64),
        start: u64,
    ) -> Result<CommandResponse, StorageError> {
        if version != desc.version {
            return Ok(CommandResponse::Split(Err(format!(
                "range {} is at version {}, the split was planned at {version}",
                desc.range_id, desc.version
            ))));
        }
        if split_key.as_ref() <= desc.start.as_ref() || !desc.contains(split_key) {
            return Ok(CommandResponse::Split(Err(format!(
                "split key {} is not strictly inside range {}",
                lmskv_proto::keys::escape(split_key),
                desc.range_id
            ))));
        }
        if new_range_id <= lmskv_proto::range::META_RANGE_ID || new_range_id == desc.range_id {
            return Ok(CommandResponse::Split(Err(format!(
                "bad new range id {new_range_id}"
            ))));
        }
        crate::fail_point!("split-apply");
        let right = RangeMeta {
            range_id: new_range_id,
            start: split_key.clone(),
            end: desc.end.clone(),
            version: desc.version + 1,
            conf_ver: desc.conf_ver,
            voters: Vec::new(),
            learners: Vec::new(),
        };
        desc.end = split_key.clone();
        desc.version += 1;
        let init = LogIdOf::<TypeConfig>::new(
            LeaderIdOf::<TypeConfig>::new(0, 0).to_committed(),
            start.max(SPLIT_INIT_LOG_INDEX),
        );
        let right_membership = StoredMembershipOf::<TypeConfig>::new(
            Some(init),
            split_membership(membership.membership()),
        );
        if batch.range_exists(new_range_id)? {
            // This replica already hosts (or hosted) the new range: its state
            // came from the new range's own group and is newer than ours.
            tracing::info!(
                range_id = self.range_id,
                new_range_id,
                "split: right-hand range already present"
            );
        } else {
            let right_applied = AppliedState {
                last_applied: Some(init),
                membership: right_membership.clone(),
                desc: right.clone(),
            };
            batch.create_range(new_range_id, &encode(&right_applied)?, &encode(&init)?)?;
        }
        Ok(CommandResponse::Split(Ok((
            with_members(desc.clone(), membership),
            with_members(right, &right_membership),
        ))))
    }

    /// Applies one client command (alone or of a group) at `index`: answers
    /// a retried request id from its dedup record, else executes it and
    /// records its outcome under its request id.
    fn apply_command(
        &self,
        batch: &mut ApplyBatch<'_>,
        desc: &mut RangeMeta,
        membership: &StoredMembershipOf<TypeConfig>,
        splits: &mut Vec<u64>,
        index: u64,
        cmd: &Command,
    ) -> Result<CommandResponse, io::Error> {
        let (op, marked) = match &cmd.op {
            Op::Session {
                completed_below,
                op,
            } => {
                // The proposer marks only single client writes.
                if op.is_split() || matches!(**op, Op::Group(_) | Op::Session { .. }) {
                    return Err(StorageError::Corruption(format!(
                        "a session mark on {cmd}, not on a single client write"
                    ))
                    .into());
                }
                (&**op, Some(*completed_below))
            }
            op => (op, None),
        };
        // Every 16-byte id is held to its session's mark, whether this
        // command carries one or not (a leader that did not yet record
        // version 3 proposes without it; a caller may choose such an id):
        // which records below a mark a replica still has differs between
        // replicas, so nothing below it may be answered from them.
        let mut session = None;
        if let Some((id, seq)) = session_of(&cmd.request_id) {
            let mark = self.session_mark(batch, &id, cmd.proposed_at_ms)?;
            if seq < mark.map_or(0, |m| m.completed_below) {
                return Ok(CommandResponse::Superseded);
            }
            if let Some(completed_below) = marked {
                session = Some((id, seq, completed_below, mark));
            }
        }
        let resp = self.apply_unmarked(batch, desc, membership, splits, index, (cmd, op))?;
        if let Some((id, seq, completed_below, mark)) = session {
            self.note_session(
                batch,
                cmd.proposed_at_ms,
                (id, seq),
                completed_below,
                mark,
                &resp,
            );
        }
        Ok(resp)
    }

    /// Commits an apply batch, then notes the session marks it wrote.
    fn commit(&self, batch: ApplyBatch<'_>) -> Result<(), StorageError> {
        let marks: Vec<_> = batch.session_marks().collect();
        batch.commit()?;
        if !marks.is_empty() {
            let mut cache = self.marks.lock().expect("marks lock");
            for (session, m) in marks {
                cache.put(session, Some(m));
            }
        }
        Ok(())
    }

    /// A client session's mark unexpired at `now_ms`: the batch's pending
    /// one, else the committed one (from memory when known).
    fn session_mark(
        &self,
        batch: &ApplyBatch<'_>,
        session: &[u8; 8],
        now_ms: u64,
    ) -> Result<Option<SessionMark>, StorageError> {
        let live = |m: Option<SessionMark>| m.filter(|m| m.expires_at_ms > now_ms);
        if let Some(m) = batch.pending_session_mark(session) {
            return Ok(live(Some(m)));
        }
        let mut marks = self.marks.lock().expect("marks lock");
        if let Some(m) = marks.0.get(session) {
            return Ok(live(*m));
        }
        let stored = self.engine.session_mark_get(self.range_id, session, 0)?;
        marks.put(*session, stored);
        Ok(live(stored))
    }

    /// Raises a client session's completed mark on the range when the
    /// command's mark is a step or more above the stored one (or none is
    /// stored), and deletes the dedup records this replica knows of below
    /// the new mark: no request below it is answered from them again.
    ///
    /// The mark expires [`DEDUP_PURGE_GRACE_MS`] after the window, so never
    /// before a record it made go: those were proposed earlier, by leaders
    /// whose clocks agree within that grace. Once it has expired, so have
    /// they, on every replica alike, whether deleted or not.
    fn note_session(
        &self,
        batch: &mut ApplyBatch<'_>,
        proposed_at_ms: u64,
        (id, seq): ([u8; 8], u64),
        completed_below: u64,
        mark: Option<SessionMark>,
        resp: &CommandResponse,
    ) {
        let window = self.dedup_window.as_millis() as u64;
        let stored = mark.map_or(0, |m| m.completed_below);
        // The mark never exceeds the request's own number (the client's
        // mark is the lowest number it has in flight, this one included).
        let raised = completed_below.min(seq);
        let mut tracked = self.sessions.lock().expect("sessions lock");
        if mark.is_none() || raised >= stored.saturating_add(SESSION_MARK_STEP) {
            let to = raised.max(stored);
            let expires_at_ms = mark.map_or(0, |m| m.expires_at_ms).max(
                proposed_at_ms
                    .saturating_add(window)
                    .saturating_add(DEDUP_PURGE_GRACE_MS),
            );
            batch.set_session_mark(
                &id,
                SessionMark {
                    completed_below: to,
                    expires_at_ms,
                },
            );
            for below in tracked.take_below(&id, to) {
                batch.dedup_delete(&request_id_of(&id, below));
            }
        }
        if !matches!(resp, CommandResponse::KeyNotInRange) {
            tracked.insert(id, seq, proposed_at_ms, window);
        }
    }

    /// [`Self::apply_command`] for command `cmd` without its session mark:
    /// `op` is its operation (the marked one, when it has a mark).
    fn apply_unmarked(
        &self,
        batch: &mut ApplyBatch<'_>,
        desc: &mut RangeMeta,
        membership: &StoredMembershipOf<TypeConfig>,
        splits: &mut Vec<u64>,
        index: u64,
        (cmd, op): (&Command, &Op),
    ) -> Result<CommandResponse, io::Error> {
        let seen = if cmd.request_id.is_empty() {
            None
        } else {
            batch.dedup_get(&cmd.request_id, cmd.proposed_at_ms)?
        };
        if let Some(rec) = seen {
            // A retry of a write already applied: answer as the first time.
            return decode("dedup record", &rec);
        }
        let resp = match op {
            Op::Split {
                split_key,
                new_range_id,
                version,
            }
            | Op::SplitAtIndex {
                split_key,
                new_range_id,
                version,
            } => {
                let start = if matches!(op, Op::SplitAtIndex { .. }) {
                    index
                } else {
                    SPLIT_INIT_LOG_INDEX
                };
                let r = self.split(
                    batch,
                    desc,
                    membership,
                    (split_key, *new_range_id, *version),
                    start,
                )?;
                if matches!(r, CommandResponse::Split(Ok(_))) {
                    splits.push(*new_range_id);
                }
                r
            }
            _ => self.execute(batch, desc, index, op)?,
        };
        if !cmd.request_id.is_empty() && resp != CommandResponse::KeyNotInRange {
            let expires = cmd.proposed_at_ms + self.dedup_window.as_millis() as u64;
            batch.dedup_put(&cmd.request_id, expires, encode(&resp)?);
        }
        Ok(resp)
    }

    fn execute(
        &self,
        batch: &mut ApplyBatch<'_>,
        desc: &RangeMeta,
        index: u64,
        op: &Op,
    ) -> Result<CommandResponse, StorageError> {
        // A write proposed before a split but applied after it may touch keys
        // this range no longer holds: refuse it, unapplied, so the client
        // retries it on the range that holds them now.
        if !op.keys().all(|k| desc.contains(k)) {
            return Ok(CommandResponse::KeyNotInRange);
        }
        let record = |key: &Bytes, v: crate::storage::StoredValue| KvRecord {
            key: key.clone(),
            value: v.value,
            version: v.version,
        };
        Ok(match op {
            Op::Put { key, value } => {
                batch.put(key, index, value.clone());
                CommandResponse::Put { version: index }
            }
            Op::Delete { key } => {
                let existed = batch.get(key)?.is_some();
                if existed {
                    batch.delete(key);
                }
                CommandResponse::Delete { deleted: existed }
            }
            Op::CompareAndSwap { compare, new_value } => {
                let cur = batch.get(&compare.key)?;
                let holds = compare.holds(cur.as_ref().map(|v| (v.value.as_ref(), v.version)));
                if holds {
                    match new_value {
                        Some(v) => {
                            batch.put(&compare.key, index, v.clone());
                            CommandResponse::CompareAndSwap {
                                succeeded: true,
                                current: Some(KvRecord {
                                    key: compare.key.clone(),
                                    value: v.clone(),
                                    version: index,
                                }),
                            }
                        }
                        None => {
                            if cur.is_some() {
                                batch.delete(&compare.key);
                            }
                            CommandResponse::CompareAndSwap {
                                succeeded: true,
                                current: None,
                            }
                        }
                    }
                } else {
                    CommandResponse::CompareAndSwap {
                        succeeded: false,
                        current: cur.map(|v| record(&compare.key, v)),
                    }
                }
            }
            Op::Batch { conditions, ops } => {
                let mut failed = Vec::new();
                let mut all_hold = true;
                for c in conditions {
                    let cur = batch.get(&c.key)?;
                    if !c.holds(cur.as_ref().map(|v| (v.value.as_ref(), v.version))) {
                        all_hold = false;
                    }
                    if let Some(v) = cur {
                        failed.push(record(&c.key, v));
                    }
                }
                if !all_hold {
                    return Ok(CommandResponse::Batch {
                        succeeded: false,
                        current: failed,
                        version: 0,
                    });
                }
                for op in ops {
                    match op {
                        WriteOp::Put { key, value } => batch.put(key, index, value.clone()),
                        WriteOp::Delete { key } => batch.delete(key),
                    }
                }
                CommandResponse::Batch {
                    succeeded: true,
                    current: Vec::new(),
                    version: index,
                }
            }
            Op::Split { .. } | Op::SplitAtIndex { .. } => {
                CommandResponse::Split(Err("split applied as a write".into()))
            }
            // The proposer never nests groups nor puts a split in one.
            Op::Group(_) => {
                return Err(StorageError::Corruption(
                    "a group of writes inside a group".into(),
                ))
            }
            Op::Session { .. } => {
                return Err(StorageError::Corruption(
                    "a session mark inside a session mark".into(),
                ))
            }
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let this = self.clone();
        run_blocking(self.engine.runs_inline(), move || {
            let tmp = this
                .snapshot_dir
                .join(format!("build-{}.tmp", rand::random::<u64>()));
            // The span comes from the applied state in the same engine
            // snapshot as the data, so a concurrent split cannot skew them.
            let fallback = this.meta.read().expect("meta lock").clone();
            let export = this.engine.export_snapshot(
                this.range_id,
                |applied| {
                    let desc = match applied {
                        Some(b) => decode::<AppliedState>("applied state", b)?.desc,
                        None => fallback,
                    };
                    Ok((desc.start.to_vec(), desc.end.to_vec()))
                },
                &tmp,
            )?;
            crate::fail_point!("snapshot-build");
            // Applied writes skip the WAL: flushed here, they are durable up
            // to the snapshot's index before openraft purges the log behind
            // it, so a crash does not make the restart install this snapshot
            // again (it would, were the applied state older; that is the
            // fallback when the flush fails).
            if let Err(e) = this.engine.flush() {
                tracing::warn!(range_id = this.range_id, error = %e, "cannot flush applied writes after a snapshot build");
            }
            let applied: AppliedState = match &export.applied {
                Some(b) => decode("applied state", b)?,
                None => AppliedState::default(),
            };
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            };
            let path = this.snapshot_dir.join(Self::snapshot_file_name(&meta));
            std::fs::rename(&tmp, &path)?;
            let (meta, path) = this.keep_snapshot(&meta, &path, true)?;
            tracing::info!(
                range_id = this.range_id,
                records = export.records,
                bytes = export.bytes,
                last_log_id = ?meta.last_log_id,
                "built snapshot"
            );
            Ok(SnapshotOf::<TypeConfig, SnapshotFile> {
                meta,
                snapshot: SnapshotFile { path },
            })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let a = self.applied()?;
        Ok((a.last_applied, a.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let AppliedState {
            mut last_applied,
            mut membership,
            mut desc,
        } = self.applied()?;
        let mut batch = self.engine.apply_batch(self.range_id);
        let mut splits = Vec::new();
        let mut responders = Vec::new();
        let mut last_time_ms = 0u64;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.index();
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    membership =
                        StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id()), m.clone());
                    desc.conf_ver += 1;
                    CommandResponse::None
                }
                EntryPayload::Normal(cmd) => match &cmd.op {
                    Op::Group(cmds) => {
                        let mut resps = Vec::with_capacity(cmds.len());
                        for c in cmds {
                            last_time_ms = last_time_ms.max(c.proposed_at_ms);
                            resps.push(self.apply_command(
                                &mut batch,
                                &mut desc,
                                &membership,
                                &mut splits,
                                index,
                                c,
                            )?);
                        }
                        CommandResponse::Group(resps)
                    }
                    _ => {
                        last_time_ms = last_time_ms.max(cmd.proposed_at_ms);
                        self.apply_command(
                            &mut batch,
                            &mut desc,
                            &membership,
                            &mut splits,
                            index,
                            cmd,
                        )?
                    }
                },
            };
            last_applied = Some(entry.log_id());
            if let Some(r) = responder {
                responders.push((r, resp));
            }
        }
        let desc = with_members(desc, &membership);
        let applied = AppliedState {
            last_applied,
            membership,
            desc: desc.clone(),
        };
        batch.set_applied(&encode(&applied)?);
        crate::fail_point!("apply-before-commit");
        if batch.creates_range() {
            // A batch that creates a range is durable once committed, written
            // through the WAL over a flushed store (`ApplyBatch::create_range`);
            // the flush runs off the async threads.
            let engine = self.engine.clone();
            run_blocking(engine.runs_inline(), move || Ok(engine.flush()?)).await?;
            batch.flushed_before();
        }
        self.commit(batch)?;
        crate::fail_point!("apply-after-commit");
        *self.applied_cache.lock().expect("applied lock") = Some(applied);
        self.dedup_clock.applied(last_time_ms);
        *self.meta.write().expect("meta lock") = desc;
        for id in splits {
            (self.on_split)(id);
        }
        for (r, resp) in responders {
            r.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let final_path = self.snapshot_dir.join(Self::snapshot_file_name(meta));
        if snapshot.path != final_path {
            std::fs::rename(&snapshot.path, &final_path)?;
        }
        // Record the snapshot first: an interrupted import resumes from it.
        self.keep_snapshot(meta, &final_path, false)?;
        crate::fail_point!("snapshot-install");
        let this = self.clone();
        let meta2 = meta.clone();
        let fp = final_path.clone();
        // Odd while the import runs. The blocking import goes on even if
        // this future is dropped, so it ends the mark itself, and only when
        // it succeeded: a failed import leaves the store half-written, and
        // local reads stay refused (the replica faults on the error).
        let installs = self.installs.clone();
        installs.begin();
        run_blocking(self.engine.runs_inline(), move || {
            let _running = installs.running.lock().unwrap_or_else(|e| e.into_inner());
            let imported = this.import(&meta2, &fp);
            if imported.is_ok() {
                installs
                    .seq
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            imported
        })
        .await?;
        tracing::info!(range_id = self.range_id, last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let cur = self.current_snapshot.lock().expect("snapshot lock").clone();
        Ok(
            cur.map(|(meta, path)| SnapshotOf::<TypeConfig, SnapshotFile> {
                meta,
                snapshot: SnapshotFile { path },
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::impls::BasicNode;

    use super::*;

    #[test]
    fn a_snapshot_built_while_a_newer_one_was_installed_does_not_replace_it() {
        use openraft::alias::LeaderIdOf;
        use openraft::vote::RaftLeaderId;
        let (dir, engine) = test_engine();
        let sm = open_range_5(&engine, dir.path(), Duration::from_secs(60));
        let meta = |index: u64| SnapshotMetaOf::<TypeConfig> {
            last_log_id: Some(LogIdOf::<TypeConfig>::new(
                LeaderIdOf::<TypeConfig>::new(1, 1).to_committed(),
                index,
            )),
            last_membership: Default::default(),
        };
        let file = |index: u64| {
            let p = sm
                .snapshot_dir
                .join(StateMachine::snapshot_file_name(&meta(index)));
            std::fs::write(&p, b"snapshot").expect("write");
            p
        };
        let index = |m: &SnapshotMetaOf<TypeConfig>| m.last_log_id.as_ref().map(|l| l.index());

        // An install of index 10 lands while a build at index 5 runs.
        let installed = file(10);
        sm.keep_snapshot(&meta(10), &installed, false)
            .expect("keep");
        let built = file(5);
        let (m, p) = sm.keep_snapshot(&meta(5), &built, true).expect("keep");
        assert_eq!((index(&m), &p), (Some(10), &installed));
        assert!(installed.exists(), "the installed snapshot was deleted");
        assert!(!built.exists(), "the older build was kept");

        // A newer build replaces it as before.
        let newer = file(12);
        let (m, p) = sm.keep_snapshot(&meta(12), &newer, true).expect("keep");
        assert_eq!((index(&m), &p), (Some(12), &newer));
        assert!(!installed.exists());
    }

    /// A fresh engine in a temporary directory (kept while the handle lives).
    fn test_engine() -> (tempfile::TempDir, Arc<Engine>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(
            &dir.path().join("db"),
            &crate::storage::EngineOptions::default(),
        )
        .expect("engine");
        (dir, Arc::new(engine))
    }

    /// Opens the state machine of range 5 over `engine`, its snapshots
    /// under `dir`.
    fn open_range_5(engine: &Arc<Engine>, dir: &Path, window: Duration) -> StateMachine {
        StateMachine::open(
            engine.clone(),
            5,
            dir.join("snap"),
            window,
            Arc::new(|_| {}),
            true,
            Arc::default(),
        )
        .expect("state machine")
    }

    /// Applies one write of client session `session` (request `n`, sent
    /// with mark `mark`, proposed at `at_ms`) at log index `index`.
    fn apply_marked(
        sm: &StateMachine,
        (session, n, mark): (u8, u64, u64),
        index: u64,
        at_ms: u64,
        (key, value): (&'static str, &'static str),
    ) -> CommandResponse {
        let mut batch = sm.engine.apply_batch(sm.range_id);
        let mut desc = initial_meta(sm.range_id);
        let cmd = Command {
            request_id: Bytes::copy_from_slice(&request_id_of(&[session; 8], n)),
            proposed_at_ms: at_ms,
            op: Op::Put {
                key: Bytes::from_static(key.as_bytes()),
                value: Bytes::from_static(value.as_bytes()),
            },
        };
        // Mark 0: proposed without one (a leader before version 3).
        let cmd = if mark == 0 {
            cmd
        } else {
            Command {
                op: Op::Session {
                    completed_below: mark,
                    op: Box::new(cmd.op),
                },
                ..cmd
            }
        };
        let resp = sm
            .apply_command(
                &mut batch,
                &mut desc,
                &Default::default(),
                &mut Vec::new(),
                index,
                &cmd,
            )
            .expect("apply");
        sm.commit(batch).expect("commit");
        resp
    }

    #[test]
    fn a_session_mark_refuses_late_copies_and_drops_the_records_below_it() {
        let (dir, engine) = test_engine();
        let window = Duration::from_secs(60);
        let sm = open_range_5(&engine, dir.path(), window);
        let t0 = 1_000_000u64;
        let record = |session: u8, n: u64, at: u64| {
            engine
                .dedup_get(5, &request_id_of(&[session; 8], n), at)
                .expect("dedup get")
        };
        let value = |key: &str| engine.get(key.as_bytes()).expect("get").map(|v| v.value);

        let first = apply_marked(&sm, (1, 10, 10), 100, t0, ("a", "1"));
        assert_eq!(first, CommandResponse::Put { version: 100 });
        assert_eq!(
            apply_marked(&sm, (1, 10, 10), 101, t0, ("a", "1")),
            first,
            "a retry in flight is answered from its record"
        );
        for n in 11..=40 {
            apply_marked(&sm, (1, n, 10), 100 + n, t0, ("b", "x"));
        }
        assert!(record(1, 10, t0).is_some() && record(1, 40, t0).is_some());

        // A mark less than a step above the stored one is not written yet.
        apply_marked(&sm, (1, 41, 30), 141, t0, ("b", "x"));
        assert!(record(1, 10, t0).is_some(), "deleted before the mark rose");
        assert_eq!(
            apply_marked(&sm, (1, 20, 20), 142, t0, ("a", "20")),
            CommandResponse::Put { version: 120 },
            "request 20 is above the stored mark: answered from its record"
        );

        // Request 50 says all below it returned: the mark rises to 50.
        apply_marked(&sm, (1, 50, 50), 150, t0, ("c", "y"));
        for n in 10..=41 {
            assert!(record(1, n, t0).is_none(), "record {n} kept below the mark");
        }
        assert!(
            record(1, 50, t0).is_some(),
            "the raising request's own record"
        );
        assert_eq!(
            apply_marked(&sm, (1, 20, 20), 151, t0, ("a", "late")),
            CommandResponse::Superseded
        );
        assert_eq!(
            apply_marked(&sm, (1, 10, 10), 152, t0, ("a", "late")),
            CommandResponse::Superseded
        );
        assert_eq!(
            apply_marked(&sm, (1, 21, 0), 153, t0, ("a", "late")),
            CommandResponse::Superseded,
            "a late copy proposed without a mark is held to the stored one"
        );
        assert_eq!(
            value("a").as_deref(),
            Some(&b"1"[..]),
            "a late copy applied"
        );

        // Another session is not affected.
        assert_eq!(
            apply_marked(&sm, (2, 20, 20), 153, t0, ("d", "z")),
            CommandResponse::Put { version: 153 }
        );
        assert_eq!(
            apply_marked(&sm, (3, 5, 0), 153, t0, ("d", "z")),
            CommandResponse::Put { version: 153 },
            "an id of a session without a mark applies as before"
        );

        // Opened again (a restart), the range finds the mark in the store.
        let sm = open_range_5(&engine, dir.path(), window);
        assert_eq!(
            apply_marked(&sm, (1, 20, 20), 154, t0, ("a", "late")),
            CommandResponse::Superseded
        );

        // The mark outlives the records it made go by the grace for clock
        // differences: a command proposed that much later no longer finds it.
        let later = t0 + window.as_millis() as u64 + crate::storage::DEDUP_PURGE_GRACE_MS;
        assert_eq!(
            apply_marked(&sm, (1, 20, 20), 155, later - 1, ("e", "1")),
            CommandResponse::Superseded
        );
        assert_eq!(
            apply_marked(&sm, (1, 20, 20), 156, later, ("e", "2")),
            CommandResponse::Put { version: 156 }
        );
    }

    #[test]
    fn session_records_stay_bounded() {
        let mut r = SessionRecords::default();
        for n in 0..SESSION_RECORDS_MAX as u64 + 10 {
            r.insert([1; 8], n, 0, 1_000);
        }
        assert_eq!(
            r.total, SESSION_RECORDS_MAX,
            "full: later records untracked"
        );
        // Session 1 idle for a whole window: forgotten at the next prune.
        r.insert([2; 8], 7, 1_000, 1_000);
        assert_eq!(r.total, SESSION_RECORDS_MAX, "no prune before its time");
        r.insert([2; 8], 7, SESSION_PRUNE_EVERY_MS, 1_000);
        assert_eq!(r.total, 1);
        assert_eq!(r.take_below(&[2; 8], 8), vec![7]);
        assert_eq!(r.total, 0);
        assert!(r.by_session.is_empty());
    }

    fn nodes(ids: &[u64]) -> BTreeMap<u64, BasicNode> {
        ids.iter()
            .map(|id| (*id, BasicNode::new(format!("127.0.0.1:{id}"))))
            .collect()
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_split_during_a_move_gives_the_new_range_the_target_voters_and_no_learner() {
        // Parent mid-move: joint {1,2,3} -> {1,2,4}, node 5 being added as a learner.
        let m = MembershipOf::<TypeConfig>::new(
            vec![set(&[1, 2, 3]), set(&[1, 2, 4])],
            nodes(&[1, 2, 3, 4, 5]),
        )
        .unwrap();
        let right = split_membership(&m);
        assert_eq!(right.get_joint_config(), &vec![set(&[1, 2, 4])]);
        assert_eq!(right.learner_ids().count(), 0);
        assert_eq!(
            right.get_node(&4).map(|n| n.addr.as_str()),
            Some("127.0.0.1:4")
        );
        assert!(right.get_node(&3).is_none() && right.get_node(&5).is_none());
    }

    #[test]
    fn a_split_of_a_settled_range_keeps_its_members() {
        let m = MembershipOf::<TypeConfig>::new(vec![set(&[1, 2, 3])], nodes(&[1, 2, 3])).unwrap();
        assert_eq!(split_membership(&m), m);
    }
}
