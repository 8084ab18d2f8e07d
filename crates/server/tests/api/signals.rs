//! Signals end to end on real servers: ingestion limits and replays, the
//! scoring workers (in-process on the embedded default, a worker pool on
//! Postgres + Redis), engine locks reaching the device, threat
//! intelligence, cross-device replays and the circuit breaker.

use std::time::Duration;

use blockremote::{
    app::start_workers,
    signals::ingest::{encode_job, JobEncoding},
    state::keys,
};
use blockremote_engine::{
    heartbeat::Heartbeat,
    sim::{session, Class},
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{
    client::Session,
    helpers::{
        assert_no_entity_labels, eventually, heartbeat_body, sample, spawn_app_on, spawn_app_with,
        Backend, StateBackend, TestApp, WithWorkers,
    },
};

crate::on_both_backends!(
    scored_heartbeats_show_in_the_trust_report,
    genuine_use_is_never_locked,
    blacklisted_apps_lock_at_once_and_intel_can_be_removed,
    the_breaker_scores_inline_when_the_queue_is_behind,
    the_breaker_watches_the_workers_scoring_p95_and_recovers_by_itself,
    a_device_scored_elsewhere_is_scored_once_its_lock_is_free,
    heartbeats_spend_the_plan_bucket_and_a_refused_one_keeps_its_seq,
    a_queued_heartbeat_of_an_unknown_device_is_dropped_not_retried,
    the_simulator_locks_every_attack_and_no_genuine_session,
    a_simulation_rerun_is_refused_or_flagged_and_cleanup_removes_its_users,
    shared_state_that_loses_its_data_reopens_no_replay_window,
    a_lost_engine_state_comes_back_from_its_snapshot,
);

// The stories of ingestion, scoring and delivery, on every Redis topology too.
crate::on_every_state_backend!(
    heartbeats_are_validated_and_replays_refused,
    remote_control_is_locked_and_the_device_told,
    a_window_replayed_from_another_device_locks_it,
);

const ADMIN: &str = "signals-admin-key-0123456789abcdef0123";

/// A server, plus a worker pool when production runs none in `serve`.
async fn app(backend: impl Into<StateBackend>) -> Option<WithWorkers> {
    let app = spawn_app_on(backend.into(), |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
    })
    .await?;
    Some(WithWorkers::start(app).await)
}

/// True once the device is locked and the report of the heartbeat that
/// locked it is stored (the lock is applied just before the report).
async fn locked(app: &TestApp, id: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        let view = app.admin_device(id).await;
        view["status"] == "locked" && view["trust"]["heartbeats"].as_u64() >= Some(1)
    })
    .await
}

