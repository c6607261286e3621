//! The hermes-bus protocol at the frame level, with the Rust client and raw
//! sockets: delivery order, durability receipts, kicks, and the rule that a
//! frame only counts as delivered once the client consumed it.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hermod_client::{Connection, Draft};
use hermod_core::wire::{AckMode, ClientFrame, ServerFrame};
use serde_json::{json, Value};

use crate::support::{read_frame, write_frame, Daemon};

fn body(v: Value) -> hermod_core::model::Body {
    hermod_core::model::Body::from_map(v.as_object().unwrap().clone())
}

fn draft(to: &str, n: u64) -> Draft {
    Draft {
        to: Some(to.into()),
        from: Some("tester".into()),
        channel: None,
        meta: Default::default(),
        body: body(json!({ "n": n })),
    }
}

async fn register(d: &Daemon, name: &str, ack: AckMode) -> Connection {
    let mut c = Connection::connect(&d.socket).await.unwrap();
    let reply = c
        .request(&ClientFrame::Register {
            endpoint: name.into(),
            channel: None,
            ack: Some(ack),
            gaps: None,
        })
        .await
        .unwrap();
    assert!(matches!(reply, ServerFrame::Registered { ref endpoint, .. } if endpoint == name));
    c
}

async fn next_message(c: &mut Connection) -> hermod_client::MessageFrame {
    let frame = tokio::time::timeout(Duration::from_secs(20), c.next_frame())
        .await
        .expect("a message within 20 s")
        .unwrap();
    match frame {
        ServerFrame::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn backlog_then_live_in_order_with_durable_receipts() {
    let d = Daemon::start();
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    let mut last_seq = 0;
    for n in 0..50 {
        let sent = sender.send(draft("b", n)).await.unwrap();
        assert!(sent.seq > last_seq);
        last_seq = sent.seq;
    }
    let mut b = register(&d, "b", AckMode::Auto).await;
    let mut last_ts = 0.0;
    for n in 0..50 {
        let m = next_message(&mut b).await;
        assert_eq!(m.body.to_map()["n"], n);
        assert_eq!(m.from, "tester");
        assert!(m.ts > last_ts);
        last_ts = m.ts;
    }
    for n in 50..60 {
        sender.send(draft("b", n)).await.unwrap();
        let m = next_message(&mut b).await;
        assert_eq!(m.body.to_map()["n"], n, "live delivery after the backlog");
    }
}

#[tokio::test]
async fn legacy_message_to_an_unknown_name_is_refused_and_not_stored() {
    let d = Daemon::start();
    let mut c = Connection::connect(&d.socket).await.unwrap();
    let frame = ClientFrame::Message(hermod_core::wire::Outgoing {
        to: Some("nobody".into()),
        from: Some("a".into()),
        id: Some(json!("m-1")),
        body: Some(body(json!({"text": "typo?"}))),
        ..Default::default()
    });
    c.send_frame(&frame).await.unwrap();
    match c.next_frame().await.unwrap() {
        ServerFrame::Error { code, id, .. } => {
            assert_eq!(code, "endpoint_not_found");
            assert_eq!(id.as_deref(), Some("m-1"));
        }
        other => panic!("{other:?}"),
    }
    // Nothing was stored: `nobody` is still unknown.
    assert!(c.agents().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_second_registration_kicks_the_first() {
    let d = Daemon::start();
    let mut first = register(&d, "dup", AckMode::Auto).await;
    let mut second = register(&d, "dup", AckMode::Auto).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), first.next_frame())
        .await
        .unwrap();
    assert!(
        matches!(closed, Err(hermod_client::Error::Closed)),
        "{closed:?}"
    );
    let endpoints = second.list_endpoints().await.unwrap();
    assert_eq!(endpoints.len(), 1);
    Connection::connect(&d.socket)
        .await
        .unwrap()
        .send(draft("dup", 7))
        .await
        .unwrap();
    assert_eq!(next_message(&mut second).await.body.to_map()["n"], 7);
}

fn raw_register(d: &Daemon, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write_frame(&mut s, json!({"type": "register", "endpoint": name}));
    assert_eq!(read_frame(&mut s)["type"], "registered");
    s
}

async fn unread(d: &Daemon, name: &str) -> u64 {
    let mut c = Connection::connect(&d.socket).await.unwrap();
    c.agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == name)
        .map_or(0, |a| a.unread)
}

#[tokio::test]
async fn frames_written_to_a_client_that_never_read_them_are_delivered_again() {
    let d = Daemon::start();
    let s = raw_register(&d, "closing");
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    for n in 0..5 {
        sender.send(draft("closing", n)).await.unwrap();
    }
    // The daemon wrote the frames into the socket; the client closes
    // without reading them (what the real BusClient does on its 1 s timeout).
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    assert_eq!(
        unread(&d, "closing").await,
        5,
        "unconsumed frames were not acknowledged"
    );

    let again = tokio::task::spawn_blocking({
        let socket = d.socket.clone();
        move || {
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            write_frame(&mut s, json!({"type": "register", "endpoint": "closing"}));
            assert_eq!(read_frame(&mut s)["type"], "registered");
            let ns: Vec<Value> = (0..5)
                .map(|_| read_frame(&mut s)["body"]["n"].clone())
                .collect();
            (s, ns)
        }
    })
    .await
    .unwrap();
    assert_eq!(again.1, (0..5).map(Value::from).collect::<Vec<_>>());

    // These were consumed by a live client: the cursor moves past them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while unread(&d, "closing").await != 0 {
        assert!(
            Instant::now() < deadline,
            "consumed frames never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(again.0.shutdown(std::net::Shutdown::Both));
    sender.send(draft("closing", 5)).await.unwrap();
    let mut s = raw_register(&d, "closing");
    assert_eq!(
        read_frame(&mut s)["body"]["n"],
        5,
        "no duplicate of consumed frames"
    );
}

#[tokio::test]
async fn explicit_acks_move_the_cursor() {
    let d = Daemon::start();
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    for n in 0..3 {
        sender.send(draft("ex", n)).await.unwrap();
    }
    let mut c = register(&d, "ex", AckMode::Explicit).await;
    let first = next_message(&mut c).await;
    let _ = next_message(&mut c).await;
    c.send_frame(&ClientFrame::Ack { seq: first.seq })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while unread(&d, "ex").await != 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let mut c = register(&d, "ex", AckMode::Explicit).await;
    assert_eq!(next_message(&mut c).await.body.to_map()["n"], 1);
}

#[tokio::test]
async fn broadcast_reaches_every_known_agent_but_the_sender() {
    let d = Daemon::start();
    let mut a = register(&d, "a", AckMode::Auto).await;
    let mut b = register(&d, "b", AckMode::Auto).await;
    let mut c = register(&d, "c", AckMode::Auto).await;
    a.send(Draft {
        to: None,
        from: Some("a".into()),
        channel: None,
        meta: Default::default(),
        body: body(json!({"text": "all hands"})),
    })
    .await
    .unwrap();
    for conn in [&mut b, &mut c] {
        let m = next_message(conn).await;
        assert_eq!(m.body.as_str(), r#"{"text":"all hands"}"#);
        assert_eq!(m.to, "");
    }
    // The sender gets nothing back: its next frame is the pong.
    a.send_frame(&ClientFrame::Ping).await.unwrap();
    assert_eq!(a.next_frame().await.unwrap(), ServerFrame::Pong);
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_stall_others() {
    let d = Daemon::start();
    // `stuck` registers and never reads; a 1 MiB message fills its socket.
    let _stuck = raw_register(&d, "stuck");
    let mut ok = register(&d, "ok", AckMode::Auto).await;
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    let big = "x".repeat(1 << 20);
    for _ in 0..8 {
        sender
            .send(Draft {
                to: Some("stuck".into()),
                from: None,
                channel: None,
                meta: Default::default(),
                body: body(json!({ "blob": big })),
            })
            .await
            .unwrap();
    }
    for n in 0..20 {
        sender.send(draft("ok", n)).await.unwrap();
        assert_eq!(next_message(&mut ok).await.body.to_map()["n"], n);
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_a_clear_error() {
    let d = Daemon::start_with(&["--max-connections", "3"], &[]);
    // A connection that answers a ping. A slot frees once the daemon saw
    // its last holder leave (the harness's own readiness probe included),
    // so an admission may take a few tries.
    let admitted = || async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut c = Connection::connect(&d.socket).await.unwrap();
            if c.send_frame(&ClientFrame::Ping).await.is_ok() {
                if let Ok(ServerFrame::Pong) = c.next_frame().await {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "no slot came free");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(admitted().await);
    }
    let mut over = Connection::connect(&d.socket).await.unwrap();
    match over.next_frame().await.unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, "too_many_connections"),
        other => panic!("{other:?}"),
    }
    // A slot frees up when a client leaves.
    drop(held.pop());
    admitted().await;
}

// Issue 21 ("which other door shares it"): an auto-mode Unix delivery
// wrote a batch first and claimed it only once the client had consumed
// it, so a `/poll` of the same inbox meanwhile claimed and answered the
// very messages the client was reading. Now the batch is claimed before it
// is written, as `/subscribe` does: the `/poll` takes nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_beside_an_auto_mode_reader_hands_out_nothing_it_was_written() {
    const COUNT: u64 = 50;
    let d = Daemon::start();
    // Registered, then not reading: its frames sit in the socket.
    let mut s = raw_register(&d, "twin");
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    for n in 0..COUNT {
        sender.send(draft("twin", n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let polled: Vec<u64> = http
        .get(format!("{}/poll?agent=twin", d.http))
        .send()
        .await
        .unwrap()
        .json::<Vec<Value>>()
        .await
        .unwrap()
        .iter()
        .map(|m| m["n"].as_u64().unwrap())
        .collect();
    // The client reads all it was sent (until a second goes by quietly).
    let read = tokio::task::spawn_blocking(move || {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut got = Vec::new();
        let mut len = [0u8; 4];
        while std::io::Read::read_exact(&mut s, &mut len).is_ok() {
            let mut frame = vec![0; u32::from_be_bytes(len) as usize];
            std::io::Read::read_exact(&mut s, &mut frame).unwrap();
            let frame: Value = serde_json::from_slice(&frame).unwrap();
            got.push(frame["body"]["n"].as_u64().unwrap());
        }
        got
    });
    let read = read.await.unwrap();
    let twice: Vec<u64> = read
        .iter()
        .copied()
        .filter(|n| polled.contains(n))
        .collect();
    assert!(
        twice.is_empty(),
        "the Unix client and /poll both got {twice:?} (polled {polled:?})"
    );
    assert_eq!(read.len() as u64 + polled.len() as u64, COUNT);
}

/// An auto-mode reader that comes back after retention pruned part of its
/// inbox gets what is left once and its cursor moves over the gap. Its
/// claim used to start past the pruned part while the cursor stayed below
/// it: the cursor never moved, and the connection took the hole under its
/// claim for a released one, reading and writing the same batch again and
/// again (`hermod bench --nats-restart` lost its receiver to that).
#[tokio::test]
async fn an_auto_mode_reader_behind_retention_gets_the_rest_once() {
    let d = Daemon::start_with(&["--retention-messages", "5"], &[]);
    let mut sender = Connection::connect(&d.socket).await.unwrap();
    for n in 0..20 {
        sender.send(draft("late", n)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while unread(&d, "late").await > 5 {
        assert!(Instant::now() < deadline, "retention did not prune");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut late = register(&d, "late", AckMode::Auto).await;
    for n in 15..20 {
        let m = next_message(&mut late).await;
        assert_eq!(m.body.to_map()["n"], n);
    }
    let again = tokio::time::timeout(Duration::from_secs(2), late.next_frame()).await;
    assert!(again.is_err(), "delivered again: {again:?}");
    while unread(&d, "late").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the cursor did not move over the gap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// Issue 21 (the history checker's NATS run): an auto-mode reader working
// through a backlog never has everything written read at once (the daemon
// keeps its socket full), and the cursor moved only when it had: a client
// that read 1,500 messages and hung up got all of them again. Each batch
// it has read is confirmed on its own now; what can come again is at most
// what sat in the socket's buffers (about 300 KB) and the batch around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_mode_reader_of_a_backlog_keeps_what_it_read_when_it_hangs_up() {
    const SENT: u64 = 4000;
    const READ: u64 = 3000;
    let d = Daemon::start();
    drop(raw_register(&d, "backlog"));
    let http = reqwest::Client::new();
    for chunk in (0..SENT).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|n| json!({"from": "flood", "to": "backlog", "body": {"n": n, "pad": "x".repeat(400)}}))
            .collect();
        let r = http
            .post(format!("{}/v1/messages", d.http))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let socket = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write_frame(&mut s, json!({"type": "register", "endpoint": "backlog"}));
        assert_eq!(read_frame(&mut s)["type"], "registered");
        for n in 0..READ {
            assert_eq!(read_frame(&mut s)["body"]["n"], n);
            if n % 100 == 0 {
                // A reader slower than the daemon: its socket stays full.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // It hangs up with the rest unread.
    })
    .await
    .unwrap();
    // 512 messages a batch, about 470 bytes each: at least 3 batches of
    // what it read are stored as read once the daemon saw the hang-up,
    // and nothing it did not read.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut left = unread(&d, "backlog").await;
    while left > SENT - 1536 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = unread(&d, "backlog").await;
    }
    assert!(
        (SENT - READ..=SENT - 1536).contains(&left),
        "{left} of {SENT} unread after {READ} were read"
    );
}
