//! One kill-switch connection: the protocol, from `state` to close.
//!
//! Server → device: `state` first, then every unacked command from history,
//! then live commands. Device → server: `ack {id}` and `resume {since_seq}`.
//! Within a connection a command is written at most once (live copies at or
//! below the highest sequence number already written are skipped). The
//! server pings every [`PING_EVERY`]; a socket silent for [`IDLE_LIMIT`] is
//! closed. On shutdown every socket gets a close frame (1001).
//!
//! A socket lives no longer than the access token it was opened with: at
//! the token's `exp` it closes with 4002 `token_expired`. A lock or
//! quarantine of its device delivered live is followed by 4003 `locked`
//! (4004 `revoked` when the device's sessions were revoked with it); the
//! hub may close it with 4001 `replaced` or 4004 `revoked`. After a close
//! frame of ours the socket is read for up to [`CLOSE_GRACE`], so an ack the
//! device sent before it saw the close still counts. A message over the size
//! limit closes with 1009. `resume` is rate-limited per socket: a burst of
//! [`RESUME_BURST`], then one per [`RESUME_EVERY`]; a resume over the rate is
//! ignored, as unrecognised messages are.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde::Deserialize;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    hub::{Hub, Outbound, Registered},
    CloseReason, DeviceCommand,
};
use crate::{
    auth::DeviceAuth,
    state::{keys, SharedState},
    store::{DeviceStatus, SequenceKind, Store},
    telemetry::{Metrics, ReasonLabels},
};

/// How often the server pings an idle socket.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// A socket that sends nothing (not even a pong) for this long is closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Delivered command ids remembered per connection, to map acks to positions.
const REMEMBERED: usize = 128;
/// How long a socket is read after the server's close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Resumes a socket may send at once.
pub const RESUME_BURST: u32 = 3;
/// After the burst, one resume per this long (a resume replays up to the
/// whole history: 3 at once, then 6 a minute, is plenty for a client that
/// resumes once per reconnect).
pub const RESUME_EVERY: Duration = Duration::from_secs(10);

/// The per-socket resume rate (a GCRA: `tat` is when the budget is full again).
struct ResumeBudget {
    tat: Instant,
}

impl ResumeBudget {
    fn new() -> Self {
        Self {
            tat: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let tat = self.tat.max(now);
        if tat > now + RESUME_EVERY * (RESUME_BURST - 1) {
            return false;
        }
        self.tat = tat + RESUME_EVERY;
        true
    }
}

/// True when a receive error is a message or frame over the size limit.
fn too_big(error: axum::Error) -> bool {
    error
        .into_inner()
        .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)))
}

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
    /// Where ack positions are written behind to the store, and read back
    /// when shared state lost them (`crate::sequences`).
    pub sequences: Arc<crate::sequences::Sequences>,
    /// Cancelled when the process begins to shut down (the socket then closes).
    pub shutdown: CancellationToken,
}

/// Why a socket whose device was just locked closes: `revoked` when the
/// lock came with a revocation (the device may not reconnect), else
/// `locked`. A free function for the same reason as [`counter`].
async fn lock_reason(store: &dyn Store, device_id: &str) -> CloseReason {
    match store.device(device_id).await {
        Ok(Some(device)) if device.status != DeviceStatus::Revoked => CloseReason::Locked,
        Ok(_) => CloseReason::Revoked,
        Err(_) => CloseReason::Locked,
    }
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

/// The store's copy of `device_id`'s commands above `since`, within the
/// history's TTL (empty when the store cannot be read: the phone resumes
/// again on its next connection). A free function for the same reason as
/// [`counter`].
async fn stored_history(store: &dyn Store, device_id: &str, since: u64) -> Vec<(u64, Vec<u8>)> {
    let ttl_ms = i64::try_from(super::HISTORY_TTL.as_millis()).unwrap_or(i64::MAX);
    match store
        .commands_since(
            device_id,
            since,
            chrono::Utc::now().timestamp_millis().saturating_sub(ttl_ms),
            u32::try_from(super::HISTORY_LEN).unwrap_or(u32::MAX),
        )
        .await
    {
        Ok(commands) => commands
            .into_iter()
            .map(|c| (c.seq, c.command.into_bytes()))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "stored command history unavailable");
            Vec::new()
        }
    }
}

