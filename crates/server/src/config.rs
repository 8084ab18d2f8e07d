//! Layered, typed configuration.
//!
//! Values come from three layers, each overriding the one before:
//! 1. built-in defaults (API.md, "Running and configuration"),
//! 2. an optional TOML file (`--config FILE` or `BLOCKREMOTE_CONFIG`), whose keys
//!    are the variable names below in lower case without the `BLOCKREMOTE_` prefix,
//! 3. the environment: `BLOCKREMOTE_*`, plus the conventional `DATABASE_URL` and `REDIS_URL`.
//!
//! The layering is written out by hand rather than generated: every variable is
//! listed once in [`ENV_VARS`], every value is validated with a message that names
//! the variable, and secrets are held in [`SecretString`] so they never reach a
//! log line or a `Debug` print.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};

/// The JWT issuer used when none is configured.
pub const DEFAULT_ISSUER: &str = "blockremote";
/// The JWT audience used when none is configured.
pub const DEFAULT_AUDIENCE: &str = "blockremote-mobile";

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file that was asked for.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("config file {path}: {message}")]
    ParseFile {
        /// The file that was read.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// One setting has a value that cannot be used.
    #[error("{name}: {message}")]
    Invalid {
        /// The variable (or file key) at fault.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Which durable store to use.
#[derive(Clone)]
pub enum DatabaseConfig {
    /// An SQLite file (the embedded default).
    Sqlite {
        /// Connection URL, `sqlite://path`.
        url: SecretString,
    },
    /// A PostgreSQL server.
    Postgres {
        /// Connection URL, `postgres://…` (may hold a password).
        url: SecretString,
    },
}

impl DatabaseConfig {
    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// The URL with any password replaced, for error messages and logs.
    pub fn redacted_url(&self) -> String {
        match self {
            Self::Sqlite { url } | Self::Postgres { url } => redact_url(url.expose_secret()),
        }
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.backend(), self.redacted_url())
    }
}

/// Replaces the password of a URL with `***` (and keeps the rest for diagnosis).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// The whole, validated configuration.
#[derive(Clone)]
pub struct Config {
    /// HTTP/WebSocket listen address (`BLOCKREMOTE_LISTEN`).
    pub listen: SocketAddr,
    /// Where the embedded database and generated dev keys live (`BLOCKREMOTE_DATA_DIR`).
    pub data_dir: PathBuf,
    /// The durable store (`DATABASE_URL`; default: SQLite file in the data dir).
    pub database: DatabaseConfig,
    /// Maximum pooled database connections (`BLOCKREMOTE_DATABASE_MAX_CONNECTIONS`).
    pub database_max_connections: u32,
    /// How long to wait for the database or Redis at start (`BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS`).
    pub connect_timeout: Duration,
    /// Redis, or `None` for in-process state (`REDIS_URL`).
    pub redis_url: Option<SecretString>,
    /// Prefix put before every Redis key (`BLOCKREMOTE_REDIS_PREFIX`), so that
    /// several deployments or tests can share one Redis.
    pub redis_prefix: String,
    /// Run migrations when `serve` starts (`BLOCKREMOTE_AUTO_MIGRATE`).
    pub auto_migrate: bool,
    /// Bootstrap admin API key (`BLOCKREMOTE_ADMIN_TOKEN`).
    pub admin_token: Option<SecretString>,
    /// Billing webhook secrets (`BLOCKREMOTE_WEBHOOK_SECRETS`, comma-separated).
    pub webhook_secrets: Vec<SecretString>,
    /// CIDRs the billing webhook accepts calls from (`BLOCKREMOTE_WEBHOOK_ALLOWED_IPS`; empty = any).
    pub webhook_allowed_ips: Vec<IpNet>,
    /// WebSocket `Origin` allow-list (`BLOCKREMOTE_ALLOWED_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    /// Browser origins allowed by CORS (`BLOCKREMOTE_CORS_ORIGINS`, comma-separated; empty = none).
    pub cors_origins: Vec<String>,
    /// CIDRs whose `X-Forwarded-For` is believed (`BLOCKREMOTE_TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<IpNet>,
    /// Enables attestation provider `test` (`BLOCKREMOTE_ATTESTATION_TEST_SECRET`).
    pub attestation_test_secret: Option<SecretString>,
    /// JWT `iss` (`BLOCKREMOTE_ISSUER`).
    pub issuer: String,
    /// JWT `aud` (`BLOCKREMOTE_AUDIENCE`).
    pub audience: String,
    /// `Strict-Transport-Security` max-age; `None` sends no HSTS header
    /// (`BLOCKREMOTE_HSTS_MAX_AGE_SECONDS`, 0 = off).
    pub hsts_max_age: Option<Duration>,
    /// Longest a request may take before it is answered 503 (`BLOCKREMOTE_REQUEST_TIMEOUT_SECONDS`).
    pub request_timeout: Duration,
    /// How long SIGTERM waits for in-flight work (`BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS`, ≤ 9).
    pub shutdown_grace: Duration,
    /// Capacity of the in-process work queue (`BLOCKREMOTE_QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// Log format: `json` (default) or `pretty` (`BLOCKREMOTE_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Access-token lifetime (`BLOCKREMOTE_ACCESS_TOKEN_TTL_SECONDS`, default 900).
    pub access_token_ttl: Duration,
    /// Algorithm of generated signing keys: `ES256` (default) or `RS256`
    /// (`BLOCKREMOTE_JWT_ALGORITHM`). A configured PEM decides by its own type.
    pub jwt_algorithm: String,
    /// PEM of the JWT signing key, from `BLOCKREMOTE_JWT_PRIVATE_KEY` or the
    /// file named by `BLOCKREMOTE_JWT_PRIVATE_KEY_FILE`; `None` = generated keys in the store.
    pub jwt_private_key: Option<SecretString>,
    /// How often each instance reloads the signing keys (`BLOCKREMOTE_KEY_RELOAD_SECONDS`, 1–60, default 30).
    pub key_reload_interval: Duration,
    /// Attestation nonce lifetime (`BLOCKREMOTE_ATTESTATION_NONCE_TTL_SECONDS`, 120–300, default 180).
    pub attestation_nonce_ttl: Duration,
    /// Attestation failures before quarantine (`BLOCKREMOTE_ATTESTATION_MAX_FAILURES`, default 3).
    pub attestation_max_failures: u32,
    /// Refreshes allowed per device per minute (`BLOCKREMOTE_REFRESH_PER_MINUTE`, default 10).
    pub refresh_per_minute: u32,
    /// Kill-switch sockets one instance holds at most (`BLOCKREMOTE_WS_MAX_CONNECTIONS`, default 100000).
    pub ws_max_connections: usize,
    /// Kill-switch handshakes per client address per minute (`BLOCKREMOTE_WS_HANDSHAKES_PER_MINUTE`, default 60).
    pub ws_handshakes_per_minute: u32,
    /// Business events older than this are deleted (`BLOCKREMOTE_EVENT_RETENTION_DAYS`,
    /// 1–3650, default 90). Audit rows are kept.
    pub event_retention: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (for log shippers).
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

impl std::fmt::Debug for Config {
    /// Prints every setting but never a secret's value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &Option<SecretString>| if s.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database", &self.database)
            .field("database_max_connections", &self.database_max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "redis_url",
                &self
                    .redis_url
                    .as_ref()
                    .map(|u| redact_url(u.expose_secret())),
            )
            .field("redis_prefix", &self.redis_prefix)
            .field("auto_migrate", &self.auto_migrate)
            .field("admin_token", &set(&self.admin_token))
            .field(
                "webhook_secrets",
                &format_args!("<{} set>", self.webhook_secrets.len()),
            )
            .field("allowed_origins", &self.allowed_origins)
            .field("cors_origins", &self.cors_origins)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("webhook_allowed_ips", &self.webhook_allowed_ips)
            .field(
                "attestation_test_secret",
                &set(&self.attestation_test_secret),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("hsts_max_age", &self.hsts_max_age)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("queue_capacity", &self.queue_capacity)
            .field("log_format", &self.log_format)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_private_key", &set(&self.jwt_private_key))
            .field("key_reload_interval", &self.key_reload_interval)
            .field("attestation_nonce_ttl", &self.attestation_nonce_ttl)
            .field("attestation_max_failures", &self.attestation_max_failures)
            .field("refresh_per_minute", &self.refresh_per_minute)
            .field("ws_max_connections", &self.ws_max_connections)
            .field("ws_handshakes_per_minute", &self.ws_handshakes_per_minute)
            .finish()
    }
}

/// Every environment variable read, with the file key it mirrors.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("BLOCKREMOTE_LISTEN", "listen"),
    ("BLOCKREMOTE_DATA_DIR", "data_dir"),
    ("DATABASE_URL", "database_url"),
    (
        "BLOCKREMOTE_DATABASE_MAX_CONNECTIONS",
        "database_max_connections",
    ),
    (
        "BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS",
        "connect_timeout_seconds",
    ),
    ("REDIS_URL", "redis_url"),
    ("BLOCKREMOTE_REDIS_PREFIX", "redis_prefix"),
    ("BLOCKREMOTE_AUTO_MIGRATE", "auto_migrate"),
    ("BLOCKREMOTE_ADMIN_TOKEN", "admin_token"),
    ("BLOCKREMOTE_WEBHOOK_SECRETS", "webhook_secrets"),
    ("BLOCKREMOTE_WEBHOOK_ALLOWED_IPS", "webhook_allowed_ips"),
    ("BLOCKREMOTE_ALLOWED_ORIGINS", "allowed_origins"),
    ("BLOCKREMOTE_CORS_ORIGINS", "cors_origins"),
    ("BLOCKREMOTE_TRUSTED_PROXIES", "trusted_proxies"),
    (
        "BLOCKREMOTE_ATTESTATION_TEST_SECRET",
        "attestation_test_secret",
    ),
    ("BLOCKREMOTE_ISSUER", "issuer"),
    ("BLOCKREMOTE_AUDIENCE", "audience"),
    ("BLOCKREMOTE_HSTS_MAX_AGE_SECONDS", "hsts_max_age_seconds"),
    (
        "BLOCKREMOTE_REQUEST_TIMEOUT_SECONDS",
        "request_timeout_seconds",
    ),
    (
        "BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS",
        "shutdown_grace_seconds",
    ),
    ("BLOCKREMOTE_QUEUE_CAPACITY", "queue_capacity"),
    ("BLOCKREMOTE_EVENT_RETENTION_DAYS", "event_retention_days"),
    ("BLOCKREMOTE_LOG_FORMAT", "log_format"),
    (
        "BLOCKREMOTE_ACCESS_TOKEN_TTL_SECONDS",
        "access_token_ttl_seconds",
    ),
    ("BLOCKREMOTE_JWT_ALGORITHM", "jwt_algorithm"),
    ("BLOCKREMOTE_JWT_PRIVATE_KEY", "jwt_private_key"),
    ("BLOCKREMOTE_JWT_PRIVATE_KEY_FILE", "jwt_private_key_file"),
    ("BLOCKREMOTE_KEY_RELOAD_SECONDS", "key_reload_seconds"),
    (
        "BLOCKREMOTE_ATTESTATION_NONCE_TTL_SECONDS",
        "attestation_nonce_ttl_seconds",
    ),
    (
        "BLOCKREMOTE_ATTESTATION_MAX_FAILURES",
        "attestation_max_failures",
    ),
    ("BLOCKREMOTE_REFRESH_PER_MINUTE", "refresh_per_minute"),
    ("BLOCKREMOTE_WS_MAX_CONNECTIONS", "ws_max_connections"),
    (
        "BLOCKREMOTE_WS_HANDSHAKES_PER_MINUTE",
        "ws_handshakes_per_minute",
    ),
];

impl Config {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(file, &env)
    }

    /// Loads from an explicit environment map (used by tests; no process globals read).
    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut values: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("BLOCKREMOTE_CONFIG").map(PathBuf::from));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let layer: BTreeMap<String, toml::Value> =
                toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
                    path: path.clone(),
                    message: e.message().to_owned(),
                })?;
            for (key, value) in layer {
                let Some((_, known)) = ENV_VARS.iter().find(|(_, k)| *k == key) else {
                    return Err(ConfigError::ParseFile {
                        path,
                        message: format!("unknown key `{key}`"),
                    });
                };
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Array(items) => items
                        .into_iter()
                        .map(|v| match v {
                            toml::Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                values.insert(known, (format!("{} (config file)", key), text));
            }
        }
        for (var, key) in ENV_VARS {
            if let Some(v) = env.get(*var) {
                values.insert(key, ((*var).to_owned(), v.clone()));
            }
        }
        Self::from_values(&values)
    }

    fn from_values(values: &BTreeMap<&'static str, (String, String)>) -> Result<Self, ConfigError> {
        let get = |key: &str| values.get(key).map(|(n, v)| (n.as_str(), v.as_str()));
        let data_dir = get("data_dir")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| PathBuf::from("./data"));
        let database = match get("database_url") {
            None => DatabaseConfig::Sqlite {
                url: sqlite_url_for(&data_dir.join("blockremote.db")).into(),
            },
            Some((name, url)) => parse_database_url(name, url)?,
        };
        let redis_url = match get("redis_url") {
            None => None,
            Some((_, "")) => None,
            Some((name, url)) => {
                let parsed = url::Url::parse(url).map_err(|e| invalid(name, e))?;
                if !matches!(parsed.scheme(), "redis" | "rediss") {
                    return Err(invalid(name, "scheme must be redis:// or rediss://"));
                }
                Some(SecretString::from(url.to_owned()))
            }
        };
        let secret = |key: &str| {
            get(key)
                .filter(|(_, v)| !v.is_empty())
                .map(|(_, v)| SecretString::from(v.to_owned()))
        };
        let list = |key: &str| get(key).map(|(_, v)| split_list(v)).unwrap_or_default();

        let admin_token = secret("admin_token");
        if let (Some(token), Some((name, _))) = (&admin_token, get("admin_token")) {
            if token.expose_secret().len() < 32 {
                return Err(invalid(
                    name,
                    "must be at least 32 characters (use a random key)",
                ));
            }
        }
        let trusted_proxies = list("trusted_proxies")
            .into_iter()
            .map(|s| parse_cidr(&s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(name_of(values, "trusted_proxies"), e))?;
        let webhook_allowed_ips = list("webhook_allowed_ips")
            .into_iter()
            .map(|s| parse_cidr(&s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(name_of(values, "webhook_allowed_ips"), e))?;
        let allowed_origins = validate_origins(values, "allowed_origins", list("allowed_origins"))?;
        let cors_origins = validate_origins(values, "cors_origins", list("cors_origins"))?;

        let shutdown_grace = Duration::from_secs(parse_num(values, "shutdown_grace_seconds", 8)?);
        if shutdown_grace > Duration::from_secs(9) {
            return Err(invalid(
                name_of(values, "shutdown_grace_seconds"),
                "must be at most 9 (SIGTERM must exit within 10 s)",
            ));
        }
        let request_timeout =
            Duration::from_secs(parse_num(values, "request_timeout_seconds", 30)?.max(1));
        let hsts = parse_num(values, "hsts_max_age_seconds", 0)?;
        let log_format = match get("log_format").map(|(n, v)| (n, v.to_ascii_lowercase())) {
            None => LogFormat::Json,
            Some((_, v)) if v == "json" => LogFormat::Json,
            Some((_, v)) if v == "pretty" => LogFormat::Pretty,
            Some((n, _)) => return Err(invalid(n, "must be `json` or `pretty`")),
        };
        let queue_capacity = parse_num(values, "queue_capacity", 100_000)?;
        if queue_capacity == 0 {
            return Err(invalid(
                name_of(values, "queue_capacity"),
                "must be at least 1",
            ));
        }
        let database_max_connections = parse_num(values, "database_max_connections", 16)?;
        if database_max_connections == 0 {
            return Err(invalid(
                name_of(values, "database_max_connections"),
                "must be at least 1",
            ));
        }
        let non_empty = |key: &str, default: &str| -> Result<String, ConfigError> {
            match get(key) {
                None => Ok(default.to_owned()),
                Some((n, "")) => Err(invalid(n, "must not be empty")),
                Some((_, v)) => Ok(v.to_owned()),
            }
        };
        let redis_prefix = get("redis_prefix")
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        if redis_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                name_of(values, "redis_prefix"),
                "must not contain braces or spaces",
            ));
        }

        let access_ttl = parse_num(values, "access_token_ttl_seconds", 900u64)?;
        if !(60..=86_400).contains(&access_ttl) {
            return Err(invalid(
                name_of(values, "access_token_ttl_seconds"),
                "must be between 60 and 86400",
            ));
        }
        let nonce_ttl = parse_num(values, "attestation_nonce_ttl_seconds", 180u64)?;
        if !(120..=300).contains(&nonce_ttl) {
            return Err(invalid(
                name_of(values, "attestation_nonce_ttl_seconds"),
                "must be between 120 and 300",
            ));
        }
        let key_reload = parse_num(values, "key_reload_seconds", 30u64)?;
        if !(1..=60).contains(&key_reload) {
            return Err(invalid(
                name_of(values, "key_reload_seconds"),
                "must be between 1 and 60",
            ));
        }
        let max_failures = parse_num(values, "attestation_max_failures", 3u32)?.max(1);
        let refresh_per_minute = parse_num(values, "refresh_per_minute", 10u32)?.max(1);
        let jwt_private_key = match (get("jwt_private_key"), get("jwt_private_key_file")) {
            (Some((_, pem)), _) if !pem.is_empty() => Some(SecretString::from(pem.to_owned())),
            (_, Some((name, path))) if !path.is_empty() => Some(SecretString::from(
                std::fs::read_to_string(path)
                    .map_err(|e| invalid(name, format!("cannot read {path}: {e}")))?,
            )),
            _ => None,
        };

        let jwt_algorithm = match get("jwt_algorithm").map(|(n, v)| (n, v.to_ascii_uppercase())) {
            None => "ES256".to_owned(),
            Some((_, v)) if v == "ES256" || v == "RS256" => v,
            Some((n, _)) => return Err(invalid(n, "must be ES256 or RS256")),
        };

        Ok(Self {
            ws_max_connections: parse_num(values, "ws_max_connections", 100_000usize)?,
            ws_handshakes_per_minute: parse_num(values, "ws_handshakes_per_minute", 60u32)?.max(1),
            event_retention: {
                let days: u64 = parse_num(values, "event_retention_days", 90u64)?;
                if !(1..=3650).contains(&days) {
                    return Err(invalid(
                        name_of(values, "event_retention_days"),
                        "must be within 1–3650 days",
                    ));
                }
                Duration::from_secs(days * 86_400)
            },
            jwt_algorithm,
            access_token_ttl: Duration::from_secs(access_ttl),
            jwt_private_key,
            key_reload_interval: Duration::from_secs(key_reload),
            attestation_nonce_ttl: Duration::from_secs(nonce_ttl),
            attestation_max_failures: max_failures,
            refresh_per_minute,
            listen: match get("listen") {
                None => SocketAddr::from(([127, 0, 0, 1], 8000)),
                Some((n, v)) => v.parse().map_err(|e| invalid(n, e))?,
            },
            data_dir,
            database,
            database_max_connections,
            connect_timeout: Duration::from_secs(
                parse_num(values, "connect_timeout_seconds", 10)?.max(1),
            ),
            redis_url,
            redis_prefix,
            auto_migrate: parse_bool(values, "auto_migrate", true)?,
            admin_token,
            webhook_secrets: list("webhook_secrets")
                .into_iter()
                .map(SecretString::from)
                .collect(),
            webhook_allowed_ips,
            allowed_origins,
            cors_origins,
            trusted_proxies,
            attestation_test_secret: secret("attestation_test_secret"),
            issuer: non_empty("issuer", DEFAULT_ISSUER)?,
            audience: non_empty("audience", DEFAULT_AUDIENCE)?,
            hsts_max_age: (hsts > 0).then(|| Duration::from_secs(hsts)),
            request_timeout,
            shutdown_grace,
            queue_capacity,
            log_format,
        })
    }

    /// A configuration for tests and tools: defaults with the given data dir.
    pub fn embedded_in(data_dir: &Path) -> Self {
        let mut values = BTreeMap::new();
        values.insert(
            "data_dir",
            (
                "data_dir".to_owned(),
                data_dir.to_string_lossy().into_owned(),
            ),
        );
        values.insert("listen", ("listen".to_owned(), "127.0.0.1:0".to_owned()));
        // Every value here is a valid default, so this cannot fail.
        match Self::from_values(&values) {
            Ok(config) => config,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }
}

