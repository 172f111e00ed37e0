//! [`LogStore`]: a range's Raft log and vote on the node's storage engine.
//!
//! Appends are written at once (readable immediately) and reported flushed
//! only after the engine's group-commit fsync covers them.
//!
//! The newest entries of the log are also kept in memory ([`LogCache`]):
//! replication reads each entry right after it is appended and apply reads
//! it again once committed, and serving those reads from RocksDB (an
//! iterator and a decode each time) cost some 5% of a node's CPU under a
//! steady write load. Older entries (a follower far behind) come from
//! RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::codec::{decode, encode};
use super::TypeConfig;
use crate::storage::keys::RaftStateField;
use crate::storage::{ByteBudget, Engine};

/// Entries read from the log in one bounded read at most: a replication
/// read (openraft asks again for more) or one page of the apply stream.
pub const LOG_READ_ENTRIES_MAX: u64 = 4_096;

/// Entries one range keeps in its [`LogCache`] at most.
pub const LOG_CACHE_ENTRIES_MAX: usize = 1_024;
/// Encoded bytes of the entries one range keeps in its cache at most.
pub const LOG_CACHE_RANGE_BYTES_MAX: usize = 4 << 20;
/// The committed log id is written at most this often: openraft reports
/// every advance (one RocksDB write each, some 3% of a node's CPU under
/// puts), and it is only a hint that lets a restarted node apply its log
/// before a leader tells it the commit index. An older one is as safe.
const COMMITTED_SAVE_INTERVAL: Duration = Duration::from_millis(200);

/// The newest entries of one range's log, in memory: always a contiguous
/// run that ends at the last entry appended (or empty), so a read starting
/// inside it is answered from it alone. Each entry owns its bytes, so the
/// encoded sizes it counts are what it holds. Every range's cache on an
/// engine takes its bytes from the engine's one [`ByteBudget`]
/// (`log_cache_bytes`), so together they never hold more.
#[derive(Debug)]
pub struct LogCache {
    /// Entries in index order, each with its encoded size.
    entries: VecDeque<(EntryOf<TypeConfig>, usize)>,
    bytes: usize,
    budget: Arc<ByteBudget>,
}

impl LogCache {
    fn new(budget: Arc<ByteBudget>) -> Self {
        LogCache {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index())
    }

    /// Uncounts an entry of `n` encoded bytes that left the cache.
    fn forget(&mut self, n: usize) {
        self.bytes -= n;
        self.budget.give_back(n);
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.forget(n);
        }
    }

    fn pop_back(&mut self) {
        if let Some((_, n)) = self.entries.pop_back() {
            self.forget(n);
        }
    }

    fn clear(&mut self) {
        self.budget.give_back(self.bytes);
        self.entries.clear();
        self.bytes = 0;
    }

    /// Adds entries just appended to the log (in index order). Entries that
    /// do not follow the cached ones replace them.
    fn append(&mut self, entries: Vec<(EntryOf<TypeConfig>, usize)>) {
        for (e, n) in entries {
            if self.last_index().is_some_and(|l| l + 1 != e.index()) {
                self.clear();
            }
            if n > LOG_CACHE_RANGE_BYTES_MAX || !self.budget.try_take(n) {
                // Too large, or the engine's budget is spent: this range
                // lets its cache go (and its bytes to the other ranges)
                // and caches again from its next append that fits.
                self.clear();
                continue;
            }
            self.bytes += n;
            self.entries.push_back((e, n));
            while self.entries.len() > LOG_CACHE_ENTRIES_MAX
                || self.bytes > LOG_CACHE_RANGE_BYTES_MAX
            {
                self.pop_front();
            }
        }
    }

    /// Drops the entries with index `>= index` (the log was truncated there).
    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|l| l >= index) {
            self.pop_back();
        }
    }

    /// Drops the entries with index `<= index` (the log was purged there).
    fn purge_through(&mut self, index: u64) {
        while self.first_index().is_some_and(|f| f <= index) {
            self.pop_front();
        }
    }

    /// The entries with index in `[start, end)` when the cache holds the
    /// log from `start` on; `None` when the read must go to the engine.
    fn read(&self, start: u64, end: u64) -> Option<Vec<EntryOf<TypeConfig>>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let len = self.entries.len();
        let from = usize::try_from(start - first).unwrap_or(len).min(len);
        let to = usize::try_from(end.saturating_sub(first))
            .unwrap_or(len)
            .clamp(from, len);
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

