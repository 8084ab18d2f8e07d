//! Firewall records: rules (data, not code) and the decisions they took.
//!
//! A decision remembers its rule as it was and exactly which users and
//! devices it affected, so an undo restores exactly those — and a stored
//! decision whose affected ids do not decode is an error, never a decision
//! that affected nobody.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{types::Json, FromRow};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    columns::{Id, Time},
    decode_error,
    holds::{HoldAction, HoldSource, NewHold},
    now_micros,
    sql::{Dialect, SqlStore},
    NewEvent, StoreResult,
};

/// What a rule counts events by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleScope {
    /// The exact client address (by keyed HMAC).
    Ip,
    /// The address's /24 or /48.
    IpPrefix,
    /// The user.
    User,
    /// The device.
    Device,
}
stored_words!(RuleScope { Ip = "ip", IpPrefix = "ip_prefix", User = "user", Device = "device" });

impl RuleScope {
    /// The `business_events` column holding this scope's key.
    fn column(self) -> &'static str {
        match self {
            Self::Ip => "ip_hmac",
            Self::IpPrefix => "ip_prefix",
            Self::User => "user_id",
            Self::Device => "device_id",
        }
    }
}

/// What a rule does when it trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SideEffect {
    /// Answer 429 for the rest of the window; nothing else.
    Throttle,
    /// Block the users the scope created (and revoke their sessions).
    BlockUsers,
    /// Quarantine the devices the scope named.
    QuarantineDevices,
}
stored_words!(SideEffect {
    Throttle = "throttle",
    BlockUsers = "block_users",
    QuarantineDevices = "quarantine_devices",
});

/// Whether a rule acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    /// Trips and acts.
    Enforce,
    /// Trips and records what it would have done.
    Simulate,
    /// Not counted.
    Off,
}
stored_words!(RuleMode { Enforce = "enforce", Simulate = "simulate", Off = "off" });

/// A rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FirewallRule {
    /// Stable name.
    pub name: String,
    /// The event type it counts (`create:user`, …).
    pub event_type: String,
    /// `ip` (exact, by keyed HMAC), `ip_prefix`, `user` or `device`.
    pub scope: RuleScope,
    /// Events allowed per window; the next one trips the rule.
    pub threshold: u32,
    /// Counting window.
    pub window_seconds: u32,
    /// How far back the side effect reaches (users/devices the scope created).
    pub lookback_seconds: u32,
    /// `block_users`, `quarantine_devices` or `throttle`.
    pub side_effect: SideEffect,
    /// `enforce`, `simulate` or `off`.
    pub mode: RuleMode,
    /// Bumped on every change.
    pub version: u32,
}

/// A change to a rule (`PUT /v1/admin/firewall/rules/{name}`), as sent. The
/// words stay text here so the handler checks them after the ranges and
/// names a bad one in its own words (`must be enforce, simulate or off`);
/// only words [`RuleMode::parse`] / [`SideEffect::parse`] accept reach the store.
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
    pub mode: RuleMode,
    /// The side effect.
    pub side_effect: SideEffect,
    /// Threshold then.
    pub threshold: u32,
    /// Window then.
    pub window_seconds: u32,
    /// Look-back then.
    pub lookback_seconds: u32,
    /// Scope kind.
    pub scope: RuleScope,
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

/// Rules, the events they count, and their decisions.
#[async_trait]
pub trait FirewallStore: Send + Sync {
    /// Every firewall rule, by name.
    async fn firewall_rules(&self) -> StoreResult<Vec<FirewallRule>>;

    /// Applies `update` to rule `name` and bumps its version; `None` when no such rule.
    async fn update_firewall_rule(
        &self,
        name: &str,
        update: &RuleUpdate,
    ) -> StoreResult<Option<FirewallRule>>;

    /// The users named by `event_type` events whose `scope` column equals
    /// `key`, recorded since `since`, and the devices those users *own now*:
    /// every one of them with `whole_accounts`, else only the device each
    /// event names, if its user still owns it. Devices are found by a join on
    /// ownership, never taken from the events, so an event naming somebody
    /// else's device (a refused registration, say) can never reach it.
    async fn scope_members(
        &self,
        event_type: &str,
        scope: RuleScope,
        key: &str,
        since: DateTime<Utc>,
        whole_accounts: bool,
    ) -> StoreResult<(Vec<Uuid>, Vec<String>)>;