async fn heartbeats_are_validated_and_replays_refused(backend: StateBackend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("ingest@example.com", "device_sig_01").await;
    let s = session(Class::HeldInHand, 1, 4);
    let first = heartbeat_body(&s.heartbeats[0]);
    let r = app.heartbeat(&d, &first).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().contains_key("ratelimit-remaining"));
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": true, "seq": 1})
    );

    // The same seq again: a replay, recorded not scored, naming the last
    // accepted seq so the client knows where to continue.
    let r = app.heartbeat(&d, &first).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let problem = r.json::<Value>().await.expect("json");
    assert_eq!(problem["code"], "replay");
    assert_eq!(problem["last_seq"], 1);
    // After seq 3, the older seq 1 again: the problem names 3.
    let third = heartbeat_body(&s.heartbeats[2]);
    assert_eq!(
        app.heartbeat(&d, &third).await.status(),
        StatusCode::ACCEPTED
    );
    let r = app.heartbeat(&d, &first).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let problem = r.json::<Value>().await.expect("json");
    assert_eq!(
        (problem["code"].as_str(), problem["last_seq"].as_u64()),
        (Some("replay"), Some(3))
    );
    let replays = app
        .state
        .store
        .events_of_type("signals:replay", 10)
        .await
        .expect("events");
    assert_eq!(replays.len(), 2);

    let field_of = |r: Value| r["field"].as_str().unwrap_or_default().to_owned();
    let mut bad = heartbeat_body(&s.heartbeats[3]);
    bad["accelerometer"][1][0] = json!(-5);
    let r = app.heartbeat(&d, &bad).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_of(r.json().await.expect("json")), "accelerometer[1]");
    let mut bad = heartbeat_body(&s.heartbeats[3]);
    bad["gyroscope"] = json!((0..257)
        .map(|i| json!([i, 0.0, 0.0, 0.0]))
        .collect::<Vec<_>>());
    let r = app.heartbeat(&d, &bad).await;
    assert_eq!(field_of(r.json().await.expect("json")), "gyroscope");
    let mut bad = heartbeat_body(&s.heartbeats[3]);
    bad["context"]["rooted"] = json!(true);
    let r = app.heartbeat(&d, &bad).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(field_of(r.json().await.expect("json")).contains("rooted"));
    let mut bad = heartbeat_body(&s.heartbeats[3]);
    bad["accelerometer"][0][1] = json!(1e300);
    assert_eq!(
        app.heartbeat(&d, &bad).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Not JSON.
    let r = app
        .as_device(Method::POST, "/v1/signals/heartbeat", &d)
        .body("seq=2")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A refused body does not spend its seq.
    assert_eq!(
        app.heartbeat(&d, &heartbeat_body(&s.heartbeats[3]))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    // A new session for the device (a reinstall) starts seq afresh.
    let r = app.login("ingest@example.com", &d.device_id).await;
    assert_eq!(r.status(), StatusCode::OK);
    let fresh = Session::from_response(r, &d.device_id).await;
    let r = app.heartbeat(&fresh, &first).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "seq 1 again after a new session"
    );
    // seq beyond 2^53 is refused (Lua and JSON numbers are exact up to there).
    let mut huge = heartbeat_body(&s.heartbeats[2]);
    huge["seq"] = json!(u64::MAX);
    let r = app.heartbeat(&fresh, &huge).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

async fn scored_heartbeats_show_in_the_trust_report(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("report@example.com", "device_sig_02").await;
    let before = app.trust_score_json(&d).await;
    assert_eq!(before["heartbeats"], 0);
    assert_eq!(before["trust_score"], 100);
    assert_eq!(before["device_id"], d.device_id.as_str());
    let s = session(Class::OnTable, 2, 4);
    for hb in &s.heartbeats {
        assert_eq!(
            app.heartbeat(&d, &heartbeat_body(hb)).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.trust_score_json(&d).await["heartbeats"] == 4
        })
        .await,
        "all four scored (possibly out of order: workers handle a batch concurrently)"
    );
    let report = app.trust_score_json(&d).await;
    assert_eq!(report["last_seq"], 4);
    assert_eq!(report["level"], "trusted");
    assert_eq!(report["locked"], false);
    assert_eq!(report["degraded"], false);
    assert!(
        report["global_risk"].as_f64().expect("risk") < 0.3,
        "{report}"
    );
    for key in [
        "accelerometer",
        "gyroscope",
        "touch_entropy",
        "network_spike",
    ] {
        assert!(report["components"][key].is_number(), "{key}");
    }
    assert_eq!(
        app.admin_device(&d.device_id).await["trust"]["heartbeats"],
        4
    );
}

