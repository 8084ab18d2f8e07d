//! The circuit breaker: when the scoring workers cannot keep up, ingestion
//! scores inline instead of queueing, so a remote-control attack is still
//! locked within heartbeats, not after a backlog drains.
//!
//! Every instance watches, every 250 ms, what the workers' state says from
//! outside — wherever the workers run (in `serve` on the embedded default,
//! `blockremote worker` processes in production):
//!
//! * **backlog** — jobs waiting or pending, against the queue's capacity;
//! * **queue lag** — how long the oldest job not yet handed to a worker has
//!   waited ([`QueueStats`]);
//! * **throughput** — heartbeats the workers scored in the last complete
//!   second: no worker reporting for three seconds means nobody scores what
//!   is queued, and a backlog the reported rate needs too long to drain
//!   means the workers are falling behind before the lag shows it;
//! * **scoring p95** — the slowest worker's 95th percentile time to score a
//!   heartbeat in that second (judged from 20 heartbeats: the percentile of
//!   a handful is their maximum — one device waiting for its lock).
//!
//! Workers report through shared state, so every replica reads the same
//! numbers: each worker process meters its batches ([`ScoringMeter`]) and,
//! at each second's end, adds its count to `sig:health:scored:{second}` and
//! raises `sig:health:p95_us:{second}` to its p95 ([`spawn_meter_publisher`]).
//! Seconds are wall-clock Unix seconds, so replicas and workers need clocks
//! within a second of each other (NTP).
//!
//! Any mark above its high threshold degrades; all of them below their low
//! thresholds recovers (hysteresis, so it does not flap).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use crate::{
    app::AppState,
    state::{keys, QueueStats, SharedState},
};

/// How often the breaker looks and the meter publisher checks the clock.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long the workers' reports are kept (the breaker reads seconds old).
const REPORT_TTL: Duration = Duration::from_secs(60);
/// How long after the watch starts a silence from the workers counts (they
/// may start after `serve`, and report a second after their first second).
const SILENCE_GRACE: Duration = Duration::from_secs(4);
/// Consecutive seconds without any worker's report that mean none is alive
/// (one missed second is a publisher that ran late).
const SILENT_SECONDS: u64 = 3;

/// Why the breaker degraded: the first mark above its high threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The backlog reached [`Breaker::BACKLOG_HIGH`] of the capacity (or the
    /// queue refused a job).
    Backlog,
    /// The oldest waiting job waited [`Breaker::LAG_HIGH`].
    QueueLag,
    /// No worker reported scoring for [`SILENT_SECONDS`].
    NoWorkers,
    /// At the workers' reported rate the backlog takes [`Breaker::DRAIN_HIGH`] to drain.
    Throughput,
    /// The workers' scoring p95 reached [`Breaker::P95_HIGH`].
    ScoringP95,
}

impl Trouble {
    /// The name logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::QueueLag => "queue_lag",
            Self::NoWorkers => "no_workers",
            Self::Throughput => "throughput",
            Self::ScoringP95 => "scoring_p95",
        }
    }
}

/// What the workers reported for the last complete second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// Not known yet (the watch just started).
    Unknown,
    /// No worker reported for [`SILENT_SECONDS`]: none is alive.
    Silent,
    /// Heartbeats scored, and the slowest worker's p95 (none scored: `None`).
    Reported {
        /// Heartbeats scored by all workers in that second.
        scored: u64,
        /// The highest p95 any worker reported.
        p95: Option<Duration>,
    },
}

/// One look at the workers from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// The queue's backlog and lag.
    pub queue: QueueStats,
    /// The queue's capacity.
    pub capacity: usize,
    /// What the workers reported.
    pub workers: Workers,
}

