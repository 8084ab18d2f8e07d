//! Instruction-level timing of the engine's per-heartbeat steps, one at a
//! time (run under `perf stat -e instructions:u` to compare without noise):
//! `cargo run --release -p blockremote-engine --example timing -- residual|replay|impulses|extract|assess`.
use blockremote_engine::{
    assess, features, replay,
    sim::{load_heartbeat, Class},
    DeviceState, PlanTier, Situation,
};
use std::time::Instant;

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "assess".into());
    let hbs: Vec<_> = (0..13)
        .map(|i| load_heartbeat(Class::HeldInHand, i))
        .collect();
    let hb = &hbs[12];
    let downs: Vec<f64> = hb
        .touches
        .iter()
        .filter(|t| t.action == blockremote_engine::heartbeat::TouchAction::Down)
        .map(|t| t.t)
        .collect();
    let mut packed = Vec::new();
    for h in &hbs[..12] {
        if let Some(r) = replay::residual(&h.accelerometer, &[]) {
            replay::remember(&mut packed, &r);
        }
    }
    let query = replay::residual(&hb.accelerometer, &downs).expect("residual");
    let situation = Situation {
        plan: PlanTier::Paid,
        ..Default::default()
    };
    let mut state = DeviceState::default();
    for (i, h) in hbs[..12].iter().enumerate() {
        let mut h = h.clone();
        h.seq = i as u64 + 1;
        assess(&mut state, &h, &situation);
    }
    let n: u32 = std::env::args()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let started = Instant::now();
    for _ in 0..n {
        match which.as_str() {
            "residual" => drop(std::hint::black_box(replay::residual(
                &hb.accelerometer,
                &downs,
            ))),
            "replay" => drop(std::hint::black_box(replay::is_replay(&packed, &query))),
            "impulses" => drop(std::hint::black_box(features::impulse_test(hb, &downs))),
            "extract" => drop(std::hint::black_box(features::extract(hb))),
            _ => {
                let mut s = state.clone();
                let mut h = hb.clone();
                h.seq = 13;
                drop(std::hint::black_box(assess(&mut s, &h, &situation)));
            }
        }
    }
    println!(
        "{which}: {:?} per call ({} downs, {} stored windows)",
        started.elapsed() / n,
        downs.len(),
        packed.len() / replay::STRIDE
    );
}
