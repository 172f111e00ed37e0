//! Reads whose cost must not follow what the caller controls: a student's
//! grades view reads a course's assignments in pages with batched reads
//! (not one read per assignment, all at once), and a session token naming
//! a log position the cluster has not reached is refused at once instead
//! of holding the request until the database deadline.

use super::common;

use std::time::{Duration, Instant};

use common::Api;
use lms_api::keys;
use lms_api::model::Role;
use lmskv_tests::phase;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_students_grades_are_read_in_batches_not_one_read_per_assignment() {
    let api = Api::start().await;
    let (_, teacher) = api.user_with_role("t@r.io", "Teacher", Role::Teacher).await;
    let (sid, student) = api.register_login("s@r.io", "Student").await;
    let cid = api.course(&teacher, "Many assignments", 10).await;
    api.post(
        &format!("/api/v1/courses/{cid}/enrollments"),
        &student,
        json!({}),
    )
    .await
    .expect(201);
    const ASSIGNMENTS: usize = 30;
    let mut aids = Vec::new();
    for n in 0..ASSIGNMENTS {
        let body = json!({"title": format!("A{n}"), "max_points": 10, "max_attempts": 1,
                          "due_at": "2999-01-01T00:00:00Z"});
        aids.push(api.assignment(&teacher, cid, body).await);
    }
    // The student submits the first two; the first is graded and its
    // grades published, the second graded but not published.
    for (i, aid) in aids[..2].iter().enumerate() {
        let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
        api.post(&sub, &student, json!({"body": "mine"}))
            .await
            .expect(201);
        api.call(
            Method::PUT,
            &format!("{sub}/{sid}/grade"),
            Some(&teacher),
            Some(json!({"score": 7 + i, "feedback": format!("f{i}")})),
        )
        .await
        .expect(200);
    }
    let job = api
        .post(
            &format!(
                "/api/v1/courses/{cid}/assignments/{}/publish-grades",
                aids[0]
            ),
            &teacher,
            json!({}),
        )
        .await
        .expect(202)
        .body["job"]["id"]
        .as_u64()
        .unwrap();
    // The notice job's reads and writes go through the same client: let it
    // finish before counting the view's.
    lmskv_tests::wait_for("the notice job", Duration::from_secs(20), || async {
        let r = api
            .get(&format!("/api/v1/jobs/{job}"), &teacher)
            .await
            .expect(200);
        (r.body["state"] == "succeeded").then_some(())
    })
    .await
    .unwrap();

    phase!("the view is the same entry per assignment as before");
    let path = format!("/api/v1/courses/{cid}/students/{sid}/grades");
    let before = api.st.db.client().bundle_stats();
    let mine = api.get(&path, &student).await.expect(200);
    let after = api.st.db.client().bundle_stats();
    let rows = mine.body.as_array().unwrap();
    assert_eq!(rows.len(), ASSIGNMENTS);
    let ids: Vec<u64> = rows
        .iter()
        .map(|r| r["assignment_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, aids, "in assignment order");
    assert_eq!(rows[0]["title"], "A0");
    assert_eq!(rows[0]["max_points"], 10);
    assert_eq!(
        (
            rows[0]["submitted"].clone(),
            rows[0]["score"].clone(),
            rows[0]["feedback"].clone()
        ),
        (json!(true), json!(7.0), json!("f0"))
    );
    assert_eq!(
        (
            rows[1]["submitted"].clone(),
            rows[1]["score"].clone(),
            rows[1]["feedback"].clone()
        ),
        (json!(true), Value::Null, Value::Null),
        "not published: hidden from the student"
    );
    assert_eq!(
        (rows[2]["submitted"].clone(), rows[2]["score"].clone()),
        (json!(false), Value::Null)
    );
    let staff = api.get(&path, &teacher).await.expect(200);
    assert_eq!(staff.body[1]["score"], 8.0, "staff see unpublished grades");
    assert_eq!(staff.body[1]["feedback"], "f1");

    phase!("and it took a few reads, not one per assignment");
    let single = (after.alone + after.bundled) - (before.alone + before.bundled);
    assert!(
        single < 10,
        "{single} single-key reads for {ASSIGNMENTS} assignments"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_beyond_the_cluster_is_refused_fast_and_a_real_one_reads_its_write() {
    let api = Api::start().await;
    let (uid, me) = api.register_login("u@r.io", "Before").await;
    let profile = format!("/api/v1/users/{uid}");

    phase!("read-your-writes with the token a write returned");
    let w = api
        .call(
            Method::PATCH,
            &profile,
            Some(&me),
            Some(json!({"name": "After"})),
        )
        .await
        .expect(200);
    let token = w.header("x-session-token").expect("session token");
    let got = api
        .call_with(
            Method::GET,
            &profile,
            Some(&me),
            None,
            &[("x-session-token", &token)],
        )
        .await
        .expect(200);
    assert_eq!(got.body["name"], "After");

    phase!("a token far beyond the range's log: 400 at once, for a read and a list");
    let client = api.st.db.client();
    let users = client
        .range_for_key(keys::user(uid))
        .await
        .unwrap()
        .range_id;
    let index = client
        .range_for_key(keys::user_courses(uid))
        .await
        .unwrap()
        .range_id;
    for (path, range) in [
        (profile.clone(), users),
        (format!("/api/v1/users/{uid}/courses"), index),
    ] {
        let forged = format!("{range}:987654321000");
        let started = Instant::now();
        let r = api
            .call_with(
                Method::GET,
                &path,
                Some(&me),
                None,
                &[("x-session-token", &forged)],
            )
            .await
            .problem(400);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{path}: refused after {took:?}"
        );
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains("not") && detail.contains("reached"),
            "{detail}"
        );
    }

    phase!("a token that is not one: 400, not silently ignored");
    api.call_with(
        Method::GET,
        &profile,
        Some(&me),
        None,
        &[("x-session-token", "tomorrow")],
    )
    .await
    .problem(400);
}
