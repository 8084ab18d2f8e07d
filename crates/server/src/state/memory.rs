//! In-process shared state for the embedded default (a single instance).
//!
//! Expired keys are dropped lazily on read and swept in bulk, so memory
//! stays bounded without a background task. A sweep visits every entry, so
//! it waits for as many writes as there were entries left by the last one
//! (at least [`SWEEP_EVERY`]): constant work per write however many keys
//! live — a day of window fingerprints is millions of them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::{
    sync::{broadcast, mpsc, Notify},
    time::Instant,
};

use super::{
    bucket_resize, bucket_step, BucketDecision, Job, QueueConsumer, QueueStats, SharedState,
    StateError, StateResult, Subscription,
};

/// The fewest writes between two sweeps.
const SWEEP_EVERY: u64 = 4096;
const CHANNEL_CAPACITY: usize = 1024;

struct Entry {
    value: Vec<u8>,
    expires_at: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

struct Bucket {
    tokens: f64,
    /// The capacity of the last take (a plan change resizes the bucket).
    capacity: u32,
    updated: Instant,
    /// When the bucket is full again (and so can be forgotten).
    full_at: Instant,
}

#[derive(Default)]
struct QueueInner {
    /// Jobs not yet delivered, with when each was enqueued.
    ready: VecDeque<(Job, Instant)>,
    /// id → (job, consumer, delivered at)
    pending: HashMap<String, (Job, String, Instant)>,
}

struct Queue {
    inner: Mutex<QueueInner>,
    notify: Notify,
}

/// In-process implementation of [`SharedState`].
pub struct MemoryState {
    kv: DashMap<String, Entry>,
    buckets: DashMap<String, Bucket>,
    channels: DashMap<String, broadcast::Sender<Vec<u8>>>,
    histories: DashMap<String, (std::collections::BTreeMap<u64, Vec<u8>>, Instant)>,
    queues: DashMap<String, Arc<Queue>>,
    queue_capacity: usize,
    writes: AtomicU64,
    /// The write count at which the next sweep runs (`u64::MAX` while one runs).
    next_sweep: AtomicU64,
    next_job: AtomicU64,
}

impl MemoryState {
    /// Raises the integer at `key` to `value` if lower (0 when absent or
    /// expired), refreshing the TTL when it is written or when `always_touch`;
    /// returns the value found before.
    fn raise_to(&self, key: &str, value: u64, ttl: Duration, always_touch: bool) -> u64 {
        let now = Instant::now();
        let mut entry = self.kv.entry(key.to_owned()).or_insert_with(|| Entry {
            value: b"0".to_vec(),
            expires_at: Some(now + ttl),
        });
        let current: u64 = if entry.live(now) {
            std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        } else {
            0
        };
        if value > current || always_touch {
            *entry = Entry {
                value: current.max(value).to_string().into_bytes(),
                expires_at: Some(now + ttl),
            };
        }
        drop(entry);
        self.after_write();
        current
    }

    /// An empty state whose queues hold at most `queue_capacity` jobs each.
    pub fn new(queue_capacity: usize) -> Self {
        Self {
            kv: DashMap::new(),
            buckets: DashMap::new(),
            channels: DashMap::new(),
            histories: DashMap::new(),
            queues: DashMap::new(),
            queue_capacity: queue_capacity.max(1),
            writes: AtomicU64::new(0),
            next_sweep: AtomicU64::new(SWEEP_EVERY),
            next_job: AtomicU64::new(1),
        }
    }

    fn after_write(&self) {
        let writes = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        let due = self.next_sweep.load(Ordering::Relaxed);
        // Whoever moves the mark sweeps; the others go on.
        if writes < due
            || self
                .next_sweep
                .compare_exchange(due, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let now = Instant::now();
        self.kv.retain(|_, e| e.live(now));
        self.buckets.retain(|_, b| b.full_at > now);
        let left = (self.kv.len() + self.buckets.len()) as u64;
        self.next_sweep.store(
            writes.saturating_add(left.max(SWEEP_EVERY)),
            Ordering::Relaxed,
        );
    }

    fn live_entry(&self, key: &str) -> bool {
        let now = Instant::now();
        self.kv.remove_if(key, |_, e| !e.live(now));
        self.kv.contains_key(key)
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        self.queues
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Queue {
                    inner: Mutex::new(QueueInner::default()),
                    notify: Notify::new(),
                })
            })
            .clone()
    }
}

