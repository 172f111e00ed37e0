//! [`RouteCache`]: which range holds a key, who leads it, and where its
//! replicas live.
//!
//! Range descriptors are kept in an ordered map by start key. The map never
//! holds two overlapping ranges: inserting a descriptor evicts every
//! overlapping one it is newer than, and is itself dropped when an overlapping
//! entry is newer (a late answer must not undo a split the cache already
//! knows). The map is bounded by [`ROUTE_CACHE_RANGES_MAX`]; beyond it an
//! arbitrary entry goes, which only costs one more lookup later.
//!
//! A miss is answered by a `Locate` call to the meta range. Concurrent misses
//! for the same key share one call, and at most [`LOCATE_IN_FLIGHT_MAX`] calls
//! run at once; a miss that waited for a slot first looks again, since an
//! answer that arrived meanwhile (with its prefetched neighbours) may cover it.
//! Each lookup runs on its own task, to its own deadline: a caller that gives
//! up (its deadline passed, or it was cancelled) leaves the lookup to finish
//! for the others and to free its slot. At most [`LOCATE_WAITING_MAX`] lookups
//! are under way or waiting for a slot; a miss beyond that fails at once with
//! a retryable error.
//!
//! Routing errors heal the cache without another lookup where they carry the
//! answer: `NotLeader` names the leader, `EpochMismatch` and `KeyNotInRange`
//! carry the current descriptors. `RangeNotFound` says the node left the
//! range: `heal` drops the entry and the next call locates it again (a range
//! call first asks the descriptor's other replicas, and drops it only when
//! none of them is left).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::range::{epoch, is_newer, spans_overlap};
use lmskv_proto::v1::{RangeDescriptor, RangeInfo};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::ClientError;

/// Ranges the cache holds at most.
pub const ROUTE_CACHE_RANGES_MAX: usize = 100_000;
/// `Locate` calls one client runs at once at most.
pub const LOCATE_IN_FLIGHT_MAX: usize = 32;
/// Lookups one client has under way or waiting for a `Locate` slot at most.
pub const LOCATE_WAITING_MAX: usize = 1_024;
/// How long one route lookup (the wait for a `Locate` slot and the calls to
/// the meta range, retried) runs at most, whoever waits for it: the default
/// deadline of a call.
pub const LOCATE_DEADLINE: Duration = Duration::from_secs(15);
/// Node addresses the cache remembers at most.
pub const NODE_ADDRESSES_MAX: usize = 4_096;
/// A range is evicted for a replica's `RangeNotFound` at most this often.
pub const NOT_FOUND_EVICT_EVERY: Duration = Duration::from_secs(1);
/// Ranges whose last such eviction is remembered at most.
pub const NOT_FOUND_EVICTIONS_MAX: usize = 1_024;

/// A cached range: its descriptor and the leader last seen (0: unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRange {
    pub desc: RangeDescriptor,
    pub leader_id: u64,
}

impl CachedRange {
    /// Whether the range holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        lmskv_proto::range::contains(&self.desc, key)
    }

    /// Whether the range holds the keys just below the exclusive bound `end`
    /// (empty: the end of the key space).
    pub fn holds_below(&self, end: &[u8]) -> bool {
        if end.is_empty() {
            return self.desc.end_key.is_empty();
        }
        self.desc.start_key.as_ref() < end
            && (self.desc.end_key.is_empty() || self.desc.end_key.as_ref() >= end)
    }

    /// Whether the range answers a lookup of `key` (`reverse`: below `key`).
    pub fn answers(&self, key: &[u8], reverse: bool) -> bool {
        if reverse {
            self.holds_below(key)
        } else {
            self.contains(key)
        }
    }
}

type LocateResult = Result<Arc<Vec<CachedRange>>, ClientError>;
type SharedLocate = Shared<BoxFuture<'static, LocateResult>>;
/// Lookups in flight: (key, reverse) → (lookup id, its shared answer).
type Inflight = HashMap<(Bytes, bool), (u64, SharedLocate)>;

