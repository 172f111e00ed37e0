//! Test support for lmskv: a harness that runs real `lmskv-node` processes on
//! loopback ports (or, as root, each in its own network namespace), and
//! helpers the integration suites share.
//!
//! The suites live in `tests/tests/cluster/*.rs`, one module each of one
//! test binary (`--test cluster`).

pub mod chaos;
pub mod checker;
pub mod cluster;
pub mod netns;
pub mod partition;
pub mod proxy;
pub mod router;

pub use cluster::{ClusterOptions, TestCluster};

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message. Tests wait for conditions, never for fixed times.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Logs a test phase to stderr, so a failing test shows how far it got.
#[macro_export]
macro_rules! phase {
    ($($arg:tt)*) => {
        eprintln!("[{:>8.3}s] {}", $crate::cluster::elapsed_s(), format!($($arg)*))
    };
}
