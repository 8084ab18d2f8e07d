//! Cost of reading one ~7 KB heartbeat body at ingestion.
//!
//! The body the load tool sends (100 accelerometer + 100 gyroscope samples
//! to 4 decimals, touches, network, context), read by the request parser
//! (`http::json::parse`) and validated, then encoded as the queue job
//! (postcard). `cargo bench -p blockremote-server --bench ingest`.
//! Results: docs/BENCHMARKS.md.

use blockremote::signals::ingest::HeartbeatBody;
use blockremote_engine::sim::{session, Class};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn body() -> Vec<u8> {
    let mut hb = session(Class::HeldInHand, 7, 1).heartbeats.remove(0);
    hb.accelerometer.truncate(100);
    hb.gyroscope.truncate(100);
    let r = |v: f64| (v * 1e4).round() / 1e4;
    for s in hb.accelerometer.iter_mut().chain(hb.gyroscope.iter_mut()) {
        (s.t, s.x, s.y, s.z) = (r(s.t), r(s.x), r(s.y), r(s.z));
    }
    for t in &mut hb.touches {
        (t.t, t.x, t.y, t.pressure, t.size) = (r(t.t), r(t.x), r(t.y), r(t.pressure), r(t.size));
    }
    let mut v = serde_json::to_value(&hb).expect("json");
    v["sent_at"] = serde_json::json!("2026-11-23T12:00:00.000Z");
    serde_json::to_vec(&v).expect("json")
}

fn bench(c: &mut Criterion) {
    let body = body();
    assert!(body.len() > 6000, "a realistic body ({} bytes)", body.len());
    c.bench_function("heartbeat body: request parser", |b| {
        b.iter(|| {
            blockremote::http::json::parse::<HeartbeatBody>(black_box(&body)).expect("parses")
        })
    });
    c.bench_function("heartbeat body: parse, validate, encode the job", |b| {
        b.iter(|| {
            let hb =
                blockremote::http::json::parse::<HeartbeatBody>(black_box(&body)).expect("parses");
            hb.validate().expect("valid");
            postcard::to_allocvec(&hb.into_heartbeat()).expect("encodes")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
