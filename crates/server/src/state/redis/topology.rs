//! Where Redis is and how to reach it: the `REDIS_URL` forms of API.md
//! ("Redis topologies") turned into clients of the `redis` crate.
//!
//! | form | topology | what follows changes |
//! |---|---|---|
//! | `redis://h:p/db`, `rediss://…` | one node (TLS with `rediss`) | [`ConnectionManager`] reconnects |
//! | `redis+sentinel://h:p,h:p/master[/db]`, `rediss+sentinel://…` | a primary watched by sentinels | the sentinels are asked again after a connection error |
//! | `redis+cluster://h:p,h:p`, `rediss+cluster://…` | Redis Cluster, from seed nodes | the crate's cluster client (MOVED / ASK, slot refresh) |
//!
//! No topology logic is written here: discovery, failover and slot routing
//! are the crate's. What is ours is the mapping from one URL to the right
//! client, the TLS files (`BLOCKREMOTE_REDIS_CA_FILE`, `_CLIENT_CERT_FILE`,
//! `_CLIENT_KEY_FILE`) and, for Sentinel, when to forget the primary: an
//! I/O error, a refused connection, a timeout, or a `READONLY` reply (the
//! old primary came back as a replica).

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

/// Default port of a sentinel, when a `redis+sentinel` host gives none.
const SENTINEL_PORT: u16 = 26379;
/// Default port of a Redis node.
const REDIS_PORT: u16 = 6379;

/// TLS files for the `rediss` forms: a CA to trust instead of the system's
/// roots, and a client certificate for servers that require one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA bundle (`BLOCKREMOTE_REDIS_CA_FILE`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate (`BLOCKREMOTE_REDIS_CLIENT_CERT_FILE`).
    pub client_cert: Option<PathBuf>,
    /// PEM client key (`BLOCKREMOTE_REDIS_CLIENT_KEY_FILE`).
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }

    /// Reads the files; `None` when none is configured (the system's roots).
    fn load(&self) -> Result<Option<TlsCertificates>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            (None, None) => None,
            _ => return Err("a client certificate needs both its certificate and its key".into()),
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert: self.ca.as_ref().map(read).transpose()?,
        }))
    }
}

/// A parsed `REDIS_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One node: the URL as the crate reads it.
    Node {
        /// `redis://…` or `rediss://…`.
        url: String,
    },
    /// A primary found through sentinels.
    Sentinel {
        /// The sentinels, `host:port`.
        sentinels: Vec<(String, u16)>,
        /// The monitored primary's name.
        master: String,
        /// The primary's database number.
        db: i64,
        /// TLS to the sentinels and the data nodes.
        tls: bool,
        /// `user:password` as written in the URL (percent-encoded), if any.
        userinfo: Option<String>,
    },
    /// A Redis Cluster, from its seed nodes.
    Cluster {
        /// Seed nodes, `host:port`.
        nodes: Vec<(String, u16)>,
        /// TLS to every node.
        tls: bool,
        /// `user:password` as written in the URL (percent-encoded), if any.
        userinfo: Option<String>,
    },
}

impl fmt::Debug for Topology {
    // Never prints a password: only the shape and the hosts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node { url } => write!(f, "Node({})", crate::config::redact_url(url)),
            Self::Sentinel {
                sentinels,
                master,
                db,
                tls,
                ..
            } => write!(f, "Sentinel({sentinels:?}, {master}, db {db}, tls {tls})"),
            Self::Cluster { nodes, tls, .. } => write!(f, "Cluster({nodes:?}, tls {tls})"),
        }
    }
}

