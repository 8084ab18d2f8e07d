//! The per-instance registry of kill-switch sockets.
//!
//! The hub subscribes once to the kill-switch channel and writes each command
//! to the sockets of its device held by this instance. Writes never block the
//! fan-out: each socket has a small queue, and a socket whose queue is full
//! misses the live copy and gets it from history on resume.
//!
//! ## Caps, per instance
//! Sockets are counted on the instance that holds them (the hub is the
//! instance's registry; a device behind a load balancer may hold sockets on
//! several instances, at most the caps on each):
//! - per device, [`Limits::per_device`] (`BLOCKREMOTE_WS_MAX_SOCKETS_PER_DEVICE`,
//!   default 2): a new socket closes the device's oldest with 4001 `replaced`;
//! - per user, [`Limits::per_user`] (`BLOCKREMOTE_WS_MAX_SOCKETS_PER_USER`,
//!   default 20) — one account cannot fill the instance;
//! - per instance, [`Limits::max_connections`] (`BLOCKREMOTE_WS_MAX_CONNECTIONS`),
//!   so a flood of connections cannot exhaust memory.
//!
//! **Headroom for established devices**: a replacement takes the old
//! socket's place, so it never needs a free slot. A device that holds a
//! socket on this instance can therefore always reconnect here — when the
//! user's or the instance's cap is reached, its new socket replaces its
//! oldest (a phone whose old socket is half-open after a network change is
//! the common case). Only a device with no socket here is refused at a cap
//! (503 `too_many_connections`).
//!
//! ## A lock taken while Redis is down
//! Its command cannot be numbered or published, so it reaches no other
//! instance. [`Hub::close_everywhere`] closes this instance's sockets of the
//! device at once and keeps a [`Disconnect`] to publish: a task retries every
//! [`UNDELIVERED_RETRY`] until Redis takes it, and every instance then closes
//! the device's sockets with 4003 — the phone reconnects and is told
//! `locked` from the store. In memory, bounded ([`MAX_UNDELIVERED`], each
//! kept at most [`UNDELIVERED_FOR`]): if this process dies first, the hold in
//! the store still refuses the device on every request and reconnect.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{acks::AckWriter, Action, CloseReason, DeviceCommand, Disconnect, Published};
use crate::state::{keys, SharedState, StateResult};

/// Devices whose global command is sequenced and stored per round trip.
pub const FAN_OUT_BATCH: usize = 250;
/// Batches of a global fan-out in flight at once.
pub const FAN_OUT_PARALLEL: usize = 8;

/// Messages queued per socket before live copies are dropped (history covers them).
pub const SOCKET_QUEUE: usize = 16;

/// How often undelivered disconnects are published again.
pub const UNDELIVERED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Undelivered disconnects kept at most (a lock beyond it reaches other
/// instances' sockets only on the phone's next reconnect).
pub const MAX_UNDELIVERED: usize = 10_000;
/// How long an undelivered disconnect is retried.
pub const UNDELIVERED_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// A command ready to write to sockets.
#[derive(Debug)]
pub struct Outbound {
    /// Command id.
    pub id: uuid::Uuid,
    /// The device's sequence number.
    pub seq: u64,
    /// The JSON message, shared (not copied) by every socket it is written to.
    pub wire: axum::extract::ws::Utf8Bytes,
    /// When the command was issued, for the delivery-latency metric.
    pub issued_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The socket closes once this is written (a lock or quarantine
    /// addressed to its device, delivered live; see `socket`).
    pub closes: bool,
    /// Not a command: commands may have been missed (a pub/sub gap); the
    /// socket writes what its device's history holds above what it wrote.
    pub resync: bool,
}

impl From<&DeviceCommand> for Outbound {
    fn from(command: &DeviceCommand) -> Self {
        Self {
            id: command.id,
            seq: command.seq,
            wire: command.to_wire().into(),
            issued_at: chrono::DateTime::parse_from_rfc3339(&command.issued_at)
                .ok()
                .map(|t| t.to_utc()),
            closes: false,
            resync: false,
        }
    }
}

/// The hub's caps (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sockets on this instance.
    pub max_connections: usize,
    /// Sockets per device on this instance.
    pub per_device: usize,
    /// Sockets per user on this instance.
    pub per_user: usize,
}

impl Limits {
    /// The configured caps.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_connections: config.ws_max_connections,
            per_device: config.ws_max_sockets_per_device,
            per_user: config.ws_max_sockets_per_user,
        }
    }
}

