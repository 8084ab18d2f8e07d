//! The embedded default: one SQLite file in WAL mode.
//!
//! WAL lets readers run beside the single writer; `busy_timeout` makes a
//! writer wait for the lock instead of failing; foreign keys are switched on
//! per connection (SQLite leaves them off by default). Ids and timestamps are
//! stored as text — timestamps fixed-width so they sort as they compare.

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Row, SqlitePool,
};
use uuid::Uuid;

use super::{
    now_micros, AuditEntry, AuditSource, NewAuditEntry, Plan, Store, StoreError, StoreResult,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

/// Formats a timestamp the way every SQLite column stores it.
fn ts(value: DateTime<Utc>) -> String {
    value.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn parse_ts(raw: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Other(sqlx::Error::Decode(Box::new(e))))
}

fn parse_uuid(raw: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(raw).map_err(|e| StoreError::Other(sqlx::Error::Decode(Box::new(e))))
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url`
    /// (`sqlite://path/to/file.db`), creating its parent directory too.
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Other)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let file = options.get_filename();
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// The underlying pool, for tests that must reach past the trait (for
    /// example to prove the audit triggers refuse a raw UPDATE).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn audit_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<AuditEntry> {
        let source: String = row.try_get("source")?;
        let user_id: Option<String> = row.try_get("user_id")?;
        let created_at: String = row.try_get("created_at")?;
        Ok(AuditEntry {
            id: parse_uuid(&row.try_get::<String, _>("id")?)?,
            user_id: user_id.as_deref().map(parse_uuid).transpose()?,
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
            created_at: parse_ts(&created_at)?,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
                Ok(Plan {
                    name: row.try_get("name")?,
                    rate_limit_per_minute: row.try_get("rate_limit_per_minute")?,
                    refresh_ttl_seconds: row.try_get("refresh_ttl_seconds")?,
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
        .bind(id.to_string())
        .bind(entry.user_id.map(|u| u.to_string()))
        .bind(&entry.device_id)
        .bind(&entry.jti)
        .bind(&entry.ip)
        .bind(&entry.user_agent)
        .bind(entry.source.as_str())
        .bind(entry.threat_score)
        .bind(&entry.decision_reason)
        .bind(&entry.attestation_state)
        .bind(&entry.action_taken)
        .bind(ts(created_at))
        .execute(&self.pool)
        .await?;
        Ok(AuditEntry::from_new(entry, id, created_at))
    }

    async fn audit_for_user(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_logs WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(user_id.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::audit_from_row).collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
