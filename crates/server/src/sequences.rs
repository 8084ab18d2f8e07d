//! The sequence numbers replay protection and the kill-switch protocol
//! stand on, made to survive shared state that loses its data.
//!
//! Shared state holds each device's last accepted heartbeat `seq`
//! (`sig:seq:{device}`) and last command `seq` (`force_overlay:seq:{device}`).
//! If Redis restarts without persistence, fails over to a lagging replica or
//! is flushed by mistake, those keys vanish, and a missing `seq` would accept
//! any heartbeat again — a replay window — while command numbering would
//! restart at 1, below what the phone last saw.
//!
//! The position each phone acked its commands up to (`force_overlay:acked:`)
//! is written behind the same way: after a loss, a reconnecting phone is
//! sent the commands above it from the store's copy of the history
//! (`crate::store::CommandStore`), never the ones it already acked.
//!
//! So every accepted number is also written behind to the store
//! ([`SequenceStore`]): [`Sequences::note`] keeps the highest per device in
//! memory and a task writes them about once a second ([`FLUSH_EVERY`]), in
//! one transaction. A key found missing is refilled by [`Sequences::seed`]:
//! the stored number, plus [`MARGIN`] when there is one — more than a device
//! can have been accepted in the writes that may not have landed (one
//! interval, or two if this process died before its last flush). The margin
//! makes recovery safe rather than exact: no number already used is
//! accepted again; the phone's next heartbeat may be told 409 `replay` with
//! `last_seq` and continue above it, and commands simply jump ahead.
//!
//! What this does not cover: a device whose first heartbeats all fall in
//! the last interval before the loss (nothing stored yet: it restarts from
//! 0), and a store that is itself down (notes are kept, bounded, and written
//! once it is back).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use crate::store::{SequenceKind, Store, StoreResult};

/// How often noted numbers are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Added to a stored number when a missing key is refilled: above what the
/// fastest plan can have accepted in two write intervals (1200 per minute
/// is 40 in 2 s; commands are far rarer).
pub const MARGIN: u64 = 64;

/// Devices noted and not yet written, per kind, beyond which the oldest
/// notes wait for the next flush rather than growing the map (a store that
/// is down for long must not grow memory without bound).
const MAX_PENDING: usize = 200_000;

/// The write-behind of per-device sequence numbers (see the module doc).
pub struct Sequences {
    store: Arc<dyn Store>,
    heartbeats: Mutex<HashMap<String, u64>>,
    commands: Mutex<HashMap<String, u64>>,
    acks: Mutex<HashMap<String, u64>>,
}

impl Sequences {
    /// Starts the write-behind task; it ends when the last handle is dropped.
    pub fn start(store: Arc<dyn Store>) -> Arc<Self> {
        let sequences = Arc::new(Self {
            store,
            heartbeats: Mutex::default(),
            commands: Mutex::default(),
            acks: Mutex::default(),
        });
        spawn_write_behind(&sequences, FLUSH_EVERY, "sequence numbers", |s| {
            Box::pin(s.flush())
        });
        sequences
    }

    fn pending(&self, kind: SequenceKind) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        match kind {
            SequenceKind::Heartbeat => &self.heartbeats,
            SequenceKind::Command => &self.commands,
            SequenceKind::Acked => &self.acks,
        }
        .lock()
        .unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `device_id`'s number of `kind` reached `value`.
    pub fn note(&self, kind: SequenceKind, device_id: &str, value: u64) {
        let mut pending = self.pending(kind);
        if let Some(current) = pending.get_mut(device_id) {
            *current = (*current).max(value);
        } else if pending.len() < MAX_PENDING {
            pending.insert(device_id.to_owned(), value);
        }
    }

    /// What a missing key of `kind` for `device_id` is refilled with: the
    /// highest number known (stored or noted here), plus [`MARGIN`] when
    /// there is one; 0 for a device that never had one.
    pub async fn seed(&self, kind: SequenceKind, device_id: &str) -> StoreResult<u64> {
        let stored = self.store.device_sequence(device_id, kind).await?;
        let noted = self.pending(kind).get(device_id).copied().unwrap_or(0);
        let known = stored.max(noted);
        Ok(if known == 0 { 0 } else { known + MARGIN })
    }

    /// The highest number of `kind` known for `device_id` (stored or
    /// noted here), without a margin: for a position that must not skip
    /// ahead (the acked command, below which nothing is sent again).
    pub async fn known(&self, kind: SequenceKind, device_id: &str) -> StoreResult<u64> {
        let stored = self.store.device_sequence(device_id, kind).await?;
        let noted = self.pending(kind).get(device_id).copied().unwrap_or(0);
        Ok(stored.max(noted))
    }

    /// Writes every noted number now; on failure they are kept for the next try.
    pub async fn flush(&self) -> StoreResult<()> {
        for kind in [
            SequenceKind::Heartbeat,
            SequenceKind::Command,
            SequenceKind::Acked,
        ] {
            let entries: Vec<(String, u64)> = self.pending(kind).drain().collect();
            if entries.is_empty() {
                continue;
            }
            if let Err(e) = self.store.raise_device_sequences(kind, &entries).await {
                for (device, value) in entries {
                    self.note(kind, &device, value);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Runs `flush` on `owner` every `every` until the last handle to it is
/// dropped; a failure is logged (`what` was not written) and retried at the
/// next tick. The one timer loop of every write-behind (sequence numbers
/// here, engine snapshots in `signals::snapshots`).
pub(crate) fn spawn_write_behind<T, F>(
    owner: &Arc<T>,
    every: Duration,
    what: &'static str,
    flush: F,
) where
    T: Send + Sync + 'static,
    F: for<'a> Fn(&'a T) -> futures::future::BoxFuture<'a, StoreResult<()>> + Send + 'static,
{
    let owner: Weak<T> = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else {
                return;
            };
            if let Err(e) = flush(&owner).await {
                tracing::warn!(error = %e, what, "not written to the store; retrying");
            }
        }
    });
}
