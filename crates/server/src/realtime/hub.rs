//! The per-instance registry of kill-switch sockets.
//!
//! The hub subscribes once to the kill-switch channel and writes each command
//! to the sockets of its device held by this instance. Writes never block the
//! fan-out: each socket has a small queue, and a socket whose queue is full
//! misses the live copy and gets it from history on resume. The number of
//! sockets is capped, so a flood of connections cannot exhaust memory.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use dashmap::DashMap;
use tokio::sync::mpsc;

use super::{acks::AckWriter, DeviceCommand};
use crate::state::{keys, SharedState, StateResult};

/// Devices whose global command is sequenced and stored per round trip.
pub const FAN_OUT_BATCH: usize = 250;
/// Batches of a global fan-out in flight at once.
pub const FAN_OUT_PARALLEL: usize = 8;

/// Messages queued per socket before live copies are dropped (history covers them).
pub const SOCKET_QUEUE: usize = 16;

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
        }
    }
}

/// One registered socket: its queue and a unique id.
struct Slot {
    id: u64,
    tx: mpsc::Sender<Arc<Outbound>>,
}

/// The registry (see the module docs).
pub struct Hub {
    sockets: DashMap<String, Vec<Slot>>,
    acks: AckWriter,
    connections: AtomicUsize,
    max_connections: usize,
    next_id: AtomicU64,
}

/// A socket's registration; dropping it unregisters the socket.
pub struct Registration {
    hub: Arc<Hub>,
    device_id: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut empty = false;
        if let Some(mut slots) = self.hub.sockets.get_mut(&self.device_id) {
            slots.retain(|s| s.id != self.id);
            empty = slots.is_empty();
        }
        if empty {
            self.hub
                .sockets
                .remove_if(&self.device_id, |_, slots| slots.is_empty());
        }
        self.hub.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    /// Creates the hub and starts delivering published commands to it.
    pub async fn start(
        shared: Arc<dyn SharedState>,
        max_connections: usize,
    ) -> StateResult<Arc<Self>> {
        let hub = Arc::new(Self {
            sockets: DashMap::new(),
            acks: AckWriter::start(shared.clone()),
            connections: AtomicUsize::new(0),
            max_connections,
            next_id: AtomicU64::new(1),
        });
        let mut commands = shared.subscribe(keys::KILL_SWITCH_CHANNEL).await?;
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            while let Some(payload) = commands.recv().await {
                let Some(hub) = weak.upgrade() else { break };
                match serde_json::from_slice::<DeviceCommand>(&payload) {
                    Ok(command) if command.device_id == super::EVERY_DEVICE => {
                        tokio::spawn(hub.clone().fan_out(shared.clone(), command));
                    }
                    Ok(command) => hub.deliver(&command),
                    Err(e) => tracing::warn!(error = %e, "malformed kill-switch message ignored"),
                }
            }
        });
        Ok(hub)
    }

    /// Registers a socket for `device_id`, or `None` when at capacity.
    pub fn register(
        self: &Arc<Self>,
        device_id: &str,
    ) -> Option<(Registration, mpsc::Receiver<Arc<Outbound>>)> {
        let previous = self.connections.fetch_add(1, Ordering::Relaxed);
        if previous >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sockets
            .entry(device_id.to_owned())
            .or_default()
            .push(Slot { id, tx });
        Some((
            Registration {
                hub: self.clone(),
                device_id: device_id.to_owned(),
                id,
            },
            rx,
        ))
    }

    /// Writes `command` to this instance's sockets of its device.
    pub fn deliver(&self, command: &DeviceCommand) {
        if let Some(slots) = self.sockets.get(&command.device_id) {
            let outbound = Arc::new(Outbound::from(command));
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
                    self.deliver(command);
                }
            }
            Err(e) => tracing::warn!(error = %e, "global command batch not recorded"),
        }
    }

    /// Where sockets save their ack positions.
    pub fn acks(&self) -> &AckWriter {
        &self.acks
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
