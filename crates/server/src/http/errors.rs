//! Every domain error's status and stable code, decided once.
//!
//! Domain components (`auth`, `firewall`, `signals`, …) answer with their own
//! error enums and know nothing of HTTP; each variant becomes an [`ApiError`]
//! here, so the contract's codes and details live in one file whatever the
//! transport that surfaced them.

use crate::{
    auth::{attestation::AttestationError, sessions::SessionError, DeviceRefusal},
    billing::limits::RateLimited,
    error::{codes, ApiError},
    firewall::FirewallError,
};

impl From<DeviceRefusal> for ApiError {
    fn from(refusal: DeviceRefusal) -> Self {
        match refusal {
            DeviceRefusal::Revoked => Self::unauthorized(
                codes::DEVICE_REVOKED,
                "This device's sessions were revoked.",
            ),
            DeviceRefusal::Locked => {
                Self::forbidden(codes::DEVICE_LOCKED, "This device is locked.")
            }
        }
    }
}

impl From<FirewallError> for ApiError {
    fn from(err: FirewallError) -> Self {
        match err {
            // The same generic 429 a plain rate limit gives.
            FirewallError::Refused { retry_after } => Self::RateLimited { retry_after },
            FirewallError::Store(e) => e.into(),
            FirewallError::State(e) => e.into(),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> Self {
        match err {
            SessionError::AccountBlocked => {
                Self::forbidden(codes::ACCOUNT_BLOCKED, "This account is blocked.")
            }
            SessionError::DeviceInUse => Self::conflict(
                codes::DEVICE_IN_USE,
                "This device is registered to another account.",
            ),
            SessionError::Device(refusal) => refusal.into(),
            SessionError::InvalidRefreshToken => Self::unauthorized(
                codes::INVALID_REFRESH_TOKEN,
                "The refresh token is not valid.",
            ),
            SessionError::RefreshTokenReused => Self::unauthorized(
                codes::REFRESH_TOKEN_REUSED,
                "This refresh token was already used; the session has been revoked.",
            ),
            SessionError::RateLimited { retry_after } => Self::RateLimited { retry_after },
            SessionError::Firewall(e) => e.into(),
            SessionError::Signing(e) => Self::Internal(e),
            SessionError::Store(e) => e.into(),
            SessionError::State(e) => e.into(),
        }
    }
}

impl From<AttestationError> for ApiError {
    fn from(err: AttestationError) -> Self {
        match err {
            AttestationError::UnknownProvider => {
                Self::invalid_field("provider", "must be play_integrity, app_attest or test")
            }
            AttestationError::ProviderNotConfigured => Self::Client {
                status: http::StatusCode::UNPROCESSABLE_ENTITY,
                code: codes::PROVIDER_NOT_CONFIGURED,
                detail: "This attestation provider is not configured on this server.",
            },
            AttestationError::NonceReplay => Self::conflict(
                codes::NONCE_REPLAY,
                "This nonce was already used, belongs to another device, or expired.",
            ),
            AttestationError::Firewall(e) => e.into(),
            AttestationError::Store(e) => e.into(),
            AttestationError::State(e) => e.into(),
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(RateLimited { retry_after }: RateLimited) -> Self {
        Self::RateLimited { retry_after }
    }
}
