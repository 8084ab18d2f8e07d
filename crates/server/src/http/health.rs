//! Liveness and readiness, for load balancers and orchestrators.
//!
//! `/health/live` answers as long as the process serves HTTP. `/health/ready`
//! also checks the database and shared state, each with a short timeout, and
//! answers 503 `not_ready` when either is unreachable, so a replica that lost
//! its dependencies is taken out of rotation instead of failing requests.

use std::time::Duration;

use axum::{extract::State, Json};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::ops::Ops;
use crate::{app::AppState, error::ApiError};

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The operations routes for health.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_live))
        .routes(routes!(get_ready))
}

/// Health status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Per-dependency state (readiness only): `ok` | `unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checks: Option<serde_json::Value>,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn get_live() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: None,
    })
}

/// The database and the shared state are reachable.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "A dependency is unreachable", body = crate::error::Problem,
            content_type = "application/problem+json"),
    ))]
pub async fn get_ready(State(state): State<Ops>) -> Result<Json<Health>, ApiError> {
    let (db, cache) = crate::telemetry::watch::readiness(
        state.store.as_ref(),
        state.shared.as_ref(),
        CHECK_TIMEOUT,
    )
    .await;
    let (db_ok, cache_ok) = (db.is_ok(), cache.is_ok());
    state.metrics.health_ready.set(i64::from(db_ok && cache_ok));
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let checks = serde_json::json!({ "database": word(db_ok), "cache": word(cache_ok) });
    if db_ok && cache_ok {
        Ok(Json(Health {
            status: "ready",
            checks: Some(checks),
        }))
    } else {
        if let Err(e) = &db {
            tracing::warn!(error = %e, "readiness: database check failed");
        }
        if let Err(e) = &cache {
            tracing::warn!(error = %e, "readiness: shared state check failed");
        }
        Err(ApiError::NotReady { checks })
    }
}
