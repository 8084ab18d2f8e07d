//! The heartbeat body: strict parsing, limits, and the queue job.
//!
//! Parsing refuses unknown fields anywhere (naming the field). Limits
//! (API.md): at most [`MAX_SAMPLES`] samples per sensor and [`MAX_TOUCHES`]
//! touches, every number finite, sample times non-decreasing. Ranges are
//! generous physical bounds (16 g, 2000 °/s) so no real phone is refused
//! and no absurd value reaches the engine.
//!
//! The queue job is the validated heartbeat in a compact binary encoding
//! (postcard, each sample array as one byte string of delta-coded scaled
//! decimals — see `blockremote_engine::compact::decimal_samples`) behind a
//! small text header (device, user, address verdict): encoding it costs a
//! few microseconds, while parsing 8 KB of JSON again in the worker cost
//! tens, and a ~7 KB body becomes a ~2 KB job — less for Redis to copy
//! through the ingestion script, the stream and the worker. The header says
//! which body encoding follows, so a job queued by an older replica during
//! an upgrade is still read, never misread. (Upgrade workers before the
//! replicas that enqueue: an older worker cannot read a newer job.)

use blockremote_engine::heartbeat::{Context, Heartbeat, Network, Sample, Touch};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Largest `seq` (2^53: exact in every JSON and Lua number).
pub const MAX_SEQ: u64 = 1 << 53;
/// Samples per sensor per heartbeat.
pub const MAX_SAMPLES: usize = 256;
/// Touch events per heartbeat.
pub const MAX_TOUCHES: usize = 64;
/// Largest sample time within a window (ms).
pub const MAX_T_MS: f64 = 60_000.0;
/// Accelerometer axis bound (m/s², 16 g).
pub const MAX_ACCEL: f64 = 160.0;
/// Gyroscope axis bound (rad/s, ~2000 °/s).
pub const MAX_GYRO: f64 = 35.0;
/// Entries per context list, and characters per entry.
pub const MAX_CONTEXT_ITEMS: usize = 64;
const MAX_CONTEXT_CHARS: usize = 255;

/// A heartbeat as the device sends it (API.md "Signals and trust").
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"seq": 42, "sent_at": "2026-11-22T12:00:00.000Z",
    "accelerometer": [[0, 0.12, 9.78, 0.31], [20, 0.10, 9.80, 0.29]],
    "gyroscope": [[0, 0.001, -0.002, 0.0005]],
    "touches": [{"t": 120, "x": 0.41, "y": 0.77, "pressure": 0.62, "size": 0.031, "action": "down"}],
    "network": {"tx_bytes": 1200, "rx_bytes": 5600, "interval_ms": 2000},
    "context": {"screen_capture": false, "accessibility_services": [], "installer": "com.android.vending",
        "app_hashes": [], "dns": []}}))]
pub struct HeartbeatBody {
    /// Per-device sequence number; must increase.
    pub seq: u64,
    /// When the device sent it.
    pub sent_at: DateTime<Utc>,
    /// `[t_ms, x, y, z]` in m/s², gravity included; at most 256.
    #[serde(default)]
    #[schema(value_type = Vec<[f64; 4]>)]
    pub accelerometer: Vec<Sample>,
    /// `[t_ms, x, y, z]` in rad/s; at most 256.
    #[serde(default)]
    #[schema(value_type = Vec<[f64; 4]>)]
    pub gyroscope: Vec<Sample>,
    /// At most 64 touch events.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub touches: Vec<Touch>,
    /// Network counters over the window.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub network: Option<Network>,
    /// Context.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Context>,
}

/// A limit the body broke: the field path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Path of the field, e.g. `accelerometer[3]`.
    pub field: String,
    /// What is wrong.
    pub message: &'static str,
}

fn invalid(field: impl Into<String>, message: &'static str) -> Invalid {
    Invalid {
        field: field.into(),
        message,
    }
}

