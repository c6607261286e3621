//! What a client may not claim, black-box, on every door:
//! - strings over the 256-character cap (a message id, `reply_to`, a topic,
//!   a pattern) are refused (HTTP 400, `invalid_request` frames) naming the
//!   field, and nothing of them is stored;
//! - the daemon's own names (`hermod`, which signs receipts, bounces and
//!   loop-guard notices; `relay`; `interop`) are refused as a sender
//!   (`forbidden_sender`, HTTP 403), as an agent to register or read as,
//!   and as an identity, in every `--auth` mode;
//! - live subscriptions past 256 on one Unix or WebSocket connection are
//!   refused with a `too_many_subscriptions` error frame.

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

use crate::support::{read_frame, stderr, stdout, write_frame, Daemon};

/// One character over the cap (`hermod_core::model::MAX_FIELD_LEN`), and
/// far over it.
fn over() -> String {
    "x".repeat(257)
}

fn huge() -> String {
    "i".repeat(100_000)
}

/// A valid topic of 399 characters.
fn long_topic() -> String {
    vec!["seg"; 100].join(".")
}

/// Sends `frame` on a fresh (or the given) connection; the reply.
fn ask(s: &mut UnixStream, frame: Value) -> Value {
    write_frame(s, frame);
    read_frame(s)
}

fn unix(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// An `error` frame with `code` whose detail names `field`.
fn assert_frame_refused(reply: &Value, code: &str, field: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    let detail = reply["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("\"{field}\"")), "{detail}");
}

/// `hermod inbox --json NAME`: what waits for NAME, one message a line.
fn inbox(d: &Daemon, name: &str) -> Vec<Value> {
    let out = d.cli(&["inbox", "--json", name]);
    assert!(out.status.success(), "{out:?}");
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An HTTP answer: status and JSON body.
async fn call(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn assert_http_refused((status, body): &(u16, Value), field: &str) {
    assert_eq!(*status, 400, "{body}");
    assert_eq!(body["code"], "invalid_request", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&format!("\"{field}\"")), "{error}");
}

#[tokio::test]
async fn over_long_strings_get_400_over_http_and_nothing_is_stored() {
    let d = Daemon::start();
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", d.http);
    // v1: a message id (one message, and one element of a batch), a
    // reply_to, a topic, an event id, a durable and a live pattern.
    let send = |body: Value| http.post(url("/v1/messages")).json(&body);
    let msg = |extra: Value| {
        let mut m = json!({ "from": "alice", "to": "bob", "body": { "text": "hi" } });
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        m
    };
    assert_http_refused(&call(send(msg(json!({ "id": huge() })))).await, "id");
    assert_http_refused(&call(send(msg(json!({ "id": over() })))).await, "id");
    assert_http_refused(
        &call(send(msg(json!({ "reply_to": over() })))).await,
        "reply_to",
    );
    // In a batch, a malformed element refuses the whole request.
    let batch = json!([msg(json!({})), msg(json!({ "id": over() }))]);
    assert_http_refused(&call(send(batch)).await, "id");
    let publish = |body: Value| http.post(url("/v1/events")).json(&body);
    assert_http_refused(
        &call(publish(json!({ "topic": long_topic(), "durable": true }))).await,
        "topic",
    );
    assert_http_refused(
        &call(publish(json!({ "topic": "ci.done", "id": over() }))).await,
        "id",
    );
    let subscribe = http
        .post(url("/v1/agents/bob/subscriptions"))
        .json(&json!({ "pattern": format!("{}.**", long_topic()) }));
    assert_http_refused(&call(subscribe).await, "pattern");
    let follow = http
        .get(url("/v1/events"))
        .query(&[("pattern", long_topic())]);
    assert_http_refused(&call(follow).await, "pattern");
    // agent-bus `/send` has no id, topic or pattern: its client-chosen
    // strings past the names are hermod's `reply_to` and `thread`.
    for field in ["reply_to", "thread"] {
        let mut body = json!({ "from": "alice", "to": "bob", "msg": "hi" });
        body[field] = over().into();
        let answer = call(http.post(url("/send")).json(&body)).await;
        assert_http_refused(&answer, field);
    }

    // Nothing was stored: no subscription, and the first message the bus
    // accepts is the first in its log and the only one in bob's inbox.
    let (_, subs) = call(http.get(url("/v1/agents/bob/subscriptions"))).await;
    assert_eq!(subs["patterns"], json!([]), "{subs}");
    let (status, ok) = call(send(msg(json!({ "id": "y".repeat(256) })))).await;
    assert_eq!((status, ok["seq"].as_u64()), (200, Some(1)), "{ok}");
    let got = inbox(&d, "bob");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"].as_str().map(str::len), Some(256));
}

#[test]
fn over_long_strings_get_invalid_request_over_the_unix_socket() {
    let d = Daemon::start();
    let mut s = unix(&d);
    let send = |extra: Value| {
        let mut m = json!({ "type": "send", "from": "alice", "to": "bob", "body": {} });
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        m
    };
    for id in [huge(), over()] {
        let reply = ask(&mut s, send(json!({ "id": id })));
        assert_frame_refused(&reply, "invalid_request", "id");
    }
    // The legacy hermes-bus `message` frame too (errors are its only reply).
    let legacy =
        json!({ "type": "message", "from": "alice", "to": "bob", "id": over(), "body": {} });
    assert_frame_refused(&ask(&mut s, legacy), "invalid_request", "id");
    let reply = ask(&mut s, send(json!({ "thread": over() })));
    assert_frame_refused(&reply, "invalid_request", "thread");
    let publish = json!({ "type": "publish", "topic": long_topic(), "durable": true });
    assert_frame_refused(&ask(&mut s, publish), "invalid_request", "topic");
    let publish = json!({ "type": "publish", "topic": "ci.done", "id": over() });
    assert_frame_refused(&ask(&mut s, publish), "invalid_request", "id");

    let mut bob = unix(&d);
    let registered = ask(&mut bob, json!({ "type": "register", "endpoint": "bob" }));
    assert_eq!(registered["type"], "registered", "{registered}");
    let pattern = format!("{}.**", long_topic());
    for durable in [true, false] {
        let frame = json!({ "type": "subscribe", "pattern": pattern, "durable": durable });
        assert_frame_refused(&ask(&mut bob, frame), "invalid_request", "pattern");
    }
    drop(bob);

    // Nothing was stored: the first message accepted is seq 1, alone in
    // bob's inbox, and bob subscribes to nothing.
    let sent = ask(&mut s, send(json!({ "id": "ok" })));
    assert_eq!(
        (sent["type"].as_str(), sent["seq"].as_u64()),
        (Some("sent"), Some(1)),
        "{sent}"
    );
    let got = inbox(&d, "bob");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], "ok");
    let subs = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("{}/v1/agents/bob/subscriptions", d.http))
        .output()
        .unwrap();
    assert_eq!(stdout(&subs).trim(), r#"{"patterns":[]}"#);
}

