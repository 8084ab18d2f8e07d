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
//! §4.14.2): somebody holds a copy — except the immediately previous token
//! presented again within the reuse interval, a client retrying after a
//! lost response, which gets the pair it missed ([`super::successor`]).
//! Reuse revokes every family of the device, places a `refresh_reuse` hold
//! on it, writes an audit row and a `refresh:reuse` event in one transaction, then sets `revoked:device:{id}` and publishes
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

use super::{
    random_token, sha256,
    successor::{self, Successor},
    tokens, Auth, DeviceAuth, DeviceRefusal,
};
use crate::{
    firewall::{Firewall, FirewallError, Subject},
    realtime::{self, Action},
    state::{keys, SharedState, StateError},
    store::{
        AuditSource, HoldAction, HoldSource, NewAuditEntry, NewHold, NewRefreshToken, NewSession,
        NewUser, RefreshRecord, Revocation, RotateOutcome, Store, StoreError, User, UserStatus,
        TOO_MANY_DEVICES,
    },
    telemetry::Metrics,
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
    /// The user already has as many devices with a live session as allowed.
    #[error("too many devices")]
    TooManyDevices,
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
    limits: SessionLimits,
    metrics: Arc<Metrics>,
}

/// The numbers a deployment tunes about sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Refreshes per device per minute.
    pub refresh_per_minute: u32,
    /// Devices with a live session per user.
    pub max_devices_per_user: u32,
    /// How long the immediately previous refresh token still answers with
    /// the current pair (zero: never).
    pub reuse_interval: Duration,
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

