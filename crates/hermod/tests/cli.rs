//! The `hermod` command line: single instance, send/recv/agents, the
//! background manager, and clear failures.

use std::process::Command;

use crate::support::{stderr, stdout, Daemon, HERMOD};

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let d = Daemon::start();
    let other_socket = d.data_dir().join("other.sock");
    let out = Command::new(HERMOD)
        .arg("serve")
        .arg("--data-dir")
        .arg(d.data_dir())
        .arg("--socket")
        .arg(&other_socket)
        .args(["--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("in use by a running hermod (pid "), "{err}");
    assert!(!other_socket.exists(), "the refused server must not listen");
}

#[test]
fn send_then_recv_prints_blocks_and_resumes_from_the_cursor() {
    let d = Daemon::start();
    let out = d.cli(&["send", "--from", "alice", "bob", "hello bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("(seq 1)"));
    let multiline = "línea 1 🚀\n第二行\n";
    let out = d.cli_stdin(&["send", "bob"], Some(multiline));
    assert!(out.status.success(), "{}", stderr(&out));

    let out = d.cli(&["recv", "--count", "2", "--timeout", "20", "bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let blocks: Vec<&str> = text.split("---\n").filter(|b| !b.is_empty()).collect();
    assert_eq!(blocks.len(), 2, "{text}");
    assert!(
        blocks[0].ends_with("Z] from alice (default):\nhello bob\n"),
        "{text}"
    );
    assert!(blocks[0].starts_with('['));
    // stdin's one trailing newline is dropped, inner newlines kept.
    assert!(
        blocks[1].ends_with("Z] from anonymous (default):\nlínea 1 🚀\n第二行\n"),
        "{text}"
    );

    // Both were acknowledged: nothing left, so the timeout fires (124).
    let out = d.cli(&["recv", "--timeout", "1", "bob"]);
    assert_eq!(out.status.code(), Some(124), "{}", stdout(&out));
    assert_eq!(stdout(&out), "");

    let out = d.cli(&["send", "--channel", "ops", "bob", "on ops"]);
    assert!(out.status.success());
    let out = d.cli(&[
        "recv",
        "--json",
        "--count",
        "1",
        "--timeout",
        "20",
        "--channel",
        "ops",
        "bob",
    ]);
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(line["channel"], "ops");
    assert_eq!(line["body"]["text"], "on ops");
    assert_eq!(line["seq"], 3);

    let out = d.cli(&["agents"]);
    let table = stdout(&out);
    assert!(
        table.lines().any(|l| l.starts_with("bob ")
            && l.contains("default")
            && l.trim_end().ends_with(" 0")),
        "{table}"
    );
}

#[test]
fn client_commands_fail_clearly_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(HERMOD)
        .args(["send", "--socket"])
        .arg(dir.path().join("nope.sock"))
        .args(["bob", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the hermod daemon"),
        "{}",
        stderr(&out)
    );

    let out = Command::new(HERMOD)
        .args(["send", "--socket"])
        .arg(dir.path().join("nope.sock"))
        .args(["bad name", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn invalid_names_are_refused_with_a_clear_message() {
    let d = Daemon::start();
    let out = d.cli(&["send", "bad/name", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid_name"), "{}", stderr(&out));
    let out = d.cli(&["recv", "--timeout", "5", "no spaces"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid_name"), "{}", stderr(&out));
}

#[test]
fn start_status_stop_manage_a_background_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(HERMOD)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .args(if args[0] == "stop" || args[0] == "status" {
                &[][..]
            } else {
                &["--http", "127.0.0.1:0"][..]
            })
            .env_remove("HERMOD_SOCKET")
            .output()
            .unwrap()
    };
    let out = run(&["start"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let status = run(&["status"]);
    assert!(status.status.success());
    let text = stdout(&status);
    assert!(text.contains("hermod is running (pid "), "{text}");
    assert!(text.contains("connected endpoints: 0"));
    assert!(dir.path().join("hermod.log").exists());

    let out = run(&["restart"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = run(&["stop"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("hermod stopped"));
    let status = run(&["status"]);
    assert_eq!(status.status.code(), Some(3));
    assert!(
        !dir.path().join("hermod.sock").exists(),
        "socket removed on clean stop"
    );
}
