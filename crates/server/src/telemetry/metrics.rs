//! Every metric the server and the workers export.
//!
//! Metrics live in a [`Metrics`] value owned by the application state — no
//! global recorder — so several servers in one test process never mix their
//! numbers. Labels are bounded sets (routes, reasons, outcomes, rule names):
//! never a device id, user id or IP.
//!
//! Histogram buckets, by what they measure:
//! - request, handshake, delivery and scoring latency: 0.25 ms … ~8 s,
//!   doubling (16 buckets) — a heartbeat answers in well under a millisecond
//!   and a slow request in seconds;
//! - Redis commands and pool acquires: 50 µs … ~1.6 s, doubling — a command
//!   on loopback takes tens of µs and the call timeout is well under a second;
//! - argon2 queue wait: 0.5 ms … ~0.5 s, doubling — a hash takes tens of
//!   ms, the queue only forms under a sign-in burst, and a request waits at
//!   most 250 ms before it is refused.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of a count by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason's stable name.
    pub reason: &'static str,
}

/// Labels of the per-request metrics. `route` is the matched route template,
/// never the raw path, so label cardinality stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: String,
    /// Matched route template, or `unmatched`.
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// Labels of a count by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The outcome's stable name.
    pub outcome: &'static str,
}

/// Labels of a Redis command's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    /// The command (`GET`, `XADD`, …), the script's name for `EVALSHA`,
    /// `pipeline` for a pipeline, `other` for anything unlisted.
    pub op: &'static str,
    /// `ok`, `error` (Redis answered with an error or the connection
    /// failed), `timeout` or `rejected` (the breaker was open).
    pub outcome: &'static str,
}

/// Labels of a firewall rule's counts. Rule names are the operator's (a
/// bounded set: the rules table), never an entity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule's name.
    pub rule: String,
    /// `enforce`, `simulate` or `off`.
    pub mode: &'static str,
}

/// Labels of a webhook delivery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `inbound` (billing events received).
    pub direction: &'static str,
    /// What became of it (`accepted`, `duplicate`, `invalid_signature`, …).
    pub outcome: &'static str,
}

/// Labels of an attestation verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestationLabels {
    /// `test`, `play_integrity` or `app_attest`.
    pub provider: &'static str,
    /// `verified` or `failed` (a malformed attestation is refused before
    /// any verdict, and not counted here).
    pub result: &'static str,
}

/// Labels of a kill-switch command issued.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `LOCK`, `UNLOCK`, …
    pub action: &'static str,
    /// Who asked: `engine`, `admin`, `firewall`, `session` (refresh-token
    /// reuse) or `attestation`.
    pub origin: &'static str,
}

/// Labels of the database pool's gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `in_use` or `idle`.
    pub state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn fast_histogram() -> Histogram {
    // 50 µs … ~1.6 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 16,
    ))
}

