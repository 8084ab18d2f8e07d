//! `POST /v1/admin/threat-intel`: bulk add and remove blacklist entries.

use axum::{extract::State, Json as JsonResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json::Json;
use crate::{
    app::AppState,
    error::{ApiError, Problem},
    http::extract::AdminAuth,
    signals::intel,
};

/// The threat-intelligence route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_threat_intel))
}

/// Entries by kind.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntelEntries {
    /// App package hashes (8–128 characters).
    #[serde(default)]
    pub app_hashes: Vec<String>,
    /// Domains; a listed domain also lists its subdomains.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Addresses or CIDRs.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// A bulk change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"add": {"app_hashes": ["9f2c1e0b7a6d5c4b"], "domains": ["evil.example"], "ips": ["203.0.113.0/24"]},
    "remove": {"domains": ["old.example"]}, "reason": "feed-2026-11-23"}))]
pub struct IntelChange {
    /// Entries to add.
    #[serde(default)]
    pub add: IntelEntries,
    /// Entries to remove.
    #[serde(default)]
    pub remove: IntelEntries,
    /// Why (kept with added entries).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntelResult {
    /// Entries added or removed (already present / absent ones not counted).
    pub changed: u64,
}

/// Largest number of entries in one change.
pub const MAX_ENTRIES: usize = 10_000;

/// Flattens and validates entries; the error names the first bad field.
pub fn flatten(entries: &IntelEntries, side: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for (kind, field, values) in [
        ("app_hash", "app_hashes", &entries.app_hashes),
        ("domain", "domains", &entries.domains),
        ("ip", "ips", &entries.ips),
    ] {
        for (i, value) in values.iter().enumerate() {
            let normalized = intel::normalize(kind, value).ok_or_else(|| ApiError::Validation {
                field: format!("{side}.{field}[{i}]"),
                message: "is not a valid entry".into(),
            })?;
            out.push((kind.to_owned(), normalized));
        }
    }
    Ok(out)
}

/// Applies a change and tells every instance to reload.
pub async fn apply(state: &AppState, change: &IntelChange) -> Result<u64, ApiError> {
    let add = flatten(&change.add, "add")?;
    let remove = flatten(&change.remove, "remove")?;
    if add.len() + remove.len() > MAX_ENTRIES {
        return Err(ApiError::invalid_field(
            "add",
            "at most 10000 entries per change",
        ));
    }
    let changed = state
        .store
        .update_threat_intel(&add, &remove, change.reason.as_deref())
        .await?;
    state.intel.reload(state.store.as_ref()).await?;
    if let Err(e) = state.shared.publish(intel::CHANGED_CHANNEL, b"1").await {
        tracing::warn!(error = %e, "threat-intel change not broadcast; other instances reload within 30 s");
    }
    Ok(changed)
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
    _admin: AdminAuth,
    Json(change): Json<IntelChange>,
) -> Result<JsonResponse<IntelResult>, ApiError> {
    let changed = apply(&state, &change).await?;
    Ok(JsonResponse(IntelResult { changed }))
}
