//! `/metrics`: the Prometheus scrape endpoint.
//!
//! Open unless `BLOCKREMOTE_METRICS_TOKEN` is set; then the scraper sends
//! `Authorization: Bearer <token>` (Prometheus `authorization` /
//! `bearer_token_file`), compared in constant time, and anything else gets
//! 401 `invalid_token`. Metrics name no user, but they do show traffic and
//! lock rates, which need not be public.

use axum::{
    extract::State,
    http::{header, HeaderMap},
    response::{IntoResponse, Response},
};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::ops::Ops;
use crate::{
    app::AppState,
    auth::sha256,
    error::{codes, ApiError, Problem},
    state::BreakerState,
};

/// The content type of the exposition (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The operations route for metrics.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_metrics))
}

/// True when the request may read the metrics.
fn allowed(state: &Ops, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.metrics_token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    // Hashing first makes the comparison independent of both lengths.
    let expected = sha256(expected.expose_secret().as_bytes());
    bool::from(sha256(presented.as_bytes()).ct_eq(&expected))
}

/// Prometheus metrics: request counts and latency histograms by route and status.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Metrics in the Prometheus/OpenMetrics text format",
            body = String, content_type = "application/openmetrics-text"),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh): `BLOCKREMOTE_METRICS_TOKEN` is set and \
            the request did not send it as `Authorization: Bearer <token>`",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_metrics(State(state): State<Ops>, headers: HeaderMap) -> Response {
    if !allowed(&state, &headers) {
        return ApiError::unauthorized(
            codes::INVALID_TOKEN,
            "This endpoint requires the metrics bearer token.",
        )
        .into_response();
    }
    // The Redis breaker and fallback, read at scrape time.
    state
        .metrics
        .redis_breaker_state
        .set(match state.shared.breaker_state() {
            None | Some(BreakerState::Closed) => 0,
            Some(BreakerState::HalfOpen) => 1,
            Some(BreakerState::Open) => 2,
        });
    let fallback = &state.metrics.redis_rate_limit_fallback;
    fallback.inc_by(state.shared.fallback_takes().saturating_sub(fallback.get()));
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        state.metrics.render(),
    )
        .into_response()
}
