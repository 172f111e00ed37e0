//! `lmskv-idle-ranges`: measures what idle ranges cost. It starts a 3-node
//! cluster of real node processes, splits the user key space into N ranges,
//! waits until they are idle (hibernating), and reads each node's CPU time and
//! resident memory from /proc over a measurement window.
//!
//! `lmskv-idle-ranges --ranges 1,100,1000 --window 30s [--json FILE]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lmskv_tests::{ClusterOptions, TestCluster};
use serde::Serialize;

/// Idle-range cost measurement for lmskv.
#[derive(Debug, Parser)]
#[command(name = "lmskv-idle-ranges")]
struct Args {
    /// Range counts to measure, comma-separated (each on a fresh cluster).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    ranges: Vec<usize>,
    /// How long to measure CPU once the ranges are idle, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = lmskv_tests::chaos::parse_duration)]
    window: Duration,
    /// How long to let ranges go idle before measuring.
    #[arg(long, default_value = "20s", value_parser = lmskv_tests::chaos::parse_duration)]
    settle: Duration,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Each node's RocksDB block cache. Small by default: the cache fills up
    /// to its bound whatever the range count, and would hide what a range
    /// itself costs.
    #[arg(long, default_value_t = 1 << 20)]
    block_cache_bytes: u64,
    /// Each node's RocksDB memtable size per column family (small for the
    /// same reason).
    #[arg(long, default_value_t = 1 << 20)]
    write_buffer_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    ranges: usize,
    /// CPU used by all three nodes together, in percent of one core.
    cpu_percent_of_one_core: f64,
    /// Resident memory of all three nodes together.
    rss_bytes_total: u64,
    /// Resident memory per range replica beyond the 1-range baseline (0 for the baseline).
    rss_bytes_per_replica_over_baseline: f64,
    split_seconds: f64,
    /// Replicas the nodes reported at the end of the window, and how many of
    /// them led their range or had their Raft group parked.
    replicas: usize,
    leaders: usize,
    parked: usize,
}

/// CPU ticks (user + system) and resident bytes of a process.
fn proc_stat(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f[11].parse()?;
    let stime: u64 = f[12].parse()?;
    let rss_pages: u64 = f[21].parse()?;
    Ok((utime + stime, rss_pages * 4096))
}

fn ticks_per_second() -> f64 {
    // The kernel's USER_HZ; 100 on every Linux this runs on.
    100.0
}

async fn measure(n: usize, args: &Args) -> anyhow::Result<Row> {
    let c = TestCluster::start(ClusterOptions {
        nodes: 3,
        config: format!(
            "placement_interval_ms = 200\nbalance_leaders = true\nblock_cache_bytes = {}\nwrite_buffer_bytes = {}\n",
            args.block_cache_bytes, args.write_buffer_bytes
        ),
        ..ClusterOptions::default()
    })
    .await?;
    let started = Instant::now();
    for i in 1..n {
        let key = format!("r/{i:06}");
        if let Err(e) = c.split_at(key.as_bytes()).await {
            // A retried split whose first attempt went through.
            if !format!("{e:#}").contains("already starts at this key") {
                return Err(e);
            }
        }
        if i % 100 == 0 {
            eprintln!(
                "  {i}/{n} ranges after {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let split_seconds = started.elapsed().as_secs_f64();
    let listed = c.range_list().await?.len();
    eprintln!(
        "{n} ranges requested, {listed} listed (incl. the meta range); settling {:?}",
        args.settle
    );
    tokio::time::sleep(args.settle).await;
    let pids: Vec<u32> = c.running().iter().filter_map(|id| c.pid(*id)).collect();
    let before: Vec<(u64, u64)> = pids
        .iter()
        .map(|p| proc_stat(*p))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(args.window).await;
    let after: Vec<(u64, u64)> = pids
        .iter()
        .map(|p| proc_stat(*p))
        .collect::<Result<_, _>>()?;
    let ticks: u64 = before.iter().zip(&after).map(|(b, a)| a.0 - b.0).sum();
    let cpu = ticks as f64 / ticks_per_second() / args.window.as_secs_f64() * 100.0;
    let rss: u64 = after.iter().map(|a| a.1).sum();
    let (mut replicas, mut leaders, mut parked) = (0, 0, 0);
    for id in c.running() {
        let st = c.status(id).await?;
        replicas += st.ranges.len();
        leaders += st
            .ranges
            .iter()
            .filter(|r| r.local_role == "leader")
            .count();
        parked += st.ranges.iter().filter(|r| r.parked).count();
    }
    Ok(Row {
        ranges: n,
        cpu_percent_of_one_core: cpu,
        rss_bytes_total: rss,
        rss_bytes_per_replica_over_baseline: 0.0,
        split_seconds,
        replicas,
        leaders,
        parked,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows: Vec<Row> = Vec::new();
    for n in args.ranges.clone() {
        match rt.block_on(measure(n.max(1), &args)) {
            Ok(r) => {
                // Each result as it comes: a later, larger count may fail.
                eprintln!(
                    "  {} ranges: cpu {:.2}% of one core (3 nodes), rss {:.1} MiB, split {:.1}s, \
                     {} replicas: {} leaders, {} parked",
                    r.ranges,
                    r.cpu_percent_of_one_core,
                    r.rss_bytes_total as f64 / (1 << 20) as f64,
                    r.split_seconds,
                    r.replicas,
                    r.leaders,
                    r.parked
                );
                rows.push(r)
            }
            Err(e) => {
                eprintln!("lmskv-idle-ranges: {n} ranges: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(base) = rows
        .iter()
        .find(|r| r.ranges == 1)
        .map(|r| r.rss_bytes_total)
    {
        for r in rows.iter_mut().filter(|r| r.ranges > 1) {
            r.rss_bytes_per_replica_over_baseline =
                (r.rss_bytes_total as f64 - base as f64) / (3.0 * (r.ranges - 1) as f64);
        }
    }
    println!(
        "ranges  cpu%(1 core, 3 nodes)  per node  rss total   rss/replica over 1-range  split time  replicas  leaders  parked"
    );
    for r in &rows {
        println!(
            "{:>6}  {:>21.2}  {:>8.2}  {:>7.1} MiB  {:>21.1} KiB  {:>8.1}s  {:>8}  {:>7}  {:>6}",
            r.ranges,
            r.cpu_percent_of_one_core,
            r.cpu_percent_of_one_core / 3.0,
            r.rss_bytes_total as f64 / (1 << 20) as f64,
            r.rss_bytes_per_replica_over_baseline / 1024.0,
            r.split_seconds,
            r.replicas,
            r.leaders,
            r.parked
        );
    }
    if let Some(p) = &args.json {
        if let Err(e) = std::fs::write(p, serde_json::to_vec_pretty(&rows).expect("json")) {
            eprintln!("lmskv-idle-ranges: cannot write {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
