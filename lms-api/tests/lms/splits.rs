//! The LMS on a cluster that keeps splitting under load: with the node
//! setting `split_rows = [{ prefix = "course/", id_len = 8 }]` (what
//! `lms_api::keys::node_config_toml` gives), automatic splits land only
//! between courses, so enrollments (an atomic batch of seat counter and
//! member) and grading (CAS) keep working while their ranges split.

use super::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Api;
use lms_api::keys;
use lms_api::model::Role;
use lmskv_client::ReadConsistency;
use lmskv_tests::phase;
use serde_json::json;

const COURSES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_splits_never_cut_a_course() {
    // Any range serving more than 10 requests/s for a second is split.
    let cluster = common::cluster_with(
        "split_qps = 10.0\nsplit_qps_duration_s = 1\nnode_heartbeat_ms = 200\n",
    )
    .await;
    let cfg = common::config(cluster.endpoints());
    let api = Arc::new(Api::on(cluster, cfg).await);
    let (_, t) = api.user_with_role("t@t.io", "T", Role::Teacher).await;
    let mut courses = Vec::new();
    for i in 0..COURSES {
        courses.push(api.course(&t, &format!("C{i}"), 100).await);
    }
    let mut students = Vec::new();
    for i in 0..COURSES {
        students.push(
            api.user_with_role(&format!("s{i}@t.io"), "S", Role::Student)
                .await,
        );
    }

    phase!("enroll and leave over and over while the course ranges split");
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, (sid, tok)) in students.into_iter().enumerate() {
        let cid = courses[i];
        let (api, stop, ops) = (api.clone(), stop.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                api.post(
                    &format!("/api/v1/courses/{cid}/enrollments"),
                    &tok,
                    json!({}),
                )
                .await
                .expect(201);
                api.call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/courses/{cid}/enrollments/{sid}"),
                    Some(&tok),
                    None,
                )
                .await
                .expect(204);
                ops.fetch_add(2, Ordering::Relaxed);
            }
        }));
    }
    let client = api.cluster.client();
    let course_starts = lmskv_tests::wait_for(
        "a load split inside the course table",
        Duration::from_secs(40),
        || {
            let client = client.clone();
            async move {
                let starts: Vec<Vec<u8>> = common::range_starts(&client)
                    .await?
                    .into_iter()
                    .filter(|s| s.starts_with(keys::COURSE) && s.as_slice() != keys::COURSE)
                    .collect();
                (starts.len() >= 2).then_some(starts)
            }
        },
    )
    .await
    .expect("the course table split");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        // A failed request panics its task: it fails the test here.
        t.await.expect("every enrollment and removal succeeded");
    }
    println!(
        "{} requests; course ranges start at {:?}",
        ops.load(Ordering::Relaxed),
        course_starts
            .iter()
            .map(|s| lmskv_proto_escape(s))
            .collect::<Vec<_>>()
    );

    phase!("every range boundary in course/ is a course's first key");
    for s in &course_starts {
        assert_eq!(
            s.len(),
            keys::COURSE.len() + keys::COURSE_ID_BYTES,
            "a range starts inside a course: {}",
            lmskv_proto_escape(s)
        );
    }

    phase!("every seat was given back: the batches applied whole");
    for cid in courses {
        let seats = api
            .st
            .db
            .get::<lms_api::model::Seats>(keys::seats(cid), ReadConsistency::Strong)
            .await
            .unwrap()
            .map_or(0, |r| r.value.students);
        assert_eq!(seats, 0, "course {cid}");
        let members = api
            .st
            .db
            .scan_prefix::<serde_json::Value>(&keys::members(cid), ReadConsistency::Strong)
            .await
            .unwrap();
        assert_eq!(members.len(), 1, "course {cid}: only the teacher is left");
    }
}

fn lmskv_proto_escape(b: &[u8]) -> String {
    b.iter()
        .map(|c| match c {
            0x20..=0x7e => (*c as char).to_string(),
            _ => format!("\\x{c:02x}"),
        })
        .collect()
}
