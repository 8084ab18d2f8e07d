//! Features of one heartbeat window, each grounded in what a hand, a table,
//! a trojan or an emulator does to the sensors (THREAT-MODEL.md).
//!
//! * **Motion** — the spread of the acceleration magnitude about its mean
//!   (gravity removed): a phone in a hand never drops below physiological
//!   tremor; one on a table shows only sensor noise.
//! * **High-frequency energy** — RMS of sample-to-sample changes: tremor and
//!   sensor noise live here. Real sensors are never silent; exactly zero is
//!   a flatline (emulator, injected constants).
//! * **Cleanliness** — second differences over first differences. Noise
//!   makes it ≈ 2 (white noise: √(6/2)·…); a perfect sine sampled finely
//!   makes it ≪ 1. Synthetic "motion" is too smooth.
//! * **Gravity drift** — the angle gravity turns between the window's halves:
//!   posture changes in a hand, none on a table.
//! * **Touch ↔ motion coupling** — a finger landing on a real phone leaves an
//!   accelerometer/gyroscope impulse within tens of milliseconds; an injected
//!   touch leaves none. Measured as the energy of sample-to-sample changes
//!   in the 80 ms after touches against the energy elsewhere in the window.
//! * **Touch impulses against the local background** — the coupling above
//!   compares touches with the *rest of the window*, which a moving phone
//!   fills with tremor, steps or vibration. [`impulse_test`] instead ranks
//!   each touch's curvature energy (second differences, which keep a tap's
//!   20–60 ms impulse and suppress posture, steps and most tremor) among the
//!   same statistic at every other instant of the same window. Whatever the
//!   background, an injected touch's rank is uniform (its time is unrelated
//!   to the motion), while a real tap on that phone ranks high. The ranks
//!   are binned here; the device accumulates them across heartbeats
//!   (`DeviceState::impulse_evidence`).
//! * **Touch statistics** — normalised Shannon entropy of pressure, contact
//!   size, dwell and inter-touch intervals; rhythm regularity (coefficient of
//!   variation of intervals); straightness of multi-point gestures.
//! * **Upload rate** — bytes sent per second, judged later against the
//!   device's own baseline.
//! * **Window fingerprint** — a hash of the accelerometer window relative to
//!   its first sample (so a replay shifted by a constant offset matches too).
//! * **Touch-trace fingerprint** — a hash of the touches' positions,
//!   pressures, sizes and actions, not their times, so a recording resent
//!   with fresh sensor noise and re-timed touches still matches.

use crate::{
    heartbeat::{Heartbeat, Sample, Touch, TouchAction},
    stats::{coefficient_of_variation, mean_std, normalized_entropy},
};

/// After a touch lands, how long its motion impulse may take to show (ms).
pub const IMPULSE_WINDOW_MS: f64 = 80.0;
/// How long before the reported touch-down the impulse may begin (ms):
/// touch controllers report contact a frame or two after it happens.
pub const IMPULSE_LEAD_MS: f64 = 20.0;
/// How long after the reported touch-down the impulse test looks (ms): a
/// strike rings for 10–30 ms at 15–40 Hz, starting up to ~25 ms after the
/// report (panel and sensor clocks differ by a few ms).
pub const IMPULSE_AFTER_MS: f64 = 60.0;
/// Upper edges of the rank bins of [`impulse_test`] (the last bin is [0.99, 1]).
pub const IMPULSE_BIN_EDGES: [f64; IMPULSE_BINS - 1] = [0.5, 0.8, 0.95, 0.99];
/// Rank bins of [`impulse_test`].
pub const IMPULSE_BINS: usize = crate::stats::CATEGORIES;
/// The first bin whose touches "stood out" (ranked at or above 0.95).
pub const IMPULSE_STOOD_OUT: usize = 3;
/// What an injected touch's rank falls into, per bin: the bins' widths (a
/// uniform rank; exact to within 1/(m+1) for `m` background instants).
pub const IMPULSE_BINS_UNDER_INJECTION: [f64; IMPULSE_BINS] = [0.5, 0.3, 0.15, 0.04, 0.01];
/// Background instants needed to rank a touch (the rank's resolution).
const MIN_BACKGROUND: usize = 20;
/// Slowest sampling at which a tap impulse (20–60 ms) still spans samples:
/// below about 30 Hz the test abstains.
const MAX_IMPULSE_DT_MS: f64 = 34.0;

/// The touch-impulse test of one window (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impulses {
    /// Touch-downs per rank bin (see [`IMPULSE_BIN_EDGES`]).
    pub bins: [u8; IMPULSE_BINS],
    /// ln of the mean curvature energy at the touches that ranked in the top
    /// bin (how strong this device's taps are), when any did.
    pub hit_level: Option<f64>,
    /// ln of the 90th percentile of the background's curvature energy (how
    /// loud this window is), when the test ran.
    pub background_level: Option<f64>,
}

impl Impulses {
    /// Touch-downs that were ranked.
    pub fn looks(&self) -> u32 {
        self.bins.iter().map(|&b| u32::from(b)).sum()
    }

    /// Touch-downs that stood out (ranked at or above 0.95).
    pub fn stood_out(&self) -> u32 {
        self.bins[IMPULSE_STOOD_OUT..]
            .iter()
            .map(|&b| u32::from(b))
            .sum()
    }
}

