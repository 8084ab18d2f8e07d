//! JWT signing keys, the JWKS, and key rotation.
//!
//! Keys live in the durable store so that every replica signs with the same
//! current key and verifies with the same set. On the embedded default (and in
//! any deployment without a configured PEM) a key is generated on first start:
//! ES256, or RS256 when `BLOCKREMOTE_JWT_ALGORITHM=RS256`. A deployment may instead load its private key from a PEM (a file or
//! an environment variable, as mounted from a key vault); its public half is
//! registered in the store so every replica's JWKS lists it.
//!
//! Rotation (`blockremote keys rotate`) inserts a new current key and marks the
//! others retired. A retired key no longer signs but keeps verifying — and
//! stays in the JWKS — until every token it signed has expired (access-token
//! lifetime + clock-skew leeway). Each replica reloads the set every
//! [`RELOAD_EVERY`], so a rotation takes effect everywhere within a minute.
//!
//! Private keys are stored sealed under the key-encryption key when one is
//! configured ([`super::kek`]); a key found in plaintext (written before a
//! KEK was set) is sealed in place at start, so no key is lost. Only the
//! current key's private half is ever opened, and only in memory.
//!
//! Revocation (`blockremote keys revoke KID`) is rotation's emergency form:
//! the key stops signing *and verifying* at once. The command publishes on
//! [`CHANGED_CHANNEL`]; each instance reloads and drops its cache of
//! verified tokens ([`super::verified`]), so tokens the key signed are
//! refused on their next use. Without Redis the command cannot reach the
//! running server, which therefore checks for revocations every
//! [`REVOCATION_POLL`].
//!
//! Every key carries an algorithm; verification uses *that* algorithm only,
//! whatever the token's header claims (RFC 8725 §3.1), so `none` and
//! HS256-signed-with-the-public-key forgeries never verify.

use std::{collections::HashMap, sync::RwLock, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair},
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::kek::{self, Kek, KekError};
use crate::{
    config::JwtAlgorithm,
    store::{now_micros, SigningKeyRecord, Store, StoreError},
};

/// How often each replica reloads the key set from the store.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Published when a key is revoked: every instance reloads at once.
pub const CHANGED_CHANNEL: &str = "keys:changed";

/// How often an instance without Redis looks for revoked keys.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Problems with keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured PEM cannot be used.
    #[error("invalid signing key: {0}")]
    Invalid(String),
    /// The key-encryption key is missing, wrong, or a sealed value does not open.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key that can sign.
pub struct SigningKey {
    /// `kid` header value.
    pub kid: String,
    /// Its algorithm.
    pub alg: Algorithm,
    /// The private key.
    pub encoding: EncodingKey,
}

/// A key that can verify.
#[derive(Clone)]
pub struct VerifyingKey {
    /// The only algorithm accepted with this key.
    pub alg: Algorithm,
    /// The public key.
    pub decoding: DecodingKey,
}

/// One consistent view of the keys.
pub struct KeySet {
    /// The key new tokens are signed with.
    pub current: SigningKey,
    /// Every key that may still verify a live token, by `kid`.
    pub verifying: HashMap<String, VerifyingKey>,
    /// The JWKS document listing those keys.
    pub jwks: Value,
}

/// A private key loaded from a PEM.
pub struct ExternalKey {
    record: SigningKeyRecord,
    encoding: EncodingKey,
}

