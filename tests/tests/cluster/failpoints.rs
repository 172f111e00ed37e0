//! Crashes at fail points: for each fail point of the node (see
//! `node/src/failpoints.rs`) a node is restarted with `FAILPOINTS` set so
//! that it aborts at that point after some hits while clients write; it is
//! restarted without, and then:
//! - every acknowledged write is on every replica, with the value and version
//!   it was acknowledged with, and nothing appears that was never written;
//! - every replica holds the same keys, values and versions and the same
//!   range spans (read locally on each node, CONSISTENT_PREFIX);
//! - so the restarted node serves exactly what the others serve.
//!
//! Needs node binaries built with `--features lmskv-node/failpoints` (as
//! `make test` builds them); a node without the feature refuses `FAILPOINTS`
//! and the test fails saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::Client;
use lmskv_proto::range::META_RANGE_ID;
use lmskv_proto::v1::{Consistency, RangeStatus, ReadOptions, RequestHeader, ScanRequest};
use lmskv_tests::{phase, ClusterOptions, TestCluster};
use tokio::sync::watch;

const TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// Frequent snapshots and short logs, so snapshot builds happen within
/// seconds of writing and a node down for a while is brought back by one.
const CONFIG: &str = "snapshot_logs_since_last = 100\nsnapshot_logs_to_keep = 20\n";
const PREFIX: &[u8] = b"fp/";
const PREFIX_END: &[u8] = b"fp0";
const WRITERS: u64 = 4;
/// The key the split scenario splits at: between writers 1 and 2.
const SPLIT_KEY: &str = "fp/w2";

/// What makes the fail point's code run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trigger {
    /// Writes (log appends and applies; snapshot builds after enough of them).
    Writes,
    /// The node is down while the leader's log moves past it, so it comes
    /// back by a snapshot.
    Snapshot,
    /// A split of the workload's range.
    Split,
}

/// What the writers saw.
#[derive(Default)]
struct History {
    /// Unique keys acknowledged: key -> (value, version).
    acked: Mutex<BTreeMap<Bytes, (Bytes, u64)>>,
    /// Every unique key sent, acknowledged or not.
    sent: Mutex<BTreeSet<Bytes>>,
    /// Per writer's register key: highest sequence number acknowledged and sent.
    reg_acked: Mutex<BTreeMap<u64, u64>>,
    reg_sent: Mutex<BTreeMap<u64, u64>>,
    acks: AtomicU64,
    failures: AtomicU64,
}

fn key(w: u64, n: u64) -> Bytes {
    Bytes::from(format!("fp/w{w}/{n:06}"))
}

fn value(w: u64, n: u64) -> Bytes {
    Bytes::from(format!("w{w}-{n}"))
}

fn reg_key(w: u64) -> Bytes {
    Bytes::from(format!("fp/reg/w{w}"))
}

