//! [`FailoverTracker`]: measures how long the store takes to accept writes
//! again after the nemesis faults the leader.
//!
//! The nemesis opens a probe at the instant it faults the node that led
//! range 1. Workloads report every acknowledged write with the instant it was sent;
//! the first write sent after a probe opened and acknowledged closes it, and
//! the time from the fault to that acknowledgement is one failover sample.
//! Writes already in flight at the fault do not count: they may have been
//! committed by the old leader just before it stopped.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most probes kept open at once; older ones are dropped unmeasured.
pub const PROBES_OPEN_MAX: usize = 16;
/// Most failover samples kept.
pub const SAMPLES_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct State {
    open: Vec<Instant>,
    samples: Vec<Duration>,
}

/// Open failover probes and the samples measured so far.
#[derive(Debug, Default)]
pub struct FailoverTracker {
    inner: Mutex<State>,
}

impl FailoverTracker {
    /// Opens a probe: the leader was faulted at `at`.
    pub fn leader_faulted(&self, at: Instant) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if st.open.len() >= PROBES_OPEN_MAX {
            st.open.remove(0);
        }
        st.open.push(at);
    }

    /// Reports a write sent at `sent_at` and acknowledged at `acked_at`;
    /// closes every probe opened before it was sent.
    pub fn write_acked(&self, sent_at: Instant, acked_at: Instant) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if st.open.is_empty() {
            return;
        }
        let (closed, open): (Vec<Instant>, Vec<Instant>) =
            st.open.iter().partition(|&&fault| fault <= sent_at);
        st.open = open;
        for fault in closed {
            if st.samples.len() < SAMPLES_MAX {
                st.samples.push(acked_at.saturating_duration_since(fault));
            }
        }
    }

    /// The failover samples measured so far.
    pub fn samples(&self) -> Vec<Duration> {
        let st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        st.samples.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_sent_after_the_fault_close_a_probe() {
        let t = FailoverTracker::default();
        let t0 = Instant::now();
        let fault = t0 + Duration::from_millis(100);
        t.leader_faulted(fault);
        // In flight at the fault: does not count.
        t.write_acked(t0, fault + Duration::from_millis(50));
        assert!(t.samples().is_empty());
        t.write_acked(
            fault + Duration::from_millis(10),
            fault + Duration::from_millis(900),
        );
        assert_eq!(t.samples(), vec![Duration::from_millis(900)]);
        // The probe is closed: later writes add nothing.
        t.write_acked(
            fault + Duration::from_secs(2),
            fault + Duration::from_secs(3),
        );
        assert_eq!(t.samples().len(), 1);
    }
}
