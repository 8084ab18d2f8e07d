//! Engine-state snapshots: a device's baselines survive a Redis that loses
//! its data.
//!
//! Shared state holds each device's engine state (`sig:{device}`). If Redis
//! restarts without persistence, fails over to a lagging replica or is
//! flushed, a missing state would start the device afresh — no baseline,
//! no evidence — exactly what a remote-control session wants. So scoring
//! also writes each device's state behind to the store
//! ([`crate::store::SnapshotStore`]): at most one snapshot per device every
//! [`SNAPSHOT_EVERY`] (the first at once, an operator's unlock at once), kept
//! in memory until a task writes them every [`FLUSH_EVERY`] in one
//! transaction. A state found missing under the scoring lock is read back
//! from its snapshot (if younger than the state's own TTL).
//!
//! The bound on what a loss costs: the updates of the last
//! [`SNAPSHOT_EVERY`] plus one flush — a minute of baseline learning and of
//! evidence, which the next heartbeats rebuild; replay protection does not
//! depend on it (`crate::sequences`). Each snapshot carries when it was
//! noted, and the store keeps the newest noted whichever process flushes
//! last (so an unlock's cleared evidence is not overwritten by an older
//! state another worker flushes later). Memory is bounded: at most
//! [`MAX_PENDING`] snapshots wait (a store that is down for long drops new
//! notes — due again at the device's next heartbeat — but never an
//! unlock's), and the map of when each device was last snapshotted is
//! cleared when it reaches [`MAX_TRACKED`].
//!
//! The same on the embedded default, where the in-process state also saves
//! engine states to `state.db` (`crate::state::journal`): a snapshot a
//! minute per device costs one SQLite row, and a `state.db` that is lost or
//! deleted no longer resets every baseline.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::store::{EngineSnapshot, StoreResult};

/// The shortest interval between two snapshots of one device.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(60);
/// How often noted snapshots are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Snapshots waiting for a flush, at most (~6 KB each).
pub const MAX_PENDING: usize = 5_000;
/// Devices whose last snapshot time is remembered, at most.
pub const MAX_TRACKED: usize = 200_000;

#[derive(Default)]
struct Inner {
    /// When each device was last noted.
    noted_at: HashMap<String, Instant>,
    /// Snapshots not yet written (the newest per device), with when they
    /// were noted (Unix ms): the store keeps the newest noted, whichever
    /// process flushes last.
    pending: HashMap<String, (Vec<u8>, i64)>,
}

/// The write-behind of engine-state snapshots (see the module doc).
pub struct Snapshots {
    store: Arc<dyn crate::store::Store>,
    inner: Mutex<Inner>,
}

impl Snapshots {
    /// Snapshots written to `store`, by a task that ends when the last
    /// handle is dropped.
    pub fn start(store: Arc<dyn crate::store::Store>) -> Arc<Self> {
        let snapshots = Arc::new(Self {
            store,
            inner: Mutex::default(),
        });
        crate::sequences::spawn_write_behind(&snapshots, FLUSH_EVERY, "engine snapshots", |s| {
            Box::pin(s.flush())
        });
        snapshots
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a snapshot of `device_id` is due (`force`: an operator's
    /// unlock, which must not come back from an older snapshot).
    pub fn due(&self, device_id: &str, force: bool) -> bool {
        force
            || self
                .inner()
                .noted_at
                .get(device_id)
                .is_none_or(|at| at.elapsed() >= SNAPSHOT_EVERY)
    }

    /// Keeps `state` as `device_id`'s next snapshot (call when
    /// [`due`](Self::due)); `force` (an operator's unlock) is kept even
    /// when [`MAX_PENDING`] are waiting.
    pub fn note(&self, device_id: &str, state: &[u8], force: bool) {
        let mut inner = self.inner();
        if !force && inner.pending.len() >= MAX_PENDING && !inner.pending.contains_key(device_id) {
            return;
        }
        if inner.noted_at.len() >= MAX_TRACKED {
            inner.noted_at.clear();
        }
        inner.noted_at.insert(device_id.to_owned(), Instant::now());
        inner.pending.insert(
            device_id.to_owned(),
            (state.to_vec(), chrono::Utc::now().timestamp_millis()),
        );
    }

    /// Forgets what is kept of `device_id` (the device was deleted: an id
    /// signed in again later is another device).
    pub fn forget(&self, device_id: &str) {
        let mut inner = self.inner();
        inner.pending.remove(device_id);
        inner.noted_at.remove(device_id);
    }

    /// The snapshots of `device_ids` younger than `max_age`, as stored or
    /// still waiting here.
    pub async fn restore(
        &self,
        device_ids: &[&str],
        max_age: Duration,
    ) -> StoreResult<HashMap<String, Vec<u8>>> {
        if device_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let oldest = chrono::Utc::now().timestamp_millis()
            - i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let mut found: HashMap<String, Vec<u8>> = self
            .store
            .engine_snapshots(device_ids)
            .await?
            .into_iter()
            .filter(|s| s.saved_at >= oldest)
            .map(|s| (s.device_id, s.state))
            .collect();
        let inner = self.inner();
        for device_id in device_ids {
            if let Some((state, _)) = inner.pending.get(*device_id) {
                found.insert((*device_id).to_owned(), state.clone());
            }
        }
        Ok(found)
    }

    /// Writes every noted snapshot now; on failure they are kept for the
    /// next try (unless newer ones were noted meanwhile).
    pub async fn flush(&self) -> StoreResult<()> {
        let batch: Vec<EngineSnapshot> = self
            .inner()
            .pending
            .drain()
            .map(|(device_id, (state, saved_at))| EngineSnapshot {
                device_id,
                state,
                saved_at,
            })
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.save_engine_snapshots(&batch).await {
            let mut inner = self.inner();
            for s in batch {
                if inner.pending.len() < MAX_PENDING {
                    inner
                        .pending
                        .entry(s.device_id)
                        .or_insert((s.state, s.saved_at));
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Snapshots waiting for a flush.
    pub fn pending(&self) -> usize {
        self.inner().pending.len()
    }
}
