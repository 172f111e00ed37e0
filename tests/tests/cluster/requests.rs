//! Request semantics against a real 3-node cluster: limits and bad input are
//! refused with InvalidArgument and change nothing, retried writes apply once,
//! followers redirect writes to the leader, and CAS, batches and scans do what
//! they promise.

use std::time::Duration;

use bytes::Bytes;
use lmskv_client::{BatchOp, Compare, ReadConsistency, ScanOptions, WriteOptions};
use lmskv_proto::error::Error;
use lmskv_proto::limits::{
    BATCH_OPS_MAX, KEY_BYTES_MAX, REQUEST_ID_BYTES_MAX, SCAN_LIMIT_MAX, VALUE_BYTES_MAX,
};
use lmskv_proto::v1::{
    batch_op, BatchOp as PBatchOp, BatchRequest, Compare as PCompare, CompareAndSwapRequest,
    DeleteRequest, GetRequest, KeyValue, PutRequest, ScanRequest, WriteOptions as PWriteOptions,
};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn put(key: impl Into<Bytes>, value: impl Into<Bytes>) -> PutRequest {
    PutRequest {
        header: None,
        key: key.into(),
        value: value.into(),
        write: None,
    }
}

fn expect_invalid(what: &str, r: Result<impl std::fmt::Debug, tonic::Status>) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
            assert!(
                matches!(Error::from_status(&s), Error::InvalidArgument { .. }),
                "{what}: carries a typed InvalidArgument"
            );
        }
        Ok(v) => panic!("{what}: accepted: {v:?}"),
    }
}

/// Times the follower test picks a leader again after it moved.
const LEADER_MOVE_RETRIES_MAX: usize = 10;

/// Write options of request `n` of client session `session` (all 8 bytes
/// of the session id set to it), sent with the completed mark `mark`.
fn marked(session: u8, n: u64, mark: u64) -> PWriteOptions {
    let mut id = vec![session; 8];
    id.extend_from_slice(&n.to_be_bytes());
    PWriteOptions {
        request_id: id.into(),
        durability: 0,
        completed_below: mark,
    }
}

