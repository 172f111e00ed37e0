//! The faults of a run, drawn from its seed before it starts: partitions,
//! message loss, host crashes and restarts, and replica moves. Choices that
//! depend on the cluster's state at the time (which node leads) are drawn as
//! numbers up front and resolved when the fault happens.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which faults a run may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nemeses {
    pub partition: bool,
    pub loss: bool,
    pub crash: bool,
    pub membership: bool,
}

impl Nemeses {
    /// Every fault.
    pub fn all() -> Self {
        Nemeses {
            partition: true,
            loss: true,
            crash: true,
            membership: true,
        }
    }
}

/// One fault, or the end of one.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Cut the network between two groups of hosts; `pick` chooses them.
    Partition { pick: u64 },
    /// Reconnect every host.
    Repair,
    /// Break connections at random: each message may cut its link with
    /// probability `rate` (and a cut link mends with each later message
    /// with probability 0.2).
    Loss { rate: f64 },
    /// Stop breaking connections.
    LossEnd,
    /// Crash a host (kill: its memory and tasks are lost, its disk is not);
    /// `pick` chooses it, the leader half the time.
    Crash { pick: u64 },
    /// Restart every crashed host.
    Restart,
    /// Move one of the range's voters to a host outside the range (through
    /// the replica's own learner, catch-up, joint change path); `pick`
    /// chooses the voter (the leader half the time) and the host.
    Move { pick: u64 },
}

/// A fault at a simulated time.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub fault: Fault,
}

/// Draws the faults of a run of `duration` from `seed`: two independent
/// timelines, one for the network (partitions, loss) and one for processes
/// (crashes, moves), each a fault at a time for 0.3-3 s then a gap of
/// 0.2-2 s. Sorted by time; ends with every fault undone.
pub fn plan(seed: u64, duration: Duration, nemeses: Nemeses) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut events = Vec::new();
    let start = Duration::from_millis(1_000);
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.gen_range(lo..hi));

    let mut t = start + ms(&mut rng, 0, 1_000);
    while t < duration {
        let len = ms(&mut rng, 300, 3_000);
        let (begin, end) = match rng.gen_range(0..2) {
            0 if nemeses.partition => (Fault::Partition { pick: rng.gen() }, Fault::Repair),
            1 if nemeses.loss => (
                Fault::Loss {
                    rate: rng.gen_range(0.001..0.02),
                },
                Fault::LossEnd,
            ),
            _ => {
                t += len;
                continue;
            }
        };
        events.push(Event {
            at: t,
            fault: begin,
        });
        events.push(Event {
            at: (t + len).min(duration),
            fault: end,
        });
        t += len + ms(&mut rng, 200, 2_000);
    }

    let mut t = start + ms(&mut rng, 0, 1_000);
    while t < duration {
        let len = ms(&mut rng, 300, 3_000);
        match rng.gen_range(0..3) {
            0 | 1 if nemeses.crash => {
                events.push(Event {
                    at: t,
                    fault: Fault::Crash { pick: rng.gen() },
                });
                events.push(Event {
                    at: (t + len).min(duration),
                    fault: Fault::Restart,
                });
            }
            2 if nemeses.membership => events.push(Event {
                at: t,
                fault: Fault::Move { pick: rng.gen() },
            }),
            _ => {}
        }
        t += len + ms(&mut rng, 200, 2_000);
    }
    events.push(Event {
        at: duration,
        fault: Fault::Repair,
    });
    events.push(Event {
        at: duration,
        fault: Fault::LossEnd,
    });
    events.push(Event {
        at: duration,
        fault: Fault::Restart,
    });
    events.sort_by_key(|e| e.at);
    events
}
