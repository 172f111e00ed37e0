//! A durable job queue stored in lmskv: enqueue, lease with a timeout, ack,
//! retry with capped exponential backoff, and a dead-letter table.
//!
//! A live job is one key, `job/<jid>`, and every state change is a
//! compare-and-swap on its version, so two workers can never hold the same
//! lease and no change is lost. A lease that is not acked before
//! `lease_until` expires, and the job becomes leasable again (at-least-once
//! execution; tasks are idempotent). Finishing writes `jobdone/<jid>` (or
//! `jobdead/<jid>`) first and then removes the live key with a CAS; if the
//! process dies in between, the job runs again and rewrites the same result.
//! Finished jobs leave `job/`, so leasing scans only live work.

pub mod worker;

use std::time::Duration;

use chrono::{DateTime, Utc};
use lmskv_client::ReadConsistency;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::db::{Cas, Db};
use crate::error::AppResult;
use crate::keys;

/// Tries a job gets before it is dead-lettered.
pub const JOB_ATTEMPTS_MAX: u32 = 5;
/// How long a lease lasts; a task running longer is abandoned and retried.
pub const JOB_LEASE: Duration = Duration::from_secs(30);
/// Backoff after the first failure; doubles per attempt.
pub const JOB_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest backoff between attempts.
pub const JOB_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Live jobs examined per lease scan.
pub const LEASE_SCAN_MAX: u32 = 256;
/// Longest error message kept on a job, in characters.
pub const JOB_ERROR_CHARS_MAX: usize = 500;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Writes the course's gradebook as CSV to `export/<jid>`.
    GradebookExport { course_id: u64 },
    /// Notifies every graded student of an assignment that grades are out.
    GradeNotifications { course_id: u64, assignment_id: u64 },
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Dead,
}

/// A job record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    pub state: JobState,
    pub attempts: u32,
    pub created_by: u64,
    pub created_at: DateTime<Utc>,
    /// Not run before this time (backoff).
    pub run_at: DateTime<Utc>,
    /// While running: the lease's end.
    pub lease_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: u64,
    #[serde(flatten)]
    pub kind: JobKind,
    pub state: JobState,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Where the result can be fetched once the job succeeded.
    pub result_url: Option<String>,
}

impl From<&Job> for JobView {
    fn from(j: &Job) -> Self {
        let result_url = (j.state == JobState::Succeeded
            && matches!(j.kind, JobKind::GradebookExport { .. }))
        .then(|| format!("/api/v1/jobs/{}/result", j.id));
        JobView {
            id: j.id,
            kind: j.kind.clone(),
            state: j.state,
            attempts: j.attempts,
            created_at: j.created_at,
            finished_at: j.finished_at,
            last_error: j.last_error.clone(),
            result_url,
        }
    }
}

/// A job leased by a worker, with the version its lease was written at.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job: Job,
    pub version: u64,
}

/// Adds a job to the queue and wakes the local worker.
pub async fn enqueue(st: &AppState, kind: JobKind, created_by: u64) -> AppResult<Job> {
    let job = enqueue_in(&st.db, kind, created_by).await?;
    st.jobs_enqueued.notify_one();
    Ok(job)
}

/// Adds a job to the queue in `db`.
pub async fn enqueue_in(db: &Db, kind: JobKind, created_by: u64) -> AppResult<Job> {
    let id = db.next_id("job").await?;
    let now = Utc::now();
    let job = Job {
        id,
        kind,
        state: JobState::Queued,
        attempts: 0,
        created_by,
        created_at: now,
        run_at: now,
        lease_until: None,
        last_error: None,
        finished_at: None,
    };
    db.put(keys::job(id), &job).await?;
    Ok(job)
}

