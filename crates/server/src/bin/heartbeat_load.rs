//! `heartbeat-load`: ingestion throughput and latency under load.
//!
//! Registers one user, upgrades it to the `paid` plan with a signed billing
//! webhook (1 200 requests/min per device), mints `--devices` device
//! sessions through the admin API, then keeps `--connections` requests in
//! flight, each device sending realistic ~8 KB heartbeats (100
//! accelerometer + 100 gyroscope samples, touches, network, context) with
//! increasing `seq`, for `--seconds`. Reports heartbeats/s, latency
//! percentiles and every non-202 status. See docs/BENCHMARKS.md.

use std::{
    collections::BTreeMap,
    io::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use blockremote_engine::sim::{load_heartbeat, Class};
use clap::Parser;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Debug, Parser)]
#[command(about = "Heartbeat ingestion load: throughput and latency")]
struct Args {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Admin API key.
    #[arg(long, env = "BLOCKREMOTE_ADMIN_TOKEN", hide_env_values = true)]
    admin_key: String,
    /// A billing webhook secret the server accepts (to put the user on `paid`).
    #[arg(long, env = "BLOCKREMOTE_WEBHOOK_SECRETS", hide_env_values = true)]
    webhook_secret: String,
    /// Devices sending.
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Duration of the measured run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Threads driving the connections (one single-threaded runtime each).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What every connection of the measured run shares.
#[derive(Clone)]
struct Shared {
    addr: String,
    tokens: Arc<Vec<(String, String)>>,
    bodies: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    next_device: Arc<AtomicU64>,
    seqs: Arc<Vec<AtomicU64>>,
}

/// Latencies of the 202s (µs) and a count of every status (0: I/O error).
#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
    }
}

/// One keep-alive connection sending heartbeats until told to stop.
async fn connection(shared: Shared) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut stream = None;
    let mut request = Vec::with_capacity(8 * 1024);
    let mut response = Vec::with_capacity(1024);
    while !shared.stop.load(Ordering::Relaxed) {
        let i = (shared.next_device.fetch_add(1, Ordering::Relaxed) as usize) % shared.tokens.len();
        let (device, token) = &shared.tokens[i];
        let seq = shared.seqs[i].fetch_add(1, Ordering::Relaxed) + 1;
        let body = format!(
            "{{\"seq\":{seq},\"accelerometer\":[[0,{:.3},{:.3},9.8],{}",
            0.1 + i as f64 * 1e-3,
            0.2 + (seq % 100_000) as f64 * 1e-3,
            shared.bodies[(seq as usize) % shared.bodies.len()]
        );
        request.clear();
        write!(
            request,
            "POST /v1/signals/heartbeat HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\n\
             x-device-id: {device}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            shared.addr,
            body.len()
        )?;
        request.extend_from_slice(body.as_bytes());
        let t0 = Instant::now();
        if stream.is_none() {
            let s = TcpStream::connect(&shared.addr).await?;
            s.set_nodelay(true)?;
            stream = Some(s);
        }
        let Some(s) = stream.as_mut() else { continue };
        let status = match exchange(s, &request, &mut response).await {
            Ok((status, keep_alive)) => {
                if !keep_alive {
                    stream = None;
                }
                status
            }
            Err(_) => {
                stream = None;
                0
            }
        };
        let micros = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        *tally.statuses.entry(status).or_default() += 1;
        if status == 202 {
            tally.latencies.push(micros);
        }
    }
    Ok(tally)
}

