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
//! * **throughput** — heartbeats the workers scored in the second before
//!   last: no worker reporting for three seconds in a row means nobody
//!   scores what is queued, and a backlog the reported rate needs too long
//!   to drain means the workers are falling behind before the lag shows it;
//! * **scoring p95** — the slowest worker's 95th percentile time to score a
//!   heartbeat in that second (a worker reports one only from 20 heartbeats:
//!   the percentile of a handful is their maximum — one device waiting for
//!   its lock).
//!
//! Workers report through shared state, so every replica reads the same
//! numbers: each worker process meters its batches ([`ScoringMeter`]) and,
//! at each second's end, adds its count to `sig:health:scored:{second}` and
//! raises `sig:health:p95_us:{second}` to its p95 ([`spawn_meter_publisher`]).
//! Seconds are wall-clock Unix seconds: a worker whose clock is more than
//! about a second behind a replica's reports too late to be judged, so
//! replicas and workers need synchronised clocks (NTP).
//!
//! Any mark at or above its high threshold degrades; all of them below
//! their low thresholds recovers (hysteresis). The workers' reports are
//! judged only for seconds after the breaker's last change: while degraded,
//! ingestion queues nothing, so the seconds around a change describe the
//! breaker's own effect, not the workers. Recovering needs such a fresh
//! report — a replica whose workers are all gone stays degraded. Under
//! lasting slowness the breaker goes back to the queue once the workers
//! have drained it, and degrades again as soon as fresh reports show the
//! slowness (a few seconds each way): it keeps probing the workers.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use crate::{
    state::{keys, QueueStats, SharedState},
    telemetry::{Metrics, ReasonLabels},
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

/// Why the breaker degraded: the first mark at or above its high threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The queue refused a job ([`Breaker::trip`]).
    QueueFull,
    /// The backlog reached [`Breaker::BACKLOG_HIGH`] of the capacity.
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
            Self::QueueFull => "queue_full",
            Self::Backlog => "backlog",
            Self::QueueLag => "queue_lag",
            Self::NoWorkers => "no_workers",
            Self::Throughput => "throughput",
            Self::ScoringP95 => "scoring_p95",
        }
    }
}

/// What the workers reported for the second before last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// Not known: the watch just started, the report is not there yet or
    /// could not be read, or the second is not after the breaker's last
    /// change. Never evidence of trouble, nor of calm.
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
                } else if p95 >= Some(Breaker::P95_HIGH) {
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
            Workers::Unknown | Workers::Silent => false,
            Workers::Reported { scored, p95 } => {
                self.drain_time(scored) < Breaker::DRAIN_LOW
                    && p95.is_none_or(|p| p < Breaker::P95_LOW)
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

    /// Forces degraded mode (the queue refused a job); the watch logs and
    /// counts it at its next look.
    pub fn trip(&self) {
        self.degraded.store(true, Ordering::Relaxed);
    }
}

/// Watches the workers every 250 ms, for `breaker`, until `stop`: the
/// queue of `shared` (of `capacity` jobs) and the workers' reports in it;
/// changes are logged and set in `metrics`.
pub fn spawn_breaker_watch(
    breaker: Arc<Breaker>,
    shared: Arc<dyn SharedState>,
    metrics: Arc<Metrics>,
    capacity: usize,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        let mut reports = ReportReader::new(unix_second());
        let mut was_degraded = breaker.degraded();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = unix_second();
            if breaker.degraded() && !was_degraded {
                // Ingestion tripped it: the queue refused a job.
                reports.changed(now);
                announce(&metrics, Change::Degraded(Trouble::QueueFull), None, None);
            }
            let Ok(queue) = shared.queue_stats(keys::HEARTBEAT_QUEUE).await else {
                was_degraded = breaker.degraded();
                continue;
            };
            let workers = reports.look(shared.as_ref(), now).await;
            let health = Health {
                queue,
                capacity,
                workers,
            };
            record(&metrics, &health);
            if let Some(change) = breaker.observe(&health) {
                reports.changed(now);
                announce(&metrics, change, Some(&queue), Some(workers));
            }
            was_degraded = breaker.degraded();
        }
    });
}

/// Logs a change and sets its metrics.
fn announce(
    metrics: &Metrics,
    change: Change,
    queue: Option<&QueueStats>,
    workers: Option<Workers>,
) {
    let backlog = queue.map(|q| q.len);
    let lag_ms = queue.map(|q| u64::try_from(q.oldest_wait.as_millis()).unwrap_or(u64::MAX));
    match change {
        Change::Degraded(trouble) => {
            metrics.signals_degraded.set(1);
            metrics
                .signals_breaker_trips
                .get_or_create(&ReasonLabels {
                    reason: trouble.as_str(),
                })
                .inc();
            tracing::warn!(
                reason = trouble.as_str(),
                backlog,
                lag_ms,
                workers = ?workers,
                "heartbeat workers behind: scoring inline (degraded)"
            );
        }
        Change::Recovered => {
            metrics.signals_degraded.set(0);
            tracing::info!(
                backlog,
                lag_ms,
                workers = ?workers,
                "heartbeat workers caught up: scoring back on the queue"
            );
        }
    }
}

