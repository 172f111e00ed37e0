//! [`OpStats`]: counts of client operations by outcome, shared by every
//! workload task of a chaos run.

use std::sync::atomic::{AtomicU64, Ordering};

/// Failed or unknown operations a run prints with their errors, the first
/// ones only (a long partition can fail thousands).
pub const OUTCOMES_LOGGED_MAX: u64 = 20;

/// Operation counts by outcome. Atomic, so workload tasks update it without a
/// lock.
#[derive(Debug, Default)]
pub struct OpStats {
    ok: AtomicU64,
    failed: AtomicU64,
    unknown: AtomicU64,
    corruption: AtomicU64,
    logged: AtomicU64,
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
    /// Failed operations a node answered with a data-corruption error. A
    /// chaos run damages no data, so each is a false alarm (or worse).
    pub corruption: u64,
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

    /// Counts an operation that had no effect, with the error the client
    /// gave (none: it timed out); notes a data-corruption error apart.
    pub fn failed_with(&self, what: &str, e: Option<&lmskv_client::ClientError>) {
        self.failed();
        self.log_outcome("failed", what, e);
        self.note_corruption(what, e);
    }

    /// Counts an operation with an unknown outcome, with the error the
    /// client gave (none: it timed out); notes a data-corruption error apart.
    pub fn unknown_with(&self, what: &str, e: Option<&lmskv_client::ClientError>) {
        self.unknown();
        self.log_outcome("outcome unknown", what, e);
        self.note_corruption(what, e);
    }

    /// Prints one of the first [`OUTCOMES_LOGGED_MAX`] failed or unknown
    /// operations with its error, so a run's report can say why.
    fn log_outcome(&self, outcome: &str, what: &str, e: Option<&lmskv_client::ClientError>) {
        let n = self.logged.fetch_add(1, Ordering::Relaxed) + 1;
        if n > OUTCOMES_LOGGED_MAX {
            return;
        }
        let why = e.map_or_else(|| "timed out".to_string(), |e| e.to_string());
        crate::phase!("{what}: {outcome} ({n} of the first {OUTCOMES_LOGGED_MAX} logged): {why}");
    }

    fn note_corruption(&self, what: &str, e: Option<&lmskv_client::ClientError>) {
        if let Some(e) = e.filter(|e| {
            matches!(
                e.server_error(),
                Some(lmskv_client::ServerError::Corruption { .. })
            )
        }) {
            self.corruption.fetch_add(1, Ordering::Relaxed);
            crate::phase!("{what}: a node reported data corruption: {e}");
        }
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
            corruption: self.corruption.load(Ordering::Relaxed),
        }
    }

    /// Every operation counted so far.
    pub fn total(&self) -> u64 {
        let c = self.snapshot();
        c.ok + c.failed + c.unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmskv_client::{ClientError, ServerError};

    #[test]
    fn data_corruption_answers_are_counted_apart() {
        let stats = OpStats::default();
        let corrupt = ClientError::Server(ServerError::Corruption {
            reason: "range 2 stopped".into(),
        });
        let behind_deadline = ClientError::DeadlineExceeded {
            deadline_ms: 10,
            attempts: 2,
            last: Box::new(corrupt.clone()),
        };
        let unavailable = ClientError::Server(ServerError::unavailable("no leader"));
        stats.failed_with("read", Some(&corrupt));
        stats.unknown_with("write", Some(&behind_deadline));
        stats.failed_with("read", Some(&unavailable));
        stats.unknown_with("write", None);
        let c = stats.snapshot();
        assert_eq!((c.failed, c.unknown, c.corruption), (2, 2, 2));
    }
}
