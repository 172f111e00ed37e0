//! Request and response encoding and decoding (the prost messages of
//! `lmskv_proto::v1`) at the sizes the benchmarks use: a 256-byte put, a get
//! and its answer, and a scan page of 100 YCSB records.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lmskv_proto::v1;
use prost::Message;

fn kv(i: u64, size: usize) -> v1::KeyValue {
    v1::KeyValue {
        key: Bytes::from(format!("user{i:020}")),
        value: Bytes::from(vec![b'v'; size]),
        version: i,
    }
}

fn bench_message<M: Message + Default>(c: &mut Criterion, name: &str, msg: &M) {
    let mut g = c.benchmark_group(format!("proto_{name}"));
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let encoded = msg.encode_to_vec();
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(msg).encode_to_vec()));
    let buf = Bytes::from(encoded);
    g.bench_function("decode", |b| {
        b.iter(|| M::decode(black_box(buf.clone())).expect("valid message"))
    });
    g.finish();
}

fn codecs(c: &mut Criterion) {
    let header = v1::RequestHeader {
        range_id: 1,
        epoch: Some(v1::RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        ..Default::default()
    };
    let put = v1::PutRequest {
        header: Some(header),
        key: Bytes::from_static(b"user00000000000000012345"),
        value: Bytes::from(vec![b'v'; 256]),
        write: Some(v1::WriteOptions {
            request_id: Bytes::from(vec![7u8; 16]),
            durability: v1::Durability::Majority as i32,
            completed_below: 1,
        }),
    };
    bench_message(c, "put_request_256B", &put);
    let get = v1::GetRequest {
        header: Some(header),
        key: Bytes::from_static(b"user00000000000000012345"),
        read: Some(v1::ReadOptions::default()),
    };
    bench_message(c, "get_request", &get);
    let response_header = v1::ResponseHeader {
        range_id: 1,
        node_id: 1,
        applied_index: 123_456,
        leader_id: 1,
    };
    let got = v1::GetResponse {
        header: Some(response_header),
        kv: Some(kv(1, 256)),
    };
    bench_message(c, "get_response_256B", &got);
    let scan = v1::ScanResponse {
        header: Some(response_header),
        kvs: (0..100).map(|i| kv(i, 1000)).collect(),
        ..Default::default()
    };
    bench_message(c, "scan_response_100x1000B", &scan);
}

criterion_group!(benches, codecs);
criterion_main!(benches);
