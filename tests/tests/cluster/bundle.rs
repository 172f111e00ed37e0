//! `Kv.Bundle` against real processes: every request of a bundle is answered
//! on its own, exactly as it would be alone (refusals included, and nothing
//! of a refused request written); a bundle over the limit is refused whole
//! with nothing written; a slow request does not hold up the answers of the
//! others; and the client bundles concurrent requests to one node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{ReadConsistency, ServerError};
use lmskv_proto::limits::BUNDLE_REQUESTS_MAX;
use lmskv_proto::v1::bundled_request::Request as In;
use lmskv_proto::v1::bundled_response::Response as Out;
use lmskv_proto::v1::{
    self, BundleRequest, BundledRequest, BundledResponse, DeleteRequest, Durability, GetRequest,
    PutRequest, RequestHeader, WriteOptions,
};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);

fn put(key: &str, value: &str, id: &str) -> In {
    In::Put(PutRequest {
        header: None,
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        write: Some(WriteOptions {
            request_id: Bytes::copy_from_slice(id.as_bytes()),
            durability: Durability::Majority as i32,
            completed_below: 0,
        }),
    })
}

fn get(key: &str) -> In {
    In::Get(GetRequest {
        header: None,
        key: Bytes::copy_from_slice(key.as_bytes()),
        read: None,
    })
}

/// Sends `requests` as one bundle to `kv`; returns each answer by index and
/// the order in which they came.
async fn send(
    kv: &mut v1::kv_client::KvClient<tonic::transport::Channel>,
    requests: Vec<In>,
) -> Result<(BTreeMap<u32, Out>, Vec<u32>), tonic::Status> {
    let requests = requests
        .into_iter()
        .map(|r| BundledRequest { request: Some(r) })
        .collect();
    let mut stream = kv.bundle(BundleRequest { requests }).await?.into_inner();
    let (mut answers, mut order) = (BTreeMap::new(), Vec::new());
    while let Some(msg) = stream.message().await? {
        for BundledResponse { index, response } in msg.responses {
            let prev = answers.insert(index, response.expect("an answer"));
            assert!(prev.is_none(), "request {index} answered twice");
            order.push(index);
        }
    }
    Ok((answers, order))
}

