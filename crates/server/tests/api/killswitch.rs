//! The kill-switch WebSocket, with a standard client, on both backends.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};

use crate::{
    client::{connect, next_json, Socket},
    helpers::{sample, spawn_app_on, spawn_app_with, Backend, StateBackend, TestApp},
};

crate::on_both_backends!(
    handshakes_are_refused_as_the_contract_says,
    state_comes_first_then_commands_and_locks_bite,
    subprotocol_credentials_select_blockremote_v1,
    refresh_reuse_reaches_the_socket,
    shutdown_sends_close_frames,
    handshake_rate_and_connection_cap,
    a_client_close_is_answered_with_a_close_frame,
    command_numbering_never_restarts_after_shared_state_loses_its_data,
    a_phone_reconnecting_after_shared_state_lost_its_history_gets_only_what_it_never_acked,
    after_a_pubsub_gap_every_socket_gets_what_it_missed,
);

// Delivery, resume and the global fan-out, on every Redis topology too.
crate::on_every_state_backend!(
    missed_commands_are_resent_and_resume_replays_in_order,
    global_kill_switch_reaches_every_device,
);

/// RFC 6455 §5.5.1: a peer that receives a Close sends one back. The server
/// used to drop the connection instead, so every clean disconnect looked
/// abnormal (1006) to the client.
async fn a_client_close_is_answered_with_a_close_frame(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("closer@example.com", "device_close1").await;
    let bearer = ("authorization", format!("Bearer {}", d.access));
    let (mut socket, _) = connect(&app, "", std::slice::from_ref(&bearer))
        .await
        .expect("connected");
    assert_eq!(next_json(&mut socket).await["type"], "state");
    socket
        .send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            },
        )))
        .await
        .expect("close sent");
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("answered in time");
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the server's close frame, got {other:?}"),
    }
}

const ADMIN: &str = "kill-switch-admin-key-0123456789abcdef";

async fn nothing_more(socket: &mut Socket) {
    if let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout(Duration::from_millis(300), socket.next()).await
    {
        panic!("unexpected message {text}");
    }
}

