//! The simulation's short run inside `make test`: a few seeds with every
//! nemesis (with and without snapshots), and the seeds that once found a
//! bug (each replays it).
//! `make sim` runs many more seeds with the `lmskv-sim` binary.

use lmskv_sim::{run_seed, SimOptions, SimReport};

/// Seeds `make test` runs with snapshots (about 1.5 s of wall time each on
/// a debug build).
const SHORT_SEEDS: std::ops::Range<u64> = 1..13;
/// Seeds `make test` runs without snapshots.
const SHORT_SEEDS_WITHOUT_SNAPSHOTS: std::ops::Range<u64> = 101..105;

/// Seeds that once broke an invariant, with what they found; each must
/// pass now. Replay is not exact (see the crate docs), so a seed brings
/// back its faults and workload, not always the same interleaving.
const REGRESSION_SEEDS: &[(u64, &str)] = &[(
    237,
    "nodes 3 and 5 both led term 2 (openraft's (term, node) leader ids allow it) and the checker called it a violation",
)];

fn run_all(seeds: impl IntoIterator<Item = u64>, opts: &SimOptions) {
    lmskv_sim::init_logging();
    let reports: Vec<SimReport> = seeds
        .into_iter()
        .map(|seed| {
            let report = run_seed(seed, opts).expect("simulation data directory");
            println!("{report}");
            report
        })
        .collect();
    let failed: Vec<u64> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.seed)
        .collect();
    assert!(
        failed.is_empty(),
        "seeds {failed:?} broke invariants; replay one with `make sim SEED=N`"
    );
}

#[test]
fn short_run_of_seeds_keeps_every_invariant() {
    let regressions = REGRESSION_SEEDS.iter().map(|(seed, _)| *seed);
    run_all(SHORT_SEEDS.chain(regressions), &SimOptions::default());
    let no_snapshots = SimOptions {
        snapshots: false,
        ..SimOptions::default()
    };
    run_all(SHORT_SEEDS_WITHOUT_SNAPSHOTS, &no_snapshots);
}
