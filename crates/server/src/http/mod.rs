//! The HTTP surface: one router per resource, assembled with the layers every
//! request goes through.
//!
//! Layer order, outermost first:
//! 1. request context — request id, trace context, problem rendering, metrics, access log;
//! 2. security headers (nosniff, frame DENY, no-referrer, optional HSTS);
//! 3. CORS (only when origins are configured);
//! 4. panic catcher — a panic becomes an opaque 500, never a dropped connection;
//! 5. request timeout (503);
//! 6. body limit, 64 KiB (413).

pub mod docs;
pub mod health;
pub mod json;
pub mod metrics;
pub mod middleware;

use std::time::Duration;

use axum::{
    extract::DefaultBodyLimit, http::StatusCode, response::IntoResponse, Extension, Router,
};
use http::{header, HeaderName, HeaderValue, Method};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    limit::RequestBodyLimitLayer,
    set_header::SetResponseHeaderLayer,
    timeout::TimeoutLayer,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    app::AppState,
    config::Config,
    error::{ApiError, Problem},
};

/// The OpenAPI document's fixed parts; paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "BlockRemote",
        version = "1.0.0",
        description = "Zero-trust backend for mobile fraud defense: device-bound sessions, \
            sensor heartbeats scored for remote control, a real-time kill-switch, billing-driven \
            rate limits, an abuse firewall and an append-only audit trail.\n\n\
            Errors are RFC 9457 `application/problem+json` with a stable `code`; \
            every response carries `X-Request-Id`.",
        license(name = "Apache-2.0")
    ),
    components(schemas(Problem)),
    tags((name = "operations", description = "Health, metrics and this document"))
)]
pub struct ApiDoc;

/// Every router and the generated OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(metrics::router())
        .merge(docs::router())
        .split_for_parts()
}

/// The OpenAPI document alone (for `blockremote openapi` and tests).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The complete application: routes, fallbacks and layers, bound to `state`.
pub fn app(state: AppState) -> Router {
    let (router, doc) = routes();
    let config = state.config.clone();
    // `Router::layer` wraps what is already there, so the layers are added
    // innermost first; each converts its response with `IntoResponse`.
    let mut router = router
        .fallback(not_found)
        .layer(Extension(docs::RenderedDocs::new(&doc)))
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .layer(RequestBodyLimitLayer::new(json::BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            // The panic message stays out of the response; the request-context
            // layer renders the opaque 500.
            tracing::error!("handler panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }));
    if let Some(cors) = cors(&config) {
        router = router.layer(cors);
    }
    if let Some(hsts) = hsts(&config) {
        router = router.layer(hsts);
    }
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

fn hsts(config: &Config) -> Option<SetResponseHeaderLayer<HeaderValue>> {
    let max_age = config.hsts_max_age?;
    let value =
        HeaderValue::from_str(&format!("max-age={}; includeSubDomains", max_age.as_secs())).ok()?;
    Some(SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        value,
    ))
}

fn cors(config: &Config) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origin = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-device-id"),
                HeaderName::from_static(middleware::REQUEST_ID),
                HeaderName::from_static("traceparent"),
            ])
            .expose_headers([
                HeaderName::from_static(middleware::REQUEST_ID),
                HeaderName::from_static("ratelimit-limit"),
                HeaderName::from_static("ratelimit-remaining"),
                HeaderName::from_static("ratelimit-reset"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}
