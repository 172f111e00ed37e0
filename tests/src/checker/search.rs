//! The linearizability search for one key: a Wing–Gong–Lowe search over the
//! key's call and return events, with the memoisation of (linearized set,
//! register state) pairs that Porcupine adds.
//!
//! The events are kept in a doubly linked list ordered by time. The search
//! walks it from the front: at a call event it tries to linearize that
//! operation next (apply it to the register model); if the model accepts and
//! the resulting (set of linearized operations, state) pair is new, the
//! operation's call and return events are lifted out of the list and the walk
//! restarts from the front. Reaching a return event means that operation had
//! to be linearized before everything after it, and was not: the search
//! backtracks, undoing the most recent linearization and trying the next
//! candidate after it. The history is linearizable when every operation with
//! a known result has been linearized; operations with an unknown outcome
//! return at +infinity, so the ones still left can all take effect at the end
//! (or never, which for a register is the same).
//!
//! Register states and values are interned as small integers (0 = absent) so
//! that memo entries are a bitset and a `u32`.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;

use super::history::{HistoryOp, Op, OpId, Outcome, Ret};

/// The interned state "key absent".
const ABSENT: u32 = 0;
/// Marks the end of the event list.
const NIL: usize = usize::MAX;
/// The event list's head sentinel.
const HEAD: usize = 0;
/// How many search steps run between two looks at the clock.
const CLOCK_CHECK_STEPS: u64 = 1024;
/// The estimated bytes one memo entry costs beside its bitset words (hash
/// set slot, vector header, allocator overhead).
const MEMO_ENTRY_OVERHEAD_BYTES: usize = 64;

/// A register operation with interned values, and what it must return:
/// `None` where the result is unknown and any result is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Read(Option<u32>),
    Write(u32),
    Cas {
        expected: u32,
        new: u32,
        swapped: Option<bool>,
    },
    Delete {
        existed: Option<bool>,
    },
}

impl Step {
    /// The register state after applying this step to `state`, or `None`
    /// when the step's recorded result is impossible in `state`.
    fn apply(&self, state: u32) -> Option<u32> {
        match *self {
            Step::Read(None) => Some(state),
            Step::Read(Some(v)) => (state == v).then_some(state),
            Step::Write(v) => Some(v),
            Step::Cas {
                expected,
                new,
                swapped,
            } => {
                let matches = state == expected;
                match swapped {
                    Some(s) if s != matches => None,
                    _ if matches => Some(new),
                    _ => Some(state),
                }
            }
            Step::Delete { existed } => match existed {
                Some(e) if e != (state != ABSENT) => None,
                _ => Some(ABSENT),
            },
        }
    }
}

/// One key's operations prepared for the search.
#[derive(Debug)]
pub(crate) struct KeyHistory {
    /// The history ids of the operations, by local index.
    ids: Vec<OpId>,
    steps: Vec<Step>,
    invoke_at: Vec<u64>,
    /// `None` for operations with an unknown outcome (return at +infinity).
    return_at: Vec<Option<u64>>,
    /// Interned values: state `i > 0` is `values[i - 1]`.
    values: Vec<Bytes>,
}

