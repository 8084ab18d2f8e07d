//! Scoring a heartbeat: the worker's job, and the acts a lock decision
//! triggers.
//!
//! Per device, scoring is a read-modify-write of the engine state in shared
//! state (`sig:{device}`), so every worker can pick up any device. A short
//! per-device lock serialises two workers that got heartbeats of the same
//! device; the state remembers which recent `seq`s were scored, so a
//! redelivery changes nothing (at-least-once queue, idempotent effect) and a
//! heartbeat overtaken by a later one is still scored once.
//!
//! A worker scores a fetched batch with round trips shared by the batch
//! ([`score_batch`]): on Redis the cost of a heartbeat is mostly the round
//! trips around it, not the engine (docs/BENCHMARKS.md).
//!
//! A lock decision, on a device still active: status `locked` (its API calls
//! are refused at once on every instance), the kill-switch command
//! (`FORCE_OVERLAY` or `CRITICAL_LOCK`) published to its sockets, and an
//! audit row with the threat score, reasons, attestation state and action.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use blockremote_engine::{
    assess, Attestation, AttestationEvidence, Decision, DeviceState, Heartbeat, IntelHits,
    PlanTier, Situation,
};
use futures::StreamExt;
use tracing::Instrument;
use uuid::Uuid;

use super::{breaker::ScoringMeter, intel::ThreatIntel};
use super::{
    ingest::{decode_job, JobHeader},
    report::{LastReports, TrustReport},
    snapshots::Snapshots,
};
use crate::{
    auth::{device_status::Attestation as CachedAttestation, Auth},
    billing::plans::PlanCache,
    realtime::{self, Action},
    state::{keys, Commit, Job, SharedState},
    store::{
        AttestationGrade, AuditSource, DeviceStatus, HoldAction, HoldSource, NewAuditEntry,
        NewHold, Store,
    },
    telemetry::Metrics,
    workers::JobHandler,
};

/// How long engine state and reports are kept without heartbeats.
pub const STATE_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How long the per-device scoring lock lives if its holder dies.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// Held this much less than [`LOCK_TTL`], the lock is surely still ours
/// (clocks of the worker and Redis may drift apart that much).
const LOCK_DRIFT_MARGIN: Duration = Duration::from_secs(1);
/// How long a worker waits for another worker's lock on the same device.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long a window fingerprint is remembered across devices.
const FINGERPRINT_TTL: Duration = Duration::from_secs(86_400);

/// Scoring heartbeats: the handles it reads and writes, built once and
/// shared by the workers ([`HeartbeatScorer`]) and ingestion's inline path.
pub struct Scoring {
    /// Device status, audit rows, events.
    store: Arc<dyn Store>,
    /// Engine states, locks, fingerprints, reports, kill-switch commands.
    shared: Arc<dyn SharedState>,
    /// The device-status cache and the event builder (keyed IP HMAC).
    auth: Arc<Auth>,
    /// Each user's plan (the engine's tier).
    plans: Arc<PlanCache>,
    /// Blacklisted app hashes and domains.
    intel: Arc<ThreatIntel>,
    /// The `signals_*` metrics.
    metrics: Arc<Metrics>,
    /// This process's scoring times, for every instance's breaker.
    scoring_meter: Arc<ScoringMeter>,
    /// The reports this instance last read, served while Redis is down.
    last_reports: LastReports,
    /// The engine states' durable copy (see `super::snapshots`).
    snapshots: Arc<Snapshots>,
}

impl Scoring {
    /// Scoring with these handles.
    pub fn new(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        plans: Arc<PlanCache>,
        intel: Arc<ThreatIntel>,
        metrics: Arc<Metrics>,
        scoring_meter: Arc<ScoringMeter>,
    ) -> Self {
        Self {
            last_reports: LastReports::default(),
            snapshots: Snapshots::start(store.clone()),
            store,
            shared,
            auth,
            plans,
            intel,
            metrics,
            scoring_meter,
        }
    }

    /// Forgets what this instance keeps of a deleted device (its last
    /// report, a snapshot not yet written): an id signed in again later is
    /// another device.
    pub fn forget_device(&self, device_id: &str) {
        self.last_reports.forget(device_id);
        self.snapshots.forget(device_id);
    }

    /// Writes the engine snapshots still waiting for the store (at shutdown).
    pub async fn flush_snapshots(&self) {
        if let Err(e) = self.snapshots.flush().await {
            tracing::warn!(error = %e, "engine snapshots not written to the store at shutdown");
        }
    }

    /// The engine snapshots' write-behind (for tests and shutdown).
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    /// Scores one heartbeat and acts on the decision (see the function `score` below).
    pub async fn score(
        &self,
        device_id: &str,
        user_id: Uuid,
        heartbeat: Heartbeat,
        ip_listed: bool,
        degraded: bool,
    ) -> anyhow::Result<TrustReport> {
        score(self, device_id, user_id, heartbeat, ip_listed, degraded).await
    }

    /// Scores a fetched batch (see the function `score_batch` below); the ids handled.
    pub async fn score_batch(&self, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
        score_batch(self, jobs, parallel).await
    }

