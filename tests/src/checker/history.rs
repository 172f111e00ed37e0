//! [`History`]: what clients invoked against the store and what they saw
//! come back, with the times of both, ready for the linearizability checker.
//!
//! A history is built in one of two ways:
//!
//! - [`HistoryRecorder`] for real runs: many clients (threads or async tasks)
//!   share one recorder, call [`HistoryRecorder::invoke`] right before sending
//!   a request and [`HistoryRecorder::complete`] right after its answer. The
//!   recorder stamps both events with a logical clock under a mutex, so the
//!   stamps agree with the real-time order of those calls and never tie.
//! - [`History::push`] for simulations and hand-made tests, with explicit
//!   times in any unit (nanoseconds, simulated ticks).
//!
//! Which outcome to record:
//!
//! - [`Outcome::Ok`] when the store answered: reads with what they read, CAS
//!   with whether it swapped (a failed compare is an answer, not an error).
//! - [`Outcome::Unknown`] when the client cannot tell whether the operation
//!   took effect (timeout, connection lost, `is_outcome_unknown()` errors).
//!   The checker lets it take effect at any time after its invocation, or
//!   never.
//! - Nothing at all when the operation definitely did not happen (refused by
//!   validation, rejected before being proposed): drop it with
//!   [`HistoryRecorder::discard`], or do not push it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

/// Most operations one history may hold. The checker's memory and time grow
/// with it; a run that needs more should check shorter windows.
pub const HISTORY_OPS_MAX: usize = 1 << 20;

/// What was invoked on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read the key's value.
    Read,
    /// Set the key to a value.
    Write(Bytes),
    /// Set the key to `new` (delete it when `None`) if its value equals
    /// `expected` (`None`: the key is absent).
    Cas {
        /// The value the key must hold for the swap to happen.
        expected: Option<Bytes>,
        /// The value the key holds after a successful swap.
        new: Option<Bytes>,
    },
    /// Remove the key.
    Delete,
}

/// What an operation returned, when the client saw an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ret {
    /// The value a [`Op::Read`] saw; `None` when the key was absent.
    Read(Option<Bytes>),
    /// A [`Op::Write`] was acknowledged.
    Write,
    /// A [`Op::Cas`] answered; `swapped` is false when the compare failed.
    Cas {
        /// Whether the swap happened.
        swapped: bool,
    },
    /// A [`Op::Delete`] was acknowledged. `existed` is whether the key was
    /// present, or `None` when the client did not learn it (then any answer
    /// is consistent).
    Delete {
        /// Whether the deleted key was present, when known.
        existed: Option<bool>,
    },
}

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The store answered with this result.
    Ok(Ret),
    /// The client gave up without knowing whether the operation took effect.
    /// It may take effect at any time after its invocation, even after the
    /// client gave up, or never.
    Unknown,
}

/// The position of an operation in [`History::ops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub usize);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One operation of a history: who did what to which key, when, and how it
/// ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryOp {
    /// The client (process, thread, task) that issued it; only for reports.
    pub client: u64,
    /// The key it acted on.
    pub key: Bytes,
    /// What was invoked.
    pub op: Op,
    /// When it was invoked.
    pub invoke_at: u64,
    /// When the client got its answer or gave up; at least `invoke_at`.
    /// Operations whose intervals touch (one completes at the time another
    /// is invoked) count as concurrent.
    pub complete_at: u64,
    /// How it ended.
    pub outcome: Outcome,
}

impl HistoryOp {
    /// An operation that completed with result `ret`.
    pub fn ok(
        client: u64,
        key: impl Into<Bytes>,
        op: Op,
        ret: Ret,
        invoke_at: u64,
        complete_at: u64,
    ) -> Self {
        HistoryOp {
            client,
            key: key.into(),
            op,
            invoke_at,
            complete_at,
            outcome: Outcome::Ok(ret),
        }
    }

    /// An operation whose outcome the client does not know; `complete_at` is
    /// when it gave up.
    pub fn unknown(
        client: u64,
        key: impl Into<Bytes>,
        op: Op,
        invoke_at: u64,
        complete_at: u64,
    ) -> Self {
        HistoryOp {
            client,
            key: key.into(),
            op,
            invoke_at,
            complete_at,
            outcome: Outcome::Unknown,
        }
    }
}

