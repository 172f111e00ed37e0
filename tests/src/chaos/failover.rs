//! [`FailoverTracker`]: measures how long a range takes to accept writes
//! again after the nemesis faults (or hands over) its leader.
//!
//! Workloads report every acknowledged write with the instant it was sent and
//! the range that took it; the tracker remembers when each range last took a
//! write, so the nemesis can tell which ranges carry traffic ("active").
//! When the nemesis faults a node, it opens one probe for every active range
//! that node led. The first write to that range sent after the fault and
//! acknowledged closes the probe, and the time from the fault to that
//! acknowledgement is one sample. Writes already in flight at the fault do
//! not count: they may have been committed by the old leader just before it
//! stopped.
//!
//! Splits keep probes going: the nemesis reports each split it makes, and a
//! probe of the left range is closed by a write to either half. A probe that
//! no write closes within [`PROBE_TTL`] (its range went idle) is dropped and
//! counted as unmeasured rather than giving a sample that measures the
//! workload's key choice instead of the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most probes kept open at once; older ones are dropped unmeasured.
pub const PROBES_OPEN_MAX: usize = 64;
/// Most failover samples kept.
pub const SAMPLES_MAX: usize = 100_000;
/// A probe no write closed within this long is dropped unmeasured.
pub const PROBE_TTL: Duration = Duration::from_secs(30);
/// A sample at least this long is logged as it is taken.
pub const SLOW_FAILOVER: Duration = Duration::from_millis(1_000);
/// A range that took a write within this long is active.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(2);
/// Most ranges whose last write the tracker remembers.
const RANGES_TRACKED_MAX: usize = 10_000;

/// Identifies the probes opened by one fault, to cancel them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultId(u64);

#[derive(Debug)]
struct Probe {
    fault: FaultId,
    /// What kind of fault opened it (`kill`, `pause`, ...).
    kind: &'static str,
    at: Instant,
    /// The faulted range and the right halves of splits made since.
    ranges: Vec<u64>,
}

#[derive(Debug, Default)]
struct State {
    next_fault: u64,
    open: Vec<Probe>,
    samples: Vec<(&'static str, Duration)>,
    unmeasured: u64,
    last_ack: HashMap<u64, Instant>,
}

impl State {
    fn expire(&mut self, now: Instant) {
        let before = self.open.len();
        self.open
            .retain(|p| now.saturating_duration_since(p.at) < PROBE_TTL);
        self.unmeasured += (before - self.open.len()) as u64;
    }
}

/// Open failover probes, the samples measured so far, and which ranges carry
/// writes.
#[derive(Debug, Default)]
pub struct FailoverTracker {
    inner: Mutex<State>,
}

impl FailoverTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a probe for each of `ranges`: their leader was faulted at `at`
    /// by a fault of kind `kind`.
    pub fn leader_faulted(&self, kind: &'static str, at: Instant, ranges: &[u64]) -> FaultId {
        let mut st = self.lock();
        let id = FaultId(st.next_fault);
        st.next_fault += 1;
        for &r in ranges {
            if st.open.len() >= PROBES_OPEN_MAX {
                st.open.remove(0);
                st.unmeasured += 1;
            }
            st.open.push(Probe {
                fault: id,
                kind,
                at,
                ranges: vec![r],
            });
        }
        id
    }

    /// Forgets the still-open probes of `fault` (the fault did not happen).
    pub fn cancel(&self, fault: FaultId) {
        self.lock().open.retain(|p| p.fault != fault);
    }

    /// Range `left` was split and `right` is its new right half: a write to
    /// either closes the left range's probes.
    pub fn range_split(&self, left: u64, right: u64) {
        for p in self.lock().open.iter_mut() {
            if p.ranges.contains(&left) && !p.ranges.contains(&right) {
                p.ranges.push(right);
            }
        }
    }

    /// Reports a write to `range_id` sent at `sent_at` and acknowledged at
    /// `acked_at`; closes every probe of that range opened before it was
    /// sent.
    pub fn write_acked(&self, sent_at: Instant, acked_at: Instant, range_id: u64) {
        let mut st = self.lock();
        if st.last_ack.len() >= RANGES_TRACKED_MAX && !st.last_ack.contains_key(&range_id) {
            st.last_ack.clear();
        }
        st.last_ack.insert(range_id, acked_at);
        if st.open.is_empty() {
            return;
        }
        st.expire(acked_at);
        let (closed, open): (Vec<Probe>, Vec<Probe>) = std::mem::take(&mut st.open)
            .into_iter()
            .partition(|p| p.at <= sent_at && p.ranges.contains(&range_id));
        st.open = open;
        for p in closed {
            let took = acked_at.saturating_duration_since(p.at);
            if took >= SLOW_FAILOVER {
                // Logged with the fault's time, to find it in the node logs.
                let since = Instant::now().saturating_duration_since(p.at);
                crate::phase!(
                    "failover: slow: range {range_id} took {} ms after the {} at {:.3}s",
                    took.as_millis(),
                    p.kind,
                    crate::cluster::elapsed_s() - since.as_secs_f64(),
                );
            }
            if st.samples.len() < SAMPLES_MAX {
                st.samples.push((p.kind, took));
            }
        }
    }

