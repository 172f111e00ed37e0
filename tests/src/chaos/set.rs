//! The set workload: clients add unique elements, each one a key under
//! [`SET_PREFIX`], and remember which adds were acknowledged and which have
//! an unknown outcome. At the end one STRONG scan reads the whole set and
//! [`check_set`] looks for acknowledged adds that were lost and for elements
//! nobody added.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use lmskv_client::{ReadConsistency, ScanOptions};
use tokio::task::JoinHandle;

use super::{bounded, OpStats, Probes, WORKLOAD_STOP_TIMEOUT};
use crate::checker::check_set;
use crate::{phase, TestCluster};

/// Prefix of every set element's key.
pub const SET_PREFIX: &str = "set/";
/// The first key after every key that starts with [`SET_PREFIX`].
const SET_PREFIX_END: &str = "set0";
/// Concurrent adding clients.
pub const CLIENTS: u64 = 2;
/// Most adds one run attempts.
pub const SET_OPS_MAX: u64 = 1_000_000;
/// Attempts at the final read.
const FINAL_READ_ATTEMPTS: u32 = 5;
/// Pause between final read attempts.
const FINAL_READ_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Adds {
    acknowledged: BTreeSet<String>,
    unknown: BTreeSet<String>,
}

/// A running set workload.
pub struct SetRun {
    tasks: Vec<JoinHandle<()>>,
    adds: Arc<Mutex<Adds>>,
}

/// What the set checker found.
#[derive(Debug, Clone, Copy)]
pub struct SetResult {
    /// Acknowledged adds.
    pub acknowledged: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: usize,
    /// Elements nobody added.
    pub phantom: usize,
}

/// The `n`th element added by client `client_id` (its key is
/// [`SET_PREFIX`] followed by it). The seed in the element keeps runs apart
/// if a data dir is ever reused.
pub fn element(seed: u64, client_id: u64, n: u64) -> String {
    format!("{seed:016x}-c{client_id}-{n:08}")
}

/// Starts the adding clients.
pub fn start(
    cluster: &TestCluster,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<OpStats>,
    failover: Arc<Probes>,
) -> SetRun {
    let adds = Arc::new(Mutex::new(Adds::default()));
    let ops = Arc::new(AtomicU64::new(0));
    let tasks = (0..CLIENTS)
        .map(|client_id| {
            let client = cluster.client();
            let (adds, stop, stats, failover, ops) = (
                adds.clone(),
                stop.clone(),
                stats.clone(),
                failover.clone(),
                ops.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && ops.fetch_add(1, Ordering::Relaxed) < SET_OPS_MAX
                {
                    n += 1;
                    let element = element(seed, client_id, n);
                    let key = Bytes::from(format!("{SET_PREFIX}{element}"));
                    // Recorded as unknown before it is sent, so an add cut
                    // short by an abort is still accounted for.
                    adds.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .unknown
                        .insert(element.clone());
                    let sent_at = Instant::now();
                    let put = bounded(client.put(key, "1")).await;
                    let acked = match &put {
                        Some(Ok(w)) => Some(w.range_id),
                        _ => None,
                    };
                    if let Some(range_id) = acked {
                        stats.ok();
                        failover.write_acked(sent_at, Instant::now(), range_id);
                        let mut a = adds.lock().unwrap_or_else(PoisonError::into_inner);
                        a.unknown.remove(&element);
                        a.acknowledged.insert(element);
                    } else {
                        stats.unknown_with("set: add", put.as_ref().and_then(|r| r.as_ref().err()));
                    }
                }
            })
        })
        .collect();
    SetRun { tasks, adds }
}

impl SetRun {
    /// Waits for the clients to stop (they were told to), reads the final
    /// set from the healed cluster and checks it.
    pub async fn finish(self, cluster: &TestCluster) -> anyhow::Result<SetResult> {
        let deadline = tokio::time::Instant::now() + WORKLOAD_STOP_TIMEOUT;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let (acknowledged, unknown) = {
            let a = self.adds.lock().unwrap_or_else(PoisonError::into_inner);
            (a.acknowledged.clone(), a.unknown.clone())
        };
        let attempted = acknowledged.len() + unknown.len();
        phase!(
            "set: reading the final set ({} acknowledged, {} unknown adds)",
            acknowledged.len(),
            unknown.len()
        );
        let client = cluster.client();
        let opts = ScanOptions {
            start: Bytes::from_static(SET_PREFIX.as_bytes()),
            end: Bytes::from_static(SET_PREFIX_END.as_bytes()),
            keys_only: true,
            consistency: ReadConsistency::Strong,
            ..ScanOptions::default()
        };
        // Anything past every attempted add is a phantom already; reading
        // one more than that is enough to see it.
        let read_max = attempted + 1;
        let mut last_err = None;
        let mut read = None;
        for _ in 0..FINAL_READ_ATTEMPTS {
            match bounded(client.scan_all(&opts, read_max)).await {
                Some(Ok(kvs)) => {
                    read = Some(kvs);
                    break;
                }
                Some(Err(e)) => last_err = Some(e.to_string()),
                None => last_err = Some("scan timed out".into()),
            }
            tokio::time::sleep(FINAL_READ_BACKOFF).await;
        }
        let kvs = read
            .with_context(|| format!("final set read failed: {}", last_err.unwrap_or_default()))?;
        let final_read: BTreeSet<String> = kvs
            .iter()
            .map(|kv| {
                let element = kv
                    .key
                    .strip_prefix(SET_PREFIX.as_bytes())
                    .unwrap_or(&kv.key);
                String::from_utf8_lossy(element).into_owned()
            })
            .collect();
        let report = check_set(&acknowledged, &unknown, &final_read);
        phase!(
            "set: {} read, {} lost, {} phantom, {} unknown recovered, {} unknown absent",
            final_read.len(),
            report.lost.len(),
            report.phantom.len(),
            report.recovered.len(),
            report.unknown_absent
        );
        for e in report.lost.iter().take(10) {
            phase!("set: lost acknowledged add {e}");
        }
        for e in report.phantom.iter().take(10) {
            phase!("set: phantom element {e}");
        }
        Ok(SetResult {
            acknowledged: acknowledged.len(),
            lost: report.lost.len(),
            phantom: report.phantom.len(),
        })
    }
}
