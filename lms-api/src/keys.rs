//! The LMS key schema on lmskv: every table and key this service writes is
//! listed here and nowhere else.
//!
//! Keys put the table first and numeric IDs big-endian (`u64::to_be_bytes`),
//! so key order is ID order and "users 1–1,000,000" is one contiguous key
//! range that lmskv can place on one shard. Ranges are split at table
//! prefixes and ID boundaries, so:
//!
//! * everything that must change atomically lives under **one** prefix: a
//!   course's description, its seat counter, its members, assignments and
//!   submissions all live under `course/<cid>/`, and enrollment (seat counter
//!   and member record) or grading is one atomic batch or compare-and-swap
//!   on keys of that one range;
//! * data that spans tables — the e-mail index, a user's list of courses,
//!   the public catalogue — is a derived copy written *after* the record it
//!   mirrors, with idempotent writes, and is reconciled by the repair task
//!   ([`crate::repair`]). Reads of these copies are eventually consistent.
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `seq/<table>`                         | next free ID of a table (u64 BE) |
//! | `user/<uid>`                          | [`crate::model::User`]         |
//! | `email/<lower-case e-mail>`           | [`crate::model::EmailClaim`] (unique index) |
//! | `refresh/<sha256 hex of token>`       | [`crate::model::RefreshToken`] |
//! | `course/<cid>/i`                      | [`crate::model::Course`]       |
//! | `course/<cid>/n`                      | [`crate::model::Seats`] (enrolled students) |
//! | `course/<cid>/m/<uid>`                | [`crate::model::Member`]       |
//! | `course/<cid>/a/<aid>`                | [`crate::model::Assignment`]   |
//! | `course/<cid>/s/<aid>/<uid>`          | [`crate::model::Submission`] with its grade |
//! | `course/<cid>/g/<aid>/<uid>`          | [`crate::model::GradeNotice`] (the grade the student was last notified of) |
//! | `course/<cid>/p/<aid>`                | [`crate::model::PendingNotices`] (a publish whose notice job may not be written yet) |
//! | `catalog/<cid>`                       | [`crate::model::Course`] copy for the catalogue |
//! | `usercourse/<uid>/<cid>`              | [`crate::model::UserCourse`] (index of a user's courses) |
//! | `notif/<uid>/<nid>`                   | [`crate::model::Notification`] |
//! | `job/<jid>`                           | live [`crate::jobs::Job`] (queued or leased) |
//! | `jobdone/<jid>`, `jobdead/<jid>`      | finished or dead-lettered job  |
//! | `export/<jid>`                        | a job's result (CSV)           |
//!
//! `<uid>`, `<cid>`, `<aid>`, `<nid>`, `<jid>` are 8-byte big-endian u64s.

use bytes::{BufMut, Bytes, BytesMut};

/// Table of ID counters.
pub const SEQ: &[u8] = b"seq/";
/// Table of users.
pub const USER: &[u8] = b"user/";
/// Unique index from e-mail to user.
pub const EMAIL: &[u8] = b"email/";
/// Table of refresh tokens.
pub const REFRESH: &[u8] = b"refresh/";
/// Table of courses and everything that belongs to one.
pub const COURSE: &[u8] = b"course/";
/// Catalogue copy of course descriptions.
pub const CATALOG: &[u8] = b"catalog/";
/// Index of each user's courses.
pub const USER_COURSE: &[u8] = b"usercourse/";
/// Notifications per user.
pub const NOTIF: &[u8] = b"notif/";
/// Live jobs.
pub const JOB: &[u8] = b"job/";
/// Finished jobs.
pub const JOB_DONE: &[u8] = b"jobdone/";
/// Dead-lettered jobs.
pub const JOB_DEAD: &[u8] = b"jobdead/";
/// Job results.
pub const EXPORT: &[u8] = b"export/";

/// Every table, in key order. Each is a natural range boundary: lmskv
/// clusters for the LMS pre-split there ([`node_config_toml`]).
pub const TABLES: &[&[u8]] = &[
    CATALOG,
    COURSE,
    EMAIL,
    EXPORT,
    JOB,
    JOB_DEAD,
    JOB_DONE,
    NOTIF,
    REFRESH,
    SEQ,
    USER,
    USER_COURSE,
];

/// Bytes of the id that, after [`COURSE`], names one course's row.
pub const COURSE_ID_BYTES: usize = 8;

/// The lmskv node settings the LMS relies on, as `--config` TOML lines:
/// one range per table from the start (`pre_split_keys`), and automatic
/// splits that never cut a course's row (`split_rows`), so the atomic
/// batches and CAS under `course/<cid>/` always stay in one range.
/// `scripts/run-local.sh` writes the same settings.
pub fn node_config_toml() -> String {
    let tables: Vec<String> = TABLES
        .iter()
        .map(|t| format!("\"{}\"", String::from_utf8_lossy(t)))
        .collect();
    format!(
        "pre_split_keys = [{}]\nsplit_rows = [{{ prefix = \"{}\", id_len = {COURSE_ID_BYTES} }}]\n",
        tables.join(", "),
        String::from_utf8_lossy(COURSE)
    )
}

