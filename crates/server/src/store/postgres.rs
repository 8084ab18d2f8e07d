//! The production store: PostgreSQL through an sqlx pool.
//!
//! Native types throughout (UUID, TIMESTAMPTZ, JSONB, BYTEA). sqlx's migrator
//! takes an advisory lock, so replicas starting together migrate once.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    PgConnection, PgPool, Row,
};
use uuid::Uuid;

use super::{
    audit_chain, now_micros, AttestationOutcome, AuditEntry, AuditFilter, AuditSource,
    BillingEvent, BillingOutcome, Device, DeviceStatus, FirewallDecision, FirewallRule,
    NewAuditEntry, NewDecision, NewEvent, NewRefreshToken, NewSession, Plan, RefreshRecord,
    Revocation, RotateOutcome, RuleUpdate, SigningKeyRecord, Store, StoreError, StoreResult,
    StoredEvent, Subscription, SubscriptionStatus, User, UserStatus,
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

    async fn pending_migrations(&self) -> StoreResult<usize> {
        let applied: Vec<i64> =
            match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
            {
                Ok(versions) => versions,
                // No bookkeeping table yet: nothing was ever applied.
                Err(sqlx::Error::Database(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
        Ok(MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count())
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
        let mut tx = self.pool.begin().await?;
        let stored = insert_audit(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn audit_chain(
        &self,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<audit_chain::ChainedRow>> {
        let rows = sqlx::query("SELECT * FROM audit_logs WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(audit_chain::ChainedRow {
                    seq: row.try_get("seq")?,
                    prev_hash: row.try_get("prev_hash")?,
                    row_hash: row.try_get("row_hash")?,
                    entry: Self::audit_from_row(row)?,
                })
            })
            .collect()
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

    async fn audit_page(&self, filter: &AuditFilter, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        let (before_at, before_id) = filter.before.unzip();
        let rows = sqlx::query(
            "SELECT * FROM audit_logs WHERE ($1::uuid IS NULL OR user_id = $1) \
             AND ($2::text IS NULL OR device_id = $2) AND ($3::text IS NULL OR action_taken = $3) \
             AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid)) \
             ORDER BY created_at DESC, id DESC LIMIT $6",
        )
        .bind(filter.user_id)
        .bind(&filter.device_id)
        .bind(&filter.action)
        .bind(before_at)
        .bind(before_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::audit_from_row).collect()
    }

    async fn delete_events_before(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
        batch: u32,
    ) -> StoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM business_events WHERE id IN \
             (SELECT id FROM business_events WHERE created_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn events_page(
        &self,
        event_type: Option<&str>,
        before: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        let (before_at, before_id) = before.unzip();
        let rows = sqlx::query(
            "SELECT * FROM business_events WHERE ($1::text IS NULL OR type = $1) \
             AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid)) \
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(event_type)
        .bind(before_at)
        .bind(before_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredEvent {
                    id: row.try_get("id")?,
                    event_type: row.try_get("type")?,
                    user_id: row.try_get("user_id")?,
                    device_id: row.try_get("device_id")?,
                    ip_prefix: row.try_get("ip_prefix")?,
                    ip_hmac: row.try_get("ip_hmac")?,
                    metadata: row.try_get("metadata")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn plan_for_user(&self, user_id: Uuid) -> StoreResult<Plan> {
        let row = sqlx::query(
            "SELECT name, rate_limit_per_minute, refresh_ttl_seconds FROM plans WHERE name = \
             COALESCE((SELECT plan FROM subscriptions WHERE user_id = $1 AND status = 'active'), 'trial')",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Plan {
            name: row.try_get("name")?,
            rate_limit_per_minute: row
                .try_get::<i32, _>("rate_limit_per_minute")?
                .unsigned_abs(),
            refresh_ttl_seconds: row.try_get::<i32, _>("refresh_ttl_seconds")?.unsigned_abs(),
        })
    }

    async fn apply_billing_event(&self, event: BillingEvent) -> StoreResult<BillingOutcome> {
        let now = now_micros();
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
        .bind(sub.user_id)
        .bind(&sub.plan)
        .bind(sub.status.as_str())
        .bind(sub.current_period_end)
        .bind(sub.last_event_created)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let outcome = if applied.rows_affected() == 1 {
            insert_audit(&mut tx, event.audit).await?;
            insert_event(&mut tx, &event.event).await?;
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
        let row = sqlx::query(
            "SELECT plan, status, current_period_end, last_event_created FROM subscriptions WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let status: String = row.try_get("status")?;

            Ok(Subscription {
                user_id,
                plan: row.try_get("plan")?,
                status: SubscriptionStatus::parse(&status).ok_or_else(|| {
                    StoreError::Other(sqlx::Error::Decode(
                        format!("unknown status {status}").into(),
                    ))
                })?,
                current_period_end: row.try_get("current_period_end")?,
                last_event_created: row.try_get("last_event_created")?,
            })
        })
        .transpose()
    }

    async fn threat_intel(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT kind, value FROM threat_intel ORDER BY kind, value")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("value")?)))
            .collect()
    }

    async fn update_threat_intel(
        &self,
        add: &[(String, String)],
        remove: &[(String, String)],
        reason: Option<&str>,
    ) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut changed = 0;
        for (kind, value) in add {
            changed += sqlx::query(
                "INSERT INTO threat_intel (kind, value, reason) VALUES ($1, $2, $3) \
                 ON CONFLICT (kind, value) DO NOTHING",
            )
            .bind(kind)
            .bind(value)
            .bind(reason)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        for (kind, value) in remove {
            changed += sqlx::query("DELETE FROM threat_intel WHERE kind = $1 AND value = $2")
                .bind(kind)
                .bind(value)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn firewall_rules(&self) -> StoreResult<Vec<FirewallRule>> {
        let rows = sqlx::query("SELECT * FROM firewall_rules ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rule_from_row).collect()
    }

    async fn update_firewall_rule(
        &self,
        name: &str,
        update: &RuleUpdate,
    ) -> StoreResult<Option<FirewallRule>> {
        let row = sqlx::query(
            "UPDATE firewall_rules SET threshold = COALESCE($2, threshold), \
             window_seconds = COALESCE($3, window_seconds), lookback_seconds = COALESCE($4, lookback_seconds), \
             mode = COALESCE($5, mode), side_effect = COALESCE($6, side_effect), \
             version = version + 1, updated_at = now() WHERE name = $1 RETURNING *",
        )
        .bind(name)
        .bind(update.threshold.map(i64::from))
        .bind(update.window_seconds.map(i64::from))
        .bind(update.lookback_seconds.map(i64::from))
        .bind(&update.mode)
        .bind(&update.side_effect)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rule_from_row).transpose()
    }

    async fn scope_members(
        &self,
        event_type: &str,
        scope: &str,
        key: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<(Vec<Uuid>, Vec<String>)> {
        let column = scope_column(scope)?;
        let rows = sqlx::query(&format!(
            "SELECT DISTINCT user_id, device_id FROM business_events \
             WHERE type = $1 AND {column} = $2 AND created_at >= $3"
        ))
        .bind(event_type)
        .bind(key)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut users = Vec::new();
        let mut devices = Vec::new();
        for row in &rows {
            if let Some(user) = row.try_get::<Option<Uuid>, _>("user_id")? {
                if !users.contains(&user) {
                    users.push(user);
                }
            }
            if let Some(device) = row.try_get::<Option<String>, _>("device_id")? {
                if !devices.contains(&device) {
                    devices.push(device);
                }
            }
        }
        Ok((users, devices))
    }

    async fn record_firewall_decision(
        &self,
        decision: NewDecision,
        apply: bool,
    ) -> StoreResult<FirewallDecision> {
        let mut tx = self.pool.begin().await?;
        let now = now_micros();
        if apply {
            for user in &decision.users {
                sqlx::query("UPDATE users SET status = 'blocked', updated_at = $2 WHERE id = $1")
                    .bind(user)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE refresh_families SET status = 'revoked', revoke_reason = 'firewall', revoked_at = $2 \
                     WHERE user_id = $1 AND status = 'active'",
                )
                .bind(user)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            for device in &decision.devices {
                sqlx::query(
                    "UPDATE devices SET status = 'quarantined', updated_at = $2 WHERE id = $1",
                )
                .bind(device)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        let id = Uuid::now_v7();
        let rule = &decision.rule;
        sqlx::query(
            "INSERT INTO firewall_decisions (id, rule_name, rule_version, mode, side_effect, threshold, \
             window_seconds, lookback_seconds, scope, scope_key, affected_user_ids, affected_device_ids, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(id)
        .bind(&rule.name)
        .bind(i64::from(rule.version))
        .bind(&rule.mode)
        .bind(&rule.side_effect)
        .bind(i64::from(rule.threshold))
        .bind(i64::from(rule.window_seconds))
        .bind(i64::from(rule.lookback_seconds))
        .bind(&rule.scope)
        .bind(&decision.scope_key)
        .bind(serde_json::json!(decision.users))
        .bind(serde_json::json!(decision.devices))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut event = decision.event.clone();
        event.metadata["decision_id"] = serde_json::json!(id);
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(FirewallDecision {
            id,
            rule_name: rule.name.clone(),
            rule_version: rule.version,
            mode: rule.mode.clone(),
            side_effect: rule.side_effect.clone(),
            threshold: rule.threshold,
            window_seconds: rule.window_seconds,
            lookback_seconds: rule.lookback_seconds,
            scope: rule.scope.clone(),
            scope_key: decision.scope_key,
            affected_users: decision.users,
            affected_devices: decision.devices,
            created_at: now,
            undone_at: None,
        })
    }

    async fn firewall_decisions(&self, limit: u32) -> StoreResult<Vec<FirewallDecision>> {
        let rows = sqlx::query(
            "SELECT * FROM firewall_decisions ORDER BY created_at DESC, id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decision_from_row).collect()
    }

    async fn undo_firewall_decision(
        &self,
        id: Uuid,
        event: NewEvent,
    ) -> StoreResult<Option<(FirewallDecision, bool)>> {
        let mut tx = self.pool.begin().await?;
        let now = now_micros();
        let Some(row) = sqlx::query("SELECT * FROM firewall_decisions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let mut decision = decision_from_row(&row)?;
        if decision.undone_at.is_some() {
            return Ok(Some((decision, false)));
        }
        sqlx::query("UPDATE firewall_decisions SET undone_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if decision.mode == "enforce" {
            for user in &decision.affected_users {
                sqlx::query("UPDATE users SET status = 'active', updated_at = $2 WHERE id = $1")
                    .bind(user)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            for device in &decision.affected_devices {
                sqlx::query("UPDATE devices SET status = 'active', updated_at = $2 WHERE id = $1")
                    .bind(device)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        decision.undone_at = Some(now);
        Ok(Some((decision, true)))
    }

    #[tracing::instrument(skip_all, name = "store.create_user")]
    async fn create_user(&self, email: &str, password_hash: &str) -> StoreResult<User> {
        let id = Uuid::now_v7();
        let now = now_micros();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(id)
        .bind(email)
        .bind(password_hash)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(User {
            id,
            email: email.to_owned(),
            password_hash: password_hash.to_owned(),
            status: UserStatus::Active,
        })
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let row = sqlx::query(
            "SELECT id, email, password_hash, status FROM users WHERE lower(email) = lower($1)",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row = sqlx::query("SELECT id, email, password_hash, status FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn device(&self, id: &str) -> StoreResult<Option<Device>> {
        let row = sqlx::query(
            "SELECT id, user_id, fingerprint_sha256, platform, status, attestation_state, \
             attestation_failures FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    #[tracing::instrument(skip_all, name = "store.start_session", fields(device_id = %session.device_id))]
    async fn start_session(&self, session: NewSession) -> StoreResult<()> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO devices (id, user_id, fingerprint_sha256, platform, created_at, updated_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, $5, $5) \
             ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, \
             fingerprint_sha256 = excluded.fingerprint_sha256, platform = excluded.platform, \
             attestation_state = CASE WHEN devices.user_id = excluded.user_id \
             THEN devices.attestation_state ELSE 'unknown' END, \
             updated_at = excluded.updated_at, last_seen_at = excluded.last_seen_at",
        )
        .bind(&session.device_id)
        .bind(session.user_id)
        .bind(&session.fingerprint_sha256)
        .bind(&session.platform)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE refresh_families SET status = 'revoked', revoke_reason = 'superseded', \
             revoked_at = $2 WHERE device_id = $1 AND status = 'active'",
        )
        .bind(&session.device_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO refresh_families (id, user_id, device_id, fingerprint_sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(session.family_id)
        .bind(session.user_id)
        .bind(&session.device_id)
        .bind(&session.fingerprint_sha256)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        insert_refresh(&mut tx, session.family_id, &session.token).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn refresh_record(&self, token_sha256: &[u8]) -> StoreResult<Option<RefreshRecord>> {
        let row = sqlx::query(
            "SELECT t.used_at, t.expires_at, f.id AS family_id, f.status, f.user_id, f.device_id, \
             f.fingerprint_sha256 FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id \
             WHERE t.token_sha256 = $1",
        )
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let used_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get("used_at")?;
        let status: String = row.try_get("status")?;
        Ok(Some(RefreshRecord {
            family_id: row.try_get("family_id")?,
            family_active: status == "active",
            user_id: row.try_get("user_id")?,
            device_id: row.try_get("device_id")?,
            fingerprint_sha256: row.try_get("fingerprint_sha256")?,
            used: used_at.is_some(),
            expires_at: row.try_get("expires_at")?,
        }))
    }

    #[tracing::instrument(skip_all, name = "store.rotate_refresh")]
    async fn rotate_refresh(
        &self,
        old_sha256: &[u8],
        family_id: Uuid,
        new: NewRefreshToken,
    ) -> StoreResult<RotateOutcome> {
        let mut tx = self.pool.begin().await?;
        // Lock the family row: a concurrent logout or revocation (which
        // updates it) waits for this rotation, or this one sees it revoked.
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM refresh_families WHERE id = $1 FOR UPDATE")
                .bind(family_id)
                .fetch_optional(&mut *tx)
                .await?;
        if status.as_deref() != Some("active") {
            tx.rollback().await?;
            return Ok(RotateOutcome::FamilyInactive);
        }
        let won = sqlx::query(
            "UPDATE refresh_tokens SET used_at = $3 WHERE token_sha256 = $1 AND used_at IS NULL \
             AND family_id = $2",
        )
        .bind(old_sha256)
        .bind(family_id)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !won {
            tx.rollback().await?;
            return Ok(RotateOutcome::AlreadyUsed);
        }
        insert_refresh(&mut tx, family_id, &new).await?;
        tx.commit().await?;
        Ok(RotateOutcome::Rotated)
    }

    #[tracing::instrument(skip_all, name = "store.revoke_device", fields(device_id = %revocation.device_id))]
    async fn revoke_device(&self, revocation: Revocation) -> StoreResult<()> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE refresh_families SET status = 'revoked', revoke_reason = $2, revoked_at = $3 \
             WHERE device_id = $1 AND status = 'active'",
        )
        .bind(&revocation.device_id)
        .bind(&revocation.reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Some(status) = revocation.device_status {
            sqlx::query("UPDATE devices SET status = $2, updated_at = $3 WHERE id = $1")
                .bind(&revocation.device_id)
                .bind(status.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(audit) = revocation.audit {
            insert_audit(&mut tx, audit).await?;
        }
        if let Some(event) = revocation.event {
            insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_device_status(&self, device_id: &str, status: DeviceStatus) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE devices SET status = $2, updated_at = $3, attestation_failures = \
             CASE WHEN $2 = 'active' THEN 0 ELSE attestation_failures END WHERE id = $1",
        )
        .bind(device_id)
        .bind(status.as_str())
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_attestation(
        &self,
        device_id: &str,
        verified: bool,
        max_failures: u32,
    ) -> StoreResult<AttestationOutcome> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        if verified {
            sqlx::query(
                "UPDATE devices SET attestation_state = 'verified', attestation_failures = 0, \
                 updated_at = $2 WHERE id = $1",
            )
            .bind(device_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(AttestationOutcome {
                failures: 0,
                quarantined: false,
            });
        }
        let row = sqlx::query(
            "UPDATE devices SET attestation_state = 'failed', \
             attestation_failures = attestation_failures + 1, updated_at = $2 WHERE id = $1 \
             RETURNING attestation_failures",
        )
        .bind(device_id)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let failures = row
            .try_get::<i32, _>("attestation_failures")?
            .unsigned_abs();
        let quarantined = failures >= max_failures
            && sqlx::query(
                "UPDATE devices SET status = 'quarantined' WHERE id = $1 AND status = 'active'",
            )
            .bind(device_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
        tx.commit().await?;
        Ok(AttestationOutcome {
            failures,
            quarantined,
        })
    }

    async fn record_event(&self, event: NewEvent) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        insert_event(&mut conn, &event).await
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        let rows = sqlx::query(
            "SELECT kid, alg, private_der, public_jwk, created_at, retired_at FROM signing_keys \
             ORDER BY created_at, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SigningKeyRecord {
                    kid: row.try_get("kid")?,
                    alg: row.try_get("alg")?,
                    private_der: row.try_get("private_der")?,
                    public_jwk: row.try_get("public_jwk")?,
                    created_at: row.try_get("created_at")?,
                    retired_at: row.try_get("retired_at")?,
                })
            })
            .collect()
    }

    async fn insert_signing_key(
        &self,
        key: SigningKeyRecord,
        retire_others: bool,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if retire_others {
            sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
                .bind(key.created_at)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, private_der, public_jwk, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (kid) DO UPDATE SET retired_at = NULL",
        )
        .bind(&key.kid)
        .bind(&key.alg)
        .bind(&key.private_der)
        .bind(&key.public_jwk)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query(
            "INSERT INTO server_secrets (name, value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn insert_admin_key(&self, name: &str, key_sha256: &[u8]) -> StoreResult<Uuid> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO admin_keys (id, name, key_sha256, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(key_sha256)
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    async fn admin_key_exists(&self, key_sha256: &[u8]) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM admin_keys WHERE key_sha256 = $1 AND revoked_at IS NULL)",
        )
        .bind(key_sha256)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn user_from_row(row: &PgRow) -> StoreResult<User> {
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        status: UserStatus::parse(&row.try_get::<String, _>("status")?),
    })
}

fn device_from_row(row: &PgRow) -> StoreResult<Device> {
    Ok(Device {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        fingerprint_sha256: row.try_get("fingerprint_sha256")?,
        platform: row.try_get("platform")?,
        status: DeviceStatus::parse(&row.try_get::<String, _>("status")?),
        attestation_state: row.try_get("attestation_state")?,
        attestation_failures: row
            .try_get::<i32, _>("attestation_failures")?
            .unsigned_abs(),
    })
}

async fn insert_refresh(
    conn: &mut PgConnection,
    family_id: Uuid,
    token: &NewRefreshToken,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_sha256, family_id, jti, issued_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&token.token_sha256)
    .bind(family_id)
    .bind(token.jti)
    .bind(token.issued_at)
    .bind(token.expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Key of the advisory lock that serialises audit appends across instances.
const AUDIT_CHAIN_LOCK: i64 = 0x6272_6175_6469_7401;

async fn insert_audit(conn: &mut PgConnection, entry: NewAuditEntry) -> StoreResult<AuditEntry> {
    // Every caller is inside a transaction: the lock holds until it ends,
    // so appends form one chain whatever instance writes them.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_CHAIN_LOCK)
        .execute(&mut *conn)
        .await?;
    let last: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, row_hash FROM audit_logs WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let (seq, prev_hash) = last.map_or((1, audit_chain::GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let stored = AuditEntry::from_new(entry, Uuid::now_v7(), now_micros());
    let row_hash = audit_chain::row_hash(&prev_hash, seq, &stored);
    sqlx::query(
        "INSERT INTO audit_logs (id, user_id, device_id, jti, ip, user_agent, source, \
         threat_score, decision_reason, attestation_state, action_taken, created_at, \
         seq, prev_hash, row_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(stored.id)
    .bind(stored.user_id)
    .bind(&stored.device_id)
    .bind(&stored.jti)
    .bind(&stored.ip)
    .bind(&stored.user_agent)
    .bind(stored.source.as_str())
    .bind(stored.threat_score)
    .bind(&stored.decision_reason)
    .bind(&stored.attestation_state)
    .bind(&stored.action_taken)
    .bind(stored.created_at)
    .bind(seq)
    .bind(&prev_hash)
    .bind(&row_hash)
    .execute(conn)
    .await?;
    Ok(stored)
}

async fn insert_event(conn: &mut PgConnection, event: &NewEvent) -> StoreResult<()> {
    super::event_schema::validate(&event.event_type, &event.metadata)
        .map_err(|e| StoreError::Other(sqlx::Error::Protocol(e)))?;
    sqlx::query(
        "INSERT INTO business_events (id, type, user_id, device_id, ip_prefix, ip_hmac, metadata, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(Uuid::now_v7())
    .bind(&event.event_type)
    .bind(event.user_id)
    .bind(&event.device_id)
    .bind(&event.ip_prefix)
    .bind(&event.ip_hmac)
    .bind(&event.metadata)
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(())
}

fn scope_column(scope: &str) -> StoreResult<&'static str> {
    match scope {
        "ip" => Ok("ip_hmac"),
        "ip_prefix" => Ok("ip_prefix"),
        "user" => Ok("user_id"),
        "device" => Ok("device_id"),
        other => Err(StoreError::Other(sqlx::Error::Protocol(format!(
            "unknown scope {other}"
        )))),
    }
}

fn rule_from_row(row: &PgRow) -> StoreResult<FirewallRule> {
    let n =
        |c: &str| -> StoreResult<u32> { Ok(u32::try_from(row.try_get::<i32, _>(c)?).unwrap_or(0)) };
    Ok(FirewallRule {
        name: row.try_get("name")?,
        event_type: row.try_get("event_type")?,
        scope: row.try_get("scope")?,
        threshold: n("threshold")?,
        window_seconds: n("window_seconds")?,
        lookback_seconds: n("lookback_seconds")?,
        side_effect: row.try_get("side_effect")?,
        mode: row.try_get("mode")?,
        version: n("version")?,
    })
}

fn decision_from_row(row: &PgRow) -> StoreResult<FirewallDecision> {
    let n =
        |c: &str| -> StoreResult<u32> { Ok(u32::try_from(row.try_get::<i32, _>(c)?).unwrap_or(0)) };
    let users: serde_json::Value = row.try_get("affected_user_ids")?;
    let devices: serde_json::Value = row.try_get("affected_device_ids")?;
    Ok(FirewallDecision {
        id: row.try_get("id")?,
        rule_name: row.try_get("rule_name")?,
        rule_version: n("rule_version")?,
        mode: row.try_get("mode")?,
        side_effect: row.try_get("side_effect")?,
        threshold: n("threshold")?,
        window_seconds: n("window_seconds")?,
        lookback_seconds: n("lookback_seconds")?,
        scope: row.try_get("scope")?,
        scope_key: row.try_get("scope_key")?,
        affected_users: serde_json::from_value(users).unwrap_or_default(),
        affected_devices: serde_json::from_value(devices).unwrap_or_default(),
        created_at: row.try_get("created_at")?,
        undone_at: row.try_get("undone_at")?,
    })
}