async fn remote_control_is_locked_and_the_device_told(backend: StateBackend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("victim@example.com", "device_sig_03").await;
    let mut socket = app.kill_switch(&d).await;
    let s = session(Class::RemoteControlSubtle, 3, 20);
    let start = s.attack_start.expect("attack");
    let mut sent = 0;
    for hb in &s.heartbeats {
        let r = app.heartbeat(&d, &heartbeat_body(hb)).await;
        if r.status() == StatusCode::FORBIDDEN {
            break; // locked: the device's API calls are refused
        }
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        sent += 1;
        // Let each be scored before the next, as a phone's 2 s cadence would.
        let seq = hb.seq;
        assert!(
            eventually(Duration::from_secs(5), || async {
                let r = app.device_get("/v1/security/trust-score", &d).await;
                // 403 device_locked: the engine already acted.
                r.status() == StatusCode::FORBIDDEN
                    || r.json::<Value>().await.expect("json")["last_seq"].as_u64() >= Some(seq)
            })
            .await
        );
    }
    assert!(
        locked(&app, &d.device_id).await,
        "locked after {sent} heartbeats"
    );
    assert!(
        sent <= start + 5,
        "within 5 heartbeats of the attack: sent {sent}, attack from {start}"
    );
    // The engine's lock is counted by origin; on Redis, each command by name.
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"killswitch_commands_issued_total{action="CRITICAL_LOCK",origin="engine"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    if backend != StateBackend::InProcess {
        let named_ok = metrics.lines().any(|l| {
            l.starts_with("redis_command_duration_seconds_count{")
                && l.contains(r#"outcome="ok""#)
                && !l.contains(r#"op="other""#)
        });
        assert!(named_ok, "{metrics}");
    }
    assert_no_entity_labels(&metrics, &[&d.device_id, &d.user_id]);
    // The socket got state, then the engine's command.
    let mut command = Value::Null;
    for _ in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(3), socket.next())
            .await
            .expect("message")
            .expect("open")
            .expect("ok");
        if let Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).expect("json");
            if v["type"] == "command" {
                command = v;
                break;
            }
        }
    }
    assert!(
        ["FORCE_OVERLAY", "CRITICAL_LOCK"].contains(&command["action"].as_str().unwrap_or("")),
        "{command}"
    );
    // Audited with the engine's verdict.
    let user = app
        .state
        .store
        .device(&d.device_id)
        .await
        .expect("device")
        .expect("some")
        .user_id;
    // The command goes out first (it is the kill-switch); the audit row
    // follows it within moments.
    let audited = || async {
        app.state
            .store
            .audit_for_user(user, 20)
            .await
            .expect("audit")
            .into_iter()
            .find(|r| r.action_taken == command["action"])
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            audited().await.is_some()
        })
        .await,
        "audit row"
    );
    let row = audited().await.expect("audit row");
    assert!(row.threat_score.expect("score") > 50.0);
    assert!(
        row.decision_reason
            .as_deref()
            .unwrap_or("")
            .contains("touch_without_motion"),
        "{row:?}"
    );
    assert_eq!(row.attestation_state.as_deref(), Some("unknown"));
    assert_eq!(format!("{:?}", row.source), "Worker");
}

async fn genuine_use_is_never_locked(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    for (i, class) in [Class::HeldInHand, Class::Walking].into_iter().enumerate() {
        let d = app
            .register(
                &format!("owner{i}@example.com"),
                &format!("device_sig_1{i}"),
            )
            .await;
        let s = session(class, 40 + i as u64, 12);
        for hb in &s.heartbeats {
            assert_eq!(
                app.heartbeat(&d, &heartbeat_body(hb)).await.status(),
                StatusCode::ACCEPTED
            );
        }
        assert!(
            eventually(Duration::from_secs(10), || async {
                app.trust_score_json(&d).await["heartbeats"] == 12
            })
            .await
        );
        assert_eq!(app.admin_device(&d.device_id).await["status"], "active");
    }
}

