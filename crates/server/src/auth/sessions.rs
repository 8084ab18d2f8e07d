//! Device sessions: open, rotate, revoke.
//!
//! ## Refresh families
//! Each sign-in on a device opens a *family*; every refresh exchanges the
//! presented token for a new one in the same family (rotation on every use,
//! with a sliding expiry set by the user's plan). Only the SHA-256 of a token
//! is stored. The exchange is a compare-and-swap in the database — "mark the
//! old token used if it is still unused" — so two concurrent refreshes cannot
//! both win.
//!
//! Presenting a token that was already used, or presenting it with another
//! device id or fingerprint than it was issued to, is *reuse* (RFC 9700
//! §4.14.2): somebody holds a copy. Reuse revokes every family of the device,
//! marks the device revoked, writes an audit row and a `refresh:reuse` event
//! in one transaction, then sets `revoked:device:{id}` and publishes
//! `CRITICAL_LOCK` to the device.
//!
//! Refresh tokens live in the durable store on both backends rather than in
//! Redis: a refresh token outlives any cache entry (days, by plan), and a
//! Redis restart must not sign every user out — nor, worse, forget which
//! tokens were already used and so lose reuse detection.

use std::net::IpAddr;

use chrono::Utc;
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{random_token, sha256, tokens};
use crate::{
    app::AppState,
    error::{codes, ApiError},
    realtime::{self, Action},
    state::keys,
    store::{
        AuditSource, DeviceStatus, NewAuditEntry, NewRefreshToken, NewSession, RefreshRecord,
        Revocation, RotateOutcome, User, UserStatus,
    },
};

/// The token pair handed to a device.
#[derive(Serialize, ToSchema)]
pub struct SessionTokens {
    /// The user.
    pub user_id: Uuid,
    /// ES256 (or RS256) JWT bound to the device.
    pub access_token: String,
    /// Opaque, single-use refresh token.
    pub refresh_token: String,
    /// Access-token lifetime in seconds.
    pub expires_in: u64,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
}

impl std::fmt::Debug for SessionTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTokens")
            .field("user_id", &self.user_id)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// The device a session is opened on, as the client described it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBinding<'a> {
    /// Device id (validated).
    pub device_id: &'a str,
    /// The app's device fingerprint (only its SHA-256 is stored).
    pub fingerprint: &'a str,
    /// `android` or `ios`.
    pub platform: &'a str,
}

/// Where a session request came from (for events and audit rows).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Client address (anonymized before storage).
    pub ip: Option<IpAddr>,
    /// Client user agent.
    pub user_agent: Option<String>,
}

fn issue_access(
    state: &AppState,
    user_id: Uuid,
    device_id: &str,
    jti: Uuid,
) -> Result<String, ApiError> {
    let keys = state.auth.keys.current();
    let spec = tokens::TokenSpec {
        issuer: &state.auth.issuer,
        audience: &state.auth.audience,
        ttl: state.auth.access_ttl,
    };
    Ok(tokens::issue(&keys, &spec, user_id, device_id, jti)?.0)
}

async fn refresh_expiry(
    state: &AppState,
    user_id: Uuid,
) -> Result<chrono::DateTime<Utc>, ApiError> {
    let plan = state.store.plan_for_user(user_id).await?;
    Ok(crate::store::now_micros() + chrono::Duration::seconds(i64::from(plan.refresh_ttl_seconds)))
}

