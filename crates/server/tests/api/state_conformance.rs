//! The shared state's conformance story, run in-process and on Redis.

use std::time::Duration;

use blockremote::state::{keys, Advanced, Commit, StateError, Take};

use crate::helpers::{second_shared, second_shared_sharded, shared_on, StateBackend};

crate::on_every_state_backend!(
    kv_set_get_ttl_and_single_use,
    incr_counts_and_expires,
    token_bucket_allows_exactly_capacity,
    token_bucket_is_atomic_under_concurrency,
    pubsub_delivers_to_every_subscriber,
    queue_is_at_least_once_with_reclaim,
    queue_is_bounded,
    queue_stats_report_the_backlog_and_the_oldest_undelivered_wait,
    queue_fetch_waits_then_returns_empty,
    history_is_ordered_bounded_and_read_from_a_position,
    sequence_and_push_continues_each_device_and_raise_to_many_only_rises,
    token_bucket_credits_a_raised_capacity_and_clamps_a_cut_one,
    advance_stores_only_greater_values_and_one_concurrent_caller_wins,
    advance_and_enqueue_queues_only_fresh_values_and_reports_a_full_queue,
    lock_and_get_reads_under_the_lock_and_commit_writes_then_unlocks,
    claim_keeps_the_first_holder,
    batched_locks_claims_and_commits_match_the_single_calls,
    take_then_advance_and_enqueue_does_nothing_more_when_the_bucket_refuses,
    a_sharded_queue_keeps_each_device_on_one_shard_and_loses_nothing,
);

async fn advance_and_enqueue_queues_only_fresh_values_and_reports_a_full_queue(
    backend: StateBackend,
) {
    let Some((s, _b)) = shared_on(backend, 2).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let q = "sig:queue:advance";
    let send = |v: u64, payload: &'static [u8]| {
        let s = s.clone();
        async move {
            s.advance_and_enqueue("seq:q", v, ttl, q, payload)
                .await
                .expect("advance_and_enqueue")
        }
    };
    // No value stored: nothing advances or is queued until one is.
    assert_eq!(send(1, b"unknown").await, Advanced::Unknown);
    assert_eq!(s.queue_len(q).await.expect("len"), 0);
    s.set_max("seq:q", 0, ttl).await.expect("refill");
    assert_eq!(send(1, b"one").await, Advanced::Queued { previous: 0 });
    assert_eq!(send(1, b"again").await, Advanced::Stale);
    assert_eq!(send(3, b"three").await, Advanced::Queued { previous: 1 });
    // Full: the value still advances (the caller scores inline), the job is not queued.
    assert_eq!(send(4, b"four").await, Advanced::QueueFull { previous: 3 });
    assert_eq!(send(4, b"four").await, Advanced::Stale);
    assert_eq!(s.queue_len(q).await.expect("len"), 2);
    let mut c = s.consumer(q, 0, "w").await.expect("consumer");
    let jobs = c
        .fetch(10, Duration::from_millis(200))
        .await
        .expect("fetch");
    let payloads: Vec<&[u8]> = jobs.iter().map(|j| &j.payload[..]).collect();
    assert_eq!(payloads, vec![&b"one"[..], &b"three"[..]]);
}

