//! The nemesis loop: every few seconds it picks one of the run's nemeses and
//! applies it, then rests, until the run's duration is up. Nemeses are dealt
//! from a shuffled deck of the run's list, reshuffled when empty, so each
//! one comes up equally often and a short run still sees every one early.
//!
//! - Process and network faults (kill -9 and restart, SIGSTOP and SIGCONT, a
//!   partition) last 1–3 s and are healed before the next step. A partition
//!   takes one of the shapes of [`Partition`], involving the target node:
//!   it alone cut off, a minority holding it cut off, a ring, a one-way cut
//!   between its minority and the rest, or random loss between them (the
//!   loss shape where the network can do it: nft in namespaces). Faults
//!   are sequential, one node (or one minority) at a time, and every shape
//!   leaves a majority that reaches itself, so the "never fault more than
//!   a minority" rule holds for every cluster of three or more. Half of
//!   them aim at the leader of a range that carries workload writes, since
//!   leader faults are what exercise failover; each such fault that cuts
//!   the node off from a majority (a kill, a pause, a skew restart, an
//!   isolation, a minority or one-way cut holding it) opens a failover
//!   probe for every active range the node led (see [`super::failover`]).
//! - Leader transfers move a range's leadership to another voter through
//!   the operator API (`transfer_leader`), mostly for a range with workload
//!   traffic, sometimes any range (the meta range included). They are no
//!   failure: their write pause is measured apart (`transfer_ms`).
//! - Splits cut a workload's data at a key inside it through the operator
//!   API (`split`): a current register key (its history then continues in
//!   the new range), a set element near the adders' position, or the edges
//!   of the bank prefix, never inside it, so the bank's accounts stay in one
//!   range. At most [`SPLITS_MAX`] per run.
//! - Membership steps move a replica of a range (mostly one with workload
//!   traffic; half the time the leader's replica) to a node outside the
//!   range, and the next membership step moves it back (once the old
//!   replica is gone from its node), through the operator API
//!   (`move_replica`: learner, catch-up, joint change, removal, each way).
//!   With as many nodes as replicas no range has a node outside it, and the
//!   step is skipped (`membership_skipped`).
//! - Clock skew restarts a node (half the time an active range's leader)
//!   under libfaketime with its wall clock up to [`SKEW_S_MAX`] seconds off
//!   either way (the monotonic clock untouched), and 1–3 s later restarts
//!   it with the true clock.
//!
//! Operator calls are bounded by [`ADMIN_CALL_TIMEOUT`]; one that is refused
//! or times out is logged and counted (`admin_refused`), not fatal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{Client, ClientError, ServerError};
use lmskv_proto::v1::ReplicaRole;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::bank::{BANK_PREFIX, BANK_PREFIX_END};
use super::{register, set, Nemesis, NemesisCounts, OpStats, Probes, Workload};
use crate::partition::Partition;
use crate::{netns, phase, TestCluster};

/// Shortest and longest time a node stays faulted, in ms: past the 0.5–1 s
/// election timeout, so a faulted leader is replaced.
const FAULT_MS_MIN: u64 = 1_000;
const FAULT_MS_MAX: u64 = 3_000;
/// Shortest and longest rest between a heal and the next step, in ms.
const REST_MS_MIN: u64 = 1_500;
const REST_MS_MAX: u64 = 4_000;
/// How long to look for range leaders before a step.
const LEADER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest an operator call (range list, transfer, split) may take.
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest wall-clock skew, in seconds, either way. Write deduplication
/// expires records by the leaders' wall clocks (`proposed_at_ms`), so a
/// skew beyond the dedup window (600 s) less the client's retry deadline
/// could forget a request id a client still retries; this stays well within.
const SKEW_S_MAX: u64 = 300;
/// Longest a replica move may take (the new replica catches up by snapshot).
pub const MOVE_CALL_TIMEOUT: Duration = Duration::from_secs(70);
/// How long the membership nemesis waits for a moved replica to be deleted
/// from its old node before moving it back.
const REPLICA_GONE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most splits one run makes.
pub const SPLITS_MAX: u64 = 32;

