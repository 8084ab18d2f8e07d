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
//! A lock decision, on a device still active: status `locked` (its API calls
//! are refused at once on every instance), the kill-switch command
//! (`FORCE_OVERLAY` or `CRITICAL_LOCK`) published to its sockets, and an
//! audit row with the threat score, reasons, attestation state and action.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use blockremote_engine::{
    assess, Attestation, Decision, DeviceState, Heartbeat, IntelHits, PlanTier, Situation,
};
use uuid::Uuid;

use super::{ingest::decode_job, report::TrustReport};
use crate::{
    app::AppState,
    auth::device_status::Attestation as CachedAttestation,
    realtime::{self, Action},
    state::{keys, Job},
    store::{AuditSource, DeviceStatus, NewAuditEntry},
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

/// The heartbeat queue's job handler.
pub struct HeartbeatScorer {
    state: AppState,
}

impl HeartbeatScorer {
    /// A handler scoring with `state`'s store and shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
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
        score(
            &self.state,
            header.device_id,
            header.user_id,
            heartbeat,
            header.ip_listed,
            false,
        )
        .await?;
        Ok(())
    }
}

/// Whether the heartbeat queue is behind: ingestion then scores inline.
/// Degraded above [`Breaker::HIGH`] of the queue's capacity, recovered
/// below [`Breaker::LOW`] (hysteresis, so it does not flap).
#[derive(Debug, Default)]
pub struct Breaker {
    degraded: AtomicBool,
}

impl Breaker {
    /// Share of the queue's capacity at which scoring goes inline.
    pub const HIGH: f64 = 0.5;
    /// Share below which it goes back to the workers.
    pub const LOW: f64 = 0.1;

    /// Whether ingestion should score inline now.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Updates the state from the queue's backlog; returns true when it changed.
    pub fn observe(&self, backlog: u64, capacity: usize) -> bool {
        let share = backlog as f64 / capacity.max(1) as f64;
        let was = self.degraded();
        let now = if was {
            share > Self::LOW
        } else {
            share >= Self::HIGH
        };
        self.degraded.store(now, Ordering::Relaxed);
        now != was
    }

    /// Forces degraded mode (the queue refused a job).
    pub fn trip(&self) {
        self.degraded.store(true, Ordering::Relaxed);
    }
}

/// Watches the queue's backlog every 250 ms until `state.shutdown`.
pub fn spawn_breaker_watch(state: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Ok(backlog) = state.shared.queue_len(keys::HEARTBEAT_QUEUE).await else {
                continue;
            };
            state
                .metrics
                .signals_backlog
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
            if state.breaker.observe(backlog, state.config.queue_capacity) {
                let degraded = state.breaker.degraded();
                state.metrics.signals_degraded.set(i64::from(degraded));
                if degraded {
                    tracing::warn!(
                        backlog,
                        "heartbeat workers behind: scoring inline (degraded)"
                    );
                } else {
                    tracing::info!(
                        backlog,
                        "heartbeat workers caught up: scoring back on the queue"
                    );
                }
            }
        }
    });
}

/// A device's scoring lock, held, with the engine state read under it.
struct ScoringLock<'a> {
    state: &'a AppState,
    key: String,
    token: String,
    /// Where the engine state lives (read under the lock, saved by `commit`).
    state_key: String,
    /// When the lock was asked for: its TTL runs from no earlier.
    asked_at: std::time::Instant,
    engine: DeviceState,
}