async fn with_admin(backend: impl Into<StateBackend>) -> Option<TestApp> {
    spawn_app_on(backend.into(), |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await
}

async fn handshakes_are_refused_as_the_contract_says(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("ana@example.com", "device_0001").await;
    let bearer = ("authorization", format!("Bearer {}", d.access));

    let in_query = connect(&app, &format!("?token={}", d.access), &[])
        .await
        .err();
    assert_eq!(in_query, Some((400, "token_in_query".into())));
    let in_query_too = connect(&app, "?token=x", std::slice::from_ref(&bearer))
        .await
        .err();
    assert_eq!(
        in_query_too,
        Some((400, "token_in_query".into())),
        "refused even with a header"
    );

    let evil = connect(
        &app,
        "",
        &[bearer.clone(), ("origin", "https://evil.example".into())],
    )
    .await
    .err();
    assert_eq!(evil, Some((403, "origin_not_allowed".into())));
    assert!(connect(
        &app,
        "",
        &[bearer.clone(), ("origin", "https://app.example.com".into())]
    )
    .await
    .is_ok());

    assert_eq!(
        connect(&app, "", &[]).await.err(),
        Some((401, "invalid_token".into()))
    );
    let mismatch = connect(
        &app,
        "",
        &[bearer.clone(), ("x-device-id", "device_0002".into())],
    )
    .await
    .err();
    assert_eq!(mismatch, Some((401, "device_mismatch".into())));
    assert!(connect(
        &app,
        "",
        &[bearer.clone(), ("x-device-id", d.device_id.clone())]
    )
    .await
    .is_ok());

    // Not a WebSocket handshake at all.
    let plain = app
        .client
        .get(app.kill_switch_url("").replace("ws://", "http://"))
        .bearer_auth(&d.access)
        .send()
        .await
        .expect("request");
    assert!(plain.status().is_client_error(), "{}", plain.status());
    assert_eq!(plain.headers()["content-type"], "application/problem+json");

    // A revoked device may not connect. (The token before last: the last
    // one again would be a retry within the refresh reuse interval.)
    let next = app
        .refresh(&d.refresh, &d.device_id, "fp-device_0001")
        .await;
    assert_eq!(next.status(), StatusCode::OK);
    let next = crate::client::Session::from_response(next, &d.device_id).await;
    assert_eq!(
        app.refresh(&next.refresh, &d.device_id, "fp-device_0001")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.refresh(&d.refresh, &d.device_id, "fp-device_0001")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        connect(&app, "", &[bearer]).await.err(),
        Some((401, "device_revoked".into()))
    );
}

async fn state_comes_first_then_commands_and_locks_bite(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("bea@example.com", "device_0001").await;
    let mut socket = app.kill_switch(&d).await;
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "state", "locked": false, "action": null, "seq": 0})
    );

    let issued = app.lock(&d.device_id, "CRITICAL_LOCK").await;
    let command = next_json(&mut socket).await;
    assert_eq!(command["type"], "command");
    assert_eq!(command["action"], "CRITICAL_LOCK");
    assert_eq!(command["reason"], "fraud_team");
    assert_eq!(command["seq"], 1);
    assert_eq!(command["id"], issued["id"]);
    assert!(command["issued_at"].as_str().expect("time").ends_with('Z'));
    assert_eq!(
        sample(
            &app.metrics().await,
            r#"killswitch_commands_issued_total{action="CRITICAL_LOCK",origin="admin"}"#
        ),
        Some(1.0)
    );
    socket
        .send(Message::Text(
            json!({"type": "ack", "id": command["id"]})
                .to_string()
                .into(),
        ))
        .await
        .expect("ack");
    // A lock delivered live ends the socket (the device reconnects to learn its state).
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(3), socket.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("close frame"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(
        (u16::from(closed.code), closed.reason.as_str()),
        (4003, "locked")
    );
    drop(socket);

    // The lock bites on the API at once.
    let api = app.probe(&d.access, &d.device_id).await;
    assert_eq!(api.status(), StatusCode::FORBIDDEN);
    let view = app.admin_device(&d.device_id).await;
    assert_eq!(
        (view["status"].as_str(), view["locked"].as_bool()),
        (Some("locked"), Some(true))
    );
    assert_eq!(view["last_command"]["action"], "CRITICAL_LOCK");

    // The ack is saved asynchronously (in batches); a socket opened before
    // it lands would rightly get the command again (at-least-once).
    let acked = blockremote::state::keys::command_acked(&d.device_id);
    assert!(
        crate::helpers::eventually(Duration::from_secs(3), || async {
            app.state.shared.get(&acked).await.expect("get").as_deref() == Some(&b"1"[..])
        })
        .await,
        "ack saved"
    );
    // A locked device can still connect, and learns its state first.
    let mut second = app.kill_switch(&d).await;
    assert_eq!(
        next_json(&mut second).await,
        json!({"type": "state", "locked": true, "action": "CRITICAL_LOCK", "seq": 1})
    );
    nothing_more(&mut second).await;

    app.unlock(&d.device_id).await;
    let unlocked = next_json(&mut second).await;
    assert_eq!(
        (unlocked["action"].as_str(), unlocked["seq"].as_u64()),
        (Some("UNLOCK"), Some(2))
    );
    let api = app.probe(&d.access, &d.device_id).await;
    assert_eq!(
        api.status(),
        StatusCode::CREATED,
        "usable again after unlock"
    );

    // Metrics saw the sockets, deliveries and the ack.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("killswitch_connected_sockets 1"),
        "{metrics}"
    );
    assert!(metrics.contains("killswitch_acks_total 1"), "{metrics}");
    assert!(
        metrics.contains("killswitch_commands_delivered_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("killswitch_delivery_latency_seconds_count 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("killswitch_handshake_duration_seconds_count 2"),
        "{metrics}"
    );

    // Every command was audited.
    let user = app
        .state
        .store
        .device(&d.device_id)
        .await
        .expect("device")
        .expect("exists")
        .user_id;
    let audit = app
        .state
        .store
        .audit_for_user(user, 10)
        .await
        .expect("audit");
    let actions: Vec<&str> = audit.iter().map(|r| r.action_taken.as_str()).collect();
    assert!(
        actions.contains(&"CRITICAL_LOCK") && actions.contains(&"UNLOCK"),
        "{actions:?}"
    );

    // Admin errors.
    let missing = app
        .admin(
            Method::POST,
            "/v1/admin/devices/device_9999/lock",
            Some(&json!({"action": "CRITICAL_LOCK", "reason": "x"})),
        )
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let bad = app
        .admin(
            Method::POST,
            &format!("/v1/admin/devices/{}/lock", d.device_id),
            Some(&json!({"action": "EXPLODE", "reason": "x"})),
        )
        .await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

async fn subprotocol_credentials_select_blockremote_v1(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("cy@example.com", "device_0001").await;
    let (mut socket, response) = connect(
        &app,
        "",
        &[(
            "sec-websocket-protocol",
            format!("blockremote.v1, bearer.{}", d.access),
        )],
    )
    .await
    .expect("accepted");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "blockremote.v1"
    );
    assert_eq!(next_json(&mut socket).await["type"], "state");
}