/// The features of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Features {
    /// Accelerometer samples in the window.
    pub accel_samples: usize,
    /// Std of |a| about its mean (m/s²).
    pub accel_motion: f64,
    /// RMS of consecutive |a| changes (m/s²).
    pub accel_hf: f64,
    /// Second-difference over first-difference energy of |a| (≈2 noise, ≪1 synthetic-smooth).
    pub accel_roughness: f64,
    /// Share of consecutive accelerometer samples exactly equal.
    pub accel_repeats: f64,
    /// Angle gravity turned between the window halves (rad).
    pub gravity_drift: f64,
    /// Gyroscope samples in the window.
    pub gyro_samples: usize,
    /// RMS of the gyroscope magnitude (rad/s).
    pub gyro_energy: f64,
    /// Share of consecutive gyroscope samples exactly equal.
    pub gyro_repeats: f64,
    /// Touch-down events (taps and gesture starts).
    pub touch_downs: usize,
    /// All touch events.
    pub touch_events: usize,
    /// Touch ↔ motion coupling in [0, 1] (1 when no downs; see `touch_coupling`).
    pub touch_coupling: f64,
    /// Each touch's impulse ranked against the window's own background.
    pub impulses: Impulses,
    /// Sample timing lets a 20–60 ms impulse be seen: regular (no bursts of
    /// batched samples) and at least ~30 Hz.
    pub timing_resolves_taps: bool,
    /// The accelerometer's samples are evenly spaced (no batched bursts).
    pub evenly_spaced: bool,
    /// Mean normalised entropy of pressure and contact size over all events.
    pub touch_surface_entropy: f64,
    /// Mean normalised entropy of dwell times and of intervals between downs.
    pub touch_timing_entropy: f64,
    /// Std of pressure over all events.
    pub pressure_std: f64,
    /// Std of contact size over all events.
    pub size_std: f64,
    /// Coefficient of variation of the intervals between downs.
    pub rhythm_cv: f64,
    /// Mean straightness (chord / path) of gestures with 3+ points (0 when none).
    pub straightness: f64,
    /// Gestures with 3+ points.
    pub gestures: usize,
    /// Upload rate (bytes/s), when the window carried network counters.
    pub upload_rate: Option<f64>,
    /// Offset-invariant hash of the accelerometer window (8+ samples, not flat).
    pub fingerprint: Option<u64>,
    /// Fingerprint of the window's touch trace (see [`touch_fingerprint`]).
    pub touch_fingerprint: Option<u64>,
}

fn repeats(samples: &[Sample]) -> f64 {
    if samples.len() < 2 {
        return 0.0;
    }
    let same = samples
        .windows(2)
        .filter(|w| w[0].x == w[1].x && w[0].y == w[1].y && w[0].z == w[1].z)
        .count();
    same as f64 / (samples.len() - 1) as f64
}

/// RMS of first and second differences of `series`.
fn difference_energies(series: &[f64]) -> (f64, f64) {
    let n1 = series.len().saturating_sub(1);
    let n2 = series.len().saturating_sub(2);
    if n1 == 0 {
        return (0.0, 0.0);
    }
    let d1: f64 = series
        .windows(2)
        .map(|w| (w[1] - w[0]).powi(2))
        .sum::<f64>()
        / n1 as f64;
    let d2 = if n2 == 0 {
        0.0
    } else {
        series
            .windows(3)
            .map(|w| (w[2] - 2.0 * w[1] + w[0]).powi(2))
            .sum::<f64>()
            / n2 as f64
    };
    (d1.sqrt(), d2.sqrt())
}

fn mean_direction(samples: &[Sample]) -> Option<[f64; 3]> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    let (x, y, z) = samples
        .iter()
        .fold((0.0, 0.0, 0.0), |(x, y, z), s| (x + s.x, y + s.y, z + s.z));
    let norm = (x * x + y * y + z * z).sqrt();
    (norm > 1e-9).then(|| [x / n / (norm / n), y / n / (norm / n), z / n / (norm / n)])
}

fn gravity_drift(samples: &[Sample]) -> f64 {
    let half = samples.len() / 2;
    match (
        mean_direction(&samples[..half]),
        mean_direction(&samples[half..]),
    ) {
        (Some(a), Some(b)) => {
            let dot = (a[0] * b[0] + a[1] * b[1] + a[2] * b[2]).clamp(-1.0, 1.0);
            dot.acos()
        }
        _ => 0.0,
    }
}

/// Energy of consecutive changes of |a| inside the 80 ms after each
/// touch-down, over the energy of changes elsewhere in the window. A finger
/// landing on a real phone makes this ≫ 1; injected touches leave ≈ 1.
/// `None` when either side has too few samples to tell.
fn impulse_ratio(samples: &[Sample], downs: &[f64]) -> Option<f64> {
    let (mut inside, mut n_in, mut outside, mut n_out) = (0.0, 0usize, 0.0, 0usize);
    let mut previous = samples.first().map(Sample::magnitude);
    for sample in samples.iter().skip(1) {
        let magnitude = sample.magnitude();
        let d = (magnitude - previous.unwrap_or(magnitude)).powi(2);
        previous = Some(magnitude);
        let t = sample.t;
        if downs
            .iter()
            .any(|&down| t >= down && t <= down + IMPULSE_WINDOW_MS)
        {
            inside += d;
            n_in += 1;
        } else {
            outside += d;
            n_out += 1;
        }
    }
    if n_in < 2 || n_out < 4 {
        return None;
    }
    let outside = (outside / n_out as f64).max(1e-12);
    Some((inside / n_in as f64) / outside)
}

