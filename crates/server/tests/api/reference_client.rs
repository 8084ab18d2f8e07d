//! The reference client (`blockremote-client`) against the real server, on
//! both backends: every call it offers, each outcome an app branches on, and
//! the demo tour built on it — so the client integrators copy is the one CI
//! runs.

use std::time::Duration;

use blockremote_client::{
    Client, DeviceIdentity, Error, HeartbeatOutcome, ServerMessage, SessionRequest,
};
use blockremote_engine::sim::{session, Class};

use crate::helpers::{heartbeat_body, spawn_app_with, Backend, WithWorkers};

crate::on_both_backends!(
    sign_in_refresh_and_heartbeat_outcomes,
    the_kill_switch_socket_carries_state_commands_and_resume,
    external_users_are_listed_by_prefix_and_deleted_with_their_devices,
    the_demo_tour_runs,
    deleting_a_user_whose_device_moved_to_it_closes_its_sockets_and_forgets_it,
);

const ADMIN: &str = "reference-client-admin-key-0123456789abcdef";

async fn app(backend: Backend) -> Option<WithWorkers> {
    let app = spawn_app_with(backend, |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
    })
    .await?;
    Some(WithWorkers::start(app).await)
}

fn identity(device_id: &str) -> DeviceIdentity {
    DeviceIdentity {
        device_id: device_id.to_owned(),
        device_fingerprint: format!("fp-{device_id}"),
        platform: "android".to_owned(),
    }
}

async fn sign_in_refresh_and_heartbeat_outcomes(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let client = Client::new(&app.address).expect("client");
    let phone = identity("refclient01");
    let tokens = client
        .register("ref-client@example.com", "correct horse battery", &phone)
        .await
        .expect("registered");
    let wrong = client
        .login("ref-client@example.com", "wrong password!", &phone)
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(wrong.code(), Some("invalid_credentials"), "{wrong}");
    let next = client
        .refresh(&tokens.refresh_token, &phone)
        .await
        .expect("refreshed");
    assert_ne!(next.refresh_token, tokens.refresh_token);

    let device = client.device(&phone.device_id, &next.access_token);
    let hbs = session(Class::HeldInHand, 5, 2).heartbeats;
    let first = heartbeat_body(&hbs[0]);
    assert_eq!(
        device.heartbeat(&first).await.expect("sent"),
        HeartbeatOutcome::Accepted { seq: 1 }
    );
    // The same seq again: a replay, with the last accepted seq to go on from.
    assert_eq!(
        device.heartbeat(&first).await.expect("sent"),
        HeartbeatOutcome::Replay { last_seq: Some(1) }
    );
    // A body the server refuses is an error naming the field.
    let mut bad = heartbeat_body(&hbs[1]);
    bad["touches"] = serde_json::json!([{"t": 1, "x": 2.0, "y": 0.5, "pressure": 0.5, "size": 0.03, "action": "down"}]);
    match device.heartbeat(&bad).await {
        Err(Error::Api {
            status: 422,
            problem,
            ..
        }) => {
            assert_eq!(
                problem.field.as_deref(),
                Some("touches[0].x"),
                "{problem:?}"
            )
        }
        other => panic!("expected 422, got {other:?}"),
    }
    let report = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let report = device.trust_score().await.expect("trust");
            if report.last_seq >= 1 {
                break report;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("scored");
    assert_eq!((report.heartbeats, report.locked), (1, false));
    assert_eq!(report.device_id, phone.device_id);

    // An access token of another device: the header and the token disagree.
    let other = client.device("someoneelse", &next.access_token);
    let err = other.trust_score().await.expect_err("refused");
    assert_eq!(err.code(), Some("device_mismatch"), "{err}");

    app.lock(&phone.device_id, "CRITICAL_LOCK").await;
    assert_eq!(
        device
            .heartbeat(&heartbeat_body(&hbs[1]))
            .await
            .expect("sent"),
        HeartbeatOutcome::Locked
    );
    app.unlock(&phone.device_id).await;

    // The plan's bucket (trial: 120) runs dry: not accepted, so the seq is
    // unspent, with the wait the server asked for. (Fresh windows: the same
    // window sent again would be judged a replay.)
    let mut limited = None;
    for hb in &session(Class::HeldInHand, 6, 200).heartbeats[1..] {
        let seq = hb.seq;
        match device.heartbeat(&heartbeat_body(hb)).await.expect("sent") {
            HeartbeatOutcome::Accepted { .. } => {}
            HeartbeatOutcome::RateLimited { retry_after } => {
                limited = Some((seq, retry_after));
                break;
            }
            other => panic!("heartbeat {seq}: {other:?}"),
        }
    }
    let (seq, retry_after) = limited.expect("the bucket ran dry");
    assert!(seq <= 125, "limited only at {seq}");
    assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}");

    // Every device call spends the bucket: signing out waits its turn too.
    let err = device.logout().await.expect_err("limited");
    let Error::Api {
        status: 429,
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("expected 429 with Retry-After, got {err:?}");
    };
    tokio::time::sleep(wait).await;
    device.logout().await.expect("signed out");
    // Signed out: the token is no longer valid (INTEGRATION.md: sign in again).
    let err = device
        .trust_score()
        .await
        .expect_err("refused after logout");
    assert_eq!(err.code(), Some("invalid_token"), "{err}");
}

