//! The records the LMS stores in lmskv (as JSON) and the views it returns.
//!
//! Stored records derive `Serialize`/`Deserialize`; views returned by the API
//! also derive `ToSchema` for the OpenAPI document. Secrets (password hashes)
//! live only in stored records and never in a view.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A user's global role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Teacher,
    Student,
}

/// A user as stored at `user/<uid>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub password_hash: String,
    /// Raised whenever the account's sessions must end (its password
    /// changed): access and refresh tokens issued under an older value are
    /// refused. Records written before the field existed read as 0.
    #[serde(default)]
    pub session_generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Fields this version does not know, kept as read so that rewriting
    /// the record (a name change) does not drop them: during a rolling
    /// upgrade an older process must not erase what a newer one added (a
    /// newer session field, say). Empty for records this version wrote.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: u64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            id: u.id,
            email: u.email.clone(),
            name: u.name.clone(),
            role: u.role,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

/// The owner of an e-mail address, at `email/<e-mail>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmailClaim {
    pub user_id: u64,
    pub claimed_at: DateTime<Utc>,
}

/// A refresh token, stored under the SHA-256 of its value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshToken {
    pub user_id: u64,
    pub expires_at: DateTime<Utc>,
    /// The user's `session_generation` when the token was issued.
    #[serde(default)]
    pub session_generation: u64,
}

/// A course, at `course/<cid>/i` (and its catalogue copy at `catalog/<cid>`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Course {
    pub id: u64,
    pub title: String,
    pub description: String,
    /// The teacher who created the course.
    pub owner_id: u64,
    /// Whether students see the course in the catalogue and may enroll.
    pub published: bool,
    /// Most students that may be enrolled at once.
    pub capacity: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The number of enrolled students, at `course/<cid>/n`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Seats {
    pub students: u32,
}

/// A role within one course.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CourseRole {
    Student,
    Teacher,
    Ta,
}

/// A member of a course, at `course/<cid>/m/<uid>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub course_id: u64,
    pub user_id: u64,
    pub role: CourseRole,
    /// The user's name and e-mail when they were enrolled.
    pub name: String,
    pub email: String,
    pub enrolled_at: DateTime<Utc>,
}

/// An entry of the index of a user's courses, at `usercourse/<uid>/<cid>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserCourse {
    pub course_id: u64,
    pub role: CourseRole,
}

/// An assignment, at `course/<cid>/a/<aid>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    pub id: u64,
    pub course_id: u64,
    pub title: String,
    pub description: String,
    /// Submissions after this time are late (refused unless `allow_late`).
    pub due_at: Option<DateTime<Utc>>,
    pub max_points: u32,
    /// How many times a student may submit (resubmissions replace the previous one).
    pub max_attempts: u32,
    pub allow_late: bool,
    /// Whether students see their grades.
    pub grades_published: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A grade given to a submission.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Grade {
    pub score: f64,
    pub feedback: String,
    pub graded_by: u64,
    pub graded_at: DateTime<Utc>,
}

/// A student's submission to an assignment, with its grade, at
/// `course/<cid>/s/<aid>/<uid>`. Grade and submission share one key so that
/// a resubmission and a grading of the same submission cannot both win.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Submission {
    pub course_id: u64,
    pub assignment_id: u64,
    pub student_id: u64,
    pub body: String,
    /// 1 for the first submission, then one more per resubmission.
    pub attempt: u32,
    pub submitted_at: DateTime<Utc>,
    pub late: bool,
    pub grade: Option<Grade>,
}

/// What a gradebook or a grade notice reads of a [`Submission`]: decoded
/// without its body, which may be the bulk of the record.
#[derive(Debug, Clone, Deserialize)]
pub struct SubmissionScore {
    pub assignment_id: u64,
    pub student_id: u64,
    pub grade: Option<GradeScore>,
}

/// The score of a [`Grade`].
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct GradeScore {
    pub score: f64,
}

/// What a grade notice reads of a [`Submission`]: its student and grade,
/// decoded without the body.
#[derive(Debug, Clone, Deserialize)]
pub struct SubmissionGrade {
    pub student_id: u64,
    pub grade: Option<GradeContent>,
}

/// What a student is told of a [`Grade`]: its score and feedback.
#[derive(Debug, Clone, Deserialize)]
pub struct GradeContent {
    pub score: f64,
    #[serde(default)]
    pub feedback: String,
}

/// The grade a student was last notified of for one assignment, at
/// `course/<cid>/g/<aid>/<uid>`: written (by compare-and-swap) by the
/// notification job before it notifies, so a publish notifies each student
/// once per grade ([`crate::jobs::notices`]). No record: never notified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GradeNotice {
    /// The job that notifies this grade; also the notification's id
    /// (`notif/<uid>/<job_id>`).
    pub job_id: u64,
    /// [`grade_sha256`] of the grade: a changed score or feedback is a
    /// changed grade.
    pub grade_sha256: String,
    pub claimed_at: DateTime<Utc>,
}

