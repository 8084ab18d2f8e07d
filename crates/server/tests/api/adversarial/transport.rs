//! Attacks on the transport: connections that never finish a request
//! (slowloris), bodies sent a byte at a time, heads too large to buffer,
//! connection floods, and kill-switch sockets held beyond their welcome.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    client::{self, next_json, Session, Socket},
    helpers::{eventually, spawn_app_with, Backend, TestApp},
};

crate::on_both_backends!(
    a_partial_request_head_is_answered_408_and_closed,
    an_idle_keep_alive_connection_is_closed,
    an_oversize_request_head_is_refused,
    connections_over_the_cap_are_refused_while_held_ones_work,
    a_slow_body_gets_408_request_timeout,
    a_device_holds_at_most_two_sockets_and_the_oldest_is_replaced,
    established_devices_reconnect_on_a_full_instance_and_users_are_capped,
    an_oversize_message_closes_the_socket_with_1009,
    token_query_parameters_are_refused_whatever_their_case,
    metrics_require_the_configured_bearer_token,
    resume_is_rate_limited_per_socket,
    a_lock_closes_the_socket_after_the_command,
    revoking_or_ending_the_session_closes_the_socket,
    a_socket_closes_when_its_token_expires,
    the_handshake_limiter_counts_an_ipv6_64_as_one_client,
);

const ADMIN: &str = "transport-admin-key-0123456789abcdef0123";

async fn raw(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads until the server closes the connection; `None` when it is still
/// open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

/// Reads one complete response (head and `content-length` body) off a
/// kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&received).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().expect("length"))
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed mid-response: {text}");
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response in time");
    String::from_utf8_lossy(&received).into_owned()
}

fn problem_code(response: &str) -> String {
    let (_, body) = response.split_once("\r\n\r\n").expect("head and body");
    let problem: Value = serde_json::from_str(body).expect("problem JSON");
    problem["code"].as_str().unwrap_or_default().to_owned()
}

async fn with_admin(
    backend: Backend,
    tweak: impl FnOnce(&mut blockremote::config::Config),
) -> Option<TestApp> {
    spawn_app_with(backend, |c| {
        c.admin_token = Some(ADMIN.to_owned().into());
        tweak(c);
    })
    .await
}

/// Slowloris: a head sent in pieces, never finished, used to hold its
/// connection (and task) forever — axum's `serve` ran hyper without a timer.
async fn a_partial_request_head_is_answered_408_and_closed(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.header_read_timeout = Duration::from_millis(400);
    })
    .await
    else {
        return;
    };
    let mut partial = raw(&app).await;
    partial
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let answer = read_until_closed(&mut partial, Duration::from_secs(5))
        .await
        .expect("the connection is closed, not held open");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before the timeout"
    );
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(problem_code(&answer), "request_timeout");

    // So is a WebSocket upgrade whose head never ends.
    let mut upgrade = raw(&app).await;
    upgrade
        .write_all(
            b"GET /v1/security/kill-switch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        )
        .await
        .expect("write");
    let answer = read_until_closed(&mut upgrade, Duration::from_secs(5))
        .await
        .expect("a partial upgrade is closed");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

    // A connection that never sends a byte is closed too (without an answer).
    let mut silent = raw(&app).await;
    let answer = read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert_eq!(answer, "");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"http_connection_timeouts_total{reason="header"} 3"#),
        "{metrics}"
    );
}

/// A kept-alive connection that sends nothing more after its response is
/// closed after the keep-alive timeout (distinct from the header timeout).
async fn an_idle_keep_alive_connection_is_closed(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.header_read_timeout = Duration::from_secs(30);
        c.keepalive_timeout = Duration::from_millis(400);
    })
    .await
    else {
        return;
    };
    let mut stream = raw(&app).await;
    for _ in 0..2 {
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let response = read_response(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    }
    let started = std::time::Instant::now();
    let rest = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the idle connection is closed");
    assert_eq!(rest, "", "closed without a word");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// A head of tens of kilobytes used to be buffered whole (hyper's default
/// buffer is ~400 KB); the head is now bounded.
async fn an_oversize_request_head_is_refused(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let mut stream = raw(&app).await;
    let head = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection is closed");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "431 or a closed connection, not {answer}"
    );
    // A head under the limit is fine.
    let r = app
        .client
        .get(app.url("/health/live"))
        .header("x-big", "a".repeat(8 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
}

/// A flood of connections used to be accepted without bound; past the cap
/// they are answered 503 and closed, while the ones held keep working.
async fn connections_over_the_cap_are_refused_while_held_ones_work(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.max_connections = 2;
        c.header_read_timeout = Duration::from_secs(30);
    })
    .await
    else {
        return;
    };
    let mut first = raw(&app).await;
    let mut second = raw(&app).await;
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = raw(&app).await;
    let answer = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("the connection over the cap is closed at once");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert_eq!(problem_code(&answer), "too_many_connections");

    for held in [&mut first, &mut second] {
        held.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let response = read_response(held).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(
            response.contains("http_connections_refused_total 1"),
            "{response}"
        );
    }
    drop(first);
    // A slot freed is a slot usable again.
    let usable = eventually(Duration::from_secs(3), || async {
        let mut next = raw(&app).await;
        if next
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        read_until_closed(&mut next, Duration::from_secs(2))
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200 "))
    })
    .await;
    assert!(usable, "a new connection is served once one closed");
}

