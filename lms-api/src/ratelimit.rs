//! Rate limits per client IP (every request), per signed-in user (every
//! authenticated request) and per account for login attempts (apart from
//! its requests: failed logins by someone else must not lock the account's
//! sessions out), with `governor`'s GCRA limiters. A refused request
//! gets 429 with `Retry-After`. The key maps are bounded by
//! [`RATE_LIMIT_KEYS_MAX`]: beyond it, keys whose limit has fully recovered
//! are evicted.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::app::AppState;
use crate::config::{Config, RATE_LIMIT_KEYS_MAX};
use crate::error::{AppError, AppResult};

/// The per-IP, per-user and per-account login limiters.
pub struct RateLimits {
    ip: DefaultKeyedRateLimiter<IpAddr>,
    user: DefaultKeyedRateLimiter<u64>,
    login: DefaultKeyedRateLimiter<u64>,
    clock: DefaultClock,
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).expect("non-zero")
}

fn quota(per_s: u32, burst: u32) -> Quota {
    Quota::per_second(nz(per_s)).allow_burst(nz(burst))
}

impl RateLimits {
    /// Limiters with the configured quotas.
    pub fn new(cfg: &Config) -> RateLimits {
        RateLimits {
            ip: RateLimiter::keyed(quota(cfg.rate_limit_ip_per_s, cfg.rate_limit_ip_burst)),
            user: RateLimiter::keyed(quota(cfg.rate_limit_user_per_s, cfg.rate_limit_user_burst)),
            login: RateLimiter::keyed(
                Quota::per_minute(nz(cfg.login_attempts_per_min))
                    .allow_burst(nz(cfg.login_attempts_burst)),
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request from `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> AppResult<()> {
        self.check(&self.ip, ip)
    }

    /// Counts one request by user `uid`.
    pub fn check_user(&self, uid: u64) -> AppResult<()> {
        self.check(&self.user, uid)
    }

    /// Counts one login attempt for account `uid`.
    pub fn check_login(&self, uid: u64) -> AppResult<()> {
        self.check(&self.login, uid)
    }

    fn check<K>(&self, limiter: &DefaultKeyedRateLimiter<K>, key: K) -> AppResult<()>
    where
        K: std::hash::Hash + Eq + Clone,
    {
        if limiter.len() > RATE_LIMIT_KEYS_MAX {
            limiter.retain_recent();
        }
        limiter
            .check_key(&key)
            .map_err(|nu| AppError::TooManyRequests {
                retry_after: nu.wait_time_from(self.clock.now()),
            })
    }
}

/// Middleware: the per-IP limit. Health probes are exempt so that a busy
/// service is not reported dead.
pub async fn per_ip(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != "/healthz" && path != "/readyz" {
        if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
            if let Err(e) = state.limits.check_ip(addr.ip()) {
                return e.into_response();
            }
        }
    }
    next.run(req).await
}
