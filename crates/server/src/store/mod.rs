//! The durable store: the truth that must survive a restart.
//!
//! Users, devices, refresh families, subscriptions, billing events, firewall
//! rules and decisions, business events and the audit trail live here. The
//! [`Store`] trait is what the rest of the server sees; [`connect`] picks the
//! backend from the URL scheme at run time (`sqlite://` for the embedded
//! default, `postgres://` for production), so no business code ever branches
//! on the backend.
//!
//! Each dialect has its own migrations (`migrations/sqlite`,
//! `migrations/postgres`), embedded in the binary. Both must pass the same
//! conformance story (`tests/api/store_conformance.rs`).

pub mod audit_chain;
mod billing;
pub mod event_schema;
mod firewall;
mod identity;
mod postgres;
pub mod reload;
mod sqlite;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

pub use billing::{BillingEvent, BillingOutcome, Subscription, SubscriptionStatus};
pub use firewall::{FirewallDecision, FirewallRule, NewDecision, RuleUpdate};
pub use identity::{
    AttestationOutcome, Device, DeviceStatus, NewEvent, NewRefreshToken, NewSession, RefreshRecord,
    Revocation, RotateOutcome, SigningKeyRecord, User, UserStatus,
};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::config::DatabaseConfig;

/// What can go wrong in the store, small enough for callers to match on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// A unique or check constraint refused the write; the constraint is named
    /// so that one place (the HTTP layer) can map it to 409 or 422.
    #[error("constraint violated: {constraint}")]
    Conflict {
        /// The constraint's name (or a description where the driver gives none).
        constraint: String,
    },
    /// The database cannot be reached (connection refused, pool timed out).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Anything else.
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(ref db)
                if db.is_unique_violation() || db.is_check_violation() =>
            {
                Self::Conflict {
                    constraint: db
                        .constraint()
                        .map(str::to_owned)
                        .unwrap_or_else(|| db.message().to_owned()),
                }
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Self::Unavailable(err),
            other => Self::Other(other),
        }
    }
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

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

/// Where an audited action came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditSource {
    /// An HTTP request.
    Http,
    /// A WebSocket connection.
    Ws,
    /// A gRPC call.
    Grpc,
    /// A background worker.
    Worker,
}

impl AuditSource {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Grpc => "grpc",
            Self::Worker => "worker",
        }
    }

    /// Parses the stored text.
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "http" => Self::Http,
            "ws" => Self::Ws,
            "grpc" => Self::Grpc,
            "worker" => Self::Worker,
            _ => return None,
        })
    }
}

/// An audit row to append. `ip` must already be anonymized (a /24 or /48 prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// The token id involved.
    pub jti: Option<String>,
    /// Anonymized client IP prefix.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Where the action came from.
    pub source: AuditSource,
    /// Threat score at the time of the decision.
    pub threat_score: Option<f64>,
    /// Stable reason code(s).
    pub decision_reason: Option<String>,
    /// The device's attestation state at the time.
    pub attestation_state: Option<String>,
    /// What was done.
    pub action_taken: String,
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

/// Which audit rows to list (every set field must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Rows about this user.
    pub user_id: Option<Uuid>,
    /// Rows about this device.
    pub device_id: Option<String>,
    /// Rows with this `action_taken`.
    pub action: Option<String>,
    /// Rows strictly older than this `(created_at, id)` (the page cursor).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// A stored audit row.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AuditEntry {
    /// Row id (UUID v7, time-ordered).
    pub id: Uuid,
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// The token id involved.
    pub jti: Option<String>,
    /// Anonymized client IP prefix.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Where the action came from.
    pub source: AuditSource,
    /// Threat score at the time of the decision.
    pub threat_score: Option<f64>,
    /// Stable reason code(s).
    pub decision_reason: Option<String>,
    /// The device's attestation state at the time.
    pub attestation_state: Option<String>,
    /// What was done.
    pub action_taken: String,
    /// When the row was written (UTC, microsecond precision).
    pub created_at: DateTime<Utc>,
}

