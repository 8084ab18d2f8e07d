//! The durable copy of each device's recent kill-switch commands, behind
//! the shared history (`force_overlay:{device}`): a phone that reconnects
//! after Redis lost its data is still sent the commands it never acked.

use async_trait::async_trait;

use super::{sql::SqlStore, StoreResult};

/// A command as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCommand {
    /// Its sequence number for the device.
    pub seq: u64,
    /// The command as the shared history holds it (JSON).
    pub command: String,
}

/// Recent kill-switch commands per device.
#[async_trait]
pub trait CommandStore: Send + Sync {
    /// Keeps `command` as `device_id`'s number `seq` (issued at
    /// `issued_at_ms`; a number issued again — after a failover to a
    /// lagging replica — is the newer command), raises the device's command counter to it, and
    /// forgets the device's commands `keep` or more below it — one
    /// transaction. An unknown device is skipped.
    async fn record_command(
        &self,
        device_id: &str,
        seq: u64,
        command: &str,
        issued_at_ms: i64,
        keep: u64,
    ) -> StoreResult<()>;

    /// `device_id`'s commands above `since` issued at or after
    /// `issued_after_ms`, oldest first, at most `limit`.
    async fn commands_since(
        &self,
        device_id: &str,
        since: u64,
        issued_after_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredCommand>>;
}

/// A sequence number as a column (they stay far below 2^63).
fn column(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

for_each_dialect! {
    #[async_trait]
    impl CommandStore for SqlStore<Db> {
        async fn record_command(
            &self,
            device_id: &str,
            seq: u64,
            command: &str,
            issued_at_ms: i64,
            keep: u64,
        ) -> StoreResult<()> {
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE devices SET command_seq = $2 WHERE id = $1 AND command_seq < $2")
                .bind(device_id)
                .bind(column(seq))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO device_commands (device_id, seq, command, issued_at) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1) \
                 ON CONFLICT (device_id, seq) DO UPDATE \
                 SET command = excluded.command, issued_at = excluded.issued_at",
            )
            .bind(device_id)
            .bind(column(seq))
            .bind(command)
            .bind(issued_at_ms)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM device_commands WHERE device_id = $1 AND seq <= $2")
                .bind(device_id)
                .bind(column(seq.saturating_sub(keep)))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }

        async fn commands_since(
            &self,
            device_id: &str,
            since: u64,
            issued_after_ms: i64,
            limit: u32,
        ) -> StoreResult<Vec<StoredCommand>> {
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT seq, command FROM device_commands \
                 WHERE device_id = $1 AND seq > $2 AND issued_at >= $3 ORDER BY seq LIMIT $4",
            )
            .bind(device_id)
            .bind(column(since))
            .bind(issued_after_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(seq, command)| StoredCommand {
                    seq: u64::try_from(seq).unwrap_or(0),
                    command,
                })
                .collect())
        }
    }
}
