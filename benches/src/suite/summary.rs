//! Medians over the pairs of a suite, the goals against etcd, and the files
//! they are written to: `report.md`, `results.json` and the charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::{RunFailure, RunRecord, SuiteConfig};
use crate::target::TargetKind;
use crate::ycsb::WorkloadKind;

/// Medians of one (workload, clients, target) over its pairs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cell {
    pub runs: usize,
    pub throughput_ops_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub server_cpu_us_per_op: Option<f64>,
    pub ops_failed: u64,
}

/// Key of a [`Cell`].
pub type CellKey = (WorkloadKind, usize, TargetKind);

/// Every cell of a suite.
#[derive(Debug, Clone)]
pub struct Summary {
    pub cells: BTreeMap<CellKey, Cell>,
    /// Each run of a cell by its pair number (a cell of one run each).
    pub runs: BTreeMap<CellKey, BTreeMap<usize, Cell>>,
}

/// The median of `v` (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One goal of the issue, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    pub etcd: Option<f64>,
    pub lmskv: Option<f64>,
    /// lmskv / etcd, of the medians.
    pub ratio: Option<f64>,
    /// lmskv / etcd within each pair (the two runs next to each other in
    /// time, so drift of the machine between pairs cancels), by pair.
    pub pair_ratios: Vec<f64>,
    /// The median of `pair_ratios`.
    pub pair_median: Option<f64>,
    /// The ratio the goal asks for.
    pub required: String,
    /// Whether the median of the pair ratios meets it (the ratio of the
    /// medians when no pair has both runs).
    pub met: Option<bool>,
}

