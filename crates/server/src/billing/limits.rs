//! The per-device request budget of every device-authenticated route.
//!
//! Each device has a token bucket whose capacity is its user's plan figure
//! (trial 120, paid_basic 600, paid 1200 per minute), refilled continuously
//! and shared by every instance (`rl:{device}`; one Lua script on Redis).
//! [`DeviceAuth`](crate::auth::extract::DeviceAuth) takes one token after
//! authenticating (heartbeat ingestion, through
//! [`MeteredLater`](crate::auth::extract::MeteredLater), takes it in the
//! same round trip as its own work when the body is valid and the workers
//! keep up, and on its own otherwise); the decision is left in the request's [`RateLimitSlot`]
//! and [`headers`] writes `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` (seconds until the bucket is full) on the response,
//! refused or not. A refusal is 429 `rate_limited` with `Retry-After`.
//!
//! If the shared state cannot be reached the request is let through (and
//! logged): the limiter protects capacity, and refusing every request while
//! Redis is down would turn its outage into a full one. Readiness reports
//! the outage. (Heartbeat ingestion is the exception: its token comes in
//! the same step as the enqueue, which cannot happen without the shared
//! state either, so it answers 503 then.)

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderName, HeaderValue, Request},
    middleware::Next,
    response::Response,
};

use crate::{
    app::AppState,
    error::ApiError,
    state::{keys, BucketDecision, Take},
};

/// Every plan's bucket refills its capacity over this period.
pub const PERIOD: Duration = Duration::from_secs(60);

/// `RateLimit-Limit`.
pub const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`.
pub const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Where the limiter leaves its decision for [`headers`].
#[derive(Clone, Default)]
pub struct RateLimitSlot(Arc<Mutex<Option<BucketDecision>>>);

impl RateLimitSlot {
    fn put(&self, decision: BucketDecision) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(decision);
        }
    }

    fn take(&self) -> Option<BucketDecision> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// The take of one token from the device's bucket, at its user's plan
/// capacity.
pub async fn one_token<'a>(
    state: &AppState,
    user_id: uuid::Uuid,
    bucket_key: &'a str,
) -> Result<Take<'a>, ApiError> {
    let plan = state.plans.get(state.store.as_ref(), user_id).await?;
    Ok(Take {
        key: bucket_key,
        capacity: plan.rate_limit_per_minute,
        period: PERIOD,
        cost: 1,
    })
}

/// Takes one token from the device's bucket; `Err(429)` when it is empty.
pub async fn take(
    state: &AppState,
    slot: Option<&RateLimitSlot>,
    user_id: uuid::Uuid,
    device_id: &str,
) -> Result<(), ApiError> {
    let key = keys::rate_limit(device_id);
    let take = one_token(state, user_id, &key).await?;
    let decision = match state
        .shared
        .take_tokens(take.key, take.capacity, take.period, take.cost)
        .await
    {
        Ok(decision) => decision,
        Err(e) => {
            // At most one line per second, however many requests pass.
            static LAST_LOGGED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
            let now = chrono::Utc::now().timestamp();
            if LAST_LOGGED.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                tracing::warn!(error = %e, "rate limiter unavailable; requests let through");
            }
            return Ok(());
        }
    };
    record(slot, decision)
}

/// Leaves `decision` for the response headers; `Err(429)` when it refused.
pub fn record(slot: Option<&RateLimitSlot>, decision: BucketDecision) -> Result<(), ApiError> {
    if let Some(slot) = slot {
        slot.put(decision);
    }
    if decision.allowed {
        Ok(())
    } else {
        Err(ApiError::RateLimited {
            retry_after: decision.retry_after,
        })
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Middleware: gives the request a [`RateLimitSlot`] and writes the
/// decision left in it (if any) as `RateLimit-*` headers.
pub async fn headers(mut request: Request<Body>, next: Next) -> Response {
    let slot = RateLimitSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = next.run(request).await;
    if let Some(decision) = slot.take() {
        let headers = response.headers_mut();
        headers.insert(LIMIT, HeaderValue::from(decision.limit));
        headers.insert(REMAINING, HeaderValue::from(decision.remaining));
        headers.insert(
            RESET,
            HeaderValue::from(whole_seconds(decision.reset_after)),
        );
    }
    response
}
