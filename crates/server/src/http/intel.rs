//! `POST /v1/admin/threat-intel`: bulk add and remove blacklist entries.

use axum::{extract::State, Json as JsonResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json::Json;
use crate::{
    app::AppState,
    error::{ApiError, Problem},
    http::extract::{AdminAuth, ClientIp},
    intel_change::{self, IntelChange},
    store::NewAuditEntry,
};

/// The threat-intelligence route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_threat_intel))
}

/// What changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntelResult {
    /// Entries added or removed (already present / absent ones not counted).
    pub changed: u64,
}

/// Bulk add or remove app hashes, domains and addresses.
#[utoipa::path(post, path = "/v1/admin/threat-intel", tag = "admin", request_body = IntelChange,
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Applied; every instance uses it within moments", body = IntelResult),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (the bad entry named)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_threat_intel(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Json(change): Json<IntelChange>,
) -> Result<JsonResponse<IntelResult>, ApiError> {
    let changed = intel_change::apply(
        state.store.as_ref(),
        &state.intel,
        state.shared.as_ref(),
        &change,
    )
    .await?;
    state
        .store
        .append_audit(NewAuditEntry::operation(
            &admin.operator,
            "threat_intel_changed",
            format!("{changed} entries changed"),
            crate::auth::Auth::ip_prefix(ip.0),
        ))
        .await?;
    Ok(JsonResponse(IntelResult { changed }))
}
