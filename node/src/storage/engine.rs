//! [`Engine`]: the node's single RocksDB and every operation on it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode,
    Options, ReadOptions, ReadTier, WriteBatch, WriteOptions, DB,
};

use super::durability;
use super::group_commit::{GroupCommit, SyncCallback};
use super::keys::{self, RaftStateField, RangeStateField};
use super::snapshot::{self, SnapshotExport};
use super::value::{self, StoredValue};
use super::ByteBudget;
use super::StorageError;

/// Most memtable entries one [`Engine::approximate_span_size`] counts.
pub const MEMTABLE_MEASURE_MAX: usize = 20_000;

/// Memtables a column family keeps at most, the one written included
/// (RocksDB's default is 2).
const MEMTABLES_MAX: i32 = 4;

/// Share of a memtable's size given to its whole-key bloom filter (data and
/// range-state column families).
const MEMTABLE_BLOOM_RATIO: f64 = 0.05;

/// How long past its expiry a dedup record stays before a compaction may
/// drop it. Whether a record still counts is decided by the log alone (its
/// expiry against the applying command's proposal time), so dropping it is
/// safe once no command applied later can carry an earlier proposal time
/// than its expiry. A compaction drops a range's record only once a command
/// proposed this long after the expiry was applied here; proposal times go
/// back in log order only across leaders whose clocks disagree, so this must
/// exceed any clock difference between nodes (chaos runs skew up to 300 s
/// either way).
pub const DEDUP_PURGE_GRACE_MS: u64 = 15 * 60 * 1000;

/// One range's clock for the dedup compaction filter (see [`DedupClocks`]).
#[derive(Debug, Default)]
pub struct DedupClock {
    /// The latest proposal time (ms) of a command the range applied here.
    applied: AtomicU64,
    /// The latest proposal time of a command whose applied state is in SST
    /// files: raised to `applied` by each flush that covers it.
    durable: AtomicU64,
}

impl DedupClock {
    /// Notes that the range applied commands proposed up to `proposed_ms`.
    pub fn applied(&self, proposed_ms: u64) {
        self.applied.fetch_max(proposed_ms, Ordering::SeqCst);
    }

    /// The clock the compaction filter goes by.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }
}

/// Per range, the latest proposal time (ms) of a command its state machine
/// applied on this node since it opened, and whose applied state a flush
/// has made durable: the clock the compaction filter drops expired dedup
/// records by. A range not here keeps every record.
///
/// Only flushed applies count: applied writes skip the WAL, so a crash makes
/// the range apply again every command after its last flush. Those were
/// proposed after the commands a flush covered (clock differences between
/// leaders aside), so no record they look up is older than the grace
/// allows; a clock raised by unflushed applies would let a compaction drop
/// a record that a command applied again after a crash still needs.
#[derive(Debug, Default)]
pub struct DedupClocks(RwLock<HashMap<u64, Arc<DedupClock>>>);

impl DedupClocks {
    fn get(&self, range_id: u64) -> Option<u64> {
        self.0
            .read()
            .expect("dedup clocks lock")
            .get(&range_id)
            .map(|c| c.durable())
    }

    fn clock(&self, range_id: u64) -> Arc<DedupClock> {
        if let Some(c) = self.0.read().expect("dedup clocks lock").get(&range_id) {
            return c.clone();
        }
        self.0
            .write()
            .expect("dedup clocks lock")
            .entry(range_id)
            .or_default()
            .clone()
    }

    /// What every range had applied, taken before a flush starts.
    fn before_flush(&self) -> Vec<(Arc<DedupClock>, u64)> {
        self.0
            .read()
            .expect("dedup clocks lock")
            .values()
            .map(|c| (c.clone(), c.applied.load(Ordering::SeqCst)))
            .collect()
    }

    /// After that flush succeeded: those applies are durable.
    fn flushed(taken: Vec<(Arc<DedupClock>, u64)>) {
        for (c, t) in taken {
            c.durable.fetch_max(t, Ordering::SeqCst);
        }
    }

    fn forget(&self, range_id: u64) {
        self.0.write().expect("dedup clocks lock").remove(&range_id);
    }
}

/// Whether the compaction filter drops this `range_state` entry: a dedup
/// record whose expiry lies [`DEDUP_PURGE_GRACE_MS`] before its range's clock.
fn dedup_record_dead(clocks: &DedupClocks, key: &[u8], value: &[u8]) -> bool {
    let Some(range_id) = keys::dedup_key_range(key) else {
        return false;
    };
    let Some(expires) = value
        .get(4..12)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    else {
        return false;
    };
    clocks
        .get(range_id)
        .is_some_and(|now| expires.saturating_add(DEDUP_PURGE_GRACE_MS) <= now)
}

/// Tunables of the engine, validated by the node config.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// Memtable size per column family, in bytes. Every replica inserts
    /// each written key into a skiplist whose search deepens with its
    /// entries (old versions included); with 8 MiB a 3-node cluster on one
    /// host took 3-10% more puts/s at 256 clients than with 32 MiB
    /// (bench/findings.md).
    pub write_buffer_bytes: usize,
    /// Bytes of recent Raft log entries the ranges keep in memory together
    /// (see [`Engine::log_cache_budget`]; `0`: none).
    pub log_cache_bytes: usize,
    /// How long what the state machines applied (written without the WAL,
    /// see [`ApplyBatch::commit`]) may stay only in memory before the engine
    /// flushes it to SST files. Bounds what a crash makes a node apply again
    /// from its log at restart.
    pub applied_flush_after: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 8 << 20,
            log_cache_bytes: 256 << 20,
            applied_flush_after: APPLIED_FLUSH_AFTER,
        }
    }
}

/// Default of [`EngineOptions::applied_flush_after`]: how much a restart
/// after a crash may have to apply again. (Dedup records a command applied
/// again looks up are kept by [`DedupClock`], whatever this is.)
pub const APPLIED_FLUSH_AFTER: Duration = Duration::from_secs(10);

/// Since when the memtables hold applied writes that are in no SST file.
/// Times are milliseconds since `base`, plus one; `0` means none.
#[derive(Debug)]
struct Unflushed {
    base: Instant,
    /// The oldest applied write no flush has started on since.
    since: AtomicU64,
    /// The oldest applied write a running flush is putting into SST files.
    flushing: AtomicU64,
}

/// Lowers `a` to `v`, `0` counting as unset.
fn lower_nonzero(a: &AtomicU64, v: u64) {
    if v != 0 {
        let _ = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
            (cur == 0 || v < cur).then_some(v)
        });
    }
}

