//! The retention sweep: deletes records that have outlived their use, so
//! that storage does not grow without bound.
//!
//! | table                   | deleted when                                          |
//! |-------------------------|-------------------------------------------------------|
//! | `refresh/<hash>`        | `expires_at` + [`REFRESH_EXPIRY_GRACE`] has passed     |
//! | `jobdone/`, `jobdead/`  | `finished_at` + `--job-retention-s` has passed         |
//! | `export/<jid>`          | with its job's record, or once no record of the job is left |
//! | `notif/<uid>/<nid>`     | `created_at` + `--notification-retention-s` has passed |
//!
//! Live jobs (`job/`) are never touched: a queued or running job is not
//! finished, whatever its age. A used refresh token is deleted when it is
//! used; an expired one is useless (refresh refuses it), and the grace only
//! keeps the sweep clear of clocks that differ a little between processes.
//!
//! The sweep walks every table once per interval, a page at a time
//! ([`SweepLimits`]: keys per page, pages and deletes per table and
//! round). A table whose walk does not finish in one round is taken up
//! where it stopped by the next round, which comes after
//! [`SWEEP_BACKLOG_PAUSE`] ([`SweepReport::backlog`]); a table whose walk
//! finished is not walked again until every table's walk has finished and
//! the full interval has passed. So a record is deleted at most one
//! interval plus one walk of its table after it is due, and a round reads
//! at most [`SweepLimits`] of each table. A round in which a table's walk
//! failed waits the full interval (a failing cluster is not swept harder).
//! Every read is STRONG and every delete is a
//! compare-and-delete on the version read: several API processes may sweep
//! at once (one of them wins each delete, the others find it gone), and a
//! record rewritten after it was read (a rerun job writing its notification
//! or result again) stays.
//!
//! Records point at each other in two places, and both tolerate a deleted
//! target. A finished job's export is deleted right after the job's record,
//! on the export's version read then (a sweep that dies in between, or an
//! export rewritten in between, leaves an export no job names; the walk of
//! `export/` deletes those). An export is deleted by that walk only when no
//! record of its job is left, and the walk reads the live record `job/<jid>`
//! first and the finished ones (`jobdone/`, `jobdead/`) only after that
//! answer: finishing a job writes its finished record before it deletes the
//! live one, so a job that finishes while the walk reads is seen in one or
//! the other (`orphan_exports`). A grade notice (`course/<cid>/g/…`) names the
//! job that notified it and so the notification `notif/<uid>/<jid>`: once
//! both the job's record and the notification are gone, the next publish
//! of that grade notifies the student again
//! ([`crate::jobs::notices`]), which is the right outcome for a student
//! whose notification has expired.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::StreamExt;
use lmskv_client::{KeyValue, ReadConsistency, ScanOptions};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::Db;
use crate::error::{AppError, AppResult};
use crate::keys;

/// How long after its expiry a refresh token's record is kept: room for
/// clocks of API processes that are a little apart.
pub const REFRESH_EXPIRY_GRACE: Duration = Duration::from_secs(300);
/// How long finished jobs and their results are kept, unless configured
/// otherwise.
pub const JOB_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long notifications are kept, unless configured otherwise.
pub const NOTIFICATION_RETENTION_DEFAULT: Duration = Duration::from_secs(90 * 24 * 3600);
/// Time between sweep rounds, unless configured otherwise.
pub const RETENTION_INTERVAL_DEFAULT: Duration = Duration::from_secs(3600);
/// Shortest retention accepted: a job's result must stay long enough to be
/// fetched, a notification long enough to be read.
pub const RETENTION_MIN: Duration = Duration::from_secs(3600);
/// Longest retention accepted (ten years).
pub const RETENTION_MAX: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Longest time between rounds accepted.
pub const RETENTION_INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);
/// Pause before the next round when a round stopped at its bounds with
/// work left.
pub const SWEEP_BACKLOG_PAUSE: Duration = Duration::from_secs(5);
/// Deletes one round sends at once.
pub const SWEEP_DELETES_IN_FLIGHT: usize = 8;

