//! One kill-switch connection: the protocol, from `state` to close.
//!
//! Server → device: `state` first, then every unacked command from history,
//! then live commands. Device → server: `ack {id}` and `resume {since_seq}`.
//! Within a connection a command is written at most once (live copies at or
//! below the highest sequence number already written are skipped). The
//! server pings every [`PING_EVERY`]; a socket silent for [`IDLE_LIMIT`] is
//! closed. On shutdown every socket gets a close frame (1001).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde::Deserialize;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    hub::{Hub, Outbound, Registration},
    DeviceCommand,
};
use crate::{
    auth::DeviceAuth,
    state::{keys, SharedState},
    store::{DeviceStatus, Store},
    telemetry::Metrics,
};

/// How often the server pings an idle socket.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// A socket that sends nothing (not even a pong) for this long is closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Delivered command ids remembered per connection, to map acks to positions.
const REMEMBERED: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Ack { id: Uuid },
    Resume { since_seq: u64 },
}

/// The handles a connection uses, and nothing else.
#[derive(Clone)]
pub struct SocketHandles {
    /// Where the device's status is read for the first `state` message.
    pub store: Arc<dyn Store>,
    /// Command counters and history.
    pub shared: Arc<dyn SharedState>,
    /// Delivery, ack and connection metrics.
    pub metrics: Arc<Metrics>,
    /// This instance's sockets; its ack writer saves ack positions.
    pub hub: Arc<Hub>,
    /// Cancelled when the process begins to shut down (the socket then closes).
    pub shutdown: CancellationToken,
}

/// Reads a numeric counter from shared state (0 when absent). A free
/// function so that no borrow of the (non-`Sync`) socket is held across it.
async fn counter(shared: &dyn SharedState, key: &str) -> u64 {
    shared
        .get(key)
        .await
        .ok()
        .flatten()
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0)
}

struct Connection {
    socket: WebSocket,
    state: SocketHandles,
    device: DeviceAuth,
    /// Highest sequence number written to this socket.
    written: u64,
    /// (id, seq) of recently written commands.
    recent: VecDeque<(Uuid, u64)>,
    delivered: u64,
    acks: u64,
}

impl Connection {
    async fn send(&mut self, text: String) -> bool {
        self.socket.send(Message::Text(text.into())).await.is_ok()
    }

    async fn write_command(&mut self, out: &Outbound) -> bool {
        if out.seq <= self.written {
            return true;
        }
        self.written = out.seq;
        if let Some(issued) = out.issued_at {
            let age = chrono::Utc::now().signed_duration_since(issued);
            if let Ok(age) = age.to_std() {
                self.state.metrics.ws_delivery.observe(age.as_secs_f64());
            }
        }
        self.state.metrics.ws_delivered.inc();
        self.recent.push_back((out.id, out.seq));
        if self.recent.len() > REMEMBERED {
            self.recent.pop_front();
        }
        self.delivered += 1;
        self.socket
            .send(Message::Text(out.wire.clone()))
            .await
            .is_ok()
    }

    /// Writes every command in history after `since`.
    async fn replay(&mut self, since: u64) -> bool {
        let history = match self
            .state
            .shared
            .history_since(&keys::force_overlay(&self.device.device_id), since)
            .await
        {
            Ok(history) => history,
            Err(e) => {
                tracing::warn!(error = %e, "history unavailable for resume");
                return true;
            }
        };
        for (seq, payload) in history {
            if let Some(command) = DeviceCommand::from_history(seq, &payload) {
                if !self.write_command(&Outbound::from(&command)).await {
                    return false;
                }
            }
        }
        true
    }