impl GradeNotice {
    /// A notice of `grade` by job `job_id`.
    pub fn new(job_id: u64, grade: &GradeContent) -> GradeNotice {
        GradeNotice {
            job_id,
            grade_sha256: grade_sha256(grade),
            claimed_at: Utc::now(),
        }
    }

    /// Whether this notice is of `grade` (the same score and feedback).
    pub fn is_of(&self, grade: &GradeContent) -> bool {
        self.grade_sha256 == grade_sha256(grade)
    }
}

/// SHA-256 (hex) of a grade's score (its bits, as read from the stored
/// submission) and feedback. A digest rather than the score itself: a
/// stored string compares exactly, and the feedback may be long.
pub fn grade_sha256(grade: &GradeContent) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(grade.score.to_bits().to_be_bytes());
    h.update(grade.feedback.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A publish of an assignment's grades whose notification job may not be
/// written yet, at `course/<cid>/p/<aid>`. A publish writes it in one batch
/// with the assignment's `grades_published` and deletes it once the job's
/// record exists; the repair task writes the job of one left behind (the
/// process died, or the job's write failed, after the publish committed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingNotices {
    /// The id of the notification job, allocated before the publish.
    pub job_id: u64,
    /// Who published.
    pub created_by: u64,
    pub published_at: DateTime<Utc>,
}

/// A notification for one user, at `notif/<uid>/<nid>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Notification {
    pub id: u64,
    pub user_id: u64,
    pub message: String,
    pub course_id: u64,
    pub assignment_id: Option<u64>,
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submission_reads_as_its_score_without_its_body() {
        let graded = |grade| Submission {
            course_id: 1,
            assignment_id: 2,
            student_id: 3,
            body: "an essay ".repeat(1_000),
            attempt: 1,
            submitted_at: chrono::Utc::now(),
            late: false,
            grade,
        };
        let g = Grade {
            score: 7.5,
            feedback: "good".into(),
            graded_by: 9,
            graded_at: chrono::Utc::now(),
        };
        let s: SubmissionScore =
            serde_json::from_slice(&serde_json::to_vec(&graded(Some(g))).unwrap()).unwrap();
        assert_eq!((s.assignment_id, s.student_id), (2, 3));
        assert_eq!(s.grade.map(|g| g.score), Some(7.5));
        let s: SubmissionScore =
            serde_json::from_slice(&serde_json::to_vec(&graded(None)).unwrap()).unwrap();
        assert!(s.grade.is_none());
    }

    #[test]
    fn a_grade_notice_is_of_one_score_and_feedback() {
        let g = |score, feedback: &str| GradeContent {
            score,
            feedback: feedback.into(),
        };
        let n = GradeNotice::new(4, &g(7.5, "good"));
        assert!(n.is_of(&g(7.5, "good")));
        assert!(!n.is_of(&g(8.0, "good")), "a changed score");
        assert!(!n.is_of(&g(7.5, "good!")), "a changed feedback");
        // A submission's grade reads as its content, without the body.
        let stored = Submission {
            course_id: 1,
            assignment_id: 2,
            student_id: 3,
            body: "an essay".into(),
            attempt: 1,
            submitted_at: Utc::now(),
            late: false,
            grade: Some(Grade {
                score: 7.5,
                feedback: "good".into(),
                graded_by: 9,
                graded_at: Utc::now(),
            }),
        };
        let s: SubmissionGrade =
            serde_json::from_slice(&serde_json::to_vec(&stored).unwrap()).unwrap();
        assert_eq!(s.student_id, 3);
        assert!(n.is_of(&s.grade.unwrap()));
        // Stored and read back, a notice is still of its grade.
        let back: GradeNotice = serde_json::from_slice(&serde_json::to_vec(&n).unwrap()).unwrap();
        assert_eq!(back, n);
    }

    #[test]
    fn a_user_record_keeps_fields_it_does_not_know_when_rewritten() {
        let stored = r#"{"id":7,"email":"a@example.com","name":"A","role":"student",
            "password_hash":"h","session_generation":3,
            "created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z",
            "mfa_generation":9,"later":{"x":[1,2]}}"#;
        let mut u: User = serde_json::from_str(stored).unwrap();
        assert_eq!(u.session_generation, 3);
        u.name = "B".into();
        let back: serde_json::Value = serde_json::to_value(&u).unwrap();
        assert_eq!(back["mfa_generation"], 9);
        assert_eq!(back["later"]["x"][1], 2);
        assert_eq!(back["name"], "B");
        assert_eq!(back["session_generation"], 3);
        // Known fields are not doubled into the unknown ones.
        assert_eq!(u.unknown.len(), 2, "{:?}", u.unknown);
    }
}
