//! Real attestation through the API, on both backends: Play Integrity tokens
//! and App Attest attestations and assertions, generated with test keys and
//! a test root (`tests/fixtures/attestation.rs`), verified by the server as a
//! phone's would be. Every tampering is refused with its own reason; hard
//! failures quarantine at once; the graded state reaches the trust report,
//! the admin view and the engine (a controlling app locks a calm device);
//! a verified state decays to `unknown`.

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD, Engine};
use blockremote::auth::{
    app_attest::{AppAttestConfig, Environment},
    play_integrity::PlayIntegrityConfig,
};
use blockremote_engine::sim::{session, Class};
use chrono::Datelike;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    attestation_fixtures::{
        assertion, build, cert_digest, chain, client_data, play_verdict, with, Built, Chain, Knobs,
        PlayKeys, APP,
    },
    client::{next_json, Session},
    helpers::{eventually, heartbeat_body, spawn_app_with, Backend, WithWorkers},
};

crate::on_both_backends!(
    play_integrity_verdicts_are_graded_and_every_tampering_has_its_reason,
    app_attest_keys_are_attested_then_asserted_with_a_rising_counter,
    a_controlling_app_reported_by_play_locks_a_calm_device,
    a_verified_state_decays_to_unknown,
    a_request_failure_never_erases_a_verdict_and_other_hardware_starts_unknown,
    nobody_attests_for_a_device_they_do_not_hold,
);

const ADMIN: &str = "attestation-admin-key-0123456789abcdef";

/// An alteration of Play's verdict.
type Tamper = Box<dyn FnOnce(Value) -> Value>;
/// The attestation knobs for an issued nonce.
type MakeKnobs = Box<dyn Fn(&str) -> Knobs>;
const PACKAGE: &str = "com.example.bank";
const CERT: [u8; 32] = [7; 32];

/// A server that trusts these Play keys and this App Attest root.
struct Lab {
    app: WithWorkers,
    play: PlayKeys,
    chain: Chain,
}

impl std::ops::Deref for Lab {
    type Target = WithWorkers;
    fn deref(&self) -> &WithWorkers {
        &self.app
    }
}

impl Lab {
    async fn start(backend: Backend, max_age: Duration) -> Option<Self> {
        let play = PlayKeys::generate();
        let chain = chain();
        let play_config = PlayIntegrityConfig::from_settings(
            PACKAGE,
            &play.decryption_key(),
            &play.verification_key(),
            &cert_digest(CERT),
        )
        .expect("play settings");
        let attest_config =
            AppAttestConfig::with_root([APP], Environment::Production, &chain.root.cert.pem())
                .expect("app attest settings");
        let app = spawn_app_with(backend, |c| {
            c.admin_token = Some(ADMIN.to_owned().into());
            c.play_integrity = Some(play_config);
            c.app_attest = Some(attest_config);
            c.attestation_max_age = max_age;
        })
        .await?;
        Some(Self {
            app: WithWorkers::start(app).await,
            play,
            chain,
        })
    }

    async fn device(&self, n: u32) -> Session {
        self.register(
            &format!("owner{n}@example.com"),
            &format!("device_att_{n:04}"),
        )
        .await
    }

    /// Device `n`, with a fresh App Attest key attested (asserted verified).
    async fn attested(&self, n: u32) -> (Session, Built) {
        let s = self.device(n).await;
        let nonce = self.nonce(&s).await;
        let built = build(&self.chain, &knobs(&nonce));
        let (_, body) = self.verify(&s, &attestation_body(&nonce, &built)).await;
        assert_eq!(verdict_of(&body).0, "verified", "{body}");
        (s, built)
    }

