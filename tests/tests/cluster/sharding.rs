//! Sharding: many ranges across many nodes, split manually and by size,
//! placed on distinct nodes, rebalanced when a node joins, repaired when a
//! node dies, drained by decommission — with no acknowledged write lost, and
//! scans that see every key once while ranges split.
//!
//! Every bound a test waits for is stated in its `wait_for` call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lmskv_proto::v1::RangeInfo;
use lmskv_tests::router::{fully_replicated_on, voters};
use lmskv_tests::{wait_for, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(600);

macro_rules! phase {
    ($($arg:tt)*) => {
        eprintln!("[{:7.1}s] {}", lmskv_tests::cluster::elapsed_s(), format!($($arg)*))
    };
}

/// Small thresholds so splits, repairs and drains happen within a test.
const CONFIG: &str = "dead_node_timeout_s = 4\nsplit_size_bytes = 65536\nwrite_buffer_bytes = 1048576\nnode_heartbeat_ms = 300\nplacement_interval_ms = 300\nbalance_leaders = true\n";

/// Replicas per node over the listed ranges.
fn replica_counts(ranges: &[RangeInfo]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for r in ranges {
        for v in voters(r) {
            *m.entry(v).or_default() += 1;
        }
    }
    m
}

fn key(i: u32) -> Vec<u8> {
    // Spread over several table-like prefixes.
    let table = ["course/", "grade/", "user/", "zz/"][(i % 4) as usize];
    format!("{table}{i:06}").into_bytes()
}

/// Every written key is there with the version its write returned (read
/// range by range through each range's leader).
/// The placement driver's last log lines from every node, for failure reports.
fn pd_log(c: &TestCluster) -> String {
    let mut out = String::new();
    for id in 1..=8u64 {
        let p = c.dir().join(format!("node-{id}.log"));
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("lmskv_node::pd"))
            .collect();
        for l in lines.iter().rev().take(25).rev() {
            out.push_str(&format!("node {id}: {l}\n"));
        }
    }
    out
}

/// Fails the test with what the placement driver saw: the last observation,
/// its node list and the placement log lines.
async fn fail_with_placement_view(c: &TestCluster, e: anyhow::Error, seen: &str) -> ! {
    let nodes = c.node_list().await;
    panic!(
        "{e}; last seen: {seen}\nnodes as the placement driver sees them: {nodes:?}\n{}",
        pd_log(c)
    );
}

async fn check_all_keys(c: &TestCluster, written: &HashMap<Vec<u8>, u64>) {
    let found: HashMap<Vec<u8>, u64> = c
        .routed_scan(b"\x01", b"")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v))
        .collect();
    for (k, version) in written {
        assert_eq!(
            found.get(k),
            Some(version),
            "key {:?} lost or changed",
            String::from_utf8_lossy(k)
        );
    }
}

