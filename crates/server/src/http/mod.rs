//! The HTTP surface: one router per resource, assembled with the layers every
//! request goes through.
//!
//! Layer order, outermost first:
//! 1. request context — request id, trace context, problem rendering, metrics, access log;
//! 2. body deadline — a body slower than its timeout is answered 408 (`body_deadline`);
//! 3. security headers (nosniff, frame DENY, no-referrer, optional HSTS);
//! 4. CORS (only when origins are configured);
//! 5. panic catcher — a panic becomes an opaque 500, never a dropped connection;
//! 6. request timeout (503);
//! 7. body limit, 64 KiB (413).
//!
//! Connections are served by [`serve`] (header-read and keep-alive timers,
//! head-size bound, connection cap).

pub mod admin;
pub mod attestation;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod body_deadline;
pub mod devices;
pub mod docs;
mod errors;
pub mod events;
pub mod extract;
pub mod firewall;
pub mod health;
pub mod intel;
pub mod json;
pub mod jwks;
pub mod killswitch;
pub mod metrics;
pub mod middleware;
pub mod ops;
pub mod paging;
pub mod rate_limit;
pub mod serve;
pub mod signals;
pub mod validate;

use std::time::Duration;

use axum::{
    extract::DefaultBodyLimit, http::StatusCode, response::IntoResponse, Extension, Router,
};
use http::{header, HeaderName, HeaderValue, Method};
use tower::ServiceBuilder;
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
    error::{self, ApiError, Problem},
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
    modifiers(&SecuritySchemes),
    tags(
        (name = "auth", description = "Device-bound sessions and the JWKS"),
        (name = "attestation", description = "Single-use nonces and attestation verdicts"),
        (name = "billing", description = "Signed billing webhooks and the caller's subscription; per-plan rate limits"),
        (name = "signals", description = "Heartbeat ingestion and the device's trust report"),
        (name = "kill-switch", description = "Real-time commands to devices over a WebSocket"),
        (name = "admin", description = "Operator API (admin API key)"),
        (name = "audit", description = "The append-only audit trail"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Declares the two credentials: device JWTs and admin API keys.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "device_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "Device access token (ES256 by default); send X-Device-Id equal to its `did`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Admin API key"))
                    .build(),
            ),
        );
    }
}

/// Every router and the generated OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(jwks::router())
        .merge(attestation::router())
        .merge(billing::router())
        .merge(signals::router())
        .merge(intel::router())
        .merge(audit::router())
        .merge(events::router())
        .merge(firewall::router())
        .merge(killswitch::router())
        .merge(admin::router())
        .merge(devices::router())
        .merge(health::router())
        .merge(metrics::router())
        .merge(docs::router())
        .split_for_parts();
    document_body_deadline(&mut doc);
    (router, doc)
}

/// Every operation that takes a body may answer 408 `request_timeout`
/// (`body_deadline`); said once here rather than on each route.
fn document_body_deadline(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let response = ResponseBuilder::new()
        .description(
            "`request_timeout`: the body did not arrive within \
             `BLOCKREMOTE_BODY_READ_TIMEOUT_SECONDS` of the request head",
        )
        .content(
            error::PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            if operation.request_body.is_some() {
                operation
                    .responses
                    .responses
                    .entry("408".to_owned())
                    .or_insert_with(|| response.clone().into());
            }
        }
    }
}

