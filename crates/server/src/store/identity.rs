//! Identity: users, their devices, and the refresh-token families that are
//! a device's sessions.
//!
//! Rotation is a compare-and-swap (`UPDATE … WHERE used_at IS NULL`) under a
//! lock on the family, so a concurrent logout or revocation either waits for
//! the rotation or is seen by it; reuse of a spent token revokes the family.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{
    attestation::{device_attestation, DeviceAttestation},
    columns::{Id, Time},
    holds::NewHold,
    now_micros,
    sql::{Dialect, SqlStore},
    NewAuditEntry, NewEvent, StoreError, StoreResult,
};

/// Whether a user may sign in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    /// Normal.
    Active,
    /// Blocked by an operator or the firewall.
    Blocked,
}

impl UserStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Blocked => "blocked",
        }
    }

    /// Parses the stored text (unknown values are treated as blocked: fail closed).
    pub fn parse(raw: &str) -> Self {
        if raw == "active" {
            Self::Active
        } else {
            Self::Blocked
        }
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub id: Uuid,
    /// Lower-cased email; '' for an external user registered without one.
    pub email: String,
    /// Argon2id PHC string; '' for an external user (no password: it never
    /// signs in with one).
    pub password_hash: String,
    /// Whether the user may sign in.
    pub status: UserStatus,
    /// The integrator's own id for this user (`POST /v1/admin/users`).
    pub external_id: Option<String>,
}

/// Whether `raw` may be an external id: 1–128 visible ASCII characters (no
/// spaces), compared exactly. The column's CHECK holds the length too.
pub fn is_external_id(raw: &str) -> bool {
    (1..=128).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic())
}

/// The columns of a [`UserRow`], selected from `users`, then the rest of
/// the query.
macro_rules! select_user {
    ($rest:literal) => {
        concat!(
            "SELECT id, email, password_hash, status, external_id FROM users ",
            $rest
        )
    };
}

/// What [`IdentityStore::ensure_external_user`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnsuredUser {
    /// A user was created for the external id.
    Created(User),
    /// The external id already had this user.
    Existing(User),
}

/// Whether a device's tokens are honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Normal.
    Active,
    /// Its sessions were revoked (e.g. refresh-token reuse): 401 `device_revoked`.
    Revoked,
    /// Quarantined (e.g. repeated attestation failures): 403 `device_locked`.
    Quarantined,
    /// Locked by the kill-switch: 403 `device_locked`.
    Locked,
}

impl DeviceStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Quarantined => "quarantined",
            Self::Locked => "locked",
        }
    }

    /// Parses the stored text (unknown values are treated as revoked: fail closed).
    pub fn parse(raw: &str) -> Self {
        match raw {
            "active" => Self::Active,
            "quarantined" => Self::Quarantined,
            "locked" => Self::Locked,
            _ => Self::Revoked,
        }
    }
}

/// A device bound to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Client-chosen device id (`[A-Za-z0-9_-]{8,64}`).
    pub id: String,
    /// Owner.
    pub user_id: Uuid,
    /// SHA-256 of the app's device fingerprint.
    pub fingerprint_sha256: Vec<u8>,
    /// `android` or `ios`.
    pub platform: String,
    /// Whether its tokens are honoured.
    pub status: DeviceStatus,
    /// The last attestation verdict, as recorded.
    pub attestation: DeviceAttestation,
    /// Attestation failures since the last success.
    pub attestation_failures: u32,
    /// Whether the owner's account is active (a blocked user is refused on
    /// every device route).
    pub owner_status: UserStatus,
}

/// A refresh token to store (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRefreshToken {
    /// SHA-256 of the opaque token.
    pub token_sha256: Vec<u8>,
    /// Id of the access token issued with it.
    pub jti: Uuid,
    /// Issue time.
    pub issued_at: DateTime<Utc>,
    /// Sliding expiry.
    pub expires_at: DateTime<Utc>,
}