/// A body sent a byte at a time used to hold its handler until the request
/// timeout, then got a 503 blaming the server.
async fn a_slow_body_gets_408_request_timeout(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.body_read_timeout = Duration::from_millis(400);
    })
    .await
    else {
        return;
    };
    let mut stream = raw(&app).await;
    stream
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 200\r\n\r\n{\"email\":",
        )
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("answered and closed in time");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert_eq!(problem_code(&answer), "request_timeout");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"route="/v1/auth/login",status="408"} 1"#),
        "{metrics}"
    );
}

// --- kill-switch sockets ---------------------------------------------------

async fn connect(
    app: &TestApp,
    query: &str,
    headers: &[(&str, String)],
) -> Result<Socket, (u16, String)> {
    client::connect(app, query, headers)
        .await
        .map(|(socket, _)| socket)
}

fn bearer(session: &Session) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", session.access))
}

/// The close frame the server sends next: `(code, reason)`.
async fn close_frame(socket: &mut Socket, limit: Duration) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(limit, socket.next())
            .await
            .expect("closed in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Still open: nothing but pings within a moment.
async fn still_open(socket: &mut Socket) {
    match tokio::time::timeout(Duration::from_millis(300), socket.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
        Ok(other) => panic!("expected an open, quiet socket, got {other:?}"),
    }
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .expect("send");
}

/// One token used to hold as many sockets as it opened, filling the
/// instance's cap; a device now holds two, and a third replaces the oldest.
async fn a_device_holds_at_most_two_sockets_and_the_oldest_is_replaced(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let d = app.register("many@example.com", "device_many_01").await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut socket = connect(&app, "", &[bearer(&d)]).await.expect("accepted");
        assert_eq!(next_json(&mut socket).await["type"], "state");
        sockets.push(socket);
    }
    assert_eq!(
        close_frame(&mut sockets[0], Duration::from_secs(5)).await,
        (4001, "replaced".to_owned())
    );
    still_open(&mut sockets[1]).await;
    still_open(&mut sockets[2]).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.state.hub.connections() == 2
        })
        .await,
        "the instance counts two sockets, not three"
    );
    // Both remaining sockets still get commands.
    app.lock(&d.device_id, "FORCE_OVERLAY").await;
    for socket in &mut sockets[1..] {
        assert_eq!(next_json(socket).await["action"], "FORCE_OVERLAY");
    }
}

/// A full instance used to refuse a device reconnecting after a network
/// change: a device that holds a socket here now replaces it instead of
/// needing a free slot. A user's devices cannot take more than the user cap.
async fn established_devices_reconnect_on_a_full_instance_and_users_are_capped(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.ws_max_connections = 3;
        c.ws_max_sockets_per_user = 2;
    })
    .await
    else {
        return;
    };
    let signed_in = |email: &'static str, device: &'static str| {
        let app = &app;
        async move {
            let r = app.login(email, device).await;
            assert_eq!(r.status(), StatusCode::OK);
            Session::from_response(r, device).await
        }
    };
    let a = app.register("owner@example.com", "device_owner_a").await;
    let b = signed_in("owner@example.com", "device_owner_b").await;
    let c = signed_in("owner@example.com", "device_owner_c").await;
    let o = app.register("other@example.com", "device_other_o").await;
    let z = signed_in("other@example.com", "device_other_z").await;

    let mut a1 = connect(&app, "", &[bearer(&a)]).await.expect("a1");
    let mut b1 = connect(&app, "", &[bearer(&b)]).await.expect("b1");
    assert_eq!(
        connect(&app, "", &[bearer(&c)]).await.err(),
        Some((503, "too_many_connections".into())),
        "a third device of the user is over the user cap"
    );
    let mut o1 = connect(&app, "", &[bearer(&o)]).await.expect("o1");
    assert_eq!(
        connect(&app, "", &[bearer(&z)]).await.err(),
        Some((503, "too_many_connections".into())),
        "a device with no socket here is refused on a full instance"
    );
    for s in [&mut a1, &mut b1, &mut o1] {
        next_json(s).await;
    }
    // Established devices reconnect anyway: each new socket takes its old one's place.
    let mut b2 = connect(&app, "", &[bearer(&b)])
        .await
        .expect("b reconnects");
    let mut o2 = connect(&app, "", &[bearer(&o)])
        .await
        .expect("o reconnects");
    assert_eq!(
        close_frame(&mut b1, Duration::from_secs(5)).await,
        (4001, "replaced".to_owned())
    );
    assert_eq!(
        close_frame(&mut o1, Duration::from_secs(5)).await,
        (4001, "replaced".to_owned())
    );
    assert_eq!(next_json(&mut b2).await["type"], "state");
    assert_eq!(next_json(&mut o2).await["type"], "state");
    still_open(&mut a1).await;
    assert_eq!(app.state.hub.connections(), 3);
}