/// What the nemesis needs from the run.
pub struct Target<'a> {
    pub cluster: &'a mut TestCluster,
    pub probes: &'a Probes,
    pub stats: &'a OpStats,
    pub workloads: &'a [Workload],
    /// When the workloads started (register keys change every epoch).
    pub started: Instant,
}

/// Runs the nemesis for `duration`, then returns with every node healed.
pub async fn run(
    t: Target<'_>,
    nemeses: &[Nemesis],
    seed: u64,
    duration: Duration,
) -> NemesisCounts {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = NemesisCounts::default();
    let client = t.cluster.client();
    let loss = match t.cluster.network() {
        "netns" => netns::nft_available(),
        network => network == "proxy",
    };
    if nemeses.contains(&Nemesis::Partition) && !loss {
        phase!("nemesis: partition: the loss shape is left out: nft (Debian package nftables) is not installed");
    }
    let deadline = Instant::now() + duration;
    let mut t = t;
    let mut deck: Vec<Nemesis> = Vec::new();
    // A replica the membership nemesis moved, to move back at its next step.
    let mut moved: Option<Moved> = None;
    // Let the workloads get going before the first step.
    rest(&mut rng, deadline).await;
    while Instant::now() < deadline {
        if deck.is_empty() {
            deck = nemeses.to_vec();
            deck.shuffle(&mut rng);
        }
        let Some(kind) = deck.pop() else { break };
        match kind {
            Nemesis::Kill | Nemesis::Pause | Nemesis::Partition | Nemesis::Skew => {
                fault(&mut t, &mut rng, kind, loss, &mut counts).await
            }
            Nemesis::Transfer => transfer(&t, &client, &mut rng, &mut counts).await,
            Nemesis::Split => split(&t, &client, &mut rng, seed, &mut counts).await,
            Nemesis::Membership => membership(&t, &client, &mut rng, &mut moved, &mut counts).await,
        }
        rest(&mut rng, deadline).await;
    }
    heal_all(t.cluster);
    counts
}

