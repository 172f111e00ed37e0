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
//!
//! Leasing scans `job/` in pages from where the previous scan of this
//! process stopped, wrapping around at the end, until it has found enough
//! due jobs or examined [`LEASE_SCAN_KEYS_MAX`] keys: jobs waiting on their
//! backoff or held by live leases at the front of the queue cannot hide due
//! jobs behind them.

pub mod notices;
pub mod worker;

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use chrono::{DateTime, Utc};
use lmskv_client::ReadConsistency;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::db::{Cas, Db};
use crate::error::AppResult;
use crate::keys;

/// Tries a job gets before it is dead-lettered, unless configured otherwise.
pub const JOB_ATTEMPTS_MAX: u32 = 5;
/// How long a lease lasts, unless configured otherwise; a task running
/// longer is abandoned and retried.
pub const JOB_LEASE: Duration = Duration::from_secs(30);
/// Backoff after the first failure, unless configured otherwise; doubles
/// per attempt.
pub const JOB_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest backoff between attempts, unless configured otherwise.
pub const JOB_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Live jobs read per page of a lease scan.
pub const LEASE_SCAN_MAX: u32 = 256;
/// Live jobs one lease scan examines at most (the next scan goes on from there).
pub const LEASE_SCAN_KEYS_MAX: usize = 4096;
/// Longest error message kept on a job, in characters.
pub const JOB_ERROR_CHARS_MAX: usize = 500;

/// The queue's timings (`--job-lease-ms`, `--job-backoff-base-ms`,
/// `--job-backoff-max-ms`, `--job-attempts-max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSettings {
    /// How long a lease lasts; also the longest a task may run.
    pub lease: Duration,
    /// Backoff after the first failure; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Runs a job gets before it is dead-lettered.
    pub attempts_max: u32,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            lease: JOB_LEASE,
            backoff_base: JOB_BACKOFF_BASE,
            backoff_max: JOB_BACKOFF_MAX,
            attempts_max: JOB_ATTEMPTS_MAX,
        }
    }
}

/// One process's view of the queue: its settings and where its next lease
/// scan starts.
#[derive(Debug, Default)]
pub struct Queue {
    pub settings: JobSettings,
    /// The first key the next lease scan reads; `None`: the start of `job/`.
    scan_from: Mutex<Option<Bytes>>,
}

impl Queue {
    /// A queue with these settings.
    pub fn new(settings: JobSettings) -> Queue {
        Queue {
            settings,
            scan_from: Mutex::new(None),
        }
    }
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Writes the course's gradebook as CSV to `export/<jid>`.
    GradebookExport { course_id: u64 },
    /// Notifies every graded student of an assignment that grades are out,
    /// once per grade ([`notices`]).
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
    let job = queued(id, kind, created_by);
    db.put(keys::job(id), &job).await?;
    Ok(job)
}

/// A new queued job.
fn queued(id: u64, kind: JobKind, created_by: u64) -> Job {
    let now = Utc::now();
    Job {
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
    }
}

/// Adds job `id` (an id allocated earlier) to the queue unless a record of
/// it exists, live, finished or dead: the publish that allocated it and the
/// repair task may both write it. Returns the job's record and whether this
/// call wrote it (and left it written).
///
/// What holds: [`status`] reads `job/<id>` first and the finished records
/// only after that answer, and finishing a job writes its finished record
/// before it deletes `job/<id>`, so a job that finishes while the check
/// reads is seen and not written again. The check and the write are not
/// one step, though: another writer's job may be written, run and finished
/// in between, and the write (on "absent") would queue it again.
/// [`write_queued`] therefore looks for a finished record after its write
/// and takes the write back; only if a worker leased the rewritten job
/// within those few reads does the job run a second time (tasks are
/// idempotent, and it ends finished again). The repair task leaves young
/// publishes to their own process
/// ([`crate::repair::REPAIR_PENDING_GRACE`]), so the two writers rarely
/// overlap at all.
pub async fn enqueue_as(
    db: &Db,
    id: u64,
    kind: JobKind,
    created_by: u64,
) -> AppResult<(Job, bool)> {
    if let Some(j) = status(db, id).await? {
        return Ok((j, false));
    }
    write_queued(db, &queued(id, kind, created_by)).await
}

