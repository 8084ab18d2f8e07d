//! Test harness: real servers on port 0, one fresh backend per test.
//!
//! `Backend::Embedded` is SQLite in a temp dir + in-process state.
//! `Backend::Production` is a fresh PostgreSQL database (created for the test,
//! dropped after) + a unique Redis key prefix (its keys deleted after), from
//! `TEST_DATABASE_URL` / `TEST_REDIS_URL`. When those are unset the production
//! variant is skipped — except under `CI=true`, where that is a failure.
//!
//! How tests talk to a server (register, login, admin calls, …) lives in
//! [`crate::client`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use blockremote::{
    app::{start_workers, AppState, Application},
    config::{Config, DatabaseConfig},
    state::{MemoryState, RedisOptions, RedisState, SharedState},
    store::{PostgresStore, SqliteStore, Store},
    workers::WorkerPool,
};
use blockremote_engine::heartbeat::Heartbeat;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

use crate::client::Api;

/// Which pair of backends a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite + in-process state.
    Embedded,
    /// PostgreSQL + Redis.
    Production,
}

/// Generates an `embedded` and a `production` test for each story function
/// `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::helpers::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn production() {
                super::$name($crate::helpers::Backend::Production).await
            }
        }
    )*};
}

/// Where a shared-state story runs: in-process, or one of the Redis
/// topologies (`scripts/redis-topologies.sh` starts the cluster and the
/// sentinels; `.ci/run` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackend {
    /// The in-process state, on a file.
    InProcess,
    /// One Redis node (`TEST_REDIS_URL`).
    Redis,
    /// A 3-master Redis Cluster (`TEST_REDIS_CLUSTER_URL`).
    Cluster,
    /// A primary with a replica and 3 sentinels (`TEST_REDIS_SENTINEL_URL`).
    Sentinel,
}

impl From<Backend> for StateBackend {
    fn from(backend: Backend) -> Self {
        match backend {
            Backend::Embedded => Self::InProcess,
            Backend::Production => Self::Redis,
        }
    }
}

impl StateBackend {
    /// Whether it is Redis (shared between handles), in any topology.
    pub fn is_redis(self) -> bool {
        self != Self::InProcess
    }
}

/// Generates one test per [`StateBackend`] for each story function
/// `async fn name(backend: StateBackend)`.
#[macro_export]
macro_rules! on_every_state_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::helpers::StateBackend;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(StateBackend::InProcess).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn production() {
                super::$name(StateBackend::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$name(StateBackend::Cluster).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sentinel() {
                super::$name(StateBackend::Sentinel).await
            }
        }
    )*};
}

/// The URL of a test topology from `var`, or `None` to skip (never in CI).
pub fn topology_url(var: &str) -> Option<String> {
    match std::env::var(var).ok().filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but {var} is not set (scripts/redis-topologies.sh start)")
        }
        None => {
            eprintln!("skipped: {var} not set (scripts/redis-topologies.sh start)");
            None
        }
    }
}

/// `(TEST_DATABASE_URL, TEST_REDIS_URL)`, or `None` to skip (never in CI).
pub fn production_urls() -> Option<(String, String)> {
    let db = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty());
    let redis = std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty());
    match (db, redis) {
        (Some(db), Some(redis)) => Some((db, redis)),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but TEST_DATABASE_URL / TEST_REDIS_URL are not both set")
        }
        _ => {
            eprintln!("skipped: TEST_DATABASE_URL / TEST_REDIS_URL not set");
            None
        }
    }
}

/// A PostgreSQL database created for one test and dropped afterwards.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// URL of the fresh database.
    pub url: String,
}

