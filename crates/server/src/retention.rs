//! Retention: business events older than `BLOCKREMOTE_EVENT_RETENTION_DAYS`
//! are deleted by a periodic job; audit rows are never touched (the
//! database refuses it anyway).
//!
//! On PostgreSQL both tables are partitioned by month: the job first keeps
//! the months ahead ready, then drops the event partitions wholly past the
//! cutoff (no row-by-row delete, no bloat), then deletes the expired rest
//! of the month the cutoff falls in. On SQLite it deletes by age.
//!
//! Every `serve` instance runs the job; the deletes are idempotent, in
//! batches, so replicas running it together only share the work.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreResult};

/// How often the job runs.
pub const EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per statement (short transactions).
const BATCH: u32 = 10_000;

/// Deletes every event older than `retention`; returns how many.
pub async fn run_once(store: &dyn Store, retention: Duration) -> StoreResult<u64> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    // From the cutoff's month on: with a retention under a month, last
    // month's partition would be created each hour only to be dropped.
    // A failure here must not stop the deletes.
    let months_back = {
        use chrono::Datelike;
        let now = Utc::now();
        (now.year() - cutoff.year()) * 12 + now.month() as i32 - cutoff.month() as i32
    };
    if let Err(e) = store.ensure_partitions(months_back).await {
        tracing::warn!(error = %e, "partitions ahead not created; retrying next hour");
    }
    let dropped = store.drop_event_partitions_before(cutoff).await?;
    if dropped > 0 {
        tracing::info!(
            partitions = dropped,
            "expired business-event partitions dropped"
        );
    }
    let mut total = 0;
    loop {
        let deleted = store.delete_events_before(cutoff, BATCH).await?;
        total += deleted;
        if deleted < u64::from(BATCH) {
            return Ok(total);
        }
    }
}

/// Runs [`run_once`] with `retention` a minute after start, then every
/// [`EVERY`], until `shutdown` is cancelled.
pub fn spawn(store: Arc<dyn Store>, retention: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            wait = EVERY;
            match run_once(store.as_ref(), retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "old business events deleted"),
                Err(e) => tracing::warn!(error = %e, "event retention failed; retrying next hour"),
            }
        }
    });
}
