//! The retention sweep against a real lmskv cluster: records past their
//! time go (expired refresh tokens, old finished jobs with their exports,
//! old notifications), live ones stay (unexpired tokens, queued or running
//! jobs whatever their age, recent records), a record rewritten after it
//! was read stays, and rounds are bounded and safe to run from several
//! processes at once.

use super::common;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{Duration as Age, Utc};
use futures::future::BoxFuture;
use lms_api::jobs::{Job, JobKind, JobState};
use lms_api::model::{Notification, RefreshToken};
use lms_api::retention::{RetentionSettings, SweepLimits, SweepReport, Sweeper};
use lms_api::{keys, AppState};
use lmskv_client::{KeyValue, ReadConsistency};
use lmskv_tests::phase;

fn token(expires_in: Age) -> RefreshToken {
    RefreshToken {
        user_id: 7,
        expires_at: Utc::now() + expires_in,
        session_generation: 0,
    }
}

fn job(id: u64, state: JobState, age: Age) -> Job {
    let at = Utc::now() - age;
    let finished = matches!(state, JobState::Succeeded | JobState::Dead);
    Job {
        id,
        kind: JobKind::GradebookExport { course_id: 1 },
        state,
        attempts: 1,
        created_by: 7,
        created_at: at,
        run_at: at,
        lease_until: None,
        last_error: None,
        finished_at: finished.then_some(at),
    }
}

fn note(uid: u64, nid: u64, age: Age) -> Notification {
    Notification {
        id: nid,
        user_id: uid,
        message: "Grades are published.".into(),
        course_id: 1,
        assignment_id: None,
        created_at: Utc::now() - age,
    }
}

async fn exists(st: &AppState, key: Bytes) -> bool {
    st.db
        .client()
        .get(key, ReadConsistency::Strong)
        .await
        .unwrap()
        .is_some()
}

