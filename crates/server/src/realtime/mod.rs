//! The kill-switch: commands to devices, delivered in real time.
//!
//! ## Commands
//! A command (`CRITICAL_LOCK`, `IMMEDIATE_QUARANTINE`, `FORCE_OVERLAY`,
//! `UNLOCK`) gets the device's next sequence number (an atomic counter in
//! shared state, so sequence numbers increase across instances), is appended to
//! the device's bounded history (`force_overlay:{device}`, the newest
//! [`HISTORY_LEN`]), and is published on the kill-switch channel. Every
//! instance's [`hub::Hub`] receives it and writes it to the device's sockets
//! held by *that* instance — so the socket gets it exactly once, wherever it is.
//!
//! ## Recovery
//! A device acks commands by id; the highest acked sequence number is kept
//! (`force_overlay:acked:{device}`). On (re)connect the server sends the
//! device's `state`, then every command after the acked position; a client
//! may also ask `resume` from its own `since_seq`. A command missed while a
//! pub/sub connection was down is therefore still delivered.
//!
//! ## Closing
//! The server closes a socket with a code of this API's 4000 range when the
//! client should act on it ([`CloseReason`]): `4001 replaced` (the device
//! opened more sockets than it may hold), `4002 token_expired` (at the
//! access token's `exp`: reconnect with a fresh token), `4003 locked` (a
//! `CRITICAL_LOCK` or `IMMEDIATE_QUARANTINE` addressed to the device was
//! just delivered live — not a global command, not a replay, so a locked
//! device that reconnects stays connected: reconnect to learn the state and
//! wait for `UNLOCK`), `4004 revoked` (the device's
//! session ended: sign in again). An oversize message gets 1009, shutdown
//! and silence 1001, a binary frame 1003.

pub mod acks;
pub mod hub;
pub mod socket;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    sequences,
    state::{keys, SharedState, StateResult},
    store::{SequenceKind, Store},
    telemetry::Metrics,
};

/// Commands kept per device for resume.
pub const HISTORY_LEN: usize = 100;
/// How long a device's history and counters live without new commands.
pub const HISTORY_TTL: Duration = Duration::from_secs(30 * 86_400);

/// The actions a device can be told to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

impl Action {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CriticalLock => "CRITICAL_LOCK",
            Self::ImmediateQuarantine => "IMMEDIATE_QUARANTINE",
            Self::ForceOverlay => "FORCE_OVERLAY",
            Self::Unlock => "UNLOCK",
        }
    }
}

/// A command for one device, as published between instances and kept in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceCommand {
    /// Command id (the device acks it).
    pub id: Uuid,
    /// Target device.
    pub device_id: String,
    /// The device's sequence number for this command (increasing). Entries
    /// of a global command are stored without it: the history position is
    /// the sequence number (see [`DeviceCommand::from_history`]).
    #[serde(default)]
    pub seq: u64,
    /// What to do.
    pub action: Action,
    /// Stable reason code.
    pub reason: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
}

impl DeviceCommand {
    /// A command read back from a device's history at position `seq`.
    pub fn from_history(seq: u64, payload: &[u8]) -> Option<Self> {
        let mut command: Self = serde_json::from_slice(payload).ok()?;
        command.seq = seq;
        Some(command)
    }

    /// The message the device receives.
    pub fn to_wire(&self) -> String {
        /// Typed, so serialising does not build an intermediate JSON map
        /// (this runs once per device in a global fan-out).
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            id: Uuid,
            seq: u64,
            action: Action,
            reason: &'a str,
            issued_at: &'a str,
        }
        serde_json::to_string(&Wire {
            kind: "command",
            id: self.id,
            seq: self.seq,
            action: self.action,
            reason: &self.reason,
            issued_at: &self.issued_at,
        })
        .unwrap_or_default()
    }
}

/// The device id that addresses every connected device.
pub const EVERY_DEVICE: &str = "*";

/// Why the server closes a socket, with the close code the client acts on
/// (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// 4001: a newer socket of the same device took this one's place.
    Replaced,
    /// 4002: the access token the socket was opened with expired.
    TokenExpired,
    /// 4003: a lock or quarantine was delivered on this socket.
    Locked,
    /// 4004: the device's session was revoked or ended.
    Revoked,
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Replaced => 4001,
            Self::TokenExpired => 4002,
            Self::Locked => 4003,
            Self::Revoked => 4004,
        }
    }

    /// The close frame's reason text (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::TokenExpired => "token_expired",
            Self::Locked => "locked",
            Self::Revoked => "revoked",
        }
    }
}

/// Asks every instance to close `device_id`'s sockets with `reason` (for a
/// session that ended without a command, e.g. logout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnect {
    /// The device whose sockets close.
    pub disconnect: String,
    /// Why.
    pub reason: CloseReason,
}

/// Publishes a [`Disconnect`] for `device_id`.
pub async fn disconnect(
    shared: &dyn SharedState,
    device_id: &str,
    reason: CloseReason,
) -> StateResult<()> {
    let message = Disconnect {
        disconnect: device_id.to_owned(),
        reason,
    };
    let payload = serde_json::to_vec(&message).unwrap_or_default();
    shared.publish(keys::KILL_SWITCH_CHANNEL, &payload).await
}

