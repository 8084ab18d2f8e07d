//! Synthetic device sessions for evaluation and load: genuine use and
//! attacks, generated from the physics in THREAT-MODEL.md.
//!
//! Deterministic (seeded), pure, and deliberately independent of the
//! scorer: amplitudes and rates are drawn from wide ranges per session, so
//! the engine is judged on variety, not on the generator's constants.
//!
//! Two families of classes:
//! - [`Class::ORIGINAL`], the ten classes the engine was developed against
//!   (their generation is frozen: a seed keeps producing the same session);
//! - [`Class::SHIFTED`], eight classes written afterwards from the physics
//!   alone (issue 21): remote control of a phone the victim *holds*, replays
//!   with fresh noise and a shifted start, an emulator whose HAL fakes noise
//!   and tremor, and the devices real users own (no gyroscope, batched
//!   15–25 Hz sensors, heavy tremor, padded cases, genuine screen recording).
//!   They share no code with the original sensor model: a separate model of
//!   a held phone (sensor noise densities, quantisation, timestamp jitter,
//!   posture drift, arm sway, tremor, tap impulses) in the `shifted` module,
//!   whose every range says where it comes from.
//!
//! # Corpus files (JSON Lines)
//!
//! An evaluation need not use this generator: any corpus in this format can
//! be evaluated in process (`cargo run -p blockremote-engine --example
//! evaluate -- --corpus FILE`) or through the public API (`blockremote
//! simulate --corpus FILE`), which is how an outside, held-out generator is
//! plugged in. One session per line:
//!
//! ```json
//! {"class": "attack/replay_noisy", "attack": true, "attack_start": 5, "heartbeats": [{"seq": 1, "sent_at": "2026-01-01T00:00:00.000Z", "accelerometer": [[0, 0.1, 9.8, 0.3]], "gyroscope": [], "touches": [], "network": {"tx_bytes": 1200, "rx_bytes": 5600, "interval_ms": 2000}, "context": {"screen_capture": false}}]}
//! ```
//!
//! - `class`: any label; sessions are reported per label, in order of first
//!   appearance. Every session of a label must agree on `attack`.
//! - `attack`: whether the session turns into an attack.
//! - `attack_start`: for an attack, the 0-based index in `heartbeats` of the
//!   first attack heartbeat (its `seq` − 1); `null` for genuine sessions.
//! - `heartbeats`: heartbeat bodies exactly as `POST /v1/signals/heartbeat`
//!   takes them (API.md "Signals and trust"), `seq` from 1 and increasing;
//!   `sent_at` may be omitted (the API client stamps the send time).
//!   The contract limits apply (see [`contract_violation`]).
//!
//! Scored: an attack session counts as detected when the device is locked
//! within [`DETECTION_BUDGET`] heartbeats of `attack_start` (a lock during
//! the genuine prefix is a miss); a genuine session counts when it is ever
//! locked. Each rate is reported with a 95% [`wilson`] score interval.

use serde::{Deserialize, Serialize};

use crate::heartbeat::{Context, Heartbeat, Network, Sample, Touch, TouchAction};

/// Window length of one heartbeat (ms).
pub const WINDOW_MS: f64 = 2000.0;

/// A session class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Held in a hand, tapping and scrolling.
    HeldInHand,
    /// Lying on a table; sometimes tapped, mostly idle.
    OnTable,
    /// Walking while using the app.
    Walking,
    /// In a moving vehicle.
    Vehicle,
    /// Held, reading, an occasional scroll.
    IdleReading,
    /// Remote control, obvious: uniform injected input, screen capture, big upload.
    RemoteControlObvious,
    /// Remote control, subtle: jittered input, no capture flag, low-bitrate upload.
    RemoteControlSubtle,
    /// An emulator: clean or constant sensors, machine input.
    Emulator,
    /// Replay of the device's own earlier windows.
    Replay,
    /// A bot: no sensors at all, machine input.
    Bot,
    // Shifted classes (issue 21), appended so the discriminants (and with
    // them every seed of the original classes) stay as they were.
    /// Held in hand on a phone without a gyroscope.
    NoGyroscope,
    /// Held in hand, 15–25 Hz sensors delivered in batches.
    LowRateBatched,
    /// Held by someone with essential or Parkinsonian tremor.
    HeavyTremor,
    /// Very light taps on a phone in a padded case.
    PaddedCase,
    /// A genuine user recording (and uploading) their own screen.
    ScreenRecording,
    /// Remote control while the victim holds the phone: real hand motion,
    /// human-like injected touches that never move it.
    RemoteControlHeld,
    /// Replay of the device's own earlier windows with fresh noise, a small
    /// offset and a shifted start.
    ReplayNoisy,
    /// An emulator whose sensor HAL adds noise and a synthetic tremor.
    EmulatorNoisy,
}

impl Class {
    /// The ten classes the engine was developed against, genuine first.
    pub const ORIGINAL: [Class; 10] = [
        Class::HeldInHand,
        Class::OnTable,
        Class::Walking,
        Class::Vehicle,
        Class::IdleReading,
        Class::RemoteControlObvious,
        Class::RemoteControlSubtle,
        Class::Emulator,
        Class::Replay,
        Class::Bot,
    ];

    /// The eight classes written from the physics afterwards (issue 21),
    /// genuine first.
    pub const SHIFTED: [Class; 8] = [
        Class::NoGyroscope,
        Class::LowRateBatched,
        Class::HeavyTremor,
        Class::PaddedCase,
        Class::ScreenRecording,
        Class::RemoteControlHeld,
        Class::ReplayNoisy,
        Class::EmulatorNoisy,
    ];

    /// Every class: [`Class::ORIGINAL`], then [`Class::SHIFTED`].
    pub const ALL: [Class; 18] = [
        Class::HeldInHand,
        Class::OnTable,
        Class::Walking,
        Class::Vehicle,
        Class::IdleReading,
        Class::RemoteControlObvious,
        Class::RemoteControlSubtle,
        Class::Emulator,
        Class::Replay,
        Class::Bot,
        Class::NoGyroscope,
        Class::LowRateBatched,
        Class::HeavyTremor,
        Class::PaddedCase,
        Class::ScreenRecording,
        Class::RemoteControlHeld,
        Class::ReplayNoisy,
        Class::EmulatorNoisy,
    ];

    /// A named set of classes: `original`, `shifted` or `all`.
    pub fn set(name: &str) -> Option<&'static [Class]> {
        match name {
            "original" => Some(&Self::ORIGINAL),
            "shifted" => Some(&Self::SHIFTED),
            "all" => Some(&Self::ALL),
            _ => None,
        }
    }

    /// The class named `name` (as [`Class::name`] spells it).
    pub fn from_name(name: &str) -> Option<Class> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// True for attacks.
    pub fn is_attack(self) -> bool {
        matches!(
            self,
            Class::RemoteControlObvious
                | Class::RemoteControlSubtle
                | Class::Emulator
                | Class::Replay
                | Class::Bot
                | Class::RemoteControlHeld
                | Class::ReplayNoisy
                | Class::EmulatorNoisy
        )
    }

    /// True for the classes of [`Class::SHIFTED`].
    pub fn is_shifted(self) -> bool {
        Self::SHIFTED.contains(&self)
    }

    /// A stable name.
    pub fn name(self) -> &'static str {
        match self {
            Class::HeldInHand => "genuine/held_in_hand",
            Class::OnTable => "genuine/on_table",
            Class::Walking => "genuine/walking",
            Class::Vehicle => "genuine/vehicle",
            Class::IdleReading => "genuine/idle_reading",
            Class::RemoteControlObvious => "attack/remote_control_obvious",
            Class::RemoteControlSubtle => "attack/remote_control_subtle",
            Class::Emulator => "attack/emulator",
            Class::Replay => "attack/replay",
            Class::Bot => "attack/bot",
            Class::NoGyroscope => "genuine/no_gyroscope",
            Class::LowRateBatched => "genuine/low_rate_batched",
            Class::HeavyTremor => "genuine/heavy_tremor",
            Class::PaddedCase => "genuine/padded_case",
            Class::ScreenRecording => "genuine/screen_recording",
            Class::RemoteControlHeld => "attack/remote_control_held",
            Class::ReplayNoisy => "attack/replay_noisy",
            Class::EmulatorNoisy => "attack/emulator_noisy",
        }
    }
}

/// A small deterministic PRNG (PCG-style LCG with xorshift output).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let x = self.0 ^ (self.0 >> 33);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-12);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The physical parameters of one session, drawn once.
#[derive(Debug, Clone)]
struct Body {
    rate_hz: f64,
    noise: f64,
    gyro_noise: f64,
    tremor_amp: f64,
    tremor_hz: f64,
    gyro_tremor: f64,
    gravity: [f64; 3],
    posture_speed: f64,
    step_hz: f64,
    step_amp: f64,
    vibration_amp: f64,
    tap_impulse: f64,
    taps_per_window: f64,
    upload_base: f64,
}

/// One generated session: its heartbeats and, for attacks, where the attack starts.
#[derive(Debug, Clone)]
pub struct Session {
    /// The class.
    pub class: Class,
    /// Heartbeats in order (`seq` from 1).
    pub heartbeats: Vec<Heartbeat>,
    /// Index of the first attack heartbeat (attacks only).
    pub attack_start: Option<usize>,
}

