//! `lmskv local up`: runs a cluster of real `lmskv-node` processes on this
//! machine, in the foreground, until Ctrl-C (SIGINT), SIGTERM or SIGHUP.
//!
//! The launcher checks everything it can before starting anything (node
//! count, free ports, the node binary), starts node `i` on
//! `127.0.0.1:(base_port + i - 1)` with its data in `DIR/node-i` and its output
//! appended to `DIR/node-i.log`, waits (bounded) until range 1 has a
//! leader and every node is up, and prints how to reach the cluster.
//!
//! Each node has a supervisor task that owns its process. A node that exits
//! on its own is reported and the others keep running. On a stop signal every
//! node gets SIGTERM and up to [`STOP_GRACE`] to exit before it is killed; a
//! second signal kills at once. Starting again with the same data directory
//! resumes the same cluster: the nodes find their identity in their data dirs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use lmskv_client::Client;
use lmskv_proto::v1::StatusResponse;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cmd::{parse_duration, CmdError, Context};
use crate::output::{self, OutputFormat, Table};

/// Most nodes `local up` runs: enough for 5-way replication with room to
/// spare, few enough for one machine.
pub const NODES_MAX: u16 = 15;

/// The address every local node listens on.
pub const HOST: &str = "127.0.0.1";

/// Name of the node binary.
pub const NODE_BIN_NAME: &str = "lmskv-node";

/// How long a node may take to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Time between two readiness probes while the cluster starts.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Deadline of each client call made by a readiness probe.
const READY_PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Local cluster commands.
#[derive(Debug, Clone, Subcommand)]
pub enum LocalCommand {
    /// Run a local cluster of lmskv-node processes in the foreground until
    /// Ctrl-C.
    ///
    /// Node N listens on 127.0.0.1:(BASE_PORT + N - 1), keeps its data in
    /// DATA_DIR/node-N and appends its output to DATA_DIR/node-N.log. Running
    /// the command again with the same data directory restarts the same
    /// cluster with its data.
    Up(UpArgs),
}

/// Arguments of `lmskv local up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Number of nodes to run (1 to 15).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=i64::from(NODES_MAX)))]
    pub nodes: u16,
    /// Directory for the nodes' data directories and log files; created when
    /// missing and reused by later runs.
    #[arg(long, default_value = "./lmskv-data")]
    pub data_dir: PathBuf,
    /// Port of node 1; node N listens on BASE_PORT + N - 1.
    #[arg(long, default_value_t = 7001, value_parser = clap::value_parser!(u16).range(1..))]
    pub base_port: u16,
    /// The lmskv-node binary. Default: lmskv-node next to this lmskv
    /// executable, else lmskv-node on PATH.
    #[arg(long, env = "LMSKV_NODE_BIN", value_name = "PATH")]
    pub node_bin: Option<PathBuf>,
    /// A node configuration file (TOML) every node is started with
    /// (`lmskv-node --config`), e.g. pre-split keys or split rows.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long to wait for the cluster to elect a leader and report every
    /// node up, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub ready_timeout: Duration,
    /// Worker threads of each node (`lmskv-node --worker-threads`). Default:
    /// the host's CPU cores shared out among the nodes, at least one each,
    /// since the nodes all run on this host.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    pub worker_threads: Option<u16>,
}

/// Worker threads for each of `nodes` nodes that share this host: its CPU
/// cores divided among them, at least one each. A node with more threads
/// than its share wakes idle threads for work another node's thread could
/// have run, and each wake-up is a context switch.
pub fn shared_host_worker_threads(nodes: u16) -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = cores / usize::from(nodes.max(1));
    u16::try_from(share.clamp(1, 1024)).unwrap_or(1)
}

/// Runs one `lmskv local` subcommand.
pub async fn run(ctx: &Context, command: LocalCommand) -> Result<(), CmdError> {
    match command {
        LocalCommand::Up(args) => up(ctx, args).await,
    }
}