fn name_of(values: &BTreeMap<&'static str, (String, String)>, key: &str) -> String {
    values
        .get(key)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| key.to_owned())
}

fn invalid(name: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        name: name.into(),
        message: message.to_string(),
    }
}

fn parse_num<T>(
    values: &BTreeMap<&'static str, (String, String)>,
    key: &str,
    default: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match values.get(key) {
        None => Ok(default),
        Some((n, v)) => v
            .trim()
            .parse()
            .map_err(|e| invalid(n, format!("`{v}` is not a valid number: {e}"))),
    }
}

fn parse_bool(
    values: &BTreeMap<&'static str, (String, String)>,
    key: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match values.get(key) {
        None => Ok(default),
        Some((n, v)) => match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(invalid(n, format!("`{v}` is not true or false"))),
        },
    }
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{raw}` is not an IP address or CIDR"))
}

fn validate_origins(
    values: &BTreeMap<&'static str, (String, String)>,
    key: &str,
    origins: Vec<String>,
) -> Result<Vec<String>, ConfigError> {
    for origin in &origins {
        if origin == "*" {
            continue;
        }
        let ok = url::Url::parse(origin)
            .map(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.path() == "/"
                    && !origin.ends_with('/')
            })
            .unwrap_or(false);
        if !ok {
            return Err(invalid(
                name_of(values, key),
                format!("`{origin}` is not an origin like https://app.example.com"),
            ));
        }
    }
    Ok(origins)
}

fn sqlite_url_for(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn parse_database_url(name: &str, raw: &str) -> Result<DatabaseConfig, ConfigError> {
    let scheme = raw.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "sqlite" => Ok(DatabaseConfig::Sqlite {
            url: raw.to_owned().into(),
        }),
        "postgres" | "postgresql" => {
            url::Url::parse(raw).map_err(|e| invalid(name, e))?;
            Ok(DatabaseConfig::Postgres {
                url: raw.to_owned().into(),
            })
        }
        _ => Err(invalid(
            name,
            "scheme must be sqlite:// or postgres:// (the value is not shown; it may hold a password)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(None, &env(pairs))
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load(&[]).expect("defaults load");
        assert_eq!(c.listen, "127.0.0.1:8000".parse().expect("addr"));
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.database.backend(), "sqlite");
        assert_eq!(c.database.redacted_url(), "sqlite://./data/blockremote.db");
        assert!(c.redis_url.is_none());
        assert!(c.admin_token.is_none());
        assert!(c.webhook_secrets.is_empty());
        assert!(c.allowed_origins.is_empty());
        assert!(c.trusted_proxies.is_empty());
        assert!(c.attestation_test_secret.is_none());
        assert_eq!(c.issuer, "blockremote");
        assert_eq!(c.audience, "blockremote-mobile");
        assert!(c.auto_migrate);
        assert!(c.hsts_max_age.is_none());
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("blockremote.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9000\"\nissuer = \"from-file\"\nallowed_origins = [\"https://a.example\", \"https://b.example\"]\nhsts_max_age_seconds = 600\n",
        )
        .expect("write");
        let c = Config::from_sources(Some(&file), &env(&[("BLOCKREMOTE_ISSUER", "from-env")]))
            .expect("load");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.issuer, "from-env");
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.hsts_max_age, Some(Duration::from_secs(600)));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"x\"\n").expect("write");
        let err = Config::from_sources(Some(&file), &env(&[])).expect_err("must fail");
        assert!(err.to_string().contains("unknown key `lisen`"), "{err}");
    }

    #[test]
    fn comma_lists_and_cidrs_parse() {
        let c = load(&[
            ("BLOCKREMOTE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,::1"),
            ("BLOCKREMOTE_WEBHOOK_SECRETS", "whsec_a,plain-secret"),
            ("REDIS_URL", "redis://127.0.0.1:6379/3"),
            ("DATABASE_URL", "postgres://u:hunter2@db:5432/br"),
        ])
        .expect("load");
        assert_eq!(c.trusted_proxies.len(), 3);
        assert_eq!(c.webhook_secrets.len(), 2);
        assert!(c.redis_url.is_some());
        assert_eq!(c.database.backend(), "postgres");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (pairs, needle) in [
            (vec![("BLOCKREMOTE_LISTEN", "nope")], "BLOCKREMOTE_LISTEN"),
            (vec![("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            (vec![("REDIS_URL", "http://x")], "REDIS_URL"),
            (
                vec![("BLOCKREMOTE_TRUSTED_PROXIES", "10.0.0.0/99")],
                "BLOCKREMOTE_TRUSTED_PROXIES",
            ),
            (
                vec![("BLOCKREMOTE_AUTO_MIGRATE", "perhaps")],
                "BLOCKREMOTE_AUTO_MIGRATE",
            ),
            (
                vec![("BLOCKREMOTE_ALLOWED_ORIGINS", "app.example.com")],
                "BLOCKREMOTE_ALLOWED_ORIGINS",
            ),
            (
                vec![("BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS", "30")],
                "BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS",
            ),
            (
                vec![("BLOCKREMOTE_ADMIN_TOKEN", "short")],
                "BLOCKREMOTE_ADMIN_TOKEN",
            ),
            (vec![("BLOCKREMOTE_ISSUER", "")], "BLOCKREMOTE_ISSUER"),
        ] {
            let err = load(&pairs).expect_err("must fail");
            assert!(err.to_string().starts_with(needle), "{err}");
        }
    }

    #[test]
    fn secrets_never_appear_in_debug_or_errors() {
        let c = load(&[
            ("DATABASE_URL", "postgres://u:hunter2@db:5432/br"),
            ("REDIS_URL", "redis://:redispass@cache:6379"),
            (
                "BLOCKREMOTE_ADMIN_TOKEN",
                "admin-secret-admin-secret-admin-secret",
            ),
            ("BLOCKREMOTE_WEBHOOK_SECRETS", "whsec_topsecret"),
            ("BLOCKREMOTE_ATTESTATION_TEST_SECRET", "attest-secret"),
        ])
        .expect("load");
        let printed = format!("{c:?}");
        for secret in [
            "hunter2",
            "redispass",
            "admin-secret",
            "topsecret",
            "attest-secret",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        let err = load(&[("DATABASE_URL", "mysql://u:hunter2@db")]).expect_err("bad scheme");
        assert!(!err.to_string().contains("hunter2"));
    }

    /// Today's wording and bounds, pinned before the settings were declared in one place.
    #[test]
    fn out_of_range_values_are_refused_with_their_bounds() {
        for (var, raw, message) in [
            (
                "BLOCKREMOTE_ACCESS_TOKEN_TTL_SECONDS",
                "59",
                "must be between 60 and 86400",
            ),
            (
                "BLOCKREMOTE_ACCESS_TOKEN_TTL_SECONDS",
                "86401",
                "must be between 60 and 86400",
            ),
            (
                "BLOCKREMOTE_ATTESTATION_NONCE_TTL_SECONDS",
                "119",
                "must be between 120 and 300",
            ),
            (
                "BLOCKREMOTE_ATTESTATION_NONCE_TTL_SECONDS",
                "301",
                "must be between 120 and 300",
            ),
            (
                "BLOCKREMOTE_KEY_RELOAD_SECONDS",
                "0",
                "must be between 1 and 60",
            ),
            (
                "BLOCKREMOTE_KEY_RELOAD_SECONDS",
                "61",
                "must be between 1 and 60",
            ),
            (
                "BLOCKREMOTE_EVENT_RETENTION_DAYS",
                "0",
                "must be within 1–3650 days",
            ),
            (
                "BLOCKREMOTE_EVENT_RETENTION_DAYS",
                "3651",
                "must be within 1–3650 days",
            ),
            (
                "BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS",
                "10",
                "must be at most 9 (SIGTERM must exit within 10 s)",
            ),
            ("BLOCKREMOTE_QUEUE_CAPACITY", "0", "must be at least 1"),
            (
                "BLOCKREMOTE_DATABASE_MAX_CONNECTIONS",
                "0",
                "must be at least 1",
            ),
            (
                "BLOCKREMOTE_REFRESH_PER_MINUTE",
                "x",
                "`x` is not a valid number: invalid digit found in string",
            ),
            (
                "BLOCKREMOTE_ATTESTATION_MAX_FAILURES",
                "5000000000",
                "`5000000000` is not a valid number: number too large to fit in target type",
            ),
            (
                "BLOCKREMOTE_LOG_FORMAT",
                "xml",
                "must be `json` or `pretty`",
            ),
            (
                "BLOCKREMOTE_JWT_ALGORITHM",
                "HS256",
                "must be ES256 or RS256",
            ),
            (
                "BLOCKREMOTE_REDIS_PREFIX",
                "a b",
                "must not contain braces or spaces",
            ),
            ("BLOCKREMOTE_AUDIENCE", "", "must not be empty"),
        ] {
            let err = load(&[(var, raw)]).expect_err(var);
            assert_eq!(err.to_string(), format!("{var}: {message}"));
        }
    }

    #[test]
    fn file_values_are_blamed_on_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "key_reload_seconds = 0\n").expect("write");
        let err = Config::from_sources(Some(&file), &env(&[])).expect_err("must fail");
        assert_eq!(
            err.to_string(),
            "key_reload_seconds (config file): must be between 1 and 60"
        );
    }

    #[test]
    fn bounds_are_inclusive_and_zero_rates_and_timeouts_mean_the_least() {
        let c = load(&[
            ("BLOCKREMOTE_ACCESS_TOKEN_TTL_SECONDS", "86400"),
            ("BLOCKREMOTE_ATTESTATION_NONCE_TTL_SECONDS", "120"),
            ("BLOCKREMOTE_KEY_RELOAD_SECONDS", "60"),
            ("BLOCKREMOTE_EVENT_RETENTION_DAYS", "3650"),
            ("BLOCKREMOTE_SHUTDOWN_GRACE_SECONDS", "0"),
            ("BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS", "0"),
            ("BLOCKREMOTE_REQUEST_TIMEOUT_SECONDS", "0"),
            ("BLOCKREMOTE_ATTESTATION_MAX_FAILURES", "0"),
            ("BLOCKREMOTE_REFRESH_PER_MINUTE", "0"),
            ("BLOCKREMOTE_WS_HANDSHAKES_PER_MINUTE", "0"),
            ("BLOCKREMOTE_WS_MAX_CONNECTIONS", "0"),
            ("BLOCKREMOTE_HSTS_MAX_AGE_SECONDS", " 600 "),
            ("BLOCKREMOTE_LOG_FORMAT", "PRETTY"),
        ])
        .expect("load");
        assert_eq!(c.access_token_ttl, Duration::from_secs(86_400));
        assert_eq!(c.attestation_nonce_ttl, Duration::from_secs(120));
        assert_eq!(c.key_reload_interval, Duration::from_secs(60));
        assert_eq!(c.event_retention, Duration::from_secs(3650 * 86_400));
        assert_eq!(c.shutdown_grace, Duration::ZERO);
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.request_timeout, Duration::from_secs(1));
        assert_eq!(c.attestation_max_failures, 1);
        assert_eq!(c.refresh_per_minute, 1);
        assert_eq!(c.ws_handshakes_per_minute, 1);
        assert_eq!(c.ws_max_connections, 0);
        assert_eq!(c.hsts_max_age, Some(Duration::from_secs(600)));
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn numeric_defaults_match_the_readme() {
        let c = load(&[]).expect("defaults load");
        assert_eq!(c.database_max_connections, 16);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(8));
        assert_eq!(c.queue_capacity, 100_000);
        assert_eq!(c.event_retention, Duration::from_secs(90 * 86_400));
        assert_eq!(c.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.key_reload_interval, Duration::from_secs(30));
        assert_eq!(c.attestation_nonce_ttl, Duration::from_secs(180));
        assert_eq!(c.attestation_max_failures, 3);
        assert_eq!(c.refresh_per_minute, 10);
        assert_eq!(c.ws_max_connections, 100_000);
        assert_eq!(c.ws_handshakes_per_minute, 60);
        assert_eq!(c.redis_prefix, "");
    }

    #[test]
    fn empty_values_mean_unset_where_unset_means_something() {
        let c = load(&[
            ("REDIS_URL", ""),
            ("BLOCKREMOTE_ADMIN_TOKEN", ""),
            ("BLOCKREMOTE_ATTESTATION_TEST_SECRET", ""),
            ("BLOCKREMOTE_JWT_PRIVATE_KEY", ""),
            ("BLOCKREMOTE_JWT_PRIVATE_KEY_FILE", ""),
        ])
        .expect("load");
        assert!(c.redis_url.is_none());
        assert!(c.admin_token.is_none());
        assert!(c.attestation_test_secret.is_none());
        assert!(c.jwt_private_key.is_none());
        let err = load(&[("DATABASE_URL", "")]).expect_err("empty database url");
        assert!(
            err.to_string().starts_with("DATABASE_URL: scheme must be"),
            "{err}"
        );
        let err = load(&[("BLOCKREMOTE_JWT_PRIVATE_KEY_FILE", "/nonexistent/key.pem")])
            .expect_err("missing pem file");
        assert!(
            err.to_string()
                .starts_with("BLOCKREMOTE_JWT_PRIVATE_KEY_FILE: cannot read /nonexistent/key.pem"),
            "{err}"
        );
    }

    #[test]
    fn redis_urls_print_redacted() {
        let c = load(&[("REDIS_URL", "redis://:redispass@cache:6379")]).expect("load");
        assert!(format!("{c:?}").contains("redis://:***@cache:6379"));
    }
}
