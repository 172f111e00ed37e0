//! `/api/v1/courses`: the catalogue, course pages, and course creation and
//! editing (teachers their own courses, admins all).
//!
//! A course's description, seat counter and members live under one prefix
//! (`course/<cid>/`), so creation is one atomic batch. The catalogue copy
//! (`catalog/<cid>`) is another table: it is written right after, and the
//! repair task re-derives it, so catalogue pages are eventually consistent.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use lmskv_client::{BatchOp, ReadConsistency};
use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::app::AppState;
use crate::auth::Caller;
use crate::db::{derived, encode, Cas, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::keys;
use crate::model::{Course, CourseRole, Member, Role, Seats, User, UserCourse};
use crate::pagination::{PageQuery, Paged};
use crate::routes::cached_or_fresh;

/// Most students a course may hold.
pub const CAPACITY_MAX: u32 = 10_000;

/// `POST /courses` body.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCourseRequest {
    #[schema(min_length = 1, max_length = 200)]
    #[validate(custom(function = "crate::validate::title"))]
    pub title: String,
    #[serde(default)]
    #[validate(custom(function = "crate::validate::long_text"))]
    pub description: String,
    /// 1 to 10,000 students.
    #[schema(minimum = 1, maximum = 10000)]
    #[validate(range(min = 1, max = 10000))]
    pub capacity: u32,
    #[serde(default)]
    pub published: bool,
}

/// `PATCH /courses/{id}` body; every field is optional.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCourseRequest {
    #[schema(min_length = 1, max_length = 200)]
    #[validate(custom(function = "crate::validate::title"))]
    pub title: Option<String>,
    #[validate(custom(function = "crate::validate::long_text"))]
    pub description: Option<String>,
    #[schema(minimum = 1, maximum = 10000)]
    #[validate(range(min = 1, max = 10000))]
    pub capacity: Option<u32>,
    pub published: Option<bool>,
}

/// Creates a course owned by `owner`, who becomes its teacher.
pub async fn create(st: &AppState, owner: &User, req: CreateCourseRequest) -> AppResult<Course> {
    let cid = st.db.next_id("course").await?;
    let now = Utc::now();
    let course = Course {
        id: cid,
        title: req.title.trim().to_string(),
        description: req.description,
        owner_id: owner.id,
        published: req.published,
        capacity: req.capacity,
        created_at: now,
        updated_at: now,
    };
    let member = Member {
        course_id: cid,
        user_id: owner.id,
        role: CourseRole::Teacher,
        name: owner.name.clone(),
        email: owner.email.clone(),
        enrolled_at: now,
    };
    // One atomic batch in the course's range: the course never exists without
    // its seat counter or its teacher.
    let out = st
        .db
        .batch(
            vec![(keys::course(cid), 0)],
            vec![
                BatchOp::Put(keys::course(cid), encode(&course)?),
                BatchOp::Put(keys::seats(cid), encode(&Seats::default())?),
                BatchOp::Put(keys::member(cid, owner.id), encode(&member)?),
            ],
        )
        .await?;
    if out == Cas::Conflict {
        return Err(AppError::Internal(format!(
            "course id {cid} was already used"
        )));
    }
    // Derived copies in other tables, written after the record (idempotent).
    derived(
        "catalogue entry",
        crate::repair::sync_catalog(&st.db, cid).await,
    );
    derived(
        "course index entry",
        st.db
            .put(
                keys::user_course(owner.id, cid),
                &UserCourse {
                    course_id: cid,
                    role: CourseRole::Teacher,
                },
            )
            .await,
    );
    Ok(course)
}

/// Creates a course (teachers and admins).
#[utoipa::path(post, path = "/api/v1/courses", tag = "courses", security(("bearer" = [])),
    request_body = CreateCourseRequest,
    responses((status = 201, body = Course), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn create_course(
    State(st): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<CreateCourseRequest>,
) -> AppResult<impl IntoResponse> {
    caller.require(&[Role::Teacher, Role::Admin], "create courses")?;
    let course = create(&st, &caller.user, req).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/courses/{}", course.id))],
        Json(course),
    ))
}

