//! One SQL store for both dialects, and the small seam where they differ.
//!
//! Every query is written once, in the file of its aggregate
//! (`identity.rs`, `billing.rs`, …), inside [`for_each_dialect!`], which
//! compiles it once per dialect with `Db` naming that dialect's sqlx database.
//! The bodies are concrete code, checked and optimised per dialect, with no
//! generic sqlx bounds to carry around. What differs between SQLite and
//! PostgreSQL lives here, in [`Dialect`]:
//!
//! - how a pool is opened (SQLite: WAL, `busy_timeout`, foreign keys on);
//! - which migrations apply;
//! - how a transaction that must serialise with other writers begins
//!   (SQLite: `BEGIN IMMEDIATE`, taking the single write lock up front;
//!   PostgreSQL: a plain transaction whose row locks do the work);
//! - the row lock suffix (`FOR UPDATE`, which SQLite has no need of);
//! - how audit appends are serialised into one chain (PostgreSQL: an
//!   advisory transaction lock; SQLite: the write lock the caller holds).
//!
//! Column encodings (ids, times, JSON) differ too; [`super::columns`] hides
//! them behind types, so the SQL text is the same.

use std::{
    future::Future,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Database, PgConnection, Pool, Postgres, Sqlite, SqliteConnection, Transaction,
};

use super::{audit_chain::ChainKey, Store, StoreError, StoreResult};

/// PostgreSQL's `statement_timeout` on every connection (ms): above any
/// statement the service runs, far below a request's own timeout.
const STATEMENT_TIMEOUT_MS: &str = "10000";

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Key of the advisory lock that serialises audit appends across instances.
const AUDIT_CHAIN_LOCK: i64 = 0x6272_6175_6469_7401;

/// What differs between the SQL dialects, and nothing else.
pub trait Dialect: Database {
    /// `sqlite` or `postgres`.
    const NAME: &'static str;
    /// Appended to a `SELECT` whose rows the transaction will change, so a
    /// concurrent writer waits (empty where a transaction's write lock
    /// already serialises every writer).
    const FOR_UPDATE: &'static str;

    /// The embedded migrations of this dialect.
    fn migrator() -> &'static Migrator;

    /// Opens a pool on `url`.
    fn open(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> impl Future<Output = StoreResult<Pool<Self>>> + Send;

    /// Begins a transaction that will write and must see the latest
    /// committed state of what it reads before writing (the audit chain's
    /// last link, a decision's `undone_at`).
    fn begin_write(
        pool: &Pool<Self>,
    ) -> impl Future<Output = sqlx::Result<Transaction<'static, Self>>> + Send;

    /// Serialises audit appends for the rest of the caller's transaction.
    fn lock_audit_chain(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;
}

impl Dialect for Sqlite {
    const NAME: &'static str = "sqlite";
    const FOR_UPDATE: &'static str = "";

    fn migrator() -> &'static Migrator {
        &SQLITE_MIGRATOR
    }

    /// Opens (creating if missing) the file named by `url`
    /// (`sqlite://path/to/file.db`), creating its directory (0700) and the
    /// file (0600) too ([`super::files`]). WAL
    /// lets readers run beside the single writer; `busy_timeout` makes a
    /// writer wait for the lock instead of failing; foreign keys are switched
    /// on per connection (SQLite leaves them off by default).
    async fn open(url: &str, max_connections: u32, timeout: Duration) -> StoreResult<Pool<Self>> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Other)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let file = options.get_filename();
        if file != std::path::Path::new(":memory:") {
            super::files::prepare_sqlite_file(file)
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        }
        Ok(SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?)
    }

    async fn begin_write(pool: &Pool<Self>) -> sqlx::Result<Transaction<'static, Self>> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn lock_audit_chain(_conn: &mut SqliteConnection) -> sqlx::Result<()> {
        // Callers hold the write lock (a transaction that already wrote, or
        // BEGIN IMMEDIATE), so the last link cannot move under them.
        Ok(())
    }
}

impl Dialect for Postgres {
    const NAME: &'static str = "postgres";
    const FOR_UPDATE: &'static str = " FOR UPDATE";

    fn migrator() -> &'static Migrator {
        // sqlx's migrator takes an advisory lock, so replicas starting
        // together migrate once.
        &POSTGRES_MIGRATOR
    }

    /// Connects to `url`; fails (rather than waiting forever) when the server
    /// does not answer within `timeout`.
    async fn open(url: &str, max_connections: u32, timeout: Duration) -> StoreResult<Pool<Self>> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Other)?;
        // No statement may hold a connection (and the request behind it)
        // longer than STATEMENT_TIMEOUT: a stuck lock or a runaway query
        // fails instead of draining the pool.
        let options = options
            .application_name("blockremote")
            .options([("statement_timeout", STATEMENT_TIMEOUT_MS)]);
        Ok(PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?)
    }

    async fn begin_write(pool: &Pool<Self>) -> sqlx::Result<Transaction<'static, Self>> {
        pool.begin().await
    }

    async fn lock_audit_chain(conn: &mut PgConnection) -> sqlx::Result<()> {
        // Held until the transaction ends, so appends form one chain
        // whatever instance writes them.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_CHAIN_LOCK)
            .execute(conn)
            .await
            .map(drop)
    }
}

/// The SQL store over one pool of dialect `D`.
#[derive(Debug)]
pub struct SqlStore<D: Database> {
    pub(super) pool: Pool<D>,
    /// The audit-chain key appends are hashed with, once set (see
    /// [`super::audit_chain`]).
    pub(super) chain_key: Arc<RwLock<Option<ChainKey>>>,
}

impl<D: Database> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            chain_key: self.chain_key.clone(),
        }
    }
}

/// The embedded default: one SQLite file in WAL mode.
pub type SqliteStore = SqlStore<Sqlite>;
/// The production store: PostgreSQL through an sqlx pool.
pub type PostgresStore = SqlStore<Postgres>;

impl<D: Dialect> SqlStore<D> {
    /// Opens the store on `url`, waiting at most `timeout` for a connection.
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> StoreResult<Self> {
        Ok(Self {
            pool: D::open(url, max_connections, timeout).await?,
            chain_key: Arc::default(),
        })
    }

    /// The underlying pool, for tests that must reach past the trait (for
    /// example to prove the audit triggers refuse a raw UPDATE).
    pub fn pool(&self) -> &Pool<D> {
        &self.pool
    }
}

for_each_dialect! {
    #[async_trait]
    impl Store for SqlStore<Db> {
        fn backend(&self) -> &'static str {
            <Db as Dialect>::NAME
        }

        #[tracing::instrument(skip_all, name = "store.ping")]
        async fn ping(&self) -> StoreResult<()> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }

        fn pool_usage(&self) -> (u64, u64) {
            let size = u64::from(self.pool.size());
            let idle = u64::try_from(self.pool.num_idle()).unwrap_or(u64::MAX).min(size);
            (size - idle, idle)
        }

        async fn time_acquire(&self) -> StoreResult<std::time::Duration> {
            let started = std::time::Instant::now();
            drop(self.pool.acquire().await?);
            Ok(started.elapsed())
        }

        #[tracing::instrument(skip_all, name = "store.migrate")]
        async fn migrate(&self) -> StoreResult<()> {
            <Db as Dialect>::migrator().run(&self.pool).await?;
            // The months ahead (the retention job keeps them ready too).
            super::EventStore::ensure_partitions(self, 1).await?;
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
            Ok(<Db as Dialect>::migrator()
                .iter()
                .filter(|m| !applied.contains(&m.version))
                .count())
        }

        async fn close(&self) {
            self.pool.close().await;
        }
    }
}