    /// Records a decision and its `firewall:block` event; when `apply`,
    /// also blocks its users (revoking their sessions) and quarantines its
    /// devices — one transaction.
    async fn record_firewall_decision(
        &self,
        decision: NewDecision,
        apply: bool,
    ) -> StoreResult<FirewallDecision>;

    /// The newest decisions.
    async fn firewall_decisions(&self, limit: u32) -> StoreResult<Vec<FirewallDecision>>;

    /// Undoes decision `id` exactly once: its users active again, its
    /// devices active, and `event` recorded. `None` when unknown; `Some(false)`
    /// (with the decision) when it was already undone.
    async fn undo_firewall_decision(
        &self,
        id: Uuid,
        event: NewEvent,
    ) -> StoreResult<Option<(FirewallDecision, bool)>>;
}

/// A count or duration column (INTEGER, never negative by its CHECK).
fn count(raw: i32) -> StoreResult<u32> {
    u32::try_from(raw).map_err(|_| decode_error(format!("negative count {raw}")))
}

fn word<T>(parse: fn(&str) -> Option<T>, column: &str, raw: &str) -> StoreResult<T> {
    parse(raw).ok_or_else(|| decode_error(format!("unknown {column} {raw}")))
}

/// A `firewall_rules` row.
#[derive(FromRow)]
struct RuleRow {
    name: String,
    event_type: String,
    scope: String,
    threshold: i32,
    window_seconds: i32,
    lookback_seconds: i32,
    side_effect: String,
    mode: String,
    version: i32,
}

impl TryFrom<RuleRow> for FirewallRule {
    type Error = super::StoreError;

    fn try_from(row: RuleRow) -> StoreResult<Self> {
        Ok(Self {
            name: row.name,
            event_type: row.event_type,
            scope: word(RuleScope::parse, "scope", &row.scope)?,
            threshold: count(row.threshold)?,
            window_seconds: count(row.window_seconds)?,
            lookback_seconds: count(row.lookback_seconds)?,
            side_effect: word(SideEffect::parse, "side_effect", &row.side_effect)?,
            mode: word(RuleMode::parse, "mode", &row.mode)?,
            version: count(row.version)?,
        })
    }
}

/// A `firewall_decisions` row.
#[derive(FromRow)]
struct DecisionRow {
    id: Id,
    rule_name: String,
    rule_version: i32,
    mode: String,
    side_effect: String,
    threshold: i32,
    window_seconds: i32,
    lookback_seconds: i32,
    scope: String,
    scope_key: String,
    affected_user_ids: Json<Vec<Uuid>>,
    affected_device_ids: Json<Vec<String>>,
    created_at: Time,
    undone_at: Option<Time>,
}

impl TryFrom<DecisionRow> for FirewallDecision {
    type Error = super::StoreError;

    fn try_from(row: DecisionRow) -> StoreResult<Self> {
        Ok(Self {
            id: row.id.into(),
            rule_name: row.rule_name,
            rule_version: count(row.rule_version)?,
            mode: word(RuleMode::parse, "mode", &row.mode)?,
            side_effect: word(SideEffect::parse, "side_effect", &row.side_effect)?,
            threshold: count(row.threshold)?,
            window_seconds: count(row.window_seconds)?,
            lookback_seconds: count(row.lookback_seconds)?,
            scope: word(RuleScope::parse, "scope", &row.scope)?,
            scope_key: row.scope_key,
            affected_users: row.affected_user_ids.0,
            affected_devices: row.affected_device_ids.0,
            created_at: row.created_at.into(),
            undone_at: row.undone_at.map(Into::into),
        })
    }
}

/// A `(user_id, device_id)` pair named by an event.
#[derive(FromRow)]
struct MemberRow {
    user_id: Option<Id>,
    device_id: Option<String>,
}

