//! `lmskv-placement-figures`: measures what placement costs on a real
//! cluster: how long splits take on ranges that hold data, how long the
//! cluster takes to re-create a dead node's replicas for a given data size,
//! and how replicas and leaders end up spread.
//!
//! It starts `--nodes` node processes, pre-splits the user key space into
//! `--ranges` ranges, loads `--data-mib` MiB, splits every loaded range in
//! its middle (timing each split), waits for balance, kills one node with
//! `kill -9` and times until every range again has three voters on live
//! nodes.
//!
//! Values are random (incompressible) and memtables small (1 MiB), so the
//! range sizes the nodes report, measured on disk, track the data loaded.
//!
//! `lmskv-placement-figures --nodes 4 --ranges 8 --data-mib 64 [--json FILE]`

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use lmskv_proto::v1::RangeInfo;
use lmskv_tests::router::{fully_replicated_on, voters};
use lmskv_tests::{wait_for, ClusterOptions, TestCluster};
use serde::Serialize;

/// Placement measurements for lmskv.
#[derive(Debug, Parser)]
#[command(name = "lmskv-placement-figures")]
struct Args {
    /// Nodes in the cluster (at least 4, so a dead node's replicas have somewhere to go).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// User ranges to pre-split into before loading data.
    #[arg(long, default_value_t = 8)]
    ranges: usize,
    /// MiB of values to load, spread evenly over the ranges.
    #[arg(long, default_value_t = 64)]
    data_mib: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 16 * 1024)]
    value_bytes: usize,
    /// Concurrent writers while loading.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Seconds a node may be silent before its replicas are re-created.
    #[arg(long, default_value_t = 5)]
    dead_node_timeout_s: u64,
    /// How long to wait for balance and for repair before giving up, e.g. 600s.
    #[arg(long, default_value = "600s", value_parser = lmskv_tests::chaos::parse_duration)]
    timeout: Duration,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct Figures {
    nodes: usize,
    data_bytes: u64,
    load_seconds: f64,
    /// Manual splits of empty ranges (the pre-split), milliseconds each.
    empty_split_ms: Vec<f64>,
    /// Manual splits in the middle of ranges holding data, milliseconds each.
    loaded_split_ms: Vec<f64>,
    /// Bytes each loaded range held when it was split (mean).
    loaded_split_range_bytes: u64,
    ranges: usize,
    killed_node: u64,
    /// Replicas the killed node held, and their bytes (as the ranges report them).
    lost_replicas: usize,
    lost_replica_bytes: u64,
    dead_node_timeout_s: u64,
    /// From the kill until every range had three voters on live nodes.
    repair_seconds: f64,
    /// Voters and leaders per node before the kill and after the repair.
    replicas_before: BTreeMap<u64, usize>,
    leaders_before: BTreeMap<u64, usize>,
    replicas_after: BTreeMap<u64, usize>,
    leaders_after: BTreeMap<u64, usize>,
}

fn spread(ranges: &[RangeInfo]) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
    let mut replicas = BTreeMap::new();
    let mut leaders = BTreeMap::new();
    for r in ranges {
        for v in voters(r) {
            *replicas.entry(v).or_default() += 1;
        }
        if r.leader_id != 0 {
            *leaders.entry(r.leader_id).or_default() += 1;
        }
    }
    (replicas, leaders)
}

/// Whether no node holds more than 20% over the mean of replicas, nor of
/// leaders (plus one, for counts too small to split evenly).
fn balanced(ranges: &[RangeInfo], nodes: usize) -> bool {
    let (replicas, leaders) = spread(ranges);
    let even = |m: &BTreeMap<u64, usize>| {
        let mean = m.values().sum::<usize>() as f64 / nodes as f64;
        m.values().all(|n| (*n as f64) <= mean * 1.2 + 1.0)
    };
    replicas.len() == nodes && even(&replicas) && even(&leaders)
}

fn data_key(range: usize, i: usize) -> Vec<u8> {
    format!("d/{range:04}/{i:08}").into_bytes()
}