async fn missed_commands_are_resent_and_resume_replays_in_order(backend: StateBackend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("dee@example.com", "device_0001").await;
    // Three commands while the device is offline.
    app.lock(&d.device_id, "FORCE_OVERLAY").await;
    app.unlock(&d.device_id).await;
    app.lock(&d.device_id, "IMMEDIATE_QUARANTINE").await;

    let mut socket = app.kill_switch(&d).await;
    let state = next_json(&mut socket).await;
    assert_eq!(
        state,
        json!({"type": "state", "locked": true, "action": "IMMEDIATE_QUARANTINE", "seq": 3})
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = next_json(&mut socket).await;
        seen.push((
            c["seq"].as_u64().expect("seq"),
            c["action"].as_str().expect("action").to_owned(),
        ));
        if c["seq"] == 3 {
            socket
                .send(Message::Text(
                    json!({"type": "ack", "id": c["id"]}).to_string().into(),
                ))
                .await
                .expect("ack");
        }
    }
    assert_eq!(
        seen,
        vec![
            (1, "FORCE_OVERLAY".into()),
            (2, "UNLOCK".into()),
            (3, "IMMEDIATE_QUARANTINE".into())
        ]
    );
    // Acks are saved asynchronously: wait until this one landed.
    let acked = blockremote::state::keys::command_acked(&d.device_id);
    assert!(
        crate::helpers::eventually(Duration::from_secs(3), || async {
            app.state.shared.get(&acked).await.expect("get").as_deref() == Some(&b"3"[..])
        })
        .await,
        "ack saved"
    );
    drop(socket);

    // Everything acked: a reconnect gets the state only…
    let mut again = app.kill_switch(&d).await;
    assert_eq!(next_json(&mut again).await["seq"], 3);
    nothing_more(&mut again).await;
    // …and an explicit resume replays from the client's own position, in order.
    again
        .send(Message::Text(
            json!({"type": "resume", "since_seq": 1}).to_string().into(),
        ))
        .await
        .expect("resume");
    let replay: Vec<u64> = [next_json(&mut again).await, next_json(&mut again).await]
        .iter()
        .map(|c| c["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(replay, vec![2, 3]);
    nothing_more(&mut again).await;
}

async fn refresh_reuse_reaches_the_socket(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("eli@example.com", "device_0001").await;
    let mut socket = app.kill_switch(&d).await;
    next_json(&mut socket).await;
    // Two rotations, then the first token: reuse (the last one again would
    // be a retry within the reuse interval).
    let next = app
        .refresh(&d.refresh, "device_0001", "fp-device_0001")
        .await;
    assert_eq!(next.status(), StatusCode::OK);
    let next = crate::client::Session::from_response(next, "device_0001").await;
    assert_eq!(
        app.refresh(&next.refresh, "device_0001", "fp-device_0001")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.refresh(&d.refresh, "device_0001", "fp-device_0001")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let command = next_json(&mut socket).await;
    assert_eq!(
        (command["action"].as_str(), command["reason"].as_str()),
        (Some("CRITICAL_LOCK"), Some("refresh_token_reuse"))
    );
}

async fn global_kill_switch_reaches_every_device(backend: StateBackend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let a = app.register("fox@example.com", "device_0001").await;
    let b = app.register("gil@example.com", "device_0002").await;
    app.lock(&a.device_id, "FORCE_OVERLAY").await; // a's sequence is ahead of b's
    let mut sa = app.kill_switch(&a).await;
    let mut sb = app.kill_switch(&b).await;
    next_json(&mut sa).await;
    next_json(&mut sa).await; // the unacked FORCE_OVERLAY
    next_json(&mut sb).await;
    let r = app
        .admin(
            Method::POST,
            "/v1/admin/kill-switch/global",
            Some(&json!({"action": "FORCE_OVERLAY", "reason": "incident_42"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let ca = next_json(&mut sa).await;
    let cb = next_json(&mut sb).await;
    assert_eq!(
        (
            ca["action"].as_str(),
            ca["reason"].as_str(),
            ca["seq"].as_u64()
        ),
        (Some("FORCE_OVERLAY"), Some("incident_42"), Some(2))
    );
    assert_eq!(
        (cb["action"].as_str(), cb["seq"].as_u64()),
        (Some("FORCE_OVERLAY"), Some(1))
    );
}

async fn shutdown_sends_close_frames(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("hal@example.com", "device_0001").await;
    let mut socket = app.kill_switch(&d).await;
    next_json(&mut socket).await;
    let stopping = tokio::spawn(app.stop());
    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(frame.expect("close frame").code, CloseCode::Away);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stopped")
        .expect("join")
        .expect("clean");
}

async fn handshake_rate_and_connection_cap(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |c| {
        c.ws_handshakes_per_minute = 3;
        c.ws_max_connections = 2;
    })
    .await
    else {
        return;
    };
    let d = app.register("ivy@example.com", "device_0001").await;
    let other = app.register("jay@example.com", "device_0002").await;
    let bearer = ("authorization", format!("Bearer {}", d.access));
    let first = connect(&app, "", std::slice::from_ref(&bearer))
        .await
        .expect("1");
    let second = connect(&app, "", std::slice::from_ref(&bearer))
        .await
        .expect("2");
    // A device with no socket here finds the instance full (one that has
    // one would replace it: see adversarial::transport).
    assert_eq!(
        connect(
            &app,
            "",
            &[("authorization", format!("Bearer {}", other.access))]
        )
        .await
        .err(),
        Some((503, "too_many_connections".into()))
    );
    drop((first, second));
    assert_eq!(
        connect(&app, "", &[bearer]).await.err(),
        Some((429, "rate_limited".into())),
        "4th handshake this minute"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_via_one_instance_reaches_a_socket_on_another_exactly_once() {
    let Some(first) = with_admin(Backend::Production).await else {
        return;
    };
    let second = crate::helpers::second_instance(&first).await;
    let d = first.register("jo@example.com", "device_0001").await;
    let mut socket = second.kill_switch(&d).await;
    next_json(&mut socket).await;
    first.lock(&d.device_id, "CRITICAL_LOCK").await;
    let command = next_json(&mut socket).await;
    assert_eq!(
        (command["action"].as_str(), command["seq"].as_u64()),
        (Some("CRITICAL_LOCK"), Some(1))
    );
    nothing_more(&mut socket).await;
}

/// A phone resumes from the last command `seq` it saw: numbering that
/// restarted at 1 after Redis lost its data would put the next lock below
/// it. The counter is refilled from the store (plus a margin).
async fn command_numbering_never_restarts_after_shared_state_loses_its_data(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app
        .register("numbered@example.com", "device_numbered1")
        .await;
    let first = app.lock(&d.device_id, "CRITICAL_LOCK").await;
    let second = app.unlock(&d.device_id).await;
    let before = second["seq"].as_u64().expect("seq");
    assert!(before > first["seq"].as_u64().expect("seq"));
    crate::helpers::lose_shared_state(
        &app,
        &[
            blockremote::state::keys::command_seq(&d.device_id),
            blockremote::state::keys::force_overlay(&d.device_id),
        ],
    )
    .await;
    let after = app.lock(&d.device_id, "CRITICAL_LOCK").await["seq"]
        .as_u64()
        .expect("seq");
    assert!(
        after > before,
        "numbering restarted: {after} after {before}"
    );
    // And a socket that connects now is told the counter it will continue from.
    let (mut socket, _) = connect(
        &app,
        "",
        &[("authorization", format!("Bearer {}", d.access))],
    )
    .await
    .expect("connected");
    let state = next_json(&mut socket).await;
    assert_eq!(state["type"], "state");
    assert_eq!(state["seq"].as_u64(), Some(after), "{state}");
    assert_eq!(state["locked"], true);
}

/// A command published while an instance's subscription was down never
/// reaches it; the gap that follows makes every socket there write what its
/// device's history holds above what it already wrote.
async fn after_a_pubsub_gap_every_socket_gets_what_it_missed(backend: Backend) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("gap@example.com", "device_gap_0001").await;
    let (mut socket, _) = connect(
        &app,
        "",
        &[("authorization", format!("Bearer {}", d.access))],
    )
    .await
    .expect("connected");
    assert_eq!(next_json(&mut socket).await["type"], "state");
    // Recorded in the device's history, never published: as a command
    // published during the gap would be.
    let missed = blockremote::realtime::record(
        app.state.shared.as_ref(),
        app.state.store.as_ref(),
        &d.device_id,
        blockremote::realtime::Action::ForceOverlay,
        "fraud_team",
    )
    .await
    .expect("recorded");
    app.state.hub.resync_all();
    let got = next_json(&mut socket).await;
    assert_eq!(got["type"], "command", "{got}");
    assert_eq!(got["seq"].as_u64(), Some(missed.seq), "{got}");
    // A second gap resends nothing already written.
    app.state.hub.resync_all();
    let quiet = tokio::time::timeout(Duration::from_millis(300), socket.next()).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
    // A gap after Redis lost its data: the socket refills the device's
    // counter above what it wrote, so even a global command (numbered
    // without the store) lands above what the phone saw.
    crate::helpers::lose_shared_state(
        &app,
        &[
            blockremote::state::keys::command_seq(&d.device_id),
            blockremote::state::keys::force_overlay(&d.device_id),
        ],
    )
    .await;
    app.state.hub.resync_all();
    assert!(
        crate::helpers::eventually(Duration::from_secs(3), || async {
            app.state
                .shared
                .get(&blockremote::state::keys::command_seq(&d.device_id))
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await,
        "the counter is refilled"
    );
    let r = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/kill-switch/global",
            Some(&serde_json::json!({"action": "FORCE_OVERLAY", "reason": "fraud_team"})),
        )
        .await;
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let global = next_json(&mut socket).await;
    assert_eq!(global["type"], "command", "{global}");
    assert!(
        global["seq"].as_u64() > Some(missed.seq),
        "numbering restarted: {global} after {}",
        missed.seq
    );
}

/// Shared state loses the device's command history, counter and acked
/// position (a Redis restarted without persistence): the phone that
/// reconnects is still sent the command it never acked — from the store's
/// copy — and not the one it did. On the old code nothing came after
/// `state`.
async fn a_phone_reconnecting_after_shared_state_lost_its_history_gets_only_what_it_never_acked(
    backend: Backend,
) {
    let Some(app) = with_admin(backend).await else {
        return;
    };
    let d = app.register("history@example.com", "device_history1").await;
    let mut socket = app.kill_switch(&d).await;
    assert_eq!(next_json(&mut socket).await["type"], "state");
    let acked = app.lock(&d.device_id, "FORCE_OVERLAY").await;
    let heard = next_json(&mut socket).await;
    assert_eq!(heard["id"], acked["id"]);
    socket
        .send(Message::Text(
            json!({"type": "ack", "id": heard["id"]}).to_string().into(),
        ))
        .await
        .expect("ack");
    let acked_seq = acked["seq"].as_u64().expect("seq");
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || async {
            app.state
                .store
                .device_sequence(&d.device_id, blockremote::store::SequenceKind::Acked)
                .await
                .expect("store")
                >= acked_seq
        })
        .await,
        "the acked position is written behind to the store"
    );
    let _ = socket.close(None).await;
    drop(socket);
    // Issued while the phone is away: never acked.
    let missed = app.lock(&d.device_id, "FORCE_OVERLAY").await;
    crate::helpers::lose_shared_state(
        &app,
        &[
            blockremote::state::keys::command_seq(&d.device_id),
            blockremote::state::keys::force_overlay(&d.device_id),
            blockremote::state::keys::command_acked(&d.device_id),
        ],
    )
    .await;
    let mut socket = app.kill_switch(&d).await;
    let state = next_json(&mut socket).await;
    assert_eq!(state["type"], "state");
    assert_eq!(state["seq"], missed["seq"], "{state}");
    let resent = next_json(&mut socket).await;
    assert_eq!(
        (resent["id"].clone(), resent["seq"].clone()),
        (missed["id"].clone(), missed["seq"].clone()),
        "the unacked command comes back: {resent}"
    );
    // And nothing else: the acked one is not sent again.
    let more = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Some(text),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    assert!(
        !matches!(more, Ok(Some(_))),
        "nothing after the unacked command: {more:?}"
    );
}