async fn lock_and_get_reads_under_the_lock_and_commit_writes_then_unlocks(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    assert_eq!(
        s.lock_and_get("lock:{d}", b"t1", ttl, "state:{d}")
            .await
            .expect("lock"),
        Some(None),
        "free lock, no state yet"
    );
    assert_eq!(
        s.lock_and_get("lock:{d}", b"t2", ttl, "state:{d}")
            .await
            .expect("lock"),
        None,
        "held by t1"
    );
    // Commit by a holder whose lock was lost: the writes land, the lock is not taken from its owner.
    assert!(!s
        .set_many_and_unlock(&[("state:{d}", b"v0", Some(ttl))], "lock:{d}", b"t2", false)
        .await
        .expect("commit"));
    assert_eq!(
        s.get("state:{d}").await.expect("get"),
        Some(b"v0".to_vec()),
        "written anyway"
    );
    assert!(s
        .set_many_and_unlock(
            &[("report:{d}", b"r1", Some(ttl)), ("state:{d}", b"v1", None)],
            "lock:{d}",
            b"t1",
            true
        )
        .await
        .expect("commit"));
    assert_eq!(
        s.get("report:{d}").await.expect("get"),
        Some(b"r1".to_vec())
    );
    assert!(s.ttl("report:{d}").await.expect("ttl").is_some());
    assert_eq!(s.ttl("state:{d}").await.expect("ttl"), None, "no TTL asked");
    assert_eq!(
        s.lock_and_get("lock:{d}", b"t2", ttl, "state:{d}")
            .await
            .expect("lock"),
        Some(Some(b"v1".to_vec())),
        "released, and the state read under the new lock"
    );
    // The lock expires by itself.
    assert_eq!(
        s.lock_and_get("lock:{e}", b"t1", Duration::from_millis(50), "state:{e}")
            .await
            .expect("lock"),
        Some(None)
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(s
        .lock_and_get("lock:{e}", b"t2", ttl, "state:{e}")
        .await
        .expect("lock")
        .is_some());
    // t1 comes back late: without the within-TTL promise it cannot free t2's lock.
    assert!(!s
        .set_many_and_unlock(&[], "lock:{e}", b"t1", false)
        .await
        .expect("commit"));
    assert!(s
        .lock_and_get("lock:{e}", b"t3", ttl, "state:{e}")
        .await
        .expect("lock")
        .is_none());
}

async fn claim_keeps_the_first_holder(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    assert_eq!(
        s.claim("fp:1", b"device-a", ttl).await.expect("claim"),
        None
    );
    assert_eq!(
        s.claim("fp:1", b"device-b", ttl).await.expect("claim"),
        Some(b"device-a".to_vec())
    );
    assert_eq!(
        s.claim("fp:1", b"device-a", ttl).await.expect("claim"),
        Some(b"device-a".to_vec())
    );
    assert!(s.ttl("fp:1").await.expect("ttl").is_some());
    assert_eq!(
        s.claim("fp:2", b"x", Duration::from_millis(50))
            .await
            .expect("claim"),
        None
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        s.claim("fp:2", b"y", ttl).await.expect("claim"),
        None,
        "expired"
    );
}

async fn advance_stores_only_greater_values_and_one_concurrent_caller_wins(backend: StateBackend) {
    let Some((s, b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let advance = |v: u64| {
        let s = s.clone();
        async move { s.advance("seq:a", v, ttl).await.expect("advance") }
    };
    assert_eq!(advance(5).await, Some(0));
    assert_eq!(advance(5).await, None, "equal is a replay");
    assert_eq!(advance(3).await, None, "older is a replay");
    assert_eq!(advance(6).await, Some(5));
    // Undo the last advance (its work failed): only while it still holds 6.
    assert!(!s.retreat("seq:a", 7, 5, ttl).await.expect("retreat"));
    assert!(s.retreat("seq:a", 6, 5, ttl).await.expect("retreat"));
    assert_eq!(advance(6).await, Some(5), "6 is free again");
    // Compare-and-delete.
    s.set("lock:x", b"mine", Some(ttl)).await.expect("set");
    assert!(!s.delete_if("lock:x", b"theirs").await.expect("delete_if"));
    assert!(s.delete_if("lock:x", b"mine").await.expect("delete_if"));
    assert!(s.get("lock:x").await.expect("get").is_none());
    // Two callers racing on the same value (two instances on Redis, two
    // tasks in process): exactly one wins.
    let other = if backend.is_redis() {
        second_shared(&b, 10).await
    } else {
        s.clone()
    };
    let mut wins = 0;
    for round in 10..30u64 {
        let (x, y) = tokio::join!(
            s.advance("seq:b", round, ttl),
            other.advance("seq:b", round, ttl)
        );
        wins += u32::from(x.expect("a").is_some()) + u32::from(y.expect("b").is_some());
    }
    assert_eq!(wins, 20);
}

async fn sequence_and_push_continues_each_device_and_raise_to_many_only_rises(
    backend: StateBackend,
) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    // Device a already has two commands; b has none.
    for _ in 0..2 {
        s.incr(&keys::command_seq("a"), 1, ttl).await.expect("incr");
    }
    let entries = vec![
        (keys::command_seq("a"), keys::force_overlay("a")),
        (keys::command_seq("b"), keys::force_overlay("b")),
    ];
    let payloads = vec![b"for-a".to_vec(), b"for-b".to_vec()];
    let seqs = s
        .sequence_and_push(&entries, &payloads, 100, ttl)
        .await
        .expect("sequence");
    assert_eq!(seqs, vec![3, 1]);
    assert_eq!(
        s.history_since(&keys::force_overlay("a"), 0)
            .await
            .expect("read"),
        vec![(3, b"for-a".to_vec())]
    );
    assert_eq!(
        s.history_since(&keys::force_overlay("b"), 0)
            .await
            .expect("read"),
        vec![(1, b"for-b".to_vec())]
    );
    let read = |key: String| {
        let s = s.clone();
        async move {
            s.get(&key)
                .await
                .expect("get")
                .map(|v| String::from_utf8(v).expect("utf-8"))
        }
    };
    s.set_max_many(&[("ack:a".into(), 5), ("ack:b".into(), 2)], ttl)
        .await
        .expect("raise");
    s.set_max_many(&[("ack:a".into(), 4), ("ack:b".into(), 9)], ttl)
        .await
        .expect("raise");
    assert_eq!(read("ack:a".into()).await.as_deref(), Some("5"));
    assert_eq!(read("ack:b".into()).await.as_deref(), Some("9"));
}

async fn token_bucket_credits_a_raised_capacity_and_clamps_a_cut_one(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let minute = Duration::from_secs(60);
    let key = keys::rate_limit("dev-resize");
    for _ in 0..120 {
        assert!(
            s.take_tokens(&key, 120, minute, 1)
                .await
                .expect("take")
                .allowed
        );
    }
    assert!(
        !s.take_tokens(&key, 120, minute, 1)
            .await
            .expect("take")
            .allowed
    );
    // Upgrade: the extra 1080 are there at once.
    let d = s.take_tokens(&key, 1200, minute, 1).await.expect("take");
    assert!(d.allowed);
    assert!((1078..=1080).contains(&d.remaining), "{d:?}");
    // Downgrade: at most the new capacity.
    let d = s.take_tokens(&key, 120, minute, 1).await.expect("take");
    assert!(d.allowed);
    assert_eq!(d.limit, 120);
    assert!(d.remaining <= 119, "{d:?}");
}

async fn history_is_ordered_bounded_and_read_from_a_position(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let key = keys::force_overlay("device_0001");
    let ttl = Duration::from_secs(60);
    for seq in 1..=7u64 {
        s.history_push(&key, seq, format!("cmd-{seq}").as_bytes(), 5, ttl)
            .await
            .expect("push");
    }
    let all = s.history_since(&key, 0).await.expect("read");
    let seqs: Vec<u64> = all.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        vec![3, 4, 5, 6, 7],
        "bounded to the newest 5, in order"
    );
    assert_eq!(all[0].1, b"cmd-3");
    let since = s.history_since(&key, 5).await.expect("read");
    assert_eq!(
        since.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![6, 7]
    );
    assert!(s.history_since(&key, 7).await.expect("read").is_empty());
    // Deleting the key drops the history, as Redis's DEL does (in process
    // it used to drop only plain values).
    assert!(s.delete(&key).await.expect("delete"), "it existed");
    assert!(s.history_since(&key, 0).await.expect("read").is_empty());
    for seq in 1..=7u64 {
        s.history_push(&key, seq, format!("cmd-{seq}").as_bytes(), 5, ttl)
            .await
            .expect("push");
    }
    assert!(s
        .history_since("force_overlay:{other}", 0)
        .await
        .expect("read")
        .is_empty());
    s.history_push(
        "force_overlay:{short}",
        1,
        b"x",
        5,
        Duration::from_millis(200),
    )
    .await
    .expect("push");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        s.history_since("force_overlay:{short}", 0)
            .await
            .expect("read")
            .is_empty(),
        "expired"
    );
}

