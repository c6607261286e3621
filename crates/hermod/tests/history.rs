//! The history checker: tests hermod's promises, not its code paths.
//!
//! Drives the real daemon (retention and the loop guard off) with
//! concurrent clients over every door — Unix `send` (one at a time and
//! pipelined), agent-bus `/send`, v1 `POST /v1/messages`, v1 WebSocket
//! `send`, interop `/broadcast`; readers over Unix (explicit acks and auto
//! mode, one agent's auto mode beside `/poll`), interop `/subscribe` +
//! `/poll` (one shared cursor), v1 SSE and WebSocket (explicit acks),
//! agent-bus `/recv` following `since` — on one daemon, or on NATS on
//! `HERMOD_CHECK_NODES` hermod nodes taken in turn; records every request,
//! answer and delivery, and injects faults: `kill -9` of a daemon (of every
//! node at the end) and a restart on the same data directory; store faults — on
//! SQLite a full disk (its data directory is on a tmpfs of its own, filled
//! to the last byte) and the database's write lock held by another
//! process, on a 3-node NATS cluster (R3) a server killed and restarted;
//! clients that hang up, stall, or cut their requests. After the run (a
//! last kill -9, then the readers drain every inbox with no more faults)
//! it checks:
//!
//! - every acknowledged message is readable by each recipient (a
//!   non-destructive v1 read of every inbox), stored once, and a refused
//!   send stored nothing;
//! - each destructive door hands a message out once (Unix explicit and v1
//!   WebSocket: never again after an ack the daemon processed; interop
//!   `/poll` + `/subscribe` and Unix auto mode: never twice, except the
//!   last batch of a stream cut before the daemon saw it consumed), and
//!   together they hand out every message;
//! - every pipelined Unix `send` gets its own receipt, in order;
//! - per-inbox order: seqs increase on every read (a `/subscribe` or Unix
//!   auto-mode stream may go back to a batch another reader released),
//!   every sender's messages keep its order; explicit-ack streams and
//!   `since` followers skip nothing;
//! - no cursor moves behind a move the daemon acknowledged, across kills.
//!
//! `HERMOD_CHECK_SEED` picks the schedule (printed), `HERMOD_CHECK_SECONDS`
//! the length (default 30). A failure prints the seed and, per violation,
//! the events of the history that show it. Every fault kind is on; two
//! can be turned off to tell their part in a failure (see [`known_faults`]).

mod check;
mod clients;
mod net;
mod record;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clients::{Ctx, Known};
use record::*;

use hermod_nats::testing::Cluster;

use crate::support::{fill, free_port, Daemon, DbLock, Tmpfs};

/// Retention and the loop guard off: nothing may be pruned, nothing held.
const CONFIG: &str = r#"
[retention]
age = "off"
messages = 0
bytes = 0
topic_age = "off"

[guard]
turns = 0
"#;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// `/subscribe` readers that stop reading, then hang up and reconnect
/// without `Last-Event-ID` (`sse_drop`), and `/poll` requests cut
/// mid-request (`poll_cut`): on, unless `HERMOD_CHECK_KNOWN=0` turns both
/// off (or `-sse_drop`, `-poll_cut` one). They were opt-in while a read
/// step could be lost (a cursor move and its steps in two writes; on NATS
/// in two buckets until the steps rode in the cursor's value): SQLite
/// seeds 1–12 and NATS seeds 1–11 pass with both on.
fn known_faults() -> Known {
    let v = std::env::var("HERMOD_CHECK_KNOWN").unwrap_or_default();
    let none = v.trim() == "0";
    let off = |f: &str| none || v.split(',').any(|p| p.trim() == format!("-{f}"));
    Known {
        sse_drop: !off("sse_drop"),
        poll_cut: !off("poll_cut"),
    }
}

/// Where the log lives, and so which faults the run can inject besides
/// `kill -9` of the daemon and the clients' own.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    /// SQLite on a tmpfs of its own: the disk fills up now and then, and
    /// another process takes the database's write lock.
    Sqlite,
    /// A 3-node NATS JetStream cluster (R3): a server is killed (`kill -9`)
    /// and comes back.
    Nats,
}

#[test]
fn history_sqlite_kill9_storage_and_client_faults() {
    checked_run(Store::Sqlite);
}

#[test]
fn history_nats_r3_kill9_server_kills_and_client_faults() {
    checked_run(Store::Nats);
}

fn checked_run(store: Store) {
    let seed = env_u64("HERMOD_CHECK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_000
    });
    let seconds = env_u64("HERMOD_CHECK_SECONDS").unwrap_or(30);
    let known = known_faults();
    println!(
        "history checker ({store:?}): HERMOD_CHECK_SEED={seed} HERMOD_CHECK_SECONDS={seconds} client faults: {known:?}"
    );
    run(store, seed, seconds, known);
}

