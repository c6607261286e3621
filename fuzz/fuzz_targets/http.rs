//! HTTP request parsing of every protocol, through the real axum app.
//!
//! Each input is a short sequence of calls (agent-bus `POST /send`,
//! `GET /recv`; SSE-interop `POST /broadcast`, `GET /poll`; v1
//! `POST /v1/messages`, `GET /v1/agents/{name}/inbox`, ack, `POST
//! /v1/events`, subscriptions; a few plain GETs; and raw requests to any
//! non-streaming route) sent with `tower::ServiceExt::oneshot` to a fresh
//! `hermod_server::http::app` over a memory broker in `--auth open` mode, with `alice`
//! and `bob` already known on `default`. Bodies come from a JSON generator
//! (known field names, `\u` escaped keys, odd numbers) or raw bytes.
//!
//! Properties:
//!
//! * no panic, and every request answers within 5 s;
//! * no 5xx: bad input is never the server's own failure (the app is never
//!   shut down here, so not even 503 is expected);
//! * a 4xx body is a JSON object with string `error` and non-empty `code`;
//! * a 2xx JSON body parses;
//! * every delivered message (`/recv`, `/poll`, v1 inbox) carries the id of
//!   a message this input sent, with the sender that sent it (`_meta` on
//!   `/poll`), so a body cannot pass itself off as another sender.
//!
//! Streaming routes (SSE, WebSocket, `/v1/events` GET, `/subscribe`,
//! `/api/*`) are never called; long-polls cannot wait (`max_wait` is zero,
//! and the structured calls pass `block=false` / `wait=0`).
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use hermod_core::model::{AgentName, Channel, InboxKey};
use hermod_core::Broker;
use hermod_core::auth::{AuthMode, Caller, RateLimit, Trust};
use hermod_core::model::Auth;
use hermod_server::http::{app, AppState, HttpConfig};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use tower::ServiceExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A fresh app per input, so a crash reproduces from its artifact alone
/// (and the in-memory log does not grow across inputs).
async fn fresh_app() -> Router {
    // `--auth open`: requests here come without a peer uid (no socket),
    // which the default mode would refuse before any protocol parses them.
    let no_limit = RateLimit {
        rate: 0.0,
        burst: 1.0,
    };
    let broker = Broker::open_memory_with(Trust::new(AuthMode::Open, no_limit))
        .await
        .unwrap();
    let open = Caller::trusted(Auth::Open);
    for agent in ["alice", "bob"] {
        let key = InboxKey::new(Channel::default(), AgentName::parse(agent).unwrap());
        drop(broker.connect(&open, key, "http", false).await.unwrap());
    }
    let mut config = HttpConfig::new(([127, 0, 0, 1], 0).into());
    // No long-poll can hold a request, whatever the query says.
    config.max_wait = Duration::ZERO;
    app(AppState {
        broker,
        config: Arc::new(config),
        shutdown: tokio_util::sync::CancellationToken::new(),
        relay: hermod_server::http::relay::RelayHub::default(),
        actions: Arc::new(hermod_server::actions::ActionStats::default()),
    })
}

/// Builds every request the harness sends: the one place to add what the
/// server may come to require (a per-connection `Peer` extension, an
/// `Authorization` header). `None` when `uri` is not a valid URI.
fn request(
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Option<Request<axum::body::Body>> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        if let Ok(v) = header::HeaderValue::from_str(ct) {
            b = b.header(header::CONTENT_TYPE, v);
        }
    }
    b.body(axum::body::Body::from(body)).ok()
}

const NAMES: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "x.y-z:1@h_",
    "relay",
    "anonymous",
    "default",
    "",
    "bad name",
];

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Any(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Known(i) => NAMES[usize::from(*i) % NAMES.len()].to_owned(),
            Name::Any(s) => s.clone(),
        }
    }
}

const KEYS: &[&str] = &[
    "from",
    "to",
    "msg",
    "channel",
    "body",
    "id",
    "topic",
    "payload",
    "durable",
    "seq",
    "_meta",
    "text",
    "type",
    "ts",
    "src",
    "session_id",
    "pattern",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Any(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_owned(),
            Key::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Name),
    Arr(Vec<Json>),
    /// Keys with `escaped` are written entirely as `\uXXXX` escapes.
    Obj(Vec<(Key, bool, Json)>),
}

