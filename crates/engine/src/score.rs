//! From features to component risks, a trust score and a decision.
//!
//! Each component answers one physical question:
//!
//! * **accelerometer** — are touches arriving on a phone that does not move
//!   with them? Risk = the share of touches with no motion impulse, weighted
//!   up as the phone gets stiller or is supported (a hand-held phone moves
//!   anyway; a phone on a table or a mount — or simulated sensors, whose
//!   gravity never turns — being tapped by a finger still jolts). With no touches, a still
//!   phone is fine; a flatlined or mathematically smooth stream is not.
//! * **gyroscope** — the same question about rotation, and flatlines.
//! * **touch_entropy** — do the touches look machine-made: constant pressure
//!   and contact size, metronome rhythm, ruler-straight swipes?
//! * **network_spike** — is the device uploading far above its own baseline
//!   (a screen being streamed), or reporting screen capture?
//!
//! `global_risk` weighs them 0.4/0.3/0.15/0.15. The trust score is
//! `100·(1 − global_risk)` less penalties for failed attestation, sideloaded
//! accessibility services and algorithmically generated domains; a
//! blacklisted app, domain or address, or a replayed window, is a hard fact:
//! trust 0 and an immediate `CRITICAL_LOCK`. Otherwise a lock needs evidence:
//! at least [`EVIDENCE_NEEDED`] of the last [`EVIDENCE_WINDOW`] heartbeats
//! below the device's threshold, so one noisy window never locks anyone.

use serde::{Deserialize, Serialize};

use crate::{
    device::DeviceState,
    device::{IMPULSE_EVIDENCE, UPLOAD_SPIKE_Z},
    features::{dga_score, Features},
    heartbeat::Heartbeat,
    Components,
};

/// Heartbeats below the threshold needed (within the window) to lock.
pub const EVIDENCE_NEEDED: u32 = 3;
/// The recent heartbeats considered for evidence.
pub const EVIDENCE_WINDOW: u32 = 5;
/// Base trust threshold (0–100): below it a heartbeat counts as evidence.
pub const BASE_THRESHOLD: f64 = 40.0;

/// Installers that are app stores.
const STORE_INSTALLERS: &[&str] = &[
    "com.android.vending",
    "com.apple.appstore",
    "com.huawei.appmarket",
    "com.sec.android.app.samsungapps",
    "com.amazon.venezia",
];

/// The device's graded attestation state, as the server knows it (a
/// verified state older than the server's maximum age is already `Unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attestation {
    /// Never attested, or the last verdict is too old to count.
    #[default]
    Unknown,
    /// Hardware-backed integrity (Play `MEETS_STRONG_INTEGRITY`, an App Attest key).
    Strong,
    /// A genuine, certified device (`MEETS_DEVICE_INTEGRITY`).
    Device,
    /// Basic integrity only: the device may be rooted or uncertified.
    Basic,
    /// The last verdict failed.
    Failed,
}

/// What the last attestation found about the device's environment. These
/// are facts reported by the platform, not about the token: they stand until
/// the app attests again (or the verdict decays).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttestationEvidence {
    /// An app that can capture the screen is running (Play
    /// `UNKNOWN_CAPTURING`). Not proof of fraud: people record their screens.
    pub capturing_app: bool,
    /// An app that can control the device is running (Play
    /// `UNKNOWN_CONTROLLING`): direct evidence of remote control, a hard fact.
    pub controlling_app: bool,
    /// Play Protect reports a risk on the device.
    pub play_protect_risk: bool,
}

/// The customer's plan: evaluation accounts get a slightly stricter line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanTier {
    /// `trial`.
    #[default]
    Trial,
    /// `paid_basic` or `paid`.
    Paid,
}

/// What the server's threat intelligence found in this heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IntelHits {
    /// An app hash on the blacklist.
    pub app: bool,
    /// A resolved domain on the blacklist.
    pub domain: bool,
    /// The client address on the blacklist.
    pub ip: bool,
    /// This window's fingerprint was already seen from another device.
    pub window_seen_elsewhere: bool,
}

/// Everything besides the heartbeat that the score depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Situation {
    /// Attestation state.
    pub attestation: Attestation,
    /// What the last attestation found on the device.
    pub evidence: AttestationEvidence,
    /// Plan tier.
    pub plan: PlanTier,
    /// Threat-intelligence hits.
    pub intel: IntelHits,
}

