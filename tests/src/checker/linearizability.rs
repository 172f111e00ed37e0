//! [`check_history`]: whether a key-value [`History`] is linearizable.
//!
//! Every key is an independent register (absent at the start) and
//! linearizability is local: a history is linearizable iff each key's
//! sub-history is. So the history is split per key and each key is searched
//! on its own, in key order, until one fails or all pass.
//!
//! Each search is bounded by a [`Budget`]. When a key's search runs out of
//! it, the key is undecided and the verdict is [`Verdict::Unknown`] (unless
//! another key is found not linearizable, which is then the verdict): a
//! checker that gave up is never mistaken for one that passed.
//!
//! Operations with an unknown outcome may take effect at any point after
//! their invocation, or never. Operations that definitely did not happen must
//! not be in the history at all (see [`super::history`]).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::history::{DisplayValue, History, OpId};
use super::search::{search, KeyHistory, LimitHit, SearchLimits, SearchResult};

/// How many operations an explanation lists (of the prefix, and of the
/// operations concurrent with the blocked one).
const EXPLAIN_OPS_MAX: usize = 8;

/// How much work a check may do before it answers [`Verdict::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most distinct (linearized set, register state) pairs one key's
    /// search may explore.
    pub states_per_key_max: u64,
    /// The most memory one key's memo table may take, estimated from its
    /// entries. Each entry costs about `ops / 8 + 64` bytes for a key with
    /// `ops` operations.
    pub memo_bytes_max: usize,
    /// The most wall-clock time the whole check may take.
    pub time_max: Duration,
}

impl Default for Budget {
    /// Enough for histories of a few thousand operations per key with
    /// moderate concurrency; about 1 GiB of memo at most.
    fn default() -> Self {
        Budget {
            states_per_key_max: 10_000_000,
            memo_bytes_max: 1 << 30,
            time_max: Duration::from_secs(60),
        }
    }
}

/// Which part of the [`Budget`] ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetExceeded {
    /// A key's search explored `states_per_key_max` states.
    #[error("a key's search explored more than {states_per_key_max} states")]
    States {
        /// The limit.
        states_per_key_max: u64,
    },
    /// A key's memo table grew past `memo_bytes_max`.
    #[error("a key's memo table grew past {memo_bytes_max} bytes")]
    MemoBytes {
        /// The limit.
        memo_bytes_max: usize,
    },
    /// The check ran for `time_max`.
    #[error("the check ran for more than {time_max:?}")]
    Time {
        /// The limit.
        time_max: Duration,
    },
}

/// Why a key's history is not linearizable: the longest linearizable prefix
/// the search found, and the operation it could not fit in after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The longest sequence of operations the search could linearize, in
    /// linearization order.
    pub longest_prefix: Vec<OpId>,
    /// The register's value after that prefix; `None` when absent.
    pub value_after_prefix: Option<Bytes>,
    /// An operation that must take effect before it returns, and that no
    /// extension of the prefix lets take effect in time.
    pub blocked: OpId,
    /// Operations not in the prefix that were invoked before `blocked`
    /// returned: the other candidates for the next place.
    pub concurrent: Vec<OpId>,
    /// A readable account of the above, with the operations spelled out.
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explanation)
    }
}

/// The answer of a linearizability check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's history is linearizable.
    Linearizable,
    /// This key's history is not linearizable.
    NotLinearizable {
        /// The key whose history has no linearization.
        key: Bytes,
        /// What the search found.
        violation: Violation,
    },
    /// The budget ran out before these keys were decided; no key checked
    /// was found not linearizable.
    Unknown {
        /// The keys left undecided, in key order.
        keys: Vec<Bytes>,
        /// The first limit that was hit.
        exceeded: BudgetExceeded,
    },
}

