//! The demo data `make run` starts with: an admin, two teachers, four
//! students, three courses (one unpublished, one nearly full), enrollments
//! and an assignment. Seeding is idempotent: it does nothing when the demo
//! admin already exists.

use crate::accounts;
use crate::app::AppState;
use crate::error::AppResult;
use crate::model::{CourseRole, Role, User};
use crate::routes::courses::{self, CreateCourseRequest};
use crate::routes::enrollments::enroll_user;

/// The demo password of every demo account.
pub const DEMO_PASSWORD: &str = "demo-password";

/// The demo accounts: (e-mail, name, role).
pub const DEMO_USERS: &[(&str, &str, Role)] = &[
    ("admin@lms.local", "Ada Admin", Role::Admin),
    ("turing@lms.local", "Alan Turing", Role::Teacher),
    ("hopper@lms.local", "Grace Hopper", Role::Teacher),
    ("student1@lms.local", "Sam Student", Role::Student),
    ("student2@lms.local", "Kim Student", Role::Student),
    ("student3@lms.local", "Lee Student", Role::Student),
    ("student4@lms.local", "Max Student", Role::Student),
];

/// Creates the demo data unless it exists; returns whether it was created.
pub async fn seed_demo(st: &AppState) -> AppResult<bool> {
    if accounts::user_by_email(st, DEMO_USERS[0].0)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let mut users: Vec<User> = Vec::new();
    for (email, name, role) in DEMO_USERS {
        users.push(accounts::create_user(st, email, DEMO_PASSWORD.into(), name, *role).await?);
    }
    let (turing, hopper) = (&users[1], &users[2]);
    let students = &users[3..];
    let rust = courses::create(
        st,
        turing,
        CreateCourseRequest {
            title: "Introduction to Rust".into(),
            description: "Ownership, borrowing, traits and async.".into(),
            capacity: 30,
            published: true,
        },
    )
    .await?;
    let dist = courses::create(
        st,
        hopper,
        CreateCourseRequest {
            title: "Distributed Systems".into(),
            description: "Consensus, replication and sharding (3 seats).".into(),
            capacity: 3,
            published: true,
        },
    )
    .await?;
    courses::create(
        st,
        hopper,
        CreateCourseRequest {
            title: "Compilers (draft)".into(),
            description: "Not published yet.".into(),
            capacity: 20,
            published: false,
        },
    )
    .await?;
    for s in students {
        enroll_user(st, rust.id, s, CourseRole::Student).await?;
    }
    for s in &students[..2] {
        enroll_user(st, dist.id, s, CourseRole::Student).await?;
    }
    enroll_user(st, rust.id, hopper, CourseRole::Ta).await?;
    let aid = st.db.next_id("assignment").await?;
    let now = chrono::Utc::now();
    let a = crate::model::Assignment {
        id: aid,
        course_id: rust.id,
        title: "Write a linked list".into(),
        description: "Safe Rust only.".into(),
        due_at: Some(now + chrono::Duration::days(7)),
        max_points: 100,
        max_attempts: 3,
        allow_late: false,
        grades_published: false,
        created_at: now,
        updated_at: now,
    };
    st.db.put(crate::keys::assignment(rust.id, aid), &a).await?;
    Ok(true)
}
