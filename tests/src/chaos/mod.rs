//! A chaos run against a real multi-process cluster: workloads record what
//! clients observe while a nemesis kills, pauses and partitions nodes,
//! transfers range leaders, splits ranges and moves replicas, then the
//! checkers judge the histories.
//!
//! [`run`] is the library entry that the `lmskv-chaos` binary and the short
//! in-test run share. A run has three phases: start a [`TestCluster`], run the
//! workloads concurrently with the nemesis loop until the duration is up, then
//! heal every node, read the final state and check it. Every fault and every
//! workload choice comes from the run's seed, so a failing run prints the seed
//! that reproduces its schedule.
//!
//! The nodes talk over one of two networks ([`Network`]): as root, each node
//! runs in its own network namespace and partitions act on IP packets
//! ([`crate::netns`]); elsewhere a TCP proxy in front of each node refuses
//! or stalls connections ([`crate::proxy`]). The report names the one used.

pub mod bank;
mod failover;
mod nemesis;
mod register;
mod report;
mod set;
mod stats;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::shared_host_worker_threads;
use crate::netns::{self, Fabric};
use crate::{phase, ClusterOptions, TestCluster};

pub use bank::BankSummary;
pub use failover::{FailoverTracker, Probes};
pub use report::{ChaosReport, FailoverStats, Linearizable, NemesisCounts};
pub use stats::OpStats;

/// The node's default Raft timing (`FileConfig::default` in the node crate),
/// written out because the test harness runs slower elections otherwise.
const SHIPPED_RAFT_TIMING: &str =
    "election_timeout_ms_min = 200\nelection_timeout_ms_max = 400\nheartbeat_interval_ms = 50\n";

/// Longest run the options accept.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// Most nodes a chaos cluster may have.
pub const NODES_MAX: usize = 7;
/// How long the run waits for a leader after the cluster is healed.
pub const HEAL_LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workload tasks may take to finish their last operation once
/// told to stop (longer than the client's 20 s call deadline).
pub const WORKLOAD_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on any single client call, on top of the client's own deadline.
pub const OP_TIMEOUT: Duration = Duration::from_secs(25);

/// A kind of fault the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Nemesis {
    /// `kill -9` a node, then restart it after 1–3 s.
    Kill,
    /// SIGSTOP a node for 1–3 s, then SIGCONT it.
    Pause,
    /// Put the nodes in a partition shape for 1–3 s: one node isolated, a
    /// minority cut from the majority, a ring (each node reaches only its
    /// neighbours), a one-way cut, or random loss between a minority and
    /// the rest (see [`crate::partition::Partition`]); clients still reach
    /// every node.
    Partition,
    /// Move a range's leadership to another of its voters through the
    /// operator API. Not a failure: measured as `transfer_ms`, not
    /// `failover_ms`.
    Transfer,
    /// Split a workload's range at a key inside its data through the
    /// operator API (never inside the bank's accounts).
    Split,
    /// Move a replica of a workload's range to a node outside the range and
    /// back through the operator API (learner, catch-up, joint membership
    /// change, removal, each way). Needs more nodes than replicas (e.g.
    /// `--nodes 5`); skipped with the reason otherwise.
    Membership,
    /// Restart a node under a wall clock shifted by up to ±5 minutes
    /// (libfaketime, monotonic clock untouched) for 1–3 s, then restart it
    /// with the true clock. Needs libfaketime (Debian package `faketime`).
    Skew,
}

impl Nemesis {
    /// Every nemesis this build supports.
    pub const SUPPORTED: [Nemesis; 7] = [
        Nemesis::Kill,
        Nemesis::Pause,
        Nemesis::Partition,
        Nemesis::Transfer,
        Nemesis::Split,
        Nemesis::Membership,
        Nemesis::Skew,
    ];

    /// The supported nemeses this machine can run: all of them, less `skew`
    /// where libfaketime is not installed.
    pub fn available() -> Vec<Nemesis> {
        Nemesis::SUPPORTED
            .into_iter()
            .filter(|n| *n != Nemesis::Skew || faketime_library().is_some())
            .collect()
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Nemesis::Kill => "kill",
            Nemesis::Pause => "pause",
            Nemesis::Partition => "partition",
            Nemesis::Transfer => "transfer",
            Nemesis::Split => "split",
            Nemesis::Membership => "membership",
            Nemesis::Skew => "skew",
        }
    }
}

