//! One API error type, rendered as RFC 9457 `application/problem+json`.
//!
//! Handlers return [`ApiError`]; it becomes a response carrying a [`Problem`]
//! in its extensions. The request-context middleware (the outermost layer)
//! fills in the `request_id` and writes the body, so every error — ours, an
//! extractor's, or a tower layer's bare status — leaves the server in the same
//! shape. A 5xx is logged with its full cause chain here, once; its body says
//! nothing about the cause.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Stable, documented, machine-readable error codes (the `code` member).
///
/// Clients branch on these; they never change meaning. `docs/ERRORS.md`
/// documents each one, and a test keeps the two in step.
pub mod codes {
    /// The body is not well-formed JSON (or not JSON at all).
    pub const INVALID_BODY: &str = "invalid_body";
    /// A field is missing, unknown or out of range; `field` names it.
    pub const VALIDATION_FAILED: &str = "validation_failed";
    /// The body is larger than 64 KiB.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// The body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// No such route or resource.
    pub const NOT_FOUND: &str = "not_found";
    /// The route exists but not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// Too many requests; see `Retry-After`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The request took longer than the server allows.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// A dependency (database, cache) is unreachable.
    pub const NOT_READY: &str = "not_ready";
    /// The server is temporarily unable to serve the request.
    pub const SERVICE_UNAVAILABLE: &str = "service_unavailable";
    /// Something failed inside the server; the body says no more.
    pub const INTERNAL_ERROR: &str = "internal_error";
    /// Any other 4xx status produced below the application.
    pub const BAD_REQUEST: &str = "bad_request";
    /// Missing, malformed or unverifiable access token (sign in again).
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// A genuine access token past its expiry (refresh it).
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// `X-Device-Id` does not match the token's device.
    pub const DEVICE_MISMATCH: &str = "device_mismatch";
    /// The device's sessions were revoked.
    pub const DEVICE_REVOKED: &str = "device_revoked";
    /// The device is locked or quarantined.
    pub const DEVICE_LOCKED: &str = "device_locked";
    /// An unlock that would leave holds it does not cover: nothing changed.
    pub const DEVICE_HELD: &str = "device_held";
    /// The user has as many active devices as allowed.
    pub const TOO_MANY_DEVICES: &str = "too_many_devices";
    /// Wrong email or password (the same answer for both).
    pub const INVALID_CREDENTIALS: &str = "invalid_credentials";
    /// The email is already registered.
    pub const EMAIL_TAKEN: &str = "email_taken";
    /// The account is blocked.
    pub const ACCOUNT_BLOCKED: &str = "account_blocked";
    /// Unknown, expired or revoked refresh token.
    pub const INVALID_REFRESH_TOKEN: &str = "invalid_refresh_token";
    /// An already-used refresh token (or one presented from another device): the session family was revoked.
    pub const REFRESH_TOKEN_REUSED: &str = "refresh_token_reused";
    /// Missing or unknown admin API key.
    pub const INVALID_ADMIN_KEY: &str = "invalid_admin_key";
    /// No such user.
    pub const USER_NOT_FOUND: &str = "user_not_found";
    /// `POST /v1/admin/users` for an existing external id with another email.
    pub const EXTERNAL_ID_CONFLICT: &str = "external_id_conflict";
    /// A used, foreign or expired attestation nonce.
    pub const NONCE_REPLAY: &str = "nonce_replay";
    /// The attestation provider is not configured on this server.
    pub const PROVIDER_NOT_CONFIGURED: &str = "provider_not_configured";
    /// A malformed attestation artefact (JWE, JWS, CBOR, certificate, base64).
    pub const ATTESTATION_INVALID: &str = "attestation_invalid";
    /// A credential was put in the URL of the kill-switch handshake.
    pub const TOKEN_IN_QUERY: &str = "token_in_query";
    /// The `Origin` of a kill-switch handshake is not on the allow-list.
    pub const ORIGIN_NOT_ALLOWED: &str = "origin_not_allowed";
    /// The server holds as many kill-switch sockets as it allows.
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    /// No such device.
    pub const DEVICE_NOT_FOUND: &str = "device_not_found";
    /// The device id is bound to another account and the fingerprint differs.
    pub const DEVICE_IN_USE: &str = "device_in_use";
    /// A billing webhook whose signature matches no configured secret.
    pub const INVALID_SIGNATURE: &str = "invalid_signature";
    /// A correctly signed billing webhook more than 300 s from now.
    pub const TIMESTAMP_OUT_OF_TOLERANCE: &str = "timestamp_out_of_tolerance";
    /// A billing event id already processed with a different payload.
    pub const EVENT_CONFLICT: &str = "event_conflict";
    /// The billing webhook is closed: no secret is configured.
    pub const WEBHOOK_NOT_CONFIGURED: &str = "webhook_not_configured";
    /// The caller's address is not on the billing webhook's allow-list.
    pub const IP_NOT_ALLOWED: &str = "ip_not_allowed";
    /// A heartbeat whose `seq` is not above the last one accepted.
    pub const REPLAY: &str = "replay";
    /// The work queue is full and inline scoring failed too.
    pub const QUEUE_FULL: &str = "queue_full";
    /// No firewall rule has this name.
    pub const RULE_NOT_FOUND: &str = "rule_not_found";
    /// No firewall decision has this id.
    pub const DECISION_NOT_FOUND: &str = "decision_not_found";
    /// The firewall decision was already undone.
    pub const ALREADY_UNDONE: &str = "already_undone";