impl AuditEntry {
    fn from_new(entry: NewAuditEntry, id: Uuid, created_at: DateTime<Utc>) -> Self {
        Self {
            id,
            user_id: entry.user_id,
            device_id: entry.device_id,
            jti: entry.jti,
            ip: entry.ip,
            user_agent: entry.user_agent,
            source: entry.source,
            threat_score: entry.threat_score,
            decision_reason: entry.decision_reason,
            attestation_state: entry.attestation_state,
            action_taken: entry.action_taken,
            created_at,
        }
    }
}

/// The current time, truncated to the microsecond precision both dialects keep.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// Recomputes the whole audit chain: `Ok(Ok(rows))` when intact, `Ok(Err(…))`
/// naming the first broken row.
pub async fn verify_audit_chain(
    store: &dyn Store,
) -> StoreResult<Result<u64, audit_chain::ChainBreak>> {
    let (mut prev, mut prev_seq) = (audit_chain::GENESIS.to_owned(), 0i64);
    loop {
        let rows = store.audit_chain(prev_seq, 1000).await?;
        if rows.is_empty() {
            return Ok(Ok(u64::try_from(prev_seq).unwrap_or(0)));
        }
        match audit_chain::check(&rows, prev, prev_seq) {
            Ok((hash, seq)) => (prev, prev_seq) = (hash, seq),
            Err(broken) => return Ok(Err(broken)),
        }
    }
}