for_each_dialect! {
    #[async_trait]
    impl FirewallStore for SqlStore<Db> {
        async fn firewall_rules(&self) -> StoreResult<Vec<FirewallRule>> {
            let rows: Vec<RuleRow> = sqlx::query_as("SELECT * FROM firewall_rules ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
            rows.into_iter().map(FirewallRule::try_from).collect()
        }

        async fn update_firewall_rule(
            &self,
            name: &str,
            update: &RuleUpdate,
        ) -> StoreResult<Option<FirewallRule>> {
            let row: Option<RuleRow> = sqlx::query_as(
                "UPDATE firewall_rules SET threshold = COALESCE($2, threshold), \
                 window_seconds = COALESCE($3, window_seconds), \
                 lookback_seconds = COALESCE($4, lookback_seconds), \
                 mode = COALESCE($5, mode), side_effect = COALESCE($6, side_effect), \
                 version = version + 1, updated_at = $7 WHERE name = $1 RETURNING *",
            )
            .bind(name)
            .bind(update.threshold.map(i64::from))
            .bind(update.window_seconds.map(i64::from))
            .bind(update.lookback_seconds.map(i64::from))
            .bind(update.mode.as_deref().and_then(RuleMode::parse).map(RuleMode::as_str))
            .bind(
                update
                    .side_effect
                    .as_deref()
                    .and_then(SideEffect::parse)
                    .map(SideEffect::as_str),
            )
            .bind(Time(now_micros()))
            .fetch_optional(&self.pool)
            .await?;
            row.map(FirewallRule::try_from).transpose()
        }

        async fn scope_members(
            &self,
            event_type: &str,
            scope: RuleScope,
            key: &str,
            since: DateTime<Utc>,
            whole_accounts: bool,
        ) -> StoreResult<(Vec<Uuid>, Vec<String>)> {
            let column = scope.column();
            let rows: Vec<MemberRow> = sqlx::query_as(&format!(
                "SELECT DISTINCT e.user_id, d.id AS device_id FROM business_events e \
                 LEFT JOIN devices d ON d.user_id = e.user_id AND ($4 OR d.id = e.device_id) \
                 WHERE e.type = $1 AND e.{column} = $2 AND e.created_at >= $3 \
                 AND e.user_id IS NOT NULL"
            ))
            .bind(event_type)
            .bind(key)
            .bind(Time(since))
            .bind(whole_accounts)
            .fetch_all(&self.pool)
            .await?;
            let mut users = Vec::new();
            let mut devices = Vec::new();
            for row in rows {
                if let Some(user) = row.user_id.map(Uuid::from) {
                    if !users.contains(&user) {
                        users.push(user);
                    }
                }
                if let Some(device) = row.device_id {
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
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let now = now_micros();
            let id = Uuid::now_v7();
            let rule = &decision.rule;
            sqlx::query(
                "INSERT INTO firewall_decisions (id, rule_name, rule_version, mode, side_effect, \
                 threshold, window_seconds, lookback_seconds, scope, scope_key, affected_user_ids, \
                 affected_device_ids, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(Id(id))
            .bind(&rule.name)
            .bind(i64::from(rule.version))
            .bind(rule.mode.as_str())
            .bind(rule.side_effect.as_str())
            .bind(i64::from(rule.threshold))
            .bind(i64::from(rule.window_seconds))
            .bind(i64::from(rule.lookback_seconds))
            .bind(rule.scope.as_str())
            .bind(&decision.scope_key)
            .bind(Json(&decision.users))
            .bind(Json(&decision.devices))
            .bind(Time(now))
            .execute(&mut *tx)
            .await?;
            if apply {
                let hold = |action| NewHold {
                    source: HoldSource::Firewall,
                    action,
                    reason: rule.name.clone(),
                    decision_id: Some(id),
                    created_by: None,
                };
                for user in &decision.users {
                    Self::insert_user_hold(&mut tx, *user, &hold(HoldAction::Block)).await?;
                    Self::settle_user(&mut tx, *user).await?;
                    sqlx::query(
                        "UPDATE refresh_families SET status = 'revoked', revoke_reason = 'firewall', \
                         revoked_at = $2 WHERE user_id = $1 AND status = 'active'",
                    )
                    .bind(Id(*user))
                    .bind(Time(now))
                    .execute(&mut *tx)
                    .await?;
                }
                // Both side effects take the devices out of service the same
                // way (blocked users' devices too, so the block bites before
                // their access tokens expire).
                for device in &decision.devices {
                    Self::insert_device_hold(&mut tx, device, &hold(HoldAction::Quarantine)).await?;
                    Self::settle_device(&mut tx, device).await?;
                }
            }
            let mut event = decision.event.clone();
            event.metadata["decision_id"] = serde_json::json!(id);
            Self::insert_event(&mut tx, &event).await?;
            tx.commit().await?;
            Ok(FirewallDecision {
                id,
                rule_name: rule.name.clone(),
                rule_version: rule.version,
                mode: rule.mode,
                side_effect: rule.side_effect,
                threshold: rule.threshold,
                window_seconds: rule.window_seconds,
                lookback_seconds: rule.lookback_seconds,
                scope: rule.scope,
                scope_key: decision.scope_key,
                affected_users: decision.users,
                affected_devices: decision.devices,
                created_at: now,
                undone_at: None,
            })
        }

        async fn firewall_decisions(&self, limit: u32) -> StoreResult<Vec<FirewallDecision>> {
            let rows: Vec<DecisionRow> = sqlx::query_as(
                "SELECT * FROM firewall_decisions ORDER BY created_at DESC, id DESC LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(FirewallDecision::try_from).collect()
        }

        async fn undo_firewall_decision(
            &self,
            id: Uuid,
            event: NewEvent,
        ) -> StoreResult<Option<(FirewallDecision, bool)>> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let now = now_micros();
            let select = format!(
                "SELECT * FROM firewall_decisions WHERE id = $1{}",
                <Db as Dialect>::FOR_UPDATE
            );
            let Some(row) = sqlx::query_as::<_, DecisionRow>(&select)
                .bind(Id(id))
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(None);
            };
            let mut decision = FirewallDecision::try_from(row)?;
            if decision.undone_at.is_some() {
                return Ok(Some((decision, false)));
            }
            sqlx::query("UPDATE firewall_decisions SET undone_at = $2 WHERE id = $1")
                .bind(Id(id))
                .bind(Time(now))
                .execute(&mut *tx)
                .await?;
            // Exactly this decision's holds go; whatever else restricts these
            // users and devices stays.
            let users: Vec<Option<Id>> =
                sqlx::query_scalar("SELECT user_id FROM holds WHERE decision_id = $1")
                    .bind(Id(id))
                    .fetch_all(&mut *tx)
                    .await?;
            let devices: Vec<Option<String>> =
                sqlx::query_scalar("SELECT device_id FROM holds WHERE decision_id = $1")
                    .bind(Id(id))
                    .fetch_all(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM holds WHERE decision_id = $1")
                .bind(Id(id))
                .execute(&mut *tx)
                .await?;
            for user in users.into_iter().flatten() {
                Self::settle_user(&mut tx, user.into()).await?;
            }
            for device in devices.into_iter().flatten() {
                Self::settle_device(&mut tx, &device).await?;
            }
            Self::insert_event(&mut tx, &event).await?;
            tx.commit().await?;
            decision.undone_at = Some(now);
            Ok(Some((decision, true)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_words_round_trip_and_refuse_the_unknown() {
        for scope in [
            RuleScope::Ip,
            RuleScope::IpPrefix,
            RuleScope::User,
            RuleScope::Device,
        ] {
            assert_eq!(RuleScope::parse(scope.as_str()), Some(scope));
        }
        for effect in [
            SideEffect::Throttle,
            SideEffect::BlockUsers,
            SideEffect::QuarantineDevices,
        ] {
            assert_eq!(SideEffect::parse(effect.as_str()), Some(effect));
        }
        for mode in [RuleMode::Enforce, RuleMode::Simulate, RuleMode::Off] {
            assert_eq!(RuleMode::parse(mode.as_str()), Some(mode));
            assert_eq!(serde_json::json!(mode), serde_json::json!(mode.as_str()));
        }
        assert_eq!(RuleMode::parse("panic"), None);
        assert_eq!(RuleScope::parse("IP"), None);
    }
}