impl TestDatabase {
    /// Creates `br_test_<uuid>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Self {
        let name = format!("br_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("connect to TEST_DATABASE_URL");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        conn.close().await.ok();
        let mut url = url::Url::parse(admin_url).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// A unique Redis key prefix for one test; its keys are deleted afterwards.
pub struct TestRedis {
    /// The Redis URL.
    pub url: String,
    /// `test:<uuid>:`
    pub prefix: String,
}

impl TestRedis {
    /// A fresh prefix on `url`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // Only one node is swept: the cluster and the sentinels' nodes are
        // thrown away with their keys when the topologies stop.
        if !self.url.starts_with("redis://") {
            return;
        }
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        // Bounded: a test that failed while its Redis hung must not hang
        // in this sweep too.
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        if conn
            .set_read_timeout(Some(Duration::from_secs(2)))
            .and_then(|()| conn.set_write_timeout(Some(Duration::from_secs(2))))
            .is_err()
        {
            return;
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        for key in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(key).query(&mut conn);
        }
    }
}

/// Everything one test's backends need to stay alive.
pub struct Backing {
    /// A configuration pointing at this test's backends, listening on port 0.
    pub config: Config,
    /// Temp data dir (SQLite file, keys).
    pub dir: tempfile::TempDir,
    /// The fresh PostgreSQL database, on the production backend.
    pub database: Option<TestDatabase>,
    /// The Redis prefix, on the production backend.
    pub redis: Option<TestRedis>,
}

impl Backing {
    /// Fresh backends, or `None` when the production ones are not configured.
    pub async fn new(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        // The key-encryption key, as the embedded default would generate it;
        // on PostgreSQL the server reads it from here too, and child
        // processes get it through BLOCKREMOTE_KEK_FILE (see `env`).
        write_kek(&dir.path().join("kek"));
        let mut config = Config::embedded_in(dir.path());
        config.connect_timeout = Duration::from_secs(5);
        config.database_max_connections = 5;
        match backend {
            Backend::Embedded => Some(Self {
                config,
                dir,
                database: None,
                redis: None,
            }),
            Backend::Production => {
                let (db_url, redis_url) = production_urls()?;
                let database = TestDatabase::create(&db_url).await;
                let redis = TestRedis::new(&redis_url);
                config.database = DatabaseConfig::Postgres {
                    url: database.url.clone().into(),
                };
                config.redis_url = Some(redis.url.clone().into());
                config.redis_prefix = redis.prefix.clone();
                Some(Self {
                    config,
                    dir,
                    database: Some(database),
                    redis: Some(redis),
                })
            }
        }
    }

    /// The environment a `blockremote` child process needs for these backends.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (
                "BLOCKREMOTE_DATA_DIR",
                self.dir.path().display().to_string(),
            ),
            ("BLOCKREMOTE_LISTEN", "127.0.0.1:0".to_owned()),
            ("BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS", "5".to_owned()),
        ];
        if let Some(db) = &self.database {
            env.push(("DATABASE_URL", db.url.clone()));
            env.push((
                "BLOCKREMOTE_KEK_FILE",
                self.dir.path().join("kek").display().to_string(),
            ));
        }
        if let Some(redis) = &self.redis {
            env.push(("REDIS_URL", redis.url.clone()));
            env.push(("BLOCKREMOTE_REDIS_PREFIX", redis.prefix.clone()));
        }
        env
    }
}

/// Writes a fresh random key-encryption key (base64, mode 0600) to `path`.
pub fn write_kek(path: &std::path::Path) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    blockremote::store::files::write_private_new(path, text.as_bytes()).expect("write kek");
    text
}

/// Direct SQL access past the store trait, for tests that must prove what
/// the database itself refuses.
pub enum RawSql {
    /// SQLite pool.
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL pool.
    Postgres(sqlx::PgPool),
}

impl RawSql {
    /// Executes `sql`; the error's text on failure.
    pub async fn execute(&self, sql: &str) -> Result<u64, String> {
        match self {
            Self::Sqlite(pool) => pool
                .execute(sql)
                .await
                .map(|r| r.rows_affected())
                .map_err(|e| e.to_string()),
            Self::Postgres(pool) => pool
                .execute(sql)
                .await
                .map(|r| r.rows_affected())
                .map_err(|e| e.to_string()),
        }
    }

    /// The first column of every row of `sql`, as text.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        match self {
            Self::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
            Self::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        }
        .expect("query")
    }
}

/// A store on fresh backends, with raw SQL access to the same database.
pub async fn store_for(backend: Backend) -> Option<(Arc<dyn Store>, RawSql, Backing)> {
    let backing = Backing::new(backend).await?;
    let timeout = Duration::from_secs(5);
    let (store, raw): (Arc<dyn Store>, RawSql) = match backend {
        Backend::Embedded => {
            let url = format!("sqlite://{}", backing.dir.path().join("t.db").display());
            let store = SqliteStore::connect(&url, 4, timeout)
                .await
                .expect("sqlite");
            let raw = RawSql::Sqlite(store.pool().clone());
            (Arc::new(store), raw)
        }
        Backend::Production => {
            let url = &backing.database.as_ref().expect("database").url;
            let store = PostgresStore::connect(url, 4, timeout)
                .await
                .expect("postgres");
            let raw = RawSql::Postgres(store.pool().clone());
            (Arc::new(store), raw)
        }
    };
    Some((store, raw, backing))
}