/// Opens a new session for `user` on a device: binds the device, revokes its
/// previous family, starts a new one. Blocked accounts and revoked, locked or
/// quarantined devices are refused.
pub async fn open(
    state: &AppState,
    user: &User,
    binding: DeviceBinding<'_>,
    origin: &Origin,
) -> Result<SessionTokens, ApiError> {
    let DeviceBinding {
        device_id,
        fingerprint,
        platform,
    } = binding;
    if user.status != UserStatus::Active {
        return Err(ApiError::forbidden(
            codes::ACCOUNT_BLOCKED,
            "This account is blocked.",
        ));
    }
    let fingerprint_sha256 = sha256(fingerprint.as_bytes());
    if let Some(existing) = state.store.device(device_id).await? {
        if let Some(refusal) = super::extract::refuse_status(existing.status) {
            // A locked device cannot be laundered through a fresh sign-in.
            return Err(refusal);
        }
        // Device ids are not secret (they travel in every request header):
        // another account may take a device over only from the same
        // hardware, i.e. presenting the fingerprint it was bound with.
        let same_hardware: bool = existing
            .fingerprint_sha256
            .ct_eq(&fingerprint_sha256)
            .into();
        if existing.user_id != user.id && !same_hardware {
            return Err(ApiError::conflict(
                codes::DEVICE_IN_USE,
                "This device is registered to another account.",
            ));
        }
    }
    crate::firewall::check(
        state,
        "create:session",
        crate::firewall::Subject {
            ip: origin.ip,
            user_id: Some(user.id),
            device_id: Some(device_id),
        },
    )
    .await?;
    let refresh_token = random_token("brt_");
    let jti = Uuid::new_v4();
    let family_id = Uuid::now_v7();
    state
        .store
        .start_session(NewSession {
            user_id: user.id,
            device_id: device_id.to_owned(),
            fingerprint_sha256: fingerprint_sha256.to_vec(),
            platform: platform.to_owned(),
            family_id,
            token: NewRefreshToken {
                token_sha256: sha256(refresh_token.as_bytes()).to_vec(),
                jti,
                issued_at: crate::store::now_micros(),
                expires_at: refresh_expiry(state, user.id).await?,
            },
        })
        .await?;
    // The device may have moved between users: drop every cached view of it.
    state.auth.devices.invalidate(device_id).await;
    // A new session (a reinstall, a new sign-in) starts heartbeat `seq`s afresh.
    state
        .shared
        .delete(&crate::state::keys::heartbeat_seq(device_id))
        .await?;
    let access_token = issue_access(state, user.id, device_id, jti)?;
    let event = state.auth.event(
        "create:session",
        Some(user.id),
        Some(device_id),
        origin.ip,
        serde_json::json!({"family_id": family_id, "platform": platform}),
    );
    state.store.record_event(event).await?;
    Ok(SessionTokens {
        user_id: user.id,
        access_token,
        refresh_token,
        expires_in: state.auth.access_ttl.as_secs(),
        token_type: "Bearer",
    })
}

/// Exchanges a refresh token for a new pair (see the module docs).
pub async fn refresh(
    state: &AppState,
    presented: &str,
    device_id: &str,
    fingerprint: &str,
    origin: &Origin,
) -> Result<SessionTokens, ApiError> {
    let invalid = || {
        ApiError::unauthorized(
            codes::INVALID_REFRESH_TOKEN,
            "The refresh token is not valid.",
        )
    };
    let hash = sha256(presented.as_bytes());
    let Some(record) = state.store.refresh_record(&hash).await? else {
        return Err(invalid());
    };
    if !record.family_active {
        return Err(invalid());
    }
    // Keyed by the device the token belongs to (known only now), so nobody
    // can exhaust a victim's bucket by sending garbage with its device id.
    let limit = state
        .shared
        .take_tokens(
            &keys::refresh_rate_limit(&record.device_id),
            state.config.refresh_per_minute,
            std::time::Duration::from_secs(60),
            1,
        )
        .await?;
    if !limit.allowed {
        return Err(ApiError::RateLimited {
            retry_after: limit.retry_after,
        });
    }
    let same_device = record.device_id == device_id;
    let same_fingerprint: bool = record
        .fingerprint_sha256
        .ct_eq(&sha256(fingerprint.as_bytes()))
        .into();
    if record.used || !same_device || !same_fingerprint {
        let why = if record.used {
            "token_already_used"
        } else {
            "foreign_device"
        };
        return Err(reuse(state, &record, why, origin).await);
    }
    if record.expires_at <= Utc::now() {
        return Err(invalid());
    }
    if let Some(device) = state.store.device(device_id).await? {
        if let Some(refusal) = super::extract::refuse_status(device.status) {
            return Err(refusal);
        }
    }
    let new_token = random_token("brt_");
    let jti = Uuid::new_v4();
    let outcome = state
        .store
        .rotate_refresh(
            &hash,
            record.family_id,
            NewRefreshToken {
                token_sha256: sha256(new_token.as_bytes()).to_vec(),
                jti,
                issued_at: crate::store::now_micros(),
                expires_at: refresh_expiry(state, record.user_id).await?,
            },
        )
        .await?;
    match outcome {
        RotateOutcome::Rotated => {}
        // Another request exchanged this token first: by definition a reuse.
        RotateOutcome::AlreadyUsed => {
            return Err(reuse(state, &record, "token_already_used", origin).await)
        }
        // Logged out or signed in again while this request was in flight.
        RotateOutcome::FamilyInactive => return Err(invalid()),
    }
    let access_token = issue_access(state, record.user_id, device_id, jti)?;
    let event = state.auth.event(
        "refresh:rotated",
        Some(record.user_id),
        Some(device_id),
        origin.ip,
        serde_json::json!({"family_id": record.family_id}),
    );
    state.store.record_event(event).await?;
    Ok(SessionTokens {
        user_id: record.user_id,
        access_token,
        refresh_token: new_token,
        expires_in: state.auth.access_ttl.as_secs(),
        token_type: "Bearer",
    })
}