impl Health {
    /// The first mark at or above its high threshold.
    fn trouble(&self) -> Option<Trouble> {
        let backlog = self.queue.len;
        if backlog as f64 >= Breaker::BACKLOG_HIGH * self.capacity.max(1) as f64 {
            return Some(Trouble::Backlog);
        }
        if self.queue.oldest_wait >= Breaker::LAG_HIGH {
            return Some(Trouble::QueueLag);
        }
        match self.workers {
            Workers::Unknown => None,
            Workers::Silent => Some(Trouble::NoWorkers),
            Workers::Reported { scored, p95 } => {
                if self.drain_time(scored) >= Breaker::DRAIN_HIGH {
                    Some(Trouble::Throughput)
                } else if scored >= Breaker::P95_MIN_SCORED && p95 >= Some(Breaker::P95_HIGH) {
                    Some(Trouble::ScoringP95)
                } else {
                    None
                }
            }
        }
    }

    /// Every mark below its low threshold.
    fn calm(&self) -> bool {
        let backlog_ok =
            (self.queue.len as f64) < Breaker::BACKLOG_LOW * self.capacity.max(1) as f64;
        let workers_ok = match self.workers {
            Workers::Unknown => true,
            Workers::Silent => false,
            Workers::Reported { scored, p95 } => {
                self.drain_time(scored) < Breaker::DRAIN_LOW
                    && (scored < Breaker::P95_MIN_SCORED
                        || p95.is_none_or(|p| p < Breaker::P95_LOW))
            }
        };
        backlog_ok && self.queue.oldest_wait < Breaker::LAG_LOW && workers_ok
    }

    /// How long the backlog takes to drain at `scored` per second; zero for
    /// a backlog too small to judge a rate by.
    fn drain_time(&self, scored: u64) -> Duration {
        if self.queue.len < Breaker::DRAIN_MIN_BACKLOG {
            return Duration::ZERO;
        }
        if scored == 0 {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(self.queue.len as f64 / scored as f64).unwrap_or(Duration::MAX)
    }
}

/// Whether the workers are behind: ingestion then scores inline.
#[derive(Debug, Default)]
pub struct Breaker {
    degraded: AtomicBool,
}

/// A change of the breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Now degraded, for this reason.
    Degraded(Trouble),
    /// Back to the queue.
    Recovered,
}

impl Breaker {
    /// Share of the queue's capacity at which scoring goes inline.
    pub const BACKLOG_HIGH: f64 = 0.5;
    /// Share below which it may go back to the workers.
    pub const BACKLOG_LOW: f64 = 0.1;
    /// Queue lag at which scoring goes inline.
    pub const LAG_HIGH: Duration = Duration::from_secs(2);
    /// Queue lag below which it may go back.
    pub const LAG_LOW: Duration = Duration::from_millis(500);
    /// Time to drain the backlog at the workers' rate that goes inline.
    pub const DRAIN_HIGH: Duration = Duration::from_secs(2);
    /// Time to drain below which it may go back.
    pub const DRAIN_LOW: Duration = Duration::from_millis(500);
    /// Smallest backlog judged by the rate (a few jobs queued after an idle
    /// second are no evidence of anything).
    pub const DRAIN_MIN_BACKLOG: u64 = 1000;
    /// Workers' scoring p95 at which scoring goes inline.
    pub const P95_HIGH: Duration = Duration::from_secs(1);
    /// Scoring p95 below which it may go back.
    pub const P95_LOW: Duration = Duration::from_millis(250);
    /// Fewest heartbeats in a second whose p95 is judged.
    pub const P95_MIN_SCORED: u64 = 20;

    /// Whether ingestion should score inline now.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Updates the state from one look; says what changed.
    pub fn observe(&self, health: &Health) -> Option<Change> {
        if self.degraded() {
            if health.calm() {
                self.degraded.store(false, Ordering::Relaxed);
                return Some(Change::Recovered);
            }
        } else if let Some(trouble) = health.trouble() {
            self.degraded.store(true, Ordering::Relaxed);
            return Some(Change::Degraded(trouble));
        }
        None
    }

    /// Forces degraded mode (the queue refused a job).
    pub fn trip(&self) {
        self.degraded.store(true, Ordering::Relaxed);
    }
}

