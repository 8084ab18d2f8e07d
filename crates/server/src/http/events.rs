//! `GET /v1/admin/events`: business events, newest first, by cursor.
//!
//! Events carry the client's IP prefix and a keyed HMAC of its address,
//! never the address itself.

use axum::{
    extract::{Query, State},
    Json as JsonResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::paging;
use crate::{
    app::AppState,
    error::{ApiError, Problem},
    http::extract::AdminAuth,
    store::StoredEvent,
};

/// The events route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_events))
}

/// Query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events of this type (e.g. `create:user`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Events per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsPage {
    /// Events, newest first.
    pub items: Vec<StoredEvent>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Lists business events.
#[utoipa::path(get, path = "/v1/admin/events", tag = "admin",
    params(EventsQuery),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "A page of events, newest first", body = EventsPage),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`limit`, `cursor`, or an unknown parameter)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_events(
    State(state): State<AppState>,
    _admin: AdminAuth,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<JsonResponse<EventsPage>, ApiError> {
    let query = paging::query(query)?;
    let limit = paging::limit(query.limit)?;
    let before = paging::position(query.cursor.as_deref())?;
    let events = state
        .store
        .events_page(query.event_type.as_deref(), before, limit + 1)
        .await?;
    let (items, next_cursor) = paging::page(events, limit, |e| (e.created_at, e.id));
    Ok(JsonResponse(EventsPage { items, next_cursor }))
}