impl Summary {
    /// Groups runs and takes medians.
    pub fn build(_cfg: &SuiteConfig, runs: &[RunRecord]) -> Summary {
        let mut groups: BTreeMap<CellKey, Vec<&RunRecord>> = BTreeMap::new();
        for r in runs {
            let (Some(w), Some(t)) = (
                WorkloadKind::parse(&r.report.workload),
                TargetKind::parse(&r.report.target),
            ) else {
                continue;
            };
            groups.entry((w, r.report.threads, t)).or_default().push(r);
        }
        let runs = groups
            .iter()
            .map(|(k, rs)| {
                let by_pair = rs.iter().map(|r| (r.pair, one_run(r))).collect();
                (*k, by_pair)
            })
            .collect();
        let cells = groups
            .into_iter()
            .map(|(k, rs)| {
                let m = |f: &dyn Fn(&RunRecord) -> f64| {
                    median(rs.iter().map(|r| f(r)).collect()).unwrap_or(0.0)
                };
                let cpu: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.report.server_cpu_us_per_op)
                    .collect();
                let cell = Cell {
                    runs: rs.len(),
                    throughput_ops_s: m(&|r| r.report.throughput_ops_s),
                    p50_us: m(&|r| r.report.latency_us.p50 as f64),
                    p99_us: m(&|r| r.report.latency_us.p99 as f64),
                    p999_us: m(&|r| r.report.latency_us.p999 as f64),
                    max_us: m(&|r| r.report.latency_us.max as f64),
                    server_cpu_us_per_op: median(cpu),
                    ops_failed: rs.iter().map(|r| r.report.ops_failed).sum(),
                };
                (k, cell)
            })
            .collect();
        Summary { cells, runs }
    }

    /// lmskv / etcd of `metric` within each pair that has both runs of
    /// (`w`, `clients`), in pair order.
    pub fn pair_ratios(
        &self,
        w: WorkloadKind,
        clients: usize,
        metric: fn(&Cell) -> Option<f64>,
    ) -> Vec<f64> {
        let (Some(e), Some(l)) = (
            self.runs.get(&(w, clients, TargetKind::Etcd)),
            self.runs.get(&(w, clients, TargetKind::Lmskv)),
        ) else {
            return Vec::new();
        };
        e.iter()
            .filter_map(|(pair, e)| {
                let e = metric(e)?;
                let l = metric(l.get(pair)?)?;
                (e > 0.0).then_some(l / e)
            })
            .collect()
    }

    fn pair(&self, w: WorkloadKind, clients: usize) -> (Option<&Cell>, Option<&Cell>) {
        (
            self.cells.get(&(w, clients, TargetKind::Etcd)),
            self.cells.get(&(w, clients, TargetKind::Lmskv)),
        )
    }

    fn goal(
        &self,
        goal: &str,
        w: WorkloadKind,
        clients: usize,
        metric: fn(&Cell) -> Option<f64>,
        bound: f64,
        at_least: bool,
    ) -> Goal {
        let (e, l) = self.pair(w, clients);
        let etcd = e.and_then(metric);
        let lmskv = l.and_then(metric);
        let ratio = match (etcd, lmskv) {
            (Some(e), Some(l)) if e > 0.0 => Some(l / e),
            _ => None,
        };
        let pair_ratios = self.pair_ratios(w, clients, metric);
        let pair_median = median(pair_ratios.clone());
        Goal {
            goal: goal.to_string(),
            etcd,
            lmskv,
            ratio,
            pair_ratios,
            pair_median,
            required: format!("{} {bound}x", if at_least { ">=" } else { "<=" }),
            met: pair_median
                .or(ratio)
                .map(|r| if at_least { r >= bound } else { r <= bound }),
        }
    }

    /// The goals of the issue, as far as the suite measured them.
    pub fn goals(&self) -> Vec<Goal> {
        let tput = |c: &Cell| Some(c.throughput_ops_s);
        let p50 = |c: &Cell| Some(c.p50_us);
        let p99 = |c: &Cell| Some(c.p99_us);
        let cpu = |c: &Cell| c.server_cpu_us_per_op;
        vec![
            self.goal(
                "put throughput, 64 clients",
                WorkloadKind::Put,
                64,
                tput,
                2.0,
                true,
            ),
            self.goal(
                "put throughput, 256 clients",
                WorkloadKind::Put,
                256,
                tput,
                2.0,
                true,
            ),
            self.goal("put p50, 1 client", WorkloadKind::Put, 1, p50, 0.6, false),
            self.goal(
                "put p99, 64 clients",
                WorkloadKind::Put,
                64,
                p99,
                1.0,
                false,
            ),
            self.goal(
                "get p99, 64 clients",
                WorkloadKind::Get,
                64,
                p99,
                1.0,
                false,
            ),
            self.goal(
                "get throughput (STRONG vs linearizable), 64 clients",
                WorkloadKind::Get,
                64,
                tput,
                2.0,
                true,
            ),
            self.goal(
                "server CPU per put, 64 clients",
                WorkloadKind::Put,
                64,
                cpu,
                0.5,
                false,
            ),
        ]
    }

    /// Writes `results.json`, `report.md` and the charts.
    pub fn write(
        &self,
        cfg: &SuiteConfig,
        perf: Option<&Path>,
        failures: &[RunFailure],
        took: Duration,
    ) -> anyhow::Result<()> {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .map(|((w, c, t), cell)| {
                serde_json::json!({
                    "workload": w.name(),
                    "clients": c,
                    "target": t.name(),
                    "median": cell,
                })
            })
            .collect();
        let results = serde_json::json!({
            "settings": settings_json(cfg),
            "medians": cells,
            "goals": self.goals(),
            "failed_runs": failures.iter().map(|f| serde_json::json!({
                "target": f.target.name(),
                "workload": f.workload.name(),
                "clients": f.clients,
                "pair": f.pair,
                "error": f.error,
            })).collect::<Vec<_>>(),
        });
        let path = cfg.out_dir.join("results.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("write {}", path.display()))?;

        let charts = super::chart::draw(self, &cfg.out_dir);
        let md = self.markdown(cfg, perf, failures, took, &charts);
        let path = cfg.out_dir.join("report.md");
        std::fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }

    fn markdown(
        &self,
        cfg: &SuiteConfig,
        perf: Option<&Path>,
        failures: &[RunFailure],
        took: Duration,
        charts: &anyhow::Result<Vec<String>>,
    ) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# lmskv vs etcd\n");
        let _ = writeln!(
            s,
            "Both systems ran as 3 members on 127.0.0.1 of one machine, every commit \
             fsynced (lmskv: group-committed Raft log; etcd: its default WAL fsync), \
             driven by the same closed-loop generator (`lmskv-bench`). Each setting ran \
             {} pair(s), etcd then lmskv; figures are medians over the pairs. \
             The whole suite took {:.0} s.\n",
            cfg.pairs,
            took.as_secs_f64()
        );
        let _ = writeln!(s, "## Setup\n");
        let _ = writeln!(s, "- machine: {}", machine());
        if let Some(n) = &cfg.machine_note {
            let _ = writeln!(s, "- note: {n}");
        }
        let _ = writeln!(s, "- etcd: {}", etcd_version(&cfg.etcd_bin));
        let _ = writeln!(
            s,
            "- servers: 3 etcd members with default settings (Go uses every core); 3 lmskv \
             nodes with `--worker-threads {}` (the cores shared among them) and the config \
             `{}` (no splits by load: the nodes share one host's cores, so a split spreads \
             no load; etcd is one Raft group too); fresh clusters per workload, lmskv's \
             first run once its placement has spread the range leaders over the nodes \
             (waiting up to {:?}), so that no leader moves during a run",
            super::cluster::lmskv_worker_threads(),
            super::cluster::lmskv_config(&cfg.lmskv_config_extra)
                .trim()
                .replace('\n', "; "),
            cfg.settle
        );
        let _ = writeln!(
            s,
            "- per run: {:?} warm-up, {:?} measured; {} records loaded once per workload \
             and system; put/get values {} B, YCSB records 10 fields x 100 B; reads {} \
             (etcd: linearizable for strong, serializable otherwise)",
            cfg.warmup,
            cfg.duration,
            cfg.records,
            cfg.value_size,
            cfg.consistency.name()
        );
        let _ = writeln!(
            s,
            "- server CPU: user+system time of the 3 server processes over the measured \
             window (from /proc/PID/stat), divided by operations; the idle cluster of the \
             other system stayed up meanwhile\n- both clusters are started afresh for \
             each workload\n"
        );

        let _ = writeln!(s, "## Goals (lmskv / etcd)\n");
        let _ = writeln!(
            s,
            "| goal | etcd | lmskv | lmskv/etcd | by pair | median of pairs | required | met |\n|---|---:|---:|---:|---|---:|---|---|"
        );
        let two = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into());
        for g in self.goals() {
            let by_pair: Vec<String> = g.pair_ratios.iter().map(|r| format!("{r:.2}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                g.goal,
                fmt_opt(g.etcd),
                fmt_opt(g.lmskv),
                two(g.ratio),
                by_pair.join(", "),
                two(g.pair_median),
                g.required,
                match g.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "not measured",
                }
            );
        }
        let _ = writeln!(
            s,
            "\netcd and lmskv: medians over the pairs; lmskv/etcd: their ratio; by \
             pair: the ratio within each pair, whose two runs ran one after the other, \
             so that the machine's drift between pairs cancels; a goal is met when \
             the median of those is. \
             Throughput in ops/s, latency and CPU in µs. The route lookup among \
             10,000 ranges is measured by the client crate's criterion bench \
             (`cargo bench -p lmskv-client --bench route_cache`).\n"
        );
        self.tables(&mut s);
        if !failures.is_empty() {
            let _ = writeln!(s, "## Failed runs\n");
            let _ = writeln!(
                s,
                "| system | workload | clients | pair | error |\n|---|---|---:|---:|---|"
            );
            for f in failures {
                let first_line = f.error.lines().next().unwrap_or("");
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    f.target.name(),
                    f.workload.name(),
                    f.clients,
                    f.pair,
                    first_line.replace('|', "/")
                );
            }
            let _ = writeln!(s);
        }
        match charts {
            Ok(files) if !files.is_empty() => {
                let _ = writeln!(s, "## Charts\n");
                for f in files {
                    let _ = writeln!(s, "![{f}]({f})\n");
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(s, "Charts were not drawn: {e:#}\n");
            }
        }
        if let Some(p) = perf {
            let _ = writeln!(s, "## Profile\n");
            let _ = writeln!(
                s,
                "`perf record -g` of the three lmskv nodes during an extra put run (not \
                 counted above): see [{}]({}).\n",
                p.file_name().and_then(|n| n.to_str()).unwrap_or("perf"),
                p.file_name().and_then(|n| n.to_str()).unwrap_or("perf"),
            );
        }
        let _ = writeln!(
            s,
            "Raw results: `raw/*.json` (one per run), medians: `results.json`."
        );
        s
    }

    /// Markdown tables, one per workload.
    pub fn tables(&self, s: &mut String) {
        let mut by_workload: BTreeMap<usize, (WorkloadKind, Vec<usize>)> = BTreeMap::new();
        for (w, c, _) in self.cells.keys() {
            let order = WorkloadKind::ALL.iter().position(|x| x == w).unwrap_or(99);
            let e = by_workload.entry(order).or_insert((*w, Vec::new()));
            if !e.1.contains(c) {
                e.1.push(*c);
            }
        }
        for (w, clients) in by_workload.values() {
            let _ = writeln!(s, "### {}\n", w.describe());
            let _ = writeln!(
                s,
                "| clients | etcd ops/s | lmskv ops/s | ratio | etcd p50 | lmskv p50 | etcd p99 | lmskv p99 | p99 ratio | etcd CPU/op | lmskv CPU/op | CPU ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for c in clients {
                let (e, l) = self.pair(*w, *c);
                let get = |x: Option<&Cell>, f: fn(&Cell) -> Option<f64>| x.and_then(f);
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                    _ => "–".into(),
                };
                let tp = |c: &Cell| Some(c.throughput_ops_s);
                let p50 = |c: &Cell| Some(c.p50_us);
                let p99 = |c: &Cell| Some(c.p99_us);
                let cpu = |c: &Cell| c.server_cpu_us_per_op;
                let _ = writeln!(
                    s,
                    "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    fmt_opt(get(e, tp)),
                    fmt_opt(get(l, tp)),
                    ratio(get(e, tp), get(l, tp)),
                    fmt_opt(get(e, p50)),
                    fmt_opt(get(l, p50)),
                    fmt_opt(get(e, p99)),
                    fmt_opt(get(l, p99)),
                    ratio(get(e, p99), get(l, p99)),
                    fmt_opt(get(e, cpu)),
                    fmt_opt(get(l, cpu)),
                    ratio(get(e, cpu), get(l, cpu)),
                );
            }
            let _ = writeln!(s);
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "–".into(),
    }
}

