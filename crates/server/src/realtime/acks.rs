//! Saving kill-switch ack positions in batches.
//!
//! A global command makes every connected device ack within the same few
//! milliseconds. Saving each ack as its own round trip would queue 10 000
//! writes on the shared-state connection in front of the fan-out's own
//! writes. Instead sockets hand `(device, seq)` to one task, which saves
//! whatever has accumulated since its last write in a single call
//! ([`SharedState::set_max_many`]): with one ack waiting it is written at
//! once, so a quiet socket's ack is saved as fast as before.
//!
//! An ack not yet saved when the process dies only means the command is sent
//! again on reconnect, which the protocol already allows (clients dedupe by
//! `id`).

use std::{collections::HashMap, sync::Arc};

use tokio::sync::mpsc;

use crate::state::{keys, SharedState};

/// Acks waiting to be saved before sockets fall back to saving their own.
const QUEUE: usize = 65_536;
/// Most positions saved in one call.
const MAX_BATCH: usize = 1_000;

/// Hands ack positions to the saving task.
#[derive(Clone)]
pub struct AckWriter {
    tx: mpsc::Sender<(String, u64)>,
    shared: Arc<dyn SharedState>,
}

impl AckWriter {
    /// Starts the saving task.
    pub fn start(shared: Arc<dyn SharedState>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(save_batches(shared.clone(), rx));
        Self { tx, shared }
    }

    /// Records that `device_id` acked up to `seq` (the position only rises).
    pub async fn ack(&self, device_id: &str, seq: u64) {
        if let Err(mpsc::error::TrySendError::Full((device_id, seq))) =
            self.tx.try_send((device_id.to_owned(), seq))
        {
            save(
                self.shared.as_ref(),
                &[(keys::command_acked(&device_id), seq)],
            )
            .await;
        }
    }
}

async fn save_batches(shared: Arc<dyn SharedState>, mut rx: mpsc::Receiver<(String, u64)>) {
    let mut batch: Vec<(String, u64)> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One position per device: the highest.
        let mut highest: HashMap<String, u64> = HashMap::with_capacity(batch.len());
        for (device_id, seq) in batch.drain(..) {
            let entry = highest.entry(device_id).or_default();
            *entry = (*entry).max(seq);
        }
        let entries: Vec<(String, u64)> = highest
            .into_iter()
            .map(|(device_id, seq)| (keys::command_acked(&device_id), seq))
            .collect();
        save(shared.as_ref(), &entries).await;
    }
}

async fn save(shared: &dyn SharedState, entries: &[(String, u64)]) {
    if let Err(e) = shared.set_max_many(entries, super::HISTORY_TTL).await {
        tracing::warn!(error = %e, acks = entries.len(), "ack positions not saved; those commands may be sent again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryState;

    #[tokio::test]
    async fn acks_are_saved_and_only_rise() {
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(16));
        let writer = AckWriter::start(shared.clone());
        writer.ack("dev-1", 3).await;
        writer.ack("dev-1", 2).await;
        writer.ack("dev-2", 7).await;
        let read = |device: &'static str| {
            let shared = shared.clone();
            async move {
                shared
                    .get(&keys::command_acked(device))
                    .await
                    .expect("test value")
                    .map(|v| String::from_utf8(v).expect("test value"))
            }
        };
        for _ in 0..100 {
            if read("dev-1").await.as_deref() == Some("3")
                && read("dev-2").await.as_deref() == Some("7")
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "acks not saved: {:?} {:?}",
            read("dev-1").await,
            read("dev-2").await
        );
    }
}
