//! Near-duplicate replays: a recording sent again with fresh noise added,
//! a constant offset and its start shifted by a few samples.
//!
//! The exact fingerprint (`features::window_fingerprint`) catches a window
//! resent as it was. Add noise and it no longer matches; shift the start and
//! no sample lines up. What survives is the recording's own *noise
//! realisation*: the sensor noise and hand jitter of the original are in the
//! copy too, only with more noise on top. Everything predictable in a window
//! — gravity, posture drift, a tremor or a step rhythm, which two genuine
//! windows of one hand can share — is removed first by whitening: an AR(4)
//! predictor fitted to each axis of the window itself (Levinson–Durbin)
//! leaves its prediction residual, which for genuine use is close to white
//! noise unique to that moment. Two genuine windows' residuals are then
//! uncorrelated (normalised cross-correlation ≈ N(0, 1/n) for n values),
//! while a replay's residual correlates with its original's at
//! ≈ σ²/(σ² + σ_added²) — 0.5 when the added noise is as strong as the
//! device's own, more when the original carried hand jitter.
//!
//! A window is a replay when, at some lag within ±[`MAX_LAG`] samples, the
//! correlation over the three axes with one of the device's last
//! [`KEPT`] windows exceeds [`Z_REPLAY`]/√n, and the peak is a spike (see
//! `spike_z`). For white noise a 10σ peak among 13 lags has probability
//! ~10⁻²², but whitening is imperfect (a pathological tremor's wandering
//! frequency, coarse quantisation), so the bound was set on data: in 33 000
//! pairs of genuine windows of the simulator's five genuine classes the
//! largest spike was 5.6σ, but over 3 × 600 sessions of each genuine class
//! (seeds 3, 7, 41) a bound of 8σ judged two genuine sessions replayed (a
//! heavy tremor, a phone without gyroscope; two windows each) and 9σ one;
//! 10σ none. Noisy shifted replays score 8–14σ, so the higher bound costs
//! about 5 points of their detection (docs/DETECTION.md). Below 32 samples
//! per axis (under ~16 Hz) there is too little to tell and the check
//! abstains; at 40 Hz a replay whose added noise is as strong as the
//! original's (r ≈ 0.5 over ~200 values) sits below the bound.
//!
//! Memory: [`KEPT`] windows × (1 + 3 axes × [`KEPT_SAMPLES`]) bytes (1.4 KB) per
//! device. Cost: [`KEPT`] × (2·[`MAX_LAG`] + 1) × 3 dot products of ≤ 96
//! `i16` (vectorised), about 0.9 µs per remembered window on the machine of
//! docs/BENCHMARKS.md.

use crate::{
    features::{IMPULSE_LEAD_MS, IMPULSE_WINDOW_MS},
    heartbeat::Sample,
};

/// Windows remembered per device.
pub const KEPT: usize = 5;
/// Residual samples kept per axis of each remembered window.
pub const KEPT_SAMPLES: usize = 96;
/// Largest start shift searched, in samples.
pub const MAX_LAG: usize = 6;
/// Standard deviations above chance a correlation must reach to be a replay.
pub const Z_REPLAY: f64 = 10.0;
/// Residual values compared at the least (per lag, all axes).
const MIN_OVERLAP: usize = 3 * 40;
/// Prediction order of the whitening filter (up to four sinusoids: tremor, steps and their harmonics).
const ORDER: usize = 8;
/// Residual units per standard deviation in the quantised form.
const SCALE: f64 = 48.0;
/// Residuals are clipped at 2.5σ (120 units): a few large values — an
/// unmasked bump, a glitch — that two windows happen to share at one lag
/// must not outweigh hundreds of ordinary ones, and a copy's match is in
/// the ordinary ones.
const CLIP: f64 = 120.0;
/// Bytes of one remembered window: its length per axis, then the axes.
pub const STRIDE: usize = 1 + 3 * KEPT_SAMPLES;

/// A window's whitened residual, quantised: one `i8` stream per axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residual {
    axes: [Vec<i8>; 3],
}

