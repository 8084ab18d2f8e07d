//! What an operator observes: OTLP traces across the queue, the worker's
//! own health and metrics endpoints, and `blockremote healthcheck`.
//!
//! Traces are checked with a real OTLP/gRPC collector (tonic, the
//! `opentelemetry-proto` service) that the test runs in-process; the
//! servers are the real binary, configured only by the standard `OTEL_*`
//! variables.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use blockremote_client::{Client, DeviceIdentity};
use blockremote_engine::sim::{session, Class};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value,
};
use reqwest::StatusCode;

use crate::{
    helpers::{eventually, heartbeat_body, sample, Backend, Backing},
    lifecycle::{command, listening_addr, Running},
    redis_faults::PrivateRedis,
};

crate::on_both_backends!(a_heartbeat_is_one_trace_from_ingest_through_the_queue_to_the_kill_switch);

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// `blockremote.role` of the process that exported it.
    role: String,
}

/// An OTLP trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let role = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "blockremote.role")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    kept.push(Exported {
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        name: span.name,
                        role: role.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a free loopback port; the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn random_hex(bytes: usize) -> String {
    hex::encode((0..bytes).map(|_| rand::random::<u8>()).collect::<Vec<_>>())
}

async fn a_heartbeat_is_one_trace_from_ingest_through_the_queue_to_the_kill_switch(
    backend: Backend,
) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let mut env = backing.env();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    env.push(("OTEL_SERVICE_NAME", "blockremote-test".to_owned()));
    env.push(("BLOCKREMOTE_WORKER_LISTEN", "127.0.0.1:0".to_owned()));
    let (mut server, line) = Running::start(&env, &["serve"], "\"listening\"").await;
    let base = listening_addr(&line);
    // On PostgreSQL + Redis the scoring runs in another process.
    let worker = match backend {
        Backend::Embedded => None,
        Backend::Production => Some(Running::start(&env, &["worker"], "worker running").await.0),
    };

    let client = Client::new(&base).expect("client");
    let device = DeviceIdentity {
        device_id: "device_trace_01".to_owned(),
        device_fingerprint: "fp-trace-01".to_owned(),
        platform: "android".to_owned(),
    };
    let tokens = client
        .register("traced@example.com", "correct horse battery", &device)
        .await
        .expect("registered");
    let http = reqwest::Client::builder().no_proxy().build().expect("http");
    let trace_id = random_hex(16);
    let s = session(Class::RemoteControlSubtle, 3, 20);
    let mut locked = false;
    for hb in &s.heartbeats {
        let sent = http
            .post(format!("{base}/v1/signals/heartbeat"))
            .bearer_auth(&tokens.access_token)
            .header("x-device-id", &device.device_id)
            .header("traceparent", format!("00-{trace_id}-{}-01", random_hex(8)))
            .json(&heartbeat_body(hb))
            .send()
            .await
            .expect("sent");
        if sent.status() == StatusCode::FORBIDDEN {
            locked = true;
            break;
        }
        assert_eq!(sent.status(), StatusCode::ACCEPTED);
        // Our span's own context comes back, in the caller's trace.
        let answered = sent
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            answered.starts_with(&format!("00-{trace_id}-")),
            "{answered}"
        );
        // Scored before the next, as a phone's cadence would let it be.
        let seq = hb.seq;
        let scored = eventually(Duration::from_secs(10), || async {
            let r = http
                .get(format!("{base}/v1/security/trust-score"))
                .bearer_auth(&tokens.access_token)
                .header("x-device-id", &device.device_id)
                .send()
                .await
                .expect("sent");
            r.status() == StatusCode::FORBIDDEN
                || r.json::<serde_json::Value>().await.expect("json")["last_seq"].as_u64()
                    >= Some(seq)
        })
        .await;
        assert!(scored, "heartbeat {seq} scored");
    }
    assert!(locked, "the session was locked by the engine");

    // Spans are exported at least every second, by each process on its own
    // timer: wait for the three kinds and for every scoring span's parent.
    let complete = eventually(Duration::from_secs(15), || async {
        let spans = collector.of_trace(&trace_id);
        let kinds = [
            "http.request",
            "signals.score",
            "killswitch.publish",
            "killswitch.deliver",
        ]
        .iter()
        .all(|name| spans.iter().any(|s| s.name == *name));
        let parents = spans
            .iter()
            .filter(|s| s.name == "signals.score")
            .all(|score| spans.iter().any(|s| s.span_id == score.parent_span_id));
        kinds && parents
    })
    .await;
    let spans = collector.of_trace(&trace_id);
    assert!(complete, "{spans:#?}");
    let by_id: HashMap<&str, &Exported> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    // Each scoring span is a child of an ingest request's span…
    let scoring: Vec<&Exported> = spans.iter().filter(|s| s.name == "signals.score").collect();
    for score in &scoring {
        let parent = by_id
            .get(score.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("the scoring span's parent was exported: {spans:#?}"));
        assert_eq!(parent.name, "http.request");
        assert_eq!(parent.role, "serve");
        // … scored in the worker process on PostgreSQL + Redis.
        let scorer = if backend == Backend::Production {
            "worker"
        } else {
            "serve"
        };
        assert_eq!(score.role, scorer);
    }
    // … and the engine's lock was published inside a scoring span's trace.
    let publish = spans
        .iter()
        .find(|s| s.name == "killswitch.publish")
        .expect("publish");
    let mut ancestor = by_id.get(publish.parent_span_id.as_str()).copied();
    let mut under_scoring = false;
    while let Some(span) = ancestor {
        under_scoring |= span.name == "signals.score";
        ancestor = by_id.get(span.parent_span_id.as_str()).copied();
    }
    assert!(under_scoring, "{spans:#?}");
    // The instance holding the kill-switch hub delivered it in the same trace.
    let deliver = spans
        .iter()
        .find(|s| s.name == "killswitch.deliver")
        .expect("deliver");
    assert_eq!(deliver.parent_span_id, publish.span_id, "{spans:#?}");
    assert_eq!(deliver.role, "serve");

    // The spans were counted as exported (once the exporter has its answer,
    // a moment after the collector has the spans), none dropped.
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    let counted = eventually(Duration::from_secs(5), || async {
        value_of(&scrape().await, "otel_spans_exported_total").unwrap_or(0.0) > 0.0
    })
    .await;
    let metrics = scrape().await;
    assert!(counted, "{metrics}");
    assert_eq!(value_of(&metrics, "otel_spans_dropped_total"), Some(0.0));

    server.signal("TERM");
    assert!(server.wait(Duration::from_secs(15)).await.success());
    if let Some(mut worker) = worker {
        worker.signal("TERM");
        assert!(worker.wait(Duration::from_secs(15)).await.success());
    }
}

