//! The `blockremote` binary as an operator runs it: start, readiness,
//! migrations, signals, and clear failures when a dependency is missing.

use std::{
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use blockremote::store::{BillingStore, PostgresStore, SqliteStore, Store};
use reqwest::StatusCode;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::helpers::{Backend, Backing};

crate::on_both_backends!(
    serve_is_ready_with_seeded_plans_and_drains_on_sigterm,
    migrate_command_applies_the_schema,
    intel_import_applies_a_file_and_names_a_bad_entry,
    audit_verify_reports_an_intact_chain,
);

pub const BIN: &str = env!("CARGO_BIN_EXE_blockremote");

pub fn command(env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A running `blockremote` process and the log lines it has printed.
pub struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// The task reading the log lines; done once the process's stdout closes.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Starts `args` and waits until a log line contains `ready_message`.
    pub async fn start(
        env: &[(&str, String)],
        args: &[&str],
        ready_message: &str,
    ) -> (Self, String) {
        let mut child = command(env, args).spawn().expect("spawn blockremote");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = logs.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .expect("the process announced itself in time")
                .expect("the process is still running");
            if line.contains(ready_message) {
                return (
                    Self {
                        child,
                        logs,
                        reader: Some(reader),
                    },
                    line,
                );
            }
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, then for its last log lines to be read
    /// (they may still be in the pipe when it exits).
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("exited within the limit")
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("stdout closed after exit")
                .expect("the log reader ended cleanly");
        }
        status
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(needle))
    }
}

pub fn listening_addr(line: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    format!("http://{}", json["addr"].as_str().expect("addr field"))
}

async fn plans_in(backing: &Backing, backend: Backend) -> Vec<(String, u32)> {
    let store = store_of(backing, backend).await;
    let plans = store.plans().await.expect("plans table exists");
    store.close().await;
    plans
        .into_iter()
        .map(|p| (p.name, p.rate_limit_per_minute))
        .collect()
}

async fn store_of(backing: &Backing, backend: Backend) -> Box<dyn Store> {
    match backend {
        Backend::Embedded => Box::new(
            SqliteStore::connect(
                &format!(
                    "sqlite://{}",
                    backing.dir.path().join("blockremote.db").display()
                ),
                1,
                Duration::from_secs(5),
            )
            .await
            .expect("sqlite file exists"),
        ),
        Backend::Production => Box::new(
            PostgresStore::connect(
                &backing.database.as_ref().expect("db").url,
                1,
                Duration::from_secs(5),
            )
            .await
            .expect("postgres"),
        ),
    }
}

