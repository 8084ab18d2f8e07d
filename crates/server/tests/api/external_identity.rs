//! The integrator's identity (API.md "Integration"), end to end on real
//! servers: a bank maps its customers by its own id, signs their devices in
//! without ever giving BlockRemote a password, and finds their audit rows by
//! that id.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    client::Session,
    helpers::{spawn_app_with, Backend, TestApp},
};

crate::on_both_backends!(
    external_ids_map_to_users_idempotently,
    devices_sign_in_by_external_id_without_a_password,
    audit_rows_are_found_by_external_id,
);

const ADMIN_KEY: &str = "integration-admin-key-0123456789abcdef";

async fn app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.admin_token = Some(ADMIN_KEY.to_owned().into())
    })
    .await
}

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post_user(app: &TestApp, body: Value) -> (StatusCode, Value) {
    json_of(
        app.admin(Method::POST, "/v1/admin/users", Some(&body))
            .await,
    )
    .await
}

async fn mint(app: &TestApp, body: Value) -> (StatusCode, Value) {
    json_of(
        app.admin(Method::POST, "/v1/admin/sessions", Some(&body))
            .await,
    )
    .await
}

fn device(extra: Value, device_id: &str) -> Value {
    let mut body = json!({"device_id": device_id, "device_fingerprint": format!("fp-{device_id}"),
        "platform": "android"});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

async fn external_ids_map_to_users_idempotently(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let (status, first) = post_user(&app, json!({"external_id": "cust_0001"})).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (first["external_id"].as_str(), first["created"].as_bool()),
        (Some("cust_0001"), Some(true))
    );
    // The same request again: the same user, 200, not created.
    let (status, again) = post_user(&app, json!({"external_id": "cust_0001"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["user_id"], first["user_id"]);
    assert_eq!(again["created"], false);
    // Exact, case-sensitive: another id is another user.
    let (status, other) = post_user(&app, json!({"external_id": "CUST_0001"})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(other["user_id"], first["user_id"]);

    // With an email: idempotent on the same email, a conflict on another.
    let (status, with_email) = post_user(
        &app,
        json!({"external_id": "cust_0002", "email": "Ann@Bank.example"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, same) = post_user(
        &app,
        json!({"external_id": "cust_0002", "email": "ann@bank.example"}),
    )
    .await;
    assert_eq!(
        (status, &same["user_id"]),
        (StatusCode::OK, &with_email["user_id"])
    );
    let (status, problem) = post_user(
        &app,
        json!({"external_id": "cust_0002", "email": "bob@bank.example"}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("external_id_conflict"))
    );
    // An email that belongs to another user (here one who registered with a
    // password) is not taken over.
    app.register("carol@bank.example", "device_ext_0001").await;
    let (status, problem) = post_user(
        &app,
        json!({"external_id": "cust_0003", "email": "carol@bank.example"}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("email_taken"))
    );
    let (status, _) = post_user(&app, json!({"external_id": "cust_0003"})).await;
    assert_eq!(status, StatusCode::CREATED, "nothing was left behind");

    // Validation names the field.
    for bad in [
        json!({"external_id": ""}),
        json!({"external_id": "has space"}),
        json!({"external_id": "x".repeat(129)}),
        json!({"external_id": "naïve"}),
    ] {
        let (status, problem) = post_user(&app, bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(problem["field"], "external_id", "{bad}");
    }
    let (status, problem) = post_user(&app, json!({"external_id": "ok", "email": "nope"})).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("email"))
    );
    let (status, _) = post_user(&app, json!({"external_id": "ok", "password": "x"})).await;
    assert!(status.is_client_error(), "unknown fields are refused");

    // Only operators.
    let anonymous = app
        .post_json("/v1/admin/users", &json!({"external_id": "cust_9"}))
        .await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let device = app.register("dave@bank.example", "device_ext_0002").await;
    let as_device = app
        .as_device(Method::POST, "/v1/admin/users", &device)
        .json(&json!({"external_id": "cust_9"}))
        .send()
        .await
        .expect("request");
    assert_eq!(as_device.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = post_user(&app, json!({"external_id": "cust_9"})).await;
    assert_eq!(status, StatusCode::CREATED, "neither attempt created it");
}

async fn devices_sign_in_by_external_id_without_a_password(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    // Unknown without `create`: 404, and nothing is created.
    let (status, problem) = mint(
        &app,
        device(json!({"external_user_id": "cust_new"}), "device_ext_0101"),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("user_not_found"))
    );
    // With `create`: the user is made on first use …
    let (status, tokens) = mint(
        &app,
        device(
            json!({"external_user_id": "cust_new", "create": true}),
            "device_ext_0101",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{tokens}");
    let session = Session::from_json(&tokens, "device_ext_0101");
    assert_eq!(
        app.probe(&session.access, "device_ext_0101").await.status(),
        StatusCode::CREATED,
        "the minted token works"
    );
    // … and is the external id's user from then on.
    let (status, user) = post_user(&app, json!({"external_id": "cust_new"})).await;
    assert_eq!(
        (status, &user["user_id"]),
        (StatusCode::OK, &tokens["user_id"])
    );
    let (status, second) = mint(
        &app,
        device(json!({"external_user_id": "cust_new"}), "device_ext_0102"),
    )
    .await;
    assert_eq!(
        (status, &second["user_id"]),
        (StatusCode::CREATED, &tokens["user_id"])
    );

    // Exactly one way of naming the user.
    for (body, field) in [
        (json!({}), "user_id"),
        (
            json!({"user_id": tokens["user_id"], "external_user_id": "cust_new"}),
            "user_id",
        ),
        (
            json!({"user_id": tokens["user_id"], "create": true}),
            "create",
        ),
        (
            json!({"external_user_id": "has space", "create": true}),
            "external_user_id",
        ),
    ] {
        let (status, problem) = mint(&app, device(body.clone(), "device_ext_0103")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(problem["field"], field, "{body}");
    }

    // An external user has no password: signing in with its email fails like
    // any wrong password, not with a server error.
    let (status, _) = post_user(
        &app,
        json!({"external_id": "cust_mail", "email": "erin@bank.example"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let response = app
        .post_json(
            "/v1/auth/login",
            &json!({"email": "erin@bank.example", "password": "correct horse battery staple",
                "device_id": "device_ext_0104", "device_fingerprint": "fp", "platform": "ios"}),
        )
        .await;
    let (status, problem) = json_of(response).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );
}

async fn audit_rows_are_found_by_external_id(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let (_, tokens) = mint(
        &app,
        device(
            json!({"external_user_id": "cust_audit", "create": true}),
            "device_ext_0201",
        ),
    )
    .await;
    let user_id = tokens["user_id"].as_str().expect("user id").to_owned();
    app.register("frank@bank.example", "device_ext_0202").await;

    let (status, page) = json_of(
        app.admin(
            Method::GET,
            "/v1/audit/logs?external_user_id=cust_audit",
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().expect("items");
    assert!(
        !items.is_empty(),
        "the creation and the sign-in are audited"
    );
    assert!(items.iter().all(|row| row["user_id"] == user_id.as_str()));
    assert!(items
        .iter()
        .any(|row| row["action_taken"] == "user_created:external"));

    // An unknown external id matches nothing; with a contradicting user_id too.
    for query in [
        "external_user_id=cust_nobody".to_owned(),
        format!(
            "external_user_id=cust_audit&user_id={}",
            uuid::Uuid::now_v7()
        ),
    ] {
        let (status, page) = json_of(
            app.admin(Method::GET, &format!("/v1/audit/logs?{query}"), None)
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["items"], json!([]), "{query}");
    }
    // A device sees its own rows; the external filter is an operator's.
    let session = Session::from_json(&tokens, "device_ext_0201");
    let response = app
        .device_get("/v1/audit/logs?external_user_id=cust_audit", &session)
        .await;
    let (status, problem) = json_of(response).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("external_user_id"))
    );
}
