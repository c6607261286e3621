//! Topic events through the daemon (hermes_events): pattern subscriptions
//! over SSE, WebSocket and the Unix socket, durable agent subscriptions, the
//! relay WebSockets with the real `websockets` client (and, for what an
//! agent token may relay, tokio-tungstenite), the relay token refused when
//! empty, and `hermod pub/sub`.

use crate::support::{run_python, Daemon};

#[test]
fn relay_accepts_relay_and_jsonrpc_frames_and_ignores_the_rest() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "relay.py"));
}

#[test]
fn topics_reach_pattern_subscribers_and_durable_subscriptions() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "topics.py"));
}

#[test]
fn pub_and_sub_commands() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "topics_cli.py"));
}

/// `channel=*` follows topic events of every channel in one stream (the
/// hermes_events firehose has no channels): over the v1 SSE stream and
/// `hermod sub --channel '*'`.
#[test]
fn every_channel_in_one_topic_stream() {
    use std::time::{Duration, Instant};
    let d = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sub = std::process::Command::new(crate::support::HERMOD)
        .args(["sub", "--socket"])
        .arg(&d.socket)
        .args(["--channel", "*", "--count", "2", "gateway.**"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let text = rt.block_on(async {
        let mut r = reqwest::Client::new()
            .get(format!("{}/v1/events?channel=*&pattern=gateway.**", d.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "subscribed once the head is here");
        // The CLI's subscription starts at some point: publish on two
        // channels (and a topic nobody follows) until it has two events.
        let deadline = Instant::now() + Duration::from_secs(20);
        while sub.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "hermod sub saw nothing");
            for (channel, topic) in [
                ("default", "gateway.agent.start"),
                ("ops", "gateway.agent.stop"),
                ("ops", "tui.ignored"),
            ] {
                let out = d.cli(&["pub", "--channel", channel, topic, "{\"n\":1}"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut text = String::new();
        while !(text.contains("gateway.agent.start") && text.contains("gateway.agent.stop")) {
            let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
                .await
                .expect("events within 10 s")
                .unwrap()
                .expect("the stream goes on");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    });
    assert!(!text.contains("tui.ignored"), "{text}");
    let out = sub.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(
        lines.contains("\"channel\":\"default\"") && lines.contains("\"channel\":\"ops\""),
        "one stream, both channels: {lines}"
    );
}

/// `serve --relay-token ""` (or an empty `HERMOD_RELAY_TOKEN`) would open
/// `/api/pub?token=` to anyone: refused at start, nothing listens.
#[test]
fn an_empty_relay_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hermod.sock");
    let serve = |flag: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(crate::support::HERMOD);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--socket")
            .arg(&socket)
            .args(["--http", "127.0.0.1:0"])
            .args(flag)
            .env_remove("HERMOD_RELAY_TOKEN");
        if let Some(value) = env {
            cmd.env("HERMOD_RELAY_TOKEN", value);
        }
        cmd.output().unwrap()
    };
    for out in [
        serve(&["--relay-token", ""], None),
        serve(&[], Some("")),
        serve(&["--relay-token", "  "], None),
    ] {
        let err = crate::support::stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("relay token must not be empty"), "{err}");
    }
    assert!(!socket.exists(), "the daemon never started");
}

/// A relay frame is checked before any listener sees it: from an agent
/// token, a frame outside its `may_publish` reaches neither the
/// `/api/events` WebSocket nor an SSE subscriber (and is not stored), and
/// the publisher gets an error frame; a permitted frame on the same
/// connection arrives at both.
#[test]
fn a_relay_frame_outside_may_publish_reaches_no_listener() {
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;

    let d = Daemon::start();
    let out = d.cli(&[
        "agent",
        "add",
        "--json",
        "--may-publish",
        "gateway.ok.**",
        "relayer",
    ]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&crate::support::stdout(&out)).unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let ws = d.http.replacen("http://", "ws://", 1);
    let frame = |topic: &str, m: &str| {
        serde_json::json!({ "_bus_relay": true, "topic": topic, "envelope": { "m": m } })
            .to_string()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The listeners, both in place once their handshakes are answered.
        let (mut listener, _) = tokio_tungstenite::connect_async(format!(
            "{ws}/api/events?channel=gateway&token={}",
            crate::support::RELAY_TOKEN
        ))
        .await
        .unwrap();
        let mut sse = reqwest::Client::new()
            .get(format!("{}/v1/events?channel=gateway&pattern=**", d.http))
            .send()
            .await
            .unwrap();
        assert_eq!(sse.status(), 200);

        let (mut publisher, _) =
            tokio_tungstenite::connect_async(format!("{ws}/api/pub?channel=gateway&token={token}"))
                .await
                .unwrap();
        for text in [
            frame("gateway.secret", "refused"),
            "not an event, from an agent".to_owned(),
            frame("gateway.ok.done", "allowed"),
        ] {
            publisher.send(Message::text(text)).await.unwrap();
        }
        let error = tokio::time::timeout(Duration::from_secs(10), publisher.next())
            .await
            .unwrap_or_else(|_| panic!("the error frame within 10 s"))
            .unwrap()
            .unwrap();
        let error: serde_json::Value = serde_json::from_str(error.to_text().unwrap()).unwrap();
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["code"], "forbidden", "{error}");
        let detail = error["detail"].as_str().unwrap();
        assert!(
            detail.contains("gateway.secret") && detail.contains("may_publish"),
            "{error}"
        );

        // The listener's first frame is the allowed one: frames reach it in
        // the order they were sent, so the refused one would be first.
        let first = tokio::time::timeout(Duration::from_secs(10), listener.next())
            .await
            .unwrap_or_else(|_| panic!("the allowed frame within 10 s"))
            .unwrap()
            .unwrap();
        assert_eq!(
            first.to_text().unwrap(),
            frame("gateway.ok.done", "allowed")
        );
        let mut text = String::new();
        while !text.contains("allowed") {
            let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
                .await
                .unwrap_or_else(|_| panic!("the allowed event over SSE within 10 s"))
                .unwrap()
                .expect("the stream goes on");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains("gateway.ok.done"), "{text}");
        // The log goes in seq order: had the refused frame been stored, it
        // would have come first.
        assert!(!text.contains("refused"), "{text}");
        let _ = publisher.close(None).await;
    });
}
