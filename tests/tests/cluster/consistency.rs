//! Read consistency against real processes: a STRONG read never returns a
//! value older than a write acknowledged before it started, even when asked of
//! a deposed leader that was paused past its lease; SESSION reads see the
//! session's own writes on a follower; a leader partitioned from the majority
//! (proxies in front of every node) refuses STRONG reads and loses nothing;
//! a follower left beside such a leader (five replicas) refuses bounded reads
//! once their bound is past; a key's version never goes down across a split
//! once the cluster runs version 2, which waits for every node.

use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::v1::{Consistency, GetRequest, ReadOptions};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn get(key: &str, consistency: Consistency, min_applied: u64) -> GetRequest {
    GetRequest {
        header: None,
        key: Bytes::copy_from_slice(key.as_bytes()),
        read: Some(ReadOptions {
            consistency: consistency as i32,
            max_staleness_ms: 0,
            min_applied_index: min_applied,
        }),
    }
}

/// Waits until one of `ids` reports that it leads the user range.
async fn new_leader_among(c: &TestCluster, ids: &[u64]) -> u64 {
    lmskv_tests::wait_for("a new leader", Duration::from_secs(30), || async {
        for id in ids {
            if let Ok(s) = c.status(*id).await {
                if lmskv_tests::cluster::user_range(&s).is_some_and(|r| r.local_role == "leader") {
                    return Some(*id);
                }
            }
        }
        None
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_old_leader_never_serves_a_stale_strong_read() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        client.put("x", "old").await.unwrap();
        let old_leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();

        phase!("pause the leader (node {old_leader}) past its lease");
        c.pause(old_leader).unwrap();
        let others: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();
        let new_leader = new_leader_among(&c, &others).await;

        phase!("node {new_leader} takes a write");
        let mut kv_new = c.kv(new_leader);
        kv_new
            .put(lmskv_proto::v1::PutRequest {
                header: None,
                key: "x".into(),
                value: "new".into(),
                write: None,
            })
            .await
            .unwrap();

        phase!("resume node {old_leader} and ask it first for a STRONG read");
        c.resume(old_leader).unwrap();
        let r = c.kv(old_leader).get(get("x", Consistency::Strong, 0)).await;
        match r {
            Ok(resp) => {
                let v = resp.into_inner().kv.map(|kv| kv.value);
                assert_eq!(
                    v,
                    Some(Bytes::from_static(b"new")),
                    "a STRONG read returned a stale value"
                );
            }
            Err(s) => {
                let e = Error::from_status(&s);
                phase!("node {old_leader} refused: {e}");
                assert!(
                    e.is_retryable(),
                    "the old leader refuses with a retryable error: {e}"
                );
            }
        }
        phase!("a client with every node as a seed reads the new value");
        let v = client
            .get("x", lmskv_client::ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"new"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_read_on_a_follower_sees_the_sessions_write() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        let client = c.client();
        for i in 0..50u32 {
            let w = client.put("s", format!("v{i}")).await.unwrap();
            let got = c
                .kv(follower)
                .get(get("s", Consistency::Session, w.index))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                got.kv.unwrap().value,
                Bytes::from(format!("v{i}")),
                "write {i}"
            );
            assert!(got.header.unwrap().applied_index >= w.index);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_serves_bounded_staleness_reads_only_while_it_can_prove_the_bound() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        let client = c.client();
        client.put("b", "v1").await.unwrap();
        let bounded = |max_ms| GetRequest {
            header: None,
            key: "b".into(),
            read: Some(ReadOptions {
                consistency: Consistency::BoundedStaleness as i32,
                max_staleness_ms: max_ms,
                min_applied_index: 0,
            }),
        };

        phase!("a healthy follower serves bounded reads");
        let v = lmskv_tests::wait_for(
            "a bounded read on the follower",
            Duration::from_secs(5),
            || {
                let mut kv = c.kv(follower);
                let req = bounded(300);
                // Within the bound the follower may still miss v1 (acknowledged
                // less than 300 ms ago); it must catch up and keep serving.
                async move { kv.get(req).await.ok()?.into_inner().kv }
            },
        )
        .await
        .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"v1"));

        phase!("pause follower {follower}, write v2, resume it and read at once");
        c.pause(follower).unwrap();
        client.put("b", "v2").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.resume(follower).unwrap();
        match c.kv(follower).get(bounded(150)).await {
            Ok(r) => assert_eq!(
                r.into_inner().kv.unwrap().value,
                Bytes::from_static(b"v2"),
                "a bounded read returned a value older than its bound"
            ),
            Err(s) => assert!(Error::from_status(&s).is_retryable()),
        }

        phase!("pause the leader; after the bound, followers refuse bounded reads");
        c.pause(leader).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c.kv(follower).get(bounded(200)).await;
        let err = r.expect_err("a follower cut off from its leader served a bounded read");
        assert!(Error::from_status(&err).is_retryable(), "{err:?}");
        c.resume(leader).unwrap();
    })
    .await
    .expect("test timed out");
}

