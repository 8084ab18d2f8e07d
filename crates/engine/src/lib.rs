//! Pure threat scoring for BlockRemote.
//!
//! This crate holds the physics and statistics that turn a device's sensor
//! windows into component risks and a trust score. It does no I/O, owns no
//! clock and spawns nothing: the server feeds it data and acts on its verdict.
//! Keeping it pure is what lets it be property-tested and benchmarked alone.

pub mod compact;
pub mod device;
pub mod features;
pub mod heartbeat;
pub mod replay;
pub mod score;
pub mod sim;
pub mod stats;

pub use device::DeviceState;
pub use heartbeat::Heartbeat;
pub use score::{
    assess, Assessment, Attestation, AttestationEvidence, Decision, IntelHits, Level, PlanTier,
    Situation,
};

/// Weights of the component risks in the global risk (API.md, "Signals and trust").
pub mod weights {
    /// Accelerometer component weight.
    pub const ACCELEROMETER: f64 = 0.4;
    /// Gyroscope component weight.
    pub const GYROSCOPE: f64 = 0.3;
    /// Touch-entropy component weight.
    pub const TOUCH_ENTROPY: f64 = 0.15;
    /// Network-spike component weight.
    pub const NETWORK_SPIKE: f64 = 0.15;
}

/// Component risks, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Components {
    /// Risk from the accelerometer (motion absent while touches arrive, flatlines…).
    pub accelerometer: f64,
    /// Risk from the gyroscope.
    pub gyroscope: f64,
    /// Risk from low-entropy, machine-like touches.
    pub touch_entropy: f64,
    /// Risk from upload spikes against the device's own baseline.
    pub network_spike: f64,
}

impl Components {
    /// `0.4·accelerometer + 0.3·gyroscope + 0.15·touch_entropy + 0.15·network_spike`,
    /// with every component clamped to `[0, 1]` first (NaN counts as full risk,
    /// so a broken input can never look safe).
    pub fn global_risk(&self) -> f64 {
        fn clamp(v: f64) -> f64 {
            if v.is_nan() {
                1.0
            } else {
                v.clamp(0.0, 1.0)
            }
        }
        weights::ACCELEROMETER * clamp(self.accelerometer)
            + weights::GYROSCOPE * clamp(self.gyroscope)
            + weights::TOUCH_ENTROPY * clamp(self.touch_entropy)
            + weights::NETWORK_SPIKE * clamp(self.network_spike)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one() {
        let all = Components {
            accelerometer: 1.0,
            gyroscope: 1.0,
            touch_entropy: 1.0,
            network_spike: 1.0,
        };
        assert!((all.global_risk() - 1.0).abs() < 1e-12);
        assert_eq!(Components::default().global_risk(), 0.0);
    }

    #[test]
    fn weighted_example_from_the_contract() {
        let c = Components {
            accelerometer: 0.10,
            gyroscope: 0.05,
            touch_entropy: 0.20,
            network_spike: 0.0,
        };
        // 0.04 + 0.015 + 0.03 + 0 = 0.085
        assert!((c.global_risk() - 0.085).abs() < 1e-12);
    }

    #[test]
    fn out_of_range_and_nan_are_clamped_towards_risk() {
        let c = Components {
            accelerometer: f64::NAN,
            gyroscope: 7.0,
            touch_entropy: -3.0,
            network_spike: 0.0,
        };
        assert!((c.global_risk() - 0.7).abs() < 1e-12);
    }
}
