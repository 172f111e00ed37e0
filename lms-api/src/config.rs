//! Configuration of the LMS API: command-line flags, `LMS_*` environment
//! variables and an optional TOML file, in that order of precedence, and the
//! named limits every part of the service obeys.
//!
//! Everything is validated once at start-up ([`Config::validate`]); a bad value
//! stops the process with a one-line error instead of surfacing later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::jobs::JobSettings;
use crate::retention::RetentionSettings;

/// Largest request body accepted, in bytes, unless configured otherwise:
/// room for a submission of the most characters a body may hold
/// ([`crate::validate::BODY_CHARS_MAX`]) at four UTF-8 bytes each, with
/// JSON escapes on top.
pub const BODY_BYTES_MAX_DEFAULT: usize = 512 * 1024;
/// `per_page` when a list request does not name one.
pub const PER_PAGE_DEFAULT: u32 = 10;
/// Largest `per_page` a list request may ask for.
pub const PER_PAGE_MAX: u32 = 100;
/// Fewest bytes a JWT signing secret may have (HS256 wants at least 256 bits).
pub const JWT_SECRET_BYTES_MIN: usize = 32;
/// Distinct rate-limit keys (IPs or users) kept before idle ones are evicted.
pub const RATE_LIMIT_KEYS_MAX: usize = 100_000;
/// Password hashes computed at once; each takes the argon2 memory cost (19 MiB).
pub const PASSWORD_HASHES_CONCURRENT_MAX: usize = 4;

/// Command-line flags; each has an `LMS_*` environment variable and a key of
/// the same name (with underscores) in the `--config` file.
#[derive(Debug, Parser, Default)]
#[command(name = "lms-api", version, about = "The LMS web API on lmskv")]
pub struct Args {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "LMS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// lmskv seed endpoints, comma-separated HOST:PORT list.
    #[arg(long, env = "LMS_LMSKV_ENDPOINTS", value_delimiter = ',')]
    pub lmskv_endpoints: Option<Vec<String>>,
    /// Secret that signs access tokens (at least 32 bytes).
    #[arg(long, env = "LMS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// TOML file with any of these settings.
    #[arg(long, env = "LMS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Lifetime of access tokens in seconds (default 900).
    #[arg(long, env = "LMS_ACCESS_TOKEN_TTL_S")]
    pub access_token_ttl_s: Option<u64>,
    /// Lifetime of refresh tokens in seconds (default 14 days).
    #[arg(long, env = "LMS_REFRESH_TOKEN_TTL_S")]
    pub refresh_token_ttl_s: Option<u64>,
    /// Requests per second allowed per client IP (default 200).
    #[arg(long, env = "LMS_RATE_LIMIT_IP_PER_S")]
    pub rate_limit_ip_per_s: Option<u32>,
    /// Burst allowed per client IP (default 400).
    #[arg(long, env = "LMS_RATE_LIMIT_IP_BURST")]
    pub rate_limit_ip_burst: Option<u32>,
    /// Requests per second allowed per signed-in user (default 50).
    #[arg(long, env = "LMS_RATE_LIMIT_USER_PER_S")]
    pub rate_limit_user_per_s: Option<u32>,
    /// Burst allowed per signed-in user (default 100).
    #[arg(long, env = "LMS_RATE_LIMIT_USER_BURST")]
    pub rate_limit_user_burst: Option<u32>,
    /// Login attempts per minute allowed per account, counted apart from
    /// its requests, so that failed logins cannot lock its sessions out
    /// (default 10).
    #[arg(long, env = "LMS_LOGIN_ATTEMPTS_PER_MIN")]
    pub login_attempts_per_min: Option<u32>,
    /// Burst of login attempts allowed per account (default 10).
    #[arg(long, env = "LMS_LOGIN_ATTEMPTS_BURST")]
    pub login_attempts_burst: Option<u32>,
    /// Per-request timeout in milliseconds (default 15000).
    #[arg(long, env = "LMS_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Deadline of one lmskv call including retries, in milliseconds (default 10000).
    #[arg(long, env = "LMS_LMSKV_DEADLINE_MS")]
    pub lmskv_deadline_ms: Option<u64>,
    /// Run the background job worker in this process (default true).
    #[arg(long, env = "LMS_WORKER")]
    pub worker: Option<bool>,
    /// How long a job lease lasts, in milliseconds; a task running longer is
    /// abandoned and its job leased again (default 30000).
    #[arg(long, env = "LMS_JOB_LEASE_MS")]
    pub job_lease_ms: Option<u64>,
    /// Backoff after a job's first failure, in milliseconds; doubles per
    /// attempt (default 500).
    #[arg(long, env = "LMS_JOB_BACKOFF_BASE_MS")]
    pub job_backoff_base_ms: Option<u64>,
    /// Longest backoff between a job's attempts, in milliseconds (default 60000).
    #[arg(long, env = "LMS_JOB_BACKOFF_MAX_MS")]
    pub job_backoff_max_ms: Option<u64>,
    /// Runs a job gets before it is dead-lettered (default 5).
    #[arg(long, env = "LMS_JOB_ATTEMPTS_MAX")]
    pub job_attempts_max: Option<u32>,
    /// Seconds between index repair passes; 0 turns the task off (default 300).
    #[arg(long, env = "LMS_REPAIR_INTERVAL_S")]
    pub repair_interval_s: Option<u64>,
    /// Seconds between retention sweeps, which delete expired refresh
    /// tokens and old finished jobs, exports and notifications; 0 turns
    /// the sweep off in this process (default 3600).
    #[arg(long, env = "LMS_RETENTION_INTERVAL_S")]
    pub retention_interval_s: Option<u64>,
    /// Seconds finished and dead-lettered jobs and their results (exports)
    /// are kept after they finish (default 7 days).
    #[arg(long, env = "LMS_JOB_RETENTION_S")]
    pub job_retention_s: Option<u64>,
    /// Seconds notifications are kept (default 90 days).
    #[arg(long, env = "LMS_NOTIFICATION_RETENTION_S")]
    pub notification_retention_s: Option<u64>,
    /// Log format: json or text (default json).
    #[arg(long, env = "LMS_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Create the demo accounts and courses at start-up (idempotent).
    #[arg(long, env = "LMS_SEED_DEMO")]
    pub seed_demo: Option<bool>,
}

