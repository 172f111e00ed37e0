//! [`ReadCache`]: the client's bounded read cache (LRU + TTL, on `moka`).
//!
//! Reads at any level fill it; only the levels that allow stale data read
//! from it: EVENTUAL takes any entry younger than the TTL, and
//! BOUNDED_STALENESS(max) takes an entry only when its value is *proven*
//! current at most `max` ago (`fresh_at`, set by STRONG and bounded reads and
//! by the client's own acknowledged writes; a value read from some replica's
//! local state proves nothing and is good for EVENTUAL only).
//!
//! The client's own writes invalidate a key before they are sent and, if
//! the cache holds the key, store the acknowledged state afterwards (writes
//! add no entries, so they never push out what the client reads). A per-key
//! fence stops a read that was in flight across such an invalidation from
//! putting the older state back. Every change of an entry happens under the
//! lock of the key's fence slot, so a fill and an invalidation of one key
//! are serialised. An entry carries the fence count it was stored under and
//! is used only while the count is unchanged, so invalidating is a counter
//! bump, not a removal: a put costs the cache one lookup, and one insert if
//! the key is cached. (moka's per-key compute lock, used before, adds and
//! removes an entry of a second concurrent map per call, and removing then
//! reinserting every written key kept moka's map rehashing; together about a
//! third of the client's CPU under puts.)
//!
//! Both the entry count and the bytes are bounded: each entry is charged at
//! least `bytes_max / entries_max` of the byte capacity, so neither bound can
//! be exceeded (beyond what moka holds until its next maintenance step).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_proto::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::client::{KeyValue, ReadConsistency};

/// Entries the read cache holds by default.
pub const READ_CACHE_ENTRIES_MAX_DEFAULT: u64 = 10_000;
/// Bytes (keys, values and bookkeeping) the read cache holds by default.
pub const READ_CACHE_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// How long a cached read stays usable by default.
pub const READ_CACHE_TTL_DEFAULT: Duration = Duration::from_secs(5);
/// The longest TTL a read cache accepts.
pub const READ_CACHE_TTL_MAX: Duration = Duration::from_secs(3_600);
/// Bookkeeping charged per entry on top of its key and value bytes.
const ENTRY_OVERHEAD_BYTES: u64 = 96;
/// The largest charge of one entry: the largest key and value plus bookkeeping.
const ENTRY_BYTES_MAX: u64 = KEY_BYTES_MAX as u64 + VALUE_BYTES_MAX as u64 + ENTRY_OVERHEAD_BYTES;
/// Fence slots; keys share a slot (and its lock) by hash, so a write to one
/// key also retires the cached entries of the keys sharing its slot and may
/// stop a concurrent fill of one, which only costs later misses.
const FENCE_SLOTS: usize = 16_384;

/// The bounds of a client's read cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCacheConfig {
    /// Entries held at most.
    pub entries_max: u64,
    /// Bytes of keys, values and per-entry bookkeeping held at most.
    pub bytes_max: u64,
    /// How long after it was stored an entry may serve an EVENTUAL read.
    pub ttl: Duration,
}

impl Default for ReadCacheConfig {
    fn default() -> Self {
        ReadCacheConfig {
            entries_max: READ_CACHE_ENTRIES_MAX_DEFAULT,
            bytes_max: READ_CACHE_BYTES_MAX_DEFAULT,
            ttl: READ_CACHE_TTL_DEFAULT,
        }
    }
}

impl ReadCacheConfig {
    /// Checks the bounds; the client refuses to build with bad ones.
    pub fn validate(&self) -> Result<(), String> {
        if self.entries_max == 0 || self.bytes_max == 0 {
            return Err("read cache entries_max and bytes_max must be positive".into());
        }
        if self.ttl.is_zero() || self.ttl > READ_CACHE_TTL_MAX {
            return Err(format!(
                "read cache ttl must be positive and at most {READ_CACHE_TTL_MAX:?}"
            ));
        }
        Ok(())
    }

    /// The smallest charge of one entry, and the weighted capacity, such that
    /// a full cache holds at most `entries_max` entries and `bytes_max` bytes.
    fn charge_min_and_capacity(&self) -> (u64, u64) {
        let per_entry = self.bytes_max.div_ceil(self.entries_max);
        if per_entry > ENTRY_BYTES_MAX {
            // The byte bound can never bind before the entry bound does.
            (ENTRY_BYTES_MAX, ENTRY_BYTES_MAX * self.entries_max)
        } else {
            (per_entry, self.bytes_max)
        }
    }
}