/// The result of [`check_history`], with figures about the work done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The answer.
    pub verdict: Verdict,
    /// Keys whose search finished (passed or failed).
    pub keys_decided: usize,
    /// Operations searched over (unknown-outcome reads are left out: they
    /// constrain nothing).
    pub ops_checked: usize,
    /// Distinct (linearized set, state) pairs explored, over all keys.
    pub states_explored: u64,
    /// Wall-clock time the check took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Linearizable => write!(f, "linearizable")?,
            Verdict::NotLinearizable { key, violation } => {
                write!(f, "not linearizable on key {key:?}: {violation}")?
            }
            Verdict::Unknown { keys, exceeded } => {
                write!(f, "unknown: {exceeded}; {} key(s) undecided", keys.len())?
            }
        }
        write!(
            f,
            " ({} ops, {} keys decided, {} states, {:?})",
            self.ops_checked, self.keys_decided, self.states_explored, self.elapsed
        )
    }
}

/// Checks whether `history` is linearizable for a key-value store whose keys
/// start absent, within `budget`.
pub fn check_history(history: &History, budget: Budget) -> Report {
    let started = Instant::now();
    let limits = SearchLimits {
        states_max: budget.states_per_key_max,
        memo_bytes_max: budget.memo_bytes_max,
        deadline: started.checked_add(budget.time_max).unwrap_or(started),
    };
    let mut by_key: BTreeMap<&Bytes, Vec<OpId>> = BTreeMap::new();
    for (i, op) in history.ops().iter().enumerate() {
        by_key.entry(&op.key).or_default().push(OpId(i));
    }
    let mut report = Report {
        verdict: Verdict::Linearizable,
        keys_decided: 0,
        ops_checked: 0,
        states_explored: 0,
        elapsed: Duration::ZERO,
    };
    let mut undecided: Vec<Bytes> = Vec::new();
    let mut exceeded: Option<BudgetExceeded> = None;
    let mut out_of_time = false;
    for (key, ids) in &by_key {
        if out_of_time {
            undecided.push((*key).clone());
            continue;
        }
        let kh = KeyHistory::new(ids.iter().map(|&id| (id, &history.ops()[id.0])));
        report.ops_checked += kh.len();
        let (result, states) = search(&kh, &limits);
        report.states_explored += states;
        match result {
            SearchResult::Linearizable => report.keys_decided += 1,
            SearchResult::NotLinearizable(deepest) => {
                report.keys_decided += 1;
                let prefix: Vec<usize> = deepest.prefix;
                let blocked = deepest.blocked;
                // Candidates: not yet linearized, invoked before `blocked` returned.
                let blocked_return = kh.return_at(blocked).unwrap_or(u64::MAX);
                let mut in_prefix = vec![false; kh.len()];
                for &i in &prefix {
                    in_prefix[i] = true;
                }
                let concurrent: Vec<OpId> = (0..kh.len())
                    .filter(|&i| i != blocked && !in_prefix[i])
                    .filter(|&i| kh.invoke_at(i) <= blocked_return)
                    .map(|i| kh.id(i))
                    .collect();
                let violation = explain(
                    history,
                    prefix.iter().map(|&i| kh.id(i)).collect(),
                    kh.value(deepest.state),
                    kh.id(blocked),
                    concurrent,
                );
                report.verdict = Verdict::NotLinearizable {
                    key: (*key).clone(),
                    violation,
                };
                report.elapsed = started.elapsed();
                return report;
            }
            SearchResult::Exceeded(hit) => {
                undecided.push((*key).clone());
                exceeded.get_or_insert(match hit {
                    LimitHit::States => BudgetExceeded::States {
                        states_per_key_max: budget.states_per_key_max,
                    },
                    LimitHit::MemoBytes => BudgetExceeded::MemoBytes {
                        memo_bytes_max: budget.memo_bytes_max,
                    },
                    LimitHit::Time => BudgetExceeded::Time {
                        time_max: budget.time_max,
                    },
                });
                out_of_time |= hit == LimitHit::Time;
            }
        }
    }
    if let Some(exceeded) = exceeded {
        report.verdict = Verdict::Unknown {
            keys: undecided,
            exceeded,
        };
    }
    report.elapsed = started.elapsed();
    report
}

