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

use std::{net::IpAddr, sync::Arc, time::Duration};

use chrono::Utc;
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{random_token, sha256, tokens, Auth, DeviceRefusal};
use crate::{
    firewall::{Firewall, FirewallError, Subject},
    realtime::{self, Action},
    state::{keys, SharedState, StateError},
    store::{
        AuditSource, DeviceStatus, NewAuditEntry, NewRefreshToken, NewSession, NewUser,
        RefreshRecord, Revocation, RotateOutcome, Store, StoreError, User, UserStatus,
    },
};

/// Wrong passwords for one email that cost nothing but the answer.
pub const FREE_LOGIN_FAILURES: i64 = 5;
/// The longest a sign-in waits after repeated wrong passwords.
pub const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(900);
/// How long wrong passwords are remembered after the last one.
const LOGIN_FAILURE_MEMORY: Duration = Duration::from_secs(3600);

/// `session:login_{what}:{sha256(email)}` (never the address itself).
fn login_key(what: &str, email: &str) -> String {
    format!(
        "session:login_{what}:{}",
        hex::encode(sha256(email.as_bytes()))
    )
}

/// Why a session could not be opened, refreshed or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The account is blocked.
    #[error("account blocked")]
    AccountBlocked,
    /// The device is bound to another account (and not the same hardware).
    #[error("device registered to another account")]
    DeviceInUse,
    /// Registration: an account with this email exists.
    #[error("email taken")]
    EmailTaken,
    /// The device is revoked, locked or quarantined.
    #[error("device refused: {0:?}")]
    Device(DeviceRefusal),
    /// Unknown, expired or revoked refresh token.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// A spent token (or one presented by another device) came back: the
    /// session was revoked.
    #[error("refresh token reused")]
    RefreshTokenReused,
    /// Too many refreshes for this device.
    #[error("rate limited for {retry_after:?}")]
    RateLimited {
        /// When the device may try again.
        retry_after: Duration,
    },
    /// The abuse firewall refused, or could not decide.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// The access token could not be signed.
    #[error("signing the access token failed: {0}")]
    Signing(#[source] anyhow::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Opens, rotates and ends device sessions (see the module docs).
pub struct Sessions {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
    firewall: Arc<Firewall>,
    refresh_per_minute: u32,
}

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

impl Sessions {
    /// The sessions component over its handles; `refresh_per_minute` is the
    /// per-device refresh budget.
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        firewall: Arc<Firewall>,
        refresh_per_minute: u32,
    ) -> Self {
        Self {
            store,
            shared,
            auth,
            firewall,
            refresh_per_minute,
        }
    }

    fn issue_access(
        &self,
        user_id: Uuid,
        device_id: &str,
        jti: Uuid,
    ) -> Result<String, SessionError> {
        let keys = self.auth.keys.current();
        let spec = tokens::TokenSpec {
            issuer: &self.auth.issuer,
            audience: &self.auth.audience,
            ttl: self.auth.access_ttl,
        };
        Ok(tokens::issue(&keys, &spec, user_id, device_id, jti)
            .map_err(SessionError::Signing)?
            .0)
    }

    async fn refresh_expiry(&self, user_id: Uuid) -> Result<chrono::DateTime<Utc>, SessionError> {
        let plan = self.store.plan_for_user(user_id).await?;
        Ok(crate::store::now_micros()
            + chrono::Duration::seconds(i64::from(plan.refresh_ttl_seconds)))
    }

    /// Opens a new session for `user` on a device: binds the device, revokes its
    /// previous family, starts a new one. Blocked accounts and revoked, locked or
    /// quarantined devices are refused.
    pub async fn open(
        &self,
        user: &User,
        binding: DeviceBinding<'_>,
        origin: &Origin,
    ) -> Result<SessionTokens, SessionError> {
        if user.status != UserStatus::Active {
            return Err(SessionError::AccountBlocked);
        }
        self.open_session(user.id, None, binding, origin).await
    }

    /// Refuses a device that `user_id` (`None`: an account not created yet)
    /// may not sign in on: revoked, locked or quarantined, or bound to another
    /// account and presented from other hardware. Registration asks this
    /// before it hashes or creates anything.
    pub async fn check_device(
        &self,
        user_id: Option<Uuid>,
        binding: DeviceBinding<'_>,
    ) -> Result<(), SessionError> {
        let Some(existing) = self.store.device(binding.device_id).await? else {
            return Ok(());
        };
        if let Some(refusal) = DeviceRefusal::for_status(existing.status) {
            // A locked device cannot be laundered through a fresh sign-in.
            return Err(SessionError::Device(refusal));
        }
        // Device ids are not secret (they travel in every request header):
        // another account may take a device over only from the same
        // hardware, i.e. presenting the fingerprint it was bound with.
        let same_hardware: bool = existing
            .fingerprint_sha256
            .ct_eq(&sha256(binding.fingerprint.as_bytes()))
            .into();
        if Some(existing.user_id) != user_id && !same_hardware {
            return Err(SessionError::DeviceInUse);
        }
        Ok(())
    }

    /// Creates an account and opens its first session, all or nothing: a
    /// refused registration leaves no user, no device binding and no event
    /// (`create:user` is recorded in the transaction that opens the session).
    pub async fn register(
        &self,
        email: &str,
        password_hash: String,
        binding: DeviceBinding<'_>,
        origin: &Origin,
    ) -> Result<SessionTokens, SessionError> {
        let user = NewUser {
            id: Uuid::now_v7(),
            email: email.to_owned(),
            password_hash,
        };
        self.open_session(user.id, Some(user), binding, origin)
            .await
    }

    async fn open_session(
        &self,
        user_id: Uuid,
        new_user: Option<NewUser>,
        binding: DeviceBinding<'_>,
        origin: &Origin,
    ) -> Result<SessionTokens, SessionError> {
        let DeviceBinding {
            device_id,
            fingerprint,
            platform,
        } = binding;
        // Registration asked this already, before its hash; asked again
        // here because the device may have been bound during that hash.
        self.check_device(new_user.is_none().then_some(user_id), binding)
            .await?;
        self.firewall
            .check(
                "create:session",
                Subject {
                    ip: origin.ip,
                    user_id: Some(user_id),
                    device_id: Some(device_id),
                },
            )
            .await?;
        let refresh_token = random_token("brt_");
        let jti = Uuid::new_v4();
        let family_id = Uuid::now_v7();
        let mut events = Vec::with_capacity(2);
        if new_user.is_some() {
            events.push(self.auth.event(
                "create:user",
                Some(user_id),
                Some(device_id),
                origin.ip,
                serde_json::json!({"platform": platform}),
            ));
        }
        events.push(self.auth.event(
            "create:session",
            Some(user_id),
            Some(device_id),
            origin.ip,
            serde_json::json!({"family_id": family_id, "platform": platform}),
        ));
        let session = NewSession {
            user_id,
            device_id: device_id.to_owned(),
            fingerprint_sha256: sha256(fingerprint.as_bytes()).to_vec(),
            platform: platform.to_owned(),
            family_id,
            token: NewRefreshToken {
                token_sha256: sha256(refresh_token.as_bytes()).to_vec(),
                jti,
                issued_at: crate::store::now_micros(),
                expires_at: self.refresh_expiry(user_id).await?,
            },
            events,
        };
        match new_user {
            None => self.store.start_session(session).await?,
            Some(user) => match self.store.register(user, session).await {
                Ok(_) => {}
                Err(StoreError::Conflict { constraint }) if constraint.contains("email") => {
                    return Err(SessionError::EmailTaken)
                }
                Err(e) => return Err(e.into()),
            },
        }
        // The device may have moved between users: drop every cached view of it.
        self.auth.devices.invalidate(device_id).await;
        // A new session (a reinstall, a new sign-in) starts heartbeat `seq`s afresh.
        self.shared
            .delete(&crate::state::keys::heartbeat_seq(device_id))
            .await?;
        let access_token = self.issue_access(user_id, device_id, jti)?;
        Ok(SessionTokens {
            user_id,
            access_token,
            refresh_token,
            expires_in: self.auth.access_ttl.as_secs(),
            token_type: "Bearer",
        })
    }

    /// Refuses a sign-in to `email` while its failure backoff runs
    /// ([`SessionError::RateLimited`]): after [`FREE_LOGIN_FAILURES`] wrong
    /// passwords, each further one doubles the wait (up to
    /// [`MAX_LOGIN_BACKOFF`]), whatever address the guesses come from. Only
    /// sign-in waits: the owner's devices and sessions are untouched. Keyed by
    /// the email's hash, known account or not, so the answer reveals nothing.
    pub async fn login_allowed(&self, email: &str) -> Result<(), SessionError> {
        let key = login_key("backoff", email);
        if self.shared.get(&key).await?.is_some() {
            let retry_after = self
                .shared
                .ttl(&key)
                .await?
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_secs(1));
            return Err(SessionError::RateLimited { retry_after });
        }
        Ok(())
    }

    /// Counts a wrong password for `email` and starts its backoff once the
    /// free failures are spent (see [`Self::login_allowed`]).
    pub async fn login_failed(&self, email: &str) -> Result<(), SessionError> {
        let failures = self
            .shared
            .incr(&login_key("failures", email), 1, LOGIN_FAILURE_MEMORY)
            .await?;
        if let Ok(past) = u32::try_from(failures - FREE_LOGIN_FAILURES) {
            let wait = Duration::from_secs(1u64 << past.min(20)).min(MAX_LOGIN_BACKOFF);
            self.shared
                .set(&login_key("backoff", email), b"1", Some(wait))
                .await?;
        }
        Ok(())
    }

    /// A right password: the failure count starts again.
    pub async fn login_succeeded(&self, email: &str) -> Result<(), SessionError> {
        self.shared.delete(&login_key("failures", email)).await?;
        Ok(())
    }

    /// Exchanges a refresh token for a new pair (see the module docs).
    pub async fn refresh(
        &self,
        presented: &str,
        device_id: &str,
        fingerprint: &str,
        origin: &Origin,
    ) -> Result<SessionTokens, SessionError> {
        let hash = sha256(presented.as_bytes());
        let Some(record) = self.store.refresh_record(&hash).await? else {
            return Err(SessionError::InvalidRefreshToken);
        };
        if !record.family_active {
            return Err(SessionError::InvalidRefreshToken);
        }
        // Keyed by the device the token belongs to (known only now), so nobody
        // can exhaust a victim's bucket by sending garbage with its device id.
        let limit = self
            .shared
            .take_tokens(
                &keys::refresh_rate_limit(&record.device_id),
                self.refresh_per_minute,
                std::time::Duration::from_secs(60),
                1,
            )
            .await?;
        if !limit.allowed {
            return Err(SessionError::RateLimited {
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
            return Err(self.reuse(&record, why, origin).await);
        }
        if record.expires_at <= Utc::now() {
            return Err(SessionError::InvalidRefreshToken);
        }
        if let Some(device) = self.store.device(device_id).await? {
            if let Some(refusal) = DeviceRefusal::for_status(device.status) {
                return Err(SessionError::Device(refusal));
            }
        }
        let new_token = random_token("brt_");
        let jti = Uuid::new_v4();
        let outcome = self
            .store
            .rotate_refresh(
                &hash,
                record.family_id,
                NewRefreshToken {
                    token_sha256: sha256(new_token.as_bytes()).to_vec(),
                    jti,
                    issued_at: crate::store::now_micros(),
                    expires_at: self.refresh_expiry(record.user_id).await?,
                },
            )
            .await?;
        match outcome {
            RotateOutcome::Rotated => {}
            // Another request exchanged this token first: by definition a reuse.
            RotateOutcome::AlreadyUsed => {
                return Err(self.reuse(&record, "token_already_used", origin).await)
            }
            // Logged out or signed in again while this request was in flight.
            RotateOutcome::FamilyInactive => return Err(SessionError::InvalidRefreshToken),
        }
        let access_token = self.issue_access(record.user_id, device_id, jti)?;
        let event = self.auth.event(
            "refresh:rotated",
            Some(record.user_id),
            Some(device_id),
            origin.ip,
            serde_json::json!({"family_id": record.family_id}),
        );
        self.store.record_event(event).await?;
        Ok(SessionTokens {
            user_id: record.user_id,
            access_token,
            refresh_token: new_token,
            expires_in: self.auth.access_ttl.as_secs(),
            token_type: "Bearer",
        })
    }

    /// Handles refresh-token reuse: revoke, mark, audit, record, lock — in a
    /// task of its own, so that a client disconnecting or the request timing out
    /// cannot cancel it halfway. Returns the error to answer with (a failure of
    /// the clean-up is logged and still answered with the same 401, never a 200).
    async fn reuse(&self, record: &RefreshRecord, why: &str, origin: &Origin) -> SessionError {
        let task = tokio::spawn(handle_reuse(
            Revoker {
                store: self.store.clone(),
                shared: self.shared.clone(),
                auth: self.auth.clone(),
            },
            record.clone(),
            why.to_owned(),
            origin.clone(),
        ));
        if let Err(e) = task.await {
            tracing::error!(error = %e, "reuse handling task failed");
        }
        SessionError::RefreshTokenReused
    }

    /// Ends the device's session: its refresh family is revoked.
    pub async fn logout(&self, device_id: &str) -> Result<(), SessionError> {
        self.store
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
}

/// The handles the reuse clean-up needs, owned so it runs in a task of its own.
struct Revoker {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
}

async fn handle_reuse(state: Revoker, record: RefreshRecord, why: String, origin: Origin) {
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
