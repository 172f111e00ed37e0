//! How the engine makes sure that a store it opens still holds everything it
//! ever made durable, and that none of its files is damaged.
//!
//! A Raft node that forgets a log entry or a vote it had acknowledged can help
//! elect a leader that misses committed writes, so losing durable data must
//! never go unnoticed. Four checks run when the engine opens:
//!
//! 1. RocksDB's own: paranoid checks (MANIFEST, SST sizes, footers, index
//!    and filter blocks) and WAL sizes tracked in the MANIFEST (a missing or
//!    shortened older WAL).
//! 2. WAL replay in absolute-consistency mode: any damaged or incomplete
//!    record fails the open. `kill -9` leaves no incomplete record (the
//!    process's writes are already in the page cache); power loss can leave
//!    one at the tail, but only in writes that were never synced.
//! 3. The synced-sequence mark ([`record_synced`]): after every WAL sync the
//!    sequence number it covered is written to a small file beside the
//!    database. A store that opens with a lower sequence number lost writes
//!    it had made durable, even when its WAL was cut exactly between two
//!    records, which no replay mode can see. The mark also tells a torn tail
//!    of never-synced writes (after power loss) from lost durable ones: when
//!    the absolute-consistency replay fails, the store is replayed read-only
//!    up to the damage, and opened only if that still reaches the mark.
//! 4. A scan of every column family with block checksums verified
//!    ([`verify_checksums`]), so a flipped bit in any SST is found at open,
//!    not at the first read or compaction that hits it.
//!
//! Every failure is a [`StorageError::Corruption`]: the caller (the node)
//! refuses to serve the store and rebuilds it from its peers.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use rocksdb::{
    ColumnFamilyDescriptor, DBRecoveryMode, ErrorKind, IteratorMode, Options, ReadOptions, DB,
};

use super::StorageError;

/// File beside the database's own files holding the synced-sequence mark.
/// RocksDB leaves files with names it does not know alone.
pub const SYNCED_SEQ_FILE: &str = "LMSKV-SYNCED-SEQUENCE";

/// Marks the synced-sequence file's content (with the checksum after it).
const SYNCED_SEQ_MAGIC: u32 = 0x6c6d_7371;

/// Readahead of the open-time checksum scan.
const VERIFY_READAHEAD_BYTES: usize = 4 << 20;

/// A store with more live SST bytes than this is not scanned at open (the
/// scan reads about 200 MB of SST per second on one core: 8 GiB take some
/// 40 s). Its blocks are still verified by every read and compaction, which
/// refuse a damaged block; only the early detection is lost.
pub const VERIFY_ON_OPEN_SST_BYTES_MAX: u64 = 8 << 30;

/// Records that every write up to `seq` is durable in the WAL of the
/// database in `dir`. Called after each WAL sync, before the writes it
/// covered are acknowledged. Not synced itself: the mark survives a process
/// crash (it is in the page cache), and after power loss an older mark only
/// makes the check weaker, never wrong. Best effort: a mark that cannot be
/// written leaves the previous one, which is still a true lower bound.
pub fn record_synced(dir: &Path, seq: u64) {
    SyncedMark::new(dir).record(seq);
}

/// The synced-sequence mark file of one database, kept open by the writer
/// that records a mark after every WAL sync (one `pwrite` each, instead of
/// opening the file every time).
#[derive(Debug)]
pub struct SyncedMark {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl SyncedMark {
    /// The mark of the database in `dir` (the file is opened on first use).
    pub fn new(dir: &Path) -> Self {
        SyncedMark {
            path: dir.join(SYNCED_SEQ_FILE),
            file: None,
        }
    }

    /// Records `seq` as synced; see [`record_synced`]. A failed write drops
    /// the handle, so the next mark opens the file again.
    pub fn record(&mut self, seq: u64) {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        buf[8..12].copy_from_slice(&SYNCED_SEQ_MAGIC.to_le_bytes());
        let crc = crc32fast::hash(&buf[..12]);
        buf[12..].copy_from_slice(&crc.to_le_bytes());
        if self.file.is_none() {
            match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
            {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot record the synced WAL sequence");
                    return;
                }
            }
        }
        if let Some(f) = &self.file {
            if let Err(e) = f.write_all_at(&buf, 0) {
                tracing::debug!(error = %e, "cannot record the synced WAL sequence");
                self.file = None;
            }
        }
    }
}

