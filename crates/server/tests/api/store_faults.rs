//! PostgreSQL faults, injected by a TCP proxy this test puts between the
//! server and the database: cutting it drops every connection and refuses
//! new ones, as a database that died would — without touching the
//! PostgreSQL the other tests share.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use blockremote::store::SequenceKind;
use blockremote_engine::sim::{session, Class};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch};

use crate::helpers::{eventually, heartbeat_body, Backend, Backing, WithWorkers};

/// A loopback TCP proxy that can be cut and restored.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    /// Bumped on each cut: every forwarded connection of an older
    /// generation closes.
    generation: watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (flag, cuts) = (down.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            down,
            generation,
        }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

async fn ready(app: &crate::helpers::TestApp) -> (StatusCode, Value) {
    let r = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .expect("ready");
    let status = r.status();
    (status, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_heartbeats_are_taken_readiness_fails_and_the_delayed_writes_land() {
    let Some(mut backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let db = backing.database.as_ref().expect("database").url.clone();
    let parsed = url::Url::parse(&db).expect("url");
    let proxy = Proxy::start((
        parsed.host_str().expect("host").to_owned(),
        parsed.port().unwrap_or(5432),
    ))
    .await;
    let mut through = parsed.clone();
    through.set_port(Some(proxy.port)).expect("port");
    backing.config.database = blockremote::config::DatabaseConfig::Postgres {
        url: through.to_string().into(),
    };
    let app = blockremote::app::Application::build(backing.config.clone(), true)
        .await
        .expect("builds");
    let app = WithWorkers::start(crate::helpers::start(app, backing)).await;
    let d = app.register("pgdown@example.com", "device_pgdown1").await;
    let s = session(Class::HeldInHand, 2, 8);
    let r = app.heartbeat(&d, &heartbeat_body(&s.heartbeats[0])).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(ready(&app).await.0, StatusCode::OK);

    proxy.cut();
    let cut_at = Instant::now();
    // Readiness says so, within its check timeout.
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["database"], "unavailable", "{body}");
    assert_eq!(body["checks"]["cache"], "ok", "{body}");
    assert!(cut_at.elapsed() < Duration::from_secs(4));
    // Heartbeats still go on the queue (Redis) and are answered 202.
    for hb in &s.heartbeats[1..5] {
        let r = app.heartbeat(&d, &heartbeat_body(hb)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    // What needs the database is refused with a 503 and Retry-After (the
    // pool gives up after its acquire timeout), never a 500.
    let r = app.login("pgdown@example.com", &d.device_id).await;
    let (status, retry_after) = (r.status(), r.headers().contains_key("retry-after"));
    let body = r.text().await.expect("body");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after, "{body}");
    // The write-behind of their seqs cannot land while the store is down…
    tokio::time::sleep(Duration::from_millis(1500)).await;

    proxy.restore();
    // …and lands once it is back.
    let last = s.heartbeats[4].seq;
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.state
                .store
                .device_sequence(&d.device_id, SequenceKind::Heartbeat)
                .await
                .is_ok_and(|stored| stored >= last)
        })
        .await,
        "the seqs accepted during the outage reached the store"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            ready(&app).await.0 == StatusCode::OK
        })
        .await,
        "ready again"
    );
    // And the heartbeats taken during the outage were scored.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let r = app.device_get("/v1/security/trust-score", &d).await;
            r.status() == StatusCode::OK
                && r.json::<Value>().await.expect("json")["last_seq"].as_u64() >= Some(last)
        })
        .await,
        "scored"
    );
}