/// Builds a [`Violation`] with its readable explanation.
fn explain(
    history: &History,
    longest_prefix: Vec<OpId>,
    value_after_prefix: Option<Bytes>,
    blocked: OpId,
    concurrent: Vec<OpId>,
) -> Violation {
    let show = |id: OpId| match history.get(id) {
        Some(op) => format!("{id} {op}"),
        None => id.to_string(),
    };
    let list = |ids: &[OpId]| -> String {
        let shown: Vec<String> = ids.iter().map(|&i| show(i)).collect();
        shown.join("; ")
    };
    let mut text = format!(
        "the longest linearizable prefix has {} op(s)",
        longest_prefix.len()
    );
    if !longest_prefix.is_empty() {
        let skip = longest_prefix.len().saturating_sub(EXPLAIN_OPS_MAX);
        let _ = write!(
            text,
            " ({}{})",
            if skip > 0 { "ending " } else { "" },
            list(&longest_prefix[skip..])
        );
    }
    let _ = write!(
        text,
        ", leaving the key {}; no extension of it lets {} take effect before its response",
        DisplayValue(&value_after_prefix),
        show(blocked)
    );
    if !concurrent.is_empty() {
        let shown = concurrent.len().min(EXPLAIN_OPS_MAX);
        let _ = write!(
            text,
            "; other ops invoked by then: {}{}",
            list(&concurrent[..shown]),
            if concurrent.len() > shown {
                "; ..."
            } else {
                ""
            }
        );
    }
    Violation {
        longest_prefix,
        value_after_prefix,
        blocked,
        concurrent,
        explanation: text,
    }
}

#[cfg(test)]
mod tests {
    use super::super::history::{HistoryOp, Op, Outcome, Ret};
    use super::*;

    const K: &[u8] = b"k";

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// A small language for hand-made histories on key `k`.
    #[derive(Default)]
    struct H(History);

    impl H {
        fn add(mut self, key: &[u8], op: Op, outcome: Outcome, t: (u64, u64)) -> Self {
            let op = HistoryOp {
                client: self.0.len() as u64,
                key: Bytes::copy_from_slice(key),
                op,
                invoke_at: t.0,
                complete_at: t.1,
                outcome,
            };
            self.0.push(op).unwrap();
            self
        }
        fn write(self, v: &str, t: (u64, u64)) -> Self {
            self.add(K, Op::Write(b(v)), Outcome::Ok(Ret::Write), t)
        }
        fn write_unknown(self, v: &str, t: (u64, u64)) -> Self {
            self.add(K, Op::Write(b(v)), Outcome::Unknown, t)
        }
        fn read(self, v: Option<&str>, t: (u64, u64)) -> Self {
            self.add(K, Op::Read, Outcome::Ok(Ret::Read(v.map(b))), t)
        }
        fn cas(self, e: Option<&str>, n: &str, swapped: Option<bool>, t: (u64, u64)) -> Self {
            let op = Op::Cas {
                expected: e.map(b),
                new: Some(b(n)),
            };
            let outcome = match swapped {
                Some(swapped) => Outcome::Ok(Ret::Cas { swapped }),
                None => Outcome::Unknown,
            };
            self.add(K, op, outcome, t)
        }
        fn delete(self, existed: Option<bool>, t: (u64, u64)) -> Self {
            self.add(K, Op::Delete, Outcome::Ok(Ret::Delete { existed }), t)
        }
        fn check(&self) -> Report {
            check_history(&self.0, Budget::default())
        }
        fn assert_linearizable(self) {
            let r = self.check();
            assert!(r.is_linearizable(), "{r}");
        }
        fn assert_violation(self) -> Violation {
            match self.check().verdict {
                Verdict::NotLinearizable { violation, .. } => violation,
                other => panic!("expected a violation, got {other:?}"),
            }
        }
    }

    #[test]
    fn empty_and_sequential_histories_pass() {
        H::default().assert_linearizable();
        H::default()
            .read(None, (0, 1))
            .write("1", (2, 3))
            .read(Some("1"), (4, 5))
            .cas(Some("1"), "2", Some(true), (6, 7))
            .cas(Some("1"), "3", Some(false), (8, 9))
            .read(Some("2"), (10, 11))
            .delete(Some(true), (12, 13))
            .delete(Some(false), (14, 15))
            .read(None, (16, 17))
            .assert_linearizable();
    }

