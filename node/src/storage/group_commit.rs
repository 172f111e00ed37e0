//! Group commit: one WAL fsync covers every write that was waiting for it.
//!
//! Writers put their batch into RocksDB without syncing (so it is readable at
//! once), then hand a completion callback to the syncer thread. The thread
//! takes every callback queued so far, syncs the WAL once and completes them
//! all: appends of many ranges and many client writes share one fsync. The WAL
//! is a single sequential file, so a sync started after a write was made
//! durably covers it.

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
    tx: Option<SyncSender<SyncCallback>>,
    thread: Option<JoinHandle<()>>,
    /// Set in inline mode: every sync runs on the caller's thread, so a
    /// simulation's clock sees it happen at a definite point (no thread).
    inline: Option<(Arc<rocksdb::DB>, Mutex<SyncedMark>)>,
}

impl GroupCommit {
    /// Starts the syncer thread over `db`.
    pub fn start(db: Arc<rocksdb::DB>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<SyncCallback>(SYNC_QUEUE_CALLBACKS_MAX);
        let thread = std::thread::Builder::new()
            .name("lmskv-wal-sync".into())
            .spawn(move || run(db, rx))
            .expect("spawn WAL sync thread");
        GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            inline: None,
        }
    }

    /// Syncs on the caller's thread, one fsync per call, without a syncer
    /// thread: for the deterministic simulation only (no group commit).
    pub fn inline(db: Arc<rocksdb::DB>) -> Self {
        GroupCommit {
            tx: None,
            thread: None,
            inline: Some((db.clone(), Mutex::new(SyncedMark::new(db.path())))),
        }
    }

    /// Queues `done` to be completed after the next WAL sync.
    pub fn sync(&self, done: SyncCallback) {
        if let Some((db, mark)) = &self.inline {
            let mut mark = mark.lock().expect("mark lock");
            done(sync_wal(db, &mut mark));
            return;
        }
        let Some(tx) = &self.tx else {
            done(Err(StorageError::Closed));
            return;
        };
        match tx.try_send(done) {
            Ok(()) => {}
            Err(TrySendError::Full(done)) => {
                // Back-pressure: wait for the syncer to make room.
                if let Err(mpsc::SendError(done)) = tx.send(done) {
                    done(Err(StorageError::Closed));
                }
            }
            Err(TrySendError::Disconnected(done)) => done(Err(StorageError::Closed)),
        }
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

fn run(db: Arc<rocksdb::DB>, rx: Receiver<SyncCallback>) {
    let mut group: Vec<SyncCallback> = Vec::with_capacity(256);
    let mut mark = SyncedMark::new(db.path());
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < SYNC_GROUP_CALLBACKS_MAX {
            match rx.try_recv() {
                Ok(cb) => group.push(cb),
                Err(_) => break,
            }
        }
        let res = sync_wal(&db, &mut mark).map_err(|e| e.to_string());
        for cb in group.drain(..) {
            cb(res.clone().map_err(StorageError::Rocks));
        }
    }
}
