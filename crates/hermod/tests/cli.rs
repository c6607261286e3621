//! The `hermod` command line: single instance, send/recv/agents, the
//! background manager, and clear failures.

use std::process::Command;

use crate::support::{stderr, stdout, Daemon, HERMOD};

/// `line` with how its sender was verified (`[token]`, `[owner]`,
/// `[open]`: which one depends on the transport) written `[AUTH]`.
fn any_auth(line: &str) -> String {
    ["[token]", "[owner]", "[open]"]
        .iter()
        .fold(line.to_owned(), |l, a| l.replacen(a, "[AUTH]", 1))
}

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
fn send_then_recv_prints_lines_and_resumes_from_the_cursor() {
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
    let lines: Vec<String> = text.lines().map(any_auth).collect();
    assert_eq!(lines.len(), 2, "one line per message: {text}");
    assert!(lines[0].starts_with('['), "{text}");
    assert!(
        lines[0].ends_with("Z] from alice [AUTH] (default): hello bob"),
        "{text}"
    );
    // stdin's one trailing newline is dropped, inner newlines kept (and
    // shown escaped, on the message's one line).
    assert!(
        lines[1].ends_with(r"Z] from anonymous [AUTH] (default): línea 1 🚀\n第二行"),
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
    // A data directory an older version left open to everyone.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&["start"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700, "start tightens the data directory");
    assert_eq!(mode("hermod.log"), 0o600, "the log is born private");
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

#[test]
fn attachments_arrive_byte_identical_with_a_verified_sha256() {
    let d = Daemon::start();
    // 5 MiB of non-repeating bytes.
    let data: Vec<u8> = (0..5u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = d.data_dir().join("report.bin");
    std::fs::write(&file, &data).unwrap();
    let out = d.cli(&[
        "send",
        "--from",
        "ci",
        "--type",
        "task_done",
        "--file",
        file.to_str().unwrap(),
        "lead",
        "build artefact",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let save = d.data_dir().join("inbox-files");
    let out = d.cli(&[
        "wait",
        "--timeout",
        "30",
        "--save-dir",
        save.to_str().unwrap(),
        "lead",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = any_auth(&stdout(&out));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(
            "Z] from ci [AUTH] (default): build artefact [attachment report.bin (5242880 bytes, sha256 "
        ),
        "{text}"
    );
    assert!(
        text.contains("saved to ") && text.ends_with("sha256 verified]\n"),
        "{text}"
    );
    assert_eq!(std::fs::read(save.join("report.bin")).unwrap(), data);
}

#[test]
fn wait_inbox_broadcast_and_json_bodies() {
    let d = Daemon::start();
    let out = d.cli(&["wait", "--timeout", "0.5", "nobody-yet"]);
    assert_eq!(out.status.code(), Some(124), "wait times out with 124");
    let out = d.cli(&[
        "send",
        "--json",
        r#"{"k":[1,2],"emoji":"🎉"}"#,
        "--type",
        "progress",
        "peer",
        "",
    ]);
    assert!(!out.status.success(), "--json and TEXT conflict");
    let out = d.cli(&[
        "send",
        "--json",
        r#"{"k":[1,2],"emoji":"🎉"}"#,
        "--type",
        "progress",
        "peer",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // `inbox` peeks: twice the same, nothing acknowledged.
    for _ in 0..2 {
        let out = d.cli(&["inbox", "--json", "peer"]);
        let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(
            line["body"],
            serde_json::json!({"k": [1, 2], "emoji": "🎉", "type": "progress"})
        );
    }
    let out = d.cli(&["wait", "--timeout", "10", "peer"]);
    assert!(
        stdout(&out).contains(r#"{"k":[1,2],"emoji":"🎉","type":"progress"}"#),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stdout(&d.cli(&["inbox", "peer"])),
        "",
        "acknowledged by wait"
    );
    // A broadcast reaches every known agent but the sender.
    let out = d.cli(&["send", "--broadcast", "--from", "peer", "all hands"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&d.cli(&["inbox", "peer"])), "");
    assert!(stdout(&d.cli(&["inbox", "nobody-yet"])).contains("all hands"));
    let out = Command::new(HERMOD)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("hermod"));
}

#[test]
fn tail_shows_everything_as_it_is_stored() {
    let d = Daemon::start();
    let mut tail = Command::new(HERMOD)
        .args(["tail", "--socket"])
        .arg(&d.socket)
        .env_remove("HERMOD_URL")
        .env_remove("AGENT_BUS_URL")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The tail subscribes asynchronously: send until the first line shows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains("first for ann") {
        d.cli(&["send", "--from", "bob", "ann", "first for ann"]);
        while let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            seen.push_str(&line);
            seen.push('\n');
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tail printed nothing: {seen}"
        );
    }
    d.cli(&["pub", "deploy.done", r#"{"ok":true}"#]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen.contains("[deploy.done]") {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            seen.push_str(&line);
            seen.push('\n');
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no topic event in: {seen}"
        );
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(seen.contains("-> ann ["), "{seen}");
    assert!(seen.contains("-> * [deploy.done] ["), "{seen}");
}

/// An attachment field as `hermod send --file` makes it, under any name.
fn attachment_json(name: &str, data: &[u8]) -> serde_json::Value {
    use base64::Engine;
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    serde_json::json!({
        "name": name,
        "size": data.len(),
        "sha256": sha,
        "data": base64::engine::general_purpose::STANDARD.encode(data),
    })
}

#[test]
fn saved_attachments_never_escape_overwrite_or_follow_a_symlink() {
    let d = Daemon::start();
    let root = tempfile::tempdir().unwrap();
    let save = root.path().join("a").join("b").join("inbox");
    std::fs::create_dir_all(&save).unwrap();
    // Already there: a file of the user's, a symlink planted to a file
    // outside the directory, and a dangling one pointing outside.
    std::fs::write(save.join("report.txt"), "mine").unwrap();
    let secret = root.path().join("secret.txt");
    std::fs::write(&secret, "precious").unwrap();
    std::os::unix::fs::symlink(&secret, save.join("notes.txt")).unwrap();
    let dangling = root.path().join("made-through-a-symlink");
    std::os::unix::fs::symlink(&dangling, save.join("dangling.txt")).unwrap();

    let sent = [
        ("../../.bashrc", "evil rc"),
        ("report.txt", "theirs"),
        ("notes.txt", "through the link"),
        ("dangling.txt", "through the dangling link"),
        ("\u{1b}[2J/..", "no name left"),
    ];
    for (name, data) in sent {
        let body = serde_json::json!({
            "text": "file",
            "attachment": attachment_json(name, data.as_bytes()),
        });
        let out = d.cli(&[
            "send",
            "--from",
            "mallory",
            "--json",
            &body.to_string(),
            "lead",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = d.cli(&[
        "recv",
        "--count",
        "5",
        "--timeout",
        "30",
        "--save-dir",
        save.to_str().unwrap(),
        "lead",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 5, "{text}");

    // Nothing outside was written, nothing existing was changed.
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "precious");
    assert!(!dangling.exists(), "a symlink was followed");
    assert_eq!(
        std::fs::read_to_string(save.join("report.txt")).unwrap(),
        "mine"
    );
    assert!(std::fs::symlink_metadata(save.join("notes.txt"))
        .unwrap()
        .file_type()
        .is_symlink());
    let mut everywhere = Vec::new();
    let mut stack = vec![root.path().to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
            everywhere.push(entry.path());
        }
    }
    for path in &everywhere {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            !name.starts_with('.'),
            "a dotfile was written: {}",
            path.display()
        );
        assert!(
            path.starts_with(&save) || ["a", "b", "inbox", "secret.txt"].contains(&&*name),
            "written outside the save dir: {}",
            path.display()
        );
    }
    // Each arrived as a new file, under a plain name; a taken one numbered.
    let read = |n: &str| std::fs::read_to_string(save.join(n)).unwrap();
    assert_eq!(read("bashrc"), "evil rc");
    assert_eq!(read("report (1).txt"), "theirs");
    assert_eq!(read("notes (1).txt"), "through the link");
    assert_eq!(read("dangling (1).txt"), "through the dangling link");
    assert_eq!(read("attachment-5"), "no name left");
    // And the output says where each went.
    let report = save.join("report (1).txt");
    assert!(
        text.contains(&format!(
            "saved to {} (report.txt was taken)",
            report.display()
        )),
        "{text}"
    );
    assert!(text.contains(r"[attachment \e[2J/.. ("), "{text}");
}

/// Asserts the data directory is 0700 and everything hermod made in it is
/// accessible to its owner only: regular files 0600, the socket without
/// any group or other bit (a socket's x bit means nothing).
fn assert_private(dir: &std::path::Path) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
    // Compared as octal text, so a failure reads `755` rather than `493`.
    assert_eq!(
        format!("{:o}", mode(dir) & 0o777),
        "700",
        "{}",
        dir.display()
    );
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "test-daemon.log" {
            continue; // the harness's own capture of the daemon's output
        }
        let path = entry.path();
        let m = mode(&path) & 0o777;
        if entry.file_type().unwrap().is_socket() {
            assert_eq!(m & 0o077, 0, "{name} is {m:o}");
            assert_eq!(m & 0o600, 0o600, "{name} is {m:o}");
        } else {
            assert_eq!(format!("{m:o}"), "600", "{name}");
        }
        seen.push(name);
    }
    for wanted in ["hermod.db", "hermod.pid", "runtime.json", "hermod.sock"] {
        assert!(seen.iter().any(|n| n == wanted), "no {wanted} in {seen:?}");
    }
}

#[test]
fn the_data_dir_and_everything_in_it_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start();
    let out = d.cli(&["send", "--from", "a", "b", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_private(d.data_dir());

    // As an older version left it: a 0755 directory, 0644 files.
    d.stop();
    let chmod = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    chmod(d.data_dir(), 0o755);
    for entry in std::fs::read_dir(d.data_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            chmod(&entry.path(), 0o644);
        }
    }
    d.spawn();
    let out = d.cli(&["send", "--from", "a", "b", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_private(d.data_dir());
    let out = d.cli(&["recv", "--count", "2", "--timeout", "20", "b"]);
    assert_eq!(stdout(&out).lines().count(), 2, "the old log is still read");
}

/// A mistyped `to` becomes a name that receives every later broadcast;
/// `hermod agents forget` removes it with its inbox.
#[test]
fn agents_forget_removes_a_mistyped_name_and_its_inbox() {
    let d = Daemon::start();
    let out = d.cli(&["send", "--from", "boss", "reviwer", "please review"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&d.cli(&["agents"])).contains("reviwer"));
    assert!(stdout(&d.cli(&["inbox", "reviwer"])).contains("please review"));
    let out = d.cli(&["agents", "forget", "reviwer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&d.cli(&["agents"])).contains("reviwer"));
    assert_eq!(
        stdout(&d.cli(&["inbox", "reviwer"])),
        "",
        "its inbox went too"
    );
    // Broadcasts no longer reach it; forgetting it again is an error.
    let out = d.cli(&["send", "--broadcast", "--from", "boss", "all hands"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&d.cli(&["inbox", "reviwer"])), "");
    let out = d.cli(&["agents", "forget", "reviwer"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not known"), "{}", stderr(&out));
}
