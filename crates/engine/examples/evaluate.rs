//! The detection evaluation, in process (no server):
//!
//! ```text
//! cargo run --release -p blockremote-engine --example evaluate -- [--classes SET] [SESSIONS] [LENGTH] [SEED] [debug-class]
//! cargo run --release -p blockremote-engine --example evaluate -- --export FILE [--classes SET] [SESSIONS] [LENGTH] [SEED]
//! cargo run --release -p blockremote-engine --example evaluate -- --corpus FILE
//! ```
//!
//! - Without `--export`/`--corpus`: generates `SESSIONS` (default 200) sessions of
//!   `LENGTH` (default 30) heartbeats per class, seeded `SEED` (default 1), scores
//!   them and prints a Markdown table per class with 95% Wilson intervals.
//!   `SET` is `original`, `shifted` or `all` (default). A trailing `debug-class`
//!   (a class name's suffix) prints the first three misses of that class instead.
//! - `--export FILE`: writes that generated corpus as JSON Lines (the format in
//!   `blockremote_engine::sim`'s documentation; `-` is stdout) and exits.
//! - `--corpus FILE`: evaluates a corpus file (anyone's generator) in process.
use std::io::{BufRead, BufWriter, Write};

use blockremote_engine::{
    assess,
    sim::{
        evaluate_classes, evaluate_corpus, session, session_seed, Class, ClassReport,
        CorpusSession, DETECTION_BUDGET,
    },
    DeviceState, PlanTier, Situation,
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut flag = |name: &str| -> Option<String> {
        let at = args.iter().position(|a| a == name)?;
        let value = args.get(at + 1).cloned();
        let Some(value) = value else {
            fail(&format!("{name} needs a value"));
        };
        args.drain(at..at + 2);
        Some(value)
    };
    let export = flag("--export");
    let corpus = flag("--corpus");
    let classes = flag("--classes").unwrap_or_else(|| "all".into());
    let Some(classes) = Class::set(&classes) else {
        fail(&format!(
            "--classes: `{classes}` is not original, shifted or all"
        ));
    };
    if let Some(path) = corpus {
        return print_table(&evaluate_file(&path), &format!("corpus {path}"));
    }
    let number = |i: usize, default: u64| -> u64 {
        args.get(i).map_or(default, |s| {
            s.parse()
                .unwrap_or_else(|_| fail(&format!("`{s}` is not a number")))
        })
    };
    let per_class = number(0, 200) as usize;
    let length = number(1, 30) as usize;
    let seed = number(2, 1);
    if let Some(path) = export {
        return write_corpus(&path, classes, per_class, length, seed);
    }
    if let Some(name) = args.get(3) {
        return debug(name, per_class, length, seed);
    }
    let rows: Vec<(String, bool, ClassReport)> = evaluate_classes(classes, per_class, length, seed)
        .into_iter()
        .map(|(c, r)| (c.name().to_owned(), c.is_attack(), r))
        .collect();
    print_table(
        &rows,
        &format!("generated: {per_class} sessions × {length} heartbeats per class, seed {seed}"),
    );
}

fn fail(message: &str) -> ! {
    eprintln!("evaluate: {message}");
    std::process::exit(2)
}

/// Writes the generated corpus as JSON Lines, each heartbeat with a
/// `sent_at` two seconds after the previous one (as API.md bodies carry it).
fn write_corpus(path: &str, classes: &[Class], per_class: usize, length: usize, seed: u64) {
    let out: Box<dyn Write> = if path == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(path)
                .unwrap_or_else(|e| fail(&format!("cannot create {path}: {e}"))),
        )
    };
    let mut out = BufWriter::new(out);
    let mut lines = 0;
    for &class in classes {
        for i in 0..per_class {
            let s = session(class, session_seed(seed, class, i), length);
            let line = Line {
                class: s.class.name(),
                attack: s.class.is_attack(),
                attack_start: s.attack_start,
                heartbeats: s
                    .heartbeats
                    .iter()
                    .enumerate()
                    .map(|(k, hb)| Stamped {
                        hb,
                        sent_at: sent_at(2 * k as u64),
                    })
                    .collect(),
            };
            serde_json::to_writer(&mut out, &line).expect("write");
            out.write_all(b"\n")
                .unwrap_or_else(|e| fail(&format!("writing {path}: {e}")));
            lines += 1;
        }
    }
    out.flush()
        .unwrap_or_else(|e| fail(&format!("writing {path}: {e}")));
    eprintln!("wrote {lines} sessions to {path}");
}

