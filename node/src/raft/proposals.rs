//! Many client writes per Raft entry.
//!
//! A range's replica keeps at most [`PROPOSALS_IN_FLIGHT_MAX`] proposals
//! between `client_write` and their answer. A write that finds the range
//! idle (nothing in flight, nobody waiting) is proposed alone at once, so a
//! lone writer pays nothing extra. Writes that arrive while every slot is
//! taken wait in a bounded queue; when a proposal finishes, the writes
//! waiting then (up to [`GROUP_COMMANDS_MAX`] and [`GROUP_BYTES_MAX`]) go
//! out as one log entry, an [`Op::Group`]. A write that finds a free slot
//! while another proposal is in flight takes the slot but waits in the
//! queue too, and the group it leads is formed a moment later, once the
//! writes that came with it (the rest of a client's bundle, served by the
//! same task) have queued behind it: under load a free slot would otherwise
//! carry one write for a whole round while the writes right behind it wait
//! for the next. Under load a range's log thus holds one entry per group,
//! not per write: one log key, one encode and decode, one apply call and one
//! response channel per group on every replica.
//!
//! Each write of a group keeps its own request id, is deduplicated on its own
//! and answered on its own. No two writes of a group touch the same key: a
//! write's version is its entry's index, so two writes of one key in one
//! entry would share a version (a compare-and-swap on that version could not
//! tell them apart). A waiting write that shares a key with the group being
//! formed ends the group and leads the next one, which keeps queue order.
//!
//! A write whose caller gave up (timed out or disconnected) before its group
//! formed is dropped, never proposed: its outcome was reported unknown, and
//! not applying it is one of the outcomes that answer allowed.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use lmskv_proto::error::Error;
use tokio::sync::oneshot;

use super::command::{Command, CommandResponse, Op};

/// Proposals of one range in flight at once (alone or as a group), unless
/// the node's `proposals_in_flight_max` says otherwise.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 2;
/// The most a node may be configured to keep in flight per range.
pub const PROPOSALS_IN_FLIGHT_LIMIT: usize = 64;
/// Writes that may wait for a slot; more are refused with `Overloaded`.
pub const PROPOSAL_QUEUE_MAX: usize = 8_192;
/// Writes in one group at most.
pub const GROUP_COMMANDS_MAX: usize = 256;
/// Key and value bytes in one group at most (a single larger write still
/// goes, alone).
pub const GROUP_BYTES_MAX: usize = 4 * 1024 * 1024;

/// What a proposed write is answered with: its log index and its response.
pub type Answer = Result<(u64, CommandResponse), Error>;

/// A write waiting for a slot, and where its answer goes.
pub struct Waiting {
    pub cmd: Command,
    pub tx: oneshot::Sender<Answer>,
}

/// What [`Proposals::admit`] decided for a write.
pub enum Admission {
    /// A slot was free and nothing waited: propose it alone, now, and call
    /// [`Proposals::finish`] when done.
    Now(Command),
    /// A slot was free but another proposal is in flight: the slot is taken
    /// for the group this write leads, and the write queued. Call
    /// [`Proposals::finish`] soon, once the writes arriving with this one
    /// have queued, to form that group; the answer comes on this channel.
    Gather(oneshot::Receiver<Answer>),
    /// Queued: the answer comes on this channel.
    Queued(oneshot::Receiver<Answer>),
    /// The queue is full.
    Full,
}

/// The proposal slots and waiting writes of one range.
pub struct Proposals {
    queue: VecDeque<Waiting>,
    in_flight: usize,
    slots: usize,
}

impl Default for Proposals {
    fn default() -> Self {
        Proposals::with_slots(PROPOSALS_IN_FLIGHT_MAX)
    }
}

impl Proposals {
    /// At most `slots` proposals in flight (1 to [`PROPOSALS_IN_FLIGHT_LIMIT`]).
    pub fn with_slots(slots: usize) -> Self {
        Proposals {
            queue: VecDeque::new(),
            in_flight: 0,
            slots: slots.clamp(1, PROPOSALS_IN_FLIGHT_LIMIT),
        }
    }

    /// Takes a slot for `cmd`, or queues it.
    pub fn admit(&mut self, cmd: Command) -> Admission {
        let free = self.in_flight < self.slots && self.queue.is_empty();
        if free && self.in_flight == 0 {
            self.in_flight += 1;
            return Admission::Now(cmd);
        }
        if self.queue.len() >= PROPOSAL_QUEUE_MAX {
            return Admission::Full;
        }
        let (tx, rx) = oneshot::channel();
        self.queue.push_back(Waiting { cmd, tx });
        if free {
            self.in_flight += 1;
            return Admission::Gather(rx);
        }
        Admission::Queued(rx)
    }

