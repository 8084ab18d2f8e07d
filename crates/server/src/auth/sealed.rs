//! Server secrets sealed under the key-encryption key, and changing KEKs.
//!
//! A server secret (the IP-HMAC key, the audit-chain key) is one random
//! value every replica shares, created by the first to start. With a KEK it
//! is stored sealed ([`super::kek`]); one found in plaintext (written before
//! a KEK was configured) is sealed in place, by compare-and-swap, and keeps
//! its value — so IP HMACs already stored still match. [`rewrap`] re-seals
//! every sealed row under a new KEK (`blockremote keys rewrap`).

use rand::RngCore;

use super::{
    kek::{self, Kek},
    keys::KeyError,
};
use crate::store::{audit_chain::ChainKey, Store};

/// The IP-HMAC key's name.
pub const IP_HMAC: &str = "ip_hmac";
/// The audit-chain key's name (always sealed: it only exists with a KEK).
pub const AUDIT_CHAIN: &str = "audit_chain";

fn describe(name: &str) -> String {
    format!("server secret {name}")
}

/// The server secret `name` in plaintext, created from `candidate` when
/// absent, sealed in place when found in plaintext and a KEK is configured.
pub async fn secret(
    store: &dyn Store,
    kek: Option<&Kek>,
    name: &str,
    candidate: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let row = kek::server_secret_row(name);
    let stored_candidate = match kek {
        Some(kek) => kek.seal(&row, candidate),
        None => candidate.to_vec(),
    };
    let mut stored = store.server_secret(name, &stored_candidate).await?;
    if let Some(kek) = kek {
        // A plaintext value from before the KEK: seal it, keeping its value.
        for _ in 0..3 {
            if kek::is_sealed(&stored) {
                break;
            }
            let envelope = kek.seal(&row, &stored);
            if store
                .replace_server_secret(name, &stored, &envelope)
                .await?
            {
                tracing::info!(secret = name, kek = %kek.id(), "sealed a plaintext server secret under the KEK");
                stored = envelope;
                break;
            }
            stored = store
                .read_server_secret(name)
                .await?
                .ok_or(crate::store::StoreError::NotFound)?;
        }
    }
    Ok(kek::open_or_plain(kek, &row, &describe(name), &stored)?)
}

/// The audit-chain key: created (sealed, keyed from the row after the
/// current head) when `create` and absent. `None` without a KEK, or when
/// absent and not created.
pub async fn chain_key(
    store: &dyn Store,
    kek: Option<&Kek>,
    create: bool,
) -> Result<Option<ChainKey>, KeyError> {
    let row = kek::server_secret_row(AUDIT_CHAIN);
    let stored = match (kek, create) {
        (Some(_), true) => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let head = store.audit_head().await?;
            if head
                .as_ref()
                .is_some_and(|(_, hash)| hash.starts_with(crate::store::audit_chain::KEYED_PREFIX))
                && store.read_server_secret(AUDIT_CHAIN).await?.is_none()
            {
                tracing::error!(
                    "the audit chain is keyed but its key is gone from the database (deleted?): a new key \
                     is made, and `blockremote audit verify` reports the rows of the lost one"
                );
            }
            let keyed_from = head.map_or(1, |(seq, _)| seq + 1);
            let candidate = ChainKey { key, keyed_from }.to_bytes();
            Some(secret(store, kek, AUDIT_CHAIN, &candidate).await?)
        }
        _ => match store.read_server_secret(AUDIT_CHAIN).await? {
            Some(value) => Some(kek::open_or_plain(
                kek,
                &row,
                &describe(AUDIT_CHAIN),
                &value,
            )?),
            None => None,
        },
    };
    match stored {
        None => Ok(None),
        Some(bytes) => ChainKey::from_bytes(&bytes)
            .map(Some)
            .ok_or_else(|| KeyError::Invalid(format!("{} is malformed", describe(AUDIT_CHAIN)))),
    }
}

/// What [`rewrap`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrapped {
    /// Signing keys re-sealed (or sealed for the first time).
    pub signing_keys: usize,
    /// Server secrets re-sealed (or sealed for the first time).
    pub secrets: usize,
    /// Rows already sealed under the new KEK, left alone.
    pub unchanged: usize,
}

/// Re-seals every sealed row under `new`, opening it with `previous` (rows
/// already under `new` are left alone, so an interrupted rewrap can be run
/// again). Plaintext private keys and the IP-HMAC key are sealed too. Each
/// row is swapped on its own (compare-and-swap); a row sealed under neither
/// KEK stops the run with an error naming it, and a second run with the
/// right previous KEK finishes the job.
pub async fn rewrap(
    store: &dyn Store,
    previous: Option<&Kek>,
    new: &Kek,
) -> Result<Rewrapped, KeyError> {
    let mut done = Rewrapped::default();
    let reseal = |row: &str, what: &str, value: &[u8]| -> Result<Option<Vec<u8>>, KeyError> {
        if kek::is_sealed_by(value, new) {
            return Ok(None);
        }
        let plain = match previous {
            _ if !kek::is_sealed(value) => value.to_vec(),
            Some(old) => old.open(row, what, value)?,
            None => {
                return Err(KeyError::Invalid(format!(
                    "{what} is sealed under another KEK: set BLOCKREMOTE_KEK_PREVIOUS (or \
                     BLOCKREMOTE_KEK_PREVIOUS_FILE) to the KEK it was sealed with"
                )))
            }
        };
        Ok(Some(new.seal(row, &plain)))
    };
    for key in store.signing_keys().await? {
        let Some(value) = key.private_der.as_deref() else {
            continue;
        };
        let row = kek::signing_key_row(&key.kid);
        match reseal(&row, &format!("signing key {}", key.kid), value)? {
            None => done.unchanged += 1,
            Some(envelope) => {
                if store
                    .replace_private_key(&key.kid, value, &envelope)
                    .await?
                {
                    done.signing_keys += 1;
                }
            }
        }
    }
    for (name, value) in store.server_secrets().await? {
        // A plaintext secret this version does not know is left as it is:
        // whoever reads it expects plaintext.
        if !kek::is_sealed(&value) && name != IP_HMAC {
            continue;
        }
        let row = kek::server_secret_row(&name);
        match reseal(&row, &describe(&name), &value)? {
            None => done.unchanged += 1,
            Some(envelope) => {
                if store
                    .replace_server_secret(&name, &value, &envelope)
                    .await?
                {
                    done.secrets += 1;
                }
            }
        }
    }
    Ok(done)
}