async fn kv_set_get_ttl_and_single_use(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 100).await else {
        return;
    };
    s.ping().await.expect("ping");
    assert_eq!(s.get("session:missing").await.expect("get"), None);

    s.set("session:a", b"one", None).await.expect("set");
    assert_eq!(
        s.get("session:a").await.expect("get").as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(s.ttl("session:a").await.expect("ttl"), None, "no TTL set");

    s.set("session:short", b"x", Some(Duration::from_millis(300)))
        .await
        .expect("set ttl");
    let ttl = s.ttl("session:short").await.expect("ttl").expect("has ttl");
    assert!(
        ttl <= Duration::from_millis(300) && ttl > Duration::from_millis(100),
        "{ttl:?}"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.get("session:short").await.expect("get"), None, "expired");

    let nonce = keys::nonce("device_0001");
    assert!(s
        .set_nx(&nonce, b"n1", Some(Duration::from_secs(60)))
        .await
        .expect("nx"));
    assert!(!s
        .set_nx(&nonce, b"n2", Some(Duration::from_secs(60)))
        .await
        .expect("nx"));
    assert_eq!(
        s.take(&nonce).await.expect("take").as_deref(),
        Some(&b"n1"[..])
    );
    assert_eq!(s.take(&nonce).await.expect("take"), None, "single use");

    assert!(s.delete("session:a").await.expect("del"));
    assert!(!s.delete("session:a").await.expect("del again"));
}