/// Where and how one node of the local cluster runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The node's id, 1-based.
    pub node_id: u64,
    /// `HOST:PORT` the node listens on.
    pub address: String,
    /// The port of `address`.
    pub port: u16,
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// The file the node's stdout and stderr are appended to.
    pub log: PathBuf,
}

/// Lays out `nodes` nodes from `base_port` under `data_dir`; fails when the
/// ports would run past 65535.
pub fn plan(nodes: u16, base_port: u16, data_dir: &Path) -> Result<Vec<NodePlan>, CmdError> {
    if nodes == 0 || nodes > NODES_MAX {
        return Err(CmdError::Usage(format!(
            "--nodes must be between 1 and {NODES_MAX}"
        )));
    }
    (1..=nodes)
        .map(|i| {
            let port = base_port.checked_add(i - 1).ok_or_else(|| {
                CmdError::Usage(format!(
                    "--base-port {base_port} leaves no room for {nodes} nodes below port 65536"
                ))
            })?;
            Ok(NodePlan {
                node_id: u64::from(i),
                address: format!("{HOST}:{port}"),
                port,
                data_dir: data_dir.join(format!("node-{i}")),
                log: data_dir.join(format!("node-{i}.log")),
            })
        })
        .collect()
}

/// Fails when another process already listens on one of the planned ports.
fn check_ports_free(plans: &[NodePlan]) -> Result<(), CmdError> {
    for p in plans {
        // The probe listener is dropped at once; the node binds the port next.
        if let Err(e) = TcpListener::bind((HOST, p.port)) {
            return Err(CmdError::Failed(
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!(
                    "port {} on {HOST} is already in use (is another cluster running? stop it or pass --base-port)",
                    p.port
                )
                } else {
                    format!("cannot use port {} on {HOST}: {e}", p.port)
                },
            ));
        }
    }
    Ok(())
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn search_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// The node configuration file as an absolute path, after checking that it
/// can be read; the nodes themselves validate its content and refuse to
/// start (with the reason in their log) when it is wrong.
pub fn node_config(path: &Path) -> Result<PathBuf, CmdError> {
    let abs = fs::canonicalize(path)
        .map_err(|e| CmdError::Usage(format!("--config {}: {e}", path.display())))?;
    fs::read_to_string(&abs).map_err(|e| {
        CmdError::Usage(format!("--config {}: cannot read it: {e}", path.display()))
    })?;
    Ok(abs)
}

/// Finds the node binary: `explicit` (from --node-bin or `LMSKV_NODE_BIN`),
/// else `lmskv-node` next to the current executable, else on `PATH`.
pub fn find_node_bin(explicit: Option<&Path>) -> Result<PathBuf, CmdError> {
    if let Some(p) = explicit {
        // A bare name is looked up on PATH, as a shell would.
        let bare = p.components().count() == 1
            && matches!(p.components().next(), Some(Component::Normal(_)));
        if bare {
            if let Some(found) = search_path(p) {
                return Ok(found);
            }
        }
        if is_executable_file(p) {
            return Ok(p.to_path_buf());
        }
        return Err(CmdError::Failed(format!(
            "node binary {} (from --node-bin or LMSKV_NODE_BIN) does not exist or is not executable",
            p.display()
        )));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(NODE_BIN_NAME)))
        .filter(|p| is_executable_file(p));
    beside
        .or_else(|| search_path(Path::new(NODE_BIN_NAME)))
        .ok_or_else(|| {
            CmdError::Failed(format!(
                "cannot find {NODE_BIN_NAME} next to lmskv or on PATH; build it (cargo build -p lmskv-node) \
                 and pass --node-bin PATH or set LMSKV_NODE_BIN"
            ))
        })
}

