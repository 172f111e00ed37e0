//! Client routing against real node processes: a client whose route cache
//! was filled before another client split ranges and moved a leader heals
//! its cache from the routing errors and completes every call (get, put,
//! batch_get, batch_put, scans in both directions); an atomic batch across
//! two ranges is refused; and a write whose reply was lost is retried with
//! its request id and applied once (both a reply the caller dropped and one
//! a proxy in front of the leader lost on the network). An atomic batch
//! whose reply was lost while its range split is reported as of unknown
//! outcome, not as bad input. A follower asked
//! for a leader the client lost holds the request until another is elected.

use std::time::Duration;

use bytes::Bytes;
use lmskv_client::{BatchOp, ClientError, Compare, ReadConsistency, ScanOptions, WriteOptions};
use lmskv_proto::v1::{PutRequest, RequestHeader};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const KEYS: usize = 120;

fn key(i: usize) -> Bytes {
    Bytes::from(format!("route/{i:04}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_heals_its_cache_after_splits_and_leader_moves() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let admin = c.client();

        phase!("fill this client's route cache with writes and reads");
        let pairs: Vec<(Bytes, Bytes)> = (0..KEYS).map(|i| (key(i), Bytes::from("v1"))).collect();
        client
            .batch_put(pairs, &WriteOptions::default())
            .await
            .unwrap();
        let got = client
            .batch_get((0..KEYS).map(key), ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(got.len(), KEYS);
        let before = client.cached_ranges();
        phase!("{before} ranges cached");

        phase!("another client splits the key space and moves a leader");
        for at in [30, 60, 90] {
            let (l, r) = admin.split(key(at)).await.unwrap();
            phase!("split at {at}: ranges {} and {}", l.range_id, r.range_id);
        }
        let ranges = admin.range_list().await.unwrap();
        let moved = ranges
            .iter()
            .find(|r| {
                r.descriptor
                    .as_ref()
                    .is_some_and(|d| lmskv_proto::range::contains(d, &key(70)))
            })
            .expect("a range holds key 70");
        let d = moved.descriptor.as_ref().unwrap();
        let to = d
            .replicas
            .iter()
            .map(|r| r.node_id)
            .find(|n| *n != moved.leader_id)
            .expect("another replica");
        admin.transfer_leader(d.range_id, to).await.unwrap();
        phase!("range {} leader {} -> {to}", d.range_id, moved.leader_id);

        phase!("this client completes every call on its stale cache");
        for i in (0..KEYS).step_by(7) {
            let kv = client
                .get(key(i), ReadConsistency::Strong)
                .await
                .unwrap()
                .expect("key exists");
            assert_eq!(kv.value, "v1");
        }
        for i in (0..KEYS).step_by(5) {
            client.put(key(i), "v2").await.unwrap();
        }
        let got = client
            .batch_get((0..KEYS).map(key), ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(got.len(), KEYS);
        for (i, kv) in got.iter().enumerate() {
            assert_eq!(kv.key, key(i), "batch_get returns keys in order");
            let want = if i % 5 == 0 { "v2" } else { "v1" };
            assert_eq!(kv.value, want, "{:?}", kv.key);
        }
        let span = ScanOptions {
            start: "route/".into(),
            end: "route0".into(),
            limit: 17,
            ..Default::default()
        };
        let fwd = client.scan_all(&span, 10_000).await.unwrap();
        let fwd_keys: Vec<Bytes> = fwd.into_iter().map(|kv| kv.key).collect();
        assert_eq!(fwd_keys, (0..KEYS).map(key).collect::<Vec<_>>());
        let rev = client
            .scan_all(
                &ScanOptions {
                    reverse: true,
                    ..span.clone()
                },
                10_000,
            )
            .await
            .unwrap();
        let rev_keys: Vec<Bytes> = rev.into_iter().map(|kv| kv.key).collect();
        assert_eq!(rev_keys, (0..KEYS).rev().map(key).collect::<Vec<_>>());
        phase!("pages of every size, both ways, across the range boundaries at 30, 60, 90");
        for limit in [1, 29, 30, 31, 60, 1_000] {
            for reverse in [false, true] {
                let opts = ScanOptions {
                    limit,
                    reverse,
                    ..span.clone()
                };
                let mut pages = 0;
                let mut seen = Vec::new();
                let mut o = opts.clone();
                loop {
                    let page = client.scan(&o).await.unwrap();
                    pages += 1;
                    assert!(page.kvs.len() <= limit as usize, "a page exceeds its limit");
                    seen.extend(page.kvs.into_iter().map(|kv| kv.key));
                    match page.next_page_token {
                        Some(t) => o.page_token = t,
                        None => break,
                    }
                }
                let mut want: Vec<Bytes> = (0..KEYS).map(key).collect();
                if reverse {
                    want.reverse();
                }
                assert_eq!(seen, want, "limit {limit} reverse {reverse}");
                assert!(pages >= KEYS.div_ceil(limit as usize), "limit {limit}");
            }
        }

        phase!("SESSION reads at this client's token work on every range, new ones too");
        // The ranges made by the splits have logs of their own that start
        // low; an index seen on another range must not hold them back.
        let session = ReadConsistency::Session(client.session_token());
        let got = client
            .batch_get((0..KEYS).map(key), session.clone())
            .await
            .unwrap();
        assert_eq!(got.len(), KEYS);
        for (i, kv) in got.iter().enumerate() {
            let want = if i % 5 == 0 { "v2" } else { "v1" };
            assert_eq!(kv.value, want, "{:?}", kv.key);
        }
        let page = client
            .scan(&ScanOptions {
                limit: 1_000,
                consistency: session,
                ..span.clone()
            })
            .await
            .unwrap();
        assert_eq!(page.kvs.len(), KEYS);
        assert!(
            client.cached_ranges() >= 4,
            "the cache holds the split ranges: {}",
            client.cached_ranges()
        );
        phase!(
            "{} ranges cached, {} Locate calls",
            client.cached_ranges(),
            client.locate_calls()
        );

        phase!("a scan paged while a range splits sees every key once");
        let mut opts = ScanOptions {
            limit: 25,
            ..span.clone()
        };
        let mut seen = Vec::new();
        let mut split_done = false;
        loop {
            let page = client.scan(&opts).await.unwrap();
            seen.extend(page.kvs.into_iter().map(|kv| kv.key));
            if !split_done {
                admin.split(key(45)).await.unwrap();
                split_done = true;
            }
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => break,
            }
        }
        assert_eq!(seen, (0..KEYS).map(key).collect::<Vec<_>>());

        phase!("an atomic batch across two ranges is refused and writes nothing");
        let err = client
            .batch(
                vec![],
                vec![
                    BatchOp::Put(key(1), "x".into()),
                    BatchOp::Put(key(100), "x".into()),
                ],
                &WriteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::InvalidArgument { .. }), "{err}");
        let kv = client.get(key(1), ReadConsistency::Strong).await.unwrap();
        assert_eq!(kv.unwrap().value, "v1");
    })
    .await
    .expect("test timed out");
}

