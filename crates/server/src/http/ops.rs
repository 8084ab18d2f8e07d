//! What the operations endpoints (`/health/*`, `/metrics`) need, and the
//! router a `blockremote worker` serves them with.
//!
//! An API replica and a worker process answer probes and scrapes with the
//! same handlers over the same narrow handles ([`Ops`]); the worker's
//! router has nothing else (no API, no OpenAPI document), so its listen
//! address exposes only what an orchestrator and a scraper need.

use std::sync::Arc;

use axum::{extract::FromRef, http::HeaderValue, response::Response, routing::get, Router};
use secrecy::SecretString;

use crate::{
    app::AppState,
    error::{ApiError, Problem, PROBLEM_JSON},
    state::SharedState,
    store::Store,
    telemetry::Metrics,
};

/// The handles behind the operations endpoints.
#[derive(Clone)]
pub struct Ops {
    /// Checked by readiness.
    pub store: Arc<dyn Store>,
    /// Checked by readiness; its breaker is read at scrape time.
    pub shared: Arc<dyn SharedState>,
    /// What `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// `BLOCKREMOTE_METRICS_TOKEN`.
    pub metrics_token: Option<SecretString>,
}

impl FromRef<AppState> for Ops {
    fn from_ref(state: &AppState) -> Self {
        Self {
            store: state.store.clone(),
            shared: state.shared.clone(),
            metrics: state.metrics.clone(),
            metrics_token: state.config.metrics_token.clone(),
        }
    }
}

/// The worker's router: liveness, readiness and metrics, errors as
/// problem+json.
pub fn worker_router(ops: Ops) -> Router {
    Router::new()
        .route("/health/live", get(super::health::get_live))
        .route("/health/ready", get(super::health::get_ready))
        .route("/metrics", get(super::metrics::get_metrics))
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::map_response(render_problem))
        .with_state(ops)
}

/// The worker's endpoints have no request-context layer: an error is
/// rendered here, with a fresh request id.
async fn render_problem(response: Response) -> Response {
    let Some(problem) = response.extensions().get::<Problem>().cloned() else {
        return response;
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let (mut parts, _) = response.into_parts();
    let (rendered, body) = problem.into_response_with_id(&request_id).into_parts();
    parts.status = rendered.status;
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_JSON),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        parts.headers.insert(super::middleware::REQUEST_ID, value);
    }
    Response::from_parts(parts, body)
}
