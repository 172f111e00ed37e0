//! [`TestCluster`]: a cluster of real `lmskv-node` processes on 127.0.0.1,
//! with free ports, a temporary data dir, and process-level faults (kill -9,
//! SIGTERM, SIGSTOP/SIGCONT, restart). Everything is cleaned up on drop.
//!
//! Network faults ([`TestCluster::disrupt`], [`TestCluster::partition`])
//! need one of two networks, chosen at start: every node in its own Linux
//! network namespace ([`ClusterOptions::netns`], root only; faults act on IP
//! packets), or a TCP proxy in front of every node
//! ([`ClusterOptions::proxied`]; faults act on connections).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lmskv_client::Client;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::kv_client::KvClient;
use lmskv_proto::v1::{StatusRequest, StatusResponse};
use rustix::process::{kill_process, Pid, Signal};
use tonic::transport::Channel;

use crate::netns::{Fabric, NODE_PORT};
use crate::partition::{CutRoute, Fault, LinkFault};
use crate::proxy::Proxy;

static START: OnceLock<Instant> = OnceLock::new();

/// Seconds since the first harness call, for phase logs.
pub fn elapsed_s() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Worker threads for each of `nodes` nodes sharing this host, the share
/// `lmskv local up` gives them: the host's cores divided among them, at
/// least one each.
pub fn shared_host_worker_threads(nodes: usize) -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from((cores / nodes.max(1)).clamp(1, 1024)).unwrap_or(1)
}

/// How a test cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Extra TOML for every node's `--config` file.
    pub config: String,
    /// Put a [`Proxy`] in front of every node (the node advertises the
    /// proxy's address), for tests that lose replies or cut nodes off.
    pub proxied: bool,
    /// Run every node in its own namespace of this fabric (which must have
    /// a namespace for each node), listening on its fabric address. The
    /// cluster must be started and used from the hub namespace
    /// ([`Fabric::block_on`]). Takes precedence over `proxied`.
    pub netns: Option<Arc<Fabric>>,
    /// `lmskv-node --worker-threads` of every node (`None`: the node's
    /// default, one per core).
    pub worker_threads: Option<u16>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            config: String::new(),
            proxied: false,
            netns: None,
            worker_threads: None,
        }
    }
}

/// One node process of a [`TestCluster`].
#[derive(Debug)]
pub struct NodeProc {
    pub id: u64,
    /// The address clients and peers use: the proxy's when there is one.
    pub addr: String,
    /// The address the node listens on.
    pub listen: String,
    /// The proxy in front of the node, when the cluster has them.
    pub proxy: Option<Proxy>,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

/// A running cluster of node processes.
#[derive(Debug)]
pub struct TestCluster {
    dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    node_bin: PathBuf,
    config_path: PathBuf,
    /// The namespaces the nodes run in; dropped after the nodes are killed.
    fabric: Option<Arc<Fabric>>,
    worker_threads: Option<u16>,
    /// Panics in this process before the cluster started (see `Drop`).
    panics_before: u64,
}

/// The directory the workspace's binaries are built into, next to the test binary.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>; a binary of this
    // crate (e.g. lmskv-chaos) sits in target/<profile> itself.
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary (`lmskv-node`, `lmskv`), overridable with `LMSKV_BIN_DIR`.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("LMSKV_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(bin_dir);
    dir.join(name)
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The loopback address node `id` of a proxied cluster connects to its
/// peers from, so that proxies can tell the nodes apart.
pub fn source_ip(id: u64) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 0, 0, 10 + id as u8).into()
}

