//! Identity, end to end on real servers: device-bound sessions, token
//! verification (and forgeries), refresh rotation and reuse, key rotation,
//! admin keys and attestation — on both backends.

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use blockremote::{
    config::JwtAlgorithm,
    realtime::{Action, DeviceCommand},
    state::keys,
    store::AttestationGrade,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    client::{credentials, Session},
    helpers::{
        assert_no_entity_labels, eventually, sample, spawn_app, spawn_app_with, Backend, TestApp,
    },
};

crate::on_both_backends!(
    sessions_open_with_tokens_any_jose_library_verifies,
    credentials_errors_are_uniform,
    forged_and_out_of_policy_tokens_are_refused,
    tokens_are_bound_to_their_device,
    refresh_rotates_and_reuse_revokes_everything_at_once,
    refresh_from_another_device_or_fingerprint_is_reuse,
    concurrent_refreshes_cannot_both_win,
    logout_revokes_the_refresh_family,
    key_rotation_keeps_old_tokens_valid,
    admin_keys_mint_sessions,
    attestation_nonces_are_single_use_and_device_bound,
    repeated_attestation_failures_quarantine_the_device,
    rs256_keys_from_a_pem_verify_through_the_jwks,
    generated_rs256_keys_verify_through_the_jwks,
    refreshes_are_rate_limited_per_device,
    a_device_cannot_be_taken_over_by_knowing_its_id,
    garbage_refreshes_cannot_exhaust_a_victims_bucket,
    a_key_rotated_elsewhere_is_learned_on_first_sight,
);

const SECRET: &str = "attestation-test-secret";

async fn code_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

fn header_of(token: &str) -> Value {
    let part = token.split('.').next().expect("header");
    serde_json::from_slice(&B64.decode(part).expect("b64")).expect("json")
}

async fn jwks(app: &TestApp) -> Vec<Value> {
    let response = app.get("/.well-known/jwks.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "public, max-age=60");
    let internal: Value = app
        .get("/internal/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    let public: Value = response.json().await.expect("json");
    assert_eq!(public, internal, "both JWKS paths serve the same set");
    public["keys"].as_array().expect("keys").clone()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeviceClaim {
    did: String,
}

/// Verifies `token` with jwt-simple using only the JWKS.
fn verify_independently(
    token: &str,
    jwks: &[Value],
) -> jwt_simple::prelude::JWTClaims<DeviceClaim> {
    use jwt_simple::prelude::*;
    let kid = header_of(token)["kid"].as_str().expect("kid").to_owned();
    let jwk = jwks
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("kid in JWKS");
    let options = VerificationOptions {
        allowed_issuers: Some(HashSet::from_strings(&["blockremote"])),
        allowed_audiences: Some(HashSet::from_strings(&["blockremote-mobile"])),
        required_key_id: Some(kid.clone()),
        ..Default::default()
    };
    let decode = |field: &str| {
        B64.decode(jwk[field].as_str().expect("field"))
            .expect("b64")
    };
    match jwk["kty"].as_str() {
        Some("EC") => {
            let mut point = vec![4u8];
            point.extend(decode("x"));
            point.extend(decode("y"));
            ES256PublicKey::from_bytes(&point)
                .expect("P-256 key")
                .verify_token::<DeviceClaim>(token, Some(options))
                .expect("verifies")
        }
        _ => RS256PublicKey::from_components(&decode("n"), &decode("e"))
            .expect("RSA key")
            .verify_token::<DeviceClaim>(token, Some(options))
            .expect("verifies"),
    }
}

async fn sessions_open_with_tokens_any_jose_library_verifies(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let session = app.register("Ana@Example.com", "device_0001").await;
    let header = header_of(&session.access);
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].is_string());
    let keys = jwks(&app).await;
    assert!(keys
        .iter()
        .all(|k| k["use"] == "sig" && k["alg"] == "ES256" && k["kty"] == "EC"));
    let claims = verify_independently(&session.access, &keys);
    assert_eq!(claims.subject.as_deref(), Some(session.user_id.as_str()));
    assert_eq!(claims.custom.did, "device_0001");
    assert!(claims.jwt_id.is_some());
    let (iat, exp) = (
        claims.issued_at.expect("iat"),
        claims.expires_at.expect("exp"),
    );
    assert_eq!((exp - iat).as_secs(), 900);
    assert!(claims.invalid_before.is_some(), "nbf present");
    assert!(session.refresh.len() >= 43, "256-bit refresh token");

    // Login on a second device (emails are case-insensitive).
    let login = app.login("ana@example.COM", "device_0002").await;
    assert_eq!(login.status(), StatusCode::OK);
    let second = Session::from_response(login, "device_0002").await;
    assert_eq!(second.user_id, session.user_id);
    assert_eq!(
        app.probe(&second.access, "device_0002").await.status(),
        StatusCode::CREATED
    );

    let duplicate = app
        .post_json(
            "/v1/auth/register",
            &credentials("ana@example.com", "device_0003"),
        )
        .await;
    assert_eq!(
        code_of(duplicate).await,
        (StatusCode::CONFLICT, "email_taken".into())
    );

    // Events were recorded with an anonymized address.
    let store = &app.state.store;
    for kind in ["create:user", "create:session"] {
        let events = store.events_of_type(kind, 10).await.expect("events");
        assert!(!events.is_empty(), "{kind}");
        let event = &events[0];
        assert_eq!(event.ip_prefix.as_deref(), Some("127.0.0.0/24"));
        let hmac = event.ip_hmac.as_deref().expect("hmac");
        assert_eq!(hmac.len(), 64);
        assert!(!event.metadata.to_string().contains("127.0.0.1"));
    }

    // Field validation names the field.
    let mut bad = credentials("bob@example.com", "dev");
    let (status, body) = {
        let r = app.post_json("/v1/auth/register", &bad).await;
        (r.status(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("device_id"))
    );
    bad["device_id"] = json!("device_0009");
    bad["platform"] = json!("windows");
    let r = app.post_json("/v1/auth/register", &bad).await;
    assert_eq!(r.json::<Value>().await.expect("json")["field"], "platform");
}

async fn credentials_errors_are_uniform(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    app.register("cleo@example.com", "device_0001").await;
    let attempt = |email: &'static str| {
        let body = json!({"email": email, "password": "wrong password!", "device_id": "device_0001",
            "device_fingerprint": "fp-device_0001", "platform": "android"});
        let app = &app;
        async move {
            let started = Instant::now();
            let response = app.post_json("/v1/auth/login", &body).await;
            let elapsed = started.elapsed();
            let status = response.status();
            let body: Value = response.json().await.expect("json");
            (status, body, elapsed)
        }
    };
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..3 {
        let (status, body, elapsed) = attempt("cleo@example.com").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
        );
        known.push(elapsed);
        let (status2, body2, elapsed2) = attempt("nobody@example.com").await;
        assert_eq!(status2, status);
        assert_eq!(body2["detail"], body["detail"], "the same answer");
        unknown.push(elapsed2);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[1].as_secs_f64(), unknown[1].as_secs_f64());
    assert!(
        k / u < 3.0 && u / k < 3.0,
        "similar time: known {k:.4}s, unknown {u:.4}s"
    );
    let failed = app
        .state
        .store
        .events_of_type("login:failed", 10)
        .await
        .expect("events");
    assert_eq!(failed.len(), 6);
}

