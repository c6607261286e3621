//! Hooks: the exact message JSON on stdin; a hook that hangs delays nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hermod_client::{Connection, Draft};
use hermod_core::wire::{AckMode, ClientFrame, ServerFrame};
use serde_json::{json, Value};

use crate::support::Daemon;

fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn hooks_get_the_message_json_and_a_hanging_hook_delays_nothing() {
    let hooks = tempfile::tempdir().unwrap();
    let slow = hooks.path().join("slow.sh");
    let capture = hooks.path().join("capture.py");
    let out_dir = hooks.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    script(&slow, "#!/bin/sh\nsleep 60\n");
    script(
        &capture,
        &format!(
            "import sys, uuid\nopen({:?} + '/' + uuid.uuid4().hex, 'wb').write(sys.stdin.buffer.read())\n",
            out_dir.display().to_string()
        ),
    );
    let list = format!("{},{}", slow.display(), capture.display());
    let d = Daemon::start_with_env(&[("HERMES_BUS_HOOKS", &list)]);

    let mut rx = Connection::connect(&d.socket).await.unwrap();
    rx.request(&ClientFrame::Register {
        endpoint: "woken".into(),
        channel: None,
        ack: Some(AckMode::Auto),
        gaps: None,
    })
    .await
    .unwrap();
    let mut tx = Connection::connect(&d.socket).await.unwrap();
    // More messages than hook slots: the sleeping hooks fill every slot.
    let started = Instant::now();
    let mut delivered = Vec::new();
    for n in 0..20 {
        tx.send(Draft {
            to: Some("woken".into()),
            from: Some("hooker".into()),
            channel: None,
            meta: Default::default(),
            body: hermod_core::model::Body::from_map(
                json!({"text": "wake up", "n": n, "emoji": "⏰"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        })
        .await
        .unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(20), rx.next_frame())
            .await
            .unwrap()
            .unwrap();
        let ServerFrame::Message(m) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(m.body.to_map()["n"], n);
        delivered.push(m);
    }
    // The slow hook sleeps 60 s; delivery of all 20 finished long before.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "delivery waited for hooks"
    );

    // The capture hook got the first message's frame exactly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let captured: Value = loop {
        let files: Vec<_> = std::fs::read_dir(&out_dir).unwrap().flatten().collect();
        let mut found = None;
        for f in files {
            let v: Value = match serde_json::from_slice(&std::fs::read(f.path()).unwrap()) {
                Ok(v) => v,
                Err(_) => continue, // still being written
            };
            if v["body"]["n"] == 0 {
                found = Some(v);
            }
        }
        if let Some(v) = found {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "capture hook never ran\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expected = serde_json::to_value(ServerFrame::Message(delivered[0].clone())).unwrap();
    assert_eq!(captured, expected);
    assert_eq!(captured["type"], "message");
}