    /// One assertion on a fresh nonce for `key_id`, signed by `signing` at `counter`.
    async fn assert_once(
        &self,
        s: &Session,
        key_id: &str,
        signing: &p256::ecdsa::SigningKey,
        counter: u32,
    ) -> Value {
        let n = self.nonce(s).await;
        let data = client_data(&n);
        let signed = assertion(signing, APP, counter, &data);
        let (status, body) = self
            .verify(s, &assertion_body(&n, key_id, &signed, &data))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn nonce(&self, s: &Session) -> String {
        let response = self.probe(&s.access, &s.device_id).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        body["nonce"].as_str().expect("nonce").to_owned()
    }

    async fn verify(&self, s: &Session, body: &Value) -> (StatusCode, Value) {
        let response = self.attestation_verify(s, body).await;
        let status = response.status();
        (status, response.json().await.expect("json"))
    }

    /// Play's answer for `s` on a fresh nonce, with the verdict's value at
    /// `pointer` replaced by `value`.
    async fn play_fresh(&self, s: &Session, pointer: &str, value: Value) -> (StatusCode, Value) {
        let nonce = self.nonce(s).await;
        self.play(s, &nonce, |v| with(v, pointer, value)).await
    }

    /// Play's answer for `s` asked with `nonce`, altered by `tamper`.
    async fn play(
        &self,
        s: &Session,
        nonce: &str,
        tamper: impl FnOnce(Value) -> Value,
    ) -> (StatusCode, Value) {
        let now = chrono::Utc::now().timestamp_millis();
        let verdict = tamper(play_verdict(PACKAGE, nonce, now - 2_000, CERT));
        let token = self.play.token(&verdict);
        self.verify(
            s,
            &json!({"nonce": nonce, "provider": "play_integrity", "token": token}),
        )
        .await
    }
}

/// Today ± 30 days, as rcgen dates: a credential certificate valid now.
fn valid_now() -> ((i32, u8, u8), (i32, u8, u8)) {
    let day = |d: chrono::DateTime<chrono::Utc>| (d.year(), d.month() as u8, d.day() as u8);
    let now = chrono::Utc::now();
    (
        day(now - chrono::Duration::days(30)),
        day(now + chrono::Duration::days(30)),
    )
}

fn knobs(challenge: &str) -> Knobs {
    let (not_before, not_after) = valid_now();
    Knobs {
        challenge: challenge.to_owned(),
        not_before,
        not_after,
        ..Knobs::default()
    }
}

/// A first-contact App Attest request.
fn attestation_body(nonce: &str, built: &Built) -> Value {
    json!({
        "nonce": nonce, "provider": "app_attest",
        "key_id": built.key_id, "token": STANDARD.encode(&built.object),
    })
}

/// A later-contact App Attest request.
fn assertion_body(nonce: &str, key_id: &str, assertion: &[u8], data: &[u8]) -> Value {
    json!({
        "nonce": nonce, "provider": "app_attest", "key_id": key_id,
        "token": STANDARD.encode(assertion), "client_data": STANDARD.encode(data),
    })
}

fn verdict_of(body: &Value) -> (&str, &str, Vec<&str>) {
    (
        body["verdict"].as_str().unwrap_or_default(),
        body["state"].as_str().unwrap_or_default(),
        body["reasons"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default(),
    )
}

async fn play_integrity_verdicts_are_graded_and_every_tampering_has_its_reason(backend: Backend) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(86_400)).await else {
        return;
    };

    // A strong device: the grade reaches the response, the trust report and
    // the admin view.
    let strong = lab.device(1).await;
    let n = lab.nonce(&strong).await;
    let (status, body) = lab.play(&strong, &n, |v| v).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(verdict_of(&body), ("verified", "strong", vec![]));
    assert_eq!(body["attestation_score"], 1.0);
    let report = lab.trust_score_json(&strong).await;
    assert_eq!(
        (&report["attestation"], &report["attestation_state"]),
        (&json!("verified"), &json!("strong"))
    );
    let view = lab.admin_device(&strong.device_id).await;
    assert_eq!(view["attestation_state"], "strong");
    assert_eq!(view["attestation_provider"], "play_integrity");
    assert!(view["attested_at"].is_string(), "{view}");

