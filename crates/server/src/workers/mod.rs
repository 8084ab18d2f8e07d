//! Background workers: the consumers of the work queues.
//!
//! A [`WorkerPool`] runs consumer tasks per queue, at least one per shard of it. Each task loops:
//! every [`WorkerOptions::reclaim_every`] it takes over jobs left pending by a consumer that
//! died (idle longer than [`WorkerOptions::reclaim_idle`]), then fetches new
//! jobs, hands the batch to its [`JobHandler`] and acks those handled. A job
//! whose handler failed stays pending and is retried by the same consumer
//! after [`WorkerOptions::retry_after`] (doubling while it keeps failing, up
//! to [`MAX_RETRY_AFTER`]): a failure is most often a dependency down for a
//! moment — a Redis failover, a database restart — and the job must not wait
//! for the reclaim threshold once it is back. A consumer that dies holding
//! it leaves it to the reclaim; one that keeps failing it for longer than
//! [`WorkerOptions::reclaim_idle`] may see another consumer reclaim it too
//! (its idle time is not reset by these retries). At-least-once, which is
//! why handlers must be idempotent.
//!
//! On the embedded default the pool runs inside `serve`; in production it is
//! the `blockremote worker` process. Shutdown is cooperative: a task finishes
//! its fetch (at most [`WorkerOptions::poll`]) and the batch it brings, then
//! stops; unacked jobs stay pending for the next owner.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::state::{Job, QueueConsumer, SharedState};

/// Handles jobs. Must be idempotent: a job can be delivered more than once.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Handles `job`; an error leaves it pending for a retry.
    async fn handle(&self, job: &Job) -> anyhow::Result<()>;

    /// Handles a fetched batch and returns the ids of the jobs handled (the
    /// others stay pending for a retry). By default each job goes to
    /// [`handle`](Self::handle), up to `parallel` at once; a handler
    /// overrides this to share round trips across the batch.
    async fn handle_batch(&self, jobs: Vec<Job>, parallel: usize) -> Vec<String> {
        handle_each(self, jobs, parallel).await
    }
}

/// Runs [`JobHandler::handle`] on each job, up to `parallel` at once; the
/// ids of those handled.
pub async fn handle_each<H: JobHandler + ?Sized>(
    handler: &H,
    jobs: Vec<Job>,
    parallel: usize,
) -> Vec<String> {
    futures::stream::iter(jobs)
        .map(|job| async move {
            match handler.handle(&job).await {
                Ok(()) => Some(job.id),
                Err(e) => {
                    tracing::warn!(job = %job.id, error = format!("{e:#}"), "job failed; left pending for retry");
                    None
                }
            }
        })
        .buffer_unordered(parallel.max(1))
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Tuning of a worker pool.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Consumer tasks per queue.
    pub concurrency: usize,
    /// Jobs fetched per round trip.
    pub batch: usize,
    /// Jobs of a batch handled at once by one consumer (handlers wait on
    /// I/O — shared state, the store — far more than on the CPU).
    pub parallel: usize,
    /// How long a fetch waits for work before looping.
    pub poll: Duration,
    /// A pending job idle this long is presumed abandoned and reclaimed.
    pub reclaim_idle: Duration,
    /// How often each consumer looks for abandoned jobs.
    pub reclaim_every: Duration,
    /// How long a consumer waits before it retries the jobs of its own
    /// whose handler failed (doubled on each failure in a row, up to
    /// [`MAX_RETRY_AFTER`]).
    pub retry_after: Duration,
}

/// The longest wait before a consumer retries its failed jobs.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            batch: 64,
            parallel: 32,
            poll: Duration::from_secs(1),
            reclaim_idle: Duration::from_secs(30),
            reclaim_every: Duration::from_secs(5),
            retry_after: Duration::from_millis(250),
        }
    }
}

