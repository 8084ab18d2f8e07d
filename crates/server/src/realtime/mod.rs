//! Kill-switch commands and their fan-out across instances.
//!
//! A command (`CRITICAL_LOCK`, `IMMEDIATE_QUARANTINE`, `FORCE_OVERLAY`,
//! `UNLOCK`) is published as JSON on the kill-switch channel of the shared
//! state, so that whichever instance holds the device's WebSocket delivers it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::{keys, SharedState, StateResult};

/// The actions a device can be told to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Lock the app now.
    CriticalLock,
    /// Quarantine the device.
    ImmediateQuarantine,
    /// Cover the app with a protective overlay.
    ForceOverlay,
    /// Lift a previous lock.
    Unlock,
}

/// A command for one device, as published between instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCommand {
    /// Command id (the device acks it).
    pub id: Uuid,
    /// Target device.
    pub device_id: String,
    /// What to do.
    pub action: Action,
    /// Stable reason code.
    pub reason: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
}

/// Publishes `action` for `device_id` to every instance.
pub async fn publish(
    shared: &dyn SharedState,
    device_id: &str,
    action: Action,
    reason: &str,
) -> StateResult<DeviceCommand> {
    let command = DeviceCommand {
        id: Uuid::now_v7(),
        device_id: device_id.to_owned(),
        action,
        reason: reason.to_owned(),
        issued_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let payload = serde_json::to_vec(&command).unwrap_or_default();
    shared.publish(keys::KILL_SWITCH_CHANNEL, &payload).await?;
    Ok(command)
}