/// The daemons under test and what their store runs on: one on SQLite,
/// [`nats_nodes`] hermod nodes on NATS (clients take them in turn, per
/// session). Fields drop in order: the daemons before the cluster, the
/// data directory before its file system is unmounted.
struct Target {
    store: Store,
    daemons: Vec<Daemon>,
    cluster: Option<Cluster>,
    fs: Option<Tmpfs>,
}

/// hermod nodes on the NATS run: `HERMOD_CHECK_NODES`, default 1. With
/// two, runs found what only two nodes can do (a stream's batch handed out
/// by another node's `/poll`, fixed by cursor leases), and also runs where
/// the cursor bucket answered a value thousands of moves old after a
/// NATS server came back, and a compare-and-set against it succeeded:
/// until that is understood two nodes stay opt-in (see the README).
fn nats_nodes() -> usize {
    env_u64("HERMOD_CHECK_NODES").unwrap_or(1).clamp(1, 4) as usize
}

impl Target {
    fn start(store: Store) -> Self {
        let mut args = vec![
            "--send-rate",
            "0",
            "--http-write-timeout",
            "2",
            "--long-poll-max",
            "5",
        ];
        // `HERMOD_CHECK_RUST_LOG` (e.g. `warn,hermod_core::broker::cursors=debug`)
        // and `HERMOD_CHECK_LOG=file` (the daemons' whole logs, kept) are
        // for looking into a failing seed.
        let level = std::env::var("HERMOD_CHECK_RUST_LOG").unwrap_or_else(|_| "warn".into());
        let envs = [("RUST_LOG", level.as_str())];
        match store {
            Store::Sqlite => {
                // Room for a 30-minute run; filled to the last byte by a fault.
                let fs = Tmpfs::mount("1g");
                // The daemon's log in its data directory, on the full disk
                // too (as `hermod start` keeps it).
                let dir = tempfile::tempdir_in(fs.path()).unwrap();
                let http = format!("127.0.0.1:{}", free_port());
                args.extend(["--http", &http]);
                let daemon = Daemon::start_dir(dir, &args, &envs, Some(CONFIG));
                Target {
                    store,
                    daemons: vec![daemon],
                    cluster: None,
                    fs: Some(fs),
                }
            }
            Store::Nats => {
                let cluster = Cluster::start(3);
                let urls = cluster.urls().join(",");
                args.extend(["--nats", &urls, "--nats-replicas", "3"]);
                let daemons = (0..nats_nodes())
                    .map(|_| {
                        let http = format!("127.0.0.1:{}", free_port());
                        let mut args = args.clone();
                        args.extend(["--http", &http]);
                        Daemon::start_dir(tempfile::tempdir().unwrap(), &args, &envs, Some(CONFIG))
                    })
                    .collect();
                Target {
                    store,
                    daemons,
                    cluster: Some(cluster),
                    fs: None,
                }
            }
        }
    }