/// A message over the limit used to end the socket without a close frame
/// (a protocol error); it now gets 1009, as RFC 6455 asks.
async fn an_oversize_message_closes_the_socket_with_1009(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let d = app.register("big@example.com", "device_big_0001").await;
    let mut socket = connect(&app, "", &[bearer(&d)]).await.expect("accepted");
    next_json(&mut socket).await;
    let padding = "x".repeat(16 * 1024);
    send(&mut socket, json!({"type": "ack", "id": padding})).await;
    let (code, _) = close_frame(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1009);
}

/// `?token=` was refused, but `?TOKEN=` and `?Token=` were not: the token
/// then reached access logs all the same.
async fn token_query_parameters_are_refused_whatever_their_case(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let d = app.register("query@example.com", "device_query_01").await;
    for query in [
        "?TOKEN=x",
        "?Token=x",
        "?tOkEn=x",
        "?Access_Token=x",
        "?a=1&TOKEN=",
    ] {
        assert_eq!(
            connect(&app, query, &[bearer(&d)]).await.err(),
            Some((400, "token_in_query".into())),
            "{query}"
        );
    }
    assert!(connect(&app, "?tokens=1", &[bearer(&d)]).await.is_ok());
}

/// `/metrics` was open to anyone; with `BLOCKREMOTE_METRICS_TOKEN` set it
/// needs that bearer token.
async fn metrics_require_the_configured_bearer_token(backend: Backend) {
    let token = "metrics-scrape-token-0123456789";
    let Some(app) = with_admin(backend, |c| {
        c.metrics_token = Some(token.to_owned().into());
    })
    .await
    else {
        return;
    };
    for presented in [None, Some("wrong-token-wrong-token"), Some(ADMIN)] {
        let mut request = app.client.get(app.url("/metrics"));
        if let Some(p) = presented {
            request = request.bearer_auth(p);
        }
        let r = request.send().await.expect("request");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{presented:?}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.expect("problem");
        assert_eq!(problem["code"], "invalid_token");
    }
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r
        .text()
        .await
        .expect("text")
        .contains("http_requests_total"));
}

/// Every `resume` replayed the whole history: a socket could loop on it.
/// Three at once, then one per 10 s; the excess is ignored.
async fn resume_is_rate_limited_per_socket(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let d = app.register("resume@example.com", "device_resume_1").await;
    app.lock(&d.device_id, "FORCE_OVERLAY").await;
    let mut socket = connect(&app, "", &[bearer(&d)]).await.expect("accepted");
    next_json(&mut socket).await; // state
    assert_eq!(next_json(&mut socket).await["seq"], 1); // the unacked command
    for _ in 0..5 {
        send(&mut socket, json!({"type": "resume", "since_seq": 0})).await;
    }
    for i in 0..3 {
        let replay = next_json(&mut socket).await;
        assert_eq!(replay["seq"], 1, "replay {i}");
    }
    match tokio::time::timeout(Duration::from_millis(500), socket.next()).await {
        Err(_) | Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
        Ok(other) => panic!("resumes over the rate are ignored, got {other:?}"),
    }
}

