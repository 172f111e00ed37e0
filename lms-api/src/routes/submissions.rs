//! Submissions and grading: `/api/v1/courses/{id}/assignments/{aid}/submissions`.
//!
//! A student submits to an assignment of a course they are enrolled in;
//! resubmission is allowed up to `max_attempts` and only until graded; after
//! the due date only when `allow_late`. A submission and its grade share one
//! key, written by compare-and-swap, so a resubmission and a grading (or two
//! graders) never overwrite each other unnoticed; `If-Match` with the
//! submission's ETag turns a lost race into 412.
//!
//! Students see only their own submission (another student's is 404), and
//! its grade only once the assignment's grades are published.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use lmskv_client::ReadConsistency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::access::{course_access, CourseAccess};
use crate::app::AppState;
use crate::auth::Caller;
use crate::db::{Cas, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::keys;
use crate::model::{Assignment, Grade, Submission};
use crate::pagination::{PageQuery, Paged};
use crate::routes::assignments::load;

/// `POST …/submissions` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The answer, 1 to 50,000 characters.
    #[schema(min_length = 1, max_length = 50000)]
    #[validate(custom(function = "crate::validate::body"))]
    pub body: String,
}

/// `PUT …/submissions/{uid}/grade` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GradeRequest {
    /// 0 to the assignment's `max_points`.
    #[schema(minimum = 0)]
    #[validate(custom(function = "crate::validate::score"))]
    pub score: f64,
    #[serde(default)]
    #[validate(custom(function = "crate::validate::long_text"))]
    pub feedback: String,
}

/// A submission as the API shows it, with its version (also its `ETag`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmissionView {
    #[serde(flatten)]
    pub submission: Submission,
    pub version: u64,
}

fn etag(version: u64) -> (header::HeaderName, HeaderValue) {
    (
        header::ETAG,
        HeaderValue::from_str(&format!("\"{version}\"")).expect("ascii etag"),
    )
}

/// What `viewer` may see of `s`: students no unpublished grade.
fn view(mut s: Submission, version: u64, a: &Assignment, staff: bool) -> SubmissionView {
    if !staff && !a.grades_published {
        s.grade = None;
    }
    SubmissionView {
        submission: s,
        version,
    }
}

/// Submits (or resubmits) the caller's answer (enrolled students only).
#[utoipa::path(post, path = "/api/v1/courses/{id}/assignments/{assignment_id}/submissions",
    tag = "submissions", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id")),
    request_body = SubmitRequest,
    responses((status = 201, body = SubmissionView), (status = 200, body = SubmissionView),
              (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn submit(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, aid)): AppPath<(u64, u64)>,
    AppJson(req): AppJson<SubmitRequest>,
) -> AppResult<impl IntoResponse> {
    let access = course_access(&st, &caller, cid).await?;
    if !access.is_student() {
        return Err(AppError::Forbidden(
            "only students enrolled in the course may submit".into(),
        ));
    }
    let a = load(&st, cid, aid).await?.value;
    let now = Utc::now();
    let late = a.due_at.is_some_and(|d| now > d);
    if late && !a.allow_late {
        return Err(AppError::Conflict(
            "the assignment is past its due date".into(),
        ));
    }
    let key = keys::submission(cid, aid, caller.id());
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        // STRONG: the version read is the CAS condition.
        let prev = st
            .db
            .get::<Submission>(key.clone(), ReadConsistency::Strong)
            .await?;
        let (attempt, version) = match &prev {
            None => (1, 0),
            Some(p) => {
                if p.value.grade.is_some() {
                    return Err(AppError::Conflict(
                        "the submission is graded; it cannot be replaced".into(),
                    ));
                }
                if p.value.attempt >= a.max_attempts {
                    return Err(AppError::Conflict(format!(
                        "no attempts left ({} allowed)",
                        a.max_attempts
                    )));
                }
                (p.value.attempt + 1, p.version)
            }
        };
        let s = Submission {
            course_id: cid,
            assignment_id: aid,
            student_id: caller.id(),
            body: req.body.clone(),
            attempt,
            submitted_at: now,
            late,
            grade: None,
        };
        if let Cas::Done { version, .. } = st.db.cas(key.clone(), version, Some(&s)).await? {
            let status = if attempt == 1 {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return Ok((status, [etag(version)], Json(view(s, version, &a, false))));
        }
    }
    Err(AppError::Busy(
        "the submission is being changed concurrently".into(),
    ))
}