/// The durable store. Every method is one transaction (or one statement).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Cheap liveness check used by `/health/ready`.
    async fn ping(&self) -> StoreResult<()>;

    /// Applies every embedded migration not yet applied. Idempotent; safe to
    /// run from several replicas at once (PostgreSQL takes an advisory lock).
    async fn migrate(&self) -> StoreResult<()>;

    /// How many embedded migrations are not yet applied (all of them on an
    /// empty database).
    async fn pending_migrations(&self) -> StoreResult<usize>;

    /// Every plan, ordered by rate limit.
    async fn plans(&self) -> StoreResult<Vec<Plan>>;

    /// Appends a row to the audit trail.
    async fn append_audit(&self, entry: NewAuditEntry) -> StoreResult<AuditEntry>;

    /// The newest audit rows about `user_id`, newest first.
    async fn audit_for_user(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<AuditEntry>>;

    /// Chained audit rows with `seq` greater than `after`, in order, at most `limit`.
    async fn audit_chain(
        &self,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<audit_chain::ChainedRow>>;
    /// Audit rows matching `filter`, newest first, at most `limit`.
    async fn audit_page(&self, filter: &AuditFilter, limit: u32) -> StoreResult<Vec<AuditEntry>>;

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

    /// Every threat-intelligence entry: `(kind, value)`, kind being
    /// `app_hash`, `domain` or `ip` (an address or CIDR).
    async fn threat_intel(&self) -> StoreResult<Vec<(String, String)>>;
    /// Adds and removes threat-intelligence entries in one transaction;
    /// returns how many rows changed.
    async fn update_threat_intel(
        &self,
        add: &[(String, String)],
        remove: &[(String, String)],
        reason: Option<&str>,
    ) -> StoreResult<u64>;

    /// Every firewall rule, by name.
    async fn firewall_rules(&self) -> StoreResult<Vec<FirewallRule>>;
    /// Applies `update` to rule `name` and bumps its version; `None` when no such rule.
    async fn update_firewall_rule(
        &self,
        name: &str,
        update: &RuleUpdate,
    ) -> StoreResult<Option<FirewallRule>>;
    /// Users and devices named by `event_type` events whose `scope` column
    /// equals `key`, recorded since `since`.
    async fn scope_members(
        &self,
        event_type: &str,
        scope: &str,
        key: &str,
        since: DateTime<Utc>,
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

    /// Creates a user; [`StoreError::Conflict`] when the email is taken.
    async fn create_user(&self, email: &str, password_hash: &str) -> StoreResult<User>;
    /// The user with this (lower-cased) email.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    /// The user with this id.
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;

    /// The device with this id.
    async fn device(&self, id: &str) -> StoreResult<Option<Device>>;
    /// Binds the device to the user (creating it, or re-binding it without
    /// touching its status), revokes its active families and starts a new one.
    async fn start_session(&self, session: NewSession) -> StoreResult<()>;
    /// What is known of a refresh token, by its hash.
    async fn refresh_record(&self, token_sha256: &[u8]) -> StoreResult<Option<RefreshRecord>>;
    /// Compare-and-swap rotation: marks `old` used if (and only if) it is
    /// still unused and its family active, and adds `new` to the family.
    async fn rotate_refresh(
        &self,
        old_sha256: &[u8],
        family_id: Uuid,
        new: NewRefreshToken,
    ) -> StoreResult<RotateOutcome>;
    /// Sets a device's status (and, when it becomes active again, clears its
    /// attestation failure count). False when the device does not exist.
    async fn set_device_status(&self, device_id: &str, status: DeviceStatus) -> StoreResult<bool>;
    /// Revokes every active family of a device, with the optional status
    /// change, audit row and event, in one transaction.
    async fn revoke_device(&self, revocation: Revocation) -> StoreResult<()>;
    /// Records an attestation verdict; after `max_failures` failures an
    /// active device is quarantined.
    async fn record_attestation(
        &self,
        device_id: &str,
        verified: bool,
        max_failures: u32,
    ) -> StoreResult<AttestationOutcome>;

    /// Records a business event.
    async fn record_event(&self, event: NewEvent) -> StoreResult<()>;
    /// Deletes up to `batch` business events created before `cutoff`;
    /// returns how many. Audit rows are never touched.
    async fn delete_events_before(&self, cutoff: DateTime<Utc>, batch: u32) -> StoreResult<u64>;
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

    /// Every signing key, oldest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;
    /// Adds a signing key; when `retire_others` it becomes the only unretired one.
    async fn insert_signing_key(
        &self,
        key: SigningKeyRecord,
        retire_others: bool,
    ) -> StoreResult<()>;
    /// The named server secret, created from `candidate` if absent. Every
    /// replica gets the same value.
    async fn server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>>;

    /// Stores an admin API key's hash.
    async fn insert_admin_key(&self, name: &str, key_sha256: &[u8]) -> StoreResult<Uuid>;
    /// True when an unrevoked admin key has this hash.
    async fn admin_key_exists(&self, key_sha256: &[u8]) -> StoreResult<bool>;

    /// Closes the pool, waiting for checked-out connections to be returned.
    async fn close(&self);
}

/// Opens the store the configuration names, waiting at most `timeout` for it.
///
/// An unreachable database is an error with a one-line message that names the
/// backend and the redacted URL; it is never a panic.
pub async fn connect(
    config: &DatabaseConfig,
    max_connections: u32,
    timeout: Duration,
) -> Result<Arc<dyn Store>, ConnectError> {
    let attempt = async {
        Ok::<Arc<dyn Store>, StoreError>(match config {
            DatabaseConfig::Sqlite { url } => {
                Arc::new(SqliteStore::connect(url.expose_secret(), max_connections, timeout).await?)
            }
            DatabaseConfig::Postgres { url } => Arc::new(
                PostgresStore::connect(url.expose_secret(), max_connections, timeout).await?,
            ),
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(err)) => Err(ConnectError {
            target: config.redacted_url(),
            reason: reason_of(&err),
        }),
        Err(_) => Err(ConnectError {
            target: config.redacted_url(),
            reason: format!("no answer within {} s", timeout.as_secs()),
        }),
    }
}

fn reason_of(err: &StoreError) -> String {
    match err {
        StoreError::Unavailable(inner) | StoreError::Other(inner) => match inner {
            sqlx::Error::Io(io) => io.to_string(),
            sqlx::Error::Database(db) => db.message().to_owned(),
            sqlx::Error::PoolTimedOut => "timed out".to_owned(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// The database could not be opened at start.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the database at {target}: {reason}")]
pub struct ConnectError {
    /// The redacted URL.
    pub target: String,
    /// Why, in one line.
    pub reason: String,
}