impl KeyHistory {
    /// Prepares `ops` (all on one key). Reads with an unknown outcome are
    /// left out: they change nothing and constrain nothing.
    pub(crate) fn new<'a>(ops: impl IntoIterator<Item = (OpId, &'a HistoryOp)>) -> Self {
        let mut kh = KeyHistory {
            ids: Vec::new(),
            steps: Vec::new(),
            invoke_at: Vec::new(),
            return_at: Vec::new(),
            values: Vec::new(),
        };
        let mut interned: HashMap<Bytes, u32> = HashMap::new();
        let mut intern = |v: &Option<Bytes>, values: &mut Vec<Bytes>| -> u32 {
            match v {
                None => ABSENT,
                Some(b) => *interned.entry(b.clone()).or_insert_with(|| {
                    values.push(b.clone());
                    u32::try_from(values.len()).unwrap_or(u32::MAX)
                }),
            }
        };
        for (id, op) in ops {
            let ret = match &op.outcome {
                Outcome::Ok(r) => Some(r),
                Outcome::Unknown => None,
            };
            let step = match (&op.op, ret) {
                (Op::Read, None) => continue,
                (Op::Read, Some(Ret::Read(v))) => Step::Read(Some(intern(v, &mut kh.values))),
                (Op::Write(v), _) => Step::Write(intern(&Some(v.clone()), &mut kh.values)),
                (Op::Cas { expected, new }, r) => Step::Cas {
                    expected: intern(expected, &mut kh.values),
                    new: intern(new, &mut kh.values),
                    swapped: match r {
                        Some(Ret::Cas { swapped }) => Some(*swapped),
                        _ => None,
                    },
                },
                (Op::Delete, r) => Step::Delete {
                    existed: match r {
                        Some(Ret::Delete { existed }) => *existed,
                        _ => None,
                    },
                },
                // A result that does not fit its operation cannot get past
                // `History::push`; treat it as unknown rather than panic.
                (Op::Read, Some(_)) => Step::Read(None),
            };
            kh.ids.push(id);
            kh.steps.push(step);
            kh.invoke_at.push(op.invoke_at);
            kh.return_at.push(ret.map(|_| op.complete_at));
        }
        kh
    }

    /// The number of operations the search considers.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The history id of local operation `i`.
    pub(crate) fn id(&self, i: usize) -> OpId {
        self.ids[i]
    }

    /// The register value of interned state `s`.
    pub(crate) fn value(&self, s: u32) -> Option<Bytes> {
        if s == ABSENT {
            None
        } else {
            self.values.get(s as usize - 1).cloned()
        }
    }

    /// When local operation `i` returns; `None` for +infinity.
    pub(crate) fn return_at(&self, i: usize) -> Option<u64> {
        self.return_at[i]
    }

    /// When local operation `i` was invoked.
    pub(crate) fn invoke_at(&self, i: usize) -> u64 {
        self.invoke_at[i]
    }
}

/// The limits of one search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SearchLimits {
    pub(crate) states_max: u64,
    pub(crate) memo_bytes_max: usize,
    pub(crate) deadline: Instant,
}

/// Which limit stopped a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitHit {
    States,
    MemoBytes,
    Time,
}

/// The furthest the search got before failing: the longest prefix of
/// operations it could linearize, and the operation it then could not place
/// before that operation's return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deepest {
    /// Local indices of the linearized operations, in order.
    pub(crate) prefix: Vec<usize>,
    /// The interned register state after the prefix.
    pub(crate) state: u32,
    /// The local index of the operation that had to come next and could not.
    pub(crate) blocked: usize,
}

/// How a search ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SearchResult {
    Linearizable,
    NotLinearizable(Deepest),
    Exceeded(LimitHit),
}

/// A fixed-size set of local operation indices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bitset(Box<[u64]>);

