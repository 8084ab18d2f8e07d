//! Attestation: single-use nonces bound to a device, and verdicts.
//!
//! `POST /v1/attestation/nonce` stores a fresh 256-bit nonce at
//! `nonce:{device}` (one outstanding nonce per device; a new one replaces it)
//! with a TTL of 120–300 s. Verification *takes* the nonce (`GETDEL`), so it
//! can be used once: a second use, another device's nonce or an expired one
//! all find nothing to match and are a replay (409 `nonce_replay`). Replays
//! and failed verdicts count as failures; at the configured number the device
//! is quarantined and `IMMEDIATE_QUARANTINE` is published.
//!
//! Providers: `test` (an HS256 JWT signed with
//! `BLOCKREMOTE_ATTESTATION_TEST_SECRET`, carrying `nonce`, `device_id`,
//! `app_integrity` and `device_integrity`), for staging and tests. The real
//! providers (`play_integrity`, `app_attest`) answer 422
//! `provider_not_configured` until their verification keys can be configured.

use std::{net::IpAddr, sync::Arc, time::Duration};

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{random_token, Auth, DeviceAuth};
use crate::{
    firewall::{Firewall, FirewallError, Subject},
    realtime::{self, Action},
    state::{keys, SharedState, StateError},
    store::{AuditSource, NewAuditEntry, Store, StoreError},
};

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// App and device integrity both pass.
    Verified,
    /// Anything else.
    Failed,
}

/// The outcome of a verification.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyOutcome {
    /// `verified` or `failed`.
    pub verdict: Verdict,
    /// Share of the integrity checks that passed, in [0, 1].
    pub attestation_score: f64,
}

/// Why a nonce could not be issued or a token could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    /// The provider is none of `play_integrity`, `app_attest` or `test`.
    #[error("unknown attestation provider")]
    UnknownProvider,
    /// The provider is known but has no verification key on this server.
    #[error("attestation provider not configured")]
    ProviderNotConfigured,
    /// The nonce was already used, belongs to another device, or expired
    /// (counted as a failure before this is returned).
    #[error("nonce replay")]
    NonceReplay,
    /// The firewall refused after a failed verdict.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

#[derive(Debug, Deserialize)]
struct TestClaims {
    nonce: String,
    device_id: String,
    app_integrity: String,
    device_integrity: String,
}

/// The secret that verifies `provider`'s tokens, if this server has one.
fn provider_secret<'a>(
    provider: &str,
    test_secret: Option<&'a SecretString>,
) -> Result<&'a SecretString, AttestationError> {
    let secret = match provider {
        "test" => test_secret,
        "play_integrity" | "app_attest" => None,
        _ => return Err(AttestationError::UnknownProvider),
    };
    secret.ok_or(AttestationError::ProviderNotConfigured)
}

/// How many of the two integrity checks pass (0 when the token does not
/// verify, or is not for this nonce and device), and the verdict's reason.
fn judge(secret: &SecretString, token: &str, nonce: &str, device_id: &str) -> (u8, &'static str) {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims::<&str>(&[]);
    validation.validate_aud = false;
    let claims = decode::<TestClaims>(
        token,
        &DecodingKey::from_secret(secret.expose_secret().as_bytes()),
        &validation,
    )
    .ok()
    .map(|data| data.claims)
    .filter(|c| bool::from(c.nonce.as_bytes().ct_eq(nonce.as_bytes())) && c.device_id == device_id);
    match &claims {
        Some(c) => (
            u8::from(c.app_integrity == "pass") + u8::from(c.device_integrity == "pass"),
            "integrity_check",
        ),
        None => (0, "invalid_attestation_token"),
    }
}

/// Nonces and verdicts, with the handles a verdict's side effects use.
pub struct Attestation {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
    firewall: Arc<Firewall>,
    nonce_ttl: Duration,
    max_failures: u32,
    test_secret: Option<SecretString>,
}

