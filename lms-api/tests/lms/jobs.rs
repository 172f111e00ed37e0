//! The durable job queue against a real lmskv cluster: a lease that runs
//! out is leased again (and the stale lease can no longer finish the job),
//! a failed run is retried after a doubling backoff, a job out of attempts is
//! dead-lettered, an acked job leaves the queue, and due jobs are found
//! behind hundreds of jobs that are not due. Timings are configured short
//! (lease 1 s, backoff 500 ms doubling to 1 s, 3 attempts).

use super::common;

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lms_api::jobs::{self, Failure, Job, JobKind, JobSettings, JobState, Queue};
use lms_api::{keys, AppState};
use lmskv_client::ReadConsistency;
use lmskv_tests::phase;

fn settings() -> JobSettings {
    JobSettings {
        lease: Duration::from_secs(1),
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_millis(1_000),
        attempts_max: 3,
    }
}

fn kind(n: u64) -> JobKind {
    JobKind::GradeNotifications {
        course_id: 1,
        assignment_id: n,
    }
}

async fn live_ids(st: &AppState) -> Vec<u64> {
    st.db
        .scan_prefix::<Job>(
            &bytes::Bytes::from_static(keys::JOB),
            ReadConsistency::Strong,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.value.id)
        .collect()
}

async fn state_of(st: &AppState, id: u64) -> Job {
    jobs::status(&st.db, id).await.unwrap().expect("job exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_failures_back_off_and_dead_letter_acks_finish() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    // This test drives the queue itself: no worker in the background.
    cfg.worker = false;
    cfg.jobs = settings();
    let st = AppState::new(cfg).unwrap();
    let db = &st.db;
    let q = &st.jobs;

    phase!("lease expiry: a lease that is not acked in time is leased again");
    let a = jobs::enqueue_in(db, kind(1), 7).await.unwrap();
    let first = jobs::lease(db, q, 4).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].job.id, first[0].job.attempts), (a.id, 1));
    assert_eq!(state_of(&st, a.id).await.state, JobState::Running);
    assert!(
        jobs::lease(db, q, 4).await.unwrap().is_empty(),
        "a live lease is not handed out twice"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = jobs::lease(db, q, 4).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].job.id, second[0].job.attempts), (a.id, 2));

    phase!("ack: the stale lease cannot finish the job, the current one can");
    jobs::ack(db, &first[0]).await.unwrap();
    assert_eq!(
        live_ids(&st).await,
        vec![a.id],
        "the stale ack removed nothing"
    );
    jobs::ack(db, &second[0]).await.unwrap();
    assert!(live_ids(&st).await.is_empty());
    let done = state_of(&st, a.id).await;
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 2));
    assert!(done.finished_at.is_some());

    phase!("retry with backoff, then dead letter after 3 attempts");
    let b = jobs::enqueue_in(db, kind(2), 7).await.unwrap();
    for attempt in 1..=3u32 {
        let leased = wait_lease(&st, q).await;
        assert_eq!((leased.job.id, leased.job.attempts), (b.id, attempt));
        let failed_at = Utc::now();
        jobs::fail(db, &q.settings, &leased, "boom", Failure::Retryable)
            .await
            .unwrap();
        let j = state_of(&st, b.id).await;
        assert_eq!(j.last_error.as_deref(), Some("boom"));
        if attempt < 3 {
            assert_eq!(j.state, JobState::Queued);
            // The job waits its backoff: 500 ms, then 1 s.
            let backoff = (j.run_at - failed_at).num_milliseconds();
            let want = 500 * i64::from(attempt);
            assert!(
                (want - 50..=want + 200).contains(&backoff),
                "attempt {attempt}: backoff {backoff} ms, want about {want}"
            );
            assert!(
                jobs::lease(db, q, 4).await.unwrap().is_empty(),
                "not leased before its backoff ends"
            );
        } else {
            assert_eq!(j.state, JobState::Dead);
            assert_eq!(j.attempts, 3);
        }
    }
    assert!(live_ids(&st).await.is_empty(), "dead jobs leave the queue");
    let dead = st
        .db
        .get::<Job>(keys::job_dead(b.id), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("dead letter");
    assert_eq!(dead.value.state, JobState::Dead);

    phase!("a permanent failure is dead-lettered at once");
    let c = jobs::enqueue_in(db, kind(3), 7).await.unwrap();
    let leased = wait_lease(&st, q).await;
    assert_eq!(leased.job.id, c.id);
    jobs::fail(db, &q.settings, &leased, "bad input", Failure::Permanent)
        .await
        .unwrap();
    assert_eq!(state_of(&st, c.id).await.state, JobState::Dead);

    phase!("the worker runs a job end to end (its assignment is gone: dead letter)");
    let d = jobs::enqueue_in(db, kind(4), 7).await.unwrap();
    assert_eq!(jobs::worker::run_once(db, q).await.unwrap(), 1);
    let j = state_of(&st, d.id).await;
    assert_eq!((j.state, j.attempts), (JobState::Dead, 1));
    assert!(j.last_error.unwrap().contains("no longer exists"));
}

