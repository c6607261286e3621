//! `hermod start` and `restart` run exactly what `serve` would: flags that
//! used to be dropped on the way to the background daemon (`--auth`, the
//! send rate, retention, `--allow-host`) take effect there, and its secret
//! stays out of its argv.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::{stderr, stdout, HERMOD};

/// The relay token of [`start_forwards_allow_host_and_keeps_the_relay_token_out_of_argv`].
const RELAY_TOKEN: &str = "start-relay-sekret";

/// A daemon `hermod start` put in the background on a temporary data
/// directory; `hermod stop` on drop, so a failing test leaves none running.
struct Background {
    dir: tempfile::TempDir,
}

impl Background {
    /// `hermod start ARGS` on a fresh data directory, HTTP on a free port.
    fn start(args: &[&str]) -> Self {
        let b = Background {
            dir: tempfile::tempdir().unwrap(),
        };
        b.manage("start", args);
        b
    }

    /// `hermod start|restart ARGS` on this data directory; panics unless it
    /// succeeds. Variables the harness may have set stay out, so only the
    /// flags decide.
    fn manage(&self, verb: &str, args: &[&str]) {
        let out = Command::new(HERMOD)
            .arg(verb)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["--http", "127.0.0.1:0"])
            .args(args)
            .env("HERMES_BUS_HOOKS", "none")
            .env_remove("HERMOD_SOCKET")
            .env_remove("HERMOD_AUTH")
            .env_remove("HERMOD_RELAY_TOKEN")
            .env_remove("HERMOD_NATS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hermod {verb} failed: {}{}\n{}",
            stdout(&out),
            stderr(&out),
            self.log()
        );
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `host:port` of the HTTP front, from `runtime.json`.
    fn http(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir().join("runtime.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let url = v["http"].as_str().expect("an HTTP front").to_owned();
        url.trim_start_matches("http://").to_owned()
    }

    /// The daemon's pid, from its pid file.
    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.data_dir().join("hermod.pid")).unwrap();
        text.trim().parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("hermod.log")).unwrap_or_default()
    }

    /// The hermod CLI against this daemon's socket.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(HERMOD)
            .args(args)
            .env("HERMOD_HOME", self.data_dir())
            .env_remove("HERMOD_SOCKET")
            .env_remove("HERMOD_URL")
            .env_remove("AGENT_BUS_URL")
            .env_remove("HERMOD_TOKEN")
            .env_remove("AGENT_BUS_CHANNEL")
            .output()
            .unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let out = Command::new(HERMOD)
            .arg("stop")
            .arg("--data-dir")
            .arg(self.dir.path())
            .output();
        if std::thread::panicking() {
            eprintln!(
                "----- hermod log -----\n{}\n----------------------",
                self.log()
            );
        }
        let stopped = out.is_ok_and(|o| o.status.success());
        if !stopped && !std::thread::panicking() {
            panic!("hermod stop failed");
        }
    }
}

/// One HTTP/1.1 request on its own connection to `addr`; the whole
/// response as text (in-process, so rapid requests are rapid).
fn request(addr: &str, head: &str, body: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let raw = format!(
        "{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// An agent-bus `POST /send` from `from` to `to`.
fn send(addr: &str, from: &str, to: &str) -> String {
    let body = format!(r#"{{"from":"{from}","to":"{to}","msg":"hi"}}"#);
    request(addr, &format!("POST /send HTTP/1.1\r\nHost: {addr}"), &body)
}

#[test]
fn start_with_auth_tokens_refuses_a_send_without_a_token() {
    let b = Background::start(&["--auth", "tokens"]);
    let answer = send(&b.http(), "a", "b");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

#[test]
fn restart_applies_the_send_rate_it_is_given() {
    let b = Background::start(&[]);
    // `restart` goes the same way as `start`.
    b.manage("restart", &["--send-rate", "2", "--send-burst", "2"]);
    let addr = b.http();
    let answers: Vec<String> = (0..3).map(|_| send(&addr, "eager", "b")).collect();
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 200"), "{}", answers[1]);
    assert!(answers[2].starts_with("HTTP/1.1 429"), "{}", answers[2]);
    assert!(
        answers[2].contains(r#""code":"rate_limited""#),
        "{}",
        answers[2]
    );
}

#[test]
fn start_applies_the_retention_flags() {
    let b = Background::start(&["--retention-age", "off", "--retention-messages", "3"]);
    // The rules the daemon logs at start: no age limit (not the 30 days of
    // the default), 3 messages per inbox.
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("retention"))
        .unwrap_or_else(|| panic!("no retention line in the log:\n{log}"));
    assert!(line.contains("age: None"), "{line}");
    assert!(line.contains("inbox_messages: Some(3)"), "{line}");
    let addr = b.http();
    for _ in 0..6 {
        let answer = send(&addr, "alice", "bob");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Retention prunes once a second: bob's inbox shrinks to its newest 3.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = b.cli(&["inbox", "--json", "bob"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let waiting = stdout(&out).lines().count();
        if waiting == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's inbox still holds {waiting} messages:\n{}",
            stdout(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn start_forwards_allow_host_and_keeps_the_relay_token_out_of_argv() {
    let b = Background::start(&["--allow-host", "bus.example", "--relay-token", RELAY_TOKEN]);
    let addr = b.http();
    let get = |host: &str| request(&addr, &format!("GET /healthz HTTP/1.1\r\nHost: {host}"), "");
    let named = get("bus.example");
    assert!(named.starts_with("HTTP/1.1 200"), "{named}");
    let other = get("other.example");
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    // `ps` shows argv to every user; the token travels in the environment.
    let argv = std::fs::read(format!("/proc/{}/cmdline", b.pid())).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains("--allow-host=bus.example"), "{argv}");
    assert!(!argv.contains(RELAY_TOKEN), "{argv}");
}
