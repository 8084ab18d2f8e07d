//! The key-encryption key (KEK): what keeps key material in the database
//! useless to someone holding only the database.
//!
//! JWT signing private keys, the IP-HMAC key and the audit-chain key are
//! stored *sealed*: AES-256-GCM under the KEK, which lives outside the
//! database (`BLOCKREMOTE_KEK`, `BLOCKREMOTE_KEK_FILE`, or on the embedded
//! default a file `kek` in the data dir, generated 0600 on first start). A
//! read-only copy of the database, or a backup, then signs nothing.
//!
//! Envelope, version 1 (all of it stored in the row's existing BLOB column):
//!
//! ```text
//! "BRKE" | 0x01 | kek id (8 bytes) | nonce (12 bytes) | ciphertext + tag (16 bytes)
//! ```
//!
//! The associated data is the header (magic, version, kek id) followed by the
//! row's identity (`signing_keys:<kid>`, `server_secrets:<name>`), so a
//! ciphertext copied into another row, or a header edited, fails to open.
//! The kek id is the first 8 bytes of SHA-256 over a fixed label and the
//! key: it names which KEK sealed a row, so a wrong KEK is a clear start-up
//! error ("sealed under KEK 1a2b…, the configured KEK is 3c4d…") rather than
//! an opaque decryption failure. Plaintext rows are told apart by their
//! first bytes: a DER key starts with 0x30 and a 32-byte secret is shorter
//! than any envelope.

use std::path::{Path, PathBuf};

use aes_gcm::{
    aead::{Aead, Payload},
    Aes256Gcm, KeyInit,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{Config, KekSetting};

const MAGIC: &[u8; 4] = b"BRKE";
const VERSION: u8 = 1;
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + ID_LEN;
/// The shortest envelope (empty plaintext).
const MIN_SEALED: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// The name of the generated KEK file in the data dir (embedded default).
pub const DATA_DIR_KEK_FILE: &str = "kek";

/// Why a KEK could not be had or used.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// Production (DATABASE_URL set) without a KEK.
    #[error(
        "no key-encryption key: with DATABASE_URL set, set BLOCKREMOTE_KEK (base64 of 32 random bytes) \
         or BLOCKREMOTE_KEK_FILE, or BLOCKREMOTE_INSECURE_KEYS=1 to keep private keys in plaintext (not for production)"
    )]
    Required,
    /// The KEK text is not base64 of 32 bytes.
    #[error("{origin}: must be the base64 of exactly 32 bytes (generate one with `openssl rand -base64 32`)")]
    Malformed {
        /// Where it came from.
        origin: String,
    },
    /// The KEK file could not be read or written.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why (not a `source`: the message holds it).
        error: std::io::Error,
    },
    /// A row was sealed under another KEK.
    #[error(
        "{what} is sealed under KEK {sealed_under}, but the configured KEK ({origin}) is {configured}: \
         set the KEK it was sealed with (to change KEKs, see `blockremote keys rewrap`)"
    )]
    WrongKek {
        /// The row.
        what: String,
        /// Id of the KEK that sealed it.
        sealed_under: String,
        /// Id of the configured KEK.
        configured: String,
        /// Where the configured KEK came from.
        origin: String,
    },
    /// A sealed row and no KEK configured.
    #[error(
        "{what} is sealed under KEK {sealed_under} and no key-encryption key is configured: \
         set BLOCKREMOTE_KEK or BLOCKREMOTE_KEK_FILE"
    )]
    NoKek {
        /// The row.
        what: String,
        /// Id of the KEK that sealed it.
        sealed_under: String,
    },
    /// The envelope does not open: edited, truncated, or moved from another row.
    #[error("{what}: the sealed value does not open (edited, or copied from another row)")]
    Corrupt {
        /// The row.
        what: String,
    },
}

/// The key-encryption key.
pub struct Kek {
    cipher: Aes256Gcm,
    id: [u8; ID_LEN],
    origin: String,
    /// The KEK being replaced (`BLOCKREMOTE_KEK_PREVIOUS`): rows it sealed
    /// still open while `keys rewrap` moves them; nothing new is sealed with it.
    previous: Option<Box<Kek>>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({} from {})", self.id(), self.origin)
    }
}

