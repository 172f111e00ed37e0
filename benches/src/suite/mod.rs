//! The lmskv-versus-etcd suite behind `make bench`.
//!
//! Starts a three-member etcd cluster and a three-node lmskv cluster on
//! loopback (both fsync every commit), then runs every workload at every
//! concurrency level as pairs, etcd then lmskv, several times, so drift of
//! the machine falls on both alike. Each run is a separate `lmskv-bench`
//! process writing its JSON; the suite then writes `report.md`, the medians
//! (`results.json`) and the charts. Settings come from `BENCH_*` environment
//! variables (see [`SuiteConfig::from_env`]).

pub mod chart;
pub mod cluster;
pub mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::report::RunReport;
use crate::target::{Consistency, TargetKind};
use crate::ycsb::WorkloadKind;
use cluster::Cluster;

/// Most pairs a suite may run per setting.
pub const PAIRS_MAX: usize = 100;
/// Time a run may take beyond its warm-up and measured window (load phase,
/// connection set-up, draining in-flight operations).
pub const RUN_OVERHEAD_MAX: Duration = Duration::from_secs(180);
/// Failed operations tolerated per run, as a fraction of all operations,
/// before the suite calls the run broken.
pub const FAILED_FRACTION_MAX: f64 = 0.01;

/// Settings of a suite run.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub targets: Vec<TargetKind>,
    /// Workloads with the client counts each runs at.
    pub plan: Vec<(WorkloadKind, Vec<usize>)>,
    pub pairs: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// How long a fresh lmskv cluster may take to spread its range leaders
    /// before its first run (zero: do not wait).
    pub settle: Duration,
    pub records: u64,
    pub value_size: usize,
    pub consistency: Consistency,
    /// Where `report.md`, `results.json`, `raw/` and the charts go.
    pub out_dir: PathBuf,
    /// Directory holding `lmskv-node` and `lmskv-bench`.
    pub bin_dir: PathBuf,
    pub etcd_bin: PathBuf,
    /// Record a perf profile of the lmskv nodes under put at this many clients.
    pub perf_clients: Option<usize>,
    /// Free text about the machine for the report.
    pub machine_note: Option<String>,
    /// Extra lines for the lmskv nodes' configuration file, after
    /// [`cluster::LMSKV_BENCH_CONFIG`] (`BENCH_LMSKV_CONFIG`).
    pub lmskv_config_extra: String,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The extra lmskv config lines of `BENCH_LMSKV_CONFIG` (`;` between
/// lines), checked to parse as TOML so that a typo fails before any run.
fn lmskv_config_extra(v: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    for line in v.split(';').map(str::trim).filter(|l| !l.is_empty()) {
        out.push_str(line);
        out.push('\n');
    }
    let full = cluster::lmskv_config(&out);
    full.parse::<toml::Table>()
        .with_context(|| format!("BENCH_LMSKV_CONFIG is not valid TOML: {full:?}"))?;
    Ok(out)
}

fn parse_list<T>(name: &str, v: &str, f: impl Fn(&str) -> Option<T>) -> anyhow::Result<Vec<T>> {
    let out: Vec<T> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| f(s).with_context(|| format!("{name}: bad entry {s:?}")))
        .collect::<anyhow::Result<_>>()?;
    if out.is_empty() {
        bail!("{name} is empty");
    }
    Ok(out)
}

