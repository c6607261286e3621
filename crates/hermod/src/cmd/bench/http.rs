//! HTTP benchmarks: agent-bus `/send` throughput, long-poll delivery
//! latency, and SSE-interop fan-out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// `requests` requests from `clients` concurrent keep-alive clients, one
/// in flight each; client `c`'s `n`-th request is `make(&http, c, n)`.
/// Returns the requests made and the seconds they took.
async fn closed_loop<F>(clients: u64, requests: u64, make: F) -> Result<(u64, f64)>
where
    F: Fn(&reqwest::Client, u64, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let (http, make) = (reqwest::Client::new(), Arc::new(make));
    let per_client = requests / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, make) = (http.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..per_client {
                let resp = make(&http, c, n).send().await?;
                if !resp.status().is_success() {
                    bail!("{} answered {}", resp.url().path(), resp.status());
                }
                resp.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per_client * clients, start.elapsed().as_secs_f64()))
}

/// `messages` durable `/send`s from `clients` concurrent keep-alive clients,
/// then the same clients on `GET /healthz` (no storage, no routing): the
/// ceiling this machine and client put on any HTTP request rate.
pub(super) async fn send_throughput(url: &str, messages: u64, clients: u64) -> Result<()> {
    let send = format!("{url}/send");
    let (total, elapsed) = closed_loop(clients, messages, move |http, c, n| {
        let body = json!({ "from": format!("bench-http-{c}"), "to": "bench-http-sink", "msg": format!("{c}-{n}") });
        http.post(&send).json(&body)
    })
    .await?;
    println!(
        "http /send: {total} durable messages, {clients} concurrent keep-alive clients\n  \
         {:>9.0} msgs/s ({elapsed:.2} s)",
        total as f64 / elapsed
    );
    let health = format!("{url}/healthz");
    let (total, elapsed) =
        closed_loop(clients, messages, move |http, _, _| http.get(&health)).await?;
    println!(
        "http GET /healthz (no-op ceiling): {total} requests, same {clients} clients\n  \
         {:>9.0} req/s ({elapsed:.2} s)",
        total as f64 / elapsed
    );
    Ok(())
}

/// Batch ingest: `messages` durable messages as `POST /v1/messages`
/// arrays of `batch`, from `clients` concurrent keep-alive clients.
pub(super) async fn batch_ingest(url: &str, messages: u64, clients: u64, batch: u64) -> Result<()> {
    let send = format!("{url}/v1/messages");
    let (requests, elapsed) = closed_loop(clients, messages / batch, move |http, c, n| {
        let body: Vec<Value> = (0..batch)
            .map(|i| {
                json!({ "from": format!("bench-batch-{c}"), "to": "bench-batch-sink",
                             "body": { "n": n * batch + i } })
            })
            .collect();
        http.post(&send).json(&body)
    })
    .await?;
    let total = requests * batch;
    println!(
        "http POST /v1/messages arrays of {batch}: {total} durable messages, {clients} clients\n  \
         {:>9.0} msgs/s ({elapsed:.2} s)",
        total as f64 / elapsed
    );
    Ok(())
}

/// A `/recv?block=true` loop woken by `/send`s every 5 ms: send → return.
pub(super) async fn long_poll_latency(url: &str, samples: usize) -> Result<()> {
    let http = reqwest::Client::new();
    let epoch = Instant::now();
    let agent = format!("bench-lp-{}", std::process::id());
    let receiver = {
        let (http, url, agent) = (http.clone(), url.to_owned(), agent.clone());
        tokio::spawn(async move {
            let mut since = 0.0f64;
            let mut latencies = Vec::with_capacity(samples);
            while latencies.len() < samples {
                let page: Value = http
                    .get(format!("{url}/recv"))
                    .query(&[
                        ("to", agent.as_str()),
                        ("block", "true"),
                        ("since", &since.to_string()),
                    ])
                    .send()
                    .await?
                    .json()
                    .await?;
                let arrived = epoch.elapsed().as_nanos() as u64;
                for m in page["messages"].as_array().into_iter().flatten() {
                    let sent: u64 = m["msg"].as_str().unwrap_or("0").parse()?;
                    latencies.push(arrived - sent);
                    since = since.max(m["ts"].as_f64().unwrap_or(since));
                }
                since = since.max(page["now"].as_f64().unwrap_or(since));
            }
            anyhow::Ok(latencies)
        })
    };
    // Let the first long-poll park before the first send.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for _ in 0..samples {
        tick.tick().await;
        let sent = epoch.elapsed().as_nanos() as u64;
        let body = json!({ "from": "bench-lp-src", "to": agent, "msg": sent.to_string() });
        http.post(format!("{url}/send"))
            .json(&body)
            .send()
            .await?
            .bytes()
            .await?;
    }
    let latencies = tokio::time::timeout(Duration::from_secs(60), receiver).await???;
    println!("long-poll: {samples} messages, one every 5 ms, /send -> blocked /recv returns");
    super::report("  send -> delivered", latencies);
    Ok(())
}

