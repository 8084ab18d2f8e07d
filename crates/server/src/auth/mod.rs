//! Identity: device-bound sessions, signing keys, admin keys, attestation.
//!
//! [`Auth`] holds what every request needs to authenticate: the key ring, the
//! device-status cache, the IP HMAC key and the token settings. Sessions are
//! opened, rotated and revoked by [`sessions::Sessions`]; the HTTP layer's
//! extractors (`http::extract`) turn a request's credentials into a caller.

pub mod app_attest;
pub mod attestation;
pub mod client_ip;
pub mod device_status;
#[cfg(test)]
#[path = "../../tests/fixtures/attestation.rs"]
pub(crate) mod fixtures;
pub mod kek;
pub mod keys;
pub mod passwords;
pub mod play_integrity;
pub mod sealed;
pub mod sessions;
pub mod successor;
pub mod tokens;
pub mod verified;

use std::{net::IpAddr, sync::Arc, time::Duration};

use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use self::{device_status::DeviceStatusCache, keys::KeyRing};
use crate::{
    config::Config,
    state::SharedState,
    store::{DeviceStatus, NewEvent, Store, UserStatus},
};

/// An authenticated device session: who is calling, once the HTTP layer's
/// extractors (`http::extract`) have verified the token and the device.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// The user.
    pub user_id: Uuid,
    /// The device.
    pub device_id: String,
    /// The access token's id.
    pub jti: Uuid,
    /// The access token's expiry (Unix seconds).
    pub expires_at: i64,
}

/// Why a device may not act, from its stored status and its owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRefusal {
    /// The owner's account is blocked: every device of it is refused.
    AccountBlocked,
    /// Its sessions were revoked (e.g. refresh-token reuse).
    Revoked,
    /// It is locked by the kill-switch or quarantined.
    Locked,
}

impl DeviceRefusal {
    /// The refusal a device in `status` whose owner is in `owner` gets, if
    /// any; a blocked owner comes first, whatever the device's own holds.
    pub fn for_device(status: DeviceStatus, owner: UserStatus) -> Option<Self> {
        if owner != UserStatus::Active {
            return Some(Self::AccountBlocked);
        }
        match status {
            DeviceStatus::Active => None,
            DeviceStatus::Revoked => Some(Self::Revoked),
            DeviceStatus::Locked | DeviceStatus::Quarantined => Some(Self::Locked),
        }
    }
}

/// Why identity could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The signing keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// The key-encryption key is missing or unusable.
    #[error(transparent)]
    Kek(#[from] kek::KekError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Authentication services shared by every handler.
pub struct Auth {
    /// Signing and verifying keys.
    pub keys: KeyRing,
    /// Device status, cached briefly and invalidated across instances.
    pub devices: DeviceStatusCache,
    /// Tokens whose signature and claims were already verified.
    pub verified: Arc<verified::VerifiedTokens>,
    /// The key-encryption key, when one is configured.
    pub kek: Option<Arc<kek::Kek>>,
    ip_key: Vec<u8>,
    admin_bootstrap: Option<[u8; 32]>,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// `aud` of issued tokens.
    pub audience: String,
    /// Access-token lifetime.
    pub access_ttl: Duration,
}

/// SHA-256 of a secret (tokens, keys, fingerprints).
pub fn sha256(input: &[u8]) -> [u8; 32] {
    Sha256::digest(input).into()
}

/// A fresh 256-bit random secret, base64url, with a type prefix.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{prefix}{}",
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    )
}

impl Auth {
    /// Loads keys and secrets from the store and starts the cache invalidation listener.
    pub async fn load(
        config: &Config,
        store: &dyn Store,
        shared: Arc<dyn SharedState>,
    ) -> Result<Self, AuthSetupError> {
        let external = match &config.jwt_private_key {
            Some(pem) => Some(keys::ExternalKey::from_pem(pem.expose_secret())?),
            None => None,
        };
        let window = config.access_token_ttl + Duration::from_secs(tokens::LEEWAY_SECONDS + 60);
        let kek = kek::resolve(config, kek::Generate::IfMissing)?.map(Arc::new);
        let keys =
            KeyRing::load(store, external, config.jwt_algorithm, window, kek.clone()).await?;
        let mut candidate = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut candidate);
        let ip_key = sealed::secret(store, kek.as_deref(), sealed::IP_HMAC, &candidate).await?;
        store.set_chain_key(sealed::chain_key(store, kek.as_deref(), true).await?);
        passwords::warm_up();
        Ok(Self {
            keys,
            devices: DeviceStatusCache::start(shared.clone(), config.attestation_max_age).await?,
            verified: forget_signed_out(shared.as_ref()).await?,
            kek,
            ip_key,
            admin_bootstrap: config
                .admin_token
                .as_ref()
                .map(|t| sha256(t.expose_secret().as_bytes())),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: config.access_token_ttl,
        })
    }

    /// A business event with the client's IP anonymized (prefix + keyed HMAC).
    pub fn event(
        &self,
        event_type: &str,
        user_id: Option<Uuid>,
        device_id: Option<&str>,
        ip: Option<IpAddr>,
        metadata: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            event_type: event_type.to_owned(),
            user_id,
            device_id: device_id.map(str::to_owned),
            ip_prefix: ip.map(client_ip::prefix),
            ip_hmac: ip.map(|ip| client_ip::hmac(&self.ip_key, ip)),
            metadata,
        }
    }

    /// Re-reads the signing keys; when one stopped verifying (revoked),
    /// forgets every cached verification so its tokens are refused at once.
    pub async fn reload_keys(&self, store: &dyn Store) -> Result<(), keys::KeyError> {
        let reloaded = self.keys.reload(store).await;
        // Also when a reload for an unknown kid (`KeyRing::learn`) dropped one.
        if self.keys.take_dropped() {
            self.verified.clear();
        }
        reloaded.map(drop)
    }

    /// The key of the IP HMAC (for rate-limit scopes that must not hold an address).
    pub fn ip_key(&self) -> &[u8] {
        &self.ip_key
    }

    /// The anonymized prefix of an address, for audit rows.
    pub fn ip_prefix(ip: Option<IpAddr>) -> Option<String> {
        ip.map(client_ip::prefix)
    }
}

/// Pub/sub channel carrying the `jti`s of signed-out access tokens.
pub const SIGNED_OUT_CHANNEL: &str = "session:signed_out";

/// The verified-token cache, emptied of each token signed out on any
/// instance as soon as the news arrives.
async fn forget_signed_out(
    shared: &dyn SharedState,
) -> crate::state::StateResult<Arc<verified::VerifiedTokens>> {
    let cache = Arc::new(verified::VerifiedTokens::default());
    let mut signed_out = shared.subscribe(SIGNED_OUT_CHANNEL).await?;
    let weak = Arc::downgrade(&cache);
    tokio::spawn(async move {
        while let Some(message) = signed_out.recv().await {
            let Some(cache) = weak.upgrade() else { break };
            if message.is_empty() {
                // A gap: a sign-out may have been missed; verify afresh.
                cache.clear();
            } else if let Ok(jti) = Uuid::try_parse_ascii(&message) {
                cache.forget(jti);
            }
        }
    });
    Ok(cache)
}

impl Auth {
    /// True when `key_sha256` is the bootstrap admin key (constant-time).
    pub fn is_bootstrap_admin(&self, key_sha256: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        self.admin_bootstrap
            .as_ref()
            .is_some_and(|expected| bool::from(expected.ct_eq(key_sha256)))
    }
}