    /// The stored trust report of a device, if it has one. While shared
    /// state is unavailable, the last one this instance read, marked
    /// `degraded` (a device this instance never read still gets the error).
    pub async fn load_report(&self, device_id: &str) -> anyhow::Result<Option<TrustReport>> {
        match load_report(self, device_id).await {
            Ok(report) => {
                if let Some(report) = &report {
                    self.last_reports.remember(report);
                }
                Ok(report)
            }
            Err(e) => match (unavailable(&e), self.last_reports.fallback(device_id)) {
                (true, Some(last)) => {
                    tracing::debug!(device_id, "trust report served from this instance's copy");
                    Ok(Some(last))
                }
                _ => Err(e),
            },
        }
    }

    /// Forgets the evidence that led to a lock (see the function `clear_evidence` below).
    pub async fn clear_evidence(&self, device_id: &str) -> anyhow::Result<()> {
        clear_evidence(self, device_id).await
    }
}

/// The heartbeat queue's job handler.
pub struct HeartbeatScorer {
    scoring: Arc<Scoring>,
}

impl HeartbeatScorer {
    /// A handler scoring with `scoring`.
    pub fn new(scoring: Arc<Scoring>) -> Self {
        Self { scoring }
    }
}

#[async_trait]
impl JobHandler for HeartbeatScorer {
    async fn handle(&self, job: &Job) -> anyhow::Result<()> {
        // A job that cannot be decoded never will be: log and drop it
        // rather than retry it forever (ingestion only enqueues valid ones).
        let Some((header, heartbeat)) = decode_job(&job.payload) else {
            tracing::error!(job = %job.id, "undecodable heartbeat job dropped");
            return Ok(());
        };
        let span = job_span(&header, heartbeat.seq);
        score(
            &self.scoring,
            header.device_id,
            header.user_id,
            heartbeat,
            header.ip_listed,
            false,
        )
        .instrument(span)
        .await?;
        Ok(())
    }

    async fn handle_batch(&self, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
        score_batch(&self.scoring, jobs, parallel).await
    }
}

/// The scoring span of a job that carries its ingest request's trace: a
/// child of the ingest span (when export is on), naming the request id and
/// trace id in its log lines. A job without one gets no span (no cost).
fn job_span(header: &JobHeader<'_>, seq: u64) -> tracing::Span {
    let Some(trace) = header.trace else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "signals.score",
        device_id = header.device_id,
        seq,
        request_id = trace.request_id,
        trace_id = trace.traceparent.get(3..35).unwrap_or(""),
    );
    crate::telemetry::trace::adopt_context(&span, trace.traceparent);
    span
}

/// A device's scoring lock, held, with the engine state read under it.
struct ScoringLock<'a> {
    scoring: &'a Scoring,
    key: String,
    token: String,
    /// Where the engine state lives (read under the lock, saved by `commit`).
    state_key: String,
    /// When the lock was asked for: its TTL runs from no earlier.
    asked_at: std::time::Instant,
    engine: DeviceState,
    /// The saved state is snapshotted whether due or not (an operator's
    /// unlock must not come back from an older snapshot).
    force_snapshot: bool,
}

impl ScoringLock<'_> {
    /// Releases the lock without writing (a failure: the job is retried).
    async fn release(self) {
        // Only our own lock (one atomic compare-and-delete): a lock that
        // expired and was taken by another worker is not ours to drop.
        if let Err(e) = self
            .scoring
            .shared
            .delete_if(&self.key, self.token.as_bytes())
            .await
        {
            tracing::warn!(error = %e, "scoring lock not released; it expires by itself");
        }
    }

    /// Saves the engine state (and the report, when given), then releases
    /// the lock — one round trip on Redis.
    async fn commit(
        self,
        device_id: &str,
        engine: &DeviceState,
        report: Option<&TrustReport>,
    ) -> anyhow::Result<()> {
        let state_bytes = encode_state(engine)?;
        if self.scoring.snapshots.due(device_id, self.force_snapshot) {
            self.scoring
                .snapshots
                .note(device_id, &state_bytes, self.force_snapshot);
        }
        let report = report
            .map(|r| {
                Ok::<_, serde_json::Error>((keys::trust_report(device_id), serde_json::to_vec(r)?))
            })
            .transpose()?;
        let mut entries: Vec<(&str, &[u8], Option<Duration>)> = Vec::with_capacity(2);
        if let Some((key, bytes)) = &report {
            entries.push((key, bytes, Some(STATE_TTL)));
        }
        entries.push((&self.state_key, &state_bytes, Some(STATE_TTL)));
        let released = self
            .scoring
            .shared
            .set_many_and_unlock(
                &entries,
                &self.key,
                self.token.as_bytes(),
                self.asked_at.elapsed() < LOCK_TTL - LOCK_DRIFT_MARGIN,
            )
            .await?;
        if !released {
            tracing::warn!(device_id, "scoring lock expired before the state was saved");
        }
        Ok(())
    }
}

/// The engine state in postcard, written into a buffer sized for it at
/// once (grown from empty, its ~4.5 KB were copied at every doubling).
fn encode_state(engine: &DeviceState) -> postcard::Result<Vec<u8>> {
    postcard::to_extend(engine, Vec::with_capacity(STATE_BYTES_HINT))
}

/// Room for an engine state with full rings (three of 100 `f64`s, plus
/// baselines and recent `seq`s) and its five whitened residuals for
/// near-duplicate replays (1.4 KB, `blockremote_engine::replay`).
const STATE_BYTES_HINT: usize = 6144;