/// The stop signals `local up` reacts to, registered before any node starts
/// so that none is lost.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn register() -> Result<Signals, CmdError> {
        let reg = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| CmdError::Failed(format!("cannot handle {name}: {e}")))
        };
        Ok(Signals {
            interrupt: reg(SignalKind::interrupt(), "SIGINT")?,
            terminate: reg(SignalKind::terminate(), "SIGTERM")?,
            hangup: reg(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Waits for the next stop signal and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = self.interrupt.recv() => "SIGINT",
            Some(()) = self.terminate.recv() => "SIGTERM",
            Some(()) = self.hangup.recv() => "SIGHUP",
            else => std::future::pending().await,
        }
    }
}

/// What the launcher asks of every node supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    /// Send SIGTERM and wait up to [`STOP_GRACE`].
    Stop,
    /// Kill at once.
    Kill,
}

/// A node process that exited while it should have been running.
#[derive(Debug)]
struct NodeExit {
    node_id: u64,
    status: String,
}

/// How a supervisor ended.
#[derive(Debug)]
enum Outcome {
    /// The node had exited on its own before the stop (already reported).
    ExitedEarlier,
    /// The node exited after SIGTERM.
    Stopped(ExitStatus),
    /// The node was killed (grace time over, or a second signal).
    Killed,
    /// The node's state could not be observed.
    Lost(String),
}

/// A running node and its supervisor.
struct RunningNode {
    plan: NodePlan,
    pid: u32,
    supervisor: JoinHandle<Outcome>,
}

/// The nodes started so far and the switch that stops them.
struct Cluster {
    nodes: Vec<RunningNode>,
    phase: watch::Sender<Phase>,
    exits_tx: mpsc::Sender<NodeExit>,
}

impl Cluster {
    fn new() -> (Cluster, mpsc::Receiver<NodeExit>) {
        let (phase, _) = watch::channel(Phase::Run);
        let (exits_tx, exits_rx) = mpsc::channel(usize::from(NODES_MAX));
        (
            Cluster {
                nodes: Vec::new(),
                phase,
                exits_tx,
            },
            exits_rx,
        )
    }

    /// Starts one node with its output appended to its log file.
    fn spawn(
        &mut self,
        bin: &Path,
        config: Option<&Path>,
        plan: &NodePlan,
        join: &str,
        worker_threads: u16,
    ) -> Result<(), CmdError> {
        let open_log = || -> std::io::Result<(File, File)> {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&plan.log)?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            writeln!(
                log,
                "--- lmskv local up: starting node {} on {} (unix time {now}) ---",
                plan.node_id, plan.address
            )?;
            let err = log.try_clone()?;
            Ok((log, err))
        };
        let (out, err) = open_log().map_err(|e| {
            CmdError::Failed(format!("cannot open log file {}: {e}", plan.log.display()))
        })?;
        let mut cmd = Command::new(bin);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd
            .arg("--node-id")
            .arg(plan.node_id.to_string())
            .arg("--listen")
            .arg(&plan.address)
            .arg("--data-dir")
            .arg(&plan.data_dir)
            .arg("--join")
            .arg(join)
            .arg("--worker-threads")
            .arg(worker_threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // A safety net: should the launcher fail, no node outlives it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CmdError::Failed(format!("cannot start {}: {e}", bin.display())))?;
        let pid = match child.id() {
            Some(pid) => pid,
            None => {
                let status = child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or_else(|| "unknown status".to_string(), |s| s.to_string());
                return Err(CmdError::Failed(format!(
                    "node {} exited at once ({status}); see {}",
                    plan.node_id,
                    plan.log.display()
                )));
            }
        };
        let supervisor = tokio::spawn(supervise(
            child,
            pid,
            plan.node_id,
            self.phase.subscribe(),
            self.exits_tx.clone(),
        ));
        self.nodes.push(RunningNode {
            plan: plan.clone(),
            pid,
            supervisor,
        });
        Ok(())
    }

