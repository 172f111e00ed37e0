//! Grade notices: what the job a publish enqueues does. It notifies each
//! graded student of an assignment once per grade, however often the grades
//! are published.
//!
//! Each student's last notified grade is kept next to the submission, at
//! `course/<cid>/g/<aid>/<uid>` ([`GradeNotice`]): a digest of the score and
//! feedback, and the job that notifies it. A student whose notice is of the
//! current grade is skipped; otherwise the job claims the notice, and only
//! then writes the notification (`notif/<uid>/<jid>`). The claim is one
//! atomic batch (both keys are in the course's row) conditional on the
//! notice's version *and* the submission's: a job whose read of the grade
//! is stale (regraded since, and perhaps notified by a later publish) cannot
//! claim the old grade over a newer notice; it reads both again and decides
//! on the current grade. So of two publish jobs running at once, only one
//! notifies a student of one grade, and a notice never goes back to an
//! older grade.
//!
//! Claiming before notifying means a run can claim and die before the
//! notification is written: the claim names its job, and a rerun of that
//! job writes the notification again (same key: no duplicate). If the job
//! is dead-lettered instead, the next publish finds the claim's job dead and
//! its notification missing, and takes the claim over.
//!
//! A publish commits the assignment's `grades_published` together with a
//! [`PendingNotices`] record naming the job's id (allocated first), then
//! writes the job and deletes the record ([`publish`],
//! [`enqueue_pending`]). If the job's write fails or the process dies in
//! between, the record is left, and the repair task writes the job
//! ([`crate::repair`]): a committed publish always gets its notices.
//!
//! Submissions are read a page at a time ([`NOTICE_PAGE`]) with their
//! notices (one batch read per page), and at most
//! [`NOTICE_WRITES_IN_FLIGHT`] students are notified at once. Every read is
//! STRONG: the versions read are the conditions of the claims.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use lmskv_client::{ReadConsistency, ScanOptions};

use lmskv_client::BatchOp;

use crate::db::{decode, derived, encode, Cas, Db, Versioned, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult};
use crate::jobs::{self, Job, JobKind, JobState};
use crate::keys;
use crate::model::{
    Assignment, GradeContent, GradeNotice, Notification, PendingNotices, SubmissionGrade,
};

/// Submissions read per page.
pub const NOTICE_PAGE: u32 = 256;
/// Students notified at once.
pub const NOTICE_WRITES_IN_FLIGHT: usize = 16;

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoticeReport {
    /// Students notified (or notified again by a rerun of the same job).
    pub notified: u64,
    /// Graded students already notified of their grade.
    pub already: u64,
    /// Students graded when read whose grade was gone when claimed.
    pub ungraded: u64,
}

/// What became of one student.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Notified of their current grade (or notified again by a rerun of
    /// the same job).
    Notified,
    /// Already notified of their current grade (or another job that is
    /// not gone claimed it).
    Already,
    /// Their submission had no grade (or was gone) when read again.
    Ungraded,
}

/// A graded submission as a run read it: its student, grade and version
/// (the version is a condition of the claim).
#[derive(Debug, Clone)]
pub struct Graded {
    pub student_id: u64,
    pub grade: GradeContent,
    pub version: u64,
}

/// Whether the jobs named by claims are gone (dead-lettered, or no record):
/// their claims may lack a notification and no run of theirs will write it.
/// Asked once per job and run.
#[derive(Default)]
struct Owners(Mutex<HashMap<u64, bool>>);

impl Owners {
    async fn gone(&self, db: &Db, jid: u64) -> AppResult<bool> {
        if let Some(g) = self.0.lock().expect("owners").get(&jid) {
            return Ok(*g);
        }
        // A queued or running job runs again; a succeeded one wrote every
        // notification it claimed (a run succeeds only after all of them).
        let gone = jobs::status(db, jid)
            .await?
            .is_none_or(|j| j.state == JobState::Dead);
        self.0.lock().expect("owners").insert(jid, gone);
        Ok(gone)
    }
}

