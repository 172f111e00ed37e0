//! Disk faults between a kill and a restart: bytes flipped in a node's SST
//! files or its write-ahead log, or the log's tail cut off. The node must
//! refuse the damaged store (never serve from it), start over empty and be
//! rebuilt from its peers: every range gets back to 3 healthy replicas that
//! all hold every acknowledged write, and nothing acknowledged is lost.
//!
//! And corrupt data found while a node runs (a read that fails its
//! checksum, injected by the `kv-get-read` fail point): the replica that
//! found it refuses to serve and stops taking part in its range, even as
//! its leader; the range goes on on its other replicas, and the placement
//! driver replaces the faulted one. A new replica that faults while it is
//! still a learner catching up (a snapshot install failing, injected by
//! the `snapshot-install` fail point) is replaced by a fresh one too.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{Client, ReadConsistency};
use lmskv_proto::v1::{Consistency, GetRequest, ReadOptions, ReplicaRole, StatusResponse};
use lmskv_tests::{phase, wait_for, ClusterOptions, TestCluster};

const TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// From the damaged node's restart until every range has 3 healthy replicas
/// holding every acknowledged write again. The placement driver waits 10 s
/// before it calls a voter's replica lost, then removes it and adds it back.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);
/// Concurrent writers of the write load.
const WRITERS: usize = 4;
/// How far back from its end the write-ahead log is cut: far enough that
/// the cut writes were synced (and acknowledged) before the kill.
const WAL_CUT_BYTES_MIN: u64 = 32 << 10;
/// RocksDB's WAL block size and record header size (crc, length, type).
const WAL_BLOCK_BYTES: usize = 32 << 10;
const WAL_HEADER_BYTES: usize = 7;

/// Every write a client saw acknowledged: key → value.
type Acked = Arc<Mutex<BTreeMap<Bytes, Bytes>>>;

fn key_of(writer: usize, i: u32) -> Bytes {
    Bytes::from(format!("c/{writer}/{i:06}"))
}

fn value_of(writer: usize, i: u32) -> Bytes {
    Bytes::from(format!("value-{writer}-{i:06}-{}", "z".repeat(64)))
}

/// Starts `WRITERS` writers, each putting its own keys until `stop` is set
/// or it has written `per_writer`; every acknowledged put goes to `acked`.
fn start_writers(
    client: &Client,
    per_writer: u32,
    stop: &Arc<AtomicBool>,
    acked: &Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    start_writers_from(0, client, per_writer, stop, acked)
}

/// [`start_writers`] for writers numbered from `first` (keys of their own).
fn start_writers_from(
    first: usize,
    client: &Client,
    per_writer: u32,
    stop: &Arc<AtomicBool>,
    acked: &Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (first..first + WRITERS)
        .map(|w| {
            let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0..per_writer {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match client.put(key_of(w, i), value_of(w, i)).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key_of(w, i), value_of(w, i));
                        }
                        Err(e) => phase!("put {:?} failed: {e}", key_of(w, i)),
                    }
                }
            })
        })
        .collect()
}

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

/// Offsets in a RocksDB WAL file where a whole logical record ends (a cut
/// there leaves a log that replays cleanly: only a check outside the WAL
/// can tell that writes are missing).
fn wal_record_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let left_in_block = WAL_BLOCK_BYTES - at % WAL_BLOCK_BYTES;
        if left_in_block < WAL_HEADER_BYTES {
            at += left_in_block;
            continue;
        }
        if at + WAL_HEADER_BYTES > bytes.len() {
            break;
        }
        let len = u16::from_le_bytes([bytes[at + 4], bytes[at + 5]]) as usize;
        let kind = bytes[at + 6];
        if kind == 0 && len == 0 {
            break;
        }
        at += WAL_HEADER_BYTES + len;
        // Full (1) or last fragment (4) of a logical record.
        if (kind == 1 || kind == 4) && at <= bytes.len() {
            ends.push(at);
        }
    }
    ends
}

