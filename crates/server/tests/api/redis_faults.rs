//! Redis faults, injected into real servers this binary starts and stops:
//! a hung node (SIGSTOP), a TLS node that requires client certificates, a
//! Sentinel primary that fails over or dies. Each test owns its Redis, so
//! breaking it never disturbs the tests sharing the standing topologies.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use blockremote::state::{BreakerState, RedisOptions, RedisState, SharedState, TlsFiles};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    eventually, heartbeat_body, production_urls, topology_url, Backend, Backing, TestRedis,
};

/// A `redis-server` of this test's own on a free loopback port, killed on drop.
pub struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "redis-server on {port} did not start");
        Self { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the process: connections stay open and nothing answers —
    /// the worst failure, the one only a timeout notices.
    pub fn hang(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let done = Command::new("kill")
            .args([which, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(done.success());
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.resume_quietly();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateRedis {
    fn resume_quietly(&self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
    }
}

/// Points `backing` at `redis` under a prefix of its own, with calls
/// bounded by 200 ms (a hang costs that, then the breaker answers).
fn on_private_redis(backing: &mut Backing, redis: &PrivateRedis) -> TestRedis {
    let private = TestRedis::new(&redis.url());
    backing.config.redis_url = Some(private.url.clone().into());
    backing.config.redis_prefix = private.prefix.clone();
    backing.config.redis_call_timeout = Duration::from_millis(200);
    private
}

fn options(url: &str) -> RedisOptions {
    let mut options = RedisOptions::new(url, "faults:", 100, Duration::from_secs(2));
    options.call_timeout = Duration::from_millis(200);
    options
}

/// Skips (or fails under CI) when the production backends are not configured,
/// as every production test does.
fn production_configured() -> bool {
    production_urls().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_one_timeout_per_call_until_the_breaker_opens_then_microseconds() {
    if !production_configured() {
        return;
    }
    let redis = PrivateRedis::start();
    let state = RedisState::connect_with(options(&redis.url()))
        .await
        .expect("connect");
    state.ping().await.expect("ping");
    redis.hang();
    // Each of the first calls waits its timeout (200 ms), never the old 3 s.
    let started = Instant::now();
    let mut failures = 0;
    while state.breaker_state() == Some(BreakerState::Closed) {
        assert!(state.get("k").await.is_err(), "a hung Redis answered");
        failures += 1;
        assert!(
            failures <= 5,
            "the breaker did not open after {failures} failures"
        );
    }
    let to_open = started.elapsed();
    assert!(
        to_open < Duration::from_millis(5 * 200 + 500),
        "{to_open:?} to open"
    );
    // Open: a call fails at once.
    let started = Instant::now();
    for _ in 0..100 {
        assert!(state.get("k").await.is_err());
    }
    let per_call = started.elapsed() / 100;
    assert!(
        per_call < Duration::from_millis(5),
        "{per_call:?} per call while open"
    );
    // Rate limits hold, on this instance's own bucket.
    let before = state.fallback_takes();
    let mut allowed = 0;
    for _ in 0..5 {
        let d = state
            .take_tokens("rl:{fallback}", 3, Duration::from_secs(60), 1)
            .await
            .expect("a fallback decision, not an error");
        allowed += u32::from(d.allowed);
    }
    assert_eq!(allowed, 3, "the local bucket enforces the capacity");
    assert_eq!(state.fallback_takes() - before, 5);
    // Back: the half-open probe closes it again, by itself.
    redis.resume();
    assert!(
        eventually(Duration::from_secs(15), || async {
            state.ping().await.is_ok()
        })
        .await,
        "recovered"
    );
    assert_eq!(state.breaker_state(), Some(BreakerState::Closed));
    state
        .set("k", b"v", None)
        .await
        .expect("set after recovery");
}

/// While Redis hangs, a device's trust report is the last one this
/// instance read, marked `degraded` (on the old code: 503); a device it
/// never read gets 503 with `Retry-After`, never a made-up score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_hangs_the_trust_report_is_the_last_known_one_marked_degraded() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let redis = PrivateRedis::start();
    let private = on_private_redis(&mut backing, &redis);
    let app = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("builds");
    let app = crate::helpers::WithWorkers::start(crate::helpers::start(app, backing)).await;
    let d = app.register("known@example.com", "device_known_01").await;
    let other = app.register("unread@example.com", "device_unread_1").await;
    let s = blockremote_engine::sim::session(blockremote_engine::sim::Class::HeldInHand, 2, 2);
    // Its own window: the same one from two devices would be a replay.
    let t = blockremote_engine::sim::session(blockremote_engine::sim::Class::HeldInHand, 3, 2);
    for (device, hb) in [(&d, &s.heartbeats[0]), (&other, &t.heartbeats[0])] {
        let r = app.heartbeat(device, &heartbeat_body(hb)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let seq = s.heartbeats[0].seq;
    let report = |device: &crate::client::Session| {
        let app = &app;
        let device = device.clone();
        async move {
            let r = app.device_get("/v1/security/trust-score", &device).await;
            let status = r.status();
            let retry_after = r.headers().contains_key("retry-after");
            (status, retry_after, r.json::<Value>().await.expect("json"))
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            report(&d).await.2["last_seq"].as_u64() >= Some(seq)
        })
        .await,
        "scored"
    );
    let (_, _, known) = report(&d).await;
    assert_eq!(known["degraded"], false, "{known}");

    redis.hang();
    let (status, _, served) = report(&d).await;
    assert_eq!(status, StatusCode::OK, "{served}");
    assert_eq!(served["degraded"], true, "{served}");
    assert_eq!(served["last_seq"], known["last_seq"], "{served}");
    assert_eq!(served["trust_score"], known["trust_score"], "{served}");
    let (status, retry_after, problem) = report(&other).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert!(retry_after, "Retry-After");

    redis.resume();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, _, body) = report(&d).await;
            status == StatusCode::OK && body["degraded"] == false
        })
        .await,
        "the stored report again once Redis is back"
    );
    drop(private);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_hangs_the_api_answers_503_with_retry_after_and_is_not_ready_then_recovers() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let redis = PrivateRedis::start();
    let private = on_private_redis(&mut backing, &redis);
    backing.config.admin_token = Some("hung-admin-key-0123456789abcdef0123456".to_owned().into());
    let app = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("builds");
    let app = crate::helpers::start(app, backing);
    let d = app.register("hung@example.com", "device_hung_01").await;
    let watched = app
        .register("hung-watched@example.com", "device_hung_02")
        .await;
    let mut socket = app.kill_switch(&watched).await;
    assert_eq!(crate::client::next_json(&mut socket).await["type"], "state");
    // The same phone also holds a socket on another instance.
    let other = crate::helpers::second_instance(&app).await;
    let mut elsewhere = other.kill_switch(&watched).await;
    assert_eq!(
        crate::client::next_json(&mut elsewhere).await["type"],
        "state"
    );
    let s = blockremote_engine::sim::session(blockremote_engine::sim::Class::HeldInHand, 1, 3);
    let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[0])).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    redis.hang();
    // Never a 202 for a heartbeat that is not queued, never a 500, never a hang.
    for _ in 0..8 {
        let started = Instant::now();
        let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[1])).await;
        let took = started.elapsed();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"), "Retry-After");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let problem: Value = r.json().await.expect("problem");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| !d.contains("redis") && !d.contains("Redis")),
            "nothing internal: {problem}"
        );
    }
    // A lock while Redis hangs: durable, and this instance's sockets of the
    // device close at once with 4003; the operator is asked to retry.
    let lock = |device: String| {
        let app = &app;
        async move {
            app.admin(
                reqwest::Method::POST,
                &format!("/v1/admin/devices/{device}/lock"),
                Some(&serde_json::json!({"action": "CRITICAL_LOCK", "reason": "fraud_team"})),
            )
            .await
            .status()
        }
    };
    assert_eq!(
        lock(watched.device_id.clone()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(3), socket.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let code: u16 = closed.expect("a close frame").code.into();
    assert_eq!(code, 4003);
    let held = app
        .state
        .store
        .device(&watched.device_id)
        .await
        .expect("store")
        .expect("device");
    assert_eq!(
        held.status,
        blockremote::store::DeviceStatus::Locked,
        "the hold is in the store"
    );
    // The breaker says so on /metrics: open (2) or probing (1), never closed.
    let metrics = app.metrics().await;
    let breaker: u32 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("redis_breaker_state "))
        .and_then(|v| v.trim().parse().ok())
        .expect("redis_breaker_state");
    assert!(breaker >= 1, "breaker state {breaker}");
    let ready = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let checks: Value = ready.json().await.expect("json");
    assert_eq!(checks["checks"]["cache"], "unavailable", "{checks}");

    redis.resume();
    let resumed = Instant::now();
    // The retry of a refused heartbeat is taken (202) — or, if a call that
    // timed out here still ran once Redis woke up, it is already queued and
    // the retry is told so (409 with last_seq at or above its seq): scored
    // once either way, never lost.
    let seq = s.heartbeats[1].seq;
    assert!(
        eventually(Duration::from_secs(20), || async {
            let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[1])).await;
            match r.status() {
                StatusCode::ACCEPTED => true,
                StatusCode::CONFLICT => {
                    let body: Value = r.json().await.expect("json");
                    body["last_seq"].as_u64() >= Some(seq)
                }
                StatusCode::SERVICE_UNAVAILABLE => false,
                other => panic!("{other} after Redis resumed"),
            }
        })
        .await,
        "ingestion recovered"
    );
    eprintln!(
        "hung Redis: ingestion back {:?} after it resumed",
        resumed.elapsed()
    );
    let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[2])).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // The other instance's socket heard nothing while Redis hung; once it
    // is back the instance that took the lock publishes the disconnect,
    // and that socket closes with 4003 too (on the old code it stayed open).
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), elsewhere.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("the other instance's socket did not close: {other:?}"),
        }
    };
    let code: u16 = closed.expect("a close frame").code.into();
    assert_eq!(code, 4003, "closed as locked on the other instance");
    assert_eq!(app.state.hub.undelivered(), 0, "nothing left to publish");
    // The operator's retry gets the command.
    assert_eq!(lock(watched.device_id.clone()).await, StatusCode::OK);
    let ready = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), StatusCode::OK);
    drop(private);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_client_certificate() {
    let Some(url) = topology_url("TEST_REDIS_TLS_URL") else {
        return;
    };
    let dir = std::path::PathBuf::from(topology_url("TEST_REDIS_TLS_DIR").expect("the TLS dir"));
    let files = TlsFiles {
        ca: Some(dir.join("ca.crt")),
        client_cert: Some(dir.join("client.crt")),
        client_key: Some(dir.join("client.key")),
    };
    let mut with_cert = options(&url);
    with_cert.tls = files.clone();
    let state = RedisState::connect_with(with_cert)
        .await
        .expect("mutual TLS");
    state.set("tls:k", b"v", None).await.expect("set");
    assert_eq!(state.get("tls:k").await.expect("get"), Some(b"v".to_vec()));
    state.delete("tls:k").await.expect("delete");

    // The server requires a client certificate: without one, no connection.
    let mut without_cert = options(&url);
    without_cert.tls = TlsFiles {
        ca: files.ca.clone(),
        ..TlsFiles::default()
    };
    assert!(RedisState::connect_with(without_cert).await.is_err());
    // The system roots do not know the private CA: no connection either.
    let mut system_roots = options(&url);
    system_roots.tls = TlsFiles {
        ca: None,
        ..files.clone()
    };
    assert!(RedisState::connect_with(system_roots).await.is_err());
    // And plaintext to a TLS port is refused, not half-working.
    let plain = url.replacen("rediss://", "redis://", 1);
    assert!(RedisState::connect_with(options(&plain)).await.is_err());
}