impl Kek {
    /// A KEK from its 32 bytes; `origin` names where they came from, for messages.
    pub fn from_bytes(bytes: &[u8; 32], origin: impl Into<String>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"blockremote kek id v1\0");
        hasher.update(bytes);
        let digest = hasher.finalize();
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
            id,
            origin: origin.into(),
            previous: None,
        }
    }

    /// This KEK, also opening (never sealing) rows sealed under `previous`.
    pub fn with_previous(mut self, previous: Option<Kek>) -> Self {
        self.previous = previous.filter(|p| p.id != self.id).map(Box::new);
        self
    }

    /// A KEK from base64 text (standard or URL-safe alphabet, padding optional).
    pub fn from_base64(text: &str, origin: impl Into<String>) -> Result<Self, KekError> {
        let origin = origin.into();
        let bytes = decode_kek(text).ok_or_else(|| KekError::Malformed {
            origin: origin.clone(),
        })?;
        Ok(Self::from_bytes(&bytes, origin))
    }

    /// This KEK's id (16 hex digits), as logged and named in errors.
    pub fn id(&self) -> String {
        hex::encode(self.id)
    }

    /// Where it came from (a variable or a file).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Seals `plaintext` for the row named `row`.
    pub fn seal(&self, row: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_SEALED + plaintext.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(&out, row);
        out.extend_from_slice(&nonce);
        // Encryption cannot fail for inputs this small (GCM's limit is 64 GiB).
        let sealed = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed for `row`; `what` describes the row in errors.
    pub fn open(&self, row: &str, what: &str, sealed: &[u8]) -> Result<Vec<u8>, KekError> {
        let Some(under) = sealed_under(sealed) else {
            return Err(KekError::Corrupt { what: what.into() });
        };
        if let Some(previous) = self.previous.as_deref().filter(|p| p.id == under) {
            return previous.open(row, what, sealed);
        }
        if under != self.id {
            return Err(KekError::WrongKek {
                what: what.into(),
                sealed_under: hex::encode(under),
                configured: self.id(),
                origin: self.origin.clone(),
            });
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().unwrap_or([0; NONCE_LEN]);
        self.cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: body,
                    aad: &associated_data(header, row),
                },
            )
            .map_err(|_| KekError::Corrupt { what: what.into() })
    }
}

fn associated_data(header: &[u8], row: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(row.as_bytes());
    aad
}

/// True when `value` is an envelope (see the module docs), not plaintext.
pub fn is_sealed(value: &[u8]) -> bool {
    sealed_under(value).is_some()
}

/// True when `value` is an envelope sealed under `kek`.
pub fn is_sealed_by(value: &[u8], kek: &Kek) -> bool {
    sealed_under(value) == Some(kek.id)
}

/// The id of the KEK that sealed `value`, if it is an envelope.
fn sealed_under(value: &[u8]) -> Option<[u8; ID_LEN]> {
    if value.len() < MIN_SEALED || !value.starts_with(MAGIC) || value[MAGIC.len()] != VERSION {
        return None;
    }
    value[MAGIC.len() + 1..HEADER_LEN].try_into().ok()
}

/// Opens `value` if sealed (with `kek`), or returns it as it is if plaintext.
pub fn open_or_plain(
    kek: Option<&Kek>,
    row: &str,
    what: &str,
    value: &[u8],
) -> Result<Vec<u8>, KekError> {
    match (sealed_under(value), kek) {
        (None, _) => Ok(value.to_vec()),
        (Some(_), Some(kek)) => kek.open(row, what, value),
        (Some(under), None) => Err(KekError::NoKek {
            what: what.into(),
            sealed_under: hex::encode(under),
        }),
    }
}

/// The associated-data name of a signing key's row.
pub fn signing_key_row(kid: &str) -> String {
    format!("signing_keys:{kid}")
}

/// The associated-data name of a server secret's row.
pub fn server_secret_row(name: &str) -> String {
    format!("server_secrets:{name}")
}

/// Decodes KEK text: base64 (either alphabet, padding optional) of 32 bytes.
pub fn decode_kek(text: &str) -> Option<[u8; 32]> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let text = text.trim().trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(text)
        .or_else(|_| URL_SAFE_NO_PAD.decode(text))
        .ok()?;
    bytes.try_into().ok()
}

/// Whether a missing KEK file may be generated (`serve`, `worker`, the
/// commands that write keys) or not (read-only commands create nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// Generate the embedded default's KEK file when missing.
    IfMissing,
    /// Never create anything.
    Never,
}

/// The KEK the configuration names, if any (see the module docs):
/// `BLOCKREMOTE_KEK(_FILE)`; else on the embedded default the data dir's
/// `kek` file (generated when `generate` allows) — either also opening rows
/// sealed under `BLOCKREMOTE_KEK_PREVIOUS(_FILE)`; else, with
/// `BLOCKREMOTE_INSECURE_KEYS=1`, none (with a loud warning); else
/// [`KekError::Required`].
pub fn resolve(config: &Config, generate: Generate) -> Result<Option<Kek>, KekError> {
    match &config.kek {
        KekSetting::Given { value, origin } => Ok(Some(
            Kek::from_base64(value.expose_secret(), origin)?.with_previous(previous(config)?),
        )),
        KekSetting::DataDir => {
            let path = config.data_dir.join(DATA_DIR_KEK_FILE);
            let previous = previous(config)?;
            Ok(data_dir_kek(&path, generate)?.map(|kek| kek.with_previous(previous)))
        }
        KekSetting::Insecure => {
            tracing::warn!(
                "BLOCKREMOTE_INSECURE_KEYS=1: signing keys and the IP-HMAC key are stored in plaintext; \
                 anyone with a copy of the database can mint accepted tokens. Set BLOCKREMOTE_KEK for production."
            );
            Ok(None)
        }
        KekSetting::Missing => Err(KekError::Required),
    }
}

