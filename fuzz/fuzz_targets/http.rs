//! Every HTTP route, through the real axum app.
//!
//! Each input is a short sequence of steps (at most 8) sent with
//! `tower::ServiceExt::oneshot` to a fresh `hermod_server::http::app` over
//! a memory broker in `--auth open` mode, with `alice` and `bob` known on
//! `default` and an identity `carol` (token known to the harness; `may_send`
//! bob only, `may_publish` `tui.**`). A step is a call, the credentials it
//! carries (none, carol's token as `Authorization: Bearer` or as an
//! `/a/TOKEN/` path prefix, or a token nobody holds) and browser headers
//! (`Host`, `Origin`, `Sec-Fetch-Site`, each at most once, as a browser
//! sends them).
//!
//! The calls reach every route and method of `http::app` (see [`ROUTES`]):
//! agent-bus `POST /send`, `GET /recv`, `GET /inbox`, `GET /healthz`;
//! SSE-interop `GET /health`, `GET /status`, `GET /subscribe`, `GET /poll`,
//! `POST /broadcast`; v1 `POST /v1/messages` (one message or a batch),
//! `GET /v1/messages/{id}`, `GET /v1/threads/{id}`, `GET /v1/agents`,
//! `GET /v1/agents/{name}/inbox`, `POST .../ack`, `POST .../presence`,
//! `GET|POST|DELETE .../subscriptions`, `GET .../stream`, `GET .../ws`,
//! `POST|GET /v1/events`, `GET /v1/openapi.json`; `GET /metrics`; the relay
//! `GET /api/pub`, `GET /api/events`; and raw method/path/query/body
//! requests to anything. Bodies come from a JSON generator (known field
//! names, `\u` escaped keys, odd numbers, long strings) or raw bytes.
//!
//! Properties, on every answer:
//!
//! * no panic, and the answer (its head; for JSON, its whole body) comes
//!   within 5 s;
//! * no 5xx: bad input is never the server's own failure (the app is never
//!   shut down here, so not even 503 is expected);
//! * every 4xx body is a JSON object with string `error` and non-empty
//!   `code` ("Errors everywhere are JSON", README; of a HEAD answer only
//!   the status is checked); a 2xx JSON body parses;
//!   a 2xx SSE answer is `text/event-stream` and its ready events parse;
//! * the browser boundary: a refused `Host`, `Origin` or `Sec-Fetch-Site`
//!   is 403 `forbidden`; otherwise a token nobody holds is 401
//!   `unauthorized`;
//! * sends (`/send`, `/broadcast`, `/v1/messages` and each batch element,
//!   `/v1/events`) that succeed never had a reserved sender (`hermod`,
//!   `relay`, `interop`) or recipient, an `id`, `reply_to`, `thread` or
//!   topic over 256 characters, a sender other than carol with carol's
//!   token, carol's name without it, or broke carol's `may_send` /
//!   `may_publish`; a subscription that succeeds has a pattern within 256
//!   characters; a batch answers one receipt or `{error, code}` per element;
//! * the documented refusals exactly, for calls built to test them: a field
//!   over 256 characters is 400 `invalid_request` on every door (and 256 is
//!   accepted), a reserved sender 403 `forbidden_sender`, a reserved
//!   recipient or reader 403 `forbidden` (for a batch element: that
//!   element's outcome);
//! * every delivered message (`/recv`, `/poll`, v1 inbox, thread and
//!   receipts, SSE streams) carries the id of a message this input sent,
//!   with the sender that sent it, or is the daemon's own: from `hermod`,
//!   or `interop` on `/subscribe`, or the `presence.<name>` event from a
//!   name whose presence this input set. Nothing is ever from `relay`.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use hermod_core::auth::{AuthMode, Caller, RateLimit, Trust};
use hermod_core::model::Auth;
use hermod_core::model::{AgentName, Channel, InboxKey, MAX_FIELD_LEN, RESERVED_NAMES};
use hermod_core::Broker;
use hermod_server::http::{app, AppState, HttpConfig};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use tower::ServiceExt;

