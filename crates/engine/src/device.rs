//! What the engine remembers about one device between heartbeats.
//!
//! Baselines (exponential moving averages and deviations) and a circular
//! buffer of the last [`RING`] readings of each sensor feature let a device
//! be judged against its own history; the evidence window turns single
//! noisy heartbeats into nothing and sustained anomalies into a decision.
//! Heartbeats judged suspicious do not teach the baselines, so an attack
//! cannot become the device's "normal".

use serde::{Deserialize, Serialize};

use crate::{
    features::{Features, IMPULSE_BINS, IMPULSE_BINS_UNDER_INJECTION},
    score::EVIDENCE_WINDOW,
    stats::{CategoricalCusum, CusumModel, Ema, PageHinkley, Ring},
};

/// Readings kept per sensor feature.
pub const RING: usize = 100;
/// Window fingerprints remembered for replay detection.
const WINDOWS: usize = 64;
/// Touch-trace fingerprints remembered (a trace needs four events, so
/// these span a minute or more of use; ~160 bytes of state).
const TOUCH_TRACES: usize = 16;
/// Smoothing of the baselines.
const ALPHA: f64 = 0.1;
/// The touch-impulse test (rank bins of [`crate::features::impulse_test`]):
/// injected touches rank uniformly among the window's instants.
const IMPULSE_MODEL: CusumModel = CusumModel {
    null: IMPULSE_BINS_UNDER_INJECTION,
    // What a device's touch impulses are assumed to look like before it has
    // shown its own: barely better than an injected touch's, so a new
    // device's test is weak and cannot mistake a light tapper for an
    // attack; its own taps make the test sharper.
    prior: [0.40, 0.28, 0.17, 0.10, 0.05],
    // Weight of that prior, in touches.
    weight: 4.0,
    // Nats subtracted per touch: a device whose taps cannot be told from
    // injected ones (KL below this) accumulates nothing, and a genuine
    // device whose taps are only sometimes visible drifts down, not up.
    drag: 0.1,
    // Even a device whose taps always stood out leaves no visible impulse
    // with some touches (a finger already resting on the glass, a tap in a
    // louder moment of the window, a touch-down reported late): a tenth
    // of its touches are assumed to rank like injected ones, so one touch
    // weighs at most ln 10 ≈ 2.3 nats.
    contamination: 0.1,
};
/// The same test while the screen is being streamed out (the upload far
/// above the device's own): what a remote controller needs, so a device
/// that has not yet shown its own taps is judged by physics — a finger
/// landing on a held phone leaves an impulse above its motion, so half of
/// all taps are assumed to rank in the top bins — rather than given the
/// benefit of the doubt. A device whose own taps are faint (a padded case)
/// still teaches the test that, outside streams.
const STREAMING_IMPULSE_MODEL: CusumModel = CusumModel {
    prior: STREAMING_PRIOR,
    ..IMPULSE_MODEL
};
const STREAMING_PRIOR: [f64; IMPULSE_BINS] = [0.25, 0.15, 0.075, 0.12, 0.405];
/// Nats of evidence at which touches count as injected (Wald: a false alarm
/// per excursion of at most e^-5 under the device's own behaviour, less
/// with the drag).
pub const IMPULSE_EVIDENCE: f64 = 5.0;
/// Nats per injected touch (KL of the uniform ranks from the device's own)
/// below which the device's taps are too faint to test.
const MIN_INFORMATIVE: f64 = 0.6;

/// Robust deviations above the device's usual upload that make a spike.
pub const UPLOAD_SPIKE_Z: f64 = 3.0;
/// Consecutive spiking windows (2 s each: a minute) after which a raised
/// upload is the device's new normal (a backup, a video call) and teaches
/// the baseline again.
const UPLOAD_NEW_NORMAL: u32 = 30;

/// Touches teach the device's impulse distribution only while the evidence
/// is below this: once injection is suspected, the attack must not become
/// the baseline it is judged against.
const LEARN_BELOW: f64 = 1.0;

