//! Grades: a student's own grades in a course, the course gradebook for its
//! teachers and TAs, and the gradebook CSV export (a background job).
//!
//! Every read here is STRONG: grades are what students and teachers act on,
//! and they must see the grade that was just given.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use lmskv_client::{ReadConsistency, ScanOptions};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::access::course_access;
use crate::app::AppState;
use crate::auth::Caller;
use crate::db::{decode, Db, PREFIX_READ_MAX};
use crate::error::{AppError, AppResult, Problem};
use crate::extract::AppPath;
use crate::jobs::{self, JobKind, JobView};
use crate::keys;
use crate::model::{Assignment, CourseRole, Member, SubmissionGrade, SubmissionScore};

/// Assignments (and so submissions) a student's grades view reads per page.
pub const GRADES_PAGE: u32 = 256;

/// One assignment's result for one student.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GradeEntry {
    pub assignment_id: u64,
    pub title: String,
    pub max_points: u32,
    pub submitted: bool,
    /// `null` when not graded (or, for students, not yet published).
    pub score: Option<f64>,
    pub feedback: Option<String>,
}

/// One row of the gradebook.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GradebookRow {
    pub user_id: u64,
    pub name: String,
    pub email: String,
    /// Score per assignment id (`null`: not graded).
    pub scores: BTreeMap<u64, Option<f64>>,
    pub total: f64,
}

/// A course's gradebook: every student by every assignment.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Gradebook {
    pub course_id: u64,
    pub assignments: Vec<Assignment>,
    pub students: Vec<GradebookRow>,
}

/// Builds course `cid`'s gradebook from three prefix scans of its range.
pub async fn build_gradebook(db: &Db, cid: u64) -> AppResult<Gradebook> {
    let strong = || ReadConsistency::Strong;
    let (mk, ak, sk) = (
        keys::members(cid),
        keys::assignments(cid),
        keys::submissions(cid),
    );
    let (members, assignments, subs) = futures::try_join!(
        db.scan_prefix::<Member>(&mk, strong()),
        db.scan_prefix::<Assignment>(&ak, strong()),
        db.scan_prefix::<SubmissionScore>(&sk, strong()),
    )?;
    let mut by_student: BTreeMap<u64, BTreeMap<u64, Option<f64>>> = BTreeMap::new();
    for s in subs {
        by_student
            .entry(s.value.student_id)
            .or_default()
            .insert(s.value.assignment_id, s.value.grade.map(|g| g.score));
    }
    let assignments: Vec<Assignment> = assignments.into_iter().map(|r| r.value).collect();
    let students = members
        .into_iter()
        .filter(|m| m.value.role == CourseRole::Student)
        .map(|m| {
            let got = by_student.remove(&m.value.user_id).unwrap_or_default();
            let scores: BTreeMap<u64, Option<f64>> = assignments
                .iter()
                .map(|a| (a.id, got.get(&a.id).copied().flatten()))
                .collect();
            let total = scores.values().flatten().sum();
            GradebookRow {
                user_id: m.value.user_id,
                name: m.value.name,
                email: m.value.email,
                scores,
                total,
            }
        })
        .collect();
    Ok(Gradebook {
        course_id: cid,
        assignments,
        students,
    })
}

/// One CSV field: quoted when needed, and with a leading `'` where a
/// spreadsheet would read it as a formula (CSV injection).
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The gradebook as CSV: one row per student, one column per assignment.
pub fn gradebook_csv(g: &Gradebook) -> String {
    let mut out = String::from("user_id,name,email");
    for a in &g.assignments {
        out.push(',');
        out.push_str(&csv_field(&a.title));
    }
    out.push_str(",total\n");
    for r in &g.students {
        out.push_str(&format!(
            "{},{},{}",
            r.user_id,
            csv_field(&r.name),
            csv_field(&r.email)
        ));
        for a in &g.assignments {
            out.push(',');
            if let Some(Some(s)) = r.scores.get(&a.id) {
                out.push_str(&s.to_string());
            }
        }
        out.push_str(&format!(",{}\n", r.total));
    }
    out
}

/// A student's grades in a course (the student, or the course's staff).
#[utoipa::path(get, path = "/api/v1/courses/{id}/students/{user_id}/grades", tag = "grades",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "course id"), ("user_id" = u64, Path, description = "student id")),
    responses((status = 200, body = [GradeEntry]), (status = 404, body = Problem)))]