impl fmt::Display for HistoryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} ", self.client)?;
        match &self.op {
            Op::Read => write!(f, "read")?,
            Op::Write(v) => write!(f, "write({v:?})")?,
            Op::Cas { expected, new } => write!(
                f,
                "cas({} -> {})",
                DisplayValue(expected),
                DisplayValue(new)
            )?,
            Op::Delete => write!(f, "delete")?,
        }
        write!(f, " [{}, {}] ", self.invoke_at, self.complete_at)?;
        match &self.outcome {
            Outcome::Unknown => write!(f, "unknown"),
            Outcome::Ok(Ret::Read(v)) => write!(f, "read {}", DisplayValue(v)),
            Outcome::Ok(Ret::Write) => write!(f, "ok"),
            Outcome::Ok(Ret::Cas { swapped: true }) => write!(f, "swapped"),
            Outcome::Ok(Ret::Cas { swapped: false }) => write!(f, "compare failed"),
            Outcome::Ok(Ret::Delete {
                existed: Some(true),
            }) => write!(f, "deleted"),
            Outcome::Ok(Ret::Delete {
                existed: Some(false),
            }) => write!(f, "was absent"),
            Outcome::Ok(Ret::Delete { existed: None }) => write!(f, "ok"),
        }
    }
}

/// Shows a register value: the bytes, or `absent`.
pub(crate) struct DisplayValue<'a>(pub &'a Option<Bytes>);

impl fmt::Display for DisplayValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => write!(f, "absent"),
        }
    }
}

/// Why an operation could not be added to a history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The history already holds [`HISTORY_OPS_MAX`] operations.
    #[error("history is full: at most {ops_max} operations")]
    TooManyOps {
        /// The limit that was reached.
        ops_max: usize,
    },
    /// The result does not belong to the operation (a read answered by a
    /// write acknowledgement).
    #[error("result {ret:?} does not answer operation {op:?}")]
    ResultMismatch {
        /// The operation.
        op: Op,
        /// The result given for it.
        ret: Ret,
    },
    /// An operation completed before it was invoked.
    #[error("operation completes at {complete_at}, before its invocation at {invoke_at}")]
    CompletedBeforeInvoked {
        /// When it was invoked.
        invoke_at: u64,
        /// When it was said to complete.
        complete_at: u64,
    },
    /// The invocation was not issued by this recorder.
    #[error("no invocation {0:?} in this recorder")]
    NoSuchInvocation(Invocation),
    /// The invocation was already completed or discarded.
    #[error("invocation {0:?} was already completed or discarded")]
    AlreadyFinished(Invocation),
}

/// Checks that `ret` is a result `op` can have.
fn check_ret(op: &Op, ret: &Ret) -> Result<(), HistoryError> {
    let matches = matches!(
        (op, ret),
        (Op::Read, Ret::Read(_))
            | (Op::Write(_), Ret::Write)
            | (Op::Cas { .. }, Ret::Cas { .. })
            | (Op::Delete, Ret::Delete { .. })
    );
    if matches {
        Ok(())
    } else {
        Err(HistoryError::ResultMismatch {
            op: op.clone(),
            ret: ret.clone(),
        })
    }
}

/// A complete history of operations on many keys, in the order they were
/// added. Every operation has ended: with a result, or unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    ops: Vec<HistoryOp>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        History::default()
    }

    /// A recorder that builds a history from concurrent clients; see
    /// [`HistoryRecorder`].
    pub fn recorder() -> HistoryRecorder {
        HistoryRecorder::new()
    }

    /// Adds an operation after checking it is well formed: its result fits
    /// the operation and it does not complete before it is invoked.
    pub fn push(&mut self, op: HistoryOp) -> Result<OpId, HistoryError> {
        if self.ops.len() >= HISTORY_OPS_MAX {
            return Err(HistoryError::TooManyOps {
                ops_max: HISTORY_OPS_MAX,
            });
        }
        if op.complete_at < op.invoke_at {
            return Err(HistoryError::CompletedBeforeInvoked {
                invoke_at: op.invoke_at,
                complete_at: op.complete_at,
            });
        }
        if let Outcome::Ok(ret) = &op.outcome {
            check_ret(&op.op, ret)?;
        }
        self.ops.push(op);
        Ok(OpId(self.ops.len() - 1))
    }

    /// All operations; an operation's [`OpId`] is its index here.
    pub fn ops(&self) -> &[HistoryOp] {
        &self.ops
    }

    /// The operation with this id.
    pub fn get(&self, id: OpId) -> Option<&HistoryOp> {
        self.ops.get(id.0)
    }

    /// The number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the history has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The keys the history touches, in order.
    pub fn keys(&self) -> BTreeSet<Bytes> {
        self.ops.iter().map(|o| o.key.clone()).collect()
    }
}

