//! Attestation verdicts and App Attest keys: what the hardware last said
//! about a device, and the key its later assertions are checked with.
//!
//! A verdict is a graded state ([`AttestationGrade`]) with the environment
//! evidence the platform reported, the provider and the time it was made
//! (`devices.attestation_grade`, `attestation_evidence`,
//! `attestation_provider`, `attested_at`; migration 0013). The older
//! `devices.attestation_state` (`unknown` / `verified` / `failed`) is kept as
//! the verdict's summary and written in the same statement, so the two
//! never disagree.
//!
//! A verified state older than the configured maximum age counts as
//! `unknown` ([`DeviceAttestation::effective`]): the app must attest again.
//! A failed state does not decay — waiting must not clear a failure.
//!
//! App Attest keys (`app_attest_keys`, one per device): the credential
//! public key, its counter and Apple's receipt, stored when an attestation
//! verifies. Each later assertion must carry a counter strictly above the
//! stored one; [`AttestationStore::advance_app_attest_counter`] moves it
//! with a compare-and-swap, so two assertions verified against the same
//! stored counter cannot both be accepted.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{
    columns::Time,
    now_micros,
    sql::{Dialect, SqlStore},
    HoldAction, HoldSource, NewHold, StoreResult,
};

/// A device's graded attestation state, from the last verdict of its platform's provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttestationGrade {
    /// Never attested, or the last verified state is older than the maximum age.
    #[default]
    Unknown,
    /// Hardware-backed: Play `MEETS_STRONG_INTEGRITY`, or an App Attest key.
    Strong,
    /// `MEETS_DEVICE_INTEGRITY`: a genuine, certified device.
    Device,
    /// `MEETS_BASIC_INTEGRITY` only: possibly rooted or uncertified.
    Basic,
    /// The last verdict failed.
    Failed,
}
stored_words!(AttestationGrade {
    Unknown = "unknown",
    Strong = "strong",
    Device = "device",
    Basic = "basic",
    Failed = "failed",
});

impl AttestationGrade {
    /// The verdict's summary: `unknown`, `verified` or `failed` (the trust
    /// report's `attestation` field and `devices.attestation_state`).
    pub fn verdict(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Failed => "failed",
            Self::Strong | Self::Device | Self::Basic => "verified",
        }
    }

    /// True for a passing grade.
    pub fn verified(self) -> bool {
        matches!(self, Self::Strong | Self::Device | Self::Basic)
    }
}

/// What the store holds about a device's last attestation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceAttestation {
    /// The grade as recorded (see [`Self::effective`] for the one to use).
    pub grade: AttestationGrade,
    /// Environment evidence codes the platform reported
    /// (`capturing_app_detected`, `controlling_app_detected`, `play_protect_risk`).
    pub evidence: Vec<String>,
    /// `play_integrity`, `app_attest` or `test`.
    pub provider: Option<String>,
    /// When the verdict was recorded.
    pub attested_at: Option<DateTime<Utc>>,
}

impl DeviceAttestation {
    /// The grade that counts at `now`: a verified grade older than `max_age`
    /// (or of unknown age) is [`AttestationGrade::Unknown`], and its evidence
    /// goes with it.
    pub fn effective(&self, now: DateTime<Utc>, max_age: std::time::Duration) -> Self {
        let fresh = self.attested_at.is_some_and(|at| {
            chrono::Duration::from_std(max_age)
                .is_ok_and(|max| now.signed_duration_since(at) <= max)
        });
        if self.grade.verified() && !fresh {
            return Self {
                grade: AttestationGrade::Unknown,
                evidence: Vec::new(),
                ..self.clone()
            };
        }
        self.clone()
    }
}

/// A verdict to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationRecord {
    /// The device.
    pub device_id: String,
    /// The grade (a failure is [`AttestationGrade::Failed`]).
    pub grade: AttestationGrade,
    /// Environment evidence codes.
    pub evidence: Vec<&'static str>,
    /// The provider.
    pub provider: &'static str,
    /// A hard fact (an emulator, a broken chain, a key mismatch, a counter
    /// regression): quarantine now rather than after `max_failures`.
    pub hard: bool,
    /// The App Attest key a verified attestation registered.
    pub app_attest_key: Option<NewAppAttestKey>,
    /// False for failures that say nothing about the device (a used nonce,
    /// an artefact that does not parse, an unknown key): they count toward
    /// quarantine but leave the last authentic verdict — grade, evidence,
    /// time — as it was.
    pub authentic: bool,
    /// The verdict carries direct evidence of remote control: lock the
    /// device now (an attestation hold, `lock`), unless one is already there.
    pub lock: bool,
}

