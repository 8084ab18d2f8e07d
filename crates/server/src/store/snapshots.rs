//! Snapshots of the devices' engine states, the durable copy behind shared
//! state (`crate::signals::snapshots` writes them behind and reads them
//! when a state is missing from Redis).

use async_trait::async_trait;

use super::{sql::SqlStore, StoreResult};

/// One device's stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSnapshot {
    /// The device.
    pub device_id: String,
    /// The engine state, as shared state holds it (postcard).
    pub state: Vec<u8>,
    /// When the state was taken (Unix ms): a snapshot replaces the stored
    /// one only if it is newer.
    pub saved_at: i64,
}

/// The durable copy of engine states.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Saves each snapshot in place of the device's previous one if newer
    /// (by `saved_at`), in one transaction (devices that no longer exist
    /// are skipped).
    async fn save_engine_snapshots(&self, snapshots: &[EngineSnapshot]) -> StoreResult<()>;

    /// The stored snapshots of `device_ids` (those that have one).
    async fn engine_snapshots(&self, device_ids: &[&str]) -> StoreResult<Vec<EngineSnapshot>>;
}

for_each_dialect! {
    #[async_trait]
    impl SnapshotStore for SqlStore<Db> {
        async fn save_engine_snapshots(&self, snapshots: &[EngineSnapshot]) -> StoreResult<()> {
            if snapshots.is_empty() {
                return Ok(());
            }
            let mut tx = self.pool.begin().await?;
            for s in snapshots {
                sqlx::query(
                    "INSERT INTO engine_snapshots (device_id, state, saved_at) \
                     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1) \
                     ON CONFLICT (device_id) DO UPDATE \
                     SET state = excluded.state, saved_at = excluded.saved_at \
                     WHERE engine_snapshots.saved_at < excluded.saved_at",
                )
                .bind(&s.device_id)
                .bind(&s.state)
                .bind(s.saved_at)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }

        async fn engine_snapshots(&self, device_ids: &[&str]) -> StoreResult<Vec<EngineSnapshot>> {
            let mut found = Vec::new();
            // One query per chunk (a batch asks for the few devices whose
            // state is missing, usually none; SQLite allows 999 parameters).
            for chunk in device_ids.chunks(500) {
                let placeholders: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
                let sql = format!(
                    "SELECT device_id, state, saved_at FROM engine_snapshots WHERE device_id IN ({})",
                    placeholders.join(", ")
                );
                let mut query = sqlx::query_as::<_, (String, Vec<u8>, i64)>(&sql);
                for device_id in chunk {
                    query = query.bind(*device_id);
                }
                for (device_id, state, saved_at) in query.fetch_all(&self.pool).await? {
                    found.push(EngineSnapshot {
                        device_id,
                        state,
                        saved_at,
                    });
                }
            }
            Ok(found)
        }
    }
}