/// How long records are kept and how often the sweep runs
/// (`--retention-interval-s`, `--job-retention-s`,
/// `--notification-retention-s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Time between rounds; `None`: no sweep in this process.
    pub interval: Option<Duration>,
    /// Finished and dead-lettered jobs, and their results.
    pub jobs: Duration,
    /// Notifications.
    pub notifications: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            interval: Some(RETENTION_INTERVAL_DEFAULT),
            jobs: JOB_RETENTION_DEFAULT,
            notifications: NOTIFICATION_RETENTION_DEFAULT,
        }
    }
}

impl RetentionSettings {
    /// Checks every value against its limits.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (flag, v) in [
            ("--job-retention-s", self.jobs),
            ("--notification-retention-s", self.notifications),
        ] {
            if !(RETENTION_MIN..=RETENTION_MAX).contains(&v) {
                anyhow::bail!(
                    "{flag} must be between {} (1 hour) and {} (10 years), not {}",
                    RETENTION_MIN.as_secs(),
                    RETENTION_MAX.as_secs(),
                    v.as_secs()
                );
            }
        }
        if let Some(i) = self.interval {
            if i.is_zero() || i > RETENTION_INTERVAL_MAX {
                anyhow::bail!(
                    "--retention-interval-s must be between 1 and {} (0 turns the sweep off), not {}",
                    RETENTION_INTERVAL_MAX.as_secs(),
                    i.as_secs()
                );
            }
        }
        Ok(())
    }
}

/// The work one round does at most, per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepLimits {
    /// Keys read per page.
    pub page: u32,
    /// Pages read per table and round.
    pub pages: usize,
    /// Records deleted per table and round.
    pub deletes: usize,
}

impl Default for SweepLimits {
    fn default() -> Self {
        SweepLimits {
            page: 256,
            pages: 16,
            deletes: 512,
        }
    }
}

/// What one round deleted.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SweepReport {
    pub refresh_tokens: u64,
    pub jobs_done: u64,
    pub jobs_dead: u64,
    pub exports: u64,
    pub notifications: u64,
    /// Records due for deletion that changed or went before this round's
    /// delete (another process swept them, or they were rewritten).
    pub skipped: u64,
    /// Whether some table's walk is unfinished (at the round's bounds, or
    /// because its walk failed): the next round goes on where it stopped.
    pub more: bool,
    /// Whether the next round comes after [`SWEEP_BACKLOG_PAUSE`] instead
    /// of the full interval: some table's walk is unfinished and no walk
    /// failed in this round.
    #[serde(default)]
    pub backlog: bool,
}

impl SweepReport {
    /// Records deleted in all.
    pub fn deleted(&self) -> u64 {
        self.refresh_tokens + self.jobs_done + self.jobs_dead + self.exports + self.notifications
    }
}

/// The tables a round walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    Refresh,
    JobDone,
    JobDead,
    Export,
    Notification,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Refresh,
        Table::JobDone,
        Table::JobDead,
        Table::Export,
        Table::Notification,
    ];

    fn prefix(self) -> &'static [u8] {
        match self {
            Table::Refresh => keys::REFRESH,
            Table::JobDone => keys::JOB_DONE,
            Table::JobDead => keys::JOB_DEAD,
            Table::Export => keys::EXPORT,
            Table::Notification => keys::NOTIF,
        }
    }
}

/// What the sweep reads of a refresh token.
#[derive(Deserialize)]
struct RefreshTimes {
    expires_at: DateTime<Utc>,
}

