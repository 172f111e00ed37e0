//! The client's read routing and read cache against real node processes:
//! EVENTUAL reads are answered from the cache without a network call (even
//! with every node paused) while STRONG, SESSION and CONSISTENT_PREFIX reads
//! never are; the client's own writes replace what it cached; the TTL bounds
//! how stale an EVENTUAL read gets; a BOUNDED_STALENESS read takes a cached
//! value only within its bound; and reads at the weaker levels are served by
//! followers, also while the leader is paused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{Client, GetOutcome, ReadConsistency};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a call that the cache must answer may take; the cache answers
/// in microseconds, a paused node never.
const CACHE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call that needs a node is given while every node is paused.
const PAUSED_CALL_TIMEOUT: Duration = Duration::from_millis(300);

/// A client whose cached entries serve EVENTUAL reads for `ttl`.
fn client_with_ttl(c: &TestCluster, ttl: Duration) -> Client {
    Client::builder()
        .endpoints(c.endpoints())
        .deadline(Duration::from_secs(20))
        .read_cache(1_000, 16 * 1024 * 1024, ttl)
        .build()
        .expect("client")
}

fn value(o: &GetOutcome) -> Option<Bytes> {
    o.kv.as_ref().map(|kv| kv.value.clone())
}

fn b(s: &'static str) -> Option<Bytes> {
    Some(Bytes::from_static(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eventual_read_is_answered_by_the_cache_with_every_node_paused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = client_with_ttl(&c, Duration::from_secs(60));
        let other = c.client();

        phase!("another client writes; a SESSION read fills this client's cache");
        let w = other.put("cache/a", "v1").await.unwrap();
        let first = client
            .get_detailed("cache/a", ReadConsistency::Session(w.session_token()))
            .await
            .unwrap();
        assert_eq!(value(&first), b("v1"));
        assert!(!first.from_cache(), "SESSION reads never use the cache");
        let before = client.cache_stats();
        assert!(before.entries >= 1, "{before:?}");

        phase!("pause every node");
        for id in 1..=3 {
            c.pause(id).unwrap();
        }
        let cached = tokio::time::timeout(
            CACHE_ANSWER_TIMEOUT,
            client.get_detailed("cache/a", ReadConsistency::Eventual),
        )
        .await;
        let mut refused_levels = Vec::new();
        for level in [
            ReadConsistency::Strong,
            ReadConsistency::Session(w.session_token()),
            ReadConsistency::ConsistentPrefix,
        ] {
            let r = tokio::time::timeout(PAUSED_CALL_TIMEOUT, client.get("cache/a", level.clone()))
                .await;
            let what = format!("{r:?}");
            refused_levels.push((level, r.is_err(), what));
        }
        phase!("resume every node");
        for id in 1..=3 {
            c.resume(id).unwrap();
        }

        let cached = cached
            .expect("an EVENTUAL read of a cached key waited for a paused node")
            .unwrap();
        assert!(cached.from_cache());
        assert_eq!(value(&cached), b("v1"));
        for (level, waited, what) in refused_levels {
            assert!(
                waited,
                "a {level:?} read was answered with every node paused: {what}"
            );
        }
        let after = client.cache_stats();
        assert_eq!(after.hits, before.hits + 1, "{before:?} -> {after:?}");

        phase!("the cluster serves again");
        let strong = client
            .get_detailed("cache/a", ReadConsistency::Strong)
            .await
            .unwrap();
        assert!(!strong.from_cache(), "STRONG reads never use the cache");
        assert_eq!(value(&strong), b("v1"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_clients_own_writes_replace_what_it_cached() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = client_with_ttl(&c, Duration::from_secs(60));

        phase!("put v1 and cache it");
        let w1 = client.put("own/k", "v1").await.unwrap();
        client
            .get("own/k", ReadConsistency::Session(w1.session_token()))
            .await
            .unwrap();
        let r = client
            .get_detailed("own/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        assert!(r.from_cache());
        assert_eq!(value(&r), b("v1"));

        phase!("put v2 through the same client: an EVENTUAL read sees v2");
        let w2 = client.put("own/k", "v2").await.unwrap();
        let r = client
            .get_detailed("own/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        assert_eq!(value(&r), b("v2"), "the client's own put left v1 cached");
        assert_eq!(r.kv.unwrap().version, w2.version);

        phase!("delete: an EVENTUAL read sees the key gone");
        assert!(client.delete("own/k").await.unwrap());
        let r = client
            .get_detailed("own/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        assert_eq!(value(&r), None, "the client's own delete left v2 cached");

        phase!("compare-and-swap creates it again: an EVENTUAL read sees v3");
        let cas = client
            .compare_and_swap(
                "own/k",
                lmskv_client::Compare::Version(0),
                b("v3"),
                &Default::default(),
            )
            .await
            .unwrap();
        assert!(cas.succeeded);
        let r = client
            .get_detailed("own/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        assert_eq!(
            value(&r),
            b("v3"),
            "the client's own CAS left old state cached"
        );

        phase!("a batch writes it: the cached v3 is gone, a node answers");
        let batch = client
            .batch(
                vec![],
                vec![lmskv_client::BatchOp::Put("own/k".into(), "v4".into())],
                &Default::default(),
            )
            .await
            .unwrap();
        assert!(batch.succeeded);
        let r = client
            .get_detailed("own/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        assert!(!r.from_cache(), "the batch left its key cached");
        let r = client
            .get("own/k", ReadConsistency::Session(batch.session_token()))
            .await
            .unwrap();
        assert_eq!(r.map(|kv| kv.value), b("v4"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eventual_read_sees_another_clients_write_once_the_ttl_has_passed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const TTL: Duration = Duration::from_millis(500);
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = client_with_ttl(&c, TTL);
        let other = c.client();

        phase!("another client writes v1; this client caches it");
        let w1 = other.put("ttl/k", "v1").await.unwrap();
        let filled_not_before = Instant::now();
        let r = client
            .get_detailed("ttl/k", ReadConsistency::Session(w1.session_token()))
            .await
            .unwrap();
        assert_eq!(value(&r), b("v1"));

        phase!("the other client writes v2, and every node applies it");
        let w2 = other.put("ttl/k", "v2").await.unwrap();
        let age = filled_not_before.elapsed();
        let r = client
            .get_detailed("ttl/k", ReadConsistency::Eventual)
            .await
            .unwrap();
        // The entry was stored after `filled_not_before`, so it is certainly
        // still within its TTL when `age` leaves a margin.
        if age + Duration::from_millis(50) < TTL {
            assert!(r.from_cache(), "a cached entry within its TTL was not used");
            assert_eq!(value(&r), b("v1"), "the cache served something else");
        } else {
            phase!("the machine is slow ({age:?} since the fill): the stale read is not checked");
        }
        for id in 1..=3 {
            c.wait_applied(id, w2.index, Duration::from_secs(10))
                .await
                .unwrap();
        }

        phase!("wait until an EVENTUAL read sees v2");
        let misses_before = client.cache_stats().misses;
        let seen_after =
            lmskv_tests::wait_for("an eventual read of v2", Duration::from_secs(10), || {
                let client = client.clone();
                async move {
                    let r = client
                        .get_detailed("ttl/k", ReadConsistency::Eventual)
                        .await
                        .ok()?;
                    if value(&r) == b("v1") {
                        assert!(
                            filled_not_before.elapsed() < TTL + Duration::from_secs(5),
                            "v1 is still served long after the TTL"
                        );
                    }
                    (value(&r) == b("v2")).then(|| filled_not_before.elapsed())
                }
            })
            .await
            .unwrap();
        assert!(
            seen_after >= TTL,
            "v2 was seen {seen_after:?} after the fill, before the TTL of {TTL:?} passed"
        );
        assert!(client.cache_stats().misses > misses_before);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bounded_staleness_read_uses_the_cache_only_within_its_bound() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = client_with_ttl(&c, Duration::from_secs(60));
        let other = c.client();
        let w = other.put("bounded/k", "v1").await.unwrap();

        phase!("a value read from some replica's local state proves no freshness");
        client
            .get("bounded/k", ReadConsistency::Session(w.session_token()))
            .await
            .unwrap();
        let wide = ReadConsistency::BoundedStaleness(Duration::from_secs(30));
        let r = client
            .get_detailed("bounded/k", wide.clone())
            .await
            .unwrap();
        assert!(
            !r.from_cache(),
            "a SESSION read's value served a bounded read"
        );

        phase!("after a STRONG read, a bounded read within its bound uses the cache");
        client
            .get("bounded/k", ReadConsistency::Strong)
            .await
            .unwrap();
        let r = client.get_detailed("bounded/k", wide).await.unwrap();
        assert!(r.from_cache());
        assert_eq!(value(&r), b("v1"));

        phase!("a bound shorter than the entry's age goes to a node");
        // Time itself is the subject: the entry must be older than the bound.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let narrow = ReadConsistency::BoundedStaleness(Duration::from_millis(20));
        let r = client.get_detailed("bounded/k", narrow).await.unwrap();
        assert!(
            !r.from_cache(),
            "a cached value older than the bound was used"
        );
        assert_eq!(value(&r), b("v1"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_serve_reads_at_the_weaker_levels() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let client = Client::builder()
            .endpoints(c.endpoints())
            .deadline(Duration::from_secs(20))
            .without_read_cache()
            .build()
            .unwrap();
        let w = client.put("spread/k", "v1").await.unwrap();
        for id in 1..=3 {
            c.wait_applied(id, w.index, Duration::from_secs(10))
                .await
                .unwrap();
        }

        phase!("reads at each weaker level spread over the nodes (leader is {leader})");
        for level in [
            ReadConsistency::ConsistentPrefix,
            ReadConsistency::Session(w.session_token()),
            ReadConsistency::BoundedStaleness(Duration::from_secs(2)),
            ReadConsistency::Eventual,
        ] {
            let mut servers = BTreeSet::new();
            for _ in 0..9 {
                let r = client
                    .get_detailed("spread/k", level.clone())
                    .await
                    .unwrap();
                assert_eq!(value(&r), b("v1"), "{level:?}");
                servers.insert(r.served_by.expect("no cache").node_id);
            }
            phase!("{level:?} served by nodes {servers:?}");
            assert!(
                servers.iter().any(|n| *n != leader),
                "no follower served a {level:?} read"
            );
        }

        phase!("STRONG reads are served by the leader");
        for _ in 0..3 {
            let r = client
                .get_detailed("spread/k", ReadConsistency::Strong)
                .await
                .unwrap();
            assert_eq!(r.served_by.unwrap().node_id, leader);
        }

        phase!("pause the leader: SESSION and CONSISTENT_PREFIX reads still succeed on followers");
        c.pause(leader).unwrap();
        let mut results = Vec::new();
        for level in [
            ReadConsistency::Session(w.session_token()),
            ReadConsistency::ConsistentPrefix,
            ReadConsistency::Session(w.session_token()),
            ReadConsistency::ConsistentPrefix,
        ] {
            // On a loaded machine one replica attempt may time out; the read
            // must still succeed on a follower within a few tries.
            let mut r = None;
            for _ in 0..3 {
                let got = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.get_detailed("spread/k", level.clone()),
                )
                .await;
                let done = matches!(got, Ok(Ok(_)));
                if let Ok(Err(e)) = &got {
                    phase!("{level:?} read failed once: {e}");
                }
                r = Some(got);
                if done {
                    break;
                }
            }
            results.push((level, r.expect("at least one try")));
        }
        c.resume(leader).unwrap();
        for (level, r) in results {
            let r = r
                .unwrap_or_else(|_| panic!("a {level:?} read hung with the leader paused"))
                .unwrap();
            assert_eq!(value(&r), b("v1"));
            assert_ne!(r.served_by.unwrap().node_id, leader, "{level:?}");
        }

        phase!("the session token covers what the client wrote");
        assert!(client.session_token().index_for(w.range_id) >= w.index);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_get_fills_the_cache_for_the_keys_it_found_and_those_it_did_not() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let writer = c.client();
        writer.put("bg/a", "1").await.unwrap();
        writer.put("bg/b", "2").await.unwrap();
        let client = client_with_ttl(&c, Duration::from_secs(60));
        let got = client
            .batch_get(["bg/a", "bg/b", "bg/missing"], ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(got.len(), 2);

        phase!("pause every node: the three keys are answered from the cache");
        for id in 1..=3 {
            c.pause(id).unwrap();
        }
        let mut answers = Vec::new();
        for k in ["bg/a", "bg/b", "bg/missing"] {
            let r = tokio::time::timeout(
                CACHE_ANSWER_TIMEOUT,
                client.get_detailed(k, ReadConsistency::Eventual),
            )
            .await;
            answers.push((k, r));
        }
        for id in 1..=3 {
            c.resume(id).unwrap();
        }
        for (k, r) in answers {
            let o = r
                .unwrap_or_else(|_| panic!("{k}: an EVENTUAL read waited for a paused node"))
                .unwrap();
            assert!(o.from_cache(), "{k}");
            let want = match k {
                "bg/a" => b("1"),
                "bg/b" => b("2"),
                _ => None,
            };
            assert_eq!(value(&o), want, "{k}");
        }
    })
    .await
    .expect("test timed out");
}
