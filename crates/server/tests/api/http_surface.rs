//! The operations surface and the conventions every response follows,
//! checked against a real server on each backend.

use std::time::Duration;

use reqwest::{header, StatusCode};
use serde_json::Value;

use crate::{
    helpers::{spawn_app, spawn_app_with, Backend, Backing, TestApp},
    proxy::{upstream_of, via, Proxy},
};

crate::on_both_backends!(
    health_live_and_ready,
    errors_are_problem_json_carrying_the_request_id,
    request_ids_are_echoed_when_sane_and_generated_otherwise,
    secure_headers_on_every_response,
    hsts_and_cors_follow_the_config,
    metrics_count_requests_by_route_and_status,
    openapi_describes_exactly_the_served_routes,
    bodies_over_64_kib_are_refused_with_413,
    ready_is_503_when_the_database_is_unreachable,
);

async fn problem(response: reqwest::Response) -> (StatusCode, String, Value) {
    let status = response.status();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json",
        "errors are problem+json"
    );
    let body: Value = response.json().await.expect("json body");
    (status, request_id, body)
}

async fn health_live_and_ready(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.json::<Value>().await.expect("json")["status"], "ok");

    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["cache"], "ok");
    app.stop().await.expect("clean stop");
}

async fn errors_are_problem_json_carrying_the_request_id(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let (status, request_id, body) = problem(app.get("/v1/nothing-here").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["status"], 404);
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["type"], "https://blockremote.dev/problems/not_found");
    assert_eq!(body["request_id"], request_id.as_str());
    assert!(body["title"].is_string() && body["detail"].is_string());

    let wrong_method = app
        .client
        .delete(format!("{}/health/live", app.address))
        .send()
        .await
        .expect("request");
    let (status, _, body) = problem(wrong_method).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["code"], "method_not_allowed");
}

async fn request_ids_are_echoed_when_sane_and_generated_otherwise(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let send = |id: Option<&'static str>| {
        let mut request = app.client.get(format!("{}/health/live", app.address));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };
    let echoed = send(Some("client-req_42.a:b")).await.expect("request");
    assert_eq!(echoed.headers()["x-request-id"], "client-req_42.a:b");

    let generated = send(None).await.expect("request");
    let id = generated.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "generated ids are UUIDs: {id}"
    );

    let replaced = send(Some("evil\"id with spaces")).await.expect("request");
    let id = replaced.headers()["x-request-id"].to_str().expect("ascii");
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "an unsafe id is replaced: {id}"
    );

    let first = send(None).await.expect("request").headers()["x-request-id"].clone();
    let second = send(None).await.expect("request").headers()["x-request-id"].clone();
    assert_ne!(first, second, "each request gets its own id");
}

async fn secure_headers_on_every_response(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    for path in ["/health/live", "/metrics", "/missing"] {
        let response = app.get(path).await;
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        assert!(
            headers.get("strict-transport-security").is_none(),
            "HSTS is off by default"
        );
        assert!(
            headers.get("access-control-allow-origin").is_none(),
            "no CORS by default"
        );
    }
}

async fn hsts_and_cors_follow_the_config(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| {
        c.hsts_max_age = Some(Duration::from_secs(31_536_000));
        c.cors_origins = vec!["https://console.example.com".into()];
    })
    .await
    else {
        return;
    };
    let response = app.get("/health/live").await;
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );

    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/health/live", app.address),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,x-device-id",
            )
            .send()
    };
    let allowed = preflight("https://console.example.com")
        .await
        .expect("preflight");
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );
    let allowed_headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(allowed_headers.contains("x-device-id"), "{allowed_headers}");
    let refused = preflight("https://evil.example.net")
        .await
        .expect("preflight");
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

async fn metrics_count_requests_by_route_and_status(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    for _ in 0..3 {
        assert_eq!(app.get("/health/live").await.status(), StatusCode::OK);
    }
    app.get("/no/such/route/123").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[header::CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .starts_with("application/openmetrics-text"));
    let text = response.text().await.expect("text");
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="/health/live",status="200"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        "raw paths never become labels: {text}"
    );
    assert!(!text.contains("/no/such/route"), "{text}");
    assert!(text.contains(
        r#"http_request_duration_seconds_count{method="GET",route="/health/live",status="200"} 3"#
    ));
    assert!(text.contains("http_request_duration_seconds_bucket{"));
}