/// Touch ↔ motion coupling in [0, 1]: 0 when the motion after touches is
/// no different from the rest of the window, 1 when it clearly stands out
/// (energy ratio ≥ 3 on either sensor). 1 when there are no touch-downs;
/// 0.5 when the sensors cannot tell.
fn touch_coupling(heartbeat: &Heartbeat) -> f64 {
    let downs: Vec<f64> = heartbeat
        .touches
        .iter()
        .filter(|t| t.action == TouchAction::Down)
        .map(|t| t.t)
        .collect();
    if downs.is_empty() {
        return 1.0;
    }
    let ratio = |samples: &[Sample]| impulse_ratio(samples, &downs);
    let best = match (ratio(&heartbeat.accelerometer), ratio(&heartbeat.gyroscope)) {
        (Some(a), Some(g)) => a.max(g),
        (Some(r), None) | (None, Some(r)) => r,
        (None, None) => return 0.5,
    };
    ((best - 1.5) / 1.5).clamp(0.0, 1.0)
}

/// The mean sampling interval of `samples` when they are evenly spaced: at
/// least 80% of the intervals within 0.5–1.5× the mean (batched sensors
/// deliver bursts of near-identical timestamps and gaps, which fail this).
fn mean_interval(samples: &[Sample]) -> Option<f64> {
    if samples.len() < 16 {
        return None;
    }
    let (first, last) = (samples[0].t, samples[samples.len() - 1].t);
    let mean = (last - first) / (samples.len() - 1) as f64;
    if !(mean > 0.0 && mean.is_finite()) {
        return None;
    }
    let even = samples
        .windows(2)
        .filter(|w| {
            let dt = w[1].t - w[0].t;
            dt >= 0.5 * mean && dt <= 1.5 * mean
        })
        .count();
    (even * 5 >= (samples.len() - 1) * 4).then_some(mean)
}

/// True when the timing can resolve a tap: evenly spaced and dense enough
/// (mean interval at most ~34 ms).
fn timing_resolves_taps(samples: &[Sample]) -> bool {
    mean_interval(samples).is_some_and(|mean| mean <= MAX_IMPULSE_DT_MS)
}

/// Curvature energy |s[i+1] − 2 s[i] + s[i−1]|² of a 3-axis stream at each
/// interior sample, with its time; prefix sums for window queries.
struct Curvature {
    times: Vec<f64>,
    prefix: Vec<f64>,
}

impl Curvature {
    fn new(samples: &[Sample]) -> Self {
        let n = samples.len().saturating_sub(2);
        // Sized once and written by index: pushing in the loop kept every
        // value in memory across the possible reallocation.
        let mut times = vec![0.0; n];
        let mut prefix = vec![0.0; n + 1];
        let mut running = 0.0;
        for (i, w) in samples.windows(3).enumerate().take(n) {
            let d = |a: f64, b: f64, c: f64| c - 2.0 * b + a;
            let (x, y, z) = (
                d(w[0].x, w[1].x, w[2].x),
                d(w[0].y, w[1].y, w[2].y),
                d(w[0].z, w[1].z, w[2].z),
            );
            times[i] = w[1].t;
            running += x * x + y * y + z * z;
            prefix[i + 1] = running;
        }
        Self { times, prefix }
    }

    /// The largest single curvature energy in samples `lo..hi`.
    fn peak(&self, lo: usize, hi: usize) -> f64 {
        (lo..hi)
            .map(|i| self.prefix[i + 1] - self.prefix[i])
            .fold(0.0, f64::max)
    }

    /// [`Self::around`] at each of `instants` (sorted), in one sweep.
    fn sweep(&self, instants: &[f64]) -> Vec<Option<f64>> {
        let (Some(&first), Some(&last)) = (self.times.first(), self.times.last()) else {
            return vec![None; instants.len()];
        };
        let (mut lo, mut hi) = (0, 0);
        instants
            .iter()
            .map(|&at| {
                let (from, to) = (at - IMPULSE_LEAD_MS, at + IMPULSE_AFTER_MS);
                if from < first || to > last {
                    return None;
                }
                while lo < self.times.len() && self.times[lo] < from {
                    lo += 1;
                }
                while hi < self.times.len() && self.times[hi] <= to {
                    hi += 1;
                }
                Some(self.peak(lo, hi.max(lo)))
            })
            .collect()
    }

    /// Energy in [at − lead, at + after]; `None` unless the span lies inside
    /// the stream (a window cut by the edge would rank low unfairly).
    fn around(&self, at: f64) -> Option<f64> {
        let (first, last) = (*self.times.first()?, *self.times.last()?);
        let (from, to) = (at - IMPULSE_LEAD_MS, at + IMPULSE_AFTER_MS);
        if from < first || to > last {
            return None;
        }
        let lo = self.times.partition_point(|&t| t < from);
        let hi = self.times.partition_point(|&t| t <= to);
        Some(self.peak(lo, hi))
    }
}

/// Ranks each touch-down's curvature energy among the same statistic at the
/// window's other instants (those whose span overlaps no touch), on the
/// accelerometer and, when it carries signal, the gyroscope (each scaled by
/// its background median, then summed). See the module docs.
pub fn impulse_test(heartbeat: &Heartbeat, downs: &[f64]) -> Impulses {
    impulse_test_timed(
        heartbeat,
        downs,
        timing_resolves_taps(&heartbeat.accelerometer),
    )
}