/// The same settings as read from a TOML file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub lmskv_endpoints: Option<Vec<String>>,
    pub jwt_secret: Option<String>,
    pub access_token_ttl_s: Option<u64>,
    pub refresh_token_ttl_s: Option<u64>,
    pub rate_limit_ip_per_s: Option<u32>,
    pub rate_limit_ip_burst: Option<u32>,
    pub rate_limit_user_per_s: Option<u32>,
    pub rate_limit_user_burst: Option<u32>,
    pub login_attempts_per_min: Option<u32>,
    pub login_attempts_burst: Option<u32>,
    pub request_timeout_ms: Option<u64>,
    pub lmskv_deadline_ms: Option<u64>,
    pub worker: Option<bool>,
    pub job_lease_ms: Option<u64>,
    pub job_backoff_base_ms: Option<u64>,
    pub job_backoff_max_ms: Option<u64>,
    pub job_attempts_max: Option<u32>,
    pub repair_interval_s: Option<u64>,
    pub retention_interval_s: Option<u64>,
    pub job_retention_s: Option<u64>,
    pub notification_retention_s: Option<u64>,
    pub log_format: Option<String>,
    pub seed_demo: Option<bool>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The validated configuration of one `lms-api` process.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub lmskv_endpoints: Vec<String>,
    pub jwt_secret: String,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub rate_limit_ip_per_s: u32,
    pub rate_limit_ip_burst: u32,
    pub rate_limit_user_per_s: u32,
    pub rate_limit_user_burst: u32,
    pub login_attempts_per_min: u32,
    pub login_attempts_burst: u32,
    pub request_timeout: Duration,
    pub lmskv_deadline: Duration,
    pub body_bytes_max: usize,
    pub worker: bool,
    /// The job queue's lease, backoff and attempts.
    pub jobs: JobSettings,
    pub repair_interval: Option<Duration>,
    /// The retention sweep's interval and periods.
    pub retention: RetentionSettings,
    pub log_format: LogFormat,
    pub seed_demo: bool,
}

impl Config {
    /// A configuration with defaults for everything but the endpoints and secret.
    pub fn new(lmskv_endpoints: Vec<String>, jwt_secret: impl Into<String>) -> Config {
        Config {
            listen: "127.0.0.1:8080".parse().expect("default listen address"),
            lmskv_endpoints,
            jwt_secret: jwt_secret.into(),
            access_token_ttl: Duration::from_secs(900),
            refresh_token_ttl: Duration::from_secs(14 * 24 * 3600),
            rate_limit_ip_per_s: 200,
            rate_limit_ip_burst: 400,
            rate_limit_user_per_s: 50,
            rate_limit_user_burst: 100,
            login_attempts_per_min: 10,
            login_attempts_burst: 10,
            request_timeout: Duration::from_secs(15),
            lmskv_deadline: Duration::from_secs(10),
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            worker: true,
            jobs: JobSettings::default(),
            repair_interval: Some(Duration::from_secs(300)),
            retention: RetentionSettings::default(),
            log_format: LogFormat::Json,
            seed_demo: false,
        }
    }

