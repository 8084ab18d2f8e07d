//! The durable store: the truth that must survive a restart.
//!
//! Users, devices, refresh families, subscriptions, billing events, firewall
//! rules and decisions, business events and the audit trail live here. The
//! [`Store`] trait is what the rest of the server sees — the sum of one trait
//! per aggregate ([`IdentityStore`], [`AttestationStore`], [`BillingStore`], [`FirewallStore`],
//! [`HoldStore`], [`IntelStore`], [`EventStore`], [`AuditStore`], [`KeyStore`]), each in the
//! file that holds its types and its SQL. [`connect`] picks the backend from
//! the URL scheme at run time (`sqlite://` for the embedded default,
//! `postgres://` for production), so no business code ever branches on the
//! backend.
//!
//! Each query is written once and compiled for both dialects
//! ([`for_each_dialect!`]); what truly differs is the small seam in
//! [`sql::Dialect`], and the column encodings in [`columns`]. Each dialect has
//! its own migrations (`migrations/sqlite`, `migrations/postgres`), embedded
//! in the binary. Both must pass the same conformance story
//! (`tests/api/store_conformance.rs`).

/// Compiles the items once per SQL dialect, with `Db` naming that dialect's
/// sqlx database (`sqlx::Sqlite`, then `sqlx::Postgres`). Query bodies are
/// written once and type-checked for both; see [`sql`].
macro_rules! for_each_dialect {
    ($($item:item)*) => {
        const _: () = {
            use ::sqlx::Sqlite as Db;
            $($item)*
        };
        const _: () = {
            use ::sqlx::Postgres as Db;
            $($item)*
        };
    };
}

/// Spells a closed set of stored words both ways, failing on an unknown one.
macro_rules! stored_words {
    ($name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        impl $name {
            /// The stored (and wire) spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $word),+ }
            }

            /// Parses the stored spelling.
            pub fn parse(raw: &str) -> Option<Self> {
                match raw { $($word => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

mod attestation;
mod audit;
pub mod audit_chain;
mod billing;
mod columns;
mod commands;
pub mod event_schema;
mod events;
pub mod files;
mod firewall;
mod holds;
mod identity;
mod intel;
mod keys;
pub mod reload;
mod sequences;
mod snapshots;
mod sql;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;

pub use attestation::{
    AppAttestKey, AttestationGrade, AttestationOutcome, AttestationRecord, AttestationStore,
    DeviceAttestation, NewAppAttestKey,
};
pub use audit::{
    verify_audit_chain, verify_chain, Anchor, AuditEntry, AuditFilter, AuditSource, AuditStore,
    ChainReport, NewAuditEntry,
};
pub use billing::{
    BillingEvent, BillingOutcome, BillingStore, Plan, Subscription, SubscriptionStatus,
};
pub use commands::{CommandStore, StoredCommand};
pub use events::{EventStore, NewEvent, StoredEvent};
pub use firewall::{
    FirewallDecision, FirewallRule, FirewallStore, NewDecision, RuleMode, RuleScope, RuleUpdate,
    SideEffect,
};
pub use holds::{
    device_status_for, Hold, HoldAction, HoldSource, HoldStore, NewHold, Release, ReleaseOutcome,
};
pub use identity::{
    is_external_id, Device, DeviceStatus, EnsuredUser, IdentityStore, NewRefreshToken, NewSession,
    NewUser, RefreshRecord, Revocation, RotateOutcome, User, UserStatus, TOO_MANY_DEVICES,
};
pub use intel::IntelStore;
pub use keys::{KeyStore, SigningKeyRecord};
pub use sequences::{SequenceKind, SequenceStore};
pub use snapshots::{EngineSnapshot, SnapshotStore};
pub use sql::{PostgresStore, SqlStore, SqliteStore};

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
            // The database went away or is refusing work: connection
            // exceptions (08), shutdown or not accepting connections (57P0x),
            // too many connections (53300), a statement cancelled by its
            // timeout (57014).
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "57014"
                }) =>
            {
                Self::Unavailable(err)
            }
            // A stream cut mid-message reads as a protocol error.
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err),
            other => Self::Other(other),
        }
    }
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// The current time, truncated to the microsecond precision both dialects keep.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// A stored value that does not decode: a loud error, never a default.
fn decode_error(message: String) -> StoreError {
    StoreError::Other(sqlx::Error::Decode(message.into()))
}

/// The durable store: every aggregate, plus the pool's own life cycle.
/// Every method is one transaction (or one statement).
#[async_trait]
pub trait Store:
    IdentityStore
    + AttestationStore
    + BillingStore
    + FirewallStore
    + HoldStore
    + IntelStore
    + EventStore
    + AuditStore
    + KeyStore
    + SequenceStore
    + SnapshotStore
    + CommandStore
    + Send
    + Sync
    + 'static
{
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Cheap liveness check used by `/health/ready`.
    async fn ping(&self) -> StoreResult<()>;

    /// The pool's connections: `(in use, idle)`.
    fn pool_usage(&self) -> (u64, u64);

    /// How long one connection took to acquire from the pool (it is given
    /// back at once): a sample of what every query waits.
    async fn time_acquire(&self) -> StoreResult<std::time::Duration>;

    /// Applies every embedded migration not yet applied. Idempotent; safe to
    /// run from several replicas at once (PostgreSQL takes an advisory lock).
    async fn migrate(&self) -> StoreResult<()>;

    /// How many embedded migrations are not yet applied (all of them on an
    /// empty database).
    async fn pending_migrations(&self) -> StoreResult<usize>;

    /// Closes the pool, waiting for checked-out connections to be returned.
    async fn close(&self);
}

/// The file an SQLite configuration names (`None` for PostgreSQL and for
/// an in-memory database).
pub fn sqlite_file(config: &DatabaseConfig) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    let DatabaseConfig::Sqlite { url } = config else {
        return None;
    };
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url.expose_secret()).ok()?;
    let file = options.get_filename();
    (file != std::path::Path::new(":memory:")).then(|| file.to_path_buf())
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