/// Sizes the ranges report (as the placement driver sees them), largest
/// first, in KiB, and their total: what automatic splits go by.
fn sizes_kib(ranges: &[RangeInfo]) -> String {
    let mut sizes: Vec<u64> = ranges.iter().map(|r| r.size_bytes >> 10).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    format!(
        "total {} KiB, per range {sizes:?}",
        sizes.iter().sum::<u64>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_split_spread_rebalance_repair_and_drain() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 5 nodes");
        let mut c = TestCluster::start(ClusterOptions {
            nodes: 5,
            config: CONFIG.into(),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();

        phase!("write 400 keys of 1 KiB across the key space");
        let mut written: HashMap<Vec<u8>, u64> = HashMap::new();
        // Random bytes: sizes are measured on disk, after compression.
        let value: Vec<u8> = (0..1024).map(|_| rand::random::<u8>()).collect();
        for i in 0..400u32 {
            let v = c.routed_put(&key(i), &value).await.unwrap();
            written.insert(key(i), v);
        }

        phase!("split by hand at 24 keys");
        for i in (0..400u32).step_by(16).take(24) {
            let k = key(i);
            if let Err(e) = c.split_at(&k).await {
                // A range may already start there after an automatic split.
                phase!("split at {:?}: {e}", String::from_utf8_lossy(&k));
            }
        }

        phase!("write 1 MiB more so ranges split by size (limit 64 KiB)");
        for i in 400..1400u32 {
            let value: Vec<u8> = (0..1024).map(|_| rand::random::<u8>()).collect();
            let v = c.routed_put(&key(i), &value).await.unwrap();
            written.insert(key(i), v);
        }
        let all: BTreeSet<u64> = (1..=5).collect();
        let seen = std::sync::Mutex::new(String::new());
        let ranges = wait_for(
            "at least 32 ranges, each with 3 voters on distinct nodes (bound: 180 s)",
            Duration::from_secs(180),
            || async {
                let r = c.range_list().await.ok()?;
                *seen.lock().unwrap() = format!(
                    "{} ranges, voters {:?}, sizes {}",
                    r.len(),
                    r.iter().map(voters).collect::<Vec<_>>(),
                    sizes_kib(&r)
                );
                (r.len() >= 32 && fully_replicated_on(&r, &all)).then_some(r)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; last seen: {}", seen.lock().unwrap()));
        phase!("{} ranges; replicas per node {:?}", ranges.len(), replica_counts(&ranges));
        phase!("range sizes: {}", sizes_kib(&ranges));

        phase!("every key is readable with its version");
        check_all_keys(&c, &written).await;

        phase!("a scan over all keys returns each key once, in order");
        let keys = c.routed_scan_keys(b"\x01", b"").await.unwrap();
        let mut want: Vec<Vec<u8>> = written.keys().cloned().collect();
        want.sort();
        assert_eq!(keys.len(), want.len(), "scan saw every key exactly once");
        assert!(keys.iter().zip(&want).all(|(a, b)| a.as_ref() == b.as_slice()));

        phase!("add node 6: it receives replicas and leaders");
        let six = c.add_node().unwrap();
        let all6: BTreeSet<u64> = (1..=6).collect();
        let waited = wait_for(
            "node 6 holds replicas and a leader, and no node is more than 20% (+1) above the mean (bound: 180 s)",
            Duration::from_secs(180),
            || async {
                let r = c.range_list().await.ok()?;
                if !fully_replicated_on(&r, &all6) {
                    return None;
                }
                let counts = replica_counts(&r);
                let mean = counts.values().sum::<usize>() as f64 / 6.0;
                let max = *counts.values().max()?;
                let leaders = r.iter().filter(|x| x.leader_id == six).count();
                *seen.lock().unwrap() = format!("replicas {counts:?}, leaders on node 6: {leaders}");
                let ok = counts.get(&six).copied().unwrap_or(0) as f64 >= mean * 0.8 - 1.0
                    && (max as f64) <= mean * 1.2 + 1.0
                    && leaders > 0;
                ok.then_some(())
            },
        )
        .await;
        if let Err(e) = waited {
            let seen = seen.lock().unwrap().clone();
            fail_with_placement_view(&c, e, &seen).await;
        }
        let ranges = c.range_list().await.unwrap();
        phase!("balanced: replicas per node {:?}", replica_counts(&ranges));

        phase!("kill -9 node 2 under writes; its replicas are re-created elsewhere");
        let stop = Arc::new(AtomicBool::new(false));
        let c = Arc::new(tokio::sync::Mutex::new(c));
        {
            c.lock().await.kill(2).unwrap();
        }
        let writer = {
            let c = c.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = HashMap::new();
                let mut i = 100_000u32;
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("live/{i:07}").into_bytes();
                    let r = c.lock().await.routed_put(&k, b"x").await;
                    if let Ok(v) = r {
                        acked.insert(k, v);
                    }
                    i += 1;
                }
                acked
            })
        };
        let alive: BTreeSet<u64> = [1, 3, 4, 5, 6].into_iter().collect();
        wait_for(
            "every range back to 3 voters on live nodes (dead-node timeout 4 s; bound: 120 s)",
            Duration::from_secs(120),
            || async {
                let r = c.lock().await.range_list().await.ok()?;
                fully_replicated_on(&r, &alive).then_some(())
            },
        )
        .await
        .unwrap();
        phase!("repaired");

        phase!("decommission node 3 under the same writes");
        {
            let g = c.lock().await;
            g.meta_call(|mut a| async move {
                a.decommission(lmskv_proto::v1::DecommissionRequest { node_id: 3 })
                    .await
            })
            .await
            .unwrap();
        }
        let rest: BTreeSet<u64> = [1, 4, 5, 6].into_iter().collect();
        wait_for(
            "node 3 drained to zero replicas and marked decommissioned (bound: 180 s)",
            Duration::from_secs(180),
            || async {
                let g = c.lock().await;
                let r = g.range_list().await.ok()?;
                let nodes = g.node_list().await.ok()?;
                let done = nodes
                    .iter()
                    .any(|n| n.node_id == 3 && n.state == "decommissioned");
                (fully_replicated_on(&r, &rest) && done).then_some(())
            },
        )
        .await
        .unwrap();
        stop.store(true, Ordering::Relaxed);
        let acked = writer.await.unwrap();
        phase!("{} writes acknowledged during the kill and the drain", acked.len());
        assert!(!acked.is_empty());

        phase!("nothing acknowledged was lost");
        let g = c.lock().await;
        check_all_keys(&g, &written).await;
        check_all_keys(&g, &acked).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_resumes_after_the_meta_leader_dies_mid_rebalance() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 3 nodes, split into 12 ranges");
        let mut c = TestCluster::start(ClusterOptions {
            nodes: 3,
            config: CONFIG.into(),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        for i in 0..200u32 {
            c.routed_put(&key(i), b"v").await.unwrap();
        }
        for i in (0..200u32).step_by(17).take(11) {
            let _ = c.split_at(&key(i)).await;
        }

        phase!("add nodes 4 and 5; kill the meta leader while replicas move");
        c.add_node().unwrap();
        c.add_node().unwrap();
        wait_for("a replica move to start (bound: 60 s)", Duration::from_secs(60), || async {
            let r = c.range_list().await.ok()?;
            let counts = replica_counts(&r);
            (counts.get(&4).copied().unwrap_or(0) + counts.get(&5).copied().unwrap_or(0) > 0)
                .then_some(())
        })
        .await
        .unwrap();
        let meta_leader = c.wait_meta_leader(Duration::from_secs(10)).await.unwrap();
        phase!("kill -9 meta leader node {meta_leader}");
        c.kill(meta_leader).unwrap();
        let alive: BTreeSet<u64> = (1..=5).filter(|i| *i != meta_leader).collect();
        let seen = std::sync::Mutex::new(String::new());

        let waited = wait_for(
            "placement resumes: every range has 3 voters on the live nodes, nodes 4 and 5 hold replicas (bound: 180 s)",
            Duration::from_secs(180),
            || async {
                let r = c.range_list().await.ok()?;
                let counts = replica_counts(&r);
                *seen.lock().unwrap() = format!(
                    "replicas {counts:?}, voters {:?}",
                    r.iter().map(voters).collect::<Vec<_>>()
                );
                (fully_replicated_on(&r, &alive)
                    && counts.get(&4).copied().unwrap_or(0) >= 3
                    && counts.get(&5).copied().unwrap_or(0) >= 3)
                    .then_some(())
            },
        )
        .await;
        if let Err(e) = waited {
            let seen = seen.lock().unwrap().clone();
            fail_with_placement_view(&c, e, &seen).await;
        }
        for i in 0..200u32 {
            assert!(c.routed_get(&key(i)).await.unwrap().is_some(), "key {i}");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scan_during_splits_returns_each_key_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 3 nodes and write 1500 keys");
        let c = Arc::new(
            TestCluster::start(ClusterOptions {
                nodes: 3,
                config: CONFIG.into(),
                ..ClusterOptions::default()
            })
            .await
            .unwrap(),
        );
        let mut want = Vec::new();
        for i in 0..1500u32 {
            let k = format!("s/{i:05}").into_bytes();
            c.routed_put(&k, b"v").await.unwrap();
            want.push(k);
        }
        phase!("scan in pages of 100 while another task splits ranges under it");
        let splitter = {
            let c = c.clone();
            tokio::spawn(async move {
                for i in (50..1500u32).step_by(50) {
                    let _ = c.split_at(format!("s/{i:05}").as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        for round in 0..3 {
            let keys = c.routed_scan_keys(b"s/", b"s0").await.unwrap();
            let got: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
            assert_eq!(got, want, "scan round {round} saw every key once, in order");
        }
        splitter.await.unwrap();
        let ranges = c.range_list().await.unwrap();
        assert!(
            ranges.len() >= 20,
            "the splits happened: {} ranges",
            ranges.len()
        );
        let keys = c.routed_scan_keys(b"s/", b"s0").await.unwrap();
        assert_eq!(keys.len(), want.len());
    })
    .await
    .expect("test timed out");
}

/// A drain needs enough live nodes left to take the drained node's
/// replicas; a node that died is still registered as up but cannot take
/// any, so with it counted the drain would leave ranges on two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_that_would_leave_too_few_live_nodes_is_refused() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut c = TestCluster::start(ClusterOptions {
            nodes: 4,
            config: CONFIG.into(),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        client.put("drain/k", "v").await.unwrap();
        wait_for(
            "all 4 nodes registered and up (bound: 30 s)",
            Duration::from_secs(30),
            || async {
                let nodes = client.node_list().await.ok()?;
                (nodes.iter().filter(|n| n.state == "up").count() == 4).then_some(())
            },
        )
        .await
        .unwrap();
        phase!("kill node 4 and wait until it is reported down");
        c.kill(4).unwrap();
        wait_for(
            "node 4 reported down (bound: 30 s)",
            Duration::from_secs(30),
            || async {
                let nodes = client.node_list().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node_id == 4 && n.state == "down")
                    .then_some(())
            },
        )
        .await
        .unwrap();
        // Past any grace a meta leader elected meanwhile gives silent nodes
        // (the dead-node timeout, 4 s).
        tokio::time::sleep(Duration::from_secs(5)).await;
        phase!("draining node 3 would leave 2 live nodes for 3 replicas: refused");
        let err = client.decommission(3).await.unwrap_err();
        assert!(err.to_string().contains("2 live nodes"), "{err}");
        let nodes = client.node_list().await.unwrap();
        assert!(
            nodes.iter().any(|n| n.node_id == 3 && n.state == "up"),
            "node 3 was left as it was: {nodes:?}"
        );
        let v = client
            .get("drain/k", lmskv_client::ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(v.map(|kv| kv.value), Some(bytes::Bytes::from_static(b"v")));
    })
    .await
    .expect("test timed out");
}