    /// Merges flags (and their environment variables) over the file over defaults.
    pub fn load(args: Args) -> anyhow::Result<Config> {
        let file: FileConfig = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("bad config {}: {e}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let endpoints = args
            .lmskv_endpoints
            .or(file.lmskv_endpoints)
            .ok_or_else(|| anyhow::anyhow!("--lmskv-endpoints is required"))?;
        let secret = args
            .jwt_secret
            .or(file.jwt_secret)
            .ok_or_else(|| anyhow::anyhow!("--jwt-secret is required"))?;
        let mut c = Config::new(endpoints, secret);
        if let Some(v) = args.listen.or(file.listen) {
            c.listen = v;
        }
        if let Some(v) = args.access_token_ttl_s.or(file.access_token_ttl_s) {
            c.access_token_ttl = Duration::from_secs(v);
        }
        if let Some(v) = args.refresh_token_ttl_s.or(file.refresh_token_ttl_s) {
            c.refresh_token_ttl = Duration::from_secs(v);
        }
        if let Some(v) = args.rate_limit_ip_per_s.or(file.rate_limit_ip_per_s) {
            c.rate_limit_ip_per_s = v;
        }
        if let Some(v) = args.rate_limit_ip_burst.or(file.rate_limit_ip_burst) {
            c.rate_limit_ip_burst = v;
        }
        if let Some(v) = args.rate_limit_user_per_s.or(file.rate_limit_user_per_s) {
            c.rate_limit_user_per_s = v;
        }
        if let Some(v) = args.rate_limit_user_burst.or(file.rate_limit_user_burst) {
            c.rate_limit_user_burst = v;
        }
        if let Some(v) = args.login_attempts_per_min.or(file.login_attempts_per_min) {
            c.login_attempts_per_min = v;
        }
        if let Some(v) = args.login_attempts_burst.or(file.login_attempts_burst) {
            c.login_attempts_burst = v;
        }
        if let Some(v) = args.request_timeout_ms.or(file.request_timeout_ms) {
            c.request_timeout = Duration::from_millis(v);
        }
        if let Some(v) = args.lmskv_deadline_ms.or(file.lmskv_deadline_ms) {
            c.lmskv_deadline = Duration::from_millis(v);
        }
        if let Some(v) = args.worker.or(file.worker) {
            c.worker = v;
        }
        if let Some(v) = args.job_lease_ms.or(file.job_lease_ms) {
            c.jobs.lease = Duration::from_millis(v);
        }
        if let Some(v) = args.job_backoff_base_ms.or(file.job_backoff_base_ms) {
            c.jobs.backoff_base = Duration::from_millis(v);
        }
        if let Some(v) = args.job_backoff_max_ms.or(file.job_backoff_max_ms) {
            c.jobs.backoff_max = Duration::from_millis(v);
        }
        if let Some(v) = args.job_attempts_max.or(file.job_attempts_max) {
            c.jobs.attempts_max = v;
        }
        if let Some(v) = args.repair_interval_s.or(file.repair_interval_s) {
            c.repair_interval = (v > 0).then(|| Duration::from_secs(v));
        }
        if let Some(v) = args.retention_interval_s.or(file.retention_interval_s) {
            c.retention.interval = (v > 0).then(|| Duration::from_secs(v));
        }
        if let Some(v) = args.job_retention_s.or(file.job_retention_s) {
            c.retention.jobs = Duration::from_secs(v);
        }
        if let Some(v) = args
            .notification_retention_s
            .or(file.notification_retention_s)
        {
            c.retention.notifications = Duration::from_secs(v);
        }
        if let Some(v) = args.log_format.or(file.log_format) {
            c.log_format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                other => anyhow::bail!("--log-format must be json or text, not {other:?}"),
            };
        }
        if let Some(v) = args.seed_demo.or(file.seed_demo) {
            c.seed_demo = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every value against its limits.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.lmskv_endpoints.is_empty() || self.lmskv_endpoints.iter().any(|e| e.is_empty()) {
            anyhow::bail!("--lmskv-endpoints must list at least one HOST:PORT");
        }
        if self.jwt_secret.len() < JWT_SECRET_BYTES_MIN {
            anyhow::bail!("--jwt-secret must have at least {JWT_SECRET_BYTES_MIN} bytes");
        }
        if self.access_token_ttl.is_zero() || self.access_token_ttl > Duration::from_secs(86_400) {
            anyhow::bail!("--access-token-ttl-s must be between 1 and 86400");
        }
        if self.refresh_token_ttl < self.access_token_ttl {
            anyhow::bail!("--refresh-token-ttl-s must not be shorter than the access token TTL");
        }
        for (name, v) in [
            ("--rate-limit-ip-per-s", self.rate_limit_ip_per_s),
            ("--rate-limit-ip-burst", self.rate_limit_ip_burst),
            ("--rate-limit-user-per-s", self.rate_limit_user_per_s),
            ("--rate-limit-user-burst", self.rate_limit_user_burst),
            ("--login-attempts-per-min", self.login_attempts_per_min),
            ("--login-attempts-burst", self.login_attempts_burst),
        ] {
            if v == 0 {
                anyhow::bail!("{name} must be at least 1");
            }
        }
        if self.request_timeout < Duration::from_millis(100) {
            anyhow::bail!("--request-timeout-ms must be at least 100");
        }
        if self.lmskv_deadline < Duration::from_millis(100) {
            anyhow::bail!("--lmskv-deadline-ms must be at least 100");
        }
        let j = &self.jobs;
        if j.lease < Duration::from_millis(100) {
            anyhow::bail!("--job-lease-ms must be at least 100");
        }
        if j.backoff_base < Duration::from_millis(10) {
            anyhow::bail!("--job-backoff-base-ms must be at least 10");
        }
        if j.backoff_max < j.backoff_base {
            anyhow::bail!("--job-backoff-max-ms must not be below --job-backoff-base-ms");
        }
        if !(1..=100).contains(&j.attempts_max) {
            anyhow::bail!("--job-attempts-max must be between 1 and 100");
        }
        self.retention.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("lms-api-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lms.toml");
        std::fs::write(
            &path,
            "lmskv_endpoints = [\"10.0.0.1:7001\"]\njwt_secret = \"file-secret-file-secret-file-secret!\"\n\
             access_token_ttl_s = 60\nlisten = \"0.0.0.0:9000\"\n",
        )
        .unwrap();
        let args = Args {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            ..Args::default()
        };
        let c = Config::load(args).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.lmskv_endpoints, vec!["10.0.0.1:7001".to_string()]);
        assert_eq!(c.access_token_ttl, Duration::from_secs(60));
        assert_eq!(c.rate_limit_user_per_s, 50);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_are_refused() {
        let short = Config::new(vec!["a:1".into()], "too short");
        assert!(short.validate().is_err());
        let mut c = Config::new(vec!["a:1".into()], "x".repeat(32));
        assert!(c.validate().is_ok());
        c.rate_limit_ip_burst = 0;
        assert!(c.validate().is_err());
        let mut c = Config::new(vec!["a:1".into()], "x".repeat(32));
        c.jobs.backoff_max = Duration::from_millis(100);
        assert!(c.validate().unwrap_err().to_string().contains("backoff"));
        c.jobs.backoff_max = Duration::from_secs(1);
        c.jobs.attempts_max = 0;
        assert!(c.validate().unwrap_err().to_string().contains("attempts"));
        let missing = Args::default();
        assert!(Config::load(missing).is_err());
    }

    #[test]
    fn retention_periods_are_read_and_checked() {
        let args = |job: Option<u64>, notif: Option<u64>, every: Option<u64>| Args {
            lmskv_endpoints: Some(vec!["a:1".into()]),
            jwt_secret: Some("x".repeat(32)),
            job_retention_s: job,
            notification_retention_s: notif,
            retention_interval_s: every,
            ..Args::default()
        };
        let c = Config::load(args(None, None, None)).unwrap();
        assert_eq!(c.retention.jobs, Duration::from_secs(7 * 86_400));
        assert_eq!(c.retention.notifications, Duration::from_secs(90 * 86_400));
        assert_eq!(c.retention.interval, Some(Duration::from_secs(3600)));
        let c = Config::load(args(Some(86_400), Some(30 * 86_400), Some(0))).unwrap();
        assert_eq!(c.retention.jobs, Duration::from_secs(86_400));
        assert_eq!(c.retention.notifications, Duration::from_secs(30 * 86_400));
        assert_eq!(c.retention.interval, None, "0 turns the sweep off");
        let e = Config::load(args(Some(0), None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--job-retention-s"), "{e}");
        let e = Config::load(args(None, Some(u64::MAX), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--notification-retention-s"), "{e}");
        let e = Config::load(args(None, None, Some(10 * 86_400)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--retention-interval-s"), "{e}");
    }
}
