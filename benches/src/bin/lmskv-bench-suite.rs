//! `lmskv-bench-suite`: runs `make bench` — lmskv against etcd on this
//! machine, every workload at every client count, interleaved pairs — and
//! writes the report, raw JSON and charts. Settings come from `BENCH_*`
//! environment variables (see `lmskv_bench::suite::SuiteConfig::from_env`).
//! Every server process and temporary directory is removed at the end, also
//! on failure, Ctrl-C or SIGTERM.

use lmskv_bench::suite::{self, SuiteConfig};

#[tokio::main]
async fn main() {
    let result = async {
        let cfg = SuiteConfig::from_env()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = suite::run(cfg) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    }
    .await;
    // Leaving the select dropped the clusters: their processes are killed and
    // their directories removed before this point.
    if let Err(e) = result {
        eprintln!("lmskv-bench-suite: {e:#}");
        std::process::exit(1);
    }
}