const COURSE_INFO: &[u8] = b"/i";
const COURSE_SEATS: &[u8] = b"/n";
const COURSE_MEMBER: &[u8] = b"/m/";
const COURSE_ASSIGNMENT: &[u8] = b"/a/";
const COURSE_SUBMISSION: &[u8] = b"/s/";
const COURSE_GRADE_NOTICE: &[u8] = b"/g/";
const COURSE_PENDING_NOTICES: &[u8] = b"/p/";

fn key(parts: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        b.put_slice(p);
    }
    b.freeze()
}

fn be(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// `seq/<table>`.
pub fn seq(table: &str) -> Bytes {
    key(&[SEQ, table.as_bytes()])
}

/// `user/<uid>`.
pub fn user(uid: u64) -> Bytes {
    key(&[USER, &be(uid)])
}

/// `email/<e-mail>`; the caller lower-cases it.
pub fn email(email: &str) -> Bytes {
    key(&[EMAIL, email.as_bytes()])
}

/// `refresh/<hash>`.
pub fn refresh(hash_hex: &str) -> Bytes {
    key(&[REFRESH, hash_hex.as_bytes()])
}

/// `course/<cid>`: the prefix of everything of one course.
pub fn course_prefix(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid)])
}

/// `course/<cid>/i`.
pub fn course(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_INFO])
}

/// `course/<cid>/n`.
pub fn seats(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_SEATS])
}

/// `course/<cid>/m/<uid>`.
pub fn member(cid: u64, uid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_MEMBER, &be(uid)])
}

/// `course/<cid>/m/`.
pub fn members(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_MEMBER])
}

/// `course/<cid>/a/<aid>`.
pub fn assignment(cid: u64, aid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_ASSIGNMENT, &be(aid)])
}

/// `course/<cid>/a/`.
pub fn assignments(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_ASSIGNMENT])
}

/// `course/<cid>/s/<aid>/<uid>`.
pub fn submission(cid: u64, aid: u64, uid: u64) -> Bytes {
    key(&[
        COURSE,
        &be(cid),
        COURSE_SUBMISSION,
        &be(aid),
        b"/",
        &be(uid),
    ])
}

/// `course/<cid>/s/<aid>/`.
pub fn submissions_of(cid: u64, aid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_SUBMISSION, &be(aid), b"/"])
}

/// `course/<cid>/s/`.
pub fn submissions(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_SUBMISSION])
}

/// `course/<cid>/g/<aid>/<uid>`: next to the submission, in the course's
/// range, so a notice and the grade it is for never sit in different ranges.
pub fn grade_notice(cid: u64, aid: u64, uid: u64) -> Bytes {
    key(&[
        COURSE,
        &be(cid),
        COURSE_GRADE_NOTICE,
        &be(aid),
        b"/",
        &be(uid),
    ])
}

/// `course/<cid>/p/<aid>`: in the course's range, so a publish writes it in
/// one batch with the assignment's flag.
pub fn pending_notices(cid: u64, aid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_PENDING_NOTICES, &be(aid)])
}

/// `course/<cid>/p/`.
pub fn pending_notices_of(cid: u64) -> Bytes {
    key(&[COURSE, &be(cid), COURSE_PENDING_NOTICES])
}

/// `catalog/<cid>`.
pub fn catalog(cid: u64) -> Bytes {
    key(&[CATALOG, &be(cid)])
}

/// `usercourse/<uid>/<cid>`.
pub fn user_course(uid: u64, cid: u64) -> Bytes {
    key(&[USER_COURSE, &be(uid), b"/", &be(cid)])
}

/// `usercourse/<uid>/`.
pub fn user_courses(uid: u64) -> Bytes {
    key(&[USER_COURSE, &be(uid), b"/"])
}

/// `notif/<uid>/<nid>`.
pub fn notification(uid: u64, nid: u64) -> Bytes {
    key(&[NOTIF, &be(uid), b"/", &be(nid)])
}

/// `notif/<uid>/`.
pub fn notifications(uid: u64) -> Bytes {
    key(&[NOTIF, &be(uid), b"/"])
}

/// `job/<jid>`.
pub fn job(jid: u64) -> Bytes {
    key(&[JOB, &be(jid)])
}

/// `jobdone/<jid>`.
pub fn job_done(jid: u64) -> Bytes {
    key(&[JOB_DONE, &be(jid)])
}

/// `jobdead/<jid>`.
pub fn job_dead(jid: u64) -> Bytes {
    key(&[JOB_DEAD, &be(jid)])
}