/// The route cache. Cheap to share: lookups take a read lock.
#[derive(Debug)]
pub struct RouteCache {
    state: Arc<RwLock<RouteMap>>,
    inflight: Arc<Mutex<Inflight>>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
    locates: Arc<AtomicU64>,
    /// When each range was last evicted for a replica that answered
    /// `RangeNotFound` (see [`RouteCache::evict_after_not_found`]); at most
    /// [`NOT_FOUND_EVICTIONS_MAX`] entries.
    not_found_evicted: Mutex<HashMap<u64, Instant>>,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache::with_capacity(ROUTE_CACHE_RANGES_MAX)
    }
}

impl RouteCache {
    /// A cache holding at most `capacity` ranges.
    pub fn with_capacity(capacity: usize) -> Self {
        RouteCache {
            state: Arc::new(RwLock::new(RouteMap::new(capacity.max(1)))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            permits: Arc::new(Semaphore::new(LOCATE_IN_FLIGHT_MAX)),
            next_id: AtomicU64::new(0),
            locates: Arc::new(AtomicU64::new(0)),
            not_found_evicted: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the range after a call succeeded on one replica when another
    /// the cached descriptor names answered `RangeNotFound` (it may have
    /// moved away), at most once per [`NOT_FOUND_EVICT_EVERY`] per range: a
    /// replica that is only not ready yet (a learner importing its
    /// snapshot, a node opening its ranges) is still in the descriptor the
    /// next lookup returns, and must not cost a lookup on every call.
    /// Returns whether it evicted.
    pub fn evict_after_not_found(&self, range_id: u64) -> bool {
        let now = Instant::now();
        {
            let mut m = self.not_found_evicted.lock().expect("evictions lock");
            if m.get(&range_id)
                .is_some_and(|t| now.duration_since(*t) < NOT_FOUND_EVICT_EVERY)
            {
                return false;
            }
            if m.len() >= NOT_FOUND_EVICTIONS_MAX {
                m.retain(|_, t| now.duration_since(*t) < NOT_FOUND_EVICT_EVERY);
                if m.len() >= NOT_FOUND_EVICTIONS_MAX {
                    return false;
                }
            }
            m.insert(range_id, now);
        }
        self.evict(range_id);
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RouteMap> {
        self.state.read().expect("route cache lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RouteMap> {
        self.state.write().expect("route cache lock")
    }

    /// The cached range holding `key` (`reverse`: the keys just below `key`).
    pub fn get(&self, key: &[u8], reverse: bool) -> Option<CachedRange> {
        self.read().lookup(key, reverse).cloned()
    }

    /// The cached range with this id.
    pub fn get_by_id(&self, range_id: u64) -> Option<CachedRange> {
        self.read().by_id(range_id).cloned()
    }

    /// Whether the cache holds every range in `ids`.
    pub fn holds_all(&self, mut ids: impl Iterator<Item = u64>) -> bool {
        let map = self.read();
        ids.all(|id| map.by_id(id).is_some())
    }

    /// Whether, at one moment, the cache holds range `range_id` at split
    /// version `version` and every range in `ids`. Cached ranges never
    /// overlap, so a range split (directly or not) from `range_id` after
    /// that version is then not among `ids`.
    pub fn holds_at_version_and_all(
        &self,
        range_id: u64,
        version: u64,
        mut ids: impl Iterator<Item = u64>,
    ) -> bool {
        let map = self.read();
        map.by_id(range_id)
            .is_some_and(|r| epoch(&r.desc).version == version)
            && ids.all(|id| map.by_id(id).is_some())
    }

    /// Start keys of cached ranges strictly inside `(lo, hi)` (`hi` empty:
    /// no upper bound), in key order, at most `max`. Cached ranges never
    /// overlap, so these cut the span into pieces that each start a range.
    pub fn boundaries(&self, lo: &[u8], hi: &[u8], max: usize) -> Vec<Bytes> {
        self.read()
            .ranges
            .range::<[u8], _>((Bound::Excluded(lo), Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| hi.is_empty() || k.as_ref() < hi)
            .take(max)
            .cloned()
            .collect()
    }

    /// Ranges cached.
    pub fn len(&self) -> usize {
        self.read().ranges.len()
    }

    /// Whether no range is cached.
    pub fn is_empty(&self) -> bool {
        self.read().ranges.is_empty()
    }

    /// `Locate` calls made so far (misses that were not coalesced).
    pub fn locates(&self) -> u64 {
        self.locates.load(Ordering::Relaxed)
    }

    /// The address of node `node_id`, when known.
    pub fn address(&self, node_id: u64) -> Option<String> {
        self.read().addresses.get(&node_id).cloned()
    }

    /// Records the address of a node.
    pub fn set_address(&self, node_id: u64, address: &str) {
        if node_id != 0 && !address.is_empty() {
            self.write().set_address(node_id, address);
        }
    }

    /// Inserts a descriptor (leader unknown); returns whether it was taken.
    pub fn insert(&self, desc: RangeDescriptor) -> bool {
        self.write().insert(CachedRange { desc, leader_id: 0 })
    }

    /// Inserts what a `Locate` or `RangeList` answered: descriptors, leaders
    /// and node addresses. Returns the ranges as answered.
    pub fn insert_infos(&self, infos: Vec<RangeInfo>) -> Vec<CachedRange> {
        self.write().insert_infos(infos)
    }

    /// The range's leader is `node_id` (at `address`, when given).
    pub fn set_leader(&self, range_id: u64, node_id: u64, address: Option<&str>) {
        let mut m = self.write();
        if let Some(a) = address.filter(|a| !a.is_empty()) {
            m.set_address(node_id, a);
        }
        if let Some(r) = m.by_id_mut(range_id) {
            r.leader_id = node_id;
        }
    }

    /// `node_id` turned out not to lead the range (or could not be reached).
    pub fn clear_leader(&self, range_id: u64, node_id: u64) {
        if let Some(r) = self.write().by_id_mut(range_id) {
            if r.leader_id == node_id {
                r.leader_id = 0;
            }
        }
    }

    /// Drops the range: the next call for its keys locates it again.
    pub fn evict(&self, range_id: u64) {
        self.write().remove_id(range_id);
    }

    /// Heals the cache from a routing error about `range_id` answered by
    /// `node_id`: inserts the descriptors it carries, or drops the range
    /// when it carries none. Returns whether the error carried an answer
    /// newer than the cache (false for a replica behind it, which is then
    /// no longer taken for the range's leader).
    pub fn heal(&self, err: &ServerError, node_id: u64) -> bool {
        match err {
            ServerError::NotLeader {
                range_id,
                leader: Some(h),
            } if h.node_id != 0 => {
                self.set_leader(*range_id, h.node_id, Some(&h.address));
                true
            }
            ServerError::NotLeader { range_id, .. } => {
                self.clear_leader(*range_id, node_id);
                false
            }
            ServerError::EpochMismatch { range_id, current } => {
                self.heal_with(*range_id, node_id, current.iter().cloned())
            }
            ServerError::KeyNotInRange { range_id, current } => {
                self.heal_with(*range_id, node_id, current.iter().cloned())
            }
            ServerError::RangeNotFound { range_id } => {
                self.evict(*range_id);
                false
            }
            _ => false,
        }
    }

    fn heal_with(
        &self,
        range_id: u64,
        node_id: u64,
        current: impl Iterator<Item = RangeDescriptor>,
    ) -> bool {
        let mut m = self.write();
        let cached = m.by_id(range_id).map(|r| r.desc.clone());
        let before = cached.as_ref().map(epoch);
        let mut any = false;
        let mut answer_older = false;
        for d in current {
            any = true;
            if d.range_id == range_id && cached.as_ref().is_some_and(|c| is_newer(c, &d)) {
                answer_older = true;
            }
            m.insert(CachedRange {
                desc: d,
                leader_id: 0,
            });
        }
        // The answering replica has not applied what the cache already
        // knows (a follower behind a split): the cached view is the newer
        // one, and dropping it would send every caller to the meta range
        // until that replica catches up. Not healed: the call backs off.
        // A leader behind the cache (deposed, or not yet applying what it
        // committed) is forgotten, so that writes and STRONG reads look for
        // the leader instead of asking it again until it catches up.
        if answer_older {
            drop(m);
            self.clear_leader(range_id, node_id);
            return false;
        }
        // The error says the cached view of this range is stale: when the
        // answer did not replace it, drop it so that the next call asks the
        // meta range.
        if !any || (before.is_some() && m.by_id(range_id).map(|r| epoch(&r.desc)) == before) {
            m.remove_id(range_id);
        }
        any
    }

    /// The range holding `key` (`reverse`: just below `key`), from the cache
    /// or, on a miss, from `fetch` (a `Locate` call, given the lookup's
    /// deadline). Concurrent misses for the same key share one fetch.
    pub async fn locate<F, Fut>(
        &self,
        key: &[u8],
        reverse: bool,
        fetch: F,
    ) -> Result<CachedRange, ClientError>
    where
        F: FnOnce(Instant) -> Fut,
        Fut: Future<Output = Result<Vec<RangeInfo>, ClientError>> + Send + 'static,
    {
        if let Some(r) = self.get(key, reverse) {
            return Ok(r);
        }
        let slot = (Bytes::copy_from_slice(key), reverse);
        let shared = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(&slot) {
                Some((_, s)) => s.clone(),
                None if inflight.len() >= LOCATE_WAITING_MAX => {
                    return Err(ClientError::Server(ServerError::unavailable(format!(
                        "{LOCATE_WAITING_MAX} range lookups are already under way"
                    ))));
                }
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let until = Instant::now() + LOCATE_DEADLINE;
                    let fut = self.locate_task(id, slot.clone(), until, fetch(until));
                    inflight.insert(slot, (id, fut.clone()));
                    fut
                }
            }
        };
        let ranges = shared.await?;
        ranges
            .iter()
            .find(|r| r.answers(key, reverse))
            .cloned()
            .ok_or_else(|| {
                ClientError::Server(ServerError::unavailable(
                    "the meta range's answer does not cover the key",
                ))
            })
    }

    fn locate_task<Fut>(
        &self,
        id: u64,
        slot: (Bytes, bool),
        until: Instant,
        fetch: Fut,
    ) -> SharedLocate
    where
        Fut: Future<Output = Result<Vec<RangeInfo>, ClientError>> + Send + 'static,
    {
        let state = self.state.clone();
        let inflight = self.inflight.clone();
        let permits = self.permits.clone();
        let locates = self.locates.clone();
        /// Takes the lookup out of `inflight` however its task ends (a panic
        /// or the runtime's shutdown included), unless a newer one took its
        /// place.
        struct Forget {
            inflight: Arc<Mutex<Inflight>>,
            slot: (Bytes, bool),
            id: u64,
        }
        impl Drop for Forget {
            fn drop(&mut self) {
                if let Ok(mut map) = self.inflight.lock() {
                    if map.get(&self.slot).is_some_and(|(i, _)| *i == self.id) {
                        map.remove(&self.slot);
                    }
                }
            }
        }
        // The lookup runs on its own task, so that it ends (and frees its
        // slot and its entry in `inflight`) by `until` even when every caller
        // waiting for it gave up.
        let task = tokio::spawn(async move {
            let _forget = Forget {
                inflight,
                slot: slot.clone(),
                id,
            };
            let result = async {
                let _permit = permits.acquire_owned().await.map_err(|_| {
                    ClientError::Server(ServerError::unavailable("client shutting down"))
                })?;
                // An answer that arrived while this lookup waited may cover it.
                let hit = state
                    .read()
                    .expect("route cache lock")
                    .lookup(&slot.0, slot.1)
                    .cloned();
                if let Some(r) = hit {
                    return Ok(Arc::new(vec![r]));
                }
                locates.fetch_add(1, Ordering::Relaxed);
                let infos = fetch.await?;
                let ranges = state.write().expect("route cache lock").insert_infos(infos);
                Ok(Arc::new(ranges))
            };
            tokio::time::timeout_at(until, result)
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Server(ServerError::Timeout {
                        reason: format!("the range lookup ran out of its {LOCATE_DEADLINE:?}"),
                    }))
                })
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(ClientError::Server(ServerError::unavailable(format!(
                    "range lookup failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared()
    }

    /// Checks that no two cached ranges overlap. Linear; for tests.
    pub fn check_invariants(&self) {
        self.read().check_all();
    }
}

/// The ordered map itself, behind the cache's lock.
#[derive(Debug)]
struct RouteMap {
    /// Start key → range. Ranges never overlap.
    ranges: BTreeMap<Bytes, CachedRange>,
    /// Range id → start key of its entry in `ranges`.
    ids: HashMap<u64, Bytes>,
    /// Node id → `HOST:PORT`.
    addresses: HashMap<u64, String>,
    capacity: usize,
}

impl RouteMap {
    fn new(capacity: usize) -> Self {
        RouteMap {
            ranges: BTreeMap::new(),
            ids: HashMap::new(),
            addresses: HashMap::new(),
            capacity,
        }
    }

    fn lookup(&self, key: &[u8], reverse: bool) -> Option<&CachedRange> {
        let cand = if reverse {
            if key.is_empty() {
                self.ranges.values().next_back()
            } else {
                self.ranges
                    .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(key)))
                    .next_back()
                    .map(|(_, r)| r)
            }
        } else {
            self.ranges
                .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
                .next_back()
                .map(|(_, r)| r)
        };
        cand.filter(|r| r.answers(key, reverse))
    }

    fn by_id(&self, range_id: u64) -> Option<&CachedRange> {
        self.ids.get(&range_id).and_then(|k| self.ranges.get(k))
    }

    fn by_id_mut(&mut self, range_id: u64) -> Option<&mut CachedRange> {
        let k = self.ids.get(&range_id)?;
        self.ranges.get_mut(k)
    }

    fn remove_id(&mut self, range_id: u64) -> Option<CachedRange> {
        let k = self.ids.remove(&range_id)?;
        self.ranges.remove(&k)
    }

    fn set_address(&mut self, node_id: u64, address: &str) {
        if self.addresses.get(&node_id).map(String::as_str) == Some(address) {
            return;
        }
        if self.addresses.len() >= NODE_ADDRESSES_MAX && !self.addresses.contains_key(&node_id) {
            if let Some(victim) = self.addresses.keys().next().copied() {
                self.addresses.remove(&victim);
            }
        }
        self.addresses.insert(node_id, address.to_string());
    }

    /// Start keys of the cached ranges that overlap `[start, end)`.
    fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if let Some((k, r)) = self
            .ranges
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(start)))
            .next_back()
        {
            if spans_overlap((start, end), (&r.desc.start_key, &r.desc.end_key)) {
                out.push(k.clone());
            }
        }
        for (k, _) in self
            .ranges
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
        {
            if !end.is_empty() && k.as_ref() >= end {
                break;
            }
            out.push(k.clone());
        }
        out
    }

    /// Inserts `r` unless a cached range it overlaps (or its own older
    /// entry) is newer; evicts everything it supersedes.
    fn insert(&mut self, mut r: CachedRange) -> bool {
        let (start, end) = (r.desc.start_key.clone(), r.desc.end_key.clone());
        if !end.is_empty() && start >= end {
            debug_assert!(false, "empty range span in descriptor {:?}", r.desc);
            return false;
        }
        let overlapping = self.overlapping(&start, &end);
        let same_id = self.by_id(r.desc.range_id).cloned();
        for k in &overlapping {
            let e = &self.ranges[k];
            if !supersedes(&r.desc, &e.desc) {
                return false;
            }
        }
        if let Some(old) = &same_id {
            if is_newer(&old.desc, &r.desc) {
                return false;
            }
            // Keep a known leader if it is still a replica.
            if r.leader_id == 0 && old.desc.replicas.iter().any(|p| p.node_id == old.leader_id) {
                let still = r.desc.replicas.iter().any(|p| p.node_id == old.leader_id);
                if still {
                    r.leader_id = old.leader_id;
                }
            }
            self.remove_id(r.desc.range_id);
        }
        for k in overlapping {
            if let Some(e) = self.ranges.remove(&k) {
                self.ids.remove(&e.desc.range_id);
            }
        }
        self.ids.insert(r.desc.range_id, start.clone());
        self.ranges.insert(start.clone(), r);
        self.check_neighbours(&start);
        self.enforce_capacity(&start);
        debug_assert_eq!(self.ids.len(), self.ranges.len());
        true
    }

    fn insert_infos(&mut self, infos: Vec<RangeInfo>) -> Vec<CachedRange> {
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            for (node, addr) in &info.addresses {
                self.set_address(*node, addr);
            }
            let Some(desc) = info.descriptor else {
                continue;
            };
            let r = CachedRange {
                desc,
                leader_id: info.leader_id,
            };
            self.insert(r.clone());
            out.push(r);
        }
        out
    }

    /// The ranges just before and after the one at `start` do not overlap it.
    fn check_neighbours(&self, start: &Bytes) {
        let me = &self.ranges[start];
        let prev = self
            .ranges
            .range::<Bytes, _>((Bound::Unbounded, Bound::Excluded(start)))
            .next_back();
        let next = self
            .ranges
            .range::<Bytes, _>((Bound::Excluded(start), Bound::Unbounded))
            .next();
        for (_, n) in prev.into_iter().chain(next) {
            assert!(
                !spans_overlap(
                    (&me.desc.start_key, &me.desc.end_key),
                    (&n.desc.start_key, &n.desc.end_key)
                ),
                "route cache holds overlapping ranges {} and {}",
                me.desc.range_id,
                n.desc.range_id
            );
        }
    }

    fn check_all(&self) {
        let mut prev: Option<&CachedRange> = None;
        for (k, r) in &self.ranges {
            assert_eq!(k, &r.desc.start_key);
            assert_eq!(self.ids.get(&r.desc.range_id), Some(k));
            if let Some(p) = prev {
                assert!(
                    !p.desc.end_key.is_empty() && p.desc.end_key <= r.desc.start_key,
                    "ranges {} and {} overlap",
                    p.desc.range_id,
                    r.desc.range_id
                );
            }
            prev = Some(r);
        }
        assert_eq!(self.ids.len(), self.ranges.len());
        assert!(self.ranges.len() <= self.capacity);
    }

    /// Evicts an arbitrary range other than `keep` while over capacity.
    fn enforce_capacity(&mut self, keep: &Bytes) {
        while self.ranges.len() > self.capacity {
            let probe = Bytes::copy_from_slice(&rand::random::<[u8; 8]>());
            let victim = self
                .ranges
                .range::<Bytes, _>((Bound::Included(&probe), Bound::Unbounded))
                .map(|(k, _)| k)
                .find(|k| *k != keep)
                .or_else(|| self.ranges.keys().find(|k| *k != keep))
                .cloned();
            match victim {
                Some(k) => {
                    if let Some(e) = self.ranges.remove(&k) {
                        self.ids.remove(&e.desc.range_id);
                    }
                }
                None => break,
            }
        }
    }
}

/// Whether `new` may replace the overlapping cached `old`: it is the same
/// range at a newer or equal epoch, or another range whose split/merge
/// version is at least as new.
fn supersedes(new: &RangeDescriptor, old: &RangeDescriptor) -> bool {
    if new.range_id == old.range_id {
        return !is_newer(old, new);
    }
    epoch(new).version >= epoch(old).version
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use lmskv_proto::error::LeaderHint;
    use lmskv_proto::v1::{RangeEpoch, Replica};

    use super::*;

    fn desc(id: u64, start: &str, end: &str, version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: Bytes::copy_from_slice(start.as_bytes()),
            end_key: Bytes::copy_from_slice(end.as_bytes()),
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version,
            }),
            replicas: (1..=3)
                .map(|n| Replica {
                    node_id: n,
                    role: 0,
                })
                .collect(),
        }
    }

    fn info(d: RangeDescriptor, leader: u64) -> RangeInfo {
        RangeInfo {
            descriptor: Some(d),
            leader_id: leader,
            addresses: (1..=3).map(|n| (n, format!("127.0.0.1:700{n}"))).collect(),
            ..Default::default()
        }
    }

    fn id_at(c: &RouteCache, key: &str) -> Option<u64> {
        c.get(key.as_bytes(), false).map(|r| r.desc.range_id)
    }

    #[tokio::test]
    async fn a_range_is_evicted_for_a_missing_replica_at_most_once_a_second() {
        let c = RouteCache::default();
        c.insert(desc(2, "\x01", "m", 1));
        assert!(c.evict_after_not_found(2));
        assert!(c.get_by_id(2).is_none());
        c.insert(desc(2, "\x01", "m", 1));
        assert!(!c.evict_after_not_found(2), "again within the second");
        assert!(c.get_by_id(2).is_some());
        assert!(c.evict_after_not_found(3), "another range is apart");
        tokio::time::sleep(NOT_FOUND_EVICT_EVERY).await;
        assert!(c.evict_after_not_found(2));
        assert!(c.get_by_id(2).is_none());
    }

    #[test]
    fn lookup_by_key_and_below_a_key() {
        let c = RouteCache::default();
        c.insert(desc(2, "\x01", "m", 1));
        c.insert(desc(3, "m", "t", 1));
        c.insert(desc(4, "t", "", 1));
        assert_eq!(id_at(&c, "a"), Some(2));
        assert_eq!(id_at(&c, "m"), Some(3));
        assert_eq!(id_at(&c, "s~"), Some(3));
        assert_eq!(id_at(&c, "zzz"), Some(4));
        assert_eq!(id_at(&c, "\x00"), None, "the meta span is not cached");
        let below = |k: &str| c.get(k.as_bytes(), true).map(|r| r.desc.range_id);
        assert_eq!(below("m"), Some(2), "the keys below m live in range 2");
        assert_eq!(below("m\x00"), Some(3));
        assert_eq!(below("t"), Some(3));
        assert_eq!(below(""), Some(4), "empty means the end of the key space");
        assert_eq!(below("\x01"), None);
        c.check_invariants();
    }

    #[test]
    fn a_newer_descriptor_evicts_what_it_overlaps() {
        let c = RouteCache::default();
        c.insert(desc(2, "\x01", "", 1));
        // Range 2 split twice; the right-hand halves arrive first.
        assert!(c.insert(desc(3, "m", "t", 2)));
        assert_eq!(id_at(&c, "a"), None, "the stale parent is gone");
        assert_eq!(id_at(&c, "n"), Some(3));
        assert!(c.insert(desc(2, "\x01", "m", 2)));
        assert!(c.insert(desc(4, "t", "", 2)));
        assert_eq!(c.len(), 3);
        c.check_invariants();
        // A late answer with the parent's old span is refused.
        assert!(!c.insert(desc(2, "\x01", "", 1)));
        assert_eq!(id_at(&c, "n"), Some(3));
        c.check_invariants();
        // A merge (newer version) replaces both halves it covers.
        assert!(c.insert(desc(3, "m", "", 3)));
        assert_eq!(id_at(&c, "z"), Some(3));
        assert_eq!(c.len(), 2);
        c.check_invariants();
    }

    #[test]
    fn the_map_is_bounded() {
        let c = RouteCache::with_capacity(10);
        for i in 0..100u32 {
            let (s, e) = (format!("k{i:04}"), format!("k{:04}", i + 1));
            c.insert(desc(u64::from(i) + 2, &s, &e, 1));
            assert!(c.len() <= 10);
        }
        assert!(id_at(&c, "k0099").is_some(), "the newest entry stays");
        c.check_invariants();
    }

    #[test]
    fn routing_errors_heal_the_cache() {
        let c = RouteCache::default();
        c.insert_infos(vec![info(desc(2, "\x01", "", 1), 1)]);
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 1);

        // NotLeader with a hint moves the leader and learns its address.
        let healed = c.heal(
            &ServerError::NotLeader {
                range_id: 2,
                leader: Some(LeaderHint {
                    node_id: 4,
                    address: "127.0.0.1:7004".into(),
                }),
            },
            1,
        );
        assert!(healed);
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 4);
        assert_eq!(c.address(4).as_deref(), Some("127.0.0.1:7004"));

        // Without a hint the leader is forgotten, and only if it was the one asked.
        c.heal(
            &ServerError::NotLeader {
                range_id: 2,
                leader: None,
            },
            3,
        );
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 4);
        c.heal(
            &ServerError::NotLeader {
                range_id: 2,
                leader: None,
            },
            4,
        );
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 0);

        // EpochMismatch after a split carries both halves.
        assert!(c.heal(
            &ServerError::EpochMismatch {
                range_id: 2,
                current: vec![desc(2, "\x01", "m", 2), desc(5, "m", "", 2)],
            },
            1,
        ));
        assert_eq!(id_at(&c, "a"), Some(2));
        assert_eq!(id_at(&c, "x"), Some(5));

        // A replica behind the split answers with the range before it: the
        // cache keeps the newer halves, and forgets that replica as leader
        // (only when it was the one asked).
        c.set_leader(2, 3, None);
        let behind = ServerError::EpochMismatch {
            range_id: 2,
            current: vec![desc(2, "\x01", "", 1)],
        };
        assert!(!c.heal(&behind, 1));
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 3);
        assert!(!c.heal(&behind, 3));
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 0);
        assert_eq!(id_at(&c, "a"), Some(2));
        assert_eq!(id_at(&c, "x"), Some(5));

        // KeyNotInRange carries the range's current descriptor.
        assert!(c.heal(
            &ServerError::KeyNotInRange {
                range_id: 5,
                current: Some(desc(5, "m", "s", 3)),
            },
            1,
        ));
        assert_eq!(id_at(&c, "n"), Some(5));
        assert_eq!(id_at(&c, "x"), None, "the rest must be located again");

        // RangeNotFound drops the range.
        assert!(!c.heal(&ServerError::RangeNotFound { range_id: 5 }, 2));
        assert_eq!(id_at(&c, "n"), None);
        // An EpochMismatch that carries nothing drops the range too.
        c.heal(
            &ServerError::EpochMismatch {
                range_id: 2,
                current: vec![],
            },
            1,
        );
        assert_eq!(c.len(), 0);
        c.check_invariants();
    }

    #[test]
    fn a_leader_survives_a_newer_descriptor_that_keeps_it_as_replica() {
        let c = RouteCache::default();
        c.insert_infos(vec![info(desc(2, "\x01", "", 1), 2)]);
        c.insert(desc(2, "\x01", "m", 2));
        assert_eq!(c.get(b"a", false).unwrap().leader_id, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_share_one_locate() {
        let c = Arc::new(RouteCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.locate(b"user/1", false, move |_| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Long enough that every task joins the one in flight.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(vec![
                        info(desc(2, "\x01", "v", 1), 1),
                        info(desc(3, "v", "", 1), 2),
                    ])
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().desc.range_id, 2);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.locates(), 1);
        // The prefetched neighbour answers without another call.
        let r = c
            .locate(b"w", false, |_| async { panic!("no locate expected") })
            .await
            .unwrap();
        assert_eq!(r.desc.range_id, 3);
        assert!(c.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lookups_whose_callers_gave_up_still_finish_and_free_their_slots() {
        let c = RouteCache::default();
        // More callers than slots give up long before their lookups end.
        for i in 0..LOCATE_IN_FLIGHT_MAX + 8 {
            let key = format!("k{i}");
            let r = tokio::time::timeout(
                Duration::from_millis(20),
                c.locate(key.as_bytes(), false, |_| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err(ClientError::Server(ServerError::unavailable("down")))
                }),
            )
            .await;
            assert!(r.is_err(), "the caller gave up");
        }
        // A new lookup still gets a slot once those end.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.locate(b"fresh", false, |_| async {
                Ok(vec![info(desc(2, "\x01", "", 1), 1)])
            }),
        )
        .await
        .expect("a slot is free again")
        .unwrap();
        assert_eq!(r.desc.range_id, 2);
        for _ in 0..100 {
            if c.inflight.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(c.inflight.lock().unwrap().is_empty(), "every lookup ended");
        assert_eq!(c.permits.available_permits(), LOCATE_IN_FLIGHT_MAX);
    }

    #[tokio::test]
    async fn lookups_beyond_the_bound_fail_at_once_and_retryably() {
        let c = Arc::new(RouteCache::default());
        // The fetches wait for this gate, so every lookup stays under way.
        let gate = Arc::new(Semaphore::new(0));
        let mut waiting = Vec::new();
        for i in 0..LOCATE_WAITING_MAX {
            let (c, gate) = (c.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                let key = format!("k{i}");
                c.locate(key.as_bytes(), false, move |_| async move {
                    let _open = gate.acquire().await;
                    Ok(vec![info(desc(2, "\x01", "", 1), 1)])
                })
                .await
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            while c.inflight.lock().unwrap().len() < LOCATE_WAITING_MAX {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every lookup registered");
        let e = c
            .locate(b"one more", false, |_| async { panic!("not called") })
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        gate.add_permits(LOCATE_WAITING_MAX);
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap().desc.range_id, 2);
        }
    }

    #[tokio::test]
    async fn a_failed_locate_is_not_cached() {
        let c = RouteCache::default();
        let r = c
            .locate(b"a", false, |_| async {
                Err(ClientError::Server(ServerError::unavailable("down")))
            })
            .await;
        assert!(r.is_err());
        let r = c
            .locate(b"a", false, |_| async {
                Ok(vec![info(desc(2, "\x01", "", 1), 1)])
            })
            .await
            .unwrap();
        assert_eq!(r.desc.range_id, 2);
    }
}