fn check_samples(name: &str, samples: &[Sample], bound: f64) -> Result<(), Invalid> {
    if samples.len() > MAX_SAMPLES {
        return Err(invalid(name, "has more than 256 samples"));
    }
    let mut last = 0.0;
    for (i, s) in samples.iter().enumerate() {
        let axes_ok = [s.x, s.y, s.z]
            .iter()
            .all(|v| v.is_finite() && v.abs() <= bound);
        if !s.t.is_finite() || !(0.0..=MAX_T_MS).contains(&s.t) {
            return Err(invalid(
                format!("{name}[{i}]"),
                "t_ms must be within 0–60000",
            ));
        }
        if !axes_ok {
            return Err(invalid(format!("{name}[{i}]"), "an axis is out of range"));
        }
        if s.t < last {
            return Err(invalid(format!("{name}[{i}]"), "t_ms must not decrease"));
        }
        last = s.t;
    }
    Ok(())
}

impl HeartbeatBody {
    /// Checks every limit the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.seq == 0 || self.seq > MAX_SEQ {
            return Err(invalid("seq", "must be within 1–2^53"));
        }
        check_samples("accelerometer", &self.accelerometer, MAX_ACCEL)?;
        check_samples("gyroscope", &self.gyroscope, MAX_GYRO)?;
        if self.touches.len() > MAX_TOUCHES {
            return Err(invalid("touches", "has more than 64 events"));
        }
        let mut last = 0.0;
        for (i, t) in self.touches.iter().enumerate() {
            let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
            let ok = t.t.is_finite()
                && (0.0..=MAX_T_MS).contains(&t.t)
                && unit(t.x)
                && unit(t.y)
                && unit(t.size)
                && t.pressure.is_finite()
                && (0.0..=10.0).contains(&t.pressure);
            if !ok {
                return Err(invalid(format!("touches[{i}]"), "a value is out of range"));
            }
            if t.t < last {
                return Err(invalid(format!("touches[{i}]"), "t must not decrease"));
            }
            last = t.t;
        }
        if let Some(n) = &self.network {
            if n.interval_ms == 0 || n.interval_ms > 600_000 {
                return Err(invalid("network.interval_ms", "must be within 1–600000"));
            }
        }
        if let Some(c) = &self.context {
            for (name, list) in [
                ("context.accessibility_services", &c.accessibility_services),
                ("context.app_hashes", &c.app_hashes),
                ("context.dns", &c.dns),
            ] {
                if list.len() > MAX_CONTEXT_ITEMS {
                    return Err(invalid(name, "has more than 64 entries"));
                }
                if list
                    .iter()
                    .any(|s| s.is_empty() || s.len() > MAX_CONTEXT_CHARS)
                {
                    return Err(invalid(name, "entries must be 1–255 characters"));
                }
            }
            if c.installer
                .as_ref()
                .is_some_and(|s| s.len() > MAX_CONTEXT_CHARS)
            {
                return Err(invalid(
                    "context.installer",
                    "is longer than 255 characters",
                ));
            }
        }
        Ok(())
    }

    /// The engine's view of it (moves the vectors; no copies).
    pub fn into_heartbeat(self) -> Heartbeat {
        Heartbeat {
            seq: self.seq,
            accelerometer: self.accelerometer,
            gyroscope: self.gyroscope,
            touches: self.touches,
            network: self.network,
            context: self.context.unwrap_or_default(),
        }
    }
}

/// A decoded queue job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobHeader<'a> {
    /// The device.
    pub device_id: &'a str,
    /// Its user.
    pub user_id: Uuid,
    /// The client address was on the blacklist (checked at ingestion; the
    /// address itself never enters the queue).
    pub ip_listed: bool,
}

/// How a job's sample arrays are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEncoding {
    /// Delta-coded scaled decimals (flags `d…`): about a quarter of the
    /// size, for a queue across the network (Redis), where every byte is
    /// copied by the script, the stream and the worker. Costs a division
    /// per value each way.
    Small,
    /// Raw `f64`s (flags `c…`): bulk copies, for the in-process queue.
    Fast,
}

