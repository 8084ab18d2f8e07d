//! Password hashing with Argon2id, off the async runtime, bounded.
//!
//! An unknown email is checked against a dummy hash with the same parameters,
//! so "no such user" and "wrong password" take the same time and give the
//! same answer. Each hash costs ~19 MiB and tens of milliseconds of a core:
//! [`Passwords`] lets at most a few run at once (a permit is held until the
//! blocking task ends, even when the request that asked is gone), and a
//! request that cannot get one soon is refused with [`PasswordError::Busy`]
//! (503 with `Retry-After`) rather than queueing without bound — so a login
//! flood cannot starve the blocking pool or the memory.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::Metrics;

/// How long a request waits for a hashing permit before it is refused.
pub const PERMIT_WAIT: Duration = Duration::from_millis(250);

/// Why a password could not be hashed or checked.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Every hashing permit is taken: try again shortly.
    #[error("password hashing is saturated")]
    Busy,
    /// The hash failed (a corrupt stored hash, a panicked task).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Argon2id hashing with a bound on the hashes in flight.
#[derive(Debug)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Where the wait for a permit is observed (`argon2_queue_wait_seconds`).
    metrics: Option<Arc<Metrics>>,
}

impl Default for Passwords {
    /// Two hashes per core (at least two).
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new((2 * cores).max(2))
    }
}

impl Passwords {
    /// At most `concurrent` hashes at once.
    pub fn new(concurrent: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
            metrics: None,
        }
    }

    /// The default bound, its waits observed in `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, PasswordError> {
        let asked = std::time::Instant::now();
        let permit = tokio::time::timeout(PERMIT_WAIT, self.permits.clone().acquire_owned()).await;
        if let Some(metrics) = &self.metrics {
            metrics.argon2_wait.observe(asked.elapsed().as_secs_f64());
        }
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(PasswordError::Busy),
        }
    }

    /// Hashes `password` into a PHC string.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let permit = self.permit().await?;
        Ok(blocking(permit, move || hash_now(&password)).await?)
    }

    /// Verifies `password` against `hash`, or against a dummy hash when
    /// there is no user (always false then), in similar time either way.
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordError> {
        let permit = self.permit().await?;
        Ok(blocking(permit, move || verify_now(&password, hash)).await?)
    }
}

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};

fn argon2() -> Argon2<'static> {
    // Argon2id v19, m = 19 MiB, t = 2, p = 1 (OWASP's recommended minimum).
    Argon2::default()
}

/// Runs `work` on the blocking pool, holding `permit` until it ends.
async fn blocking<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await?
}

/// Hashes `password` into a PHC string.
fn hash_now(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .hash_password(b"blockremote-dummy-password", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// Verifies `password` against `hash`, or against a dummy hash when there is
/// no user or the user has no password (an external user's hash is ''):
/// always false then, in similar time either way.
fn verify_now(password: &str, hash: Option<String>) -> anyhow::Result<bool> {
    let hash = hash.filter(|h| !h.is_empty());
    let real = hash.is_some();
    let phc = hash.unwrap_or_else(|| dummy_hash().to_owned());
    let parsed = PasswordHash::new(&phc).map_err(|e| anyhow::anyhow!("bad hash: {e}"))?;
    let ok = argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    Ok(real && ok)
}

/// Computes the dummy hash ahead of the first failed login.
pub fn warm_up() {
    let _ = dummy_hash();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_do() {
        let passwords = Passwords::new(2);
        let (hash, verify) = (
            |p: String| passwords.hash(p),
            |p: String, h: Option<String>| passwords.verify(p, h),
        );
        let h = hash("correct horse battery".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse battery".into(), Some(h.clone()))
            .await
            .expect("verify"));
        assert!(!verify("wrong".into(), Some(h)).await.expect("verify"));
        assert!(!verify("blockremote-dummy-password".into(), None)
            .await
            .expect("verify"));
        // An external user has no password: nothing verifies against '',
        // not even the empty password, and it is no error.
        for attempt in ["", "blockremote-dummy-password"] {
            assert!(!verify(attempt.into(), Some(String::new()))
                .await
                .expect("verify"));
        }
    }

    #[tokio::test]
    async fn a_hash_without_a_permit_soon_is_refused_busy() {
        let passwords = Passwords::new(1);
        let held = passwords.permit().await.expect("the one permit");
        let started = std::time::Instant::now();
        assert!(matches!(
            passwords.verify("correct horse battery".into(), None).await,
            Err(PasswordError::Busy)
        ));
        assert!(
            started.elapsed() >= PERMIT_WAIT,
            "it waited before refusing"
        );
        drop(held);
        assert!(!passwords
            .verify("correct horse battery".into(), None)
            .await
            .expect("a permit again"));
    }
}