async fn incr_counts_and_expires(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 100).await else {
        return;
    };
    let key = "metrics:count";
    assert_eq!(
        s.incr(key, 1, Duration::from_millis(400))
            .await
            .expect("incr"),
        1
    );
    assert_eq!(
        s.incr(key, 2, Duration::from_secs(100))
            .await
            .expect("incr"),
        3
    );
    let ttl = s.ttl(key).await.expect("ttl").expect("ttl set on creation");
    assert!(
        ttl <= Duration::from_millis(400),
        "TTL is not extended: {ttl:?}"
    );
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(
        s.incr(key, 1, Duration::from_secs(1)).await.expect("incr"),
        1,
        "window restarted"
    );

    assert_eq!(
        s.set_max("metrics:max", 5, Duration::from_secs(60))
            .await
            .expect("max"),
        5
    );
    assert_eq!(
        s.set_max("metrics:max", 3, Duration::from_secs(60))
            .await
            .expect("max"),
        5,
        "never lowered"
    );
    assert_eq!(
        s.set_max("metrics:max", 9, Duration::from_secs(60))
            .await
            .expect("max"),
        9
    );
    assert_eq!(
        s.get("metrics:max").await.expect("get").as_deref(),
        Some(&b"9"[..])
    );

    s.set("metrics:text", b"abc", None).await.expect("set");
    assert!(matches!(
        s.incr("metrics:text", 1, Duration::from_secs(1)).await,
        Err(StateError::Corrupt(_))
    ));
}

async fn token_bucket_allows_exactly_capacity(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 100).await else {
        return;
    };
    let key = keys::rate_limit("device_0001");
    let minute = Duration::from_secs(60);
    for expected_remaining in (0..5).rev() {
        let d = s.take_tokens(&key, 5, minute, 1).await.expect("take");
        assert!(d.allowed);
        assert_eq!(d.limit, 5);
        assert_eq!(d.remaining, expected_remaining);
    }
    let refused = s.take_tokens(&key, 5, minute, 1).await.expect("take");
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    // 5 per minute = one every 12 s.
    assert!(
        refused.retry_after > Duration::from_secs(11)
            && refused.retry_after <= Duration::from_secs(12),
        "{:?}",
        refused.retry_after
    );
    assert!(
        refused.reset_after > Duration::from_secs(59),
        "{:?}",
        refused.reset_after
    );

    // A fast bucket refills continuously: 600 per second → one token in ~1.7 ms.
    let fast = keys::rate_limit("device_0002");
    for _ in 0..3 {
        assert!(
            s.take_tokens(&fast, 3, Duration::from_millis(5), 1)
                .await
                .expect("take")
                .allowed
        );
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        s.take_tokens(&fast, 3, Duration::from_millis(5), 1)
            .await
            .expect("take")
            .allowed
    );
}