/// The routes of `http::app` and the methods each answers; a test of the
/// generator below (`covers_every_route`) is not possible in a fuzz
/// target, so [`Call::route`] is matched against this list at start.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/send"),
    ("GET", "/recv"),
    ("GET", "/inbox"),
    ("GET", "/healthz"),
    ("GET", "/health"),
    ("GET", "/status"),
    ("GET", "/subscribe"),
    ("GET", "/poll"),
    ("POST", "/broadcast"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages/{id}"),
    ("GET", "/v1/threads/{id}"),
    ("POST", "/v1/agents/{name}/presence"),
    ("GET", "/v1/agents"),
    ("GET", "/v1/agents/{name}/inbox"),
    ("POST", "/v1/agents/{name}/ack"),
    ("GET", "/v1/agents/{name}/stream"),
    ("GET", "/v1/agents/{name}/ws"),
    ("POST", "/v1/events"),
    ("GET", "/v1/events"),
    ("GET", "/v1/agents/{name}/subscriptions"),
    ("POST", "/v1/agents/{name}/subscriptions"),
    ("DELETE", "/v1/agents/{name}/subscriptions"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/api/pub"),
    ("GET", "/api/events"),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The identity the harness holds a token for.
const CAROL: &str = "carol";

/// A fresh app per input, so a crash reproduces from its artifact alone
/// (and the in-memory log does not grow across inputs). Returns carol's
/// token with it.
async fn fresh_app() -> (Router, String) {
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
    let spec: hermod_proto::identity::IdentitySpec = serde_json::from_value(serde_json::json!({
        "name": CAROL,
        "may_send": ["bob"],
        "may_publish": ["tui.**"],
    }))
    .unwrap();
    let (_, token) = broker.add_identity(spec).await.unwrap();
    let mut config = HttpConfig::new(([127, 0, 0, 1], 0).into());
    // No long-poll can hold a request, whatever the query says.
    config.max_wait = Duration::ZERO;
    let router = app(AppState {
        broker,
        config: Arc::new(config),
        shutdown: tokio_util::sync::CancellationToken::new(),
        relay: hermod_server::http::relay::RelayHub::default(),
        actions: Arc::new(hermod_server::actions::ActionStats::default()),
    });
    (router, token)
}

// ---------------------------------------------------------------- values

const NAMES: &[&str] = &[
    "alice",
    "bob",
    CAROL,
    "x.y-z:1@h_",
    "hermod",
    "relay",
    "interop",
    "anonymous",
    "default",
    "",
    "bad name",
    "ops",
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

/// A string of `len % 300` copies of one character (1, 2 or 4 UTF-8
/// bytes): around the 256-character cap, counted in characters.
fn long(len: u16, wide: u8) -> String {
    let c = ['x', 'é', '😀'][usize::from(wide) % 3];
    std::iter::repeat_n(c, usize::from(len) % 300).collect()
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
    "reply_to",
    "thread",
    "priority",
    "ttl",
    "bounce_after",
    "notify",
    "status",
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

const WORDS: &[&str] = &[
    "true",
    "false",
    "0",
    "1",
    "yes",
    "no",
    "",
    "*",
    "**",
    "tui.*",
    "tui.tool.start",
    "presence.alice",
    "NaN",
    "inf",
    "-1",
    "1e400",
    "0.5",
    "18446744073709551616",
    "9223372036854775807",
    "read",
    "delivered",
    "replied",
    "busy",
    "idle",
    "online",
    "urgent",
    "low",
];

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Name),
    Word(u8),
    Long(u16, u8),
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
            Json::Word(i) => write_str(out, WORDS[usize::from(*i) % WORDS.len()], false),
            Json::Long(n, w) => write_str(out, &long(*n, *w), false),
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
    /// An array of such objects (a `/v1/messages` batch).
    Batch(Vec<Vec<(Key, bool, Json)>>),
    Raw(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        match self {
            Body::Json(j) => j.write(&mut out),
            Body::Fields(f) => write_obj(&mut out, f),
            Body::Batch(items) => {
                out.push('[');
                for (i, f) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_obj(&mut out, f);
                }
                out.push(']');
            }
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
    "to",
    "since",
    "block",
    "max",
    "channel",
    "agent",
    "from",
    "after",
    "limit",
    "wait",
    "timeout",
    "pattern",
    "token",
    "reply_to",
    "thread",
    "priority",
    "ttl",
    "bounce_after",
    "notify",
];

#[derive(Arbitrary, Debug)]
enum QVal {
    Name(Name),
    Word(u8),
    Int(i64),
    Float(f64),
    Long(u16, u8),
    Any(String),
}

impl QVal {
    fn text(&self) -> String {
        match self {
            QVal::Name(n) => n.text(),
            QVal::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_owned(),
            QVal::Int(i) => i.to_string(),
            QVal::Float(f) => f.to_string(),
            QVal::Long(n, w) => long(*n, *w),
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

fn query_string(pairs: &[(String, String)], raw: bool) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = if raw { v.clone() } else { encode(v) };
            format!("{}={v}", encode(k))
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Query {
    fn pairs(&self, forced: &[(&str, &str)]) -> Vec<(String, String)> {
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
    }

    /// `name=value&...`, plus `forced` pairs for keys not given.
    fn build(&self, forced: &[(&str, &str)]) -> String {
        query_string(&self.pairs(forced), self.raw)
    }
}

/// The value of `key` when it is given exactly once (and, written `raw`,
/// reads the same decoded).
fn only(pairs: &[(String, String)], key: &str, raw: bool) -> Option<String> {
    let mut values = pairs.iter().filter(|(k, _)| k == key);
    let value = match (values.next(), values.next()) {
        (Some((_, v)), None) => v.clone(),
        _ => return None,
    };
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'));
    (!raw || plain).then_some(value)
}

/// A message id to look up: one an earlier step got back, or any.
#[derive(Arbitrary, Debug)]
enum IdRef {
    Seen(u8),
    Any(Name),
}

// ----------------------------------------------------------------- calls

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
        /// Delivery fields (`reply_to`, `ttl`, ...) as query parameters.
        meta: Vec<(u8, QVal)>,
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
    V1Presence {
        name: Name,
        body: Body,
    },
    V1Publish {
        body: Body,
        ct: ContentType,
    },
    V1Subscription {
        name: Name,
        /// GET, POST or DELETE.
        method: u8,
        query: Query,
        body: Body,
    },
    V1Receipt {
        id: IdRef,
        query: Query,
    },
    V1Thread {
        id: IdRef,
    },
    /// SSE and WebSocket routes (`which` picks one).
    Stream {
        which: u8,
        name: Name,
        query: Query,
    },
    Get(u8),
    /// A valid request with one capped field of `len % 300` characters.
    Capped {
        door: u8,
        len: u16,
        wide: u8,
    },
    /// A valid request that names a reserved name as sender, recipient or
    /// reader.
    Reserved {
        door: u8,
        name: u8,
    },
    Raw {
        method: u8,
        path: String,
        query: Query,
        body: Body,
        ct: ContentType,
    },
}

/// Who a step claims to be.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Cred {
    None,
    /// carol's token as `Authorization: Bearer`.
    Carol,
    /// carol's token as an `/a/TOKEN/` path prefix.
    CarolPath,
    /// A token nobody holds.
    Bogus,
}

const HOSTS: &[(&str, bool)] = &[
    ("localhost", true),
    ("127.0.0.1:18900", true),
    ("[::1]:80", true),
    ("agent.localhost", true),
    ("attacker.example", false),
    ("10.0.0.1", false),
    ("localhost.evil.com", false),
];
const ORIGINS: &[(&str, bool)] = &[
    ("http://127.0.0.1:0", true),
    ("http://localhost:0", true),
    ("null", false),
    ("http://evil.example", false),
    ("https://127.0.0.1:0", false),
    ("http://127.0.0.1:8000", false),
];
const SITES: &[(&str, bool)] = &[
    ("same-origin", true),
    ("none", true),
    ("same-site", false),
    ("cross-site", false),
];

/// A browser header: known values the boundary allows or refuses.
#[derive(Arbitrary, Debug)]
enum Browser {
    Host(u8),
    Origin(u8),
    Site(u8),
}

impl Browser {
    fn header(&self) -> (header::HeaderName, &'static str, bool) {
        let pick = |list: &[(&'static str, bool)], i: u8| list[usize::from(i) % list.len()];
        let (name, (value, allowed)) = match self {
            Browser::Host(i) => (header::HOST, pick(HOSTS, *i)),
            Browser::Origin(i) => (header::ORIGIN, pick(ORIGINS, *i)),
            Browser::Site(i) => (
                header::HeaderName::from_static("sec-fetch-site"),
                pick(SITES, *i),
            ),
        };
        (name, value, allowed)
    }
}

#[derive(Arbitrary, Debug)]
struct Step {
    call: Call,
    cred: Cred,
    browser: Vec<Browser>,
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

/// What a send looked like to the oracle: its sender, recipient and capped
/// fields, to check a success against and to know who sent what came back.
#[derive(Debug, Default, Clone)]
struct Sent {
    /// The claimed sender (`None`: absent).
    from: Option<String>,
    /// The sender when none is claimed (`anonymous` for events; messages
    /// require one).
    default_from: Option<&'static str>,
    to: Option<String>,
    /// (field, value) of every capped string the request carries.
    capped: Vec<(&'static str, String)>,
    /// A publish: its topic (checked against carol's `may_publish`).
    topic: Option<String>,
}

/// What a route does, for the checks after it answers.
#[derive(Debug)]
enum Kind {
    /// One message or event; `Sent` from the body or query.
    Sends(Sent),
    /// `POST /v1/messages` with whatever body: one `Sent` per element,
    /// read from the answer's shape.
    V1Messages,
    /// Delivered messages, read as this agent (when one is named once).
    Reads(Reads, Option<String>),
    /// Adds or removes a durable subscription with this pattern.
    Subscribes(Option<String>),
    /// Sets `name`'s presence.
    Presence(String),
    /// A raw request: a 2xx to anything but GET may have sent anything.
    Raw,
    Other,
}

/// Delivered items of a read route.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reads {
    Recv,
    Poll,
    V1Inbox,
    Thread,
    Receipts,
    /// SSE of message frames (`/v1/agents/{name}/stream`, `/v1/events`).
    SseFrames,
    /// SSE of interop items (`/subscribe`).
    SseInterop,
}

/// The answer a call is built to get: a status and a code (or, for a
/// batch, the code of element `index`'s outcome).
#[derive(Debug, Clone, Copy)]
enum Expect {
    Status(StatusCode, Option<&'static str>),
    BatchOutcome(usize, &'static str),
}

struct Prepared {
    method: Method,
    path: String,
    query: String,
    ct: Option<String>,
    body: Vec<u8>,
    kind: Kind,
    expect: Option<Expect>,
}

fn prepared(method: Method, path: String, query: String, body: Vec<u8>, kind: Kind) -> Prepared {
    Prepared {
        method,
        path,
        query,
        ct: Some("application/json".into()),
        body,
        kind,
        expect: None,
    }
}

/// The JSON fields of a body that is an object (raw values: a `Value`
/// would refuse numbers the server skips, like `1e400`; duplicate keys:
/// the last one, as `serde_json::Value` has it).
fn fields(body: &[u8]) -> Option<HashMap<String, Box<RawValue>>> {
    serde_json::from_slice(body).ok()
}

fn string_field(f: &HashMap<String, Box<RawValue>>, key: &str) -> Option<String> {
    f.get(key)
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
}

/// `Sent` of a JSON message body (`/send`, `/v1/messages`, an element).
fn sent_of(f: &HashMap<String, Box<RawValue>>, capped: &[&'static str]) -> Sent {
    Sent {
        from: string_field(f, "from"),
        default_from: None,
        to: string_field(f, "to"),
        capped: capped
            .iter()
            .filter_map(|k| string_field(f, k).map(|v| (*k, v)))
            .collect(),
        topic: None,
    }
}

/// What a send built by [`reserved_call`] or [`capped_call`] is to the
/// oracle, so that one that succeeds is in the ledger like any other.
fn sends_kind(path: &str, query: &str, body: &[u8]) -> Kind {
    let f = fields(body);
    match path {
        "/send" => f.map_or(Kind::Raw, |f| {
            Kind::Sends(sent_of(&f, &["reply_to", "thread"]))
        }),
        "/v1/messages" => Kind::V1Messages,
        "/broadcast" => {
            // Built with one `from` and at most one capped field, encoded.
            let mut sent = Sent::default();
            for pair in query.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = decode(v);
                match k {
                    "from" => sent.from = Some(v),
                    "reply_to" => sent.capped.push(("reply_to", v)),
                    "thread" => sent.capped.push(("thread", v)),
                    _ => {}
                }
            }
            Kind::Sends(sent)
        }
        "/v1/events" => f.map_or(Kind::Raw, |f| {
            Kind::Sends(Sent {
                from: string_field(&f, "from"),
                default_from: Some("anonymous"),
                to: None,
                capped: ["topic", "id"]
                    .iter()
                    .filter_map(|k| string_field(&f, k).map(|v| (*k, v)))
                    .collect(),
                topic: string_field(&f, "topic"),
            })
        }),
        _ => Kind::Other,
    }
}

/// The inverse of [`encode`].
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const RESERVED_DOORS: usize = 18;

/// `Call::Reserved`: a valid request that differs from one answered 200
/// only in naming reserved `name` as sender, recipient or reader.
fn reserved_call(door: u8, name: &str) -> Prepared {
    let n = encode(name);
    let json = |v: Value| serde_json::to_vec(&v).unwrap();
    let forbidden = Some(Expect::Status(StatusCode::FORBIDDEN, Some("forbidden")));
    let sender = Some(Expect::Status(
        StatusCode::FORBIDDEN,
        Some("forbidden_sender"),
    ));
    let post = Method::POST;
    let get = Method::GET;
    let (method, path, query, body, expect) = match usize::from(door) % RESERVED_DOORS {
        0 => (
            post,
            "/send".into(),
            String::new(),
            json(serde_json::json!({"from": name, "to": "bob", "msg": "hi"})),
            sender,
        ),
        1 => (
            post,
            "/send".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": name, "msg": "hi"})),
            forbidden,
        ),
        2 => (
            post,
            "/broadcast".into(),
            format!("from={n}"),
            json(serde_json::json!({"text": "hi"})),
            sender,
        ),
        3 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!({"from": name, "to": "bob", "body": {}})),
            sender,
        ),
        4 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": name, "body": {}})),
            forbidden,
        ),
        5 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!([
                {"from": "alice", "to": "bob", "body": {}},
                {"from": name, "body": {}},
            ])),
            Some(Expect::BatchOutcome(1, "forbidden_sender")),
        ),
        6 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!([
                {"from": "alice", "to": name, "body": {}},
                {"from": "alice", "to": "bob", "body": {}},
            ])),
            Some(Expect::BatchOutcome(0, "forbidden")),
        ),
        7 => (
            post,
            "/v1/events".into(),
            String::new(),
            json(serde_json::json!({"topic": "tui.x", "from": name})),
            sender,
        ),
        8 => (get, "/recv".into(), format!("to={n}"), vec![], forbidden),
        9 => (
            get,
            "/recv".into(),
            format!("to={n}&channel=*"),
            vec![],
            forbidden,
        ),
        10 => (get, "/poll".into(), format!("agent={n}"), vec![], forbidden),
        11 => (
            get,
            format!("/v1/agents/{n}/inbox"),
            String::new(),
            vec![],
            forbidden,
        ),
        12 => (
            post,
            format!("/v1/agents/{n}/ack"),
            String::new(),
            json(serde_json::json!({"seq": 0})),
            forbidden,
        ),
        13 => (
            post,
            format!("/v1/agents/{n}/presence"),
            String::new(),
            json(serde_json::json!({"status": "busy"})),
            forbidden,
        ),
        14 => (
            get,
            format!("/v1/agents/{n}/subscriptions"),
            String::new(),
            vec![],
            forbidden,
        ),
        15 => (
            post,
            format!("/v1/agents/{n}/subscriptions"),
            String::new(),
            json(serde_json::json!({"pattern": "tui.**"})),
            forbidden,
        ),
        16 => (
            get,
            format!("/v1/agents/{n}/stream"),
            String::new(),
            vec![],
            forbidden,
        ),
        _ => (
            get,
            "/subscribe".into(),
            format!("agent={n}"),
            vec![],
            forbidden,
        ),
    };
    let kind = sends_kind(&path, &query, &body);
    Prepared {
        method,
        path,
        query,
        ct: Some("application/json".into()),
        body,
        kind,
        expect,
    }
}

const CAPPED_DOORS: usize = 13;

/// `Call::Capped`: a valid request whose one capped field has `value`.
fn capped_call(door: u8, value: &str) -> Prepared {
    let json = |v: Value| serde_json::to_vec(&v).unwrap();
    let q = encode(value);
    let post = Method::POST;
    let (method, path, query, body): (Method, String, String, Vec<u8>) = match usize::from(door)
        % CAPPED_DOORS
    {
        0 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": "bob", "id": value, "body": {}})),
        ),
        1 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": "bob", "reply_to": value, "body": {}})),
        ),
        2 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "thread": value, "body": {}})),
        ),
        3 => (
            post,
            "/v1/messages".into(),
            String::new(),
            json(serde_json::json!([
                {"from": "alice", "to": "bob", "body": {}},
                {"from": "bob", "to": "alice", "id": value, "body": {}},
            ])),
        ),
        4 => (
            post,
            "/send".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": "bob", "msg": "hi", "reply_to": value})),
        ),
        5 => (
            post,
            "/send".into(),
            String::new(),
            json(serde_json::json!({"from": "alice", "to": "bob", "msg": "hi", "thread": value})),
        ),
        6 => (
            post,
            "/broadcast".into(),
            format!("from=alice&reply_to={q}"),
            json(serde_json::json!({"text": "hi"})),
        ),
        7 => (
            post,
            "/broadcast".into(),
            format!("from=alice&thread={q}"),
            json(serde_json::json!({"text": "hi"})),
        ),
        8 => (
            post,
            "/v1/events".into(),
            String::new(),
            json(serde_json::json!({"topic": value, "payload": {"a": 1}})),
        ),
        9 => (
            post,
            "/v1/events".into(),
            String::new(),
            json(serde_json::json!({"topic": "tui.x", "id": value, "durable": true})),
        ),
        10 => (
            post,
            "/v1/agents/bob/subscriptions".into(),
            String::new(),
            json(serde_json::json!({"pattern": value})),
        ),
        11 => (
            Method::DELETE,
            "/v1/agents/bob/subscriptions".into(),
            String::new(),
            json(serde_json::json!({"pattern": value})),
        ),
        _ => (
            Method::GET,
            "/v1/events".into(),
            format!("pattern={q}"),
            vec![],
        ),
    };
    let ok = value.chars().count() <= MAX_FIELD_LEN;
    let expect = if ok {
        Expect::Status(StatusCode::OK, None)
    } else {
        Expect::Status(StatusCode::BAD_REQUEST, Some("invalid_request"))
    };
    let kind = match &path[..] {
        "/v1/agents/bob/subscriptions" => {
            Kind::Subscribes(fields(&body).and_then(|f| string_field(&f, "pattern")))
        }
        "/v1/events" if method == Method::GET => Kind::Reads(Reads::SseFrames, None),
        _ => sends_kind(&path, &query, &body),
    };
    let mut p = prepared(method, path, query, body, kind);
    p.expect = Some(expect);
    p
}

