//! The abuse firewall end to end, on both backends: a burst of
//! registrations from one address blocks the users it created, answers a
//! generic 429, spares other addresses, and is undone exactly; simulate mode
//! records without blocking; a rule changed on one instance is enforced by
//! another; the raw address is stored nowhere.

use std::time::Duration;

use blockremote::config::DatabaseConfig;
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use crate::{
    client::{self, Session},
    helpers::{
        assert_no_entity_labels, eventually, sample, second_instance, spawn_app_with, Backend,
        TestApp,
    },
};

crate::on_both_backends!(
    a_burst_of_registrations_blocks_its_users_and_undo_restores_them,
    simulate_mode_records_and_blocks_nothing,
    failed_logins_attestations_and_session_mints_ask_the_firewall,
);

const ADMIN: &str = "firewall-admin-key-0123456789abcdef01234";
const ATTACKER: &str = "198.51.100.77";
const OTHER: &str = "203.0.113.5";

async fn app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
        c.attestation_test_secret = Some("firewall-attestation-secret".to_owned().into());
        // The attestation module's own quarantine stays out of the way.
        c.attestation_max_failures = 100;
    })
    .await
}

/// Runs `sql` on the app's database (a rule that the API cannot create).
async fn execute(app: &TestApp, sql: &str) {
    match &app.state.config.database {
        DatabaseConfig::Sqlite { url } => {
            let pool = sqlx::SqlitePool::connect(url.expose_secret())
                .await
                .expect("connect");
            sqlx::query(sql).execute(&pool).await.expect("sql");
        }
        DatabaseConfig::Postgres { url } => {
            let pool = sqlx::PgPool::connect(url.expose_secret())
                .await
                .expect("connect");
            sqlx::query(sql).execute(&pool).await.expect("sql");
        }
    }
}

async fn set_rule(app: &TestApp, body: Value) -> Value {
    let r = app
        .admin(
            Method::PUT,
            "/v1/admin/firewall/rules/create_user_per_ip",
            Some(&body),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

/// User `i`: `user<i>@example.com` on device `device_fw_<i>`.
fn credentials(i: &str) -> Value {
    client::credentials(&format!("user{i}@example.com"), &format!("device_fw_{i}"))
}

/// Every byte the database holds, as text (files on SQLite, rows on PostgreSQL).
async fn database_text(app: &TestApp) -> String {
    match &app.state.config.database {
        DatabaseConfig::Sqlite { .. } => {
            let mut text = String::new();
            for entry in std::fs::read_dir(&app.state.config.data_dir).expect("dir") {
                let path = entry.expect("entry").path();
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("blockremote.db"))
                {
                    text.push_str(&String::from_utf8_lossy(
                        &std::fs::read(&path).expect("read"),
                    ));
                }
            }
            assert!(text.len() > 1000, "the database files were read");
            text
        }
        DatabaseConfig::Postgres { url } => {
            let pool = sqlx::PgPool::connect(url.expose_secret())
                .await
                .expect("connect");
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
            )
            .fetch_all(&pool)
            .await
            .expect("tables");
            let mut text = String::new();
            for table in tables {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT t::text FROM \"{table}\" t"))
                        .fetch_all(&pool)
                        .await
                        .expect("rows");
                text.push_str(&rows.join("\n"));
            }
            assert!(text.contains("create:user"), "the tables were read");
            text
        }
    }
}