/// Takes the device's scoring lock and reads its engine state under it
/// (one round trip on Redis), waiting up to [`LOCK_WAIT`] for another
/// worker's lock.
async fn lock<'a>(scoring: &'a Scoring, device_id: &str) -> anyhow::Result<ScoringLock<'a>> {
    let key = keys::scoring_lock(device_id);
    let state_key = keys::signal_state(device_id);
    let token = Uuid::new_v4().simple().to_string();
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let asked_at = std::time::Instant::now();
        if let Some(raw) = scoring
            .shared
            .lock_and_get(&key, token.as_bytes(), LOCK_TTL, &state_key)
            .await?
        {
            // A state Redis no longer has comes back from its snapshot; one
            // from an older encoding starts afresh.
            let raw = match raw {
                Some(raw) => Some(raw),
                None => restore_snapshots(scoring, &[device_id])
                    .await
                    .remove(device_id),
            };
            let engine = raw
                .and_then(|raw| postcard::from_bytes(&raw).ok())
                .unwrap_or_default();
            return Ok(ScoringLock {
                scoring,
                key,
                token,
                state_key,
                asked_at,
                engine,
                force_snapshot: false,
            });
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("device {device_id} is being scored elsewhere; retry later");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The snapshots of the engine states Redis no longer has (see
/// `super::snapshots`); none when the store cannot be read — the device
/// then starts afresh, as before snapshots, rather than wait for it.
async fn restore_snapshots(scoring: &Scoring, device_ids: &[&str]) -> HashMap<String, Vec<u8>> {
    match scoring.snapshots.restore(device_ids, STATE_TTL).await {
        Ok(found) => {
            if !found.is_empty() {
                tracing::info!(
                    devices = found.len(),
                    "engine states restored from snapshots"
                );
            }
            found
        }
        Err(e) => {
            tracing::warn!(error = %e, "engine snapshots unreadable; missing states start afresh");
            HashMap::new()
        }
    }
}

/// The stored trust report of a device, if it has one.
/// Whether `e` says shared state could not be reached (not a corrupt value).
fn unavailable(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::state::StateError>(),
        Some(crate::state::StateError::Unavailable(_))
    )
}

async fn load_report(scoring: &Scoring, device_id: &str) -> anyhow::Result<Option<TrustReport>> {
    Ok(scoring
        .shared
        .get(&keys::trust_report(device_id))
        .await?
        .and_then(|raw| serde_json::from_slice(&raw).ok()))
}

/// The engine's view of the device's attestation (grade and evidence).
fn attestation_of(cached: CachedAttestation) -> (Attestation, AttestationEvidence) {
    let grade = match cached.grade {
        AttestationGrade::Unknown => Attestation::Unknown,
        AttestationGrade::Strong => Attestation::Strong,
        AttestationGrade::Device => Attestation::Device,
        AttestationGrade::Basic => Attestation::Basic,
        AttestationGrade::Failed => Attestation::Failed,
    };
    let evidence = AttestationEvidence {
        capturing_app: cached.capturing_app,
        controlling_app: cached.controlling_app,
        play_protect_risk: cached.play_protect_risk,
    };
    (grade, evidence)
}

/// True when this window was first sent by another device (replayed across
/// devices). The first sender claims the fingerprint for a day.
async fn seen_elsewhere(
    scoring: &Scoring,
    device_id: &str,
    heartbeat: &Heartbeat,
) -> anyhow::Result<bool> {
    let Some(fp) = blockremote_engine::features::window_fingerprint(heartbeat) else {
        return Ok(false);
    };
    let holder = scoring
        .shared
        .claim(
            &keys::window_fingerprint(fp),
            device_id.as_bytes(),
            FINGERPRINT_TTL,
        )
        .await?;
    Ok(holder.is_some_and(|first| first != device_id.as_bytes()))
}

/// Scores one heartbeat of `device_id` and acts on the decision; returns
/// the new report. `degraded`: scored inline by ingestion because the
/// workers are behind — the same checks and engine, the cross-device replay
/// check included (skipping it while degraded let an attacker who fills the
/// queue replay another device's windows unseen); only the report says so.
async fn score(
    scoring: &Scoring,
    device_id: &str,
    user_id: Uuid,
    heartbeat: Heartbeat,
    ip_listed: bool,
    degraded: bool,
) -> anyhow::Result<TrustReport> {
    let started = std::time::Instant::now();
    let mut guard = lock(scoring, device_id).await?;
    let mut engine = std::mem::take(&mut guard.engine);
    let result = match seen_elsewhere(scoring, device_id, &heartbeat).await {
        Ok(seen) => {
            score_locked(
                scoring,
                device_id,
                user_id,
                heartbeat,
                ip_listed,
                degraded,
                seen,
                &mut engine,
            )
            .await
        }
        Err(e) => Err(e),
    };
    let scored = matches!(result, Ok(Some(_)));
    let result = match result {
        // A failed commit leaves the lock to expire by itself (the store
        // that refused the write would refuse the release too). The job is
        // retried; if the state did land, the retry finds its seq scored.
        Ok(Some(report)) => guard
            .commit(device_id, &engine, Some(&report))
            .await
            .map(|()| {
                scoring.metrics.signals_scored.inc();
                report
            }),
        Ok(None) => {
            // Redelivered by the at-least-once queue (already counted), or
            // a device that does not exist (counted as dropped).
            guard.release().await;
            load_report(scoring, device_id).await.map(|report| {
                report.unwrap_or_else(|| {
                    TrustReport::neutral(device_id, AttestationGrade::Unknown, false)
                })
            })
        }
        Err(e) => {
            guard.release().await;
            Err(e)
        }
    };
    let elapsed = started.elapsed();
    scoring
        .metrics
        .signals_scoring_seconds
        .observe(elapsed.as_secs_f64());
    // The workers' meter, as the batch path counts: heartbeats scored and saved.
    if scored && !degraded && result.is_ok() {
        scoring.scoring_meter.record(elapsed, 1);
    }
    result
}

/// The heartbeats of one device in a batch, in queue order.
struct DeviceJobs<'a> {
    device_id: &'a str,
    jobs: Vec<(&'a Job, JobHeader<'a>, Heartbeat)>,
}

