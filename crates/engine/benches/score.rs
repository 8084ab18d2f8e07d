//! Scoring one heartbeat: 100 accelerometer + 100 gyroscope samples and 10
//! touch events, against a device with a warm baseline.
//! `cargo bench -p blockremote-engine --bench score`; results: docs/BENCHMARKS.md.

use blockremote_engine::{
    assess,
    heartbeat::{Heartbeat, Sample, Touch, TouchAction},
    sim::Rng,
    DeviceState, PlanTier, Situation,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn heartbeat(rng: &mut Rng, seq: u64) -> Heartbeat {
    let sensor = |rng: &mut Rng, base: [f64; 3], noise: f64| -> Vec<Sample> {
        (0..100)
            .map(|i| Sample {
                t: f64::from(i) * 20.0,
                x: base[0] + noise * rng.normal(),
                y: base[1] + noise * rng.normal(),
                z: base[2] + noise * rng.normal(),
            })
            .collect()
    };
    let accelerometer = sensor(rng, [0.3, 2.1, 9.5], 0.05);
    let gyroscope = sensor(rng, [0.0, 0.0, 0.0], 0.03);
    let touches = (0..10)
        .map(|i| Touch {
            t: f64::from(i) * 180.0,
            x: rng.unit(),
            y: rng.unit(),
            pressure: rng.range(0.3, 0.7),
            size: rng.range(0.03, 0.07),
            action: if i % 2 == 0 {
                TouchAction::Down
            } else {
                TouchAction::Up
            },
        })
        .collect();
    Heartbeat {
        seq,
        accelerometer,
        gyroscope,
        touches,
        ..Default::default()
    }
}

fn score(c: &mut Criterion) {
    let mut rng = Rng::new(7);
    let situation = Situation {
        plan: PlanTier::Paid,
        ..Default::default()
    };
    let mut state = DeviceState::default();
    for seq in 1..=120 {
        assess(&mut state, &heartbeat(&mut rng, seq), &situation);
    }
    let hb = heartbeat(&mut rng, 121);
    c.bench_function(
        "engine: score one heartbeat (100+100 samples, 10 touches)",
        |b| {
            b.iter_batched_ref(
                || state.clone(),
                |state| assess(state, black_box(&hb), &situation),
                criterion::BatchSize::SmallInput,
            )
        },
    );
}

criterion_group!(benches, score);
criterion_main!(benches);