/// Why a socket could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The instance holds `max_connections` sockets.
    Instance,
    /// The user's devices hold `per_user` sockets here.
    User,
}

/// One registered socket: its queue, where it is told to close, and a unique id.
struct Slot {
    id: u64,
    user_id: Uuid,
    tx: mpsc::Sender<Arc<Outbound>>,
    close: watch::Sender<Option<CloseReason>>,
}

/// The registry (see the module docs).
pub struct Hub {
    sockets: DashMap<String, Vec<Slot>>,
    /// Sockets per user on this instance (entries removed at zero).
    users: DashMap<Uuid, usize>,
    acks: AckWriter,
    connections: AtomicUsize,
    limits: Limits,
    next_id: AtomicU64,
    /// Disconnects not yet published (Redis was down), with when they were
    /// kept (see the module docs).
    undelivered: DashMap<String, (CloseReason, std::time::Instant)>,
}

/// A registered socket: its registration (dropping it unregisters the
/// socket), its command queue, and the signal telling it to close.
pub struct Registered {
    /// Unregisters the socket when dropped.
    pub registration: Registration,
    /// Commands to write.
    pub commands: mpsc::Receiver<Arc<Outbound>>,
    /// Set when the hub wants the socket closed, with why.
    pub close: watch::Receiver<Option<CloseReason>>,
}

/// A socket's registration; dropping it unregisters the socket.
pub struct Registration {
    hub: Arc<Hub>,
    device_id: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut removed = None;
        let mut empty = false;
        if let Some(mut slots) = self.hub.sockets.get_mut(&self.device_id) {
            if let Some(at) = slots.iter().position(|s| s.id == self.id) {
                removed = Some(slots.remove(at));
            }
            empty = slots.is_empty();
        }
        if empty {
            self.hub
                .sockets
                .remove_if(&self.device_id, |_, slots| slots.is_empty());
        }
        // A replaced socket was already released when it was replaced.
        if let Some(slot) = removed {
            self.hub.release(slot.user_id);
        }
    }
}

