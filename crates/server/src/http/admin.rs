//! `POST /v1/admin/sessions`: server-to-server sign-in. (Device control and
//! the global kill-switch are in `devices.rs`.)

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{json::Json, validate};
use crate::{
    app::AppState,
    auth::sessions::{DeviceBinding, Opener, Origin, SessionTokens},
    error::{codes, ApiError, Problem},
    http::extract::{AdminAuth, ClientIp},
};

/// The admin routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_session))
}

/// Mint a device session for an existing user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSessionRequest {
    /// The user (authenticated elsewhere by the calling app).
    pub user_id: Uuid,
    /// 8–64 characters of `[A-Za-z0-9_-]`.
    pub device_id: String,
    /// The app's device fingerprint.
    pub device_fingerprint: String,
    /// `android` or `ios`.
    pub platform: String,
}

/// Server-to-server sign-in: mints a device session for an existing user.
#[utoipa::path(post, path = "/v1/admin/sessions", tag = "admin", request_body = AdminSessionRequest,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "Device session opened", body = SessionTokens),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`account_blocked` or `device_locked`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`device_in_use` (operators are not held to `BLOCKREMOTE_MAX_DEVICES_PER_USER`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_session(
    State(state): State<AppState>,
    _admin: AdminAuth,
    ip: ClientIp,
    Json(body): Json<AdminSessionRequest>,
) -> Result<(StatusCode, JsonResponse<SessionTokens>), ApiError> {
    validate::device(&body.device_id, &body.device_fingerprint, &body.platform)?;
    let user = state
        .store
        .user_by_id(body.user_id)
        .await?
        .ok_or(ApiError::Client {
            status: StatusCode::NOT_FOUND,
            code: codes::USER_NOT_FOUND,
            detail: "No user has this id.",
        })?;
    let binding = DeviceBinding {
        device_id: &body.device_id,
        fingerprint: &body.device_fingerprint,
        platform: &body.platform,
    };
    let origin = Origin {
        ip: ip.0,
        user_agent: None,
    };
    let tokens = state
        .sessions
        .open(&user, binding, &origin, Opener::Operator)
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(tokens)))
}