/// Where the device acked its commands up to: shared state's position, or
/// when shared state has none (lost with Redis's data, or never acked) the
/// store's copy — without it, a phone reconnecting after a loss would be
/// sent its whole stored history again, an old lock included.
async fn acked_position(state: &SocketHandles, device_id: &str) -> u64 {
    match state.shared.get(&keys::command_acked(device_id)).await {
        Ok(Some(value)) => std::str::from_utf8(&value)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        // Unreadable too: 0 would replay every stored command, old locks
        // included.
        Ok(None) | Err(_) => state
            .sequences
            .known(SequenceKind::Acked, device_id)
            .await
            .unwrap_or(0),
    }
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

    /// After a gap, the device's command counter may be gone with Redis's
    /// data (a restart without persistence drops every subscription, hence
    /// the gap): it is refilled above both what this socket wrote and the
    /// store's copy, so the next command — a global one too, which numbers
    /// devices without asking the store — is above what the phone saw.
    async fn refill_counter(&mut self) {
        let key = keys::command_seq(&self.device.device_id);
        if !matches!(self.state.shared.get(&key).await, Ok(None)) {
            return;
        }
        let stored = self
            .state
            .store
            .device_sequence(&self.device.device_id, SequenceKind::Command)
            .await
            .unwrap_or(0);
        let floor = stored.max(self.written);
        if floor > 0 {
            let seed = floor + crate::sequences::MARGIN;
            if let Err(e) = self
                .state
                .shared
                .set_max(&key, seed, super::HISTORY_TTL)
                .await
            {
                tracing::warn!(error = %e, "command counter not refilled after a gap");
            }
        }
    }

    /// Writes every command in history after `since`.
    ///
    /// `latest` — given on connect: the device's newest command `seq` as
    /// the `state` message said — is where shared state may have lost
    /// commands with its data: when the shared history does not run
    /// unbroken from `since + 1` up to `latest`, the store's copy fills
    /// the holes (it holds the device's own commands, not global ones;
    /// numbers are per device and consecutive, so a hole is visible). A
    /// resume or a resync after a pub/sub gap reads shared state only.
    async fn replay(&mut self, since: u64, latest: Option<u64>) -> bool {
        let mut history = match self
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
        let unbroken = history
            .iter()
            .map(|(seq, _)| *seq)
            .eq((since + 1)..=(since + history.len() as u64));
        let covered = history.last().map_or(since, |(seq, _)| *seq);
        if let Some(latest) = latest.filter(|&l| l > since && (!unbroken || covered < l)) {
            let store = self.state.store.clone();
            let stored = stored_history(store.as_ref(), &self.device.device_id, since).await;
            let known: std::collections::HashSet<u64> = history.iter().map(|(s, _)| *s).collect();
            history.extend(
                stored
                    .into_iter()
                    .filter(|(seq, _)| !known.contains(seq) && *seq <= latest),
            );
            history.sort_by_key(|(seq, _)| *seq);
        }
        for (seq, payload) in history {
            if let Some(command) = DeviceCommand::from_history(seq, &payload) {
                if !self.write_command(&Outbound::from(&command)).await {
                    return false;
                }
            }
        }
        true
    }

    /// Sends the `state` message; the command `seq` it said, or `None`
    /// when the socket failed.
    async fn send_state(&mut self) -> Option<u64> {
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
        let seq = match counter(self.state.shared.as_ref(), &keys::command_seq(&device_id)).await {
            // Lost with shared state, or never issued: the store's copy.
            0 => self
                .state
                .store
                .device_sequence(&device_id, SequenceKind::Command)
                .await
                .unwrap_or(0),
            seq => seq,
        };
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
        self.send(message.to_string()).await.then_some(seq)
    }

    /// Sends a close frame with `code`, then reads until the client's close
    /// (or [`CLOSE_GRACE`]), counting acks that were already on their way.
    async fn close(&mut self, code: u16, reason: &'static str) {
        self.state
            .metrics
            .ws_server_closes
            .get_or_create(&ReasonLabels { reason })
            .inc();
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if self.socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = self.socket.recv().await {
                match message {
                    Message::Text(text) => {
                        if let Ok(ClientMessage::Ack { id }) = serde_json::from_str(&text) {
                            self.on_ack(id).await;
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        })
        .await;
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
        self.state
            .sequences
            .note(SequenceKind::Acked, &self.device.device_id, seq);
    }
}

/// Serves one authenticated socket until it closes; `token_expires` is when
/// the access token it was opened with expires.
pub async fn serve(
    socket: WebSocket,
    state: SocketHandles,
    device: DeviceAuth,
    registered: Registered,
    token_expires: Instant,
    handshake_started: std::time::Instant,
) {
    let Registered {
        registration,
        mut commands,
        close: mut hub_close,
    } = registered;
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
    let acked = acked_position(&conn.state, &conn.device.device_id).await;
    let state_sent = conn.send_state().await;
    let latest = state_sent;
    conn.state
        .metrics
        .ws_handshake
        .observe(handshake_started.elapsed().as_secs_f64());
    if state_sent.is_none() || !conn.replay(acked, latest).await {
        reason = "send_failed";
    } else {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;

        let mut last_heard = Instant::now();
        let mut resumes = ResumeBudget::new();
        let expiry = tokio::time::sleep_until(token_expires);
        tokio::pin!(expiry);
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
                () = &mut expiry => {
                    let why = CloseReason::TokenExpired;
                    conn.close(why.code(), why.as_str()).await;
                    reason = why.as_str();
                    break;
                }
                Some(why) = closed_by_hub(&mut hub_close) => {
                    conn.close(why.code(), why.as_str()).await;
                    reason = why.as_str();
                    break;
                }
                Some(out) = commands.recv() => {
                    if out.resync {
                        let written = conn.written;
                        conn.refill_counter().await;
                        if !conn.replay(written, None).await {
                            reason = "send_failed";
                            break;
                        }
                        continue;
                    }
                    // A live copy of a command the replay on connect already
                    // wrote is a duplicate: skipped, and a lock's copy does not
                    // close the socket either (the phone had it, and the `state`
                    // message said locked) — whether it arrives before or after
                    // the replay is a race, so it must not decide the outcome.
                    let fresh = out.seq > conn.written;
                    if !conn.write_command(&out).await {
                        reason = "send_failed";
                        break;
                    }
                    if out.closes && fresh {
                        let store = conn.state.store.clone();
                        let why = lock_reason(store.as_ref(), &conn.device.device_id).await;
                        conn.close(why.code(), why.as_str()).await;
                        reason = why.as_str();
                        break;
                    }
                }
                incoming = conn.socket.recv() => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                            match serde_json::from_str::<ClientMessage>(&text) {
                                Ok(ClientMessage::Ack { id }) => conn.on_ack(id).await,
                                Ok(ClientMessage::Resume { .. }) if !resumes.take(Instant::now()) => {
                                    tracing::debug!("resume over the rate ignored");
                                }
                                Ok(ClientMessage::Resume { since_seq }) => {
                                    // An explicit resume may ask again for what was written.
                                    conn.written = conn.written.min(since_seq);
                                    if !conn.replay(since_seq, None).await {
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
                        Some(Ok(Message::Close(_))) => {
                            // Answer it (RFC 6455 §5.5.1): the socket queued
                            // the echo when it read the frame; it goes out on
                            // this flush, so the client sees a clean close,
                            // not 1006.
                            let _ = tokio::time::timeout(
                                CLOSE_GRACE,
                                futures::SinkExt::flush(&mut conn.socket),
                            )
                            .await;
                            reason = "client_closed";
                            break;
                        }
                        None => {
                            reason = "client_closed";
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            if too_big(e) {
                                conn.close(1009, "message too big").await;
                                reason = "message_too_big";
                            } else {
                                reason = "protocol_error";
                            }
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

/// Resolves with the hub's reason once it asks the socket to close; never
/// when the hub has let go of the socket without one.
async fn closed_by_hub(close: &mut watch::Receiver<Option<CloseReason>>) -> Option<CloseReason> {
    loop {
        if let Some(reason) = *close.borrow_and_update() {
            return Some(reason);
        }
        if close.changed().await.is_err() {
            // The hub replaced or dropped the slot without a reason: only
            // possible once the socket is ending anyway.
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_are_rate_limited_per_socket() {
        let mut budget = ResumeBudget::new();
        let now = budget.tat;
        for i in 0..RESUME_BURST {
            assert!(budget.take(now), "resume {i} of the burst");
        }
        assert!(!budget.take(now), "over the burst");
        let later = now + RESUME_EVERY;
        assert!(budget.take(later), "one more after {RESUME_EVERY:?}");
        assert!(!budget.take(later));
    }
}
