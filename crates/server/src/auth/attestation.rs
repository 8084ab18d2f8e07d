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

use std::net::IpAddr;

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::random_token;
use crate::http::extract::DeviceAuth;
use crate::{
    app::AppState,
    error::{codes, ApiError},
    realtime::{self, Action},
    state::keys,
    store::{AuditSource, NewAuditEntry},
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

#[derive(Debug, Deserialize)]
struct TestClaims {
    nonce: String,
    device_id: String,
    app_integrity: String,
    device_integrity: String,
}

/// Issues a nonce for the device; returns it with its expiry.
pub async fn issue_nonce(
    state: &AppState,
    device: &DeviceAuth,
) -> Result<(String, chrono::DateTime<chrono::Utc>), ApiError> {
    let nonce = random_token("");
    let ttl = state.config.attestation_nonce_ttl;
    state
        .shared
        .set(&keys::nonce(&device.device_id), nonce.as_bytes(), Some(ttl))
        .await?;
    let expires_at = chrono::Utc::now()
        + chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::seconds(180));
    Ok((nonce, expires_at))
}

/// Verifies an attestation token for the device (see the module docs).
pub async fn verify(
    state: &AppState,
    device: &DeviceAuth,
    nonce: &str,
    provider: &str,
    token: &str,
    ip: Option<IpAddr>,
) -> Result<VerifyOutcome, ApiError> {
    let secret = match provider {
        "test" => state.config.attestation_test_secret.as_ref(),
        "play_integrity" | "app_attest" => None,
        _ => {
            return Err(ApiError::invalid_field(
                "provider",
                "must be play_integrity, app_attest or test",
            ))
        }
    };
    let Some(secret) = secret else {
        return Err(ApiError::Client {
            status: http::StatusCode::UNPROCESSABLE_ENTITY,
            code: codes::PROVIDER_NOT_CONFIGURED,
            detail: "This attestation provider is not configured on this server.",
        });
    };
    let stored = state.shared.take(&keys::nonce(&device.device_id)).await?;
    let fresh = stored.is_some_and(|s| bool::from(s.ct_eq(nonce.as_bytes())));
    if !fresh {
        record(state, device, false, "nonce_replay", ip).await?;
        return Err(ApiError::conflict(
            codes::NONCE_REPLAY,
            "This nonce was already used, belongs to another device, or expired.",
        ));
    }
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
    .filter(|c| {
        bool::from(c.nonce.as_bytes().ct_eq(nonce.as_bytes())) && c.device_id == device.device_id
    });
    let (passes, reason) = match &claims {
        Some(c) => (
            u8::from(c.app_integrity == "pass") + u8::from(c.device_integrity == "pass"),
            "integrity_check",
        ),
        None => (0, "invalid_attestation_token"),
    };
    let verified = passes == 2;
    record(state, device, verified, reason, ip).await?;
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
    state: &AppState,
    device: &DeviceAuth,
    verified: bool,
    reason: &str,
    ip: Option<IpAddr>,
) -> Result<(), ApiError> {
    let outcome = state
        .store
        .record_attestation(
            &device.device_id,
            verified,
            state.config.attestation_max_failures,
        )
        .await?;
    // Workers read the verdict from the device cache: drop it everywhere.
    state.auth.devices.invalidate(&device.device_id).await;
    let kind = if verified {
        "attestation:verified"
    } else {
        "attestation:failed"
    };
    let event = state.auth.event(
        kind,
        Some(device.user_id),
        Some(&device.device_id),
        ip,
        serde_json::json!({"reason": reason, "failures": outcome.failures}),
    );
    state.store.record_event(event).await?;
    if !verified {
        state
            .firewall
            .check(
                "attestation:failed",
                crate::firewall::Subject {
                    ip,
                    user_id: Some(device.user_id),
                    device_id: Some(&device.device_id),
                },
            )
            .await?;
    }
    if outcome.quarantined {
        tracing::warn!(device_id = %device.device_id, failures = outcome.failures, "device quarantined");
        state
            .store
            .append_audit(NewAuditEntry {
                user_id: Some(device.user_id),
                device_id: Some(device.device_id.clone()),
                jti: Some(device.jti.to_string()),
                ip: super::Auth::ip_prefix(ip),
                user_agent: None,
                source: AuditSource::Http,
                threat_score: None,
                decision_reason: Some("attestation_failed".into()),
                attestation_state: Some("failed".into()),
                action_taken: "IMMEDIATE_QUARANTINE".into(),
            })
            .await?;
        state.auth.devices.invalidate(&device.device_id).await;
        // The quarantine is committed; a failed publish must not turn the
        // answer into a 500 (the device learns its state on reconnect).
        if let Err(e) = realtime::issue(
            state.shared.as_ref(),
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
