//! Firewall records: rules (data, not code) and the decisions they took.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::NewEvent;

/// A rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FirewallRule {
    /// Stable name.
    pub name: String,
    /// The event type it counts (`create:user`, …).
    pub event_type: String,
    /// `ip` (exact, by keyed HMAC), `ip_prefix`, `user` or `device`.
    pub scope: String,
    /// Events allowed per window; the next one trips the rule.
    pub threshold: u32,
    /// Counting window.
    pub window_seconds: u32,
    /// How far back the side effect reaches (users/devices the scope created).
    pub lookback_seconds: u32,
    /// `block_users`, `quarantine_devices` or `throttle`.
    pub side_effect: String,
    /// `enforce`, `simulate` or `off`.
    pub mode: String,
    /// Bumped on every change.
    pub version: u32,
}

/// A change to a rule (`PUT /v1/admin/firewall/rules/{name}`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleUpdate {
    /// Events allowed per window (1–1 000 000).
    pub threshold: Option<u32>,
    /// Counting window (1 s – 30 days).
    pub window_seconds: Option<u32>,
    /// Side-effect reach (0 – 30 days).
    pub lookback_seconds: Option<u32>,
    /// `enforce`, `simulate` or `off`.
    pub mode: Option<String>,
    /// `block_users`, `quarantine_devices` or `throttle`.
    pub side_effect: Option<String>,
}

/// A decision to record.
#[derive(Debug, Clone)]
pub struct NewDecision {
    /// The rule as it was.
    pub rule: FirewallRule,
    /// The anonymised scope key.
    pub scope_key: String,
    /// Users blocked (or that would be).
    pub users: Vec<Uuid>,
    /// Devices quarantined or revoked (or that would be).
    pub devices: Vec<String>,
    /// The `firewall:block` event.
    pub event: NewEvent,
}

/// A stored decision.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FirewallDecision {
    /// Decision id.
    pub id: Uuid,
    /// The rule.
    pub rule_name: String,
    /// Its version then.
    pub rule_version: u32,
    /// `enforce` or `simulate` (nothing was done).
    pub mode: String,
    /// The side effect.
    pub side_effect: String,
    /// Threshold then.
    pub threshold: u32,
    /// Window then.
    pub window_seconds: u32,
    /// Look-back then.
    pub lookback_seconds: u32,
    /// Scope kind.
    pub scope: String,
    /// Anonymised scope key (HMAC, prefix, user or device id).
    pub scope_key: String,
    /// Users affected.
    pub affected_users: Vec<Uuid>,
    /// Devices affected.
    pub affected_devices: Vec<String>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When an operator undid it.
    pub undone_at: Option<DateTime<Utc>>,
}
