//! Billing and limits, end to end on real servers: both webhook signature
//! schemes, secret rotation, the timestamp window, permanent idempotency,
//! conflicts, out-of-order events, the plans' exact bucket capacities,
//! immediate upgrades and downgrades, and buckets shared through Redis.

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::{
    client::Session,
    helpers::{sample, second_instance, spawn_app_with, Backend, TestApp},
};

crate::on_both_backends!(
    both_signature_schemes_and_rotated_secrets_are_accepted,
    forged_or_unsigned_webhooks_are_refused,
    timestamps_more_than_300_seconds_away_are_refused_both_ways,
    an_event_applies_once_forever_and_a_changed_payload_conflicts,
    older_events_never_roll_a_subscription_back,
    each_plan_bucket_holds_exactly_its_capacity,
    upgrades_and_downgrades_apply_on_the_next_request,
    a_closed_or_allow_listed_webhook_refuses_callers,
    invalid_events_name_the_field_and_apply_nothing,
    events_may_name_the_user_by_the_integrators_id,
);

const STRIPE_SECRET: &str = "sk_live_rotation_new";
const OLD_STRIPE_SECRET: &str = "sk_live_rotation_old";
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.webhook_secrets = vec![OLD_STRIPE_SECRET.into(), STRIPE_SECRET.into(), WHSEC.into()];
    })
    .await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// `X-Signature: t=…,v1=…` for `body` under `secret`, computed here.
fn stripe_signature(secret: &str, t: i64, body: &str) -> String {
    let sig = hmac(secret.as_bytes(), format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(sig))
}

async fn send_stripe(app: &TestApp, secret: &str, t: i64, body: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/billing/webhook"))
        .header("content-type", "application/json")
        .header("x-signature", stripe_signature(secret, t, body))
        .body(body.to_owned())
        .send()
        .await
        .expect("request")
}

