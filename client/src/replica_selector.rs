//! [`ReplicaSelector`]: which nodes a read that any replica may serve is sent
//! to, and in what order.
//!
//! Reads at BOUNDED_STALENESS, SESSION, CONSISTENT_PREFIX and EVENTUAL go
//! first to the known nodes (the seed endpoints) in turn, starting at a
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

/// Picks replicas for reads, in rotation, skipping recently failed ones.
#[derive(Debug)]
pub(crate) struct ReplicaSelector {
    endpoints: Vec<String>,
    next: AtomicUsize,
    /// Replica address → until when it is skipped. Holds seed endpoints only,
    /// so it is bounded by their number.
    suspects: Mutex<HashMap<String, Instant>>,
}

impl ReplicaSelector {
    /// A selector over `endpoints`, starting the rotation at a random one.
    pub fn new(endpoints: Vec<String>) -> Self {
        let start = rand::random::<u32>() as usize;
        ReplicaSelector {
            endpoints,
            next: AtomicUsize::new(start),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// The replicas to try for the next read, at most `tries_max`.
    pub fn order(&self, tries_max: usize) -> Vec<String> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, until| *until > now);
        rotation(&self.endpoints, start, tries_max, |a| {
            suspects.contains_key(a)
        })
    }

    /// Skips `addr` for [`REPLICA_SUSPECT_FOR`].
    pub fn suspect(&self, addr: &str) {
        if self.endpoints.iter().any(|e| e == addr) {
            let until = Instant::now() + REPLICA_SUSPECT_FOR;
            self.suspects
                .lock()
                .expect("suspects lock")
                .insert(addr.to_string(), until);
        }
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
        let s = ReplicaSelector::new(eps());
        let firsts: std::collections::HashSet<String> =
            (0..4).map(|_| s.order(1).remove(0)).collect();
        assert_eq!(firsts.len(), 4);
    }

    #[test]
    fn a_suspect_is_skipped_until_it_answers() {
        let s = ReplicaSelector::new(eps());
        s.suspect("b");
        s.suspect("not-a-seed");
        for _ in 0..8 {
            let o = s.order(REPLICA_TRIES_MAX);
            assert_eq!(o.len(), 3);
            assert!(!o.contains(&"b".to_string()));
        }
        assert_eq!(s.suspects.lock().unwrap().len(), 1);
        s.clear("b");
        assert_eq!(s.order(4).len(), 4);
    }
}