    #[test]
    fn stale_read_after_acknowledged_write_fails() {
        let v = H::default()
            .write("1", (0, 1))
            .write("2", (2, 3))
            .read(Some("1"), (4, 5))
            .assert_violation();
        assert_eq!(v.longest_prefix, vec![OpId(0), OpId(1)]);
        assert_eq!(v.value_after_prefix, Some(b("2")));
        assert_eq!(v.blocked, OpId(2));
        assert!(
            v.explanation.contains("client 2 read [4, 5] read b\"1\""),
            "{v}"
        );
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        H::default()
            .write("1", (0, 1))
            .read(None, (2, 3))
            .assert_violation();
    }

    #[test]
    fn read_of_value_never_written_fails() {
        H::default().read(Some("9"), (0, 1)).assert_violation();
    }

    #[test]
    fn two_cas_from_absent_cannot_both_succeed() {
        H::default()
            .cas(None, "1", Some(true), (0, 10))
            .cas(None, "2", Some(true), (1, 9))
            .assert_violation();
    }

    #[test]
    fn cas_that_failed_although_value_matched_fails() {
        H::default()
            .write("1", (0, 1))
            .cas(Some("1"), "2", Some(false), (2, 3))
            .assert_violation();
    }

    #[test]
    fn swapped_cas_not_visible_to_later_read_fails() {
        H::default()
            .write("1", (0, 1))
            .cas(Some("1"), "2", Some(true), (2, 3))
            .read(Some("1"), (4, 5))
            .assert_violation();
    }

    #[test]
    fn concurrent_cas_may_fail_or_succeed() {
        // The write of 1 overlaps the CAS: the CAS may come before it (fail).
        H::default()
            .write("1", (0, 10))
            .cas(Some("1"), "2", Some(false), (1, 2))
            .read(Some("1"), (11, 12))
            .assert_linearizable();
        // ... or after it (swap).
        H::default()
            .write("1", (0, 10))
            .cas(Some("1"), "2", Some(true), (1, 2))
            .read(Some("2"), (11, 12))
            .assert_linearizable();
    }

    #[test]
    fn delete_must_report_existence_correctly() {
        H::default()
            .write("1", (0, 1))
            .delete(Some(false), (2, 3))
            .assert_violation();
        H::default()
            .write("1", (0, 1))
            .delete(None, (2, 3))
            .read(Some("1"), (4, 5))
            .assert_violation();
    }

    #[test]
    fn unknown_write_that_appears_later_passes() {
        H::default()
            .write_unknown("1", (0, 1))
            .read(None, (2, 3))
            .read(Some("1"), (4, 5))
            .read(Some("1"), (6, 7))
            .assert_linearizable();
    }

    #[test]
    fn unknown_write_that_never_appears_passes() {
        H::default()
            .write_unknown("1", (0, 1))
            .read(None, (2, 3))
            .write("2", (4, 5))
            .read(Some("2"), (6, 7))
            .assert_linearizable();
    }

    #[test]
    fn unknown_write_seen_before_its_invocation_fails() {
        H::default()
            .read(Some("1"), (0, 1))
            .write_unknown("1", (2, 3))
            .assert_violation();
    }

    #[test]
    fn unknown_write_that_appears_then_vanishes_fails() {
        H::default()
            .write_unknown("1", (0, 1))
            .read(Some("1"), (2, 3))
            .read(None, (4, 5))
            .assert_violation();
    }

    #[test]
    fn unknown_cas_may_take_effect_late() {
        H::default()
            .write("1", (0, 1))
            .cas(Some("1"), "2", None, (2, 3))
            .read(Some("1"), (4, 5))
            .read(Some("2"), (6, 7))
            .assert_linearizable();
    }

    #[test]
    fn concurrent_overlapping_ops_pass() {
        H::default()
            .write("1", (0, 10))
            .write("2", (1, 9))
            .read(Some("2"), (2, 3))
            .read(Some("1"), (4, 5))
            .read(Some("1"), (11, 12))
            .assert_linearizable();
    }