/// With five replicas a deposed leader can keep a follower company on the
/// minority side of a partition: the follower goes on accepting its
/// heartbeats (their term is still the newest it knows) while the majority
/// elects another leader and takes writes. The follower must not count
/// those heartbeats as proof that it is within a bound of the range's
/// state: a leader's appends say how long ago a quorum last acknowledged
/// it, and that age grows on the cut-off side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_beside_a_cut_off_leader_refuses_bounded_reads() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let c = TestCluster::start(ClusterOptions {
            nodes: 5,
            proxied: true,
            config: "replication_factor = 5".into(),
            worker_threads: Some(lmskv_tests::cluster::shared_host_worker_threads(5)),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        client.put("b", "v1").await.unwrap();

        phase!("wait for five voters");
        let leader = lmskv_tests::wait_for("five voters", Duration::from_secs(60), || async {
            let l = c.wait_leader(Duration::from_secs(5)).await.ok()?;
            let st = c.status(l).await.ok()?;
            let voters = lmskv_tests::cluster::user_range(&st)?
                .descriptor
                .as_ref()?
                .replicas
                .iter()
                .filter(|r| r.role == lmskv_proto::v1::ReplicaRole::Voter as i32)
                .count();
            (voters == 5).then_some(l)
        })
        .await
        .unwrap();
        let follower = (1..=5).find(|id| *id != leader).unwrap();
        let bounded = |max_ms| GetRequest {
            header: None,
            key: "b".into(),
            read: Some(ReadOptions {
                consistency: Consistency::BoundedStaleness as i32,
                max_staleness_ms: max_ms,
                min_applied_index: 0,
            }),
        };
        let v = lmskv_tests::wait_for(
            "a bounded read on the follower",
            Duration::from_secs(10),
            || {
                let mut kv = c.kv(follower);
                let req = bounded(1_000);
                async move { kv.get(req).await.ok()?.into_inner().kv }
            },
        )
        .await
        .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"v1"));

        let others: Vec<u64> = (1..=5)
            .filter(|id| *id != leader && *id != follower)
            .collect();
        phase!("partition leader {leader} and follower {follower} from nodes {others:?}");
        c.partition(&[leader, follower], &others);
        let new_leader = new_leader_among(&c, &others).await;
        phase!("the majority's leader (node {new_leader}) takes v2");
        let w = client.put("b", "v2").await.unwrap();
        let acked = std::time::Instant::now();
        let st = c.status(leader).await.unwrap();
        let old = lmskv_tests::cluster::user_range(&st).unwrap();
        assert_eq!(
            old.local_role, "leader",
            "node {leader} still believes it leads (the case under test)"
        );

        phase!("past the bound, the follower beside the old leader is asked");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        for _ in 0..5 {
            let asked = std::time::Instant::now();
            match c.kv(follower).get(bounded(1_000)).await {
                Ok(r) => {
                    let v = r.into_inner().kv.map(|kv| kv.value);
                    panic!(
                        "a bounded read (1,000 ms) on node {follower} answered {v:?} {:?} after \
                         v2 was acknowledged",
                        asked - acked
                    );
                }
                Err(s) => {
                    let e = Error::from_status(&s);
                    assert!(e.is_retryable(), "refused with a retryable error: {e}");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        phase!("heal; the follower serves bounded reads again, with v2");
        c.heal_network();
        c.wait_applied(follower, w.index, Duration::from_secs(30))
            .await
            .unwrap();
        let v = lmskv_tests::wait_for(
            "a bounded read on the follower after the heal",
            Duration::from_secs(30),
            || {
                let mut kv = c.kv(follower);
                let req = bounded(1_000);
                async move { kv.get(req).await.ok()?.into_inner().kv }
            },
        )
        .await
        .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"v2"));
    })
    .await
    .expect("test timed out");
}

