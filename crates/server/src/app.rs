//! Application start-up and shutdown.
//!
//! [`Application::build`] connects the store and the shared state, migrates,
//! and binds the listener — on port 0 in tests, so each test gets its own real
//! server and can ask for the port. [`Application::run_until_stopped`] serves
//! until the shutdown future resolves, then drains: no new connections,
//! in-flight requests and jobs finish within the grace period, and the pools
//! close. Every start-up failure is a [`StartupError`] with a one-line
//! message; nothing here panics.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{
        attestation::{Attestation, Providers},
        passwords::Passwords,
        sessions::{SessionLimits, Sessions},
        Auth,
    },
    billing::{limits::Limits, plans::PlanCache},
    config::Config,
    firewall::Firewall,
    realtime::hub::Hub,
    signals::{
        breaker::{Breaker, ScoringMeter},
        ingest::Ingestion,
        intel::ThreatIntel,
        scoring::{HeartbeatScorer, Scoring},
    },
    state::{self, keys, SharedState},
    store::{self, Store, StoreError},
    telemetry::Metrics,
    workers::{self, WorkerOptions, WorkerPool},
};

/// What every handler and worker shares, behind one `Arc`: a request
/// clones the state several times (extractors, middleware), and one
/// reference count is cheaper than eleven (docs/BENCHMARKS.md).
#[derive(Clone)]
pub struct AppState(Arc<AppHandles>);

impl std::ops::Deref for AppState {
    type Target = AppHandles;

    fn deref(&self) -> &AppHandles {
        &self.0
    }
}