/// A new device session: bind the device, revoke its previous family, start
/// a new one with its first refresh token — one transaction.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The user signing in.
    pub user_id: Uuid,
    /// The device.
    pub device_id: String,
    /// SHA-256 of the device fingerprint.
    pub fingerprint_sha256: Vec<u8>,
    /// `android` or `ios`.
    pub platform: String,
    /// The new family's id.
    pub family_id: Uuid,
    /// Its first refresh token.
    pub token: NewRefreshToken,
    /// Events recorded in the same transaction (`create:session`, and
    /// `create:user` on a registration), so none names a session that was
    /// never opened.
    pub events: Vec<NewEvent>,
    /// Devices with a live session the user may have, this one included:
    /// one more is [`super::StoreError::Conflict`] on [`TOO_MANY_DEVICES`].
    pub max_devices: u32,
}

/// The constraint a session over [`NewSession::max_devices`] violates.
pub const TOO_MANY_DEVICES: &str = "too_many_devices";

/// An account to create with its first session ([`IdentityStore::register`]).
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Its id (chosen by the caller, so the session's events can name it).
    pub id: Uuid,
    /// Lower-cased email.
    pub email: String,
    /// Argon2id PHC string.
    pub password_hash: String,
}

/// What the store knows of a presented refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// The family it belongs to.
    pub family_id: Uuid,
    /// Whether the family is still active.
    pub family_active: bool,
    /// The family's user.
    pub user_id: Uuid,
    /// The family's device.
    pub device_id: String,
    /// The fingerprint hash the family was issued to.
    pub fingerprint_sha256: Vec<u8>,
    /// When this token was exchanged, if it was.
    pub used_at: Option<DateTime<Utc>>,
    /// The pair its exchange issued, sealed under a key derived from this
    /// token; present only while that successor is unspent.
    pub successor_sealed: Option<Vec<u8>>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// Revokes every session of a device, optionally changing its status and
/// writing an audit row and an event — one transaction.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The device.
    pub device_id: String,
    /// Why (stored on the families).
    pub reason: String,
    /// A hold to place on the device (its status follows from its holds).
    pub hold: Option<NewHold>,
    /// Audit row to append.
    pub audit: Option<NewAuditEntry>,
    /// Event to record.
    pub event: Option<NewEvent>,
}

/// The result of a refresh-token compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was unused and its family active: it is now spent and the
    /// new token stored.
    Rotated,
    /// The token had already been spent (by an earlier or concurrent request).
    AlreadyUsed,
    /// The family was revoked (logout, new sign-in, reuse) in the meantime.
    FamilyInactive,
}

/// Users, devices and sessions.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// Creates a user; [`super::StoreError::Conflict`] when the email is taken.
    async fn create_user(&self, email: &str, password_hash: &str) -> StoreResult<User>;

    /// The user with this (lower-cased) email.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;

    /// The user with this id.
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;

    /// The user with this external id (exact, case-sensitive).
    async fn user_by_external_id(&self, external_id: &str) -> StoreResult<Option<User>>;

    /// The user of `external_id`, created (without a password, with `email`
    /// when given) if there is none — idempotent, and safe against
    /// concurrent calls (one creates, the others see it).
    /// [`super::StoreError::Conflict`] `users_email_key` when `email`
    /// belongs to another user.
    async fn ensure_external_user(
        &self,
        external_id: &str,
        email: Option<&str>,
    ) -> StoreResult<EnsuredUser>;

    /// Up to `limit` users whose external id starts with `prefix`, in id
    /// order, after the user `after`.
    async fn users_by_external_prefix(
        &self,
        prefix: &str,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<User>>;

    /// Deletes a user with its subscription, devices, their sessions,
    /// holds and attestation keys, and appends `audit`, in one transaction;
    /// the ids of the devices deleted. Audit rows and business events keep
    /// the (pseudonymous) ids. [`super::StoreError::NotFound`] when there
    /// is no such user.
    async fn delete_user(&self, id: Uuid, audit: NewAuditEntry) -> StoreResult<Vec<String>>;

    /// The device with this id.
    async fn device(&self, id: &str) -> StoreResult<Option<Device>>;

    /// Binds the device to the user (creating it, or re-binding it without
    /// touching its status), revokes its active families and starts a new one.
    async fn start_session(&self, session: NewSession) -> StoreResult<()>;

    /// Creates `user` and opens its first session in one transaction: a
    /// refused registration (the email taken) leaves no account, no device
    /// binding and no event. [`super::StoreError::Conflict`] when the email is taken.
    async fn register(&self, user: NewUser, session: NewSession) -> StoreResult<User>;

    /// What is known of a refresh token, by its hash.
    async fn refresh_record(&self, token_sha256: &[u8]) -> StoreResult<Option<RefreshRecord>>;

    /// Compare-and-swap rotation: marks `old` used if (and only if) it is
    /// still unused and its family active, keeps `successor_sealed` on it,
    /// clears the sealed successor its predecessor kept, and adds `new` to
    /// the family.
    async fn rotate_refresh(
        &self,
        old_sha256: &[u8],
        family_id: Uuid,
        new: NewRefreshToken,
        successor_sealed: Option<Vec<u8>>,
    ) -> StoreResult<RotateOutcome>;

    /// Revokes every active family of a device, with the optional status
    /// change, audit row and event, in one transaction.
    async fn revoke_device(&self, revocation: Revocation) -> StoreResult<()>;
}