/// The catalogue: published courses, plus a teacher's own, plus all for admins.
#[utoipa::path(get, path = "/api/v1/courses", tag = "courses", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = [Course]), (status = 401, body = Problem)))]
pub async fn list_courses(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<Course>> {
    let (admin, me) = (caller.is_admin(), caller.id());
    // EVENTUAL: the public catalogue may lag a moment behind edits; any
    // replica serves it. `Cache-Control: no-cache` makes it STRONG.
    let prefix = bytes::Bytes::from_static(keys::CATALOG);
    let (rows, next) = st
        .db
        .page::<Course>(&prefix, &q, cached_or_fresh(&headers), |c| {
            admin || c.published || c.owner_id == me
        })
        .await?;
    Ok(Paged {
        items: rows.into_iter().map(|r| r.value).collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}

/// A course page.
#[utoipa::path(get, path = "/api/v1/courses/{id}", tag = "courses", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id")),
    responses((status = 200, body = Course), (status = 404, body = Problem)))]
pub async fn get_course(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppPath(id): AppPath<u64>,
) -> AppResult<Json<Course>> {
    // EVENTUAL, served from the process's read cache when it can be: course
    // pages are the most read and least written data. Edits made through this
    // process update the cache at once; `Cache-Control: no-cache` reads STRONG.
    let course = st
        .db
        .get::<Course>(keys::course(id), cached_or_fresh(&headers))
        .await?
        .ok_or(AppError::NotFound("course"))?
        .value;
    if course.published || caller.is_admin() || course.owner_id == caller.id() {
        return Ok(Json(course));
    }
    // An unpublished course is shown to its members only (STRONG: access check).
    let member = st
        .db
        .get::<Member>(keys::member(id, caller.id()), ReadConsistency::Strong)
        .await?;
    match member {
        Some(_) => Ok(Json(course)),
        None => Err(AppError::NotFound("course")),
    }
}

/// Edits a course (its teachers and admins). Capacity cannot drop below the
/// number of enrolled students.
#[utoipa::path(patch, path = "/api/v1/courses/{id}", tag = "courses", security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id")), request_body = UpdateCourseRequest,
    responses((status = 200, body = Course), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn update_course(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<u64>,
    AppJson(req): AppJson<UpdateCourseRequest>,
) -> AppResult<Json<Course>> {
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        let access = crate::access::course_access(&st, &caller, id).await?;
        access.require_teacher("edit the course")?;
        let seats = st
            .db
            .get::<Seats>(keys::seats(id), ReadConsistency::Strong)
            .await?
            .ok_or_else(|| AppError::Internal(format!("course {id} has no seat counter")))?;
        let mut c = access.course.value.clone();
        if let Some(t) = &req.title {
            c.title = t.trim().to_string();
        }
        if let Some(d) = &req.description {
            c.description = d.clone();
        }
        if let Some(cap) = req.capacity {
            if cap < seats.value.students {
                return Err(AppError::Conflict(format!(
                    "{} students are enrolled; capacity cannot be lower",
                    seats.value.students
                )));
            }
            c.capacity = cap;
        }
        if let Some(p) = req.published {
            c.published = p;
        }
        c.updated_at = Utc::now();
        // Conditional on the seat counter too, so a capacity cut cannot race
        // an enrollment past the new limit.
        let out = st
            .db
            .batch(
                vec![
                    (keys::course(id), access.course.version),
                    (keys::seats(id), seats.version),
                ],
                vec![BatchOp::Put(keys::course(id), encode(&c)?)],
            )
            .await?;
        if let Cas::Done { .. } = out {
            derived(
                "catalogue entry",
                crate::repair::sync_catalog(&st.db, id).await,
            );
            return Ok(Json(c));
        }
    }
    Err(AppError::Busy(
        "the course is being changed concurrently".into(),
    ))
}