impl SuiteConfig {
    /// Reads the settings:
    ///
    /// | variable | default | meaning |
    /// |---|---|---|
    /// | `BENCH_TARGETS` | `etcd,lmskv` | systems, run in this order within a pair |
    /// | `BENCH_WORKLOADS` | `put,get,a,b,c,d,e,f` | workloads |
    /// | `BENCH_CLIENTS` | `1,16,64,256` | client counts of put and get |
    /// | `BENCH_YCSB_CLIENTS` | `BENCH_CLIENTS` | client counts of A-F |
    /// | `BENCH_PAIRS` | `3` | runs of each system per setting |
    /// | `BENCH_DURATION` | `30s` | measured window per run |
    /// | `BENCH_WARMUP` | `5s` | unmeasured warm-up per run |
    /// | `BENCH_SETTLE` | `45s` | longest wait for a fresh lmskv cluster's range leaders to spread (`0s`: none) |
    /// | `BENCH_RECORDS` | `10000` | records loaded |
    /// | `BENCH_VALUE_SIZE` | `256` | value bytes of put and get |
    /// | `BENCH_CONSISTENCY` | `strong` | read consistency |
    /// | `BENCH_OUT` | `bench` | output directory |
    /// | `BENCH_BIN_DIR` | this program's directory | where `lmskv-node` and `lmskv-bench` are |
    /// | `BENCH_ETCD` | `etcd` on `PATH` | the etcd server program |
    /// | `BENCH_PERF_CLIENTS` | unset | profile lmskv under put at this many clients |
    /// | `BENCH_MACHINE_NOTE` | unset | text about the machine for the report |
    /// | `BENCH_LMSKV_CONFIG` | unset | extra TOML lines for the lmskv nodes' config, `;` between lines (e.g. `write_buffer_bytes = 8388608`; not `split_qps`, which the suite sets) |
    pub fn from_env() -> anyhow::Result<SuiteConfig> {
        let targets = parse_list(
            "BENCH_TARGETS",
            &env_or("BENCH_TARGETS", "etcd,lmskv"),
            TargetKind::parse,
        )?;
        let workloads = parse_list(
            "BENCH_WORKLOADS",
            &env_or("BENCH_WORKLOADS", "put,get,a,b,c,d,e,f"),
            WorkloadKind::parse,
        )?;
        let clients = parse_list(
            "BENCH_CLIENTS",
            &env_or("BENCH_CLIENTS", "1,16,64,256"),
            |s| {
                s.parse()
                    .ok()
                    .filter(|n| (1..=crate::runner::THREADS_MAX).contains(n))
            },
        )?;
        let ycsb_clients = match std::env::var("BENCH_YCSB_CLIENTS") {
            Ok(v) if !v.trim().is_empty() => parse_list("BENCH_YCSB_CLIENTS", &v, |s| {
                s.parse()
                    .ok()
                    .filter(|n| (1..=crate::runner::THREADS_MAX).contains(n))
            })?,
            _ => clients.clone(),
        };
        let plan = workloads
            .into_iter()
            .map(|w| {
                let c = if w.uses_value_size() {
                    clients.clone()
                } else {
                    ycsb_clients.clone()
                };
                (w, c)
            })
            .collect();
        let pairs: usize = env_or("BENCH_PAIRS", "3")
            .parse()
            .context("BENCH_PAIRS must be a number")?;
        if pairs == 0 || pairs > PAIRS_MAX {
            bail!("BENCH_PAIRS must be between 1 and {PAIRS_MAX}");
        }
        let duration = crate::parse_duration(&env_or("BENCH_DURATION", "30s"))
            .map_err(|e| anyhow::anyhow!("BENCH_DURATION: {e}"))?;
        let warmup = crate::parse_duration(&env_or("BENCH_WARMUP", "5s"))
            .map_err(|e| anyhow::anyhow!("BENCH_WARMUP: {e}"))?;
        let settle = crate::parse_duration(&env_or(
            "BENCH_SETTLE",
            &format!("{}s", cluster::SETTLE_TIMEOUT.as_secs()),
        ))
        .map_err(|e| anyhow::anyhow!("BENCH_SETTLE: {e}"))?;
        let records = env_or("BENCH_RECORDS", "10000")
            .parse()
            .context("BENCH_RECORDS must be a number")?;
        let value_size = env_or("BENCH_VALUE_SIZE", "256")
            .parse()
            .context("BENCH_VALUE_SIZE must be a number")?;
        let consistency = Consistency::parse(&env_or("BENCH_CONSISTENCY", "strong"))
            .map_err(|e| anyhow::anyhow!("BENCH_CONSISTENCY: {e}"))?;
        let bin_dir = match std::env::var_os("BENCH_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()?
                .parent()
                .context("program directory")?
                .to_path_buf(),
        };
        let perf_clients = match std::env::var("BENCH_PERF_CLIENTS") {
            Ok(v) if !v.trim().is_empty() => Some(
                v.trim()
                    .parse()
                    .context("BENCH_PERF_CLIENTS must be a number")?,
            ),
            _ => None,
        };
        Ok(SuiteConfig {
            targets,
            plan,
            pairs,
            duration,
            warmup,
            settle,
            records,
            value_size,
            consistency,
            out_dir: PathBuf::from(env_or("BENCH_OUT", "bench")),
            bin_dir,
            etcd_bin: PathBuf::from(env_or("BENCH_ETCD", "etcd")),
            perf_clients,
            machine_note: std::env::var("BENCH_MACHINE_NOTE")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            lmskv_config_extra: lmskv_config_extra(
                &std::env::var("BENCH_LMSKV_CONFIG").unwrap_or_default(),
            )?,
        })
    }