impl Drop for LogCache {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The Raft log of one range.
#[derive(Debug, Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    range_id: u64,
    /// The node keeping this log: appends of entries it made (as leader)
    /// are synced by the syncer thread, others where they are made when the
    /// syncer is idle (see `append`).
    node_id: Option<u64>,
    /// Shared by the store and its readers (replication streams).
    cache: Arc<Mutex<LogCache>>,
    /// When the committed log id was last written.
    committed_saved_at: Option<Instant>,
    /// The latest committed log id reported, written or not.
    committed: Option<Option<LogIdOf<TypeConfig>>>,
}

impl LogStore {
    /// The log of `range_id` in `engine`, kept by node `node_id` (`None`:
    /// every append is synced by the syncer thread).
    pub fn new(engine: Arc<Engine>, range_id: u64, node_id: Option<u64>) -> Self {
        let cache = LogCache::new(engine.log_cache_budget().clone());
        LogStore {
            engine,
            range_id,
            node_id,
            cache: Arc::new(Mutex::new(cache)),
            committed_saved_at: None,
            committed: None,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LogCache> {
        self.cache.lock().expect("log cache lock")
    }

    fn state<T: serde::de::DeserializeOwned>(
        &self,
        field: RaftStateField,
    ) -> io::Result<Option<T>> {
        match self.engine.raft_state(self.range_id, field)? {
            Some(b) => Ok(Some(decode("raft state", &b)?)),
            None => Ok(None),
        }
    }
}

/// The `[start, end)` indexes `range` covers.
fn index_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl LogStore {
    /// The entries in `[start, end)` that the log holds, from the cache
    /// when it has them all.
    fn read_entries(&self, start: u64, end: u64) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        if let Some(hit) = self.cache().read(start, end) {
            return Ok(hit);
        }
        let raw = self.engine.log_entries(self.range_id, start, end)?;
        let mut out = Vec::with_capacity(raw.len());
        for (index, payload) in raw {
            let entry: EntryOf<TypeConfig> = decode("raft log entry", &payload)?;
            if entry.index() != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "range {} log key {index} holds entry {}",
                        self.range_id,
                        entry.index()
                    ),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    /// Every entry of `range` the log holds: openraft's contract for this
    /// call allows no early stop (its default `entries_stream` reads a whole
    /// apply range through it). Replication reads through the bounded
    /// [`RaftLogReader::limited_get_log_entries`], and apply through the
    /// paged [`RaftLogReader::entries_stream`] below.
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let (start, end) = index_bounds(&range);
        self.read_entries(start, end)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        self.read_entries(start, end.min(start.saturating_add(LOG_READ_ENTRIES_MAX)))
    }

    /// The entries of `range`, read [`LOG_READ_ENTRIES_MAX`] at a time (a
    /// node applying a long backlog holds one page of it in memory, not all
    /// of it). A page that comes back short before the range's end, or
    /// (after the first) starts late, is a hole in the log and ends the
    /// stream with an error, never silently; entries missing at the range's
    /// start (purged) or end (not appended yet) are left out, as openraft's
    /// contract allows.
    async fn entries_stream<RB>(
        &mut self,
        range: RB,
    ) -> impl futures::Stream<Item = Result<EntryOf<TypeConfig>, io::Error>> + OptionalSend
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        use futures::StreamExt;
        let (start, end) = index_bounds(&range);
        let this = self.clone();
        futures::stream::unfold(Some(start), move |from| {
            let this = this.clone();
            async move {
                let from = from?;
                if from >= end {
                    return None;
                }
                let to = end.min(from.saturating_add(LOG_READ_ENTRIES_MAX));
                let page = match this.read_entries(from, to) {
                    Ok(page) => page,
                    Err(e) => return Some((futures::stream::iter(vec![Err(e)]), None)),
                };
                let next = page.last().map(|e| e.index() + 1);
                let short = next.is_none_or(|n| n < to);
                // Only the range's first page may start late (entries purged
                // before it); a later page starting late skipped a hole.
                let late = from != start && page.first().is_some_and(|e| e.index() != from);
                if (short && to < end) || late {
                    // Entries are missing inside the range: the caller must
                    // not take the range as read whole.
                    let missing_from = if late { from } else { next.unwrap_or(from) };
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "range {}: log entries missing from {missing_from} (reading {start} to {end})",
                            this.range_id,
                        ),
                    );
                    // Entries after a hole are not handed out.
                    let mut items: Vec<_> = if late {
                        Vec::new()
                    } else {
                        page.into_iter().map(Ok).collect()
                    };
                    items.push(Err(e));
                    return Some((futures::stream::iter(items), None));
                }
                let more = if short { None } else { next };
                let items: Vec<_> = page.into_iter().map(Ok).collect();
                Some((futures::stream::iter(items), more))
            }
        })
        .flatten()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.state(RaftStateField::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogIdOf<TypeConfig>> = self.state(RaftStateField::Purged)?;
        let last = match self.engine.log_last(self.range_id)? {
            Some((_, payload)) => {
                let e: EntryOf<TypeConfig> = decode("raft log entry", &payload)?;
                Some(e.log_id())
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        // A vote must be durable before it is acted on: sync now.
        self.engine
            .put_raft_state(self.range_id, RaftStateField::Vote, &encode(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Durability is not required: it only speeds up recovery.
        self.committed = Some(committed);
        if self
            .committed_saved_at
            .is_some_and(|at| at.elapsed() < COMMITTED_SAVE_INTERVAL)
        {
            return Ok(());
        }
        self.committed_saved_at = Some(Instant::now());
        self.engine.put_raft_state(
            self.range_id,
            RaftStateField::Committed,
            &encode(&committed)?,
            false,
        )?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        if let Some(c) = self.committed {
            return Ok(c);
        }
        Ok(self
            .state::<Option<LogIdOf<TypeConfig>>>(RaftStateField::Committed)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        let mut cached = Vec::new();
        // Whether this replica made the entries (it leads) or received them.
        let mut own = false;
        for e in entries {
            own |= self.node_id == Some(e.log_id().leader_id.node_id);
            let payload = encode(&e)?;
            // The cache keeps a copy decoded from the payload rather than the
            // entry itself: a leader's entries hold keys and values that
            // share the buffers its requests arrived in, which the cache
            // would keep alive beyond what it counts.
            let copy: EntryOf<TypeConfig> = decode("raft log entry", &payload)?;
            cached.push((copy, payload.len()));
            batch.push((e.index(), payload));
        }
        if let Err(e) = self.engine.log_append(self.range_id, &batch) {
            // What reached the log is unknown: read it from the engine.
            self.cache().clear();
            return Err(e.into());
        }
        self.cache().append(cached);
        let done: crate::storage::SyncCallback = Box::new(move |res| {
            callback.io_completed(res.map_err(io::Error::from));
        });
        if own {
            // A leader goes on at once (its appends reach the followers
            // while it syncs), and shares the syncer's fsyncs.
            self.engine.sync_then(done);
        } else {
            // A follower answers only once synced, and has nothing else to
            // do for the range meanwhile: sync here when the syncer is idle.
            self.engine.sync_here_when_idle(done);
        }
        Ok(())
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.cache().truncate_from(from);
        if let Err(e) = self.engine.log_truncate_from(self.range_id, from) {
            self.cache().clear();
            return Err(e.into());
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        self.cache().purge_through(log_id.index());
        if let Err(e) =
            self.engine
                .log_purge_through(self.range_id, log_id.index(), &encode(&log_id)?)
        {
            self.cache().clear();
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::EngineOptions;
    use openraft::alias::LeaderIdOf;
    use openraft::vote::RaftLeaderId;

    fn log_id(term: u64, index: u64) -> LogIdOf<TypeConfig> {
        LogIdOf::<TypeConfig>::new(LeaderIdOf::<TypeConfig>::new(term, 1).to_committed(), index)
    }

    fn blanks(term: u64, from: u64, to: u64) -> Vec<EntryOf<TypeConfig>> {
        (from..=to)
            .map(|i| EntryOf::<TypeConfig>::new_blank(log_id(term, i)))
            .collect()
    }

    fn ids(entries: &[EntryOf<TypeConfig>]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id().committed_leader_id().term, e.index()))
            .collect()
    }

    /// A log store of `range_id` on a fresh engine (the directory lives
    /// as long as the returned guard).
    fn open_store(range_id: u64) -> (tempfile::TempDir, Arc<Engine>, LogStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(
            Engine::open(&dir.path().join("db"), &EngineOptions::default()).expect("engine"),
        );
        let store = LogStore::new(engine.clone(), range_id, None);
        (dir, engine, store)
    }

    /// A put of `len` bytes at index `i` (term 1); entries of one `len`
    /// encode to one size.
    fn put_entry(i: u64, len: usize) -> EntryOf<TypeConfig> {
        use crate::raft::command::{Command, Op};
        EntryOf::<TypeConfig>::new_normal(
            log_id(1, i),
            Command {
                request_id: bytes::Bytes::new(),
                proposed_at_ms: 0,
                op: Op::Put {
                    key: bytes::Bytes::from(format!("k{i:08}")),
                    value: bytes::Bytes::from(vec![i as u8; len]),
                },
            },
        )
    }

    async fn append_puts(store: &mut LogStore, from: u64, to: u64) {
        for i in from..=to {
            store
                .append(vec![put_entry(i, 1_000)], IOFlushed::noop())
                .await
                .expect("append");
        }
    }

    async fn append_blanks(store: &mut LogStore, term: u64, from: u64, to: u64) {
        store
            .append(blanks(term, from, to), IOFlushed::noop())
            .await
            .expect("append");
    }

    /// A follower's append (entries another node made) is durable and
    /// reported flushed before `append` returns when the syncer is idle;
    /// the leader's own append is reported by the syncer thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_followers_append_is_reported_flushed_before_it_returns() {
        let (_dir, engine, _) = open_store(3);
        // `blanks` are entries node 1 made: node 2 follows.
        let mut follower = LogStore::new(engine.clone(), 3, Some(2));
        let (tx, mut rx) = <openraft_rt_tokio::TokioOneshot as openraft_rt::Oneshot>::channel();
        follower
            .append(blanks(1, 1, 3), IOFlushed::signal(tx))
            .await
            .expect("append");
        assert!(
            matches!(rx.try_recv(), Ok(Ok(()))),
            "not reported flushed when append returned"
        );

        let mut leader = LogStore::new(engine.clone(), 4, Some(1));
        let (tx, rx) = <openraft_rt_tokio::TokioOneshot as openraft_rt::Oneshot>::channel();
        leader
            .append(blanks(1, 1, 3), IOFlushed::signal(tx))
            .await
            .expect("append");
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .expect("reported in time");
        assert!(matches!(flushed, Ok(Ok(()))), "{flushed:?}");
    }

    /// The apply path reads committed entries with one
    /// `try_get_log_entries` or `entries_stream` call, which must return
    /// the whole range however long; only replication's read is bounded.
    #[tokio::test]
    async fn long_reads_return_every_entry_and_a_hole_is_an_error() {
        use futures::StreamExt;
        let (_dir, engine, mut store) = open_store(3);
        let last = 2 * LOG_READ_ENTRIES_MAX + 500;
        append_blanks(&mut store, 1, 1, last).await;
        let all = store.try_get_log_entries(1..=last).await.expect("read");
        assert_eq!(ids(&all), (1..=last).map(|i| (1, i)).collect::<Vec<_>>());
        let limited = store
            .limited_get_log_entries(1, last + 1)
            .await
            .expect("read");
        assert_eq!(limited.len() as u64, LOG_READ_ENTRIES_MAX);
        let streamed: Vec<_> = store
            .entries_stream(1..last + 1)
            .await
            .map(|e| e.expect("entry"))
            .collect()
            .await;
        assert_eq!(ids(&streamed), ids(&all));
        // Past the log's end the stream ends with the last entry.
        let tail: Vec<_> = store
            .entries_stream(last - 2..last + 100)
            .await
            .collect()
            .await;
        assert_eq!(tail.len(), 3);

        // A log with a hole (entry 5,000 missing) in range 4.
        let raw: Vec<(u64, Vec<u8>)> = (1..=10_000u64)
            .filter(|i| *i != 5_000)
            .map(|i| (i, encode(&blanks(1, i, i)[0]).expect("encode")))
            .collect();
        engine.log_append(4, &raw).expect("append");
        let mut holed = LogStore::new(engine.clone(), 4, None);
        let read: Vec<_> = holed.entries_stream(1..10_001).await.collect().await;
        let ok = read.iter().take_while(|e| e.is_ok()).count();
        assert_eq!(ok, 4_999, "entries before the hole");
        assert!(
            read.last().is_some_and(|e| e.is_err()),
            "the stream ends with an error at the hole"
        );
        assert_eq!(read.len(), 5_000);

        // A hole at a page's first entry.
        let first_of_page2 = LOG_READ_ENTRIES_MAX + 1;
        let raw: Vec<(u64, Vec<u8>)> = (1..=10_000u64)
            .filter(|i| *i != first_of_page2)
            .map(|i| (i, encode(&blanks(1, i, i)[0]).expect("encode")))
            .collect();
        engine.log_append(5, &raw).expect("append");
        let mut holed = LogStore::new(engine.clone(), 5, None);
        let read: Vec<_> = holed.entries_stream(1..10_001).await.collect().await;
        let ok = read.iter().take_while(|e| e.is_ok()).count() as u64;
        assert_eq!(ok, LOG_READ_ENTRIES_MAX, "entries before the hole");
        assert!(
            read.last().is_some_and(|e| e.is_err()),
            "the stream ends with an error at a hole on a page boundary"
        );
    }

    /// Every read through the cached store must return what the same read
    /// returns from the engine alone (a store without a cache of its own).
    async fn assert_reads_match(store: &mut LogStore, engine: &Arc<Engine>, last: u64) {
        for (start, end) in [
            (0, last + 5),
            (1, 4),
            (last - 3, last + 1),
            (last, last + 1),
        ]
        .into_iter()
        .chain((0..=last + 1).step_by(37).map(|s| (s, s + 50)))
        {
            let cached = store.try_get_log_entries(start..end).await.expect("read");
            let mut plain = LogStore::new(engine.clone(), store.range_id, None);
            let stored = plain.try_get_log_entries(start..end).await.expect("read");
            assert_eq!(ids(&cached), ids(&stored), "entries {start}..{end}");
        }
    }

    #[tokio::test]
    async fn cached_reads_match_the_log_through_appends_truncations_and_purges() {
        let (_dir, engine, mut store) = open_store(3);
        append_blanks(&mut store, 1, 1, 300).await;
        assert_reads_match(&mut store, &engine, 300).await;
        // A new leader overwrites the tail.
        store
            .truncate_after(Some(log_id(1, 250)))
            .await
            .expect("truncate");
        append_blanks(&mut store, 2, 251, 270).await;
        assert_reads_match(&mut store, &engine, 270).await;
        let tail = store.try_get_log_entries(260..300).await.expect("read");
        assert_eq!(ids(&tail), (260..=270).map(|i| (2, i)).collect::<Vec<_>>());
        store.purge(log_id(1, 100)).await.expect("purge");
        assert_reads_match(&mut store, &engine, 270).await;
        let after_purge = store.try_get_log_entries(0..5).await.expect("read");
        assert!(after_purge.is_empty(), "purged entries are gone");
        // Appends that do not follow the cached entries (after a snapshot
        // moved the log on) replace them.
        store.purge(log_id(2, 270)).await.expect("purge");
        append_blanks(&mut store, 3, 500, 510).await;
        let read = store.try_get_log_entries(500..600).await.expect("read");
        assert_eq!(ids(&read), (500..=510).map(|i| (3, i)).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_cache_keeps_only_the_newest_entries_and_older_ones_come_from_the_engine() {
        let (_dir, engine, mut store) = open_store(4);
        let n = (LOG_CACHE_ENTRIES_MAX as u64) * 2 + 10;
        for from in (1..=n).step_by(100) {
            append_blanks(&mut store, 1, from, (from + 99).min(n)).await;
        }
        {
            let cache = store.cache();
            assert_eq!(cache.entries.len(), LOG_CACHE_ENTRIES_MAX);
            assert_eq!(cache.last_index(), Some(n));
            assert!(cache.bytes <= LOG_CACHE_RANGE_BYTES_MAX);
        }
        let old = store.try_get_log_entries(1..11).await.expect("read");
        assert_eq!(ids(&old), (1..=10).map(|i| (1, i)).collect::<Vec<_>>());
        assert_reads_match(&mut store, &engine, n).await;
    }

    /// Entries of 600 KiB: the range's byte budget, not the entry count,
    /// bounds the cache; the entries it let go are read from the engine
    /// with their payloads intact, and one larger than the whole budget is
    /// not cached at all.
    #[tokio::test]
    async fn the_cache_keeps_to_its_byte_budget_and_evicted_entries_come_from_the_engine() {
        use crate::raft::command::{Command, Op};
        let (_dir, engine, mut store) = open_store(5);
        let entry = put_entry;
        let value_of = |e: &EntryOf<TypeConfig>| match &e.payload {
            openraft::EntryPayload::Normal(Command {
                op: Op::Put { value, .. },
                ..
            }) => value.clone(),
            other => panic!("entry {} is not a put: {other:?}", e.index()),
        };
        let big = 600 << 10;
        let n = 20u64;
        for i in 1..=n {
            store
                .append(vec![entry(i, big)], IOFlushed::noop())
                .await
                .expect("append");
        }
        {
            let cache = store.cache();
            assert!(cache.bytes <= LOG_CACHE_RANGE_BYTES_MAX, "{}", cache.bytes);
            assert!(cache.entries.len() < n as usize, "nothing was evicted");
            assert!(
                !cache.entries.is_empty(),
                "the newest entries were not kept"
            );
            assert_eq!(cache.last_index(), Some(n));
        }
        let all = store.try_get_log_entries(1..=n).await.expect("read");
        assert_eq!(ids(&all), (1..=n).map(|i| (1, i)).collect::<Vec<_>>());
        for e in &all {
            let v = value_of(e);
            assert_eq!(v.len(), big, "entry {}", e.index());
            assert!(
                v.iter().all(|b| *b == e.index() as u8),
                "entry {}",
                e.index()
            );
        }

        // Larger than the range's whole budget: the cache lets go of
        // everything, and the entry is still read back from the engine.
        let huge = n + 1;
        store
            .append(
                vec![entry(huge, LOG_CACHE_RANGE_BYTES_MAX + 1)],
                IOFlushed::noop(),
            )
            .await
            .expect("append");
        assert!(store.cache().entries.is_empty());
        let read = store.try_get_log_entries(huge..=huge).await.expect("read");
        assert_eq!(value_of(&read[0]).len(), LOG_CACHE_RANGE_BYTES_MAX + 1);
        assert_reads_match(&mut store, &engine, huge).await;
    }

    /// Every range's cache on an engine takes its bytes from the engine's
    /// one budget (`log_cache_bytes`): the ranges together never hold
    /// more; a range whose append finds the budget spent keeps nothing and
    /// reads from the engine; bytes a range lets go (a purge, a closed
    /// store) serve the others again; and a budget of 0 caches nothing.
    #[tokio::test]
    async fn the_ranges_of_an_engine_share_one_log_cache_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let max = 64 << 10;
        let opts = EngineOptions {
            log_cache_bytes: max,
            ..EngineOptions::default()
        };
        let engine = Arc::new(Engine::open(&dir.path().join("db"), &opts).expect("engine"));
        let budget = engine.log_cache_budget().clone();
        let mut a = LogStore::new(engine.clone(), 10, None);
        let mut b = LogStore::new(engine.clone(), 11, None);

        append_puts(&mut a, 1, 1).await;
        let one = a.cache().bytes;
        assert!(one > 1_000, "an entry encodes to {one} bytes");
        // Range a takes the budget up to the last whole entry.
        let fits = (max / one) as u64;
        assert!(fits > 10 && fits < LOG_CACHE_ENTRIES_MAX as u64, "{fits}");
        append_puts(&mut a, 2, fits).await;
        assert_eq!(a.cache().entries.len() as u64, fits);
        assert_eq!(budget.used(), fits as usize * one);

        // Range b finds the budget spent: it caches nothing, and its reads
        // come from the engine, whole.
        append_puts(&mut b, 1, 5).await;
        assert!(b.cache().entries.is_empty());
        assert_eq!(budget.used(), fits as usize * one);
        assert_reads_match(&mut b, &engine, 5).await;

        // Range a's purge gives its older entries' bytes back, and range
        // b's next appends are cached.
        let half = fits / 2;
        a.purge(log_id(1, half)).await.expect("purge");
        assert_eq!(a.cache().first_index(), Some(half + 1));
        append_puts(&mut b, 6, 10).await;
        assert_eq!(b.cache().entries.len(), 5);
        assert_eq!(b.cache().first_index(), Some(6));
        assert_eq!(budget.used(), a.cache().bytes + b.cache().bytes);
        assert!(budget.used() <= max);
        assert_reads_match(&mut b, &engine, 10).await;

        // A range that keeps appending never takes the sum past the budget:
        // when its take fails it lets its own cache go and starts again.
        for i in 11..=(3 * fits) {
            append_puts(&mut b, i, i).await;
            assert!(budget.used() <= max, "{} > {max} at {i}", budget.used());
            assert_eq!(budget.used(), a.cache().bytes + b.cache().bytes);
        }
        assert_reads_match(&mut b, &engine, 3 * fits).await;
        assert_reads_match(&mut a, &engine, fits).await;

        // A closed store gives back all it held.
        drop(a);
        assert_eq!(budget.used(), b.cache().bytes);
        drop(b);
        assert_eq!(budget.used(), 0);

        // No budget: nothing is cached, every read comes from the engine.
        let dir0 = tempfile::tempdir().expect("tempdir");
        let opts = EngineOptions {
            log_cache_bytes: 0,
            ..EngineOptions::default()
        };
        let engine0 = Arc::new(Engine::open(&dir0.path().join("db"), &opts).expect("engine"));
        let mut c = LogStore::new(engine0.clone(), 12, None);
        append_puts(&mut c, 1, 20).await;
        assert!(c.cache().entries.is_empty());
        assert_eq!(engine0.log_cache_budget().used(), 0);
        assert_reads_match(&mut c, &engine0, 20).await;
    }
}
