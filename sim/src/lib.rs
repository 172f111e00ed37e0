//! Deterministic simulation of lmskv's replication under faults.
//!
//! Several simulated hosts ([turmoil]) each run the node's real code for one
//! range: the RocksDB storage engine in the host's own temporary directory,
//! the Raft log store and state machine, the openraft group behind
//! `RangeReplica`, and the gRPC Raft transport, whose byte streams cross
//! turmoil's simulated network. Clients write, compare-and-swap and read a
//! few keys through the leader while a nemesis drawn from the run's seed
//! partitions the network, breaks connections, crashes and restarts hosts
//! and moves replicas between them.
//!
//! Odd seeds give Raft RPCs no more time than openraft asks for (appends
//! time out after the heartbeat interval), even seeds the node's 500 ms
//! floor, so runs reach both the paths a timed-out append takes and those
//! the node normally runs ([`SimOptions::rpc_timeout_min`]).
//!
//! Checked as the run goes: applied indexes that never go back (even across
//! a restart); every replica applies the same log id at an index, and the
//! leader ids of applied entries never decrease along the log (each
//! replica's last applied log id, sampled every 2 simulated ms, against all
//! seen before). One term may see two leaders: openraft's leader ids are
//! (term, node id), and a candidate with a higher node id may win a term
//! another already won. Checked at the end, after the
//! faults are undone: every key reads back through the leader; the history
//! of every client operation, final reads included, is linearizable (an
//! acknowledged write that was lost cannot be placed); every replica of the
//! final membership applied the same index and holds the same keys, values
//! and versions; no acknowledged write's version is missing.
//!
//! [`run_seed`] runs one seed; the `lmskv-sim` binary runs many. A failing
//! run prints its seed; `lmskv-sim --seed N` (or `make sim SEED=N`) replays
//! it.
//!
//! Determinism: everything a run chooses comes from its seed — the faults
//! and their times, the clients' operations, turmoil's message latencies and
//! losses, and openraft's election timeouts (through
//! `lmskv_node::raft::runtime::seed_thread`). All hosts run on one thread in
//! simulated time. Log syncs run inline (`Engine::open_inline_sync`), and so
//! does the snapshot work a node hands to blocking threads: building and
//! installing a snapshot (`Engine::runs_inline`), and reading and writing
//! its file during a transfer (`PeerPool::with_channel_maker`), so neither
//! the RocksDB WAL thread nor a blocking thread decides when anything
//! finishes. The order in which tasks woken in the same simulated instant
//! run comes from the seed too: tokio draws from its runtime's generator to
//! pick among ready `select!` branches and to spread the waiters of a
//! `watch` channel over its notifiers (so two of openraft's replication
//! streams woken by one commit may send their appends in either order, and
//! turmoil draws each message's latency in the order they are sent), and
//! turmoil seeds each host's generator from the run's seed. Tokio offers
//! that seed only under `--cfg tokio_unstable`, which the workspace sets in
//! `.cargo/config.toml` ([`EXACT_REPLAY`] says whether this build has it).
//! So a replay is the same run: the same history, the same final replicas
//! (compare [`SimReport::fingerprint`]). RocksDB's background flushes and
//! compactions change no result.

pub mod host;
pub mod nemesis;
pub mod state;
pub mod transport;
pub mod workload;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmskv_tests::checker::{check_history, Budget};

pub use nemesis::Nemeses;
use nemesis::{Event, Fault};
use state::Shared;
use workload::{WorkloadOptions, WorkloadResult};

/// The shape of one simulated run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Simulated hosts (node ids 1..=hosts).
    pub hosts: usize,
    /// Voters of the range; the other hosts are spares for replica moves.
    pub voters: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the clients use.
    pub keys: usize,
    /// Simulated time with clients and faults.
    pub duration: Duration,
    /// Simulated time the healed cluster gets before the final checks.
    pub settle: Duration,
    pub nemeses: Nemeses,
    /// Whether replicas snapshot and purge their logs (every 64 entries),
    /// so that lagging and new replicas catch up by snapshot install.
    /// Snapshots are built, sent, received and installed on the simulation's
    /// thread, so they replay like everything else (see the crate's notes
    /// on determinism).
    pub snapshots: bool,
    /// The shortest time a Raft RPC gets (see `PeerPool::with_channel_maker`);
    /// `None`: by seed, odd seeds zero (appends time out after openraft's
    /// heartbeat interval, as the node's did before its 500 ms floor, so runs
    /// reach the paths an abandoned append takes), even seeds the node's own.
    pub rpc_timeout_min: Option<Duration>,
}

impl SimOptions {
    /// The RPC floor a run of `seed` uses.
    pub fn rpc_timeout_min_for(&self, seed: u64) -> Duration {
        self.rpc_timeout_min.unwrap_or(if seed % 2 == 1 {
            Duration::ZERO
        } else {
            lmskv_node::raft::RAFT_RPC_TIMEOUT_MIN
        })
    }
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            hosts: 5,
            voters: 3,
            clients: 4,
            keys: 3,
            duration: Duration::from_secs(15),
            settle: Duration::from_secs(2),
            nemeses: Nemeses::all(),
            snapshots: true,
            rpc_timeout_min: None,
        }
    }
}