    // Weaker devices grade lower.
    for (n_device, labels, state, score) in [
        (
            2,
            json!(["MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY"]),
            "device",
            0.8,
        ),
        (3, json!(["MEETS_BASIC_INTEGRITY"]), "basic", 0.5),
    ] {
        let s = lab.device(n_device).await;
        let (status, body) = lab
            .play_fresh(&s, "/deviceIntegrity/deviceRecognitionVerdict", labels)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(verdict_of(&body), ("verified", state, vec![]));
        assert_eq!(body["attestation_score"], score);
    }

    // Each tampering, on a device of its own, fails with its own reason.
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "nonce_mismatch",
            Box::new(|v| with(v, "/requestDetails/nonce", json!("a-nonce-we-never-issued"))),
        ),
        (
            "token_expired",
            Box::new(|v| {
                let old = chrono::Utc::now().timestamp_millis() - 600_000;
                with(v, "/requestDetails/timestampMillis", json!(old.to_string()))
            }),
        ),
        (
            "package_mismatch",
            Box::new(|v| {
                with(
                    v,
                    "/requestDetails/requestPackageName",
                    json!("com.example.repackaged"),
                )
            }),
        ),
        (
            "certificate_mismatch",
            Box::new(|v| {
                with(
                    v,
                    "/appIntegrity/certificateSha256Digest",
                    json!([cert_digest([9; 32])]),
                )
            }),
        ),
        (
            "app_not_recognized",
            Box::new(|v| {
                with(
                    v,
                    "/appIntegrity/appRecognitionVerdict",
                    json!("UNRECOGNIZED_VERSION"),
                )
            }),
        ),
        (
            "device_integrity_failed",
            Box::new(|v| with(v, "/deviceIntegrity/deviceRecognitionVerdict", json!([]))),
        ),
        (
            "app_unlicensed",
            Box::new(|v| {
                with(
                    v,
                    "/accountDetails/appLicensingVerdict",
                    json!("UNLICENSED"),
                )
            }),
        ),
    ];
    for (i, (reason, tamper)) in cases.into_iter().enumerate() {
        let s = lab.device(10 + i as u32).await;
        let n = lab.nonce(&s).await;
        let (status, body) = lab.play(&s, &n, tamper).await;
        assert_eq!(status, StatusCode::OK, "{reason}: {body}");
        assert_eq!(verdict_of(&body), ("failed", "failed", vec![reason]));
        assert_eq!(body["attestation_score"], 0.0);
        let view = lab.admin_device(&s.device_id).await;
        assert_eq!(
            (
                &view["attestation_state"],
                &view["attestation_failures"],
                &view["status"]
            ),
            (&json!("failed"), &json!(1), &json!("active")),
            "{reason}: one soft failure does not quarantine"
        );
    }

    // Another device's nonce is a replay, before the token is even opened.
    let a = lab.device(30).await;
    let b = lab.device(31).await;
    let _own = lab.nonce(&a).await;
    let foreign = lab.nonce(&b).await;
    let (status, body) = lab.play(&a, &foreign, |v| v).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("nonce_replay"))
    );

    // A token signed by another key.
    let s = lab.device(32).await;
    let n = lab.nonce(&s).await;
    let forger = PlayKeys {
        aes: lab.play.aes,
        signing: p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng),
    };
    let token = forger.token(&play_verdict(
        PACKAGE,
        &n,
        chrono::Utc::now().timestamp_millis(),
        CERT,
    ));
    let (status, body) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "play_integrity", "token": token}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        verdict_of(&body),
        ("failed", "failed", vec!["signature_invalid"])
    );

    // A malformed token: 422, counted as a failure.
    let s = lab.device(33).await;
    let n = lab.nonce(&s).await;
    let token = lab.play.token(&play_verdict(PACKAGE, &n, 0, CERT));
    for bad in [&token[..token.len() / 2], "a.b.c.d.e"] {
        let n = lab.nonce(&s).await;
        let (status, body) = lab
            .verify(
                &s,
                &json!({"nonce": n, "provider": "play_integrity", "token": bad}),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("attestation_invalid")
            ),
            "{body}"
        );
    }
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(
        (&view["attestation_failures"], &view["status"]),
        (&json!(2), &json!("active"))
    );
    // The third failure quarantines (the firewall's rule on failed
    // attestations may answer 429 for it).
    let n = lab.nonce(&s).await;
    let (status, _) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "play_integrity", "token": "not a token"}),
        )
        .await;
    assert!(
        matches!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::TOO_MANY_REQUESTS
        ),
        "{status}"
    );
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(view["attestation_failures"], 3);
    assert_eq!(view["status"], "quarantined", "three failures quarantine");

    // An emulator is a hard fact: quarantined at the first verdict.
    let s = lab.device(34).await;
    let (status, body) = lab
        .play_fresh(
            &s,
            "/deviceIntegrity/deviceRecognitionVerdict",
            json!(["MEETS_VIRTUAL_INTEGRITY"]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(verdict_of(&body).2, vec!["emulator_detected"]);
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(view["status"], "quarantined", "{view}");
    assert_eq!(view["holds"][0]["source"], "attestation");
    assert_eq!(
        lab.probe(&s.access, &s.device_id).await.status(),
        StatusCode::FORBIDDEN
    );

    // Each verdict left an audit row with its reasons.
    let audit = lab
        .admin_json(&format!("/v1/audit/logs?device_id={}", s.device_id))
        .await;
    let rows = audit["items"].as_array().expect("items");
    assert!(
        rows.iter()
            .any(|r| r["decision_reason"] == "emulator_detected"
                && r["action_taken"] == "IMMEDIATE_QUARANTINE"),
        "{audit}"
    );
}

async fn app_attest_keys_are_attested_then_asserted_with_a_rising_counter(backend: Backend) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(86_400)).await else {
        return;
    };
    let attest = attestation_body;
    let assert_body = assertion_body;

    // First contact: the attestation registers the key.
    let s = lab.device(1).await;
    let n = lab.nonce(&s).await;
    let built = build(&lab.chain, &knobs(&n));
    let (status, body) = lab.verify(&s, &attest(&n, &built)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(verdict_of(&body), ("verified", "strong", vec![]));
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(
        (&view["attestation_state"], &view["attestation_provider"]),
        (&json!("strong"), &json!("app_attest"))
    );

    // Later contacts: assertions with the stored key and a rising counter.
    for counter in [1, 2, 7] {
        let n = lab.nonce(&s).await;
        let data = client_data(&n);
        let signed = assertion(&built.signing, APP, counter, &data);
        let (status, body) = lab
            .verify(&s, &assert_body(&n, &built.key_id, &signed, &data))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            verdict_of(&body),
            ("verified", "strong", vec![]),
            "counter {counter}"
        );
    }
    // The same assertion again, on a fresh nonce: its client data holds the
    // old nonce and its counter did not move. A replay: quarantined at once.
    let old_nonce = lab.nonce(&s).await;
    let old_data = client_data(&old_nonce);
    let old = assertion(&built.signing, APP, 8, &old_data);
    let (_, body) = lab
        .verify(&s, &assert_body(&old_nonce, &built.key_id, &old, &old_data))
        .await;
    assert_eq!(verdict_of(&body).0, "verified");
    let n = lab.nonce(&s).await;
    let (status, body) = lab
        .verify(&s, &assert_body(&n, &built.key_id, &old, &old_data))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        verdict_of(&body),
        ("failed", "failed", vec!["nonce_mismatch", "counter_replay"])
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["status"],
        "quarantined"
    );

    // A freshly signed assertion whose counter does not move forward.
    let (s, second) = lab.attested(2).await;
    let body = lab
        .assert_once(&s, &second.key_id, &second.signing, 0)
        .await;
    assert_eq!(
        verdict_of(&body),
        ("failed", "failed", vec!["counter_replay"])
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["status"],
        "quarantined"
    );

    // An assertion signed by another key than the attested one.
    let (s, third) = lab.attested(3).await;
    let body = lab.assert_once(&s, &third.key_id, &second.signing, 1).await;
    assert_eq!(
        verdict_of(&body),
        ("failed", "failed", vec!["signature_invalid"])
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["status"],
        "quarantined"
    );

    // Attestation tamperings, each on a device of its own.
    let cases: Vec<(&str, MakeKnobs)> = vec![
        (
            "nonce_mismatch",
            Box::new(|_| knobs("a nonce issued to someone else")),
        ),
        (
            "app_id_mismatch",
            Box::new(|n| Knobs {
                app_id: "ABCDE12345.com.example.repackaged",
                ..knobs(n)
            }),
        ),
        (
            "counter_not_zero",
            Box::new(|n| Knobs {
                counter: 3,
                ..knobs(n)
            }),
        ),
        (
            "environment_mismatch",
            Box::new(|n| Knobs {
                aaguid: crate::attestation_fixtures::DEVELOPMENT_AAGUID,
                ..knobs(n)
            }),
        ),
        (
            "certificate_expired",
            Box::new(|n| Knobs {
                not_before: (2025, 1, 1),
                not_after: (2025, 2, 1),
                ..knobs(n)
            }),
        ),
    ];
    for (i, (reason, make)) in cases.into_iter().enumerate() {
        let s = lab.device(10 + i as u32).await;
        let n = lab.nonce(&s).await;
        let built = build(&lab.chain, &make(&n));
        let (status, body) = lab.verify(&s, &attest(&n, &built)).await;
        assert_eq!(status, StatusCode::OK, "{reason}: {body}");
        assert_eq!(verdict_of(&body), ("failed", "failed", vec![reason]));
        assert_eq!(
            lab.admin_device(&s.device_id).await["status"],
            "active",
            "{reason}"
        );
    }

    // A chain from another root is a hard fact.
    let s = lab.device(20).await;
    let n = lab.nonce(&s).await;
    let foreign = build(&chain(), &knobs(&n));
    let (_, body) = lab.verify(&s, &attest(&n, &foreign)).await;
    assert_eq!(
        verdict_of(&body),
        ("failed", "failed", vec!["chain_invalid"])
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["status"],
        "quarantined"
    );

    // So is a key that is not the one named.
    let s = lab.device(21).await;
    let n = lab.nonce(&s).await;
    let mut other = build(&lab.chain, &knobs(&n));
    other.key_id = STANDARD.encode([5u8; 32]);
    let (_, body) = lab.verify(&s, &attest(&n, &other)).await;
    assert_eq!(
        verdict_of(&body).2,
        vec!["key_id_mismatch", "credential_id_mismatch"]
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["status"],
        "quarantined"
    );

    // An assertion for a key this device never attested.
    let s = lab.device(22).await;
    let n = lab.nonce(&s).await;
    let data = client_data(&n);
    let signed = assertion(&built.signing, APP, 1, &data);
    let (_, body) = lab
        .verify(&s, &assert_body(&n, &built.key_id, &signed, &data))
        .await;
    assert_eq!(verdict_of(&body), ("failed", "failed", vec!["unknown_key"]));

    // Truncated CBOR and bad base64: 422, counted.
    let s = lab.device(23).await;
    let good = build(&lab.chain, &knobs("x"));
    for token in [
        STANDARD.encode(&good.object[..good.object.len() / 3]),
        "%%% not base64".to_owned(),
    ] {
        let n = lab.nonce(&s).await;
        let (status, body) = lab
            .verify(
                &s,
                &json!({"nonce": n, "provider": "app_attest", "key_id": good.key_id, "token": token}),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("attestation_invalid")
            ),
            "{body}"
        );
    }
    assert_eq!(
        lab.admin_device(&s.device_id).await["attestation_failures"],
        2
    );

    // Fields that do not belong: validation errors, the nonce kept.
    let n = lab.nonce(&s).await;
    let (status, body) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "app_attest", "token": "AA"}),
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("key_id"))
    );
    let (status, body) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "play_integrity", "token": "AA", "client_data": "AA"}),
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("client_data"))
    );
}