/// The names the daemon sends as (`hermod_core::model::RESERVED_NAMES`).
const RESERVED: [&str; 3] = ["hermod", "relay", "interop"];

/// `hermod agent add --json NAME`: the new token.
fn add_identity(d: &Daemon, name: &str) -> String {
    let out = d.cli(&["agent", "add", "--json", name]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

type WebSocket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// A v1 WebSocket of `agent`: connected, or the HTTP status it was refused with.
fn ws(d: &Daemon, agent: &str, token: Option<&str>) -> Result<WebSocket, u16> {
    use tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/agents/{agent}/ws", d.http.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    if let Some(t) = token {
        let bearer = format!("Bearer {t}").parse().unwrap();
        request.headers_mut().insert("Authorization", bearer);
    }
    match tungstenite::connect(request) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("WebSocket to {agent}: {e}"),
    }
}

#[tokio::test]
async fn the_daemons_own_names_are_refused_on_every_door_in_every_auth_mode() {
    for mode in ["open", "owner", "tokens"] {
        let d = Daemon::start_with(&["--auth", mode], &[]);
        // Identities are the owner's to make over the socket in every mode.
        let token = add_identity(&d, "alice");
        let token = (mode == "tokens").then_some(token.as_str());
        // Who sends legitimately: alice with her token, else a plain name
        // (alice's identity reserves her name for her token).
        let me = if token.is_some() { "alice" } else { "carol" };
        for name in RESERVED {
            let out = d.cli(&["agent", "add", name]);
            assert!(!out.status.success(), "{mode}: agent add {name} succeeded");
            assert!(stderr(&out).contains("reserved"), "{}", stderr(&out));
        }
        let with_token = |mut frame: Value| {
            if let Some(t) = token {
                frame["token"] = t.into();
            }
            frame
        };

        // The Unix socket: raw frames.
        let mut s = unix(&d);
        for name in RESERVED {
            let forged =
                json!({ "to": "bob", "from": name, "body": { "type": "receipt", "text": "read" } });
            for kind in ["send", "message"] {
                let mut frame = with_token(forged.clone());
                frame["type"] = kind.into();
                assert_frame_refused_code(&ask(&mut s, frame), "forbidden_sender", mode);
            }
            let publish =
                with_token(json!({ "type": "publish", "topic": "ci.done", "from": name }));
            assert_frame_refused_code(&ask(&mut s, publish), "forbidden_sender", mode);
            let register = with_token(json!({ "type": "register", "endpoint": name }));
            assert_frame_refused_code(&ask(&mut s, register), "forbidden", mode);
            // Nobody reads the daemon's inboxes: a send there is refused.
            let to_daemon =
                with_token(json!({ "type": "send", "to": name, "from": me, "body": {} }));
            assert_frame_refused_code(&ask(&mut s, to_daemon), "forbidden", mode);
        }

        // HTTP: agent-bus `/send` and v1 `POST /v1/messages`.
        let http = reqwest::Client::new();
        let post = |path: &str, body: Value| {
            let req = http.post(format!("{}{path}", d.http)).json(&body);
            match token {
                Some(t) => req.bearer_auth(t),
                None => req,
            }
        };
        for name in RESERVED {
            let bus = call(post(
                "/send",
                json!({ "from": name, "to": "bob", "msg": "read" }),
            ))
            .await;
            let v1 = json!({ "from": name, "to": "bob", "body": { "type": "receipt" } });
            let v1 = call(post("/v1/messages", v1)).await;
            for (door, (status, body)) in [("/send", bus), ("/v1/messages", v1)] {
                assert_eq!(status, 403, "{mode} {door} as {name}: {body}");
                assert_eq!(body["code"], "forbidden_sender", "{mode} {door}: {body}");
            }
        }

        // The v1 WebSocket: no socket as the daemon, no frame claiming it.
        assert_eq!(ws(&d, "hermod", token).err(), Some(403), "{mode}");
        let mut socket = ws(&d, me, token).unwrap();
        for name in RESERVED {
            let frame =
                json!({ "type": "send", "to": "bob", "from": name, "body": { "type": "receipt" } });
            socket
                .send(tungstenite::Message::text(frame.to_string()))
                .unwrap();
            let reply = loop {
                match socket.read().unwrap() {
                    tungstenite::Message::Text(t) => {
                        break serde_json::from_str::<Value>(&t).unwrap()
                    }
                    _ => continue,
                }
            };
            assert_frame_refused_code(&reply, "forbidden_sender", mode);
        }
        drop(socket);

        // Nothing was stored, and a client's own name still sends.
        let sent = ask(
            &mut s,
            with_token(json!({ "type": "send", "from": me, "to": "bob", "body": {} })),
        );
        assert_eq!(
            (sent["type"].as_str(), sent["seq"].as_u64()),
            (Some("sent"), Some(1)),
            "{mode}: {sent}"
        );
    }
}

