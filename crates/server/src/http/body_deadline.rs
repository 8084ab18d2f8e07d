//! The request-body deadline: a body must arrive within
//! `BLOCKREMOTE_BODY_READ_TIMEOUT_SECONDS` of its head.
//!
//! A client that sends its head and then its body a byte at a time would
//! otherwise hold a request (and its handler) until the request timeout, and
//! get a 503 that blames the server. Here the body is wrapped: once the
//! deadline passes while a handler waits for more of it, the body fails, and
//! whatever the handler made of that failure is replaced by 408
//! `request_timeout` with `Connection: close` (the rest of the body is never
//! read). A 408 is the client's doing, so the access log has it at INFO.
//!
//! The timer is created only if a read has to wait: most bodies are complete
//! when the handler first reads them, and most requests have none.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{
    app::AppState,
    error::{codes, ApiError},
};

/// The deadline middleware (see the module docs).
pub async fn body_deadline(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + state.config.body_read_timeout;
    let request = request.map(|inner| {
        Body::new(Deadline {
            inner,
            deadline,
            sleep: None,
            expired: expired.clone(),
        })
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    let mut response = ApiError::Client {
        status: StatusCode::REQUEST_TIMEOUT,
        code: codes::REQUEST_TIMEOUT,
        detail: "The request body did not arrive in time.",
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why a body read failed: its deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

/// A request body with a deadline.
struct Deadline {
    inner: Body,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.expired.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frame(body: &mut Deadline) -> Option<Result<Frame<bytes::Bytes>, axum::Error>> {
        futures::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await
    }

    #[tokio::test]
    async fn a_body_that_stalls_fails_at_the_deadline() {
        let (mut tx, inner) = {
            let (tx, rx) =
                futures::channel::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
            (tx, Body::from_stream(rx))
        };
        let expired = Arc::new(AtomicBool::new(false));
        let mut body = Deadline {
            inner,
            deadline: Instant::now() + std::time::Duration::from_millis(200),
            sleep: None,
            expired: expired.clone(),
        };
        futures::SinkExt::send(&mut tx, Ok(bytes::Bytes::from_static(b"{")))
            .await
            .expect("send");
        let first = frame(&mut body).await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), &b"{"[..]);
        let started = Instant::now();
        let err = frame(&mut body)
            .await
            .expect("an error")
            .expect_err("timed out");
        assert!(err.to_string().contains("did not arrive in time"), "{err}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(150));
        assert!(expired.load(Ordering::Relaxed));
    }
}