    /// A proposal finished and gives up its slot (or a slot taken by
    /// [`Admission::Gather`] is to be used). Returns the next group to
    /// propose, which keeps the slot, or `None` (the slot is freed).
    pub fn finish(&mut self) -> Option<Vec<Waiting>> {
        let group = self.take_group();
        if group.is_empty() {
            self.in_flight = self.in_flight.saturating_sub(1);
            None
        } else {
            Some(group)
        }
    }

    /// Gives up a slot without starting a group (shutting down).
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Writes waiting now.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Proposals in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The longest prefix of the queue that forms a group: live writes, to
    /// distinct keys, within the count and byte bounds (at least one write).
    fn take_group(&mut self) -> Vec<Waiting> {
        let mut group = Vec::new();
        let mut keys: HashSet<Bytes> = HashSet::new();
        let mut bytes = 0usize;
        while let Some(next) = self.queue.front() {
            if next.tx.is_closed() {
                self.queue.pop_front();
                continue;
            }
            if group.len() >= GROUP_COMMANDS_MAX {
                break;
            }
            let size = next.cmd.request_id.len() + next.cmd.op.payload_bytes();
            if !group.is_empty() && bytes + size > GROUP_BYTES_MAX {
                break;
            }
            if next.cmd.op.keys().any(|k| keys.contains(k)) {
                break;
            }
            keys.extend(next.cmd.op.keys().cloned());
            bytes += size;
            group.push(self.queue.pop_front().expect("front exists"));
        }
        group
    }
}

/// The log entry a group is proposed as: the write itself when alone.
pub fn group_command(mut cmds: Vec<Command>, proposed_at_ms: u64) -> Command {
    if cmds.len() == 1 {
        return cmds.pop().expect("one command");
    }
    Command {
        request_id: Bytes::new(),
        proposed_at_ms,
        op: Op::Group(cmds),
    }
}