/// Sets the gauges of what the breaker saw.
fn record(metrics: &Metrics, health: &Health) {
    let m = metrics;
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

/// Reads the workers' reports for the breaker: which second to read, what
/// counts as silence, and which seconds are too close to its last change.
struct ReportReader {
    /// When the watch started (Unix second): silence before the grace is
    /// no evidence.
    started: u64,
    /// Reports of this second and earlier are not judged.
    changed: u64,
    /// The last report read, by second (read once).
    cached: Option<(u64, Workers)>,
}

impl ReportReader {
    fn new(now: u64) -> Self {
        Self {
            started: now,
            changed: now,
            cached: None,
        }
    }

    /// The breaker changed state in second `now`.
    fn changed(&mut self, now: u64) {
        self.changed = now;
        self.cached = None;
    }

    /// What the workers reported for the second before last, seen at `now`.
    async fn look(&mut self, shared: &dyn SharedState, now: u64) -> Workers {
        let second = now.saturating_sub(2);
        if second <= self.changed {
            return Workers::Unknown;
        }
        if let Some((cached, workers)) = self.cached {
            if cached == second {
                return workers;
            }
        }
        match read_report(shared, second).await {
            Ok(Workers::Silent) if now < self.started + SILENCE_GRACE.as_secs() => Workers::Unknown,
            Ok(workers @ Workers::Reported { .. }) => {
                self.cached = Some((second, workers));
                workers
            }
            // Silence or a report not there yet: read again next time (a
            // publisher may be late).
            Ok(workers) => workers,
            Err(e) => {
                tracing::debug!(error = %e, "workers' report not read");
                Workers::Unknown
            }
        }
    }
}

/// What the workers published for `second`: silent only if the seconds
/// before were too.
async fn read_report(shared: &dyn SharedState, second: u64) -> anyhow::Result<Workers> {
    let Some(scored) = shared.get(&keys::workers_scored(second)).await? else {
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
    /// Fewest heartbeats in a second whose p95 is reported: the percentile
    /// of a handful is their maximum (one device that waited for its lock).
    pub const P95_MIN_SCORED: u64 = 20;

    /// Records that `scored` heartbeats took `elapsed` each (a batch shares
    /// its round trips, so each of its heartbeats waited the whole batch).
    pub fn record(&self, elapsed: Duration, scored: usize) {
        if scored == 0 {
            return;
        }
        let scored = u32::try_from(scored).unwrap_or(u32::MAX);
        self.lock().push((elapsed, scored));
    }

    /// Heartbeats scored since the last call, and their 95th percentile
    /// (from [`Self::P95_MIN_SCORED`] heartbeats).
    pub fn take(&self) -> (u64, Option<Duration>) {
        let mut batches = std::mem::take(&mut *self.lock());
        let total: u64 = batches.iter().map(|&(_, n)| u64::from(n)).sum();
        if total < Self::P95_MIN_SCORED {
            return (total, None);
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
    fn recovering_needs_a_report_unknown_is_not_calm() {
        let b = Breaker::default();
        b.trip();
        assert_eq!(b.observe(&health(0, 0, Workers::Unknown)), None);
        assert_eq!(b.observe(&health(0, 0, HEALTHY)), Some(Change::Recovered));
    }

    #[tokio::test]
    async fn reports_are_fresh_silence_takes_three_seconds_and_a_change_sets_them_aside() {
        use crate::state::MemoryState;
        let shared = MemoryState::new(10);
        let mut reader = ReportReader::new(100);
        // The second the watch started in is not judged; the next is
        // silent, but within the start-up grace.
        assert_eq!(reader.look(&shared, 102).await, Workers::Unknown);
        assert_eq!(reader.look(&shared, 103).await, Workers::Unknown);
        // Seconds 100, 101 and 102 without a report: nobody is alive.
        assert_eq!(reader.look(&shared, 104).await, Workers::Silent);
        let ms = Duration::from_millis;
        publish(&shared, 103, 40, Some(ms(3)))
            .await
            .expect("publish");
        publish(&shared, 103, 2, Some(ms(9)))
            .await
            .expect("publish");
        let both = Workers::Reported {
            scored: 42,
            p95: Some(ms(9)),
        };
        assert_eq!(
            reader.look(&shared, 105).await,
            both,
            "summed; the worst p95"
        );
        // One second missed after a report is a late publisher, not silence.
        assert_eq!(reader.look(&shared, 106).await, Workers::Unknown);
        publish(&shared, 104, 5, None).await.expect("late publish");
        assert_eq!(
            reader.look(&shared, 106).await,
            Workers::Reported {
                scored: 5,
                p95: None
            },
            "read again once there"
        );
        // A change sets aside the seconds up to it.
        publish(&shared, 105, 7, None).await.expect("publish");
        reader.changed(107);
        assert_eq!(reader.look(&shared, 107).await, Workers::Unknown);
        assert_eq!(reader.look(&shared, 109).await, Workers::Unknown);
        publish(&shared, 108, 11, None).await.expect("publish");
        assert_eq!(
            reader.look(&shared, 110).await,
            Workers::Reported {
                scored: 11,
                p95: None
            }
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
        // A handful: counted, but their p95 is no one's.
        meter.record(Duration::from_millis(1_900), 1);
        meter.record(Duration::from_millis(3), 18);
        assert_eq!(meter.take(), (19, None));
        // 95 fast of 100: the p95 is fast.
        meter.record(Duration::from_millis(3), 95);
        meter.record(Duration::from_millis(700), 5);
        assert_eq!(meter.take(), (100, Some(Duration::from_millis(3))));
    }
}
