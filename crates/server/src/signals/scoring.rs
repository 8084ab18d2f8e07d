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

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use blockremote_engine::{
    assess, Attestation, Decision, DeviceState, Heartbeat, IntelHits, PlanTier, Situation,
};
use futures::StreamExt;
use uuid::Uuid;

use super::{
    ingest::{decode_job, JobHeader},
    report::TrustReport,
};
use crate::{
    app::AppState,
    auth::device_status::Attestation as CachedAttestation,
    realtime::{self, Action},
    state::{keys, Commit, Job},
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

    async fn handle_batch(&self, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
        score_batch(&self.state, jobs, parallel).await
    }
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
        let state_bytes = encode_state(engine)?;
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

/// The engine state in postcard, written into a buffer sized for it at
/// once (grown from empty, its ~2.5 KB were copied at every doubling).
fn encode_state(engine: &DeviceState) -> postcard::Result<Vec<u8>> {
    postcard::to_extend(engine, Vec::with_capacity(STATE_BYTES_HINT))
}

/// Room for an engine state with full rings (three of 100 `f64`s, plus
/// baselines and recent `seq`s).
const STATE_BYTES_HINT: usize = 4096;

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
    let seen = if degraded {
        Ok(false)
    } else {
        seen_elsewhere(state, device_id, &heartbeat).await
    };
    let result = match seen {
        Ok(seen) => {
            score_locked(
                state,
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
                state.metrics.signals_scored.inc();
                report
            }),
        Ok(None) => {
            // Redelivered by the at-least-once queue (already counted), or
            // a device that does not exist (counted as dropped).
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
    let elapsed = started.elapsed();
    state
        .metrics
        .signals_scoring_seconds
        .observe(elapsed.as_secs_f64());
    // The workers' meter, as the batch path counts: heartbeats scored and saved.
    if scored && !degraded && result.is_ok() {
        state.scoring_meter.record(elapsed, 1);
    }
    result
}

/// The heartbeats of one device in a batch, in queue order.
struct DeviceJobs<'a> {
    device_id: &'a str,
    jobs: Vec<(&'a Job, JobHeader<'a>, Heartbeat)>,
}

/// Scores a fetched batch with round trips shared by the whole batch: the
/// scoring locks and engine states of all its devices in one, their window
/// fingerprints in one, every save and release in one — instead of three
/// per heartbeat. A device whose lock is held elsewhere is scored on its
/// own afterwards (waiting for the lock). Returns the ids of the jobs
/// handled; a device whose scoring or save fails leaves its jobs pending.
async fn score_batch(state: &AppState, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
    let started = std::time::Instant::now();
    let mut done = Vec::with_capacity(jobs.len());
    let mut devices: Vec<DeviceJobs<'_>> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for job in &jobs {
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
    if devices.is_empty() {
        return done;
    }

    // 1. Every device's lock and engine state.
    let locks: Vec<(String, String, String)> = devices
        .iter()
        .map(|d| {
            (
                keys::scoring_lock(d.device_id),
                Uuid::new_v4().simple().to_string(),
                keys::signal_state(d.device_id),
            )
        })
        .collect();
    let requests: Vec<(&str, &[u8], &str)> = locks
        .iter()
        .map(|(lock, token, key)| (lock.as_str(), token.as_bytes(), key.as_str()))
        .collect();
    let asked_at = std::time::Instant::now();
    let read = match state.shared.lock_and_get_many(&requests, LOCK_TTL).await {
        Ok(read) => read,
        Err(e) => {
            // Locks that were taken expire by themselves; all stays pending.
            tracing::warn!(error = %e, "scoring locks not taken; batch left pending");
            return done;
        }
    };
    let mut held = Vec::new();
    let mut contended = Vec::new();
    for ((device, raw), lock) in devices.into_iter().zip(read).zip(&locks) {
        match raw {
            Some(raw) => {
                // A state from an older encoding starts afresh.
                let engine: DeviceState = raw
                    .and_then(|raw| postcard::from_bytes(&raw).ok())
                    .unwrap_or_default();
                held.push((device, engine, lock));
            }
            None => contended.push(device),
        }
    }

    // 2. The window fingerprints of every heartbeat under a lock: seen
    //    elsewhere when another device claimed it first.
    //    (Not for redeliveries of heartbeats already scored.)
    let senders: Vec<(&str, Option<String>)> = held
        .iter()
        .flat_map(|(device, engine, _)| device.jobs.iter().map(move |job| (job, engine)))
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
    let mut holders = match state.shared.claim_many(&claims, FINGERPRINT_TTL).await {
        Ok(holders) => holders.into_iter(),
        Err(e) => {
            tracing::warn!(error = %e, "window fingerprints not claimed; batch left pending");
            let locks: Vec<_> = held.iter().map(|(_, _, lock)| *lock).collect();
            release_locks(state, &locks).await;
            return done;
        }
    };
    let mut seen = senders.iter().map(|(device_id, fp)| {
        fp.is_some()
            && holders
                .next()
                .flatten()
                .is_some_and(|first| first != device_id.as_bytes())
    });

    // 3. Score each device's heartbeats in order, devices side by side.
    let mut work = Vec::with_capacity(held.len());
    for (device, mut engine, lock) in held {
        let seen: Vec<bool> = device
            .jobs
            .iter()
            .map(|_| seen.next().unwrap_or(false))
            .collect();
        work.push(async move {
            let mut report = None;
            let mut scored = 0u64;
            let mut failure = None;
            let device_id = device.device_id;
            let mut ids = Vec::with_capacity(device.jobs.len());
            for ((job, header, heartbeat), seen) in device.jobs.into_iter().zip(seen) {
                ids.push(job.id.clone());
                match score_locked(
                    state,
                    device_id,
                    header.user_id,
                    heartbeat,
                    header.ip_listed,
                    false,
                    seen,
                    &mut engine,
                )
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
            (device_id, engine, lock, ids, report, scored, failure)
        });
    }
    let outcomes: Vec<_> = futures::stream::iter(work)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;

    // 4. Save every state and report and release every lock together.
    let mut saves = Vec::with_capacity(outcomes.len());
    let mut failed = Vec::new();
    for (device_id, engine, lock, ids, report, scored, failure) in outcomes {
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
        let report = report
            .and_then(|r| serde_json::to_vec(&r).ok())
            .map(|bytes| (keys::trust_report(device_id), bytes));
        saves.push((lock, ids, scored, state_bytes, report));
    }
    // Every lock of the batch was asked for at `asked_at`. Past its TTL
    // (less a margin for clock drift) a lock may have gone to another worker,
    // whose save this one must not overwrite: save nothing, release what is
    // still ours, and let the jobs be retried from the saved states.
    if asked_at.elapsed() >= LOCK_TTL - LOCK_DRIFT_MARGIN {
        tracing::warn!(
            "batch scored too slowly to save under its locks; jobs left pending for retry"
        );
        failed.extend(saves.iter().map(|(lock, ..)| *lock));
        release_locks(state, &failed).await;
        return done;
    }
    release_locks(state, &failed).await;
    let commits: Vec<Commit<'_>> = saves
        .iter()
        .map(
            |((lock, token, state_key), _, scored, state_bytes, report)| {
                let mut entries: Vec<(&str, &[u8], Option<Duration>)> = Vec::with_capacity(2);
                if *scored > 0 {
                    if let Some((key, bytes)) = report {
                        entries.push((key.as_str(), bytes.as_slice(), Some(STATE_TTL)));
                    }
                    entries.push((state_key.as_str(), state_bytes.as_slice(), Some(STATE_TTL)));
                }
                Commit {
                    entries,
                    lock: lock.as_str(),
                    token: token.as_bytes(),
                    // Checked above: a plain delete releases them.
                    within_ttl: true,
                }
            },
        )
        .collect();
    match state.shared.commit_many(&commits).await {
        Ok(released) => {
            if released.iter().any(|r| !r) {
                tracing::warn!("scoring lock expired before the state was saved");
            }
            let elapsed = started.elapsed();
            let mut batch_scored = 0;
            for (_, ids, scored, _, _) in saves {
                state.metrics.signals_scored.inc_by(scored);
                for _ in 0..scored {
                    state
                        .metrics
                        .signals_scoring_seconds
                        .observe(elapsed.as_secs_f64());
                }
                batch_scored += scored;
                done.extend(ids);
            }
            state
                .scoring_meter
                .record(elapsed, usize::try_from(batch_scored).unwrap_or(usize::MAX));
        }
        Err(e) => {
            // The locks expire by themselves; the jobs are retried and find
            // their seqs scored if the writes did land.
            tracing::warn!(error = %e, "scored states not saved; jobs left pending for retry");
        }
    }

    // 5. Devices another worker was scoring: one by one, waiting for the lock.
    let contended: Vec<_> = contended
        .into_iter()
        .map(|device| score_waiting(state, device))
        .collect();
    let contended: Vec<Vec<String>> = futures::stream::iter(contended)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    done.extend(contended.into_iter().flatten());
    done
}

/// Scores a device's heartbeats one by one through [`score`] (which waits
/// for its lock); the ids of those scored. A failure stops there: the
/// device's later heartbeats wait for the retry too.
async fn score_waiting(state: &AppState, device: DeviceJobs<'_>) -> Vec<String> {
    let mut ids = Vec::with_capacity(device.jobs.len());
    for (job, header, heartbeat) in device.jobs {
        let scored = score(
            state,
            header.device_id,
            header.user_id,
            heartbeat,
            header.ip_listed,
            false,
        )
        .await;
        if let Err(e) = scored {
            tracing::warn!(job = %job.id, error = format!("{e:#}"), "job failed; left pending for retry");
            break;
        }
        ids.push(job.id.clone());
    }
    ids
}

/// Releases the locks of a batch that is given up (nothing written).
async fn release_locks(state: &AppState, locks: &[&(String, String, String)]) {
    for (lock, token, _) in locks {
        if let Err(e) = state.shared.delete_if(lock, token.as_bytes()).await {
            tracing::warn!(error = %e, "scoring lock not released; it expires by itself");
        }
    }
}

/// Scores under the lock; `None` when this `seq` was already scored or
/// its device does not exist.
/// `seen_elsewhere`: the window was first sent by another device.
#[allow(clippy::too_many_arguments)]
async fn score_locked(
    state: &AppState,
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
    let Some(device) = state
        .auth
        .devices
        .get(state.store.as_ref(), device_id)
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
        state.metrics.signals_dropped.inc();
        return Ok(None);
    };
    let attestation = device.attestation.as_str();
    let plan = state.plans.get(state.store.as_ref(), user_id).await?;
    let mut intel: IntelHits = state.intel.hits(&heartbeat.context, ip_listed);
    intel.window_seen_elsewhere = seen_elsewhere;
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
