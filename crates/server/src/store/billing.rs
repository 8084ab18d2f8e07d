//! Billing records: processed webhook events and subscriptions.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    columns::{Id, Time},
    decode_error, now_micros,
    sql::SqlStore,
    NewAuditEntry, NewEvent, StoreResult,
};

/// A billing plan and the limits it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Plan {
    /// `trial`, `paid_basic`, `paid`, …
    pub name: String,
    /// Token-bucket capacity and refill per minute.
    pub rate_limit_per_minute: u32,
    /// Sliding refresh-token lifetime.
    pub refresh_ttl_seconds: u32,
}

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

/// Plans, subscriptions and the billing events that change them.
#[async_trait]
pub trait BillingStore: Send + Sync {
    /// Every plan, ordered by rate limit.
    async fn plans(&self) -> StoreResult<Vec<Plan>>;

    /// The plan the user is on: their subscription's when active, else `trial`.
    async fn plan_for_user(&self, user_id: Uuid) -> StoreResult<Plan>;

    /// Records a billing webhook event and, unless an event with a later
    /// `created` was applied already, applies its subscription change with
    /// its audit row and business event — all in one transaction. An event id
    /// already recorded changes nothing (see [`BillingOutcome`]).
    async fn apply_billing_event(&self, event: BillingEvent) -> StoreResult<BillingOutcome>;

    /// The payload hash recorded for a billing event id, if it was processed.
    async fn billing_event_hash(&self, event_id: &str) -> StoreResult<Option<String>>;

    /// The user's subscription row, if they ever had one.
    async fn subscription(&self, user_id: Uuid) -> StoreResult<Option<Subscription>>;
}

/// A `plans` row.
#[derive(FromRow)]
struct PlanRow {
    name: String,
    rate_limit_per_minute: i32,
    refresh_ttl_seconds: i32,
}

impl From<PlanRow> for Plan {
    fn from(row: PlanRow) -> Self {
        Self {
            name: row.name,
            // Both columns carry CHECK (> 0).
            rate_limit_per_minute: row.rate_limit_per_minute.unsigned_abs(),
            refresh_ttl_seconds: row.refresh_ttl_seconds.unsigned_abs(),
        }
    }
}

/// A `subscriptions` row (its user is the key asked for).
#[derive(FromRow)]
struct SubscriptionRow {
    plan: String,
    status: String,
    current_period_end: Option<Time>,
    last_event_created: i64,
}

impl SubscriptionRow {
    fn into_subscription(self, user_id: Uuid) -> StoreResult<Subscription> {
        Ok(Subscription {
            user_id,
            plan: self.plan,
            status: SubscriptionStatus::parse(&self.status)
                .ok_or_else(|| decode_error(format!("unknown status {}", self.status)))?,
            current_period_end: self.current_period_end.map(Into::into),
            last_event_created: self.last_event_created,
        })
    }
}

for_each_dialect! {
    #[async_trait]
    impl BillingStore for SqlStore<Db> {
        async fn plans(&self) -> StoreResult<Vec<Plan>> {
            let rows: Vec<PlanRow> = sqlx::query_as(
                "SELECT name, rate_limit_per_minute, refresh_ttl_seconds FROM plans \
                 ORDER BY rate_limit_per_minute, name",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(Plan::from).collect())
        }

        async fn plan_for_user(&self, user_id: Uuid) -> StoreResult<Plan> {
            let row: PlanRow = sqlx::query_as(
                "SELECT name, rate_limit_per_minute, refresh_ttl_seconds FROM plans WHERE name = \
                 COALESCE((SELECT plan FROM subscriptions WHERE user_id = $1 AND status = 'active'), 'trial')",
            )
            .bind(Id(user_id))
            .fetch_one(&self.pool)
            .await?;
            Ok(row.into())
        }

        async fn apply_billing_event(&self, event: BillingEvent) -> StoreResult<BillingOutcome> {
            let now = Time(now_micros());
            let mut tx = self.pool.begin().await?;
            let recorded = sqlx::query(
                "INSERT INTO billing_events (event_id, type, signature, payload_sha256, created, processed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(&event.event_id)
            .bind(&event.event_type)
            .bind(&event.signature)
            .bind(&event.payload_sha256)
            .bind(event.subscription.last_event_created)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if recorded.rows_affected() == 0 {
                let stored: String =
                    sqlx::query_scalar("SELECT payload_sha256 FROM billing_events WHERE event_id = $1")
                        .bind(&event.event_id)
                        .fetch_one(&mut *tx)
                        .await?;
                return Ok(if stored == event.payload_sha256 {
                    BillingOutcome::Duplicate
                } else {
                    BillingOutcome::Conflict
                });
            }
            let sub = &event.subscription;
            // The WHERE keeps an older event from rolling a newer change back.
            let applied = sqlx::query(
                "INSERT INTO subscriptions (user_id, plan, status, current_period_end, last_event_created, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (user_id) DO UPDATE SET plan = excluded.plan, status = excluded.status, \
                 current_period_end = excluded.current_period_end, \
                 last_event_created = excluded.last_event_created, updated_at = excluded.updated_at \
                 WHERE subscriptions.last_event_created <= excluded.last_event_created",
            )
            .bind(Id(sub.user_id))
            .bind(&sub.plan)
            .bind(sub.status.as_str())
            .bind(sub.current_period_end.map(Time))
            .bind(sub.last_event_created)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let outcome = if applied.rows_affected() == 1 {
                self.insert_audit(&mut tx, event.audit).await?;
                Self::insert_event(&mut tx, &event.event).await?;
                BillingOutcome::Applied
            } else {
                BillingOutcome::Stale
            };
            tx.commit().await?;
            Ok(outcome)
        }

        async fn billing_event_hash(&self, event_id: &str) -> StoreResult<Option<String>> {
            Ok(
                sqlx::query_scalar("SELECT payload_sha256 FROM billing_events WHERE event_id = $1")
                    .bind(event_id)
                    .fetch_optional(&self.pool)
                    .await?,
            )
        }

        async fn subscription(&self, user_id: Uuid) -> StoreResult<Option<Subscription>> {
            let row: Option<SubscriptionRow> = sqlx::query_as(
                "SELECT plan, status, current_period_end, last_event_created FROM subscriptions \
                 WHERE user_id = $1",
            )
            .bind(Id(user_id))
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| r.into_subscription(user_id)).transpose()
        }
    }
}