const STREAMS: usize = 6;

fn prepare(call: &Call, seen: &[String]) -> Prepared {
    let seg = |n: &Name| encode(&n.text());
    let id_of = |r: &IdRef| match r {
        IdRef::Seen(i) if !seen.is_empty() => seen[usize::from(*i) % seen.len()].clone(),
        IdRef::Seen(_) => "none".to_owned(),
        IdRef::Any(n) => n.text(),
    };
    match call {
        Call::Send { body, ct } => {
            let bytes = body.bytes();
            let sent = fields(&bytes).map(|f| sent_of(&f, &["reply_to", "thread"]));
            let mut p = prepared(
                Method::POST,
                "/send".into(),
                String::new(),
                bytes,
                sent.map_or(Kind::Raw, Kind::Sends),
            );
            p.ct = ct.get().map(str::to_owned);
            p
        }
        Call::Recv { query } => {
            let pairs = query.pairs(&[("to", "bob"), ("block", "false")]);
            prepared(
                Method::GET,
                "/recv".into(),
                query_string(&pairs, query.raw),
                vec![],
                Kind::Reads(Reads::Recv, only(&pairs, "to", query.raw)),
            )
        }
        Call::Broadcast {
            from,
            channel,
            meta,
            body,
            ct,
        } => {
            let mut pairs = Vec::new();
            if let Some(f) = from {
                pairs.push(("from".to_owned(), f.text()));
            }
            if let Some(c) = channel {
                pairs.push(("channel".to_owned(), c.text()));
            }
            let meta_keys = [
                "reply_to",
                "thread",
                "priority",
                "ttl",
                "bounce_after",
                "notify",
            ];
            let mut capped: Vec<(&'static str, String)> = Vec::new();
            for (k, v) in meta {
                let k = meta_keys[usize::from(*k) % meta_keys.len()];
                let v = v.text();
                if matches!(k, "reply_to" | "thread") {
                    // A repeated key: the last one counts.
                    capped.retain(|(c, _)| *c != k);
                    capped.push((k, v.clone()));
                }
                pairs.push((k.to_owned(), v));
            }
            let sent = Sent {
                from: from.as_ref().map(Name::text),
                capped,
                ..Sent::default()
            };
            let mut p = prepared(
                Method::POST,
                "/broadcast".into(),
                query_string(&pairs, false),
                body.bytes(),
                Kind::Sends(sent),
            );
            p.ct = ct.get().map(str::to_owned);
            p
        }
        Call::Poll { query } => {
            let pairs = query.pairs(&[("agent", "bob")]);
            prepared(
                Method::GET,
                "/poll".into(),
                query_string(&pairs, query.raw),
                vec![],
                Kind::Reads(Reads::Poll, only(&pairs, "agent", query.raw)),
            )
        }
        Call::Status { query } => prepared(
            Method::GET,
            "/status".into(),
            query.build(&[]),
            vec![],
            Kind::Other,
        ),
        Call::V1Send { body, ct } => {
            let mut p = prepared(
                Method::POST,
                "/v1/messages".into(),
                String::new(),
                body.bytes(),
                Kind::V1Messages,
            );
            p.ct = ct.get().map(str::to_owned);
            p
        }
        Call::V1Inbox { name, query } => prepared(
            Method::GET,
            format!("/v1/agents/{}/inbox", seg(name)),
            query.build(&[("wait", "0")]),
            vec![],
            Kind::Reads(Reads::V1Inbox, Some(name.text())),
        ),
        Call::V1Ack { name, body } => prepared(
            Method::POST,
            format!("/v1/agents/{}/ack", seg(name)),
            String::new(),
            body.bytes(),
            Kind::Other,
        ),
        Call::V1Presence { name, body } => prepared(
            Method::POST,
            format!("/v1/agents/{}/presence", seg(name)),
            String::new(),
            body.bytes(),
            Kind::Presence(name.text()),
        ),
        Call::V1Publish { body, ct } => {
            let bytes = body.bytes();
            let kind = match fields(&bytes) {
                Some(f) => Kind::Sends(Sent {
                    from: string_field(&f, "from"),
                    default_from: Some("anonymous"),
                    to: None,
                    capped: ["topic", "id"]
                        .iter()
                        .filter_map(|k| string_field(&f, k).map(|v| (*k, v)))
                        .collect(),
                    topic: string_field(&f, "topic"),
                }),
                None => Kind::Raw,
            };
            let mut p = prepared(
                Method::POST,
                "/v1/events".into(),
                String::new(),
                bytes,
                kind,
            );
            p.ct = ct.get().map(str::to_owned);
            p
        }
        Call::V1Subscription {
            name,
            method,
            query,
            body,
        } => {
            let method =
                [Method::GET, Method::POST, Method::DELETE][usize::from(*method) % 3].clone();
            let bytes = body.bytes();
            let pattern = fields(&bytes).and_then(|f| string_field(&f, "pattern"));
            let kind = if method == Method::GET {
                Kind::Other
            } else {
                Kind::Subscribes(pattern)
            };
            prepared(
                method,
                format!("/v1/agents/{}/subscriptions", seg(name)),
                query.build(&[]),
                bytes,
                kind,
            )
        }
        Call::V1Receipt { id, query } => prepared(
            Method::GET,
            format!("/v1/messages/{}", encode(&id_of(id))),
            query.build(&[]),
            vec![],
            Kind::Reads(Reads::Receipts, None),
        ),
        Call::V1Thread { id } => prepared(
            Method::GET,
            format!("/v1/threads/{}", encode(&id_of(id))),
            String::new(),
            vec![],
            Kind::Reads(Reads::Thread, None),
        ),
        Call::Stream { which, name, query } => {
            let (path, forced, reads): (String, &[(&str, &str)], Option<Reads>) =
                match usize::from(*which) % STREAMS {
                    0 => (
                        format!("/v1/agents/{}/stream", seg(name)),
                        &[],
                        Some(Reads::SseFrames),
                    ),
                    1 => ("/v1/events".into(), &[], Some(Reads::SseFrames)),
                    2 => (
                        "/subscribe".into(),
                        &[("agent", "bob")],
                        Some(Reads::SseInterop),
                    ),
                    3 => (format!("/v1/agents/{}/ws", seg(name)), &[], None),
                    4 => ("/api/pub".into(), &[], None),
                    _ => ("/api/events".into(), &[], None),
                };
            prepared(
                Method::GET,
                path,
                query.build(forced),
                vec![],
                reads.map_or(Kind::Other, |r| Kind::Reads(r, None)),
            )
        }
        Call::Get(i) => prepared(
            Method::GET,
            GETS[usize::from(*i) % GETS.len()].to_owned(),
            String::new(),
            vec![],
            Kind::Other,
        ),
        // 1 to 300 characters: an empty topic or pattern is refused as such.
        Call::Capped { door, len, wide } => capped_call(*door, &long(1 + *len % 300, *wide)),
        Call::Reserved { door, name } => reserved_call(
            *door,
            RESERVED_NAMES[usize::from(*name) % RESERVED_NAMES.len()],
        ),
        Call::Raw {
            method,
            path,
            query,
            body,
            ct,
        } => {
            let method = METHODS[usize::from(*method) % METHODS.len()].clone();
            let path = if path.starts_with('/') {
                path.clone()
            } else {
                format!("/{path}")
            };
            let mut p = prepared(method, path, query.build(&[]), body.bytes(), Kind::Raw);
            p.ct = ct.get().map(str::to_owned);
            p
        }
    }
}

/// Every route and method a call can be built for; checked against
/// [`ROUTES`] once, so a route added to the app without a call here (or a
/// call to a route that went away) fails at the first input.
fn generator_routes() -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = vec![
        ("POST", "/send".into()),
        ("GET", "/recv".into()),
        ("POST", "/broadcast".into()),
        ("GET", "/poll".into()),
        ("GET", "/status".into()),
        ("POST", "/v1/messages".into()),
        ("GET", "/v1/agents/{name}/inbox".into()),
        ("POST", "/v1/agents/{name}/ack".into()),
        ("POST", "/v1/agents/{name}/presence".into()),
        ("POST", "/v1/events".into()),
        ("GET", "/v1/agents/{name}/subscriptions".into()),
        ("POST", "/v1/agents/{name}/subscriptions".into()),
        ("DELETE", "/v1/agents/{name}/subscriptions".into()),
        ("GET", "/v1/messages/{id}".into()),
        ("GET", "/v1/threads/{id}".into()),
        ("GET", "/v1/agents/{name}/stream".into()),
        ("GET", "/v1/events".into()),
        ("GET", "/subscribe".into()),
        ("GET", "/v1/agents/{name}/ws".into()),
        ("GET", "/api/pub".into()),
        ("GET", "/api/events".into()),
    ];
    out.extend(GETS.iter().map(|g| ("GET", (*g).to_owned())));
    out
}