async fn blacklisted_apps_lock_at_once_and_intel_can_be_removed(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let intel = |body: Value| {
        let app = &app;
        async move {
            app.admin(Method::POST, "/v1/admin/threat-intel", Some(&body))
                .await
        }
    };
    let r = intel(json!({"add": {"app_hashes": ["9F2C1E0B7A6D5C4B"], "domains": ["evil.example"], "ips": ["203.0.113.0/24"]}})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["changed"], 3);
    let r = intel(json!({"add": {"domains": ["not a domain"]}})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json::<Value>().await.expect("json")["field"],
        "add.domains[0]"
    );

    let d = app.register("malware@example.com", "device_sig_20").await;
    let mut hb = session(Class::HeldInHand, 5, 1).heartbeats.remove(0);
    hb.context.app_hashes = vec!["9f2c1e0b7a6d5c4b".into()];
    assert_eq!(
        app.heartbeat(&d, &heartbeat_body(&hb)).await.status(),
        StatusCode::ACCEPTED
    );
    assert!(
        locked(&app, &d.device_id).await,
        "a blacklisted app locks on the first heartbeat"
    );
    let view = app.admin_device(&d.device_id).await;
    assert_eq!(view["last_command"]["action"], "CRITICAL_LOCK");
    assert_eq!(view["trust"]["trust_score"], 0);
    assert_eq!(view["trust"]["reasons"][0], "blacklisted_app");

    // A subdomain of a listed domain hits too.
    let d2 = app.register("dns@example.com", "device_sig_21").await;
    let mut hb = session(Class::HeldInHand, 6, 1).heartbeats.remove(0);
    hb.context.dns = vec!["cdn.evil.example".into()];
    app.heartbeat(&d2, &heartbeat_body(&hb)).await;
    assert!(locked(&app, &d2.device_id).await);

    // Removed entries stop hitting.
    let r =
        intel(json!({"remove": {"app_hashes": ["9f2c1e0b7a6d5c4b"], "domains": ["evil.example"]}}))
            .await;
    assert_eq!(r.json::<Value>().await.expect("json")["changed"], 2);
    let d3 = app.register("clean@example.com", "device_sig_22").await;
    let mut hb = session(Class::OnTable, 7, 1).heartbeats.remove(0);
    hb.context.app_hashes = vec!["9f2c1e0b7a6d5c4b".into()];
    app.heartbeat(&d3, &heartbeat_body(&hb)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.trust_score_json(&d3).await["heartbeats"] == 1
        })
        .await
    );
    assert_eq!(app.admin_device(&d3.device_id).await["status"], "active");
}

async fn a_window_replayed_from_another_device_locks_it(backend: StateBackend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let a = app.register("original@example.com", "device_sig_30").await;
    let b = app.register("copycat@example.com", "device_sig_31").await;
    let hb = session(Class::HeldInHand, 8, 1).heartbeats.remove(0);
    app.heartbeat(&a, &heartbeat_body(&hb)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.trust_score_json(&a).await["heartbeats"] == 1
        })
        .await
    );
    app.heartbeat(&b, &heartbeat_body(&hb)).await;
    assert!(locked(&app, &b.device_id).await, "the copy is a replay");
    assert_eq!(
        app.admin_device(&b.device_id).await["trust"]["reasons"][0],
        "replayed_window"
    );
    assert_eq!(
        app.admin_device(&a.device_id).await["status"],
        "active",
        "the original is not blamed"
    );
}

async fn the_breaker_scores_inline_when_the_queue_is_behind(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("breaker@example.com", "device_sig_40").await;
    let s = session(Class::OnTable, 9, 2);
    app.state.breaker.trip();
    let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[0])).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": true, "seq": 1, "degraded": true})
    );
    // Scored before the answer: the report is there at once, marked degraded.
    let report = app.trust_score_json(&d).await;
    assert_eq!(
        (report["heartbeats"].as_u64(), report["degraded"].as_bool()),
        (Some(1), Some(true))
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("signals_degraded_heartbeats_total 1"),
        "{metrics}"
    );
    // With an empty queue the watcher recovers by itself, once the workers
    // report a second after the trip.
    assert!(
        breaker_is(&app, false, Duration::from_secs(8)).await,
        "recovered"
    );
    assert!(
        tripped_once_for(&app, "queue_full").await,
        "the trip is counted with its reason"
    );
    let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[1])).await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": true, "seq": 2})
    );
}

/// Waits up to `within` for the breaker to be `degraded` (or not).
async fn breaker_is(app: &TestApp, degraded: bool, within: Duration) -> bool {
    eventually(within, || async {
        app.state.breaker.degraded() == degraded
    })
    .await
}

/// Sends the device's first heartbeat while degraded: answered
/// `degraded: true` and scored before the answer.
async fn first_is_scored_inline(app: &TestApp, d: &Session, hb: &Heartbeat) {
    let r = app.heartbeat(d, &heartbeat_body(hb)).await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": true, "seq": 1, "degraded": true})
    );
    assert_eq!(
        app.trust_score_json(d).await["heartbeats"],
        1,
        "scored inline"
    );
}

