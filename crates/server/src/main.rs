//! The `blockremote` command: `serve`, `worker`, `migrate`, `openapi`, and
//! the operator's one-shot commands (`keys`, `audit`, `admin-key`, `intel`,
//! `simulate`).
//!
//! Errors are printed as one line on stderr with a non-zero exit code; a
//! missing database is an operator problem to be told about, never a panic.
//! Only `serve`, `migrate` and the commands that bootstrap data (`admin-key
//! create`, `intel import`) create a database; the others need one and say
//! which they expected. Numeric arguments are range-checked by the parser.

use std::{path::PathBuf, process::ExitCode};

use blockremote::{
    app::{self, Application},
    auth::kek,
    config::Config,
    intel_change, store, telemetry,
};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

// mimalloc: thread-local free lists instead of glibc's locked arenas. Under
// heartbeat load glibc's malloc and its arena lock were ~17% of the server's
// CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "blockremote",
    version,
    about = "Zero-trust backend for mobile fraud defense"
)]
struct Cli {
    /// A TOML config file (keys: the variable names in lower case without the
    /// BLOCKREMOTE_ prefix). Environment variables override it.
    #[arg(long, global = true, env = "BLOCKREMOTE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and the WebSocket kill-switch (and, on the embedded
    /// default, run the scoring workers in-process).
    Serve {
        /// Do not run database migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Run the background workers only (production: needs REDIS_URL), with
    /// health and metrics on BLOCKREMOTE_WORKER_LISTEN.
    Worker,
    /// Exit 0 when URL answers 2xx within 3 s, else 1: a container health
    /// check for images without curl (e.g. `http://127.0.0.1:8000/health/ready`).
    Healthcheck {
        /// The URL to GET (http only).
        url: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document and exit.
    Openapi,
    /// Signing-key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Admin API key management.
    AdminKey {
        #[command(subcommand)]
        command: AdminKeyCommand,
    },
    /// Drive labelled device sessions (genuine and attacks) through a
    /// running server's API and report detection per class: the built-in
    /// generator's, or any corpus file's (JSON Lines, see the README).
    Simulate {
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        /// Admin API key (mints one device session per simulated device).
        #[arg(long, env = "BLOCKREMOTE_ADMIN_TOKEN", hide_env_values = true)]
        admin_key: String,
        /// Sessions per class (1–100000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000), conflicts_with = "corpus")]
        sessions: u32,
        /// Heartbeats per session (1–10000).
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=10_000), conflicts_with = "corpus")]
        length: u32,
        /// Corpus seed (default: a fresh one per run, printed in the
        /// report, so each run's windows are new to the server).
        #[arg(long, conflicts_with = "corpus")]
        seed: Option<u64>,
        /// Generated classes: the ten original, the eight shifted (issue 21) or all.
        #[arg(long, default_value = "all", value_parser = ["original", "shifted", "all"], conflicts_with = "corpus")]
        classes: String,
        /// Run this corpus file (JSON Lines, one session per line) instead
        /// of the generated corpus.
        #[arg(long, value_name = "FILE")]
        corpus: Option<PathBuf>,
        /// Sessions in flight at once (1–1024).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: u32,
        /// Run even when the server already saw these windows (its replay
        /// checks then apply: the report says so).
        #[arg(long)]
        rerun: bool,
        /// Allow a server that is not on a loopback address.
        #[arg(long)]
        force: bool,
        /// Delete every simulated user (external id `simulate:…`) with its
        /// devices and sessions, and exit.
        #[arg(long, conflicts_with_all = ["corpus", "seed", "rerun"])]
        cleanup: bool,
    },
    /// The newcomer's tour through the public API: map a customer, sign a
    /// device in, stream heartbeats, lock it (the app is told over its
    /// kill-switch socket) and unlock it. Starts its own embedded server
    /// unless --url is given.
    Demo {
        /// Run against this server instead (needs its admin key).
        #[arg(long, requires = "admin_key")]
        url: Option<String>,
        /// The server's admin API key (with --url).
        #[arg(long, env = "BLOCKREMOTE_ADMIN_TOKEN", hide_env_values = true)]
        admin_key: Option<String>,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Threat intelligence (blacklisted app hashes, domains, IPs/CIDRs).
    Intel {
        #[command(subcommand)]
        command: IntelCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the audit trail's hash chain; exit 1 naming the first
    /// edited, removed or inserted row.
    Verify {
        /// A head printed earlier by `audit head` (`SEQ:HASH`, or the hash
        /// alone): exit 1 unless that row is still in the chain with that
        /// hash, which detects the newest rows being cut off.
        #[arg(long, value_name = "SEQ:HASH")]
        head: Option<String>,
    },
    /// Print the chain's head as `SEQ:HASH`, to keep somewhere the
    /// database's writers cannot reach (and check with `verify --head`).
    Head,
}

#[derive(Debug, Subcommand)]
enum IntelCommand {
    /// Apply a change from a JSON file shaped like the body of
    /// `POST /v1/admin/threat-intel`: `{"add": {"app_hashes": [], "domains": [],
    /// "ips": []}, "remove": {…}, "reason": "…"}`. Running servers reload at once.
    Import {
        /// The JSON file.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a new signing key current (BLOCKREMOTE_JWT_ALGORITHM: ES256 or RS256). Running servers sign with it within
    /// BLOCKREMOTE_KEY_RELOAD_SECONDS (≤ 60 s) and keep verifying tokens of
    /// the old key until they expire.
    Rotate,
    /// Revoke a signing key at once: it stops signing and verifying on every
    /// instance, and tokens it signed are refused on their next use (a
    /// current key is first replaced by a new one). For a leaked key.
    Revoke {
        /// The key's `kid` (as in the JWKS and token headers). A kid is
        /// base64url, so it may begin with `-`: taken as the kid, not a flag.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
    /// Re-seal every private key and server secret under the KEK now
    /// configured (BLOCKREMOTE_KEK / _FILE, or the data dir's `kek` file),
    /// opening them with the previous one (BLOCKREMOTE_KEK_PREVIOUS / _FILE,
    /// or --previous-file). Safe to run again; prints what changed.
    Rewrap {
        /// A file holding the previous KEK (base64), instead of
        /// BLOCKREMOTE_KEK_PREVIOUS(_FILE).
        #[arg(long, value_name = "FILE")]
        previous_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminKeyCommand {
    /// Create an admin API key and print it once (only its hash is stored).
    Create {
        /// A label to recognise the key by.
        #[arg(long, default_value = "admin")]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A probe needs no configuration (and must not fail on one).
    if let Command::Healthcheck { url } = &cli.command {
        let probed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(healthcheck(url)));
        return match probed {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("{e:#}")),
        };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(&format!("invalid configuration: {e}")),
    };
    if let Command::Openapi = cli.command {
        return match blockremote::http::openapi().to_pretty_json() {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        };
    }
    let target = match cli.command {
        Command::Serve { .. } | Command::Worker => telemetry::LogTarget::Stdout,
        _ => telemetry::LogTarget::Stderr,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    // Traces only from the long-running processes, and only when the
    // standard OTEL_* variables ask for them (telemetry/trace.rs).
    let role = match cli.command {
        Command::Serve { .. } => Some("serve"),
        Command::Worker => Some("worker"),
        _ => None,
    };
    let tracing = match role {
        Some(role) if telemetry::trace::export_requested(|name| std::env::var(name).ok()) => {
            let _entered = runtime.enter();
            match telemetry::trace::Tracing::from_env(role) {
                Ok(pipeline) => Some(pipeline),
                Err(e) => return fail(&e.to_string()),
            }
        }
        _ => None,
    };
    let (tracing, tracer) = match tracing {
        Some((pipeline, tracer)) => (Some(pipeline), Some(tracer)),
        None => (None, None),
    };
    telemetry::init_logging(config.log_format, target, tracer);
    let result = runtime.block_on(async {
        let result = run(cli.command, config).await;
        if let Some(pipeline) = tracing {
            pipeline.shutdown(std::time::Duration::from_secs(5)).await;
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn fail(message: &str) -> ExitCode {
    // One line, whatever the cause chain held.
    eprintln!("blockremote: error: {}", message.replace('\n', " "));
    ExitCode::FAILURE
}

/// The store alone, for the one-shot commands.
async fn open_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn store::Store>> {
    Ok(store::connect(
        &config.database,
        config.database_max_connections,
        config.connect_timeout,
    )
    .await?)
}

/// The store of a command that needs an existing database: creates nothing
/// (no data dir, no file, no schema) and names the database it expected and
/// how to create it.
async fn open_existing_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn store::Store>> {
    let target = config.database.redacted_url();
    let create = "create it with `blockremote migrate` (or by starting `blockremote serve`)";
    if let Some(file) = store::sqlite_file(&config.database) {
        if !file.exists() {
            anyhow::bail!(
                "no database at {} (DATABASE_URL, or by default blockremote.db in BLOCKREMOTE_DATA_DIR={}): {create}",
                file.display(),
                config.data_dir.display()
            );
        }
    }
    let store = open_store(config).await?;
    let pending = store.pending_migrations().await?;
    if pending > 0 {
        store.close().await;
        anyhow::bail!(
            "the database at {target} is not initialised or is {pending} migration(s) behind: run `blockremote migrate`"
        );
    }
    Ok(store)
}

/// Tells running servers that the signing keys changed (Redis only: an
/// embedded server looks every second).
async fn announce_key_change(config: &Config) -> anyhow::Result<()> {
    if config.redis_url.is_some() {
        let shared = blockremote::state::connect(config, None).await?;
        shared
            .publish(blockremote::auth::keys::CHANGED_CHANNEL, b"1")
            .await?;
    }
    Ok(())
}

fn chain_break(broken: blockremote::store::audit_chain::ChainBreak) -> anyhow::Error {
    use blockremote::store::audit_chain::ChainBreak;
    match broken {
        ChainBreak::Edited { seq } => anyhow::anyhow!("audit chain broken: row {seq} was edited"),
        ChainBreak::Unlinked { seq } => anyhow::anyhow!(
            "audit chain broken before row {seq}: a row was removed or inserted"
        ),
        ChainBreak::Unkeyed { seq } => anyhow::anyhow!(
            "audit chain broken: row {seq} is not keyed though the chain was keyed before it (rewritten without the key)"
        ),
        ChainBreak::KeyMissing { seq } => anyhow::anyhow!(
            "cannot verify row {seq}: it is keyed and the audit-chain key is unavailable (set BLOCKREMOTE_KEK or BLOCKREMOTE_KEK_FILE; if it is set, the sealed key was removed from the database)"
        ),
    }
}

/// Appends the audit row of an operator's command (source and actor `cli`),
/// chained under the audit-chain key as the servers chain theirs.
async fn audit_command(
    config: &Config,
    store: &dyn store::Store,
    action: &str,
    detail: String,
) -> anyhow::Result<()> {
    let kek = kek::resolve(config, kek::Generate::Never)?;
    store.set_chain_key(blockremote::auth::sealed::chain_key(store, kek.as_ref(), false).await?);
    store
        .append_audit(store::NewAuditEntry::cli(action, detail))
        .await?;
    Ok(())
}

/// `blockremote healthcheck URL`: exit 0 on a 2xx within 3 s.
async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("{url} is not a URL: {e}"))?;
    if parsed.scheme() != "http" {
        anyhow::bail!("{url}: only http:// is supported (probe the local port, not the TLS front)");
    }
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()?;
    let response = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url} did not answer: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        anyhow::bail!("{url} answered {status}")
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { no_migrate } => {
            let migrate = config.auto_migrate && !no_migrate;
            let app = Application::build(config, migrate).await?;
            app.run_until_stopped(app::shutdown_signal()).await
        }
        Command::Worker => {
            if config.redis_url.is_none() {
                anyhow::bail!(
                    "`worker` needs REDIS_URL: on the embedded default the workers run inside `serve`"
                );
            }
            let grace = config.shutdown_grace;
            // Only what scoring needs: no kill-switch hub, firewall or sessions.
            // Signal handlers first, so a signal during start-up drains too.
            let stopped = app::shutdown_signal();
            let workers = app::WorkerHandles::connect(&config).await?;
            let stop = CancellationToken::new();
            let endpoints = match config.worker_listen {
                Some(addr) => match workers.serve_endpoints(&config, addr, stop.clone()).await {
                    Ok(endpoints) => Some(endpoints),
                    // The default address taken (a second worker on the host,
                    // or node_exporter): run without endpoints, and say so.
                    Err(e) if config.worker_listen_is_default() => {
                        tracing::warn!(error = %e, "worker endpoints not served: set BLOCKREMOTE_WORKER_LISTEN to a free address (or `off`)");
                        None
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            };
            blockremote::telemetry::watch::spawn_pool_sampler(
                workers.store.clone(),
                workers.metrics.clone(),
                stop.clone(),
            );
            blockremote::telemetry::watch::spawn_readiness_sampler(
                workers.store.clone(),
                workers.shared.clone(),
                workers.metrics.clone(),
                stop.clone(),
            );
            let pool = workers.start("worker", stop.clone()).await?;
            tracing::info!(
                consumers = pool.len(),
                database = workers.store.backend(),
                endpoints = ?config.worker_listen,
                "worker running"
            );
            stopped.await;
            stop.cancel();
            pool.stop(grace).await;
            if let Some(endpoints) = endpoints {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoints).await;
            }
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                workers.scoring.flush_snapshots(),
            )
            .await;
            workers.store.close().await;
            Ok(())
        }
        Command::Healthcheck { url } => healthcheck(&url).await,
        Command::Migrate => {
            let store = open_store(&config).await?;
            store.migrate().await?;
            tracing::info!(database = store.backend(), "migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            if config.jwt_private_key.is_some() {
                anyhow::bail!(
                    "the signing key comes from BLOCKREMOTE_JWT_PRIVATE_KEY(_FILE): rotate by deploying a new PEM"
                );
            }
            let store = open_existing_store(&config).await?;
            let kek = kek::resolve(&config, kek::Generate::IfMissing)?;
            let kid =
                blockremote::auth::keys::rotate(store.as_ref(), config.jwt_algorithm, kek.as_ref())
                    .await?;
            let audited =
                audit_command(&config, store.as_ref(), "signing_key_rotated", kid.clone()).await;
            store.close().await;
            // The key is current whatever became of its audit row: say so first.
            println!("{kid}");
            tracing::info!(kid, "new signing key is current");
            audited
        }
        Command::Keys {
            command: KeysCommand::Revoke { kid },
        } => {
            let store = open_existing_store(&config).await?;
            let kek = kek::resolve(&config, kek::Generate::IfMissing)?;
            if let Some(pem) = &config.jwt_private_key {
                use secrecy::ExposeSecret;
                let external = blockremote::auth::keys::ExternalKey::from_pem(pem.expose_secret())?;
                if external.kid() == kid {
                    anyhow::bail!(
                        "{kid} is the key of BLOCKREMOTE_JWT_PRIVATE_KEY(_FILE): deploy a new PEM first, then revoke it"
                    );
                }
            }
            let revoked = blockremote::auth::keys::revoke(
                store.as_ref(),
                &kid,
                config.jwt_algorithm,
                kek.as_ref(),
            )
            .await?;
            let detail = match &revoked.replaced_by {
                Some(new) => format!("{} (current key now {new})", revoked.kid),
                None => revoked.kid.clone(),
            };
            let audited =
                audit_command(&config, store.as_ref(), "signing_key_revoked", detail).await;
            store.close().await;
            // A revocation is announced whatever became of its audit row
            // (a leaked key must stop working now); the failure is reported after.
            announce_key_change(&config).await?;
            println!("revoked {}", revoked.kid);
            if let Some(new) = &revoked.replaced_by {
                println!("current key is now {new}");
            }
            tracing::warn!(kid = %revoked.kid, replaced_by = ?revoked.replaced_by, "signing key revoked");
            audited
        }
        Command::Keys {
            command: KeysCommand::Rewrap { previous_file },
        } => {
            let new = kek::resolve(&config, kek::Generate::Never)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "`keys rewrap` needs the new KEK: set BLOCKREMOTE_KEK or BLOCKREMOTE_KEK_FILE"
                )
            })?;
            let previous = match previous_file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                    Some(kek::Kek::from_base64(&text, path.display().to_string())?)
                }
                None => kek::previous(&config)?,
            };
            if previous.as_ref().is_some_and(|old| old.id() == new.id()) {
                anyhow::bail!("the previous KEK and the new KEK are the same key");
            }
            let store = open_existing_store(&config).await?;
            let done =
                blockremote::auth::sealed::rewrap(store.as_ref(), previous.as_ref(), &new).await;
            let audited = match &done {
                Ok(done) => {
                    let detail = format!(
                        "{} signing key(s) and {} server secret(s) under KEK {}",
                        done.signing_keys,
                        done.secrets,
                        new.id()
                    );
                    audit_command(&config, store.as_ref(), "keys_rewrapped", detail).await
                }
                Err(_) => Ok(()),
            };
            store.close().await;
            let done = done?;
            audited?;
            println!(
                "rewrapped {} signing key(s) and {} server secret(s) under KEK {}; {} already under it",
                done.signing_keys,
                done.secrets,
                new.id(),
                done.unchanged
            );
            Ok(())
        }
        Command::AdminKey {
            command: AdminKeyCommand::Create { name },
        } => {
            let store = open_store(&config).await?;
            store.migrate().await?;
            let key = blockremote::auth::random_token("bra_");
            let hash = blockremote::auth::sha256(key.as_bytes());
            // Audited first (by the id the rows of its actions will name,
            // never the key), so no key exists that the trail does not know.
            let id = format!("admin:{}", hex::encode(&hash[..4]));
            let created = async {
                audit_command(
                    &config,
                    store.as_ref(),
                    "admin_key_created",
                    format!("{id} ({name})"),
                )
                .await?;
                anyhow::Ok(store.insert_admin_key(&name, &hash).await?)
            }
            .await;
            store.close().await;
            created?;
            // Printed once, to stdout only; it is not logged and cannot be shown again.
            println!("{key}");
            Ok(())
        }
        Command::Intel {
            command: IntelCommand::Import { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let change: intel_change::IntelChange = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let add = intel_change::flatten(&change.add, "add")
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let remove = intel_change::flatten(&change.remove, "remove")
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let store = open_store(&config).await?;
            store.migrate().await?;
            let changed = store
                .update_threat_intel(&add, &remove, change.reason.as_deref())
                .await?;
            let audited = audit_command(
                &config,
                store.as_ref(),
                "threat_intel_changed",
                format!("{changed} entries changed"),
            )
            .await;
            store.close().await;
            audited?;
            // Tell running servers (Redis only: an embedded server reloads within 30 s).
            if config.redis_url.is_some() {
                let shared = blockremote::state::connect(&config, None).await?;
                shared
                    .publish(blockremote::signals::intel::CHANGED_CHANNEL, b"1")
                    .await?;
            }
            println!("{changed}");
            tracing::info!(
                added = add.len(),
                removed = remove.len(),
                changed,
                "threat intelligence imported"
            );
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Head,
        } => {
            let store = open_existing_store(&config).await?;
            let head = store.audit_head().await;
            store.close().await;
            match head? {
                Some((seq, hash)) => println!("{seq}:{hash}"),
                None => println!("0:{}", blockremote::store::audit_chain::GENESIS),
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { head },
        } => {
            let anchor = match head.as_deref() {
                Some(text) => Some(blockremote::store::Anchor::parse(text).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--head: `{text}` is not a head printed by `blockremote audit head` (SEQ:HASH)"
                    )
                })?),
                None => None,
            };
            let store = open_existing_store(&config).await?;
            let verdict = async {
                let kek = kek::resolve(&config, kek::Generate::Never)?;
                let key = blockremote::auth::sealed::chain_key(store.as_ref(), kek.as_ref(), false)
                    .await?;
                anyhow::Ok(
                    blockremote::store::verify_chain(store.as_ref(), key.as_ref(), anchor.as_ref())
                        .await?,
                )
            }
            .await;
            store.close().await;
            let report = verdict?.map_err(chain_break)?;
            if report.anchor_found == Some(false) {
                let now = report.head.map_or_else(
                    || "it is empty".to_owned(),
                    |(seq, hash)| format!("it now ends at {seq}:{hash}"),
                );
                anyhow::bail!(
                    "audit chain truncated or rewritten: the anchored head {} is not in the chain ({now})",
                    head.unwrap_or_default()
                );
            }
            println!("audit chain intact: {} rows", report.rows);
            Ok(())
        }
        Command::Simulate {
            url,
            admin_key,
            sessions,
            length,
            seed,
            classes,
            corpus,
            concurrency,
            rerun,
            force,
            cleanup,
        } => {
            use blockremote::simulate::Corpus;
            if cleanup {
                let removed = blockremote::simulate::cleanup(&url, &admin_key, force).await?;
                println!(
                    "removed {removed} simulated users; the server's replay check still remembers \
                     their windows for 24 h, and with the users gone a rerun of the same seed is no \
                     longer refused: use fresh seeds"
                );
                return Ok(());
            }
            let corpus = match corpus {
                Some(path) => Corpus::File(path),
                None => Corpus::Generated(
                    blockremote_engine::sim::Class::set(&classes)
                        .ok_or_else(|| anyhow::anyhow!("unknown class set {classes}"))?
                        .to_vec(),
                ),
            };
            blockremote::simulate::run(blockremote::simulate::SimulateOptions {
                url,
                admin_key,
                sessions: sessions as usize,
                length: length as usize,
                seed,
                rerun,
                force,
                concurrency: concurrency as usize,
                corpus,
            })
            .await
        }
        Command::Demo { url, admin_key } => match (url, admin_key) {
            (Some(url), Some(key)) => blockremote::demo::tour(&url, &key).await,
            _ => blockremote::demo::run_embedded().await,
        },
        Command::Openapi => Ok(()),
    }
}