async fn token_bucket_is_atomic_under_concurrency(backend: StateBackend) {
    let Some((s, b)) = shared_on(backend, 100).await else {
        return;
    };
    // On Redis the second handle is another replica sharing the bucket.
    let replicas = [s.clone(), second_shared(&b, 100).await];
    let shared = backend.is_redis();
    let key = keys::rate_limit("device_0003");
    let mut tasks = Vec::new();
    for i in 0..60 {
        let state = if shared {
            replicas[i % 2].clone()
        } else {
            s.clone()
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            state
                .take_tokens(&key, 20, Duration::from_secs(3600), 1)
                .await
                .expect("take")
                .allowed
        }));
    }
    let mut allowed = 0;
    for task in tasks {
        allowed += usize::from(task.await.expect("join"));
    }
    assert_eq!(allowed, 20, "exactly the capacity, never more");
}

async fn pubsub_delivers_to_every_subscriber(backend: StateBackend) {
    let Some((s, b)) = shared_on(backend, 100).await else {
        return;
    };
    let mut first = s
        .subscribe(keys::KILL_SWITCH_CHANNEL)
        .await
        .expect("subscribe");
    let mut second = s
        .subscribe(keys::KILL_SWITCH_CHANNEL)
        .await
        .expect("subscribe");
    let mut other = s.subscribe("force_overlay:other").await.expect("subscribe");
    // On Redis, publish from another replica: the message crosses instances.
    let publisher = if backend.is_redis() {
        second_shared(&b, 100).await
    } else {
        s.clone()
    };
    publisher
        .publish(keys::KILL_SWITCH_CHANNEL, b"CRITICAL_LOCK device_0001")
        .await
        .expect("publish");
    for sub in [&mut first, &mut second] {
        let got = tokio::time::timeout(Duration::from_secs(2), sub.recv())
            .await
            .expect("delivered in time")
            .expect("open");
        assert_eq!(got, b"CRITICAL_LOCK device_0001");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other.recv())
            .await
            .is_err(),
        "another channel receives nothing"
    );
}

/// A wait that spans the test's 300 ms sleep (and no more than a slow machine adds).
fn waited_through_the_sleep(wait: Duration) -> bool {
    wait >= Duration::from_millis(250) && wait < Duration::from_secs(5)
}

async fn queue_stats_report_the_backlog_and_the_oldest_undelivered_wait(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 100).await else {
        return;
    };
    let q = "sig:queue:stats";
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!((stats.len, stats.oldest_wait), (0, Duration::ZERO), "empty");
    // Before any consumer exists, every entry is undelivered.
    s.enqueue(q, b"first").await.expect("enqueue");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.enqueue(q, b"second").await.expect("enqueue");
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!(stats.len, 2);
    assert!(
        waited_through_the_sleep(stats.oldest_wait),
        "the first job's wait: {:?}",
        stats.oldest_wait
    );
    // Once the first is delivered, the lag is the second's (younger).
    let mut c = s.consumer(q, 0, "w").await.expect("consumer");
    let jobs = c.fetch(1, Duration::from_millis(200)).await.expect("fetch");
    assert_eq!(jobs.len(), 1);
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!(stats.len, 2, "a pending job is still backlog");
    assert!(
        stats.oldest_wait < Duration::from_millis(250),
        "the second job's wait: {:?}",
        stats.oldest_wait
    );
    // The first acked (and gone) while the second still waits: the lag is
    // still the second's.
    c.ack(&[jobs[0].id.clone()]).await.expect("ack");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!(stats.len, 1);
    assert!(
        waited_through_the_sleep(stats.oldest_wait),
        "the second job's wait: {:?}",
        stats.oldest_wait
    );
    // Everything delivered: no lag, though a job is still pending.
    let rest = c
        .fetch(10, Duration::from_millis(200))
        .await
        .expect("fetch");
    assert_eq!(rest.len(), 1);
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!((stats.len, stats.oldest_wait), (1, Duration::ZERO));
    let ids: Vec<String> = rest.iter().map(|j| j.id.clone()).collect();
    c.ack(&ids).await.expect("ack");
    let stats = s.queue_stats(q).await.expect("stats");
    assert_eq!(
        (stats.len, stats.oldest_wait),
        (0, Duration::ZERO),
        "drained"
    );
}

