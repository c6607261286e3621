//! `hermod bridge`: a local daemon's topic events reach a remote daemon
//! through its relay endpoint, with the original `ts`/`src`, and what is
//! published while the remote is down arrives once it is back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermod_client::Connection;
use hermod_core::wire::{ClientFrame, ServerFrame};
use serde_json::{json, Value};

use crate::support::{free_port, Daemon, HERMOD, RELAY_TOKEN};

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn publish(local: &Daemon, topic: &str, n: u64) -> ServerFrame {
    let mut c = Connection::connect(&local.socket).await.unwrap();
    let payload =
        hermod_core::model::Body::from_map(json!({ "n": n }).as_object().unwrap().clone());
    c.request(&ClientFrame::Publish {
        topic: topic.into(),
        payload: Some(payload),
        channel: None,
        durable: Some(true),
    })
    .await
    .unwrap()
}

/// The topic events in `watcher`'s inbox on the remote's `gateway` channel.
async fn remote_events(http: &reqwest::Client, remote: &Daemon) -> Vec<Value> {
    let url = format!(
        "{}/v1/agents/watcher/inbox?channel=gateway&after=0&limit=1000",
        remote.http
    );
    match http.get(url).send().await {
        Ok(resp) => resp.json::<Value>().await.map_or(Vec::new(), |page| {
            page["messages"].as_array().cloned().unwrap_or_default()
        }),
        Err(_) => Vec::new(), // the remote is restarting
    }
}

async fn wait_for_events(http: &reqwest::Client, remote: &Daemon, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = remote_events(http, remote).await;
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} events arrived",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_bridge_ships_events_and_survives_the_remote_restarting() {
    let port = free_port().to_string();
    let mut remote = Daemon::start_with(&["--http", &format!("127.0.0.1:{port}")], &[]);
    let local = Daemon::start();
    let http = reqwest::Client::new();
    // A durable subscription on the remote collects what the relay publishes.
    let resp = http
        .post(format!("{}/v1/agents/watcher/subscriptions", remote.http))
        .json(&json!({ "pattern": "**", "channel": "gateway" }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let _bridge = Bridge(
        Command::new(HERMOD)
            .arg("bridge")
            .arg("--socket")
            .arg(&local.socket)
            .args([
                "--to",
                &format!("ws://127.0.0.1:{port}/api/pub"),
                "--token",
                RELAY_TOKEN,
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The bridge subscribes live: publish until the first event gets through.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        publish(&local, "gateway.agent.start", 0).await;
        if let Some(e) = remote_events(&http, &remote).await.first() {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the bridge never shipped an event"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first["from"], "relay");
    assert_eq!(first["body"]["src"], "gateway");
    assert_eq!(first["body"]["type"], "gateway.agent.start");

    // The remote goes away; the local publisher never waits for it.
    remote.stop();
    let started = Instant::now();
    let mut local_ts = Vec::new();
    for n in 1..=50 {
        match publish(&local, "tui.tool.start", n).await {
            ServerFrame::Published { seq: Some(_), .. } => {}
            other => panic!("{other:?}"),
        }
        local_ts.push(n);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    remote.spawn();

    // Late copies of the warm-up event (n = 0) may still trickle in: only
    // the events published during the outage count.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after: Vec<Value> = loop {
        let outage: Vec<Value> = remote_events(&http, &remote)
            .await
            .into_iter()
            .filter(|e| e["body"]["n"] != 0)
            .collect();
        if outage.len() >= 50 {
            break outage;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 50 outage events arrived",
            outage.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ns: Vec<u64> = after
        .iter()
        .map(|e| e["body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns,
        (1..=50).collect::<Vec<_>>(),
        "events from the outage, in order"
    );
    // The envelope is the local one: its ts was stamped by the local daemon.
    for e in &after {
        assert_eq!(e["body"]["src"], "tui");
        assert!(e["body"]["ts"].as_f64().unwrap() < e["ts"].as_f64().unwrap());
    }
}

#[tokio::test]
async fn an_in_process_bus_ships_through_the_library_bridge() {
    let remote = Daemon::start();
    let http = reqwest::Client::new();
    http.post(format!("{}/v1/agents/watcher/subscriptions", remote.http))
        .json(&json!({ "pattern": "**", "channel": "gateway" }))
        .send()
        .await
        .unwrap();
    let bus = hermod_events::Bus::new();
    let ws = remote.http.replacen("http://", "ws://", 1) + "/api/pub";
    let config = hermod_client::bridge::BridgeConfig {
        url: ws,
        token: RELAY_TOKEN.into(),
        channel: "gateway".into(),
        pattern: "**".into(),
    };
    let (_bridge, _handle) = hermod_client::bridge::Bridge::attach(&bus, config).unwrap();
    let event = |v: Value| v.as_object().unwrap().clone();
    bus.publish(
        "gateway.agent.start",
        event(json!({ "ts": 1234.5, "src": "gw-orig" })),
    )
    .unwrap();
    // Arrived by relay: never shipped back.
    bus.publish("gateway.echo", event(json!({ "_bus_relayed": true })))
        .unwrap();
    bus.publish("tui.tool.start", event(json!({ "tool": "bash" })))
        .unwrap();
    let events = wait_for_events(&http, &remote, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = if events.len() == 2 {
        remote_events(&http, &remote).await
    } else {
        events
    };
    let topics: Vec<&str> = events
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["gateway.agent.start", "tui.tool.start"]);
    assert_eq!(events[0]["body"]["ts"], 1234.5, "the original ts is kept");
    assert_eq!(events[0]["body"]["src"], "gw-orig");
}