/// What recording a verdict did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestationOutcome {
    /// Failures since the last success.
    pub failures: u32,
    /// True when this verdict placed the device's attestation hold
    /// (quarantine); at most one such hold exists.
    pub quarantined: bool,
    /// True when this verdict locked the device (see [`AttestationRecord::lock`]).
    pub locked: bool,
}

/// An App Attest key to store after a verified attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAppAttestKey {
    /// SHA-256 of the public key (32 bytes).
    pub key_id: Vec<u8>,
    /// SEC1 uncompressed P-256 point (65 bytes).
    pub public_key: Vec<u8>,
    /// Apple's receipt.
    pub receipt: Vec<u8>,
    /// The `TEAMID.bundle.id` it attests.
    pub app_id: String,
}

/// A stored App Attest key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAttestKey {
    /// SHA-256 of the public key.
    pub key_id: Vec<u8>,
    /// SEC1 uncompressed P-256 point.
    pub public_key: Vec<u8>,
    /// The last accepted counter.
    pub counter: u32,
    /// The app it attests.
    pub app_id: String,
}

/// Attestation verdicts and App Attest keys.
#[async_trait]
pub trait AttestationStore: Send + Sync {
    /// Records a verdict (and, for a verified App Attest attestation, its
    /// key) in one transaction. A failure counts; the failure that reaches
    /// `max_failures`, or any hard failure, places the device's attestation
    /// hold (quarantine) once. A success resets the failure count.
    async fn record_attestation(
        &self,
        record: AttestationRecord,
        max_failures: u32,
    ) -> StoreResult<AttestationOutcome>;

    /// The device's App Attest key, if it has one.
    async fn app_attest_key(&self, device_id: &str) -> StoreResult<Option<AppAttestKey>>;

    /// Moves the device's counter from `from` to `to` for key `key_id`, only
    /// if it is still `from` (compare-and-swap). False when another
    /// assertion moved it first, or the key was replaced.
    async fn advance_app_attest_counter(
        &self,
        device_id: &str,
        key_id: &[u8],
        from: u32,
        to: u32,
    ) -> StoreResult<bool>;
}

/// The device columns of a verdict, for [`super::Device`] rows.
pub(super) fn device_attestation(
    grade: &str,
    evidence: &str,
    provider: Option<String>,
    attested_at: Option<Time>,
) -> DeviceAttestation {
    DeviceAttestation {
        grade: AttestationGrade::parse(grade).unwrap_or_default(),
        evidence: evidence
            .split(',')
            .filter(|code| !code.is_empty())
            .map(str::to_owned)
            .collect(),
        provider,
        attested_at: attested_at.map(Into::into),
    }
}

#[derive(FromRow)]
struct AppAttestKeyRow {
    key_id: Vec<u8>,
    public_key: Vec<u8>,
    counter: i64,
    app_id: String,
}

