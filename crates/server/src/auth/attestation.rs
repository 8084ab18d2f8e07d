//! Attestation: single-use nonces bound to a device, and verdicts from the
//! platform's hardware root of trust, graded and fed to the engine.
//!
//! `POST /v1/attestation/nonce` stores a fresh 256-bit nonce at
//! `nonce:{device}` (one outstanding nonce per device; a new one replaces it)
//! with a TTL of 120–300 s. Verification *takes* the nonce (`GETDEL`), so it
//! can be used once: a second use, another device's nonce or an expired one
//! all find nothing to match and are a replay (409 `nonce_replay`).
//!
//! Providers, each verified locally (no call to Google or Apple at verify time):
//! - `play_integrity` ([`super::play_integrity`]): the classic integrity token,
//!   a JWE opened with the app's decryption key holding a JWS checked with its
//!   verification key; graded `strong` / `device` / `basic` by the device
//!   verdict. Its environment evidence (`capturing_app_detected`,
//!   `controlling_app_detected`, `play_protect_risk`) is stored with the
//!   verdict and reaches the engine; a controlling app also locks the device
//!   at once (`CRITICAL_LOCK`), and the engine locks it again at its next
//!   heartbeat if an operator unlocks it before the app attests clean.
//! - `app_attest` ([`super::app_attest`]): the first call per key sends the
//!   attestation object and registers the key (public key, counter 0,
//!   receipt); later calls send an assertion and `client_data`, checked with
//!   the stored key, and the counter moves by compare-and-swap. Both grade
//!   `strong` (a Secure Enclave key of a genuine device and our app).
//! - `test`: an HS256 JWT signed with `BLOCKREMOTE_ATTESTATION_TEST_SECRET`,
//!   carrying `nonce`, `device_id`, `app_integrity` and `device_integrity`,
//!   for staging and tests (a pass grades `device`).
//!
//! Every verdict is recorded with its reasons (event and audit row); replays,
//! failed verdicts and malformed artefacts (422 `attestation_invalid`) count as
//! failures — but only an authentic verdict replaces the device's grade and
//! evidence (a retried or garbled request cannot erase a finding), and at the configured number the device is quarantined and
//! `IMMEDIATE_QUARANTINE` is published. A *hard* failure — an emulator, a
//! chain that does not reach the root, a key that is not the one named or
//! stored, an assertion counter that did not move forward — quarantines at
//! once. A verified grade older than `BLOCKREMOTE_ATTESTATION_MAX_AGE_SECONDS`
//! counts as `unknown` ([`crate::store::DeviceAttestation::effective`]).

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{
    app_attest::{self, AppAttestConfig, Outcome, Reason},
    play_integrity::{self, PlayIntegrityConfig},
    random_token, Auth, DeviceAuth,
};
use crate::{
    firewall::{Firewall, FirewallError, Subject},
    realtime::{self, Action},
    state::{keys, SharedState, StateError},
    store::{
        AttestationGrade, AttestationRecord, AuditSource, NewAppAttestKey, NewAuditEntry, Store,
        StoreError,
    },
    telemetry::Metrics,
};

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every fatal check passed.
    Verified,
    /// Anything else.
    Failed,
}

/// The outcome of a verification.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyOutcome {
    /// `verified` or `failed`.
    pub verdict: Verdict,
    /// How strongly the platform vouches for the device, in [0, 1]
    /// (`strong` 1.0, `device` 0.8, `basic` 0.5, `failed` 0; the `test`
    /// provider gives the share of its two checks that passed).
    pub attestation_score: f64,
    /// The graded state: `strong`, `device`, `basic` or `failed`.
    pub state: AttestationGrade,
    /// Stable codes for every failed check, and the environment evidence
    /// (`capturing_app_detected`, `controlling_app_detected`, `play_protect_risk`).
    pub reasons: Vec<&'static str>,
}

