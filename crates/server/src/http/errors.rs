//! Every domain error's status and stable code, decided once.
//!
//! Domain components (`auth`, `firewall`, `signals`, …) answer with their own
//! error enums and know nothing of HTTP; each variant becomes an [`ApiError`]
//! here, so the contract's codes and details live in one file whatever the
//! transport that surfaced them.

use axum::http::StatusCode;

use crate::{
    auth::{sessions::SessionError, DeviceRefusal},
    error::{codes, ApiError},
    firewall::FirewallError,
    signals::ingest::IngestError,
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

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::RateLimited { retry_after } => Self::RateLimited { retry_after },
            IngestError::Replay => Self::conflict(
                codes::REPLAY,
                "This heartbeat's seq is not above the last one accepted.",
            ),
            IngestError::Unavailable => Self::Client {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: codes::QUEUE_FULL,
                detail: "The heartbeat could not be taken now; retry.",
            },
            IngestError::Encode(e) => Self::Internal(e.into()),
            IngestError::Store(e) => e.into(),
            IngestError::State(e) => e.into(),
            IngestError::Limiter(cause) => Self::Internal(cause),
        }
    }
}