/// Cuts the newest WAL file of the store in `db` back to the end of a
/// record at least `WAL_CUT_BYTES_MIN` before its end; returns (file, old
/// length, new length).
fn cut_wal_tail(db: &Path) -> (PathBuf, u64, u64) {
    let wal = files_with_ext(db, "log")
        .into_iter()
        .filter(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.chars().all(|c| c.is_ascii_digit()))
        })
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("the store has a WAL file");
    let bytes = std::fs::read(&wal).unwrap();
    let len = bytes.len() as u64;
    let at = wal_record_ends(&bytes)
        .into_iter()
        .filter(|e| (*e as u64) + WAL_CUT_BYTES_MIN <= len)
        .max()
        .unwrap_or_else(|| {
            panic!(
                "{} ({len} bytes) has no record end to cut at",
                wal.display()
            )
        });
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(at as u64)
        .unwrap();
    (wal, len, at as u64)
}

async fn statuses(c: &TestCluster, ids: &[u64]) -> Result<HashMap<u64, StatusResponse>, String> {
    let mut out = HashMap::new();
    for id in ids {
        let s = c.status(*id).await.map_err(|e| format!("node {id}: {e}"))?;
        out.insert(*id, s);
    }
    Ok(out)
}

/// The node ids of a range's voters.
fn voter_ids(d: &lmskv_proto::v1::RangeDescriptor) -> Vec<u64> {
    d.replicas
        .iter()
        .filter(|x| x.role == ReplicaRole::Voter as i32)
        .map(|x| x.node_id)
        .collect()
}

/// Every range has a leader and 3 voters (no learner), and each voter
/// hosts the range and has applied what the leader committed. Returns the
/// number of ranges.
async fn ranges_healthy(c: &TestCluster, ids: &[u64]) -> Result<usize, String> {
    let st = statuses(c, ids).await?;
    let total = st
        .values()
        .filter_map(|s| s.cluster.as_ref())
        .map(|s| s.ranges)
        .max()
        .ok_or("no node reads the meta range")? as usize;
    let mut leaders = BTreeMap::new();
    for (id, s) in &st {
        for r in &s.ranges {
            if r.local_role == "leader" {
                if let Some(d) = &r.descriptor {
                    leaders.insert(d.range_id, (*id, r.clone()));
                }
            }
        }
    }
    if leaders.len() < total {
        return Err(format!("{} of {total} ranges have a leader", leaders.len()));
    }
    for (range_id, (leader, r)) in &leaders {
        let d = r.descriptor.as_ref().unwrap();
        let voters = voter_ids(d);
        if voters.len() != 3 || d.replicas.len() != 3 {
            return Err(format!(
                "range {range_id} (leader {leader}) has replicas {:?}",
                d.replicas
            ));
        }
        for v in voters {
            let Some(mine) = st.get(&v).and_then(|s| {
                s.ranges.iter().find(|x| {
                    x.descriptor
                        .as_ref()
                        .is_some_and(|d| d.range_id == *range_id)
                })
            }) else {
                return Err(format!("voter {v} of range {range_id} hosts no replica"));
            };
            if !mine.fault.is_empty() {
                return Err(format!(
                    "node {v}'s replica of range {range_id} is faulted: {}",
                    mine.fault
                ));
            }
            if mine.applied_index < r.commit_index {
                return Err(format!(
                    "node {v} applied {} of range {range_id}, the leader committed {}",
                    mine.applied_index, r.commit_index
                ));
            }
        }
    }
    Ok(total)
}

async fn get_local(c: &TestCluster, node: u64, key: &Bytes) -> Result<Option<Bytes>, String> {
    c.kv(node)
        .get(GetRequest {
            header: None,
            key: key.clone(),
            read: Some(ReadOptions {
                consistency: Consistency::ConsistentPrefix as i32,
                ..Default::default()
            }),
        })
        .await
        .map(|r| r.into_inner().kv.map(|kv| kv.value))
        .map_err(|s| s.message().to_string())
}

/// Reads every acknowledged key from every node's own replica.
async fn read_back_everywhere(c: &TestCluster, acked: &BTreeMap<Bytes, Bytes>) {
    for node in 1..=3u64 {
        for (k, v) in acked {
            let got = get_local(c, node, k)
                .await
                .unwrap_or_else(|e| panic!("node {node} refused {k:?}: {e}"));
            assert_eq!(
                got.as_ref(),
                Some(v),
                "node {node} lost or changed the acknowledged key {k:?}"
            );
        }
    }
}