/// What the app sent for verification.
#[derive(Debug, Clone, Copy)]
pub struct Artefact<'a> {
    /// The nonce from `/nonce`.
    pub nonce: &'a str,
    /// `play_integrity`, `app_attest` or `test`.
    pub provider: &'a str,
    /// The provider's token.
    pub token: &'a str,
    /// App Attest: base64 of the key identifier.
    pub key_id: Option<&'a str>,
    /// App Attest assertions: base64 of the client data the app hashed.
    pub client_data: Option<&'a str>,
}

/// Why a nonce could not be issued or a token could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    /// The provider is none of `play_integrity`, `app_attest` or `test`.
    #[error("unknown attestation provider")]
    UnknownProvider,
    /// The provider is known but has no verification key on this server.
    #[error("attestation provider not configured")]
    ProviderNotConfigured,
    /// A field is missing or does not belong with this provider.
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: &'static str,
    },
    /// The nonce was already used, belongs to another device, or expired
    /// (counted as a failure before this is returned).
    #[error("nonce replay")]
    NonceReplay,
    /// The artefact is not well formed (counted as a failure before this is
    /// returned); the text says which part, for logs.
    #[error("malformed attestation artefact: {0}")]
    Invalid(&'static str),
    /// The firewall refused after a failed verdict.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The providers this server can verify.
#[derive(Clone, Default)]
pub struct Providers {
    /// `test`: the HS256 secret.
    pub test_secret: Option<SecretString>,
    /// `play_integrity`: the app's keys and allow-lists.
    pub play_integrity: Option<PlayIntegrityConfig>,
    /// `app_attest`: the apps and the trust anchor.
    pub app_attest: Option<AppAttestConfig>,
}

/// A provider, with the settings that verify it.
enum Provider<'a> {
    Test(&'a SecretString),
    PlayIntegrity(&'a PlayIntegrityConfig),
    AppAttest(&'a AppAttestConfig),
}

impl Providers {
    fn get(&self, name: &str) -> Result<Provider<'_>, AttestationError> {
        let provider = match name {
            "test" => self.test_secret.as_ref().map(Provider::Test),
            "play_integrity" => self.play_integrity.as_ref().map(Provider::PlayIntegrity),
            "app_attest" => self.app_attest.as_ref().map(Provider::AppAttest),
            _ => return Err(AttestationError::UnknownProvider),
        };
        provider.ok_or(AttestationError::ProviderNotConfigured)
    }
}

/// Reason codes of this module (the verifiers have their own).
mod reason {
    /// The nonce was used, foreign or expired.
    pub const NONCE_REPLAY: &str = "nonce_replay";
    /// The artefact could not be parsed.
    pub const ATTESTATION_INVALID: &str = "attestation_invalid";
    /// An App Attest assertion for a key this device never attested.
    pub const UNKNOWN_KEY: &str = "unknown_key";
    /// A `test` token that does not verify or is for another nonce/device.
    pub const INVALID_TEST_TOKEN: &str = "invalid_attestation_token";
    /// A `test` token reporting a failed app check.
    pub const APP_INTEGRITY_FAILED: &str = "app_integrity_failed";
    /// A `test` token reporting a failed device check.
    pub const DEVICE_INTEGRITY_FAILED: &str = "device_integrity_failed";
}

/// A verifier's finding, before it is recorded.
#[derive(Debug, Clone, PartialEq)]
struct Judgement {
    grade: AttestationGrade,
    score: f64,
    reasons: Vec<&'static str>,
    evidence: Vec<&'static str>,
    hard: bool,
    app_attest_key: Option<NewAppAttestKey>,
    /// The finding is about the device (a verifier read an authentic
    /// artefact), not about the request.
    authentic: bool,
}

impl Judgement {
    fn failed(reasons: Vec<&'static str>, hard: bool) -> Self {
        Self {
            grade: AttestationGrade::Failed,
            score: 0.0,
            reasons,
            evidence: Vec::new(),
            hard,
            app_attest_key: None,
            authentic: true,
        }
    }

    /// A failure of the request itself (a used nonce, an artefact that does
    /// not parse, an unknown key): it counts, but says nothing new about
    /// the device, so the last authentic verdict stands.
    fn refused(reason: &'static str) -> Self {
        Self {
            authentic: false,
            ..Self::failed(vec![reason], false)
        }
    }
}

#[derive(Debug, Deserialize)]
struct TestClaims {
    nonce: String,
    device_id: String,
    app_integrity: String,
    device_integrity: String,
}

/// Judges a `test` token: both checks pass → `device`; else failed, with
/// the share of checks that passed as the score.
fn judge_test(secret: &SecretString, token: &str, nonce: &str, device_id: &str) -> Judgement {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims::<&str>(&[]);
    validation.validate_aud = false;
    let claims = decode::<TestClaims>(
        token,
        &DecodingKey::from_secret(secret.expose_secret().as_bytes()),
        &validation,
    )
    .ok()
    .map(|data| data.claims)
    .filter(|c| bool::from(c.nonce.as_bytes().ct_eq(nonce.as_bytes())) && c.device_id == device_id);
    let Some(c) = claims else {
        return Judgement::failed(vec![reason::INVALID_TEST_TOKEN], false);
    };
    let mut reasons = Vec::new();
    if c.app_integrity != "pass" {
        reasons.push(reason::APP_INTEGRITY_FAILED);
    }
    if c.device_integrity != "pass" {
        reasons.push(reason::DEVICE_INTEGRITY_FAILED);
    }
    let passes = 2 - reasons.len();
    Judgement {
        grade: if reasons.is_empty() {
            AttestationGrade::Device
        } else {
            AttestationGrade::Failed
        },
        score: passes as f64 / 2.0,
        reasons,
        evidence: Vec::new(),
        hard: false,
        app_attest_key: None,
        authentic: true,
    }
}

/// Judges a Play Integrity token.
fn judge_play_integrity(
    config: &PlayIntegrityConfig,
    token: &str,
    nonce: &str,
    nonce_ttl: Duration,
) -> Result<Judgement, &'static str> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let verdict = config
        .verify(token, nonce, now_ms, nonce_ttl)
        .map_err(|play_integrity::PlayIntegrityError::Malformed(what)| what)?;
    let grade = match verdict.state {
        play_integrity::State::Strong => AttestationGrade::Strong,
        play_integrity::State::Device => AttestationGrade::Device,
        play_integrity::State::Basic => AttestationGrade::Basic,
        play_integrity::State::Failed => AttestationGrade::Failed,
    };
    Ok(Judgement {
        grade,
        score: verdict.score,
        hard: verdict.hard_failure(),
        reasons: verdict.reasons,
        evidence: verdict.evidence,
        app_attest_key: None,
        authentic: true,
    })
}

/// App Attest findings that are hard facts: the chain does not reach the
/// root, the key is not the one named or stored, the counter went back.
fn hard_app_attest(reasons: &[Reason]) -> bool {
    reasons.iter().any(|r| {
        matches!(
            r,
            Reason::ChainInvalid
                | Reason::KeyIdMismatch
                | Reason::CredentialIdMismatch
                | Reason::SignatureInvalid
                | Reason::CounterReplay
        )
    })
}

fn app_attest_failed(reasons: &[Reason]) -> Judgement {
    Judgement::failed(
        reasons.iter().map(|r| r.as_str()).collect(),
        hard_app_attest(reasons),
    )
}

fn strong() -> Judgement {
    Judgement {
        grade: AttestationGrade::Strong,
        score: 1.0,
        reasons: Vec::new(),
        evidence: Vec::new(),
        hard: false,
        app_attest_key: None,
        authentic: true,
    }
}

/// Base64 (standard or URL-safe, padding optional) of at most `max` bytes,
/// refused before decoding when the text is too long for that.
fn decode_blob(text: &str, max: usize, what: &'static str) -> Result<Vec<u8>, &'static str> {
    let text = text.trim();
    if text.len() > max.div_ceil(3) * 4 {
        return Err(what);
    }
    let unpadded = text.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(unpadded)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(unpadded))
        .map_err(|_| what)
}

/// Nonces and verdicts, with the handles a verdict's side effects use.
pub struct Attestation {
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
    firewall: Arc<Firewall>,
    nonce_ttl: Duration,
    max_failures: u32,
    providers: Providers,
    metrics: Arc<Metrics>,
}

impl Attestation {
    /// The component: nonces live `nonce_ttl`; a device is quarantined at
    /// `max_failures` failures; `providers` are those this server verifies.
    #[allow(clippy::too_many_arguments)] // the composition root's handles, each named
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        firewall: Arc<Firewall>,
        nonce_ttl: Duration,
        max_failures: u32,
        providers: Providers,
        metrics: Arc<Metrics>,
    ) -> Self {
        if providers
            .app_attest
            .as_ref()
            .is_some_and(|c| !c.uses_apple_root())
        {
            tracing::warn!(
                "App Attest trusts BLOCKREMOTE_APP_ATTEST_ROOT_CA_FILE instead of Apple's root: \
                 for tests only, never in production"
            );
        }
        Self {
            store,
            shared,
            auth,
            firewall,
            nonce_ttl,
            max_failures,
            providers,
            metrics,
        }
    }

    /// Issues a nonce for the device; returns it with its expiry.
    pub async fn issue_nonce(
        &self,
        device: &DeviceAuth,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), AttestationError> {
        let nonce = random_token("");
        let ttl = self.nonce_ttl;
        self.shared
            .set(&keys::nonce(&device.device_id), nonce.as_bytes(), Some(ttl))
            .await?;
        let expires_at = chrono::Utc::now()
            + chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::seconds(180));
        Ok((nonce, expires_at))
    }

    /// Verifies an attestation artefact for the device (see the module docs).
    pub async fn verify(
        &self,
        device: &DeviceAuth,
        artefact: Artefact<'_>,
        ip: Option<IpAddr>,
    ) -> Result<VerifyOutcome, AttestationError> {
        let provider = self.providers.get(artefact.provider)?;
        let provider_name = match provider {
            Provider::Test(_) => "test",
            Provider::PlayIntegrity(_) => "play_integrity",
            Provider::AppAttest(_) => "app_attest",
        };
        match (&provider, artefact.key_id, artefact.client_data) {
            (Provider::AppAttest(_), None, _) => {
                return Err(AttestationError::Field {
                    field: "key_id",
                    message: "required for app_attest",
                })
            }
            (Provider::AppAttest(_), _, _) => {}
            (_, Some(_), _) => {
                return Err(AttestationError::Field {
                    field: "key_id",
                    message: "only for app_attest",
                })
            }
            (_, _, Some(_)) => {
                return Err(AttestationError::Field {
                    field: "client_data",
                    message: "only for app_attest",
                })
            }
            _ => {}
        }
        let stored = self.shared.take(&keys::nonce(&device.device_id)).await?;
        let fresh = stored.is_some_and(|s| bool::from(s.ct_eq(artefact.nonce.as_bytes())));
        if !fresh {
            let failure = Judgement::refused(reason::NONCE_REPLAY);
            self.record(device, provider_name, failure, ip).await?;
            return Err(AttestationError::NonceReplay);
        }
        let nonce = artefact.nonce;
        let judged = match provider {
            Provider::Test(secret) => {
                Ok(judge_test(secret, artefact.token, nonce, &device.device_id))
            }
            Provider::PlayIntegrity(config) => {
                judge_play_integrity(config, artefact.token, nonce, self.nonce_ttl)
            }
            Provider::AppAttest(config) => self.judge_app_attest(config, device, artefact).await?,
        };
        let judgement = match judged {
            Ok(judgement) => judgement,
            Err(what) => {
                tracing::info!(device_id = %device.device_id, provider = provider_name, what, "malformed attestation artefact");
                let failure = Judgement::refused(reason::ATTESTATION_INVALID);
                self.record(device, provider_name, failure, ip).await?;
                return Err(AttestationError::Invalid(what));
            }
        };
        let outcome = VerifyOutcome {
            verdict: if judgement.grade.verified() {
                Verdict::Verified
            } else {
                Verdict::Failed
            },
            attestation_score: judgement.score,
            state: judgement.grade,
            reasons: judgement.reasons.clone(),
        };
        self.record(device, provider_name, judgement, ip).await?;
        Ok(outcome)
    }

    /// Judges an App Attest attestation (no `client_data`) or assertion.
    async fn judge_app_attest(
        &self,
        config: &AppAttestConfig,
        device: &DeviceAuth,
        artefact: Artefact<'_>,
    ) -> Result<Result<Judgement, &'static str>, AttestationError> {
        let key_id = artefact.key_id.unwrap_or_default();
        let Some(client_data) = artefact.client_data else {
            let object = match decode_blob(
                artefact.token,
                app_attest::MAX_ATTESTATION_BYTES,
                "attestation object",
            ) {
                Ok(object) => object,
                Err(what) => return Ok(Err(what)),
            };
            let outcome = app_attest::verify_attestation(
                config,
                key_id,
                &object,
                artefact.nonce,
                SystemTime::now(),
            );
            return Ok(match outcome {
                Err(app_attest::Malformed(what)) => Err(what),
                Ok(Outcome::Failed(reasons)) => Ok(app_attest_failed(&reasons)),
                Ok(Outcome::Verified(attested)) => Ok(Judgement {
                    app_attest_key: Some(NewAppAttestKey {
                        key_id: attested.key_id.to_vec(),
                        public_key: attested.public_key,
                        receipt: attested.receipt,
                        app_id: attested.app_id,
                    }),
                    ..strong()
                }),
            });
        };
        let decoded = decode_blob(key_id, 32, "key_id").and_then(|key_id| {
            let assertion =
                decode_blob(artefact.token, app_attest::MAX_ASSERTION_BYTES, "assertion")?;
            let client_data = decode_blob(
                client_data,
                app_attest::MAX_CLIENT_DATA_BYTES,
                "client_data",
            )?;
            Ok((key_id, assertion, client_data))
        });
        let (key_id, assertion, client_data) = match decoded {
            Ok(parts) => parts,
            Err(what) => return Ok(Err(what)),
        };
        let stored = self
            .store
            .app_attest_key(&device.device_id)
            .await?
            .filter(|stored| bool::from(stored.key_id.ct_eq(&key_id)));
        let Some(stored) = stored else {
            return Ok(Ok(Judgement::refused(reason::UNKNOWN_KEY)));
        };
        let outcome = app_attest::verify_assertion(
            config,
            &assertion,
            &client_data,
            artefact.nonce,
            &stored.public_key,
            stored.counter,
        );
        Ok(match outcome {
            Err(app_attest::Malformed(what)) => Err(what),
            Ok(Outcome::Failed(reasons)) => Ok(app_attest_failed(&reasons)),
            Ok(Outcome::Verified(asserted)) if asserted.app_id != stored.app_id => {
                // A key attested for one app asserting for another.
                Ok(app_attest_failed(&[Reason::AppIdMismatch]))
            }
            Ok(Outcome::Verified(asserted)) => {
                let advanced = self
                    .store
                    .advance_app_attest_counter(
                        &device.device_id,
                        &stored.key_id,
                        stored.counter,
                        asserted.counter,
                    )
                    .await?;
                if advanced {
                    Ok(strong())
                } else {
                    // Another assertion moved the counter first.
                    Ok(app_attest_failed(&[Reason::CounterReplay]))
                }
            }
        })
    }

    async fn record(
        &self,
        device: &DeviceAuth,
        provider: &'static str,
        judgement: Judgement,
        ip: Option<IpAddr>,
    ) -> Result<(), AttestationError> {
        let verified = judgement.grade.verified();
        self.metrics
            .attestation_verdict(provider, if verified { "verified" } else { "failed" });
        let outcome = self
            .store
            .record_attestation(
                AttestationRecord {
                    device_id: device.device_id.clone(),
                    grade: judgement.grade,
                    evidence: judgement.evidence.clone(),
                    provider,
                    hard: judgement.hard,
                    app_attest_key: judgement.app_attest_key,
                    authentic: judgement.authentic,
                    lock: judgement
                        .evidence
                        .contains(&play_integrity::reason::CONTROLLING_APP_DETECTED),
                },
                self.max_failures,
            )
            .await?;
        // Workers read the verdict from the device cache: drop it everywhere.
        self.auth.devices.invalidate(&device.device_id).await;
        let kind = if verified {
            "attestation:verified"
        } else {
            "attestation:failed"
        };
        let event = self.auth.event(
            kind,
            Some(device.user_id),
            Some(&device.device_id),
            ip,
            serde_json::json!({
                "provider": provider,
                "state": judgement.grade.as_str(),
                "reasons": judgement.reasons,
                "failures": outcome.failures,
            }),
        );
        self.store.record_event(event).await?;
        let action = if outcome.quarantined {
            "IMMEDIATE_QUARANTINE"
        } else if outcome.locked {
            "CRITICAL_LOCK"
        } else if verified {
            "ATTESTATION_VERIFIED"
        } else {
            "ATTESTATION_FAILED"
        };
        let reasons = if judgement.reasons.is_empty() {
            None
        } else {
            Some(judgement.reasons.join(","))
        };
        self.store
            .append_audit(NewAuditEntry {
                user_id: Some(device.user_id),
                device_id: Some(device.device_id.clone()),
                jti: Some(device.jti.to_string()),
                ip: Auth::ip_prefix(ip),
                user_agent: None,
                source: AuditSource::Http,
                threat_score: None,
                decision_reason: reasons,
                attestation_state: Some(judgement.grade.as_str().to_owned()),
                action_taken: action.into(),
                actor: None,
                request_id: None,
            })
            .await?;
        if !verified {
            self.firewall
                .check(
                    "attestation:failed",
                    Subject {
                        ip,
                        user_id: Some(device.user_id),
                        device_id: Some(&device.device_id),
                    },
                )
                .await?;
        }
        if outcome.quarantined {
            tracing::warn!(device_id = %device.device_id, failures = outcome.failures, hard = judgement.hard, "device quarantined");
            // The quarantine is committed; a failed publish must not turn the
            // answer into a 500 (the device learns its state on reconnect).
            if let Err(e) = realtime::issue(
                self.shared.as_ref(),
                self.store.as_ref(),
                &self.metrics,
                realtime::Origin::Attestation,
                &device.device_id,
                Action::ImmediateQuarantine,
                "attestation_failed",
            )
            .await
            {
                tracing::error!(error = %e, "publishing IMMEDIATE_QUARANTINE failed");
            }
        }
        if outcome.locked {
            tracing::warn!(device_id = %device.device_id, "device locked: attestation reports a controlling app");
            if let Err(e) = realtime::issue(
                self.shared.as_ref(),
                self.store.as_ref(),
                &self.metrics,
                realtime::Origin::Attestation,
                &device.device_id,
                Action::CriticalLock,
                play_integrity::reason::CONTROLLING_APP_DETECTED,
            )
            .await
            {
                tracing::error!(error = %e, "publishing CRITICAL_LOCK failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};

    use super::*;

    fn secret() -> SecretString {
        SecretString::from("attestation-test-secret".to_owned())
    }

    fn token(secret: &str, nonce: &str, device_id: &str, app: &str, device: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({
                "nonce": nonce, "device_id": device_id,
                "app_integrity": app, "device_integrity": device,
            }),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("test token")
    }

    #[test]
    fn unknown_providers_are_refused_before_unconfigured_ones() {
        let none = Providers::default();
        let test_only = Providers {
            test_secret: Some(secret()),
            ..Providers::default()
        };
        for providers in [&none, &test_only] {
            assert!(matches!(
                providers.get("safetynet"),
                Err(AttestationError::UnknownProvider)
            ));
        }
        for provider in ["play_integrity", "app_attest"] {
            assert!(matches!(
                test_only.get(provider),
                Err(AttestationError::ProviderNotConfigured)
            ));
        }
        assert!(matches!(
            none.get("test"),
            Err(AttestationError::ProviderNotConfigured)
        ));
        assert!(matches!(test_only.get("test"), Ok(Provider::Test(_))));
    }

    #[test]
    fn a_test_token_grades_device_when_both_checks_pass() {
        let s = secret();
        let key = s.expose_secret().to_owned();
        let pass = judge_test(
            &s,
            &token(&key, "n1", "dev-1", "pass", "pass"),
            "n1",
            "dev-1",
        );
        assert_eq!(
            (pass.grade, pass.score, pass.reasons.len()),
            (AttestationGrade::Device, 1.0, 0)
        );
        let half = judge_test(
            &s,
            &token(&key, "n1", "dev-1", "pass", "fail"),
            "n1",
            "dev-1",
        );
        assert_eq!(
            (half.grade, half.score, half.reasons),
            (
                AttestationGrade::Failed,
                0.5,
                vec!["device_integrity_failed"]
            )
        );
        let none = judge_test(
            &s,
            &token(&key, "n1", "dev-1", "fail", "fail"),
            "n1",
            "dev-1",
        );
        assert_eq!(none.score, 0.0);
        assert_eq!(
            none.reasons,
            vec!["app_integrity_failed", "device_integrity_failed"]
        );
    }

    #[test]
    fn a_test_token_for_another_nonce_device_or_key_is_invalid() {
        let s = secret();
        let key = s.expose_secret().to_owned();
        for t in [
            token(&key, "n2", "dev-1", "pass", "pass"),
            token(&key, "n1", "dev-2", "pass", "pass"),
            token("another-secret", "n1", "dev-1", "pass", "pass"),
            "not a jwt".to_owned(),
        ] {
            let judged = judge_test(&s, &t, "n1", "dev-1");
            assert_eq!(judged.grade, AttestationGrade::Failed);
            assert_eq!(judged.reasons, vec!["invalid_attestation_token"]);
        }
    }

    #[test]
    fn hard_app_attest_facts_are_the_chain_the_key_and_the_counter() {
        for hard in [
            Reason::ChainInvalid,
            Reason::KeyIdMismatch,
            Reason::CredentialIdMismatch,
            Reason::SignatureInvalid,
            Reason::CounterReplay,
        ] {
            assert!(app_attest_failed(&[Reason::NonceMismatch, hard]).hard);
        }
        for soft in [
            Reason::NonceMismatch,
            Reason::FormatInvalid,
            Reason::CertificateExpired,
            Reason::AppIdMismatch,
            Reason::EnvironmentMismatch,
            Reason::CounterNotZero,
        ] {
            assert!(!app_attest_failed(&[soft]).hard, "{soft:?}");
        }
    }

    #[test]
    fn blobs_are_size_limited_before_decoding() {
        assert_eq!(decode_blob("AAEC", 3, "x"), Ok(vec![0, 1, 2]));
        assert_eq!(decode_blob("AAECAw", 4, "x"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(decode_blob("AAECAw==", 4, "x"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(decode_blob("_-_-", 3, "x"), Ok(vec![0xff, 0xef, 0xfe]));
        assert_eq!(decode_blob(&"A".repeat(9), 4, "x"), Err("x"));
        assert_eq!(decode_blob("not base64!", 64, "x"), Err("x"));
    }
}