async fn a_controlling_app_reported_by_play_locks_a_calm_device(backend: Backend) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(86_400)).await else {
        return;
    };
    let s = lab.device(1).await;
    let mut socket = lab.kill_switch(&s).await;
    assert_eq!(next_json(&mut socket).await["type"], "state");
    let calm = session(Class::OnTable, 41, 4);
    for hb in &calm.heartbeats[..2] {
        assert_eq!(
            lab.heartbeat(&s, &heartbeat_body(hb)).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            lab.trust_score_json(&s).await["heartbeats"] == 2
        })
        .await
    );
    let report = lab.trust_score_json(&s).await;
    assert_eq!(
        (&report["level"], &report["locked"]),
        (&json!("trusted"), &json!(false))
    );

    // Play reports an app that controls the device: locked at once.
    let (status, body) = lab
        .play_fresh(
            &s,
            "/environmentDetails/appAccessRiskVerdict/appsDetected",
            json!(["KNOWN_INSTALLED", "UNKNOWN_CONTROLLING"]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        verdict_of(&body),
        ("verified", "strong", vec!["controlling_app_detected"])
    );
    let command = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = next_json(&mut socket).await;
            if message["type"] == "command" {
                return message;
            }
        }
    })
    .await
    .expect("a command in time");
    assert_eq!(command["action"], "CRITICAL_LOCK", "{command}");
    assert_eq!(command["reason"], "controlling_app_detected");
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(view["status"], "locked", "{view}");
    assert_eq!(
        view["attestation_evidence"],
        json!(["controlling_app_detected"])
    );
    assert_eq!(view["holds"][0]["reason"], "controlling_app_detected");

    // An operator unlocks before the app attests clean: the next heartbeat,
    // however calm, is judged with the evidence and locks it again.
    let r = lab
        .admin(
            reqwest::Method::POST,
            &format!("/v1/admin/devices/{}/unlock", s.device_id),
            Some(&json!({"all": true})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        lab.heartbeat(&s, &heartbeat_body(&calm.heartbeats[2]))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let view = lab.admin_device(&s.device_id).await;
            view["status"] == "locked"
                && view["trust"]["reasons"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!("controlling_app_detected")))
        })
        .await,
        "{}",
        lab.admin_device(&s.device_id).await
    );
}

