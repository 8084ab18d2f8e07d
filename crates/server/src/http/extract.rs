//! Request extractors: who is calling.
//!
//! * [`DeviceAuth`] — `Authorization: Bearer <jwt>` plus `X-Device-Id`: the
//!   token verifies, the header equals its `did`, and the device is still
//!   active and bound to the token's user; then one token is taken from the
//!   device's plan bucket (`billing::limits`), the decision left for the
//!   `RateLimit-*` headers (`http::rate_limit`).
//! * [`MeteredLater`] — the same authentication, leaving the token to the
//!   handler (heartbeat ingestion takes it with its own work).
//! * [`AdminAuth`] — `Authorization: Bearer <admin key>`: the bootstrap key or
//!   a key created with `blockremote admin-key create`, compared by hash.
//! * [`ClientIp`] — the client's address, through trusted proxies only.

use std::net::{IpAddr, SocketAddr};

pub use crate::auth::DeviceAuth;
use crate::{
    app::AppState,
    auth::{client_ip, sha256, tokens, DeviceRefusal},
    error::{codes, ApiError},
    http::rate_limit::{self, RateLimitSlot},
    store::{DeviceStatus, UserStatus},
};
use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{header, request::Parts},
};

/// The header naming the calling device.
pub const DEVICE_ID_HEADER: &str = "x-device-id";

/// The bearer token of the `Authorization` header.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn invalid_token() -> ApiError {
    ApiError::unauthorized(
        codes::INVALID_TOKEN,
        "The access token is missing or invalid; sign in again.",
    )
}

fn refused_token(why: tokens::InvalidToken) -> ApiError {
    match why {
        tokens::InvalidToken::Expired => ApiError::unauthorized(
            codes::TOKEN_EXPIRED,
            "The access token has expired; refresh it.",
        ),
        tokens::InvalidToken::Invalid => invalid_token(),
    }
}

/// Which device states a caller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceGate {
    /// API routes: only active devices.
    ActiveOnly,
    /// The kill-switch socket: locked and quarantined devices may connect (to
    /// learn their state and receive `UNLOCK`); revoked ones may not.
    AllowLocked,
}

/// Verifies `token` for a device: signature and claims, the device header
/// (`required`: must be present; otherwise must match when present), and
/// the device's status per `gate`.
pub async fn authenticate(
    state: &AppState,
    token: &str,
    header_device: Option<&str>,
    header_required: bool,
    gate: DeviceGate,
) -> Result<(DeviceAuth, DeviceStatus), ApiError> {
    let now = chrono::Utc::now().timestamp();
    let claims = match state.auth.verified.get(token, now) {
        Some(claims) => claims,
        None => {
            let mut keys = state.auth.keys.current();
            if let Some(kid) = tokens::unknown_kid(&keys, token) {
                if state.auth.keys.learn(state.store.as_ref(), &kid).await {
                    keys = state.auth.keys.current();
                }
            }
            let claims = tokens::verify(&keys, &state.auth.issuer, &state.auth.audience, token)
                .map_err(refused_token)?;
            // Signed out: denied until it expires (asked once per token per
            // instance and minute; see `auth::verified`).
            if state
                .shared
                .get(&crate::state::keys::denied_token(claims.jti))
                .await?
                .is_some()
            {
                return Err(invalid_token());
            }
            state.auth.verified.insert(token, &claims, now);
            claims
        }
    };
    match header_device {
        Some(device) if device != claims.did => {
            return Err(ApiError::unauthorized(
                codes::DEVICE_MISMATCH,
                "X-Device-Id names a different device than the one the token was issued to.",
            ))
        }
        None if header_required => {
            return Err(ApiError::unauthorized(
                codes::DEVICE_MISMATCH,
                "X-Device-Id is missing; send the id of the device the token was issued to.",
            ))
        }
        _ => {}
    }
    let device = state
        .auth
        .devices
        .get(state.store.as_ref(), &claims.did)
        .await?;
    let Some(device) = device.filter(|d| d.user_id == claims.sub) else {
        return Err(ApiError::unauthorized(
            codes::DEVICE_REVOKED,
            "This device's sessions were revoked.",
        ));
    };
    let refusal = match (gate, device.status) {
        (DeviceGate::AllowLocked, DeviceStatus::Locked | DeviceStatus::Quarantined)
            if device.owner == UserStatus::Active =>
        {
            None
        }
        (_, status) => DeviceRefusal::for_device(status, device.owner),
    };
    if let Some(refusal) = refusal {
        return Err(refusal.into());
    }
    let span = tracing::Span::current();
    span.record("device_id", claims.did.as_str());
    span.record("user_id", tracing::field::display(claims.sub));
    Ok((
        DeviceAuth {
            user_id: claims.sub,
            device_id: claims.did,
            jti: claims.jti,
            expires_at: claims.exp,
        },
        device.status,
    ))
}

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let metered = MeteredLater::from_request_parts(parts, state).await?;
        metered.take_token(state).await?;
        Ok(metered.device)
    }
}

/// A device authenticated as by [`DeviceAuth`], whose rate-limit token the
/// handler takes itself — with its own work, in one round trip on Redis
/// (heartbeat ingestion) — or through [`take_token`](Self::take_token).
/// The handler must do one or the other on every path.
#[derive(Clone)]
pub struct MeteredLater {
    /// The device.
    pub device: DeviceAuth,
    slot: Option<RateLimitSlot>,
}

impl MeteredLater {
    /// Takes the token as [`DeviceAuth`] does; `Err(429)` when refused.
    pub async fn take_token(&self, state: &AppState) -> Result<(), ApiError> {
        match state
            .limits
            .take(self.device.user_id, &self.device.device_id)
            .await?
        {
            Some(decision) => self.record(decision),
            None => Ok(()),
        }
    }

    /// Records a decision taken by the handler's own call; `Err(429)` when refused.
    pub fn record(&self, decision: crate::state::BucketDecision) -> Result<(), ApiError> {
        rate_limit::record(self.slot.as_ref(), decision)
    }
}

impl FromRequestParts<AppState> for MeteredLater {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(invalid_token)?;
        let header_device = parts
            .headers
            .get(DEVICE_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        let (device, _) =
            authenticate(state, token, header_device, true, DeviceGate::ActiveOnly).await?;
        Ok(Self {
            device,
            slot: parts.extensions.get::<RateLimitSlot>().cloned(),
        })
    }
}

/// An authenticated operator (admin API key).
#[derive(Debug, Clone)]
pub struct AdminAuth {
    /// Who, for the records an operator's action leaves (holds): `admin:`
    /// and the first 8 hex digits of the key's SHA-256 — enough to tell keys
    /// apart, nothing to sign in with.
    pub operator: String,
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let refused = || {
            ApiError::unauthorized(
                codes::INVALID_ADMIN_KEY,
                "A valid admin API key is required.",
            )
        };
        let key = bearer(parts).ok_or_else(refused)?;
        let hash = sha256(key.as_bytes());
        if state.auth.is_bootstrap_admin(&hash) || state.store.admin_key_exists(&hash).await? {
            Ok(Self {
                operator: format!("admin:{}", hex::encode(&hash[..4])),
            })
        } else {
            Err(refused())
        }
    }
}

/// The client's IP (None when the transport gives no peer address, as in
/// in-process tests).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        // Every X-Forwarded-For line, in order: a proxy may add its own line
        // after a forged one sent by the client.
        let forwarded: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
        Ok(Self(peer.map(|peer| {
            client_ip::client_ip(peer, forwarded.as_deref(), &state.config.trusted_proxies)
        })))
    }
}