/// Σ a·b in four independent lanes (a single running sum is bound by the
/// latency of each addition; four let the processor overlap them).
fn lagged_dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            lanes[k] += x[k] * y[k];
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// AR(`ORDER`) coefficients of `x` (mean removed) by Levinson–Durbin; `None`
/// for a signal without variance.
fn predictor(x: &[f64]) -> Option<[f64; ORDER]> {
    let n = x.len();
    let mut r = [0.0; ORDER + 1];
    for (lag, r) in r.iter_mut().enumerate() {
        *r = lagged_dot(&x[lag..], &x[..n - lag]) / n as f64;
    }
    if r[0] <= 1e-18 {
        return None;
    }
    r[0] *= 1.0 + 1e-6; // a white-noise floor keeps the recursion stable
    let mut a = [0.0; ORDER];
    let mut error = r[0];
    for i in 0..ORDER {
        let mut acc = r[i + 1];
        for j in 0..i {
            acc -= a[j] * r[i - j];
        }
        let k = acc / error;
        let previous = a;
        a[i] = k;
        for j in 0..i {
            a[j] = previous[j] - k * previous[i - 1 - j];
        }
        error *= 1.0 - k * k;
        if error <= 0.0 || !error.is_finite() {
            return None;
        }
    }
    Some(a)
}

/// The prediction residual of one axis (`x`, mean removed in place),
/// quantised to its own deviation.
fn whiten(x: &mut [f64]) -> Option<Vec<i8>> {
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    for v in x.iter_mut() {
        *v -= mean;
    }
    let a = predictor(x)?;
    // e[t] = x[t] − Σ a[j]·x[t−1−j], one coefficient at a time over the
    // whole window (independent multiply-adds, not a chain per sample).
    let mut e = x[ORDER..].to_vec();
    for (j, &aj) in a.iter().enumerate() {
        for (et, &xt) in e.iter_mut().zip(&x[ORDER - 1 - j..]) {
            *et -= aj * xt;
        }
    }
    let power = lagged_dot(&e, &e);
    let power = power / e.len() as f64;
    if power.is_nan() || power <= 1e-24 || !power.is_finite() {
        return None;
    }
    let unit = SCALE / power.sqrt();
    Some(
        e.iter()
            .map(|&e| {
                // Rounded half away from zero without a libm call
                // (`f64::round` is one on baseline x86-64).
                let v = (e * unit).clamp(-CLIP, CLIP);
                (v + 0.5f64.copysign(v)) as i8
            })
            .collect(),
    )
}

/// The whitened residual of an accelerometer window, or `None` when it is
/// too short, mostly repeated samples, or has an axis without variance.
/// Samples near a touch-down in `downs` are zeroed (see below).
pub fn residual(samples: &[Sample], downs: &[f64]) -> Option<Residual> {
    if samples.len() < 32 {
        return None;
    }
    let repeated = samples
        .windows(2)
        .filter(|w| w[0].x == w[1].x && w[0].y == w[1].y && w[0].z == w[1].z)
        .count();
    if repeated * 10 > samples.len() * 3 {
        return None;
    }
    let mut scratch = Vec::with_capacity(samples.len());
    let mut axis = |pick: fn(&Sample) -> f64| {
        scratch.clear();
        scratch.extend(samples.iter().map(pick));
        whiten(&mut scratch)
    };
    let mut axes = [axis(|s| s.x)?, axis(|s| s.y)?, axis(|s| s.z)?];
    // A tap's impulse has the same shape every time: masked, so two genuine
    // windows do not match on their taps (a replay copies its touches, and
    // its mask moves with them).
    if !downs.is_empty() {
        for (i, sample) in samples.iter().skip(ORDER).enumerate() {
            let near_tap = downs.iter().any(|&d| {
                sample.t >= d - IMPULSE_LEAD_MS && sample.t <= d + 2.0 * IMPULSE_WINDOW_MS
            });
            if near_tap {
                for axis in &mut axes {
                    if let Some(v) = axis.get_mut(i) {
                        *v = 0;
                    }
                }
            }
        }
    }
    Some(Residual { axes })
}

