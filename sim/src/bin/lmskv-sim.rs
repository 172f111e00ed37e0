//! `lmskv-sim`: runs the deterministic simulation over many seeds, or
//! replays one.
//!
//! ```text
//! lmskv-sim --seeds 1000 [--first 1]   # seeds first..first+999, progress on stdout
//! lmskv-sim --seed 42                   # one seed, e.g. a failure's, again
//! lmskv-sim --seed 42 --no-snapshots    # replicas never snapshot
//! ```
//! Exits non-zero when any seed broke an invariant, after listing them.

use std::time::Instant;

use clap::Parser;
use lmskv_sim::{run_seed, SimOptions};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of lmskv replicas under faults")]
struct Args {
    /// Replay this one seed.
    #[arg(long, conflicts_with_all = ["seeds", "first"])]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Simulated seconds of clients and faults per seed.
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Replicas never snapshot (see SimOptions::snapshots).
    #[arg(long)]
    no_snapshots: bool,
}

fn main() -> std::process::ExitCode {
    lmskv_sim::init_logging();
    let args = Args::parse();
    let opts = SimOptions {
        duration: std::time::Duration::from_secs(args.duration_s),
        snapshots: !args.no_snapshots,
        ..SimOptions::default()
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first.saturating_add(args.seeds)).collect(),
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    for (i, seed) in seeds.iter().enumerate() {
        match run_seed(*seed, &opts) {
            Ok(report) => {
                println!("[{}/{}] {report}", i + 1, seeds.len());
                if !report.passed() {
                    failed.push(*seed);
                }
            }
            Err(e) => {
                println!("[{}/{}] seed={seed} ERROR {e}", i + 1, seeds.len());
                failed.push(*seed);
            }
        }
    }
    println!(
        "{} seeds in {:.0} s: {} passed, {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        seeds.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        return std::process::ExitCode::SUCCESS;
    }
    for s in &failed {
        println!("seed={s} failed; replay: make sim SEED={s}");
    }
    std::process::ExitCode::FAILURE
}
