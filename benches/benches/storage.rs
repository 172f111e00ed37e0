//! The node's storage hot paths through `lmskv_node::storage::Engine`: Raft
//! log appends in batches (without and with the group-commit fsync that
//! makes them durable) and state-machine apply batches (data, dedup record
//! and applied state in one RocksDB write batch).
//!
//! The openraft storage adapters (`raft::log_store`, `raft::state_machine`)
//! and the command codec are private to the node; these benchmarks measure
//! the engine calls those adapters make.

use std::hint::black_box;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmskv_node::storage::{Engine, EngineOptions};

/// Bytes of one log entry: a put of a 256-byte value with its framing.
const ENTRY_BYTES: usize = 320;
const RANGE: u64 = 1;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::Builder::new()
        .prefix("lmskv-bench-storage-")
        .tempdir()
        .expect("temp dir");
    let e = Engine::open(dir.path(), &EngineOptions::default()).expect("open engine");
    (dir, e)
}

fn sync(e: &Engine) {
    let (tx, rx) = mpsc::channel();
    e.sync_then(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv().expect("sync callback").expect("sync");
}

fn log_append(c: &mut Criterion) {
    let (_dir, e) = engine();
    let payload = vec![0x5au8; ENTRY_BYTES];
    let mut next = 1u64;
    let mut g = c.benchmark_group("log_append");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for n in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("append", n), &n, |b, &n| {
            b.iter(|| {
                let entries: Vec<(u64, Vec<u8>)> =
                    (next..next + n).map(|i| (i, payload.clone())).collect();
                next += n;
                e.log_append(RANGE, black_box(&entries)).expect("append");
            })
        });
        g.bench_with_input(BenchmarkId::new("append_fsync", n), &n, |b, &n| {
            b.iter(|| {
                let entries: Vec<(u64, Vec<u8>)> =
                    (next..next + n).map(|i| (i, payload.clone())).collect();
                next += n;
                e.log_append(RANGE, black_box(&entries)).expect("append");
                sync(&e);
            })
        });
    }
    g.finish();
}

fn apply_batch(c: &mut Criterion) {
    let (_dir, e) = engine();
    let value = Bytes::from(vec![b'v'; 256]);
    let applied = vec![0u8; 24];
    let record = vec![1u8; 16];
    let mut index = 1u64;
    let mut g = c.benchmark_group("apply_batch");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for n in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("puts_with_dedup", n), &n, |b, &n| {
            b.iter(|| {
                let mut batch = e.apply_batch(RANGE);
                for _ in 0..n {
                    let key = format!("user{:020}", index % 100_000);
                    let request_id = index.to_be_bytes();
                    if batch
                        .dedup_get(&request_id, index)
                        .expect("dedup get")
                        .is_none()
                    {
                        batch.put(key.as_bytes(), index, value.clone());
                        batch.dedup_put(&request_id, index + 600_000, record.clone());
                    }
                    index += 1;
                }
                batch.set_applied(&applied);
                batch.commit().expect("commit");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, log_append, apply_batch);
criterion_main!(benches);