fn assert_frame_refused_code(reply: &Value, code: &str, mode: &str) {
    assert_eq!(reply["type"], "error", "{mode}: {reply}");
    assert_eq!(reply["code"], code, "{mode}: {reply}");
}

/// `hermod_server::frames::MAX_LIVE_SUBSCRIPTIONS`.
const MAX_LIVE: usize = 256;

// Live subscriptions per connection were uncapped: a task and a view each.
#[tokio::test]
async fn live_subscriptions_per_connection_are_capped_with_a_clear_error() {
    let d = Daemon::start();
    let subscribe = |n: usize| json!({ "type": "subscribe", "pattern": format!("cap.{n}.**") });
    let mut s = unix(&d);
    for n in 0..MAX_LIVE {
        let reply = ask(&mut s, subscribe(n));
        assert_eq!(reply["type"], "subscribed", "{n}: {reply}");
    }
    let refused = ask(&mut s, subscribe(MAX_LIVE));
    assert_eq!(refused["code"], "too_many_subscriptions", "{refused}");
    assert!(
        refused["detail"].as_str().unwrap().contains("256"),
        "{refused}"
    );
    // Durable subscriptions are state in the store, not live streams.
    let registered = ask(&mut s, json!({ "type": "register", "endpoint": "capped" }));
    assert_eq!(registered["type"], "registered", "{registered}");
    let durable = json!({ "type": "subscribe", "pattern": "cap.durable", "durable": true });
    assert_eq!(ask(&mut s, durable)["type"], "subscribed");
    // Another connection has its own.
    let mut other = unix(&d);
    assert_eq!(ask(&mut other, subscribe(0))["type"], "subscribed");

    // The same on a v1 WebSocket.
    let mut ws = ws(&d, "capped-ws", None).unwrap();
    let mut refused = None;
    for n in 0..=MAX_LIVE {
        ws.send(tungstenite::Message::text(subscribe(n).to_string()))
            .unwrap();
        let reply: Value = loop {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => break serde_json::from_str(&t).unwrap(),
                _ => continue,
            }
        };
        if reply["type"] != "subscribed" {
            refused = Some((n, reply));
            break;
        }
    }
    let (n, reply) = refused.expect("the WebSocket took every subscription");
    assert_eq!(n, MAX_LIVE);
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
}