/// Whether this build replays a seed exactly: tokio's generator is seeded
/// only in a build with `--cfg tokio_unstable` (see the crate docs); without
/// it a replay has the seed's faults, workload and network, but tasks woken
/// in one instant may run in another order.
pub const EXACT_REPLAY: bool = cfg!(tokio_unstable);

/// What a run did, and whether it broke an invariant.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    /// Invariants broken, in the order they were found; empty: the run passed.
    pub violations: Vec<String>,
    /// Client operations in the history (final reads included).
    pub ops: usize,
    /// Operations whose outcome stayed unknown.
    pub unknown: usize,
    /// Faults injected.
    pub faults: usize,
    /// Terms in which a leader was seen.
    pub leaders: u64,
    /// The index every replica applied at the end.
    pub applied: u64,
    /// Snapshots a follower answered without installing (its log already
    /// held their last entry; see `RangeReplica::handle_snapshot`).
    pub snapshots_not_installed: u64,
    /// Simulated time the run took.
    pub simulated: Duration,
    /// Wall-clock time the run took.
    pub wall: Duration,
    /// A hash of the run's history (ordered by time) and final state, to
    /// tell whether a replay went the same way as the first run.
    pub fingerprint: u64,
}

impl SimReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed={} {} ops={} unknown={} faults={} leaders={} applied={} snapshots_not_installed={} simulated={:.1}s wall={:.1}s fingerprint={:016x}",
            self.seed,
            if self.passed() { "PASS" } else { "FAIL" },
            self.ops,
            self.unknown,
            self.faults,
            self.leaders,
            self.applied,
            self.snapshots_not_installed,
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64(),
            self.fingerprint
        )?;
        for v in &self.violations {
            write!(f, "\n  violation: {v}")?;
        }
        Ok(())
    }
}

/// Where a run keeps its hosts' data: memory-backed when the machine has
/// it (real RocksDB and fsyncs, without waiting for a disk).
fn data_root() -> std::io::Result<tempfile::TempDir> {
    let shm = PathBuf::from("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("lmskv-sim-");
    if shm.is_dir() {
        b.tempdir_in(shm)
    } else {
        b.tempdir()
    }
}

/// Applies one fault to the simulation.
fn apply(sim: &mut turmoil::Sim<'_>, shared: &Shared, fault: &Fault, crashed: &mut Vec<u64>) {
    let ids: Vec<u64> = shared.ids().collect();
    let names = |set: &[u64]| set.iter().map(|i| host::host_name(*i)).collect::<Vec<_>>();
    let leader = shared.leader().map(|(id, _)| id);
    match fault {
        Fault::Partition { pick } => {
            // Half the time the leader alone, else a random split.
            let side: Vec<u64> = match leader {
                Some(l) if pick % 2 == 0 => vec![l],
                _ => ids
                    .iter()
                    .copied()
                    .filter(|i| (pick >> i) & 1 == 1)
                    .collect(),
            };
            let rest: Vec<u64> = ids.iter().copied().filter(|i| !side.contains(i)).collect();
            tracing::info!(?side, ?rest, "nemesis: partition");
            for a in names(&side) {
                for b in names(&rest) {
                    sim.partition(a.as_str(), b.as_str());
                }
            }
        }
        Fault::Repair => {
            for a in &ids {
                for b in &ids {
                    if a < b {
                        sim.repair(host::host_name(*a), host::host_name(*b));
                    }
                }
            }
        }
        Fault::Loss { rate } => {
            tracing::info!(rate, "nemesis: message loss");
            sim.set_fail_rate(*rate);
        }
        Fault::LossEnd => sim.set_fail_rate(0.0),
        Fault::Crash { pick } => {
            let running: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|i| !crashed.contains(i))
                .collect();
            let victim = match leader {
                Some(l) if pick % 2 == 0 => l,
                _ => running[(pick % running.len() as u64) as usize],
            };
            tracing::info!(node = victim, "nemesis: crash");
            sim.crash(host::host_name(victim));
            shared.host(victim).stopped();
            crashed.push(victim);
        }
        Fault::Restart => {
            for id in crashed.drain(..) {
                tracing::info!(node = id, "nemesis: restart");
                sim.bounce(host::host_name(id));
            }
        }
        Fault::Move { pick } => {
            let Some((l, view)) = shared.leader() else {
                return;
            };
            let spares: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|i| !view.voters.contains(i) && !crashed.contains(i))
                .collect();
            if spares.is_empty() || view.voters.is_empty() {
                return;
            }
            let out = if pick % 2 == 0 {
                l
            } else {
                view.voters[((pick >> 1) % view.voters.len() as u64) as usize]
            };
            let into = spares[((pick >> 8) % spares.len() as u64) as usize];
            let voters = view
                .voters
                .iter()
                .copied()
                .filter(|v| *v != out)
                .chain([into])
                .map(|v| (v, host::address(v)))
                .collect();
            tracing::info!(leader = l, out, into, "nemesis: move replica");
            if let Some(tx) = shared.host(l).sender() {
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = tx.try_send(host::Request::ChangeVoters { voters, reply });
            }
        }
    }
}

