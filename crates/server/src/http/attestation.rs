//! `/v1/attestation/*`: nonces and verdicts.

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json::Json;
use crate::{
    app::AppState,
    auth::attestation::VerifyOutcome,
    error::{ApiError, Problem},
    http::extract::{ClientIp, DeviceAuth},
};

/// The attestation routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_nonce))
        .routes(routes!(post_verify))
}

/// A fresh nonce.
#[derive(Debug, Serialize, ToSchema)]
pub struct Nonce {
    /// 256-bit random value, base64url; single use, bound to the device.
    pub nonce: String,
    /// When it expires.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// A verification request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The nonce from `POST /v1/attestation/nonce`.
    pub nonce: String,
    /// `play_integrity`, `app_attest` or `test`.
    #[schema(example = "play_integrity")]
    pub provider: String,
    /// The provider's token.
    pub token: String,
}

/// Issues a single-use nonce bound to the calling device.
#[utoipa::path(post, path = "/v1/attestation/nonce", tag = "attestation",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 201, description = "Nonce issued", body = Nonce),
        (status = 401, description = "`invalid_token`, `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_nonce(
    State(state): State<AppState>,
    device: DeviceAuth,
) -> Result<(StatusCode, JsonResponse<Nonce>), ApiError> {
    let (nonce, expires_at) = state.attestation.issue_nonce(&device).await?;
    Ok((
        StatusCode::CREATED,
        JsonResponse(Nonce { nonce, expires_at }),
    ))
}

/// Verifies an attestation token against the device's nonce.
#[utoipa::path(post, path = "/v1/attestation/verify", tag = "attestation", request_body = VerifyRequest,
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 200, description = "Verdict", body = VerifyOutcome),
        (status = 409, description = "`nonce_replay`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`provider_not_configured` or `validation_failed`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_verify(
    State(state): State<AppState>,
    device: DeviceAuth,
    ip: ClientIp,
    Json(body): Json<VerifyRequest>,
) -> Result<JsonResponse<VerifyOutcome>, ApiError> {
    if body.nonce.len() > 256 {
        return Err(ApiError::invalid_field("nonce", "at most 256 characters"));
    }
    if body.token.len() > 16 * 1024 {
        return Err(ApiError::invalid_field("token", "at most 16 KiB"));
    }
    let outcome = state
        .attestation
        .verify(&device, &body.nonce, &body.provider, &body.token, ip.0)
        .await?;
    Ok(JsonResponse(outcome))
}
