//! The per-device request budget of every device-authenticated route.
//!
//! Each device has a token bucket whose capacity is its user's plan figure
//! (trial 120, paid_basic 600, paid 1200 per minute), refilled continuously
//! and shared by every instance (`rl:{device}`; one Lua script on Redis).
//! [`Limits::take`] takes one token and answers the bucket's decision, which
//! [`admit`] turns into [`RateLimited`] when the bucket is empty. The HTTP
//! layer takes a token after authenticating every device route, and reports
//! the decision in `RateLimit-*` headers (`http::rate_limit`); a refusal is
//! 429 `rate_limited` with `Retry-After`. Heartbeat ingestion takes its token
//! in the same round trip as its own work, with [`Limits::one_token`].
//!
//! If the shared state cannot be reached the request is let through (and
//! logged): the limiter protects capacity, and refusing every request while
//! Redis is down would turn its outage into a full one. Readiness reports
//! the outage. (Heartbeat ingestion is the exception: its token comes in
//! the same step as the enqueue, which cannot happen without the shared
//! state either, so it answers 503 then.)

use std::{sync::Arc, time::Duration};

use uuid::Uuid;

use super::plans::PlanCache;
use crate::{
    state::{keys, BucketDecision, SharedState, Take},
    store::{Store, StoreResult},
};

/// Every plan's bucket refills its capacity over this period.
pub const PERIOD: Duration = Duration::from_secs(60);

/// The bucket is empty: the caller may try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited for {retry_after:?}")]
pub struct RateLimited {
    /// When the bucket has a token again.
    pub retry_after: Duration,
}

/// `Err(RateLimited)` when `decision` refused.
pub fn admit(decision: &BucketDecision) -> Result<(), RateLimited> {
    if decision.allowed {
        Ok(())
    } else {
        Err(RateLimited {
            retry_after: decision.retry_after,
        })
    }
}

/// The device buckets, at each user's plan capacity.
pub struct Limits {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    plans: Arc<PlanCache>,
}

impl Limits {
    /// The limiter over `shared`, reading plans through `plans` (from `store`).
    pub fn new(store: Arc<dyn Store>, shared: Arc<dyn SharedState>, plans: Arc<PlanCache>) -> Self {
        Self {
            store,
            shared,
            plans,
        }
    }

    /// The take of one token from the bucket at `bucket_key`, at `user_id`'s
    /// plan capacity (for a caller that takes it with its own work).
    pub async fn one_token<'a>(&self, user_id: Uuid, bucket_key: &'a str) -> StoreResult<Take<'a>> {
        let plan = self.plans.get(self.store.as_ref(), user_id).await?;
        Ok(Take {
            key: bucket_key,
            capacity: plan.rate_limit_per_minute,
            period: PERIOD,
            cost: 1,
        })
    }

    /// Takes one token from the device's bucket; the bucket's decision, or
    /// `None` when the shared state is unreachable and the request is let
    /// through (see the module docs). Only reading the plan can fail.
    pub async fn take(
        &self,
        user_id: Uuid,
        device_id: &str,
    ) -> StoreResult<Option<BucketDecision>> {
        let key = keys::rate_limit(device_id);
        let take = self.one_token(user_id, &key).await?;
        match self
            .shared
            .take_tokens(take.key, take.capacity, take.period, take.cost)
            .await
        {
            Ok(decision) => Ok(Some(decision)),
            Err(e) => {
                // At most one line per second, however many requests pass.
                static LAST_LOGGED: std::sync::atomic::AtomicI64 =
                    std::sync::atomic::AtomicI64::new(0);
                let now = chrono::Utc::now().timestamp();
                if LAST_LOGGED.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                    tracing::warn!(error = %e, "rate limiter unavailable; requests let through");
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(allowed: bool) -> BucketDecision {
        BucketDecision {
            allowed,
            limit: 120,
            remaining: if allowed { 7 } else { 0 },
            retry_after: if allowed {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
            },
            reset_after: Duration::from_secs(30),
        }
    }

    #[test]
    fn an_allowed_decision_admits() {
        assert_eq!(admit(&decision(true)), Ok(()));
    }

    #[test]
    fn a_refusal_carries_the_buckets_retry_after() {
        assert_eq!(
            admit(&decision(false)),
            Err(RateLimited {
                retry_after: Duration::from_millis(500)
            })
        );
    }
}
