//! [`ChaosReport`]: the outcome of a chaos run, printed as a summary and
//! written as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::BankSummary;

/// The linearizability verdict of the register workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linearizable {
    /// The history was proven linearizable.
    Yes,
    /// The history is not linearizable; the explanation says where.
    No(String),
    /// The checker ran out of budget, or the history could not be gathered.
    Unknown(String),
    /// The register workload was not part of the run.
    NotRun,
}

impl Serialize for Linearizable {
    /// `true`, `false`, `"unknown"`, or `null` when not run.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Linearizable::Yes => s.serialize_bool(true),
            Linearizable::No(_) => s.serialize_bool(false),
            Linearizable::Unknown(_) => s.serialize_str("unknown"),
            Linearizable::NotRun => s.serialize_none(),
        }
    }
}

/// Failover times, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FailoverStats {
    /// Median.
    pub p50: u64,
    /// 99th percentile (nearest rank).
    pub p99: u64,
    /// Longest.
    pub max: u64,
    /// How many failovers were measured.
    pub samples: usize,
}

impl FailoverStats {
    /// Percentiles of `samples`; `None` when there are none.
    pub fn from_samples(samples: &[Duration]) -> Option<FailoverStats> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<u64> = samples.iter().map(|d| d.as_millis() as u64).collect();
        ms.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
            ms[i - 1]
        };
        Some(FailoverStats {
            p50: rank(0.50),
            p99: rank(0.99),
            max: ms[ms.len() - 1],
            samples: ms.len(),
        })
    }
}

/// How many faults of each kind the nemesis injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NemesisCounts {
    /// Nodes killed with SIGKILL and restarted.
    pub kill: u64,
    /// Nodes paused with SIGSTOP and resumed.
    pub pause: u64,
    /// Partitions (of any shape), healed after.
    pub partition: u64,
    /// Partitions by shape: one node cut off from the rest.
    pub partition_isolate: u64,
    /// A minority of two or more cut off from the majority.
    pub partition_halves: u64,
    /// Nodes in a ring, each reaching only its neighbours.
    pub partition_ring: u64,
    /// One direction cut between a minority and the rest.
    pub partition_asymmetric: u64,
    /// Random loss between a minority and the rest.
    pub partition_loss: u64,
    /// Leader transfers the cluster carried out.
    pub transfer: u64,
    /// Splits the cluster carried out.
    pub split: u64,
    /// Splits not asked for: a range already started at the key, or the
    /// run's split limit was reached.
    pub split_skipped: u64,
    /// Nodes restarted under a skewed wall clock (and back).
    pub skew: u64,
    /// Replica moves the cluster carried out (a move there and back counts two).
    pub membership: u64,
    /// Membership steps skipped: no node was outside the chosen ranges
    /// (as many nodes as replicas).
    pub membership_skipped: u64,
    /// Kills, pauses and partitions whose target led at least one range
    /// that carried workload writes (each opens failover probes).
    pub leader_faults: u64,
    /// Operator calls (transfer, split, range list) refused or timed out
    /// (logged as they happened).
    pub admin_refused: u64,
    /// Fault or heal steps that returned an error (logged as they happened).
    pub errors: u64,
}

/// The outcome of a chaos run.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Operations the store answered.
    pub ops_ok: u64,
    /// Operations that definitely had no effect.
    pub ops_failed: u64,
    /// Writes whose outcome is unknown.
    pub ops_unknown: u64,
    /// Operations (failed or unknown) a node answered with a data-corruption
    /// error. The run damages no data, so any fails it.
    pub ops_corruption: u64,
    /// Acknowledged set adds missing from the final read; `None` without the
    /// set workload.
    pub lost_writes: Option<usize>,
    /// Elements in the final read that nobody added.
    pub phantom_writes: Option<usize>,
    /// Acknowledged set adds.
    pub set_acknowledged: Option<usize>,
    /// The register workload's verdict.
    pub linearizable: Linearizable,
    /// The bank workload's verdict: every snapshot and the final read kept
    /// the total, with no account missing or negative; `None` without the
    /// bank workload.
    pub bank_ok: Option<bool>,
    /// What the bank workload did.
    pub bank: Option<BankSummary>,
    /// Failover times after kills, pauses and partitions of a node that led
    /// ranges with workload writes: from the fault to the first write to
    /// such a range sent after it and acknowledged. `None` if none was
    /// measured.
    pub failover_ms: Option<FailoverStats>,
    /// `failover_ms` by the kind of fault (`kill`, `pause`, `partition`).
    pub failover_ms_by_nemesis: BTreeMap<String, FailoverStats>,
    /// Failover probes dropped without a sample (their range took no write
    /// for 30 s).
    pub failover_unmeasured: u64,
    /// The same measure after planned leader transfers (no failure, so
    /// apart from `failover_ms`).
    pub transfer_ms: Option<FailoverStats>,
    /// The seed that reproduces the run's schedule.
    pub seed: u64,
    /// Faults injected.
    pub nemesis: NemesisCounts,
    /// Wall-clock length of the whole run, set-up and checks included.
    pub duration_s: f64,
    /// Cluster size.
    pub nodes: usize,
    /// The network the nodes talked over: `netns` (a namespace each,
    /// partitions on IP packets), `proxy` (a TCP proxy in front of each) or
    /// `loopback` (no partition nemesis, no proxies).
    pub network: String,
}