fn write_str(out: &mut String, s: &str, escaped: bool) {
    if !escaped {
        out.push_str(&serde_json::to_string(s).unwrap());
        return;
    }
    out.push('"');
    let mut units = [0u16; 2];
    for c in s.chars() {
        for u in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{u:04x}"));
        }
    }
    out.push('"');
}

impl Json {
    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => out.push_str(&i.to_string()),
            // JSON has no infinities: write them as out-of-range numbers.
            Json::Float(f) if f.is_nan() => out.push_str("-0.0e-400"),
            Json::Float(f) if f.is_infinite() => {
                out.push_str(if *f > 0.0 { "1e400" } else { "-1e400" })
            }
            Json::Float(f) => out.push_str(&format!("{f:?}")),
            Json::Str(n) => write_str(out, &n.text(), false),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => write_obj(out, fields),
        }
    }
}

fn write_obj(out: &mut String, fields: &[(Key, bool, Json)]) {
    out.push('{');
    for (i, (k, escaped, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, &k.text(), *escaped);
        out.push(':');
        v.write(out);
    }
    out.push('}');
}

#[derive(Arbitrary, Debug)]
enum Body {
    Json(Json),
    /// An object of these fields (the common shape of every request body).
    Fields(Vec<(Key, bool, Json)>),
    Raw(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        match self {
            Body::Json(j) => j.write(&mut out),
            Body::Fields(f) => write_obj(&mut out, f),
            Body::Raw(r) => return r.clone(),
        }
        out.into_bytes()
    }
}

#[derive(Arbitrary, Debug)]
enum ContentType {
    None,
    Json,
    Text,
    Any(String),
}

impl ContentType {
    fn get(&self) -> Option<&str> {
        match self {
            ContentType::None => None,
            ContentType::Json => Some("application/json"),
            ContentType::Text => Some("text/plain"),
            ContentType::Any(s) => Some(s),
        }
    }
}

const QKEYS: &[&str] = &[
    "to", "since", "block", "max", "channel", "agent", "from", "after", "limit", "wait",
];
const WORDS: &[&str] = &[
    "true",
    "false",
    "0",
    "1",
    "yes",
    "no",
    "",
    "*",
    "NaN",
    "inf",
    "-1",
    "1e400",
    "0.5",
    "18446744073709551616",
    "9223372036854775807",
];

#[derive(Arbitrary, Debug)]
enum QVal {
    Name(Name),
    Word(u8),
    Int(i64),
    Float(f64),
    Any(String),
}

impl QVal {
    fn text(&self) -> String {
        match self {
            QVal::Name(n) => n.text(),
            QVal::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_owned(),
            QVal::Int(i) => i.to_string(),
            QVal::Float(f) => f.to_string(),
            QVal::Any(s) => s.clone(),
        }
    }
}

/// Query parameters; `raw` writes values unencoded when the URI allows it.
#[derive(Arbitrary, Debug)]
struct Query {
    params: Vec<(u8, QVal)>,
    raw: bool,
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Query {
    /// `name=value&...`, plus `forced` pairs for keys not given.
    fn build(&self, forced: &[(&str, &str)]) -> String {
        let mut pairs: Vec<(String, String)> = self
            .params
            .iter()
            .map(|(k, v)| (QKEYS[usize::from(*k) % QKEYS.len()].to_owned(), v.text()))
            .collect();
        for (k, v) in forced {
            if !pairs.iter().any(|(pk, _)| pk == k) {
                pairs.push(((*k).to_owned(), (*v).to_owned()));
            }
        }
        pairs
            .iter()
            .map(|(k, v)| {
                let v = if self.raw { v.clone() } else { encode(v) };
                format!("{k}={v}")
            })
            .collect::<Vec<_>>()
            .join("&")
    }
}

#[derive(Arbitrary, Debug)]
enum Call {
    Send {
        body: Body,
        ct: ContentType,
    },
    Recv {
        query: Query,
    },
    Broadcast {
        from: Option<Name>,
        channel: Option<Name>,
        body: Body,
        ct: ContentType,
    },
    Poll {
        query: Query,
    },
    Status {
        query: Query,
    },
    V1Send {
        body: Body,
        ct: ContentType,
    },
    V1Inbox {
        name: Name,
        query: Query,
    },
    V1Ack {
        name: Name,
        body: Body,
    },
    V1Publish {
        body: Body,
        ct: ContentType,
    },
    V1Subscription {
        name: Name,
        body: Body,
        delete: bool,
    },
    Get(u8),
    Raw {
        method: u8,
        path: String,
        query: Query,
        body: Body,
    },
}

const GETS: &[&str] = &[
    "/inbox",
    "/healthz",
    "/health",
    "/v1/agents",
    "/metrics",
    "/v1/openapi.json",
];
const METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
];