/// The synced-sequence mark of the database in `dir`: `Ok(None)` when there
/// is none (a new or older store), an error when the file is unreadable.
pub fn read_synced(dir: &Path) -> Result<Option<u64>, String> {
    let mut f = match std::fs::File::open(dir.join(SYNCED_SEQ_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{SYNCED_SEQ_FILE}: {e}")),
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| format!("{SYNCED_SEQ_FILE}: {e}"))?;
    if buf.len() < 16 {
        return Err(format!(
            "{SYNCED_SEQ_FILE}: {} bytes, expected 16",
            buf.len()
        ));
    }
    let magic = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if magic != SYNCED_SEQ_MAGIC || crc != crc32fast::hash(&buf[..12]) {
        return Err(format!("{SYNCED_SEQ_FILE}: checksum mismatch"));
    }
    Ok(Some(u64::from_le_bytes(
        buf[..8].try_into().expect("8 bytes"),
    )))
}

/// Sets the recovery options [`open_checked`] relies on.
pub fn set_recovery_options(opts: &mut Options) {
    opts.set_paranoid_checks(true);
    opts.set_wal_recovery_mode(DBRecoveryMode::AbsoluteConsistency);
    opts.set_track_and_verify_wals_in_manifest(true);
}

fn corruption(e: rocksdb::Error) -> StorageError {
    StorageError::from(e)
}

/// Opens the database in `path` with checks 1-3 of the module docs; `cfs`
/// builds the column family descriptors (called once per open attempt).
pub fn open_checked<F, I>(opts: &Options, path: &Path, cfs: F) -> Result<DB, StorageError>
where
    F: Fn() -> I,
    I: IntoIterator<Item = ColumnFamilyDescriptor>,
{
    // An unreadable mark proves nothing either way: the replay checks still
    // run, and a WAL that fails them is not opened.
    let mark = match read_synced(path) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable synced-sequence mark");
            None
        }
    };
    let db = match DB::open_cf_descriptors(opts, path, cfs()) {
        Ok(db) => db,
        Err(e) if e.kind() == ErrorKind::Corruption => {
            let Some(mark) = mark else {
                return Err(corruption(e));
            };
            // A torn tail of never-synced writes (power loss) is no damage:
            // replay up to it read-only, and open only if that replay
            // still holds every write the mark says was durable.
            let mut pit = opts.clone();
            pit.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
            let reached = DB::open_cf_descriptors_read_only(&pit, path, cfs(), false)
                .map(|ro| ro.latest_sequence_number())
                .map_err(|_| corruption(e.clone()))?;
            if reached < mark {
                return Err(StorageError::Corruption(format!(
                    "{e}; a replay up to the damage reaches sequence {reached}, but writes up to {mark} were synced"
                )));
            }
            tracing::warn!(
                path = %path.display(),
                error = %e,
                reached,
                synced = mark,
                "the WAL ends in a torn record written after the last sync; it is dropped (nothing acknowledged is lost)"
            );
            DB::open_cf_descriptors(&pit, path, cfs())?
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(mark) = mark {
        let seq = db.latest_sequence_number();
        if seq < mark {
            return Err(StorageError::Corruption(format!(
                "the store opens at sequence {seq}, but writes up to {mark} were synced: the WAL lost durable writes"
            )));
        }
    }
    Ok(db)
}

/// What [`verify_checksums`] read.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyReport {
    pub entries: u64,
    pub bytes: u64,
    pub millis: u64,
    /// Not scanned: larger than [`VERIFY_ON_OPEN_SST_BYTES_MAX`].
    pub skipped: bool,
}