/// Per-device state (see the module docs). Serializable so that every
/// worker can load and store it in shared state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Heartbeats scored.
    pub heartbeats: u64,
    /// The highest sequence number scored.
    pub last_seq: u64,
    /// Which of the 64 sequence numbers up to `last_seq` were scored
    /// (bit i = `last_seq - i`), so a heartbeat overtaken in the queue is
    /// still scored once and a redelivered one is not scored twice.
    #[serde(default)]
    scored_mask: u64,
    /// Trust history.
    pub trust: Ema,
    /// Upload-rate baseline (bytes/s).
    pub upload: Ema,
    /// The last window's upload z-score (a spike must be sustained).
    pub last_upload_z: f64,
    /// Motion baseline while touching (m/s²).
    pub touch_motion: Ema,
    /// Gyroscope-energy baseline (rad/s).
    pub gyro: Ema,
    /// Drift of motion-under-touch below its baseline.
    drift: PageHinkley,
    /// Last readings of accelerometer motion.
    pub accel_ring: Ring<RING>,
    /// Last readings of gyroscope energy.
    pub gyro_ring: Ring<RING>,
    /// Last readings of upload rate.
    pub upload_ring: Ring<RING>,
    /// Below-threshold flags of the last heartbeats (bit 0 = newest).
    evidence: u32,
    /// Trust of the last heartbeats, newest last.
    recent_trust: Vec<f64>,
    /// Fingerprints of recent accelerometer windows.
    windows: Vec<u64>,
    /// Sequential test of touch impulses against injection (rank bins).
    #[serde(default)]
    impulses: CategoricalCusum,
    /// Which of the last heartbeats raised that test's statistic since it
    /// last stood at 0 (bit 0 = newest): the heartbeats of its current
    /// excursion.
    #[serde(default)]
    impulse_excursion: u32,
    /// ln energy of this device's taps that stood out (how loud its taps are).
    #[serde(default)]
    tap_level: Ema,
    /// Whitened residuals of recent accelerometer windows, packed
    /// ([`crate::replay`]), for near-duplicate replays.
    #[serde(default, with = "crate::compact::bytes")]
    residuals: Vec<u8>,
    /// Which of the last heartbeats were near-duplicates (bit 0 = newest).
    #[serde(default)]
    near_duplicates: u8,
    /// Consecutive windows whose upload was a spike against the baseline.
    #[serde(default)]
    upload_spiking: u32,
    /// Fingerprints of recent touch traces (`features::touch_fingerprint`).
    #[serde(default)]
    touch_traces: Vec<u64>,
}

impl DeviceState {
    /// True when this device already sent a window with fingerprint `fp`.
    pub fn seen_window(&self, fp: u64) -> bool {
        self.windows.contains(&fp)
    }

    /// True when this device already sent a touch trace with fingerprint `fp`.
    pub fn seen_touch_trace(&self, fp: u64) -> bool {
        self.touch_traces.contains(&fp)
    }

    /// Records whether this window (its whitened residual, if it has one)
    /// is a near-duplicate of one this device sent recently, and returns
    /// how many of the last [`EVIDENCE_WINDOW`] heartbeats were. One match
    /// can be chance (rarely, but heartbeats are many); a replay attack
    /// resends window after window.
    pub fn near_duplicates(&mut self, residual: Option<&crate::replay::Residual>) -> u32 {
        let near = residual.is_some_and(|r| crate::replay::is_replay(&self.residuals, r));
        let mask = (1u8 << EVIDENCE_WINDOW) - 1;
        self.near_duplicates = ((self.near_duplicates << 1) | u8::from(near)) & mask;
        if near {
            self.near_duplicates.count_ones()
        } else {
            0
        }
    }

    /// Records whether this heartbeat was below the threshold; returns how
    /// many of the last [`EVIDENCE_WINDOW`] were (this one included).
    ///
    /// Once the touch-impulse test has crossed [`IMPULSE_EVIDENCE`], the
    /// heartbeats of its excursion count too: the test is sequential, its
    /// threshold already holds the evidence of those heartbeats together,
    /// and asking each of them to be below the threshold again would count
    /// the same touches twice.
    pub fn record_evidence(&mut self, below: bool) -> u32 {
        let mask = (1u32 << EVIDENCE_WINDOW) - 1;
        self.evidence = ((self.evidence << 1) | u32::from(below)) & mask;
        if self.impulses.statistic >= IMPULSE_EVIDENCE {
            self.evidence |= self.impulse_excursion & mask;
        }
        self.evidence.count_ones()
    }

