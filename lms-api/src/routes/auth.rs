//! `/api/v1/auth`: register, login, refresh, logout, me.
//!
//! Access tokens are short-lived JWTs; refresh tokens are random, stored by
//! hash, and rotated on every use (a used one never works again). Both carry
//! the account's session generation, which a password change raises: every
//! token issued before the change stops working at once.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use lmskv_client::ReadConsistency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::accounts;
use crate::app::AppState;
use crate::auth::token::{new_refresh_token, refresh_token_hash};
use crate::auth::Caller;
use crate::db::Cas;
use crate::error::{AppError, AppResult, Problem};
use crate::extract::AppJson;
use crate::keys;
use crate::model::{RefreshToken, Role, User, UserView};

/// Longest refresh token accepted, in characters.
pub const REFRESH_TOKEN_CHARS_MAX: usize = 128;

/// `POST /auth/register` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[validate(email(message = "must be an e-mail address"), length(max = 254))]
    pub email: String,
    #[schema(min_length = 8, max_length = 128)]
    #[validate(custom(function = "crate::validate::password"))]
    pub password: String,
    #[schema(min_length = 1, max_length = 100)]
    #[validate(custom(function = "crate::validate::name"))]
    pub name: String,
}

/// `POST /auth/login` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(min_length = 1, max_length = 254)]
    #[validate(length(min = 1, max = 254))]
    pub email: String,
    #[schema(min_length = 1, max_length = 128)]
    #[validate(length(min = 1, max = 128))]
    pub password: String,
}

/// `POST /auth/refresh` and `/auth/logout` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    #[schema(min_length = 1, max_length = 128)]
    #[validate(length(min = 1, max = 128))]
    pub refresh_token: String,
}

/// Tokens returned by login and refresh.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

async fn issue_tokens(st: &AppState, user: &User) -> AppResult<TokenResponse> {
    let access_token = st.tokens.issue(user.id, user.session_generation)?;
    let refresh_token = new_refresh_token();
    let ttl = chrono::Duration::from_std(st.cfg.refresh_token_ttl)
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let rec = RefreshToken {
        user_id: user.id,
        expires_at: Utc::now() + ttl,
        session_generation: user.session_generation,
    };
    st.db
        .put(keys::refresh(&refresh_token_hash(&refresh_token)), &rec)
        .await?;
    Ok(TokenResponse {
        access_token,
        refresh_token,
        token_type: "Bearer".into(),
        expires_in: st.tokens.ttl().as_secs(),
    })
}

/// Creates an account. New accounts are students; admins grant other roles.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = UserView), (status = 409, body = Problem),
              (status = 422, body = Problem), (status = 400, body = Problem)))]
pub async fn register(
    State(st): State<AppState>,
    AppJson(req): AppJson<RegisterRequest>,
) -> AppResult<impl IntoResponse> {
    let user =
        accounts::create_user(&st, &req.email, req.password, &req.name, Role::Student).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/users/{}", user.id))],
        Json(UserView::from(&user)),
    ))
}

/// Exchanges e-mail and password for tokens.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = Problem),
              (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn login(
    State(st): State<AppState>,
    AppJson(req): AppJson<LoginRequest>,
) -> AppResult<Json<TokenResponse>> {
    let user = accounts::user_by_email(&st, &req.email).await?;
    if let Some(u) = &user {
        // Guessing one account's password is limited per account, apart
        // from its requests (its sessions keep working meanwhile).
        st.limits.check_login(u.id)?;
    }
    let ok = st
        .passwords
        .verify(req.password, user.as_ref().map(|u| u.password_hash.clone()))
        .await?;
    match user {
        Some(u) if ok => Ok(Json(issue_tokens(&st, &u).await?)),
        _ => Err(AppError::Unauthorized("invalid e-mail or password".into())),
    }
}

/// Exchanges a refresh token for new tokens; the old refresh token is used up.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = Problem),
              (status = 422, body = Problem)))]
pub async fn refresh(
    State(st): State<AppState>,
    AppJson(req): AppJson<RefreshRequest>,
) -> AppResult<Json<TokenResponse>> {
    let key = keys::refresh(&refresh_token_hash(&req.refresh_token));
    let invalid = || AppError::Unauthorized("unknown, used or expired refresh token".into());
    // STRONG: a token used a moment ago (or revoked by logout) must not work again.
    let rec = st
        .db
        .get::<RefreshToken>(key.clone(), ReadConsistency::Strong)
        .await?
        .ok_or_else(invalid)?;
    // Consuming the token is a CAS on the version just read: of two refreshes
    // racing with one token, exactly one wins.
    if let Cas::Conflict = st.db.cas::<RefreshToken>(key, rec.version, None).await? {
        return Err(invalid());
    }
    if rec.value.expires_at < Utc::now() {
        return Err(invalid());
    }
    let user = st
        .db
        .get::<User>(keys::user(rec.value.user_id), ReadConsistency::Strong)
        .await?
        .ok_or_else(invalid)?;
    // A password change since the token was issued ended its session.
    if user.value.session_generation != rec.value.session_generation {
        return Err(invalid());
    }
    Ok(Json(issue_tokens(&st, &user.value).await?))
}

/// Revokes a refresh token of the caller. The access token stays valid
/// until it expires (it is short-lived).
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", request_body = RefreshRequest,
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem), (status = 422, body = Problem)))]
pub async fn logout(
    State(st): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<RefreshRequest>,
) -> AppResult<StatusCode> {
    let key = keys::refresh(&refresh_token_hash(&req.refresh_token));
    if let Some(rec) = st
        .db
        .get::<RefreshToken>(key.clone(), ReadConsistency::Strong)
        .await?
    {
        // Someone else's token is left alone, and the answer does not tell.
        if rec.value.user_id == caller.id() {
            st.db.cas::<RefreshToken>(key, rec.version, None).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem)))]
pub async fn me(caller: Caller) -> Json<UserView> {
    Json(UserView::from(&caller.user))
}
