//! `hermod bench`: throughput and latency of a real daemon, over the Unix
//! socket ([`unix`]) and the HTTP front ([`http`]).
//!
//! Without `--socket` it starts `hermod serve` (this same binary, SQLite
//! store with fsync on every commit) on a temporary data directory, so the
//! figures include everything a real client pays: framing, routing, group
//! commit, delivery and the consumption check. It first times a 4 KiB
//! `fdatasync` in that directory: the disk's floor under every durable
//! acknowledgement, to read the figures against.
//!
//! Runs, each reported with what it measured:
//! - unix throughput: `--senders` connections pipeline `--messages` durable
//!   `send`s to one registered receiver (receipts/s, deliveries/s);
//! - unix latency: one sender at `--rate` msgs/s for `--seconds` (send →
//!   durable receipt, send → delivery);
//! - HTTP `/send` throughput with 16 concurrent keep-alive clients, and the
//!   same clients on the no-op `GET /healthz` (the machine's ceiling);
//! - batch ingest: `POST /v1/messages` arrays of 500 from 4 clients;
//! - long-poll delivery latency (`/recv?block=true` woken by a `/send`);
//! - SSE fan-out: `/broadcast`s to 1,000 `/subscribe` streams;
//! - topic fan-out: events to 1,000 `/v1/events?pattern=` streams.
//!
//! `--streams N` runs only [`streams`]: N idle `/subscribe` streams opened
//! and closed `--cycles` times, with the daemon's memory. `--nats-restart
//! N` runs only the restart of a NATS node after N messages went through
//! it with retention on.

