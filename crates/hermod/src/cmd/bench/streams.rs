//! `hermod bench --streams N`: idle connections at scale. Opens `N`
//! interop `/subscribe` streams (one agent each, the same names every
//! cycle, as agents that reconnect), reports how long they took to open
//! and what the daemon's resident memory was idle, with them open and
//! after they closed, cycle after cycle; with them open, the latency of
//! other clients' sends.
//!
//! The streams are raw TCP connections that send one request and read the
//! response head, then sit idle: the client costs little, so the figures
//! are the daemon's.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Streams being opened at once.
const OPENING: usize = 256;

/// The resident memory of process `pid`, in bytes (`VmRSS`).
pub(crate) fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no VmRSS in /proc/<pid>/status")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Opens one `/subscribe` stream for `agent` and reads its response head.
async fn open(addr: &str, agent: &str) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /subscribe?agent={agent} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || head.len() > 16 << 10 {
            bail!("the stream of {agent} closed before its response head");
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        let line = String::from_utf8_lossy(&head);
        bail!("/subscribe answered {}", line.lines().next().unwrap_or(""));
    }
    Ok(tcp)
}

/// How many agent connections the daemon reports over `transport`.
async fn connections(http: &reqwest::Client, url: &str, transport: &str) -> Result<u64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let prefix = format!("hermod_connections{{transport=\"{transport}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// `streams` idle `/subscribe` streams, opened and closed `cycles` times,
/// against the daemon at `url` (whose resident memory is read when its
/// `pid` is known).
pub(super) async fn idle_streams(
    url: &str,
    pid: Option<u32>,
    streams: usize,
    cycles: usize,
) -> Result<()> {
    if let Err(e) = hermod_server::http::listener::raise_fd_limit() {
        eprintln!("cannot raise the file descriptor limit: {e}");
    }
    let addr = url
        .strip_prefix("http://")
        .context("--url must be http://HOST:PORT")?
        .trim_end_matches('/')
        .to_owned();
    let http = reqwest::Client::new();
    let tag = std::process::id();
    let show = |label: &str| match pid.map(rss) {
        Some(Ok(bytes)) => {
            println!("  rss {label}: {:.1} MiB", mib(bytes));
            Some(bytes)
        }
        _ => None,
    };
    println!("idle streams: {streams} interop /subscribe streams, {cycles} cycle(s)");
    let idle = show("idle");
    for cycle in 1..=cycles {
        let start = Instant::now();
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(OPENING));
        let mut tasks = Vec::with_capacity(streams);
        for i in 0..streams {
            let (addr, limit) = (addr.clone(), limit.clone());
            tasks.push(tokio::spawn(async move {
                let _opening = limit.acquire_owned().await?;
                open(&addr, &format!("bench-idle-{tag}-{i}")).await
            }));
        }
        let mut open_streams = Vec::with_capacity(streams);
        for t in tasks {
            open_streams.push(t.await??);
        }
        let opened = start.elapsed().as_secs_f64();
        println!("cycle {cycle}: {streams} streams open in {opened:.2} s");
        let with_streams = show("with the streams open");
        // Other clients meanwhile: 500 durable sends, one at a time.
        let mut nanos = Vec::with_capacity(500);
        let send = format!("{url}/v1/messages");
        for n in 0..500 {
            let body = serde_json::json!({"from": "bench-idle-sender", "to": "bench-idle-sink", "body": {"n": n}});
            let t = Instant::now();
            let resp = http.post(&send).json(&body).send().await?;
            if !resp.status().is_success() {
                bail!("/v1/messages answered {}", resp.status());
            }
            resp.bytes().await?;
            nanos.push(t.elapsed().as_nanos() as u64);
        }
        super::report(
            "  POST /v1/messages meanwhile (500 sends, one at a time)",
            nanos,
        );
        drop(open_streams);
        // Closed when the daemon has let every one of them go.
        let deadline = Instant::now() + Duration::from_secs(60);
        while connections(&http, url, "sse").await? > 0 {
            if Instant::now() > deadline {
                bail!("the daemon still holds streams a minute after they closed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed = start.elapsed().as_secs_f64() - opened;
        println!("  all closed on the daemon after {closed:.2} s");
        let after = show("just after they closed");
        // An allocator returns memory over a little time: look for up to 10 s.
        if let (Some(pid), Some(idle), Some(_)) = (pid, idle, after) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut settled = rss(pid)?;
            while settled as f64 > idle as f64 * 1.2 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                settled = rss(pid)?;
            }
            println!(
                "  rss settled: {:.1} MiB ({:+.0}% of idle)",
                mib(settled),
                (settled as f64 / idle as f64 - 1.0) * 100.0
            );
        }
        let _ = with_streams;
    }
    Ok(())
}