    /// `kill -9` of a daemon (all of them with `all`), a restart on the
    /// same data directory.
    fn kill(&mut self, ctx: &Ctx, rng: &mut Rng, all: bool) {
        let one = rng.below(self.daemons.len() as u64) as usize;
        ctx.hist.push(Kind::Kill);
        for (i, d) in self.daemons.iter_mut().enumerate() {
            if all || i == one {
                d.kill9();
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        for (i, d) in self.daemons.iter_mut().enumerate() {
            if all || i == one {
                d.spawn();
            }
        }
        ctx.hist.push(Kind::Restart);
    }

    /// Where clients reach each daemon.
    fn nodes(&self) -> Vec<clients::Node> {
        self.daemons
            .iter()
            .map(|d| {
                let addr = d.http.trim_start_matches("http://").to_owned();
                clients::Node {
                    url: format!("http://{addr}"),
                    addr,
                    socket: d.socket.clone(),
                }
            })
            .collect()
    }

    /// One fault, over when this returns: half of them a `kill -9` of the
    /// daemon, the rest what the store can suffer.
    fn fault(&mut self, ctx: &Ctx, rng: &mut Rng) {
        if rng.chance(0.5) {
            return self.kill(ctx, rng, false);
        }
        let lasts = Duration::from_millis(rng.between(500, 3000));
        match (self.store, rng.chance(0.5)) {
            (Store::Sqlite, true) => {
                let fs = self.fs.as_ref().unwrap();
                ctx.hist.push(Kind::Fault {
                    what: "disk full",
                    on: true,
                });
                let filler = fill(fs.path());
                std::thread::sleep(lasts);
                std::fs::remove_file(filler).unwrap();
                ctx.hist.push(Kind::Fault {
                    what: "disk full",
                    on: false,
                });
            }
            (Store::Sqlite, false) => {
                ctx.hist.push(Kind::Fault {
                    what: "database locked",
                    on: true,
                });
                DbLock::hold(&self.daemons[0].data_dir().join("hermod.db"), lasts).wait();
                ctx.hist.push(Kind::Fault {
                    what: "database locked",
                    on: false,
                });
            }
            (Store::Nats, _) => {
                let cluster = self.cluster.as_mut().unwrap();
                let server = rng.below(3) as usize;
                ctx.hist.push(Kind::Fault {
                    what: "a NATS server killed",
                    on: true,
                });
                cluster.kill(server);
                std::thread::sleep(lasts);
                cluster.restart(server);
                ctx.hist.push(Kind::Fault {
                    what: "a NATS server killed",
                    on: false,
                });
            }
        }
    }
}

fn run(store: Store, seed: u64, seconds: u64, known: Known) {
    let mut target = Target::start(store);
    let ctx = Arc::new(Ctx {
        hist: History::new(),
        nodes: target.nodes(),
        turn: Default::default(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(16)
            .build()
            .unwrap(),
        known,
        stop_send: Default::default(),
        stop: Default::default(),
        calm: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = Rng::new(seed, 0);
    let mut stream = 1;
    let mut next_rng = || {
        stream += 1;
        Rng::new(seed, stream)
    };

    // Every agent is known before the first send (broadcasts reach it).
    rt.block_on(async {
        for (a, node) in AGENTS
            .iter()
            .flat_map(|a| ctx.nodes.iter().map(move |n| (a, n)))
        {
            let r = ctx
                .http
                .get(format!("{}/recv?to={a}&block=false", node.url))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{a}: {}", r.status());
        }
    });

    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for (agent, explicit) in [(UX0, true), (UX1, true), (UA0, false), (UA1, false)] {
        readers.push(rt.spawn(clients::unix_reader(
            ctx.clone(),
            agent,
            explicit,
            next_rng(),
        )));
    }
    for agent in [IP0, IP1] {
        readers.push(rt.spawn(clients::sse_reader(
            ctx.clone(),
            agent,
            Door::IopSubscribe,
            next_rng(),
        )));
        readers.push(rt.spawn(clients::poller(ctx.clone(), agent, next_rng())));
    }
    // Unix auto mode and `/poll` share one cursor, as `/subscribe` does.
    readers.push(rt.spawn(clients::poller(ctx.clone(), UA1, next_rng())));
    readers.push(rt.spawn(clients::sse_reader(
        ctx.clone(),
        VS0,
        Door::V1Sse,
        next_rng(),
    )));
    readers.push(rt.spawn(clients::ws_reader(ctx.clone(), VS0, next_rng())));
    for agent in [UX0, IP0, VS0] {
        readers.push(rt.spawn(clients::recv_follower(ctx.clone(), agent, next_rng())));
    }
    readers.push(rt.spawn(clients::cursor_sampler(ctx.clone(), next_rng())));
    for i in 0..4 {
        senders.push(rt.spawn(clients::sender(ctx.clone(), i, next_rng())));
    }
    senders.push(rt.spawn(clients::pipeliner(ctx.clone(), 4, next_rng())));

    // The run: a fault now and then.
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut next_fault = started + Duration::from_millis(rng.between(2000, 7000));
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_fault {
            target.fault(&ctx, &mut rng);
            next_fault = Instant::now() + Duration::from_millis(rng.between(3000, 9000));
        }
    }
    ctx.stop_send.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for s in senders {
            let _ = tokio::time::timeout(Duration::from_secs(20), s).await;
        }
    });
    // A last crash of every node: what was acknowledged must survive it too.
    target.kill(&ctx, &mut rng, true);
    ctx.calm.store(true, Ordering::SeqCst);

    // The drain: readers run without faults until every inbox is handed
    // out and every follower reached its end (or 60 s pass).
    let drain_started = Instant::now();
    let inboxes = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut settled = 0;
        loop {
            let mut inboxes = Vec::new();
            for a in 0..AGENTS.len() as u8 {
                inboxes.push(clients::list_inbox(&ctx, a).await.expect("inbox listing"));
            }
            let mut cursors = Vec::new();
            for a in 0..AGENTS.len() as u8 {
                cursors.push(clients::cursor_of(&ctx, a).await.unwrap_or(0));
            }
            let done = (0..AGENTS.len()).all(|a| {
                let taken = ctx.hist.taken.lock().unwrap();
                let inbox = &inboxes[a];
                let last = inbox.last().copied();
                // What no door handed out and the cursor passed was read
                // for a client that never got it (a cut `/poll` answer):
                // it will not come; the check says whether that is allowed.
                inbox
                    .iter()
                    .all(|e| taken[a].contains(&e.0) || e.0 <= cursors[a])
                    && (a != VS0 as usize
                        || last.is_none_or(|l| ctx.hist.followed[a].load(Ordering::SeqCst) >= l.0))
                    && (![UX0, IP0, VS0].contains(&(a as u8))
                        || last.is_none_or(|l| {
                            f64::from_bits(ctx.hist.since[a].load(Ordering::SeqCst)) >= l.1
                        }))
            });
            // Twice in a row: a claim still settling moves no cursor back.
            settled = if done { settled + 1 } else { 0 };
            if settled >= 2 || tokio::time::Instant::now() >= deadline {
                return inboxes;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let drain = drain_started.elapsed();
    ctx.stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(15), r).await;
        }
    });
    let run_time = ctx.hist.elapsed();
    // What the daemon says read the messages no destructive door handed
    // out (a cut `/poll` answer, a stream's peer that hung up with bytes
    // its kernel had acknowledged).
    let reads: Vec<_> = rt.block_on(async {
        let taken = ctx.hist.taken.lock().unwrap().clone();
        let mut reads = Vec::new();
        for (a, inbox) in inboxes.iter().enumerate() {
            let missing = inbox
                .iter()
                .map(|e| e.0)
                .filter(|s| !taken[a].contains(s))
                .take(2000)
                .collect();
            reads.push(clients::read_steps(&ctx, a as u8, &missing).await);
        }
        reads
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let log: String = target.daemons.iter().map(Daemon::log).collect();
    drop(target);
    if let Ok(path) = std::env::var("HERMOD_CHECK_LOG") {
        std::fs::write(&path, &log).unwrap();
    }

    let events = std::mem::take(&mut *ctx.hist.events.lock().unwrap());
    let sessions = std::mem::take(&mut *ctx.hist.sessions.lock().unwrap());
    let (violations, fig) = check::check(
        &events,
        &sessions,
        &inboxes,
        &reads,
        ctx.hist.epoch,
        store == Store::Nats,
    );
    let ops = fig.sent + fig.deliveries.values().sum::<usize>() + fig.cursor_samples;
    println!(
        "history checker: seed {seed}: {:.1} s ({} s of faults, drain {:.1} s), {} kill -9, store faults {:?}, \
         {} sends ({} acknowledged, {} refused {:?}, {} unanswered {:?}), {} messages stored, \
         deliveries {:?}, session ends {:?}, {} redelivered after a cut stream, {} streams back to a hole, {} read for a cut /poll answer, \
         {} read for a hung-up stream, {} cursor samples, \
         {} events, {:.0} ops/s, {} violation(s)",
        run_time.as_secs_f64(),
        seconds,
        drain.as_secs_f64(),
        fig.kills,
        fig.faults,
        fig.sent,
        fig.acked,
        fig.refused,
        fig.refused_by,
        fig.unknown,
        fig.unknown_by,
        fig.stored,
        fig.deliveries,
        fig.ends,
        fig.redelivered_after_cut,
        fig.back_to_a_hole,
        fig.lost_with_cut_poll,
        fig.lost_with_hung_up_stream,
        fig.cursor_samples,
        events.len(),
        ops as f64 / run_time.as_secs_f64(),
        violations.len()
    );
    if violations.is_empty() {
        return;
    }
    // The daemon's warnings and errors (kills cut its log mid-line).
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(40)
    {
        println!("daemon: {line}");
    }
    let mut by_promise: std::collections::BTreeMap<&str, Vec<&check::Violation>> =
        Default::default();
    for v in &violations {
        by_promise.entry(v.promise).or_default().push(v);
    }
    let mut report = format!(
        "history checker: {} violation(s), reproduce with HERMOD_CHECK_SEED={seed} HERMOD_CHECK_SECONDS={seconds}\n",
        violations.len()
    );
    for (promise, list) in &by_promise {
        report.push_str(&format!("\n== {promise}: {} violation(s)\n", list.len()));
        for v in list.iter().take(3) {
            report.push_str(&format!(
                "-- {}{}: {}\n",
                v.agent
                    .map_or(String::new(), |a| format!("{} ", AGENTS[a as usize])),
                v.key.map_or(String::new(), |k| format!("{k}")),
                v.detail
            ));
            report.push_str(&check::excerpt(&events, &sessions, v));
        }
    }
    panic!("{report}");
}
