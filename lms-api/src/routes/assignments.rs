//! `/api/v1/courses/{id}/assignments`: the course's teachers create
//! assignments with due dates; members read them; teachers and TAs publish
//! grades, which enqueues the notification job.

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use lmskv_client::ReadConsistency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::access::course_access;
use crate::app::AppState;
use crate::auth::Caller;
use crate::db::Cas;
use crate::error::{AppError, AppResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::jobs::{notices, JobView};
use crate::keys;
use crate::model::Assignment;
use crate::pagination::{PageQuery, Paged};

/// `POST /courses/{id}/assignments` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAssignmentRequest {
    #[schema(min_length = 1, max_length = 200)]
    #[validate(custom(function = "crate::validate::title"))]
    pub title: String,
    #[serde(default)]
    #[validate(custom(function = "crate::validate::long_text"))]
    pub description: String,
    /// RFC 3339 time after which submissions are late.
    pub due_at: Option<DateTime<Utc>>,
    /// 1 to 10,000 points.
    #[schema(minimum = 1, maximum = 10000)]
    #[validate(range(min = 1, max = 10000))]
    pub max_points: u32,
    /// Submissions allowed per student, 1 to 100 (default 1).
    #[schema(minimum = 1, maximum = 100)]
    #[validate(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// Accept (and mark) submissions after the due date (default false).
    #[serde(default)]
    pub allow_late: bool,
}

/// What publishing grades started.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublishResponse {
    pub assignment: Assignment,
    /// The notification job.
    pub job: JobView,
}

/// Creates an assignment (the course's teachers and admins).
#[utoipa::path(post, path = "/api/v1/courses/{id}/assignments", tag = "assignments",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id")),
    request_body = CreateAssignmentRequest,
    responses((status = 201, body = Assignment), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn create_assignment(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(cid): AppPath<u64>,
    AppJson(req): AppJson<CreateAssignmentRequest>,
) -> AppResult<impl IntoResponse> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_teacher("create assignments")?;
    let aid = st.db.next_id("assignment").await?;
    let now = Utc::now();
    let a = Assignment {
        id: aid,
        course_id: cid,
        title: req.title.trim().to_string(),
        description: req.description,
        due_at: req.due_at,
        max_points: req.max_points,
        max_attempts: req.max_attempts.unwrap_or(1),
        allow_late: req.allow_late,
        grades_published: false,
        created_at: now,
        updated_at: now,
    };
    if let Cas::Conflict = st.db.cas(keys::assignment(cid, aid), 0, Some(&a)).await? {
        return Err(AppError::Internal(format!(
            "assignment id {aid} was already used"
        )));
    }
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/api/v1/courses/{cid}/assignments/{aid}"),
        )],
        Json(a),
    ))
}

/// Lists a course's assignments (members and admins).
#[utoipa::path(get, path = "/api/v1/courses/{id}/assignments", tag = "assignments",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id"), PageQuery),
    responses((status = 200, body = [Assignment]), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_assignments(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    AppPath(cid): AppPath<u64>,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<Assignment>> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_member()?;
    // STRONG: a new assignment (and its due date) is visible to every student
    // as soon as the teacher's request returns.
    let (rows, next) = st
        .db
        .page::<Assignment>(&keys::assignments(cid), &q, ReadConsistency::Strong, |_| {
            true
        })
        .await?;
    Ok(Paged {
        items: rows.into_iter().map(|r| r.value).collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}

/// Loads assignment `aid` of course `cid` (STRONG), or 404.
pub async fn load(
    st: &AppState,
    cid: u64,
    aid: u64,
) -> AppResult<crate::db::Versioned<Assignment>> {
    st.db
        .get::<Assignment>(keys::assignment(cid, aid), ReadConsistency::Strong)
        .await?
        .ok_or(AppError::NotFound("assignment"))
}

/// Reads one assignment (members and admins).
#[utoipa::path(get, path = "/api/v1/courses/{id}/assignments/{assignment_id}", tag = "assignments",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id")),
    responses((status = 200, body = Assignment), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_assignment(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, aid)): AppPath<(u64, u64)>,
) -> AppResult<Json<Assignment>> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_member()?;
    Ok(Json(load(&st, cid, aid).await?.value))
}

/// Publishes an assignment's grades to its students and enqueues the job
/// that notifies each graded student (teachers, TAs and admins). Publishing
/// again notifies only students whose grade is new or changed since they
/// were last notified.
#[utoipa::path(post, path = "/api/v1/courses/{id}/assignments/{assignment_id}/publish-grades",
    tag = "assignments", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id")),
    responses((status = 202, body = PublishResponse), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn publish_grades(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, aid)): AppPath<(u64, u64)>,
) -> AppResult<impl IntoResponse> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("publish grades")?;
    let (a, pending) = notices::publish(&st.db, cid, aid, caller.id()).await?;
    // Committed: the job is written next. Should that fail, the pending
    // record the publish wrote makes the repair task write it.
    let (job, _) = notices::enqueue_pending(&st.db, cid, aid, &pending).await?;
    st.jobs_enqueued.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/jobs/{}", job.id))],
        Json(PublishResponse {
            assignment: a,
            job: JobView::from(&job),
        }),
    ))
}