    #[test]
    fn reads_cannot_go_back_in_time() {
        let v = H::default()
            .write("1", (0, 10))
            .read(Some("1"), (1, 2))
            .read(None, (3, 4))
            .assert_violation();
        assert_eq!(v.blocked, OpId(2));
        assert_eq!(v.concurrent, Vec::<OpId>::new());
    }

    #[test]
    fn touching_intervals_are_concurrent() {
        H::default()
            .write("1", (0, 5))
            .read(None, (5, 6))
            .assert_linearizable();
    }

    #[test]
    fn keys_are_checked_independently() {
        let h = H::default()
            .add(b"a", Op::Write(b("1")), Outcome::Ok(Ret::Write), (0, 1))
            .add(b"b", Op::Read, Outcome::Ok(Ret::Read(None)), (2, 3))
            .add(b"b", Op::Write(b("2")), Outcome::Ok(Ret::Write), (4, 5))
            .add(b"a", Op::Read, Outcome::Ok(Ret::Read(Some(b("1")))), (6, 7))
            .add(b"b", Op::Read, Outcome::Ok(Ret::Read(Some(b("1")))), (8, 9));
        let r = h.check();
        match r.verdict {
            Verdict::NotLinearizable { key, violation } => {
                assert_eq!(key, b("b"));
                assert_eq!(violation.blocked, OpId(4));
            }
            other => panic!("expected a violation on b, got {other:?}"),
        }
    }

    /// Many writers overlapping one read that sees none of their values.
    fn wide_history() -> H {
        let mut h = H::default();
        for i in 0..12 {
            h = h.write(&i.to_string(), (i, 100));
        }
        h.read(Some("x"), (50, 60))
    }

    #[test]
    fn exhausted_state_budget_gives_unknown() {
        let budget = Budget {
            states_per_key_max: 100,
            ..Budget::default()
        };
        let r = check_history(&wide_history().0, budget);
        assert_eq!(
            r.verdict,
            Verdict::Unknown {
                keys: vec![Bytes::from_static(K)],
                exceeded: BudgetExceeded::States {
                    states_per_key_max: 100
                }
            }
        );
        // With the default budget the search finishes.
        wide_history().assert_violation();
    }

    #[test]
    fn exhausted_memo_budget_gives_unknown() {
        let budget = Budget {
            memo_bytes_max: 1_000,
            ..Budget::default()
        };
        let r = check_history(&wide_history().0, budget);
        assert!(matches!(
            r.verdict,
            Verdict::Unknown {
                exceeded: BudgetExceeded::MemoBytes { .. },
                ..
            }
        ));
    }

    #[test]
    fn exhausted_time_budget_gives_unknown_for_every_key() {
        let h = H::default()
            .add(b"a", Op::Read, Outcome::Ok(Ret::Read(None)), (0, 1))
            .add(b"b", Op::Read, Outcome::Ok(Ret::Read(None)), (0, 1));
        let budget = Budget {
            time_max: Duration::ZERO,
            ..Budget::default()
        };
        let r = check_history(&h.0, budget);
        assert_eq!(
            r.verdict,
            Verdict::Unknown {
                keys: vec![b("a"), b("b")],
                exceeded: BudgetExceeded::Time {
                    time_max: Duration::ZERO
                }
            }
        );
        assert_eq!(r.keys_decided, 0);
    }

    #[test]
    fn violation_beats_undecided_keys() {
        let mut h = wide_history();
        h = h
            .add(b"z", Op::Write(b("1")), Outcome::Ok(Ret::Write), (0, 1))
            .add(b"z", Op::Read, Outcome::Ok(Ret::Read(None)), (2, 3));
        let budget = Budget {
            states_per_key_max: 100,
            ..Budget::default()
        };
        let r = check_history(&h.0, budget);
        assert!(
            matches!(&r.verdict, Verdict::NotLinearizable { key, .. } if key == &b("z")),
            "{r}"
        );
    }

    #[test]
    fn report_display_summarises() {
        let r = H::default().write("1", (0, 1)).check();
        let s = r.to_string();
        assert!(
            s.starts_with("linearizable (1 ops, 1 keys decided, 1 states"),
            "{s}"
        );
    }
}
