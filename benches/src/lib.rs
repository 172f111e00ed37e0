//! lmskv's benchmarks: the YCSB load generator (`lmskv-bench`), the suite
//! that compares lmskv with etcd on the same machine (`lmskv-bench-suite`,
//! run by `make bench`), and the criterion micro-benchmarks in `benches/`.
//!
//! - [`ycsb`]: key distributions, operation mixes and record layout.
//! - [`target`]: lmskv and etcd behind one set of operations.
//! - [`runner`]: load phase, warm-up and the measured closed loop.
//! - [`cpu`]: server CPU time from `/proc`.
//! - [`report`]: the JSON a run writes.
//! - [`suite`]: clusters of both systems, the interleaved run plan, the
//!   Markdown report and the charts.

pub mod cpu;
pub mod report;
pub mod runner;
pub mod suite;
pub mod target;
pub mod ycsb;

use std::time::Duration;

/// Parses `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}; use ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("7h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