/// A replica move changes a range's members, not its span, so no request
/// is refused with the new descriptor: a client whose cache predates the
/// move learns of it from the node that no longer holds the range, and
/// its replica reads go on to the node that took its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_reads_follow_a_replica_move() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = TestCluster::start(ClusterOptions {
            // No rebalancing: only the operator's move changes members.
            config: "balance_tolerance = 10.0\n".into(),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        let keys: Vec<Bytes> = (0..30).map(|i| Bytes::from(format!("mv/{i:02}"))).collect();
        for k in &keys {
            client.put(k.clone(), "v").await.unwrap();
        }
        let warm = client
            .get_detailed("mv/warm", ReadConsistency::Eventual)
            .await
            .unwrap();
        let range_id = warm.served_by.expect("a node answered").range_id;
        let four = c.add_node().unwrap();
        let admin = c.client();
        lmskv_tests::wait_for("node 4 to register", Duration::from_secs(30), || async {
            let nodes = admin.node_list().await.ok()?;
            nodes.iter().any(|n| n.node_id == four).then_some(())
        })
        .await
        .unwrap();
        let info = admin
            .range_list()
            .await
            .unwrap()
            .into_iter()
            .find(|r| {
                r.descriptor
                    .as_ref()
                    .is_some_and(|d| d.range_id == range_id)
            })
            .expect("the range is listed");
        let from = info
            .descriptor
            .as_ref()
            .unwrap()
            .replicas
            .iter()
            .map(|r| r.node_id)
            .find(|n| *n != info.leader_id)
            .expect("a follower");
        phase!("move range {range_id}'s replica from node {from} to node {four}");
        admin.move_replica(range_id, from, four).await.unwrap();
        lmskv_tests::wait_for(
            &format!("node {from} to drop range {range_id}"),
            Duration::from_secs(30),
            || async {
                let s = c.status(from).await.ok()?;
                (!s.ranges.iter().any(|r| {
                    r.descriptor
                        .as_ref()
                        .is_some_and(|d| d.range_id == range_id)
                }))
                .then_some(())
            },
        )
        .await
        .unwrap();

        phase!("read every key once at EVENTUAL with the cache from before the move");
        let mut by_node = std::collections::BTreeMap::<u64, usize>::new();
        for k in &keys {
            let got = client
                .get_detailed(k.clone(), ReadConsistency::Eventual)
                .await
                .unwrap();
            assert_eq!(got.kv.map(|kv| kv.value), Some(Bytes::from_static(b"v")));
            *by_node
                .entry(got.served_by.expect("not cached").node_id)
                .or_default() += 1;
        }
        phase!("reads served by node: {by_node:?}");
        assert!(
            !by_node.contains_key(&from),
            "node {from} gave the range up"
        );
        assert!(
            by_node.get(&four).is_some_and(|n| *n >= 3),
            "node {four} took node {from}'s place and serves its share: {by_node:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_reply_was_lost_is_applied_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let k = Bytes::from_static(b"lost/k");
        let id = Bytes::from_static(b"lost-reply-0001");

        phase!("the write reaches the leader; its reply is dropped");
        let leader = c
            .wait_range_leader(&k, Duration::from_secs(20))
            .await
            .unwrap();
        let range = client.range_for_key(&k).await.unwrap();
        let mut raw = c.kv(leader);
        // The reply is never read by the writer: this is the lost reply.
        let _lost = raw
            .put(PutRequest {
                header: Some(RequestHeader {
                    range_id: range.range_id,
                    epoch: range.epoch,
                    ..Default::default()
                }),
                key: k.clone(),
                value: "first".into(),
                write: Some(lmskv_proto::v1::WriteOptions {
                    request_id: id.clone(),
                    durability: 0,
                    completed_below: 0,
                }),
            })
            .await
            .unwrap();

        phase!("another writer changes the key meanwhile");
        let other = client.put(k.clone(), "second").await.unwrap();

        phase!("the writer retries with the same request id through the client");
        let retried = client
            .put_with(
                k.clone(),
                "first",
                &WriteOptions {
                    request_id: Some(id.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(
            retried.version < other.version,
            "the retry was applied again: version {} after the other write's {}",
            retried.version,
            other.version
        );
        let now = client
            .get(k.clone(), ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(now.value, "second", "the retry overwrote a later write");
        assert_eq!(now.version, other.version);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_sent_to_a_stopped_leader_moves_on_to_the_new_leader() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        // The client's deadline (20 s) is longer than one try on a leader
        // may wait, so a try the stopped leader never answers is given up on
        // and the write goes to whoever leads next.
        let client = c.client();
        client.put("stopped/k", "1").await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();

        phase!("pause the leader (node {leader}); the client still routes to it");
        c.pause(leader).unwrap();
        let w = client.put("stopped/k", "2").await;
        let r = client.get("stopped/k", ReadConsistency::Strong).await;
        c.resume(leader).unwrap();
        let w = w.expect("the write reached the new leader within its deadline");
        let r = r.unwrap().expect("the key exists");
        assert_eq!(r.value, Bytes::from_static(b"2"));
        assert_eq!(r.version, w.version, "the read sees the acknowledged write");

        phase!("the old leader, resumed, serves the write too");
        let v = lmskv_tests::wait_for(
            "the old leader applies the write",
            Duration::from_secs(20),
            || {
                let mut kv = c.kv(leader);
                async move {
                    let got = kv
                        .get(lmskv_proto::v1::GetRequest {
                            header: None,
                            key: "stopped/k".into(),
                            read: Some(lmskv_proto::v1::ReadOptions {
                                consistency: lmskv_proto::v1::Consistency::Session as i32,
                                max_staleness_ms: 0,
                                min_applied_index: w.index,
                            }),
                        })
                        .await
                        .ok()?;
                    got.into_inner().kv
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(v.value, Bytes::from_static(b"2"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_lookups_outlive_callers_that_gave_up_without_wedging_the_client() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        c.client().put("wedge/warm", "x").await.unwrap();
        // A fresh client: every key below needs a route lookup.
        let client = c.client();
        let short = client.with_deadline(Duration::from_millis(300)).unwrap();
        let nodes = c.running();

        phase!("every node paused: callers with a 300 ms deadline give up on their lookups");
        for id in &nodes {
            c.pause(*id).unwrap();
        }
        let shared_get = {
            let short = short.clone();
            tokio::spawn(async move { short.get("wedge/shared", ReadConsistency::Strong).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A caller with the default deadline shares the lookup the short one started.
        let put = {
            let client = client.clone();
            tokio::spawn(async move { client.put("wedge/shared", "v").await })
        };
        let gets = (0..lmskv_client::LOCATE_IN_FLIGHT_MAX + 8).map(|i| {
            let short = short.clone();
            async move {
                short
                    .get(format!("wedge/{i}"), ReadConsistency::Strong)
                    .await
            }
        });
        let results = futures::future::join_all(gets).await;
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(shared_get.await.unwrap().is_err());
        tokio::time::sleep(Duration::from_millis(500)).await;

        phase!("resumed: the long caller's write and new lookups go through");
        for id in &nodes {
            c.resume(*id).unwrap();
        }
        let w = put
            .await
            .unwrap()
            .expect("the write outlived the short caller's lookup");
        let got = client
            .get("wedge/shared", ReadConsistency::Strong)
            .await
            .unwrap()
            .expect("written");
        assert_eq!(got.version, w.version);
        client
            .put("wedge/new", "n")
            .await
            .expect("the client still writes after the wedge");
    })
    .await
    .expect("test timed out");
}

/// A raw put of `key` to node `to`, naming `suspect` as the leader the
/// client lost (0: none) and letting the node hold it up to `wait_ms`.
async fn raw_put(
    c: &TestCluster,
    to: u64,
    range: &lmskv_proto::v1::RangeDescriptor,
    key: &Bytes,
    suspect: u64,
    wait_ms: u32,
) -> Result<u64, lmskv_proto::error::Error> {
    c.kv(to)
        .put(PutRequest {
            header: Some(RequestHeader {
                range_id: range.range_id,
                epoch: range.epoch,
                suspect_leader: suspect,
                leader_wait_ms: wait_ms,
            }),
            key: key.clone(),
            value: "v".into(),
            write: Some(lmskv_proto::v1::WriteOptions {
                request_id: Bytes::from(format!("suspect-{to}-{suspect}")),
                durability: 0,
                completed_below: 0,
            }),
        })
        .await
        .map(|r| r.into_inner().version)
        .map_err(|s| lmskv_proto::error::Error::from_status(&s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_holds_a_request_naming_a_lost_leader_until_another_is_elected() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let k = Bytes::from_static(b"suspect/k");
        client.put(k.clone(), "0").await.unwrap();
        let leader = c
            .wait_range_leader(&k, Duration::from_secs(20))
            .await
            .unwrap();
        let range = client.range_for_key(&k).await.unwrap();
        let follower = range
            .replicas
            .iter()
            .map(|r| r.node_id)
            .find(|&n| n != leader)
            .expect("a follower");

        phase!("a follower names the live leader at once, suspect or not");
        let started = std::time::Instant::now();
        for suspect in [0, leader] {
            let err = raw_put(&c, follower, &range, &k, suspect, 20_000)
                .await
                .expect_err("a follower does not take writes");
            let lmskv_proto::error::Error::NotLeader { leader: hint, .. } = &err else {
                panic!("expected NOT_LEADER, got {err}");
            };
            assert_eq!(hint.as_ref().map(|h| h.node_id), Some(leader), "{err}");
        }
        // Not a timing assertion on the cluster: the 20 s the request allowed
        // were not used while the leader kept sending heartbeats.
        assert!(started.elapsed() < Duration::from_secs(10));

        phase!("pause the leader (node {leader}); ask follower {follower} at once");
        c.pause(leader).unwrap();
        let plain = raw_put(&c, follower, &range, &k, 0, 0).await;
        let held_at = std::time::Instant::now();
        let held = raw_put(&c, follower, &range, &k, leader, 9_000).await;
        phase!(
            "held request answered after {:?}: {held:?}",
            held_at.elapsed()
        );
        c.resume(leader).unwrap();
        // Without a suspect the follower answers with what it knows, which
        // (well inside the election timeout) is the stopped leader.
        match plain {
            Err(lmskv_proto::error::Error::NotLeader { leader: hint, .. }) => {
                assert_eq!(hint.map(|h| h.node_id), Some(leader));
            }
            other => panic!("expected NOT_LEADER naming node {leader}, got {other:?}"),
        }
        // Naming the stopped leader, the request was held until an election:
        // the follower either won it and took the write, or names the winner
        // (or, caught between the votes and the new leader's first message,
        // no leader), but not the stopped leader, as the plain request did.
        match held {
            Ok(version) => assert!(version > 0),
            Err(lmskv_proto::error::Error::NotLeader { leader: hint, .. }) => {
                assert_ne!(
                    hint.map(|h| h.node_id),
                    Some(leader),
                    "the held request came back naming the stopped leader"
                );
            }
            Err(e) => panic!("expected the write or NOT_LEADER, got {e}"),
        }

        phase!("the client still writes and reads the key");
        let w = client.put(k.clone(), "1").await.unwrap();
        let r = client
            .get(k.clone(), ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.version, w.version);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_whose_reply_is_lost_on_the_network_is_retried_by_the_client_and_applied_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        client.put("lost/warmup", "x").await.unwrap();
        let leader = c
            .wait_range_leader(b"lost/once", Duration::from_secs(20))
            .await
            .unwrap();

        phase!("the leader's proxy (node {leader}) will drop the reply to the create");
        c.proxy(leader).lose_reply_to(b"lost/once");
        // Create-if-absent: applied a second time it would fail its compare,
        // so success proves the retry was answered from the first outcome.
        let created = client
            .compare_and_swap(
                "lost/once",
                Compare::Version(0),
                Some(Bytes::from_static(b"v")),
                &WriteOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            c.proxy(leader).lost_replies(),
            1,
            "the fault was not injected: the test proves nothing"
        );
        assert!(
            created.succeeded,
            "the retried create failed its compare: it was applied twice ({created:?})"
        );
        let now = client
            .get("lost/once", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(now.value, "v");
        assert_eq!(
            Some(now.version),
            created.current.map(|kv| kv.version),
            "the key was written again after the create"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_atomic_batch_whose_reply_is_lost_while_its_range_splits_is_reported_as_unknown() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let client = c.client();
        let watcher = c.client();
        // Caches the range, so the next message to carry the marker is the batch.
        client.put("lostsplit/warmup", "x").await.unwrap();
        let leader = c
            .wait_range_leader(b"lostsplit/a", Duration::from_secs(20))
            .await
            .unwrap();

        // Held far longer than the split takes, within the client's 20 s
        // deadline: no answer from the leader reaches the client before the
        // split (it hears of the split from a follower it asks meanwhile).
        phase!(
            "the batch's reply is lost and its connection held for 15 s; the range splits meanwhile"
        );
        c.proxy(leader)
            .lose_reply_to_holding(b"lostsplit/a", Duration::from_secs(15));
        let batch = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .batch(
                        Vec::new(),
                        vec![
                            BatchOp::Put(Bytes::from_static(b"lostsplit/a"), Bytes::from("1")),
                            BatchOp::Put(Bytes::from_static(b"lostsplit/z"), Bytes::from("1")),
                        ],
                        &WriteOptions::default(),
                    )
                    .await
            })
        };
        // The batch was applied (its reply is what gets lost).
        loop {
            let got = watcher
                .get("lostsplit/z", ReadConsistency::Strong)
                .await
                .unwrap();
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.split_at(b"lostsplit/m").await.unwrap();
        assert!(
            !batch.is_finished(),
            "the batch ended before the split: the test proves nothing"
        );

        phase!("the retry finds the keys in two ranges: the outcome is unknown, not bad input");
        let out = batch.await.unwrap();
        assert_eq!(
            c.proxy(leader).lost_replies(),
            1,
            "the fault was not injected: the test proves nothing"
        );
        match out {
            Err(ClientError::Server(lmskv_proto::error::Error::Timeout { reason })) => {
                assert!(reason.contains("may or may not be applied"), "{reason}");
            }
            other => panic!("expected an outcome-unknown timeout, got {other:?}"),
        }
        let a = watcher
            .get("lostsplit/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.value, "1", "the batch was applied whole");
    })
    .await
    .expect("test timed out");
}