/// A private copy of one of the test topologies (scripts/redis-topologies.sh:
/// `sentinel` — a primary, a replica and 3 sentinels — or `cluster` — 3
/// masters and 3 replicas), on ports from `base`, stopped on drop.
struct PrivateTopology {
    dir: std::path::PathBuf,
    base: u16,
}

impl PrivateTopology {
    /// Runs the topologies script on this copy's directory and ports.
    fn script(dir: &std::path::Path, base: u16, args: &[&str]) -> bool {
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/redis-topologies.sh"
        ))
        .args(args)
        .env("BLOCKREMOTE_TOPOLOGIES_DIR", dir)
        .env("BLOCKREMOTE_TOPOLOGIES_PORT", base.to_string())
        .stdout(Stdio::null())
        .status()
        .expect("the topologies script")
        .success()
    }

    fn start(which: &str, base: u16) -> Self {
        let dir =
            std::env::temp_dir().join(format!("blockremote-{which}-{}", uuid::Uuid::new_v4()));
        assert!(
            Self::script(&dir, base, &["start", which]),
            "private {which} started"
        );
        Self { dir, base }
    }

    fn sentinel_url(&self) -> String {
        let s = |i: u16| format!("127.0.0.1:{}", self.base + 20 + i);
        format!("redis+sentinel://{},{},{}/blockremote", s(0), s(1), s(2))
    }

    fn cluster_url(&self) -> String {
        let n = |i: u16| format!("127.0.0.1:{}", self.base + i);
        format!("redis+cluster://{},{},{}", n(0), n(1), n(2))
    }

    /// The primary the sentinels name now.
    fn primary_port(&self) -> u16 {
        let out = Command::new("redis-cli")
            .args(["-p", &(self.base + 20).to_string()])
            .args(["sentinel", "get-master-addr-by-name", "blockremote"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .expect("the sentinels name a primary")
    }

    /// The counter `key` (under the test prefix) as the node on `port` holds it.
    fn count_on(&self, port: u16, key: &str) -> i64 {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "get", &format!("faults:{key}")])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// SIGKILL of the node on `port`: no goodbye to replicas or sentinels.
    fn crash(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("pid"))
            .expect("the node's pid file");
        let done = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(done.success());
    }

    /// Brings a killed node back (a sentinel-watched one empty, as a
    /// replica of the current primary).
    fn restart(&self, port: u16) {
        assert!(
            Self::script(&self.dir, self.base, &["restart", &port.to_string()]),
            "node {port} restarted"
        );
    }

    fn cli(&self, port: u16, args: &[&str]) {
        let _ = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PrivateTopology {
    fn drop(&mut self) {
        Self::script(&self.dir, self.base, &["stop"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_and_a_dead_primary_are_followed() {
    if !production_configured() || topology_url("TEST_REDIS_SENTINEL_URL").is_none() {
        return;
    }
    let sentinels = PrivateTopology::start("sentinel", 18100);
    let state = RedisState::connect_with(options(&sentinels.sentinel_url()))
        .await
        .expect("connect through the sentinels");
    assert_eq!(
        state
            .incr("n", 1, Duration::from_secs(60))
            .await
            .expect("incr"),
        1
    );

    // A planned failover: the old primary stays up as a replica and answers
    // writes with READONLY, which sends the client back to the sentinels.
    let first = sentinels.primary_port();
    sentinels.cli(
        sentinels.base + 20,
        &["sentinel", "failover", "blockremote"],
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            sentinels.primary_port() != first
        })
        .await,
        "the sentinels promoted the replica"
    );
    // Writes land on the new primary: the old one may still take writes
    // until it is demoted, and those would be lost.
    let second = sentinels.primary_port();
    assert!(
        eventually(Duration::from_secs(10), || async {
            state.incr("n", 1, Duration::from_secs(60)).await.is_ok()
                && sentinels.count_on(second, "n") >= 2
        })
        .await,
        "writes reach the promoted primary"
    );

    // A crash: the primary dies (SIGKILL); the sentinels notice (1 s) and
    // promote the replica, and the writes follow.
    let before = sentinels.count_on(second, "n");
    let killed = Instant::now();
    sentinels.crash(second);
    assert!(
        eventually(Duration::from_secs(30), || async {
            sentinels.primary_port() != second
                && state.incr("n", 1, Duration::from_secs(60)).await.is_ok()
        })
        .await,
        "writes resumed on the new primary"
    );
    eprintln!(
        "sentinel: writes resumed {:?} after the primary died",
        killed.elapsed()
    );
    let third = sentinels.primary_port();
    let after = sentinels.count_on(third, "n");
    // Replication is asynchronous: the last writes acknowledged before the
    // crash may be lost (a few, on loopback); the count never restarts.
    assert!(after > 0 && after + 5 >= before, "{after} after {before}");
}

/// What one device's phone saw.
#[derive(Default)]
struct PhoneLog {
    /// Seqs answered 202.
    accepted: Vec<u64>,
    /// Seqs retried after a 503 and then answered 409 with a `last_seq` at
    /// or above them: taken by an attempt whose answer was lost, or refused
    /// because the device's seq was refilled above them (after a failover
    /// lost it) — the phone cannot tell which.
    uncertain: Vec<u64>,
    statuses: std::collections::BTreeMap<u16, u32>,
    /// First 503 to the first 202 after it: how long ingestion was out.
    outage: Option<(Instant, Option<Instant>)>,
}

/// Sends `session`'s heartbeats to the two replicas in turn, a phone's way:
/// a 503 is retried with the same seq; a 409 moves the phone's numbering
/// above `last_seq` (the contract) and the window is dropped, not resent
/// (the same window again would be a replay).
async fn phone(
    apps: [&crate::helpers::TestApp; 2],
    d: &crate::client::Session,
    heartbeats: &[blockremote_engine::heartbeat::Heartbeat],
    until: Instant,
) -> PhoneLog {
    let mut log = PhoneLog::default();
    let mut i = 0;
    let mut offset = 0u64;
    for hb in heartbeats {
        if Instant::now() > until {
            break;
        }
        let mut hb = hb.clone();
        hb.seq += offset;
        let mut retried = false;
        loop {
            i += 1;
            let r = apps[i % 2].heartbeat(d, &heartbeat_body(&hb)).await;
            let status = r.status();
            *log.statuses.entry(status.as_u16()).or_default() += 1;
            match status {
                StatusCode::ACCEPTED => {
                    if let Some((_, end @ None)) = &mut log.outage {
                        *end = Some(Instant::now());
                    }
                    log.accepted.push(hb.seq);
                    break;
                }
                StatusCode::CONFLICT => {
                    let body: Value = r.json().await.expect("json");
                    let last = body["last_seq"].as_u64().expect("last_seq");
                    assert!(retried && last >= hb.seq, "a 409 for a fresh seq: {body}");
                    log.uncertain.push(hb.seq);
                    offset += last - hb.seq;
                    break;
                }
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                    if log.outage.is_none() && status == StatusCode::SERVICE_UNAVAILABLE {
                        log.outage = Some((Instant::now(), None));
                    }
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{other} under a failover"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_under_load_is_replaced_and_no_heartbeat_is_scored_twice() {
    if !production_configured() || topology_url("TEST_REDIS_CLUSTER_URL").is_none() {
        return;
    }
    let cluster = PrivateTopology::start("cluster", 18300);
    let url = cluster.cluster_url();
    failover_under_load("cluster failover", &cluster, &url, cluster.base).await;
}

/// The same under load through the sentinels: the primary is SIGKILLed,
/// the sentinels promote the replica, and the old primary comes back as a
/// replica of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_primary_killed_under_load_is_replaced_and_no_heartbeat_is_scored_twice() {
    if !production_configured() || topology_url("TEST_REDIS_SENTINEL_URL").is_none() {
        return;
    }
    let sentinels = PrivateTopology::start("sentinel", 18200);
    let url = sentinels.sentinel_url();
    let primary = sentinels.primary_port();
    failover_under_load("sentinel failover", &sentinels, &url, primary).await;
}

/// Steady heartbeat load from 6 phones through two API replicas and two
/// workers on the Redis at `url`; `topology`'s node `victim` is SIGKILLed
/// 3 s in and brought back 5 s after, with a lock taken meanwhile. Every
/// 202 is scored, nothing twice, only 2xx/409/429/503 answered, ingestion
/// back within 10 s, and the lock reaches the phone.
async fn failover_under_load(label: &str, topology: &PrivateTopology, url: &str, victim: u16) {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let private = TestRedis::new(url);
    backing.config.redis_url = Some(private.url.clone().into());
    backing.config.redis_prefix = private.prefix.clone();
    backing.config.redis_call_timeout = Duration::from_millis(300);
    backing.config.admin_token = Some("failover-admin-key-0123456789abcdef012".to_owned().into());
    let first = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("builds");
    let first = crate::helpers::WithWorkers::start(crate::helpers::start(first, backing)).await;
    let second =
        crate::helpers::WithWorkers::start(crate::helpers::second_instance(&first).await).await;

    let mut devices: Vec<crate::client::Session> = Vec::new();
    for i in 0..6 {
        devices.push(
            first
                .register(
                    &format!("load{i}@example.com"),
                    &format!("device_load_{i:02}"),
                )
                .await,
        );
    }
    let watched = first
        .register("watched@example.com", "device_watched1")
        .await;
    let mut socket = first.kill_switch(&watched).await;

    let started = Instant::now();
    let until = started + Duration::from_secs(12);
    let sessions: Vec<_> = (0..devices.len())
        .map(|i| {
            blockremote_engine::sim::session(
                blockremote_engine::sim::Class::HeldInHand,
                40 + i as u64,
                200,
            )
        })
        .collect();
    let phones = futures::future::join_all(
        devices
            .iter()
            .zip(&sessions)
            .map(|(d, s)| phone([&first.app, &second.app], d, &s.heartbeats, until)),
    );
    let faults = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        topology.crash(victim);
        let killed = Instant::now();
        // A lock during the outage: the operator retries a 503 until it is
        // taken (bounded: the cluster must recover).
        let lock = loop {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no lock taken in 30 s"
            );
            let r = first
                .admin(
                    reqwest::Method::POST,
                    &format!("/v1/admin/devices/{}/lock", watched.device_id),
                    Some(&serde_json::json!({"action": "CRITICAL_LOCK", "reason": "fraud_team"})),
                )
                .await;
            match r.status() {
                StatusCode::OK => break r.json::<Value>().await.expect("json"),
                StatusCode::SERVICE_UNAVAILABLE => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => panic!("{other} for a lock during the outage"),
            }
        };
        tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
        topology.restart(victim);
        (killed, lock)
    };
    let (logs, (killed, lock)) = tokio::join!(phones, faults);

    // Only 2xx, 409-for-a-retry, 429 and 503 were ever answered (checked in `phone`).
    let mut statuses = std::collections::BTreeMap::new();
    for log in &logs {
        for (s, n) in &log.statuses {
            *statuses.entry(*s).or_insert(0) += n;
        }
    }
    let outage = logs
        .iter()
        .filter_map(|l| l.outage.map(|(from, to)| (from, to.unwrap_or(until))))
        .map(|(from, to)| to.duration_since(from))
        .max()
        .unwrap_or_default();
    eprintln!(
        "{label}: statuses {statuses:?}; longest ingestion outage seen by a phone {outage:?} \
         (node killed at {:?})",
        killed.duration_since(started)
    );
    assert!(
        outage < Duration::from_secs(10),
        "ingestion out for {outage:?}"
    );

    // Every heartbeat answered 202 is scored, and nothing twice: the count
    // of scored heartbeats lies between the 202s and the 202s plus the
    // uncertain ones, and the report ends at the last 202.
    let (mut accepted_total, mut uncertain_total, mut lost_total) = (0, 0, 0);
    for (d, log) in devices.iter().zip(&logs) {
        let last = *log.accepted.last().expect("some accepted");
        let scored = eventually(Duration::from_secs(15), || async {
            let r = first.device_get("/v1/security/trust-score", d).await;
            r.status() == StatusCode::OK
                && r.json::<Value>().await.expect("json")["last_seq"].as_u64() >= Some(last)
        })
        .await;
        assert!(
            scored,
            "{}: last accepted seq {last} never scored",
            d.device_id
        );
        // Jobs of a batch that failed during the outage are retried by
        // their consumer (every 0.25 s, doubling up to 5 s while they fail).
        let (accepted, uncertain) = (log.accepted.len(), log.uncertain.len());
        let count_now = || async {
            first.admin_device(&d.device_id).await["trust"]["heartbeats"]
                .as_u64()
                .expect("count") as usize
        };
        eventually(
            Duration::from_secs(30).saturating_sub(started.elapsed()),
            || async { count_now().await >= accepted },
        )
        .await;
        let count = count_now().await;
        accepted_total += accepted;
        uncertain_total += uncertain;
        lost_total += accepted.saturating_sub(count);
        assert!(
            count <= accepted + uncertain,
            "{}: {count} scored, more than {accepted} + {uncertain}",
            d.device_id
        );
    }
    eprintln!(
        "{label}: {accepted_total} heartbeats answered 202, {uncertain_total} uncertain, \
         {lost_total} answered 202 and never scored"
    );
    // Replication is asynchronous: what the killed master acknowledged in
    // its last moments (jobs, engine states) may not have reached the
    // replica promoted in its place; the count read here is the engine
    // state's, so a state write lost that way counts as well. Measured on
    // the cluster in 9 runs of ~400–540: 0, 0, 0, 0, 7, 6, 0, 2, 1; through
    // the sentinels 0 in 4 runs of ~540. Closing that needs WAIT on the
    // enqueue and the state write (not built; ARCHITECTURE.md says so).
    assert!(
        lost_total * 20 <= accepted_total,
        "more than 5% of the 202s lost: {lost_total} of {accepted_total}"
    );
    // The lock taken during the outage reached the watched device: as the
    // command itself, or (when the device's slot was on the killed master,
    // so an attempt failed first) as a close with 4003 `locked`, after which
    // the phone reconnects and is told it is locked.
    let mut heard = None;
    for _ in 0..10 {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(5), socket.next()).await
        else {
            break;
        };
        match message {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).expect("json");
                if v["type"] == "command" && v["seq"] == lock["seq"] {
                    heard = Some("the command");
                    break;
                }
            }
            tokio_tungstenite::tungstenite::Message::Close(frame) => {
                let code: u16 = frame.expect("a close frame").code.into();
                assert_eq!(code, 4003, "closed as locked");
                let mut again = first.kill_switch(&watched).await;
                let state = crate::client::next_json(&mut again).await;
                assert_eq!(
                    (state["type"].as_str(), state["locked"].as_bool()),
                    (Some("state"), Some(true)),
                    "a reconnecting phone is told it is locked: {state}"
                );
                heard = Some("a 4003 close, then state locked");
                break;
            }
            _ => {}
        }
    }
    let heard = heard.unwrap_or_else(|| panic!("the lock {lock} never reached the device"));
    eprintln!("{label}: the lock reached the device as {heard}");
    drop(private);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_comes_back_and_reports_the_gap() {
    if !production_configured() {
        return;
    }
    let redis = PrivateRedis::start();
    let state = RedisState::connect_with(options(&redis.url()))
        .await
        .expect("connect");
    let mut messages = state.subscribe("gap:channel").await.expect("subscribe");
    state
        .publish("gap:channel", b"before")
        .await
        .expect("publish");
    let first = tokio::time::timeout(Duration::from_secs(2), messages.recv())
        .await
        .expect("in time");
    assert_eq!(first.as_deref(), Some(&b"before"[..]));
    // Every pub/sub connection of the server is cut.
    let killed = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "client",
            "kill",
            "type",
            "pubsub",
        ])
        .output()
        .expect("redis-cli");
    assert!(killed.status.success());
    let gap = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .expect("the gap is reported");
    assert_eq!(
        gap.as_deref(),
        Some(&[][..]),
        "an empty message marks the gap"
    );
    state
        .publish("gap:channel", b"after")
        .await
        .expect("publish");
    let after = tokio::time::timeout(Duration::from_secs(2), messages.recv())
        .await
        .expect("in time");
    assert_eq!(after.as_deref(), Some(&b"after"[..]));
}