/// A device's scoring lock as a batch asks for it.
struct BatchLock {
    /// The lock (`sig:lock:{device}`).
    key: String,
    /// This batch's token for it: only the holder of the token releases it.
    token: String,
    /// The engine state read under the lock (`sig:{device}`).
    state_key: String,
}

/// A device of the batch whose lock the batch holds, with the engine state
/// read under it.
struct HeldDevice<'a> {
    device: DeviceJobs<'a>,
    engine: DeviceState,
    lock: BatchLock,
}

/// The devices of a batch once their locks were asked for.
struct Locked<'a> {
    /// When every lock of the batch was asked for: their TTL runs from no
    /// earlier.
    asked_at: std::time::Instant,
    /// Devices whose lock was free, now held by the batch.
    held: Vec<HeldDevice<'a>>,
    /// Devices whose lock another worker holds.
    contended: Vec<DeviceJobs<'a>>,
}

/// What scoring one held device came to (nothing saved yet).
struct DeviceOutcome<'a> {
    device_id: &'a str,
    engine: DeviceState,
    lock: BatchLock,
    /// Every job of the device up to the one that failed, if one did.
    ids: Vec<String>,
    /// The report of the last heartbeat scored.
    report: Option<TrustReport>,
    /// Heartbeats scored (not redeliveries, not unknown devices).
    scored: u64,
    failure: Option<anyhow::Error>,
}

/// A device whose scoring succeeded, encoded for the save.
struct Save {
    lock: BatchLock,
    ids: Vec<String>,
    scored: u64,
    state_bytes: Vec<u8>,
    /// `(key, bytes)` of the latest report, unless it failed to encode.
    report: Option<(String, Vec<u8>)>,
}

impl Save {
    /// The device's writes and its lock's release: its state and latest
    /// report when it scored anything, else the release alone. A plain
    /// release (`within_ttl`): [`commit_saves`] commits only while every
    /// lock of the batch is surely still held.
    fn commit(&self) -> Commit<'_> {
        let mut entries: Vec<(&str, &[u8], Option<Duration>)> = Vec::with_capacity(2);
        if self.scored > 0 {
            if let Some((key, bytes)) = &self.report {
                entries.push((key.as_str(), bytes.as_slice(), Some(STATE_TTL)));
            }
            entries.push((
                self.lock.state_key.as_str(),
                self.state_bytes.as_slice(),
                Some(STATE_TTL),
            ));
        }
        Commit {
            entries,
            lock: self.lock.key.as_str(),
            token: self.lock.token.as_bytes(),
            // Checked by `commit_saves`: a plain delete releases them.
            within_ttl: true,
        }
    }
}

/// What the commit phase came to.
enum Committed {
    /// Saved, the locks released (one found expired is logged): the jobs
    /// to ack.
    Acked(Vec<String>),
    /// The save failed: its jobs stay pending; the batch goes on.
    LeftPending,
    /// Too slow to save under the locks: nothing saved, the locks released,
    /// and the batch stops there (its contended devices stay pending too).
    GivenUp,
}

/// Scores a fetched batch with round trips shared by the whole batch: the
/// scoring locks and engine states of all its devices in one, their window
/// fingerprints in one, every save and release in one — instead of three
/// per heartbeat. A device whose lock is held elsewhere is scored on its
/// own afterwards (waiting for the lock). Returns the ids of the jobs
/// handled; a device whose scoring or save fails leaves its jobs pending.
///
/// Delivery is at-least-once: a job not returned stays pending and is
/// retried (by this worker or one that reclaims it). That is safe because
/// scoring is idempotent per device + seq — the engine state remembers the
/// `seq`s it scored, and a retry after a save that did land finds them
/// scored. The phases, in order:
///
/// 1. [`group_by_device`] — decode the jobs, drop the undecodable ones;
/// 2. [`lock_and_load`] — take every lock, read every state (a round trip);
/// 3. [`claim_fingerprints`] — claim every window (a round trip);
/// 4. [`score_held`] — the engine, per device, acting on its decisions;
/// 5. [`prepare_saves`] — encode what is to be saved (and the snapshots due);
/// 6. [`commit_saves`] — release the failed devices' locks, then save and
///    release the rest under the lock TTL rule (a round trip), then ack;
/// 7. [`score_contended`] — the devices locked elsewhere, one by one.
async fn score_batch(scoring: &Scoring, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
    let started = std::time::Instant::now();
    let (devices, mut done) = group_by_device(&jobs);
    if devices.is_empty() {
        return done;
    }
    let Some(Locked {
        asked_at,
        held,
        contended,
    }) = lock_and_load(scoring, devices).await
    else {
        return done;
    };
    let Some(seen) = claim_fingerprints(scoring, &held).await else {
        return done;
    };
    let outcomes = score_held(scoring, held, seen, parallel).await;
    let (saves, failed) = prepare_saves(outcomes, &scoring.snapshots);
    match commit_saves(scoring, saves, failed, asked_at, started).await {
        Committed::Acked(ids) => done.extend(ids),
        Committed::LeftPending => {}
        Committed::GivenUp => return done,
    }
    done.extend(score_contended(scoring, contended, parallel).await);
    done
}

