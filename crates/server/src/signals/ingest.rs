//! The heartbeat body: strict parsing, limits, and the queue job; and
//! [`Ingestion`], which takes a validated heartbeat (token, seq, enqueue, or
//! inline scoring when the workers are behind) and answers [`IngestError`].
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

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use blockremote_engine::heartbeat::{Context, Heartbeat, Network, Sample, Touch};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    breaker::Breaker,
    intel::ThreatIntel,
    scoring::{Scoring, STATE_TTL},
};
use crate::{
    auth::Auth,
    sequences::Sequences,
    state::{keys, Advanced, BucketDecision, SharedState, StateError, Take},
    store::{SequenceKind, Store, StoreError},
    telemetry::Metrics,
};

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

/// A heartbeat as the device sends it: one window of sensor samples, touches, network counters and context.
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
    /// Per-device sequence number, 1–2^53; must increase (a new session starts again at 1).
    #[schema(minimum = 1, maximum = 9007199254740992_u64)]
    pub seq: u64,
    /// When the device sent it (RFC 3339 UTC).
    pub sent_at: DateTime<Utc>,
    /// Samples `[t_ms, x, y, z]`: `t_ms` 0–60000 from the window start, non-decreasing; x, y, z
    /// in m/s², gravity included, within ±160; at most 256.
    #[serde(default)]
    #[schema(value_type = Vec<SampleSchema>, max_items = 256)]
    pub accelerometer: Vec<Sample>,
    /// Samples `[t_ms, x, y, z]` as for the accelerometer, x, y, z in rad/s within ±35; at most 256.
    #[serde(default)]
    #[schema(value_type = Vec<SampleSchema>, max_items = 256)]
    pub gyroscope: Vec<Sample>,
    /// Touch events, `t` non-decreasing; at most 64.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub touches: Vec<Touch>,
    /// Network counters over the window.
    #[serde(default)]
    pub network: Option<Network>,
    /// What the app knows about its surroundings.
    #[serde(default)]
    pub context: Option<Context>,
}

/// One sensor sample, `[t_ms, x, y, z]`: four finite numbers (the OpenAPI
/// document's view of [`Sample`]).
pub struct SampleSchema;

impl utoipa::PartialSchema for SampleSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{schema::Type, ArrayBuilder, ObjectBuilder};
        ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::Number))
            .min_items(Some(4))
            .max_items(Some(4))
            .description(Some("`[t_ms, x, y, z]`"))
            .into()
    }
}

impl ToSchema for SampleSchema {
    fn name() -> std::borrow::Cow<'static, str> {
        "Sample".into()
    }
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

