//! `blockremote demo`: the tour a newcomer would otherwise do by hand, through
//! the public API with the reference client — a bank maps its customer and
//! mints a device session, the app opens the kill-switch socket and streams
//! realistic heartbeats, an operator locks the device (the app is told at
//! once and its heartbeats are refused) and unlocks it.
//!
//! With no `--url` it starts the embedded server itself (a fresh data
//! directory under the system's temp dir, a random admin key, a free
//! loopback port) and removes it afterwards; `scripts/quickstart.sh` runs it
//! against a `blockremote serve` it started, as a user would.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use blockremote_client::{
    Client, DeviceIdentity, HeartbeatOutcome, KillSwitch, ServerMessage, SessionRequest,
};
use blockremote_engine::sim::{session, Class};
use secrecy::SecretString;

use crate::{app::Application, config::Config};

/// How long the tour waits for any one thing (a score, a command).
const WAIT: Duration = Duration::from_secs(10);
/// Heartbeats sent before the lock.
const HEARTBEATS: usize = 5;

/// Starts the embedded server in a fresh temp directory, runs the tour
/// against it, stops it and removes the directory.
pub async fn run_embedded() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("blockremote-demo-{}", uuid::Uuid::new_v4()));
    let mut config = Config::embedded_in(&dir);
    let admin_key = format!("demo-{}", uuid::Uuid::new_v4().simple());
    config.admin_token = Some(SecretString::from(admin_key.clone()));
    let app = Application::build(config, true)
        .await
        .context("starting the embedded server")?;
    let url = format!("http://{}", app.local_addr());
    println!("embedded server on {url} (data in {})", dir.display());
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(app.run_until_stopped(async move { stopped.cancelled().await }));
    let toured = tour(&url, &admin_key).await;
    stop.cancel();
    let served = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    toured?;
    served.context("the server task")??;
    Ok(())
}

/// The tour, against the server at `url` with an admin key; prints each step.
pub async fn tour(url: &str, admin_key: &str) -> anyhow::Result<()> {
    let began = Instant::now();
    let client = Client::new(url)?;
    let admin = client.admin(admin_key);
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];

    let customer = format!("demo:{tag}");
    let user = admin.ensure_user(&customer, None).await?;
    println!(
        "1. bank: POST /v1/admin/users {{\"external_id\": \"{customer}\"}} -> user {} (created: {})",
        user.user_id, user.created
    );

    let identity = DeviceIdentity {
        device_id: format!("demo{tag}"),
        device_fingerprint: format!("demo-fingerprint-{tag}"),
        platform: "android".to_owned(),
    };
    let who = SessionRequest::External {
        external_id: &customer,
        create: false,
    };
    let tokens = admin.session(who, &identity).await?;
    println!(
        "2. bank: POST /v1/admin/sessions -> device {} signed in (access token for {} s)",
        identity.device_id, tokens.expires_in
    );

    let device = client.device(&identity.device_id, &tokens.access_token);
    let mut socket = device.kill_switch().await?;
    match next(&mut socket).await? {
        ServerMessage::State { locked, seq, .. } => {
            println!("3. app: kill-switch socket open -> state {{locked: {locked}, seq: {seq}}}")
        }
        other => bail!("the socket's first message was {other:?}, not the state"),
    }

    let sample = session(Class::HeldInHand, rand::random(), HEARTBEATS + 1);
    let mut bodies = sample.heartbeats.iter().map(|hb| {
        let mut body = serde_json::to_value(hb).expect("a heartbeat serialises");
        body["sent_at"] = chrono::Utc::now().to_rfc3339().into();
        body
    });
    for body in bodies.by_ref().take(HEARTBEATS) {
        match device.heartbeat(&body).await? {
            HeartbeatOutcome::Accepted { .. } => {}
            other => bail!("a genuine heartbeat was answered {other:?}"),
        }
    }
    let report = scored(&device, HEARTBEATS as u64).await?;
    println!(
        "4. app: {HEARTBEATS} heartbeats of a phone held in hand -> 202 each; trust {} ({}), {} scored",
        report.trust_score, report.level, report.heartbeats
    );

    let locked_at = Instant::now();
    admin
        .lock(&identity.device_id, "CRITICAL_LOCK", "demo_fraud_team")
        .await?;
    let lock_seq = command(&mut socket, "CRITICAL_LOCK").await?;
    let told = locked_at.elapsed().as_millis();
    // A delivered lock closes the socket (4003); the app reconnects and the
    // new socket's state says locked.
    let closed = tokio::time::timeout(WAIT, socket.next())
        .await
        .context("the socket stayed open after the lock")??;
    if closed.is_some() || socket.close_code() != Some(4003) {
        bail!(
            "expected close 4003 after the lock, got {closed:?} / {:?}",
            socket.close_code()
        );
    }
    let mut socket = device.kill_switch().await?;
    let state = match next(&mut socket).await? {
        ServerMessage::State {
            locked: true,
            action,
            ..
        } => action.unwrap_or_default(),
        other => bail!("after the lock the state was {other:?}"),
    };
    println!(
        "5. bank: POST /v1/admin/devices/{}/lock CRITICAL_LOCK -> app told in {told} ms (command seq {lock_seq}), acked; socket closed 4003, reconnected: state locked ({state})",
        identity.device_id,
    );

    let body = bodies.next().context("the sample's last heartbeat")?;
    match device.heartbeat(&body).await? {
        HeartbeatOutcome::Locked => {
            println!("6. app: next heartbeat -> 403 device_locked (the app shows its lock screen)")
        }
        other => bail!("a locked device's heartbeat was answered {other:?}"),
    }

    admin
        .unlock(&identity.device_id, "demo_customer_verified")
        .await?;
    let unlock_seq = command(&mut socket, "UNLOCK").await?;
    println!(
        "7. bank: POST /v1/admin/devices/{}/unlock -> app told (command seq {unlock_seq}), acked",
        identity.device_id
    );

    // The refused heartbeat's seq was never accepted: send it again.
    match device.heartbeat(&body).await? {
        HeartbeatOutcome::Accepted { seq } => {
            println!("8. app: the refused heartbeat again -> 202 (seq {seq})")
        }
        other => bail!("an unlocked device's heartbeat was answered {other:?}"),
    }
    socket.close().await?;
    println!("tour done in {} ms", began.elapsed().as_millis());
    Ok(())
}

/// The next message on the socket, within [`WAIT`].
async fn next(socket: &mut KillSwitch) -> anyhow::Result<ServerMessage> {
    tokio::time::timeout(WAIT, socket.next())
        .await
        .context("no message from the kill-switch socket in 10 s")??
        .context("the server closed the kill-switch socket")
}

/// Waits for a command with `action`, acknowledges it and returns its seq.
async fn command(socket: &mut KillSwitch, action: &str) -> anyhow::Result<u64> {
    loop {
        if let ServerMessage::Command {
            id,
            seq,
            action: got,
            ..
        } = next(socket).await?
        {
            socket.ack(&id).await?;
            if got == action {
                return Ok(seq);
            }
        }
    }
}

/// The trust report once `seq` was scored.
async fn scored(
    device: &blockremote_client::Device,
    seq: u64,
) -> anyhow::Result<blockremote_client::TrustReport> {
    let deadline = Instant::now() + WAIT;
    loop {
        let report = device.trust_score().await?;
        if report.last_seq >= seq {
            return Ok(report);
        }
        if Instant::now() > deadline {
            bail!("heartbeat {seq} was not scored in 10 s (are workers running?)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