impl Unflushed {
    fn new() -> Self {
        Unflushed {
            base: Instant::now(),
            since: AtomicU64::new(0),
            flushing: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// Notes an applied write (the first since the last flush starts the clock).
    fn note(&self) {
        let _ = self
            .since
            .compare_exchange(0, self.now(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Flushes with `flush`: the writes noted before it started count as
    /// flushed once it succeeds; those noted meanwhile wait for the next.
    fn flush_with(
        &self,
        flush: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let since = self.since.swap(0, Ordering::SeqCst);
        lower_nonzero(&self.flushing, since);
        let res = flush();
        if res.is_err() {
            lower_nonzero(&self.since, since);
        }
        let _ = self
            .flushing
            .compare_exchange(since, 0, Ordering::SeqCst, Ordering::SeqCst);
        res
    }

    /// How long the oldest applied write not yet in SST files has waited.
    fn age(&self) -> Option<Duration> {
        let oldest = [&self.since, &self.flushing]
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .filter(|t| *t != 0)
            .min()?;
        Some(Duration::from_millis(self.now().saturating_sub(oldest)))
    }
}

/// Flushes every column family together (the engine opens with atomic
/// flush), so the SST files always hold a range's data and its applied
/// state as of the same write.
fn flush_all(db: &DB) -> Result<(), StorageError> {
    let cfs: Vec<&ColumnFamily> = keys::ALL_CFS
        .iter()
        .map(|n| db.cf_handle(n).expect("column family opened at start"))
        .collect();
    db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
    Ok(())
}

/// [`flush_all`], with the bookkeeping of what it made durable: the age of
/// unflushed applied writes and the ranges' dedup clocks.
fn flush_applied(db: &DB, unflushed: &Unflushed, clocks: &DedupClocks) -> Result<(), StorageError> {
    let taken = clocks.before_flush();
    unflushed.flush_with(|| flush_all(db))?;
    DedupClocks::flushed(taken);
    Ok(())
}

/// The thread that flushes applied writes once the oldest has waited
/// [`EngineOptions::applied_flush_after`]; stops when dropped.
struct AppliedFlusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AppliedFlusher {
    fn start(
        db: Arc<DB>,
        unflushed: Arc<Unflushed>,
        clocks: Arc<DedupClocks>,
        after: Duration,
    ) -> Self {
        let (stop, rx) = mpsc::channel::<()>();
        let tick = (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let thread = std::thread::Builder::new()
            .name("lmskv-applied-flush".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
                    if unflushed.age().is_none_or(|age| age < after) {
                        continue;
                    }
                    if let Err(e) = flush_applied(&db, &unflushed, &clocks) {
                        tracing::warn!(error = %e, "cannot flush applied writes; retrying");
                    }
                }
            })
            .expect("spawn applied-flush thread");
        AppliedFlusher {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for AppliedFlusher {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One pair returned by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanItem {
    pub key: Bytes,
    pub value: StoredValue,
}

/// The node's storage engine. Cheap to share behind an `Arc`.
pub struct Engine {
    // Field order matters: the flusher and syncer threads must stop before
    // the DB closes.
    /// `None` for an inline engine (the simulation): no thread, so when
    /// flushes happen does not depend on the wall clock.
    _applied_flusher: Option<AppliedFlusher>,
    group_commit: GroupCommit,
    db: Arc<DB>,
    path: PathBuf,
    /// Opened by [`Engine::open_inline_sync`]: see [`Engine::runs_inline`].
    inline: bool,
    dedup_clocks: Arc<DedupClocks>,
    log_cache_budget: Arc<ByteBudget>,
    unflushed: Arc<Unflushed>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

impl Engine {
    /// Opens (or creates) the engine in `path`. Corruption found while opening
    /// is reported, never repaired silently.
    pub fn open(path: &Path, opts: &EngineOptions) -> Result<Engine, StorageError> {
        Self::open_with(path, opts, false)
    }

    /// Opens the engine like [`Engine::open`], but every log sync runs on
    /// the calling thread instead of the group-commit thread, so its
    /// completion happens at a definite point of the caller's (simulated)
    /// time. For the deterministic simulation; slower under load.
    pub fn open_inline_sync(path: &Path, opts: &EngineOptions) -> Result<Engine, StorageError> {
        Self::open_with(path, opts, true)
    }

    fn open_with(
        path: &Path,
        opts: &EngineOptions,
        inline_sync: bool,
    ) -> Result<Engine, StorageError> {
        std::fs::create_dir_all(path)?;
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Damage fails the open: paranoid checks, absolute-consistency WAL
        // replay, tracked WAL sizes and the synced-sequence mark (see
        // `durability`); then every block's checksum is read once.
        durability::set_recovery_options(&mut db_opts);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(256 << 20);
        // Applied writes skip the WAL (see `ApplyBatch::commit`): a flush
        // must put every family's memtable into SST files as of one write,
        // or a crash could leave a range's data ahead of its applied state.
        db_opts.set_atomic_flush(true);

        let dedup_clocks = Arc::new(DedupClocks::default());
        let cfs = keys::ALL_CFS.iter().map(|name| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            o.set_write_buffer_size(opts.write_buffer_bytes);
            // Full memtables that wait for a flush before writes stall: a
            // small memtable fills in well under a second under load, so
            // a slow flush gets more room than RocksDB's one spare.
            o.set_max_write_buffer_number(MEMTABLES_MAX);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_paranoid_checks(true);
            if *name == keys::CF_RANGE_STATE || *name == keys::CF_DATA {
                // Every applied write with a request id looks up a dedup record
                // that almost never exists, and conditional writes look up
                // keys that may not: a whole-key bloom filter over the memtable
                // answers those misses without searching the skiplist.
                o.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
                o.set_memtable_whole_key_filtering(true);
            }
            if *name == keys::CF_RANGE_STATE {
                // Expired dedup records leave by compaction: no expiry index
                // to write per request, no deletes to apply.
                let clocks = dedup_clocks.clone();
                o.set_compaction_filter(
                    "lmskv-dedup-expiry",
                    move |_, key: &[u8], value: &[u8]| {
                        if dedup_record_dead(&clocks, key, value) {
                            rocksdb::CompactionDecision::Remove
                        } else {
                            rocksdb::CompactionDecision::Keep
                        }
                    },
                );
            }
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = Arc::new(durability::open_checked(&db_opts, path, || cfs.clone())?);
        let verified = durability::verify_checksums(&db, &keys::ALL_CFS)?;
        tracing::info!(
            path = %path.display(),
            entries = verified.entries,
            bytes = verified.bytes,
            millis = verified.millis,
            "storage opened; every block checksum verified"
        );
        let unflushed = Arc::new(Unflushed::new());
        Ok(Engine {
            _applied_flusher: (!inline_sync).then(|| {
                AppliedFlusher::start(
                    db.clone(),
                    unflushed.clone(),
                    dedup_clocks.clone(),
                    opts.applied_flush_after,
                )
            }),
            group_commit: if inline_sync {
                GroupCommit::inline(db.clone())
            } else {
                GroupCommit::start(db.clone())
            },
            db,
            path: path.to_path_buf(),
            inline: inline_sync,
            dedup_clocks,
            log_cache_budget: Arc::new(ByteBudget::new(opts.log_cache_bytes)),
            unflushed,
        })
    }

    /// Whether this engine was opened with [`Engine::open_inline_sync`] (the
    /// simulation). Work the node otherwise hands to a blocking thread
    /// (building and installing a range's snapshot, writing a received one)
    /// then runs on the calling task, so that it finishes at a definite
    /// point of simulated time.
    pub fn runs_inline(&self) -> bool {
        self.inline
    }

    /// The bytes every range's in-memory log tail on this engine shares
    /// (`EngineOptions::log_cache_bytes`).
    pub fn log_cache_budget(&self) -> &Arc<ByteBudget> {
        &self.log_cache_budget
    }

    /// The directory the engine lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // All families are opened in `open`; a missing one is a programming error.
        self.db
            .cf_handle(name)
            .expect("column family opened at start")
    }

    /// Calls `done` once every write made so far is durable (group commit).
    pub fn sync_then(&self, done: SyncCallback) {
        self.group_commit.sync(done);
    }

    /// As [`Engine::sync_then`], but syncs on the caller's thread, `done`
    /// completed before returning, when no other sync is queued or running
    /// and no client request is being served (see
    /// [`GroupCommit::sync_here_when_idle`]).
    pub fn sync_here_when_idle(&self, done: SyncCallback) {
        self.group_commit.sync_here_when_idle(done);
    }

    /// Marks a client request as being served while the guard lives: no
    /// append is synced in place on the serving thread meanwhile.
    pub fn foreground(&self) -> super::Foreground {
        self.group_commit.foreground()
    }

    /// Flushes every memtable to SST files, all column families as of one
    /// write: afterwards every state machine's applied writes so far are
    /// durable. Before a clean shutdown (a restart then neither replays the
    /// WAL nor applies log entries again), after a snapshot build, and
    /// before a batch that creates a range (see [`ApplyBatch::create_range`]).
    pub fn flush(&self) -> Result<(), StorageError> {
        flush_applied(&self.db, &self.unflushed, &self.dedup_clocks)
    }

    /// How long the oldest applied write that is only in memory has waited
    /// (`None`: every applied write is in SST files).
    pub fn applied_unflushed_for(&self) -> Option<Duration> {
        self.unflushed.age()
    }

    // ---- node identity ----

    /// The node identity record, if this data dir has one.
    pub fn node_identity(&self) -> Result<Option<Vec<u8>>, StorageError> {
        match self
            .db
            .get_cf(self.cf(keys::CF_RAFT_STATE), keys::NODE_IDENTITY_KEY)?
        {
            Some(raw) => Ok(Some(value::unframe("node identity", &raw)?.to_vec())),
            None => Ok(None),
        }
    }

    /// Durably records the node identity.
    pub fn put_node_identity(&self, payload: &[u8]) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(keys::CF_RAFT_STATE),
            keys::NODE_IDENTITY_KEY,
            value::frame(payload),
        );
        self.group_commit.write_logged(b, true)?;
        Ok(())
    }

    // ---- Raft log ----

    /// Writes log entries `(index, payload)` of a range, readable at once but
    /// not yet durable: follow with [`Engine::sync_then`].
    pub fn log_append(
        &self,
        range_id: u64,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<(), StorageError> {
        let cf = self.cf(keys::CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        for (index, payload) in entries {
            b.put_cf(
                cf,
                keys::raft_log_key(range_id, *index),
                value::frame(payload),
            );
        }
        self.group_commit.write_logged(b, false)?;
        Ok(())
    }

    /// Reads the log entries of a range with index in `[start, end)`, verifying
    /// each checksum. Stops at the first gap.
    pub fn log_entries(
        &self,
        range_id: u64,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::raft_log_key(range_id, end).to_vec());
        let from = keys::raft_log_key(range_id, start);
        let it = self.db.iterator_cf_opt(
            self.cf(keys::CF_RAFT_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut out = Vec::new();
        let mut expect: Option<u64> = None;
        for item in it {
            let (k, v) = item?;
            let Some(index) = keys::raft_log_index(range_id, &k) else {
                break;
            };
            // Entries before the first one present may be purged; after it, no gaps.
            if expect.is_some_and(|e| e != index) {
                break;
            }
            let payload = value::unframe("raft log entry", &v).map_err(|e| {
                StorageError::Corruption(format!("range {range_id} log index {index}: {e}"))
            })?;
            out.push((index, payload.to_vec()));
            expect = Some(index + 1);
        }
        Ok(out)
    }

    /// The last log entry of a range, if any.
    pub fn log_last(&self, range_id: u64) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::raft_log_key(range_id, 0).to_vec());
        ro.set_iterate_upper_bound(keys::raft_log_key(range_id + 1, 0).to_vec());
        let mut it = self
            .db
            .iterator_cf_opt(self.cf(keys::CF_RAFT_LOG), ro, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (k, v) = item?;
                let index = keys::raft_log_index(range_id, &k)
                    .ok_or_else(|| StorageError::Corruption("bad raft log key".into()))?;
                let payload = value::unframe("raft log entry", &v)?;
                Ok(Some((index, payload.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes the log entries of a range with index `>= index`.
    pub fn log_truncate_from(&self, range_id: u64, index: u64) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            self.cf(keys::CF_RAFT_LOG),
            keys::raft_log_key(range_id, index),
            keys::raft_log_key(range_id + 1, 0),
        );
        self.group_commit.write_logged(b, false)?;
        Ok(())
    }

    /// Records the purged log id and deletes log entries with index `<= index`, atomically.
    pub fn log_purge_through(
        &self,
        range_id: u64,
        index: u64,
        purged: &[u8],
    ) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(keys::CF_RAFT_STATE),
            keys::raft_state_key(range_id, RaftStateField::Purged),
            value::frame(purged),
        );
        b.delete_range_cf(
            self.cf(keys::CF_RAFT_LOG),
            keys::raft_log_key(range_id, 0),
            keys::raft_log_key(range_id, index.saturating_add(1)),
        );
        self.group_commit.write_logged(b, false)?;
        Ok(())
    }

    // ---- Raft state ----

    /// One field of a range's Raft state.
    pub fn raft_state(
        &self,
        range_id: u64,
        field: RaftStateField,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        match self.db.get_cf(
            self.cf(keys::CF_RAFT_STATE),
            keys::raft_state_key(range_id, field),
        )? {
            Some(raw) => Ok(Some(value::unframe("raft state", &raw)?.to_vec())),
            None => Ok(None),
        }
    }

    /// Writes one field of a range's Raft state; `sync` makes it durable before returning.
    pub fn put_raft_state(
        &self,
        range_id: u64,
        field: RaftStateField,
        payload: &[u8],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(keys::CF_RAFT_STATE),
            keys::raft_state_key(range_id, field),
            value::frame(payload),
        );
        self.group_commit.write_logged(b, sync)?;
        Ok(())
    }

    // ---- state machine ----

    /// One field of a range's state-machine state.
    pub fn range_state(
        &self,
        range_id: u64,
        field: RangeStateField,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        match self.db.get_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::range_state_key(range_id, field),
        )? {
            Some(raw) => Ok(Some(value::unframe("range state", &raw)?.to_vec())),
            None => Ok(None),
        }
    }

    /// Reads one user key.
    pub fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        match self.db.get_pinned_cf(self.cf(keys::CF_DATA), key)? {
            Some(raw) => Ok(Some(value::decode_value(key, &raw)?)),
            None => Ok(None),
        }
    }

    /// Reads several user keys as of one moment: all from one RocksDB
    /// snapshot, so an apply that lands meanwhile shows in all of them or in
    /// none (a batch of reads is never torn across a write batch).
    pub fn get_many(&self, keys: &[Bytes]) -> Result<Vec<Option<StoredValue>>, StorageError> {
        let snap = self.db.snapshot();
        let cf = self.cf(keys::CF_DATA);
        keys.iter()
            .map(|k| match snap.get_pinned_cf(cf, k)? {
                Some(raw) => Ok(Some(value::decode_value(k, &raw)?)),
                None => Ok(None),
            })
            .collect()
    }

    /// Reads user keys in `[start, end)` (an empty `end` is unbounded), in key
    /// order or reversed, stopping after `limit` pairs or once `bytes_max` bytes
    /// were collected. Returns the pairs and whether more may follow.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
        bytes_max: usize,
    ) -> Result<(Vec<ScanItem>, bool), StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mode = if reverse {
            IteratorMode::End
        } else {
            IteratorMode::Start
        };
        let it = self.db.iterator_cf_opt(self.cf(keys::CF_DATA), ro, mode);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in it {
            if out.len() >= limit || bytes >= bytes_max {
                return Ok((out, true));
            }
            let (k, v) = item?;
            let value = value::decode_value(&k, &v)?;
            bytes += k.len() + value.value.len();
            out.push(ScanItem {
                key: Bytes::copy_from_slice(&k),
                value,
            });
        }
        Ok((out, false))
    }

    /// The dedup record of a client request id, if one is stored and has
    /// not expired at `now_ms` (the applying command's proposal time).
    pub fn dedup_get(
        &self,
        range_id: u64,
        request_id: &[u8],
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(raw) = self.db.get_pinned_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::dedup_key(range_id, request_id),
        )?
        else {
            return Ok(None);
        };
        let payload = value::unframe("dedup record", &raw)?;
        let Some((expires, record)) = payload.split_first_chunk::<8>() else {
            return Err(StorageError::Corruption("dedup record: too short".into()));
        };
        if u64::from_be_bytes(*expires) <= now_ms {
            return Ok(None);
        }
        Ok(Some(record.to_vec()))
    }

    /// A client session's completed mark on a range and the mark's expiry,
    /// if one is stored and has not expired at `now_ms` (the applying
    /// command's proposal time).
    pub fn session_mark_get(
        &self,
        range_id: u64,
        session: &[u8; 8],
        now_ms: u64,
    ) -> Result<Option<SessionMark>, StorageError> {
        let Some(raw) = self.db.get_pinned_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::session_mark_key(range_id, session),
        )?
        else {
            return Ok(None);
        };
        let payload = value::unframe("session mark", &raw)?;
        let (Some(expires), Some(mark)) = (payload.get(..8), payload.get(8..16)) else {
            return Err(StorageError::Corruption("session mark: too short".into()));
        };
        let mark = SessionMark {
            completed_below: u64::from_be_bytes(mark.try_into().expect("8 bytes")),
            expires_at_ms: u64::from_be_bytes(expires.try_into().expect("8 bytes")),
        };
        Ok((mark.expires_at_ms > now_ms).then_some(mark))
    }

    /// The clock by which compactions drop `range_id`'s expired dedup
    /// records: its state machine notes the latest proposal time it applied,
    /// and the compactions go by the latest one a flush made durable.
    pub fn dedup_clock(&self, range_id: u64) -> Arc<DedupClock> {
        self.dedup_clocks.clock(range_id)
    }

    /// Starts an atomic batch of state-machine changes for a range.
    pub fn apply_batch(&self, range_id: u64) -> ApplyBatch<'_> {
        ApplyBatch {
            engine: self,
            range_id,
            batch: WriteBatch::default(),
            data: BTreeMap::new(),
            dedup: BTreeMap::new(),
            sessions: BTreeMap::new(),
            creates_range: false,
            flushed_before: false,
        }
    }

    // ---- snapshots ----

    /// Writes a consistent snapshot of a range (its data span and dedup table,
    /// plus its applied state) to the file at `path`.
    ///
    /// `span_of` gives the data span from the applied state read in the same
    /// RocksDB snapshot, so the span and the data always agree.
    pub fn export_snapshot(
        &self,
        range_id: u64,
        span_of: impl FnOnce(Option<&[u8]>) -> Result<(Vec<u8>, Vec<u8>), StorageError>,
        path: &Path,
    ) -> Result<SnapshotExport, StorageError> {
        let snap = self.db.snapshot();
        let applied = match snap.get_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::range_state_key(range_id, RangeStateField::Applied),
        )? {
            Some(raw) => Some(value::unframe("range state", &raw)?.to_vec()),
            None => None,
        };
        let (start, end) = span_of(applied.as_deref())?;
        let (start, end) = (&start[..], &end[..]);
        let mut w = snapshot::SnapshotWriter::create(path)?;
        if let Some(a) = &applied {
            w.record(snapshot::RecordKind::Applied, b"", a)?;
        }

        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        for item in snap.iterator_cf_opt(self.cf(keys::CF_DATA), ro, IteratorMode::Start) {
            let (k, v) = item?;
            // Verify before shipping: a snapshot never spreads corrupt data.
            value::decode_value(&k, &v)?;
            w.record(snapshot::RecordKind::Data, &k, &v)?;
        }
        let (ds, de) = keys::dedup_span(range_id);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(ds);
        ro.set_iterate_upper_bound(de);
        for item in snap.iterator_cf_opt(self.cf(keys::CF_RANGE_STATE), ro, IteratorMode::Start) {
            let (k, v) = item?;
            // Stored without the range id so the file is range-independent.
            w.record(snapshot::RecordKind::Dedup, &k[8..], &v)?;
        }
        let (records, bytes) = w.finish()?;
        Ok(SnapshotExport {
            applied,
            records,
            bytes,
        })
    }

