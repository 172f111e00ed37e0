//! Idle ranges: a range nobody uses hibernates (its leader stops heartbeats,
//! its followers stop their election timers) and then every replica parks
//! (shuts its Raft group down, keeping only what it last reported). A parked
//! range must serve the next write and read at once (its leader campaigns
//! again), and must still fail over when its leader's node dies while it
//! sleeps.

use std::time::Duration;

use bytes::Bytes;
use lmskv_client::ReadConsistency;
use lmskv_proto::v1::{Consistency, GetRequest, ReadOptions};
use lmskv_tests::cluster::user_range;
use lmskv_tests::{phase, wait_for, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Idle for 2 s, hibernation marked and stopped over two liveness rounds,
/// then dormant for 2 s: parked after about 6 s; the bound leaves room for
/// a loaded machine.
const PARK_WITHIN: Duration = Duration::from_secs(60);
/// Shorter idle times than the defaults (10 s each), so the test waits less.
const CONFIG: &str = "range_hibernate_after_ms = 2000\nrange_park_after_ms = 2000\n";

/// The user range's (leader, parked replicas) as the nodes report them (a
/// parked leader reports the role it parked in).
async fn parked_replicas(c: &TestCluster) -> Option<(u64, Vec<u64>)> {
    let mut leader = None;
    let mut parked = Vec::new();
    for id in c.running() {
        let s = c.status(id).await.ok()?;
        let r = user_range(&s)?;
        if r.local_role == "leader" {
            leader = Some(id);
        }
        if r.parked {
            parked.push(id);
        }
    }
    Some((leader?, parked))
}

async fn wait_parked(c: &TestCluster) -> (u64, Vec<u64>) {
    wait_for(
        "every replica of the user range to park",
        PARK_WITHIN,
        || async { parked_replicas(c).await.filter(|(_, p)| p.len() == 3) },
    )
    .await
    .unwrap()
}

async fn local_value(c: &TestCluster, node: u64, key: &str) -> Option<Bytes> {
    c.kv(node)
        .get(GetRequest {
            header: None,
            key: Bytes::copy_from_slice(key.as_bytes()),
            read: Some(ReadOptions {
                consistency: Consistency::ConsistentPrefix as i32,
                ..Default::default()
            }),
        })
        .await
        .ok()?
        .into_inner()
        .kv
        .map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_ranges_serve_again_and_still_fail_over() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 3 nodes and write 50 keys");
        let mut c = TestCluster::start(ClusterOptions {
            config: CONFIG.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let client = c.client();
        for i in 0..50u32 {
            client
                .put(format!("p/{i:03}"), format!("v{i}"))
                .await
                .unwrap();
        }

        phase!("leave the range idle until every replica parks");
        let (leader, parked) = wait_parked(&c).await;
        phase!("leader {leader}, parked {parked:?}");

        phase!("a parked replica still answers reads of what it applied");
        for node in &parked {
            assert_eq!(
                local_value(&c, *node, "p/007").await,
                Some(Bytes::from("v7")),
                "node {node}"
            );
        }

        phase!("a write wakes the range (its leader campaigns) and reaches every replica");
        let started = std::time::Instant::now();
        client.put("p/new", "fresh").await.unwrap();
        phase!("written after {:?}", started.elapsed());
        for node in 1..=3u64 {
            wait_for(
                &format!("node {node} to apply the write"),
                Duration::from_secs(20),
                || async {
                    (local_value(&c, node, "p/new").await == Some(Bytes::from("fresh")))
                        .then_some(())
                },
            )
            .await
            .unwrap();
        }
        let got = client
            .get("p/new", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.value, Bytes::from("fresh"));

        phase!("a STRONG read of a parked range wakes it too");
        let (_, parked) = wait_parked(&c).await;
        phase!("parked {parked:?}");
        let started = std::time::Instant::now();
        let got = client
            .get("p/003", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.value, Bytes::from("v3"));
        phase!("read after {:?}", started.elapsed());

        phase!("idle again until every replica parks, then kill -9 the leader");
        let (leader, parked) = wait_parked(&c).await;
        phase!("leader {leader}, parked {parked:?}");
        c.kill(leader).unwrap();
        let started = std::time::Instant::now();
        let w = tokio::time::timeout(Duration::from_secs(30), client.put("p/after", "kill"))
            .await
            .expect("a write after the sleeping leader died did not finish in 30 s")
            .unwrap();
        phase!(
            "the parked followers elected a leader: write at index {} after {:?}",
            w.index,
            started.elapsed()
        );

        phase!("every key is still there");
        for i in (0..50u32).step_by(7) {
            let got = client
                .get(format!("p/{i:03}"), ReadConsistency::Strong)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.value, Bytes::from(format!("v{i}")));
        }

        phase!("the killed node comes back and catches up");
        c.spawn(leader).unwrap();
        wait_for(
            "the restarted node to apply the last write",
            Duration::from_secs(30),
            || async {
                (local_value(&c, leader, "p/after").await == Some(Bytes::from("kill")))
                    .then_some(())
            },
        )
        .await
        .unwrap();
    })
    .await
    .expect("test timed out");
}
