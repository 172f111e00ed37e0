//! The LMS API: the application that runs on lmskv.
//!
//! A REST API under `/api/v1` for users, courses, enrollments, assignments,
//! submissions, grades and background jobs, on [`lmskv_client`]. It is also
//! the system's gateway: authentication (argon2id, JWT with refresh),
//! role-based and object-level authorization, per-IP, per-user and
//! per-account login rate limits, validation, request logging, RFC 9457 errors and an OpenAPI 3
//! document (`/openapi.json`, Swagger UI at `/docs`).
//!
//! # Data layout and consistency
//!
//! The key schema is in [`keys`]. Records that must change together share a
//! course's prefix and change in one atomic batch or compare-and-swap; the
//! indexes that span tables are written after their source and repaired by
//! [`repair`]. Each read picks its consistency level:
//!
//! | read | level | why |
//! |------|-------|-----|
//! | login (e-mail index, user), refresh tokens | STRONG | a new account or password must work at once; a used token never again |
//! | the caller's account on every request | STRONG | the role decides access; a revoked role must stop working |
//! | course membership for access checks | STRONG | an enrollment or removal takes effect at once |
//! | seat counter, submissions, grades, grade notices, gradebook, jobs | STRONG | they are the conditions of CAS writes, or what grades are decided from |
//! | course page `GET /courses/{id}` | EVENTUAL (cached) | most read, rarely written; `Cache-Control: no-cache` → STRONG |
//! | catalogue `GET /courses` | EVENTUAL | public listing; may lag a moment; `no-cache` → STRONG |
//! | own profile, own course list, notifications | SESSION with `x-session-token`, else CONSISTENT_PREFIX | read-your-writes where the caller has written |
//! | admin user list | CONSISTENT_PREFIX | an overview; `no-cache` → STRONG |
//!
//! # Roles and sessions
//!
//! A user's global role (admin, teacher, student) decides who may create
//! courses and who administers the service. What a user may do inside a
//! course is their membership in it (teacher, TA, student), as in other
//! LMSs: changing the global role does not change existing memberships; an
//! admin removes a member from a course through its enrollments. A password
//! change ends every session of the account (access and refresh tokens carry
//! the account's session generation, which the change raises). Login
//! attempts are limited per account apart from the account's requests:
//! someone guessing its password can hold its logins at 429, not its
//! sessions' requests.
//!
//! A session token is the lmskv log index a write returned (header
//! `x-session-token`); it is valid for reads of the same resource (same
//! range), which is how the API uses it. A SESSION read waits at most
//! [`db::SESSION_WAIT_MAX`] for a replica to reach the token and is then
//! read STRONG, so read-your-writes holds either way; a token naming a
//! position the range's leader has not reached (forged, or from another
//! cluster) is refused with 400, as is a header that is not a token.
//!
//! # Retention
//!
//! Expired refresh tokens, finished jobs with their exports, and
//! notifications are deleted by a bounded background sweep
//! ([`retention`]) once past their retention period.

pub mod access;
pub mod accounts;
pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod keys;
pub mod model;
pub mod pagination;
pub mod ratelimit;
pub mod repair;
pub mod retention;
pub mod routes;
pub mod seed;
pub mod validate;

use std::net::SocketAddr;

pub use app::{router, AppState};
pub use config::Config;

/// Starts the background tasks this configuration asks for (job worker,
/// index repair, retention sweep).
pub fn spawn_background(st: &AppState) {
    if st.cfg.worker {
        tokio::spawn(jobs::worker::run(st.clone()));
    }
    if let Some(every) = st.cfg.repair_interval {
        tokio::spawn(repair::run(st.clone(), every));
    }
    if st.cfg.retention.interval.is_some() {
        tokio::spawn(retention::run(st.clone(), st.cfg.retention.clone()));
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    st: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(st);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