async fn a_request_failure_never_erases_a_verdict_and_other_hardware_starts_unknown(
    backend: Backend,
) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(86_400)).await else {
        return;
    };
    let s = lab.device(1).await;
    let n = lab.nonce(&s).await;
    let (_, body) = lab
        .play(&s, &n, |v| {
            with(
                v,
                "/environmentDetails/appAccessRiskVerdict/appsDetected",
                json!(["UNKNOWN_CAPTURING"]),
            )
        })
        .await;
    assert_eq!(
        verdict_of(&body),
        ("verified", "strong", vec!["capturing_app_detected"])
    );

    // A retry with the spent nonce, then an oversized artefact: both count,
    // neither erases the verdict or its evidence.
    let (status, body) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "play_integrity", "token": "x"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("nonce_replay"))
    );
    let n = lab.nonce(&s).await;
    let (status, body) = lab
        .verify(
            &s,
            &json!({"nonce": n, "provider": "play_integrity", "token": "A".repeat(17 * 1024)}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("attestation_invalid")
        )
    );
    let view = lab.admin_device(&s.device_id).await;
    assert_eq!(
        (&view["attestation_state"], &view["attestation_failures"]),
        (&json!("strong"), &json!(2)),
        "{view}"
    );
    assert_eq!(
        view["attestation_evidence"],
        json!(["capturing_app_detected"])
    );

    // The same device id signed in from other hardware starts `unknown`.
    let r = lab
        .post_json(
            "/v1/auth/login",
            &json!({"email": "owner1@example.com", "password": crate::client::PASSWORD,
                "device_id": s.device_id, "device_fingerprint": "fp-another-phone",
                "platform": "android"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let other = Session::from_response(r, &s.device_id).await;
    assert_eq!(
        lab.trust_score_json(&other).await["attestation_state"],
        "unknown"
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["attestation_provider"],
        json!(null)
    );
}

async fn a_verified_state_decays_to_unknown(backend: Backend) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(3)).await else {
        return;
    };
    let s = lab.device(1).await;
    let n = lab.nonce(&s).await;
    let (status, body) = lab.play(&s, &n, |v| v).await;
    assert_eq!((status, verdict_of(&body).1), (StatusCode::OK, "strong"));
    assert_eq!(
        lab.trust_score_json(&s).await["attestation_state"],
        "strong"
    );
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let report = lab.trust_score_json(&s).await;
    assert_eq!(
        (&report["attestation"], &report["attestation_state"]),
        (&json!("unknown"), &json!("unknown"))
    );
    assert_eq!(
        lab.admin_device(&s.device_id).await["attestation_state"],
        "unknown"
    );
    // Attesting again restores it.
    let n = lab.nonce(&s).await;
    let (_, body) = lab.play(&s, &n, |v| v).await;
    assert_eq!(verdict_of(&body).1, "strong");
    assert_eq!(
        lab.trust_score_json(&s).await["attestation_state"],
        "strong"
    );
}