    /// Every code above, for documentation checks.
    pub const ALL: &[&str] = &[
        INVALID_BODY,
        VALIDATION_FAILED,
        PAYLOAD_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        RATE_LIMITED,
        REQUEST_TIMEOUT,
        NOT_READY,
        SERVICE_UNAVAILABLE,
        INTERNAL_ERROR,
        BAD_REQUEST,
        INVALID_TOKEN,
        TOKEN_EXPIRED,
        DEVICE_HELD,
        TOO_MANY_DEVICES,
        DEVICE_MISMATCH,
        DEVICE_REVOKED,
        DEVICE_LOCKED,
        INVALID_CREDENTIALS,
        EMAIL_TAKEN,
        ACCOUNT_BLOCKED,
        INVALID_REFRESH_TOKEN,
        REFRESH_TOKEN_REUSED,
        INVALID_ADMIN_KEY,
        USER_NOT_FOUND,
        EXTERNAL_ID_CONFLICT,
        NONCE_REPLAY,
        PROVIDER_NOT_CONFIGURED,
        ATTESTATION_INVALID,
        TOKEN_IN_QUERY,
        ORIGIN_NOT_ALLOWED,
        TOO_MANY_CONNECTIONS,
        DEVICE_NOT_FOUND,
        DEVICE_IN_USE,
        INVALID_SIGNATURE,
        TIMESTAMP_OUT_OF_TOLERANCE,
        EVENT_CONFLICT,
        WEBHOOK_NOT_CONFIGURED,
        IP_NOT_ALLOWED,
        REPLAY,
        QUEUE_FULL,
        RULE_NOT_FOUND,
        DECISION_NOT_FOUND,
        ALREADY_UNDONE,
    ];
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; it resolves to the code's documentation.
    #[serde(rename = "type")]
    #[schema(example = "https://blockremote.dev/problems/invalid_body")]
    pub type_uri: String,
    /// A short, human-readable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// A human-readable explanation of this occurrence.
    pub detail: String,
    /// The stable machine-readable code.
    #[schema(example = "invalid_body")]
    pub code: String,
    /// The request id (also in the `X-Request-Id` header), for support.
    pub request_id: String,
    /// For `validation_failed`: the offending field, as a JSON path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For `not_ready`: the state of each dependency (`ok` / `unavailable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checks: Option<serde_json::Value>,
    /// For `replay`: the highest `seq` accepted from this device so far;
    /// the client continues above it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub last_seq: Option<u64>,
}