/// A corpus line as written (the fields of [`CorpusSession`], in order).
#[derive(serde::Serialize)]
struct Line<'a> {
    class: &'a str,
    attack: bool,
    attack_start: Option<usize>,
    heartbeats: Vec<Stamped<'a>>,
}

/// A heartbeat body as API.md shows it, with its `sent_at`.
#[derive(serde::Serialize)]
struct Stamped<'a> {
    #[serde(flatten)]
    hb: &'a blockremote_engine::Heartbeat,
    sent_at: String,
}

/// `2026-01-01T00:00:00.000Z` plus `secs` (up to 28 days).
fn sent_at(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    format!("2026-01-{:02}T{h:02}:{m:02}:{s:02}.000Z", 1 + d.min(27))
}

/// Reads and checks a corpus file, then evaluates it.
fn evaluate_file(path: &str) -> Vec<(String, bool, ClassReport)> {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| fail(&format!("cannot open {path}: {e}")));
    let mut sessions = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.unwrap_or_else(|e| fail(&format!("reading {path}: {e}")));
        if line.trim().is_empty() {
            continue;
        }
        let s: CorpusSession =
            serde_json::from_str(&line).unwrap_or_else(|e| fail(&format!("{path}:{}: {e}", n + 1)));
        if let Err(why) = s.check() {
            fail(&format!("{path}:{}: {why}", n + 1));
        }
        sessions.push(s);
    }
    let report = evaluate_corpus(&sessions);
    for s in &sessions {
        let (_, attack, _) = report
            .iter()
            .find(|(name, ..)| *name == s.class)
            .expect("every class is reported");
        if *attack != s.attack {
            fail(&format!(
                "{path}: class {} mixes attack and genuine sessions",
                s.class
            ));
        }
    }
    report
}

fn print_table(rows: &[(String, bool, ClassReport)], title: &str) {
    println!("{title}; attacks: locked within {DETECTION_BUDGET} heartbeats of the attack's start; genuine: ever locked\n");
    println!(
        "| class | sessions | locked | rate | 95% CI (Wilson) | heartbeats to lock (mean / max) |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, attack, r) in rows {
        let label = if *attack {
            "detected within 5"
        } else {
            "falsely locked"
        };
        let (lo, hi) = r.interval();
        let to_lock = &r.heartbeats_to_lock;
        let mean = if to_lock.is_empty() {
            "—".to_owned()
        } else {
            format!(
                "{:.2} / {}",
                to_lock.iter().sum::<usize>() as f64 / to_lock.len() as f64,
                to_lock.iter().max().unwrap_or(&0)
            )
        };
        println!(
            "| {name} | {} | {} {label} | {:.2}% | {:.1}–{:.1}% | {mean} |",
            r.sessions,
            r.locked,
            r.rate() * 100.0,
            lo * 100.0,
            hi * 100.0
        );
    }
}

/// Prints the first three misses of the class whose name ends with `name`.
fn debug(name: &str, per_class: usize, length: usize, seed: u64) {
    let class = Class::ALL
        .into_iter()
        .find(|c| c.name().ends_with(name))
        .unwrap_or_else(|| fail(&format!("no class ends with `{name}`")));
    let mut shown = 0;
    for i in 0..per_class {
        let s = session(class, session_seed(seed, class, i), length);
        let lock = blockremote_engine::sim::first_lock(&s);
        let wrong = match s.attack_start {
            None => lock.is_some(),
            Some(start) => !lock.is_some_and(|at| at >= start && at < start + DETECTION_BUDGET),
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
                "  seq {:>2} trust {:>3} thr {} {:?} c={:?} motion={:.3} gyro={:.3} coup={:.2} downs={} bins={:?} impulse={:.1} shares={:.2?} timing={} ent={:.2} up={:?} {:?}",
                hb.seq, a.trust_score, a.threshold, a.decision, a.components, f.accel_motion, f.gyro_energy, f.touch_coupling, f.touch_downs, f.impulses.bins, state.impulse_statistic(), state.impulse_shares(), f.timing_resolves_taps, f.touch_surface_entropy, f.upload_rate.map(|u| u as u64), a.reasons
            );
        }
    }
}