async fn nobody_attests_for_a_device_they_do_not_hold(backend: Backend) {
    let Some(lab) = Lab::start(backend, Duration::from_secs(86_400)).await else {
        return;
    };
    let victim = lab.device(1).await;
    let attacker = lab.device(2).await;
    let n = lab.nonce(&victim).await;
    let token = lab.play.token(&play_verdict(
        PACKAGE,
        &n,
        chrono::Utc::now().timestamp_millis(),
        CERT,
    ));
    let body = json!({"nonce": n, "provider": "play_integrity", "token": token});
    let code = |r: reqwest::Response| async move {
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        (status, body["code"].as_str().unwrap_or_default().to_owned())
    };
    // No credentials at all.
    let r = lab
        .client
        .post(lab.url("/v1/attestation/verify"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );
    // The attacker's own token, claiming the victim's device.
    let r = lab
        .client
        .post(lab.url("/v1/attestation/verify"))
        .bearer_auth(&attacker.access)
        .header("x-device-id", &victim.device_id)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "device_mismatch".into())
    );
    // The attacker's own device, with the victim's nonce: a replay, counted
    // against the attacker, never graded for anyone.
    let (status, reply) = lab.verify(&attacker, &body).await;
    assert_eq!(
        (status, reply["code"].as_str()),
        (StatusCode::CONFLICT, Some("nonce_replay"))
    );
    let view = lab.admin_device(&attacker.device_id).await;
    assert_eq!(
        (&view["attestation_failures"], &view["attestation_state"]),
        (&json!(1), &json!("unknown"))
    );
    // None of it spent the victim's nonce or touched the victim.
    let (status, reply) = lab.verify(&victim, &body).await;
    assert_eq!((status, verdict_of(&reply).1), (StatusCode::OK, "strong"));
    assert_eq!(
        lab.admin_device(&victim.device_id).await["attestation_failures"],
        0
    );
}
