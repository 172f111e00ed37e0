//! What the simulated hosts, the client and the nemesis share: each host's
//! request channel and last published Raft state, and the invariants checked
//! on every published state as the run goes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use lmskv_node::raft::ReplicaStatus;
use tokio::sync::mpsc;

use crate::host::Request;

/// Violations kept per run at most (the first ones explain it).
const VIOLATIONS_MAX: usize = 32;
/// Applied log ids remembered per run at most (a run applies a few thousand).
const APPLIED_LOG_IDS_MAX: usize = 200_000;

/// One host's replica state, as last published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub term: u64,
    pub leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Leader (term, node id) of the last applied entry.
    pub applied_leader: Option<(u64, u64)>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Why the replica refuses to serve, if it does (its Raft group stopped).
    pub fault: Option<String>,
    /// Snapshots answered without installing since the host booted.
    pub snapshots_not_installed: u64,
}

impl HostView {
    /// The parts of a replica status the checks use.
    pub fn of(s: &ReplicaStatus) -> Self {
        HostView {
            term: s.term,
            leader: s.role == "leader",
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            applied_leader: s.applied_leader,
            voters: s.voters.clone(),
            learners: s.learners.clone(),
            fault: s.fault.clone(),
            snapshots_not_installed: s.snapshots_not_installed,
        }
    }
}

/// A host's slot: how to reach it while it runs, and what it last showed.
#[derive(Default)]
pub struct HostSlot {
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    view: Mutex<Option<HostView>>,
    /// Highest applied index the host ever published, over all its boots:
    /// applied state is persisted with the data, so it never goes back.
    applied_max: Mutex<u64>,
    /// The host's count of snapshots not installed, as last seen this boot.
    not_installed_seen: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostSlot {
    /// The host booted and takes requests on `tx`.
    pub fn started(&self, tx: mpsc::Sender<Request>) {
        *lock(&self.requests) = Some(tx);
    }

    /// The host crashed: nothing reaches it and it shows nothing.
    pub fn stopped(&self) {
        lock(&self.requests).take();
        lock(&self.view).take();
        *lock(&self.not_installed_seen) = 0;
    }

    /// The host's request channel, while it runs.
    pub fn sender(&self) -> Option<mpsc::Sender<Request>> {
        lock(&self.requests).clone()
    }

    /// The host's last published state, while it runs.
    pub fn view(&self) -> Option<HostView> {
        lock(&self.view).clone()
    }
}

/// State shared by everything in one simulated run.
pub struct Shared {
    hosts: Vec<HostSlot>,
    initial_voters: u64,
    bootstrapped: AtomicBool,
    /// The leaders seen in each term. openraft's leader ids (its default,
    /// "advanced" mode) are (term, node id), totally ordered: two candidates
    /// of one term may both win, the one with the higher node id second, so
    /// one term may see several leaders, each its own leader id. Log ids
    /// carry the leader id, which keeps their order total; that entries stay
    /// committed is checked by the history and replica checks at the end.
    leaders: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
    violations: Mutex<Vec<String>>,
    /// Log ids seen applied, by any replica: index -> leader (term, node id)
    /// that proposed the entry there. Every replica applies one log, so an
    /// index is applied with one leader id everywhere, and leader ids never
    /// decrease along the log.
    applied: Mutex<BTreeMap<u64, (u64, u64)>>,
    /// Times a leader was seen (for the run's summary).
    pub elections: Mutex<u64>,
    /// Snapshots answered without installing, over every host and boot.
    pub snapshots_not_installed: Mutex<u64>,
}

impl Shared {
    /// State for `hosts` hosts (node ids 1..=hosts), the first
    /// `initial_voters` of them forming the range.
    pub fn new(hosts: usize, initial_voters: usize) -> Self {
        Shared {
            hosts: (0..hosts).map(|_| HostSlot::default()).collect(),
            initial_voters: initial_voters as u64,
            bootstrapped: AtomicBool::new(false),
            leaders: Mutex::new(BTreeMap::new()),
            violations: Mutex::new(Vec::new()),
            applied: Mutex::new(BTreeMap::new()),
            elections: Mutex::new(0),
            snapshots_not_installed: Mutex::new(0),
        }
    }

    /// Node ids of every host.
    pub fn ids(&self) -> impl Iterator<Item = u64> {
        1..=self.hosts.len() as u64
    }

    /// Node ids of the range's first voters.
    pub fn initial_voters(&self) -> impl Iterator<Item = u64> {
        1..=self.initial_voters
    }

    /// True once: the caller forms the range's first membership.
    pub fn take_bootstrap(&self) -> bool {
        !self.bootstrapped.swap(true, Ordering::SeqCst)
    }

