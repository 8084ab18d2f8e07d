//! Synthetic device sessions for evaluation and load: genuine use and
//! attacks, generated from the physics in THREAT-MODEL.md.
//!
//! Deterministic (seeded), pure, and deliberately independent of the
//! scorer: amplitudes and rates are drawn from wide ranges per session, so
//! the engine is judged on variety, not on the generator's constants.

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
}

impl Class {
    /// Every class, genuine first.
    pub const ALL: [Class; 10] = [
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

    /// True for attacks.
    pub fn is_attack(self) -> bool {
        matches!(
            self,
            Class::RemoteControlObvious
                | Class::RemoteControlSubtle
                | Class::Emulator
                | Class::Replay
                | Class::Bot
        )
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
    let mut touches = Vec::new();
    let count = (b.taps_per_window + rng.normal()).round().clamp(0.0, 6.0) as usize;
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
    let mut state = crate::DeviceState::default();
    let situation = crate::Situation {
        plan: crate::PlanTier::Paid,
        ..Default::default()
    };
    session
        .heartbeats
        .iter()
        .position(|hb| crate::assess(&mut state, hb, &situation).decision != crate::Decision::Allow)
}

/// The seed of the `i`-th session of `class` in an evaluation seeded `seed`.
pub fn session_seed(seed: u64, class: Class, i: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add(i as u64 * 7919 + class as u64)
}

/// Evaluates `per_class` sessions of `length` heartbeats for each class.
pub fn evaluate(per_class: usize, length: usize, seed: u64) -> Vec<(Class, ClassReport)> {
    Class::ALL
        .iter()
        .map(|&class| {
            let mut report = ClassReport::default();
            for i in 0..per_class {
                let s = session(class, session_seed(seed, class, i), length);
                report.sessions += 1;
                let lock = first_lock(&s);
                match (s.attack_start, lock) {
                    (Some(start), Some(at)) if at >= start && at < start + DETECTION_BUDGET => {
                        report.locked += 1;
                        report.heartbeats_to_lock.push(at - start + 1);
                    }
                    (None, Some(_)) => report.locked += 1,
                    _ => {}
                }
            }
            (class, report)
        })
        .collect()
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
        for class in Class::ALL {
            for seed in 0..20 {
                for hb in session(class, seed, 15).heartbeats {
                    assert!(hb.accelerometer.len() <= 256 && hb.gyroscope.len() <= 256);
                    assert!(hb.touches.len() <= 64, "{}", class.name());
                    assert!(hb.accelerometer.windows(2).all(|w| w[0].t <= w[1].t));
                    assert!(
                        hb.touches.windows(2).all(|w| w[0].t <= w[1].t),
                        "{} seed {seed}",
                        class.name()
                    );
                    assert!(hb
                        .touches
                        .iter()
                        .all(|t| (0.0..=1.0).contains(&t.x) && (0.0..=1.0).contains(&t.y)));
                }
            }
        }
    }

    #[test]
    fn the_engine_meets_its_detection_targets_on_a_small_corpus() {
        let report = evaluate(60, 25, 7);
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
}