/// Kills, pauses, partitions or clock-skews one node (half the time the
/// leader of an active range) for 1–3 s, then heals it. `loss` says whether
/// a partition may take the loss shape.
async fn fault(
    t: &mut Target<'_>,
    rng: &mut StdRng,
    kind: Nemesis,
    loss: bool,
    counts: &mut NemesisCounts,
) {
    let cluster = &mut *t.cluster;
    let nodes = cluster.nodes.len() as u64;
    // Every random choice is drawn up front, so the schedule depends on the
    // seed, not on what the cluster answered.
    let aim_at_leader = rng.gen_bool(0.5);
    let random_node = rng.gen_range(1..=nodes);
    let pick: usize = rng.gen();
    let fault_for = Duration::from_millis(rng.gen_range(FAULT_MS_MIN..=FAULT_MS_MAX));
    let mut shape_rng = StdRng::seed_from_u64(rng.gen());
    let skew_s = if kind == Nemesis::Skew {
        let s = rng.gen_range(1..=SKEW_S_MAX) as i64;
        if rng.gen_bool(0.5) {
            s
        } else {
            -s
        }
    } else {
        0
    };
    let leaders = leaders(cluster).await;
    let active = t.probes.failover.active_ranges(Instant::now());
    let active_leaders: Vec<u64> = active
        .iter()
        .filter_map(|r| leaders.get(r))
        .copied()
        .collect();
    let target = match (aim_at_leader, active_leaders.is_empty()) {
        (true, false) => active_leaders[pick % active_leaders.len()],
        _ => random_node,
    };
    let led: Vec<u64> = active
        .iter()
        .filter(|r| leaders.get(r) == Some(&target))
        .copied()
        .collect();
    let shape =
        (kind == Nemesis::Partition).then(|| Partition::pick(&mut shape_rng, nodes, target, loss));
    // A partition that leaves the node a way to a majority (a ring, loss)
    // need not move its leaderships: no failover to measure.
    let cut_off = shape.as_ref().is_none_or(|p| p.cuts_off(target));
    phase!(
        "nemesis: {kind} node {target}{} for {fault_for:?}",
        if led.is_empty() {
            String::new()
        } else {
            format!(" (leader of active ranges {led:?})")
        }
    );
    let at = Instant::now();
    let faulted = match kind {
        Nemesis::Kill => cluster.kill(target),
        Nemesis::Pause => cluster.pause(target),
        Nemesis::Skew => {
            phase!("nemesis: skew: restart node {target} with its wall clock {skew_s:+} s off");
            cluster
                .kill(target)
                .and_then(|_| restart_skewed(cluster, target, skew_s))
        }
        _ => {
            let shape = shape.as_ref().expect("a partition has a shape");
            phase!("nemesis: partition: {shape}");
            cluster.disrupt(&shape.faults())
        }
    };
    if let Err(e) = faulted {
        phase!("nemesis: {kind} node {target} failed: {e:#}");
        counts.errors += 1;
    } else {
        if !led.is_empty() && cut_off {
            t.probes.failover.leader_faulted(kind.name(), at, &led);
            counts.leader_faults += 1;
        }
        match kind {
            Nemesis::Kill => counts.kill += 1,
            Nemesis::Pause => counts.pause += 1,
            Nemesis::Skew => counts.skew += 1,
            _ => {
                counts.partition += 1;
                match shape.as_ref().map(Partition::name) {
                    Some("isolate") => counts.partition_isolate += 1,
                    Some("halves") => counts.partition_halves += 1,
                    Some("ring") => counts.partition_ring += 1,
                    Some("asymmetric") => counts.partition_asymmetric += 1,
                    _ => counts.partition_loss += 1,
                }
            }
        }
    }
    tokio::time::sleep(fault_for).await;
    let healed = match kind {
        Nemesis::Kill => cluster.spawn(target),
        Nemesis::Pause => cluster.resume(target),
        // The process keeps the clock it started with: restart it.
        Nemesis::Skew => cluster.kill(target).and_then(|_| cluster.spawn(target)),
        _ => cluster.try_heal_network(),
    };
    if let Err(e) = healed {
        phase!("nemesis: healing node {target} failed: {e:#}");
        counts.errors += 1;
    }
}

/// Starts node `target` with libfaketime shifting its wall clock by
/// `skew_s` seconds; its monotonic clock (timers, leases, staleness bounds)
/// stays true.
fn restart_skewed(cluster: &mut TestCluster, target: u64, skew_s: i64) -> anyhow::Result<()> {
    let lib =
        super::faketime_library().ok_or_else(|| anyhow::anyhow!("libfaketime is not installed"))?;
    let lib = lib.to_string_lossy().into_owned();
    let offset = format!("{skew_s:+}");
    cluster.spawn_with_env(
        target,
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME", offset.as_str()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
}

/// Moves the leadership of a range (mostly an active one) to another of its
/// voters.
async fn transfer(t: &Target<'_>, client: &Client, rng: &mut StdRng, counts: &mut NemesisCounts) {
    let prefer_active = rng.gen_bool(0.8);
    let (pick_range, pick_node): (usize, usize) = (rng.gen(), rng.gen());
    let ranges = match tokio::time::timeout(ADMIN_CALL_TIMEOUT, client.range_list()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return admin_refused(counts, "transfer: range list", &e.to_string()),
        Err(_) => return admin_refused(counts, "transfer: range list", "timed out"),
    };
    let leaders = leaders(t.cluster).await;
    let active = t.probes.transfer.active_ranges(Instant::now());
    let descs: Vec<_> = ranges.iter().filter_map(|r| r.descriptor.clone()).collect();
    let active_descs: Vec<_> = descs
        .iter()
        .filter(|d| active.contains(&d.range_id))
        .cloned()
        .collect();
    let from = if prefer_active && !active_descs.is_empty() {
        &active_descs
    } else {
        &descs
    };
    let Some(d) = (!from.is_empty()).then(|| &from[pick_range % from.len()]) else {
        return admin_refused(counts, "transfer", "the range list is empty");
    };
    let leader = leaders.get(&d.range_id).copied().or_else(|| {
        ranges
            .iter()
            .find(|r| r.descriptor.as_ref().map(|x| x.range_id) == Some(d.range_id))
            .map(|r| r.leader_id)
    });
    let voters: Vec<u64> = d
        .replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32 && Some(r.node_id) != leader)
        .map(|r| r.node_id)
        .collect();
    if voters.is_empty() {
        phase!("nemesis: transfer: range {} has no other voter", d.range_id);
        return;
    }
    let to = voters[pick_node % voters.len()];
    let is_active = active.contains(&d.range_id);
    phase!(
        "nemesis: transfer range {}{} from node {} to node {to}",
        d.range_id,
        if is_active { " (active)" } else { "" },
        leader.map_or("?".into(), |l| l.to_string())
    );
    let at = Instant::now();
    let probe = is_active.then(|| {
        t.probes
            .transfer
            .leader_faulted("transfer", at, &[d.range_id])
    });
    let result =
        tokio::time::timeout(ADMIN_CALL_TIMEOUT, client.transfer_leader(d.range_id, to)).await;
    let refused = match result {
        Ok(Ok(())) => {
            counts.transfer += 1;
            phase!(
                "nemesis: transfer range {} done in {:?}",
                d.range_id,
                at.elapsed()
            );
            None
        }
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("timed out".into()),
    };
    if let Some(why) = refused {
        if let Some(p) = probe {
            t.probes.transfer.cancel(p);
        }
        admin_refused(counts, &format!("transfer range {}", d.range_id), &why);
    }
}