impl ChaosReport {
    /// Whether the run passed: the register history is linearizable (or the
    /// register workload did not run), the set lost nothing and gained
    /// nothing, and the bank kept its total (or did not run).
    pub fn passed(&self) -> bool {
        let lin_ok = matches!(self.linearizable, Linearizable::Yes | Linearizable::NotRun);
        lin_ok
            && self.lost_writes.unwrap_or(0) == 0
            && self.phantom_writes.unwrap_or(0) == 0
            && self.bank_ok != Some(false)
            && self.ops_corruption == 0
    }

    /// One line: PASS or FAIL and why.
    pub fn verdict_line(&self) -> String {
        if self.passed() {
            return format!("PASS (seed {})", self.seed);
        }
        let mut why = Vec::new();
        match &self.linearizable {
            Linearizable::No(e) => why.push(format!("not linearizable: {e}")),
            Linearizable::Unknown(e) => why.push(format!("linearizability unknown: {e}")),
            Linearizable::Yes | Linearizable::NotRun => {}
        }
        if let Some(n) = self.lost_writes.filter(|&n| n > 0) {
            why.push(format!("{n} lost write(s)"));
        }
        if let Some(n) = self.phantom_writes.filter(|&n| n > 0) {
            why.push(format!("{n} phantom element(s)"));
        }
        if let Some(b) = self.bank.as_ref().filter(|b| !b.ok) {
            why.push(format!(
                "bank: {} anomalies in batch_get snapshots, {} in scan snapshots and the final read",
                b.anomalies_batch_get, b.anomalies_scan
            ));
        }
        if self.ops_corruption > 0 {
            why.push(format!(
                "{} operation(s) answered with a data-corruption error (no data was damaged)",
                self.ops_corruption
            ));
        }
        format!("FAIL: {}; rerun with --seed {}", why.join("; "), self.seed)
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<usize>| v.map_or("n/a".to_string(), |n| n.to_string());
        writeln!(
            f,
            "chaos run: {} nodes, {:.1} s, seed {}, network {}",
            self.nodes, self.duration_s, self.seed, self.network
        )?;
        writeln!(
            f,
            "  ops:          {} ok, {} failed, {} unknown, {} answered as data corruption",
            self.ops_ok, self.ops_failed, self.ops_unknown, self.ops_corruption
        )?;
        let n = &self.nemesis;
        writeln!(
            f,
            "  nemesis:      {} kill, {} pause, {} partition, {} skew ({} on a leader, {} errors), \
             {} transfer, {} split ({} skipped), {} replica moves ({} skipped), \
             {} operator calls refused",
            n.kill,
            n.pause,
            n.partition,
            n.skew,
            n.leader_faults,
            n.errors,
            n.transfer,
            n.split,
            n.split_skipped,
            n.membership,
            n.membership_skipped,
            n.admin_refused
        )?;
        let ms = |s: &Option<FailoverStats>| match s {
            Some(s) => format!(
                "p50 {} ms, p99 {} ms, max {} ms ({} measured)",
                s.p50, s.p99, s.max, s.samples
            ),
            None => "none measured".to_string(),
        };
        if n.partition > 0 {
            writeln!(
                f,
                "  partitions:   {} isolate, {} halves, {} ring, {} asymmetric, {} loss",
                n.partition_isolate,
                n.partition_halves,
                n.partition_ring,
                n.partition_asymmetric,
                n.partition_loss
            )?;
        }
        writeln!(
            f,
            "  failover:     {} ({} unmeasured)",
            ms(&self.failover_ms),
            self.failover_unmeasured
        )?;
        for (kind, s) in &self.failover_ms_by_nemesis {
            writeln!(f, "    {kind:<11} {}", ms(&Some(*s)))?;
        }
        writeln!(f, "  transfer:     {}", ms(&self.transfer_ms))?;
        let lin = match &self.linearizable {
            Linearizable::Yes => "yes".to_string(),
            Linearizable::No(e) => format!("NO: {e}"),
            Linearizable::Unknown(e) => format!("unknown: {e}"),
            Linearizable::NotRun => "n/a (register workload not run)".to_string(),
        };
        writeln!(f, "  linearizable: {lin}")?;
        writeln!(
            f,
            "  set:          {} acknowledged, {} lost, {} phantom",
            opt(self.set_acknowledged),
            opt(self.lost_writes),
            opt(self.phantom_writes)
        )?;
        match &self.bank {
            Some(b) => writeln!(
                f,
                "  bank:         {} ({} accounts, total {}; {} transfers, {} conflicts, {} unknown; \
                 {} batch_get and {} scan snapshots; anomalies: {} batch_get, {} scan)",
                if b.ok { "ok" } else { "NOT OK" },
                b.accounts,
                b.total,
                b.transfers,
                b.conflicts,
                b.unknown,
                b.snapshots_batch_get,
                b.snapshots_scan,
                b.anomalies_batch_get,
                b.anomalies_scan
            )?,
            None => writeln!(f, "  bank:         n/a (bank workload not run)")?,
        }
        write!(f, "  verdict:      {}", self.verdict_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = FailoverStats::from_samples(&samples).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.samples), (50, 99, 100, 100));
        assert!(FailoverStats::from_samples(&[]).is_none());
    }

    #[test]
    fn linearizable_serializes_as_bool_string_or_null() {
        let j = |l: Linearizable| serde_json::to_string(&l).unwrap();
        assert_eq!(j(Linearizable::Yes), "true");
        assert_eq!(j(Linearizable::No(String::new())), "false");
        assert_eq!(j(Linearizable::Unknown(String::new())), "\"unknown\"");
        assert_eq!(j(Linearizable::NotRun), "null");
    }
}
