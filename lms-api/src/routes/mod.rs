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

use crate::error::{AppError, AppResult};

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
/// range, e.g. `12:345`), or, with no token (or an empty one),
/// CONSISTENT_PREFIX (the caller has no write to wait for). A token that is
/// not one is refused with 400 rather than silently ignored: the caller
/// asked to see a write. A well-formed token waits at most
/// [`crate::db::SESSION_WAIT_MAX`] for a replica, and one naming a position
/// the database has not reached is refused with 400 too ([`crate::db::Db::get`]).
pub fn session_or_prefix(headers: &HeaderMap) -> AppResult<ReadConsistency> {
    let Some(v) = headers.get(SESSION_TOKEN) else {
        return Ok(ReadConsistency::ConsistentPrefix);
    };
    let bad = |why: String| AppError::BadRequest(format!("bad {SESSION_TOKEN} header: {why}"));
    let text = v
        .to_str()
        .map_err(|_| bad("it is not ASCII".into()))?
        .trim();
    if text.is_empty() {
        return Ok(ReadConsistency::ConsistentPrefix);
    }
    let token = text
        .parse::<SessionToken>()
        .map_err(|e| bad(e.to_string()))?;
    Ok(if token.is_empty() {
        ReadConsistency::ConsistentPrefix
    } else {
        ReadConsistency::Session(token)
    })
}

/// A header map with the session token of a write.
pub fn session_headers(token: &SessionToken) -> [(axum::http::HeaderName, HeaderValue); 1] {
    [(
        axum::http::HeaderName::from_static(SESSION_TOKEN),
        HeaderValue::from_str(&token.to_string()).expect("a session token is ASCII"),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SESSION_TOKEN, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn session_tokens_are_used_and_malformed_ones_refused() {
        assert_eq!(
            session_or_prefix(&HeaderMap::new()).unwrap(),
            ReadConsistency::ConsistentPrefix
        );
        assert_eq!(
            session_or_prefix(&with_token(" ")).unwrap(),
            ReadConsistency::ConsistentPrefix
        );
        assert_eq!(
            session_or_prefix(&with_token("7:42")).unwrap(),
            ReadConsistency::Session("7:42".parse().unwrap())
        );
        for bad in ["7", "x:1", "7:42,nope", "0:5"] {
            let e = session_or_prefix(&with_token(bad)).unwrap_err();
            assert!(matches!(e, AppError::BadRequest(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains(SESSION_TOKEN), "{e}");
        }
    }
}
