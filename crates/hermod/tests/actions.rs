//! Wake-up actions from `config.toml`: a named pipe (with and without a
//! reader), a real tmux pane, a webhook, and the filters.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{stderr, Daemon};

fn metric(d: &Daemon, name: &str) -> u64 {
    let text = std::process::Command::new("curl")
        .args(["-s", &format!("{}/metrics", d.http)])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn send(d: &Daemon, to: &str, text: &str) {
    let out = d.cli(&["send", "--from", "boss", to, text]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_named_pipe_gets_each_message_and_an_absent_reader_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("leo.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let config = format!(
        "[[action]]\nkind = \"append\"\npath = {:?}\nto = \"leo\"\n",
        fifo.display().to_string()
    );
    let d = Daemon::start_with_config(&config, &[]);

    // No reader: routing goes on, the action fails fast and is counted.
    for n in 0..3 {
        send(&d, "leo", &format!("nobody listens {n}"));
    }
    let out = d.cli(&["recv", "--count", "3", "--timeout", "20", "leo"]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&d, "hermod_action_failures_total{kind=\"append\"}") < 3 {
        assert!(
            Instant::now() < deadline,
            "failures never counted\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A reader (read-write open: it never sees EOF between writers).
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    send(&d, "leo", "wake up, leo");
    send(&d, "someone-else", "not for leo"); // filtered out
    send(&d, "leo", "second one");
    let mut got = Vec::new();
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a line on the pipe");
        let frame: serde_json::Value = serde_json::from_str(&line).unwrap();
        got.push(frame["body"]["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["wake up, leo", "second one"]);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the filter let another through"
    );
}

#[test]
fn a_tmux_pane_gets_a_one_line_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .env("TMUX_TMPDIR", tmp.path())
            .env_remove("TMUX")
            .output()
            .expect("tmux is installed (.ci/run installs it)")
    };
    // A pane running `cat`: whatever is typed into it shows on the screen.
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "agent",
        "-x",
        "220",
        "-y",
        "20",
        "cat",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = "[[action]]\nkind = \"tmux\"\ntarget = \"agent:0.0\"\nto = \"claude\"\n";
    let d = Daemon::start_with_config(config, &[("TMUX_TMPDIR", tmp.path().to_str().unwrap())]);
    send(&d, "claude", "please review PR 42\nsecond line stays out");
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let screen =
            String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "agent:0.0"]).stdout)
                .into_owned();
        if screen.contains("please review PR 42") {
            break screen;
        }
        assert!(
            Instant::now() < deadline,
            "nothing typed into the pane:\n{screen}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    tmux(&["kill-server"]);
    assert!(
        screen.contains("[hermod] message from boss to claude (default): please review PR 42"),
        "{screen}"
    );
    assert!(!screen.contains("second line stays out"), "{screen}");
}

#[test]
fn a_webhook_gets_the_message_json_and_topic_filters_apply() {
    // A one-request-at-a-time HTTP server that records bodies.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = stream.read(&mut chunk).unwrap();
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                }
            };
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Some(body) = body {
                let _ = tx.send(body);
            }
        }
    });
    let config = format!("[[action]]\nkind = \"webhook\"\nurl = {url:?}\ntopic = \"ci.*\"\n");
    let d = Daemon::start_with_config(&config, &[]);
    send(&d, "anyone", "a plain message: no topic, no webhook");
    let out = d.cli(&[
        "pub",
        "--durable",
        "ci.failed",
        r#"{"job":"build","emoji":"🔥"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["pub", "ci.deep.nested", "{}"]);
    assert!(out.status.success());
    let body = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the webhook was called");
    let frame: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(frame["topic"], "ci.failed");
    assert_eq!(frame["body"]["job"], "build");
    assert_eq!(frame["body"]["emoji"], "🔥");
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "only ci.* events call it"
    );
}
