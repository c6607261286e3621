//! Topic events through the daemon (hermes_events): pattern subscriptions
//! over SSE, WebSocket and the Unix socket, durable agent subscriptions, the
//! relay WebSockets with the real `websockets` client, and `hermod pub/sub`.

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