fn queue_histogram() -> Histogram {
    // 0.5 ms … ~0.5 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_5, 2.0, 11,
    ))
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … ~8 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_25, 2.0, 16,
    ))
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// `http_requests_total{method,route,status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `http_request_duration_seconds{method,route,status}`.
    pub http_duration: HistogramFamily<HttpLabels>,
    /// `killswitch_connected_sockets`: sockets open on this instance.
    pub ws_connected: Gauge,
    /// `killswitch_handshake_duration_seconds`: from request to the socket's first message.
    pub ws_handshake: Histogram,
    /// `killswitch_delivery_latency_seconds`: from a command's issue to its write on a socket.
    pub ws_delivery: Histogram,
    /// `killswitch_commands_delivered_total`.
    pub ws_delivered: Counter,
    /// `killswitch_acks_total`.
    pub ws_acks: Counter,
    /// `signals_heartbeats_accepted_total`: heartbeats taken (queued or scored inline).
    pub signals_accepted: Counter,
    /// `signals_replays_total`: heartbeats refused as replays.
    pub signals_replays: Counter,
    /// `signals_heartbeats_scored_total`.
    pub signals_scored: Counter,
    /// `signals_engine_locks_total`: devices locked by the engine.
    pub signals_locks: Counter,
    /// `signals_scoring_duration_seconds`: one heartbeat, lock to report.
    pub signals_scoring_seconds: Histogram,
    /// `signals_queue_backlog`: heartbeats waiting or pending.
    pub signals_backlog: Gauge,
    /// `signals_queue_lag_seconds`: how long the oldest undelivered heartbeat waited.
    pub signals_queue_lag: Gauge<f64, AtomicU64>,
    /// `signals_workers_throughput`: heartbeats all workers scored in the
    /// second before last (the last one every worker has reported).
    pub signals_workers_throughput: Gauge,
    /// `signals_workers_scoring_p95_seconds`: the slowest worker's p95 in
    /// that second.
    pub signals_workers_p95: Gauge<f64, AtomicU64>,
    /// `signals_degraded`: 1 while ingestion scores inline.
    pub signals_degraded: Gauge,
    /// `signals_breaker_trips_total{reason}`: times the breaker degraded, by why.
    pub signals_breaker_trips: Family<ReasonLabels, Counter>,
    /// `signals_degraded_heartbeats_total`: heartbeats scored inline.
    pub signals_degraded_heartbeats: Counter,
    /// `redis_breaker_state`: the Redis circuit breaker, 0 closed, 1
    /// half-open, 2 open (absent meaning: no Redis, always 0).
    pub redis_breaker_state: Gauge,
    /// `redis_rate_limit_fallback_total`: rate-limit takes this instance
    /// answered from its own buckets because Redis was unavailable.
    pub redis_rate_limit_fallback: Counter,
    /// `signals_heartbeats_dropped_total`: queued heartbeats of a device
    /// that does not exist (nothing to score them for; not retried).
    pub signals_dropped: Counter,
    /// `http_connections_open`: HTTP connections (not yet upgraded) open on this instance.
    pub http_connections_open: Gauge,
    /// `http_connections_refused_total`: connections over `BLOCKREMOTE_MAX_CONNECTIONS`.
    pub http_connections_refused: Counter,
    /// `http_connection_timeouts_total{reason}`: connections closed by the
    /// header-read (`header`) or keep-alive (`idle`) timer.
    pub http_connection_timeouts: Family<ReasonLabels, Counter>,
    /// `killswitch_server_closes_total{reason}`: sockets the server closed
    /// with a 4000-range code (`replaced`, `token_expired`, `locked`, `revoked`) or 1009.
    pub ws_server_closes: Family<ReasonLabels, Counter>,
    /// `redis_command_duration_seconds{op,outcome}`.
    pub redis_commands: HistogramFamily<RedisLabels>,
    /// `auth_refresh_attempts_total{outcome}`: `rotated`, `reissued` (the
    /// reuse interval's answer), `reuse`, `invalid`, `rate_limited`,
    /// `refused` (the device or its owner is locked, revoked or blocked),
    /// `error` (a dependency failed).
    pub refresh_attempts: Family<OutcomeLabels, Counter>,
    /// `firewall_evaluations_total{rule,mode}`: events a rule counted.
    pub firewall_evaluations: Family<RuleLabels, Counter>,
    /// `firewall_decisions_total{rule,mode}`: thresholds crossed.
    pub firewall_decisions: Family<RuleLabels, Counter>,
    /// `webhook_deliveries_total{direction,outcome}`.
    pub webhook_deliveries: Family<WebhookLabels, Counter>,
    /// `attestation_verdicts_total{provider,result}`.
    pub attestation_verdicts: Family<AttestationLabels, Counter>,
    /// `killswitch_commands_issued_total{action,origin}`.
    pub commands_issued: Family<CommandLabels, Counter>,
    /// `argon2_queue_wait_seconds`: waiting for a password-hashing slot.
    pub argon2_wait: Histogram,
    /// `db_pool_connections{state}`.
    pub db_pool: Family<PoolLabels, Gauge>,
    /// `db_pool_acquire_duration_seconds`: sampled every few seconds.
    pub db_pool_acquire: Histogram,
    /// `health_ready`: 1 when this process's last readiness check passed.
    pub health_ready: Gauge,
    /// `audit_chain_broken`: 1 when the last verification of the audit
    /// chain found a break; 0 otherwise — until the first verification, and
    /// always on a worker (which does not verify), so an alert on it never
    /// fires for a process that simply has not looked.
    pub audit_chain_broken: Gauge,
    /// `audit_chain_verified_timestamp_seconds`: when it last ran to the end.
    pub audit_chain_verified_at: Gauge<f64, AtomicU64>,
    /// `otel_spans_dropped_total` (process-wide, see `telemetry::trace`).
    pub spans_dropped: Counter,
    /// `otel_spans_exported_total`.
    pub spans_exported: Counter,
    /// Serialises the catch-up of the span counters, so two scrapes at once
    /// cannot both add the same difference.
    span_sync: std::sync::Mutex<()>,
}

fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<HttpLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency in seconds, by method, route and status",
            http_duration.clone(),
        );
        let ws_connected = Gauge::default();
        registry.register(
            "killswitch_connected_sockets",
            "Kill-switch sockets open on this instance",
            ws_connected.clone(),
        );
        let ws_handshake = latency_histogram();
        registry.register(
            "killswitch_handshake_duration_seconds",
            "Kill-switch handshake latency, from request to the first message sent",
            ws_handshake.clone(),
        );
        let ws_delivery = latency_histogram();
        registry.register(
            "killswitch_delivery_latency_seconds",
            "Latency from a command's issue to its write on a socket",
            ws_delivery.clone(),
        );
        let ws_delivered = Counter::default();
        registry.register(
            "killswitch_commands_delivered",
            "Kill-switch commands written to sockets",
            ws_delivered.clone(),
        );
        let ws_acks = Counter::default();
        registry.register(
            "killswitch_acks",
            "Kill-switch commands acknowledged by devices",
            ws_acks.clone(),
        );
        let signals_accepted = Counter::default();
        registry.register(
            "signals_heartbeats_accepted",
            "Heartbeats accepted (queued, or scored inline when degraded)",
            signals_accepted.clone(),
        );
        let signals_replays = Counter::default();
        registry.register(
            "signals_replays",
            "Heartbeats refused because their seq was not new",
            signals_replays.clone(),
        );
        let signals_scored = Counter::default();
        registry.register(
            "signals_heartbeats_scored",
            "Heartbeats scored by the engine",
            signals_scored.clone(),
        );
        let signals_locks = Counter::default();
        registry.register(
            "signals_engine_locks",
            "Devices locked by an engine decision",
            signals_locks.clone(),
        );
        let signals_scoring_seconds = latency_histogram();
        registry.register(
            "signals_scoring_duration_seconds",
            "Time to score one heartbeat, state load to report",
            signals_scoring_seconds.clone(),
        );
        let signals_backlog = Gauge::default();
        registry.register(
            "signals_queue_backlog",
            "Heartbeats waiting or pending in the queue",
            signals_backlog.clone(),
        );
        let signals_queue_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "signals_queue_lag_seconds",
            "How long the oldest heartbeat not yet handed to a worker has waited",
            signals_queue_lag.clone(),
        );
        let signals_workers_throughput = Gauge::default();
        registry.register(
            "signals_workers_throughput",
            "Heartbeats all scoring workers scored in the second before last",
            signals_workers_throughput.clone(),
        );
        let signals_workers_p95 = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "signals_workers_scoring_p95_seconds",
            "The slowest scoring worker's 95th percentile time to score a heartbeat, second before last",
            signals_workers_p95.clone(),
        );
        let signals_degraded = Gauge::default();
        registry.register(
            "signals_degraded",
            "1 while ingestion scores inline because the workers are behind",
            signals_degraded.clone(),
        );
        let signals_breaker_trips = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "signals_breaker_trips",
            "Times the circuit breaker degraded, by reason",
            signals_breaker_trips.clone(),
        );
        let signals_degraded_heartbeats = Counter::default();
        registry.register(
            "signals_degraded_heartbeats",
            "Heartbeats scored inline in degraded mode",
            signals_degraded_heartbeats.clone(),
        );
        let redis_breaker_state = Gauge::default();
        registry.register(
            "redis_breaker_state",
            "The Redis circuit breaker: 0 closed, 1 half-open, 2 open",
            redis_breaker_state.clone(),
        );
        let redis_rate_limit_fallback = Counter::default();
        registry.register(
            "redis_rate_limit_fallback",
            "Rate-limit takes answered from this instance's own buckets while Redis was unavailable",
            redis_rate_limit_fallback.clone(),
        );
        let signals_dropped = Counter::default();
        registry.register(
            "signals_heartbeats_dropped",
            "Queued heartbeats dropped because their device does not exist",
            signals_dropped.clone(),
        );
        let http_connections_open = Gauge::default();
        registry.register(
            "http_connections_open",
            "HTTP connections open on this instance (upgraded sockets excluded)",
            http_connections_open.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "Connections refused because the instance held BLOCKREMOTE_MAX_CONNECTIONS",
            http_connections_refused.clone(),
        );
        let http_connection_timeouts = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "http_connection_timeouts",
            "Connections closed by the header-read or keep-alive timer, by reason",
            http_connection_timeouts.clone(),
        );
        let ws_server_closes = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "killswitch_server_closes",
            "Kill-switch sockets closed by the server, by reason",
            ws_server_closes.clone(),
        );
        let r = &mut registry;
        let redis_commands = register(
            r,
            "redis_command_duration_seconds",
            "Redis command latency in seconds, by command (script name for EVALSHA) and outcome",
            HistogramFamily::<RedisLabels>::new_with_constructor(fast_histogram),
        );
        let refresh_attempts = register(
            r,
            "auth_refresh_attempts",
            "Refresh-token presentations, by outcome",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let firewall_evaluations = register(
            r,
            "firewall_evaluations",
            "Business events counted by a firewall rule, by rule and mode",
            Family::<RuleLabels, Counter>::default(),
        );
        let firewall_decisions = register(
            r,
            "firewall_decisions",
            "Firewall thresholds crossed, by rule and mode",
            Family::<RuleLabels, Counter>::default(),
        );
        let webhook_deliveries = register(
            r,
            "webhook_deliveries",
            "Webhook deliveries, by direction and outcome",
            Family::<WebhookLabels, Counter>::default(),
        );
        let attestation_verdicts = register(
            r,
            "attestation_verdicts",
            "Attestation verdicts, by provider and result",
            Family::<AttestationLabels, Counter>::default(),
        );
        let commands_issued = register(
            r,
            "killswitch_commands_issued",
            "Kill-switch commands issued, by action and origin",
            Family::<CommandLabels, Counter>::default(),
        );
        let argon2_wait = register(
            r,
            "argon2_queue_wait_seconds",
            "Time a password hash waited for a hashing slot",
            queue_histogram(),
        );
        let db_pool = register(
            r,
            "db_pool_connections",
            "Database pool connections, by state",
            Family::<PoolLabels, Gauge>::default(),
        );
        let db_pool_acquire = register(
            r,
            "db_pool_acquire_duration_seconds",
            "Time to acquire a database connection, sampled every few seconds",
            fast_histogram(),
        );
        let health_ready = register(
            r,
            "health_ready",
            "1 when this process's last readiness check passed, else 0",
            Gauge::default(),
        );
        let audit_chain_broken = register(
            r,
            "audit_chain_broken",
            "1 when the last verification of the audit hash chain found a break, else 0",
            Gauge::default(),
        );
        let audit_chain_verified_at = register(
            r,
            "audit_chain_verified_timestamp_seconds",
            "Unix time the audit chain was last verified to its head",
            Gauge::<f64, AtomicU64>::default(),
        );
        let spans_dropped = register(
            r,
            "otel_spans_dropped",
            "Trace spans dropped: export queue full or export failed",
            Counter::default(),
        );
        let spans_exported = register(
            r,
            "otel_spans_exported",
            "Trace spans exported over OTLP",
            Counter::default(),
        );
        Self {
            redis_commands,
            refresh_attempts,
            firewall_evaluations,
            firewall_decisions,
            webhook_deliveries,
            attestation_verdicts,
            commands_issued,
            argon2_wait,
            db_pool,
            db_pool_acquire,
            health_ready,
            audit_chain_broken,
            audit_chain_verified_at,
            spans_dropped,
            spans_exported,
            span_sync: std::sync::Mutex::new(()),
            http_connections_open,
            http_connections_refused,
            http_connection_timeouts,
            ws_server_closes,
            signals_accepted,
            signals_replays,
            signals_scored,
            signals_locks,
            signals_scoring_seconds,
            signals_backlog,
            signals_queue_lag,
            signals_workers_throughput,
            signals_workers_p95,
            signals_degraded,
            signals_breaker_trips,
            signals_degraded_heartbeats,
            redis_breaker_state,
            redis_rate_limit_fallback,
            signals_dropped,
            registry,
            http_requests,
            http_duration,
            ws_connected,
            ws_handshake,
            ws_delivery,
            ws_delivered,
            ws_acks,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels = HttpLabels {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration.get_or_create(&labels).observe(seconds);
    }

    /// Counts one Redis command.
    pub fn observe_redis(&self, op: &'static str, outcome: &'static str, seconds: f64) {
        self.redis_commands
            .get_or_create(&RedisLabels { op, outcome })
            .observe(seconds);
    }

    /// Counts one refresh-token presentation.
    pub fn refresh_attempt(&self, outcome: &'static str) {
        self.refresh_attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one kill-switch command issued.
    pub fn command_issued(&self, action: &'static str, origin: &'static str) {
        self.commands_issued
            .get_or_create(&CommandLabels { action, origin })
            .inc();
    }

    /// Counts one attestation verdict.
    pub fn attestation_verdict(&self, provider: &'static str, result: &'static str) {
        self.attestation_verdicts
            .get_or_create(&AttestationLabels { provider, result })
            .inc();
    }

    /// Counts one webhook delivery.
    pub fn webhook_delivery(&self, direction: &'static str, outcome: &'static str) {
        self.webhook_deliveries
            .get_or_create(&WebhookLabels { direction, outcome })
            .inc();
    }

    /// The Prometheus/OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let synced = self
            .span_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (dropped, exported) = super::trace::span_counts();
        self.spans_dropped
            .inc_by(dropped.saturating_sub(self.spans_dropped.get()));
        self.spans_exported
            .inc_by(exported.saturating_sub(self.spans_exported.get()));
        drop(synced);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let m = Metrics::new();
        m.observe_request("GET", "/health/live", 200, 0.001);
        m.observe_request("GET", "/health/live", 200, 0.002);
        m.observe_request("GET", "unmatched", 404, 0.001);
        let text = m.render();
        assert!(
            text.contains(
                r#"http_requests_total{method="GET",route="/health/live",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"http_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1"#),
            "{text}"
        );
        assert!(text.contains("# TYPE http_request_duration_seconds histogram"));
    }
}
