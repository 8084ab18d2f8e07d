//! Play Integrity *classic* integrity tokens, verified locally.
//!
//! A pure verifier: no I/O, no clock (the caller passes "now"), no store.
//! The caller takes the issued nonce from its single-use store (so a second
//! use or another device's nonce has already failed there, or reaches this
//! module as just another nonce string and fails `nonce_mismatch`).
//!
//! # What is verified, in order
//!
//! The token the app obtains with `IntegrityManager.requestIntegrityToken`
//! (classic request) is, when the app manages its own keys in Play Console
//! ("decryption key" and "verification key"), a compact **JWE** holding a
//! compact **JWS** holding the verdict JSON
//! (<https://developer.android.com/google/play/integrity/classic#decrypt-verify>).
//!
//! 1. **Size**: a token above [`MAX_TOKEN_LEN`] (16 KiB) is refused before
//!    any decoding; every later blob is derived from it, so all work is bounded.
//! 2. **JWE** (RFC 7516, compact serialization, § 7.1): exactly five
//!    base64url (no padding) parts. The protected header must carry exactly
//!    `alg: A256KW` and `enc: A256GCM` (RFC 7518 § 4.4 and § 5.3); `zip` and
//!    `crit` are refused (no decompression bombs, no extensions we do not
//!    understand). The encrypted key is the 256-bit content-encryption key
//!    wrapped with the configured decryption key by AES Key Wrap
//!    (RFC 3394, 40 bytes); the IV is 96 bits and the tag 128 bits; the
//!    content is AES-256-GCM with, as additional authenticated data, the
//!    ASCII of the protected header exactly as received (RFC 7516 § 5.1
//!    step 14). A failed unwrap or a failed tag is malformed input: a token
//!    encrypted for another app, or altered, opens to nothing.
//! 3. **JWS** (RFC 7515, compact): three parts; the header's `alg` must be
//!    `ES256` (RFC 7518 § 3.4: ECDSA P-256 with SHA-256, signature the raw
//!    64-byte `R || S`), so `none`, HMAC and every other algorithm are
//!    refused (malformed); `crit` is refused. The signature over
//!    `header.payload` is verified with the configured verification key; a
//!    mismatch is the verdict `signature_invalid` (nothing else is read from
//!    an unsigned payload).
//! 4. **The verdict** (<https://developer.android.com/google/play/integrity/verdicts>),
//!    each failed check with its own reason, in this order:
//!    - `requestDetails.requestPackageName` is a configured package
//!      (`package_mismatch`);
//!    - `requestDetails.nonce` equals the nonce we issued, compared exactly
//!      and in constant time (`nonce_mismatch`): the app passes our nonce
//!      string and Play returns it as passed;
//!    - `requestDetails.timestampMillis` is at most the nonce lifetime before
//!      now (`token_expired`) and at most [`MAX_CLOCK_SKEW_MS`] after it
//!      (`token_from_future`);
//!    - `appIntegrity.appRecognitionVerdict == PLAY_RECOGNIZED`
//!      (`app_not_recognized`) and one of `appIntegrity.certificateSha256Digest`
//!      is an allowed signing-certificate digest (`certificate_mismatch`);
//!    - `deviceIntegrity.deviceRecognitionVerdict`: `MEETS_STRONG_INTEGRITY`
//!      → [`State::Strong`], else `MEETS_DEVICE_INTEGRITY` → [`State::Device`],
//!      else `MEETS_BASIC_INTEGRITY` → [`State::Basic`], else none
//!      (`device_integrity_failed`); `MEETS_VIRTUAL_INTEGRITY` (an emulator)
//!      wins over every other label and is a hard failure (`emulator_detected`,
//!      see [`PlayIntegrityVerdict::hard_failure`]);
//!    - `accountDetails.appLicensingVerdict`: `LICENSED` passes; `UNEVALUATED`
//!      (Play could not tell, e.g. the device failed integrity or Play was
//!      unreachable) adds `licensing_unevaluated` but is **not** fatal, the
//!      other checks decide; `UNLICENSED` and any unknown value fail
//!      (`app_unlicensed`);
//!    - `environmentDetails`, when present (it is an opt-in of the app in
//!      Play Console): `appAccessRiskVerdict.appsDetected` containing
//!      `UNKNOWN_CAPTURING` → `capturing_app_detected`, `UNKNOWN_CONTROLLING`
//!      → `controlling_app_detected`; `playProtectVerdict` `POSSIBLE_RISK`,
//!      `MEDIUM_RISK` or `HIGH_RISK` → `play_protect_risk`, while `NO_ISSUES`,
//!      `NO_DATA`, `UNEVALUATED` and unknown values add nothing. These are
//!      **evidence** about the device's environment, not about the token: they
//!      do not make the verdict fail, they are returned in both
//!      [`PlayIntegrityVerdict::reasons`] and [`PlayIntegrityVerdict::evidence`]
//!      so the engine can act on them (a controlling app locks a device).
//!
//! Once the signature holds, every check runs and every failure is
//! reported (the payload is authentic, so all its findings are facts).
//!
//! # Verdict and score
//!
//! `verified` is true when no fatal reason was found. Then `state` is the
//! device grade and `score` is 1.0 for `strong`, 0.8 for `device`, 0.5 for
//! `basic`; otherwise `state` is [`State::Failed`] and `score` 0.0.
//!
//! # Malformed input
//!
//! Anything that is not a well-formed token for our keys — wrong part count,
//! bad base64, a wrong header, an unwrap or GCM failure, bad JSON, a missing
//! required field (`requestDetails` with `requestPackageName`, `nonce`,
//! `timestampMillis`; `appIntegrity.appRecognitionVerdict`; `deviceIntegrity`;
//! `accountDetails.appLicensingVerdict`), a token above 16 KiB — is
//! [`PlayIntegrityError::Malformed`] with a stable description, never a
//! panic (maps to 422 `attestation_invalid`).

use std::{fmt, time::Duration};

