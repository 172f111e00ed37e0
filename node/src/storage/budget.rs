//! [`ByteBudget`]: a count of bytes that memory caches share, with a hard cap.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes that several holders (one per range) may keep in memory together,
/// at most `max`. A holder takes bytes before it keeps them and gives them
/// back when it lets them go; a take that would pass `max` fails and
/// changes nothing, so the sum held never exceeds `max`, even with takes
/// racing on many threads.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    max: usize,
}

impl ByteBudget {
    /// A budget of `max` bytes, none of them taken (`0`: every take fails).
    pub fn new(max: usize) -> Self {
        ByteBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` bytes if they fit; `false` (nothing taken) otherwise.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken before.
    pub fn give_back(&self, n: usize) {
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "gave back {n} bytes of {before} taken");
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes that may be taken at once.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn takes_fit_within_the_cap_and_a_failed_take_changes_nothing() {
        let b = ByteBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41), "60 + 41 passes the cap");
        assert_eq!(b.used(), 60);
        assert!(b.try_take(40), "exactly at the cap is allowed");
        assert!(!b.try_take(1));
        b.give_back(60);
        assert_eq!(b.used(), 40);
        assert!(b.try_take(60));
        assert!(!b.try_take(usize::MAX), "an overflowing take fails");
        assert_eq!(b.used(), 100);
        assert!(!ByteBudget::new(0).try_take(1));
    }

    /// Many threads taking and giving back at once never hold more than
    /// the cap together, and every byte comes back.
    #[test]
    fn racing_takes_never_pass_the_cap() {
        let b = Arc::new(ByteBudget::new(1_000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000usize {
                        let n = 1 + (i * 7 + t * 13) % 97;
                        if b.try_take(n) {
                            held.push(n);
                            assert!(b.used() <= b.max(), "{} > {}", b.used(), b.max());
                        }
                        if held.len() > 3 {
                            b.give_back(held.remove(0));
                        }
                    }
                    for n in held {
                        b.give_back(n);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(b.used(), 0);
    }
}
