//! Load driver for the LMS API: requests/s and latency percentiles of one
//! scenario at a fixed number of concurrent clients, and the job queue's
//! throughput.
//!
//! ```text
//! cargo run -p lms-api --release --example load -- --url http://127.0.0.1:8080 \
//!     --scenario login|course-cached|course-uncached|grade --clients 64 --seconds 20
//! cargo run -p lms-api --release --example load -- --scenario jobs \
//!     --lmskv-endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --jobs 2000
//! ```
//!
//! The job scenario enqueues gradebook exports (of an empty course: three
//! scans, one result write) and drains them with `--workers` workers in
//! this process, each leasing up to 4 jobs at once; every job takes the
//! whole path: enqueue, lease, run, ack. `drained_per_s` counts every worker
//! on the cluster (including those of running `lms-api` processes); start it
//! on an empty queue.
//!
//! The HTTP scenarios expect the demo data (`lms-api --seed-demo true`) and
//! rate limits that do not refuse the load: 64 clients come from one IP, and
//! the login scenario logs the 4 demo students in over and over, which the
//! per-account login limit (against password guessing) would refuse. Raise
//! them for the run, e.g. `LMS_RATE_LIMIT_IP_PER_S=1000000
//! LMS_RATE_LIMIT_IP_BURST=1000000 LMS_RATE_LIMIT_USER_PER_S=1000000
//! LMS_RATE_LIMIT_USER_BURST=1000000 LMS_LOGIN_ATTEMPTS_PER_MIN=100000000
//! LMS_LOGIN_ATTEMPTS_BURST=1000000` in the API's environment. Refused
//! requests are counted apart (`rate_limited`) and are not in the figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "course-cached")]
    scenario: String,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, value_delimiter = ',')]
    lmskv_endpoints: Vec<String>,
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
}

const DEMO_PASSWORD: &str = "demo-password";

async fn login(
    http: &reqwest::Client,
    url: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let r: Value = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(r["access_token"].as_str().unwrap_or_default().to_string())
}

/// One request of a scenario, for client number `i`; returns its status
/// (0 when no answer came).
type Step =
    Arc<dyn Fn(reqwest::Client, usize) -> futures::future::BoxFuture<'static, u16> + Send + Sync>;