/// The handles inside [`AppState`].
pub struct AppHandles {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// Fast shared state (Redis or in-process).
    pub shared: Arc<dyn SharedState>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Keys, device-status cache, token settings.
    pub auth: Arc<Auth>,
    /// This instance's kill-switch sockets.
    pub hub: Arc<Hub>,
    /// Each user's plan (rate limits), invalidated by billing webhooks.
    pub plans: Arc<PlanCache>,
    /// The per-device request budget, at each user's plan capacity.
    pub limits: Arc<Limits>,
    /// Blacklisted app hashes, domains and addresses.
    pub intel: Arc<ThreatIntel>,
    /// Whether heartbeat scoring is inline (workers behind).
    pub breaker: Arc<Breaker>,
    /// This process's scoring times, published for every instance's breaker.
    pub scoring_meter: Arc<ScoringMeter>,
    /// Heartbeat scoring: the workers' and ingestion's inline path.
    pub scoring: Arc<Scoring>,
    /// Heartbeat ingestion: token, seq, enqueue or inline scoring.
    pub ingestion: Arc<Ingestion>,
    /// The abuse firewall.
    pub firewall: Arc<Firewall>,
    /// Device sessions: open, refresh, logout.
    pub sessions: Arc<Sessions>,
    /// Attestation nonces and verdicts.
    pub attestation: Arc<Attestation>,
    /// Argon2id hashing, a few at a time.
    pub passwords: Arc<Passwords>,
    /// Cancelled when the process begins to shut down (sockets then close).
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Connects the store and the shared state the configuration names,
    /// migrates when `migrate` is set, and loads the identity keys.
    pub async fn connect(config: Config, migrate: bool) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let store = connect_store(&config, migrate).await?;
        let shared = state::connect(&config, Some(metrics.clone())).await?;
        let auth = Auth::load(&config, store.as_ref(), shared.clone())
            .await
            .map_err(StartupError::Identity)?;
        let hub = Hub::start(
            shared.clone(),
            crate::realtime::hub::Limits::from_config(&config),
        )
        .await
        .map_err(|e| StartupError::Workers(e.to_string()))?;
        let plans = PlanCache::start(shared.clone())
            .await
            .map_err(|e| StartupError::Workers(e.to_string()))?;
        let plans = Arc::new(plans);
        let limits = Arc::new(Limits::new(store.clone(), shared.clone(), plans.clone()));
        let intel = ThreatIntel::start(store.clone(), shared.clone())
            .await
            .map_err(|e| StartupError::Workers(e.to_string()))?;
        let auth = Arc::new(auth);
        let firewall = Arc::new(
            Firewall::start(store.clone(), shared.clone(), auth.clone(), metrics.clone())
                .await
                .map_err(|e| StartupError::Workers(e.to_string()))?,
        );
        let sessions = Arc::new(Sessions::new(
            store.clone(),
            shared.clone(),
            auth.clone(),
            firewall.clone(),
            SessionLimits {
                refresh_per_minute: config.refresh_per_minute,
                max_devices_per_user: config.max_devices_per_user,
                reuse_interval: config.refresh_reuse_interval,
            },
            metrics.clone(),
        ));
        let attestation = Arc::new(Attestation::new(
            store.clone(),
            shared.clone(),
            auth.clone(),
            firewall.clone(),
            config.attestation_nonce_ttl,
            config.attestation_max_failures,
            Providers {
                test_secret: config.attestation_test_secret.clone(),
                play_integrity: config.play_integrity.clone(),
                app_attest: config.app_attest.clone(),
            },
            metrics.clone(),
        ));
        let scoring_meter = Arc::<ScoringMeter>::default();
        let scoring = Arc::new(Scoring::new(
            store.clone(),
            shared.clone(),
            auth.clone(),
            plans.clone(),
            intel.clone(),
            metrics.clone(),
            scoring_meter.clone(),
        ));
        let breaker = Arc::<Breaker>::default();
        let ingestion = Arc::new(Ingestion::new(
            store.clone(),
            shared.clone(),
            auth.clone(),
            intel.clone(),
            breaker.clone(),
            scoring.clone(),
            metrics.clone(),
        ));
        let passwords = Arc::new(Passwords::with_metrics(metrics.clone()));
        Ok(Self(Arc::new(AppHandles {
            config: Arc::new(config),
            store,
            shared,
            metrics,
            auth,
            hub,
            plans,
            limits,
            intel,
            breaker,
            scoring_meter,
            scoring,
            ingestion,
            firewall,
            sessions,
            attestation,
            passwords,
            shutdown: CancellationToken::new(),
        })))
    }

    /// Reloads the signing keys every `key_reload_interval` until `stop`, so
    /// a rotation made on any instance is used here within a minute; at once
    /// when a key is revoked (a message on [`crate::auth::keys::CHANGED_CHANNEL`],
    /// or, without Redis, a look every [`crate::auth::keys::REVOCATION_POLL`]).
    /// A reload that drops a key also drops every cached verification.
    pub fn spawn_key_reloader(&self, stop: CancellationToken) {
        use crate::auth::keys::{CHANGED_CHANNEL, REVOCATION_POLL};
        let state = self.clone();
        tokio::spawn(async move {
            let mut changes = match state.shared.subscribe(CHANGED_CHANNEL).await {
                Ok(changes) => Some(changes),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to key changes; reloading on the timer only");
                    None
                }
            };
            let every = if state.is_embedded() {
                REVOCATION_POLL.min(state.config.key_reload_interval)
            } else {
                state.config.key_reload_interval
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                let announced = async {
                    match changes.as_mut() {
                        Some(changes) => changes.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                    message = announced => if message.is_none() { changes = None },
                }
                if let Err(e) = state.auth.reload_keys(state.store.as_ref()).await {
                    tracing::warn!(error = %e, "signing key reload failed; keeping the current set");
                }
            }
        });
    }

    /// True on the embedded default (no Redis): workers run in-process.
    pub fn is_embedded(&self) -> bool {
        self.config.redis_url.is_none()
    }

    /// The queue handlers this build has (see [`WorkerHandles::job_handlers`]).
    pub fn job_handlers(&self) -> Vec<(String, Arc<dyn workers::JobHandler>)> {
        self.workers().job_handlers()
    }

    /// What this process's workers use (on the embedded default they run
    /// inside `serve`).
    pub fn workers(&self) -> WorkerHandles {
        WorkerHandles {
            store: self.store.clone(),
            shared: self.shared.clone(),
            scoring: self.scoring.clone(),
            scoring_meter: self.scoring_meter.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Connects the store the configuration names and migrates it when
/// `migrate` is set; otherwise refuses a schema that is behind.
async fn connect_store(config: &Config, migrate: bool) -> Result<Arc<dyn Store>, StartupError> {
    let store = store::connect(
        &config.database,
        config.database_max_connections,
        config.connect_timeout,
    )
    .await?;
    if migrate {
        store.migrate().await.map_err(StartupError::Migrate)?;
    } else {
        let pending = store
            .pending_migrations()
            .await
            .map_err(StartupError::Migrate)?;
        if pending > 0 {
            return Err(StartupError::SchemaBehind(pending));
        }
    }
    Ok(store)
}

/// Connections a worker's endpoints hold at most (probes and a scraper).
const WORKER_ENDPOINT_CONNECTIONS: usize = 64;

/// What the scoring workers use — all a `blockremote worker` process
/// builds: no kill-switch hub (nor its subscription), firewall, sessions,
/// ingestion or circuit breaker, which only serve requests.
#[derive(Clone)]
pub struct WorkerHandles {
    /// The durable store (closed at shutdown).
    pub store: Arc<dyn Store>,
    /// The work queues, and where the scoring meter is published.
    pub shared: Arc<dyn SharedState>,
    /// Heartbeat scoring.
    pub scoring: Arc<Scoring>,
    /// This process's scoring times, published for every instance's breaker.
    pub scoring_meter: Arc<ScoringMeter>,
    /// What the worker's `/metrics` renders.
    pub metrics: Arc<Metrics>,
}

impl WorkerHandles {
    /// Connects what a worker process needs: the store (whose schema must
    /// be current: a worker never migrates), the shared state, and what
    /// scoring reads (identity for the device-status cache and events,
    /// plans, intel).
    pub async fn connect(config: &Config) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let store = connect_store(config, false).await?;
        let shared = state::connect(config, Some(metrics.clone())).await?;
        let auth = Auth::load(config, store.as_ref(), shared.clone())
            .await
            .map_err(StartupError::Identity)?;
        let plans = PlanCache::start(shared.clone())
            .await
            .map_err(|e| StartupError::Workers(e.to_string()))?;
        let intel = ThreatIntel::start(store.clone(), shared.clone())
            .await
            .map_err(|e| StartupError::Workers(e.to_string()))?;
        let scoring_meter = Arc::<ScoringMeter>::default();
        let scoring = Arc::new(Scoring::new(
            store.clone(),
            shared.clone(),
            Arc::new(auth),
            Arc::new(plans),
            intel,
            metrics.clone(),
            scoring_meter.clone(),
        ));
        Ok(Self {
            store,
            shared,
            scoring,
            scoring_meter,
            metrics,
        })
    }

    /// Serves the worker's `/health/*` and `/metrics` on `addr` until
    /// `stop`, with the API's connection bounds (header timer, head size)
    /// and a small connection cap: only probes and a scraper come here.
    pub async fn serve_endpoints(
        &self,
        config: &Config,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, StartupError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        tracing::info!(addr = %local, "worker endpoints listening");
        let router = crate::http::ops::worker_router(crate::http::ops::Ops {
            store: self.store.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
            metrics_token: config.metrics_token.clone(),
        });
        let limits = crate::http::serve::Limits {
            max_connections: WORKER_ENDPOINT_CONNECTIONS,
            ..crate::http::serve::Limits::from_config(config)
        };
        Ok(tokio::spawn(crate::http::serve::serve(
            listener,
            router,
            limits,
            self.metrics.clone(),
            stop,
        )))
    }

    /// The queue handlers this build has. Later features register theirs here.
    pub fn job_handlers(&self) -> Vec<(String, Arc<dyn workers::JobHandler>)> {
        vec![(
            keys::HEARTBEAT_QUEUE.to_owned(),
            Arc::new(HeartbeatScorer::new(self.scoring.clone())),
        )]
    }

    /// Starts the worker pool for the registered handlers, and the
    /// publisher of its scoring meter, until `stop`.
    pub async fn start(
        &self,
        role: &str,
        stop: CancellationToken,
    ) -> Result<WorkerPool, StartupError> {
        let instance = format!("{role}-{}", uuid::Uuid::new_v4().simple());
        let defaults = WorkerOptions::default();
        let options = if self.shared.queue_is_remote() {
            // A batch on Redis spends most of its time waiting on round trips,
            // not on the CPU: more and larger batches in flight keep up with
            // more traffic (docs/BENCHMARKS.md).
            WorkerOptions {
                concurrency: REMOTE_CONSUMERS,
                batch: REMOTE_BATCH,
                ..defaults
            }
        } else {
            defaults
        };
        let pool = WorkerPool::start(
            self.shared.clone(),
            &instance,
            self.job_handlers(),
            options,
            stop.clone(),
        )
        .await
        .map_err(|e| StartupError::Workers(e.to_string()))?;
        // Every instance's circuit breaker reads what these workers report.
        crate::signals::breaker::spawn_meter_publisher(
            self.shared.clone(),
            self.scoring_meter.clone(),
            stop,
        );
        Ok(pool)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The database is unreachable.
    #[error(transparent)]
    Database(#[from] store::ConnectError),
    /// Redis is unreachable.
    #[error(transparent)]
    Redis(#[from] state::ConnectError),
    /// Migrations failed.
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[source] StoreError),
    /// Migrations are disabled and the schema is not current.
    #[error("the database schema is {0} migration(s) behind: run `blockremote migrate` or enable BLOCKREMOTE_AUTO_MIGRATE")]
    SchemaBehind(usize),
    /// Signing keys or server secrets could not be loaded.
    // Not `#[source]`: the message already holds it, and the one-line
    // error would say it twice.
    #[error("cannot load identity keys: {0}")]
    Identity(crate::auth::AuthSetupError),
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The background workers could not start.
    #[error("cannot start workers: {0}")]
    Workers(String),
}

/// A built, bound, not-yet-serving application.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    router: Router,
}

impl Application {
    /// Connects, migrates when `migrate` is set, and binds the listener.
    pub async fn build(config: Config, migrate: bool) -> Result<Self, StartupError> {
        let state = AppState::connect(config, migrate).await?;
        Self::build_with_state(state).await
    }

    /// As [`build`](Self::build), with already-connected state.
    pub async fn build_with_state(state: AppState) -> Result<Self, StartupError> {
        let addr = state.config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        let router = crate::http::app(state.clone());
        Ok(Self {
            listener,
            local_addr,
            state,
            router,
        })
    }

    /// Serves `extra` routes beside the product's, behind the same layers
    /// (tests use it for routes the product does not have, e.g. a slow one).
    pub fn with_routes(mut self, extra: Router<AppState>) -> Self {
        self.router = crate::http::app_with(self.state.clone(), extra);
        self
    }

    /// The bound port (useful when configured with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared handles.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains within the grace period.
    /// On the embedded default the workers run alongside.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            local_addr,
            state,
            router,
        } = self;
        let grace = state.config.shutdown_grace;
        let stop = CancellationToken::new();
        state.spawn_key_reloader(stop.child_token());
        crate::signals::breaker::spawn_breaker_watch(
            state.breaker.clone(),
            state.shared.clone(),
            state.metrics.clone(),
            state.config.queue_capacity,
            state.shutdown.clone(),
        );
        crate::retention::spawn(
            state.store.clone(),
            state.config.event_retention,
            state.shutdown.clone(),
        );
        crate::telemetry::watch::spawn_pool_sampler(
            state.store.clone(),
            state.metrics.clone(),
            state.shutdown.clone(),
        );
        crate::telemetry::watch::spawn_readiness_sampler(
            state.store.clone(),
            state.shared.clone(),
            state.metrics.clone(),
            state.shutdown.clone(),
        );
        crate::telemetry::watch::spawn_audit_verifier(
            state.store.clone(),
            state.metrics.clone(),
            state.shutdown.clone(),
        );
        let pool = if state.is_embedded() {
            Some(start_workers(&state, "embedded", stop.child_token()).await?)
        } else {
            None
        };

        // Served with header-read and keep-alive timers, a head-size bound
        // and a connection cap (`http::serve`), which `axum::serve` lacks.
        let server = crate::http::serve::serve(
            listener,
            router,
            crate::http::serve::Limits::from_config(&state.config),
            state.metrics.clone(),
            stop.clone(),
        );
        let mut server = tokio::spawn(server);
        tracing::info!(
            addr = %local_addr,
            database = state.store.backend(),
            shared_state = state.shared.backend(),
            "listening"
        );

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server stopped on its own: report why.
                result??;
                return Ok(());
            }
        }
        tracing::info!(grace_seconds = grace.as_secs(), "shutting down: draining");
        stop.cancel();
        // Sockets are upgraded connections the HTTP server no longer tracks:
        // tell them to close (each sends a close frame) and wait for them.
        state.shutdown.cancel();
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => result??,
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within the grace period");
                server.abort();
            }
        }
        let sockets_closed = tokio::time::timeout(grace.saturating_sub(started.elapsed()), async {
            while state.hub.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if sockets_closed.is_err() {
            tracing::warn!(
                open = state.hub.connections(),
                "sockets still open after the grace period"
            );
        }
        if let Some(pool) = pool {
            pool.stop(
                grace
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(100)),
            )
            .await;
        }
        // The accepted seqs and engine snapshots not yet written behind to the store.
        let _ =
            tokio::time::timeout(Duration::from_secs(1), state.ingestion.flush_sequences()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), state.scoring.flush_snapshots()).await;
        // What outlives a restart of the embedded default (state/journal.rs).
        if let Err(e) = state.shared.close().await {
            tracing::error!(error = %e, "shared state not saved at shutdown");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), state.store.close()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Consumers per queue in a process whose queue is on Redis.
const REMOTE_CONSUMERS: usize = 4;
/// Jobs per fetch of such a consumer (in-process: the default 64).
const REMOTE_BATCH: usize = 128;

/// Starts the worker pool of `state` (see [`WorkerHandles::start`]).
pub async fn start_workers(
    state: &AppState,
    role: &str,
    stop: CancellationToken,
) -> Result<WorkerPool, StartupError> {
    state.workers().start(role, stop).await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    // The handlers are installed now, when this is called — before the
    // server says it is listening — not when the future is first polled: a
    // signal in between would otherwise kill the process undrained.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let interrupted = async {
                match interrupt {
                    Ok(mut signal) => signal.recv().await.map_or((), drop),
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            let terminated = async {
                match terminate {
                    Ok(mut signal) => signal.recv().await.map_or((), drop),
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = interrupted => tracing::info!("SIGINT received"),
                () = terminated => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received");
        } else {
            std::future::pending::<()>().await;
        }
    }
}
