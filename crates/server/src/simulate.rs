//! `blockremote simulate`: labelled device sessions driven through the real
//! HTTP API, as an evaluation and as load.
//!
//! The sessions come from the built-in generator — for each class of
//! [`blockremote_engine::sim::Class`] in the chosen set (`--classes
//! original|shifted|all`), N sessions of genuine use and of attacks that
//! begin after a genuine prefix — or from a corpus file (`--corpus FILE`),
//! which is how an outside, held-out generator is plugged in: JSON Lines,
//! one session per line,
//! `{"class": "attack/replay_noisy", "attack": true, "attack_start": 5, "heartbeats": [...]}`
//! with `heartbeats` the API.md heartbeat bodies (`seq` from 1), posted as
//! they are except for `sent_at`, which is stamped with the send time; the
//! format is specified in [`blockremote_engine::sim`]. Only the public API is
//! used, through the reference client: one external user per set of windows
//! (`simulate:seed-S` or `simulate:corpus-DIGEST`: the record that the server
//! saw them, and what `--cleanup` removes), one device session minted per
//! simulated device through the admin API,
//! heartbeats posted in order at the device's pace — each waits until the
//! previous one was scored (`last_seq` in the trust report), as a phone
//! sending one every two seconds would. A device is locked when its API
//! calls are refused with 403 `device_locked`. Reported per class: attacks
//! locked within 5 heartbeats of the attack's start, genuine sessions ever
//! locked, each rate with its 95% Wilson score interval, heartbeats and
//! milliseconds from the attack's first heartbeat to the lock.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use blockremote_client::{
    Admin, Client, Device, DeviceIdentity, Error as ClientError, HeartbeatOutcome, SessionRequest,
};
use blockremote_engine::sim::{
    session, session_seed, wilson, Class, CorpusSession, DETECTION_BUDGET, Z95,
};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::Digest as _;

/// What to run.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Server base URL.
    pub url: String,
    /// Admin API key (mints the device sessions).
    pub admin_key: String,
    /// Sessions per class (generated corpus).
    pub sessions: usize,
    /// Heartbeats per session (generated corpus).
    pub length: usize,
    /// Seed of the generated corpus; a fresh one per run when `None`, so
    /// each run's windows are new to the server.
    pub seed: Option<u64>,
    /// Run even when the server already saw these windows.
    pub rerun: bool,
    /// Run against a server that is not on a loopback address.
    pub force: bool,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// Where the sessions come from.
    pub corpus: Corpus,
}

/// Where the sessions come from.
#[derive(Debug, Clone)]
pub enum Corpus {
    /// The built-in generator, for these classes.
    Generated(Vec<Class>),
    /// A JSON Lines corpus file.
    File(PathBuf),
}

/// A class as reported: its label and whether it is an attack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    name: String,
    attack: bool,
}

impl Label {
    /// The class's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True for attack classes.
    pub fn is_attack(&self) -> bool {
        self.attack
    }
}

impl From<Class> for Label {
    fn from(class: Class) -> Self {
        Self {
            name: class.name().to_owned(),
            attack: class.is_attack(),
        }
    }
}

/// One session to run.
#[derive(Debug, Clone)]
enum Job {
    /// The `index`-th generated session of a class.
    Generated { class: Class, index: usize },
    /// A corpus line (kept as text until its turn).
    Line {
        number: usize,
        attack_start: Option<usize>,
        text: Arc<str>,
    },
}

/// A loaded corpus: its labels in order of first appearance and, per
/// session, the index of its label.
struct Loaded {
    labels: Vec<Label>,
    jobs: Vec<(usize, Job)>,
}