/// Sends `req` to the current leader, again when leadership moved.
async fn put_on_leader(
    c: &TestCluster,
    req: PutRequest,
) -> Result<lmskv_proto::v1::PutResponse, tonic::Status> {
    let mut last = None;
    for _ in 0..LEADER_MOVE_RETRIES_MAX {
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        match c.kv(leader).put(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(
                    Error::from_status(&s),
                    Error::NotLeader { .. } | Error::Unavailable { .. }
                ) =>
            {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => return Err(s),
        }
    }
    Err(last.expect("tried at least once"))
}

/// A client session's requests carry its completed mark: a retry of a
/// request still in flight applies once; a late copy of a request below
/// the mark is refused and applies nothing, on whichever replica leads the
/// range; another session is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_copy_below_its_sessions_mark_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        c.wait_cluster_version(3, Duration::from_secs(30))
            .await
            .unwrap();
        let put_marked = |key: &'static str, value: &'static str, w: PWriteOptions| PutRequest {
            write: Some(w),
            ..put(key, value)
        };
        phase!("request 10 of session 1, then its retry");
        let first = put_on_leader(&c, put_marked("m/a", "1", marked(1, 10, 10)))
            .await
            .unwrap();
        let retry = put_on_leader(&c, put_marked("m/a", "1", marked(1, 10, 10)))
            .await
            .unwrap();
        assert_eq!(retry.version, first.version, "the retry applied again");
        phase!("request 100 says every request below it returned");
        put_on_leader(&c, put_marked("m/b", "x", marked(1, 100, 100)))
            .await
            .unwrap();
        expect_invalid(
            "a late copy of request 20",
            put_on_leader(&c, put_marked("m/a", "late", marked(1, 20, 20))).await,
        );
        expect_invalid(
            "request 10 again, below the mark",
            put_on_leader(&c, put_marked("m/a", "1", marked(1, 10, 10))).await,
        );
        let client = c.client();
        let a = client
            .get("m/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.value, Bytes::from_static(b"1"), "the late copy applied");
        assert_eq!(a.version, first.version);
        phase!("another session's request 20 applies");
        put_on_leader(&c, put_marked("m/c", "2", marked(2, 20, 20)))
            .await
            .unwrap();
        phase!("the mark holds on the next leader");
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        c.kill(leader).unwrap();
        expect_invalid(
            "a late copy of request 30 on the next leader",
            put_on_leader(&c, put_marked("m/a", "late", marked(1, 30, 30))).await,
        );
        put_on_leader(&c, put_marked("m/d", "y", marked(1, 101, 101)))
            .await
            .unwrap();
        let a = client
            .get("m/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.value, Bytes::from_static(b"1"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_changes_nothing() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let client = c.client();
        client.put("seed", "1").await.unwrap();
        let before = client
            .scan_all(&ScanOptions::default(), 1000)
            .await
            .unwrap();
        let mut kv = c.kv(leader);

        phase!("oversize and malformed single-key writes");
        expect_invalid("empty key", kv.put(put(Bytes::new(), "v")).await);
        expect_invalid(
            "oversize key",
            kv.put(put(vec![b'k'; KEY_BYTES_MAX + 1], "v")).await,
        );
        expect_invalid("reserved prefix", kv.put(put(&b"\x00meta"[..], "v")).await);
        expect_invalid(
            "oversize value",
            kv.put(put("big", vec![0u8; VALUE_BYTES_MAX + 1])).await,
        );
        let mut p = put("rid", "v");
        p.write = Some(PWriteOptions {
            request_id: vec![1u8; REQUEST_ID_BYTES_MAX + 1].into(),
            durability: 0,
            completed_below: 0,
        });
        expect_invalid("oversize request id", kv.put(p).await);
        let mut p = put("rid", "v");
        p.write = Some(PWriteOptions {
            request_id: Bytes::from_static(b"not-16-bytes"),
            durability: 0,
            completed_below: 1,
        });
        expect_invalid("completed mark without a session id", kv.put(p).await);
        let mut p = put("rid", "v");
        p.write = Some(marked(1, 5, 6));
        expect_invalid("completed mark above the request's number", kv.put(p).await);
        expect_invalid(
            "delete reserved",
            kv.delete(DeleteRequest {
                header: None,
                key: Bytes::from_static(b"\x00x"),
                write: None,
            })
            .await,
        );
        expect_invalid(
            "cas without target",
            kv.compare_and_swap(CompareAndSwapRequest {
                header: None,
                compare: Some(PCompare {
                    key: "seed".into(),
                    target: None,
                }),
                new_value: "x".into(),
                delete: false,
                write: None,
            })
            .await,
        );

        phase!("oversize and partly bad batches write nothing");
        let ops: Vec<PBatchOp> = (0..=BATCH_OPS_MAX)
            .map(|i| PBatchOp {
                op: Some(batch_op::Op::Put(KeyValue {
                    key: format!("b/{i}").into(),
                    value: "v".into(),
                    version: 0,
                })),
            })
            .collect();
        expect_invalid(
            "oversize batch",
            kv.batch(BatchRequest {
                header: None,
                conditions: vec![],
                ops,
                write: None,
            })
            .await,
        );
        let mixed = vec![
            PBatchOp {
                op: Some(batch_op::Op::Put(KeyValue {
                    key: "good".into(),
                    value: "v".into(),
                    version: 0,
                })),
            },
            PBatchOp {
                op: Some(batch_op::Op::Put(KeyValue {
                    key: Bytes::from_static(b"\x00bad"),
                    value: "v".into(),
                    version: 0,
                })),
            },
        ];
        expect_invalid(
            "batch with one bad key",
            kv.batch(BatchRequest {
                header: None,
                conditions: vec![],
                ops: mixed,
                write: None,
            })
            .await,
        );

        phase!("bad reads");
        expect_invalid(
            "scan over limit",
            kv.scan(ScanRequest {
                limit: SCAN_LIMIT_MAX + 1,
                ..Default::default()
            })
            .await,
        );
        expect_invalid(
            "scan into system keys",
            kv.scan(ScanRequest {
                start_key: Bytes::from_static(b"\x00"),
                ..Default::default()
            })
            .await,
        );
        expect_invalid(
            "get empty key",
            kv.get(GetRequest {
                header: None,
                key: Bytes::new(),
                read: None,
            })
            .await,
        );

        phase!("the store is unchanged");
        let after = client
            .scan_all(&ScanOptions::default(), 1000)
            .await
            .unwrap();
        assert_eq!(before, after);
        assert!(client
            .get("good", ReadConsistency::Strong)
            .await
            .unwrap()
            .is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_write_is_applied_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let rid = Bytes::from_static(b"request-0001");
        let opts = WriteOptions {
            request_id: Some(rid.clone()),
            ..Default::default()
        };

        phase!("a write, then another client's write, then a retry of the first");
        let first = client.put_with("counter", "first", &opts).await.unwrap();
        let second = client.put("counter", "second").await.unwrap();
        let retry = client.put_with("counter", "first", &opts).await.unwrap();
        assert_eq!(
            retry.version, first.version,
            "the retry reports the original outcome"
        );
        let now = client
            .get("counter", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            now.value,
            Bytes::from_static(b"second"),
            "the retry did not apply again"
        );
        assert_eq!(now.version, second.version);

        phase!("a retried compare-and-swap increments once");
        client.put("n", "0").await.unwrap();
        let cur = client
            .get("n", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        let cas_opts = WriteOptions {
            request_id: Some(Bytes::from_static(b"cas-1")),
            ..Default::default()
        };
        for _ in 0..3 {
            let out = client
                .compare_and_swap(
                    "n",
                    Compare::Version(cur.version),
                    Some(Bytes::from_static(b"1")),
                    &cas_opts,
                )
                .await
                .unwrap();
            assert!(out.succeeded, "every retry reports the first outcome");
        }
        let n = client
            .get("n", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n.value, Bytes::from_static(b"1"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_answers_writes_with_the_leader() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        // The placement driver may still move leaders to balance them just
        // after bootstrap: ask again if the chosen follower became the leader.
        let mut answer = None;
        for attempt in 0..LEADER_MOVE_RETRIES_MAX {
            let key = format!("k{attempt}");
            let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
            let follower = (1..=3).find(|id| *id != leader).unwrap();
            // The follower may not know the leader until its first heartbeat.
            c.client().put("warm", "up").await.unwrap();
            match c.kv(follower).put(put(key.clone(), "v")).await {
                Err(err) if c.wait_leader(Duration::from_secs(10)).await.unwrap() == leader => {
                    answer = Some((leader, err, key));
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let (leader, err, key) = answer.expect("the leader kept moving");
        match Error::from_status(&err) {
            Error::NotLeader {
                leader: Some(h), ..
            } => {
                assert_eq!(h.node_id, leader);
                assert_eq!(h.address, c.addr(leader));
            }
            other => panic!("expected NotLeader with a hint, got {other:?}"),
        }
        let client = c.client();
        let refused = client
            .get(key.clone(), ReadConsistency::Strong)
            .await
            .unwrap();
        assert!(refused.is_none(), "a refused write left no trace");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_batches_and_scans_keep_their_promises() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = c.client();
        let none = WriteOptions::default();

        phase!("compare-and-swap on version and value");
        let created = client
            .compare_and_swap(
                "acct/a",
                Compare::Version(0),
                Some(Bytes::from_static(b"100")),
                &none,
            )
            .await
            .unwrap();
        assert!(created.succeeded);
        let again = client
            .compare_and_swap(
                "acct/a",
                Compare::Version(0),
                Some(Bytes::from_static(b"999")),
                &none,
            )
            .await
            .unwrap();
        assert!(!again.succeeded, "create-if-absent fails when present");
        assert_eq!(again.current.unwrap().value, Bytes::from_static(b"100"));
        let by_value = client
            .compare_and_swap(
                "acct/a",
                Compare::Value(Bytes::from_static(b"100")),
                Some(Bytes::from_static(b"90")),
                &none,
            )
            .await
            .unwrap();
        assert!(by_value.succeeded);

        phase!("an atomic transfer with conditions");
        client.put("acct/b", "0").await.unwrap();
        let a = client
            .get("acct/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        let b = client
            .get("acct/b", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        let ok = client
            .batch(
                vec![
                    (a.key.clone(), Compare::Version(a.version)),
                    (b.key.clone(), Compare::Version(b.version)),
                ],
                vec![
                    BatchOp::Put(a.key.clone(), Bytes::from_static(b"80")),
                    BatchOp::Put(b.key.clone(), Bytes::from_static(b"10")),
                ],
                &none,
            )
            .await
            .unwrap();
        assert!(ok.succeeded);
        let stale = client
            .batch(
                vec![(a.key.clone(), Compare::Version(a.version))],
                vec![
                    BatchOp::Put(a.key.clone(), Bytes::from_static(b"0")),
                    BatchOp::Put(b.key.clone(), Bytes::from_static(b"90")),
                ],
                &none,
            )
            .await
            .unwrap();
        assert!(!stale.succeeded, "a stale condition fails the whole batch");
        let a2 = client
            .get("acct/a", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        let b2 = client
            .get("acct/b", ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (a2.value.as_ref(), b2.value.as_ref()),
            (&b"80"[..], &b"10"[..])
        );
        assert_eq!(a2.version, b2.version, "one batch, one version");

        phase!("scans page through every key exactly once, both directions");
        for i in 0..250u32 {
            client.put(format!("p/{i:04}"), "v").await.unwrap();
        }
        let mut seen = Vec::new();
        let mut opts = ScanOptions {
            start: "p/".into(),
            end: "p0".into(),
            limit: 40,
            ..Default::default()
        };
        loop {
            let page = client.scan(&opts).await.unwrap();
            assert!(page.kvs.len() <= 40);
            seen.extend(page.kvs.into_iter().map(|kv| kv.key));
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => break,
            }
        }
        let want: Vec<Bytes> = (0..250u32)
            .map(|i| Bytes::from(format!("p/{i:04}")))
            .collect();
        assert_eq!(seen, want);
        let rev = client
            .scan_all(
                &ScanOptions {
                    start: "p/".into(),
                    end: "p0".into(),
                    limit: 33,
                    reverse: true,
                    ..Default::default()
                },
                1000,
            )
            .await
            .unwrap();
        let mut want_rev = want.clone();
        want_rev.reverse();
        assert_eq!(
            rev.into_iter().map(|kv| kv.key).collect::<Vec<_>>(),
            want_rev
        );

        phase!("a scan pages on past keys of the longest length allowed");
        let longest = |c: u8| {
            let mut k = b"long/".to_vec();
            k.resize(lmskv_proto::limits::KEY_BYTES_MAX, c);
            Bytes::from(k)
        };
        let long_keys = vec![longest(b'a'), longest(b'b'), Bytes::from_static(b"long/c")];
        for k in &long_keys {
            client.put(k.clone(), "v").await.unwrap();
        }
        let mut opts = ScanOptions {
            start: "long/".into(),
            end: "long0".into(),
            limit: 1,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = client.scan(&opts).await.unwrap();
            seen.extend(page.kvs.into_iter().map(|kv| kv.key));
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => break,
            }
        }
        assert_eq!(seen, long_keys);

        phase!("a batch_get whose values pass one answer's limit is read in smaller requests");
        let big = Bytes::from(vec![b'x'; 1_000_000]);
        let big_keys: Vec<Bytes> = (0..18)
            .map(|i| Bytes::from(format!("big/{i:02}")))
            .collect();
        for k in &big_keys {
            client.put(k.clone(), big.clone()).await.unwrap();
        }
        let got = client
            .batch_get(big_keys.clone(), ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(
            got.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
            big_keys
        );
        assert!(got.iter().all(|kv| kv.value == big));

        phase!("a page token cannot escape its scan's bounds");
        let mut kv = c.kv(c.wait_leader(Duration::from_secs(5)).await.unwrap());
        let r = kv
            .scan(ScanRequest {
                start_key: "p/".into(),
                end_key: "p0".into(),
                page_token: Bytes::from_static(b"\x01q"),
                ..Default::default()
            })
            .await;
        expect_invalid("foreign token", r);
    })
    .await
    .expect("test timed out");
}
