//! The repair task: re-derives the cross-range copies from the records they
//! mirror, so that a process dying between a write and its index write
//! leaves the indexes wrong only until the next pass.
//!
//! * `usercourse/<uid>/<cid>` must exist exactly for each `course/<cid>/m/<uid>`;
//! * `catalog/<cid>` must equal `course/<cid>/i`.
//!
//! Every fix is an idempotent put or delete, and an entry is only deleted
//! after a STRONG re-read shows its source is still gone, so a pass racing a
//! live enrollment does no harm.

use std::collections::BTreeMap;

use bytes::Bytes;
use lmskv_client::ReadConsistency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::{decode, Db, PREFIX_READ_MAX};
use crate::error::AppResult;
use crate::keys::{self, CourseKey};
use crate::model::{Course, Member, UserCourse};

/// What one pass changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct RepairReport {
    pub index_added: u64,
    pub index_removed: u64,
    pub catalog_updated: u64,
    pub catalog_removed: u64,
}

async fn scan_raw(db: &Db, prefix: &[u8]) -> AppResult<Vec<lmskv_client::KeyValue>> {
    let prefix = Bytes::copy_from_slice(prefix);
    let opts = lmskv_client::ScanOptions {
        start: prefix.clone(),
        end: keys::prefix_end(&prefix),
        limit: 1_000,
        consistency: ReadConsistency::Strong,
        ..Default::default()
    };
    Ok(db.client().scan_all(&opts, PREFIX_READ_MAX).await?)
}

/// One repair pass over all courses.
pub async fn repair_once(db: &Db) -> AppResult<RepairReport> {
    let mut report = RepairReport::default();
    let mut members: BTreeMap<(u64, u64), UserCourse> = BTreeMap::new();
    let mut courses: BTreeMap<u64, Course> = BTreeMap::new();
    for kv in scan_raw(db, keys::COURSE).await? {
        match keys::parse_course_key(&kv.key) {
            Some(CourseKey::Member { cid, uid }) => {
                let m: Member = decode(&kv.key, &kv.value)?;
                members.insert(
                    (uid, cid),
                    UserCourse {
                        course_id: cid,
                        role: m.role,
                    },
                );
            }
            Some(CourseKey::Info { cid }) => {
                courses.insert(cid, decode(&kv.key, &kv.value)?);
            }
            _ => {}
        }
    }
    let mut index: BTreeMap<(u64, u64), UserCourse> = BTreeMap::new();
    for kv in scan_raw(db, keys::USER_COURSE).await? {
        let rest = &kv.key[keys::USER_COURSE.len()..];
        if let (Some(uid), Some(cid)) = (keys::id_at(rest, 0), keys::id_at(rest, 9)) {
            index.insert((uid, cid), decode(&kv.key, &kv.value)?);
        }
    }
    for (&(uid, cid), want) in &members {
        if index.get(&(uid, cid)) != Some(want) {
            db.put(keys::user_course(uid, cid), want).await?;
            report.index_added += 1;
        }
    }
    for &(uid, cid) in index.keys() {
        if members.contains_key(&(uid, cid)) {
            continue;
        }
        let still_gone = db
            .get::<Member>(keys::member(cid, uid), ReadConsistency::Strong)
            .await?
            .is_none();
        if still_gone {
            db.delete(keys::user_course(uid, cid)).await?;
            report.index_removed += 1;
        }
    }
    let mut catalog: BTreeMap<u64, Course> = BTreeMap::new();
    for kv in scan_raw(db, keys::CATALOG).await? {
        if let Some(cid) = keys::id_at(&kv.key, keys::CATALOG.len()) {
            catalog.insert(cid, decode(&kv.key, &kv.value)?);
        }
    }
    for (cid, c) in &courses {
        if catalog.get(cid) != Some(c) {
            db.put(keys::catalog(*cid), c).await?;
            report.catalog_updated += 1;
        }
    }
    for cid in catalog.keys() {
        if !courses.contains_key(cid) {
            db.delete(keys::catalog(*cid)).await?;
            report.catalog_removed += 1;
        }
    }
    Ok(report)
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