async fn signing_key_of(app: &TestApp) -> (String, EncodingKey) {
    let keys = app.state.store.signing_keys().await.expect("keys");
    let key = keys
        .iter()
        .rev()
        .find(|k| k.private_der.is_some())
        .expect("key");
    // Stored sealed under the KEK (auth::kek); opened the way the server does.
    let der = blockremote::auth::kek::open_or_plain(
        app.state.auth.kek.as_deref(),
        &blockremote::auth::kek::signing_key_row(&key.kid),
        "signing key",
        key.private_der.as_deref().expect("der"),
    )
    .expect("opens with the server's KEK");
    (key.kid.clone(), EncodingKey::from_ec_der(&der))
}

fn claims(sub: &str, did: &str, iat_offset: i64, exp_offset: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iss": "blockremote", "aud": "blockremote-mobile", "sub": sub, "did": did,
        "jti": uuid::Uuid::new_v4(), "iat": now + iat_offset, "nbf": now + iat_offset, "exp": now + exp_offset})
}

async fn forged_and_out_of_policy_tokens_are_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let s = app.register("dan@example.com", "device_0001").await;
    let (kid, real_key) = signing_key_of(&app).await;
    let sign = |claims: &Value, key: &EncodingKey, kid: &str| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        encode(&header, claims, key).expect("sign")
    };
    let accepted = |token: String| {
        let app = &app;
        async move { app.probe(&token, "device_0001").await.status() }
    };
    // Sanity: a token we sign ourselves with the real key is accepted…
    assert_eq!(
        accepted(sign(
            &claims(&s.user_id, "device_0001", 0, 600),
            &real_key,
            &kid
        ))
        .await,
        StatusCode::CREATED
    );
    // …including within 30 s of skew either way.
    assert_eq!(
        accepted(sign(
            &claims(&s.user_id, "device_0001", -900, -20),
            &real_key,
            &kid
        ))
        .await,
        StatusCode::CREATED,
        "expired 20 s ago"
    );
    assert_eq!(
        accepted(sign(
            &claims(&s.user_id, "device_0001", 20, 600),
            &real_key,
            &kid
        ))
        .await,
        StatusCode::CREATED,
        "nbf 20 s ahead"
    );

    // A genuine token expired beyond the leeway: `token_expired` (refresh),
    // not `invalid_token` (sign in again).
    let expired = app
        .probe(
            &sign(
                &claims(&s.user_id, "device_0001", -900, -40),
                &real_key,
                &kid,
            ),
            "device_0001",
        )
        .await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        expired.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\", error_description=\"The access token expired\""
    );
    assert_eq!(code_of(expired).await.1, "token_expired");

    let mut forgeries: Vec<(&str, String)> = Vec::new();
    forgeries.push((
        "nbf beyond leeway",
        sign(&claims(&s.user_id, "device_0001", 40, 600), &real_key, &kid),
    ));
    let mut wrong_aud = claims(&s.user_id, "device_0001", 0, 600);
    wrong_aud["aud"] = json!("someone-else");
    forgeries.push(("wrong aud", sign(&wrong_aud, &real_key, &kid)));
    let mut wrong_iss = claims(&s.user_id, "device_0001", 0, 600);
    wrong_iss["iss"] = json!("evil");
    forgeries.push(("wrong iss", sign(&wrong_iss, &real_key, &kid)));
    let mut no_exp = claims(&s.user_id, "device_0001", 0, 600);
    no_exp.as_object_mut().expect("object").remove("exp");
    forgeries.push(("no exp", sign(&no_exp, &real_key, &kid)));

    // alg "none".
    let none_header = B64.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string());
    let payload = B64.encode(claims(&s.user_id, "device_0001", 0, 600).to_string());
    forgeries.push(("alg none", format!("{none_header}.{payload}.")));
    // HS256 keyed with the public key (the classic algorithm-confusion attack).
    let jwk = jwks(&app)
        .await
        .into_iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("jwk");
    for secret in [jwk.to_string().into_bytes(), {
        let mut point = vec![4u8];
        point.extend(B64.decode(jwk["x"].as_str().expect("x")).expect("b64"));
        point.extend(B64.decode(jwk["y"].as_str().expect("y")).expect("b64"));
        point
    }] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        forgeries.push((
            "HS256 with the public key",
            encode(
                &header,
                &claims(&s.user_id, "device_0001", 0, 600),
                &EncodingKey::from_secret(&secret),
            )
            .expect("sign"),
        ));
    }
    // Tampered payload: another user's id under the original signature.
    let parts: Vec<&str> = s.access.split('.').collect();
    let mut tampered: Value =
        serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
    tampered["sub"] = json!(uuid::Uuid::new_v4());
    forgeries.push((
        "tampered payload",
        format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(tampered.to_string()),
            parts[2]
        ),
    ));
    // A foreign key, with an unknown kid and with the real kid.
    let foreign = blockremote::auth::keys::generate_es256().expect("key");
    let foreign_key = EncodingKey::from_ec_der(foreign.private_der.as_deref().expect("der"));
    forgeries.push((
        "foreign kid",
        sign(
            &claims(&s.user_id, "device_0001", 0, 600),
            &foreign_key,
            &foreign.kid,
        ),
    ));
    forgeries.push((
        "foreign key, real kid",
        sign(
            &claims(&s.user_id, "device_0001", 0, 600),
            &foreign_key,
            &kid,
        ),
    ));
    forgeries.push(("no kid", {
        let header = Header::new(Algorithm::ES256);
        encode(
            &header,
            &claims(&s.user_id, "device_0001", 0, 600),
            &real_key,
        )
        .expect("sign")
    }));
    forgeries.push(("garbage", "not.a.jwt".to_owned()));
    // Expiry is only ever said of a token this server signed: an expired
    // forgery is just invalid (no oracle for which forgeries "nearly" pass).
    forgeries.push((
        "expired, foreign key",
        sign(
            &claims(&s.user_id, "device_0001", -900, -40),
            &foreign_key,
            &kid,
        ),
    ));
    let mut expired_wrong_aud = claims(&s.user_id, "device_0001", -900, -40);
    expired_wrong_aud["aud"] = json!("someone-else");
    forgeries.push((
        "expired, wrong aud",
        sign(&expired_wrong_aud, &real_key, &kid),
    ));

    for (name, token) in forgeries {
        let response = app.probe(&token, "device_0001").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\"",
            "{name}"
        );
        assert_eq!(code_of(response).await.1, "invalid_token", "{name}");
    }
    let missing = app
        .client
        .post(app.url("/v1/attestation/nonce"))
        .header("x-device-id", "device_0001")
        .send()
        .await
        .expect("request");
    assert_eq!(
        code_of(missing).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );
}