async fn timed_split(c: &TestCluster, key: &[u8]) -> anyhow::Result<f64> {
    let t = Instant::now();
    if let Err(e) = c.split_at(key).await {
        // A retried split whose first attempt went through.
        if !format!("{e:#}").contains("already starts at this key") {
            return Err(e);
        }
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

async fn run(args: &Args) -> anyhow::Result<Figures> {
    if args.nodes < 4 {
        bail!("--nodes must be at least 4 (replication factor 3 plus one to lose)");
    }
    if args.ranges == 0 || args.value_bytes == 0 || args.writers == 0 {
        bail!("--ranges, --value-bytes and --writers must be positive");
    }
    if args.value_bytes > lmskv_proto::limits::VALUE_BYTES_MAX {
        bail!(
            "--value-bytes must be at most {}",
            lmskv_proto::limits::VALUE_BYTES_MAX
        );
    }
    let mut f = Figures {
        nodes: args.nodes,
        dead_node_timeout_s: args.dead_node_timeout_s,
        ..Figures::default()
    };
    eprintln!("starting {} nodes", args.nodes);
    let mut c = TestCluster::start(ClusterOptions {
        nodes: args.nodes,
        config: format!(
            "dead_node_timeout_s = {}\nnode_heartbeat_ms = 300\nplacement_interval_ms = 300\nbalance_leaders = true\nwrite_buffer_bytes = 1048576\n",
            args.dead_node_timeout_s
        ),
        ..ClusterOptions::default()
    })
    .await?;

    eprintln!("pre-splitting into {} ranges", args.ranges);
    for r in 1..args.ranges {
        f.empty_split_ms
            .push(timed_split(&c, format!("d/{r:04}/").as_bytes()).await?);
    }

    let per_range = (args.data_mib << 20) / args.value_bytes / args.ranges;
    let total = per_range * args.ranges;
    eprintln!(
        "loading {} values of {} bytes ({} MiB) with {} writers",
        total,
        args.value_bytes,
        (total * args.value_bytes) >> 20,
        args.writers
    );
    let client = c.client();
    let next = Arc::new(AtomicU64::new(0));
    // Random bytes: sizes are measured on disk, after compression.
    let value: Bytes = (0..args.value_bytes)
        .map(|_| rand::random::<u8>())
        .collect::<Vec<u8>>()
        .into();
    let load_start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (client, next, value) = (client.clone(), next.clone(), value.clone());
        let ranges = args.ranges;
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= total {
                    return anyhow::Ok(());
                }
                // Round-robin over ranges so they fill evenly.
                let key = data_key(n % ranges, n / ranges);
                client
                    .put(Bytes::from(key), value.clone())
                    .await
                    .context("loading")?;
                if n > 0 && n.is_multiple_of(1000) {
                    eprintln!("  {n}/{total} values");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    f.load_seconds = load_start.elapsed().as_secs_f64();
    f.data_bytes = (total * args.value_bytes) as u64;

    eprintln!("splitting every loaded range in its middle");
    let mut split_bytes = 0u64;
    for r in 0..args.ranges {
        let mid = data_key(r, per_range / 2);
        if let Ok(info) = c.locate(&mid).await {
            split_bytes += info.size_bytes;
        }
        f.loaded_split_ms.push(timed_split(&c, &mid).await?);
    }
    f.loaded_split_range_bytes = split_bytes / args.ranges as u64;

    eprintln!("waiting for balance (no node over 20% above the mean in replicas or leaders)");
    let ranges = wait_for("balance", args.timeout, || async {
        let r = c.range_list().await.ok()?;
        balanced(&r, args.nodes).then_some(r)
    })
    .await?;
    // Let the range sizes of the last heartbeats settle in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ranges = c.range_list().await.unwrap_or(ranges);
    f.ranges = ranges.len();
    (f.replicas_before, f.leaders_before) = spread(&ranges);

    // The node with the most replicas that does not lead the meta range, so
    // the figure is the repair itself, not a placement-driver failover.
    let meta_leader = ranges
        .iter()
        .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == 1))
        .map(|r| r.leader_id)
        .unwrap_or(0);
    let victim = f
        .replicas_before
        .iter()
        .filter(|(id, _)| **id != meta_leader)
        .max_by_key(|(_, n)| **n)
        .map(|(id, _)| *id)
        .context("no node holds replicas")?;
    f.killed_node = victim;
    for r in &ranges {
        if voters(r).contains(&victim) {
            f.lost_replicas += 1;
            f.lost_replica_bytes += r.size_bytes;
        }
    }
    eprintln!(
        "kill -9 node {victim} ({} replicas, {:.1} MiB)",
        f.lost_replicas,
        f.lost_replica_bytes as f64 / (1 << 20) as f64
    );
    let killed_at = Instant::now();
    c.kill(victim)?;
    let alive: BTreeSet<u64> = c.running().into_iter().collect();
    let ranges = wait_for("repair", args.timeout, || async {
        let r = c.range_list().await.ok()?;
        fully_replicated_on(&r, &alive).then_some(r)
    })
    .await?;
    f.repair_seconds = killed_at.elapsed().as_secs_f64();
    (f.replicas_after, f.leaders_after) = spread(&ranges);
    Ok(f)
}

fn summary(ms: &[f64]) -> String {
    if ms.is_empty() {
        return "-".into();
    }
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "n={} p50 {:.0} ms, max {:.0} ms",
        v.len(),
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = match rt.block_on(run(&args)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lmskv-placement-figures: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("nodes                 {}", f.nodes);
    println!(
        "data                  {:.1} MiB loaded in {:.1} s",
        mib(f.data_bytes),
        f.load_seconds
    );
    println!("split (empty range)   {}", summary(&f.empty_split_ms));
    println!(
        "split (loaded range)  {} (ranges of {:.1} MiB)",
        summary(&f.loaded_split_ms),
        mib(f.loaded_split_range_bytes)
    );
    println!(
        "repair                node {} killed with {} replicas ({:.1} MiB): every range back to 3 live voters after {:.1} s (dead-node timeout {} s)",
        f.killed_node,
        f.lost_replicas,
        mib(f.lost_replica_bytes),
        f.repair_seconds,
        f.dead_node_timeout_s
    );
    println!(
        "spread before kill    replicas {:?} leaders {:?} ({} ranges)",
        f.replicas_before, f.leaders_before, f.ranges
    );
    println!(
        "spread after repair   replicas {:?} leaders {:?}",
        f.replicas_after, f.leaders_after
    );
    if let Some(p) = &args.json {
        if let Err(e) = std::fs::write(p, serde_json::to_vec_pretty(&f).expect("json")) {
            eprintln!("lmskv-placement-figures: cannot write {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
