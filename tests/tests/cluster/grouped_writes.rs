//! Many client writes per Raft entry, against real processes: under
//! concurrent load a range's leader proposes waiting writes as one log entry,
//! and each write still behaves as if alone. Every acknowledged write is read
//! back, writes of one key never share a version (its log index), the last
//! version holds the last value, and compare-and-swap increments from many
//! tasks lose no increment.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmskv_client::{Compare, ReadConsistency, WriteOptions};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const DISTINCT_KEYS: usize = 400;
const HOT_WRITES: usize = 64;
const CAS_TASKS: usize = 16;
const CAS_INCREMENTS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_entries_and_each_behaves_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let client = Arc::new(c.client());
        client.put("g/warm", "up").await.unwrap();
        let leader = c.wait_range_leader(b"g/", Duration::from_secs(20)).await.unwrap();
        let before = lmskv_tests::cluster::user_range(&c.status(leader).await.unwrap())
            .map(|r| (r.writes_proposed, r.entries_proposed))
            .unwrap_or_default();

        phase!("{DISTINCT_KEYS} writes to distinct keys and {HOT_WRITES} to one key, all at once");
        let mut tasks = Vec::new();
        for i in 0..DISTINCT_KEYS {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("g/k{i:04}");
                let w = client.put(key.clone(), format!("v{i}")).await.unwrap();
                (key, format!("v{i}"), w.version)
            }));
        }
        for j in 0..HOT_WRITES {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let w = client.put("g/hot", format!("h{j}")).await.unwrap();
                ("g/hot".to_string(), format!("h{j}"), w.version)
            }));
        }
        let mut hot = Vec::new();
        let mut distinct = Vec::new();
        for t in tasks {
            let (key, value, version) = t.await.unwrap();
            if key == "g/hot" {
                hot.push((version, value));
            } else {
                distinct.push((key, value, version));
            }
        }

        phase!("every write is read back; the hot key's versions are distinct");
        for (key, value, version) in &distinct {
            let kv = client
                .get(key.clone(), ReadConsistency::Strong)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{key} lost"));
            assert_eq!(kv.value, Bytes::from(value.clone()), "{key}");
            assert_eq!(kv.version, *version, "{key}");
        }
        let versions: BTreeSet<u64> = hot.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions.len(), HOT_WRITES, "two writes of g/hot share a version: {hot:?}");
        let (last_version, last_value) = hot.iter().max().unwrap().clone();
        let kv = client.get("g/hot", ReadConsistency::Strong).await.unwrap().unwrap();
        assert_eq!((kv.version, kv.value), (last_version, Bytes::from(last_value)));

        phase!("{CAS_TASKS} tasks x {CAS_INCREMENTS} compare-and-swap increments of one counter");
        let created = client
            .compare_and_swap("g/ctr", Compare::Version(0), Some("0".into()), &WriteOptions::default())
            .await
            .unwrap();
        assert!(created.succeeded);
        let mut tasks = Vec::new();
        for _ in 0..CAS_TASKS {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let (mut version, mut n) = (created.index, 0u64);
                let mut lost_races = 0u64;
                for _ in 0..CAS_INCREMENTS {
                    loop {
                        let out = client
                            .compare_and_swap(
                                "g/ctr",
                                Compare::Version(version),
                                Some(Bytes::from((n + 1).to_string())),
                                &WriteOptions::default(),
                            )
                            .await
                            .unwrap();
                        let cur = out.current.expect("the counter exists");
                        version = cur.version;
                        n = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                        if out.succeeded {
                            break;
                        }
                        lost_races += 1;
                    }
                }
                lost_races
            }));
        }
        let mut races = 0;
        for t in tasks {
            races += t.await.unwrap();
        }
        let kv = client.get("g/ctr", ReadConsistency::Strong).await.unwrap().unwrap();
        assert_eq!(
            kv.value,
            Bytes::from((CAS_TASKS * CAS_INCREMENTS).to_string()),
            "an increment was lost ({races} lost races)"
        );

        phase!("the leader proposed fewer entries than writes");
        let leader_now = c.wait_range_leader(b"g/", Duration::from_secs(20)).await.unwrap();
        let after = lmskv_tests::cluster::user_range(&c.status(leader_now).await.unwrap())
            .map(|r| (r.writes_proposed, r.entries_proposed))
            .unwrap();
        let (writes, entries) = if leader_now == leader {
            (after.0 - before.0, after.1 - before.1)
        } else {
            after
        };
        eprintln!(
            "leader {leader_now}: {writes} writes in {entries} entries ({:.1} per entry), {races} lost CAS races",
            writes as f64 / entries.max(1) as f64
        );
        assert!(
            writes >= (DISTINCT_KEYS + HOT_WRITES) as u64 || leader_now != leader,
            "the leader counted {writes} writes"
        );
        assert!(
            entries < writes,
            "no two writes shared an entry: {writes} writes, {entries} entries"
        );
    })
    .await
    .expect("test timed out");
}
