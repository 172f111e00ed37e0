//! `/api/v1/courses/{id}/enrollments`: joining and leaving courses, with a
//! role per course (student, teacher, ta) and the capacity limit.
//!
//! Enrolling is one atomic batch in the course's range, conditional on the
//! versions of the course, its seat counter and the (absent) member record:
//! concurrent enrollments can never push the count past the capacity. The
//! user's course index (`usercourse/`, another range) is written afterwards
//! with an idempotent put and reconciled by the repair task.

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use lmskv_client::{BatchOp, ReadConsistency, SessionToken};
use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::access::course_access;
use crate::app::AppState;
use crate::auth::Caller;
use crate::db::{derived, encode, Cas, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::keys;
use crate::model::{Course, CourseRole, Member, Role, Seats, User, UserCourse};
use crate::pagination::{PageQuery, Paged};
use crate::routes::session_headers;

/// `POST /courses/{id}/enrollments` body.
#[derive(Debug, Default, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Who to enroll; the caller when absent. Enrolling others needs the
    /// course's teacher or an admin.
    pub user_id: Option<u64>,
    /// The e-mail address of the user to enroll: required when a teacher
    /// (not an admin) enrolls another user, and must match theirs. The
    /// member record shows staff the member's name and e-mail, so a teacher
    /// enrolls only people whose address they know already, not any user
    /// id they try.
    #[validate(length(max = 254))]
    pub email: Option<String>,
    /// The role in the course; `student` when absent.
    pub role: Option<CourseRole>,
}

/// Enrolls `user` in course `cid` with `role`; returns the member record
/// and the session token of the index write (for the user's course list).
pub async fn enroll_user(
    st: &AppState,
    cid: u64,
    user: &User,
    role: CourseRole,
) -> AppResult<(Member, SessionToken)> {
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        // STRONG: the versions read here are the batch's conditions.
        let (course, seats, existing) = futures::try_join!(
            st.db
                .get::<Course>(keys::course(cid), ReadConsistency::Strong),
            st.db
                .get::<Seats>(keys::seats(cid), ReadConsistency::Strong),
            st.db
                .get::<Member>(keys::member(cid, user.id), ReadConsistency::Strong),
        )?;
        let course = course.ok_or(AppError::NotFound("course"))?;
        let seats =
            seats.ok_or_else(|| AppError::Internal(format!("course {cid} has no seat counter")))?;
        if existing.is_some() {
            return Err(AppError::Conflict("already enrolled in this course".into()));
        }
        let mut count = seats.value;
        if role == CourseRole::Student {
            if count.students >= course.value.capacity {
                return Err(AppError::Conflict(format!(
                    "the course is full ({} of {} seats taken)",
                    count.students, course.value.capacity
                )));
            }
            count.students += 1;
        }
        let member = Member {
            course_id: cid,
            user_id: user.id,
            role,
            name: user.name.clone(),
            email: user.email.clone(),
            enrolled_at: Utc::now(),
        };
        let out = st
            .db
            .batch(
                vec![
                    (keys::course(cid), course.version),
                    (keys::seats(cid), seats.version),
                    (keys::member(cid, user.id), 0),
                ],
                vec![
                    BatchOp::Put(keys::seats(cid), encode(&count)?),
                    BatchOp::Put(keys::member(cid, user.id), encode(&member)?),
                ],
            )
            .await?;
        if let Cas::Done { token, .. } = out {
            let index = st
                .db
                .put(
                    keys::user_course(user.id, cid),
                    &UserCourse {
                        course_id: cid,
                        role,
                    },
                )
                .await;
            // Without its index entry the enrollment stands; the session
            // token is then the enrollment's own.
            return Ok((
                member,
                derived("course index entry", index).unwrap_or(token),
            ));
        }
    }
    Err(AppError::Busy(
        "the course's enrollment is contended".into(),
    ))
}