/// Read cache counters, from [`crate::Client::cache_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads whose level allowed the cache but found no usable entry.
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
    /// Key, value and bookkeeping bytes held now.
    pub bytes: u64,
}

/// One cached read: the key's state (absent or a value with its version) as
/// of a replica's applied index in the range that held the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CachedRead {
    /// `None`: the key did not exist.
    pub kv: Option<KeyValue>,
    /// The range that served the state. A key only ever moves to a range
    /// with a higher id (a split gives the right-hand half a new id), and
    /// each range has its own log, so states are ordered by
    /// `(range_id, as_of)`, never by the index alone.
    pub range_id: u64,
    /// The applied index the state was read at (at least).
    pub as_of: u64,
    /// A lower bound of some instant at which this state was the latest one
    /// (`None`: nothing is known). A BOUNDED_STALENESS(max) read may use the
    /// entry while this is at most `max` ago.
    pub fresh_at: Option<Instant>,
    /// When the entry was stored.
    pub stored_at: Instant,
}

impl CachedRead {
    /// The cached state of a read, stored now.
    pub fn new(kv: Option<KeyValue>, range_id: u64, as_of: u64, fresh_at: Option<Instant>) -> Self {
        CachedRead {
            kv,
            range_id,
            as_of,
            fresh_at,
            stored_at: Instant::now(),
        }
    }

    fn version(&self) -> Option<u64> {
        self.kv.as_ref().map(|kv| kv.version)
    }

    fn bytes(key: &Bytes, e: &CachedRead) -> u64 {
        key.len() as u64
            + e.kv.as_ref().map_or(0, |kv| kv.value.len() as u64)
            + ENTRY_OVERHEAD_BYTES
    }
}

/// A lower bound of an instant at which the state returned by a read at
/// `level`, sent at `started`, was the latest, if the level proves one: a
/// STRONG read is linearized after it was sent, and a bounded read returns
/// state at most `max` older than the moment it was served.
pub(crate) fn fresh_at(level: &ReadConsistency, started: Instant) -> Option<Instant> {
    match level {
        ReadConsistency::Strong => Some(started),
        ReadConsistency::BoundedStaleness(max) => started.checked_sub(*max),
        _ => None,
    }
}

/// A snapshot of a key's fence, taken before a read is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence {
    slot: usize,
    value: u64,
}

/// A fence slot.
#[derive(Default)]
struct FenceSlot {
    /// Held across every change of an entry of the slot.
    lock: Mutex<()>,
    /// How many of the client's writes touched a key of the slot; changed
    /// only under `lock`.
    writes: AtomicU64,
}

/// A cached state and the fence count of its slot when it was stored.
struct Entry {
    read: CachedRead,
    stamp: u64,
}