pub async fn student_grades(
    State(st): State<AppState>,
    caller: Caller,
    AppPath((cid, uid)): AppPath<(u64, u64)>,
) -> AppResult<Json<Vec<GradeEntry>>> {
    let access = course_access(&st, &caller, cid).await?;
    let staff = access.is_staff();
    let own = access.is_student() && uid == caller.id();
    if !(staff || own) {
        // A student never learns anything about another student's grades.
        return Err(AppError::NotFound("grades"));
    }
    Ok(Json(grade_entries(&st.db, cid, uid, staff).await?))
}

/// Student `uid`'s entry for every assignment of course `cid`, in
/// assignment order; grades of unpublished assignments only for `staff`.
///
/// The assignments are read a page at a time ([`GRADES_PAGE`]) and each
/// page's submissions with one batch read, so a course with many
/// assignments costs a few calls, not one read per assignment at once.
/// Fails, like a gradebook, past [`PREFIX_READ_MAX`] assignments.
pub async fn grade_entries(db: &Db, cid: u64, uid: u64, staff: bool) -> AppResult<Vec<GradeEntry>> {
    let prefix = keys::assignments(cid);
    let mut opts = ScanOptions {
        end: keys::prefix_end(&prefix),
        start: prefix,
        limit: GRADES_PAGE,
        consistency: ReadConsistency::Strong,
        ..ScanOptions::default()
    };
    let mut out = Vec::new();
    loop {
        let page = db.client().scan(&opts).await?;
        if out.len() + page.kvs.len() > PREFIX_READ_MAX {
            return Err(AppError::TooManyRecords(format!(
                "more than {PREFIX_READ_MAX} assignments: too many to read at once"
            )));
        }
        let assignments = page
            .kvs
            .iter()
            .map(|kv| decode::<Assignment>(&kv.key, &kv.value))
            .collect::<AppResult<Vec<_>>>()?;
        // The grade without the body: only whether there is a submission,
        // and its grade, are shown.
        let mut subs: HashMap<Bytes, SubmissionGrade> = HashMap::new();
        if !assignments.is_empty() {
            let wanted = assignments.iter().map(|a| keys::submission(cid, a.id, uid));
            for kv in db
                .client()
                .batch_get(wanted, ReadConsistency::Strong)
                .await?
            {
                subs.insert(kv.key.clone(), decode(&kv.key, &kv.value)?);
            }
        }
        for a in assignments {
            let s = subs.remove(&keys::submission(cid, a.id, uid));
            let visible = staff || a.grades_published;
            let grade = s.as_ref().and_then(|s| s.grade.clone()).filter(|_| visible);
            out.push(GradeEntry {
                assignment_id: a.id,
                title: a.title,
                max_points: a.max_points,
                submitted: s.is_some(),
                score: grade.as_ref().map(|g| g.score),
                feedback: grade.map(|g| g.feedback),
            });
        }
        match page.next_page_token {
            Some(t) => opts.page_token = t,
            None => return Ok(out),
        }
    }
}

/// The course gradebook (teachers, TAs and admins).
#[utoipa::path(get, path = "/api/v1/courses/{id}/gradebook", tag = "grades",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id")),
    responses((status = 200, body = Gradebook), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn gradebook(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(cid): AppPath<u64>,
) -> AppResult<Json<Gradebook>> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("see the gradebook")?;
    Ok(Json(build_gradebook(&st.db, cid).await?))
}

/// Starts a CSV export of the gradebook; poll the job, then fetch its result.
#[utoipa::path(post, path = "/api/v1/courses/{id}/gradebook/export", tag = "grades",
    security(("bearer" = [])), params(("id" = u64, Path, description = "course id")),
    responses((status = 202, body = JobView), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn export_gradebook(
    State(st): State<AppState>,
    caller: Caller,
    AppPath(cid): AppPath<u64>,
) -> AppResult<impl IntoResponse> {
    let access = course_access(&st, &caller, cid).await?;
    access.require_staff("export the gradebook")?;
    let job = jobs::enqueue(
        &st,
        JobKind::GradebookExport { course_id: cid },
        caller.id(),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/jobs/{}", job.id))],
        Json(JobView::from(&job)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
    }
}
