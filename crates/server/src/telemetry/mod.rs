//! Logs, traces and metrics.
//!
//! Logs are structured (`tracing`), JSON by default so a log shipper can index
//! `request_id`, `trace_id`, `device_id` and friends. Traces are exported over
//! OTLP when the standard `OTEL_*` variables ask for it ([`trace`]). Metrics
//! live in a [`Metrics`] value owned by the application state ([`metrics`]).

pub mod metrics;
pub mod trace;
pub mod watch;

pub use metrics::{HttpLabels, Metrics, ReasonLabels};

tokio::task_local! {
    /// The id of the request this task is serving (set by the HTTP
    /// request-context layer): audit rows written on its behalf carry it.
    /// A task spawned from a request does not inherit it.
    static REQUEST_ID: std::sync::Arc<str>;
}

/// Runs `future` as serving request `id` (see [`request_id`]).
pub async fn with_request_id<F: std::future::Future>(
    id: std::sync::Arc<str>,
    future: F,
) -> F::Output {
    REQUEST_ID.scope(id, future).await
}

/// The id of the request this task is serving, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.to_string()).ok()
}

use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer, Registry};

/// What is exported as spans: ours and the libraries' at info, never the
/// exporter's own transport.
const SPAN_FILTER: &str = "info,sqlx=warn,tower_http=warn,tonic=off,h2=off,hyper=off,tower=off";

use crate::config::LogFormat;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Long-running processes (`serve`, `worker`): stdout, for the log shipper.
    Stdout,
    /// One-shot commands: stderr, so stdout carries only their output
    /// (a key id, a new admin key) and can be piped.
    Stderr,
}

/// Installs the process-wide log subscriber. Call once, from `main`.
///
/// The level comes from `RUST_LOG` (default `info`); sqlx's per-statement
/// logging is quietened so queries never reach the logs with their values.
/// With a `tracer` ([`trace::Tracing::from_env`]), spans are exported too.
pub fn init_logging(
    format: LogFormat,
    target: LogTarget,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) {
    let writer = move || -> Box<dyn std::io::Write> {
        match target {
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::Stderr => Box::new(std::io::stderr()),
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt::layer().with_writer(writer).with_filter(filter).boxed(),
    };
    // Spans are exported at info whatever `RUST_LOG` says of the logs (a
    // quiet log must not silence traces); the exporter's own transport
    // (tonic, h2, hyper) stays out, or exporting would make spans to export.
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new(SPAN_FILTER))
            .boxed()
    });
    let result = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    // A second init (tests) keeps the first subscriber; that is fine.
    drop(result);
}
