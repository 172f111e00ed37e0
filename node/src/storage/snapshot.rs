//! The snapshot file format: a range's state as a sequence of checksummed
//! records, written from a consistent RocksDB snapshot and read back in a
//! streaming fashion, so neither building, sending nor installing a snapshot
//! holds it in memory.
//!
//! Layout: magic `LMSKVSN1`, then records `kind(1) · key_len BE(4) ·
//! value_len BE(4) · key · value · crc32 BE(4)`, then a trailer `0xff ·
//! record_count BE(8) · crc32 BE(4)`. A file without its trailer is incomplete.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use lmskv_proto::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};

use super::StorageError;

/// Size of the pieces a snapshot file is streamed in.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

const MAGIC: &[u8; 8] = b"LMSKVSN1";
const TRAILER: u8 = 0xff;
/// Largest record value accepted: a stored user value plus its header.
const RECORD_VALUE_BYTES_MAX: usize = VALUE_BYTES_MAX + 64;
/// Largest record key accepted: a user key or a dedup key.
const RECORD_KEY_BYTES_MAX: usize = KEY_BYTES_MAX + 128;
/// How many records [`SnapshotReader::verify`] reads between asking
/// whether to stop.
const VERIFY_STOP_EVERY: u64 = 4_096;
/// ... or how many bytes of keys and values, whichever comes first.
const VERIFY_STOP_EVERY_BYTES: usize = 4 << 20;

/// What a snapshot record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A user key and its stored value.
    Data = 1,
    /// A dedup table entry (key without the range id prefix).
    Dedup = 2,
    /// The range's applied state (empty key), the first record of a file.
    Applied = 3,
}

/// What [`super::Engine::export_snapshot`] produced.
#[derive(Debug, Clone)]
pub struct SnapshotExport {
    /// The range's applied state as of the snapshot, if it had applied anything.
    pub applied: Option<Vec<u8>>,
    /// Number of records written.
    pub records: u64,
    /// File size in bytes.
    pub bytes: u64,
}

pub(super) struct SnapshotWriter {
    out: BufWriter<File>,
    records: u64,
    bytes: u64,
}

