//! `lmskv-bench`: a closed-loop YCSB load generator for lmskv and etcd.
//!
//! Loads the records, warms up, then runs `--threads` concurrent clients for
//! `--duration`, each with one operation in flight, and reports throughput,
//! latency percentiles (HDR histogram) and the CPU time the servers used per
//! operation, as text and, with `--json FILE`, as JSON.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lmskv_bench::report::RunReport;
use lmskv_bench::runner::{self, RunConfig};
use lmskv_bench::target::{Consistency, TargetKind};
use lmskv_bench::ycsb::{WorkloadKind, FIELD_COUNT_DEFAULT, FIELD_LENGTH_DEFAULT};

/// Load generator for lmskv and etcd: YCSB workloads A-F, put and get.
#[derive(Debug, Parser)]
#[command(name = "lmskv-bench", version, about)]
struct Args {
    /// The system under test: lmskv or etcd.
    #[arg(long, default_value = "lmskv", value_parser = parse_target)]
    target: TargetKind,
    /// Server endpoints (HOST:PORT,...).
    #[arg(
        long,
        env = "LMSKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    endpoints: Vec<String>,
    /// Workload: a, b, c, d, e, f (YCSB core workloads), put or get.
    #[arg(long, default_value = "put", value_parser = parse_workload)]
    workload: WorkloadKind,
    /// Number of records loaded before the run.
    #[arg(long, default_value_t = 10_000)]
    records: u64,
    /// Concurrent clients, each with one operation in flight.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Measured run time, e.g. 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = lmskv_bench::parse_duration)]
    duration: Duration,
    /// Unmeasured run time before the measured window.
    #[arg(long, default_value = "5s", value_parser = lmskv_bench::parse_duration)]
    warmup: Duration,
    /// Value size in bytes of the put and get workloads.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Fields per record of the YCSB workloads.
    #[arg(long, default_value_t = FIELD_COUNT_DEFAULT)]
    field_count: usize,
    /// Bytes per field of the YCSB workloads.
    #[arg(long, default_value_t = FIELD_LENGTH_DEFAULT)]
    field_length: usize,
    /// Read consistency: strong, bounded:500ms, session, prefix or eventual.
    /// etcd reads are linearizable for strong and serializable otherwise.
    #[arg(long, default_value = "strong", value_parser = Consistency::parse)]
    consistency: Consistency,
    /// Do not load the records (they were loaded by an earlier run).
    #[arg(long)]
    skip_load: bool,
    /// Server process ids whose CPU time to measure (default: found in /proc
    /// by program name and listen address).
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// Seed of the clients' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// lmskv: send every request as its own call, never bundled with
    /// others to the same node.
    #[arg(long)]
    no_bundle: bool,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_target(s: &str) -> Result<TargetKind, String> {
    TargetKind::parse(s).ok_or_else(|| format!("unknown target {s:?}; use lmskv or etcd"))
}

fn parse_workload(s: &str) -> Result<WorkloadKind, String> {
    WorkloadKind::parse(s)
        .ok_or_else(|| format!("unknown workload {s:?}; use a, b, c, d, e, f, put or get"))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("lmskv-bench: {e:#}");
        std::process::exit(1);
    }
}

fn print_summary(r: &RunReport) {
    let cpu = r
        .server_cpu_us_per_op
        .map(|c| format!("{c:.0}us"))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "{} {} threads={} ops={} failed={} throughput={:.0} ops/s p50={}us p99={}us p999={}us max={}us server_cpu/op={}",
        r.target,
        r.workload,
        r.threads,
        r.ops_ok,
        r.ops_failed,
        r.throughput_ops_s,
        r.latency_us.p50,
        r.latency_us.p99,
        r.latency_us.p999,
        r.latency_us.max,
        cpu
    );
    if let Some(e) = &r.first_error {
        eprintln!("lmskv-bench: first error: {e}");
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig {
        target: args.target,
        endpoints: args.endpoints,
        workload: args.workload,
        records: args.records,
        threads: args.threads,
        duration: args.duration,
        warmup: args.warmup,
        value_size: args.value_size,
        field_count: args.field_count,
        field_length: args.field_length,
        consistency: args.consistency,
        load: !args.skip_load,
        server_pids: (!args.server_pids.is_empty()).then_some(args.server_pids),
        seed: args.seed,
        bundle: !args.no_bundle,
    };
    let report = runner::run(cfg).await?;
    print_summary(&report);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}