async fn the_kill_switch_socket_carries_state_commands_and_resume(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let client = Client::new(&app.address).expect("client");
    let admin = client.admin(ADMIN);
    let phone = identity("refclient02");
    let who = SessionRequest::External {
        external_id: "cust-ref-02",
        create: true,
    };
    let tokens = admin.session(who, &phone).await.expect("session");
    let device = client.device(&phone.device_id, &tokens.access_token);
    let mut socket = device.kill_switch().await.expect("socket");
    assert_eq!(
        socket.next().await.expect("message"),
        Some(ServerMessage::State {
            locked: false,
            action: None,
            seq: 0
        })
    );
    admin
        .lock(&phone.device_id, "FORCE_OVERLAY", "ref_test")
        .await
        .expect("locked");
    let Some(ServerMessage::Command {
        id,
        seq,
        action,
        reason,
    }) = socket.next().await.expect("message")
    else {
        panic!("expected a command");
    };
    assert_eq!(
        (seq, action.as_str(), reason.as_str()),
        (1, "FORCE_OVERLAY", "ref_test")
    );
    socket.ack(&id).await.expect("acked");
    socket.close().await.expect("closed");

    // Offline meanwhile: the unlock waits for the next connection.
    admin
        .unlock(&phone.device_id, "ref_test_done")
        .await
        .expect("unlocked");
    let mut socket = device.kill_switch().await.expect("socket");
    let Some(ServerMessage::State { locked, seq, .. }) = socket.next().await.expect("message")
    else {
        panic!("expected the state first");
    };
    assert_eq!((locked, seq), (false, 2), "the state is authoritative");
    socket.resume(1).await.expect("resume");
    let Some(ServerMessage::Command { seq, action, .. }) = socket.next().await.expect("message")
    else {
        panic!("expected the missed command");
    };
    assert_eq!((seq, action.as_str()), (2, "UNLOCK"));
}

