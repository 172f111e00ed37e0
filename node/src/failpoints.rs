//! Fail points: named places where a test can make the node crash, fail or
//! stall, configured by the `FAILPOINTS` environment variable at start
//! (`fail` crate syntax: `name=action[->action];...`, e.g.
//! `FAILPOINTS=apply-after-commit=20*off->panic`).
//!
//! They exist only in builds with the `failpoints` cargo feature (`make test`
//! builds the workspace with it); elsewhere [`fail_point!`](crate::fail_point)
//! compiles to nothing, and a node started with `FAILPOINTS` set refuses to
//! run rather than silently ignore it.
//!
//! Actions: `panic` crashes the process on the spot (abort: no destructor,
//! no flush, like `kill -9` at that line); `return` makes the operation
//! fail with an injected I/O error; `sleep(ms)`, `delay(ms)`, `pause`,
//! `print` and hit counts (`N*`) and chains (`->`) work as in `fail`.
//!
//! | name                      | where                                                        |
//! |---------------------------|--------------------------------------------------------------|
//! | `log-sync-before`         | WAL sync, before the fsync that makes log appends durable    |
//! | `log-sync-after`          | WAL sync, after the fsync, before appends are reported       |
//! | `apply-before-commit`     | apply, before the batch (data + applied id) is written       |
//! | `apply-after-commit`      | apply, after the batch is written, before clients are told   |
//! | `snapshot-build`          | snapshot build, file written, not yet renamed or recorded    |
//! | `snapshot-install`        | snapshot install, file recorded, nothing imported yet        |
//! | `snapshot-install-import` | snapshot import, old span cleared, new data not yet written  |
//! | `split-apply`             | apply of a split, before the split's batch is built          |
//! | `kv-get-read`             | a KV Get's read of its key from the store (`return(corrupt)`: the read finds the data corrupt) |

/// The names of every fail point (for documentation and tests).
pub const NAMES: &[&str] = &[
    "log-sync-before",
    "log-sync-after",
    "apply-before-commit",
    "apply-after-commit",
    "snapshot-build",
    "snapshot-install",
    "snapshot-install-import",
    "split-apply",
    "kv-get-read",
];

/// A fail point. Its `return` action makes the enclosing function return
/// `Err(e.into())` with an injected `std::io::Error`, so it fits functions
/// returning `io::Result` or `Result<_, StorageError>`.
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {
        fail::fail_point!($name, |arg: Option<String>| Err(
            $crate::failpoints::injected($name, arg).into()
        ))
    };
}

/// The error a fail point's `return` action injects.
pub fn injected(name: &str, arg: Option<String>) -> std::io::Error {
    std::io::Error::other(match arg {
        Some(msg) => format!("fail point {name}: {msg}"),
        None => format!("fail point {name}"),
    })
}

/// Configures the fail points named in `FAILPOINTS`; keep the result alive
/// for as long as the process runs. Without `FAILPOINTS` it does nothing.
/// With it, every panic aborts the process (a fail point's `panic` must end
/// the node like a crash, not unwind one task while the rest runs on).
pub fn setup() -> Result<Option<fail::FailScenario<'static>>, String> {
    let Some(spec) = std::env::var("FAILPOINTS")
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        return Ok(None);
    };
    if !fail::has_failpoints() {
        return Err(format!(
            "FAILPOINTS is set ({spec}) but this lmskv-node was built without the \
             `failpoints` feature (build with --features lmskv-node/failpoints)"
        ));
    }
    let scenario = std::panic::catch_unwind(fail::FailScenario::setup)
        .map_err(|_| format!("FAILPOINTS is malformed: {spec}"))?;
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        eprintln!("lmskv-node: panic with FAILPOINTS set: aborting");
        std::process::abort();
    }));
    tracing::warn!(failpoints = %spec, "fail points configured");
    Ok(Some(scenario))
}