/// A set of queue consumers running until cancelled.
pub struct WorkerPool {
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl WorkerPool {
    /// Starts `options.concurrency` consumers (at least one per queue
    /// shard) for each `(queue, handler)`.
    /// Consumer names are `{instance}-{queue}-{n}`; `instance` must be unique
    /// per process (a dead process's consumers are then reclaimed by name-blind
    /// `XAUTOCLAIM`).
    pub async fn start(
        state: Arc<dyn SharedState>,
        instance: &str,
        handlers: Vec<(String, Arc<dyn JobHandler>)>,
        options: WorkerOptions,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut tasks = JoinSet::new();
        let shards = state.queue_shards().max(1);
        for (queue, handler) in handlers {
            // At least one consumer per shard, in every worker process: a
            // shard nobody reads would only be drained by reclaims.
            for n in 0..options.concurrency.max(shards) {
                let name = format!("{instance}-{queue}-{n}");
                let consumer = state.consumer(&queue, n % shards, &name).await?;
                tasks.spawn(run_consumer(
                    consumer,
                    queue.clone(),
                    name,
                    handler.clone(),
                    options.clone(),
                    shutdown.clone(),
                ));
            }
        }
        tracing::info!(consumers = tasks.len(), "workers started");
        Ok(Self { tasks, shutdown })
    }

    /// Number of consumer tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no consumer runs (no handler registered).
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Signals every consumer to stop and waits up to `grace` for them.
    pub async fn stop(mut self, grace: Duration) {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("workers did not stop within the grace period; aborting");
            self.tasks.abort_all();
        }
    }
}

#[tracing::instrument(skip_all, fields(queue = %queue, consumer = %name))]
async fn run_consumer(
    mut consumer: Box<dyn QueueConsumer>,
    queue: String,
    name: String,
    handler: Arc<dyn JobHandler>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) {
    let mut last_reclaim: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(100);
    // Jobs of this consumer whose handler failed: still pending on it, retried
    // from here once `retry_at` passes.
    let mut failed: Vec<Job> = Vec::new();
    let mut retry_at = tokio::time::Instant::now();
    let mut retry_after = options.retry_after;
    while !shutdown.is_cancelled() {
        let now = tokio::time::Instant::now();
        let due = last_reclaim.is_none_or(|t| t.elapsed() >= options.reclaim_every);
        let batch = if !failed.is_empty() && now >= retry_at {
            Ok(std::mem::take(&mut failed))
        } else if due {
            last_reclaim = Some(now);
            consumer.reclaim(options.reclaim_idle, options.batch).await
        } else {
            // Not cut short by the shutdown: on Redis a blocked read may
            // already have been handed entries, which a dropped read would
            // leave pending for the reclaim. It ends within `poll` (sooner
            // when failed jobs are due for a retry).
            let wait = if failed.is_empty() {
                options.poll
            } else {
                options.poll.min(retry_at - now)
            };
            consumer.fetch(options.batch, wait).await
        };
        let jobs = match batch {
            Ok(jobs) => {
                backoff = Duration::from_millis(100);
                jobs
            }
            Err(e) => {
                tracing::warn!(error = %e, "queue read failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Payloads are shared, so keeping the batch for a retry copies none.
        let kept = jobs.clone();
        let done = handler.handle_batch(jobs, options.parallel).await;
        if done.len() < kept.len() {
            let handled: std::collections::HashSet<&str> =
                done.iter().map(String::as_str).collect();
            // A job reclaimed while this consumer held it already is kept once.
            let held: std::collections::HashSet<String> =
                failed.iter().map(|job| job.id.clone()).collect();
            let waiting = !failed.is_empty();
            failed.extend(
                kept.into_iter()
                    .filter(|job| !handled.contains(job.id.as_str()) && !held.contains(&job.id)),
            );
            // Failures that keep coming do not postpone the older retries.
            let next = tokio::time::Instant::now() + retry_after;
            retry_at = if waiting { retry_at.min(next) } else { next };
            retry_after = (retry_after * 2).min(MAX_RETRY_AFTER);
        } else if failed.is_empty() {
            retry_after = options.retry_after;
        }
        // Bounded: beyond a batch, the oldest failures are left to the reclaim.
        if failed.len() > options.batch {
            failed.drain(..failed.len() - options.batch);
        }
        if let Err(e) = consumer.ack(&done).await {
            // Not fatal: the jobs stay pending and are reclaimed and handled
            // again, which idempotent handlers tolerate.
            tracing::warn!(error = %e, "ack failed");
        }
    }
    tracing::debug!("consumer stopped");
}