async fn queue_is_at_least_once_with_reclaim(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 100).await else {
        return;
    };
    let q = keys::HEARTBEAT_QUEUE;
    for i in 0..3 {
        s.enqueue(q, format!("hb-{i}").as_bytes())
            .await
            .expect("enqueue");
    }
    assert_eq!(s.queue_len(q).await.expect("len"), 3);

    let mut alive = s.consumer(q, 0, "worker-a").await.expect("consumer");
    let jobs = alive
        .fetch(10, Duration::from_millis(500))
        .await
        .expect("fetch");
    let payloads: Vec<_> = jobs
        .iter()
        .map(|j| String::from_utf8_lossy(&j.payload).into_owned())
        .collect();
    assert_eq!(payloads, vec!["hb-0", "hb-1", "hb-2"], "FIFO");
    alive.ack(&[jobs[0].id.clone()]).await.expect("ack");
    assert_eq!(s.queue_len(q).await.expect("len"), 2, "acked job is gone");

    // worker-a "dies" holding hb-1 and hb-2. Nothing is idle enough yet:
    drop(alive);
    let mut rescuer = s.consumer(q, 0, "worker-b").await.expect("consumer");
    assert!(rescuer
        .reclaim(Duration::from_secs(30), 10)
        .await
        .expect("reclaim")
        .is_empty());
    assert!(
        rescuer
            .fetch(10, Duration::from_millis(100))
            .await
            .expect("fetch")
            .is_empty(),
        "not redelivered as new"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reclaimed = rescuer
        .reclaim(Duration::from_millis(200), 10)
        .await
        .expect("reclaim");
    let mut ids: Vec<_> = reclaimed
        .iter()
        .map(|j| String::from_utf8_lossy(&j.payload).into_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["hb-1", "hb-2"]);
    rescuer
        .ack(&reclaimed.iter().map(|j| j.id.clone()).collect::<Vec<_>>())
        .await
        .expect("ack");
    assert_eq!(s.queue_len(q).await.expect("len"), 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        rescuer
            .reclaim(Duration::from_millis(200), 10)
            .await
            .expect("reclaim")
            .is_empty(),
        "acked jobs never return"
    );
}

async fn queue_is_bounded(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 2).await else {
        return;
    };
    let q = "sig:queue:bounded";
    s.enqueue(q, b"1").await.expect("enqueue");
    s.enqueue(q, b"2").await.expect("enqueue");
    assert!(matches!(
        s.enqueue(q, b"3").await,
        Err(StateError::QueueFull(_))
    ));
    // Pending (fetched, unacked) jobs still count: nothing accepted is dropped.
    let mut c = s.consumer(q, 0, "w").await.expect("consumer");
    let jobs = c.fetch(1, Duration::from_millis(200)).await.expect("fetch");
    assert!(matches!(
        s.enqueue(q, b"3").await,
        Err(StateError::QueueFull(_))
    ));
    c.ack(&[jobs[0].id.clone()]).await.expect("ack");
    s.enqueue(q, b"3").await.expect("room again after ack");
}

async fn queue_fetch_waits_then_returns_empty(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let q = "sig:queue:idle";
    let mut c = s.consumer(q, 0, "w").await.expect("consumer");
    let started = std::time::Instant::now();
    assert!(c
        .fetch(5, Duration::from_millis(300))
        .await
        .expect("fetch")
        .is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");
    // A job enqueued while waiting wakes the consumer.
    let producer = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        producer
            .enqueue("sig:queue:idle", b"late")
            .await
            .expect("enqueue");
    });
    let jobs = c.fetch(5, Duration::from_secs(3)).await.expect("fetch");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].payload, &b"late"[..]);
}