fn check_samples(
    name: &str,
    samples: &[Sample],
    bound: f64,
    out_of_range: &'static str,
) -> Result<(), Invalid> {
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
            return Err(invalid(format!("{name}[{i}]"), out_of_range));
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
        check_samples(
            "accelerometer",
            &self.accelerometer,
            MAX_ACCEL,
            "x, y and z must be finite m/s² within ±160 (16 g; iOS reports g: multiply by −9.80665)",
        )?;
        check_samples(
            "gyroscope",
            &self.gyroscope,
            MAX_GYRO,
            "x, y and z must be finite rad/s within ±35",
        )?;
        if self.touches.len() > MAX_TOUCHES {
            return Err(invalid("touches", "has more than 64 events"));
        }
        let mut last = 0.0;
        for (i, t) in self.touches.iter().enumerate() {
            let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
            let wrong = if !(t.t.is_finite() && (0.0..=MAX_T_MS).contains(&t.t)) {
                Some(("t", "must be within 0–60000 (ms since the window start)"))
            } else if !unit(t.x) {
                Some(("x", "must be within 0–1 (a share of the screen's width)"))
            } else if !unit(t.y) {
                Some(("y", "must be within 0–1 (a share of the screen's height)"))
            } else if !unit(t.size) {
                Some(("size", "must be within 0–1"))
            } else if !(t.pressure.is_finite() && (0.0..=10.0).contains(&t.pressure)) {
                Some(("pressure", "must be within 0–10"))
            } else {
                None
            };
            if let Some((field, message)) = wrong {
                return Err(invalid(format!("touches[{i}].{field}"), message));
            }
            if t.t < last {
                return Err(invalid(format!("touches[{i}].t"), "must not decrease"));
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
    /// The ingest request's trace context and id, when it had one.
    pub trace: Option<JobTrace<'a>>,
}

/// What a job carries of the request that queued it, so its scoring span
/// joins that trace and its log lines name that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobTrace<'a> {
    /// W3C `traceparent` of the ingest span.
    pub traceparent: &'a str,
    /// The ingest request's `X-Request-Id`.
    pub request_id: &'a str,
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

/// Encodes a queue job: `device_id \n user_id \n flags [trace] \n body`,
/// where `flags` is `d` or `c` (the [`JobEncoding`]) then `1` or `0`
/// (address listed or not), `trace` (when there is one) is
/// ` traceparent request_id` (neither holds a space or a newline: the
/// request id is sanitised, a `traceparent` is hex and dashes), and `body`
/// the heartbeat in postcard. Workers read jobs without a trace as before;
/// a worker older than the trace field refuses jobs with one, so workers
/// are upgraded before API replicas.
pub fn encode_job(
    device_id: &str,
    user_id: Uuid,
    ip_listed: bool,
    trace: Option<JobTrace<'_>>,
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
    if let Some(trace) = trace.filter(|t| single_token(t.traceparent) && single_token(t.request_id))
    {
        job.push(b' ');
        job.extend_from_slice(trace.traceparent.as_bytes());
        job.push(b' ');
        job.extend_from_slice(trace.request_id.as_bytes());
    }
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

/// Non-empty, with no space or newline: safe as a field of a job's flags line.
fn single_token(text: &str) -> bool {
    !text.is_empty() && !text.bytes().any(|b| b == b' ' || b == b'\n')
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
    let mut line = parts.next()?.split(|&b| b == b' ');
    let flags = line.next()?;
    let trace = match (line.next(), line.next(), line.next()) {
        (None, _, _) => None,
        (Some(traceparent), Some(request_id), None) => Some(JobTrace {
            traceparent: std::str::from_utf8(traceparent).ok()?,
            request_id: std::str::from_utf8(request_id).ok()?,
        }),
        _ => return None,
    };
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
            trace,
        },
        heartbeat,
    ))
}

/// Why a heartbeat was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The device's bucket is empty: nothing else happened.
    #[error("rate limited for {retry_after:?}")]
    RateLimited {
        /// When the device may try again.
        retry_after: Duration,
    },
    /// `seq` is not above the last one accepted (recorded, never scored).
    #[error("replayed heartbeat (last accepted {last_seq})")]
    Replay {
        /// The highest `seq` accepted from the device (this heartbeat's own
        /// when that was not readable: it is a lower bound either way).
        last_seq: u64,
    },
    /// The queue refused the job or the workers are behind, and scoring it
    /// inline failed too: the seq was given back, so a retry is not a replay.
    #[error("heartbeat not taken now")]
    Unavailable,
    /// The job did not encode.
    #[error("heartbeat job not encoded: {0}")]
    Encode(#[from] postcard::Error),
    /// The store failed (recording a replay).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The rate limiter failed (reading the plan).
    #[error(transparent)]
    Limiter(anyhow::Error),
}

/// The calling device's rate-limit bucket, as the transport takes its
/// tokens (HTTP: `billing::limits` and the `RateLimit-*` headers). Ingestion
/// takes the token with its own work when it queues, and on its own when it
/// scores inline.
pub trait Bucket: Sync {
    /// Takes one token on its own; [`IngestError::RateLimited`] when refused.
    fn take_token(&self) -> impl Future<Output = Result<(), IngestError>> + Send;
    /// The take of one token from the bucket at `key` (`rl:{device}`), for
    /// the step that also checks the seq and enqueues.
    fn one_token<'k>(
        &self,
        key: &'k str,
    ) -> impl Future<Output = Result<Take<'k>, IngestError>> + Send;
    /// Records that step's decision, refused or not.
    fn record(&self, decision: BucketDecision);
}

