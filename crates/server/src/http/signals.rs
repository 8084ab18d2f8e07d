//! `POST /v1/signals/heartbeat` and `GET /v1/security/trust-score`.
//!
//! Ingestion authenticates ([`MeteredLater`]: as `DeviceAuth`, but the
//! rate-limit token is taken here), validates, then takes the token from the
//! device's plan bucket, refuses replays and enqueues — on Redis one script,
//! one round trip: a 202 means the heartbeat is on the queue. When the circuit breaker says the workers are behind — or
//! the queue refuses the job — it scores inline instead and the answer (and
//! the report) says `degraded: true`. Either way nothing accepted is lost.

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::json;
use crate::{
    app::AppState,
    billing::limits,
    error::{codes, ApiError, Problem},
    http::extract::{ClientIp, DeviceAuth, MeteredLater},
    signals::{
        ingest::{encode_job, HeartbeatBody, JobEncoding},
        reader,
        report::TrustReport,
        scoring,
    },
    state::{keys, Advanced},
    store::DeviceStatus,
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
        (status = 401, description = "`invalid_token`, `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`replay`: `seq` not above the last accepted (recorded, never scored)", body = Problem, content_type = "application/problem+json"),
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
    body: Result<json::RawJson, ApiError>,
) -> Result<(StatusCode, JsonResponse<Accepted>), ApiError> {
    let device = &metered.device;
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
    let seq = heartbeat.seq;
    let seq_key = keys::heartbeat_seq(&device.device_id);
    let ip_listed = state.intel.ip_listed(ip.0);
    let heartbeat = heartbeat.into_heartbeat();
    let previous = if state.breaker.degraded() {
        // The workers are behind: take the token and the seq, then score below.
        metered.take_token(&state).await?;
        match state
            .shared
            .advance(&seq_key, seq, scoring::STATE_TTL)
            .await?
        {
            Some(previous) => previous,
            None => return Err(replay(&state, device, ip, seq).await),
        }
    } else {
        // The rate-limit token, the seq check and the enqueue are one step
        // (one round trip on Redis): a 202 means the heartbeat is on the queue.
        let encoding = JobEncoding::for_queue_of(state.shared.as_ref());
        let job = encode_job(
            &device.device_id,
            device.user_id,
            ip_listed,
            &heartbeat,
            encoding,
        )
        .map_err(|e| ApiError::Internal(e.into()))?;
        let bucket_key = keys::rate_limit(&device.device_id);
        let take = limits::one_token(&state, device.user_id, &bucket_key).await?;
        let admitted = state
            .shared
            .take_then_advance_and_enqueue(
                take,
                &seq_key,
                seq,
                scoring::STATE_TTL,
                keys::HEARTBEAT_QUEUE,
                &job,
            )
            .await?;
        metered.record(admitted.bucket)?;
        let Some(advanced) = admitted.advanced else {
            // The bucket refused (and `record` answered so).
            return Err(ApiError::RateLimited {
                retry_after: admitted.bucket.retry_after,
            });
        };
        match advanced {
            Advanced::Stale => return Err(replay(&state, device, ip, seq).await),
            Advanced::Queued { .. } => {
                state.metrics.signals_accepted.inc();
                return Ok((
                    StatusCode::ACCEPTED,
                    JsonResponse(Accepted {
                        accepted: true,
                        seq,
                        degraded: false,
                    }),
                ));
            }
            Advanced::QueueFull { previous } => {
                state.breaker.trip();
                tracing::warn!("heartbeat queue full: scoring inline (degraded)");
                previous
            }
        }
    };
    // From here a failure gives the seq back, so the client's retry is not
    // taken for a replay.
    let give_back = || async {
        if let Err(e) = state
            .shared
            .retreat(&seq_key, seq, previous, scoring::STATE_TTL)
            .await
        {
            tracing::warn!(error = %e, "heartbeat seq not given back after a failure");
        }
    };
    // Degraded: score here, now.
    state.metrics.signals_degraded_heartbeats.inc();
    let scored = state
        .scoring
        .score(
            &device.device_id,
            device.user_id,
            heartbeat,
            ip_listed,
            true,
        )
        .await;
    if let Err(e) = scored {
        tracing::error!(error = %e, "inline scoring failed");
        give_back().await;
        return Err(ApiError::Client {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: codes::QUEUE_FULL,
            detail: "The heartbeat could not be taken now; retry.",
        });
    }
    state.metrics.signals_accepted.inc();
    Ok((
        StatusCode::ACCEPTED,
        JsonResponse(Accepted {
            accepted: true,
            seq,
            degraded: true,
        }),
    ))
}

/// Records a replayed heartbeat (never scored) and builds its 409.
async fn replay(state: &AppState, device: &DeviceAuth, ip: ClientIp, seq: u64) -> ApiError {
    state.metrics.signals_replays.inc();
    let recorded = state
        .store
        .record_event(state.auth.event(
            "signals:replay",
            Some(device.user_id),
            Some(&device.device_id),
            ip.0,
            serde_json::json!({"seq": seq}),
        ))
        .await;
    if let Err(e) = recorded {
        return e.into();
    }
    ApiError::conflict(
        codes::REPLAY,
        "This heartbeat's seq is not above the last one accepted.",
    )
}

/// The calling device's trust report.
#[utoipa::path(get, path = "/v1/security/trust-score", tag = "signals",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 200, description = "The trust report; `heartbeats: 0` and a neutral score before any data", body = TrustReport),
        (status = 401, description = "`invalid_token`, `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked`", body = Problem, content_type = "application/problem+json"),
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
        .map_err(ApiError::Internal)?;
    let device = state.store.device(device_id).await?;
    let locked = device
        .as_ref()
        .is_some_and(|d| d.status != DeviceStatus::Active);
    Ok(match stored {
        Some(mut report) => {
            report.locked = locked;
            report
        }
        None => TrustReport::neutral(
            device_id,
            device
                .as_ref()
                .map_or("unknown", |d| d.attestation_state.as_str()),
            locked,
        ),
    })
}