impl Hub {
    /// Creates the hub and starts delivering published commands to it.
    pub async fn start(shared: Arc<dyn SharedState>, limits: Limits) -> StateResult<Arc<Self>> {
        let hub = Arc::new(Self {
            sockets: DashMap::new(),
            users: DashMap::new(),
            acks: AckWriter::start(shared.clone()),
            connections: AtomicUsize::new(0),
            limits,
            next_id: AtomicU64::new(1),
            undelivered: DashMap::new(),
        });
        tokio::spawn(publish_undelivered(Arc::downgrade(&hub), shared.clone()));
        let mut commands = shared.subscribe(keys::KILL_SWITCH_CHANNEL).await?;
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            while let Some(payload) = commands.recv().await {
                let Some(hub) = weak.upgrade() else { break };
                if payload.is_empty() {
                    tracing::warn!("kill-switch channel had a gap; every socket resyncs");
                    hub.resync_all();
                    continue;
                }
                match serde_json::from_slice::<Published>(&payload) {
                    Ok(Published { command, .. }) if command.device_id == super::EVERY_DEVICE => {
                        tokio::spawn(hub.clone().fan_out(shared.clone(), command));
                    }
                    Ok(Published {
                        command,
                        traceparent,
                    }) => {
                        // A lock addressed to the device ends its sockets once written.
                        let closes = matches!(
                            command.action,
                            Action::CriticalLock | Action::ImmediateQuarantine
                        );
                        // Delivered in the publisher's trace, when it was traced.
                        let span = match &traceparent {
                            Some(traceparent) => {
                                let span = tracing::info_span!(
                                    "killswitch.deliver",
                                    device_id = %command.device_id,
                                    seq = command.seq,
                                );
                                crate::telemetry::trace::adopt_context(&span, traceparent);
                                span
                            }
                            None => tracing::Span::none(),
                        };
                        span.in_scope(|| hub.deliver(&command, closes));
                    }
                    Err(e) => match serde_json::from_slice::<Disconnect>(&payload) {
                        Ok(disconnect) => {
                            hub.close_device(&disconnect.disconnect, disconnect.reason)
                        }
                        Err(_) => {
                            tracing::warn!(error = %e, "malformed kill-switch message ignored")
                        }
                    },
                }
            }
        });
        Ok(hub)
    }

    /// Registers a socket of `user_id`'s `device_id`: in a free slot under
    /// the device's, the user's and the instance's caps; else in the place of
    /// the device's oldest socket (told to close with 4001 `replaced`) when
    /// it holds one here; else refused.
    pub fn register(self: &Arc<Self>, device_id: &str, user_id: Uuid) -> Result<Registered, Full> {
        let (tx, commands) = mpsc::channel(SOCKET_QUEUE);
        let (close_tx, close) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The device's entry stays locked until the new slot is in, so two
        // sockets of one device opening at once cannot both pass the cap.
        let mut slots = self.sockets.entry(device_id.to_owned()).or_default();
        let free = slots.len() < self.limits.per_device && self.try_acquire(user_id).is_ok();
        if !free {
            if slots.is_empty() {
                // No socket of its own to replace: refused at a cap.
                let full = self.full_for(user_id);
                drop(slots);
                self.sockets
                    .remove_if(device_id, |_, slots| slots.is_empty());
                return Err(full);
            }
            let replaced = (slots.len() + 1)
                .saturating_sub(self.limits.per_device)
                .max(1);
            for old in slots.drain(..replaced) {
                old.close.send_replace(Some(CloseReason::Replaced));
                self.release(old.user_id);
            }
            self.acquire(user_id);
        }
        slots.push(Slot {
            id,
            user_id,
            tx,
            close: close_tx,
        });
        Ok(Registered {
            registration: Registration {
                hub: self.clone(),
                device_id: device_id.to_owned(),
                id,
            },
            commands,
            close,
        })
    }

    /// Counts a socket in a free slot, if the user's and the instance's caps allow.
    fn try_acquire(&self, user_id: Uuid) -> Result<(), Full> {
        let mut held = self.users.entry(user_id).or_default();
        if *held >= self.limits.per_user {
            return Err(Full::User);
        }
        let previous = self.connections.fetch_add(1, Ordering::Relaxed);
        if previous >= self.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            let none = *held == 0;
            drop(held);
            if none {
                self.users.remove_if(&user_id, |_, n| *n == 0);
            }
            return Err(Full::Instance);
        }
        *held += 1;
        Ok(())
    }

    /// Which cap refuses a new device of `user_id`.
    fn full_for(&self, user_id: Uuid) -> Full {
        let held = self.users.get(&user_id).map_or(0, |n| *n);
        if held >= self.limits.per_user {
            Full::User
        } else {
            Full::Instance
        }
    }

    /// Counts a socket taking a replaced one's place (no cap applies).
    fn acquire(&self, user_id: Uuid) {
        *self.users.entry(user_id).or_default() += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, user_id: Uuid) {
        if let Some(mut held) = self.users.get_mut(&user_id) {
            *held = held.saturating_sub(1);
        }
        self.users.remove_if(&user_id, |_, n| *n == 0);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Tells this instance's sockets of `device_id` to close with `reason`.
    pub fn close_device(&self, device_id: &str, reason: CloseReason) {
        if let Some(slots) = self.sockets.get(device_id) {
            for slot in slots.iter() {
                slot.close.send_replace(Some(reason));
            }
        }
    }

    /// Closes `device_id`'s sockets here now, and on every instance once
    /// Redis takes the [`Disconnect`] (for a lock whose command could not
    /// be issued; see the module docs).
    pub fn close_everywhere(&self, device_id: &str, reason: CloseReason) {
        self.close_device(device_id, reason);
        if self.undelivered.len() >= MAX_UNDELIVERED && !self.undelivered.contains_key(device_id) {
            tracing::warn!(
                device_id,
                "too many undelivered disconnects; this one is not kept"
            );
            return;
        }
        self.undelivered
            .insert(device_id.to_owned(), (reason, std::time::Instant::now()));
    }

    /// Drops `device_id`'s kept disconnect (the device was unlocked or
    /// deleted meanwhile: closing its sockets once Redis is back would be
    /// wrong).
    pub fn forget_undelivered(&self, device_id: &str) {
        self.undelivered.remove(device_id);
    }

    /// Disconnects kept for publishing.
    pub fn undelivered(&self) -> usize {
        self.undelivered.len()
    }

    /// Writes `command` to this instance's sockets of its device; `closes`:
    /// each socket closes once it has written it.
    pub fn deliver(&self, command: &DeviceCommand, closes: bool) {
        if let Some(slots) = self.sockets.get(&command.device_id) {
            let mut outbound = Outbound::from(command);
            outbound.closes = closes;
            let outbound = Arc::new(outbound);
            for slot in slots.iter() {
                if slot.tx.try_send(outbound.clone()).is_err() {
                    tracing::debug!(device_id = %command.device_id, "socket queue full; the device will resume from history");
                }
            }
        }
    }

    /// A global command: record one per locally connected device (each with
    /// its own sequence number, allocated and stored in batches of
    /// [`FAN_OUT_BATCH`] — one script call per batch on Redis) and write it.
    async fn fan_out(self: Arc<Self>, shared: Arc<dyn SharedState>, global: DeviceCommand) {
        use futures::StreamExt;
        let started = std::time::Instant::now();
        let devices = self.connected_devices();
        // Batches overlap, so Redis round trips of one hide behind the
        // serialisation and socket hand-off of another.
        futures::stream::iter(devices.chunks(FAN_OUT_BATCH))
            .for_each_concurrent(FAN_OUT_PARALLEL, |batch| {
                let (hub, shared, global) = (self.clone(), shared.clone(), &global);
                async move { hub.fan_out_batch(shared.as_ref(), global, batch).await }
            })
            .await;
        tracing::info!(
            devices = devices.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            action = global.action.as_str(),
            "global kill-switch command fanned out"
        );
    }

    async fn fan_out_batch(
        &self,
        shared: &dyn SharedState,
        global: &DeviceCommand,
        batch: &[String],
    ) {
        let keys: Vec<(String, String)> = batch
            .iter()
            .map(|d| (keys::command_seq(d), keys::force_overlay(d)))
            .collect();
        let mut commands: Vec<DeviceCommand> = batch
            .iter()
            .map(|device_id| DeviceCommand {
                id: uuid::Uuid::now_v7(),
                device_id: device_id.clone(),
                seq: 0,
                action: global.action,
                reason: global.reason.clone(),
                issued_at: global.issued_at.clone(),
            })
            .collect();
        // Stored without a sequence number: the history position is one.
        let payloads: Vec<Vec<u8>> = commands
            .iter()
            .map(|c| serde_json::to_vec(c).unwrap_or_default())
            .collect();
        let seqs = shared
            .sequence_and_push(&keys, &payloads, super::HISTORY_LEN, super::HISTORY_TTL)
            .await;
        match seqs {
            Ok(seqs) => {
                for (command, seq) in commands.iter_mut().zip(seqs) {
                    command.seq = seq;
                    self.deliver(command, false);
                }
            }
            Err(e) => tracing::warn!(error = %e, "global command batch not recorded"),
        }
    }

    /// Where sockets save their ack positions.
    pub fn acks(&self) -> &AckWriter {
        &self.acks
    }

    /// Asks every socket on this instance to write what its device's
    /// history holds above what it already wrote (after a pub/sub gap).
    pub fn resync_all(&self) {
        let resync = Arc::new(Outbound {
            id: uuid::Uuid::nil(),
            seq: 0,
            wire: axum::extract::ws::Utf8Bytes::from_static(""),
            issued_at: None,
            closes: false,
            resync: true,
        });
        for slots in self.sockets.iter() {
            for slot in slots.iter() {
                let _ = slot.tx.try_send(resync.clone());
            }
        }
    }

    /// Sockets open on this instance.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Devices with at least one socket on this instance.
    pub fn connected_devices(&self) -> Vec<String> {
        self.sockets.iter().map(|e| e.key().clone()).collect()
    }
}

