//! Fast shared state: what every replica must see within milliseconds.
//!
//! Four primitives, one trait ([`SharedState`]), two backends chosen by
//! `REDIS_URL` at run time:
//!
//! | primitive | in-process ([`MemoryState`]) | Redis ([`RedisState`]) |
//! |---|---|---|
//! | key/value with TTL | sharded hash map, lazy expiry | `SET PX`, `GETDEL`, `INCRBY` |
//! | token bucket | per-key `f64` bucket under a lock | one Lua script, atomic |
//! | pub/sub | `tokio::broadcast` | `PUBLISH` / `SUBSCRIBE` |
//! | work queue | bounded queue with a pending list | a Stream + consumer group |
//!
//! ## Work-queue semantics (both backends)
//! *At-least-once*: [`SharedState::enqueue`] returns only once the job is
//! stored; a consumer [`fetch`](QueueConsumer::fetch)es jobs, which become
//! *pending* against it until [`ack`](QueueConsumer::ack)ed. A consumer that
//! dies leaves its jobs pending; any other consumer
//! [`reclaim`](QueueConsumer::reclaim)s those idle longer than a threshold.
//! Handlers must therefore be idempotent (heartbeats are, per device+seq).
//! The queue is bounded: when full, `enqueue` fails with
//! [`StateError::QueueFull`] and the caller answers 503 — a job is never
//! accepted and then dropped.
//!
//! Keys are the logical names from [`keys`]; the Redis backend prepends the
//! configured prefix, so deployments (and parallel tests) never collide.
//! Keys one call takes together — a lock and the value read under it, a
//! commit's writes and its lock, a bucket and the counter advanced with it,
//! a command counter and its history — must share a hash tag (`{device}`),
//! so that on Redis Cluster they live in one slot.
//!
//! A queue may be split into [`SharedState::queue_shards`] streams; a job
//! about a key goes to that key's shard, and every shard needs a consumer.
//!
//! Restarts: Redis keeps its keys itself. The in-process backend, as `serve`
//! opens it ([`connect`]), saves the keys security depends on to
//! `state.db` in the data dir and loads them at start ([`journal`]);
//! [`SharedState::close`] is the last step of a clean shutdown.

mod journal;
pub mod keys;
mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use self::memory::MemoryState;
pub use self::redis::{
    breaker::BreakerState,
    topology::{TlsFiles, Topology},
    RedisOptions, RedisState,
};

/// What can go wrong in shared state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend cannot be reached or answered with an error.
    #[error("shared state unavailable: {0}")]
    Unavailable(String),
    /// The work queue is at capacity; nothing was enqueued.
    #[error("queue {0} is full")]
    QueueFull(String),
    /// A stored value could not be decoded.
    #[error("corrupt value: {0}")]
    Corrupt(String),
}

/// Result of a shared-state call.
pub type StateResult<T> = Result<T, StateError>;

/// The verdict of one token-bucket take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketDecision {
    /// Whether the tokens were taken.
    pub allowed: bool,
    /// The bucket's capacity.
    pub limit: u32,
    /// Whole tokens left after this take.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: time until `cost` tokens are available. Zero when allowed.
    pub retry_after: Duration,
}

/// A token-bucket take: the arguments of [`SharedState::take_tokens`].
#[derive(Debug, Clone, Copy)]
pub struct Take<'a> {
    /// The bucket.
    pub key: &'a str,
    /// Its capacity.
    pub capacity: u32,
    /// The period over which it refills its capacity.
    pub period: Duration,
    /// Tokens to take.
    pub cost: u32,
}

/// What [`SharedState::take_then_advance_and_enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admitted {
    /// The bucket's verdict.
    pub bucket: BucketDecision,
    /// What the advance and enqueue did; `None` when the bucket refused.
    pub advanced: Option<Advanced>,
}

/// A job taken from a work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Backend-assigned id, used to ack.
    pub id: String,
    /// The payload as enqueued (shared: the in-process queue keeps a job
    /// pending while its consumer works on it, without a copy).
    pub payload: bytes::Bytes,
}

/// A work queue's state, as the circuit breaker watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Jobs waiting or pending (its backlog).
    pub len: u64,
    /// How long the oldest job not yet handed to a consumer has waited
    /// (zero when none waits): the queue's lag.
    pub oldest_wait: Duration,
}

