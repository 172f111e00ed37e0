//! [`RunReport`]: what one `lmskv-bench` run measured, as written with `--json`.
//! Field names are stable: the suite and other tools read them.

use serde::{Deserialize, Serialize};

/// Latency percentiles of successful operations, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `lmskv` or `etcd`.
    pub target: String,
    /// `a`..`f`, `put` or `get`.
    pub workload: String,
    /// Read consistency requested.
    pub consistency: String,
    /// Concurrent clients, each with one operation in flight.
    pub threads: usize,
    /// Records loaded before the run.
    pub records: u64,
    /// Bytes per record value.
    pub value_bytes: usize,
    /// Seconds spent loading records (0 when the load phase was skipped).
    pub load_s: f64,
    /// Seconds of warm-up, not measured.
    pub warmup_s: f64,
    /// Length of the measured window in seconds.
    pub duration_s: f64,
    /// Operations that succeeded within the measured window.
    pub ops_ok: u64,
    /// Operations that failed within the measured window.
    pub ops_failed: u64,
    /// Reads that found no record (inserts still in flight in D and E).
    pub reads_not_found: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Successful operations per second.
    pub throughput_ops_s: f64,
    /// Latency of successful operations.
    pub latency_us: Latencies,
    /// Server processes whose CPU time was measured.
    pub server_pids: Vec<u32>,
    /// User + system CPU time all server processes used in the window, in µs.
    pub server_cpu_us: Option<u64>,
    /// `server_cpu_us / ops_ok`.
    pub server_cpu_us_per_op: Option<f64>,
}
