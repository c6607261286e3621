//! Trust: agent identities and tokens on every transport, spoofing refused,
//! ACL rules, the send rate, `--auth tokens`, and another local user (uid
//! `nobody`) refused without a token.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::{run_python, stderr, stdout, Daemon};

#[test]
fn identities_tokens_and_spoofing_on_every_transport() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "trust.py"));
}

#[test]
fn revoke_and_rotate_end_every_session_of_the_old_token() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "revoke.py"));
}

#[test]
fn a_burst_over_the_send_rate_is_refused_and_others_are_served() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "rate_limit.py"));
}

/// `curl -i` output of one request.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    stdout(&out)
}

#[test]
fn over_the_rate_http_answers_429_with_retry_after() {
    let d = Daemon::start_with(&["--send-rate", "0.5", "--send-burst", "2"], &[]);
    let send = || {
        curl(&[
            "-X",
            "POST",
            "-d",
            r#"{"from":"eager","to":"b","msg":"hi"}"#,
            &format!("{}/send", d.http),
        ])
    };
    assert!(send().starts_with("HTTP/1.1 200"));
    assert!(send().starts_with("HTTP/1.1 200"));
    let third = send();
    assert!(third.starts_with("HTTP/1.1 429"), "{third}");
    assert!(
        third.to_ascii_lowercase().contains("retry-after: "),
        "{third}"
    );
    assert!(third.contains(r#""code":"rate_limited""#), "{third}");
    // Another sender is not limited by eager's budget.
    let other = curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"from":"calm","to":"b","msg":"hi"}"#,
        &format!("{}/send", d.http),
    ]);
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
}

// A sender that makes up a new `from` for every message used to get a
// fresh budget each time: its uid is charged too now.
#[test]
fn a_new_from_per_message_does_not_reset_the_send_rate() {
    let d = Daemon::start_with(&["--send-rate", "0.5", "--send-burst", "2"], &[]);
    let worker = token_of(&d, &["worker"]);
    let send = |from: &str, auth: Option<&str>| {
        let body = format!(r#"{{"from":"{from}","to":"b","msg":"hi"}}"#);
        let header = auth.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["-X", "POST", "-d", &body];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        let url = format!("{}/send", d.http);
        args.push(&url);
        curl(&args)
    };
    // 16 agents' bursts (ORIGIN_SHARE x 2) and what refills meanwhile.
    let answers: Vec<String> = (0..80).map(|i| send(&format!("r{i}"), None)).collect();
    let limited = answers
        .iter()
        .position(|a| a.starts_with("HTTP/1.1 429"))
        .expect("80 made-up senders were never limited");
    assert!(limited >= 32, "limited after only {limited}");
    assert!(answers[limited].contains("uid "), "{}", answers[limited]);
    // A verified agent has its own budget.
    let verified = send("worker", Some(&worker));
    assert!(verified.starts_with("HTTP/1.1 200"), "{verified}");
}

#[test]
fn tokens_mode_needs_a_token_on_every_request() {
    let d = Daemon::start_with(&["--auth", "tokens"], &[]);
    let out = d.cli(&["send", "--from", "a", "b", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unauthorized"), "{}", stderr(&out));
    assert!(curl(&[&format!("{}/healthz", d.http)]).starts_with("HTTP/1.1 401"));
    // The owner manages identities over the socket in every mode.
    let admin = token_of(&d, &["--admin", "root"]);
    let worker = token_of(&d, &["worker"]);
    let sent = d.cli_token(&["send", "b", "hi"], &worker);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let metrics = format!("{}/metrics", d.http);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    assert!(curl(&["-H", &bearer(&worker), &metrics]).starts_with("HTTP/1.1 403"));
    let ok = curl(&["-H", &bearer(&admin), &metrics]);
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("hermod_log_seq 1"),
        "{ok}"
    );
}

/// `hermod agent add --json ARGS`: the new token.
fn token_of(d: &Daemon, args: &[&str]) -> String {
    let mut all = vec!["agent", "add", "--json"];
    all.extend(args);
    let out = d.cli(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// The process runs as root (CI does): only then can it run a client as `nobody`.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| stdout(&o).trim() == "0")
}

#[test]
fn another_local_user_is_refused_without_a_token_and_served_with_one() {
    if !is_root() {
        eprintln!("skipped: running a client as uid nobody needs root (CI runs as root)");
        return;
    }
    let d = Daemon::start();
    // Make the socket reachable for everyone, so what refuses `nobody` is
    // the daemon's peer-credential check and not the file mode.
    std::fs::set_permissions(d.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let token = token_of(&d, &["nob"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/as_nobody.py");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["python3", script])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HERMOD_SOCKET", &d.socket)
        .env("HERMOD_URL", &d.http)
        .env("AGENT_TOKEN", &token)
        .env("AGENT_NAME", "nob")
        .output()
        .expect("run setpriv");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "as_nobody.py failed:\n{text}");
    println!("{text}");
    // What got through is exactly what the token allowed, as the token's agent.
    let inbox = d.cli(&["inbox", "--json", "victim"]);
    let lines: Vec<serde_json::Value> = stdout(&inbox)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for m in &lines {
        assert_eq!(
            (m["from"].as_str(), m["auth"].as_str()),
            (Some("nob"), Some("token")),
            "{m}"
        );
    }
}
