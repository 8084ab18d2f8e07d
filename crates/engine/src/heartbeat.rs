//! One heartbeat: a window of sensor samples, touches, network counters and
//! context, as the device sends it (API.md "Signals and trust").
//!
//! These are plain data. Validation of limits and ranges is the server's
//! job at ingestion; the engine still never panics or returns NaN on odd
//! input (empty windows, repeated timestamps).

use serde::{Deserialize, Serialize};

/// `[t_ms, x, y, z]`: milliseconds from the window start, then the three
/// axes (m/s² with gravity for the accelerometer, rad/s for the gyroscope).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "[f64; 4]", into = "[f64; 4]")]
pub struct Sample {
    /// Milliseconds from the window start.
    pub t: f64,
    /// X axis.
    pub x: f64,
    /// Y axis.
    pub y: f64,
    /// Z axis.
    pub z: f64,
}

impl From<[f64; 4]> for Sample {
    fn from([t, x, y, z]: [f64; 4]) -> Self {
        Self { t, x, y, z }
    }
}

impl From<Sample> for [f64; 4] {
    fn from(s: Sample) -> Self {
        [s.t, s.x, s.y, s.z]
    }
}

impl Sample {
    /// Euclidean norm of the three axes.
    pub fn magnitude(&self) -> f64 {
        (self.x * self.x + self.y * self.y + self.z * self.z).sqrt()
    }
}

/// What a touch event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TouchAction {
    /// Finger down.
    Down,
    /// Finger moved.
    Move,
    /// Finger up.
    Up,
}

/// One touch event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Touch {
    /// Milliseconds from the window start, on the sensors' clock; non-decreasing.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 60000))]
    pub t: f64,
    /// Normalised screen x in [0, 1] (0 = the left edge).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub x: f64,
    /// Normalised screen y in [0, 1] (0 = the top edge).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub y: f64,
    /// Reported pressure (Android `getPressure()`, iOS force / maximum force), 0–10.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10))]
    pub pressure: f64,
    /// Reported contact size in [0, 1].
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub size: f64,
    /// Down, move or up.
    pub action: TouchAction,
}

/// Network counters over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Bytes the whole device sent during the interval.
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub tx_bytes: u64,
    /// Bytes the whole device received during the interval.
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub rx_bytes: u64,
    /// The interval the counters cover, in milliseconds (1–600000).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 600000))]
    pub interval_ms: u64,
}

impl Network {
    /// Upload rate in bytes per second (0 for an empty interval).
    pub fn upload_rate(&self) -> f64 {
        if self.interval_ms == 0 {
            0.0
        } else {
            self.tx_bytes as f64 * 1000.0 / self.interval_ms as f64
        }
    }
}

/// What the app knows about its surroundings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The screen is being captured or mirrored.
    #[serde(default)]
    pub screen_capture: bool,
    /// Enabled accessibility services (`package/.Service`); at most 64 of 1–255 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 64, value_type = Vec<ContextEntry>))]
    pub accessibility_services: Vec<String>,
    /// The installer of the app (e.g. `com.android.vending`), if known; at most 255 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 255))]
    pub installer: Option<String>,
    /// Hashes of installed apps (lower-case hex SHA-256); at most 64 of 1–255 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 64, value_type = Vec<ContextEntry>))]
    pub app_hashes: Vec<String>,
    /// Host names the app resolved in the window; at most 64 of 1–255 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 64, value_type = Vec<ContextEntry>))]
    pub dns: Vec<String>,
}

/// One entry of a context list: 1–255 characters (the OpenAPI document's view).
#[cfg(feature = "openapi")]
pub struct ContextEntry;

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ContextEntry {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(255))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ContextEntry {}

/// One heartbeat window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Per-device sequence number.
    pub seq: u64,
    /// Accelerometer samples.
    #[serde(default, with = "crate::compact::decimal_samples")]
    pub accelerometer: Vec<Sample>,
    /// Gyroscope samples.
    #[serde(default, with = "crate::compact::decimal_samples")]
    pub gyroscope: Vec<Sample>,
    /// Touch events.
    #[serde(default)]
    pub touches: Vec<Touch>,
    /// Network counters.
    #[serde(default)]
    pub network: Option<Network>,
    /// Context.
    #[serde(default)]
    pub context: Context,
}

/// Property-test strategies for heartbeat parts, shared by the crate's tests.
#[cfg(test)]
pub(crate) mod strategies {
    use super::{Sample, Touch, TouchAction};
    use proptest::prelude::*;

    /// Any sample within ±100 on each axis and 0–5 s.
    pub fn arb_sample() -> impl Strategy<Value = Sample> + Clone {
        (
            0.0f64..5000.0,
            -100.0f64..100.0,
            -100.0f64..100.0,
            -100.0f64..100.0,
        )
            .prop_map(|(t, x, y, z)| Sample { t, x, y, z })
    }

    /// Any touch with unit-range coordinates, pressure and size.
    pub fn arb_touch() -> impl Strategy<Value = Touch> + Clone {
        (
            0.0f64..5000.0,
            0.0f64..1.0,
            0.0f64..1.0,
            0.0f64..1.0,
            0.0f64..1.0,
            0u8..3,
        )
            .prop_map(|(t, x, y, pressure, size, a)| Touch {
                t,
                x,
                y,
                pressure,
                size,
                action: [TouchAction::Down, TouchAction::Move, TouchAction::Up][usize::from(a)],
            })
    }
}