/// The previous KEK (`BLOCKREMOTE_KEK_PREVIOUS(_FILE)`), for `keys rewrap`.
pub fn previous(config: &Config) -> Result<Option<Kek>, KekError> {
    config
        .kek_previous
        .as_ref()
        .map(|(value, origin)| Kek::from_base64(value.expose_secret(), origin))
        .transpose()
}

fn data_dir_kek(path: &Path, generate: Generate) -> Result<Option<Kek>, KekError> {
    let file_error = |error| KekError::File {
        path: path.to_owned(),
        error,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            crate::store::files::tighten(path).map_err(file_error)?;
            Ok(Some(Kek::from_base64(&text, path.display().to_string())?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate == Generate::IfMissing => {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::store::files::create_private_dir(dir).map_err(file_error)?;
            }
            crate::store::files::write_private_new(
                path,
                format!("{}\n", B64.encode(bytes)).as_bytes(),
            )
            .map_err(file_error)?;
            let kek = Kek::from_bytes(&bytes, path.display().to_string());
            tracing::info!(file = %path.display(), kek = %kek.id(), "generated a key-encryption key (keep a copy with the database's backups)");
            Ok(Some(kek))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; 32], "test")
    }

    #[test]
    fn seals_and_opens_only_for_the_same_row_and_kek() {
        let a = kek(1);
        let sealed = a.seal("signing_keys:k1", b"private key bytes");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(b"private".len()).any(|w| w == b"private"));
        assert_eq!(
            a.open("signing_keys:k1", "key k1", &sealed).expect("opens"),
            b"private key bytes"
        );
        assert!(matches!(
            a.open("signing_keys:k2", "key k2", &sealed),
            Err(KekError::Corrupt { .. })
        ));
        let err = kek(2)
            .open("signing_keys:k1", "key k1", &sealed)
            .expect_err("wrong kek");
        assert!(matches!(err, KekError::WrongKek { .. }), "{err}");
        assert!(err.to_string().contains(&a.id()), "{err}");
        let mut edited = sealed.clone();
        let last = edited.len() - 1;
        edited[last] ^= 1;
        assert!(a.open("signing_keys:k1", "k", &edited).is_err());
    }

    #[test]
    fn a_kek_with_its_previous_opens_rows_of_both_and_seals_with_itself() {
        let old = kek(4);
        let old_id = old.id();
        let under_old = old.seal("r", b"secret");
        let new = kek(5).with_previous(Some(kek(4)));
        assert_eq!(new.open("r", "w", &under_old).expect("opens"), b"secret");
        let under_new = new.seal("r", b"secret");
        assert!(is_sealed_by(&under_new, &kek(5)));
        assert!(kek(4).open("r", "w", &under_new).is_err());
        let err = kek(6)
            .with_previous(Some(kek(7)))
            .open("r", "w", &under_old)
            .expect_err("neither");
        assert!(err.to_string().contains(&old_id), "{err}");
    }

    #[test]
    fn plaintext_is_never_taken_for_an_envelope() {
        assert!(!is_sealed(&[0x30, 0x81, 0x87, 0x02]));
        assert!(!is_sealed(b"BRKE\x01short"));
        let mut secret = *b"BRKE\x01abcdefghijklmnopqrstuvwxyz0";
        assert!(!is_sealed(&secret), "32 bytes is shorter than any envelope");
        secret[0] = 0;
        assert_eq!(
            open_or_plain(None, "r", "w", &secret).expect("plain"),
            secret
        );
        let sealed = kek(3).seal("r", b"x");
        assert!(matches!(
            open_or_plain(None, "r", "w", &sealed),
            Err(KekError::NoKek { .. })
        ));
    }

    #[test]
    fn kek_text_must_be_32_bytes_of_base64() {
        let text = B64.encode([7u8; 32]);
        assert!(decode_kek(&text).is_some());
        assert!(decode_kek(&format!("{text}\n")).is_some());
        assert!(decode_kek(&B64.encode([7u8; 31])).is_none());
        assert!(decode_kek("not base64!").is_none());
        let err = Kek::from_base64("short", "BLOCKREMOTE_KEK").expect_err("refused");
        assert!(err.to_string().starts_with("BLOCKREMOTE_KEK"), "{err}");
    }
}