    /// Replaces a range's data span and dedup table with a snapshot file's
    /// content and sets its applied state to `applied`. Crash-safe: a marker
    /// naming the file is written first, and [`Engine::pending_snapshot_install`]
    /// tells the caller to redo an interrupted install.
    ///
    /// `abort` is looked at before the range is touched and after every
    /// batch: once set, the import stops with [`StorageError::Aborted`],
    /// first deleting the data and dedup records it wrote, so a replica
    /// being removed leaves none behind. The marker stays until the
    /// removal deletes the range's state: if the node stops before that,
    /// the install is resumed when the range opens, rather than the range
    /// opening with its old applied state over an emptied span.
    pub fn import_snapshot(
        &self,
        range_id: u64,
        start: &[u8],
        end: &[u8],
        path: &Path,
        applied: &[u8],
        abort: &std::sync::atomic::AtomicBool,
    ) -> Result<(), StorageError> {
        let aborted = || abort.load(std::sync::atomic::Ordering::SeqCst);
        // Verify the whole file before touching the range.
        snapshot::SnapshotReader::open(path)?.verify(aborted)?;
        if aborted() {
            return Err(StorageError::Aborted);
        }

        let cf_state = self.cf(keys::CF_RANGE_STATE);
        let cf_data = self.cf(keys::CF_DATA);
        let marker = keys::range_state_key(range_id, RangeStateField::InstallingSnapshot);
        let mut b = WriteBatch::default();
        b.put_cf(
            cf_state,
            marker.as_slice(),
            value::frame(path.to_string_lossy().as_bytes()),
        );
        let end_bound = if end.is_empty() {
            keys::data_key_space_end()
        } else {
            end.to_vec()
        };
        b.delete_range_cf(cf_data, start, &end_bound[..]);
        let (ds, de) = keys::dedup_span(range_id);
        b.delete_range_cf(cf_state, &ds[..], &de[..]);
        self.group_commit.write_logged(b, true)?;
        crate::fail_point!("snapshot-install-import");
        let undo = || -> Result<(), StorageError> {
            let mut b = WriteBatch::default();
            b.delete_range_cf(cf_data, start, &end_bound[..]);
            b.delete_range_cf(cf_state, &ds[..], &de[..]);
            self.group_commit.write_logged(b, true)?;
            Err(StorageError::Aborted)
        };

        let mut reader = snapshot::SnapshotReader::open(path)?;
        let mut b = WriteBatch::default();
        let mut batch_bytes = 0usize;
        while let Some((kind, k, v)) = reader.next_record()? {
            batch_bytes += k.len() + v.len();
            match kind {
                snapshot::RecordKind::Data => b.put_cf(cf_data, &k, &v),
                snapshot::RecordKind::Dedup => {
                    let mut full = range_id.to_be_bytes().to_vec();
                    full.extend_from_slice(&k);
                    b.put_cf(cf_state, full, &v);
                }
                snapshot::RecordKind::Applied => {}
            }
            if batch_bytes >= 4 << 20 {
                self.group_commit
                    .write_logged(std::mem::take(&mut b), false)?;
                batch_bytes = 0;
                if aborted() {
                    return undo();
                }
            }
        }
        if aborted() {
            return undo();
        }
        b.put_cf(
            cf_state,
            keys::range_state_key(range_id, RangeStateField::Applied),
            value::frame(applied),
        );
        b.delete_cf(cf_state, marker.as_slice());
        self.group_commit.write_logged(b, true)?;
        Ok(())
    }