/// Phase 1: the batch's jobs grouped by device, devices in the order of
/// their first job and each device's jobs in queue order — the order they
/// are scored in. Also the ids of the undecodable jobs, handled already: a
/// job that cannot be decoded never will be, so it is logged and dropped
/// (acked) rather than retried forever. No round trip.
fn group_by_device(jobs: &[Job]) -> (Vec<DeviceJobs<'_>>, Vec<String>) {
    let mut done = Vec::with_capacity(jobs.len());
    let mut devices: Vec<DeviceJobs<'_>> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for job in jobs {
        // A job that cannot be decoded never will be: log and drop it.
        let Some((header, heartbeat)) = decode_job(&job.payload) else {
            tracing::error!(job = %job.id, "undecodable heartbeat job dropped");
            done.push(job.id.clone());
            continue;
        };
        let i = *slot.entry(header.device_id).or_insert_with(|| {
            devices.push(DeviceJobs {
                device_id: header.device_id,
                jobs: Vec::new(),
            });
            devices.len() - 1
        });
        devices[i].jobs.push((job, header, heartbeat));
    }
    (devices, done)
}

/// Phase 2: takes the scoring lock of every device (a fresh token each,
/// with [`LOCK_TTL`]) and reads the engine state of those it got under it —
/// one round trip for the batch (`lock_and_get_many`). A state from an
/// older encoding starts afresh. A device whose lock another worker holds
/// is set aside, not waited for.
///
/// `None` when the round trip fails: the whole batch stays pending for
/// retry, and any lock that was taken expires by itself within its TTL.
async fn lock_and_load<'a>(scoring: &Scoring, devices: Vec<DeviceJobs<'a>>) -> Option<Locked<'a>> {
    let locks: Vec<BatchLock> = devices
        .iter()
        .map(|d| BatchLock {
            key: keys::scoring_lock(d.device_id),
            token: Uuid::new_v4().simple().to_string(),
            state_key: keys::signal_state(d.device_id),
        })
        .collect();
    let requests: Vec<(&str, &[u8], &str)> = locks
        .iter()
        .map(|lock| {
            (
                lock.key.as_str(),
                lock.token.as_bytes(),
                lock.state_key.as_str(),
            )
        })
        .collect();
    let asked_at = std::time::Instant::now();
    let read = match scoring.shared.lock_and_get_many(&requests, LOCK_TTL).await {
        Ok(read) => read,
        Err(e) => {
            // Locks that were taken expire by themselves; all stays pending.
            tracing::warn!(error = %e, "scoring locks not taken; batch left pending");
            return None;
        }
    };
    // States Redis no longer has come back from their snapshots.
    let missing: Vec<&str> = devices
        .iter()
        .zip(&read)
        .filter(|(_, raw)| matches!(raw, Some(None)))
        .map(|(d, _)| d.device_id)
        .collect();
    let mut restored = restore_snapshots(scoring, &missing).await;
    let mut held = Vec::new();
    let mut contended = Vec::new();
    for ((device, lock), raw) in devices.into_iter().zip(locks).zip(read) {
        match raw {
            Some(raw) => {
                // A state from an older encoding starts afresh.
                let engine: DeviceState = raw
                    .or_else(|| restored.remove(device.device_id))
                    .and_then(|raw| postcard::from_bytes(&raw).ok())
                    .unwrap_or_default();
                held.push(HeldDevice {
                    device,
                    engine,
                    lock,
                });
            }
            None => contended.push(device),
        }
    }
    Some(Locked {
        asked_at,
        held,
        contended,
    })
}