/// Watches the workers every 250 ms until `state.shutdown`.
pub fn spawn_breaker_watch(state: AppState) {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        // The second last read, and what the workers reported for it.
        let mut read: Option<(u64, Workers)> = None;
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Ok(queue) = state.shared.queue_stats(keys::HEARTBEAT_QUEUE).await else {
                continue;
            };
            // The last second every worker has surely published.
            let second = unix_second().saturating_sub(2);
            let workers = match read {
                Some((s, workers)) if s == second => workers,
                _ => match read_report(state.shared.as_ref(), second).await {
                    Ok(Workers::Silent) if started.elapsed() < SILENCE_GRACE => Workers::Unknown,
                    Ok(workers) => {
                        read = Some((second, workers));
                        workers
                    }
                    Err(_) => Workers::Unknown,
                },
            };
            let health = Health {
                queue,
                capacity: state.config.queue_capacity,
                workers,
            };
            record(&state, &health);
            match state.breaker.observe(&health) {
                Some(Change::Degraded(trouble)) => {
                    state.metrics.signals_degraded.set(1);
                    tracing::warn!(
                        reason = trouble.as_str(),
                        backlog = queue.len,
                        lag_ms = queue.oldest_wait.as_millis() as u64,
                        workers = ?workers,
                        "heartbeat workers behind: scoring inline (degraded)"
                    );
                }
                Some(Change::Recovered) => {
                    state.metrics.signals_degraded.set(0);
                    tracing::info!(
                        backlog = queue.len,
                        workers = ?workers,
                        "heartbeat workers caught up: scoring back on the queue"
                    );
                }
                None => {}
            }
        }
    });
}

/// Sets the gauges of what the breaker saw.
fn record(state: &AppState, health: &Health) {
    let m = &state.metrics;
    m.signals_backlog
        .set(i64::try_from(health.queue.len).unwrap_or(i64::MAX));
    m.signals_queue_lag
        .set(health.queue.oldest_wait.as_secs_f64());
    let (scored, p95) = match health.workers {
        Workers::Unknown => return,
        Workers::Silent => (0, None),
        Workers::Reported { scored, p95 } => (scored, p95),
    };
    m.signals_workers_throughput
        .set(i64::try_from(scored).unwrap_or(i64::MAX));
    m.signals_workers_p95
        .set(p95.unwrap_or_default().as_secs_f64());
}

/// What the workers published for `second`.
async fn read_report(shared: &dyn SharedState, second: u64) -> anyhow::Result<Workers> {
    let Some(scored) = shared.get(&keys::workers_scored(second)).await? else {
        // Silent only if the seconds before were too.
        for earlier in 1..SILENT_SECONDS {
            let key = keys::workers_scored(second.saturating_sub(earlier));
            if shared.get(&key).await?.is_some() {
                return Ok(Workers::Unknown);
            }
        }
        return Ok(Workers::Silent);
    };
    let scored = parse_u64(&scored)?;
    let p95 = match shared.get(&keys::workers_p95(second)).await? {
        Some(micros) => Some(Duration::from_micros(parse_u64(&micros)?)),
        None => None,
    };
    Ok(Workers::Reported { scored, p95 })
}

fn parse_u64(bytes: &[u8]) -> anyhow::Result<u64> {
    Ok(std::str::from_utf8(bytes)?.parse()?)
}

fn unix_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A worker process's scoring times in the current second.
#[derive(Debug, Default)]
pub struct ScoringMeter {
    /// (time a batch took, heartbeats it scored)
    batches: Mutex<Vec<(Duration, u32)>>,
}

impl ScoringMeter {
    /// Records that `scored` heartbeats took `elapsed` each (a batch shares
    /// its round trips, so each of its heartbeats waited the whole batch).
    pub fn record(&self, elapsed: Duration, scored: usize) {
        if scored == 0 {
            return;
        }
        let scored = u32::try_from(scored).unwrap_or(u32::MAX);
        self.lock().push((elapsed, scored));
    }

