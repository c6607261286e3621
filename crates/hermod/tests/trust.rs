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

// An agent with an identity that said it was busy got forbidden_sender:
// the presence event was published as its name without its token.
#[test]
fn an_agent_with_a_token_sets_its_presence() {
    let d = Daemon::start();
    let worker = token_of(&d, &["worker", "--may-publish", "ci.**"]);
    let set = |token: Option<&str>| {
        let header = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["-X", "POST", "-d", r#"{"status":"busy"}"#];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        let url = format!("{}/v1/agents/worker/presence", d.http);
        args.push(&url);
        curl(&args)
    };
    let answer = set(Some(&worker));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Without its token the owner still may not speak for it.
    let answer = set(None);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

// `tail` with an admin token bound to one channel used to show every
// channel's traffic.
#[test]
fn a_bound_admin_tails_its_channel_only() {
    use crate::support::{read_frame, write_frame};
    let d = Daemon::start();
    let admin = token_of(&d, &["--channel", "dev", "--admin", "devadmin"]);
    let mut tail = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    tail.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write_frame(
        &mut tail,
        serde_json::json!({"type": "tail", "token": admin}),
    );
    // The tail is live once a frame sent after it is answered in order.
    write_frame(
        &mut tail,
        serde_json::json!({"type": "ping", "token": admin}),
    );
    assert_eq!(read_frame(&mut tail)["type"], "pong");
    for channel in ["ops", "dev"] {
        let out = d.cli(&["send", "--from", "a", "--channel", channel, "b", channel]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let seen = read_frame(&mut tail);
    assert_eq!(seen["channel"], "dev", "{seen}");
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

// ── Channel-bound tokens see their channel only ────────────────────────────

/// The names in an agent list (`AgentSummary` JSON), as `name@channel`.
fn listed(agents: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = agents
        .as_array()
        .expect("a list of agents")
        .iter()
        .map(|a| {
            format!(
                "{}@{}",
                a["name"].as_str().unwrap(),
                a["channel"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

/// `hermod mcp` as `agent` with `token`: the text of its `list_agents` tool.
fn mcp_list_agents(d: &Daemon, agent: &str, channel: &str, token: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let mut child = Command::new(crate::support::HERMOD)
        .args(["mcp", "--agent", agent, "--channel", channel])
        .env("HERMOD_SOCKET", &d.socket)
        .env("HERMOD_TOKEN", token)
        .env_remove("HERMOD_URL")
        .env_remove("AGENT_BUS_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Lines read on a thread, so that a silent server fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let answer = |id: u64| loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("an MCP answer within 20 s");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["id"] == id {
            return v;
        }
    };
    let mut say = |v: serde_json::Value| writeln!(stdin, "{v}").unwrap();
    say(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "trust-test", "version": "0"}}}),
    );
    answer(1);
    say(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    say(
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "list_agents", "arguments": {}}}),
    );
    let v = answer(2);
    let _ = child.kill();
    let _ = child.wait();
    v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("list_agents: {v}"))
        .to_owned()
}

/// A token bound to `dev` gets nothing of `ops` through any door that
/// lists agents, endpoints or messages: `GET /v1/threads/{id}`, `GET
/// /v1/agents`, `/status`, agent-bus `/inbox`, the Unix socket's `agents`
/// and `list_endpoints`, the v1 WebSocket's `agents` frame and the MCP
/// `list_agents` tool. The owner still sees both channels.
#[test]
fn a_channel_bound_token_sees_its_channel_only() {
    use futures::{SinkExt, StreamExt};
    use hermod_client::Connection;
    use serde_json::{json, Value};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let d = Daemon::start();
    let dev = token_of(&d, &["--channel", "dev", "devbot"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `_endpoints` stay open (registered) until the end of the test.
    let (mut owner_conn, _endpoints, thread) = rt.block_on(async {
        let http = reqwest::Client::new();
        let post = |path: &str, body: Value| {
            let req = http.post(format!("{}{path}", d.http)).json(&body);
            let path = path.to_owned();
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200, "{path}");
                r.json::<Value>().await.unwrap()
            }
        };
        // Agents on both channels, and an exclusive endpoint on each.
        for (name, channel) in [("dev-a", "dev"), ("ops-a", "ops")] {
            post(
                &format!("/v1/agents/{name}/presence"),
                json!({"status": "idle", "channel": channel}),
            )
            .await;
        }
        let mut endpoints = Vec::new();
        for (name, channel) in [("dev-ep", "dev"), ("ops-ep", "ops")] {
            let mut c = Connection::connect_with_token(&d.socket, None)
                .await
                .unwrap();
            let frame = hermod_core::wire::ClientFrame::Register {
                endpoint: name.into(),
                channel: Some(channel.into()),
                ack: None,
                gaps: None,
            };
            c.request(&frame).await.unwrap();
            endpoints.push(c);
        }
        // One thread across both channels: a broadcast on ops starts it.
        let start = post(
            "/v1/messages",
            json!({"from": "ops-a", "channel": "ops", "body": {"text": "ops-broadcast"}}),
        )
        .await;
        let thread = start["id"].as_str().unwrap().to_owned();
        for (from, to, channel, text) in [
            ("ops-a", Some("devbot"), "ops", "ops-to-devbot"),
            ("dev-a", None, "dev", "dev-broadcast"),
            ("dev-a", Some("devbot"), "dev", "dev-to-devbot"),
        ] {
            let mut m = json!({"from": from, "channel": channel, "thread": thread,
                "body": {"text": text}});
            if let Some(to) = to {
                m["to"] = to.into();
            }
            post("/v1/messages", m).await;
        }
        let owner_conn = Connection::connect_with_token(&d.socket, None)
            .await
            .unwrap();
        (owner_conn, endpoints, thread)
    });
    let (dev_only, both) = (
        ["dev-a@dev", "dev-ep@dev"],
        ["dev-a@dev", "dev-ep@dev", "ops-a@ops", "ops-ep@ops"],
    );
    let has = |names: &[String], want: &[&str]| want.iter().all(|w| names.iter().any(|n| n == w));
    let no_ops = |names: &[String]| names.iter().all(|n| n.ends_with("@dev"));
    rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str, token: Option<&str>| {
            let mut req = http.get(format!("{}{path}", d.http));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let path = path.to_owned();
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200, "{path}");
                r.json::<Value>().await.unwrap()
            }
        };

        // GET /v1/threads/{id}
        let texts = |v: Value| -> Vec<String> {
            let mut t: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["body"]["text"].as_str().unwrap().to_owned())
                .collect();
            t.sort();
            t
        };
        let path = format!("/v1/threads/{thread}");
        assert_eq!(
            texts(get(&path, Some(&dev)).await),
            ["dev-broadcast", "dev-to-devbot"],
            "the dev token's thread"
        );
        assert_eq!(
            texts(get(&path, None).await),
            [
                "dev-broadcast",
                "dev-to-devbot",
                "ops-broadcast",
                "ops-to-devbot"
            ],
            "the owner's thread"
        );

        // GET /v1/agents
        let seen = listed(&get("/v1/agents", Some(&dev)).await);
        assert!(has(&seen, &dev_only) && no_ops(&seen), "{seen:?}");
        let seen = listed(&get("/v1/agents", None).await);
        assert!(has(&seen, &both), "{seen:?}");

        // SSE-interop /status and agent-bus /inbox
        let status = get("/status?channel=ops", Some(&dev)).await;
        assert_eq!(status["agents"], json!({}), "{status}");
        assert_eq!(status["queues"], json!({}), "{status}");
        let status = get("/status?channel=dev", Some(&dev)).await;
        assert!(status["agents"].get("dev-a").is_some(), "{status}");
        let status = get("/status?channel=ops", None).await;
        assert!(status["agents"].get("ops-a").is_some(), "{status}");
        let inbox = get("/inbox", Some(&dev)).await;
        assert!(inbox["recipients"].get("ops").is_none(), "{inbox}");
        assert!(
            inbox["recipients"]["dev"].get("devbot").is_some(),
            "{inbox}"
        );
        let inbox = get("/inbox", None).await;
        assert!(inbox["recipients"].get("ops").is_some(), "{inbox}");

        // The Unix socket: `agents` and `list_endpoints`
        let mut conn = Connection::connect_with_token(&d.socket, Some(dev.clone()))
            .await
            .unwrap();
        let agents = serde_json::to_value(conn.agents().await.unwrap()).unwrap();
        let seen = listed(&agents);
        assert!(has(&seen, &dev_only) && no_ops(&seen), "{seen:?}");
        let names: Vec<String> = conn.list_endpoints().await.unwrap().into_keys().collect();
        assert_eq!(names, ["dev-ep"]);
        let agents = serde_json::to_value(owner_conn.agents().await.unwrap()).unwrap();
        assert!(has(&listed(&agents), &both));
        let names: Vec<String> = owner_conn
            .list_endpoints()
            .await
            .unwrap()
            .into_keys()
            .collect();
        assert_eq!(names, ["dev-ep", "ops-ep"]);

        // The v1 WebSocket's `agents` frame
        let ws = d.http.replacen("http://", "ws://", 1);
        let mut req = format!("{ws}/v1/agents/devbot/ws?channel=dev")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {dev}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        socket
            .send(Message::text(json!({"type": "agents"}).to_string()))
            .await
            .unwrap();
        let agents = loop {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
                .await
                .expect("an agents_list frame within 10 s")
                .unwrap()
                .unwrap();
            let Ok(text) = frame.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["type"] == "agents_list" {
                break v["agents"].clone();
            }
        };
        let seen = listed(&agents);
        assert!(has(&seen, &dev_only) && no_ops(&seen), "{seen:?}");
        let _ = socket.close(None).await;
    });

    // The MCP `list_agents` tool (over the Unix socket, with the token).
    let text = mcp_list_agents(&d, "devbot", "dev", &dev);
    assert!(text.contains("dev-a (dev)"), "{text}");
    assert!(!text.contains("(ops)"), "{text}");
}
