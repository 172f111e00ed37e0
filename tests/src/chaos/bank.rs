//! The bank workload: [`ACCOUNTS`] accounts under [`BANK_PREFIX`], all in
//! one range, start with [`INITIAL_BALANCE`] each. Transfer clients move
//! money with one atomic batch conditioned on both accounts' versions (read
//! STRONG just before), retrying on conflict, and never overdraw. A reader
//! takes STRONG snapshots of every account, alternating one `batch_get` of
//! all keys and one scan page of the prefix. At the end, [`check_bank`]
//! checks that every snapshot and the final state hold every account, keep
//! the initial total and have no negative balance.
//!
//! A transfer whose outcome is unknown (timeout, deadline) needs no special
//! handling: it is one atomic batch, so it either moved the money whole or
//! not at all, and both keep the total. The transfer client simply reads
//! the accounts again.
//!
//! The accounts stay in one range: the nemesis never splits inside the
//! prefix, and the run configures the nodes with a split row
//! ([`BANK_SPLIT_ROW`]) so that an automatic split cannot cut them apart
//! either. Both reads are then one range's answer at one moment, which is
//! what makes a snapshot consistent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use lmskv_client::{
    BatchOp, Client, Compare, KeyValue, ReadConsistency, ScanOptions, WriteOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinHandle;

use super::{bounded, OpStats, Probes, WORKLOAD_STOP_TIMEOUT};
use crate::checker::{check_bank, BankAnomaly, BankReport, ReadLabel};
use crate::{phase, TestCluster};

/// Prefix of every account's key.
pub const BANK_PREFIX: &str = "bank/";
/// The first key after every key that starts with [`BANK_PREFIX`].
pub const BANK_PREFIX_END: &str = "bank0";
/// The node config line that keeps automatic splits out of the accounts:
/// `bank/` plus 4 bytes (`acct`) is one row, and every account is in it.
pub const BANK_SPLIT_ROW: &str = r#"split_rows = [{ prefix = "bank/", id_len = 4 }]"#;
/// Number of accounts.
pub const ACCOUNTS: u32 = 8;
/// Each account's balance at the start.
pub const INITIAL_BALANCE: i64 = 100;
/// Largest amount one transfer moves.
const TRANSFER_MAX: i64 = 20;
/// Concurrent transfer clients.
const TRANSFER_CLIENTS: u64 = 3;
/// Tries of one transfer that fail their condition before another pair is
/// picked.
const CONFLICT_RETRIES_MAX: u32 = 5;
/// Most transfers one run attempts.
pub const BANK_OPS_MAX: u64 = 1_000_000;
/// Most snapshots one run keeps for the check (each read method).
pub const SNAPSHOTS_MAX: usize = 50_000;
/// Pause between two snapshot reads.
const READ_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts at writing the initial balances and at the final read.
const SETUP_ATTEMPTS: u32 = 5;
/// Pause between those attempts.
const SETUP_BACKOFF: Duration = Duration::from_secs(2);

/// The key of account `i`.
pub fn account_key(i: u32) -> Bytes {
    Bytes::from(format!("{BANK_PREFIX}acct/{i:02}"))
}

fn all_keys() -> Vec<Bytes> {
    (0..ACCOUNTS).map(account_key).collect()
}

/// The account a key names, if it is one.
fn account_of(key: &[u8]) -> Option<u32> {
    let rest = key.strip_prefix(format!("{BANK_PREFIX}acct/").as_bytes())?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Balances by account, or why a read could not be turned into them.
fn balances(kvs: &[KeyValue]) -> Result<BTreeMap<u32, i64>, String> {
    let mut out = BTreeMap::new();
    for kv in kvs {
        let Some(account) = account_of(&kv.key) else {
            return Err(format!(
                "unexpected key {:?} under the bank prefix",
                String::from_utf8_lossy(&kv.key)
            ));
        };
        let balance = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| {
                format!(
                    "account {account} holds {:?}, not a balance",
                    String::from_utf8_lossy(&kv.value)
                )
            })?;
        out.insert(account, balance);
    }
    Ok(out)
}