/// Waits until every range is healthy again while reading sampled keys
/// from `victim`: it may refuse or answer an older prefix (a missing key),
/// never a wrong value. Returns how long it took.
async fn wait_rebuilt(c: &TestCluster, victim: u64, acked: &BTreeMap<Bytes, Bytes>) -> Duration {
    let started = Instant::now();
    let keys: Vec<(&Bytes, &Bytes)> = acked.iter().step_by(37).collect();
    let (served, refused, older) = (Cell::new(0), Cell::new(0), Cell::new(0));
    let (served, refused, older) = (&served, &refused, &older);
    let mut n = 0usize;
    let ranges = wait_for(
        "every range back to 3 healthy replicas",
        RECOVERY_BOUND,
        || {
            n += 1;
            let (k, v) = keys[n % keys.len()];
            let (k, v) = (k.clone(), v.clone());
            async move {
                match get_local(c, victim, &k).await {
                    Ok(Some(got)) => {
                        assert_eq!(got, v, "node {victim} served a wrong value for {k:?}");
                        served.set(served.get() + 1);
                    }
                    Ok(None) => older.set(older.get() + 1),
                    Err(_) => refused.set(refused.get() + 1),
                }
                ranges_healthy(c, &[1, 2, 3]).await.ok()
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
    let took = started.elapsed();
    phase!(
        "{ranges} ranges have 3 healthy replicas again after {:.1} s; meanwhile node {victim} served {} sampled reads correctly, answered {} with an older prefix and refused {}",
        took.as_secs_f64(),
        served.get(),
        older.get(),
        refused.get()
    );
    took
}

/// Checks that `victim` moved its damaged store aside and says so.
async fn assert_recovered_from_peers(c: &TestCluster, victim: u64) {
    let n = &c.nodes[(victim - 1) as usize];
    let q: Vec<PathBuf> = std::fs::read_dir(n.data_dir.join("quarantine"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(
        q.len(),
        1,
        "one quarantined store in {}",
        n.data_dir.display()
    );
    let log = std::fs::read_to_string(&n.log_path).unwrap();
    assert!(log.contains("STORE LOST"), "node {victim} logs the loss");
    let st = c.status(victim).await.unwrap();
    assert!(
        st.store_recovery.contains("quarantine"),
        "node {victim} reports the recovery in its status: {:?}",
        st.store_recovery
    );
    phase!("node {victim} status: {}", st.store_recovery);
}

/// Waits until `victim`'s log says its store is damaged.
async fn wait_damage_found(c: &TestCluster, victim: u64) {
    let log_path = c.nodes[(victim - 1) as usize].log_path.clone();
    wait_for("the damage to be found", Duration::from_secs(30), || {
        let p = log_path.clone();
        async move {
            let log = std::fs::read_to_string(p).ok()?;
            log.lines()
                .find(|l| l.contains("the store is damaged"))
                .map(str::to_string)
        }
    })
    .await
    .map(|line| phase!("node {victim}: {line}"))
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
}

/// Flipped bytes in a stopped node's files (`ext`: sst or log).
async fn flipped_bytes(ext: &str, hard_kill: bool) {
    phase!("start 3 nodes (3 ranges) and write 2000 keys");
    let mut c = TestCluster::start(ClusterOptions {
        config: "pre_split_keys = [\"c/2\"]\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let client = c.client();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    for w in start_writers(&client, 500, &stop, &acked) {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 2000);
    wait_for(
        "every replica to catch up",
        Duration::from_secs(30),
        || async { ranges_healthy(&c, &[1, 2, 3]).await.ok() },
    )
    .await
    .unwrap();

    phase!("stop node {victim} (kill -9: {hard_kill}) and flip bytes in its *.{ext} files");
    if hard_kill {
        c.kill(victim).unwrap();
    } else {
        assert_eq!(c.stop(victim).unwrap(), Some(0));
    }
    let db = c.nodes[(victim - 1) as usize].data_dir.join("db");
    let files = files_with_ext(&db, ext);
    assert!(
        !files.is_empty(),
        "node {victim} has {ext} files in {}",
        db.display()
    );
    for f in &files {
        flip_byte(f, 0.37);
        flip_byte(f, 0.71);
    }

    phase!("restart node {victim}: it finds the damage and rejoins empty");
    c.spawn(victim).unwrap();
    wait_damage_found(&c, victim).await;
    wait_rebuilt(&c, victim, &acked).await;
    assert_recovered_from_peers(&c, victim).await;

    phase!("every node's replica holds every acknowledged key");
    read_back_everywhere(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bytes_in_data_files_are_refused_and_rebuilt_from_peers() {
    tokio::time::timeout(TEST_TIMEOUT, flipped_bytes("sst", false))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bytes_in_the_write_ahead_log_are_refused_and_rebuilt_from_peers() {
    tokio::time::timeout(TEST_TIMEOUT, flipped_bytes("log", true))
        .await
        .expect("test timed out");
}

/// The tail of the log cut off after a kill -9 under write load, at a
/// record boundary (the log replays cleanly: only the synced-sequence mark
/// shows the loss). The writes are committed by the victim and the leader
/// alone (the third node is paused), and both are killed: had the victim
/// come back with the short log, it and the third node could elect a leader
/// without the cut writes, and the restarted old leader would drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_write_ahead_log_tail_is_refused_and_nothing_acknowledged_is_lost() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 3 nodes; pause one so the leader and one follower commit every write");
        let mut c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
        let victim = (1..=3).find(|id| *id != leader).unwrap();
        let paused = (1..=3).find(|id| *id != leader && *id != victim).unwrap();
        c.pause(paused).unwrap();

        phase!("write under load through leader {leader} and follower {victim}");
        let client = c.client();
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&client, u32::MAX, &stop, &acked);
        let a = acked.clone();
        wait_for("1500 acknowledged writes", Duration::from_secs(60), || {
            let a = a.clone();
            async move { (a.lock().unwrap().len() >= 1500).then_some(()) }
        })
        .await
        .unwrap();

        phase!("kill -9 nodes {leader} and {victim} under load; cut node {victim}'s log tail");
        c.kill(leader).unwrap();
        c.kill(victim).unwrap();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.abort();
        }
        let acked = acked.lock().unwrap().clone();
        let (wal, from, to) = cut_wal_tail(&c.nodes[(victim - 1) as usize].data_dir.join("db"));
        phase!(
            "{} writes acknowledged; {} cut from {} bytes to {to} at a record end",
            acked.len(),
            wal.display(),
            from
        );

        phase!(
            "resume node {paused}, restart node {victim}: it must not take part with its short log"
        );
        c.resume(paused).unwrap();
        c.spawn(victim).unwrap();
        wait_damage_found(&c, victim).await;
        // Its store stays in place while the cluster cannot rebuild it (the
        // only other live node is one vote short of a quorum).
        let q = c.nodes[(victim - 1) as usize].data_dir.join("quarantine");
        assert!(
            !q.exists(),
            "node {victim} kept its store while its peers could not rebuild it"
        );
        assert!(
            c.status(victim).await.is_err(),
            "node {victim} serves nothing meanwhile"
        );

        phase!("restart node {leader}");
        c.spawn(leader).unwrap();
        wait_rebuilt(&c, victim, &acked).await;
        assert_recovered_from_peers(&c, victim).await;

        phase!("every node's replica holds every acknowledged key");
        read_back_everywhere(&c, &acked).await;
    })
    .await
    .expect("test timed out");
}

/// A started cluster after its first writes: every writer's keys acked.
struct Loaded {
    c: TestCluster,
    client: Client,
    acked: Acked,
    stop: Arc<AtomicBool>,
    /// The first key written, and the leader and id of its range.
    probe: Bytes,
    leader: u64,
    range_id: u64,
}

/// Starts a cluster with `opts` and has `WRITERS` writers put
/// `per_writer` keys each, all acknowledged.
async fn start_loaded(opts: ClusterOptions, per_writer: u32) -> Loaded {
    let c = TestCluster::start(opts).await.unwrap();
    let client = c.client();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    for w in start_writers(&client, per_writer, &stop, &acked) {
        w.await.unwrap();
    }
    assert_eq!(acked.lock().unwrap().len(), WRITERS * per_writer as usize);
    let probe = key_of(0, 0);
    let leader = c
        .wait_range_leader(&probe, Duration::from_secs(10))
        .await
        .unwrap();
    let range_id = c
        .status(leader)
        .await
        .unwrap()
        .ranges
        .iter()
        .filter_map(|r| r.descriptor.as_ref())
        .find(|d| lmskv_proto::range::contains(d, &probe))
        .map(|d| d.range_id)
        .expect("the leader hosts the probe's range");
    Loaded {
        c,
        client,
        acked,
        stop,
        probe,
        leader,
        range_id,
    }
}

/// The data range's replica on node `id`, from its status.
async fn local_range(
    c: &TestCluster,
    id: u64,
    range_id: u64,
) -> Option<lmskv_proto::v1::RangeStatus> {
    let s = c.status(id).await.ok()?;
    s.ranges.into_iter().find(|r| {
        r.descriptor
            .as_ref()
            .is_some_and(|d| d.range_id == range_id)
    })
}

/// A leader whose read finds its data corrupt (the `kv-get-read` fail point
/// returning a corruption error once) while clients write: the read is
/// answered by the range's next leader, the faulted replica stops (its
/// node reports the fault), writes go on, and the placement driver removes
/// the faulted replica and adds a fresh one on the same node, which then
/// holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_reads_corrupt_data_stops_and_its_replica_is_replaced() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        phase!("start 3 nodes and write 400 keys");
        let Loaded {
            mut c,
            client,
            acked,
            stop,
            probe,
            leader,
            range_id,
        } = start_loaded(ClusterOptions::default(), 100).await;
        let meta_leader = Some(c.wait_meta_leader(Duration::from_secs(10)).await.unwrap());

        // The victim restarts with the fail point armed for one read, then
        // leads the range (nothing reads a key with Get before). A node that
        // leads neither range, so that leading one leaves the leaders spread
        // and the placement has no reason to move it.
        let victim = (1..=3)
            .find(|id| *id != leader && Some(*id) != meta_leader)
            .unwrap();
        phase!("restart node {victim} with a read that will find corrupt data; make it lead range {range_id}");
        assert_eq!(c.stop(victim).unwrap(), Some(0));
        c.spawn_with_env(victim, &[("FAILPOINTS", "kv-get-read=1*return(corrupt block)")])
            .unwrap();
        wait_for(
            "every replica to catch up",
            Duration::from_secs(30),
            || async { ranges_healthy(&c, &[1, 2, 3]).await.ok() },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
        wait_for(
            "the victim to lead the range",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let c = &c;
                async move {
                    let _ = client.transfer_leader(range_id, victim).await;
                    let r = local_range(c, victim, range_id).await?;
                    (r.local_role == "leader").then_some(())
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));

        phase!("write on; a STRONG read of {probe:?} reaches leader {victim}, which finds its data corrupt");
        let more: Acked = Arc::default();
        let writers = start_writers_from(WRITERS, &client, u32::MAX, &stop, &more);
        let read = client
            .get_detailed(probe.clone(), lmskv_client::ReadConsistency::Strong)
            .await
            .unwrap_or_else(|e| {
                panic!("the read failed instead of going to another replica: {e}\n{}", c.log_tails(30))
            });
        assert_eq!(
            read.kv.map(|kv| kv.value),
            Some(value_of(0, 0)),
            "the read returns the acknowledged value"
        );
        let served = read.served_by.expect("a node served the read, not the cache");
        assert_ne!(served.node_id, victim, "another replica answered");
        let log_path = c.nodes[(victim - 1) as usize].log_path.clone();
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            log.contains("range refuses to serve"),
            "node {victim} logs the fault"
        );
        phase!("node {node} served it; node {victim} refuses range {range_id}", node = served.node_id);

        phase!("the placement driver removes node {victim}'s faulted replica while clients write");
        let at_fault = more.lock().unwrap().len();
        let removed = format!("range_id={range_id}");
        wait_for("the faulted replica to be removed", Duration::from_secs(60), || {
            let (p, removed) = (log_path.clone(), removed.clone());
            async move {
                let log = std::fs::read_to_string(p).ok()?;
                log.lines()
                    .any(|l| l.contains("removed range replica") && l.contains(&removed))
                    .then_some(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        let written = more.lock().unwrap().len();
        assert!(
            written > at_fault,
            "writes went on without the faulted replica ({at_fault} when it faulted, {written} when it was removed)"
        );
        phase!("{written} more writes acknowledged, {} after the fault", written - at_fault);

        phase!("a fresh replica on node {victim} is brought up to date");
        let mut all = acked.lock().unwrap().clone();
        all.extend(more.lock().unwrap().clone());
        let took = wait_rebuilt(&c, victim, &all).await;
        let fresh = local_range(&c, victim, range_id)
            .await
            .unwrap_or_else(|| panic!("node {victim} hosts range {range_id} again"));
        assert!(fresh.fault.is_empty(), "the new replica is healthy: {}", fresh.fault);
        phase!("rebuilt in {:.1} s", took.as_secs_f64());
        let refused: usize = (1..=3u64)
            .filter(|id| *id != victim)
            .map(|id| {
                std::fs::read_to_string(&c.nodes[(id - 1) as usize].log_path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("DataLoss"))
                    .count()
            })
            .sum();
        phase!("the other nodes logged {refused} calls the faulted replica refused");

        phase!("every node's replica holds every acknowledged key");
        read_back_everywhere(&c, &all).await;
    })
    .await
    .expect("test timed out");
}

/// Frequent snapshots and short logs (a new replica catches up by
/// snapshot), and no rebalancing (only the operator's move adds a replica).
const LEARNER_TEST_CONFIG: &str =
    "snapshot_logs_since_last = 100\nsnapshot_logs_to_keep = 20\nbalance_tolerance = 10.0\n";

/// A 3-node cluster loaded like [`start_loaded`] (frequent snapshots,
/// balancing off) with `WRITERS` x 200 keys, and a registered node 4 whose
/// fail points are `failpoints`; returns it and node 4's id.
async fn loaded_with_faulty_fourth(failpoints: &str) -> (Loaded, u64) {
    let mut loaded = start_loaded(
        ClusterOptions {
            config: LEARNER_TEST_CONFIG.into(),
            ..Default::default()
        },
        200,
    )
    .await;
    let four = loaded
        .c
        .add_node_with_env(&[("FAILPOINTS", failpoints)])
        .unwrap();
    wait_for("node 4 to register", Duration::from_secs(30), || async {
        let nodes = loaded.client.node_list().await.ok()?;
        nodes.iter().any(|n| n.node_id == four).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", loaded.c.log_tails(30)));
    (loaded, four)
}

/// A learner that faults while it catches up: node 4 joins a 3-node
/// cluster with its first snapshot install failing (the `snapshot-install`
/// fail point returning an I/O error once), and the operator moves the
/// data range's replica from another node to it. The new replica faults
/// while it is still a learner; the leader sees it refuse as faulted and
/// the change gives up on it instead of waiting for it to catch up, and
/// the placement driver's retry puts a fresh replica there. In the end
/// the range has 3 healthy voters with node 4 among them, and node 4
/// holds every acknowledged write, including those made meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_that_faults_while_catching_up_is_replaced() {
    tokio::time::timeout(Duration::from_secs(200), async {
        phase!("start 3 nodes with frequent snapshots and write 800 keys, and node 4 with its first snapshot install failing");
        let (
            Loaded {
                c,
                client,
                acked,
                stop,
                leader,
                range_id,
                ..
            },
            four,
        ) = loaded_with_faulty_fourth("snapshot-install=1*return(injected)").await;
        let from = (1..=3).find(|id| *id != leader).unwrap();

        phase!("move range {range_id}'s replica from node {from} to node {four} while clients write");
        let more: Acked = Arc::default();
        let writers = start_writers_from(WRITERS, &client, u32::MAX, &stop, &more);
        let moved_at = Instant::now();
        let answer = client.move_replica(range_id, from, four).await;
        phase!("the move answered {answer:?}");
        let log_path = c.nodes[(four - 1) as usize].log_path.clone();
        let four_log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            four_log.contains("fail point snapshot-install") && four_log.contains("range refuses to serve"),
            "node {four}'s first replica faulted installing its snapshot\n{}",
            c.log_tails(30)
        );
        let noted = (1..=3u64).any(|id| {
            std::fs::read_to_string(&c.nodes[(id - 1) as usize].log_path)
                .unwrap_or_default()
                .contains("new replica faulted while catching up")
        });
        assert!(
            noted,
            "the change gave up on the faulted learner (not a catch-up timeout)\n{}",
            c.log_tails(30)
        );

        let all = [1, 2, 3, four];
        wait_for(
            &format!("range {range_id} to have 3 healthy voters, node {four} among them and not node {from}"),
            RECOVERY_BOUND,
            || async {
                ranges_healthy(&c, &all).await.ok()?;
                let r = local_range(&c, four, range_id).await?;
                let voters = voter_ids(r.descriptor.as_ref()?);
                (r.fault.is_empty() && voters.contains(&four) && !voters.contains(&from))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
        phase!(
            "node {four} holds a healthy voter of range {range_id} {:.1} s after the move began",
            moved_at.elapsed().as_secs_f64()
        );
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }

        let mut all_acked = acked.lock().unwrap().clone();
        all_acked.extend(more.lock().unwrap().clone());
        let d = local_range(&c, four, range_id)
            .await
            .and_then(|r| r.descriptor)
            .expect("node 4 hosts the range");
        let mut checked = 0;
        for (k, v) in &all_acked {
            if !lmskv_proto::range::contains(&d, k) {
                continue;
            }
            let got = wait_for("node 4 to apply the key", Duration::from_secs(10), || async {
                get_local(&c, four, k).await.ok().flatten()
            })
            .await
            .unwrap_or_else(|e| panic!("node {four} lacks the acknowledged key {k:?}: {e}"));
            assert_eq!(&got, v, "node {four} holds the acknowledged value of {k:?}");
            checked += 1;
        }
        assert!(checked >= 800, "the range holds the first 800 keys ({checked} checked)");
        phase!("node {four} holds all {checked} acknowledged keys");
    })
    .await
    .expect("test timed out");
}

/// A learner left behind by a change that was given up: node 4 joins with
/// every snapshot install failing, so the replica the operator moves there
/// faults while still a learner, and the move fails with node 4 a learner
/// of the range. The operator then decommissions node 4. The placement
/// driver drops the pending change (it would add a draining node), removes
/// the leftover learner once no change of the range is under way (before,
/// it stayed a member, replicated to for good, and node 4's decommission
/// never finished), and node 4 ends decommissioned with the range on its 3
/// first nodes holding every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_left_by_a_failed_move_is_removed_and_its_node_decommissions() {
    tokio::time::timeout(Duration::from_secs(200), async {
        phase!("start 3 nodes with frequent snapshots and write 800 keys, and node 4 with every snapshot install failing");
        let (
            Loaded {
                c,
                client,
                acked,
                leader,
                range_id,
                ..
            },
            four,
        ) = loaded_with_faulty_fourth("snapshot-install=return(injected)").await;
        let from = (1..=3).find(|id| *id != leader).unwrap();

        phase!("move range {range_id}'s replica from node {from} to node {four}: it fails");
        let answer = client.move_replica(range_id, from, four).await;
        assert!(
            answer.is_err(),
            "a move to a node whose replica always faults fails: {answer:?}"
        );
        let learner_of = |d: &lmskv_proto::v1::RangeDescriptor| {
            d.replicas
                .iter()
                .any(|x| x.node_id == four && x.role == ReplicaRole::Learner as i32)
        };
        let mut left = false;
        for id in 1..=3 {
            if let Some(d) = local_range(&c, id, range_id)
                .await
                .and_then(|r| r.descriptor)
            {
                left |= learner_of(&d);
            }
        }
        assert!(
            left,
            "node {four} is left a learner of range {range_id}\n{}",
            c.log_tails(30)
        );

        phase!("decommission node {four}");
        let info = client.decommission(four).await.unwrap();
        assert_eq!(info.state, "decommissioning");
        let started = Instant::now();
        wait_for(
            &format!("node {four} to be decommissioned and range {range_id} to have no learner"),
            RECOVERY_BOUND,
            || async {
                ranges_healthy(&c, &[1, 2, 3]).await.ok()?;
                let nodes = client.node_list().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node_id == four && n.state == "decommissioned")
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tails(30)));
        phase!(
            "node {four} decommissioned {:.1} s after the request",
            started.elapsed().as_secs_f64()
        );
        let removed = (1..=3u64).any(|id| {
            std::fs::read_to_string(&c.nodes[(id - 1) as usize].log_path)
                .unwrap_or_default()
                .contains("removing learners outside the voter set")
        });
        assert!(removed, "a range leader removed the leftover learner");
        for id in 1..=3 {
            let d = local_range(&c, id, range_id)
                .await
                .and_then(|r| r.descriptor)
                .expect("the range is on its 3 first nodes");
            assert_eq!(voter_ids(&d).len(), 3);
            assert!(
                !learner_of(&d),
                "node {id} still lists node {four} as a learner"
            );
        }

        let all_acked = acked.lock().unwrap().clone();
        let mut checked = 0;
        for (k, v) in &all_acked {
            let got = client
                .get(k.clone(), ReadConsistency::Strong)
                .await
                .unwrap()
                .map(|kv| kv.value);
            assert_eq!(got.as_ref(), Some(v), "the acknowledged value of {k:?}");
            checked += 1;
        }
        assert!(checked >= 800, "{checked} keys checked");
        phase!("all {checked} acknowledged keys read back");
    })
    .await
    .expect("test timed out");
}
