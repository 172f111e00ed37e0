//! Object-level authorization for everything inside a course: who the caller
//! is to the course (admin, teacher, TA, student, nobody), and the checks
//! routes call before touching course data.
//!
//! A course that is not published is invisible to outsiders: they get 404,
//! never 403, so its existence does not leak. A published course is public;
//! an outsider asking for its members-only parts gets 403.

use lmskv_client::ReadConsistency;

use crate::app::AppState;
use crate::auth::Caller;
use crate::db::Versioned;
use crate::error::{AppError, AppResult};
use crate::keys;
use crate::model::{Course, CourseRole, Member};

/// What the caller is to one course.
#[derive(Debug, Clone)]
pub struct CourseAccess {
    pub course: Versioned<Course>,
    /// The caller's membership, if any.
    pub member: Option<Versioned<Member>>,
    pub admin: bool,
}

impl CourseAccess {
    /// The caller's role in the course.
    pub fn role(&self) -> Option<CourseRole> {
        self.member.as_ref().map(|m| m.value.role)
    }

    /// Admin or the course's teacher.
    pub fn is_teacher(&self) -> bool {
        self.admin || self.role() == Some(CourseRole::Teacher)
    }

    /// Admin, teacher or TA.
    pub fn is_staff(&self) -> bool {
        self.admin || matches!(self.role(), Some(CourseRole::Teacher | CourseRole::Ta))
    }

    /// An enrolled student.
    pub fn is_student(&self) -> bool {
        self.role() == Some(CourseRole::Student)
    }

    /// Fails with 403 unless the caller teaches the course.
    pub fn require_teacher(&self, action: &str) -> AppResult<()> {
        if self.is_teacher() {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "only the course's teachers may {action}"
            )))
        }
    }

    /// Fails with 403 unless the caller teaches or assists in the course.
    pub fn require_staff(&self, action: &str) -> AppResult<()> {
        if self.is_staff() {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "only the course's teachers and TAs may {action}"
            )))
        }
    }

    /// Fails with 403 unless the caller is a member (or admin).
    pub fn require_member(&self) -> AppResult<()> {
        if self.admin || self.member.is_some() {
            Ok(())
        } else {
            Err(AppError::Forbidden(
                "only members of the course may do this; enroll first".into(),
            ))
        }
    }
}

/// Loads course `cid` and the caller's membership. 404 when the course does
/// not exist or is unpublished and the caller has nothing to do with it.
pub async fn course_access(st: &AppState, caller: &Caller, cid: u64) -> AppResult<CourseAccess> {
    // STRONG for both: these reads decide what the caller may see and change
    // (a just-enrolled student must get in; a removed one must not).
    let (course, member) = futures::try_join!(
        st.db
            .get::<Course>(keys::course(cid), ReadConsistency::Strong),
        st.db
            .get::<Member>(keys::member(cid, caller.id()), ReadConsistency::Strong),
    )?;
    let course = course.ok_or(AppError::NotFound("course"))?;
    let access = CourseAccess {
        course,
        member,
        admin: caller.is_admin(),
    };
    if !access.course.value.published && !access.admin && access.member.is_none() {
        return Err(AppError::NotFound("course"));
    }
    Ok(access)
}
