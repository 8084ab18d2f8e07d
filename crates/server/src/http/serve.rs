//! Serving connections: HTTP/1.1 through hyper, with the timers and bounds
//! `axum::serve` does not set.
//!
//! `axum::serve` drives hyper without a timer, so a client that opens a
//! connection and sends nothing, half a request head, or nothing more after a
//! response holds a socket and a task forever (slowloris). Here every
//! connection is bounded, with the semantics of Go's `ReadHeaderTimeout` and
//! `IdleTimeout`:
//!
//! - **header read**: a request head must arrive within
//!   `header_read_timeout` of the connection opening, or of the first byte of
//!   the next request on a kept-alive connection. A head that had begun is
//!   answered 408 `request_timeout` (problem+json), then the connection is
//!   closed; a connection that sent nothing is closed.
//! - **idle**: a kept-alive connection with no request in flight is closed
//!   after `keepalive_timeout`.
//! - **head size**: at most `max_header_bytes`, request line included
//!   (hyper answers 431 and closes).
//! - **connections**: at most `max_connections` at once. One more is answered
//!   503 `too_many_connections` at once and closed, and counted in
//!   `http_connections_refused_total`. A connection upgraded to a kill-switch
//!   socket leaves this count: sockets have their own caps (`realtime::hub`),
//!   so a full HTTP side never stops a device from keeping its socket.
//!
//! The timers live in [`TimedIo`], the connection's byte stream, and follow
//! the connection's [`Phase`], which the service wrapper moves as requests
//! start and their responses finish. A body that arrives too slowly is the
//! application's to answer (`http::body_deadline`), through the normal
//! layers. HTTP/2 and TLS terminate at the load balancer; this listener speaks
//! HTTP/1.1 (and upgrades).
//!
//! On shutdown the accept loop stops, each connection finishes its in-flight
//! request and closes (idle ones at once), and [`serve`] returns once all
//! have; upgraded sockets are closed by the hub, not here.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::ConnectInfo, Router};
use futures::task::AtomicWaker;
use http::{Request, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{
    config::Config,
    error::{codes, Problem, PROBLEM_JSON},
    telemetry::Metrics,
};

/// The bounds every connection is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See the module docs.
    pub header_read_timeout: Duration,
    /// See the module docs.
    pub keepalive_timeout: Duration,
    /// See the module docs.
    pub max_header_bytes: usize,
    /// See the module docs.
    pub max_connections: usize,
}

impl Limits {
    /// The configured bounds.
    pub fn from_config(config: &Config) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            keepalive_timeout: config.keepalive_timeout,
            max_header_bytes: config.max_header_bytes,
            max_connections: config.max_connections,
        }
    }
}

/// Serves `router` on `listener` until `stop`, then drains (see the module docs).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a receiver; `closed` resolves when all are gone.
    let (drained_tx, drained_rx) = watch::channel(());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Our own header timer (in `TimedIo`) starts at the first byte of a
        // kept-alive request, so it does not also cut idle connections short.
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            refuse(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::new(limits));
        let io = TokioIo::new(TimedIo::new(stream, conn.clone(), metrics.clone()));
        let service = service(router.clone(), conn, peer);
        let connection = builder.serve_connection(io, service).with_upgrades();
        let (stop, drained, metrics) = (stop.clone(), drained_rx.clone(), metrics.clone());
        metrics.http_connections_open.inc();
        tokio::spawn(async move {
            tokio::pin!(connection);
            let mut draining = false;
            let result = loop {
                tokio::select! {
                    result = connection.as_mut() => break result,
                    () = stop.cancelled(), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics.http_connections_open.dec();
            drop((permit, drained));
        });
    }
    drop(listener);
    drop(drained_rx);
    drained_tx.closed().await;
    Ok(())
}

/// The router as a hyper service for one connection: the peer address as
/// `ConnectInfo`, and the connection's phase moved as requests come and go.
fn service(
    router: Router,
    conn: Arc<Conn>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let in_flight = InFlight::start(conn.clone());
        let router = router.clone();
        async move {
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                in_flight.0.upgraded();
            }
            // The request is in flight until its response body is done.
            Ok(response.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        }
    })
}

/// Logs a failed accept; waits a moment when it is not the peer's doing
/// (e.g. out of file descriptors), so the loop does not spin.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Answers a connection over the cap and lets it close (the stream is
/// dropped by the caller). One non-blocking write: nothing waits on it.
fn refuse(stream: &TcpStream) {
    let response = canned(
        StatusCode::SERVICE_UNAVAILABLE,
        codes::TOO_MANY_CONNECTIONS,
        "The server holds as many connections as it allows; retry later.",
        &[("retry-after", "1")],
    );
    let _ = stream.try_write(&response);
}

/// A complete HTTP/1.1 problem response that closes the connection, for
/// answers given below the router (no request was handed to it).
fn canned(status: StatusCode, code: &str, detail: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut problem = Problem::new(status, code, detail);
    problem.request_id = request_id.clone();
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\n\
         connection: close\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n\
         x-request-id: {request_id}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Where a connection is in its life; decides which timer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head since `since`; `begun` once a byte of it arrived.
    Head { since: Instant, begun: bool },
    /// This many requests are being answered: no connection timer (the
    /// request timeout and the body deadline bound them).
    Busy(usize),
    /// Kept alive with no request since `since`.
    Idle { since: Instant },
    /// Handed over to a WebSocket: the socket keeps its own time.
    Upgraded,
}

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Header { begun: bool },
    Idle,
}