async fn external_users_are_listed_by_prefix_and_deleted_with_their_devices(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    let client = Client::new(&app.address).expect("client");
    let admin = client.admin(ADMIN);
    for n in 0..5 {
        let created = admin
            .ensure_user(&format!("test-cust:{n}"), None)
            .await
            .expect("ensured");
        assert!(created.created);
    }
    let again = admin
        .ensure_user("test-cust:0", None)
        .await
        .expect("ensured");
    assert!(!again.created, "idempotent on external_id");
    admin.ensure_user("other:1", None).await.expect("ensured");

    // Paged by id, only the prefix's users.
    let first = admin.users("test-cust:", None, 2).await.expect("page");
    assert_eq!(first.items.len(), 2);
    let mut seen: Vec<String> = first.items.iter().map(|u| u.external_id.clone()).collect();
    let mut cursor = first.next_cursor;
    while let Some(c) = cursor {
        let page = admin.users("test-cust:", Some(&c), 2).await.expect("page");
        seen.extend(page.items.iter().map(|u| u.external_id.clone()));
        cursor = page.next_cursor;
    }
    assert_eq!(
        seen,
        (0..5).map(|n| format!("test-cust:{n}")).collect::<Vec<_>>()
    );
    let bad = admin
        .users("test-cust:", Some("not-a-cursor"), 2)
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), Some("validation_failed"));

    // Deleting a user ends its device sessions at once.
    let phone = identity("refclient03");
    let who = SessionRequest::External {
        external_id: "test-cust:0",
        create: false,
    };
    let tokens = admin.session(who, &phone).await.expect("session");
    let device = client.device(&phone.device_id, &tokens.access_token);
    device.trust_score().await.expect("works before");
    admin.delete_user(&again.user_id).await.expect("deleted");
    let err = device
        .trust_score()
        .await
        .expect_err("refused after deletion");
    assert!(
        matches!(err.code(), Some("device_revoked" | "invalid_token")),
        "{err}"
    );
    let refused = client
        .refresh(&tokens.refresh_token, &phone)
        .await
        .expect_err("its refresh token is gone");
    assert_eq!(refused.code(), Some("invalid_refresh_token"), "{refused}");
    let gone = admin.delete_user(&again.user_id).await.expect_err("gone");
    assert_eq!(gone.code(), Some("user_not_found"));
    // The external id is free again; other users are untouched.
    assert!(
        admin
            .ensure_user("test-cust:0", None)
            .await
            .expect("ensured")
            .created
    );
    assert!(
        !admin
            .ensure_user("other:1", None)
            .await
            .expect("ensured")
            .created
    );
    let audit = app.admin_json("/v1/audit/logs?action=user_deleted").await;
    assert_eq!(
        audit["items"][0]["user_id"],
        again.user_id.as_str(),
        "{audit}"
    );
    // Which admin key did it: `admin:` and 8 hex digits of the key's hash.
    let by = audit["items"][0]["actor"].as_str().unwrap_or_default();
    assert!(by.starts_with("admin:") && by.len() == 14, "{audit}");

    // Only the admin key may list or delete: not a device's own access token.
    let phone = identity("refclient04");
    let who = SessionRequest::External {
        external_id: "test-cust:1",
        create: false,
    };
    let tokens = admin.session(who, &phone).await.expect("session");
    let as_device = client.admin(&tokens.access_token);
    for refused in [
        as_device.users("test", None, 10).await.map(|_| ()),
        as_device.delete_user(&tokens.user_id).await,
    ] {
        let err = refused.expect_err("a device token is not an admin key");
        assert_eq!(err.code(), Some("invalid_admin_key"), "{err}");
    }
    let anonymous = client.admin("not-the-admin-key");
    assert_eq!(
        anonymous
            .users("test", None, 10)
            .await
            .err()
            .and_then(|e| e.code().map(str::to_owned))
            .as_deref(),
        Some("invalid_admin_key")
    );
    assert_eq!(
        anonymous
            .delete_user(&first.items[1].user_id)
            .await
            .err()
            .and_then(|e| e.code().map(str::to_owned))
            .as_deref(),
        Some("invalid_admin_key")
    );
}

async fn the_demo_tour_runs(backend: Backend) {
    let Some(app) = app(backend).await else {
        return;
    };
    blockremote::demo::tour(&app.address, ADMIN)
        .await
        .expect("the tour completes");
}

/// A device that moved from one user to another keeps the first user's old
/// session families; deleting its new owner used to fail on them (500).
/// Deletion also closes the device's sockets and forgets its scoring state.
async fn deleting_a_user_whose_device_moved_to_it_closes_its_sockets_and_forgets_it(
    backend: Backend,
) {
    let Some(app) = app(backend).await else {
        return;
    };
    let client = Client::new(&app.address).expect("client");
    let admin = client.admin(ADMIN);
    let phone = identity("refmoved01");
    let first = SessionRequest::External {
        external_id: "moved:first",
        create: true,
    };
    admin.session(first, &phone).await.expect("first owner");
    let second = SessionRequest::External {
        external_id: "moved:second",
        create: true,
    };
    let tokens = admin.session(second, &phone).await.expect("second owner");
    let device = client.device(&phone.device_id, &tokens.access_token);
    let hb = &session(Class::HeldInHand, 9, 1).heartbeats[0];
    assert_eq!(
        device.heartbeat(&heartbeat_body(hb)).await.expect("sent"),
        HeartbeatOutcome::Accepted { seq: 1 }
    );
    let mut socket = device.kill_switch().await.expect("socket");
    assert!(matches!(
        socket.next().await.expect("state"),
        Some(ServerMessage::State { .. })
    ));

    admin.delete_user(&tokens.user_id).await.expect("deleted");
    let closed = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("the socket is closed in time")
        .expect("a clean close");
    assert_eq!((closed, socket.close_code()), (None, Some(4004)));

    // Signed in again under the same device id: nothing of the old device.
    let again = SessionRequest::External {
        external_id: "moved:third",
        create: true,
    };
    let tokens = admin.session(again, &phone).await.expect("a new owner");
    let device = client.device(&phone.device_id, &tokens.access_token);
    let report = device.trust_score().await.expect("trust");
    assert_eq!((report.heartbeats, report.last_seq), (0, 0), "{report:?}");
    assert_eq!(
        device.heartbeat(&heartbeat_body(hb)).await.expect("sent"),
        HeartbeatOutcome::Accepted { seq: 1 },
        "its seq starts afresh"
    );
}