    /// How many runs the plan holds.
    pub fn run_count(&self) -> usize {
        self.plan.iter().map(|(_, c)| c.len()).sum::<usize>() * self.pairs * self.targets.len()
    }
}

/// A run that did not produce a result.
#[derive(Debug, Clone)]
pub struct RunFailure {
    pub target: TargetKind,
    pub workload: WorkloadKind,
    pub clients: usize,
    pub pair: usize,
    pub error: String,
}

/// One finished run and where its JSON is.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub pair: usize,
    pub report: RunReport,
    pub json: PathBuf,
}

fn run_name(t: TargetKind, w: WorkloadKind, clients: usize, pair: usize) -> String {
    format!("{}-{}-c{clients}-p{pair}", t.name(), w.name())
}

/// Runs one `lmskv-bench` process and reads its JSON.
#[allow(clippy::too_many_arguments)]
async fn bench_once(
    cfg: &SuiteConfig,
    cluster: &mut Cluster,
    w: WorkloadKind,
    clients: usize,
    load: bool,
    json: &Path,
    seed: u64,
) -> anyhow::Result<RunReport> {
    cluster.check_running()?;
    let bin = cfg.bin_dir.join("lmskv-bench");
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--target")
        .arg(cluster.kind.name())
        .arg("--endpoints")
        .arg(cluster.endpoints.join(","))
        .arg("--workload")
        .arg(w.name())
        .arg("--records")
        .arg(cfg.records.to_string())
        .arg("--threads")
        .arg(clients.to_string())
        .arg("--duration")
        .arg(format!("{}ms", cfg.duration.as_millis()))
        .arg("--warmup")
        .arg(format!("{}ms", cfg.warmup.as_millis()))
        .arg("--value-size")
        .arg(cfg.value_size.to_string())
        .arg("--consistency")
        .arg(cfg.consistency.name())
        .arg("--server-pids")
        .arg(pids.join(","))
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--json")
        .arg(json)
        .env_remove("LMSKV_ENDPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !load {
        cmd.arg("--skip-load");
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let limit = cfg.warmup + cfg.duration + RUN_OVERHEAD_MAX;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("run did not finish within {limit:?}"))??;
    if !out.status.success() {
        bail!(
            "lmskv-bench failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            cluster
                .check_running()
                .err()
                .map(|e| format!("\n{e:#}"))
                .unwrap_or_default()
        );
    }
    let report: RunReport = serde_json::from_slice(
        &std::fs::read(json).with_context(|| format!("read {}", json.display()))?,
    )
    .with_context(|| format!("parse {}", json.display()))?;
    let total = report.ops_ok + report.ops_failed;
    if report.ops_ok == 0 {
        bail!(
            "{} {} x{clients}: no operation succeeded (first error: {})",
            report.target,
            report.workload,
            report.first_error.as_deref().unwrap_or("none")
        );
    }
    if report.ops_failed as f64 > FAILED_FRACTION_MAX * total as f64 {
        bail!(
            "{} {} x{clients}: {} of {total} operations failed (first error: {})",
            report.target,
            report.workload,
            report.ops_failed,
            report.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(report)
}

/// Drops the padding `perf report` puts after each line.
fn trim_report(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .lines()
        .map(|l| l.trim_end().trim_end_matches(['-', ' ']))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Records a perf profile of the lmskv nodes during one extra put run (not
/// counted in the results) and writes a text summary: the hottest symbols,
/// the share of each binary or library, and the call chains of the hottest
/// symbols.
async fn perf_profile(
    cfg: &SuiteConfig,
    cluster: &mut Cluster,
    clients: usize,
) -> anyhow::Result<PathBuf> {
    let tmp = tempfile::Builder::new()
        .prefix("lmskv-bench-perf-")
        .tempdir()?;
    let data = tmp.path().join("perf.data");
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    let secs = (cfg.warmup + cfg.duration).as_secs().max(1);
    let mut perf = tokio::process::Command::new("perf")
        .arg("record")
        .arg("-g")
        .arg("-F")
        .arg("499")
        .arg("-o")
        .arg(&data)
        .arg("-p")
        .arg(pids.join(","))
        .arg("--")
        .arg("sleep")
        .arg(secs.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start perf (install linux-perf)")?;
    let json = tmp.path().join("perf-run.json");
    let run = bench_once(cfg, cluster, WorkloadKind::Put, clients, false, &json, 99).await;
    let status = perf.wait().await?;
    let run = run?;
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    let views: [(&str, &[&str]); 3] = [
        (
            "hottest symbols (self time, all three nodes)",
            &[
                "--no-children",
                "--sort",
                "dso,symbol",
                "-g",
                "none",
                "--percent-limit",
                "0.7",
            ],
        ),
        (
            "share per binary or library",
            &["--no-children", "--sort", "dso", "-g", "none"],
        ),
        (
            "call chains of the hottest symbols (callers, >= 2%)",
            &[
                "--no-children",
                "--sort",
                "symbol",
                "-g",
                "caller,2,callee,function,percent",
                "--percent-limit",
                "2",
            ],
        ),
    ];
    let mut text = format!(
        "perf record -g -F 499 on the 3 lmskv-node processes during put at {clients} clients \
         ({:.0} ops/s, p99 {} us in this extra run)\n",
        run.throughput_ops_s, run.latency_us.p99
    );
    for (title, args) in views {
        let out = tokio::process::Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(&data)
            .arg("--stdio")
            .args(args)
            .output()
            .await?;
        text.push_str(&format!("\n==== {title} ====\n"));
        text.push_str(&trim_report(&out.stdout));
        text.push('\n');
    }
    let path = cfg.out_dir.join(format!("perf-put-c{clients}.txt"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Runs the whole suite and writes its outputs.
pub async fn run(cfg: SuiteConfig) -> anyhow::Result<()> {
    let raw = cfg.out_dir.join("raw");
    std::fs::create_dir_all(&raw).with_context(|| format!("create {}", raw.display()))?;
    let started = Instant::now();
    eprintln!(
        "bench: {} runs ({} pairs, {:?} + {:?} warm-up each) into {}",
        cfg.run_count(),
        cfg.pairs,
        cfg.duration,
        cfg.warmup,
        cfg.out_dir.display()
    );
    let mut records = Vec::new();
    let mut failures: Vec<RunFailure> = Vec::new();
    let mut perf_text = None;
    let mut seed = 1;
    let total = cfg.run_count();
    let mut done = 0;
    for (w, client_counts) in &cfg.plan {
        // Fresh clusters for every workload: each starts from empty stores,
        // and state one workload leaves behind cannot slow the next.
        let mut clusters: BTreeMap<TargetKind, Cluster> = BTreeMap::new();
        for t in &cfg.targets {
            let c = match t {
                TargetKind::Lmskv => {
                    let mut c = Cluster::start_lmskv(
                        &cfg.bin_dir.join("lmskv-node"),
                        &cfg.lmskv_config_extra,
                    )
                    .await?;
                    let started = std::time::Instant::now();
                    if c.wait_leaders_spread(cfg.settle).await? {
                        eprintln!(
                            "bench: lmskv's range leaders spread in {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                    } else {
                        eprintln!(
                            "bench: lmskv's range leaders did not spread within {:?}; a leader may move during a run",
                            cfg.settle
                        );
                    }
                    c
                }
                TargetKind::Etcd => Cluster::start_etcd(&cfg.etcd_bin).await?,
            };
            clusters.insert(*t, c);
        }
        eprintln!(
            "bench: workload {} on fresh 3-member clusters ({})",
            w.name(),
            cfg.targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut loaded: Vec<TargetKind> = Vec::new();
        for &clients in client_counts {
            for pair in 1..=cfg.pairs {
                for t in &cfg.targets {
                    let cluster = clusters.get_mut(t).expect("cluster started");
                    let load = !loaded.contains(t);
                    let json = raw.join(format!("{}.json", run_name(*t, *w, clients, pair)));
                    seed += 1;
                    done += 1;
                    let report = match bench_once(&cfg, cluster, *w, clients, load, &json, seed)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let error = format!("{e:#}");
                            eprintln!(
                                "bench: [{done}/{total}] {} {} x{clients} pair {pair} FAILED: {error}",
                                t.name(),
                                w.name()
                            );
                            failures.push(RunFailure {
                                target: *t,
                                workload: *w,
                                clients,
                                pair,
                                error,
                            });
                            continue;
                        }
                    };
                    loaded.push(*t);
                    eprintln!(
                        "bench: [{done}/{total}] {:>5} {:>3} x{clients:<3} pair {pair}: {:>8.0} ops/s p50 {:>6}us p99 {:>7}us cpu/op {}",
                        t.name(),
                        w.name(),
                        report.throughput_ops_s,
                        report.latency_us.p50,
                        report.latency_us.p99,
                        report
                            .server_cpu_us_per_op
                            .map(|c| format!("{c:.0}us"))
                            .unwrap_or_else(|| "n/a".into())
                    );
                    records.push(RunRecord { pair, report, json });
                }
            }
            if *w == WorkloadKind::Put && cfg.perf_clients == Some(clients) {
                if let Some(c) = clusters.get_mut(&TargetKind::Lmskv) {
                    match perf_profile(&cfg, c, clients).await {
                        Ok(p) => {
                            eprintln!("bench: perf profile in {}", p.display());
                            perf_text = Some(p);
                        }
                        Err(e) => eprintln!("bench: no perf profile: {e:#}"),
                    }
                }
            }
        }
        for (_, c) in clusters {
            c.stop().await;
        }
    }

    let summary = summary::Summary::build(&cfg, &records);
    summary.write(&cfg, perf_text.as_deref(), &failures, started.elapsed())?;
    eprintln!(
        "bench: done in {:.0}s; report in {}",
        started.elapsed().as_secs_f64(),
        cfg.out_dir.join("report.md").display()
    );
    if !failures.is_empty() {
        bail!(
            "{} of {total} runs failed (listed in the report)",
            failures.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_lmskv_config_lines_are_joined_and_checked() {
        assert_eq!(lmskv_config_extra("").unwrap(), "");
        assert_eq!(
            lmskv_config_extra(" write_buffer_bytes = 8388608 ; proposals_in_flight_max = 4;")
                .unwrap(),
            "write_buffer_bytes = 8388608\nproposals_in_flight_max = 4\n"
        );
        let err = lmskv_config_extra("write_buffer_bytes = ").unwrap_err();
        assert!(format!("{err:#}").contains("BENCH_LMSKV_CONFIG"), "{err:#}");
        // A key the base config sets already is a duplicate key in TOML.
        assert!(lmskv_config_extra("split_qps = 1.0").is_err());
    }
}
