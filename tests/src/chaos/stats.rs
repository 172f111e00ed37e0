//! [`OpStats`]: counts of client operations by outcome, shared by every
//! workload task of a chaos run.

use std::sync::atomic::{AtomicU64, Ordering};

/// Operation counts by outcome. Atomic, so workload tasks update it without a
/// lock.
#[derive(Debug, Default)]
pub struct OpStats {
    ok: AtomicU64,
    failed: AtomicU64,
    unknown: AtomicU64,
}

/// A point-in-time copy of [`OpStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpCounts {
    /// Operations the store answered.
    pub ok: u64,
    /// Operations that definitely had no effect (failed reads).
    pub failed: u64,
    /// Writes whose effect the client could not learn.
    pub unknown: u64,
}

impl OpStats {
    /// Counts an answered operation.
    pub fn ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an operation that had no effect.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an operation with an unknown outcome.
    pub fn unknown(&self) {
        self.unknown.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> OpCounts {
        OpCounts {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
        }
    }

    /// Every operation counted so far.
    pub fn total(&self) -> u64 {
        let c = self.snapshot();
        c.ok + c.failed + c.unknown
    }
}
