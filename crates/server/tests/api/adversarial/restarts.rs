//! Security state across restarts, and replays while scoring is degraded.
//!
//! The embedded default kept its shared state in memory only: after a
//! restart a device showed 0 heartbeats, an already accepted `seq` was
//! accepted and scored again, a window already seen was new again, and
//! kill-switch numbering started over at 1, so `resume` returned nothing.
//! On Redis all of it lives in Redis; in-process it is now saved in the
//! data dir (`state/journal.rs`). The same story runs on both backends, the
//! server restarted on the same data dir, or database and Redis prefix.
//!
//! Degraded (inline) scoring skipped the cross-device replay check, so an
//! attacker who kept the queue full could replay another device's windows.

use std::time::Duration;

use blockremote_engine::sim::{session, Class};
use futures::SinkExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    client::next_json,
    helpers::{eventually, heartbeat_body, Backend, TestApp, WithWorkers},
};

/// The adversarial server with the workers a deployment runs beside it.
async fn start(backend: Backend) -> Option<WithWorkers> {
    Some(WithWorkers::start(super::app(backend).await?).await)
}

crate::on_both_backends!(
    a_restart_forgets_no_security_state,
    a_window_replayed_from_another_device_is_caught_while_degraded,
);

async fn heartbeats_shown(app: &TestApp, device_id: &str) -> Option<u64> {
    app.admin_device(device_id).await["trust"]["heartbeats"].as_u64()
}

/// True once the device is locked and the report of the heartbeat that
/// locked it is stored.
async fn locked(app: &TestApp, id: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        let view = app.admin_device(id).await;
        view["status"] == "locked" && view["trust"]["heartbeats"].as_u64() >= Some(1)
    })
    .await
}

/// Heartbeats, a kill-switch history, then a restart: the device view,
/// replay refusals, window fingerprints and command numbering are as they
/// were.
async fn a_restart_forgets_no_security_state(backend: Backend) {
    let Some(app) = start(backend).await else {
        return;
    };
    let device = app
        .register("restarted@example.com", "device_restart_01")
        .await;
    let switch = app
        .register("switched@example.com", "device_restart_02")
        .await;
    let s = session(Class::HeldInHand, 31, 4);
    for hb in &s.heartbeats[..3] {
        assert_eq!(
            app.heartbeat(&device, &heartbeat_body(hb)).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            heartbeats_shown(&app, &device.device_id).await == Some(3)
        })
        .await,
        "three heartbeats scored"
    );
    let first = app.lock(&switch.device_id, "FORCE_OVERLAY").await;
    let second = app.unlock(&switch.device_id).await;
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2))
    );

    let app = app.restart().await;

    // The device view still counts what was scored.
    assert_eq!(heartbeats_shown(&app, &device.device_id).await, Some(3));
    // An accepted seq is still a replay: refused, never scored again.
    let r = app
        .heartbeat(&device, &heartbeat_body(&s.heartbeats[2]))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<Value>().await.expect("json")["code"], "replay");
    let r = app
        .heartbeat(&device, &heartbeat_body(&s.heartbeats[3]))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        eventually(Duration::from_secs(5), || async {
            heartbeats_shown(&app, &device.device_id).await == Some(4)
        })
        .await,
        "the next one is scored on top of the three"
    );
    assert_eq!(
        app.admin_device(&device.device_id).await["status"],
        "active",
        "scoring went on from the saved baseline"
    );

    // A window accepted before the restart, replayed from another device.
    let copycat = app
        .register("copycat@example.com", "device_restart_03")
        .await;
    let mut copy = s.heartbeats[0].clone();
    copy.seq = 1;
    assert_eq!(
        app.heartbeat(&copycat, &heartbeat_body(&copy))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert!(
        locked(&app, &copycat.device_id).await,
        "the copy is a replay"
    );
    assert_eq!(
        app.admin_device(&copycat.device_id).await["trust"]["reasons"][0],
        "replayed_window"
    );

    // Kill-switch numbering goes on, and the socket gets the whole history.
    let third = app.lock(&switch.device_id, "IMMEDIATE_QUARANTINE").await;
    assert_eq!(third["seq"], 3, "{third}");
    let mut socket = app.kill_switch(&switch).await;
    let state = next_json(&mut socket).await;
    assert_eq!(
        state,
        json!({"type": "state", "locked": true, "action": "IMMEDIATE_QUARANTINE", "seq": 3})
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = next_json(&mut socket).await;
        seen.push(c["seq"].as_u64().expect("seq"));
    }
    assert_eq!(seen, [1, 2, 3], "nothing was acked: everything is resent");
    socket
        .send(Message::Text(
            json!({"type": "resume", "since_seq": 1}).to_string().into(),
        ))
        .await
        .expect("resume");
    let resumed = [next_json(&mut socket).await, next_json(&mut socket).await];
    assert_eq!(
        resumed.map(|c| c["seq"].as_u64().expect("seq")),
        [2, 3],
        "resume returns the earlier commands"
    );
}

/// Scoring inline (the breaker open, as an attacker who fills the queue
/// can force) still checks whether another device sent the window first.
async fn a_window_replayed_from_another_device_is_caught_while_degraded(backend: Backend) {
    let Some(app) = start(backend).await else {
        return;
    };
    let original = app
        .register("original@example.com", "device_degraded_1")
        .await;
    let copycat = app
        .register("copycat@example.com", "device_degraded_2")
        .await;
    let hb = session(Class::HeldInHand, 8, 1).heartbeats.remove(0);
    app.heartbeat(&original, &heartbeat_body(&hb)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            heartbeats_shown(&app, &original.device_id).await == Some(1)
        })
        .await
    );
    app.state.breaker.trip();
    let r = app.heartbeat(&copycat, &heartbeat_body(&hb)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        r.json::<Value>().await.expect("json")["degraded"],
        true,
        "scored inline"
    );
    assert!(
        locked(&app, &copycat.device_id).await,
        "the copy is a replay"
    );
    let view = app.admin_device(&copycat.device_id).await;
    assert_eq!(view["trust"]["reasons"][0], "replayed_window", "{view}");
    assert_eq!(view["trust"]["degraded"], true, "{view}");
    assert_eq!(
        app.admin_device(&original.device_id).await["status"],
        "active",
        "the original is not blamed"
    );
}