/// A `users` row.
#[derive(FromRow)]
struct UserRow {
    id: Id,
    email: String,
    password_hash: String,
    status: String,
    external_id: Option<String>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            id: row.id.into(),
            email: row.email,
            password_hash: row.password_hash,
            status: UserStatus::parse(&row.status),
            external_id: row.external_id,
        }
    }
}

/// A `devices` row.
#[derive(FromRow)]
struct DeviceRow {
    id: String,
    user_id: Id,
    fingerprint_sha256: Vec<u8>,
    platform: String,
    status: String,
    attestation_grade: String,
    attestation_evidence: String,
    attestation_provider: Option<String>,
    attested_at: Option<Time>,
    attestation_failures: i32,
    owner_status: String,
}

impl From<DeviceRow> for Device {
    fn from(row: DeviceRow) -> Self {
        Self {
            id: row.id,
            user_id: row.user_id.into(),
            fingerprint_sha256: row.fingerprint_sha256,
            platform: row.platform,
            status: DeviceStatus::parse(&row.status),
            attestation: device_attestation(
                &row.attestation_grade,
                &row.attestation_evidence,
                row.attestation_provider,
                row.attested_at,
            ),
            attestation_failures: row.attestation_failures.unsigned_abs(),
            owner_status: UserStatus::parse(&row.owner_status),
        }
    }
}

/// A refresh token joined with its family.
#[derive(FromRow)]
struct RefreshRow {
    used_at: Option<Time>,
    successor_sealed: Option<Vec<u8>>,
    expires_at: Time,
    family_id: Id,
    status: String,
    user_id: Id,
    device_id: String,
    fingerprint_sha256: Vec<u8>,
}

impl From<RefreshRow> for RefreshRecord {
    fn from(row: RefreshRow) -> Self {
        Self {
            family_id: row.family_id.into(),
            family_active: row.status == "active",
            user_id: row.user_id.into(),
            device_id: row.device_id,
            fingerprint_sha256: row.fingerprint_sha256,
            used_at: row.used_at.map(Into::into),
            successor_sealed: row.successor_sealed,
            expires_at: row.expires_at.into(),
        }
    }
}