async fn count(st: &AppState, table: &'static [u8]) -> usize {
    st.db
        .scan_prefix::<serde_json::Value>(&Bytes::from_static(table), ReadConsistency::Strong)
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_what_is_past_its_time_and_nothing_live() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.worker = false;
    let st = AppState::new(cfg).unwrap();
    let db = &st.db;
    let day = Age::days(1);

    phase!("records of every kind, some past their time");
    db.put(keys::refresh("expired"), &token(-Age::hours(1)))
        .await
        .unwrap();
    db.put(keys::refresh("in-grace"), &token(-Age::minutes(1)))
        .await
        .unwrap();
    db.put(keys::refresh("live"), &token(day)).await.unwrap();
    // Jobs: finished 8 days ago (gone, with its export), 1 day ago (kept),
    // dead 8 days ago (gone), and a queued and a running job a month old
    // (live: never touched, nor the running job's export).
    db.put(keys::job_done(101), &job(101, JobState::Succeeded, day * 8))
        .await
        .unwrap();
    db.put_raw(keys::export(101), "old,csv\n".into())
        .await
        .unwrap();
    db.put(keys::job_done(102), &job(102, JobState::Succeeded, day))
        .await
        .unwrap();
    db.put_raw(keys::export(102), "new,csv\n".into())
        .await
        .unwrap();
    db.put(keys::job_dead(103), &job(103, JobState::Dead, day * 8))
        .await
        .unwrap();
    db.put(keys::job(104), &job(104, JobState::Queued, day * 30))
        .await
        .unwrap();
    db.put(keys::job(105), &job(105, JobState::Running, day * 30))
        .await
        .unwrap();
    db.put_raw(keys::export(105), "running,csv\n".into())
        .await
        .unwrap();
    // An export whose job has no record left (a sweep died between the two).
    db.put_raw(keys::export(106), "orphan\n".into())
        .await
        .unwrap();
    db.put(keys::notification(7, 1), &note(7, 1, day * 91))
        .await
        .unwrap();
    db.put(keys::notification(7, 2), &note(7, 2, day * 10))
        .await
        .unwrap();

    phase!("one round deletes exactly the records past their time");
    let mut sweeper = Sweeper::new(RetentionSettings::default());
    let r = sweeper.round(db, Utc::now()).await;
    assert_eq!(
        r,
        SweepReport {
            refresh_tokens: 1,
            jobs_done: 1,
            jobs_dead: 1,
            exports: 2,
            notifications: 1,
            skipped: 0,
            more: false,
            backlog: false,
        }
    );
    for (key, want) in [
        (keys::refresh("expired"), false),
        (keys::refresh("in-grace"), true),
        (keys::refresh("live"), true),
        (keys::job_done(101), false),
        (keys::export(101), false),
        (keys::job_done(102), true),
        (keys::export(102), true),
        (keys::job_dead(103), false),
        (keys::job(104), true),
        (keys::job(105), true),
        (keys::export(105), true),
        (keys::export(106), false),
        (keys::notification(7, 1), false),
        (keys::notification(7, 2), true),
    ] {
        assert_eq!(
            exists(&st, key.clone()).await,
            want,
            "{}",
            key.escape_ascii()
        );
    }
    let again = sweeper.round(db, Utc::now()).await;
    assert_eq!(again.deleted(), 0, "{again:?}");

    phase!("a record rewritten between the sweep's read and its delete is not deleted");
    let key = keys::notification(7, 3);
    db.put(key.clone(), &note(7, 3, day * 100)).await.unwrap();
    let client = db.client().clone();
    let rewrite = key.clone();
    sweeper.set_before_delete(Arc::new(
        move |due: Vec<KeyValue>| -> BoxFuture<'static, ()> {
            let (client, rewrite) = (client.clone(), rewrite.clone());
            Box::pin(async move {
                if due.iter().any(|kv| kv.key == rewrite) {
                    let fresh = serde_json::to_vec(&note(7, 3, Age::zero())).unwrap();
                    client.put(rewrite, fresh).await.unwrap();
                }
            })
        },
    ));
    let r = sweeper.round(db, Utc::now()).await;
    assert_eq!((r.deleted(), r.skipped), (0, 1), "{r:?}");
    let kept = db
        .get::<Notification>(key.clone(), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("the rewritten notification stays");
    assert!(
        kept.value.created_at > Utc::now() - Age::hours(1),
        "it is the rewrite"
    );
    assert_eq!(sweeper.round(db, Utc::now()).await.deleted(), 0);
    assert!(exists(&st, key).await, "the rewrite is recent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_are_bounded_and_two_sweepers_delete_each_record_once() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.worker = false;
    let st = AppState::new(cfg).unwrap();
    let db = &st.db;
    for n in 0..9 {
        db.put(keys::refresh(&format!("old-{n}")), &token(-Age::hours(2)))
            .await
            .unwrap();
    }
    db.put(keys::refresh("live"), &token(Age::days(1)))
        .await
        .unwrap();

    phase!("two processes sweep at once, each round at most 3 deletes from 2 pages of 2");
    let limits = SweepLimits {
        page: 2,
        pages: 2,
        deletes: 3,
    };
    let mut a = Sweeper::with_limits(RetentionSettings::default(), limits);
    let mut b = Sweeper::with_limits(RetentionSettings::default(), limits);
    let (mut deleted, mut rounds) = (0, 0);
    loop {
        rounds += 1;
        assert!(rounds <= 20, "the backlog did not drain");
        let now = Utc::now();
        let (ra, rb) = futures::join!(a.round(db, now), b.round(db, now));
        if rounds == 1 {
            assert!(
                ra.backlog || rb.backlog,
                "a round stopped at its delete bound asks for the short pause: {ra:?} {rb:?}"
            );
        }
        for r in [&ra, &rb] {
            assert!(r.refresh_tokens <= 3, "a round past its bound: {r:?}");
            assert_eq!(r.deleted(), r.refresh_tokens, "{r:?}");
        }
        deleted += ra.refresh_tokens + rb.refresh_tokens;
        if !ra.more && !rb.more {
            break;
        }
    }
    assert!(
        rounds >= 2,
        "9 deletes cannot fit one round of two sweepers"
    );
    assert_eq!(deleted, 9, "each expired token deleted exactly once");
    assert_eq!(count(&st, keys::REFRESH).await, 1, "the live token stays");
    assert!(exists(&st, keys::refresh("live")).await);

    phase!("a table larger than a round's pages is walked to its end at the short pause, then the sweep waits the interval");
    for n in 0..6 {
        db.put(keys::refresh(&format!("live-{n}")), &token(Age::days(1)))
            .await
            .unwrap();
    }
    let mut c = Sweeper::with_limits(RetentionSettings::default(), limits);
    let r = c.round(db, Utc::now()).await;
    assert_eq!(r.deleted(), 0, "{r:?}");
    assert!(r.more, "7 tokens take two rounds of 4 keys: {r:?}");
    assert!(
        r.backlog,
        "a walk under way goes on after the short pause: {r:?}"
    );
    let r = c.round(db, Utc::now()).await;
    assert_eq!(r.deleted(), 0, "{r:?}");
    assert!(
        !r.more && !r.backlog,
        "every table walked: the next round waits the interval: {r:?}"
    );
}
