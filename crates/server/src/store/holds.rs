//! Holds: each restriction on a device or a user, kept apart from the others.
//!
//! An operator's fraud lock, the engine's lock, a refresh-reuse revocation, an
//! attestation quarantine and a firewall decision are independent facts. When
//! they shared one `status` column, undoing a firewall decision set the device
//! `active` whatever else had locked it. Now each is a row in `holds` with its
//! source, and a device (or user) is active only when it has none: undoing a
//! decision deletes exactly that decision's holds, and an operator's `unlock`
//! deletes the admin and engine holds (or, asked to, every hold).
//!
//! The `status` columns on `devices` and `users` remain as the derived,
//! indexed summary every request reads (through the device-status cache):
//! each change of holds recomputes them in the same transaction
//! ([`SqlStore::settle_device`], [`SqlStore::settle_user`]). A device's status
//! is the strongest of its holds: `revoke` → revoked, then `quarantine` →
//! quarantined, then `lock` → locked; a user with any hold is blocked.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    columns::{Id, Time},
    decode_error, now_micros,
    sql::{Dialect, SqlStore},
    DeviceStatus, NewAuditEntry, StoreError, StoreResult,
};

/// Who placed a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldSource {
    /// An operator, through the admin API.
    Admin,
    /// A firewall decision (its id is on the hold).
    Firewall,
    /// The trust engine's kill-switch.
    Engine,
    /// Refresh-token reuse: somebody holds a copy of the device's session.
    RefreshReuse,
    /// Repeated attestation failures.
    Attestation,
}
stored_words!(HoldSource {
    Admin = "admin",
    Firewall = "firewall",
    Engine = "engine",
    RefreshReuse = "refresh_reuse",
    Attestation = "attestation",
});

/// What a hold does to its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldAction {
    /// The device is locked (403 `device_locked`).
    Lock,
    /// The device is quarantined (403 `device_locked`).
    Quarantine,
    /// The device's sessions are revoked (401 `device_revoked`).
    Revoke,
    /// The user is blocked (403 `account_blocked` on every device of theirs).
    /// Users' holds only.
    Block,
}
stored_words!(HoldAction {
    Lock = "lock",
    Quarantine = "quarantine",
    Revoke = "revoke",
    Block = "block",
});

/// A hold to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHold {
    /// Who places it.
    pub source: HoldSource,
    /// What it does.
    pub action: HoldAction,
    /// Why, as a reason code (`operator_lock`, `refresh_token_reuse`, …).
    pub reason: String,
    /// The firewall decision behind it.
    pub decision_id: Option<Uuid>,
    /// The operator (admin key name) who placed it, when one did.
    pub created_by: Option<String>,
}

impl NewHold {
    /// A hold with no decision and no operator.
    pub fn new(source: HoldSource, action: HoldAction, reason: &str) -> Self {
        Self {
            source,
            action,
            reason: reason.to_owned(),
            decision_id: None,
            created_by: None,
        }
    }
}

/// A stored hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Hold {
    /// Hold id (UUID v7).
    pub id: Uuid,
    /// Who placed it.
    pub source: HoldSource,
    /// What it does.
    pub action: HoldAction,
    /// Why.
    pub reason: String,
    /// The firewall decision behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<Uuid>,
    /// The operator who placed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// Which of a device's holds a release removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Those placed by these sources.
    Sources(&'static [HoldSource]),
    /// Every hold.
    All,
}

impl Release {
    /// What an operator's `unlock` clears unless asked for everything: its
    /// own holds and the engine's (the evidence behind an engine lock is
    /// cleared with it).
    pub const UNLOCK: Self = Self::Sources(&[HoldSource::Admin, HoldSource::Engine]);

    fn covers(self, source: HoldSource) -> bool {
        match self {
            Self::All => true,
            Self::Sources(sources) => sources.contains(&source),
        }
    }
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The holds were removed; the device's status is now this.
    Released {
        /// How many holds were removed.
        removed: usize,
        /// The device's status afterwards (active when nothing remains).
        status: DeviceStatus,
    },
    /// Holds the release does not cover remain: nothing was changed.
    Remaining(Vec<Hold>),
}

/// Placing, listing and releasing holds.
#[async_trait]
pub trait HoldStore: Send + Sync {
    /// A device's holds, oldest first.
    async fn device_holds(&self, device_id: &str) -> StoreResult<Vec<Hold>>;

    /// A user's holds, oldest first.
    async fn user_holds(&self, user_id: Uuid) -> StoreResult<Vec<Hold>>;

    /// Places a hold on a device, with an optional audit row, and returns its
    /// new status; `None` when the device does not exist.
    async fn hold_device(
        &self,
        device_id: &str,
        hold: NewHold,
        audit: Option<NewAuditEntry>,
    ) -> StoreResult<Option<DeviceStatus>>;

    /// Removes the device's holds `release` covers — all or nothing: when a
    /// hold it does not cover remains, nothing changes and the remaining holds
    /// are returned. With the audit row, in one transaction. `None` when the
    /// device does not exist.
    async fn release_device(
        &self,
        device_id: &str,
        release: Release,
        audit: Option<NewAuditEntry>,
    ) -> StoreResult<Option<ReleaseOutcome>>;
}