/// The client's read cache.
pub(crate) struct ReadCache {
    cache: Cache<Bytes, Arc<Entry>>,
    fences: Box<[FenceSlot]>,
    fence_hasher: RandomState,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl fmt::Debug for ReadCache {
    /// Counters only: printing a client must not dump cached values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadCache")
            .field("ttl", &self.ttl)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .field("entries", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl ReadCache {
    /// A cache with the given (validated) bounds.
    pub fn new(cfg: &ReadCacheConfig) -> Self {
        debug_assert!(cfg.validate().is_ok());
        let (charge_min, capacity) = cfg.charge_min_and_capacity();
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(move |k: &Bytes, v: &Arc<Entry>| {
                let charge = CachedRead::bytes(k, &v.read).max(charge_min);
                u32::try_from(charge).unwrap_or(u32::MAX)
            })
            .time_to_live(cfg.ttl)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        ReadCache {
            cache,
            fences: (0..FENCE_SLOTS).map(|_| FenceSlot::default()).collect(),
            fence_hasher: RandomState::new(),
            ttl: cfg.ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn slot(&self, key: &[u8]) -> usize {
        (self.fence_hasher.hash_one(key) % self.fences.len() as u64) as usize
    }

    fn lock(&self, slot: usize) -> MutexGuard<'_, ()> {
        // The lock guards no data of its own: poisoning is moot.
        self.fences[slot]
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The fence count of `slot` now.
    fn writes(&self, slot: usize) -> u64 {
        self.fences[slot].writes.load(Ordering::Acquire)
    }

    /// Counts a write in `slot`, retiring its entries; the caller holds its
    /// lock. Returns the new count.
    fn bump(&self, slot: usize) -> u64 {
        self.fences[slot].writes.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Stores `new` for `key` unless the cache holds newer state; the caller
    /// holds the key's slot lock and `stamp` is the slot's count. A retired
    /// entry still counts as newer state: it keeps an older write's
    /// acknowledgement or a lagging replica's read from replacing what the
    /// client has already seen (the key then misses until a newer state comes).
    fn store(&self, key: Bytes, new: CachedRead, stamp: u64) {
        let existing = self.cache.get(&key);
        if let Some(read) = newer(existing.as_deref().map(|e| &e.read), new) {
            self.cache.insert(key, Arc::new(Entry { read, stamp }));
        }
    }

    /// The cached state of `key` if `level` may be served from the cache and
    /// a usable entry exists: `Some(None)` means "cached as absent". Counts a
    /// hit or a miss for the levels that may use the cache.
    pub fn lookup(&self, key: &Bytes, level: &ReadConsistency) -> Option<Option<KeyValue>> {
        let usable = |e: &CachedRead| match level {
            ReadConsistency::Eventual => e.stored_at.elapsed() < self.ttl,
            ReadConsistency::BoundedStaleness(max) => {
                e.fresh_at.is_some_and(|t| t.elapsed() <= *max)
            }
            _ => false,
        };
        if !matches!(
            level,
            ReadConsistency::Eventual | ReadConsistency::BoundedStaleness(_)
        ) {
            return None;
        }
        let writes = self.writes(self.slot(key));
        match self.cache.get(key) {
            Some(e) if e.stamp == writes && usable(&e.read) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.read.kv.clone())
            }
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Snapshots `key`'s fence before its read is sent.
    pub fn fence(&self, key: &[u8]) -> Fence {
        let slot = self.slot(key);
        Fence {
            slot,
            value: self.writes(slot),
        }
    }

    /// Stores a read's result unless one of the client's writes touched the
    /// key since `fence` was taken, or the cache already holds newer state.
    pub fn fill(&self, key: Bytes, fence: Fence, read: CachedRead) {
        let _slot = self.lock(fence.slot);
        if self.writes(fence.slot) == fence.value {
            self.store(key, read, fence.value);
        }
    }

    /// Forgets `key` (and retires the entries sharing its slot), and stops
    /// fills of reads already in flight.
    pub fn invalidate(&self, key: &Bytes) {
        let slot = self.slot(key);
        let _slot = self.lock(slot);
        self.bump(slot);
    }

    /// Records the state the client's own acknowledged write left `key` in
    /// (replacing older state) if the cache holds the key, and stops fills
    /// of reads already in flight. A write adds no entry: a stream of writes
    /// does not push out what the client reads, and a write of a key the
    /// client does not read costs the cache a counter bump and a lookup.
    pub fn store_written(&self, key: Bytes, state: CachedRead) {
        let slot = self.slot(&key);
        let _slot = self.lock(slot);
        let stamp = self.bump(slot);
        // `contains_key` does not count as a use of the entry.
        if self.cache.contains_key(&key) {
            self.store(key, state, stamp);
        }
    }

    /// Hit and miss counters, and what the cache holds now.
    pub fn stats(&self) -> CacheStats {
        self.cache.run_pending_tasks();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.cache.entry_count(),
            bytes: self
                .cache
                .iter()
                .map(|(k, v)| CachedRead::bytes(&k, &v.read))
                .sum(),
        }
    }
}

/// The entry that replaces `existing`, or `None` when `existing` is newer
/// state. When both hold the same version of the key, the value is known
/// current at the later of their `fresh_at` times.
fn newer(existing: Option<&CachedRead>, mut new: CachedRead) -> Option<CachedRead> {
    if let Some(old) = existing {
        if old.range_id > new.range_id {
            return None;
        }
        if old.range_id == new.range_id {
            let older_version = matches!(
                (old.version(), new.version()),
                (Some(o), Some(n)) if o > n
            );
            if old.as_of > new.as_of || older_version {
                return None;
            }
        }
        if old.range_id == new.range_id && old.version() == new.version() {
            new.fresh_at = new.fresh_at.max(old.fresh_at);
        }
    }
    Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &'static str, value: &'static str, version: u64) -> Option<KeyValue> {
        Some(KeyValue {
            key: Bytes::from_static(key.as_bytes()),
            value: Bytes::from_static(value.as_bytes()),
            version,
        })
    }

    fn cache(entries_max: u64, bytes_max: u64, ttl: Duration) -> ReadCache {
        let cfg = ReadCacheConfig {
            entries_max,
            bytes_max,
            ttl,
        };
        cfg.validate().unwrap();
        ReadCache::new(&cfg)
    }

    fn fill(c: &ReadCache, key: &'static str, read: CachedRead) {
        let k = Bytes::from_static(key.as_bytes());
        let f = c.fence(&k);
        c.fill(k, f, read);
    }

    fn key() -> Bytes {
        Bytes::from_static(b"k")
    }

    #[test]
    fn only_eventual_and_bounded_levels_read_the_cache() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        fill(
            &c,
            "k",
            CachedRead::new(kv("k", "v", 3), 1, 5, Some(Instant::now())),
        );
        for level in [
            ReadConsistency::Strong,
            ReadConsistency::Session(crate::SessionToken::for_range(1, 1)),
            ReadConsistency::ConsistentPrefix,
        ] {
            assert_eq!(c.lookup(&key(), &level), None, "{level:?}");
        }
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v", 3))
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 0, 1));
        assert_eq!(s.bytes, 1 + 1 + ENTRY_OVERHEAD_BYTES);
    }

    #[test]
    fn absent_keys_are_cached_too() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        fill(&c, "k", CachedRead::new(None, 1, 5, None));
        assert_eq!(c.lookup(&key(), &ReadConsistency::Eventual), Some(None));
        assert_eq!(
            c.lookup(&Bytes::from_static(b"other"), &ReadConsistency::Eventual),
            None
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn bounded_reads_need_a_proven_recent_value() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        let bound = ReadConsistency::BoundedStaleness(Duration::from_secs(10));
        fill(&c, "k", CachedRead::new(kv("k", "v", 3), 1, 5, None));
        assert_eq!(
            c.lookup(&key(), &bound),
            None,
            "a local read proves no freshness"
        );
        let long_ago = Instant::now().checked_sub(Duration::from_secs(30));
        fill(&c, "k", CachedRead::new(kv("k", "v", 3), 1, 6, long_ago));
        assert_eq!(
            c.lookup(&key(), &bound),
            None,
            "proven current too long ago"
        );
        fill(
            &c,
            "k",
            CachedRead::new(kv("k", "v", 3), 1, 7, Some(Instant::now())),
        );
        assert_eq!(c.lookup(&key(), &bound), Some(kv("k", "v", 3)));
        // A later local read of the same version keeps the proof.
        fill(&c, "k", CachedRead::new(kv("k", "v", 3), 1, 8, None));
        assert_eq!(c.lookup(&key(), &bound), Some(kv("k", "v", 3)));
        // A newer version without proof drops it.
        fill(&c, "k", CachedRead::new(kv("k", "w", 9), 1, 9, None));
        assert_eq!(c.lookup(&key(), &bound), None);
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "w", 9))
        );
    }

    #[test]
    fn fresh_at_follows_the_level() {
        let now = Instant::now();
        assert_eq!(fresh_at(&ReadConsistency::Strong, now), Some(now));
        assert_eq!(
            fresh_at(
                &ReadConsistency::BoundedStaleness(Duration::from_millis(5)),
                now
            ),
            now.checked_sub(Duration::from_millis(5))
        );
        for level in [
            ReadConsistency::Session(crate::SessionToken::for_range(1, 3)),
            ReadConsistency::ConsistentPrefix,
            ReadConsistency::Eventual,
        ] {
            assert_eq!(fresh_at(&level, now), None);
        }
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let ttl = Duration::from_millis(100);
        let c = cache(100, 1 << 20, ttl);
        fill(
            &c,
            "k",
            CachedRead::new(kv("k", "v", 3), 1, 5, Some(Instant::now())),
        );
        assert!(c.lookup(&key(), &ReadConsistency::Eventual).is_some());
        // Time itself is what is tested here.
        std::thread::sleep(ttl + Duration::from_millis(50));
        assert_eq!(c.lookup(&key(), &ReadConsistency::Eventual), None);
        assert_eq!(
            c.lookup(
                &key(),
                &ReadConsistency::BoundedStaleness(Duration::from_secs(60))
            ),
            None,
            "the TTL bounds bounded-staleness hits too"
        );
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn the_entry_count_is_bounded() {
        let c = cache(10, 1 << 30, Duration::from_secs(60));
        for i in 0..100u64 {
            let k = Bytes::from(format!("k{i}"));
            let f = c.fence(&k);
            c.fill(k.clone(), f, CachedRead::new(None, 1, i + 1, None));
        }
        let s = c.stats();
        assert!(s.entries <= 10, "{s:?}");
        assert!(s.entries > 0, "{s:?}");
    }

    #[test]
    fn the_bytes_are_bounded() {
        let bytes_max = 64 * 1024;
        let c = cache(1_000, bytes_max, Duration::from_secs(60));
        let value = Bytes::from(vec![7u8; 10 * 1024]);
        for i in 0..50u64 {
            let k = Bytes::from(format!("k{i}"));
            let f = c.fence(&k);
            let state = Some(KeyValue {
                key: k.clone(),
                value: value.clone(),
                version: i + 1,
            });
            c.fill(k, f, CachedRead::new(state, 1, i + 1, None));
        }
        let s = c.stats();
        assert!(s.bytes <= bytes_max, "{s:?}");
        assert!(s.entries >= 1 && s.entries <= 6, "{s:?}");
    }

    #[test]
    fn charges_respect_both_bounds() {
        let cfg = ReadCacheConfig {
            entries_max: 10,
            bytes_max: 1_000,
            ttl: Duration::from_secs(1),
        };
        assert_eq!(cfg.charge_min_and_capacity(), (100, 1_000));
        let cfg = ReadCacheConfig {
            entries_max: 2,
            bytes_max: u64::MAX,
            ttl: Duration::from_secs(1),
        };
        assert_eq!(
            cfg.charge_min_and_capacity(),
            (ENTRY_BYTES_MAX, 2 * ENTRY_BYTES_MAX)
        );
        let bad = ReadCacheConfig {
            ttl: Duration::ZERO,
            ..ReadCacheConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ReadCacheConfig {
            entries_max: 0,
            ..ReadCacheConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn invalidation_removes_the_key_and_stops_fills_in_flight() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        fill(&c, "k", CachedRead::new(kv("k", "v1", 3), 1, 5, None));
        let in_flight = c.fence(&key());
        c.invalidate(&key());
        assert_eq!(c.lookup(&key(), &ReadConsistency::Eventual), None);
        c.fill(
            key(),
            in_flight,
            CachedRead::new(kv("k", "v1", 3), 1, 6, None),
        );
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            None,
            "a read sent before the write must not refill the key"
        );
        // A read sent after the invalidation fills again.
        fill(&c, "k", CachedRead::new(kv("k", "v2", 7), 1, 7, None));
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v2", 7))
        );
        // Invalidating another key (of another fence slot) leaves this one.
        let other = (0..)
            .map(|i| Bytes::from(format!("other{i}")))
            .find(|o| c.slot(o) != c.slot(&key()))
            .expect("a key of another slot");
        c.invalidate(&other);
        assert!(c.lookup(&key(), &ReadConsistency::Eventual).is_some());
    }

    #[test]
    fn own_writes_replace_older_state_and_older_reads_never_replace_newer() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        fill(&c, "k", CachedRead::new(kv("k", "v0", 2), 1, 3, None));
        let in_flight = c.fence(&key());
        c.store_written(
            key(),
            CachedRead::new(kv("k", "v2", 10), 1, 10, Some(Instant::now())),
        );
        c.fill(
            key(),
            in_flight,
            CachedRead::new(kv("k", "v1", 4), 1, 8, None),
        );
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v2", 10))
        );
        // A lagging replica's read, sent after the write, is older state.
        fill(&c, "k", CachedRead::new(kv("k", "v1", 4), 1, 9, None));
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v2", 10))
        );
        // An acknowledged delete is cached as absent.
        c.store_written(key(), CachedRead::new(None, 1, 11, None));
        assert_eq!(c.lookup(&key(), &ReadConsistency::Eventual), Some(None));
    }

    #[test]
    fn state_older_than_what_the_client_saw_never_comes_back_after_a_write() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        let seen = |c: &ReadCache| {
            c.lookup(&key(), &ReadConsistency::Eventual)
                .map(|kv| kv.map_or(0, |kv| kv.version))
        };
        fill(&c, "k", CachedRead::new(kv("k", "v8", 8), 1, 8, None));
        // Two concurrent writes of the key, answered out of order: the older
        // one's acknowledgement does not replace the newer one's state.
        c.invalidate(&key());
        c.invalidate(&key());
        c.store_written(key(), CachedRead::new(kv("k", "v11", 11), 1, 11, None));
        c.store_written(key(), CachedRead::new(kv("k", "v10", 10), 1, 10, None));
        assert!(matches!(seen(&c), None | Some(11)), "got {:?}", seen(&c));
        // Nor does a read sent afterwards that a lagging replica served.
        fill(&c, "k", CachedRead::new(kv("k", "v9", 9), 1, 9, None));
        assert!(matches!(seen(&c), None | Some(11)), "got {:?}", seen(&c));
        // A newer read fills the key again.
        fill(&c, "k", CachedRead::new(kv("k", "v12", 12), 1, 12, None));
        assert_eq!(seen(&c), Some(12));
    }

    #[test]
    fn writes_refresh_cached_keys_and_add_none() {
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        let other = Bytes::from_static(b"other");
        // A write of a key the cache does not hold adds nothing.
        c.store_written(
            other.clone(),
            CachedRead::new(kv("other", "w", 5), 1, 5, None),
        );
        c.cache.run_pending_tasks();
        assert_eq!(c.stats().entries, 0);
        assert_eq!(c.lookup(&other, &ReadConsistency::Eventual), None);
        // A write of a cached key refreshes it, with what the write proved.
        fill(&c, "k", CachedRead::new(kv("k", "v1", 4), 1, 4, None));
        let bounded = ReadConsistency::BoundedStaleness(Duration::from_secs(30));
        assert_eq!(
            c.lookup(&key(), &bounded),
            None,
            "a replica's read proves nothing"
        );
        c.store_written(
            key(),
            CachedRead::new(kv("k", "v2", 9), 1, 9, Some(Instant::now())),
        );
        assert_eq!(c.lookup(&key(), &bounded), Some(kv("k", "v2", 9)));
        assert_eq!(c.stats().entries, 1);
    }

    #[test]
    fn concurrent_fills_never_bring_back_state_older_than_a_finished_write() {
        use std::sync::atomic::AtomicBool;
        // One writer and three readers of one key. The "server" holds the
        // latest applied version; every fourth write has an unknown outcome
        // (applied, but the client only forgets the key). Once a write has
        // finished, the cache may miss, but never serve an older version.
        let c = Arc::new(cache(100, 1 << 20, Duration::from_secs(60)));
        let server = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let state = |v: u64| {
            let kv = (v > 0).then(|| kv("k", "v", v)).flatten();
            CachedRead::new(kv, 1, v, Some(Instant::now()))
        };
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (c, server, finished, stop, hits) = (
                    c.clone(),
                    server.clone(),
                    finished.clone(),
                    stop.clone(),
                    hits.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let fence = c.fence(&key());
                        let read = state(server.load(Ordering::Acquire));
                        std::thread::yield_now();
                        c.fill(key(), fence, read);
                        let floor = finished.load(Ordering::Acquire);
                        if let Some(got) = c.lookup(&key(), &ReadConsistency::Eventual) {
                            hits.fetch_add(1, Ordering::Relaxed);
                            let v = got.map_or(0, |kv| kv.version);
                            assert!(
                                v >= floor,
                                "served version {v} after write {floor} finished"
                            );
                        }
                    }
                })
            })
            .collect();
        for v in 1..=20_000u64 {
            c.invalidate(&key());
            server.store(v, Ordering::Release);
            if v % 4 == 0 {
                c.invalidate(&key());
            } else {
                c.store_written(key(), state(v));
            }
            finished.store(v, Ordering::Release);
        }
        // Writes add no entries and every write stops the fills in flight, so
        // the readers may see no hit while the writer runs (on a busy machine
        // they rarely do). Once the writes end, their fills must stick and be
        // served, and the floor check above still holds for them.
        let deadline = Instant::now() + Duration::from_secs(30);
        while hits.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        for r in readers {
            r.join().unwrap();
        }
        assert!(
            hits.load(Ordering::Relaxed) > 0,
            "the readers never hit the cache"
        );
    }

    #[test]
    fn state_from_a_split_off_range_replaces_state_with_higher_indexes_of_the_parent() {
        // The right-hand half of a split gets a new (higher) range id and a new
        // log that starts low: its reads are newer although their indexes are not.
        let c = cache(100, 1 << 20, Duration::from_secs(60));
        fill(
            &c,
            "k",
            CachedRead::new(kv("k", "v1", 5_000), 1, 5_000, None),
        );
        fill(&c, "k", CachedRead::new(kv("k", "v2", 7), 2, 9, None));
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v2", 7))
        );
        // A lagging read of the parent range (sent before the split) is older.
        fill(
            &c,
            "k",
            CachedRead::new(kv("k", "v1", 5_000), 1, 6_000, None),
        );
        assert_eq!(
            c.lookup(&key(), &ReadConsistency::Eventual),
            Some(kv("k", "v2", 7))
        );
    }
}