/// Who opens a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// The user, signing in with a password.
    User,
    /// An operator, through the admin API.
    Operator,
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
    /// The sessions component over its handles and the deployment's limits.
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        firewall: Arc<Firewall>,
        limits: SessionLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            shared,
            auth,
            firewall,
            limits,
            metrics,
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
    /// quarantined devices are refused, and so is one device more than
    /// [`SessionLimits::max_devices_per_user`] — for a sign-in; an operator
    /// minting sessions ([`Opener::Operator`]) is trusted with any number.
    pub async fn open(
        &self,
        user: &User,
        binding: DeviceBinding<'_>,
        origin: &Origin,
        opener: Opener,
    ) -> Result<SessionTokens, SessionError> {
        if user.status != UserStatus::Active {
            return Err(SessionError::AccountBlocked);
        }
        let max_devices = match opener {
            Opener::User => self.limits.max_devices_per_user,
            Opener::Operator => u32::MAX,
        };
        self.open_session(user.id, None, binding, origin, max_devices)
            .await
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
        if let Some(refusal) = DeviceRefusal::for_device(existing.status, existing.owner_status) {
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
        self.open_session(
            user.id,
            Some(user),
            binding,
            origin,
            self.limits.max_devices_per_user,
        )
        .await
    }

    async fn open_session(
        &self,
        user_id: Uuid,
        new_user: Option<NewUser>,
        binding: DeviceBinding<'_>,
        origin: &Origin,
        max_devices: u32,
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
            max_devices,
        };
        let opened = match new_user {
            None => self.store.start_session(session).await,
            Some(user) => self.store.register(user, session).await.map(drop),
        };
        match opened {
            Ok(()) => {}
            Err(StoreError::Conflict { constraint }) if constraint == TOO_MANY_DEVICES => {
                return Err(SessionError::TooManyDevices)
            }
            Err(StoreError::Conflict { constraint }) if constraint.contains("email") => {
                return Err(SessionError::EmailTaken)
            }
            Err(e) => return Err(e.into()),
        }
        // The device may have moved between users: drop every cached view of it.
        self.auth.devices.invalidate(device_id).await;
        // A new session (a reinstall, a new sign-in) starts heartbeat `seq`s
        // afresh: 0, known (a missing value is refilled from the store, so
        // the store's copy starts again too).
        self.store
            .reset_device_sequence(device_id, crate::store::SequenceKind::Heartbeat)
            .await?;
        self.shared
            .set(
                &crate::state::keys::heartbeat_seq(device_id),
                b"0",
                Some(crate::signals::scoring::STATE_TTL),
            )
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

    /// Exchanges a refresh token for a new pair (see the module docs);
    /// counted in `auth_refresh_attempts_total{outcome}`.
    pub async fn refresh(
        &self,
        presented: &str,
        device_id: &str,
        fingerprint: &str,
        origin: &Origin,
    ) -> Result<SessionTokens, SessionError> {
        let exchanged = self
            .exchange(presented, device_id, fingerprint, origin)
            .await;
        self.metrics.refresh_attempt(match &exchanged {
            Ok((_, false)) => "rotated",
            Ok((_, true)) => "reissued",
            Err(SessionError::InvalidRefreshToken) => "invalid",
            Err(SessionError::RefreshTokenReused) => "reuse",
            Err(SessionError::RateLimited { .. }) => "rate_limited",
            Err(SessionError::Device(_)) => "refused",
            Err(_) => "error",
        });
        exchanged.map(|(tokens, _)| tokens)
    }

    /// [`refresh`](Self::refresh): the pair, and whether it is the one a
    /// retry within the reuse interval gets again.
    async fn exchange(
        &self,
        presented: &str,
        device_id: &str,
        fingerprint: &str,
        origin: &Origin,
    ) -> Result<(SessionTokens, bool), SessionError> {
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
                self.limits.refresh_per_minute,
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
        if !same_device || !same_fingerprint {
            return Err(self.reuse(&record, "foreign_device", origin).await);
        }
        if record.used_at.is_some() {
            return match self.retried(&record, presented) {
                Some(tokens) => Ok((tokens, true)),
                None => Err(self.reuse(&record, "token_already_used", origin).await),
            };
        }
        if record.expires_at <= Utc::now() {
            return Err(SessionError::InvalidRefreshToken);
        }
        if let Some(device) = self.store.device(device_id).await? {
            if let Some(refusal) = DeviceRefusal::for_device(device.status, device.owner_status) {
                return Err(SessionError::Device(refusal));
            }
        }
        let new_token = random_token("brt_");
        let jti = Uuid::new_v4();
        // Signed before the swap, so the pair can be sealed into it.
        let access_token = self.issue_access(record.user_id, device_id, jti)?;
        let sealed = (!self.limits.reuse_interval.is_zero()).then(|| {
            successor::seal(
                presented,
                record.family_id,
                &Successor {
                    access_token: access_token.clone(),
                    refresh_token: new_token.clone(),
                    expires_at: Utc::now().timestamp()
                        + i64::try_from(self.auth.access_ttl.as_secs()).unwrap_or(i64::MAX),
                },
            )
        });
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
                sealed,
            )
            .await?;
        match outcome {
            RotateOutcome::Rotated => {}
            // Another request exchanged this token first: the same client
            // retrying (within the interval, it gets that request's pair),
            // or somebody holding a copy.
            RotateOutcome::AlreadyUsed => {
                let now = self.store.refresh_record(&hash).await?;
                return match now.as_ref().and_then(|r| self.retried(r, presented)) {
                    Some(tokens) => Ok((tokens, true)),
                    None => Err(self.reuse(&record, "token_already_used", origin).await),
                };
            }
            // Logged out or signed in again while this request was in flight.
            RotateOutcome::FamilyInactive => return Err(SessionError::InvalidRefreshToken),
        }
        let event = self.auth.event(
            "refresh:rotated",
            Some(record.user_id),
            Some(device_id),
            origin.ip,
            serde_json::json!({"family_id": record.family_id}),
        );
        self.store.record_event(event).await?;
        let tokens = SessionTokens {
            user_id: record.user_id,
            access_token,
            refresh_token: new_token,
            expires_in: self.auth.access_ttl.as_secs(),
            token_type: "Bearer",
        };
        Ok((tokens, false))
    }

    /// The pair a spent token's rotation issued, when `record` is the
    /// immediately previous token of a live family and was spent less than
    /// the reuse interval ago (see [`successor`]).
    fn retried(&self, record: &RefreshRecord, presented: &str) -> Option<SessionTokens> {
        let used_at = record.used_at?;
        let interval = chrono::Duration::from_std(self.limits.reuse_interval).ok()?;
        if !record.family_active || interval.is_zero() || Utc::now() - used_at > interval {
            return None;
        }
        let pair = successor::open(
            presented,
            record.family_id,
            record.successor_sealed.as_deref()?,
        )?;
        let expires_in = pair.expires_at.saturating_sub(Utc::now().timestamp());
        tracing::info!(device_id = %record.device_id, "refresh retried within the reuse interval");
        Some(SessionTokens {
            user_id: record.user_id,
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
            expires_in: u64::try_from(expires_in).unwrap_or(0),
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
                metrics: self.metrics.clone(),
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

    /// Ends the device's session: its refresh family is revoked, and the
    /// access token in hand is denied until it expires, on every instance.
    pub async fn logout(&self, caller: &DeviceAuth) -> Result<(), SessionError> {
        self.store
            .revoke_device(Revocation {
                device_id: caller.device_id.clone(),
                reason: "logout".into(),
                hold: None,
                audit: None,
                event: None,
            })
            .await?;
        let remaining = caller
            .expires_at
            .saturating_sub(Utc::now().timestamp())
            .saturating_add(tokens::LEEWAY_SECONDS as i64)
            .max(1);
        self.shared
            .set(
                &keys::denied_token(caller.jti),
                b"logout",
                Some(Duration::from_secs(remaining.unsigned_abs())),
            )
            .await?;
        self.auth.verified.forget(caller.jti);
        self.shared
            .publish(super::SIGNED_OUT_CHANNEL, caller.jti.to_string().as_bytes())
            .await?;
        Ok(())
    }
}

/// The handles the reuse clean-up needs, owned so it runs in a task of its own.
struct Revoker {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
}

async fn handle_reuse(state: Revoker, record: RefreshRecord, why: String, origin: Origin) {
    let (state, record, why, origin) = (&state, &record, why.as_str(), &origin);
    tracing::warn!(device_id = %record.device_id, user_id = %record.user_id, why, "refresh token reuse");
    let revocation = Revocation {
        device_id: record.device_id.clone(),
        reason: "refresh_token_reuse".into(),
        hold: Some(NewHold::new(
            HoldSource::RefreshReuse,
            HoldAction::Revoke,
            "refresh_token_reuse",
        )),
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
            actor: None,
            request_id: None,
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
        state.store.as_ref(),
        &state.metrics,
        realtime::Origin::Session,
        &record.device_id,
        Action::CriticalLock,
        "refresh_token_reuse",
    )
    .await
    {
        tracing::error!(error = %e, "publishing CRITICAL_LOCK failed");
    }
}
