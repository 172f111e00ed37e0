//! Disk corruption: bytes flipped in a stopped node's files must never come
//! back as data. After a restart the node either refuses (an error for the
//! damaged range, or it exits with a clear message) or serves correct data,
//! and the cluster keeps serving from the healthy replicas.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use lmskv_client::ReadConsistency;
use lmskv_proto::v1::{Consistency, GetRequest, ReadOptions};
use lmskv_tests::{phase, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_with_ext(&p, ext));
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn flip_byte(path: &Path, at_fraction: f64) {
    let mut bytes = std::fs::read(path).unwrap();
    if bytes.is_empty() {
        return;
    }
    let i = ((bytes.len() as f64) * at_fraction) as usize % bytes.len();
    bytes[i] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn value_of(i: u32) -> Bytes {
    Bytes::from(format!("value-{i:05}-{}", "z".repeat(64)))
}

async fn check_node_never_serves_corrupt_data(
    c: &mut TestCluster,
    node: u64,
    keys: u32,
) -> (u32, u32) {
    let (mut correct, mut refused) = (0, 0);
    for i in 0..keys {
        if c.exited(node).unwrap().is_some() {
            break;
        }
        let r = c
            .kv(node)
            .get(GetRequest {
                header: None,
                key: Bytes::from(format!("c/{i:05}")),
                read: Some(ReadOptions {
                    consistency: Consistency::ConsistentPrefix as i32,
                    ..Default::default()
                }),
            })
            .await;
        match r {
            Ok(resp) => {
                if let Some(kv) = resp.into_inner().kv {
                    assert_eq!(
                        kv.value,
                        value_of(i),
                        "node {node} returned a wrong value for key {i}"
                    );
                    correct += 1;
                }
                // A missing key is an older prefix, not corruption: the node may be catching up.
            }
            Err(_) => refused += 1,
        }
    }
    (correct, refused)
}

async fn run(target_ext: &str, hard_kill: bool) {
    phase!("start 3 nodes and write 2000 keys");
    let mut c = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let client = c.client();
    let mut last = 0;
    for i in 0..2000u32 {
        last = client
            .put(format!("c/{i:05}"), value_of(i))
            .await
            .unwrap()
            .index;
    }
    c.wait_applied(victim, last, Duration::from_secs(20))
        .await
        .unwrap();

    phase!("stop node {victim} (kill -9: {hard_kill}) and flip bytes in its *.{target_ext} files");
    if hard_kill {
        c.kill(victim).unwrap();
    } else {
        assert_eq!(c.stop(victim).unwrap(), Some(0));
    }
    let db = c.nodes[(victim - 1) as usize].data_dir.join("db");
    let files = files_with_ext(&db, target_ext);
    assert!(
        !files.is_empty(),
        "node {victim} has {target_ext} files in {}",
        db.display()
    );
    for f in &files {
        flip_byte(f, 0.37);
        flip_byte(f, 0.71);
    }

    phase!("restart node {victim}");
    c.spawn(victim).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let started = loop {
        if c.exited(victim).unwrap().is_some() {
            break false;
        }
        if c.status(victim).await.is_ok() {
            break true;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node neither answered nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if started {
        let (correct, refused) = check_node_never_serves_corrupt_data(&mut c, victim, 2000).await;
        phase!("node {victim} served {correct} correct values and refused {refused} reads; none was wrong");
    } else {
        let log = std::fs::read_to_string(&c.nodes[(victim - 1) as usize].log_path).unwrap();
        assert!(
            log.contains("corrupt") || log.contains("Corruption") || log.contains("checksum"),
            "a node that refuses to start says why; log tail:\n{}",
            &log[log.len().saturating_sub(2000)..]
        );
        let last = log.lines().last().unwrap_or_default().to_string();
        phase!("node {victim} refused to start with a clear error: {last}");
    }

    phase!("the cluster still serves every key from the healthy replicas");
    for i in (0..2000u32).step_by(97) {
        let got = client
            .get(format!("c/{i:05}"), ReadConsistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.value, value_of(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bytes_in_data_files_are_never_served() {
    tokio::time::timeout(TEST_TIMEOUT, run("sst", false))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bytes_in_the_write_ahead_log_are_never_served() {
    tokio::time::timeout(TEST_TIMEOUT, run("log", true))
        .await
        .expect("test timed out");
}