/// Checks what the clients saw and the replicas hold at the end.
fn final_checks(result: &WorkloadResult, shared: &Shared) {
    if let Some(f) = &result.failure {
        shared.violation(f.clone());
        return;
    }
    let report = check_history(
        &result.history,
        Budget {
            time_max: Duration::from_secs(60),
            ..Budget::default()
        },
    );
    if !report.is_linearizable() {
        shared.violation(format!("history: {report}"));
    }
    let Some((first, _, reference)) = result.dumps.first() else {
        shared.violation("no replica to compare".into());
        return;
    };
    for (node, applied, dump) in &result.dumps[1..] {
        if dump != reference {
            shared.violation(format!(
                "node {node} (applied {applied}) holds {dump:?}, node {first} holds {reference:?}"
            ));
        }
    }
    for (key, versions) in &result.acked {
        let newest = versions.iter().max().copied().unwrap_or(0);
        let held = reference.get(key).map(|(v, _)| *v).unwrap_or(0);
        if held < newest {
            shared.violation(format!(
                "acknowledged write of {key:?} at version {newest} lost: the replicas hold version {held}"
            ));
        }
    }
}

fn fingerprint(result: &WorkloadResult) -> u64 {
    let mut h = DefaultHasher::new();
    // Operations by time and client: tasks woken in the same simulated
    // instant may record theirs in either order.
    let mut ops: Vec<_> = result.history.ops().iter().collect();
    ops.sort_by_key(|o| (o.complete_at, o.invoke_at, o.client));
    for op in ops {
        format!("{op}").hash(&mut h);
    }
    for (node, applied, dump) in &result.dumps {
        (node, applied).hash(&mut h);
        for (k, (v, val)) in dump {
            (k, v, val).hash(&mut h);
        }
    }
    h.finish()
}

/// Runs one seed and reports what it found.
pub fn run_seed(seed: u64, opts: &SimOptions) -> std::io::Result<SimReport> {
    let wall = Instant::now();
    let root = data_root()?;
    // Every simulated host runs on this thread: openraft's draws follow the seed.
    lmskv_node::raft::runtime::seed_thread(Some(seed));
    let shared = Arc::new(Shared::new(opts.hosts, opts.voters));
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(opts.duration + opts.settle + Duration::from_secs(120))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .repair_rate(0.2)
        .build();
    for id in shared.ids() {
        let dir = root.path().join(format!("n{id}"));
        let shared = shared.clone();
        let snapshots = opts.snapshots;
        let rpc_timeout_min = opts.rpc_timeout_min_for(seed);
        sim.host(host::host_name(id), move || {
            host::boot(id, dir.clone(), shared.clone(), snapshots, rpc_timeout_min)
        });
    }
    let result = Arc::new(std::sync::Mutex::new(None));
    {
        let shared = shared.clone();
        let result = result.clone();
        let wopts = WorkloadOptions {
            clients: opts.clients,
            keys: opts.keys,
            until: opts.duration,
            settle: opts.settle,
        };
        sim.client("client", async move {
            let r = workload::run(shared, wopts, seed).await;
            *result.lock().expect("result lock") = Some(r);
            Ok(())
        });
    }

    let events: Vec<Event> = nemesis::plan(seed, opts.duration, opts.nemeses);
    let faults = events
        .iter()
        .filter(|e| !matches!(e.fault, Fault::Repair | Fault::LossEnd | Fault::Restart))
        .count();
    let mut next = 0;
    let mut crashed = Vec::new();
    let outcome = loop {
        while next < events.len() && events[next].at <= sim.elapsed() {
            apply(&mut sim, &shared, &events[next].fault, &mut crashed);
            next += 1;
        }
        match sim.step() {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    let simulated = sim.elapsed();
    if let Err(e) = outcome {
        shared.violation(format!("simulation failed: {e}"));
    }
    // Stop every host (closing its RocksDB) before the directories go.
    drop(sim);
    lmskv_node::raft::runtime::seed_thread(None);
    let result = result
        .lock()
        .expect("result lock")
        .take()
        .unwrap_or_default();
    final_checks(&result, &shared);
    if let Ok(path) = std::env::var("SIM_HISTORY") {
        let text: String = result
            .history
            .ops()
            .iter()
            .map(|op| format!("{op}\n"))
            .collect();
        std::fs::write(path, text)?;
    }
    let applied = result.dumps.first().map(|d| d.1).unwrap_or(0);
    let leaders = *shared.elections.lock().expect("elections lock");
    let snapshots_not_installed = *shared
        .snapshots_not_installed
        .lock()
        .expect("snapshots lock");
    Ok(SimReport {
        seed,
        violations: shared.violations(),
        ops: result.history.len(),
        unknown: result.unknown,
        faults,
        leaders,
        applied,
        snapshots_not_installed,
        simulated,
        wall: wall.elapsed(),
        fingerprint: fingerprint(&result),
    })
}

/// Logs to stderr at the level `SIM_LOG` names (e.g. `SIM_LOG=info`);
/// silent without it. Safe to call more than once.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    }
}