/// A session token travels between clients (the LMS API hands it to the
/// browser, and any API process may serve the next request). Readers whose
/// route caches still map a key to the range it was split from read it at
/// a token of a write made after the split, with a follower that has not
/// applied the split (partitioned from the other nodes, reachable by
/// clients): none may answer without the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_token_from_another_client_sees_its_write_across_a_split() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let writer = c.client();
        let w0 = writer.put("s/k", "old").await.unwrap();
        for id in 1..=3 {
            c.wait_applied(id, w0.index, Duration::from_secs(10))
                .await
                .unwrap();
        }
        phase!("twelve readers learn the key's range before the split");
        let readers: Vec<lmskv_client::Client> = (0..12).map(|_| c.client()).collect();
        for r in &readers {
            let v = r
                .get("s/k", lmskv_client::ReadConsistency::Strong)
                .await
                .unwrap();
            assert_eq!(v.unwrap().value, Bytes::from_static(b"old"));
        }
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let meta_leader = c.wait_meta_leader(Duration::from_secs(10)).await.unwrap();
        let lagging = (1..=3)
            .find(|id| *id != leader && *id != meta_leader)
            .unwrap();
        let others: Vec<u64> = (1..=3).filter(|id| *id != lagging).collect();
        phase!("cut node {lagging} off from nodes {others:?}, split at s/ and write s/k");
        c.partition(&[lagging], &others);
        c.split_at(b"s/").await.unwrap();
        let w = writer.put("s/k", "new").await.unwrap();
        assert_ne!(w.range_id, w0.range_id, "the write went to the new range");
        let token = w.session_token();

        phase!("each reader reads s/k at the writer's token {token}");
        let mut from_lagging = 0;
        for (n, r) in readers.iter().enumerate() {
            let got = r
                .get_detailed("s/k", token.read_consistency())
                .await
                .unwrap();
            let by = got.served_by.expect("a read from a node");
            if by.node_id == lagging {
                from_lagging += 1;
            }
            assert_eq!(
                got.kv.map(|kv| kv.value),
                Some(Bytes::from_static(b"new")),
                "reader {n} (served by node {}, range {}) missed the token's write",
                by.node_id,
                by.range_id
            );
        }
        phase!("every reader saw the write ({from_lagging} served by node {lagging})");
        c.heal_network();
    })
    .await
    .expect("test timed out");
}

/// Writes `key` `n` times; the last write's result.
async fn rewrite(client: &lmskv_client::Client, key: &str, n: u32) -> lmskv_client::WriteResult {
    let mut last = None;
    for i in 0..n {
        last = Some(client.put(key.to_string(), i.to_string()).await.unwrap());
    }
    last.expect("at least one write")
}

/// Splits at `prefix` after writing `prefix`k 40 times, writes it once more
/// and returns the versions of the writes before and after the split.
async fn versions_around_a_split(
    c: &TestCluster,
    client: &lmskv_client::Client,
    prefix: &str,
) -> (lmskv_client::WriteResult, lmskv_client::WriteResult) {
    let key = format!("{prefix}k");
    let before = rewrite(client, &key, 40).await;
    phase!(
        "{key} is at version {} in range {}; split at {prefix}",
        before.version,
        before.range_id
    );
    c.split_at(prefix.as_bytes()).await.unwrap();
    let after = client.put(key, "after").await.unwrap();
    assert_ne!(
        after.range_id, before.range_id,
        "the key moved to the new range"
    );
    (before, after)
}

