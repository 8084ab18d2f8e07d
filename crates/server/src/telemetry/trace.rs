//! Traces: OTLP export when asked for, and W3C trace context in and out.
//!
//! **Off by default.** Export starts only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not when
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK reads the
//! rest of the standard variables itself: `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` (default service name `blockremote`),
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default: parent-based,
//! always on), `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT`. Spans go out over
//! OTLP/gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc`, the only one this build
//! speaks; anything else is refused at start rather than silently ignored).
//!
//! **Never blocking a request.** A finished span is handed to a bounded
//! queue ([`QUEUE`] spans) with a non-blocking send; one task exports batches
//! of up to [`MAX_BATCH`] spans at least every [`EXPORT_EVERY`], each export
//! bounded by [`EXPORT_TIMEOUT`]. A span that finds the queue full, or whose
//! batch failed to export, is dropped and counted (`otel_spans_dropped_total`);
//! exported ones are counted too (`otel_spans_exported_total`). We use this
//! processor rather than the SDK's batch processor because the SDK's does not
//! say how many spans it dropped.
//!
//! **Through the queue.** A heartbeat's ingest span writes its context
//! (`traceparent`) and the request id into the queued job
//! ([`crate::signals::ingest::JobTrace`]); the worker opens its scoring span
//! as a child of that context, so ingest and scoring are one trace, and the
//! kill-switch publish inside scoring is a span of it too. When export is
//! off, a `traceparent` the client sent still travels, so the worker's log
//! lines carry the client's trace id.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
    Context,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor},
    Resource,
};
use tokio::sync::{mpsc, oneshot};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Spans waiting for export at most; more are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Spans per export call at most.
pub const MAX_BATCH: usize = 512;
/// A partial batch waits at most this long.
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// One export call's bound.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spans dropped since start: queue full or export failed. Process-wide
/// because the tracing pipeline is (one subscriber per process); every
/// [`super::Metrics`] reports it.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans exported since start.
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Whether this process exports spans (set once, at start): when it does
/// not, the request path skips every OpenTelemetry call.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `(dropped, exported)` spans since the process started.
pub fn span_counts() -> (u64, u64) {
    (
        DROPPED.load(Ordering::Relaxed),
        EXPORTED.load(Ordering::Relaxed),
    )
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    /// A transport this build does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0} is not supported: this build exports OTLP over gRPC (set it to `grpc` or leave it unset)")]
    Protocol(String),
    /// The exporter could not be built (a malformed endpoint, say).
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// Whether the environment asks for trace export (see the module docs).
pub fn export_requested(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let none = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled
        && !none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// A running export pipeline; [`shutdown`](Self::shutdown) flushes it.
pub struct Tracing {
    provider: SdkTracerProvider,
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

impl Tracing {
    /// Builds the exporter and the pipeline from the environment. Must be
    /// called inside the Tokio runtime (the exporter and its task live there).
    pub fn from_env(
        role: &str,
    ) -> Result<(Self, opentelemetry_sdk::trace::SdkTracer), TraceSetupError> {
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Ok(protocol) = std::env::var(name) {
                if !protocol.trim().is_empty() && protocol.trim() != "grpc" {
                    return Err(TraceSetupError::Protocol(protocol));
                }
            }
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TraceSetupError::Exporter(e.to_string()))?;
        let (processor, flush) = BoundedProcessor::start(exporter);
        let mut resource = Resource::builder();
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
                v.split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        if !named {
            resource = resource.with_service_name("blockremote");
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "blockremote.role",
                role.to_owned(),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("blockremote");
        EXPORTING.store(true, Ordering::Relaxed);
        Ok((Self { provider, flush }, tracer))
    }

    /// Exports what is queued (bounded by `within`), then stops the pipeline.
    pub async fn shutdown(self, within: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(within, flushed).await;
        }
        let _ = self.provider.shutdown();
    }
}

/// The span processor of the module docs: a bounded queue and one export task.
#[derive(Debug)]
struct BoundedProcessor {
    spans: mpsc::Sender<SpanData>,
    /// The exporter until the task takes it (the provider hands the
    /// resource to the processor first, at build).
    resource: Mutex<Option<mpsc::Sender<Resource>>>,
}

impl BoundedProcessor {
    fn start(
        mut exporter: opentelemetry_otlp::SpanExporter,
    ) -> (Self, mpsc::Sender<oneshot::Sender<()>>) {
        let (spans, mut queued) = mpsc::channel::<SpanData>(QUEUE);
        let (flush, mut flushes) = mpsc::channel::<oneshot::Sender<()>>(4);
        let (resource, mut resources) = mpsc::channel::<Resource>(1);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            let mut tick = tokio::time::interval(EXPORT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut incoming = Vec::with_capacity(MAX_BATCH);
            loop {
                let mut flushed = None;
                let room = MAX_BATCH - batch.len();
                let closed = tokio::select! {
                    biased;
                    Some(resource) = resources.recv() => {
                        exporter.set_resource(&resource);
                        continue;
                    }
                    n = queued.recv_many(&mut incoming, room) => {
                        batch.append(&mut incoming);
                        n == 0
                    }
                    Some(done) = flushes.recv() => {
                        while batch.len() < MAX_BATCH {
                            match queued.try_recv() {
                                Ok(span) => batch.push(span),
                                Err(_) => break,
                            }
                        }
                        flushed = Some(done);
                        true
                    }
                    _ = tick.tick() => true,
                };
                if (closed || batch.len() >= MAX_BATCH) && !batch.is_empty() {
                    let spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
                    let n = spans.len() as u64;
                    match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
                        Ok(Ok(())) => EXPORTED.fetch_add(n, Ordering::Relaxed),
                        _ => DROPPED.fetch_add(n, Ordering::Relaxed),
                    };
                }
                if let Some(done) = flushed {
                    let _ = done.send(());
                }
                if queued.is_closed() && queued.is_empty() && batch.is_empty() {
                    let _ = exporter.shutdown();
                    return;
                }
            }
        });
        (
            Self {
                spans,
                resource: Mutex::new(Some(resource)),
            },
            flush,
        )
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing waits on the export task, which needs the runtime this
        // call may be blocking: [`Tracing::shutdown`] flushes, asynchronously.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let sender = self
            .resource
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(sender) = sender {
            let _ = sender.try_send(resource.clone());
        }
    }
}