/// A replica the membership nemesis moved and will move back.
#[derive(Debug, Clone, Copy)]
struct Moved {
    range_id: u64,
    from: u64,
    to: u64,
}

/// One membership step: moves back the replica the previous step moved
/// (once its old replica is gone from its node, or after
/// [`REPLICA_GONE_TIMEOUT`]), or else moves a replica of a range (mostly an
/// active one) to a node outside the range.
async fn membership(
    t: &Target<'_>,
    client: &Client,
    rng: &mut StdRng,
    moved: &mut Option<Moved>,
    counts: &mut NemesisCounts,
) {
    let prefer_active = rng.gen_bool(0.8);
    let from_leader = rng.gen_bool(0.5);
    let (pick_range, pick_from, pick_to): (usize, usize, usize) = (rng.gen(), rng.gen(), rng.gen());
    if let Some(m) = moved.take() {
        // The old replica learns of its removal from the meta leader's
        // heartbeat answer and deletes itself; wait for that (bounded) so
        // the move back starts from an empty node.
        let cl: &TestCluster = t.cluster;
        let gone = crate::wait_for(
            &format!("range {}'s replica to leave node {}", m.range_id, m.from),
            REPLICA_GONE_TIMEOUT,
            move || async move {
                let s = cl.status(m.from).await.ok()?;
                (!s.ranges.iter().any(|r| {
                    r.descriptor
                        .as_ref()
                        .is_some_and(|x| x.range_id == m.range_id)
                }))
                .then_some(())
            },
        )
        .await;
        if let Err(e) = gone {
            phase!("nemesis: membership: {e:#}; moving back anyway");
        }
        move_replica(client, m.range_id, m.to, m.from, "back", counts).await;
        return;
    }
    let ranges = match tokio::time::timeout(ADMIN_CALL_TIMEOUT, client.range_list()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return admin_refused(counts, "membership: range list", &e.to_string()),
        Err(_) => return admin_refused(counts, "membership: range list", "timed out"),
    };
    let nodes = t.cluster.running();
    let holds =
        |d: &lmskv_client::RangeDescriptor, n: u64| d.replicas.iter().any(|r| r.node_id == n);
    // User ranges that some running node holds no replica of.
    let movable: Vec<_> = ranges
        .iter()
        .filter_map(|r| r.descriptor.clone())
        .filter(|d| d.range_id != lmskv_proto::range::META_RANGE_ID)
        .filter(|d| nodes.iter().any(|n| !holds(d, *n)))
        .collect();
    if movable.is_empty() {
        phase!(
            "nemesis: membership skipped: no node is outside a range ({} nodes, every range has a replica on each)",
            nodes.len()
        );
        counts.membership_skipped += 1;
        return;
    }
    let active = t.probes.failover.active_ranges(Instant::now());
    let active_movable: Vec<_> = movable
        .iter()
        .filter(|d| active.contains(&d.range_id))
        .cloned()
        .collect();
    let pool = if prefer_active && !active_movable.is_empty() {
        &active_movable
    } else {
        &movable
    };
    let d = &pool[pick_range % pool.len()];
    let voters: Vec<u64> = d
        .replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .map(|r| r.node_id)
        .collect();
    if voters.is_empty() {
        return admin_refused(counts, "membership", "the range lists no voter");
    }
    let leader = leaders(t.cluster).await.get(&d.range_id).copied();
    let from = match leader {
        Some(l) if from_leader && voters.contains(&l) => l,
        _ => voters[pick_from % voters.len()],
    };
    let outside: Vec<u64> = nodes.iter().copied().filter(|n| !holds(d, *n)).collect();
    let to = outside[pick_to % outside.len()];
    let what = match (active.contains(&d.range_id), leader == Some(from)) {
        (true, true) => "the leader's replica of active",
        (true, false) => "a follower's replica of active",
        (false, true) => "the leader's replica of",
        (false, false) => "a follower's replica of",
    };
    if move_replica(client, d.range_id, from, to, what, counts).await {
        *moved = Some(Moved {
            range_id: d.range_id,
            from,
            to,
        });
    }
}

