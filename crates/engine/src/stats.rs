//! Small, allocation-free statistics the features and baselines are built on.
//!
//! Every function tolerates empty input and never returns NaN for finite
//! input: a broken statistic must not be able to make a device look safe.

use serde::{Deserialize, Serialize};

/// Mean and population standard deviation of `values` (0, 0 when empty).
pub fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0);
    for v in values.clone() {
        n += 1;
        sum += v;
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    (mean, var.max(0.0).sqrt())
}

/// Coefficient of variation (std / |mean|); 0 when the mean is ~0.
pub fn coefficient_of_variation(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let (mean, std) = mean_std(values);
    if mean.abs() < 1e-12 {
        0.0
    } else {
        std / mean.abs()
    }
}

/// Shannon entropy, normalised to [0, 1], of `values` binned into `bins`
/// equal-width bins over `[lo, hi]` (values outside are clamped). 0 for
/// fewer than two values or one bin: a constant stream has no entropy.
pub fn normalized_entropy(values: impl Iterator<Item = f64>, lo: f64, hi: f64, bins: usize) -> f64 {
    const MAX_BINS: usize = 32;
    let bins = bins.clamp(1, MAX_BINS);
    let mut counts = [0u32; MAX_BINS];
    let mut n = 0u32;
    let width = (hi - lo).max(f64::MIN_POSITIVE);
    for v in values {
        let position = ((v - lo) / width * bins as f64).floor();
        let bin = if position.is_finite() {
            (position.max(0.0) as usize).min(bins - 1)
        } else {
            0
        };
        counts[bin] += 1;
        n += 1;
    }
    if n < 2 || bins < 2 {
        return 0.0;
    }
    let n = f64::from(n);
    let h: f64 = counts[..bins]
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    // The most entropy `n` values can carry in `bins` bins.
    let max = (bins as f64).min(n).log2();
    if max <= 0.0 {
        0.0
    } else {
        (h / max).clamp(0.0, 1.0)
    }
}

/// An exponentially weighted mean and variance (West's update), for a
/// device's baseline of one feature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ema {
    /// Weighted mean.
    pub mean: f64,
    /// Weighted variance.
    pub var: f64,
    /// Observations folded in (saturating).
    pub n: u32,
}

impl Ema {
    /// Folds `x` in with smoothing `alpha` (0 < alpha ≤ 1); the first
    /// observation sets the mean. Non-finite input is ignored, and values
    /// beyond ±1e12 (no feature here comes near) are clamped, so the
    /// variance cannot overflow.
    pub fn update(&mut self, x: f64, alpha: f64) {
        if !x.is_finite() {
            return;
        }
        let x = x.clamp(-1e12, 1e12);
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = alpha * diff;
            self.mean += incr;
            self.var = ((1.0 - alpha) * (self.var + diff * incr)).max(0.0);
        }
        self.n = self.n.saturating_add(1);
    }

    /// Standard deviation.
    pub fn std(&self) -> f64 {
        self.var.sqrt()
    }

    /// How many deviations `x` is above the mean, with `floor` as the least
    /// deviation assumed (a device that never varied is not infinitely
    /// surprised by a small change).
    pub fn z(&self, x: f64, floor: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        (x - self.mean) / self.std().max(floor)
    }
}

/// Bins of a [`CategoricalCusum`].
pub const CATEGORIES: usize = 5;

/// What a [`CategoricalCusum`] tests against: the `null` distribution it
/// raises the alarm for, and how the stream's own distribution is learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CusumModel {
    /// The distribution the alarm is about (summing to 1).
    pub null: [f64; CATEGORIES],
    /// What the stream is assumed to look like before it has shown itself
    /// (summing to 1) …
    pub prior: [f64; CATEGORIES],
    /// … weighing this many observations.
    pub weight: f64,
    /// Nats subtracted per observation.
    pub drag: f64,
    /// Share of the stream's own observations assumed to look like the null
    /// whatever it was taught: a learned distribution known from a few
    /// observations is over-confident, and one observation in an
    /// "impossible" bin must not weigh ln(null / ~0).
    pub contamination: f64,
}

/// A one-sided CUSUM over categorical observations: is this stream drawn
/// from a known `null` distribution rather than from the stream's own
/// learned one? The learned distribution is a Dirichlet posterior mean
/// (`prior` plus counts, the counts capped so old behaviour fades), mixed
/// with the null by the model's `contamination`; each observation in bin
/// `b` adds ln(null[b] / learned[b]) less a `drag`, and the statistic never
/// goes below 0 (old innocence is not banked).
///
/// Under the null the statistic drifts up by KL(null ‖ learned) − drag per
/// observation; under the stream's own behaviour it drifts down. When the
/// learned distribution is close to the null (the stream cannot be told
/// from it), KL is below the drag and the statistic stays near 0: the test
/// abstains instead of guessing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoricalCusum {
    counts: [f64; CATEGORIES],
    /// The CUSUM statistic (nats of evidence for the null).
    pub statistic: f64,
}