/// Nemeses the issue names that this build does not have, and why.
/// Where Debian's `faketime` package puts libfaketime.
const FAKETIME_LIBRARIES: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// libfaketime's path, when it is installed (`LMSKV_FAKETIME_LIB` overrides).
pub fn faketime_library() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LMSKV_FAKETIME_LIB") {
        return Some(p.into());
    }
    FAKETIME_LIBRARIES
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

impl fmt::Display for Nemesis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a comma-separated nemesis list; `all` means every supported one.
/// Names of faults that are planned but not built yet are refused with the
/// reason and the list of supported ones.
pub fn parse_nemeses(s: &str) -> anyhow::Result<Vec<Nemesis>> {
    let supported = Nemesis::SUPPORTED.map(Nemesis::name).join(", ");
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "all" => {
                let available = Nemesis::available();
                if !available.contains(&Nemesis::Skew) {
                    phase!("nemesis `all` leaves out `skew`: libfaketime is not installed (Debian package faketime)");
                }
                out.extend(available)
            }
            "kill" => out.push(Nemesis::Kill),
            "pause" => out.push(Nemesis::Pause),
            "partition" => out.push(Nemesis::Partition),
            "transfer" => out.push(Nemesis::Transfer),
            "split" => out.push(Nemesis::Split),
            "membership" => out.push(Nemesis::Membership),
            "skew" => {
                if faketime_library().is_none() {
                    bail!(
                        "nemesis `skew` needs libfaketime, which is not installed (Debian package \
                         faketime; or set LMSKV_FAKETIME_LIB)"
                    );
                }
                out.push(Nemesis::Skew)
            }
            other => {
                bail!("nemesis `{other}` is not supported; supported: {supported} (or `all`)")
            }
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        bail!("no nemesis given; supported: {supported} (or `all`)");
    }
    Ok(out)
}

/// A workload the run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// STRONG reads, writes and compare-and-swaps on a few keys, checked for
    /// linearizability.
    Register,
    /// Unique adds under the `set/` prefix, checked for lost and phantom
    /// elements against a final scan.
    Set,
    /// Atomic transfers between accounts of one range and STRONG snapshots
    /// of all of them, checked for a conserved total and no overdraft.
    Bank,
}

/// Parses a comma-separated workload list (`register`, `set`, `bank`).
pub fn parse_workloads(s: &str) -> anyhow::Result<Vec<Workload>> {
    const SUPPORTED: &str = "register, set, bank";
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "register" => out.push(Workload::Register),
            "set" => out.push(Workload::Set),
            "bank" => out.push(Workload::Bank),
            other => bail!("workload `{other}` is not supported; supported: {SUPPORTED}"),
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        bail!("no workload given; supported: {SUPPORTED}");
    }
    Ok(out)
}

/// Parses a duration such as `60s`, `30m`, `1h` or `500ms` (a bare number is
/// seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration `{s}`: expected e.g. 60s, 30m, 500ms"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => bail!("bad duration unit `{other}` in `{s}`: use ms, s, m or h"),
    };
    Ok(d)
}

/// The network a chaos run's nodes talk over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Namespaces where [`netns::available`] says they work (root), else proxies.
    Auto,
    /// Every node in its own network namespace; partitions act on IP
    /// packets. Needs root and iproute2 (and nft for the loss shape).
    Netns,
    /// A TCP proxy in front of every node; partitions act on connections.
    Proxy,
}

impl Network {
    /// Parses `auto`, `netns` or `proxy`.
    pub fn parse(s: &str) -> anyhow::Result<Network> {
        match s.trim() {
            "auto" => Ok(Network::Auto),
            "netns" => Ok(Network::Netns),
            "proxy" => Ok(Network::Proxy),
            other => bail!("network `{other}` is not supported; supported: auto, netns, proxy"),
        }
    }