/// A handle on an operation a [`HistoryRecorder`] saw invoked and not yet
/// completed. It is not an [`OpId`]: discarded operations leave the history,
/// so ids are assigned by [`HistoryRecorder::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "complete or discard the invocation, or it is recorded as unknown"]
pub struct Invocation(usize);

/// Records a history from many concurrent clients. Cloning gives another
/// handle on the same history, one per client task. The lock is held only
/// for a few field updates, never across an `.await`, so it is safe to use
/// from async code.
#[derive(Debug, Clone, Default)]
pub struct HistoryRecorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Debug, Default)]
struct RecorderState {
    /// The logical clock: the stamp of the last event.
    clock: u64,
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    client: u64,
    key: Bytes,
    op: Op,
    invoke_at: u64,
    end: SlotEnd,
}

#[derive(Debug)]
enum SlotEnd {
    Pending,
    Completed { complete_at: u64, outcome: Outcome },
    Discarded,
}

impl HistoryRecorder {
    /// A recorder with an empty history.
    pub fn new() -> Self {
        HistoryRecorder::default()
    }

    fn lock(&self) -> MutexGuard<'_, RecorderState> {
        // Every critical section leaves the state consistent, so a panic in
        // another client's task does not make it unusable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `client` is about to send `op` on `key`. Call it before
    /// the request leaves, so the invocation precedes any effect.
    pub fn invoke(
        &self,
        client: u64,
        key: impl Into<Bytes>,
        op: Op,
    ) -> Result<Invocation, HistoryError> {
        let mut st = self.lock();
        if st.slots.len() >= HISTORY_OPS_MAX {
            return Err(HistoryError::TooManyOps {
                ops_max: HISTORY_OPS_MAX,
            });
        }
        st.clock += 1;
        let slot = Slot {
            client,
            key: key.into(),
            op,
            invoke_at: st.clock,
            end: SlotEnd::Pending,
        };
        st.slots.push(slot);
        Ok(Invocation(st.slots.len() - 1))
    }

    /// Records how an invoked operation ended. Call it right after the answer
    /// arrives (or the client gives up, with [`Outcome::Unknown`]).
    pub fn complete(&self, inv: Invocation, outcome: Outcome) -> Result<(), HistoryError> {
        let mut st = self.lock();
        let clock = st.clock + 1;
        let slot = st
            .slots
            .get_mut(inv.0)
            .ok_or(HistoryError::NoSuchInvocation(inv))?;
        if !matches!(slot.end, SlotEnd::Pending) {
            return Err(HistoryError::AlreadyFinished(inv));
        }
        if let Outcome::Ok(ret) = &outcome {
            check_ret(&slot.op, ret)?;
        }
        slot.end = SlotEnd::Completed {
            complete_at: clock,
            outcome,
        };
        st.clock = clock;
        Ok(())
    }

    /// Drops an invoked operation that definitely did not take effect (the
    /// request was refused before anything was proposed). Operations that
    /// may have taken effect must be completed as [`Outcome::Unknown`].
    pub fn discard(&self, inv: Invocation) -> Result<(), HistoryError> {
        let mut st = self.lock();
        let slot = st
            .slots
            .get_mut(inv.0)
            .ok_or(HistoryError::NoSuchInvocation(inv))?;
        if !matches!(slot.end, SlotEnd::Pending) {
            return Err(HistoryError::AlreadyFinished(inv));
        }
        slot.end = SlotEnd::Discarded;
        Ok(())
    }