/// Reads and checks a corpus file (every line parsed and validated up
/// front, so a bad line fails the run before anything is posted).
fn load(path: &std::path::Path) -> anyhow::Result<(Loaded, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the corpus {}", path.display()))?;
    let digest = hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8]);
    let mut labels: Vec<Label> = Vec::new();
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let s: CorpusSession = serde_json::from_str(line).with_context(at)?;
        if let Err(why) = s.check() {
            bail!("{}: {why}", at());
        }
        let label = match labels.iter().position(|l| l.name == s.class) {
            Some(i) if labels[i].attack != s.attack => {
                bail!(
                    "{}: class {} mixes attack and genuine sessions",
                    at(),
                    s.class
                )
            }
            Some(i) => i,
            None => {
                labels.push(Label {
                    name: s.class.clone(),
                    attack: s.attack,
                });
                labels.len() - 1
            }
        };
        jobs.push((
            label,
            Job::Line {
                number: n + 1,
                attack_start: s.attack_start,
                text: line.into(),
            },
        ));
    }
    if jobs.is_empty() {
        bail!("the corpus {} has no sessions", path.display());
    }
    Ok((Loaded { labels, jobs }, digest))
}

/// One session's outcome.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Index of the session's label.
    label: usize,
    /// Heartbeats posted.
    posted: usize,
    attack_start: Option<usize>,
    /// Index of the heartbeat after which the device was found locked.
    locked_at: Option<usize>,
    /// Milliseconds from the attack's first heartbeat to the lock.
    ms_to_lock: Option<f64>,
}

/// The simulation's tag on the server: every simulated user's external id
/// starts with it, which is how `--cleanup` finds them.
pub const TAG: &str = "simulate:";

/// The device's `last_seq`, or `None` once it is locked.
async fn last_seq(device: &Device) -> anyhow::Result<Option<u64>> {
    match device.trust_score().await {
        Ok(report) => Ok(Some(report.last_seq)),
        Err(e) if e.code() == Some("device_locked") => Ok(None),
        // The device's own budget (trial: 120/min) also pays for polls.
        Err(ClientError::Api {
            retry_after,
            problem,
            ..
        }) if problem.code == "rate_limited" => {
            tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_WAIT)).await;
            Ok(Some(0))
        }
        Err(e) => Err(e).context("trust-score"),
    }
}

/// The longest `Retry-After` obeyed.
const MAX_WAIT: Duration = Duration::from_secs(60);

