//! [`Cluster`]: three server processes of lmskv or etcd on free 127.0.0.1
//! ports, each with its own data dir under one temporary directory. Every
//! process is killed and the directory removed when the cluster is stopped
//! or dropped (also on an error or an interrupt).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::process::{Child, Command};

use crate::target::{Target, TargetKind};

/// Members of each cluster.
pub const MEMBERS: usize = 3;
/// How long a new cluster may take to accept a write.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new lmskv cluster may take to spread its range leaders over
/// its nodes (`BENCH_SETTLE` sets it; the placement moves a leader only to a
/// node that has been up for 10 s).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Lines of each member's log printed when a cluster fails.
const LOG_TAIL_LINES: usize = 20;

/// Ports handed out by this process, so two members never get the same one.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut used = USED_PORTS.lock().expect("port lock");
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port found on 127.0.0.1")
}

/// The lmskv nodes' configuration file. Load-based splits are off: all three
/// nodes share this host's cores, so splitting a hot range spreads no load;
/// it would only turn one range's large write groups into smaller groups on
/// several ranges (more entries, appends and fsync waits for the same puts)
/// and move leaders in the middle of a run. etcd is one Raft group too.
pub const LMSKV_BENCH_CONFIG: &str = "split_qps = 0.0\n";

/// The lmskv nodes' whole configuration file: [`LMSKV_BENCH_CONFIG`], then
/// `extra` (lines ending in a newline).
pub fn lmskv_config(extra: &str) -> String {
    format!("{LMSKV_BENCH_CONFIG}{extra}")
}

/// Worker threads of each lmskv node: the host's cores shared among the
/// members, at least one each (etcd keeps its default, one per core).
pub fn lmskv_worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / MEMBERS).max(1)
}

/// A running three-member cluster.
#[derive(Debug)]
pub struct Cluster {
    pub kind: TargetKind,
    /// Client endpoints (`127.0.0.1:PORT`).
    pub endpoints: Vec<String>,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    // Dropped after the processes are killed (see `Drop`).
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts three `lmskv-node` processes that form a cluster through `--join`,
    /// configured by [`lmskv_config`] of `config_extra`.
    pub async fn start_lmskv(node_bin: &Path, config_extra: &str) -> anyhow::Result<Cluster> {
        if !node_bin.exists() {
            bail!("{} not found: build lmskv-node first", node_bin.display());
        }
        let dir = tempfile::Builder::new()
            .prefix("lmskv-bench-lmskv-")
            .tempdir()?;
        let mut endpoints = Vec::new();
        for _ in 0..MEMBERS {
            endpoints.push(format!("127.0.0.1:{}", free_port()?));
        }
        let mut c = Cluster {
            kind: TargetKind::Lmskv,
            endpoints: endpoints.clone(),
            children: Vec::new(),
            logs: Vec::new(),
            dir,
        };
        let worker_threads = lmskv_worker_threads();
        let config = c.dir.path().join("node.toml");
        std::fs::write(&config, lmskv_config(config_extra))?;
        for (i, addr) in endpoints.iter().enumerate() {
            let id = i + 1;
            let log = c.dir.path().join(format!("node-{id}.log"));
            let mut cmd = Command::new(node_bin);
            cmd.arg("--node-id")
                .arg(id.to_string())
                .arg("--listen")
                .arg(addr)
                .arg("--data-dir")
                .arg(c.dir.path().join(format!("node-{id}")))
                .arg("--join")
                .arg(endpoints.join(","))
                // The members share this host's cores, as `lmskv local up`
                // shares them: a node with more threads than its share
                // wakes idle threads, a context switch each.
                .arg("--worker-threads")
                .arg(worker_threads.to_string())
                .arg("--config")
                .arg(&config)
                .env("LMSKV_LOG", "warn");
            c.spawn(cmd, log)?;
        }
        c.wait_ready().await?;
        Ok(c)
    }