impl Attestation {
    /// The component: nonces live `nonce_ttl`; a device is quarantined at
    /// `max_failures` failures; `test_secret` enables the `test` provider.
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        firewall: Arc<Firewall>,
        nonce_ttl: Duration,
        max_failures: u32,
        test_secret: Option<SecretString>,
    ) -> Self {
        Self {
            store,
            shared,
            auth,
            firewall,
            nonce_ttl,
            max_failures,
            test_secret,
        }
    }

    /// Issues a nonce for the device; returns it with its expiry.
    pub async fn issue_nonce(
        &self,
        device: &DeviceAuth,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), AttestationError> {
        let nonce = random_token("");
        let ttl = self.nonce_ttl;
        self.shared
            .set(&keys::nonce(&device.device_id), nonce.as_bytes(), Some(ttl))
            .await?;
        let expires_at = chrono::Utc::now()
            + chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::seconds(180));
        Ok((nonce, expires_at))
    }

    /// Verifies an attestation token for the device (see the module docs).
    pub async fn verify(
        &self,
        device: &DeviceAuth,
        nonce: &str,
        provider: &str,
        token: &str,
        ip: Option<IpAddr>,
    ) -> Result<VerifyOutcome, AttestationError> {
        let secret = provider_secret(provider, self.test_secret.as_ref())?;
        let stored = self.shared.take(&keys::nonce(&device.device_id)).await?;
        let fresh = stored.is_some_and(|s| bool::from(s.ct_eq(nonce.as_bytes())));
        if !fresh {
            self.record(device, false, "nonce_replay", ip).await?;
            return Err(AttestationError::NonceReplay);
        }
        let (passes, reason) = judge(secret, token, nonce, &device.device_id);
        let verified = passes == 2;
        self.record(device, verified, reason, ip).await?;
        Ok(VerifyOutcome {
            verdict: if verified {
                Verdict::Verified
            } else {
                Verdict::Failed
            },
            attestation_score: f64::from(passes) / 2.0,
        })
    }

    async fn record(
        &self,
        device: &DeviceAuth,
        verified: bool,
        reason: &str,
        ip: Option<IpAddr>,
    ) -> Result<(), AttestationError> {
        let outcome = self
            .store
            .record_attestation(&device.device_id, verified, self.max_failures)
            .await?;
        // Workers read the verdict from the device cache: drop it everywhere.
        self.auth.devices.invalidate(&device.device_id).await;
        let kind = if verified {
            "attestation:verified"
        } else {
            "attestation:failed"
        };
        let event = self.auth.event(
            kind,
            Some(device.user_id),
            Some(&device.device_id),
            ip,
            serde_json::json!({"reason": reason, "failures": outcome.failures}),
        );
        self.store.record_event(event).await?;
        if !verified {
            self.firewall
                .check(
                    "attestation:failed",
                    Subject {
                        ip,
                        user_id: Some(device.user_id),
                        device_id: Some(&device.device_id),
                    },
                )
                .await?;
        }
        if outcome.quarantined {
            tracing::warn!(device_id = %device.device_id, failures = outcome.failures, "device quarantined");
            self.store
                .append_audit(NewAuditEntry {
                    user_id: Some(device.user_id),
                    device_id: Some(device.device_id.clone()),
                    jti: Some(device.jti.to_string()),
                    ip: Auth::ip_prefix(ip),
                    user_agent: None,
                    source: AuditSource::Http,
                    threat_score: None,
                    decision_reason: Some("attestation_failed".into()),
                    attestation_state: Some("failed".into()),
                    action_taken: "IMMEDIATE_QUARANTINE".into(),
                })
                .await?;
            self.auth.devices.invalidate(&device.device_id).await;
            // The quarantine is committed; a failed publish must not turn the
            // answer into a 500 (the device learns its state on reconnect).
            if let Err(e) = realtime::issue(
                self.shared.as_ref(),
                &device.device_id,
                Action::ImmediateQuarantine,
                "attestation_failed",
            )
            .await
            {
                tracing::error!(error = %e, "publishing IMMEDIATE_QUARANTINE failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};

    use super::*;

    fn secret() -> SecretString {
        SecretString::from("attestation-test-secret".to_owned())
    }

    fn token(secret: &str, nonce: &str, device_id: &str, app: &str, device: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({
                "nonce": nonce, "device_id": device_id,
                "app_integrity": app, "device_integrity": device,
            }),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("test token")
    }

    #[test]
    fn unknown_providers_are_refused_before_unconfigured_ones() {
        let s = secret();
        assert!(matches!(
            provider_secret("safetynet", Some(&s)),
            Err(AttestationError::UnknownProvider)
        ));
        assert!(matches!(
            provider_secret("safetynet", None),
            Err(AttestationError::UnknownProvider)
        ));
        for provider in ["play_integrity", "app_attest"] {
            assert!(matches!(
                provider_secret(provider, Some(&s)),
                Err(AttestationError::ProviderNotConfigured)
            ));
        }
        assert!(matches!(
            provider_secret("test", None),
            Err(AttestationError::ProviderNotConfigured)
        ));
        assert!(provider_secret("test", Some(&s)).is_ok());
    }

    #[test]
    fn a_token_counts_the_checks_that_pass() {
        let s = secret();
        let key = s.expose_secret().to_owned();
        let t = token(&key, "n1", "dev-1", "pass", "pass");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), (2, "integrity_check"));
        let t = token(&key, "n1", "dev-1", "pass", "fail");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), (1, "integrity_check"));
        let t = token(&key, "n1", "dev-1", "fail", "fail");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), (0, "integrity_check"));
    }

    #[test]
    fn a_token_for_another_nonce_device_or_key_is_invalid() {
        let s = secret();
        let key = s.expose_secret().to_owned();
        let invalid = (0, "invalid_attestation_token");
        let t = token(&key, "n2", "dev-1", "pass", "pass");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), invalid);
        let t = token(&key, "n1", "dev-2", "pass", "pass");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), invalid);
        let t = token("another-secret", "n1", "dev-1", "pass", "pass");
        assert_eq!(judge(&s, &t, "n1", "dev-1"), invalid);
        assert_eq!(judge(&s, "not a jwt", "n1", "dev-1"), invalid);
    }
}