impl ExternalKey {
    /// Parses a PKCS#8 PEM (EC P-256 → ES256, RSA → RS256), or a PKCS#1
    /// `RSA PRIVATE KEY` PEM.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) = pem_to_der(pem)?;
        let rng = SystemRandom::new();
        if label == "PRIVATE KEY" {
            if let Ok(pair) =
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            {
                let jwk = ec_jwk(pair.public_key().as_ref())?;
                return Ok(Self {
                    record: record("ES256", None, jwk),
                    encoding: EncodingKey::from_ec_der(&der),
                });
            }
        }
        let pair =
            match label.as_str() {
                "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
                "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
                "EC PRIVATE KEY" => return Err(KeyError::Invalid(
                    "SEC1 EC keys are not supported; convert with `openssl pkcs8 -topk8 -nocrypt`"
                        .into(),
                )),
                other => return Err(KeyError::Invalid(format!("unexpected PEM label {other}"))),
            }
            .map_err(|e| KeyError::Invalid(format!("not a P-256 or RSA private key ({e})")))?;
        if pair.public().modulus_len() < 256 {
            return Err(KeyError::Invalid(
                "RSA keys must be at least 2048 bits".into(),
            ));
        }
        let parts: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        let jwk =
            json!({"kty": "RSA", "n": B64.encode(trim(&parts.n)), "e": B64.encode(trim(&parts.e))});
        // jsonwebtoken's ring backend signs RS256 from PKCS#1 DER.
        let pkcs1 = if label == "RSA PRIVATE KEY" {
            der
        } else {
            pkcs8_inner(&der)?
        };
        Ok(Self {
            record: record("RS256", None, jwk),
            encoding: EncodingKey::from_rsa_der(&pkcs1),
        })
    }

    /// The key's id.
    pub fn kid(&self) -> &str {
        &self.record.kid
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn pem_to_der(pem: &str) -> Result<(String, Vec<u8>), KeyError> {
    let begin = pem
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or_else(|| KeyError::Invalid("no PEM header".into()))?
        .to_owned();
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| KeyError::Invalid("PEM body is not base64".into()))?;
    Ok((begin, der))
}

/// Extracts the PKCS#1 `RSAPrivateKey` from a PKCS#8 `PrivateKeyInfo`:
/// SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING key, … }.
fn pkcs8_inner(der: &[u8]) -> Result<Vec<u8>, KeyError> {
    fn read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let bad = || KeyError::Invalid("malformed PKCS#8".into());
    let (_, info, _) = read(der).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (_, _, rest) = read(info).filter(|(t, _, _)| *t == 0x02).ok_or_else(bad)?;
    let (_, _, rest) = read(rest).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (_, key, _) = read(rest).filter(|(t, _, _)| *t == 0x04).ok_or_else(bad)?;
    Ok(key.to_vec())
}

fn ec_jwk(public: &[u8]) -> Result<Value, KeyError> {
    // Uncompressed point: 0x04 || x (32) || y (32).
    if public.len() != 65 || public[0] != 4 {
        return Err(KeyError::Invalid(
            "unexpected EC public key encoding".into(),
        ));
    }
    Ok(json!({
        "kty": "EC",
        "crv": "P-256",
        "x": B64.encode(&public[1..33]),
        "y": B64.encode(&public[33..65]),
    }))
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexical order.
fn thumbprint(jwk: &Value) -> String {
    let canonical = if jwk["kty"] == "EC" {
        json!({"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]})
    } else {
        json!({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
    };
    // serde_json writes object keys in sorted order (BTreeMap), no spaces.
    B64.encode(Sha256::digest(canonical.to_string().as_bytes()))
}

fn record(alg: &str, private_der: Option<Vec<u8>>, public_jwk: Value) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: thumbprint(&public_jwk),
        alg: alg.to_owned(),
        private_der,
        public_jwk,
        created_at: now_micros(),
        retired_at: None,
        revoked_at: None,
    }
}

/// Generates a new RS256 key (2048-bit; PKCS#1 DER kept in the store).
pub fn generate_rs256() -> Result<SigningKeyRecord, KeyError> {
    use rsa::{pkcs1::EncodeRsaPrivateKey, traits::PublicKeyParts};
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
        .map_err(|e| KeyError::Invalid(format!("RSA key generation failed: {e}")))?;
    let der = key
        .to_pkcs1_der()
        .map_err(|e| KeyError::Invalid(format!("RSA key encoding failed: {e}")))?;
    let jwk = json!({
        "kty": "RSA",
        "n": B64.encode(key.n().to_bytes_be()),
        "e": B64.encode(key.e().to_bytes_be()),
    });
    Ok(record("RS256", Some(der.as_bytes().to_vec()), jwk))
}

/// Generates a key for `alg`, off the async runtime.
pub async fn generate(alg: JwtAlgorithm) -> Result<SigningKeyRecord, KeyError> {
    tokio::task::spawn_blocking(move || match alg {
        JwtAlgorithm::Rs256 => generate_rs256(),
        JwtAlgorithm::Es256 => generate_es256(),
    })
    .await
    .map_err(|e| KeyError::Invalid(format!("key generation task failed: {e}")))?
}

/// Generates a new ES256 key (PKCS#8 DER kept in the store).
pub fn generate_es256() -> Result<SigningKeyRecord, KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| KeyError::Invalid("key generation failed".into()))?;
    let pair = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .map_err(|_| KeyError::Invalid("generated key rejected".into()))?;
    let jwk = ec_jwk(pair.public_key().as_ref())?;
    Ok(record("ES256", Some(pkcs8.as_ref().to_vec()), jwk))
}

fn algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "ES256" => Some(Algorithm::ES256),
        "RS256" => Some(Algorithm::RS256),
        _ => None,
    }
}

