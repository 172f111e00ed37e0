//! [`ReplicaSelector`]: which nodes a read that any replica may serve is sent
//! to, and in what order.
//!
//! Reads at BOUNDED_STALENESS, SESSION, CONSISTENT_PREFIX and EVENTUAL go
//! first to the replicas of the key's range in turn, starting at a
//! different one on every call so that load spreads, and skip for a short
//! while a node that just failed (paused, partitioned, lagging behind), so
//! that one bad node does not cost every read a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Replicas one read tries at most before it falls back to the leader.
pub const REPLICA_TRIES_MAX: usize = 3;
/// How long a replica that failed a read is skipped.
pub const REPLICA_SUSPECT_FOR: Duration = Duration::from_secs(2);

/// Nodes suspected at once at most; beyond it a new suspect is not recorded.
pub const REPLICA_SUSPECTS_MAX: usize = 1_024;

/// Picks replicas for reads, in rotation, skipping recently failed ones.
#[derive(Debug)]
pub(crate) struct ReplicaSelector {
    next: AtomicUsize,
    /// Replica address → until when it is skipped; at most
    /// [`REPLICA_SUSPECTS_MAX`] entries.
    suspects: Mutex<HashMap<String, Instant>>,
}

impl ReplicaSelector {
    /// A selector whose rotation starts at a random place.
    pub fn new() -> Self {
        let start = rand::random::<u32>() as usize;
        ReplicaSelector {
            next: AtomicUsize::new(start),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// Up to `tries_max` of `candidates` (a range's replica addresses) for
    /// the next read, in rotation, without the suspects.
    pub fn order(&self, candidates: &[String], tries_max: usize) -> Vec<String> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, until| *until > now);
        rotation(candidates, start, tries_max, |a| suspects.contains_key(a))
    }

    /// Skips `addr` for [`REPLICA_SUSPECT_FOR`].
    pub fn suspect(&self, addr: &str) {
        let until = Instant::now() + REPLICA_SUSPECT_FOR;
        let mut suspects = self.suspects.lock().expect("suspects lock");
        if suspects.len() < REPLICA_SUSPECTS_MAX || suspects.contains_key(addr) {
            suspects.insert(addr.to_string(), until);
        }
    }

    /// Whether `addr` failed a try within [`REPLICA_SUSPECT_FOR`].
    pub fn is_suspect(&self, addr: &str) -> bool {
        self.suspects
            .lock()
            .expect("suspects lock")
            .get(addr)
            .is_some_and(|until| *until > Instant::now())
    }

    /// `addr` answered: stop skipping it.
    pub fn clear(&self, addr: &str) {
        self.suspects.lock().expect("suspects lock").remove(addr);
    }
}

/// Up to `tries_max` of `endpoints`, starting at `start` (modulo their
/// number) and skipping those `skip` rejects.
fn rotation(
    endpoints: &[String],
    start: usize,
    tries_max: usize,
    skip: impl Fn(&str) -> bool,
) -> Vec<String> {
    let n = endpoints.len();
    (0..n)
        .map(|i| &endpoints[(start + i) % n.max(1)])
        .filter(|e| !skip(e))
        .take(tries_max)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps() -> Vec<String> {
        ["a", "b", "c", "d"].map(String::from).to_vec()
    }

    #[test]
    fn rotation_starts_where_asked_and_wraps() {
        assert_eq!(rotation(&eps(), 2, 3, |_| false), ["c", "d", "a"]);
        assert_eq!(rotation(&eps(), 7, 10, |_| false), ["d", "a", "b", "c"]);
        assert!(rotation(&[], 3, 3, |_| false).is_empty());
    }

    #[test]
    fn rotation_skips_suspects() {
        assert_eq!(rotation(&eps(), 0, 3, |e| e == "b"), ["a", "c", "d"]);
        assert!(rotation(&eps(), 0, 3, |_| true).is_empty());
    }

    #[test]
    fn successive_reads_spread_over_every_replica() {
        let s = ReplicaSelector::new();
        let firsts: std::collections::HashSet<String> =
            (0..4).map(|_| s.order(&eps(), 1).remove(0)).collect();
        assert_eq!(firsts.len(), 4);
    }

    #[test]
    fn a_suspect_is_skipped_until_it_answers() {
        let s = ReplicaSelector::new();
        s.suspect("b");
        for _ in 0..8 {
            let o = s.order(&eps(), REPLICA_TRIES_MAX);
            assert_eq!(o.len(), 3);
            assert!(!o.contains(&"b".to_string()));
        }
        assert_eq!(s.suspects.lock().unwrap().len(), 1);
        s.clear("b");
        assert_eq!(s.order(&eps(), 4).len(), 4);
    }
}