/// W3C trace context read from an HTTP request's headers.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// One `traceparent` (the only key the job carries).
struct Traceparent<'a>(Option<&'a str>);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[derive(Default)]
struct Written {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Makes `span` a child of the trace context in `headers` (`traceparent`,
/// `tracestate`), when there is one and export is on; returns the span's
/// trace id when it has one (export on, or not: then the caller's own).
pub fn adopt_request_context(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    if !exporting() {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| own.trace_id().to_string())
}

/// The `traceparent` (and `tracestate`) to answer with or to pass on:
/// `span`'s own context, when export is on and it is sampled.
pub fn outgoing(span: &tracing::Span) -> Option<(String, Option<String>)> {
    if !exporting() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_sampled() {
        return None;
    }
    let mut written = Written::default();
    TraceContextPropagator::new().inject_context(&context, &mut written);
    written.traceparent.map(|t| (t, written.tracestate))
}

/// Makes `span` a child of a `traceparent` carried in a queued job or a
/// published command (a no-op when export is off or the value is not a
/// valid context).
pub fn adopt_context(span: &tracing::Span, traceparent: &str) {
    if !exporting() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Traceparent(Some(traceparent)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` a job queued now carries: the current span's (export
/// on), else the caller's own (`incoming`, so the worker's logs still name
/// the caller's trace).
pub fn job_traceparent(incoming: impl FnOnce() -> Option<String>) -> Option<String> {
    if !exporting() {
        return incoming();
    }
    outgoing(&tracing::Span::current())
        .map(|(traceparent, _)| traceparent)
        .or_else(incoming)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert!(!export_requested(env(&[])));
        assert!(!export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4317"
        )])));
        assert!(export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://collector:4317"
        )])));
        assert!(!export_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])));
        assert!(!export_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
    }

    #[test]
    fn without_export_no_context_is_made_or_passed_on() {
        // No OpenTelemetry layer in this test's subscriber: nothing to adopt.
        let span = tracing::info_span!("test");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        assert_eq!(adopt_request_context(&span, &headers), None);
        assert_eq!(outgoing(&span), None);
    }
}