/// `export/<jid>`.
pub fn export(jid: u64) -> Bytes {
    key(&[EXPORT, &be(jid)])
}

/// The first key after every key that starts with `prefix` (the exclusive
/// end of a prefix scan).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    // A prefix of only 0xff bytes has no successor: scan to the end.
    Bytes::new()
}

/// Reads a big-endian u64 at `at` in `key`.
pub fn id_at(key: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = key.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// What a key under `course/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CourseKey {
    Info { cid: u64 },
    Seats { cid: u64 },
    Member { cid: u64, uid: u64 },
    Assignment { cid: u64, aid: u64 },
    Submission { cid: u64, aid: u64, uid: u64 },
}

/// Parses a key under `course/`; `None` for anything else.
pub fn parse_course_key(k: &[u8]) -> Option<CourseKey> {
    let rest = k.strip_prefix(COURSE)?;
    let cid = id_at(rest, 0)?;
    let tail = &rest[8..];
    if tail == COURSE_INFO {
        return Some(CourseKey::Info { cid });
    }
    if tail == COURSE_SEATS {
        return Some(CourseKey::Seats { cid });
    }
    if let Some(t) = tail.strip_prefix(COURSE_MEMBER) {
        return (t.len() == 8).then(|| CourseKey::Member {
            cid,
            uid: id_at(t, 0).unwrap_or_default(),
        });
    }
    if let Some(t) = tail.strip_prefix(COURSE_ASSIGNMENT) {
        return (t.len() == 8).then(|| CourseKey::Assignment {
            cid,
            aid: id_at(t, 0).unwrap_or_default(),
        });
    }
    if let Some(t) = tail.strip_prefix(COURSE_SUBMISSION) {
        if t.len() == 17 && t[8] == b'/' {
            return Some(CourseKey::Submission {
                cid,
                aid: id_at(t, 0)?,
                uid: id_at(t, 9)?,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_numerically() {
        assert!(user(255) < user(256));
        assert!(user(1) < user(1_000_000));
        assert!(course(9) < course(10));
        assert!(member(3, 1) < member(3, 2));
    }

    #[test]
    fn one_course_is_one_contiguous_prefix() {
        let p = course_prefix(7);
        for k in [
            course(7),
            seats(7),
            member(7, 1),
            assignment(7, 2),
            submission(7, 2, 1),
            grade_notice(7, 2, 1),
            pending_notices(7, 2),
        ] {
            assert!(k.starts_with(&p));
            assert!(k < prefix_end(&p));
        }
        assert!(course(8) >= prefix_end(&p));
    }

    #[test]
    fn course_keys_round_trip() {
        assert_eq!(
            parse_course_key(&course(5)),
            Some(CourseKey::Info { cid: 5 })
        );
        assert_eq!(
            parse_course_key(&seats(5)),
            Some(CourseKey::Seats { cid: 5 })
        );
        assert_eq!(
            parse_course_key(&member(5, 9)),
            Some(CourseKey::Member { cid: 5, uid: 9 })
        );
        assert_eq!(
            parse_course_key(&assignment(5, 3)),
            Some(CourseKey::Assignment { cid: 5, aid: 3 })
        );
        assert_eq!(
            parse_course_key(&submission(5, 3, 9)),
            Some(CourseKey::Submission {
                cid: 5,
                aid: 3,
                uid: 9
            })
        );
        // A grade notice is no record the repair task reads.
        assert_eq!(parse_course_key(&grade_notice(5, 3, 9)), None);
        assert_eq!(parse_course_key(&pending_notices(5, 3)), None);
        assert!(pending_notices(5, 3).starts_with(&pending_notices_of(5)));
        assert_eq!(parse_course_key(b"course/x"), None);
        assert_eq!(parse_course_key(&user(1)), None);
    }

    #[test]
    fn no_key_is_reserved() {
        for k in [user(0), course(0), seq("user"), email("a@b")] {
            assert_ne!(k[0], 0);
        }
    }

    #[test]
    fn tables_are_sorted_and_run_local_uses_the_same_node_config() {
        assert!(TABLES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(course_prefix(7).len(), COURSE.len() + COURSE_ID_BYTES);
        let toml = node_config_toml();
        assert!(toml.contains(r#""usercourse/""#) && toml.contains("id_len = 8"));
        // The directory at run time: a test binary reused from a build in
        // another checkout (one shared target dir) carries that checkout's.
        let dir = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        let script = std::fs::read_to_string(format!("{dir}/../scripts/run-local.sh"))
            .expect("scripts/run-local.sh");
        for line in toml.lines() {
            assert!(script.contains(line), "run-local.sh lacks {line:?}");
        }
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(&prefix_end(b"ab")[..], b"ac");
        assert_eq!(&prefix_end(&[b'a', 0xff])[..], b"b");
        assert!(prefix_end(&[0xff, 0xff]).is_empty());
    }
}