/// Splits a group's outcome into one answer per write, in order.
pub fn answers(count: usize, outcome: Answer) -> Vec<Answer> {
    match outcome {
        Err(e) => vec![Err(e); count],
        Ok((index, resp)) if count == 1 => vec![Ok((index, resp))],
        Ok((index, CommandResponse::Group(resps))) if resps.len() == count => {
            resps.into_iter().map(|r| Ok((index, r))).collect()
        }
        Ok((index, other)) => vec![
            Err(Error::internal(format!(
                "a group of {count} writes at index {index} was answered with {other}"
            )));
            count
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str, key: &str, value_len: usize) -> Command {
        Command {
            request_id: Bytes::from(id.to_string()),
            proposed_at_ms: 1,
            op: Op::Put {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(vec![0u8; value_len]),
            },
        }
    }

    fn queued(a: Admission) -> oneshot::Receiver<Answer> {
        match a {
            Admission::Queued(rx) => rx,
            _ => panic!("expected the write to be queued"),
        }
    }

    /// Fills every slot as the replica would: the first write goes at once,
    /// each later one takes a slot and its group is formed right away.
    fn fill_slots(p: &mut Proposals, prefix: &str) -> Vec<oneshot::Receiver<Answer>> {
        let mut rxs = Vec::new();
        for i in 0..p.slots {
            match p.admit(put(&format!("{prefix}{i}"), &format!("{prefix}{i}"), 1)) {
                Admission::Now(_) => assert_eq!(i, 0, "only the first write goes at once"),
                Admission::Gather(rx) => {
                    assert!(i > 0, "the first write finds the range idle");
                    assert_eq!(p.finish().expect("the gathered write").len(), 1);
                    rxs.push(rx);
                }
                _ => panic!("slot {i} of {} was not free", p.slots),
            }
        }
        assert_eq!(p.in_flight(), p.slots);
        rxs
    }

    #[test]
    fn a_write_to_an_idle_range_goes_at_once_and_a_free_slot_gathers_the_writes_behind_it() {
        let mut p = Proposals::default();
        assert!(matches!(p.admit(put("a", "ka", 1)), Admission::Now(_)));
        // A slot is free but a proposal is in flight: the write takes the
        // slot and waits, and so do the writes that come right after it.
        let _b = match p.admit(put("b", "kb", 1)) {
            Admission::Gather(rx) => rx,
            _ => panic!("expected the write to gather a group"),
        };
        assert_eq!(p.in_flight(), 2);
        let _c = queued(p.admit(put("c", "kc", 1)));
        let _d = queued(p.admit(put("d", "kd", 1)));
        // The gathered slot's group holds all three.
        let ids: Vec<Bytes> = p
            .finish()
            .expect("a group")
            .into_iter()
            .map(|w| w.cmd.request_id)
            .collect();
        assert_eq!(ids, vec!["b", "c", "d"]);
        assert_eq!(p.in_flight(), 2);
        // Both finish with nobody waiting: the range is idle again.
        assert!(p.finish().is_none());
        assert!(p.finish().is_none());
        assert!(matches!(p.admit(put("e", "ke", 1)), Admission::Now(_)));
    }

    #[test]
    fn a_lone_write_goes_at_once_and_later_ones_wait_for_a_slot() {
        let mut p = Proposals::default();
        let _slots = fill_slots(&mut p, "r");
        let _rx = queued(p.admit(put("w", "kw", 1)));
        assert_eq!(p.waiting(), 1);
        // The finishing proposal hands its slot to the waiting write.
        let g = p.finish().expect("a group");
        assert_eq!(g.len(), 1);
        assert_eq!(p.in_flight(), PROPOSALS_IN_FLIGHT_MAX);
        // Nothing waits: slots are freed one by one.
        for left in (0..PROPOSALS_IN_FLIGHT_MAX).rev() {
            assert!(p.finish().is_none());
            assert_eq!(p.in_flight(), left);
        }
        assert!(p.finish().is_none(), "finishing more than was admitted");
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn the_slot_count_is_configurable_within_bounds() {
        for (asked, got) in [(0, 1), (1, 1), (4, 4), (1_000, PROPOSALS_IN_FLIGHT_LIMIT)] {
            let mut p = Proposals::with_slots(asked);
            assert_eq!(p.slots, got, "asked {asked}");
            let _slots = fill_slots(&mut p, "r");
            let _rx = queued(p.admit(put("w", "kw", 1)));
            assert_eq!(p.in_flight(), got);
        }
    }

    #[test]
    fn a_group_holds_distinct_keys_in_queue_order() {
        let mut p = Proposals::default();
        let _slots = fill_slots(&mut p, "s");
        let mut rxs = Vec::new();
        for (id, key) in [("a", "k1"), ("b", "k2"), ("c", "k1"), ("d", "k3")] {
            rxs.push(queued(p.admit(put(id, key, 1))));
        }
        let ids =
            |g: Vec<Waiting>| -> Vec<Bytes> { g.into_iter().map(|w| w.cmd.request_id).collect() };
        assert_eq!(ids(p.finish().unwrap()), vec!["a", "b"]);
        assert_eq!(ids(p.finish().unwrap()), vec!["c", "d"]);
        assert!(p.finish().is_none());
    }

    #[test]
    fn groups_are_bounded_and_skip_writes_whose_caller_left() {
        let mut p = Proposals::default();
        let _slots = fill_slots(&mut p, "s");
        let mut rxs = Vec::new();
        for i in 0..GROUP_COMMANDS_MAX + 10 {
            rxs.push(queued(p.admit(put(&format!("r{i}"), &format!("k{i}"), 1))));
        }
        // The first caller gave up: its write is never proposed.
        drop(rxs.remove(0));
        let g = p.finish().unwrap();
        assert_eq!(g.len(), GROUP_COMMANDS_MAX);
        assert_eq!(g[0].cmd.request_id, "r1");
        assert_eq!(p.finish().unwrap().len(), 9);

        // Bytes: two writes that together pass the bound go in two groups,
        // and one larger than the bound still goes alone.
        let big = GROUP_BYTES_MAX / 2 + 1;
        let _a = queued(p.admit(put("x", "x", big)));
        let _b = queued(p.admit(put("y", "y", big)));
        let _c = queued(p.admit(put("z", "z", GROUP_BYTES_MAX * 2)));
        assert_eq!(p.finish().unwrap().len(), 1);
        assert_eq!(p.finish().unwrap().len(), 1);
        assert_eq!(p.finish().unwrap().len(), 1);
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut p = Proposals::default();
        let _slots = fill_slots(&mut p, "s");
        let mut rxs = Vec::new();
        for i in 0..PROPOSAL_QUEUE_MAX {
            rxs.push(queued(p.admit(put(&format!("r{i}"), "k", 1))));
        }
        assert!(matches!(p.admit(put("over", "k", 1)), Admission::Full));
    }

    #[test]
    fn a_group_outcome_is_split_per_write() {
        let resp = |v| CommandResponse::Put { version: v };
        let out = answers(2, Ok((7, CommandResponse::Group(vec![resp(7), resp(7)]))));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|a| a.as_ref().unwrap() == &(7, resp(7))));
        let out = answers(3, Err(Error::unavailable("lost")));
        assert!(out.iter().all(|a| a.is_err()));
        // A response that does not fit the group fails every write.
        let out = answers(2, Ok((7, resp(7))));
        assert!(out.iter().all(|a| a.is_err()));
        let alone = group_command(vec![put("a", "k", 1)], 5);
        assert!(matches!(alone.op, Op::Put { .. }));
        let g = group_command(vec![put("a", "k", 1), put("b", "j", 1)], 5);
        assert!(matches!(g.op, Op::Group(ref c) if c.len() == 2));
        assert!(g.request_id.is_empty());
    }
}