async fn run_session(
    admin: &Admin,
    options: &SimulateOptions,
    seed: u64,
    user_id: &str,
    run: &str,
    (label, job): (usize, Job),
) -> anyhow::Result<Outcome> {
    let (device_id, attack_start, bodies) = match job {
        Job::Generated { class, index } => {
            let s = session(class, session_seed(seed, class, index), options.length);
            let bodies = s
                .heartbeats
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?;
            (
                format!("sim{run}{:02}x{index:05}", class as u8),
                s.attack_start,
                bodies,
            )
        }
        Job::Line {
            number,
            attack_start,
            text,
        } => {
            let mut line: Value = serde_json::from_str(&text)?;
            let bodies = match line["heartbeats"].take() {
                Value::Array(bodies) => bodies,
                _ => bail!("corpus line {number}: no heartbeats"),
            };
            (format!("sim{run}c{number:07}"), attack_start, bodies)
        }
    };
    let identity = DeviceIdentity {
        device_fingerprint: format!("sim-{device_id}"),
        device_id,
        platform: "android".to_owned(),
    };
    let tokens = admin
        .session(SessionRequest::User(user_id), &identity)
        .await
        .context("minting a device session")?;
    let device = admin
        .client()
        .device(&identity.device_id, &tokens.access_token);
    let mut outcome = Outcome {
        label,
        posted: 0,
        attack_start,
        locked_at: None,
        ms_to_lock: None,
    };
    let mut attack_began = None;
    for (i, mut body) in bodies.into_iter().enumerate() {
        if Some(i) == attack_start {
            attack_began = Some(Instant::now());
        }
        let seq = body["seq"].as_u64().unwrap_or(i as u64 + 1);
        body["sent_at"] = json!(chrono::Utc::now().to_rfc3339());
        let locked = loop {
            match device.heartbeat(&body).await? {
                HeartbeatOutcome::Accepted { .. } => break false,
                HeartbeatOutcome::Locked => break true,
                // Not accepted, so its seq is unspent: wait and send it again.
                HeartbeatOutcome::RateLimited { retry_after } => {
                    tokio::time::sleep(retry_after.min(MAX_WAIT)).await
                }
                HeartbeatOutcome::Replay { last_seq } => bail!(
                    "the server already had heartbeat {seq} of {} (its last seq: {last_seq:?})",
                    device.id()
                ),
            }
        };
        if locked {
            outcome.locked_at = Some(i.saturating_sub(1));
            break;
        }
        outcome.posted += 1;
        // Wait until it was scored (or the device got locked).
        tokio::time::sleep(Duration::from_millis(3)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match last_seq(&device).await? {
                None => {
                    outcome.locked_at = Some(i);
                    break;
                }
                Some(last) if last >= seq => break,
                Some(_) if Instant::now() > deadline => {
                    bail!("heartbeat {seq} of {} not scored in 10 s", device.id())
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        if outcome.locked_at.is_some() {
            break;
        }
    }
    if let (Some(_), Some(began)) = (outcome.locked_at, attack_began) {
        outcome.ms_to_lock = Some(began.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(outcome)
}

/// One class's results.
#[derive(Debug, Clone)]
pub struct ClassReport {
    /// The class.
    pub class: Label,
    /// Sessions run.
    pub sessions: usize,
    /// Attacks: sessions locked within [`DETECTION_BUDGET`] heartbeats of
    /// the attack's start. Genuine use: sessions ever locked.
    pub hits: usize,
    /// Attacks detected: heartbeats from the attack's start to the lock.
    pub heartbeats_to_lock: Vec<usize>,
    /// Attacks detected: milliseconds from the attack's first heartbeat to
    /// the lock, sorted.
    pub ms_to_lock: Vec<f64>,
}

/// An evaluation's results.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per class: in the order asked for (generated), or of first
    /// appearance (a corpus file).
    pub classes: Vec<ClassReport>,
    /// Heartbeats posted.
    pub heartbeats: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Which windows were sent: `seed-<seed>` or `corpus-<digest>`.
    pub windows: String,
    /// True when the server had seen these windows before (`--rerun`).
    pub rerun: bool,
}

/// Runs the evaluation and prints the report (Markdown table).
pub async fn run(options: SimulateOptions) -> anyhow::Result<()> {
    print!("{}", evaluate(&options).await?.to_markdown());
    Ok(())
}

/// Runs every class's sessions through the API and tallies them.
pub async fn evaluate(options: &SimulateOptions) -> anyhow::Result<Report> {
    let admin = connect(&options.url, &options.admin_key, options.force)?;
    let seed = options.seed.unwrap_or_else(rand::random);
    let (Loaded { labels, jobs }, windows) = match &options.corpus {
        Corpus::Generated(classes) => (
            Loaded {
                labels: classes.iter().map(|&c| Label::from(c)).collect(),
                jobs: classes
                    .iter()
                    .enumerate()
                    .flat_map(|(label, &class)| {
                        (0..options.sessions)
                            .map(move |index| (label, Job::Generated { class, index }))
                    })
                    .collect(),
            },
            format!("seed-{seed}"),
        ),
        Corpus::File(path) => {
            let (loaded, digest) = load(path)?;
            (loaded, format!("corpus-{digest}"))
        }
    };
    // The owner of the run's devices doubles as the record that this server
    // saw these windows: its external id names them, and creating it is
    // idempotent, so a second run of the same windows finds it.
    let owner = admin
        .ensure_user(&format!("{TAG}{windows}"), None)
        .await
        .context("creating the simulation's user")?;
    if !owner.created && !options.rerun {
        bail!(
            "{} already saw the windows of {windows} (a run with them is on record): its replay \
             checks would flag them and the report would be meaningless. Run with another \
             --seed (or none, for fresh windows), or with --rerun to measure exactly that.",
            options.url
        );
    }
    let user_id = owner.user_id;
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let started = Instant::now();
    let outcomes: Vec<anyhow::Result<Outcome>> = futures::stream::iter(jobs)
        .map(|job| run_session(&admin, options, seed, &user_id, run, job))
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    let outcomes: Vec<Outcome> = outcomes.into_iter().collect::<Result<_, _>>()?;
    let heartbeats: usize = outcomes.iter().map(|o| o.posted).sum();
    let classes = labels
        .into_iter()
        .enumerate()
        .map(|(label, class)| {
            let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.label == label).collect();
            let hits: Vec<&Outcome> = of
                .iter()
                .copied()
                .filter(|o| match (class.is_attack(), o.attack_start, o.locked_at) {
                    (true, Some(start), Some(at)) => at >= start && at < start + DETECTION_BUDGET,
                    (true, ..) => false,
                    (false, _, locked_at) => locked_at.is_some(),
                })
                .collect();
            let mut ms_to_lock: Vec<f64> = hits.iter().filter_map(|o| o.ms_to_lock).collect();
            ms_to_lock.sort_by(f64::total_cmp);
            ClassReport {
                class,
                sessions: of.len(),
                hits: hits.len(),
                heartbeats_to_lock: hits
                    .iter()
                    .filter_map(|o| Some(o.locked_at? + 1 - o.attack_start?))
                    .collect(),
                ms_to_lock,
            }
        })
        .collect();
    Ok(Report {
        classes,
        heartbeats,
        elapsed: started.elapsed(),
        windows,
        rerun: !owner.created,
    })
}

/// The admin API of `url`, refused unless it is on this machine or
/// `force` is given: a simulation creates users and devices and spends the
/// target's rate limits, which nobody wants on a server by accident.
fn connect(url: &str, admin_key: &str, force: bool) -> anyhow::Result<Admin> {
    let parsed = url::Url::parse(url).with_context(|| format!("the server URL {url}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback && !force {
        bail!(
            "{url} is not a loopback address: a simulation creates users and devices there. \
             Pass --force to run it against that server anyway."
        );
    }
    Ok(Client::new(url)?.admin(admin_key))
}

/// Deletes every simulated user of the server (those whose external id
/// starts with [`TAG`]) with their devices and sessions; how many.
pub async fn cleanup(url: &str, admin_key: &str, force: bool) -> anyhow::Result<usize> {
    let admin = connect(url, admin_key, force)?;
    let mut users = Vec::new();
    let mut cursor = None;
    loop {
        let page = admin
            .users(TAG, cursor.as_deref(), 200)
            .await
            .context("listing the simulated users")?;
        users.extend(page.items.into_iter().map(|u| u.user_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    for user_id in &users {
        match admin.delete_user(user_id).await {
            // Another cleanup got there first.
            Err(e) if e.code() == Some("user_not_found") => {}
            other => other.with_context(|| format!("deleting the simulated user {user_id}"))?,
        }
    }
    Ok(users.len())
}

impl Report {
    /// The summary line and the per-class Markdown table.
    pub fn to_markdown(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let sessions: usize = self.classes.iter().map(|c| c.sessions).sum();
        let mut out = format!("windows: {}", self.windows);
        if let Some(seed) = self.windows.strip_prefix("seed-") {
            out.push_str(&format!(" (again on a fresh server: --seed {seed})"));
        }
        out.push('\n');
        if self.rerun {
            out.push_str("warning: the server had seen these windows before (--rerun): replay checks apply\n");
        }
        out.push_str(&format!(
            "{sessions} sessions, {} heartbeats in {secs:.1} s ({:.0} heartbeats/s, each waiting for its score)\n\n",
            self.heartbeats,
            self.heartbeats as f64 / secs
        ));
        out.push_str("| class | sessions | locked | rate | 95% CI (Wilson) | heartbeats to lock (mean / max) | ms to lock (median) |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for c in &self.classes {
            let label = if c.class.is_attack() {
                "detected within 5"
            } else {
                "falsely locked"
            };
            let to_lock = &c.heartbeats_to_lock;
            let mean = if to_lock.is_empty() {
                "—".to_owned()
            } else {
                format!(
                    "{:.2} / {}",
                    to_lock.iter().sum::<usize>() as f64 / to_lock.len() as f64,
                    to_lock.iter().max().unwrap_or(&0)
                )
            };
            let median = c
                .ms_to_lock
                .get(c.ms_to_lock.len() / 2)
                .map_or("—".to_owned(), |m| format!("{m:.0}"));
            let (lo, hi) = wilson(c.hits, c.sessions, Z95);
            out.push_str(&format!(
                "| {} | {} | {} {label} | {:.2}% | {:.1}–{:.1}% | {mean} | {median} |\n",
                c.class.name(),
                c.sessions,
                c.hits,
                100.0 * c.hits as f64 / c.sessions.max(1) as f64,
                100.0 * lo,
                100.0 * hi,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(lines: &[String]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("corpus.jsonl");
        std::fs::write(&path, lines.join("\n")).expect("write");
        (dir, path)
    }

    fn line(class: Class, seed: u64) -> String {
        serde_json::to_string(&CorpusSession::from(&session(class, seed, 8))).expect("json")
    }

    #[test]
    fn a_corpus_is_loaded_per_label_in_order_of_appearance() {
        let (_dir, path) = corpus(&[
            line(Class::ReplayNoisy, 1),
            String::new(),
            line(Class::HeavyTremor, 2),
            line(Class::ReplayNoisy, 3),
        ]);
        let (Loaded { labels, jobs }, digest) = load(&path).expect("loads");
        assert_eq!(digest.len(), 16, "{digest}");
        assert_eq!(
            labels,
            [
                Label::from(Class::ReplayNoisy),
                Label::from(Class::HeavyTremor)
            ]
        );
        let numbers: Vec<(usize, usize)> = jobs
            .iter()
            .map(|(label, job)| match job {
                Job::Line { number, .. } => (*label, *number),
                Job::Generated { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(numbers, [(0, 1), (1, 3), (0, 4)]);
    }

    #[test]
    fn a_bad_corpus_line_is_refused_with_its_number() {
        let mixed = line(Class::HeavyTremor, 2).replace(
            r#""attack":false,"attack_start":null"#,
            r#""attack":true,"attack_start":2"#,
        );
        let unknown = line(Class::Bot, 1).replace(r#"{"class""#, r#"{"extra":1,"class""#);
        let mut no_start = CorpusSession::from(&session(Class::Bot, 1, 8));
        no_start.attack_start = None;
        let no_start = serde_json::to_string(&no_start).expect("json");
        for (lines, expected) in [
            (
                vec![line(Class::HeavyTremor, 1), mixed],
                ":2: class genuine/heavy_tremor mixes",
            ),
            (vec![unknown], ":1"),
            (vec![no_start], ":1: an attack needs an attack_start"),
            (vec!["{".to_owned()], ":1"),
            (vec![String::new()], "has no sessions"),
        ] {
            let (_dir, path) = corpus(&lines);
            let err = format!("{:#}", load(&path).err().expect("refused"));
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn the_table_carries_wilson_intervals() {
        let report = Report {
            classes: vec![ClassReport {
                class: Label::from(Class::RemoteControlHeld),
                sessions: 20,
                hits: 20,
                heartbeats_to_lock: vec![2; 20],
                ms_to_lock: vec![10.0; 20],
            }],
            heartbeats: 100,
            elapsed: Duration::from_secs(1),
            windows: "seed-9".to_owned(),
            rerun: false,
        };
        let table = report.to_markdown();
        assert!(
            table.contains("| attack/remote_control_held | 20 | 20 detected within 5 | 100.00% | 83.9–100.0% | 2.00 / 2 | 10 |"),
            "{table}"
        );
    }
}