async fn tokens_are_bound_to_their_device(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let s = app.register("eve@example.com", "device_0001").await;
    app.register("fay@example.com", "device_0002").await;
    for device in [None, Some("device_0002"), Some("DEVICE_0001")] {
        let response = app
            .device_post("/v1/attestation/nonce", &s.access, device, None)
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{device:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "device_mismatch", "{device:?}");
        // The detail says which: the header is missing, or names another device.
        let detail = body["detail"].as_str().expect("detail");
        let says = if device.is_none() {
            "missing"
        } else {
            "different"
        };
        assert!(detail.contains(says), "{device:?}: {detail}");
    }
    assert_eq!(
        app.probe(&s.access, &s.device_id).await.status(),
        StatusCode::CREATED
    );
}

async fn refresh_rotates_and_reuse_revokes_everything_at_once(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let mut commands = app
        .state
        .shared
        .subscribe(keys::KILL_SWITCH_CHANNEL)
        .await
        .expect("subscribe");
    let s = app.register("gus@example.com", "device_0001").await;

    let rotated = app
        .refresh(&s.refresh, &s.device_id, "fp-device_0001")
        .await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let next = Session::from_response(rotated, &s.device_id).await;
    assert_ne!(next.refresh, s.refresh, "rotated on every use");
    assert_ne!(next.access, s.access);
    assert_eq!(
        app.probe(&next.access, &s.device_id).await.status(),
        StatusCode::CREATED
    );
    let third = Session::from_response(
        app.refresh(&next.refresh, &s.device_id, "fp-device_0001")
            .await,
        &s.device_id,
    )
    .await;

    // The first token again: reuse.
    let reused = app
        .refresh(&s.refresh, &s.device_id, "fp-device_0001")
        .await;
    assert_eq!(
        code_of(reused).await,
        (StatusCode::UNAUTHORIZED, "refresh_token_reused".into())
    );

    let message = tokio::time::timeout(Duration::from_secs(2), commands.recv())
        .await
        .expect("published in time")
        .expect("open");
    let command: DeviceCommand = serde_json::from_slice(&message).expect("command JSON");
    assert_eq!(command.device_id, s.device_id);
    assert_eq!(command.action, Action::CriticalLock);
    assert_eq!(command.reason, "refresh_token_reuse");
    assert!(app
        .state
        .shared
        .get(&keys::revoked_device(&s.device_id))
        .await
        .expect("get")
        .is_some());

    // The whole family and the device are dead, even before the tokens expire.
    assert_eq!(
        code_of(app.probe(&third.access, &s.device_id).await).await,
        (StatusCode::UNAUTHORIZED, "device_revoked".into())
    );
    assert_eq!(
        code_of(
            app.refresh(&third.refresh, &s.device_id, "fp-device_0001")
                .await
        )
        .await
        .1,
        "invalid_refresh_token"
    );
    let relogin = app.login("gus@example.com", "device_0001").await;
    assert_eq!(
        code_of(relogin).await,
        (StatusCode::UNAUTHORIZED, "device_revoked".into())
    );

    let user = uuid::Uuid::parse_str(&s.user_id).expect("uuid");
    let audit = app
        .state
        .store
        .audit_for_user(user, 10)
        .await
        .expect("audit");
    assert!(audit.iter().any(|r| r.action_taken == "CRITICAL_LOCK"
        && r.decision_reason.as_deref() == Some("refresh_token_reuse")
        && r.ip.as_deref() == Some("127.0.0.0/24")));
    let events = app
        .state
        .store
        .events_of_type("refresh:reuse", 10)
        .await
        .expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(
        app.state
            .store
            .events_of_type("refresh:rotated", 10)
            .await
            .expect("events")
            .len(),
        2
    );
    // Counted by outcome, the lock by its origin; no label names the device.
    let metrics = app.metrics().await;
    for (series, n) in [
        (r#"auth_refresh_attempts_total{outcome="rotated"}"#, 2.0),
        (r#"auth_refresh_attempts_total{outcome="reuse"}"#, 1.0),
        (r#"auth_refresh_attempts_total{outcome="invalid"}"#, 1.0),
        (
            r#"killswitch_commands_issued_total{action="CRITICAL_LOCK",origin="session"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&metrics, series), Some(n), "{series} in {metrics}");
    }
    assert!(
        sample(&metrics, "argon2_queue_wait_seconds_count") >= Some(2.0),
        "{metrics}"
    );
    assert_no_entity_labels(&metrics, &[&s.device_id, &s.user_id, "127.0.0.1"]);
}

async fn refresh_from_another_device_or_fingerprint_is_reuse(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let a = app.register("hal@example.com", "device_0001").await;
    let wrong_fp = app.refresh(&a.refresh, &a.device_id, "fp-stolen").await;
    assert_eq!(wrong_fp.status(), StatusCode::UNAUTHORIZED);
    let problem: serde_json::Value = wrong_fp.json().await.expect("problem");
    assert_eq!(problem["code"], "refresh_token_reused");
    // The detail must not claim a first use was a second one.
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("presented for another device")),
        "{problem}"
    );
    assert_eq!(
        code_of(app.probe(&a.access, &a.device_id).await).await.1,
        "device_revoked"
    );

    let b = app.register("ida@example.com", "device_0002").await;
    let other_device = app
        .refresh(&b.refresh, "device_0003", "fp-device_0002")
        .await;
    assert_eq!(
        code_of(other_device).await,
        (StatusCode::UNAUTHORIZED, "refresh_token_reused".into())
    );
    assert_eq!(
        code_of(app.probe(&b.access, &b.device_id).await).await.1,
        "device_revoked"
    );

    let unknown = app
        .refresh("brt_not-a-real-token", "device_0002", "fp")
        .await;
    assert_eq!(
        code_of(unknown).await,
        (StatusCode::UNAUTHORIZED, "invalid_refresh_token".into())
    );
}

async fn concurrent_refreshes_cannot_both_win(backend: Backend) {
    // Strict rotation: exactly one of six concurrent refreshes wins.
    let Some(app) = spawn_app_with(backend, |c| {
        c.refresh_reuse_interval = Duration::ZERO;
    })
    .await
    else {
        return;
    };
    let s = app.register("jon@example.com", "device_0001").await;
    let attempts = (0..6).map(|_| app.refresh(&s.refresh, &s.device_id, "fp-device_0001"));
    let statuses: Vec<StatusCode> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    let wins = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(wins, 1, "exactly one rotation wins: {statuses:?}");
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::OK || *s == StatusCode::UNAUTHORIZED));

    // With the reuse interval (the default) they are one client retrying:
    // one rotation, and every answer is its pair.
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let s = app.register("jon@example.com", "device_0001").await;
    let attempts = (0..6).map(|_| app.refresh(&s.refresh, &s.device_id, "fp-device_0001"));
    let mut tokens = Vec::new();
    for r in futures::future::join_all(attempts).await {
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.expect("json");
        tokens.push(body["refresh_token"].as_str().expect("token").to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "one pair: {tokens:?}");
}

async fn logout_revokes_the_refresh_family(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let s = app.register("kim@example.com", "device_0001").await;
    let out = app
        .device_post("/v1/auth/logout", &s.access, Some(&s.device_id), None)
        .await;
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let after = app
        .refresh(&s.refresh, &s.device_id, "fp-device_0001")
        .await;
    assert_eq!(
        code_of(after).await,
        (StatusCode::UNAUTHORIZED, "invalid_refresh_token".into())
    );
    // Signing in again works: logout is not a lock.
    let again = app.login("kim@example.com", "device_0001").await;
    assert_eq!(again.status(), StatusCode::OK);
}

async fn key_rotation_keeps_old_tokens_valid(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |c| c.key_reload_interval = Duration::from_secs(1)).await
    else {
        return;
    };
    let before = app.register("lea@example.com", "device_0001").await;
    let old_kid = header_of(&before.access)["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    assert_eq!(jwks(&app).await.len(), 1);

    // Rotate with the CLI, as an operator would, against the same database.
    let output = cli(&app, &["keys", "rotate"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let new_kid = String::from_utf8(output.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert_ne!(new_kid, old_kid);
    // Audited as an operator's command, chained as the server chains its rows.
    let rows = app
        .state
        .store
        .audit_page(&Default::default(), 20)
        .await
        .expect("audit");
    let row = rows
        .iter()
        .find(|r| r.action_taken == "signing_key_rotated")
        .expect("the rotation is audited");
    assert_eq!(
        (
            row.source.as_str(),
            row.actor.as_deref(),
            row.decision_reason.as_deref()
        ),
        ("cli", Some("cli"), Some(new_kid.as_str()))
    );
    let chain = blockremote::store::verify_chain(
        app.state.store.as_ref(),
        app.state.store.chain_key().as_ref(),
        None,
    )
    .await
    .expect("verify");
    assert!(chain.is_ok(), "{chain:?}");

    // The running server picks it up by itself (reload every second here; ≤ 60 s in production).
    let switched = eventually(Duration::from_secs(10), || async {
        let s = app.login("lea@example.com", "device_0002").await;
        let token: Value = s.json().await.expect("json");
        header_of(token["access_token"].as_str().unwrap_or("e30.e30.x"))["kid"] == new_kid.as_str()
    })
    .await;
    assert!(switched, "new tokens are signed with the new key");
    let keys = jwks(&app).await;
    let kids: Vec<&str> = keys.iter().filter_map(|k| k["kid"].as_str()).collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{kids:?}"
    );
    // The old token still works until it expires.
    assert_eq!(
        app.probe(&before.access, &before.device_id).await.status(),
        StatusCode::CREATED
    );
    verify_independently(&before.access, &keys);
}

/// Runs a `blockremote` command against the same database as `app`.
async fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let config = &app.state.config;
    let mut env = vec![(
        "BLOCKREMOTE_DATA_DIR",
        config.data_dir.display().to_string(),
    )];
    if let blockremote::config::DatabaseConfig::Postgres { url } = &config.database {
        use secrecy::ExposeSecret;
        env.push(("DATABASE_URL", url.expose_secret().to_owned()));
        // The server's KEK (the test harness writes it into the data dir).
        env.push((
            "BLOCKREMOTE_KEK_FILE",
            config.data_dir.join("kek").display().to_string(),
        ));
    }
    if config.jwt_algorithm != JwtAlgorithm::Es256 {
        env.push((
            "BLOCKREMOTE_JWT_ALGORITHM",
            config.jwt_algorithm.to_string(),
        ));
    }
    tokio::process::Command::new(env!("CARGO_BIN_EXE_blockremote"))
        .args(args)
        .env_clear()
        .envs(env)
        .output()
        .await
        .expect("run blockremote")
}

async fn admin_keys_mint_sessions(backend: Backend) {
    let bootstrap = "bootstrap-admin-key-0123456789abcdef0123";
    let Some(app) = spawn_app_with(backend, |c| {
        c.admin_token = Some(bootstrap.to_owned().into())
    })
    .await
    else {
        return;
    };
    let user = app.register("max@example.com", "device_0001").await;
    let mint = |key: String, user_id: String| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/v1/admin/sessions"))
                .bearer_auth(key)
                .json(&json!({"user_id": user_id, "device_id": "device_0009",
                    "device_fingerprint": "fp-server", "platform": "ios"}))
                .send()
                .await
                .expect("request")
        }
    };
    let minted = mint(bootstrap.to_owned(), user.user_id.clone()).await;
    assert_eq!(minted.status(), StatusCode::CREATED);
    let session = Session::from_response(minted, "device_0009").await;
    assert_eq!(session.user_id, user.user_id);
    assert_eq!(
        app.probe(&session.access, "device_0009").await.status(),
        StatusCode::CREATED
    );

    assert_eq!(
        code_of(mint("wrong-key".into(), user.user_id.clone()).await).await,
        (StatusCode::UNAUTHORIZED, "invalid_admin_key".into())
    );
    let no_key = app.post_json("/v1/admin/sessions", &json!({})).await;
    assert_eq!(code_of(no_key).await.1, "invalid_admin_key");
    let unknown = mint(bootstrap.to_owned(), uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(
        code_of(unknown).await,
        (StatusCode::NOT_FOUND, "user_not_found".into())
    );

    // A key created with the CLI works, and only its hash is stored.
    let output = cli(&app, &["admin-key", "create", "--name", "ops"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let created = String::from_utf8(output.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert!(created.starts_with("bra_") && created.len() > 40);
    assert_eq!(
        mint(created.clone(), user.user_id.clone()).await.status(),
        StatusCode::CREATED
    );
    assert!(app
        .state
        .store
        .admin_key_exists(&blockremote::auth::sha256(created.as_bytes()))
        .await
        .expect("lookup"));
}

async fn with_attestation(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.attestation_test_secret = Some(SECRET.to_owned().into())
    })
    .await
}

fn test_token(nonce: &str, device: &str, app_ok: &str, device_ok: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"nonce": nonce, "device_id": device, "app_integrity": app_ok, "device_integrity": device_ok}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

async fn nonce(app: &TestApp, s: &Session) -> String {
    let response = app.probe(&s.access, &s.device_id).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    let expires: chrono::DateTime<chrono::Utc> = body["expires_at"]
        .as_str()
        .expect("expiry")
        .parse()
        .expect("rfc3339");
    let ttl = expires - chrono::Utc::now();
    assert!(
        ttl > chrono::Duration::seconds(170) && ttl <= chrono::Duration::seconds(180),
        "{ttl}"
    );
    body["nonce"].as_str().expect("nonce").to_owned()
}

async fn verify(
    app: &TestApp,
    s: &Session,
    nonce: &str,
    provider: &str,
    token: &str,
) -> reqwest::Response {
    app.attestation_verify(
        s,
        &json!({"nonce": nonce, "provider": provider, "token": token}),
    )
    .await
}

async fn attestation_nonces_are_single_use_and_device_bound(backend: Backend) {
    let Some(app) = with_attestation(backend).await else {
        return;
    };
    let a = app.register("ned@example.com", "device_0001").await;
    let b = app.register("ola@example.com", "device_0002").await;

    let n = nonce(&app, &a).await;
    let ok = verify(
        &app,
        &a,
        &n,
        "test",
        &test_token(&n, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let body: Value = ok.json().await.expect("json");
    assert_eq!(
        (body["verdict"].as_str(), body["attestation_score"].as_f64()),
        (Some("verified"), Some(1.0))
    );
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"attestation_verdicts_total{provider="test",result="verified"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    let device = app
        .state
        .store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.attestation.grade, AttestationGrade::Device);

    // Second use of the same nonce.
    let again = verify(
        &app,
        &a,
        &n,
        "test",
        &test_token(&n, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(
        code_of(again).await,
        (StatusCode::CONFLICT, "nonce_replay".into())
    );
    // Another device's nonce.
    let nb = nonce(&app, &b).await;
    let foreign = verify(
        &app,
        &a,
        &nb,
        "test",
        &test_token(&nb, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(
        code_of(foreign).await,
        (StatusCode::CONFLICT, "nonce_replay".into())
    );
    // An expired nonce (its key gone from shared state, as Redis would expire it).
    let n2 = nonce(&app, &a).await;
    app.state
        .shared
        .delete(&keys::nonce("device_0001"))
        .await
        .expect("expire");
    let expired = verify(
        &app,
        &a,
        &n2,
        "test",
        &test_token(&n2, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(
        code_of(expired).await,
        (StatusCode::CONFLICT, "nonce_replay".into())
    );

    // A failing verdict.
    let n3 = nonce(&app, &b).await;
    let failed = verify(
        &app,
        &b,
        &n3,
        "test",
        &test_token(&n3, "device_0002", "pass", "fail"),
    )
    .await;
    let body: Value = failed.json().await.expect("json");
    assert_eq!(
        (body["verdict"].as_str(), body["attestation_score"].as_f64()),
        (Some("failed"), Some(0.5))
    );
    // A token bound to another device is a failure even with a fresh nonce.
    let n4 = nonce(&app, &b).await;
    let stolen = verify(
        &app,
        &b,
        &n4,
        "test",
        &test_token(&n4, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(
        stolen.json::<Value>().await.expect("json")["verdict"],
        "failed"
    );

    let n5 = nonce(&app, &b).await;
    for provider in ["play_integrity", "app_attest"] {
        let r = verify(&app, &b, &n5, provider, "x").await;
        assert_eq!(
            code_of(r).await,
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "provider_not_configured".into()
            )
        );
    }
    let r = verify(&app, &b, &n5, "carrier_pigeon", "x").await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json::<Value>().await.expect("json")["field"], "provider");

    assert!(!app
        .state
        .store
        .events_of_type("attestation:verified", 10)
        .await
        .expect("events")
        .is_empty());
    assert!(!app
        .state
        .store
        .events_of_type("attestation:failed", 10)
        .await
        .expect("events")
        .is_empty());
}

async fn repeated_attestation_failures_quarantine_the_device(backend: Backend) {
    let Some(app) = with_attestation(backend).await else {
        return;
    };
    let mut commands = app
        .state
        .shared
        .subscribe(keys::KILL_SWITCH_CHANNEL)
        .await
        .expect("subscribe");
    let s = app.register("pia@example.com", "device_0001").await;
    for attempt in 1..=3 {
        let r = verify(&app, &s, "never-issued", "test", "x").await;
        assert_eq!(
            code_of(r).await,
            (StatusCode::CONFLICT, "nonce_replay".into()),
            "attempt {attempt}"
        );
    }
    let message = tokio::time::timeout(Duration::from_secs(2), commands.recv())
        .await
        .expect("published in time")
        .expect("open");
    let command: DeviceCommand = serde_json::from_slice(&message).expect("json");
    assert_eq!(
        (command.action, command.device_id.as_str()),
        (Action::ImmediateQuarantine, "device_0001")
    );
    assert_eq!(
        code_of(app.probe(&s.access, &s.device_id).await).await,
        (StatusCode::FORBIDDEN, "device_locked".into())
    );
    let user = uuid::Uuid::parse_str(&s.user_id).expect("uuid");
    let audit = app
        .state
        .store
        .audit_for_user(user, 10)
        .await
        .expect("audit");
    assert!(audit
        .iter()
        .any(|r| r.action_taken == "IMMEDIATE_QUARANTINE"));
    let device = app
        .state
        .store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.attestation_failures, 3);
}

async fn rs256_keys_from_a_pem_verify_through_the_jwks(backend: Backend) {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa");
    let pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .expect("pem")
        .to_string();
    let Some(app) = spawn_app_with(backend, |c| c.jwt_private_key = Some(pem.into())).await else {
        return;
    };
    let s = app.register("quin@example.com", "device_0001").await;
    assert_eq!(header_of(&s.access)["alg"], "RS256");
    let keys = jwks(&app).await;
    assert!(keys
        .iter()
        .any(|k| k["kty"] == "RSA" && k["alg"] == "RS256"));
    let claims = verify_independently(&s.access, &keys);
    assert_eq!(claims.custom.did, "device_0001");
    assert_eq!(
        app.probe(&s.access, &s.device_id).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_is_enforced_by_another_at_once() {
    let Some(first) = spawn_app(Backend::Production).await else {
        return;
    };
    let second = crate::helpers::second_instance(&first).await;

    let s = first.register("rae@example.com", "device_0001").await;
    // Warm the second instance's device-status cache.
    assert_eq!(
        second.probe(&s.access, &s.device_id).await.status(),
        StatusCode::CREATED
    );
    let next = Session::from_response(
        first
            .refresh(&s.refresh, &s.device_id, "fp-device_0001")
            .await,
        &s.device_id,
    )
    .await;
    // The token before last (the last one would be a retry within the reuse
    // interval): reuse on the first instance…
    let after = first
        .refresh(&next.refresh, &s.device_id, "fp-device_0001")
        .await;
    assert_eq!(after.status(), StatusCode::OK);
    let reused = first
        .refresh(&s.refresh, &s.device_id, "fp-device_0001")
        .await;
    assert_eq!(reused.status(), StatusCode::UNAUTHORIZED);
    // …is enforced by the second without waiting for its cache to expire.
    let enforced = eventually(Duration::from_millis(1500), || async {
        second.probe(&next.access, &s.device_id).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(enforced);
}

async fn generated_rs256_keys_verify_through_the_jwks(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| c.jwt_algorithm = JwtAlgorithm::Rs256).await else {
        return;
    };
    let s = app.register("ria@example.com", "device_0001").await;
    assert_eq!(header_of(&s.access)["alg"], "RS256");
    let claims = verify_independently(&s.access, &jwks(&app).await);
    assert_eq!(claims.custom.did, "device_0001");
}

async fn refreshes_are_rate_limited_per_device(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| c.refresh_per_minute = 3).await else {
        return;
    };
    let s = app.register("sam@example.com", "device_0001").await;
    let mut token = s.refresh.clone();
    for _ in 0..3 {
        let r = app.refresh(&token, &s.device_id, "fp-device_0001").await;
        assert_eq!(r.status(), StatusCode::OK);
        token = Session::from_response(r, &s.device_id).await.refresh;
    }
    let limited = app.refresh(&token, &s.device_id, "fp-device_0001").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(code_of(limited).await.1, "rate_limited");
    // The refused attempt did not spend the token.
    let other = app.register("tia@example.com", "device_0002").await;
    assert_eq!(
        app.refresh(&other.refresh, &other.device_id, "fp-device_0002")
            .await
            .status(),
        StatusCode::OK,
        "other devices are unaffected"
    );
}

async fn a_device_cannot_be_taken_over_by_knowing_its_id(backend: Backend) {
    let Some(app) = with_attestation(backend).await else {
        return;
    };
    let victim = app.register("uma@example.com", "device_0001").await;
    let n = nonce(&app, &victim).await;
    let verified = verify(
        &app,
        &victim,
        &n,
        "test",
        &test_token(&n, "device_0001", "pass", "pass"),
    )
    .await;
    assert_eq!(verified.status(), StatusCode::OK);

    // Another account, the victim's device id, other hardware: refused.
    let mut attack = credentials("vic@example.com", "device_0001");
    attack["device_fingerprint"] = json!("attacker-phone");
    let r = app.post_json("/v1/auth/register", &attack).await;
    assert_eq!(
        code_of(r).await,
        (StatusCode::CONFLICT, "device_in_use".into())
    );
    assert_eq!(
        app.probe(&victim.access, &victim.device_id).await.status(),
        StatusCode::CREATED,
        "victim unaffected"
    );

    // The same hardware (a second account on the same phone) may take it over,
    // and does not inherit the first account's attestation.
    let r = app
        .post_json(
            "/v1/auth/register",
            &credentials("wes@example.com", "device_0001"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let device = app
        .state
        .store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.attestation.grade, AttestationGrade::Unknown);
    assert_eq!(device.attestation.provider, None);
    assert_eq!(
        code_of(app.probe(&victim.access, &victim.device_id).await)
            .await
            .1,
        "device_revoked"
    );
}

async fn garbage_refreshes_cannot_exhaust_a_victims_bucket(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| c.refresh_per_minute = 2).await else {
        return;
    };
    let victim = app.register("xan@example.com", "device_0001").await;
    for _ in 0..5 {
        let r = app
            .refresh("brt_garbage", &victim.device_id, "fp-device_0001")
            .await;
        assert_eq!(code_of(r).await.1, "invalid_refresh_token");
    }
    let r = app
        .refresh(&victim.refresh, &victim.device_id, "fp-device_0001")
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the victim's own refresh still works"
    );
}

async fn a_key_rotated_elsewhere_is_learned_on_first_sight(backend: Backend) {
    // Reloads are slow here, so only the unknown-kid path can pick the key up.
    let Some(app) =
        spawn_app_with(backend, |c| c.key_reload_interval = Duration::from_secs(60)).await
    else {
        return;
    };
    let s = app.register("yul@example.com", "device_0001").await;
    tokio::time::sleep(blockremote::auth::keys::UNKNOWN_KID_RELOAD_GAP).await;
    // Another instance rotates…
    let kid = blockremote::auth::keys::rotate(
        app.state.store.as_ref(),
        JwtAlgorithm::Es256,
        app.state.auth.kek.as_deref(),
    )
    .await
    .expect("rotate");
    let (new_kid, key) = signing_key_of(&app).await;
    assert_eq!(new_kid, kid);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid);
    let token = encode(&header, &claims(&s.user_id, "device_0001", 0, 600), &key).expect("sign");
    // …and its token is accepted here at once.
    assert_eq!(
        app.probe(&token, "device_0001").await.status(),
        StatusCode::CREATED
    );
}