/// What a successful send route is, to know who sent the returned id.
enum Sender {
    /// `from` of the JSON body (default if absent, or none).
    BodyFrom(Option<&'static str>),
    Known(String),
    /// A raw request that may have sent something: stop checking senders.
    Unknown,
}

/// Delivered items of a read route.
#[derive(Clone, Copy)]
enum Reads {
    Recv,
    Poll,
    V1Inbox,
}

struct Prepared {
    req: Request<axum::body::Body>,
    sender: Option<Sender>,
    reads: Option<Reads>,
    sent_body: Vec<u8>,
}

fn is_streaming(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (path.contains("stream")
            || path.contains("subscribe")
            || path.ends_with("/ws")
            || path.starts_with("/api")
            || path.trim_end_matches('/') == "/v1/events")
}

fn prepare(call: &Call) -> Option<Prepared> {
    let seg = |n: &Name| encode(&n.text());
    let (method, uri, ct, body, sender, reads) = match call {
        Call::Send { body, ct } => (
            Method::POST,
            "/send".to_owned(),
            ct.get(),
            body.bytes(),
            Some(Sender::BodyFrom(None)),
            None,
        ),
        Call::Recv { query } => (
            Method::GET,
            format!(
                "/recv?{}",
                query.build(&[("to", "bob"), ("block", "false")])
            ),
            None,
            vec![],
            None,
            Some(Reads::Recv),
        ),
        Call::Broadcast {
            from,
            channel,
            body,
            ct,
        } => {
            let mut q = Vec::new();
            if let Some(f) = from {
                q.push(format!("from={}", encode(&f.text())));
            }
            if let Some(c) = channel {
                q.push(format!("channel={}", encode(&c.text())));
            }
            let sender = from.as_ref().map(|f| Sender::Known(f.text()));
            (
                Method::POST,
                format!("/broadcast?{}", q.join("&")),
                ct.get(),
                body.bytes(),
                sender,
                None,
            )
        }
        Call::Poll { query } => (
            Method::GET,
            format!("/poll?{}", query.build(&[("agent", "bob")])),
            None,
            vec![],
            None,
            Some(Reads::Poll),
        ),
        Call::Status { query } => (
            Method::GET,
            format!("/status?{}", query.build(&[])),
            None,
            vec![],
            None,
            None,
        ),
        Call::V1Send { body, ct } => (
            Method::POST,
            "/v1/messages".to_owned(),
            ct.get(),
            body.bytes(),
            Some(Sender::BodyFrom(None)),
            None,
        ),
        Call::V1Inbox { name, query } => (
            Method::GET,
            format!(
                "/v1/agents/{}/inbox?{}",
                seg(name),
                query.build(&[("wait", "0")])
            ),
            None,
            vec![],
            None,
            Some(Reads::V1Inbox),
        ),
        Call::V1Ack { name, body } => (
            Method::POST,
            format!("/v1/agents/{}/ack", seg(name)),
            Some("application/json"),
            body.bytes(),
            None,
            None,
        ),
        Call::V1Publish { body, ct } => (
            Method::POST,
            "/v1/events".to_owned(),
            ct.get(),
            body.bytes(),
            Some(Sender::BodyFrom(Some("anonymous"))),
            None,
        ),
        Call::V1Subscription { name, body, delete } => (
            if *delete {
                Method::DELETE
            } else {
                Method::POST
            },
            format!("/v1/agents/{}/subscriptions", seg(name)),
            Some("application/json"),
            body.bytes(),
            None,
            None,
        ),
        Call::Get(i) => (
            Method::GET,
            GETS[usize::from(*i) % GETS.len()].to_owned(),
            None,
            vec![],
            None,
            None,
        ),
        Call::Raw {
            method,
            path,
            query,
            body,
        } => {
            let method = METHODS[usize::from(*method) % METHODS.len()].clone();
            let path = if path.starts_with('/') {
                path.clone()
            } else {
                format!("/{path}")
            };
            if is_streaming(&method, &path) {
                return None;
            }
            let uri = format!("{path}?{}", query.build(&[]));
            (
                method,
                uri,
                Some("application/json"),
                body.bytes(),
                Some(Sender::Unknown),
                None,
            )
        }
    };
    let req = request(method, &uri, ct, body.clone())?;
    // The router matches the parsed path: check it too.
    if is_streaming(req.method(), req.uri().path()) {
        return None;
    }
    Some(Prepared {
        req,
        sender,
        reads,
        sent_body: body,
    })
}

/// Message id -> the senders that sent a message with that id.
#[derive(Default)]
struct Ledger {
    sent: HashMap<String, HashSet<String>>,
    unknown: bool,
}

impl Ledger {
    fn check(&self, id: &Value, from: &Value, what: &str) {
        if self.unknown {
            return;
        }
        let (Some(id), Some(from)) = (id.as_str(), from.as_str()) else {
            panic!("{what}: delivered message without string id/from: id={id} from={from}");
        };
        let senders = self
            .sent
            .get(id)
            .unwrap_or_else(|| panic!("{what}: delivered id {id:?} was never sent"));
        assert!(
            senders.contains(from),
            "{what}: id {id:?} delivered as from {from:?}, sent by {senders:?}"
        );
    }
}

async fn run(calls: Vec<Call>) {
    let app = fresh_app().await;
    let mut ledger = Ledger::default();
    for call in calls.iter().take(8) {
        let Some(p) = prepare(call) else { continue };
        let method = p.req.method().clone();
        let uri = p.req.uri().clone();
        let resp = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(p.req))
            .await
            .unwrap_or_else(|_| panic!("{method} {uri} did not answer within 5 s"))
            .unwrap();
        let status = resp.status();
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !status.is_server_error(),
            "{method} {uri} -> {status}: {text}"
        );
        if status.is_client_error() && method != Method::HEAD {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{method} {uri} -> {status}, body not JSON ({e}): {text}")
            });
            assert!(
                v["error"].is_string(),
                "{method} {uri} -> {status} without error: {text}"
            );
            assert!(
                v["code"].as_str().is_some_and(|c| !c.is_empty()),
                "{method} {uri} -> {status} without code: {text}"
            );
            continue;
        }
        if !status.is_success() || method == Method::HEAD {
            continue;
        }
        let v: Option<Value> = if is_json {
            Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{method} {uri} -> {status}, JSON body does not parse ({e}): {text}")
            }))
        } else {
            None
        };
        if status != StatusCode::OK {
            continue;
        }
        match (&p.sender, &v) {
            (Some(Sender::Unknown), _) if method != Method::GET => ledger.unknown = true,
            (Some(Sender::BodyFrom(default)), Some(v)) => {
                // Raw fields: the body may hold numbers a `Value` refuses.
                let fields: HashMap<String, Box<RawValue>> =
                    serde_json::from_slice(&p.sent_body).expect("a sent body is a JSON object");
                let from = fields
                    .get("from")
                    .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
                    .or(default.map(str::to_owned));
                match (from, v["id"].as_str()) {
                    (Some(from), Some(id)) => {
                        ledger.sent.entry(id.to_owned()).or_default().insert(from);
                    }
                    _ => ledger.unknown = true,
                }
            }
            (Some(Sender::Known(from)), Some(v)) => match v["id"].as_str() {
                Some(id) => {
                    ledger
                        .sent
                        .entry(id.to_owned())
                        .or_default()
                        .insert(from.clone());
                }
                None => ledger.unknown = true,
            },
            _ => {}
        }
        let Some(v) = v else { continue };
        let what = format!("{method} {uri}");
        match p.reads {
            Some(Reads::Recv) => {
                for m in v["messages"].as_array().expect("recv: messages array") {
                    ledger.check(&m["id"], &m["from"], &what);
                }
            }
            Some(Reads::V1Inbox) => {
                for m in v["messages"].as_array().expect("v1 inbox: messages array") {
                    ledger.check(&m["id"], &m["from"], &what);
                }
            }
            Some(Reads::Poll) => {
                for m in v.as_array().expect("poll: an array") {
                    let meta = &m["_meta"];
                    assert!(meta["seq"].is_u64(), "{what}: _meta.seq: {m}");
                    ledger.check(&meta["id"], &meta["from"], &what);
                }
            }
            None => {}
        }
    }
}

fuzz_target!(|calls: Vec<Call>| {
    runtime().block_on(run(calls));
});