/// Writes `request` and reads one response; its status and whether the
/// connection stays open.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, bool)> {
    stream.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("a status line")?;
    let mut length = 0usize;
    let mut keep_alive = true;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse()?;
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                keep_alive = false;
            }
        }
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, keep_alive))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = args
        .webhook_secret
        .split(',')
        .next()
        .context("a webhook secret")?
        .to_owned();
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let run = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let r = http
        .post(format!("{}/v1/auth/register", args.url))
        .json(&json!({"email": format!("load-{run}@example.com"), "password": "load-test-password",
            "device_id": format!("hl{run}owner"), "device_fingerprint": "load", "platform": "android"}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("register failed: {}", r.text().await?);
    }
    let user_id = r.json::<Value>().await?["user_id"]
        .as_str()
        .context("user_id")?
        .to_owned();
    // Upgrade to paid with a signed webhook.
    let now = chrono::Utc::now().timestamp();
    let event =
        json!({"id": format!("evt_load_{run}"), "type": "subscription.activated", "created": now,
        "data": {"user_id": user_id, "plan": "paid"}})
        .to_string();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())?;
    mac.update(format!("{now}.{event}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let r = http
        .post(format!("{}/v1/billing/webhook", args.url))
        .header("content-type", "application/json")
        .header("x-signature", format!("t={now},v1={signature}"))
        .body(event)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("upgrade webhook failed: {}", r.text().await?);
    }

    // Sessions.
    use futures::StreamExt;
    let tokens: Vec<(String, String)> = futures::stream::iter(0..args.devices)
        .map(|i| {
            let (http, url, key, user) = (http.clone(), args.url.clone(), args.admin_key.clone(), user_id.clone());
            let device = format!("hl{run}d{i}");
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
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    // Bodies: realistic windows (values to 4 decimals, as phones send),
    // each request made unique — the engine locks replayed windows — by
    // splicing `seq` and a first accelerometer sample that encodes the
    // device and the seq in front of a pre-serialised remainder.
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..32u64)
            .map(|i| {
                let mut hb = load_heartbeat(Class::HeldInHand, i);
                hb.accelerometer.remove(0);
                let mut v = serde_json::to_value(&hb).expect("json");
                v.as_object_mut().expect("object").remove("seq");
                v["sent_at"] = json!(chrono::Utc::now().to_rfc3339());
                let text = v.to_string();
                // `{"accelerometer":[` is first (keys sorted); keep what follows.
                text.strip_prefix("{\"accelerometer\":[")
                    .expect("accelerometer first")
                    .to_owned()
            })
            .collect(),
    );
    let size = bodies.iter().map(String::len).sum::<usize>() / bodies.len();
    println!(
        "{} devices on plan paid, heartbeats of ~{} bytes, {} in flight, {} s",
        tokens.len(),
        size + 40,
        args.connections,
        args.seconds
    );

    // The measured run: raw HTTP/1.1 keep-alive connections, like wrk, so
    // the tool spends as little of the two cores as it can (no HTTP client
    // stack, request bytes assembled into one reused buffer). `--threads`
    // single-threaded runtimes share the connections.
    let target = url::Url::parse(&args.url)?;
    let addr = format!(
        "{}:{}",
        target.host_str().context("a host in --url")?,
        target.port_or_known_default().context("a port in --url")?
    );
    let tokens = Arc::new(tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let next_device = Arc::new(AtomicU64::new(0));
    let seqs: Arc<Vec<AtomicU64>> =
        Arc::new((0..tokens.len()).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    let threads = args.threads.clamp(1, args.connections.max(1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let connections = args.connections / threads + usize::from(t < args.connections % threads);
        let shared = Shared {
            addr: addr.clone(),
            tokens: tokens.clone(),
            bodies: bodies.clone(),
            stop: stop.clone(),
            next_device: next_device.clone(),
            seqs: seqs.clone(),
        };
        handles.push(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..connections {
                    set.spawn(connection(shared.clone()));
                }
                let mut out = Tally::default();
                while let Some(result) = set.join_next().await {
                    out.merge(result??);
                }
                Ok::<_, anyhow::Error>(out)
            })
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut tally = Tally::default();
    for handle in handles {
        let result = tokio::task::spawn_blocking(move || handle.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        tally.merge(result?);
    }
    let Tally {
        mut latencies,
        statuses,
    } = tally;
    latencies.sort_unstable();
    println!(
        "accepted {} heartbeats in {:.1} s: {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; statuses {:?}",
        latencies.len(),
        elapsed,
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 100.0),
        statuses
    );
    Ok(())
}
