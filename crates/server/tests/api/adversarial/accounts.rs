//! Attacks on accounts and their restrictions: undo and unlock that lifted
//! locks they did not place, blocked owners whose tokens kept working, a
//! signed-out token that stayed good, unbounded devices per account, a
//! firewall answer that told the rule's window, IPv6 addresses counted one
//! by one, and Unicode spellings of one email as separate accounts.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{app, set_rule, ATTACKER, ELSEWHERE};
use crate::{
    client,
    helpers::{spawn_app_with, Backend, TestApp},
};

crate::on_both_backends!(
    undoing_a_decision_keeps_an_operators_lock,
    an_unlock_that_would_leave_other_holds_changes_nothing,
    a_blocked_owner_is_refused_on_every_device_route,
    a_signed_out_access_token_is_refused,
    one_account_holds_a_bounded_number_of_devices,
    a_firewall_refusal_does_not_reveal_the_rule,
    an_ipv6_subscriber_counts_as_one_address,
    unicode_spellings_of_an_email_are_one_account,
    a_retried_refresh_gets_the_pair_it_missed,
    without_a_reuse_interval_any_second_use_is_reuse,
);

const MULE: &str = "device_mule_0001";

/// A mule account registered from the attacker's address, then a second
/// registration from there that trips `create_user_per_ip` (threshold 1):
/// the mule is blocked and its device held by the decision. Returns the
/// mule's session and the decision id.
async fn tripped_decision(app: &TestApp) -> (client::Session, String) {
    set_rule(app, "create_user_per_ip", json!({"threshold": 1})).await;
    let r = app
        .post_json_from(
            ATTACKER,
            "/v1/auth/register",
            &client::credentials("mule@example.com", MULE),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mule = client::Session::from_response(r, MULE).await;
    let r = app
        .post_json_from(
            ATTACKER,
            "/v1/auth/register",
            &client::credentials("mule2@example.com", "device_mule_0002"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let decisions = app.admin_json("/v1/admin/firewall/decisions").await;
    let id = decisions["items"][0]["id"]
        .as_str()
        .expect("a decision")
        .to_owned();
    (mule, id)
}

fn sources(device: &Value) -> Vec<String> {
    device["holds"]
        .as_array()
        .expect("holds")
        .iter()
        .map(|h| h["source"].as_str().expect("source").to_owned())
        .collect()
}

/// Undoing a firewall decision used to set its devices `active`, whatever
/// else had locked them — an operator's fraud lock included.
async fn undoing_a_decision_keeps_an_operators_lock(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let (_, decision) = tripped_decision(&app).await;
    app.lock(MULE, "CRITICAL_LOCK").await;
    let device = app.admin_device(MULE).await;
    assert_eq!(sources(&device), ["firewall", "admin"], "{device}");
    let admin_hold = &device["holds"][1];
    assert_eq!(admin_hold["action"], "lock");
    assert_eq!(admin_hold["reason"], "fraud_team");
    assert!(
        admin_hold["created_by"]
            .as_str()
            .is_some_and(|by| by.starts_with("admin:")),
        "{admin_hold}"
    );
    assert_eq!(device["holds"][0]["decision_id"], decision.as_str());

    let r = app
        .admin(
            Method::POST,
            &format!("/v1/admin/firewall/decisions/{decision}/undo"),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let device = app.admin_device(MULE).await;
    assert_eq!(
        device["status"], "locked",
        "the operator's lock stays: {device}"
    );
    assert_eq!(sources(&device), ["admin"]);
    assert_eq!(
        device["user_holds"],
        json!([]),
        "the decision's user hold went"
    );
    // The device was not told it is free: its last command is still the lock.
    assert_eq!(device["last_command"]["action"], "CRITICAL_LOCK");
}

/// `unlock` lifts what operators and the engine placed; a firewall hold
/// stays unless the operator asks for everything.
async fn an_unlock_that_would_leave_other_holds_changes_nothing(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    tripped_decision(&app).await;
    app.lock(MULE, "IMMEDIATE_QUARANTINE").await;
    let unlock = |body: Value| {
        let app = &app;
        async move {
            app.admin(
                Method::POST,
                &format!("/v1/admin/devices/{MULE}/unlock"),
                Some(&body),
            )
            .await
        }
    };
    let r = unlock(json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "device_held");
    let device = app.admin_device(MULE).await;
    assert_eq!(device["status"], "quarantined", "nothing changed: {device}");
    assert_eq!(sources(&device), ["firewall", "admin"]);

    let r = unlock(json!({"all": true, "reason": "reviewed"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let device = app.admin_device(MULE).await;
    assert_eq!(device["status"], "active");
    assert_eq!(device["holds"], json!([]));
    assert_eq!(device["last_command"]["action"], "UNLOCK");
}

/// A blocked account's access tokens kept working on a device that was
/// active (here: unlocked by an operator after the block).
async fn a_blocked_owner_is_refused_on_every_device_route(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let (mule, _) = tripped_decision(&app).await;
    let r = app
        .admin(
            Method::POST,
            &format!("/v1/admin/devices/{MULE}/unlock"),
            Some(&json!({"all": true})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let device = app.admin_device(MULE).await;
    assert_eq!(device["status"], "active");
    assert_eq!(device["user_holds"][0]["source"], "firewall", "{device}");

    for path in ["/v1/security/trust-score", "/v1/billing/subscription"] {
        let r = app.device_get(path, &mule).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let problem: Value = r.json().await.expect("json");
        assert_eq!(problem["code"], "account_blocked", "{path}");
    }
    let r = app
        .as_device(Method::POST, "/v1/attestation/nonce", &mule)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

/// After logout the access token in hand kept working until it expired.
async fn a_signed_out_access_token_is_refused(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let session = app.register("leaving@example.com", "device_leave_01").await;
    let r = app.device_get("/v1/security/trust-score", &session).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .as_device(Method::POST, "/v1/auth/logout", &session)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app.device_get("/v1/security/trust-score", &session).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "invalid_token");
    // Signing in again gives tokens that work.
    let r = app.login("leaving@example.com", "device_leave_01").await;
    assert_eq!(r.status(), StatusCode::OK);
    let again = client::Session::from_response(r, "device_leave_01").await;
    let r = app.device_get("/v1/security/trust-score", &again).await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// One account could bind any number of devices.
async fn one_account_holds_a_bounded_number_of_devices(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| c.max_devices_per_user = 2).await else {
        return;
    };
    let email = "many@example.com";
    app.register(email, "device_many_01").await;
    let r = app.login(email, "device_many_02").await;
    assert_eq!(r.status(), StatusCode::OK);
    let second = client::Session::from_response(r, "device_many_02").await;
    let r = app.login(email, "device_many_03").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "too_many_devices");
    // Signing in again on a device already counted is not one more.
    assert_eq!(
        app.login(email, "device_many_01").await.status(),
        StatusCode::OK
    );
    let r = app
        .as_device(Method::POST, "/v1/auth/logout", &second)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.login(email, "device_many_03").await.status(),
        StatusCode::OK,
        "a signed-out device frees its place"
    );
}

async fn failed_login(app: &TestApp, ip: &str) -> reqwest::Response {
    let mut body = client::credentials("nobody@example.com", "device_probe_01");
    body["password"] = json!("not the password");
    app.post_json_from(ip, "/v1/auth/login", &body).await
}

/// The firewall's 429 said `Retry-After: <the rule's window>`.
async fn a_firewall_refusal_does_not_reveal_the_rule(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let mut seen = Vec::new();
    for (window, ip) in [(900, ATTACKER), (3000, ELSEWHERE)] {
        set_rule(
            &app,
            "login_failed_per_ip",
            json!({"threshold": 1, "window_seconds": window}),
        )
        .await;
        assert_eq!(
            failed_login(&app, ip).await.status(),
            StatusCode::UNAUTHORIZED
        );
        let r = failed_login(&app, ip).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        seen.push(
            r.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .expect("Retry-After")
                .to_owned(),
        );
    }
    assert_eq!(seen[0], seen[1], "one answer whatever the window: {seen:?}");
    assert!(!seen.contains(&"900".to_owned()) && !seen.contains(&"3000".to_owned()));
}

/// Each address of an IPv6 /64 was its own firewall scope: one subscriber
/// could rotate through 2^64 of them.
async fn an_ipv6_subscriber_counts_as_one_address(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    set_rule(&app, "login_failed_per_ip", json!({"threshold": 2})).await;
    let mut statuses = Vec::new();
    for ip in ["2001:db8:7:1::1", "2001:db8:7:1::2", "2001:db8:7:1:abcd::3"] {
        statuses.push(failed_login(&app, ip).await.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(
        failed_login(&app, "2001:db8:7:2::1").await.status(),
        StatusCode::UNAUTHORIZED,
        "the next /64 is another subscriber"
    );
}

/// `alice@…` and its full-width spelling were two accounts.
async fn unicode_spellings_of_an_email_are_one_account(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    app.register("alice@example.com", "device_alice_01").await;
    let full_width = "\u{ff21}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}@example.com";
    let r = app
        .post_json(
            "/v1/auth/register",
            &client::credentials(full_width, "device_alice_02"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "email_taken");
    let r = app.login(full_width, "device_alice_01").await;
    assert_eq!(r.status(), StatusCode::OK, "the same account signs in");
}

async fn refresh(app: &TestApp, token: &str, device: &str) -> (StatusCode, Value) {
    let r = app.refresh(token, device, &format!("fp-{device}")).await;
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// Two refreshes of one token (a phone retrying after a lost response)
/// revoked the owner's device as if the token had been stolen.
async fn a_retried_refresh_gets_the_pair_it_missed(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let device = "device_retry_01";
    let first = app.register("retry@example.com", device).await;
    let (status, pair) = refresh(&app, &first.refresh, device).await;
    assert_eq!(status, StatusCode::OK);
    let (status, again) = refresh(&app, &first.refresh, device).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a retry within the interval: {again}"
    );
    assert_eq!(
        again["refresh_token"], pair["refresh_token"],
        "the same pair"
    );
    assert_eq!(again["access_token"], pair["access_token"]);
    let expires_in = again["expires_in"].as_u64().expect("expires_in");
    assert!((890..=900).contains(&expires_in), "{expires_in}");

    // Two at once, as a retry racing the original: both get one pair.
    let current = pair["refresh_token"].as_str().expect("token").to_owned();
    let (a, b) = tokio::join!(
        refresh(&app, &current, device),
        refresh(&app, &current, device)
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK), "{a:?} {b:?}");
    assert_eq!(a.1["refresh_token"], b.1["refresh_token"]);
    let session = client::Session {
        user_id: first.user_id.clone(),
        device_id: device.to_owned(),
        access: a.1["access_token"].as_str().expect("access").to_owned(),
        refresh: a.1["refresh_token"].as_str().expect("refresh").to_owned(),
    };
    let r = app.device_get("/v1/security/trust-score", &session).await;
    assert_eq!(r.status(), StatusCode::OK, "the pair works");

    // An older token is still reuse, and still revokes the device.
    let (status, problem) = refresh(&app, &first.refresh, device).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem["code"], "refresh_token_reused");
    let r = app.device_get("/v1/security/trust-score", &session).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let view = app.admin_device(device).await;
    assert_eq!(view["holds"][0]["source"], "refresh_reuse", "{view}");
}

/// `BLOCKREMOTE_REFRESH_REUSE_INTERVAL_SECONDS=0`: strict rotation.
async fn without_a_reuse_interval_any_second_use_is_reuse(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| {
        c.refresh_reuse_interval = std::time::Duration::ZERO;
    })
    .await
    else {
        return;
    };
    let device = "device_strict_01";
    let first = app.register("strict@example.com", device).await;
    assert_eq!(
        refresh(&app, &first.refresh, device).await.0,
        StatusCode::OK
    );
    let (status, problem) = refresh(&app, &first.refresh, device).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem["code"], "refresh_token_reused");
}
