//! `/api/v1/users`: admins list and manage users; a user reads and edits
//! their own profile and lists their courses. Another user's profile is 404
//! to non-admins, so IDs cannot be probed.

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use lmskv_client::ReadConsistency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::app::AppState;
use crate::auth::Caller;
use crate::db::{Cas, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::keys;
use crate::model::{Course, CourseRole, Member, Role, User, UserCourse, UserView};
use crate::pagination::{PageQuery, Paged};
use crate::routes::{session_headers, session_or_prefix, wants_fresh};

/// `PATCH /users/{id}` body; every field is optional.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    #[schema(min_length = 1, max_length = 100)]
    #[validate(custom(function = "crate::validate::name"))]
    pub name: Option<String>,
    /// Admins only.
    pub role: Option<Role>,
    /// The caller's own new password; needs `current_password`. Changing
    /// it ends every session of the account (all access and refresh tokens,
    /// the caller's included): sign in again with the new password.
    #[schema(min_length = 8, max_length = 128)]
    #[validate(custom(function = "crate::validate::password"))]
    pub password: Option<String>,
    #[validate(length(min = 1, max = 128))]
    pub current_password: Option<String>,
}

/// One of a user's courses.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MyCourse {
    pub course: Course,
    pub role: CourseRole,
}

/// Lists users (admins only).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = [UserView]), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_users(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<UserView>> {
    caller.require(&[Role::Admin], "list users")?;
    // CONSISTENT_PREFIX: an overview for admins; each page is one replica's
    // consistent state. `Cache-Control: no-cache` asks for STRONG.
    let level = if wants_fresh(&headers) {
        ReadConsistency::Strong
    } else {
        ReadConsistency::ConsistentPrefix
    };
    let prefix = bytes::Bytes::from_static(keys::USER);
    let (rows, next) = st.db.page::<User>(&prefix, &q, level, |_| true).await?;
    Ok(Paged {
        items: rows.iter().map(|r| UserView::from(&r.value)).collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}

fn may_see(caller: &Caller, uid: u64) -> AppResult<()> {
    if caller.is_admin() || caller.id() == uid {
        Ok(())
    } else {
        Err(AppError::NotFound("user"))
    }
}

/// Reads a user: admins any, others only themselves.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = u64, Path, description = "user id")),
    responses((status = 200, body = UserView), (status = 404, body = Problem)))]
pub async fn get_user(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppPath(id): AppPath<u64>,
) -> AppResult<Json<UserView>> {
    may_see(&caller, id)?;
    // SESSION with the token of the caller's last profile write (header
    // `x-session-token`), so an edit is visible at once from any replica.
    let user = st
        .db
        .get::<User>(keys::user(id), session_or_prefix(&headers)?)
        .await?
        .ok_or(AppError::NotFound("user"))?;
    Ok(Json(UserView::from(&user.value)))
}

/// Edits a user: the user their name and password, admins name and role.
/// A password change ends every session of the account.
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = u64, Path, description = "user id")), request_body = UpdateUserRequest,
    responses((status = 200, body = UserView), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_user(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<u64>,
    AppJson(req): AppJson<UpdateUserRequest>,
) -> AppResult<impl IntoResponse> {
    may_see(&caller, id)?;
    if req.role.is_some() && !caller.is_admin() {
        return Err(AppError::Forbidden("only admins may change roles".into()));
    }
    if req.password.is_some() && caller.id() != id {
        return Err(AppError::Forbidden(
            "only the account's owner may change its password".into(),
        ));
    }
    let new_hash = match &req.password {
        Some(p) => {
            let current = req.current_password.clone().ok_or_else(|| {
                AppError::field("current_password", "is required to change the password")
            })?;
            // A guess of the current password counts against the account's
            // login limit: a stolen session must not guess faster here.
            st.limits.check_login(id)?;
            let ok = st
                .passwords
                .verify(current, Some(caller.user.password_hash.clone()))
                .await?;
            if !ok {
                return Err(AppError::field("current_password", "is wrong"));
            }
            Some(st.passwords.hash(p.clone()).await?)
        }
        None => None,
    };
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        // STRONG read, then CAS on its version: concurrent edits never lose one another.
        let cur = st
            .db
            .get::<User>(keys::user(id), ReadConsistency::Strong)
            .await?
            .ok_or(AppError::NotFound("user"))?;
        let mut u = cur.value;
        // The password was checked against the record as the request
        // found it; if it changed since (its owner set a new one, which
        // also ended this session), the change is refused, not applied
        // over the newer password.
        if new_hash.is_some()
            && (u.password_hash != caller.user.password_hash
                || u.session_generation != caller.user.session_generation)
        {
            return Err(AppError::Unauthorized(
                "the password changed meanwhile; log in again".into(),
            ));
        }
        if let Some(n) = &req.name {
            u.name = n.trim().to_string();
        }
        if let Some(r) = req.role {
            u.role = r;
        }
        if let Some(h) = &new_hash {
            u.password_hash = h.clone();
            // Every session of the account ends, this one included: a
            // stolen token must not outlive the password it was got with.
            u.session_generation = u.session_generation.wrapping_add(1);
        }
        u.updated_at = Utc::now();
        if let Cas::Done { token, .. } = st.db.cas(keys::user(id), cur.version, Some(&u)).await? {
            return Ok((session_headers(&token), Json(UserView::from(&u))));
        }
    }
    Err(AppError::Busy(
        "the user is being changed concurrently".into(),
    ))
}

/// The courses of a user (the user or an admin), from the cross-range index
/// `usercourse/`. Eventually consistent: an enrollment shows up here once its
/// index entry is written (right after the enrollment, or by the repair task).
/// Entries whose enrollment is gone are dropped here already.
#[utoipa::path(get, path = "/api/v1/users/{id}/courses", tag = "users", security(("bearer" = [])),
    params(("id" = u64, Path, description = "user id"), PageQuery),
    responses((status = 200, body = [MyCourse]), (status = 404, body = Problem)))]
pub async fn user_courses(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    AppPath(id): AppPath<u64>,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<MyCourse>> {
    may_see(&caller, id)?;
    // SESSION at the token an enrollment returned (read-your-writes on the
    // index), else CONSISTENT_PREFIX.
    let prefix = keys::user_courses(id);
    let (rows, next) = st
        .db
        .page::<UserCourse>(&prefix, &q, session_or_prefix(&headers)?, |_| true)
        .await?;
    let checks = rows.iter().map(|r| {
        let st = st.clone();
        let cid = r.value.course_id;
        async move {
            // STRONG membership check drops index entries of finished
            // unenrollments; EVENTUAL (cached) course details are catalogue data.
            let (m, c) = futures::try_join!(
                st.db
                    .get::<Member>(keys::member(cid, id), ReadConsistency::Strong),
                st.db
                    .get::<Course>(keys::course(cid), ReadConsistency::Eventual),
            )?;
            Ok::<_, AppError>(match (m, c) {
                (Some(m), Some(c)) => Some(MyCourse {
                    course: c.value,
                    role: m.value.role,
                }),
                _ => None,
            })
        }
    });
    let items = futures::future::try_join_all(checks)
        .await?
        .into_iter()
        .flatten()
        .collect();
    Ok(Paged {
        items,
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}