/// Phase 3: claims the window fingerprint of every heartbeat under a lock
/// (`sig:fp:{hash}`, for [`FINGERPRINT_TTL`]) — one round trip for the
/// batch (`claim_many`), in the order the batch scores them (device by
/// device, each in queue order), so that of two devices of the batch
/// sending the same window the earlier one claims it. Not for redeliveries
/// of heartbeats already scored (their claim was made the first time).
///
/// Per held device, per job: the window was first sent by another device.
/// `None` when the round trip fails: every held lock is released and the
/// whole batch (contended devices too) stays pending for retry.
async fn claim_fingerprints(scoring: &Scoring, held: &[HeldDevice<'_>]) -> Option<Vec<Vec<bool>>> {
    let senders: Vec<(&str, Option<String>)> = held
        .iter()
        .flat_map(|h| h.device.jobs.iter().map(move |job| (job, &h.engine)))
        .map(|((_, header, heartbeat), engine)| {
            let fp = (!engine.already_scored(heartbeat.seq))
                .then(|| blockremote_engine::features::window_fingerprint(heartbeat))
                .flatten();
            (header.device_id, fp.map(keys::window_fingerprint))
        })
        .collect();
    let claims: Vec<(&str, &[u8])> = senders
        .iter()
        .filter_map(|(device_id, fp)| fp.as_deref().map(|fp| (fp, device_id.as_bytes())))
        .collect();
    let mut holders = match scoring.shared.claim_many(&claims, FINGERPRINT_TTL).await {
        Ok(holders) => holders.into_iter(),
        Err(e) => {
            tracing::warn!(error = %e, "window fingerprints not claimed; batch left pending");
            let locks: Vec<_> = held.iter().map(|h| &h.lock).collect();
            release_locks(scoring, &locks).await;
            return None;
        }
    };
    let mut seen = senders.iter().map(|(device_id, fp)| {
        fp.is_some()
            && holders
                .next()
                .flatten()
                .is_some_and(|first| first != device_id.as_bytes())
    });
    Some(
        held.iter()
            .map(|h| {
                h.device
                    .jobs
                    .iter()
                    .map(|_| seen.next().unwrap_or(false))
                    .collect()
            })
            .collect(),
    )
}

/// Phase 4: scores every held device ([`score_device`]), up to `parallel`
/// devices side by side; the outcomes in the order they finish. Nothing is
/// saved yet and every lock is still held.
async fn score_held<'a>(
    scoring: &Scoring,
    held: Vec<HeldDevice<'a>>,
    seen: Vec<Vec<bool>>,
    parallel: usize,
) -> Vec<DeviceOutcome<'a>> {
    let work: Vec<_> = held
        .into_iter()
        .zip(seen)
        .map(|(device, seen)| score_device(scoring, device, seen))
        .collect();
    futures::stream::iter(work)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await
}

/// Scores one held device's heartbeats in queue order with the engine
/// ([`score_locked`]) on the state read under its lock. A redelivered `seq`
/// (already scored) leaves the state as it is, as does a heartbeat of an
/// unknown device (counted as dropped); either job is acked. A lock decision
/// is acted on here, before the save: if acting fails, the device's
/// scoring fails and its jobs are retried from the old state (the same
/// decision again) rather than acked half done. A failure stops the device
/// there: its later heartbeats wait for the retry too.
async fn score_device<'a>(
    scoring: &Scoring,
    held: HeldDevice<'a>,
    seen: Vec<bool>,
) -> DeviceOutcome<'a> {
    let HeldDevice {
        device,
        mut engine,
        lock,
    } = held;
    let mut report = None;
    let mut scored = 0u64;
    let mut failure = None;
    let device_id = device.device_id;
    let mut ids = Vec::with_capacity(device.jobs.len());
    for ((job, header, heartbeat), seen) in device.jobs.into_iter().zip(seen) {
        ids.push(job.id.clone());
        let span = job_span(&header, heartbeat.seq);
        match score_locked(
            scoring,
            device_id,
            header.user_id,
            heartbeat,
            header.ip_listed,
            false,
            seen,
            &mut engine,
        )
        .instrument(span)
        .await
        {
            Ok(Some(r)) => {
                report = Some(r);
                scored += 1;
            }
            Ok(None) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    DeviceOutcome {
        device_id,
        engine,
        lock,
        ids,
        report,
        scored,
        failure,
    }
}

/// Phase 5: encodes the state and latest report of every device scored
/// without failure, for the save; the locks of the others (scoring failed,
/// or its state did not encode) are to be released without a write, their
/// jobs left pending for retry. A report that does not encode is not saved
/// (the state still is). No round trip.
fn prepare_saves(
    outcomes: Vec<DeviceOutcome<'_>>,
    snapshots: &Snapshots,
) -> (Vec<Save>, Vec<BatchLock>) {
    let mut saves = Vec::with_capacity(outcomes.len());
    let mut failed = Vec::new();
    for outcome in outcomes {
        let DeviceOutcome {
            device_id,
            engine,
            lock,
            ids,
            report,
            scored,
            failure,
        } = outcome;
        if let Some(e) = failure {
            tracing::warn!(
                device_id,
                error = format!("{e:#}"),
                "scoring failed; jobs left pending for retry"
            );
            failed.push(lock);
            continue;
        }
        let state_bytes = match encode_state(&engine) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(device_id, error = %e, "engine state not encoded");
                failed.push(lock);
                continue;
            }
        };
        if snapshots.due(device_id, false) {
            snapshots.note(device_id, &state_bytes, false);
        }
        let report = report
            .and_then(|r| serde_json::to_vec(&r).ok())
            .map(|bytes| (keys::trust_report(device_id), bytes));
        saves.push(Save {
            lock,
            ids,
            scored,
            state_bytes,
            report,
        });
    }
    (saves, failed)
}

