//! [`Fabric`]: a private network of Linux network namespaces for a test
//! cluster, so that partitions happen at the IP level instead of in a proxy.
//!
//! Layout (every piece lives in a namespace the fabric creates; the root
//! namespace gets no address, route or interface):
//!
//! ```text
//!   <prefix>-hub   bridge br0, 10.77.0.254/24   <- the test process's own
//!      |  |  |                                     threads (clients, checks)
//!     v1 v2 v3 ...  veth pairs, one per node
//!      |  |  |
//!   <prefix>-n1 ... eth0 10.77.0.1/24, 10.77.0.2/24, ...  (one lmskv-node each)
//! ```
//!
//! Node processes start through `ip netns exec`, which execs the node in
//! place, so their pids are the ones the harness signals (kill, SIGSTOP).
//! The test process reaches the nodes from the hub namespace: the threads
//! that make its connections enter the hub with `setns` ([`Fabric::block_on`]
//! runs a future on a runtime whose every thread did), while the process as
//! a whole stays where it started.
//!
//! Link faults are applied inside the sending node's namespace, for one
//! destination node at a time, so the hub (the clients) always reaches
//! every node:
//! - a cut is a route to the peer's address of type `prohibit`,
//!   `unreachable` or `blackhole` (iproute2 only): the node's own packets
//!   to that peer are refused locally;
//! - loss is an nftables rule dropping that share of the node's packets to
//!   the peer at random (`numgen random`), where `nft` is installed.
//!
//! Namespace names start with `lmskv-<pid>-<n>`; every one is deleted when
//! the fabric is dropped (also while unwinding from a panic), and ones left
//! by a process that no longer runs (killed with SIGKILL) are deleted when
//! the next fabric is created.

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};

use crate::partition::{CutRoute, Fault, LinkFault};

/// Every namespace this harness creates starts with this.
pub const NAMESPACE_PREFIX: &str = "lmskv-";
/// The port every node listens on (each node has its own address).
pub const NODE_PORT: u16 = 7000;
/// Host part of the hub's address on the fabric's subnet.
const HUB_HOST: u8 = 254;
/// Most nodes one fabric holds (host parts 1..=NODES_MAX).
pub const NODES_MAX: usize = 32;
/// The nftables table loss rules go into, in a node's namespace.
const NFT_TABLE: &str = "lmskv_chaos";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// Fabrics created by this process, so that names stay unique.
static FABRICS: AtomicU64 = AtomicU64::new(0);

/// Whether this process can build a fabric: it runs as root, `ip` is
/// installed and `ip netns add` works. `Err` says why not.
pub fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let probe = format!(
        "{NAMESPACE_PREFIX}{}-probe{}",
        std::process::id(),
        FABRICS.fetch_add(1, Ordering::Relaxed)
    );
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            Ok(())
        }
        Err(e) => Err(format!("`ip netns add` failed: {e:#}")),
    }
}