/// What to do about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    /// Nothing.
    Allow,
    /// Cover the app until the user proves presence.
    ForceOverlay,
    /// Lock the app.
    CriticalLock,
}

/// Trust level bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Trust ≥ 70.
    Trusted,
    /// Between the threshold and 70.
    Suspicious,
    /// Below the threshold.
    Critical,
}

/// The verdict on one heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    /// Component risks.
    pub components: ComponentsView,
    /// Weighted risk.
    pub global_risk: f64,
    /// 0–100.
    pub trust_score: u8,
    /// The device's threshold now (0–100).
    pub threshold: u8,
    /// Band.
    pub level: Level,
    /// Stable reason codes, most important first.
    pub reasons: Vec<&'static str>,
    /// What to do.
    pub decision: Decision,
}

/// Serializable mirror of [`Components`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ComponentsView {
    /// Accelerometer risk.
    pub accelerometer: f64,
    /// Gyroscope risk.
    pub gyroscope: f64,
    /// Touch-entropy risk.
    pub touch_entropy: f64,
    /// Network-spike risk.
    pub network_spike: f64,
}

impl From<Components> for ComponentsView {
    fn from(c: Components) -> Self {
        let r = |v: f64| (v.clamp(0.0, 1.0) * 1000.0).round() / 1000.0;
        Self {
            accelerometer: r(c.accelerometer),
            gyroscope: r(c.gyroscope),
            touch_entropy: r(c.touch_entropy),
            network_spike: r(c.network_spike),
        }
    }
}

/// 1 at or below `still`, 0 at or above `moving`, linear between.
fn stillness(value: f64, still: f64, moving: f64) -> f64 {
    ((moving - value) / (moving - still)).clamp(0.0, 1.0)
}

/// 1 when gravity held its direction through the window (turned less than
/// [`SUPPORTED_DRIFT`] between its halves), whatever else moved: the phone
/// rests on something — a table, a mount — or its sensors are simulated.
/// A hand never holds a phone that still (posture sways by tenths of a
/// degree to degrees within seconds), so the motion is not a hand's, and
/// a finger landing on a supported phone jolts it as on a table.
fn supported(f: &Features) -> f64 {
    if f.accel_samples >= 16 && f.gravity_drift < SUPPORTED_DRIFT {
        1.0
    } else {
        0.0
    }
}

/// Gravity turning less than this between a window's halves (0.1°) is a supported phone.
const SUPPORTED_DRIFT: f64 = 0.1 * std::f64::consts::PI / 180.0;

/// Touch evidence grows with the number of touch-downs (one tap proves little).
fn touch_weight(downs: usize) -> f64 {
    match downs {
        0 => 0.0,
        1 => 0.5,
        2 => 0.8,
        _ => 1.0,
    }
}

/// How uncoupled the window's touches are, in [0, 1]: the coupling's view,
/// unless the impulse test (which judges each touch against the window's
/// own instants, and so holds where the coupling's window-wide ratio does
/// not) saw the touches stand out.
fn uncoupled(f: &Features) -> f64 {
    let coupling = 1.0 - f.touch_coupling;
    let looks = f.impulses.looks();
    if looks == 0 {
        return coupling;
    }
    // Most touches stood out (an injected one does 5% of the time): they
    // jolted the phone, whatever the window-wide ratio says.
    let seen = f64::from(f.impulses.stood_out()) / f64::from(looks);
    if seen > 0.5 {
        coupling.min(1.0 - seen)
    } else {
        coupling
    }
}