fn impulse_test_timed(heartbeat: &Heartbeat, downs: &[f64], timing_ok: bool) -> Impulses {
    let accel = &heartbeat.accelerometer;
    if downs.is_empty() || !timing_ok {
        return Impulses::default();
    }
    let gyro = &heartbeat.gyroscope;
    let accel_curvature = Curvature::new(accel);
    let gyro_curvature = (gyro.len() >= 16 && repeats(gyro) < 0.5).then(|| Curvature::new(gyro));
    let span = IMPULSE_LEAD_MS + IMPULSE_AFTER_MS;
    let instants: Vec<f64> = accel_curvature
        .times
        .iter()
        .copied()
        .filter(|&t| downs.iter().all(|&d| (t - d).abs() > span))
        .collect();
    // Each sensor's background energies, scaled by their median.
    let accel_bg = accel_curvature.sweep(&instants);
    let gyro_bg = gyro_curvature
        .as_ref()
        .map(|c| c.sweep(&instants))
        .filter(|bg| bg.iter().flatten().count() >= MIN_BACKGROUND);
    let median = |values: &[Option<f64>]| -> f64 {
        let mut buffer = [0.0f64; 256];
        let mut n = 0;
        for (slot, &v) in buffer.iter_mut().zip(values.iter().flatten()) {
            *slot = v;
            n += 1;
        }
        if n == 0 {
            return 1e-12;
        }
        let v = &mut buffer[..n];
        let mid = n / 2;
        v.select_nth_unstable_by(mid, f64::total_cmp).1.max(1e-12)
    };
    let accel_scale = median(&accel_bg);
    let gyro_scale = gyro_bg.as_deref().map(median);
    let combine = |a: Option<f64>, g: Option<Option<f64>>| -> Option<f64> {
        let a = a? / accel_scale;
        match (g, gyro_scale) {
            (Some(g), Some(scale)) => Some(a + g? / scale),
            _ => Some(a),
        }
    };
    let mut background: Vec<f64> = accel_bg
        .iter()
        .enumerate()
        .filter_map(|(i, &a)| combine(a, gyro_bg.as_ref().map(|g| g[i])))
        .collect();
    if background.len() < MIN_BACKGROUND {
        return Impulses::default();
    }
    let m = background.len() as f64;
    let mut result = Impulses::default();
    let (mut hit_energy, mut hits) = (0.0, 0u32);
    for &d in downs {
        let gyro_energy = gyro_bg
            .as_ref()
            .and(gyro_curvature.as_ref())
            .map(|c| c.around(d));
        let Some(energy) = combine(accel_curvature.around(d), gyro_energy) else {
            continue;
        };
        let below = background.iter().filter(|&&b| b < energy).count();
        let equal = background.iter().filter(|&&b| b == energy).count();
        let rank = (below as f64 + 0.5 * equal as f64) / m;
        let bin = IMPULSE_BIN_EDGES.partition_point(|&edge| rank >= edge);
        result.bins[bin] = result.bins[bin].saturating_add(1);
        if bin >= IMPULSE_STOOD_OUT {
            hit_energy += energy * accel_scale;
            hits += 1;
        }
    }
    if hits > 0 {
        result.hit_level = Some((hit_energy / f64::from(hits)).max(1e-12).ln());
    }
    // Ranks are counted; only now may the background be reordered.
    let q90_at = (background.len() * 9 / 10).min(background.len() - 1);
    let q90 = *background.select_nth_unstable_by(q90_at, f64::total_cmp).1;
    result.background_level = Some((q90 * accel_scale).max(1e-12).ln());
    result
}

fn straightness(touches: &[Touch]) -> (f64, usize) {
    let mut total = 0.0;
    let mut gestures = 0;
    let mut points: Vec<(f64, f64)> = Vec::new();
    let mut flush = |points: &mut Vec<(f64, f64)>| {
        if points.len() >= 3 {
            let path: f64 = points
                .windows(2)
                .map(|w| ((w[1].0 - w[0].0).powi(2) + (w[1].1 - w[0].1).powi(2)).sqrt())
                .sum();
            let (first, last) = (points[0], points[points.len() - 1]);
            let chord = ((last.0 - first.0).powi(2) + (last.1 - first.1).powi(2)).sqrt();
            if path > 1e-6 {
                total += (chord / path).min(1.0);
                gestures += 1;
            }
        }
        points.clear();
    };
    for touch in touches {
        match touch.action {
            TouchAction::Down => {
                flush(&mut points);
                points.push((touch.x, touch.y));
            }
            TouchAction::Move => points.push((touch.x, touch.y)),
            TouchAction::Up => {
                points.push((touch.x, touch.y));
                flush(&mut points);
            }
        }
    }
    flush(&mut points);
    if gestures == 0 {
        (0.0, 0)
    } else {
        (total / gestures as f64, gestures)
    }
}

fn dwell_times(touches: &[Touch]) -> Vec<f64> {
    let mut dwell = Vec::new();
    let mut down_at = None;
    for touch in touches {
        match touch.action {
            TouchAction::Down => down_at = Some(touch.t),
            TouchAction::Up => {
                if let Some(start) = down_at.take() {
                    dwell.push(touch.t - start);
                }
            }
            TouchAction::Move => {}
        }
    }
    dwell
}

/// The fingerprint of the window's accelerometer samples, as
/// [`Features::fingerprint`] reports it (none for short or flat windows) —
/// without computing the other features.
pub fn window_fingerprint(heartbeat: &Heartbeat) -> Option<u64> {
    fingerprint_unless_flat(&heartbeat.accelerometer, repeats(&heartbeat.accelerometer))
}

fn fingerprint_unless_flat(samples: &[Sample], repeats: f64) -> Option<u64> {
    if repeats > 0.9 {
        None
    } else {
        fingerprint(samples)
    }
}