async fn intel_import_applies_a_file_and_names_a_bad_entry(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let file = backing.dir.path().join("intel.json");
    std::fs::write(
        &file,
        r#"{"add": {"app_hashes": ["9F2C1E0B7A6D5C4B"], "domains": ["Evil.Example."], "ips": ["203.0.113.9/24"]}, "reason": "feed"}"#,
    )
    .expect("write");
    let path = file.display().to_string();
    let output = command(&backing.env(), &["intel", "import", &path])
        .output()
        .await
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "3\n");
    let store = store_of(&backing, backend).await;
    let mut entries = store.threat_intel().await.expect("intel");
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("app_hash".to_owned(), "9f2c1e0b7a6d5c4b".to_owned()),
            ("domain".to_owned(), "evil.example".to_owned()),
            ("ip".to_owned(), "203.0.113.0/24".to_owned()),
        ],
        "normalised"
    );
    store.close().await;
    // Importing again changes nothing.
    let again = command(&backing.env(), &["intel", "import", &path])
        .output()
        .await
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "0\n");
    // A bad entry: one stderr line naming it, exit 1, nothing applied.
    std::fs::write(&file, r#"{"add": {"ips": ["10.0.0.0/8", "not-an-ip"]}}"#).expect("write");
    let bad = command(&backing.env(), &["intel", "import", &path])
        .output()
        .await
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("add.ips[1]"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

fn seeded() -> Vec<(String, u32)> {
    vec![
        ("trial".into(), 120),
        ("paid_basic".into(), 600),
        ("paid".into(), 1200),
    ]
}

async fn serve_is_ready_with_seeded_plans_and_drains_on_sigterm(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let (mut server, line) = Running::start(&backing.env(), &["serve"], "\"listening\"").await;
    let address = listening_addr(&line);
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let ready = client
        .get(format!("{address}/health/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(plans_in(&backing, backend).await, seeded());

    let started = Instant::now();
    server.signal("TERM");
    let status = server.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(server.logged("shutting down"), "drain was logged");
    assert!(server.logged("\"stopped\""), "shutdown completed");
}

async fn migrate_command_applies_the_schema(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let output = command(&backing.env(), &["migrate"])
        .output()
        .await
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(plans_in(&backing, backend).await, seeded());
    // Running it again is harmless.
    let again = command(&backing.env(), &["migrate"])
        .output()
        .await
        .expect("run");
    assert!(again.status.success());
}

#[tokio::test]
async fn with_nothing_configured_serve_is_ready_and_sigint_drains() {
    // Only the port is chosen (8000 may be taken on a shared machine); the
    // data dir is the default `./data` under the working directory.
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(&[("BLOCKREMOTE_LISTEN", "127.0.0.1:0".into())], &["serve"]);
    cmd.current_dir(cwd.path());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("\"listening\"") {
                return line;
            }
        }
        panic!("exited before listening");
    })
    .await
    .expect("listening in time");
    let ready = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("{}/health/ready", listening_addr(&line)))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), StatusCode::OK);
    assert!(
        cwd.path().join("data/blockremote.db").exists(),
        "SQLite file in ./data"
    );
    let mut server = Running {
        child,
        logs: Arc::default(),
        reader: None,
    };
    server.signal("INT");
    assert!(server.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn in_flight_requests_finish_during_the_drain() {
    use axum::routing::get;
    let backing = Backing::new(Backend::Embedded).await.expect("embedded");
    let app = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("build")
        .with_routes(axum::Router::new().route(
            "/test/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "finished"
            }),
        ));
    let address = format!("http://127.0.0.1:{}", app.port());
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    let server = tokio::spawn(app.run_until_stopped(async move { signal.cancelled().await }));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let slow = tokio::spawn(client.get(format!("{address}/test/slow")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    stop.cancel();
    let response = slow
        .await
        .expect("join")
        .expect("the in-flight request was answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("body"), "finished");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("drained within the grace period")
        .expect("join")
        .expect("clean exit");
    assert!(started.elapsed() < Duration::from_secs(9));
    // No new connections after the drain.
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    assert!(fresh
        .get(format!("{address}/health/live"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn serve_without_migrations_refuses_a_stale_schema_then_runs_once_migrated() {
    let backing = Backing::new(Backend::Embedded).await.expect("embedded");
    let mut env = backing.env();
    env.push(("BLOCKREMOTE_AUTO_MIGRATE", "false".into()));
    let stderr = expect_failure(env.clone(), &["serve"]).await;
    assert!(stderr.contains("blockremote migrate"), "{stderr}");
    let store = SqliteStore::connect(
        &format!(
            "sqlite://{}",
            backing.dir.path().join("blockremote.db").display()
        ),
        1,
        Duration::from_secs(5),
    )
    .await
    .expect("file created");
    assert!(
        store.plans().await.is_err(),
        "no tables: migrations were skipped"
    );
    store.close().await;

    let out = command(&env, &["migrate"]).output().await.expect("migrate");
    assert!(out.status.success());
    let (mut server, _) = Running::start(&env, &["serve"], "\"listening\"").await;
    server.signal("TERM");
    assert!(server.wait(Duration::from_secs(10)).await.success());
}

/// Runs the binary expecting a fast failure; returns stderr.
async fn expect_failure(env: Vec<(&str, String)>, args: &[&str]) -> String {
    let output = tokio::time::timeout(Duration::from_secs(20), command(&env, args).output())
        .await
        .expect("fails fast, never hangs")
        .expect("run");
    assert!(!output.status.success(), "must fail");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[tokio::test]
async fn unreachable_database_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = expect_failure(
        vec![
            ("BLOCKREMOTE_DATA_DIR", dir.path().display().to_string()),
            (
                "DATABASE_URL",
                "postgres://postgres:s3cret@127.0.0.1:1/nope".into(),
            ),
            ("BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS", "3".into()),
        ],
        &["serve"],
    )
    .await;
    assert!(stderr.contains("cannot reach the database"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
}

#[tokio::test]
async fn unreachable_redis_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = expect_failure(
        vec![
            ("BLOCKREMOTE_DATA_DIR", dir.path().display().to_string()),
            ("REDIS_URL", "redis://:s3cret@127.0.0.1:1".into()),
            ("BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS", "3".into()),
        ],
        &["serve"],
    )
    .await;
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
}

#[tokio::test]
async fn invalid_configuration_names_the_variable() {
    let stderr = expect_failure(
        vec![("BLOCKREMOTE_LISTEN", "not-an-address".into())],
        &["serve"],
    )
    .await;
    assert!(stderr.contains("BLOCKREMOTE_LISTEN"), "{stderr}");
}

#[tokio::test]
async fn worker_needs_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = expect_failure(
        vec![("BLOCKREMOTE_DATA_DIR", dir.path().display().to_string())],
        &["worker"],
    )
    .await;
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
}

#[tokio::test]
async fn worker_process_runs_and_drains_on_sigterm() {
    let Some(backing) = Backing::new(Backend::Production).await else {
        return;
    };
    // The schema must exist before a worker runs.
    let out = command(&backing.env(), &["migrate"])
        .output()
        .await
        .expect("migrate");
    assert!(out.status.success());
    let (mut worker, _) = Running::start(&backing.env(), &["worker"], "worker running").await;
    worker.signal("TERM");
    assert!(worker.wait(Duration::from_secs(10)).await.success());
}

async fn audit_verify_reports_an_intact_chain(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let migrate = command(&backing.env(), &["migrate"])
        .output()
        .await
        .expect("run");
    assert!(migrate.status.success());
    let store = store_of(&backing, backend).await;
    for _ in 0..3 {
        store
            .append_audit(blockremote::store::NewAuditEntry {
                user_id: None,
                device_id: None,
                jti: None,
                ip: None,
                user_agent: None,
                source: blockremote::store::AuditSource::Worker,
                threat_score: None,
                decision_reason: None,
                attestation_state: None,
                action_taken: "probe".into(),
                actor: None,
                request_id: None,
            })
            .await
            .expect("audit");
    }
    store.close().await;
    let output = command(&backing.env(), &["audit", "verify"])
        .output()
        .await
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "audit chain intact: 3 rows\n"
    );
}
