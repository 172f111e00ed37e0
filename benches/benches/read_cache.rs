//! A read-cache hit through the client's public API: an EVENTUAL `get` of a
//! key the client wrote itself is answered from its bounded cache without a
//! network call. A STRONG `get` of the same key (a gRPC round trip to the
//! leader and a lease read) is measured beside it for scale.
//!
//! The cache needs a real server to fill it, so the benchmark starts a
//! single-node lmskv cluster in this process on a free 127.0.0.1 port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use lmskv_client::{Client, ReadConsistency};
use lmskv_node::config::{FileConfig, NodeConfig};
use lmskv_node::node::Node;
use tokio::sync::watch;

/// How long the single node may take to elect itself and accept a write.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct SingleNode {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    stop: watch::Sender<bool>,
    addr: SocketAddr,
}

async fn start_node() -> SingleNode {
    let dir = tempfile::Builder::new()
        .prefix("lmskv-bench-cache-")
        .tempdir()
        .expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let cfg = NodeConfig {
        node_id: 1,
        listen: addr,
        advertise: None,
        source_ip: None,
        data_dir: dir.path().join("node-1"),
        join: Vec::new(),
        file: FileConfig::default(),
    };
    cfg.validate().expect("valid config");
    let node = Node::open(cfg).await.expect("open node");
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(lmskv_node::server::serve(
        node.clone(),
        listener,
        stop_rx.clone(),
    ));
    tokio::spawn(node.clone().run_background(stop_rx));
    SingleNode {
        _dir: dir,
        node,
        stop,
        addr,
    }
}

fn read_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(start_node());
    let client = Client::builder()
        .endpoints([server.addr.to_string()])
        .build()
        .expect("client");
    let key = Bytes::from_static(b"user00000000000000012345");
    rt.block_on(async {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match client.put(key.clone(), vec![b'v'; 256]).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("single node not ready: {e}"),
            }
        }
        let first = client
            .get_detailed(key.clone(), ReadConsistency::Eventual)
            .await
            .expect("eventual get");
        assert!(
            first.from_cache(),
            "an EVENTUAL read of the client's own write must hit its cache"
        );
    });

    let mut g = c.benchmark_group("read_cache");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("hit_eventual_get", |b| {
        b.to_async(&rt).iter(|| async {
            let o = client
                .get_detailed(key.clone(), ReadConsistency::Eventual)
                .await
                .expect("get");
            debug_assert!(o.from_cache());
            o
        })
    });
    g.bench_function("strong_get_single_node", |b| {
        b.to_async(&rt).iter(|| async {
            client
                .get(key.clone(), ReadConsistency::Strong)
                .await
                .expect("get")
        })
    });
    g.finish();
    let stats = client.cache_stats();
    eprintln!("read cache after the run: {stats:?}");

    let _ = server.stop.send(true);
    rt.block_on(server.node.shutdown());
}

criterion_group!(benches, read_cache);
criterion_main!(benches);
