//! Creating accounts: the e-mail claim (a unique index in its own table),
//! then the user record — two keys in two tables, written in an order that
//! leaves nothing wrong behind if the process dies in between.
//!
//! A user write known never to have reached the store (the client refused
//! it before sending: a record over lmskv's value limit; or the record did
//! not encode) releases the claim at once (a compare-and-swap on the
//! claim's version: only if it is still this registration's), so the
//! registration can be retried right away. Any other failure may have been
//! applied, or may still be — a node can answer an error for a write it
//! applied, and the client's final error can follow a try that timed out —
//! so its claim stays, as if the process had died, and is taken over only
//! once it is stale and its user record absent; releasing it could give one
//! e-mail two accounts.

use bytes::Bytes;
use chrono::{Duration as ChronoDuration, Utc};
use lmskv_client::{ClientError, ReadConsistency};

use crate::app::AppState;
use crate::db::{encode, Cas, Db};
use crate::error::{AppError, AppResult};
use crate::keys;
use crate::model::{EmailClaim, Role, User};

/// A claim whose user record never appeared is taken over after this long
/// (its registration died between the two writes, or its user write's
/// outcome was unknown).
pub const EMAIL_CLAIM_STALE_S: i64 = 60;

/// Normalizes an e-mail address for the unique index.
pub fn normalize_email(e: &str) -> String {
    e.trim().to_lowercase()
}

/// Creates a user with a hashed password. 409 when the e-mail is taken.
pub async fn create_user(
    st: &AppState,
    email: &str,
    password: String,
    name: &str,
    role: Role,
) -> AppResult<User> {
    let email = normalize_email(email);
    let hash = st.passwords.hash(password).await?;
    let uid = st.db.next_id("user").await?;
    let now = Utc::now();
    let claim = EmailClaim {
        user_id: uid,
        claimed_at: now,
    };
    let ekey = keys::email(&email);
    // The claim is written first and only if absent: it is the uniqueness
    // check. If the process dies before the user record is written, the claim
    // dangles and is taken over by the next registration after
    // EMAIL_CLAIM_STALE_S; login treats a dangling claim as no account. A
    // user write known never to have been sent releases the claim at once.
    let claim_version = match st.db.cas(ekey.clone(), 0, Some(&claim)).await? {
        Cas::Done { version, .. } => version,
        Cas::Conflict => {
            let taken = || AppError::Conflict("an account with this e-mail already exists".into());
            let existing = st
                .db
                .get::<EmailClaim>(ekey.clone(), ReadConsistency::Strong)
                .await?
                .ok_or_else(taken)?;
            let owner = st
                .db
                .get::<User>(keys::user(existing.value.user_id), ReadConsistency::Strong)
                .await?;
            let stale =
                now - existing.value.claimed_at > ChronoDuration::seconds(EMAIL_CLAIM_STALE_S);
            if owner.is_some() || !stale {
                return Err(taken());
            }
            match st
                .db
                .cas(ekey.clone(), existing.version, Some(&claim))
                .await?
            {
                Cas::Done { version, .. } => version,
                Cas::Conflict => return Err(taken()),
            }
        }
    };
    let user = User {
        id: uid,
        email,
        name: name.trim().to_string(),
        role,
        password_hash: hash,
        session_generation: 0,
        created_at: now,
        updated_at: now,
        unknown: Default::default(),
    };
    // Written through the client directly: whether the write may have
    // landed is told by the client's error, which the conversion to
    // AppError blurs (a refusal before sending and a node's refusal both
    // become Internal).
    let value = match encode(&user) {
        Ok(v) => v,
        // Never sent.
        Err(e) => {
            return after_failed_user_write(&st.db, ekey, claim_version, user, false, e).await
        }
    };
    match st.db.client().put(keys::user(uid), value).await {
        Ok(_) => Ok(user),
        Err(e) => {
            let landed = write_may_have_landed(&e);
            after_failed_user_write(&st.db, ekey, claim_version, user, landed, e.into()).await
        }
    }
}

