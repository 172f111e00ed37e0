//! Cross-checks [`check_history`] against stateright's
//! `LinearizabilityTester`, an independent checker, on small random
//! histories of a two-key store.
//!
//! The histories come from a simulation of a correct store: clients invoke
//! operations, each takes effect at a random moment while it is in flight
//! (its linearization point), and returns later. Some clients give up on an
//! operation (unknown outcome) before or after it takes effect; one that gave
//! up before may still take effect later, or never. Such a client goes on
//! under a new identity, since stateright keeps the abandoned operation in
//! flight for good, which is exactly "may take effect any time, or never".
//! With `corrupt` on, some results are falsified and some acknowledged
//! writes are dropped, so that many histories are not linearizable.
//!
//! The simulation reads its choices from a byte tape that proptest
//! generates and shrinks: a failing case shrinks toward a short history.

use std::fmt::Write as _;

use bytes::Bytes;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use super::history::{History, HistoryOp, Op, Ret};
use super::linearizability::{check_history, Budget, Verdict};

/// The number of keys in the simulated store.
const KEYS: usize = 2;
/// Values are 1..=VALUES.
const VALUES: u8 = 3;

/// The simulated store, and the sequential specification stateright checks
/// against: each key a register, absent at the start.
#[derive(Debug, Clone, Default, PartialEq, Hash)]
struct KvSpec([Option<u8>; KEYS]);