    /// Stops every node: SIGTERM, then a kill after [`STOP_GRACE`] or at a
    /// second stop signal. Reports how each node ended.
    async fn stop(self, signals: &mut Signals) {
        let running = self
            .nodes
            .iter()
            .filter(|n| !n.supervisor.is_finished())
            .count();
        if running > 0 {
            output::progress(&format!(
                "stopping {running} node(s) (up to {} s; press Ctrl-C again to kill them now)\n",
                STOP_GRACE.as_secs()
            ));
        }
        // `send_replace`: the value must change even when every supervisor
        // has already ended and nobody listens.
        self.phase.send_replace(Phase::Stop);
        let phase = self.phase;
        let waits = join_supervisors(self.nodes);
        tokio::pin!(waits);
        let results = loop {
            tokio::select! {
                biased;
                results = &mut waits => break results,
                sig = signals.recv() => {
                    output::progress(&format!("{sig} received again, killing the nodes\n"));
                    phase.send_replace(Phase::Kill);
                }
            }
        };
        for (plan, outcome) in results {
            let what = match outcome {
                Outcome::ExitedEarlier => continue,
                Outcome::Stopped(status) if status.success() => "stopped".to_string(),
                Outcome::Stopped(status) => format!("stopped ({status})"),
                Outcome::Killed => "killed".to_string(),
                Outcome::Lost(reason) => format!("state unknown: {reason}"),
            };
            output::progress(&format!("node {} {what}\n", plan.node_id));
        }
    }
}

/// Awaits every supervisor in turn; they run concurrently, so the total wait
/// is the longest one, not the sum.
async fn join_supervisors(nodes: Vec<RunningNode>) -> Vec<(NodePlan, Outcome)> {
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let outcome = match n.supervisor.await {
            Ok(o) => o,
            Err(e) => Outcome::Lost(format!("supervisor failed: {e}")),
        };
        out.push((n.plan, outcome));
    }
    out
}

/// Waits until the launcher asks for `wanted` or more (`Kill` implies
/// `Stop`); a launcher that is gone counts as asking for it.
async fn phase_reached(phase: &mut watch::Receiver<Phase>, wanted: Phase) {
    // The guard `wait_for` returns must not be held across an await.
    let _ = phase
        .wait_for(|p| match wanted {
            Phase::Run => true,
            Phase::Stop => *p != Phase::Run,
            Phase::Kill => *p == Phase::Kill,
        })
        .await
        .map(|_| ());
}

/// Owns one node process: reports it if it exits on its own, stops it when
/// the phase says so.
async fn supervise(
    mut child: Child,
    pid: u32,
    node_id: u64,
    mut phase: watch::Receiver<Phase>,
    exits: mpsc::Sender<NodeExit>,
) -> Outcome {
    tokio::select! {
        // The stop request first: a node that exits because it was asked to
        // (or got the same Ctrl-C from the terminal) is not an unexpected exit.
        biased;
        () = phase_reached(&mut phase, Phase::Stop) => {}
        status = child.wait() => {
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exits.send(NodeExit { node_id, status }).await;
            return Outcome::ExitedEarlier;
        }
    }
    if let Ok(Some(status)) = child.try_wait() {
        return Outcome::Stopped(status);
    }
    let kill_now = *phase.borrow() == Phase::Kill;
    if !kill_now {
        // Until it is reaped below the child's pid cannot be reused, so the
        // signal reaches this node and nothing else.
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if sent {
            let graceful = tokio::select! {
                r = tokio::time::timeout(STOP_GRACE, child.wait()) => r.ok(),
                () = phase_reached(&mut phase, Phase::Kill) => None,
            };
            match graceful {
                Some(Ok(status)) => return Outcome::Stopped(status),
                Some(Err(e)) => return Outcome::Lost(format!("wait failed: {e}")),
                None => {}
            }
        }
    }
    match child.kill().await {
        Ok(()) => Outcome::Killed,
        Err(e) => Outcome::Lost(format!("kill failed: {e}")),
    }
}