/// The OpenAPI document alone (for `blockremote openapi` and tests).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The complete application: routes, fallbacks and layers, bound to `state`.
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// The application with `extra` routes behind the same layers (tests use it
/// to exercise the conventions on routes the product does not have yet).
pub fn app_with(state: AppState, extra: Router<AppState>) -> Router {
    let (router, doc) = routes();
    let router = router.merge(extra);
    let config = state.config.clone();
    // One `Router::layer` call with the whole stack, outermost first: axum
    // boxes a route once per `layer` call and clones every box on every
    // request, so a stack added layer by layer cost an allocation per layer
    // per request. Inside the stack the request body becomes axum's `Body`
    // again below the size limit, and every response is an axum `Response`.
    let layers = ServiceBuilder::new()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body_deadline::body_deadline,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .option_layer(hsts(&config))
        .option_layer(cors(&config))
        .map_response(IntoResponse::into_response)
        .layer(CatchPanicLayer::custom(|_| {
            // The panic message stays out of the response; the request-context
            // layer renders the opaque 500.
            tracing::error!("handler panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }))
        .map_response(IntoResponse::into_response)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        .map_response(IntoResponse::into_response)
        .layer(RequestBodyLimitLayer::new(json::BODY_LIMIT))
        .map_request(|req: http::Request<_>| req.map(axum::body::Body::new))
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .layer(Extension(docs::RenderedDocs::new(&doc)))
        .layer(axum::middleware::from_fn(rate_limit::headers));
    router.fallback(not_found).layer(layers).with_state(state)
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

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use axum::{body::Body, routing::post};
    use http::Request;
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Greeting {
        name: String,
        times: u8,
    }

    async fn greet(json::Json(g): json::Json<Greeting>) -> String {
        g.name.repeat(usize::from(g.times))
    }

    async fn explode() -> &'static str {
        panic!("secret internals: password=hunter2")
    }

    async fn dawdle() -> &'static str {
        tokio::time::sleep(Duration::from_secs(5)).await;
        "late"
    }

    async fn test_app(dir: &std::path::Path) -> Router {
        let mut config = Config::embedded_in(dir);
        config.request_timeout = Duration::from_millis(200);
        let state = AppState::connect(config, true).await.expect("state");
        app_with(
            state,
            Router::new()
                .route("/test/greet", post(greet))
                .route("/test/explode", post(explode))
                .route("/test/dawdle", post(dawdle)),
        )
    }

    async fn call(app: Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    fn post_json(path: &str, body: impl Into<Body>) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .expect("request")
    }

    fn problem_code(status: StatusCode, headers: &http::HeaderMap, body: &str) -> String {
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{status} {body}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("problem JSON");
        assert_eq!(json["status"], status.as_u16());
        assert_eq!(
            json["request_id"],
            headers["x-request-id"].to_str().expect("ascii")
        );
        json["code"].as_str().expect("code").to_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_body_is_a_408_logged_at_info() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::embedded_in(dir.path());
        config.body_read_timeout = Duration::from_millis(100);
        let state = AppState::connect(config, true).await.expect("state");
        let app = app_with(state, Router::new().route("/test/greet", post(greet)));
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Half a body, and the rest never comes.
        let (mut tx, rx) =
            futures::channel::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
        futures::SinkExt::send(&mut tx, Ok(bytes::Bytes::from_static(b"{\"name\":")))
            .await
            .expect("send");
        let (status, headers, body) =
            call(app, post_json("/test/greet", Body::from_stream(rx))).await;
        drop(tx);
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(problem_code(status, &headers, &body), "request_timeout");
        assert_eq!(headers[header::CONNECTION], "close");
        let logs = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        let line = logs
            .lines()
            .find(|l| l.contains("request finished") || l.contains("request failed"))
            .unwrap_or_else(|| panic!("no access log line in {logs}"));
        let json: serde_json::Value = serde_json::from_str(line).expect("JSON log");
        assert_eq!(json["level"], "INFO", "{line}");
        assert_eq!(json["status"], 408);
        assert!(!logs.contains("\"ERROR\""), "{logs}");
    }

    #[test]
    fn the_document_lists_the_hardening_answers() {
        let doc = serde_json::to_value(openapi()).expect("json");
        let responses = |path: &str, method: &str| doc["paths"][path][method]["responses"].clone();
        assert!(responses("/metrics", "get")["401"].is_object());
        assert!(responses("/v1/auth/login", "post")["408"].is_object());
        assert!(responses("/health/live", "get").get("408").is_none());
    }

    #[tokio::test]
    async fn json_bodies_are_validated_strictly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = test_app(dir.path()).await;

        let (status, _, body) = call(
            app.clone(),
            post_json("/test/greet", r#"{"name":"ab","times":2}"#),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "abab"));

        let (status, headers, body) = call(app.clone(), post_json("/test/greet", "{nope")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(problem_code(status, &headers, &body), "invalid_body");

        let (status, headers, body) = call(
            app.clone(),
            post_json("/test/greet", r#"{"name":"ab","times":300}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem_code(status, &headers, &body), "validation_failed");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["field"], "times");

        let (status, headers, body) = call(
            app.clone(),
            post_json("/test/greet", r#"{"name":"ab","times":1,"admin":true}"#),
        )
        .await;
        assert_eq!(problem_code(status, &headers, &body), "validation_failed");
        assert!(body.contains(r#""field":"admin""#), "{body}");

        let request = Request::post("/test/greet")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"name":"ab","times":1}"#))
            .expect("request");
        let (status, headers, body) = call(app.clone(), request).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            problem_code(status, &headers, &body),
            "unsupported_media_type"
        );

        // Over the limit, with and without a Content-Length the server can trust.
        let big = format!(r#"{{"name":"{}","times":1}}"#, "a".repeat(json::BODY_LIMIT));
        let (status, headers, body) =
            call(app.clone(), post_json("/test/greet", big.clone())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(problem_code(status, &headers, &body), "payload_too_large");
        let stream = futures::stream::iter(
            big.into_bytes()
                .chunks(4096)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let (status, headers, body) =
            call(app, post_json("/test/greet", Body::from_stream(stream))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(problem_code(status, &headers, &body), "payload_too_large");
    }

    #[tokio::test]
    async fn a_panic_is_an_opaque_500() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = test_app(dir.path()).await;
        let (status, headers, body) = call(app, post_json("/test/explode", "{}")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem_code(status, &headers, &body), "internal_error");
        assert!(
            !body.contains("hunter2") && !body.contains("secret"),
            "{body}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }

    #[tokio::test]
    async fn a_slow_request_times_out_with_503() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = test_app(dir.path()).await;
        let (status, headers, body) = call(app, post_json("/test/dawdle", "{}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem_code(status, &headers, &body), "service_unavailable");
    }

    /// A log sink the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn traceparent_and_request_id_reach_the_request_span() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = test_app(dir.path()).await;
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let request = Request::get("/health/live")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-request-id", "trace-test-1")
            .body(Body::empty())
            .expect("request");
        let (status, _, _) = call(app, request).await;
        assert_eq!(status, StatusCode::OK);
        let logs = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        let line = logs
            .lines()
            .find(|l| l.contains("request finished"))
            .unwrap_or_else(|| panic!("no access log line in {logs}"));
        let json: serde_json::Value = serde_json::from_str(line).expect("JSON log");
        assert_eq!(json["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(json["span"]["parent_span_id"], "00f067aa0ba902b7");
        assert_eq!(json["span"]["request_id"], "trace-test-1");
        assert_eq!(json["span"]["route"], "/health/live");
        assert_eq!(json["status"], 200);
    }
}