fn fingerprint(samples: &[Sample]) -> Option<u64> {
    let first = samples.first()?;
    if samples.len() < 8 {
        return None;
    }
    // Quantised relative to the first sample, so a replay shifted by a
    // constant offset (or re-timed from zero) hashes the same. Rounded half
    // away from zero without a libm call (`f64::round` is one on baseline
    // x86-64, and this runs 300 times per heartbeat).
    let q = |v: f64| {
        let scaled = v * 1e4;
        (scaled + 0.5f64.copysign(scaled)) as i64
    };
    let mut hash = FINGERPRINT_SEED ^ samples.len() as u64;
    for s in samples {
        for v in [q(s.x - first.x), q(s.y - first.y), q(s.z - first.z)] {
            hash = mix(hash, v);
        }
    }
    Some(hash)
}

/// Touch events a trace needs before its fingerprint means anything.
const MIN_TRACE_EVENTS: usize = 4;

/// The fingerprint of a window's touch trace: every event's position,
/// pressure, contact size and action, in order — not its times, so a trace
/// re-timed or shifted hashes the same. A person never lands four events
/// on the same points with the same pressures twice; a recording resent
/// does, whatever noise is added to its sensors. `None` below
/// [`MIN_TRACE_EVENTS`] events (one tap on one button can repeat) and for
/// traces with constant pressure and size (machine input: the touch
/// statistics judge those, and they may repeat by design).
pub fn touch_fingerprint(touches: &[Touch]) -> Option<u64> {
    let first = touches.first()?;
    if touches.len() < MIN_TRACE_EVENTS
        || touches
            .iter()
            .all(|t| t.pressure == first.pressure && t.size == first.size)
    {
        return None;
    }
    let q = |v: f64| {
        let scaled = v * 1e5;
        (scaled + 0.5f64.copysign(scaled)) as i64
    };
    let mut hash = FINGERPRINT_SEED ^ (touches.len() as u64).rotate_left(32);
    for t in touches {
        for v in [q(t.x), q(t.y), q(t.pressure), q(t.size), t.action as i64] {
            hash = mix(hash, v);
        }
    }
    Some(hash)
}