/// Whether a status report shows the launched cluster ready: the first range
/// has a leader and every node in `node_ids` is up. `Err` says what is missing.
pub fn readiness(status: &StatusResponse, node_ids: &[u64]) -> Result<u64, String> {
    let leader = match status.ranges.first() {
        None => return Err("no range reported yet".into()),
        Some(r) if r.leader_id == 0 => return Err("no leader elected yet".into()),
        Some(r) => r.leader_id,
    };
    let not_up: Vec<String> = node_ids
        .iter()
        .filter(|id| {
            !status
                .nodes
                .iter()
                .any(|n| n.node_id == **id && n.state == "up")
        })
        .map(u64::to_string)
        .collect();
    if !not_up.is_empty() {
        return Err(format!("node(s) {} not up yet", not_up.join(",")));
    }
    Ok(leader)
}

/// Probes the cluster until it is ready and returns the leader's node id.
/// Never returns otherwise; the caller bounds it.
async fn wait_ready(client: &Client, node_ids: &[u64], last_reason: &mut String) -> u64 {
    loop {
        match client.status().await {
            Ok(s) => match readiness(&s, node_ids) {
                Ok(leader) => return leader,
                Err(reason) => *last_reason = reason,
            },
            Err(e) => *last_reason = output::one_line(&e.to_string()),
        }
        output::progress(".");
        tokio::time::sleep(READY_PROBE_INTERVAL).await;
    }
}

/// What `local up -o json` prints once the cluster is ready.
#[derive(Debug, Clone, Serialize)]
struct ReadyView {
    endpoints: Vec<String>,
    leader: u64,
    nodes: Vec<ReadyNodeView>,
}

#[derive(Debug, Clone, Serialize)]
struct ReadyNodeView {
    node_id: u64,
    address: String,
    pid: u32,
    data_dir: String,
    log: String,
}

fn render_ready(view: &ReadyView) -> String {
    let mut table = Table::new(&["NODE", "ADDRESS", "PID", "DATA", "LOG"]);
    for n in &view.nodes {
        table.push(vec![
            n.node_id.to_string(),
            n.address.clone(),
            n.pid.to_string(),
            n.data_dir.clone(),
            n.log.clone(),
        ]);
    }
    let endpoints = view.endpoints.join(",");
    format!(
        "lmskv local cluster is up: {} node(s), node {} leads range 1.\n\n{}\n\
         Endpoints: {endpoints}\n\n\
         Try:\n  lmskv --endpoints {endpoints} kv put hello world\n  \
         lmskv --endpoints {endpoints} kv get hello\n  \
         lmskv --endpoints {endpoints} status\n\n\
         Press Ctrl-C to stop the cluster.\n",
        view.nodes.len(),
        view.leader,
        table.render()
    )
}