/// Sends the device's second heartbeat once recovered: queued (no
/// `degraded`), then scored by the workers.
async fn second_is_queued_and_scored(app: &TestApp, d: &Session, hb: &Heartbeat) {
    let r = app.heartbeat(d, &heartbeat_body(hb)).await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": true, "seq": 2})
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.trust_score_json(d).await["heartbeats"] == 2
        })
        .await,
        "queued and scored by the workers"
    );
}

fn unix_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Whether the breaker has degraded exactly once, for `reason`.
async fn tripped_once_for(app: &TestApp, reason: &str) -> bool {
    app.metrics().await.contains(&format!(
        r#"signals_breaker_trips_total{{reason="{reason}"}} 1"#
    ))
}

async fn the_breaker_watches_the_workers_scoring_p95_and_recovers_by_itself(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app
        .register("slowworkers@example.com", "device_sig_42")
        .await;
    let s = session(Class::HeldInHand, 9, 4);
    // A worker elsewhere reports scoring p95s of 2 s for the seconds the
    // breaker reads next (as worker processes do, through shared state).
    let ttl = Duration::from_secs(60);
    let now = unix_second();
    for second in now - 2..now + 6 {
        let shared = &app.state.shared;
        shared
            .set_max(&keys::workers_p95(second), 2_000_000, ttl)
            .await
            .expect("p95");
        shared
            .incr(&keys::workers_scored(second), 100, ttl)
            .await
            .expect("scored");
    }
    assert!(
        breaker_is(&app, true, Duration::from_secs(6)).await,
        "a scoring p95 of 2 s degrades"
    );
    first_is_scored_inline(&app, &d, &s.heartbeats[0]).await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("signals_workers_scoring_p95_seconds 2.0")
            && metrics.contains("signals_degraded 1")
            && tripped_once_for(&app, "scoring_p95").await,
        "{metrics}"
    );
    // Those seconds pass; the real workers score far faster: it recovers.
    assert!(
        breaker_is(&app, false, Duration::from_secs(15)).await,
        "recovered"
    );
    second_is_queued_and_scored(&app, &d, &s.heartbeats[1]).await;
}

/// Production only: on the embedded default the workers live in `serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_no_worker_is_alive_heartbeats_are_scored_inline() {
    // A server without a worker pool, as a replica whose workers are down.
    let Some(app) = spawn_app_with(Backend::Production, |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
    })
    .await
    else {
        return;
    };
    let d = app.register("noworkers@example.com", "device_sig_43").await;
    let s = session(Class::OnTable, 9, 5);
    assert!(
        breaker_is(&app, true, Duration::from_secs(10)).await,
        "no worker reports: degraded after the start-up grace"
    );
    first_is_scored_inline(&app, &d, &s.heartbeats[0]).await;
    // A worker starts: its reports put scoring back on the queue.
    let stop = CancellationToken::new();
    let _pool = start_workers(&app.state, "late-worker", stop.clone())
        .await
        .expect("workers start");
    assert!(
        breaker_is(&app, false, Duration::from_secs(6)).await,
        "recovered once a worker reports"
    );
    second_is_queued_and_scored(&app, &d, &s.heartbeats[1]).await;
    assert!(
        tripped_once_for(&app, "no_workers").await,
        "the trip is counted with its reason"
    );
    // The worker's report of the second it scored the heartbeat counts it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let now = unix_second();
            for second in now - 4..=now {
                let scored = app
                    .state
                    .shared
                    .get(&keys::workers_scored(second))
                    .await
                    .expect("get");
                if scored.as_deref() == Some(&b"1"[..]) {
                    return true;
                }
            }
            false
        })
        .await,
        "the worker reported its heartbeat"
    );
    stop.cancel();
}

