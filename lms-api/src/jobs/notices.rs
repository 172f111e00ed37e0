//! Grade notices: what the job a publish enqueues does. It notifies each
//! graded student of an assignment once per grade, however often the grades
//! are published.
//!
//! Each student's last notified grade is kept next to the submission, at
//! `course/<cid>/g/<aid>/<uid>` ([`GradeNotice`]): a digest of the score and
//! feedback, and the job that notifies it. A student whose notice is of the
//! current grade is skipped; otherwise the job claims the notice with a
//! compare-and-swap on the version it read, and only then writes the
//! notification (`notif/<uid>/<jid>`). So of two publish jobs running at
//! once, only one notifies a student of one grade.
//!
//! Claiming before notifying means a run can claim and die before the
//! notification is written: the claim names its job, and a rerun of that
//! job writes the notification again (same key: no duplicate). If the job
//! is dead-lettered instead, the next publish finds the claim's job dead and
//! its notification missing, and takes the claim over.
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

use crate::db::{decode, Cas, Db, Versioned, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult};
use crate::jobs::{self, JobState};
use crate::keys;
use crate::model::{Assignment, GradeContent, GradeNotice, Notification, SubmissionGrade};

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
            if let Some(g) = s.grade {
                graded.push((s.student_id, g));
            }
        }
        let notices: HashMap<Bytes, Versioned<GradeNotice>> = if graded.is_empty() {
            HashMap::new()
        } else {
            let keys = graded
                .iter()
                .map(|(uid, _)| keys::grade_notice(cid, a.id, *uid));
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
        let outcomes: Vec<bool> = futures::stream::iter(graded.into_iter().map(|(uid, g)| {
            let read = notices.get(&keys::grade_notice(cid, a.id, uid)).cloned();
            let owners = &owners;
            async move { notify_one(db, owners, jid, a, uid, &g, read).await }
        }))
        .buffer_unordered(NOTICE_WRITES_IN_FLIGHT)
        .try_collect()
        .await?;
        for notified in outcomes {
            if notified {
                report.notified += 1;
            } else {
                report.already += 1;
            }
        }
        match page.next_page_token {
            Some(t) => opts.page_token = t,
            None => return Ok(report),
        }
    }
}

/// Notifies student `uid` of `grade` unless they were notified of it;
/// `read` is their notice as last read. Whether it notified.
async fn notify_one(
    db: &Db,
    owners: &Owners,
    jid: u64,
    a: &Assignment,
    uid: u64,
    grade: &GradeContent,
    mut read: Option<Versioned<GradeNotice>>,
) -> AppResult<bool> {
    let key = keys::grade_notice(a.course_id, a.id, uid);
    let claim = GradeNotice::new(jid, grade);
    for _ in 0..CAS_ATTEMPTS_MAX {
        if let Some(n) = read.as_ref().filter(|n| n.value.is_of(grade)) {
            if n.value.job_id == jid {
                // Claimed by an earlier run of this job, which may have died
                // before notifying: the same notification again.
                write_notification(db, jid, a, uid).await?;
                return Ok(true);
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
                return Ok(false);
            }
        }
        let version = read.as_ref().map_or(0, |n| n.version);
        match db.cas(key.clone(), version, Some(&claim)).await? {
            Cas::Done { .. } => {
                write_notification(db, jid, a, uid).await?;
                return Ok(true);
            }
            // Claimed or changed meanwhile: decide again on what is there now.
            Cas::Conflict => read = db.get(key.clone(), ReadConsistency::Strong).await?,
        }
    }
    Err(AppError::Busy(format!(
        "student {uid}'s grade notice is being changed concurrently"
    )))
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