    /// `Netns` or `Proxy`: what `Auto` comes to on this machine. `Netns`
    /// asked for where namespaces do not work is an error with the reason.
    pub fn resolve(self) -> anyhow::Result<Network> {
        match self {
            Network::Proxy => Ok(Network::Proxy),
            Network::Netns => match netns::available() {
                Ok(()) => Ok(Network::Netns),
                Err(why) => bail!("--network netns: network namespaces are unavailable: {why}"),
            },
            Network::Auto => match netns::available() {
                Ok(()) => Ok(Network::Netns),
                Err(why) => {
                    phase!("network: TCP proxies (network namespaces unavailable: {why})");
                    Ok(Network::Proxy)
                }
            },
        }
    }
}

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Cluster size (3 or 5 in practice).
    pub nodes: usize,
    /// How long workloads and nemesis run, before healing and checking.
    pub duration: Duration,
    /// Faults the nemesis may pick from.
    pub nemeses: Vec<Nemesis>,
    /// Workloads to run concurrently.
    pub workloads: Vec<Workload>,
    /// Seed for every random choice of the run.
    pub seed: u64,
    /// The network the nodes talk over.
    pub network: Network,
}

impl ChaosOptions {
    /// Checks the options are within limits.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.nodes < 3 || self.nodes > NODES_MAX {
            bail!(
                "--nodes must be between 3 and {NODES_MAX} (got {}): a fault needs a majority left",
                self.nodes
            );
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX {
            bail!("--duration must be between 1 ms and {DURATION_MAX:?}");
        }
        if self.nemeses.is_empty() || self.workloads.is_empty() {
            bail!("at least one nemesis and one workload are needed");
        }
        Ok(())
    }
}

/// Runs a chaos test as `opts` says and returns its report. An `Err` means the
/// run itself could not be carried out (the cluster did not start or never
/// healed, or Ctrl-C or SIGTERM stopped it); correctness failures are in the
/// report.
///
/// Blocking: the run gets its own runtime on its own thread (in the hub
/// namespace when the nodes run in namespaces), so it may be called from
/// any thread that is not driving a runtime. Nodes, namespaces and veth
/// pairs are gone when it returns, whatever the outcome.
pub fn run(opts: ChaosOptions) -> anyhow::Result<ChaosReport> {
    run_within(opts, DURATION_MAX * 2)
}

/// [`run`], stopped with an error (and cleaned up) if it takes longer than
/// `limit` in all.
pub fn run_within(opts: ChaosOptions, limit: Duration) -> anyhow::Result<ChaosReport> {
    opts.validate()?;
    let started = Instant::now();
    let network = opts.network.resolve()?;
    let fabric = match network {
        Network::Netns => Some(Arc::new(
            Fabric::create(opts.nodes).context("build the network namespaces")?,
        )),
        _ => None,
    };
    let result = match &fabric {
        Some(f) => {
            phase!(
                "network: a namespace per node ({}-*), partitions at the IP level",
                f.prefix()
            );
            f.block_on(interruptible(run_on(opts, fabric.clone(), started), limit))?
        }
        None => std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<ChaosReport> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(interruptible(run_on(opts, None, started), limit))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the chaos run's thread panicked"))?
        }),
    };
    // The cluster (and its nodes) went with the runtime; the namespaces go here.
    drop(fabric);
    result
}

/// Runs `fut` unless Ctrl-C, SIGTERM or the end of `limit` comes first;
/// then drops it (which stops the nodes) and returns an error.
async fn interruptible<T>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
    limit: Duration,
) -> anyhow::Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    tokio::select! {
        r = fut => r,
        _ = int.recv() => bail!("interrupted (SIGINT)"),
        _ = term.recv() => bail!("terminated (SIGTERM)"),
        _ = tokio::time::sleep(limit) => bail!("the run took longer than {limit:?}"),
    }
}