for_each_dialect! {
    #[async_trait]
    impl AttestationStore for SqlStore<Db> {
        #[tracing::instrument(skip_all, name = "store.record_attestation", fields(device_id = %record.device_id))]
        async fn record_attestation(
            &self,
            record: AttestationRecord,
            max_failures: u32,
        ) -> StoreResult<AttestationOutcome> {
            let now = Time(now_micros());
            let device_id = record.device_id.as_str();
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let verified = record.grade.verified();
            let failures: i32 = if record.authentic {
                sqlx::query_scalar(
                    "UPDATE devices SET attestation_state = $2, attestation_grade = $3, \
                     attestation_evidence = $4, attestation_provider = $5, attested_at = $6, \
                     attestation_failures = CASE WHEN $7 THEN 0 ELSE attestation_failures + 1 END, \
                     updated_at = $6 WHERE id = $1 RETURNING attestation_failures",
                )
                .bind(device_id)
                .bind(record.grade.verdict())
                .bind(record.grade.as_str())
                .bind(record.evidence.join(","))
                .bind(record.provider)
                .bind(now)
                .bind(verified)
                .fetch_one(&mut *tx)
                .await?
            } else {
                sqlx::query_scalar(
                    "UPDATE devices SET attestation_failures = attestation_failures + 1, \
                     updated_at = $2 WHERE id = $1 RETURNING attestation_failures",
                )
                .bind(device_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
            };
            let failures = failures.unsigned_abs();
            if let Some(key) = record.app_attest_key.as_ref().filter(|_| verified) {
                sqlx::query(
                    "INSERT INTO app_attest_keys \
                     (device_id, key_id, public_key, counter, receipt, app_id, created_at, updated_at) \
                     VALUES ($1, $2, $3, 0, $4, $5, $6, $6) \
                     ON CONFLICT (device_id) DO UPDATE SET key_id = excluded.key_id, \
                     public_key = excluded.public_key, counter = 0, receipt = excluded.receipt, \
                     app_id = excluded.app_id, updated_at = excluded.updated_at",
                )
                .bind(device_id)
                .bind(&key.key_id)
                .bind(&key.public_key)
                .bind(&key.receipt)
                .bind(&key.app_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let (mut quarantined, mut locked) = (false, false);
            let quarantine = !verified && (record.hard || failures >= max_failures);
            if quarantine || record.lock {
                // One attestation hold at most: the first verdict past the
                // limit (or with evidence of remote control) places it, later
                // ones find it there.
                let held: Option<String> = sqlx::query_scalar(
                    "SELECT reason FROM holds WHERE device_id = $1 AND source = 'attestation'",
                )
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await?;
                if held.is_none() {
                    let hold = if quarantine {
                        quarantined = true;
                        NewHold::new(
                            HoldSource::Attestation,
                            HoldAction::Quarantine,
                            "attestation_failed",
                        )
                    } else {
                        locked = true;
                        NewHold::new(
                            HoldSource::Attestation,
                            HoldAction::Lock,
                            "controlling_app_detected",
                        )
                    };
                    Self::insert_device_hold(&mut tx, device_id, &hold).await?;
                    Self::settle_device(&mut tx, device_id).await?;
                }
            }
            tx.commit().await?;
            Ok(AttestationOutcome {
                failures,
                quarantined,
                locked,
            })
        }

        async fn app_attest_key(&self, device_id: &str) -> StoreResult<Option<AppAttestKey>> {
            let row: Option<AppAttestKeyRow> = sqlx::query_as(
                "SELECT key_id, public_key, counter, app_id FROM app_attest_keys WHERE device_id = $1",
            )
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(|row| AppAttestKey {
                key_id: row.key_id,
                public_key: row.public_key,
                counter: u32::try_from(row.counter).unwrap_or(u32::MAX),
                app_id: row.app_id,
            }))
        }

        async fn advance_app_attest_counter(
            &self,
            device_id: &str,
            key_id: &[u8],
            from: u32,
            to: u32,
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE app_attest_keys SET counter = $4, updated_at = $5 \
                 WHERE device_id = $1 AND key_id = $2 AND counter = $3 AND $4 > $3",
            )
            .bind(device_id)
            .bind(key_id)
            .bind(i64::from(from))
            .bind(i64::from(to))
            .bind(Time(now_micros()))
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn verified(grade: AttestationGrade, age_seconds: i64) -> (DeviceAttestation, DateTime<Utc>) {
        let now = Utc::now();
        let attestation = DeviceAttestation {
            grade,
            evidence: vec!["capturing_app_detected".into()],
            provider: Some("play_integrity".into()),
            attested_at: Some(now - chrono::Duration::seconds(age_seconds)),
        };
        (attestation, now)
    }

    #[test]
    fn a_verified_grade_decays_to_unknown_after_the_maximum_age() {
        let max = Duration::from_secs(3600);
        for grade in [
            AttestationGrade::Strong,
            AttestationGrade::Device,
            AttestationGrade::Basic,
        ] {
            let (fresh, now) = verified(grade, 3599);
            assert_eq!(fresh.effective(now, max), fresh);
            let (old, now) = verified(grade, 3601);
            let decayed = old.effective(now, max);
            assert_eq!(decayed.grade, AttestationGrade::Unknown);
            assert!(decayed.evidence.is_empty());
        }
    }

    #[test]
    fn a_failure_never_decays_and_a_verdict_without_a_time_is_not_fresh() {
        let max = Duration::from_secs(60);
        let (failed, now) = verified(AttestationGrade::Failed, 86_400 * 365);
        assert_eq!(failed.effective(now, max).grade, AttestationGrade::Failed);
        let undated = DeviceAttestation {
            grade: AttestationGrade::Strong,
            ..DeviceAttestation::default()
        };
        assert_eq!(
            undated.effective(Utc::now(), max).grade,
            AttestationGrade::Unknown
        );
    }

    #[test]
    fn grades_summarise_to_the_verdict_and_round_trip() {
        for (grade, verdict) in [
            (AttestationGrade::Unknown, "unknown"),
            (AttestationGrade::Strong, "verified"),
            (AttestationGrade::Device, "verified"),
            (AttestationGrade::Basic, "verified"),
            (AttestationGrade::Failed, "failed"),
        ] {
            assert_eq!(grade.verdict(), verdict);
            assert_eq!(AttestationGrade::parse(grade.as_str()), Some(grade));
        }
    }
}
