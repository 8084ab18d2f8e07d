//! The attacker's view (issue 19): each story is an attack that worked
//! against an earlier build, run on both backends, and the proof it no
//! longer does.
//!
//! Stories are grouped by the part of the product they attack: sign-in and
//! the firewall here, the others in the submodules below.

mod accounts;
mod keys_at_rest;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    client,
    helpers::{spawn_app_with, Backend, TestApp},
};

mod restarts;
mod transport;

crate::on_both_backends!(
    registrations_naming_victims_devices_lock_nobody,
    a_throttled_address_is_refused_even_with_the_right_password,
    guessing_one_account_from_many_addresses_backs_off,
    threat_intel_refuses_ranges_that_blacklist_the_internet,
);

pub(crate) const ATTACKER: &str = "198.51.100.66";
pub(crate) const VICTIM: &str = "203.0.113.9";
pub(crate) const ELSEWHERE: &str = "192.0.2.44";

pub(crate) async fn app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.admin_token = Some("adversarial-admin-key-0123456789abcdef0".to_owned().into());
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await
}

/// Registers `email` on `device_victim_01` from the victim's address.
pub(crate) async fn register_victim(app: &TestApp, email: &str) -> client::Session {
    let r = app
        .post_json_from(
            VICTIM,
            "/v1/auth/register",
            &client::credentials(email, "device_victim_01"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    client::Session::from_response(r, "device_victim_01").await
}

/// Changes firewall rule `name`; asserts 200.
pub(crate) async fn set_rule(app: &TestApp, name: &str, body: Value) {
    let r = app
        .admin(
            Method::PUT,
            &format!("/v1/admin/firewall/rules/{name}"),
            Some(&body),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

pub(crate) async fn login_from(app: &TestApp, ip: &str, email: &str, password: &str) -> StatusCode {
    let mut body = client::credentials(email, "device_victim_01");
    body["password"] = json!(password);
    app.post_json_from(ip, "/v1/auth/login", &body)
        .await
        .status()
}

/// Anonymous registrations carrying a victim's device id used to leave an
/// account and a `create:user` event naming the victim's device behind each
/// 409; the burst then tripped `create_user_per_ip`, whose side effect
/// quarantined every device those events named and pushed `CRITICAL_LOCK`.
async fn registrations_naming_victims_devices_lock_nobody(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    set_rule(&app, "create_user_per_ip", json!({"threshold": 3})).await;
    let victim = register_victim(&app, "victim@example.com").await;

    // The attacker knows the device id (it travels in every request header)
    // but not the hardware's fingerprint.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let mut body = client::credentials(&format!("attacker{i}@example.com"), "device_victim_01");
        body["device_fingerprint"] = json!(format!("forged-{i}"));
        let r = app
            .post_json_from(ATTACKER, "/v1/auth/register", &body)
            .await;
        statuses.push(r.status());
        if r.status() == StatusCode::CONFLICT {
            let problem: Value = r.json().await.expect("problem");
            assert_eq!(problem["code"], "device_in_use");
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "refused for the device, then throttled by the firewall"
    );

    // The victim's device is untouched and its session still works.
    let device = app.admin_device("device_victim_01").await;
    assert_eq!(device["status"], "active", "{device}");
    let report = app.trust_score_json(&victim).await;
    assert_eq!(report["device_id"], "device_victim_01", "{report}");

    // A refused registration left no account and no event behind.
    for i in 0..3 {
        let r = app
            .post_json_from(
                ELSEWHERE,
                "/v1/auth/login",
                &client::credentials(
                    &format!("attacker{i}@example.com"),
                    &format!("device_attacker_{i}"),
                ),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "no account attacker{i}"
        );
    }
    let events = app.admin_json("/v1/admin/events?type=create:user").await;
    let named: Vec<&Value> = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| &e["device_id"])
        .collect();
    assert_eq!(
        named,
        [&json!("device_victim_01")],
        "only the victim's own registration"
    );
    let decisions = app.admin_json("/v1/admin/firewall/decisions").await;
    for decision in decisions["items"].as_array().expect("items") {
        assert_eq!(decision["affected_devices"], json!([]), "{decision}");
        assert_eq!(decision["affected_users"], json!([]), "{decision}");
    }
}

/// Past `login_failed_per_ip` a wrong password got 429 but the right one
/// still got 200, so the throttle did not stop a guesser who kept going.
async fn a_throttled_address_is_refused_even_with_the_right_password(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    set_rule(&app, "login_failed_per_ip", json!({"threshold": 2})).await;
    let email = "guessed@example.com";
    register_victim(&app, email).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(login_from(&app, ATTACKER, email, "wrong password, again").await);
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
        login_from(&app, ATTACKER, email, client::PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "a throttled address gets the generic 429 for the right password too"
    );
    assert_eq!(
        login_from(&app, ELSEWHERE, email, client::PASSWORD).await,
        StatusCode::OK,
        "other addresses are not throttled"
    );
}

/// Guesses against one account spread over many addresses each stay under
/// the per-address rule; the per-account backoff slows them, without
/// touching the owner's sessions.
async fn guessing_one_account_from_many_addresses_backs_off(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let email = "target@example.com";
    let owner = register_victim(&app, email).await;
    for i in 0..5 {
        let ip = format!("198.51.100.{}", 10 + i);
        assert_eq!(
            login_from(&app, &ip, email, "a wrong guess").await,
            StatusCode::UNAUTHORIZED,
            "guess {i} is only wrong"
        );
    }
    let r = {
        let mut body = client::credentials(email, "device_victim_01");
        body["password"] = json!("a sixth guess");
        app.post_json_from("198.51.100.99", "/v1/auth/login", &body)
            .await
    };
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "backing off");
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("Retry-After");
    assert!(
        (1..=2).contains(&wait),
        "the first backoff is short: {wait}"
    );
    assert_eq!(
        login_from(&app, "198.51.100.99", email, client::PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "while it runs, no password is tried at all"
    );
    let report = app.trust_score_json(&owner).await;
    assert_eq!(
        report["device_id"], "device_victim_01",
        "the owner's session works"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100 * wait)).await;
    assert_eq!(
        login_from(&app, VICTIM, email, client::PASSWORD).await,
        StatusCode::OK,
        "after the wait the owner signs in"
    );
}

/// One threat-intel entry could blacklist everyone (`0.0.0.0/0`), and every
/// heartbeat from anywhere would then count as from a listed address.
async fn threat_intel_refuses_ranges_that_blacklist_the_internet(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    for (ips, field) in [
        (json!(["203.0.113.0/24", "0.0.0.0/0"]), "add.ips[1]"),
        (json!(["10.0.0.0/7"]), "add.ips[0]"),
        (json!(["2001:db8::/31"]), "add.ips[0]"),
    ] {
        let r = app
            .admin(
                Method::POST,
                "/v1/admin/threat-intel",
                Some(&json!({"add": {"ips": ips}})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{ips}");
        let problem: Value = r.json().await.expect("problem");
        assert_eq!(problem["field"], field, "{problem}");
    }
    let r = app
        .admin(
            Method::POST,
            "/v1/admin/threat-intel",
            Some(&json!({"add": {"ips": ["10.0.0.0/8", "2001:db8::/32"]}})),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "/8 and /32 are the broadest allowed"
    );
    let r = app
        .admin(
            Method::POST,
            "/v1/admin/threat-intel",
            Some(&json!({"remove": {"ips": ["0.0.0.0/0"]}})),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a broad entry can still be removed"
    );
}