/// Publishes the hub's undelivered disconnects until Redis takes them (see
/// the module docs); ends with the hub.
async fn publish_undelivered(hub: std::sync::Weak<Hub>, shared: Arc<dyn SharedState>) {
    let mut tick = tokio::time::interval(UNDELIVERED_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { break };
        hub.undelivered
            .retain(|_, (_, kept)| kept.elapsed() < UNDELIVERED_FOR);
        let pending: Vec<(String, CloseReason)> = hub
            .undelivered
            .iter()
            .map(|e| (e.key().clone(), e.value().0))
            .collect();
        for (device_id, reason) in pending {
            match super::disconnect(shared.as_ref(), &device_id, reason).await {
                Ok(()) => {
                    hub.undelivered.remove(&device_id);
                    tracing::info!(
                        device_id,
                        "lock taken during the outage published to every instance"
                    );
                }
                // Still down: the rest would fail the same way.
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryState;

    async fn hub(max_connections: usize, per_device: usize, per_user: usize) -> Arc<Hub> {
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(16));
        Hub::start(
            shared,
            Limits {
                max_connections,
                per_device,
                per_user,
            },
        )
        .await
        .expect("hub")
    }

    #[tokio::test]
    async fn caps_refuse_new_devices_and_replacement_needs_no_free_slot() {
        let hub = hub(3, 2, 2).await;
        let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = hub.register("a", u).expect("a1");
        let a2 = hub.register("a", u).expect("a2");
        let a3 = hub.register("a", u).expect("a3 replaces a1");
        assert_eq!(*a1.close.borrow(), Some(CloseReason::Replaced));
        assert_eq!(*a2.close.borrow(), None);
        assert_eq!(hub.connections(), 2);
        assert_eq!(hub.register("b", u).err(), Some(Full::User));
        let v1 = hub.register("c", v).expect("v1");
        assert_eq!(hub.connections(), 3);
        assert_eq!(hub.register("d", v).err(), Some(Full::Instance));
        // On a full instance a device with a socket here still gets in.
        let v2 = hub.register("c", v).expect("c reconnects");
        assert_eq!(*v1.close.borrow(), Some(CloseReason::Replaced));
        assert_eq!(hub.connections(), 3);
        // A replaced registration was released once, when it was replaced.
        drop((a1, v1));
        assert_eq!(hub.connections(), 3);
        drop((a2, a3, v2));
        assert_eq!(hub.connections(), 0);
        assert!(hub.users.is_empty() && hub.sockets.is_empty());
    }

    #[tokio::test]
    async fn close_device_tells_every_socket_of_the_device() {
        let hub = hub(10, 2, 10).await;
        let u = Uuid::new_v4();
        let (a1, a2, b1) = (
            hub.register("a", u).expect("a1"),
            hub.register("a", u).expect("a2"),
            hub.register("b", u).expect("b1"),
        );
        hub.close_device("a", CloseReason::Revoked);
        assert_eq!(*a1.close.borrow(), Some(CloseReason::Revoked));
        assert_eq!(*a2.close.borrow(), Some(CloseReason::Revoked));
        assert_eq!(*b1.close.borrow(), None);
    }
}