/// Shared state on fresh backends; `queue_capacity` bounds every queue.
pub async fn shared_for(
    backend: Backend,
    queue_capacity: usize,
) -> Option<(Arc<dyn SharedState>, Backing)> {
    let backing = Backing::new(backend).await?;
    let state: Arc<dyn SharedState> = match backing.redis {
        // What the embedded default runs: in-process state written through
        // to a file in the data dir.
        None => MemoryState::open(
            &backing.dir.path().join("state-conformance.db"),
            queue_capacity,
            true,
        )
        .await
        .expect("in-process state on a file"),
        Some(_) => second_shared(&backing, queue_capacity).await,
    };
    Some((state, backing))
}

/// Another handle on the same shared state — on Redis, a second "replica"
/// with its own connections; in-process, a separate (unshared) instance.
/// Its queues have one shard, so one consumer sees every job.
pub async fn second_shared(backing: &Backing, queue_capacity: usize) -> Arc<dyn SharedState> {
    second_shared_sharded(backing, queue_capacity, 1).await
}

/// [`second_shared`] with `shards` streams per queue on Redis.
pub async fn second_shared_sharded(
    backing: &Backing,
    queue_capacity: usize,
    shards: usize,
) -> Arc<dyn SharedState> {
    match &backing.redis {
        None => Arc::new(MemoryState::new(queue_capacity)),
        Some(redis) => {
            let mut options = RedisOptions::new(
                &redis.url,
                &redis.prefix,
                queue_capacity,
                Duration::from_secs(5),
            );
            options.queue_shards = Some(shards);
            Arc::new(RedisState::connect_with(options).await.expect("redis"))
        }
    }
}

/// Fresh backends whose Redis is `backend`'s topology (PostgreSQL as for
/// [`Backend::Production`]); `None` when not configured.
pub async fn backing_on(backend: StateBackend) -> Option<Backing> {
    let url = match backend {
        StateBackend::InProcess => return Backing::new(Backend::Embedded).await,
        StateBackend::Redis => return Backing::new(Backend::Production).await,
        StateBackend::Cluster => topology_url("TEST_REDIS_CLUSTER_URL")?,
        StateBackend::Sentinel => topology_url("TEST_REDIS_SENTINEL_URL")?,
    };
    let mut backing = Backing::new(Backend::Production).await?;
    let redis = TestRedis::new(&url);
    backing.config.redis_url = Some(redis.url.clone().into());
    backing.config.redis_prefix = redis.prefix.clone();
    backing.redis = Some(redis);
    Some(backing)
}

/// Shared state on `backend` (one shard per queue); `queue_capacity` bounds every queue.
pub async fn shared_on(
    backend: StateBackend,
    queue_capacity: usize,
) -> Option<(Arc<dyn SharedState>, Backing)> {
    match backend {
        StateBackend::InProcess => shared_for(Backend::Embedded, queue_capacity).await,
        _ => {
            let backing = backing_on(backend).await?;
            let state = second_shared(&backing, queue_capacity).await;
            Some((state, backing))
        }
    }
}

/// A real server on a free port. Dereferences to its [`Api`] client, so
/// `app.register(…)`, `app.address`, `app.client` reach the client.
pub struct TestApp {
    /// The typed client for this server.
    pub api: Api,
    /// The server's handles.
    pub state: AppState,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The backends (dropped after the server; taken by a restart).
    backing: Option<Backing>,
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestApp {
    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.server.take() {
            Some(handle) => handle.await?,
            None => Ok(()),
        }
    }
}

