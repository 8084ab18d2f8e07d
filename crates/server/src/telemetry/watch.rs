//! Gauges no request moves, kept current by background tasks.
//!
//! - **Database pool** (`db_pool_connections{state}`,
//!   `db_pool_acquire_duration_seconds`): read every [`POOL_EVERY`], with one
//!   timed acquire — a sample of what queries wait, not every query's wait
//!   (sqlx does not report that).
//! - **Audit chain** (`audit_chain_broken`, `audit_chain_verified_timestamp_seconds`):
//!   the rows appended since the last check are verified every
//!   [`AUDIT_EVERY`] against the last verified row, and the whole chain from
//!   its first row every [`AUDIT_FULL_EVERY`] (an edit of an old row shows
//!   there). A break sets the gauge to 1 and logs the row; the alert
//!   `AuditChainBroken` fires on it (`deploy/prometheus/alerts.yml`). A
//!   broken chain is not read again until the next full pass (rows are
//!   append-only: the break stays). Every API replica verifies on its own
//!   (reads only; the full pass is one indexed scan an hour).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{metrics::PoolLabels, Metrics};
use crate::{
    state::SharedState,
    store::{audit_chain, Store},
};

/// How often readiness is checked when nothing probes it.
pub const READY_EVERY: Duration = Duration::from_secs(10);

/// Whether the store and the shared state answer within `within`: each
/// check's failure, as text.
pub async fn readiness(
    store: &dyn Store,
    shared: &dyn SharedState,
    within: Duration,
) -> (Result<(), String>, Result<(), String>) {
    let (db, cache) = tokio::join!(
        tokio::time::timeout(within, store.ping()),
        tokio::time::timeout(within, shared.ping()),
    );
    let flat =
        |r: Result<Result<(), String>, _>| r.unwrap_or_else(|_| Err("no answer in time".into()));
    (
        flat(db.map(|r| r.map_err(|e| e.to_string()))),
        flat(cache.map(|r| r.map_err(|e| e.to_string()))),
    )
}

/// Keeps `health_ready` current every [`READY_EVERY`] until `stop`, so the
/// gauge (and the `ReadinessFailing` alert) does not depend on something
/// probing `/health/ready`.
pub fn spawn_readiness_sampler(
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(READY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (db, cache) =
                readiness(store.as_ref(), shared.as_ref(), Duration::from_secs(2)).await;
            metrics
                .health_ready
                .set(i64::from(db.is_ok() && cache.is_ok()));
        }
    });
}

/// How often the pool is sampled.
pub const POOL_EVERY: Duration = Duration::from_secs(5);
/// How often new audit rows are verified.
pub const AUDIT_EVERY: Duration = Duration::from_secs(60);
/// How often the whole chain is verified again.
pub const AUDIT_FULL_EVERY: Duration = Duration::from_secs(3600);
/// Audit rows read per query.
const AUDIT_PAGE: u32 = 1000;

/// Samples the pool every [`POOL_EVERY`] until `stop`.
pub fn spawn_pool_sampler(store: Arc<dyn Store>, metrics: Arc<Metrics>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POOL_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            sample_pool(store.as_ref(), &metrics).await;
        }
    });
}

/// One sample of the pool.
pub async fn sample_pool(store: &dyn Store, metrics: &Metrics) {
    // A sample that found no connection in time counts as the whole wait,
    // so the histogram shows a saturated pool instead of skipping it.
    match tokio::time::timeout(POOL_EVERY, store.time_acquire()).await {
        Ok(Ok(waited)) => metrics.db_pool_acquire.observe(waited.as_secs_f64()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "pool sample: no connection");
            metrics.db_pool_acquire.observe(POOL_EVERY.as_secs_f64());
        }
        Err(_) => metrics.db_pool_acquire.observe(POOL_EVERY.as_secs_f64()),
    }
    let (in_use, idle) = store.pool_usage();
    for (state, n) in [("in_use", in_use), ("idle", idle)] {
        metrics
            .db_pool
            .get_or_create(&PoolLabels { state })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Where verification has got to: the last verified row, or a break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCursor {
    hash: String,
    seq: i64,
    broken: bool,
}

impl Default for ChainCursor {
    fn default() -> Self {
        Self {
            hash: audit_chain::GENESIS.to_owned(),
            seq: 0,
            broken: false,
        }
    }
}

impl ChainCursor {
    /// The last verification found a break (nothing more is read until a
    /// full pass starts from [`ChainCursor::default`]).
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// Verifies the audit chain as the module docs say until `stop`.
pub fn spawn_audit_verifier(store: Arc<dyn Store>, metrics: Arc<Metrics>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUDIT_EVERY);
        let mut cursor = ChainCursor::default();
        let mut full_at = tokio::time::Instant::now() + AUDIT_FULL_EVERY;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if tokio::time::Instant::now() >= full_at {
                cursor = ChainCursor::default();
                full_at = tokio::time::Instant::now() + AUDIT_FULL_EVERY;
            }
            cursor = verify_from(store.as_ref(), &metrics, cursor).await;
        }
    });
}

/// Verifies the rows after `cursor` to the head and sets the gauges; the
/// cursor to go on from next time (a broken one stays as it is until the
/// next full pass).
pub async fn verify_from(
    store: &dyn Store,
    metrics: &Metrics,
    mut cursor: ChainCursor,
) -> ChainCursor {
    if cursor.broken {
        return cursor;
    }
    let key = store.chain_key();
    loop {
        let rows = match store.audit_chain(cursor.seq, AUDIT_PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "audit chain not verified: the store is unavailable");
                return cursor;
            }
        };
        if rows.is_empty() {
            metrics.audit_chain_broken.set(0);
            metrics
                .audit_chain_verified_at
                .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
            return cursor;
        }
        match audit_chain::check(&rows, key.as_ref(), cursor.hash.clone(), cursor.seq) {
            Ok((hash, seq)) => {
                cursor = ChainCursor {
                    hash,
                    seq,
                    broken: false,
                }
            }
            Err(broken) => {
                tracing::error!(broken = ?broken, "audit chain verification failed");
                metrics.audit_chain_broken.set(1);
                return ChainCursor {
                    broken: true,
                    ..cursor
                };
            }
        }
    }
}