/// Phase 6: saves every state and report and releases every lock together
/// — one round trip for the batch (`commit_many`) — after releasing the
/// locks of the failed devices (one compare-and-delete each).
///
/// The lock TTL rule: every lock of the batch was asked for at `asked_at`.
/// Past [`LOCK_TTL`] less [`LOCK_DRIFT_MARGIN`] a lock may have gone to
/// another worker, whose save this one must not overwrite: then nothing is
/// saved, every lock still ours is released by compare-and-delete, and the
/// jobs are retried from the saved states ([`Committed::GivenUp`]). Within
/// it the locks are surely ours and the save releases them with a plain
/// delete.
///
/// Saved, the jobs are acked ([`Committed::Acked`]) and the batch's
/// metrics recorded ([`ack_saved`]). A failed save leaves every lock to
/// expire by itself and every job pending ([`Committed::LeftPending`]); the
/// retry finds its seqs scored if the writes did land.
async fn commit_saves(
    scoring: &Scoring,
    saves: Vec<Save>,
    failed: Vec<BatchLock>,
    asked_at: std::time::Instant,
    started: std::time::Instant,
) -> Committed {
    // Every lock of the batch was asked for at `asked_at`. Past its TTL
    // (less a margin for clock drift) a lock may have gone to another worker,
    // whose save this one must not overwrite: save nothing, release what is
    // still ours, and let the jobs be retried from the saved states.
    if asked_at.elapsed() >= LOCK_TTL - LOCK_DRIFT_MARGIN {
        tracing::warn!(
            "batch scored too slowly to save under its locks; jobs left pending for retry"
        );
        let mut locks: Vec<&BatchLock> = failed.iter().collect();
        locks.extend(saves.iter().map(|s| &s.lock));
        release_locks(scoring, &locks).await;
        return Committed::GivenUp;
    }
    let locks: Vec<&BatchLock> = failed.iter().collect();
    release_locks(scoring, &locks).await;
    let commits: Vec<Commit<'_>> = saves.iter().map(Save::commit).collect();
    match scoring.shared.commit_many(&commits).await {
        Ok(released) => {
            if released.iter().any(|r| !r) {
                tracing::warn!("scoring lock expired before the state was saved");
            }
            Committed::Acked(ack_saved(scoring, saves, started))
        }
        Err(e) => {
            // The locks expire by themselves; the jobs are retried and find
            // their seqs scored if the writes did land.
            tracing::warn!(error = %e, "scored states not saved; jobs left pending for retry");
            Committed::LeftPending
        }
    }
}

/// The ids of the saved devices' jobs, to ack, after recording what the
/// batch scored: heartbeats scored, each timed from the batch's start, and
/// the workers' meter.
fn ack_saved(scoring: &Scoring, saves: Vec<Save>, started: std::time::Instant) -> Vec<String> {
    let elapsed = started.elapsed();
    let mut batch_scored = 0;
    let mut done = Vec::new();
    for save in saves {
        scoring.metrics.signals_scored.inc_by(save.scored);
        for _ in 0..save.scored {
            scoring
                .metrics
                .signals_scoring_seconds
                .observe(elapsed.as_secs_f64());
        }
        batch_scored += save.scored;
        done.extend(save.ids);
    }
    scoring
        .scoring_meter
        .record(elapsed, usize::try_from(batch_scored).unwrap_or(usize::MAX));
    done
}

/// Phase 7: the devices another worker was scoring, up to `parallel` side
/// by side, each one heartbeat at a time through [`score_waiting`] (which
/// waits for the lock); the ids of the jobs scored.
async fn score_contended(
    scoring: &Scoring,
    contended: Vec<DeviceJobs<'_>>,
    parallel: usize,
) -> Vec<String> {
    let contended: Vec<_> = contended
        .into_iter()
        .map(|device| score_waiting(scoring, device))
        .collect();
    let contended: Vec<Vec<String>> = futures::stream::iter(contended)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    contended.into_iter().flatten().collect()
}

/// Scores a device's heartbeats one by one through [`score`] (which waits
/// for its lock); the ids of those scored. A failure stops there: the
/// device's later heartbeats wait for the retry too.
async fn score_waiting(scoring: &Scoring, device: DeviceJobs<'_>) -> Vec<String> {
    let mut ids = Vec::with_capacity(device.jobs.len());
    for (job, header, heartbeat) in device.jobs {
        let span = job_span(&header, heartbeat.seq);
        let scored = score(
            scoring,
            header.device_id,
            header.user_id,
            heartbeat,
            header.ip_listed,
            false,
        )
        .instrument(span)
        .await;
        if let Err(e) = scored {
            tracing::warn!(job = %job.id, error = format!("{e:#}"), "job failed; left pending for retry");
            break;
        }
        ids.push(job.id.clone());
    }
    ids
}

/// Releases the locks of a batch that is given up (nothing written), one
/// compare-and-delete each: a lock that expired and was taken by another
/// worker is not ours to drop. A failure is logged; the lock expires.
async fn release_locks(scoring: &Scoring, locks: &[&BatchLock]) {
    for lock in locks {
        if let Err(e) = scoring
            .shared
            .delete_if(&lock.key, lock.token.as_bytes())
            .await
        {
            tracing::warn!(error = %e, "scoring lock not released; it expires by itself");
        }
    }
}