/// Counts kept before older ones are scaled down.
const MAX_COUNTS: f64 = 200.0;

impl CategoricalCusum {
    /// The learned distribution the test judges by (see the type's docs).
    pub fn learned(&self, model: &CusumModel) -> [f64; CATEGORIES] {
        let total = model.weight + self.counts.iter().sum::<f64>();
        let keep = 1.0 - model.contamination.clamp(0.0, 1.0);
        let mut q = [0.0; CATEGORIES];
        for (i, q) in q.iter_mut().enumerate() {
            let taught =
                (model.prior[i] * model.weight + self.counts[i]) / total.max(f64::MIN_POSITIVE);
            *q = keep * taught + (1.0 - keep) * model.null[i];
        }
        q
    }

    /// KL(null ‖ learned): what one observation drawn from the null tells, in nats.
    pub fn informativeness(&self, model: &CusumModel) -> f64 {
        let q = self.learned(model);
        model
            .null
            .iter()
            .zip(&q)
            .map(|(p, q)| p * (p.max(1e-12) / q.max(1e-9)).ln())
            .sum()
    }

    /// Observations seen, capped.
    pub fn observations(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Folds in `observed` (counts per bin); returns the statistic.
    pub fn observe(&mut self, observed: [u8; CATEGORIES], model: &CusumModel) -> f64 {
        let q = self.learned(model);
        for (b, &n) in observed.iter().enumerate() {
            let llr = (model.null[b].max(1e-9) / q[b].max(1e-9)).ln() - model.drag;
            for _ in 0..n {
                self.statistic = (self.statistic + llr).max(0.0);
            }
        }
        if !self.statistic.is_finite() {
            self.statistic = 0.0;
        }
        self.statistic
    }

    /// Teaches the learned distribution `observed`.
    pub fn learn(&mut self, observed: [u8; CATEGORIES]) {
        for (c, &n) in self.counts.iter_mut().zip(&observed) {
            *c += f64::from(n);
        }
        let total: f64 = self.counts.iter().sum();
        if total > MAX_COUNTS {
            let scale = MAX_COUNTS / total;
            for c in &mut self.counts {
                *c *= scale;
            }
        }
    }

    /// Forgets the accumulated evidence (not what was learned).
    pub fn reset(&mut self) {
        self.statistic = 0.0;
    }
}

/// Page–Hinkley test for an abrupt upward shift in a stream's mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PageHinkley {
    mean: f64,
    n: u32,
    cumulative: f64,
    minimum: f64,
}

impl PageHinkley {
    /// Folds `x` in; returns true when the cumulative deviation above the
    /// running mean (less `delta` per step) exceeds `lambda`, then resets.
    pub fn update(&mut self, x: f64, delta: f64, lambda: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        self.n = self.n.saturating_add(1);
        self.mean += (x - self.mean) / f64::from(self.n);
        self.cumulative += x - self.mean - delta;
        self.minimum = self.minimum.min(self.cumulative);
        if self.cumulative - self.minimum > lambda {
            *self = Self::default();
            true
        } else {
            false
        }
    }
}

/// A fixed ring of the last `N` values of one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ring<const N: usize> {
    #[serde(with = "crate::compact::f64s")]
    values: Vec<f64>,
    next: usize,
}

impl<const N: usize> Default for Ring<N> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            next: 0,
        }
    }
}

impl<const N: usize> Ring<N> {
    /// Adds `x`, overwriting the oldest value once full.
    pub fn push(&mut self, x: f64) {
        if self.values.len() < N {
            self.values.push(x);
        } else if N > 0 {
            self.values[self.next] = x;
        }
        self.next = (self.next + 1) % N.max(1);
    }