/// Issues `action` to `device_id`: next sequence number, history, publish.
/// Status changes and audit rows are the caller's (they differ by source).
/// The number is also written to `store`, whence a counter lost with shared
/// state is refilled ([`record`]).
/// Counted in `killswitch_commands_issued_total{action,origin}`; a span of
/// the caller's trace (a lock the engine decides is part of the scored
/// heartbeat's trace).
#[tracing::instrument(name = "killswitch.publish", skip_all, fields(device_id = %device_id, action = action.as_str(), origin = origin.as_str()))]
pub async fn issue(
    shared: &dyn SharedState,
    store: &dyn Store,
    metrics: &Metrics,
    origin: Origin,
    device_id: &str,
    action: Action,
    reason: &str,
) -> StateResult<DeviceCommand> {
    let command = record(shared, store, device_id, action, reason).await?;
    let published = Published {
        command: command.clone(),
        traceparent: crate::telemetry::trace::outgoing(&tracing::Span::current())
            .map(|(traceparent, _)| traceparent),
    };
    let payload = serde_json::to_vec(&published).unwrap_or_default();
    shared.publish(keys::KILL_SWITCH_CHANNEL, &payload).await?;
    metrics.command_issued(action.as_str(), origin.as_str());
    Ok(command)
}

/// A command as published between instances: the command, and the
/// `traceparent` of its publish span when traced, so the instance holding
/// the device's socket delivers it in a span of the same trace. The field
/// is never sent to phones; instances of an older version ignore it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The command.
    #[serde(flatten)]
    pub command: DeviceCommand,
    /// W3C `traceparent` of the publish span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Who issued a command (a metric label; the audit row says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The engine's decision on a heartbeat.
    Engine,
    /// An operator, through the admin API.
    Admin,
    /// A firewall decision, or its undo.
    Firewall,
    /// Refresh-token reuse.
    Session,
    /// A failed attestation.
    Attestation,
}

impl Origin {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Engine => "engine",
            Self::Admin => "admin",
            Self::Firewall => "firewall",
            Self::Session => "session",
            Self::Attestation => "attestation",
        }
    }
}

/// Asks every instance to send `action` to every device connected to it;
/// each instance records a command per device (with that device's next
/// sequence number) and writes it to the socket.
pub async fn issue_global(
    shared: &dyn SharedState,
    action: Action,
    reason: &str,
) -> StateResult<DeviceCommand> {
    let command = DeviceCommand {
        id: Uuid::now_v7(),
        device_id: EVERY_DEVICE.to_owned(),
        seq: 0,
        action,
        reason: reason.to_owned(),
        issued_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let payload = serde_json::to_vec(&command).unwrap_or_default();
    shared.publish(keys::KILL_SWITCH_CHANNEL, &payload).await?;
    Ok(command)
}

/// Gives a command its sequence number and keeps it in the device's history,
/// without publishing it.
///
/// Command numbering must never restart below what the phone has seen (it
/// resumes from its last `seq`): a counter missing from shared state (lost
/// with Redis's data, or expired) is first refilled from the store's copy
/// plus [`sequences::MARGIN`], and each command is written through to the
/// store with its number (commands are rare; the lock that causes one
/// writes the store anyway), whence a reconnecting phone is sent what it
/// never acked if the shared history was lost. Both store steps are best effort: a store that is down must not
/// hold a lock back, so then numbering may restart (logged). A command
/// racing the refill of the same device may get a low number; the `state`
/// message every (re)connecting socket gets first carries the truth.
pub async fn record(
    shared: &dyn SharedState,
    store: &dyn Store,
    device_id: &str,
    action: Action,
    reason: &str,
) -> StateResult<DeviceCommand> {
    let counter = keys::command_seq(device_id);
    if shared.get(&counter).await?.is_none() {
        match store
            .device_sequence(device_id, SequenceKind::Command)
            .await
        {
            Ok(0) => {}
            Ok(stored) => {
                shared
                    .set_max(&counter, stored + sequences::MARGIN, HISTORY_TTL)
                    .await?;
            }
            Err(e) => {
                tracing::error!(error = %e, device_id, "command numbering not refilled from the store");
            }
        }
    }
    let seq = shared.incr(&counter, 1, HISTORY_TTL).await?;
    let command = DeviceCommand {
        id: Uuid::now_v7(),
        device_id: device_id.to_owned(),
        seq: u64::try_from(seq).unwrap_or_default(),
        action,
        reason: reason.to_owned(),
        issued_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let payload = serde_json::to_vec(&command).unwrap_or_default();
    shared
        .history_push(
            &keys::force_overlay(device_id),
            command.seq,
            &payload,
            HISTORY_LEN,
            HISTORY_TTL,
        )
        .await?;
    // Written through once it is in the shared history (a command that
    // never got there was refused, and must not come back after a loss).
    if let Err(e) = store
        .record_command(
            device_id,
            command.seq,
            &String::from_utf8_lossy(&payload),
            chrono::Utc::now().timestamp_millis(),
            HISTORY_LEN as u64,
        )
        .await
    {
        tracing::warn!(error = %e, device_id, "command not written to the store");
    }
    Ok(command)
}