impl Topology {
    /// Parses one of the `REDIS_URL` forms; the error says what is wrong
    /// without repeating the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("must start with redis://, rediss://, redis+sentinel:// or redis+cluster://")?;
        match scheme {
            "redis" | "rediss" => {
                url.into_connection_info()
                    .map_err(|_| "not a valid redis:// or rediss:// URL")?;
                Ok(Self::Node { url: url.to_owned() })
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let (userinfo, hosts, path) = split_authority(rest)?;
                let mut parts = path.split('/').filter(|p| !p.is_empty());
                let master = parts
                    .next()
                    .ok_or("a sentinel URL names the primary: redis+sentinel://h:p,h:p/<master-name>")?
                    .to_owned();
                let db = match parts.next() {
                    None => 0,
                    Some(db) => db.parse().map_err(|_| "the database must be a number")?,
                };
                if parts.next().is_some() {
                    return Err("a sentinel URL's path is /<master-name>[/<db>]".into());
                }
                Ok(Self::Sentinel {
                    sentinels: parse_hosts(hosts, SENTINEL_PORT)?,
                    master,
                    db,
                    tls: scheme == "rediss+sentinel",
                    userinfo,
                })
            }
            "redis+cluster" | "rediss+cluster" => {
                let (userinfo, hosts, path) = split_authority(rest)?;
                if !path.is_empty() {
                    return Err("a cluster URL has no path (a cluster has only database 0)".into());
                }
                Ok(Self::Cluster {
                    nodes: parse_hosts(hosts, REDIS_PORT)?,
                    tls: scheme == "rediss+cluster",
                    userinfo,
                })
            }
            _ => Err(
                "scheme must be redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster or rediss+cluster"
                    .into(),
            ),
        }
    }

    /// Whether keys of different hash slots must never meet in one script or pipeline.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// The URL of one node, with the credentials and database of the original.
    fn node_url(
        tls: bool,
        userinfo: Option<&str>,
        (host, port): &(String, u16),
        db: i64,
    ) -> String {
        let scheme = if tls { "rediss" } else { "redis" };
        let at = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        format!("{scheme}://{at}{host}:{port}/{db}")
    }
}

/// `[userinfo@]hosts[/path]` → (userinfo, hosts, path without its slash).
fn split_authority(rest: &str) -> Result<(Option<String>, &str, &str), String> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user.to_owned()), hosts),
        None => (None, authority),
    };
    if hosts.is_empty() {
        return Err("names no host".into());
    }
    Ok((userinfo, hosts, path.trim_end_matches('/')))
}

/// `host:port,host:port` (IPv6 in brackets; the port may be left out).
fn parse_hosts(hosts: &str, default_port: u16) -> Result<Vec<(String, u16)>, String> {
    hosts
        .split(',')
        .map(|h| {
            let h = h.trim();
            let (host, port) = if let Some(v6) = h.strip_prefix('[') {
                let (host, after) = v6.split_once(']').ok_or("an IPv6 host lacks its ]")?;
                (host, after.strip_prefix(':'))
            } else {
                match h.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (h, None),
                }
            };
            if host.is_empty() {
                return Err("an empty host".to_owned());
            }
            let port = match port {
                None => default_port,
                Some(p) => p
                    .parse()
                    .map_err(|_| format!("port {p:?} is not a number"))?,
            };
            Ok((host.to_owned(), port))
        })
        .collect()
}

/// Builds the connections one topology needs.
#[derive(Clone)]
pub struct Connector {
    topology: Topology,
    certs: Option<TlsCertificates>,
    connect_timeout: Duration,
}

impl Connector {
    /// Reads the TLS files; the topology is connected to later.
    pub fn new(
        topology: Topology,
        tls: &TlsFiles,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        Ok(Self {
            topology,
            certs: tls.load()?,
            connect_timeout,
        })
    }

    /// A client of one node URL, with the TLS files when there are any.
    fn client(&self, url: &str) -> RedisResult<Client> {
        match &self.certs {
            Some(certs) => Client::build_with_tls(url, certs.clone()),
            None => Client::open(url),
        }
    }

