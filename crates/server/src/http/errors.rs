//! Every domain error's status and stable code, decided once.
//!
//! Domain components (`auth`, `firewall`, `signals`, …) answer with their own
//! error enums and know nothing of HTTP; each variant becomes an [`ApiError`]
//! here, so the contract's codes and details live in one file whatever the
//! transport that surfaced them.

use axum::http::StatusCode;

use crate::{
    auth::{
        attestation::AttestationError, passwords::PasswordError, sessions::SessionError,
        DeviceRefusal,
    },
    billing::limits::RateLimited,
    error::{codes, ApiError},
    firewall::FirewallError,
    intel_change::IntelChangeError,
    signals::ingest::IngestError,
};

impl From<DeviceRefusal> for ApiError {
    fn from(refusal: DeviceRefusal) -> Self {
        match refusal {
            DeviceRefusal::AccountBlocked => {
                Self::forbidden(codes::ACCOUNT_BLOCKED, "This account is blocked.")
            }
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

impl From<PasswordError> for ApiError {
    fn from(err: PasswordError) -> Self {
        match err {
            PasswordError::Busy => Self::Busy {
                retry_after: std::time::Duration::from_secs(1),
            },
            PasswordError::Failed(e) => Self::Internal(e),
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
            SessionError::TooManyDevices => Self::conflict(
                codes::TOO_MANY_DEVICES,
                "This account has as many signed-in devices as allowed: sign out on one first.",
            ),
            SessionError::DeviceInUse => Self::conflict(
                codes::DEVICE_IN_USE,
                "This device is registered to another account.",
            ),
            SessionError::EmailTaken => Self::conflict(
                codes::EMAIL_TAKEN,
                "An account with this email already exists.",
            ),
            SessionError::Device(refusal) => refusal.into(),
            SessionError::InvalidRefreshToken => Self::unauthorized(
                codes::INVALID_REFRESH_TOKEN,
                "The refresh token is not valid.",
            ),
            SessionError::RefreshTokenReused => Self::unauthorized(
                codes::REFRESH_TOKEN_REUSED,
                "This refresh token was already used, or presented for another device; the session has been revoked.",
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
            AttestationError::Field { field, message } => Self::invalid_field(field, message),
            AttestationError::Invalid(_) => Self::Client {
                status: http::StatusCode::UNPROCESSABLE_ENTITY,
                code: codes::ATTESTATION_INVALID,
                detail: "The attestation artefact is malformed.",
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

impl From<IntelChangeError> for ApiError {
    fn from(err: IntelChangeError) -> Self {
        match err {
            IntelChangeError::InvalidEntry { field } => Self::Validation {
                field,
                message: "is not a valid entry".into(),
            },
            IntelChangeError::TooBroad { field } => Self::Validation {
                field,
                message: "is broader than /8 (IPv4) or /32 (IPv6)".into(),
            },
            IntelChangeError::TooManyEntries => {
                Self::invalid_field("add", "at most 10000 entries per change")
            }
            IntelChangeError::Store(e) => e.into(),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::RateLimited { retry_after } => Self::RateLimited { retry_after },
            IngestError::Replay { last_seq } => Self::Replay { last_seq },
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    fn answer(err: impl Into<ApiError>) -> (StatusCode, String, Option<String>, String) {
        let problem = err.into().to_problem();
        (
            StatusCode::from_u16(problem.status).expect("a status"),
            problem.code,
            problem.field,
            problem.detail,
        )
    }

    #[test]
    fn attestation_errors_keep_their_status_code_and_detail() {
        let (status, code, field, _) = answer(AttestationError::UnknownProvider);
        assert_eq!(
            (status, code.as_str(), field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::VALIDATION_FAILED,
                Some("provider")
            )
        );
        let (status, code, _, _) = answer(AttestationError::ProviderNotConfigured);
        assert_eq!(
            (status, code.as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::PROVIDER_NOT_CONFIGURED
            )
        );
        let (status, code, _, _) = answer(AttestationError::NonceReplay);
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::CONFLICT, codes::NONCE_REPLAY)
        );
        let refused = AttestationError::Firewall(FirewallError::Refused {
            retry_after: Duration::from_secs(9),
        });
        assert!(matches!(
            ApiError::from(refused),
            ApiError::RateLimited { retry_after } if retry_after == Duration::from_secs(9)
        ));
    }

    #[test]
    fn a_rate_limit_refusal_is_the_generic_429() {
        let retry_after = Duration::from_millis(1500);
        assert!(matches!(
            ApiError::from(RateLimited { retry_after }),
            ApiError::RateLimited { retry_after: r } if r == retry_after
        ));
    }

    #[test]
    fn saturated_hashing_is_a_503_with_retry_after() {
        use axum::response::IntoResponse;
        let response = ApiError::from(PasswordError::Busy).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        let problem = response
            .extensions()
            .get::<crate::error::Problem>()
            .expect("problem");
        assert_eq!(problem.code, "service_unavailable");
    }

    #[test]
    fn intel_change_errors_name_the_field() {
        let (status, code, field, detail) = answer(IntelChangeError::InvalidEntry {
            field: "add.ips[2]".into(),
        });
        assert_eq!(
            (status, code.as_str(), field.as_deref(), detail.as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::VALIDATION_FAILED,
                Some("add.ips[2]"),
                "is not a valid entry"
            )
        );
        let (status, _, field, detail) = answer(IntelChangeError::TooManyEntries);
        assert_eq!(
            (status, field.as_deref(), detail.as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("add"),
                "at most 10000 entries per change"
            )
        );
    }
}
