//! The request context: the outermost layer every request passes through.
//!
//! It gives each request an id (`X-Request-Id`, echoed when the client sent a
//! sane one), opens the request span with the W3C trace context from
//! `traceparent`, renders every error as problem+json with that id, records
//! the request metrics, and writes one log line per request.

use std::time::Instant;

use axum::{
    body::Body,
    extract::{MatchedPath, State},
    http::{header, HeaderValue, Request},
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

use crate::{
    app::AppState,
    error::{Problem, PROBLEM_JSON},
};

/// The header carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The id of the request being handled, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// W3C trace context parsed from `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the caller's span.
    pub parent_id: String,
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The `traceparent` header value (version 00).
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

/// A client-supplied request id is echoed only if it is 1–128 characters of
/// `[A-Za-z0-9._:-]`; anything else (log injection, huge values) is replaced.
pub fn sane_request_id(raw: &str) -> bool {
    (1..=128).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Parses a W3C `traceparent` (version 00 layout; future versions are read
/// by their first four fields, as the spec asks). Invalid values are ignored.
pub fn parse_traceparent(raw: &str) -> Option<TraceContext> {
    let mut parts = raw.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(parent_id, 16) || !hex(flags, 2) {
        return None;
    }
    if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(TraceContext {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

/// The request-context middleware (see the module docs).
pub async fn request_context(
    State(state): State<AppState>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let trace = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();

    let span = tracing::info_span!(
        "http.request",
        request_id = %request_id,
        method = %method,
        route = %route,
        trace_id = tracing::field::Empty,
        parent_span_id = trace.as_ref().map(|t| t.parent_id.as_str()).unwrap_or(""),
        device_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    // With export on, the span joins the caller's trace (or starts one);
    // the log lines carry that trace's id either way.
    let trace_id = crate::telemetry::trace::adopt_request_context(&span, request.headers())
        .or_else(|| trace.as_ref().map(|t| t.trace_id.clone()));
    if let Some(trace_id) = &trace_id {
        span.record("trace_id", trace_id.as_str());
    }
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    if let Some(trace) = trace {
        request.extensions_mut().insert(trace);
    }

    let mut response = crate::telemetry::with_request_id(
        request_id.as_str().into(),
        next.run(request).instrument(span.clone()),
    )
    .await;

    response = render_problem(response, &request_id);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    // The server span's own context, so a caller can find this hop's span.
    if let Some((traceparent, tracestate)) = crate::telemetry::trace::outgoing(&span) {
        for (name, value) in [
            ("traceparent", Some(traceparent)),
            ("tracestate", tracestate),
        ] {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    let status = response.status();
    let elapsed = started.elapsed();
    state.metrics.observe_request(
        method_label(&method),
        &route,
        status.as_u16(),
        elapsed.as_secs_f64(),
    );
    span.in_scope(|| {
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), latency_ms, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), latency_ms, "request finished");
        }
    });
    response
}

/// The method as a metric label: the standard ones by name, any extension
/// method a client invents as `OTHER` (label sets stay bounded).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Ensures an error response is problem+json carrying the request id:
/// ours (a [`Problem`] in the extensions) is rendered; a bare error status
/// from a layer below (timeout, body limit, panic, axum rejection) is
/// replaced by the generic problem for its status.
fn render_problem(response: Response, request_id: &str) -> Response {
    let status = response.status();
    if let Some(problem) = response.extensions().get::<Problem>().cloned() {
        let (mut parts, _) = response.into_parts();
        let rendered = problem.into_response_with_id(request_id);
        let (rendered_parts, body) = rendered.into_parts();
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.status = rendered_parts.status;
        return Response::from_parts(parts, body);
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if status.as_u16() >= 400 && !is_problem {
        let (mut parts, _) = response.into_parts();
        let rendered = Problem::for_status(status).into_response_with_id(request_id);
        let (_, body) = rendered.into_parts();
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, body);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invented_methods_share_one_label() {
        for (raw, label) in [
            ("GET", "GET"),
            ("PATCH", "PATCH"),
            ("BREW", "OTHER"),
            ("X-1", "OTHER"),
        ] {
            let method = axum::http::Method::from_bytes(raw.as_bytes()).expect("a token");
            assert_eq!(method_label(&method), label);
        }
    }

    #[test]
    fn traceparent_examples_from_the_spec() {
        let t = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A future version may append fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
                .is_some()
        );
    }

    #[test]
    fn request_ids_are_sanitised() {
        assert!(sane_request_id("req-123_abc.def:9"));
        assert!(!sane_request_id(""));
        assert!(!sane_request_id("a b"));
        assert!(!sane_request_id("line\nbreak"));
        assert!(!sane_request_id(&"x".repeat(129)));
    }

    proptest! {
        #[test]
        fn traceparent_never_panics(raw in ".{0,80}") {
            let _ = parse_traceparent(&raw);
        }

        #[test]
        fn valid_traceparents_round_trip(trace in "[0-9a-f]{32}", parent in "[0-9a-f]{16}", flags in 0u8..=255) {
            prop_assume!(trace.bytes().any(|b| b != b'0') && parent.bytes().any(|b| b != b'0'));
            let raw = format!("00-{trace}-{parent}-{flags:02x}");
            let parsed = parse_traceparent(&raw).expect("valid");
            prop_assert_eq!(parsed.trace_id, trace);
            prop_assert_eq!(parsed.parent_id, parent);
            prop_assert_eq!(parsed.flags, flags);
        }
    }
}
