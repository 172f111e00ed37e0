//! `lmskv-sim`: runs the deterministic simulation over many seeds, or
//! replays one.
//!
//! ```text
//! lmskv-sim --seeds 1000 [--first 1]   # seeds first..first+999, progress on stdout
//! lmskv-sim --seed 42                   # one seed, e.g. a failure's, again
//! lmskv-sim --seed 42 --no-snapshots    # replicas never snapshot
//! ```
//! Exits non-zero when any seed broke an invariant, after listing them.
//!
//! Each seed of a sweep runs in a child process of its own, as a replay
//! does: a process that already ran seeds carries state into the next run
//! (tokio's task ids come from one process-wide counter, and the order in
//! which a crashed host's tasks are dropped follows them), so a seed that
//! failed after others in one process might not fail again alone.

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
    /// Print only the report of `--seed` (how a sweep runs each seed).
    #[arg(long, hide = true, requires = "seed")]
    report_only: bool,
}

/// Runs `seed` in a child process (`--seed N --report-only`); returns its
/// report text and whether it passed.
fn run_in_child(seed: u64, args: &Args) -> (String, bool) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return (
                format!("seed={seed} ERROR cannot find this binary: {e}"),
                false,
            )
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--seed")
        .arg(seed.to_string())
        .arg("--duration-s")
        .arg(args.duration_s.to_string())
        .arg("--report-only")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if args.no_snapshots {
        cmd.arg("--no-snapshots");
    }
    match cmd.output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
            if text.is_empty() {
                (
                    format!("seed={seed} ERROR the run printed nothing ({})", out.status),
                    false,
                )
            } else {
                (text, out.status.success())
            }
        }
        Err(e) => (
            format!("seed={seed} ERROR cannot start the run: {e}"),
            false,
        ),
    }
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
    if !lmskv_sim::EXACT_REPLAY {
        eprintln!(
            "lmskv-sim: built without --cfg tokio_unstable (RUSTFLAGS replaces .cargo/config.toml's): \
             a seed brings back its faults and workload, but not always the same interleaving"
        );
    }
    if args.report_only {
        return match run_seed(seeds[0], &opts) {
            Ok(report) => {
                println!("{report}");
                if report.passed() {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(e) => {
                println!("seed={} ERROR {e}", seeds[0]);
                std::process::ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let mut failed = Vec::new();
    for (i, seed) in seeds.iter().enumerate() {
        let (text, passed) = if args.seed.is_some() {
            match run_seed(*seed, &opts) {
                Ok(report) => (report.to_string(), report.passed()),
                Err(e) => (format!("seed={seed} ERROR {e}"), false),
            }
        } else {
            run_in_child(*seed, &args)
        };
        println!("[{}/{}] {text}", i + 1, seeds.len());
        if !passed {
            failed.push(*seed);
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