/// Publishes the grades of assignment `aid` of course `cid` for `by`:
/// allocates the notification job's id, then sets `grades_published` and
/// writes the [`PendingNotices`] naming that job in one batch. The job
/// itself is written by [`enqueue_pending`]. Returns the assignment as
/// published and the pending record.
pub async fn publish(
    db: &Db,
    cid: u64,
    aid: u64,
    by: u64,
) -> AppResult<(Assignment, PendingNotices)> {
    let key = keys::assignment(cid, aid);
    // Before anything is committed: a failure here leaves nothing behind.
    let job_id = db.next_id("job").await?;
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        let cur = db
            .get::<Assignment>(key.clone(), ReadConsistency::Strong)
            .await?
            .ok_or(AppError::NotFound("assignment"))?;
        let mut a = cur.value;
        a.grades_published = true;
        a.updated_at = Utc::now();
        let pending = PendingNotices {
            job_id,
            created_by: by,
            published_at: a.updated_at,
        };
        let ops = vec![
            BatchOp::Put(key.clone(), encode(&a)?),
            BatchOp::Put(keys::pending_notices(cid, aid), encode(&pending)?),
        ];
        if let Cas::Done { .. } = db.batch(vec![(key.clone(), cur.version)], ops).await? {
            return Ok((a, pending));
        }
    }
    Err(AppError::Busy(
        "the assignment is being changed concurrently".into(),
    ))
}

/// Writes the notification job `pending` names for assignment `aid` of
/// course `cid` (unless it exists), then deletes `pending`: the job now
/// exists. Returns the job and whether this call wrote it. A failure to
/// delete the record is only logged; the repair task finds the job and
/// deletes it.
pub async fn enqueue_pending(
    db: &Db,
    cid: u64,
    aid: u64,
    pending: &PendingNotices,
) -> AppResult<(Job, bool)> {
    let kind = JobKind::GradeNotifications {
        course_id: cid,
        assignment_id: aid,
    };
    let out = jobs::enqueue_as(db, pending.job_id, kind, pending.created_by).await?;
    derived(
        "pending grade notices",
        clear_pending(db, cid, aid, pending.job_id).await,
    );
    Ok(out)
}

/// Deletes the pending record of assignment `aid` if it still names job
/// `job_id` (a later publish's record, naming its own job, stays).
async fn clear_pending(db: &Db, cid: u64, aid: u64, job_id: u64) -> AppResult<bool> {
    let key = keys::pending_notices(cid, aid);
    match db
        .get::<PendingNotices>(key.clone(), ReadConsistency::Strong)
        .await?
    {
        Some(p) if p.value.job_id == job_id => db.delete_if_version(key, p.version).await,
        _ => Ok(false),
    }
}

/// Notifies the graded students of assignment `a` (job `jid`).
pub async fn notify_graded(db: &Db, jid: u64, a: &Assignment) -> AppResult<NoticeReport> {
    let cid = a.course_id;
    let prefix = keys::submissions_of(cid, a.id);
    let mut opts = ScanOptions {
        end: keys::prefix_end(&prefix),
        start: prefix,
        limit: NOTICE_PAGE,
        consistency: ReadConsistency::Strong,
        ..Default::default()
    };
    let owners = Owners::default();
    let mut report = NoticeReport::default();
    loop {
        let page = db.client().scan(&opts).await?;
        let mut graded = Vec::new();
        for kv in &page.kvs {
            let s: SubmissionGrade = decode(&kv.key, &kv.value)?;
            if let Some(grade) = s.grade {
                graded.push(Graded {
                    student_id: s.student_id,
                    grade,
                    version: kv.version,
                });
            }
        }
        let notices: HashMap<Bytes, Versioned<GradeNotice>> = if graded.is_empty() {
            HashMap::new()
        } else {
            let keys = graded
                .iter()
                .map(|g| keys::grade_notice(cid, a.id, g.student_id));
            db.client()
                .batch_get(keys, ReadConsistency::Strong)
                .await?
                .into_iter()
                .map(|kv| {
                    let value = decode(&kv.key, &kv.value)?;
                    Ok((
                        kv.key,
                        Versioned {
                            value,
                            version: kv.version,
                        },
                    ))
                })
                .collect::<AppResult<_>>()?
        };
        let outcomes: Vec<Outcome> = futures::stream::iter(graded.into_iter().map(|g| {
            let read = notices
                .get(&keys::grade_notice(cid, a.id, g.student_id))
                .cloned();
            let owners = &owners;
            async move { notify_one(db, owners, jid, a, g, read).await }
        }))
        .buffer_unordered(NOTICE_WRITES_IN_FLIGHT)
        .try_collect()
        .await?;
        for o in outcomes {
            match o {
                Outcome::Notified => report.notified += 1,
                Outcome::Already => report.already += 1,
                Outcome::Ungraded => report.ungraded += 1,
            }
        }
        match page.next_page_token {
            Some(t) => opts.page_token = t,
            None => return Ok(report),
        }
    }
}