/// Enrolls the caller as a student, or (teachers, admins) another user in any role.
#[utoipa::path(post, path = "/api/v1/courses/{id}/enrollments", tag = "enrollments",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id")),
    request_body = EnrollRequest,
    responses((status = 201, body = Member), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn enroll(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(cid): AppPath<u64>,
    AppJson(req): AppJson<EnrollRequest>,
) -> AppResult<impl IntoResponse> {
    let target = req.user_id.unwrap_or(caller.id());
    let role = req.role.unwrap_or(CourseRole::Student);
    let self_enroll = target == caller.id() && role == CourseRole::Student;
    let access = match course_access(&st, &caller, cid).await {
        Ok(a) => a,
        Err(e) => return Err(e),
    };
    if !self_enroll {
        access.require_teacher("enroll other users or give course roles")?;
    } else if !access.course.value.published && !access.is_teacher() {
        return Err(AppError::NotFound("course"));
    }
    let other = target != caller.id();
    if other && !caller.is_admin() && req.email.is_none() {
        return Err(AppError::field(
            "email",
            "is required to enroll another user: give their e-mail address",
        ));
    }
    // STRONG: the user must exist now, and their role decides what they may teach.
    let user = st
        .db
        .get::<User>(keys::user(target), ReadConsistency::Strong)
        .await?
        .filter(|u| match &req.email {
            // A wrong address answers as an absent user: ids cannot be probed.
            Some(e) if other => e.trim().eq_ignore_ascii_case(u.value.email.trim()),
            _ => true,
        })
        .ok_or(AppError::NotFound("user"))?
        .value;
    if role == CourseRole::Teacher && !matches!(user.role, Role::Teacher | Role::Admin) {
        return Err(AppError::field(
            "role",
            "only users with the teacher or admin role can teach a course",
        ));
    }
    let (member, index) = enroll_user(&st, cid, &user, role).await?;
    Ok((
        StatusCode::CREATED,
        session_headers(&index),
        [(
            header::LOCATION,
            format!("/api/v1/courses/{cid}/enrollments/{target}"),
        )],
        Json(member),
    ))
}

/// Lists a course's members (its teachers, TAs and admins).
#[utoipa::path(get, path = "/api/v1/courses/{id}/enrollments", tag = "enrollments",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id"), PageQuery),
    responses((status = 200, body = [Member]), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_enrollments(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    AppPath(cid): AppPath<u64>,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<Member>> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("list the course's members")?;
    // STRONG: the roster is what grading and access decisions are made from.
    let (rows, next) = st
        .db
        .page::<Member>(&keys::members(cid), &q, ReadConsistency::Strong, |_| true)
        .await?;
    Ok(Paged {
        items: rows.into_iter().map(|r| r.value).collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}

/// Removes a member: students themselves, or the course's teachers and admins.
#[utoipa::path(delete, path = "/api/v1/courses/{id}/enrollments/{user_id}", tag = "enrollments",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("user_id" = u64, Path, description = "user id")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unenroll(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, uid)): AppPath<(u64, u64)>,
) -> AppResult<StatusCode> {
    let access = course_access(&st, &caller, cid).await?;
    if uid != caller.id() {
        access.require_teacher("remove other members")?;
    }
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        let (seats, member) = futures::try_join!(
            st.db
                .get::<Seats>(keys::seats(cid), ReadConsistency::Strong),
            st.db
                .get::<Member>(keys::member(cid, uid), ReadConsistency::Strong),
        )?;
        let seats =
            seats.ok_or_else(|| AppError::Internal(format!("course {cid} has no seat counter")))?;
        let member = member.ok_or(AppError::NotFound("enrollment"))?;
        let mut ops = vec![BatchOp::Delete(keys::member(cid, uid))];
        if member.value.role == CourseRole::Student {
            let count = Seats {
                students: seats.value.students.saturating_sub(1),
            };
            ops.push(BatchOp::Put(keys::seats(cid), encode(&count)?));
        }
        let out = st
            .db
            .batch(
                vec![
                    (keys::seats(cid), seats.version),
                    (keys::member(cid, uid), member.version),
                ],
                ops,
            )
            .await?;
        if let Cas::Done { .. } = out {
            derived(
                "course index entry",
                st.db.delete(keys::user_course(uid, cid)).await,
            );
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    Err(AppError::Busy(
        "the course's enrollment is contended".into(),
    ))
}