    /// Heartbeats scored since the last call, and their 95th percentile.
    pub fn take(&self) -> (u64, Option<Duration>) {
        let mut batches = std::mem::take(&mut *self.lock());
        let total: u64 = batches.iter().map(|&(_, n)| u64::from(n)).sum();
        if total == 0 {
            return (0, None);
        }
        batches.sort_unstable_by_key(|&(elapsed, _)| elapsed);
        // The smallest time at or under which 95% of the heartbeats were scored.
        let rank = (total * 95).div_ceil(100);
        let mut seen = 0;
        let p95 = batches.iter().find_map(|&(elapsed, n)| {
            seen += u64::from(n);
            (seen >= rank).then_some(elapsed)
        });
        (total, p95)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Duration, u32)>> {
        // Plain data: a panic while held cannot leave it inconsistent.
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publishes `meter` at each second's end until `stop`: the count (zero
/// too — it says this worker is alive) and the p95 of the second just
/// ended.
pub fn spawn_meter_publisher(
    shared: std::sync::Arc<dyn SharedState>,
    meter: std::sync::Arc<ScoringMeter>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut second = unix_second();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = unix_second();
            if now == second {
                continue;
            }
            let (scored, p95) = meter.take();
            if let Err(e) = publish(shared.as_ref(), second, scored, p95).await {
                tracing::warn!(error = %e, "scoring report not published");
            }
            second = now;
        }
    });
}