/// One writer: a new unique key, then its register key, over and over,
/// while `go` is true, until `stop`.
async fn writer(
    client: Client,
    w: u64,
    h: Arc<History>,
    mut go: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if !*go.borrow() {
            let _ = tokio::time::timeout(Duration::from_millis(100), go.changed()).await;
            continue;
        }
        n += 1;
        let (k, v) = (key(w, n), value(w, n));
        h.sent.lock().unwrap().insert(k.clone());
        match client.put(k.clone(), v.clone()).await {
            Ok(r) => {
                h.acked.lock().unwrap().insert(k, (v, r.version));
                h.acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                h.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        h.reg_sent.lock().unwrap().insert(w, n);
        match client.put(reg_key(w), Bytes::from(n.to_string())).await {
            Ok(_) => {
                h.reg_acked.lock().unwrap().insert(w, n);
                h.acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                h.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What one node holds of the workload: the spans of its ranges that
/// overlap the workload's keys, and the keys with values and versions.
#[derive(Debug, PartialEq)]
struct Replica {
    spans: BTreeSet<(u64, Bytes, Bytes)>,
    kvs: BTreeMap<Bytes, (Bytes, u64)>,
}

async fn replica_state(c: &TestCluster, id: u64) -> anyhow::Result<Replica> {
    let s = c.status(id).await?;
    let mut spans = BTreeSet::new();
    let mut kvs = BTreeMap::new();
    for r in &s.ranges {
        let Some(d) = &r.descriptor else { continue };
        let overlaps =
            &d.start_key[..] < PREFIX_END && (d.end_key.is_empty() || &d.end_key[..] > PREFIX);
        if d.range_id == META_RANGE_ID || !overlaps {
            continue;
        }
        spans.insert((d.range_id, d.start_key.clone(), d.end_key.clone()));
        let mut token = Bytes::new();
        loop {
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                c.kv(id).scan(ScanRequest {
                    header: Some(RequestHeader {
                        range_id: d.range_id,
                        epoch: None,
                        ..Default::default()
                    }),
                    start_key: Bytes::from_static(PREFIX),
                    end_key: Bytes::from_static(PREFIX_END),
                    limit: 0,
                    reverse: false,
                    page_token: token,
                    read: Some(ReadOptions {
                        consistency: Consistency::ConsistentPrefix as i32,
                        ..Default::default()
                    }),
                    keys_only: false,
                }),
            )
            .await??
            .into_inner();
            for kv in resp.kvs {
                kvs.insert(kv.key, (kv.value, kv.version));
            }
            if resp.next_page_token.is_empty() {
                break;
            }
            token = resp.next_page_token;
        }
    }
    Ok(Replica { spans, kvs })
}

/// The problems of one replica's state against the writers' history.
fn check_history(id: u64, r: &Replica, h: &History) -> Vec<String> {
    let mut out = Vec::new();
    let acked = h.acked.lock().unwrap();
    let sent = h.sent.lock().unwrap();
    for (k, (v, version)) in acked.iter() {
        match r.kvs.get(k) {
            None => out.push(format!(
                "node {id}: acknowledged key {k:?} (version {version}) is missing"
            )),
            Some((got, got_version)) if got != v || got_version != version => out.push(format!(
                "node {id}: key {k:?} acknowledged as {v:?} version {version}, holds {got:?} version {got_version}"
            )),
            _ => {}
        }
    }
    for w in 0..WRITERS {
        let rk = reg_key(w);
        let got = r
            .kvs
            .get(&rk)
            .and_then(|(v, _)| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
        let lo = h.reg_acked.lock().unwrap().get(&w).copied();
        let hi = h.reg_sent.lock().unwrap().get(&w).copied();
        let ok = match (got, lo, hi) {
            (None, None, _) => true,
            (Some(g), lo, Some(hi)) => g >= lo.unwrap_or(0) && g <= hi,
            _ => false,
        };
        if !ok {
            out.push(format!(
                "node {id}: register {rk:?} holds {got:?}; acknowledged up to {lo:?}, sent up to {hi:?}"
            ));
        }
    }
    for (k, (v, _)) in &r.kvs {
        if k.starts_with(b"fp/reg/") {
            continue;
        }
        let expected = std::str::from_utf8(k).ok().and_then(|s| {
            let (w, n) = s.strip_prefix("fp/w")?.split_once('/')?;
            Some(value(w.parse().ok()?, n.parse().ok()?))
        });
        if !sent.contains(k) || expected.as_ref() != Some(v) {
            out.push(format!("node {id}: key {k:?} = {v:?} was never written"));
        }
    }
    out
}

/// The workload range's leader and the range's id.
async fn workload_leader(c: &TestCluster) -> (u64, u64) {
    let leader = c
        .wait_range_leader(PREFIX, Duration::from_secs(20))
        .await
        .unwrap();
    let s = c.status(leader).await.unwrap();
    let r = s
        .ranges
        .iter()
        .find(|r| {
            r.descriptor.as_ref().is_some_and(|d| {
                d.range_id != META_RANGE_ID && lmskv_proto::range::contains(d, PREFIX)
            })
        })
        .expect("the leader hosts the workload range");
    (leader, r.descriptor.as_ref().unwrap().range_id)
}

/// Node `id`'s status of `range_id`.
async fn range_status(c: &TestCluster, id: u64, range_id: u64) -> Option<RangeStatus> {
    let s = c.status(id).await.ok()?;
    s.ranges.into_iter().find(|r| {
        r.descriptor
            .as_ref()
            .is_some_and(|d| d.range_id == range_id)
    })
}

async fn wait_acks(h: &History, more: u64, what: &str) {
    let target = h.acks.load(Ordering::Relaxed) + more;
    lmskv_tests::wait_for(what, Duration::from_secs(30), move || async move {
        (h.acks.load(Ordering::Relaxed) >= target).then_some(())
    })
    .await
    .unwrap();
}

/// Crashes a node at `point` (after `skip` hits) under `trigger`, restarts
/// it without fail points and checks durability and convergence. With
/// `lead`, the node is made the workload range's leader before it crashes.
async fn crash_at(point: &str, skip: u32, trigger: Trigger, lead: bool) {
    phase!("[{point}] start 3 nodes and {WRITERS} writers");
    let mut c = TestCluster::start(ClusterOptions {
        config: CONFIG.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let h = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (go_tx, go_rx) = watch::channel(true);
    let client = c.client();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                client.clone(),
                w,
                h.clone(),
                go_rx.clone(),
                stop.clone(),
            ))
        })
        .collect();
    wait_acks(&h, 100, "the first writes").await;
    let (leader, range_id) = workload_leader(&c).await;
    let victim = (1..=3u64).rev().find(|id| *id != leader).unwrap();
    let spec = if skip == 0 {
        format!("{point}=panic")
    } else {
        format!("{point}={skip}*off->panic")
    };

    match trigger {
        Trigger::Snapshot => {
            phase!("[{point}] kill node {victim}; write until the leader's log moved past it");
            c.kill(victim).unwrap();
            // The killed node's log ends at or before the leader's last index
            // now; once the leader has purged past it, only a snapshot can
            // bring the node back (a snapshot alone is not enough: openraft
            // postpones the purge while a replication stream reads the log).
            let last = range_status(&c, leader, range_id)
                .await
                .unwrap()
                .last_log_index;
            let cr = &c;
            lmskv_tests::wait_for(
                "the leader to purge its log past the killed node",
                Duration::from_secs(60),
                move || async move {
                    let purged = range_status(cr, leader, range_id).await?.purged_index;
                    (purged > last).then_some(())
                },
            )
            .await
            .unwrap();
            phase!("[{point}] restart node {victim} with FAILPOINTS={spec}");
            c.spawn_with_env(victim, &[("FAILPOINTS", &spec)]).unwrap();
        }
        Trigger::Writes | Trigger::Split => {
            phase!("[{point}] pause writers; restart node {victim} with FAILPOINTS={spec}");
            go_tx.send(false).unwrap();
            c.kill(victim).unwrap();
            c.spawn_with_env(victim, &[("FAILPOINTS", &spec)]).unwrap();
            let target = range_status(&c, leader, range_id)
                .await
                .unwrap()
                .applied_index;
            let cr = &c;
            let caught_up = lmskv_tests::wait_for(
                "the restarted node to catch up",
                Duration::from_secs(30),
                move || async move {
                    let a = range_status(cr, victim, range_id).await?.applied_index;
                    (a >= target).then_some(())
                },
            )
            .await;
            if let Err(e) = caught_up {
                // It may have crashed already (the fail point fired while
                // catching up); that is checked below.
                phase!("[{point}] {e:#}");
            }
            if lead {
                let r = client.transfer_leader(range_id, victim).await;
                phase!("[{point}] leadership of range {range_id} to node {victim}: {r:?}");
            }
            go_tx.send(true).unwrap();
            if trigger == Trigger::Split {
                let r = client.split(SPLIT_KEY).await;
                phase!(
                    "[{point}] split at {SPLIT_KEY}: {:?}",
                    r.map(|(l, r)| (l.range_id, r.range_id))
                );
            }
        }
    }

    phase!("[{point}] wait for node {victim} to crash at the fail point");
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = c.exited(victim).unwrap() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "fail point {point} never fired on node {victim}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = std::fs::read_to_string(&c.nodes[(victim - 1) as usize].log_path).unwrap();
    assert!(
        !log.contains("without the `failpoints` feature"),
        "the node binary has no fail points: build with `cargo build --workspace --bins --features lmskv-node/failpoints` (as `make build` does)"
    );
    assert!(
        log.contains(&format!("failpoint {point} panic")),
        "node {victim} exited (code {code:?}) but not at fail point {point}; log tail:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    phase!(
        "[{point}] node {victim} crashed at the fail point (exit code {code:?}); {} acks, {} failed writes so far",
        h.acks.load(Ordering::Relaxed),
        h.failures.load(Ordering::Relaxed)
    );

    phase!("[{point}] restart node {victim} without fail points; keep writing");
    go_tx.send(true).unwrap();
    c.spawn(victim).unwrap();
    let cr = &c;
    lmskv_tests::wait_for(
        "the restarted node to answer",
        Duration::from_secs(30),
        move || async move { cr.status(victim).await.ok().map(|_| ()) },
    )
    .await
    .unwrap();
    wait_acks(&h, 200, "writes after the restart").await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    if trigger == Trigger::Split {
        // The split committed (a majority applied it) unless its call failed
        // before proposing; make sure it exists for the span check.
        let r = client.split(SPLIT_KEY).await;
        phase!(
            "[{point}] split at {SPLIT_KEY} again: {:?}",
            r.map(|(l, r)| (l.range_id, r.range_id))
                .map_err(|e| e.to_string())
        );
    }

    phase!(
        "[{point}] writers stopped: {} unique keys acknowledged, {} failed writes; check every replica",
        h.acked.lock().unwrap().len(),
        h.failures.load(Ordering::Relaxed)
    );
    let cr = &c;
    let hr: &History = &h;
    let converged = lmskv_tests::wait_for(
        "replicas to converge",
        Duration::from_secs(30),
        move || async move {
            let mut states = Vec::new();
            for id in 1..=3 {
                states.push(replica_state(cr, id).await.ok()?);
            }
            let same = states.windows(2).all(|p| p[0] == p[1]);
            let complete = (1..=3)
                .zip(&states)
                .all(|(id, s)| check_history(id, s, hr).is_empty());
            (same && complete).then_some(states)
        },
    )
    .await;
    let states = match converged {
        Ok(s) => s,
        Err(e) => {
            let mut report = vec![format!("{e:#}")];
            for id in 1..=3u64 {
                match replica_state(&c, id).await {
                    Ok(s) => {
                        report.push(format!(
                            "node {id}: {} keys, spans {:?}",
                            s.kvs.len(),
                            s.spans
                        ));
                        report.extend(check_history(id, &s, &h).into_iter().take(10));
                    }
                    Err(e) => report.push(format!("node {id}: cannot read: {e:#}")),
                }
            }
            panic!("[{point}] {}", report.join("\n"));
        }
    };
    if trigger == Trigger::Split {
        assert!(
            states[0]
                .spans
                .iter()
                .any(|(_, start, _)| &start[..] == SPLIT_KEY.as_bytes()),
            "a range starts at the split key on every node: {:?}",
            states[0].spans
        );
    }
    phase!(
        "[{point}] every replica holds the same {} keys in spans {:?}; all acknowledged writes present",
        states[0].kvs.len(),
        states[0].spans
    );
}

fn run(point: &'static str, skip: u32, trigger: Trigger, lead: bool) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(TEST_TIMEOUT, crash_at(point, skip, trigger, lead))
                .await
                .expect("test timed out")
        });
}

#[test]
fn crash_before_log_sync() {
    run("log-sync-before", 30, Trigger::Writes, true);
}

#[test]
fn crash_after_log_sync() {
    run("log-sync-after", 30, Trigger::Writes, false);
}

#[test]
fn crash_before_apply_commit() {
    run("apply-before-commit", 30, Trigger::Writes, false);
}

#[test]
fn crash_after_apply_commit() {
    run("apply-after-commit", 30, Trigger::Writes, true);
}

#[test]
fn crash_while_building_a_snapshot() {
    run("snapshot-build", 0, Trigger::Writes, false);
}

#[test]
fn crash_after_recording_a_received_snapshot() {
    run("snapshot-install", 0, Trigger::Snapshot, false);
}

#[test]
fn crash_in_the_middle_of_a_snapshot_import() {
    run("snapshot-install-import", 0, Trigger::Snapshot, false);
}

#[test]
fn crash_while_applying_a_split() {
    run("split-apply", 0, Trigger::Split, false);
}