impl Bitset {
    fn new(bits: usize) -> Self {
        Bitset(vec![0; bits.div_ceil(64)].into_boxed_slice())
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// The call and return events of one key, as a doubly linked list in time
/// order. Node 0 is the head; node `1 + 2i` and `2 + 2i` are the call and
/// return of operation `i`.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Events {
    fn new(kh: &KeyHistory) -> Self {
        let n = kh.len();
        // Order by time; at equal times calls first, so operations whose
        // intervals touch are concurrent; unknown returns (at +infinity)
        // after every known one.
        let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
        for i in 0..n {
            order.push((kh.invoke_at[i], 0, Self::call(i)));
            match kh.return_at[i] {
                Some(t) => order.push((t, 1, Self::ret(i))),
                None => order.push((u64::MAX, 2, Self::ret(i))),
            }
        }
        order.sort_unstable();
        let mut next = vec![NIL; 2 * n + 1];
        let mut prev = vec![NIL; 2 * n + 1];
        let mut last = HEAD;
        for &(_, _, node) in &order {
            next[last] = node;
            prev[node] = last;
            last = node;
        }
        Events { next, prev }
    }

    fn call(op: usize) -> usize {
        1 + 2 * op
    }

    fn ret(op: usize) -> usize {
        2 + 2 * op
    }

    fn is_call(node: usize) -> bool {
        node % 2 == 1
    }

    fn op(node: usize) -> usize {
        (node - 1) / 2
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    /// Takes operation `op`'s call and return out of the list.
    fn lift(&mut self, op: usize) {
        self.unlink(Self::call(op));
        self.unlink(Self::ret(op));
    }

    /// Undoes the latest [`Events::lift`], which must be of `op`.
    fn unlift(&mut self, op: usize) {
        self.relink(Self::ret(op));
        self.relink(Self::call(op));
    }
}

/// Searches for a linearization of `kh` from the absent state. Returns the
/// result and the number of distinct (linearized set, state) pairs explored.
pub(crate) fn search(kh: &KeyHistory, limits: &SearchLimits) -> (SearchResult, u64) {
    let n = kh.len();
    let mut events = Events::new(kh);
    let mut known_left = kh.return_at.iter().filter(|r| r.is_some()).count();
    let memo_entry_bytes = n.div_ceil(64) * 8 + MEMO_ENTRY_OVERHEAD_BYTES;
    let mut memo: HashSet<(Bitset, u32)> = HashSet::new();
    let mut linearized = Bitset::new(n);
    // The linearized operations in order, with the state before each.
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut state = ABSENT;
    let mut deepest: Option<Deepest> = None;
    let mut steps: u64 = 0;
    let mut node = events.next[HEAD];
    loop {
        if known_left == 0 {
            return (SearchResult::Linearizable, memo.len() as u64);
        }
        if steps.is_multiple_of(CLOCK_CHECK_STEPS) && Instant::now() >= limits.deadline {
            return (SearchResult::Exceeded(LimitHit::Time), memo.len() as u64);
        }
        steps += 1;
        // While a known operation is left, its return is in the list ahead
        // of every unknown return, so the walk meets a return before the end.
        assert_ne!(
            node, NIL,
            "linearizability search walked off the event list"
        );
        if Events::is_call(node) {
            let op = Events::op(node);
            if let Some(after) = kh.steps[op].apply(state) {
                linearized.set(op);
                if memo.insert((linearized.clone(), after)) {
                    if memo.len() as u64 > limits.states_max {
                        return (SearchResult::Exceeded(LimitHit::States), memo.len() as u64);
                    }
                    if memo.len().saturating_mul(memo_entry_bytes) > limits.memo_bytes_max {
                        return (
                            SearchResult::Exceeded(LimitHit::MemoBytes),
                            memo.len() as u64,
                        );
                    }
                    stack.push((op, state));
                    state = after;
                    if kh.return_at[op].is_some() {
                        known_left -= 1;
                    }
                    events.lift(op);
                    node = events.next[HEAD];
                    continue;
                }
                linearized.clear(op);
            }
            node = events.next[node];
        } else {
            if deepest
                .as_ref()
                .is_none_or(|d| stack.len() > d.prefix.len())
            {
                deepest = Some(Deepest {
                    prefix: stack.iter().map(|&(op, _)| op).collect(),
                    state,
                    blocked: Events::op(node),
                });
            }
            let Some((op, before)) = stack.pop() else {
                let deepest = deepest.unwrap_or(Deepest {
                    prefix: Vec::new(),
                    state: ABSENT,
                    blocked: Events::op(node),
                });
                return (SearchResult::NotLinearizable(deepest), memo.len() as u64);
            };
            linearized.clear(op);
            state = before;
            if kh.return_at[op].is_some() {
                known_left += 1;
            }
            events.unlift(op);
            node = events.next[Events::call(op)];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> SearchLimits {
        SearchLimits {
            states_max: 1_000_000,
            memo_bytes_max: 1 << 30,
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn steps_follow_register_semantics() {
        let cas = |expected, new, swapped| Step::Cas {
            expected,
            new,
            swapped,
        };
        assert_eq!(Step::Read(Some(1)).apply(1), Some(1));
        assert_eq!(Step::Read(Some(1)).apply(2), None);
        assert_eq!(Step::Write(3).apply(ABSENT), Some(3));
        assert_eq!(cas(1, 2, Some(true)).apply(1), Some(2));
        assert_eq!(cas(1, 2, Some(true)).apply(3), None);
        assert_eq!(cas(1, 2, Some(false)).apply(3), Some(3));
        assert_eq!(cas(1, 2, Some(false)).apply(1), None);
        assert_eq!(cas(1, 2, None).apply(1), Some(2));
        assert_eq!(cas(1, 2, None).apply(3), Some(3));
        let del = |existed| Step::Delete { existed };
        assert_eq!(del(Some(true)).apply(1), Some(ABSENT));
        assert_eq!(del(Some(true)).apply(ABSENT), None);
        assert_eq!(del(Some(false)).apply(1), None);
        assert_eq!(del(Some(false)).apply(ABSENT), Some(ABSENT));
        assert_eq!(del(None).apply(1), Some(ABSENT));
    }

    #[test]
    fn values_are_interned_once() {
        let k = Bytes::from_static(b"k");
        let ops = [
            HistoryOp::ok(1, k.clone(), Op::Write("a".into()), Ret::Write, 1, 2),
            HistoryOp::ok(1, k.clone(), Op::Read, Ret::Read(Some("a".into())), 3, 4),
            HistoryOp::unknown(2, k.clone(), Op::Read, 3, 4),
        ];
        let kh = KeyHistory::new(ops.iter().enumerate().map(|(i, o)| (OpId(i), o)));
        assert_eq!(kh.len(), 2, "the unknown read is left out");
        assert_eq!(kh.steps, vec![Step::Write(1), Step::Read(Some(1))]);
        assert_eq!(kh.value(1), Some("a".into()));
        assert_eq!(kh.value(ABSENT), None);
    }

    #[test]
    fn deepest_prefix_names_the_blocked_op() {
        let k = Bytes::from_static(b"k");
        let ops = [
            HistoryOp::ok(1, k.clone(), Op::Write("a".into()), Ret::Write, 1, 2),
            HistoryOp::ok(1, k.clone(), Op::Read, Ret::Read(None), 3, 4),
        ];
        let kh = KeyHistory::new(ops.iter().enumerate().map(|(i, o)| (OpId(i), o)));
        let (res, states) = search(&kh, &limits());
        assert_eq!(
            res,
            SearchResult::NotLinearizable(Deepest {
                prefix: vec![0],
                state: 1,
                blocked: 1
            })
        );
        assert_eq!(states, 1);
    }

    #[test]
    fn unlift_restores_the_list() {
        let k = Bytes::from_static(b"k");
        let ops = [
            HistoryOp::ok(1, k.clone(), Op::Write("a".into()), Ret::Write, 1, 5),
            HistoryOp::ok(2, k.clone(), Op::Write("b".into()), Ret::Write, 2, 3),
            HistoryOp::unknown(3, k.clone(), Op::Delete, 4, 6),
        ];
        let kh = KeyHistory::new(ops.iter().enumerate().map(|(i, o)| (OpId(i), o)));
        let mut ev = Events::new(&kh);
        let walk = |ev: &Events| {
            let mut out = Vec::new();
            let mut n = ev.next[HEAD];
            while n != NIL {
                out.push(n);
                n = ev.next[n];
            }
            out
        };
        let before = walk(&ev);
        assert_eq!(before, vec![1, 3, 4, 5, 2, 6]);
        ev.lift(1);
        assert_eq!(walk(&ev), vec![1, 5, 2, 6]);
        ev.lift(0);
        assert_eq!(walk(&ev), vec![5, 6]);
        ev.unlift(0);
        ev.unlift(1);
        assert_eq!(walk(&ev), before);
    }
}