    fn sentinel_client(&self) -> RedisResult<SentinelClient> {
        let Topology::Sentinel {
            sentinels,
            master,
            db,
            tls,
            userinfo,
        } = &self.topology
        else {
            unreachable!("sentinel_client on another topology")
        };
        // The credentials, decoded the way the crate decodes any URL's.
        let info = Topology::node_url(false, userinfo.as_deref(), &("x".into(), 1), *db)
            .into_connection_info()?
            .redis;
        let addrs = sentinels
            .iter()
            .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port));
        let mut builder =
            SentinelClientBuilder::new(addrs, master.clone(), SentinelServerType::Master)?
                .set_client_to_redis_db(info.db);
        if let Some(user) = info.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = info.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if *tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = &self.certs {
                builder = builder
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs.clone());
            }
        }
        builder.build()
    }

    fn cluster_builder(&self, response_timeout: Duration) -> ClusterClientBuilder {
        let Topology::Cluster {
            nodes,
            tls,
            userinfo,
        } = &self.topology
        else {
            unreachable!("cluster_builder on another topology")
        };
        let urls: Vec<String> = nodes
            .iter()
            .map(|n| Topology::node_url(*tls, userinfo.as_deref(), n, 0))
            .collect();
        let mut builder = ClusterClientBuilder::new(urls)
            .connection_timeout(self.connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(certs) = &self.certs {
            builder = builder.certs(certs.clone());
        }
        builder
    }

    /// The multiplexed connection ordinary commands share.
    pub async fn shared(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match &self.topology {
            Topology::Node { url } => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(1);
                let manager = ConnectionManager::new_with_config(self.client(url)?, config).await?;
                Ok(Conn::Manager(manager))
            }
            Topology::Sentinel { .. } => self.sentinel_conn(response_timeout).await,
            Topology::Cluster { .. } => self.cluster_conn(response_timeout).await,
        }
    }

    /// A connection of its own, for a consumer whose blocking read would
    /// hold a shared one.
    pub async fn dedicated(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match &self.topology {
            Topology::Node { url } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_response_timeout(response_timeout);
                Ok(Conn::Plain(
                    self.client(url)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Topology::Sentinel { .. } => self.sentinel_conn(response_timeout).await,
            Topology::Cluster { .. } => self.cluster_conn(response_timeout).await,
        }
    }

    /// A cluster connection of its own (connections to every node).
    async fn cluster_conn(&self, response_timeout: Duration) -> RedisResult<Conn> {
        let client = self.cluster_builder(response_timeout).build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    }

    async fn sentinel_conn(&self, response_timeout: Duration) -> RedisResult<Conn> {
        let conn = SentinelConn {
            sentinel: tokio::sync::Mutex::new(self.sentinel_client()?),
            primary: RwLock::new(None),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(self.connect_timeout)
                .set_response_timeout(response_timeout),
        };
        // Reach the primary now, so a wrong URL fails at start.
        conn.primary().await?;
        let conn = Arc::new(conn);
        tokio::spawn(watch_failovers(Arc::downgrade(&conn)));
        Ok(Conn::Sentinel(conn))
    }

    /// A client for a pub/sub connection; `attempt` rotates through a
    /// cluster's seed nodes (a cluster delivers `PUBLISH` to every node, so
    /// any one will do).
    pub async fn pubsub_client(&self, attempt: usize) -> RedisResult<Client> {
        match &self.topology {
            Topology::Node { url } => self.client(url),
            Topology::Sentinel { .. } => self.sentinel_client()?.async_get_client().await,
            Topology::Cluster {
                nodes,
                tls,
                userinfo,
            } => {
                let node = &nodes[attempt % nodes.len()];
                self.client(&Topology::node_url(*tls, userinfo.as_deref(), node, 0))
            }
        }
    }
}

/// One connection, whatever the topology; cheap to clone (each shares its
/// multiplexed connection).
#[derive(Clone)]
pub enum Conn {
    /// One node, reconnecting by itself.
    Manager(ConnectionManager),
    /// One node, for a consumer (reopened by its owner after an error).
    Plain(MultiplexedConnection),
    /// The sentinels' current primary.
    Sentinel(Arc<SentinelConn>),
    /// A cluster.
    Cluster(ClusterConnection),
}

/// Whether an error says the connection itself failed (not the command).
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.code(),
            Some("READONLY" | "MASTERDOWN" | "LOADING" | "CLUSTERDOWN" | "TRYAGAIN")
        )
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Plain(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let mut conn = s.primary().await?;
                    let reply = conn.req_packed_command(cmd).await;
                    s.forget_on_failure(&reply);
                    reply
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Self::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let mut conn = s.primary().await?;
                    let reply = conn.req_packed_commands(cmd, offset, count).await;
                    s.forget_on_failure(&reply);
                    reply
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Plain(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

/// Forgets the primary whenever the sentinels announce a new one
/// (`+switch-master`): after a planned failover the old primary keeps
/// accepting writes until it is demoted, and those writes would be lost.
/// Ends when the connection is dropped.
async fn watch_failovers(conn: std::sync::Weak<SentinelConn>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let this = conn.upgrade()?;
            let client = this.sentinel.lock().await.async_get_sentinel_client().await;
            drop(this);
            let mut pubsub = client.ok()?.get_async_pubsub().await.ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub.into_on_message())
        }
        .await;
        if let Some(mut announcements) = subscribed {
            backoff = Duration::from_millis(100);
            // Missed while not listening? Ask again.
            match conn.upgrade() {
                Some(this) => this.forget(),
                None => return,
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(1), announcements.next()).await {
                    Ok(Some(_)) => match conn.upgrade() {
                        Some(this) => {
                            tracing::warn!("the sentinels switched the Redis primary");
                            this.forget();
                        }
                        None => return,
                    },
                    Ok(None) => break,
                    Err(_) if conn.strong_count() == 0 => return,
                    Err(_) => {}
                }
            }
        }
        if conn.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The primary the sentinels name, asked again after a connection failure.
