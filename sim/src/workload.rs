//! The simulated clients: register reads, writes and compare-and-swaps on a
//! few keys, sent to the leader they believe in, recorded in a history for
//! the linearizability checker; then, once the faults are over, a final read
//! of every key and a dump of every replica.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_tests::checker::{History, HistoryOp, Op, Ret};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::host::{Dump, Request};
use crate::state::Shared;

/// Longest a client waits for a host's answer before it gives up (the
/// outcome is then unknown).
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// Longest the final phase waits for a leader to read from, and for the
/// replicas to converge, after the faults ended.
const CONVERGE_WAIT: Duration = Duration::from_secs(40);
/// Pause between a client's operations.
const THINK_MS_MAX: u64 = 20;

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub clients: usize,
    pub keys: usize,
    /// Clients stop invoking at this simulated time (faults stop too).
    pub until: Duration,
    /// Time given to the healed cluster before the final reads.
    pub settle: Duration,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct WorkloadResult {
    pub history: History,
    /// Version (log index) of every acknowledged write, by key.
    pub acked: BTreeMap<Bytes, Vec<u64>>,
    /// The final membership's replicas: node id, applied index, contents.
    pub dumps: Vec<(u64, u64, Dump)>,
    /// Operations whose outcome stayed unknown.
    pub unknown: usize,
    /// Why the final phase failed, if it did.
    pub failure: Option<String>,
}

struct Recorder {
    started: Instant,
    result: Mutex<WorkloadResult>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn push(&self, op: HistoryOp) {
        let mut r = self.result.lock().expect("recorder lock");
        if matches!(op.outcome, lmskv_tests::checker::Outcome::Unknown) {
            r.unknown += 1;
        }
        if let Err(e) = r.history.push(op) {
            r.failure.get_or_insert(format!("history: {e}"));
        }
    }
}

/// Sends `make(reply)` to node `id` and waits for the answer. `None`: the
/// request never reached a running host (it did not happen); `Some(None)`:
/// no answer in time (it may have happened).
async fn ask<T>(
    shared: &Shared,
    id: u64,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Option<Option<T>> {
    let tx = shared.host(id).sender()?;
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.ok()?;
    match tokio::time::timeout(ANSWER_WAIT, rx).await {
        Ok(Ok(answer)) => Some(Some(answer)),
        // Answer dropped (host crashed) or late: unknown.
        Ok(Err(_)) | Err(_) => Some(None),
    }
}

/// The node a client sends to: the leader it knows of, else any host.
fn target(shared: &Shared, rng: &mut StdRng) -> u64 {
    match shared.leader() {
        Some((id, _)) => id,
        None => rng.gen_range(1..=shared.ids().count() as u64),
    }
}

/// Whether an error says the request was refused before it was proposed.
fn refused(e: &Error) -> bool {
    matches!(e, Error::NotLeader { .. })
}

async fn client(
    shared: Arc<Shared>,
    rec: Arc<Recorder>,
    opts: WorkloadOptions,
    id: u64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id));
    let mut seen: BTreeMap<Bytes, Option<Bytes>> = BTreeMap::new();
    let mut n = 0u64;
    while rec.started.elapsed() < opts.until {
        n += 1;
        let key = Bytes::from(format!("k{}", rng.gen_range(0..opts.keys)));
        let node = target(&shared, &mut rng);
        let invoked = rec.now();
        match rng.gen_range(0..10) {
            0..=3 => {
                let answer = ask(&shared, node, |reply| Request::Read {
                    key: key.clone(),
                    reply,
                })
                .await;
                // A read without an answer constrains nothing: leave it out.
                if let Some(Some(Ok(v))) = answer {
                    seen.insert(key.clone(), v.clone());
                    rec.push(HistoryOp::ok(
                        id,
                        key,
                        Op::Read,
                        Ret::Read(v),
                        invoked,
                        rec.now(),
                    ));
                }
            }
            6..=9 if seen.contains_key(&key) => {
                let expected = seen[&key].clone();
                let new = Bytes::from(format!("c{id}-{n}"));
                let op = Op::Cas {
                    expected: expected.clone(),
                    new: Some(new.clone()),
                };
                let answer = ask(&shared, node, |reply| Request::Cas {
                    key: key.clone(),
                    expected,
                    new,
                    request_id: Bytes::from(format!("c{id}-{n}")),
                    reply,
                })
                .await;
                match answer {
                    None => {}
                    Some(Some(Err(e))) if refused(&e) => {}
                    Some(Some(Ok(swapped))) => rec.push(HistoryOp::ok(
                        id,
                        key,
                        op,
                        Ret::Cas { swapped },
                        invoked,
                        rec.now(),
                    )),
                    Some(_) => rec.push(HistoryOp::unknown(id, key, op, invoked, rec.now())),
                }
            }
            _ => {
                let value = Bytes::from(format!("w{id}-{n}"));
                let op = Op::Write(value.clone());
                let answer = ask(&shared, node, |reply| Request::Write {
                    key: key.clone(),
                    value,
                    request_id: Bytes::from(format!("w{id}-{n}")),
                    reply,
                })
                .await;
                match answer {
                    None => {}
                    Some(Some(Err(e))) if refused(&e) => {}
                    Some(Some(Ok(version))) => {
                        rec.result
                            .lock()
                            .expect("recorder lock")
                            .acked
                            .entry(key.clone())
                            .or_default()
                            .push(version);
                        rec.push(HistoryOp::ok(id, key, op, Ret::Write, invoked, rec.now()));
                    }
                    Some(_) => rec.push(HistoryOp::unknown(id, key, op, invoked, rec.now())),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..=THINK_MS_MAX))).await;
    }
}

