//! `lmskv-node`: runs one lmskv storage node until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use lmskv_node::config::{FileConfig, NodeConfig};
use lmskv_node::node::Node;
use tokio::sync::watch;

// jemalloc instead of the system allocator: a node holds many small,
// long-lived per-range structures, and glibc's arenas keep much more of that
// resident (measured in bench/sharding.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs one lmskv storage node.
///
/// Nodes that name each other in --join form a new cluster; a node started
/// later with --join joins the running cluster; a node restarted with the same
/// --data-dir resumes with its identity and data.
#[derive(Debug, Parser)]
#[command(name = "lmskv-node", version, about, long_about = None)]
struct Args {
    /// This node's id, unique in the cluster and at least 1.
    #[arg(long)]
    node_id: u64,
    /// Address to serve clients and peers on (HOST:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// Address peers and clients should use to reach this node (HOST:PORT),
    /// when it differs from --listen (a proxy, NAT or container port map).
    #[arg(long)]
    advertise: Option<String>,
    /// Local IP address to make connections to other nodes from (on a host
    /// with several addresses; by default the system picks).
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
    /// Directory for this node's data; created when missing.
    #[arg(long)]
    data_dir: PathBuf,
    /// Other nodes to form a cluster with or join (HOST:PORT,...).
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// TOML file with tuning settings (timeouts, limits, caches).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds a node may be silent before its replicas are re-created on
    /// other nodes (overrides the config file; default 60).
    #[arg(long)]
    dead_node_timeout_s: Option<u64>,
    /// Whether a node whose store is found damaged at start-up moves it to
    /// quarantine/ and rejoins empty, to be rebuilt from its peers (true), or
    /// exits leaving it as it is (false). Overrides the config file
    /// (default true); the damaged store is never served either way.
    #[arg(long)]
    recover_from_peers: Option<bool>,
    /// Threads that run the node's requests and Raft work (0: one per CPU
    /// core). Nodes that share a host do best with their share of its
    /// cores: each idle thread a request wakes costs a context switch.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    worker_threads: u16,
    /// The highest cluster version this node lets the cluster go to
    /// (overrides the config file; default: the highest this binary runs).
    /// During an upgrade that may still be rolled back, give the upgraded
    /// nodes the old binary's version; the cluster moves to the new one
    /// once no node holds it back.
    #[arg(long, env = "LMSKV_CLUSTER_VERSION_MAX")]
    cluster_version_max: Option<u32>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LMSKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    // Fail points (test builds): configured from FAILPOINTS for the whole run.
    let _failpoints = match lmskv_node::failpoints::setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lmskv-node: {e}");
            std::process::exit(2);
        }
    };
    let mut rt_builder = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        rt_builder.worker_threads(usize::from(args.worker_threads));
    }
    let runtime = match rt_builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lmskv-node: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    watch_for_stalls(runtime.handle());
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("lmskv-node: {e:#}");
        std::process::exit(1);
    }
}

/// A runtime that runs no timer for this long has a blocked worker thread.
const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Logs when the async runtime stops running timers (a worker thread blocked
/// in a lock, a RocksDB write stall or a long synchronous call), and when it
/// runs again: such a stall freezes Raft timers, gRPC and placement at once
/// and would otherwise leave no trace. A pause of the whole process
/// (SIGSTOP) is not reported.
fn watch_for_stalls(rt: &tokio::runtime::Handle) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let origin = Instant::now();
    let beat = Arc::new(AtomicU64::new(0));
    let b = beat.clone();
    rt.spawn(async move {
        loop {
            b.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let spawned = std::thread::Builder::new()
        .name("stall-watch".into())
        .spawn(move || {
            let check = Duration::from_secs(1);
            let mut last = origin.elapsed();
            let mut stalled_since: Option<u64> = None;
            loop {
                std::thread::sleep(check);
                let now = origin.elapsed();
                // This thread overslept too: the whole process was stopped.
                let stopped = now - last > check * 3;
                last = now;
                let now_ms = now.as_millis() as u64;
                let age = now_ms.saturating_sub(beat.load(Ordering::Relaxed));
                if stopped {
                    continue;
                }
                if age >= STALL_AFTER.as_millis() as u64 {
                    if stalled_since.is_none() {
                        stalled_since = Some(now_ms - age);
                        tracing::warn!(
                            stalled_ms = age,
                            "the async runtime has run no timer for {age} ms: a worker thread is blocked"
                        );
                    }
                } else if let Some(since) = stalled_since.take() {
                    tracing::warn!(
                        stalled_ms = now_ms.saturating_sub(since),
                        "the async runtime runs again after a stall"
                    );
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the stall watchdog");
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => NodeConfig::load_file(p).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    let mut file = file;
    if let Some(t) = args.dead_node_timeout_s {
        file.dead_node_timeout_s = t;
    }
    if let Some(r) = args.recover_from_peers {
        file.recover_from_peers = r;
    }
    if let Some(v) = args.cluster_version_max {
        file.cluster_version_max = Some(v);
    }
    let cfg = NodeConfig {
        node_id: args.node_id,
        listen: args.listen,
        advertise: args.advertise,
        source_ip: args.source_ip,
        data_dir: args.data_dir,
        join: args.join.into_iter().filter(|s| !s.is_empty()).collect(),
        file,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let node = Node::open(cfg.clone()).await?;
    tracing::info!(node_id = cfg.node_id, listen = %cfg.listen, data_dir = %cfg.data_dir.display(), "node started");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut server = tokio::spawn(lmskv_node::server::serve(
        node.clone(),
        listener,
        stop_rx.clone(),
    ));
    let boot = tokio::spawn(node.clone().run_background(stop_rx.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, stopping"),
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
        r = &mut server => {
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("server task: {e}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    boot.abort();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