/// A stream of messages from one pub/sub channel. Dropping it unsubscribes.
///
/// An **empty** message is a gap: the subscription was lost and is back
/// (Redis restarted, failed over, a cluster node died), or the subscriber
/// fell behind, and messages published meanwhile are gone. Every subscriber
/// then forgets what it derived from the channel — a cache of revocations
/// or invalidations empties itself, the kill-switch hub resends each socket
/// what it missed — so a gap costs a reload, never a stale answer.
pub type Subscription = mpsc::Receiver<Vec<u8>>;

/// One consumer of a work queue. Each worker task owns one (on Redis, with its
/// own connection, since a blocking read occupies a connection).
#[async_trait]
pub trait QueueConsumer: Send {
    /// Up to `max` new jobs, waiting at most `wait` for the first.
    async fn fetch(&mut self, max: usize, wait: Duration) -> StateResult<Vec<Job>>;
    /// Marks jobs done; they are never delivered again.
    async fn ack(&mut self, ids: &[String]) -> StateResult<()>;
    /// Takes over up to `max` jobs pending (on any consumer) for at least `min_idle`.
    async fn reclaim(&mut self, min_idle: Duration, max: usize) -> StateResult<Vec<Job>>;
}

/// One holder's writes and lock release, for [`SharedState::commit_many`]
/// (the arguments of [`SharedState::set_many_and_unlock`]).
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// `(key, value, ttl)` to write.
    pub entries: Vec<(&'a str, &'a [u8], Option<Duration>)>,
    /// The lock to release.
    pub lock: &'a str,
    /// The holder's token.
    pub token: &'a [u8],
    /// The lock cannot have expired yet.
    pub within_ttl: bool,
}

/// What [`SharedState::advance_and_enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advanced {
    /// The value was not above the one stored: nothing changed.
    Stale,
    /// No value is stored (a new key, one expired, or shared state that
    /// lost its data): nothing changed. The caller refills it from what it
    /// knows (`crate::sequences`) and tries again — a missing value must
    /// never let any value through.
    Unknown,
    /// Advanced from `previous`, and the payload is on the queue.
    Queued {
        /// The value before.
        previous: u64,
    },
    /// Advanced from `previous`, but the queue is at capacity: not queued.
    QueueFull {
        /// The value before.
        previous: u64,
    },
}