/// The status of a sent request, 0 when it failed on the way.
fn status(r: reqwest::Result<reqwest::Response>) -> u16 {
    r.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn setup(args: &Args, http: &reqwest::Client) -> anyhow::Result<Step> {
    let url = args.url.clone();
    match args.scenario.as_str() {
        "login" => Ok(Arc::new(move |http, i| {
            let url = url.clone();
            Box::pin(async move {
                let email = format!("student{}@lms.local", i % 4 + 1);
                status(
                    http.post(format!("{url}/api/v1/auth/login"))
                        .json(&json!({"email": email, "password": DEMO_PASSWORD}))
                        .send()
                        .await,
                )
            })
        })),
        "course-cached" | "course-uncached" => {
            let token = login(http, &url, "student1@lms.local", DEMO_PASSWORD).await?;
            let fresh = args.scenario == "course-uncached";
            Ok(Arc::new(move |http, _| {
                let (url, token) = (url.clone(), token.clone());
                Box::pin(async move {
                    let mut req = http
                        .get(format!("{url}/api/v1/courses/1"))
                        .bearer_auth(&token);
                    if fresh {
                        req = req.header("cache-control", "no-cache");
                    }
                    status(req.send().await)
                })
            }))
        }
        "grade" => {
            // One course, one assignment, one submission per client.
            let teacher = login(http, &url, "turing@lms.local", DEMO_PASSWORD).await?;
            let course: Value = http
                .post(format!("{url}/api/v1/courses"))
                .bearer_auth(&teacher)
                .json(&json!({"title": "Load test", "capacity": 10000, "published": true}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let cid = course["id"].as_u64().unwrap_or_default();
            let a: Value = http
                .post(format!("{url}/api/v1/courses/{cid}/assignments"))
                .bearer_auth(&teacher)
                .json(&json!({"title": "Load", "max_points": 100}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let aid = a["id"].as_u64().unwrap_or_default();
            let stamp = std::process::id();
            let mut students = Vec::new();
            for i in 0..args.clients {
                let email = format!("load{stamp}-{i}@lms.local");
                let u: Value = http
                    .post(format!("{url}/api/v1/auth/register"))
                    .json(&json!({"email": email, "password": DEMO_PASSWORD, "name": "Load"}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let tok = login(http, &url, &email, DEMO_PASSWORD).await?;
                http.post(format!("{url}/api/v1/courses/{cid}/enrollments"))
                    .bearer_auth(&tok)
                    .json(&json!({}))
                    .send()
                    .await?
                    .error_for_status()?;
                http.post(format!(
                    "{url}/api/v1/courses/{cid}/assignments/{aid}/submissions"
                ))
                .bearer_auth(&tok)
                .json(&json!({"body": "answer"}))
                .send()
                .await?
                .error_for_status()?;
                students.push(u["id"].as_u64().unwrap_or_default());
            }
            let students = Arc::new(students);
            Ok(Arc::new(move |http, i| {
                let (url, teacher, students) = (url.clone(), teacher.clone(), students.clone());
                Box::pin(async move {
                    let sid = students[i % students.len()];
                    status(
                        http.put(format!(
                            "{url}/api/v1/courses/{cid}/assignments/{aid}/submissions/{sid}/grade"
                        ))
                        .bearer_auth(&teacher)
                        .json(&json!({"score": (i % 100) as f64, "feedback": "ok"}))
                        .send()
                        .await,
                    )
                })
            }))
        }
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

async fn http_scenario(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let step = setup(&args, &http).await?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks = (0..args.clients).map(|i| {
        let (http, step) = (http.clone(), step.clone());
        tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let (mut errors, mut limited) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match step(http.clone(), i).await {
                    200..=299 => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    429 => limited += 1,
                    _ => errors += 1,
                }
            }
            (h, errors, limited)
        })
    });
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut errors, mut limited) = (0, 0);
    for t in futures::future::join_all(tasks).await {
        let (h, e, l) = t?;
        all.add(&h)?;
        errors += e;
        limited += l;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"scenario\":\"{}\",\"clients\":{},\"seconds\":{:.1},\"ok\":{},\"errors\":{},\"rate_limited\":{},\"rps\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2}}}",
        args.scenario,
        args.clients,
        secs,
        all.len(),
        errors,
        limited,
        all.len() as f64 / secs,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.value_at_quantile(0.999) as f64 / 1000.0,
    );
    Ok(())
}

async fn jobs_scenario(args: Args) -> anyhow::Result<()> {
    use futures::StreamExt;
    use lms_api::jobs::{self, JobKind};
    let mut cfg = lms_api::Config::new(args.lmskv_endpoints.clone(), "x".repeat(32));
    cfg.worker = false;
    let st = Arc::new(lms_api::AppState::new(cfg)?);
    // A course id no one uses: its export is an empty gradebook (a header
    // line), so each run reads three empty prefixes and writes one result.
    let course_id = u64::MAX - u64::from(std::process::id());
    let t = Instant::now();
    let enqueue = (0..args.jobs).map(|_| {
        let st = st.clone();
        async move { jobs::enqueue_in(&st.db, JobKind::GradebookExport { course_id }, 0).await }
    });
    let mut pending = futures::stream::iter(enqueue).buffer_unordered(64);
    let mut ids = Vec::with_capacity(args.jobs);
    while let Some(r) = pending.next().await {
        ids.push(r.map_err(|e| anyhow::anyhow!("{e}"))?.id);
    }
    let enq_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let workers = (0..args.workers).map(|_| {
        let st = st.clone();
        tokio::spawn(async move {
            let mut ran = 0usize;
            // Until the live-job table is empty: every job acked or dead-lettered.
            loop {
                match jobs::worker::run_once(&st.db, &st.jobs).await {
                    Ok(0) => {
                        let live = st
                            .db
                            .scan_prefix::<serde_json::Value>(
                                &bytes::Bytes::from_static(lms_api::keys::JOB),
                                lmskv_client::ReadConsistency::Strong,
                            )
                            .await
                            .map(|v| v.len())
                            .unwrap_or(1);
                        if live == 0 {
                            break;
                        }
                    }
                    Ok(n) => ran += n,
                    Err(_) => {}
                }
            }
            ran
        })
    });
    let mut ran = 0usize;
    let mut worker_failures = 0usize;
    for r in futures::future::join_all(workers).await {
        match r {
            Ok(n) => ran += n,
            Err(e) => {
                // Its count is lost; the other workers drain what it left.
                eprintln!("a worker failed: {e}");
                worker_failures += 1;
            }
        }
    }
    let run_s = t.elapsed().as_secs_f64();
    // How this run's jobs ended.
    let (lo, hi) = (
        ids.iter().copied().min().unwrap_or(0),
        ids.iter().copied().max().unwrap_or(0),
    );
    let count = |table: &'static [u8]| {
        let st = st.clone();
        async move {
            let start = [table, &lo.to_be_bytes()[..]].concat();
            let end = [table, &(hi + 1).to_be_bytes()[..]].concat();
            let opts = lmskv_client::ScanOptions {
                start: start.into(),
                end: end.into(),
                limit: 1_000,
                keys_only: true,
                consistency: lmskv_client::ReadConsistency::Strong,
                ..Default::default()
            };
            st.db
                .client()
                .scan_all(&opts, 10_000_000)
                .await
                .map(|v| v.len())
                .unwrap_or(0)
        }
    };
    let acked = count(lms_api::keys::JOB_DONE).await;
    let dead = count(lms_api::keys::JOB_DEAD).await;
    println!(
        "{{\"scenario\":\"jobs\",\"jobs\":{},\"enqueue_per_s\":{:.0},\"workers\":{},\"processed\":{},\"processed_per_s\":{:.0},\"drained_per_s\":{:.0},\"acked\":{},\"dead\":{},\"worker_failures\":{}}}",
        args.jobs,
        args.jobs as f64 / enq_s,
        args.workers,
        ran,
        ran as f64 / run_s,
        args.jobs as f64 / run_s,
        acked,
        dead,
        worker_failures
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenario == "jobs" {
        jobs_scenario(args).await
    } else {
        http_scenario(args).await
    }
}
