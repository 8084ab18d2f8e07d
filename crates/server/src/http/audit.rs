//! `GET /v1/audit/logs`: the audit trail, newest first, by cursor.
//!
//! A device token sees its own user's rows (filters only narrow within
//! them); an admin key sees every row and may filter by `user_id`,
//! `external_user_id` (the integrator's id) and `device_id`. Both may filter
//! by `action`. The cursor is opaque: the
//! position after the last row of the page.

use axum::{
    extract::{FromRequestParts, Query, State},
    http::request::Parts,
    Json as JsonResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::paging;
use crate::{
    app::AppState,
    error::{ApiError, Problem},
    http::extract::{bearer, AdminAuth, DeviceAuth, DEVICE_ID_HEADER},
    store::{AuditEntry, AuditFilter},
};

/// The audit route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_audit_logs))
}

/// Query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Rows per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only rows with this `action_taken`.
    pub action: Option<String>,
    /// Only rows about this user.
    pub user_id: Option<Uuid>,
    /// Only rows about the user with this external id (admin key only; an
    /// unknown one matches no row).
    pub external_user_id: Option<String>,
    /// Only rows about this device.
    pub device_id: Option<String>,
}

/// One page.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Rows, newest first.
    pub items: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Who is asking: an operator (every row) or a device (its user's rows).
pub enum Reader {
    /// Admin API key.
    Admin,
    /// Device token.
    Device(DeviceAuth),
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A JWT has two dots; admin keys have none. A request with no
        // credentials but an `X-Device-Id` is a device's that lost its token:
        // it gets the device answer (`invalid_token`: sign in), not the
        // admin one.
        let token = bearer(parts);
        let device_only = token.is_none() && parts.headers.contains_key(DEVICE_ID_HEADER);
        if device_only || token.is_some_and(|t| t.matches('.').count() == 2) {
            DeviceAuth::from_request_parts(parts, state)
                .await
                .map(Reader::Device)
        } else {
            AdminAuth::from_request_parts(parts, state)
                .await
                .map(|_| Reader::Admin)
        }
    }
}

/// Lists audit rows.
#[utoipa::path(get, path = "/v1/audit/logs", tag = "audit",
    params(AuditQuery, ("X-Device-Id" = Option<String>, Header, description = "With a device token: the device it is bound to")),
    security(("device_jwt" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "A page of rows, newest first", body = AuditPage),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch`, `device_revoked` or `invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`limit`, `cursor`, `external_user_id` — or it given with a device token — or an unknown parameter)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_audit_logs(
    State(state): State<AppState>,
    reader: Reader,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<JsonResponse<AuditPage>, ApiError> {
    let query = paging::query(query)?;
    let limit = paging::limit(query.limit)?;
    let before = paging::position(query.cursor.as_deref())?;
    let mut filter = AuditFilter {
        user_id: query.user_id,
        device_id: query.device_id,
        action: query.action,
        before,
    };
    let empty = || {
        Ok(JsonResponse(AuditPage {
            items: Vec::new(),
            next_cursor: None,
        }))
    };
    if let Some(external) = query.external_user_id.as_deref() {
        if matches!(reader, Reader::Device(_)) {
            return Err(ApiError::invalid_field(
                "external_user_id",
                "is an admin filter; a device sees its own rows",
            ));
        }
        crate::http::validate::external_id("external_user_id", external)?;
        match state.store.user_by_external_id(external).await? {
            Some(user) if filter.user_id.is_none_or(|u| u == user.id) => {
                filter.user_id = Some(user.id)
            }
            _ => return empty(),
        }
    }
    if let Reader::Device(device) = &reader {
        // Own rows only; the caller's filters narrow within them.
        if filter.user_id.is_some_and(|u| u != device.user_id) {
            return empty();
        }
        filter.user_id = Some(device.user_id);
    }
    let rows = state.store.audit_page(&filter, limit + 1).await?;
    let (items, next_cursor) = paging::page(rows, limit, |r| (r.created_at, r.id));
    Ok(JsonResponse(AuditPage { items, next_cursor }))
}