async fn a_device_scored_elsewhere_is_scored_once_its_lock_is_free(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let busy = app.register("busy@example.com", "device_sig_50").await;
    let free = app.register("free@example.com", "device_sig_51").await;
    // Another worker holds `busy`'s scoring lock for a moment: the batch
    // scores `free` at once and `busy` when the lock is gone.
    assert!(app
        .state
        .shared
        .set_nx(
            &blockremote::state::keys::scoring_lock(&busy.device_id),
            b"another-worker",
            Some(Duration::from_millis(700)),
        )
        .await
        .expect("lock"));
    // Each its own windows (the same window from two devices is a replay).
    let sessions = [
        session(Class::OnTable, 11, 3),
        session(Class::OnTable, 12, 3),
    ];
    for i in 0..3 {
        for (d, s) in [&busy, &free].into_iter().zip(&sessions) {
            let r = app.heartbeat(d, &heartbeat_body(&s.heartbeats[i])).await;
            assert_eq!(r.status(), StatusCode::ACCEPTED);
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.trust_score_json(&free).await["heartbeats"] == 3
                && app.trust_score_json(&busy).await["heartbeats"] == 3
        })
        .await,
        "both devices scored"
    );
    assert_eq!(app.trust_score_json(&busy).await["last_seq"], 3);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("signals_heartbeats_scored_total 6"),
        "each scored once: {metrics}"
    );
}

async fn heartbeats_spend_the_plan_bucket_and_a_refused_one_keeps_its_seq(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    // A trial user: 120 tokens, refilled at 2 per second.
    let d = app.register("bucket@example.com", "device_sig_60").await;
    let hb = heartbeat_body(&session(Class::OnTable, 13, 1).heartbeats[0]);
    let first = app.heartbeat(&d, &hb).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(first.headers()["ratelimit-limit"], "120");
    assert_eq!(first.headers()["ratelimit-remaining"], "119");
    // Refused bodies spend tokens too: drain the bucket with them (it
    // refills by one every 500 ms meanwhile).
    let mut invalid = hb.clone();
    invalid["seq"] = json!(-1);
    let drain = || async {
        for _ in 0..200 {
            let r = app.heartbeat(&d, &invalid).await;
            match r.status() {
                StatusCode::TOO_MANY_REQUESTS => {
                    assert!(r.headers().contains_key("retry-after"));
                    assert_eq!(r.headers()["ratelimit-remaining"], "0");
                    return;
                }
                status => assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY),
            }
        }
        panic!("the bucket never emptied");
    };
    // Empty: a valid heartbeat is refused too, and its seq is not spent. (If
    // a token came back between the two requests it is taken; try the next.)
    let mut refused_seq = None;
    for seq in 2..5 {
        drain().await;
        let mut next = hb.clone();
        next["seq"] = json!(seq);
        match app.heartbeat(&d, &next).await.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                refused_seq = Some((seq, next));
                break;
            }
            status => assert_eq!(status, StatusCode::ACCEPTED),
        }
    }
    let (seq, next) = refused_seq.expect("a heartbeat refused by the empty bucket");
    // A token later, the refused heartbeat is taken.
    let retried = eventually(Duration::from_secs(3), || async {
        app.heartbeat(&d, &next).await.status() == StatusCode::ACCEPTED
    })
    .await;
    assert!(retried, "seq {seq} accepted once the bucket refilled");
    assert!(
        eventually(Duration::from_secs(10), || async {
            // The admin view: the device's own bucket is empty.
            app.admin_device(&d.device_id).await["trust"]["last_seq"] == seq
        })
        .await,
        "the retried heartbeat scored"
    );
}

async fn a_queued_heartbeat_of_an_unknown_device_is_dropped_not_retried(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let known = app.register("known@example.com", "device_sig_60").await;
    let s = session(Class::OnTable, 14, 2);
    // A job whose device has no row, as after a database restored under a
    // live queue: nothing can ever score it.
    let job = encode_job(
        "device_sig_gone",
        uuid::Uuid::now_v7(),
        false,
        None,
        &s.heartbeats[0],
        JobEncoding::for_queue_of(app.state.shared.as_ref()),
    )
    .expect("job");
    app.state
        .shared
        .enqueue(keys::HEARTBEAT_QUEUE, &job)
        .await
        .expect("queued");
    let r = app
        .heartbeat(&known, &heartbeat_body(&s.heartbeats[1]))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.trust_score_json(&known).await["heartbeats"] == 1
        })
        .await,
        "the known device scored"
    );
    // Dropped and acknowledged, not left pending to be reclaimed forever.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state.shared.queue_len(keys::HEARTBEAT_QUEUE).await.ok() == Some(0)
        })
        .await,
        "the queue empty"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("signals_heartbeats_dropped_total 1")
            && metrics.contains("signals_heartbeats_scored_total 1"),
        "{metrics}"
    );
}

