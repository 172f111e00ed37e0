//! Route lookup cost with 10,000 cached ranges: a key lookup, a lookup of
//! the range below an exclusive end (reverse scans), and a cached `locate`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use lmskv_client::route_cache::RouteCache;
use lmskv_client::{RangeDescriptor, RangeEpoch};

const RANGES: u64 = 10_000;

fn key(i: u64) -> Bytes {
    Bytes::from(format!("user/{i:08}"))
}

fn filled() -> RouteCache {
    let c = RouteCache::default();
    for i in 0..RANGES {
        c.insert(RangeDescriptor {
            range_id: i + 2,
            start_key: if i == 0 {
                Bytes::from_static(b"\x01")
            } else {
                key(i * 100)
            },
            end_key: if i + 1 == RANGES {
                Bytes::new()
            } else {
                key((i + 1) * 100)
            },
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            }),
            replicas: Vec::new(),
        });
    }
    assert_eq!(c.len(), RANGES as usize);
    c
}

fn bench(c: &mut Criterion) {
    let cache = filled();
    let probes: Vec<Bytes> = (0..1024u64)
        .map(|i| key(i * 977 % (RANGES * 100)))
        .collect();
    let mut n = 0usize;
    c.bench_function("route_lookup_10k_ranges", |b| {
        b.iter(|| {
            n = (n + 1) % probes.len();
            black_box(cache.get(&probes[n], false))
        })
    });
    c.bench_function("route_lookup_below_10k_ranges", |b| {
        b.iter(|| {
            n = (n + 1) % probes.len();
            black_box(cache.get(&probes[n], true))
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("route_locate_hit_10k_ranges", |b| {
        b.iter(|| {
            n = (n + 1) % probes.len();
            rt.block_on(cache.locate(&probes[n], false, |_| async {
                unreachable!("every probe is cached")
            }))
            .expect("hit")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