    /// The applied state recorded in a snapshot file (its first record).
    pub fn snapshot_applied_state(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
        // Only the first record: a small buffer, not a megabyte read per file
        // (a node checks every range's snapshot at start).
        let mut reader = snapshot::SnapshotReader::open_buffered(path, 16 << 10)?;
        match reader.next_record()? {
            Some((snapshot::RecordKind::Applied, _, v)) => Ok(Some(v.to_vec())),
            _ => Ok(None),
        }
    }

    /// Ids of the ranges this node has state for (an applied state or a Raft
    /// vote) and that are not tombstoned, in id order.
    pub fn local_range_ids(&self) -> Result<Vec<u64>, StorageError> {
        let mut ids = std::collections::BTreeSet::new();
        for cf in [keys::CF_RANGE_STATE, keys::CF_RAFT_STATE] {
            let mut next = 0u64;
            loop {
                let mut it = self.db.raw_iterator_cf(self.cf(cf));
                it.seek(next.to_be_bytes());
                let Some(k) = it.key() else {
                    it.status()?;
                    break;
                };
                if k.len() < 8 || k[..2] == [0xff, 0xff] {
                    break;
                }
                let id = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                ids.insert(id);
                match id.checked_add(1) {
                    Some(n) => next = n,
                    None => break,
                }
            }
        }
        let mut out = Vec::new();
        for id in ids {
            if id == 0 || self.range_state(id, RangeStateField::Tombstone)?.is_some() {
                continue;
            }
            out.push(id);
        }
        Ok(out)
    }

    /// Whether a range was removed from this node (and must not be recreated
    /// by stray messages).
    pub fn is_tombstoned(&self, range_id: u64) -> Result<bool, StorageError> {
        Ok(self
            .range_state(range_id, RangeStateField::Tombstone)?
            .is_some())
    }

