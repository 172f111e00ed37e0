//! A register workload against a real 3-node cluster whose leader is killed
//! and restarted mid-run; the recorded history of STRONG reads, writes and
//! compare-and-swaps must be linearizable.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmskv_client::{Compare, ReadConsistency, WriteOptions};
use lmskv_tests::checker::{check_history, Budget, History, Op, Outcome, Ret, Verdict};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const CLIENTS: u64 = 5;
const KEYS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strong_reads_writes_and_cas_stay_linearizable_across_a_leader_crash() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let recorder = History::recorder();
        let stop = Arc::new(AtomicBool::new(false));
        let seed: u64 = rand::random();
        phase!("{CLIENTS} clients on {KEYS} keys; seed {seed}");
        let mut tasks = Vec::new();
        for client_id in 0..CLIENTS {
            let (client, rec, stop) = (c.client(), recorder.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                // One seeded stream per client: a run replays from its seed.
                let mut rng = StdRng::seed_from_u64(seed ^ client_id);
                let mut n = 0u64;
                let mut last_seen: Option<Bytes> = None;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = Bytes::from(format!("reg/{}", rng.gen::<u64>() % KEYS));
                    let value = Bytes::from(format!("c{client_id}-{n}"));
                    match rng.gen::<u64>() % 10 {
                        0..=4 => {
                            let inv = rec.invoke(client_id, key.clone(), Op::Read).unwrap();
                            match client.get(key, ReadConsistency::Strong).await {
                                Ok(v) => {
                                    last_seen = v.as_ref().map(|kv| kv.value.clone());
                                    rec.complete(inv, Outcome::Ok(Ret::Read(last_seen.clone())))
                                        .unwrap();
                                }
                                // A failed read has no effect.
                                Err(_) => rec.discard(inv).unwrap(),
                            }
                        }
                        5..=7 => {
                            let inv = rec
                                .invoke(client_id, key.clone(), Op::Write(value.clone()))
                                .unwrap();
                            let out = match client.put(key, value).await {
                                Ok(_) => Outcome::Ok(Ret::Write),
                                Err(_) => Outcome::Unknown,
                            };
                            rec.complete(inv, out).unwrap();
                        }
                        _ => {
                            let expected = last_seen.clone();
                            let op = Op::Cas {
                                expected: expected.clone(),
                                new: Some(value.clone()),
                            };
                            let inv = rec.invoke(client_id, key.clone(), op).unwrap();
                            let cmp = match expected {
                                Some(v) => Compare::Value(v),
                                None => Compare::Version(0),
                            };
                            let out = match client
                                .compare_and_swap(key, cmp, Some(value), &WriteOptions::default())
                                .await
                            {
                                Ok(o) => Outcome::Ok(Ret::Cas {
                                    swapped: o.succeeded,
                                }),
                                Err(_) => Outcome::Unknown,
                            };
                            rec.complete(inv, out).unwrap();
                        }
                    }
                }
            }));
        }

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        phase!("kill -9 the leader (node {leader})");
        c.kill(leader).unwrap();
        c.wait_leader(Duration::from_secs(20)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        phase!("restart node {leader}");
        c.spawn(leader).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }

        let history = recorder.finish();
        let budget = Budget {
            time_max: Duration::from_secs(60),
            ..Budget::default()
        };
        let report = tokio::task::spawn_blocking(move || check_history(&history, budget))
            .await
            .unwrap();
        phase!("{report}");
        assert!(report.ops_checked > 100, "the workload made progress");
        match &report.verdict {
            Verdict::Linearizable => {}
            other => panic!("history not proven linearizable (seed {seed}): {other:?}"),
        }
    })
    .await
    .expect("test timed out");
}
