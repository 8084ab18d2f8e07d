//! Cost of the per-device rate limiter on one request, on both backends.
//!
//! What `DeviceAuth` adds to a request after authenticating: the plan from
//! the per-instance cache (a hit), then one token-bucket take in shared
//! state — in-process, or one Lua script round trip to Redis.
//!
//! `cargo bench -p blockremote-server --bench limiter`; the Redis variant
//! runs when `BENCH_REDIS_URL` is set (e.g. `redis://127.0.0.1:6379`).
//! Results: docs/BENCHMARKS.md.

use std::{sync::Arc, time::Duration};

use blockremote::{
    billing::{limits::PERIOD, plans::PlanCache},
    state::{keys, MemoryState, RedisState, SharedState},
    store::{SqliteStore, Store},
};
use criterion::{criterion_group, criterion_main, Criterion};
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_backend(
    c: &mut Criterion,
    name: &str,
    shared: Arc<dyn SharedState>,
    rt: &tokio::runtime::Runtime,
) {
    let dir = tempfile::tempdir().expect("dir");
    let (store, plans) = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = SqliteStore::connect(&url, 4, Duration::from_secs(5))
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let plans = PlanCache::start(shared.clone()).await.expect("plans");
        (store, plans)
    });
    let user = Uuid::now_v7();
    let mut device = 0u64;
    c.bench_function(
        &format!("limiter/{name}: plan (cached) + bucket take"),
        |b| {
            b.to_async(rt).iter(|| {
                // A new device each time keeps every take allowed (a full bucket).
                device += 1;
                let key = keys::rate_limit(&format!("bench-device-{device}"));
                let (store, plans, shared) = (&store, &plans, &shared);
                async move {
                    let plan = plans.get(store, user).await.expect("plan");
                    shared
                        .take_tokens(&key, plan.rate_limit_per_minute, PERIOD, 1)
                        .await
                        .expect("take")
                }
            })
        },
    );
}

fn limiter(c: &mut Criterion) {
    let rt = runtime();
    bench_backend(c, "in-process", Arc::new(MemoryState::new(1024)), &rt);
    if let Ok(url) = std::env::var("BENCH_REDIS_URL") {
        let prefix = format!("bench:{}:", Uuid::now_v7().simple());
        let redis = rt
            .block_on(RedisState::connect(
                &url,
                &prefix,
                1024,
                Duration::from_secs(5),
            ))
            .expect("redis");
        bench_backend(c, "redis", Arc::new(redis), &rt);
    }
}

criterion_group!(benches, limiter);
criterion_main!(benches);