fn dot(a: &[i16], b: &[i16]) -> i32 {
    // i16 × i16 → i32: vectorised (`pmaddwd`) on baseline x86-64.
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// A residual axis widened for the dot products, with what its energy over
/// a range needs: full prefix sums of squares for the query (compared at
/// many offsets), only its total and the squares near each end for a
/// remembered window (a lag only ever trims a few values off its ends).
#[derive(Default)]
struct Axis {
    values: Vec<i16>,
    squares: Vec<i32>,
    total: i32,
    head: [i32; EDGE + 1],
    tail: [i32; EDGE + 1],
}

/// Values at each end of a remembered window whose squares are summed.
const EDGE: usize = 2 * MAX_LAG + 1;

impl Axis {
    /// Refills the axis with `values` (its buffers are reused); `prefixes`
    /// keeps every prefix sum of squares.
    fn fill(&mut self, values: impl Iterator<Item = i8>, prefixes: bool) {
        self.values.clear();
        self.values.extend(values.map(i16::from));
        let v = &self.values;
        self.total = dot(v, v);
        self.squares.clear();
        if prefixes {
            self.squares.push(0);
            let mut running = 0;
            for &x in v {
                running += i32::from(x) * i32::from(x);
                self.squares.push(running);
            }
        }
        for i in 0..EDGE.min(v.len()) {
            let (h, t) = (i32::from(v[i]), i32::from(v[v.len() - 1 - i]));
            self.head[i + 1] = self.head[i] + h * h;
            self.tail[i + 1] = self.tail[i] + t * t;
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    fn energy(&self, from: usize, to: usize) -> i32 {
        if !self.squares.is_empty() {
            return self.squares[to] - self.squares[from];
        }
        let cut = self.len() - to;
        if from <= EDGE && cut <= EDGE && from + cut <= self.len() {
            self.total - self.head[from] - self.tail[cut]
        } else {
            dot(&self.values[from..to], &self.values[from..to])
        }
    }
}

/// The correlation, in deviations above chance (r·√n), between a
/// remembered window (`stored`: its axes) and `query` at the lag where it
/// peaks — if it is a *spike*. A copy of one noise realisation correlates
/// at one lag only (white noise forgets itself within a sample); what
/// whitening left of a tremor or a step rhythm correlates at many lags
/// (periodically, or broadly), so a peak whose runner-up two or more lags
/// away reaches half its height is structure, not a copy, and scores 0.
fn spike_z(stored: &[Axis; 3], query: &[Axis; 3]) -> f64 {
    let max = MAX_LAG as isize;
    // Per lag and axis: cross product, energies, count.
    let mut sums = [[(0i64, 0i64, 0i64, 0usize); 3]; 2 * MAX_LAG + 1];
    let mut zs = [0.0f64; 2 * MAX_LAG + 1];
    for ((slot, per_axis), lag) in zs.iter_mut().zip(sums.iter_mut()).zip(-max..=max) {
        for ((s, q), axis) in stored.iter().zip(query).zip(per_axis.iter_mut()) {
            // s[i] against q[i - lag].
            let from = lag.max(0) as usize;
            let to = (s.len() as isize).min(q.len() as isize + lag);
            if to <= from as isize {
                continue;
            }
            let to = to as usize;
            let (q_from, q_to) = ((from as isize - lag) as usize, (to as isize - lag) as usize);
            *axis = (
                i64::from(dot(&s.values[from..to], &q.values[q_from..q_to])),
                i64::from(s.energy(from, to)),
                i64::from(q.energy(q_from, q_to)),
                to - from,
            );
        }
        let total = per_axis.iter().fold((0, 0, 0, 0), |t, a| {
            (t.0 + a.0, t.1 + a.1, t.2 + a.2, t.3 + a.3)
        });
        if total.3 >= MIN_OVERLAP {
            *slot = z_of(total);
        }
    }
    let (peak_at, peak) =
        zs.iter().copied().enumerate().fold(
            (0, f64::MIN),
            |best, (i, z)| if z > best.1 { (i, z) } else { best },
        );
    let runner_up = zs
        .iter()
        .enumerate()
        .filter(|(i, _)| i.abs_diff(peak_at) >= 2)
        .map(|(_, z)| z.abs())
        .fold(0.0, f64::max);
    // A copy carries its noise on every axis; structure left by whitening
    // usually sits on one. Each axis must agree on its own.
    let every_axis = sums[peak_at]
        .iter()
        .all(|&axis| axis.3 < 30 || z_of(axis) >= AXIS_Z);
    if peak > 0.0 && runner_up < 0.5 * peak && every_axis {
        peak
    } else {
        0.0
    }
}

/// Deviations above chance each axis of a copy must show on its own (a
/// copy with r = 0.5 shows ~4.6σ per axis over 85 values).
const AXIS_Z: f64 = 2.0;

/// r·√n of (cross, energy, energy, n); 0 below the least overlap.
fn z_of((cross, ss, qq, n): (i64, i64, i64, usize)) -> f64 {
    if n < 30 || ss <= 0 || qq <= 0 {
        return 0.0;
    }
    let r = cross as f64 / ((ss as f64) * (qq as f64)).sqrt();
    r * (n as f64).sqrt()
}

/// True when `query` is a near-duplicate of a remembered window.
pub fn is_replay(packed: &[u8], query: &Residual) -> bool {
    let mut widened: [Axis; 3] = Default::default();
    for (axis, values) in widened.iter_mut().zip(&query.axes) {
        axis.fill(values.iter().copied(), true);
    }
    let mut stored: [Axis; 3] = Default::default();
    packed.chunks_exact(STRIDE).any(|chunk| {
        let len = usize::from(chunk[0]).min(KEPT_SAMPLES);
        for (k, axis) in stored.iter_mut().enumerate() {
            let bytes = &chunk[1 + k * KEPT_SAMPLES..1 + k * KEPT_SAMPLES + len];
            axis.fill(bytes.iter().map(|&b| b as i8), false); // two's-complement bytes
        }
        spike_z(&stored, &widened) >= Z_REPLAY
    })
}

/// Appends `residual` to `packed` (its first [`KEPT_SAMPLES`] per axis),
/// dropping the oldest beyond [`KEPT`].
pub fn remember(packed: &mut Vec<u8>, residual: &Residual) {
    let len = residual
        .axes
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .min(KEPT_SAMPLES);
    let mut chunk = vec![0u8; STRIDE];
    chunk[0] = len as u8;
    for (k, axis) in residual.axes.iter().enumerate() {
        for (i, &v) in axis.iter().take(len).enumerate() {
            chunk[1 + k * KEPT_SAMPLES + i] = v as u8;
        }
    }
    packed.extend_from_slice(&chunk);
    let excess = packed.len() / STRIDE;
    if excess > KEPT {
        packed.drain(..(excess - KEPT) * STRIDE);
    }
    packed.truncate(packed.len() / STRIDE * STRIDE);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        heartbeat::TouchAction,
        sim::{session, session_seed, Class, Rng},
    };

    fn downs(h: &crate::heartbeat::Heartbeat) -> Vec<f64> {
        h.touches
            .iter()
            .filter(|t| t.action == TouchAction::Down)
            .map(|t| t.t)
            .collect()
    }

    /// `window` sent again: the first `shift` samples dropped and the rest
    /// re-timed from 0, a constant offset, and fresh noise of `noise` m/s².
    fn noisy_copy(window: &[Sample], shift: usize, noise: f64, rng: &mut Rng) -> Vec<Sample> {
        let start = window[shift].t;
        window[shift..]
            .iter()
            .map(|s| Sample {
                t: s.t - start,
                x: s.x + 0.03 + noise * rng.normal(),
                y: s.y - 0.02 + noise * rng.normal(),
                z: s.z + noise * rng.normal(),
            })
            .collect()
    }

    #[test]
    fn genuine_windows_of_one_device_never_match_each_other() {
        let mut compared = 0;
        for class in Class::ALL.into_iter().filter(|c| !c.is_attack()) {
            for i in 0..8 {
                let s = session(class, session_seed(11, class, i), 12);
                let mut packed = Vec::new();
                for h in &s.heartbeats {
                    let Some(r) = residual(&h.accelerometer, &downs(h)) else {
                        continue;
                    };
                    assert!(
                        !is_replay(&packed, &r),
                        "{} session {i} seq {}",
                        class.name(),
                        h.seq
                    );
                    compared += packed.len() / STRIDE;
                    remember(&mut packed, &r);
                }
            }
        }
        assert!(compared > 2_000, "{compared} comparisons");
    }

    #[test]
    fn a_noisy_shifted_offset_copy_matches_its_original() {
        let (mut caught, mut tried) = (0, 0);
        for class in [
            Class::HeldInHand,
            Class::Walking,
            Class::IdleReading,
            Class::Vehicle,
        ] {
            for i in 0..10u64 {
                let s = session(class, session_seed(13, class, i as usize), 2);
                let original = &s.heartbeats[0].accelerometer;
                let mut rng = Rng::new(i);
                let copy = noisy_copy(original, 1 + (i as usize % MAX_LAG), 0.008, &mut rng);
                let mut packed = Vec::new();
                remember(&mut packed, &residual(original, &[]).expect("residual"));
                tried += 1;
                if is_replay(&packed, &residual(&copy, &[]).expect("residual")) {
                    caught += 1;
                }
            }
        }
        // Four in five at 10σ (Z_REPLAY; nine in ten at 8σ): the bound
        // is set so that no genuine pair reaches it, and a copy whose added
        // noise rivals the original's own motion falls below it.
        assert!(caught * 5 >= tried * 4, "{caught} of {tried} copies caught");
    }

    #[test]
    fn memory_is_bounded_to_the_last_windows() {
        let s = session(Class::HeldInHand, 5, 20);
        let mut packed = Vec::new();
        for h in &s.heartbeats {
            remember(
                &mut packed,
                &residual(&h.accelerometer, &[]).expect("residual"),
            );
            assert!(packed.len() <= KEPT * STRIDE);
            assert_eq!(packed.len() % STRIDE, 0);
        }
        assert_eq!(packed.len(), KEPT * STRIDE);
    }

    #[test]
    fn short_flat_or_repeated_windows_have_no_residual() {
        let flat: Vec<Sample> = (0..100)
            .map(|i| Sample {
                t: f64::from(i) * 20.0,
                x: 0.0,
                y: 0.0,
                z: 9.81,
            })
            .collect();
        assert!(residual(&flat, &[]).is_none());
        assert!(residual(&flat[..20], &[]).is_none());
    }

    proptest! {
        #[test]
        fn any_input_is_judged_without_panicking(
            samples in proptest::collection::vec(crate::heartbeat::strategies::arb_sample(), 0..256),
            packed in proptest::collection::vec(any::<u8>(), 0..(3 * STRIDE)),
        ) {
            if let Some(r) = residual(&samples, &[100.0]) {
                let _ = is_replay(&packed, &r);
                let mut kept = packed.clone();
                remember(&mut kept, &r);
                prop_assert!(kept.len() <= KEPT * STRIDE);
            }
        }

        #[test]
        fn spike_scores_are_finite_and_never_negative(seed in 0u64..500) {
            let s = session(Class::HeldInHand, seed, 2);
            let a = residual(&s.heartbeats[0].accelerometer, &[]).expect("residual");
            let b = residual(&s.heartbeats[1].accelerometer, &[]).expect("residual");
            let mut stored: [Axis; 3] = Default::default();
            let mut query: [Axis; 3] = Default::default();
            for k in 0..3 {
                stored[k].fill(a.axes[k].iter().copied().take(KEPT_SAMPLES), false);
                query[k].fill(b.axes[k].iter().copied(), true);
            }
            let z = spike_z(&stored, &query);
            prop_assert!(z.is_finite() && z >= 0.0);
        }
    }
}
