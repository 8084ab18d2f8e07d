//! Each user's plan, without a database round trip per request.
//!
//! The rate limiter needs the caller's plan on every device-authenticated
//! request. Plans are cached for [`CACHE_TTL`]; a processed billing webhook
//! publishes the user id on [`INVALIDATION_CHANNEL`] and every instance drops
//! its entry, so an upgrade or downgrade applies on the next request
//! wherever it lands (the TTL bounds the damage of a lost message).

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    state::{SharedState, StateResult},
    store::{Plan, Store, StoreResult},
};

/// How long a cached plan is trusted without an invalidation.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept before stale ones are swept (memory bound).
const MAX_ENTRIES: usize = 100_000;
/// Pub/sub channel carrying user ids whose plan changed.
pub const INVALIDATION_CHANNEL: &str = "billing:plan_changed";

/// The cache (see the module docs).
pub struct PlanCache {
    entries: Arc<DashMap<Uuid, (Plan, Instant)>>,
    shared: Arc<dyn SharedState>,
}

impl PlanCache {
    /// Creates the cache and subscribes to invalidations.
    pub async fn start(shared: Arc<dyn SharedState>) -> StateResult<Self> {
        let entries: Arc<DashMap<Uuid, (Plan, Instant)>> = Arc::default();
        let mut invalidations = shared.subscribe(INVALIDATION_CHANNEL).await?;
        let weak = Arc::downgrade(&entries);
        tokio::spawn(async move {
            while let Some(message) = invalidations.recv().await {
                let Some(entries) = weak.upgrade() else { break };
                if let Some(user_id) = std::str::from_utf8(&message)
                    .ok()
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    entries.remove(&user_id);
                }
            }
        });
        Ok(Self { entries, shared })
    }

    /// The plan whose limits apply to `user_id` now.
    pub async fn get(&self, store: &dyn Store, user_id: Uuid) -> StoreResult<Plan> {
        if let Some(entry) = self.entries.get(&user_id) {
            if entry.1.elapsed() < CACHE_TTL {
                return Ok(entry.0.clone());
            }
        }
        let plan = store.plan_for_user(user_id).await?;
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        self.entries.insert(user_id, (plan.clone(), Instant::now()));
        Ok(plan)
    }

    /// Drops `user_id`'s plan here and on every other instance.
    pub async fn invalidate(&self, user_id: Uuid) -> StateResult<()> {
        self.entries.remove(&user_id);
        self.shared
            .publish(INVALIDATION_CHANNEL, user_id.to_string().as_bytes())
            .await
    }
}
