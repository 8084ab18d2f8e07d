//! `/v1/attestation/*`: nonces and verdicts.

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json::Json;
use crate::{
    app::AppState,
    auth::attestation::{Artefact, VerifyOutcome},
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
    /// The provider's artefact: the Play Integrity token, or base64 of the
    /// App Attest attestation object (first call per key) or assertion.
    pub token: String,
    /// `app_attest` only: base64 of the key identifier (SHA-256 of the key).
    #[serde(default)]
    pub key_id: Option<String>,
    /// `app_attest` assertions only: base64 of the client data the app hashed,
    /// the UTF-8 JSON `{"nonce": "<issued nonce>"}` (other fields allowed).
    #[serde(default)]
    pub client_data: Option<String>,
}

/// Issues a single-use nonce bound to the calling device.
#[utoipa::path(post, path = "/v1/attestation/nonce", tag = "attestation",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 201, description = "Nonce issued", body = Nonce),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
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
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked` (quarantined after failures), or `account_blocked`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`nonce_replay` (counted as a failure)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`attestation_invalid` (a malformed artefact, counted as a failure), `provider_not_configured` or `validation_failed`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (the firewall refused after repeated failures)", body = Problem, content_type = "application/problem+json"),
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
    // Artefacts are size-limited by their verifiers, so an oversized one is
    // `attestation_invalid` and counts as a failure (the body itself is
    // capped at 64 KiB).
    let artefact = Artefact {
        nonce: &body.nonce,
        provider: &body.provider,
        token: &body.token,
        key_id: body.key_id.as_deref(),
        client_data: body.client_data.as_deref(),
    };
    let outcome = state.attestation.verify(&device, artefact, ip.0).await?;
    Ok(JsonResponse(outcome))
}
