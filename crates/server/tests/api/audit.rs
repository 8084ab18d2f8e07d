//! The audit trail over HTTP: own rows for a device, everything (filtered)
//! for an operator, cursor pagination — on both backends.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{register, spawn_app_with, Backend, TestApp};

crate::on_both_backends!(
    audit_logs_are_scoped_filtered_and_paginated,
    admin_events_are_filtered_paginated_and_carry_no_address,
);

async fn admin_events_are_filtered_paginated_and_carry_no_address(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.admin_token = Some(ADMIN.to_owned().into())).await
    else {
        return;
    };
    for i in 0..3 {
        register(
            &app,
            &format!("ev{i}@example.com"),
            &format!("device_event_{i}"),
        )
        .await;
    }
    let page: Value = get_admin(&app, "/v1/admin/events?type=create:user&limit=2").await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|e| e["type"] == "create:user"));
    // The test client is 127.0.0.1: stored as a prefix and an HMAC only.
    assert_eq!(items[0]["ip_prefix"], "127.0.0.0/24");
    assert!(items[0]["ip_hmac"].as_str().expect("hmac").len() >= 32);
    assert!(!page.to_string().contains("127.0.0.1"), "{page}");
    let cursor = page["next_cursor"].as_str().expect("more");
    let rest: Value = get_admin(
        &app,
        &format!("/v1/admin/events?type=create:user&limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(rest["items"].as_array().expect("items").len(), 1);
    assert!(rest["next_cursor"].is_null());
    assert_ne!(rest["items"][0]["id"], items[0]["id"]);
    let other: Value = get_admin(&app, "/v1/admin/events?type=create:session").await;
    assert_eq!(other["items"].as_array().expect("items").len(), 3);
    let r = app
        .client
        .get(format!("{}/v1/admin/events?limit=0", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

async fn get_admin(app: &TestApp, path: &str) -> Value {
    let r = app
        .client
        .get(format!("{}{path}", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

const ADMIN: &str = "audit-admin-key-0123456789abcdef0123456789";

async fn get(app: &TestApp, query: &str, bearer: &str, device: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .get(format!("{}/v1/audit/logs{query}", app.address))
        .bearer_auth(bearer);
    if let Some(device) = device {
        request = request.header("x-device-id", device);
    }
    request.send().await.expect("request")
}

async fn lock_and_unlock(app: &TestApp, device: &str) {
    for (path, body) in [
        (
            "lock",
            json!({"action": "FORCE_OVERLAY", "reason": "fraud_team"}),
        ),
        ("unlock", json!({})),
    ] {
        let r = app
            .client
            .post(format!("{}/v1/admin/devices/{device}/{path}", app.address))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK);
    }
}

async fn audit_logs_are_scoped_filtered_and_paginated(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.admin_token = Some(ADMIN.to_owned().into())).await
    else {
        return;
    };
    let a = register(&app, "a@example.com", "device_audit_a").await;
    let b = register(&app, "b@example.com", "device_audit_b").await;
    lock_and_unlock(&app, "device_audit_a").await;
    lock_and_unlock(&app, "device_audit_a").await;
    lock_and_unlock(&app, "device_audit_b").await;
    let a_token = a["access_token"].as_str().expect("token");

    // A device sees its own user's rows only, newest first.
    let r = get(&app, "", a_token, Some("device_audit_a")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers().contains_key("ratelimit-limit"),
        "device reads are rate-limited"
    );
    let page: Value = r.json().await.expect("json");
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "{page}");
    assert!(items.iter().all(|i| i["user_id"] == a["user_id"]));
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
    let other = format!("?user_id={}", b["user_id"].as_str().expect("id"));
    let page: Value = get(&app, &other, a_token, Some("device_audit_a"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"], json!([]));

    // An operator sees everything, and filters.
    let page: Value = get(&app, "?limit=200", ADMIN, None)
        .await
        .json()
        .await
        .expect("json");
    assert!(page["items"].as_array().expect("items").len() >= 6);
    let page: Value = get(&app, "?device_id=device_audit_b", ADMIN, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().expect("items").len(), 2);
    let page: Value = get(&app, "?action=FORCE_OVERLAY", ADMIN, None)
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
        let page: Value = get(&app, &query, ADMIN, None)
            .await
            .json()
            .await
            .expect("json");
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
        let r = get(&app, query, ADMIN, None).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(r.json::<Value>().await.expect("json")["field"], field);
    }
    assert_eq!(
        get(&app, "?bogus=1", ADMIN, None).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // No credentials, or a wrong admin key.
    assert_eq!(
        get(&app, "", "not-a-key", None).await.status(),
        StatusCode::UNAUTHORIZED
    );
}
