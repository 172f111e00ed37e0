//! The nemesis loop: every few seconds it faults one node (kill -9 and
//! restart, SIGSTOP and SIGCONT, or a network partition that cuts it, or a
//! minority holding it, off from the rest), heals it, and rests, until the
//! run's duration is up.
//!
//! Faults are sequential, one node at a time, so a majority is always up: the
//! "never fault more than a minority" rule holds for every cluster of three or
//! more. Half the faults aim at the current leader of range 1, found through
//! the nodes' status reports, since leader faults are what exercise failover.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{FailoverTracker, Nemesis, NemesisCounts};
use crate::{phase, TestCluster};

/// Shortest and longest time a node stays faulted, in ms: past the 0.5–1 s
/// election timeout, so a faulted leader is replaced.
const FAULT_MS_MIN: u64 = 1_000;
const FAULT_MS_MAX: u64 = 3_000;
/// Shortest and longest rest between a heal and the next fault, in ms.
const REST_MS_MIN: u64 = 1_500;
const REST_MS_MAX: u64 = 4_000;
/// How long to look for the leader before a fault.
const LEADER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the nemesis for `duration`, then returns with every node healed.
pub async fn run(
    cluster: &mut TestCluster,
    nemeses: &[Nemesis],
    seed: u64,
    duration: Duration,
    failover: &FailoverTracker,
) -> NemesisCounts {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = NemesisCounts::default();
    let deadline = Instant::now() + duration;
    // Let the workloads get going before the first fault.
    rest(&mut rng, deadline).await;
    while Instant::now() < deadline {
        let kind = nemeses[rng.gen_range(0..nemeses.len())];
        let aim_at_leader = rng.gen_bool(0.5);
        let random_node = rng.gen_range(1..=cluster.nodes.len() as u64);
        let fault_for = Duration::from_millis(rng.gen_range(FAULT_MS_MIN..=FAULT_MS_MAX));
        let leader = leader_of(cluster).await;
        let target = match (aim_at_leader, leader) {
            (true, Some(l)) => l,
            _ => random_node,
        };
        let was_leader = leader == Some(target);
        phase!(
            "nemesis: {kind} node {target}{} for {fault_for:?}",
            if was_leader { " (leader)" } else { "" }
        );
        let at = Instant::now();
        let faulted = match kind {
            Nemesis::Kill => cluster.kill(target),
            Nemesis::Pause => cluster.pause(target),
            Nemesis::Partition => {
                let (side, rest) = partition_sides(&mut rng, cluster.nodes.len() as u64, target);
                phase!("nemesis: partition {side:?} | {rest:?}");
                cluster.partition(&side, &rest);
                Ok(())
            }
        };
        if let Err(e) = faulted {
            phase!("nemesis: {kind} node {target} failed: {e:#}");
            counts.errors += 1;
        } else {
            if was_leader {
                failover.leader_faulted(at);
                counts.leader_faults += 1;
            }
            match kind {
                Nemesis::Kill => counts.kill += 1,
                Nemesis::Pause => counts.pause += 1,
                Nemesis::Partition => counts.partition += 1,
            }
        }
        tokio::time::sleep(fault_for).await;
        let healed = match kind {
            Nemesis::Kill => cluster.spawn(target),
            Nemesis::Pause => cluster.resume(target),
            Nemesis::Partition => {
                cluster.heal_network();
                Ok(())
            }
        };
        if let Err(e) = healed {
            phase!("nemesis: healing node {target} failed: {e:#}");
            counts.errors += 1;
        }
        rest(&mut rng, deadline).await;
    }
    heal_all(cluster);
    counts
}

/// The two sides of a partition of nodes `1..=nodes`: `target` alone, or a
/// random minority holding `target`, against the rest (always a majority).
fn partition_sides(rng: &mut StdRng, nodes: u64, target: u64) -> (Vec<u64>, Vec<u64>) {
    let minority_max = (nodes - 1) / 2;
    let size = if minority_max > 1 && rng.gen_bool(0.5) {
        rng.gen_range(2..=minority_max)
    } else {
        1
    };
    let mut others: Vec<u64> = (1..=nodes).filter(|n| *n != target).collect();
    let mut side = vec![target];
    while side.len() < size as usize {
        let i = rng.gen_range(0..others.len());
        side.push(others.swap_remove(i));
    }
    side.sort_unstable();
    others.sort_unstable();
    (side, others)
}

/// Sleeps for a random rest, but not past `deadline`.
async fn rest(rng: &mut StdRng, deadline: Instant) {
    let rest = Duration::from_millis(rng.gen_range(REST_MS_MIN..=REST_MS_MAX));
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(rest.min(left)).await;
}

/// The node that reports itself leader of the first user range, if one answers in time.
async fn leader_of(cluster: &TestCluster) -> Option<u64> {
    // A node resumed from a pause may still think it leads an old term, so
    // the claim with the highest term wins.
    let ask = async {
        let mut best: Option<(u64, u64)> = None;
        for n in &cluster.nodes {
            if let Ok(s) = cluster.status(n.id).await {
                if let Some(r) = crate::cluster::user_range(&s).filter(|r| r.local_role == "leader")
                {
                    if best.is_none_or(|(term, _)| r.term > term) {
                        best = Some((r.term, n.id));
                    }
                }
            }
        }
        best.map(|(_, id)| id)
    };
    tokio::time::timeout(LEADER_LOOKUP_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// Makes sure every node runs: resumes any paused one and restarts any that
/// exited, whatever the loop above left behind after an error.
fn heal_all(cluster: &mut TestCluster) {
    if cluster.nodes.iter().any(|n| n.proxy.is_some()) {
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
