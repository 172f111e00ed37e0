//! HTTP routes, one file per resource, all under `/api/v1` (health probes
//! at the root). Helpers shared by the handlers live here: the freshness a
//! request asks for, and session tokens for reading one's own writes.

pub mod admin;
pub mod assignments;
pub mod auth;
pub mod courses;
pub mod enrollments;
pub mod grades;
pub mod health;
pub mod jobs;
pub mod notifications;
pub mod submissions;
pub mod users;

use axum::http::{header, HeaderMap, HeaderValue};
use lmskv_client::{ReadConsistency, SessionToken};

/// Response header with the lmskv log index of the request's write. Sent
/// back on a later read of the *same* resource, it makes that read see the
/// write from any replica (SESSION consistency).
pub const SESSION_TOKEN: &str = "x-session-token";

/// Whether the request asked to bypass caches (`Cache-Control: no-cache`).
pub fn wants_fresh(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|d| matches!(d.trim(), "no-cache" | "no-store" | "max-age=0"))
        })
}

/// The consistency of a read that is normally cached: EVENTUAL (served from
/// this process's bounded read cache when possible) unless the request says
/// `Cache-Control: no-cache`, which makes it STRONG.
pub fn cached_or_fresh(headers: &HeaderMap) -> ReadConsistency {
    if wants_fresh(headers) {
        ReadConsistency::Strong
    } else {
        ReadConsistency::Eventual
    }
}

/// The consistency of a read of the caller's own data: SESSION at the token
/// the request carries (what the caller's last write of it returned, per
/// range, e.g. `12:345`), or, with no usable token, CONSISTENT_PREFIX (the
/// caller has no write to wait for).
pub fn session_or_prefix(headers: &HeaderMap) -> ReadConsistency {
    match headers
        .get(SESSION_TOKEN)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<SessionToken>().ok())
    {
        Some(token) if !token.is_empty() => ReadConsistency::Session(token),
        _ => ReadConsistency::ConsistentPrefix,
    }
}

/// A header map with the session token of a write.
pub fn session_headers(token: &SessionToken) -> [(axum::http::HeaderName, HeaderValue); 1] {
    [(
        axum::http::HeaderName::from_static(SESSION_TOKEN),
        HeaderValue::from_str(&token.to_string()).expect("a session token is ASCII"),
    )]
}
