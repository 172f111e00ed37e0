//! The simulation's short run inside `make test`: a few seeds with every
//! nemesis, and the seeds that once found a bug (each replays it). `make sim`
//! runs many more seeds with the `lmskv-sim` binary.

use lmskv_sim::{run_seed, SimOptions};

/// Seeds `make test` runs (each about a second of wall time on a debug build).
const SHORT_SEEDS: std::ops::Range<u64> = 1..21;

/// Seeds that once broke an invariant, with what they found; each must pass now.
const REGRESSION_SEEDS: &[(u64, &str)] = &[];

fn run(seeds: impl IntoIterator<Item = u64>) {
    lmskv_sim::init_logging();
    let opts = SimOptions::default();
    let mut failed = Vec::new();
    for seed in seeds {
        let report = run_seed(seed, &opts).expect("simulation data directory");
        println!("{report}");
        if !report.passed() {
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "seeds {failed:?} broke invariants; replay one with `make sim SEED=N`"
    );
}

#[test]
fn short_run_of_seeds_keeps_every_invariant() {
    run(SHORT_SEEDS);
}

#[test]
fn seeds_that_found_bugs_pass() {
    run(REGRESSION_SEEDS.iter().map(|(seed, _)| *seed));
}
