//! The repair task: re-derives the cross-range copies from the records they
//! mirror, so that a process dying between a write and its index write
//! leaves the indexes wrong only until the next pass.
//!
//! * `usercourse/<uid>/<cid>` must exist exactly for each `course/<cid>/m/<uid>`;
//! * `catalog/<cid>` must equal `course/<cid>/i`;
//! * a grades publish left pending at `course/<cid>/p/<aid>` (its job was
//!   not written: the process died or the write failed after the publish
//!   committed) gets its notification job, with the id the publish
//!   allocated, and the pending record is deleted
//!   ([`crate::jobs::notices::enqueue_pending`]). Only records published
//!   [`REPAIR_PENDING_GRACE`] ago or earlier are taken up: a younger one is
//!   most likely a publish still under way, whose own process writes the
//!   job. Should both write it after all, [`crate::jobs::enqueue_as`]
//!   keeps a finished job from being queued again; in the narrowest of
//!   races the job runs twice (its notices are idempotent).
//!
//! A record the pass cannot repair (one that does not decode, a job it
//! could not write, a course whose repair failed) is logged and counted in
//! [`RepairReport::failed`], and the pass goes on with the rest; the next
//! pass tries it again.
//!
//! A pass walks the tables a page at a time ([`REPAIR_PAGE`] keys), so its
//! memory does not grow with the data: course by course (its record, its
//! members and its pending publishes, never its assignments or
//! submissions), then the index and
//! the catalogue, each page checked against its sources with one STRONG
//! batch read. Every fix is an idempotent put, or a compare-and-swap on the
//! version read; an entry is only deleted when a STRONG read taken after the
//! entry was read shows its source gone, and only if it is still the version
//! read, so a pass racing a live enrollment or course creation removes
//! nothing they wrote. (A pass can still re-add the index entry of a member
//! removed while it ran; the next pass removes it.)

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use lmskv_client::{KeyValue, ReadConsistency, ScanOptions};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::{decode, Cas, Db, CAS_ATTEMPTS_MAX};
use crate::error::{AppError, AppResult};
use crate::jobs::notices;
use crate::keys;
use crate::model::{Course, Member, PendingNotices, UserCourse};

/// Keys a pass reads per page (and per batch read).
pub const REPAIR_PAGE: usize = 1_000;
/// How old a pending publish must be (by its `published_at`) before the
/// repair task writes its job: far longer than a publish takes to write
/// its own job after committing (a request's time limit, 15 s by default),
/// plus room for clocks of API processes that are a little apart.
pub const REPAIR_PENDING_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// What one pass changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct RepairReport {
    pub index_added: u64,
    pub index_removed: u64,
    pub catalog_updated: u64,
    pub catalog_removed: u64,
    /// Grade notification jobs of publishes that had not written them.
    #[serde(default)]
    pub notices_enqueued: u64,
    /// Records or courses this pass could not repair (logged; the next
    /// pass tries them again).
    #[serde(default)]
    pub failed: u64,
}

/// A STRONG scan of `[start, end)`, read a page at a time.
struct Pages {
    opts: ScanOptions,
    done: bool,
}

impl Pages {
    fn new(prefix: Bytes, page: usize, keys_only: bool) -> Pages {
        Pages {
            opts: ScanOptions {
                end: keys::prefix_end(&prefix),
                start: prefix,
                limit: u32::try_from(page).unwrap_or(u32::MAX),
                keys_only,
                consistency: ReadConsistency::Strong,
                ..Default::default()
            },
            done: false,
        }
    }

    async fn next(&mut self, db: &Db) -> AppResult<Option<Vec<KeyValue>>> {
        if self.done {
            return Ok(None);
        }
        let p = db.client().scan(&self.opts).await?;
        match p.next_page_token {
            Some(t) => self.opts.page_token = t,
            None => self.done = true,
        }
        Ok(Some(p.kvs))
    }
}

/// The keys of `keys` that exist, with their versions and values, read STRONG.
async fn read_many(db: &Db, keys: Vec<Bytes>) -> AppResult<HashMap<Bytes, KeyValue>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found = db.client().batch_get(keys, ReadConsistency::Strong).await?;
    Ok(found.into_iter().map(|kv| (kv.key.clone(), kv)).collect())
}

/// Deletes a derived copy if it is still the version the pass read: one
/// written meanwhile (a new enrollment's entry) stays.
async fn remove(db: &Db, key: Bytes, version: u64) -> AppResult<bool> {
    Ok(matches!(
        db.cas::<UserCourse>(key, version, None).await?,
        Cas::Done { .. }
    ))
}

