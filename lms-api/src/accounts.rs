//! Creating accounts: the e-mail claim (a unique index in its own table),
//! then the user record — two keys in two tables, written in an order that
//! leaves nothing wrong behind if the process dies in between.

use chrono::{Duration as ChronoDuration, Utc};
use lmskv_client::ReadConsistency;

use crate::app::AppState;
use crate::db::Cas;
use crate::error::{AppError, AppResult};
use crate::keys;
use crate::model::{EmailClaim, Role, User};

/// A claim whose user record never appeared is taken over after this long
/// (its registration died between the two writes).
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
    // EMAIL_CLAIM_STALE_S; login treats a dangling claim as no account.
    if let Cas::Conflict = st.db.cas(ekey.clone(), 0, Some(&claim)).await? {
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
        let stale = now - existing.value.claimed_at > ChronoDuration::seconds(EMAIL_CLAIM_STALE_S);
        if owner.is_some() || !stale {
            return Err(taken());
        }
        if let Cas::Conflict = st.db.cas(ekey, existing.version, Some(&claim)).await? {
            return Err(taken());
        }
    }
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
    st.db.put(keys::user(uid), &user).await?;
    Ok(user)
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