async fn the_simulator_locks_every_attack_and_no_genuine_session(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    // `blockremote simulate` against the real server: two sessions of every
    // class, each attack starting after a genuine prefix.
    let report = blockremote::simulate::evaluate(&blockremote::simulate::SimulateOptions {
        url: app.address.clone(),
        admin_key: ADMIN.to_owned(),
        sessions: 2,
        length: 14,
        seed: Some(7),
        rerun: false,
        force: false,
        concurrency: 8,
        corpus: blockremote::simulate::Corpus::Generated(Class::ORIGINAL.to_vec()),
    })
    .await
    .expect("the simulation runs");
    assert_eq!(report.classes.len(), Class::ORIGINAL.len());
    for c in &report.classes {
        assert_eq!(c.sessions, 2, "{}", c.class.name());
        if c.class.is_attack() {
            assert_eq!(c.hits, 2, "{} detected within 5", c.class.name());
            assert!(
                c.heartbeats_to_lock.iter().all(|&n| (1..=5).contains(&n)),
                "{}: {:?}",
                c.class.name(),
                c.heartbeats_to_lock
            );
        } else {
            assert_eq!(c.hits, 0, "{} falsely locked", c.class.name());
        }
    }
    let table = report.to_markdown();
    assert!(
        table.contains("| attack/replay | 2 | 2 detected within 5 | 100.00% |"),
        "{table}"
    );
    assert!(
        table.starts_with("windows: seed-7 (again on a fresh server: --seed 7)\n"),
        "{table}"
    );
}

async fn a_simulation_rerun_is_refused_or_flagged_and_cleanup_removes_its_users(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let options = |seed, rerun| blockremote::simulate::SimulateOptions {
        url: app.address.clone(),
        admin_key: ADMIN.to_owned(),
        sessions: 1,
        length: 2,
        seed,
        rerun,
        force: false,
        concurrency: 2,
        corpus: blockremote::simulate::Corpus::Generated(vec![Class::HeldInHand]),
    };
    let first = blockremote::simulate::evaluate(&options(Some(11), false))
        .await
        .expect("a first run");
    assert!(!first.rerun);
    // The same windows again: refused, saying why, before anything is sent.
    let err = blockremote::simulate::evaluate(&options(Some(11), false))
        .await
        .expect_err("a rerun of the same seed is refused");
    assert!(
        format!("{err:#}").contains("already saw the windows of seed-11"),
        "{err:#}"
    );
    // Asked for on purpose: it runs, and the report says so.
    let again = blockremote::simulate::evaluate(&options(Some(11), true))
        .await
        .expect("--rerun runs");
    assert!(
        again.rerun
            && again
                .to_markdown()
                .contains("had seen these windows before")
    );
    // No seed: fresh windows each time, never refused.
    let fresh = blockremote::simulate::evaluate(&options(None, false))
        .await
        .expect("fresh windows");
    assert!(fresh.windows.starts_with("seed-") && fresh.windows != "seed-11");

    let admin = blockremote_client::Client::new(&app.address)
        .expect("client")
        .admin(ADMIN);
    let tagged = admin.users("simulate:", None, 200).await.expect("listed");
    assert_eq!(
        tagged.items.len(),
        2,
        "one user per set of windows: {tagged:?}"
    );
    let removed = blockremote::simulate::cleanup(&app.address, ADMIN, false)
        .await
        .expect("cleanup");
    assert_eq!(removed, 2);
    assert!(admin
        .users("simulate:", None, 200)
        .await
        .expect("listed")
        .items
        .is_empty());
    let audit = app.admin_json("/v1/audit/logs?action=user_deleted").await;
    assert_eq!(audit["items"].as_array().map(Vec::len), Some(2), "{audit}");
}