/// Moves `range_id`'s replica from node `from` to node `to` through the
/// operator API; returns whether it was done.
async fn move_replica(
    client: &Client,
    range_id: u64,
    from: u64,
    to: u64,
    what: &str,
    counts: &mut NemesisCounts,
) -> bool {
    phase!("nemesis: membership: move {what} range {range_id} from node {from} to node {to}");
    let at = Instant::now();
    let step = format!("membership: move range {range_id} from node {from} to node {to}");
    match tokio::time::timeout(MOVE_CALL_TIMEOUT, client.move_replica(range_id, from, to)).await {
        Ok(Ok(d)) => {
            counts.membership += 1;
            let replicas: Vec<u64> = d.replicas.iter().map(|r| r.node_id).collect();
            phase!(
                "nemesis: membership: range {range_id} now on nodes {replicas:?} ({:?})",
                at.elapsed()
            );
            true
        }
        Ok(Err(e)) => {
            admin_refused(counts, &step, &e.to_string());
            false
        }
        Err(_) => {
            admin_refused(counts, &step, "timed out");
            false
        }
    }
}

/// Splits a workload's data at a key inside it (never inside the bank
/// prefix).
async fn split(
    t: &Target<'_>,
    client: &Client,
    rng: &mut StdRng,
    seed: u64,
    counts: &mut NemesisCounts,
) {
    let key = split_key(rng, seed, t.workloads, t.started.elapsed(), t.stats.total());
    if counts.split >= SPLITS_MAX {
        phase!("nemesis: split: {SPLITS_MAX} splits made, no more this run");
        counts.split_skipped += 1;
        return;
    }
    phase!("nemesis: split at {key:?}");
    let at = Instant::now();
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, client.split(Bytes::from(key.clone()))).await {
        Ok(Ok((left, right))) => {
            counts.split += 1;
            t.probes.range_split(left.range_id, right.range_id);
            phase!(
                "nemesis: split range {} at {key:?}: new range {} ({:?})",
                left.range_id,
                right.range_id,
                at.elapsed()
            );
        }
        // A range already starts at the key: nothing to do.
        Ok(Err(ClientError::Server(ServerError::InvalidArgument { reason, .. })))
            if reason.contains("already starts") =>
        {
            phase!("nemesis: split at {key:?} skipped: {reason}");
            counts.split_skipped += 1;
        }
        Ok(Err(e)) => admin_refused(counts, &format!("split at {key:?}"), &e.to_string()),
        Err(_) => admin_refused(counts, &format!("split at {key:?}"), "timed out"),
    }
}