/// Scores under the lock; `None` when this `seq` was already scored or
/// its device does not exist.
/// `seen_elsewhere`: the window was first sent by another device.
#[allow(clippy::too_many_arguments)]
async fn score_locked(
    scoring: &Scoring,
    device_id: &str,
    user_id: Uuid,
    heartbeat: Heartbeat,
    ip_listed: bool,
    degraded: bool,
    seen_elsewhere: bool,
    engine: &mut DeviceState,
) -> anyhow::Result<Option<TrustReport>> {
    if engine.already_scored(heartbeat.seq) {
        return Ok(None);
    }
    // The device cache (status, attestation), invalidated on every change.
    let Some(device) = scoring
        .auth
        .devices
        .get(scoring.store.as_ref(), device_id)
        .await?
    else {
        // No such device: its job outlived the row (a database restored
        // under a live queue). Retrying cannot help, so it is dropped —
        // logged and counted — instead of being reclaimed forever.
        tracing::warn!(
            device_id,
            seq = heartbeat.seq,
            "heartbeat of an unknown device dropped"
        );
        scoring.metrics.signals_dropped.inc();
        return Ok(None);
    };
    let attestation = device.attestation.grade;
    let (graded, evidence) = attestation_of(device.attestation);
    let plan = scoring.plans.get(scoring.store.as_ref(), user_id).await?;
    let mut intel: IntelHits = scoring.intel.hits(&heartbeat.context, ip_listed);
    intel.window_seen_elsewhere = seen_elsewhere;
    let situation = Situation {
        attestation: graded,
        evidence,
        plan: if plan.name == "trial" {
            PlanTier::Trial
        } else {
            PlanTier::Paid
        },
        intel,
    };
    let seq = heartbeat.seq;
    let assessment = assess(engine, &heartbeat, &situation);
    engine.mark_scored(seq);

    // Act first, save last (the caller commits): if acting fails the job is
    // retried from the old state (the same decision again), instead of
    // being acked as scored with the lock half done.
    let mut locked = device.status != DeviceStatus::Active;
    if assessment.decision != Decision::Allow && !locked {
        act(scoring, device_id, user_id, attestation, &assessment).await?;
        locked = true;
    }
    let report = TrustReport::from_assessment(
        device_id,
        &assessment,
        attestation,
        locked,
        degraded,
        engine.heartbeats,
        engine.last_seq,
    );
    Ok(Some(report))
}

async fn act(
    scoring: &Scoring,
    device_id: &str,
    user_id: Uuid,
    attestation: AttestationGrade,
    assessment: &blockremote_engine::Assessment,
) -> anyhow::Result<()> {
    let action = match assessment.decision {
        Decision::CriticalLock => Action::CriticalLock,
        _ => Action::ForceOverlay,
    };
    let reason = assessment
        .reasons
        .first()
        .copied()
        .unwrap_or("risk_threshold");
    scoring
        .store
        .hold_device(
            device_id,
            NewHold::new(HoldSource::Engine, HoldAction::Lock, reason),
            None,
        )
        .await?;
    scoring.auth.devices.invalidate(device_id).await;
    let command = realtime::issue(
        scoring.shared.as_ref(),
        scoring.store.as_ref(),
        &scoring.metrics,
        realtime::Origin::Engine,
        device_id,
        action,
        reason,
    )
    .await?;
    scoring
        .store
        .append_audit(NewAuditEntry {
            user_id: Some(user_id),
            device_id: Some(device_id.to_owned()),
            jti: None,
            ip: None,
            user_agent: None,
            source: AuditSource::Worker,
            threat_score: Some(100.0 - f64::from(assessment.trust_score)),
            decision_reason: Some(assessment.reasons.join(",")),
            attestation_state: Some(attestation.as_str().to_owned()),
            action_taken: command.action.as_str().to_owned(),
            actor: None,
            request_id: None,
        })
        .await?;
    scoring
        .store
        .record_event(scoring.auth.event(
            "device:locked",
            Some(user_id),
            Some(device_id),
            None,
            serde_json::json!({
                "source": "engine",
                "action": command.action.as_str(),
                "trust_score": assessment.trust_score,
                "threshold": assessment.threshold,
                "reasons": assessment.reasons,
            }),
        ))
        .await?;
    scoring.metrics.signals_locks.inc();
    tracing::warn!(
        device_id,
        trust_score = assessment.trust_score,
        reasons = ?assessment.reasons,
        action = command.action.as_str(),
        "engine locked a device"
    );
    Ok(())
}

/// Forgets the evidence that led to a lock (an operator unlocked the
/// device), keeping the device's baselines.
async fn clear_evidence(scoring: &Scoring, device_id: &str) -> anyhow::Result<()> {
    // Under the scoring lock, so a worker scoring at the same moment cannot
    // write the old evidence back.
    let mut guard = lock(scoring, device_id).await?;
    let mut engine = std::mem::take(&mut guard.engine);
    engine.clear_evidence();
    guard.force_snapshot = true;
    guard.commit(device_id, &engine, None).await
}

#[cfg(test)]
mod tests {
    use blockremote_engine::sim::{session, Class};

    use super::*;

    #[test]
    fn a_warm_engine_state_fits_the_buffer_it_is_encoded_into() {
        let mut engine = DeviceState::default();
        for hb in &session(Class::HeldInHand, 1, 150).heartbeats {
            assess(&mut engine, hb, &Situation::default());
        }
        let bytes = encode_state(&engine).expect("encodes");
        assert!(
            bytes.len() > STATE_BYTES_HINT / 4 && bytes.len() <= STATE_BYTES_HINT,
            "{} bytes",
            bytes.len()
        );
        assert_eq!(
            postcard::from_bytes::<DeviceState>(&bytes).expect("decodes"),
            engine
        );
    }
}