fn body(rng: &mut Rng, class: Class) -> Body {
    let tilt = rng.range(0.2, 1.2);
    let turn = rng.range(0.0, std::f64::consts::TAU);
    let g = 9.80665;
    Body {
        rate_hz: rng.range(40.0, 100.0),
        noise: rng.range(0.004, 0.015),
        gyro_noise: rng.range(0.001, 0.004),
        tremor_amp: rng.range(0.03, 0.12),
        tremor_hz: rng.range(8.0, 12.0),
        gyro_tremor: rng.range(0.02, 0.08),
        gravity: if matches!(class, Class::OnTable) {
            [0.0, 0.0, g]
        } else {
            [
                g * tilt.sin() * turn.cos(),
                g * tilt.sin() * turn.sin(),
                g * tilt.cos(),
            ]
        },
        posture_speed: rng.range(0.02, 0.12),
        step_hz: rng.range(1.5, 2.5),
        step_amp: rng.range(1.0, 3.0),
        vibration_amp: rng.range(0.05, 0.3),
        tap_impulse: rng.range(0.12, 0.5),
        taps_per_window: rng.range(1.0, 4.0),
        upload_base: rng.range(300.0, 3_000.0),
    }
}

/// Motion regime of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Motion {
    Hand,
    Table,
    Walk,
    Vehicle,
}

/// Human touches (with the impulse times they cause), or machine touches.
fn human_touches(rng: &mut Rng, b: &Body, scroll_bias: f64) -> Vec<Touch> {
    human_touches_at(rng, b.taps_per_window, scroll_bias)
}

/// Human touches at about `taps_per_window` gestures per window.
fn human_touches_at(rng: &mut Rng, taps_per_window: f64, scroll_bias: f64) -> Vec<Touch> {
    let mut touches = Vec::new();
    let count = (taps_per_window + rng.normal()).round().clamp(0.0, 6.0) as usize;
    let mut t = rng.range(50.0, 400.0);
    for _ in 0..count {
        if t > WINDOW_MS - 250.0 {
            break;
        }
        let pressure = (0.45 + 0.15 * rng.normal()).clamp(0.05, 1.0);
        let size = (0.05 + 0.015 * rng.normal()).clamp(0.005, 0.2);
        let (x, y) = (rng.range(0.1, 0.9), rng.range(0.2, 0.9));
        touches.push(Touch {
            t,
            x,
            y,
            pressure,
            size,
            action: TouchAction::Down,
        });
        let dwell = rng.range(60.0, 180.0);
        if rng.unit() < scroll_bias {
            // A curved, decelerating swipe.
            let (dx, dy) = (rng.range(-0.1, 0.1), rng.range(-0.4, -0.1));
            let bend = rng.range(-0.05, 0.05);
            for j in 1..=5 {
                let f = f64::from(j) / 5.0;
                let ease = 1.0 - (1.0 - f).powi(2);
                touches.push(Touch {
                    t: t + dwell * f,
                    x: (x
                        + dx * ease
                        + bend * (std::f64::consts::PI * f).sin()
                        + 0.004 * rng.normal())
                    .clamp(0.0, 1.0),
                    y: (y + dy * ease + 0.004 * rng.normal()).clamp(0.0, 1.0),
                    pressure: (pressure + 0.05 * rng.normal()).clamp(0.05, 1.0),
                    size: (size + 0.005 * rng.normal()).clamp(0.005, 0.2),
                    action: if j == 5 {
                        TouchAction::Up
                    } else {
                        TouchAction::Move
                    },
                });
            }
        } else {
            touches.push(Touch {
                t: t + dwell,
                x: x + 0.003 * rng.normal(),
                y: y + 0.003 * rng.normal(),
                pressure: (pressure * 0.8).clamp(0.05, 1.0),
                size,
                action: TouchAction::Up,
            });
        }
        t += dwell + rng.range(150.0, 700.0);
    }
    touches
}

fn machine_touches(rng: &mut Rng, jittered: bool) -> Vec<Touch> {
    let mut touches = Vec::new();
    let period = if jittered {
        rng.range(250.0, 450.0)
    } else {
        300.0
    };
    let mut t = 100.0;
    while t < WINDOW_MS - 200.0 {
        let (pressure, size) = if jittered {
            (rng.range(0.2, 0.8), rng.range(0.02, 0.09))
        } else {
            (1.0, 0.05)
        };
        let (x, y) = (rng.range(0.1, 0.9), rng.range(0.2, 0.9));
        touches.push(Touch {
            t,
            x,
            y,
            pressure,
            size,
            action: TouchAction::Down,
        });
        let dwell = if jittered {
            rng.range(50.0, 160.0)
        } else {
            100.0
        };
        let swipe = rng.unit() < 0.4;
        if swipe {
            let (dx, dy) = (0.0, -0.3);
            for j in 1..=5 {
                let f = f64::from(j) / 5.0;
                let wobble = if jittered { 0.01 * rng.normal() } else { 0.0 };
                touches.push(Touch {
                    t: t + dwell * f,
                    x: x + dx * f + wobble,
                    y: (y + dy * f).clamp(0.0, 1.0),
                    pressure,
                    size,
                    action: if j == 5 {
                        TouchAction::Up
                    } else {
                        TouchAction::Move
                    },
                });
            }
        } else {
            touches.push(Touch {
                t: t + dwell,
                x,
                y,
                pressure,
                size,
                action: TouchAction::Up,
            });
        }
        t += if jittered {
            dwell + rng.range(80.0, 300.0)
        } else {
            period
        };
    }
    touches
}

/// Sensor samples for one window, with tap impulses at `taps` (ms).
fn sensors(
    rng: &mut Rng,
    b: &Body,
    motion: Motion,
    window: usize,
    taps: &[f64],
) -> (Vec<Sample>, Vec<Sample>) {
    let n = ((WINDOW_MS / 1000.0) * b.rate_hz).round().clamp(8.0, 200.0) as usize;
    let dt = WINDOW_MS / n as f64;
    let phase = rng.range(0.0, std::f64::consts::TAU);
    let mut accel = Vec::with_capacity(n);
    let mut gyro = Vec::with_capacity(n);
    for i in 0..n {
        let t = i as f64 * dt;
        let abs_t = (window as f64 * WINDOW_MS + t) / 1000.0;
        let mut g = b.gravity;
        if motion != Motion::Table {
            // Posture: gravity slowly rotates between axes.
            let a = b.posture_speed * (abs_t * 0.7).sin();
            g = [
                g[0] * a.cos() - g[1] * a.sin(),
                g[0] * a.sin() + g[1] * a.cos(),
                g[2],
            ];
        }
        let (mut ax, mut ay, mut az) = (g[0], g[1], g[2]);
        let (mut gx, mut gy, mut gz) = (0.0, 0.0, 0.0);
        match motion {
            Motion::Table => {}
            Motion::Hand => {
                let tremor =
                    b.tremor_amp * (std::f64::consts::TAU * b.tremor_hz * abs_t + phase).sin();
                ax += tremor * 0.6;
                ay += tremor * 0.8;
                az += tremor * 0.3 + 0.02 * rng.normal();
                gx += b.gyro_tremor * (std::f64::consts::TAU * b.tremor_hz * abs_t).cos();
                gy += b.gyro_tremor * 0.7 * rng.normal();
            }
            Motion::Walk => {
                let step = (std::f64::consts::TAU * b.step_hz * abs_t + phase).sin();
                az += b.step_amp * step;
                ax += 0.3 * b.step_amp * (2.0 * std::f64::consts::TAU * b.step_hz * abs_t).sin();
                gx += 0.4 * step + 0.05 * rng.normal();
                gz += 0.2 * (std::f64::consts::TAU * b.step_hz * abs_t * 0.5).cos();
            }
            Motion::Vehicle => {
                let vib =
                    b.vibration_amp * (std::f64::consts::TAU * rng.range(12.0, 25.0) * abs_t).sin();
                az += vib + 0.5 * b.vibration_amp * rng.normal();
                ax += 0.3 * (abs_t * 0.3).sin(); // braking / turning
                gz += 0.05 * (abs_t * 0.2).sin() + 0.02 * rng.normal();
            }
        }
        for &tap in taps {
            let since = t - tap - 15.0;
            if (0.0..60.0).contains(&since) {
                let shape = (-since / 15.0).exp() * (since / 8.0).sin();
                az += b.tap_impulse * shape * 2.0;
                ax += b.tap_impulse * shape * 0.5;
                gx += 0.4 * b.tap_impulse * shape;
                gy += 0.2 * b.tap_impulse * shape;
            }
        }
        accel.push(Sample {
            t,
            x: ax + b.noise * rng.normal(),
            y: ay + b.noise * rng.normal(),
            z: az + b.noise * rng.normal(),
        });
        gyro.push(Sample {
            t,
            x: gx + b.gyro_noise * rng.normal(),
            y: gy + b.gyro_noise * rng.normal(),
            z: gz + b.gyro_noise * rng.normal(),
        });
    }
    (accel, gyro)
}

fn store_context() -> Context {
    Context {
        installer: Some("com.android.vending".into()),
        ..Context::default()
    }
}

