//! The register workload: a few clients issue STRONG reads, writes and
//! compare-and-swaps on a few keys, recorded into a [`HistoryRecorder`] and
//! checked for linearizability at the end.
//!
//! Keys are grouped in epochs of [`EPOCH`]: every epoch uses fresh keys, so
//! each key's history stays short however long the run is, and the checker's
//! per-key search stays within budget.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmskv_client::{Compare, ReadConsistency, WriteOptions};
use tokio::task::JoinHandle;

use super::{bounded, Linearizable, OpStats, Probes, WORKLOAD_STOP_TIMEOUT};
use crate::checker::{check_history, Budget, History, HistoryRecorder, Op, Outcome, Ret, Verdict};
use crate::{phase, TestCluster};

/// Concurrent register clients.
const CLIENTS: u64 = 5;
/// Keys per epoch.
pub const KEYS: u64 = 3;
/// How long one set of keys is used before the next.
pub const EPOCH: Duration = Duration::from_secs(10);

/// The key of register `k` in `epoch` (`reg/<epoch>/<k>`).
pub fn register_key(epoch: u64, k: u64) -> String {
    format!("reg/{epoch}/{k}")
}
/// Most register operations one run records.
pub const REGISTER_OPS_MAX: u64 = 1_000_000;
/// Most time the linearizability check may take.
const CHECK_TIME_MAX: Duration = Duration::from_secs(120);

/// A running register workload.
pub struct RegisterRun {
    tasks: Vec<JoinHandle<()>>,
    recorder: HistoryRecorder,
}

/// Starts the register clients.
pub fn start(
    cluster: &TestCluster,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<OpStats>,
    failover: Arc<Probes>,
) -> RegisterRun {
    let recorder = History::recorder();
    let started = Instant::now();
    let ops = Arc::new(AtomicU64::new(0));
    let tasks = (0..CLIENTS)
        .map(|client_id| {
            let client = cluster.client();
            let (rec, stop, stats, failover, ops) = (
                recorder.clone(),
                stop.clone(),
                stats.clone(),
                failover.clone(),
                ops.clone(),
            );
            tokio::spawn(async move {
                // One seeded stream per client: a run replays from its seed.
                let mut rng = StdRng::seed_from_u64(seed ^ client_id);
                let mut n = 0u64;
                let mut last_seen: Option<Bytes> = None;
                let mut last_epoch = 0;
                while !stop.load(Ordering::Relaxed)
                    && ops.fetch_add(1, Ordering::Relaxed) < REGISTER_OPS_MAX
                {
                    n += 1;
                    let epoch = started.elapsed().as_secs() / EPOCH.as_secs();
                    if epoch != last_epoch {
                        // A new key set starts absent.
                        last_seen = None;
                        last_epoch = epoch;
                    }
                    let key = Bytes::from(register_key(epoch, rng.gen::<u64>() % KEYS));
                    let value = Bytes::from(format!("c{client_id}-{n}"));
                    let op = match rng.gen::<u64>() % 10 {
                        0..=4 => Op::Read,
                        5..=7 => Op::Write(value.clone()),
                        _ => Op::Cas {
                            expected: last_seen.clone(),
                            new: Some(value.clone()),
                        },
                    };
                    let Ok(inv) = rec.invoke(client_id, key.clone(), op.clone()) else {
                        // The history is full: stop recording.
                        break;
                    };
                    let sent_at = Instant::now();
                    let recorded = match op {
                        Op::Read => {
                            match bounded(client.get(key, ReadConsistency::Strong)).await {
                                Some(Ok(v)) => {
                                    stats.ok();
                                    last_seen = v.map(|kv| kv.value);
                                    rec.complete(inv, Outcome::Ok(Ret::Read(last_seen.clone())))
                                }
                                // A failed read has no effect.
                                other => {
                                    stats.failed_with(
                                        "register: read",
                                        other.as_ref().and_then(|r| r.as_ref().err()),
                                    );
                                    rec.discard(inv)
                                }
                            }
                        }
                        Op::Write(v) => match bounded(client.put(key, v)).await {
                            Some(Ok(w)) => {
                                stats.ok();
                                failover.write_acked(sent_at, Instant::now(), w.range_id);
                                rec.complete(inv, Outcome::Ok(Ret::Write))
                            }
                            other => {
                                stats.unknown_with(
                                    "register: write",
                                    other.as_ref().and_then(|r| r.as_ref().err()),
                                );
                                rec.complete(inv, Outcome::Unknown)
                            }
                        },
                        Op::Cas { expected, new } => {
                            let cmp = match expected {
                                Some(v) => Compare::Value(v),
                                None => Compare::Version(0),
                            };
                            let opts = WriteOptions::default();
                            match bounded(client.compare_and_swap(key, cmp, new, &opts)).await {
                                Some(Ok(o)) => {
                                    stats.ok();
                                    failover.write_acked(sent_at, Instant::now(), o.range_id);
                                    rec.complete(
                                        inv,
                                        Outcome::Ok(Ret::Cas {
                                            swapped: o.succeeded,
                                        }),
                                    )
                                }
                                other => {
                                    stats.unknown_with(
                                        "register: compare-and-swap",
                                        other.as_ref().and_then(|r| r.as_ref().err()),
                                    );
                                    rec.complete(inv, Outcome::Unknown)
                                }
                            }
                        }
                        // The workload issues no deletes.
                        _ => rec.discard(inv),
                    };
                    if let Err(e) = recorded {
                        phase!("register client {client_id}: recording failed: {e}");
                        break;
                    }
                }
            })
        })
        .collect();
    RegisterRun { tasks, recorder }
}

impl RegisterRun {
    /// Waits for the clients to stop (they were told to), then checks the
    /// history. Clients still busy after [`WORKLOAD_STOP_TIMEOUT`] are
    /// aborted; their pending operations count as unknown.
    pub async fn finish(self) -> Linearizable {
        let deadline = tokio::time::Instant::now() + WORKLOAD_STOP_TIMEOUT;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let history = self.recorder.finish();
        phase!("register: checking {} operations", history.len());
        let budget = Budget {
            time_max: CHECK_TIME_MAX,
            ..Budget::default()
        };
        let check = tokio::task::spawn_blocking(move || check_history(&history, budget));
        let report =
            match tokio::time::timeout(CHECK_TIME_MAX + Duration::from_secs(30), check).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Linearizable::Unknown(format!("checker panicked: {e}")),
                Err(_) => return Linearizable::Unknown("checker did not return in time".into()),
            };
        phase!("register: {report}");
        match report.verdict {
            Verdict::Linearizable => Linearizable::Yes,
            Verdict::NotLinearizable { key, violation } => {
                Linearizable::No(format!("key {key:?}: {violation}"))
            }
            Verdict::Unknown { exceeded, .. } => Linearizable::Unknown(exceeded.to_string()),
        }
    }
}