/// What the sweep reads of a finished job: only its state and times, so a
/// job kind this version does not know is no obstacle.
#[derive(Deserialize)]
struct JobTimes {
    state: String,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// What the sweep reads of a notification.
#[derive(Deserialize)]
struct NotificationTimes {
    created_at: DateTime<Utc>,
}

/// `since + keep` has passed at `now`.
fn past(since: DateTime<Utc>, keep: Duration, now: DateTime<Utc>) -> bool {
    match chrono::Duration::from_std(keep) {
        Ok(keep) => since
            .checked_add_signed(keep)
            .is_some_and(|until| until < now),
        Err(_) => false,
    }
}

/// Whether the record `kv` of `table` is due for deletion at `now`. A
/// record that does not decode is kept (a newer version may have written
/// it); an export is decided by its job (`orphan_exports`).
fn due(table: Table, kv: &KeyValue, s: &RetentionSettings, now: DateTime<Utc>) -> bool {
    let decoded = match table {
        Table::Refresh => serde_json::from_slice::<RefreshTimes>(&kv.value)
            .map(|t| past(t.expires_at, REFRESH_EXPIRY_GRACE, now)),
        Table::JobDone | Table::JobDead => serde_json::from_slice::<JobTimes>(&kv.value).map(|j| {
            let finished = matches!(j.state.as_str(), "succeeded" | "dead");
            finished && past(j.finished_at.unwrap_or(j.created_at), s.jobs, now)
        }),
        Table::Notification => serde_json::from_slice::<NotificationTimes>(&kv.value)
            .map(|n| past(n.created_at, s.notifications, now)),
        Table::Export => Ok(false),
    };
    decoded.unwrap_or_else(|e| {
        tracing::warn!(key = %kv.key.escape_ascii(), error = %e, "retention: record not understood; kept");
        false
    })
}

/// The job id at the end of a `jobdone/`, `jobdead/` or `export/` key.
fn job_id(table: Table, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(table.prefix())?;
    (rest.len() == 8).then(|| keys::id_at(rest, 0)).flatten()
}

/// A hook a round calls with the records it is about to delete, after
/// reading them and before deleting any ([`Sweeper::set_before_delete`]).
pub type BeforeDelete = Arc<dyn Fn(Vec<KeyValue>) -> BoxFuture<'static, ()> + Send + Sync>;

/// One process's sweep: its settings, bounds and where each table's walk
/// goes on in the next round.
pub struct Sweeper {
    pub settings: RetentionSettings,
    pub limits: SweepLimits,
    /// The first key of each table the next round reads (absent: the
    /// table's start).
    resume: HashMap<Table, Bytes>,
    /// The tables whose walk finished since the last time every table's
    /// did: the rounds until then walk only the others.
    walked: HashSet<Table>,
    /// Tests only: runs between a round's reads and its deletes.
    before_delete: Option<BeforeDelete>,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("settings", &self.settings)
            .field("limits", &self.limits)
            .field("resume", &self.resume)
            .field("before_delete", &self.before_delete.is_some())
            .finish()
    }
}

impl Sweeper {
    /// A sweeper with these settings and the default bounds.
    pub fn new(settings: RetentionSettings) -> Sweeper {
        Sweeper::with_limits(settings, SweepLimits::default())
    }

    /// A sweeper with these settings and bounds (each at least 1).
    pub fn with_limits(settings: RetentionSettings, limits: SweepLimits) -> Sweeper {
        let limits = SweepLimits {
            page: limits
                .page
                .clamp(1, lmskv_client::BATCH_GET_KEYS_MAX as u32 / 3),
            pages: limits.pages.max(1),
            deletes: limits.deletes.max(1),
        };
        Sweeper {
            settings,
            limits,
            resume: HashMap::new(),
            walked: HashSet::new(),
            before_delete: None,
        }
    }

    /// For tests: `hook` runs with the records each batch of deletes is
    /// about to delete, after the round read them and before it deletes
    /// any, so a test can change a record in between.
    #[doc(hidden)]
    pub fn set_before_delete(&mut self, hook: BeforeDelete) {
        self.before_delete = Some(hook);
    }