impl JobEncoding {
    /// The encoding for jobs queued in `shared`.
    pub fn for_queue_of(shared: &dyn crate::state::SharedState) -> Self {
        if shared.queue_is_remote() {
            Self::Small
        } else {
            Self::Fast
        }
    }
}

/// The sample arrays as raw `f64`s, borrowed: what [`JobEncoding::Fast`]
/// writes, read back as a `BodyWith<RawSamples>` (the same postcard layout).
#[derive(Serialize)]
struct RawSamplesJob<'a> {
    seq: u64,
    #[serde(with = "blockremote_engine::compact::samples")]
    accelerometer: &'a [Sample],
    #[serde(with = "blockremote_engine::compact::samples")]
    gyroscope: &'a [Sample],
    touches: &'a [Touch],
    network: &'a Option<Network>,
    context: &'a Context,
}

/// Encodes a queue job: `device_id \n user_id \n flags \n body`, where
/// `flags` is `d` or `c` (the [`JobEncoding`]) then `1` or `0` (address
/// listed or not), and `body` the heartbeat in postcard.
pub fn encode_job(
    device_id: &str,
    user_id: Uuid,
    ip_listed: bool,
    heartbeat: &Heartbeat,
    encoding: JobEncoding,
) -> Result<Vec<u8>, postcard::Error> {
    let mut job = Vec::with_capacity(device_id.len() + 48 + heartbeat_size_hint(heartbeat));
    job.extend_from_slice(device_id.as_bytes());
    job.push(b'\n');
    job.extend_from_slice(
        user_id
            .as_hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    job.push(b'\n');
    job.push(match encoding {
        JobEncoding::Small => b'd',
        JobEncoding::Fast => b'c',
    });
    job.push(if ip_listed { b'1' } else { b'0' });
    job.push(b'\n');
    match encoding {
        JobEncoding::Small => postcard::to_extend(heartbeat, job),
        JobEncoding::Fast => postcard::to_extend(
            &RawSamplesJob {
                seq: heartbeat.seq,
                accelerometer: &heartbeat.accelerometer,
                gyroscope: &heartbeat.gyroscope,
                touches: &heartbeat.touches,
                network: &heartbeat.network,
                context: &heartbeat.context,
            },
            job,
        ),
    }
}

/// Bytes of a heartbeat's body, roughly (the samples dominate).
fn heartbeat_size_hint(heartbeat: &Heartbeat) -> usize {
    (heartbeat.accelerometer.len() + heartbeat.gyroscope.len()) * 32
        + heartbeat.touches.len() * 48
        + 256
}

/// A body read by field: the heartbeat's fields in their order, the sample
/// arrays in the form `S` gives them. Two forms besides the current one:
/// [`RawSamples`] for [`JobEncoding::Fast`] bodies (flags `c1`/`c0`, also
/// every job queued before the scaled decimals), and plain `Vec<Sample>` for
/// bodies written before the sample arrays became byte strings (flags
/// `1`/`0`: the plain derive of [`Heartbeat`], field for field).
#[derive(Serialize, Deserialize)]
struct BodyWith<S> {
    seq: u64,
    accelerometer: S,
    gyroscope: S,
    touches: Vec<Touch>,
    network: Option<Network>,
    context: Context,
}

/// Sample arrays as one byte string of raw `f64`s each.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct RawSamples(#[serde(with = "blockremote_engine::compact::samples")] Vec<Sample>);

impl From<RawSamples> for Vec<Sample> {
    fn from(samples: RawSamples) -> Self {
        samples.0
    }
}

impl<S: Into<Vec<Sample>>> From<BodyWith<S>> for Heartbeat {
    fn from(body: BodyWith<S>) -> Self {
        Heartbeat {
            seq: body.seq,
            accelerometer: body.accelerometer.into(),
            gyroscope: body.gyroscope.into(),
            touches: body.touches,
            network: body.network,
            context: body.context,
        }
    }
}

/// Decodes a queue job made by [`encode_job`] (or by an older replica).
pub fn decode_job(job: &[u8]) -> Option<(JobHeader<'_>, Heartbeat)> {
    let mut parts = job.splitn(4, |&b| b == b'\n');
    let device_id = std::str::from_utf8(parts.next()?).ok()?;
    let user_id = Uuid::parse_str(std::str::from_utf8(parts.next()?).ok()?).ok()?;
    let flags = parts.next()?;
    let ip_listed = match flags.last()? {
        b'1' => true,
        b'0' => false,
        _ => return None,
    };
    let body = parts.next()?;
    let heartbeat = match &flags[..flags.len() - 1] {
        b"d" => postcard::from_bytes(body).ok()?,
        b"c" => postcard::from_bytes::<BodyWith<RawSamples>>(body)
            .ok()?
            .into(),
        b"" => postcard::from_bytes::<BodyWith<Vec<Sample>>>(body)
            .ok()?
            .into(),
        _ => return None,
    };
    Some((
        JobHeader {
            device_id,
            user_id,
            ip_listed,
        },
        heartbeat,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BODY: &str = r#"{"seq": 42, "sent_at": "2026-11-22T12:00:00.000Z",
        "accelerometer": [[0, 0.12, 9.78, 0.31], [20, 0.10, 9.80, 0.29]],
        "gyroscope": [[0, 0.001, -0.002, 0.0005]],
        "touches": [{"t": 120, "x": 0.41, "y": 0.77, "pressure": 0.62, "size": 0.031, "action": "down"}],
        "network": {"tx_bytes": 1200, "rx_bytes": 5600, "interval_ms": 2000},
        "context": {"screen_capture": false, "accessibility_services": [], "installer": "com.android.vending",
                    "app_hashes": [], "dns": []}}"#;

    fn parse(body: &str) -> HeartbeatBody {
        serde_json::from_str(body).expect("parses")
    }

    #[test]
    fn the_contract_example_is_valid() {
        let hb = parse(BODY);
        assert_eq!(hb.validate(), Ok(()));
        let hb = hb.into_heartbeat();
        assert_eq!(hb.accelerometer.len(), 2);
        assert_eq!(hb.accelerometer[1].y, 9.80, "[t_ms, x, y, z]");
    }

    #[test]
    fn limits_name_the_field() {
        let field = |body: String| parse(&body).validate().expect_err("invalid").field;
        assert_eq!(
            field(
                BODY.replace("[20, 0.10", "[10, 0.10")
                    .replace("[0, 0.12", "[15, 0.12")
            ),
            "accelerometer[1]"
        );
        assert_eq!(field(BODY.replace("9.78", "9999")), "accelerometer[0]");
        assert_eq!(
            field(BODY.replace(r#""x": 0.41"#, r#""x": 1.5"#)),
            "touches[0]"
        );
        assert_eq!(field(BODY.replace(r#""seq": 42"#, r#""seq": 0"#)), "seq");
        assert_eq!(
            field(BODY.replace(r#""interval_ms": 2000"#, r#""interval_ms": 0"#)),
            "network.interval_ms"
        );
        let many: Vec<String> = (0..257).map(|i| format!("[{i}, 0, 0, 9.8]")).collect();
        let big = BODY.replace(
            "[[0, 0.001, -0.002, 0.0005]]",
            &format!("[{}]", many.join(",")),
        );
        assert_eq!(field(big), "gyroscope");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<HeartbeatBody>(
            &BODY.replace(r#""seq": 42"#, r#""seq": 42, "extra": 1"#)
        )
        .is_err());
        assert!(serde_json::from_str::<HeartbeatBody>(
            &BODY.replace(r#""screen_capture""#, r#""rooted": true, "screen_capture""#)
        )
        .is_err());
    }

    fn heartbeat() -> Heartbeat {
        serde_json::from_str::<HeartbeatBody>(BODY)
            .expect("parses")
            .into_heartbeat()
    }

    #[test]
    fn jobs_round_trip() {
        let user = Uuid::now_v7();
        let hb = heartbeat();
        for encoding in [JobEncoding::Small, JobEncoding::Fast] {
            let job = encode_job("device_0001", user, true, &hb, encoding).expect("encodes");
            let (header, back) = decode_job(&job).expect("decodes");
            assert_eq!(
                header,
                JobHeader {
                    device_id: "device_0001",
                    user_id: user,
                    ip_listed: true
                }
            );
            assert_eq!(back, hb);
            assert_eq!(decode_job(&job[..job.len() - 1]), None, "truncated");
        }
        assert_eq!(decode_job(b"no newline"), None);
    }

    /// `hb` as a body of an older form.
    fn older<S>(hb: &Heartbeat, samples: impl Fn(&[Sample]) -> S) -> BodyWith<S> {
        BodyWith {
            seq: hb.seq,
            accelerometer: samples(&hb.accelerometer),
            gyroscope: samples(&hb.gyroscope),
            touches: hb.touches.clone(),
            network: hb.network,
            context: hb.context.clone(),
        }
    }

    #[test]
    fn jobs_queued_by_an_older_replica_are_still_read() {
        let user = Uuid::now_v7();
        let hb = heartbeat();
        let old = older(&hb, |samples| samples.to_vec());
        let body = postcard::to_allocvec(&old).expect("encodes");
        let job = [format!("device_0001\n{user}\n0\n").as_bytes(), &body].concat();
        let (header, back) = decode_job(&job).expect("decodes");
        assert!(!header.ip_listed);
        assert_eq!(back, hb);
        // The body encodings differ: the flags decide, nothing guesses.
        let relabelled = [format!("device_0001\n{user}\nc0\n").as_bytes(), &body].concat();
        assert_ne!(
            decode_job(&relabelled).map(|(_, back)| back),
            Some(hb.clone())
        );

        let raw_samples = older(&hb, |samples| RawSamples(samples.to_vec()));
        let body = postcard::to_allocvec(&raw_samples).expect("encodes");
        let job = [format!("device_0001\n{user}\nc1\n").as_bytes(), &body].concat();
        // What this replica writes for the in-process queue is that layout.
        assert_eq!(
            encode_job("device_0001", user, true, &hb, JobEncoding::Fast).expect("encodes"),
            job
        );
        let (header, back) = decode_job(&job).expect("decodes");
        assert!(header.ip_listed);
        assert_eq!(back, hb);
        for flags in ["d1", "1", "x1", "c", "c2"] {
            let relabelled = [format!("device_0001\n{user}\n{flags}\n").as_bytes(), &body].concat();
            assert_ne!(
                decode_job(&relabelled).map(|(_, back)| back),
                Some(hb.clone()),
                "{flags}"
            );
        }
    }

    #[test]
    fn a_realistic_job_is_a_fraction_of_its_json() {
        let hb =
            blockremote_engine::sim::load_heartbeat(blockremote_engine::sim::Class::HeldInHand, 7);
        let json = serde_json::to_vec(&hb).expect("json");
        let user = Uuid::now_v7();
        let small =
            encode_job("device_0001", user, false, &hb, JobEncoding::Small).expect("encodes");
        let fast = encode_job("device_0001", user, false, &hb, JobEncoding::Fast).expect("encodes");
        assert!(
            small.len() * 3 < json.len(),
            "{} of {}",
            small.len(),
            json.len()
        );
        assert!(
            small.len() * 3 < fast.len(),
            "{} against {}",
            small.len(),
            fast.len()
        );
        assert_eq!(decode_job(&small).map(|(_, back)| back), Some(hb));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in "\\PC{0,400}") {
            if let Ok(hb) = serde_json::from_str::<HeartbeatBody>(&body) {
                let _ = hb.validate();
            }
        }

        #[test]
        fn arbitrary_jobs_never_panic(job in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_job(&job);
        }
    }
}