/// A `holds` row.
#[derive(FromRow)]
struct HoldRow {
    id: Id,
    source: String,
    action: String,
    reason: String,
    decision_id: Option<Id>,
    created_by: Option<String>,
    created_at: Time,
}

impl TryFrom<HoldRow> for Hold {
    type Error = StoreError;

    fn try_from(row: HoldRow) -> StoreResult<Self> {
        Ok(Self {
            id: row.id.into(),
            source: HoldSource::parse(&row.source)
                .ok_or_else(|| decode_error(format!("unknown hold source {:?}", row.source)))?,
            action: HoldAction::parse(&row.action)
                .ok_or_else(|| decode_error(format!("unknown hold action {:?}", row.action)))?,
            reason: row.reason,
            decision_id: row.decision_id.map(Uuid::from),
            created_by: row.created_by,
            created_at: row.created_at.into(),
        })
    }
}

/// The status a device whose holds do these things has: the strongest.
pub fn device_status_for(actions: &[HoldAction]) -> DeviceStatus {
    if actions.contains(&HoldAction::Revoke) {
        DeviceStatus::Revoked
    } else if actions.contains(&HoldAction::Quarantine) {
        DeviceStatus::Quarantined
    } else if actions.is_empty() {
        DeviceStatus::Active
    } else {
        DeviceStatus::Locked
    }
}

const HOLD_COLUMNS: &str = "id, source, action, reason, decision_id, created_by, created_at";