async fn batched_locks_claims_and_commits_match_the_single_calls(backend: StateBackend) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    s.set("state:{b}", b"old-b", None).await.expect("set");
    assert_eq!(
        s.lock_and_get("lock:{c}", b"other", ttl, "state:{c}")
            .await
            .expect("lock"),
        Some(None),
        "c is held by another worker"
    );
    let read = s
        .lock_and_get_many(
            &[
                ("lock:{a}", b"ta", "state:{a}"),
                ("lock:{b}", b"tb", "state:{b}"),
                ("lock:{c}", b"tc", "state:{c}"),
            ],
            ttl,
        )
        .await
        .expect("lock many");
    assert_eq!(
        read,
        vec![Some(None), Some(Some(b"old-b".to_vec())), None],
        "a free and empty, b free with its state, c held"
    );
    assert_eq!(
        s.lock_and_get("lock:{a}", b"late", ttl, "state:{a}")
            .await
            .expect("lock"),
        None,
        "a is now held"
    );

    // Claims in one call see each other, in order, and the holders before them.
    assert_eq!(s.claim("fp:x", b"dev-0", ttl).await.expect("claim"), None);
    let holders = s
        .claim_many(
            &[("fp:x", b"dev-1"), ("fp:y", b"dev-1"), ("fp:y", b"dev-2")],
            ttl,
        )
        .await
        .expect("claim many");
    assert_eq!(
        holders,
        vec![Some(b"dev-0".to_vec()), None, Some(b"dev-1".to_vec())]
    );
    assert!(s.ttl("fp:y").await.expect("ttl").is_some());
    assert!(s.claim_many(&[], ttl).await.expect("none").is_empty());

    // Commits: writes land, own locks are released, a lost lock is not taken
    // from its new holder.
    let released = s
        .commit_many(&[
            Commit {
                entries: vec![
                    ("state:{a}", b"new-a", Some(ttl)),
                    ("report:{a}", b"r-a", None),
                ],
                lock: "lock:{a}",
                token: b"ta",
                within_ttl: true,
            },
            Commit {
                entries: vec![],
                lock: "lock:{b}",
                token: b"tb",
                within_ttl: false,
            },
            Commit {
                entries: vec![("state:{c}", b"late-c", Some(ttl))],
                lock: "lock:{c}",
                token: b"tc",
                within_ttl: false,
            },
        ])
        .await
        .expect("commit many");
    assert_eq!(released, vec![true, true, false]);
    assert_eq!(
        s.get("state:{a}").await.expect("get"),
        Some(b"new-a".to_vec())
    );
    assert_eq!(
        s.get("report:{a}").await.expect("get"),
        Some(b"r-a".to_vec())
    );
    assert!(s.ttl("state:{a}").await.expect("ttl").is_some());
    assert_eq!(
        s.ttl("report:{a}").await.expect("ttl"),
        None,
        "no TTL asked"
    );
    assert_eq!(
        s.get("state:{b}").await.expect("get"),
        Some(b"old-b".to_vec()),
        "nothing written for b"
    );
    assert_eq!(
        s.get("state:{c}").await.expect("get"),
        Some(b"late-c".to_vec()),
        "written anyway"
    );
    let again = s
        .lock_and_get_many(
            &[
                ("lock:{a}", b"t2", "state:{a}"),
                ("lock:{b}", b"t2", "state:{b}"),
                ("lock:{c}", b"t2", "state:{c}"),
            ],
            ttl,
        )
        .await
        .expect("lock many");
    assert_eq!(
        again,
        vec![
            Some(Some(b"new-a".to_vec())),
            Some(Some(b"old-b".to_vec())),
            None
        ],
        "a and b released, c still held by its owner"
    );
    assert!(s
        .lock_and_get_many(&[], ttl)
        .await
        .expect("none")
        .is_empty());
    assert!(s.commit_many(&[]).await.expect("none").is_empty());
}

