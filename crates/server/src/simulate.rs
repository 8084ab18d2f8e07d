//! `blockremote simulate`: synthetic device sessions driven through the real
//! HTTP API, as a labelled evaluation and as load.
//!
//! For each class of [`blockremote_engine::sim::Class`] it runs N sessions
//! (genuine use, and attacks that begin after a genuine prefix): one user,
//! one device session minted per simulated device through the admin API,
//! heartbeats posted in order at the device's pace — each waits until the
//! previous one was scored (`last_seq` in the trust report), as a phone
//! sending one every two seconds would. A device is locked when its API
//! calls are refused with 403 `device_locked`. Reported per class: attacks
//! locked within 5 heartbeats of the attack's start, genuine sessions ever
//! locked, heartbeats and milliseconds from the attack's first heartbeat to
//! the lock.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use blockremote_engine::sim::{session, session_seed, Class, DETECTION_BUDGET};
use futures::StreamExt;
use serde_json::{json, Value};

/// What to run.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Server base URL.
    pub url: String,
    /// Admin API key (mints the device sessions).
    pub admin_key: String,
    /// Sessions per class.
    pub sessions: usize,
    /// Heartbeats per session.
    pub length: usize,
    /// Seed of the corpus.
    pub seed: u64,
    /// Sessions in flight at once.
    pub concurrency: usize,
}

/// One session's outcome.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    class: Class,
    attack_start: Option<usize>,
    /// Index of the heartbeat after which the device was found locked.
    locked_at: Option<usize>,
    /// Milliseconds from the attack's first heartbeat to the lock.
    ms_to_lock: Option<f64>,
}

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    async fn mint(
        &self,
        admin_key: &str,
        user_id: &str,
        device_id: &str,
    ) -> anyhow::Result<String> {
        let r = self
            .http
            .post(format!("{}/v1/admin/sessions", self.url))
            .bearer_auth(admin_key)
            .json(&json!({"user_id": user_id, "device_id": device_id,
                "device_fingerprint": format!("sim-{device_id}"), "platform": "android"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("minting a session failed: {}", r.text().await?);
        }
        Ok(r.json::<Value>().await?["access_token"]
            .as_str()
            .context("access_token")?
            .to_owned())
    }

    /// The device's `last_seq`, or `None` once it is locked.
    async fn last_seq(&self, token: &str, device_id: &str) -> anyhow::Result<Option<u64>> {
        let r = self
            .http
            .get(format!("{}/v1/security/trust-score", self.url))
            .bearer_auth(token)
            .header("x-device-id", device_id)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::FORBIDDEN {
            return Ok(None);
        }
        if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // The device's own budget (trial: 120/min) also pays for polls.
            tokio::time::sleep(retry_after(&r)).await;
            return Ok(Some(0));
        }
        if !r.status().is_success() {
            bail!("trust-score answered {}", r.status());
        }
        Ok(Some(
            r.json::<Value>().await?["last_seq"].as_u64().unwrap_or(0),
        ))
    }
}

fn retry_after(r: &reqwest::Response) -> Duration {
    let secs = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, 60))
}