for_each_dialect! {
    impl SqlStore<Db> {
        /// Places a hold on a device, on the caller's transaction (the status
        /// is settled by the caller).
        pub(super) async fn insert_device_hold(
            tx: &mut <Db as sqlx::Database>::Connection,
            device_id: &str,
            hold: &NewHold,
        ) -> StoreResult<()> {
            Self::insert_hold(tx, Some(device_id), None, hold).await
        }

        /// Places a hold on a user, on the caller's transaction.
        pub(super) async fn insert_user_hold(
            tx: &mut <Db as sqlx::Database>::Connection,
            user_id: Uuid,
            hold: &NewHold,
        ) -> StoreResult<()> {
            Self::insert_hold(tx, None, Some(user_id), hold).await
        }

        /// One `holds` row, on a device or on a user (the table checks it is
        /// exactly one of them).
        async fn insert_hold(
            tx: &mut <Db as sqlx::Database>::Connection,
            device_id: Option<&str>,
            user_id: Option<Uuid>,
            hold: &NewHold,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO holds (id, device_id, user_id, source, action, reason, decision_id, \
                 created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(Id(Uuid::now_v7()))
            .bind(device_id)
            .bind(user_id.map(Id))
            .bind(hold.source.as_str())
            .bind(hold.action.as_str())
            .bind(&hold.reason)
            .bind(hold.decision_id.map(Id))
            .bind(&hold.created_by)
            .bind(Time(now_micros()))
            .execute(&mut *tx)
            .await?;
            Ok(())
        }

        /// Locks the device's row for the caller's transaction; false when
        /// there is no such device.
        async fn lock_device(
            tx: &mut <Db as sqlx::Database>::Connection,
            device_id: &str,
        ) -> StoreResult<bool> {
            let found: Option<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM devices WHERE id = $1{}",
                <Db as Dialect>::FOR_UPDATE
            ))
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?;
            Ok(found.is_some())
        }

        /// A device's holds, oldest first, on the caller's connection.
        async fn holds_of_device(
            conn: &mut <Db as sqlx::Database>::Connection,
            device_id: &str,
        ) -> StoreResult<Vec<Hold>> {
            let rows: Vec<HoldRow> = sqlx::query_as(&format!(
                "SELECT {HOLD_COLUMNS} FROM holds WHERE device_id = $1 ORDER BY created_at, id"
            ))
            .bind(device_id)
            .fetch_all(&mut *conn)
            .await?;
            rows.into_iter().map(Hold::try_from).collect()
        }

        /// Recomputes a device's status from its holds (see the module docs);
        /// a device that becomes active starts its attestation count afresh.
        pub(super) async fn settle_device(
            tx: &mut <Db as sqlx::Database>::Connection,
            device_id: &str,
        ) -> StoreResult<DeviceStatus> {
            let stored: Vec<String> =
                sqlx::query_scalar("SELECT action FROM holds WHERE device_id = $1")
                    .bind(device_id)
                    .fetch_all(&mut *tx)
                    .await?;
            let actions = stored
                .iter()
                .map(|a| {
                    HoldAction::parse(a)
                        .ok_or_else(|| decode_error(format!("unknown hold action {a:?}")))
                })
                .collect::<StoreResult<Vec<_>>>()?;
            let status = device_status_for(&actions);
            sqlx::query(
                "UPDATE devices SET status = $2, updated_at = $3, attestation_failures = \
                 CASE WHEN $2 = 'active' THEN 0 ELSE attestation_failures END \
                 WHERE id = $1 AND status <> $2",
            )
            .bind(device_id)
            .bind(status.as_str())
            .bind(Time(now_micros()))
            .execute(&mut *tx)
            .await?;
            Ok(status)
        }

        /// Recomputes a user's status from its holds.
        pub(super) async fn settle_user(
            tx: &mut <Db as sqlx::Database>::Connection,
            user_id: Uuid,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE users SET status = CASE WHEN EXISTS \
                 (SELECT 1 FROM holds WHERE holds.user_id = users.id) THEN 'blocked' ELSE 'active' END, \
                 updated_at = $2 WHERE id = $1",
            )
            .bind(Id(user_id))
            .bind(Time(now_micros()))
            .execute(&mut *tx)
            .await?;
            Ok(())
        }

    }

    #[async_trait]
    impl HoldStore for SqlStore<Db> {
        async fn device_holds(&self, device_id: &str) -> StoreResult<Vec<Hold>> {
            let mut conn = self.pool.acquire().await?;
            Self::holds_of_device(&mut conn, device_id).await
        }

        async fn user_holds(&self, user_id: Uuid) -> StoreResult<Vec<Hold>> {
            let rows: Vec<HoldRow> = sqlx::query_as(&format!(
                "SELECT {HOLD_COLUMNS} FROM holds WHERE user_id = $1 ORDER BY created_at, id"
            ))
            .bind(Id(user_id))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map(Hold::try_from).collect()
        }

        #[tracing::instrument(skip_all, name = "store.hold_device", fields(device_id))]
        async fn hold_device(
            &self,
            device_id: &str,
            hold: NewHold,
            audit: Option<NewAuditEntry>,
        ) -> StoreResult<Option<DeviceStatus>> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            if !Self::lock_device(&mut tx, device_id).await? {
                tx.rollback().await?;
                return Ok(None);
            }
            Self::insert_device_hold(&mut tx, device_id, &hold).await?;
            let status = Self::settle_device(&mut tx, device_id).await?;
            if let Some(audit) = audit {
                self.insert_audit(&mut tx, audit).await?;
            }
            tx.commit().await?;
            Ok(Some(status))
        }

        #[tracing::instrument(skip_all, name = "store.release_device", fields(device_id))]
        async fn release_device(
            &self,
            device_id: &str,
            release: Release,
            audit: Option<NewAuditEntry>,
        ) -> StoreResult<Option<ReleaseOutcome>> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            if !Self::lock_device(&mut tx, device_id).await? {
                tx.rollback().await?;
                return Ok(None);
            }
            let holds = Self::holds_of_device(&mut tx, device_id).await?;
            let (covered, remaining): (Vec<Hold>, Vec<Hold>) =
                holds.into_iter().partition(|h| release.covers(h.source));
            if !remaining.is_empty() {
                tx.rollback().await?;
                return Ok(Some(ReleaseOutcome::Remaining(remaining)));
            }
            for hold in &covered {
                sqlx::query("DELETE FROM holds WHERE id = $1")
                    .bind(Id(hold.id))
                    .execute(&mut *tx)
                    .await?;
            }
            let status = Self::settle_device(&mut tx, device_id).await?;
            if let Some(audit) = audit {
                self.insert_audit(&mut tx, audit).await?;
            }
            tx.commit().await?;
            Ok(Some(ReleaseOutcome::Released {
                removed: covered.len(),
                status,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strongest_hold_sets_the_status() {
        use HoldAction::*;
        assert_eq!(device_status_for(&[]), DeviceStatus::Active);
        assert_eq!(device_status_for(&[Lock]), DeviceStatus::Locked);
        assert_eq!(device_status_for(&[Block]), DeviceStatus::Locked);
        assert_eq!(
            device_status_for(&[Lock, Quarantine]),
            DeviceStatus::Quarantined
        );
        assert_eq!(
            device_status_for(&[Quarantine, Revoke, Lock]),
            DeviceStatus::Revoked
        );
    }

    #[test]
    fn stored_words_round_trip() {
        for source in [
            HoldSource::Admin,
            HoldSource::Firewall,
            HoldSource::Engine,
            HoldSource::RefreshReuse,
            HoldSource::Attestation,
        ] {
            assert_eq!(HoldSource::parse(source.as_str()), Some(source));
            assert_eq!(
                serde_json::json!(source),
                serde_json::json!(source.as_str())
            );
        }
        assert_eq!(HoldAction::parse("unlock"), None);
    }

    #[test]
    fn unlock_covers_admin_and_engine_only() {
        assert!(Release::UNLOCK.covers(HoldSource::Admin));
        assert!(Release::UNLOCK.covers(HoldSource::Engine));
        assert!(!Release::UNLOCK.covers(HoldSource::Firewall));
        assert!(!Release::UNLOCK.covers(HoldSource::RefreshReuse));
        assert!(!Release::UNLOCK.covers(HoldSource::Attestation));
        assert!(Release::All.covers(HoldSource::Attestation));
    }
}
