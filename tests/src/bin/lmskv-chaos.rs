//! `lmskv-chaos`: runs workloads against a real multi-process cluster while
//! a nemesis kills, pauses and partitions nodes, transfers range leaders,
//! splits ranges and moves replicas, checks what clients observed, prints a summary and
//! optionally writes a JSON report.
//!
//! Run as root, every node runs in its own network namespace and
//! partitions act on IP packets; elsewhere (or with `--network proxy`) a TCP
//! proxy in front of each node stands in. Ctrl-C stops the run and removes
//! its nodes and namespaces.
//!
//! Exits 0 only when the register history is linearizable, the set lost no
//! acknowledged write and the bank kept its total; otherwise prints the seed
//! that reproduces the run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lmskv_tests::chaos::{self, ChaosOptions, Network};

/// Chaos test for lmskv: workloads, faults, checkers.
#[derive(Debug, Parser)]
#[command(name = "lmskv-chaos")]
struct Args {
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How long to inject faults, e.g. 60s, 30m, 1h.
    #[arg(long, default_value = "60s", value_parser = chaos::parse_duration)]
    duration: Duration,
    /// Faults to inject: `all`, or a comma-separated list (kill, pause,
    /// partition, transfer, split, membership, skew; membership needs more
    /// nodes than the replication factor, e.g. --nodes 5, and is skipped
    /// otherwise; skew needs libfaketime).
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Workloads to run: a comma-separated list (register, set, bank).
    #[arg(long, default_value = "register,set,bank")]
    workload: String,
    /// Seed for every random choice; random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// The network the nodes talk over: `netns` (a network namespace per
    /// node, partitions on IP packets; needs root), `proxy` (a TCP proxy
    /// in front of each node), or `auto` (netns where it works, else proxy).
    #[arg(long, default_value = "auto", value_parser = Network::parse)]
    network: Network,
    /// Where to write the JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lmskv-chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    locate_binaries();
    let seed = opts.seed;
    let report = match chaos::run(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lmskv-chaos: run failed: {e:#}\nrerun with --seed {seed}");
            return ExitCode::FAILURE;
        }
    };
    println!("{report}");
    if let Some(path) = &args.report {
        if let Err(e) = write_report(path, &report) {
            eprintln!("lmskv-chaos: {e:#}");
            return ExitCode::FAILURE;
        }
        println!("report written to {}", path.display());
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn options(args: &Args) -> anyhow::Result<ChaosOptions> {
    let opts = ChaosOptions {
        nodes: args.nodes,
        duration: args.duration,
        nemeses: chaos::parse_nemeses(&args.nemesis)?,
        workloads: chaos::parse_workloads(&args.workload)?,
        seed: args.seed.unwrap_or_else(rand::random),
        network: args.network,
    };
    opts.validate()?;
    Ok(opts)
}

/// The harness looks for `lmskv-node` two levels above a test binary
/// (`target/<profile>/deps/<test>`); this binary sits one level up, in
/// `target/<profile>`, next to `lmskv-node`. Point the harness there unless
/// the caller already chose a directory.
fn locate_binaries() {
    if std::env::var_os("LMSKV_BIN_DIR").is_some() {
        return;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    {
        // Single-threaded here: no runtime has started yet.
        std::env::set_var("LMSKV_BIN_DIR", dir);
    }
}

fn write_report(path: &std::path::Path, report: &chaos::ChaosReport) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
}
