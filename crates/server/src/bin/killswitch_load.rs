//! `killswitch-load`: load and latency measurement for the kill-switch.
//!
//! Against one or two running servers (two sharing PostgreSQL + Redis), it
//! mints device sessions through the admin API, opens N authenticated
//! sockets, and measures:
//! * server memory per idle socket (VmRSS of `--server-pid` before/after),
//! * global fan-out time (admin call → the last socket receives it),
//! * lock latency (admin lock → that device's socket receives it), p50/p95/p99.
//!
//! Sockets are opened on `--socket-url` (default `--url`); commands are sent
//! through `--url`, so two URLs measure delivery across instances.
//! See docs/BENCHMARKS.md for the commands and results.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

#[derive(Debug, Parser)]
#[command(about = "Kill-switch load: memory per socket, fan-out, lock latency")]
struct Args {
    /// Server that receives the admin commands.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Server the sockets connect to (default: --url).
    #[arg(long)]
    socket_url: Option<String>,
    /// Admin API key.
    #[arg(long, env = "BLOCKREMOTE_ADMIN_TOKEN")]
    admin_key: String,
    /// Sockets to open.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Lock round trips to time.
    #[arg(long, default_value_t = 200)]
    locks: usize,
    /// PID of the socket server, to read its memory (Linux).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Do not ack commands (isolates the server's fan-out cost from ack traffic).
    #[arg(long)]
    no_ack: bool,
    /// Requests in flight while minting sessions and opening sockets.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A lock seen by a socket: (device index, when).
type Seen = (usize, Instant);

/// The fields of a command the client needs; borrowed, so a socket task
/// allocates only its ack (the tool shares the cores with the server).
#[derive(serde::Deserialize)]
struct Command<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(borrow, default)]
    reason: &'a str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket_url = args.socket_url.clone().unwrap_or_else(|| args.url.clone());
    let http = reqwest::Client::builder().no_proxy().build()?;
    let run = uuid::Uuid::new_v4().simple().to_string();

    // One user, N devices minted through the admin API (no password hashing per device).
    let register = http
        .post(format!("{}/v1/auth/register", args.url))
        .json(&json!({"email": format!("load-{run}@example.com"), "password": "load-test-password",
            "device_id": format!("ld{}x0", &run[..12]), "device_fingerprint": "load", "platform": "android"}))
        .send()
        .await?;
    if !register.status().is_success() {
        bail!("register failed: {}", register.text().await?);
    }
    let user_id = register.json::<Value>().await?["user_id"]
        .as_str()
        .context("user_id")?
        .to_owned();
    let started = Instant::now();
    let tokens: Vec<(String, String)> = futures::stream::iter(0..args.sockets)
        .map(|i| {
            let http = http.clone();
            let (url, key, user) = (args.url.clone(), args.admin_key.clone(), user_id.clone());
            let device = format!("ld{}d{i}", &run[..12]);
            async move {
                let r = http
                    .post(format!("{url}/v1/admin/sessions"))
                    .bearer_auth(key)
                    .json(&json!({"user_id": user, "device_id": device, "device_fingerprint": "load", "platform": "android"}))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("session mint failed: {}", r.text().await?);
                }
                let token = r.json::<Value>().await?["access_token"].as_str().context("token")?.to_owned();
                Ok::<_, anyhow::Error>((device, token))
            }
        })
        .buffered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    println!(
        "minted {} device sessions in {:.1} s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );

    let before = args.server_pid.map(rss_kib).transpose()?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    // Global receipts are stamped into a slot per socket (nanoseconds after
    // `base`, 0 = not yet) rather than sent to the collector, so 10 000
    // arrivals cost no cross-thread wake-ups on the cores the server uses.
    let base = Instant::now();
    let global_seen: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.sockets).map(|_| AtomicU64::new(0)).collect());
    let ws_base = socket_url.replacen("http", "ws", 1);
    let started = Instant::now();
    let opened: Vec<()> = futures::stream::iter(tokens.iter().enumerate())
        .map(|(i, (_, token))| {
            let url = format!("{ws_base}/v1/security/kill-switch");
            let token = token.clone();
            let seen = seen_tx.clone();
            let global_seen = global_seen.clone();
            let ack = !args.no_ack;
            async move {
                let mut request = url.into_client_request()?;
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
                let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
                // The first message is the state.
                socket.next().await.context("state")??;
                tokio::spawn(async move {
                    while let Some(Ok(message)) = socket.next().await {
                        if let Message::Text(text) = message {
                            let now = Instant::now();
                            if let Ok(command) = serde_json::from_str::<Command>(&text) {
                                let ack_message =
                                    format!(r#"{{"type":"ack","id":"{}"}}"#, command.id);
                                match command.reason {
                                    "load_test" => {
                                        let nanos = u64::try_from((now - base).as_nanos())
                                            .unwrap_or(u64::MAX);
                                        let _ = global_seen[i].compare_exchange(
                                            0,
                                            nanos.max(1),
                                            Ordering::Relaxed,
                                            Ordering::Relaxed,
                                        );
                                    }
                                    "load_lock" => {
                                        let _ = seen.send((i, now));
                                    }
                                    _ => {}
                                }
                                if ack {
                                    let _ = socket.send(Message::Text(ack_message.into())).await;
                                }
                            }
                        }
                    }
                });
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    println!(
        "opened {} sockets in {:.1} s",
        opened.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(pid), Some(before)) = (args.server_pid, before) {
        let after = rss_kib(pid)?;
        let per_socket = (after.saturating_sub(before)) as f64 * 1024.0 / args.sockets as f64;
        println!(
            "server RSS {before} KiB -> {after} KiB: {:.1} KiB per idle authenticated socket",
            per_socket / 1024.0
        );
    }

    // Global fan-out.
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/v1/admin/kill-switch/global", args.url))
        .bearer_auth(&args.admin_key)
        .json(&json!({"action": "FORCE_OVERLAY", "reason": "load_test"}))
        .send()
        .await?;
    if r.status() != reqwest::StatusCode::ACCEPTED {
        bail!("global failed: {}", r.text().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = global_seen
            .iter()
            .filter(|n| n.load(Ordering::Relaxed) != 0)
            .count();
        if count == args.sockets {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {count} of {} sockets received the global command",
                args.sockets
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut arrivals: Vec<Duration> = global_seen
        .iter()
        .map(|n| {
            (base + Duration::from_nanos(n.load(Ordering::Relaxed))).saturating_duration_since(t0)
        })
        .collect();
    arrivals.sort();
    let last = t0 + arrivals.last().copied().unwrap_or_default();
    println!(
        "global fan-out to {} sockets: last received after {:.1} ms (p50 {:.1} ms)",
        args.sockets,
        (last - t0).as_secs_f64() * 1000.0,
        percentile(&arrivals, 50.0).as_secs_f64() * 1000.0
    );

    // Lock latency, one device at a time.
    let shared = Arc::new(tokens);
    let mut latencies = Vec::with_capacity(args.locks);
    for i in 0..args.locks.min(shared.len()) {
        let (device, _) = &shared[i];
        let t0 = Instant::now();
        let r = http
            .post(format!("{}/v1/admin/devices/{device}/lock", args.url))
            .bearer_auth(&args.admin_key)
            .json(&json!({"action": "CRITICAL_LOCK", "reason": "load_lock"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("lock failed: {}", r.text().await?);
        }
        loop {
            let Ok(Some((j, at))) =
                tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await
            else {
                bail!("lock {i} was not received");
            };
            if j == i {
                latencies.push(at - t0);
                break;
            }
        }
    }
    latencies.sort();
    println!(
        "lock -> device receipt over {} locks: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 95.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    Ok(())
}
