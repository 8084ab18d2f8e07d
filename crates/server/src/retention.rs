//! Retention: business events older than `BLOCKREMOTE_EVENT_RETENTION_DAYS`
//! are deleted by a periodic job; audit rows are never touched (the
//! database refuses it anyway).
//!
//! Every `serve` instance runs the job; the deletes are idempotent, in
//! batches, so replicas running it together only share the work.

use std::time::Duration;

use chrono::Utc;

use crate::{
    app::AppState,
    store::{Store, StoreResult},
};

/// How often the job runs.
pub const EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per statement (short transactions).
const BATCH: u32 = 10_000;

/// Deletes every event older than `retention`; returns how many.
pub async fn run_once(store: &dyn Store, retention: Duration) -> StoreResult<u64> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut total = 0;
    loop {
        let deleted = store.delete_events_before(cutoff, BATCH).await?;
        total += deleted;
        if deleted < u64::from(BATCH) {
            return Ok(total);
        }
    }
}

/// Runs [`run_once`] a minute after start, then every [`EVERY`], until shutdown.
pub fn spawn(state: AppState) {
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            wait = EVERY;
            match run_once(state.store.as_ref(), state.config.event_retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "old business events deleted"),
                Err(e) => tracing::warn!(error = %e, "event retention failed; retrying next hour"),
            }
        }
    });
}