    /// One round over every table whose walk has not finished since the
    /// last time every table's did, deciding by the clock `now`. A table
    /// whose walk fails is logged and taken up again next round (after the
    /// full interval: a failing cluster is not swept harder); the others
    /// still run.
    pub async fn round(&mut self, db: &Db, now: DateTime<Utc>) -> SweepReport {
        let mut report = SweepReport::default();
        let mut failed = false;
        for table in Table::ALL {
            if self.walked.contains(&table) {
                continue;
            }
            match self.sweep_table(db, table, now, &mut report).await {
                Ok(true) => {
                    self.walked.insert(table);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(table = %String::from_utf8_lossy(table.prefix()), error = %e,
                        "retention sweep of a table failed; it goes on next round");
                    failed = true;
                }
            }
        }
        if self.walked.len() == Table::ALL.len() {
            // Every table walked to its end: the next round starts over,
            // after the full interval.
            self.walked.clear();
        } else {
            report.more = true;
            report.backlog = !failed;
        }
        report
    }

    /// Walks `table` from where the last round stopped, within the bounds;
    /// whether the walk reached the table's end.
    async fn sweep_table(
        &mut self,
        db: &Db,
        table: Table,
        now: DateTime<Utc>,
        report: &mut SweepReport,
    ) -> AppResult<bool> {
        let prefix = Bytes::from_static(table.prefix());
        let start = self.resume.get(&table).cloned().unwrap_or(prefix.clone());
        let mut opts = ScanOptions {
            end: keys::prefix_end(&prefix),
            start: start.clone(),
            limit: self.limits.page,
            // Exports are decided by their job's records, not their bytes.
            keys_only: table == Table::Export,
            // The versions read are the conditions of the deletes.
            consistency: ReadConsistency::Strong,
            ..Default::default()
        };
        let mut deletes_left = self.limits.deletes;
        let mut next_start = start;
        for _ in 0..self.limits.pages {
            let page = db.client().scan(&opts).await?;
            if let Some(kv) = page.kvs.last() {
                next_start = successor(&kv.key);
            }
            let mut candidates: Vec<KeyValue> = if table == Table::Export {
                let read = |keys: Vec<Bytes>| async move {
                    Ok(db.client().batch_get(keys, ReadConsistency::Strong).await?)
                };
                orphan_exports(read, page.kvs).await?
            } else {
                page.kvs
                    .into_iter()
                    .filter(|kv| due(table, kv, &self.settings, now))
                    .collect()
            };
            // Past the round's deletes: stop at the first record not
            // deleted, and start there next round.
            let stop_at = (candidates.len() > deletes_left).then(|| {
                let rest = candidates.split_off(deletes_left);
                rest[0].key.clone()
            });
            deletes_left -= candidates.len();
            self.delete(db, table, candidates, report).await?;
            if let Some(k) = stop_at {
                self.resume.insert(table, k);
                return Ok(false);
            }
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => {
                    // The whole table: its next walk starts over.
                    self.resume.remove(&table);
                    return Ok(true);
                }
            }
        }
        // Out of pages for this round: the next round goes on from here.
        self.resume.insert(table, next_start);
        Ok(false)
    }

    /// Deletes `due` records of `table`, each only if still the version read.
    async fn delete(
        &self,
        db: &Db,
        table: Table,
        due: Vec<KeyValue>,
        report: &mut SweepReport,
    ) -> AppResult<()> {
        if due.is_empty() {
            return Ok(());
        }
        if let Some(hook) = &self.before_delete {
            hook(due.clone()).await;
        }
        let outcomes: Vec<AppResult<(bool, bool)>> = futures::stream::iter(due)
            .map(|kv| async move {
                if !db.delete_if_version(kv.key.clone(), kv.version).await? {
                    return Ok::<_, AppError>((false, false));
                }
                // A finished job's result goes with it: nothing names it now.
                let export = match job_id(table, &kv.key) {
                    Some(jid) if matches!(table, Table::JobDone | Table::JobDead) => {
                        delete_export(db, jid).await?
                    }
                    _ => false,
                };
                Ok((true, export))
            })
            .buffer_unordered(SWEEP_DELETES_IN_FLIGHT)
            .collect()
            .await;
        // Every outcome is counted before a failure is reported.
        let mut failed = None;
        for o in outcomes {
            let (deleted, export) = match o {
                Ok(d) => d,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            if !deleted {
                report.skipped += 1;
                continue;
            }
            let n = match table {
                Table::Refresh => &mut report.refresh_tokens,
                Table::JobDone => &mut report.jobs_done,
                Table::JobDead => &mut report.jobs_dead,
                Table::Export => &mut report.exports,
                Table::Notification => &mut report.notifications,
            };
            *n += 1;
            if export {
                report.exports += 1;
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// The exports of `kvs` (a page of `export/` keys) whose job has no record
/// left (live, finished or dead), read STRONG by `read` (a batch read) after
/// the exports: a job's record exists from before its export is written
/// until the sweep deletes it.
///
/// The order of the reads matters. A batch read sends its keys to their
/// ranges at once, so they are read at different moments, and finishing a
/// job ([`crate::jobs::ack`], [`crate::jobs::fail`]) writes
/// `jobdone/<jid>` (or `jobdead/<jid>`) and then deletes `job/<jid>`: one
/// batch of all three could read the finished record before it is written
/// and the live one after it is deleted, and take the export of a job that
/// just succeeded for an orphan. So the live records are read first, and
/// the finished records of the jobs found without one only after that
/// answer: a live record absent then was deleted before, so its finished
/// record was written before and is found.
async fn orphan_exports<R, F>(mut read: R, kvs: Vec<KeyValue>) -> AppResult<Vec<KeyValue>>
where
    R: FnMut(Vec<Bytes>) -> F,
    F: Future<Output = AppResult<Vec<KeyValue>>>,
{
    let exports: Vec<(u64, KeyValue)> = kvs
        .into_iter()
        .filter_map(|kv| Some((job_id(Table::Export, &kv.key)?, kv)))
        .collect();
    if exports.is_empty() {
        return Ok(Vec::new());
    }
    // 1. The live records.
    let live: HashSet<u64> = read(exports.iter().map(|(jid, _)| keys::job(*jid)).collect())
        .await?
        .into_iter()
        .filter_map(|kv| live_job_id(&kv.key))
        .collect();
    let not_live: Vec<u64> = exports
        .iter()
        .map(|(jid, _)| *jid)
        .filter(|jid| !live.contains(jid))
        .collect();
    if not_live.is_empty() {
        return Ok(Vec::new());
    }
    // 2. Only now, the finished records of the jobs not live.
    let finished: HashSet<u64> = read(
        not_live
            .iter()
            .flat_map(|jid| [keys::job_done(*jid), keys::job_dead(*jid)])
            .collect(),
    )
    .await?
    .into_iter()
    .filter_map(|kv| {
        [Table::JobDone, Table::JobDead]
            .into_iter()
            .find_map(|t| job_id(t, &kv.key))
    })
    .collect();
    Ok(exports
        .into_iter()
        .filter(|(jid, _)| !live.contains(jid) && !finished.contains(jid))
        .map(|(_, kv)| kv)
        .collect())
}

/// The job id of a `job/<jid>` key.
fn live_job_id(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(keys::JOB)?;
    (rest.len() == 8).then(|| keys::id_at(rest, 0)).flatten()
}

/// Deletes job `jid`'s export, if there is one, only if it is still the
/// version read here (its key is read, not its value of up to 1 MiB);
/// whether it deleted. One rewritten in between stays, and the walk of
/// `export/` deletes it once no record of its job is left.
async fn delete_export(db: &Db, jid: u64) -> AppResult<bool> {
    let key = keys::export(jid);
    let page = db
        .client()
        .scan(&ScanOptions {
            end: successor(&key),
            start: key.clone(),
            limit: 1,
            keys_only: true,
            consistency: ReadConsistency::Strong,
            ..Default::default()
        })
        .await?;
    match page.kvs.first() {
        Some(kv) if kv.key == key => db.delete_if_version(key, kv.version).await,
        _ => Ok(false),
    }
}

/// The pause before the round after `r`: the full `interval`, or
/// [`SWEEP_BACKLOG_PAUSE`] (at most the interval) while a walk is under way.
fn pause_after(r: &SweepReport, interval: Duration) -> Duration {
    if r.backlog {
        SWEEP_BACKLOG_PAUSE.min(interval)
    } else {
        interval
    }
}

/// The first key after `key`.
fn successor(key: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    Bytes::from(k)
}

/// Runs a round every `interval` (sooner while a walk is under way) until the
/// process ends; logs what each round deleted.
pub async fn run(st: crate::app::AppState, settings: RetentionSettings) {
    let Some(interval) = settings.interval else {
        return;
    };
    let mut sweeper = Sweeper::new(settings);
    let mut pause = interval;
    loop {
        // Processes started together do not sweep in step.
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0.75..=1.0);
        tokio::time::sleep(pause.mul_f64(jitter)).await;
        let r = sweeper.round(&st.db, Utc::now()).await;
        if r.deleted() > 0 {
            tracing::info!(
                refresh_tokens = r.refresh_tokens,
                jobs_done = r.jobs_done,
                jobs_dead = r.jobs_dead,
                exports = r.exports,
                notifications = r.notifications,
                skipped = r.skipped,
                more = r.more,
                backlog = r.backlog,
                "retention sweep deleted expired records"
            );
        } else {
            tracing::debug!(
                skipped = r.skipped,
                more = r.more,
                backlog = r.backlog,
                "retention sweep: nothing due"
            );
        }
        pause = pause_after(&r, interval);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn kv(key: &[u8], value: serde_json::Value) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key),
            value: Bytes::from(serde_json::to_vec(&value).unwrap()),
            version: 3,
        }
    }

    #[test]
    fn only_records_past_their_time_are_due() {
        let s = RetentionSettings::default();
        let now = Utc::now();
        let ago = |secs: i64| (now - chrono::Duration::seconds(secs)).to_rfc3339();
        let refresh = |exp: String| {
            kv(
                b"refresh/ab",
                serde_json::json!({"user_id": 1, "expires_at": exp}),
            )
        };
        assert!(due(Table::Refresh, &refresh(ago(3600)), &s, now));
        assert!(
            !due(Table::Refresh, &refresh(ago(60)), &s, now),
            "within the grace"
        );
        assert!(
            !due(Table::Refresh, &refresh(ago(-3600)), &s, now),
            "not expired"
        );

        let job = |state: &str, finished: Option<String>| {
            kv(
                &keys::job_done(4),
                serde_json::json!({"id": 4, "kind": {"kind": "some_future_kind"}, "state": state,
                    "created_at": ago(30 * 86_400), "finished_at": finished}),
            )
        };
        let week = 7 * 86_400;
        assert!(due(
            Table::JobDone,
            &job("succeeded", Some(ago(week + 60))),
            &s,
            now
        ));
        assert!(due(
            Table::JobDead,
            &job("dead", Some(ago(week + 60))),
            &s,
            now
        ));
        assert!(!due(
            Table::JobDone,
            &job("succeeded", Some(ago(week - 60))),
            &s,
            now
        ));
        // A record that says it is not finished is never deleted.
        assert!(!due(
            Table::JobDone,
            &job("running", Some(ago(week * 4))),
            &s,
            now
        ));
        assert!(!due(Table::JobDone, &job("queued", None), &s, now));

        let note = |created: String| {
            kv(
                b"notif/x",
                serde_json::json!({"id": 1, "created_at": created}),
            )
        };
        assert!(due(Table::Notification, &note(ago(91 * 86_400)), &s, now));
        assert!(!due(Table::Notification, &note(ago(89 * 86_400)), &s, now));
        // Not understood: kept.
        assert!(!due(
            Table::Notification,
            &kv(b"notif/x", serde_json::json!("?")),
            &s,
            now
        ));
    }

    #[test]
    fn settings_out_of_bounds_are_refused_with_the_flag_named() {
        assert!(RetentionSettings::default().validate().is_ok());
        let mut s = RetentionSettings {
            jobs: Duration::ZERO,
            ..Default::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("--job-retention-s") && e.contains("not 0"),
            "{e}"
        );
        s.jobs = RETENTION_MAX + Duration::from_secs(1);
        assert!(s.validate().is_err());
        let s = RetentionSettings {
            notifications: Duration::from_secs(59),
            ..Default::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--notification-retention-s"));
        let s = RetentionSettings {
            interval: Some(Duration::from_secs(86_401)),
            ..Default::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--retention-interval-s"));
        let off = RetentionSettings {
            interval: None,
            ..Default::default()
        };
        assert!(off.validate().is_ok());
    }

    /// A store the order test reads key by key, in the order a schedule
    /// picks, finishing job 5 (writing `finished`, then deleting `job/5`)
    /// just before read number `finish_at`.
    struct Racing {
        store: HashSet<Bytes>,
        finished: Bytes,
        finish_at: usize,
        reads: usize,
        reverse: bool,
    }

    impl Racing {
        fn read(&mut self, mut keys: Vec<Bytes>) -> Vec<KeyValue> {
            // The keys of one batch go out at once: any order may happen.
            if self.reverse {
                keys.reverse();
            }
            let mut out = Vec::new();
            for k in keys {
                if self.reads == self.finish_at {
                    self.store.insert(self.finished.clone());
                    self.store.remove(&keys::job(5));
                }
                self.reads += 1;
                if self.store.contains(&k) {
                    out.push(KeyValue {
                        key: k,
                        value: Bytes::new(),
                        version: 1,
                    });
                }
            }
            out
        }
    }

    #[test]
    fn an_export_whose_job_finishes_while_it_is_read_is_never_an_orphan() {
        let export = |jid: u64| KeyValue {
            key: keys::export(jid),
            value: Bytes::new(),
            version: 2,
        };
        // Job 5 is running and finishes during the read, at every moment
        // and in every order of each batch; job 6 has no record (an orphan);
        // job 7 finished long ago.
        for finished in [keys::job_done(5), keys::job_dead(5)] {
            for reverse in [false, true] {
                for finish_at in 0..=10 {
                    let store = RefCell::new(Racing {
                        store: [keys::job(5), keys::job_done(7)].into_iter().collect(),
                        finished: finished.clone(),
                        finish_at,
                        reads: 0,
                        reverse,
                    });
                    let read = |keys: Vec<Bytes>| {
                        let out = store.borrow_mut().read(keys);
                        async move { Ok(out) }
                    };
                    let orphans = futures::executor::block_on(orphan_exports(
                        read,
                        vec![export(5), export(6), export(7)],
                    ))
                    .unwrap();
                    let ids: Vec<u64> = orphans
                        .iter()
                        .filter_map(|kv| job_id(Table::Export, &kv.key))
                        .collect();
                    assert_eq!(
                        ids,
                        vec![6],
                        "finishing into {} before read {finish_at}, reverse {reverse}",
                        finished.escape_ascii()
                    );
                }
            }
        }
    }

    #[test]
    fn only_a_walk_under_way_asks_for_the_short_pause() {
        let hour = Duration::from_secs(3600);
        // A walk that failed: unfinished, but no short pause.
        let failed = SweepReport {
            more: true,
            ..Default::default()
        };
        assert_eq!(pause_after(&failed, hour), hour);
        assert_eq!(pause_after(&SweepReport::default(), hour), hour);
        let backlog = SweepReport {
            more: true,
            backlog: true,
            refresh_tokens: 512,
            ..Default::default()
        };
        assert_eq!(pause_after(&backlog, hour), SWEEP_BACKLOG_PAUSE);
        let short = Duration::from_secs(2);
        assert_eq!(pause_after(&backlog, short), short);
    }

    #[test]
    fn job_ids_come_from_the_key_tail() {
        assert_eq!(job_id(Table::JobDone, &keys::job_done(9)), Some(9));
        assert_eq!(job_id(Table::Export, &keys::export(9)), Some(9));
        assert_eq!(job_id(Table::Export, b"export/short"), None);
        assert_eq!(job_id(Table::JobDead, &keys::job_done(9)), None);
    }
}