fn settings_json(cfg: &SuiteConfig) -> serde_json::Value {
    serde_json::json!({
        "targets": cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "plan": cfg.plan.iter().map(|(w, c)| serde_json::json!({"workload": w.name(), "clients": c})).collect::<Vec<_>>(),
        "pairs": cfg.pairs,
        "duration_s": cfg.duration.as_secs_f64(),
        "warmup_s": cfg.warmup.as_secs_f64(),
        "settle_max_s": cfg.settle.as_secs_f64(),
        "records": cfg.records,
        "value_size": cfg.value_size,
        "consistency": cfg.consistency.name(),
        "machine": machine(),
        "machine_note": cfg.machine_note,
    })
}

/// CPU model, core count and memory of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({model}), {:.0} GiB memory",
        mem_kib as f64 / (1024.0 * 1024.0)
    )
}

fn etcd_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into())
}

/// One run as a cell of its own.
fn one_run(r: &RunRecord) -> Cell {
    let l = &r.report.latency_us;
    Cell {
        runs: 1,
        throughput_ops_s: r.report.throughput_ops_s,
        p50_us: l.p50 as f64,
        p99_us: l.p99 as f64,
        p999_us: l.p999 as f64,
        max_us: l.max as f64,
        server_cpu_us_per_op: r.report.server_cpu_us_per_op,
        ops_failed: r.report.ops_failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tput(ops: f64) -> Cell {
        Cell {
            runs: 1,
            throughput_ops_s: ops,
            p50_us: 0.0,
            p99_us: 0.0,
            p999_us: 0.0,
            max_us: 0.0,
            server_cpu_us_per_op: None,
            ops_failed: 0,
        }
    }

    /// Each pair's ratio divides the two runs of that pair; the goal is
    /// judged on their median, which can differ from the ratio of the
    /// medians when both systems drift between pairs; a pair missing
    /// one system's run is left out.
    #[test]
    fn goals_are_judged_on_the_median_of_the_pair_ratios() {
        let w = WorkloadKind::Put;
        let mut s = Summary {
            cells: BTreeMap::new(),
            runs: BTreeMap::new(),
        };
        let etcd = [(1, 8_000.0), (2, 7_000.0), (3, 5_000.0), (4, 9_000.0)];
        let lmskv = [(1, 18_000.0), (2, 13_000.0), (3, 11_000.0)];
        s.runs.insert(
            (w, 256, TargetKind::Etcd),
            etcd.iter().map(|(p, v)| (*p, tput(*v))).collect(),
        );
        s.runs.insert(
            (w, 256, TargetKind::Lmskv),
            lmskv.iter().map(|(p, v)| (*p, tput(*v))).collect(),
        );
        s.cells.insert((w, 256, TargetKind::Etcd), tput(7_000.0));
        s.cells.insert((w, 256, TargetKind::Lmskv), tput(13_000.0));
        let ratios = s.pair_ratios(w, 256, |c| Some(c.throughput_ops_s));
        assert_eq!(ratios, [18.0 / 8.0, 13.0 / 7.0, 11.0 / 5.0]);
        let g = s
            .goals()
            .into_iter()
            .find(|g| g.goal == "put throughput, 256 clients")
            .unwrap();
        assert!(g.ratio.unwrap() < 2.0, "the ratio of the medians is 13/7");
        assert_eq!(g.pair_median, Some(2.2));
        assert_eq!(g.met, Some(true));
        // Without pairs the ratio of the medians decides.
        let g = s
            .goals()
            .into_iter()
            .find(|g| g.goal == "put throughput, 64 clients")
            .unwrap();
        assert_eq!((g.ratio, g.pair_median, g.met), (None, None, None));
        s.cells.insert((w, 64, TargetKind::Etcd), tput(6_000.0));
        s.cells.insert((w, 64, TargetKind::Lmskv), tput(11_000.0));
        let g = s
            .goals()
            .into_iter()
            .find(|g| g.goal == "put throughput, 64 clients")
            .unwrap();
        assert_eq!(g.met, Some(false));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