async fn take_then_advance_and_enqueue_does_nothing_more_when_the_bucket_refuses(
    backend: StateBackend,
) {
    let Some((s, _b)) = shared_on(backend, 10).await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let q = "sig:queue:admit";
    let bucket = Take {
        key: "rl:{admit}",
        capacity: 2,
        period: Duration::from_secs(60),
        cost: 1,
    };
    let admit = |v: u64, payload: &'static [u8]| {
        let s = s.clone();
        async move {
            s.take_then_advance_and_enqueue(bucket, "seq:{admit}", v, ttl, q, payload)
                .await
                .expect("admit")
        }
    };
    // No seq stored: the token is taken, nothing else happens.
    let unknown = admit(1, b"unknown").await;
    assert_eq!(unknown.advanced, Some(Advanced::Unknown));
    assert_eq!(s.queue_len(q).await.expect("len"), 0);
    s.set_max("seq:{admit}", 0, ttl).await.expect("refill");
    let first = s
        .advance_and_enqueue("seq:{admit}", 1, ttl, q, b"one")
        .await
        .expect("advance");
    assert_eq!(first, Advanced::Queued { previous: 0 });
    // A replay still costs its token (the bucket's second and last).
    let replay = admit(1, b"again").await;
    assert_eq!(replay.bucket.remaining, 0);
    assert_eq!(replay.advanced, Some(Advanced::Stale));
    // Refused: neither the seq nor the queue moves.
    let refused = admit(2, b"two").await;
    assert!(!refused.bucket.allowed);
    assert!(refused.bucket.retry_after > Duration::ZERO);
    assert_eq!(refused.advanced, None);
    assert_eq!(s.queue_len(q).await.expect("len"), 1);
    assert_eq!(
        s.advance("seq:{admit}", 2, ttl).await.expect("advance"),
        Some(1),
        "the refused heartbeat's seq is still free"
    );
}

/// Four shards: every job lands on exactly one, a device's jobs all on the
/// same one and in order, the stats add the shards up, and one consumer per
/// shard drains the queue. (In process there is one shard; the story holds.)
async fn a_sharded_queue_keeps_each_device_on_one_shard_and_loses_nothing(backend: StateBackend) {
    let Some((_s, b)) = shared_on(backend, 1000).await else {
        return;
    };
    let s = second_shared_sharded(&b, 1000, 4).await;
    let ttl = Duration::from_secs(60);
    let q = "sig:queue:sharded";
    let devices: Vec<String> = (0..12).map(|d| format!("device{d:04}")).collect();
    for device in &devices {
        s.set_max(&keys::heartbeat_seq(device), 0, ttl)
            .await
            .expect("a known seq");
    }
    for seq in 1..=3u64 {
        for device in &devices {
            let bucket = Take {
                key: &keys::rate_limit(device),
                capacity: 100,
                period: Duration::from_secs(60),
                cost: 1,
            };
            let admitted = s
                .take_then_advance_and_enqueue(
                    bucket,
                    &keys::heartbeat_seq(device),
                    seq,
                    ttl,
                    q,
                    format!("{device}/{seq}").as_bytes(),
                )
                .await
                .expect("admit");
            assert!(matches!(admitted.advanced, Some(Advanced::Queued { .. })));
        }
    }
    for i in 0..4 {
        s.enqueue(q, format!("plain/{i}").as_bytes())
            .await
            .expect("enqueue");
    }
    assert_eq!(s.queue_len(q).await.expect("len"), 40);
    let shards = s.queue_shards();
    assert_eq!(shards, if backend.is_redis() { 4 } else { 1 });
    let mut seen: Vec<String> = Vec::new();
    let mut shard_of_device = std::collections::HashMap::new();
    for shard in 0..shards {
        let mut c = s
            .consumer(q, shard, &format!("w{shard}"))
            .await
            .expect("consumer");
        let jobs = c
            .fetch(100, Duration::from_millis(50))
            .await
            .expect("fetch");
        let mut last_seq = std::collections::HashMap::new();
        for job in &jobs {
            let text = String::from_utf8_lossy(&job.payload).into_owned();
            let (who, seq) = text.split_once('/').expect("payload");
            if who != "plain" {
                let seq: u64 = seq.parse().expect("seq");
                assert_eq!(
                    *shard_of_device.entry(who.to_owned()).or_insert(shard),
                    shard,
                    "{who} on two shards"
                );
                let before = last_seq.insert(who.to_owned(), seq).unwrap_or(0);
                assert!(seq > before, "{who}: {seq} after {before}");
            }
            seen.push(text);
        }
        c.ack(&jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>())
            .await
            .expect("ack");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 40, "every job once");
    if backend.is_redis() {
        let used: std::collections::HashSet<_> = shard_of_device.values().collect();
        assert!(used.len() > 1, "12 devices all on one shard: {used:?}");
    }
    assert_eq!(s.queue_len(q).await.expect("len"), 0);
}
