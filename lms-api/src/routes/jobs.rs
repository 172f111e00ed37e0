//! `/api/v1/jobs/{id}`: a job's state and result, for the user who started
//! it and for admins (404 for anyone else); a gradebook export's result only
//! while its reader may still export the course's gradebook (403 after, or
//! 404 when the course is no longer visible to them).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use lmskv_client::ReadConsistency;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{AppError, AppResult, Problem};
use crate::extract::AppPath;
use crate::jobs::{self, Job, JobKind, JobState, JobView};
use crate::keys;

async fn own_job(st: &AppState, caller: &Caller, id: u64) -> AppResult<Job> {
    let job = jobs::status(&st.db, id)
        .await?
        .ok_or(AppError::NotFound("job"))?;
    if job.created_by != caller.id() && !caller.is_admin() {
        return Err(AppError::NotFound("job"));
    }
    Ok(job)
}

/// A job's state.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = Problem)))]
pub async fn get_job(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<u64>,
) -> AppResult<Json<JobView>> {
    Ok(Json(JobView::from(&own_job(&st, &caller, id).await?)))
}

/// A finished export job's result (CSV).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/result", tag = "jobs", security(("bearer" = [])),
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, content_type = "text/csv", body = String), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn job_result(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<u64>,
) -> AppResult<impl IntoResponse> {
    let job = own_job(&st, &caller, id).await?;
    // The result is the course's gradebook: only who may export it now may
    // read it (a TA removed from the course since the export loses it).
    if let JobKind::GradebookExport { course_id } = job.kind {
        crate::access::course_access(&st, &caller, course_id)
            .await?
            .require_staff("read the course's gradebook export")?;
    }
    if job.state != JobState::Succeeded {
        return Err(AppError::Conflict("the job has not succeeded (yet)".into()));
    }
    // STRONG: written before the job was marked done, so it is there now.
    let csv = st
        .db
        .client()
        .get(keys::export(id), ReadConsistency::Strong)
        .await?
        .ok_or(AppError::NotFound("job result"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"gradebook-{id}.csv\""),
            ),
        ],
        csv.value,
    ))
}