fn lock(queue: &Queue) -> std::sync::MutexGuard<'_, QueueInner> {
    // A panic while holding this lock cannot leave the queue inconsistent
    // (every mutation is a single push/pop/insert), so poisoning is ignored.
    queue.inner.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl SharedState for MemoryState {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> StateResult<()> {
        Ok(())
    }

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let now = Instant::now();
        Ok(self
            .kv
            .get(key)
            .filter(|e| e.live(now))
            .map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.kv.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_at: ttl.map(|t| Instant::now() + t),
            },
        );
        self.after_write();
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        let now = Instant::now();
        let mut inserted = false;
        self.kv
            .entry(key.to_owned())
            .and_modify(|e| {
                if !e.live(now) {
                    *e = Entry {
                        value: value.to_vec(),
                        expires_at: ttl.map(|t| now + t),
                    };
                    inserted = true;
                }
            })
            .or_insert_with(|| {
                inserted = true;
                Entry {
                    value: value.to_vec(),
                    expires_at: ttl.map(|t| now + t),
                }
            });
        self.after_write();
        Ok(inserted)
    }

    async fn take(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let now = Instant::now();
        Ok(self
            .kv
            .remove(key)
            .filter(|(_, e)| e.live(now))
            .map(|(_, e)| e.value))
    }

    async fn delete(&self, key: &str) -> StateResult<bool> {
        let existed = self.live_entry(key);
        self.kv.remove(key);
        Ok(existed)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> StateResult<i64> {
        let now = Instant::now();
        let mut entry = self.kv.entry(key.to_owned()).or_insert_with(|| Entry {
            value: b"0".to_vec(),
            expires_at: Some(now + ttl),
        });
        if !entry.live(now) {
            *entry = Entry {
                value: b"0".to_vec(),
                expires_at: Some(now + ttl),
            };
        }
        let current: i64 = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StateError::Corrupt(format!("{key} is not an integer")))?;
        let next = current.saturating_add(by);
        entry.value = next.to_string().into_bytes();
        drop(entry);
        self.after_write();
        Ok(next)
    }

    async fn advance(&self, key: &str, value: u64, ttl: Duration) -> StateResult<Option<u64>> {
        let previous = self.raise_to(key, value, ttl, false);
        Ok((previous < value).then_some(previous))
    }

    async fn retreat(
        &self,
        key: &str,
        value: u64,
        previous: u64,
        ttl: Duration,
    ) -> StateResult<bool> {
        let now = Instant::now();
        let Some(mut entry) = self.kv.get_mut(key) else {
            return Ok(false);
        };
        let holds = entry.live(now) && entry.value == value.to_string().into_bytes();
        if holds {
            *entry = Entry {
                value: previous.to_string().into_bytes(),
                expires_at: Some(now + ttl),
            };
        }
        Ok(holds)
    }

    async fn claim(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<Option<Vec<u8>>> {
        let now = Instant::now();
        let fresh = || Entry {
            value: value.to_vec(),
            expires_at: Some(now + ttl),
        };
        let holder = match self.kv.entry(key.to_owned()) {
            dashmap::mapref::entry::Entry::Occupied(mut e) if !e.get().live(now) => {
                e.insert(fresh());
                None
            }
            dashmap::mapref::entry::Entry::Occupied(e) => Some(e.get().value.clone()),
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(fresh());
                None
            }
        };
        self.after_write();
        Ok(holder)
    }

    async fn delete_if(&self, key: &str, value: &[u8]) -> StateResult<bool> {
        let now = Instant::now();
        Ok(self
            .kv
            .remove_if(key, |_, entry| entry.live(now) && entry.value == value)
            .is_some())
    }

    async fn set_max(&self, key: &str, value: u64, ttl: Duration) -> StateResult<u64> {
        Ok(self.raise_to(key, value, ttl, true).max(value))
    }

    async fn ttl(&self, key: &str) -> StateResult<Option<Duration>> {
        let now = Instant::now();
        Ok(self
            .kv
            .get(key)
            .filter(|e| e.live(now))
            .and_then(|e| e.expires_at.map(|t| t - now)))
    }

    async fn take_tokens(
        &self,
        key: &str,
        capacity: u32,
        period: Duration,
        cost: u32,
    ) -> StateResult<BucketDecision> {
        let now = Instant::now();
        let mut bucket = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: f64::from(capacity),
            capacity,
            updated: now,
            full_at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated);
        let tokens = bucket_resize(bucket.tokens, bucket.capacity, capacity);
        let (level, decision) = bucket_step(tokens, elapsed, capacity, period, cost);
        bucket.tokens = level;
        bucket.capacity = capacity;
        bucket.updated = now;
        bucket.full_at = now + decision.reset_after;
        drop(bucket);
        self.after_write();
        Ok(decision)
    }

    async fn history_push(
        &self,
        key: &str,
        seq: u64,
        payload: &[u8],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<()> {
        let now = Instant::now();
        let mut entry = self
            .histories
            .entry(key.to_owned())
            .or_insert_with(|| (std::collections::BTreeMap::new(), now + ttl));
        if entry.1 <= now {
            entry.0.clear();
        }
        entry.0.insert(seq, payload.to_vec());
        while entry.0.len() > max_len {
            entry.0.pop_first();
        }
        entry.1 = now + ttl;
        Ok(())
    }

    async fn sequence_and_push(
        &self,
        entries: &[(String, String)],
        payloads: &[Vec<u8>],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<Vec<u64>> {
        let mut seqs = Vec::with_capacity(entries.len());
        for ((counter, history), payload) in entries.iter().zip(payloads) {
            let seq = u64::try_from(self.incr(counter, 1, ttl).await?).unwrap_or_default();
            self.history_push(history, seq, payload, max_len, ttl)
                .await?;
            seqs.push(seq);
        }
        Ok(seqs)
    }

    async fn history_since(&self, key: &str, since: u64) -> StateResult<Vec<(u64, Vec<u8>)>> {
        let now = Instant::now();
        Ok(self
            .histories
            .get(key)
            .filter(|e| e.1 > now)
            .map(|e| {
                e.0.range(since.saturating_add(1)..)
                    .map(|(seq, payload)| (*seq, payload.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> StateResult<()> {
        if let Some(sender) = self.channels.get(channel) {
            // No receivers is not an error: nobody is listening on this replica.
            let _ = sender.send(payload.to_vec());
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> StateResult<Subscription> {
        let mut source = self
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let channel = channel.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    message = source.recv() => match message {
                        Ok(payload) => {
                            if tx.send(payload).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(channel, missed, "pub/sub subscriber lagged; messages dropped");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
        Ok(rx)
    }

    async fn enqueue(&self, queue: &str, payload: &[u8]) -> StateResult<String> {
        let q = self.queue(queue);
        let id = {
            let mut inner = lock(&q);
            if inner.ready.len() + inner.pending.len() >= self.queue_capacity {
                return Err(StateError::QueueFull(queue.to_owned()));
            }
            let id = format!("{}-0", self.next_job.fetch_add(1, Ordering::Relaxed));
            inner.ready.push_back((
                Job {
                    id: id.clone(),
                    payload: bytes::Bytes::copy_from_slice(payload),
                },
                Instant::now(),
            ));
            id
        };
        q.notify.notify_one();
        Ok(id)
    }

    async fn queue_stats(&self, queue: &str) -> StateResult<QueueStats> {
        let q = self.queue(queue);
        let inner = lock(&q);
        Ok(QueueStats {
            len: (inner.ready.len() + inner.pending.len()) as u64,
            oldest_wait: inner
                .ready
                .front()
                .map_or(Duration::ZERO, |(_, at)| at.elapsed()),
        })
    }

    fn queue_is_remote(&self) -> bool {
        false
    }

    async fn consumer(&self, queue: &str, name: &str) -> StateResult<Box<dyn QueueConsumer>> {
        Ok(Box::new(MemoryConsumer {
            queue: self.queue(queue),
            name: name.to_owned(),
        }))
    }
}

/// How long a busy consumer waits for a small batch to fill. Under load a
/// job arrives every few tens of microseconds; taking each as it comes
/// costs a task wake-up (often a thread's, across cores) per job, and the
/// batch's shared work (one pass over the states, one save) is spread over
/// few jobs. Waiting this long when fewer than half a batch are waiting
/// gave the embedded server ~10% more heartbeats per second
/// (docs/BENCHMARKS.md), for at most ~2 ms more before a heartbeat is
/// scored (tokio's timer ticks in milliseconds). A consumer that was idle
/// takes the first job at once, so a lone heartbeat is scored without delay.
const BATCH_LINGER: Duration = Duration::from_millis(1);

struct MemoryConsumer {
    queue: Arc<Queue>,
    name: String,
}

impl MemoryConsumer {
    fn take_ready(&self, max: usize) -> Vec<Job> {
        let mut inner = lock(&self.queue);
        let n = max.min(inner.ready.len());
        let jobs: Vec<Job> = inner.ready.drain(..n).map(|(job, _)| job).collect();
        let now = Instant::now();
        for job in &jobs {
            inner
                .pending
                .insert(job.id.clone(), (job.clone(), self.name.clone(), now));
        }
        jobs
    }
}

#[async_trait]
impl QueueConsumer for MemoryConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> StateResult<Vec<Job>> {
        let deadline = Instant::now() + wait;
        // Jobs already waiting arrived while this consumer handled its last
        // batch: the queue is busy (see [`BATCH_LINGER`]).
        let mut busy = true;
        loop {
            let notified = self.queue.notify.notified();
            if busy {
                let waiting = lock(&self.queue).ready.len();
                if waiting > 0 && waiting < max / 2 {
                    tokio::time::sleep(BATCH_LINGER).await;
                }
            }
            let jobs = self.take_ready(max.max(1));
            if !jobs.is_empty() {
                // Wake a sibling in case more work is waiting.
                if !lock(&self.queue).ready.is_empty() {
                    self.queue.notify.notify_one();
                }
                return Ok(jobs);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
            busy = false;
        }
    }

    async fn ack(&mut self, ids: &[String]) -> StateResult<()> {
        let mut inner = lock(&self.queue);
        for id in ids {
            inner.pending.remove(id);
        }
        Ok(())
    }

    async fn reclaim(&mut self, min_idle: Duration, max: usize) -> StateResult<Vec<Job>> {
        let now = Instant::now();
        let mut inner = lock(&self.queue);
        let mut stale: Vec<(String, Instant)> = inner
            .pending
            .iter()
            .filter(|(_, (_, _, at))| now.saturating_duration_since(*at) >= min_idle)
            .map(|(id, (_, _, at))| (id.clone(), *at))
            .collect();
        stale.sort_by_key(|(_, at)| *at);
        stale.truncate(max);
        let mut jobs = Vec::with_capacity(stale.len());
        for (id, _) in stale {
            if let Some(entry) = inner.pending.get_mut(&id) {
                entry.1 = self.name.clone();
                entry.2 = now;
                jobs.push(entry.0.clone());
            }
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(jobs: StateResult<Vec<Job>>) -> Vec<Vec<u8>> {
        jobs.expect("fetch")
            .into_iter()
            .map(|j| j.payload.to_vec())
            .collect()
    }

    #[tokio::test]
    async fn a_busy_consumer_waits_for_its_batch_to_fill() {
        let state = Arc::new(MemoryState::new(16));
        let mut consumer = state.consumer("q", "c").await.expect("consumer");
        state.enqueue("q", b"a").await.expect("enqueue");
        // Enqueued while the consumer lingers (this runtime has one thread:
        // the task runs once `fetch` awaits).
        let later = state.clone();
        tokio::spawn(async move { later.enqueue("q", b"b").await });
        let jobs = ids(consumer.fetch(64, Duration::from_secs(1)).await);
        assert_eq!(jobs, [b"a".to_vec(), b"b".to_vec()]);
    }

    #[tokio::test]
    async fn an_idle_consumer_takes_the_first_job_at_once() {
        let state = Arc::new(MemoryState::new(16));
        let mut consumer = state.consumer("q", "c").await.expect("consumer");
        let later = state.clone();
        tokio::spawn(async move {
            later.enqueue("q", b"a").await.expect("enqueue");
            // The consumer, woken by "a", runs before this task resumes.
            tokio::task::yield_now().await;
            later.enqueue("q", b"b").await.expect("enqueue");
        });
        let jobs = ids(consumer.fetch(64, Duration::from_secs(1)).await);
        assert_eq!(jobs, [b"a".to_vec()], "not held back for b");
        let jobs = ids(consumer.fetch(64, Duration::from_secs(1)).await);
        assert_eq!(jobs, [b"b".to_vec()]);
    }

    #[tokio::test]
    async fn expired_keys_are_swept_by_later_writes() {
        let state = MemoryState::new(16);
        for i in 0..100 {
            let key = format!("short:{i}");
            state
                .set(&key, b"v", Some(Duration::from_millis(1)))
                .await
                .expect("set");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(state.kv.len(), 100, "nothing read them: still there");
        for _ in 0..SWEEP_EVERY {
            state.set("kept", b"v", None).await.expect("set");
        }
        assert_eq!(state.kv.len(), 1, "swept, and only the live key is left");
    }

    #[tokio::test]
    async fn sweeps_wait_for_as_many_writes_as_entries_are_left() {
        let state = MemoryState::new(16);
        let live = 3 * SWEEP_EVERY;
        for i in 0..live {
            state
                .set(&format!("live:{i}"), b"v", None)
                .await
                .expect("set");
        }
        // The sweeps so far found 4096 and 8192 live entries, so the next
        // is due 8192 writes after the second one, not 4096.
        let writes = state.writes.load(Ordering::Relaxed);
        let due = state.next_sweep.load(Ordering::Relaxed);
        assert_eq!(writes, live);
        assert_eq!(due, 2 * SWEEP_EVERY + 2 * SWEEP_EVERY);
    }
}