async fn up(ctx: &Context, args: UpArgs) -> Result<(), CmdError> {
    // Check everything before starting anything.
    let data_dir = std::path::absolute(&args.data_dir).map_err(|e| {
        CmdError::Failed(format!(
            "cannot resolve data dir {}: {e}",
            args.data_dir.display()
        ))
    })?;
    let plans = plan(args.nodes, args.base_port, &data_dir)?;
    check_ports_free(&plans)?;
    let bin = find_node_bin(args.node_bin.as_deref())?;
    let config = args.config.as_deref().map(node_config).transpose()?;
    fs::create_dir_all(&data_dir).map_err(|e| {
        CmdError::Failed(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let mut signals = Signals::register()?;

    let addresses: Vec<String> = plans.iter().map(|p| p.address.clone()).collect();
    let join = addresses.join(",");
    let node_ids: Vec<u64> = plans.iter().map(|p| p.node_id).collect();
    let (mut cluster, mut exits) = Cluster::new();
    let workers = args
        .worker_threads
        .unwrap_or_else(|| shared_host_worker_threads(args.nodes));
    output::progress(&format!(
        "starting {} node(s) from {} with data in {}, {workers} worker thread(s) each\n",
        plans.len(),
        bin.display(),
        data_dir.display()
    ));
    for p in &plans {
        if let Err(e) = cluster.spawn(&bin, config.as_deref(), p, &join, workers) {
            cluster.stop(&mut signals).await;
            return Err(e);
        }
        output::progress(&format!(
            "  node {} on {}, log {}\n",
            p.node_id,
            p.address,
            p.log.display()
        ));
    }

    let client = Client::builder()
        .endpoints(addresses.iter().cloned())
        .deadline(READY_PROBE_DEADLINE)
        .build()
        .map_err(CmdError::Client);
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            cluster.stop(&mut signals).await;
            return Err(e);
        }
    };
    output::progress(&format!(
        "waiting up to {} s for a leader and every node up",
        args.ready_timeout.as_secs()
    ));
    let deadline = Instant::now() + args.ready_timeout;
    let mut last_reason = String::from("no answer yet");
    let leader = tokio::select! {
        // Signals first: nodes share the terminal, so Ctrl-C also makes them
        // exit, and that must not read as a start-up failure.
        biased;
        sig = signals.recv() => {
            output::progress(&format!("\n{sig} received before the cluster was ready\n"));
            cluster.stop(&mut signals).await;
            return Ok(());
        }
        leader = wait_ready(&client, &node_ids, &mut last_reason) => leader,
        Some(exit) = exits.recv() => {
            output::progress("\n");
            let log = log_of(&plans, exit.node_id);
            cluster.stop(&mut signals).await;
            return Err(CmdError::Failed(format!(
                "node {} exited during start-up ({}); see {log}",
                exit.node_id, exit.status
            )));
        }
        _ = tokio::time::sleep_until(deadline) => {
            output::progress("\n");
            cluster.stop(&mut signals).await;
            let logs: Vec<String> = plans.iter().map(|p| p.log.display().to_string()).collect();
            return Err(CmdError::Failed(format!(
                "the cluster was not ready after {} s ({last_reason}); see the logs: {}",
                args.ready_timeout.as_secs(),
                logs.join(" ")
            )));
        }
    };
    output::progress(" ready\n");

    let view = ReadyView {
        endpoints: addresses.clone(),
        leader,
        nodes: cluster
            .nodes
            .iter()
            .map(|n| ReadyNodeView {
                node_id: n.plan.node_id,
                address: n.plan.address.clone(),
                pid: n.pid,
                data_dir: n.plan.data_dir.display().to_string(),
                log: n.plan.log.display().to_string(),
            })
            .collect(),
    };
    let printed = match ctx.format {
        OutputFormat::Json => output::json(&view).and_then(|j| output::print(&j)),
        OutputFormat::Table => output::print(&render_ready(&view)),
    };
    if let Err(e) = printed {
        cluster.stop(&mut signals).await;
        return Err(e);
    }

    let mut running = cluster.nodes.len();
    loop {
        tokio::select! {
            biased;
            sig = signals.recv() => {
                output::progress(&format!("{sig} received\n"));
                break;
            }
            Some(exit) = exits.recv() => {
                running = running.saturating_sub(1);
                output::warn(&format!(
                    "node {} exited unexpectedly ({}); {running} node(s) still running; see {}",
                    exit.node_id,
                    exit.status,
                    log_of(&plans, exit.node_id)
                ));
                if running == 0 {
                    cluster.stop(&mut signals).await;
                    return Err(CmdError::Failed("every node has exited; see the logs".into()));
                }
            }
        }
    }
    cluster.stop(&mut signals).await;
    Ok(())
}

fn log_of(plans: &[NodePlan], node_id: u64) -> String {
    plans
        .iter()
        .find(|p| p.node_id == node_id)
        .map_or_else(|| "the logs".to_string(), |p| p.log.display().to_string())
}

#[cfg(test)]
mod tests {
    use lmskv_proto::v1::{NodeInfo, RangeStatus};

    use super::*;

    #[test]
    fn nodes_on_one_host_share_its_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for nodes in 1..=NODES_MAX {
            let each = usize::from(shared_host_worker_threads(nodes));
            assert!(each >= 1, "{nodes} nodes get no thread");
            if usize::from(nodes) <= cores {
                assert!(
                    each * usize::from(nodes) <= cores,
                    "{nodes} nodes get {each} each"
                );
                assert!(
                    (each + 1) * usize::from(nodes) > cores,
                    "{nodes} nodes leave cores idle"
                );
            } else {
                assert_eq!(each, 1);
            }
        }
    }

    #[test]
    fn plan_lays_out_ports_dirs_and_logs() {
        let plans = plan(3, 7001, Path::new("/d")).expect("plan");
        assert_eq!(plans.len(), 3);
        assert_eq!(plans[2].node_id, 3);
        assert_eq!(plans[2].address, "127.0.0.1:7003");
        assert_eq!(plans[2].data_dir, Path::new("/d/node-3"));
        assert_eq!(plans[2].log, Path::new("/d/node-3.log"));
        assert!(plan(0, 7001, Path::new("/d")).is_err());
        assert!(plan(NODES_MAX + 1, 7001, Path::new("/d")).is_err());
        assert!(plan(3, 65534, Path::new("/d")).is_err());
        assert!(plan(2, 65534, Path::new("/d")).is_ok());
    }

    #[test]
    fn busy_ports_are_refused() {
        let busy = TcpListener::bind((HOST, 0)).expect("bind a free port");
        let port = busy.local_addr().expect("local addr").port();
        let plans = plan(1, port, Path::new("/d")).expect("plan");
        let err = check_ports_free(&plans).expect_err("port is busy");
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(busy);
    }

    #[test]
    fn a_missing_node_config_is_a_usage_error() {
        let err = node_config(Path::new("/nonexistent/lmskv-node.toml")).expect_err("missing");
        assert!(matches!(err, CmdError::Usage(_)), "{err:?}");
        let dir = std::env::temp_dir();
        let file = dir.join(format!("lmskv-local-config-{}.toml", std::process::id()));
        fs::write(&file, "balance_leaders = false\n").unwrap();
        let got = node_config(&file).unwrap();
        assert!(got.is_absolute());
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn missing_node_binary_is_refused() {
        let err = find_node_bin(Some(Path::new("/nonexistent/lmskv-node"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/lmskv-node"), "{err}");
    }

    #[test]
    fn readiness_needs_a_leader_and_every_node_up() {
        let node = |id: u64, state: &str| NodeInfo {
            node_id: id,
            address: format!("127.0.0.1:700{id}"),
            state: state.into(),
            ..Default::default()
        };
        let mut s = StatusResponse {
            nodes: vec![node(1, "up"), node(2, "up"), node(3, "down")],
            ..Default::default()
        };
        assert!(readiness(&s, &[1, 2, 3]).is_err());
        s.ranges.push(RangeStatus::default());
        assert_eq!(
            readiness(&s, &[1, 2, 3]),
            Err("no leader elected yet".into())
        );
        s.ranges[0].leader_id = 2;
        assert_eq!(
            readiness(&s, &[1, 2, 3]),
            Err("node(s) 3 not up yet".into())
        );
        s.nodes[2].state = "up".into();
        assert_eq!(readiness(&s, &[1, 2, 3]), Ok(2));
    }

    #[test]
    fn ready_text_shows_how_to_use_the_cluster() {
        let view = ReadyView {
            endpoints: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
            leader: 1,
            nodes: vec![ReadyNodeView {
                node_id: 1,
                address: "127.0.0.1:7001".into(),
                pid: 42,
                data_dir: "/d/node-1".into(),
                log: "/d/node-1.log".into(),
            }],
        };
        let text = render_ready(&view);
        assert!(text.contains("lmskv --endpoints 127.0.0.1:7001,127.0.0.1:7002 kv put hello world"));
        assert!(text.contains("/d/node-1.log"));
    }
}