fn error_of(out: &Out) -> ServerError {
    match out {
        Out::Error(s) => ServerError::from_status(&tonic::Status::with_details(
            tonic::Code::from(s.code),
            s.message.clone(),
            s.details.clone(),
        )),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_of_a_bundle_is_answered_as_if_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        client.put("b/pre", "old").await.unwrap();
        client.put("b/gone", "x").await.unwrap();
        let leader = c.wait_range_leader(b"b/", Duration::from_secs(20)).await.unwrap();
        let mut kv = c.kv(leader);

        phase!("a mixed bundle on the leader: each answer is the one the request alone gets");
        let held = In::Put(PutRequest {
            header: Some(RequestHeader {
                suspect_leader: leader,
                leader_wait_ms: 500,
                ..Default::default()
            }),
            key: Bytes::from_static(b"b/held"),
            value: Bytes::from_static(b"h"),
            write: None,
        });
        let requests = vec![
            put("b/new", "v1", "bundle-test-1"),
            put("\0system", "x", "bundle-test-2"),
            get("b/pre"),
            In::Delete(DeleteRequest {
                header: None,
                key: Bytes::from_static(b"b/gone"),
                write: None,
            }),
            get("b/missing"),
            held,
        ];
        let (answers, _) = send(&mut kv, requests).await.unwrap();
        assert_eq!(answers.len(), 6, "{answers:?}");
        let Out::Put(p) = &answers[&0] else { panic!("{:?}", answers[&0]) };
        assert!(p.version > 0);
        assert!(
            matches!(error_of(&answers[&1]), ServerError::InvalidArgument { ref field, .. } if field == "key"),
            "{:?}",
            answers[&1]
        );
        let Out::Get(g) = &answers[&2] else { panic!("{:?}", answers[&2]) };
        assert_eq!(g.kv.as_ref().map(|kv| kv.value.clone()), Some(Bytes::from_static(b"old")));
        let Out::Delete(d) = &answers[&3] else { panic!("{:?}", answers[&3]) };
        assert!(d.deleted);
        let Out::Get(g) = &answers[&4] else { panic!("{:?}", answers[&4]) };
        assert!(g.kv.is_none());
        assert!(
            matches!(error_of(&answers[&5]), ServerError::InvalidArgument { ref field, .. } if field == "header.suspect_leader"),
            "{:?}",
            answers[&5]
        );
        let new = client.get("b/new", ReadConsistency::Strong).await.unwrap().unwrap();
        assert_eq!((new.value, new.version), (Bytes::from_static(b"v1"), p.version));
        assert!(client.get("b/gone", ReadConsistency::Strong).await.unwrap().is_none());
        assert!(client.get("b/held", ReadConsistency::Strong).await.unwrap().is_none(), "a refused request wrote");

        phase!("the same put again (same request id) is not applied twice");
        let (again, _) = send(&mut kv, vec![put("b/new", "v1", "bundle-test-1")]).await.unwrap();
        let Out::Put(p2) = &again[&0] else { panic!("{:?}", again[&0]) };
        assert_eq!(p2.version, p.version, "a retried bundled put was applied again");

        phase!("on a follower, each write is refused naming the leader");
        let follower = c.running().into_iter().find(|&n| n != leader).unwrap();
        let (answers, _) = send(&mut c.kv(follower), vec![put("b/f", "x", "bundle-test-3")])
            .await
            .unwrap();
        match error_of(&answers[&0]) {
            ServerError::NotLeader { leader: Some(h), .. } => assert_eq!(h.node_id, leader),
            e => panic!("expected NotLeader naming {leader}, got {e:?}"),
        }

        phase!("a bundle over the limit is refused whole, nothing written");
        let over: Vec<In> = (0..=BUNDLE_REQUESTS_MAX)
            .map(|i| put(&format!("b/over/{i}"), "x", &format!("bundle-over-{i}")))
            .collect();
        let err = send(&mut kv, over).await.unwrap_err();
        assert!(
            matches!(ServerError::from_status(&err), ServerError::InvalidArgument { ref field, .. } if field == "requests"),
            "{err:?}"
        );
        assert!(client.get("b/over/0", ReadConsistency::Strong).await.unwrap().is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_answers_ready_at_once_are_spread_over_messages_under_the_limit() {
    use lmskv_proto::limits::{
        BUNDLE_RESPONSE_BYTES_TARGET, GRPC_MESSAGE_BYTES_MAX, VALUE_BYTES_MAX,
    };
    use prost::Message;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let value = Bytes::from(vec![7u8; VALUE_BYTES_MAX]);
        client.put("big/k", value.clone()).await.unwrap();
        let leader = c
            .wait_range_leader(b"big/", Duration::from_secs(20))
            .await
            .unwrap();
        let mut kv = c
            .kv(leader)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);

        phase!("a bundle whose answers together exceed the gRPC message limit");
        let n = GRPC_MESSAGE_BYTES_MAX / VALUE_BYTES_MAX + 6;
        let requests = (0..n)
            .map(|_| BundledRequest {
                request: Some(get("big/k")),
            })
            .collect();
        let mut stream = kv
            .bundle(BundleRequest { requests })
            .await
            .unwrap()
            .into_inner();
        let (mut answered, mut messages) = (0, 0);
        while let Some(msg) = stream.message().await.expect("every message arrives") {
            messages += 1;
            assert!(
                msg.encoded_len() <= BUNDLE_RESPONSE_BYTES_TARGET + VALUE_BYTES_MAX,
                "one message of {} bytes",
                msg.encoded_len()
            );
            for r in msg.responses {
                let Some(Out::Get(g)) = r.response else {
                    panic!("{r:?}")
                };
                assert_eq!(g.kv.expect("the key exists").value, value);
                answered += 1;
            }
        }
        assert_eq!(answered, n);
        assert!(messages >= n * VALUE_BYTES_MAX / (BUNDLE_RESPONSE_BYTES_TARGET + VALUE_BYTES_MAX));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_request_does_not_hold_up_the_others() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        client.put("s/warm", "up").await.unwrap();
        let leader = c
            .wait_range_leader(b"s/", Duration::from_secs(20))
            .await
            .unwrap();
        let follower = c.running().into_iter().find(|&n| n != leader).unwrap();

        phase!("node {follower} paused: a write that waits for every voter cannot finish");
        c.pause(follower).unwrap();
        let all = In::Put(PutRequest {
            header: None,
            key: Bytes::from_static(b"s/all"),
            value: Bytes::from_static(b"a"),
            write: Some(WriteOptions {
                request_id: Bytes::from_static(b"slow-all-1"),
                durability: Durability::All as i32,
                completed_below: 0,
            }),
        });
        let mut kv = c.kv(leader);
        let resume_after = Duration::from_millis(1500);
        let started = Instant::now();
        let bundle = tokio::spawn(async move {
            let requests = vec![all, put("s/quick", "q", "slow-quick-1"), get("s/warm")]
                .into_iter()
                .map(|r| BundledRequest { request: Some(r) })
                .collect();
            let mut stream = kv.bundle(BundleRequest { requests }).await?.into_inner();
            let mut seen = Vec::new();
            while let Some(msg) = stream.message().await? {
                for r in msg.responses {
                    seen.push((r.index, started.elapsed(), r.response));
                }
            }
            Ok::<_, tonic::Status>(seen)
        });
        tokio::time::sleep(resume_after).await;
        c.resume(follower).unwrap();
        let seen = bundle.await.unwrap().unwrap();

        phase!(
            "answers: {:?}",
            seen.iter().map(|(i, t, _)| (*i, *t)).collect::<Vec<_>>()
        );
        assert_eq!(seen.len(), 3);
        let at = |i: u32| seen.iter().find(|(j, _, _)| *j == i).unwrap();
        assert!(
            at(1).1 < resume_after,
            "the quick put waited for the slow one: {:?}",
            at(1).1
        );
        assert!(
            at(2).1 < resume_after,
            "the get waited for the slow write: {:?}",
            at(2).1
        );
        assert!(matches!(at(1).2, Some(Out::Put(_))), "{:?}", at(1).2);
        assert!(matches!(at(2).2, Some(Out::Get(_))), "{:?}", at(2).2);
        assert!(
            at(0).1 >= resume_after,
            "the write to every voter finished while one was paused"
        );
        // Answered either way once the follower is back (done, or timed out).
        assert!(at(0).2.is_some());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_bundles_concurrent_requests_and_each_behaves_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = Arc::new(c.client());
        client.put("c/warm", "up").await.unwrap();
        let before = client.bundle_stats();

        phase!("512 puts at once through one client, then 512 gets");
        let mut tasks = Vec::new();
        for i in 0..512 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let w = client
                    .put(format!("c/k{i:03}"), format!("v{i}"))
                    .await
                    .unwrap();
                (i, w.version)
            }));
        }
        let mut written = Vec::new();
        for t in tasks {
            written.push(t.await.unwrap());
        }
        let mut tasks = Vec::new();
        for (i, version) in written {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let kv = client
                    .get(format!("c/k{i:03}"), ReadConsistency::Strong)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("c/k{i:03} lost"));
                assert_eq!(kv.value, Bytes::from(format!("v{i}")));
                assert_eq!(kv.version, version);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let after = client.bundle_stats();
        phase!("bundle stats before {before:?}, after {after:?}");
        // At least once each: a try that failed is sent again.
        assert!(
            (after.alone - before.alone) + (after.bundled - before.bundled) >= 1024,
            "a put or get went out neither alone nor bundled: {after:?}"
        );
        assert!(
            after.bundles > before.bundles
                && after.bundled - before.bundled > after.bundles - before.bundles,
            "no request shared a call: {after:?}"
        );

        phase!("with bundling off, every request goes alone");
        let plain = lmskv_client::Client::builder()
            .endpoints(c.endpoints())
            .bundle_requests(false)
            .build()
            .unwrap();
        plain.put("c/plain", "p").await.unwrap();
        assert_eq!(plain.bundle_stats(), Default::default());
    })
    .await
    .expect("test timed out");
}
