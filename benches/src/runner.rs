//! One benchmark run: load the records, warm up, then run `threads` closed-loop
//! clients for the measured window, recording latency in HDR histograms and
//! sampling the servers' CPU time at both ends of the window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::report::{Latencies, RunReport};
use crate::target::{Consistency, Target, TargetKind};
use crate::ycsb::{self, Op, OpChooser, ValuePool, WorkloadKind};

/// Most concurrent clients one run may use.
pub const THREADS_MAX: usize = 4_096;
/// Longest measured window or warm-up accepted.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// Most records a run may load.
pub const RECORDS_MAX: u64 = 100_000_000;
/// Largest value accepted.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Concurrent writers of the load phase.
pub const LOAD_CLIENTS: usize = 64;
/// Highest latency the histograms hold, in µs; longer operations are clamped.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: TargetKind,
    pub endpoints: Vec<String>,
    pub workload: WorkloadKind,
    pub records: u64,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Value size of the put and get workloads.
    pub value_size: usize,
    /// Record layout of the YCSB workloads.
    pub field_count: usize,
    pub field_length: usize,
    pub consistency: Consistency,
    /// Whether to write the records before the run.
    pub load: bool,
    /// Server processes to measure; `None` finds them from the endpoints.
    pub server_pids: Option<Vec<u32>>,
    pub seed: u64,
    /// lmskv: whether the client bundles concurrent requests to one node.
    pub bundle: bool,
}

impl RunConfig {
    /// Bytes per record value for this workload.
    pub fn value_bytes(&self) -> usize {
        if self.workload.uses_value_size() {
            self.value_size
        } else {
            self.field_count * self.field_length
        }
    }

