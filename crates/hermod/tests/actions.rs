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

/// A private tmux server (its own `TMUX_TMPDIR`), killed on drop.
struct Tmux {
    tmp: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Self {
        Tmux {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn tmpdir(&self) -> &str {
        self.tmp.path().to_str().unwrap()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(args)
            .env("TMUX_TMPDIR", self.tmp.path())
            .env_remove("TMUX")
            .output()
            .expect("tmux is installed (.ci/run installs it)")
    }

    /// A detached session `name` running `command`, wide enough that the
    /// capped summary (fullwidth characters take two columns) fits.
    fn session(&self, name: &str, cwd: &std::path::Path, command: &[&str]) {
        let mut args = vec!["new-session", "-d", "-s", name, "-x", "800", "-y", "40"];
        args.extend(["-c", cwd.to_str().unwrap()]);
        args.extend(command);
        let out = self.run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// The pane's text, wrapped lines joined (`-J`).
    fn screen(&self, target: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-J", "-t", target]).stdout)
            .into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn a_tmux_pane_gets_a_one_line_summary() {
    let tmux = Tmux::new();
    // A pane running `cat`: whatever is typed into it shows on the screen.
    tmux.session("agent", tmux.tmp.path(), &["cat"]);
    let config = "[[action]]\nkind = \"tmux\"\ntarget = \"agent:0.0\"\nto = \"claude\"\n";
    let d = Daemon::start_with_config(config, &[("TMUX_TMPDIR", tmux.tmpdir())]);
    send(&d, "claude", "please review PR 42\nsecond line stays on it");
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let screen = tmux.screen("agent:0.0");
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
    // The CLI's sender is not token-verified, so the line says so; the
    // line break shows as ␊ instead of pressing Enter.
    assert!(
        screen.contains(
            "［hermod］ message from boss （unverified） to claude （default）: \
             please review PR 42␊second line stays on it"
        ),
        "{screen}"
    );
    assert!(
        !screen.lines().any(|l| l.starts_with("second line")),
        "{screen}"
    );
}

/// The shells a pane may fall back to, as they start without any rc file;
/// those not installed here are skipped (bash and dash always are).
fn plain_shells() -> Vec<(&'static str, Vec<&'static str>)> {
    let candidates: [(&str, &[&str]); 4] = [
        ("bash", &["bash", "--norc", "--noprofile"]),
        ("dash", &["dash"]),
        ("zsh", &["zsh", "-f"]),
        ("fish", &["fish", "--no-config"]),
    ];
    candidates
        .into_iter()
        .filter(|(name, _)| {
            Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(name, cmd)| (name, cmd.to_vec()))
        .collect()
}

#[test]
fn a_hostile_message_typed_into_a_plain_shell_runs_nothing() {
    let tmux = Tmux::new();
    let work = tempfile::tempdir().unwrap();
    // Relative to the panes' working directory, which keeps the text short
    // enough for the summary's cap.
    let target = format!("pwned-{}", std::process::id());
    let pwned = work.path().join(&target);
    let shells = plain_shells();
    assert!(shells.iter().any(|(n, _)| *n == "bash"), "bash is needed");
    let mut config = String::new();
    for (name, command) in &shells {
        tmux.session(name, work.path(), command);
        config.push_str(&format!(
            "[[action]]\nkind = \"tmux\"\ntarget = \"{name}:0.0\"\nto = \"victim\"\n"
        ));
    }
    let d = Daemon::start_with_config(&config, &[("TMUX_TMPDIR", tmux.tmpdir())]);
    // Every way to end, cancel or extend a command line. The old summary
    // typed the first line only, and its `(default)` made that first
    // command line a syntax error, so the attack starts after a `\r`; ^C
    // comes on the second line, as the tty would flush everything typed
    // before it.
    let p = &target;
    let text = format!(
        "x\rtouch {p}; $(touch {p}) `touch {p}` | sh\r\u{1b}[2J\u{1b}]0;x\u{7} && touch {p} \
         # !! ~ * %1 {{a,b}} > {p}\nsecond line \u{3}; touch {p}\r\n"
    );
    send(&d, "victim", &text);

    for (name, _) in &shells {
        let pane = format!("{name}:0.0");
        // Synchronise without fixed sleeps: first the shell answers the
        // typed line (its command word is not found), then a marker we
        // type ourselves comes back, so the shell has finished everything
        // typed before it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut synced = false;
        let screen = loop {
            assert!(
                !pwned.exists(),
                "{name}: the message ran a command:\n{}",
                tmux.screen(&pane)
            );
            let screen = tmux.screen(&pane);
            let answered = screen.contains("message from boss")
                && screen
                    .lines()
                    .any(|l| l.contains("not found") || l.contains("Unknown command"));
            if answered && !synced {
                tmux.run(&["send-keys", "-t", &pane, "-l", "echo sync-42"]);
                tmux.run(&["send-keys", "-t", &pane, "Enter"]);
                synced = true;
            }
            if synced && screen.lines().any(|l| l.trim() == "sync-42") {
                break screen;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: the pane never answered:\n{screen}\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!pwned.exists(), "{name}: the message ran a command");
        // Exactly one line shows the message, with everything escaped.
        let shown: Vec<&str> = screen
            .lines()
            .filter(|l| l.contains("message from boss"))
            .collect();
        assert_eq!(shown.len(), 1, "{name}:\n{screen}");
        let line = shown[0];
        for part in [
            "［hermod］ message from boss （unverified） to victim （default）: x␍touch ",
            "； ＄（touch ",
            "｀touch ",
            "｀ ｜ sh␍␛［2J␛］0；x␇ ＆＆ touch ",
            "＃ ！！ ～ ＊ ％1 ｛a,b｝ ＞ ",
            "␊second line ␃； touch ",
        ] {
            assert!(line.contains(part), "{name}: {part:?} missing in\n{line}");
        }
        assert!(!screen.lines().any(|l| l.starts_with("second line")));
    }
    assert!(!pwned.exists());
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

#[test]
fn low_priority_messages_wake_a_pane_once_as_a_digest_and_urgent_ones_each() {
    let tmux = Tmux::new();
    // What is typed into the pane lands in a file once per wake-up (the
    // screen would show it twice: the terminal's echo, then `cat`).
    tmux.session("agent", tmux.tmp.path(), &["sh", "-c", "cat > typed.log"]);
    let typed = tmux.tmp.path().join("typed.log");
    let config = "[delivery]\ndigest_every = 4\n\n[[action]]\nkind = \"tmux\"\n\
                  target = \"agent:0.0\"\nto = \"claude\"\n";
    let d = Daemon::start_with_config(config, &[("TMUX_TMPDIR", tmux.tmpdir())]);
    for n in 1..=10 {
        let out = d.cli(&[
            "send",
            "--from",
            "bot",
            "--priority",
            "low",
            "claude",
            &format!("low {n}"),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for name in ["urgent A", "urgent B"] {
        let out = d.cli(&[
            "send",
            "--from",
            "boss",
            "--priority",
            "urgent",
            "claude",
            name,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let screen = loop {
        let screen = std::fs::read_to_string(&typed).unwrap_or_default();
        if screen.contains("digest:") && screen.contains("urgent B") {
            break screen;
        }
        assert!(
            Instant::now() < deadline,
            "no digest:\n{screen}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
    let digests: Vec<&&str> = lines.iter().filter(|l| l.contains("digest:")).collect();
    assert_eq!(digests.len(), 1, "one digest wake-up:\n{screen}");
    assert!(
        digests[0].contains("digest: 10 low-priority messages to claude from bot； newest: low 10"),
        "{screen}"
    );
    // Each urgent message woke the pane at once, on its own line.
    for name in ["urgent A", "urgent B"] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(name)).count(),
            1,
            "{screen}"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("low 1") && !l.contains("digest:")),
        "{screen}"
    );
}
