//! Creating accounts: the e-mail claim (a unique index in its own table),
//! then the user record — two keys in two tables, written in an order that
//! leaves nothing wrong behind if the process dies in between.
//!
//! A user write the store refused for certain releases the claim at once
//! (a compare-and-swap on the claim's version: only if it is still this
//! registration's), so the registration can be retried right away. A user
//! write whose outcome is unknown may still land: its claim stays, as if
//! the process had died, and is taken over only once it is stale and its
//! user record absent; releasing it could give one e-mail two accounts.

use bytes::Bytes;
use chrono::{Duration as ChronoDuration, Utc};
use lmskv_client::ReadConsistency;

use crate::app::AppState;
use crate::db::{Cas, Db};
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
    // user write that fails for certain releases the claim at once.
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
    match st.db.put(keys::user(uid), &user).await {
        Ok(_) => Ok(user),
        Err(e) => after_failed_user_write(&st.db, ekey, claim_version, user, e).await,
    }
}

/// Whether a failed write may still have been applied (or may be applied
/// later): the store did not answer in time, or answered that it is
/// unavailable. Refusals (an invalid argument, a record that does not
/// encode) apply nothing.
pub fn write_may_have_landed(e: &AppError) -> bool {
    match e {
        AppError::Unavailable(c) => c.is_outcome_unknown(),
        AppError::Internal(_) => false,
        _ => true,
    }
}

/// Ends a registration whose user write failed with `e`. A write refused
/// for certain releases the registration's claim (version
/// `claim_version`); one whose outcome is unknown keeps it, and succeeds
/// after all if a STRONG read finds the user record written.
async fn after_failed_user_write(
    db: &Db,
    ekey: Bytes,
    claim_version: u64,
    user: User,
    e: AppError,
) -> AppResult<User> {
    if write_may_have_landed(&e) {
        if let Ok(Some(found)) = db
            .get::<User>(keys::user(user.id), ReadConsistency::Strong)
            .await
        {
            return Ok(found.value);
        }
        tracing::warn!(error = %e, user = user.id, "a user write of unknown outcome: its e-mail stays claimed until the claim is stale");
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
    use lmskv_client::{ClientError, ServerError};

    #[test]
    fn only_refused_writes_are_known_not_to_have_landed() {
        let unavailable = |e| AppError::Unavailable(e);
        let timeout = ServerError::Timeout {
            reason: "no answer".into(),
        };
        let deadline = ClientError::DeadlineExceeded {
            deadline_ms: 10,
            attempts: 3,
            last: Box::new(ClientError::Server(timeout.clone())),
        };
        assert!(write_may_have_landed(&unavailable(deadline)));
        assert!(write_may_have_landed(&unavailable(ClientError::Server(
            timeout
        ))));
        assert!(write_may_have_landed(&unavailable(ClientError::Server(
            ServerError::Unavailable {
                reason: "leader lost".into()
            }
        ))));
        assert!(write_may_have_landed(&AppError::Timeout(
            std::time::Duration::from_secs(1)
        )));
        // Refused: nothing was applied.
        assert!(!write_may_have_landed(&AppError::Internal(
            "invalid argument `value`: too large".into()
        )));
        assert!(!write_may_have_landed(&unavailable(
            ClientError::InvalidArgument {
                field: "value".into(),
                reason: "too large".into()
            }
        )));
    }
}