    /// Checks every bound, naming the bad setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            bail!("--endpoints must name at least one server");
        }
        if self.threads == 0 || self.threads > THREADS_MAX {
            bail!("--threads must be between 1 and {THREADS_MAX}");
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX {
            bail!("--duration must be positive and at most 24h");
        }
        if self.warmup > DURATION_MAX {
            bail!("--warmup must be at most 24h");
        }
        if self.records == 0 || self.records > RECORDS_MAX {
            bail!("--records must be between 1 and {RECORDS_MAX}");
        }
        let v = self.value_bytes();
        if v == 0 || v > VALUE_BYTES_MAX {
            bail!("values must be 1 to {VALUE_BYTES_MAX} bytes (got {v})");
        }
        Ok(())
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Writes records `0..records` with [`LOAD_CLIENTS`] concurrent writers.
async fn load(target: &Target, records: u64, values: &ValuePool) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..LOAD_CLIENTS.min(records as usize) {
        let (mut t, next, values) = (target.clone(), next.clone(), values.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(i as u64);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= records {
                    return Ok::<(), anyhow::Error>(());
                }
                t.write(ycsb::record_key(n), values.value(&mut rng))
                    .await
                    .with_context(|| format!("loading record {n}"))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Counters shared by the clients of a run.
#[derive(Debug, Default)]
struct Shared {
    /// Records known to exist: loaded plus acknowledged inserts.
    existing: AtomicU64,
    /// Number of the next record to insert.
    next_insert: AtomicU64,
    ops_ok: AtomicU64,
    failed: AtomicU64,
    not_found: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Window {
    measure_from: Instant,
    end: Instant,
}

async fn run_op(
    t: &mut Target,
    op: Op,
    values: &ValuePool,
    rng: &mut StdRng,
    consistency: Consistency,
    shared: &Shared,
) -> anyhow::Result<bool> {
    match op {
        Op::Read(n) => t.read(ycsb::record_key(n), consistency).await,
        Op::Update(n) => t
            .write(ycsb::record_key(n), values.value(rng))
            .await
            .map(|()| true),
        Op::Insert(n) => {
            t.write(ycsb::record_key(n), values.value(rng)).await?;
            shared.existing.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        }
        Op::Scan { start, len } => {
            let got = t
                .scan(
                    ycsb::record_key(start),
                    ycsb::records_end_key(),
                    len as u32,
                    consistency,
                )
                .await?;
            Ok(got > 0)
        }
        Op::ReadModifyWrite(n) => {
            let key = ycsb::record_key(n);
            let found = t.read(key.clone(), consistency).await?;
            t.write(key, values.value(rng)).await?;
            Ok(found)
        }
    }
}

async fn client_loop(
    mut t: Target,
    cfg: Arc<RunConfig>,
    values: ValuePool,
    shared: Arc<Shared>,
    window: Arc<Window>,
    seed: u64,
) -> Histogram<u64> {
    let mut hist = histogram();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chooser = OpChooser::new(cfg.workload, cfg.records);
    loop {
        let started = Instant::now();
        if started >= window.end {
            return hist;
        }
        let existing = shared.existing.load(Ordering::Relaxed);
        let op = chooser.next(&mut rng, existing, || {
            shared.next_insert.fetch_add(1, Ordering::Relaxed)
        });
        let res = run_op(&mut t, op, &values, &mut rng, cfg.consistency, &shared).await;
        let done = Instant::now();
        if started < window.measure_from || done > window.end {
            continue;
        }
        match res {
            Ok(found) => {
                let us = done.duration_since(started).as_micros() as u64;
                hist.saturating_record(us.clamp(1, LATENCY_US_MAX));
                shared.ops_ok.fetch_add(1, Ordering::Relaxed);
                if !found {
                    shared.not_found.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = shared.first_error.lock().expect("error lock");
                if first.is_none() {
                    *first = Some(format!("{e:#}"));
                }
            }
        }
    }
}

fn progress_bar(cfg: &RunConfig) -> ProgressBar {
    let total = (cfg.warmup + cfg.duration).as_millis() as u64;
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>4} / {msg}")
        .map(|s| s.progress_chars("=> "))
    {
        bar.set_style(style);
    }
    bar.set_prefix(format!(
        "{} {} x{}",
        cfg.target.name(),
        cfg.workload.name(),
        cfg.threads
    ));
    bar
}

/// Runs the load phase (if asked), the warm-up and the measured window.
pub async fn run(cfg: RunConfig) -> anyhow::Result<RunReport> {
    cfg.validate()?;
    let target = Target::connect(cfg.target, &cfg.endpoints, cfg.bundle).await?;
    let values = ValuePool::new(cfg.value_bytes(), cfg.seed);

    let mut load_s = 0.0;
    if cfg.load && cfg.workload.needs_load() {
        let t = Instant::now();
        load(&target, cfg.records, &values).await?;
        load_s = t.elapsed().as_secs_f64();
    }

    let pids = match &cfg.server_pids {
        Some(p) => p.clone(),
        None => crate::cpu::find_server_pids(cfg.target.server_program(), &cfg.endpoints),
    };
    if pids.is_empty() {
        eprintln!(
            "lmskv-bench: no {} process listens on {}; server CPU is not measured (pass --server-pids)",
            cfg.target.server_program(),
            cfg.endpoints.join(",")
        );
    }

    let shared = Arc::new(Shared {
        existing: AtomicU64::new(cfg.records),
        next_insert: AtomicU64::new(cfg.records),
        ..Shared::default()
    });
    let start = Instant::now();
    let window = Arc::new(Window {
        measure_from: start + cfg.warmup,
        end: start + cfg.warmup + cfg.duration,
    });
    let cfg = Arc::new(cfg);
    let mut tasks = Vec::with_capacity(cfg.threads);
    for i in 0..cfg.threads {
        tasks.push(tokio::spawn(client_loop(
            target.clone(),
            cfg.clone(),
            values.clone(),
            shared.clone(),
            window.clone(),
            cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + 1),
        )));
    }

    let bar = progress_bar(&cfg);
    let mut cpu_start = None;
    let cpu_end;
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= window.measure_from {
            cpu_start = Some(crate::cpu::total_cpu_us(&pids));
        }
        if now >= window.end {
            cpu_end = Some(crate::cpu::total_cpu_us(&pids));
            break;
        }
        bar.set_position(now.duration_since(start).as_millis() as u64);
        if now < window.measure_from {
            bar.set_message("warm-up");
        } else {
            bar.set_message(format!("{} ops", shared.ops_ok.load(Ordering::Relaxed)));
        }
        let next = if cpu_start.is_none() {
            window.measure_from.min(now + Duration::from_millis(200))
        } else {
            window.end.min(now + Duration::from_millis(200))
        };
        tokio::time::sleep_until(next.into()).await;
    }
    bar.finish_and_clear();

    let mut hist = histogram();
    for t in tasks {
        hist.add(t.await.context("client task")?)
            .expect("histograms share bounds");
    }
    let ops_ok = shared.ops_ok.load(Ordering::Relaxed);
    let server_cpu_us = match (cpu_start, cpu_end) {
        (Some(Ok(a)), Some(Ok(b))) if !pids.is_empty() => Some(b.saturating_sub(a)),
        (Some(Err(e)), _) | (_, Some(Err(e))) => {
            eprintln!("lmskv-bench: server CPU not measured: {e:#}");
            None
        }
        _ => None,
    };
    let duration_s = cfg.duration.as_secs_f64();
    let first_error = shared.first_error.lock().expect("error lock").clone();
    Ok(RunReport {
        target: cfg.target.name().into(),
        workload: cfg.workload.name().into(),
        consistency: cfg.consistency.name(),
        threads: cfg.threads,
        records: cfg.records,
        value_bytes: cfg.value_bytes(),
        load_s,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s,
        ops_ok,
        ops_failed: shared.failed.load(Ordering::Relaxed),
        reads_not_found: shared.not_found.load(Ordering::Relaxed),
        first_error,
        throughput_ops_s: ops_ok as f64 / duration_s,
        latency_us: Latencies {
            p50: hist.value_at_quantile(0.5),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: hist.mean(),
        },
        server_pids: pids,
        server_cpu_us,
        server_cpu_us_per_op: server_cpu_us
            .filter(|_| ops_ok > 0)
            .map(|c| c as f64 / ops_ok as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        RunConfig {
            target: TargetKind::Lmskv,
            endpoints: vec!["127.0.0.1:7001".into()],
            workload: WorkloadKind::A,
            records: 1000,
            threads: 4,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            value_size: 256,
            field_count: 10,
            field_length: 100,
            consistency: Consistency::Strong,
            load: true,
            server_pids: None,
            seed: 1,
            bundle: true,
        }
    }

    #[test]
    fn bad_settings_are_refused_with_the_setting_named() {
        assert!(cfg().validate().is_ok());
        let bad = [
            RunConfig {
                threads: 0,
                ..cfg()
            },
            RunConfig {
                threads: THREADS_MAX + 1,
                ..cfg()
            },
            RunConfig {
                duration: Duration::ZERO,
                ..cfg()
            },
            RunConfig {
                records: 0,
                ..cfg()
            },
            RunConfig {
                endpoints: vec![],
                ..cfg()
            },
            RunConfig {
                field_length: 0,
                ..cfg()
            },
            RunConfig {
                workload: WorkloadKind::Put,
                value_size: VALUE_BYTES_MAX + 1,
                ..cfg()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert_eq!(cfg().value_bytes(), 1000);
        assert_eq!(
            RunConfig {
                workload: WorkloadKind::Get,
                ..cfg()
            }
            .value_bytes(),
            256
        );
    }

    #[test]
    fn consistency_levels_parse() {
        assert_eq!(Consistency::parse("strong"), Ok(Consistency::Strong));
        assert_eq!(
            Consistency::parse("bounded:500ms"),
            Ok(Consistency::Bounded(Duration::from_millis(500)))
        );
        assert_eq!(Consistency::parse("session"), Ok(Consistency::Session));
        assert!(Consistency::parse("linearizable").is_err());
        assert_eq!(
            Consistency::parse(&Consistency::Bounded(Duration::from_millis(500)).name()),
            Ok(Consistency::Bounded(Duration::from_millis(500)))
        );
    }
}
