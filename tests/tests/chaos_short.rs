//! A short chaos run: a 3-node cluster under kill, pause and partition faults for about
//! 20 s with the register and set workloads; the history must be
//! linearizable and no acknowledged write lost.

use std::time::Duration;

use lmskv_tests::chaos::{self, ChaosOptions, Linearizable, Nemesis, Workload};
use lmskv_tests::phase;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_chaos_run_is_linearizable_and_loses_nothing() {
    let seed: u64 = rand::random();
    phase!("short chaos run, seed {seed}");
    let opts = ChaosOptions {
        nodes: 3,
        duration: Duration::from_secs(20),
        nemeses: Nemesis::SUPPORTED.to_vec(),
        workloads: vec![Workload::Register, Workload::Set],
        seed,
    };
    let report = tokio::time::timeout(TEST_TIMEOUT, chaos::run(opts))
        .await
        .unwrap_or_else(|_| panic!("chaos run timed out (seed {seed})"))
        .unwrap_or_else(|e| panic!("chaos run failed: {e:#} (seed {seed})"));
    phase!("\n{report}");
    assert!(
        report.ops_ok > 100,
        "the workloads made progress (seed {seed})"
    );
    assert_eq!(
        report.linearizable,
        Linearizable::Yes,
        "rerun with --seed {seed}"
    );
    assert_eq!(report.lost_writes, Some(0), "rerun with --seed {seed}");
    assert_eq!(report.phantom_writes, Some(0), "rerun with --seed {seed}");
}