pub struct SentinelConn {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    primary: RwLock<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
}

impl SentinelConn {
    /// The current primary's connection, asking the sentinels if there is none.
    async fn primary(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another caller may have found it while this one waited.
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *self.primary.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.primary
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn forget(&self) {
        *self.primary.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn forget_on_failure<T>(&self, reply: &RedisResult<T>) {
        if let Err(e) = reply {
            if is_connection_error(e) {
                tracing::warn!(error = %e, "Redis primary lost; asking the sentinels again");
                self.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_form_parses_into_its_topology() {
        assert_eq!(
            Topology::parse("redis://127.0.0.1:6379/3").expect("parses"),
            Topology::Node {
                url: "redis://127.0.0.1:6379/3".into()
            }
        );
        assert!(matches!(
            Topology::parse("rediss://:pw@cache:6380").expect("parses"),
            Topology::Node { .. }
        ));
        assert_eq!(
            Topology::parse("redis+sentinel://:p%40ss@s1:26379,s2,[::1]:26380/mymaster/2")
                .expect("parses"),
            Topology::Sentinel {
                sentinels: vec![
                    ("s1".into(), 26379),
                    ("s2".into(), SENTINEL_PORT),
                    ("::1".into(), 26380)
                ],
                master: "mymaster".into(),
                db: 2,
                tls: false,
                userinfo: Some(":p%40ss".into()),
            }
        );
        assert_eq!(
            Topology::parse("rediss+cluster://a:7000,b:7001").expect("parses"),
            Topology::Cluster {
                nodes: vec![("a".into(), 7000), ("b".into(), 7001)],
                tls: true,
                userinfo: None,
            }
        );
        assert!(Topology::parse("redis+cluster://a:7000")
            .expect("parses")
            .is_cluster());
    }

    #[test]
    fn malformed_urls_are_refused_without_echoing_a_password() {
        for bad in [
            "http://cache:6379",
            "cache:6379",
            "redis+sentinel://:secretpw@s1:26379",
            "redis+sentinel://s1:26379/m/notanumber",
            "redis+cluster://:secretpw@a:70000",
            "redis+cluster://a:7000/0",
            "redis+cluster://",
            "redis+cluster://a:7000,,b:7001",
        ] {
            let err = Topology::parse(bad).expect_err(bad);
            assert!(!err.contains("secretpw"), "{bad}: {err}");
        }
    }

    #[test]
    fn debug_never_prints_the_password() {
        for url in [
            "redis://:secretpw@cache:6379",
            "redis+sentinel://:secretpw@s1/m",
            "redis+cluster://u:secretpw@a:7000",
        ] {
            let printed = format!("{:?}", Topology::parse(url).expect("parses"));
            assert!(!printed.contains("secretpw"), "{printed}");
        }
    }

    #[test]
    fn node_urls_keep_credentials_brackets_and_database() {
        assert_eq!(
            Topology::node_url(true, Some("u:p%40"), &("::1".into(), 7000), 0),
            "rediss://u:p%40@[::1]:7000/0"
        );
        let info = Topology::node_url(false, Some(":p%40ss"), &("h".into(), 1), 4)
            .into_connection_info()
            .expect("parses");
        assert_eq!(info.redis.password.as_deref(), Some("p@ss"));
        assert_eq!(info.redis.db, 4);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let files = TlsFiles {
            client_cert: Some("/dev/null".into()),
            ..TlsFiles::default()
        };
        assert!(files.load().is_err());
        assert!(TlsFiles::default().load().expect("parses").is_none());
    }
}