/// The accelerometer's risk, and the part of it that is about touches
/// arriving without motion (which stands in for the gyroscope's when the
/// device has none).
fn accelerometer_risk(
    f: &Features,
    impulse_risk: f64,
    reasons: &mut Vec<&'static str>,
) -> (f64, f64) {
    if f.accel_samples == 0 {
        // Every phone has an accelerometer; touches without one are scripted.
        reasons.push("sensors_missing");
        let risk = if f.touch_downs > 0 { 1.0 } else { 0.5 };
        return (risk, risk);
    }
    if f.accel_samples >= 8 && (f.accel_repeats > 0.9 || f.accel_hf == 0.0) {
        reasons.push("sensor_flatline");
        return (0.95, 0.95);
    }
    let mut risk: f64 = 0.0;
    if f.accel_samples >= 16 && f.accel_roughness < 0.25 && f.accel_hf > 0.0 {
        // Real sensors carry white noise; a stream this smooth was computed.
        reasons.push("synthetic_motion");
        risk = 0.85;
    }
    if f.touch_downs > 0 {
        // Sensor noise alone is ≲ 0.02 m/s²; a hand adds tremor above that.
        let still = stillness(f.accel_motion, 0.02, 0.045).max(supported(f));
        let uncoupled = uncoupled(f);
        // A phone moving in a hand hides tap impulses: uncoupled touches then
        // weigh little (not on a supported one, whatever it shakes).
        let touch_risk = uncoupled * (0.35 + 0.65 * still) * touch_weight(f.touch_downs);
        if touch_risk >= 0.5 {
            reasons.push("touch_without_motion");
        }
        // On a moving phone: its own taps used to stand out, these never do.
        let touch_risk = touch_risk.max(0.95 * impulse_risk);
        if impulse_risk >= 1.0 {
            reasons.push("touch_without_impulse");
        }
        risk = risk.max(touch_risk);
        return (risk, touch_risk);
    }
    (risk, 0.0)
}

fn gyroscope_risk(
    f: &Features,
    touch_motion_risk: f64,
    impulse_risk: f64,
    reasons: &mut Vec<&'static str>,
) -> f64 {
    if f.gyro_samples == 0 {
        // Many phones lack a gyroscope: that alone is no evidence. The
        // rotation channel is gone, so the accelerometer's touch evidence
        // speaks for both; with no accelerometer either, nothing measured
        // the touches at all.
        return if f.accel_samples > 0 {
            touch_motion_risk
        } else if f.touch_downs > 0 {
            0.8
        } else {
            0.3
        };
    }
    if f.gyro_samples >= 8 && f.gyro_repeats > 0.9 {
        if !reasons.contains(&"sensor_flatline") {
            reasons.push("sensor_flatline");
        }
        return 0.95;
    }
    if f.touch_downs == 0 {
        return 0.0;
    }
    // Gyroscope noise is a few mrad/s; a hand is never below ~0.02 rad/s.
    let still = stillness(f.gyro_energy, 0.008, 0.02).max(supported(f));
    let uncoupled = uncoupled(f);
    // The impulse test ranks both sensors together.
    (uncoupled * (0.35 + 0.65 * still) * touch_weight(f.touch_downs)).max(0.95 * impulse_risk)
}

fn touch_entropy_risk(f: &Features, reasons: &mut Vec<&'static str>) -> f64 {
    if f.touch_events < 4 {
        return 0.0;
    }
    // Constant pressure/size is the strongest tell of injected input.
    let uniform_surface = if f.pressure_std < 0.005 && f.size_std < 0.001 {
        1.0
    } else {
        (1.0 - f.touch_surface_entropy / 0.5).clamp(0.0, 1.0)
    };
    let regular_rhythm = if f.touch_downs >= 4 {
        stillness(f.rhythm_cv, 0.03, 0.2).max(stillness(f.touch_timing_entropy, 0.1, 0.4))
    } else {
        0.0
    };
    let ruler_straight = if f.gestures >= 2 {
        stillness(1.0 - f.straightness, 0.0005, 0.02)
    } else {
        0.0
    };
    let risk = (0.5 * uniform_surface + 0.3 * regular_rhythm + 0.2 * ruler_straight)
        .max(uniform_surface * 0.8);
    if risk >= 0.5 {
        reasons.push("synthetic_touch");
    }
    risk
}

fn network_risk(
    f: &Features,
    hb: &Heartbeat,
    state: &DeviceState,
    reasons: &mut Vec<&'static str>,
) -> f64 {
    let mut risk: f64 = 0.0;
    if let Some(rate) = f.upload_rate {
        // Against the device's own robust baseline (median and MAD of its
        // last readings), so one genuine burst does not become "normal".
        let z = state.upload_z(rate);
        let spike = ((z - 3.0) / 4.0).clamp(0.0, 1.0);
        // Sustained: the previous window was high too.
        let sustained = if state.last_upload_z > UPLOAD_SPIKE_Z {
            1.0
        } else {
            0.7
        };
        risk = spike * sustained;
        if risk >= 0.5 {
            reasons.push("network_upload_spike");
        }
    }
    if hb.context.screen_capture {
        reasons.push("screen_capture_active");
        risk = risk.max(0.9);
    }
    risk
}