/// Leases up to `max` due jobs (queued and due, or running with an expired lease).
pub async fn lease(db: &Db, max: usize) -> AppResult<Vec<Leased>> {
    let prefix = bytes::Bytes::from_static(keys::JOB);
    // STRONG: the versions read are the CAS conditions of the leases.
    let opts = lmskv_client::ScanOptions {
        start: prefix.clone(),
        end: keys::prefix_end(&prefix),
        limit: LEASE_SCAN_MAX,
        consistency: ReadConsistency::Strong,
        ..Default::default()
    };
    let page = db.client().scan(&opts).await?;
    let now = Utc::now();
    let mut due = Vec::new();
    for kv in page.kvs {
        let job: Job = crate::db::decode(&kv.key, &kv.value)?;
        let ready = match job.state {
            JobState::Queued => job.run_at <= now,
            JobState::Running => job.lease_until.is_none_or(|t| t <= now),
            JobState::Succeeded | JobState::Dead => false,
        };
        if ready {
            due.push((kv, job));
        }
    }
    // Workers that scanned the same jobs try them in different orders, so
    // they rarely race for the same lease.
    due.shuffle(&mut rand::thread_rng());
    let mut out = Vec::new();
    for (kv, mut job) in due {
        if out.len() >= max {
            break;
        }
        job.state = JobState::Running;
        job.attempts += 1;
        job.lease_until = Some(now + chrono::Duration::from_std(JOB_LEASE).unwrap_or_default());
        if let Cas::Done { version, .. } = db.cas(kv.key.clone(), kv.version, Some(&job)).await? {
            out.push(Leased { job, version });
        }
    }
    Ok(out)
}

/// Marks a leased job done.
pub async fn ack(db: &Db, l: &Leased) -> AppResult<()> {
    let mut done = l.job.clone();
    done.state = JobState::Succeeded;
    done.lease_until = None;
    done.finished_at = Some(Utc::now());
    db.put(keys::job_done(done.id), &done).await?;
    // Conflict means the lease was lost and another run owns the job now;
    // it will finish and write the same result.
    db.cas::<Job>(keys::job(done.id), l.version, None).await?;
    Ok(())
}

/// Whether a failure may succeed on a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Retryable,
    Permanent,
}

/// The backoff before attempt `attempts + 1`.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    JOB_BACKOFF_BASE
        .saturating_mul(1u32 << exp)
        .min(JOB_BACKOFF_MAX)
}

/// Records a failed run: requeued with backoff, or dead-lettered when out
/// of attempts or the failure is permanent.
pub async fn fail(db: &Db, l: &Leased, error: &str, kind: Failure) -> AppResult<()> {
    let mut j = l.job.clone();
    j.last_error = Some(error.chars().take(JOB_ERROR_CHARS_MAX).collect());
    j.lease_until = None;
    if kind == Failure::Permanent || j.attempts >= JOB_ATTEMPTS_MAX {
        j.state = JobState::Dead;
        j.finished_at = Some(Utc::now());
        db.put(keys::job_dead(j.id), &j).await?;
        db.cas::<Job>(keys::job(j.id), l.version, None).await?;
    } else {
        j.state = JobState::Queued;
        j.run_at = Utc::now() + chrono::Duration::from_std(backoff(j.attempts)).unwrap_or_default();
        db.cas(keys::job(j.id), l.version, Some(&j)).await?;
    }
    Ok(())
}

/// The current record of job `id`, wherever it is.
pub async fn status(db: &Db, id: u64) -> AppResult<Option<Job>> {
    // STRONG: a finished job must not appear to be still running.
    for key in [keys::job(id), keys::job_done(id), keys::job_dead(id)] {
        if let Some(j) = db.get::<Job>(key, ReadConsistency::Strong).await? {
            return Ok(Some(j.value));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), JOB_BACKOFF_BASE);
        assert_eq!(backoff(2), JOB_BACKOFF_BASE * 2);
        assert_eq!(backoff(3), JOB_BACKOFF_BASE * 4);
        assert_eq!(backoff(40), JOB_BACKOFF_MAX);
    }
}
