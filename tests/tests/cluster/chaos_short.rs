//! A short chaos run: a 4-node cluster for about 25 s under every nemesis
//! (kill, pause, partition, leader transfer, split, replica move, clock skew
//! where libfaketime is installed) with the
//! register, set and bank workloads; the history must be linearizable, no
//! acknowledged write lost and the bank's total kept. Four nodes, so that
//! every range (3 replicas) has a node to move a replica to.
//!
//! As root the nodes run in network namespaces and partitions act on IP
//! packets (checked below); elsewhere they run behind TCP proxies.

use std::time::Duration;

use lmskv_tests::chaos::{self, ChaosOptions, Linearizable, Nemesis, Network, Workload};
use lmskv_tests::{netns, phase};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn short_chaos_run_is_linearizable_loses_nothing_and_keeps_the_bank() {
    let seed: u64 = rand::random();
    phase!("short chaos run, seed {seed}");
    let namespaces = netns::available();
    let opts = ChaosOptions {
        nodes: 4,
        // Long enough for the nemesis to deal most runs every one of its
        // nemeses (they come from a shuffled deck).
        duration: Duration::from_secs(25),
        nemeses: Nemesis::available(),
        workloads: vec![Workload::Register, Workload::Set, Workload::Bank],
        seed,
        network: Network::Auto,
    };
    let report = chaos::run_within(opts, TEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("chaos run failed: {e:#} (seed {seed})"));
    phase!("\n{report}");
    match &namespaces {
        Ok(()) => assert_eq!(report.network, "netns", "root: the nodes ran in namespaces"),
        Err(why) => {
            phase!("network namespaces unavailable ({why}): the run used proxies");
            assert_eq!(report.network, "proxy");
        }
    }
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
    let bank = report.bank.as_ref().expect("the bank workload ran");
    assert!(
        bank.transfers > 0 && bank.snapshots_scan > 0,
        "the bank workload made progress (seed {seed})"
    );
    assert_eq!(
        bank.anomalies_scan, 0,
        "the bank kept its total in every scan snapshot and the final read: rerun with --seed {seed}"
    );
    // A STRONG BatchGet reads its keys from one storage snapshot; before it
    // did, it could see half of an atomic transfer (a torn total).
    assert_eq!(
        bank.anomalies_batch_get, 0,
        "every batch_get snapshot kept the bank's total: rerun with --seed {seed}"
    );
    assert_eq!(report.bank_ok, Some(true), "rerun with --seed {seed}");
}