async fn run_session(
    client: &Client,
    options: &SimulateOptions,
    user_id: &str,
    run: &str,
    class: Class,
    index: usize,
) -> anyhow::Result<Outcome> {
    let s = session(
        class,
        session_seed(options.seed, class, index),
        options.length,
    );
    let device_id = format!("sim{run}{:02}x{index:05}", class as u8);
    let token = client.mint(&options.admin_key, user_id, &device_id).await?;
    let mut outcome = Outcome {
        class,
        attack_start: s.attack_start,
        locked_at: None,
        ms_to_lock: None,
    };
    let mut attack_began = None;
    for (i, hb) in s.heartbeats.iter().enumerate() {
        if Some(i) == s.attack_start {
            attack_began = Some(Instant::now());
        }
        let mut body = serde_json::to_value(hb)?;
        body["sent_at"] = json!(chrono::Utc::now().to_rfc3339());
        let status = loop {
            let r = client
                .http
                .post(format!("{}/v1/signals/heartbeat", client.url))
                .bearer_auth(&token)
                .header("x-device-id", &device_id)
                .json(&body)
                .send()
                .await?;
            match r.status() {
                // Not accepted, so its seq is unspent: wait and send it again.
                reqwest::StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(retry_after(&r)).await,
                reqwest::StatusCode::ACCEPTED | reqwest::StatusCode::FORBIDDEN => break r.status(),
                status => bail!("heartbeat answered {status}: {}", r.text().await?),
            }
        };
        if status == reqwest::StatusCode::FORBIDDEN {
            outcome.locked_at = Some(i.saturating_sub(1));
            break;
        }
        // Wait until it was scored (or the device got locked).
        tokio::time::sleep(Duration::from_millis(3)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.last_seq(&token, &device_id).await? {
                None => {
                    outcome.locked_at = Some(i);
                    break;
                }
                Some(seq) if seq >= hb.seq => break,
                Some(_) if Instant::now() > deadline => {
                    bail!("heartbeat {} not scored in 10 s", hb.seq)
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
    pub class: Class,
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
    /// Per class, in [`Class::ALL`] order.
    pub classes: Vec<ClassReport>,
    /// Heartbeats posted.
    pub heartbeats: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Runs the evaluation and prints the report (Markdown table).
pub async fn run(options: SimulateOptions) -> anyhow::Result<()> {
    print!("{}", evaluate(&options).await?.to_markdown());
    Ok(())
}

/// Runs every class's sessions through the API and tallies them.
pub async fn evaluate(options: &SimulateOptions) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let client = Client {
        http,
        url: options.url.trim_end_matches('/').to_owned(),
    };
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let r = client
        .http
        .post(format!("{}/v1/auth/register", client.url))
        .json(&json!({"email": format!("simulate-{run}@example.com"), "password": "simulated-owner-password",
            "device_id": format!("sim{run}owner"), "device_fingerprint": "sim-owner", "platform": "android"}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "registering the simulation user failed: {}",
            r.text().await?
        );
    }
    let user_id = r.json::<Value>().await?["user_id"]
        .as_str()
        .context("user_id")?
        .to_owned();
    let started = Instant::now();
    let jobs: Vec<(Class, usize)> = Class::ALL
        .iter()
        .flat_map(|&c| (0..options.sessions).map(move |i| (c, i)))
        .collect();
    let outcomes: Vec<anyhow::Result<Outcome>> = futures::stream::iter(jobs)
        .map(|(class, i)| run_session(&client, options, &user_id, run, class, i))
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    let outcomes: Vec<Outcome> = outcomes.into_iter().collect::<Result<_, _>>()?;
    let heartbeats: usize = outcomes
        .iter()
        .map(|o| o.locked_at.map_or(options.length, |i| i + 1))
        .sum();
    let classes = Class::ALL
        .iter()
        .map(|&class| {
            let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.class == class).collect();
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
    })
}

impl Report {
    /// The summary line and the per-class Markdown table.
    pub fn to_markdown(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let sessions: usize = self.classes.iter().map(|c| c.sessions).sum();
        let mut out = format!(
            "{sessions} sessions, {} heartbeats in {secs:.1} s ({:.0} heartbeats/s, each waiting for its score)\n\n",
            self.heartbeats,
            self.heartbeats as f64 / secs
        );
        out.push_str("| class | sessions | locked | rate | heartbeats to lock (mean / max) | ms to lock (median) |\n");
        out.push_str("|---|---|---|---|---|---|\n");
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
            out.push_str(&format!(
                "| {} | {} | {} {label} | {:.2}% | {mean} | {median} |\n",
                c.class.name(),
                c.sessions,
                c.hits,
                100.0 * c.hits as f64 / c.sessions.max(1) as f64,
            ));
        }
        out
    }
}
