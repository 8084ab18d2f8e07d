//! Cost of reading one ~7 KB heartbeat body at ingestion.
//!
//! The body the load tool sends (100 accelerometer + 100 gyroscope samples
//! to 4 decimals, touches, network, context), read by the reference request
//! parser (`http::json::parse`) and by the fast reader ingestion uses
//! (`signals::reader`), then read, validated and encoded as the queue job
//! (postcard) in both job encodings, and the worker's decoding of each.
//! `cargo bench -p blockremote-server --bench ingest`.
//! Results: docs/BENCHMARKS.md.

use blockremote::signals::ingest::{decode_job, encode_job, HeartbeatBody, JobEncoding};
use blockremote_engine::sim::{load_heartbeat, Class};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn body() -> Vec<u8> {
    // Seed 2: a window with touches (12 events: taps and a scroll), as most
    // of the load tool's are (seed 7, used until 2026-11-30, had none).
    let hb = load_heartbeat(Class::HeldInHand, 2);
    assert_eq!(hb.touches.len(), 12, "the body has touches");
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
    c.bench_function("heartbeat body: fast reader", |b| {
        b.iter(|| blockremote::signals::reader::read(black_box(&body)).expect("fast path"))
    });
    let user = uuid::Uuid::now_v7();
    for (name, encoding) in [("small", JobEncoding::Small), ("fast", JobEncoding::Fast)] {
        c.bench_function(
            &format!("heartbeat body: fast reader, validate, encode the job ({name})"),
            |b| {
                b.iter(|| {
                    let hb =
                        blockremote::signals::reader::read(black_box(&body)).expect("fast path");
                    hb.validate().expect("valid");
                    encode_job(
                        "device_0001",
                        user,
                        false,
                        None,
                        &hb.into_heartbeat(),
                        encoding,
                    )
                    .expect("encodes")
                })
            },
        );
        let hb = blockremote::signals::reader::read(&body).expect("fast path");
        let job = encode_job(
            "device_0001",
            user,
            false,
            None,
            &hb.into_heartbeat(),
            encoding,
        )
        .expect("encodes");
        println!(
            "{name} job: {} bytes for a body of {}",
            job.len(),
            body.len()
        );
        c.bench_function(&format!("heartbeat job: decode ({name})"), |b| {
            b.iter(|| decode_job(black_box(&job)).expect("decodes"))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
