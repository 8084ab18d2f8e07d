//! Billing records: processed webhook events and subscriptions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{NewAuditEntry, NewEvent};

/// A subscription's state as the billing provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    /// Paid up: the plan's limits apply.
    Active,
    /// Ended: `trial` limits apply.
    Canceled,
    /// Payment failed: `trial` limits apply until it is paid.
    PastDue,
}

impl SubscriptionStatus {
    /// The stored (and wire) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Canceled => "canceled",
            Self::PastDue => "past_due",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "active" => Some(Self::Active),
            "canceled" => Some(Self::Canceled),
            "past_due" => Some(Self::PastDue),
            _ => None,
        }
    }
}

/// A user's subscription row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The subscriber.
    pub user_id: Uuid,
    /// The subscribed plan (its limits apply only while `active`).
    pub plan: String,
    /// Current status.
    pub status: SubscriptionStatus,
    /// End of the paid period, when the provider sent one.
    pub current_period_end: Option<DateTime<Utc>>,
    /// `created` of the newest event applied.
    pub last_event_created: i64,
}

/// One webhook event to record, and the change it asks for.
#[derive(Debug, Clone)]
pub struct BillingEvent {
    /// The provider's event id: applied at most once, forever.
    pub event_id: String,
    /// `subscription.activated`, …
    pub event_type: String,
    /// The signature that verified (not a secret).
    pub signature: String,
    /// Hex SHA-256 of the raw body: a repeat must be byte-identical.
    pub payload_sha256: String,
    /// The subscription the event describes.
    pub subscription: Subscription,
    /// Audit row written when the change is applied.
    pub audit: NewAuditEntry,
    /// Business event written when the change is applied.
    pub event: NewEvent,
}

/// What recording a billing event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingOutcome {
    /// Recorded and applied to the subscription.
    Applied,
    /// Recorded, but older than the change already applied: not applied.
    Stale,
    /// Already recorded with the same payload: nothing done.
    Duplicate,
    /// Already recorded with a different payload: nothing done.
    Conflict,
}