/// Opens one SSE stream per request and counts, across all of them, the
/// events whose text contains `marker`.
async fn counting_streams(
    requests: Vec<reqwest::RequestBuilder>,
    marker: String,
) -> Result<(Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>)> {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for request in requests {
        let mut resp = request.send().await?;
        if !resp.status().is_success() {
            bail!("stream answered {}", resp.status());
        }
        let (delivered, marker) = (delivered.clone(), marker.clone());
        streams.push(tokio::spawn(async move {
            let mut pending = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find("\n\n") {
                    if pending[..end].contains(&marker) {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    pending.drain(..end + 2);
                }
            }
        }));
    }
    Ok((delivered, streams))
}

/// Waits (up to 2 minutes) for `expected` deliveries; returns the seconds
/// since `start`, or an error naming the shortfall.
async fn await_deliveries(
    delivered: &AtomicU64,
    expected: u64,
    start: Instant,
    what: &str,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    if got < expected {
        bail!("{what}: only {got} of {expected} deliveries arrived");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `subscribers` SSE streams; `rounds` broadcasts; every delivery counted.
pub(super) async fn sse_fanout(url: &str, subscribers: usize, rounds: usize) -> Result<()> {
    let http = reqwest::Client::new();
    let tag = std::process::id();
    let source = format!("bench-fan-src-{tag}");
    // The broadcaster must be a known agent: one poll makes it one.
    http.get(format!("{url}/poll"))
        .query(&[("agent", &source)])
        .send()
        .await?
        .bytes()
        .await?;
    let marker = format!("bench-fan-mark-{tag}");
    let requests = (0..subscribers)
        .map(|i| {
            http.get(format!("{url}/subscribe"))
                .query(&[("agent", format!("bench-fan-{tag}-{i}"))])
        })
        .collect();
    let (delivered, streams) = counting_streams(requests, marker.clone()).await?;
    let expected = (subscribers * rounds) as u64;
    let start = Instant::now();
    for round in 0..rounds {
        let resp = http
            .post(format!("{url}/broadcast"))
            .query(&[("from", &source)])
            .json(&json!({ "mark": marker, "round": round }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/broadcast answered {}", resp.status());
        }
        resp.bytes().await?;
    }
    let elapsed = await_deliveries(&delivered, expected, start, "SSE fan-out").await;
    streams.iter().for_each(|s| s.abort());
    let elapsed = elapsed?;
    println!(
        "sse fan-out: {rounds} broadcasts x {subscribers} /subscribe streams\n  \
         {:>9.0} deliveries/s ({expected} in {elapsed:.2} s)",
        expected as f64 / elapsed
    );
    Ok(())
}

/// `subscribers` `/v1/events?pattern=` streams; `events` topic events.
pub(super) async fn pattern_fanout(url: &str, subscribers: usize, events: usize) -> Result<()> {
    let http = reqwest::Client::new();
    let tag = std::process::id();
    let marker = format!("bench-topic-mark-{tag}");
    let requests = (0..subscribers)
        .map(|i| {
            // A mix of pattern shapes, all matching `bench.<tag>.tool.start`.
            let pattern = match i % 3 {
                0 => format!("bench.{tag}.**"),
                1 => format!("bench.{tag}.*.start"),
                _ => "**".to_owned(),
            };
            http.get(format!("{url}/v1/events"))
                .query(&[("pattern", pattern)])
        })
        .collect();
    let (delivered, streams) = counting_streams(requests, marker.clone()).await?;
    let expected = (subscribers * events) as u64;
    let start = Instant::now();
    for n in 0..events {
        let body = json!({ "topic": format!("bench.{tag}.tool.start"), "payload": { "mark": marker, "n": n } });
        let resp = http
            .post(format!("{url}/v1/events"))
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/v1/events answered {}", resp.status());
        }
        resp.bytes().await?;
    }
    let elapsed = await_deliveries(&delivered, expected, start, "topic fan-out").await;
    streams.iter().for_each(|s| s.abort());
    let elapsed = elapsed?;
    println!(
        "topic fan-out: {events} events x {subscribers} /v1/events pattern streams\n  \
         {:>9.0} deliveries/s ({expected} in {elapsed:.2} s)",
        expected as f64 / elapsed
    );
    Ok(())
}
