//! `POST /v1/signals/heartbeat` and `GET /v1/security/trust-score`.
//!
//! Ingestion authenticates ([`MeteredLater`]: as `DeviceAuth`, but the
//! rate-limit token is taken with ingestion's own work), validates, then
//! hands the heartbeat to [`Ingestion::accept`](crate::signals::ingest::Ingestion::accept):
//! the token from the device's plan bucket, the replay check and the
//! enqueue — on Redis one script, one round trip: a 202 means the heartbeat
//! is on the queue. When the circuit breaker says the workers are behind — or
//! the queue refuses the job — it scores inline instead and the answer (and
//! the report) says `degraded: true`. Either way nothing accepted is lost.
//! The bucket's decisions reach the `RateLimit-*` headers through `Metered`.

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json;
use crate::{
    app::AppState,
    error::{ApiError, Problem},
    http::{
        extract::{ClientIp, DeviceAuth, MeteredLater},
        middleware::{RequestId, TraceContext},
    },
    signals::{
        ingest::{Bucket, HeartbeatBody, IngestError, JobTrace, Sender},
        reader,
        report::TrustReport,
    },
    state::{BucketDecision, Take},
    store::{AttestationGrade, DeviceStatus},
};

/// The signal routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_heartbeat))
        .routes(routes!(get_trust_score))
}

/// A heartbeat taken.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// Always true.
    pub accepted: bool,
    /// The heartbeat's `seq`.
    pub seq: u64,
    /// Present and true when it was scored inline because the workers are behind.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
}

/// Accepts a heartbeat for scoring.
#[utoipa::path(post, path = "/v1/signals/heartbeat", tag = "signals",
    request_body = HeartbeatBody,
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 202, description = "Queued for scoring (headers `RateLimit-*`)", body = Accepted),
        (status = 400, description = "`invalid_body`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked`, or `account_blocked` (the owner is blocked)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`replay`: `seq` not above the last accepted, which the problem names in `last_seq` (recorded, never scored)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (field named)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`queue_full`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_heartbeat(
    State(state): State<AppState>,
    metered: MeteredLater,
    ip: ClientIp,
    request_id: Option<axum::Extension<RequestId>>,
    incoming_trace: Option<axum::Extension<TraceContext>>,
    body: Result<json::RawJson, ApiError>,
) -> Result<(StatusCode, JsonResponse<Accepted>), ApiError> {
    // The fast reader takes what devices send; anything else goes to the
    // reference parser, which decides and names the offending field.
    let heartbeat = body.and_then(|json::RawJson(body)| {
        let heartbeat: HeartbeatBody = match reader::read(&body) {
            Some(heartbeat) => heartbeat,
            None => json::parse(&body)?,
        };
        heartbeat.validate().map_err(|e| ApiError::Validation {
            field: e.field,
            message: e.message.to_owned(),
        })?;
        Ok(heartbeat)
    });
    let heartbeat = match heartbeat {
        Ok(heartbeat) => heartbeat,
        Err(e) => {
            // A refused body still costs a token, and an empty bucket
            // answers 429 first, as on every device route.
            metered.take_token(&state).await?;
            return Err(e);
        }
    };
    let device = &metered.device;
    // The job carries the trace on to its worker (telemetry/trace.rs).
    let traceparent =
        crate::telemetry::trace::job_traceparent(|| incoming_trace.as_ref().map(|t| t.0.header()));
    let trace = match (&traceparent, &request_id) {
        (Some(traceparent), Some(request_id)) => Some(JobTrace {
            traceparent,
            request_id: &request_id.0 .0,
        }),
        _ => None,
    };
    let sender = Sender {
        user_id: device.user_id,
        device_id: &device.device_id,
        ip: ip.0,
        trace,
    };
    let bucket = Metered {
        state: &state,
        metered: &metered,
    };
    let taken = state
        .ingestion
        .accept(sender, heartbeat.into_heartbeat(), &bucket)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        JsonResponse(Accepted {
            accepted: true,
            seq: taken.seq,
            degraded: taken.degraded,
        }),
    ))
}

/// The device's bucket as ingestion takes from it: `billing::limits`, its
/// decisions left for the `RateLimit-*` headers.
struct Metered<'a> {
    state: &'a AppState,
    metered: &'a MeteredLater,
}

impl Bucket for Metered<'_> {
    async fn take_token(&self) -> Result<(), IngestError> {
        self.metered
            .take_token(self.state)
            .await
            .map_err(limiter_error)
    }

    async fn one_token<'k>(&self, key: &'k str) -> Result<Take<'k>, IngestError> {
        Ok(self
            .state
            .limits
            .one_token(self.metered.device.user_id, key)
            .await?)
    }

    fn record(&self, decision: BucketDecision) {
        // A refusal is answered by ingestion, with the same `retry_after`.
        let _ = self.metered.record(decision);
    }
}

/// The limiter's refusal as ingestion's; anything else is its failure.
fn limiter_error(err: ApiError) -> IngestError {
    match err {
        ApiError::RateLimited { retry_after } => IngestError::RateLimited { retry_after },
        ApiError::Internal(cause) => IngestError::Limiter(cause),
        other => IngestError::Limiter(other.into()),
    }
}

/// The calling device's trust report.
#[utoipa::path(get, path = "/v1/security/trust-score", tag = "signals",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 200, description = "The trust report; `heartbeats: 0` and a neutral score before any data", body = TrustReport),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked`, or `account_blocked` (the owner is blocked)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_trust_score(
    State(state): State<AppState>,
    device: DeviceAuth,
) -> Result<JsonResponse<TrustReport>, ApiError> {
    report_for(&state, &device.device_id)
        .await
        .map(JsonResponse)
}

/// The stored report of `device_id`, or the neutral one.
pub async fn report_for(state: &AppState, device_id: &str) -> Result<TrustReport, ApiError> {
    let stored = state
        .scoring
        .load_report(device_id)
        .await
        .map_err(ApiError::from)?;
    let device = state.store.device(device_id).await?;
    let locked = device
        .as_ref()
        .is_some_and(|d| d.status != DeviceStatus::Active);
    // The verdict as it counts now: a new attestation, or one that decayed
    // since the report was computed.
    let attestation = device.as_ref().map_or(AttestationGrade::Unknown, |d| {
        state.auth.devices.attestation_of(d).grade
    });
    Ok(match stored {
        Some(mut report) => {
            report.locked = locked;
            report.attestation = attestation.verdict().to_owned();
            report.attestation_state = attestation;
            report
        }
        None => TrustReport::neutral(device_id, attestation, locked),
    })
}