async fn publish(
    shared: &dyn SharedState,
    second: u64,
    scored: u64,
    p95: Option<Duration>,
) -> anyhow::Result<()> {
    if let Some(p95) = p95 {
        let micros = u64::try_from(p95.as_micros()).unwrap_or(u64::MAX);
        shared
            .set_max(&keys::workers_p95(second), micros, REPORT_TTL)
            .await?;
    }
    // The count last: a reader that finds it finds the p95 too.
    let scored = i64::try_from(scored).unwrap_or(i64::MAX);
    shared
        .incr(&keys::workers_scored(second), scored, REPORT_TTL)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(len: u64, wait_ms: u64, workers: Workers) -> Health {
        Health {
            queue: QueueStats {
                len,
                oldest_wait: Duration::from_millis(wait_ms),
            },
            capacity: 100_000,
            workers,
        }
    }

    fn reported(scored: u64, p95_ms: Option<u64>) -> Workers {
        Workers::Reported {
            scored,
            p95: p95_ms.map(Duration::from_millis),
        }
    }

    const HEALTHY: Workers = Workers::Reported {
        scored: 100_000,
        p95: Some(Duration::from_millis(5)),
    };

    #[test]
    fn the_backlog_degrades_at_half_the_capacity_and_recovers_below_a_tenth() {
        let b = Breaker::default();
        assert_eq!(b.observe(&health(49_999, 0, HEALTHY)), None);
        assert_eq!(
            b.observe(&health(50_000, 0, HEALTHY)),
            Some(Change::Degraded(Trouble::Backlog))
        );
        // Between the two marks it stays as it is (no flapping).
        assert_eq!(b.observe(&health(30_000, 0, HEALTHY)), None);
        assert_eq!(b.observe(&health(10_000, 0, HEALTHY)), None);
        assert!(b.degraded());
        // Under a tenth, and drained in under half a second.
        assert_eq!(
            b.observe(&health(4_000, 0, HEALTHY)),
            Some(Change::Recovered)
        );
        assert_eq!(b.observe(&health(30_000, 0, HEALTHY)), None, "not yet half");
        // A queue that refused a job trips it whatever the backlog.
        b.trip();
        assert!(b.degraded());
        assert_eq!(b.observe(&health(0, 0, HEALTHY)), Some(Change::Recovered));
    }

    #[test]
    fn a_job_waiting_two_seconds_degrades_and_under_half_a_second_recovers() {
        let b = Breaker::default();
        assert_eq!(b.observe(&health(3, 1_999, HEALTHY)), None);
        assert_eq!(
            b.observe(&health(3, 2_000, HEALTHY)),
            Some(Change::Degraded(Trouble::QueueLag))
        );
        assert_eq!(b.observe(&health(3, 500, HEALTHY)), None, "still lagging");
        assert_eq!(b.observe(&health(3, 499, HEALTHY)), Some(Change::Recovered));
    }

    #[test]
    fn silent_workers_degrade_until_they_report_again() {
        let b = Breaker::default();
        assert_eq!(b.observe(&health(0, 0, Workers::Unknown)), None);
        assert_eq!(
            b.observe(&health(0, 0, Workers::Silent)),
            Some(Change::Degraded(Trouble::NoWorkers))
        );
        // An empty queue is no reason to go back while nobody scores.
        assert_eq!(b.observe(&health(0, 0, Workers::Silent)), None);
        // A worker alive with nothing to score reports zero.
        assert_eq!(
            b.observe(&health(0, 0, reported(0, None))),
            Some(Change::Recovered)
        );
    }

    #[test]
    fn a_backlog_the_workers_rate_cannot_drain_soon_degrades() {
        let b = Breaker::default();
        // 20 000 queued, 10 000 scored a second: two seconds to drain.
        assert_eq!(
            b.observe(&health(20_000, 100, reported(10_000, Some(5)))),
            Some(Change::Degraded(Trouble::Throughput))
        );
        // 4 000 at 10 000/s: 0.4 s.
        assert_eq!(
            b.observe(&health(4_000, 100, reported(10_000, Some(5)))),
            Some(Change::Recovered)
        );
        // A backlog no worker drained at all.
        assert_eq!(
            b.observe(&health(1_000, 100, reported(0, None))),
            Some(Change::Degraded(Trouble::Throughput))
        );
        // A few jobs queued after an idle second are no evidence.
        let fresh = Breaker::default();
        assert_eq!(fresh.observe(&health(999, 100, reported(0, None))), None);
    }

    #[test]
    fn slow_scoring_degrades_at_a_second_p95_and_recovers_under_a_quarter() {
        let b = Breaker::default();
        assert_eq!(b.observe(&health(0, 0, reported(500, Some(999)))), None);
        assert_eq!(
            b.observe(&health(0, 0, reported(500, Some(1_000)))),
            Some(Change::Degraded(Trouble::ScoringP95))
        );
        assert_eq!(b.observe(&health(0, 0, reported(500, Some(250)))), None);
        assert_eq!(
            b.observe(&health(0, 0, reported(500, Some(249)))),
            Some(Change::Recovered)
        );
    }

    #[test]
    fn the_p95_of_a_handful_of_heartbeats_is_not_judged() {
        let b = Breaker::default();
        // One device that waited for its lock is not the workers' p95.
        assert_eq!(b.observe(&health(0, 0, reported(19, Some(1_900)))), None);
        assert_eq!(
            b.observe(&health(0, 0, reported(20, Some(1_900)))),
            Some(Change::Degraded(Trouble::ScoringP95))
        );
        assert_eq!(
            b.observe(&health(0, 0, reported(3, Some(1_900)))),
            Some(Change::Recovered)
        );
    }

    #[test]
    fn the_meter_counts_heartbeats_and_weighs_each_batch_by_its_size() {
        let meter = ScoringMeter::default();
        assert_eq!(meter.take(), (0, None));
        // 94 heartbeats in fast batches, 6 in one slow batch: the 95th
        // heartbeat is in the slow one.
        for _ in 0..47 {
            meter.record(Duration::from_millis(2), 2);
        }
        meter.record(Duration::from_millis(400), 6);
        meter.record(Duration::from_secs(9), 0);
        assert_eq!(meter.take(), (100, Some(Duration::from_millis(400))));
        assert_eq!(meter.take(), (0, None), "taken: a new second starts empty");
        // 95 fast of 100: the p95 is fast.
        meter.record(Duration::from_millis(3), 95);
        meter.record(Duration::from_millis(700), 5);
        assert_eq!(meter.take(), (100, Some(Duration::from_millis(3))));
    }
}