    /// Values held (at most `N`).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values, oldest position unspecified.
    pub fn values(&self) -> &[f64] {
        &self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mean_std_of_known_values() {
        let (m, s) = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].into_iter());
        assert!((m - 5.0).abs() < 1e-12);
        assert!((s - 2.0).abs() < 1e-12);
        assert_eq!(mean_std(std::iter::empty()), (0.0, 0.0));
    }

    #[test]
    fn entropy_is_zero_for_constants_and_one_for_uniform_spread() {
        assert_eq!(normalized_entropy([0.5; 20].into_iter(), 0.0, 1.0, 8), 0.0);
        let spread = (0..8).map(|i| (f64::from(i) + 0.5) / 8.0);
        assert!((normalized_entropy(spread, 0.0, 1.0, 8) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn page_hinkley_flags_a_step_not_noise() {
        let mut ph = PageHinkley::default();
        let noise = [0.1, -0.1, 0.05, -0.05, 0.0];
        for i in 0..200 {
            assert!(!ph.update(noise[i % 5], 0.05, 2.0), "noise at {i}");
        }
        let fired = (0..50).any(|_| ph.update(1.0, 0.05, 2.0));
        assert!(fired);
    }

    #[test]
    fn ring_keeps_the_last_n() {
        let mut r: Ring<3> = Ring::default();
        for x in 1..=5 {
            r.push(f64::from(x));
        }
        let mut v = r.values().to_vec();
        v.sort_by(f64::total_cmp);
        assert_eq!(v, vec![3.0, 4.0, 5.0]);
    }

    const MODEL: CusumModel = CusumModel {
        null: [0.5, 0.3, 0.15, 0.04, 0.01],
        prior: [0.4, 0.28, 0.17, 0.1, 0.05],
        weight: 8.0,
        drag: 0.25,
        contamination: 0.0,
    };

    #[test]
    fn the_cusum_rises_on_the_null_and_stays_down_on_the_learned_behaviour() {
        let mut genuine = CategoricalCusum::default();
        // A device whose touches rank high: taught, then observed again.
        for _ in 0..20 {
            genuine.learn([0, 1, 1, 1, 1]);
        }
        let mut injected = genuine;
        for _ in 0..20 {
            genuine.observe([0, 1, 1, 1, 1], &MODEL);
        }
        assert!(genuine.statistic < 1.0, "{}", genuine.statistic);
        // Uniform ranks (what injection gives): evidence within a few windows.
        let mut windows = 0;
        while injected.observe([1, 1, 0, 0, 0], &MODEL) < 6.0 {
            windows += 1;
            assert!(windows < 10, "{}", injected.statistic);
        }
        injected.reset();
        assert_eq!(injected.statistic, 0.0);
    }

    #[test]
    fn a_device_that_looks_like_the_null_accumulates_nothing() {
        let mut cusum = CategoricalCusum::default();
        for _ in 0..50 {
            cusum.learn([5, 3, 1, 1, 0]);
        }
        for _ in 0..200 {
            cusum.observe([5, 3, 1, 1, 0], &MODEL);
        }
        assert!(cusum.statistic < 1.0, "{}", cusum.statistic);
    }

    proptest! {
        #[test]
        fn entropy_is_within_unit_interval(values in proptest::collection::vec(-1e6f64..1e6, 0..200), bins in 0usize..40) {
            let h = normalized_entropy(values.iter().copied(), -10.0, 10.0, bins);
            prop_assert!((0.0..=1.0).contains(&h));
        }

        #[test]
        fn the_cusum_is_finite_never_negative_and_its_counts_bounded(
            steps in proptest::collection::vec((any::<[u8; CATEGORIES]>(), any::<bool>()), 0..100),
            contamination in 0.0f64..1.0,
        ) {
            let mut cusum = CategoricalCusum::default();
            let model = CusumModel { contamination, ..MODEL };
            for (observed, teach) in steps {
                let s = cusum.observe(observed, &model);
                prop_assert!(s.is_finite() && s >= 0.0);
                if teach {
                    cusum.learn(observed);
                }
                prop_assert!(cusum.observations() <= MAX_COUNTS + 1e-9);
                let q = cusum.learned(&model);
                prop_assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                // No observation can weigh more than ln(1 / contamination).
                if contamination > 0.0 {
                    let bound = (1.0 / contamination).ln();
                    prop_assert!(model.null.iter().zip(&q).all(|(p, q)| (p / q).ln() <= bound + 1e-9));
                }
                prop_assert!(cusum.informativeness(&model) >= -1e-9);
            }
        }

        #[test]
        fn std_is_finite_and_non_negative(values in proptest::collection::vec(-1e9f64..1e9, 0..200)) {
            let (m, s) = mean_std(values.iter().copied());
            prop_assert!(m.is_finite() && s.is_finite() && s >= 0.0);
        }

        #[test]
        fn ema_tracks_within_the_range_of_its_inputs(values in proptest::collection::vec(-1e3f64..1e3, 1..200), alpha in 0.01f64..1.0) {
            let mut e = Ema::default();
            for v in &values { e.update(*v, alpha); }
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(e.mean >= lo - 1e-9 && e.mean <= hi + 1e-9);
            prop_assert!(e.var >= 0.0 && e.var.is_finite());
        }

        #[test]
        fn ema_ignores_non_finite(x in proptest::num::f64::ANY) {
            let mut e = Ema::default();
            e.update(1.0, 0.5);
            e.update(x, 0.5);
            prop_assert!(e.mean.is_finite() && e.var.is_finite());
        }
    }
}
