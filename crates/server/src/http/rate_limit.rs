//! The rate limiter's HTTP side: where a request's bucket decision waits
//! ([`RateLimitSlot`]) and the middleware that reports it ([`headers`]).
//!
//! The extractors (`http::extract`) take one token from the device's bucket
//! through [`crate::billing::limits::Limits`] and leave the decision in the
//! request's slot with [`record`]; [`headers`] then writes
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds
//! until the bucket is full) on the response, refused or not.

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

use crate::{billing::limits, error::ApiError, state::BucketDecision};

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

/// Leaves `decision` for the response headers; `Err(429)` when it refused.
pub fn record(slot: Option<&RateLimitSlot>, decision: BucketDecision) -> Result<(), ApiError> {
    if let Some(slot) = slot {
        slot.put(decision);
    }
    limits::admit(&decision)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(allowed: bool) -> BucketDecision {
        BucketDecision {
            allowed,
            limit: 600,
            remaining: 0,
            reset_after: Duration::from_millis(2_100),
            retry_after: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_refusal_is_left_in_the_slot_and_answers_429() {
        let slot = RateLimitSlot::default();
        let err = record(Some(&slot), decision(false)).expect_err("refused");
        assert!(matches!(
            err,
            ApiError::RateLimited { retry_after } if retry_after == Duration::from_millis(100)
        ));
        assert_eq!(slot.take().map(|d| d.allowed), Some(false));
        assert!(record(Some(&slot), decision(true)).is_ok());
        assert_eq!(slot.take().map(|d| d.allowed), Some(true));
        assert!(record(None, decision(true)).is_ok());
    }

    #[test]
    fn reset_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(2_100)), 3);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
    }
}