/// A key's version only grows, across a split too: from cluster version 2
/// on (a fresh cluster goes to the newest, 3) the range split off starts
/// its log where the parent's split entry stands, so a compare-and-swap on
/// a version read before the split cannot match a later write of the new
/// range.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_keep_growing_across_a_split() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        c.wait_cluster_version(3, Duration::from_secs(30))
            .await
            .unwrap();
        let (before, after) = versions_around_a_split(&c, &client, "v/").await;
        assert!(
            after.version > before.version,
            "the write after the split has version {}, not above {} of the write before it",
            after.version,
            before.version
        );
        phase!("a compare-and-swap on the version from before the split is refused");
        let cas = client
            .compare_and_swap(
                "v/k",
                lmskv_client::Compare::Version(before.version),
                Some(Bytes::from_static(b"stale")),
                &lmskv_client::WriteOptions::default(),
            )
            .await
            .unwrap();
        assert!(!cas.succeeded, "{cas:?}");
        let v = client
            .get("v/k", lmskv_client::ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"after"));
        assert_eq!(v.version, after.version);
    })
    .await
    .expect("test timed out");
}

/// Restarts node `id` with `--cluster-version-max` (by its environment
/// variable) at `max`, and waits until it serves its ranges again.
async fn restart_with_version_max(c: &mut TestCluster, id: u64, max: &str) {
    c.stop(id).unwrap();
    c.spawn_with_env(id, &[("LMSKV_CLUSTER_VERSION_MAX", max)])
        .unwrap();
    lmskv_tests::wait_for(
        "the node back with its ranges",
        Duration::from_secs(30),
        || async {
            let s = c.status(id).await.ok()?;
            (s.ranges.len() >= 2 && s.ranges.iter().all(|r| r.leader_id != 0)).then_some(())
        },
    )
    .await
    .unwrap();
}