#[derive(Debug, Clone, Copy, PartialEq)]
enum KvOp {
    Read(usize),
    Write(usize, u8),
    Cas(usize, Option<u8>, Option<u8>),
    Delete(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KvRet {
    Read(Option<u8>),
    Write,
    Cas(bool),
    Delete(bool),
}

impl SequentialSpec for KvSpec {
    type Op = KvOp;
    type Ret = KvRet;

    fn invoke(&mut self, op: &KvOp) -> KvRet {
        match *op {
            KvOp::Read(k) => KvRet::Read(self.0[k]),
            KvOp::Write(k, v) => {
                self.0[k] = Some(v);
                KvRet::Write
            }
            KvOp::Cas(k, expected, new) => {
                let swapped = self.0[k] == expected;
                if swapped {
                    self.0[k] = new;
                }
                KvRet::Cas(swapped)
            }
            KvOp::Delete(k) => KvRet::Delete(self.0[k].take().is_some()),
        }
    }
}

/// A source of choices: bytes from proptest, then zeros.
struct Tape<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Tape<'_> {
    /// A choice in `0..n`.
    fn pick(&mut self, n: usize) -> usize {
        let b = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        usize::from(b) % n.max(1)
    }

    /// True with probability about 1/n.
    fn one_in(&mut self, n: usize) -> bool {
        self.pick(n) == 0
    }

    fn value(&mut self) -> u8 {
        1 + self.pick(usize::from(VALUES)) as u8
    }

    fn maybe_value(&mut self) -> Option<u8> {
        match self.pick(usize::from(VALUES) + 1) {
            0 => None,
            v => Some(v as u8),
        }
    }
}

/// What a client saw of the run, in the order it happened.
#[derive(Debug, Clone, Copy)]
enum Event {
    Invoke(u64, KvOp),
    Return(u64, KvRet),
}

/// A generated history, in both checkers' forms.
#[derive(Debug)]
struct Generated {
    history: History,
    events: Vec<Event>,
    unknown_ops: usize,
}

#[derive(Debug)]
struct InFlight {
    thread: u64,
    op: KvOp,
    invoke_at: u64,
    /// The result, once the operation took effect (or was dropped as a lost
    /// write that still gets acknowledged).
    ret: Option<KvRet>,
}

fn key(k: usize) -> Bytes {
    Bytes::from(vec![b'a' + k as u8])
}

fn val(v: Option<u8>) -> Option<Bytes> {
    v.map(|v| Bytes::from(vec![b'0' + v]))
}

fn to_history_op(op: KvOp) -> (Bytes, Op) {
    match op {
        KvOp::Read(k) => (key(k), Op::Read),
        KvOp::Write(k, v) => (key(k), Op::Write(Bytes::from(vec![b'0' + v]))),
        KvOp::Cas(k, e, n) => (
            key(k),
            Op::Cas {
                expected: val(e),
                new: val(n),
            },
        ),
        KvOp::Delete(k) => (key(k), Op::Delete),
    }
}

fn to_ret(ret: KvRet) -> Ret {
    match ret {
        KvRet::Read(v) => Ret::Read(val(v)),
        KvRet::Write => Ret::Write,
        KvRet::Cas(swapped) => Ret::Cas { swapped },
        KvRet::Delete(existed) => Ret::Delete {
            existed: Some(existed),
        },
    }
}

/// Falsifies a result so that it disagrees with what the store did.
fn corrupt_ret(ret: KvRet, tape: &mut Tape<'_>) -> KvRet {
    match ret {
        KvRet::Read(v) => {
            let options = usize::from(VALUES) + 1;
            let now = v.map_or(0, usize::from);
            let other = (now + 1 + tape.pick(options - 1)) % options;
            KvRet::Read((other > 0).then_some(other as u8))
        }
        KvRet::Write => KvRet::Write,
        KvRet::Cas(s) => KvRet::Cas(!s),
        KvRet::Delete(e) => KvRet::Delete(!e),
    }
}

/// Simulates `clients` clients issuing `ops_max` operations in all.
fn generate(bytes: &[u8], clients: usize, ops_max: usize, corrupt: bool) -> Generated {
    let mut tape = Tape { bytes, pos: 0 };
    let mut store = KvSpec::default();
    let mut in_flight: Vec<Option<InFlight>> = (0..clients).map(|_| None).collect();
    let mut threads: Vec<u64> = (0..clients as u64).collect();
    let mut next_thread = clients as u64;
    // Operations whose client gave up before they took effect.
    let mut zombies: Vec<KvOp> = Vec::new();
    let mut out = Generated {
        history: History::new(),
        events: Vec::new(),
        unknown_ops: 0,
    };
    let mut clock = 0u64;
    let mut issued = 0;
    loop {
        // Every client with something to do, then every zombie.
        let busy: Vec<usize> = (0..clients)
            .filter(|&c| in_flight[c].is_some() || issued < ops_max)
            .collect();
        if busy.is_empty() {
            break;
        }
        let choice = tape.pick(busy.len() + zombies.len());
        if choice >= busy.len() {
            let op = zombies.swap_remove(choice - busy.len());
            store.invoke(&op);
            continue;
        }
        let c = busy[choice];
        match in_flight[c].take() {
            None => {
                let k = tape.pick(KEYS);
                let op = match tape.pick(4) {
                    0 => KvOp::Read(k),
                    1 => KvOp::Write(k, tape.value()),
                    2 => KvOp::Cas(k, tape.maybe_value(), tape.maybe_value()),
                    _ => KvOp::Delete(k),
                };
                clock += 1;
                issued += 1;
                out.events.push(Event::Invoke(threads[c], op));
                in_flight[c] = Some(InFlight {
                    thread: threads[c],
                    op,
                    invoke_at: clock,
                    ret: None,
                });
            }
            Some(mut f) if f.ret.is_none() => {
                if tape.one_in(16) {
                    // The client gives up before the operation takes effect.
                    clock += 1;
                    give_up(&mut out, &f, clock);
                    zombies.push(f.op);
                    threads[c] = next_thread;
                    next_thread += 1;
                } else if corrupt && matches!(f.op, KvOp::Write(..)) && tape.one_in(8) {
                    // A lost write: acknowledged, never applied.
                    f.ret = Some(KvRet::Write);
                    in_flight[c] = Some(f);
                } else {
                    f.ret = Some(store.invoke(&f.op));
                    in_flight[c] = Some(f);
                }
            }
            Some(f) => {
                clock += 1;
                if tape.one_in(16) {
                    // The answer is lost: the client cannot tell.
                    give_up(&mut out, &f, clock);
                    threads[c] = next_thread;
                    next_thread += 1;
                } else {
                    let mut ret = f.ret.unwrap_or(KvRet::Write);
                    if corrupt && tape.one_in(6) {
                        ret = corrupt_ret(ret, &mut tape);
                    }
                    out.events.push(Event::Return(f.thread, ret));
                    let (k, op) = to_history_op(f.op);
                    let rec = HistoryOp::ok(f.thread, k, op, to_ret(ret), f.invoke_at, clock);
                    out.history
                        .push(rec)
                        .expect("generated ops are well formed");
                }
            }
        }
    }
    out
}

/// Records an operation the client gave up on: unknown in our history,
/// forever in flight for stateright.
fn give_up(out: &mut Generated, f: &InFlight, clock: u64) {
    let (k, op) = to_history_op(f.op);
    let rec = HistoryOp::unknown(f.thread, k, op, f.invoke_at, clock);
    out.history
        .push(rec)
        .expect("generated ops are well formed");
    out.unknown_ops += 1;
}

/// Stateright's verdict on the events.
fn stateright_linearizable(events: &[Event]) -> bool {
    let mut tester = LinearizabilityTester::new(KvSpec::default());
    for e in events {
        let recorded = match *e {
            Event::Invoke(t, op) => tester.on_invoke(t, op).map(|_| ()),
            Event::Return(t, ret) => tester.on_return(t, ret).map(|_| ()),
        };
        if let Err(e) = recorded {
            panic!("the simulation produced an invalid history: {e}");
        }
    }
    tester.is_consistent()
}

fn show(h: &History) -> String {
    let mut s = String::new();
    for (i, op) in h.ops().iter().enumerate() {
        let _ = writeln!(s, "  #{i} key {:?} {op}", op.key);
    }
    s
}

/// Both checkers' verdicts on one generated history.
fn verdicts(g: &Generated) -> (Verdict, bool) {
    let ours = check_history(&g.history, Budget::default()).verdict;
    (ours, stateright_linearizable(&g.events))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Our checker and stateright's agree on small histories, with and
    /// without falsified results and unknown outcomes.
    #[test]
    fn agrees_with_stateright(
        tape in proptest::collection::vec(any::<u8>(), 0..160),
        clients in 2usize..=4,
        ops_max in 1usize..=8,
        corrupt in any::<bool>(),
    ) {
        let g = generate(&tape, clients, ops_max, corrupt);
        let (ours, theirs) = verdicts(&g);
        prop_assert!(!matches!(ours, Verdict::Unknown { .. }), "{:?}", ours);
        prop_assert_eq!(
            ours == Verdict::Linearizable,
            theirs,
            "ours: {:?}\nhistory:\n{}",
            ours,
            show(&g.history)
        );
    }

    /// Histories of a correct store are linearizable, also when they are
    /// too long for stateright's unmemoised search.
    #[test]
    fn correct_store_histories_are_linearizable(
        tape in proptest::collection::vec(any::<u8>(), 0..1200),
        clients in 2usize..=6,
        ops_max in 1usize..=80,
    ) {
        let g = generate(&tape, clients, ops_max, false);
        let report = check_history(&g.history, Budget::default());
        prop_assert!(report.is_linearizable(), "{}\nhistory:\n{}", report, show(&g.history));
    }
}

/// The cross-check is only worth something if the generator produces both
/// verdicts, and unknown outcomes in both: count them over fixed seeds.
#[test]
fn generated_histories_cover_both_verdicts() {
    let mut rng = StdRng::seed_from_u64(7);
    let (mut ok, mut bad, mut ok_unknown, mut bad_unknown) = (0, 0, 0, 0);
    for _ in 0..300 {
        let tape: Vec<u8> = (0..120).map(|_| rng.gen()).collect();
        let g = generate(&tape, rng.gen_range(2..=4), 8, true);
        let (ours, theirs) = verdicts(&g);
        assert_eq!(
            ours == Verdict::Linearizable,
            theirs,
            "ours: {ours:?}\nhistory:\n{}",
            show(&g.history)
        );
        match (theirs, g.unknown_ops > 0) {
            (true, false) => ok += 1,
            (true, true) => ok_unknown += 1,
            (false, false) => bad += 1,
            (false, true) => bad_unknown += 1,
        }
    }
    eprintln!(
        "linearizable: {ok} (+{ok_unknown} with unknown ops), \
         not: {bad} (+{bad_unknown} with unknown ops)"
    );
    for (what, n) in [
        ("linearizable", ok),
        ("linearizable with unknown ops", ok_unknown),
        ("not linearizable", bad),
        ("not linearizable with unknown ops", bad_unknown),
    ] {
        assert!(n >= 10, "only {n} {what} histories out of 300");
    }
}