/// Lists an assignment's submissions (teachers, TAs and admins).
#[utoipa::path(get, path = "/api/v1/courses/{id}/assignments/{assignment_id}/submissions",
    tag = "submissions", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id"), PageQuery),
    responses((status = 200, body = [SubmissionView]), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_submissions(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    AppPath((cid, aid)): AppPath<(u64, u64)>,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<SubmissionView>> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("list submissions")?;
    let a = load(&st, cid, aid).await?.value;
    // STRONG: graders work from the latest submissions.
    let (rows, next) = st
        .db
        .page::<Submission>(
            &keys::submissions_of(cid, aid),
            &q,
            ReadConsistency::Strong,
            |_| true,
        )
        .await?;
    Ok(Paged {
        items: rows
            .into_iter()
            .map(|r| view(r.value, r.version, &a, true))
            .collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}

/// Object-level check: staff see every submission, a student only their own.
fn may_see_submission(access: &CourseAccess, caller: &Caller, student: u64) -> AppResult<()> {
    if access.is_staff() || (access.is_student() && caller.id() == student) {
        Ok(())
    } else {
        // Not 403: whether another student submitted is not the caller's business.
        Err(AppError::NotFound("submission"))
    }
}

/// Reads one student's submission (that student, or the course's staff).
#[utoipa::path(get, path = "/api/v1/courses/{id}/assignments/{assignment_id}/submissions/{user_id}",
    tag = "submissions", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id"),
           ("user_id" = u64, Path, description = "student id")),
    responses((status = 200, body = SubmissionView), (status = 404, body = Problem)))]
pub async fn get_submission(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, aid, uid)): AppPath<(u64, u64, u64)>,
) -> AppResult<impl IntoResponse> {
    let access = course_access(&st, &caller, cid).await?;
    may_see_submission(&access, &caller, uid)?;
    let a = load(&st, cid, aid).await?.value;
    // STRONG: grades are read where they were just given.
    let s = st
        .db
        .get::<Submission>(keys::submission(cid, aid, uid), ReadConsistency::Strong)
        .await?
        .ok_or(AppError::NotFound("submission"))?;
    Ok((
        [etag(s.version)],
        Json(view(s.value, s.version, &a, access.is_staff())),
    ))
}

fn if_match(headers: &HeaderMap) -> AppResult<Option<u64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| AppError::BadRequest("If-Match must be an ETag of this API".into()))
}

/// Grades a submission (the course's teachers, TAs and admins). With
/// `If-Match`, grading fails with 412 if the submission changed since;
/// without it the last grade wins, but a resubmission that lands while
/// the grade is written is never graded unseen (409).
#[utoipa::path(put, path = "/api/v1/courses/{id}/assignments/{assignment_id}/submissions/{user_id}/grade",
    tag = "submissions", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("assignment_id" = u64, Path, description = "assignment id"),
           ("user_id" = u64, Path, description = "student id"),
           ("If-Match" = Option<String>, Header, description = "ETag of the submission as last seen")),
    request_body = GradeRequest,
    responses((status = 200, body = SubmissionView), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn grade_submission(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppPath((cid, aid, uid)): AppPath<(u64, u64, u64)>,
    AppJson(req): AppJson<GradeRequest>,
) -> AppResult<impl IntoResponse> {
    let expected = if_match(&headers)?;
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("grade submissions")?;
    let a = load(&st, cid, aid).await?.value;
    if req.score > a.max_points as f64 {
        return Err(AppError::field(
            "score",
            format!("must be at most the assignment's {} points", a.max_points),
        ));
    }
    let key = keys::submission(cid, aid, uid);
    // The attempt this grade is for: a retry after a lost race grades the
    // same attempt again or nothing (a resubmission meanwhile is one the
    // grader has not seen).
    let mut graded_attempt = None;
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        let cur = st
            .db
            .get::<Submission>(key.clone(), ReadConsistency::Strong)
            .await?
            .ok_or(AppError::NotFound("submission"))?;
        if expected.is_some_and(|v| v != cur.version) {
            return Err(AppError::PreconditionFailed(
                "the submission changed since you read it".into(),
            ));
        }
        match graded_attempt {
            None => graded_attempt = Some(cur.value.attempt),
            Some(n) if n != cur.value.attempt => {
                return Err(AppError::Conflict(format!(
                    "the student resubmitted (attempt {}) while attempt {n} was being graded; read it and grade again",
                    cur.value.attempt
                )));
            }
            Some(_) => {}
        }
        let mut s = cur.value;
        s.grade = Some(Grade {
            score: req.score,
            feedback: req.feedback.clone(),
            graded_by: caller.id(),
            graded_at: Utc::now(),
        });
        match st.db.cas(key.clone(), cur.version, Some(&s)).await? {
            Cas::Done { version, .. } => {
                return Ok(([etag(version)], Json(view(s, version, &a, true))));
            }
            Cas::Conflict if expected.is_some() => {
                return Err(AppError::PreconditionFailed(
                    "the submission changed since you read it".into(),
                ));
            }
            Cas::Conflict => continue,
        }
    }
    Err(AppError::Busy(
        "the submission is being changed concurrently".into(),
    ))
}
