//! CPU time used by server processes, read from `/proc/<pid>/stat`.
//!
//! The load generator samples the user + system time of every server process
//! at the start and end of the measured window; the difference divided by the
//! operations done is the server CPU per operation.

use std::path::Path;

/// Most server processes one run may watch.
pub const SERVER_PIDS_MAX: usize = 64;

/// User + system CPU time of process `pid` (all its threads), in microseconds.
pub fn process_cpu_us(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    parse_stat_cpu_us(&text, rustix::param::clock_ticks_per_second())
        .ok_or_else(|| anyhow::anyhow!("cannot parse {path}"))
}

/// Parses utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line and
/// converts clock ticks to microseconds.
pub fn parse_stat_cpu_us(stat: &str, ticks_per_s: u64) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    if ticks_per_s == 0 {
        return None;
    }
    Some((utime + stime) * 1_000_000 / ticks_per_s)
}

/// Sum of [`process_cpu_us`] over `pids`; a process that exited is an error,
/// because its time would silently drop out of the total.
pub fn total_cpu_us(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| process_cpu_us(*p)).sum()
}

/// The `HOST:PORT` part of an endpoint that may carry a scheme.
fn host_port(endpoint: &str) -> &str {
    let e = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    e.trim_end_matches('/')
}

/// Finds server processes: those whose program file name is `program` and
/// whose command line names one of `endpoints` (as a listen or client URL).
pub fn find_server_pids(program: &str, endpoints: &[String]) -> Vec<u32> {
    let wanted: Vec<&str> = endpoints.iter().map(|e| host_port(e)).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if cmdline_matches(&args, program, &wanted) {
            pids.push(pid);
            if pids.len() >= SERVER_PIDS_MAX {
                break;
            }
        }
    }
    pids.sort_unstable();
    pids
}

fn cmdline_matches(args: &[String], program: &str, endpoints: &[&str]) -> bool {
    let Some(exe) = args.first() else {
        return false;
    };
    if Path::new(exe).file_name().and_then(|n| n.to_str()) != Some(program) {
        return false;
    }
    // The listen address must be one of the endpoints: lmskv names it in
    // `--listen`, etcd in `--listen-client-urls`. `--join` lists peers too,
    // so only the listen flags count.
    args.windows(2).any(|w| {
        let flag = w[0].trim_start_matches('-');
        let listen = matches!(flag, "listen" | "listen-client-urls");
        listen
            && w[1]
                .split(',')
                .any(|u| endpoints.iter().any(|e| host_port(u) == *e))
    }) || args.iter().any(|a| {
        let (flag, value) = a.split_once('=').unwrap_or((a, ""));
        matches!(
            flag.trim_start_matches('-'),
            "listen" | "listen-client-urls"
        ) && value
            .split(',')
            .any(|u| endpoints.iter().any(|e| host_port(u) == *e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_the_name_parses() {
        let line =
            "1234 (lmskv node) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_cpu_us(line, 100), Some(3_000_000));
        assert_eq!(parse_stat_cpu_us("garbage", 100), None);
    }

    #[test]
    fn own_process_cpu_is_readable_and_grows() {
        let me = std::process::id();
        let before = process_cpu_us(me).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(process_cpu_us(me).unwrap() >= before);
    }

    #[test]
    fn command_lines_match_only_on_listen_flags() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let node = s(&[
            "/t/release/lmskv-node",
            "--node-id",
            "2",
            "--listen",
            "127.0.0.1:7002",
            "--join",
            "127.0.0.1:7001,127.0.0.1:7002",
        ]);
        assert!(cmdline_matches(&node, "lmskv-node", &["127.0.0.1:7002"]));
        assert!(!cmdline_matches(&node, "lmskv-node", &["127.0.0.1:7001"]));
        assert!(!cmdline_matches(&node, "etcd", &["127.0.0.1:7002"]));
        let etcd = s(&[
            "/usr/bin/etcd",
            "--listen-client-urls=http://127.0.0.1:2379",
        ]);
        assert!(cmdline_matches(&etcd, "etcd", &["127.0.0.1:2379"]));
    }
}