use aes_gcm::{
    aead::{Aead, Payload},
    Aes256Gcm, KeyInit,
};
use aes_kw::KwAes256;
use base64::{
    engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
    Engine,
};
use p256::{
    ecdsa::{signature::Verifier, Signature, VerifyingKey},
    pkcs8::DecodePublicKey,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Largest integrity token accepted, in bytes (Play's tokens are a few KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// How far in the future `timestampMillis` may be (clock skew between Play's
/// servers and ours), in milliseconds.
pub const MAX_CLOCK_SKEW_MS: i64 = 30_000;

/// Settings' names, used in configuration errors.
const PACKAGES_VAR: &str = "BLOCKREMOTE_PLAY_INTEGRITY_PACKAGES";
const DECRYPTION_KEY_VAR: &str = "BLOCKREMOTE_PLAY_INTEGRITY_DECRYPTION_KEY";
const VERIFICATION_KEY_VAR: &str = "BLOCKREMOTE_PLAY_INTEGRITY_VERIFICATION_KEY";
const CERT_DIGESTS_VAR: &str = "BLOCKREMOTE_PLAY_INTEGRITY_CERT_DIGESTS";

/// Reason codes, stable (they reach responses and audit rows).
pub mod reason {
    /// The JWS signature does not verify with the verification key.
    pub const SIGNATURE_INVALID: &str = "signature_invalid";
    /// `requestPackageName` is not a configured package.
    pub const PACKAGE_MISMATCH: &str = "package_mismatch";
    /// `nonce` is not the nonce we issued.
    pub const NONCE_MISMATCH: &str = "nonce_mismatch";
    /// `timestampMillis` is older than the nonce lifetime.
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// `timestampMillis` is in the future beyond the allowed skew.
    pub const TOKEN_FROM_FUTURE: &str = "token_from_future";
    /// `appRecognitionVerdict` is not `PLAY_RECOGNIZED`.
    pub const APP_NOT_RECOGNIZED: &str = "app_not_recognized";
    /// No signing-certificate digest is in the allow-list.
    pub const CERTIFICATE_MISMATCH: &str = "certificate_mismatch";
    /// No device-integrity label.
    pub const DEVICE_INTEGRITY_FAILED: &str = "device_integrity_failed";
    /// `MEETS_VIRTUAL_INTEGRITY`: an emulator (hard failure).
    pub const EMULATOR_DETECTED: &str = "emulator_detected";
    /// `appLicensingVerdict` is `UNLICENSED` (or unknown).
    pub const APP_UNLICENSED: &str = "app_unlicensed";
    /// `appLicensingVerdict` is `UNEVALUATED` (not fatal).
    pub const LICENSING_UNEVALUATED: &str = "licensing_unevaluated";
    /// `appsDetected` has `UNKNOWN_CAPTURING` (evidence).
    pub const CAPTURING_APP_DETECTED: &str = "capturing_app_detected";
    /// `appsDetected` has `UNKNOWN_CONTROLLING` (evidence).
    pub const CONTROLLING_APP_DETECTED: &str = "controlling_app_detected";
    /// `playProtectVerdict` reports a risk (evidence).
    pub const PLAY_PROTECT_RISK: &str = "play_protect_risk";
}

/// Why a setting is unusable; each names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The package list is empty or holds an invalid name.
    #[error("{PACKAGES_VAR}: {0}")]
    Packages(String),
    /// The decryption key is not base64 of 32 bytes.
    #[error("{DECRYPTION_KEY_VAR}: {0}")]
    DecryptionKey(&'static str),
    /// The verification key is not base64 DER SubjectPublicKeyInfo of a P-256 key.
    #[error("{VERIFICATION_KEY_VAR}: {0}")]
    VerificationKey(&'static str),
    /// The digest list is empty or holds a value that is not base64url of 32 bytes.
    #[error("{CERT_DIGESTS_VAR}: {0}")]
    CertDigests(String),
}

impl ConfigError {
    /// The variable at fault.
    pub fn variable(&self) -> &'static str {
        match self {
            Self::Packages(_) => PACKAGES_VAR,
            Self::DecryptionKey(_) => DECRYPTION_KEY_VAR,
            Self::VerificationKey(_) => VERIFICATION_KEY_VAR,
            Self::CertDigests(_) => CERT_DIGESTS_VAR,
        }
    }

    /// What is wrong with it (never the value of a key).
    pub fn detail(&self) -> String {
        match self {
            Self::Packages(m) | Self::CertDigests(m) => m.clone(),
            Self::DecryptionKey(m) | Self::VerificationKey(m) => (*m).to_owned(),
        }
    }
}

/// One app's Play Integrity settings.
#[derive(Clone)]
pub struct PlayIntegrityConfig {
    packages: Vec<String>,
    decryption_key: [u8; 32],
    verification_key: VerifyingKey,
    cert_digests: Vec<[u8; 32]>,
}

impl fmt::Debug for PlayIntegrityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlayIntegrityConfig")
            .field("packages", &self.packages)
            .field("decryption_key", &"<redacted>")
            .field("cert_digests", &self.cert_digests.len())
            .finish_non_exhaustive()
    }
}

/// Base64, standard or URL-safe alphabet, padding optional, surrounding
/// whitespace ignored (as pasted from Play Console).
fn decode_lenient(value: &str) -> Option<Vec<u8>> {
    let trimmed = value.trim().trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| URL_SAFE_NO_PAD.decode(trimmed))
        .ok()
}

/// A certificate digest as the verdict writes it (base64url, padding optional).
fn decode_digest(value: &str) -> Option<[u8; 32]> {
    let trimmed = value.trim().trim_end_matches('=');
    URL_SAFE_NO_PAD.decode(trimmed).ok()?.try_into().ok()
}