/// One connection's phase, shared by its byte stream and its service.
struct Conn {
    phase: Mutex<Phase>,
    /// The last reader of the stream, woken when the phase changes so the
    /// timer of the new phase is armed.
    reader: AtomicWaker,
    limits: Limits,
}

impl Conn {
    fn new(limits: Limits) -> Self {
        Self {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
                begun: false,
            }),
            reader: AtomicWaker::new(),
            limits,
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_read(&self) {
        let mut phase = self.phase();
        match *phase {
            Phase::Idle { .. } => {
                *phase = Phase::Head {
                    since: Instant::now(),
                    begun: true,
                }
            }
            Phase::Head { since, .. } => *phase = Phase::Head { since, begun: true },
            Phase::Busy(_) | Phase::Upgraded => {}
        }
    }

    fn request_started(&self) {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Upgraded => Phase::Upgraded,
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy(1),
        };
    }

    fn request_finished(&self) {
        {
            let mut phase = self.phase();
            if let Phase::Busy(n) = *phase {
                *phase = if n <= 1 {
                    Phase::Idle {
                        since: Instant::now(),
                    }
                } else {
                    Phase::Busy(n - 1)
                };
            }
        }
        self.reader.wake();
    }

    fn upgraded(&self) {
        *self.phase() = Phase::Upgraded;
    }

    fn deadline(&self) -> Option<(Instant, Expiry)> {
        match *self.phase() {
            Phase::Head { since, begun } => Some((
                since + self.limits.header_read_timeout,
                Expiry::Header { begun },
            )),
            Phase::Idle { since } => Some((since + self.limits.keepalive_timeout, Expiry::Idle)),
            Phase::Busy(_) | Phase::Upgraded => None,
        }
    }
}

/// A request in flight on its connection, until dropped.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn start(conn: Arc<Conn>) -> Self {
        conn.request_started();
        Self(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that keeps its request in flight until it is written.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream, with the timer of its phase: when it runs
/// out while hyper waits for bytes, the stream answers 408 if a head had
/// begun, then reads as closed, so hyper closes the connection.
struct TimedIo {
    stream: TcpStream,
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    expired: bool,
}

impl TimedIo {
    fn new(stream: TcpStream, conn: Arc<Conn>, metrics: Arc<Metrics>) -> Self {
        Self {
            stream,
            conn,
            metrics,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            expired: false,
        }
    }

    fn expire(&mut self, cx: &mut Context<'_>, expiry: Expiry) {
        self.expired = true;
        let reason = match expiry {
            Expiry::Header { begun } => {
                if begun {
                    let response = canned(
                        StatusCode::REQUEST_TIMEOUT,
                        codes::REQUEST_TIMEOUT,
                        "The request head did not arrive in time.",
                        &[],
                    );
                    // Nothing else is being written: the head is not complete.
                    let _ = Pin::new(&mut self.stream).poll_write(cx, &response);
                }
                "header"
            }
            Expiry::Idle => "idle",
        };
        self.metrics
            .http_connection_timeouts
            .get_or_create(&crate::telemetry::ReasonLabels { reason })
            .inc();
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.bytes_read();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        this.conn.reader.register(cx.waker());
        loop {
            let Some((at, expiry)) = this.conn.deadline() else {
                return Poll::Pending;
            };
            if this.armed != Some(at) {
                this.sleep.as_mut().reset(at);
                this.armed = Some(at);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The phase may have moved while the timer ran: only its own
            // deadline counts.
            if this.conn.deadline().map(|(now_at, _)| now_at) == Some(at) {
                this.expire(cx, expiry);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            max_header_bytes: 16_384,
            max_connections: 4,
        }
    }

    #[test]
    fn the_phase_picks_the_timer() {
        let opened = Instant::now();
        let conn = Conn::new(limits());
        let (at, expiry) = conn.deadline().expect("header timer from the start");
        assert_eq!(expiry, Expiry::Header { begun: false });
        assert!(at >= opened + Duration::from_secs(10));
        conn.bytes_read();
        assert_eq!(
            conn.deadline().map(|d| d.1),
            Some(Expiry::Header { begun: true })
        );
        conn.request_started();
        assert_eq!(conn.deadline(), None, "a request in flight has no timer");
        let finished = Instant::now();
        conn.request_finished();
        let (at, expiry) = conn.deadline().expect("idle timer");
        assert_eq!(expiry, Expiry::Idle);
        assert!(
            at >= finished + Duration::from_secs(75)
                && at <= Instant::now() + Duration::from_secs(75)
        );
        // The next request's first byte starts its header timer.
        let first_byte = Instant::now();
        conn.bytes_read();
        let (at, expiry) = conn.deadline().expect("header timer");
        assert_eq!(expiry, Expiry::Header { begun: true });
        assert!(at >= first_byte + Duration::from_secs(10));
        conn.request_started();
        conn.upgraded();
        conn.request_finished();
        assert_eq!(conn.deadline(), None, "an upgraded connection has no timer");
    }

    #[test]
    fn canned_answers_are_complete_problem_responses() {
        let bytes = canned(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::TOO_MANY_CONNECTIONS,
            "full",
            &[("retry-after", "1")],
        );
        let text = String::from_utf8(bytes).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(problem["code"], "too_many_connections");
        assert_eq!(problem["status"], 503);
    }
}
