//! Group commit: one WAL fsync covers every write that was waiting for it.
//!
//! Writers put their batch into RocksDB without syncing (so it is readable at
//! once), then hand a completion callback to the syncer thread. The thread
//! takes every callback queued so far, syncs the WAL once and completes them
//! all: appends of many ranges and many client writes share one fsync. The WAL
//! is a single sequential file, so a sync started after a write was made
//! durably covers it.

use std::sync::atomic::{AtomicUsize, Ordering};
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
        let thread = {
            let (db, mark, queued) = (db.clone(), mark.clone(), queued.clone());
            std::thread::Builder::new()
                .name("lmskv-wal-sync".into())
                .spawn(move || run(db, mark, queued, rx))
                .expect("spawn WAL sync thread")
        };
        GroupCommit {
            db,
            mark,
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
            let res = sync_wal(&self.db, &mut self.mark.lock().expect("mark lock"));
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
                let res = sync_wal(&self.db, &mut mark);
                // Not held while `done` runs, which may queue more work.
                drop(mark);
                done(res);
                return;
            }
        }
        self.sync(done);
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
fn sync_wal(db: &rocksdb::DB, mark: &mut SyncedMark) -> Result<(), StorageError> {
    // Read before the sync: every write up to it is durable once the sync
    // returns, and is marked so before any of them is acknowledged.
    let seq = db.latest_sequence_number();
    crate::fail_point!("log-sync-before");
    db.flush_wal(true)?;
    crate::fail_point!("log-sync-after");
    mark.record(seq);
    Ok(())
}

fn run(
    db: Arc<rocksdb::DB>,
    mark: Arc<Mutex<SyncedMark>>,
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
            sync_wal(&db, &mut mark).map_err(|e| e.to_string())
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

    /// A write synced in place is durable, its callback completed, and the
    /// synced-sequence mark covering it recorded, before the call returns;
    /// while a sync is running the call queues instead, and the callback
    /// comes once the syncer has synced again.
    #[test]
    fn an_idle_syncer_lets_the_caller_sync_in_place_and_a_busy_one_takes_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let gc = GroupCommit::start(db.clone());

        db.put(b"k1", b"v1").unwrap();
        let seq = db.latest_sequence_number();
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert_eq!(rx.try_recv(), Ok(true), "completed before returning");
        let marked = super::super::durability::read_synced(dir.path()).unwrap();
        assert!(marked >= Some(seq), "mark {marked:?} below {seq}");

        // A sync is running (the mark is held): the write is queued.
        let held = gc.mark.lock().unwrap();
        db.put(b"k2", b"v2").unwrap();
        let seq = db.latest_sequence_number();
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.try_recv().is_err(), "completed while a sync was running");
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        let marked = super::super::durability::read_synced(dir.path()).unwrap();
        assert!(marked >= Some(seq), "mark {marked:?} below {seq}");

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
        db.put(b"k1", b"v1").unwrap();
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
        db.put(b"k2", b"v2").unwrap();
        let (tx, rx) = channel();
        gc.sync_here_when_idle(Box::new(move |r| {
            tx.send((r.is_ok(), std::thread::current().id())).unwrap()
        }));
        assert_eq!(rx.try_recv(), Ok((true, here)), "not synced in place");
    }
}