/// Deletes the copies under `table` whose source (`source_of` the copy's
/// key) is gone, a page at a time; returns how many it deleted.
async fn remove_orphans(
    db: &Db,
    table: &'static [u8],
    page: usize,
    source_of: impl Fn(&[u8]) -> Option<Bytes>,
) -> AppResult<u64> {
    let mut removed = 0;
    let mut pages = Pages::new(Bytes::from_static(table), page, true);
    while let Some(kvs) = pages.next(db).await? {
        let ids: Vec<(Bytes, u64, Bytes)> = kvs
            .into_iter()
            .filter_map(|kv| {
                let source = source_of(&kv.key)?;
                Some((kv.key, kv.version, source))
            })
            .collect();
        let sources = read_many(db, ids.iter().map(|(_, _, s)| s.clone()).collect()).await?;
        for (copy, version, source) in ids {
            if !sources.contains_key(&source) && remove(db, copy, version).await? {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// One repair pass over all courses.
pub async fn repair_once(db: &Db) -> AppResult<RepairReport> {
    repair_with_page(db, REPAIR_PAGE).await
}

/// [`repair_once`] reading `page` keys at a time (at least 1, at most
/// [`lmskv_client::BATCH_GET_KEYS_MAX`]).
pub async fn repair_with_page(db: &Db, page: usize) -> AppResult<RepairReport> {
    let page = page.clamp(1, lmskv_client::BATCH_GET_KEYS_MAX);
    let mut report = RepairReport::default();
    // Course by course: hop from one course's prefix to the next, reading
    // one key name each time.
    let courses_end = keys::prefix_end(keys::COURSE);
    let mut from = Bytes::from_static(keys::COURSE);
    loop {
        let next = db
            .client()
            .scan(&ScanOptions {
                start: from.clone(),
                end: courses_end.clone(),
                limit: 1,
                keys_only: true,
                consistency: ReadConsistency::Strong,
                ..Default::default()
            })
            .await?;
        let Some(kv) = next.kvs.first() else { break };
        let Some(cid) = keys::id_at(&kv.key, keys::COURSE.len()) else {
            // Not a course key (shorter than an id): step past it.
            let mut k = kv.key.to_vec();
            k.push(0);
            from = Bytes::from(k);
            continue;
        };
        // One course that cannot be repaired does not hold up the others,
        // nor the index and catalogue cleanup below.
        if let Err(e) = repair_course(db, cid, page, &mut report).await {
            tracing::warn!(course = cid, error = %e, "repair of a course failed; the next pass tries again");
            report.failed += 1;
        }
        from = keys::prefix_end(&keys::course_prefix(cid));
    }
    // Index entries whose enrollment is gone: the membership is read after
    // the entry, and an enrollment writes its membership before its entry.
    report.index_removed = remove_orphans(db, keys::USER_COURSE, page, |key| {
        let rest = &key[keys::USER_COURSE.len()..];
        Some(keys::member(keys::id_at(rest, 9)?, keys::id_at(rest, 0)?))
    })
    .await?;
    // Catalogue entries whose course is gone: the course is read after the
    // entry, and a new course is written before its entry.
    report.catalog_removed = remove_orphans(db, keys::CATALOG, page, |key| {
        Some(keys::course(keys::id_at(key, keys::CATALOG.len())?))
    })
    .await?;
    Ok(report)
}

/// Writes course `cid`'s catalogue entry from the course if they differ;
/// whether it wrote. Every writer of the entry goes through here (course
/// creation and edits too), so the entry ends as the latest course: the
/// entry is read before the course, and the write is conditional on the
/// entry's version, so of two edits racing here an older course can only
/// land before the newer one's write, never after it (a lost race reads
/// both again).
pub async fn sync_catalog(db: &Db, cid: u64) -> AppResult<bool> {
    for attempt in 0..CAS_ATTEMPTS_MAX {
        crate::db::cas_pause(attempt).await;
        let entry = db
            .get::<Course>(keys::catalog(cid), ReadConsistency::Strong)
            .await?;
        let Some(course) = db
            .get::<Course>(keys::course(cid), ReadConsistency::Strong)
            .await?
        else {
            return Ok(false);
        };
        if entry.as_ref().map(|e| &e.value) == Some(&course.value) {
            return Ok(false);
        }
        let version = entry.as_ref().map_or(0, |e| e.version);
        if let Cas::Done { .. } = db
            .cas(keys::catalog(cid), version, Some(&course.value))
            .await?
        {
            return Ok(true);
        }
    }
    Err(AppError::Busy(format!(
        "course {cid}'s catalogue entry is being changed concurrently"
    )))
}

/// Brings one course's catalogue entry and its members' index entries in
/// line with the course.
async fn repair_course(db: &Db, cid: u64, page: usize, report: &mut RepairReport) -> AppResult<()> {
    // The course's pending publishes first: a member record this version
    // cannot read (or a failed index write) below must not keep a publish
    // that committed from ever getting its notice job.
    repair_pending_of_course(db, cid, page, report).await?;
    if sync_catalog(db, cid).await? {
        report.catalog_updated += 1;
    }
    let mut pages = Pages::new(keys::members(cid), page, false);
    while let Some(kvs) = pages.next(db).await? {
        let mut want: BTreeMap<Bytes, UserCourse> = BTreeMap::new();
        for kv in kvs {
            if let Some(keys::CourseKey::Member { cid, uid }) = keys::parse_course_key(&kv.key) {
                let m: Member = decode(&kv.key, &kv.value)?;
                want.insert(
                    keys::user_course(uid, cid),
                    UserCourse {
                        course_id: cid,
                        role: m.role,
                    },
                );
            }
        }
        let have = read_many(db, want.keys().cloned().collect()).await?;
        for (key, entry) in want {
            let current = have
                .get(&key)
                .map(|kv| decode::<UserCourse>(&kv.key, &kv.value))
                .transpose()?;
            if current.as_ref() != Some(&entry) {
                db.put(key, &entry).await?;
                report.index_added += 1;
            }
        }
    }
    Ok(())
}

/// Writes the notice jobs of course `cid`'s pending publishes that are old
/// enough; one that cannot be repaired is logged and counted.
async fn repair_pending_of_course(
    db: &Db,
    cid: u64,
    page: usize,
    report: &mut RepairReport,
) -> AppResult<()> {
    let prefix = keys::pending_notices_of(cid);
    let mut pages = Pages::new(prefix.clone(), page, false);
    while let Some(kvs) = pages.next(db).await? {
        for kv in kvs {
            let Some(aid) = keys::id_at(&kv.key, prefix.len()) else {
                continue;
            };
            // One bad record is logged and counted; the others still go.
            match repair_pending(db, cid, aid, &kv, Utc::now()).await {
                Ok(Some(job)) => {
                    tracing::info!(
                        course = cid,
                        assignment = aid,
                        job = job.id,
                        "repair: enqueued the grade notices of a publish that had not"
                    );
                    report.notices_enqueued += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(course = cid, assignment = aid, error = %e,
                        "repair of a pending publish failed; the next pass tries again");
                    report.failed += 1;
                }
            }
        }
    }
    Ok(())
}

/// Writes the job of the pending publish `kv` (of assignment `aid` of
/// course `cid`) if it is at least [`REPAIR_PENDING_GRACE`] old at `now`;
/// the job if this call wrote it.
async fn repair_pending(
    db: &Db,
    cid: u64,
    aid: u64,
    kv: &KeyValue,
    now: DateTime<Utc>,
) -> AppResult<Option<crate::jobs::Job>> {
    let pending: PendingNotices = decode(&kv.key, &kv.value)?;
    if !pending_due(&pending, now) {
        return Ok(None);
    }
    let (job, wrote) = notices::enqueue_pending(db, cid, aid, &pending).await?;
    Ok(wrote.then_some(job))
}

/// Whether `pending` is old enough at `now` for the repair task to write
/// its job ([`REPAIR_PENDING_GRACE`]).
fn pending_due(pending: &PendingNotices, now: DateTime<Utc>) -> bool {
    chrono::Duration::from_std(REPAIR_PENDING_GRACE)
        .ok()
        .and_then(|g| pending.published_at.checked_add_signed(g))
        .is_none_or(|due| due <= now)
}

/// Runs a pass every `interval` until the process ends.
pub async fn run(st: crate::app::AppState, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match repair_once(&st.db).await {
            Ok(r) if r != RepairReport::default() => {
                tracing::info!(?r, "index repair fixed entries")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "index repair pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_publish_is_left_to_its_process_for_the_grace() {
        let now = Utc::now();
        let at = |secs_ago: i64| PendingNotices {
            job_id: 3,
            created_by: 1,
            published_at: now - chrono::Duration::seconds(secs_ago),
        };
        assert!(!pending_due(&at(0), now));
        assert!(!pending_due(&at(60), now));
        assert!(!pending_due(&at(-600), now), "published in the future");
        assert!(pending_due(&at(300), now));
        assert!(pending_due(&at(3600), now));
    }
}