    /// The lowest trust among the recent heartbeats (100 when none).
    pub fn recent_min_trust(&self) -> f64 {
        self.recent_trust.iter().copied().fold(100.0, f64::min)
    }

    /// True when motion under touch dropped abruptly below the device's own
    /// baseline (Page–Hinkley on the normalised shortfall).
    pub fn drift_observed(&mut self, f: &Features) -> bool {
        if self.touch_motion.n < 10 {
            return false;
        }
        let shortfall =
            (self.touch_motion.mean - f.accel_motion) / self.touch_motion.std().max(0.01);
        self.drift.update(shortfall.clamp(-10.0, 10.0), 0.5, 8.0)
    }

    /// Folds this window's touch impulses into the device's sequential test
    /// and returns the evidence (nats) that its touches are injected — 0
    /// when this window's touches could not be judged: a window louder than
    /// this device's own taps (walking, a vehicle), where a real tap would
    /// not stand out either, or a device whose taps are too faint to test.
    ///
    /// Called once per heartbeat: it also keeps the test's excursion.
    pub fn impulse_evidence(&mut self, f: &Features) -> f64 {
        let before = self.impulses.statistic;
        let model = self.impulse_model(f);
        let evidence = if self.impulses_visible(f, model) {
            self.impulses.observe(f.impulses.bins, model)
        } else {
            // This window's touches were not judged: they are no evidence
            // (the accumulated statistic waits for touches that are).
            0.0
        };
        let rose = self.impulses.statistic > before;
        self.impulse_excursion = if self.impulses.statistic > 0.0 {
            ((self.impulse_excursion << 1) | u32::from(rose)) & ((1u32 << EVIDENCE_WINDOW) - 1)
        } else {
            0
        };
        evidence
    }

    /// True when the window ranked touches and is not louder than this
    /// device's own taps (what its taps look like may be learned from it).
    fn impulses_judgeable(&self, f: &Features) -> bool {
        // Loud: the window's 90th-percentile background reaches half the
        // energy of this device's typical tap that stood out.
        let too_loud = self.tap_level.n >= 3
            && f.impulses
                .background_level
                .is_some_and(|level| level > self.tap_level.mean - std::f64::consts::LN_2);
        f.impulses.looks() > 0 && !too_loud
    }

    /// True when the window's touches are evidence: judgeable, on a device
    /// whose own taps have shown they stand out. A device whose taps barely
    /// do (a padded case, a heavy tremor), or that has not shown any yet,
    /// cannot tell an injected touch from its own: no test.
    fn impulses_visible(&self, f: &Features, model: &CusumModel) -> bool {
        self.impulses_judgeable(f) && self.impulses.informativeness(model) >= MIN_INFORMATIVE
    }

    /// True when this window's upload is a spike against the device's own.
    fn streaming(&self, f: &Features) -> bool {
        f.upload_rate
            .is_some_and(|rate| self.upload_z(rate) > UPLOAD_SPIKE_Z)
    }