/// Whether `nft` is installed (loss faults need it).
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ip ARGS`; an error carries its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args), None)
}

/// Runs a command to completion, with `stdin` as its input; an error
/// carries the command line and its stderr.
fn run(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {line}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("write to {line}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{line}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of the network namespaces `ip netns` knows.
pub fn namespaces() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Deletes namespaces of this harness whose creating process is gone.
fn delete_stale() {
    for name in namespaces() {
        let Some(rest) = name.strip_prefix(NAMESPACE_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match ip(&["netns", "del", &name]) {
                Ok(()) => eprintln!("netns: deleted {name}, left by process {pid}"),
                Err(e) => eprintln!("netns: cannot delete stale {name}: {e:#}"),
            }
        }
    }
}

/// A fault applied in one node's namespace, to undo on heal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Applied {
    Route {
        node: u64,
        peer: u64,
        route: CutRoute,
    },
    Nft {
        node: u64,
    },
}

/// The namespaces, bridge and veth pairs of one test cluster; deleted on drop.
#[derive(Debug)]
pub struct Fabric {
    prefix: String,
    nodes: usize,
    /// Namespaces created so far (deleted on drop, last first).
    created: Vec<String>,
    /// The hub namespace, held open for `setns`.
    hub: Arc<File>,
    /// Faults in place, undone by [`Fabric::heal`].
    applied: Mutex<BTreeSet<Applied>>,
}

impl Fabric {
    /// Builds a hub namespace with a bridge and `nodes` node namespaces,
    /// each wired to the bridge by a veth pair. Stale namespaces of dead
    /// runs are deleted first.
    pub fn create(nodes: usize) -> anyhow::Result<Fabric> {
        if nodes == 0 || nodes > NODES_MAX {
            bail!("a fabric holds 1 to {NODES_MAX} nodes (asked for {nodes})");
        }
        delete_stale();
        let prefix = format!(
            "{NAMESPACE_PREFIX}{}-{}",
            std::process::id(),
            FABRICS.fetch_add(1, Ordering::Relaxed)
        );
        let mut fabric = Fabric {
            prefix: prefix.clone(),
            nodes,
            created: Vec::new(),
            // Replaced once the hub exists; /dev/null keeps the type simple.
            hub: Arc::new(File::open("/dev/null")?),
            applied: Mutex::new(BTreeSet::new()),
        };
        // On an error, dropping `fabric` deletes what was built so far.
        let hub = fabric.add_namespace("hub")?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        let hub_addr = format!("{}/24", fabric.hub_ip());
        ip(&["-n", &hub, "addr", "add", &hub_addr, "dev", "br0"])?;
        for id in 1..=nodes as u64 {
            let ns = fabric.add_namespace(&format!("n{id}"))?;
            let veth = format!("v{id}");
            ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &veth, "master", "br0", "up"])?;
            let addr = format!("{}/24", fabric.node_ip(id));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        fabric.hub = Arc::new(
            File::open(format!("{NETNS_DIR}/{hub}"))
                .with_context(|| format!("open {NETNS_DIR}/{hub}"))?,
        );
        Ok(fabric)
    }

    fn add_namespace(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.created.push(name.clone());
        Ok(name)
    }

    /// The prefix of every namespace name of this fabric.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of node namespaces.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Namespace of node `id`.
    pub fn node_namespace(&self, id: u64) -> String {
        format!("{}-n{id}", self.prefix)
    }

    /// Namespace of the hub (the bridge, and the test's clients).
    pub fn hub_namespace(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Node `id`'s address.
    pub fn node_ip(&self, id: u64) -> Ipv4Addr {
        assert!(id >= 1 && id as usize <= self.nodes, "no node {id}");
        Ipv4Addr::new(10, 77, 0, id as u8)
    }

    /// The hub's address (where the test's connections come from).
    pub fn hub_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, HUB_HOST)
    }

    /// A command that runs `program` inside node `id`'s namespace (`ip netns
    /// exec` execs it in place: the child's pid is the program's).
    pub fn command(&self, id: u64, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns")
            .arg("exec")
            .arg(self.node_namespace(id))
            .arg(program);
        cmd
    }

    /// Whether the calling thread is in the hub namespace (where it can
    /// reach the nodes).
    pub fn in_hub(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let here = std::fs::metadata("/proc/thread-self/ns/net");
        match (here, self.hub.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Moves the calling thread into the hub namespace.
    pub fn enter_hub(&self) -> std::io::Result<()> {
        enter(&self.hub)
    }

    /// Runs `f` on a new thread inside namespace `ns` (a socket keeps the
    /// namespace it was made in, so listeners and connections made by `f`
    /// stay there).
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = File::open(format!("{NETNS_DIR}/{ns}"))
            .with_context(|| format!("open {NETNS_DIR}/{ns}"))?;
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<T> {
                enter(&file).with_context(|| format!("enter namespace {ns}"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
        })
    }

    /// Runs `fut` to completion on a new multi-thread runtime whose threads
    /// (and the thread that drives it) are in the hub namespace, so every
    /// connection the future makes comes from the hub. The calling thread
    /// stays in its own namespace.
    pub fn block_on<F>(&self, fut: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let hub = self.hub.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<F::Output> {
                enter(&hub).context("enter the hub namespace")?;
                let hook = hub.clone();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .on_thread_start(move || {
                        // Threads of a runtime are made by the runtime; one
                        // left outside the hub could not reach any node.
                        enter(&hook).expect("runtime thread enters the hub namespace");
                    })
                    .build()?;
                Ok(rt.block_on(fut))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the hub's runtime thread panicked"))?
        })
    }

    /// Applies `faults` (on top of those in place).
    pub fn apply(&self, faults: &[LinkFault]) -> anyhow::Result<()> {
        let mut applied = self.applied.lock().expect("applied lock");
        let mut loss: std::collections::BTreeMap<u64, Vec<(u64, u8)>> = Default::default();
        for f in faults {
            match f.fault {
                Fault::Cut(route) => {
                    // One route per destination: a second cut of the same
                    // link (of any type) is already in place.
                    let cut = |x: &Applied| matches!(x, Applied::Route { node, peer, .. } if *node == f.from && *peer == f.to);
                    if applied.iter().any(cut) {
                        continue;
                    }
                    ip(&[
                        "-n",
                        &self.node_namespace(f.from),
                        "route",
                        "add",
                        route.name(),
                        &format!("{}/32", self.node_ip(f.to)),
                    ])?;
                    applied.insert(Applied::Route {
                        node: f.from,
                        peer: f.to,
                        route,
                    });
                }
                Fault::Loss(percent) => loss.entry(f.from).or_default().push((f.to, percent)),
            }
        }
        for (node, peers) in loss {
            let mut script = format!(
                "add table inet {NFT_TABLE}\n\
                 add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n"
            );
            for (peer, percent) in peers {
                // `numgen random mod 100` gives 0..=99, so `< 100` would be
                // out of its range: all packets are plain drops.
                let pick = if percent >= 100 {
                    String::new()
                } else {
                    format!("numgen random mod 100 < {percent} ")
                };
                script.push_str(&format!(
                    "add rule inet {NFT_TABLE} out ip daddr {} {pick}drop\n",
                    self.node_ip(peer),
                ));
            }
            // Recorded first, so a half-applied script is still undone.
            applied.insert(Applied::Nft { node });
            run(
                Command::new("ip")
                    .args(["netns", "exec", &self.node_namespace(node)])
                    .args(["nft", "-f", "-"]),
                Some(&script),
            )
            .context("nft (Debian package nftables) adds loss rules")?;
        }
        Ok(())
    }

    /// Undoes every fault in place. Tries them all; the first error is returned.
    pub fn heal(&self) -> anyhow::Result<()> {
        let mut applied = self.applied.lock().expect("applied lock");
        let mut first_err = None;
        for a in std::mem::take(&mut *applied) {
            let r = match a {
                Applied::Route { node, peer, route } => ip(&[
                    "-n",
                    &self.node_namespace(node),
                    "route",
                    "del",
                    route.name(),
                    &format!("{}/32", self.node_ip(peer)),
                ]),
                Applied::Nft { node } => run(
                    Command::new("ip")
                        .args(["netns", "exec", &self.node_namespace(node)])
                        .args(["nft", "delete", "table", "inet", NFT_TABLE]),
                    None,
                ),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Moves the calling thread into the network namespace `ns` refers to.
fn enter(ns: &File) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(std::io::Error::from)
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Node processes are gone by now (the cluster kills them first);
        // deleting a namespace also deletes its end of each veth pair.
        for name in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("netns: cannot delete {name}: {e:#}");
            }
        }
    }
}