    async fn send_state(&mut self) -> bool {
        let device_id = self.device.device_id.clone();
        let status = self
            .state
            .store
            .device(&device_id)
            .await
            .ok()
            .flatten()
            .map(|d| d.status)
            .unwrap_or(DeviceStatus::Revoked);
        let locked = status != DeviceStatus::Active;
        let seq = counter(self.state.shared.as_ref(), &keys::command_seq(&device_id)).await;
        let last_action = if locked {
            self.state
                .shared
                .history_since(&keys::force_overlay(&device_id), 0)
                .await
                .ok()
                .and_then(|h| h.last().cloned())
                .and_then(|(seq, p)| DeviceCommand::from_history(seq, &p))
                .map(|c| c.action)
                .filter(|a| *a != super::Action::Unlock)
        } else {
            None
        };
        let message = serde_json::json!({
            "type": "state",
            "locked": locked,
            "action": last_action,
            "seq": seq,
        });
        self.send(message.to_string()).await
    }

    async fn on_ack(&mut self, id: Uuid) {
        let Some(&(_, seq)) = self.recent.iter().find(|(known, _)| *known == id) else {
            return;
        };
        self.acks += 1;
        self.state.metrics.ws_acks.inc();
        // The position only moves forward even if acks arrive out of order
        // or on two sockets of the device; saved in batches (see `acks`).
        self.state.hub.acks().ack(&self.device.device_id, seq).await;
    }
}

/// Serves one authenticated socket until it closes.
pub async fn serve(
    socket: WebSocket,
    state: SocketHandles,
    device: DeviceAuth,
    registration: Registration,
    mut commands: mpsc::Receiver<Arc<Outbound>>,
    handshake_started: std::time::Instant,
) {
    let started = Instant::now();
    state.metrics.ws_connected.inc();
    let shutdown = state.shutdown.clone();
    let mut conn = Connection {
        socket,
        state,
        device,
        written: 0,
        recent: VecDeque::new(),
        delivered: 0,
        acks: 0,
    };
    let reason;
    let acked = counter(
        conn.state.shared.as_ref(),
        &keys::command_acked(&conn.device.device_id),
    )
    .await;
    let state_sent = conn.send_state().await;
    conn.state
        .metrics
        .ws_handshake
        .observe(handshake_started.elapsed().as_secs_f64());
    if !state_sent || !conn.replay(acked).await {
        reason = "send_failed";
    } else {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;

        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = conn.socket.send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: "server shutting down".into(),
                    }))).await;
                    reason = "shutdown";
                    break;
                }
                Some(out) = commands.recv() => {
                    if !conn.write_command(&out).await {
                        reason = "send_failed";
                        break;
                    }
                }
                incoming = conn.socket.recv() => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                            match serde_json::from_str::<ClientMessage>(&text) {
                                Ok(ClientMessage::Ack { id }) => conn.on_ack(id).await,
                                Ok(ClientMessage::Resume { since_seq }) => {
                                    // An explicit resume may ask again for what was written.
                                    conn.written = conn.written.min(since_seq);
                                    if !conn.replay(since_seq).await {
                                        reason = "send_failed";
                                        break;
                                    }
                                }
                                Err(_) => tracing::debug!("unrecognised client message ignored"),
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let _ = conn.socket.send(Message::Close(Some(CloseFrame {
                                code: 1003,
                                reason: "text frames only".into(),
                            }))).await;
                            reason = "binary_frame";
                            break;
                        }
                        Some(Ok(Message::Close(_))) | None => {
                            reason = "client_closed";
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) => {
                            reason = "protocol_error";
                            break;
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_LIMIT {
                        let _ = conn.socket.send(Message::Close(Some(CloseFrame {
                            code: 1001,
                            reason: "idle".into(),
                        }))).await;
                        reason = "idle_timeout";
                        break;
                    }
                    if conn.socket.send(Message::Ping(Default::default())).await.is_err() {
                        reason = "send_failed";
                        break;
                    }
                }
            }
        }
    }
    drop(registration);
    conn.state.metrics.ws_connected.dec();
    tracing::info!(
        device_id = %conn.device.device_id,
        user_id = %conn.device.user_id,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        commands_delivered = conn.delivered,
        acks = conn.acks,
        close_reason = reason,
        "kill-switch connection closed"
    );
}