async fn send_standard(app: &TestApp, id: &str, t: i64, body: &str) -> reqwest::Response {
    let key = BASE64
        .decode(WHSEC.trim_start_matches("whsec_"))
        .expect("key");
    let sig = BASE64.encode(hmac(&key, format!("{id}.{t}.{body}").as_bytes()));
    app.client
        .post(app.url("/v1/billing/webhook"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", t.to_string())
        .header("webhook-signature", format!("v1,{sig}"))
        .body(body.to_owned())
        .send()
        .await
        .expect("request")
}

fn event(id: &str, kind: &str, created: i64, user: &str, plan: &str) -> String {
    json!({"id": id, "type": kind, "created": created,
        "data": {"user_id": user, "plan": plan, "current_period_end": "2026-12-31T00:00:00Z"}})
    .to_string()
}

async fn subscription_json(app: &TestApp, device: &Session) -> Value {
    let response = app.subscription(device).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

async fn status_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn header_u64(response: &reqwest::Response, name: &str) -> u64 {
    response.headers()[name]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number")
}

async fn both_signature_schemes_and_rotated_secrets_are_accepted(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("pay@example.com", "device_bill_1").await;
    let before = subscription_json(&app, &d).await;
    assert_eq!(before["plan"], "trial");
    assert_eq!(before["status"], "none");
    assert_eq!(before["rate_limit_per_minute"], 120);

    // Scheme 1 under the old secret (a sender that has not rotated yet).
    let body = event(
        "evt_a1",
        "subscription.activated",
        now(),
        &d.user_id,
        "paid_basic",
    );
    let (status, reply) = status_of(send_stripe(&app, OLD_STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(
        (status, &reply),
        (StatusCode::OK, &json!({"status": "processed"}))
    );
    // The event is recorded with the SHA-256 of the exact body.
    let stored = app
        .state
        .store
        .billing_event_hash("evt_a1")
        .await
        .expect("lookup");
    assert_eq!(
        stored,
        Some(hex::encode(<Sha256 as sha2::Digest>::digest(
            body.as_bytes()
        )))
    );
    let after = subscription_json(&app, &d).await;
    assert_eq!(after["plan"], "paid_basic");
    assert_eq!(after["status"], "active");
    assert_eq!(after["rate_limit_per_minute"], 600);
    assert_eq!(after["current_period_end"], "2026-12-31T00:00:00Z");
    assert_eq!(after["user_id"], d.user_id.as_str());

    // Scheme 2 (Standard Webhooks).
    let body = event(
        "evt_a2",
        "subscription.updated",
        now() + 1,
        &d.user_id,
        "paid",
    )
    .replace(r#""plan":"paid""#, r#""plan":"paid","status":"active""#);
    let (status, reply) = status_of(send_standard(&app, "msg_1", now(), &body).await).await;
    assert_eq!(
        (status, &reply),
        (StatusCode::OK, &json!({"status": "processed"}))
    );
    assert_eq!(
        subscription_json(&app, &d).await["rate_limit_per_minute"],
        1200
    );

    // Several v1 entries (the sender signs with old and new): one match suffices.
    let body = event(
        "evt_a3",
        "subscription.updated",
        now() + 2,
        &d.user_id,
        "paid",
    )
    .replace(r#""plan":"paid""#, r#""plan":"paid","status":"active""#);
    let t = now();
    let header = format!(
        "{},{}",
        stripe_signature("unknown-secret", t, &body),
        stripe_signature(STRIPE_SECRET, t, &body)
            .split(',')
            .nth(1)
            .expect("v1")
    );
    let response = app
        .client
        .post(app.url("/v1/billing/webhook"))
        .header("x-signature", header)
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    // Each applied change: a business event and an audit row; the event
    // record holds the signature and the payload hash.
    let events = app
        .state
        .store
        .events_of_type("billing:subscription_updated", 10)
        .await
        .expect("events");
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].metadata["event_id"], "evt_a1");
    assert_eq!(events[2].metadata["plan"], "paid_basic");
    let uid = uuid::Uuid::parse_str(&d.user_id).expect("uuid");
    let audit = app
        .state
        .store
        .audit_for_user(uid, 50)
        .await
        .expect("audit");
    let billing_rows: Vec<_> = audit
        .iter()
        .filter(|r| r.action_taken.starts_with("subscription_"))
        .collect();
    assert_eq!(billing_rows.len(), 3, "{audit:?}");
    assert_eq!(
        billing_rows.last().expect("row").action_taken,
        "subscription_active:paid_basic"
    );
}

async fn forged_or_unsigned_webhooks_are_refused(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("forge@example.com", "device_bill_2").await;
    let body = event(
        "evt_f1",
        "subscription.activated",
        now(),
        &d.user_id,
        "paid",
    );
    let refused = |r: (StatusCode, Value)| {
        assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{}", r.1);
        assert_eq!(r.1["code"], "invalid_signature");
    };
    refused(status_of(send_stripe(&app, "not-a-configured-secret", now(), &body).await).await);
    // A valid signature over another body.
    let other = event(
        "evt_f1",
        "subscription.activated",
        now(),
        &d.user_id,
        "trial",
    );
    let response = app
        .client
        .post(app.url("/v1/billing/webhook"))
        .header(
            "x-signature",
            stripe_signature(STRIPE_SECRET, now(), &other),
        )
        .body(body.clone())
        .send()
        .await
        .expect("request");
    refused(status_of(response).await);
    // No signature at all, and a malformed one.
    let response = app
        .client
        .post(app.url("/v1/billing/webhook"))
        .body(body.clone())
        .send()
        .await
        .expect("request");
    refused(status_of(response).await);
    let response = app
        .client
        .post(app.url("/v1/billing/webhook"))
        .header("x-signature", "t=abc,v1=zz")
        .body(body)
        .send()
        .await
        .expect("request");
    refused(status_of(response).await);
    assert_eq!(
        subscription_json(&app, &d).await["plan"],
        "trial",
        "nothing applied"
    );
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"webhook_deliveries_total{direction="inbound",outcome="invalid_signature"}"#
        ),
        Some(4.0),
        "{metrics}"
    );
}

async fn timestamps_more_than_300_seconds_away_are_refused_both_ways(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("clock@example.com", "device_bill_3").await;
    for (i, skew) in [-400i64, 400].into_iter().enumerate() {
        let body = event(
            &format!("evt_t{i}"),
            "subscription.activated",
            now(),
            &d.user_id,
            "paid",
        );
        let (status, problem) =
            status_of(send_stripe(&app, STRIPE_SECRET, now() + skew, &body).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(problem["code"], "timestamp_out_of_tolerance");
        let (status, problem) =
            status_of(send_standard(&app, "msg_t", now() + skew, &body).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(problem["code"], "timestamp_out_of_tolerance");
    }
    // Inside the window, either way.
    let body = event(
        "evt_t_ok",
        "subscription.activated",
        now(),
        &d.user_id,
        "paid",
    );
    let response = send_stripe(&app, STRIPE_SECRET, now() - 240, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = event(
        "evt_t_ok2",
        "subscription.activated",
        now() + 1,
        &d.user_id,
        "paid",
    );
    let response = send_standard(&app, "msg_ok", now() + 240, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn an_event_applies_once_forever_and_a_changed_payload_conflicts(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("once@example.com", "device_bill_4").await;
    let created = now();
    let body = event(
        "evt_once",
        "subscription.activated",
        created,
        &d.user_id,
        "paid",
    );
    let first = status_of(send_stripe(&app, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(first, (StatusCode::OK, json!({"status": "processed"})));
    let again = status_of(send_standard(&app, "msg_again", now(), &body).await).await;
    assert_eq!(again, (StatusCode::OK, json!({"status": "duplicate"})));

    // A fresh instance (nothing in memory, as after a restart) still knows.
    let fresh = second_instance(&app).await;
    let later = status_of(send_stripe(&fresh, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(later, (StatusCode::OK, json!({"status": "duplicate"})));

    // Same id, different payload: refused, nothing applied.
    let changed = event(
        "evt_once",
        "subscription.canceled",
        created + 5,
        &d.user_id,
        "paid",
    );
    let (status, problem) =
        status_of(send_stripe(&app, STRIPE_SECRET, now(), &changed).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "event_conflict");
    let view = subscription_json(&app, &d).await;
    assert_eq!(
        (view["plan"].as_str(), view["status"].as_str()),
        (Some("paid"), Some("active"))
    );

    // Concurrent deliveries of one new event: exactly one is processed.
    let body = event(
        "evt_race",
        "subscription.updated",
        created + 10,
        &d.user_id,
        "paid_basic",
    )
    .replace(
        r#""plan":"paid_basic""#,
        r#""plan":"paid_basic","status":"active""#,
    );
    let replies =
        futures::future::join_all((0..6).map(|_| send_stripe(&app, STRIPE_SECRET, now(), &body)))
            .await;
    let mut statuses = Vec::new();
    for reply in replies {
        assert_eq!(reply.status(), StatusCode::OK);
        let body: Value = reply.json().await.expect("json");
        statuses.push(body["status"].as_str().expect("status").to_owned());
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "processed").count(),
        1,
        "{statuses:?}"
    );
    let events = app
        .state
        .store
        .events_of_type("billing:subscription_updated", 10)
        .await
        .expect("events");
    assert_eq!(events.len(), 2, "one per applied event");
    drop(fresh);
}

async fn older_events_never_roll_a_subscription_back(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("order@example.com", "device_bill_5").await;
    let t = now();
    let newer = event("evt_new", "subscription.activated", t, &d.user_id, "paid");
    assert_eq!(
        send_stripe(&app, STRIPE_SECRET, now(), &newer)
            .await
            .status(),
        StatusCode::OK
    );
    // An older cancellation arrives late: recorded, not applied.
    let older = event(
        "evt_old",
        "subscription.canceled",
        t - 60,
        &d.user_id,
        "paid",
    );
    let reply = status_of(send_stripe(&app, STRIPE_SECRET, now(), &older).await).await;
    assert_eq!(reply, (StatusCode::OK, json!({"status": "processed"})));
    let view = subscription_json(&app, &d).await;
    assert_eq!(view["status"], "active");
    assert_eq!(view["rate_limit_per_minute"], 1200);
    // Its id is consumed all the same.
    let reply = status_of(send_stripe(&app, STRIPE_SECRET, now(), &older).await).await;
    assert_eq!(reply.1, json!({"status": "duplicate"}));
    // A newer cancellation applies: trial limits.
    let cancel = event(
        "evt_cancel",
        "subscription.canceled",
        t + 60,
        &d.user_id,
        "paid",
    );
    assert_eq!(
        send_stripe(&app, STRIPE_SECRET, now(), &cancel)
            .await
            .status(),
        StatusCode::OK
    );
    let view = subscription_json(&app, &d).await;
    assert_eq!(view["status"], "canceled");
    assert_eq!(view["plan"], "trial");
    assert_eq!(view["rate_limit_per_minute"], 120);
    // past_due also falls back to trial.
    let due = event(
        "evt_due",
        "subscription.past_due",
        t + 120,
        &d.user_id,
        "paid",
    );
    assert_eq!(
        send_stripe(&app, STRIPE_SECRET, now(), &due).await.status(),
        StatusCode::OK
    );
    let view = subscription_json(&app, &d).await;
    assert_eq!(
        (
            view["status"].as_str(),
            view["rate_limit_per_minute"].as_u64()
        ),
        (Some("past_due"), Some(120))
    );
}

/// Sends requests until the first 429; returns how many were allowed and
/// how long it took. Checks the headers of every response on the way.
async fn drain(app: &TestApp, d: &Session, capacity: u64) -> (u64, Duration) {
    let started = Instant::now();
    let mut allowed = 0u64;
    loop {
        let response = app.subscription(d).await;
        assert_eq!(header_u64(&response, "ratelimit-limit"), capacity);
        let remaining = header_u64(&response, "ratelimit-remaining");
        assert!(remaining < capacity);
        assert!(header_u64(&response, "ratelimit-reset") <= 60);
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = header_u64(&response, "retry-after");
            assert!((1..=60).contains(&retry));
            let problem: Value = response.json().await.expect("json");
            assert_eq!(problem["code"], "rate_limited");
            return (allowed, started.elapsed());
        }
        assert_eq!(response.status(), StatusCode::OK);
        if allowed == 0 {
            assert_eq!(remaining, capacity - 1, "a fresh bucket is full");
        }
        allowed += 1;
        assert!(allowed <= capacity * 2, "never refused");
    }
}

fn assert_capacity(allowed: u64, elapsed: Duration, capacity: u64) {
    // Exactly the capacity, plus what refilled while the loop ran.
    let refill = (elapsed.as_secs_f64() * capacity as f64 / 60.0).ceil() as u64;
    assert!(
        (capacity..=capacity + refill).contains(&allowed),
        "allowed {allowed} for capacity {capacity} (+{refill} refilled in {elapsed:?})"
    );
}

async fn each_plan_bucket_holds_exactly_its_capacity(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    for (i, (plan, capacity)) in [("trial", 120u64), ("paid_basic", 600), ("paid", 1200)]
        .into_iter()
        .enumerate()
    {
        let d = app
            .register(&format!("cap{i}@example.com"), &format!("device_cap_{i}"))
            .await;
        if plan != "trial" {
            let body = event(
                &format!("evt_cap{i}"),
                "subscription.activated",
                now(),
                &d.user_id,
                plan,
            );
            assert_eq!(
                send_stripe(&app, STRIPE_SECRET, now(), &body)
                    .await
                    .status(),
                StatusCode::OK
            );
        }
        let (allowed, elapsed) = drain(&app, &d, capacity).await;
        assert_capacity(allowed, elapsed, capacity);
    }
}

async fn upgrades_and_downgrades_apply_on_the_next_request(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    // In production the requests go to a second replica that has the old
    // plan cached: the webhook on the first must reach it.
    let other = match backend {
        Backend::Production => Some(second_instance(&app).await),
        Backend::Embedded => None,
    };
    let api = other.as_ref().unwrap_or(&app);
    let d = app.register("upgrade@example.com", "device_up_1").await;
    let (allowed, elapsed) = drain(api, &d, 120).await;
    assert_capacity(allowed, elapsed, 120);

    let up = event(
        "evt_up",
        "subscription.activated",
        now(),
        &d.user_id,
        "paid",
    );
    assert_eq!(
        send_stripe(&app, STRIPE_SECRET, now(), &up).await.status(),
        StatusCode::OK
    );
    let response = limit_applies(api, &d, 1200, other.is_some()).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the upgrade applies at once"
    );
    assert_eq!(header_u64(&response, "ratelimit-limit"), 1200);
    assert!(header_u64(&response, "ratelimit-remaining") >= 1000);

    let down = event(
        "evt_down",
        "subscription.canceled",
        now() + 1,
        &d.user_id,
        "paid",
    );
    assert_eq!(
        send_stripe(&app, STRIPE_SECRET, now(), &down)
            .await
            .status(),
        StatusCode::OK
    );
    let response = limit_applies(api, &d, 120, other.is_some()).await;
    assert_eq!(header_u64(&response, "ratelimit-limit"), 120);
    assert!(header_u64(&response, "ratelimit-remaining") <= 119);
}

/// The first response carrying the new limit. On the instance that
/// processed the webhook that is the very next request; another replica
/// learns of the change through pub/sub, which races the test's next
/// request by a fraction of a millisecond, so it gets two seconds.
async fn limit_applies(
    api: &TestApp,
    d: &Session,
    limit: u64,
    other_instance: bool,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let response = api.subscription(d).await;
        if header_u64(&response, "ratelimit-limit") == limit {
            return response;
        }
        assert!(
            other_instance && Instant::now() < deadline,
            "limit {} instead of {limit}",
            header_u64(&response, "ratelimit-limit")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_closed_or_allow_listed_webhook_refuses_callers(backend: Backend) {
    let Some(closed) = spawn_app_with(backend, |_| {}).await else {
        return;
    };
    let body = event(
        "evt_c",
        "subscription.activated",
        now(),
        &uuid::Uuid::now_v7().to_string(),
        "paid",
    );
    let (status, problem) =
        status_of(send_stripe(&closed, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["code"], "webhook_not_configured");

    let Some(listed) = spawn_app_with(backend, |c| {
        c.webhook_secrets = vec![STRIPE_SECRET.into()];
        c.webhook_allowed_ips = vec!["10.0.0.0/8".parse().expect("cidr")];
    })
    .await
    else {
        return;
    };
    let (status, problem) =
        status_of(send_stripe(&listed, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(problem["code"], "ip_not_allowed");

    let Some(open) = spawn_app_with(backend, |c| {
        c.webhook_secrets = vec![STRIPE_SECRET.into()];
        c.webhook_allowed_ips = vec!["127.0.0.0/8".parse().expect("cidr")];
    })
    .await
    else {
        return;
    };
    // Allowed through; the unknown user is then a validation error.
    let (status, problem) = status_of(send_stripe(&open, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
}

async fn invalid_events_name_the_field_and_apply_nothing(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("invalid@example.com", "device_bill_6").await;
    let cases = [
        (
            event(
                "evt_i1",
                "subscription.activated",
                now(),
                &uuid::Uuid::now_v7().to_string(),
                "paid",
            ),
            "data.user_id",
        ),
        (
            event(
                "evt_i2",
                "subscription.activated",
                now(),
                &d.user_id,
                "platinum",
            ),
            "data.plan",
        ),
        (
            event("evt_i3", "invoice.paid", now(), &d.user_id, "paid"),
            "type",
        ),
        (
            event("evt_i4", "subscription.updated", now(), &d.user_id, "paid"),
            "data.status",
        ),
        (
            json!({"id": "evt_i5", "type": "subscription.activated", "created": now(), "extra": 1,
                "data": {"user_id": d.user_id, "plan": "paid"}})
            .to_string(),
            "extra",
        ),
        // `created` orders events: one from the future would freeze the
        // subscription until then.
        (
            event(
                "evt_i6",
                "subscription.activated",
                now() + 3600,
                &d.user_id,
                "paid",
            ),
            "created",
        ),
    ];
    for (body, field) in cases {
        let (status, problem) =
            status_of(send_stripe(&app, STRIPE_SECRET, now(), &body).await).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {problem}"
        );
        assert_eq!(problem["code"], "validation_failed");
        assert!(
            problem.to_string().contains(field),
            "{field} named in {problem}"
        );
    }
    let (status, problem) =
        status_of(send_stripe(&app, STRIPE_SECRET, now(), "{not json").await).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    assert_eq!(subscription_json(&app, &d).await["status"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_bucket_through_redis() {
    let Some(first) = app(Backend::Production).await else {
        return;
    };
    let second = second_instance(&first).await;
    let d = first
        .register("shared@example.com", "device_shared_1")
        .await;
    let mut allowed = 0;
    let started = Instant::now();
    for i in 0..130 {
        let api = if i % 2 == 0 { &first } else { &second };
        if api.subscription(&d).await.status() == StatusCode::OK {
            allowed += 1;
        }
    }
    assert_capacity(allowed, started.elapsed(), 120);
    assert_eq!(
        first.subscription(&d).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        second.subscription(&d).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

async fn events_may_name_the_user_by_the_integrators_id(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| {
        c.webhook_secrets = vec![STRIPE_SECRET.into()];
        c.admin_token = Some("billing-admin-key-0123456789abcdef0123".to_owned().into());
    })
    .await
    else {
        return;
    };
    let created = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/users",
            Some(&json!({"external_id": "cust_bill_77"})),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let user: Value = created.json().await.expect("json");
    let body = json!({"id": "evt_ext_1", "type": "subscription.activated", "created": now(),
        "data": {"external_user_id": "cust_bill_77", "plan": "paid"}})
    .to_string();
    let (status, reply) = status_of(send_stripe(&app, STRIPE_SECRET, now(), &body).await).await;
    assert_eq!(
        (status, &reply),
        (StatusCode::OK, &json!({"status": "processed"}))
    );
    // The plan is the user's: a device signed in for that external id sees it.
    let minted = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/sessions",
            Some(
                &json!({"external_user_id": "cust_bill_77", "device_id": "device_bill_ext",
                "device_fingerprint": "fp-ext", "platform": "android"}),
            ),
        )
        .await;
    assert_eq!(minted.status(), StatusCode::CREATED);
    let device = Session::from_response(minted, "device_bill_ext").await;
    assert_eq!(device.user_id, user["user_id"].as_str().expect("id"));
    let subscription = subscription_json(&app, &device).await;
    assert_eq!(
        (
            subscription["plan"].as_str(),
            subscription["rate_limit_per_minute"].as_u64()
        ),
        (Some("paid"), Some(1200))
    );

    // Billing never creates users; an event naming no user, or both, is refused.
    for (data, field) in [
        (
            json!({"external_user_id": "cust_unknown", "plan": "paid"}),
            "data.external_user_id",
        ),
        (json!({"plan": "paid"}), "data.user_id"),
        (
            json!({"user_id": user["user_id"], "external_user_id": "cust_bill_77", "plan": "paid"}),
            "data.user_id",
        ),
        (
            json!({"external_user_id": "has space", "plan": "paid"}),
            "data.external_user_id",
        ),
    ] {
        let body = json!({"id": format!("evt_bad_{field}_{}", data.to_string().len()),
            "type": "subscription.activated", "created": now(), "data": data})
        .to_string();
        let (status, problem) =
            status_of(send_stripe(&app, STRIPE_SECRET, now(), &body).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(problem["field"], field, "{body}");
    }
    assert!(app
        .state
        .store
        .user_by_external_id("cust_unknown")
        .await
        .expect("lookup")
        .is_none());
}
