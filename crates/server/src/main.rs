//! The `blockremote` command: `serve`, `worker`, `migrate`, `openapi`.
//!
//! Errors are printed as one line on stderr with a non-zero exit code; a
//! missing database is an operator problem to be told about, never a panic.

use std::{path::PathBuf, process::ExitCode};

use blockremote::{
    app::{self, Application},
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
    /// Run the background workers only (production: needs REDIS_URL).
    Worker,
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
    /// Drive synthetic device sessions (genuine and attacks) through a
    /// running server's API and report detection per class.
    Simulate {
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        /// Admin API key (mints one device session per simulated device).
        #[arg(long, env = "BLOCKREMOTE_ADMIN_TOKEN", hide_env_values = true)]
        admin_key: String,
        /// Sessions per class.
        #[arg(long, default_value_t = 20)]
        sessions: usize,
        /// Heartbeats per session.
        #[arg(long, default_value_t = 25)]
        length: usize,
        /// Corpus seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Sessions in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
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
    Verify,
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
    telemetry::init_logging(config.log_format, target);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli.command, config)) {
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
            let workers = app::WorkerHandles::connect(&config).await?;
            let stop = CancellationToken::new();
            let pool = workers.start("worker", stop.clone()).await?;
            tracing::info!(
                consumers = pool.len(),
                database = workers.store.backend(),
                "worker running"
            );
            app::shutdown_signal().await;
            pool.stop(grace).await;
            workers.store.close().await;
            Ok(())
        }
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
            let store = open_store(&config).await?;
            store.migrate().await?;
            let kid = blockremote::auth::keys::rotate(store.as_ref(), config.jwt_algorithm).await?;
            println!("{kid}");
            tracing::info!(kid, "new signing key is current");
            store.close().await;
            Ok(())
        }
        Command::AdminKey {
            command: AdminKeyCommand::Create { name },
        } => {
            let store = open_store(&config).await?;
            store.migrate().await?;
            let key = blockremote::auth::random_token("bra_");
            store
                .insert_admin_key(&name, &blockremote::auth::sha256(key.as_bytes()))
                .await?;
            store.close().await;
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
            store.close().await;
            // Tell running servers (Redis only: an embedded server reloads within 30 s).
            if config.redis_url.is_some() {
                let shared = blockremote::state::connect(&config).await?;
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
            command: AuditCommand::Verify,
        } => {
            let store = open_store(&config).await?;
            let verdict = blockremote::store::verify_audit_chain(store.as_ref()).await?;
            store.close().await;
            match verdict {
                Ok(rows) => {
                    println!("audit chain intact: {rows} rows");
                    Ok(())
                }
                Err(blockremote::store::audit_chain::ChainBreak::Edited { seq }) => {
                    anyhow::bail!("audit chain broken: row {seq} was edited")
                }
                Err(blockremote::store::audit_chain::ChainBreak::Unlinked { seq }) => {
                    anyhow::bail!(
                        "audit chain broken before row {seq}: a row was removed or inserted"
                    )
                }
            }
        }
        Command::Simulate {
            url,
            admin_key,
            sessions,
            length,
            seed,
            concurrency,
        } => {
            blockremote::simulate::run(blockremote::simulate::SimulateOptions {
                url,
                admin_key,
                sessions,
                length,
                seed,
                concurrency,
            })
            .await
        }
        Command::Openapi => Ok(()),
    }
}
