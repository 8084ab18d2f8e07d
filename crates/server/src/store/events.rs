//! Business events: what happened (`create:user`, `refresh:reuse`, …), the
//! firewall's input, kept for the retention period and then deleted.
//!
//! Every event's metadata is checked against its type's schema before it is
//! written ([`super::event_schema`]); no full IP address is ever stored.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{types::Json, FromRow};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    columns::{Id, Time},
    now_micros,
    sql::SqlStore,
    StoreError, StoreResult,
};

/// A business event to record. IPs are already anonymized.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `create:user`, `refresh:reuse`, …
    pub event_type: String,
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// IPv4 /24 or IPv6 /48.
    pub ip_prefix: Option<String>,
    /// Keyed HMAC of the full address.
    pub ip_hmac: Option<String>,
    /// Type-specific metadata.
    pub metadata: serde_json::Value,
}

/// A stored business event.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StoredEvent {
    /// Event id (UUID v7).
    pub id: Uuid,
    /// `create:user`, `refresh:reuse`, …
    #[serde(rename = "type")]
    pub event_type: String,
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// IPv4 /24 or IPv6 /48 of the client.
    pub ip_prefix: Option<String>,
    /// Keyed HMAC of the client address (never the address).
    pub ip_hmac: Option<String>,
    /// Type-specific metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// Months of partitions kept ready ahead of now (PostgreSQL): a year, so
/// that a deployment whose retention job has not run for months still has
/// somewhere to write.
pub const PARTITIONS_AHEAD: i32 = 12;

/// Recording, listing and expiring business events.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Records a business event.
    async fn record_event(&self, event: NewEvent) -> StoreResult<()>;

    /// Deletes up to `batch` business events created before `cutoff`;
    /// returns how many. Audit rows are never touched.
    async fn delete_events_before(&self, cutoff: DateTime<Utc>, batch: u32) -> StoreResult<u64>;

    /// Creates the monthly partitions of `business_events` and `audit_logs`
    /// from `months_back` months ago to [`PARTITIONS_AHEAD`] months ahead
    /// that do not exist yet; returns how many (PostgreSQL; SQLite has
    /// none: 0).
    async fn ensure_partitions(&self, months_back: i32) -> StoreResult<u64>;

    /// Drops every monthly partition of `business_events` whose whole
    /// month is before `cutoff`; returns how many (PostgreSQL; SQLite: 0).
    /// The rest of the expired rows go by [`delete_events_before`](Self::delete_events_before).
    async fn drop_event_partitions_before(&self, cutoff: DateTime<Utc>) -> StoreResult<u64>;

    /// Business events (of `event_type` when given) strictly older than
    /// `before`, newest first, at most `limit`.
    async fn events_page(
        &self,
        event_type: Option<&str>,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Business events of a type, newest first (tests and checks).
    async fn events_of_type(&self, event_type: &str, limit: u32) -> StoreResult<Vec<NewEvent>> {
        Ok(self
            .events_page(Some(event_type), None, limit)
            .await?
            .into_iter()
            .map(|e| NewEvent {
                event_type: e.event_type,
                user_id: e.user_id,
                device_id: e.device_id,
                ip_prefix: e.ip_prefix,
                ip_hmac: e.ip_hmac,
                metadata: e.metadata,
            })
            .collect())
    }
}

/// A `business_events` row.
#[derive(FromRow)]
struct EventRow {
    id: Id,
    #[sqlx(rename = "type")]
    event_type: String,
    user_id: Option<Id>,
    device_id: Option<String>,
    ip_prefix: Option<String>,
    ip_hmac: Option<String>,
    metadata: Json<serde_json::Value>,
    created_at: Time,
}

impl From<EventRow> for StoredEvent {
    fn from(row: EventRow) -> Self {
        Self {
            id: row.id.into(),
            event_type: row.event_type,
            user_id: row.user_id.map(Into::into),
            device_id: row.device_id,
            ip_prefix: row.ip_prefix,
            ip_hmac: row.ip_hmac,
            metadata: row.metadata.0,
            created_at: row.created_at.into(),
        }
    }
}

for_each_dialect! {
    impl SqlStore<Db> {
        /// Records `event` on `conn` (inside the caller's transaction, if any),
        /// after checking its metadata against its type's schema.
        pub(super) async fn insert_event(
            conn: &mut <Db as sqlx::Database>::Connection,
            event: &NewEvent,
        ) -> StoreResult<()> {
            super::event_schema::validate(&event.event_type, &event.metadata)
                .map_err(|e| StoreError::Other(sqlx::Error::Protocol(e)))?;
            sqlx::query(
                "INSERT INTO business_events \
                 (id, type, user_id, device_id, ip_prefix, ip_hmac, metadata, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(Id(Uuid::now_v7()))
            .bind(&event.event_type)
            .bind(event.user_id.map(Id))
            .bind(&event.device_id)
            .bind(&event.ip_prefix)
            .bind(&event.ip_hmac)
            .bind(Json(&event.metadata))
            .bind(Time(now_micros()))
            .execute(conn)
            .await?;
            Ok(())
        }
    }

    #[async_trait]
    impl EventStore for SqlStore<Db> {
        async fn record_event(&self, event: NewEvent) -> StoreResult<()> {
            let mut conn = self.pool.acquire().await?;
            Self::insert_event(&mut conn, &event).await
        }

        async fn delete_events_before(&self, cutoff: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
            Ok(sqlx::query(
                "DELETE FROM business_events WHERE created_at < $1 AND id IN \
                 (SELECT id FROM business_events WHERE created_at < $1 LIMIT $2)",
            )
            .bind(Time(cutoff))
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await?
            .rows_affected())
        }

        async fn ensure_partitions(&self, months_back: i32) -> StoreResult<u64> {
            if <Db as super::sql::Dialect>::NAME != "postgres" {
                return Ok(0);
            }
            let mut created = 0;
            for table in ["business_events", "audit_logs"] {
                let n: i32 = sqlx::query_scalar("SELECT blockremote_ensure_month_partitions($1, $2, $3)")
                    .bind(table)
                    .bind(months_back.max(0))
                    .bind(PARTITIONS_AHEAD)
                    .fetch_one(&self.pool)
                    .await?;
                created += u64::try_from(n).unwrap_or(0);
            }
            Ok(created)
        }

        async fn drop_event_partitions_before(&self, cutoff: DateTime<Utc>) -> StoreResult<u64> {
            if <Db as super::sql::Dialect>::NAME != "postgres" {
                return Ok(0);
            }
            let n: i32 =
                sqlx::query_scalar("SELECT blockremote_drop_month_partitions('business_events', $1)")
                    .bind(Time(cutoff))
                    .fetch_one(&self.pool)
                    .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        }

        async fn events_page(
            &self,
            event_type: Option<&str>,
            before: Option<(DateTime<Utc>, Uuid)>,
            limit: u32,
        ) -> StoreResult<Vec<StoredEvent>> {
            let (before_at, before_id) = before.unzip();
            let rows: Vec<EventRow> = sqlx::query_as(
                "SELECT * FROM business_events WHERE ($1 IS NULL OR type = $1) \
                 AND ($2 IS NULL OR (created_at, id) < ($2, $3)) \
                 ORDER BY created_at DESC, id DESC LIMIT $4",
            )
            .bind(event_type)
            .bind(before_at.map(Time))
            .bind(before_id.map(Id))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(StoredEvent::from).collect())
        }
    }
}
