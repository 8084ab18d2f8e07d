//! Attacks on the transport: connections that never finish a request
//! (slowloris), bodies sent a byte at a time, heads too large to buffer,
//! connection floods, and an open `/metrics`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{eventually, spawn_app_with, Backend, TestApp};

crate::on_both_backends!(
    a_partial_request_head_is_answered_408_and_closed,
    an_idle_keep_alive_connection_is_closed,
    an_oversize_request_head_is_refused,
    connections_over_the_cap_are_refused_while_held_ones_work,
    a_slow_body_gets_408_request_timeout,
    metrics_require_the_configured_bearer_token,
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

    // A connection that never sends a byte is closed too (without an answer).
    let mut silent = raw(&app).await;
    let answer = read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert_eq!(answer, "");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"http_connection_timeouts_total{reason="header"} 2"#),
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