/// Who sent a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// The user.
    pub user_id: Uuid,
    /// The device.
    pub device_id: &'a str,
    /// The client address (only the blacklist verdict travels on; an
    /// anonymised form is kept with a replay).
    pub ip: Option<IpAddr>,
    /// The request's trace context and id, carried in the job.
    pub trace: Option<JobTrace<'a>>,
}

/// A heartbeat taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Its `seq`.
    pub seq: u64,
    /// Scored inline (the workers are behind, or the queue was full).
    pub degraded: bool,
}

/// Heartbeat ingestion: the rate-limit token, the seq, the enqueue — or,
/// when the circuit breaker says the workers are behind or the queue
/// refuses the job, inline scoring, giving the seq back if that fails.
pub struct Ingestion {
    /// Where replays are recorded.
    store: Arc<dyn Store>,
    /// The seqs, the buckets and the queue.
    shared: Arc<dyn SharedState>,
    /// The event builder (keyed IP HMAC) for replays.
    auth: Arc<Auth>,
    /// The address blacklist.
    intel: Arc<ThreatIntel>,
    /// Whether to score inline.
    breaker: Arc<Breaker>,
    /// The inline path.
    scoring: Arc<Scoring>,
    /// The `signals_*` counters.
    metrics: Arc<Metrics>,
    /// The durable copy of each device's last accepted `seq`.
    sequences: Arc<Sequences>,
}