/// Fast shared state: key/value with TTL, token buckets, pub/sub and work queues.
#[async_trait]
pub trait SharedState: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn backend(&self) -> &'static str;

    /// Cheap liveness check used by `/health/ready`.
    async fn ping(&self) -> StateResult<()>;

    /// The value at `key`, if present and not expired.
    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>>;
    /// Sets `key`, replacing any value; `ttl` of `None` keeps it until deleted.
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()>;
    /// Sets `key` only if absent; true when this call set it.
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool>;
    /// Removes and returns the value (a single-use read, e.g. a nonce).
    async fn take(&self, key: &str) -> StateResult<Option<Vec<u8>>>;
    /// Removes `key`; true when it existed.
    async fn delete(&self, key: &str) -> StateResult<bool>;
    /// Adds `by` to the integer at `key` (0 if absent) and returns the new
    /// value; a key created by this call expires after `ttl`.
    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> StateResult<i64>;
    /// Raises the integer at `key` to `value` if it is lower (or absent), in
    /// one atomic step, and (re)sets its TTL; returns the value now stored.
    async fn set_max(&self, key: &str, value: u64, ttl: Duration) -> StateResult<u64>;
    /// Stores `value` at `key` only if it is greater than the integer there
    /// (0 if absent); returns the previous value when it was stored, `None`
    /// when not. Atomic: of concurrent calls with the same value exactly one
    /// wins (heartbeat `seq` replay checks).
    async fn advance(&self, key: &str, value: u64, ttl: Duration) -> StateResult<Option<u64>>;
    /// Puts the integer at `key` back to `previous` if it still holds
    /// `value` (undoes an [`advance`](Self::advance) whose work then
    /// failed); true when it did. Atomic.
    async fn retreat(
        &self,
        key: &str,
        value: u64,
        previous: u64,
        ttl: Duration,
    ) -> StateResult<bool>;
    /// Deletes `key` only if it holds `value` (releasing a lock this holder
    /// owns, never one taken since by someone else); true when deleted. Atomic.
    async fn delete_if(&self, key: &str, value: &[u8]) -> StateResult<bool>;
    /// [`set_max`](Self::set_max) for many keys at once (one round trip on
    /// Redis). Used to save bursts of kill-switch acks.
    async fn set_max_many(&self, entries: &[(String, u64)], ttl: Duration) -> StateResult<()> {
        for (key, value) in entries {
            self.set_max(key, *value, ttl).await?;
        }
        Ok(())
    }
    /// Takes the lock at `lock` with `token` (like [`set_nx`](Self::set_nx)
    /// with `ttl`) and, when it was free, reads `key` under it: `None` when
    /// the lock is held by someone else, else `Some` of the value read. One
    /// round trip on Redis.
    async fn lock_and_get(
        &self,
        lock: &str,
        token: &[u8],
        ttl: Duration,
        key: &str,
    ) -> StateResult<Option<Option<Vec<u8>>>> {
        if !self.set_nx(lock, token, Some(ttl)).await? {
            return Ok(None);
        }
        Ok(Some(self.get(key).await?))
    }
    /// Writes every `(key, value, ttl)`, then releases the lock at `lock` if
    /// it still holds `token` (as [`delete_if`](Self::delete_if)); true when
    /// it did. The writes land whether or not the lock was still held: the
    /// caller's lock TTL must outlast its work. `within_ttl`: the caller
    /// knows its lock cannot have expired yet (less than its TTL, minus a
    /// margin for clock drift, has passed since it asked for it), so a
    /// backend may release it with a plain delete. One round trip on Redis.
    async fn set_many_and_unlock(
        &self,
        entries: &[(&str, &[u8], Option<Duration>)],
        lock: &str,
        token: &[u8],
        within_ttl: bool,
    ) -> StateResult<bool> {
        let _ = within_ttl;
        for (key, value, ttl) in entries {
            self.set(key, value, *ttl).await?;
        }
        self.delete_if(lock, token).await
    }
    /// [`lock_and_get`](Self::lock_and_get) for many `(lock, token, key)` at
    /// once, with one `ttl`: one answer per request, in order. One round trip
    /// on Redis (a worker takes the locks of a whole batch together).
    async fn lock_and_get_many(
        &self,
        requests: &[(&str, &[u8], &str)],
        ttl: Duration,
    ) -> StateResult<Vec<Option<Option<Vec<u8>>>>> {
        let mut answers = Vec::with_capacity(requests.len());
        for (lock, token, key) in requests {
            answers.push(self.lock_and_get(lock, token, ttl, key).await?);
        }
        Ok(answers)
    }
    /// [`set_many_and_unlock`](Self::set_many_and_unlock) for many holders at
    /// once: whether each lock was released, in order. One round trip on
    /// Redis for the holders within their TTL.
    async fn commit_many(&self, commits: &[Commit<'_>]) -> StateResult<Vec<bool>> {
        let mut released = Vec::with_capacity(commits.len());
        for c in commits {
            released.push(
                self.set_many_and_unlock(&c.entries, c.lock, c.token, c.within_ttl)
                    .await?,
            );
        }
        Ok(released)
    }
    /// [`claim`](Self::claim) for many `(key, value)` at once, with one
    /// `ttl`, in order (an earlier claim of the same key is seen by a later
    /// one). One round trip on Redis.
    async fn claim_many(
        &self,
        claims: &[(&str, &[u8])],
        ttl: Duration,
    ) -> StateResult<Vec<Option<Vec<u8>>>> {
        let mut holders = Vec::with_capacity(claims.len());
        for (key, value) in claims {
            holders.push(self.claim(key, value, ttl).await?);
        }
        Ok(holders)
    }
    /// Sets `key` to `value` if absent and returns `None`; else returns the
    /// value already there (the first claimant of a fingerprint). Of
    /// concurrent claims exactly one gets `None`.
    async fn claim(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<Option<Vec<u8>>>;
    /// [`advance`](Self::advance) the integer at `key` to `value`, then — when
    /// it advanced — [`enqueue`](Self::enqueue) `payload` on `queue`. One
    /// round trip on Redis (one script). A full queue leaves the value
    /// advanced and says so ([`Advanced::QueueFull`]), so the caller can do
    /// the work itself.
    async fn advance_and_enqueue(
        &self,
        key: &str,
        value: u64,
        ttl: Duration,
        queue: &str,
        payload: &[u8],
    ) -> StateResult<Advanced> {
        if self.get(key).await?.is_none() {
            return Ok(Advanced::Unknown);
        }
        let Some(previous) = self.advance(key, value, ttl).await? else {
            return Ok(Advanced::Stale);
        };
        match self.enqueue(queue, payload).await {
            Ok(_) => Ok(Advanced::Queued { previous }),
            Err(StateError::QueueFull(_)) => Ok(Advanced::QueueFull { previous }),
            Err(e) => {
                // Give the value back: the caller's retry must not be stale.
                let _ = self.retreat(key, value, previous, ttl).await;
                Err(e)
            }
        }
    }
    /// Time left before `key` expires; `None` when absent or without TTL.
    async fn ttl(&self, key: &str) -> StateResult<Option<Duration>>;

    /// Takes `cost` tokens from the bucket at `key` (capacity `capacity`,
    /// refilled continuously at `capacity` per `period`). Atomic across replicas.
    async fn take_tokens(
        &self,
        key: &str,
        capacity: u32,
        period: Duration,
        cost: u32,
    ) -> StateResult<BucketDecision>;

    /// [`take_tokens`](Self::take_tokens) from `bucket`, then — only when
    /// the bucket allowed it — [`advance_and_enqueue`](Self::advance_and_enqueue).
    /// Heartbeat ingestion in one round trip on Redis (one script) instead
    /// of two. `Admitted::advanced` is `None` when the bucket refused (nothing
    /// else was done).
    #[allow(clippy::too_many_arguments)]
    async fn take_then_advance_and_enqueue(
        &self,
        bucket: Take<'_>,
        key: &str,
        value: u64,
        ttl: Duration,
        queue: &str,
        payload: &[u8],
    ) -> StateResult<Admitted> {
        let decision = self
            .take_tokens(bucket.key, bucket.capacity, bucket.period, bucket.cost)
            .await?;
        if !decision.allowed {
            return Ok(Admitted {
                bucket: decision,
                advanced: None,
            });
        }
        let advanced = self
            .advance_and_enqueue(key, value, ttl, queue, payload)
            .await?;
        Ok(Admitted {
            bucket: decision,
            advanced: Some(advanced),
        })
    }

    /// Adds `payload` at position `seq` to the bounded history at `key`,
    /// dropping the oldest entries past `max_len`; the history expires after
    /// `ttl` without writes. (Redis: a sorted set scored by `seq`.)
    async fn history_push(
        &self,
        key: &str,
        seq: u64,
        payload: &[u8],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<()>;
    /// For each `(counter, history)` pair, [`incr`](Self::incr) the counter
    /// by one and [`history_push`](Self::history_push) `payloads[i]` at the
    /// new position; returns the positions. One round trip on Redis (one
    /// script). Payloads must not depend on the position (readers take it
    /// from [`history_since`](Self::history_since)) and must be unique per
    /// history. Used to give many devices their next command at once.
    async fn sequence_and_push(
        &self,
        entries: &[(String, String)],
        payloads: &[Vec<u8>],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<Vec<u64>>;

    /// The entries of the history at `key` with position greater than
    /// `since`, in order.
    async fn history_since(&self, key: &str, since: u64) -> StateResult<Vec<(u64, Vec<u8>)>>;

    /// Publishes `payload` on `channel` to every subscriber on every replica.
    async fn publish(&self, channel: &str, payload: &[u8]) -> StateResult<()>;
    /// Subscribes to `channel`; messages published after this returns are delivered.
    async fn subscribe(&self, channel: &str) -> StateResult<Subscription>;

    /// The Redis circuit breaker's state; `None` for the in-process backend.
    fn breaker_state(&self) -> Option<BreakerState> {
        None
    }

    /// Rate-limit takes answered from this instance's own buckets because
    /// the shared ones were unavailable (0 in process: they never are).
    fn fallback_takes(&self) -> u64 {
        0
    }

    /// Streams each work queue is split into; [`consumer`](Self::consumer)
    /// takes one of `0..queue_shards()` (taken modulo), and every shard
    /// needs a consumer. One on the in-process backend.
    fn queue_shards(&self) -> usize {
        1
    }

    /// Appends a job to `queue`; fails with [`StateError::QueueFull`] at capacity.
    async fn enqueue(&self, queue: &str, payload: &[u8]) -> StateResult<String>;
    /// The backlog of `queue` and how long its oldest undelivered job has waited.
    async fn queue_stats(&self, queue: &str) -> StateResult<QueueStats>;
    /// Jobs waiting or pending in `queue` (its backlog).
    async fn queue_len(&self, queue: &str) -> StateResult<u64> {
        Ok(self.queue_stats(queue).await?.len)
    }
    /// Whether queued jobs leave this process (over the network to a
    /// server): then their size costs more than the CPU to make them small.
    fn queue_is_remote(&self) -> bool {
        true
    }
    /// A consumer named `name` for `queue` (names must be unique per process).
    async fn consumer(
        &self,
        queue: &str,
        shard: usize,
        name: &str,
    ) -> StateResult<Box<dyn QueueConsumer>>;

    /// The last call of a clean shutdown, once the workers have stopped:
    /// whatever this backend keeps across a restart is saved, and later
    /// writes may be lost. The in-process backend opened on a file saves
    /// its security state and the jobs still queued
    /// ([`MemoryState::open`]); Redis keeps everything itself.
    async fn close(&self) -> StateResult<()> {
        Ok(())
    }
}

/// A bucket whose capacity changed since its last take (the plan changed):
/// a raise credits the difference at once, so an upgrade takes effect on the
/// next request; a cut leaves the level to be clamped by [`bucket_step`].
pub fn bucket_resize(tokens: f64, previous_capacity: u32, capacity: u32) -> f64 {
    if capacity > previous_capacity {
        tokens + f64::from(capacity - previous_capacity)
    } else {
        tokens
    }
}

/// The token-bucket arithmetic shared by the in-process backend and the
/// documentation of the Lua script: refill, then take.
///
/// `tokens` is the level after refilling for `elapsed`; returns the new level
/// and the decision.
pub fn bucket_step(
    tokens: f64,
    elapsed: Duration,
    capacity: u32,
    period: Duration,
    cost: u32,
) -> (f64, BucketDecision) {
    let cap = f64::from(capacity);
    let rate = cap / period.as_secs_f64().max(f64::MIN_POSITIVE); // tokens per second
    let mut level = (tokens + elapsed.as_secs_f64() * rate).min(cap);
    let cost_f = f64::from(cost);
    let allowed = level >= cost_f;
    if allowed {
        level -= cost_f;
    }
    let secs = |tokens: f64| Duration::from_secs_f64((tokens / rate).max(0.0));
    let decision = BucketDecision {
        allowed,
        limit: capacity,
        remaining: level.floor().clamp(0.0, cap) as u32,
        reset_after: secs(cap - level),
        retry_after: if allowed {
            Duration::ZERO
        } else {
            secs(cost_f - level)
        },
    };
    (level, decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_full_bucket_allows_exactly_capacity_takes() {
        let mut level = 120.0;
        let mut allowed = 0;
        for _ in 0..200 {
            let (next, d) = bucket_step(level, Duration::ZERO, 120, MINUTE, 1);
            level = next;
            allowed += u32::from(d.allowed);
        }
        assert_eq!(allowed, 120);
    }

    #[test]
    fn an_empty_bucket_refills_continuously() {
        // 120/min = 2 per second: after 500 ms exactly one token.
        let (level, d) = bucket_step(0.0, Duration::from_millis(500), 120, MINUTE, 1);
        assert!(d.allowed);
        assert!(level.abs() < 1e-9);
        let (_, refused) = bucket_step(level, Duration::from_millis(100), 120, MINUTE, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after.as_millis(), 400);
    }

    #[test]
    fn a_raised_capacity_is_credited_and_a_cut_one_clamps() {
        // An exhausted trial bucket (120) upgraded to 1200 allows 1080 at once.
        let upgraded = bucket_resize(0.0, 120, 1200);
        let (_, d) = bucket_step(upgraded, Duration::ZERO, 1200, MINUTE, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1079);
        // A full paid bucket downgraded to trial holds at most 120.
        let downgraded = bucket_resize(1200.0, 1200, 120);
        let (level, d) = bucket_step(downgraded, Duration::ZERO, 120, MINUTE, 1);
        assert_eq!(d.remaining, 119);
        assert!(level <= 120.0);
    }

    proptest! {
        #[test]
        fn a_resized_bucket_stays_within_its_new_capacity(
            start in 0.0f64..2000.0,
            from in 1u32..2000,
            to in 1u32..2000,
        ) {
            let start = start.min(f64::from(from));
            let resized = bucket_resize(start, from, to);
            let (level, d) = bucket_step(resized, Duration::ZERO, to, MINUTE, 1);
            prop_assert!(level <= f64::from(to));
            prop_assert!(d.remaining <= to);
            // Never less than before a raise, never more than `to`.
            if to >= from { prop_assert!(resized >= start); }
        }

        #[test]
        fn level_stays_within_bounds(
            start in 0.0f64..2000.0,
            elapsed_ms in 0u64..600_000,
            capacity in 1u32..2000,
            cost in 1u32..10,
        ) {
            let start = start.min(f64::from(capacity));
            let (level, d) = bucket_step(start, Duration::from_millis(elapsed_ms), capacity, MINUTE, cost);
            prop_assert!(level >= 0.0);
            prop_assert!(level <= f64::from(capacity));
            prop_assert!(d.remaining <= capacity);
            prop_assert_eq!(d.limit, capacity);
            if d.allowed { prop_assert_eq!(d.retry_after, Duration::ZERO); }
            else { prop_assert!(d.retry_after > Duration::ZERO); }
        }

        #[test]
        fn never_more_than_capacity_plus_refill(
            capacity in 1u32..500,
            steps in proptest::collection::vec(0u64..2_000, 1..200),
        ) {
            // Over any run of takes, allowed ≤ capacity + tokens refilled in the elapsed time.
            let mut level = f64::from(capacity);
            let mut allowed = 0u64;
            let mut total_ms = 0u64;
            for ms in steps {
                total_ms += ms;
                let (next, d) = bucket_step(level, Duration::from_millis(ms), capacity, MINUTE, 1);
                level = next;
                allowed += u64::from(d.allowed);
            }
            let refill = f64::from(capacity) * total_ms as f64 / 60_000.0;
            prop_assert!(allowed as f64 <= f64::from(capacity) + refill + 1e-6);
        }
    }
}

/// Opens the shared state the configuration names: Redis when `REDIS_URL` is
/// set, in-process otherwise.
/// With `metrics`, Redis command latency is observed there.
pub async fn connect(
    config: &crate::config::Config,
    metrics: Option<std::sync::Arc<crate::telemetry::Metrics>>,
) -> Result<std::sync::Arc<dyn SharedState>, ConnectError> {
    use secrecy::ExposeSecret;
    match &config.redis_url {
        None => {
            let path = config.data_dir.join(STATE_FILE);
            MemoryState::open(&path, config.queue_capacity, config.state_commit_seq)
                .await
                .map(|s| s as std::sync::Arc<dyn SharedState>)
                .map_err(|e| ConnectError {
                    what: "open the embedded shared state",
                    target: path.display().to_string(),
                    reason: e.to_string(),
                })
        }
        Some(url) => RedisState::connect_with(RedisOptions {
            url: url.expose_secret().to_owned(),
            prefix: config.redis_prefix.clone(),
            queue_capacity: config.queue_capacity,
            connect_timeout: config.connect_timeout,
            call_timeout: config.redis_call_timeout,
            tls: config.redis_tls.clone(),
            queue_shards: config.redis_queue_shards,
            metrics,
        })
        .await
        .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn SharedState>)
        .map_err(|e| ConnectError {
            what: "reach Redis",
            target: crate::config::redact_url(url.expose_secret()),
            reason: e.to_string(),
        }),
    }
}

/// The embedded default's state file, in the data dir.
pub const STATE_FILE: &str = "state.db";

/// Redis could not be reached at start (or the embedded state file opened).
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} at {target}: {reason}")]
pub struct ConnectError {
    /// What failed: `reach Redis`, `open the embedded shared state`.
    pub what: &'static str,
    /// The redacted URL.
    pub target: String,
    /// Why, in one line.
    pub reason: String,
}
