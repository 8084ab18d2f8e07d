//! Per-device sequence numbers that must never go back — the last heartbeat
//! `seq` accepted and the last kill-switch command `seq` issued — kept in
//! the durable store so that shared state that lost its data (a Redis
//! restarted without persistence, a failover to a lagging replica, a
//! `FLUSHALL`) can be refilled without reopening replay windows or
//! restarting command numbering. Shared state stays the source of truth
//! while it has them; `crate::sequences` writes here behind it.

use async_trait::async_trait;

use super::{sql::SqlStore, StoreResult};

/// Which of a device's sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SequenceKind {
    /// The highest heartbeat `seq` accepted.
    Heartbeat,
    /// The highest kill-switch command `seq` issued.
    Command,
    /// The highest kill-switch command `seq` the device acked.
    Acked,
}

impl SequenceKind {
    /// Its column on `devices` (a constant, never input).
    fn column(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat_seq",
            Self::Command => "command_seq",
            Self::Acked => "command_acked_seq",
        }
    }
}

/// The durable copy of the sequence numbers.
#[async_trait]
pub trait SequenceStore: Send + Sync {
    /// The stored number of `kind` for `device_id` (0 when none or no such device).
    async fn device_sequence(&self, device_id: &str, kind: SequenceKind) -> StoreResult<u64>;

    /// Sets `device_id`'s number of `kind` back to 0 (a new session starts
    /// heartbeat `seq`s afresh).
    async fn reset_device_sequence(&self, device_id: &str, kind: SequenceKind) -> StoreResult<()>;

    /// Raises each device's number of `kind` to the given value where it is
    /// lower, in one transaction (unknown devices are skipped).
    async fn raise_device_sequences(
        &self,
        kind: SequenceKind,
        entries: &[(String, u64)],
    ) -> StoreResult<()>;
}

for_each_dialect! {
    #[async_trait]
    impl SequenceStore for SqlStore<Db> {
        async fn device_sequence(&self, device_id: &str, kind: SequenceKind) -> StoreResult<u64> {
            let sql = format!("SELECT {} FROM devices WHERE id = $1", kind.column());
            let value: Option<i64> = sqlx::query_scalar(&sql)
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
        }

        async fn reset_device_sequence(&self, device_id: &str, kind: SequenceKind) -> StoreResult<()> {
            let sql = format!("UPDATE devices SET {} = 0 WHERE id = $1", kind.column());
            sqlx::query(&sql).bind(device_id).execute(&self.pool).await?;
            Ok(())
        }

        async fn raise_device_sequences(
            &self,
            kind: SequenceKind,
            entries: &[(String, u64)],
        ) -> StoreResult<()> {
            if entries.is_empty() {
                return Ok(());
            }
            let sql = format!(
                "UPDATE devices SET {column} = $2 WHERE id = $1 AND {column} < $2",
                column = kind.column()
            );
            let mut tx = self.pool.begin().await?;
            for (device_id, value) in entries {
                // Ingestion caps seq below 2^53, so it always fits.
                let value = i64::try_from(*value).unwrap_or(i64::MAX);
                sqlx::query(&sql)
                    .bind(device_id)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }
    }
}