    /// Starts three etcd members (default durability: every commit fsynced).
    pub async fn start_etcd(etcd_bin: &Path) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("lmskv-bench-etcd-")
            .tempdir()?;
        let mut client = Vec::new();
        let mut peer = Vec::new();
        for _ in 0..MEMBERS {
            client.push(format!("127.0.0.1:{}", free_port()?));
            peer.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let initial: Vec<String> = peer
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{}={p}", i + 1))
            .collect();
        let mut c = Cluster {
            kind: TargetKind::Etcd,
            endpoints: client.clone(),
            children: Vec::new(),
            logs: Vec::new(),
            dir,
        };
        for i in 0..MEMBERS {
            let log = c.dir.path().join(format!("etcd-{}.log", i + 1));
            let url = format!("http://{}", client[i]);
            let mut cmd = Command::new(etcd_bin);
            cmd.arg(format!("--name=m{}", i + 1))
                .arg(format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("m{}", i + 1)).display()
                ))
                .arg(format!("--listen-client-urls={url}"))
                .arg(format!("--advertise-client-urls={url}"))
                .arg(format!("--listen-peer-urls={}", peer[i]))
                .arg(format!("--initial-advertise-peer-urls={}", peer[i]))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-token=lmskv-bench")
                .arg("--initial-cluster-state=new")
                .arg("--logger=zap")
                .arg("--log-level=warn");
            c.spawn(cmd, log)?;
        }
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn(&mut self, mut cmd: Command, log: PathBuf) -> anyhow::Result<()> {
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {:?}", cmd.as_std().get_program()))?;
        self.children.push(child);
        self.logs.push(log);
        Ok(())
    }

    /// Process ids of the members.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// The last lines of every member's log.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in &self.logs {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ----\n", p.display()));
            for l in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Fails when a member has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "{} member {} exited ({st})\n{}",
                    self.kind.name(),
                    i + 1,
                    self.log_tails()
                );
            }
        }
        Ok(())
    }

    /// Waits until the cluster acknowledges a write.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_running()?;
            let probe = async {
                let mut t = Target::connect(self.kind, &self.endpoints, true).await?;
                t.write(Bytes::from_static(b"bench-ready"), Bytes::from_static(b"1"))
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(15), probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => last = "probe write timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "{} cluster not ready within {READY_TIMEOUT:?}: {last}\n{}",
            self.kind.name(),
            self.log_tails()
        )
    }

    /// Waits until the cluster's placement has spread the range leaders: no
    /// node leads two ranges more than another, the point at which the
    /// placement stops moving leaders. A fresh cluster starts with every
    /// leader on the node that bootstrapped it, and a leader moved in the
    /// middle of a measured run stalls its writes while the clients find
    /// the new one; the runs measure the settled cluster a user runs.
    /// Returns whether the leaders spread within `timeout` (etcd: at once).
    pub async fn wait_leaders_spread(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        if self.kind != TargetKind::Lmskv || timeout.is_zero() {
            return Ok(true);
        }
        let Target::Lmskv(client) = Target::connect(self.kind, &self.endpoints, false).await?
        else {
            return Ok(true);
        };
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if let Ok(Ok(ranges)) =
                tokio::time::timeout(Duration::from_secs(5), client.range_list()).await
            {
                if leaders_spread(ranges.iter().map(|r| r.leader_id)) {
                    return Ok(true);
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Kills every member, waits for it and removes the data dirs.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        for c in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
        self.children.clear();
    }
}

/// Whether ranges led by these nodes (0: no leader known) have their leaders
/// spread over the members as far as the placement takes them: every range
/// has a leader, and no member leads two or more ranges than another.
fn leaders_spread(leaders: impl Iterator<Item = u64>) -> bool {
    let mut count = [0usize; MEMBERS];
    for l in leaders {
        match usize::try_from(l).ok().and_then(|l| l.checked_sub(1)) {
            Some(i) if i < MEMBERS => count[i] += 1,
            _ => return false,
        }
    }
    let most = count.iter().max().copied().unwrap_or(0);
    let least = count.iter().min().copied().unwrap_or(0);
    most < least + 2
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        // Reap before the data dirs go, so no member writes into a removed dir.
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < deadline {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaders_are_spread_when_no_node_leads_two_more_than_another() {
        // A fresh cluster: node 1 leads the meta range and the data range.
        assert!(!leaders_spread([1, 1].into_iter()));
        assert!(leaders_spread([1, 2].into_iter()));
        assert!(leaders_spread([2, 2, 1, 3].into_iter()));
        assert!(!leaders_spread([2, 2, 1].into_iter()));
        // A range without a known leader (0) or led by a stranger is not settled.
        assert!(!leaders_spread([1, 0].into_iter()));
        assert!(!leaders_spread([1, 9].into_iter()));
        assert!(leaders_spread(std::iter::empty()));
    }
}