/// How a snapshot was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMethod {
    BatchGet,
    Scan,
}

impl ReadMethod {
    fn name(self) -> &'static str {
        match self {
            ReadMethod::BatchGet => "batch_get",
            ReadMethod::Scan => "scan",
        }
    }
}

#[derive(Debug, Default)]
struct Recorded {
    batch_get: Vec<BTreeMap<u32, i64>>,
    scan: Vec<BTreeMap<u32, i64>>,
    /// Reads whose values were not balances.
    malformed: Vec<String>,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transfers: AtomicU64,
    conflicts: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
}

/// A running bank workload.
pub struct BankRun {
    tasks: Vec<JoinHandle<()>>,
    recorded: Arc<Mutex<Recorded>>,
    counters: Arc<Counters>,
    initial: BTreeMap<u32, i64>,
}

/// What the bank workload did and what the checker found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BankSummary {
    /// Whether every snapshot and the final read kept the total with every
    /// account present and none negative.
    pub ok: bool,
    /// Accounts and the total they must keep.
    pub accounts: u32,
    pub total: i64,
    /// Transfers acknowledged as applied.
    pub transfers: u64,
    /// Transfers refused because an account changed since it was read
    /// (retried).
    pub conflicts: u64,
    /// Transfers whose outcome is unknown.
    pub unknown: u64,
    /// Snapshots checked, by read method.
    pub snapshots_batch_get: usize,
    pub snapshots_scan: usize,
    /// Anomalies found in the `batch_get` snapshots (each listed in the
    /// run's log).
    pub anomalies_batch_get: usize,
    /// Anomalies found in the scan snapshots, the final read, and reads
    /// that held something other than balances.
    pub anomalies_scan: usize,
}

