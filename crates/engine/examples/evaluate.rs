//! Prints the detection evaluation on the synthetic corpus:
//! `cargo run --release -p blockremote-engine --example evaluate -- [SESSIONS] [LENGTH] [SEED] [debug-class]`.
use blockremote_engine::{
    assess,
    sim::{evaluate, session, Class},
    DeviceState, PlanTier, Situation,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let per_class = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let length = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    if let Some(name) = args.get(4) {
        let class = Class::ALL
            .into_iter()
            .find(|c| c.name().ends_with(name.as_str()))
            .expect("class");
        let mut shown = 0;
        for i in 0..per_class {
            let s = session(
                class,
                blockremote_engine::sim::session_seed(seed, class, i),
                length,
            );
            let lock = blockremote_engine::sim::first_lock(&s);
            let wrong = match s.attack_start {
                None => lock.is_some(),
                Some(start) => !lock.is_some_and(|at| at >= start && at < start + 5),
            };
            if !wrong || shown >= 3 {
                continue;
            }
            shown += 1;
            let mut state = DeviceState::default();
            let situation = Situation {
                plan: PlanTier::Paid,
                ..Default::default()
            };
            println!("session {i} attack_start {:?}", s.attack_start);
            for hb in &s.heartbeats {
                let f = blockremote_engine::features::extract(hb);
                let a = assess(&mut state, hb, &situation);
                println!(
                    "  seq {:>2} trust {:>3} thr {} {:?} c={:?} motion={:.3} hf={:.4} gyro={:.3} coup={:.2} downs={} ent={:.2} up={:?} {:?}",
                    hb.seq, a.trust_score, a.threshold, a.decision, a.components, f.accel_motion, f.accel_hf, f.gyro_energy, f.touch_coupling, f.touch_downs, f.touch_surface_entropy, f.upload_rate.map(|u| u as u64), a.reasons
                );
            }
        }
        return;
    }
    for (class, r) in evaluate(per_class, length, seed) {
        let mean = if r.heartbeats_to_lock.is_empty() {
            0.0
        } else {
            r.heartbeats_to_lock.iter().sum::<usize>() as f64 / r.heartbeats_to_lock.len() as f64
        };
        println!(
            "{:<34} sessions {:>5} locked {:>5} ({:>6.2}%) mean heartbeats to lock {:.2}",
            class.name(),
            r.sessions,
            r.locked,
            r.rate() * 100.0,
            mean
        );
    }
}