fn valid_package(name: &str) -> bool {
    name.len() <= 255
        && name.split('.').all(|segment| {
            segment
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl PlayIntegrityConfig {
    /// Builds the settings from parsed values.
    pub fn new(
        packages: Vec<String>,
        decryption_key: [u8; 32],
        verification_key: VerifyingKey,
        cert_digests: Vec<[u8; 32]>,
    ) -> Self {
        Self {
            packages,
            decryption_key,
            verification_key,
            cert_digests,
        }
    }

    /// Parses and validates the raw settings: comma-separated package names;
    /// base64 AES-256 decryption key; base64 DER SubjectPublicKeyInfo
    /// (EC P-256) verification key; comma-separated base64url SHA-256
    /// certificate digests. The error names the variable at fault.
    pub fn from_settings(
        packages: &str,
        decryption_key: &str,
        verification_key: &str,
        cert_digests: &str,
    ) -> Result<Self, ConfigError> {
        let packages: Vec<String> = packages
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if packages.is_empty() {
            return Err(ConfigError::Packages("no package name".into()));
        }
        if let Some(bad) = packages.iter().find(|p| !valid_package(p)) {
            return Err(ConfigError::Packages(format!(
                "{bad:?} is not an Android package name"
            )));
        }
        let decryption_key = decode_lenient(decryption_key)
            .ok_or(ConfigError::DecryptionKey("not base64"))?
            .try_into()
            .map_err(|_| ConfigError::DecryptionKey("not 32 bytes (AES-256)"))?;
        let der =
            decode_lenient(verification_key).ok_or(ConfigError::VerificationKey("not base64"))?;
        let verification_key = VerifyingKey::from_public_key_der(&der).map_err(|_| {
            ConfigError::VerificationKey("not a DER SubjectPublicKeyInfo of an EC P-256 key")
        })?;
        let mut digests = Vec::new();
        for value in cert_digests
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            let digest = decode_digest(value).ok_or_else(|| {
                ConfigError::CertDigests(format!(
                    "{value:?} is not base64url of a 32-byte SHA-256 digest"
                ))
            })?;
            digests.push(digest);
        }
        if digests.is_empty() {
            return Err(ConfigError::CertDigests("no digest".into()));
        }
        Ok(Self::new(
            packages,
            decryption_key,
            verification_key,
            digests,
        ))
    }

    /// The accepted package names.
    pub fn packages(&self) -> &[String] {
        &self.packages
    }
}

/// The token is not a well-formed integrity token for our keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlayIntegrityError {
    /// What was wrong, stable text (for logs; the response code is
    /// `attestation_invalid`).
    #[error("malformed Play Integrity token: {0}")]
    Malformed(&'static str),
}

use PlayIntegrityError::Malformed;

/// The graded attestation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// `MEETS_STRONG_INTEGRITY`: hardware-backed integrity.
    Strong,
    /// `MEETS_DEVICE_INTEGRITY`: a genuine, certified device.
    Device,
    /// `MEETS_BASIC_INTEGRITY`: basic integrity only (may be rooted/uncertified).
    Basic,
    /// A fatal check failed.
    Failed,
}

impl State {
    /// The attestation score of a state: strong 1.0, device 0.8, basic 0.5, failed 0.
    pub fn score(self) -> f64 {
        match self {
            Self::Strong => 1.0,
            Self::Device => 0.8,
            Self::Basic => 0.5,
            Self::Failed => 0.0,
        }
    }
}

/// The outcome of a well-formed token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlayIntegrityVerdict {
    /// No fatal check failed.
    pub verified: bool,
    /// The device grade when verified, else [`State::Failed`].
    pub state: State,
    /// [`State::score`] of `state`, in [0, 1].
    pub score: f64,
    /// Every reason found, fatal or not, in check order (evidence included).
    pub reasons: Vec<&'static str>,
    /// The environment evidence alone (`capturing_app_detected`,
    /// `controlling_app_detected`, `play_protect_risk`), for the engine.
    pub evidence: Vec<&'static str>,
}

impl PlayIntegrityVerdict {
    /// True for a hard fact (an emulator): immediate action, not a mere failure.
    pub fn hard_failure(&self) -> bool {
        self.reasons.contains(&reason::EMULATOR_DETECTED)
    }

    fn failed(reasons: Vec<&'static str>, evidence: Vec<&'static str>) -> Self {
        Self {
            verified: false,
            state: State::Failed,
            score: 0.0,
            reasons,
            evidence,
        }
    }
}

/// Reasons that do not make a verdict fail.
const NOT_FATAL: [&str; 4] = [
    reason::LICENSING_UNEVALUATED,
    reason::CAPTURING_APP_DETECTED,
    reason::CONTROLLING_APP_DETECTED,
    reason::PLAY_PROTECT_RISK,
];