/// Handles refresh-token reuse: revoke, mark, audit, record, lock — in a
/// task of its own, so that a client disconnecting or the request timing out
/// cannot cancel it halfway. Returns the error to answer with (a failure of
/// the clean-up is logged and still answered with the same 401, never a 200).
async fn reuse(state: &AppState, record: &RefreshRecord, why: &str, origin: &Origin) -> ApiError {
    let task = tokio::spawn(handle_reuse(
        state.clone(),
        record.clone(),
        why.to_owned(),
        origin.clone(),
    ));
    if let Err(e) = task.await {
        tracing::error!(error = %e, "reuse handling task failed");
    }
    ApiError::unauthorized(
        codes::REFRESH_TOKEN_REUSED,
        "This refresh token was already used; the session has been revoked.",
    )
}

async fn handle_reuse(state: AppState, record: RefreshRecord, why: String, origin: Origin) {
    let (state, record, why, origin) = (&state, &record, why.as_str(), &origin);
    tracing::warn!(device_id = %record.device_id, user_id = %record.user_id, why, "refresh token reuse");
    let revocation = Revocation {
        device_id: record.device_id.clone(),
        reason: "refresh_token_reuse".into(),
        device_status: Some(DeviceStatus::Revoked),
        audit: Some(NewAuditEntry {
            user_id: Some(record.user_id),
            device_id: Some(record.device_id.clone()),
            jti: None,
            ip: super::Auth::ip_prefix(origin.ip),
            user_agent: origin.user_agent.clone(),
            source: AuditSource::Http,
            threat_score: None,
            decision_reason: Some("refresh_token_reuse".into()),
            attestation_state: None,
            action_taken: "CRITICAL_LOCK".into(),
        }),
        event: Some(state.auth.event(
            "refresh:reuse",
            Some(record.user_id),
            Some(&record.device_id),
            origin.ip,
            serde_json::json!({"family_id": record.family_id, "why": why}),
        )),
    };
    if let Err(e) = state.store.revoke_device(revocation).await {
        tracing::error!(error = %e, "revoking a reused refresh family failed");
        return;
    }
    if let Err(e) = state
        .shared
        .set(
            &keys::revoked_device(&record.device_id),
            b"refresh_token_reuse",
            Some(crate::realtime::HISTORY_TTL),
        )
        .await
    {
        tracing::error!(error = %e, "setting the revocation marker failed");
    }
    state.auth.devices.invalidate(&record.device_id).await;
    if let Err(e) = realtime::issue(
        state.shared.as_ref(),
        &record.device_id,
        Action::CriticalLock,
        "refresh_token_reuse",
    )
    .await
    {
        tracing::error!(error = %e, "publishing CRITICAL_LOCK failed");
    }
}

/// Ends the device's session: its refresh family is revoked.
pub async fn logout(state: &AppState, device_id: &str) -> Result<(), ApiError> {
    state
        .store
        .revoke_device(Revocation {
            device_id: device_id.to_owned(),
            reason: "logout".into(),
            device_status: None,
            audit: None,
            event: None,
        })
        .await?;
    Ok(())
}

/// Refuses early when the device is revoked, locked or quarantined.
pub async fn ensure_device_usable(state: &AppState, device_id: &str) -> Result<(), ApiError> {
    match state.store.device(device_id).await? {
        Some(device) => super::extract::refuse_status(device.status).map_or(Ok(()), Err),
        None => Ok(()),
    }
}