impl SnapshotWriter {
    pub(super) fn create(path: &Path) -> Result<Self, StorageError> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(MAGIC)?;
        Ok(SnapshotWriter {
            out,
            records: 0,
            bytes: MAGIC.len() as u64,
        })
    }

    pub(super) fn record(
        &mut self,
        kind: RecordKind,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StorageError> {
        let mut head = [0u8; 9];
        head[0] = kind as u8;
        head[1..5].copy_from_slice(&(key.len() as u32).to_be_bytes());
        head[5..9].copy_from_slice(&(value.len() as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(key);
        h.update(value);
        self.out.write_all(&head)?;
        self.out.write_all(key)?;
        self.out.write_all(value)?;
        self.out.write_all(&h.finalize().to_be_bytes())?;
        self.records += 1;
        self.bytes += (head.len() + key.len() + value.len() + 4) as u64;
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<(u64, u64), StorageError> {
        let mut t = [0u8; 9];
        t[0] = TRAILER;
        t[1..9].copy_from_slice(&self.records.to_be_bytes());
        self.out.write_all(&t)?;
        self.out.write_all(&crc32fast::hash(&t).to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((self.records, self.bytes + 13))
    }
}

/// One record read back: its kind, key and value.
pub(super) type Record = (RecordKind, Vec<u8>, Vec<u8>);

pub(super) struct SnapshotReader {
    input: BufReader<File>,
    records: u64,
    done: bool,
}

fn corrupt(msg: impl Into<String>) -> StorageError {
    StorageError::Corruption(format!("snapshot file: {}", msg.into()))
}

impl SnapshotReader {
    pub(super) fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_buffered(path, 1 << 20)
    }

    /// [`SnapshotReader::open`] with a read buffer of `capacity` bytes (a
    /// small one to read only the first record).
    pub(super) fn open_buffered(path: &Path, capacity: usize) -> Result<Self, StorageError> {
        let mut input = BufReader::with_capacity(capacity, File::open(path)?);
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|_| corrupt("missing header"))?;
        if &magic != MAGIC {
            return Err(corrupt("bad magic"));
        }
        Ok(SnapshotReader {
            input,
            records: 0,
            done: false,
        })
    }

    /// The next record, or `None` after the trailer. Every record's checksum is verified.
    pub(super) fn next_record(&mut self) -> Result<Option<Record>, StorageError> {
        if self.done {
            return Ok(None);
        }
        let mut kind = [0u8; 1];
        self.input
            .read_exact(&mut kind)
            .map_err(|_| corrupt("truncated before trailer"))?;
        if kind[0] == TRAILER {
            let mut rest = [0u8; 12];
            self.input
                .read_exact(&mut rest)
                .map_err(|_| corrupt("truncated trailer"))?;
            let mut t = [0u8; 9];
            t[0] = TRAILER;
            t[1..9].copy_from_slice(&rest[..8]);
            let crc = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes"));
            if crc32fast::hash(&t) != crc {
                return Err(corrupt("trailer checksum mismatch"));
            }
            let count = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            if count != self.records {
                return Err(corrupt(format!(
                    "trailer says {count} records, read {}",
                    self.records
                )));
            }
            self.done = true;
            return Ok(None);
        }
        let kind_v = match kind[0] {
            1 => RecordKind::Data,
            2 => RecordKind::Dedup,
            3 => RecordKind::Applied,
            k => return Err(corrupt(format!("unknown record kind {k}"))),
        };
        let mut lens = [0u8; 8];
        self.input
            .read_exact(&mut lens)
            .map_err(|_| corrupt("truncated record"))?;
        let klen = u32::from_be_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
        let vlen = u32::from_be_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
        if klen > RECORD_KEY_BYTES_MAX || vlen > RECORD_VALUE_BYTES_MAX {
            return Err(corrupt("record length out of bounds"));
        }
        let mut key = vec![0u8; klen];
        let mut value = vec![0u8; vlen];
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut key)
            .and_then(|_| self.input.read_exact(&mut value))
            .and_then(|_| self.input.read_exact(&mut crc))
            .map_err(|_| corrupt("truncated record"))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&kind);
        h.update(&lens);
        h.update(&key);
        h.update(&value);
        if h.finalize() != u32::from_be_bytes(crc) {
            return Err(corrupt(format!(
                "record {} checksum mismatch",
                self.records
            )));
        }
        self.records += 1;
        Ok(Some((kind_v, key, value)))
    }

    /// Reads the whole file, verifying every checksum and the trailer.
    /// `stop` is asked every [`VERIFY_STOP_EVERY`] records or
    /// [`VERIFY_STOP_EVERY_BYTES`] of keys and values: a large file
    /// takes seconds to read, and whoever waits for the import (a removal
    /// of the replica) must not wait that long; `Aborted` when it says so.
    pub(super) fn verify(mut self, stop: impl Fn() -> bool) -> Result<u64, StorageError> {
        let mut bytes = 0usize;
        while let Some((_, k, v)) = self.next_record()? {
            bytes += k.len() + v.len();
            if self.records.is_multiple_of(VERIFY_STOP_EVERY) || bytes >= VERIFY_STOP_EVERY_BYTES {
                bytes = 0;
                if stop() {
                    return Err(StorageError::Aborted);
                }
            }
        }
        Ok(self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verify asked to stop stops within a few thousand records, not at
    /// the end of the file.
    #[test]
    fn a_verify_asked_to_stop_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SnapshotWriter::create(&path).unwrap();
        for i in 0..50_000u32 {
            w.record(RecordKind::Data, &i.to_be_bytes(), b"v").unwrap();
        }
        w.finish().unwrap();
        let asked = std::cell::Cell::new(0u32);
        let r = SnapshotReader::open(&path).unwrap().verify(|| {
            asked.set(asked.get() + 1);
            asked.get() >= 2
        });
        assert!(matches!(r, Err(StorageError::Aborted)), "{r:?}");
        assert_eq!(asked.get(), 2);
        assert_eq!(
            SnapshotReader::open(&path)
                .unwrap()
                .verify(|| false)
                .unwrap(),
            50_000
        );

        // Large values: asked by bytes read, long before 4,096 records.
        let mut w = SnapshotWriter::create(&path).unwrap();
        for i in 0..12u32 {
            w.record(RecordKind::Data, &i.to_be_bytes(), &vec![7u8; 1 << 20])
                .unwrap();
        }
        w.finish().unwrap();
        let asked = std::cell::Cell::new(0u32);
        let r = SnapshotReader::open(&path).unwrap().verify(|| {
            asked.set(asked.get() + 1);
            true
        });
        assert!(matches!(r, Err(StorageError::Aborted)), "{r:?}");
        assert_eq!(asked.get(), 1, "asked once, after 4 MiB");
    }

    #[test]
    fn truncated_or_flipped_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SnapshotWriter::create(&path).unwrap();
        for i in 0..10u8 {
            w.record(RecordKind::Data, &[b'k', i], &[i; 20]).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(
            SnapshotReader::open(&path)
                .unwrap()
                .verify(|| false)
                .unwrap(),
            10
        );

        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert!(SnapshotReader::open(&path)
            .unwrap()
            .verify(|| false)
            .is_err());
        for pos in [10, 40, good.len() - 3] {
            let mut bad = good.clone();
            bad[pos] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            assert!(
                SnapshotReader::open(&path)
                    .and_then(|r| r.verify(|| false))
                    .is_err(),
                "flip at {pos} undetected"
            );
        }
    }
}