impl Ingestion {
    /// Ingestion with these handles.
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        intel: Arc<ThreatIntel>,
        breaker: Arc<Breaker>,
        scoring: Arc<Scoring>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sequences: Sequences::start(store.clone()),
            store,
            shared,
            auth,
            intel,
            breaker,
            scoring,
            metrics,
        }
    }

    /// The write-behind of sequence numbers (the kill-switch sockets note
    /// their ack positions in it too).
    pub fn sequences(&self) -> Arc<Sequences> {
        self.sequences.clone()
    }

    /// Writes the accepted `seq`s still waiting for the store (at shutdown).
    pub async fn flush_sequences(&self) {
        if let Err(e) = self.sequences.flush().await {
            tracing::warn!(error = %e, "heartbeat seqs not written to the store at shutdown");
        }
    }

    /// Refills a device's missing `seq` key from the store (see
    /// `crate::sequences`): a missing value must never accept any `seq`.
    async fn refill_seq(&self, device_id: &str, seq_key: &str) -> Result<(), IngestError> {
        let seed = self
            .sequences
            .seed(SequenceKind::Heartbeat, device_id)
            .await?;
        self.shared.set_max(seq_key, seed, STATE_TTL).await?;
        Ok(())
    }

    /// Takes a validated heartbeat of `sender`, its token from `bucket`.
    ///
    /// Workers keeping up: the token, the seq check and the enqueue are one
    /// step (one round trip on one Redis node, two on a cluster), and `Ok`
    /// means the job is on the queue. A `seq` missing from shared state is
    /// refilled from the store first (`crate::sequences`). Workers behind, or the queue full: the token and the seq are
    /// taken, the heartbeat is scored here and the answer is `degraded`; if
    /// that scoring fails the seq is given back and the answer is
    /// [`IngestError::Unavailable`]. Never a silent drop.
    pub async fn accept(
        &self,
        sender: Sender<'_>,
        heartbeat: Heartbeat,
        bucket: &impl Bucket,
    ) -> Result<Accepted, IngestError> {
        let Sender {
            user_id,
            device_id,
            ip,
            trace,
        } = sender;
        let seq = heartbeat.seq;
        let seq_key = keys::heartbeat_seq(device_id);
        let ip_listed = self.intel.ip_listed(ip);
        let previous = if self.breaker.degraded() {
            // The workers are behind: take the token and the seq, then score below.
            bucket.take_token().await?;
            if self.shared.get(&seq_key).await?.is_none() {
                self.refill_seq(device_id, &seq_key).await?;
            }
            match self.shared.advance(&seq_key, seq, STATE_TTL).await? {
                Some(previous) => previous,
                None => return Err(self.replay(sender, seq, &seq_key).await),
            }
        } else {
            // The rate-limit token, the seq check and the enqueue are one step
            // (one round trip on one Redis node): `Ok` means the heartbeat is on the queue.
            let encoding = JobEncoding::for_queue_of(self.shared.as_ref());
            let job = encode_job(device_id, user_id, ip_listed, trace, &heartbeat, encoding)?;
            let bucket_key = keys::rate_limit(device_id);
            let take = bucket.one_token(&bucket_key).await?;
            let admitted = self
                .shared
                .take_then_advance_and_enqueue(
                    take,
                    &seq_key,
                    seq,
                    STATE_TTL,
                    keys::HEARTBEAT_QUEUE,
                    &job,
                )
                .await?;
            bucket.record(admitted.bucket);
            let mut advanced = match admitted.advanced {
                Some(advanced) if admitted.bucket.allowed => advanced,
                _ => {
                    return Err(IngestError::RateLimited {
                        retry_after: admitted.bucket.retry_after,
                    })
                }
            };
            if advanced == Advanced::Unknown {
                // The token is taken; refill the seq and try once more.
                self.refill_seq(device_id, &seq_key).await?;
                advanced = self
                    .shared
                    .advance_and_enqueue(&seq_key, seq, STATE_TTL, keys::HEARTBEAT_QUEUE, &job)
                    .await?;
            }
            match advanced {
                Advanced::Stale => return Err(self.replay(sender, seq, &seq_key).await),
                Advanced::Unknown => return Err(IngestError::Unavailable),
                Advanced::Queued { .. } => {
                    self.sequences.note(SequenceKind::Heartbeat, device_id, seq);
                    self.metrics.signals_accepted.inc();
                    return Ok(Accepted {
                        seq,
                        degraded: false,
                    });
                }
                Advanced::QueueFull { previous } => {
                    self.breaker.trip();
                    tracing::warn!("heartbeat queue full: scoring inline (degraded)");
                    previous
                }
            }
        };
        // Degraded: score here, now.
        self.metrics.signals_degraded_heartbeats.inc();
        let scored = self
            .scoring
            .score(device_id, user_id, heartbeat, ip_listed, true)
            .await;
        if let Err(e) = scored {
            tracing::error!(error = %e, "inline scoring failed");
            // The seq goes back, so the client's retry is not taken for a replay.
            if let Err(e) = self
                .shared
                .retreat(&seq_key, seq, previous, STATE_TTL)
                .await
            {
                tracing::warn!(error = %e, "heartbeat seq not given back after a failure");
            }
            return Err(IngestError::Unavailable);
        }
        self.sequences.note(SequenceKind::Heartbeat, device_id, seq);
        self.metrics.signals_accepted.inc();
        Ok(Accepted {
            seq,
            degraded: true,
        })
    }

    /// Records a replayed heartbeat (never scored): [`IngestError::Replay`]
    /// with the device's last accepted `seq` (read once more: the replay
    /// path is rare and the hot path's one round trip stays one), or the
    /// store's error if the record failed.
    async fn replay(&self, sender: Sender<'_>, seq: u64, seq_key: &str) -> IngestError {
        self.metrics.signals_replays.inc();
        let last_seq = match self.shared.get(seq_key).await {
            Ok(value) => value
                .and_then(|raw| std::str::from_utf8(&raw).ok()?.parse::<u64>().ok())
                .unwrap_or(seq),
            Err(e) => return e.into(),
        };
        let recorded = self
            .store
            .record_event(self.auth.event(
                "signals:replay",
                Some(sender.user_id),
                Some(sender.device_id),
                sender.ip,
                serde_json::json!({"seq": seq}),
            ))
            .await;
        match recorded {
            Ok(_) => IngestError::Replay { last_seq },
            Err(e) => e.into(),
        }
    }
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
        // Each touch field by name, with its range in the message.
        for (from, to, named, range) in [
            (r#""x": 0.41"#, r#""x": 1.5"#, "touches[0].x", "0–1"),
            (r#""y": 0.77"#, r#""y": -0.1"#, "touches[0].y", "0–1"),
            (r#""size": 0.031"#, r#""size": 2"#, "touches[0].size", "0–1"),
            (
                r#""pressure": 0.62"#,
                r#""pressure": 11"#,
                "touches[0].pressure",
                "0–10",
            ),
            (r#""t": 120"#, r#""t": 60001"#, "touches[0].t", "0–60000"),
        ] {
            let refused = parse(&BODY.replace(from, to)).validate().expect_err(to);
            assert_eq!(refused.field, named);
            assert!(refused.message.contains(range), "{}", refused.message);
        }
        let refused = parse(&BODY.replace("9.78", "9999"))
            .validate()
            .expect_err("9999");
        assert!(refused.message.contains("±160"), "{}", refused.message);
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
            let job = encode_job("device_0001", user, true, None, &hb, encoding).expect("encodes");
            let (header, back) = decode_job(&job).expect("decodes");
            assert_eq!(
                header,
                JobHeader {
                    device_id: "device_0001",
                    user_id: user,
                    ip_listed: true,
                    trace: None,
                }
            );
            assert_eq!(back, hb);
            assert_eq!(decode_job(&job[..job.len() - 1]), None, "truncated");
        }
        assert_eq!(decode_job(b"no newline"), None);
    }

    #[test]
    fn jobs_carry_their_trace() {
        let user = Uuid::now_v7();
        let hb = heartbeat();
        let trace = JobTrace {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            request_id: "req-42",
        };
        for encoding in [JobEncoding::Small, JobEncoding::Fast] {
            let job = encode_job("device_0001", user, false, Some(trace), &hb, encoding)
                .expect("encodes");
            let (header, back) = decode_job(&job).expect("decodes");
            assert_eq!(header.trace, Some(trace));
            assert!(!header.ip_listed);
            assert_eq!(back, hb);
        }
        // A value that could split the line is not written at all.
        let odd = JobTrace {
            traceparent: "00-a b",
            request_id: "req-42",
        };
        let job = encode_job(
            "device_0001",
            user,
            false,
            Some(odd),
            &hb,
            JobEncoding::Fast,
        )
        .expect("encodes");
        assert_eq!(decode_job(&job).expect("decodes").0.trace, None);
        // A flags line with a stray field is refused, not misread.
        let mut bad = b"device_0001\n".to_vec();
        bad.extend_from_slice(user.to_string().as_bytes());
        bad.extend_from_slice(b"\nc0 one\n");
        assert_eq!(decode_job(&bad), None);
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
            encode_job("device_0001", user, true, None, &hb, JobEncoding::Fast).expect("encodes"),
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
            encode_job("device_0001", user, false, None, &hb, JobEncoding::Small).expect("encodes");
        let fast =
            encode_job("device_0001", user, false, None, &hb, JobEncoding::Fast).expect("encodes");
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

    /// [`Ingestion::accept`] on the in-process backends (SQLite in a temp
    /// dir, [`MemoryState`](crate::state::MemoryState)), without a socket.
    mod accept {
        use std::sync::Mutex;

        use super::*;
        use crate::{
            billing::plans::PlanCache, config::Config, signals::breaker::ScoringMeter,
            state::MemoryState,
        };

        const DEVICE: &str = "dev-accept-0001";

        /// A bucket of `capacity` tokens per minute, keeping its decisions.
        struct TestBucket {
            shared: Arc<dyn SharedState>,
            capacity: u32,
            recorded: Mutex<Vec<BucketDecision>>,
        }

        impl Bucket for TestBucket {
            async fn take_token(&self) -> Result<(), IngestError> {
                let key = keys::rate_limit(DEVICE);
                let decision = self
                    .shared
                    .take_tokens(&key, self.capacity, Duration::from_secs(60), 1)
                    .await?;
                self.record(decision);
                if decision.allowed {
                    Ok(())
                } else {
                    Err(IngestError::RateLimited {
                        retry_after: decision.retry_after,
                    })
                }
            }

            async fn one_token<'k>(&self, key: &'k str) -> Result<Take<'k>, IngestError> {
                Ok(Take {
                    key,
                    capacity: self.capacity,
                    period: Duration::from_secs(60),
                    cost: 1,
                })
            }

            fn record(&self, decision: BucketDecision) {
                self.recorded.lock().expect("lock").push(decision);
            }
        }

        struct Harness {
            ingestion: Ingestion,
            shared: Arc<dyn SharedState>,
            breaker: Arc<Breaker>,
            metrics: Arc<Metrics>,
            bucket: TestBucket,
            _dir: tempfile::TempDir,
        }

        impl Harness {
            async fn accept(&self, seq: u64) -> Result<Accepted, IngestError> {
                let mut hb = heartbeat();
                hb.seq = seq;
                let sender = Sender {
                    user_id: Uuid::nil(),
                    device_id: DEVICE,
                    ip: Some("192.0.2.7".parse().expect("ip")),
                    trace: None,
                };
                self.ingestion.accept(sender, hb, &self.bucket).await
            }

            async fn queued(&self) -> u64 {
                self.shared
                    .queue_stats(keys::HEARTBEAT_QUEUE)
                    .await
                    .expect("stats")
                    .len
            }

            /// Holds the device's scoring lock as another worker would, so
            /// inline scoring fails (after waiting for it).
            async fn hold_scoring_lock(&self) {
                let taken = self
                    .shared
                    .set_nx(
                        &keys::scoring_lock(DEVICE),
                        b"another-worker",
                        Some(Duration::from_secs(30)),
                    )
                    .await
                    .expect("lock");
                assert!(taken);
            }

            async fn free_scoring_lock(&self) {
                self.shared
                    .delete(&keys::scoring_lock(DEVICE))
                    .await
                    .expect("unlock");
            }
        }

        async fn harness(queue_capacity: usize, tokens: u32) -> Harness {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = Config::embedded_in(dir.path());
            let store = crate::store::connect(
                &config.database,
                config.database_max_connections,
                config.connect_timeout,
            )
            .await
            .expect("store");
            store.migrate().await.expect("migrate");
            let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(queue_capacity));
            let auth = Arc::new(
                Auth::load(&config, store.as_ref(), shared.clone())
                    .await
                    .expect("auth"),
            );
            let plans = Arc::new(PlanCache::start(shared.clone()).await.expect("plans"));
            let intel = ThreatIntel::start(store.clone(), shared.clone())
                .await
                .expect("intel");
            let metrics = Arc::new(Metrics::new());
            let scoring = Arc::new(Scoring::new(
                store.clone(),
                shared.clone(),
                auth.clone(),
                plans,
                intel.clone(),
                metrics.clone(),
                Arc::<ScoringMeter>::default(),
            ));
            let breaker = Arc::<Breaker>::default();
            let ingestion = Ingestion::new(
                store,
                shared.clone(),
                auth,
                intel,
                breaker.clone(),
                scoring,
                metrics.clone(),
            );
            Harness {
                ingestion,
                bucket: TestBucket {
                    shared: shared.clone(),
                    capacity: tokens,
                    recorded: Mutex::default(),
                },
                shared,
                breaker,
                metrics,
                _dir: dir,
            }
        }

        #[tokio::test]
        async fn workers_keeping_up_queue_the_heartbeat_in_one_step() {
            let h = harness(10, 100).await;
            let taken = h.accept(5).await.expect("accepted");
            assert_eq!(
                taken,
                Accepted {
                    seq: 5,
                    degraded: false
                }
            );
            assert_eq!(h.queued().await, 1);
            let recorded = h.bucket.recorded.lock().expect("lock").clone();
            assert_eq!(recorded.len(), 1, "the step's decision is recorded");
            assert!(recorded[0].allowed);
            assert_eq!(h.metrics.signals_accepted.get(), 1);
            assert_eq!(h.metrics.signals_degraded_heartbeats.get(), 0);
        }

        #[tokio::test]
        async fn a_seq_not_above_the_last_is_a_replay_recorded_never_scored() {
            let h = harness(10, 100).await;
            h.accept(5).await.expect("accepted");
            assert!(matches!(h.accept(5).await, Err(IngestError::Replay { .. })));
            assert!(matches!(h.accept(4).await, Err(IngestError::Replay { .. })));
            assert_eq!(h.metrics.signals_replays.get(), 2);
            assert_eq!(h.queued().await, 1, "replays are not queued");
            // Inline too.
            h.breaker.trip();
            assert!(matches!(h.accept(5).await, Err(IngestError::Replay { .. })));
            assert_eq!(h.metrics.signals_replays.get(), 3);
            assert_eq!(h.metrics.signals_degraded_heartbeats.get(), 0);
        }

        #[tokio::test]
        async fn an_empty_bucket_refuses_before_anything_else_happens() {
            let h = harness(10, 1).await;
            h.accept(1).await.expect("the one token");
            let refused = h.accept(2).await;
            assert!(
                matches!(refused, Err(IngestError::RateLimited { retry_after }) if retry_after > Duration::ZERO),
                "{refused:?}"
            );
            assert_eq!(h.queued().await, 1, "nothing queued");
            let recorded = h.bucket.recorded.lock().expect("lock").clone();
            assert_eq!(recorded.len(), 2);
            assert!(!recorded[1].allowed, "the refusal is recorded too");
            // Inline, the token comes first as well: the seq is not taken.
            h.breaker.trip();
            assert!(matches!(
                h.accept(2).await,
                Err(IngestError::RateLimited { .. })
            ));
            assert_eq!(h.metrics.signals_degraded_heartbeats.get(), 0);
            assert_eq!(h.metrics.signals_accepted.get(), 1);
        }

        #[tokio::test]
        async fn an_open_breaker_scores_inline_and_says_degraded() {
            let h = harness(10, 100).await;
            h.breaker.trip();
            let taken = h.accept(3).await.expect("accepted");
            assert_eq!(
                taken,
                Accepted {
                    seq: 3,
                    degraded: true
                }
            );
            assert_eq!(h.queued().await, 0, "scored here, not queued");
            assert_eq!(h.metrics.signals_degraded_heartbeats.get(), 1);
            // Scored: the device is unknown to this store, so scoring drops it.
            assert_eq!(h.metrics.signals_dropped.get(), 1);
            assert_eq!(h.metrics.signals_accepted.get(), 1);
            // Its seq was taken.
            assert!(matches!(h.accept(3).await, Err(IngestError::Replay { .. })));
        }

        #[tokio::test]
        async fn a_full_queue_trips_the_breaker_and_scores_inline() {
            let h = harness(1, 100).await;
            h.accept(1).await.expect("queued");
            assert!(!h.breaker.degraded());
            let taken = h.accept(2).await.expect("accepted");
            assert_eq!(
                taken,
                Accepted {
                    seq: 2,
                    degraded: true
                }
            );
            assert!(h.breaker.degraded(), "the refusal trips the breaker");
            assert_eq!(h.queued().await, 1);
            assert_eq!(h.metrics.signals_degraded_heartbeats.get(), 1);
            assert_eq!(h.metrics.signals_dropped.get(), 1, "scored inline");
            assert_eq!(h.metrics.signals_accepted.get(), 2);
        }

        #[tokio::test]
        async fn inline_scoring_that_fails_gives_the_seq_back() {
            let h = harness(10, 100).await;
            h.breaker.trip();
            h.accept(1).await.expect("accepted");
            h.hold_scoring_lock().await;
            assert!(matches!(h.accept(2).await, Err(IngestError::Unavailable)));
            assert_eq!(h.metrics.signals_accepted.get(), 1);
            h.free_scoring_lock().await;
            // The retry of the same seq is taken, not refused as a replay.
            let taken = h.accept(2).await.expect("the retry");
            assert!(taken.degraded);
            assert_eq!(h.metrics.signals_replays.get(), 0);
            assert_eq!(h.metrics.signals_accepted.get(), 2);
        }

        #[tokio::test]
        async fn a_refused_enqueue_whose_inline_scoring_fails_gives_the_seq_back() {
            let h = harness(1, 100).await;
            h.accept(1).await.expect("queued");
            h.hold_scoring_lock().await;
            assert!(matches!(h.accept(2).await, Err(IngestError::Unavailable)));
            assert!(h.breaker.degraded());
            assert_eq!(h.queued().await, 1, "the refused job is not queued");
            h.free_scoring_lock().await;
            let taken = h.accept(2).await.expect("the retry");
            assert_eq!(
                taken,
                Accepted {
                    seq: 2,
                    degraded: true
                }
            );
            assert_eq!(h.metrics.signals_replays.get(), 0);
        }
    }
}
