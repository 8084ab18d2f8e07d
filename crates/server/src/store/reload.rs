//! Keeping a per-instance copy of store data fresh: reload when another
//! instance announces a change (pub/sub), and on a timer in case an
//! announcement is lost. Used by the firewall rules and threat intelligence.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{Store, StoreResult};
use crate::state::SharedState;

/// A cache that can refill itself from the store.
#[async_trait]
pub trait Reload: Send + Sync + 'static {
    /// Replaces the cached copy with the store's.
    async fn reload(&self, store: &dyn Store) -> StoreResult<()>;
}

/// Loads `cache` now, then reloads it on every message on `channel` and
/// every `every`, until the cache is dropped.
pub async fn keep_fresh<T: Reload>(
    cache: &Arc<T>,
    store: Arc<dyn Store>,
    shared: &dyn SharedState,
    channel: &str,
    every: Duration,
) -> anyhow::Result<()> {
    cache.reload(store.as_ref()).await?;
    let mut changes = shared.subscribe(channel).await?;
    let weak = Arc::downgrade(cache);
    let what = channel.to_owned();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                message = changes.recv() => if message.is_none() { break },
                _ = tick.tick() => {}
            }
            let Some(cache) = weak.upgrade() else { break };
            if let Err(e) = cache.reload(store.as_ref()).await {
                tracing::warn!(error = %e, cache = %what, "cache not reloaded; retrying on the next tick");
            }
        }
    });
    Ok(())
}