/// Leases one job, waiting (up to 5 s) for one to be due.
async fn wait_lease(st: &AppState, q: &Queue) -> jobs::Leased {
    lmskv_tests::wait_for("a due job", Duration::from_secs(5), || async {
        jobs::lease(&st.db, q, 1).await.unwrap().pop()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_jobs_are_found_behind_many_jobs_waiting_on_backoff() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.worker = false;
    let st = AppState::new(cfg).unwrap();
    // 600 jobs waiting on a long backoff (more than two scan pages), then
    // one due job after them in key order.
    let later = Utc::now() + chrono::Duration::hours(1);
    let parked = |id: u64| Job {
        id,
        kind: kind(id),
        state: JobState::Queued,
        attempts: 1,
        created_by: 7,
        created_at: Utc::now(),
        run_at: later,
        lease_until: None,
        last_error: Some("waiting".into()),
        finished_at: None,
    };
    let writes = futures::stream::iter(1_000..1_600u64)
        .map(|id| {
            let st = &st;
            async move { st.db.put(keys::job(id), &parked(id)).await }
        })
        .buffer_unordered(32);
    let results: Vec<_> = writes.collect().await;
    assert!(results.iter().all(|r| r.is_ok()));
    let mut due = parked(5_000);
    due.run_at = Utc::now();
    st.db.put(keys::job(5_000), &due).await.unwrap();

    phase!("one lease scan goes past the waiting jobs to the due one");
    let got = jobs::lease(&st.db, &st.jobs, 4).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.id, 5_000);
    assert!(jobs::lease(&st.db, &st.jobs, 4).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_committed_without_writing_its_job_is_notified_after_repair() {
    use lms_api::jobs::notices;
    use lms_api::model::{PendingNotices, Role};
    use serde_json::json;

    let api = common::Api::start().await;
    let db = &api.st.db;
    let (tid, teacher) = api
        .user_with_role("t@publish.io", "Teacher", Role::Teacher)
        .await;
    let (sid, student) = api.register_login("s@publish.io", "Student").await;
    let cid = api.course(&teacher, "Publishing", 10).await;
    api.post(
        &format!("/api/v1/courses/{cid}/enrollments"),
        &student,
        json!({}),
    )
    .await
    .expect(201);
    let aid = api
        .assignment(&teacher, cid, json!({"title": "Essay", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    api.post(&sub, &student, json!({"body": "mine"}))
        .await
        .expect(201);
    api.call(
        reqwest::Method::PUT,
        &format!("{sub}/{sid}/grade"),
        Some(&teacher),
        Some(json!({"score": 9, "feedback": "fine"})),
    )
    .await
    .expect(200);
    let pending_key = keys::pending_notices(cid, aid);

    phase!("the publish commits; its process stops before writing the job");
    let (a, pending) = notices::publish(db, cid, aid, tid).await.unwrap();
    assert!(a.grades_published);
    assert!(jobs::status(db, pending.job_id).await.unwrap().is_none());

    phase!("a pending publish younger than the grace is left to its own process");
    let r = lms_api::repair::repair_once(db).await.unwrap();
    assert_eq!(r.notices_enqueued, 0, "{r:?}");
    assert!(jobs::status(db, pending.job_id).await.unwrap().is_none());
    assert!(db
        .get::<PendingNotices>(pending_key.clone(), ReadConsistency::Strong)
        .await
        .unwrap()
        .is_some());
    // The publish is now older than the grace.
    let old = PendingNotices {
        published_at: pending.published_at
            - chrono::Duration::from_std(lms_api::repair::REPAIR_PENDING_GRACE).unwrap()
            - chrono::Duration::seconds(1),
        ..pending.clone()
    };
    db.put(pending_key.clone(), &old).await.unwrap();

    phase!("repair writes the job with the publish's id; the worker notifies the student");
    let r = lms_api::repair::repair_once(db).await.unwrap();
    assert_eq!(r.notices_enqueued, 1, "{r:?}");
    let notes = lmskv_tests::wait_for("the notification", Duration::from_secs(15), || async {
        let r = api.get("/api/v1/notifications", &student).await.expect(200);
        let items = r.body.as_array().cloned().unwrap_or_default();
        (!items.is_empty()).then_some(items)
    })
    .await
    .unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0]["id"], pending.job_id);
    assert!(notes[0]["message"].as_str().unwrap().contains("Essay"));
    let job = state_of(&api.st, pending.job_id).await;
    assert_eq!(job.created_by, tid);
    assert!(db
        .get::<PendingNotices>(pending_key.clone(), ReadConsistency::Strong)
        .await
        .unwrap()
        .is_none());
    let again = lms_api::repair::repair_once(db).await.unwrap();
    assert_eq!(again.notices_enqueued, 0, "{again:?}");

    phase!("a publish through the API writes its job and leaves nothing pending");
    let r = api
        .post(
            &format!("/api/v1/courses/{cid}/assignments/{aid}/publish-grades"),
            &teacher,
            json!({}),
        )
        .await
        .expect(202);
    let jid = r.body["job"]["id"].as_u64().unwrap();
    assert_ne!(jid, pending.job_id);
    assert!(jobs::status(db, jid).await.unwrap().is_some());
    assert!(db
        .get::<PendingNotices>(pending_key, ReadConsistency::Strong)
        .await
        .unwrap()
        .is_none());
}

/// A queued job with id `id`, as a writer of an allocated id writes it.
fn queued(id: u64) -> Job {
    let now = Utc::now();
    Job {
        id,
        kind: kind(id),
        state: JobState::Queued,
        attempts: 0,
        created_by: 7,
        created_at: now,
        run_at: now,
        lease_until: None,
        last_error: None,
        finished_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_finished_between_a_writers_check_and_its_write_is_not_queued_again() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.worker = false;
    cfg.jobs = settings();
    let st = AppState::new(cfg).unwrap();
    let (db, q) = (&st.db, &st.jobs);

    for (id, succeed) in [(40u64, true), (41, false)] {
        phase!("writer B checks job {id}: no record yet");
        assert!(jobs::status(db, id).await.unwrap().is_none());

        phase!("meanwhile writer A writes it, and a worker runs and finishes it");
        let (_, wrote) = jobs::enqueue_as(db, id, kind(id), 7).await.unwrap();
        assert!(wrote);
        let leased = jobs::lease(db, q, 4).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].job.id, id);
        if succeed {
            jobs::ack(db, &leased[0]).await.unwrap();
        } else {
            let s = settings();
            jobs::fail(db, &s, &leased[0], "no such assignment", Failure::Permanent)
                .await
                .unwrap();
        }
        assert!(live_ids(&st).await.is_empty());

        phase!("B's write, on the absent key, finds the job finished and is taken back");
        let (seen, wrote) = jobs::write_queued(db, &queued(id)).await.unwrap();
        assert!(!wrote);
        let want = if succeed {
            JobState::Succeeded
        } else {
            JobState::Dead
        };
        assert_eq!(seen.state, want);
        assert!(live_ids(&st).await.is_empty(), "job {id} is queued again");
        assert_eq!(state_of(&st, id).await.state, want);
        assert!(jobs::lease(db, q, 4).await.unwrap().is_empty());
        // And the whole call finds it finished without writing.
        let (seen, wrote) = jobs::enqueue_as(db, id, kind(id), 7).await.unwrap();
        assert!(!wrote);
        assert_eq!(seen.state, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_publish_that_cannot_be_repaired_does_not_stop_the_pass() {
    use lms_api::model::{CourseRole, PendingNotices, UserCourse};

    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.worker = false;
    let st = AppState::new(cfg).unwrap();
    let db = &st.db;

    phase!("course 1: a pending record that does not decode; course 2: an old one; an index entry with no membership");
    db.put_raw(keys::pending_notices(1, 1), "not a record".into())
        .await
        .unwrap();
    let old = PendingNotices {
        job_id: 60,
        created_by: 7,
        published_at: Utc::now() - chrono::Duration::minutes(10),
    };
    db.put(keys::pending_notices(2, 1), &old).await.unwrap();
    // Course 4: a member record this version cannot read, and an old
    // pending publish, which the bad member must not keep from its job.
    db.put_raw(keys::member(4, 9), "not a member".into())
        .await
        .unwrap();
    let old_4 = PendingNotices {
        job_id: 61,
        ..old.clone()
    };
    db.put(keys::pending_notices(4, 1), &old_4).await.unwrap();
    db.put(
        keys::user_course(5, 3),
        &UserCourse {
            course_id: 3,
            role: CourseRole::Student,
        },
    )
    .await
    .unwrap();

    phase!("the pass counts the bad records and repairs everything else");
    let r = lms_api::repair::repair_once(db).await.unwrap();
    assert_eq!(r.failed, 2, "{r:?}");
    assert_eq!(r.notices_enqueued, 2, "{r:?}");
    assert_eq!(r.index_removed, 1, "{r:?}");
    assert_eq!(state_of(&st, 60).await.state, JobState::Queued);
    assert_eq!(state_of(&st, 61).await.state, JobState::Queued);
    assert!(db
        .get::<PendingNotices>(keys::pending_notices(2, 1), ReadConsistency::Strong)
        .await
        .unwrap()
        .is_none());
    let again = lms_api::repair::repair_once(db).await.unwrap();
    assert_eq!(
        again.failed, 2,
        "the bad records are tried again: {again:?}"
    );
    assert_eq!(again.notices_enqueued, 0, "{again:?}");
}