/// Start of the window hash.
const FINGERPRINT_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One step of the window hash: multiply-xorshift over each quantised value.
/// Fixed here on purpose: fingerprints are stored (per device, and across
/// devices for a day), and `DefaultHasher`'s algorithm may change between
/// Rust releases. Not a cryptographic hash — it need not be: a replay
/// detector only needs equal windows to collide and different ones not to.
fn mix(hash: u64, value: i64) -> u64 {
    let x = (hash ^ value as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Extracts the features of one heartbeat.
pub fn extract(heartbeat: &Heartbeat) -> Features {
    let accel = &heartbeat.accelerometer;
    let gyro = &heartbeat.gyroscope;
    let mags: Vec<f64> = accel.iter().map(Sample::magnitude).collect();
    let (_, accel_motion) = mean_std(mags.iter().copied());
    let (d1, d2) = difference_energies(&mags);
    let accel_hf = d1 / std::f64::consts::SQRT_2;
    let accel_roughness = if d1 > 1e-12 { d2 / d1 } else { 0.0 };
    let gyro_mags: Vec<f64> = gyro.iter().map(Sample::magnitude).collect();
    let gyro_energy = if gyro_mags.is_empty() {
        0.0
    } else {
        (gyro_mags.iter().map(|m| m * m).sum::<f64>() / gyro_mags.len() as f64).sqrt()
    };
    let touches = &heartbeat.touches;
    let downs: Vec<f64> = touches
        .iter()
        .filter(|t| t.action == TouchAction::Down)
        .map(|t| t.t)
        .collect();
    let intervals: Vec<f64> = downs.windows(2).map(|w| w[1] - w[0]).collect();
    let pressure_entropy = normalized_entropy(touches.iter().map(|t| t.pressure), 0.0, 1.0, 16);
    let size_entropy = normalized_entropy(touches.iter().map(|t| t.size), 0.0, 0.2, 16);
    let (_, pressure_std) = mean_std(touches.iter().map(|t| t.pressure));
    let (_, size_std) = mean_std(touches.iter().map(|t| t.size));
    let (straightness, gestures) = straightness(touches);
    let repeats_accel = repeats(accel);
    let interval = mean_interval(accel);
    let timing_ok = interval.is_some_and(|mean| mean <= MAX_IMPULSE_DT_MS);
    Features {
        accel_samples: accel.len(),
        accel_motion,
        accel_hf,
        accel_roughness,
        accel_repeats: repeats_accel,
        gravity_drift: gravity_drift(accel),
        gyro_samples: gyro.len(),
        gyro_energy,
        gyro_repeats: repeats(gyro),
        touch_downs: downs.len(),
        touch_events: touches.len(),
        touch_coupling: touch_coupling(heartbeat),
        impulses: impulse_test_timed(heartbeat, &downs, timing_ok),
        timing_resolves_taps: timing_ok,
        evenly_spaced: interval.is_some(),
        touch_surface_entropy: (pressure_entropy + size_entropy) / 2.0,
        touch_timing_entropy: (normalized_entropy(
            dwell_times(touches).into_iter(),
            0.0,
            400.0,
            16,
        ) + normalized_entropy(intervals.iter().copied(), 0.0, 2000.0, 16))
            / 2.0,
        pressure_std,
        size_std,
        rhythm_cv: coefficient_of_variation(intervals.iter().copied()),
        straightness,
        gestures,
        upload_rate: heartbeat.network.map(|n| n.upload_rate()),
        fingerprint: fingerprint_unless_flat(accel, repeats_accel),
        touch_fingerprint: touch_fingerprint(touches),
    }
}

/// How machine-generated a domain name looks (0 = a word, 1 = random), from
/// the entropy of its longest label's characters and its digit and
/// consonant-run share — algorithmically generated domains are long,
/// high-entropy and vowel-poor.
pub fn dga_score(domain: &str) -> f64 {
    let label = domain
        .trim_end_matches('.')
        .split('.')
        .max_by_key(|l| l.len())
        .unwrap_or("");
    let chars: Vec<char> = label.to_ascii_lowercase().chars().collect();
    if chars.len() < 8 {
        return 0.0;
    }
    let mut counts = std::collections::HashMap::new();
    for c in &chars {
        *counts.entry(*c).or_insert(0u32) += 1;
    }
    let n = chars.len() as f64;
    let entropy: f64 = counts
        .values()
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    let digits = chars.iter().filter(|c| c.is_ascii_digit()).count() as f64 / n;
    let mut longest_run = 0usize;
    let mut run = 0usize;
    for c in &chars {
        if c.is_ascii_alphabetic() && !"aeiou".contains(*c) {
            run += 1;
            longest_run = longest_run.max(run);
        } else {
            run = 0;
        }
    }
    let entropy_part = ((entropy - 2.8) / 1.0).clamp(0.0, 1.0);
    let run_part = ((longest_run as f64 - 2.0) / 3.0).clamp(0.0, 1.0);
    let length_part = ((n - 10.0) / 10.0).clamp(0.0, 1.0);
    (0.45 * entropy_part + 0.25 * run_part + 0.15 * digits.min(1.0) * 2.0 + 0.15 * length_part)
        .clamp(0.0, 1.0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::heartbeat::{
        strategies::{arb_sample, arb_touch},
        Network,
    };
    use proptest::prelude::*;

    fn still(n: usize, noise: f64, seed: u64) -> Vec<Sample> {
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0 * noise
        };
        (0..n)
            .map(|i| Sample {
                t: i as f64 * 20.0,
                x: 0.1 + next(),
                y: 0.2 + next(),
                z: 9.8 + next(),
            })
            .collect()
    }

    #[test]
    fn a_flat_window_has_no_motion_and_full_repeats() {
        let hb = Heartbeat {
            accelerometer: (0..50)
                .map(|i| Sample {
                    t: f64::from(i) * 20.0,
                    x: 0.0,
                    y: 0.0,
                    z: 9.81,
                })
                .collect(),
            ..Default::default()
        };
        let f = extract(&hb);
        assert_eq!(f.accel_motion, 0.0);
        assert_eq!(f.accel_repeats, 1.0);
        assert_eq!(f.fingerprint, None);
    }

    #[test]
    fn noise_is_rough_and_a_fine_sine_is_smooth() {
        let noisy = extract(&Heartbeat {
            accelerometer: still(100, 0.01, 7),
            ..Default::default()
        });
        assert!(noisy.accel_roughness > 1.2, "{}", noisy.accel_roughness);
        let sine: Vec<Sample> = (0..100)
            .map(|i| {
                let t = f64::from(i) * 10.0;
                Sample {
                    t,
                    x: 0.0,
                    y: 0.0,
                    z: 9.81 + 0.3 * (t / 1000.0 * std::f64::consts::TAU * 2.0).sin(),
                }
            })
            .collect();
        let smooth = extract(&Heartbeat {
            accelerometer: sine,
            ..Default::default()
        });
        assert!(smooth.accel_roughness < 0.2, "{}", smooth.accel_roughness);
    }

    #[test]
    fn a_tap_impulse_couples_and_an_injected_touch_does_not() {
        let mut accel = still(100, 0.004, 3);
        // A real tap at t = 500 ms: a sharp bump two samples later.
        accel[26].z += 0.25;
        let tap = |t: f64| Touch {
            t,
            x: 0.5,
            y: 0.5,
            pressure: 0.5,
            size: 0.05,
            action: TouchAction::Down,
        };
        let real = Heartbeat {
            accelerometer: accel,
            touches: vec![tap(500.0)],
            ..Default::default()
        };
        assert_eq!(extract(&real).touch_coupling, 1.0);
        let injected = Heartbeat {
            accelerometer: still(100, 0.004, 3),
            touches: vec![tap(500.0)],
            ..Default::default()
        };
        assert_eq!(extract(&injected).touch_coupling, 0.0);
    }

    /// A held phone: [`shaken`], with the posture drifting (gravity
    /// turning by about 0.6° over the window, one way or the other).
    pub(crate) fn held(seed: u64, strikes: &[f64]) -> Vec<Sample> {
        let turn = if seed % 2 == 0 { 0.01 } else { -0.01 };
        shaken(seed, strikes)
            .into_iter()
            .map(|s| Sample {
                x: s.x + 9.8 * turn * s.t / 2000.0,
                ..s
            })
            .collect()
    }

    /// A phone shaking without turning: 10 Hz tremor of 0.1 m/s² plus
    /// noise, 50 Hz, gravity fixed, with a tap strike (0.5 m/s² ringing at
    /// 25 Hz) 10 ms after each of `strikes` — what a simulated sensor with a
    /// "tremor" gives (a hand also turns the phone).
    pub(crate) fn shaken(seed: u64, strikes: &[f64]) -> Vec<Sample> {
        let noise = still(100, 0.01, seed);
        noise
            .iter()
            .map(|s| {
                let t = s.t;
                let tremor = 0.1 * (std::f64::consts::TAU * 10.0 * t / 1000.0 + seed as f64).sin();
                let strike: f64 = strikes
                    .iter()
                    .map(|&d| {
                        let ms = t - d - 10.0;
                        if (0.0..60.0).contains(&ms) {
                            0.5 * (-ms / 15.0).exp()
                                * (std::f64::consts::TAU * 25.0 * ms / 1000.0).sin()
                        } else {
                            0.0
                        }
                    })
                    .sum();
                Sample {
                    t,
                    x: s.x + 0.6 * tremor,
                    y: s.y + 0.8 * tremor,
                    z: s.z + 0.3 * tremor + strike,
                }
            })
            .collect()
    }

    pub(crate) fn taps(at: &[f64]) -> Vec<Touch> {
        at.iter()
            .map(|&t| Touch {
                t,
                x: 0.5,
                y: 0.5,
                pressure: 0.5,
                size: 0.05,
                action: TouchAction::Down,
            })
            .collect()
    }

    #[test]
    fn on_a_moving_phone_real_taps_rank_top_and_injected_ones_do_not() {
        let at = [400.0, 900.0, 1500.0];
        let (mut top_real, mut top_injected, mut looks) = (0, 0, 0);
        for seed in 0..20 {
            let real = Heartbeat {
                accelerometer: held(seed, &at),
                touches: taps(&at),
                ..Default::default()
            };
            let injected = Heartbeat {
                accelerometer: held(seed, &[]),
                touches: taps(&at),
                ..Default::default()
            };
            let (r, i) = (extract(&real).impulses, extract(&injected).impulses);
            top_real += r.stood_out();
            top_injected += i.stood_out();
            looks += i.looks();
            assert!(r.hit_level.is_some() && r.background_level.is_some());
        }
        assert_eq!(looks, 60, "every touch ranked");
        assert!(top_real >= 57, "{top_real} of 60 real taps in the top bin");
        assert!(
            top_injected <= 9,
            "{top_injected} of 60 injected in the top bin"
        );
    }

    #[test]
    fn irregular_or_slow_timing_makes_the_impulse_test_abstain() {
        let at = [400.0, 900.0];
        let mut batched = held(3, &at);
        for (i, s) in batched.iter_mut().enumerate() {
            s.t = (i / 5) as f64 * 100.0 + (i % 5) as f64 * 0.2; // bursts of five
        }
        let f = extract(&Heartbeat {
            accelerometer: batched,
            touches: taps(&at),
            ..Default::default()
        });
        assert!(!f.timing_resolves_taps);
        assert_eq!(f.impulses.looks(), 0);
        let slow: Vec<Sample> = held(3, &at).into_iter().step_by(3).collect(); // ~17 Hz
        let f = extract(&Heartbeat {
            accelerometer: slow,
            touches: taps(&at),
            ..Default::default()
        });
        assert_eq!(f.impulses.looks(), 0);
    }

    const PINNED_FINGERPRINT: u64 = 0xde23_1b5a_d555_8003;

    #[test]
    fn fingerprints_are_stable_and_tell_windows_apart() {
        let window: Vec<Sample> = (0..16)
            .map(|i| Sample {
                t: f64::from(i) * 20.0,
                x: f64::from(i) * 0.0125,
                y: 9.81 - f64::from(i % 3) * 0.002,
                z: -f64::from(i % 5) * 0.0031,
            })
            .collect();
        let fp = fingerprint(&window).expect("fingerprint");
        // Stored fingerprints must mean the same after a rebuild: the value
        // for this window is pinned.
        assert_eq!(fp, fingerprint(&window.clone()).expect("again"));
        assert_eq!(fp, PINNED_FINGERPRINT, "the window hash changed: {fp:#x}");
        let mut nudged = window.clone();
        nudged[7].y += 0.0001;
        assert_ne!(
            fingerprint(&nudged),
            Some(fp),
            "one step of 1e-4 tells them apart"
        );
        let mut noise = window;
        noise[7].y += 0.000_01;
        assert_eq!(
            fingerprint(&noise),
            Some(fp),
            "below the quantum: the same window"
        );
    }

    #[test]
    fn a_replay_with_an_offset_has_the_same_fingerprint() {
        let a = still(64, 0.02, 11);
        let shifted: Vec<Sample> = a
            .iter()
            .map(|s| Sample {
                t: s.t + 5000.0,
                x: s.x + 0.5,
                y: s.y,
                z: s.z - 0.25,
            })
            .collect();
        let fa = extract(&Heartbeat {
            accelerometer: a,
            ..Default::default()
        })
        .fingerprint;
        let fb = extract(&Heartbeat {
            accelerometer: shifted,
            ..Default::default()
        })
        .fingerprint;
        assert!(fa.is_some());
        assert_eq!(fa, fb);
        let same = window_fingerprint(&Heartbeat {
            accelerometer: still(64, 0.02, 11),
            ..Default::default()
        });
        assert_eq!(same, fa, "the standalone fingerprint matches extract's");
        let other = extract(&Heartbeat {
            accelerometer: still(64, 0.02, 12),
            ..Default::default()
        })
        .fingerprint;
        assert_ne!(fa, other);
    }

    #[test]
    fn straight_machine_swipes_and_regular_rhythm_show() {
        let mut touches = Vec::new();
        for k in 0..5 {
            let t0 = f64::from(k) * 300.0;
            touches.push(Touch {
                t: t0,
                x: 0.2,
                y: 0.8,
                pressure: 1.0,
                size: 0.05,
                action: TouchAction::Down,
            });
            for j in 1..5 {
                touches.push(Touch {
                    t: t0 + f64::from(j) * 16.0,
                    x: 0.2 + 0.1 * f64::from(j),
                    y: 0.8 - 0.1 * f64::from(j),
                    pressure: 1.0,
                    size: 0.05,
                    action: TouchAction::Move,
                });
            }
            touches.push(Touch {
                t: t0 + 90.0,
                x: 0.7,
                y: 0.3,
                pressure: 1.0,
                size: 0.05,
                action: TouchAction::Up,
            });
        }
        let f = extract(&Heartbeat {
            touches,
            ..Default::default()
        });
        assert_eq!(f.touch_downs, 5);
        assert!(f.straightness > 0.999);
        assert!(f.rhythm_cv < 1e-9);
        assert_eq!(f.pressure_std, 0.0);
        assert_eq!(f.touch_surface_entropy, 0.0);
        assert_eq!(f.touch_timing_entropy, 0.0);
    }

    #[test]
    fn upload_rate_comes_from_the_counters() {
        let f = extract(&Heartbeat {
            network: Some(Network {
                tx_bytes: 10_000,
                rx_bytes: 0,
                interval_ms: 2000,
            }),
            ..Default::default()
        });
        assert_eq!(f.upload_rate, Some(5000.0));
    }

    #[test]
    fn generated_domains_score_high_and_words_low() {
        assert!(
            dga_score("xj4k9qpz7w2mvb8n.biz") > 0.6,
            "{}",
            dga_score("xj4k9qpz7w2mvb8n.biz")
        );
        assert!(dga_score("api.mybank.com") < 0.2);
        assert!(
            dga_score("googleusercontent.com") < 0.5,
            "{}",
            dga_score("googleusercontent.com")
        );
    }

    #[test]
    fn a_touch_trace_needs_four_varied_events_to_have_a_fingerprint() {
        let mut trace = taps(&[100.0, 600.0, 1100.0, 1600.0]);
        assert_eq!(
            touch_fingerprint(&trace),
            None,
            "constant pressure and size: machine input, judged elsewhere"
        );
        trace[2].pressure = 0.61;
        assert!(touch_fingerprint(&trace).is_some());
        assert_eq!(
            touch_fingerprint(&trace[..3]),
            None,
            "one gesture can repeat"
        );
    }

    proptest! {
        #[test]
        fn a_touch_trace_hashes_the_same_retimed_and_differently_moved(
            trace in proptest::collection::vec(arb_touch(), 4..30),
            shift in -400.0f64..400.0,
            moved in 0usize..30,
            nudge in 1e-4f64..0.5,
        ) {
            let Some(fp) = touch_fingerprint(&trace) else {
                // Only constant pressure and size go without one.
                prop_assert!(trace.iter().all(|t| t.pressure == trace[0].pressure && t.size == trace[0].size));
                return Ok(());
            };
            let retimed: Vec<Touch> = trace.iter().map(|t| Touch { t: t.t + shift, ..*t }).collect();
            prop_assert_eq!(touch_fingerprint(&retimed), Some(fp));
            let mut other = trace.clone();
            let i = moved % other.len();
            other[i].x = if other[i].x + nudge <= 1.0 { other[i].x + nudge } else { other[i].x - nudge };
            prop_assert_ne!(touch_fingerprint(&other), Some(fp));
        }

        #[test]
        fn features_are_finite_and_in_range(
            accel in proptest::collection::vec(arb_sample(), 0..80),
            gyro in proptest::collection::vec(arb_sample(), 0..80),
            touches in proptest::collection::vec(arb_touch(), 0..30),
        ) {
            let f = extract(&Heartbeat { accelerometer: accel, gyroscope: gyro, touches, ..Default::default() });
            for v in [f.accel_motion, f.accel_hf, f.accel_roughness, f.gravity_drift, f.gyro_energy, f.rhythm_cv] {
                prop_assert!(v.is_finite() && v >= 0.0);
            }
            for v in [f.accel_repeats, f.gyro_repeats, f.touch_coupling, f.touch_surface_entropy, f.touch_timing_entropy, f.straightness] {
                prop_assert!((0.0..=1.0).contains(&v), "{v}");
            }
            prop_assert!(f.gravity_drift <= std::f64::consts::PI + 1e-9);
        }

        #[test]
        fn impulse_ranks_cover_at_most_the_touch_downs(
            accel in proptest::collection::vec(arb_sample(), 0..200),
            gyro in proptest::collection::vec(arb_sample(), 0..200),
            touches in proptest::collection::vec(arb_touch(), 0..30),
        ) {
            let mut accel = accel;
            accel.sort_by(|a, b| a.t.total_cmp(&b.t));
            let hb = Heartbeat { accelerometer: accel, gyroscope: gyro, touches, ..Default::default() };
            let f = extract(&hb);
            prop_assert!(f.impulses.looks() as usize <= f.touch_downs);
            for level in [f.impulses.hit_level, f.impulses.background_level].into_iter().flatten() {
                prop_assert!(level.is_finite());
            }
        }

        #[test]
        fn dga_score_is_in_unit_interval(domain in "\\PC{0,80}") {
            let s = dga_score(&domain);
            prop_assert!((0.0..=1.0).contains(&s));
        }
    }
}