fn threshold(state: &DeviceState, situation: &Situation) -> f64 {
    let mut t = BASE_THRESHOLD;
    // A long, clean history earns a little slack; a poor one costs.
    if state.heartbeats >= 50 && state.trust.mean >= 85.0 {
        t -= 5.0;
    }
    if state.heartbeats >= 5 && state.trust.mean < 50.0 {
        t += 10.0;
    }
    // The better the hardware vouches for the device, the lower the line.
    match situation.attestation {
        Attestation::Strong => t -= 5.0,
        Attestation::Device => t -= 3.0,
        // Basic integrity (possibly rooted) earns nothing: no better than
        // not attesting, never worse (an app must not gain by skipping it).
        Attestation::Unknown | Attestation::Basic => {}
        Attestation::Failed => t += 15.0,
    }
    if situation.plan == PlanTier::Trial {
        t += 5.0;
    }
    t.clamp(20.0, 70.0)
}

/// Scores `heartbeat` for the device in `state`, then folds it into the
/// state (baselines, evidence). Pure: the same inputs give the same output.
pub fn assess(state: &mut DeviceState, heartbeat: &Heartbeat, situation: &Situation) -> Assessment {
    let f = crate::features::extract(heartbeat);
    let mut reasons = Vec::new();
    let mut hard_fact = false;

    if situation.intel.app {
        reasons.push("blacklisted_app");
        hard_fact = true;
    }
    if situation.intel.domain {
        reasons.push("blacklisted_domain");
        hard_fact = true;
    }
    if situation.intel.ip {
        reasons.push("blacklisted_ip");
        hard_fact = true;
    }
    if situation.evidence.controlling_app {
        reasons.push("controlling_app_detected");
        hard_fact = true;
    }
    let downs: Vec<f64> = heartbeat
        .touches
        .iter()
        .filter(|t| t.action == crate::heartbeat::TouchAction::Down)
        .map(|t| t.t)
        .collect();
    // Whitening assumes evenly spaced samples: bursts of batched samples
    // leave structure two genuine windows can share, so those windows are
    // checked by their exact fingerprint only.
    let residual = f
        .evenly_spaced
        .then(|| crate::replay::residual(&heartbeat.accelerometer, &downs))
        .flatten();
    // Exact copies are hard facts at once; near-duplicates (noise added,
    // start shifted) once a second one arrives within the evidence window.
    let near_duplicates = state.near_duplicates(residual.as_ref());
    let replayed = situation.intel.window_seen_elsewhere
        || f.fingerprint.is_some_and(|fp| state.seen_window(fp))
        || f.touch_fingerprint
            .is_some_and(|fp| state.seen_touch_trace(fp))
        || near_duplicates >= 2;
    if replayed {
        reasons.push("replayed_window");
        hard_fact = true;
    }

    // Touches whose impulses never stand out from this phone's own motion,
    // accumulated over heartbeats (features::impulse_test).
    let impulse_risk = if f.touch_downs > 0 {
        (state.impulse_evidence(&f) / IMPULSE_EVIDENCE).clamp(0.0, 1.0)
    } else {
        state.impulse_evidence(&f);
        0.0
    };
    let (accelerometer, touch_motion_risk) = accelerometer_risk(&f, impulse_risk, &mut reasons);
    let components = Components {
        accelerometer,
        gyroscope: gyroscope_risk(&f, touch_motion_risk, impulse_risk, &mut reasons),
        touch_entropy: touch_entropy_risk(&f, &mut reasons),
        network_spike: network_risk(&f, heartbeat, state, &mut reasons),
    };
    let global_risk = components.global_risk();
    let mut trust = 100.0 * (1.0 - global_risk);

    if situation.attestation == Attestation::Failed {
        reasons.push("attestation_failed");
        trust -= 25.0;
    }
    if situation.evidence.capturing_app {
        reasons.push("capturing_app_detected");
        trust -= 15.0;
    }
    if situation.evidence.play_protect_risk {
        reasons.push("play_protect_risk");
        trust -= 10.0;
    }
    let sideloaded = heartbeat
        .context
        .installer
        .as_deref()
        .is_some_and(|i| !STORE_INSTALLERS.contains(&i));
    if sideloaded && !heartbeat.context.accessibility_services.is_empty() {
        reasons.push("sideloaded_accessibility");
        trust -= 20.0;
    }
    if heartbeat.context.dns.iter().any(|d| dga_score(d) >= 0.6) {
        reasons.push("dga_domain");
        trust -= 10.0;
    }
    // Drift: the device's motion under touch fell abruptly below its own norm.
    if f.touch_downs > 0 && state.drift_observed(&f) {
        reasons.push("behavior_drift");
        trust -= 5.0;
    }
    if hard_fact {
        trust = 0.0;
    }
    let trust = trust.clamp(0.0, 100.0);
    let threshold = threshold(state, situation);
    let below = trust < threshold;

    let evidence = state.record_evidence(below);
    let decision = if hard_fact {
        Decision::CriticalLock
    } else if evidence >= EVIDENCE_NEEDED {
        if state.recent_min_trust().min(trust) < threshold / 2.0 {
            Decision::CriticalLock
        } else {
            Decision::ForceOverlay
        }
    } else {
        Decision::Allow
    };
    state.learn(
        &f,
        residual.as_ref().filter(|_| near_duplicates == 0),
        trust,
        below,
        replayed,
    );
    let level = if below {
        Level::Critical
    } else if trust < 70.0 {
        Level::Suspicious
    } else {
        Level::Trusted
    };
    Assessment {
        components: components.into(),
        global_risk: (global_risk * 1000.0).round() / 1000.0,
        trust_score: trust.round() as u8,
        threshold: threshold.round() as u8,
        level,
        reasons,
        decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        heartbeat::strategies::{arb_sample, arb_touch},
        sim::{session, Class},
    };
    use proptest::prelude::*;

    fn paid() -> Situation {
        Situation {
            plan: PlanTier::Paid,
            ..Default::default()
        }
    }

    #[test]
    fn one_anomalous_heartbeat_never_locks() {
        let s = session(Class::RemoteControlObvious, 3, 12);
        let start = s.attack_start.expect("attack");
        let mut state = DeviceState::default();
        for hb in &s.heartbeats[..start] {
            assess(&mut state, hb, &paid());
        }
        let first = assess(&mut state, &s.heartbeats[start], &paid());
        assert!(first.trust_score < first.threshold, "{first:?}");
        assert_eq!(
            first.decision,
            Decision::Allow,
            "evidence needs more than one window"
        );
        let second = assess(&mut state, &s.heartbeats[start + 1], &paid());
        assert_eq!(second.decision, Decision::Allow);
        let third = assess(&mut state, &s.heartbeats[start + 2], &paid());
        assert_ne!(third.decision, Decision::Allow);
        assert!(
            third.reasons.contains(&"touch_without_motion"),
            "{:?}",
            third.reasons
        );
        assert!(third.reasons.contains(&"screen_capture_active"));
    }

    #[test]
    fn hard_facts_lock_at_once() {
        let s = session(Class::HeldInHand, 5, 3);
        let mut state = DeviceState::default();
        let blacklisted = Situation {
            intel: IntelHits {
                app: true,
                ..Default::default()
            },
            ..paid()
        };
        let a = assess(&mut state, &s.heartbeats[0], &blacklisted);
        assert_eq!((a.trust_score, a.decision), (0, Decision::CriticalLock));
        assert_eq!(a.reasons[0], "blacklisted_app");
        // The same window again is a replay.
        let mut state = DeviceState::default();
        assess(&mut state, &s.heartbeats[1], &paid());
        let again = assess(&mut state, &s.heartbeats[1], &paid());
        assert_eq!(again.decision, Decision::CriticalLock);
        assert!(again.reasons.contains(&"replayed_window"));
    }

    #[test]
    fn a_still_phone_without_touches_is_fine_and_attestation_moves_the_line() {
        let s = session(Class::OnTable, 9, 10);
        let mut state = DeviceState::default();
        for hb in s.heartbeats.iter().filter(|h| h.touches.is_empty()) {
            let a = assess(&mut state, hb, &paid());
            assert!(a.trust_score >= 90, "{a:?}");
            assert_eq!(a.level, Level::Trusted);
        }
        let line = |attestation| {
            threshold(
                &state,
                &Situation {
                    attestation,
                    ..paid()
                },
            )
        };
        let verified = line(Attestation::Device);
        assert!(line(Attestation::Strong) < verified);
        assert!(line(Attestation::Device) < line(Attestation::Basic));
        assert_eq!(line(Attestation::Basic), line(Attestation::Unknown));
        let failed = threshold(
            &state,
            &Situation {
                attestation: Attestation::Failed,
                ..paid()
            },
        );
        let trial = threshold(&state, &Situation::default());
        assert!(verified < threshold(&state, &paid()));
        assert!(failed > trial && trial > verified);
    }

    #[test]
    fn touches_that_never_move_a_held_phone_are_locked_after_its_own_taps_did() {
        use crate::features::tests::{held, taps};
        let at = [300.0, 800.0, 1300.0, 1700.0];
        let mut state = DeviceState::default();
        let window = |seed: u64, strikes: &[f64]| Heartbeat {
            seq: seed,
            accelerometer: held(seed, strikes),
            touches: taps(&at),
            ..Default::default()
        };
        // The owner: every tap jolts the phone above its tremor.
        for seq in 1..=8 {
            let a = assess(&mut state, &window(seq, &at), &paid());
            assert_eq!(a.decision, Decision::Allow, "{a:?}");
        }
        // The same hand holding it, touches injected: no strike.
        let locked = (9..=13).find(|&seq| {
            let a = assess(&mut state, &window(seq, &[]), &paid());
            a.decision != Decision::Allow && a.reasons.contains(&"touch_without_impulse")
        });
        assert!(locked.is_some_and(|seq| seq <= 12), "{locked:?}");
    }

    #[test]
    fn touches_on_a_phone_that_shakes_without_turning_weigh_as_on_a_table() {
        use crate::features::tests::{held, shaken, taps};
        let at = [300.0, 800.0, 1300.0, 1700.0];
        let risk = |accelerometer| {
            let hb = Heartbeat {
                seq: 1,
                accelerometer,
                touches: taps(&at),
                ..Default::default()
            };
            let a = assess(&mut DeviceState::default(), &hb, &paid());
            (a.components.accelerometer, a.reasons)
        };
        for seed in 0..6 {
            let features = |accelerometer| {
                crate::features::extract(&Heartbeat {
                    accelerometer,
                    ..Default::default()
                })
            };
            // A hand turns the phone; a "tremor" on a fixed gravity does not.
            assert_eq!(supported(&features(held(seed, &[]))), 0.0);
            assert_eq!(supported(&features(shaken(seed, &[]))), 1.0);
            let (in_hand, _) = risk(held(seed, &[]));
            // Supported (or simulated): touches that never jolt it are as
            // telling as on a table, however much it shakes.
            let (rigid, reasons) = risk(shaken(seed, &[]));
            assert!(
                rigid >= 0.9 && rigid >= in_hand,
                "seed {seed}: {rigid} {in_hand} {reasons:?}"
            );
            assert!(reasons.contains(&"touch_without_motion"), "{reasons:?}");
            // Real taps on it still jolt it.
            let (tapped, reasons) = risk(shaken(seed, &at));
            assert!(tapped < 0.5, "seed {seed}: {tapped} {reasons:?}");
        }
    }

    #[test]
    fn a_touch_trace_resent_under_fresh_sensor_windows_is_a_replay() {
        let s = session(Class::HeldInHand, 4, 12);
        let mut state = DeviceState::default();
        let traced = s
            .heartbeats
            .iter()
            .position(|h| crate::features::touch_fingerprint(&h.touches).is_some())
            .expect("a window with a touch trace");
        for hb in &s.heartbeats[..=traced] {
            assert_eq!(assess(&mut state, hb, &paid()).decision, Decision::Allow);
        }
        // A later window's sensors (fresh, never seen) under the earlier
        // window's touches, re-timed by 40 ms.
        let mut resent = s.heartbeats[traced + 3].clone();
        resent.touches = s.heartbeats[traced].touches.clone();
        for t in &mut resent.touches {
            t.t += 40.0;
        }
        let a = assess(&mut state, &resent, &paid());
        assert_eq!(a.decision, Decision::CriticalLock, "{a:?}");
        assert!(a.reasons.contains(&"replayed_window"));
    }

    #[test]
    fn a_phone_whose_taps_never_show_is_not_locked_for_it() {
        use crate::features::tests::{held, taps};
        let at = [300.0, 800.0, 1300.0, 1700.0];
        let mut state = DeviceState::default();
        for seq in 1..=60 {
            let hb = Heartbeat {
                seq,
                accelerometer: held(seq, &[]),
                touches: taps(&at),
                ..Default::default()
            };
            let a = assess(&mut state, &hb, &paid());
            assert!(
                !a.reasons.contains(&"touch_without_impulse"),
                "seq {seq}: {a:?}"
            );
        }
    }

    #[test]
    fn a_controlling_app_locks_a_calm_device_and_a_capturing_app_only_costs_trust() {
        let s = session(Class::OnTable, 21, 3);
        let mut state = DeviceState::default();
        let calm = assess(&mut state, &s.heartbeats[0], &paid());
        assert_eq!(calm.decision, Decision::Allow, "{calm:?}");
        let capturing = Situation {
            evidence: AttestationEvidence {
                capturing_app: true,
                ..Default::default()
            },
            ..paid()
        };
        let a = assess(&mut state, &s.heartbeats[1], &capturing);
        assert!(a.reasons.contains(&"capturing_app_detected"), "{a:?}");
        assert_eq!(a.decision, Decision::Allow, "{a:?}");
        assert!(a.trust_score + 10 <= calm.trust_score, "{a:?}");
        let controlling = Situation {
            evidence: AttestationEvidence {
                controlling_app: true,
                ..Default::default()
            },
            ..paid()
        };
        let b = assess(&mut state, &s.heartbeats[2], &controlling);
        assert_eq!((b.trust_score, b.decision), (0, Decision::CriticalLock));
        assert_eq!(b.reasons[0], "controlling_app_detected");
    }

    #[test]
    fn sideloaded_accessibility_and_generated_domains_cost_trust() {
        let s = session(Class::OnTable, 13, 2);
        let mut state = DeviceState::default();
        let clean = assess(&mut state, &s.heartbeats[0], &paid());
        let mut risky = s.heartbeats[1].clone();
        risky.context.installer = Some("com.example.sideloader".into());
        risky.context.accessibility_services = vec!["com.remote.helper/.Service".into()];
        risky.context.dns = vec!["xj4k9qpz7w2mvb8n.biz".into()];
        let a = assess(&mut state, &risky, &paid());
        assert!(
            a.reasons.contains(&"sideloaded_accessibility"),
            "{:?}",
            a.reasons
        );
        assert!(a.reasons.contains(&"dga_domain"));
        assert!(
            a.trust_score + 25 <= clean.trust_score,
            "{} vs {}",
            a.trust_score,
            clean.trust_score
        );
        // Store-installed with accessibility services is not penalised.
        let mut store = s.heartbeats[1].clone();
        store.context.accessibility_services = vec!["com.google.android.marvin.talkback".into()];
        store.seq = 3;
        let b = assess(&mut DeviceState::default(), &store, &paid());
        assert!(!b.reasons.contains(&"sideloaded_accessibility"));
    }

    fn arb_heartbeat() -> impl Strategy<Value = Heartbeat> {
        let sample = arb_sample();
        let touch = arb_touch();
        (
            proptest::collection::vec(sample.clone(), 0..60),
            proptest::collection::vec(sample, 0..60),
            proptest::collection::vec(touch, 0..20),
            proptest::option::of((0u64..10_000_000, 0u64..10_000)),
            any::<bool>(),
        )
            .prop_map(|(mut accelerometer, gyroscope, touches, net, capture)| {
                accelerometer.sort_by(|a, b| a.t.total_cmp(&b.t));
                Heartbeat {
                    seq: 1,
                    accelerometer,
                    gyroscope,
                    touches,
                    network: net.map(|(tx, ms)| crate::heartbeat::Network {
                        tx_bytes: tx,
                        rx_bytes: 0,
                        interval_ms: ms,
                    }),
                    context: crate::heartbeat::Context {
                        screen_capture: capture,
                        ..Default::default()
                    },
                }
            })
    }

    proptest! {
        #[test]
        fn any_heartbeat_scores_within_range(hbs in proptest::collection::vec(arb_heartbeat(), 1..6)) {
            let mut state = DeviceState::default();
            for hb in &hbs {
                let a = assess(&mut state, hb, &paid());
                prop_assert!(a.trust_score <= 100);
                prop_assert!((0.0..=1.0).contains(&a.global_risk));
                for c in [a.components.accelerometer, a.components.gyroscope, a.components.touch_entropy, a.components.network_spike] {
                    prop_assert!((0.0..=1.0).contains(&c));
                }
                prop_assert!((20..=70).contains(&a.threshold));
            }
            prop_assert_eq!(state.heartbeats, hbs.len() as u64);
        }
    }
}