fn verifying_key(record: &SigningKeyRecord) -> Option<VerifyingKey> {
    let alg = algorithm(&record.alg)?;
    let jwk = &record.public_jwk;
    let decoding = match alg {
        Algorithm::ES256 => {
            DecodingKey::from_ec_components(jwk["x"].as_str()?, jwk["y"].as_str()?).ok()?
        }
        _ => DecodingKey::from_rsa_components(jwk["n"].as_str()?, jwk["e"].as_str()?).ok()?,
    };
    Some(VerifyingKey { alg, decoding })
}

/// The least time between two reloads triggered by an unknown `kid`.
pub const UNKNOWN_KID_RELOAD_GAP: Duration = Duration::from_secs(1);

/// The live key set, reloaded from the store.
pub struct KeyRing {
    last_reload: std::sync::Mutex<std::time::Instant>,
    external: Option<ExternalKey>,
    kek: Option<std::sync::Arc<Kek>>,
    /// Set when a reload drops a key that verified before; taken by
    /// [`take_dropped`](Self::take_dropped).
    dropped: std::sync::atomic::AtomicBool,
    /// How long a retired key keeps verifying (access-token lifetime + leeway).
    verify_window: chrono::Duration,
    set: RwLock<std::sync::Arc<KeySet>>,
}

impl KeyRing {
    /// Loads the keys, generating a first ES256 key when the store has none
    /// (or registering the external key when one is configured).
    pub async fn load(
        store: &dyn Store,
        external: Option<ExternalKey>,
        algorithm: JwtAlgorithm,
        verify_window: Duration,
        kek: Option<std::sync::Arc<Kek>>,
    ) -> Result<Self, KeyError> {
        let verify_window = chrono::Duration::from_std(verify_window)
            .unwrap_or_else(|_| chrono::Duration::hours(1));
        if let Some(kek) = &kek {
            seal_plaintext_keys(store, kek).await?;
        }
        if let Some(key) = &external {
            let known = store.signing_keys().await?;
            let current = known
                .iter()
                .any(|k| k.kid == key.record.kid && k.retired_at.is_none());
            if !current {
                store.insert_signing_key(key.record.clone(), true).await?;
            }
        } else if !store.signing_keys().await?.iter().any(|k| {
            k.retired_at.is_none() && k.private_der.is_some() && k.alg == algorithm.as_str()
        }) {
            // First start, or the configured algorithm changed: a new current
            // key; the old ones keep verifying until their tokens expire.
            store
                .insert_signing_key(sealed(generate(algorithm).await?, kek.as_deref()), true)
                .await?;
        }
        let set = build(
            &store.signing_keys().await?,
            external.as_ref(),
            kek.as_deref(),
            verify_window,
            Utc::now(),
        )?;
        Ok(Self {
            last_reload: std::sync::Mutex::new(std::time::Instant::now()),
            external,
            kek,
            dropped: std::sync::atomic::AtomicBool::new(false),
            verify_window,
            set: RwLock::new(std::sync::Arc::new(set)),
        })
    }