fn genuine_window(rng: &mut Rng, b: &Body, class: Class, window: usize) -> Heartbeat {
    let (motion, touching, scroll) = match class {
        Class::HeldInHand => (Motion::Hand, rng.unit() < 0.85, 0.4),
        Class::OnTable => (Motion::Table, rng.unit() < 0.35, 0.3),
        Class::Walking => (Motion::Walk, rng.unit() < 0.6, 0.5),
        Class::Vehicle => (Motion::Vehicle, rng.unit() < 0.6, 0.4),
        _ => (Motion::Hand, rng.unit() < 0.3, 0.9),
    };
    let touches = if touching {
        human_touches(rng, b, scroll)
    } else {
        Vec::new()
    };
    let taps: Vec<f64> = touches
        .iter()
        .filter(|t| t.action == TouchAction::Down)
        .map(|t| t.t)
        .collect();
    let (accelerometer, gyroscope) = sensors(rng, b, motion, window, &taps);
    // Occasional genuine upload bursts (a photo, a sync).
    let burst = if rng.unit() < 0.03 {
        rng.range(20_000.0, 200_000.0)
    } else {
        0.0
    };
    let upload = (b.upload_base * rng.range(0.5, 1.5) + burst) * WINDOW_MS / 1000.0;
    Heartbeat {
        seq: 0,
        accelerometer,
        gyroscope,
        touches,
        network: Some(Network {
            tx_bytes: upload as u64,
            rx_bytes: (upload * rng.range(2.0, 10.0)) as u64,
            interval_ms: WINDOW_MS as u64,
        }),
        context: store_context(),
    }
}

fn attack_window(
    rng: &mut Rng,
    b: &Body,
    class: Class,
    window: usize,
    history: &[Heartbeat],
) -> Heartbeat {
    match class {
        Class::RemoteControlObvious | Class::RemoteControlSubtle => {
            let subtle = class == Class::RemoteControlSubtle;
            let table = Body {
                gravity: [0.0, 0.0, 9.80665],
                ..b.clone()
            };
            let (accelerometer, gyroscope) = sensors(rng, &table, Motion::Table, window, &[]);
            let upload = if subtle {
                rng.range(12_000.0, 40_000.0)
            } else {
                rng.range(150_000.0, 600_000.0)
            };
            let mut context = store_context();
            context.screen_capture = !subtle;
            Heartbeat {
                seq: 0,
                accelerometer,
                gyroscope,
                touches: machine_touches(rng, subtle),
                network: Some(Network {
                    tx_bytes: (upload * WINDOW_MS / 1000.0) as u64,
                    rx_bytes: 4_000,
                    interval_ms: WINDOW_MS as u64,
                }),
                context,
            }
        }
        Class::Emulator => {
            let n = 100;
            let clean = rng.unit() < 0.5;
            let accelerometer = (0..n)
                .map(|i| {
                    let t = i as f64 * 20.0;
                    let wave = if clean {
                        0.2 * (t / 1000.0 * std::f64::consts::TAU).sin()
                    } else {
                        0.0
                    };
                    Sample {
                        t,
                        x: 0.0,
                        y: 0.0 + wave,
                        z: 9.81,
                    }
                })
                .collect();
            let gyroscope = (0..n)
                .map(|i| Sample {
                    t: i as f64 * 20.0,
                    x: 0.0,
                    y: 0.0,
                    z: 0.0,
                })
                .collect();
            Heartbeat {
                seq: 0,
                accelerometer,
                gyroscope,
                touches: machine_touches(rng, false),
                network: Some(Network {
                    tx_bytes: 2_000,
                    rx_bytes: 8_000,
                    interval_ms: 2000,
                }),
                context: store_context(),
            }
        }
        Class::Replay => {
            // A window this device already sent, shifted by a constant offset.
            let pick =
                &history[(rng.unit() * history.len() as f64) as usize % history.len().max(1)];
            let offset = rng.range(-0.05, 0.05);
            let mut replayed = pick.clone();
            for s in &mut replayed.accelerometer {
                s.x += offset;
                s.z -= offset;
            }
            replayed
        }
        _ => Heartbeat {
            // The bot (the shifted classes have their own generator).
            seq: 0,
            accelerometer: Vec::new(),
            gyroscope: Vec::new(),
            touches: machine_touches(rng, true),
            network: Some(Network {
                tx_bytes: 1_500,
                rx_bytes: 6_000,
                interval_ms: 2000,
            }),
            context: store_context(),
        },
    }
}

/// Generates a session of `length` heartbeats. Attacks begin after a
/// genuine prefix (the device's owner using it) at a random point, so the
/// engine sees the switch, as in real fraud.
pub fn session(class: Class, seed: u64, length: usize) -> Session {
    let mut rng = Rng::new(seed);
    let b = body(&mut rng, class);
    let mut heartbeats = Vec::with_capacity(length);
    // At least one genuine heartbeat first: a replay attack replays history.
    let attack_start = class.is_attack().then(|| {
        (rng.range(3.0, 10.0) as usize)
            .min(length.saturating_sub(6))
            .max(1)
    });
    let owner = match rng.unit() {
        u if u < 0.5 => Class::HeldInHand,
        u if u < 0.8 => Class::IdleReading,
        _ => Class::OnTable,
    };
    if class.is_shifted() {
        // Drawn after the original classes' draws, so theirs are unchanged.
        return shifted::session(&mut rng, class, length, attack_start);
    }
    for window in 0..length {
        let mut hb = match attack_start {
            Some(start) if window >= start => {
                attack_window(&mut rng, &b, class, window, &heartbeats)
            }
            Some(_) => genuine_window(&mut rng, &b, owner, window),
            None => genuine_window(&mut rng, &b, class, window),
        };
        hb.seq = window as u64 + 1;
        heartbeats.push(hb);
    }
    Session {
        class,
        heartbeats,
        attack_start,
    }
}

/// Per-class outcome of an evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassReport {
    /// Sessions run.
    pub sessions: usize,
    /// Attacks: sessions locked within 5 heartbeats of the attack's start.
    /// Genuine: sessions ever locked (false locks).
    pub locked: usize,
    /// Attacks: heartbeats from the attack's start to the lock, per locked session.
    pub heartbeats_to_lock: Vec<usize>,
}

impl ClassReport {
    /// `locked / sessions`.
    pub fn rate(&self) -> f64 {
        if self.sessions == 0 {
            0.0
        } else {
            self.locked as f64 / self.sessions as f64
        }
    }

    /// The 95% Wilson score interval of [`ClassReport::rate`].
    pub fn interval(&self) -> (f64, f64) {
        wilson(self.locked, self.sessions, Z95)
    }

    /// Counts one session whose attack (if any) starts at `attack_start`
    /// and which was first locked after heartbeat `lock` (0-based).
    pub fn add(&mut self, attack_start: Option<usize>, lock: Option<usize>) {
        self.sessions += 1;
        match (attack_start, lock) {
            (Some(start), Some(at)) if at >= start && at < start + DETECTION_BUDGET => {
                self.locked += 1;
                self.heartbeats_to_lock.push(at - start + 1);
            }
            (None, Some(_)) => self.locked += 1,
            _ => {}
        }
    }
}

/// The normal quantile for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval for `successes` out of `trials` at normal
/// quantile `z` (Wilson 1927): unlike the normal approximation it stays in
/// `[0, 1]` and is honest at rates of 0 and 1, which is where detection
/// rates live (20/20 locked still leaves a lower bound of 84%).
/// `(0, 1)` when there are no trials.
pub fn wilson(successes: usize, trials: usize, z: f64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let n = trials as f64;
    let p = successes.min(trials) as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // Exact arithmetic has lower ≤ p ≤ upper; clamping only mends rounding.
    (
        (centre - half).clamp(0.0, 1.0).min(p),
        (centre + half).clamp(0.0, 1.0).max(p),
    )
}

/// Heartbeats after an attack starts within which it must be locked.
pub const DETECTION_BUDGET: usize = 5;

/// One heartbeat of `class` as the load tools send it: 100 accelerometer
/// and 100 gyroscope samples, every value rounded to 4 decimals as phones
/// report them (~7 KB of JSON).
pub fn load_heartbeat(class: Class, seed: u64) -> Heartbeat {
    let mut hb = session(class, seed, 1).heartbeats.remove(0);
    hb.accelerometer.truncate(100);
    hb.gyroscope.truncate(100);
    let r = |v: f64| (v * 1e4).round() / 1e4;
    for s in hb.accelerometer.iter_mut().chain(hb.gyroscope.iter_mut()) {
        (s.t, s.x, s.y, s.z) = (r(s.t), r(s.x), r(s.y), r(s.z));
    }
    for t in &mut hb.touches {
        (t.t, t.x, t.y, t.pressure, t.size) = (r(t.t), r(t.x), r(t.y), r(t.pressure), r(t.size));
    }
    hb
}

/// Runs `session` through the engine (in process, with a store-installed,
/// unattested device on a paid plan) and returns the index of the first
/// lock decision, if any.
pub fn first_lock(session: &Session) -> Option<usize> {
    first_lock_of(&session.heartbeats)
}

/// [`first_lock`] for any sequence of heartbeats (of one device).
pub fn first_lock_of(heartbeats: &[Heartbeat]) -> Option<usize> {
    let mut state = crate::DeviceState::default();
    let situation = crate::Situation {
        plan: crate::PlanTier::Paid,
        ..Default::default()
    };
    heartbeats
        .iter()
        .position(|hb| crate::assess(&mut state, hb, &situation).decision != crate::Decision::Allow)
}

