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
//! Each round walks every table a page at a time ([`SweepLimits`]: keys per
//! page, pages and deletes per table and round); a table it could not
//! finish is taken up where it stopped by the next round, which then comes
//! after [`SWEEP_BACKLOG_PAUSE`] instead of the full interval, so a backlog
//! drains at a bounded pace. Every read is STRONG and every delete is a
//! compare-and-delete on the version read: several API processes may sweep
//! at once (one of them wins each delete, the others find it gone), and a
//! record rewritten after it was read (a rerun job writing its notification
//! or result again) stays.
//!
//! Records point at each other in two places, and both tolerate a deleted
//! target. A finished job's export is deleted right after the job's record
//! (a sweep that dies in between leaves an export no job names; the walk of
//! `export/` deletes those). A grade notice (`course/<cid>/g/…`) names the
//! job that notified it and so the notification `notif/<uid>/<jid>`: once
//! both the job's record and the notification are gone, the next publish
//! of that grade notifies the student again
//! ([`crate::jobs::notices`]), which is the right outcome for a student
//! whose notification has expired.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
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
    /// Whether some table was left unfinished at the round's bounds.
    pub more: bool,
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
/// it); an export is decided by its job ([`Sweeper::orphan_exports`]).
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

/// One process's sweep: its settings, bounds and where each table's walk
/// goes on in the next round.
#[derive(Debug)]
pub struct Sweeper {
    pub settings: RetentionSettings,
    pub limits: SweepLimits,
    /// The first key of each table the next round reads (absent: the
    /// table's start).
    resume: HashMap<Table, Bytes>,
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
        }
    }

    /// One round over every table, deciding by the clock `now`. A table
    /// whose walk fails is logged and taken up again next round; the others
    /// still run.
    pub async fn round(&mut self, db: &Db, now: DateTime<Utc>) -> SweepReport {
        let mut report = SweepReport::default();
        for table in Table::ALL {
            if let Err(e) = self.sweep_table(db, table, now, &mut report).await {
                tracing::warn!(table = %String::from_utf8_lossy(table.prefix()), error = %e,
                    "retention sweep of a table failed; it goes on next round");
                report.more = true;
            }
        }
        report
    }

    /// Walks `table` from where the last round stopped, within the bounds.
    async fn sweep_table(
        &mut self,
        db: &Db,
        table: Table,
        now: DateTime<Utc>,
        report: &mut SweepReport,
    ) -> AppResult<()> {
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
                self.orphan_exports(db, page.kvs).await?
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
                report.more = true;
                return Ok(());
            }
            match page.next_page_token {
                Some(t) => opts.page_token = t,
                None => {
                    // The whole table: the next round starts over.
                    self.resume.remove(&table);
                    return Ok(());
                }
            }
        }
        // Out of pages for this round.
        self.resume.insert(table, next_start);
        report.more = true;
        Ok(())
    }

    /// The exports of `kvs` (a page of `export/` keys) whose job has no
    /// record left (live, finished or dead), read STRONG after the exports:
    /// a job's record exists from before its export is written until the
    /// sweep deletes it.
    async fn orphan_exports(&self, db: &Db, kvs: Vec<KeyValue>) -> AppResult<Vec<KeyValue>> {
        let exports: Vec<(u64, KeyValue)> = kvs
            .into_iter()
            .filter_map(|kv| Some((job_id(Table::Export, &kv.key)?, kv)))
            .collect();
        if exports.is_empty() {
            return Ok(Vec::new());
        }
        let records = exports
            .iter()
            .flat_map(|(jid, _)| [keys::job(*jid), keys::job_done(*jid), keys::job_dead(*jid)]);
        let found: HashSet<u64> = db
            .client()
            .batch_get(records, ReadConsistency::Strong)
            .await?
            .into_iter()
            .filter_map(|kv| {
                [Table::JobDone, Table::JobDead]
                    .into_iter()
                    .find_map(|t| job_id(t, &kv.key))
                    .or_else(|| {
                        let rest = kv.key.strip_prefix(keys::JOB)?;
                        (rest.len() == 8).then(|| keys::id_at(rest, 0)).flatten()
                    })
            })
            .collect();
        Ok(exports
            .into_iter()
            .filter(|(jid, _)| !found.contains(jid))
            .map(|(_, kv)| kv)
            .collect())
    }

    /// Deletes `due` records of `table`, each only if still the version read.
    async fn delete(
        &self,
        db: &Db,
        table: Table,
        due: Vec<KeyValue>,
        report: &mut SweepReport,
    ) -> AppResult<()> {
        let outcomes: Vec<AppResult<(bool, bool)>> = futures::stream::iter(due)
            .map(|kv| async move {
                if !db.delete_if_version(kv.key.clone(), kv.version).await? {
                    return Ok::<_, AppError>((false, false));
                }
                // A finished job's result goes with it: nothing names it now.
                let export = match job_id(table, &kv.key) {
                    Some(jid) if matches!(table, Table::JobDone | Table::JobDead) => {
                        db.client().delete(keys::export(jid)).await?
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

/// The first key after `key`.
fn successor(key: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    Bytes::from(k)
}

/// Runs a round every `interval` (sooner while a backlog drains) until the
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
                "retention sweep deleted expired records"
            );
        } else {
            tracing::debug!(
                skipped = r.skipped,
                more = r.more,
                "retention sweep: nothing due"
            );
        }
        pause = if r.more {
            SWEEP_BACKLOG_PAUSE.min(interval)
        } else {
            interval
        };
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn job_ids_come_from_the_key_tail() {
        assert_eq!(job_id(Table::JobDone, &keys::job_done(9)), Some(9));
        assert_eq!(job_id(Table::Export, &keys::export(9)), Some(9));
        assert_eq!(job_id(Table::Export, b"export/short"), None);
        assert_eq!(job_id(Table::JobDead, &keys::job_done(9)), None);
    }
}