async fn run_on(
    opts: ChaosOptions,
    fabric: Option<Arc<Fabric>>,
    started: Instant,
) -> anyhow::Result<ChaosReport> {
    phase!(
        "chaos: {} nodes, {:?}, nemesis {:?}, workloads {:?}, seed {}",
        opts.nodes,
        opts.duration,
        opts.nemeses,
        opts.workloads,
        opts.seed
    );
    let proxied = fabric.is_none() && opts.nemeses.contains(&Nemesis::Partition);
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: opts.nodes,
        // The production default: leaders move while the nemesis runs. The
        // bank's accounts form one split row, so an automatic split never
        // cuts them apart (the nemesis's own splits avoid them too).
        // The node's default Raft timing (the test harness otherwise runs
        // slower elections), so failover is measured as shipped.
        // `LMSKV_TEST_NODE_CONFIG` still overrides it.
        config: format!(
            "balance_leaders = true\n{SHIPPED_RAFT_TIMING}{}\n",
            bank::BANK_SPLIT_ROW
        ),
        proxied,
        netns: fabric,
        // The nodes share this host's cores, as `lmskv local up` shares
        // them, so the nemesis also runs against nodes with one worker
        // thread each on a small host.
        worker_threads: Some(shared_host_worker_threads(opts.nodes)),
    })
    .await?;
    phase!("cluster network: {}", cluster.network());

    // Node logs carry wall-clock times; this line maps the run's own.
    phase!(
        "start workloads and nemesis (wall clock {})",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| format!("{:.3} s since the epoch", d.as_secs_f64()))
            .unwrap_or_else(|_| "unknown".into())
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(OpStats::default());
    let probes = Arc::new(Probes::default());
    // The bank writes its initial balances first, while the cluster is
    // healthy; the other workloads start at once.
    let bank = if opts.workloads.contains(&Workload::Bank) {
        Some(
            bank::start(
                &cluster,
                opts.seed,
                stop.clone(),
                stats.clone(),
                probes.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let workloads_started = Instant::now();
    let register = opts.workloads.contains(&Workload::Register).then(|| {
        register::start(
            &cluster,
            opts.seed,
            stop.clone(),
            stats.clone(),
            probes.clone(),
        )
    });
    let set = opts.workloads.contains(&Workload::Set).then(|| {
        set::start(
            &cluster,
            opts.seed,
            stop.clone(),
            stats.clone(),
            probes.clone(),
        )
    });

    let counts = nemesis::run(
        nemesis::Target {
            cluster: &mut cluster,
            probes: &probes,
            stats: &stats,
            workloads: &opts.workloads,
            started: workloads_started,
        },
        &opts.nemeses,
        opts.seed,
        opts.duration,
    )
    .await;
    stop.store(true, Ordering::Relaxed);

    phase!("stop workloads; every node is healed");
    let leader = cluster
        .wait_leader(HEAL_LEADER_TIMEOUT)
        .await
        .context("no leader after healing the cluster")?;
    phase!("leader after healing: node {leader}");

    let linearizable = match register {
        Some(r) => r.finish().await,
        None => Linearizable::NotRun,
    };
    let set_result = match set {
        Some(s) => Some(s.finish(&cluster).await?),
        None => None,
    };
    let bank = match bank {
        Some(b) => Some(b.finish(&cluster).await?),
        None => None,
    };

    let ms = |v: Vec<Duration>| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    for (kind, samples) in probes.failover.samples_by_kind() {
        phase!("failover samples after {kind} (ms): {:?}", ms(samples));
    }
    phase!("transfer samples (ms): {:?}", ms(probes.transfer.samples()));
    let ops = stats.snapshot();
    let report = ChaosReport {
        ops_ok: ops.ok,
        ops_failed: ops.failed,
        ops_unknown: ops.unknown,
        ops_corruption: ops.corruption,
        lost_writes: set_result.as_ref().map(|s| s.lost),
        phantom_writes: set_result.as_ref().map(|s| s.phantom),
        set_acknowledged: set_result.as_ref().map(|s| s.acknowledged),
        linearizable,
        bank_ok: bank.as_ref().map(|b| b.ok),
        bank,
        failover_ms: FailoverStats::from_samples(&probes.failover.samples()),
        failover_ms_by_nemesis: probes
            .failover
            .samples_by_kind()
            .into_iter()
            .filter_map(|(k, v)| FailoverStats::from_samples(&v).map(|s| (k.to_string(), s)))
            .collect(),
        failover_unmeasured: probes.failover.unmeasured(Instant::now()),
        transfer_ms: FailoverStats::from_samples(&probes.transfer.samples()),
        seed: opts.seed,
        nemesis: counts,
        duration_s: started.elapsed().as_secs_f64(),
        nodes: opts.nodes,
        network: cluster.network().to_string(),
    };
    phase!("chaos run done: {}", report.verdict_line());
    Ok(report)
}

/// Awaits `fut` for at most [`OP_TIMEOUT`]; `None` if it took longer.
pub(crate) async fn bounded<F: std::future::Future>(fut: F) -> Option<F::Output> {
    tokio::time::timeout(OP_TIMEOUT, fut).await.ok()
}