/// The seed of the `i`-th session of `class` in an evaluation seeded `seed`.
pub fn session_seed(seed: u64, class: Class, i: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add(i as u64 * 7919 + class as u64)
}

/// Evaluates `per_class` sessions of `length` heartbeats for every class
/// ([`Class::ALL`]).
pub fn evaluate(per_class: usize, length: usize, seed: u64) -> Vec<(Class, ClassReport)> {
    evaluate_classes(&Class::ALL, per_class, length, seed)
}

/// Evaluates `per_class` sessions of `length` heartbeats for each of `classes`.
pub fn evaluate_classes(
    classes: &[Class],
    per_class: usize,
    length: usize,
    seed: u64,
) -> Vec<(Class, ClassReport)> {
    classes
        .iter()
        .map(|&class| {
            let mut report = ClassReport::default();
            for i in 0..per_class {
                let s = session(class, session_seed(seed, class, i), length);
                report.add(s.attack_start, first_lock(&s));
            }
            (class, report)
        })
        .collect()
}

/// One line of a corpus file (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSession {
    /// The class label.
    pub class: String,
    /// Whether the session turns into an attack.
    pub attack: bool,
    /// Attacks: index of the first attack heartbeat; genuine: `None`.
    pub attack_start: Option<usize>,
    /// The heartbeats, `seq` from 1.
    pub heartbeats: Vec<Heartbeat>,
}

impl From<&Session> for CorpusSession {
    fn from(s: &Session) -> Self {
        Self {
            class: s.class.name().to_owned(),
            attack: s.class.is_attack(),
            attack_start: s.attack_start,
            heartbeats: s.heartbeats.clone(),
        }
    }
}

impl CorpusSession {
    /// Why this session is not a well-formed corpus entry, if it is not:
    /// `attack` agrees with `attack_start`, the attack starts inside the
    /// session, `seq` runs 1, 2, 3…, and every heartbeat keeps the contract.
    pub fn check(&self) -> Result<(), String> {
        match (self.attack, self.attack_start) {
            (true, None) => return Err("an attack needs an attack_start".into()),
            (false, Some(_)) => return Err("a genuine session has attack_start null".into()),
            (true, Some(start)) if start >= self.heartbeats.len() => {
                return Err(format!(
                    "attack_start {start} is past the session's {} heartbeats",
                    self.heartbeats.len()
                ))
            }
            _ => {}
        }
        for (i, hb) in self.heartbeats.iter().enumerate() {
            if hb.seq != i as u64 + 1 {
                return Err(format!(
                    "heartbeat {i} has seq {} (expected {})",
                    hb.seq,
                    i + 1
                ));
            }
            if let Some(why) = contract_violation(hb) {
                return Err(format!("heartbeat seq {}: {why}", hb.seq));
            }
        }
        Ok(())
    }
}

/// The first way `hb` breaks the heartbeat contract (API.md): at most 256
/// samples per sensor and 64 touches, non-decreasing times, touch `x`/`y`
/// in `[0, 1]`, every number finite.
pub fn contract_violation(hb: &Heartbeat) -> Option<String> {
    for (name, samples) in [
        ("accelerometer", &hb.accelerometer),
        ("gyroscope", &hb.gyroscope),
    ] {
        if samples.len() > 256 {
            return Some(format!(
                "{name} has {} samples (at most 256)",
                samples.len()
            ));
        }
        if samples.windows(2).any(|w| w[1].t < w[0].t) {
            return Some(format!("{name} times decrease"));
        }
        if samples
            .iter()
            .any(|s| ![s.t, s.x, s.y, s.z].iter().all(|v| v.is_finite()))
        {
            return Some(format!("{name} has a non-finite number"));
        }
    }
    if hb.touches.len() > 64 {
        return Some(format!("{} touches (at most 64)", hb.touches.len()));
    }
    if hb.touches.windows(2).any(|w| w[1].t < w[0].t) {
        return Some("touch times decrease".into());
    }
    if hb.touches.iter().any(|t| {
        ![t.t, t.x, t.y, t.pressure, t.size]
            .iter()
            .all(|v| v.is_finite())
            || !(0.0..=1.0).contains(&t.x)
            || !(0.0..=1.0).contains(&t.y)
    }) {
        return Some("a touch is out of range".into());
    }
    None
}

/// Evaluates a corpus in process: per class label, in order of first
/// appearance, whether it is an attack class and its report.
pub fn evaluate_corpus<'a>(
    sessions: impl IntoIterator<Item = &'a CorpusSession>,
) -> Vec<(String, bool, ClassReport)> {
    let mut out: Vec<(String, bool, ClassReport)> = Vec::new();
    for s in sessions {
        let lock = first_lock_of(&s.heartbeats);
        let at = match out.iter().position(|(name, ..)| *name == s.class) {
            Some(at) => at,
            None => {
                out.push((s.class.clone(), s.attack, ClassReport::default()));
                out.len() - 1
            }
        };
        out[at].2.add(s.attack_start, lock);
    }
    out
}

/// The shifted classes (issue 21): a model of a held phone written from the
/// physics in THREAT-MODEL.md, independent of the original sensor model and
/// of the engine's thresholds. Every range below is drawn once per session
/// (device, hand, user, attacker) and says where it comes from.
mod shifted {
    use std::f64::consts::TAU;

    use super::{
        human_touches_at, machine_touches, store_context, Class, Context, Heartbeat, Network, Rng,
        Sample, Session, Touch, TouchAction, WINDOW_MS,
    };

    /// Standard gravity (m/s²).
    const G: f64 = 9.80665;

    /// `amp · sin(2π·hz·t + phase)`, t in seconds.
    #[derive(Debug, Clone, Copy)]
    struct Wave {
        amp: f64,
        hz: f64,
        phase: f64,
    }

    impl Wave {
        fn draw(rng: &mut Rng, amp: (f64, f64), hz: (f64, f64)) -> Self {
            Self {
                amp: rng.range(amp.0, amp.1),
                hz: rng.range(hz.0, hz.1),
                phase: rng.range(0.0, TAU),
            }
        }

        fn at(&self, t: f64) -> f64 {
            self.amp * (TAU * self.hz * t + self.phase).sin()
        }

        /// The time derivative (per second).
        fn rate(&self, t: f64) -> f64 {
            self.amp * TAU * self.hz * (TAU * self.hz * t + self.phase).cos()
        }
    }