/// Client-side tracing for a closer look at a test's requests:
/// `LMSKV_TEST_CLIENT_LOG=lmskv_client=debug` prints the client's events to stderr.
fn client_tracing() {
    if let Ok(filter) = std::env::var("LMSKV_TEST_CLIENT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

impl TestCluster {
    /// Starts `opts.nodes` nodes that form a new cluster, and waits for a leader.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<TestCluster> {
        elapsed_s();
        note_panics();
        client_tracing();
        let node_bin = binary("lmskv-node");
        if !node_bin.exists() {
            bail!(
                "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
                node_bin.display()
            );
        }
        if let Some(f) = &opts.netns {
            if opts.nodes > f.nodes() {
                bail!(
                    "the fabric has namespaces for {} nodes, not {}",
                    f.nodes(),
                    opts.nodes
                );
            }
            if !f.in_hub() {
                bail!("a cluster in network namespaces is started from the hub namespace (Fabric::block_on)");
            }
        }
        let dir = tempfile::Builder::new().prefix("lmskv-test-").tempdir()?;
        let config_path = dir.path().join("node.toml");
        // Short timeouts keep tests quick; tests may override any of them.
        // Leaders stay where elections put them unless a test turns leader
        // balancing on: most tests pick a leader or a follower to stop.
        let mut config = String::from(
            "election_timeout_ms_min = 500\nelection_timeout_ms_max = 1000\nheartbeat_interval_ms = 100\nbalance_leaders = false\n",
        );
        // `LMSKV_TEST_NODE_CONFIG` (TOML lines) overrides both, e.g. to run
        // chaos with other Raft timeouts.
        let extra = std::env::var("LMSKV_TEST_NODE_CONFIG").unwrap_or_default();
        for line in opts.config.lines().chain(extra.lines()) {
            let key = line.split('=').next().unwrap_or("").trim();
            if !key.is_empty() {
                config = config
                    .lines()
                    .filter(|l| l.split('=').next().unwrap_or("").trim() != key)
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
            config.push_str(line);
            config.push('\n');
        }
        std::fs::write(&config_path, config)?;
        let mut nodes = Vec::new();
        let mut used = Vec::new();
        for i in 1..=opts.nodes as u64 {
            if let Some(f) = &opts.netns {
                let listen = format!("{}:{NODE_PORT}", f.node_ip(i));
                nodes.push(NodeProc {
                    id: i,
                    addr: listen.clone(),
                    listen,
                    proxy: None,
                    data_dir: dir.path().join(format!("node-{i}")),
                    log_path: dir.path().join(format!("node-{i}.log")),
                    child: None,
                });
                continue;
            }
            let mut port = free_port()?;
            while used.contains(&port) {
                port = free_port()?;
            }
            used.push(port);
            let listen = format!("127.0.0.1:{port}");
            let proxy = if opts.proxied {
                Some(Proxy::start(listen.clone()).await?)
            } else {
                None
            };
            nodes.push(NodeProc {
                id: i,
                addr: proxy
                    .as_ref()
                    .map_or_else(|| listen.clone(), |p| p.addr().to_string()),
                listen,
                proxy,
                data_dir: dir.path().join(format!("node-{i}")),
                log_path: dir.path().join(format!("node-{i}.log")),
                child: None,
            });
        }
        let mut c = TestCluster {
            dir,
            nodes,
            node_bin,
            config_path,
            fabric: opts.netns.clone(),
            worker_threads: opts.worker_threads,
            panics_before: PANICS.load(std::sync::atomic::Ordering::Relaxed),
        };
        for i in 1..=opts.nodes as u64 {
            c.spawn(i)?;
        }
        if let Err(e) = c.wait_leader(Duration::from_secs(30)).await {
            // The cluster is dropped before the test panics on the error,
            // so its drop would not show why: the logs go out here.
            eprintln!("{}", c.log_tails(40));
            return Err(e);
        }
        Ok(c)
    }

    /// The temporary directory holding data dirs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut NodeProc {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Every node's address.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        self.node(id).addr.clone()
    }

    /// The network the nodes talk over: `netns` (a namespace each),
    /// `proxy` (a TCP proxy in front of each) or `loopback` (no network
    /// faults possible).
    pub fn network(&self) -> &'static str {
        if self.fabric.is_some() {
            "netns"
        } else if self.nodes.iter().any(|n| n.proxy.is_some()) {
            "proxy"
        } else {
            "loopback"
        }
    }

    /// The namespaces the nodes run in, for clusters started with `netns`.
    pub fn fabric(&self) -> Option<&Arc<Fabric>> {
        self.fabric.as_ref()
    }

    /// Partitions nodes `a` from nodes `b`, both ways: their connections to
    /// each other break and new ones fail. Clients still reach every node.
    /// Panics on a cluster with neither namespaces nor proxies.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut faults = Vec::new();
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    faults.push(LinkFault {
                        from,
                        to,
                        fault: Fault::Cut(CutRoute::Prohibit),
                    });
                }
            }
        }
        self.disrupt(&faults).expect("partition the cluster");
    }

    /// Applies link faults between nodes (on top of those in place).
    /// In namespaces a fault `from -> to` acts on IP packets from `from` to
    /// `to`; behind proxies, on connections `from` opens to `to` (its
    /// proxy refuses or stalls them).
    pub fn disrupt(&self, faults: &[LinkFault]) -> anyhow::Result<()> {
        if let Some(f) = &self.fabric {
            return f.apply(faults);
        }
        if self.network() != "proxy" {
            bail!("network faults need a cluster started with netns or proxied");
        }
        for lf in faults {
            match lf.fault {
                Fault::Cut(_) => self.proxy(lf.to).block(source_ip(lf.from)),
                Fault::Loss(percent) => self.proxy(lf.to).lose(source_ip(lf.from), percent),
            }
        }
        Ok(())
    }

    /// Ends every partition, cut and loss; an error says which undo failed
    /// (the others were still undone).
    pub fn try_heal_network(&self) -> anyhow::Result<()> {
        if let Some(f) = &self.fabric {
            return f.heal();
        }
        for n in &self.nodes {
            if let Some(p) = &n.proxy {
                p.heal();
            }
        }
        Ok(())
    }

    /// Ends every partition, cut and loss (an error is logged).
    pub fn heal_network(&self) {
        if let Err(e) = self.try_heal_network() {
            crate::phase!("heal network: {e:#}");
        }
    }

    /// The proxy in front of node `id` (clusters started with `proxied`).
    pub fn proxy(&self, id: u64) -> &Proxy {
        self.node(id)
            .proxy
            .as_ref()
            .expect("the cluster was started with proxied: true")
    }

    /// Adds a new node that joins the running cluster through `--join`; returns its id.
    pub fn add_node(&mut self) -> anyhow::Result<u64> {
        self.add_node_with_env(&[])
    }

    /// [`TestCluster::add_node`] with extra environment variables for the
    /// new node's process, e.g. `FAILPOINTS`.
    pub fn add_node_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<u64> {
        if self.fabric.is_some() {
            bail!("adding a node to a cluster in network namespaces is not supported");
        }
        let id = self.nodes.len() as u64 + 1;
        let used: Vec<String> = self.endpoints();
        let mut port = free_port()?;
        while used.contains(&format!("127.0.0.1:{port}")) {
            port = free_port()?;
        }
        let listen = format!("127.0.0.1:{port}");
        self.nodes.push(NodeProc {
            id,
            addr: listen.clone(),
            listen,
            proxy: None,
            data_dir: self.dir.path().join(format!("node-{id}")),
            log_path: self.dir.path().join(format!("node-{id}.log")),
            child: None,
        });
        self.spawn_with_env(id, env)?;
        Ok(id)
    }

    /// Starts (or restarts) node `id` with its data dir.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn_with_env(id, &[])
    }

    /// Starts (or restarts) node `id` with extra environment variables for
    /// this run of the process only, e.g. `FAILPOINTS` (node binaries built
    /// with `--features lmskv-node/failpoints`).
    pub fn spawn_with_env(&mut self, id: u64, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let join = self.endpoints().join(",");
        let bin = self.node_bin.clone();
        let cfg = self.config_path.clone();
        let mut cmd = match &self.fabric {
            Some(f) => f.command(id, &bin),
            None => Command::new(&bin),
        };
        if let Some(w) = self.worker_threads {
            cmd.arg("--worker-threads").arg(w.to_string());
        }
        let n = self.node_mut(id);
        if n.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log_path)?;
        if n.proxy.is_some() {
            cmd.arg("--advertise")
                .arg(&n.addr)
                .arg("--source-ip")
                .arg(source_ip(id).to_string());
        }
        let child = cmd
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&n.listen)
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--join")
            .arg(&join)
            .arg("--config")
            .arg(&cfg)
            .envs(env.iter().copied())
            .env(
                "LMSKV_LOG",
                std::env::var("LMSKV_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        n.child = Some(child);
        Ok(())
    }

    fn signal(&self, id: u64, sig: Signal) -> anyhow::Result<()> {
        let child = self.node(id).child.as_ref().context("node not running")?;
        let pid = Pid::from_raw(child.id() as i32).context("bad pid")?;
        kill_process(pid, sig)?;
        Ok(())
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id);
        if let Some(mut c) = n.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stops node `id` with SIGTERM and waits for it to exit (kills it after 15 s).
    pub fn stop(&mut self, id: u64) -> anyhow::Result<Option<i32>> {
        let _ = self.signal(id, Signal::TERM);
        let n = self.node_mut(id);
        let Some(mut c) = n.child.take() else {
            return Ok(None);
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st.code());
            }
            if Instant::now() >= deadline {
                c.kill()?;
                c.wait()?;
                bail!("node {id} did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pauses node `id` (SIGSTOP) and returns once every thread of it has
    /// stopped. `kill(2)` returns before that: a thread that is running, or
    /// inside a system call such as an fsync, goes on until it next leaves
    /// the kernel, and could still answer a request sent after the signal.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, Signal::STOP)?;
        let pid = self
            .node(id)
            .child
            .as_ref()
            .context("node not running")?
            .id();
        let deadline = Instant::now() + PAUSE_TAKES_EFFECT_MAX;
        while !all_threads_stopped(pid) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {id} (pid {pid}) did not stop within {PAUSE_TAKES_EFFECT_MAX:?} of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resumes node `id` (SIGCONT).
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, Signal::CONT)
    }

    /// Whether node `id`'s process has exited; returns its exit code if so.
    pub fn exited(&mut self, id: u64) -> anyhow::Result<Option<Option<i32>>> {
        let n = self.node_mut(id);
        match n.child.as_mut() {
            None => Ok(Some(None)),
            Some(c) => match c.try_wait()? {
                Some(st) => {
                    n.child = None;
                    Ok(Some(st.code()))
                }
                None => Ok(None),
            },
        }
    }

    /// A client configured with every node as a seed. `LMSKV_TEST_LEADER_ATTEMPT_MS`
    /// sets how long one try on a leader may take (the client's default otherwise).
    pub fn client(&self) -> Client {
        let mut b = Client::builder()
            .endpoints(self.endpoints())
            .deadline(Duration::from_secs(20));
        if let Some(ms) = std::env::var("LMSKV_TEST_LEADER_ATTEMPT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            b = b.leader_attempt_timeout(Duration::from_millis(ms));
        }
        b.build().expect("client")
    }

    /// The OS process id of node `id`, when it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.child.as_ref())
            .map(|c| c.id())
    }

    /// Ids of the nodes whose processes run (started and not killed or stopped).
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// A raw gRPC `Kv` client bound to node `id` (no routing, no retries).
    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id)))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        KvClient::new(ch)
    }

    /// Node `id`'s status report.
    pub async fn status(&self, id: u64) -> anyhow::Result<StatusResponse> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id)))?
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        let mut c = AdminClient::new(ch);
        let r = tokio::time::timeout(Duration::from_secs(3), c.status(StatusRequest {}))
            .await
            .context("status timed out")??;
        Ok(r.into_inner())
    }

    /// Waits until a running node reports itself leader of the first user
    /// range (the one holding key `\x01`), and returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        self.wait_range_leader(b"\x01", timeout).await
    }

    /// Waits until a running node reports itself leader of the range holding
    /// `key`, and returns its id.
    pub async fn wait_range_leader(&self, key: &[u8], timeout: Duration) -> anyhow::Result<u64> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect();
        crate::wait_for("a leader", timeout, || {
            let running = running.clone();
            async move {
                for id in running {
                    if let Ok(s) = self.status(id).await {
                        if s.ranges.iter().any(|r| {
                            r.local_role == "leader"
                                && r.descriptor.as_ref().is_some_and(|d| {
                                    d.range_id != lmskv_proto::range::META_RANGE_ID
                                        && lmskv_proto::range::contains(d, key)
                                })
                        }) {
                            return Some(id);
                        }
                    }
                }
                None
            }
        })
        .await
    }

    /// Waits until node `id` has applied at least `index` on the first user range.
    pub async fn wait_applied(&self, id: u64, index: u64, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for(
            &format!("node {id} to apply index {index}"),
            timeout,
            || async move {
                match self.status(id).await {
                    Ok(s)
                        if s.ranges.iter().any(|r| {
                            r.applied_index >= index
                                && r.descriptor.as_ref().is_some_and(|d| {
                                    d.range_id != lmskv_proto::range::META_RANGE_ID
                                        && lmskv_proto::range::contains(d, b"\x01")
                                })
                        }) =>
                    {
                        Some(())
                    }
                    _ => None,
                }
            },
        )
        .await
    }

    /// The node that leads the meta range, as a running node that leads it
    /// says (`None`: none does now).
    pub async fn meta_leader(&self) -> Option<u64> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Ok(s) = self.status(n.id).await {
                if s.ranges.iter().any(|r| {
                    r.local_role == "leader"
                        && r.descriptor.as_ref().map(|d| d.range_id)
                            == Some(lmskv_proto::range::META_RANGE_ID)
                }) {
                    return Some(n.id);
                }
            }
        }
        None
    }

    /// Waits until a running node leads the meta range; its id.
    pub async fn wait_meta_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        crate::wait_for("a meta leader", timeout, || self.meta_leader()).await
    }

    /// The cluster version in force, as the meta leader reports it through
    /// any running node (`None`: no node knows it now).
    pub async fn cluster_version(&self) -> Option<u32> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Ok(s) = self.status(n.id).await {
                if let Some(v) = s.cluster.map(|c| c.cluster_version).filter(|v| *v > 0) {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Waits until the cluster version in force is `version`.
    pub async fn wait_cluster_version(
        &self,
        version: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        crate::wait_for(&format!("cluster version {version}"), timeout, || async {
            (self.cluster_version().await == Some(version)).then_some(())
        })
        .await
    }

    /// The last lines of every node's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log_path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!(
                "---- node {} ({}) ----\n",
                n.id,
                n.log_path.display()
            ));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Panics so far in this test process (every suite shares one process).
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts the panics of every thread of this test process (for `Drop`).
fn note_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            prev(info);
        }));
    });
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A cluster shared with spawned tasks may be dropped on another
        // thread after the test's own thread panicked; a panic of an earlier
        // test in this process is not this cluster's failure.
        let failed = std::thread::panicking()
            || PANICS.load(std::sync::atomic::Ordering::Relaxed) > self.panics_before;
        if failed {
            eprintln!("{}", self.log_tails(40));
        }
        // Whole logs for a closer look: LMSKV_TEST_KEEP_LOGS=<dir> keeps them
        // after a failure, LMSKV_TEST_KEEP_LOGS_ALWAYS=1 after every run.
        let always = std::env::var_os("LMSKV_TEST_KEEP_LOGS_ALWAYS").is_some();
        if let Some(keep) = std::env::var_os("LMSKV_TEST_KEEP_LOGS").filter(|_| failed || always) {
            let keep = std::path::PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for n in &self.nodes {
                let _ = std::fs::copy(&n.log_path, keep.join(format!("node-{}.log", n.id)));
            }
            eprintln!("node logs kept in {}", keep.display());
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SIGCONT first: a paused process cannot be reaped until it runs.
                if let Some(pid) = Pid::from_raw(c.id() as i32) {
                    let _ = kill_process(pid, Signal::CONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The status of the first user range (the one holding key `\x01`) in a
/// node's status report.
pub fn user_range(s: &StatusResponse) -> Option<&lmskv_proto::v1::RangeStatus> {
    s.ranges.iter().find(|r| {
        r.descriptor.as_ref().is_some_and(|d| {
            d.range_id != lmskv_proto::range::META_RANGE_ID
                && lmskv_proto::range::contains(d, b"\x01")
        })
    })
}

/// Longest [`TestCluster::pause`] waits for a node's threads to stop.
const PAUSE_TAKES_EFFECT_MAX: Duration = Duration::from_secs(10);

/// Whether every thread of process `pid` is stopped (or gone): the state in
/// each `/proc/PID/task/TID/stat` is `T` or `t`, or the thread has exited.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            return true;
        };
        // The state follows the command name, which is in parentheses and
        // may itself hold spaces or parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        matches!(state, Some('T' | 't' | 'Z' | 'X'))
    })
}
