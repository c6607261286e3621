//! Crash safety: concurrent senders, `kill -9` at random points, restart —
//! every message the daemon acknowledged (a `sent` receipt) is still there.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hermod_client::Connection;
use hermod_core::wire::{AckMode, ClientFrame, Outgoing, ServerFrame};
use serde_json::json;

use crate::support::Daemon;

const ROUNDS: usize = 20;
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

#[test]
fn kill_9_at_random_points_loses_no_acknowledged_message() {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut d = Daemon::start();
    let acked = Arc::new(Mutex::new(Vec::new()));
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..SENDERS)
            .map(|s| {
                rt.spawn(sender(
                    d.socket.clone(),
                    format!("r{round}-s{s}"),
                    acked.clone(),
                ))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        d.kill9();
        for t in tasks {
            rt.block_on(t).unwrap();
        }
        d.spawn();
    }
    let acked: HashSet<String> = acked.lock().unwrap().drain(..).collect();
    println!(
        "{} messages acknowledged over {ROUNDS} kill -9 rounds",
        acked.len()
    );
    assert!(
        acked.len() > ROUNDS,
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
