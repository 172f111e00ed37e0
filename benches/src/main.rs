//! `lmskv-bench`: a closed-loop load generator for lmskv.
//!
//! Runs `--threads` concurrent clients for `--duration`, each issuing one
//! request at a time, and reports throughput and latency percentiles (HDR
//! histogram) as text and, with `--json FILE`, as JSON.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use lmskv_client::{Client, ReadConsistency};

/// Most concurrent clients one run may use.
const THREADS_MAX: usize = 4_096;
/// Longest run accepted.
const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    /// Every operation writes a random record.
    Put,
    /// Every operation reads a random record (STRONG); records are loaded first.
    Get,
}

/// Load generator for lmskv: throughput and latency of puts or gets.
#[derive(Debug, Parser)]
#[command(name = "lmskv-bench", version, about)]
struct Args {
    /// Cluster endpoints (HOST:PORT,...).
    #[arg(
        long,
        env = "LMSKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    endpoints: Vec<String>,
    /// What each operation does.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    /// Number of distinct records.
    #[arg(long, default_value_t = 10_000)]
    records: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Measured run time, e.g. 30s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}; use ms, s or m")),
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    workload: String,
    threads: usize,
    duration_s: f64,
    ops_ok: u64,
    ops_failed: u64,
    throughput_ops_s: f64,
    latency_us: Latencies,
}

#[derive(Debug, serde::Serialize)]
struct Latencies {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench/{i:012}"))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("lmskv-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.threads == 0 || args.threads > THREADS_MAX {
        bail!("--threads must be between 1 and {THREADS_MAX}");
    }
    if args.duration.is_zero() || args.duration > DURATION_MAX {
        bail!("--duration must be positive and at most 24h");
    }
    if args.records == 0 {
        bail!("--records must be positive");
    }
    let client = Client::builder()
        .endpoints(args.endpoints.clone())
        .build()
        .context("client")?;
    let value = Bytes::from(vec![b'v'; args.value_size]);

    if matches!(args.workload, Workload::Get) {
        eprintln!("loading {} records...", args.records);
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.threads.min(64) {
            let (c, v, next, n) = (client.clone(), value.clone(), next.clone(), args.records);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), lmskv_client::ClientError>(());
                    }
                    c.put(key(i), v.clone()).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
    }

    eprintln!(
        "running {:?} with {} clients for {:?}",
        args.workload, args.threads, args.duration
    );
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.threads {
        let (c, v, stop, hist, failed) = (
            client.clone(),
            value.clone(),
            stop.clone(),
            hist.clone(),
            failed.clone(),
        );
        let (workload, records) = (args.workload, args.records);
        tasks.push(tokio::spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            while !stop.load(Ordering::Relaxed) {
                let i = rand::random::<u64>() % records;
                let t = Instant::now();
                let ok = match workload {
                    Workload::Put => c.put(key(i), v.clone()).await.is_ok(),
                    Workload::Get => c.get(key(i), ReadConsistency::Strong).await.is_ok(),
                };
                if ok {
                    let _ = local.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            hist.lock()
                .expect("histogram lock")
                .add(&local)
                .expect("same bounds");
        }));
    }
    let mut last_report = Instant::now();
    while start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  {:.0}s elapsed", start.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let h = hist.lock().expect("histogram lock");
    let report = Report {
        workload: format!("{:?}", args.workload).to_lowercase(),
        threads: args.threads,
        duration_s: elapsed,
        ops_ok: h.len(),
        ops_failed: failed.load(Ordering::Relaxed),
        throughput_ops_s: h.len() as f64 / elapsed,
        latency_us: Latencies {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        },
    };
    println!(
        "{} threads={} ops={} failed={} throughput={:.0} ops/s p50={}us p99={}us p999={}us max={}us",
        report.workload,
        report.threads,
        report.ops_ok,
        report.ops_failed,
        report.throughput_ops_s,
        report.latency_us.p50,
        report.latency_us.p99,
        report.latency_us.p999,
        report.latency_us.max
    );
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}
