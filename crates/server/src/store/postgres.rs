//! The production store: PostgreSQL through an sqlx pool.
//!
//! Native types throughout (UUID, TIMESTAMPTZ, JSONB, BYTEA). sqlx's migrator
//! takes an advisory lock, so replicas starting together migrate once.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Row,
};
use uuid::Uuid;

use super::{
    now_micros, AuditEntry, AuditSource, NewAuditEntry, Plan, Store, StoreError, StoreResult,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL-backed store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url`; fails (rather than waiting forever) when the server
    /// does not answer within `timeout`.
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> StoreResult<Self> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Other)?;
        let options = options.application_name("blockremote");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// The underlying pool, for tests that must reach past the trait.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn audit_from_row(row: &sqlx::postgres::PgRow) -> StoreResult<AuditEntry> {
        let source: String = row.try_get("source")?;
        Ok(AuditEntry {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            device_id: row.try_get("device_id")?,
            jti: row.try_get("jti")?,
            ip: row.try_get("ip")?,
            user_agent: row.try_get("user_agent")?,
            source: AuditSource::parse(&source).ok_or_else(|| {
                StoreError::Other(sqlx::Error::Decode(
                    format!("unknown audit source {source}").into(),
                ))
            })?,
            threat_score: row.try_get("threat_score")?,
            decision_reason: row.try_get("decision_reason")?,
            attestation_state: row.try_get("attestation_state")?,
            action_taken: row.try_get("action_taken")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[tracing::instrument(skip_all, name = "store.ping")]
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "store.migrate")]
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn plans(&self) -> StoreResult<Vec<Plan>> {
        let rows = sqlx::query(
            "SELECT name, rate_limit_per_minute, refresh_ttl_seconds FROM plans \
             ORDER BY rate_limit_per_minute, name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let rate: i32 = row.try_get("rate_limit_per_minute")?;
                let ttl: i32 = row.try_get("refresh_ttl_seconds")?;
                Ok(Plan {
                    name: row.try_get("name")?,
                    // Both columns carry CHECK (> 0).
                    rate_limit_per_minute: rate.unsigned_abs(),
                    refresh_ttl_seconds: ttl.unsigned_abs(),
                })
            })
            .collect()
    }

    #[tracing::instrument(skip_all, name = "store.append_audit", fields(action = %entry.action_taken))]
    async fn append_audit(&self, entry: NewAuditEntry) -> StoreResult<AuditEntry> {
        let id = Uuid::now_v7();
        let created_at = now_micros();
        sqlx::query(
            "INSERT INTO audit_logs (id, user_id, device_id, jti, ip, user_agent, source, \
             threat_score, decision_reason, attestation_state, action_taken, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(id)
        .bind(entry.user_id)
        .bind(&entry.device_id)
        .bind(&entry.jti)
        .bind(&entry.ip)
        .bind(&entry.user_agent)
        .bind(entry.source.as_str())
        .bind(entry.threat_score)
        .bind(&entry.decision_reason)
        .bind(&entry.attestation_state)
        .bind(&entry.action_taken)
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        Ok(AuditEntry::from_new(entry, id, created_at))
    }

    async fn audit_for_user(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_logs WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::audit_from_row).collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