    /// The impulse test's model for this window (see [`STREAMING_IMPULSE_MODEL`]).
    fn impulse_model(&self, f: &Features) -> &'static CusumModel {
        if self.streaming(f) {
            &STREAMING_IMPULSE_MODEL
        } else {
            &IMPULSE_MODEL
        }
    }

    /// The evidence (nats) that this device's recent touches were injected.
    pub fn impulse_statistic(&self) -> f64 {
        self.impulses.statistic
    }

    /// The device's learned rank-bin shares of its touch impulses.
    pub fn impulse_shares(&self) -> [f64; IMPULSE_BINS] {
        self.impulses.learned(&IMPULSE_MODEL)
    }

    /// True when heartbeat `seq` was already scored (or is too old to tell:
    /// more than 64 behind the newest).
    pub fn already_scored(&self, seq: u64) -> bool {
        if seq > self.last_seq {
            return false;
        }
        let behind = self.last_seq - seq;
        behind >= 64 || self.scored_mask & (1u64 << behind) != 0
    }

    /// Records that heartbeat `seq` was scored.
    pub fn mark_scored(&mut self, seq: u64) {
        if seq > self.last_seq {
            let shift = seq - self.last_seq;
            self.scored_mask = if shift >= 64 {
                0
            } else {
                self.scored_mask << shift
            };
            self.last_seq = seq;
            self.scored_mask |= 1;
        } else if self.last_seq - seq < 64 {
            self.scored_mask |= 1u64 << (self.last_seq - seq);
        }
    }

    /// Forgets the recent evidence (an operator unlocked the device);
    /// baselines and replay fingerprints stay.
    pub fn clear_evidence(&mut self) {
        self.evidence = 0;
        self.recent_trust.clear();
        self.impulses.reset();
        self.impulse_excursion = 0;
    }

    /// How far `rate` (bytes/s) is above the device's usual upload, in
    /// robust deviations: median and MAD of its last readings, with floors
    /// (half the median, 2 KB/s) so a device that barely uploads is not
    /// alarmed by a few kilobytes. Before 3 readings: against 2 KB/s.
    pub fn upload_z(&self, rate: f64) -> f64 {
        let values = self.upload_ring.values();
        if values.len() < 3 {
            return (rate - 2_000.0) / 4_000.0;
        }
        let median = median(values);
        let deviations: Vec<f64> = values.iter().map(|v| (v - median).abs()).collect();
        let spread = (1.4826 * median_of(deviations))
            .max(median * 0.5)
            .max(2_000.0);
        (rate - median) / spread
    }

    /// Folds the heartbeat in.
    pub fn learn(
        &mut self,
        f: &Features,
        residual: Option<&crate::replay::Residual>,
        trust: f64,
        suspicious: bool,
        replayed: bool,
    ) {
        self.heartbeats = self.heartbeats.saturating_add(1);
        self.trust.update(trust, ALPHA);
        self.recent_trust.push(trust);
        if self.recent_trust.len() > EVIDENCE_WINDOW as usize {
            self.recent_trust.remove(0);
        }
        if let Some(rate) = f.upload_rate {
            self.last_upload_z = self.upload_z(rate);
            self.upload_spiking = if self.last_upload_z > UPLOAD_SPIKE_Z {
                self.upload_spiking.saturating_add(1)
            } else {
                0
            };
        }
        if let Some(residual) = residual.filter(|_| !replayed) {
            crate::replay::remember(&mut self.residuals, residual);
        }
        if !replayed {
            for (fp, kept, limit) in [
                (f.fingerprint, &mut self.windows, WINDOWS),
                (f.touch_fingerprint, &mut self.touch_traces, TOUCH_TRACES),
            ] {
                if let Some(fp) = fp {
                    if kept.len() >= limit {
                        kept.remove(0);
                    }
                    kept.push(fp);
                }
            }
        }
        if suspicious {
            return; // an anomaly does not teach the baselines
        }
        // Touches teach what this device's taps look like only while nothing
        // suggests they are injected.
        // Nor while the screen is streamed out (they may be a controller's).
        if self.impulses.statistic < LEARN_BELOW
            && self.last_upload_z <= UPLOAD_SPIKE_Z
            && self.impulses_judgeable(f)
        {
            self.impulses.learn(f.impulses.bins);
            if let Some(level) = f.impulses.hit_level {
                self.tap_level.update(level, ALPHA);
            }
        }
        if f.accel_samples > 0 {
            self.accel_ring.push(f.accel_motion);
            if f.touch_downs > 0 {
                self.touch_motion.update(f.accel_motion, ALPHA);
            }
        }
        if f.gyro_samples > 0 {
            self.gyro_ring.push(f.gyro_energy);
            self.gyro.update(f.gyro_energy, ALPHA);
        }
        // A spike teaches the upload baseline only once it has lasted long
        // enough to be the device's new normal: a screen stream must not
        // become the baseline it is judged against within a few windows.
        if let Some(rate) = f
            .upload_rate
            .filter(|_| self.upload_spiking == 0 || self.upload_spiking >= UPLOAD_NEW_NORMAL)
        {
            self.upload_ring.push(rate);
            self.upload.update(rate, ALPHA);
        }
    }
}