    /// The history recorded so far. Operations still pending count as
    /// [`Outcome::Unknown`], completing now; discarded ones are left out.
    /// Recording may go on afterwards.
    pub fn finish(&self) -> History {
        let st = self.lock();
        let now = st.clock;
        let ops = st
            .slots
            .iter()
            .filter_map(|s| {
                let (complete_at, outcome) = match &s.end {
                    SlotEnd::Pending => (now, Outcome::Unknown),
                    SlotEnd::Completed {
                        complete_at,
                        outcome,
                    } => (*complete_at, outcome.clone()),
                    SlotEnd::Discarded => return None,
                };
                Some(HistoryOp {
                    client: s.client,
                    key: s.key.clone(),
                    op: s.op.clone(),
                    invoke_at: s.invoke_at,
                    complete_at,
                    outcome,
                })
            })
            .collect();
        History { ops }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn push_checks_times_and_results() {
        let mut h = History::new();
        let id = h
            .push(HistoryOp::ok(1, v("k"), Op::Read, Ret::Read(None), 1, 2))
            .unwrap();
        assert_eq!(id, OpId(0));
        assert_eq!(
            h.push(HistoryOp::ok(1, v("k"), Op::Read, Ret::Write, 3, 4)),
            Err(HistoryError::ResultMismatch {
                op: Op::Read,
                ret: Ret::Write
            })
        );
        assert_eq!(
            h.push(HistoryOp::unknown(1, v("k"), Op::Delete, 5, 4)),
            Err(HistoryError::CompletedBeforeInvoked {
                invoke_at: 5,
                complete_at: 4
            })
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h.keys().into_iter().collect::<Vec<_>>(), vec![v("k")]);
    }

    #[test]
    fn recorder_stamps_events_in_call_order() {
        let rec = History::recorder();
        let a = rec.invoke(1, v("k"), Op::Write(v("1"))).unwrap();
        let b = rec.invoke(2, v("k"), Op::Read).unwrap();
        rec.complete(b, Outcome::Ok(Ret::Read(None))).unwrap();
        rec.complete(a, Outcome::Ok(Ret::Write)).unwrap();
        let h = rec.finish();
        let times: Vec<_> = h
            .ops()
            .iter()
            .map(|o| (o.invoke_at, o.complete_at))
            .collect();
        assert_eq!(times, vec![(1, 4), (2, 3)]);
    }

    #[test]
    fn recorder_refuses_double_completion_and_bad_results() {
        let rec = HistoryRecorder::new();
        let a = rec.invoke(1, v("k"), Op::Delete).unwrap();
        assert!(matches!(
            rec.complete(a, Outcome::Ok(Ret::Write)),
            Err(HistoryError::ResultMismatch { .. })
        ));
        rec.complete(a, Outcome::Unknown).unwrap();
        assert_eq!(
            rec.complete(a, Outcome::Unknown),
            Err(HistoryError::AlreadyFinished(a))
        );
        assert_eq!(rec.discard(a), Err(HistoryError::AlreadyFinished(a)));
        assert_eq!(
            rec.discard(Invocation(7)),
            Err(HistoryError::NoSuchInvocation(Invocation(7)))
        );
    }

    #[test]
    fn finish_drops_discarded_and_marks_pending_unknown() {
        let rec = HistoryRecorder::new();
        let a = rec.invoke(1, v("k"), Op::Write(v("1"))).unwrap();
        let b = rec.invoke(2, v("k"), Op::Write(v("2"))).unwrap();
        let _pending = rec.invoke(3, v("k"), Op::Read).unwrap();
        rec.discard(a).unwrap();
        rec.complete(b, Outcome::Ok(Ret::Write)).unwrap();
        let h = rec.finish();
        assert_eq!(h.len(), 2);
        assert_eq!(h.ops()[0].op, Op::Write(v("2")));
        assert_eq!(h.ops()[1].outcome, Outcome::Unknown);
        assert_eq!(h.ops()[1].complete_at, 4);
    }

    #[test]
    fn recorder_is_shared_by_threads() {
        let rec = HistoryRecorder::new();
        std::thread::scope(|s| {
            for client in 0..4 {
                let rec = rec.clone();
                s.spawn(move || {
                    for i in 0..50u8 {
                        let inv = rec.invoke(client, v("k"), Op::Write(vec![i].into()));
                        rec.complete(inv.unwrap(), Outcome::Ok(Ret::Write)).unwrap();
                    }
                });
            }
        });
        let h = rec.finish();
        assert_eq!(h.len(), 200);
        let mut stamps: Vec<u64> = h
            .ops()
            .iter()
            .flat_map(|o| [o.invoke_at, o.complete_at])
            .collect();
        stamps.sort_unstable();
        stamps.dedup();
        assert_eq!(stamps.len(), 400, "every event has its own stamp");
        assert!(h.ops().iter().all(|o| o.invoke_at < o.complete_at));
    }

    #[tokio::test]
    async fn recorder_is_shared_by_async_tasks() {
        let rec = HistoryRecorder::new();
        let mut tasks = Vec::new();
        for client in 0..3 {
            let rec = rec.clone();
            tasks.push(tokio::spawn(async move {
                let inv = rec.invoke(client, v("k"), Op::Read)?;
                tokio::task::yield_now().await;
                rec.complete(inv, Outcome::Ok(Ret::Read(None)))
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(rec.finish().len(), 3);
    }

    #[test]
    fn display_shows_op_times_and_outcome() {
        let op = HistoryOp::ok(
            2,
            v("k"),
            Op::Cas {
                expected: None,
                new: Some(v("1")),
            },
            Ret::Cas { swapped: false },
            10,
            12,
        );
        assert_eq!(
            op.to_string(),
            "client 2 cas(absent -> b\"1\") [10, 12] compare failed"
        );
    }
}
