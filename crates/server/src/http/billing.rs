//! `/v1/billing/*`: the signed webhook and the caller's subscription.
//!
//! The webhook checks, in order: the source-IP allow-list (when configured),
//! the signature against every configured secret, the timestamp window,
//! then the body. Only then is the event recorded; recording and applying
//! it are one transaction, and the event id's primary key makes it
//! effective at most once, forever. An applied change drops the user's
//! cached plan on every instance, so the new limit holds on the next request.

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    Json as JsonResponse,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::json;
use crate::{
    app::AppState,
    auth::Auth,
    billing::{
        event::{InvalidField, WebhookEvent},
        signature::{self, SignatureError, SignatureHeaders},
    },
    error::{codes, ApiError, Problem},
    http::extract::{ClientIp, DeviceAuth},
    store::{AuditSource, BillingEvent, BillingOutcome, NewAuditEntry, Subscription},
};

/// The billing routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_webhook))
        .routes(routes!(get_subscription))
}

/// The webhook's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookResult {
    /// `processed` the first time an event id is seen (applied, or recorded
    /// without effect when a newer event was already applied); `duplicate`
    /// for a byte-identical repeat.
    #[schema(example = "processed")]
    pub status: &'static str,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Receives a signed billing event.
#[utoipa::path(post, path = "/v1/billing/webhook", tag = "billing",
    request_body(content = WebhookEvent, description = "The event, signed with `X-Signature` \
        (`t=<unix>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>`) or Standard Webhooks headers \
        (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`)"),
    params(
        ("X-Signature" = Option<String>, Header, description = "Scheme 1: `t=<unix seconds>,v1=<hex>`; several `v1=` may appear"),
        ("webhook-id" = Option<String>, Header, description = "Scheme 2 (Standard Webhooks): message id"),
        ("webhook-timestamp" = Option<String>, Header, description = "Scheme 2: unix seconds"),
        ("webhook-signature" = Option<String>, Header, description = "Scheme 2: `v1,<base64>` entries separated by spaces"),
    ),
    responses(
        (status = 200, description = "`processed` or `duplicate`", body = WebhookResult),
        (status = 400, description = "`invalid_body`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_signature` or `timestamp_out_of_tolerance`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`ip_not_allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`event_conflict`: the id was processed with another payload", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (unknown user or plan included)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`webhook_not_configured`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_webhook(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<JsonResponse<WebhookResult>, ApiError> {
    let received = receive_webhook(&state, ip, headers, body).await;
    state
        .metrics
        .webhook_delivery("inbound", webhook_outcome(&received));
    received
}

/// The `outcome` label of a received billing event: its status, or the
/// refusal's stable code (`error` for anything unlisted, so the label set
/// stays bounded).
fn webhook_outcome(received: &Result<JsonResponse<WebhookResult>, ApiError>) -> &'static str {
    const REFUSALS: &[&str] = &[
        codes::INVALID_SIGNATURE,
        codes::TIMESTAMP_OUT_OF_TOLERANCE,
        codes::IP_NOT_ALLOWED,
        codes::EVENT_CONFLICT,
        codes::WEBHOOK_NOT_CONFIGURED,
        codes::VALIDATION_FAILED,
        codes::INVALID_BODY,
    ];
    match received {
        Ok(JsonResponse(result)) => result.status,
        Err(e) => {
            let code = e.to_problem().code;
            REFUSALS
                .iter()
                .find(|refusal| **refusal == code)
                .copied()
                .unwrap_or("error")
        }
    }
}

async fn receive_webhook(
    state: &AppState,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<JsonResponse<WebhookResult>, ApiError> {
    let config = &state.config;
    if config.webhook_secrets.is_empty() {
        return Err(ApiError::Client {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: codes::WEBHOOK_NOT_CONFIGURED,
            detail: "The billing webhook is not configured on this server.",
        });
    }
    if !config.webhook_allowed_ips.is_empty()
        && !ip.0.is_some_and(|ip| {
            config
                .webhook_allowed_ips
                .iter()
                .any(|net| net.contains(&ip))
        })
    {
        return Err(ApiError::forbidden(
            codes::IP_NOT_ALLOWED,
            "This address may not call the billing webhook.",
        ));
    }
    let verified = {
        use secrecy::ExposeSecret;
        let secrets: Vec<&str> = config
            .webhook_secrets
            .iter()
            .map(|s| s.expose_secret())
            .collect();
        let signed = SignatureHeaders {
            x_signature: header(&headers, "x-signature"),
            webhook_id: header(&headers, "webhook-id"),
            webhook_timestamp: header(&headers, "webhook-timestamp"),
            webhook_signature: header(&headers, "webhook-signature"),
        };
        signature::verify(&signed, &body, &secrets, Utc::now().timestamp())
    };
    let verified = verified.map_err(|e| match e {
        SignatureError::Invalid => ApiError::unauthorized(
            codes::INVALID_SIGNATURE,
            "The webhook signature does not match any configured secret.",
        ),
        SignatureError::OutOfTolerance => ApiError::unauthorized(
            codes::TIMESTAMP_OUT_OF_TOLERANCE,
            "The signed timestamp is more than 300 seconds from the server's clock.",
        ),
    })?;

    let event: WebhookEvent = json::parse(&body)?;
    // A processed id answers before any other check: a replay stays a
    // `duplicate` forever, even if its user or plan has since gone.
    let payload_sha256 = hex::encode(crate::auth::sha256(&body));
    if let Some(stored) = state.store.billing_event_hash(&event.id).await? {
        return if stored == payload_sha256 {
            Ok(JsonResponse(WebhookResult {
                status: "duplicate",
            }))
        } else {
            Err(ApiError::conflict(
                codes::EVENT_CONFLICT,
                "This event id was already processed with a different payload.",
            ))
        };
    }
    let status =
        event
            .validate(Utc::now().timestamp())
            .map_err(|InvalidField(field)| match field {
                "created" => ApiError::invalid_field(
                    field,
                    "must be a positive Unix time at most 300 seconds ahead of the server's clock",
                ),
                "data.user_id" => ApiError::invalid_field(
                    field,
                    "give exactly one of data.user_id and data.external_user_id",
                ),
                "data.external_user_id" => ApiError::invalid_field(
                    field,
                    "must be 1–128 visible ASCII characters (no spaces)",
                ),
                _ => ApiError::invalid_field(field, "is not valid"),
            })?;
    if !state
        .store
        .plans()
        .await?
        .iter()
        .any(|p| p.name == event.data.plan)
    {
        return Err(ApiError::invalid_field("data.plan", "is not a known plan"));
    }
    // The subscription's user, named by its id or the integrator's id (an
    // unknown external id is refused like an unknown id: billing never
    // creates users).
    let user = match (event.data.user_id, event.data.external_user_id.as_deref()) {
        (Some(id), _) => state
            .store
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::invalid_field("data.user_id", "is not a known user"))?,
        (None, Some(external)) => state
            .store
            .user_by_external_id(external)
            .await?
            .ok_or_else(|| {
                ApiError::invalid_field("data.external_user_id", "is not a known user")
            })?,
        // `validate` refused an event naming no user already.
        (None, None) => {
            return Err(ApiError::invalid_field(
                "data.user_id",
                "give exactly one of data.user_id and data.external_user_id",
            ))
        }
    };
    let user_id = user.id;

    let metadata = serde_json::json!({
        "event_id": event.id,
        "event_type": event.event_type.as_str(),
        "plan": event.data.plan,
        "status": status.as_str(),
    });
    let record = BillingEvent {
        event_id: event.id.clone(),
        event_type: event.event_type.as_str().to_owned(),
        signature: verified.signature,
        payload_sha256,
        subscription: Subscription {
            user_id,
            plan: event.data.plan.clone(),
            status,
            current_period_end: event.data.current_period_end,
            last_event_created: event.created,
        },
        audit: NewAuditEntry {
            user_id: Some(user_id),
            device_id: None,
            jti: None,
            ip: Auth::ip_prefix(ip.0),
            user_agent: None,
            source: AuditSource::Http,
            threat_score: None,
            decision_reason: Some(event.event_type.as_str().to_owned()),
            attestation_state: None,
            action_taken: format!("subscription_{}:{}", status.as_str(), event.data.plan),
            actor: None,
            request_id: None,
        },
        event: state.auth.event(
            "billing:subscription_updated",
            Some(user_id),
            None,
            ip.0,
            metadata,
        ),
    };
    let outcome = state.store.apply_billing_event(record).await?;
    tracing::info!(
        event_id = %event.id,
        event_type = event.event_type.as_str(),
        %user_id,
        outcome = ?outcome,
        "billing webhook"
    );
    match outcome {
        BillingOutcome::Applied => {
            if let Err(e) = state.plans.invalidate(user_id).await {
                // The cache's TTL bounds how long the old plan can linger.
                tracing::warn!(error = %e, "plan change not broadcast to other instances");
            }
            Ok(JsonResponse(WebhookResult {
                status: "processed",
            }))
        }
        BillingOutcome::Stale => Ok(JsonResponse(WebhookResult {
            status: "processed",
        })),
        BillingOutcome::Duplicate => Ok(JsonResponse(WebhookResult {
            status: "duplicate",
        })),
        BillingOutcome::Conflict => Err(ApiError::conflict(
            codes::EVENT_CONFLICT,
            "This event id was already processed with a different payload.",
        )),
    }
}

/// The caller's subscription and the limits in effect.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// The user.
    pub user_id: Uuid,
    /// The plan whose limits apply now: the subscribed plan while `active`,
    /// `trial` otherwise.
    #[schema(example = "paid_basic")]
    pub plan: String,
    /// `active`, `canceled`, `past_due`, or `none` (never subscribed).
    #[schema(example = "active")]
    pub status: &'static str,
    /// Requests per minute for each of the user's devices.
    #[schema(example = 600)]
    pub rate_limit_per_minute: u32,
    /// End of the paid period, when the billing provider sent one.
    pub current_period_end: Option<DateTime<Utc>>,
}

/// The caller's subscription.
#[utoipa::path(get, path = "/v1/billing/subscription", tag = "billing",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 200, description = "The subscription (headers `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`)", body = SubscriptionView),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`device_locked`, or `account_blocked` (the owner is blocked)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (with `Retry-After`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_subscription(
    State(state): State<AppState>,
    device: DeviceAuth,
) -> Result<JsonResponse<SubscriptionView>, ApiError> {
    let subscription = state.store.subscription(device.user_id).await?;
    let plan = state.store.plan_for_user(device.user_id).await?;
    Ok(JsonResponse(SubscriptionView {
        user_id: device.user_id,
        plan: plan.name,
        status: subscription.as_ref().map_or("none", |s| s.status.as_str()),
        rate_limit_per_minute: plan.rate_limit_per_minute,
        current_period_end: subscription.and_then(|s| s.current_period_end),
    }))
}
