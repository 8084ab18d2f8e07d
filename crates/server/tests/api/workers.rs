//! The worker pool's delivery guarantees, in-process and on Redis Streams.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use blockremote::{
    state::Job,
    workers::{JobHandler, WorkerOptions, WorkerPool},
};
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, shared_for, Backend};

crate::on_both_backends!(
    every_job_is_handled_despite_failures_and_dead_consumers,
    a_stopping_pool_handles_what_its_last_fetch_brings,
    a_failed_job_is_retried_soon_by_its_consumer,
);

/// Counts deliveries per payload; fails the first delivery of `flaky`.
#[derive(Default)]
struct Recorder {
    seen: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl JobHandler for Recorder {
    async fn handle(&self, job: &Job) -> anyhow::Result<()> {
        let payload = String::from_utf8_lossy(&job.payload).into_owned();
        let attempts = {
            let mut seen = self.seen.lock().expect("lock");
            let n = seen.entry(payload.clone()).or_default();
            *n += 1;
            *n
        };
        if payload == "flaky" && attempts == 1 {
            anyhow::bail!("transient failure");
        }
        Ok(())
    }
}

impl Recorder {
    fn count(&self, payload: &str) -> u32 {
        self.seen
            .lock()
            .expect("lock")
            .get(payload)
            .copied()
            .unwrap_or(0)
    }
    fn distinct(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

async fn every_job_is_handled_despite_failures_and_dead_consumers(backend: Backend) {
    let Some((state, _b)) = shared_for(backend, 1000).await else {
        return;
    };
    let queue = "sig:queue:test";

    // A consumer takes three jobs and dies without acking them.
    for i in 0..3 {
        state
            .enqueue(queue, format!("orphan-{i}").as_bytes())
            .await
            .expect("enqueue");
    }
    let mut doomed = state.consumer(queue, 0, "doomed").await.expect("consumer");
    assert_eq!(
        doomed
            .fetch(3, Duration::from_millis(500))
            .await
            .expect("fetch")
            .len(),
        3
    );
    drop(doomed);

    for i in 0..20 {
        state
            .enqueue(queue, format!("job-{i}").as_bytes())
            .await
            .expect("enqueue");
    }
    state.enqueue(queue, b"flaky").await.expect("enqueue");

    let recorder = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let pool = WorkerPool::start(
        state.clone(),
        &format!("test-{}", uuid::Uuid::new_v4().simple()),
        vec![(queue.to_owned(), recorder.clone() as Arc<dyn JobHandler>)],
        WorkerOptions {
            concurrency: 2,
            batch: 8,
            parallel: 4,
            poll: Duration::from_millis(100),
            reclaim_idle: Duration::from_millis(300),
            reclaim_every: Duration::from_millis(100),
            retry_after: Duration::from_millis(50),
        },
        stop,
    )
    .await
    .expect("pool");
    assert_eq!(pool.len(), 2);

    let done = eventually(Duration::from_secs(10), || async {
        recorder.distinct() == 24
            && recorder.count("flaky") >= 2
            && state.queue_len(queue).await.expect("len") == 0
    })
    .await;
    assert!(
        done,
        "handled {} distinct, flaky {} times, backlog {}",
        recorder.distinct(),
        recorder.count("flaky"),
        state.queue_len(queue).await.expect("len")
    );
    for i in 0..3 {
        assert!(
            recorder.count(&format!("orphan-{i}")) >= 1,
            "orphan {i} reclaimed"
        );
    }
    pool.stop(Duration::from_secs(3)).await;
}

async fn a_stopping_pool_handles_what_its_last_fetch_brings(backend: Backend) {
    let Some((state, _b)) = shared_for(backend, 1000).await else {
        return;
    };
    let queue = "sig:queue:stopping";
    let recorder = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let pool = WorkerPool::start(
        state.clone(),
        "stopping",
        vec![(queue.to_owned(), recorder.clone() as Arc<dyn JobHandler>)],
        WorkerOptions {
            concurrency: 2,
            poll: Duration::from_secs(2),
            ..WorkerOptions::default()
        },
        stop.clone(),
    )
    .await
    .expect("pool");
    // Both consumers are waiting in a fetch when the stop comes; jobs then
    // arrive before their wait ends. On Redis the server hands them to a
    // blocked reader at once: a consumer that dropped its fetch on the stop
    // would leave them pending for the reclaim (30 s by default).
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        state
            .enqueue(queue, format!("late-{i}").as_bytes())
            .await
            .expect("enqueue");
    }
    pool.stop(Duration::from_secs(5)).await;
    let handled = recorder.distinct();
    assert!(handled >= 1, "the last fetches brought and handled jobs");
    // Nothing stranded: what the stopped pool did not take is still
    // waiting for the next consumer, and nothing is pending.
    let mut next = state.consumer(queue, 0, "next").await.expect("consumer");
    let rest = next
        .fetch(10, Duration::from_millis(200))
        .await
        .expect("fetch");
    assert_eq!(
        handled + rest.len(),
        5,
        "handled {handled}, waiting {}",
        rest.len()
    );
    let ids: Vec<String> = rest.iter().map(|j| j.id.clone()).collect();
    next.ack(&ids).await.expect("ack");
    assert_eq!(
        state.queue_len(queue).await.expect("len"),
        0,
        "nothing pending"
    );
}

/// A job whose handler failed (Redis failing over, the database restarting)
/// is retried by its own consumer within moments, not after the reclaim
/// threshold: on the old code it waited `reclaim_idle` (30 s by default,
/// here a minute), so a heartbeat answered 202 during a failover was scored
/// half a minute late.
async fn a_failed_job_is_retried_soon_by_its_consumer(backend: Backend) {
    let Some((state, _b)) = shared_for(backend, 1000).await else {
        return;
    };
    let queue = "sig:queue:retried";
    let recorder = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let pool = WorkerPool::start(
        state.clone(),
        &format!("retry-{}", uuid::Uuid::new_v4().simple()),
        vec![(queue.to_owned(), recorder.clone() as Arc<dyn JobHandler>)],
        WorkerOptions {
            concurrency: 1,
            poll: Duration::from_millis(200),
            reclaim_idle: Duration::from_secs(60),
            retry_after: Duration::from_millis(100),
            ..WorkerOptions::default()
        },
        stop,
    )
    .await
    .expect("pool");
    state.enqueue(queue, b"flaky").await.expect("enqueue");
    state.enqueue(queue, b"steady").await.expect("enqueue");
    let retried = eventually(Duration::from_secs(3), || async {
        recorder.count("flaky") >= 2 && state.queue_len(queue).await.expect("len") == 0
    })
    .await;
    assert!(
        retried,
        "flaky handled {} times, backlog {}",
        recorder.count("flaky"),
        state.queue_len(queue).await.expect("len")
    );
    assert_eq!(recorder.count("steady"), 1, "a handled job is not retried");
    pool.stop(Duration::from_secs(3)).await;
}
