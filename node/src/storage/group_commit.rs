//! Group commit: one WAL fsync covers every write that was waiting for it.
//!
//! Writers put their batch into RocksDB without syncing (so it is readable at
//! once), then hand a completion callback to the syncer thread. The thread
//! takes every callback queued so far, syncs the WAL once and completes them
//! all: appends of many ranges and many client writes share one fsync. The WAL
//! is a single sequential file, so a sync started after a write was made
//! durably covers it.
//!
//! Writes that go to the WAL are made through [`GroupCommit::write_logged`],
//! which keeps the synced-sequence mark true while other writes skip the WAL
//! (a state machine's applied batches, see `Engine`): the mark a sync records
//! is the last sequence number of the latest logged write it covers, or the
//! number just before that write when another write took sequence numbers
//! meanwhile; never a sequence number only an unlogged write holds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::durability::SyncedMark;
use super::StorageError;

/// A callback completed once the writes made before it was queued are durable.
pub type SyncCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send + 'static>;

/// Callbacks that may wait for the syncer at once; more blocks the writer (back-pressure).
pub const SYNC_QUEUE_CALLBACKS_MAX: usize = 16_384;
/// Callbacks completed by one fsync at most.
pub const SYNC_GROUP_CALLBACKS_MAX: usize = 4_096;

