//! HTTP benchmarks: agent-bus `/send` throughput, long-poll delivery
//! latency, and SSE-interop fan-out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// `messages` durable `/send`s from `clients` concurrent keep-alive clients.
pub(super) async fn send_throughput(url: &str, messages: u64, clients: u64) -> Result<()> {
    let http = reqwest::Client::new();
    let per_client = messages / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url) = (http.clone(), format!("{url}/send"));
        tasks.push(tokio::spawn(async move {
            for n in 0..per_client {
                let body = json!({ "from": format!("bench-http-{c}"), "to": "bench-http-sink", "msg": format!("{c}-{n}") });
                let resp = http.post(&url).json(&body).send().await?;
                if !resp.status().is_success() {
                    bail!("/send answered {}", resp.status());
                }
                resp.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total = per_client * clients;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "http /send: {total} durable messages, {clients} concurrent keep-alive clients\n  \
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
    let delivered = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for i in 0..subscribers {
        let resp = http
            .get(format!("{url}/subscribe"))
            .query(&[("agent", format!("bench-fan-{tag}-{i}"))])
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/subscribe answered {}", resp.status());
        }
        let (delivered, marker) = (delivered.clone(), marker.clone());
        streams.push(tokio::spawn(async move {
            let mut resp = resp;
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = delivered.load(Ordering::Relaxed);
    for s in streams {
        s.abort();
    }
    if got < expected {
        bail!("SSE fan-out: only {got} of {expected} deliveries arrived");
    }
    println!(
        "sse fan-out: {rounds} broadcasts x {subscribers} /subscribe streams\n  \
         {:>9.0} deliveries/s ({got} in {elapsed:.2} s)",
        got as f64 / elapsed
    );
    Ok(())
}
