//! Threat intelligence: known-bad app hashes, domains and addresses, as data
//! an operator changes at run time (`POST /v1/admin/threat-intel`,
//! `blockremote intel import`).

use async_trait::async_trait;
use sqlx::FromRow;

use super::{sql::SqlStore, StoreResult};

/// The threat-intelligence entries.
#[async_trait]
pub trait IntelStore: Send + Sync {
    /// Every threat-intelligence entry: `(kind, value)`, kind being
    /// `app_hash`, `domain` or `ip` (an address or CIDR).
    async fn threat_intel(&self) -> StoreResult<Vec<(String, String)>>;

    /// Adds and removes threat-intelligence entries in one transaction;
    /// returns how many rows changed.
    async fn update_threat_intel(
        &self,
        add: &[(String, String)],
        remove: &[(String, String)],
        reason: Option<&str>,
    ) -> StoreResult<u64>;
}

/// A `threat_intel` entry.
#[derive(FromRow)]
struct IntelRow {
    kind: String,
    value: String,
}

for_each_dialect! {
    #[async_trait]
    impl IntelStore for SqlStore<Db> {
        async fn threat_intel(&self) -> StoreResult<Vec<(String, String)>> {
            let rows: Vec<IntelRow> =
                sqlx::query_as("SELECT kind, value FROM threat_intel ORDER BY kind, value")
                    .fetch_all(&self.pool)
                    .await?;
            Ok(rows.into_iter().map(|r| (r.kind, r.value)).collect())
        }

        async fn update_threat_intel(
            &self,
            add: &[(String, String)],
            remove: &[(String, String)],
            reason: Option<&str>,
        ) -> StoreResult<u64> {
            let mut tx = self.pool.begin().await?;
            let mut changed = 0;
            for (kind, value) in add {
                changed += sqlx::query(
                    "INSERT INTO threat_intel (kind, value, reason) VALUES ($1, $2, $3) \
                     ON CONFLICT (kind, value) DO NOTHING",
                )
                .bind(kind)
                .bind(value)
                .bind(reason)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            for (kind, value) in remove {
                changed += sqlx::query("DELETE FROM threat_intel WHERE kind = $1 AND value = $2")
                    .bind(kind)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            Ok(changed)
        }
    }
}
