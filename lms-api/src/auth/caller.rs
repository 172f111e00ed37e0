//! [`Caller`]: the signed-in user of a request, from its bearer token.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use lmskv_client::ReadConsistency;

use crate::app::AppState;
use crate::error::AppError;
use crate::keys;
use crate::model::{Role, User};

/// The user a request acts for. Extracting it checks the bearer token, the
/// per-user rate limit, that the account still exists, and that the token
/// belongs to the account's current sessions (not ended by a password change).
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
}

impl Caller {
    /// The caller's user id.
    pub fn id(&self) -> u64 {
        self.user.id
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }

    /// Fails with 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], action: &str) -> Result<(), AppError> {
        if roles.contains(&self.user.role) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!("your role may not {action}")))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| AppError::Unauthorized("missing bearer token".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                AppError::Unauthorized("expected `Authorization: Bearer <token>`".into())
            })?;
        let (uid, sgen) = state.tokens.verify(token.trim())?;
        state.limits.check_user(uid)?;
        // STRONG: the account and its role decide what the request may do, so a
        // role an admin just revoked must not keep working from a stale replica.
        let user = state
            .db
            .get::<User>(keys::user(uid), ReadConsistency::Strong)
            .await?
            .ok_or_else(|| AppError::Unauthorized("the account no longer exists".into()))?;
        if user.value.session_generation != sgen {
            return Err(AppError::Unauthorized(
                "the session has ended (the password was changed); sign in again".into(),
            ));
        }
        Ok(Caller { user: user.value })
    }
}