    /// Clears a range's tombstone so that it can be hosted here again.
    pub fn clear_tombstone(&self, range_id: u64) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.delete_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::range_state_key(range_id, RangeStateField::Tombstone),
        );
        self.group_commit.write_logged(b, true)?;
        Ok(())
    }

    /// Deletes everything this node holds for a range — its log, Raft state,
    /// applied state, dedup table and the data in `[start, end)` when given —
    /// and leaves a tombstone. Synced.
    pub fn destroy_range(
        &self,
        range_id: u64,
        span: Option<(&[u8], &[u8])>,
    ) -> Result<(), StorageError> {
        let lo = range_id.to_be_bytes().to_vec();
        let hi = match range_id.checked_add(1) {
            Some(n) => n.to_be_bytes().to_vec(),
            None => vec![0xff; 9],
        };
        let mut b = WriteBatch::default();
        b.delete_range_cf(self.cf(keys::CF_RAFT_LOG), &lo[..], &hi[..]);
        b.delete_range_cf(self.cf(keys::CF_RAFT_STATE), &lo[..], &hi[..]);
        b.delete_range_cf(self.cf(keys::CF_RANGE_STATE), &lo[..], &hi[..]);
        if let Some((start, end)) = span {
            let end_bound = if end.is_empty() {
                keys::data_key_space_end()
            } else {
                end.to_vec()
            };
            if start < &end_bound[..] {
                b.delete_range_cf(self.cf(keys::CF_DATA), start, &end_bound[..]);
            }
        }
        b.put_cf(
            self.cf(keys::CF_RANGE_STATE),
            keys::range_state_key(range_id, RangeStateField::Tombstone),
            value::frame(b"removed"),
        );
        self.group_commit.write_logged(b, true)?;
        self.dedup_clocks.forget(range_id);
        Ok(())
    }

    /// Approximate bytes and keys stored in `[start, end)` of the data family:
    /// the span's share of the SST files plus what its memtables hold. A
    /// span whose writes still sit in a memtable (a small range, or a node
    /// whose write buffer has not filled since) would otherwise look empty
    /// and never split by size. At most [`MEMTABLE_MEASURE_MAX`] memtable
    /// entries are counted, so one measurement stays cheap however busy the
    /// range is (the rest is counted once it is flushed).
    pub fn approximate_span_size(&self, start: &[u8], end: &[u8]) -> (u64, u64) {
        let end_bound = if end.is_empty() {
            keys::data_key_space_end()
        } else {
            end.to_vec()
        };
        let cf = self.cf(keys::CF_DATA);
        let in_files = self
            .db
            .get_approximate_sizes_cf(&cf, &[rocksdb::Range::new(start, &end_bound[..])])
            .first()
            .copied()
            .unwrap_or(0);
        let mut ro = ReadOptions::default();
        ro.set_read_tier(ReadTier::Memtable);
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end_bound);
        ro.fill_cache(false);
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut in_memory = 0u64;
        let mut counted = 0usize;
        while counted < MEMTABLE_MEASURE_MAX {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            in_memory += (k.len() + v.len()) as u64;
            counted += 1;
            it.next();
        }
        let size = in_files + in_memory;
        // Rough key count: bytes over the observed mean record size.
        (size, size / 300)
    }

    /// Bytes in the data column family's SST files: changes whenever a
    /// flush or compaction changes what [`Engine::approximate_span_size`]
    /// measures.
    pub fn data_sst_bytes(&self) -> u64 {
        self.db
            .property_int_value_cf(self.cf(keys::CF_DATA), "rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// The key at the middle of `[start, end)` by count, and the count. Reads
    /// every key of the span (blocking: call it off the async workers) but
    /// keeps at most `scan_max` sampled keys, so memory stays bounded.
    pub fn middle_key(
        &self,
        start: &[u8],
        end: &[u8],
        scan_max: usize,
    ) -> Result<Option<(Bytes, u64)>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut keys_seen: Vec<Box<[u8]>> = Vec::new();
        let mut stride = 1usize;
        let mut n = 0u64;
        for item in self
            .db
            .iterator_cf_opt(self.cf(keys::CF_DATA), ro, IteratorMode::Start)
        {
            let (k, _) = item?;
            if (n as usize).is_multiple_of(stride) {
                keys_seen.push(k);
                if keys_seen.len() >= scan_max.max(2) {
                    // Keep every other sample and double the stride: bounded memory.
                    keys_seen = keys_seen.into_iter().step_by(2).collect();
                    stride *= 2;
                }
            }
            n += 1;
        }
        if keys_seen.len() < 2 {
            return Ok(None);
        }
        let mid = &keys_seen[keys_seen.len() / 2];
        Ok(Some((Bytes::copy_from_slice(mid), n)))
    }

    /// The snapshot file whose install was interrupted by a crash, if any.
    pub fn pending_snapshot_install(&self, range_id: u64) -> Result<Option<PathBuf>, StorageError> {
        Ok(self
            .range_state(range_id, RangeStateField::InstallingSnapshot)?
            .map(|p| PathBuf::from(String::from_utf8_lossy(&p).into_owned())))
    }
}

/// A client session's completed mark on a range (see `Op::Session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionMark {
    /// Requests of the session numbered below this are refused.
    pub completed_below: u64,
    /// When the mark expires (ms since the epoch, proposal time), as dedup
    /// records do.
    pub expires_at_ms: u64,
}

/// A stored dedup record: its expiry, then the record, framed.
fn dedup_value(expires_at_ms: u64, record: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + record.len());
    payload.extend_from_slice(&expires_at_ms.to_be_bytes());
    payload.extend_from_slice(record);
    value::frame(&payload)
}

/// An atomic batch of state-machine changes for one range: data mutations,
/// dedup records and the applied state are written together or not at all.
///
/// Reads through the batch see its own pending writes, so several commands
/// applied in one batch observe each other in log order.
pub struct ApplyBatch<'e> {
    engine: &'e Engine,
    range_id: u64,
    batch: WriteBatch,
    /// Data writes of this batch, by key (`None`: delete). Written in key
    /// order at commit: RocksDB's memtable inserts keys that follow the
    /// previous insert cheaply, and random keys dearly.
    data: BTreeMap<Vec<u8>, Option<StoredValue>>,
    /// Dedup records written by this batch: request id → (record, expiry),
    /// or `None` for one deleted, written in key order at commit as well.
    dedup: BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>>,
    /// Session marks written by this batch.
    sessions: BTreeMap<[u8; 8], SessionMark>,
    /// [`ApplyBatch::create_range`] was called: the batch is written through
    /// the WAL, synced, over a flushed store.
    creates_range: bool,
    /// The caller flushed the engine after the range's last committed batch
    /// ([`ApplyBatch::flushed_before`]).
    flushed_before: bool,
}