async fn a_burst_of_registrations_blocks_its_users_and_undo_restores_them(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let rule = set_rule(&app, json!({"threshold": 5})).await;
    assert_eq!(
        (rule["threshold"].as_u64(), rule["version"].as_u64()),
        (Some(5), Some(2))
    );

    let mut users = Vec::new();
    for i in 0..5 {
        let r = app
            .post_json_from(
                ATTACKER,
                "/v1/auth/register",
                &credentials(&format!("a{i}")),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "registration {i}");
        users.push(r.json::<Value>().await.expect("json")["user_id"].clone());
    }
    // The sixth: a generic 429, nothing about the rule.
    let r = app
        .post_json_from(ATTACKER, "/v1/auth/register", &credentials("a5"))
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let problem = r.text().await.expect("text");
    assert!(problem.contains("rate_limited"));
    for secret in ["create_user", "threshold", "rule", "firewall", "5"] {
        assert!(
            !problem.to_lowercase().contains(secret) || secret == "5" && !problem.contains(" 5 "),
            "{problem}"
        );
    }
    // The five are blocked.
    for i in 0..5 {
        let r = app
            .post_json_from(ATTACKER, "/v1/auth/login", &credentials(&format!("a{i}")))
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "user {i} blocked");
        assert_eq!(
            r.json::<Value>().await.expect("json")["code"],
            "account_blocked"
        );
    }
    // Their devices are out of service too (quarantined, told CRITICAL_LOCK).
    let device = app.admin_device("device_fw_a0").await;
    assert_eq!(device["status"], "quarantined");
    assert_eq!(device["last_command"]["action"], "CRITICAL_LOCK");
    // Another address is not.
    let r = app
        .post_json_from(OTHER, "/v1/auth/register", &credentials("b0"))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // The decision: the rule as it was, the anonymised scope, every id.
    let decisions = app.admin_json("/v1/admin/firewall/decisions").await;
    let items = decisions["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{decisions}");
    let d = &items[0];
    assert_eq!(d["rule_name"], "create_user_per_ip");
    assert_eq!(
        (d["rule_version"].as_u64(), d["threshold"].as_u64()),
        (Some(2), Some(5))
    );
    assert_eq!(d["mode"], "enforce");
    assert_eq!(d["scope"], "ip");
    let mut affected: Vec<Value> = d["affected_users"].as_array().expect("users").clone();
    affected.sort_by_key(|v| v.to_string());
    users.sort_by_key(|v| v.to_string());
    assert_eq!(affected, users);
    assert!(!d["scope_key"].as_str().expect("key").contains(ATTACKER));
    // Counted by rule and mode; the devices' locks by origin; no entity in a label.
    let metrics = app.metrics().await;
    let rule = r#"{rule="create_user_per_ip",mode="enforce"}"#;
    assert!(
        sample(&metrics, &format!("firewall_evaluations_total{rule}")) >= Some(6.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &format!("firewall_decisions_total{rule}")),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"killswitch_commands_issued_total{action="CRITICAL_LOCK",origin="firewall"}"#
        ) >= Some(1.0),
        "{metrics}"
    );
    let ids: Vec<String> = users
        .iter()
        .map(|u| u.as_str().unwrap_or("").to_owned())
        .collect();
    let mut entities: Vec<&str> = ids.iter().map(String::as_str).collect();
    entities.extend([ATTACKER, "device_fw_a0"]);
    assert_no_entity_labels(&metrics, &entities);

    // Undo: exactly those users come back, once.
    let id = d["id"].as_str().expect("id");
    let undo = format!("/v1/admin/firewall/decisions/{id}/undo");
    let r = app.admin(Method::POST, &undo, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The undo's audit row names the operator; the decision's own, nobody.
    let operator = crate::helpers::operator_of(ADMIN);
    let rows = app
        .state
        .store
        .audit_page(&Default::default(), 100)
        .await
        .expect("audit");
    let undone = rows
        .iter()
        .find(|r| r.action_taken == "firewall:undo")
        .expect("the undo is audited");
    assert_eq!(undone.actor.as_deref(), Some(operator.as_str()));
    assert!(rows
        .iter()
        .any(|r| r.action_taken.starts_with("firewall:enforce") && r.actor.is_none()));
    for i in 0..5 {
        let r = app
            .post_json_from(ATTACKER, "/v1/auth/login", &credentials(&format!("a{i}")))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "user {i} restored");
    }
    let r = app.admin(Method::POST, &undo, None).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "already_undone"
    );
    // The scope is briefly exempt: the same burst does not re-block at once.
    let r = app
        .post_json_from(ATTACKER, "/v1/auth/register", &credentials("a6"))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    for kind in ["firewall:block", "firewall:undo"] {
        assert_eq!(
            app.state
                .store
                .events_of_type(kind, 10)
                .await
                .expect("events")
                .len(),
            1,
            "{kind}"
        );
    }

    // The raw address is stored nowhere.
    let dump = database_text(&app).await;
    assert!(
        !dump.contains(ATTACKER),
        "the attacker's address leaked into the database"
    );
    assert!(!dump.contains(OTHER));
    assert!(dump.contains("198.51.100.0/24"), "the prefix is kept");

    // A rule changed on one instance is enforced by another within 5 s.
    if backend == Backend::Production {
        let second = second_instance(&app).await;
        set_rule(&app, json!({"threshold": 1, "window_seconds": 60})).await;
        let mut n = 0;
        let enforced = eventually(Duration::from_secs(5), || {
            n += 1;
            let second = &second;
            let body = credentials(&format!("c{n}"));
            async move {
                second
                    .post_json_from("192.0.2.99", "/v1/auth/register", &body)
                    .await
                    .status()
                    == StatusCode::TOO_MANY_REQUESTS
            }
        })
        .await;
        assert!(enforced, "instance B enforces A's rule change");
    }
}

