//! Key material the server keeps: JWT signing keys (so every replica signs
//! with the same current key), named server secrets (one value shared by
//! every replica) and admin API keys (only their SHA-256).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{types::Json, FromRow};
use uuid::Uuid;

use super::{
    columns::{Id, Time},
    now_micros,
    sql::SqlStore,
    StoreResult,
};

/// A JWT signing key as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRecord {
    /// Key id (`kid`).
    pub kid: String,
    /// `ES256` or `RS256`.
    pub alg: String,
    /// The private key (PKCS#8 or PKCS#1 DER), sealed under the KEK when
    /// one is configured (`auth::kek`); `None` when held outside the database.
    pub private_der: Option<Vec<u8>>,
    /// The public JWK.
    pub public_jwk: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it stopped signing.
    pub retired_at: Option<DateTime<Utc>>,
    /// When it was revoked: it no longer verifies either.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Signing keys, server secrets and admin keys.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Every signing key, oldest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;

    /// Adds a signing key; when `retire_others` it becomes the only unretired one.
    async fn insert_signing_key(
        &self,
        key: SigningKeyRecord,
        retire_others: bool,
    ) -> StoreResult<()>;

    /// The named server secret, created from `candidate` if absent. Every
    /// replica gets the same value.
    async fn server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>>;

    /// The named server secret as stored, if it exists (creates nothing).
    async fn read_server_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Every server secret as stored, by name.
    async fn server_secrets(&self) -> StoreResult<Vec<(String, Vec<u8>)>>;

    /// Replaces a server secret's stored value if it is still `old`
    /// (compare-and-swap, so instances sealing it at once agree).
    async fn replace_server_secret(&self, name: &str, old: &[u8], new: &[u8]) -> StoreResult<bool>;

    /// Replaces a signing key's stored private key if it is still `old`.
    async fn replace_private_key(&self, kid: &str, old: &[u8], new: &[u8]) -> StoreResult<bool>;

    /// Revokes a signing key at `at` (it also stops signing); false when no
    /// such key exists.
    async fn revoke_signing_key(&self, kid: &str, at: DateTime<Utc>) -> StoreResult<bool>;

    /// Stores an admin API key's hash.
    async fn insert_admin_key(&self, name: &str, key_sha256: &[u8]) -> StoreResult<Uuid>;

    /// True when an unrevoked admin key has this hash.
    async fn admin_key_exists(&self, key_sha256: &[u8]) -> StoreResult<bool>;
}

/// A `signing_keys` row.
#[derive(FromRow)]
struct SigningKeyRow {
    kid: String,
    alg: String,
    private_der: Option<Vec<u8>>,
    public_jwk: Json<serde_json::Value>,
    created_at: Time,
    retired_at: Option<Time>,
    revoked_at: Option<Time>,
}

impl From<SigningKeyRow> for SigningKeyRecord {
    fn from(row: SigningKeyRow) -> Self {
        Self {
            kid: row.kid,
            alg: row.alg,
            private_der: row.private_der,
            public_jwk: row.public_jwk.0,
            created_at: row.created_at.into(),
            retired_at: row.retired_at.map(Into::into),
            revoked_at: row.revoked_at.map(Into::into),
        }
    }
}

for_each_dialect! {
    #[async_trait]
    impl KeyStore for SqlStore<Db> {
        async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
            let rows: Vec<SigningKeyRow> = sqlx::query_as(
                "SELECT kid, alg, private_der, public_jwk, created_at, retired_at, revoked_at \
                 FROM signing_keys \
                 ORDER BY created_at, kid",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(SigningKeyRecord::from).collect())
        }

        async fn insert_signing_key(
            &self,
            key: SigningKeyRecord,
            retire_others: bool,
        ) -> StoreResult<()> {
            let mut tx = self.pool.begin().await?;
            if retire_others {
                sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
                    .bind(Time(key.created_at))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO signing_keys (kid, alg, private_der, public_jwk, created_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (kid) DO UPDATE SET retired_at = NULL \
                 WHERE signing_keys.revoked_at IS NULL",
            )
            .bind(&key.kid)
            .bind(&key.alg)
            .bind(&key.private_der)
            .bind(Json(&key.public_jwk))
            .bind(Time(key.created_at))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        }

        async fn server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>> {
            sqlx::query(
                "INSERT INTO server_secrets (name, value, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(candidate)
            .bind(Time(now_micros()))
            .execute(&self.pool)
            .await?;
            Ok(
                sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?,
            )
        }

        async fn read_server_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
            Ok(sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?)
        }

        async fn server_secrets(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
            Ok(sqlx::query_as("SELECT name, value FROM server_secrets ORDER BY name")
                .fetch_all(&self.pool)
                .await?)
        }

        async fn replace_server_secret(
            &self,
            name: &str,
            old: &[u8],
            new: &[u8],
        ) -> StoreResult<bool> {
            let done = sqlx::query("UPDATE server_secrets SET value = $1 WHERE name = $2 AND value = $3")
                .bind(new)
                .bind(name)
                .bind(old)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn replace_private_key(&self, kid: &str, old: &[u8], new: &[u8]) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE signing_keys SET private_der = $1 WHERE kid = $2 AND private_der = $3",
            )
            .bind(new)
            .bind(kid)
            .bind(old)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn revoke_signing_key(&self, kid: &str, at: DateTime<Utc>) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE signing_keys SET revoked_at = COALESCE(revoked_at, $1), \
                 retired_at = COALESCE(retired_at, $1) WHERE kid = $2",
            )
            .bind(Time(at))
            .bind(kid)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn insert_admin_key(&self, name: &str, key_sha256: &[u8]) -> StoreResult<Uuid> {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO admin_keys (id, name, key_sha256, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(Id(id))
            .bind(name)
            .bind(key_sha256)
            .bind(Time(now_micros()))
            .execute(&self.pool)
            .await?;
            Ok(id)
        }

        async fn admin_key_exists(&self, key_sha256: &[u8]) -> StoreResult<bool> {
            Ok(sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM admin_keys WHERE key_sha256 = $1 AND revoked_at IS NULL)",
            )
            .bind(key_sha256)
            .fetch_one(&self.pool)
            .await?)
        }
    }
}
