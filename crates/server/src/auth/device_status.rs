//! Device status on every request, without a database round trip each time.
//!
//! Every device-authenticated request must refuse a revoked, quarantined or
//! locked device, or a device whose owner is blocked, even before its token
//! expires. Statuses are cached for
//! [`CACHE_TTL`]; any status change publishes the device id on
//! [`INVALIDATION_CHANNEL`], and every instance drops its cached entry at
//! once, so a lock made on one replica is enforced by all of them within
//! milliseconds (and at worst after the TTL if a message is lost).

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    state::{SharedState, StateResult},
    store::{
        AttestationGrade, Device, DeviceAttestation, DeviceStatus, Store, StoreResult, UserStatus,
    },
};

/// How long a cached status is trusted without an invalidation.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Entries kept before stale ones are swept (memory bound).
const MAX_ENTRIES: usize = 100_000;
/// Pub/sub channel carrying device ids whose status changed.
pub const INVALIDATION_CHANNEL: &str = "session:device_status";

/// What a request needs to know about its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceState {
    /// Current status.
    pub status: DeviceStatus,
    /// The owner's account status (a blocked owner is refused on every device).
    pub owner: UserStatus,
    /// The user the device is bound to now.
    pub user_id: Uuid,
    /// The attestation as it counts now (the scoring workers read it per heartbeat).
    pub attestation: Attestation,
}

/// A device's attestation as it counts now (a verified grade past the
/// maximum age is already `unknown`), small enough to copy per heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attestation {
    /// The effective grade.
    pub grade: AttestationGrade,
    /// The last attestation saw an app capturing the screen.
    pub capturing_app: bool,
    /// The last attestation saw an app controlling the device.
    pub controlling_app: bool,
    /// Play Protect reported a risk.
    pub play_protect_risk: bool,
}

impl From<&DeviceAttestation> for Attestation {
    fn from(a: &DeviceAttestation) -> Self {
        let has = |code: &str| a.evidence.iter().any(|e| e == code);
        Self {
            grade: a.grade,
            capturing_app: has("capturing_app_detected"),
            controlling_app: has("controlling_app_detected"),
            play_protect_risk: has("play_protect_risk"),
        }
    }
}

/// The cache (see the module docs).
pub struct DeviceStatusCache {
    entries: Arc<DashMap<String, (Option<DeviceState>, Instant)>>,
    shared: Arc<dyn SharedState>,
    attestation_max_age: Duration,
}

impl DeviceStatusCache {
    /// Creates the cache and subscribes to invalidations; a verified
    /// attestation older than `attestation_max_age` counts as `unknown`.
    pub async fn start(
        shared: Arc<dyn SharedState>,
        attestation_max_age: Duration,
    ) -> StateResult<Self> {
        let entries: Arc<DashMap<String, (Option<DeviceState>, Instant)>> = Arc::default();
        let mut invalidations = shared.subscribe(INVALIDATION_CHANNEL).await?;
        let weak = Arc::downgrade(&entries);
        tokio::spawn(async move {
            while let Some(message) = invalidations.recv().await {
                let Some(entries) = weak.upgrade() else { break };
                if message.is_empty() {
                    // A gap: an invalidation may have been missed.
                    entries.clear();
                } else {
                    entries.remove(String::from_utf8_lossy(&message).as_ref());
                }
            }
        });
        Ok(Self {
            entries,
            shared,
            attestation_max_age,
        })
    }

    /// The device's state (`None` when it does not exist).
    pub async fn get(
        &self,
        store: &dyn Store,
        device_id: &str,
    ) -> StoreResult<Option<DeviceState>> {
        if let Some(entry) = self.entries.get(device_id) {
            if entry.1.elapsed() < CACHE_TTL {
                return Ok(entry.0);
            }
        }
        let state = store.device(device_id).await?.map(|d| DeviceState {
            status: d.status,
            owner: d.owner_status,
            user_id: d.user_id,
            attestation: Attestation::from(&self.attestation_of(&d)),
        });
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        self.entries
            .insert(device_id.to_owned(), (state, Instant::now()));
        Ok(state)
    }

    /// The device's attestation as it counts now (see
    /// [`DeviceAttestation::effective`]).
    pub fn attestation_of(&self, device: &Device) -> DeviceAttestation {
        device
            .attestation
            .effective(chrono::Utc::now(), self.attestation_max_age)
    }

    /// Drops the device's entry here and on every other instance.
    pub async fn invalidate(&self, device_id: &str) {
        self.entries.remove(device_id);
        if let Err(e) = self
            .shared
            .publish(INVALIDATION_CHANNEL, device_id.as_bytes())
            .await
        {
            // The TTL still bounds how long another instance can be stale.
            tracing::warn!(error = %e, device_id, "device status invalidation not published");
        }
    }
}
