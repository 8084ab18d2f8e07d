//! In-process shared state for the embedded default (a single instance).
//!
//! Expired keys and command histories are dropped lazily on read and swept
//! in bulk, so memory stays bounded without a background task. A sweep
//! visits every entry, so it waits for as many writes as there were entries
//! left by the last one (at least [`SWEEP_EVERY`]): constant work per write
//! however many keys live — a day of window fingerprints is millions of them.
//!
//! Opened on a file ([`MemoryState::open`], what `serve` does), the security
//! state among the keys outlives a restart: see [`super::journal`].

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
    bucket_resize, bucket_step,
    journal::{self, Batch, Durability, Journal},
    BucketDecision, Job, QueueConsumer, QueueStats, SharedState, StateError, StateResult,
    Subscription,
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
    histories: DashMap<String, History>,
    queues: DashMap<String, Arc<Queue>>,
    queue_capacity: usize,
    writes: AtomicU64,
    /// The write count at which the next sweep runs (`u64::MAX` while one runs).
    next_sweep: AtomicU64,
    next_job: AtomicU64,
    /// Where the security state is saved, when opened on a file.
    journal: Option<Arc<Journal>>,
}

/// A command history: its entries by position, and when it expires.
type History = (std::collections::BTreeMap<u64, Vec<u8>>, Instant);

