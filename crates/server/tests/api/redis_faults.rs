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
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    eventually, heartbeat_body, production_urls, topology_url, Backend, Backing, TestRedis,
};

/// A `redis-server` of this test's own on a free loopback port, killed on drop.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> Self {
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

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the process: connections stay open and nothing answers —
    /// the worst failure, the one only a timeout notices.
    fn hang(&self) {
        self.signal("-STOP");
    }

    fn resume(&self) {
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
    while state.breaker_state() == BreakerState::Closed {
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
    assert_eq!(state.breaker_state(), BreakerState::Closed);
    state
        .set("k", b"v", None)
        .await
        .expect("set after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_hangs_the_api_answers_503_with_retry_after_and_is_not_ready_then_recovers() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let redis = PrivateRedis::start();
    let private = TestRedis::new(&redis.url());
    backing.config.redis_url = Some(private.url.clone().into());
    backing.config.redis_prefix = private.prefix.clone();
    backing.config.redis_call_timeout = Duration::from_millis(200);
    let app = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("builds");
    let app = crate::helpers::start(app, backing);
    let d = app.register("hung@example.com", "device_hung_01").await;
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

/// A private primary + replica + 3 sentinels (scripts/redis-topologies.sh),
/// stopped on drop.
struct PrivateSentinels {
    dir: std::path::PathBuf,
    base: u16,
}

impl PrivateSentinels {
    fn start(base: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("blockremote-faults-{}", uuid::Uuid::new_v4()));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/redis-topologies.sh"
        );
        let done = Command::new(script)
            .args(["start", "sentinel"])
            .env("BLOCKREMOTE_TOPOLOGIES_DIR", &dir)
            .env("BLOCKREMOTE_TOPOLOGIES_PORT", base.to_string())
            .stdout(Stdio::null())
            .status()
            .expect("the topologies script");
        assert!(done.success(), "private sentinels started");
        Self { dir, base }
    }

    fn url(&self) -> String {
        let s = |i: u16| format!("127.0.0.1:{}", self.base + 20 + i);
        format!("redis+sentinel://{},{},{}/blockremote", s(0), s(1), s(2))
    }

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

    /// SIGKILL: no goodbye to the replica or the sentinels.
    fn crash(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("pid"))
            .expect("the node's pid file");
        let done = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(done.success());
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

impl Drop for PrivateSentinels {
    fn drop(&mut self) {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/redis-topologies.sh"
        );
        let _ = Command::new(script)
            .arg("stop")
            .env("BLOCKREMOTE_TOPOLOGIES_DIR", &self.dir)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_and_a_dead_primary_are_followed() {
    if !production_configured() || topology_url("TEST_REDIS_SENTINEL_URL").is_none() {
        return;
    }
    let sentinels = PrivateSentinels::start(18100);
    let state = RedisState::connect_with(options(&sentinels.url()))
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