/// Once per process: the generator reaches every route of [`ROUTES`], and
/// `ROUTES` holds every operation the app's OpenAPI document lists.
async fn check_generator_covers_routes(app: &Router) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let generated: HashSet<(&str, String)> = generator_routes().into_iter().collect();
    let routes: HashSet<(&str, String)> =
        ROUTES.iter().map(|(m, p)| (*m, (*p).to_owned())).collect();
    assert_eq!(generated, routes, "the generator and ROUTES differ");
    let req = Request::get("/v1/openapi.json")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&bytes).expect("the OpenAPI document");
    let paths = doc["paths"].as_object().expect("OpenAPI paths");
    for (path, ops) in paths {
        let methods = ops.as_object().expect("OpenAPI operations").keys();
        let http = [
            "get", "post", "put", "delete", "patch", "head", "options", "trace",
        ];
        for method in methods.filter(|m| http.contains(&m.as_str())) {
            let method = method.to_ascii_uppercase();
            assert!(
                routes.contains(&(method.as_str(), path.clone())),
                "{method} {path} (OpenAPI) is missing from ROUTES and the generator"
            );
        }
    }
}

// ---------------------------------------------------------------- oracle

/// Message id -> the senders that sent a message with that id, and the
/// names whose presence this input set.
#[derive(Default)]
struct Ledger {
    sent: HashMap<String, HashSet<String>>,
    /// Ids in the order they came back (for `IdRef::Seen`).
    ids: Vec<String>,
    presence: HashSet<String>,
    unknown: bool,
}

