//! Access tokens (HS256 JWTs, short-lived) and refresh tokens (random,
//! stored in lmskv by their SHA-256, rotated on every use).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{AppError, AppResult};

/// The `iss` claim of every access token.
pub const ISSUER: &str = "lms-api";
/// Longest bearer token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 4_096;

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a decimal string.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    /// The user's session generation at issue (see
    /// [`crate::model::User::session_generation`]).
    #[serde(default)]
    pub sgen: u64,
}

/// Signs and checks access tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> Tokens {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        validation.leeway = 0;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// The lifetime of access tokens.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A fresh access token for `user_id` in its session generation `sgen`.
    pub fn issue(&self, user_id: u64, sgen: u64) -> AppResult<String> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            iss: ISSUER.to_string(),
            sgen,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AppError::Internal(format!("sign token: {e}")))
    }

    /// The user id and session generation of a valid access token.
    pub fn verify(&self, token: &str) -> AppResult<(u64, u64)> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AppError::Unauthorized("token too long".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    AppError::Unauthorized("the access token has expired".into())
                }
                _ => AppError::Unauthorized("invalid access token".into()),
            })?;
        let uid = data
            .claims
            .sub
            .parse()
            .map_err(|_| AppError::Unauthorized("invalid access token".into()))?;
        Ok((uid, data.claims.sgen))
    }
}

/// A new random refresh token (256 bits, base64url).
pub fn new_refresh_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// The lookup key of a refresh token: its SHA-256 in hex, so a leaked
/// database does not leak usable tokens.
pub fn refresh_token_hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let t = Tokens::new(&[7u8; 32], Duration::from_secs(60));
        let tok = t.issue(42, 3).unwrap();
        assert_eq!(t.verify(&tok).unwrap(), (42, 3));
        let other = Tokens::new(&[8u8; 32], Duration::from_secs(60));
        assert!(other.verify(&tok).is_err());
        let mut bad = tok.clone();
        bad.pop();
        bad.push(if tok.ends_with('A') { 'B' } else { 'A' });
        assert!(t.verify(&bad).is_err());
        assert!(t.verify("not.a.token").is_err());
    }

    #[test]
    fn refresh_hash_is_stable_hex() {
        let h = refresh_token_hash("abc");
        assert_eq!(h.len(), 64);
        assert_eq!(h, refresh_token_hash("abc"));
        assert_ne!(h, refresh_token_hash("abd"));
    }
}