    /// A random direction, `bias` weighting the device's z axis (the
    /// screen's normal).
    fn direction(rng: &mut Rng, bias: f64) -> [f64; 3] {
        let v = [rng.normal(), rng.normal(), rng.normal() + bias];
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-9);
        [v[0] / n, v[1] / n, v[2] / n]
    }

    /// The phone's inertial sensors.
    #[derive(Debug, Clone)]
    pub(super) struct Sensors {
        /// Output data rate (Hz). Apps ask for `SENSOR_DELAY_GAME` (50 Hz)
        /// to `FASTEST`; 25–125 Hz keeps a 2 s window within the contract's
        /// 256 samples. Batched low-end devices: 15–25 Hz (issue 21).
        rate_hz: f64,
        /// Timestamp jitter, as a fraction of the sample period (Android
        /// sensor timestamps jitter by up to a few ms): 0–0.3.
        jitter: f64,
        /// Accelerometer white noise (m/s² rms): a noise density of
        /// 80–400 µg/√Hz (MEMS datasheets: BMI160 180, LSM6DS3 90, cheap
        /// parts up to ~400) over the output bandwidth, about rate/2.
        accel_noise: f64,
        /// Gyroscope white noise (rad/s rms): 0.005–0.03 °/s/√Hz over rate/2.
        gyro_noise: f64,
        /// Quantisation step: 16-bit output over a ±2…±16 g full scale.
        accel_lsb: f64,
        /// Quantisation step: 16-bit output over ±250…±2000 °/s.
        gyro_lsb: f64,
        /// Residual zero offset after calibration: ±0.15 m/s² per axis
        /// (datasheet zero-g offsets are ±0.2–0.5 m/s² before calibration).
        accel_bias: [f64; 3],
        /// Residual gyroscope bias after Android's online bias estimation:
        /// ±0.005 rad/s per axis.
        gyro_bias: [f64; 3],
        /// Whether the phone has a gyroscope (many low-end phones do not).
        gyroscope: bool,
        /// Sensor batching: mean samples per delivered batch (3–10, i.e.
        /// 0.15–0.5 s of FIFO latency at 20 Hz); `None` when not batched.
        batch: Option<f64>,
    }

    impl Sensors {
        fn draw(rng: &mut Rng, class: Class) -> Self {
            let batched = class == Class::LowRateBatched;
            let rate_hz = if batched {
                rng.range(15.0, 25.0)
            } else {
                rng.range(25.0, 125.0)
            };
            let bandwidth = (rate_hz / 2.0).sqrt();
            let accel_noise = rng.range(80e-6, 400e-6) * G * bandwidth;
            let gyro_noise = rng.range(0.005_f64, 0.03).to_radians() * bandwidth;
            let accel_fs = [2.0, 4.0, 8.0, 16.0][(rng.unit() * 4.0) as usize % 4];
            let gyro_fs = [250.0_f64, 500.0, 1000.0, 2000.0][(rng.unit() * 4.0) as usize % 4];
            Self {
                rate_hz,
                jitter: rng.range(0.0, 0.3),
                accel_noise,
                gyro_noise,
                accel_lsb: 2.0 * accel_fs * G / 65_536.0,
                gyro_lsb: (2.0 * gyro_fs).to_radians() / 65_536.0,
                accel_bias: [0; 3].map(|_| rng.range(-0.15, 0.15)),
                gyro_bias: [0; 3].map(|_| rng.range(-0.005, 0.005)),
                gyroscope: class != Class::NoGyroscope,
                batch: batched.then(|| rng.range(3.0, 10.0)),
            }
        }
    }

    /// What a finger landing on (and lifting from) the phone does to it.
    #[derive(Debug, Clone)]
    struct Impulse {
        /// Peak specific force of the strike along the screen normal (m/s²).
        amp: f64,
        /// Decay time of the strike's ringing (ms).
        tau_ms: f64,
        /// Frequency of the ringing (Hz).
        hz: f64,
        /// The hand yielding: a slower push, relative to `amp`.
        push: f64,
        /// Rise time of the push (ms).
        push_ms: f64,
        /// The lift-off rebound, relative to the strike.
        lift: f64,
        /// Angular rate per m/s² of strike ((rad/s)/(m/s²)).
        gyro_per_accel: f64,
        /// Touch-panel vs. sensor clock offset (ms): the panel reports a
        /// contact 10–30 ms after it happens and the clocks differ by a few
        /// ms, so the impulse starts between 10 ms before and 20 ms after
        /// the reported touch.
        lag_ms: f64,
        /// The hand's compliance axis: the rotation a centred tap causes.
        axis: [f64; 3],
    }

    impl Impulse {
        /// A bare phone: a tap on a held phone peaks at ~0.15–1.2 m/s²
        /// (touch-inference studies of held phones see tenths of m/s² to a
        /// few m/s²), ringing at 15–40 Hz (the hand–phone resonance) for
        /// 8–25 ms.
        fn firm(rng: &mut Rng) -> Self {
            Self {
                amp: rng.range(0.15, 1.2),
                tau_ms: rng.range(8.0, 25.0),
                hz: rng.range(15.0, 40.0),
                push: rng.range(0.2, 0.5),
                push_ms: rng.range(30.0, 80.0),
                lift: rng.range(0.1, 0.4),
                // A tap a few cm off the grip's axis, r ≈ 3–10 cm: the
                // angular rate reached over the strike is about a·τ/r.
                gyro_per_accel: rng.range(0.1, 0.5),
                lag_ms: rng.range(-10.0, 20.0),
                axis: direction(rng, 0.0),
            }
        }

        /// A very light tap through a padded case: the padding (a soft
        /// low-pass between finger and phone) damps and smears the strike:
        /// 0.03–0.15 m/s², ringing at 4–10 Hz for 40–100 ms.
        fn padded(rng: &mut Rng) -> Self {
            Self {
                amp: rng.range(0.03, 0.15),
                tau_ms: rng.range(40.0, 100.0),
                hz: rng.range(4.0, 10.0),
                push: rng.range(0.1, 0.3),
                push_ms: rng.range(80.0, 160.0),
                lift: rng.range(0.05, 0.2),
                gyro_per_accel: rng.range(0.05, 0.3),
                lag_ms: rng.range(-10.0, 20.0),
                axis: direction(rng, 0.0),
            }
        }

        /// The strike's shape `ms` after onset, peaking near 1.
        fn shape(&self, ms: f64) -> f64 {
            if !(0.0..600.0).contains(&ms) {
                return 0.0;
            }
            let ring = (-ms / self.tau_ms).exp() * (TAU * self.hz * ms / 1000.0).sin();
            let x = ms / self.push_ms;
            ring + self.push * x * (1.0 - x).exp()
        }
    }

    /// One impulse in a window: onset (ms), weight, where on the screen.
    #[derive(Debug, Clone, Copy)]
    struct Tap {
        onset: f64,
        weight: f64,
        x: f64,
        y: f64,
    }

    /// The hand holding the phone.
    #[derive(Debug, Clone)]
    struct Hand {
        /// Pitch (rad) of the screen from horizontal: 0.2–1.3 (10°–75°,
        /// from reading on a lap to holding it up).
        pitch: f64,
        /// Roll (rad): ±0.3.
        roll: f64,
        /// Posture drift of pitch, roll and yaw (two components each):
        /// 0.01–0.08 rad at 0.05–0.4 Hz, so gravity slowly rotates between
        /// the axes by up to ~0.8 m/s².
        drift: [Wave; 6],
        /// Arm sway, per accelerometer axis: three components of
        /// 0.007–0.05 m/s² at 0.3–3 Hz (band-limited low-frequency motion).
        sway: [[Wave; 3]; 3],
        /// Rotational sway, per gyroscope axis: 0.003–0.02 rad/s at 0.3–3 Hz.
        sway_gyro: [[Wave; 2]; 3],
        /// Tremor frequency: physiological 8–12 Hz; essential or
        /// Parkinsonian tremor 4–12 Hz.
        tremor_hz: f64,
        /// Tremor peak acceleration: physiological ~0.015–0.12 m/s² (a
        /// held phone's accelerometer sees hundredths to a tenth of m/s²);
        /// pathological 0.2–1.0 m/s² (issue 21).
        tremor_amp: f64,
        tremor_dir: [f64; 3],
        /// Tremor angular rate: a/(2π·f·r) for a phone r = 4–12 cm from the
        /// wrist's axis.
        tremor_gyro: f64,
        tremor_gyro_dir: [f64; 3],
        /// Tremor is not a pure sine: its phase wanders (0.5–2 rad at
        /// 0.1–0.5 Hz, i.e. ±0.1–1 Hz of frequency) …
        tremor_fm: Wave,
        /// … and its amplitude waxes and wanes (depth 20–60% at 0.1–0.5 Hz).
        tremor_am: Wave,
        tremor_phase: f64,
        impulse: Impulse,
        /// Strike direction: mostly along the screen's normal.
        strike_dir: [f64; 3],
    }

    impl Hand {
        fn draw(rng: &mut Rng, class: Class) -> Self {
            let heavy = class == Class::HeavyTremor;
            let tremor_hz = if heavy {
                rng.range(4.0, 12.0)
            } else {
                rng.range(8.0, 12.0)
            };
            let tremor_amp = if heavy {
                rng.range(0.2, 1.0)
            } else {
                rng.range(0.015, 0.12)
            };
            let r = rng.range(0.04, 0.12);
            let impulse = if class == Class::PaddedCase {
                Impulse::padded(rng)
            } else {
                Impulse::firm(rng)
            };
            Self {
                pitch: rng.range(0.2, 1.3),
                roll: rng.range(-0.3, 0.3),
                drift: [0; 6].map(|_| Wave::draw(rng, (0.01, 0.08), (0.05, 0.4))),
                sway: [0; 3].map(|_| [0; 3].map(|_| Wave::draw(rng, (0.007, 0.05), (0.3, 3.0)))),
                sway_gyro: [0; 3]
                    .map(|_| [0; 2].map(|_| Wave::draw(rng, (0.003, 0.02), (0.3, 3.0)))),
                tremor_hz,
                tremor_amp,
                tremor_dir: direction(rng, 1.0),
                tremor_gyro: tremor_amp / (TAU * tremor_hz * r),
                tremor_gyro_dir: direction(rng, 0.0),
                tremor_fm: Wave::draw(rng, (0.5, 2.0), (0.1, 0.5)),
                tremor_am: Wave::draw(rng, (0.1, 0.3), (0.1, 0.5)),
                tremor_phase: rng.range(0.0, TAU),
                impulse,
                strike_dir: direction(rng, 3.0),
            }
        }

        /// Specific force (m/s², gravity included) and angular rate (rad/s)
        /// at `t` seconds into the session, `local` ms into the window,
        /// with the window's `taps`.
        fn at(&self, t: f64, local: f64, taps: &[Tap]) -> ([f64; 3], [f64; 3]) {
            let d = &self.drift;
            let pitch = self.pitch + d[0].at(t) + d[1].at(t);
            let roll = self.roll + d[2].at(t) + d[3].at(t);
            let mut a = [
                G * pitch.cos() * roll.sin(),
                G * pitch.sin(),
                G * pitch.cos() * roll.cos(),
            ];
            let mut w = [
                d[0].rate(t) + d[1].rate(t),
                d[2].rate(t) + d[3].rate(t),
                d[4].rate(t) + d[5].rate(t),
            ];
            for k in 0..3 {
                a[k] += self.sway[k].iter().map(|s| s.at(t)).sum::<f64>();
                w[k] += self.sway_gyro[k].iter().map(|s| s.at(t)).sum::<f64>();
            }
            let envelope = 1.0 - self.tremor_am.amp + self.tremor_am.at(t);
            let phase = TAU * self.tremor_hz * t + self.tremor_fm.at(t) + self.tremor_phase;
            let (tremor_a, tremor_w) = (
                self.tremor_amp * envelope * phase.sin(),
                self.tremor_gyro * envelope * phase.cos(),
            );
            for k in 0..3 {
                a[k] += tremor_a * self.tremor_dir[k];
                w[k] += tremor_w * self.tremor_gyro_dir[k];
            }
            let imp = &self.impulse;
            for tap in taps {
                let s = imp.shape(local - tap.onset) * tap.weight * imp.amp;
                if s == 0.0 {
                    continue;
                }
                // An off-centre tap tips the phone about the other axis.
                let torque = [
                    1.4 * (0.5 - tap.y) + 0.3 * imp.axis[0],
                    1.4 * (tap.x - 0.5) + 0.3 * imp.axis[1],
                    0.3 * imp.axis[2],
                ];
                for k in 0..3 {
                    a[k] += s * self.strike_dir[k];
                    w[k] += s * imp.gyro_per_accel * torque[k];
                }
            }
            (a, w)
        }
    }

    /// Rounds to what a client prints (6 decimals).
    fn printed(v: f64) -> f64 {
        (v * 1e6).round() / 1e6
    }

    fn quantise(v: f64, lsb: f64) -> f64 {
        printed((v / lsb).round() * lsb)
    }

    /// Samples one window of a held phone. Each output sample averages the
    /// motion over its period (the sensor's decimation filter), so a fast
    /// strike seen at a low rate is smeared, not aliased away.
    fn held_window(
        rng: &mut Rng,
        s: &Sensors,
        hand: &Hand,
        window: usize,
        taps: &[Tap],
    ) -> (Vec<Sample>, Vec<Sample>) {
        let n = (WINDOW_MS / 1000.0 * s.rate_hz).round().clamp(2.0, 250.0) as usize;
        let dt = WINDOW_MS / n as f64;
        let mut accel = Vec::with_capacity(n);
        let mut gyro = Vec::with_capacity(n);
        for i in 0..n {
            let local = (i as f64 + rng.range(0.0, s.jitter)) * dt;
            let (mut a, mut w) = ([0.0; 3], [0.0; 3]);
            const SUB: usize = 4;
            for j in 0..SUB {
                let l = local - dt * j as f64 / SUB as f64;
                let (aj, wj) = hand.at((window as f64 * WINDOW_MS + l) / 1000.0, l, taps);
                for k in 0..3 {
                    a[k] += aj[k] / SUB as f64;
                    w[k] += wj[k] / SUB as f64;
                }
            }
            let t = (local * 1e3).round() / 1e3;
            let ax = |k: usize, rng: &mut Rng| {
                quantise(
                    a[k] + s.accel_bias[k] + s.accel_noise * rng.normal(),
                    s.accel_lsb,
                )
            };
            accel.push(Sample {
                t,
                x: ax(0, rng),
                y: ax(1, rng),
                z: ax(2, rng),
            });
            let gx = |k: usize, rng: &mut Rng| {
                quantise(
                    w[k] + s.gyro_bias[k] + s.gyro_noise * rng.normal(),
                    s.gyro_lsb,
                )
            };
            gyro.push(Sample {
                t,
                x: gx(0, rng),
                y: gx(1, rng),
                z: gx(2, rng),
            });
        }
        if let Some(mean) = s.batch {
            batch(rng, &mut accel, mean);
            batch(rng, &mut gyro, mean);
        }
        if !s.gyroscope {
            gyro.clear();
        }
        (accel, gyro)
    }

    /// Android sensor batching as some HALs deliver it: the FIFO is flushed
    /// every few samples and the whole batch is stamped at delivery, so
    /// several samples carry near-identical timestamps (0–0.2 ms apart),
    /// then a gap.
    fn batch(rng: &mut Rng, samples: &mut [Sample], mean: f64) {
        let mut i = 0;
        while i < samples.len() {
            let k = ((mean + rng.range(-1.5, 1.5)).round() as usize).max(2);
            let end = (i + k).min(samples.len());
            let delivered = samples[end - 1].t;
            let mut t = delivered;
            for s in &mut samples[i..end] {
                s.t = (t * 1e3).round() / 1e3;
                t += rng.range(0.0, 0.2);
            }
            i = end;
        }
    }

    /// How a person uses the phone.
    #[derive(Debug, Clone)]
    struct User {
        /// Gestures per 2 s window while interacting: 1–4 (0.5–2 per s).
        taps: f64,
        /// Share of windows with any touch: 0.5–0.9.
        touching: f64,
        /// Share of gestures that are scrolls: 0.2–0.7.
        scroll: f64,
        /// Background upload (B/s): 200–5000 (telemetry, sync, a banking
        /// app's API calls).
        upload: f64,
        /// Padded case, light taps: reported pressure × 0.3–0.6 and contact
        /// size × 0.6–0.9; 1 otherwise.
        pressure: f64,
        size: f64,
        /// Genuine screen recording streamed out: 100–400 KB/s (a 720p–1080p
        /// H.264 stream at 0.8–3.2 Mbit/s); `None` otherwise.
        recording: Option<f64>,
    }

    impl User {
        fn draw(rng: &mut Rng, class: Class) -> Self {
            let light = class == Class::PaddedCase;
            Self {
                taps: rng.range(1.0, 4.0),
                touching: rng.range(0.5, 0.9),
                scroll: rng.range(0.2, 0.7),
                upload: rng.range(200.0, 5_000.0),
                pressure: if light { rng.range(0.3, 0.6) } else { 1.0 },
                size: if light { rng.range(0.6, 0.9) } else { 1.0 },
                recording: (class == Class::ScreenRecording).then(|| rng.range(100e3, 400e3)),
            }
        }
    }

    /// The attacker (drawn for every session; used by attacks).
    #[derive(Debug, Clone)]
    struct Attacker {
        /// Remote control: gestures per window 1.5–4, scroll share 0.2–0.7
        /// (driving the app quickly but like a person would).
        taps: f64,
        scroll: f64,
        /// Remote control's screen stream: 8–40 KB/s (a low-bitrate,
        /// low-frame-rate stream of a mostly static UI, 64–320 kbit/s).
        upload: f64,
        /// Replay: accelerometer offset per axis ±0.05 m/s², gyroscope
        /// ±0.003 rad/s (a re-calibration's worth).
        accel_offset: [f64; 3],
        gyro_offset: [f64; 3],
        /// Emulator: the HAL's rate (50, 60 or 100 Hz, exactly periodic).
        emu_rate: f64,
        /// Emulator: a constant gravity vector at a configured tilt.
        emu_gravity: [f64; 3],
        /// Emulator: Gaussian noise 0.005–0.05 m/s² and 0.0005–0.01 rad/s.
        emu_noise: f64,
        emu_gyro_noise: f64,
        /// Emulator: a sine "tremor" of 0.02–0.15 m/s² at 8–12 Hz (the
        /// textbook physiological band) along one direction …
        emu_tremor: Wave,
        emu_dir: [f64; 3],
        /// … and, for half of them, a matching gyroscope sine of
        /// 0.005–0.05 rad/s.
        emu_gyro_tremor: Option<(f64, [f64; 3])>,
        /// Emulator: jittered (scripted) rather than uniform machine touches.
        emu_jittered: bool,
    }

    impl Attacker {
        fn draw(rng: &mut Rng) -> Self {
            let tilt = rng.range(0.0, 1.3);
            let roll = rng.range(-0.3, 0.3);
            Self {
                taps: rng.range(1.5, 4.0),
                scroll: rng.range(0.2, 0.7),
                upload: rng.range(8e3, 40e3),
                accel_offset: [0; 3].map(|_| rng.range(-0.05, 0.05)),
                gyro_offset: [0; 3].map(|_| rng.range(-0.003, 0.003)),
                emu_rate: [50.0, 60.0, 100.0][(rng.unit() * 3.0) as usize % 3],
                emu_gravity: [
                    G * tilt.cos() * roll.sin(),
                    G * tilt.sin(),
                    G * tilt.cos() * roll.cos(),
                ],
                emu_noise: rng.range(0.005, 0.05),
                emu_gyro_noise: rng.range(0.0005, 0.01),
                emu_tremor: Wave::draw(rng, (0.02, 0.15), (8.0, 12.0)),
                emu_dir: direction(rng, 0.0),
                emu_gyro_tremor: (rng.unit() < 0.5)
                    .then(|| (rng.range(0.005, 0.05), direction(rng, 0.0))),
                emu_jittered: rng.unit() < 0.5,
            }
        }
    }

    fn network(tx: f64, rx: f64) -> Option<Network> {
        Some(Network {
            tx_bytes: (tx * WINDOW_MS / 1000.0) as u64,
            rx_bytes: (rx * WINDOW_MS / 1000.0) as u64,
            interval_ms: WINDOW_MS as u64,
        })
    }

    /// The impulses a window's touches cause on a held phone.
    fn taps_of(rng: &mut Rng, hand: &Hand, touches: &[Touch]) -> Vec<Tap> {
        touches
            .iter()
            .filter_map(|t| {
                let weight = match t.action {
                    TouchAction::Down => 1.0,
                    TouchAction::Up => hand.impulse.lift,
                    TouchAction::Move => return None,
                };
                Some(Tap {
                    onset: t.t + hand.impulse.lag_ms + rng.range(-5.0, 5.0),
                    weight,
                    x: t.x,
                    y: t.y,
                })
            })
            .collect()
    }

    fn genuine(
        rng: &mut Rng,
        class: Class,
        s: &Sensors,
        hand: &Hand,
        user: &User,
        window: usize,
    ) -> Heartbeat {
        let mut touches = if rng.unit() < user.touching {
            human_touches_at(rng, user.taps, user.scroll)
        } else {
            Vec::new()
        };
        for t in &mut touches {
            t.pressure = (t.pressure * user.pressure).clamp(0.02, 1.0);
            t.size = (t.size * user.size).clamp(0.003, 1.0);
            if class == Class::HeavyTremor && t.action != TouchAction::Down {
                // The tremor shakes the finger too.
                t.x = (t.x + 0.01 * rng.normal()).clamp(0.0, 1.0);
                t.y = (t.y + 0.01 * rng.normal()).clamp(0.0, 1.0);
            }
        }
        let taps = taps_of(rng, hand, &touches);
        let (accelerometer, gyroscope) = held_window(rng, s, hand, window, &taps);
        // Background traffic varies (log-normal, σ = 0.4); 3% of windows
        // carry a burst (a photo, a sync) of 20–200 KB/s.
        let mut tx = user.upload * (0.4 * rng.normal()).exp();
        if rng.unit() < 0.03 {
            tx += rng.range(20e3, 200e3);
        }
        let mut context = store_context();
        if let Some(rate) = user.recording {
            tx += rate * rng.range(0.8, 1.2);
            context.screen_capture = true;
        }
        Heartbeat {
            seq: 0,
            accelerometer,
            gyroscope,
            touches,
            network: network(tx, tx.min(20e3) * rng.range(2.0, 10.0)),
            context,
        }
    }

    fn remote_control_held(
        rng: &mut Rng,
        s: &Sensors,
        hand: &Hand,
        attacker: &Attacker,
        window: usize,
    ) -> Heartbeat {
        // The victim holds the phone; the touches are injected, so nothing
        // strikes it.
        let touches = if rng.unit() < 0.9 {
            human_touches_at(rng, attacker.taps, attacker.scroll)
        } else {
            Vec::new()
        };
        let (accelerometer, gyroscope) = held_window(rng, s, hand, window, &[]);
        Heartbeat {
            seq: 0,
            accelerometer,
            gyroscope,
            touches,
            network: network(
                attacker.upload * rng.range(0.7, 1.3),
                rng.range(1_000.0, 5_000.0),
            ),
            context: store_context(),
        }
    }

    /// One of the device's own earlier windows, resent: the first `k` (1–6)
    /// samples dropped and the rest re-timed from 0, fresh noise of the
    /// device's own level on every sample, a constant offset per axis, the
    /// touches re-timed by the same shift, the network counters ±20%.
    fn replay_noisy(
        rng: &mut Rng,
        s: &Sensors,
        attacker: &Attacker,
        prefix: &[Heartbeat],
    ) -> Heartbeat {
        let pick = &prefix[(rng.unit() * prefix.len() as f64) as usize % prefix.len().max(1)];
        let mut hb = pick.clone();
        let k = 1 + (rng.unit() * 6.0) as usize % 6;
        let shift = hb.accelerometer.get(k).map_or(0.0, |s| s.t);
        let resend =
            |samples: &mut Vec<Sample>, rng: &mut Rng, noise: f64, offset: &[f64; 3], lsb: f64| {
                let k = k.min(samples.len());
                samples.drain(..k);
                let t0 = samples.first().map_or(0.0, |s| s.t);
                for s in samples.iter_mut() {
                    s.t = ((s.t - t0) * 1e3).round() / 1e3;
                    s.x = quantise(s.x + offset[0] + noise * rng.normal(), lsb);
                    s.y = quantise(s.y + offset[1] + noise * rng.normal(), lsb);
                    s.z = quantise(s.z + offset[2] + noise * rng.normal(), lsb);
                }
            };
        resend(
            &mut hb.accelerometer,
            rng,
            s.accel_noise,
            &attacker.accel_offset,
            s.accel_lsb,
        );
        resend(
            &mut hb.gyroscope,
            rng,
            s.gyro_noise,
            &attacker.gyro_offset,
            s.gyro_lsb,
        );
        hb.touches.retain_mut(|t| {
            t.t = ((t.t - shift) * 1e3).round() / 1e3;
            t.t >= 0.0
        });
        if let Some(n) = &mut hb.network {
            n.tx_bytes = (n.tx_bytes as f64 * rng.range(0.8, 1.2)) as u64;
            n.rx_bytes = (n.rx_bytes as f64 * rng.range(0.8, 1.2)) as u64;
        }
        hb
    }

    /// An emulator whose HAL adds Gaussian noise and a sine "tremor" to a
    /// constant gravity; machine touches.
    fn emulator_noisy(rng: &mut Rng, attacker: &Attacker, window: usize) -> Heartbeat {
        let n = (WINDOW_MS / 1000.0 * attacker.emu_rate).round() as usize;
        let dt = WINDOW_MS / n as f64;
        let mut accelerometer = Vec::with_capacity(n);
        let mut gyroscope = Vec::with_capacity(n);
        for i in 0..n {
            let local = i as f64 * dt;
            let t = (window as f64 * WINDOW_MS + local) / 1000.0;
            let tremor = attacker.emu_tremor.at(t);
            let g = attacker.emu_gravity;
            let d = attacker.emu_dir;
            let noise = attacker.emu_noise;
            accelerometer.push(Sample {
                t: printed(local),
                x: printed(g[0] + tremor * d[0] + noise * rng.normal()),
                y: printed(g[1] + tremor * d[1] + noise * rng.normal()),
                z: printed(g[2] + tremor * d[2] + noise * rng.normal()),
            });
            let (amp, dir) = attacker.emu_gyro_tremor.unwrap_or((0.0, [0.0; 3]));
            let w = amp * (TAU * attacker.emu_tremor.hz * t + attacker.emu_tremor.phase).cos();
            let noise = attacker.emu_gyro_noise;
            gyroscope.push(Sample {
                t: printed(local),
                x: printed(w * dir[0] + noise * rng.normal()),
                y: printed(w * dir[1] + noise * rng.normal()),
                z: printed(w * dir[2] + noise * rng.normal()),
            });
        }
        Heartbeat {
            seq: 0,
            accelerometer,
            gyroscope,
            touches: machine_touches(rng, attacker.emu_jittered),
            network: network(rng.range(500.0, 2_000.0), rng.range(2_000.0, 8_000.0)),
            context: Context {
                installer: Some("com.android.vending".into()),
                ..Context::default()
            },
        }
    }

    /// A shifted-class session: the device's owner (held in hand) before an
    /// attack's start, the class's own behaviour after it.
    pub(super) fn session(
        rng: &mut Rng,
        class: Class,
        length: usize,
        attack_start: Option<usize>,
    ) -> Session {
        let sensors = Sensors::draw(rng, class);
        let hand = Hand::draw(rng, class);
        let user = User::draw(rng, class);
        let attacker = Attacker::draw(rng);
        let mut heartbeats: Vec<Heartbeat> = Vec::with_capacity(length);
        for window in 0..length {
            let mut hb = match attack_start {
                Some(start) if window >= start => match class {
                    Class::RemoteControlHeld => {
                        remote_control_held(rng, &sensors, &hand, &attacker, window)
                    }
                    Class::ReplayNoisy => {
                        replay_noisy(rng, &sensors, &attacker, &heartbeats[..start])
                    }
                    _ => emulator_noisy(rng, &attacker, window),
                },
                _ => genuine(rng, class, &sensors, &hand, &user, window),
            };
            hb.seq = window as u64 + 1;
            heartbeats.push(hb);
        }
        Session {
            class,
            heartbeats,
            attack_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_heartbeats_are_full_windows_at_phone_precision() {
        let hb = load_heartbeat(Class::HeldInHand, 3);
        assert_eq!((hb.accelerometer.len(), hb.gyroscope.len()), (100, 100));
        let values = hb
            .accelerometer
            .iter()
            .chain(&hb.gyroscope)
            .flat_map(|s| [s.t, s.x, s.y, s.z]);
        for v in values {
            assert!(((v * 1e4).round() / 1e4 - v).abs() < 1e-12, "{v}");
        }
        let json = serde_json::to_string(&hb).expect("json");
        assert!((6_000..9_000).contains(&json.len()), "{}", json.len());
    }

    #[test]
    fn short_sessions_never_panic() {
        for length in 0..8 {
            for class in Class::ALL {
                assert_eq!(session(class, 1, length).heartbeats.len(), length);
            }
        }
    }

    #[test]
    fn sessions_are_deterministic_and_attacks_start_after_a_genuine_prefix() {
        let a = session(Class::RemoteControlSubtle, 42, 20);
        let b = session(Class::RemoteControlSubtle, 42, 20);
        assert_eq!(a.heartbeats, b.heartbeats);
        let start = a.attack_start.expect("attack");
        assert!((3..=14).contains(&start));
        assert_eq!(a.heartbeats[0].seq, 1);
        assert!(session(Class::Walking, 1, 5).attack_start.is_none());
    }

    #[test]
    fn every_class_produces_ordered_windows_within_the_contract_limits() {
        assert_eq!(
            Class::ALL.len(),
            Class::ORIGINAL.len() + Class::SHIFTED.len()
        );
        for class in Class::ALL {
            assert_eq!(Class::from_name(class.name()), Some(class));
            for seed in 0..20 {
                for hb in session(class, seed, 15).heartbeats {
                    assert_eq!(
                        contract_violation(&hb),
                        None,
                        "{} seed {seed} seq {}",
                        class.name(),
                        hb.seq
                    );
                    // Within the API's 64 KiB body limit.
                    let json = serde_json::to_string(&hb).expect("json");
                    assert!(json.len() < 60_000, "{} {}", class.name(), json.len());
                }
            }
        }
    }

    #[test]
    fn the_shifted_classes_show_the_physics_they_are_named_for() {
        let has =
            |class, f: &dyn Fn(&Session) -> bool| (0..20).all(|seed| f(&session(class, seed, 12)));
        // No gyroscope at all; accelerometers everywhere.
        assert!(has(Class::NoGyroscope, &|s| s.heartbeats.iter().all(
            |hb| hb.gyroscope.is_empty() && hb.accelerometer.len() >= 50
        )));
        // 15–25 Hz, timestamps in bursts: most gaps under 1 ms, the rest long.
        assert!(has(Class::LowRateBatched, &|s| s.heartbeats.iter().all(
            |hb| {
                let n = hb.accelerometer.len();
                let gaps: Vec<f64> = hb
                    .accelerometer
                    .windows(2)
                    .map(|w| w[1].t - w[0].t)
                    .collect();
                let tight = gaps.iter().filter(|&&g| g < 1.0).count();
                (30..=50).contains(&n) && tight * 2 > gaps.len() && gaps.iter().any(|&g| g > 100.0)
            }
        )));
        // Screen capture on and a sustained upload, in every window.
        assert!(has(Class::ScreenRecording, &|s| s.heartbeats.iter().all(
            |hb| {
                hb.context.screen_capture && hb.network.is_some_and(|n| n.upload_rate() >= 80_000.0)
            }
        )));
        // The held-phone attack keeps the phone moving and touched, without
        // a capture flag.
        assert!(has(Class::RemoteControlHeld, &|s| {
            let attack = &s.heartbeats[s.attack_start.expect("attack")..];
            attack.iter().all(|hb| !hb.context.screen_capture)
                && attack.iter().filter(|hb| !hb.touches.is_empty()).count() * 3 >= attack.len()
                && attack.iter().all(|hb| {
                    let (_, sd) = crate::stats::mean_std(hb.accelerometer.iter().map(|a| a.y));
                    sd > 0.003
                })
        }));
        // A noisy replay matches no earlier window exactly, and is shorter
        // than the one it came from.
        assert!(has(Class::ReplayNoisy, &|s| {
            let start = s.attack_start.expect("attack");
            s.heartbeats[start..].iter().all(|hb| {
                s.heartbeats[..start]
                    .iter()
                    .all(|old| old.accelerometer != hb.accelerometer)
                    && s.heartbeats[..start]
                        .iter()
                        .any(|old| old.accelerometer.len() > hb.accelerometer.len())
            })
        }));
        // Heavy tremor moves the phone far more than a steady hand does.
        let spread = |class| {
            let s = session(class, 5, 6);
            s.heartbeats
                .iter()
                .map(|hb| {
                    let (_, a) = crate::stats::mean_std(hb.accelerometer.iter().map(|a| a.z));
                    a
                })
                .sum::<f64>()
        };
        let steady: f64 = (0..10).map(|_| spread(Class::NoGyroscope)).sum();
        assert!(spread(Class::HeavyTremor) * 10.0 > steady);
    }

    #[test]
    fn a_corpus_line_round_trips_and_is_checked() {
        let s = session(Class::ReplayNoisy, 3, 12);
        let line = CorpusSession::from(&s);
        let text = serde_json::to_string(&line).expect("json");
        assert!(text.starts_with(r#"{"class":"attack/replay_noisy","attack":true,"attack_start":"#));
        let back: CorpusSession = serde_json::from_str(&text).expect("parse");
        // serde_json's float parsing may differ from the printed value in
        // the last bit: compare structure and values to 1e-12.
        let close = |a: &CorpusSession, b: &CorpusSession| {
            a.class == b.class
                && a.attack_start == b.attack_start
                && a.heartbeats.len() == b.heartbeats.len()
                && a.heartbeats.iter().zip(&b.heartbeats).all(|(x, y)| {
                    x.seq == y.seq
                        && x.touches.len() == y.touches.len()
                        && x.accelerometer.len() == y.accelerometer.len()
                        && x.accelerometer
                            .iter()
                            .zip(&y.accelerometer)
                            .all(|(p, q)| (p.t - q.t).abs() < 1e-9 && (p.z - q.z).abs() < 1e-12)
                })
        };
        assert!(close(&back, &line));
        assert_eq!(back.check(), Ok(()));
        let mut bad = back.clone();
        bad.attack_start = None;
        assert!(bad.check().is_err());
        let mut bad = back.clone();
        bad.heartbeats[2].seq = 9;
        assert!(bad.check().is_err());
        // `sent_at` (as API.md bodies carry it) is accepted and ignored.
        let with_sent_at = text.replace(
            r#"{"seq":1,"#,
            r#"{"seq":1,"sent_at":"2026-01-01T00:00:00Z","#,
        );
        assert_ne!(with_sent_at, text);
        let back: CorpusSession = serde_json::from_str(&with_sent_at).expect("parse");
        assert!(close(&back, &line));
        // The in-process corpus evaluation agrees with the generated one.
        let sessions: Vec<CorpusSession> = (0..4)
            .map(|i| {
                CorpusSession::from(&session(
                    Class::Replay,
                    session_seed(1, Class::Replay, i),
                    12,
                ))
            })
            .collect();
        let report = evaluate_corpus(&sessions);
        assert_eq!(report.len(), 1);
        assert_eq!((report[0].0.as_str(), report[0].1), ("attack/replay", true));
        assert_eq!(
            report[0].2,
            evaluate_classes(&[Class::Replay], 4, 12, 1)[0].1
        );
    }

    #[test]
    fn wilson_intervals_at_the_edges() {
        assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
        let (lo, hi) = wilson(20, 20, Z95);
        assert_eq!(hi, 1.0);
        assert!((lo - 0.8389).abs() < 1e-3, "{lo}");
        let (lo, hi) = wilson(0, 100, Z95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.0370).abs() < 1e-3, "{hi}");
        let (lo, hi) = wilson(5, 20, Z95);
        assert!(
            (lo - 0.1119).abs() < 1e-3 && (hi - 0.4687).abs() < 1e-3,
            "{lo} {hi}"
        );
    }

    proptest::proptest! {
        #[test]
        fn wilson_intervals_hold_the_rate_and_narrow_with_n(
            trials in 1usize..100_000,
            share in 0.0f64..=1.0,
            z in 0.5f64..4.0,
        ) {
            let successes = ((trials as f64) * share).round() as usize;
            let rate = successes as f64 / trials as f64;
            let (lo, hi) = wilson(successes, trials, z);
            proptest::prop_assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
            proptest::prop_assert!(lo <= rate && rate <= hi, "{lo} {rate} {hi}");
            // Four times the sessions at the same rate: a narrower interval.
            let (lo4, hi4) = wilson(4 * successes, 4 * trials, z);
            proptest::prop_assert!(hi4 - lo4 < hi - lo, "{} !< {}", hi4 - lo4, hi - lo);
            // A wider quantile, a wider interval.
            let (lo_z, hi_z) = wilson(successes, trials, z + 0.5);
            proptest::prop_assert!(hi_z - lo_z > hi - lo);
        }
    }

    #[test]
    fn the_engine_meets_its_detection_targets_on_a_small_corpus() {
        // The original classes; the shifted ones are measured, not yet met
        // (issue 21).
        let report = evaluate_classes(&Class::ORIGINAL, 60, 25, 7);
        for (class, r) in &report {
            if class.is_attack() {
                assert!(
                    r.rate() >= 0.95,
                    "{}: {:.3} detected",
                    class.name(),
                    r.rate()
                );
            } else {
                assert!(
                    r.rate() <= 0.02,
                    "{}: {:.3} falsely locked",
                    class.name(),
                    r.rate()
                );
            }
        }
    }

    #[test]
    fn the_shifted_corpus_locks_no_genuine_session_and_keeps_what_was_gained() {
        // A regression guard at today's level (issue 21: the held-phone
        // target is not met yet): genuine shifted classes never locked;
        // noisy replays and noisy emulators (40/40 and 40/40 here) and
        // held-phone remote control (27/40) well above what the engine
        // caught before (0%, 24% and 1% on this corpus).
        let report = evaluate_classes(&Class::SHIFTED, 40, 25, 29);
        for (class, r) in &report {
            let floor = match class.name() {
                "attack/replay_noisy" => 0.95,
                "attack/remote_control_held" => 0.55,
                "attack/emulator_noisy" => 0.95,
                _ if class.is_attack() => 0.0,
                _ => {
                    assert_eq!(r.locked, 0, "{}: falsely locked", class.name());
                    continue;
                }
            };
            assert!(
                r.rate() >= floor,
                "{}: {:.3} detected",
                class.name(),
                r.rate()
            );
        }
    }
}
