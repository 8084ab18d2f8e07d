//! The refresh reuse interval: a retried refresh gets the pair it missed.
//!
//! A phone that loses the response to a refresh (a tunnel, a killed app)
//! retries with the same token. Strict rotation calls that reuse and revokes
//! the device — the owner, not a thief, is punished. So each rotation keeps,
//! on the spent token's row, the pair it issued: *sealed* (AES-256-GCM)
//! under a key derived from the spent token itself, which the database never
//! holds (only its SHA-256). Within `BLOCKREMOTE_REFRESH_REUSE_INTERVAL_SECONDS`
//! of the rotation, presenting the immediately previous token opens that
//! pair and returns it again; any older token, or the same one after the
//! interval, is still reuse. The sealed pair is written in the rotation's
//! compare-and-swap and cleared when its successor is rotated, so "the
//! immediately previous token" is exactly the one row that still has it,
//! and two concurrent refreshes of one token both answer with the same pair
//! (Auth0's "reuse interval"; RFC 9700 §4.14.2 allows such leeway).
//!
//! What a database reader learns: nothing usable without a refresh token
//! that was already spent — and one spent token opens only the pair that
//! replaced it while that pair is the current one.

use aes_gcm::{
    aead::{Aead, Payload},
    Aes256Gcm, KeyInit,
};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

const NONCE_LEN: usize = 12;
const LABEL: &[u8] = b"blockremote/refresh-successor/v1";

/// The pair a rotation issued.
#[derive(Serialize, Deserialize)]
pub struct Successor {
    /// The access token issued.
    pub access_token: String,
    /// The refresh token issued.
    pub refresh_token: String,
    /// The access token's expiry (Unix seconds).
    pub expires_at: i64,
}

impl std::fmt::Debug for Successor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Successor")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

fn cipher(spent_token: &str) -> Aes256Gcm {
    // HMAC accepts keys of any length, so neither step can fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(spent_token.as_bytes())
        .unwrap_or_else(|_| unreachable!());
    mac.update(LABEL);
    Aes256Gcm::new_from_slice(&mac.finalize().into_bytes()).unwrap_or_else(|_| unreachable!())
}

/// Seals `successor` for whoever presents `spent_token`, bound to `family`.
pub fn seal(spent_token: &str, family: Uuid, successor: &Successor) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let plaintext = serde_json::to_vec(successor).unwrap_or_default();
    let sealed = cipher(spent_token)
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: &plaintext,
                aad: family.as_bytes(),
            },
        )
        .unwrap_or_default();
    [nonce.as_slice(), &sealed].concat()
}

/// Opens what [`seal`] sealed; `None` for another token, another family or
/// anything altered.
pub fn open(spent_token: &str, family: Uuid, sealed: &[u8]) -> Option<Successor> {
    let (nonce, ciphertext) = sealed.split_at_checked(NONCE_LEN)?;
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().ok()?;
    let plaintext = cipher(spent_token)
        .decrypt(
            nonce.into(),
            Payload {
                msg: ciphertext,
                aad: family.as_bytes(),
            },
        )
        .ok()?;
    serde_json::from_slice(&plaintext).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn successor() -> Successor {
        Successor {
            access_token: "a.b.c".into(),
            refresh_token: "brt_next".into(),
            expires_at: 42,
        }
    }

    #[test]
    fn only_the_spent_token_and_its_family_open_the_pair() {
        let family = Uuid::now_v7();
        let sealed = seal("brt_spent", family, &successor());
        let opened = open("brt_spent", family, &sealed).expect("opens");
        assert_eq!(opened.refresh_token, "brt_next");
        assert_eq!(opened.expires_at, 42);
        assert!(open("brt_other", family, &sealed).is_none());
        assert!(open("brt_spent", Uuid::now_v7(), &sealed).is_none());
        let mut altered = sealed.clone();
        *altered.last_mut().expect("bytes") ^= 1;
        assert!(open("brt_spent", family, &altered).is_none());
        assert!(open("brt_spent", family, &sealed[..5]).is_none());
        assert!(
            !sealed.windows(8).any(|w| w == b"brt_next"),
            "the token is not in the clear"
        );
    }
}