impl ScoringLock<'_> {
    /// Releases the lock without writing (a failure: the job is retried).
    async fn release(self) {
        // Only our own lock (one atomic compare-and-delete): a lock that
        // expired and was taken by another worker is not ours to drop.
        if let Err(e) = self
            .state
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
        let state_bytes = postcard::to_allocvec(engine)?;
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
            .state
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

/// Takes the device's scoring lock and reads its engine state under it
/// (one round trip on Redis), waiting up to [`LOCK_WAIT`] for another
/// worker's lock.
async fn lock<'a>(state: &'a AppState, device_id: &str) -> anyhow::Result<ScoringLock<'a>> {
    let key = keys::scoring_lock(device_id);
    let state_key = keys::signal_state(device_id);
    let token = Uuid::new_v4().simple().to_string();
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let asked_at = std::time::Instant::now();
        if let Some(raw) = state
            .shared
            .lock_and_get(&key, token.as_bytes(), LOCK_TTL, &state_key)
            .await?
        {
            // A state from an older encoding starts afresh.
            let engine = raw
                .and_then(|raw| postcard::from_bytes(&raw).ok())
                .unwrap_or_default();
            return Ok(ScoringLock {
                state,
                key,
                token,
                state_key,
                asked_at,
                engine,
            });
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("device {device_id} is being scored elsewhere; retry later");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The stored trust report of a device, if it has one.
pub async fn load_report(state: &AppState, device_id: &str) -> anyhow::Result<Option<TrustReport>> {
    Ok(state
        .shared
        .get(&keys::trust_report(device_id))
        .await?
        .and_then(|raw| serde_json::from_slice(&raw).ok()))
}

fn attestation_of(cached: CachedAttestation) -> Attestation {
    match cached {
        CachedAttestation::Verified => Attestation::Verified,
        CachedAttestation::Failed => Attestation::Failed,
        CachedAttestation::Unknown => Attestation::Unknown,
    }
}

/// True when this window was first sent by another device (replayed across
/// devices). The first sender claims the fingerprint for a day.
async fn seen_elsewhere(
    state: &AppState,
    device_id: &str,
    heartbeat: &Heartbeat,
) -> anyhow::Result<bool> {
    let Some(fp) = blockremote_engine::features::window_fingerprint(heartbeat) else {
        return Ok(false);
    };
    let holder = state
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
/// workers are behind — the cross-device replay check is skipped (it costs
/// two more round trips); everything else is the same engine.
pub async fn score(
    state: &AppState,
    device_id: &str,
    user_id: Uuid,
    heartbeat: Heartbeat,
    ip_listed: bool,
    degraded: bool,
) -> anyhow::Result<TrustReport> {
    let started = std::time::Instant::now();
    let mut guard = lock(state, device_id).await?;
    let mut engine = std::mem::take(&mut guard.engine);
    let result = score_locked(
        state,
        device_id,
        user_id,
        heartbeat,
        ip_listed,
        degraded,
        &mut engine,
    )
    .await;
    let result = match result {
        // A failed commit leaves the lock to expire by itself (the store
        // that refused the write would refuse the release too). The job is
        // retried; if the state did land, the retry finds its seq scored.
        Ok(Some(report)) => guard
            .commit(device_id, &engine, Some(&report))
            .await
            .map(|()| {
                state.metrics.signals_scored.inc();
                report
            }),
        Ok(None) => {
            // Redelivered by the at-least-once queue: already counted.
            guard.release().await;
            load_report(state, device_id).await.map(|report| {
                report.unwrap_or_else(|| TrustReport::neutral(device_id, "unknown", false))
            })
        }
        Err(e) => {
            guard.release().await;
            Err(e)
        }
    };
    state
        .metrics
        .signals_scoring_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Scores under the lock; `None` when this `seq` was already scored.
async fn score_locked(
    state: &AppState,
    device_id: &str,
    user_id: Uuid,
    heartbeat: Heartbeat,
    ip_listed: bool,
    degraded: bool,
    engine: &mut DeviceState,
) -> anyhow::Result<Option<TrustReport>> {
    if engine.already_scored(heartbeat.seq) {
        return Ok(None);
    }
    // The device cache (status, attestation), invalidated on every change.
    let Some(device) = state
        .auth
        .devices
        .get(state.store.as_ref(), device_id)
        .await?
    else {
        anyhow::bail!("heartbeat for unknown device {device_id}");
    };
    let attestation = device.attestation.as_str();
    let plan = state.plans.get(state.store.as_ref(), user_id).await?;
    let mut intel: IntelHits = state.intel.hits(&heartbeat.context, ip_listed);
    intel.window_seen_elsewhere = !degraded && seen_elsewhere(state, device_id, &heartbeat).await?;
    let situation = Situation {
        attestation: attestation_of(device.attestation),
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
        act(state, device_id, user_id, attestation, &assessment).await?;
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
    state: &AppState,
    device_id: &str,
    user_id: Uuid,
    attestation: &str,
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
    state
        .store
        .set_device_status(device_id, DeviceStatus::Locked)
        .await?;
    state.auth.devices.invalidate(device_id).await;
    let command = realtime::issue(state.shared.as_ref(), device_id, action, reason).await?;
    state
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
            attestation_state: Some(attestation.to_owned()),
            action_taken: command.action.as_str().to_owned(),
        })
        .await?;
    state
        .store
        .record_event(state.auth.event(
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
    state.metrics.signals_locks.inc();
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
pub async fn clear_evidence(state: &AppState, device_id: &str) -> anyhow::Result<()> {
    // Under the scoring lock, so a worker scoring at the same moment cannot
    // write the old evidence back.
    let mut guard = lock(state, device_id).await?;
    let mut engine = std::mem::take(&mut guard.engine);
    engine.clear_evidence();
    guard.commit(device_id, &engine, None).await
}
