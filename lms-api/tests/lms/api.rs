//! End-to-end tests of the LMS API against a real lmskv cluster of node
//! processes: the full flow, authorization per role and per object, token
//! handling, input validation, rate limits, capacity under concurrency,
//! pagination, grading races, index repair and a node crash mid-flow.

use super::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{next_link, Api, Resp};
use lms_api::accounts;
use lms_api::db::Cas;
use lms_api::error::AppError;
use lms_api::jobs::notices::{self, Graded};
use lms_api::keys;
use lms_api::model::{Assignment, EmailClaim, GradeNotice, Notification, Role, SubmissionGrade};
use lmskv_client::ReadConsistency;
use lmskv_tests::{phase, wait_for};
use reqwest::Method;
use serde_json::{json, Value};

/// Waits until job `id` reaches a final state and returns it.
async fn finished_job(api: &Api, token: &str, id: u64) -> Value {
    wait_for(
        "the job to finish",
        Duration::from_secs(30),
        || async move {
            let r = api
                .get(&format!("/api/v1/jobs/{id}"), token)
                .await
                .expect(200);
            matches!(r.body["state"].as_str(), Some("succeeded" | "dead")).then_some(r.body)
        },
    )
    .await
    .expect("job finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_register_to_export() {
    phase!("start cluster and API");
    let api = Api::start().await;
    let (_admin_id, admin) = api.user_with_role("admin@t.io", "Admin", Role::Admin).await;

    phase!("register: new accounts are students; the admin makes one a teacher");
    let (teacher_id, _) = api.register_login("teach@t.io", "Tess Teacher").await;
    let (student_id, student) = api.register_login("stu@t.io", "Stu Dent").await;
    let me = api.get("/api/v1/auth/me", &student).await.expect(200);
    assert_eq!(me.body["role"], "student");
    assert_eq!(me.body["email"], "stu@t.io");
    assert!(me.body.get("password_hash").is_none());
    api.call(
        Method::PATCH,
        &format!("/api/v1/users/{teacher_id}"),
        Some(&admin),
        Some(json!({"role": "teacher"})),
    )
    .await
    .expect(200);
    let teacher = api.login("teach@t.io").await;

    phase!("create course, enroll, assign");
    let cid = api.course(&teacher, "Rust 101", 30).await;
    let page = api
        .get(&format!("/api/v1/courses/{cid}"), &student)
        .await
        .expect(200);
    assert_eq!(page.body["title"], "Rust 101");
    let enr = api
        .post(
            &format!("/api/v1/courses/{cid}/enrollments"),
            &student,
            json!({}),
        )
        .await
        .expect(201);
    assert_eq!(enr.body["role"], "student");
    let token = enr.header("x-session-token").expect("session token");
    let mine = api
        .call_with(
            Method::GET,
            &format!("/api/v1/users/{student_id}/courses"),
            Some(&student),
            None,
            &[("x-session-token", &token)],
        )
        .await
        .expect(200);
    assert_eq!(mine.body[0]["course"]["id"], cid);
    assert_eq!(mine.body[0]["role"], "student");
    let linked_list = json!({"title": "Linked list", "max_points": 100, "max_attempts": 2,
                             "due_at": "2999-01-01T00:00:00Z"});
    let aid = api.assignment(&teacher, cid, linked_list).await;

    phase!("submit, resubmit, grade");
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    api.post(&sub, &student, json!({"body": "first try"}))
        .await
        .expect(201);
    let second = api
        .post(&sub, &student, json!({"body": "second try"}))
        .await
        .expect(200);
    assert_eq!(second.body["attempt"], 2);
    api.post(&sub, &student, json!({"body": "third"}))
        .await
        .problem(409);
    let listed = api.get(&sub, &teacher).await.expect(200);
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    assert_eq!(listed.body[0]["body"], "second try");
    let graded = api
        .call(
            Method::PUT,
            &format!("{sub}/{student_id}/grade"),
            Some(&teacher),
            Some(json!({"score": 87.5, "feedback": "good"})),
        )
        .await
        .expect(200);
    assert_eq!(graded.body["grade"]["score"], 87.5);
    api.post(&sub, &student, json!({"body": "after grading"}))
        .await
        .problem(409);

    phase!("grades stay hidden from the student until published");
    let grades = format!("/api/v1/courses/{cid}/students/{student_id}/grades");
    let g = api.get(&grades, &student).await.expect(200);
    assert_eq!(g.body[0]["submitted"], true);
    assert_eq!(g.body[0]["score"], Value::Null);
    let published = api
        .post(
            &format!("/api/v1/courses/{cid}/assignments/{aid}/publish-grades"),
            &teacher,
            json!({}),
        )
        .await
        .expect(202);
    let job_id = published.body["job"]["id"].as_u64().unwrap();
    let job = finished_job(&api, &teacher, job_id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let g = api.get(&grades, &student).await.expect(200);
    assert_eq!(g.body[0]["score"], 87.5);
    let notes = wait_for(
        "the grade notification",
        Duration::from_secs(10),
        || async {
            let r = api.get("/api/v1/notifications", &student).await.expect(200);
            (!r.body.as_array().unwrap().is_empty()).then_some(r.body)
        },
    )
    .await
    .unwrap();
    assert!(notes[0]["message"]
        .as_str()
        .unwrap()
        .contains("Linked list"));

    phase!("gradebook and its CSV export");
    let book = api
        .get(&format!("/api/v1/courses/{cid}/gradebook"), &teacher)
        .await
        .expect(200);
    assert_eq!(book.body["students"].as_array().unwrap().len(), 1);
    assert_eq!(book.body["students"][0]["user_id"], student_id);
    assert_eq!(book.body["students"][0]["total"], 87.5);
    let export = api
        .post(
            &format!("/api/v1/courses/{cid}/gradebook/export"),
            &teacher,
            json!({}),
        )
        .await
        .expect(202);
    let job_id = export.body["id"].as_u64().unwrap();
    let job = finished_job(&api, &teacher, job_id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let csv = api
        .get(job["result_url"].as_str().unwrap(), &teacher)
        .await
        .expect(200);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    assert!(
        csv.text
            .starts_with("user_id,name,email,Linked list,total\n"),
        "{}",
        csv.text
    );
    assert!(
        csv.text
            .contains(&format!("{student_id},Stu Dent,stu@t.io,87.5,87.5")),
        "{}",
        csv.text
    );
    api.get(&format!("/api/v1/jobs/{job_id}"), &student)
        .await
        .problem(404);

    phase!("refresh rotates; logout revokes");
    let tokens = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "stu@t.io", "password": common::PASSWORD})),
        )
        .await
        .expect(200);
    assert_eq!(tokens.body["token_type"], "Bearer");
    assert!(tokens.body["expires_in"].as_u64().unwrap() > 0);
    let rt = tokens.body["refresh_token"].as_str().unwrap().to_string();
    let new = api
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": rt})),
        )
        .await
        .expect(200);
    api.call(
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": rt})),
    )
    .await
    .problem(401);
    let rt2 = new.body["refresh_token"].as_str().unwrap().to_string();
    let at2 = new.body["access_token"].as_str().unwrap().to_string();
    api.post("/api/v1/auth/logout", &at2, json!({"refresh_token": rt2}))
        .await
        .expect(204);
    api.call(
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": rt2})),
    )
    .await
    .problem(401);

    phase!("health, readiness, OpenAPI and docs");
    api.call(Method::GET, "/healthz", None, None)
        .await
        .expect(200);
    api.call(Method::GET, "/readyz", None, None)
        .await
        .expect(200);
    let doc = api
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .expect(200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc.body["paths"]["/api/v1/auth/login"].is_object());
    let ui = api
        .call(Method::GET, "/docs/", None, None)
        .await
        .expect(200);
    assert!(
        ui.text.contains("swagger"),
        "{}",
        &ui.text[..ui.text.len().min(200)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_refused_what_it_may_not_do() {
    let api = Api::start().await;
    let (_, admin) = api.user_with_role("a@t.io", "A", Role::Admin).await;
    let (_, t1) = api.user_with_role("t1@t.io", "T1", Role::Teacher).await;
    let (_, t2) = api.user_with_role("t2@t.io", "T2", Role::Teacher).await;
    let (sid, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let (other, _) = api.user_with_role("o@t.io", "O", Role::Student).await;
    let cid = api.course(&t1, "T1's course", 10).await;
    api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
        .await
        .expect(201);
    let aid = api
        .assignment(&t1, cid, json!({"title": "A1", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    api.post(&sub, &s, json!({"body": "x"})).await.expect(201);

    phase!("no token: 401 with WWW-Authenticate");
    for path in [
        "/api/v1/auth/me",
        "/api/v1/courses",
        &format!("/api/v1/courses/{cid}"),
    ] {
        let r = api.call(Method::GET, path, None, None).await.problem(401);
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    }

    phase!("student");
    api.post("/api/v1/courses", &s, json!({"title": "x", "capacity": 5}))
        .await
        .problem(403);
    api.get("/api/v1/users", &s).await.problem(403);
    api.call(
        Method::PATCH,
        &format!("/api/v1/users/{sid}"),
        Some(&s),
        Some(json!({"role": "admin"})),
    )
    .await
    .problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/assignments"),
        &s,
        json!({"title": "x", "max_points": 1}),
    )
    .await
    .problem(403);
    api.call(
        Method::PUT,
        &format!("{sub}/{sid}/grade"),
        Some(&s),
        Some(json!({"score": 10})),
    )
    .await
    .problem(403);
    api.get(&format!("/api/v1/courses/{cid}/gradebook"), &s)
        .await
        .problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/gradebook/export"),
        &s,
        json!({}),
    )
    .await
    .problem(403);
    api.get(&format!("/api/v1/courses/{cid}/enrollments"), &s)
        .await
        .problem(403);
    api.get(&sub, &s).await.problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/enrollments"),
        &s,
        json!({"user_id": other}),
    )
    .await
    .problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/enrollments"),
        &s,
        json!({"role": "ta"}),
    )
    .await
    .problem(403);
    api.call(
        Method::PATCH,
        &format!("/api/v1/courses/{cid}"),
        Some(&s),
        Some(json!({"capacity": 50})),
    )
    .await
    .problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/assignments/{aid}/publish-grades"),
        &s,
        json!({}),
    )
    .await
    .problem(403);
    api.post("/api/v1/admin/repair", &s, json!({}))
        .await
        .problem(403);

    phase!("teacher of another course");
    api.get("/api/v1/users", &t2).await.problem(403);
    api.call(
        Method::PATCH,
        &format!("/api/v1/courses/{cid}"),
        Some(&t2),
        Some(json!({"title": "mine"})),
    )
    .await
    .problem(403);
    api.call(
        Method::PUT,
        &format!("{sub}/{sid}/grade"),
        Some(&t2),
        Some(json!({"score": 10})),
    )
    .await
    .problem(403);
    api.get(&format!("/api/v1/courses/{cid}/gradebook"), &t2)
        .await
        .problem(403);
    api.post(
        &format!("/api/v1/courses/{cid}/assignments"),
        &t2,
        json!({"title": "x", "max_points": 1}),
    )
    .await
    .problem(403);
    api.get(&format!("{sub}/{sid}"), &t2).await.problem(404);
    api.post(&sub, &t1, json!({"body": "teachers do not submit"}))
        .await
        .problem(403);
    api.post("/api/v1/admin/repair", &t1, json!({}))
        .await
        .problem(403);

    phase!("a teacher enrolls another user only with their e-mail address");
    let enroll = format!("/api/v1/courses/{cid}/enrollments");
    let p = api
        .post(&enroll, &t1, json!({"user_id": other, "role": "ta"}))
        .await
        .problem(422);
    assert_eq!(p.body["errors"][0]["field"], "email", "{}", p.text);
    for (uid, email) in [(other, "x@t.io"), (other, "s@t.io"), (987_654, "o@t.io")] {
        api.post(
            &enroll,
            &t1,
            json!({"user_id": uid, "email": email, "role": "ta"}),
        )
        .await
        .problem(404);
    }

    phase!("a TA grades but does not edit the course");
    api.post(
        &enroll,
        &t1,
        json!({"user_id": other, "email": " O@t.io", "role": "ta"}),
    )
    .await
    .expect(201);
    let ta = api.st.tokens.issue(other, 0).unwrap();
    api.call(
        Method::PUT,
        &format!("{sub}/{sid}/grade"),
        Some(&ta),
        Some(json!({"score": 3})),
    )
    .await
    .expect(200);
    api.call(
        Method::PATCH,
        &format!("/api/v1/courses/{cid}"),
        Some(&ta),
        Some(json!({"title": "ta"})),
    )
    .await
    .problem(403);

    phase!("a TA's gradebook export is theirs only while they assist");
    let export = api
        .post(
            &format!("/api/v1/courses/{cid}/gradebook/export"),
            &ta,
            json!({}),
        )
        .await
        .expect(202);
    let job_id = export.body["id"].as_u64().unwrap();
    let job = finished_job(&api, &ta, job_id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let result = job["result_url"].as_str().unwrap().to_string();
    api.get(&result, &ta).await.expect(200);
    api.call(
        Method::DELETE,
        &format!("/api/v1/courses/{cid}/enrollments/{other}"),
        Some(&t1),
        None,
    )
    .await
    .expect(204);
    api.get(&result, &ta).await.problem(403);

    phase!("admin may do all of it");
    api.get("/api/v1/users", &admin).await.expect(200);
    api.get(&format!("/api/v1/courses/{cid}/gradebook"), &admin)
        .await
        .expect(200);
    api.call(
        Method::PATCH,
        &format!("/api/v1/courses/{cid}"),
        Some(&admin),
        Some(json!({"capacity": 50})),
    )
    .await
    .expect(200);
    api.post("/api/v1/admin/repair", &admin, json!({}))
        .await
        .expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn students_cannot_reach_each_others_objects() {
    let api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (a, ta) = api.user_with_role("a@t.io", "A", Role::Student).await;
    let (b, tb) = api.user_with_role("b@t.io", "B", Role::Student).await;
    let cid = api.course(&t, "Shared", 10).await;
    let draft = api
        .post(
            "/api/v1/courses",
            &t,
            json!({"title": "Draft", "capacity": 5}),
        )
        .await
        .expect(201)
        .body["id"]
        .as_u64()
        .unwrap();
    for tok in [&ta, &tb] {
        api.post(
            &format!("/api/v1/courses/{cid}/enrollments"),
            tok,
            json!({}),
        )
        .await
        .expect(201);
    }
    let aid = api
        .assignment(&t, cid, json!({"title": "A", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    api.post(&sub, &ta, json!({"body": "A's secret answer"}))
        .await
        .expect(201);
    api.post(&sub, &tb, json!({"body": "B's secret answer"}))
        .await
        .expect(201);
    for (uid, tok) in [(a, &ta), (b, &tb)] {
        api.call(
            Method::PUT,
            &format!("{sub}/{uid}/grade"),
            Some(&t),
            Some(json!({"score": 5})),
        )
        .await
        .expect(200);
        api.get(&format!("{sub}/{uid}"), tok).await.expect(200);
    }

    for (me, mine, other) in [(a, &ta, b), (b, &tb, a)] {
        phase!("student {me} tries student {other}'s objects");
        let r = api.get(&format!("{sub}/{other}"), mine).await.problem(404);
        assert!(!r.text.contains("secret"));
        api.get(
            &format!("/api/v1/courses/{cid}/students/{other}/grades"),
            mine,
        )
        .await
        .problem(404);
        api.get(&format!("/api/v1/users/{other}"), mine)
            .await
            .problem(404);
        api.call(
            Method::PATCH,
            &format!("/api/v1/users/{other}"),
            Some(mine),
            Some(json!({"name": "pwned"})),
        )
        .await
        .problem(404);
        api.get(&format!("/api/v1/users/{other}/courses"), mine)
            .await
            .problem(404);
        api.call(
            Method::PUT,
            &format!("{sub}/{other}/grade"),
            Some(mine),
            Some(json!({"score": 0})),
        )
        .await
        .problem(403);
        api.call(
            Method::DELETE,
            &format!("/api/v1/courses/{cid}/enrollments/{other}"),
            Some(mine),
            None,
        )
        .await
        .problem(403);
        api.get(&format!("/api/v1/courses/{draft}"), mine)
            .await
            .problem(404);
        api.get(&format!("/api/v1/courses/{draft}/assignments"), mine)
            .await
            .problem(404);
        // The student's own objects are reachable.
        let own = api.get(&format!("{sub}/{me}"), mine).await.expect(200);
        assert!(own.body["body"].as_str().unwrap().contains("secret"));
        api.get(&format!("/api/v1/users/{me}"), mine)
            .await
            .expect(200);
    }
    phase!("nothing of B changed");
    let bs = api.get(&format!("{sub}/{b}"), &t).await.expect(200);
    assert_eq!(bs.body["grade"]["score"], 5.0);
    assert_eq!(
        api.get(&format!("/api/v1/users/{b}"), &tb).await.body["name"],
        "B"
    );
    let catalogue = api
        .call_with(
            Method::GET,
            "/api/v1/courses",
            Some(&ta),
            None,
            &[("cache-control", "no-cache")],
        )
        .await
        .expect(200);
    assert!(catalogue
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["id"] != draft));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_tampered_tokens_are_refused() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let api = Api::start().await;
    let (uid, good) = api.user_with_role("u@t.io", "U", Role::Student).await;
    api.get("/api/v1/auth/me", &good).await.expect(200);
    let now = chrono::Utc::now().timestamp() as u64;
    let sign = |claims: Value, secret: &str| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };

    phase!("expired");
    let expired = sign(
        json!({"sub": uid.to_string(), "iat": now - 120, "exp": now - 60, "iss": "lms-api"}),
        common::SECRET,
    );
    let r = api.get("/api/v1/auth/me", &expired).await.problem(401);
    assert!(r.body["detail"].as_str().unwrap().contains("expired"));
    assert!(r.header("www-authenticate").is_some());

    phase!("tampered: payload changed, wrong key, no signature, garbage");
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        json!({"sub": (uid + 1).to_string(), "iat": now, "exp": now + 600, "iss": "lms-api"})
            .to_string(),
    );
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    api.get("/api/v1/auth/me", &tampered).await.problem(401);
    let wrong_key = sign(
        json!({"sub": uid.to_string(), "iat": now, "exp": now + 600, "iss": "lms-api"}),
        "another-secret-another-secret-another-secret",
    );
    api.get("/api/v1/auth/me", &wrong_key).await.problem(401);
    let none_header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    api.get("/api/v1/auth/me", &format!("{none_header}.{}.", parts[1]))
        .await
        .problem(401);
    let wrong_issuer = sign(
        json!({"sub": uid.to_string(), "iat": now, "exp": now + 600, "iss": "someone-else"}),
        common::SECRET,
    );
    api.get("/api/v1/auth/me", &wrong_issuer).await.problem(401);
    api.get("/api/v1/auth/me", "garbage").await.problem(401);
    api.call_with(
        Method::GET,
        "/api/v1/auth/me",
        None,
        None,
        &[("authorization", "Basic dTpw")],
    )
    .await
    .problem(401);
    api.call(
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": "made-up"})),
    )
    .await
    .problem(401);

    phase!("an expired refresh token, from an API whose refresh tokens last 1 s");
    let mut cfg = common::config(api.cluster.endpoints());
    cfg.access_token_ttl = Duration::from_secs(1);
    cfg.refresh_token_ttl = Duration::from_secs(1);
    let (_st, base, server) = common::serve(cfg).await;
    let a = &api;
    let login = |base: String| async move {
        a.call(
            Method::POST,
            &format!("{base}/api/v1/auth/login"),
            None,
            Some(json!({"email": "u@t.io", "password": common::PASSWORD})),
        )
        .await
        .expect(200)
        .body["refresh_token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let refresh = |base: String, rt: String| async move {
        a.call(
            Method::POST,
            &format!("{base}/api/v1/auth/refresh"),
            None,
            Some(json!({ "refresh_token": rt })),
        )
        .await
    };
    // Fresh, it works (and is rotated) ...
    let fresh = login(base.clone()).await;
    refresh(base.clone(), fresh).await.expect(200);
    // ... once its lifetime has passed, it does not.
    let old = login(base.clone()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let r = refresh(base.clone(), old.clone()).await.problem(401);
    assert!(r.header("www-authenticate").is_some());
    // Nor on the API with the long lifetime: expiry is stored with the token.
    refresh(api.base.clone(), old).await.problem(401);
    server.abort();

    phase!("the real token still works");
    api.get("/api/v1/auth/me", &good).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_ends_every_session() {
    let api = Api::start().await;
    let (uid, _) = api.register_login("u@t.io", "U").await;
    let login = |password: &'static str| {
        let a = &api;
        async move {
            a.call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"email": "u@t.io", "password": password})),
            )
            .await
        }
    };
    let refresh = |rt: String| {
        let a = &api;
        async move {
            a.call(
                Method::POST,
                "/api/v1/auth/refresh",
                None,
                Some(json!({ "refresh_token": rt })),
            )
            .await
        }
    };
    let tokens = |r: Resp| {
        let r = r.expect(200);
        (
            r.body["access_token"].as_str().unwrap().to_string(),
            r.body["refresh_token"].as_str().unwrap().to_string(),
        )
    };
    // Two sessions, say a laptop and a stolen copy on someone else's.
    let (at_a, rt_a) = tokens(login(common::PASSWORD).await);
    let (at_b, rt_b) = tokens(login(common::PASSWORD).await);
    let user = format!("/api/v1/users/{uid}");

    phase!("a name change ends no session");
    api.call(
        Method::PATCH,
        &user,
        Some(&at_a),
        Some(json!({"name": "New Name"})),
    )
    .await
    .expect(200);
    api.get("/api/v1/auth/me", &at_b).await.expect(200);

    phase!("a browser may send and read the session token");
    let url = format!("{}{user}", api.base);
    let pre = api
        .http
        .request(Method::OPTIONS, &url)
        .header("origin", "https://lms.example")
        .header("access-control-request-method", "PATCH")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-session-token",
        )
        .send()
        .await
        .unwrap();
    let allowed = pre
        .headers()
        .get("access-control-allow-headers")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default();
    assert!(allowed.contains("x-session-token"), "allowed: {allowed:?}");
    let r = api
        .http
        .patch(&url)
        .header("origin", "https://lms.example")
        .bearer_auth(&at_a)
        .json(&json!({"name": "New Name"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-session-token"));
    let exposed = r
        .headers()
        .get("access-control-expose-headers")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default();
    assert!(exposed.contains("x-session-token"), "exposed: {exposed:?}");

    phase!("the password changes");
    api.call(
        Method::PATCH,
        &user,
        Some(&at_a),
        Some(json!({"password": "a brand new password", "current_password": common::PASSWORD})),
    )
    .await
    .expect(200);
    for at in [&at_a, &at_b] {
        let r = api.get("/api/v1/auth/me", at).await.problem(401);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("session has ended"),
            "{}",
            r.text
        );
    }
    for rt in [rt_a, rt_b] {
        refresh(rt).await.problem(401);
    }
    login(common::PASSWORD).await.problem(401);

    phase!("a new sign-in works, refresh included");
    let (at, rt) = tokens(login("a brand new password").await);
    let me = api.get("/api/v1/auth/me", &at).await.expect(200);
    assert_eq!(me.body["name"], "New Name");
    let (at2, _) = tokens(refresh(rt).await);
    api.get("/api/v1/auth/me", &at2).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_refused_and_writes_nothing() {
    let api = Api::start().await;
    let (_, admin) = api.user_with_role("adm@t.io", "Adm", Role::Admin).await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (sid, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let cid = api.course(&t, "C", 5).await;
    api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
        .await
        .expect(201);
    let aid = api
        .assignment(&t, cid, json!({"title": "A", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    // The longest body allowed, in three-byte characters with a quote and a
    // newline to escape: 150 KB of UTF-8, within the request limit.
    let longest = format!("\"{}\n", "中".repeat(49_998));
    api.post(&sub, &s, json!({ "body": longest }))
        .await
        .expect(201);
    let long = "x".repeat(10_001);
    let course = format!("/api/v1/courses/{cid}");
    let user = format!("/api/v1/users/{sid}");
    let grade = format!("{sub}/{sid}/grade");
    let enroll = format!("{course}/enrollments");
    let assign = format!("{course}/assignments");
    let reg = "/api/v1/auth/register";
    // (method, path, token, body): every body field with a bad value, plus
    // missing, unknown and mistyped fields.
    let cases: Vec<(Method, &str, Option<&str>, Value)> = vec![
        (
            Method::POST,
            reg,
            None,
            json!({"email": "not-an-email", "password": "long enough pw", "name": "N"}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": "n@t.io", "password": "short", "name": "N"}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": "n@t.io", "password": "long enough pw", "name": "   "}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": "n@t.io", "password": "long enough pw", "name": "a\u{0007}b"}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": "n@t.io", "password": "long enough pw"}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": "n@t.io", "password": "long enough pw", "name": "N", "role": "admin"}),
        ),
        (
            Method::POST,
            reg,
            None,
            json!({"email": 5, "password": "long enough pw", "name": "N"}),
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            None,
            json!({"email": "", "password": "x"}),
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            None,
            json!({"email": "s@t.io", "password": ""}),
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            None,
            json!({"email": "s@t.io", "password": "p".repeat(129)}),
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            None,
            json!({"email": "s@t.io", "password": 12345678}),
        ),
        (
            Method::POST,
            "/api/v1/auth/logout",
            Some(&s),
            json!({"refresh_token": ""}),
        ),
        (
            Method::POST,
            "/api/v1/auth/logout",
            Some(&s),
            json!({"refresh_token": "r".repeat(129)}),
        ),
        (Method::POST, "/api/v1/auth/logout", Some(&s), json!({})),
        (
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": ""}),
        ),
        (
            Method::POST,
            "/api/v1/courses",
            Some(&t),
            json!({"title": "", "capacity": 5}),
        ),
        (
            Method::POST,
            "/api/v1/courses",
            Some(&t),
            json!({"title": "x", "capacity": 0}),
        ),
        (
            Method::POST,
            "/api/v1/courses",
            Some(&t),
            json!({"title": "x", "capacity": 10001}),
        ),
        (
            Method::POST,
            "/api/v1/courses",
            Some(&t),
            json!({"title": "x", "capacity": 5, "description": long}),
        ),
        (
            Method::POST,
            "/api/v1/courses",
            Some(&t),
            json!({"title": "x", "capacity": 5, "published": "yes"}),
        ),
        (Method::PATCH, &course, Some(&t), json!({"capacity": 0})),
        (Method::PATCH, &course, Some(&t), json!({"title": ""})),
        (
            Method::PATCH,
            &course,
            Some(&t),
            json!({"description": long}),
        ),
        (Method::PATCH, &course, Some(&t), json!({"description": 7})),
        (Method::PATCH, &course, Some(&t), json!({"published": 1})),
        (Method::POST, &enroll, Some(&t), json!({"role": "dean"})),
        (Method::POST, &enroll, Some(&t), json!({"user_id": "me"})),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "", "max_points": 10}),
        ),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "x", "max_points": 0}),
        ),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "x", "max_points": 10, "max_attempts": 101}),
        ),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "x", "max_points": 10, "due_at": "tomorrow"}),
        ),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "x", "max_points": 10, "allow_late": "no"}),
        ),
        (
            Method::POST,
            &assign,
            Some(&t),
            json!({"title": "x", "max_points": 10, "description": long}),
        ),
        (Method::POST, &sub, Some(&s), json!({"body": ""})),
        (
            Method::POST,
            &sub,
            Some(&s),
            json!({"body": "中".repeat(50_001)}),
        ),
        (Method::POST, &sub, Some(&s), json!({"body": 42})),
        (Method::PUT, &grade, Some(&t), json!({"score": -1})),
        (Method::PUT, &grade, Some(&t), json!({"score": 11})),
        (Method::PUT, &grade, Some(&t), json!({"score": "A+"})),
        (
            Method::PUT,
            &grade,
            Some(&t),
            json!({"score": 5, "feedback": long}),
        ),
        (Method::PATCH, &user, Some(&s), json!({"name": ""})),
        (
            Method::PATCH,
            &user,
            Some(&admin),
            json!({"role": "emperor"}),
        ),
        (
            Method::PATCH,
            &user,
            Some(&s),
            json!({"password": "short", "current_password": common::PASSWORD}),
        ),
        (
            Method::PATCH,
            &user,
            Some(&s),
            json!({"password": "a new long password"}),
        ),
        (
            Method::PATCH,
            &user,
            Some(&s),
            json!({"password": "a new long password", "current_password": "wrong password"}),
        ),
    ];
    let before = api.snapshot().await;
    for (method, path, token, body) in cases {
        let r = api
            .call(method.clone(), path, token, Some(body.clone()))
            .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{method} {path} {body}: got {} {}",
            r.status,
            r.text
        );
        let status = r.status.as_u16();
        let r = r.problem(status);
        if r.status == 422 && body.is_object() {
            assert!(
                r.body["errors"].as_array().is_some_and(|e| !e.is_empty()),
                "{}",
                r.text
            );
        }
    }
    phase!("malformed JSON, wrong media type, bad paths and paging");
    let raw = api
        .http
        .post(format!("{}/api/v1/courses", api.base))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{\"title\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let raw = api
        .http
        .post(format!("{}/api/v1/courses", api.base))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("title=x")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 415);
    api.get("/api/v1/courses/not-a-number", &t)
        .await
        .problem(400);
    api.get("/api/v1/courses?per_page=0", &t).await.problem(422);
    api.get("/api/v1/courses?per_page=101", &t)
        .await
        .problem(422);
    api.get("/api/v1/courses?cursor=%21%21", &t)
        .await
        .problem(422);
    let huge = json!({"body": "y".repeat(600_000)});
    let r = api.post(&sub, &s, huge).await.problem(413);
    assert!(
        r.body["detail"].as_str().unwrap().contains("524288"),
        "{}",
        r.text
    );
    phase!("nothing was written");
    assert_eq!(api.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let cluster = common::cluster().await;
    let mut cfg = common::config(cluster.endpoints());
    cfg.rate_limit_user_per_s = 1;
    cfg.rate_limit_user_burst = 5;
    let api = Api::on(cluster, cfg).await;
    let (uid, tok) = api.user_with_role("u@t.io", "U", Role::Student).await;
    phase!("per user");
    let mut codes = Vec::new();
    let mut limited: Option<Resp> = None;
    for _ in 0..20 {
        let r = api.get("/api/v1/auth/me", &tok).await;
        codes.push(r.status.as_u16());
        if r.status == 429 {
            limited = Some(r);
        }
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 5, "{codes:?}");
    let r = limited.expect("a 429").problem(429);
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&after));
    phase!("per IP, on a second API with a small IP quota");
    let mut cfg = common::config(api.cluster.endpoints());
    cfg.rate_limit_ip_per_s = 1;
    cfg.rate_limit_ip_burst = 3;
    let (_st, base, server) = common::serve(cfg).await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        let r = api
            .call(
                Method::POST,
                &format!("{base}/api/v1/auth/login"),
                None,
                Some(json!({"email": "x@t.io", "password": "whatever1"})),
            )
            .await;
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
        }
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes.iter().filter(|c| **c == 401).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 7, "{codes:?}");
    let health = api
        .call(Method::GET, &format!("{base}/healthz"), None, None)
        .await;
    assert_eq!(health.status, 200, "health probes are not rate limited");
    server.abort();

    phase!("per account logins, apart from the account's requests");
    let mut cfg = common::config(api.cluster.endpoints());
    cfg.login_attempts_per_min = 1;
    cfg.login_attempts_burst = 3;
    let (_st, base, server) = common::serve(cfg).await;
    let login = |password: &'static str| {
        let a = &api;
        let base = base.clone();
        async move {
            a.call(
                Method::POST,
                &format!("{base}/api/v1/auth/login"),
                None,
                Some(json!({"email": "u@t.io", "password": password})),
            )
            .await
        }
    };
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = login("a wrong guess").await;
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
        }
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes, [401, 401, 401, 429, 429, 429]);
    // The guesses used up the account's logins, not its requests: its
    // session goes on.
    api.call(
        Method::GET,
        &format!("{base}/api/v1/auth/me"),
        Some(tok.as_str()),
        None,
    )
    .await
    .expect(200);
    login(common::PASSWORD).await.problem(429);
    server.abort();

    phase!("guesses of the current password in a password change count as logins");
    let mut cfg = common::config(api.cluster.endpoints());
    cfg.login_attempts_per_min = 1;
    cfg.login_attempts_burst = 3;
    let (_st, base, server) = common::serve(cfg).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = api
            .call(
                Method::PATCH,
                &format!("{base}/api/v1/users/{uid}"),
                Some(tok.as_str()),
                Some(
                    json!({"password": "a new long password", "current_password": "a wrong guess"}),
                ),
            )
            .await;
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes, [422, 422, 422, 429, 429]);
    let r = api
        .call(
            Method::POST,
            &format!("{base}/api/v1/auth/login"),
            None,
            Some(json!({"email": "u@t.io", "password": common::PASSWORD})),
        )
        .await;
    r.problem(429);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_holds_under_50_concurrent_enrollments() {
    const CAPACITY: u32 = 10;
    const STUDENTS: usize = 50;
    let api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let cid = api.course(&t, "Small", CAPACITY).await;
    phase!("create {STUDENTS} students");
    let mut tokens = Vec::new();
    for i in 0..STUDENTS {
        tokens.push(
            api.user_with_role(&format!("s{i}@t.io"), "S", Role::Student)
                .await
                .1,
        );
    }
    phase!("{STUDENTS} enrollments at once");
    let path = format!("/api/v1/courses/{cid}/enrollments");
    let calls = tokens.iter().map(|tok| api.post(&path, tok, json!({})));
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.status == 201).count();
    let full = results.iter().filter(|r| r.status == 409).count();
    assert_eq!(
        ok,
        CAPACITY as usize,
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(full, STUDENTS - CAPACITY as usize);
    phase!("the roster and the counter agree");
    let roster = api
        .get(&format!("{path}?per_page=100"), &t)
        .await
        .expect(200);
    let students = roster
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "student")
        .count();
    assert_eq!(students, CAPACITY as usize);
    let seats = api
        .st
        .db
        .get::<lms_api::model::Seats>(
            lms_api::keys::seats(cid),
            lmskv_client::ReadConsistency::Strong,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seats.value.students, CAPACITY);
    api.call(
        Method::PATCH,
        &format!("/api/v1/courses/{cid}"),
        Some(&t),
        Some(json!({"capacity": CAPACITY - 1})),
    )
    .await
    .problem(409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_returns_every_item_exactly_once() {
    const COURSES: usize = 23;
    let api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (_, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let mut created = HashSet::new();
    for i in 0..COURSES {
        // Every third course is a draft the student must not see.
        let id = api
            .post(
                "/api/v1/courses",
                &t,
                json!({"title": format!("C{i}"), "capacity": 5, "published": i % 3 != 0}),
            )
            .await
            .expect(201)
            .body["id"]
            .as_u64()
            .unwrap();
        created.insert((id, i % 3 != 0));
    }
    for (who, tok, want) in [
        (
            "teacher",
            &t,
            created.iter().map(|c| c.0).collect::<HashSet<_>>(),
        ),
        (
            "student",
            &s,
            created.iter().filter(|c| c.1).map(|c| c.0).collect(),
        ),
    ] {
        for per_page in [1, 4, 7, 100] {
            phase!("{who} walks the catalogue with per_page={per_page}");
            let mut seen = Vec::new();
            let mut url = format!("/api/v1/courses?per_page={per_page}");
            let mut pages = 0;
            loop {
                let r = api
                    .call_with(
                        Method::GET,
                        &url,
                        Some(tok),
                        None,
                        &[("cache-control", "no-cache")],
                    )
                    .await
                    .expect(200);
                let items = r.body.as_array().unwrap();
                assert!(items.len() <= per_page);
                seen.extend(items.iter().map(|c| c["id"].as_u64().unwrap()));
                pages += 1;
                assert!(pages <= COURSES + 2, "pagination does not end");
                match next_link(&r) {
                    Some(next) => url = next,
                    None => break,
                }
            }
            let unique: HashSet<u64> = seen.iter().copied().collect();
            assert_eq!(unique.len(), seen.len(), "an item came twice: {seen:?}");
            assert_eq!(unique, want);
        }
    }
    phase!("default page size is 10");
    let r = api
        .call_with(
            Method::GET,
            "/api/v1/courses",
            Some(&t),
            None,
            &[("cache-control", "no-cache")],
        )
        .await
        .expect(200);
    assert_eq!(r.body.as_array().unwrap().len(), 10);
    assert!(next_link(&r).unwrap().contains("per_page=10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grading_with_if_match_lets_one_win() {
    let api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (sid, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let cid = api.course(&t, "C", 5).await;
    api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
        .await
        .expect(201);
    let aid = api
        .assignment(&t, cid, json!({"title": "A", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions/{sid}");
    api.post(
        &format!("/api/v1/courses/{cid}/assignments/{aid}/submissions"),
        &s,
        json!({"body": "b"}),
    )
    .await
    .expect(201);
    let etag = api.get(&sub, &t).await.expect(200).header("etag").unwrap();
    let grade_path = format!("{sub}/grade");
    let api_ref = &api;
    let grade = |score: u32| {
        let (api, path, t, etag) = (api_ref, &grade_path, &t, &etag);
        async move {
            api.call_with(
                Method::PUT,
                path,
                Some(t),
                Some(json!({"score": score})),
                &[("if-match", etag.as_str())],
            )
            .await
        }
    };
    let (a, b) = tokio::join!(grade(4), grade(9));
    let mut codes = [a.status.as_u16(), b.status.as_u16()];
    codes.sort();
    assert_eq!(codes, [200, 412]);
    let winner = if a.status == 200 { 4.0 } else { 9.0 };
    assert_eq!(api.get(&sub, &t).await.body["grade"]["score"], winner);
}

/// Publishes assignment `aid`'s grades and waits for its notification job,
/// which must succeed; returns the job id.
async fn publish(api: &Api, teacher: &str, cid: u64, aid: u64) -> u64 {
    let r = api
        .post(
            &format!("/api/v1/courses/{cid}/assignments/{aid}/publish-grades"),
            teacher,
            json!({}),
        )
        .await
        .expect(202);
    let id = r.body["job"]["id"].as_u64().unwrap();
    let job = finished_job(api, teacher, id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    id
}

/// The ids of `uid`'s notifications, read STRONG from the store.
async fn notification_ids(api: &Api, uid: u64) -> Vec<u64> {
    api.st
        .db
        .scan_prefix::<Notification>(&keys::notifications(uid), ReadConsistency::Strong)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.value.id)
        .collect()
}

/// The setup of the grade-notice tests: a teacher's course with one
/// assignment ("Essay", 100 points) that every one of its students, each
/// enrolled, has submitted.
struct EssayCourse {
    /// The teacher's access token.
    teacher: String,
    cid: u64,
    aid: u64,
    /// The students' ids, of `s0@t.io`, `s1@t.io`, … in that order.
    students: Vec<u64>,
}

impl EssayCourse {
    /// Creates the teacher `t@t.io`, the course, the assignment and
    /// `students` students, each enrolled and with a submission.
    async fn new(api: &Api, students: usize) -> EssayCourse {
        let (_, teacher) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
        let cid = api.course(&teacher, "C", 10).await;
        let aid = api
            .assignment(&teacher, cid, json!({"title": "Essay", "max_points": 100}))
            .await;
        let mut ids = Vec::new();
        for i in 0..students {
            let (sid, s) = api
                .user_with_role(&format!("s{i}@t.io"), "S", Role::Student)
                .await;
            api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
                .await
                .expect(201);
            api.post(
                &format!("/api/v1/courses/{cid}/assignments/{aid}/submissions"),
                &s,
                json!({"body": "my essay"}),
            )
            .await
            .expect(201);
            ids.push(sid);
        }
        EssayCourse {
            teacher,
            cid,
            aid,
            students: ids,
        }
    }

    /// Grades student `sid`'s submission as the teacher.
    async fn grade(&self, api: &Api, sid: u64, score: f64, feedback: &str) {
        let (cid, aid) = (self.cid, self.aid);
        api.call(
            Method::PUT,
            &format!("/api/v1/courses/{cid}/assignments/{aid}/submissions/{sid}/grade"),
            Some(&self.teacher),
            Some(json!({"score": score, "feedback": feedback})),
        )
        .await
        .expect(200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_grades_again_notifies_only_new_and_changed_grades() {
    let api = Api::start().await;
    let c = EssayCourse::new(&api, 3).await;
    let (t, cid, aid) = (c.teacher.clone(), c.cid, c.aid);
    let (s0, s1, s2) = (c.students[0], c.students[1], c.students[2]);
    let grade = |sid: u64, score: f64, feedback: &'static str| c.grade(&api, sid, score, feedback);
    let counts = || async {
        let mut out = Vec::new();
        for sid in [s0, s1, s2] {
            out.push(notification_ids(&api, sid).await.len());
        }
        out
    };

    phase!("a first publish notifies the graded student once");
    grade(s0, 80.0, "good").await;
    let first = publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [1, 0, 0]);
    assert_eq!(notification_ids(&api, s0).await, [first]);

    phase!("publishing again notifies no one of an unchanged grade");
    publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [1, 0, 0]);

    phase!("a newly graded student is notified, the others are not");
    grade(s1, 70.0, "ok").await;
    publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [1, 1, 0]);

    phase!("a regrade to the same score and feedback is no new grade");
    grade(s0, 80.0, "good").await;
    publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [1, 1, 0]);

    phase!("a changed score, or a changed feedback, is notified once");
    grade(s0, 90.0, "good").await;
    grade(s1, 70.0, "ok after all").await;
    let changed = publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [2, 2, 0]);
    assert_eq!(notification_ids(&api, s0).await, [first, changed]);
    publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [2, 2, 0]);

    phase!("two publishes at once notify a new grade once");
    grade(s2, 60.0, "").await;
    let path = format!("/api/v1/courses/{cid}/assignments/{aid}/publish-grades");
    let (a, b) = tokio::join!(
        api.post(&path, &t, json!({})),
        api.post(&path, &t, json!({}))
    );
    for r in [a.expect(202), b.expect(202)] {
        let id = r.body["job"]["id"].as_u64().unwrap();
        assert_eq!(finished_job(&api, &t, id).await["state"], "succeeded");
    }
    assert_eq!(counts().await, [2, 2, 1]);

    phase!("a claim of a job that is gone without its notification is taken over");
    // As if a job claimed s2's grade and was dead-lettered before writing
    // the notification (job 999999 has no record; nothing at its key).
    let key = keys::grade_notice(cid, aid, s2);
    let cur = api
        .st
        .db
        .get::<GradeNotice>(key.clone(), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("s2's notice");
    let mut orphan = cur.value.clone();
    orphan.job_id = 999_999;
    api.st
        .db
        .cas(key.clone(), cur.version, Some(&orphan))
        .await
        .unwrap();
    let takeover = publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [2, 2, 2]);
    assert_eq!(notification_ids(&api, s2).await.last(), Some(&takeover));
    publish(&api, &t, cid, aid).await;
    assert_eq!(counts().await, [2, 2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grade_read_before_a_regrade_never_replaces_the_newer_notice() {
    let api = Api::start().await;
    let c = EssayCourse::new(&api, 2).await;
    let (t, cid, aid) = (c.teacher.clone(), c.cid, c.aid);
    let (s0, s1) = (c.students[0], c.students[1]);
    let grade = |sid: u64, score: f64, feedback: &'static str| c.grade(&api, sid, score, feedback);
    let db = &api.st.db;
    let a = db
        .get::<Assignment>(keys::assignment(cid, aid), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("assignment")
        .value;
    // What a job's scan reads of a student's submission.
    let scan = |sid: u64| async move {
        let s = db
            .get::<SubmissionGrade>(keys::submission(cid, aid, sid), ReadConsistency::Strong)
            .await
            .unwrap()
            .expect("submission");
        Graded {
            student_id: sid,
            grade: s.value.grade.expect("graded"),
            version: s.version,
        }
    };
    let notice = |sid: u64| async move {
        db.get::<GradeNotice>(keys::grade_notice(cid, aid, sid), ReadConsistency::Strong)
            .await
            .unwrap()
    };
    // Jobs that scanned before the regrade and claim only after it (no
    // record: as if dead-lettered since).
    let (stale0, stale1) = (999_001, 999_002);

    phase!("a stale grade read does not replace the notice of a newer, notified grade");
    grade(s0, 80.0, "good").await;
    let old = scan(s0).await;
    assert!(notice(s0).await.is_none());
    grade(s0, 90.0, "better").await;
    let newer = publish(&api, &t, cid, aid).await;
    assert_eq!(notification_ids(&api, s0).await, [newer]);
    // The stale job read no notice, and the grade 80 of the submission's
    // older version: its claim must fail on the submission, and the current
    // grade (90) was notified by `newer`.
    let out = notices::notify_student(db, stale0, &a, old, None)
        .await
        .unwrap();
    assert_eq!(out, notices::Outcome::Already);
    let n = notice(s0).await.expect("s0's notice");
    assert_eq!(n.value.job_id, newer);
    assert!(n.value.is_of(&scan(s0).await.grade), "{n:?}");
    assert_eq!(notification_ids(&api, s0).await, [newer]);
    publish(&api, &t, cid, aid).await;
    assert_eq!(notification_ids(&api, s0).await, [newer]);

    phase!("a stale grade read notifies the current grade, once");
    grade(s1, 50.0, "").await;
    let old = scan(s1).await;
    grade(s1, 60.0, "regraded").await;
    let out = notices::notify_student(db, stale1, &a, old, None)
        .await
        .unwrap();
    assert_eq!(out, notices::Outcome::Notified);
    let n = notice(s1).await.expect("s1's notice");
    assert_eq!(n.value.job_id, stale1);
    assert!(n.value.is_of(&scan(s1).await.grade), "{n:?}");
    assert_eq!(notification_ids(&api, s1).await, [stale1]);
    // Of the current grade: a publish does not notify it again (the claim's
    // job is gone, but its notification is there).
    publish(&api, &t, cid, aid).await;
    assert_eq!(notification_ids(&api, s1).await, [stale1]);
    assert_eq!(notification_ids(&api, s0).await, [newer]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_user_write_failed_can_be_retried_at_once() {
    let api = Api::start().await;
    let register = |email: &'static str| {
        let api = &api;
        async move {
            api.call(
                Method::POST,
                "/api/v1/auth/register",
                None,
                Some(json!({"email": email, "password": common::PASSWORD, "name": "R"})),
            )
            .await
        }
    };

    phase!("a user write the client refuses before sending releases the e-mail claim");
    // A name of over 1 MiB makes the user record larger than lmskv's value
    // limit (1 MiB): the claim is written, then the client's own size check
    // refuses the user write before sending it (ClientError::InvalidArgument),
    // so nothing reached the store and the claim is released. A refusal by
    // a node would keep the claim (the write may have landed).
    let err = accounts::create_user(
        &api.st,
        "Again@t.io",
        common::PASSWORD.into(),
        &"x".repeat(1_100_000),
        Role::Student,
    )
    .await
    .expect_err("the user record is too large");
    assert!(
        matches!(&err, AppError::Internal(m) if m.starts_with("invalid argument `value`: value is")),
        "refused by the client's size check: {err:?}"
    );
    let claim = api
        .st
        .db
        .get::<EmailClaim>(keys::email("again@t.io"), ReadConsistency::Strong)
        .await
        .unwrap();
    assert!(claim.is_none(), "the claim was released: {claim:?}");

    phase!("an immediate retry registers, once");
    let id = register("again@t.io").await.expect(201).body["id"]
        .as_u64()
        .unwrap();
    api.login("again@t.io").await;
    register("again@t.io").await.problem(409);
    let me = api
        .st
        .db
        .get::<EmailClaim>(keys::email("again@t.io"), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("claim");
    assert_eq!(me.value.user_id, id);

    phase!("a claim is released only by the registration that holds it");
    let ekey = keys::email("held@t.io");
    let claim = |user_id| EmailClaim {
        user_id,
        claimed_at: chrono::Utc::now(),
    };
    let Cas::Done { version: old, .. } = api
        .st
        .db
        .cas(ekey.clone(), 0, Some(&claim(1)))
        .await
        .unwrap()
    else {
        panic!("claim");
    };
    // Taken over by another registration (as after a stale claim).
    let Cas::Done { version: new, .. } = api
        .st
        .db
        .cas(ekey.clone(), old, Some(&claim(2)))
        .await
        .unwrap()
    else {
        panic!("takeover");
    };
    assert!(!accounts::release_claim(&api.st.db, ekey.clone(), old)
        .await
        .unwrap());
    let held = api
        .st
        .db
        .get::<EmailClaim>(ekey.clone(), ReadConsistency::Strong)
        .await
        .unwrap()
        .expect("the newer claim stays");
    assert_eq!(held.value.user_id, 2);
    assert!(accounts::release_claim(&api.st.db, ekey.clone(), new)
        .await
        .unwrap());

    phase!("of concurrent registrations of one e-mail exactly one succeeds");
    let all = futures::future::join_all((0..8).map(|_| register("race@t.io"))).await;
    let mut codes: Vec<u16> = all.iter().map(|r| r.status.as_u16()).collect();
    codes.sort();
    assert_eq!(codes, [201, 409, 409, 409, 409, 409, 409, 409], "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_restores_a_lost_index_entry() {
    let api = Api::start().await;
    let (_, admin) = api.user_with_role("a@t.io", "A", Role::Admin).await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (sid, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let cid = api.course(&t, "C", 5).await;
    api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
        .await
        .expect(201);
    phase!("simulate a crash between the enrollment and its index write");
    let db = &api.st.db;
    db.delete(lms_api::keys::user_course(sid, cid))
        .await
        .unwrap();
    // ... and a leftover index entry for a course the student is not in.
    db.put(
        lms_api::keys::user_course(sid, cid + 1000),
        &lms_api::model::UserCourse {
            course_id: cid + 1000,
            role: lms_api::model::CourseRole::Student,
        },
    )
    .await
    .unwrap();
    let mine = format!("/api/v1/users/{sid}/courses");
    let fresh = [("cache-control", "no-cache")];
    assert!(api
        .call_with(Method::GET, &mine, Some(&s), None, &fresh)
        .await
        .body
        .as_array()
        .unwrap()
        .is_empty());
    let report = api
        .post("/api/v1/admin/repair", &admin, json!({}))
        .await
        .expect(200);
    assert_eq!(report.body["index_added"], 1, "{}", report.text);
    assert_eq!(report.body["index_removed"], 1, "{}", report.text);
    let after = api
        .post("/api/v1/admin/repair", &admin, json!({}))
        .await
        .expect(200);
    assert_eq!(
        after.body["index_added"], 0,
        "a second pass finds nothing: {}",
        after.text
    );
    let list = wait_for("the repaired index", Duration::from_secs(10), || async {
        let r = api.get(&mine, &s).await.expect(200);
        (r.body.as_array().unwrap().len() == 1).then_some(r.body)
    })
    .await
    .unwrap();
    assert_eq!(list[0]["course"]["id"], cid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_pages_through_every_course_and_fixes_only_what_is_wrong() {
    use lms_api::keys;
    use lms_api::model::{Course, CourseRole, UserCourse};
    let api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let mut students = Vec::new();
    for i in 0..5 {
        students.push(
            api.user_with_role(&format!("s{i}@t.io"), "S", Role::Student)
                .await,
        );
    }
    let mut courses = Vec::new();
    for i in 0..3 {
        let cid = api.course(&t, &format!("C{i}"), 10).await;
        for (_, s) in &students {
            api.post(&format!("/api/v1/courses/{cid}/enrollments"), s, json!({}))
                .await
                .expect(201);
        }
        courses.push(cid);
    }
    let db = &api.st.db;
    // Keys of a course the pass has no business with; raw junk, so that
    // decoding one would fail the pass.
    for (sid, _) in &students {
        db.put_raw(keys::submission(courses[1], 77, *sid), "not json".into())
            .await
            .unwrap();
    }
    let pairs = |snap: Vec<(Vec<u8>, Vec<u8>, u64)>| -> Vec<(Vec<u8>, Vec<u8>)> {
        snap.into_iter().map(|(k, v, _)| (k, v)).collect()
    };
    let before = pairs(api.snapshot().await);

    phase!("break the index and the catalogue");
    let (s0, s1, s2, s4) = (students[0].0, students[1].0, students[2].0, students[4].0);
    let (c0, c1, c2) = (courses[0], courses[1], courses[2]);
    db.delete(keys::user_course(s0, c0)).await.unwrap();
    db.delete(keys::user_course(s4, c2)).await.unwrap();
    let wrong_role = UserCourse {
        course_id: c1,
        role: CourseRole::Ta,
    };
    db.put(keys::user_course(s1, c1), &wrong_role)
        .await
        .unwrap();
    let orphan = UserCourse {
        course_id: c2 + 1000,
        role: CourseRole::Student,
    };
    db.put(keys::user_course(s2, c2 + 1000), &orphan)
        .await
        .unwrap();
    db.delete(keys::catalog(c1)).await.unwrap();
    let mut stale = db
        .get::<Course>(keys::course(c2), lmskv_client::ReadConsistency::Strong)
        .await
        .unwrap()
        .unwrap()
        .value;
    stale.title = "stale".into();
    db.put(keys::catalog(c2), &stale).await.unwrap();
    stale.id = c2 + 1000;
    db.put(keys::catalog(c2 + 1000), &stale).await.unwrap();

    phase!("a pass two keys at a time fixes exactly that");
    let report = lms_api::repair::repair_with_page(db, 2).await.unwrap();
    assert_eq!(
        report,
        lms_api::repair::RepairReport {
            index_added: 3,
            index_removed: 1,
            catalog_updated: 2,
            catalog_removed: 1,
            notices_enqueued: 0,
            failed: 0,
        }
    );
    assert_eq!(pairs(api.snapshot().await), before);
    let again = lms_api::repair::repair_with_page(db, 2).await.unwrap();
    assert_eq!(again, lms_api::repair::RepairReport::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_lmskv_node_mid_flow_does_not_fail_it() {
    let mut api = Api::start().await;
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let (sid, s) = api.user_with_role("s@t.io", "S", Role::Student).await;
    let cid = api.course(&t, "Resilient", 5).await;
    phase!("kill -9 the leader");
    let leader = api
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    api.cluster.kill(leader).unwrap();
    phase!("the flow continues through failover");
    api.post(&format!("/api/v1/courses/{cid}/enrollments"), &s, json!({}))
        .await
        .expect(201);
    let aid = api
        .assignment(&t, cid, json!({"title": "A", "max_points": 10}))
        .await;
    let sub = format!("/api/v1/courses/{cid}/assignments/{aid}/submissions");
    api.post(&sub, &s, json!({"body": "b"})).await.expect(201);
    phase!("kill the new leader too after restarting the first");
    api.cluster.spawn(leader).unwrap();
    let second = api
        .cluster
        .wait_leader(Duration::from_secs(20))
        .await
        .unwrap();
    api.cluster.kill(second).unwrap();
    api.call(
        Method::PUT,
        &format!("{sub}/{sid}/grade"),
        Some(&t),
        Some(json!({"score": 7})),
    )
    .await
    .expect(200);
    let book = api
        .get(&format!("/api/v1/courses/{cid}/gradebook"), &t)
        .await
        .expect(200);
    assert_eq!(book.body["students"][0]["total"], 7.0);
    api.get("/api/v1/auth/me", &s).await.expect(200);
    // Readiness is a 2 s STRONG read of one range; right after a leader was
    // killed that range may still be electing, so not-ready (503) is a correct
    // answer for a moment. The service must become ready again once it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = api.call(Method::GET, "/readyz", None, None).await;
        if r.status.as_u16() == 200 {
            break;
        }
        assert_eq!(r.status.as_u16(), 503, "readyz: {}", r.text);
        assert!(
            std::time::Instant::now() < deadline,
            "the API is still not ready 20 s after the failover: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