impl Ledger {
    fn record(&mut self, id: &str, from: &str) {
        if !self.sent.contains_key(id) {
            self.ids.push(id.to_owned());
        }
        self.sent
            .entry(id.to_owned())
            .or_default()
            .insert(from.to_owned());
    }

    /// A delivered message: `from` sent `id`, or it is the daemon's own.
    fn check(&self, id: &Value, from: &Value, topic: Option<&str>, reads: Reads, what: &str) {
        let (Some(id), Some(from)) = (id.as_str(), from.as_str()) else {
            panic!("{what}: delivered message without string id/from: id={id} from={from}");
        };
        assert_ne!(
            from, "relay",
            "{what}: a message from relay without a relay"
        );
        if from == "hermod" || (from == "interop" && reads == Reads::SseInterop) {
            return; // receipts, bounces, loop-guard and peer notices
        }
        if topic == Some(format!("presence.{from}").as_str()) && self.presence.contains(from) {
            return;
        }
        if self.unknown {
            return;
        }
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

/// A read or presence as `name` succeeded: never a reserved name, carol's
/// only with her token, and with her token only hers.
fn check_acts_as(name: &str, cred: Cred, what: &str) {
    for reserved in RESERVED_NAMES {
        assert_ne!(name, reserved, "{what}: acted as reserved {reserved}");
    }
    match cred {
        Cred::Carol | Cred::CarolPath => {
            assert_eq!(name, CAROL, "{what}: carol's token acted as {name}")
        }
        _ => assert_ne!(name, CAROL, "{what}: acted as carol without her token"),
    }
}

/// What the step's credentials make of a sender.
fn effective_sender(sent: &Sent, cred: Cred) -> Option<String> {
    match cred {
        Cred::Carol | Cred::CarolPath => Some(CAROL.to_owned()),
        _ => sent
            .from
            .clone()
            .filter(|f| !f.is_empty() || sent.default_from.is_none())
            .or(sent.default_from.map(str::to_owned)),
    }
}

/// A send was accepted: it must have been one the documented rules allow.
fn check_accepted(sent: &Sent, cred: Cred, what: &str) -> String {
    let from = effective_sender(sent, cred)
        .unwrap_or_else(|| panic!("{what}: accepted without a sender: {sent:?}"));
    for reserved in RESERVED_NAMES {
        assert_ne!(from, reserved, "{what}: accepted from reserved {reserved}");
        assert_ne!(
            sent.to.as_deref(),
            Some(reserved),
            "{what}: accepted to reserved {reserved}"
        );
    }
    for (field, value) in &sent.capped {
        let n = value.chars().count();
        assert!(
            n <= MAX_FIELD_LEN,
            "{what}: accepted a {n}-character {field}"
        );
    }
    match cred {
        Cred::Carol | Cred::CarolPath => {
            if let Some(claimed) = sent.from.as_deref().filter(|f| !f.is_empty()) {
                assert_eq!(claimed, CAROL, "{what}: carol's token sent as {claimed}");
            }
            if let Some(topic) = &sent.topic {
                assert!(
                    topic == "tui" || topic.starts_with("tui."),
                    "{what}: carol published {topic:?} (may_publish tui.**)"
                );
            } else {
                assert_eq!(
                    sent.to.as_deref(),
                    Some("bob"),
                    "{what}: carol sent to {:?} (may_send bob)",
                    sent.to
                );
            }
        }
        _ => assert_ne!(from, CAROL, "{what}: sent as carol without her token"),
    }
    from
}

/// The `data:` of each ready SSE event (not `gap` events), from a body
/// that never ends: polls it a bounded number of times, never waits.
async fn sse_ready(body: axum::body::Body) -> Vec<String> {
    let mut body = body;
    let mut text = String::new();
    for _ in 0..16 {
        // `timeout` polls the frame first: a zero timeout is "if ready".
        match tokio::time::timeout(Duration::ZERO, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Ok(Some(Err(e))) => panic!("SSE body failed: {e}"),
            Ok(None) => break,
            Err(_) => tokio::task::yield_now().await,
        }
    }
    let mut out = Vec::new();
    // Only complete events (a blank line ends each).
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    for event in complete.split("\n\n") {
        let mut kind = "message";
        let mut data: Vec<&str> = Vec::new();
        for line in event.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim_start();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if kind != "gap" && !data.is_empty() {
            out.push(data.join("\n"));
        }
    }
    out
}

async fn run(steps: Vec<Step>) {
    let (app, token) = fresh_app().await;
    check_generator_covers_routes(&app).await;
    let mut ledger = Ledger::default();
    for step in steps.iter().take(8) {
        let p = prepare(&step.call, &ledger.ids);
        let mut path = p.path.clone();
        if step.cred == Cred::CarolPath {
            path = format!("/a/{token}{path}");
        }
        let uri = if p.query.is_empty() {
            path
        } else {
            format!("{path}?{}", p.query)
        };
        let mut b = Request::builder().method(p.method.clone()).uri(&uri);
        if let Some(ct) = p.ct.as_deref() {
            if let Ok(v) = header::HeaderValue::from_str(ct) {
                b = b.header(header::CONTENT_TYPE, v);
            }
        }
        match step.cred {
            Cred::Carol => b = b.header(header::AUTHORIZATION, format!("Bearer {token}")),
            Cred::Bogus => b = b.header(header::AUTHORIZATION, "Bearer hmd_nobody"),
            Cred::None | Cred::CarolPath => {}
        }
        let mut refused_by_browser = false;
        let mut named = HashSet::new();
        for h in &step.browser {
            let (name, value, allowed) = h.header();
            // A browser sends each of these once (the edge reads the first).
            if !named.insert(name.clone()) {
                continue;
            }
            b = b.header(name, value);
            refused_by_browser |= !allowed;
        }
        let Ok(req) = b.body(axum::body::Body::from(p.body.clone())) else {
            continue; // not a valid URI
        };
        let method = p.method.clone();
        let what = format!("{method} {uri} ({:?})", step.cred);
        let resp = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{what} did not answer within 5 s"))
            .unwrap();
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        // An SSE body never ends: only what is ready is read.
        if status.is_success() && content_type.starts_with("text/event-stream") {
            assert!(
                !refused_by_browser,
                "{what}: {status} past the browser boundary"
            );
            assert_ne!(
                step.cred,
                Cred::Bogus,
                "{what}: {status} for an unknown token"
            );
            if let (Some(Expect::Status(want, _)), Cred::None) = (p.expect, step.cred) {
                assert_eq!(status, want, "{what}");
            }
            if method == Method::HEAD {
                continue;
            }
            assert_eq!(method, Method::GET, "{what}: a stream");
            for data in sse_ready(resp.into_body()).await {
                let v: Value = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("{what}: SSE data is not JSON ({e}): {data}"));
                match &p.kind {
                    Kind::Reads(Reads::SseFrames, _) => {
                        assert_eq!(v["type"], "message", "{what}: {data}");
                        ledger.check(
                            &v["id"],
                            &v["from"],
                            v["topic"].as_str(),
                            Reads::SseFrames,
                            &what,
                        );
                    }
                    Kind::Reads(Reads::SseInterop, _) => {
                        let meta = &v["_meta"];
                        ledger.check(
                            &meta["id"],
                            &meta["from"],
                            v["type"].as_str(),
                            Reads::SseInterop,
                            &what,
                        );
                    }
                    _ => {}
                }
            }
            continue;
        }
        let bytes = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{what}: body not complete within 5 s"))
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!status.is_server_error(), "{what} -> {status}: {text}");
        let error_code = if status.is_client_error() && method != Method::HEAD {
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{what} -> {status}, body not JSON ({e}): {text}"));
            assert!(
                v["error"].is_string(),
                "{what} -> {status} without error: {text}"
            );
            let code = v["code"].as_str().unwrap_or_default().to_owned();
            assert!(!code.is_empty(), "{what} -> {status} without code: {text}");
            Some(code)
        } else {
            None
        };

        // The edge answers first: the browser boundary, then the token.
        if refused_by_browser {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{what}: refused browser header -> {text}"
            );
            if method != Method::HEAD {
                assert_eq!(error_code.as_deref(), Some("forbidden"), "{what}: {text}");
            }
            continue;
        }
        if step.cred == Cred::Bogus {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{what}: unknown token -> {text}"
            );
            if method != Method::HEAD {
                assert_eq!(
                    error_code.as_deref(),
                    Some("unauthorized"),
                    "{what}: {text}"
                );
            }
            continue;
        }

        let plain = step.cred == Cred::None;
        match (p.expect, plain) {
            (Some(Expect::Status(want, code)), true) => {
                assert_eq!(status, want, "{what}: {text}");
                if code.is_some() && method != Method::HEAD {
                    assert_eq!(error_code.as_deref(), code, "{what}: {text}");
                }
            }
            (Some(Expect::BatchOutcome(..)), true) => {
                assert_eq!(status, StatusCode::OK, "{what}: {text}");
            }
            _ => {}
        }
        if status.is_client_error() || !status.is_success() || method == Method::HEAD {
            continue;
        }
        let v: Option<Value> = if content_type.starts_with("application/json") {
            Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{what} -> {status}, JSON body does not parse ({e}): {text}")
            }))
        } else {
            None
        };
        if let (Some(Expect::BatchOutcome(i, code)), true) = (p.expect, plain) {
            let v = v.as_ref().expect("a batch answer is JSON");
            assert_eq!(v[i]["code"], code, "{what}: element {i}: {text}");
        }
        if status != StatusCode::OK {
            continue;
        }
        match (&p.kind, &v) {
            (Kind::Raw, _) if method != Method::GET => ledger.unknown = true,
            (Kind::Sends(sent), Some(v)) => {
                let from = check_accepted(sent, step.cred, &what);
                let id = v["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: accepted without an id: {text}"));
                ledger.record(id, &from);
            }
            (Kind::V1Messages, Some(v)) => match v {
                Value::Array(outcomes) => {
                    let items: Vec<HashMap<String, Box<RawValue>>> =
                        serde_json::from_slice(&p.body)
                            .unwrap_or_else(|e| panic!("{what}: a batch answered for {e}"));
                    assert_eq!(
                        outcomes.len(),
                        items.len(),
                        "{what}: one outcome per element"
                    );
                    for (i, (item, outcome)) in items.iter().zip(outcomes).enumerate() {
                        let what = format!("{what} element {i}");
                        match outcome["id"].as_str() {
                            Some(id) => {
                                assert!(outcome["seq"].is_u64(), "{what}: {outcome}");
                                let sent = sent_of(item, &["id", "reply_to", "thread"]);
                                let from = check_accepted(&sent, step.cred, &what);
                                ledger.record(id, &from);
                            }
                            None => {
                                assert!(outcome["error"].is_string(), "{what}: {outcome}");
                                assert!(
                                    outcome["code"].as_str().is_some_and(|c| !c.is_empty()),
                                    "{what}: {outcome}"
                                );
                            }
                        }
                    }
                }
                _ => {
                    let f = fields(&p.body)
                        .unwrap_or_else(|| panic!("{what}: one message answered for {text}"));
                    let sent = sent_of(&f, &["id", "reply_to", "thread"]);
                    let from = check_accepted(&sent, step.cred, &what);
                    let id = v["id"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{what}: accepted without an id: {text}"));
                    assert!(v["seq"].is_u64(), "{what}: {text}");
                    ledger.record(id, &from);
                }
            },
            (Kind::Subscribes(pattern), _) => {
                let pattern = pattern
                    .as_deref()
                    .unwrap_or_else(|| panic!("{what}: accepted without a pattern"));
                let n = pattern.chars().count();
                assert!(
                    n <= MAX_FIELD_LEN,
                    "{what}: accepted a {n}-character pattern"
                );
            }
            (Kind::Presence(name), _) => {
                check_acts_as(name, step.cred, &what);
                ledger.presence.insert(name.clone());
            }
            (Kind::Reads(_, Some(reader)), _) => check_acts_as(reader, step.cred, &what),
            _ => {}
        }
        let (Kind::Reads(reads, _), Some(v)) = (&p.kind, v) else {
            continue;
        };
        match reads {
            Reads::Recv => {
                for m in v["messages"].as_array().expect("messages array") {
                    // An event's `msg` is its envelope as text.
                    let envelope: Value = m["msg"]
                        .as_str()
                        .and_then(|t| serde_json::from_str(t).ok())
                        .unwrap_or_default();
                    ledger.check(
                        &m["id"],
                        &m["from"],
                        envelope["type"].as_str(),
                        *reads,
                        &what,
                    );
                }
            }
            Reads::V1Inbox => {
                for m in v["messages"].as_array().expect("messages array") {
                    ledger.check(&m["id"], &m["from"], m["topic"].as_str(), *reads, &what);
                }
            }
            Reads::Thread | Reads::Receipts => {
                for m in v.as_array().expect("an array") {
                    ledger.check(&m["id"], &m["from"], m["topic"].as_str(), *reads, &what);
                }
            }
            Reads::Poll => {
                for m in v.as_array().expect("poll: an array") {
                    let meta = &m["_meta"];
                    assert!(meta["seq"].is_u64(), "{what}: _meta.seq: {m}");
                    // An event's body is its envelope: `type` is the topic.
                    ledger.check(
                        &meta["id"],
                        &meta["from"],
                        m["type"].as_str(),
                        *reads,
                        &what,
                    );
                }
            }
            Reads::SseFrames | Reads::SseInterop => {}
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    runtime().block_on(run(steps));
});