/// A rolling upgrade held back, then released: the cluster goes to version
/// 2 only once no node holds it at 1 (until then splits start the new
/// range's log as version 1 did, which older binaries can follow), and a
/// node that ran at version 2 refuses to start held back at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_version_rises_once_no_node_holds_it_back() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let mut c = TestCluster::start(ClusterOptions {
            config: "cluster_version_max = 1\n".into(),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        phase!("every node holds the cluster at version 1");
        c.wait_cluster_version(1, Duration::from_secs(30))
            .await
            .unwrap();
        let (before, after) = versions_around_a_split(&c, &client, "h/").await;
        assert!(
            after.version < before.version,
            "at version 1 the new range's log starts over ({} after {})",
            after.version,
            before.version
        );
        phase!("nodes 1 and 2 restart without the hold; node 3 still holds the cluster at 1");
        for id in [1, 2] {
            restart_with_version_max(&mut c, id, "2").await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.wait_cluster_version(1, Duration::from_secs(10))
            .await
            .unwrap();
        phase!("node 3 restarts without the hold: the cluster goes to version 2");
        restart_with_version_max(&mut c, 3, "2").await;
        c.wait_cluster_version(2, Duration::from_secs(30))
            .await
            .unwrap();
        let (before, after) = versions_around_a_split(&c, &client, "g/").await;
        assert!(
            after.version > before.version,
            "at version 2 the write after the split has version {}, not above {}",
            after.version,
            before.version
        );
        phase!("a new node held at version 1 is refused: never registered");
        let held = c
            .add_node_with_env(&[("LMSKV_CLUSTER_VERSION_MAX", "1")])
            .unwrap();
        lmskv_tests::wait_for(
            "the refusal in its log",
            Duration::from_secs(30),
            || async {
                let log = std::fs::read_to_string(c.dir().join(format!("node-{held}.log"))).ok()?;
                log.contains("the meta leader refuses this node's heartbeats")
                    .then_some(())
            },
        )
        .await
        .unwrap();
        let nodes = c.node_list().await.unwrap();
        assert!(
            nodes.iter().all(|n| n.node_id != held),
            "node {held} was registered: {nodes:?}"
        );
        c.kill(held).unwrap();
        phase!("node 3 started held at version 1 again refuses to start");
        c.stop(3).unwrap();
        c.spawn_with_env(3, &[("LMSKV_CLUSTER_VERSION_MAX", "1")])
            .unwrap();
        let code = lmskv_tests::wait_for("node 3 to exit", Duration::from_secs(30), || {
            let exited = c.exited(3).unwrap();
            async move { exited }
        })
        .await
        .unwrap();
        assert_eq!(code, Some(1), "node 3 exits with an error");
        let logs = c.log_tails(20);
        assert!(
            logs.contains("a cluster never goes back to an older version"),
            "{logs}"
        );
        phase!("node 3 runs again without the hold");
        restart_with_version_max(&mut c, 3, "2").await;
        client.put("g/k", "last").await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_partitioned_from_the_majority_never_serves_a_stale_strong_read() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        client.put("x", "old").await.unwrap();
        let old_leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let others: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();

        phase!("partition the leader (node {old_leader}) from nodes {others:?}; clients reach all");
        c.partition(&[old_leader], &others);
        let new_leader = new_leader_among(&c, &others).await;

        phase!("the client writes through the partition (new leader node {new_leader})");
        let w = client.put("x", "new").await.unwrap();

        phase!("a STRONG read asked of the cut-off old leader is refused, never stale");
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.kv(old_leader).get(get("x", Consistency::Strong, 0)),
        )
        .await;
        match r {
            Ok(Ok(resp)) => panic!(
                "the cut-off old leader answered a STRONG read: {:?}",
                resp.into_inner().kv.map(|kv| kv.value)
            ),
            Ok(Err(s)) => {
                let e = Error::from_status(&s);
                phase!("node {old_leader} refused: {e}");
                assert!(e.is_retryable(), "refused with a retryable error: {e}");
            }
            Err(_) => phase!("node {old_leader} did not answer in 15 s"),
        }

        phase!("heal; the old leader catches up and the write stays");
        c.heal_network();
        c.wait_applied(old_leader, w.index, Duration::from_secs(30))
            .await
            .unwrap();
        let v = client
            .get("x", lmskv_client::ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"new"));
        assert_eq!(v.version, w.version);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_read_on_a_lagging_follower_never_answers_older_than_the_token() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        let w1 = client.put("lag", "v1").await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        c.wait_applied(follower, w1.index, Duration::from_secs(10))
            .await
            .unwrap();

        phase!("cut follower {follower} off from leader {leader}; the client still reaches it");
        c.partition(&[follower], &[leader]);
        let w2 = client.put("lag", "v2").await.unwrap();
        let token = w2.session_token();
        let lagging = c
            .kv(follower)
            .get(get("lag", Consistency::ConsistentPrefix, 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            lagging.kv.unwrap().value,
            Bytes::from_static(b"v1"),
            "the follower lags behind the session's write"
        );

        phase!("a SESSION read at the write's token on the lagging follower");
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.kv(follower).get(get(
                "lag",
                Consistency::Session,
                token.index_for(w2.range_id),
            )),
        )
        .await;
        match r {
            Ok(Ok(resp)) => assert_eq!(
                resp.into_inner().kv.map(|kv| kv.value),
                Some(Bytes::from_static(b"v2")),
                "a SESSION read answered older than its token"
            ),
            Ok(Err(s)) => {
                let e = Error::from_status(&s);
                phase!("node {follower} refused: {e}");
                assert!(e.is_retryable(), "refused with a retryable error: {e}");
            }
            Err(_) => phase!("node {follower} did not answer in 15 s"),
        }

        phase!("the client's SESSION read finds a replica that has the write");
        let got = client
            .get_detailed("lag", lmskv_client::ReadConsistency::Session(token.clone()))
            .await
            .unwrap();
        assert_eq!(got.kv.unwrap().value, Bytes::from_static(b"v2"));

        phase!("heal: the follower catches up and serves the SESSION read itself");
        c.heal_network();
        let resp =
            lmskv_tests::wait_for("the follower to serve v2", Duration::from_secs(30), || {
                let mut kv = c.kv(follower);
                let req = get("lag", Consistency::Session, token.index_for(w2.range_id));
                async move { kv.get(req).await.ok().map(|r| r.into_inner()) }
            })
            .await
            .unwrap();
        assert_eq!(resp.kv.unwrap().value, Bytes::from_static(b"v2"));
        assert_eq!(resp.header.unwrap().node_id, follower);
    })
    .await
    .expect("test timed out");
}
