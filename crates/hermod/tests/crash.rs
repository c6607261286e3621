//! Crash safety: concurrent senders, `kill -9` at random points, restart —
//! every message the daemon acknowledged (a `sent` receipt) is still there,
//! and so is every acknowledged cursor move and durable subscription: a
//! cursor never moves backwards across a crash.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hermod_client::Connection;
use hermod_core::wire::{AckMode, ClientFrame, Outgoing, ServerFrame};
use serde_json::json;

use crate::support::Daemon;

/// Rounds in the suite; the soak command sets `HERMOD_CRASH_ROUNDS=100`
/// (see the README).
const ROUNDS: usize = 20;

fn rounds() -> usize {
    std::env::var("HERMOD_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
}
const SENDERS: usize = 4;
/// Per sender per round; bounds the test whatever the kill timing.
const MAX_PER_ROUND: usize = 3000;

/// A small deterministic PRNG seeded from the clock (printed for replay).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Pipelines `send` frames; records the ids the daemon acknowledged.
async fn sender(socket: std::path::PathBuf, tag: String, acked: Arc<Mutex<Vec<String>>>) {
    let Ok(conn) = Connection::connect(&socket).await else {
        return;
    };
    let (mut reader, mut writer) = conn.split();
    let write = async move {
        for n in 0..MAX_PER_ROUND {
            let frame = ClientFrame::Send(Outgoing {
                to: Some("sink".into()),
                id: Some(json!(format!("{tag}-{n}"))),
                body: Some(hermod_core::model::Body::from_json(format!("{{\"n\":{n}}}")).unwrap()),
                ..Outgoing::default()
            });
            if writer.feed(&frame).await.is_err() {
                return;
            }
            if n % 8 == 7 && writer.flush().await.is_err() {
                return;
            }
        }
        let _ = writer.flush().await;
        // Keep the write half open until the reader has every receipt.
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut got = 0;
        while let Ok(Some(frame)) = reader.next().await {
            if let ServerFrame::Sent { id, .. } = frame {
                acked.lock().unwrap().push(id);
                got += 1;
                if got == MAX_PER_ROUND {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = write => {}
        _ = read => {}
    }
}

/// What the cursor-and-subscription client got acknowledged.
#[derive(Default)]
struct Acked {
    /// The highest cursor an ack answer reported.
    cursor: u64,
    patterns: Vec<String>,
}

/// Over HTTP (until the daemon dies): moves `reader`'s cursor forward and
/// adds durable subscriptions, recording what each answer acknowledged;
/// `started` fires once the first subscription is acknowledged (so a
/// loaded machine cannot make every round end before anything of this).
async fn cursor_mover(
    url: String,
    round: usize,
    acked: Arc<Mutex<Acked>>,
    started: tokio::sync::oneshot::Sender<()>,
) {
    let mut started = Some(started);
    let http = reqwest::Client::new();
    for n in 0..10_000u64 {
        let target = acked.lock().unwrap().cursor + 1 + n % 7;
        let Ok(r) = http
            .post(format!("{url}/v1/agents/reader/ack"))
            .json(&json!({ "seq": target }))
            .send()
            .await
        else {
            return;
        };
        let Ok(reply) = r.json::<serde_json::Value>().await else {
            return;
        };
        let Some(cursor) = reply["cursor"].as_u64() else {
            return;
        };
        {
            let mut a = acked.lock().unwrap();
            a.cursor = a.cursor.max(cursor);
        }
        if n % 5 == 0 {
            let pattern = format!("crash.r{round}.n{n}");
            let Ok(r) = http
                .post(format!("{url}/v1/agents/reader/subscriptions"))
                .json(&json!({ "pattern": pattern }))
                .send()
                .await
            else {
                return;
            };
            if r.status().is_success() {
                acked.lock().unwrap().patterns.push(pattern);
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            }
        }
    }
}

/// The stored cursor and subscriptions of `reader` hold everything
/// acknowledged so far.
fn check_reader(rt: &tokio::runtime::Runtime, url: &str, acked: &Mutex<Acked>, when: &str) {
    let (cursor, patterns) = rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let request = http.get(format!("{url}{path}")).send();
            async move {
                request
                    .await
                    .unwrap()
                    .json::<serde_json::Value>()
                    .await
                    .unwrap()
            }
        };
        let page = get("/v1/agents/reader/inbox?limit=1").await;
        let subs = get("/v1/agents/reader/subscriptions").await;
        let patterns: HashSet<String> = subs["patterns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        (page["cursor"].as_u64().unwrap(), patterns)
    });
    let acked = acked.lock().unwrap();
    assert!(
        cursor >= acked.cursor,
        "{when}: the cursor moved back from an acknowledged {} to {cursor}",
        acked.cursor
    );
    let lost: Vec<_> = acked
        .patterns
        .iter()
        .filter(|p| !patterns.contains(*p))
        .collect();
    assert!(
        lost.is_empty(),
        "{when}: acknowledged subscriptions lost: {lost:?}"
    );
}

#[test]
fn kill_9_at_random_points_loses_no_acknowledged_message() {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Every acknowledged message must come back; the soak's 100 rounds
    // store more than the default per-inbox retention keeps (100,000).
    let mut d = Daemon::start_with(&["--retention-messages", "off"], &[]);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let reader = Arc::new(Mutex::new(Acked::default()));
    let rounds = rounds();
    for round in 0..rounds {
        let mut tasks: Vec<_> = (0..SENDERS)
            .map(|s| {
                rt.spawn(sender(
                    d.socket.clone(),
                    format!("r{round}-s{s}"),
                    acked.clone(),
                ))
            })
            .collect();
        let (started, moving) = tokio::sync::oneshot::channel();
        tasks.push(rt.spawn(cursor_mover(d.http.clone(), round, reader.clone(), started)));
        // The kill point stays random, counted from when all of the
        // traffic (sends, cursor moves, subscriptions) is under way.
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), moving).await });
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        d.kill9();
        for t in tasks {
            rt.block_on(t).unwrap();
        }
        d.spawn();
        check_reader(&rt, &d.http, &reader, &format!("after round {round}"));
    }
    {
        let r = reader.lock().unwrap();
        println!(
            "cursor acknowledged up to {}, {} subscriptions acknowledged",
            r.cursor,
            r.patterns.len()
        );
        assert!(
            r.cursor > 0 && !r.patterns.is_empty(),
            "the test must get cursor moves and subscriptions acknowledged"
        );
    }
    let acked: HashSet<String> = acked.lock().unwrap().drain(..).collect();
    println!(
        "{} messages acknowledged over {rounds} kill -9 rounds",
        acked.len()
    );
    assert!(
        acked.len() > rounds,
        "the test must actually get messages acknowledged"
    );

    // Read the whole inbox back (explicit acks, so nothing is skipped).
    let found = rt.block_on(async {
        let mut c = Connection::connect(&d.socket).await.unwrap();
        c.request(&ClientFrame::Register {
            endpoint: "sink".into(),
            channel: None,
            ack: Some(AckMode::Explicit),
            gaps: None,
        })
        .await
        .unwrap();
        let mut missing = acked.clone();
        let mut last_seq = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !missing.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(10), c.next_frame()).await {
                Ok(Ok(ServerFrame::Message(m))) => {
                    assert!(m.seq > last_seq, "inbox out of order");
                    last_seq = m.seq;
                    missing.remove(&m.id);
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => break,
            }
        }
        missing
    });
    assert!(
        found.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        found.len(),
        found.iter().take(5).collect::<Vec<_>>()
    );
}