async fn simulate_mode_records_and_blocks_nothing(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let rule = set_rule(&app, json!({"threshold": 2, "mode": "simulate"})).await;
    assert_eq!(rule["mode"], "simulate");
    for i in 0..4 {
        let r = app
            .post_json_from(
                ATTACKER,
                "/v1/auth/register",
                &credentials(&format!("s{i}")),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "simulate blocks nothing ({i})"
        );
    }
    let decisions = app.admin_json("/v1/admin/firewall/decisions").await;
    let items = decisions["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "one decision per window: {decisions}");
    assert_eq!(items[0]["mode"], "simulate");
    assert_eq!(
        items[0]["affected_users"].as_array().expect("users").len(),
        2,
        "would have blocked the two"
    );
    for i in 0..2 {
        let r = app
            .post_json_from(ATTACKER, "/v1/auth/login", &credentials(&format!("s{i}")))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "nobody blocked");
    }
    // Bad rule changes are named; unknown rules are 404.
    let r = app
        .admin(
            Method::PUT,
            "/v1/admin/firewall/rules/create_user_per_ip",
            Some(&json!({"mode": "panic"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem = r.json::<Value>().await.expect("json");
    assert_eq!(problem["field"], "mode");
    assert_eq!(problem["detail"], "must be enforce, simulate or off");
    // The ranges are checked before the words, each named in its own terms.
    for (body, field, detail) in [
        (
            json!({"threshold": 0, "mode": "panic"}),
            "threshold",
            "must be within 1–1000000",
        ),
        (
            json!({"side_effect": "ban"}),
            "side_effect",
            "must be block_users, quarantine_devices or throttle",
        ),
    ] {
        let r = app
            .admin(
                Method::PUT,
                "/v1/admin/firewall/rules/create_user_per_ip",
                Some(&body),
            )
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let problem = r.json::<Value>().await.expect("json");
        assert_eq!(
            (problem["field"].as_str(), problem["detail"].as_str()),
            (Some(field), Some(detail))
        );
    }
    let r = app
        .admin(
            Method::PUT,
            "/v1/admin/firewall/rules/nope",
            Some(&json!({"threshold": 3})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let rules = app.admin_json("/v1/admin/firewall/rules").await;
    let names: Vec<&str> = rules["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        vec![
            "attestation_failed_per_device",
            "create_user_per_ip",
            "login_failed_per_ip"
        ]
    );
}

async fn failed_logins_attestations_and_session_mints_ask_the_firewall(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let r = app
        .post_json_from(ATTACKER, "/v1/auth/register", &credentials("l0"))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let session = Session::from_response(r, "device_fw_l0").await;

    // Failed logins: past the threshold, the generic 429 instead of 401.
    let r = app
        .admin(
            Method::PUT,
            "/v1/admin/firewall/rules/login_failed_per_ip",
            Some(&json!({"threshold": 2})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut wrong = credentials("l0");
    wrong["password"] = json!("not the password at all");
    for expected in [
        StatusCode::UNAUTHORIZED,
        StatusCode::UNAUTHORIZED,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(
            app.post_json_from(ATTACKER, "/v1/auth/login", &wrong)
                .await
                .status(),
            expected
        );
    }
    assert_eq!(
        app.post_json_from(OTHER, "/v1/auth/login", &wrong)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // Failed attestations: the device is quarantined on the rule's threshold.
    let r = app
        .admin(
            Method::PUT,
            "/v1/admin/firewall/rules/attestation_failed_per_device",
            Some(&json!({"threshold": 1})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let bogus = json!({"nonce": "never-issued", "provider": "test", "token": "x"});
    let attest = || app.attestation_verify(&session, &bogus);
    assert_eq!(
        attest().await.status(),
        StatusCode::CONFLICT,
        "first failure: its own answer"
    );
    assert_eq!(
        attest().await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "second: the firewall"
    );
    let decisions = app.admin_json("/v1/admin/firewall/decisions").await;
    let quarantine = decisions["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|d| d["rule_name"] == "attestation_failed_per_device")
        .expect("decision")
        .clone();
    assert_eq!(quarantine["affected_devices"], json!(["device_fw_l0"]));
    let device = app.admin_device("device_fw_l0").await;
    assert_eq!(device["status"], "quarantined");
    assert_eq!(device["last_command"]["action"], "IMMEDIATE_QUARANTINE");

    // Session mints: no default rule counts them, but one in the table does.
    execute(
        &app,
        "INSERT INTO firewall_rules (name, event_type, scope, threshold, window_seconds, lookback_seconds, side_effect, mode) \
         VALUES ('create_session_per_device', 'create:session', 'device', 1, 3600, 0, 'throttle', 'enforce')",
    )
    .await;
    app.state
        .firewall
        .rules()
        .reload(app.state.store.as_ref())
        .await
        .expect("reload");
    let mint_body = json!({"user_id": session.user_id, "device_id": "device_fw_m0",
        "device_fingerprint": "fp-m0", "platform": "android"});
    let mint = || app.admin(Method::POST, "/v1/admin/sessions", Some(&mint_body));
    assert_eq!(mint().await.status(), StatusCode::CREATED);
    assert_eq!(mint().await.status(), StatusCode::TOO_MANY_REQUESTS);
}