#[derive(Deserialize)]
struct JweHeader {
    alg: String,
    enc: String,
    zip: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Claims {
    request_details: RequestDetails,
    app_integrity: AppIntegrity,
    device_integrity: DeviceIntegrity,
    account_details: AccountDetails,
    environment_details: Option<EnvironmentDetails>,
}

/// `timestampMillis` is an int64, which Play's JSON writes as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Millis {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestDetails {
    request_package_name: String,
    nonce: String,
    timestamp_millis: Millis,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppIntegrity {
    app_recognition_verdict: String,
    #[serde(default)]
    certificate_sha256_digest: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceIntegrity {
    #[serde(default)]
    device_recognition_verdict: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountDetails {
    app_licensing_verdict: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvironmentDetails {
    app_access_risk_verdict: Option<AppAccessRisk>,
    play_protect_verdict: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppAccessRisk {
    #[serde(default)]
    apps_detected: Vec<String>,
}

fn b64(part: &str, what: &'static str) -> Result<Vec<u8>, PlayIntegrityError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| Malformed(what))
}

impl PlayIntegrityConfig {
    /// Opens the JWE: the compact JWS it holds.
    fn decrypt(&self, token: &str) -> Result<Vec<u8>, PlayIntegrityError> {
        let mut parts = token.split('.');
        let (Some(header), Some(key), Some(iv), Some(ciphertext), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Malformed("JWE: not five parts"));
        };
        let header_json: JweHeader = serde_json::from_slice(&b64(header, "JWE header: base64")?)
            .map_err(|_| Malformed("JWE header: not JSON with alg and enc"))?;
        if header_json.alg != "A256KW" {
            return Err(Malformed("JWE header: alg is not A256KW"));
        }
        if header_json.enc != "A256GCM" {
            return Err(Malformed("JWE header: enc is not A256GCM"));
        }
        if header_json.zip.is_some() {
            return Err(Malformed("JWE header: zip is not accepted"));
        }
        if header_json.crit.is_some() {
            return Err(Malformed("JWE header: crit is not accepted"));
        }
        let wrapped = b64(key, "JWE encrypted key: base64")?;
        if wrapped.len() != 40 {
            return Err(Malformed("JWE encrypted key: not a wrapped 256-bit key"));
        }
        let iv: [u8; 12] = b64(iv, "JWE IV: base64")?
            .try_into()
            .map_err(|_| Malformed("JWE IV: not 96 bits"))?;
        let mut sealed = b64(ciphertext, "JWE ciphertext: base64")?;
        let tag = b64(tag, "JWE tag: base64")?;
        if tag.len() != 16 {
            return Err(Malformed("JWE tag: not 128 bits"));
        }
        sealed.extend_from_slice(&tag);

        let kw = <KwAes256 as aes_kw::KeyInit>::new_from_slice(&self.decryption_key)
            .map_err(|_| Malformed("decryption key"))?;
        let mut cek = [0u8; 32];
        kw.unwrap_key(&wrapped, &mut cek)
            .map_err(|_| Malformed("JWE encrypted key: unwrap failed (another key?)"))?;
        let cipher =
            <Aes256Gcm as KeyInit>::new_from_slice(&cek).map_err(|_| Malformed("content key"))?;
        cek.fill(0);
        cipher
            .decrypt(
                (&iv).into(),
                Payload {
                    msg: &sealed,
                    aad: header.as_bytes(),
                },
            )
            .map_err(|_| Malformed("JWE: decryption failed (altered or another key)"))
    }

    /// Verifies a token against the nonce we issued, at `now_ms` (Unix
    /// milliseconds), with nonces living `nonce_lifetime`.
    pub fn verify(
        &self,
        token: &str,
        issued_nonce: &str,
        now_ms: i64,
        nonce_lifetime: Duration,
    ) -> Result<PlayIntegrityVerdict, PlayIntegrityError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Malformed("token larger than 16 KiB"));
        }
        let jws = self.decrypt(token.trim())?;
        let jws = std::str::from_utf8(&jws).map_err(|_| Malformed("JWS: not UTF-8"))?;

        let mut parts = jws.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Malformed("JWS: not three parts"));
        };
        let header_json: JwsHeader = serde_json::from_slice(&b64(header, "JWS header: base64")?)
            .map_err(|_| Malformed("JWS header: not JSON with alg"))?;
        if header_json.alg != "ES256" {
            return Err(Malformed("JWS header: alg is not ES256"));
        }
        if header_json.crit.is_some() {
            return Err(Malformed("JWS header: crit is not accepted"));
        }
        let payload_bytes = b64(payload, "JWS payload: base64")?;
        let signature = b64(signature, "JWS signature: base64")?;
        let signature = <[u8; 64]>::try_from(signature.as_slice())
            .ok()
            .and_then(|raw| Signature::from_slice(&raw).ok());
        let signed = &jws[..header.len() + 1 + payload.len()];
        let authentic = signature.is_some_and(|signature| {
            self.verification_key
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        });
        if !authentic {
            return Ok(PlayIntegrityVerdict::failed(
                vec![reason::SIGNATURE_INVALID],
                Vec::new(),
            ));
        }
        let verdict: Claims = serde_json::from_slice(&payload_bytes)
            .map_err(|_| Malformed("verdict: not JSON with the required fields"))?;
        Ok(self.judge(&verdict, issued_nonce, now_ms, nonce_lifetime))
    }

    fn judge(
        &self,
        verdict: &Claims,
        issued_nonce: &str,
        now_ms: i64,
        nonce_lifetime: Duration,
    ) -> PlayIntegrityVerdict {
        let mut reasons = Vec::new();
        let mut evidence = Vec::new();

        let request = &verdict.request_details;
        if !self.packages.contains(&request.request_package_name) {
            reasons.push(reason::PACKAGE_MISMATCH);
        }
        if !bool::from(request.nonce.as_bytes().ct_eq(issued_nonce.as_bytes())) {
            reasons.push(reason::NONCE_MISMATCH);
        }
        let timestamp = match &request.timestamp_millis {
            Millis::Number(n) => Some(*n),
            Millis::Text(s) => s.parse::<i64>().ok(),
        };
        let lifetime_ms = i128::try_from(nonce_lifetime.as_millis()).unwrap_or(i128::MAX);
        match timestamp.map(|t| i128::from(now_ms) - i128::from(t)) {
            // An unreadable timestamp cannot be shown fresh.
            None => reasons.push(reason::TOKEN_EXPIRED),
            Some(age) if age > lifetime_ms => reasons.push(reason::TOKEN_EXPIRED),
            Some(age) if -age > i128::from(MAX_CLOCK_SKEW_MS) => {
                reasons.push(reason::TOKEN_FROM_FUTURE)
            }
            Some(_) => {}
        }

        let app = &verdict.app_integrity;
        if app.app_recognition_verdict != "PLAY_RECOGNIZED" {
            reasons.push(reason::APP_NOT_RECOGNIZED);
        }
        let allowed = app
            .certificate_sha256_digest
            .iter()
            .filter_map(|d| decode_digest(d))
            .any(|d| self.cert_digests.iter().any(|a| bool::from(a.ct_eq(&d))));
        if !allowed {
            reasons.push(reason::CERTIFICATE_MISMATCH);
        }

        let labels = &verdict.device_integrity.device_recognition_verdict;
        let has = |label: &str| labels.iter().any(|l| l == label);
        let grade = if has("MEETS_VIRTUAL_INTEGRITY") {
            reasons.push(reason::EMULATOR_DETECTED);
            State::Failed
        } else if has("MEETS_STRONG_INTEGRITY") {
            State::Strong
        } else if has("MEETS_DEVICE_INTEGRITY") {
            State::Device
        } else if has("MEETS_BASIC_INTEGRITY") {
            State::Basic
        } else {
            reasons.push(reason::DEVICE_INTEGRITY_FAILED);
            State::Failed
        };

        match verdict.account_details.app_licensing_verdict.as_str() {
            "LICENSED" => {}
            "UNEVALUATED" => reasons.push(reason::LICENSING_UNEVALUATED),
            _ => reasons.push(reason::APP_UNLICENSED),
        }

        if let Some(environment) = &verdict.environment_details {
            if let Some(access) = &environment.app_access_risk_verdict {
                let detected = |label: &str| access.apps_detected.iter().any(|a| a == label);
                if detected("UNKNOWN_CAPTURING") {
                    evidence.push(reason::CAPTURING_APP_DETECTED);
                }
                if detected("UNKNOWN_CONTROLLING") {
                    evidence.push(reason::CONTROLLING_APP_DETECTED);
                }
            }
            if matches!(
                environment.play_protect_verdict.as_deref(),
                Some("POSSIBLE_RISK" | "MEDIUM_RISK" | "HIGH_RISK")
            ) {
                evidence.push(reason::PLAY_PROTECT_RISK);
            }
        }
        reasons.extend_from_slice(&evidence);

        if reasons.iter().any(|r| !NOT_FATAL.contains(r)) {
            return PlayIntegrityVerdict::failed(reasons, evidence);
        }
        PlayIntegrityVerdict {
            verified: true,
            state: grade,
            score: grade.score(),
            reasons,
            evidence,
        }
    }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::SigningKey;
    use proptest::prelude::*;
    use rand::rngs::OsRng;
    use serde_json::{json, Value};

    use super::*;
    use crate::auth::fixtures::{
        cert_digest, encrypt, jwe_header, jws_header, play_verdict, sign, with, PlayKeys,
    };

    const PACKAGE: &str = "com.example.bank";
    const NONCE: &str = "att_q2VbWQ0s1oJz0F9Xn8kPq7YpV3lKc5RfGhTjUw2eAbc";
    const NOW: i64 = 1_764_643_200_000;
    const LIFETIME: Duration = Duration::from_secs(180);
    const CERT: [u8; 32] = [7; 32];

    /// The generated keys, and the settings Play Console would give for them.
    type Keys = PlayKeys;

    trait Settings {
        fn config(&self) -> PlayIntegrityConfig;
    }

    impl Settings for Keys {
        fn config(&self) -> PlayIntegrityConfig {
            PlayIntegrityConfig::from_settings(
                &format!("com.other.app, {PACKAGE}"),
                &self.decryption_key(),
                &self.verification_key(),
                &cert_digest(CERT),
            )
            .expect("config")
        }
    }

    fn b64u(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A verdict that passes every check, with a strong device.
    fn good_payload() -> Value {
        play_verdict(PACKAGE, NONCE, NOW - 5_000, CERT)
    }

    fn token(keys: &Keys, payload: &Value) -> String {
        keys.token(payload)
    }

    fn verify_payload(payload: &Value) -> PlayIntegrityVerdict {
        let keys = Keys::generate();
        keys.config()
            .verify(&token(&keys, payload), NONCE, NOW, LIFETIME)
            .expect("well-formed")
    }

    fn refused(payload: Value, reason: &str) {
        let verdict = verify_payload(&payload);
        assert!(!verdict.verified, "{verdict:?}");
        assert_eq!(verdict.state, State::Failed);
        assert_eq!(verdict.score, 0.0);
        assert_eq!(verdict.reasons, vec![reason], "{verdict:?}");
    }

    #[test]
    fn good_token_strong() {
        let verdict = verify_payload(&good_payload());
        assert_eq!(
            verdict,
            PlayIntegrityVerdict {
                verified: true,
                state: State::Strong,
                score: 1.0,
                reasons: vec![],
                evidence: vec![],
            }
        );
        assert!(!verdict.hard_failure());
    }

    #[test]
    fn good_token_device_and_basic() {
        let device = with(
            good_payload(),
            "/deviceIntegrity/deviceRecognitionVerdict",
            json!(["MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY"]),
        );
        let verdict = verify_payload(&device);
        assert!(verdict.verified);
        assert_eq!((verdict.state, verdict.score), (State::Device, 0.8));
        let basic = with(
            good_payload(),
            "/deviceIntegrity/deviceRecognitionVerdict",
            json!(["MEETS_BASIC_INTEGRITY"]),
        );
        let verdict = verify_payload(&basic);
        assert!(verdict.verified);
        assert_eq!((verdict.state, verdict.score), (State::Basic, 0.5));
    }

    #[test]
    fn numeric_timestamp_and_missing_environment_accepted() {
        let mut payload = with(
            good_payload(),
            "/requestDetails/timestampMillis",
            json!(NOW - 1_000),
        );
        payload
            .as_object_mut()
            .expect("object")
            .remove("environmentDetails");
        assert!(verify_payload(&payload).verified);
    }

    #[test]
    fn wrong_nonce_refused() {
        refused(
            with(good_payload(), "/requestDetails/nonce", json!("att_other")),
            reason::NONCE_MISMATCH,
        );
    }

    #[test]
    fn another_devices_nonce_refused() {
        // Another device's (valid, issued) nonce is just another nonce string here.
        let keys = Keys::generate();
        let token = token(&keys, &good_payload());
        let verdict = keys
            .config()
            .verify(&token, "att_issued_to_this_device", NOW, LIFETIME)
            .expect("well-formed");
        assert!(!verdict.verified);
        assert_eq!(verdict.reasons, vec![reason::NONCE_MISMATCH]);
        // A prefix of the nonce is not the nonce.
        refused(
            with(good_payload(), "/requestDetails/nonce", json!(&NONCE[..10])),
            reason::NONCE_MISMATCH,
        );
    }

    #[test]
    fn expired_and_future_tokens_refused() {
        let lifetime_ms = LIFETIME.as_millis() as i64;
        refused(
            with(
                good_payload(),
                "/requestDetails/timestampMillis",
                json!((NOW - lifetime_ms - 1).to_string()),
            ),
            reason::TOKEN_EXPIRED,
        );
        // At the edge of the lifetime it still passes.
        let edge = with(
            good_payload(),
            "/requestDetails/timestampMillis",
            json!((NOW - lifetime_ms).to_string()),
        );
        assert!(verify_payload(&edge).verified);
        refused(
            with(
                good_payload(),
                "/requestDetails/timestampMillis",
                json!((NOW + MAX_CLOCK_SKEW_MS + 1).to_string()),
            ),
            reason::TOKEN_FROM_FUTURE,
        );
        let skewed = with(
            good_payload(),
            "/requestDetails/timestampMillis",
            json!((NOW + 1_000).to_string()),
        );
        assert!(verify_payload(&skewed).verified);
        refused(
            with(
                good_payload(),
                "/requestDetails/timestampMillis",
                json!("yesterday"),
            ),
            reason::TOKEN_EXPIRED,
        );
        refused(
            with(
                good_payload(),
                "/requestDetails/timestampMillis",
                json!(i64::MIN),
            ),
            reason::TOKEN_EXPIRED,
        );
        refused(
            with(
                good_payload(),
                "/requestDetails/timestampMillis",
                json!(i64::MAX),
            ),
            reason::TOKEN_FROM_FUTURE,
        );
    }

    #[test]
    fn wrong_package_refused() {
        refused(
            with(
                good_payload(),
                "/requestDetails/requestPackageName",
                json!("com.example.bank.repackaged"),
            ),
            reason::PACKAGE_MISMATCH,
        );
    }

    #[test]
    fn wrong_digest_refused() {
        refused(
            with(
                good_payload(),
                "/appIntegrity/certificateSha256Digest",
                json!([b64u([9; 32]), "not base64!"]),
            ),
            reason::CERTIFICATE_MISMATCH,
        );
        // Absent (Play writes none when the app is unevaluated).
        let mut payload = good_payload();
        payload["appIntegrity"]
            .as_object_mut()
            .expect("object")
            .remove("certificateSha256Digest");
        refused(payload, reason::CERTIFICATE_MISMATCH);
    }

    #[test]
    fn unrecognized_app_refused() {
        for verdict in ["UNRECOGNIZED_VERSION", "UNEVALUATED"] {
            refused(
                with(
                    good_payload(),
                    "/appIntegrity/appRecognitionVerdict",
                    json!(verdict),
                ),
                reason::APP_NOT_RECOGNIZED,
            );
        }
    }

    #[test]
    fn no_device_integrity_refused() {
        refused(
            with(
                good_payload(),
                "/deviceIntegrity/deviceRecognitionVerdict",
                json!([]),
            ),
            reason::DEVICE_INTEGRITY_FAILED,
        );
        let mut payload = good_payload();
        payload["deviceIntegrity"] = json!({});
        refused(payload, reason::DEVICE_INTEGRITY_FAILED);
    }

    #[test]
    fn virtual_integrity_is_an_emulator() {
        let payload = with(
            good_payload(),
            "/deviceIntegrity/deviceRecognitionVerdict",
            json!(["MEETS_VIRTUAL_INTEGRITY", "MEETS_STRONG_INTEGRITY"]),
        );
        refused(payload.clone(), reason::EMULATOR_DETECTED);
        assert!(verify_payload(&payload).hard_failure());
    }

    #[test]
    fn unlicensed_refused_unevaluated_noted() {
        refused(
            with(
                good_payload(),
                "/accountDetails/appLicensingVerdict",
                json!("UNLICENSED"),
            ),
            reason::APP_UNLICENSED,
        );
        let verdict = verify_payload(&with(
            good_payload(),
            "/accountDetails/appLicensingVerdict",
            json!("UNEVALUATED"),
        ));
        assert!(verdict.verified);
        assert_eq!(verdict.state, State::Strong);
        assert_eq!(verdict.reasons, vec![reason::LICENSING_UNEVALUATED]);
        assert!(verdict.evidence.is_empty());
    }

    #[test]
    fn capturing_and_controlling_apps_are_evidence() {
        let verdict = verify_payload(&with(
            good_payload(),
            "/environmentDetails/appAccessRiskVerdict/appsDetected",
            json!([
                "KNOWN_INSTALLED",
                "UNKNOWN_CAPTURING",
                "UNKNOWN_CONTROLLING"
            ]),
        ));
        let both = vec![
            reason::CAPTURING_APP_DETECTED,
            reason::CONTROLLING_APP_DETECTED,
        ];
        assert!(verdict.verified);
        assert_eq!(verdict.state, State::Strong);
        assert_eq!(verdict.reasons, both);
        assert_eq!(verdict.evidence, both);

        let verdict = verify_payload(&with(
            good_payload(),
            "/environmentDetails/appAccessRiskVerdict/appsDetected",
            json!(["UNKNOWN_CONTROLLING"]),
        ));
        assert_eq!(verdict.evidence, vec![reason::CONTROLLING_APP_DETECTED]);
        // Known (Play-installed) capturing apps are not evidence.
        let verdict = verify_payload(&with(
            good_payload(),
            "/environmentDetails/appAccessRiskVerdict/appsDetected",
            json!(["KNOWN_CAPTURING", "KNOWN_CONTROLLING"]),
        ));
        assert!(verdict.evidence.is_empty());
    }

    #[test]
    fn evidence_reported_alongside_failures() {
        let payload = with(
            with(
                good_payload(),
                "/environmentDetails/appAccessRiskVerdict/appsDetected",
                json!(["UNKNOWN_CAPTURING"]),
            ),
            "/requestDetails/nonce",
            json!("att_other"),
        );
        let verdict = verify_payload(&payload);
        assert!(!verdict.verified);
        assert_eq!(
            verdict.reasons,
            vec![reason::NONCE_MISMATCH, reason::CAPTURING_APP_DETECTED]
        );
        assert_eq!(verdict.evidence, vec![reason::CAPTURING_APP_DETECTED]);
    }

    #[test]
    fn play_protect_risk_is_evidence() {
        for risk in ["POSSIBLE_RISK", "MEDIUM_RISK", "HIGH_RISK"] {
            let verdict = verify_payload(&with(
                good_payload(),
                "/environmentDetails/playProtectVerdict",
                json!(risk),
            ));
            assert!(verdict.verified);
            assert_eq!(verdict.reasons, vec![reason::PLAY_PROTECT_RISK]);
            assert_eq!(verdict.evidence, vec![reason::PLAY_PROTECT_RISK]);
        }
        for ignored in ["NO_ISSUES", "NO_DATA", "UNEVALUATED"] {
            let verdict = verify_payload(&with(
                good_payload(),
                "/environmentDetails/playProtectVerdict",
                json!(ignored),
            ));
            assert!(verdict.reasons.is_empty(), "{ignored}");
        }
    }

    #[test]
    fn every_failure_reported_in_order() {
        let payload = json!({
            "requestDetails": {"requestPackageName": "x.y", "nonce": "n", "timestampMillis": "0"},
            "appIntegrity": {"appRecognitionVerdict": "UNEVALUATED"},
            "deviceIntegrity": {"deviceRecognitionVerdict": ["MEETS_VIRTUAL_INTEGRITY"]},
            "accountDetails": {"appLicensingVerdict": "UNLICENSED"},
            "environmentDetails": {"playProtectVerdict": "HIGH_RISK"},
        });
        let verdict = verify_payload(&payload);
        assert_eq!(
            verdict.reasons,
            vec![
                reason::PACKAGE_MISMATCH,
                reason::NONCE_MISMATCH,
                reason::TOKEN_EXPIRED,
                reason::APP_NOT_RECOGNIZED,
                reason::CERTIFICATE_MISMATCH,
                reason::EMULATOR_DETECTED,
                reason::APP_UNLICENSED,
                reason::PLAY_PROTECT_RISK,
            ]
        );
    }

    #[test]
    fn signed_by_another_key_refused() {
        let keys = Keys::generate();
        let other = SigningKey::random(&mut OsRng);
        let jws = sign(&jws_header(), good_payload().to_string().as_bytes(), &other);
        let token = encrypt(&jwe_header(), jws.as_bytes(), &keys.aes);
        let verdict = keys
            .config()
            .verify(&token, NONCE, NOW, LIFETIME)
            .expect("well-formed");
        assert_eq!(
            verdict,
            PlayIntegrityVerdict::failed(vec![reason::SIGNATURE_INVALID], vec![])
        );
    }

    #[test]
    fn altered_payload_or_signature_refused() {
        let keys = Keys::generate();
        let jws = sign(
            &jws_header(),
            good_payload().to_string().as_bytes(),
            &keys.signing,
        );
        let parts: Vec<&str> = jws.split('.').collect();
        let forged_payload = with(good_payload(), "/requestDetails/nonce", json!("att_x"));
        let swapped = format!(
            "{}.{}.{}",
            parts[0],
            b64u(forged_payload.to_string()),
            parts[2]
        );
        let zero_signature = format!("{}.{}.{}", parts[0], parts[1], b64u([0u8; 64]));
        let short_signature = format!("{}.{}.{}", parts[0], parts[1], b64u([1u8; 63]));
        for jws in [swapped, zero_signature, short_signature] {
            let token = encrypt(&jwe_header(), jws.as_bytes(), &keys.aes);
            let verdict = keys
                .config()
                .verify(&token, NONCE, NOW, LIFETIME)
                .expect("well-formed");
            assert_eq!(verdict.reasons, vec![reason::SIGNATURE_INVALID]);
            assert!(!verdict.verified);
        }
    }

    #[test]
    fn encrypted_for_another_key_is_malformed() {
        let keys = Keys::generate();
        let other = Keys::generate();
        let token = token(&other, &good_payload());
        assert_eq!(
            keys.config().verify(&token, NONCE, NOW, LIFETIME),
            Err(Malformed("JWE encrypted key: unwrap failed (another key?)"))
        );
    }

    fn flip_part(token: &str, index: usize) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut bytes = URL_SAFE_NO_PAD.decode(&parts[index]).expect("b64");
        bytes[0] ^= 1;
        parts[index] = b64u(bytes);
        parts.join(".")
    }

    #[test]
    fn altered_ciphertext_tag_iv_or_header_is_malformed() {
        let keys = Keys::generate();
        let config = keys.config();
        let token = token(&keys, &good_payload());
        for index in [2, 3, 4] {
            assert_eq!(
                config.verify(&flip_part(&token, index), NONCE, NOW, LIFETIME),
                Err(Malformed("JWE: decryption failed (altered or another key)")),
                "part {index}"
            );
        }
        assert_eq!(
            config.verify(&flip_part(&token, 1), NONCE, NOW, LIFETIME),
            Err(Malformed("JWE encrypted key: unwrap failed (another key?)"))
        );
        // The same header with a space added: still A256KW/A256GCM, but the AAD differs.
        let parts: Vec<&str> = token.split('.').collect();
        let respaced = b64u(r#"{"alg":"A256KW", "enc":"A256GCM"}"#);
        let altered = [respaced.as_str(), parts[1], parts[2], parts[3], parts[4]].join(".");
        assert_eq!(
            config.verify(&altered, NONCE, NOW, LIFETIME),
            Err(Malformed("JWE: decryption failed (altered or another key)"))
        );
    }

    #[test]
    fn wrong_headers_are_malformed() {
        let keys = Keys::generate();
        let config = keys.config();
        let jws = sign(
            &jws_header(),
            good_payload().to_string().as_bytes(),
            &keys.signing,
        );
        for (header, error) in [
            (
                json!({"alg": "RSA-OAEP", "enc": "A256GCM"}),
                "JWE header: alg is not A256KW",
            ),
            (
                json!({"alg": "dir", "enc": "A256GCM"}),
                "JWE header: alg is not A256KW",
            ),
            (
                json!({"alg": "A256KW", "enc": "A128GCM"}),
                "JWE header: enc is not A256GCM",
            ),
            (
                json!({"alg": "A256KW", "enc": "A256GCM", "zip": "DEF"}),
                "JWE header: zip is not accepted",
            ),
            (
                json!({"alg": "A256KW", "enc": "A256GCM", "crit": ["exp"]}),
                "JWE header: crit is not accepted",
            ),
            (
                json!({"enc": "A256GCM"}),
                "JWE header: not JSON with alg and enc",
            ),
        ] {
            let token = encrypt(&header, jws.as_bytes(), &keys.aes);
            assert_eq!(
                config.verify(&token, NONCE, NOW, LIFETIME),
                Err(Malformed(error)),
                "{header}"
            );
        }
        for (header, error) in [
            (json!({"alg": "none"}), "JWS header: alg is not ES256"),
            (json!({"alg": "HS256"}), "JWS header: alg is not ES256"),
            (json!({"alg": "ES384"}), "JWS header: alg is not ES256"),
            (
                json!({"alg": "ES256", "crit": ["b64"]}),
                "JWS header: crit is not accepted",
            ),
        ] {
            let jws = sign(
                &header,
                good_payload().to_string().as_bytes(),
                &keys.signing,
            );
            let token = encrypt(&jwe_header(), jws.as_bytes(), &keys.aes);
            assert_eq!(
                config.verify(&token, NONCE, NOW, LIFETIME),
                Err(Malformed(error)),
                "{header}"
            );
        }
        // `alg: none` with an empty signature.
        let unsigned = format!(
            "{}.{}.",
            b64u(json!({"alg": "none"}).to_string()),
            b64u(good_payload().to_string())
        );
        let token = encrypt(&jwe_header(), unsigned.as_bytes(), &keys.aes);
        assert_eq!(
            config.verify(&token, NONCE, NOW, LIFETIME),
            Err(Malformed("JWS header: alg is not ES256"))
        );
    }

    #[test]
    fn malformed_inputs() {
        let keys = Keys::generate();
        let config = keys.config();
        let token = token(&keys, &good_payload());
        let check = |input: &str, error: &'static str| {
            assert_eq!(
                config.verify(input, NONCE, NOW, LIFETIME),
                Err(Malformed(error)),
                "{input:.40}"
            );
        };
        check("", "JWE: not five parts");
        check(&token[..token.len() / 2], "JWE: not five parts");
        let short_tag = format!(
            "{}.{}",
            &token[..token.rfind('.').expect("dot")],
            b64u([0; 15])
        );
        check(&short_tag, "JWE tag: not 128 bits");
        check(&format!("{token}.x"), "JWE: not five parts");
        check(&token.replacen('.', ".!", 1), "JWE encrypted key: base64");
        check(&format!("={token}"), "JWE header: base64");
        check(&"a".repeat(MAX_TOKEN_LEN + 1), "token larger than 16 KiB");
        // The JWS inside is not a JWS, or its verdict lacks required fields.
        let inner = |jws: &str| encrypt(&jwe_header(), jws.as_bytes(), &keys.aes);
        check(&inner("not a jws"), "JWS: not three parts");
        check(&inner("a.b.c.d"), "JWS: not three parts");
        let mut missing = good_payload();
        missing["accountDetails"] = json!({});
        let jws = sign(&jws_header(), missing.to_string().as_bytes(), &keys.signing);
        check(&inner(&jws), "verdict: not JSON with the required fields");
        let jws = sign(&jws_header(), b"[1, 2", &keys.signing);
        check(&inner(&jws), "verdict: not JSON with the required fields");
        let encrypted = encrypt(&jwe_header(), &[0xff, 0xfe], &keys.aes);
        check(&encrypted, "JWS: not UTF-8");
    }

    #[test]
    fn settings_validated() {
        let keys = Keys::generate();
        let aes = keys.decryption_key();
        let spki = keys.verification_key();
        let digest = b64u(CERT);
        let build = |p: &str, d: &str, v: &str, c: &str| {
            PlayIntegrityConfig::from_settings(p, d, v, c).map(|c| c.packages().to_vec())
        };
        assert_eq!(
            build(
                " a.b , c.d_e ",
                &aes,
                &spki,
                &format!("{digest}=, {digest}")
            ),
            Ok(vec!["a.b".to_owned(), "c.d_e".to_owned()])
        );
        assert!(matches!(
            build(" , ", &aes, &spki, &digest),
            Err(ConfigError::Packages(_))
        ));
        assert!(matches!(
            build("a..b", &aes, &spki, &digest),
            Err(ConfigError::Packages(_))
        ));
        assert_eq!(
            build("a.b", "%%%", &spki, &digest),
            Err(ConfigError::DecryptionKey("not base64"))
        );
        assert_eq!(
            build("a.b", &aes[..20], &spki, &digest),
            Err(ConfigError::DecryptionKey("not 32 bytes (AES-256)"))
        );
        assert!(matches!(
            build("a.b", &aes, &aes, &digest),
            Err(ConfigError::VerificationKey(_))
        ));
        assert!(matches!(
            build("a.b", &aes, &spki, "abc"),
            Err(ConfigError::CertDigests(_))
        ));
        assert!(matches!(
            build("a.b", &aes, &spki, ""),
            Err(ConfigError::CertDigests(_))
        ));
        let message = build("a.b", &aes, "x", &digest)
            .expect_err("bad key")
            .to_string();
        assert!(message.starts_with(VERIFICATION_KEY_VAR), "{message}");
        // The key does not reach logs.
        let config = keys.config();
        assert!(!format!("{config:?}").contains(&aes));
    }

    fn part() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{0,64}"
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(input in any::<String>()) {
            let keys = Keys::generate();
            let _ = keys.config().verify(&input, NONCE, NOW, LIFETIME);
        }

        #[test]
        fn arbitrary_five_part_tokens_never_panic(
            parts in proptest::collection::vec(part(), 5),
        ) {
            let keys = Keys::generate();
            let _ = keys.config().verify(&parts.join("."), NONCE, NOW, LIFETIME);
        }

        #[test]
        fn arbitrary_plaintext_in_a_valid_jwe_never_panics(plaintext in any::<Vec<u8>>()) {
            let keys = Keys::generate();
            let token = encrypt(&jwe_header(), &plaintext, &keys.aes);
            prop_assert!(keys.config().verify(&token, NONCE, NOW, LIFETIME).is_err());
        }

        #[test]
        fn arbitrary_signed_payload_never_panics(payload in any::<Vec<u8>>()) {
            let keys = Keys::generate();
            let jws = sign(&jws_header(), &payload, &keys.signing);
            let token = encrypt(&jwe_header(), jws.as_bytes(), &keys.aes);
            let _ = keys.config().verify(&token, NONCE, NOW, LIFETIME);
        }
    }
}