    /// The current view.
    pub fn current(&self) -> std::sync::Arc<KeySet> {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A token names a `kid` this instance does not know: perhaps another
    /// instance just rotated. Reloads (at most once per
    /// [`UNKNOWN_KID_RELOAD_GAP`], so forged kids cannot hammer the store)
    /// and says whether the `kid` is now known.
    pub async fn learn(&self, store: &dyn Store, kid: &str) -> bool {
        let due = {
            let mut last = self
                .last_reload
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < UNKNOWN_KID_RELOAD_GAP {
                false
            } else {
                *last = std::time::Instant::now();
                true
            }
        };
        if due {
            if let Err(e) = self.reload(store).await {
                tracing::warn!(error = %e, "key reload for an unknown kid failed");
            }
        }
        self.current().verifying.contains_key(kid)
    }

    /// True (once) when a reload since the last call dropped a key that
    /// verified before (revoked, or out of its window): cached
    /// verifications must then be forgotten.
    pub fn take_dropped(&self) -> bool {
        self.dropped
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Re-reads the store (after a rotation on any instance). Returns true
    /// when a key that verified before no longer does (see
    /// [`take_dropped`](Self::take_dropped)).
    pub async fn reload(&self, store: &dyn Store) -> Result<bool, KeyError> {
        let set = build(
            &store.signing_keys().await?,
            self.external.as_ref(),
            self.kek.as_deref(),
            self.verify_window,
            Utc::now(),
        )?;
        let mut current = self
            .set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dropped = current
            .verifying
            .keys()
            .any(|kid| !set.verifying.contains_key(kid));
        *current = std::sync::Arc::new(set);
        if dropped {
            self.dropped
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(dropped)
    }
}

/// `key` with its private half sealed under `kek` (as it is when there is none).
fn sealed(mut key: SigningKeyRecord, kek: Option<&Kek>) -> SigningKeyRecord {
    if let (Some(kek), Some(der)) = (kek, key.private_der.as_deref()) {
        let envelope = kek.seal(&kek::signing_key_row(&key.kid), der);
        key.private_der = Some(envelope);
    }
    key
}

/// Seals every private key still stored in plaintext (written before a KEK
/// was configured). Compare-and-swap per row, so instances starting together
/// agree; returns how many this call sealed.
pub async fn seal_plaintext_keys(store: &dyn Store, kek: &Kek) -> Result<usize, KeyError> {
    let mut sealed_now = 0;
    for key in store.signing_keys().await? {
        let Some(der) = key.private_der.as_deref().filter(|d| !kek::is_sealed(d)) else {
            continue;
        };
        let envelope = kek.seal(&kek::signing_key_row(&key.kid), der);
        if store.replace_private_key(&key.kid, der, &envelope).await? {
            sealed_now += 1;
            tracing::info!(kid = %key.kid, kek = %kek.id(), "sealed a plaintext signing key under the KEK");
        }
    }
    Ok(sealed_now)
}

/// Makes a new key current (the `keys rotate` command). Returns its `kid`.
pub async fn rotate(
    store: &dyn Store,
    algorithm: JwtAlgorithm,
    kek: Option<&Kek>,
) -> Result<String, KeyError> {
    let key = sealed(generate(algorithm).await?, kek);
    let kid = key.kid.clone();
    store.insert_signing_key(key, true).await?;
    Ok(kid)
}

/// What `keys revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The key revoked.
    pub kid: String,
    /// The new current key, when the revoked key was the current one.
    pub replaced_by: Option<String>,
}

/// Revokes `kid`: it stops signing and verifying at once (the `keys
/// revoke` command). A current key is first replaced by a new one, so
/// there is always a key to sign with. The caller tells running instances
/// ([`CHANGED_CHANNEL`]).
pub async fn revoke(
    store: &dyn Store,
    kid: &str,
    algorithm: JwtAlgorithm,
    kek: Option<&Kek>,
) -> Result<Revoked, KeyError> {
    let keys = store.signing_keys().await?;
    let Some(key) = keys.iter().find(|k| k.kid == kid) else {
        return Err(KeyError::Invalid(format!(
            "no signing key has kid {kid} (the JWKS lists the live ones)"
        )));
    };
    let replaced_by = if key.retired_at.is_none() {
        Some(rotate(store, algorithm, kek).await?)
    } else {
        None
    };
    store.revoke_signing_key(kid, now_micros()).await?;
    Ok(Revoked {
        kid: kid.to_owned(),
        replaced_by,
    })
}

fn build(
    records: &[SigningKeyRecord],
    external: Option<&ExternalKey>,
    kek: Option<&Kek>,
    window: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<KeySet, KeyError> {
    let live: Vec<&SigningKeyRecord> = records
        .iter()
        .filter(|k| k.revoked_at.is_none())
        .filter(|k| k.retired_at.is_none_or(|at| at + window > now))
        .collect();
    let mut verifying = HashMap::new();
    let mut jwks = Vec::new();
    for record in &live {
        if let Some(key) = verifying_key(record) {
            verifying.insert(record.kid.clone(), key);
            let mut jwk = record.public_jwk.clone();
            jwk["kid"] = json!(record.kid);
            jwk["alg"] = json!(record.alg);
            jwk["use"] = json!("sig");
            jwks.push(jwk);
        }
    }
    let current = match external {
        Some(key) => SigningKey {
            kid: key.record.kid.clone(),
            alg: algorithm(&key.record.alg).unwrap_or(Algorithm::ES256),
            encoding: key.encoding.clone(),
        },
        None => {
            let record = live
                .iter()
                .filter(|k| k.retired_at.is_none() && k.private_der.is_some())
                .max_by_key(|k| (k.created_at, k.kid.clone()))
                .ok_or_else(|| KeyError::Invalid("no current signing key in the store".into()))?;
            let der = kek::open_or_plain(
                kek,
                &kek::signing_key_row(&record.kid),
                &format!("signing key {}", record.kid),
                record.private_der.as_deref().unwrap_or_default(),
            )?;
            SigningKey {
                kid: record.kid.clone(),
                alg: algorithm(&record.alg).unwrap_or(Algorithm::ES256),
                encoding: match record.alg.as_str() {
                    "RS256" => EncodingKey::from_rsa_der(&der),
                    _ => EncodingKey::from_ec_der(&der),
                },
            }
        }
    };
    Ok(KeySet {
        current,
        verifying,
        jwks: json!({ "keys": jwks }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_thumbprint_kids_and_p256_jwks() {
        let a = generate_es256().expect("key");
        let b = generate_es256().expect("key");
        assert_ne!(a.kid, b.kid);
        assert_eq!(a.kid, thumbprint(&a.public_jwk));
        assert_eq!(a.public_jwk["crv"], "P-256");
        assert_eq!(
            B64.decode(a.public_jwk["x"].as_str().expect("x"))
                .expect("b64")
                .len(),
            32
        );
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn retired_keys_verify_until_their_tokens_expire() {
        let mut old = generate_es256().expect("key");
        let new = generate_es256().expect("key");
        let now = Utc::now();
        old.retired_at = Some(now - chrono::Duration::minutes(10));
        let window = chrono::Duration::minutes(15);
        let set = build(&[old.clone(), new.clone()], None, None, window, now).expect("set");
        assert_eq!(set.current.kid, new.kid);
        assert!(set.verifying.contains_key(&old.kid));
        assert_eq!(set.jwks["keys"].as_array().expect("keys").len(), 2);
        let later = build(
            &[old.clone(), new],
            None,
            None,
            window,
            now + chrono::Duration::minutes(6),
        )
        .expect("set");
        assert!(
            !later.verifying.contains_key(&old.kid),
            "dropped once its tokens expired"
        );
    }

    #[test]
    fn generated_rs256_keys_sign_and_verify() {
        let key = generate_rs256().expect("key");
        assert_eq!(key.public_jwk["kty"], "RSA");
        assert_eq!(key.public_jwk["e"], "AQAB");
        let set = build(
            std::slice::from_ref(&key),
            None,
            None,
            chrono::Duration::minutes(15),
            Utc::now(),
        )
        .expect("set");
        assert_eq!(set.current.alg, Algorithm::RS256);
        let header = jsonwebtoken::Header {
            kid: Some(key.kid.clone()),
            ..jsonwebtoken::Header::new(Algorithm::RS256)
        };
        let token = jsonwebtoken::encode(
            &header,
            &json!({"sub": "x", "exp": 4_000_000_000u64}),
            &set.current.encoding,
        )
        .expect("sign");
        let verifier = &set.verifying[&key.kid];
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<Value>(&token, &verifier.decoding, &validation).expect("verifies");
    }

    #[test]
    fn sealed_keys_sign_only_with_their_kek() {
        let kek = Kek::from_bytes(&[9; 32], "test");
        let key = sealed(generate_es256().expect("key"), Some(&kek));
        let der = key.private_der.as_deref().expect("private");
        assert!(kek::is_sealed(der));
        let window = chrono::Duration::minutes(15);
        let set = build(
            std::slice::from_ref(&key),
            None,
            Some(&kek),
            window,
            Utc::now(),
        )
        .expect("opens with its kek");
        assert_eq!(set.current.kid, key.kid);
        let none = build(std::slice::from_ref(&key), None, None, window, Utc::now());
        assert!(matches!(none, Err(KeyError::Kek(KekError::NoKek { .. }))));
        let other = Kek::from_bytes(&[8; 32], "other");
        let wrong = build(
            std::slice::from_ref(&key),
            None,
            Some(&other),
            window,
            Utc::now(),
        );
        assert!(matches!(
            wrong,
            Err(KeyError::Kek(KekError::WrongKek { .. }))
        ));
        // A ciphertext moved to another key's row does not open.
        let mut moved = generate_es256().expect("key");
        moved.private_der = key.private_der.clone();
        let swapped = build(&[moved], None, Some(&kek), window, Utc::now());
        assert!(matches!(
            swapped,
            Err(KeyError::Kek(KekError::Corrupt { .. }))
        ));
    }

    #[test]
    fn revoked_keys_neither_sign_nor_verify() {
        let mut old = generate_es256().expect("key");
        let new = generate_es256().expect("key");
        let now = Utc::now();
        old.retired_at = Some(now);
        old.revoked_at = Some(now);
        let set = build(
            &[old.clone(), new],
            None,
            None,
            chrono::Duration::minutes(15),
            now,
        )
        .expect("set");
        assert!(!set.verifying.contains_key(&old.kid));
    }

    #[test]
    fn pem_errors_are_clear() {
        assert!(ExternalKey::from_pem("not a pem").is_err());
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n";
        let err = ExternalKey::from_pem(sec1)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("pkcs8"), "{err}");
    }

    #[test]
    fn a_generated_key_round_trips_through_pem() {
        let key = generate_es256().expect("key");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD
                .encode(key.private_der.as_deref().expect("der"))
        );
        let external = ExternalKey::from_pem(&pem).expect("parses");
        assert_eq!(external.kid(), key.kid);
        assert_eq!(external.record.alg, "ES256");
    }
}