/// The second half of [`enqueue_as`], after it found no record of `job`:
/// writes `job` if `job/<id>` is absent, then checks that the job had not
/// finished. An absent key is also what a job written, run and finished
/// since the check leaves (it writes `jobdone/` or `jobdead/` and then
/// deletes `job/`), and a write on that would queue a finished job again.
/// So once written, the finished records are read (after the write, so a
/// job that had left `job/` before it is seen); if one exists, the write
/// is taken back on its version, and the finished record is returned. If a
/// worker leased the rewritten job first, the take-back fails and the job
/// runs once more (tasks are idempotent, and its finish rewrites the same
/// finished record); so it does when reading the finished records or the
/// take-back fails, and the error is returned. Returns the job's record
/// and whether this call wrote it and left it written.
pub async fn write_queued(db: &Db, job: &Job) -> AppResult<(Job, bool)> {
    let id = job.id;
    match db.cas(keys::job(id), 0, Some(job)).await? {
        Cas::Done { version, .. } => match finished(db, id).await? {
            None => Ok((job.clone(), true)),
            Some(done) => {
                let taken_back = matches!(
                    db.cas::<Job>(keys::job(id), version, None).await?,
                    Cas::Done { .. }
                );
                tracing::warn!(
                    job = id,
                    taken_back,
                    "a job was written again after it had finished; {}",
                    if taken_back {
                        "the write was taken back"
                    } else {
                        "a worker leased it first, so it runs once more"
                    }
                );
                Ok((done, false))
            }
        },
        // Written meanwhile by the other writer; a job leaves `job/` only
        // after its finished record is written, so it is found.
        Cas::Conflict => match status(db, id).await? {
            Some(j) => Ok((j, false)),
            None => Err(crate::error::AppError::Busy(format!(
                "job {id} is being written concurrently"
            ))),
        },
    }
}

/// Reads live jobs for a lease scan, starting at `q`'s cursor and wrapping
/// around once, until `want` due jobs are found or [`LEASE_SCAN_KEYS_MAX`]
/// keys were examined; leaves the cursor after the last key examined.
async fn scan_due(
    db: &Db,
    q: &Queue,
    want: usize,
) -> AppResult<Vec<(lmskv_client::KeyValue, Job)>> {
    let prefix = Bytes::from_static(keys::JOB);
    let table_end = keys::prefix_end(&prefix);
    let from = q
        .scan_from
        .lock()
        .expect("scan cursor")
        .clone()
        .unwrap_or_else(|| prefix.clone());
    // [from, end of job/) and then, when `from` is not the table's start,
    // [start of job/, from).
    let mut spans = vec![(from.clone(), table_end.clone())];
    if from != prefix {
        spans.push((prefix.clone(), from));
    }
    let now = Utc::now();
    let mut due = Vec::new();
    let mut examined = 0usize;
    let mut stopped_at: Option<Bytes> = None;
    'spans: for (start, end) in spans {
        // STRONG: the versions read are the CAS conditions of the leases.
        let mut opts = lmskv_client::ScanOptions {
            start,
            end,
            limit: LEASE_SCAN_MAX,
            consistency: ReadConsistency::Strong,
            ..Default::default()
        };
        loop {
            let page = db.client().scan(&opts).await?;
            for kv in page.kvs {
                examined += 1;
                let mut after = kv.key.to_vec();
                after.push(0);
                let after = Bytes::from(after);
                let job: Job = crate::db::decode(&kv.key, &kv.value)?;
                let ready = match job.state {
                    JobState::Queued => job.run_at <= now,
                    JobState::Running => job.lease_until.is_none_or(|t| t <= now),
                    JobState::Succeeded | JobState::Dead => false,
                };
                if ready {
                    due.push((kv, job));
                }
                if due.len() >= want || examined >= LEASE_SCAN_KEYS_MAX {
                    stopped_at = Some(after);
                    break 'spans;
                }
            }
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => continue 'spans,
            }
        }
    }
    // Stopped early: go on from there next time. Went all the way round:
    // start at the beginning.
    *q.scan_from.lock().expect("scan cursor") = stopped_at;
    Ok(due)
}