/// A split key for one of `workloads`: a register key of the current or
/// next epoch, a set element near where the adders are, or an edge of the
/// bank prefix (never inside it).
fn split_key(
    rng: &mut StdRng,
    seed: u64,
    workloads: &[Workload],
    elapsed: Duration,
    ops: u64,
) -> String {
    let w = workloads[rng.gen_range(0..workloads.len())];
    match w {
        Workload::Register => {
            let epoch = elapsed.as_secs() / register::EPOCH.as_secs() + rng.gen_range(0..=1);
            register::register_key(epoch, rng.gen_range(0..register::KEYS))
        }
        Workload::Set => {
            // Each adder's count is below the run's operation total.
            let n = rng.gen_range(1..=ops.max(1) / set::CLIENTS + 1);
            let client = rng.gen_range(0..set::CLIENTS);
            format!("{}{}", set::SET_PREFIX, set::element(seed, client, n))
        }
        Workload::Bank => {
            if rng.gen_bool(0.5) {
                BANK_PREFIX.to_string()
            } else {
                BANK_PREFIX_END.to_string()
            }
        }
    }
}

fn admin_refused(counts: &mut NemesisCounts, what: &str, why: &str) {
    phase!("nemesis: {what}: refused or failed: {why}");
    counts.admin_refused += 1;
}

/// Sleeps for a random rest, but not past `deadline`.
async fn rest(rng: &mut StdRng, deadline: Instant) {
    let rest = Duration::from_millis(rng.gen_range(REST_MS_MIN..=REST_MS_MAX));
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(rest.min(left)).await;
}

/// The leader of every range some node claims to lead, from the nodes'
/// status reports. A node resumed from a pause may still think it leads an
/// old term, so per range the claim with the highest term wins.
async fn leaders(cluster: &TestCluster) -> HashMap<u64, u64> {
    let asks = cluster.nodes.iter().map(|n| async move {
        (
            n.id,
            tokio::time::timeout(LEADER_LOOKUP_TIMEOUT, cluster.status(n.id)).await,
        )
    });
    let mut best: HashMap<u64, (u64, u64)> = HashMap::new();
    for (id, status) in futures::future::join_all(asks).await {
        let Ok(Ok(s)) = status else { continue };
        for r in s.ranges.iter().filter(|r| r.local_role == "leader") {
            let Some(d) = &r.descriptor else { continue };
            let e = best.entry(d.range_id).or_insert((r.term, id));
            if r.term > e.0 {
                *e = (r.term, id);
            }
        }
    }
    best.into_iter().map(|(r, (_, id))| (r, id)).collect()
}

/// Makes sure every node runs: resumes any paused one and restarts any that
/// exited, whatever the loop above left behind after an error.
fn heal_all(cluster: &mut TestCluster) {
    if cluster.network() != "loopback" {
        cluster.heal_network();
    }
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    for id in ids {
        match cluster.exited(id) {
            Ok(Some(_)) => {
                if let Err(e) = cluster.spawn(id) {
                    phase!("heal: restarting node {id} failed: {e:#}");
                }
            }
            Ok(None) => {
                let _ = cluster.resume(id);
            }
            Err(e) => phase!("heal: node {id}: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keys_stay_out_of_the_bank_accounts() {
        let mut rng = StdRng::seed_from_u64(7);
        let all = [Workload::Register, Workload::Set, Workload::Bank];
        for _ in 0..1_000 {
            let k = split_key(&mut rng, 7, &all, Duration::from_secs(25), 10_000);
            let inside_bank = k.as_str() > BANK_PREFIX && k.as_str() < BANK_PREFIX_END;
            assert!(!inside_bank, "{k}");
            assert!(
                k.starts_with("reg/") || k.starts_with(set::SET_PREFIX) || k.starts_with("bank"),
                "{k}"
            );
        }
    }
}