mod http;
mod streams;
mod unix;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::BenchArgs;

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    if args.nats_cluster {
        return nats(args);
    }
    if let Some(n) = args.streams {
        return idle_streams(args, n);
    }
    if args.soak {
        return soak(args);
    }
    if let Some(n) = args.nats_restart {
        return nats_restart(args, n);
    }
    let (socket, server) = match &args.socket {
        Some(s) => (s.clone(), None),
        None => {
            let server = Server::start(&[])?;
            (server.socket.clone(), Some(server))
        }
    };
    let http_url = match (&args.url, &server) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(s)) => Some(s.http.clone()),
        (None, None) => None,
    };
    super::runtime()?.block_on(async {
        if args.only.as_deref().is_none_or(|o| o == "unix") {
            unix::throughput(&socket, &socket, args.messages, args.senders.max(1)).await?;
            unix::latency(&socket, &socket, args.rate.max(1), args.seconds.max(1)).await?;
        }
        if let (Some(url), true) = (http_url, args.only.as_deref().is_none_or(|o| o == "http")) {
            http::send_throughput(&url, args.messages / 2, 16).await?;
            http::batch_ingest(&url, args.messages * 2, 4, 500).await?;
            http::long_poll_latency(&url, 1000).await?;
            http::sse_fanout(&url, 1000, 10).await?;
            http::pattern_fanout(&url, 1000, 10).await?;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `--streams N`: against `--url`, or a daemon started for it that may
/// hold them all at once.
fn idle_streams(args: &BenchArgs, n: usize) -> Result<ExitCode> {
    let (url, pid, _server) = match &args.url {
        Some(url) => (url.clone(), args.pid, None),
        None => {
            let cap = (n + 256).to_string();
            let server = Server::start(&["--http-max-connections", &cap])?;
            let pid = server.child.id();
            println!("server: hermod serve (pid {pid}), --http-max-connections {cap}");
            (server.http.clone(), Some(pid), Some(server))
        }
    };
    super::runtime()?.block_on(streams::idle_streams(&url, pid, n, args.cycles.max(1)))?;
    Ok(ExitCode::SUCCESS)
}

/// `--soak`: the Unix latency run for a long time with retention pruning
/// all along, and the daemon's RSS every 10 s: memory must stay flat.
fn soak(args: &BenchArgs) -> Result<ExitCode> {
    let keep = args.soak_keep.to_string();
    let server = Server::start(&["--retention-messages", &keep])?;
    let pid = server.child.id();
    let (rate, seconds) = (args.rate.max(1), args.seconds.max(1));
    println!(
        "soak: {rate} msgs/s for {seconds} s, retention keeps {keep} messages per inbox (pid {pid})"
    );
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    super::runtime()?.block_on(async {
        let taken = samples.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            for n in 0.. {
                tick.tick().await;
                let Ok(bytes) = streams::rss(pid) else { break };
                taken.lock().unwrap().push(bytes);
                if n % 6 == 0 {
                    println!("  t+{:>4} s  rss {:.1} MiB", n * 10, mib(bytes));
                }
            }
        });
        unix::latency(&server.socket, &server.socket, rate, seconds).await?;
        sampler.abort();
        anyhow::Ok(())
    })?;
    // After the first minute (caches and the store's pages warming up).
    let samples = samples.lock().unwrap();
    let steady = samples.get(6..).unwrap_or(&samples[..]);
    if let (Some(lo), Some(hi)) = (steady.iter().min(), steady.iter().max()) {
        println!(
            "  rss after the first minute: {:.1}..{:.1} MiB ({:+.1}% spread), last {:.1} MiB",
            mib(*lo),
            mib(*hi),
            (*hi as f64 / *lo as f64 - 1.0) * 100.0,
            mib(*steady.last().unwrap_or(hi))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--nats-cluster`: the Unix runs on the SQLite engine, on one node over
/// a stream with one replica, and across two nodes over a stream with
/// three — all on a 3-node JetStream cluster this run starts (see
/// `hermod_nats::testing` for where its `nats-server` comes from).
fn nats(args: &BenchArgs) -> Result<ExitCode> {
    let cluster = hermod_nats::testing::Cluster::start(3);
    let urls = cluster.urls().join(",");
    println!("NATS: 3-node JetStream cluster (nats-server, sync_interval: always) at {urls}");
    let (messages, senders) = (args.messages, args.senders.max(1));
    let (rate, seconds) = (args.rate.max(1), args.seconds.max(1));
    let sqlite = Server::start(&[])?;
    let node = |stream: &str, replicas: &str| {
        Server::start(&[
            "--nats",
            &urls,
            "--nats-stream",
            stream,
            "--nats-replicas",
            replicas,
        ])
    };
    let single = node("BENCH_R1", "1")?;
    println!("server: hermod serve --nats, stream BENCH_R1 (R1)");
    let (a, b) = (node("BENCH_R3", "3")?, node("BENCH_R3", "3")?);
    println!("servers: two hermod serve --nats nodes A and B, stream BENCH_R3 (R3)");
    super::runtime()?.block_on(async {
        for (label, tx, rx) in [
            ("SQLite, one node", &sqlite.socket, &sqlite.socket),
            ("NATS R1, one node", &single.socket, &single.socket),
            ("NATS R3, node A -> node B", &a.socket, &b.socket),
        ] {
            println!("--- {label}");
            unix::throughput(tx, rx, messages, senders).await?;
            unix::latency(tx, rx, rate, seconds).await?;
        }
        anyhow::Ok(())
    })?;
    // The nodes first, so none of them reports losing NATS.
    drop((sqlite, single, a, b));
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}

/// `--nats-restart N`: N messages through one node of a 3-node cluster
/// (R3) with retention keeping `--soak-keep` per inbox; once retention has
/// caught up, the node is killed (-9) and started again on the same data
/// directory. Reported: the stream and state bucket it starts from, and
/// the time until its socket answers and until a send is acknowledged
/// (the node has replayed the retained log and the bucket by then).
fn nats_restart(args: &BenchArgs, n: u64) -> Result<ExitCode> {
    let cluster = hermod_nats::testing::Cluster::start(3);
    let urls = cluster.urls().join(",");
    let keep = args.soak_keep.to_string();
    let extra = [
        "--nats",
        &urls,
        "--nats-stream",
        "BENCH_RESTART",
        "--nats-replicas",
        "3",
        "--retention-messages",
        &keep,
    ];
    let mut node = Server::start(&extra)?;
    println!("NATS restart: {n} messages through one node (R3), retention keeps {keep} per inbox");
    let runtime = super::runtime()?;
    // Nobody reads: a reader behind retention only adds its own traffic.
    let to = "bench-restart-inbox";
    runtime.block_on(unix::fill(&node.socket, to, n, args.senders.max(1)))?;
    // Retention prunes in small steps: wait (bounded) until the stream is
    // down to what it keeps.
    let engine = |socket: PathBuf| async move {
        let mut c = hermod_client::Connection::connect(&socket).await?;
        let (_, engine, _) = c.status_all().await?;
        let engine = engine.unwrap_or_default();
        anyhow::Ok((
            engine["messages"].as_u64().unwrap_or(0),
            engine["state_entries"].as_u64().unwrap_or(0),
        ))
    };
    let pruning = Instant::now();
    let (messages, state) = loop {
        let (messages, state) = runtime.block_on(engine(node.socket.clone()))?;
        if messages <= args.soak_keep + 1_000 || pruning.elapsed() > Duration::from_secs(600) {
            break (messages, state);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "  retention down to {messages} messages, {state} state entries {:.1} s after the last send",
        pruning.elapsed().as_secs_f64()
    );
    let (answered, sent) = node.restart()?;
    println!(
        "  kill -9 and start again: socket answers after {:.2} s, a send is acknowledged after {:.2} s",
        answered.as_secs_f64(),
        sent.as_secs_f64()
    );
    drop(node);
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}

/// A `hermod serve` child on a temporary data directory.
struct Server {
    child: std::process::Child,
    socket: PathBuf,
    http: String,
    /// What it was started with (for [`Server::restart`]).
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Server {
    /// `hermod serve` with `extra` arguments (none: the SQLite default).
    fn start(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        let child = Self::spawn(dir.path(), &extra)?;
        let socket = dir.path().join("hermod.sock");
        let http = Self::wait_ready(dir.path(), Duration::from_secs(15))?;
        if extra.is_empty() {
            println!(
                "server: hermod serve, SQLite WAL, synchronous=FULL, in {}",
                dir.path().display()
            );
            report(
                "disk: 4 KiB write + fdatasync there",
                flush_latency(dir.path())?,
            );
        }
        Ok(Self {
            child,
            socket,
            http,
            extra,
            dir,
        })
    }

    fn spawn(dir: &Path, extra: &[String]) -> Result<std::process::Child> {
        std::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http", "127.0.0.1:0"])
            // The bench's few senders go far past any agent's send rate.
            .args(["--send-rate", "0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("HERMES_BUS_HOOKS", "none")
            .spawn()
            .context("cannot start hermod serve")
    }

    /// Kills the daemon (-9) and starts it again on the same directory;
    /// how long until its socket answered and until a send was durable.
    fn restart(&mut self) -> Result<(Duration, Duration)> {
        self.child.kill()?;
        self.child.wait()?;
        let _ = std::fs::remove_file(self.dir.path().join(super::serve::RUNTIME_FILE));
        let start = Instant::now();
        self.child = Self::spawn(self.dir.path(), &self.extra)?;
        self.http = Self::wait_ready(self.dir.path(), Duration::from_secs(120))?;
        let answered = start.elapsed();
        super::runtime()?.block_on(async {
            let mut c = hermod_client::Connection::connect(&self.socket).await?;
            c.send(hermod_client::Draft {
                to: Some("bench-restart".into()),
                from: Some("bench-tx".into()),
                channel: None,
                body: hermod_core::model::Body::from_json(r#"{"text":"after restart"}"#.into())?,
                meta: Default::default(),
            })
            .await?;
            anyhow::Ok(())
        })?;
        Ok((answered, start.elapsed()))
    }

    /// Waits until the daemon in `dir` has written its HTTP address and
    /// accepts on its socket; the HTTP URL.
    fn wait_ready(dir: &Path, within: Duration) -> Result<String> {
        let socket = dir.join("hermod.sock");
        let deadline = Instant::now() + within;
        let runtime = dir.join(super::serve::RUNTIME_FILE);
        let http = loop {
            let url = std::fs::read(&runtime)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["http"].as_str().map(str::to_owned));
            if let Some(url) = url {
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    break url;
                }
            }
            if Instant::now() > deadline {
                bail!("the benchmark server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(http)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one flush costs on the disk under `dir` (500 samples): the floor
/// under every durable acknowledgement, whatever the server does.
fn flush_latency(dir: &Path) -> Result<Vec<u64>> {
    use std::io::Write;
    let mut file = tempfile::tempfile_in(dir)?;
    let page = [0x5au8; 4096];
    (0..500)
        .map(|_| {
            file.write_all(&page)?;
            let start = Instant::now();
            file.sync_data()?;
            Ok(start.elapsed().as_nanos() as u64)
        })
        .collect()
}

pub(super) fn report(label: &str, mut nanos: Vec<u64>) {
    nanos.sort_unstable();
    let pct = |p: f64| nanos[((nanos.len() as f64 - 1.0) * p) as usize] as f64 / 1e6;
    println!(
        "{label}: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
}