impl Problem {
    /// A problem with the given status, code and detail.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("https://blockremote.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
            request_id: String::new(),
            field: None,
            checks: None,
            last_seq: None,
        }
    }

    /// The generic problem for a bare status produced below the application
    /// (a tower layer, a panic, an unmatched method).
    pub fn for_status(status: StatusCode) -> Self {
        let (code, detail) = match status {
            StatusCode::NOT_FOUND => (codes::NOT_FOUND, "No such resource."),
            StatusCode::METHOD_NOT_ALLOWED => (
                codes::METHOD_NOT_ALLOWED,
                "This method is not allowed on this resource.",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                codes::PAYLOAD_TOO_LARGE,
                "The request body is larger than 64 KiB.",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                codes::UNSUPPORTED_MEDIA_TYPE,
                "The request body must be application/json.",
            ),
            StatusCode::REQUEST_TIMEOUT => (
                codes::REQUEST_TIMEOUT,
                "The request took too long to complete.",
            ),
            StatusCode::TOO_MANY_REQUESTS => (codes::RATE_LIMITED, "Too many requests."),
            StatusCode::SERVICE_UNAVAILABLE => (
                codes::SERVICE_UNAVAILABLE,
                "The service is temporarily unavailable.",
            ),
            s if s.is_server_error() => (codes::INTERNAL_ERROR, "An internal error occurred."),
            _ => (codes::BAD_REQUEST, "The request could not be processed."),
        };
        Self::new(status, code, detail)
    }

    /// Renders the problem with its request id filled in.
    pub fn into_response_with_id(mut self, request_id: &str) -> Response {
        self.request_id = request_id.to_owned();
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON: 400 `invalid_body`.
    #[error("invalid body: {0}")]
    InvalidBody(String),
    /// A bad field: 422 `validation_failed`.
    #[error("validation failed on {field}: {message}")]
    Validation {
        /// JSON path of the field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Body over the limit: 413.
    #[error("payload too large")]
    PayloadTooLarge,
    /// Not JSON: 415.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 404.
    #[error("not found")]
    NotFound,
    /// 429 with `Retry-After`.
    #[error("rate limited")]
    RateLimited {
        /// When the client may try again.
        retry_after: Duration,
    },
    /// Saturated (e.g. every password-hashing permit taken): 503
    /// `service_unavailable` with `Retry-After`.
    #[error("busy")]
    Busy {
        /// When the client may try again.
        retry_after: Duration,
    },
    /// `/health/ready` when a dependency is down: 503 `not_ready`.
    #[error("not ready")]
    NotReady {
        /// Dependency name → `ok` | `unavailable`.
        checks: serde_json::Value,
    },
    /// A heartbeat whose `seq` is not above the last accepted: 409 `replay`
    /// carrying that last `seq`.
    #[error("replay")]
    Replay {
        /// The highest `seq` accepted from the device.
        last_seq: u64,
    },
    /// A client error with its own stable code (401, 403, 404, 409, 422).
    #[error("{code}")]
    Client {
        /// HTTP status.
        status: StatusCode,
        /// Stable code from [`codes`].
        code: &'static str,
        /// Human-readable detail (never internals).
        detail: &'static str,
    },
    /// An unexpected failure: 500, logged with its cause chain, opaque body.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for ApiError {
    /// A shared-state or database error that travelled as an `anyhow`
    /// error is still a 503 when the backend cannot be reached (never a
    /// 500 for an outage); anything else is a 500.
    fn from(err: anyhow::Error) -> Self {
        let err = match err.downcast::<crate::state::StateError>() {
            Ok(state) => return state.into(),
            Err(err) => err,
        };
        match err.downcast::<crate::store::StoreError>() {
            Ok(store) => store.into(),
            Err(err) => Self::Internal(err),
        }
    }
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidBody(_) => StatusCode::BAD_REQUEST,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady { .. } | Self::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Client { status, .. } => *status,
            Self::Replay { .. } => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document for this error (request id filled in later).
    pub fn to_problem(&self) -> Problem {
        let status = self.status_code();
        match self {
            Self::InvalidBody(detail) => Problem::new(status, codes::INVALID_BODY, detail.clone()),
            Self::Validation { field, message } => {
                let mut p = Problem::new(status, codes::VALIDATION_FAILED, message.clone());
                p.field = Some(field.clone());
                p
            }
            Self::NotReady { checks } => {
                let mut p = Problem::new(
                    status,
                    codes::NOT_READY,
                    "A dependency of the service is unavailable.",
                );
                p.checks = Some(checks.clone());
                p
            }
            Self::Client { code, detail, .. } => Problem::new(status, code, *detail),
            Self::Replay { last_seq } => {
                let mut p = Problem::new(
                    status,
                    codes::REPLAY,
                    "This heartbeat's seq is not above the last one accepted (last_seq); \
                     send the next heartbeat above it.",
                );
                p.last_seq = Some(*last_seq);
                p
            }
            Self::Busy { .. } => Problem::new(
                status,
                codes::SERVICE_UNAVAILABLE,
                "The service cannot take this request now; retry shortly.",
            ),
            _ => Problem::for_status(status),
        }
    }

    /// 401 with `code`.
    pub fn unauthorized(code: &'static str, detail: &'static str) -> Self {
        Self::Client {
            status: StatusCode::UNAUTHORIZED,
            code,
            detail,
        }
    }

    /// 403 with `code`.
    pub fn forbidden(code: &'static str, detail: &'static str) -> Self {
        Self::Client {
            status: StatusCode::FORBIDDEN,
            code,
            detail,
        }
    }

    /// 409 with `code`.
    pub fn conflict(code: &'static str, detail: &'static str) -> Self {
        Self::Client {
            status: StatusCode::CONFLICT,
            code,
            detail,
        }
    }

    /// 422 `validation_failed` naming `field`.
    pub fn invalid_field(field: &str, message: &str) -> Self {
        Self::Validation {
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    /// A database that cannot be reached (refused, pool timed out, I/O) is a
    /// 503 with `Retry-After`, like shared state: the client retries later,
    /// and `/health/ready` already says why. Anything else is a 500.
    fn from(err: crate::store::StoreError) -> Self {
        match err {
            crate::store::StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                Self::Busy {
                    retry_after: Duration::from_secs(1),
                }
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<crate::state::StateError> for ApiError {
    /// Shared state that cannot be reached (Redis down, its circuit breaker
    /// open) is a 503 with `Retry-After`, never a 500: the client retries and
    /// nothing was half done. A corrupt value is a bug: 500.
    fn from(err: crate::state::StateError) -> Self {
        match err {
            crate::state::StateError::Unavailable(reason) => {
                tracing::warn!(reason, "shared state unavailable");
                Self::Busy {
                    retry_after: Duration::from_secs(1),
                }
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let problem = self.to_problem();
        let mut response = self.status_code().into_response();
        if let Self::Client {
            status: StatusCode::UNAUTHORIZED,
            code,
            ..
        } = &self
        {
            // RFC 6750 §3.1: an expired token is an `invalid_token` too.
            let challenge = if *code == codes::INVALID_TOKEN {
                "Bearer error=\"invalid_token\""
            } else if *code == codes::TOKEN_EXPIRED {
                "Bearer error=\"invalid_token\", error_description=\"The access token expired\""
            } else {
                "Bearer"
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Self::RateLimited { retry_after } | Self::Busy { retry_after } = &self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response.extensions_mut().insert(problem);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_reveal_nothing() {
        let err = ApiError::Internal(anyhow::anyhow!(
            "relation \"users\" does not exist at SELECT * FROM users"
        ));
        let problem = err.to_problem();
        assert_eq!(problem.status, 500);
        assert_eq!(problem.code, codes::INTERNAL_ERROR);
        let json = serde_json::to_string(&problem).expect("serialize");
        assert!(!json.contains("users"), "{json}");
        assert!(!json.contains("SELECT"), "{json}");
    }

    #[test]
    fn an_outage_carried_as_anyhow_is_503_not_500() {
        let redis: ApiError = anyhow::Error::from(crate::state::StateError::Unavailable(
            "connection refused".into(),
        ))
        .into();
        assert_eq!(redis.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        let corrupt: ApiError =
            anyhow::Error::from(crate::state::StateError::Corrupt("bad".into())).into();
        assert_eq!(corrupt.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        let other: ApiError = anyhow::anyhow!("a bug").into();
        assert_eq!(other.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn validation_names_the_field() {
        let p = ApiError::Validation {
            field: "device_id".into(),
            message: "too short".into(),
        }
        .to_problem();
        assert_eq!(p.status, 422);
        assert_eq!(p.field.as_deref(), Some("device_id"));
        assert_eq!(
            p.type_uri,
            "https://blockremote.dev/problems/validation_failed"
        );
    }

    #[test]
    fn rate_limited_carries_retry_after_rounded_up() {
        let response = ApiError::RateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../../../docs/ERRORS.md");
        for code in codes::ALL {
            assert!(
                doc.contains(&format!("`{code}`")),
                "{code} missing from docs/ERRORS.md"
            );
        }
    }
}