for_each_dialect! {
    impl SqlStore<Db> {
                /// Binds the device, supersedes its families, starts the new one and
        /// records the session's events, on the caller's transaction.
        async fn insert_session(
            tx: &mut <Db as sqlx::Database>::Connection,
            session: &NewSession,
        ) -> StoreResult<()> {
            let now = Time(now_micros());
            // Count the user's other devices with a live session under a lock
            // on the user (SQLite: the write lock), so two sign-ins at once
            // cannot both take the last place.
            sqlx::query(&format!(
                "SELECT id FROM users WHERE id = $1{}",
                <Db as Dialect>::FOR_UPDATE
            ))
            .bind(Id(session.user_id))
            .fetch_optional(&mut *tx)
            .await?;
            let others: i64 = sqlx::query_scalar(
                "SELECT COUNT(DISTINCT device_id) FROM refresh_families \
                 WHERE user_id = $1 AND status = 'active' AND device_id <> $2",
            )
            .bind(Id(session.user_id))
            .bind(&session.device_id)
            .fetch_one(&mut *tx)
            .await?;
            if others >= i64::from(session.max_devices) {
                return Err(StoreError::Conflict {
                    constraint: TOO_MANY_DEVICES.to_owned(),
                });
            }
            // An App Attest key vouches for one app install: another owner,
            // fingerprint or platform under this device id does not inherit it.
            sqlx::query(
                "DELETE FROM app_attest_keys WHERE device_id = $1 AND EXISTS (SELECT 1 FROM devices \
                 WHERE id = $1 AND (user_id <> $2 OR fingerprint_sha256 <> $3 OR platform <> $4))",
            )
            .bind(&session.device_id)
            .bind(Id(session.user_id))
            .bind(&session.fingerprint_sha256)
            .bind(&session.platform)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO devices (id, user_id, fingerprint_sha256, platform, created_at, updated_at, last_seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $5, $5) \
                 ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, \
                 fingerprint_sha256 = excluded.fingerprint_sha256, platform = excluded.platform, \
                 attestation_state = CASE WHEN devices.user_id = excluded.user_id \
                 AND devices.fingerprint_sha256 = excluded.fingerprint_sha256 \
                 AND devices.platform = excluded.platform THEN devices.attestation_state ELSE 'unknown' END, \
                 attestation_grade = CASE WHEN devices.user_id = excluded.user_id \
                 AND devices.fingerprint_sha256 = excluded.fingerprint_sha256 \
                 AND devices.platform = excluded.platform THEN devices.attestation_grade ELSE 'unknown' END, \
                 attestation_evidence = CASE WHEN devices.user_id = excluded.user_id \
                 AND devices.fingerprint_sha256 = excluded.fingerprint_sha256 \
                 AND devices.platform = excluded.platform THEN devices.attestation_evidence ELSE '' END, \
                 attestation_provider = CASE WHEN devices.user_id = excluded.user_id \
                 AND devices.fingerprint_sha256 = excluded.fingerprint_sha256 \
                 AND devices.platform = excluded.platform THEN devices.attestation_provider ELSE NULL END, \
                 attested_at = CASE WHEN devices.user_id = excluded.user_id \
                 AND devices.fingerprint_sha256 = excluded.fingerprint_sha256 \
                 AND devices.platform = excluded.platform THEN devices.attested_at ELSE NULL END, \
                 updated_at = excluded.updated_at, last_seen_at = excluded.last_seen_at",
            )
            .bind(&session.device_id)
            .bind(Id(session.user_id))
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
            .bind(Id(session.family_id))
            .bind(Id(session.user_id))
            .bind(&session.device_id)
            .bind(&session.fingerprint_sha256)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Self::insert_refresh(&mut *tx, session.family_id, &session.token).await?;
            for event in &session.events {
                Self::insert_event(&mut *tx, event).await?;
            }
            Ok(())
        }


        async fn insert_refresh(
            conn: &mut <Db as sqlx::Database>::Connection,
            family_id: Uuid,
            token: &NewRefreshToken,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO refresh_tokens (token_sha256, family_id, jti, issued_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&token.token_sha256)
            .bind(Id(family_id))
            .bind(Id(token.jti))
            .bind(Time(token.issued_at))
            .bind(Time(token.expires_at))
            .execute(conn)
            .await?;
            Ok(())
        }
    }

    #[async_trait]
    impl IdentityStore for SqlStore<Db> {
        #[tracing::instrument(skip_all, name = "store.create_user")]
        async fn create_user(&self, email: &str, password_hash: &str) -> StoreResult<User> {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO users (id, email, password_hash, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4)",
            )
            .bind(Id(id))
            .bind(email)
            .bind(password_hash)
            .bind(Time(now_micros()))
            .execute(&self.pool)
            .await?;
            Ok(User {
                id,
                email: email.to_owned(),
                password_hash: password_hash.to_owned(),
                status: UserStatus::Active,
                external_id: None,
            })
        }

        async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
            let row: Option<UserRow> = sqlx::query_as(
                select_user!("WHERE lower(email) = lower($1) AND email <> ''"),
            )
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(User::from))
        }

        async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
            let row: Option<UserRow> = sqlx::query_as(
                select_user!("WHERE id = $1"),
            )
            .bind(Id(id))
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(User::from))
        }

        async fn user_by_external_id(&self, external_id: &str) -> StoreResult<Option<User>> {
            let row: Option<UserRow> = sqlx::query_as(
                select_user!("WHERE external_id = $1"),
            )
            .bind(external_id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(User::from))
        }

        #[tracing::instrument(skip_all, name = "store.ensure_external_user")]
        async fn ensure_external_user(
            &self,
            external_id: &str,
            email: Option<&str>,
        ) -> StoreResult<EnsuredUser> {
            if let Some(user) = self.user_by_external_id(external_id).await? {
                return Ok(EnsuredUser::Existing(user));
            }
            let id = Uuid::now_v7();
            let email = email.unwrap_or("");
            // A concurrent call for the same external id loses on its unique
            // index and reads the winner's row; an email taken by someone
            // else is a conflict.
            let inserted = sqlx::query(
                "INSERT INTO users (id, email, password_hash, external_id, created_at, updated_at) \
                 VALUES ($1, $2, '', $3, $4, $4) \
                 ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING",
            )
            .bind(Id(id))
            .bind(email)
            .bind(external_id)
            .bind(Time(now_micros()))
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(EnsuredUser::Created(User {
                    id,
                    email: email.to_owned(),
                    password_hash: String::new(),
                    status: UserStatus::Active,
                    external_id: Some(external_id.to_owned()),
                }));
            }
            self.user_by_external_id(external_id)
                .await?
                .map(EnsuredUser::Existing)
                .ok_or(StoreError::NotFound)
        }

        async fn users_by_external_prefix(
            &self,
            prefix: &str,
            after: Option<Uuid>,
            limit: u32,
        ) -> StoreResult<Vec<User>> {
            let rows: Vec<UserRow> = sqlx::query_as(select_user!(
                "WHERE external_id IS NOT NULL \
                 AND substr(external_id, 1, length($1)) = $1 \
                 AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3"
            ))
            .bind(prefix)
            .bind(after.map(Id))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(User::from).collect())
        }

        #[tracing::instrument(skip_all, name = "store.delete_user")]
        async fn delete_user(&self, id: Uuid, audit: NewAuditEntry) -> StoreResult<Vec<String>> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let found = sqlx::query(&format!(
                "SELECT id FROM users WHERE id = $1{}",
                <Db as Dialect>::FOR_UPDATE
            ))
            .bind(Id(id))
            .fetch_optional(&mut *tx)
            .await?;
            if found.is_none() {
                return Err(StoreError::NotFound);
            }
            let devices: Vec<String> =
                sqlx::query_scalar("SELECT id FROM devices WHERE user_id = $1 ORDER BY id")
                    .bind(Id(id))
                    .fetch_all(&mut *tx)
                    .await?;
            // Children first, explicitly. A device that moved to this user
            // from another keeps the other user's (superseded) families, so
            // families go by device as well as by user.
            for statement in [
                "DELETE FROM refresh_tokens WHERE family_id IN \
                 (SELECT id FROM refresh_families WHERE user_id = $1 OR device_id IN \
                  (SELECT id FROM devices WHERE user_id = $1))",
                "DELETE FROM refresh_families WHERE user_id = $1 OR device_id IN \
                 (SELECT id FROM devices WHERE user_id = $1)",
                "DELETE FROM holds WHERE user_id = $1 OR device_id IN \
                 (SELECT id FROM devices WHERE user_id = $1)",
                "DELETE FROM app_attest_keys WHERE device_id IN \
                 (SELECT id FROM devices WHERE user_id = $1)",
                "DELETE FROM engine_snapshots WHERE device_id IN \
                 (SELECT id FROM devices WHERE user_id = $1)",
                "DELETE FROM device_commands WHERE device_id IN \
                 (SELECT id FROM devices WHERE user_id = $1)",
                "DELETE FROM devices WHERE user_id = $1",
                "DELETE FROM subscriptions WHERE user_id = $1",
                "DELETE FROM users WHERE id = $1",
            ] {
                sqlx::query(statement).bind(Id(id)).execute(&mut *tx).await?;
            }
            self.insert_audit(&mut tx, audit).await?;
            tx.commit().await?;
            Ok(devices)
        }

        async fn device(&self, id: &str) -> StoreResult<Option<Device>> {
            let row: Option<DeviceRow> = sqlx::query_as(
                "SELECT d.id, d.user_id, d.fingerprint_sha256, d.platform, d.status, \
                 d.attestation_grade, d.attestation_evidence, d.attestation_provider, \
                 d.attested_at, d.attestation_failures, u.status AS owner_status \
                 FROM devices d JOIN users u ON u.id = d.user_id WHERE d.id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(Device::from))
        }

        #[tracing::instrument(skip_all, name = "store.start_session", fields(device_id = %session.device_id))]
        async fn start_session(&self, session: NewSession) -> StoreResult<()> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            Self::insert_session(&mut tx, &session).await?;
            tx.commit().await?;
            Ok(())
        }

        #[tracing::instrument(skip_all, name = "store.register", fields(device_id = %session.device_id))]
        async fn register(&self, user: NewUser, session: NewSession) -> StoreResult<User> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            sqlx::query(
                "INSERT INTO users (id, email, password_hash, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4)",
            )
            .bind(Id(user.id))
            .bind(&user.email)
            .bind(&user.password_hash)
            .bind(Time(now_micros()))
            .execute(&mut *tx)
            .await?;
            Self::insert_session(&mut tx, &session).await?;
            tx.commit().await?;
            Ok(User {
                id: user.id,
                email: user.email,
                password_hash: user.password_hash,
                status: UserStatus::Active,
                external_id: None,
            })
        }

        async fn refresh_record(&self, token_sha256: &[u8]) -> StoreResult<Option<RefreshRecord>> {
            let row: Option<RefreshRow> = sqlx::query_as(
                "SELECT t.used_at, t.successor_sealed, t.expires_at, f.id AS family_id, f.status, \
                 f.user_id, f.device_id, \
                 f.fingerprint_sha256 FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id \
                 WHERE t.token_sha256 = $1",
            )
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(RefreshRecord::from))
        }

        #[tracing::instrument(skip_all, name = "store.rotate_refresh")]
        async fn rotate_refresh(
            &self,
            old_sha256: &[u8],
            family_id: Uuid,
            new: NewRefreshToken,
            successor_sealed: Option<Vec<u8>>,
        ) -> StoreResult<RotateOutcome> {
            // Lock the family first (SQLite: the write lock; PostgreSQL: the
            // family row): a concurrent logout or revocation waits for this
            // rotation, or this one sees the family revoked.
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let lock = format!(
                "SELECT status FROM refresh_families WHERE id = $1{}",
                <Db as Dialect>::FOR_UPDATE
            );
            let status: Option<String> = sqlx::query_scalar(&lock)
                .bind(Id(family_id))
                .fetch_optional(&mut *tx)
                .await?;
            if status.as_deref() != Some("active") {
                tx.rollback().await?;
                return Ok(RotateOutcome::FamilyInactive);
            }
            let won = sqlx::query(
                "UPDATE refresh_tokens SET used_at = $3, successor_sealed = $4 \
                 WHERE token_sha256 = $1 AND used_at IS NULL AND family_id = $2",
            )
            .bind(old_sha256)
            .bind(Id(family_id))
            .bind(Time(now_micros()))
            .bind(successor_sealed)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !won {
                tx.rollback().await?;
                return Ok(RotateOutcome::AlreadyUsed);
            }
            // `old` is now the only token whose presenter may get the current
            // pair again: older ones forget theirs.
            sqlx::query(
                "UPDATE refresh_tokens SET successor_sealed = NULL WHERE family_id = $1 \
                 AND token_sha256 <> $2 AND successor_sealed IS NOT NULL",
            )
            .bind(Id(family_id))
            .bind(old_sha256)
            .execute(&mut *tx)
            .await?;
            Self::insert_refresh(&mut tx, family_id, &new).await?;
            tx.commit().await?;
            Ok(RotateOutcome::Rotated)
        }

        #[tracing::instrument(skip_all, name = "store.revoke_device", fields(device_id = %revocation.device_id))]
        async fn revoke_device(&self, revocation: Revocation) -> StoreResult<()> {
            let now = Time(now_micros());
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
            if let Some(hold) = &revocation.hold {
                Self::insert_device_hold(&mut tx, &revocation.device_id, hold).await?;
                Self::settle_device(&mut tx, &revocation.device_id).await?;
            }
            if let Some(audit) = revocation.audit {
                self.insert_audit(&mut tx, audit).await?;
            }
            if let Some(event) = revocation.event {
                Self::insert_event(&mut tx, &event).await?;
            }
            tx.commit().await?;
            Ok(())
        }
    }
}