async fn openapi_describes_exactly_the_served_routes(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    assert_eq!(doc["info"]["title"], "BlockRemote");
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "/.well-known/jwks.json",
            "/docs",
            "/health/live",
            "/health/ready",
            "/internal/.well-known/jwks.json",
            "/metrics",
            "/openapi.json",
            "/v1/admin/devices/{device_id}",
            "/v1/admin/devices/{device_id}/lock",
            "/v1/admin/devices/{device_id}/unlock",
            "/v1/admin/events",
            "/v1/admin/firewall/decisions",
            "/v1/admin/firewall/decisions/{id}/undo",
            "/v1/admin/firewall/rules",
            "/v1/admin/firewall/rules/{name}",
            "/v1/admin/kill-switch/global",
            "/v1/admin/sessions",
            "/v1/admin/threat-intel",
            "/v1/admin/users",
            "/v1/admin/users/{user_id}",
            "/v1/attestation/nonce",
            "/v1/attestation/verify",
            "/v1/audit/logs",
            "/v1/auth/login",
            "/v1/auth/logout",
            "/v1/auth/refresh",
            "/v1/auth/register",
            "/v1/billing/subscription",
            "/v1/billing/webhook",
            "/v1/security/kill-switch",
            "/v1/security/trust-score",
            "/v1/signals/heartbeat",
        ]
    );
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["securitySchemes"]["device_jwt"].is_object());
    assert!(doc["components"]["securitySchemes"]["admin_key"].is_object());
    // Every documented public GET path is really served (credentialed ones
    // answer 401 without credentials, which proves they are routed).
    for path in &paths {
        let get = &doc["paths"][*path]["get"];
        if !get.is_object() || path.contains('{') {
            continue;
        }
        let expected = if get["security"].is_null() {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(app.get(path).await.status(), expected, "{path}");
    }
    // The contract's methods.
    for (path, method) in [
        ("/v1/auth/register", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/refresh", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/attestation/nonce", "post"),
        ("/v1/attestation/verify", "post"),
        ("/v1/admin/sessions", "post"),
        ("/v1/admin/users", "post"),
        ("/v1/admin/users", "get"),
        ("/v1/admin/users/{user_id}", "delete"),
        ("/v1/admin/devices/{device_id}/lock", "post"),
        ("/v1/admin/devices/{device_id}/unlock", "post"),
        ("/v1/admin/devices/{device_id}", "get"),
        ("/v1/admin/kill-switch/global", "post"),
        ("/v1/security/kill-switch", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let docs = app.get("/docs").await;
    assert!(docs.headers()[header::CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .starts_with("text/html"));
    assert!(docs.text().await.expect("html").contains("BlockRemote"));
}

async fn bodies_over_64_kib_are_refused_with_413(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let big = vec![b'a'; 64 * 1024 + 1];
    let response = app
        .client
        .post(format!("{}/health/live", app.address))
        .header(header::CONTENT_TYPE, "application/json")
        .body(big)
        .send()
        .await
        .expect("request");
    let (status, _, body) = problem(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
}

async fn ready_is_503_when_the_database_is_unreachable(backend: Backend) {
    match backend {
        Backend::Embedded => {
            let Some(app) = spawn_app(backend).await else {
                return;
            };
            assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
            // The embedded database cannot be unplugged; a closed pool is the
            // same condition as seen from the ready check.
            app.state.store.close().await;
            assert_not_ready(&app, "database").await;
        }
        Backend::Production => {
            let Some(mut backing) = Backing::new(backend).await else {
                return;
            };
            let db_url = backing.database.as_ref().expect("db").url.clone();
            let proxy = Proxy::start(upstream_of(&db_url, 5432)).await;
            backing.config.database = blockremote::config::DatabaseConfig::Postgres {
                url: via(&db_url, proxy.addr).into(),
            };
            let app = crate::helpers::start(
                blockremote::app::Application::build(backing.config.clone(), true)
                    .await
                    .expect("build"),
                backing,
            );
            assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
            proxy.cut();
            assert_not_ready(&app, "database").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_when_redis_is_unreachable() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let redis_url = backing.redis.as_ref().expect("redis").url.clone();
    let proxy = Proxy::start(upstream_of(&redis_url, 6379)).await;
    backing.config.redis_url = Some(via(&redis_url, proxy.addr).into());
    let app = crate::helpers::start(
        blockremote::app::Application::build(backing.config.clone(), true)
            .await
            .expect("build"),
        backing,
    );
    assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
    proxy.cut();
    assert_not_ready(&app, "cache").await;
}

async fn assert_not_ready(app: &TestApp, which: &str) {
    let (status, _, body) = problem(app.get("/health/ready").await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "not_ready");
    assert_eq!(body["checks"][which], "unavailable", "{body}");
    let detail = body.to_string();
    assert!(
        !detail.contains("127.0.0.1") && !detail.to_lowercase().contains("connection"),
        "no internals: {detail}"
    );
    // Liveness is unaffected: the process is up.
    assert_eq!(app.get("/health/live").await.status(), StatusCode::OK);
}
