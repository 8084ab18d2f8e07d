//! The audit trail over HTTP: own rows for a device, everything (filtered)
//! for an operator, cursor pagination — on both backends.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    client::Session,
    helpers::{spawn_app_with, Backend, TestApp},
};

crate::on_both_backends!(
    audit_logs_are_scoped_filtered_and_paginated,
    admin_events_are_filtered_paginated_and_carry_no_address,
    a_device_without_its_token_is_told_to_sign_in,
);

/// The audit route takes a device token or an admin key. A device call that
/// lost its token was answered `invalid_admin_key`, which tells an app
/// nothing; it is now the device answer.
async fn a_device_without_its_token_is_told_to_sign_in(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.admin_token = Some(ADMIN.to_owned().into())).await
    else {
        return;
    };
    let r = reqwest::Client::new()
        .get(app.url("/v1/audit/logs"))
        .header("x-device-id", "device_0001")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let problem: serde_json::Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "invalid_token", "{problem}");
    // Without the header, no credentials is still the admin answer.
    let r = app.get("/v1/audit/logs").await;
    let problem: serde_json::Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "invalid_admin_key", "{problem}");
}

async fn admin_events_are_filtered_paginated_and_carry_no_address(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.admin_token = Some(ADMIN.to_owned().into())).await
    else {
        return;
    };
    for i in 0..3 {
        app.register(&format!("ev{i}@example.com"), &format!("device_event_{i}"))
            .await;
    }
    let page: Value = app
        .admin_json("/v1/admin/events?type=create:user&limit=2")
        .await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|e| e["type"] == "create:user"));
    // The test client is 127.0.0.1: stored as a prefix and an HMAC only.
    assert_eq!(items[0]["ip_prefix"], "127.0.0.0/24");
    assert!(items[0]["ip_hmac"].as_str().expect("hmac").len() >= 32);
    assert!(!page.to_string().contains("127.0.0.1"), "{page}");
    let cursor = page["next_cursor"].as_str().expect("more");
    let rest: Value = app
        .admin_json(&format!(
            "/v1/admin/events?type=create:user&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest["items"].as_array().expect("items").len(), 1);
    assert!(rest["next_cursor"].is_null());
    assert_ne!(rest["items"][0]["id"], items[0]["id"]);
    let other: Value = app.admin_json("/v1/admin/events?type=create:session").await;
    assert_eq!(other["items"].as_array().expect("items").len(), 3);
    let r = app
        .admin(Method::GET, "/v1/admin/events?limit=0", None)
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

const ADMIN: &str = "audit-admin-key-0123456789abcdef0123456789";

/// `GET /v1/audit/logs<query>` as `device`.
async fn logs(app: &TestApp, query: &str, device: &Session) -> reqwest::Response {
    app.device_get(&format!("/v1/audit/logs{query}"), device)
        .await
}

/// `GET /v1/audit/logs<query>` as the operator (the admin key).
async fn admin_logs(app: &TestApp, query: &str) -> reqwest::Response {
    app.admin(Method::GET, &format!("/v1/audit/logs{query}"), None)
        .await
}

async fn lock_and_unlock(app: &TestApp, device: &str) {
    app.lock(device, "FORCE_OVERLAY").await;
    app.unlock(device).await;
}

async fn audit_logs_are_scoped_filtered_and_paginated(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.admin_token = Some(ADMIN.to_owned().into())).await
    else {
        return;
    };
    let a = app.register("a@example.com", "device_audit_a").await;
    let b = app.register("b@example.com", "device_audit_b").await;
    lock_and_unlock(&app, "device_audit_a").await;
    lock_and_unlock(&app, "device_audit_a").await;
    lock_and_unlock(&app, "device_audit_b").await;

    // A device sees its own user's rows only, newest first.
    let r = logs(&app, "", &a).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers().contains_key("ratelimit-limit"),
        "device reads are rate-limited"
    );
    let page: Value = r.json().await.expect("json");
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "{page}");
    assert!(items.iter().all(|i| i["user_id"] == a.user_id.as_str()));
    assert_eq!(items[0]["action_taken"], "UNLOCK");
    assert_eq!(items[0]["source"], "http");
    for key in [
        "id",
        "jti",
        "ip",
        "user_agent",
        "threat_score",
        "decision_reason",
        "attestation_state",
        "created_at",
    ] {
        assert!(items[0].get(key).is_some(), "{key} present");
    }
    assert!(page["next_cursor"].is_null());
    // Asking for someone else's rows gives nothing.
    let other = format!("?user_id={}", b.user_id);
    let page: Value = logs(&app, &other, &a).await.json().await.expect("json");
    assert_eq!(page["items"], json!([]));

    // An operator sees everything, and filters.
    let page: Value = admin_logs(&app, "?limit=200")
        .await
        .json()
        .await
        .expect("json");
    assert!(page["items"].as_array().expect("items").len() >= 6);
    let page: Value = admin_logs(&app, "?device_id=device_audit_b")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().expect("items").len(), 2);
    let page: Value = admin_logs(&app, "?action=FORCE_OVERLAY")
        .await
        .json()
        .await
        .expect("json");
    let locks = page["items"].as_array().expect("items");
    assert_eq!(locks.len(), 3);
    assert!(locks.iter().all(|i| i["action_taken"] == "FORCE_OVERLAY"));

    // Pages of one walk every row once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=1&device_id=device_audit_a&cursor={c}"),
            None => "?limit=1&device_id=device_audit_a".to_owned(),
        };
        let page: Value = admin_logs(&app, &query).await.json().await.expect("json");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 1);
        seen.extend(items.iter().map(|i| {
            (
                i["created_at"].as_str().expect("at").to_owned(),
                i["id"].as_str().expect("id").to_owned(),
            )
        }));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 4);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 4, "no row twice");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seen:?}"
    );

    // Bad parameters are named.
    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?cursor=bm9wZQ", "cursor"),
    ] {
        let r = admin_logs(&app, query).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(r.json::<Value>().await.expect("json")["field"], field);
    }
    assert_eq!(
        admin_logs(&app, "?bogus=1").await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // No credentials, or a wrong admin key.
    let wrong_key = app
        .client
        .get(app.url("/v1/audit/logs"))
        .bearer_auth("not-a-key")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong_key.status(), StatusCode::UNAUTHORIZED);
}