/// Whether a one-key write (put, compare-and-swap, delete) that failed
/// with `e` may have been applied, or may be applied later. Only an
/// argument the client refuses before sending anything (a key or value
/// over lmskv's limits) is known to apply nothing. Everything else may
/// have landed: a timeout or an unavailable node, but also a node's
/// `Internal` answer for a write it applied. (The client reports a
/// write whose earlier try may have landed as a `Timeout` unless its last
/// answer settles the outcome; this check does not rely on that.)
pub fn write_may_have_landed(e: &ClientError) -> bool {
    !matches!(e, ClientError::InvalidArgument { .. })
}

/// Ends a registration whose user write failed with `e`. A write known
/// never to have been sent (`may_have_landed` false) releases the
/// registration's claim (version `claim_version`); any other keeps it,
/// and succeeds after all if a STRONG read finds the user record written.
async fn after_failed_user_write(
    db: &Db,
    ekey: Bytes,
    claim_version: u64,
    user: User,
    may_have_landed: bool,
    e: AppError,
) -> AppResult<User> {
    if may_have_landed {
        if let Ok(Some(found)) = db
            .get::<User>(keys::user(user.id), ReadConsistency::Strong)
            .await
        {
            return Ok(found.value);
        }
        tracing::warn!(error = %e, user = user.id, "a user write that may have landed: its e-mail stays claimed until the claim is stale");
        return Err(e);
    }
    if let Err(re) = release_claim(db, ekey, claim_version).await {
        tracing::warn!(error = %re, "could not release a failed registration's e-mail claim; it is taken over once stale");
    }
    Err(e)
}

/// Deletes the e-mail claim at `ekey` if it is still at `version` (the
/// version its registration wrote): a claim another registration wrote or
/// took over since is left alone. Whether it deleted.
pub async fn release_claim(db: &Db, ekey: Bytes, version: u64) -> AppResult<bool> {
    if version == 0 {
        // Version 0 would mean "absent", which is not a claim.
        return Ok(false);
    }
    Ok(matches!(
        db.cas::<EmailClaim>(ekey, version, None).await?,
        Cas::Done { .. }
    ))
}

/// The user owning `email`, read STRONG (login must see a just-created
/// account and a just-changed password).
pub async fn user_by_email(st: &AppState, email: &str) -> AppResult<Option<User>> {
    let claim = st
        .db
        .get::<EmailClaim>(
            keys::email(&normalize_email(email)),
            ReadConsistency::Strong,
        )
        .await?;
    let Some(claim) = claim else {
        return Ok(None);
    };
    let user = st
        .db
        .get::<User>(keys::user(claim.value.user_id), ReadConsistency::Strong)
        .await?;
    Ok(user
        .map(|u| u.value)
        .filter(|u| u.email == normalize_email(email)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmskv_client::ServerError;

    #[test]
    fn only_refused_writes_are_known_not_to_have_landed() {
        let server = ClientError::Server;
        let timeout = ServerError::Timeout {
            reason: "no answer".into(),
        };
        // Unknown outcomes.
        assert!(write_may_have_landed(&ClientError::DeadlineExceeded {
            deadline_ms: 10,
            attempts: 3,
            last: Box::new(server(timeout.clone())),
        }));
        assert!(write_may_have_landed(&server(timeout)));
        assert!(write_may_have_landed(&server(ServerError::unavailable(
            "leader lost"
        ))));
        assert!(write_may_have_landed(&ClientError::Unreachable {
            endpoint: "127.0.0.1:7001".into(),
            reason: "connection refused".into(),
        }));
        // A node's Internal answer can come for a write it applied (the
        // proposal committed, then answering failed).
        assert!(write_may_have_landed(&server(ServerError::internal(
            "applied, but the answer was lost"
        ))));
        // A non-retryable answer may be the last of several tries, an
        // earlier one of which timed out and may have been applied.
        assert!(write_may_have_landed(&server(
            ServerError::InvalidArgument {
                field: "value".into(),
                reason: "too large".into(),
            }
        )));
        // Refused by the client before sending (its key and value checks):
        // nothing reached the store.
        assert!(!write_may_have_landed(&ClientError::InvalidArgument {
            field: "value".into(),
            reason: "value is 1100000 bytes, the limit is 1048576".into(),
        }));
    }
}