impl TestApp {
    /// Stops the server cleanly and starts a new one with the same
    /// configuration on the same backends — data dir, database, Redis
    /// prefix: a restart. The new server listens on another port.
    pub async fn restart(mut self) -> TestApp {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("the server task joins")
                .expect("the server stops cleanly");
        }
        let backing = self.backing.take().expect("backends");
        let mut config = (*self.state.config).clone();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        // The old server's handles go before the new one opens the files.
        drop(self);
        let app = Application::build(config, true)
            .await
            .expect("the restarted application builds");
        start(app, backing)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a server on fresh backends; `None` when production is not configured.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

/// As [`spawn_app`], after `tweak` has adjusted the configuration.
pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<TestApp> {
    spawn_app_on(backend.into(), tweak).await
}

/// As [`spawn_app_with`], on any shared-state topology.
pub async fn spawn_app_on(
    backend: StateBackend,
    tweak: impl FnOnce(&mut Config),
) -> Option<TestApp> {
    let mut backing = backing_on(backend).await?;
    tweak(&mut backing.config);
    let app = Application::build(backing.config.clone(), true)
        .await
        .expect("application builds");
    Some(start(app, backing))
}

/// A server and, on production (where `serve` runs no scoring workers), the
/// worker pool a deployment would run beside it.
pub struct WithWorkers {
    /// The server.
    pub app: TestApp,
    workers: Option<(CancellationToken, WorkerPool)>,
}

impl std::ops::Deref for WithWorkers {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

impl WithWorkers {
    /// Starts the workers `app` needs (none on the embedded default).
    pub async fn start(app: TestApp) -> Self {
        let workers = if app.state.config.redis_url.is_some() {
            let stop = CancellationToken::new();
            let pool = start_workers(&app.state, "test-worker", stop.clone())
                .await
                .expect("workers start");
            Some((stop, pool))
        } else {
            None
        };
        Self { app, workers }
    }

    /// Stops the workers and the server cleanly, then starts both again on
    /// the same backends.
    pub async fn restart(self) -> Self {
        if let Some((stop, pool)) = self.workers {
            stop.cancel();
            pool.stop(Duration::from_secs(5)).await;
        }
        Self::start(self.app.restart().await).await
    }
}

/// A heartbeat's request body, sent now.
pub fn heartbeat_body(hb: &Heartbeat) -> Value {
    let mut body = serde_json::to_value(hb).expect("json");
    body["sent_at"] = json!(chrono::Utc::now().to_rfc3339());
    body
}

/// Starts a built application.
pub fn start(app: Application, backing: Backing) -> TestApp {
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let server = tokio::spawn(app.run_until_stopped(async move { signal.cancelled().await }));
    let admin_key = state
        .config
        .admin_token
        .as_ref()
        .map(|key| key.expose_secret().to_owned());
    TestApp {
        api: Api::new(address, admin_key),
        state,
        stop,
        server: Some(server),
        backing: Some(backing),
    }
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Another server on the same database and shared state as `first` (a
/// second replica); only meaningful on the production backend.
pub async fn second_instance(first: &TestApp) -> TestApp {
    let mut config = (*first.state.config).clone();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let app = Application::build(config, true)
        .await
        .expect("second instance builds");
    // The backends belong to `first`; this placeholder only keeps a temp dir.
    let placeholder = Backing::new(Backend::Embedded)
        .await
        .expect("embedded backing");
    start(app, placeholder)
}

/// Shared state loses its data, as a Redis restarted without persistence or
/// flushed by mistake would: on Redis every key under the test's prefix is
/// deleted; in process (which keeps its own across restarts), the keys
/// `in_process` name.
pub async fn lose_shared_state(app: &TestApp, in_process: &[String]) {
    match &app.state.config.redis_url {
        Some(url) => {
            let client = redis::Client::open(url.expose_secret()).expect("client");
            let mut conn = client.get_connection().expect("connection");
            let gone: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", app.state.config.redis_prefix))
                .query(&mut conn)
                .expect("keys");
            assert!(!gone.is_empty(), "nothing to lose");
            for key in gone {
                let _: () = redis::cmd("DEL").arg(key).query(&mut conn).expect("del");
            }
        }
        None => {
            for key in in_process {
                app.state.shared.delete(key).await.expect("delete");
            }
        }
    }
}

/// The value of `series` (`name` or `name{labels}`, exactly as exposed) in
/// a Prometheus/OpenMetrics scrape.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Fails if any label value of the scrape holds one of `entities` (a
/// device id, user id or address): label sets must stay bounded.
pub fn assert_no_entity_labels(exposition: &str, entities: &[&str]) {
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
        else {
            continue;
        };
        for entity in entities {
            assert!(!labels.0.contains(entity), "a label names {entity}: {line}");
        }
    }
}

/// The id an admin key's actions are audited under: `admin:` and 8 hex
/// digits of its SHA-256.
pub fn operator_of(key: &str) -> String {
    format!(
        "admin:{}",
        &hex::encode(blockremote::auth::sha256(key.as_bytes()))[..8]
    )
}
