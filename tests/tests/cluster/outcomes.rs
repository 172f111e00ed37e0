//! What a call reports when one of its tries may have been applied, against
//! real node processes:
//! - a write whose reply was lost (a proxy in front of the leader drops it)
//!   and whose retry is then refused without being looked up by its request
//!   id (a late copy below its session's completed mark) reports an unknown
//!   outcome, not a definite refusal: it was applied;
//! - a split whose reply was lost, and whose retry is refused because a
//!   range now starts at the key, reports the split it made; a split at a
//!   range's start with no such earlier try is still refused;
//! - a write durable on every voter (`Durability::All`) waits for a voter
//!   whose disk is slow (a fail point delays its log syncs) instead of
//!   giving up on each try at the leader attempt timeout until its deadline.
//!
//! The last test needs node binaries built with `--features
//! lmskv-node/failpoints`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{
    ClientError, Durability, ReadConsistency, WriteOptions, LEADER_ATTEMPT_TIMEOUT_DEFAULT,
};
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::v1::{PutRequest, WriteOptions as PWriteOptions};
use lmskv_tests::{phase, wait_for, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// The value of the put whose reply is lost: a marker no other request of
/// the test carries.
const LOST_PUT_VALUE: &[u8] = b"the value of the put whose reply is lost";

/// Request `n` of a client session whose 8-byte id is `session`.
fn request_id(session: [u8; 8], n: u64) -> Bytes {
    let mut id = session.to_vec();
    id.extend_from_slice(&n.to_be_bytes());
    id.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_applied_before_its_retry_was_refused_as_a_late_copy_reports_an_unknown_outcome() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        // Session marks are applied once the cluster runs version 3.
        c.wait_cluster_version(3, Duration::from_secs(30))
            .await
            .unwrap();
        let client = c.client();
        let watcher = c.client();
        // Caches the range, so the next message to carry the marker is the put.
        client.put("unknown/warmup", "x").await.unwrap();
        let leader = c
            .wait_range_leader(b"unknown/a", Duration::from_secs(20))
            .await
            .unwrap();
        let session = [0x5a; 8];

        // The marker is the put's value, which the watcher's reads of the
        // key do not carry: whichever is sent first, only the put loses its
        // reply. Held long enough for the watcher's read and the marked
        // request below to be done before the put's retries can reach the
        // leader again, and well inside the client's 20 s deadline.
        phase!("the put's reply is lost and its connection held for 8 s");
        c.proxy(leader)
            .lose_reply_to_holding(LOST_PUT_VALUE, Duration::from_secs(8));
        let put = {
            let client = client.clone();
            let opts = WriteOptions {
                request_id: Some(request_id(session, 1)),
                ..WriteOptions::default()
            };
            tokio::spawn(async move {
                client
                    .put_with("unknown/a", Bytes::from_static(LOST_PUT_VALUE), &opts)
                    .await
            })
        };
        wait_for("the put to be applied", Duration::from_secs(10), || async {
            watcher
                .get("unknown/a", ReadConsistency::Strong)
                .await
                .ok()
                .flatten()
        })
        .await
        .unwrap();

        phase!("a later request of the put's session marks every request below 100 returned");
        c.kv(leader)
            .put(PutRequest {
                header: None,
                key: Bytes::from_static(b"unknown/b"),
                value: Bytes::from_static(b"2"),
                write: Some(PWriteOptions {
                    request_id: request_id(session, 100),
                    durability: 0,
                    completed_below: 100,
                }),
            })
            .await
            .unwrap();
        assert!(
            !put.is_finished(),
            "the put ended before its session's mark rose: the test proves nothing"
        );

        phase!("the put's retry is refused as a late copy: its outcome is unknown");
        let out = put.await.unwrap();
        assert_eq!(
            c.proxy(leader).lost_replies(),
            1,
            "the fault was not injected: the test proves nothing"
        );
        let e = out.expect_err("a retry below its session's mark cannot be answered");
        assert!(
            e.is_outcome_unknown(),
            "the put was applied, but its error says it was not: {e:?}"
        );
        assert!(
            e.to_string().contains("write.request_id"),
            "the unknown outcome should name the late-copy refusal: {e}"
        );
        let got = watcher
            .get("unknown/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.value, Bytes::from_static(LOST_PUT_VALUE));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_whose_reply_is_lost_reports_the_split_it_made() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions {
            proxied: true,
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        // A split sent while the cluster version is being raised may be
        // refused; the test needs the first try to split the range.
        c.wait_cluster_version(3, Duration::from_secs(30))
            .await
            .unwrap();
        let client = c.client();
        client.put("splitlost/a", "1").await.unwrap();
        client.put("splitlost/z", "1").await.unwrap();
        let meta = c.wait_meta_leader(Duration::from_secs(10)).await.unwrap();
        let key = Bytes::from_static(b"splitlost/m");

        phase!(
            "the split's reply is lost (meta leader: node {meta}) and its connection held for 3 s"
        );
        // The marker is the split request as gRPC frames it (no compression
        // flag, the message's length, then field 1: the key), so the lookup
        // the call makes first, which carries the key too, is answered.
        let mut split_frame = vec![0u8];
        split_frame.extend_from_slice(&(key.len() as u32 + 2).to_be_bytes());
        split_frame.extend_from_slice(&[0x0a, key.len() as u8]);
        split_frame.extend_from_slice(&key);
        c.proxy(meta)
            .lose_reply_to_holding(&split_frame, Duration::from_secs(3));
        let (left, right) = client
            .split(key.clone())
            .await
            .unwrap_or_else(|e| panic!("the split failed: {e:?}"));
        assert_eq!(
            c.proxy(meta).lost_replies(),
            1,
            "the fault was not injected: the test proves nothing"
        );
        assert_eq!(left.end_key, key);
        assert_eq!(right.start_key, key);

        phase!("the key space was split there once");
        let ranges = client.range_list().await.unwrap();
        let starting: Vec<u64> = ranges
            .iter()
            .filter_map(|r| r.descriptor.as_ref())
            .filter(|d| d.start_key == key)
            .map(|d| d.range_id)
            .collect();
        assert_eq!(starting, vec![right.range_id]);
        assert!(ranges
            .iter()
            .filter_map(|r| r.descriptor.as_ref())
            .any(|d| d.range_id == left.range_id && d.end_key == key));

        phase!("with no earlier try, a split where a range starts is refused");
        match client.split(key.clone()).await {
            Err(ClientError::Server(ServerError::InvalidArgument { reason, .. }))
                if reason.contains("already starts at this key") => {}
            other => panic!("expected the split to be refused, got {other:?}"),
        }
        for k in ["splitlost/a", "splitlost/z"] {
            client.put(k, "2").await.unwrap();
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_all_durability_write_waits_for_a_slow_voter_instead_of_failing_at_its_deadline() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        client.put("slowvoter/warmup", "x").await.unwrap();
        let leader = c
            .wait_range_leader(b"slowvoter/a", Duration::from_secs(20))
            .await
            .unwrap();
        let meta = c.wait_meta_leader(Duration::from_secs(10)).await.unwrap();
        let victim = (1..=3).find(|id| *id != leader && *id != meta).unwrap();

        phase!("restart node {victim} with every log sync 800 ms late");
        assert_eq!(c.stop(victim).unwrap(), Some(0));
        c.spawn_with_env(victim, &[("FAILPOINTS", "log-sync-before=sleep(800)")])
            .unwrap();
        let w = client.put("slowvoter/caught-up", "x").await.unwrap();
        wait_for(
            "the slow voter to catch up",
            Duration::from_secs(30),
            || async {
                let s = c.status(victim).await.ok()?;
                s.ranges
                    .iter()
                    .any(|r| {
                        r.applied_index >= w.index
                            && r.descriptor
                                .as_ref()
                                .is_some_and(|d| d.range_id == w.range_id)
                    })
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));

        phase!("a write durable on every voter, with a 10 s deadline");
        let quick = client.with_deadline(Duration::from_secs(10)).unwrap();
        let opts = WriteOptions {
            durability: Durability::All,
            ..WriteOptions::default()
        };
        let started = Instant::now();
        let out = quick.put_with("slowvoter/a", "all", &opts).await;
        let took = started.elapsed();
        let w = out.unwrap_or_else(|e| {
            panic!("the write failed after {took:?}: {e}\n{}", c.log_tails(20))
        });
        phase!("acknowledged after {took:?}");
        assert!(
            took > LEADER_ATTEMPT_TIMEOUT_DEFAULT,
            "the write took {took:?}: the slow voter did not slow it, the test proves nothing"
        );
        let got = client
            .get("slowvoter/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.version, w.version);
    })
    .await
    .expect("test timed out");
}