/// Reads every key through the leader, recording the reads in the history:
/// an acknowledged write that was lost shows up here as a read the checker
/// cannot place.
async fn final_reads(shared: &Shared, rec: &Recorder, keys: usize) -> Result<(), String> {
    let deadline = Instant::now() + CONVERGE_WAIT;
    for k in 0..keys {
        let key = Bytes::from(format!("k{k}"));
        loop {
            if Instant::now() >= deadline {
                return Err(format!("no leader answered a read of {key:?} within {CONVERGE_WAIT:?} after the faults ended"));
            }
            if let Some((leader, _)) = shared.leader() {
                let invoked = rec.now();
                if let Some(Some(Ok(v))) = ask(shared, leader, |reply| Request::Read {
                    key: key.clone(),
                    reply,
                })
                .await
                {
                    rec.push(HistoryOp::ok(
                        u64::MAX,
                        key,
                        Op::Read,
                        Ret::Read(v),
                        invoked,
                        rec.now(),
                    ));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Waits until every member of the leader's membership applied all the
/// leader committed, then dumps each member's contents.
async fn converge(shared: &Shared) -> Result<Vec<(u64, u64, Dump)>, String> {
    let deadline = Instant::now() + CONVERGE_WAIT;
    loop {
        if Instant::now() >= deadline {
            let views: Vec<_> = shared
                .ids()
                .map(|id| (id, shared.host(id).view()))
                .collect();
            return Err(format!(
                "replicas did not converge within {CONVERGE_WAIT:?} after the faults ended: {views:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some((leader, lv)) = shared.leader() else {
            continue;
        };
        if lv.applied_index != lv.commit_index {
            continue;
        }
        let members: Vec<u64> = lv.voters.iter().chain(&lv.learners).copied().collect();
        let caught_up = members.iter().all(|m| {
            shared
                .host(*m)
                .view()
                .is_some_and(|v| v.applied_index == lv.applied_index)
        });
        if !caught_up {
            continue;
        }
        let mut dumps = Vec::new();
        for m in members {
            match ask(shared, m, |reply| Request::Dump { reply }).await {
                Some(Some(Ok((applied, dump)))) => dumps.push((m, applied, dump)),
                _ => break,
            }
        }
        let applied: Vec<u64> = dumps.iter().map(|d| d.1).collect();
        if dumps.len() == lv.voters.len() + lv.learners.len()
            && applied.iter().all(|a| *a == lv.applied_index)
            && shared.leader().map(|l| l.0) == Some(leader)
        {
            return Ok(dumps);
        }
    }
}

/// Runs the clients until `opts.until`, waits for the healed cluster to
/// settle, reads every key and dumps every replica.
pub async fn run(shared: Arc<Shared>, opts: WorkloadOptions, seed: u64) -> WorkloadResult {
    let rec = Arc::new(Recorder {
        started: Instant::now(),
        result: Mutex::new(WorkloadResult::default()),
    });
    let tasks: Vec<_> = (0..opts.clients as u64)
        .map(|id| tokio::spawn(client(shared.clone(), rec.clone(), opts.clone(), id, seed)))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            rec.result
                .lock()
                .expect("recorder lock")
                .failure
                .get_or_insert(format!("client task: {e}"));
        }
    }
    let settled = opts.until + opts.settle;
    tokio::time::sleep(settled.saturating_sub(rec.started.elapsed())).await;
    let end = match final_reads(&shared, &rec, opts.keys).await {
        Ok(()) => converge(&shared).await,
        Err(e) => Err(e),
    };
    let mut result = std::mem::take(&mut *rec.result.lock().expect("recorder lock"));
    match end {
        Ok(dumps) => result.dumps = dumps,
        Err(e) => {
            result.failure.get_or_insert(e);
        }
    }
    result
}
