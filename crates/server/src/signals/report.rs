//! The trust report (`GET /v1/security/trust-score`), as stored after each
//! scored heartbeat, and [`LastReports`]: each instance's copy of the
//! reports it last read, served (marked `degraded`) while shared state
//! cannot be reached.

use blockremote_engine::{score::ComponentsView, Assessment, Level};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::AttestationGrade;

/// Component risks, each in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComponentRisks {
    /// Accelerometer: touches without motion, flatlines, synthetic motion.
    pub accelerometer: f64,
    /// Gyroscope.
    pub gyroscope: f64,
    /// Machine-like touches.
    pub touch_entropy: f64,
    /// Upload spikes and screen capture.
    pub network_spike: f64,
}

impl From<ComponentsView> for ComponentRisks {
    fn from(c: ComponentsView) -> Self {
        Self {
            accelerometer: c.accelerometer,
            gyroscope: c.gyroscope,
            touch_entropy: c.touch_entropy,
            network_spike: c.network_spike,
        }
    }
}

/// A device's trust report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrustReport {
    /// The device.
    pub device_id: String,
    /// 0–100, 100 = fully trusted.
    #[schema(example = 87)]
    pub trust_score: u8,
    /// `trusted`, `suspicious` or `critical`.
    #[schema(example = "trusted")]
    pub level: String,
    /// Component risks.
    pub components: ComponentRisks,
    /// `0.4·accelerometer + 0.3·gyroscope + 0.15·touch_entropy + 0.15·network_spike`.
    #[schema(example = 0.1)]
    pub global_risk: f64,
    /// The device's lock threshold (trust below it counts as evidence).
    #[schema(example = 35)]
    pub threshold: u8,
    /// The attestation verdict as it counts now: `unknown`, `verified` or `failed`.
    #[schema(example = "verified")]
    pub attestation: String,
    /// The graded attestation state as it counts now: `strong`, `device`,
    /// `basic`, `failed` or `unknown` (a verified state older than the
    /// configured maximum age is `unknown`: the app should attest again).
    #[serde(default)]
    pub attestation_state: AttestationGrade,
    /// Stable reason codes of the last assessment.
    pub reasons: Vec<String>,
    /// Whether the device is locked.
    pub locked: bool,
    /// The last heartbeat was scored inline by the simplified scorer
    /// because the workers were behind, or this is the last report this
    /// server read, served while shared state (Redis) is unavailable.
    pub degraded: bool,
    /// Heartbeats scored so far.
    pub heartbeats: u64,
    /// The last heartbeat `seq` scored.
    pub last_seq: u64,
    /// When the report was computed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl TrustReport {
    /// The report of a device with no data yet: no evidence of risk.
    pub fn neutral(device_id: &str, attestation: AttestationGrade, locked: bool) -> Self {
        Self {
            device_id: device_id.to_owned(),
            trust_score: 100,
            level: "trusted".into(),
            components: ComponentRisks::default(),
            global_risk: 0.0,
            threshold: blockremote_engine::score::BASE_THRESHOLD as u8,
            attestation: attestation.verdict().to_owned(),
            attestation_state: attestation,
            reasons: Vec::new(),
            locked,
            degraded: false,
            heartbeats: 0,
            last_seq: 0,
            updated_at: None,
        }
    }

    /// The report after `assessment`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_assessment(
        device_id: &str,
        assessment: &Assessment,
        attestation: AttestationGrade,
        locked: bool,
        degraded: bool,
        heartbeats: u64,
        last_seq: u64,
    ) -> Self {
        Self {
            device_id: device_id.to_owned(),
            trust_score: assessment.trust_score,
            level: match assessment.level {
                Level::Trusted => "trusted",
                Level::Suspicious => "suspicious",
                Level::Critical => "critical",
            }
            .into(),
            components: assessment.components.into(),
            global_risk: assessment.global_risk,
            threshold: assessment.threshold,
            attestation: attestation.verdict().to_owned(),
            attestation_state: attestation,
            reasons: assessment.reasons.iter().map(|r| (*r).to_owned()).collect(),
            locked,
            degraded,
            heartbeats,
            last_seq,
            updated_at: Some(Utc::now()),
        }
    }
}

/// Reports kept at most per instance (a few hundred bytes each).
const MAX_LAST_REPORTS: usize = 50_000;

/// The oldest report served as the fallback.
pub const MAX_FALLBACK_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The last report this instance read of each device, for the trust
/// report's fallback while shared state is unavailable (see the module
/// docs). Bounded: when full it is cleared, and refills from reads.
#[derive(Debug, Default)]
pub struct LastReports {
    entries: dashmap::DashMap<Box<str>, TrustReport>,
}

impl LastReports {
    /// Remembers `report` as the last one read of its device.
    pub fn remember(&self, report: &TrustReport) {
        if self.entries.len() >= MAX_LAST_REPORTS {
            self.entries.clear();
        }
        self.entries
            .insert(report.device_id.as_str().into(), report.clone());
    }

    /// The last report read of `device_id`, marked `degraded`, unless it
    /// was computed more than [`MAX_FALLBACK_AGE`] ago (an outage is
    /// minutes; an older copy says too little of the device now).
    pub fn fallback(&self, device_id: &str) -> Option<TrustReport> {
        let entry = self.entries.get(device_id)?;
        let oldest = Utc::now() - chrono::Duration::from_std(MAX_FALLBACK_AGE).ok()?;
        entry
            .updated_at
            .is_some_and(|at| at >= oldest)
            .then(|| TrustReport {
                degraded: true,
                ..entry.clone()
            })
    }

    /// Forgets `device_id`'s copy (the device was deleted).
    pub fn forget(&self, device_id: &str) {
        self.entries.remove(device_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_is_the_last_report_read_marked_degraded() {
        let reports = LastReports::default();
        assert!(reports.fallback("device_a").is_none(), "nothing read yet");
        let mut report = TrustReport::neutral("device_a", AttestationGrade::Unknown, false);
        report.updated_at = Some(Utc::now());
        report.last_seq = 7;
        reports.remember(&report);
        report.last_seq = 9;
        reports.remember(&report);
        let served = reports.fallback("device_a").expect("remembered");
        assert_eq!((served.last_seq, served.degraded), (9, true));
        assert!(reports.fallback("device_b").is_none());
        reports.forget("device_a");
        assert!(reports.fallback("device_a").is_none(), "forgotten");
    }

    #[test]
    fn a_copy_older_than_the_limit_is_not_served() {
        let reports = LastReports::default();
        let mut report = TrustReport::neutral("device_a", AttestationGrade::Unknown, false);
        report.updated_at = Some(
            Utc::now()
                - chrono::Duration::from_std(MAX_FALLBACK_AGE).expect("fits")
                - chrono::Duration::seconds(1),
        );
        reports.remember(&report);
        assert!(reports.fallback("device_a").is_none());
    }

    #[test]
    fn it_stays_bounded() {
        let reports = LastReports::default();
        for i in 0..MAX_LAST_REPORTS + 10 {
            reports.remember(&TrustReport::neutral(
                &format!("device_{i}"),
                AttestationGrade::Unknown,
                false,
            ));
        }
        assert!(reports.entries.len() <= MAX_LAST_REPORTS);
    }
}