fn median(values: &[f64]) -> f64 {
    median_of(values.to_vec())
}

fn median_of(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mid = values.len() / 2;
    let (_, m, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overtaken_heartbeats_are_scored_once() {
        let mut d = DeviceState::default();
        d.mark_scored(1);
        d.mark_scored(3);
        assert!(!d.already_scored(2), "overtaken, not yet scored");
        d.mark_scored(2);
        assert!(d.already_scored(2) && d.already_scored(3) && d.already_scored(1));
        assert!(!d.already_scored(4));
        d.mark_scored(100);
        assert!(d.already_scored(3), "too old to tell counts as scored");
        assert_eq!(d.last_seq, 100);
    }

    fn touches(bins: [u8; IMPULSE_BINS]) -> Features {
        Features {
            touch_downs: bins.iter().map(|&b| usize::from(b)).sum(),
            impulses: crate::features::Impulses {
                bins,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A device whose taps always stood out (taught by `n` heartbeats of three).
    fn firm_tapper(n: usize) -> DeviceState {
        let mut d = DeviceState::default();
        let firm = touches([0, 0, 0, 1, 2]);
        for _ in 0..n {
            d.impulse_evidence(&firm);
            d.record_evidence(false);
            d.learn(&firm, None, 95.0, false, false);
        }
        d
    }

    #[test]
    fn once_the_impulse_test_crosses_its_excursion_counts_as_evidence() {
        let mut d = firm_tapper(5);
        let injected = touches([2, 1, 0, 0, 0]);
        let mut counted = Vec::new();
        while d.impulse_statistic() < IMPULSE_EVIDENCE {
            assert!(counted.len() < EVIDENCE_WINDOW as usize, "never crossed");
            d.impulse_evidence(&injected);
            // No heartbeat below the trust threshold on its own …
            counted.push(d.record_evidence(false));
        }
        // … until the test crossed: then every heartbeat of its excursion
        // counts.
        let (last, before) = counted.split_last().expect("one heartbeat at least");
        assert!(before.iter().all(|&c| c == 0), "{counted:?}");
        assert_eq!(*last as usize, counted.len(), "{counted:?}");
        assert!(
            counted.len() >= 2,
            "one heartbeat of three touches cannot cross alone: {counted:?}"
        );
    }

    #[test]
    fn an_excursion_that_falls_back_to_zero_is_forgotten() {
        let mut d = firm_tapper(5);
        d.impulse_evidence(&touches([1, 1, 0, 0, 0]));
        assert!(d.impulse_statistic() > 0.0);
        // The device's own taps bring the statistic back to 0 …
        while d.impulse_statistic() > 0.0 {
            d.impulse_evidence(&touches([0, 0, 0, 1, 2]));
        }
        assert_eq!(d.impulse_excursion, 0);
        // … so a later crossing counts only its own heartbeats.
        let mut last = 0;
        for _ in 0..EVIDENCE_WINDOW {
            d.impulse_evidence(&touches([0, 0, 0, 0, 0]));
            last = d.record_evidence(false);
        }
        assert_eq!(last, 0, "heartbeats without touches are no evidence");
    }

    #[test]
    fn a_device_without_visible_taps_is_not_tested() {
        // A padded case: its taps rank like injected ones.
        let mut d = DeviceState::default();
        let faint = touches([2, 1, 0, 0, 0]);
        for _ in 0..30 {
            assert_eq!(d.impulse_evidence(&faint), 0.0);
            d.learn(&faint, None, 95.0, false, false);
        }
        assert_eq!(d.impulse_statistic(), 0.0);
    }

    fn uploading(rate: f64, bins: [u8; IMPULSE_BINS]) -> Features {
        Features {
            upload_rate: Some(rate),
            ..touches(bins)
        }
    }

    #[test]
    fn a_sustained_upload_spike_does_not_become_the_baseline_until_it_lasts() {
        let mut d = DeviceState::default();
        for _ in 0..8 {
            let quiet = uploading(1_000.0, [0; IMPULSE_BINS]);
            d.learn(&quiet, None, 95.0, false, false);
        }
        // A screen stream at 30 KB/s, in windows that are not suspicious
        // on their own: it used to become the median within a few windows.
        let stream = uploading(30_000.0, [0; IMPULSE_BINS]);
        for window in 0..UPLOAD_NEW_NORMAL {
            assert!(d.upload_z(30_000.0) > UPLOAD_SPIKE_Z, "window {window}");
            d.learn(&stream, None, 80.0, false, false);
        }
        // A minute later it is the device's new normal (a backup, a call).
        for _ in 0..RING {
            d.learn(&stream, None, 80.0, false, false);
        }
        assert!(d.upload_z(30_000.0) < UPLOAD_SPIKE_Z);
    }

    #[test]
    fn while_the_screen_is_streamed_a_device_is_judged_by_physics_not_doubt() {
        // An owner who has shown only four taps, all of which stood out:
        // too few for its test to run outside a stream.
        let owner = || {
            let mut d = DeviceState::default();
            let own = uploading(1_000.0, [0, 0, 0, 1, 1]);
            for _ in 0..2 {
                d.impulse_evidence(&own);
                d.learn(&own, None, 95.0, false, false);
            }
            d
        };
        let injected = |rate| uploading(rate, [2, 1, 0, 0, 0]);
        let mut quiet = owner();
        let mut streamed = owner();
        for _ in 0..EVIDENCE_WINDOW {
            quiet.impulse_evidence(&injected(1_000.0));
            streamed.impulse_evidence(&injected(30_000.0));
            streamed.learn(&injected(30_000.0), None, 60.0, false, false);
        }
        assert_eq!(quiet.impulse_statistic(), 0.0, "no stream: no test");
        assert!(
            streamed.impulse_statistic() >= IMPULSE_EVIDENCE,
            "{}",
            streamed.impulse_statistic()
        );
        // The stream's touches taught the device nothing.
        assert_eq!(streamed.impulse_shares(), owner().impulse_shares());
    }

    #[test]
    fn a_padded_case_streaming_its_screen_from_the_start_is_not_tested() {
        // Its taps are never learned while it streams, and the physics prior
        // alone is too weak for the test to run (below MIN_INFORMATIVE).
        let mut d = DeviceState::default();
        for _ in 0..30 {
            let faint = uploading(200_000.0, [2, 1, 0, 0, 0]);
            assert_eq!(d.impulse_evidence(&faint), 0.0);
            d.learn(&faint, None, 90.0, false, false);
        }
    }

    #[test]
    fn a_touch_trace_sent_again_is_recognised() {
        let mut d = DeviceState::default();
        let traced = Features {
            touch_fingerprint: Some(42),
            ..Default::default()
        };
        assert!(!d.seen_touch_trace(42));
        d.learn(&traced, None, 95.0, false, false);
        assert!(d.seen_touch_trace(42));
        // Only the last TOUCH_TRACES traces are kept.
        for fp in 0..TOUCH_TRACES as u64 {
            let other = Features {
                touch_fingerprint: Some(1_000 + fp),
                ..Default::default()
            };
            d.learn(&other, None, 95.0, false, false);
        }
        assert!(!d.seen_touch_trace(42));
        assert_eq!(d.touch_traces.len(), TOUCH_TRACES);
    }

    proptest! {
        #[test]
        fn every_seq_marked_reads_as_scored(seqs in proptest::collection::vec(1u64..200, 1..100)) {
            let mut d = DeviceState::default();
            for &s in &seqs {
                d.mark_scored(s);
                prop_assert!(d.already_scored(s));
            }
            prop_assert_eq!(d.last_seq, *seqs.iter().max().expect("non-empty"));
        }
    }
}