impl MemoryState {
    /// Raises the integer at `key` to `value` if lower (0 when absent or
    /// expired), refreshing the TTL when it is written or when `always_touch`;
    /// returns the value found before, and how the write is kept.
    fn raise_to(
        &self,
        key: &str,
        value: u64,
        ttl: Duration,
        always_touch: bool,
    ) -> (u64, Durability) {
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
        let written = value > current || always_touch;
        if written {
            *entry = Entry {
                value: current.max(value).to_string().into_bytes(),
                expires_at: Some(now + ttl),
            };
        }
        drop(entry);
        let durability = if written {
            self.mark(key)
        } else {
            Durability::Volatile
        };
        self.after_write();
        (current, durability)
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
            journal: None,
        }
    }

    /// A state whose security keys ([`journal::durability`]) are saved in
    /// the SQLite file at `path` (created 0600) and loaded from it now,
    /// with the heartbeats queued at the last clean shutdown.
    /// `commit_seqs`: an accepted heartbeat `seq` is committed before the
    /// call that took it returns (`BLOCKREMOTE_STATE_COMMIT_SEQ`).
    pub async fn open(
        path: &std::path::Path,
        queue_capacity: usize,
        commit_seqs: bool,
    ) -> StateResult<Arc<Self>> {
        let (journal, loaded) = Journal::open(path, commit_seqs).await?;
        let journal = Arc::new(journal);
        let mut state = Self::new(queue_capacity);
        let now = Instant::now();
        for (key, value, ttl) in loaded.entries {
            let expires_at = ttl.map(|t| now + t);
            state.kv.insert(key, Entry { value, expires_at });
        }
        for (key, entries, ttl) in loaded.histories {
            // Histories are always saved with a TTL; a row without one
            // (written by hand) gets a day.
            let expires_at = now + ttl.unwrap_or(Duration::from_secs(86_400));
            state
                .histories
                .insert(key, (entries.into_iter().collect(), expires_at));
        }
        let restored = loaded.jobs.len();
        for (queue, payload) in loaded.jobs {
            state.restore_job(&queue, payload);
        }
        if restored > 0 {
            tracing::info!(jobs = restored, "queued jobs of the last shutdown restored");
        }
        state.journal = Some(journal.clone());
        let state = Arc::new(state);
        spawn_writer(Arc::downgrade(&state), journal);
        Ok(state)
    }

    /// Queues a job saved at shutdown (whatever the capacity: it was taken).
    fn restore_job(&self, queue: &str, payload: Vec<u8>) {
        let q = self.queue(queue);
        let id = format!("{}-0", self.next_job.fetch_add(1, Ordering::Relaxed));
        lock(&q).ready.push_back((
            Job {
                id,
                payload: bytes::Bytes::from(payload),
            },
            Instant::now(),
        ));
    }

    /// [`SharedState::incr`] in memory; how the change is to be kept.
    fn incr_now(&self, key: &str, by: i64, ttl: Duration) -> StateResult<(i64, Durability)> {
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
        let durability = self.mark(key);
        self.after_write();
        Ok((next, durability))
    }

    /// [`SharedState::history_push`] in memory; how the change is to be kept.
    fn push_now(
        &self,
        key: &str,
        seq: u64,
        payload: &[u8],
        max_len: usize,
        ttl: Duration,
    ) -> Durability {
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
        drop(entry);
        let durability = self.mark_history(key);
        self.after_write();
        durability
    }

    /// Marks `key` changed for the journal; how the change is kept.
    fn mark(&self, key: &str) -> Durability {
        self.journal
            .as_ref()
            .map_or(Durability::Volatile, |j| j.mark(key))
    }

    /// Marks the history at `key` changed for the journal.
    fn mark_history(&self, key: &str) -> Durability {
        self.journal
            .as_ref()
            .map_or(Durability::Volatile, |j| j.mark_history(key))
    }

    /// Waits until a [`Durability::Committed`] change is in the file.
    async fn settle(&self, durability: Durability) -> StateResult<()> {
        match (&self.journal, durability) {
            (Some(journal), Durability::Committed) => journal.committed().await,
            _ => Ok(()),
        }
    }

    /// The current values of the dirty keys, for the journal's flush.
    fn snapshot(&self, keys: Vec<String>, histories: Vec<String>) -> Batch {
        let now = Instant::now();
        let now_ms = journal::unix_ms_now();
        let unix = |at: Instant| {
            now_ms.saturating_add(
                i64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(i64::MAX),
            )
        };
        let mut batch = Batch::default();
        for key in keys {
            let live = self
                .kv
                .get(&key)
                .filter(|e| e.live(now))
                .map(|e| (e.value.clone(), e.expires_at.map(unix)));
            match live {
                Some((value, expires_at)) => batch.puts.push((key, value, expires_at)),
                None => batch.deletes.push(key),
            }
        }
        for key in histories {
            let live = self.histories.get(&key).filter(|h| h.1 > now).map(|h| {
                let entries: Vec<(u64, &[u8])> =
                    h.0.iter().map(|(seq, p)| (*seq, p.as_slice())).collect();
                (journal::encode_history(&entries), Some(unix(h.1)))
            });
            match live {
                Some((entries, expires_at)) => batch.history_puts.push((key, entries, expires_at)),
                None => batch.history_deletes.push(key),
            }
        }
        batch
    }

    /// Saves the urgent dirty keys now, and when `full` every other one
    /// (the journal's writer does this).
    async fn flush(&self, full: bool) -> StateResult<()> {
        match &self.journal {
            Some(journal) => journal.flush(full, |k, h| self.snapshot(k, h)).await,
            None => Ok(()),
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
        self.kv.retain(|key, e| {
            let live = e.live(now);
            if !live {
                self.mark(key);
            }
            live
        });
        self.buckets.retain(|_, b| b.full_at > now);
        self.histories.retain(|key, h| {
            let live = h.1 > now;
            if !live {
                self.mark_history(key);
            }
            live
        });
        let left = (self.kv.len() + self.buckets.len() + self.histories.len()) as u64;
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

/// How often the writer yields to other tasks before a commit.
const YIELDS_BEFORE_COMMIT: usize = 4;

/// The journal's writer: saves the urgent keys whenever a committed write
/// waits, and every key every [`journal::FLUSH_EVERY`], until the state is
/// dropped or closed.
fn spawn_writer(state: std::sync::Weak<MemoryState>, journal: Arc<Journal>) {
    tokio::spawn(async move {
        let mut next_full = Instant::now() + journal::FLUSH_EVERY;
        loop {
            // Woken by a committed write, or the full flush is due.
            let _ = tokio::time::timeout_at(next_full, journal.wake.notified()).await;
            if journal.is_closed() {
                break;
            }
            let Some(state) = state.upgrade() else {
                break;
            };
            // Let the other tasks that are about to wait for a commit get
            // their keys in first: fewer, larger commits.
            for _ in 0..YIELDS_BEFORE_COMMIT {
                tokio::task::yield_now().await;
            }
            let full = Instant::now() >= next_full;
            if full {
                next_full = Instant::now() + journal::FLUSH_EVERY;
            }
            if let Err(e) = state.flush(full).await {
                tracing::warn!(error = %e, "shared state not saved; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(state);
        }
    });
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
        let durability = self.mark(key);
        self.after_write();
        self.settle(durability).await
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
        let durability = if inserted {
            self.mark(key)
        } else {
            Durability::Volatile
        };
        self.after_write();
        self.settle(durability).await?;
        Ok(inserted)
    }

    async fn take(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let now = Instant::now();
        let Some((_, entry)) = self.kv.remove(key) else {
            return Ok(None);
        };
        let durability = self.mark(key);
        self.settle(durability).await?;
        Ok(entry.live(now).then_some(entry.value))
    }

    async fn delete(&self, key: &str) -> StateResult<bool> {
        // Whatever the key holds, as Redis's DEL: a value or a command
        // history.
        let existed = self.live_entry(key);
        let mut durability = Durability::Volatile;
        if self.kv.remove(key).is_some() {
            durability = self.mark(key);
        }
        let had_history = self.histories.remove(key).is_some();
        if had_history && self.mark_history(key) == Durability::Committed {
            durability = Durability::Committed;
        }
        self.settle(durability).await?;
        Ok(existed || had_history)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> StateResult<i64> {
        let (next, durability) = self.incr_now(key, by, ttl)?;
        self.settle(durability).await?;
        Ok(next)
    }

    async fn advance(&self, key: &str, value: u64, ttl: Duration) -> StateResult<Option<u64>> {
        let (previous, durability) = self.raise_to(key, value, ttl, false);
        // An accepted `seq` is answered only once it would survive a crash.
        self.settle(durability).await?;
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
        drop(entry);
        if holds {
            let durability = self.mark(key);
            self.settle(durability).await?;
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
        let durability = if holder.is_none() {
            self.mark(key)
        } else {
            Durability::Volatile
        };
        self.after_write();
        self.settle(durability).await?;
        Ok(holder)
    }

    async fn delete_if(&self, key: &str, value: &[u8]) -> StateResult<bool> {
        let now = Instant::now();
        let deleted = self
            .kv
            .remove_if(key, |_, entry| entry.live(now) && entry.value == value)
            .is_some();
        if deleted {
            let durability = self.mark(key);
            self.settle(durability).await?;
        }
        Ok(deleted)
    }

    async fn set_max(&self, key: &str, value: u64, ttl: Duration) -> StateResult<u64> {
        let (previous, durability) = self.raise_to(key, value, ttl, true);
        self.settle(durability).await?;
        Ok(previous.max(value))
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
        let durability = self.push_now(key, seq, payload, max_len, ttl);
        self.settle(durability).await
    }

    async fn sequence_and_push(
        &self,
        entries: &[(String, String)],
        payloads: &[Vec<u8>],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<Vec<u64>> {
        let mut seqs = Vec::with_capacity(entries.len());
        let mut durability = Durability::Volatile;
        for ((counter, history), payload) in entries.iter().zip(payloads) {
            let (seq, counted) = self.incr_now(counter, 1, ttl)?;
            let seq = u64::try_from(seq).unwrap_or_default();
            let pushed = self.push_now(history, seq, payload, max_len, ttl);
            if counted == Durability::Committed || pushed == Durability::Committed {
                durability = Durability::Committed;
            }
            seqs.push(seq);
        }
        // One commit for the whole batch (a global command numbers every device).
        self.settle(durability).await?;
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
                            // A gap (see `Subscription`).
                            if tx.send(Vec::new()).await.is_err() {
                                break;
                            }
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

    async fn close(&self) -> StateResult<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        // Jobs fetched but not acked first: they are the older ones.
        let mut jobs = Vec::new();
        for queue in &self.queues {
            let inner = lock(queue.value());
            let mut pending: Vec<&(Job, String, Instant)> = inner.pending.values().collect();
            pending.sort_by_key(|(_, _, at)| *at);
            for (job, _, _) in pending {
                jobs.push((queue.key().clone(), job.payload.to_vec()));
            }
            for (job, _) in &inner.ready {
                jobs.push((queue.key().clone(), job.payload.to_vec()));
            }
        }
        let saved = jobs.len();
        journal.close(|k, h| self.snapshot(k, h), jobs).await?;
        tracing::info!(queued_jobs = saved, "shared state saved");
        Ok(())
    }

    async fn consumer(
        &self,
        queue: &str,
        _shard: usize,
        name: &str,
    ) -> StateResult<Box<dyn QueueConsumer>> {
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
        let mut consumer = state.consumer("q", 0, "c").await.expect("consumer");
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
        let mut consumer = state.consumer("q", 0, "c").await.expect("consumer");
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
    async fn expired_command_histories_are_swept_too() {
        let state = MemoryState::new(16);
        for i in 0..100 {
            state
                .history_push(
                    &format!("force_overlay:{{dev_{i:05}}}"),
                    1,
                    b"command",
                    100,
                    Duration::from_millis(1),
                )
                .await
                .expect("push");
        }
        state
            .history_push(
                "force_overlay:{kept}",
                1,
                b"command",
                100,
                Duration::from_secs(60),
            )
            .await
            .expect("push");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(state.histories.len(), 101, "nothing swept them yet");
        for _ in 0..SWEEP_EVERY {
            state.set("kept", b"v", None).await.expect("set");
        }
        assert_eq!(state.histories.len(), 1, "only the live history is left");
        assert_eq!(
            state
                .history_since("force_overlay:{kept}", 0)
                .await
                .expect("read")
                .len(),
            1
        );
    }

    /// A state on a file in `dir`.
    async fn on_file(dir: &tempfile::TempDir) -> Arc<MemoryState> {
        MemoryState::open(&dir.path().join("state.db"), 16, true)
            .await
            .expect("opens")
    }

    #[tokio::test]
    async fn an_accepted_seq_survives_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = on_file(&dir).await;
        let key = super::super::keys::heartbeat_seq("dev_crash_01");
        assert_eq!(
            state
                .advance(&key, 7, Duration::from_secs(60))
                .await
                .expect("advance"),
            Some(0)
        );
        // No close: the process died right after answering.
        drop(state);
        let state = on_file(&dir).await;
        assert_eq!(
            state
                .advance(&key, 7, Duration::from_secs(60))
                .await
                .expect("advance"),
            None,
            "still a replay"
        );
        assert_eq!(
            state
                .advance(&key, 8, Duration::from_secs(60))
                .await
                .expect("advance"),
            Some(7)
        );
    }

    #[tokio::test]
    async fn a_clean_shutdown_keeps_security_state_with_its_ttl_and_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = on_file(&dir).await;
        let hour = Duration::from_secs(3600);
        let fp = super::super::keys::window_fingerprint(42);
        assert_eq!(state.claim(&fp, b"dev_a", hour).await.expect("claim"), None);
        let engine = super::super::keys::signal_state("dev_a");
        state
            .set(&engine, b"engine state", Some(hour))
            .await
            .expect("set");
        state
            .set("sig:{dev_gone}", b"expires", Some(Duration::from_millis(1)))
            .await
            .expect("set");
        let history = super::super::keys::force_overlay("dev_a");
        let counter = super::super::keys::command_seq("dev_a");
        let seqs = state
            .sequence_and_push(
                &[(counter.clone(), history.clone())],
                &[b"lock".to_vec()],
                100,
                hour,
            )
            .await
            .expect("sequence");
        assert_eq!(seqs, [1]);
        // Volatile: forgotten.
        let lock = super::super::keys::scoring_lock("dev_a");
        state.set(&lock, b"held", Some(hour)).await.expect("set");
        state.enqueue("q", b"job 1").await.expect("enqueue");
        state.enqueue("q", b"job 2").await.expect("enqueue");
        tokio::time::sleep(Duration::from_millis(5)).await;
        state.close().await.expect("close");
        drop(state);

        let state = on_file(&dir).await;
        assert_eq!(
            state.claim(&fp, b"dev_b", hour).await.expect("claim"),
            Some(b"dev_a".to_vec()),
            "the fingerprint's first sender is remembered"
        );
        assert_eq!(
            state.get(&engine).await.expect("get"),
            Some(b"engine state".to_vec())
        );
        let ttl = state.ttl(&engine).await.expect("ttl").expect("has a ttl");
        assert!(
            ttl <= hour && ttl > hour - Duration::from_secs(60),
            "{ttl:?}"
        );
        assert_eq!(
            state.get("sig:{dev_gone}").await.expect("get"),
            None,
            "expired"
        );
        assert_eq!(
            state.get(&lock).await.expect("get"),
            None,
            "locks are not kept"
        );
        assert_eq!(
            state.history_since(&history, 0).await.expect("history"),
            [(1, b"lock".to_vec())]
        );
        assert_eq!(
            state.incr(&counter, 1, hour).await.expect("incr"),
            2,
            "numbering goes on"
        );
        let mut consumer = state.consumer("q", 0, "c").await.expect("consumer");
        assert_eq!(
            ids(consumer.fetch(10, Duration::from_millis(10)).await),
            [b"job 1".to_vec(), b"job 2".to_vec()],
            "queued again, in order"
        );
        // Taken out of the file: a second restart does not queue them twice.
        drop(consumer);
        drop(state);
        let state = on_file(&dir).await;
        assert_eq!(state.queue_len("q").await.expect("len"), 0);
    }

    #[tokio::test]
    async fn swept_keys_leave_the_file_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = on_file(&dir).await;
        for i in 0..10 {
            state
                .claim(
                    &super::super::keys::window_fingerprint(i),
                    b"dev",
                    Duration::from_millis(1),
                )
                .await
                .expect("claim");
        }
        state.flush(true).await.expect("flush");
        tokio::time::sleep(Duration::from_millis(5)).await;
        for _ in 0..SWEEP_EVERY {
            state.set("volatile", b"v", None).await.expect("set");
        }
        state.flush(true).await.expect("flush");
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kv")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(rows, 0);
    }

    /// This process's user + system CPU time so far (Linux).
    fn cpu_time() -> Duration {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after_name = stat.rsplit(')').next().unwrap_or_default();
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; 11 and 12 here.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        Duration::from_millis(ticks * 10)
    }

    /// Ingestion's shared-state calls for one heartbeat on the embedded
    /// default: the rate-limit take, then the `seq` advance and the enqueue.
    async fn ingest_one(state: &MemoryState, device: usize, seq: u64) {
        use super::super::keys;
        let id = format!("dev_bench_{device:05}");
        state
            .take_tokens(&keys::rate_limit(&id), 1200, Duration::from_secs(60), 1)
            .await
            .expect("take");
        let mut job = format!("{id}\n{seq}\n").into_bytes();
        job.resize(2048, 0);
        if seq == 1 {
            // A new device's seq is refilled (to 0) before its first advance.
            state
                .set_max(&keys::heartbeat_seq(&id), 0, Duration::from_secs(86_400))
                .await
                .expect("refill");
        }
        state
            .advance_and_enqueue(
                &keys::heartbeat_seq(&id),
                seq,
                Duration::from_secs(86_400),
                "bench",
                &job,
            )
            .await
            .expect("advance");
    }

    /// The scoring worker's calls for one job: the lock and the state read,
    /// the fingerprint claim, the state and report save.
    async fn score_one(state: &MemoryState, job: &Job) {
        use super::super::keys;
        let text = String::from_utf8_lossy(&job.payload);
        let mut lines = text.split('\n');
        let id = lines.next().unwrap_or_default().to_owned();
        let seq: u64 = lines.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let ttl = Duration::from_secs(86_400);
        let lock = keys::scoring_lock(&id);
        let engine = keys::signal_state(&id);
        state
            .lock_and_get(&lock, b"token", Duration::from_secs(5), &engine)
            .await
            .expect("lock");
        let device: u64 = id.trim_start_matches("dev_bench_").parse().unwrap_or(0);
        let fp = keys::window_fingerprint(device << 32 | seq);
        state.claim(&fp, id.as_bytes(), ttl).await.expect("claim");
        let report = keys::trust_report(&id);
        let entries: [(&str, &[u8], Option<Duration>); 2] = [
            (&report, &[1u8; 600], Some(ttl)),
            (&engine, &[2u8; 2500], Some(ttl)),
        ];
        state
            .set_many_and_unlock(&entries, &lock, b"token", true)
            .await
            .expect("save");
    }

    /// What saving the security state costs a heartbeat: `cargo test -p
    /// blockremote-server --lib -- --ignored --nocapture heartbeat_state_cost`
    /// (docs/BENCHMARKS.md). 2 000 devices, 64 heartbeats in flight, two
    /// scoring workers taking batches of up to 64.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn heartbeat_state_cost() {
        const DEVICES: usize = 2000;
        const IN_FLIGHT: usize = 64;
        const PER_TASK: usize = 500;
        const TOTAL: usize = IN_FLIGHT * PER_TASK;
        let dir = tempfile::tempdir().expect("tempdir");
        let rounds = [None, Some(true), Some(false), None, Some(true), Some(false)];
        for (round, on_file) in rounds.into_iter().enumerate() {
            let state = match on_file {
                Some(commit_seqs) => MemoryState::open(
                    &dir.path().join(format!("state-{round}.db")),
                    100_000,
                    commit_seqs,
                )
                .await
                .expect("opens"),
                None => Arc::new(MemoryState::new(100_000)),
            };
            let cpu = cpu_time();
            let started = std::time::Instant::now();
            let scored = Arc::new(AtomicU64::new(0));
            let mut workers = Vec::new();
            for w in 0..2 {
                let state = state.clone();
                let scored = scored.clone();
                workers.push(tokio::spawn(async move {
                    let mut consumer = state
                        .consumer("bench", 0, &format!("w{w}"))
                        .await
                        .expect("consumer");
                    while scored.load(Ordering::SeqCst) < TOTAL as u64 {
                        let jobs = consumer
                            .fetch(64, Duration::from_millis(20))
                            .await
                            .expect("fetch");
                        for job in &jobs {
                            score_one(&state, job).await;
                        }
                        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
                        consumer.ack(&ids).await.expect("ack");
                        scored.fetch_add(ids.len() as u64, Ordering::SeqCst);
                    }
                }));
            }
            let mut tasks = Vec::new();
            for t in 0..IN_FLIGHT {
                let state = state.clone();
                tasks.push(tokio::spawn(async move {
                    // Each task sends for devices of its own, so every
                    // device's `seq`s arrive in order and all are queued.
                    let own = DEVICES / IN_FLIGHT;
                    for i in 0..PER_TASK {
                        let device = t + IN_FLIGHT * (i % own);
                        ingest_one(&state, device, (i / own + 1) as u64).await;
                    }
                }));
            }
            for task in tasks.into_iter().chain(workers) {
                task.await.expect("task");
            }
            let elapsed = started.elapsed();
            let cpu = cpu_time().saturating_sub(cpu);
            println!(
                "{}: {:.0} heartbeats/s, {:.1} µs CPU per heartbeat",
                match on_file {
                    None => "memory only                    ",
                    Some(true) => "saved, seqs committed (default)",
                    Some(false) => "saved, seqs batched            ",
                },
                TOTAL as f64 / elapsed.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / TOTAL as f64,
            );
            state.close().await.expect("close");
        }
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
