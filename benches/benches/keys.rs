//! Key encoding on the request path: user-key validation and printable
//! escaping (`lmskv_proto::keys`), and the node's on-disk encodings of log
//! keys, dedup keys and checksummed values (`lmskv_node::storage`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmskv_node::storage::{keys as disk_keys, value};
use lmskv_proto::keys;

fn proto_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto_keys");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let text = b"user/00000000000000012345".to_vec();
    let binary: Vec<u8> = (0..=255u8).collect();
    for (name, key) in [("text_25B", &text), ("binary_256B", &binary)] {
        g.throughput(Throughput::Bytes(key.len() as u64));
        g.bench_with_input(BenchmarkId::new("validate_user_key", name), key, |b, k| {
            b.iter(|| keys::validate_user_key("key", black_box(k)))
        });
        g.bench_with_input(BenchmarkId::new("escape", name), key, |b, k| {
            b.iter(|| keys::escape(black_box(k)))
        });
        let escaped = keys::escape(key);
        g.bench_with_input(BenchmarkId::new("parse_escaped", name), &escaped, |b, s| {
            b.iter(|| keys::parse_escaped(black_box(s)))
        });
        g.bench_with_input(BenchmarkId::new("prefix_end", name), key, |b, k| {
            b.iter(|| keys::prefix_end(black_box(k)))
        });
    }
    g.finish();
}

fn disk_encodings(c: &mut Criterion) {
    let mut g = c.benchmark_group("disk_keys");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("raft_log_key", |b| {
        b.iter(|| disk_keys::raft_log_key(black_box(7), black_box(123_456)))
    });
    let request_id = [0xabu8; 16];
    g.bench_function("dedup_key_16B_id", |b| {
        b.iter(|| disk_keys::dedup_key(black_box(7), black_box(&request_id)))
    });
    let key = b"user/00000000000000012345";
    for size in [256usize, 1000] {
        let v = vec![b'v'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode_value", size), &v, |b, v| {
            b.iter(|| value::encode_value(black_box(key), black_box(42), black_box(v)))
        });
        let raw = value::encode_value(key, 42, &v);
        g.bench_with_input(BenchmarkId::new("decode_value", size), &raw, |b, raw| {
            b.iter(|| value::decode_value(black_box(key), black_box(raw)))
        });
    }
    g.finish();
}

criterion_group!(benches, proto_keys, disk_encodings);
criterion_main!(benches);
