//! Password hashing with argon2id at OWASP's recommended parameters
//! (m = 19 MiB, t = 2, p = 1), off the async runtime and bounded in
//! concurrency so a burst of logins cannot exhaust memory.

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::config::PASSWORD_HASHES_CONCURRENT_MAX;
use crate::error::{AppError, AppResult};

/// argon2 memory cost in KiB (OWASP: 19 MiB).
pub const ARGON2_MEMORY_KIB: u32 = 19_456;
/// argon2 iterations (OWASP: 2).
pub const ARGON2_ITERATIONS: u32 = 2;
/// argon2 lanes (OWASP: 1).
pub const ARGON2_LANES: u32 = 1;

fn hasher() -> Argon2<'static> {
    let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES, None)
        .expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes and verifies passwords.
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Verified against when the account does not exist, so that a login for
    /// an unknown e-mail takes as long as one with a wrong password.
    dummy_hash: String,
}

impl Passwords {
    /// Prepares the hasher (computes one hash).
    pub fn new() -> Passwords {
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = hasher()
            .hash_password(b"no account has this password", &salt)
            .expect("argon2 hash")
            .to_string();
        Passwords {
            permits: Arc::new(Semaphore::new(PASSWORD_HASHES_CONCURRENT_MAX)),
            dummy_hash,
        }
    }

    /// Runs `f` on a blocking thread once one of the hashing permits is
    /// free. The permit moves into the thread: a request that times out
    /// drops its future, not the hash under way, which keeps its memory (and
    /// its permit) until it ends.
    async fn on_hash_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> AppResult<T> + Send + 'static,
    ) -> AppResult<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(internal)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(internal)?
    }

    /// Hashes `password` into a PHC string.
    pub async fn hash(&self, password: String) -> AppResult<String> {
        self.on_hash_thread(move || {
            let salt = SaltString::generate(&mut OsRng);
            hasher()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(internal)
        })
        .await
    }

    /// Whether `password` matches `hash`; with no hash, spends the same time and says no.
    pub async fn verify(&self, password: String, hash: Option<String>) -> AppResult<bool> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = self
            .on_hash_thread(move || {
                let parsed = PasswordHash::new(&hash).map_err(internal)?;
                Ok(hasher()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok())
            })
            .await?;
        Ok(ok && known)
    }
}

impl Default for Passwords {
    fn default() -> Self {
        Passwords::new()
    }
}

fn internal(e: impl std::fmt::Display) -> AppError {
    AppError::Internal(format!("password hashing: {e}"))
}