/// Writes the initial balances (once, in one atomic batch that only
/// succeeds on absent keys) and starts the transfer clients and the reader.
pub async fn start(
    cluster: &TestCluster,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<OpStats>,
    probes: Arc<Probes>,
) -> anyhow::Result<BankRun> {
    let initial: BTreeMap<u32, i64> = (0..ACCOUNTS).map(|i| (i, INITIAL_BALANCE)).collect();
    write_initial(&cluster.client(), seed, &initial).await?;
    phase!("bank: {ACCOUNTS} accounts of {INITIAL_BALANCE} written under {BANK_PREFIX:?}");
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let counters = Arc::new(Counters::default());
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<JoinHandle<()>> = (0..TRANSFER_CLIENTS)
        .map(|client_id| {
            let client = cluster.client();
            let (stop, stats, probes, counters, ops) = (
                stop.clone(),
                stats.clone(),
                probes.clone(),
                counters.clone(),
                ops.clone(),
            );
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (0xba4c << 16) ^ client_id);
                while !stop.load(Ordering::Relaxed)
                    && ops.fetch_add(1, Ordering::Relaxed) < BANK_OPS_MAX
                {
                    let from = rng.gen_range(0..ACCOUNTS);
                    let to = (from + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
                    for _ in 0..CONFLICT_RETRIES_MAX {
                        let t = transfer(&client, &mut rng, from, to, &stats, &probes).await;
                        let c = &counters;
                        match t {
                            Transfer::Applied => c.transfers.fetch_add(1, Ordering::Relaxed),
                            Transfer::Conflict => {
                                c.conflicts.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Transfer::Unknown => c.unknown.fetch_add(1, Ordering::Relaxed),
                            Transfer::Failed | Transfer::Nothing => {
                                c.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        break;
                    }
                }
            })
        })
        .collect();
    let reader = {
        let client = cluster.client();
        let (stop, stats, recorded) = (stop.clone(), stats.clone(), recorded.clone());
        tokio::spawn(async move {
            let mut method = ReadMethod::BatchGet;
            while !stop.load(Ordering::Relaxed) {
                if let Some(kvs) = read_all(&client, method, &stats).await {
                    let mut r = recorded.lock().unwrap_or_else(PoisonError::into_inner);
                    match balances(&kvs) {
                        Ok(b) => {
                            let list = match method {
                                ReadMethod::BatchGet => &mut r.batch_get,
                                ReadMethod::Scan => &mut r.scan,
                            };
                            if list.len() < SNAPSHOTS_MAX {
                                list.push(b);
                            } else {
                                r.dropped += 1;
                            }
                        }
                        Err(e) => r.malformed.push(format!("{}: {e}", method.name())),
                    }
                }
                method = match method {
                    ReadMethod::BatchGet => ReadMethod::Scan,
                    ReadMethod::Scan => ReadMethod::BatchGet,
                };
                tokio::time::sleep(READ_INTERVAL).await;
            }
        })
    };
    tasks.push(reader);
    Ok(BankRun {
        tasks,
        recorded,
        counters,
        initial,
    })
}

/// Writes `initial` with one batch conditioned on every account being
/// absent, retrying under the same request id (so a retry of an applied
/// batch is answered from the dedup table, not applied twice), then reads it
/// back.
async fn write_initial(
    client: &Client,
    seed: u64,
    initial: &BTreeMap<u32, i64>,
) -> anyhow::Result<()> {
    let conditions: Vec<(Bytes, Compare)> = initial
        .keys()
        .map(|&i| (account_key(i), Compare::Version(0)))
        .collect();
    let ops: Vec<BatchOp> = initial
        .iter()
        .map(|(&i, b)| BatchOp::Put(account_key(i), Bytes::from(b.to_string())))
        .collect();
    let opts = WriteOptions {
        request_id: Some(Bytes::from(format!("bank-init-{seed:016x}"))),
        ..WriteOptions::default()
    };
    let mut last_err = String::new();
    for _ in 0..SETUP_ATTEMPTS {
        match bounded(client.batch(conditions.clone(), ops.clone(), &opts)).await {
            // Refused: the accounts exist, from an earlier try whose answer
            // was lost; the read below tells whether they hold the start.
            Some(Ok(_)) => {
                let kvs = client
                    .batch_get(all_keys(), ReadConsistency::Strong)
                    .await
                    .context("reading back the initial balances")?;
                let read = balances(&kvs).map_err(anyhow::Error::msg)?;
                if &read != initial {
                    bail!("the initial balances read back as {read:?}, not {initial:?}");
                }
                return Ok(());
            }
            Some(Err(e)) => last_err = e.to_string(),
            None => last_err = "timed out".into(),
        }
        tokio::time::sleep(SETUP_BACKOFF).await;
    }
    bail!("writing the initial balances failed: {last_err}")
}

/// The outcome of one transfer try.
enum Transfer {
    /// Acknowledged and applied.
    Applied,
    /// An account changed since it was read; nothing was written.
    Conflict,
    /// The batch may or may not have been applied.
    Unknown,
    /// The read or the batch failed with no effect.
    Failed,
    /// The source account was empty: nothing to move.
    Nothing,
}

/// Reads accounts `from` and `to` STRONG and moves up to [`TRANSFER_MAX`]
/// (never more than `from` holds) with one batch conditioned on both
/// versions.
async fn transfer(
    client: &Client,
    rng: &mut StdRng,
    from: u32,
    to: u32,
    stats: &OpStats,
    probes: &Probes,
) -> Transfer {
    let (kf, kt) = (account_key(from), account_key(to));
    let read =
        match bounded(client.batch_get([kf.clone(), kt.clone()], ReadConsistency::Strong)).await {
            Some(Ok(kvs)) => {
                stats.ok();
                kvs
            }
            other => {
                stats.failed_with("bank: read", other.as_ref().and_then(|r| r.as_ref().err()));
                return Transfer::Failed;
            }
        };
    let find = |k: &Bytes| read.iter().find(|kv| kv.key == *k);
    let (Some(f), Some(t)) = (find(&kf), find(&kt)) else {
        // A missing account shows up in the snapshots; nothing to move.
        return Transfer::Failed;
    };
    let (Ok(Ok(fb)), Ok(Ok(tb))) = (
        std::str::from_utf8(&f.value).map(str::parse::<i64>),
        std::str::from_utf8(&t.value).map(str::parse::<i64>),
    ) else {
        return Transfer::Failed;
    };
    if fb <= 0 {
        return Transfer::Nothing;
    }
    let amount = rng.gen_range(1..=fb.min(TRANSFER_MAX));
    let conditions = vec![
        (kf.clone(), Compare::Version(f.version)),
        (kt.clone(), Compare::Version(t.version)),
    ];
    let ops = vec![
        BatchOp::Put(kf, Bytes::from((fb - amount).to_string())),
        BatchOp::Put(kt, Bytes::from((tb + amount).to_string())),
    ];
    let sent_at = Instant::now();
    match bounded(client.batch(conditions, ops, &WriteOptions::default())).await {
        Some(Ok(o)) => {
            stats.ok();
            probes.write_acked(sent_at, Instant::now(), o.range_id);
            if o.succeeded {
                Transfer::Applied
            } else {
                Transfer::Conflict
            }
        }
        Some(Err(e)) if !e.is_outcome_unknown() => {
            phase!("bank: transfer {from} -> {to} refused: {e}");
            stats.failed_with("bank: transfer", Some(&e));
            Transfer::Failed
        }
        _ => {
            stats.unknown();
            Transfer::Unknown
        }
    }
}

/// One STRONG read of every account, by `method`; `None` if it failed.
async fn read_all(client: &Client, method: ReadMethod, stats: &OpStats) -> Option<Vec<KeyValue>> {
    let read = match method {
        ReadMethod::BatchGet => bounded(client.batch_get(all_keys(), ReadConsistency::Strong))
            .await
            .map(|r| r.map_err(Some)),
        ReadMethod::Scan => bounded(client.scan(&scan_options()))
            .await
            .map(|r| match r {
                // One page holds every account; more would mean the prefix
                // holds keys nobody wrote, which the check reports.
                Ok(page) if page.next_page_token.is_none() => Ok(page.kvs),
                Ok(_) => Err(None),
                Err(e) => Err(Some(e)),
            }),
    };
    match read {
        Some(Ok(kvs)) => {
            stats.ok();
            Some(kvs)
        }
        other => {
            stats.failed_with(
                "bank: snapshot",
                other
                    .as_ref()
                    .and_then(|r| r.as_ref().err())
                    .and_then(Option::as_ref),
            );
            None
        }
    }
}

fn scan_options() -> ScanOptions {
    ScanOptions {
        start: Bytes::from_static(BANK_PREFIX.as_bytes()),
        end: Bytes::from_static(BANK_PREFIX_END.as_bytes()),
        // Room for a stray key to show up rather than hide behind a page.
        limit: ACCOUNTS * 4,
        consistency: ReadConsistency::Strong,
        ..ScanOptions::default()
    }
}

impl BankRun {
    /// Waits for the clients to stop (they were told to), reads the final
    /// balances from the healed cluster and checks every read.
    pub async fn finish(self, cluster: &TestCluster) -> anyhow::Result<BankSummary> {
        let deadline = tokio::time::Instant::now() + WORKLOAD_STOP_TIMEOUT;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let client = cluster.client();
        let mut final_read = None;
        let mut last_err = String::new();
        for _ in 0..SETUP_ATTEMPTS {
            match bounded(client.scan_all(&scan_options(), (ACCOUNTS * 4) as usize)).await {
                Some(Ok(kvs)) => {
                    final_read = Some(kvs);
                    break;
                }
                Some(Err(e)) => last_err = e.to_string(),
                None => last_err = "scan timed out".into(),
            }
            tokio::time::sleep(SETUP_BACKOFF).await;
        }
        let kvs = final_read.with_context(|| format!("final bank read failed: {last_err}"))?;
        let recorded =
            std::mem::take(&mut *self.recorded.lock().unwrap_or_else(PoisonError::into_inner));
        let c = &self.counters;
        let (transfers, conflicts, unknown) = (
            c.transfers.load(Ordering::Relaxed),
            c.conflicts.load(Ordering::Relaxed),
            c.unknown.load(Ordering::Relaxed),
        );
        phase!(
            "bank: checking {} batch_get and {} scan snapshots ({} not kept); {transfers} transfers, {conflicts} conflicts, {unknown} unknown",
            recorded.batch_get.len(),
            recorded.scan.len(),
            recorded.dropped
        );
        let mut anomalies_scan = recorded.malformed.len();
        for m in recorded.malformed.iter().take(10) {
            phase!("bank: malformed read: {m}");
        }
        let final_balances = match balances(&kvs) {
            Ok(b) => b,
            Err(e) => {
                phase!("bank: malformed final read: {e}");
                anomalies_scan += 1;
                BTreeMap::new()
            }
        };
        phase!("bank: final balances {final_balances:?}");
        let mut found = [0usize; 2];
        for (i, (name, snapshots)) in [("batch_get", &recorded.batch_get), ("scan", &recorded.scan)]
            .into_iter()
            .enumerate()
        {
            let report: BankReport<u32> = check_bank(&self.initial, snapshots, &final_balances);
            phase!("bank ({name} snapshots): {report}");
            found[i] = report.anomalies.len() + report.anomalies_omitted;
            // The balances of the first few bad snapshots, for a closer look.
            let mut shown = Vec::new();
            for a in &report.anomalies {
                let read = match a {
                    BankAnomaly::WrongTotal { read, .. }
                    | BankAnomaly::NegativeBalance { read, .. }
                    | BankAnomaly::UnexpectedAccount { read, .. }
                    | BankAnomaly::MissingAccount { read, .. } => *read,
                };
                if let ReadLabel::Snapshot(n) = read {
                    if shown.len() < 5 && !shown.contains(&n) {
                        shown.push(n);
                        phase!("bank ({name} snapshot {n}): {:?}", snapshots[n]);
                    }
                }
            }
        }
        let anomalies_batch_get = found[0];
        anomalies_scan += found[1];
        Ok(BankSummary {
            ok: anomalies_batch_get == 0 && anomalies_scan == 0,
            accounts: ACCOUNTS,
            total: self.initial.values().sum(),
            transfers,
            conflicts,
            unknown,
            snapshots_batch_get: recorded.batch_get.len(),
            snapshots_scan: recorded.scan.len(),
            anomalies_batch_get,
            anomalies_scan,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_keys_round_trip_and_sort_inside_the_prefix() {
        for i in 0..ACCOUNTS {
            let k = account_key(i);
            assert_eq!(account_of(&k), Some(i));
            assert!(k.as_ref() > BANK_PREFIX.as_bytes() && k.as_ref() < BANK_PREFIX_END.as_bytes());
            // Every account is in the one split row `bank/acct`.
            assert!(k.starts_with(b"bank/acct"));
        }
        assert_eq!(account_of(b"bank/other"), None);
    }

    #[test]
    fn balances_are_parsed_and_strays_refused() {
        let kv = |k: &str, v: &str| KeyValue {
            key: Bytes::from(k.to_string()),
            value: Bytes::from(v.to_string()),
            version: 1,
        };
        let b = balances(&[kv("bank/acct/00", "5"), kv("bank/acct/03", "-2")]).unwrap();
        assert_eq!(b, BTreeMap::from([(0, 5), (3, -2)]));
        assert!(balances(&[kv("bank/acct/00", "x")]).is_err());
        assert!(balances(&[kv("bank/zzz", "1")]).is_err());
    }
}
