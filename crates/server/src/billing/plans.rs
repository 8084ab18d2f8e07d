//! Each user's plan, without a database round trip per request.
//!
//! The rate limiter needs the caller's plan on every device-authenticated
//! request. Plans are cached for [`CACHE_TTL`]; a processed billing webhook
//! publishes the user id on [`INVALIDATION_CHANNEL`] and every instance drops
//! its entry, so an upgrade or downgrade applies on the next request
//! wherever it lands (the TTL bounds the damage of a lost message).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

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
    /// Bumped by every invalidation: a plan read from the store while an
    /// invalidation happened may be the old one, and is not cached.
    epoch: Arc<AtomicU64>,
    shared: Arc<dyn SharedState>,
}

impl PlanCache {
    /// Creates the cache and subscribes to invalidations.
    pub async fn start(shared: Arc<dyn SharedState>) -> StateResult<Self> {
        let entries: Arc<DashMap<Uuid, (Plan, Instant)>> = Arc::default();
        let epoch = Arc::new(AtomicU64::new(0));
        let mut invalidations = shared.subscribe(INVALIDATION_CHANNEL).await?;
        let (weak, epoch_of_task) = (Arc::downgrade(&entries), epoch.clone());
        tokio::spawn(async move {
            while let Some(message) = invalidations.recv().await {
                let Some(entries) = weak.upgrade() else { break };
                epoch_of_task.fetch_add(1, Ordering::SeqCst);
                if message.is_empty() {
                    // A gap: an invalidation may have been missed.
                    entries.clear();
                } else if let Some(user_id) = std::str::from_utf8(&message)
                    .ok()
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    entries.remove(&user_id);
                }
            }
        });
        Ok(Self {
            entries,
            epoch,
            shared,
        })
    }

    /// The plan whose limits apply to `user_id` now.
    pub async fn get(&self, store: &dyn Store, user_id: Uuid) -> StoreResult<Plan> {
        if let Some(entry) = self.entries.get(&user_id) {
            if entry.1.elapsed() < CACHE_TTL {
                return Ok(entry.0.clone());
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let plan = store.plan_for_user(user_id).await?;
        if self.epoch.load(Ordering::SeqCst) != epoch {
            // A plan changed while we read: ours may predate it. Use it for
            // this request only (the change's own invalidation already ran).
            return Ok(plan);
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        self.entries.insert(user_id, (plan.clone(), Instant::now()));
        Ok(plan)
    }

    /// Drops `user_id`'s plan here and on every other instance.
    pub async fn invalidate(&self, user_id: Uuid) -> StateResult<()> {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.remove(&user_id);
        self.shared
            .publish(INVALIDATION_CHANNEL, user_id.to_string().as_bytes())
            .await
    }
}