    /// The ranges that took a write within [`ACTIVE_WINDOW`] before `now`,
    /// in id order.
    pub fn active_ranges(&self, now: Instant) -> Vec<u64> {
        let st = self.lock();
        let mut out: Vec<u64> = st
            .last_ack
            .iter()
            .filter(|(_, &t)| now.saturating_duration_since(t) <= ACTIVE_WINDOW)
            .map(|(&r, _)| r)
            .collect();
        out.sort_unstable();
        out
    }

    /// The samples measured so far.
    pub fn samples(&self) -> Vec<Duration> {
        self.lock().samples.iter().map(|(_, d)| *d).collect()
    }

    /// The samples measured so far, by the kind of fault that opened them.
    pub fn samples_by_kind(&self) -> BTreeMap<&'static str, Vec<Duration>> {
        let mut out: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
        for (kind, d) in &self.lock().samples {
            out.entry(kind).or_default().push(*d);
        }
        out
    }

    /// Probes dropped without a sample (their range went idle, or too many
    /// were open), counting those still open as of `now` past their TTL.
    pub fn unmeasured(&self, now: Instant) -> u64 {
        let mut st = self.lock();
        st.expire(now);
        st.unmeasured
    }
}

/// The trackers every workload reports its acknowledged writes to: one for
/// faults (kill, pause, partition of a leader) and one for planned leader
/// transfers, which are no failure and are measured apart.
#[derive(Debug, Default)]
pub struct Probes {
    /// Leader faults: `failover_ms` in the report.
    pub failover: FailoverTracker,
    /// Leader transfers: `transfer_ms` in the report.
    pub transfer: FailoverTracker,
}

impl Probes {
    /// Reports an acknowledged write to both trackers.
    pub fn write_acked(&self, sent_at: Instant, acked_at: Instant, range_id: u64) {
        self.failover.write_acked(sent_at, acked_at, range_id);
        self.transfer.write_acked(sent_at, acked_at, range_id);
    }

    /// Reports a split the nemesis made to both trackers.
    pub fn range_split(&self, left: u64, right: u64) {
        self.failover.range_split(left, right);
        self.transfer.range_split(left, right);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_sent_after_the_fault_to_its_range_close_a_probe() {
        let t = FailoverTracker::default();
        let t0 = Instant::now();
        let fault = t0 + Duration::from_millis(100);
        t.leader_faulted("kill", fault, &[2]);
        // In flight at the fault: does not count.
        t.write_acked(t0, fault + Duration::from_millis(50), 2);
        // Another range: does not count.
        t.write_acked(
            fault + Duration::from_millis(10),
            fault + Duration::from_millis(60),
            3,
        );
        assert!(t.samples().is_empty());
        t.write_acked(
            fault + Duration::from_millis(10),
            fault + Duration::from_millis(900),
            2,
        );
        assert_eq!(t.samples(), vec![Duration::from_millis(900)]);
        // The probe is closed: later writes add nothing.
        t.write_acked(
            fault + Duration::from_secs(2),
            fault + Duration::from_secs(3),
            2,
        );
        assert_eq!(t.samples().len(), 1);
        assert_eq!(t.unmeasured(fault + Duration::from_secs(3)), 0);
    }

    #[test]
    fn a_split_lets_the_right_half_close_the_probe() {
        let t = FailoverTracker::default();
        let fault = Instant::now();
        t.leader_faulted("kill", fault, &[2]);
        t.range_split(2, 7);
        t.write_acked(fault, fault + Duration::from_millis(400), 7);
        assert_eq!(t.samples(), vec![Duration::from_millis(400)]);
        assert_eq!(
            t.samples_by_kind(),
            BTreeMap::from([("kill", vec![Duration::from_millis(400)])])
        );
    }

    #[test]
    fn idle_probes_expire_unmeasured_and_cancelled_ones_vanish() {
        let t = FailoverTracker::default();
        let fault = Instant::now();
        t.leader_faulted("pause", fault, &[2, 3]);
        let late = fault + PROBE_TTL + Duration::from_secs(1);
        t.write_acked(fault, late, 2);
        assert!(t.samples().is_empty());
        assert_eq!(t.unmeasured(late), 2);
        let id = t.leader_faulted("transfer", late, &[4]);
        t.cancel(id);
        t.write_acked(late, late + Duration::from_millis(5), 4);
        assert!(t.samples().is_empty());
    }

    #[test]
    fn active_ranges_are_those_written_recently() {
        let t = FailoverTracker::default();
        let now = Instant::now();
        t.write_acked(now, now, 5);
        t.write_acked(now, now, 2);
        assert_eq!(t.active_ranges(now + Duration::from_millis(10)), vec![2, 5]);
        assert!(t
            .active_ranges(now + ACTIVE_WINDOW + Duration::from_millis(1))
            .is_empty());
    }
}