/// Leases up to `max` due jobs (queued and due, or running with an expired lease).
pub async fn lease(db: &Db, q: &Queue, max: usize) -> AppResult<Vec<Leased>> {
    // Twice as many as wanted: some leases are lost to other workers.
    let mut due = scan_due(db, q, max.saturating_mul(2).max(1)).await?;
    // Workers that scanned the same jobs try them in different orders, so
    // they rarely race for the same lease.
    due.shuffle(&mut rand::thread_rng());
    let now = Utc::now();
    let lease = chrono::Duration::from_std(q.settings.lease).unwrap_or_default();
    let mut out = Vec::new();
    for (kv, mut job) in due {
        if out.len() >= max {
            break;
        }
        job.state = JobState::Running;
        job.attempts += 1;
        job.lease_until = Some(now + lease);
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
pub fn backoff(settings: &JobSettings, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    settings
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_max)
}

/// Records a failed run: requeued with backoff, or dead-lettered when out
/// of attempts or the failure is permanent.
pub async fn fail(
    db: &Db,
    settings: &JobSettings,
    l: &Leased,
    error: &str,
    kind: Failure,
) -> AppResult<()> {
    let mut j = l.job.clone();
    j.last_error = Some(error.chars().take(JOB_ERROR_CHARS_MAX).collect());
    j.lease_until = None;
    if kind == Failure::Permanent || j.attempts >= settings.attempts_max {
        j.state = JobState::Dead;
        j.finished_at = Some(Utc::now());
        db.put(keys::job_dead(j.id), &j).await?;
        db.cas::<Job>(keys::job(j.id), l.version, None).await?;
    } else {
        j.state = JobState::Queued;
        j.run_at = Utc::now()
            + chrono::Duration::from_std(backoff(settings, j.attempts)).unwrap_or_default();
        db.cas(keys::job(j.id), l.version, Some(&j)).await?;
    }
    Ok(())
}

/// The current record of job `id`, wherever it is. The live record is
/// read first and the finished ones one after another only after its
/// answer: finishing writes the finished record before it deletes the live
/// one, so a job that finishes during this call is still found.
pub async fn status(db: &Db, id: u64) -> AppResult<Option<Job>> {
    // STRONG: a finished job must not appear to be still running.
    if let Some(j) = db
        .get::<Job>(keys::job(id), ReadConsistency::Strong)
        .await?
    {
        return Ok(Some(j.value));
    }
    finished(db, id).await
}

/// Job `id`'s finished record (`jobdone/`, then `jobdead/`), read STRONG.
async fn finished(db: &Db, id: u64) -> AppResult<Option<Job>> {
    for key in [keys::job_done(id), keys::job_dead(id)] {
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
        let s = JobSettings::default();
        assert_eq!(backoff(&s, 1), JOB_BACKOFF_BASE);
        assert_eq!(backoff(&s, 2), JOB_BACKOFF_BASE * 2);
        assert_eq!(backoff(&s, 3), JOB_BACKOFF_BASE * 4);
        assert_eq!(backoff(&s, 40), JOB_BACKOFF_MAX);
        let quick = JobSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            ..JobSettings::default()
        };
        assert_eq!(backoff(&quick, 2), Duration::from_millis(200));
        assert_eq!(backoff(&quick, 3), Duration::from_millis(300));
    }
}
