//! The job worker: leases due jobs, runs them off the request path, and
//! acks, retries or dead-letters them. Several API processes may each run a
//! worker; leases keep them from running one job twice at once.

use std::time::Duration;

use lmskv_client::ReadConsistency;

use crate::db::Db;
use crate::error::AppError;
use crate::jobs::notices;
use crate::jobs::{self, Failure, JobKind, Leased, Queue};
use crate::keys;
use crate::model::Assignment;
use crate::routes::grades::{build_gradebook, gradebook_csv};

/// Jobs one worker runs at once.
pub const WORKER_CONCURRENCY: usize = 4;
/// How long an idle worker waits before looking for due jobs again (it is
/// woken at once by jobs enqueued in its own process).
pub const WORKER_IDLE_POLL: Duration = Duration::from_millis(250);
/// Largest export result; larger gradebooks fail permanently.
pub const EXPORT_BYTES_MAX: usize = 1024 * 1024 - 1024;

/// How a task's failure is recorded: what it says and whether a later run
/// could succeed. A course with more records than one read may hold does
/// not shrink by itself, so its job is dead-lettered at once instead of
/// spending its attempts. Everything else is retried: an unavailable or
/// slow store heals, and so may an internal error (a record a newer
/// version wrote during a rolling upgrade reads once this process is
/// upgraded). An internal error's detail stays in the log, not in the job.
pub fn job_failure(e: AppError) -> (String, Failure) {
    match e {
        AppError::TooManyRecords(detail) => (detail, Failure::Permanent),
        AppError::Unavailable(source) => (
            format!("the database is unavailable: {source}"),
            Failure::Retryable,
        ),
        AppError::Internal(detail) => {
            tracing::warn!(error = %detail, "job task failed with an internal error");
            ("internal error".to_string(), Failure::Retryable)
        }
        other => (other.to_string(), Failure::Retryable),
    }
}

/// Runs one job's task. Tasks are idempotent: a rerun writes the same keys.
pub async fn run_task(db: &Db, l: &Leased) -> Result<(), (String, Failure)> {
    let fail = job_failure;
    match l.job.kind {
        JobKind::GradebookExport { course_id } => {
            let g = build_gradebook(db, course_id).await.map_err(fail)?;
            let csv = gradebook_csv(&g);
            if csv.len() > EXPORT_BYTES_MAX {
                return Err((
                    format!(
                        "the export has {} bytes, more than {EXPORT_BYTES_MAX}",
                        csv.len()
                    ),
                    Failure::Permanent,
                ));
            }
            db.put_raw(keys::export(l.job.id), csv.into())
                .await
                .map_err(fail)?;
            Ok(())
        }
        JobKind::GradeNotifications {
            course_id,
            assignment_id,
        } => {
            let a = db
                .get::<Assignment>(
                    keys::assignment(course_id, assignment_id),
                    ReadConsistency::Strong,
                )
                .await
                .map_err(fail)?
                .ok_or_else(|| {
                    (
                        "the assignment no longer exists".to_string(),
                        Failure::Permanent,
                    )
                })?
                .value;
            let report = notices::notify_graded(db, l.job.id, &a)
                .await
                .map_err(fail)?;
            tracing::info!(
                job = l.job.id,
                notified = report.notified,
                already = report.already,
                ungraded = report.ungraded,
                "grade notices"
            );
            Ok(())
        }
    }
}

/// Runs one leased job to its end (ack, retry or dead letter).
pub async fn process(db: &Db, q: &Queue, l: Leased) {
    let result = match tokio::time::timeout(q.settings.lease, run_task(db, &l)).await {
        Ok(r) => r,
        Err(_) => Err((
            "the task outlived its lease".to_string(),
            Failure::Retryable,
        )),
    };
    let outcome = match &result {
        Ok(()) => jobs::ack(db, &l).await,
        Err((e, kind)) => {
            tracing::warn!(job = l.job.id, attempt = l.job.attempts, error = %e, "job failed");
            jobs::fail(db, &q.settings, &l, e, *kind).await
        }
    };
    if let Err(e) = outcome {
        // The lease expires and the job runs again.
        tracing::warn!(job = l.job.id, error = %e, "could not record the job's outcome");
    }
}

/// Leases and runs one batch of due jobs; returns how many ran.
pub async fn run_once(db: &Db, q: &Queue) -> Result<usize, AppError> {
    let leased = jobs::lease(db, q, WORKER_CONCURRENCY).await?;
    let n = leased.len();
    futures::future::join_all(leased.into_iter().map(|l| process(db, q, l))).await;
    Ok(n)
}

/// The worker loop; runs until the process ends.
pub async fn run(st: crate::app::AppState) {
    loop {
        match run_once(&st.db, &st.jobs).await {
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "job lease scan failed"),
        }
        tokio::select! {
            _ = st.jobs_enqueued.notified() => {}
            _ = tokio::time::sleep(WORKER_IDLE_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_cannot_heal_are_permanent() {
        let (msg, kind) = job_failure(AppError::TooManyRecords(
            "more than 100000 records: too many to read at once".into(),
        ));
        assert_eq!(kind, Failure::Permanent);
        assert!(msg.contains("too many to read at once"), "{msg}");

        // An undecodable record may be one a newer version wrote: retried,
        // and its detail is not shown in the job.
        let (msg, kind) = job_failure(AppError::Internal("undecodable record at user/7".into()));
        assert_eq!(kind, Failure::Retryable);
        assert!(!msg.contains("user/7"), "{msg}");

        let (msg, kind) = job_failure(AppError::Timeout(Duration::from_secs(1)));
        assert_eq!(kind, Failure::Retryable);
        assert!(msg.contains("1000 ms"), "{msg}");
    }
}
