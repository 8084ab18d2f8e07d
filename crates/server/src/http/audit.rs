//! `GET /v1/audit/logs`: the audit trail, newest first, by cursor.
//!
//! A device token sees its own user's rows (filters only narrow within
//! them); an admin key sees every row and may filter by `user_id` and
//! `device_id`. Both may filter by `action`. The cursor is opaque: the
//! position after the last row of the page.

use axum::{
    extract::{FromRequestParts, Query, State},
    http::request::Parts,
    Json as JsonResponse,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine as _};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    app::AppState,
    auth::extract::{bearer, AdminAuth, DeviceAuth},
    error::{ApiError, Problem},
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
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only rows with this `action_taken`.
    pub action: Option<String>,
    /// Only rows about this user.
    pub user_id: Option<Uuid>,
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
        // A JWT has two dots; admin keys have none.
        if bearer(parts).is_some_and(|t| t.matches('.').count() == 2) {
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

fn encode_cursor(row: &AuditEntry) -> String {
    cursor_at(row.created_at, row.id)
}

/// An opaque page cursor for the position `(at, id)`.
pub fn cursor_at(at: DateTime<Utc>, id: Uuid) -> String {
    B64.encode(format!("{}|{}", at.to_rfc3339(), id))
}

/// The position a cursor made by [`cursor_at`] names.
pub fn decode_cursor(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let text = String::from_utf8(B64.decode(raw).ok()?).ok()?;
    let (at, id) = text.split_once('|')?;
    Some((
        DateTime::parse_from_rfc3339(at).ok()?.to_utc(),
        Uuid::parse_str(id).ok()?,
    ))
}

/// Lists audit rows.
#[utoipa::path(get, path = "/v1/audit/logs", tag = "audit",
    params(AuditQuery, ("X-Device-Id" = Option<String>, Header, description = "With a device token: the device it is bound to")),
    security(("device_jwt" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "A page of rows, newest first", body = AuditPage),
        (status = 401, description = "`invalid_token`, `device_mismatch`, `device_revoked` or `invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`limit`, `cursor`, or an unknown parameter)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_audit_logs(
    State(state): State<AppState>,
    reader: Reader,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<JsonResponse<AuditPage>, ApiError> {
    let query = super::json::query(query)?;
    let limit = super::json::page_limit(query.limit)?;
    let before =
        match query.cursor.as_deref() {
            None => None,
            Some(raw) => Some(decode_cursor(raw).ok_or_else(|| {
                ApiError::invalid_field("cursor", "is not a cursor this API issued")
            })?),
        };
    let mut filter = AuditFilter {
        user_id: query.user_id,
        device_id: query.device_id,
        action: query.action,
        before,
    };
    if let Reader::Device(device) = &reader {
        // Own rows only; the caller's filters narrow within them.
        if filter.user_id.is_some_and(|u| u != device.user_id) {
            return Ok(JsonResponse(AuditPage {
                items: Vec::new(),
                next_cursor: None,
            }));
        }
        filter.user_id = Some(device.user_id);
    }
    // One row more than asked tells whether another page exists.
    let mut items = state.store.audit_page(&filter, limit + 1).await?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(encode_cursor)
    } else {
        None
    };
    Ok(JsonResponse(AuditPage { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_cursors_never_panic(raw in "\\PC{0,200}") {
            let _ = decode_cursor(&raw);
        }
    }

    #[test]
    fn cursors_round_trip() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T10:00:00.123456Z")
            .expect("time")
            .to_utc();
        let id = Uuid::now_v7();
        let raw = B64.encode(format!("{}|{}", at.to_rfc3339(), id));
        assert_eq!(decode_cursor(&raw), Some((at, id)));
        assert_eq!(decode_cursor("bm9wZQ"), None);
    }
}