/// The value of an unlabelled sample in an exposition.
fn value_of(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_health_and_metrics_and_goes_unready_without_redis() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let redis = PrivateRedis::start();
    backing.redis = None;
    let mut env = backing.env();
    env.push(("REDIS_URL", redis.url()));
    env.push(("BLOCKREMOTE_REDIS_PREFIX", "workerhealth:".to_owned()));
    env.push(("BLOCKREMOTE_REDIS_TIMEOUT_MS", "200".to_owned()));
    env.push(("BLOCKREMOTE_WORKER_LISTEN", "127.0.0.1:0".to_owned()));
    env.push((
        "BLOCKREMOTE_METRICS_TOKEN",
        "scrape-token-0123456789".to_owned(),
    ));
    // The schema first: a worker never migrates.
    let migrated = command(&env, &["migrate"]).output().await.expect("migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let (mut worker, line) = Running::start(&env, &["worker"], "worker endpoints listening").await;
    let base = listening_addr(&line);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http");
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    assert_eq!(
        get("/health/live").await.expect("live").status(),
        StatusCode::OK
    );
    // Scraped before anything probes readiness: the worker checks it itself.
    // The scrape needs the token; with it, the worker's own families.
    let refused = get("/metrics").await.expect("metrics");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .bearer_auth("scrape-token-0123456789")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    let families = [
        "signals_heartbeats_scored_total",
        "redis_command_duration_seconds_bucket",
        "health_ready 1",
        "db_pool_connections",
        "audit_chain_broken 0",
    ];
    let all = eventually(Duration::from_secs(5), || async {
        let scraped = scrape().await;
        families.iter().all(|f| scraped.contains(f))
    })
    .await;
    assert!(all, "{families:?} in {}", scrape().await);
    let ready = get("/health/ready").await.expect("ready");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        get("/v1/anything").await.expect("404").status(),
        StatusCode::NOT_FOUND
    );
    // `blockremote healthcheck` as an image's HEALTHCHECK runs it.
    let probe = |url: String| {
        let env = env.clone();
        async move {
            command(&env, &["healthcheck", &url])
                .output()
                .await
                .expect("healthcheck")
        }
    };
    let ok = probe(format!("{base}/health/ready")).await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // Redis hangs: readiness says so, and so does the healthcheck.
    let ready_becomes = |status: StatusCode, within: u64| {
        eventually(Duration::from_secs(within), move || async move {
            get("/health/ready")
                .await
                .is_ok_and(|r| r.status() == status)
        })
    };
    redis.hang();
    let unready = ready_becomes(StatusCode::SERVICE_UNAVAILABLE, 10).await;
    assert!(unready, "readiness went 503 with Redis hung");
    assert_eq!(
        get("/health/live").await.expect("live").status(),
        StatusCode::OK
    );
    let failed = probe(format!("{base}/health/ready")).await;
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    redis.resume();
    let back = ready_becomes(StatusCode::OK, 15).await;
    assert!(back, "ready again once Redis answers");
    worker.signal("TERM");
    assert!(worker.wait(Duration::from_secs(15)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_fails_on_a_closed_port_and_refuses_what_it_cannot_probe() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    for (url, says) in [
        (
            format!("http://127.0.0.1:{port}/health/live"),
            "did not answer",
        ),
        ("https://127.0.0.1/health/live".to_owned(), "only http://"),
        ("not a url".to_owned(), "is not a URL"),
    ] {
        let out = command(&[], &["healthcheck", &url])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{url}: {stderr}");
    }
}

crate::on_both_backends!(readiness_the_pool_and_the_audit_chain_are_gauged);

async fn readiness_the_pool_and_the_audit_chain_are_gauged(backend: Backend) {
    let Some(app) = crate::helpers::spawn_app(backend).await else {
        return;
    };
    // An audited action, so the chain has a row to verify.
    let s = app.register("gauged@example.com", "device_gauge_1").await;
    let _ = app
        .refresh(&s.refresh, &s.device_id, "wrong-fingerprint")
        .await;
    assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
    // The pool is sampled and the chain verified at start, then on their timers.
    let gauged = eventually(Duration::from_secs(10), || async {
        let m = app.metrics().await;
        sample(&m, "health_ready") == Some(1.0)
            && sample(&m, "db_pool_acquire_duration_seconds_count") >= Some(1.0)
            && sample(&m, r#"db_pool_connections{state="idle"}"#).is_some()
            && sample(&m, "audit_chain_broken") == Some(0.0)
            && sample(&m, "audit_chain_verified_timestamp_seconds") > Some(0.0)
    })
    .await;
    assert!(gauged, "{}", app.metrics().await);
    // (A broken chain is gauged 0: the store conformance suite's tamper test.)
}

crate::on_both_backends!(operator_changes_are_audited_with_the_key_and_the_request);

async fn operator_changes_are_audited_with_the_key_and_the_request(backend: Backend) {
    const KEY: &str = "observability-admin-key-0123456789abcdef";
    let Some(app) = crate::helpers::spawn_app_with(backend, |c| {
        c.admin_token = Some(KEY.to_owned().into());
    })
    .await
    else {
        return;
    };
    let d = app.register("audited@example.com", "device_audit_1").await;
    let send = |method: reqwest::Method, path: &str, body: serde_json::Value, id: &str| {
        app.client
            .request(method, app.url(path))
            .bearer_auth(KEY)
            .header("x-request-id", id)
            .json(&body)
            .send()
    };
    let changes = [
        (
            reqwest::Method::PUT,
            "/v1/admin/firewall/rules/create_user_per_ip".to_owned(),
            serde_json::json!({"threshold": 7}),
            "req-rule-1",
            "firewall_rule_updated",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/threat-intel".to_owned(),
            serde_json::json!({"add": {"domains": ["evil.example"]}, "reason": "feed"}),
            "req-intel-1",
            "threat_intel_changed",
        ),
        (
            reqwest::Method::POST,
            format!("/v1/admin/devices/{}/lock", d.device_id),
            serde_json::json!({"action": "CRITICAL_LOCK", "reason": "fraud_team"}),
            "req-lock-1",
            "CRITICAL_LOCK",
        ),
    ];
    for (method, path, body, id, _) in &changes {
        let r = send(method.clone(), path, body.clone(), id)
            .await
            .expect("sent");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{path}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    let rows = app
        .state
        .store
        .audit_page(&Default::default(), 50)
        .await
        .expect("audit");
    let operator = crate::helpers::operator_of(KEY);
    for (_, path, _, id, action) in &changes {
        let row = rows
            .iter()
            .find(|r| r.action_taken == *action)
            .unwrap_or_else(|| panic!("{path} audited: {rows:#?}"));
        assert_eq!(row.actor.as_deref(), Some(operator.as_str()), "{row:?}");
        assert_eq!(row.request_id.as_deref(), Some(*id), "{row:?}");
    }
    // The sign-up's row carries its own (generated) request id, and no operator.
    let signup = rows
        .iter()
        .find(|r| r.device_id.as_deref() == Some("device_audit_1") && r.actor.is_none());
    if let Some(row) = signup {
        assert!(row.request_id.is_some(), "{row:?}");
    }
    // The chain holds with the new fields hashed in.
    assert_eq!(
        blockremote::store::verify_chain(
            app.state.store.as_ref(),
            app.state.store.chain_key().as_ref(),
            None
        )
        .await
        .expect("verify")
        .map(|r| r.rows > 0),
        Ok(true)
    );
}

/// Every metric name the shipped dashboard and alert rules use (any word
/// of ours: a known prefix and an underscore), against what a live
/// `/metrics` exposes. `promtool` checks the rules' syntax and unit tests
/// in `.ci/run`; this checks that they watch metrics that exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_dashboard_and_alerts_use_only_exported_metrics() {
    let Some(app) = crate::helpers::spawn_app(Backend::Embedded).await else {
        return;
    };
    let scrape = app.metrics().await;
    let mut exported = std::collections::BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        // The family itself, as prose names it; then its samples.
        exported.insert(name.to_owned());
        match kind {
            "counter" => {
                exported.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                exported.insert(name.to_owned());
            }
        }
    }
    assert!(exported.len() > 40, "{scrape}");
    const OURS: &[&str] = &[
        "http_",
        "killswitch_",
        "signals_",
        "redis_",
        "auth_",
        "firewall_",
        "webhook_",
        "attestation_",
        "argon2_",
        "db_",
        "health_",
        "audit_",
        "otel_",
    ];
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let dashboard_path = format!("{root}/grafana/dashboards/blockremote.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).expect("dashboard"))
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{panel}");
        for target in panel["targets"].as_array().expect("targets") {
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{target}"
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let mut used = std::collections::BTreeSet::new();
    for file in [
        dashboard_path.clone(),
        format!("{root}/prometheus/alerts.yml"),
    ] {
        let text = std::fs::read_to_string(&file).expect("file");
        for word in
            text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            if OURS.iter().any(|p| word.starts_with(p)) {
                used.insert(word.to_owned());
            }
        }
    }
    let missing: Vec<&String> = used.iter().filter(|w| !exported.contains(*w)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    for family in [
        "signals_heartbeats_accepted_total",
        "http_request_duration_seconds_bucket",
        "signals_queue_lag_seconds",
        "redis_breaker_state",
        "killswitch_delivery_latency_seconds_bucket",
        "firewall_decisions_total",
        "webhook_deliveries_total",
        "audit_chain_broken",
    ] {
        assert!(used.contains(family), "the kit watches {family}");
    }
}