    /// Node `id`'s slot.
    pub fn host(&self, id: u64) -> &HostSlot {
        &self.hosts[(id - 1) as usize]
    }

    /// The running host that leads in the highest term seen, with its view.
    pub fn leader(&self) -> Option<(u64, HostView)> {
        self.ids()
            .filter_map(|id| self.host(id).view().map(|v| (id, v)))
            .filter(|(_, v)| v.leader)
            .max_by_key(|(_, v)| v.term)
    }

    /// Records a violated invariant.
    pub fn violation(&self, what: String) {
        let mut v = lock(&self.violations);
        if v.len() < VIOLATIONS_MAX {
            tracing::error!(violation = %what, "invariant violated");
            v.push(what);
        }
    }

    /// The violations recorded so far.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// Checks the log id node `id` reports as last applied against those
    /// seen before (State Machine Safety): the same leader id at an index on
    /// every replica, and none older at a higher index or newer at a lower.
    fn check_applied(&self, id: u64, index: u64, leader: (u64, u64)) {
        let mut applied = lock(&self.applied);
        let found = if let Some(other) = applied.get(&index) {
            (*other != leader).then(|| format!("another replica applied it from leader {other:?}"))
        } else {
            let below = applied
                .range(..index)
                .next_back()
                .filter(|(_, l)| **l > leader);
            let above = applied
                .range(index + 1..)
                .next()
                .filter(|(_, l)| **l < leader);
            match (below, above) {
                (Some((i, l)), _) => {
                    Some(format!("index {i} was applied from the newer leader {l:?}"))
                }
                (_, Some((i, l))) => {
                    Some(format!("index {i} was applied from the older leader {l:?}"))
                }
                _ => {
                    if applied.len() < APPLIED_LOG_IDS_MAX {
                        applied.insert(index, leader);
                    }
                    None
                }
            }
        };
        drop(applied);
        if let Some(why) = found {
            self.violation(format!(
                "node {id} applied index {index} from leader {leader:?}, but {why}"
            ));
        }
    }

    /// Takes node `id`'s published state and checks it as it arrives:
    /// applied indexes never go back; every replica applies the same log id
    /// at an index; leaders are counted per leader id.
    pub fn observe(&self, id: u64, view: HostView) {
        let slot = self.host(id);
        if let (Some(leader), true) = (view.applied_leader, view.applied_index > 0) {
            self.check_applied(id, view.applied_index, leader);
        }
        {
            let mut seen = lock(&slot.not_installed_seen);
            if view.snapshots_not_installed > *seen {
                *lock(&self.snapshots_not_installed) += view.snapshots_not_installed - *seen;
                *seen = view.snapshots_not_installed;
            }
        }
        if view.leader && lock(&self.leaders).entry(view.term).or_default().insert(id) {
            *lock(&self.elections) += 1;
        }
        {
            let mut max = lock(&slot.applied_max);
            // A booting replica shows 0 until openraft loaded its state.
            if view.applied_index != 0 && view.applied_index < *max {
                let was = *max;
                drop(max);
                self.violation(format!(
                    "node {id} applied index went back from {was} to {}",
                    view.applied_index
                ));
            } else {
                *max = view.applied_index;
            }
        }
        *lock(&slot.view) = Some(view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared::new(3, 3)
    }

    #[test]
    fn one_log_applied_everywhere_passes() {
        let s = shared();
        s.check_applied(1, 5, (1, 1));
        s.check_applied(2, 5, (1, 1));
        s.check_applied(2, 9, (2, 3));
        s.check_applied(3, 7, (2, 3));
        s.check_applied(1, 3, (1, 1));
        assert!(s.violations().is_empty(), "{:?}", s.violations());
    }

    #[test]
    fn another_leader_id_at_an_applied_index_is_a_violation() {
        let s = shared();
        s.check_applied(1, 5, (1, 1));
        s.check_applied(2, 5, (2, 2));
        let v = s.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("node 2 applied index 5 from leader (2, 2)"),
            "{v:?}"
        );
    }

    #[test]
    fn leader_ids_going_back_along_the_log_are_a_violation() {
        let s = shared();
        s.check_applied(1, 5, (2, 2));
        // An older leader's entry above an index a newer leader wrote.
        s.check_applied(2, 6, (1, 1));
        // A newer leader's entry below one an older leader wrote.
        s.check_applied(3, 10, (3, 1));
        s.check_applied(3, 8, (4, 2));
        let v = s.violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("newer leader (2, 2)"), "{v:?}");
        assert!(v[1].contains("older leader (3, 1)"), "{v:?}");
    }
}