/// A lock delivered on a socket used to leave the socket open on the
/// token it was opened with; it now closes (4003), the device reconnects
/// (a locked device may), learns its state and waits for `UNLOCK`.
async fn a_lock_closes_the_socket_after_the_command(backend: Backend) {
    let Some(app) = with_admin(backend, |_| {}).await else {
        return;
    };
    let d = app.register("locked@example.com", "device_locked_1").await;
    let mut socket = connect(&app, "", &[bearer(&d)]).await.expect("accepted");
    next_json(&mut socket).await;
    app.lock(&d.device_id, "CRITICAL_LOCK").await;
    let command = next_json(&mut socket).await;
    assert_eq!(command["action"], "CRITICAL_LOCK");
    // The ack, sent before the device saw the close, still counts.
    send(&mut socket, json!({"type": "ack", "id": command["id"]})).await;
    assert_eq!(
        close_frame(&mut socket, Duration::from_secs(5)).await,
        (4003, "locked".to_owned())
    );
    let acked = blockremote::state::keys::command_acked(&d.device_id);
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.state.shared.get(&acked).await.expect("get").as_deref() == Some(&b"1"[..])
        })
        .await,
        "ack saved"
    );
    let mut again = connect(&app, "", &[bearer(&d)])
        .await
        .expect("a locked device reconnects");
    assert_eq!(
        next_json(&mut again).await,
        json!({"type": "state", "locked": true, "action": "CRITICAL_LOCK", "seq": 1})
    );
    still_open(&mut again).await;
    app.unlock(&d.device_id).await;
    assert_eq!(next_json(&mut again).await["action"], "UNLOCK");
    still_open(&mut again).await;
}

/// Revoking a device (refresh-token reuse) or ending its session (logout)
/// used to leave its socket open; it now closes with 4004 `revoked`.
async fn revoking_or_ending_the_session_closes_the_socket(backend: Backend) {
    // Strict rotation, so the second use of one token is reuse.
    let Some(app) = with_admin(backend, |c| c.refresh_reuse_interval = Duration::ZERO).await else {
        return;
    };
    let d = app.register("reused@example.com", "device_reused_1").await;
    let mut socket = connect(&app, "", &[bearer(&d)]).await.expect("accepted");
    next_json(&mut socket).await;
    for expected in [StatusCode::OK, StatusCode::UNAUTHORIZED] {
        let r = app
            .refresh(&d.refresh, &d.device_id, &format!("fp-{}", d.device_id))
            .await;
        assert_eq!(r.status(), expected);
    }
    let command = next_json(&mut socket).await;
    assert_eq!(command["reason"], "refresh_token_reuse");
    assert_eq!(
        close_frame(&mut socket, Duration::from_secs(5)).await,
        (4004, "revoked".to_owned())
    );

    let e = app.register("leaving@example.com", "device_leaving1").await;
    let mut socket = connect(&app, "", &[bearer(&e)]).await.expect("accepted");
    next_json(&mut socket).await;
    let r = app
        .device_post("/v1/auth/logout", &e.access, Some(&e.device_id), None)
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        close_frame(&mut socket, Duration::from_secs(5)).await,
        (4004, "revoked".to_owned())
    );
}

/// A socket outlived its token (110 s on a 60 s token, and forever while
/// it answered pings); it now closes at the token's `exp`.
async fn a_socket_closes_when_its_token_expires(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.access_token_ttl = Duration::from_secs(2);
    })
    .await
    else {
        return;
    };
    let r = app
        .post_json(
            "/v1/auth/register",
            &client::credentials("brief@example.com", "device_brief_01"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.expect("json");
    let access = body["access_token"].as_str().expect("token").to_owned();
    let mut socket = connect(&app, "", &[("authorization", format!("Bearer {access}"))])
        .await
        .expect("accepted");
    next_json(&mut socket).await;
    let opened = std::time::Instant::now();
    assert_eq!(
        close_frame(&mut socket, Duration::from_secs(6)).await,
        (4002, "token_expired".to_owned())
    );
    assert!(opened.elapsed() <= Duration::from_secs(4));
}

/// Each address of one IPv6 /64 used to get its own handshake budget, and a
/// host has a whole /64 to rotate through.
async fn the_handshake_limiter_counts_an_ipv6_64_as_one_client(backend: Backend) {
    let Some(app) = with_admin(backend, |c| {
        c.ws_handshakes_per_minute = 2;
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await
    else {
        return;
    };
    // The limiter runs before credentials: an allowed handshake without a
    // token is 401, a limited one 429.
    let from = |ip: &str| vec![("x-forwarded-for", ip.to_owned())];
    let mut outcomes = Vec::new();
    for ip in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2:ffff::3",
        "2001:db8:1:3::1",
        "203.0.113.7",
        "203.0.113.8",
    ] {
        outcomes.push(connect(&app, "", &from(ip)).await.err().map(|(s, _)| s));
    }
    assert_eq!(
        outcomes,
        [
            Some(401),
            Some(401),
            Some(429),
            Some(401),
            Some(401),
            Some(401)
        ],
        "one /64 shares a budget; other /64s and IPv4 addresses have their own"
    );
}