/// Reads every entry of every column family in `cfs` with block checksums
/// verified. (Blocks wholly under a range deletion may be skipped: their
/// data can never be read, and compaction drops it.)
/// Blocks are not added to the block cache.
pub fn verify_checksums(db: &DB, cfs: &[&str]) -> Result<VerifyReport, StorageError> {
    let started = Instant::now();
    let mut report = VerifyReport::default();
    let sst_bytes: u64 = db.live_files()?.iter().map(|f| f.size as u64).sum();
    if sst_bytes > VERIFY_ON_OPEN_SST_BYTES_MAX {
        tracing::warn!(
            sst_bytes,
            limit = VERIFY_ON_OPEN_SST_BYTES_MAX,
            "the store is too large to scan at open; damaged blocks are found by the reads and compactions that hit them"
        );
        report.skipped = true;
        return Ok(report);
    }
    for name in cfs {
        let cf = db
            .cf_handle(name)
            .ok_or_else(|| StorageError::Corruption(format!("column family {name} missing")))?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        ro.set_readahead_size(VERIFY_READAHEAD_BYTES);
        ro.set_total_order_seek(true);
        for item in db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
            let (k, v) =
                item.map_err(|e| StorageError::Corruption(format!("column family {name}: {e}")))?;
            report.entries += 1;
            report.bytes += (k.len() + v.len()) as u64;
        }
    }
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        let mut o = Options::default();
        o.create_if_missing(true);
        set_recovery_options(&mut o);
        o
    }

    fn cfs() -> Vec<ColumnFamilyDescriptor> {
        vec![ColumnFamilyDescriptor::new("default", Options::default())]
    }

    fn wal_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    }

    /// Writes `n` synced puts and records the mark like the group commit does.
    fn write_synced(db: &DB, from: u32, n: u32) {
        for i in from..from + n {
            db.put(format!("k{i:06}"), vec![b'v'; 100]).unwrap();
        }
        let seq = db.latest_sequence_number();
        db.flush_wal(true).unwrap();
        record_synced(db.path(), seq);
    }

    #[test]
    fn the_mark_round_trips_and_a_damaged_mark_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_synced(dir.path()), Ok(None));
        record_synced(dir.path(), 42);
        record_synced(dir.path(), 7_000_000_000);
        assert_eq!(read_synced(dir.path()), Ok(Some(7_000_000_000)));
        let p = dir.path().join(SYNCED_SEQ_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[3] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(read_synced(dir.path()).unwrap_err().contains("checksum"));
    }

    #[test]
    fn a_wal_cut_between_records_is_found_by_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_cf_descriptors(&opts(), dir.path(), cfs()).unwrap();
            write_synced(&db, 0, 50);
            // Crash: no flush, the WAL holds everything.
        }
        // Walk the records (7-byte header: crc, length, type; all in the
        // first 32 KiB block here) and cut the last two whole ones off, so
        // the WAL ends cleanly on a record boundary.
        let wal = wal_files(dir.path()).pop().unwrap();
        let bytes = std::fs::read(&wal).unwrap();
        assert!(bytes.len() < 32 << 10);
        let mut at = 0usize;
        let mut starts = Vec::new();
        while at + 7 <= bytes.len() {
            starts.push(at);
            at += 7 + u16::from_le_bytes([bytes[at + 4], bytes[at + 5]]) as usize;
        }
        assert_eq!(at, bytes.len());
        assert!(starts.len() >= 50, "{} records", starts.len());
        let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.set_len(starts[starts.len() - 2] as u64).unwrap();
        drop(f);
        // Without the mark, the replay sees a clean WAL.
        let mut replay_only = opts();
        replay_only.set_wal_recovery_mode(DBRecoveryMode::AbsoluteConsistency);
        let db = DB::open_cf_descriptors_read_only(&replay_only, dir.path(), cfs(), false).unwrap();
        assert!(db.get("k000048").unwrap().is_none());
        drop(db);
        // RocksDB alone sees a clean WAL; the mark does not.
        let e = open_checked(&opts(), dir.path(), cfs).unwrap_err();
        assert!(e.is_corruption(), "{e}");
        assert!(e.to_string().contains("lost durable writes"), "{e}");
    }

    #[test]
    fn a_wal_cut_inside_a_record_fails_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_cf_descriptors(&opts(), dir.path(), cfs()).unwrap();
            write_synced(&db, 0, 50);
        }
        std::fs::remove_file(dir.path().join(SYNCED_SEQ_FILE)).unwrap();
        let wal = wal_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&wal).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.set_len(len - 30).unwrap();
        drop(f);
        let e = open_checked(&opts(), dir.path(), cfs).unwrap_err();
        assert!(e.is_corruption(), "{e}");
    }

    #[test]
    fn a_torn_tail_after_the_last_sync_is_dropped_and_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_cf_descriptors(&opts(), dir.path(), cfs()).unwrap();
            write_synced(&db, 0, 50);
            // Written but never synced: power loss may tear it.
            db.put("unsynced", vec![b'u'; 500]).unwrap();
        }
        let wal = wal_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&wal).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.set_len(len - 100).unwrap();
        drop(f);
        let db = open_checked(&opts(), dir.path(), cfs).unwrap();
        assert!(db.get("k000049").unwrap().is_some());
        assert!(db.get("unsynced").unwrap().is_none());
    }

    #[test]
    fn a_flipped_byte_in_the_middle_of_the_wal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_cf_descriptors(&opts(), dir.path(), cfs()).unwrap();
            write_synced(&db, 0, 50);
        }
        let wal = wal_files(dir.path()).pop().unwrap();
        let mut b = std::fs::read(&wal).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x5a;
        std::fs::write(&wal, b).unwrap();
        let e = open_checked(&opts(), dir.path(), cfs).unwrap_err();
        assert!(e.is_corruption(), "{e}");
    }

    #[test]
    fn a_flipped_byte_in_an_sst_is_found_by_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_cf_descriptors(&opts(), dir.path(), cfs()).unwrap();
            for i in 0..20_000u32 {
                db.put(format!("k{i:06}"), format!("value-{i}-{}", "x".repeat(40)))
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let db = open_checked(&opts(), dir.path(), cfs).unwrap();
        let clean = verify_checksums(&db, &["default"]).unwrap();
        assert_eq!(clean.entries, 20_000);
        drop(db);
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "sst"))
            .unwrap();
        let mut b = std::fs::read(&sst).unwrap();
        let i = b.len() / 3;
        b[i] ^= 0x5a;
        std::fs::write(&sst, b).unwrap();
        // The open reads footers, index and filter blocks only; the scan
        // reads every data block.
        match open_checked(&opts(), dir.path(), cfs) {
            Ok(db) => {
                let e = verify_checksums(&db, &["default"]).unwrap_err();
                assert!(e.is_corruption(), "{e}");
            }
            Err(e) => assert!(e.is_corruption(), "{e}"),
        }
    }
}
