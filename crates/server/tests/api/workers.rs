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

crate::on_both_backends!(every_job_is_handled_despite_failures_and_dead_consumers);

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
    let mut doomed = state.consumer(queue, "doomed").await.expect("consumer");
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