/// Notifies one student as a run of job `jid` does, given their graded
/// submission `read` and their notice `notice` as the run read them (either
/// may be stale by now). A run asks [`jobs::status`] about each claim's job
/// once; this asks anew.
pub async fn notify_student(
    db: &Db,
    jid: u64,
    a: &Assignment,
    read: Graded,
    notice: Option<Versioned<GradeNotice>>,
) -> AppResult<Outcome> {
    notify_one(db, &Owners::default(), jid, a, read, notice).await
}

/// Notifies the student of `read` of their current grade unless they were
/// notified of it; `read` is their submission and `notice` their notice as
/// last read.
async fn notify_one(
    db: &Db,
    owners: &Owners,
    jid: u64,
    a: &Assignment,
    read: Graded,
    mut notice: Option<Versioned<GradeNotice>>,
) -> AppResult<Outcome> {
    let uid = read.student_id;
    let skey = keys::submission(a.course_id, a.id, uid);
    let key = keys::grade_notice(a.course_id, a.id, uid);
    // The grade as last read, and the submission's version then.
    let (mut grade, mut sversion) = (Some(read.grade), read.version);
    for attempt in 0..CAS_ATTEMPTS_MAX {
        let Some(current) = grade.as_ref() else {
            return Ok(Outcome::Ungraded);
        };
        if let Some(n) = notice.as_ref().filter(|n| n.value.is_of(current)) {
            if n.value.job_id == jid {
                // Claimed by an earlier run of this job, which may have died
                // before notifying: the same notification again.
                write_notification(db, jid, a, uid).await?;
                return Ok(Outcome::Notified);
            }
            // Another job's claim: it notified, or will when it runs again,
            // unless it is gone without having written the notification.
            if !owners.gone(db, n.value.job_id).await?
                || db
                    .client()
                    .get(
                        keys::notification(uid, n.value.job_id),
                        ReadConsistency::Strong,
                    )
                    .await?
                    .is_some()
            {
                return Ok(Outcome::Already);
            }
        }
        // The claim holds only if neither the notice nor the submission
        // changed since they were read: a grade read before a regrade must
        // not replace the notice of the newer grade (a later publish may
        // have notified it already).
        let nversion = notice.as_ref().map_or(0, |n| n.version);
        let claim = encode(&GradeNotice::new(jid, current))?;
        match db
            .batch(
                vec![(skey.clone(), sversion), (key.clone(), nversion)],
                vec![BatchOp::Put(key.clone(), claim)],
            )
            .await?
        {
            Cas::Done { .. } => {
                write_notification(db, jid, a, uid).await?;
                return Ok(Outcome::Notified);
            }
            Cas::Conflict => {
                // Regraded, or claimed or changed meanwhile: read both again
                // (after the pause, so the next try writes on fresh reads)
                // and decide on what is there now.
                crate::db::cas_pause(attempt + 1).await;
                (grade, sversion, notice) = read_again(db, &skey, &key).await?;
            }
        }
    }
    Err(AppError::Busy(format!(
        "student {uid}'s grade notice is being changed concurrently"
    )))
}

/// The submission's grade and version (0: absent) and the notice at
/// `skey` and `key`, read STRONG (their versions are the next claim's
/// conditions).
async fn read_again(
    db: &Db,
    skey: &Bytes,
    key: &Bytes,
) -> AppResult<(Option<GradeContent>, u64, Option<Versioned<GradeNotice>>)> {
    let (mut grade, mut sversion, mut notice) = (None, 0, None);
    for kv in db
        .client()
        .batch_get([skey.clone(), key.clone()], ReadConsistency::Strong)
        .await?
    {
        if kv.key == *skey {
            grade = decode::<SubmissionGrade>(&kv.key, &kv.value)?.grade;
            sversion = kv.version;
        } else if kv.key == *key {
            notice = Some(Versioned {
                value: decode(&kv.key, &kv.value)?,
                version: kv.version,
            });
        }
    }
    Ok((grade, sversion, notice))
}

/// Writes job `jid`'s notification for `uid`; the key is fixed per
/// (student, job), so writing it again overwrites rather than duplicates.
async fn write_notification(db: &Db, jid: u64, a: &Assignment, uid: u64) -> AppResult<()> {
    let n = Notification {
        id: jid,
        user_id: uid,
        message: format!("Grades for \"{}\" are published.", a.title),
        course_id: a.course_id,
        assignment_id: Some(a.id),
        created_at: Utc::now(),
    };
    db.put(keys::notification(uid, jid), &n).await?;
    Ok(())
}