/// Handle to the WAL syncer thread.
pub struct GroupCommit {
    db: Arc<rocksdb::DB>,
    /// Held by whoever syncs: the thread, or a caller syncing in place.
    mark: Arc<Mutex<SyncedMark>>,
    /// The highest sequence number a write that went to the WAL is known
    /// to reach (see [`GroupCommit::write_logged`]): a sync started after
    /// the write returned records it as durable.
    logged: Arc<AtomicU64>,
    /// Callbacks queued for the thread and not completed yet.
    queued: Arc<AtomicUsize>,
    /// Client requests the node is serving now (see [`Foreground`]).
    foreground: Arc<AtomicUsize>,
    /// `None` in inline mode: every sync runs on the caller's thread, so a
    /// simulation's clock sees it happen at a definite point (no thread).
    tx: Option<SyncSender<SyncCallback>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the syncer thread over `db`.
    pub fn start(db: Arc<rocksdb::DB>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<SyncCallback>(SYNC_QUEUE_CALLBACKS_MAX);
        let mark = Arc::new(Mutex::new(SyncedMark::new(db.path())));
        let queued = Arc::new(AtomicUsize::new(0));
        let logged = Arc::new(AtomicU64::new(0));
        let thread = {
            let (db, mark, queued, logged) =
                (db.clone(), mark.clone(), queued.clone(), logged.clone());
            std::thread::Builder::new()
                .name("lmskv-wal-sync".into())
                .spawn(move || run(db, mark, logged, queued, rx))
                .expect("spawn WAL sync thread")
        };
        GroupCommit {
            db,
            mark,
            logged,
            queued,
            foreground: Arc::default(),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Syncs on the caller's thread, one fsync per call, without a syncer
    /// thread: for the deterministic simulation only (no group commit).
    pub fn inline(db: Arc<rocksdb::DB>) -> Self {
        GroupCommit {
            mark: Arc::new(Mutex::new(SyncedMark::new(db.path()))),
            logged: Arc::new(AtomicU64::new(0)),
            db,
            queued: Arc::new(AtomicUsize::new(0)),
            foreground: Arc::default(),
            tx: None,
            thread: None,
        }
    }

    /// Queues `done` to be completed after the next WAL sync.
    pub fn sync(&self, done: SyncCallback) {
        let Some(tx) = &self.tx else {
            let res = sync_wal(
                &self.db,
                &self.logged,
                &mut self.mark.lock().expect("mark lock"),
            );
            done(res);
            return;
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        let failed = match tx.try_send(done) {
            Ok(()) => None,
            // Back-pressure: wait for the syncer to make room.
            Err(TrySendError::Full(done)) => tx.send(done).err().map(|mpsc::SendError(d)| d),
            Err(TrySendError::Disconnected(done)) => Some(done),
        };
        if let Some(done) = failed {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            done(Err(StorageError::Closed));
        }
    }

    /// Syncs on the caller's thread when the syncer has nothing to do
    /// (nothing queued, no sync running) and the node serves no client
    /// request, and completes `done` before returning; otherwise queues it
    /// as [`GroupCommit::sync`] does.
    ///
    /// For a writer that has nothing else to do until its write is durable
    /// (a follower's append, answered only once synced): it saves the two
    /// thread hand-offs to the syncer and back (some 300 µs of a lone
    /// write's time on a follower, in a trace on a 2-core VM). Under load
    /// the syncer is busy and the writes still share its fsyncs. A node
    /// serving client requests (it leads other ranges) does not block its
    /// worker for the fsync: those requests would wait behind it.
    pub fn sync_here_when_idle(&self, done: SyncCallback) {
        if self.tx.is_some()
            && self.queued.load(Ordering::SeqCst) == 0
            && self.foreground.load(Ordering::SeqCst) == 0
        {
            if let Ok(mut mark) = self.mark.try_lock() {
                let res = sync_wal(&self.db, &self.logged, &mut mark);
                // Not held while `done` runs, which may queue more work.
                drop(mark);
                done(res);
                return;
            }
        }
        self.sync(done);
    }

    /// Writes `batch` through the WAL (`sync`: synced before returning), and
    /// notes it for the synced-sequence mark: a sync started after this
    /// returns records the write's last sequence number when no other write
    /// took one between (the sequence moved by exactly the batch's count),
    /// else the number just before it; either way a store that kept the
    /// write opens at or above the mark.
    pub fn write_logged(&self, batch: rocksdb::WriteBatch, sync: bool) -> Result<(), StorageError> {
        let count = batch.len() as u64;
        let before = self.db.latest_sequence_number();
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;
        let after = self.db.latest_sequence_number();
        let covered = if after.checked_sub(before) == Some(count) {
            after
        } else {
            before
        };
        self.logged.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    /// Marks a client request as being served until the guard is dropped:
    /// meanwhile no append is synced in place (see
    /// [`GroupCommit::sync_here_when_idle`]).
    pub fn foreground(&self) -> Foreground {
        self.foreground.fetch_add(1, Ordering::SeqCst);
        Foreground(self.foreground.clone())
    }
}

/// A client request being served; see [`GroupCommit::foreground`].
#[derive(Debug)]
pub struct Foreground(Arc<AtomicUsize>);

impl Drop for Foreground {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One WAL fsync, between the fail points around it.
fn sync_wal(
    db: &rocksdb::DB,
    logged: &AtomicU64,
    mark: &mut SyncedMark,
) -> Result<(), StorageError> {
    // Read before the sync: every logged write up to it is durable once the
    // sync returns, and is marked so before any of them is acknowledged.
    // Not the database's latest sequence number: that may belong to a write
    // made without the WAL, which a crash loses by design, and a mark above
    // what a replay can reach would fail the next open as lost writes.
    let seq = logged.load(Ordering::SeqCst);
    crate::fail_point!("log-sync-before");
    db.flush_wal(true)?;
    crate::fail_point!("log-sync-after");
    mark.record(seq);
    Ok(())
}

fn run(
    db: Arc<rocksdb::DB>,
    mark: Arc<Mutex<SyncedMark>>,
    logged: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
    rx: Receiver<SyncCallback>,
) {
    let mut group: Vec<SyncCallback> = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < SYNC_GROUP_CALLBACKS_MAX {
            match rx.try_recv() {
                Ok(cb) => group.push(cb),
                Err(_) => break,
            }
        }
        let res = {
            let mut mark = mark.lock().expect("mark lock");
            sync_wal(&db, &logged, &mut mark).map_err(|e| e.to_string())
        };
        let n = group.len();
        for cb in group.drain(..) {
            cb(res.clone().map_err(StorageError::Rocks));
        }
        queued.fetch_sub(n, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    fn open(dir: &std::path::Path) -> Arc<rocksdb::DB> {
        Arc::new(rocksdb::DB::open_default(dir).unwrap())
    }

    fn put_logged(gc: &GroupCommit, k: &[u8], v: &[u8]) {
        let mut b = rocksdb::WriteBatch::default();
        b.put(k, v);
        gc.write_logged(b, false).unwrap();
    }

    fn marked(dir: &std::path::Path) -> Option<u64> {
        super::super::durability::read_synced(dir).unwrap()
    }

    /// The mark a sync records covers the logged writes made before it and
    /// never a write made without the WAL (which a crash loses), so a store
    /// that lost only such writes does not open below its mark.
    #[test]
    fn the_mark_counts_logged_writes_and_never_unlogged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let gc = GroupCommit::start(db.clone());
        let sync = |gc: &GroupCommit| {
            let (tx, rx) = channel();
            gc.sync(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        };

        put_logged(&gc, b"k1", b"v1");
        let logged = db.latest_sequence_number();
        sync(&gc);
        assert_eq!(
            marked(dir.path()),
            Some(logged),
            "a lone logged write is marked exactly"
        );

        let mut unlogged = rocksdb::WriteOptions::default();
        unlogged.disable_wal(true);
        db.put_opt(b"k2", b"v2", &unlogged).unwrap();
        assert!(db.latest_sequence_number() > logged);
        sync(&gc);
        assert_eq!(
            marked(dir.path()),
            Some(logged),
            "an unlogged write raised the mark"
        );

        // A logged write after an unlogged one is marked exactly again.
        put_logged(&gc, b"k3", b"v3");
        let logged = db.latest_sequence_number();
        sync(&gc);
        assert_eq!(marked(dir.path()), Some(logged));
    }

    /// A write synced in place is durable, its callback completed, and the
    /// synced-sequence mark covering it recorded, before the call returns;
    /// while a sync is running the call queues instead, and the callback
    /// comes once the syncer has synced again.
    #[test]
    fn an_idle_syncer_lets_the_caller_sync_in_place_and_a_busy_one_takes_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let gc = GroupCommit::start(db.clone());

        put_logged(&gc, b"k1", b"v1");
        let seq = db.latest_sequence_number();
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert_eq!(rx.try_recv(), Ok(true), "completed before returning");
        let mark = marked(dir.path());
        assert!(mark >= Some(seq), "mark {mark:?} below {seq}");

        // A sync is running (the mark is held): the write is queued.
        let held = gc.mark.lock().unwrap();
        put_logged(&gc, b"k2", b"v2");
        let seq = db.latest_sequence_number();
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.try_recv().is_err(), "completed while a sync was running");
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        let mark = marked(dir.path());
        assert!(mark >= Some(seq), "mark {mark:?} below {seq}");

        // Callbacks still queued: the next write queues behind them.
        let held = gc.mark.lock().unwrap();
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        gc.sync(Box::new(move |r| tx.send(("queued", r.is_ok())).unwrap()));
        gc.sync_here_when_idle(Box::new(move |r| tx2.send(("next", r.is_ok())).unwrap()));
        assert!(rx.try_recv().is_err(), "completed ahead of the queue");
        drop(held);
        let got: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, [("queued", true), ("next", true)]);
    }

    /// While the node serves a client request, an idle syncer still takes
    /// the write (the caller's thread is not blocked by the fsync); once
    /// the request is done the caller syncs in place again.
    #[test]
    fn a_node_serving_requests_leaves_the_sync_to_the_syncer() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let gc = GroupCommit::start(db.clone());
        let here = std::thread::current().id();

        let serving = gc.foreground();
        let also = gc.foreground();
        drop(also);
        put_logged(&gc, b"k1", b"v1");
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| {
            tx.send((r.is_ok(), std::thread::current().id())).unwrap()
        }));
        let (ok, on) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(ok);
        assert_ne!(on, here, "synced on the serving thread");

        drop(serving);
        // The syncer's count of queued callbacks drops once it has run them.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while gc.queued.load(Ordering::SeqCst) != 0 {
            assert!(std::time::Instant::now() < until, "syncer never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        put_logged(&gc, b"k2", b"v2");
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| {
            tx.send((r.is_ok(), std::thread::current().id())).unwrap()
        }));
        assert_eq!(rx.try_recv(), Ok((true, here)), "not synced in place");
    }
}