impl ApplyBatch<'_> {
    /// Whether [`ApplyBatch::create_range`] was called: the commit then
    /// flushes the engine unless told it was flushed just before.
    pub fn creates_range(&self) -> bool {
        self.creates_range
    }

    /// Reads a key, seeing this batch's pending writes.
    pub fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        match self.data.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.engine.get(key),
        }
    }

    /// Sets a key's value and version.
    pub fn put(&mut self, key: &[u8], version: u64, value: Bytes) {
        self.data
            .insert(key.to_vec(), Some(StoredValue { version, value }));
    }

    /// Deletes a key.
    pub fn delete(&mut self, key: &[u8]) {
        self.data.insert(key.to_vec(), None);
    }

    /// The dedup record of a request id unexpired at `now_ms`, seeing this
    /// batch's pending writes.
    pub fn dedup_get(
        &self,
        request_id: &[u8],
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        match self.dedup.get(request_id) {
            Some(Some((v, expires))) => Ok((*expires > now_ms).then(|| v.clone())),
            Some(None) => Ok(None),
            None => self.engine.dedup_get(self.range_id, request_id, now_ms),
        }
    }

    /// Records the outcome of a request id, kept until `expires_at_ms`.
    pub fn dedup_put(&mut self, request_id: &[u8], expires_at_ms: u64, record: Vec<u8>) {
        self.dedup
            .insert(request_id.to_vec(), Some((record, expires_at_ms)));
    }

    /// Deletes the dedup record of a request id, if there is one.
    pub fn dedup_delete(&mut self, request_id: &[u8]) {
        self.dedup.insert(request_id.to_vec(), None);
    }

    /// A client session's completed mark unexpired at `now_ms`, seeing this
    /// batch's pending writes (the state machine reads through its own
    /// cache instead, see `pending_session_mark`).
    #[cfg(test)]
    pub fn session_mark(
        &self,
        session: &[u8; 8],
        now_ms: u64,
    ) -> Result<Option<SessionMark>, StorageError> {
        match self.sessions.get(session) {
            Some(m) => Ok((m.expires_at_ms > now_ms).then_some(*m)),
            None => self.engine.session_mark_get(self.range_id, session, now_ms),
        }
    }

    /// The session mark this batch writes for `session`, if it writes one.
    pub fn pending_session_mark(&self, session: &[u8; 8]) -> Option<SessionMark> {
        self.sessions.get(session).copied()
    }

    /// Every session mark this batch writes.
    pub fn session_marks(&self) -> impl Iterator<Item = ([u8; 8], SessionMark)> + '_ {
        self.sessions.iter().map(|(s, m)| (*s, *m))
    }

    /// Sets a client session's completed mark.
    pub fn set_session_mark(&mut self, session: &[u8; 8], mark: SessionMark) {
        self.sessions.insert(*session, mark);
    }

    /// Whether this node has state for `range_id` (applied state or tombstone).
    pub fn range_exists(&self, range_id: u64) -> Result<bool, StorageError> {
        Ok(self
            .engine
            .range_state(range_id, RangeStateField::Applied)?
            .is_some()
            || self.engine.is_tombstoned(range_id)?
            || self
                .engine
                .raft_state(range_id, RaftStateField::Vote)?
                .is_some())
    }

    /// Creates another range's initial state in this batch (used by splits):
    /// its applied state, a purged log id (so that a replica without this
    /// state is brought up by a snapshot, never by replaying a log it lacks),
    /// and a copy of this range's dedup table, so retries of writes applied
    /// before the split stay deduplicated on either side.
    ///
    /// Unlike other batches, this one is durable once committed: the
    /// engine is flushed first (so every earlier applied write of the range
    /// is in SST files), then the batch is written through the WAL and
    /// synced. The new range can be opened as soon as its state is visible
    /// (a Raft message for it, the node's reconcile pass), and its group
    /// writes votes and log entries through the WAL: after a crash it must
    /// never find its applied state and log start gone. Flushing takes a
    /// while; a caller on an async thread flushes off it first and says so
    /// with [`ApplyBatch::flushed_before`].
    pub fn create_range(
        &mut self,
        new_range_id: u64,
        applied: &[u8],
        purged: &[u8],
    ) -> Result<(), StorageError> {
        self.creates_range = true;
        let cf_state = self.engine.cf(keys::CF_RANGE_STATE);
        self.batch.put_cf(
            cf_state,
            keys::range_state_key(new_range_id, RangeStateField::Applied),
            value::frame(applied),
        );
        self.batch.put_cf(
            self.engine.cf(keys::CF_RAFT_STATE),
            keys::raft_state_key(new_range_id, RaftStateField::Purged),
            value::frame(purged),
        );
        let (ds, de) = keys::dedup_span(self.range_id);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(ds);
        ro.set_iterate_upper_bound(de);
        for item in self
            .engine
            .db
            .iterator_cf_opt(cf_state, ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let mut nk = new_range_id.to_be_bytes().to_vec();
            nk.extend_from_slice(&k[8..]);
            self.batch.put_cf(cf_state, nk, v);
        }
        self.write_dedup(new_range_id);
        Ok(())
    }

    /// Puts this batch's dedup records, deletions and session marks into
    /// the write batch, under `range_id`.
    fn write_dedup(&mut self, range_id: u64) {
        let state = self.engine.cf(keys::CF_RANGE_STATE);
        for (request_id, rec) in &self.dedup {
            let key = keys::dedup_key(range_id, request_id);
            match rec {
                Some((record, expires)) => {
                    self.batch.put_cf(state, key, dedup_value(*expires, record))
                }
                None => self.batch.delete_cf(state, key),
            }
        }
        for (session, m) in &self.sessions {
            self.batch.put_cf(
                state,
                keys::session_mark_key(range_id, session),
                dedup_value(m.expires_at_ms, &m.completed_below.to_be_bytes()),
            );
        }
    }

    /// Tells a batch that creates a range that the caller flushed the engine
    /// (with [`Engine::flush`]) after the range's last committed batch, so
    /// the commit need not flush again.
    pub fn flushed_before(&mut self) {
        self.flushed_before = true;
    }

    /// Sets the range's applied state, written in the same batch as the data.
    pub fn set_applied(&mut self, applied: &[u8]) {
        self.batch.put_cf(
            self.engine.cf(keys::CF_RANGE_STATE),
            keys::range_state_key(self.range_id, RangeStateField::Applied),
            value::frame(applied),
        );
    }

    /// Writes the batch atomically, without the WAL: the Raft log already
    /// holds every command durably, and a crash loses only applied writes
    /// newer than the last flush, which the range applies again from its log
    /// at restart (its applied state is in the same batch and so is lost
    /// with them; column families flush atomically). Writing each command a
    /// second time through the WAL cost a few percent of the puts a node
    /// does (bench/findings.md).
    ///
    /// What makes this safe (ARCHITECTURE.md, "Apply skips the WAL"): a log
    /// entry is purged only below a snapshot, whose build flushes, and a
    /// restart whose applied state is older than the snapshot file installs
    /// it first; [`Engine::flush`] runs within
    /// [`EngineOptions::applied_flush_after`] of an applied write and at a
    /// clean shutdown; dedup records are dropped only by flushed applies
    /// ([`DedupClock`]); and a batch that creates a range is written through
    /// the WAL over a flushed store (see [`ApplyBatch::create_range`]).
    pub fn commit(mut self) -> Result<(), StorageError> {
        // The other writes of the batch (applied state, a split's new range)
        // touch other keys, so their order against these does not matter.
        let data = self.engine.cf(keys::CF_DATA);
        for (key, v) in &self.data {
            match v {
                Some(v) => {
                    self.batch
                        .put_cf(data, key, value::encode_value(key, v.version, &v.value))
                }
                None => self.batch.delete_cf(data, key),
            }
        }
        self.write_dedup(self.range_id);
        if self.creates_range {
            if !self.flushed_before {
                self.engine.flush()?;
            }
            return self.engine.group_commit.write_logged(self.batch, true);
        }
        let mut unlogged = WriteOptions::default();
        unlogged.disable_wal(true);
        self.engine.db.write_opt(self.batch, &unlogged)?;
        self.engine.unflushed.note();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        (dir, e)
    }

    fn synced(e: &Engine) {
        let (tx, rx) = std::sync::mpsc::channel();
        e.sync_then(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    }

    fn applied(e: &Engine, range_id: u64, key: &[u8], value: &'static [u8], applied: &[u8]) {
        let mut b = e.apply_batch(range_id);
        b.put(key, 7, Bytes::from_static(value));
        b.set_applied(applied);
        b.commit().unwrap();
    }

    const CRASH_DIR_ENV: &str = "LMSKV_TEST_CRASH_DIR";
    const CRASH_CASE_ENV: &str = "LMSKV_TEST_CRASH_CASE";

    /// Runs `case` of [`crash_child`] in a child process on `dir` and kills
    /// it (SIGKILL) once the case's writes are made: the engine is never
    /// closed, its memtables never flushed at close.
    fn crash_after(case: &str, dir: &Path) {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::engine::tests::crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir)
            .env(CRASH_CASE_ENV, case)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let ready = out
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("crash-child-ready"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ready, "the child's writes did not finish");
    }

    /// The child of [`crash_after`]; does nothing when run on its own.
    #[test]
    #[ignore = "run by the crash tests in a child process"]
    fn crash_child() {
        let (Ok(dir), Ok(case)) = (std::env::var(CRASH_DIR_ENV), std::env::var(CRASH_CASE_ENV))
        else {
            return;
        };
        let dir = PathBuf::from(dir);
        let open = |applied_flush_after| {
            let opts = EngineOptions {
                applied_flush_after,
                ..EngineOptions::default()
            };
            Engine::open(&dir, &opts).unwrap()
        };
        match case.as_str() {
            "lose-back-to-flush" => {
                let e = open(Duration::from_secs(3600));
                e.log_append(1, &[(1, b"e1".to_vec()), (2, b"e2".to_vec())])
                    .unwrap();
                synced(&e);
                applied(&e, 1, b"k1", b"v1", b"applied-1");
                assert!(e.applied_unflushed_for().is_some());
                e.flush().unwrap();
                assert_eq!(e.applied_unflushed_for(), None);
                // Unlogged writes, each followed by a sync that covers them
                // (no logged write between: the mark must not count them).
                applied(&e, 1, b"k2", b"v2", b"applied-2");
                synced(&e);
                e.log_append(1, &[(3, b"e3".to_vec())]).unwrap();
                applied(&e, 1, b"k3", b"v3", b"applied-3");
                synced(&e);
                assert!(
                    e.get(b"k3").unwrap().is_some(),
                    "an applied write reads at once"
                );
                std::mem::forget(e);
            }
            "flushed-in-time" => {
                let e = open(Duration::from_millis(200));
                applied(&e, 1, b"k1", b"v1", b"applied-1");
                let until = Instant::now() + Duration::from_secs(30);
                while e.applied_unflushed_for().is_some() {
                    assert!(Instant::now() < until, "never flushed");
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::mem::forget(e);
            }
            "split" => {
                let e = open(Duration::from_secs(3600));
                applied(&e, 1, b"k1", b"v1", b"applied-1");
                let mut b = e.apply_batch(1);
                b.put(b"k2", 8, Bytes::from_static(b"v2"));
                b.set_applied(b"applied-2");
                b.create_range(2, b"new-applied", b"new-purged").unwrap();
                b.commit().unwrap();
                // The new range's group writes through the WAL; then the
                // parent applies on, unlogged.
                e.put_raft_state(2, RaftStateField::Vote, b"vote", true)
                    .unwrap();
                applied(&e, 1, b"k3", b"v3", b"applied-3");
                std::mem::forget(e);
            }
            other => panic!("unknown crash case {other}"),
        }
        println!("crash-child-ready");
        std::thread::sleep(Duration::from_secs(600));
    }

    /// Applied writes skip the WAL: a crash takes the store back to its last
    /// flush, data and applied state together, while every logged write
    /// (the Raft log, synced or not) stays; and the synced-sequence mark,
    /// recorded by syncs made after the unlogged writes, does not take the
    /// lost writes for lost durable ones (the store opens).
    #[test]
    fn a_crash_loses_applied_writes_back_to_the_last_flush_and_keeps_the_log() {
        let dir = tempfile::tempdir().unwrap();
        crash_after("lose-back-to-flush", dir.path());
        let e = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        assert!(e.get(b"k1").unwrap().is_some(), "a flushed write was lost");
        assert_eq!(e.get(b"k2").unwrap(), None);
        assert_eq!(e.get(b"k3").unwrap(), None);
        assert_eq!(
            e.range_state(1, RangeStateField::Applied)
                .unwrap()
                .as_deref(),
            Some(&b"applied-1"[..]),
            "the applied state goes back with its data"
        );
        let log: Vec<u64> = e
            .log_entries(1, 1, 10)
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(log, [1, 2, 3], "a logged write was lost");
    }

    /// A batch that creates a range is durable once committed, with every
    /// applied write before it: the new range never finds its state gone
    /// after a crash, and the parent resumes right after the split.
    #[test]
    fn a_batch_that_creates_a_range_survives_a_crash_with_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        crash_after("split", dir.path());
        let e = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        let state = |range, field| e.range_state(range, field).unwrap();
        assert_eq!(
            state(2, RangeStateField::Applied).as_deref(),
            Some(&b"new-applied"[..])
        );
        assert_eq!(
            e.raft_state(2, RaftStateField::Purged).unwrap().as_deref(),
            Some(&b"new-purged"[..])
        );
        assert_eq!(
            e.raft_state(2, RaftStateField::Vote).unwrap().as_deref(),
            Some(&b"vote"[..])
        );
        assert_eq!(
            state(1, RangeStateField::Applied).as_deref(),
            Some(&b"applied-2"[..])
        );
        assert!(e.get(b"k1").unwrap().is_some() && e.get(b"k2").unwrap().is_some());
        assert_eq!(e.get(b"k3").unwrap(), None, "an unflushed apply survived");
    }

    /// The engine flushes applied writes by itself once the oldest has
    /// waited `applied_flush_after`, so a crash after that loses none.
    #[test]
    fn applied_writes_are_flushed_within_the_configured_wait() {
        let dir = tempfile::tempdir().unwrap();
        crash_after("flushed-in-time", dir.path());
        let e = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        assert!(e.get(b"k1").unwrap().is_some());
        assert_eq!(
            e.range_state(1, RangeStateField::Applied)
                .unwrap()
                .as_deref(),
            Some(&b"applied-1"[..])
        );
    }

    #[test]
    fn log_entries_round_trip_per_range() {
        let (_d, e) = engine();
        e.log_append(1, &[(1, b"a".to_vec()), (2, b"b".to_vec())])
            .unwrap();
        e.log_append(2, &[(1, b"x".to_vec())]).unwrap();
        assert_eq!(e.log_entries(1, 1, 10).unwrap().len(), 2);
        assert_eq!(e.log_last(1).unwrap().unwrap().0, 2);
        assert_eq!(e.log_last(2).unwrap().unwrap().1, b"x");
        e.log_truncate_from(1, 2).unwrap();
        assert_eq!(e.log_last(1).unwrap().unwrap().0, 1);
        e.log_purge_through(1, 1, b"p").unwrap();
        assert!(e.log_last(1).unwrap().is_none());
        assert_eq!(e.log_last(2).unwrap().unwrap().0, 1);
    }

    #[test]
    fn span_size_counts_unflushed_and_flushed_data() {
        let (_d, e) = engine();
        // Incompressible values: SST files are compressed.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut b = e.apply_batch(1);
        for i in 0..100u32 {
            let value: Vec<u8> = (0..1000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            b.put(format!("b/{i:04}").as_bytes(), 1, Bytes::from(value));
        }
        b.commit().unwrap();
        // Still in the memtable: no SST file holds it yet.
        assert_eq!(e.data_sst_bytes(), 0);
        let (before_flush, _) = e.approximate_span_size(b"b/", b"c/");
        assert!(
            before_flush >= 100_000,
            "unflushed data counted: {before_flush}"
        );
        assert_eq!(
            e.approximate_span_size(b"c/", b"").0,
            0,
            "other spans empty"
        );
        let (half, _) = e.approximate_span_size(b"b/", b"b/0050");
        assert!(
            half < before_flush * 3 / 4 && half > before_flush / 4,
            "{half}"
        );
        e.flush().unwrap();
        assert!(e.data_sst_bytes() > 0);
        let (after_flush, _) = e.approximate_span_size(b"b/", b"c/");
        assert!(after_flush >= 90_000, "flushed data counted: {after_flush}");
        assert!(
            after_flush < 2 * before_flush,
            "not counted twice: {after_flush}"
        );
        assert_eq!(
            e.approximate_span_size(b"c/", b"").0,
            0,
            "other spans empty"
        );
    }

    #[test]
    fn apply_batch_sees_its_own_writes_and_is_atomic() {
        let (_d, e) = engine();
        let mut b = e.apply_batch(1);
        b.put(b"k", 5, Bytes::from_static(b"v"));
        assert_eq!(b.get(b"k").unwrap().unwrap().version, 5);
        assert!(e.get(b"k").unwrap().is_none(), "not visible before commit");
        b.set_applied(b"applied");
        b.commit().unwrap();
        assert_eq!(
            e.get(b"k").unwrap().unwrap().value,
            Bytes::from_static(b"v")
        );
        assert_eq!(
            e.range_state(1, RangeStateField::Applied).unwrap().unwrap(),
            b"applied"
        );
    }

    #[test]
    fn dedup_records_expire_by_the_applying_time_and_leave_by_compaction() {
        let (_d, e) = engine();
        let mut b = e.apply_batch(1);
        b.dedup_put(b"r1", 100, b"one".to_vec());
        b.dedup_put(b"r2", 200 + DEDUP_PURGE_GRACE_MS, b"two".to_vec());
        let mark = |expires_at_ms| SessionMark {
            completed_below: 5,
            expires_at_ms,
        };
        b.set_session_mark(b"sessionA", mark(100));
        b.set_applied(b"applied");
        assert_eq!(b.dedup_get(b"r1", 99).unwrap().unwrap(), b"one");
        assert!(
            b.dedup_get(b"r1", 100).unwrap().is_none(),
            "pending, expired"
        );
        b.commit().unwrap();
        // Expiry is decided by the time asked about, whatever is stored.
        assert_eq!(e.dedup_get(1, b"r1", 99).unwrap().unwrap(), b"one");
        assert!(e.dedup_get(1, b"r1", 100).unwrap().is_none());
        assert_eq!(e.dedup_get(1, b"r2", 150).unwrap().unwrap(), b"two");

        // A compaction keeps records while the range's clock is not past
        // their expiry by the grace, and drops them after.
        let dedup_count = || {
            let (s, end) = keys::dedup_span(1);
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(s);
            ro.set_iterate_upper_bound(end);
            e.db.iterator_cf_opt(e.cf(keys::CF_RANGE_STATE), ro, IteratorMode::Start)
                .count()
        };
        let compact = || {
            e.flush().unwrap();
            e.db.compact_range_cf(e.cf(keys::CF_RANGE_STATE), None::<&[u8]>, None::<&[u8]>);
        };
        compact();
        assert_eq!(dedup_count(), 3, "no clock: every record and mark kept");
        let clock = e.dedup_clock(1);
        clock.applied(100 + DEDUP_PURGE_GRACE_MS - 1);
        compact();
        assert_eq!(dedup_count(), 3, "within the grace");
        // Applied past the grace, but not flushed: a crash would make the
        // range apply those commands again, and they may still need it.
        clock.applied(100 + DEDUP_PURGE_GRACE_MS);
        e.db.compact_range_cf(e.cf(keys::CF_RANGE_STATE), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(dedup_count(), 3, "dropped by an apply no flush covered");
        compact();
        assert_eq!(dedup_count(), 1, "r1 and the mark dropped");
        assert_eq!(e.dedup_get(1, b"r2", 150).unwrap().unwrap(), b"two");
        assert_eq!(
            e.range_state(1, RangeStateField::Applied).unwrap().unwrap(),
            b"applied",
            "only dedup records are dropped"
        );

        // A deletion pending in a batch hides the stored record, and the
        // commit deletes it; a pending mark is seen until it expires.
        let mut b = e.apply_batch(1);
        b.dedup_delete(b"r2");
        b.set_session_mark(b"sessionB", mark(300));
        assert!(b.dedup_get(b"r2", 150).unwrap().is_none(), "pending delete");
        assert_eq!(b.session_mark(b"sessionB", 299).unwrap(), Some(mark(300)));
        assert_eq!(b.session_mark(b"sessionB", 300).unwrap(), None);
        b.commit().unwrap();
        assert!(e.dedup_get(1, b"r2", 150).unwrap().is_none(), "deleted");
        assert_eq!(
            e.session_mark_get(1, b"sessionB", 299).unwrap(),
            Some(mark(300))
        );
    }

    /// An import stopped because its replica is being removed: stopped
    /// before it begins, nothing is touched; stopped under way, the data and
    /// dedup records it wrote are deleted and the install marker stays (a
    /// restart before the removal ends resumes the install).
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_stopped_import_leaves_nothing_behind() {
        use std::sync::atomic::AtomicBool;
        let (dir, e) = engine();
        let mut b = e.apply_batch(1);
        for i in 0..50u32 {
            b.put(format!("k{i:03}").as_bytes(), 1, Bytes::from(vec![1u8; 10]));
        }
        b.dedup_put(b"req", 1000, b"rec".to_vec());
        b.set_applied(b"state-1");
        b.commit().unwrap();
        let path = dir.path().join("snap");
        e.export_snapshot(1, |_| Ok((Vec::new(), Vec::new())), &path)
            .unwrap();

        let (_d2, e2) = engine();
        let mut b = e2.apply_batch(1);
        b.put(b"k000", 9, Bytes::from_static(b"old"));
        b.set_applied(b"state-0");
        b.commit().unwrap();
        let stopped = AtomicBool::new(true);
        assert!(matches!(
            e2.import_snapshot(1, b"", b"", &path, b"state-2", &stopped),
            Err(StorageError::Aborted)
        ));
        assert_eq!(e2.get(b"k000").unwrap().unwrap().version, 9, "untouched");
        assert!(e2.pending_snapshot_install(1).unwrap().is_none());

        // Stopped after the span was cleared and the marker written.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        fail::cfg_callback("snapshot-install-import", move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst)
        })
        .unwrap();
        let r = e2.import_snapshot(1, b"", b"", &path, b"state-2", &stop);
        fail::remove("snapshot-install-import");
        assert!(matches!(r, Err(StorageError::Aborted)), "{r:?}");
        assert_eq!(
            e2.pending_snapshot_install(1).unwrap().as_deref(),
            Some(path.as_path()),
            "the marker stays for the removal to delete"
        );
        for i in 0..50u32 {
            assert!(e2.get(format!("k{i:03}").as_bytes()).unwrap().is_none());
        }
        assert!(e2.dedup_get(1, b"req", 0).unwrap().is_none(), "no dedup");
        assert_eq!(
            e2.range_state(1, RangeStateField::Applied)
                .unwrap()
                .unwrap(),
            b"state-0",
            "the applied state is the removal's to delete"
        );
    }

    #[test]
    fn snapshot_export_import_replaces_the_span() {
        let (dir, e) = engine();
        let mut b = e.apply_batch(1);
        for i in 0..100u32 {
            b.put(
                format!("k{i:03}").as_bytes(),
                i as u64 + 1,
                Bytes::from(vec![7u8; 100]),
            );
        }
        b.dedup_put(b"req", 1000, b"rec".to_vec());
        let mark = SessionMark {
            completed_below: 77,
            expires_at_ms: 1000,
        };
        b.set_session_mark(b"session1", mark);
        b.set_applied(b"state-1");
        b.commit().unwrap();
        let path = dir.path().join("snap");
        let exp = e
            .export_snapshot(1, |_| Ok((Vec::new(), Vec::new())), &path)
            .unwrap();
        assert_eq!(exp.applied.as_deref(), Some(&b"state-1"[..]));
        // The applied state, 100 values, one dedup record, one session mark.
        assert_eq!(exp.records, 103);
        assert_eq!(
            Engine::snapshot_applied_state(&path).unwrap().as_deref(),
            Some(&b"state-1"[..])
        );

        let (_d2, e2) = engine();
        let mut b = e2.apply_batch(1);
        b.put(b"stale", 1, Bytes::from_static(b"gone"));
        b.commit().unwrap();
        e2.import_snapshot(1, b"", b"", &path, b"state-2", &Default::default())
            .unwrap();
        assert!(e2.get(b"stale").unwrap().is_none());
        assert_eq!(e2.get(b"k042").unwrap().unwrap().version, 43);
        assert_eq!(e2.dedup_get(1, b"req", 999).unwrap().unwrap(), b"rec");
        assert_eq!(
            e2.session_mark_get(1, b"session1", 999).unwrap(),
            Some(mark)
        );
        assert_eq!(
            e2.session_mark_get(1, b"session1", 1000).unwrap(),
            None,
            "expired"
        );
        assert_eq!(
            e2.range_state(1, RangeStateField::Applied)
                .unwrap()
                .unwrap(),
            b"state-2"
        );
        assert!(e2.pending_snapshot_install(1).unwrap().is_none());
        let (items, more) = e2.scan(b"", b"", 1000, false, usize::MAX).unwrap();
        assert_eq!(items.len(), 100);
        assert!(!more);
    }

    #[test]
    fn scan_honours_bounds_limit_and_direction() {
        let (_d, e) = engine();
        let mut b = e.apply_batch(1);
        for k in ["a", "b", "c", "d"] {
            b.put(k.as_bytes(), 1, Bytes::from_static(b"v"));
        }
        b.commit().unwrap();
        let keys = |v: Vec<ScanItem>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        let (items, more) = e.scan(b"b", b"d", 10, false, usize::MAX).unwrap();
        assert_eq!(keys(items), vec!["b", "c"]);
        assert!(!more);
        let (items, more) = e.scan(b"a", b"", 2, true, usize::MAX).unwrap();
        assert_eq!(keys(items), vec!["d", "c"]);
        assert!(more);
    }
}