/// Redis restarted without persistence, failed over to a lagging replica or
/// flushed by mistake: the device's last `seq` is gone from shared state.
/// It comes back from the store (written behind, plus a margin), so a
/// heartbeat already accepted is refused again — on the old code every
/// `seq` was accepted after the loss.
async fn shared_state_that_loses_its_data_reopens_no_replay_window(backend: Backend) {
    use blockremote::store::SequenceKind;
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("flushed@example.com", "device_flush_1").await;
    let s = session(Class::HeldInHand, 4, 6);
    for hb in &s.heartbeats[..3] {
        let r = app.heartbeat(&d, &heartbeat_body(hb)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let third = s.heartbeats[2].seq;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state
                .store
                .device_sequence(&d.device_id, SequenceKind::Heartbeat)
                .await
                .expect("stored seq")
                >= third
        })
        .await,
        "the accepted seq is written behind to the store"
    );
    // The loss.
    crate::helpers::lose_shared_state(&app, &[keys::heartbeat_seq(&d.device_id)]).await;
    // A heartbeat already accepted is still a replay.
    let replayed = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[1])).await;
    assert_eq!(replayed.status(), StatusCode::CONFLICT);
    let problem: Value = replayed.json().await.expect("problem");
    let last_seq = problem["last_seq"].as_u64().expect("last_seq");
    assert!(last_seq > third, "{problem}");
    // The phone continues above last_seq, as the contract says.
    let mut next = s.heartbeats[3].clone();
    next.seq = last_seq + 1;
    let r = app.heartbeat(&d, &heartbeat_body(&next)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // And it is scored: on Redis the loss took the queue's consumer group
    // too, which the workers create again (on the old code they answered
    // `NOGROUP` for good and nothing was scored after the loss).
    let scored = eventually(Duration::from_secs(10), || async {
        let r = app.device_get("/v1/security/trust-score", &d).await;
        r.status() == StatusCode::OK
            && r.json::<Value>().await.expect("json")["last_seq"].as_u64() >= Some(next.seq)
    })
    .await;
    assert!(scored, "the heartbeat after the loss is scored");
}

/// Shared state loses a device's engine state (a Redis restarted without
/// persistence; a `state.db` deleted): it comes back from its snapshot in
/// the store, so the device is not relearned from scratch — which is what a
/// remote-control session would want. On the old code the next report
/// counted 1 heartbeat.
async fn a_lost_engine_state_comes_back_from_its_snapshot(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let d = app.register("snapshot@example.com", "device_snap_01").await;
    let s = session(Class::HeldInHand, 5, 4);
    for hb in &s.heartbeats[..3] {
        let r = app.heartbeat(&d, &heartbeat_body(hb)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let third = s.heartbeats[2].seq;
    let report = || async {
        let r = app.device_get("/v1/security/trust-score", &d).await;
        r.json::<Value>().await.expect("json")
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            report().await["last_seq"].as_u64() >= Some(third)
        })
        .await,
        "scored"
    );
    // The first scoring of a device is snapshotted at once; written now
    // rather than at the next flush.
    app.state.scoring.flush_snapshots().await;
    assert_eq!(app.state.scoring.snapshots().pending(), 0, "written");
    crate::helpers::lose_shared_state(
        &app,
        &[
            keys::signal_state(&d.device_id),
            keys::trust_report(&d.device_id),
        ],
    )
    .await;
    // Above any seq the loss may have reopened (it is refilled with a margin).
    let mut next = s.heartbeats[3].clone();
    next.seq = third + 1000;
    let r = app.heartbeat(&d, &heartbeat_body(&next)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        eventually(Duration::from_secs(10), || async {
            report().await["last_seq"].as_u64() >= Some(next.seq)
        })
        .await,
        "the heartbeat after the loss is scored"
    );
    let counted = report().await["heartbeats"].as_u64().expect("heartbeats");
    assert!(
        counted >= 2,
        "the state came back from its snapshot: {counted} heartbeat(s) counted"
    );
}
